"""pgwarden is invisible to clients: what a client learns about its session, and what
PostgreSQL answers, is what it would learn and hear connected directly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
import yaml

from proxy.sandbox.cluster import Cluster
from tests.conftest import ProxyFactory
from tests.proxyutil import ProxyProcess, audited_config, wait_until
from tests.support_data import POLICY

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


# --- PostgreSQL's own answers, with policy and audit on -----------------------------------


@pytest.fixture(scope="module")
def guarded(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """pgwarden enforcing the reference policy, with an audit trail (the setup in which
    pgwarden keeps connections of its own to each database its clients use)."""
    work = tmp_path_factory.mktemp("guarded")
    # The reference policy, plus a subject by role membership: pgwarden then also looks up
    # each session user's roles, on a connection of its own to the session's database.
    policy = yaml.safe_load(POLICY.read_text())
    policy["subjects"]["monitors"] = {"roles": ["pg_monitor"]}
    (work / "policy.yaml").write_text(yaml.safe_dump(policy))
    p = ProxyProcess(pg, work / "proxy", config=audited_config(work, work / "policy.yaml"))
    yield p
    assert p.stop() == 0, p.log()


def test_an_unknown_database_is_postgresqls_error(guarded: ProxyProcess) -> None:
    # libpq reports a failed connection's text only (psycopg's sqlstate is None then, as it
    # is connected directly): the text is PostgreSQL's; asyncpg checks the SQLSTATE.
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(guarded.dsn(dbname="nosuchdb"))
    assert 'FATAL:  database "nosuchdb" does not exist' in str(caught.value)
    assert "pgwarden" not in str(caught.value)

    async def run() -> None:
        with pytest.raises(asyncpg.InvalidCatalogNameError, match="nosuchdb") as caught:
            await asyncpg.connect(guarded.pg.url(port=guarded.port, database="nosuchdb"), ssl=False)
        assert caught.value.sqlstate == "3D000"

    asyncio.run(run())


def test_a_wrong_password_is_postgresqls_error(guarded: ProxyProcess) -> None:
    dsn = guarded.pg.dsn(user="scram_user", port=guarded.port, sslmode="disable")
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(dsn + " password=wrong")
    assert 'FATAL:  password authentication failed for user "scram_user"' in str(caught.value)

    async def run() -> None:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(
                host=guarded.host, port=guarded.port, user="scram_user", password="wrong",
                database="support", ssl=False,
            )  # fmt: skip

    asyncio.run(run())


def test_too_many_connections_is_postgresqls_error(guarded: ProxyProcess, pg: Cluster) -> None:
    pg.psql(
        "DROP DATABASE IF EXISTS one_at_a_time; CREATE DATABASE one_at_a_time CONNECTION LIMIT 1",
        database="postgres",
    )
    dsn = guarded.pg.dsn(user="trust_user", port=guarded.port, dbname="one_at_a_time",
                         sslmode="disable")  # fmt: skip
    with psycopg.connect(dsn) as first:
        assert first.execute("select 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(dsn)
        assert 'FATAL:  too many connections for database "one_at_a_time"' in str(caught.value)

        async def run() -> None:
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await asyncpg.connect(
                    guarded.pg.url(user="trust_user", port=guarded.port, database="one_at_a_time"),
                    ssl=False,
                )

        asyncio.run(run())


def test_a_catalog_pgwarden_cannot_load_is_pgwardens_error_saying_so(
    proxy_factory: ProxyFactory,
) -> None:
    p = proxy_factory("--policy", str(POLICY), "--catalog-user", "no_such_catalog_role")
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(p.dsn())
    assert "FATAL:  pgwarden: policy cannot be enforced" in str(caught.value)
    assert "catalog of database 'support' could not be loaded" in str(caught.value)

    async def run() -> None:
        with pytest.raises(asyncpg.ClientCannotConnectError, match="pgwarden") as caught:
            await asyncpg.connect(p.url(), ssl=False)
        assert caught.value.sqlstate == "08001"

    asyncio.run(run())


# --- pgwarden's own connections never hold a client's database ---------------------------


def _own_connections(pg: Cluster, database: str) -> set[str]:
    out = pg.psql(
        "select application_name from pg_stat_activity "
        f"where datname = '{database}' and application_name like 'pgwarden-%'",
        database="postgres",
    )
    return set(out.split())


def _used_through(p: ProxyProcess, database: str) -> None:
    """A client's session on ``database`` through pgwarden, with a statement or two."""
    with psycopg.connect(p.dsn(dbname=database), autocommit=True) as conn:
        conn.execute("create table if not exists t (id int primary key, note text)")
        assert conn.execute("select count(*) from t").fetchone() == (0,)


def _fresh_database(pg: Cluster, name: str) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE); CREATE DATABASE {name}",
            database="postgres")  # fmt: skip


def test_drop_database_through_pgwarden_after_using_it(guarded: ProxyProcess, pg: Cluster) -> None:
    _fresh_database(pg, "drop_me")
    with psycopg.connect(guarded.dsn(dbname="drop_me"), autocommit=True) as conn:
        conn.execute("select 1")
        # While a client uses it, pgwarden reads its catalog and the user's roles there.
        assert _own_connections(pg, "drop_me") >= {"pgwarden-catalog"}
    with psycopg.connect(guarded.dsn(dbname="postgres"), autocommit=True) as admin:
        admin.execute("DROP DATABASE drop_me")
        assert admin.execute(
            "select count(*) from pg_database where datname = 'drop_me'"
        ).fetchone() == (0,)
    # pgwarden goes on serving, and a database of that name is a new one to it.
    _fresh_database(pg, "drop_me")
    _used_through(guarded, "drop_me")
    pg.psql("DROP DATABASE drop_me WITH (FORCE)", database="postgres")


def test_rename_database_through_pgwarden_after_using_it(
    guarded: ProxyProcess, pg: Cluster
) -> None:
    _fresh_database(pg, "rename_me")
    pg.psql("DROP DATABASE IF EXISTS renamed", database="postgres")
    _used_through(guarded, "rename_me")
    with psycopg.connect(guarded.dsn(dbname="postgres"), autocommit=True) as admin:
        admin.execute("ALTER DATABASE rename_me RENAME TO renamed")
    _used_through(guarded, "renamed")
    with pytest.raises(psycopg.OperationalError, match='database "rename_me" does not exist'):
        psycopg.connect(guarded.dsn(dbname="rename_me"))
    with psycopg.connect(guarded.dsn(dbname="postgres"), autocommit=True) as admin:
        admin.execute("DROP DATABASE renamed")


def test_drop_database_with_force_ends_its_sessions(guarded: ProxyProcess, pg: Cluster) -> None:
    _fresh_database(pg, "force_me")
    with psycopg.connect(guarded.dsn(dbname="force_me"), autocommit=True) as victim:
        victim.execute("select 1")
        with psycopg.connect(guarded.dsn(dbname="postgres"), autocommit=True) as admin:
            admin.execute("DROP DATABASE force_me WITH (FORCE)")
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
    assert (
        pg.psql(
            "select count(*) from pg_database where datname = 'force_me'", database="postgres"
        ).strip()
        == "0"
    )


def test_own_connections_close_when_idle_and_reopen_on_demand(
    guarded: ProxyProcess, pg: Cluster
) -> None:
    _fresh_database(pg, "idle_db")
    _used_through(guarded, "idle_db")
    wait_until(lambda: not _own_connections(pg, "idle_db"), 10,
               what="pgwarden's own connections to idle_db to close")  # fmt: skip
    # The catalog is still in force while its connection is closed: a DDL statement has it
    # reloaded (reopening a connection), and the policy judges the new table.
    with psycopg.connect(guarded.dsn(dbname="idle_db"), autocommit=True) as conn:
        conn.execute("create table customers (customer_id int primary key, email text)")
        conn.execute("insert into customers values (1, 'a@example.com')")
        conn.execute("grant select on customers to support_app")
    wait_until(lambda: not _own_connections(pg, "idle_db"), 10, what="closed again")
    agent = guarded.dsn(user="support_app", dbname="idle_db")
    with psycopg.connect(agent, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgwarden: blocked"):
            conn.execute("select * from customers")
    pg.psql("DROP DATABASE idle_db", database="postgres")


# --- cancel secrets ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [4, 32, 256])
def test_cancel_secrets_have_the_servers_length_and_name_their_worker(length: int) -> None:
    from proxy.config import ProxyConfig
    from proxy.server import Proxy

    proxy = Proxy(ProxyConfig(workers=3), worker=2)
    secrets_ = {proxy.issue_cancel_secret(object(), length) for _ in range(200)}  # type: ignore[arg-type]
    assert len(secrets_) == 200  # no two live sessions share one
    for secret in secrets_:
        assert len(secret) == length
        assert int.from_bytes(secret[:4], "big") % 3 == 2  # routed to worker 2
