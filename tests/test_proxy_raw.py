"""Raw-socket tests built on ``proxy.messages``: framing corners no driver will produce on
purpose, compared where possible with what PostgreSQL itself sends."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from proxy.messages.backend import ErrorResponse
from proxy.messages.frontend import Bind, CopyData, Execute, Parse, Query, Sync, Terminate
from proxy.messages.startup import PROTOCOL_3_0, CancelRequest, GSSENCRequest, StartupMessage
from proxy.sandbox.cluster import Cluster
from tests.conftest import ProxyFactory
from tests.proxyutil import ProxyProcess, RawClient, error_of, messages_until_eof, wait_until


def backend_count(pg: Cluster, app: str) -> int:
    return int(pg.psql(f"select count(*) from pg_stat_activity where application_name = '{app}'"))


def active(pg: Cluster) -> bool:
    sql = "select count(*) from pg_stat_activity where query like 'select pg_sleep(2)%'"
    return pg.psql(sql).strip() == "1"


def assert_proxy_serves(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 'alive'").fetchone() == ("alive",)


def fatal_protocol_violation(msgs: list[tuple[str, bytes]]) -> ErrorResponse:
    err = error_of(msgs)
    assert err.get("S") == "FATAL", err
    assert err.sqlstate == "08P01", err
    return err


# --- 6. forged and unknown cancel keys --------------------------------------------------------


def test_forged_and_unknown_cancel_keys_are_dropped(proxy: ProxyProcess, pg: Cluster) -> None:
    dropped_before = proxy.metric("pgwarden_cancels_dropped_total")
    with psycopg.connect(proxy.dsn(application_name="forged-cancel"), autocommit=True) as conn:
        handed_out = conn.info.backend_pid
        real = conn.execute("select pg_backend_pid()").fetchone()
        assert real is not None
        # The client sees its backend's real pid; only the secret is pgwarden's own.
        assert handed_out == real[0]
        result: list[object] = []

        def sleep() -> None:
            try:
                result.append(conn.execute("select pg_sleep(2), 'finished'").fetchone())
            except Exception as exc:
                result.append(exc)

        t = threading.Thread(target=sleep)
        t.start()
        wait_until(lambda: backend_count(pg, "forged-cancel") == 1 and active(pg), 10)
        forged = [
            CancelRequest(real[0], secrets.token_bytes(4)),  # the real pid, a wrong secret
            CancelRequest(secrets.randbelow(2**31 - 1) + 1, secrets.token_bytes(4)),  # random
        ]
        for req in forged:
            with RawClient(proxy.host, proxy.port) as c:
                c.send(req.encode())
                assert c.at_eof()
        t.join(30)
        assert result == [("", "finished")], result
        wait_until(
            lambda: proxy.metric("pgwarden_cancels_dropped_total") >= dropped_before + 2,
            10,
            what="cancels_dropped_total to count the forged keys",
        )
        assert conn.execute("select 1").fetchone() == (1,)


# --- 10. pipelined extended protocol ----------------------------------------------------------


def _pipeline_batch(first: str = "select 1") -> bytes:
    out = b""
    for sql in (first, "select 1/0", "select 3"):
        out += Parse("", sql).encode() + Bind("", "").encode() + Execute("").encode()
    return out + Sync().encode()


def _run_batch(host: str, port: int, in_transaction: bool) -> list[tuple[str, bytes]]:
    with RawClient(host, port) as c:
        c.startup()
        if in_transaction:
            c.send(Query("begin").encode())
            c.read_until_ready()
        c.send(_pipeline_batch())
        msgs = c.read_until_ready()
        # Nothing more is owed: a further query gets a normal answer.
        c.send(Query("rollback").encode())
        c.read_until_ready()
        return msgs


@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "in-transaction"])
def test_pipelined_batch_with_error_matches_postgresql(
    proxy: ProxyProcess, pg: Cluster, in_transaction: bool
) -> None:
    through_proxy = _run_batch(proxy.host, proxy.port, in_transaction)
    direct = _run_batch(pg.host, pg.port, in_transaction)
    assert [t for t, _ in through_proxy] == [t for t, _ in direct]
    types = [t for t, _ in through_proxy]
    # The first statement completes, with its row.
    assert types[:4] == ["1", "2", "D", "C"]
    assert through_proxy[3][1] == b"SELECT 1\0"
    # Then exactly one error; nothing at all for the third statement; one ReadyForQuery.
    assert error_of(through_proxy).sqlstate == "22012"
    assert types.count("D") == 1 and types.count("C") == 1 and types.count("Z") == 1
    assert types[-2:] == ["E", "Z"]
    assert through_proxy[-1][1] == (b"E" if in_transaction else b"I")


def _run_simple(host: str, port: int) -> list[tuple[str, bytes]]:
    with RawClient(host, port) as c:
        c.startup()
        c.send(Query("select 1; select 1/0; select 3; ; select 4").encode())
        msgs = c.read_until_ready()
        c.send(Query("").encode())
        assert [t for t, _ in c.read_until_ready()] == ["I", "Z"]  # EmptyQueryResponse
        return msgs


def test_simple_query_string_with_error_matches_postgresql(
    proxy: ProxyProcess, pg: Cluster
) -> None:
    through_proxy = _run_simple(proxy.host, proxy.port)
    assert through_proxy == _run_simple(pg.host, pg.port)
    # One result, the error, nothing of the rest of the string, one ReadyForQuery.
    assert [t for t, _ in through_proxy] == ["T", "D", "C", "E", "Z"]
    assert error_of(through_proxy).sqlstate == "22012"


# --- 10. start-up corners -----------------------------------------------------------------------


def test_gssenc_request_is_declined_then_startup_works(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as c:
        c.send(GSSENCRequest().encode())
        assert c.read_exact(1) == b"N"
        c.startup()
        c.send(Query("select 'after gssenc'").encode())
        msgs = c.read_until_ready()
        assert ("D", b"\0\x01\0\0\0\x0cafter gssenc") in msgs


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!I", 3) + b"\0" * 8,  # shorter than its own length word
        struct.pack("!I", 2**31 + 8) + struct.pack("!I", PROTOCOL_3_0),  # absurdly long
        struct.pack("!I", 1_000_000) + struct.pack("!I", PROTOCOL_3_0),  # over 10000 bytes
    ],
    ids=["too-short", "negative", "too-long"],
)
def test_invalid_startup_length_closes(proxy: ProxyProcess, packet: bytes) -> None:
    with RawClient(proxy.host, proxy.port) as c:
        c.send(packet)
        msgs = messages_until_eof(c)
        assert all(t == "E" for t, _ in msgs), msgs
    assert_proxy_serves(proxy)


# --- 10. COPY FROM STDIN abandoned ------------------------------------------------------------


@pytest.mark.parametrize("how", ["terminate", "close"])
def test_client_leaving_mid_copy_in(proxy: ProxyProcess, pg: Cluster, how: str) -> None:
    table = f"copy_abandoned_{how}"
    app = f"copy-{how}"
    pg.psql(f"drop table if exists {table}; create table {table}(id int, body text)")
    c = RawClient(proxy.host, proxy.port)
    c.startup(application_name=app)
    c.send(Query(f"copy {table} from stdin").encode())
    assert c.read_message()[0] == "G"  # CopyInResponse
    rows = b"".join(f"{i}\trow {i}\n".encode() for i in range(10_000))
    c.send(CopyData(rows).encode())
    if how == "terminate":
        c.send(Terminate().encode())
    c.close()
    wait_until(lambda: backend_count(pg, app) == 0, 10, what="the backend to go away")
    assert pg.psql(f"select count(*) from {table}").strip() == "0"
    assert_proxy_serves(proxy)


# --- 10. bad messages after start-up ------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x01" + struct.pack("!I", 8) + b"abcd",  # a type no frontend message has
        b"Q" + struct.pack("!i", -5),  # a negative length
        b"Q" + struct.pack("!i", 2),  # a length that does not cover itself
    ],
    ids=["unknown-type", "negative-length", "length-below-4"],
)
def test_garbage_after_startup_is_a_protocol_violation(
    proxy: ProxyProcess, pg: Cluster, garbage: bytes
) -> None:
    app = "garbage-" + garbage[:1].hex()
    with RawClient(proxy.host, proxy.port) as c:
        c.startup(application_name=app)
        c.send(garbage)
        err = fatal_protocol_violation(messages_until_eof(c))
        assert err.message.startswith("pgwarden: invalid message from the client"), err
    wait_until(lambda: backend_count(pg, app) == 0, 10, what="the backend to go away")
    assert_proxy_serves(proxy)


def test_oversized_message_is_refused(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    proxy = proxy_factory("--max-message-bytes", "65536")
    with RawClient(proxy.host, proxy.port) as c:
        c.startup(application_name="oversized")
        c.send(Query("select '" + "x" * 100_000 + "'").encode())
        err = fatal_protocol_violation(messages_until_eof(c))
        assert "over the limit of 65536 bytes" in err.message, err
    wait_until(lambda: backend_count(pg, "oversized") == 0, 10, what="the backend to go away")
    with psycopg.connect(proxy.dsn()) as conn:
        # Below the limit is fine.
        assert conn.execute("select length(%s)", ["y" * 50_000]).fetchone() == (50_000,)
        # The limit is for what clients send: a large value in a result still arrives.
        row = conn.execute("select repeat('z', 200000)").fetchone()
        assert row is not None and len(row[0]) == 200_000


# --- 13. backpressure ---------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls-both-sides"])
def test_slow_reader_keeps_proxy_memory_bounded(
    proxy_factory: ProxyFactory, pg: Cluster, tls: bool
) -> None:
    certs = pg.root / "certs"
    flags = [
        "--tls-cert", str(certs / "proxy.crt"), "--tls-key", str(certs / "proxy.key"),
        "--upstream-tls", "verify-full", "--upstream-ca", str(pg.ca_cert),
    ]  # fmt: skip
    proxy = proxy_factory(*(flags if tls else ["--upstream-tls", "disable"]))
    rows = 200_000  # 1000-byte values: ~200 MB of DataRows
    with RawClient(proxy.host, proxy.port, timeout=60) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        if tls:
            c.start_tls(str(pg.ca_cert))
        c.startup()
        rss_before = proxy.rss_kib()
        c.send(Query(f"select repeat('x', 1000) from generate_series(1, {rows})").encode())
        peak = rss_before
        for _ in range(20):  # do not read for ~4 seconds
            time.sleep(0.2)
            peak = max(peak, proxy.rss_kib())
        assert peak - rss_before < 64 * 1024, f"RSS grew by {(peak - rss_before) // 1024} MB"
        count = nbytes = 0
        done = False
        while not done:
            t, body = c.read_message()
            if t == "D":
                count += 1
                nbytes += len(body)
            elif t == "Z":
                done = True
            elif t == "E":
                raise AssertionError(ErrorResponse.decode(body))
        assert count == rows
        assert nbytes == rows * (2 + 4 + 1000)
        peak = max(peak, proxy.rss_kib())
        assert peak - rss_before < 64 * 1024, f"RSS grew by {(peak - rss_before) // 1024} MB"


def test_binary_payload_relayed_unchanged(proxy: ProxyProcess) -> None:
    # A random (valid) payload of every byte value survives the relay unchanged.
    payload = os.urandom(1 << 20)
    with RawClient(proxy.host, proxy.port) as c:
        c.startup()
        c.send(
            Parse("", "select $1::bytea").encode()
            + Bind("", "", (1,), (payload,), (1,)).encode()
            + Execute("").encode()
            + Sync().encode()
        )
        msgs = c.read_until_ready()
        rows = [body for t, body in msgs if t == "D"]
        assert rows == [b"\0\x01" + struct.pack("!i", len(payload)) + payload]


def test_startup_parameters_relayed(proxy: ProxyProcess) -> None:
    # Start-up parameters reach PostgreSQL, which reports them back.
    with RawClient(proxy.host, proxy.port) as c:
        c.send(
            StartupMessage(
                PROTOCOL_3_0,
                (("user", "trust_user"), ("database", "support"), ("application_name", "raw-app")),
            ).encode()
        )
        msgs = c.read_until_ready()
        params = [body for t, body in msgs if t == "S"]
        assert b"application_name\0raw-app\0" in params


def test_fast_copy_in_keeps_proxy_memory_bounded(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    # The other direction: a client pushing COPY data faster than PostgreSQL stores it.
    proxy = proxy_factory()
    pg.psql("drop table if exists copy_flood; create unlogged table copy_flood(body text)")
    rss_before = proxy.rss_kib()
    peak = [rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proxy.rss_kib())
            time.sleep(0.05)

    line = b"y" * 1023 + b"\n"
    chunks = 100  # 100 MB

    async def run() -> None:
        async def source() -> AsyncIterator[bytes]:
            for _ in range(chunks):
                yield line * 1024

        conn = await asyncpg.connect(proxy.url(), ssl=False)
        try:
            await conn.copy_to_table("copy_flood", source=source())
        finally:
            await conn.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        asyncio.run(run())
    finally:
        stop.set()
        sampler.join()
    assert pg.psql("select count(*) from copy_flood").strip() == str(chunks * 1024)
    assert peak[0] - rss_before < 64 * 1024, f"RSS grew by {(peak[0] - rss_before) // 1024} MB"
