"""A row holding a canary never reaches a subject with limits (issue 12, item 8).

Real clients through the real proxy to a real PostgreSQL, on the enforcement database where
customer 333's email is the canary ``canary-1@pgwarden-canary.example``.  Each path a result
can take (simple protocol, extended protocol, a server-side cursor's FETCH, COPY) is cut off
before the canary row: the client gets the rows before it and an error with a SQLSTATE, never
the canary; the rule's action (quarantine, in the shipped policy) is in force for the next
statement; the audit trail records the refused statement and a canary alert.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from proxy.messages.backend import DataRow, ErrorResponse
from proxy.messages.frontend import Bind, Describe, Execute, Parse, Query, Sync
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess, RawClient, start_with_policy
from tests.support_data import DB, POLICY

CANARY = b"canary-1@pgwarden-canary.example"
AROUND_CANARY = (
    "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN 330 AND 336 ORDER BY 1"
)


def _shipped() -> dict[str, object]:
    policy = yaml.safe_load(POLICY.read_text())
    policy.pop("tests", None)
    return policy


def _with_canary_action(action: str) -> dict[str, object]:
    policy = _shipped()
    for rule in policy["rules"]:  # type: ignore[attr-defined]
        if "canary" in rule:
            rule["action"] = action
    return policy


@pytest.fixture
def quarantining(pg: Cluster, enforce_db: str, tmp_path: Path) -> Iterator[ProxyProcess]:
    """The shipped policy: a canary read quarantines its reader (audited)."""
    p = start_with_policy(pg, tmp_path, _shipped(), audit=True)
    yield p
    assert p.stop() == 0, p.log()


@pytest.fixture
def blocking(pg: Cluster, enforce_db: str, tmp_path: Path) -> Iterator[ProxyProcess]:
    """The shipped policy with the canary rule's action 'block': no quarantine follows."""
    p = start_with_policy(pg, tmp_path, _with_canary_action("block"))
    yield p
    assert p.stop() == 0, p.log()


def _raw(p: ProxyProcess, end_user: str) -> RawClient:
    c = RawClient(p.host, p.port)
    c.startup(user="support_app", database=DB)
    c.send(Query(f"SET pgwarden.end_user = '{end_user}'").encode())
    assert c.read_until_ready()[-1] == ("Z", b"I")
    return c


def _rows_and_error(
    msgs: list[tuple[str, bytes]],
) -> tuple[list[bytes | None], ErrorResponse | None]:
    raw = b"".join(body for _t, body in msgs)
    assert CANARY not in raw, "the canary value reached the client"
    ids = [DataRow.decode(b).values[0] for t, b in msgs if t == "D"]
    errors = [ErrorResponse.decode(b) for t, b in msgs if t == "E"]
    assert len(errors) <= 1, msgs
    return ids, errors[0] if errors else None


def _dsn(p: ProxyProcess) -> str:
    return p.pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable")


def test_simple_protocol_never_delivers_the_canary_and_quarantines(
    quarantining: ProxyProcess,
) -> None:
    p = quarantining
    with _raw(p, "eve") as c:
        c.send(Query(AROUND_CANARY).encode())
        msgs = c.read_until_ready()
        ids, err = _rows_and_error(msgs)
        assert ids == [b"330", b"331", b"332"]  # cut at the canary row, as a row limit cuts
        assert err is not None and err.sqlstate == "42501"
        assert err.message.startswith("pgwarden: blocked by rule canary-customers:")
        assert "canary" in err.message
        assert msgs[-1] == ("Z", b"I")
        # The rule's action is in force for the very next statement.
        c.send(Query("SELECT 1").encode())
        _ids, after = _rows_and_error(c.read_until_ready())
        assert after is not None and after.sqlstate == "42501"
        assert "eve is quarantined" in after.message
    with _raw(p, "alice") as c:  # another agent on the same account is not affected
        c.send(Query("SELECT email FROM customers WHERE customer_id = 7").encode())
        ids, err = _rows_and_error(c.read_until_ready())
        assert err is None and len(ids) == 1
    p.stop()
    audit = sqlite3.connect(p.workdir.parent / "audit.db")
    audit.row_factory = sqlite3.Row
    rows = [dict(r) for r in audit.execute("SELECT * FROM events ORDER BY id")]
    (refused,) = [
        r for r in rows
        if r["kind"] == "statement" and r["end_user"] == "eve" and "BETWEEN" in r["statement"]
    ]  # fmt: skip
    assert refused["sqlstate"] == "42501" and refused["rows"] == 3
    assert "canary-customers" in json.loads(refused["rule_ids"])
    alerts = [r for r in rows if r["kind"] == "alert"]
    assert any(
        a["verdict"] == "canary" and "eve was refused a result holding a canary" in a["message"]
        for a in alerts
    ), alerts
    assert any(a["verdict"] == "quarantine" and "eve" in a["message"] for a in alerts), alerts


def test_extended_protocol_never_delivers_the_canary(blocking: ProxyProcess) -> None:
    with _raw(blocking, "eve") as c:
        sql = "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN $1 AND $2 ORDER BY 1"
        c.send(
            Parse("", sql).encode(),
            Bind("", "", params=(b"330", b"336")).encode(),
            Describe("P", "").encode(),
            Execute("", 0).encode(),
            Sync().encode(),
        )
        ids, err = _rows_and_error(c.read_until_ready())
        assert ids == [b"330", b"331", b"332"]
        assert err is not None and err.sqlstate == "42501" and "canary-customers" in err.message
        # Action 'block': no quarantine, the session goes on.
        c.send(Query("SELECT email FROM customers WHERE customer_id = 7").encode())
        ids, err = _rows_and_error(c.read_until_ready())
        assert err is None and len(ids) == 1


def test_psycopg_extended_protocol_gets_an_error_and_the_session_goes_on(
    blocking: ProxyProcess,
) -> None:
    with psycopg.connect(_dsn(blocking), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'eve'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="canary") as info:
            conn.execute(
                "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN %s AND %s",
                (330, 336),
            ).fetchall()
        assert info.value.sqlstate == "42501"
        row = conn.execute("SELECT email FROM customers WHERE customer_id = %s", (7,)).fetchone()
        assert row == ("customer7@mail.example",)


def test_a_server_side_cursor_is_cut_at_the_fetch_that_holds_the_canary(
    blocking: ProxyProcess,
) -> None:
    with psycopg.connect(_dsn(blocking)) as conn:
        conn.execute("SET pgwarden.end_user = 'eve'")
        got: list[tuple[int, str]] = []
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="canary"):
            with conn.cursor(name="sweep") as cur:
                cur.itersize = 2
                cur.execute(
                    "SELECT customer_id, email FROM customers WHERE customer_id > 325 ORDER BY 1"
                )
                for row in cur:
                    got.append(row)
        assert [r[0] for r in got] == [326, 327, 328, 329, 330, 331]
        assert all(CANARY.decode() not in r[1] for r in got)
        conn.rollback()  # the transaction failed, as for any error
        assert conn.execute("SELECT email FROM customers WHERE customer_id = 7").fetchone() == (
            "customer7@mail.example",
        )


def test_copy_output_is_cut_before_the_canary(pg: Cluster, enforce_db: str, tmp_path: Path) -> None:
    # Agents may not COPY labelled data at all; a subject allowed to (within a row limit)
    # still never receives the canary's line.
    policy = {
        "subjects": {"analytics": {"users": ["analyst"]}},
        "rules": [
            {"id": "analytics-rows", "subjects": ["analytics"], "labels": ["pii.*"],
             "max_rows": 100},
            {"id": "canary", "subjects": ["analytics"], "action": "block",
             "canary": {"values": [CANARY.decode()]}},
        ],
    }  # fmt: skip
    p = start_with_policy(pg, tmp_path, policy)
    try:
        with RawClient(p.host, p.port) as c:
            c.startup(user="analyst", database=DB)
            c.send(Query(
                "COPY (SELECT customer_id, email FROM customers WHERE customer_id "
                "BETWEEN 320 AND 332 ORDER BY 1) TO STDOUT"
            ).encode())  # fmt: skip
            msgs = c.read_until_ready()
            assert not [b for t, b in msgs if t == "E"]  # no canary in it: nothing refused
            c.send(Query(
                "COPY (SELECT customer_id, email FROM customers WHERE customer_id "
                "BETWEEN 330 AND 336 ORDER BY 1) TO STDOUT"
            ).encode())  # fmt: skip
            msgs = c.read_until_ready()
            data = b"".join(b for t, b in msgs if t == "d")
            assert CANARY not in data
            assert data.splitlines()[-1].startswith(b"332\t")
            (err,) = [ErrorResponse.decode(b) for t, b in msgs if t == "E"]
            assert err.sqlstate == "42501" and "rule canary:" in err.message
            c.send(Query("SELECT 1").encode())
            assert c.read_until_ready()[-1] == ("Z", b"I")
    finally:
        assert p.stop() == 0


def test_psycopg_simple_protocol_gets_an_error_and_the_session_goes_on(
    blocking: ProxyProcess,
) -> None:
    with psycopg.connect(
        _dsn(blocking), autocommit=True, cursor_factory=psycopg.ClientCursor
    ) as conn:
        conn.execute("SET pgwarden.end_user = 'eve'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="canary") as info:
            conn.execute(AROUND_CANARY).fetchall()
        assert info.value.sqlstate == "42501"
        assert conn.execute("SELECT email FROM customers WHERE customer_id = 7").fetchone() == (
            "customer7@mail.example",
        )


def test_a_canary_key_is_cut_like_a_canary_value(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    policy = {
        "subjects": {"agents": {"users": ["support_app"]}},
        "rules": [
            {"id": "rows", "subjects": ["agents"], "labels": ["pii.*"], "max_rows": 20},
            {"id": "canary-key", "subjects": ["agents"], "action": "block",
             "canary": {"table": "public.customers", "keys": ["331"]}},
        ],
    }  # fmt: skip
    p = start_with_policy(pg, tmp_path, policy)
    try:
        with RawClient(p.host, p.port) as c:
            c.startup(user="support_app", database=DB)
            c.send(
                Query(AROUND_CANARY.replace("customer_id, email", "customer_id, phone")).encode()
            )
            msgs = c.read_until_ready()
            ids = [DataRow.decode(b).values[0] for t, b in msgs if t == "D"]
            assert ids == [b"330"]
            (err,) = [ErrorResponse.decode(b) for t, b in msgs if t == "E"]
            assert err.sqlstate == "42501" and "rule canary-key:" in err.message
            c.send(Query("SELECT phone FROM customers WHERE customer_id = 7").encode())
            assert [t for t, _ in c.read_until_ready()] == ["T", "D", "C", "Z"]
    finally:
        assert p.stop() == 0
