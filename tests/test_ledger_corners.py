"""The record ledger across protocol and SQL corners: what a responder's ``who-saw`` and
``records-seen`` report must be exactly the customers whose data the client received.

Real clients (psycopg, asyncpg) read through the real proxy with the shipped policy and a
SQLite audit trail; the ledger is then read back two ways: per statement event (the digests
of every customer id, so an extra or a missing record shows), and through the responder's
commands.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audit.ledger import RecordHasher, load_key, split
from loadtests.cluster import Cluster
from tests.proxyutil import ProxyProcess
from tests.support_data import CUSTOMERS, DB
from tests.test_audit_proxy import audit_cli, keys, start

__all__ = ["keys"]  # a fixture


@pytest.fixture
def audited(
    pg: Cluster,
    enforce_db: str,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> Iterator[tuple[ProxyProcess, Path, Path]]:
    p, db = start(pg, tmp_path, keys)
    yield p, db, keys[0]
    p.stop()


def dsn(p: ProxyProcess, user: str) -> str:
    return p.pg.dsn(user=user, port=p.port, dbname=DB, sslmode="disable")


Entry = tuple[dict[str, Any], list[int], list[str]]


def ledger(db: Path, keyfile: Path) -> list[Entry]:
    """Each statement event, the customer ids in its ledger (in order, repeats kept; -1 for
    a digest of no customer) and the labelled values it holds (as digests, hex)."""
    hasher = RecordHasher(load_key(keyfile))
    by_digest = {hasher.key("customers", str(i)): i for i in range(1, CUSTOMERS + 1)}
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    out = []
    try:
        for ev in conn.execute("SELECT * FROM events WHERE kind = 'statement' ORDER BY id"):
            ids: list[int] = []
            values: list[str] = []
            for row in conn.execute(
                "SELECT kind, relation, digests FROM ledger WHERE chain_id = ? AND seq = ?"
                " ORDER BY id",
                (ev["chain_id"], ev["seq"]),
            ):
                if row["kind"] == "k2" and row["relation"] == "public.customers":
                    ids += [by_digest.get(d, -1) for d in split(row["digests"])]
                elif row["kind"] == "v2":
                    values += [f"{row['relation']}:{d.hex()}" for d in split(row["digests"])]
            out.append((dict(ev), ids, values))
    finally:
        conn.close()
    return out


def statement(entries: list[Entry], text: str) -> list[Entry]:
    found = [e for e in entries if text in e[0]["statement"]]
    assert found, f"no statement event with {text!r}"
    return found


def who_saw(db: Path, keyfile: Path, *args: str) -> list[dict[str, Any]]:
    out = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keyfile), *args, "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def records_seen(pg: Cluster, db: Path, keyfile: Path, end_user: str) -> set[int]:
    out = audit_cli(
        "records-seen", "--db", str(db), "--ledger-key", str(keyfile), "--end-user", end_user,
        "--table", "customers", "--json",
        "--resolve-dsn", pg.url(database=DB),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["resolved"] == found["distinct_records"], found
    return {int(r["key"]) for r in found["records"]}


def test_rows_sent_before_an_error_or_a_cut_off_are_in_the_ledger(
    pg: Cluster, audited: tuple[ProxyProcess, Path, Path]
) -> None:
    # The server sends rows, then fails (division by zero) or pgwarden cuts the result at
    # the agent's 20-row limit: the rows on the wire before the error left, and only those.
    p, db, kf = audited
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'midway'")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(
                "SELECT customer_id, email, 1 / (customer_id - 105) FROM customers"
                " WHERE customer_id BETWEEN 100 AND 110 ORDER BY 1",
                prepare=False,
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN 201 AND 230"
                " ORDER BY 1",
                prepare=False,
            )
        with conn.transaction(), conn.cursor(name="c") as cur:
            cur.execute(
                "SELECT customer_id, phone FROM customers WHERE customer_id BETWEEN 301 AND 330"
                " ORDER BY 1"
            )
            got = [r[0] for r in cur.fetchmany(15)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                cur.fetchmany(15)
    p.stop()
    entries = [e for e in ledger(db, kf) if e[0]["end_user"] == "midway"]
    ((ev, ids, _v),) = [e for e in entries if "1 / (customer_id" in e[0]["statement"]]
    assert ids == list(range(100, 105)) and ev["sqlstate"] == "22012" and ev["rows"] == 5
    ((ev, ids, _v),) = [e for e in entries if "email FROM customers WHERE customer_id BETWEEN $1 AND $2"
                        in e[0]["statement"]]  # fmt: skip
    assert ids == list(range(201, 221)) and ev["verdict"] == "limit" and ev["rows"] == 20
    fetched = [i for ev, ids, _v in entries if ev["statement"].startswith("FETCH") for i in ids]
    assert got == list(range(301, 316)) and fetched == list(range(301, 321))
    assert records_seen(pg, db, kf, "midway") == (
        set(range(100, 105)) | set(range(201, 221)) | set(range(301, 321))
    )


@pytest.mark.parametrize("prepare", [False], ids=["parsed-each-time"])
def test_results_without_a_key_count_every_row_against_the_hourly_budget(
    audited: tuple[ProxyProcess, Path, Path], prepare: bool | None
) -> None:
    # With no key in the result, every row counts as a record of its own.  Those pseudo
    # records were named after id() of the statement's state, which CPython hands out again
    # for the next statement: 320 customers' emails counted as 20.
    p, _db, _kf = audited
    received = 0
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'keyless'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="agent-hourly-records"):
            for lo in range(1, 320, 20):  # not as far as the canary customer 333
                received += len(conn.execute(
                    "SELECT email FROM customers WHERE customer_id BETWEEN %s AND %s",
                    (lo, lo + 19), prepare=prepare,
                ).fetchall())  # fmt: skip
    assert received == 200
