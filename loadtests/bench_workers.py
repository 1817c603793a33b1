"""Workers benchmark: pgwarden with 1, 2, 4 worker processes sharing its port (SO_REUSEPORT).

Starts a throwaway PostgreSQL with a ``bench`` database (``pgbench -i``) and the generated
``support`` database, a throwaway Redis, and one pgwarden per worker count and setup:

* ``plain``: pass-through (the proxy's own work only);
* ``full``: what several workers need to stay exact -- ``config/policy.yaml`` with
  need-to-know (``loadtests/agents.py``), its window counters and quarantine in Redis,
  and the audit trail in PostgreSQL (one sink all workers share, one chain per worker, in a
  schema of the ``audit`` database of the same cluster).

Then, interleaved over rounds with the target order rotated each round, it runs as the
helpdesk account ``support_app``: ``pgbench -S`` (``select_only``) and the agents' support
workload (``agents``: each statement names a randomly chosen agent, so the full setup judges
each agent and reads their windows from Redis).  After the runs it reads, from every
worker's ``/metrics``, how many connections the kernel gave it, and counts the Redis keys
and audit chains, so the JSON shows that the workers shared the work, the windows and the
audit store.

stdout ends with ``name=value`` figure lines; the last line is
``workers_1_tps=… workers_2_tps=… [workers_4_tps=…] scaling_2_vs_1=… [scaling_4_vs_1=…]
scaling_2_vs_1_full=… …``: ``workers_N_tps`` is the median tps of ``select_only`` through
the plain setup with N workers (first mode), ``scaling_N_vs_1`` the median of the per-round
ratios N workers / 1 worker, ``_full`` and ``_agents_full`` the same for the full setup.
Progress goes to stderr; results to ``loadtests/results/bench_workers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtests import agents, harness
from loadtests.harness import PgbenchResult, Target, TargetUnavailable, progress
from loadtests.redis_server import RedisServer, RedisUnavailable
from proxy.sandbox.cluster import Cluster, running_cluster
from proxy.sandbox.supportdb import generate

ALL_SETUPS = ("plain", "full")
ALL_WORKLOADS = ("select_only", "agents")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (defaults suit ``make bench-workers``)."""
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench_workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (with 1)")
    p.add_argument("--setups", default="plain,full", help="comma-separated: plain, full")
    p.add_argument("--workloads", default="select_only,agents", help="comma-separated")
    p.add_argument("--modes", default="simple", help="comma-separated -M modes")
    p.add_argument("--duration", type=int, default=6, help="seconds per pgbench run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s")
    p.add_argument("--customers", type=int, default=20_000, help="generated support database")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--agent-queue", type=int, default=20, help="open tickets per agent")
    p.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded warm-up/target")
    p.add_argument("--output", type=Path, default=harness.RESULTS_DIR / "bench_workers.json")
    args = p.parse_args(argv)
    try:
        args.workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    except ValueError:
        p.error("--workers takes comma-separated numbers")
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.workers or args.workers[0] != 1 or args.workers[-1] > 16:
        p.error("--workers must include 1 (the baseline) and stay at most 16")
    if not args.setups or set(args.setups) - set(ALL_SETUPS):
        p.error(f"setups are among {', '.join(ALL_SETUPS)}")
    if not args.workloads or set(args.workloads) - set(ALL_WORKLOADS):
        p.error(f"workloads are among {', '.join(ALL_WORKLOADS)}")
    if not args.modes or set(args.modes) - {"simple", "extended", "prepared"}:
        p.error("modes are among simple, extended, prepared")
    if not (1 <= args.duration <= 600 and 1 <= args.rounds <= 20 and 1 <= args.clients <= 100):
        p.error("--duration 1..600, --rounds 1..20, --clients 1..100")
    return args


def target_name(setup: str, workers: int) -> str:
    return f"{setup}_w{workers}"


def redis_dbsize(redis: RedisServer) -> int:
    """Keys in the Redis database (the window counters and quarantine the workers share)."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as s:
        s.sendall(b"DBSIZE\r\n")
        reply = s.recv(64)
    return int(reply.strip().lstrip(b":"))


def audit_chains(cluster: Cluster, schema: str) -> dict[str, int]:
    """Events per audit chain in ``schema`` of the ``audit`` database."""
    out = cluster.psql(
        f"SELECT chain_id, count(*) FROM {schema}.events GROUP BY 1 ORDER BY 1", database="audit"
    )
    chains: dict[str, int] = {}
    for line in out.split():
        chain, n = line.split("|")
        chains[chain] = int(n)
    return chains


def start_targets(
    stack: contextlib.ExitStack,
    cluster: Cluster,
    redis: RedisServer | None,
    workdir: Path,
    args: argparse.Namespace,
) -> tuple[dict[str, Target], dict[str, str]]:
    """One pgwarden per setup and worker count; returns the running ones and why others
    were skipped."""
    running: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for setup in args.setups:
        for n in args.workers:
            name = target_name(setup, n)
            try:
                extra: list[str] = []
                if setup == "full":
                    if redis is None:
                        raise TargetUnavailable("no Redis for the shared window counters")
                    policy = agents.agent_policy(workdir / "policy.yaml", redis_url=redis.url)
                    dsn = (
                        f"postgresql://postgres@{cluster.host}:{cluster.port}/audit?sslmode=disable"
                    )
                    config = agents.postgres_audit_config(
                        workdir / f"{name}.yaml", dsn, n, schema=f"audit_{name}"
                    )
                    extra = [
                        "-c",
                        str(config),
                        "--policy",
                        str(policy),
                        "--catalog-user",
                        "postgres",
                    ]
                target = stack.enter_context(
                    harness.pgwarden_target(
                        cluster, workdir / name, extra, name=name, user=agents.AGENT_USER,
                        workers=n,
                    )
                )  # fmt: skip
                for database in ("bench", "support"):
                    harness.check_target(target, database)
                running[name] = target
                progress(f"bench_workers: {name} on {target.host}:{target.port} ({n} workers)")
            except TargetUnavailable as exc:
                skipped[name] = str(exc)
                progress(f"bench_workers: SKIPPING {name}: {exc}")
    return running, skipped


def summarise(
    results: Sequence[PgbenchResult], args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, Any]]:
    """Figures (ordered, for the figure lines) and a summary for the JSON."""
    figures: dict[str, float] = {}
    summary: dict[str, Any] = {}
    good = [r for r in results if not r.error]
    for workload in args.workloads:
        for setup in args.setups:
            for mode in args.modes:
                for n in args.workers:
                    name = target_name(setup, n)
                    runs = [
                        r for r in good if (r.workload, r.target, r.mode) == (workload, name, mode)
                    ]
                    key = f"{workload}_{name}_{mode}"
                    counted = [
                        r for r in results
                        if (r.workload, r.target, r.mode) == (workload, name, mode)
                        and r.refusals is not None
                    ]  # fmt: skip
                    if counted:
                        figures[f"refused_{key}"] = float(sum(r.refusals or 0 for r in counted))
                    if not runs:
                        continue
                    figures[f"tps_{key}"] = harness.median([r.tps for r in runs])
                    figures[f"latency_ms_{key}"] = harness.median([r.latency_ms for r in runs])
                    cpu = [r.proxy_cpu_us_per_tx for r in runs if r.proxy_cpu_us_per_tx]
                    if cpu:
                        figures[f"proxy_cpu_us_per_tx_{key}"] = harness.median(cpu)
                    summary.setdefault(workload, {}).setdefault(name, {})[mode] = {
                        "median_tps": figures[f"tps_{key}"],
                        "tps_each_run": [r.tps for r in runs],
                        "runs": len(runs),
                    }
    pairs = [
        (target_name(setup, n), target_name(setup, 1))
        for setup in args.setups
        for n in args.workers
        if n != 1
    ]
    paired = harness.paired_ratios(
        [(r.target, f"{r.workload}_{r.mode}", r.round, r.tps) for r in good], pairs
    )
    summary["paired_ratios"] = paired
    for workload in args.workloads:
        for setup in args.setups:
            for mode in args.modes:
                for n in args.workers[1:]:
                    entry = paired.get(
                        f"{target_name(setup, n)}_vs_{target_name(setup, 1)}_{workload}_{mode}"
                    )
                    figures[f"scaling_{workload}_{setup}_{n}_vs_1_{mode}"] = (
                        entry["median"] if entry else math.nan
                    )
    figures = {k: v for k, v in figures.items() if not math.isnan(v)}

    # The last line: pgbench -S through the plain setup, then the full setup and the agents.
    mode = args.modes[0]
    headline: dict[str, float] = {}
    for n in args.workers:
        headline[f"workers_{n}_tps"] = figures.get(f"tps_select_only_plain_w{n}_{mode}", math.nan)
    for n in args.workers[1:]:
        headline[f"scaling_{n}_vs_1"] = figures.get(
            f"scaling_select_only_plain_{n}_vs_1_{mode}", math.nan
        )
    for n in args.workers[1:]:
        headline[f"scaling_{n}_vs_1_full"] = figures.get(
            f"scaling_select_only_full_{n}_vs_1_{mode}", math.nan
        )
    for n in args.workers[1:]:
        headline[f"scaling_{n}_vs_1_agents_full"] = figures.get(
            f"scaling_agents_full_{n}_vs_1_{mode}", math.nan
        )
    summary["headline"] = headline
    return figures, summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print figure lines; write the JSON results."""
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-workers-"))
    results: list[PgbenchResult] = []
    skipped: dict[str, str] = {}
    shared: dict[str, Any] = {}
    started = time.monotonic()
    redis: RedisServer | None = None
    try:
        with running_cluster(tls=False, schema=True) as cluster, contextlib.ExitStack() as stack:
            progress(f"bench_workers: PostgreSQL on port {cluster.port}")
            harness.pgbench_init(cluster, "bench", args.scale)
            report = asyncio.run(generate(cluster.url(), args.customers, args.seed))
            cluster.psql("CREATE DATABASE audit;", database="postgres")
            progress(
                f"bench_workers: pgbench -i -s {args.scale}; {report.counts['customers']} "
                f"customers, {report.counts['agents']} agents"
            )
            if "full" in args.setups:
                try:
                    redis = RedisServer(workdir / "redis")
                    redis.start()
                    stack.callback(redis.stop)
                except (RedisUnavailable, RuntimeError) as exc:
                    progress(f"bench_workers: no Redis: {exc}")
                    redis = None
            running, skipped = start_targets(stack, cluster, redis, workdir, args)
            if not running:
                progress("bench_workers: no target could be started")
                return 2
            names = list(running)
            workloads: dict[str, tuple[str, list[str]]] = {
                "select_only": ("bench", ["-S"]),
                "agents": (
                    "support",
                    agents.agent_scripts(
                        workdir / "agents", report.counts["agents"], args.agent_queue
                    ),
                ),
            }
            for name in names:
                if args.warmup > 0:
                    for workload in args.workloads:
                        database, wl_args = workloads[workload]
                        harness.run_pgbench(
                            running[name], database, mode=args.modes[0], workload=workload,
                            args=wl_args, duration=args.warmup, clients=args.clients,
                            jobs=args.jobs,
                        )  # fmt: skip
            total = args.rounds * len(args.workloads) * len(args.modes) * len(names)
            done = 0
            for rnd in range(args.rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for workload in args.workloads:
                    database, wl_args = workloads[workload]
                    for mode in args.modes:
                        for name in order:
                            target = running[name]
                            before = harness.pgwarden_refusals(target)
                            r = harness.run_pgbench(
                                target, database, mode=mode, workload=workload, args=wl_args,
                                duration=args.duration, clients=args.clients, jobs=args.jobs,
                            )  # fmt: skip
                            after = harness.pgwarden_refusals(target)
                            if before is not None and after is not None:
                                r.refusals = after - before
                            r.round = rnd + 1
                            results.append(r)
                            done += 1
                            status = (
                                f"ERROR {r.error.splitlines()[0]}"
                                if r.error
                                else f"tps={r.tps:9.1f} lat={r.latency_ms:.3f}ms"
                            )
                            if r.refusals:
                                status += f" refused={r.refusals}"
                            progress(
                                f"bench_workers: [{done}/{total}] round {rnd + 1} {workload:11s} "
                                f"{mode:8s} {name:9s} {status}"
                            )
            # What the workers shared: connections per worker, Redis keys, audit chains.
            for name, target in running.items():
                counts = harness.pgwarden_metric(target, "pgwarden_connections_total")
                shared.setdefault("connections_per_worker", {})[name] = counts
                progress(f"bench_workers: {name} connections per worker: {counts}")
                if name.startswith("full"):
                    chains = audit_chains(cluster, f"audit_{name}")
                    shared.setdefault("audit_events_per_chain", {})[name] = chains
                    progress(f"bench_workers: {name} audit chains: {len(chains)}")
            if redis is not None:
                shared["redis_keys"] = redis_dbsize(redis)
                progress(f"bench_workers: Redis holds {shared['redis_keys']} keys")
            for r in results:
                if r.error:
                    progress(
                        f"bench_workers: failed run {r.workload}/{r.target}/{r.mode}: {r.error}"
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    figures, summary = summarise(results, args)
    payload = {
        "benchmark": "bench_workers",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": harness.environment(),
        "elapsed_seconds": time.monotonic() - started,
        "skipped": skipped,
        "shared": shared,
        "summary": summary,
        "figures": {k: (None if math.isnan(v) else v) for k, v in figures.items()},
        "runs": [asdict(r) for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    progress(f"bench_workers: results written to {args.output}")
    for line in harness.figure_lines(figures):
        print(line)
    print(" ".join(f"{k}={harness.fmt(v)}" for k, v in summary["headline"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
