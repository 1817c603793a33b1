"""Counters the hot path can bump for the price of an integer add.

prometheus-client's own Counter and Histogram take a lock on every update; at tens of
thousands of statements a second that is measurable.  Sessions instead add to plain
attributes of one ``Stats`` object (one event loop, one thread), and a custom collector
turns them into Prometheus metric families only when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Stats:
    """Process-wide counters. Single-threaded by design: the event loop owns them."""

    __slots__ = (
        "auth_failures",
        "bytes_from_client",
        "bytes_from_server",
        "cancels_dropped",
        "cancels_forwarded",
        "connections_active",
        "connections_total",
        "latency_buckets",
        "latency_count",
        "latency_sum",
        "policy_alerts",
        "policy_blocks",
        "protocol_errors",
        "refused_connections",
        "results_cut",
        "statements",
    )

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_active = 0
        self.refused_connections = 0
        self.auth_failures = 0
        self.statements = 0
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.protocol_errors = 0
        self.cancels_forwarded = 0
        self.cancels_dropped = 0
        self.policy_blocks = 0
        self.policy_alerts = 0
        self.results_cut = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe_latency(self, seconds: float) -> None:
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1


class StatsCollector(Collector):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        counters = [
            ("pgwarden_connections", "Client connections accepted", s.connections_total),
            ("pgwarden_connections_refused", "Connections refused before reaching PostgreSQL",
             s.refused_connections),
            ("pgwarden_auth_failures", "Authentications PostgreSQL rejected", s.auth_failures),
            ("pgwarden_statements", "Statements sent (Query and Execute messages)", s.statements),
            ("pgwarden_client_bytes", "Bytes received from clients", s.bytes_from_client),
            ("pgwarden_server_bytes", "Bytes received from PostgreSQL", s.bytes_from_server),
            ("pgwarden_protocol_errors", "Sessions ended for protocol violations",
             s.protocol_errors),
            ("pgwarden_cancels_forwarded", "Cancel requests passed to PostgreSQL",
             s.cancels_forwarded),
            ("pgwarden_cancels_dropped", "Cancel requests with unknown or forged keys",
             s.cancels_dropped),
            ("pgwarden_policy_blocks", "Statements refused or cut off by policy", s.policy_blocks),
            ("pgwarden_policy_alerts", "Rules that fired without blocking (alert or monitor)",
             s.policy_alerts),
            ("pgwarden_results_cut", "Results cut off at a row or byte limit", s.results_cut),
        ]  # fmt: skip
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "pgwarden_connections_active", "Client connections open now", value=s.connections_active
        )
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), s.latency_buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "pgwarden_statement_latency_seconds",
            "Time from a client's Query or Sync to PostgreSQL's ReadyForQuery",
            buckets=buckets,
            sum_value=s.latency_sum,
        )
