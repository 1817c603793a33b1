"""The responder asks about a person, whoever they logged in as: a trail written by the real
proxy with the shipped policy, where one agent logs in as her own role (no end-user name)
and the helpdesk's pooled connection names its agents per statement.

Expected answers are what the clients below sent, never what the code under test computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from proxy.sandbox.cluster import Cluster
from tests.auditcli import cli, js, ok, refused
from tests.proxyutil import ProxyProcess
from tests.support_data import DB, POLICY

MALLORY_READS = [1, 2, 3, 4, 5]  # one customer a statement, as agent_mallory's own role
# The helpdesk's pooled connection: (end user, customer read or None for a blocked SELECT *)
POOLED = [("alice", 10), ("alice", 11), ("bob", 12), ("bob", None), ("carol", 13)]
# A second helpdesk connection: rex reads 20 customers in one statement, dot one customer
# 25 times (more rows than rex, one record).
REX = list(range(30, 50))
DOT = [50] * 25

ROLE = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_mallory') THEN
    CREATE ROLE agent_mallory LOGIN;
  END IF;
END $$;
SET password_encryption = 'scram-sha-256';
ALTER ROLE agent_mallory PASSWORD 'mallory-pw';
GRANT USAGE ON SCHEMA public TO agent_mallory;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO agent_mallory;
"""


@dataclass
class Trail:
    db: Path
    ledger_key: Path
    monitored: str  # URL of the monitored database (for --resolve-dsn)

    def args(self, *more: str) -> list[str]:
        return ["--db", str(self.db), *more]


def read_customer(conn: psycopg.Connection[Any], i: int, end_user: str | None = None) -> None:
    tag = f"/* end_user='{end_user}' */ " if end_user else ""
    conn.execute(
        f"{tag}SELECT customer_id, full_name, email FROM customers WHERE customer_id = {i}"
    ).fetchall()


@pytest.fixture(scope="module")
def trail(
    pg: Cluster, enforce_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Trail]:
    tmp = tmp_path_factory.mktemp("person")
    pg.psql(ROLE, database=DB)
    ledger = tmp / "ledger.key"
    assert cli("keygen", "--ledger", "--out", str(ledger)).returncode == 0
    db = tmp / "audit.db"
    config = {
        "policy_file": str(POLICY),
        "catalog_user": "postgres",
        "audit": {"sinks": [{"type": "sqlite", "path": str(db)}], "ledger_key": str(ledger)},
    }
    p = ProxyProcess(pg, tmp / "proxy", config=config)
    try:
        own = p.pg.dsn(user="agent_mallory", port=p.port, dbname=DB, sslmode="disable")
        with psycopg.connect(own + " password=mallory-pw", autocommit=True) as conn:
            for i in MALLORY_READS:
                read_customer(conn, i)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM customers")
        helpdesk = p.pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable")
        with psycopg.connect(helpdesk, autocommit=True) as conn:
            for who, i in POOLED:
                if i is None:
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(f"/* end_user='{who}' */ SELECT * FROM customers")
                else:
                    read_customer(conn, i, who)
        with psycopg.connect(helpdesk, autocommit=True) as conn:
            conn.execute(
                f"/* end_user='rex' */ SELECT customer_id, full_name, email FROM customers "
                f"WHERE customer_id BETWEEN {REX[0]} AND {REX[-1]}"
            ).fetchall()
            for i in DOT:
                read_customer(conn, i, "dot")
    finally:
        p.stop()
    yield Trail(db, ledger, pg.url(database=DB))


# --- the person ------------------------------------------------------------------------------


def test_records_seen_by_person_names_an_agent_on_her_own_role(trail: Trail) -> None:
    common = trail.args("--ledger-key", str(trail.ledger_key), "--table", "customers")
    seen = js("records-seen", *common, "--person", "agent_mallory",
              "--resolve-dsn", trail.monitored)  # fmt: skip
    assert sorted(int(r["key"]) for r in seen["records"]) == MALLORY_READS
    assert seen["person"] == "agent_mallory"
    # the end users of the pooled account are persons too, each with their own records
    seen = js("records-seen", *common, "--person", "alice", "--resolve-dsn", trail.monitored)
    assert sorted(int(r["key"]) for r in seen["records"]) == [10, 11]
    # --db-user: everything the account served, whoever it named
    seen = js("records-seen", *common, "--db-user", "support_app",
              "--resolve-dsn", trail.monitored)  # fmt: skip
    helpdesk = {i for _, i in POOLED if i is not None} | set(REX) | set(DOT)
    assert sorted(int(r["key"]) for r in seen["records"]) == sorted(helpdesk)
    # asked as an end user, she is not one: the refusal says how to ask
    err = refused("records-seen", *common, "--end-user", "agent_mallory")
    assert "never names the end user 'agent_mallory'" in err and "--person agent_mallory" in err
    err = refused("records-seen", *common, "--person", "Agent_Mallory")
    assert "never names the person 'Agent_Mallory'" in err and "'agent_mallory'" in err
    err = refused("records-seen", *common)
    assert "name exactly one person" in err
    err = refused("records-seen", *common, "--person", "alice", "--end-user", "alice")
    assert "name exactly one person" in err


def test_timeline_search_sessions_and_who_saw_know_the_person(trail: Trail) -> None:
    statements = len(MALLORY_READS) + 1  # and the refused SELECT *
    tl = js("timeline", *trail.args("--person", "agent_mallory"))
    assert sum(r["statements"] for r in tl) == statements
    assert sum(r["labelled_rows"] for r in tl) == len(MALLORY_READS)
    assert sum(r["blocks"] for r in tl) == 1
    assert "agent_mallory" in ok("timeline", *trail.args("--person", "agent_mallory"))

    found = js("search", *trail.args("--person", "agent_mallory", "--kind", "statement"))
    assert len(found) == statements
    assert {(r["person"], r["db_user"], r["end_user"]) for r in found} == {
        ("agent_mallory", "agent_mallory", None)
    }
    bob = js("search", *trail.args("--person", "bob", "--kind", "statement"))
    assert [(r["person"], r["db_user"]) for r in bob] == [("bob", "support_app")] * 2
    assert "agent_mallory" in ok("search", *trail.args("--person", "agent_mallory"))

    (session,) = js("sessions", *trail.args("--person", "agent_mallory"))
    assert session["persons"] == ["agent_mallory"] and session["db_user"] == "agent_mallory"
    top = {r["person"]: r for r in js("top", *trail.args())}
    assert top["agent_mallory"]["distinct_records"] == len(MALLORY_READS)

    who = trail.args("--ledger-key", str(trail.ledger_key), "--table", "customers", "--key", "3")
    assert [r["person"] for r in js("who-saw", *who)] == ["agent_mallory"]
    shown = ok("who-saw", *who)
    assert "by: agent_mallory" in shown
    assert [line for line in shown.splitlines() if line.startswith("│") and "agent_mallory" in line]


# --- alerts ----------------------------------------------------------------------------------


def test_alerts_carry_the_database_user_end_user_and_session(trail: Trail) -> None:
    # agent_mallory's refused SELECT * on her own role: the alert is hers, in her session
    (alert,) = js("search", *trail.args("--person", "agent_mallory", "--kind", "alert"))
    (statement,) = js("search", *trail.args("--person", "agent_mallory", "--verdict", "block",
                                            "--kind", "statement"))  # fmt: skip
    assert alert["verdict"] == "block"
    assert (alert["db_user"], alert["end_user"]) == ("agent_mallory", None)
    assert alert["session_id"] == statement["session_id"]
    assert alert["details"]["subject"] == "person:agent_mallory"
    # bob's, named by the helpdesk's pooled connection: found by --end-user
    (alert,) = js("search", *trail.args("--end-user", "bob", "--kind", "alert"))
    assert (alert["db_user"], alert["end_user"], alert["person"]) == ("support_app", "bob", "bob")
    bob = js("search", *trail.args("--end-user", "bob", "--kind", "statement"))
    assert alert["session_id"] == bob[0]["session_id"]
    # a session counts a refused statement once, not again for its alert
    (session,) = js("sessions", *trail.args("--person", "agent_mallory"))
    assert session["blocks"] == 1


# --- sessions --------------------------------------------------------------------------------


def test_sessions_of_a_person_show_the_whole_sessions_totals(trail: Trail) -> None:
    # The helpdesk's pooled connection served alice, bob and carol: asked about alice, the
    # session is listed with everything it did, not alice's share of it.
    reads = [i for _, i in POOLED if i is not None]
    for ask in (["--end-user", "alice"], ["--person", "carol"], ["--db-user", "support_app"]):
        listed = js("sessions", *trail.args(*ask))
        (session,) = [s for s in listed if "alice" in s["end_users"]]
        assert len(listed) == (2 if ask[0] == "--db-user" else 1), ask
        assert session["statements"] == len(POOLED), ask
        assert session["labelled_rows"] == len(reads), ask
        assert session["blocks"] == 1, ask
        assert session["end_users"] == ["alice", "bob", "carol"], ask
    # the filter still chooses which sessions are listed
    assert [s["db_user"] for s in js("sessions", *trail.args("--person", "agent_mallory"))] == [
        "agent_mallory"
    ]
    assert len(js("sessions", *trail.args("--db-user", "support_app"))) == 2
    assert len(js("sessions", *trail.args())) == 3


# --- the ledger key --------------------------------------------------------------------------


def test_another_deployments_ledger_key_is_refused(trail: Trail, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    assert cli("keygen", "--ledger", "--out", str(other)).returncode == 0
    for ask in (
        ["who-saw", "--table", "customers", "--key", "3"],
        ["records-seen", "--table", "customers", "--person", "agent_mallory"],
    ):
        err = refused(*ask[:1], *trail.args("--ledger-key", str(other), *ask[1:]))
        assert f"the ledger key {other} is not the key this trail's ledger was written with" in err
        assert "Traceback" not in err
    # the right key still answers, without a warning
    res = cli("who-saw", *trail.args("--ledger-key", str(trail.ledger_key), "--table",
                                     "customers", "--key", "3"))  # fmt: skip
    assert res.returncode == 0 and "agent_mallory" in res.stdout and res.stderr == ""


def test_a_trail_written_under_two_keys_warns_about_the_other(tmp_path: Path) -> None:
    import asyncio

    from audit.events import AuditEvent, Subject
    from audit.ledger import generate_key_file
    from audit.pipeline import AuditConfig, AuditTrail, SQLiteSinkConfig

    db = tmp_path / "audit.db"
    who = Subject("support_app", DB, "helpdesk", "10.0.0.5", False, "bob")

    async def write(key: Path, customer: str) -> None:
        generate_key_file(key)
        trail = AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path=db)], ledger_key=key))
        await trail.start()
        await trail.submit(
            AuditEvent.statement_event(
                "s", who, fingerprint="f", statement="SELECT email FROM customers",
                relations=["public.customers"], labels=["pii.email"], rows=1,
                ledger_keys={"customers": [customer]},
            )
        )  # fmt: skip
        await trail.close()

    asyncio.run(write(tmp_path / "old.key", "7"))  # before a key rotation
    asyncio.run(write(tmp_path / "new.key", "8"))
    res = cli("who-saw", "--db", str(db), "--ledger-key", str(tmp_path / "new.key"),
              "--table", "customers", "--key", "8", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [r["person"] for r in orjson.loads(res.stdout)] == ["bob"]
    assert "part of this trail's ledger was written with another key" in res.stderr
    # the old key finds the record it wrote, with the same warning
    res = cli("who-saw", "--db", str(db), "--ledger-key", str(tmp_path / "old.key"),
              "--table", "customers", "--key", "7", "--json")  # fmt: skip
    assert res.returncode == 0 and len(orjson.loads(res.stdout)) == 1
    assert "another key" in res.stderr


# --- timeline buckets and top ----------------------------------------------------------------


def test_top_ranks_by_distinct_records_with_bytes_beside(trail: Trail) -> None:
    top = js("top", *trail.args())
    order = [r["person"] for r in top]
    # rex: 20 customers; agent_mallory 5; alice 2; dot read more rows (25) than rex, but
    # one customer: by rows dot came first
    assert order[:3] == ["rex", "agent_mallory", "alice"]
    by = {r["person"]: r for r in top}
    assert by["dot"]["labelled_rows"] == len(DOT) > by["rex"]["labelled_rows"] == len(REX)
    assert by["dot"]["distinct_records"] == 1
    # among people with one record each, more labelled bytes rank higher
    assert order.index("dot") < min(order.index("bob"), order.index("carol"))
    assert by["dot"]["labelled_bytes"] > by["bob"]["labelled_bytes"] > 0
    shown = ok("top", *trail.args())
    assert "by distinct records" in shown and "labelled_bytes" in shown


def test_timeline_buckets_and_top_bytes_on_the_seeded_scenario(tmp_path: Path) -> None:
    import asyncio

    from tests.audit_scenario import scenario_events, seed

    asyncio.run(seed(tmp_path))
    db = ["--db", str(tmp_path / "audit.db")]
    # bob's two statements: 09:01 and 09:02 UTC on 2 November
    minutes = js("timeline", *db, "--person", "bob", "--bucket", "1m")
    assert [(r["bucket"], r["statements"]) for r in minutes] == [
        ("2026-11-02T09:01Z", 1),
        ("2026-11-02T09:02Z", 1),
    ]
    assert "minute (UTC)" in ok("timeline", *db, "--person", "bob", "--bucket", "1m")
    days = js("timeline", *db, "--person", "bob", "--bucket", "1d")
    assert [(r["bucket"], r["statements"], r["labelled_rows"]) for r in days] == [
        ("2026-11-02", 2, 201)
    ]
    hours = js("timeline", *db, "--person", "bob")  # the default, as before
    assert [(r["hour"], r["bucket"]) for r in hours] == [("2026-11-02T09:00Z",) * 2]
    err = refused("timeline", *db, "--person", "bob", "--bucket", "5m")
    assert "--bucket" in err
    labelled_bytes: dict[str, int] = {}
    for e in scenario_events():
        if e.kind == "statement" and e.labels and e.subject is not None:
            who = str(e.subject.end_user)
            labelled_bytes[who] = labelled_bytes.get(who, 0) + (e.bytes or 0)
    top = js("top", *db)
    assert {r["person"]: r["labelled_bytes"] for r in top} == labelled_bytes
    assert [r["person"] for r in top] == ["mallory", "bob", "alice"]
