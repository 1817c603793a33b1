"""Value matching: whatever SQL packed the customers into, the audit trail names each one.

The second test database's policy in monitor mode lets every statement through; an insider
reads customers by packing them into one value (JSON, XML, arrays, delimited strings),
through temporary tables, error and notice text, notifications and COPY.  Each statement
reads its own range of customer ids, so a customer missing from the answer tells which
packing was missed.  The expected list is what the client received, recognised by the
second database's own client-side matcher (``tests/seconddb/data.py``), never by
pgwarden's code; ``records-seen --person`` must list exactly those customers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from loadtests import redteam
from policy.catalog import load_catalog
from policy.model import load_policy
from policy.valueindex import IndexBuilder
from proxy.sandbox.cluster import Cluster
from proxy.valueload import build, refresh
from tests.auditcli import cli, js, ok
from tests.proxyutil import ProxyProcess
from tests.seconddb import data as sdb

INSIDER = redteam.ATTACKER
# The DBA is audited, not limited: error and notice text reach it (an agent's is withheld
# whenever the statement reads labelled data, in monitor mode too).
DBA = "postgres"
# Reads values pgwarden cannot match (reversed): what records-seen cannot list it must
# still report, by statement.
OTHER = "agent_bob"


def _range(lo: int, hi: int) -> str:
    return f"customer_id BETWEEN {lo} AND {hi}"


# (person, packing, statements); each packing reads only customers 1000 + 20*i .. +9.
def _packings() -> list[tuple[str, str, list[str]]]:
    out: list[tuple[str, str, list[str]]] = []

    def add(name: str, *sql: str, person: str = INSIDER) -> None:
        lo = 1000 + 20 * len(out)
        out.append((person, name, [s.format(r=_range(lo, lo + 9)) for s in sql]))

    add("json_agg", "SELECT json_agg(c) FROM crm.customers c WHERE {r}")
    add("string_agg", "SELECT string_agg(\"Email\", ',') FROM crm.customers WHERE {r}")
    add("array_agg_names", 'SELECT array_agg("FullName") FROM crm.customers WHERE {r}')
    add(
        "xmlagg",
        'SELECT xmlagg(xmlelement(name e, "Email")) FROM crm.customers WHERE {r}',
    )
    add("array_sublink", 'SELECT ARRAY(SELECT "Email" FROM crm.customers WHERE {r})')
    add(
        "query_to_xml",
        'SELECT query_to_xml(\'SELECT "FullName", "Email" FROM crm.customers '
        "WHERE {r}', true, false, '')",
    )
    add("row_to_json", "SELECT row_to_json(c) FROM crm.customers c WHERE {r}")
    add("jsonb_leaves", "SELECT profile::text FROM crm.customers WHERE {r}")
    add("composite_text", "SELECT card::text, alt_phones FROM crm.customers WHERE {r}")
    add(
        "temp_table",
        'CREATE TEMP TABLE vm_t AS SELECT "Email" AS e FROM crm.customers WHERE {r}',
        "SELECT e FROM vm_t",
    )
    add(
        "select_into_temp",
        'SELECT "FullName" AS n INTO TEMP vm_t2 FROM crm.customers WHERE {r}',
        "SELECT n FROM vm_t2",
    )
    add(
        "error_text",
        "SELECT (SELECT string_agg(\"Email\", ' ') FROM crm.customers WHERE {r})::int",
        person=DBA,
    )
    add(
        "notice_text",
        "DO $$ BEGIN RAISE NOTICE '%', (SELECT string_agg(\"Email\", ';') "
        "FROM crm.customers WHERE {r}); END $$",
        person=DBA,
    )
    add(
        "landlines",  # kept only in crm.customer_phones, keyed (customer_id, kind)
        "SELECT string_agg(phone, ' / ') FROM crm.customer_phones WHERE kind <> 'mobile' AND {r}",
    )
    add(
        "reversed",
        "SELECT string_agg(reverse(\"Email\"), ',') FROM crm.customers WHERE {r}",
        person=OTHER,
    )
    add(
        "implicit_flow",  # one character a row, chosen by a comparison with the e-mail
        "SELECT k.id, p.pos, chr(x.code) FROM generate_series(1000, 2000) k(id), "
        "generate_series(1, 40) p(pos), generate_series(32, 126) x(code) "
        "WHERE (k.id, p.pos, x.code) IN (SELECT o.customer_id, q.pos, "
        'ascii(substr(o."Email", q.pos, 1)) FROM crm.customers o, generate_series(1, 40) q(pos) '
        "WHERE o.{r})",
        person=OTHER,
    )
    add(
        "notification",
        "LISTEN vm",
        "SELECT pg_notify('vm', string_agg(\"FullName\", '|')) FROM crm.customers WHERE {r}",
    )
    return out


@dataclass
class Replay:
    trail: Path
    ledger_key: Path
    direct: str
    # (person, packing) -> customers the client received by it (rows, errors, notices,
    # notifications)
    received: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    emails: dict[int, str] = field(default_factory=dict)

    def of(self, person: str) -> dict[str, set[int]]:
        return {name: c for (p, name), c in self.received.items() if p == person}


@pytest.fixture(scope="module")
def env(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> redteam.Env:
    return redteam.Env.build(pg, tmp_path_factory.mktemp("valuematch-db"))


@pytest.fixture(scope="module")
def replay(
    pg: Cluster, env: redteam.Env, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replay]:
    tmp = tmp_path_factory.mktemp("valuematch")
    policy_file = redteam.policy_without_allow_lists(tmp / "monitor.yaml")
    policy = yaml.safe_load(policy_file.read_text())
    policy["mode"] = "monitor"
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    ledger = tmp / "ledger.key"
    assert cli("keygen", "--ledger", "--out", str(ledger)).returncode == 0
    trail = tmp / "audit.db"
    config = {
        "policy_file": str(policy_file),
        "catalog_user": "postgres",
        "audit": {"sinks": [{"type": "sqlite", "path": str(trail)}], "ledger_key": str(ledger)},
    }
    proxy = ProxyProcess(pg, tmp / "proxy", config=config)
    result = Replay(trail, ledger, pg.url(database=sdb.DBNAME))
    result.emails = {cid: c.email for cid, c in env.ds.customers.items()}
    try:
        for person in (INSIDER, DBA, OTHER):
            dsn = proxy.dsn(person, database=sdb.DBNAME, password=sdb.PASSWORD)
            with psycopg.connect(dsn, autocommit=True) as conn:
                _replay(conn, env.matcher, person, result)
    finally:
        assert proxy.stop() == 0
    yield result


def _replay(conn: psycopg.Connection[Any], matcher: sdb.Matcher, person: str, r: Replay) -> None:
    current: list[set[int]] = [set()]

    def seen(text: str | None) -> None:
        current[0] |= matcher.customers_in(text or "")

    conn.add_notice_handler(
        lambda d: seen("\n".join(p for p in (d.message_primary, d.message_detail) if p))
    )
    conn.add_notify_handler(lambda n: seen(n.payload))
    for who, name, statements in _packings():
        if who != person:
            continue
        current[0] = set()
        for sql in statements:
            try:
                cur = conn.execute(sql)
                if cur.description is not None:
                    for row in cur.fetchall():
                        seen(json.dumps(row, default=str))
            except psycopg.Error as exc:
                diag = exc.diag
                seen(" ".join(p for p in (diag.message_primary, diag.message_detail) if p))
        conn.execute("SELECT 1")  # a notification arrives with the next answer
        r.received[person, name] = current[0]
    if person == INSIDER:
        copy_sql = (
            'COPY (SELECT "Email", alt_phones FROM crm.customers WHERE '
            f"{_range(1900, 1909)}) TO STDOUT"
        )
        with conn.cursor().copy(copy_sql) as copy:
            text = b"".join(bytes(b) for b in copy).decode()
        r.received[person, "copy"] = matcher.customers_in(text)


def _records_seen(r: Replay, person: str) -> set[int]:
    out: dict[str, Any] = js(
        "records-seen", "--db", str(r.trail), "--ledger-key", str(r.ledger_key),
        "--person", person, "--table", "crm.customers", "--resolve-dsn", r.direct,
    )  # fmt: skip
    return {int(rec["key"]) for rec in out["records"] if rec.get("key") is not None}


def test_every_packing_reached_the_client(replay: Replay) -> None:
    """Calibration: each packing delivered its ten customers (so an empty ledger below
    would be a miss, not an empty result)."""
    # Four customers in ten have a landline; the implicit flow spells e-mails one character
    # a row, which this test's client does not put together (records-seen lists the
    # statement, see below).
    fewer = {"landlines": 4, "implicit_flow": 0}
    short = {key: len(c) for key, c in replay.received.items() if len(c) < fewer.get(key[1], 10)}
    assert not short, short


@pytest.mark.parametrize("person", [INSIDER, DBA])
def test_records_seen_lists_exactly_the_customers_the_client_received(
    replay: Replay, person: str
) -> None:
    got = replay.of(person)
    received = set().union(*got.values())
    listed = _records_seen(replay, person)
    missed = {name: sorted(c - listed) for name, c in got.items() if c - listed}
    assert not missed, f"customers received but not in records-seen, by packing: {missed}"
    assert listed - received == set(), "records-seen names customers the client never received"


def _index(rows: dict[str, list[str]]) -> Any:
    b = IndexBuilder()
    t = b.table("crm.customers")
    for key, values in rows.items():
        b.add_row(t, key.encode(), [v.encode() for v in values])
    return b.build()


def _scan(index: Any, text: str) -> set[str]:
    found: dict[str, set[bytes]] = {}
    index.scan(text.encode(), found)
    return {k.decode() for k in found.get("crm.customers", set())}


def test_a_value_several_records_share_names_none_of_them() -> None:
    index = _index(
        {
            "1": ["Ada Lovelace", "ada@example.com", '{"city": "London"}'],
            "2": ["Alan Turing", "alan@example.com", '{"city": "London"}'],
        }
    )
    assert _scan(index, "London calling") == set()
    assert _scan(index, '[{"name":"Ada Lovelace"},{"mail":"alan@example.com"}]') == {"1", "2"}


def test_values_are_found_through_packings_and_case() -> None:
    index = _index({"7": ["O'Brien, Ann", "+1 555 0100"], "8": ["Bo Li", "li@x.org"]})
    assert _scan(index, "<n>o'brien, ann</n>") == {"7"}
    assert _scan(index, '{"+1 555 0100","LI@X.ORG"}') == {"7", "8"}
    assert _scan(index, "(Bo Li,)") == {"8"}
    # a part of a value is not the value
    assert _scan(index, "ann and bo") == set()


def test_one_record_reached_from_two_tables_is_not_shared() -> None:
    """A phone number in the customer's row and in the phone table's row that belongs to
    the same customer names that customer (a value two records share names none)."""
    index = _index({"1": ["+1 555 0100"]})
    b = IndexBuilder()
    t = b.table("crm.customers")
    b.add_row(t, b"1", [b"+1 555 0100", b"ada@example.com"])
    b.add_row(t, b"1", [b"+1 555 0100"])  # the same record, from crm.customer_phones
    b.add_row(t, b"2", [b"bo@example.com"])
    index = b.build()
    assert _scan(index, "+1 555 0100") == {"1"}


def test_rows_added_after_the_build_are_found_and_a_shared_one_is_dropped() -> None:
    index = _index({"1": ["ada@example.com"]})
    index.add("crm.customers", b"2", [b"grace@example.com"])
    index.add("crm.customers", b"3", [b"ada@example.com"])  # now two customers share it
    assert _scan(index, "grace@example.com, ada@example.com") == {"2"}


def test_what_records_seen_cannot_list_is_reported_by_statement_with_its_bound(
    replay: Replay,
) -> None:
    assert len(replay.received[OTHER, "reversed"]) == 10  # the client read them reversed
    out: dict[str, Any] = js(
        "records-seen", "--db", str(replay.trail), "--ledger-key", str(replay.ledger_key),
        "--person", OTHER, "--table", "crm.customers", "--resolve-dsn", replay.direct,
    )  # fmt: skip
    assert out["distinct_records"] == 0
    [statement] = out["unitemised_statements"]
    assert "reverse" in statement["statement"] and statement["rows"] == 1
    assert out["table_rows"] == sdb.CUSTOMERS + sdb.LEGACY
    # The implicit flow returned no labelled column: listed apart, with the same bound.
    [computed] = out["computed_statements"]
    assert "ascii(substr" in computed["statement"] and computed["rows"] > 0
    text = ok(
        "records-seen", "--db", str(replay.trail), "--ledger-key", str(replay.ledger_key),
        "--person", OTHER, "--table", "crm.customers",
    )  # fmt: skip
    assert "1 statement(s) returned labelled rows of crm.customers" in text
    assert "up to every record" in text
    assert "1 statement(s) read, and returned rows computed from, crm.customers" in text


def test_who_saw_finds_a_packed_read_by_key_and_by_value(replay: Replay) -> None:
    """json_agg carried customer 1003 without a row of its own: who-saw finds the read by
    the customer's key, and (through the monitored database) by its e-mail address."""
    base = ["who-saw", "--db", str(replay.trail), "--ledger-key", str(replay.ledger_key)]
    by_key = js(*base, "--table", "crm.customers", "--key", "1003")
    assert {r["person"] for r in by_key} == {INSIDER}
    assert any("json_agg" in r["statement"] for r in by_key)
    email = replay.emails[1003]
    assert js(*base, "--value", email) == []  # the ledger holds its key, not the value
    by_value = js(*base, "--value", email, "--resolve-dsn", replay.direct)
    assert [r["statement"] for r in by_value] == [r["statement"] for r in by_key]
    # A value no customer holds names nobody, and a part of one is not the value.
    local_part = email.split("@")[0]
    assert js(*base, "--value", local_part, "--resolve-dsn", replay.direct) == []


def test_customers_quoted_in_unlabelled_text_count_in_the_window(
    pg: Cluster, env: redteam.Env, tmp_path: Path
) -> None:
    """A ticket message (a column with no label) quoting four customers' e-mail addresses is
    four customers read: with a budget of three an hour, the agent's next read of labelled
    data is refused.  Without value matching the window would stand at zero."""
    policy = {
        "version": 1,
        "mode": "enforce",
        "catalog_user": "postgres",
        "labels": [{"column": "crm.customers.Email", "label": "pii.email"}],
        "subjects": {"agents": {"users": ["agent_cat"]}},
        "rules": [
            {"id": "three-an-hour", "subjects": ["agents"], "labels": ["pii.*"],
             "window": "1h", "max_records": 3, "action": "block"},
        ],
    }  # fmt: skip
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy))
    quoted = ", ".join(env.ds.customers[i].email for i in (2001, 2002, 2003, 2004))
    message_id = 20_000_000
    with psycopg.connect(pg.dsn(database=sdb.DBNAME), autocommit=True) as direct:
        direct.execute(
            "INSERT INTO crm.ticket_messages (message_id, ticket_id, author, body) "
            "SELECT %s, min(ticket_id), 'customer', %s FROM crm.\"Tickets\"",
            (message_id, f"Please write to all of us: {quoted}"),
        )
    proxy = ProxyProcess(
        pg, tmp_path / "proxy", ["--policy", str(policy_file), "--catalog-user", "postgres"]
    )
    try:
        dsn = proxy.dsn("agent_cat", database=sdb.DBNAME, password=sdb.PASSWORD)
        with psycopg.connect(dsn, autocommit=True) as conn:
            [(body,)] = conn.execute(
                "SELECT body FROM crm.ticket_messages WHERE message_id = %s", (message_id,)
            ).fetchall()
            assert quoted in body  # unlabelled: it reaches the agent
            with pytest.raises(psycopg.Error) as refused:
                conn.execute('SELECT "Email" FROM crm.customers WHERE customer_id = 1').fetchall()
            assert "three-an-hour" in str(refused.value) or "window" in str(refused.value)
    finally:
        assert proxy.stop() == 0
        with psycopg.connect(pg.dsn(database=sdb.DBNAME), autocommit=True) as direct:
            direct.execute("DELETE FROM crm.ticket_messages WHERE message_id = %s", (message_id,))


def test_a_refresh_indexes_rows_added_since_the_build_in_every_protected_table(
    pg: Cluster, env: redteam.Env
) -> None:
    """The index is built once, then refreshed from xmin: a customer added afterwards, and
    a phone number added to the partitioned phone table, are found after a refresh (and
    the phone names its customer), not before."""
    rules = load_policy(redteam.policy_without_allow_lists(Path(env.workdir) / "p.yaml"))
    email, phone = "late.arrival9999@post.example", "+44 20 9999 0001"

    async def go() -> tuple[dict[str, set[bytes]], dict[str, set[bytes]]]:
        conn = await asyncpg.connect(pg.url(database=sdb.DBNAME))
        try:
            snapshot = (await load_catalog(conn)).with_rules(rules.label_rules())
            index, xmin, _s = await build(conn, snapshot, max_entries=10_000_000)
            await conn.execute(
                'INSERT INTO crm.customers (customer_id, "FullName", "Email", region) '
                "VALUES (9999, 'Late Arrival', $1, 'north')",
                email,
            )
            await conn.execute(
                "INSERT INTO crm.customer_phones VALUES (9999, 'landline', $1)", phone
            )
            before: dict[str, set[bytes]] = {}
            index.scan(f"{email} {phone}".encode(), before)
            done = await refresh(conn, snapshot, index, xmin)
            assert done is not None and done[1] >= 2
            after: dict[str, set[bytes]] = {}
            index.scan(f"[{email!r}]".encode(), after)
            index.scan(f'{{"{phone}"}}'.encode(), after)
            return before, after
        finally:
            await conn.execute("DELETE FROM crm.customer_phones WHERE customer_id = 9999")
            await conn.execute("DELETE FROM crm.customers WHERE customer_id = 9999")
            await conn.close()

    before, after = asyncio.run(go())
    assert before == {}
    assert after["crm.customers"] == {b"9999"}
    assert after["crm.customer_phones"] == {b'["9999","landline"]'}
