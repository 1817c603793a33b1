"""Behaviour the clients' own test suites (``make compat``) rely on, through pgwarden with
policy and audit as well as directly, named after the suite's test that showed it; and the
fail-closed side of what fixed it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from proxy.messages.frontend import Bind, Execute, Parse, Query, Sync
from proxy.sandbox.cluster import Cluster
from tests.conftest import ProxyFactory
from tests.proxyutil import ProxyProcess, RawClient, audited_config, error_of, wait_until
from tests.support_data import POLICY


@pytest.fixture(scope="module")
def guarded(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """pgwarden enforcing the reference policy, with an audit trail (as ``make compat``)."""
    work = tmp_path_factory.mktemp("guarded")
    (work / "policy.yaml").write_text(yaml.safe_dump(yaml.safe_load(POLICY.read_text())))
    p = ProxyProcess(pg, work / "proxy", config=audited_config(work, work / "policy.yaml"))
    yield p
    assert p.stop() == 0, p.log()


def _fresh_database(pg: Cluster, name: str) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE); CREATE DATABASE {name}",
            database="postgres")  # fmt: skip


# --- asyncpg test_introspection::test_introspection_on_large_db ----------------------------


def _reloads(p: ProxyProcess, database: str) -> int:
    return sum(
        1
        for e in p.log_events()
        if e.get("event") == "catalog_reloaded" and e.get("database") == database
    )


def _audited(proxy_factory: ProxyFactory, tmp_path: Path, settle: float) -> ProxyProcess:
    """pgwarden with the reference policy and an audit trail (so every session is followed,
    and postgres's DDL is seen), reloading the catalog ``settle`` seconds after DDL."""
    (tmp_path / "policy.yaml").write_text(POLICY.read_text())
    config = audited_config(tmp_path, tmp_path / "policy.yaml")
    config.update(catalog_reload_settle=settle, catalog_reload_max_delay=300.0)
    return proxy_factory(config=config)


def test_a_burst_of_ddl_reloads_the_catalog_once(
    proxy_factory: ProxyFactory, pg: Cluster, tmp_path: Path
) -> None:
    """A migration creating tables one statement at a time had the catalog reloaded after
    every one, back to back: 1,000 tables took over a minute instead of 3 s."""
    # A settle time well above one statement's round trip, however loaded the machine, so
    # the burst below is one burst; the reload comes that long after its last statement.
    p = _audited(proxy_factory, tmp_path, settle=3.0)
    _fresh_database(pg, "ddl_burst")
    with psycopg.connect(p.dsn(dbname="ddl_burst"), autocommit=True) as conn:
        for i in range(40):  # one round trip each, as a migration tool sends them
            conn.execute(f"create table burst_{i} (id int primary key, email text)")
        wait_until(lambda: _reloads(p, "ddl_burst") >= 1, 30, what="the reload")
        # One more DDL after that reload gets a reload of its own: once it is logged, the
        # count says how many the burst caused.
        conn.execute("create table burst_last (id int)")
        wait_until(lambda: _reloads(p, "ddl_burst") >= 2, 30, what="the second reload")
    assert _reloads(p, "ddl_burst") == 2
    # The reloaded catalog knows every table of the burst: an agent's statement on one is
    # judged by the policy, not refused as naming an unknown relation.
    pg.psql("grant select on all tables in schema public to support_app", database="ddl_burst")
    with psycopg.connect(p.dsn(user="support_app", dbname="ddl_burst"), autocommit=True) as conn:
        assert conn.execute("select count(*) from burst_39").fetchone() == (0,)
    pg.psql("DROP DATABASE ddl_burst WITH (FORCE)", database="postgres")


def test_a_table_created_in_a_burst_is_refused_for_agents_until_the_reload(
    proxy_factory: ProxyFactory, pg: Cluster, tmp_path: Path
) -> None:
    """While a reload waits for a burst of DDL to end, the loaded catalog stays in force, and
    a relation it does not have is unknown: refused for a subject with limits."""
    p = _audited(proxy_factory, tmp_path, settle=60.0)  # the burst does not end, here
    _fresh_database(pg, "ddl_unknown")
    with psycopg.connect(p.dsn(dbname="ddl_unknown"), autocommit=True) as conn:
        conn.execute("create table hidden (id int primary key, email text)")
        conn.execute("insert into hidden values (1, 'a@example.com')")
        conn.execute("grant select on hidden to support_app")
    agent = p.dsn(user="support_app", dbname="ddl_unknown")
    with psycopg.connect(agent, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not in pgwarden's catalog"):
            conn.execute("select email from hidden")
    pg.psql("DROP DATABASE ddl_unknown WITH (FORCE)", database="postgres")


# --- asyncpg test_execute::TestExecuteMany::test_executemany_server_failure_during_writes --


@pytest.mark.parametrize("through", ["direct", "pgwarden"])
def test_an_error_in_a_pipeline_reaches_the_client_before_its_sync(
    guarded: ProxyProcess, pg: Cluster, through: str
) -> None:
    """asyncpg's executemany pipelines Bind/Execute pairs with no Sync until the end, and
    stops writing once it reads an error: the server's error must reach the client while it
    is still writing, and what it pipelines after the error is skipped up to its Sync."""
    host, port = (pg.host, pg.port) if through == "direct" else (guarded.host, guarded.port)
    with RawClient(host, port) as c:
        c.startup()
        c.send(Query("create table if not exists exmany (a text, b int primary key)").encode())
        c.read_until_ready()
        c.send(Query("truncate exmany").encode())
        c.read_until_ready()
        row = (b"a", b"0")
        c.send(
            Parse("", "insert into exmany values ($1, $2)").encode(),
            *(Bind("", "", (), row).encode() + Execute("").encode() for _ in range(3)),
        )
        # No Sync, no Flush: PostgreSQL flushes an error as it raises it.
        got = [c.read_message() for _ in range(5)]
        assert [t for t, _ in got] == ["1", "2", "C", "2", "E"]
        assert error_of(got).sqlstate == "23505"  # unique_violation
        c.send(*(Bind("", "", (), row).encode() + Execute("").encode() for _ in range(3)))
        c.send(Sync().encode())
        msgs = c.read_until_ready()
        assert [t for t, _ in msgs] == ["Z"], msgs
        assert msgs[-1][1] == b"I"
        c.send(Query("select count(*) from exmany").encode())
        msgs = c.read_until_ready()
        assert [t for t, _ in msgs] == ["T", "D", "C", "Z"]
        assert msgs[1][1] == b"\x00\x01\x00\x00\x00\x010"  # one column: '0'
