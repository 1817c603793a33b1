import psycopg

from proxy.sandbox.cluster import Cluster


def test_each_auth_method_logs_in_directly(pg: Cluster) -> None:
    for user in ("trust_user", "md5_user", "scram_user"):
        with psycopg.connect(pg.dsn(user=user)) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)


def test_tls_is_offered(pg: Cluster) -> None:
    with psycopg.connect(pg.dsn(sslmode="verify-full", sslrootcert=str(pg.ca_cert))) as conn:
        assert conn.execute(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone() == (True,)
