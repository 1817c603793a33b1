"""Policy enforcement through the real proxy, with real clients, against a real PostgreSQL.

The proxy runs the shipped policy (config/policy.yaml): agents (user support_app) get at
most 20 labelled rows per statement and 200 distinct customers an hour; analytics (user
analyst) sees contact data masked; the DBA (postgres) is not limited.  Every test asserts
what the client actually received: exact row counts before the error, the SQLSTATE and
message, and that the session (and the server's transaction state) is still right.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import yaml

from proxy.messages.backend import DataRow, ErrorResponse
from proxy.messages.frontend import Bind, Execute, Parse, Query, Sync
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import (
    ProxyProcess,
    RawClient,
    audited_config,
    error_of,
    pgwarden_command,
)
from tests.support_data import CUSTOMERS, DB, POLICY


def start_proxy(pg: Cluster, workdir: Path, policy_path: Path = POLICY) -> ProxyProcess:
    return ProxyProcess(pg, workdir, ["--policy", str(policy_path), "--catalog-user", "postgres"])


@pytest.fixture
def proxy(pg: Cluster, enforce_db: str, tmp_path: Path) -> Iterator[ProxyProcess]:
    # A fresh proxy per test: window counters start empty.
    p = start_proxy(pg, tmp_path / "proxy")
    yield p
    assert p.stop() == 0, p.log()


def dsn(p: ProxyProcess, user: str, **extra: str) -> str:
    return p.pg.dsn(user=user, port=p.port, dbname=DB, sslmode="disable", **extra)


def raw_session(p: ProxyProcess, user: str) -> RawClient:
    c = RawClient(p.host, p.port)
    c.startup(user=user, database=DB)
    return c


def rows_and_error(msgs: list[tuple[str, bytes]]) -> tuple[int, ErrorResponse | None]:
    rows = sum(1 for t, _ in msgs if t == "D")
    errors = [ErrorResponse.decode(b) for t, b in msgs if t == "E"]
    assert len(errors) <= 1, msgs
    return rows, errors[0] if errors else None


LOOKUP_MANY = (
    "SELECT customer_id, full_name, email FROM customers WHERE customer_id <= 50 ORDER BY 1"
)


# --- per-statement limits on every protocol path ----------------------------------------------


def test_simple_query_gets_exactly_the_allowed_rows_then_a_clear_error(proxy: ProxyProcess) -> None:
    with raw_session(proxy, "support_app") as c:
        c.send(Query(LOOKUP_MANY).encode())
        msgs = c.read_until_ready()
        rows, err = rows_and_error(msgs)
        assert rows == 20
        assert err is not None and err.sqlstate == "42501"
        assert err.message.startswith("pgwarden: blocked by rule agent-statement-rows:")
        assert "20 rows" in (err.get("H") or "")
        assert msgs[-1] == ("Z", b"I")
        # The session stays usable.
        c.send(Query("SELECT 1").encode())
        assert [t for t, _ in c.read_until_ready()] == ["T", "D", "C", "Z"]
    assert proxy.metric("pgwarden_results_cut_total") >= 1


def test_a_result_within_the_limit_is_untouched(proxy: ProxyProcess) -> None:
    with psycopg.connect(dsn(proxy, "support_app")) as conn:
        rows = conn.execute(
            "SELECT customer_id, email FROM customers WHERE customer_id <= 20"
        ).fetchall()
    assert len(rows) == 20
    assert rows[0] == (1, "customer1@mail.example")


def test_extended_protocol_with_a_fetch_size_counts_across_executes(proxy: ProxyProcess) -> None:
    async def run() -> tuple[int, BaseException | None]:
        conn = await asyncpg.connect(
            proxy.pg.url(user="support_app", port=proxy.port).rsplit("/", 1)[0] + f"/{DB}"
        )
        got = 0
        try:
            async with conn.transaction():
                async for _ in conn.cursor(LOOKUP_MANY, prefetch=6):
                    got += 1
        except asyncpg.PostgresError as exc:
            assert await conn.fetchval("SELECT 2") == 2
            await conn.close()
            return got, exc
        await conn.close()
        return got, None

    got, exc = asyncio.run(run())
    assert got == 18  # 3 full fetches of 6; the 4th would pass 20 and is cut at the 21st row
    assert isinstance(exc, asyncpg.InsufficientPrivilegeError)
    assert "agent-statement-rows" in str(exc)


def test_raw_extended_execute_with_max_rows_stops_at_the_limit(proxy: ProxyProcess) -> None:
    with raw_session(proxy, "support_app") as c:
        c.send(Parse("", LOOKUP_MANY).encode(), Bind("p", "").encode())
        c.send(Execute("p", 15).encode(), Execute("p", 15).encode(), Sync().encode())
        msgs = c.read_until_ready()
        rows, err = rows_and_error(msgs)
        assert rows == 20
        assert [t for t, _ in msgs].count("s") == 1  # the first Execute was suspended normally
        assert err is not None and "agent-statement-rows" in err.message
        c.send(Query("SELECT 1").encode())
        assert c.read_until_ready()[-1] == ("Z", b"I")


class SlowToConnect:
    """A TCP forwarder to PostgreSQL that takes ``delay`` seconds to open each connection, as
    a busy or distant server does: pgwarden's cancel request for a cut-off statement then
    reaches PostgreSQL well after the statement has finished."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        time.sleep(self.delay)
        upstream = socket.create_connection(self.target)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def test_a_late_cancel_of_a_cut_off_statement_never_hits_the_next_one(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    # The cut-off result was complete before pgwarden's cancel reached PostgreSQL (0.5 s
    # later here): had the client's next statement been forwarded at once, the cancel would
    # have landed in it ("canceling statement due to user request").
    fwd = SlowToConnect((pg.host, pg.port), 0.5)
    p = ProxyProcess(pg, tmp_path / "proxy", [
        "--policy", str(POLICY), "--catalog-user", "postgres", "--upstream", f"127.0.0.1:{fwd.port}",
    ])  # fmt: skip
    try:
        with psycopg.connect(dsn(p, "support_app"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="agent-statement-rows"):
                conn.execute(LOOKUP_MANY)
            t0 = time.monotonic()
            assert conn.execute("SELECT pg_sleep(1), 7").fetchone() == ("", 7)
            assert time.monotonic() - t0 >= 1.0
            with conn.transaction():
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(LOOKUP_MANY)
            assert conn.execute("SELECT pg_sleep(1), 8").fetchone() == ("", 8)
    finally:
        assert p.stop() == 0, p.log()
        fwd.close()


def test_server_side_cursor_counts_across_fetches(proxy: ProxyProcess) -> None:
    got = 0
    with psycopg.connect(dsn(proxy, "support_app")) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="agent-statement-rows"):
            with conn.transaction(), conn.cursor(name="c") as cur:
                cur.itersize = 7
                cur.execute(LOOKUP_MANY)
                for _ in cur:
                    got += 1
        assert conn.execute("SELECT 3").fetchone() == (3,)
    assert got == 14  # FETCH 7, FETCH 7; the third FETCH would pass 20 and is refused


def test_sql_cursor_over_the_limit_aborts_the_transaction_as_postgresql_would(
    proxy: ProxyProcess,
) -> None:
    with raw_session(proxy, "support_app") as c:
        c.send(Query("BEGIN; DECLARE c CURSOR FOR " + LOOKUP_MANY).encode())
        assert c.read_until_ready()[-1] == ("Z", b"T")
        c.send(Query("FETCH 15 FROM c").encode())
        rows, err = rows_and_error(c.read_until_ready())
        assert (rows, err) == (15, None)
        c.send(Query("FETCH 15 FROM c").encode())
        msgs = c.read_until_ready()
        rows, err = rows_and_error(msgs)
        assert rows == 5 and err is not None and err.sqlstate == "42501"
        assert msgs[-1] == ("Z", b"E")
        c.send(Query("SELECT 1").encode())
        err = error_of(c.read_until_ready())
        assert err.sqlstate == "25P02"  # in_failed_sql_transaction, from PostgreSQL itself
        c.send(Query("ROLLBACK").encode())
        assert c.read_until_ready()[-1] == ("Z", b"I")


def test_cut_off_inside_a_transaction_rolls_back_the_transaction_on_the_server(
    proxy: ProxyProcess, pg: Cluster
) -> None:
    with raw_session(proxy, "support_app") as c:
        c.send(Query("BEGIN").encode())
        c.read_until_ready()
        c.send(Query("INSERT INTO products VALUES (77, 'Gadget', 'tools')").encode())
        c.read_until_ready()
        # 21 rows: the limit is passed by the very last row, when the server has finished:
        # the cancel comes too late, and pgwarden must make the transaction fail itself.
        c.send(Query("SELECT customer_id, email FROM customers WHERE customer_id <= 21").encode())
        msgs = c.read_until_ready()
        assert rows_and_error(msgs)[0] == 20
        assert msgs[-1] == ("Z", b"E")
        c.send(Query("COMMIT").encode())
        msgs = c.read_until_ready()
        assert ("C", b"ROLLBACK\x00") in msgs
    assert (
        pg.psql("SELECT count(*) FROM products WHERE product_id = 77", database=DB).strip() == "0"
    )


def test_pipeline_after_a_cut_off_fails_like_postgresql_fails_it(
    proxy: ProxyProcess, pg: Cluster
) -> None:
    with psycopg.connect(dsn(proxy, "support_app")) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            first = conn.execute("SELECT count(*) FROM products")
            conn.execute(LOOKUP_MANY)
            conn.execute("INSERT INTO products VALUES (78, 'Sprocket', 'tools')")
        assert first.fetchone() == (1,)
        # As after any error in a transaction: PostgreSQL says the transaction is aborted...
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 4")
        conn.rollback()
        assert conn.execute("SELECT 4").fetchone() == (4,)
    assert (
        pg.psql("SELECT count(*) FROM products WHERE product_id = 78", database=DB).strip() == "0"
    )


def test_a_statement_refused_before_execution_never_runs(proxy: ProxyProcess, pg: Cluster) -> None:
    with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("SELECT * FROM customers")
        assert "agent-statement-shapes" in str(err.value)
        assert "SELECT * or a whole-row read" in str(err.value)
        # A multi-statement string stops at the refused statement, and its implicit
        # transaction is rolled back, as for any error.
        with raw_session(proxy, "support_app") as c:
            c.send(
                Query(
                    "INSERT INTO products VALUES (79, 'Cog', 'tools'); SELECT email FROM customers"
                ).encode()
            )
            err2 = error_of(c.read_until_ready())
            assert err2.sqlstate == "42501" and "WHERE clause or a LIMIT" in err2.message
        assert conn.execute("SELECT 5").fetchone() == (5,)
    assert (
        pg.psql("SELECT count(*) FROM products WHERE product_id = 79", database=DB).strip() == "0"
    )


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        (
            "COPY (SELECT full_name, phone FROM customers WHERE tier = 'vip') TO STDOUT",
            "COPY ... TO",
        ),
        ("SELECT json_agg(email) FROM customers WHERE customer_id > 0", "json_agg() packs"),
        ("SELECT * FROM reporting.customer_contacts", "SELECT *"),
        ("SELECT c FROM customers c WHERE customer_id = 1", "whole-row"),
        ("DO $$ BEGIN PERFORM 1; END $$", "cannot be analysed"),
    ],
)
def test_bulk_shapes_are_refused_whatever_the_client(
    proxy: ProxyProcess, sql: str, why: str
) -> None:
    with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute(sql)
        assert why in str(err.value)
        assert conn.execute("SELECT 6").fetchone() == (6,)


def test_a_refused_statement_with_parameters_gets_the_refusal_not_a_protocol_error(
    proxy: ProxyProcess,
) -> None:
    # The substitute that raises the refusal takes no parameters: the client's Bind must not
    # hand it the refused statement's (PostgreSQL would fail the Bind with 08P01 instead).
    sql = "SELECT json_agg(email) FROM customers WHERE customer_id > %s"
    with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="json_agg"):
            conn.execute(sql, (0,))
        for _ in range(2):  # a named prepared statement, executed again: refused each time
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="json_agg"):
                conn.execute(sql, (0,), prepare=True)
        assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)


def test_asyncpg_gets_the_refusal_of_a_statement_with_parameters(proxy: ProxyProcess) -> None:
    """asyncpg describes a statement and checks the arguments against its parameters before
    it binds: the server must describe the client's statement, not pgwarden's refusal, or
    asyncpg raises InterfaceError ("expects 0 arguments") and the person never reads why."""

    async def run() -> list[object]:
        conn = await asyncpg.connect(
            host=proxy.host, port=proxy.port, user="support_app", database=DB, ssl=False
        )
        errors: list[object] = []
        try:
            for _ in range(2):
                try:
                    await conn.fetch(
                        "SELECT json_agg(email) FROM customers WHERE customer_id > $1", 0
                    )
                except Exception as exc:
                    errors.append(exc)
            stmt = await conn.prepare("SELECT c FROM customers c WHERE customer_id = $1")
            try:
                await stmt.fetch(1)
            except Exception as exc:
                errors.append(exc)
            assert await conn.fetchval("SELECT $1::int", 8) == 8
        finally:
            await conn.close()
        return errors

    errors = asyncio.run(run())
    assert len(errors) == 3
    for exc in errors:
        assert isinstance(exc, asyncpg.InsufficientPrivilegeError), repr(exc)
    assert "json_agg" in str(errors[0]) and "whole-row" in str(errors[2])


COPY_EMAIL_INTO_SUBJECT = (
    "UPDATE tickets t SET subject = c.email FROM customers c"
    " WHERE c.customer_id = t.customer_id AND t.ticket_id = 1"
)


def test_a_refused_or_rolled_back_copy_leaves_no_label_behind(proxy: ProxyProcess) -> None:
    # An agent's copy of emails into tickets is refused; the DBA's is rolled back. Neither
    # wrote anything, so tickets.subject is still not personal data for anyone.
    with psycopg.connect(dsn(proxy, "support_app")) as agent:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="copy"):
            agent.execute(COPY_EMAIL_INTO_SUBJECT)
        agent.rollback()
    with psycopg.connect(dsn(proxy, "postgres")) as dba:
        dba.execute(COPY_EMAIL_INTO_SUBJECT)
        dba.rollback()
    with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as agent:
        counts = agent.execute("SELECT status, count(*) FROM tickets GROUP BY status").fetchall()
        assert sum(n for _s, n in counts) == CUSTOMERS
        subjects = agent.execute("SELECT subject FROM tickets WHERE ticket_id <= 30").fetchall()
        assert len(subjects) == 30


def test_a_committed_copy_labels_the_column_it_wrote_and_only_that(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    # With an audit trail every session is followed, the DBA's too, so its copies count.
    proxy = ProxyProcess(pg, tmp_path / "audited", config=audited_config(tmp_path, POLICY))
    try:
        with psycopg.connect(dsn(proxy, "postgres")) as dba:
            dba.execute(COPY_EMAIL_INTO_SUBJECT)  # committed on leaving the block
        with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as agent:
            # tickets.subject now holds a customer's email: the row limit applies to it.
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="20 rows"):
                agent.execute("SELECT subject FROM tickets WHERE ticket_id <= 30").fetchall()
            # The other columns of tickets are what they were.
            counts = agent.execute("SELECT status, count(*) FROM tickets GROUP BY status")
            assert sum(n for _s, n in counts.fetchall()) == CUSTOMERS
        # The security team sees it: the admin endpoint, and policy explain against it.
        status, body = proxy.http_get("/taint")
        assert status == 200
        assert json.loads(body)[DB] == {"public.tickets": {"subject": ["pii.email"]}}
        explained = subprocess.run(
            [*pgwarden_command(), "policy", "explain", "--json", "--database", DB,
             "--admin", f"http://{proxy.host}:{proxy.admin_port}",
             "SELECT subject, status FROM tickets"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        (f,) = json.loads(explained.stdout)
        assert [c["labels"] for c in f["output"]] == [["pii.email"], []]
    finally:
        pg.psql("UPDATE tickets SET subject = 'help' WHERE ticket_id = 1", database=DB)
        assert proxy.stop() == 0, proxy.log()


def test_the_dba_is_not_limited(proxy: ProxyProcess) -> None:
    with psycopg.connect(dsn(proxy, "postgres")) as conn:
        assert len(conn.execute("SELECT * FROM customers").fetchall()) == CUSTOMERS


# --- windows: paging and trickling add up -------------------------------------------------------


def test_paging_with_offset_adds_up_to_the_hourly_limit_per_end_user(proxy: ProxyProcess) -> None:
    page = (
        "/* app='helpdesk',end_user='{who}' */ SELECT customer_id, email FROM customers "
        "WHERE customer_id > 0 ORDER BY customer_id LIMIT 20 OFFSET {off}"
    )
    seen = 0
    with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            for i in range(20):
                seen += len(conn.execute(page.format(who="mallory", off=i * 20)).fetchall())
        assert seen == 200  # exactly the hourly budget of distinct customers, then refused
        assert "agent-hourly-records" in str(err.value)
        # Another agent behind the same application account has their own budget.
        assert len(conn.execute(page.format(who="alice", off=0)).fetchall()) == 20


def test_the_hourly_budget_counts_customers_across_labels(proxy: ProxyProcess) -> None:
    # 200 customers' emails, then other customers' phones: the rule covers pii.*, so the
    # second read is over the same budget, not a fresh one per label.
    sql = (
        "/* end_user='oscar' */ SELECT customer_id, {col} FROM customers "
        "WHERE customer_id BETWEEN {lo} AND {hi}"
    )
    with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as conn:
        for lo in range(1, 201, 20):
            rows = conn.execute(sql.format(col="email", lo=lo, hi=lo + 19)).fetchall()
            assert len(rows) == 20
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="agent-hourly-records"):
            conn.execute(sql.format(col="phone", lo=201, hi=210)).fetchall()


def test_re_reading_the_same_customers_does_not_use_up_the_budget(proxy: ProxyProcess) -> None:
    sql = "SET pgwarden.end_user = 'bob'"
    with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as conn:
        conn.execute(sql)
        for _ in range(30):
            rows = conn.execute(
                "SELECT customer_id, phone FROM customers WHERE customer_id <= 10"
            ).fetchall()
            assert len(rows) == 10


# --- masking and canaries -------------------------------------------------------------------------


def test_analytics_sees_contact_data_masked(proxy: ProxyProcess) -> None:
    with psycopg.connect(dsn(proxy, "analyst")) as conn:
        row = conn.execute(
            "SELECT customer_id, email, phone, country FROM customers WHERE customer_id = 12"
        ).fetchone()
    assert row is not None
    assert row[0] == 12 and row[3] == "GB"
    assert row[1] == "c********2@mail.example"
    assert row[2] == "+**********2"


def test_masks_follow_lineage_into_expressions(proxy: ProxyProcess) -> None:
    # A partial mask keeps the first and last character and an email's domain: applied to
    # reverse(email) it would show the local part, and to a row constructor the phone.
    with psycopg.connect(dsn(proxy, "analyst")) as conn:
        row = conn.execute(
            "SELECT reverse(email), row(full_name, email, phone)::text, upper(email),"
            " customer_id FROM customers WHERE customer_id = 12"
        ).fetchone()
    assert row is not None
    assert row[:3] == ("****", "****", "****")
    assert row[3] == 12


def test_binary_results_of_masked_columns_are_refused(proxy: ProxyProcess) -> None:
    with psycopg.connect(dsn(proxy, "analyst")) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="binary format"):
            conn.cursor(binary=True).execute(
                "SELECT email FROM customers WHERE customer_id = 12"
            ).fetchall()


def test_copy_cannot_bypass_masks(proxy: ProxyProcess) -> None:
    # COPY output is not rewritten, so a COPY of columns the analyst sees masked is refused;
    # one of columns no mask touches still works.
    with psycopg.connect(dsn(proxy, "analyst"), autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unmasked") as info:
            with cur.copy(
                "COPY (SELECT customer_id, email FROM customers WHERE customer_id < 5) TO STDOUT"
            ) as copy:
                b"".join(bytes(chunk) for chunk in copy)
        assert "analytics-mask-contact" in str(info.value)
        with cur.copy(
            "COPY (SELECT customer_id, country FROM customers WHERE customer_id < 5) TO STDOUT"
        ) as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
        assert data.splitlines()[0] == b"1\tGB"
        assert len(data.splitlines()) == 4


def test_reading_a_canary_quarantines_the_agent(proxy: ProxyProcess) -> None:
    with psycopg.connect(dsn(proxy, "support_app"), autocommit=True) as conn:
        conn.execute("SET pgwarden.end_user = 'eve'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="canary"):
            # The read that touches the canary is cut off before the canary's row...
            conn.execute(
                "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN 330 AND 335"
            ).fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="quarantined"):
            conn.execute("SELECT email FROM customers WHERE customer_id = 1")  # ...then nothing
    assert "canary_read" in proxy.log()


# --- monitor mode -------------------------------------------------------------------------------------


def test_monitor_mode_records_but_never_blocks(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    policy = yaml.safe_load(POLICY.read_text())
    policy["mode"] = "monitor"
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump(policy))
    p = start_proxy(pg, tmp_path / "proxy", path)
    try:
        with psycopg.connect(dsn(p, "support_app")) as conn:
            assert len(conn.execute(LOOKUP_MANY).fetchall()) == 50
        assert p.metric("pgwarden_policy_alerts_total") >= 1
        assert p.metric("pgwarden_policy_blocks_total") == 0
    finally:
        assert p.stop() == 0


def test_cancel_still_works_for_a_watched_statement(proxy: ProxyProcess) -> None:
    with psycopg.connect(dsn(proxy, "support_app")) as conn:
        threading.Timer(0.5, conn.cancel_safe).start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT email, pg_sleep(10) FROM customers WHERE customer_id = 1")


def test_copy_rows_are_counted_for_a_row_limited_subject(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    policy = {
        "subjects": {"analytics": {"users": ["analyst"]}},
        "rules": [
            {"id": "analytics-rows", "subjects": ["analytics"], "labels": ["pii.*"], "max_rows": 25}
        ],
    }
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(policy))
    p = start_proxy(pg, tmp_path / "proxy", path)
    try:
        with raw_session(p, "analyst") as c:
            c.send(
                Query(
                    "COPY (SELECT email FROM customers WHERE customer_id <= 100) TO STDOUT"
                ).encode()
            )
            msgs = c.read_until_ready()
            lines = b"".join(b for t, b in msgs if t == "d").count(b"\n")
            assert lines == 25
            err = error_of(msgs)
            assert "analytics-rows" in err.message
            c.send(Query("SELECT 1").encode())
            assert c.read_until_ready()[-1] == ("Z", b"I")
    finally:
        assert p.stop() == 0


def test_datarow_values_reach_the_client_unchanged_when_nothing_is_masked(
    proxy: ProxyProcess,
) -> None:
    with raw_session(proxy, "support_app") as c:
        c.send(Query("SELECT email FROM customers WHERE customer_id = 7").encode())
        msgs = c.read_until_ready()
        (row,) = [DataRow.decode(b) for t, b in msgs if t == "D"]
        assert row.values == (b"customer7@mail.example",)


def test_policy_changes_apply_to_open_sessions_and_bad_files_are_refused(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.read_text())
    p = start_proxy(pg, tmp_path / "proxy", path)
    try:
        with raw_session(p, "support_app") as c:

            def rows_before_cut() -> int:
                c.send(Query(LOOKUP_MANY).encode())
                rows, err = rows_and_error(c.read_until_ready())
                assert err is not None and "agent-statement-rows" in err.message
                return rows

            assert rows_before_cut() == 20
            path.write_text(POLICY.read_text().replace("max_rows: 20", "max_rows: 5"))
            p.wait_for_log_event("policy_reloaded")
            assert rows_before_cut() == 5  # same connection, new policy
            path.write_text(POLICY.read_text().replace("max_rows: 20", "max_rows: many"))
            event = p.wait_for_log_event("policy_reload_failed")
            assert "max_rows" in event["error"]
            assert rows_before_cut() == 5  # the running policy stays
    finally:
        assert p.stop() == 0


def test_subjects_can_be_defined_by_role_membership(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    pg.psql(
        "DO $$ BEGIN CREATE ROLE support_agents NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;\n"
        "GRANT support_agents TO trust_user;\n",
        database="postgres",
    )
    pg.psql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO support_agents, md5_user;", database=DB)
    policy = {
        "subjects": {"agents": {"roles": ["support_agents"]}},
        "rules": [{"id": "agent-rows", "subjects": ["agents"], "labels": ["pii.*"], "max_rows": 5}],
    }
    path = tmp_path / "roles.yaml"
    path.write_text(yaml.safe_dump(policy))
    p = start_proxy(pg, tmp_path / "proxy", path)
    try:
        with raw_session(p, "trust_user") as c:  # a member, through GRANT
            c.send(Query(LOOKUP_MANY).encode())
            rows, err = rows_and_error(c.read_until_ready())
            assert rows == 5 and err is not None and "agent-rows" in err.message
        with psycopg.connect(
            p.pg.dsn(user="md5_user", port=p.port, dbname=DB, sslmode="disable")
        ) as conn:
            assert len(conn.execute(LOOKUP_MANY).fetchall()) == 50  # not a member: not limited
    finally:
        assert p.stop() == 0
