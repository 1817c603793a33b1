"""Support load test: a support agent's workload and bulk streaming, direct vs pgwarden.

1. Starts a throwaway PostgreSQL and fills the ``support`` database with the generator
   (``loadtests/supportdb.py``, 20,000 customers by default), a ``bench`` database with
   ``pgbench -i``, and a 1,000,000-row table ``loadtest.bulk_rows`` (no labelled columns, so
   a policy does not stop the streaming measurement itself).
2. Starts the targets (direct, pgwarden with ``--policy FILE`` or ``--enforce`` when given,
   and the bare forwarder for reference) and runs, interleaved over several rounds, in
   simple and extended protocol with per-transaction latency percentiles:

   * ``support``: ``loadtests/support_workload.sql`` as ``postgres``, which
     ``config/policy.yaml`` treats as the DBA (analysed and audited, never limited);
   * ``agents``: ``loadtests/support_agent_workload.sql`` as the helpdesk's shared account
     ``support_app``, each statement naming a randomly chosen agent in a sqlcommenter
     comment, so the policy judges every agent (``loadtests/agents.py``); refusals are
     counted from pgwarden's ``/metrics`` and pgbench's aborted clients;
   * ``select_only``: ``pgbench -S``.

   ``--audit-sync FULL,NORMAL`` gives pgwarden an SQLite audit trail and runs one pgwarden
   per setting side by side: ``pgwarden`` with the first, ``pgwarden_normal`` with
   the others, so the price of fsync at every group commit is measured in one run.
3. Bulk streaming of the 1M-row table through each target, as a privileged role:
   ``SELECT`` over the simple protocol with the client discarding rows (asyncpg
   ``execute``: this isolates the path through the proxy), the same ``SELECT`` with psql
   writing every row to /dev/null (what an insider would type), and ``COPY ... TO STDOUT``
   twice: by psql into /dev/null (``copy``: a C client, so the path through the target
   shows) and by asyncpg ``copy_from_query`` into a byte counter (``copy_asyncpg``: here
   the Python client is often the bottleneck, and a proxy that coalesces small writes can
   even make it faster than direct).  Reported in rows/s.

stdout ends with ``name=value`` figure lines; the last line is
``support_ratio=<n> bulk_select_ratio=<n> bulk_copy_ratio=<n>`` (pgwarden / direct; the
support ratio is the lower of simple and extended protocol, for the ``support`` workload and
the ``pgwarden`` target -- with ``--audit-sync`` the first setting given).  Figures that
could not be measured are ``nan``.  Progress goes to stderr; results to
``loadtests/results/support_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from loadtests import agents, harness
from loadtests.harness import PgbenchResult, Target, TargetUnavailable, progress
from proxy.sandbox.cluster import Cluster, running_cluster
from proxy.sandbox.supportdb import generate

SCRIPT = Path(__file__).resolve().parent / "support_workload.sql"
# passthrough: pgwarden with no policy and no audit trail (what the relay alone costs).
ALL_TARGETS = ("direct", "pgwarden", "bare", "pgbouncer", "passthrough")
NOVALUES = "pgwarden_novalues"  # --compare-values: pgwarden's setup, value matching off
ALL_WORKLOADS = ("support", "agents", "select_only")
BULK_OPS = ("select", "select_psql", "copy", "copy_asyncpg")
SYNC_SETTINGS = ("FULL", "NORMAL")


@dataclass
class BulkResult:
    """One bulk-streaming measurement."""

    target: str
    op: str
    rows: int
    bytes: int
    seconds: float
    rows_per_s: float
    error: str | None = None
    round: int = 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (``make loadtest`` adds ``--enforce --audit-sync FULL,NORMAL``)."""
    p = argparse.ArgumentParser(
        prog="python -m loadtests.support_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--duration", type=int, default=8, help="seconds per pgbench run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s for the -S runs")
    p.add_argument("--bulk-rows", type=int, default=1_000_000)
    # One 1M-row stream takes well under a second; several in a row make a measurement
    # long enough that a scheduling hiccup does not decide it.
    p.add_argument("--bulk-repeat", type=int, default=3, help="streams per bulk measurement")
    p.add_argument("--targets", default="direct,pgwarden,bare", help="comma-separated")
    p.add_argument("--modes", default="simple,extended", help="comma-separated -M modes")
    p.add_argument(
        "--workloads", default=",".join(ALL_WORKLOADS), help="comma-separated pgbench workloads"
    )
    p.add_argument("--policy", type=Path, help="policy file passed to 'pgwarden serve --policy'")
    p.add_argument(
        "--enforce", action="store_true",
        help="pgwarden enforces config/policy.yaml with need-to-know enabled (loadtests/agents.py)",
    )  # fmt: skip
    p.add_argument(
        "--audit-sync", default="",
        help="SQLite audit trail for pgwarden: FULL, NORMAL, or FULL,NORMAL for one pgwarden "
        "each (pgwarden, pgwarden_normal)",
    )  # fmt: skip
    p.add_argument(
        "--agent-queue", type=int, default=20,
        help="open tickets each agent works on in the agents workload",
    )  # fmt: skip
    p.add_argument(
        "--compare-values", action="store_true",
        help="beside pgwarden, the same pgwarden with value matching off (pgwarden_novalues): "
        "what scanning every result for labelled values costs, run by run",
    )  # fmt: skip
    p.add_argument("--pgwarden-args", default="", help="more arguments for 'pgwarden serve'")
    p.add_argument("--skip-bulk", action="store_true")
    p.add_argument("--skip-pgbench", action="store_true")
    p.add_argument("--output", type=Path, default=harness.RESULTS_DIR / "support_load.json")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.audit_sync = [v.strip().upper() for v in args.audit_sync.split(",") if v.strip()]
    if set(args.targets) - set(ALL_TARGETS):
        p.error(f"targets are among {', '.join(ALL_TARGETS)}")
    if set(args.workloads) - set(ALL_WORKLOADS):
        p.error(f"workloads are among {', '.join(ALL_WORKLOADS)}")
    if set(args.audit_sync) - set(SYNC_SETTINGS) or len(set(args.audit_sync)) != len(
        args.audit_sync
    ):
        p.error("--audit-sync takes FULL, NORMAL or both, each once")
    if args.enforce and args.policy is not None:
        p.error("--enforce and --policy both choose the policy: give one")
    if args.agent_queue < 1:
        p.error("--agent-queue is at least 1")
    # One pgwarden per audit setting; the first keeps the name the headline figures use.
    if args.audit_sync and "pgwarden" in args.targets:
        at = args.targets.index("pgwarden") + 1
        extra = [f"pgwarden_{v.lower()}" for v in args.audit_sync[1:]]
        args.targets[at:at] = extra
    if args.compare_values:
        if "pgwarden" not in args.targets or not (args.enforce or args.policy is not None):
            p.error(
                "--compare-values needs the pgwarden target and a policy (--enforce or --policy)"
            )
        args.targets.insert(args.targets.index("pgwarden") + 1, NOVALUES)
    if set(args.modes) - {"simple", "extended", "prepared"}:
        p.error("modes are among simple, extended, prepared")
    if args.policy is not None and not args.policy.is_file():
        p.error(f"policy file {args.policy} does not exist")
    if not (1 <= args.duration <= 600 and 1 <= args.rounds <= 20 and 1 <= args.clients <= 100):
        p.error("--duration 1..600, --rounds 1..20, --clients 1..100")
    if not (1 <= args.bulk_rows <= 20_000_000 and 1 <= args.bulk_repeat <= 20):
        p.error("--bulk-rows 1..20000000, --bulk-repeat 1..20")
    return args


def create_bulk_table(cluster: Cluster, rows: int) -> float:
    """``loadtest.bulk_rows``: ``rows`` rows of mixed types (~100 bytes each); seconds taken."""
    t0 = time.monotonic()
    cluster.psql(
        f"""
        CREATE SCHEMA IF NOT EXISTS loadtest;
        DROP TABLE IF EXISTS loadtest.bulk_rows;
        CREATE TABLE loadtest.bulk_rows AS
            SELECT g AS id,
                   md5(g::text) AS token,
                   timestamptz '2025-01-01' + g * interval '1 second' AS at,
                   round((g % 100000) / 7.0, 2) AS amount,
                   'event ' || (g % 97) || ' on node ' || (g % 13) AS note
              FROM generate_series(1, {rows}) AS g;
        VACUUM ANALYZE loadtest.bulk_rows;
        GRANT USAGE ON SCHEMA loadtest TO trust_user, md5_user, scram_user;
        GRANT SELECT ON loadtest.bulk_rows TO trust_user, md5_user, scram_user;
        SELECT count(*) FROM loadtest.bulk_rows;
        """
    )
    return time.monotonic() - t0


BULK_QUERY = "SELECT * FROM loadtest.bulk_rows"


async def _bulk_asyncpg(target: Target, op: str, user: str) -> tuple[int, int, float]:
    conn = await asyncpg.connect(
        host=target.host, port=target.port, user=user, database="support", ssl=False
    )
    try:
        # Only the statement is timed: connection set-up is the same small cost everywhere.
        t0 = time.monotonic()
        if op == "select":
            # Simple-protocol query: asyncpg reads every DataRow and drops it, so the time
            # is the server's scan plus the path through the target, not client decoding.
            status = await conn.execute(BULK_QUERY)
            return int(status.split()[-1]), 0, time.monotonic() - t0
        size = 0

        async def sink(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)

        status = await conn.copy_from_query(BULK_QUERY, output=sink)
        return int(status.split()[-1]), size, time.monotonic() - t0
    finally:
        await conn.close()


def _bulk_psql(target: Target, op: str, user: str, expected_rows: int) -> tuple[int, int, float]:
    # What an insider types: psql fetches every row, formats it and writes it out, or
    # passes COPY data straight through.  The time includes psql's start and connection
    # (a few ms of a stream that takes most of a second).
    sql = f"COPY ({BULK_QUERY}) TO STDOUT" if op == "copy" else BULK_QUERY
    t0 = time.monotonic()
    proc = subprocess.run(
        [harness.psql_binary(), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", target.host,
         "-p", str(target.port), "-U", user, "-d", "support", "-c", sql],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **harness.CLIENT_ENV}, timeout=600, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip())
    return expected_rows, 0, elapsed


def run_bulk(
    target: Target, op: str, rows: int, repeat: int = 1, user: str = "postgres"
) -> BulkResult:
    """Stream the ``rows``-row bulk table ``repeat`` times through ``target`` with ``op``."""
    total_rows = total_bytes = 0
    total_s = 0.0
    try:
        for _ in range(repeat):
            if op in ("select_psql", "copy"):
                got, size, elapsed = _bulk_psql(target, op, user, rows)
            else:
                got, size, elapsed = asyncio.run(
                    asyncio.wait_for(_bulk_asyncpg(target, op, user), 600)
                )
            if got != rows:
                raise RuntimeError(f"expected {rows} rows, got {got}")
            total_rows += got
            total_bytes += size
            total_s += elapsed
        return BulkResult(target.name, op, total_rows, total_bytes, total_s, total_rows / total_s)
    except Exception as exc:  # one failed stream must not lose the others' figures
        return BulkResult(target.name, op, 0, 0, 0.0, 0.0, error=repr(exc))


def pgwarden_setups(args: argparse.Namespace, workdir: Path) -> dict[str, list[str]]:
    """'pgwarden serve' arguments of each pgwarden target, by target name."""
    common = harness.split_args(args.pgwarden_args)
    if args.enforce:
        policy = agents.agent_policy(workdir / "policy.yaml")
        common = ["--policy", str(policy), "--catalog-user", "postgres", *common]
    elif args.policy is not None:
        common = ["--policy", str(args.policy.resolve()), *common]
    names = [t for t in args.targets if t.startswith("pgwarden") and t != NOVALUES]
    setups = {}
    for i, name in enumerate(names):
        setups[name] = common
        if i < len(args.audit_sync):
            config = agents.sqlite_audit_config(
                workdir / f"{name}.yaml", workdir / f"{name}-audit.db", args.audit_sync[i]
            )
            setups[name] = ["-c", str(config), *common]
    if NOVALUES in args.targets:
        # pgwarden's own arguments, its policy with value matching off, its own trail.
        own = list(setups["pgwarden"])
        at = own.index("--policy") + 1
        policy = yaml.safe_load(Path(own[at]).read_text())
        policy["value_matching"] = {"enabled": False}
        novalues = workdir / "policy-novalues.yaml"
        novalues.write_text(yaml.safe_dump(policy, sort_keys=False))
        own[at] = str(novalues)
        if "-c" in own:
            sync = args.audit_sync[0]
            own[own.index("-c") + 1] = str(agents.sqlite_audit_config(
                workdir / f"{NOVALUES}.yaml", workdir / f"{NOVALUES}-audit.db", sync
            ))  # fmt: skip
        setups[NOVALUES] = own
    return setups


def describe_setup(args: argparse.Namespace, name: str) -> str:
    """What a pgwarden target enforces and how it audits, in one line for the log and JSON."""
    if args.enforce:
        policy = "config/policy.yaml + need-to-know (loadtests/agents.py)"
    elif args.policy is not None:
        policy = str(args.policy)
    else:
        policy = "none (pass-through)"
    names = [t for t in args.targets if t.startswith("pgwarden")]
    if name == NOVALUES:
        return describe_setup(args, "pgwarden") + "; value matching off"
    names = [n for n in names if n != NOVALUES]
    if args.audit_sync:
        audit = f"SQLite, synchronous={args.audit_sync[names.index(name)]}"
    else:
        audit = "none" if "audit" not in args.pgwarden_args else "from --pgwarden-args"
    return f"policy: {policy}; audit trail: {audit}"


def start_targets(
    stack: contextlib.ExitStack, cluster: Cluster, workdir: Path, args: argparse.Namespace
) -> tuple[dict[str, Target], dict[str, str]]:
    """Start the requested targets; returns the running ones and why others were skipped."""
    running: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    setups = pgwarden_setups(args, workdir)
    for name in args.targets:
        try:
            if name == "direct":
                target = stack.enter_context(harness.direct_target(cluster))
            elif name in setups:
                target = stack.enter_context(
                    harness.pgwarden_target(cluster, workdir / name, setups[name], name=name)
                )
                progress(f"support_load: {name}: {describe_setup(args, name)}")
            elif name == "pgbouncer":
                target = stack.enter_context(harness.pgbouncer_target(cluster, workdir))
            elif name == "passthrough":
                target = stack.enter_context(
                    harness.pgwarden_target(
                        cluster, workdir / name, harness.split_args(args.pgwarden_args), name=name
                    )
                )
            else:
                target = stack.enter_context(harness.bare_target(cluster, workdir / "bare"))
            harness.check_target(target, "support")
            running[name] = target
            progress(f"support_load: target {name} on {target.host}:{target.port}")
        except TargetUnavailable as exc:
            skipped[name] = str(exc)
            progress(f"support_load: SKIPPING {name}: {exc}")
    return running, skipped


def _mean(values: Sequence[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if good else math.nan


def summarise(
    pgbench: Sequence[PgbenchResult],
    bulk: Sequence[BulkResult],
    targets: Sequence[str],
    modes: Sequence[str],
) -> tuple[dict[str, float], dict[str, Any]]:
    """Figures for the figure lines and a nested summary for the JSON."""
    figures: dict[str, float] = {}
    summary: dict[str, Any] = {}
    for workload in ALL_WORKLOADS:
        for mode in modes:
            for target in targets:
                counted = [
                    r
                    for r in pgbench
                    if (r.workload, r.mode, r.target) == (workload, mode, target)
                    and r.refusals is not None
                ]
                if counted:
                    # Over every run, complete or not: a refusal aborts a pgbench client.
                    key = f"{workload}_{target}_{mode}"
                    figures[f"refused_{key}"] = float(sum(r.refusals or 0 for r in counted))
                    figures[f"aborted_clients_{key}"] = float(
                        sum(r.aborted_clients for r in counted)
                    )
                runs = [
                    r
                    for r in pgbench
                    if (r.workload, r.mode, r.target) == (workload, mode, target) and not r.error
                ]
                if not runs:
                    continue
                entry = {
                    "median_tps": harness.median([r.tps for r in runs]),
                    "mean_latency_ms": _mean([r.latency_ms for r in runs]),
                    # Percentiles of each run, then their median across rounds.
                    **{
                        f"{q}_ms": harness.median([r.percentiles_ms.get(q, math.nan) for r in runs])
                        for q in ("p50", "p95", "p99")
                    },
                    "runs": len(runs),
                }
                summary.setdefault(workload, {}).setdefault(target, {})[mode] = entry
                key = f"{workload}_{target}_{mode}"
                figures[f"tps_{key}"] = entry["median_tps"]
                figures[f"latency_ms_{key}"] = entry["mean_latency_ms"]
                for q in ("p50", "p95", "p99"):
                    figures[f"{q}_ms_{key}"] = entry[f"{q}_ms"]
                cpu = [r.proxy_cpu_us_per_tx for r in runs if r.proxy_cpu_us_per_tx is not None]
                if cpu:
                    entry["proxy_cpu_us_per_tx"] = harness.median(cpu)
                    figures[f"proxy_cpu_us_per_tx_{key}"] = entry["proxy_cpu_us_per_tx"]
    for op in BULK_OPS:
        for target in targets:
            streams = [b for b in bulk if (b.op, b.target) == (op, target) and not b.error]
            if not streams:
                continue
            rate = harness.median([b.rows_per_s for b in streams])
            summary.setdefault("bulk", {}).setdefault(target, {})[op] = {
                "median_rows_per_s": rate,
                "median_seconds": harness.median([b.seconds for b in streams]),
                "rows": streams[0].rows,
                "bytes": streams[0].bytes,
                "runs": len(streams),
            }
            figures[f"bulk_{op}_rows_per_s_{target}"] = rate

    def fig(name: str) -> float:
        return figures.get(name, math.nan)

    others = [t for t in targets if t != "direct"]
    for other in others:
        for workload in ALL_WORKLOADS:
            for mode in modes:
                figures[f"ratio_{workload}_{other}_vs_direct_{mode}"] = harness.ratio(
                    fig(f"tps_{workload}_{other}_{mode}"), fig(f"tps_{workload}_direct_{mode}")
                )
        for op in BULK_OPS:
            figures[f"ratio_bulk_{op}_{other}_vs_direct"] = harness.ratio(
                fig(f"bulk_{op}_rows_per_s_{other}"), fig(f"bulk_{op}_rows_per_s_direct")
            )
    pairs = [(o, "direct") for o in others]
    # The audit settings side by side: pgwarden_normal / pgwarden, run by run.
    pairs += [(o, "pgwarden") for o in others if o.startswith("pgwarden_") and o != NOVALUES]
    # What value matching costs: pgwarden / pgwarden_novalues, run by run.
    pairs += [("pgwarden", NOVALUES)] if NOVALUES in others else []
    # What enforcement and the audit trail cost over pgwarden's relay alone.
    pairs += [
        (o, "passthrough") for o in others if o.startswith("pgwarden") and "passthrough" in others
    ]
    summary["paired_ratios"] = harness.paired_ratios(
        [(r.target, f"{r.workload}_{r.mode}", r.round, r.tps) for r in pgbench if not r.error]
        + [(b.target, f"bulk_{b.op}", b.round, b.rows_per_s) for b in bulk if not b.error],
        pairs,
    )
    figures = {k: v for k, v in figures.items() if not math.isnan(v)}

    def lower(name: str) -> float:
        both = [fig(f"{name}_{m}") for m in ("simple", "extended")]
        return min(both) if not any(math.isnan(v) for v in both) else math.nan

    for variant in [o for o in others if o.startswith("pgwarden")]:
        suffix = variant.removeprefix("pgwarden")
        for workload in ("support", "agents"):
            value = lower(f"ratio_{workload}_{variant}_vs_direct")
            if not math.isnan(value):
                figures[f"{workload}_ratio{suffix}"] = value
        longer = [o for o in others if o != variant and o.startswith(variant)]
        refused = [
            v
            for k, v in figures.items()
            if k.startswith(f"refused_agents_{variant}_")
            # pgwarden's count is not pgwarden_novalues' as well
            and not any(k.startswith(f"refused_agents_{o}_") for o in longer)
        ]
        if refused:
            figures[f"agent_refusals{suffix}"] = sum(refused)
    for workload in ("support", "agents"):
        on, off = figures.get(f"{workload}_ratio"), figures.get(f"{workload}_ratio_novalues")
        if on is not None and off is not None:
            figures[f"{workload}_values_vs_off"] = harness.ratio(on, off)
    figures["support_ratio"] = lower("ratio_support_pgwarden_vs_direct")
    figures["bulk_select_ratio"] = fig("ratio_bulk_select_pgwarden_vs_direct")
    figures["bulk_copy_ratio"] = fig("ratio_bulk_copy_pgwarden_vs_direct")
    return figures, summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the support load test; print figure lines; write the JSON results."""
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-load-"))
    started = time.monotonic()
    pgbench_results: list[PgbenchResult] = []
    bulk_results: list[BulkResult] = []
    skipped: dict[str, str] = {}
    setup: dict[str, Any] = {}
    try:
        with running_cluster(tls=False, schema=True) as cluster, contextlib.ExitStack() as stack:
            progress(f"support_load: PostgreSQL on port {cluster.port}")
            report = asyncio.run(generate(cluster.url(), args.customers, args.seed))
            setup["generation"] = report.to_dict()
            progress(
                f"support_load: generated {report.counts['customers']} customers, "
                f"{report.counts['tickets']} tickets in {report.seconds:.1f}s"
            )
            if not args.skip_pgbench and "select_only" in args.workloads:
                setup["pgbench_init_seconds"] = harness.pgbench_init(cluster, "bench", args.scale)
                progress(f"support_load: pgbench -i -s {args.scale} done")
            if not args.skip_bulk:
                setup["bulk_table_seconds"] = create_bulk_table(cluster, args.bulk_rows)
                progress(f"support_load: loadtest.bulk_rows has {args.bulk_rows} rows")
            running, skipped = start_targets(stack, cluster, workdir, args)
            if not running:
                progress("support_load: no target could be started")
                return 2
            names = list(running)
            setup["pgwarden"] = {
                n: describe_setup(args, n) for n in names if n.startswith("pgwarden")
            }
            defines = [
                "-D", f"ntickets={report.counts['tickets']}",
                "-D", f"nagents={report.counts['agents']}",
            ]  # fmt: skip
            # (workload, database, pgbench arguments, role)
            workloads: list[tuple[str, str, list[str], str]] = []
            if not args.skip_pgbench:
                if "support" in args.workloads:
                    workloads.append(
                        ("support", "support", ["-f", str(SCRIPT), *defines], "postgres")
                    )
                if "agents" in args.workloads:
                    scripts = agents.agent_scripts(
                        workdir / "agents", report.counts["agents"], args.agent_queue
                    )
                    setup["agents"] = {
                        "agents": min(report.counts["agents"], agents.MAX_AGENT_SCRIPTS),
                        "queue": args.agent_queue,
                    }
                    workloads.append(("agents", "support", scripts, agents.AGENT_USER))
                if "select_only" in args.workloads:
                    workloads.append(("select_only", "bench", ["-S"], "postgres"))
            total = args.rounds * len(workloads) * len(args.modes) * len(names)
            done = 0
            for rnd in range(args.rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for workload, database, wl_args, user in workloads:
                    for mode in args.modes:
                        for name in order:
                            before = harness.pgwarden_refusals(running[name])
                            r = harness.run_pgbench(
                                running[name], database, mode=mode, workload=workload,
                                args=wl_args, duration=args.duration, clients=args.clients,
                                jobs=args.jobs, user=user, percentiles=True,
                            )  # fmt: skip
                            after = harness.pgwarden_refusals(running[name])
                            if before is not None and after is not None:
                                r.refusals = after - before
                            r.round = rnd + 1
                            pgbench_results.append(r)
                            done += 1
                            status = (
                                f"ERROR {r.error.splitlines()[0]}"
                                if r.error
                                else f"tps={r.tps:9.1f} p50={r.percentiles_ms.get('p50', 0):.3f}ms"
                                f" p99={r.percentiles_ms.get('p99', 0):.3f}ms"
                            )
                            if r.refusals or r.aborted_clients:
                                status += (
                                    f" refused={r.refusals} aborted_clients={r.aborted_clients}"
                                )
                            progress(
                                f"support_load: [{done}/{total}] round {rnd + 1} {workload:11s} "
                                f"{mode:8s} {name:9s} {status}"
                            )
                if not args.skip_bulk:
                    for op in BULK_OPS:
                        for name in order:
                            b = run_bulk(running[name], op, args.bulk_rows, args.bulk_repeat)
                            b.round = rnd + 1
                            bulk_results.append(b)
                            status = (
                                f"ERROR {b.error}"
                                if b.error
                                else f"{b.rows} rows in {b.seconds:.2f}s "
                                f"= {b.rows_per_s:,.0f} rows/s"
                            )
                            progress(
                                f"support_load: round {rnd + 1} bulk {op:11s} {name:9s} {status}"
                            )
            for r in pgbench_results:
                if r.error:
                    progress(
                        f"support_load: failed run {r.workload}/{r.target}/{r.mode}: {r.error}"
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    figures, summary = summarise(pgbench_results, bulk_results, args.targets, args.modes)
    if "pgwarden" not in running_names(pgbench_results, bulk_results):
        progress("support_load: pgwarden was not measured, so its ratios are nan")
    payload = {
        "benchmark": "support_load",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": harness.environment(),
        "elapsed_seconds": time.monotonic() - started,
        "setup": setup,
        "skipped": skipped,
        "summary": summary,
        "figures": {k: (None if math.isnan(v) else v) for k, v in figures.items()},
        "pgbench_runs": [asdict(r) for r in pgbench_results],
        "bulk_runs": [asdict(b) for b in bulk_results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    progress(f"support_load: results written to {args.output}")
    for line in harness.figure_lines(figures):
        print(line)
    print(
        " ".join(
            f"{n}={harness.fmt(figures[n])}"
            for n in ("support_ratio", "bulk_select_ratio", "bulk_copy_ratio")
        )
    )
    return 0


def running_names(pgbench: Sequence[PgbenchResult], bulk: Sequence[BulkResult]) -> set[str]:
    """Targets with at least one successful measurement."""
    return {r.target for r in pgbench if not r.error} | {b.target for b in bulk if not b.error}


if __name__ == "__main__":
    sys.exit(main())
