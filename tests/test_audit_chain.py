"""The hash chain catches every kind of tampering: edit, delete, reorder, truncate."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit import query as q
from audit.chain import (
    GENESIS,
    Chain,
    generate_signing_key,
    load_public_key,
    record_hash,
    verify_chain,
)
from audit.cli import audit_group
from audit.events import AuditEvent, Subject
from audit.pipeline import AuditConfig, AuditTrail, JsonlSinkConfig, SQLiteSinkConfig
from audit.sinks.jsonl import read_jsonl

SUBJ = Subject("app", "support", "helpdesk", "10.1.1.1", True, "erin")


def _events(n: int) -> list[AuditEvent]:
    return [
        AuditEvent.statement_event(
            "s1",
            SUBJ,
            fingerprint=f"f{i}",
            statement=f"SELECT * FROM customers WHERE id = {i}",
            relations=["public.customers"],
            labels=["pii.email"],
            rows=i,
            duration_ms=0.5,
            ledger_keys={"customers": [str(i), str(i + 1)]},
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def trail_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("chain")
    generate_signing_key(tmp / "sign.key")
    (tmp / "ledger.key").write_text("11" * 32)
    config = AuditConfig(
        sinks=[SQLiteSinkConfig(path=tmp / "audit.db"), JsonlSinkConfig(path=tmp / "audit.jsonl")],
        signing_key=tmp / "sign.key",
        ledger_key=tmp / "ledger.key",
        checkpoint_every=5,
        checkpoint_file=tmp / "checkpoints.jsonl",
        chain_id="writer-a",
    )

    async def go() -> None:
        async with AuditTrail(config) as trail:
            for e in _events(20):
                await trail.submit(e)

    asyncio.run(go())
    return tmp


@pytest.fixture
def db(trail_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "audit.db"
    src = sqlite3.connect(trail_dir / "audit.db")
    dst = sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    return copy


def _verify(db: Path, trail_dir: Path, external: bool = True) -> list[q.ChainReport]:
    async def go() -> list[q.ChainReport]:
        store = q.SQLiteStore(db)
        try:
            return await q.verify(
                store,
                public_key=load_public_key(trail_dir / "sign.key.pub"),
                external=q.read_checkpoints(trail_dir / "checkpoints.jsonl") if external else [],
            )
        finally:
            await store.close()

    return asyncio.run(go())


def _first(db: Path, trail_dir: Path) -> tuple[str, int]:
    (rep,) = _verify(db, trail_dir)
    assert not rep.intact
    return rep.problems[0].kind, rep.problems[0].seq


def _sql(db: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(db)
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_untouched_trail_is_intact(db: Path, trail_dir: Path) -> None:
    (rep,) = _verify(db, trail_dir)
    assert rep.intact, rep.problems
    # 20 events + a checkpoint after every 5 (4) + none at close (nothing new since the last)
    assert rep.events == 24 and rep.checkpoints == 4 and rep.last_seq == 24


def test_edit_is_reported_at_the_edited_event(db: Path, trail_dir: Path) -> None:
    _sql(db, "UPDATE events SET end_user = 'someone_else' WHERE seq = 7")
    assert _first(db, trail_dir) == ("edited", 7)


def test_delete_is_reported_as_missing_events(db: Path, trail_dir: Path) -> None:
    _sql(db, "DELETE FROM events WHERE seq IN (8, 9)")
    kind, seq = _first(db, trail_dir)
    assert (kind, seq) == ("deleted", 8)


def test_reorder_is_reported(db: Path, trail_dir: Path) -> None:
    conn = sqlite3.connect(db)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(events)") if r[1] != "id"]
    a = conn.execute(f"SELECT {', '.join(cols)} FROM events WHERE seq = 10").fetchone()
    b = conn.execute(f"SELECT {', '.join(cols)} FROM events WHERE seq = 11").fetchone()
    ids = [r[0] for r in conn.execute("SELECT id FROM events WHERE seq IN (10, 11) ORDER BY id")]
    conn.execute("DELETE FROM events WHERE seq IN (10, 11)")
    ph = ", ".join("?" * (len(cols) + 1))
    conn.execute(f"INSERT INTO events (id, {', '.join(cols)}) VALUES ({ph})", (ids[0], *b))
    conn.execute(f"INSERT INTO events (id, {', '.join(cols)}) VALUES ({ph})", (ids[1], *a))
    conn.commit()
    conn.close()
    assert _first(db, trail_dir) == ("reordered", 10)


def test_truncation_is_caught_by_signed_checkpoints_sent_out_of_band(
    db: Path, trail_dir: Path
) -> None:
    _sql(db, "DELETE FROM events WHERE seq > 15")
    # ledger rows left behind give the cut away even without outside help ...
    (alone,) = _verify(db, trail_dir, external=False)
    assert [p.kind for p in alone.problems][:1] == ["ledger_edited"]
    # ... so a careful insider removes them too, and the store alone looks intact ...
    _sql(db, "DELETE FROM ledger WHERE seq > 15")
    (alone,) = _verify(db, trail_dir, external=False)
    assert alone.intact
    # ... the checkpoints delivered elsewhere show what was cut off
    assert _first(db, trail_dir) == ("truncated", 16)


def test_rewriting_the_tail_with_fresh_hashes_is_caught_by_signatures(
    db: Path, trail_dir: Path
) -> None:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY id")]
    # an insider who can write to the store re-chains everything after event 2 with one edit
    chain = Chain("writer-a", 2, rows[1]["hash"])
    for r in rows[2:]:
        rec = q.clean(r)
        rec.pop("id", None)
        if rec["seq"] == 3:
            rec["rows"] = 0
        chain.seal(rec)
        conn.execute(
            "UPDATE events SET rows = ?, hash = ?, prev_hash = ? WHERE id = ?",
            (rec["rows"], rec["hash"], rec["prev_hash"], r["id"]),
        )
    conn.commit()
    conn.close()
    (rep,) = _verify(db, trail_dir)
    # Each event is self-consistent now; the first signed checkpoint after the edit (over
    # event 5) no longer matches, which narrows the damage to events 1..5.
    first = rep.problems[0]
    assert (first.kind, first.seq) == ("edited", 5)
    assert "checkpoint" in first.message


def test_ledger_tampering_is_caught(db: Path, trail_dir: Path) -> None:
    _sql(db, "DELETE FROM ledger WHERE id = (SELECT MIN(id) FROM ledger WHERE seq = 4)")
    assert _first(db, trail_dir) == ("ledger_edited", 4)


def test_wrong_public_key_fails_signatures(db: Path, trail_dir: Path, tmp_path: Path) -> None:
    generate_signing_key(tmp_path / "other.key")
    runner = CliRunner()
    res = runner.invoke(
        audit_group,
        ["verify", "--db", str(db), "--public-key", str(tmp_path / "other.key.pub"), "--json"],
    )
    assert res.exit_code == 1
    out = orjson.loads(res.output)
    assert out["chains"][0]["problems"][0]["kind"] == "bad_signature"


def test_cli_verify_reports_intact_and_the_first_problem(db: Path, trail_dir: Path) -> None:
    runner = CliRunner()
    args = [
        "verify",
        "--db",
        str(db),
        "--public-key",
        str(trail_dir / "sign.key.pub"),
        "--checkpoints",
        str(trail_dir / "checkpoints.jsonl"),
    ]
    ok = runner.invoke(audit_group, args)
    assert ok.exit_code == 0, ok.output
    assert "intact" in ok.output
    _sql(db, "DELETE FROM events WHERE seq = 12")
    bad = runner.invoke(audit_group, args)
    assert bad.exit_code == 1
    assert "deleted" in bad.output and "12" in bad.output


def test_jsonl_trail_verifies_and_catches_reordering(trail_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(audit_group, ["verify", "--jsonl", str(trail_dir / "audit.jsonl")])
    assert ok.exit_code == 0, ok.output
    lines = (trail_dir / "audit.jsonl").read_bytes().splitlines()
    lines[3], lines[4] = lines[4], lines[3]
    bad_file = tmp_path / "x.jsonl"
    bad_file.write_bytes(b"\n".join(lines) + b"\n")
    bad = runner.invoke(audit_group, ["verify", "--jsonl", str(bad_file), "--json"])
    assert bad.exit_code == 1
    assert orjson.loads(bad.output)["chains"][0]["problems"][0]["kind"] == "reordered"


# --- property: any event round-trips through SQLite and JSON lines and verifies ------------

_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)
_opt = st.none() | _text
_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | _text
    | st.floats(allow_nan=False, allow_infinity=False)
)
_details = st.none() | st.dictionaries(
    _text, _json_leaf | st.lists(_json_leaf, max_size=3), max_size=4
)


@st.composite
def events(draw: st.DrawFn) -> AuditEvent:
    subj = draw(st.none() | st.builds(Subject, _text, _text, _text, _text, st.booleans(), _opt))
    return AuditEvent(
        kind=draw(
            st.sampled_from(list(__import__("audit.events", fromlist=["EventKind"]).EventKind))
        ),
        ts=draw(st.floats(0, 4e9)),
        session_id=draw(_opt),
        subject=subj,
        fingerprint=draw(_opt),
        statement=draw(_opt),
        relations=draw(st.none() | st.lists(_text, max_size=3)),
        labels=draw(st.none() | st.lists(_text, max_size=3)),
        rows=draw(st.none() | st.integers(0, 2**62)),
        bytes=draw(st.none() | st.integers(0, 2**62)),
        duration_ms=draw(st.none() | st.floats(0, 1e9, allow_nan=False)),
        verdict=draw(_opt),
        rule_ids=draw(st.none() | st.lists(_text, max_size=3)),
        sqlstate=draw(_opt),
        severity=draw(_opt),
        message=draw(_opt),
        details=draw(_details),
        ledger_keys=draw(
            st.none() | st.dictionaries(_text, st.lists(_text, max_size=3), max_size=2)
        ),
    )


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(events(), min_size=1, max_size=8))
def test_any_events_round_trip_through_sqlite_and_jsonl_and_verify(
    batch: list[AuditEvent], tmp_path: Path
) -> None:
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    (d / "k").write_text("22" * 32)
    config = AuditConfig(
        sinks=[
            SQLiteSinkConfig(path=d / "a.db", synchronous="NORMAL"),
            JsonlSinkConfig(path=d / "a.jsonl"),
        ],
        ledger_key=d / "k",
    )

    async def go() -> list[q.ChainReport]:
        async with AuditTrail(config) as trail:
            for e in batch:
                trail.submit_nowait(e)
        store = q.SQLiteStore(d / "a.db")
        try:
            return await q.verify(store)
        finally:
            await store.close()

    reports = asyncio.run(go())
    assert len(reports) == 1 and reports[0].intact, reports[0].problems
    jl = list(read_jsonl(d / "a.jsonl"))
    assert all(record_hash(r) == r["hash"] for r in jl)
    assert jl[0]["prev_hash"] == GENESIS
    shutil.rmtree(d)


def _memory_chain(n: int) -> list[dict[str, object]]:
    chain = Chain("mem")
    return [chain.seal(e.to_record()) for e in _events(n)]


def test_verifier_handles_absurd_sequence_numbers_quickly() -> None:
    rows = _memory_chain(2000)
    rows[1000] = dict(rows[1000], seq=10**15)  # edited (hash breaks) and a vast gap
    rep = verify_chain("mem", rows)
    kinds = {(p.kind, p.seq) for p in rep.problems}
    assert ("deleted", 1001) in kinds and ("edited", 10**15) in kinds


def test_verifier_keeps_only_hashes_in_memory() -> None:
    from audit.chain import ChainVerifier

    v = ChainVerifier("mem")
    for row in _memory_chain(3000):
        v.feed(row)
    assert v.finish().intact
    # per event: its hash; nothing else accumulates for an intact chain
    assert len(v.hashes) == 3000 and not v._pending_links and not v._gaps
