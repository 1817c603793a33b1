"""An agent's honest statements under need-to-know: what the support tool sends for the
agent's own ticket (agent1, ticket TM-0000003, customer 3), most of it selecting contact
data without ``customer_id``.  Before the key was added by pgwarden each such statement that
returned a row was refused; now every one of them is answered exactly as PostgreSQL answers
it, except the shapes the key cannot soundly be added to (``REFUSED``: the last three)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from proxy.sandbox.cluster import Cluster
from tests.support_data import DB
from tests.test_need_to_know_rewrite import agent, start

TICKET, TICKET_ID, CUSTOMER, EMAIL, PHONE, AGENT_ID = (
    "TM-0000003", 3, 3, "customer3@mail.example", "+44200000003", 1,
)  # fmt: skip

# (statement, parameters): one agent's normal work on their own ticket and customer.
HONEST: list[tuple[str, tuple[object, ...]]] = [
    ("SELECT t.ticket_number, c.full_name, c.email, c.phone FROM tickets t JOIN customers c"
     " ON c.customer_id = t.customer_id WHERE t.ticket_number = %s", (TICKET,)),
    ("SELECT c.full_name, c.email FROM customers c JOIN tickets t USING (customer_id)"
     " WHERE t.ticket_id = %s", (TICKET_ID,)),
    ("SELECT full_name, email, phone FROM customers WHERE customer_id = %s", (CUSTOMER,)),
    ("SELECT c.full_name, t.subject, t.status FROM tickets t JOIN customers c"
     " ON c.customer_id = t.customer_id WHERE t.assigned_agent_id = %s AND t.status <> 'closed'"
     " ORDER BY t.ticket_id LIMIT 10", (AGENT_ID,)),
    ("SELECT c.full_name, c.email FROM customers c WHERE c.email = %s", (EMAIL,)),
    ("SELECT c.full_name, c.phone FROM customers c WHERE c.phone = %s", (PHONE,)),
    ("SELECT t.ticket_number, t.subject FROM tickets t JOIN customers c USING (customer_id)"
     " WHERE c.email = %s", (EMAIL,)),
    ("SELECT c.full_name, c.street, c.city, c.postcode, c.country FROM customers c"
     " JOIN tickets t ON t.customer_id = c.customer_id WHERE t.ticket_number = %s", (TICKET,)),
    ("SELECT c.full_name || ' <' || c.email || '>' AS contact FROM customers c"
     " WHERE c.customer_id = %s", (CUSTOMER,)),
    ("SELECT upper(c.full_name), lower(c.email) FROM customers c WHERE c.customer_id = %s",
     (CUSTOMER,)),
    ("SELECT c.tier, c.country FROM customers c JOIN tickets t USING (customer_id)"
     " WHERE t.ticket_number = %s", (TICKET,)),
    ("SELECT m.body, m.created_at, c.full_name FROM ticket_messages m"
     " JOIN tickets t ON t.ticket_id = m.ticket_id JOIN customers c"
     " ON c.customer_id = t.customer_id WHERE t.ticket_number = %s ORDER BY m.created_at",
     (TICKET,)),
    ("SELECT c.email FROM tickets t, customers c WHERE c.customer_id = t.customer_id"
     " AND t.ticket_id = %s", (TICKET_ID,)),
    ("SELECT c.full_name, a.full_name AS agent FROM tickets t JOIN customers c"
     " USING (customer_id) LEFT JOIN agents a ON a.agent_id = t.assigned_agent_id"
     " WHERE t.ticket_number = %s", (TICKET,)),
    ("SELECT c.full_name, c.email FROM customers c WHERE EXISTS (SELECT 1 FROM tickets t"
     " WHERE t.customer_id = c.customer_id AND t.ticket_number = %s)", (TICKET,)),
    ("SELECT c.full_name, c.email FROM customers c WHERE c.customer_id ="
     " (SELECT customer_id FROM tickets WHERE ticket_number = %s)", (TICKET,)),
    ("SELECT c.email, c.phone FROM customers c WHERE c.customer_id = %s FOR UPDATE",
     (CUSTOMER,)),
    ("SELECT c.full_name, (SELECT count(*) FROM tickets t2 WHERE t2.customer_id ="
     " c.customer_id) AS tickets FROM customers c WHERE c.customer_id = %s", (CUSTOMER,)),
    ("SELECT c.full_name, c.email FROM customers c WHERE c.customer_id = %s LIMIT 1",
     (CUSTOMER,)),
    ("SELECT c.full_name, c.email, t.ticket_number FROM customers c JOIN tickets t"
     " USING (customer_id) WHERE t.assigned_agent_id = %s ORDER BY 3 LIMIT 5", (AGENT_ID,)),
    ('SELECT c.full_name AS "Customer", c.email AS "E-mail" FROM customers c'
     " WHERE c.customer_id = %s", (CUSTOMER,)),
    ("SELECT c.full_name, t.ticket_number FROM tickets t JOIN customers c USING"
     " (customer_id) WHERE t.ticket_number = ANY(%s)", ([TICKET, "TM-0000006"],)),
    ("SELECT c.customer_id, c.full_name, c.email FROM customers c JOIN tickets t"
     " USING (customer_id) WHERE t.ticket_number = %s", (TICKET,)),
    ("SELECT * FROM customers WHERE customer_id = %s", (CUSTOMER,)),
    ("SELECT t.ticket_number, t.subject, t.status FROM tickets t WHERE t.assigned_agent_id = %s"
     " ORDER BY 1 LIMIT 5", (AGENT_ID,)),
    ("WITH mine AS (SELECT customer_id FROM tickets WHERE ticket_number = %s)"
     " SELECT c.full_name FROM customers c JOIN mine USING (customer_id)", (TICKET,)),
    # Shapes the key cannot soundly be added to (an aggregate, DISTINCT, a view):
    ("SELECT count(*) FROM tickets t JOIN customers c USING (customer_id) WHERE c.email = %s",
     (EMAIL,)),
    ("SELECT DISTINCT c.country FROM customers c JOIN tickets t USING (customer_id)"
     " WHERE t.assigned_agent_id = %s", (AGENT_ID,)),
    ("SELECT cc.name, cc.email FROM reporting.customer_contacts cc WHERE cc.customer_id = %s",
     (CUSTOMER,)),
]  # fmt: skip
REFUSED = frozenset(range(len(HONEST) - 3, len(HONEST)))


def run(
    conn: psycopg.Connection[tuple[object, ...]], sql: str, params: tuple[object, ...]
) -> object:
    """The rows, or the refusal's SQLSTATE."""
    try:
        return conn.execute(sql, params).fetchall()
    except psycopg.errors.InsufficientPrivilege as exc:
        return exc.sqlstate


@pytest.mark.parametrize("protocol", ["extended", "simple"])
def test_an_agents_honest_statements_are_answered(
    pg: Cluster, enforce_db: str, tmp_path: Path, protocol: str
) -> None:
    pg.psql(
        "INSERT INTO ticket_messages VALUES (1, 3, 'customer', NULL, 'it broke', now()),"
        " (2, 3, 'agent', 1, 'try again', now()) ON CONFLICT DO NOTHING",
        database=DB,
    )
    p = start(pg, tmp_path, "block")
    try:
        with (
            agent(p, "agent1") as conn,
            psycopg.connect(pg.dsn(dbname=DB)) as direct,
        ):
            if protocol == "simple":
                conn.cursor_factory = psycopg.ClientCursor
            got = [run(conn, sql, params) for sql, params in HONEST]
            want = [direct.execute(sql, params).fetchall() for sql, params in HONEST]
        assert all(want), "every statement of the set returns rows"
        refused = {i for i, g in enumerate(got) if g == "42501"}
        assert refused == REFUSED, [HONEST[i][0] for i in sorted(refused ^ REFUSED)]
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if i not in REFUSED:
                assert g == w, HONEST[i][0]
    finally:
        assert p.stop() == 0
