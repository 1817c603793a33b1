"""pgwarden is invisible to clients: what a client learns about its session, and what
PostgreSQL answers, is what it would learn and hear connected directly."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from loadtests.cluster import Cluster
from tests.proxyutil import ProxyProcess, wait_until

# --- the backend pid ---------------------------------------------------------------------


def test_psycopg_sees_its_backends_real_pid(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone() == (conn.info.backend_pid,)


def test_asyncpg_sees_its_backends_real_pid(proxy: ProxyProcess) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(proxy.url(), ssl=False)
        try:
            assert await conn.fetchval("select pg_backend_pid()") == conn.get_server_pid()
        finally:
            await conn.close()

    asyncio.run(run())


def test_pg_terminate_backend_of_a_clients_pid_ends_that_session(
    proxy: ProxyProcess, pg: Cluster
) -> None:
    victim = psycopg.connect(proxy.dsn(application_name="terminate-me"), autocommit=True)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:
            row = other.execute(
                "select pg_terminate_backend(%s)", [victim.info.backend_pid]
            ).fetchone()
            assert row == (True,)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
    finally:
        victim.close()
    wait_until(
        lambda: (
            pg.psql(
                "select count(*) from pg_stat_activity where application_name = 'terminate-me'"
            ).strip()
            == "0"
        ),
        10,
        what="the terminated backend to be gone",
    )


def test_pg_stat_activity_finds_the_client_by_its_pid(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(application_name="find-me"), autocommit=True) as conn:
        row = conn.execute(
            "select application_name from pg_stat_activity where pid = %s",
            [conn.info.backend_pid],
        ).fetchone()
        assert row == ("find-me",)


def test_psycopg_notify_to_itself_names_its_own_pid(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("listen transparent_chan")
        conn.execute("notify transparent_chan, 'hello'")
        (note,) = list(conn.notifies(timeout=5, stop_after=1))
        assert (note.channel, note.payload) == ("transparent_chan", "hello")
        assert note.pid == conn.info.backend_pid


def test_asyncpg_notify_to_itself_names_its_own_pid(proxy: ProxyProcess) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(proxy.url(), ssl=False)
        got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        try:
            await conn.add_listener(
                "transparent_apg",
                lambda _c, pid, chan, payload: got.put_nowait((pid, chan, payload)),
            )
            await conn.execute("notify transparent_apg, 'hi'")
            pid, chan, payload = await asyncio.wait_for(got.get(), 5)
            assert (pid, chan, payload) == (conn.get_server_pid(), "transparent_apg", "hi")
        finally:
            await conn.close()

    asyncio.run(run())
