"""TLS on both sides of the proxy, and SCRAM through a TLS-terminating proxy."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.messages.startup import PROTOCOL_3_0, SSLRequest, StartupMessage
from proxy.sandbox.cluster import Cluster
from tests.conftest import ProxyFactory
from tests.proxyutil import ProxyProcess, RawClient, error_of, messages_until_eof, wait_until

SSL_OF_SESSION = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


def tls_flags(pg: Cluster) -> list[str]:
    certs = pg.root / "certs"
    return ["--tls-cert", str(certs / "proxy.crt"), "--tls-key", str(certs / "proxy.key")]


@pytest.fixture(scope="module")
def tls_proxy(pg: Cluster, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    p = ProxyProcess(pg, tmp_path_factory.mktemp("pgwarden-tls"), tls_flags(pg))
    yield p
    assert p.stop() == 0, p.log()


def sleeping(pg: Cluster, app: str) -> bool:
    sql = (
        "select count(*) from pg_stat_activity where state = 'active' "
        f"and application_name = '{app}' and query like 'select pg_sleep%'"
    )
    return pg.psql(sql).strip() == "1"


def verified(pg: Cluster) -> dict[str, str]:
    return {"sslmode": "verify-full", "sslrootcert": str(pg.ca_cert)}


# --- 11. client-facing TLS ------------------------------------------------------------------


@pytest.mark.parametrize("user", ["trust_user", "md5_user"])
def test_verify_full_through_tls_proxy(tls_proxy: ProxyProcess, pg: Cluster, user: str) -> None:
    with psycopg.connect(tls_proxy.dsn(user=user, **verified(pg))) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == (user,)


def test_scram_through_tls_proxy_default_channel_binding(
    proxy_factory: ProxyFactory, pg: Cluster
) -> None:
    # channel_binding=prefer is libpq's default: with the -PLUS mechanism filtered out the
    # client falls back to plain SCRAM-SHA-256.
    proxy = proxy_factory(*tls_flags(pg), "--upstream-tls", "disable")
    with psycopg.connect(proxy.dsn(user="scram_user", **verified(pg))) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("scram_user",)


@pytest.mark.parametrize(
    "upstream", [[], ["--upstream-tls", "verify-full"]], ids=["prefer", "verify-full"]
)
def test_scram_through_tls_proxy_with_tls_upstream(
    proxy_factory: ProxyFactory, pg: Cluster, upstream: list[str]
) -> None:
    """TLS on both links with different certificates: libpq's default channel_binding=prefer
    sends the gs2 flag 'y', which PostgreSQL on a TLS link must refuse as a downgrade, and
    the flag is covered by the client's proof, so it cannot be rewritten.  pgwarden refuses
    it itself with a message saying why and what to do; channel_binding=disable works."""
    if upstream:
        upstream = [*upstream, "--upstream-ca", str(pg.ca_cert)]
    proxy = proxy_factory(*tls_flags(pg), *upstream)
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn(user="scram_user", **verified(pg)))
    assert "SCRAM channel binding cannot pass through pgwarden" in str(err.value)
    assert "channel_binding=disable" in str(err.value)
    with psycopg.connect(
        proxy.dsn(user="scram_user", channel_binding="disable", **verified(pg))
    ) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute(SSL_OF_SESSION).fetchone() == (True,)


def test_scram_channel_binding_required_fails_clearly(tls_proxy: ProxyProcess, pg: Cluster) -> None:
    dsn = tls_proxy.dsn(user="scram_user", channel_binding="require", **verified(pg))
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(dsn)
    # ... and the proxy is fine afterwards.
    with psycopg.connect(tls_proxy.dsn(**verified(pg))) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_plaintext_still_allowed_when_tls_not_required(tls_proxy: ProxyProcess) -> None:
    with psycopg.connect(tls_proxy.dsn(sslmode="disable")) as conn:
        assert not conn.info.pgconn.ssl_in_use


def test_cancel_through_tls_proxy(tls_proxy: ProxyProcess, pg: Cluster) -> None:
    app = "tls-cancel"
    with psycopg.connect(
        tls_proxy.dsn(application_name=app, **verified(pg)), autocommit=True
    ) as conn:

        def cancel() -> None:
            wait_until(lambda: sleeping(pg, app), 15, what="pg_sleep")
            conn.cancel_safe()

        t = threading.Thread(target=cancel)
        t.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            t.join()
        assert conn.execute("select 1").fetchone() == (1,)


def test_require_tls_refuses_plaintext(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    proxy = proxy_factory(*tls_flags(pg), "--require-tls")
    with pytest.raises(psycopg.OperationalError, match="accepts only TLS"):
        psycopg.connect(proxy.dsn(sslmode="disable"))
    # On the wire: a FATAL with SQLSTATE 28000 and a readable sentence.
    with RawClient(proxy.host, proxy.port) as c:
        c.send(
            StartupMessage(PROTOCOL_3_0, (("user", "postgres"), ("database", "support"))).encode()
        )
        err = error_of(messages_until_eof(c))
        assert err.sqlstate == "28000"
        assert err.get("S") == "FATAL"
        assert "only TLS" in err.message
    # The SSLRequest is answered 'S'.
    with RawClient(proxy.host, proxy.port) as c:
        c.send(SSLRequest().encode())
        assert c.read_exact(1) == b"S"
    with psycopg.connect(proxy.dsn(**verified(pg))) as conn:
        assert conn.info.pgconn.ssl_in_use
    # libpq's classic cancel travels in clear even when the session is TLS; as with
    # PostgreSQL, it must still work through a TLS-only proxy.
    app = "require-tls-cancel"
    with psycopg.connect(proxy.dsn(application_name=app, **verified(pg)), autocommit=True) as conn:

        def cancel() -> None:
            wait_until(lambda: sleeping(pg, app), 15, what="pg_sleep")
            conn.cancel()

        t = threading.Thread(target=cancel)
        t.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            t.join()


def test_direct_tls_negotiation_fails_fast(tls_proxy: ProxyProcess, pg: Cluster) -> None:
    # PostgreSQL 17+ clients can open with a TLS ClientHello (sslnegotiation=direct).
    # pgwarden does not support that yet: the client must get an error, not a hang.  (Its
    # readable 08P01 reply cannot be read by a client that expects TLS: libpq reports an
    # SSL error.)
    if psycopg.pq.version() < 170000:
        pytest.skip("sslnegotiation=direct needs libpq 17")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(tls_proxy.dsn(sslnegotiation="direct", **verified(pg)))
    with psycopg.connect(tls_proxy.dsn(**verified(pg))) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_ssl_request_answered_n_without_certificate(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as c:
        c.send(SSLRequest().encode())
        assert c.read_exact(1) == b"N"
        c.startup()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(sslmode="require"))


# --- 11. upstream TLS -----------------------------------------------------------------------


def test_upstream_verify_full(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    proxy = proxy_factory("--upstream-tls", "verify-full", "--upstream-ca", str(pg.ca_cert))
    with psycopg.connect(proxy.dsn(user="scram_user")) as conn:
        assert not conn.info.pgconn.ssl_in_use  # client to proxy: plain
        assert conn.execute(SSL_OF_SESSION).fetchone() == (True,)  # proxy to server: TLS
    # The proxy's own cancel connection to PostgreSQL goes over TLS too.
    app = "upstream-tls-cancel"
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as conn:

        def cancel() -> None:
            wait_until(lambda: sleeping(pg, app), 15, what="pg_sleep")
            conn.cancel_safe()

        t = threading.Thread(target=cancel)
        t.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            t.join()


def test_upstream_verify_full_rejects_unknown_ca(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    # The system CA store does not know the test CA: the proxy must refuse, not connect.
    proxy = proxy_factory("--upstream-tls", "verify-full")
    with pytest.raises(
        psycopg.OperationalError, match="could not connect to the PostgreSQL server"
    ):
        psycopg.connect(proxy.dsn())


def test_upstream_tls_disable(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    proxy = proxy_factory("--upstream-tls", "disable")
    with psycopg.connect(proxy.dsn(user="md5_user")) as conn:
        assert conn.execute(SSL_OF_SESSION).fetchone() == (False,)


def test_tls_on_both_sides(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    proxy = proxy_factory(
        *tls_flags(pg), "--upstream-tls", "verify-full", "--upstream-ca", str(pg.ca_cert)
    )
    for user in ("trust_user", "md5_user"):
        with psycopg.connect(proxy.dsn(user=user, **verified(pg))) as conn:
            assert conn.info.pgconn.ssl_in_use
            assert conn.execute(SSL_OF_SESSION).fetchone() == (True,)
    # A client that does not offer channel binding can use SCRAM over both links.
    dsn = proxy.dsn(user="scram_user", channel_binding="disable", **verified(pg))
    with psycopg.connect(dsn) as conn:
        assert conn.execute(SSL_OF_SESSION).fetchone() == (True,)


# --- 11. SCRAM channel binding end to end ----------------------------------------------------


@pytest.mark.parametrize("channel_binding", ["prefer", "require"])
def test_scram_channel_binding_when_proxy_presents_the_server_certificate(
    proxy_factory: ProxyFactory, pg: Cluster, tmp_path: Path, channel_binding: str
) -> None:
    # With PostgreSQL's own certificate and key, the client's tls-server-end-point binding
    # matches the server's, so SCRAM-SHA-256-PLUS is passed through and works.
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pg.datadir / "server.crt", cert)
    shutil.copy(pg.datadir / "server.key", key)
    proxy = proxy_factory(
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--upstream-tls", "verify-full", "--upstream-ca", str(pg.ca_cert),
    )  # fmt: skip
    dsn = proxy.dsn(user="scram_user", channel_binding=channel_binding, **verified(pg))
    with psycopg.connect(dsn) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute(SSL_OF_SESSION).fetchone() == (True,)
        assert conn.execute("select current_user").fetchone() == ("scram_user",)


def test_psql_and_asyncpg_over_tls(tls_proxy: ProxyProcess, pg: Cluster) -> None:
    dsn = tls_proxy.dsn(user="md5_user", **verified(pg))
    out = subprocess.run(
        ["psql", "-X", "-At", dsn, "-c", "select current_user"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "md5_user"

    async def run() -> None:
        ctx = ssl.create_default_context(cafile=str(pg.ca_cert))
        conn = await asyncpg.connect(
            host=tls_proxy.host, port=tls_proxy.port, user="md5_user", password="md5-secret",
            database="support", ssl=ctx,
        )  # fmt: skip
        try:
            assert await conn.fetchval("select current_user") == "md5_user"
        finally:
            await conn.close()

    asyncio.run(run())
