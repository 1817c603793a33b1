"""Proxy benchmark: pgbench select-only through direct / PgBouncer / pgwarden / bare forwarder.

Starts a throwaway PostgreSQL, fills a ``bench`` database with ``pgbench -i``, starts every
target as its own process, then runs short ``pgbench -S`` runs in several rounds, *interleaved*
(each round visits every mode and every target, with the target order rotated each round), so
that machine noise falls on all targets alike.  Reports the median tps and average latency per
target and mode, and the ratios that matter:

* ``pgwarden / direct`` and ``pgwarden / pgbouncer``: what pgwarden costs;
* ``bare / direct``: what a Python process in the path costs at all (the floor for pgwarden);
* ``pgbouncer / direct``: what a mature C proxy costs, for scale.

stdout ends with ``name=value`` figure lines; the last line carries ``ratio_vs_pgbouncer``
(the lower of the simple- and extended-protocol pgwarden/PgBouncer ratios).  Progress goes to
stderr; the full results go to ``loadtests/results/bench_proxy.json``.

Every client connects without TLS (see ``harness.CLIENT_ENV``).  On a small machine the
client (pgbench), the proxy and PostgreSQL share the cores: the figures are for this
machine as a whole, not for the proxy in isolation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtests import harness
from loadtests.harness import PgbenchResult, Target, TargetUnavailable, progress
from proxy.sandbox.cluster import running_cluster

ALL_TARGETS = ("direct", "pgbouncer", "pgwarden", "bare", "pgwarden-policy", "pgwarden-audit")
DEFAULT_TARGETS = ("direct", "pgbouncer", "pgwarden", "bare", "pgwarden-policy", "pgwarden-audit")
POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"
ALL_MODES = ("simple", "extended", "prepared")
DATABASE = "bench"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (all have defaults suitable for ``make bench``)."""
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--duration", type=int, default=6, help="seconds per pgbench run")
    # Many short rounds beat few long ones on a shared machine: bursts of other work then
    # land in one run of each target rather than all runs of one.
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated")
    p.add_argument(
        "--modes", default="simple,extended", help="comma-separated -M modes (also: prepared)"
    )
    p.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded warm-up/target")
    p.add_argument("--no-uvloop", action="store_true", help="bare forwarder on stdlib asyncio")
    p.add_argument("--pgwarden-args", default="", help="extra arguments for 'pgwarden serve'")
    p.add_argument("--output", type=Path, default=harness.RESULTS_DIR / "bench_proxy.json")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.targets) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    unknown = set(args.modes) - set(ALL_MODES)
    if unknown:
        p.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if not (1 <= args.duration <= 600 and 1 <= args.rounds <= 20 and 1 <= args.clients <= 100):
        p.error("--duration 1..600, --rounds 1..20, --clients 1..100")
    return args


def start_targets(
    stack: contextlib.ExitStack, names: Sequence[str], cluster: Any, workdir: Path, args: Any
) -> tuple[dict[str, Target], dict[str, str]]:
    """Start what can be started; returns the running targets and why others were skipped."""
    running: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            if name == "direct":
                target = stack.enter_context(harness.direct_target(cluster))
            elif name == "pgbouncer":
                target = stack.enter_context(harness.pgbouncer_target(cluster, workdir))
            elif name == "pgwarden":
                target = stack.enter_context(
                    harness.pgwarden_target(
                        cluster, workdir / "pgwarden", harness.split_args(args.pgwarden_args)
                    )
                )
            elif name == "pgwarden-policy":
                # config/policy.yaml enforcing, pgbench as the agents' account: every
                # statement is analysed and judged (pgbench's tables carry no labels, so
                # nothing is refused).
                target = stack.enter_context(
                    harness.pgwarden_target(
                        cluster, workdir / name,
                        ["--policy", str(POLICY), "--catalog-user", "postgres"],
                        name=name, user="support_app",
                    )
                )  # fmt: skip
            elif name == "pgwarden-audit":
                # Pass-through plus the audit trail: one chained event per statement.
                target = stack.enter_context(
                    harness.pgwarden_target(
                        cluster, workdir / name, ["--audit-db", str(workdir / "audit.db")],
                        name=name,
                    )
                )  # fmt: skip
            else:
                target = stack.enter_context(
                    harness.bare_target(cluster, workdir / "bare", uvloop=not args.no_uvloop)
                )
            harness.check_target(target, DATABASE)
            running[name] = target
            progress(f"bench: target {name} on {target.host}:{target.port}")
        except TargetUnavailable as exc:
            skipped[name] = str(exc)
            progress(f"bench: SKIPPING {name}: {exc}")
    return running, skipped


def summarise(
    results: Sequence[PgbenchResult], targets: Sequence[str], modes: Sequence[str]
) -> tuple[dict[str, float], dict[str, Any]]:
    """Figures (ordered, for the figure lines) and a per-target/mode summary for the JSON."""
    figures: dict[str, float] = {}
    summary: dict[str, Any] = {}
    tps: dict[tuple[str, str], float] = {}
    measured_targets = sorted({r.target for r in results if not r.error}, key=ALL_TARGETS.index)
    for mode in modes:
        for target in [t for t in targets if t in measured_targets]:
            runs = [r for r in results if r.target == target and r.mode == mode and not r.error]
            tps[target, mode] = harness.median([r.tps for r in runs])
            lat = harness.median([r.latency_ms for r in runs])
            summary.setdefault(target, {})[mode] = {
                "median_tps": tps[target, mode],
                "mean_latency_ms": (
                    sum(r.latency_ms for r in runs) / len(runs) if runs else math.nan
                ),
                "median_latency_ms": lat,
                "runs": len(runs),
                "tps_each_run": [r.tps for r in runs],
            }
            figures[f"tps_{target}_{mode}"] = tps[target, mode]
            figures[f"latency_ms_{target}_{mode}"] = summary[target][mode]["mean_latency_ms"]
            cpu = [r.proxy_cpu_us_per_tx for r in runs if r.proxy_cpu_us_per_tx is not None]
            if cpu:
                summary[target][mode]["proxy_cpu_us_per_tx"] = harness.median(cpu)
                figures[f"proxy_cpu_us_per_tx_{target}_{mode}"] = harness.median(cpu)

    def t(target: str, mode: str) -> float:
        return tps.get((target, mode), math.nan)

    for mode in modes:
        figures[f"ratio_pgwarden_vs_direct_{mode}"] = harness.ratio(
            t("pgwarden", mode), t("direct", mode)
        )
        figures[f"ratio_pgwarden_vs_pgbouncer_{mode}"] = harness.ratio(
            t("pgwarden", mode), t("pgbouncer", mode)
        )
        figures[f"ratio_pgwarden_vs_bare_{mode}"] = harness.ratio(
            t("pgwarden", mode), t("bare", mode)
        )
        figures[f"ratio_bare_vs_direct_{mode}"] = harness.ratio(t("bare", mode), t("direct", mode))
        figures[f"ratio_pgbouncer_vs_direct_{mode}"] = harness.ratio(
            t("pgbouncer", mode), t("direct", mode)
        )
        figures[f"ratio_policy_vs_passthrough_{mode}"] = harness.ratio(
            t("pgwarden-policy", mode), t("pgwarden", mode)
        )
        figures[f"ratio_audit_vs_noaudit_{mode}"] = harness.ratio(
            t("pgwarden-audit", mode), t("pgwarden", mode)
        )
    summary["paired_ratios"] = harness.paired_ratios(
        [(r.target, r.mode, r.round, r.tps) for r in results if not r.error],
        [("pgwarden", "direct"), ("pgwarden", "pgbouncer"), ("bare", "direct"),
         ("pgbouncer", "direct")],
    )  # fmt: skip
    # Ratios of targets that were not measured are left out rather than printed as nan.
    figures = {k: v for k, v in figures.items() if not math.isnan(v)}
    # The headline: the worse of the two protocols pgwarden must handle on every statement.
    headline = [
        figures.get(f"ratio_pgwarden_vs_pgbouncer_{m}", math.nan) for m in ("simple", "extended")
    ]
    measured = [v for v in headline if not math.isnan(v)]
    figures["ratio_vs_pgbouncer"] = min(measured) if len(measured) == 2 else math.nan
    for name in ("ratio_policy_vs_passthrough", "ratio_audit_vs_noaudit"):
        both = [figures.get(f"{name}_{m}", math.nan) for m in ("simple", "extended")]
        if not any(math.isnan(v) for v in both):
            figures[name] = min(both)
    return figures, summary


def last_line(figures: dict[str, float]) -> str:
    """The summary line; it starts with ``ratio_vs_pgbouncer`` as the harness expects."""
    names = [
        "ratio_vs_pgbouncer",
        "ratio_policy_vs_passthrough",
        "ratio_audit_vs_noaudit",
        "ratio_pgwarden_vs_direct_simple",
        "ratio_pgwarden_vs_direct_extended",
        "ratio_bare_vs_direct_simple",
        "ratio_bare_vs_direct_extended",
        "ratio_pgbouncer_vs_direct_simple",
        "ratio_pgbouncer_vs_direct_extended",
    ]
    return " ".join(f"{n}={harness.fmt(figures[n])}" for n in names if n in figures)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print figure lines; write the JSON results."""
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    results: list[PgbenchResult] = []
    skipped: dict[str, str] = {}
    started = time.monotonic()
    try:
        with running_cluster(tls=False, schema=True) as cluster, contextlib.ExitStack() as stack:
            progress(f"bench: PostgreSQL on port {cluster.port}; pgbench -i -s {args.scale} ...")
            init_s = harness.pgbench_init(cluster, DATABASE, args.scale)
            progress(f"bench: initialised in {init_s:.1f}s")
            running, skipped = start_targets(stack, args.targets, cluster, workdir, args)
            if not running:
                progress("bench: no target could be started")
                return 2
            names = list(running)
            for name in names:
                # Unrecorded warm-up: first connections, caches, the proxies' code paths.
                if args.warmup > 0:
                    harness.run_pgbench(
                        running[name], DATABASE, mode="simple", workload="select-only",
                        args=["-S"], duration=args.warmup, clients=args.clients, jobs=args.jobs,
                    )  # fmt: skip
            total = args.rounds * len(args.modes) * len(names)
            done = 0
            for rnd in range(args.rounds):
                # Rotate the order each round so no target always runs first or last.
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for mode in args.modes:
                    for name in order:
                        r = harness.run_pgbench(
                            running[name], DATABASE, mode=mode, workload="select-only",
                            args=["-S"], duration=args.duration, clients=args.clients,
                            jobs=args.jobs,
                        )  # fmt: skip
                        r.round = rnd + 1
                        results.append(r)
                        done += 1
                        status = (
                            f"ERROR {r.error.splitlines()[0]}"
                            if r.error
                            else f"tps={r.tps:9.1f} lat={r.latency_ms:.3f}ms"
                        )
                        progress(
                            f"bench: [{done}/{total}] round {rnd + 1} {mode:8s} {name:9s} {status}"
                        )
            for r in results:
                if r.error:
                    progress(f"bench: failed run {r.target}/{r.mode}: {r.error}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    figures, summary = summarise(results, args.targets, args.modes)
    if "pgwarden" in skipped or "pgwarden" not in args.targets:
        progress("bench: pgwarden was not measured, so ratio_vs_pgbouncer is nan")
    payload = {
        "benchmark": "bench_proxy",
        "workload": "pgbench -S (select-only)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": harness.environment(),
        "elapsed_seconds": time.monotonic() - started,
        "skipped": skipped,
        "summary": summary,
        "figures": {k: (None if math.isnan(v) else v) for k, v in figures.items()},
        "runs": [asdict(r) for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    chart = args.output.with_suffix(".html")
    harness.write_chart(
        chart, "pgbench -S: median transactions per second",
        {mode: {t: figures.get(f"tps_{t}_{mode}", math.nan) for t in args.targets}
         for mode in args.modes},
        "tps",
    )  # fmt: skip
    progress(f"bench: results written to {args.output} and {chart}")

    print_table(summary, args.targets, args.modes)
    for line in harness.figure_lines(figures):
        print(line)
    print(last_line(figures))
    return 0


def print_table(summary: dict[str, Any], targets: Sequence[str], modes: Sequence[str]) -> None:
    """A readable table of median tps and latency (stdout, above the figure lines)."""
    print(f"{'target':10s} " + " ".join(f"{m + ' tps':>14s} {'lat ms':>8s}" for m in modes))
    for target in targets:
        if target not in summary:
            continue
        cells = []
        for m in modes:
            s = summary[target][m]
            cells.append(
                f"{harness.fmt(s['median_tps']):>14s} {harness.fmt(s['mean_latency_ms']):>8s}"
            )
        print(f"{target:10s} " + " ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
