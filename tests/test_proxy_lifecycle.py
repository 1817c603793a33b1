"""Sessions and the proxy process coming and going: killed clients, killed backends,
SIGTERM, SIGHUP, bad configuration."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from proxy.messages.frontend import Query
from proxy.sandbox.cluster import Cluster, free_port
from tests.conftest import ProxyFactory
from tests.proxyutil import (
    ProxyProcess,
    RawClient,
    error_of,
    pgwarden_command,
    wait_until,
)


def backend_count(pg: Cluster, app: str, active: bool = False) -> int:
    cond = " and state = 'active'" if active else ""
    return int(
        pg.psql(f"select count(*) from pg_stat_activity where application_name = '{app}'{cond}")
    )


# --- 8. client killed mid-statement ---------------------------------------------------------

_SLEEPER = """
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
print("connected", flush=True)
conn.execute("select pg_sleep(60)")
"""

_STREAMER = """
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
n = 0
# generate_series in the target list streams; in FROM it would be materialised first.
for row in conn.cursor().stream("select repeat('x', 1000), generate_series(1, 50000000)"):
    n += 1
    if n == 2000:
        print("streaming", flush=True)
"""


@pytest.mark.parametrize("script", [_SLEEPER, _STREAMER], ids=["sleeping", "streaming"])
def test_killed_client_frees_its_backend(proxy: ProxyProcess, pg: Cluster, script: str) -> None:
    app = "killed-" + ("sleeper" if script is _SLEEPER else "streamer")
    child = subprocess.Popen(
        [sys.executable, "-c", script, proxy.dsn(application_name=app)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        if script is _STREAMER:
            assert child.stdout.readline().strip() == "streaming"
        wait_until(lambda: backend_count(pg, app, active=True) == 1, 15, what="the statement")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    wait_until(lambda: backend_count(pg, app) == 0, 10, what="the backend to be freed")
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# --- 9. backend killed mid-statement --------------------------------------------------------


def test_terminated_backend_gives_client_an_error(proxy: ProxyProcess, pg: Cluster) -> None:
    app = "terminated-backend"
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as conn:

        def terminate() -> None:
            wait_until(lambda: backend_count(pg, app, active=True) == 1, 15, what="pg_sleep")
            pg.psql(
                f"select pg_terminate_backend(pid) from pg_stat_activity where application_name = '{app}'"
            )

        t = threading.Thread(target=terminate)
        t.start()
        try:
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select pg_sleep(30)")
        finally:
            t.join()
        assert isinstance(info.value, errors.AdminShutdown), repr(info.value)
        assert "terminating connection due to administrator command" in str(info.value)
        assert conn.closed or conn.info.status == psycopg.pq.ConnStatus.BAD
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 'new session'").fetchone() == ("new session",)


def test_server_side_timeout_fatal_reaches_the_client(proxy: ProxyProcess) -> None:
    # PostgreSQL ends an idle transaction with FATAL 25P03 while the client is not looking;
    # the client must see that reason on its next query, as it would directly.
    dsn = proxy.dsn(options="'-c idle_in_transaction_session_timeout=300'")
    with psycopg.connect(dsn) as conn:
        conn.execute("select 1")  # opens a transaction
        time.sleep(1.5)
        with pytest.raises(errors.IdleInTransactionSessionTimeout):
            conn.execute("select 1")
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# --- 14. graceful shutdown ------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_sigterm_drains_sessions_then_exits(
    proxy_factory: ProxyFactory, pg: Cluster, tls: bool
) -> None:
    config: dict[str, object] = {"shutdown_timeout": 30}
    extra = {"sslmode": "disable"}
    if tls:
        certs = pg.root / "certs"
        config["client_tls"] = {"cert": str(certs / "proxy.crt"), "key": str(certs / "proxy.key")}
        extra = {"sslmode": "verify-full", "sslrootcert": str(pg.ca_cert)}
    proxy = proxy_factory(config=config)
    busy = psycopg.connect(proxy.dsn(application_name="shutdown-busy", **extra), autocommit=True)
    idle = psycopg.connect(proxy.dsn(application_name="shutdown-idle", **extra), autocommit=True)
    in_tx = psycopg.connect(proxy.dsn(application_name="shutdown-tx", **extra))
    try:
        in_tx.execute("create temp table kept(x int)")  # opens a transaction
        result: list[object] = []

        def run() -> None:
            try:
                result.append(busy.execute("select pg_sleep(1), 'finished'").fetchone())
            except Exception as exc:
                result.append(exc)

        t = threading.Thread(target=run)
        t.start()
        wait_until(lambda: backend_count(pg, "shutdown-busy", active=True) == 1, 15, what="sleep")
        proxy.signal(signal.SIGTERM)
        t.join(30)
        # The running statement completes and its result arrives.
        assert result == [("", "finished")], result
        with pytest.raises(errors.AdminShutdown, match="proxy is shutting down"):
            busy.execute("select 1")
        # The idle session was ended at once.
        with pytest.raises(errors.AdminShutdown, match="proxy is shutting down"):
            idle.execute("select 1")

        # An open transaction keeps the process alive; meanwhile nobody new gets in.
        assert proxy.proc.poll() is None
        assert proxy.http_get("/readyz")[0] == 503
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=5).close()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn())

        # The transaction may finish; then its session ends too.
        in_tx.execute("insert into kept values (1)")
        in_tx.commit()
        with pytest.raises(errors.AdminShutdown, match="proxy is shutting down"):
            in_tx.execute("select 1")
        assert proxy.proc.wait(20) == 0
    finally:
        for c in (busy, idle, in_tx):
            c.close()
    events = [e["event"] for e in proxy.log_events()]
    assert "shutdown_started" in events and "shutdown_complete" in events


def test_sigterm_timeout_ends_stuck_sessions(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    proxy = proxy_factory(config={"shutdown_timeout": 1})
    with psycopg.connect(proxy.dsn(application_name="shutdown-stuck"), autocommit=True) as conn:
        result: list[object] = []

        def run() -> None:
            try:
                result.append(conn.execute("select pg_sleep(30)").fetchone())
            except Exception as exc:
                result.append(exc)

        t = threading.Thread(target=run)
        t.start()
        wait_until(lambda: backend_count(pg, "shutdown-stuck", active=True) == 1, 15, what="sleep")
        proxy.signal(signal.SIGTERM)
        assert proxy.proc.wait(20) == 0
        t.join(20)
        assert len(result) == 1 and isinstance(result[0], errors.AdminShutdown), result
    # The statement the proxy cut off does not keep running on the server.
    wait_until(lambda: backend_count(pg, "shutdown-stuck") == 0, 10, what="the backend to go")


# --- 15. SIGHUP reload ----------------------------------------------------------------------


def _big_query_error(proxy: ProxyProcess) -> str | None:
    """Send a 100 KB query on a new session: None if it ran, else the error's SQLSTATE."""
    with RawClient(proxy.host, proxy.port) as c:
        c.startup()
        c.send(Query("select length('" + "x" * 100_000 + "')").encode())
        msgs = []
        while True:
            try:
                msg = c.read_message()
            except EOFError:
                break
            msgs.append(msg)
            if msg[0] == "Z":
                break
        if any(t == "E" for t, _ in msgs):
            return error_of(msgs).sqlstate
        assert ("D", b"\0\x01\0\0\0\x06100000") in msgs, msgs
        return None


def test_sighup_reloads_config(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(config={"max_message_bytes": 1 << 20, "shutdown_timeout": 10})
    assert _big_query_error(proxy) is None
    kept = psycopg.connect(proxy.dsn())
    try:
        mark = len(proxy.log_events())
        proxy.write_config({"max_message_bytes": 65536, "shutdown_timeout": 10})
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log_event("config_reloaded", after=mark)
        assert _big_query_error(proxy) == "08P01"

        # An invalid file is refused and the running config stays.
        mark = len(proxy.log_events())
        proxy.write_config("max_message_bytes: 1048576\nno_such_setting: true\n")
        proxy.signal(signal.SIGHUP)
        failed = proxy.wait_for_log_event("config_reload_failed", after=mark)
        assert failed["level"] == "error"
        assert "no_such_setting" in failed["error"], failed
        assert _big_query_error(proxy) == "08P01"
        mark = len(proxy.log_events())
        proxy.write_config("max_message_bytes: [not, a, number\n")
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log_event("config_reload_failed", after=mark)
        assert _big_query_error(proxy) == "08P01"
        # Sessions from before the reloads were never disturbed.
        assert kept.execute("select 'kept'").fetchone() == ("kept",)
    finally:
        kept.close()
    assert proxy.proc.poll() is None


def test_sighup_with_unloadable_certificate_keeps_old_config(
    proxy_factory: ProxyFactory, pg: Cluster, tmp_path: Path
) -> None:
    certs = pg.root / "certs"
    tls = {"cert": str(certs / "proxy.crt"), "key": str(certs / "proxy.key")}
    proxy = proxy_factory(config={"client_tls": tls, "shutdown_timeout": 10})
    bad = tmp_path / "garbage.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    mark = len(proxy.log_events())
    proxy.write_config(
        {
            "client_tls": {"cert": str(bad), "key": tls["key"], "required": True},
            "max_message_bytes": 65536,
        }
    )
    proxy.signal(signal.SIGHUP)
    failed = proxy.wait_for_log_event("config_reload_failed", after=mark)
    assert "client_tls" in failed["error"] and "garbage.crt" in failed["error"], failed
    # Nothing of the new file was applied: plaintext is still allowed, the limit unchanged.
    assert _big_query_error(proxy) is None
    with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=str(pg.ca_cert))) as conn:
        assert conn.info.pgconn.ssl_in_use


def test_sighup_can_require_tls(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    certs = pg.root / "certs"
    tls = {"cert": str(certs / "proxy.crt"), "key": str(certs / "proxy.key")}
    proxy = proxy_factory(config={"client_tls": tls, "shutdown_timeout": 10})
    with psycopg.connect(proxy.dsn(sslmode="disable")) as conn:
        assert not conn.info.pgconn.ssl_in_use
    mark = len(proxy.log_events())
    proxy.write_config({"client_tls": {**tls, "required": True}, "shutdown_timeout": 10})
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log_event("config_reloaded", after=mark)
    with pytest.raises(psycopg.OperationalError, match="accepts only TLS"):
        psycopg.connect(proxy.dsn(sslmode="disable"))
    with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=str(pg.ca_cert))) as conn:
        assert conn.info.pgconn.ssl_in_use


# --- 16. configuration errors ---------------------------------------------------------------


def _serve(
    tmp_path: Path, pg: Cluster, config: str | None, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = [*pgwarden_command(), "serve", "--upstream", f"{pg.host}:{pg.port}", "--admin", "off",
           "--listen", "127.0.0.1:0", *args]  # fmt: skip
    if config is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(textwrap.dedent(config))
        cmd += ["-c", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("listen: 127.0.0.1:0\nmax_conections: 5\n", "max_conections"),
        ("upstream_tls:\n  mode: sometimes\n", "upstream_tls.mode"),
        ("client_tls:\n  cert: /nonexistent.crt\n  key: /nonexistent.key\n", "client_tls"),
        ("max_message_bytes: lots\n", "max_message_bytes"),
        ("- just\n- a list\n", "mapping"),
        ("client_tls:\n  cert: {garbage}\n  key: {garbage}\n", "client_tls: cannot load"),
        ("upstream_tls:\n  mode: verify-full\n  ca: {garbage}\n", "upstream_tls.ca"),
    ],
    ids=[
        "unknown-key",
        "bad-tls-mode",
        "missing-cert",
        "bad-number",
        "not-a-mapping",
        "unloadable-cert",
        "unloadable-ca",
    ],
)
def test_config_errors_exit_2_naming_the_key(
    tmp_path: Path, pg: Cluster, config: str, named: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    out = _serve(tmp_path, pg, config.format(garbage=garbage))
    assert out.returncode == 2, out.stderr
    assert named in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_bad_policy_file_exits_2_naming_the_line(tmp_path: Path, pg: Cluster) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - id: r1\n    max_rowz: 5\n")
    out = _serve(tmp_path, pg, None, "--policy", str(policy))
    assert out.returncode == 2, out.stderr
    assert f"{policy}:3" in out.stderr and "max_rowz" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_an_audit_store_that_cannot_open_exits_1_saying_why(tmp_path: Path, pg: Cluster) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    out = _serve(tmp_path, pg, None, "--audit-db", str(blocker / "audit.db"))
    assert out.returncode == 1, out.stderr
    assert "the audit trail cannot start" in out.stderr and str(blocker) in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_flag_value_exits_2(tmp_path: Path, pg: Cluster) -> None:
    out = _serve(tmp_path, pg, None, "--upstream-tls", "sometimes")
    assert out.returncode == 2
    assert "--upstream-tls" in out.stderr


@pytest.mark.parametrize("busy", ["listen", "admin"])
def test_busy_port_exits_1_naming_it(tmp_path: Path, pg: Cluster, busy: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"127.0.0.1:{port}" if busy == "listen" else f"127.0.0.1:{free_port()}"
        admin = f"127.0.0.1:{port}" if busy == "admin" else "off"
        cmd = [*pgwarden_command(), "serve", "--upstream", f"{pg.host}:{pg.port}",
               "--listen", listen, "--admin", admin]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert str(port) in out.stderr and "address already in use" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_upstream_gives_a_readable_error(
    proxy_factory: ProxyFactory, pg: Cluster
) -> None:
    proxy = proxy_factory("--upstream", f"127.0.0.1:{free_port()}")
    with pytest.raises(
        psycopg.OperationalError, match="could not connect to the PostgreSQL server"
    ):
        psycopg.connect(proxy.dsn())
    assert proxy.http_get("/healthz")[0] == 200


def test_no_config_file_needed(proxy: ProxyProcess) -> None:
    assert proxy.config_path is None
    assert "-c" not in proxy.cmd
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_no_connections_left_behind(proxy: ProxyProcess) -> None:
    # Runs last in this module: killed clients and terminated backends left nothing open.
    wait_until(
        lambda: proxy.metric("pgwarden_connections_active") == 0, 10, what="no active connections"
    )
