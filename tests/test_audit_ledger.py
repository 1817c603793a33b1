"""The record ledger answers "who saw customer X" and "which customers did P see" exactly."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from audit import query as q
from audit.cli import audit_group
from audit.ledger import RecordHasher, load_key, pk_text
from proxy.sandbox.cluster import Cluster
from tests.audit_scenario import EXPECTED_DISTINCT, seed


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ledger")
    asyncio.run(seed(tmp))
    return tmp


def _store(tmp: Path) -> q.SQLiteStore:
    return q.SQLiteStore(tmp / "audit.db")


def test_records_seen_counts_distinct_records_per_person(seeded: Path) -> None:
    async def go() -> dict[str, int]:
        store = _store(seeded)
        out = {}
        for who in EXPECTED_DISTINCT:
            res = await q.records_seen(store, end_user=who, table="customers")
            out[who] = len(res.records)
        await store.close()
        return out

    assert asyncio.run(go()) == EXPECTED_DISTINCT


def test_records_seen_respects_the_time_window(seeded: Path) -> None:
    async def go() -> int:
        store = _store(seeded)
        # only bob's first statement (09:01) lies before 09:01:30
        res = await q.records_seen(
            store,
            end_user="bob",
            table="public.customers",
            since=q.parse_time("2026-11-02T09:00"),
            until=q.parse_time("2026-11-02T09:01:30"),
        )
        await store.close()
        return len(res.records)

    assert asyncio.run(go()) == 100


def test_who_saw_a_key_lists_exactly_the_people_who_received_it(seeded: Path) -> None:
    hasher = RecordHasher(load_key(seeded / "ledger.key"))

    async def people(key: str) -> list[tuple[str, str]]:
        store = _store(seeded)
        rows = await q.who_saw(store, hasher, table="customers", key=key)
        await store.close()
        return [(r["end_user"], r["session_id"]) for r in rows]

    assert asyncio.run(people("125")) == [
        ("bob", "s-bob"),
        ("alice", "s-alice"),
        ("mallory", "s-mal"),
    ]
    assert asyncio.run(people("75")) == [("bob", "s-bob"), ("bob", "s-bob"), ("mallory", "s-mal")]
    assert asyncio.run(people("4000")) == [("mallory", "s-mal")]
    assert asyncio.run(people("5001")) == []


def test_who_saw_a_labelled_value_is_case_insensitive(seeded: Path) -> None:
    hasher = RecordHasher(load_key(seeded / "ledger.key"))

    async def go(label: str | None) -> list[str]:
        store = _store(seeded)
        rows = await q.who_saw(store, hasher, value=" carol@EXAMPLE.com", label=label)
        await store.close()
        return [r["end_user"] for r in rows]

    assert asyncio.run(go("pii.email")) == ["alice"]
    assert asyncio.run(go(None)) == ["alice"]


def test_ledger_holds_no_keys_in_clear(seeded: Path) -> None:
    conn = sqlite3.connect(seeded / "audit.db")
    rows = conn.execute("SELECT n, digests FROM ledger").fetchall()
    assert all(len(d) == 16 * n for n, d in rows)
    assert sum(n for n, _ in rows) == 100 + 101 + 11 + 1 + 5000
    assert b"125" not in b"".join(d for _, d in rows)
    dump = "\n".join(conn.iterdump())
    assert "carol@example.com" not in dump.lower()


def test_records_seen_resolves_digests_back_to_keys(seeded: Path, pg: Cluster) -> None:
    # A separate database stands in for the monitored one, so the shared schema is untouched.
    db = "audit_resolve"
    pg.psql(f"DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db};", database="postgres")
    with psycopg.connect(pg.dsn(database=db), autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (customer_id bigint PRIMARY KEY, email text)")
        conn.execute(
            "INSERT INTO customers "
            "SELECT g, 'c' || g || '@example.com' FROM generate_series(1, 6000) g"
        )
        conn.execute("CREATE TABLE pairs (a int, b text, PRIMARY KEY (a, b))")
        conn.execute("INSERT INTO pairs VALUES (1, 'x,y')")
    hasher = RecordHasher(load_key(seeded / "ledger.key"))

    async def go() -> q.RecordsSeen:
        store = _store(seeded)
        res = await q.records_seen(store, end_user="bob", table="customers")
        await store.close()
        return await q.resolve_keys(res, hasher, pg.url(database=db))

    res = asyncio.run(go())
    assert res.resolved == 150
    assert sorted(int(r["key"]) for r in res.records) == list(range(1, 151))

    # the same through the command line, exported as the notification list
    out = seeded / "mallory.csv"
    cli = CliRunner().invoke(
        audit_group,
        ["records-seen", "--db", str(seeded / "audit.db"), "--ledger-key",
         str(seeded / "ledger.key"), "--end-user", "mallory", "--table", "customers",
         "--resolve-dsn", pg.url(database=db), "--out", str(out)],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "5000 distinct record(s)" in cli.output and "5000 resolved" in cli.output
    keys = sorted(int(line.split(",")[1]) for line in out.read_text().splitlines()[1:])
    assert keys == list(range(1, 5001))
    # composite keys are spelled as a JSON array of texts on both sides
    assert pk_text([1, "x,y"]) == '["1","x,y"]'


def test_digests_are_the_aes_cmac_that_schema_md_documents(tmp_path: Path) -> None:
    # Recomputed here from the documented formula with the library's CMAC, so a responder
    # with only SCHEMA.md and the key file can search the ledger by hand.
    import hmac as hmac_mod
    import os
    import uuid

    from cryptography.hazmat.primitives.ciphers import algorithms
    from cryptography.hazmat.primitives.cmac import CMAC

    secret = os.urandom(32)
    hasher = RecordHasher(secret)

    def documented(kind: str, rel: str, text: str) -> bytes:
        mac = CMAC(algorithms.AES(hmac_mod.digest(secret, f"{kind}\0{rel}".encode(), "sha256")))
        mac.update(text.encode().ljust(16, b"\0"))
        return mac.finalize()

    texts = ["1", "12345", "TM-0000123", "x" * 15, "y" * 16, "z" * 17, "é" * 9,
             "0e3b1a4c-5d6f-4a8b-9c0d-1e2f3a4b5c6d"]  # fmt: skip
    for t in texts:
        assert hasher.key("customers", t) == documented("k2", "public.customers", t)
    # a whole result at once (the one-encryption path, and the mixed one) gives the same
    short = [str(i) for i in range(5000)]
    assert hasher.keys("public.customers", short) == [hasher.key("customers", t) for t in short]
    uuids = [str(uuid.UUID(int=i * 7919)) for i in range(300)]  # one length: the join path
    assert hasher.keys("customers", uuids) == [
        documented("k2", "public.customers", t) for t in uuids
    ]
    again = texts + texts  # a record returned twice is in the ledger twice
    assert hasher.keys("customers", again) == [hasher.key("customers", t) for t in again]
    # tables and labels are kept apart; values are compared case- and space-insensitively
    assert hasher.key("tickets", "1") != hasher.key("customers", "1")
    assert hasher.value("pii.email", " Carol@Example.COM") == documented(
        "v2", "pii.email", "carol@example.com"
    )


def test_trails_written_before_cmac_are_still_searched(seeded: Path, tmp_path: Path) -> None:
    import hmac as hmac_mod
    import shutil

    db = tmp_path / "audit.db"
    shutil.copy(seeded / "audit.db", db)
    secret = load_key(seeded / "ledger.key")
    hasher = RecordHasher(secret)
    old = hmac_mod.digest(secret, b"k\0public.customers\0987654", "sha256")[:16]
    conn = sqlite3.connect(db)
    chain_id, seq = conn.execute(
        "SELECT chain_id, seq FROM events WHERE end_user = 'alice' AND rows = 11"
    ).fetchone()
    conn.execute(
        "INSERT INTO ledger (chain_id, seq, kind, relation, n, digests)"
        " VALUES (?, ?, 'k', 'public.customers', 1, ?)",
        (chain_id, seq, old),
    )
    conn.commit()
    conn.close()

    async def go() -> tuple[list[str], q.RecordsSeen]:
        store = q.SQLiteStore(db)
        rows = await q.who_saw(store, hasher, table="customers", key="987654")
        res = await q.records_seen(store, end_user="alice", table="customers")
        await store.close()
        return [r["end_user"] for r in rows], res

    who, res = asyncio.run(go())
    assert who == ["alice"]
    assert len(res.records) == EXPECTED_DISTINCT["alice"] + 1
    assert [r["digest"] for r in res.records if r.get("legacy")] == [old.hex()]
