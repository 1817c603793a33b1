"""Benchmark of statement analysis over the hand-written corpus.

Run: ``python -m loadtests.bench_analysis`` (``make bench-analysis``). Measures the median
time of a cached ``Analyzer.analyze`` (the common case: applications repeat their statements)
and of an uncached one (cache cleared before each call), over every corpus statement.
Also the allow-list shape check (``policy.allowlist.AllowList.allows``: is this statement's
shape on the list?) over the same statements, half of them listed.
The last line is ``cached_us=<n> uncached_us=<n> shape_check_us=<n>``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import yaml

from policy.allowlist import AllowList
from policy.analyze import Analyzer
from policy.schema_sql import snapshot_from_sql
from policy.search_path import parse_search_path
from proxy.sandbox.cluster import schema_sql

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"


def load_corpus() -> list[tuple[str, tuple[str, ...]]]:
    cases = yaml.safe_load((CORPUS / "statements.yaml").read_text())
    return [(c["sql"], parse_search_path(c.get("path", "public"))) for c in cases]


def per_statement_median(
    analyzer: Analyzer, sql: str, path: tuple[str, ...], cached: bool, n: int
) -> float:
    times = []
    if cached:
        analyzer.analyze(sql, path)
    for _ in range(n):
        if not cached:
            analyzer.cache_clear()
        t0 = time.perf_counter_ns()
        analyzer.analyze(sql, path)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000.0


def main() -> None:
    snapshot = snapshot_from_sql(schema_sql() + "\n" + (CORPUS / "extra_schema.sql").read_text())
    analyzer = Analyzer(snapshot, cache_size=10000)
    corpus = load_corpus()
    # Warm up view expansions and label memos: they live as long as the snapshot does.
    for sql, path in corpus:
        analyzer.analyze(sql, path)
    uncached = [per_statement_median(analyzer, s, p, False, 30) for s, p in corpus]
    cached = [per_statement_median(analyzer, s, p, True, 200) for s, p in corpus]
    worst = sorted(zip(uncached, (s for s, _p in corpus), strict=True), reverse=True)[:5]
    print(f"statements: {len(corpus)}")
    print(
        f"uncached: median {statistics.median(uncached):.1f} us, p90 "
        f"{statistics.quantiles(uncached, n=10)[-1]:.1f} us, max {max(uncached):.1f} us"
    )
    print(f"cached:   median {statistics.median(cached):.2f} us, max {max(cached):.2f} us")
    print("slowest uncached:")
    for us, sql in worst:
        print(f"  {us:8.1f} us  {sql[:80]}")
    facts = [f for sql, path in corpus for f in analyzer.analyze(sql, path)]
    listed = AllowList("bench", frozenset(f.fingerprint for f in facts[::2]))
    rounds = 2000
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        for f in facts:
            listed.allows(f)
    shape_us = (time.perf_counter_ns() - t0) / 1000.0 / (rounds * len(facts))
    print(f"shape check: {shape_us:.3f} us a statement ({len(facts)} statements)")
    print(
        f"cached_us={statistics.median(cached):.2f} uncached_us={statistics.median(uncached):.1f} "
        f"shape_check_us={shape_us:.3f}"
    )


if __name__ == "__main__":
    main()
