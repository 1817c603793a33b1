"""The audit trail written by the real proxy: what a responder finds after real clients ran.

Agents (support_app, end users named per statement) read customers through the proxy with
the shipped policy; the trail must then answer who read what, exactly which customers each
person received, hold no literal from any statement, verify intact, and survive kill -9.
"""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess, audit_cli, audit_keys
from tests.support_data import DB, policy_naming_as_dba


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return audit_keys(tmp_path)


def start(
    pg: Cluster, tmp_path: Path, keys: tuple[Path, Path], name: str = "proxy"
) -> tuple[ProxyProcess, Path]:
    db = tmp_path / f"{name}-audit.db"
    config = {
        # Scenarios tag their statements with an end-user name of their own, as the DBA.
        "policy_file": str(policy_naming_as_dba(tmp_path)),
        "catalog_user": "postgres",
        "audit": {
            "sinks": [{"type": "sqlite", "path": str(db)}],
            "ledger_key": str(keys[0]),
            "signing_key": str(keys[1]),
            "durable_timeout_s": 2,
        },
    }
    return ProxyProcess(pg, tmp_path / name, config=config), db


@pytest.fixture
def audited(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path]
) -> Iterator[tuple[ProxyProcess, Path]]:
    p, db = start(pg, tmp_path, keys)
    yield p, db
    p.stop()


def dsn(p: ProxyProcess, user: str) -> str:
    return p.pg.dsn(user=user, port=p.port, dbname=DB, sslmode="disable")


def events(db: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute("SELECT * FROM events ORDER BY id"))
    finally:
        conn.close()


def test_every_statement_is_recorded_without_its_literals(
    audited: tuple[ProxyProcess, Path],
) -> None:
    p, db = audited
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'alice'")
        conn.execute(
            "SELECT full_name, email FROM customers WHERE email = 'customer7@mail.example'"
        ).fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM customers")
    with psycopg.connect(dsn(p, "postgres"), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM customers WHERE phone = '+442000000042'").fetchall()
    p.stop()
    rows = events(db)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("session_start") == 2 and kinds.count("session_end") == 2
    stmts = [r for r in rows if r["kind"] == "statement"]
    lookup = next(r for r in stmts if "full_name" in r["statement"])
    assert lookup["end_user"] == "alice" and lookup["db_user"] == "support_app"
    assert lookup["rows"] == 1 and json.loads(lookup["labels"]) == ["pii.email", "pii.name"]
    assert json.loads(lookup["relations"]) == ["public.customers"]
    assert lookup["verdict"] == "allow"
    blocked = next(r for r in stmts if r["verdict"] == "block")
    assert "agent-statement-shapes" in json.loads(blocked["rule_ids"])
    everything = "\n".join(str(dict(r)) for r in rows)
    for secret in ("customer7@mail.example", "+442000000042"):
        assert secret not in everything  # the trail is not a second copy of the data


def test_a_comment_names_the_end_user_of_its_own_statement_only(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """On a pooled connection the next statement is someone else's (or a job's): it must not
    be judged, or recorded, as the person a comment named before it.  SET names the session's."""
    p, db = audited
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        conn.execute(
            "/* end_user='alice' */ SELECT full_name FROM customers WHERE customer_id = 3"
        ).fetchall()
        conn.execute("SELECT count(*) AS untagged_1 FROM tickets").fetchall()
        conn.execute("SET pgwarden.end_user = 'bob'")
        conn.execute(
            "/* end_user='carol' */ SELECT full_name FROM customers WHERE customer_id = 4"
        ).fetchall()
        conn.execute("SELECT count(*) AS untagged_2 FROM tickets").fetchall()
        conn.execute("RESET pgwarden.end_user")
        conn.execute("SELECT count(*) AS untagged_3 FROM tickets").fetchall()
        # A cursor's FETCHes (psycopg sends them bare) and an SQL prepared statement's
        # EXECUTEs read for whoever declared or prepared them.
        with conn.transaction(), conn.cursor(name="mine") as cur:
            cur.itersize = 2
            cur.execute(
                "/* end_user='dave' */ SELECT full_name FROM customers WHERE customer_id <= 3"
            )
            assert len(cur.fetchall()) == 3
        conn.execute(
            "/* end_user='erin' */ PREPARE q AS SELECT full_name FROM customers WHERE customer_id = 9"
        )
        conn.execute("EXECUTE q").fetchall()
    p.stop()
    stmts = [r for r in events(db) if r["kind"] == "statement"]
    reads = [(r["statement"], r["end_user"]) for r in stmts if r["statement"].startswith("SELECT")]
    assert [u for _t, u in reads] == ["alice", None, "carol", "bob", None]
    fetches = {r["end_user"] for r in stmts if r["statement"].upper().startswith("FETCH")}
    executes = [r["end_user"] for r in stmts if r["statement"].upper().startswith("EXECUTE")]
    assert fetches == {"dave"} and executes == ["erin"]
    assert [t.split(" AS ")[-1].split()[0] for t, _u in reads if "untagged" in t] == [
        "untagged_1",
        "untagged_2",
        "untagged_3",
    ]


def test_refusals_and_canary_reads_are_recorded_and_alerted(
    audited: tuple[ProxyProcess, Path],
) -> None:
    p, db = audited
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        # Extended protocol with a parameter: audited as the refusal, not as an allow.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "/* end_user='mallory' */ SELECT json_agg(email) FROM customers "
                "WHERE customer_id > %s",
                (0,),
            )
    p.stop()
    rows = events(db)
    (refused,) = [r for r in rows if r["kind"] == "statement" and r["end_user"] == "mallory"]
    assert refused["verdict"] == "block" and refused["sqlstate"] == "42501"
    assert json.loads(refused["rule_ids"]) == ["agent-statement-shapes"]
    assert "json_agg" in refused["statement"]
    alerts = [r for r in rows if r["kind"] == "alert"]
    assert [a["verdict"] for a in alerts] == ["block"]
    assert alerts[0]["message"].startswith("mallory: pgwarden: blocked by rule")


def test_records_seen_is_exactly_what_each_person_received(
    audited: tuple[ProxyProcess, Path], keys: tuple[Path, Path]
) -> None:
    p, db = audited
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        for who, ids in (("mallory", range(1, 31)), ("alice", range(5, 8))):
            conn.execute(f"SET pgwarden.end_user = '{who}'")
            for lo in range(ids.start, ids.stop, 10):
                hi = min(lo + 9, ids.stop - 1)
                conn.execute(
                    f"SELECT customer_id, email FROM customers WHERE customer_id BETWEEN {lo} AND {hi}"
                ).fetchall()
        # Re-reading the same customers does not add records.
        conn.execute("SET pgwarden.end_user = 'mallory'")
        conn.execute("SELECT customer_id, phone FROM customers WHERE customer_id <= 5").fetchall()
    p.stop()
    out = audit_cli("records-seen", "--db", str(db), "--ledger-key", str(keys[0]), "--end-user", "mallory",
                    "--table", "customers", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["distinct_records"] == 30
    who = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keys[0]), "--table", "customers",
                    "--key", "6", "--json")  # fmt: skip
    assert who.returncode == 0, who.stderr
    people = {row["end_user"] for row in json.loads(who.stdout)}
    assert people == {"mallory", "alice"}
    assert audit_cli("verify", "--db", str(db)).returncode == 0


def test_records_seen_names_customers_read_without_their_key(
    pg: Cluster, audited: tuple[ProxyProcess, Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """A lookup by e-mail returns no key column: the breach list must still name the customer.
    pgwarden's value matching names it as the row leaves (so without --resolve-dsn too);
    the values themselves are kept as well, and --resolve-dsn ties them to their rows."""
    p, db = audited
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'dave'")
        conn.execute(
            "SELECT full_name, email FROM customers WHERE email = 'customer7@mail.example'"
        ).fetchall()
        conn.execute("SELECT customer_id, email FROM customers WHERE customer_id = 5").fetchall()
    p.stop()
    base = ["records-seen", "--db", str(db), "--ledger-key", str(keys[0]), "--end-user", "dave",
            "--table", "customers"]  # fmt: skip
    plain = audit_cli(*base, "--json")
    assert plain.returncode == 0, plain.stderr
    got = json.loads(plain.stdout)
    assert got["distinct_records"] == 2  # customer 5 by its key, 7 by its e-mail address
    assert sorted(v["label"] for v in got["values"]) == ["pii.email", "pii.name"]
    text = audit_cli(*base)
    assert "2 labelled value(s) in rows without a key" in text.stdout
    assert "--resolve-dsn" in text.stdout

    out = tmp_path / "dave.csv"
    resolved = audit_cli(*base, "--json", "--resolve-dsn", pg.url(database=DB), "--out", str(out))
    assert resolved.returncode == 0, resolved.stderr
    got = json.loads(resolved.stdout)
    assert got["distinct_records"] == 2 and got["resolved"] == 2
    assert sorted(r["key"] for r in got["records"]) == ["5", "7"]
    assert {v["column"] for v in got["values"]} == {"email", "full_name"}
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["key"], r["via"]) for r in rows) == [("5", "key"), ("7", "key")]


def test_copy_output_is_in_the_ledger(
    audited: tuple[ProxyProcess, Path], keys: tuple[Path, Path]
) -> None:
    # The DBA may COPY labelled data out; who-saw must still find every customer it sent,
    # in text, CSV and binary format.
    p, db = audited
    out: dict[str, bytes] = {}
    with psycopg.connect(dsn(p, "postgres"), autocommit=True) as conn:
        cur = conn.cursor()
        for name, sql in (
            ("text", "COPY (SELECT customer_id, email FROM customers WHERE customer_id <= 20) TO STDOUT"),
            ("csv", "COPY (SELECT email, customer_id FROM customers WHERE customer_id BETWEEN 21 AND 30) "
                    "TO STDOUT WITH (FORMAT csv, HEADER, DELIMITER ';')"),
            ("binary", "COPY (SELECT customer_id, email FROM customers WHERE customer_id BETWEEN 31 AND 35) "
                       "TO STDOUT (FORMAT binary)"),
            ("no key", "COPY (SELECT email FROM customers WHERE customer_id = 77) TO STDOUT"),
        ):  # fmt: skip
            with cur.copy(sql) as copy:
                out[name] = b"".join(bytes(chunk) for chunk in copy)
    p.stop()
    assert len(out["text"].splitlines()) == 20 and b"customer7@mail.example" in out["text"]
    assert out["csv"].splitlines()[0] == b"email;customer_id"
    copies = [r for r in events(db) if r["kind"] == "statement" and "COPY" in r["statement"]]
    assert [r["rows"] for r in copies] == [20, 10, 5, 1]  # the CSV header is not a row
    for key, expected in (("7", {"postgres"}), ("25", {"postgres"}), ("33", {"postgres"}),
                          ("36", set())):  # fmt: skip
        who = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keys[0]),
                        "--table", "customers", "--key", key, "--json")  # fmt: skip
        assert who.returncode == 0, who.stderr
        assert {row["db_user"] for row in json.loads(who.stdout)} == expected, key
    # no key in the result: the ledger keeps the labelled value instead
    who = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keys[0]),
                    "--value", "Customer77@mail.example", "--json")  # fmt: skip
    assert {row["db_user"] for row in json.loads(who.stdout)} == {"postgres"}, who.stderr
    assert audit_cli("verify", "--db", str(db)).returncode == 0


def test_binary_format_keys_reach_the_ledger_as_text(
    audited: tuple[ProxyProcess, Path], keys: tuple[Path, Path]
) -> None:
    # asyncpg asks for integers in binary format; a responder types the key as text.
    p, db = audited

    async def read() -> int:
        conn = await asyncpg.connect(
            host=p.pg.host, port=p.port, user="postgres", database=DB, ssl=False
        )
        try:
            rows = await conn.fetch(
                "SELECT customer_id, email FROM customers WHERE customer_id <= $1", 5
            )
            rows += await conn.fetch(  # the key in another column, of a join
                "SELECT t.ticket_id, c.customer_id, c.email FROM tickets t"
                " JOIN customers c ON c.customer_id = t.customer_id WHERE t.ticket_id = $1",
                9,
            )
            return len(rows)
        finally:
            await conn.close()

    assert asyncio.run(read()) == 6
    p.stop()
    for key, found in (("3", True), ("9", True), ("6", False)):
        who = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keys[0]),
                        "--table", "customers", "--key", key, "--json")  # fmt: skip
        assert who.returncode == 0, who.stderr
        assert bool(json.loads(who.stdout)) is found, key


def test_a_completed_labelled_read_survives_kill_9(
    pg: Cluster,
    enforce_db: str,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> None:
    p, db = start(pg, tmp_path, keys, "killed")
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'dora'")
        for i in range(1, 40):
            assert (
                len(conn.execute(f"SELECT email FROM customers WHERE customer_id = {i}").fetchall())
                == 1
            )
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(10)
    stmts = [r for r in events(db) if r["kind"] == "statement" and r["end_user"] == "dora"]
    assert sum(1 for r in stmts if r["rows"] == 1) == 39  # every read the client completed


def test_labelled_reads_fail_closed_when_no_durable_sink_can_persist(
    pg: Cluster,
    enforce_db: str,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> None:
    p, _db = start(pg, tmp_path, keys, "readonly")
    try:
        with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
            assert conn.execute("SELECT email FROM customers WHERE customer_id = 1").fetchone()
            # The audit store goes away under the running proxy: a labelled read must not be
            # delivered unrecorded.
            writer = _sqlite_writer_pid(p)
            if writer is None:
                pytest.skip("no separate SQLite writer process to stop")
            subprocess.run(["kill", "-STOP", str(writer)], check=True)
            try:
                with pytest.raises(
                    psycopg.errors.IoError, match="cannot be recorded in the audit trail"
                ):
                    conn.execute("SELECT email FROM customers WHERE customer_id = 2").fetchall()
            finally:
                subprocess.run(["kill", "-CONT", str(writer)], check=True)
            # Unlabelled work goes on.
            assert conn.execute("SELECT count(*) FROM products").fetchone() is not None
    finally:
        p.stop()


def _sqlite_writer_pid(p: ProxyProcess) -> int | None:
    out = subprocess.run(
        ["pgrep", "-P", str(p.proc.pid), "-f", "sqlite_writer"], capture_output=True, text=True
    )
    pids = [int(x) for x in out.stdout.split()]
    return pids[0] if pids else None


def test_who_saw_a_value_when_the_result_carried_no_key(
    audited: tuple[ProxyProcess, Path], keys: tuple[Path, Path]
) -> None:
    p, db = audited
    with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'olga'")
        # No customer_id in the result: the ledger keeps the (keyed hash of the) email.
        assert conn.execute("SELECT email FROM customers WHERE customer_id = 17").fetchone() == (
            "customer17@mail.example",
        )
    p.stop()
    who = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keys[0]),
                    "--value", "customer17@mail.example", "--label", "pii.email", "--json")  # fmt: skip
    assert who.returncode == 0, who.stderr
    assert {row["end_user"] for row in json.loads(who.stdout)} == {"olga"}
    nobody = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keys[0]),
                       "--value", "customer18@mail.example", "--label", "pii.email", "--json")  # fmt: skip
    assert json.loads(nobody.stdout) == []
    # The value itself is not in the trail (database, WAL or journal), only its keyed hash.
    stored = b"".join(f.read_bytes() for f in db.parent.glob(db.name + "*"))
    assert len(stored) > 0 and b"customer17@mail.example" not in stored
