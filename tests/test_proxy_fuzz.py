"""Socket-level fuzzing of the real proxy with mutated recordings of real client sessions
(``loadtests/fuzz_sessions.py``; the long run is ``make fuzz``), and regression tests for
what the fuzzer found."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import fuzz_sessions as fz
from proxy.messages.frontend import Query
from proxy.messages.startup import PROTOCOL_3_0, StartupMessage
from proxy.messages.wire import frame
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess, RawClient, error_of, messages_until_eof, wait_until
from tests.support_data import POLICY

SEED = 20261207


@pytest.fixture(scope="module")
def fuzz_db(pg: Cluster) -> str:
    fz.prepare_database(pg)
    return fz.FUZZ_DB


@pytest.fixture(scope="module")
def corpus(
    pg: Cluster, fuzz_db: str, tmp_path_factory: pytest.TempPathFactory
) -> list[fz.Recording]:
    """Real client sessions, recorded against PostgreSQL itself."""
    recorded = fz.record_corpus((pg.host, pg.port), tmp_path_factory.mktemp("fuzz-record"))
    names = {r.name.split("#")[0] for r in recorded}
    assert names == {name for name, _, _ in fz.SCENARIOS}, names
    return recorded


def watched(p: ProxyProcess) -> fz.Watched:
    return fz.Watched(p.host, p.port, p.proc.pid, p.log_path, p.admin_port,
                      lambda: p.proc.poll() is None)  # fmt: skip


def side_dsn(p: ProxyProcess) -> str:
    return p.pg.dsn(port=p.port, database=fz.FUZZ_DB, sslmode="disable",
                    application_name="fuzz-side")  # fmt: skip


@pytest.mark.parametrize("mode", ["passthrough", "policy"])
def test_mutated_client_sessions_never_hurt_the_proxy_or_other_sessions(
    pg: Cluster, corpus: list[fz.Recording], tmp_path: Path, mode: str
) -> None:
    args = []
    if mode == "policy":
        args = ["--policy", str(POLICY), "--catalog-user", "postgres",
                "--audit-db", str(tmp_path / "audit.db")]  # fmt: skip
    p = ProxyProcess(pg, tmp_path / "proxy", args)
    try:
        result = fz.fuzz(watched(p), pg, corpus, mode=mode, iterations=150, seed=SEED,
                         side_dsn=side_dsn(p), max_rss_growth_mib=24)  # fmt: skip
    finally:
        code = p.stop()
    assert result.failures == [], "\n".join(result.failures)
    assert result.iterations == 150
    assert result.side_queries > 0
    assert code == 0, p.log()


# --- what the fuzzer found -------------------------------------------------------------------


class SilentUpstream:
    """A TCP server that accepts one connection, reads, and answers nothing until told to
    hang up: pgwarden's session then stays in the connecting phase as long as a test needs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hang_up = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(64)  # pgwarden's SSLRequest (upstream TLS 'prefer')
            self.hang_up.wait(30)

    def close(self) -> None:
        self.hang_up.set()
        self._thread.join(10)
        self.sock.close()


@pytest.fixture
def silent_upstream() -> Iterator[SilentUpstream]:
    s = SilentUpstream()
    yield s
    s.close()


def test_a_session_ended_while_its_upstream_opens_ends_quietly(
    pg: Cluster, tmp_path: Path, silent_upstream: SilentUpstream
) -> None:
    # A client pipelined more than 64 KiB behind its start-up packet while pgwarden was
    # still connecting upstream: the session ended with a FATAL (and a FIN), then the
    # upstream attempt finished and tried to write its own error to the closed connection.
    # The exception escaped the connecting task ("Task exception was never retrieved").
    p = ProxyProcess(pg, tmp_path / "proxy", ["--upstream", f"127.0.0.1:{silent_upstream.port}"])
    try:
        with RawClient(p.host, p.port) as c:
            params = (("user", "postgres"), ("database", "postgres"))
            c.send(StartupMessage(PROTOCOL_3_0, params).encode())
            # Wait until pgwarden has asked the upstream for TLS: it is connecting now.
            wait_until(lambda: p.metric("pgwarden_connections_active") == 1)
            junk = struct.pack("!ci", b"Q", 70_004) + b"x" * 70_000
            c.send(junk[:40_000])
            c.send(junk[40_000:])
            assert error_of(messages_until_eof(c)).sqlstate == "08P01"
            # The upstream attempt now fails, after the session ended but while the client
            # is still connected (pgwarden lingers on a connection it sent FIN on).
            silent_upstream.hang_up.set()
            wait_until(lambda: "upstream_unreachable" in p.log(), what="the upstream attempt")
        assert p.http_get("/healthz")[0] == 200  # one more turn of pgwarden's loop
        assert "Traceback" not in p.log()
        wait_until(lambda: p.metric("pgwarden_connections_active") == 0)
    finally:
        assert p.stop() == 0, p.log()


def test_a_query_that_is_not_utf8_gets_postgresql_s_error_with_policy_and_audit(
    pg: Cluster, fuzz_db: str, tmp_path: Path
) -> None:
    p = ProxyProcess(
        pg, tmp_path / "proxy",
        ["--policy", str(POLICY), "--catalog-user", "postgres",
         "--audit-db", str(tmp_path / "audit.db")],
    )  # fmt: skip
    try:
        with RawClient(p.host, p.port) as c:
            c.startup(user="postgres", database=fuzz_db)
            # A Latin-1 byte in an identifier, in a UTF-8 session (the surrogate stands for
            # the byte that is not UTF-8; in a literal the normalised text drops it).
            c.send(Query("SELECT caf\udce9 FROM customers").encode())
            msgs = c.read_until_ready()
            # What PostgreSQL answers: invalid byte sequence for encoding "UTF8".
            assert error_of(msgs).sqlstate == "22021"
            c.send(Query("SELECT 1").encode())
            assert [t for t, _ in c.read_until_ready()] == ["T", "D", "C", "Z"]
    finally:
        assert p.stop() == 0, p.log()


@pytest.mark.parametrize("audit", [False, True], ids=["policy", "policy+audit"])
def test_a_malformed_message_held_behind_a_limited_statement_ends_the_session(
    pg: Cluster, fuzz_db: str, tmp_path: Path, audit: bool
) -> None:
    # An agent's labelled statement is watched: what the client pipelined behind it waits
    # until the statement's counts are recorded (and, with an audit trail, its event is
    # durable), and is parsed only then, in a callback or task.  A malformed Execute there
    # raised out of the callback: the session was neither ended nor answered, and hung.
    args = ["--policy", str(POLICY), "--catalog-user", "postgres"]
    if audit:
        args += ["--audit-db", str(tmp_path / "audit.db")]
    p = ProxyProcess(pg, tmp_path / "proxy", args)
    try:
        with RawClient(p.host, p.port) as c:
            c.startup(user="support_app", database=fuzz_db)
            lookup = Query("SELECT customer_id, email FROM customers WHERE customer_id = 1")
            c.send(lookup.encode(), frame(b"E", b"x"))  # an Execute too short to hold a portal
            msgs = messages_until_eof(c)
            assert error_of(msgs).sqlstate == "08P01"
            assert msgs[-1][0] == "E", msgs
            # PostgreSQL would answer the lookup, then refuse the Execute.  With the audit
            # trail the lookup's result waits for its event to be durable and leaves in the
            # same tracker step that parses the Execute, so the error discards it (tracker
            # territory, left as it is: the session is over either way).
            if not audit:
                assert [t for t, _ in msgs] == ["T", "D", "C", "Z", "E"], msgs
        assert p.http_get("/healthz")[0] == 200
        assert "Traceback" not in p.log()
    finally:
        assert p.stop() == 0, p.log()


def test_a_database_name_that_is_not_utf8_gets_postgresql_s_answer_under_a_policy(
    pg: Cluster, fuzz_db: str, tmp_path: Path
) -> None:
    p = ProxyProcess(
        pg, tmp_path / "proxy", ["--policy", str(POLICY), "--catalog-user", "postgres"]
    )
    try:
        with RawClient(p.host, p.port) as c:
            params = (("user", "postgres"), ("database", "f\udcfazz"))  # the byte 0xfa
            c.send(StartupMessage(PROTOCOL_3_0, params).encode())
            assert error_of(messages_until_eof(c)).sqlstate == "3D000"
        assert p.http_get("/healthz")[0] == 200
        assert "Traceback" not in p.log()
    finally:
        assert p.stop() == 0, p.log()
