"""The record ledger across protocol and SQL corners: what a responder's ``who-saw`` and
``records-seen`` report must be exactly the customers whose data the client received.

Real clients (psycopg, asyncpg) read through the real proxy with the shipped policy and a
SQLite audit trail; the ledger is then read back two ways: per statement event (the digests
of every customer id, so an extra or a missing record shows), and through the responder's
commands.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from audit.ledger import RecordHasher, load_key, split
from proxy.sandbox.cluster import Cluster
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


def test_derived_keys_and_second_readings_do_not_stand_for_the_record(
    pg: Cluster, audited: tuple[ProxyProcess, Path, Path]
) -> None:
    # A column computed from the key alone (customer_id + 1000, nullif, count, lag, a
    # scalar subquery) names another customer or none, and a self-join or LATERAL puts one
    # customer's key beside another's email.  The ledger used to take such a column for the
    # key: who-saw missed the customers whose data left and named others who never did.
    p, db, kf = audited
    cases = {
        # statement: (customers whose email the client received, keys the ledger may hold)
        "SELECT customer_id + 1000 AS id, email FROM customers WHERE customer_id IN (5, 6)":
            ({5, 6}, set()),
        "SELECT nullif(customer_id, 7) AS id, email FROM customers WHERE customer_id IN (7, 8)":
            ({7, 8}, set()),
        "SELECT count(customer_id), email FROM customers WHERE customer_id IN (9, 10) GROUP BY email":
            ({9, 10}, set()),
        "SELECT lag(customer_id) OVER (ORDER BY customer_id) AS customer_id, email FROM customers"
        " WHERE customer_id IN (26, 27)": ({26, 27}, set()),
        "SELECT (SELECT customer_id FROM customers WHERE customer_id = 29) AS customer_id, email"
        " FROM customers WHERE customer_id = 28": ({28}, set()),
        "SELECT a.customer_id, b.email FROM customers a JOIN customers b"
        " ON b.customer_id = a.customer_id + 1 WHERE a.customer_id = 40": ({41}, {40}),
        "SELECT c.customer_id, x.e FROM customers c, LATERAL (SELECT email e FROM customers"
        " WHERE customer_id = c.customer_id + 1) x WHERE c.customer_id = 50": ({51}, {50}),
        "SELECT customer_id, lag(email) OVER (ORDER BY customer_id) FROM customers"
        " WHERE customer_id IN (60, 61)": ({60}, {60, 61}),
    }  # fmt: skip
    with psycopg.connect(dsn(p, "postgres"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'derived'")
        for sql in cases:
            conn.execute(sql).fetchall()
    p.stop()
    entries = [e for e in ledger(db, kf) if e[0]["end_user"] == "derived"][1:]  # after SET
    assert len(entries) == len(cases)
    for (sql, (emails, keys_allowed)), (_ev, ids, _values) in zip(
        cases.items(), entries, strict=True
    ):
        # No customer who was not read: value matching names the ones whose email left.
        assert set(ids) <= keys_allowed | emails, sql
        for i in emails:
            by_key = i in ids
            by_value = who_saw(db, kf, "--value", f"customer{i}@mail.example")
            assert by_key or by_value, f"customer {i} is nowhere in the ledger after {sql}"
    # Nothing but the customers actually read: no stranger found by key.
    assert who_saw(db, kf, "--table", "customers", "--key", "1") == []


def test_key_through_join_using_alias_cte_subquery_view_and_returning(
    audited: tuple[ProxyProcess, Path, Path],
) -> None:
    p, db, kf = audited
    got: dict[str, list[int]] = {}
    with psycopg.connect(dsn(p, "postgres"), autocommit=True) as conn:
        for name, sql in {
            "using": "SELECT customer_id, email FROM tickets t JOIN customers c USING (customer_id)"
                     " WHERE t.ticket_id IN (110, 111)",
            "alias": "SELECT c.customer_id AS k, c.email FROM customers c JOIN tickets t"
                     " ON t.customer_id = c.customer_id WHERE t.ticket_id IN (112, 113)",
            "cte": "WITH x AS (SELECT customer_id AS id, email FROM customers"
                   " WHERE customer_id IN (114, 115)) SELECT id, email FROM x",
            "subquery": "SELECT s.id, s.e FROM (SELECT customer_id id, email e FROM customers"
                        " WHERE customer_id IN (116, 117)) s",
            "view": "SELECT customer_id, email FROM reporting.customer_contacts"
                    " WHERE customer_id IN (118, 119)",
            "update": "UPDATE customers SET tier = tier WHERE customer_id IN (120, 121)"
                      " RETURNING customer_id, email",
            "delete": "WITH d AS (DELETE FROM customers WHERE customer_id = 0"
                      " RETURNING customer_id, email) SELECT * FROM d",
        }.items():  # fmt: skip
            got[name] = [r[0] for r in conn.execute(sql).fetchall()]
    p.stop()
    entries = ledger(db, kf)
    for name, first in (("using", "SELECT customer_id, email FROM tickets"),
                        ("alias", "SELECT c.customer_id AS k"), ("cte", "WITH x AS"),
                        ("subquery", "SELECT s.id"), ("view", "reporting.customer_contacts"),
                        ("update", "UPDATE customers")):  # fmt: skip
        ((ev, ids, values),) = statement(entries, first)
        assert sorted(ids) == sorted(got[name]) and len(ids) == 2, name
        assert values == [], name  # the key accounts for the email: no value digests
        assert ev["rows"] == 2 and ev["ledger_count"] == 2, name


def test_labelled_values_beside_another_tables_key_are_kept(
    audited: tuple[ProxyProcess, Path, Path],
) -> None:
    # The customer's key accounts for the customer's email, not for the ticket number in the
    # same row: that used to leave no trace at all (who-saw --value found nobody).
    p, db, kf = audited
    with psycopg.connect(dsn(p, "postgres"), autocommit=True) as conn:
        conn.execute(
            "SELECT c.customer_id, c.email, t.ticket_number FROM customers c"
            " JOIN tickets t USING (customer_id) WHERE t.ticket_id IN (13, 14)"
        ).fetchall()
        conn.execute(  # no customer at all: the key is NULL, the ticket number is not
            "SELECT c.customer_id, c.email, t.ticket_number FROM tickets t LEFT JOIN customers c"
            " ON c.customer_id = t.customer_id + 1000 WHERE t.ticket_id = 16"
        ).fetchall()
        # COPY output too: one customer's key beside the next one's email.
        with conn.cursor().copy(
            "COPY (SELECT a.customer_id, b.email FROM customers a JOIN customers b"
            " ON b.customer_id = a.customer_id + 1 WHERE a.customer_id = 70) TO STDOUT"
        ) as copy:
            assert b"".join(bytes(c) for c in copy) == b"70\tcustomer71@mail.example\n"
    p.stop()
    assert [r["db_user"] for r in who_saw(db, kf, "--value", "customer71@mail.example")] == [
        "postgres"
    ]
    for ticket in ("TM-0000013", "TM-0000014", "TM-0000016"):
        found = who_saw(db, kf, "--value", ticket, "--label", "support.ticket")
        assert [r["db_user"] for r in found] == ["postgres"], ticket
    assert [r["db_user"] for r in who_saw(db, kf, "--table", "customers", "--key", "13")] == [
        "postgres"
    ]


def test_a_constant_key_does_not_hide_records_from_the_hourly_budget(
    audited: tuple[ProxyProcess, Path, Path],
) -> None:
    # The windows count distinct records by key: a "key" that is the same in every row
    # (a scalar subquery) made 220 customers one record, under the 200-an-hour budget.
    # Reading customers twice, each row counts as two records (records_per_row), so the
    # per-statement cap halves and refuses first; a literal "key" reads it once.
    p, _db, _kf = audited
    for key, refused_by, person in (
        ("(SELECT min(customer_id) FROM customers)", "agent-statement-rows", "subquery"),
        ("7", "agent-hourly-records", "literal"),
    ):
        sql = (
            f"SELECT {key} AS customer_id, email FROM customers WHERE customer_id BETWEEN %s AND %s"
        )
        received = 0
        with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
            conn.execute(f"SET pgwarden.end_user = '{person}'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=refused_by):
                for lo in range(1, 320, 20):  # not as far as the canary customer 333
                    received += len(conn.execute(sql, (lo, lo + 19), prepare=False).fetchall())
        assert received <= 200, key


def test_cursors_portals_pipelines_and_multi_statement_queries(
    pg: Cluster, audited: tuple[ProxyProcess, Path, Path]
) -> None:
    # Rows that arrive in pieces (FETCH, Execute with max_rows, a pipeline, several results
    # of one Query): each event holds exactly the customers of the rows it returned, a
    # scroll back returns (and records) a customer again, and records-seen is the union.
    p, db, kf = audited
    received: list[int] = []
    with psycopg.connect(dsn(p, "postgres")) as conn:
        conn.execute("SET pgwarden.end_user = 'cursors'")
        with conn.cursor(name="named") as cur:
            cur.execute(
                "SELECT customer_id, email FROM customers WHERE customer_id <= 25 ORDER BY 1"
            )
            while batch := cur.fetchmany(7):
                received += [r[0] for r in batch]
        with conn.cursor(name="scroll", scrollable=True) as cur:
            cur.execute(
                "SELECT customer_id, phone FROM customers WHERE customer_id BETWEEN 31 AND 40 ORDER BY 1"
            )
            received += [r[0] for r in cur.fetchmany(5)]
            cur.scroll(0, mode="absolute")
            received += [r[0] for r in cur.fetchmany(2)]
            cur.scroll(-1)
            received += [r[0] for r in cur.fetchall()]
        cur = conn.cursor()
        cur.execute(
            "DECLARE d CURSOR FOR SELECT customer_id, email FROM customers"
            " WHERE customer_id BETWEEN 41 AND 60 ORDER BY 1",
            prepare=False,
        )
        for fetch in (
            "FETCH 10 FROM d",
            "MOVE 3 IN d",
            "FETCH BACKWARD 2 FROM d",
            "FETCH ALL FROM d",
        ):
            cur.execute(fetch, prepare=False)
            if cur.description is not None:
                received += [r[0] for r in cur.fetchall()]
        conn.commit()
        conn.autocommit = True
        cur.execute(
            "SELECT customer_id, email FROM customers WHERE customer_id IN (61, 62);"
            "SELECT 1 AS one;"
            "SELECT customer_id, phone FROM customers WHERE customer_id IN (63, 64)",
            prepare=False,
        )
        while True:
            if cur.description is not None and cur.description[0].name == "customer_id":
                received += [r[0] for r in cur.fetchall()]
            if not cur.nextset():
                break
        with conn.pipeline():
            curs = []
            for lo in (70, 80, 90):
                c = conn.cursor()
                c.execute(
                    "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN %s AND %s",
                    (lo, lo + 3),
                )
                curs.append(c)
        received += [r[0] for c in curs for r in c.fetchall()]
    p.stop()
    entries = [e for e in ledger(db, kf) if e[0]["end_user"] == "cursors"]
    assert [i for _ev, ids, _v in entries for i in ids] == received
    assert all(values == [] for _ev, _ids, values in entries)
    for ev, ids, _values in entries:
        assert ev["ledger_count"] == (len(ids) or None), ev["statement"]
        if ev["statement"].startswith(("FETCH", "SELECT customer_id")):
            assert ev["rows"] == len(ids), ev["statement"]
        else:
            assert ev["rows"] == 0 or ev["statement"] == "SELECT $1 AS one", ev["statement"]
    assert records_seen(pg, db, kf, "cursors") == set(received)


def test_asyncpg_portals_and_binary_keys(
    pg: Cluster, audited: tuple[ProxyProcess, Path, Path]
) -> None:
    p, db, kf = audited

    async def run() -> list[int]:
        conn = await asyncpg.connect(
            host=p.pg.host, port=p.port, user="postgres", database=DB, ssl=False
        )
        try:
            await conn.execute("SET pgwarden.end_user = 'portals'")
            got: list[int] = []
            async with conn.transaction():
                sql = "SELECT customer_id, email FROM customers WHERE customer_id <= $1 ORDER BY 1"
                async for r in conn.cursor(sql, 25, prefetch=4):
                    got.append(r[0])
                cur = await conn.cursor(
                    "SELECT email, customer_id FROM customers WHERE customer_id BETWEEN 30 AND $1"
                    " ORDER BY 2",
                    50,
                )
                got += [r[1] for r in await cur.fetch(5)]
                await cur.forward(3)  # skipped: never sent, never recorded
                got += [r[1] for r in await cur.fetch(4)]
            got += [r[0] for r in await conn.fetch(
                "SELECT customer_id, email FROM customers WHERE customer_id = ANY($1::int[])",
                [60, 61],
            )]  # fmt: skip
            # A NULL key in binary format: no customer, but the ticket number left.
            row = await conn.fetchrow(
                "SELECT c.customer_id, c.email, t.ticket_number FROM tickets t LEFT JOIN"
                " customers c ON c.customer_id = t.customer_id + 1000 WHERE t.ticket_id = $1",
                17,
            )
            assert row is not None and tuple(row) == (None, None, "TM-0000017")
            return got
        finally:
            await conn.close()

    received = asyncio.run(run())
    p.stop()
    entries = [e for e in ledger(db, kf) if e[0]["end_user"] == "portals"]
    assert [i for _ev, ids, _v in entries for i in ids] == received
    for ev, ids, _values in entries:
        assert ev["rows"] == (len(ids) if ids else ev["rows"]), ev["statement"]
    moves = [ev for ev, _ids, _v in entries if ev["statement"].startswith("MOVE")]
    assert [ev["rows"] for ev in moves] == [0]  # MOVE returns no rows
    assert records_seen(pg, db, kf, "portals") == set(received)
    found = who_saw(db, kf, "--value", "TM-0000017", "--label", "support.ticket")
    assert [r["end_user"] for r in found] == ["portals"]


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


@pytest.mark.parametrize("prepare", [False, None], ids=["parsed-each-time", "auto-prepared"])
def test_results_without_a_key_count_every_row_against_the_hourly_budget(
    audited: tuple[ProxyProcess, Path, Path], prepare: bool | None
) -> None:
    # With no key in the result, every row counts as a record of its own.  Those pseudo
    # records were named after id() of the statement's state, which CPython hands out again
    # for the next statement: 320 customers' emails counted as 20.  And psycopg prepares a
    # statement it runs five times: judged only at its Parse, it ran past the budget.
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


def test_limited_agent_pipelines_portals_and_prepared_statements(
    pg: Cluster, audited: tuple[ProxyProcess, Path, Path]
) -> None:
    # The same corners for an agent, whose results are watched row by row (limits) rather
    # than read for keys alone: a pipeline whose second statement is cut at 20 rows (the
    # third never runs), an asyncpg cursor cut across its Executes, prepared statements.
    p, db, kf = audited
    received: list[int] = []
    sql = "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN %s AND %s ORDER BY 1"
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'agent'")
        curs = [conn.cursor() for _ in range(3)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            for c, (lo, hi) in zip(curs, ((1, 5), (11, 40), (51, 55)), strict=True):
                c.execute(sql, (lo, hi))
        received += [r[0] for r in curs[0].fetchall()]
        for lo in range(61, 101, 5):  # prepared after five runs
            received += [r[0] for r in conn.execute(sql, (lo, lo + 2)).fetchall()]

    async def run() -> list[int]:
        conn = await asyncpg.connect(
            host=p.pg.host, port=p.port, user="support_app", database=DB, ssl=False
        )
        got: list[int] = []
        try:
            await conn.execute("SET pgwarden.end_user = 'agent'")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    async for r in conn.cursor(
                        "SELECT customer_id, email FROM customers WHERE customer_id > $1"
                        " ORDER BY 1 LIMIT 30",
                        200,
                        prefetch=6,
                    ):
                        got.append(r[0])
        finally:
            await conn.close()
        return got

    received += asyncio.run(run())
    p.stop()
    entries = [e for e in ledger(db, kf) if e[0]["end_user"] == "agent"]
    recorded = [i for _ev, ids, _v in entries for i in ids]
    # Sent before the cuts, though the client libraries dropped them: 20 rows of the
    # pipeline's second statement, and of the cursor's fourth Execute the rows 19 and 20.
    cut = [*range(11, 31), 219, 220]
    assert sorted(recorded) == sorted(received + cut)
    assert received[-18:] == list(range(201, 219))  # three Executes of 6, then the cut
    assert not set(range(51, 56)) & set(recorded)  # after the cut-off: never ran
    assert records_seen(pg, db, kf, "agent") == set(recorded)
