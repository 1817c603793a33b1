"""The value index (value matching) for a big customer table: its size, build time and scan speed.

    python -m loadtests.bench_values [--customers 1000000]

Issue 13 asks that the index for 1,000,000 customers with three labelled columns fit in
<= 64 MB and build in <= 30 s.  This starts a throwaway PostgreSQL, fills a table with
``--customers`` rows (a unique name, e-mail address and phone number each, labelled by
column comments), and builds the index as pgwarden does (``proxy.valueload.build`` on one
connection, reading every protected table of the catalog).  Then it scans, in this
process:

* a JSON array of 20,000 customers (what ``json_agg`` sends): records found per second;
* 20,000 rows of unlabelled text (what most results are): microseconds per row.

Figures: ``build_seconds``, ``index_mb`` (the arrays the index keeps), ``peak_rss_mb``
(the process's highest resident size, the build's transient lists included),
``scan_records_per_s``, ``scan_unlabelled_us_per_row``; the last line is ``index_mb``.
The scan check also counts what it found: every one of the 20,000 customers must be named.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from loadtests import harness
from loadtests.harness import progress
from policy.catalog import load_catalog
from policy.labels import LabelRules
from proxy.sandbox.cluster import Cluster, running_cluster
from proxy.valueload import build

TABLE = "vi_customers"


def fill(cluster: Cluster, n: int) -> None:
    cluster.psql(
        f"""
        CREATE TABLE {TABLE} (customer_id bigint PRIMARY KEY, full_name text, email text,
                              phone text, tier text);
        COMMENT ON COLUMN {TABLE}.full_name IS 'pgwarden: pii.name';
        COMMENT ON COLUMN {TABLE}.email IS 'pgwarden: pii.email';
        COMMENT ON COLUMN {TABLE}.phone IS 'pgwarden: pii.phone';
        INSERT INTO {TABLE}
        SELECT g, 'Given' || (g % 9973) || ' Family' || (g / 9973),
               'person' || g || '@mail.example', '+44 20 ' || lpad(g::text, 8, '0'),
               'standard'
          FROM generate_series(1, {n}) AS g;
        VACUUM ANALYZE {TABLE};
        """
    )


async def measure(cluster: Cluster, n: int) -> dict[str, float]:
    conn = await asyncpg.connect(cluster.url())
    try:
        snapshot = (await load_catalog(conn)).with_rules(LabelRules())
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        index, _xmin, seconds = await build(conn, snapshot, max_entries=50_000_000)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sample = [
            dict(r) for r in await conn.fetch(
                f"SELECT * FROM {TABLE} WHERE customer_id % $1 = 0 LIMIT 20000",
                max(1, n // 20000),
            )
        ]  # fmt: skip
    finally:
        await conn.close()
    text = json.dumps(sample).encode()
    found: dict[str, set[bytes]] = {}
    t0 = time.perf_counter()
    index.scan(text, found)
    scan_s = time.perf_counter() - t0
    named = len(found.get(f"public.{TABLE}", ()))
    if named != len(sample):
        raise RuntimeError(f"the scan named {named} of {len(sample)} customers")
    rows = [f"ticket {i} about parcel {i * 7} late again 2026-12-07".encode() for i in range(20000)]
    t0 = time.perf_counter()
    for r in rows:
        index.scan_values((r,), {})
    plain_s = time.perf_counter() - t0
    return {
        "customers": n,
        "entries": index.stats.entries,
        "build_seconds": seconds,
        "peak_rss_mb": rss1 / 1024,
        "rss_before_build_mb": rss0 / 1024,
        "scan_records_per_s": named / scan_s,
        "scan_unlabelled_us_per_row": plain_s / len(rows) * 1e6,
        "index_mb": index.nbytes / 2**20,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_values")
    p.add_argument("--customers", type=int, default=1_000_000)
    args = p.parse_args(argv)
    with running_cluster(tls=False, schema=True) as cluster:
        progress(f"bench_values: filling {args.customers:,} customers")
        fill(cluster, args.customers)
        progress("bench_values: building the index")
        figures = asyncio.run(measure(cluster, args.customers))
    result: dict[str, Any] = {
        "benchmark": "bench_values",
        "environment": harness.environment(),
        "figures": figures,
    }
    out = harness.RESULTS_DIR / "bench_values.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for line in harness.figure_lines(figures):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
