"""Need-to-know: an agent sees a customer only while one of that customer's tickets is theirs."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import yaml

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess
from tests.support_data import DB

LOOKUP = (
    "SELECT t.customer_id FROM tickets t JOIN agents a ON a.agent_id = t.assigned_agent_id "
    "WHERE a.username = $1 AND t.status <> 'closed'"
)


def start(
    pg: Cluster,
    tmp_path: Path,
    on_violation: str,
    *,
    table: str = "public.customers",
    writable: tuple[str, ...] = (),
    name: str | None = None,
) -> ProxyProcess:
    """A proxy whose one rule gives the agents need-to-know on ``table``'s customer_id."""
    rule: dict[str, object] = {
        "table": table, "key_column": "customer_id",
        "lookup": LOOKUP, "on_violation": on_violation, "cache_seconds": 5,
    }  # fmt: skip
    if writable:
        rule["writable"] = list(writable)
    policy = {
        "subjects": {"agents": {"users": ["support_app"], "end_user_from": ["set"]}},
        "rules": [{"id": "their-customers", "subjects": ["agents"], "need_to_know": rule}],
    }
    name = name or on_violation
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return ProxyProcess(pg, tmp_path / name, ["--policy", str(path), "--catalog-user", "postgres"])


def agent(p: ProxyProcess, name: str) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(
        p.pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable"), autocommit=True
    )
    conn.execute(f"SET pgwarden.end_user = '{name}'")
    return conn


def test_rows_outside_an_agents_tickets_are_withheld(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    p = start(pg, tmp_path, "withhold")
    try:
        # Ticket i belongs to customer i and is assigned to agent (1 + i % 3): agent1 has
        # the tickets of customers 3, 6, 9, ...
        with agent(p, "agent1") as conn:
            cur = conn.execute(
                "SELECT customer_id, email FROM customers WHERE customer_id <= 9 ORDER BY 1"
            )
            assert [r[0] for r in cur.fetchall()] == [3, 6, 9]
            assert cur.rowcount == 3  # the command tag counts what the client got
            # Binary format: the integer keys are compared as the lookup's text keys.
            cur = conn.execute(
                "SELECT customer_id, email FROM customers WHERE customer_id <= 9 ORDER BY 1",
                binary=True,
            )
            assert [r[0] for r in cur.fetchall()] == [3, 6, 9]
        with agent(p, "agent2") as conn:
            rows = conn.execute(
                "SELECT customer_id FROM customers WHERE customer_id <= 9 ORDER BY 1"
            ).fetchall()
            assert [r[0] for r in rows] == [1, 4, 7]
        with agent(p, "somebody") as conn:  # no tickets at all: no customers
            assert (
                conn.execute(
                    "SELECT customer_id, phone FROM customers WHERE customer_id < 50"
                ).fetchall()
                == []
            )
            # Tables the rule is not about are untouched.
            assert conn.execute("SELECT count(*) FROM products").fetchone() == (1,)
    finally:
        assert p.stop() == 0


def test_block_mode_refuses_and_a_result_without_the_key_cannot_be_checked(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    p = start(pg, tmp_path, "block")
    try:
        with agent(p, "agent1") as conn:
            assert conn.execute(
                "SELECT customer_id, email FROM customers WHERE customer_id = 3"
            ).fetchall()
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege, match="outside what you need to know"
            ):
                conn.execute(
                    "SELECT customer_id, email FROM customers WHERE customer_id = 4"
                ).fetchall()
            # A result without the key gets it added where that is sound
            # (tests/test_need_to_know_rewrite.py); where it is not, it is refused.
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege,
                match=r"does not carry public\.customers\.customer_id",
            ):
                conn.execute(
                    "SELECT email FROM customers WHERE customer_id = 3 UNION SELECT 'x'"
                ).fetchall()
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        assert p.stop() == 0


def test_mask_mode_passes_other_customers_rows_with_their_contact_data_masked(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    p = start(pg, tmp_path, "mask")
    try:
        with agent(p, "agent1") as conn:
            rows = conn.execute(
                "SELECT customer_id, email, phone, country FROM customers"
                " WHERE customer_id BETWEEN 3 AND 5 ORDER BY 1"
            ).fetchall()
            # Every row arrives; only customer 3 (a ticket of agent1's) is readable.  The
            # labelled columns of the others are masked, the unlabelled ones are not.
            assert rows == [
                (3, "customer3@mail.example", "+44200000003", "GB"),
                (4, "****", "****", "GB"),
                (5, "****", "****", "GB"),
            ]
            # Masking rewrites text; a binary-format result of a masked column is refused.
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="binary format"):
                conn.execute(
                    "SELECT customer_id, email FROM customers WHERE customer_id = 4", binary=True
                ).fetchall()
            # A row the agent may read needs no masking, so binary format is fine for it.
            assert conn.execute(
                "SELECT customer_id, email FROM customers WHERE customer_id = 3", binary=True
            ).fetchone() == (3, "customer3@mail.example")
    finally:
        assert p.stop() == 0


def test_an_agent_cannot_grant_itself_need_to_know(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    # The lookup reads tickets.assigned_agent_id, .customer_id and .status: an agent who
    # could write them would choose whom the rule lets them see. The policy lists status
    # as writable (closing and reopening a ticket is an agent's daily work).
    p = start(pg, tmp_path, "withhold", writable=("public.tickets.status",), name="writable")
    try:
        with agent(p, "agent1") as conn:
            for sql in (
                "UPDATE tickets SET assigned_agent_id = 1 WHERE ticket_id <= 30",
                "UPDATE tickets SET customer_id = 1 WHERE ticket_id = 3",
                "INSERT INTO tickets (ticket_id, ticket_number, customer_id, assigned_agent_id,"
                " subject) VALUES (90001, 'TM-X', 5, 1, 'mine')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql)
                assert "their-customers" in str(info.value), sql
                assert "decides who may see" in str(info.value), sql
            # Nothing was written: agent1 still sees only the customers of its tickets.
            rows = conn.execute(
                "SELECT customer_id FROM customers WHERE customer_id <= 9 ORDER BY 1"
            ).fetchall()
            assert [r[0] for r in rows] == [3, 6, 9]
            # A column the rule lists as writable is written as usual.
            conn.execute("UPDATE tickets SET status = status WHERE ticket_id = 3")
    finally:
        assert p.stop() == 0, p.log()


def test_a_key_that_is_not_the_primary_key_is_added_and_checked(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    # tickets.customer_id is not tickets' primary key (a customer has several tickets), yet
    # it names the customer each ticket row belongs to: pgwarden adds it, checks it and
    # removes it, so the agent's statement need not select it.
    p = start(pg, tmp_path, "withhold", table="public.tickets", name="tickets")
    try:
        with agent(p, "agent1") as conn:
            cur = conn.execute(
                "SELECT ticket_number, subject FROM tickets WHERE ticket_id <= 9 ORDER BY 1"
            )
            assert [d.name for d in cur.description] == ["ticket_number", "subject"]
            assert [r[0] for r in cur.fetchall()] == ["TM-0000003", "TM-0000006", "TM-0000009"]
    finally:
        assert p.stop() == 0, p.log()
