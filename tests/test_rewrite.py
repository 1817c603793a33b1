"""policy.rewrite: which statements get the protected key appended, and exactly how."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from policy.lineage.builtin import BUILTIN_AGGREGATES
from policy.rewrite import KeyRef, NotRewritten, append_keys

KEY = KeyRef("public", "customers", "customer_id")
ADDED = ', "c"."customer_id" AS "pgwarden_key" '


def add(sql: str, index: int = 0) -> str | NotRewritten:
    return append_keys(sql, ((index, (KEY,)),), BUILTIN_AGGREGATES)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "SELECT t.ticket_number, c.full_name, c.email, c.phone FROM tickets t JOIN customers"
            " c ON c.customer_id = t.customer_id WHERE t.ticket_number = $1",
            "SELECT t.ticket_number, c.full_name, c.email, c.phone " + ADDED + "FROM tickets t"
            " JOIN customers c ON c.customer_id = t.customer_id WHERE t.ticket_number = $1",
        ),
        # Comments stay where they were (the end user is read from the client's text, and
        # the server's logs and pg_stat_statements see the tool's own comment).
        (
            "/* app */ SELECT c.email /* é */\nFROM customers c WHERE c.tier = 'vip' "
            "/* end_user='alice' */",
            "/* app */ SELECT c.email /* é */\n" + ADDED + "FROM customers c WHERE "
            "c.tier = 'vip' /* end_user='alice' */",
        ),
        # FROM inside an expression is not the end of the select list.
        (
            "SELECT c.email IS DISTINCT FROM 'x', extract(year FROM c.created_at), "
            "(SELECT max(1) FROM tickets) FROM customers c WHERE c.customer_id = 1",
            "SELECT c.email IS DISTINCT FROM 'x', extract(year FROM c.created_at), "
            "(SELECT max(1) FROM tickets) " + ADDED + "FROM customers c WHERE c.customer_id = 1",
        ),
        # ORDER BY a position still sorts by the client's column; * gains a duplicate.
        (
            "SELECT * FROM customers c ORDER BY 2 LIMIT 5 OFFSET 5 FOR UPDATE",
            "SELECT * " + ADDED + "FROM customers c ORDER BY 2 LIMIT 5 OFFSET 5 FOR UPDATE",
        ),
        # No alias: the table's own name; schema-qualified.
        (
            "SELECT email FROM public.customers WHERE customer_id = 1",
            'SELECT email , "customers"."customer_id" AS "pgwarden_key" FROM public.customers '
            "WHERE customer_id = 1",
        ),
        # Through joins, USING, LATERAL, and a subquery elsewhere that does not name it.
        (
            'SELECT m.body, "C".email FROM tickets t JOIN "Customers" x ON true '
            'LEFT JOIN customers AS "C" USING (customer_id), LATERAL (SELECT body FROM '
            "messages WHERE ticket_id = t.ticket_id) m WHERE t.status IN (SELECT 'open')",
            'SELECT m.body, "C".email , "C"."customer_id" AS "pgwarden_key" FROM tickets t '
            'JOIN "Customers" x ON true LEFT JOIN customers AS "C" USING (customer_id), '
            "LATERAL (SELECT body FROM messages WHERE ticket_id = t.ticket_id) m "
            "WHERE t.status IN (SELECT 'open')",
        ),
        ("(SELECT c.email FROM customers c)", "(SELECT c.email " + ADDED + "FROM customers c)"),
        # A WITH query that does not read the table.
        (
            "WITH mine AS (SELECT customer_id FROM tickets WHERE ticket_number = $1) "
            "SELECT c.full_name FROM customers c JOIN mine USING (customer_id)",
            "WITH mine AS (SELECT customer_id FROM tickets WHERE ticket_number = $1) "
            "SELECT c.full_name " + ADDED + "FROM customers c JOIN mine USING (customer_id)",
        ),
    ],
)
def test_appends_the_key_at_the_end_of_the_select_list(sql: str, expected: str) -> None:
    assert add(sql) == expected
    parse_sql(expected)  # still SQL


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT email FROM customers UNION SELECT email FROM customers", "set operation"),
        ("SELECT DISTINCT email FROM customers", "DISTINCT"),
        ("SELECT DISTINCT ON (tier) email FROM customers", "DISTINCT"),
        ("SELECT tier, max(email) FROM customers GROUP BY tier", "GROUP BY"),
        ("SELECT count(*) FROM customers", "aggregate"),
        ("SELECT max(email) FROM customers", "aggregate"),
        ("SELECT email FROM customers ORDER BY count(*)", "aggregate"),
        ("SELECT email, row_number() OVER () FROM customers", "window"),
        ("SELECT email, rank() OVER w FROM customers WINDOW w AS ()", "WINDOW"),
        ("WITH customers AS (SELECT 1) SELECT email FROM customers", "WITH query is named"),
        (
            "WITH x AS (SELECT customer_id FROM customers) SELECT c.email FROM customers c",
            "named 2 times",
        ),
        ("SELECT email INTO mine FROM customers", "INTO"),
        ("SELECT x.email FROM (SELECT * FROM customers) x", "not a table of its top-level"),
        ("SELECT email FROM (tickets JOIN customers USING (customer_id)) j", "aliased join"),
        ("SELECT a.email FROM customers a JOIN customers b ON true", "named 2 times"),
        (
            "SELECT email FROM customers WHERE customer_id IN (SELECT customer_id FROM customers)",
            "named 2 times",
        ),
        ("SELECT email FROM other.customers", "is not public.customers"),
        ("SELECT c.e FROM customers c(id, n, e)", "renames the columns"),
        ("SELECT email FROM customers TABLESAMPLE SYSTEM (1)", "not a table of its top-level"),
        ("SELECT email FROM tickets", "named 0 times"),
        ("SELECT FROM customers", "no select list"),
        ("VALUES (1)", "VALUES list"),
        ("UPDATE customers SET tier = 'x' RETURNING email", "only a plain SELECT"),
        ("SELECT email FROM", "cannot be parsed"),
    ],
)
def test_refuses_statements_it_cannot_rewrite_soundly(sql: str, reason: str) -> None:
    out = add(sql)
    assert isinstance(out, NotRewritten) and reason in out.reason, out


def test_statements_of_a_string_are_addressed_by_their_number() -> None:
    sql = "BEGIN; SELECT c.email FROM customers c; SELECT c.phone FROM customers c; COMMIT"
    assert append_keys(sql, ((1, (KEY,)), (2, (KEY,))), BUILTIN_AGGREGATES) == (
        "BEGIN; SELECT c.email " + ADDED + "FROM customers c; SELECT c.phone " + ADDED
        + "FROM customers c; COMMIT"
    )  # fmt: skip
    assert isinstance(append_keys(sql, ((4, (KEY,)),), BUILTIN_AGGREGATES), NotRewritten)


def test_several_keys_get_distinct_names() -> None:
    other = KeyRef("public", "agents", "agent_id")
    sql = "SELECT c.email, a.email FROM customers c JOIN agents a ON true"
    assert append_keys(sql, ((0, (KEY, other)),), BUILTIN_AGGREGATES) == (
        'SELECT c.email, a.email , "c"."customer_id" AS "pgwarden_key", "a"."agent_id" AS '
        '"pgwarden_key_2" FROM customers c JOIN agents a ON true'
    )
