"""The record ledger's cost on a big labelled result, through the real proxy.

    python -m loadtests.bench_ledger [--rows 100000] [--rounds 5]

Issue 5 asks that the ledger for a 100k-row result must not double the time to stream it.
This starts a throwaway PostgreSQL with the support schema and ``--rows`` customers, then
streams ``SELECT customer_id, full_name, email, phone FROM customers`` (labelled columns and
the primary key) as the DBA through three targets, in interleaved rounds:

* ``direct``: PostgreSQL itself, for scale;
* ``pgwarden``: pass-through, no audit trail;
* ``pgwarden-ledger``: the audit trail on (SQLite, synchronous=FULL) with a ledger key, so
  every row's primary key is captured, hashed (AES-CMAC) and written, and the CommandComplete is held
  until the statement's event and ledger are on disk.

The client is asyncpg in the simple protocol: it reads every row and drops it, so the time
is the scan plus the path through the target.  After the runs the benchmark checks that the
ledger really holds ``--rows`` keys per streamed statement (a ledger that recorded nothing
would make the figure meaningless).

The last line is ``ledger_ratio=<rows/s with ledger / rows/s pass-through>``: the goal is
>= 0.5 (the ledger must not double the time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from audit.ledger import generate_key_file
from loadtests import harness
from loadtests.harness import Target, TargetUnavailable, progress
from proxy.sandbox.cluster import Cluster, running_cluster

QUERY = "SELECT customer_id, full_name, email, phone FROM customers"
TARGETS = ("direct", "pgwarden", "pgwarden-ledger")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench_ledger",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    p.add_argument("--rows", type=int, default=100_000, help="customers to stream")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--output", type=Path, default=harness.RESULTS_DIR / "bench_ledger.json")
    args = p.parse_args(argv)
    if not (1 <= args.rows <= 5_000_000 and 1 <= args.rounds <= 20):
        p.error("--rows 1..5000000, --rounds 1..20")
    return args


def fill_customers(cluster: Cluster, rows: int) -> None:
    cluster.psql(
        f"""
        INSERT INTO customers (customer_id, full_name, email, phone, street, city, postcode, country)
        SELECT g, 'Customer ' || g, 'customer' || g || '@mail.example',
               '+4420' || lpad(g::text, 7, '0'), g || ' High Street', 'London', 'N1 ' || (g % 9) || 'AA', 'GB'
          FROM generate_series(1, {rows}) AS g;
        VACUUM ANALYZE customers;
        """
    )


async def _stream(target: Target) -> tuple[int, float]:
    conn = await asyncpg.connect(
        host=target.host, port=target.port, user="postgres", database="support", ssl=False
    )
    try:
        t0 = time.monotonic()
        status = await conn.execute(QUERY)
        return int(status.split()[-1]), time.monotonic() - t0
    finally:
        await conn.close()


def stream(target: Target, rows: int) -> float:
    """Seconds to stream the result once; raises if the row count is wrong."""
    got, elapsed = asyncio.run(asyncio.wait_for(_stream(target), 300))
    if got != rows:
        raise RuntimeError(f"{target.name}: expected {rows} rows, got {got}")
    return elapsed


def ledger_keys_per_statement(db: Path) -> list[int]:
    """For each statement event on customers, how many primary keys its ledger holds."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [
            int(n)
            for (n,) in conn.execute(
                "SELECT sum(l.n) FROM events e JOIN ledger l ON l.chain_id = e.chain_id"
                " AND l.seq = e.seq WHERE e.kind = 'statement' AND l.kind = 'k2'"
                " AND l.relation = 'public.customers' GROUP BY e.chain_id, e.seq"
            )
        ]
    finally:
        conn.close()


def start_targets(
    stack: contextlib.ExitStack, cluster: Cluster, workdir: Path
) -> tuple[dict[str, Target], dict[str, str], Path]:
    running: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    key = workdir / "ledger.key"
    generate_key_file(key)
    audit_db = workdir / "audit.db"
    config = workdir / "pgwarden-ledger.yaml"
    config.write_text(
        json.dumps(
            {
                "audit": {
                    "sinks": [{"type": "sqlite", "path": str(audit_db)}],
                    "ledger_key": str(key),
                }
            }
        )
    )
    for name in TARGETS:
        try:
            if name == "direct":
                target = stack.enter_context(harness.direct_target(cluster))
            elif name == "pgwarden":
                target = stack.enter_context(harness.pgwarden_target(cluster, workdir / name))
            else:
                target = stack.enter_context(
                    harness.pgwarden_target(cluster, workdir / name, ["-c", str(config)], name=name)
                )
            harness.check_target(target, "support")
            running[name] = target
            progress(f"bench_ledger: target {name} on {target.host}:{target.port}")
        except TargetUnavailable as exc:
            skipped[name] = str(exc)
            progress(f"bench_ledger: SKIPPING {name}: {exc}")
    return running, skipped, audit_db


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    samples: list[tuple[str, str, int, float]] = []
    errors: list[str] = []
    t_start = time.monotonic()
    with running_cluster(tls=False, schema=True) as cluster, contextlib.ExitStack() as stack:
        progress(f"bench_ledger: {args.rows} customers")
        fill_customers(cluster, args.rows)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgwarden-ledger-")))
        targets, skipped, audit_db = start_targets(stack, cluster, workdir)
        names = [t for t in TARGETS if t in targets]
        for name in names:  # warm-up: catalogs loaded, caches filled, pages in memory
            stream(targets[name], args.rows)
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                try:
                    elapsed = stream(targets[name], args.rows)
                except Exception as exc:  # one failed stream must not lose the others
                    errors.append(f"{name} round {rnd}: {exc!r}")
                    continue
                samples.append((name, "select", rnd, args.rows / elapsed))
                progress(f"bench_ledger: round {rnd + 1} {name}: {args.rows / elapsed:,.0f} rows/s")
        keys = ledger_keys_per_statement(audit_db) if "pgwarden-ledger" in targets else []
    rows_per_s = {
        name: harness.median([v for t, _, _, v in samples if t == name]) for name in TARGETS
    }
    # Every streamed statement (warm-up included) must have left its full ledger behind.
    ledger_complete = bool(keys) and all(n == args.rows for n in keys)
    if keys and not ledger_complete:
        errors.append(f"ledger incomplete: keys per statement {keys}")
    figures: dict[str, float] = {
        f"rows_per_s_{name.replace('-', '_')}": rows_per_s[name] for name in TARGETS
    }
    figures["ledger_vs_direct"] = harness.ratio(rows_per_s["pgwarden-ledger"], rows_per_s["direct"])
    figures["ledger_ratio"] = (
        harness.ratio(rows_per_s["pgwarden-ledger"], rows_per_s["pgwarden"])
        if ledger_complete
        else float("nan")
    )
    result: dict[str, Any] = {
        "benchmark": "bench_ledger",
        "query": QUERY,
        "rows": args.rows,
        "rounds": args.rounds,
        "environment": harness.environment(),
        "elapsed_seconds": time.monotonic() - t_start,
        "skipped": skipped,
        "errors": errors,
        "ledger_keys_per_statement": keys,
        "figures": figures,
        "paired_ratios": harness.paired_ratios(
            samples, [("pgwarden-ledger", "pgwarden"), ("pgwarden", "direct")]
        ),
        "samples": samples,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for line in errors:
        progress(f"bench_ledger: ERROR {line}")
    for line in harness.figure_lines(figures):
        print(line)  # ledger_ratio comes last
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
