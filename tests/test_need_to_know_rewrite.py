"""Need-to-know for the support tool's own statements, which select a customer's contact
data but not ``customer_id``: pgwarden adds the key to the statement it sends and removes
it before the client sees the result (proxy.keyfetch, policy.rewrite).

Data (tests/support_data.py): ticket i is customer i's, assigned to agent (1 + i % 3), so
agent1 may see customers 3, 6, 9, ... and not 4.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
import psycopg
import pytest
import yaml

from proxy.messages.backend import CommandComplete, DataRow, ErrorResponse, RowDescription
from proxy.messages.frontend import Bind, Describe, Execute, Parse, Query, Sync
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess, RawClient
from tests.support_data import DB
from tests.test_need_to_know import LOOKUP

# The support tool's statement, as psycopg and as asyncpg write it.
JOIN = (
    "SELECT t.ticket_number, c.full_name, c.email, c.phone FROM tickets t "
    "JOIN customers c ON c.customer_id = t.customer_id WHERE t.ticket_number = %s"
)
JOIN_PG = JOIN.replace("%s", "$1")
COLUMNS = ["ticket_number", "full_name", "email", "phone"]
OWN = ("TM-0000003", "Customer 3", "customer3@mail.example", "+44200000003")
OTHERS = "TM-0000004"  # customer 4: agent2's ticket


def start(pg: Cluster, tmp_path: Path, on_violation: str) -> ProxyProcess:
    policy = {
        "subjects": {
            "agents": {"users": ["support_app"], "end_user_from": ["comment", "set"]},
        },
        "rules": [
            {
                "id": "their-customers",
                "subjects": ["agents"],
                "need_to_know": {
                    "table": "public.customers", "key_column": "customer_id",
                    "lookup": LOOKUP, "on_violation": on_violation, "cache_seconds": 5,
                },
            }
        ],
    }  # fmt: skip
    path = tmp_path / f"{on_violation}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return ProxyProcess(
        pg, tmp_path / on_violation, ["--policy", str(path), "--catalog-user", "postgres"]
    )


def agent(p: ProxyProcess, name: str, **kw: object) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(
        p.pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable"),
        autocommit=True,
        **kw,  # type: ignore[arg-type]
    )
    conn.execute(f"SET pgwarden.end_user = '{name}'")
    return conn


def names(cur: psycopg.Cursor[tuple[object, ...]]) -> list[str]:
    assert cur.description is not None
    return [d.name for d in cur.description]


def test_withhold_through_psycopg_simple_extended_and_prepared(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    p = start(pg, tmp_path, "withhold")
    try:
        with agent(p, "agent1") as conn:
            # Simple protocol (client-side binding sends one Query).
            simple = psycopg.ClientCursor(conn)
            simple.execute(JOIN, (OWN[0],))
            assert simple.fetchall() == [OWN] and names(simple) == COLUMNS
            simple.execute(JOIN, (OTHERS,))
            assert simple.fetchall() == [] and simple.rowcount == 0
            # Extended protocol, unnamed statement.
            cur = conn.execute(JOIN, (OWN[0],), prepare=False)
            assert cur.fetchall() == [OWN] and names(cur) == COLUMNS
            cur = conn.execute(JOIN, (OTHERS,), prepare=False)
            assert cur.fetchall() == [] and cur.rowcount == 0
            # Binary results: one format code for every column.
            cur = conn.execute(JOIN, (OWN[0],), binary=True)
            assert cur.fetchall() == [OWN] and names(cur) == COLUMNS
            # Run often enough that psycopg prepares it server-side (after 5 runs).
            for i in range(8):
                number = OWN[0] if i % 2 == 0 else OTHERS
                cur = conn.execute(JOIN, (number,))
                assert cur.fetchall() == ([OWN] if i % 2 == 0 else [])
                assert names(cur) == COLUMNS
            # The server holds the statement as pgwarden sent it: with the key.
            prepared = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
            assert any("pgwarden_key" in str(r[0]) for r in prepared), prepared
            # Several rows, some withheld: the tag counts what the client got; ORDER BY a
            # position still sorts by the column the client meant; SELECT * gets exactly
            # the table's columns.
            cur = conn.execute(
                "SELECT c.email, t.ticket_number FROM tickets t JOIN customers c"
                " USING (customer_id) WHERE t.ticket_id <= 9 ORDER BY 2 DESC"
            )
            assert cur.fetchall() == [
                (f"customer{i}@mail.example", f"TM-000000{i}") for i in (9, 6, 3)
            ]
            assert cur.rowcount == 3 and names(cur) == ["email", "ticket_number"]
            star = "SELECT * FROM tickets t JOIN customers c USING (customer_id) WHERE t.ticket_id IN (3, 4)"
            cur = conn.execute(star)
            rows = cur.fetchall()
            with psycopg.connect(pg.dsn(dbname=DB)) as direct:
                want = direct.execute(star + " AND t.ticket_id = 3")
                assert rows == want.fetchall() and names(cur) == names(want)
            # A sqlcommenter comment names the end user and stays in the statement.
            conn.execute("SET pgwarden.end_user = 'agent2'")  # the session's: agent2 ...
            cur = conn.execute(
                "SELECT c.email FROM customers c WHERE c.customer_id IN (3, 4)"
                " /* end_user='agent1' */"  # ... but this statement is agent1's
            )
            assert cur.fetchall() == [("customer3@mail.example",)]
            cur = conn.execute("SELECT c.email FROM customers c WHERE c.customer_id IN (3, 4)")
            assert cur.fetchall() == [("customer4@mail.example",)]
    finally:
        assert p.stop() == 0


def test_mask_and_block_for_the_support_join(pg: Cluster, enforce_db: str, tmp_path: Path) -> None:
    p = start(pg, tmp_path, "mask")
    try:
        with agent(p, "agent1") as conn:
            assert conn.execute(JOIN, (OWN[0],)).fetchall() == [OWN]
            cur = conn.execute(JOIN, (OTHERS,))
            row = cur.fetchone()
            assert names(cur) == COLUMNS
            assert row is not None and len(row) == 4
            assert row[1:] == ("****", "****", "****")
            simple = psycopg.ClientCursor(conn)
            simple.execute(JOIN, (OTHERS,))
            assert simple.fetchall() == [row]
    finally:
        assert p.stop() == 0
    p = start(pg, tmp_path, "block")
    try:
        with agent(p, "agent1") as conn:
            assert conn.execute(JOIN, (OWN[0],)).fetchall() == [OWN]
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege, match="outside what you need to know"
            ):
                conn.execute(JOIN, (OTHERS,)).fetchall()
            simple = psycopg.ClientCursor(conn)
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege, match="outside what you need to know"
            ):
                simple.execute(JOIN, (OTHERS,))
            assert conn.execute(JOIN, (OWN[0],)).fetchall() == [OWN]
            # Statements the key cannot soundly be added to are refused as before, saying why.
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege,
                match=r"does not carry public\.customers\.customer_id and pgwarden cannot add "
                r"it: the statement has DISTINCT",
            ):
                conn.execute(
                    "SELECT DISTINCT email FROM customers WHERE customer_id = 3"
                ).fetchall()
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        assert p.stop() == 0


def test_asyncpg_fetch_and_prepared_statements(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    p = start(pg, tmp_path, "withhold")

    async def run() -> None:
        conn = await asyncpg.connect(
            host=p.host, port=p.port, user="support_app", database=DB, ssl=False
        )
        try:
            await conn.execute("SET pgwarden.end_user = 'agent1'")
            rows = await conn.fetch(JOIN_PG, OWN[0])
            assert [tuple(r) for r in rows] == [OWN] and list(rows[0].keys()) == COLUMNS
            assert await conn.fetch(JOIN_PG, OTHERS) == []
            stmt = await conn.prepare(JOIN_PG)
            assert [a.name for a in stmt.get_attributes()] == COLUMNS
            for _ in range(3):
                assert [tuple(r) for r in await stmt.fetch(OWN[0])] == [OWN]
                assert await stmt.fetch(OTHERS) == []
            # Integers come back in binary: the key is checked, the client's columns intact.
            stmt = await conn.prepare(
                "SELECT t.ticket_id, c.email FROM tickets t JOIN customers c"
                " ON c.customer_id = t.customer_id WHERE t.ticket_id = ANY($1::int[])"
                " ORDER BY 1"
            )
            rows = await stmt.fetch([3, 4, 6])
            assert [tuple(r) for r in rows] == [
                (3, "customer3@mail.example"), (6, "customer6@mail.example"),
            ]  # fmt: skip
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    finally:
        assert p.stop() == 0


def test_raw_pipeline_with_per_column_result_formats(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    p = start(pg, tmp_path, "withhold")
    try:
        with RawClient(p.host, p.port) as c:
            c.startup(user="support_app", database=DB)
            c.send(Query("SET pgwarden.end_user = 'agent1'").encode())
            c.read_until_ready()
            stmt = (
                "SELECT t.ticket_id, c.email, c.phone FROM tickets t JOIN customers c"
                " ON c.customer_id = t.customer_id WHERE t.ticket_id = $1::int"
            )
            c.send(
                Parse("s1", stmt).encode(),
                Describe("S", "s1").encode(),
                # Three result columns, three codes: the server needs four.
                Bind("", "s1", (), (b"3",), (1, 0, 1)).encode(),
                Execute("").encode(),
                Bind("", "s1", (), (b"4",), (0, 1, 0)).encode(),
                Execute("").encode(),
                Bind("p2", "s1", (), (b"6",), (0, 1, 1)).encode(),
                Describe("P", "p2").encode(),
                Execute("p2").encode(),
                Parse("", JOIN_PG).encode(),
                Bind("", "", (), (b"TM-0000009",), (1, 1, 0, 0)).encode(),
                Describe("P", "").encode(),
                Execute("", 1).encode(),
                Sync().encode(),
            )
            msgs = c.read_until_ready()
        assert "E" not in [t for t, _ in msgs], [
            ErrorResponse.decode(b) for t, b in msgs if t == "E"
        ]
        shown = [
            (t, [(f.name, f.format) for f in RowDescription.decode(b).fields]) if t == "T"
            else (t, DataRow.decode(b).values) if t == "D"
            else (t, CommandComplete.decode(b).tag) if t == "C"
            else t
            for t, b in msgs
        ]  # fmt: skip
        assert shown == [
            "1", "t",
            ("T", [("ticket_id", 0), ("email", 0), ("phone", 0)]),  # a statement: text
            "2", ("D", ((3).to_bytes(8, "big"), b"customer3@mail.example", b"+44200000003")),
            ("C", "SELECT 1"),
            "2", ("C", "SELECT 0"),  # customer 4's row withheld
            "2", ("T", [("ticket_id", 0), ("email", 1), ("phone", 1)]),
            ("D", (b"6", b"customer6@mail.example", b"+44200000006")),
            ("C", "SELECT 1"),
            "1", "2", ("T", [(n, f) for n, f in zip(COLUMNS, (1, 1, 0, 0), strict=True)]),
            ("D", (b"TM-0000009", b"Customer 9", b"customer9@mail.example", b"+44200000009")),
            "s",  # PortalSuspended: max_rows 1 reached
            "Z",
        ]  # fmt: skip
    finally:
        assert p.stop() == 0


def test_strings_of_several_statements_locks_and_leading_comments(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    p = start(pg, tmp_path, "withhold")
    try:
        with agent(p, "agent1") as conn:
            simple = psycopg.ClientCursor(conn)
            # One Query, four statements: each SELECT has its own key added and removed.
            simple.execute(
                "BEGIN; SELECT c.email FROM customers c WHERE c.customer_id IN (3, 4) ORDER BY 1;"
                " SELECT c.phone, t.status FROM tickets t JOIN customers c USING (customer_id)"
                " WHERE t.ticket_id IN (4, 6) FOR UPDATE OF t; COMMIT"
            )
            results = []
            while True:
                if simple.description is not None:
                    results.append((names(simple), simple.fetchall(), simple.rowcount))
                if not simple.nextset():
                    break
            assert results == [
                (["email"], [("customer3@mail.example",)], 1),
                (["phone", "status"], [("+44200000006", "open")], 1),
            ]
            # Leading sqlcommenter comments of different lengths, one statement each.
            for who, expected in (("agent2", "customer4@mail.example"), ("a1", None)):
                cur = conn.execute(
                    f"/* end_user='{who}' */ SELECT c.email FROM customers c"
                    " WHERE c.customer_id IN (3, 4)"
                )
                assert cur.fetchall() == ([(expected,)] if expected else [])
    finally:
        assert p.stop() == 0


def test_psql(pg: Cluster, enforce_db: str, tmp_path: Path) -> None:
    p = start(pg, tmp_path, "withhold")
    try:
        literal = JOIN.replace("%s", "'{}'")

        def psql(*commands: str) -> str:
            args = ["psql", "-X", "-At", "-F", "|", "-h", p.host, "-p", str(p.port)]
            args += ["-U", "support_app", "-d", DB]
            for c in commands:
                args += ["-c", c]
            done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert psql("SET pgwarden.end_user = 'agent1'", literal.format(OWN[0])) == (
            "SET\n" + "|".join(OWN) + "\n"
        )
        assert psql("SET pgwarden.end_user = 'agent1'", literal.format(OTHERS)) == "SET\n"
        # One Query with a SET beside the SELECT; a sqlcommenter comment names the agent.
        both = f"SET application_name = 'desk'; {literal.format(OWN[0])} /* end_user='agent1' */"
        assert psql(both) == "SET\n" + "|".join(OWN) + "\n"
    finally:
        assert p.stop() == 0
