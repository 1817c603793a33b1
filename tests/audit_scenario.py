"""A seeded audit trail shared by the audit tests: three people, known records, known hours.

bob      2026-11-02 09:xx  customers 1..100, then 50..150         -> 150 distinct
alice    2026-11-02 10:xx  customers 120..130, value carol@example.com
mallory  2026-11-02 11:xx  customers 1..5000, then a blocked COPY  -> 5000 distinct
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from audit.events import AuditEvent, Subject
from audit.ledger import generate_key_file
from audit.pipeline import AuditConfig, AuditTrail, SinkConfig, SQLiteSinkConfig

DAY = datetime(2026, 11, 2, tzinfo=UTC).timestamp()
BOB = Subject("support_app", "support", "helpdesk", "10.0.0.5", True, "bob")
ALICE = Subject("support_app", "support", "helpdesk", "10.0.0.6", True, "alice")
MALLORY = Subject("support_app", "support", "psql", "10.0.0.66", False, "mallory")
EXPECTED_DISTINCT = {"bob": 150, "alice": 11, "mallory": 5000}


def keys(a: int, b: int) -> list[str]:
    return [str(i) for i in range(a, b + 1)]


def scenario_events() -> list[AuditEvent]:
    h = 3600.0
    sel = "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN $1 AND $2"
    ev = [
        AuditEvent.session_start("s-bob", BOB),
        AuditEvent.statement_event(
            "s-bob",
            BOB,
            fingerprint="f1",
            statement=sel,
            relations=["public.customers"],
            labels=["pii.email"],
            rows=100,
            bytes=4000,
            duration_ms=3.0,
            ledger_keys={"customers": keys(1, 100)},
            ts=DAY + 9 * h + 60,
        ),
        AuditEvent.statement_event(
            "s-bob",
            BOB,
            fingerprint="f1",
            statement=sel,
            relations=["public.customers"],
            labels=["pii.email"],
            rows=101,
            bytes=4040,
            duration_ms=3.0,
            ledger_keys={"public.customers": keys(50, 150)},
            ts=DAY + 9 * h + 120,
        ),
        AuditEvent.session_end("s-bob", BOB),
        AuditEvent.session_start("s-alice", ALICE),
        AuditEvent.statement_event(
            "s-alice",
            ALICE,
            fingerprint="f1",
            statement=sel,
            relations=["public.customers"],
            labels=["pii.email"],
            rows=11,
            bytes=440,
            duration_ms=1.0,
            ledger_keys={"customers": keys(120, 130)},
            ledger_values={"pii.email": ["Carol@Example.com"]},
            ts=DAY + 10 * h + 5,
        ),
        AuditEvent.statement_event(
            "s-alice",
            ALICE,
            fingerprint="f2",
            statement="SELECT name FROM products",
            relations=["public.products"],
            rows=7,
            ts=DAY + 10 * h + 6,
        ),
        AuditEvent.session_start("s-mal", MALLORY),
        AuditEvent.statement_event(
            "s-mal",
            MALLORY,
            fingerprint="f3",
            statement="SELECT * FROM customers",
            relations=["public.customers"],
            labels=["pii.email", "pii.name", "pii.phone"],
            rows=5000,
            bytes=900_000,
            duration_ms=250.0,
            verdict="limit",
            rule_ids=["bulk-pii"],
            ledger_keys={"customers": keys(1, 5000)},
            ts=DAY + 11 * h + 30,
        ),
        AuditEvent.statement_event(
            "s-mal",
            MALLORY,
            fingerprint="f4",
            # The analyser should have removed literals; the audit redact step must anyway.
            statement="COPY (SELECT * FROM customers WHERE email = 'carol@example.com') TO STDOUT",
            relations=["public.customers"],
            labels=["pii.email"],
            rows=0,
            verdict="block",
            rule_ids=["no-copy-out"],
            sqlstate="42501",
            message="COPY TO is not allowed",
            ts=DAY + 11 * h + 90,
        ),
        AuditEvent.session_end("s-mal", MALLORY),
    ]
    # session start/end events get the scenario's hours too
    ev[0].ts, ev[3].ts = DAY + 9 * h, DAY + 9 * h + 200
    ev[4].ts, ev[7].ts, ev[10].ts = DAY + 10 * h, DAY + 11 * h, DAY + 11 * h + 100
    return ev


async def seed(tmp: Path, extra_sinks: list[SinkConfig] | None = None, **cfg: object) -> AuditTrail:
    """Write the scenario through a real AuditTrail; returns the (closed) trail."""
    key = tmp / "ledger.key"
    if not key.exists():
        generate_key_file(key)
    config = AuditConfig(
        sinks=[SQLiteSinkConfig(path=tmp / "audit.db"), *(extra_sinks or [])],
        ledger_key=key,
        **cfg,  # type: ignore[arg-type]
    )
    trail = AuditTrail(config)
    await trail.start()
    for e in scenario_events():
        await trail.submit(e)
    await trail.close()
    return trail
