"""The pipeline's promises: durable acknowledgement, fail-closed, bounded queue, redaction,
and no acknowledged event lost to kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from audit.events import AuditEvent, Subject
from audit.pipeline import (
    AuditConfig,
    AuditQueueFull,
    AuditTrail,
    AuditUnavailable,
    JsonlSinkConfig,
    PostgresSinkConfig,
    SQLiteSinkConfig,
)
from proxy.sandbox.cluster import free_port

SUBJ = Subject("app", "support", "helpdesk", "10.1.1.1", False, "frank")


def stmt(text: str = "SELECT 1", **kw: object) -> AuditEvent:
    return AuditEvent.statement_event("s", SUBJ, fingerprint="f", statement=text, **kw)  # type: ignore[arg-type]


def dead_pg() -> PostgresSinkConfig:
    # Nothing listens there: a real connection refusal.
    return PostgresSinkConfig(dsn=f"postgresql://nobody@127.0.0.1:{free_port()}/x")


def test_submit_resolves_once_committed(tmp_path: Path) -> None:
    async def go() -> None:
        async with AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path=tmp_path / "a.db")])) as t:
            receipts = await asyncio.gather(*(t.submit(stmt()) for _ in range(50)))
            assert [r.seq for r in receipts] == list(range(1, 51))
            # committed means readable by another connection right now
            conn = sqlite3.connect(tmp_path / "a.db")
            assert conn.execute("SELECT count(*) FROM events").fetchone()[0] >= 50
            conn.close()

    asyncio.run(go())


def test_an_awaited_event_does_not_wait_for_lingering_company(tmp_path: Path) -> None:
    # Unawaited events may linger to share a commit; a labelled statement's event takes
    # them along at once.  Were it to wait out the linger, it would miss its durable
    # deadline and the labelled read would be refused.
    cfg = AuditConfig(
        sinks=[SQLiteSinkConfig(path=tmp_path / "a.db")], batch_linger_s=1.0, durable_timeout_s=0.9
    )

    async def go() -> None:
        async with AuditTrail(cfg) as t:
            for i in range(5):
                t.submit_nowait(stmt(f"SELECT {i}"))
            await asyncio.sleep(0)
            receipt = await t.submit(stmt("SELECT labelled"))
            assert receipt.seq == 6
            conn = sqlite3.connect(tmp_path / "a.db")
            assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 6
            conn.close()

    asyncio.run(go())


def test_no_durable_sink_means_audit_unavailable() -> None:
    async def go() -> None:
        async with AuditTrail(AuditConfig(sinks=[dead_pg()])) as t:
            with pytest.raises(AuditUnavailable, match="no durable audit sink could persist"):
                await t.submit(stmt())

    with pytest.raises(Exception, match="cannot connect to the PostgreSQL audit store"):
        asyncio.run(go())


def test_config_refuses_a_trail_without_a_durable_sink(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one durable sink"):
        AuditConfig(sinks=[JsonlSinkConfig(path=tmp_path / "a.jsonl")])


def test_bounded_queue_raises_when_full(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = AuditConfig(
            sinks=[SQLiteSinkConfig(path=tmp_path / "a.db")], queue_size=3, overflow="raise"
        )
        async with AuditTrail(cfg) as t:
            # no await in between: the dispatcher cannot drain, so the fourth does not fit
            for _ in range(3):
                t.submit_nowait(stmt())
            with pytest.raises(AuditQueueFull, match="audit queue is full"):
                t.submit_nowait(stmt())
            with pytest.raises(AuditQueueFull):
                await t.submit(stmt())
            assert t.queued() == 3

    asyncio.run(go())


def test_bounded_queue_blocks_producers_until_there_is_room(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = AuditConfig(
            sinks=[SQLiteSinkConfig(path=tmp_path / "a.db")], queue_size=4, overflow="block"
        )
        async with AuditTrail(cfg) as t:
            waits = [t.submit(stmt()) for _ in range(40)]
            assert t.queued() <= 4
            receipts = await asyncio.gather(*waits)
            assert sorted(r.seq for r in receipts) == list(range(1, 41))

    asyncio.run(go())


SECRETS = ["alice@example.com", "hunter2", "4111111111111111", "s3cr3t-dollar"]


def test_no_literal_reaches_any_sink(tmp_path: Path) -> None:
    statements = [
        "SELECT * FROM customers WHERE email = 'alice@example.com'",
        "ALTER ROLE bob WITH PASSWORD 'hunter2'",
        "CREATE USER carol PASSWORD hunter2",
        "SELECT * FROM cards WHERE pan = 4111111111111111",
        "SELECT $q$s3cr3t-dollar$q$, E'alice@example.com\\'s'",
        'SELECT "alice@example.com" FROM t -- hunter2',
    ]

    async def go() -> None:
        cfg = AuditConfig(
            sinks=[
                SQLiteSinkConfig(path=tmp_path / "a.db"),
                JsonlSinkConfig(path=tmp_path / "a.jsonl"),
            ]
        )
        async with AuditTrail(cfg) as t:
            for s in statements:
                # full_text is dropped unless store_full_text is configured
                await t.submit(stmt(s, full_text=s))
            # a server error passed through quotes the data it tripped over
            await t.submit(
                stmt(
                    "INSERT INTO customers (email) VALUES ($1)",
                    sqlstate="23505",
                    message='duplicate key value violates unique constraint "customers_email_key": '
                    "Key (email)=(alice@example.com) already exists.",
                )
            )
            await t.submit(stmt("SELECT 1", message="returned 5000 rows, limit is 1000"))

    asyncio.run(go())
    conn = sqlite3.connect(tmp_path / "a.db")
    dump = "\n".join(conn.iterdump())
    conn.close()
    blobs = [dump, (tmp_path / "a.jsonl").read_text()]
    for secret in SECRETS:
        for blob in blobs:
            assert secret not in blob
    assert "SELECT * FROM customers WHERE email = ?" in blobs[1]
    assert "Key (email)=(?) already exists" in blobs[1]
    assert "returned 5000 rows, limit is 1000" in blobs[1]


def test_a_restarted_writer_continues_its_chain(tmp_path: Path) -> None:
    cfg = AuditConfig(sinks=[SQLiteSinkConfig(path=tmp_path / "a.db")], chain_id="w1")

    async def once() -> int:
        async with AuditTrail(cfg) as t:
            return (await t.submit(stmt())).seq

    assert asyncio.run(once()) == 1
    # the close() checkpoint took seq 2
    assert asyncio.run(once()) == 3

    from audit import query as q

    async def check() -> bool:
        store = q.SQLiteStore(tmp_path / "a.db")
        (rep,) = await q.verify(store)
        await store.close()
        return rep.intact

    assert asyncio.run(check())


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from audit.events import AuditEvent, Subject
    from audit.pipeline import AuditConfig, AuditTrail, SQLiteSinkConfig

    async def main():
        key = Path(sys.argv[1] + ".key")
        key.write_text("33" * 32)
        t = AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path=Path(sys.argv[1]))],
                                   chain_id="victim", ledger_key=key))
        await t.start()
        s = Subject("app", "support", "x", "1.2.3.4", False, "u")

        async def worker(w):
            i = 0
            while True:
                ev = AuditEvent.statement_event("s%d" % w, s, fingerprint="f", statement="SELECT 1",
                                                rows=i, ledger_keys={"customers": [str(i)]})
                r = await t.submit(ev)
                print(r.seq, flush=True)
                i += 1

        await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(main())
    """
)


def test_kill_9_loses_no_acknowledged_event(tmp_path: Path) -> None:
    db = tmp_path / "victim.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    acked: list[int] = []
    try:
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) >= 3000:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # whatever was printed after the kill decision was acknowledged too
    rest = proc.stdout.read().split()
    acked.extend(int(x) for x in rest)
    conn = sqlite3.connect(db)
    stored = {r[0] for r in conn.execute("SELECT seq FROM events WHERE chain_id = 'victim'")}
    ledger = conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
    conn.close()
    assert len(acked) >= 3000
    missing = [s for s in acked if s not in stored]
    assert not missing, f"{len(missing)} acknowledged events are missing, e.g. {missing[:5]}"
    assert ledger >= len(acked)


def test_every_event_kind_is_stored_and_jsonl_rotates(tmp_path: Path) -> None:
    from audit import query as q
    from audit.chain import verify_chain
    from audit.sinks.jsonl import read_jsonl, rotated_files

    cfg = AuditConfig(
        sinks=[
            SQLiteSinkConfig(path=tmp_path / "a.db"),
            JsonlSinkConfig(path=tmp_path / "a.jsonl", max_bytes=4000, backups=50),
        ]
    )

    async def go() -> None:
        async with AuditTrail(cfg) as t:
            t.submit_nowait(AuditEvent.session_start("s", SUBJ))
            t.submit_nowait(AuditEvent.auth_failure(SUBJ, "password authentication failed"))
            t.submit_nowait(AuditEvent.policy_reload(ok=False, message="line 3: unknown label"))
            t.alert("canary", "canary customer 999 was read", subject=SUBJ)
            for i in range(40):
                t.submit_nowait(stmt(f"SELECT {i}"))
            await t.submit(AuditEvent.session_end("s", SUBJ, message="client closed"))

    asyncio.run(go())

    async def kinds() -> dict[str, int]:
        store = q.SQLiteStore(tmp_path / "a.db")
        rows = await q.search(store, q.Filters(), limit=1000)
        await store.close()
        out: dict[str, int] = {}
        for r in rows:
            out[r["kind"]] = out.get(r["kind"], 0) + 1
        return out

    assert asyncio.run(kinds()) == {
        "session_start": 1, "auth_failure": 1, "policy_reload": 1, "alert": 1,
        "statement": 40, "session_end": 1, "checkpoint": 1,
    }  # fmt: skip
    files = rotated_files(tmp_path / "a.jsonl")
    assert len(files) > 3 and all(f.stat().st_size <= 4000 for f in files)
    records = list(read_jsonl(tmp_path / "a.jsonl"))
    assert [r["seq"] for r in records] == list(range(1, 47))
    assert verify_chain(records[0]["chain_id"], records).intact


def test_odd_text_and_details_are_stored_escaped_without_breaking_the_chain(tmp_path: Path) -> None:
    from audit import query as q

    class Opaque:
        def __str__(self) -> str:
            return "opaque"

    async def go() -> list[object]:
        cfg = AuditConfig(sinks=[SQLiteSinkConfig(path=tmp_path / "a.db")])
        async with AuditTrail(cfg) as t:
            return list(
                await asyncio.gather(
                    t.submit(stmt("SELECT 1")),
                    # bytes the client sent in another encoding, decoded with surrogateescape
                    t.submit(stmt(b"SELECT caf\xe9".decode("utf-8", "surrogateescape"))),
                    t.submit(AuditEvent.alert("x", "y", details={"obj": Opaque(), 7: "seven"})),
                    t.submit(stmt("SELECT 2")),
                    return_exceptions=True,
                )
            )

    results = asyncio.run(go())
    assert [getattr(r, "seq", None) for r in results] == [1, 2, 3, 4]

    async def check() -> tuple[bool, list[q.Row]]:
        store = q.SQLiteStore(tmp_path / "a.db")
        (rep,) = await q.verify(store)
        rows = await q.search(store, q.Filters())
        await store.close()
        return rep.intact, rows

    intact, rows = asyncio.run(check())
    assert intact
    assert rows[1]["statement"] == "SELECT caf\\udce9"
    assert rows[2]["details"] == {"obj": "opaque", "7": "seven"}


def test_a_statement_event_stores_each_field_in_its_own_column(tmp_path: Path) -> None:
    from audit import query as q

    async def go() -> None:
        async with AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path=tmp_path / "a.db")])) as t:
            await t.submit(
                AuditEvent.statement_event(
                    "sess-7", SUBJ, fingerprint="fp1", statement="SELECT email FROM customers",
                    relations=("public.customers",), labels=("pii.email",), rows=3, bytes=99,
                    duration_ms=1.5, verdict="mask", rule_ids=("r1",), sqlstate="57014",
                    message="statement cancelled", full_text="SELECT email FROM customers",
                    ts=1_700_000_000.25,
                )
            )  # fmt: skip

    asyncio.run(go())

    async def rows() -> list[dict[str, object]]:
        store = q.SQLiteStore(tmp_path / "a.db")
        out = await q.search(store, q.Filters(), limit=10)
        await store.close()
        return out

    (row,) = [r for r in asyncio.run(rows()) if r["kind"] == "statement"]
    want = {
        "session_id": "sess-7", "db_user": "app", "database": "support",
        "application": "helpdesk", "client_addr": "10.1.1.1", "end_user": "frank",
        "fingerprint": "fp1", "statement": "SELECT email FROM customers",
        "relations": ["public.customers"], "labels": ["pii.email"], "rows": 3, "bytes": 99,
        "duration_ms": 1.5, "verdict": "mask", "rule_ids": ["r1"], "sqlstate": "57014",
        "message": "statement cancelled", "severity": None, "details": None,
        "ts": "2023-11-14T22:13:20.250000Z",
        # The normalised text is what is kept; the full text only with store_full_text.
        "full_text": None,
    }  # fmt: skip
    assert {k: row[k] for k in want} == want
