"""Real clients through the real proxy to a real PostgreSQL: psql, psycopg 3, asyncpg,
pgbench.  Whatever works directly must work the same way through pgwarden."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import threading
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors

from proxy.sandbox.cluster import ROLES, Cluster
from tests.proxyutil import ProxyProcess, wait_until

USERS = ["trust_user", "md5_user", "scram_user"]


def active_query(pg: Cluster, app: str, like: str) -> bool:
    out = pg.psql(
        f"select count(*) from pg_stat_activity where application_name = '{app}' "
        f"and state = 'active' and query like '{like}'"
    )
    return out.strip() != "0"


# --- 1. authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("user", USERS)
def test_psycopg_logs_in_by_each_method(proxy: ProxyProcess, user: str) -> None:
    with psycopg.connect(proxy.dsn(user=user)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)


@pytest.mark.parametrize("user", USERS)
def test_psql_logs_in_by_each_method(proxy: ProxyProcess, user: str) -> None:
    env = dict(os.environ, PGPASSWORD=ROLES[user][0] or "", PGSSLMODE="disable")
    out = subprocess.run(
        ["psql", "-X", "-At", "-h", proxy.host, "-p", str(proxy.port), "-U", user,
         "-d", "support", "-c", "select current_user"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == user


@pytest.mark.parametrize("user", ["md5_user", "scram_user"])
def test_wrong_password_gets_postgresqls_own_error(proxy: ProxyProcess, user: str) -> None:
    failures_before = proxy.metric("pgwarden_auth_failures_total")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(user=user, password="wrong"))

    async def asyncpg_login() -> None:
        await asyncpg.connect(
            host=proxy.host, port=proxy.port, user=user, password="wrong", database="support",
            ssl=False,
        )  # fmt: skip

    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        asyncio.run(asyncpg_login())
    assert info.value.sqlstate == "28P01"

    env = dict(os.environ, PGPASSWORD="wrong", PGSSLMODE="disable")
    out = subprocess.run(
        ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", user, "-d", "support",
         "-c", "select 1"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    assert f'password authentication failed for user "{user}"' in out.stderr
    # ... and the proxy keeps serving.
    with psycopg.connect(proxy.dsn(user=user)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert proxy.metric("pgwarden_auth_failures_total") == failures_before + 3


def test_protocol_version_negotiation_passes_through(proxy: ProxyProcess) -> None:
    # libpq 18 can ask for protocol 3.2; PostgreSQL 15 answers NegotiateProtocolVersion
    # and the session continues in 3.0.
    if psycopg.pq.version() < 180000:
        pytest.skip("max_protocol_version needs libpq 18")
    with psycopg.connect(proxy.dsn(max_protocol_version="latest")) as conn:
        assert conn.info.pgconn.protocol_version == 3
        assert conn.execute("select 'negotiated'").fetchone() == ("negotiated",)


# --- 2. psycopg 3 ---------------------------------------------------------------------------


def test_psycopg_simple_queries(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        cur = conn.execute("select 1, 'two', null::int")
        assert cur.fetchone() == (1, "two", None)
        cur = conn.cursor()
        cur.execute("select x, x * 2 from generate_series(1, 1000) x")
        rows = cur.fetchall()
        assert len(rows) == 1000 and rows[-1] == (1000, 2000)
        cur.execute("select %s::int + %s", [40, 2])
        assert cur.fetchone() == (42,)
        # Several statements in one simple Query: one result each.
        cur.execute(
            "create temp table t(x int); insert into t values (1), (2); select sum(x) from t"
        )
        assert cur.statusmessage == "CREATE TABLE"
        assert cur.nextset() and cur.rowcount == 2
        assert cur.nextset() and cur.fetchone() == (3,)
        assert not cur.nextset()


def test_notices_pass_through(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("do $$ begin raise notice 'ticket % escalated', 42; end $$")
        assert notices == ["ticket 42 escalated"]


def test_large_objects_through_the_function_call_protocol(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    # psql's \lo_import / \lo_export use libpq's lo_* calls: FunctionCall ('F') messages.
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(os.urandom(300_000))
    script = f"""\\lo_import {src}
\\set oid :LASTOID
\\lo_export :oid {dst}
\\lo_unlink :oid
"""
    out = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", proxy.dsn()],
        input=script, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert dst.read_bytes() == src.read_bytes()


def test_psycopg_pipeline_with_an_error_in_the_middle(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline() as p:
            c1 = conn.execute("select 1")
            c2 = conn.execute("select %s::int", [2])
            p.sync()
            assert c1.fetchone() == (1,)
            assert c2.fetchone() == (2,)

        with pytest.raises(errors.DivisionByZero), conn.pipeline():
            conn.execute("select 'before'")
            conn.execute("select 1 / (%s - 1)", [1])
            conn.execute("select 'after'")
        # The connection works after the aborted pipeline, in and out of pipeline mode.
        assert conn.execute("select 'still here'").fetchone() == ("still here",)
        with conn.pipeline():
            cur = conn.execute("select 4")
        assert cur.fetchone() == (4,)


def test_libpq_pipeline_results_after_an_error_are_aborted(proxy: ProxyProcess) -> None:
    # At libpq level, exactly: a result, the error, PIPELINE_ABORTED for every statement
    # after it up to the Sync, then the sync point; and the session is usable after.
    status = psycopg.pq.ExecStatus
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn
        pgconn.enter_pipeline_mode()
        for sql in (b"select 1", b"select 1 / ($1::int - 1)", b"select 3", b"select 4"):
            params = [b"1"] if b"$1" in sql else None
            pgconn.send_query_params(sql, params)
        pgconn.pipeline_sync()
        pgconn.send_query_params(b"select 'next'", None)
        pgconn.pipeline_sync()
        seen = []
        while len([s for s in seen if s == status.PIPELINE_SYNC]) < 2:
            res = pgconn.get_result()
            if res is None:
                continue
            seen.append(status(res.status))
            if res.status == status.FATAL_ERROR:
                assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"22012"
            if res.status == status.TUPLES_OK:
                assert res.ntuples == 1
        pgconn.exit_pipeline_mode()
        assert seen == [
            status.TUPLES_OK,
            status.FATAL_ERROR,
            status.PIPELINE_ABORTED,
            status.PIPELINE_ABORTED,
            status.PIPELINE_SYNC,
            status.TUPLES_OK,
            status.PIPELINE_SYNC,
        ]
        assert conn.execute("select 'usable'").fetchone() == ("usable",)


def test_psycopg_server_side_cursor(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        with conn.cursor(name="big") as cur:
            cur.itersize = 100
            cur.execute("select x from generate_series(1, 5000) x")
            total = count = 0
            for (x,) in cur:
                total += x
                count += 1
        assert (count, total) == (5000, 5000 * 5001 // 2)
        with conn.cursor(name="partial") as cur:
            cur.execute("select x from generate_series(1, 100) x")
            assert cur.fetchmany(3) == [(1,), (2,), (3,)]
            cur.scroll(10)
            assert cur.fetchone() == (14,)
        conn.commit()


def test_psycopg_error_inside_transaction(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("create temp table tx(x int)")
        conn.commit()
        conn.execute("insert into tx values (1)")
        with pytest.raises(errors.DivisionByZero):
            conn.execute("select 1/0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select count(*) from tx").fetchone() == (0,)


def test_parameter_status_passes_through(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(application_name="first"), autocommit=True) as conn:
        assert conn.info.parameter_status("application_name") == "first"
        conn.execute("set application_name = 'renamed mid-session'")
        assert conn.info.parameter_status("application_name") == "renamed mid-session"
        conn.execute("set datestyle = 'German'")
        assert conn.info.parameter_status("DateStyle") == "German, DMY"


def test_startup_options_take_effect(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn(options="'-c search_path=reporting'")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("show search_path").fetchone() == ("reporting",)
        # An unqualified view name resolves in the reporting schema.
        assert conn.execute("select count(*) from customer_contacts").fetchone() == (0,)


# --- 3. asyncpg -----------------------------------------------------------------------------


def test_asyncpg_prepared_statements_and_copy(proxy: ProxyProcess) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(proxy.url(), ssl=False)
        try:
            stmt = await conn.prepare("select $1::int + 1, $2::text")
            assert tuple(await stmt.fetchrow(41, "x")) == (42, "x")
            assert tuple(await stmt.fetchrow(1, None)) == (2, None)
            rows = await conn.fetch("select x from generate_series(1, $1) x", 500)
            assert [r["x"] for r in rows] == list(range(1, 501))

            # COPY out, then back in, then records in: the content must survive each way.
            await conn.execute(
                "create temp table src(id int, name text, note text);"
                "insert into src select x, 'name ' || x, case when x % 7 = 0 then null"
                " else repeat(E'tab\\there', x % 5) end from generate_series(1, 2000) x"
            )
            buf = io.BytesIO()
            await conn.copy_from_query("select * from src order by id", output=buf)
            assert buf.getvalue().count(b"\n") == 2000
            await conn.execute("create temp table dst(id int, name text, note text)")
            buf.seek(0)
            await conn.copy_to_table("dst", source=buf)
            records = [(i, f"rec {i}", None if i % 3 else "three") for i in range(1, 1001)]
            await conn.execute("create temp table recs(id int, name text, note text)")
            await conn.copy_records_to_table("recs", records=records)

            src = await conn.fetch("select * from src order by id")
            dst = await conn.fetch("select * from dst order by id")
            assert [tuple(r) for r in src] == [tuple(r) for r in dst]
            got = await conn.fetch("select * from recs order by id")
            assert [tuple(r) for r in got] == records
        finally:
            await conn.close()

    asyncio.run(run())


def test_asyncpg_cursor_fetches_in_portal_chunks(proxy: ProxyProcess) -> None:
    # asyncpg cursors Execute the portal with a row limit: PortalSuspended, then again.
    async def run() -> None:
        conn = await asyncpg.connect(proxy.url(), ssl=False)
        try:
            async with conn.transaction():
                got = [
                    r[0] async for r in conn.cursor("select generate_series(1, 1000)", prefetch=37)
                ]
                assert got == list(range(1, 1001))
                cur = await conn.cursor("select generate_series(1, 100)")
                assert [r[0] for r in await cur.fetch(5)] == [1, 2, 3, 4, 5]
                await cur.forward(10)
                assert await cur.fetchrow() is not None
        finally:
            await conn.close()

    asyncio.run(run())


def test_many_concurrent_sessions(proxy: ProxyProcess) -> None:
    async def one(i: int) -> int:
        conn = await asyncpg.connect(proxy.url(user="md5_user"), ssl=False)
        try:
            total = 0
            for j in range(20):
                total += await conn.fetchval("select $1::int + $2::int", i, j)
            return total
        finally:
            await conn.close()

    async def run() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(60)))

    assert asyncio.run(run()) == [20 * i + 190 for i in range(60)]


def test_asyncpg_listen_notify_between_two_connections(proxy: ProxyProcess) -> None:
    async def run() -> None:
        listener = await asyncpg.connect(proxy.url(), ssl=False)
        sender = await asyncpg.connect(proxy.url(user="trust_user"), ssl=False)
        try:
            got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
            await listener.add_listener(
                "tickets", lambda _c, _pid, ch, payload: got.put_nowait((ch, payload))
            )
            await sender.execute("notify tickets, 'ticket 42 updated'")
            await sender.execute("select pg_notify('tickets', 'second')")
            first = await asyncio.wait_for(got.get(), 10)
            second = await asyncio.wait_for(got.get(), 10)
            assert [first, second] == [("tickets", "ticket 42 updated"), ("tickets", "second")]
        finally:
            await listener.close()
            await sender.close()

    asyncio.run(run())


# --- 4. pgbench -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pgbench_db(pg: Cluster) -> str:
    if shutil.which("pgbench") is None:
        pytest.skip("pgbench is not installed")
    pg.psql("drop database if exists bench; create database bench", database="postgres")
    out = subprocess.run(
        ["pgbench", "-i", "-q", "-s", "1", "-h", str(pg.socket_dir), "-p", str(pg.port),
         "-U", "postgres", "bench"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return "bench"


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_proxy(proxy: ProxyProcess, pgbench_db: str, mode: str) -> None:
    out = subprocess.run(
        ["pgbench", "-n", "-M", mode, "-t", "50", "-c", "4", "-h", proxy.host,
         "-p", str(proxy.port), "-U", "postgres", pgbench_db],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PGSSLMODE="disable"),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "number of transactions actually processed: 200/200" in out.stdout, out.stdout
    assert "number of failed transactions: 0 " in out.stdout, out.stdout


# --- 5. cancel ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_psycopg_cancel_through_proxy(proxy: ProxyProcess, pg: Cluster, method: str) -> None:
    app = f"cancel-{method}"
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as conn:

        def cancel_when_running() -> None:
            wait_until(lambda: active_query(pg, app, "select pg_sleep(30)"), 15, what="pg_sleep")
            getattr(conn, method)()

        t = threading.Thread(target=cancel_when_running)
        t.start()
        try:
            with pytest.raises(errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            t.join()
        assert conn.execute("select 'usable'").fetchone() == ("usable",)


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_a_cancel_is_done_when_the_client_sees_it_done(proxy: ProxyProcess, method: str) -> None:
    # libpq's cancel returns once the server closes the cancel connection, which PostgreSQL
    # does after signalling the backend.  If pgwarden closed it first and forwarded later, a
    # cancel sent as a statement was ending (psycopg's stream() does that on an error) would
    # land on the client's next statement instead.
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(5):
            getattr(conn, method)()
            assert conn.execute("select pg_sleep(0.05), 'not cancelled'").fetchone() == (
                "",
                "not cancelled",
            )


def test_asyncpg_timeout_cancels_through_proxy(proxy: ProxyProcess, pg: Cluster) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(
            proxy.url(), ssl=False, server_settings={"application_name": "apg-timeout"}
        )
        try:
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(30)", timeout=1.5)
            assert await conn.fetchval("select 'usable'") == "usable"
        finally:
            await conn.close()

    asyncio.run(run())
    # The cancel reached PostgreSQL: nothing is still sleeping.
    wait_until(lambda: not active_query(pg, "apg-timeout", "select pg_sleep(30)"), 10,
               what="the backend to stop sleeping")  # fmt: skip


# --- 7. large values ------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_50mb_bytea_round_trip(proxy: ProxyProcess, binary: bool) -> None:
    data = os.urandom(50 * 1024 * 1024)
    with psycopg.connect(proxy.dsn()) as conn:
        cur = conn.cursor(binary=binary)
        placeholder = "%b" if binary else "%t"
        cur.execute(f"select v, length(v) from (select {placeholder}::bytea as v) s", [data])
        value, length = cur.fetchone()  # type: ignore[misc]
        assert length == len(data)
        assert bytes(value) == data


# --- 17. admin endpoint ---------------------------------------------------------------------


def test_metrics_health_and_readiness(proxy: ProxyProcess) -> None:
    assert proxy.http_get("/healthz") == (200, "ok\n")
    assert proxy.http_get("/readyz")[0] == 200
    before = proxy.metric("pgwarden_statements_total")
    with psycopg.connect(proxy.dsn()) as conn:
        for i in range(5):
            conn.execute("select %s::int", [i])
    after = wait_until(
        lambda: (v := proxy.metric("pgwarden_statements_total")) >= before + 5 and v,
        5,
        what="statements_total to grow",
    )
    assert after >= before + 5
    with psycopg.connect(proxy.dsn()), psycopg.connect(proxy.dsn()):
        assert proxy.metric("pgwarden_connections_active") >= 2
    # Every connection this module opened (and killed, and cancelled) is accounted for.
    wait_until(
        lambda: proxy.metric("pgwarden_connections_active") == 0, 10, what="no active connections"
    )
    status, text = proxy.http_get("/metrics")
    assert status == 200
    assert "pgwarden_statement_latency_seconds_bucket" in text
    assert proxy.http_get("/nope")[0] == 404
