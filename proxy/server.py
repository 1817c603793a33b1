"""The running proxy: listener, upstream connections, TLS, cancel, backpressure, shutdown.

This is the only module that does I/O.  Each client connection gets one ``Session`` (the
protocol logic) and, once it has sent its start-up packet, one upstream connection to
PostgreSQL.  Both sides are asyncio Protocols rather than streams: data arrives in
``data_received`` and goes straight to the other transport, with no task switch on the hot
path.  When one side's transport buffers more than its high-water mark, the other side stops
reading, so memory stays bounded whatever the result size.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import os
import secrets
import signal
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from proxy import commands as cmd
from proxy.config import ProxyConfig, UpstreamTLSMode
from proxy.messages.errors import ProtocolError
from proxy.messages.startup import CancelRequest, SSLRequest, StartupMessage, decode_startup
from proxy.metrics import Stats
from proxy.session import Session, SessionSettings, error_bytes

if TYPE_CHECKING:
    from proxy.policyrt import PolicyRuntime

log = structlog.get_logger("pgwarden")

WRITE_HIGH_WATER = 256 * 1024
# How long a closing client connection keeps reading after our FIN (see _close_client).
CLOSE_LINGER_SECONDS = 2.0
_session_ids = itertools.count(1)
# Statements that create, drop or rename a database (kinds as policy.analyze names them):
# a catalog of pgwarden's may now stand for a database that is gone, or another one.
_DATABASE_DDL = frozenset({"createdb", "dropdb", "rename", "alter_database"})
# Audit session ids must not collide between worker processes writing to one store.
_PROCESS_TAG = secrets.token_hex(3)


def _set_up(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """A new TCP or Unix connection, either side: bounded write buffer, no Nagle delay."""
    # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
    t = cast(asyncio.Transport, transport)
    t.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    sock = t.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return t


def _certificate_der(path: str) -> bytes | None:
    """The first certificate of a PEM file, DER-encoded (what TLS puts on the wire)."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    end = text.find("-----END CERTIFICATE-----")
    if end < 0:
        return None
    return ssl.PEM_cert_to_DER_cert(text[: end + len("-----END CERTIFICATE-----")])


def _client_ssl_context(config: ProxyConfig) -> ssl.SSLContext | None:
    tls = config.client_tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def _asyncpg_ssl(config: ProxyConfig) -> Any:
    """The same TLS mode for pgwarden's own connections (catalog, lookups) as for sessions'.

    asyncpg takes libpq's mode names; an SSLContext would mean 'require' even for 'prefer'.
    """
    mode = config.upstream_tls.mode
    if mode is UpstreamTLSMode.DISABLE:
        return False
    if mode is UpstreamTLSMode.VERIFY_FULL:
        return _upstream_ssl_context(config)
    return mode.value


def _upstream_ssl_context(config: ProxyConfig) -> ssl.SSLContext | None:
    tls = config.upstream_tls
    if tls.mode is UpstreamTLSMode.DISABLE:
        return None
    if tls.mode is UpstreamTLSMode.VERIFY_FULL:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    else:
        # 'prefer' and 'require' encrypt without checking who answers, as libpq's do.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Proxy:
    """Everything shared by the sessions of one process."""

    def __init__(
        self,
        config: ProxyConfig,
        stats: Stats | None = None,
        runtime: PolicyRuntime | None = None,
        worker: int = 0,
    ) -> None:
        self.worker = worker
        self.stats = stats or Stats()
        self.runtime = runtime
        self.connections: set[ClientConnection] = set()
        self.by_cancel_secret: dict[bytes, ClientConnection] = {}
        self.shutting_down = False
        self._servers: list[asyncio.AbstractServer] = []
        self.apply_config(config)

    def apply_config(self, config: ProxyConfig) -> None:
        """Take a new config; it applies to sessions that start from now on.

        Everything is built before anything is replaced: if a part fails (a certificate
        changed on disk since validation), the running config stays whole.
        """
        client_ssl = _client_ssl_context(config)
        cert = config.client_tls.cert
        client_cert_der = _certificate_der(str(cert)) if cert is not None else None
        upstream_ssl = _upstream_ssl_context(config)
        settings = SessionSettings(
            tls_available=client_ssl is not None,
            tls_required=config.client_tls.required,
            allow_replication=config.allow_replication,
            max_message=config.max_message_bytes,
        )
        self.config = config
        self.client_ssl = client_ssl
        self.client_cert_der = client_cert_der
        self.upstream_ssl = upstream_ssl
        self.settings = settings

    async def start(self) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        addr = self.config.listen
        server = await loop.create_server(
            lambda: ClientConnection(self), addr.host, addr.port, reuse_address=True,
            reuse_port=self.config.workers > 1, backlog=1024,
        )  # fmt: skip
        self._servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    def issue_cancel_secret(self, conn: ClientConnection, length: int) -> bytes:
        """A cancel secret for the client that no other live session holds.

        The client gets its backend's real pid (a client's ``pg_terminate_backend``, NOTIFY
        sender pids and ``pg_stat_activity`` lookups depend on it) and this secret in place
        of PostgreSQL's, so a cancel request reaches PostgreSQL only through pgwarden, and
        only with a key pgwarden issued.  With several workers the secret also says which
        worker owns the session (its first four bytes modulo the number of workers), so a
        cancel request that the kernel hands to another worker can be passed to the right
        one.  ``length`` is the server's own (4 bytes in protocol 3.0, up to 256 in 3.2).
        """
        workers = self.config.workers
        while True:
            secret = bytearray(secrets.token_bytes(length))
            if workers > 1:
                head = int.from_bytes(secret[:4], "big")
                head += (self.worker - head % workers) % workers
                if head >= 2**32:
                    continue
                secret[:4] = head.to_bytes(4, "big")
            key = bytes(secret)
            if key not in self.by_cancel_secret:
                self.by_cancel_secret[key] = conn
                return key

    def _worker_of(self, secret: bytes) -> int:
        return int.from_bytes(secret[:4], "big") % self.config.workers

    async def forward_cancel(self, pid: int, secret: bytes) -> None:
        workers = self.config.workers
        if workers > 1 and self._worker_of(secret) != self.worker:
            await self._pass_cancel(self._worker_of(secret), pid, secret)
            return
        conn = self.by_cancel_secret.get(secret)
        key = conn.session.client_key if conn else None
        if (
            conn is None
            or key is None
            or key.pid != pid
            or not hmac.compare_digest(key.secret, secret)
        ):
            # Unknown or forged (the pid is no secret: a client sees it, and so does anyone
            # who can read pg_stat_activity): drop it.  Never guess, never tell the sender.
            self.stats.cancels_dropped += 1
            log.warning("cancel_dropped", reason="unknown or forged cancel key")
            return
        self.stats.cancels_forwarded += 1
        await conn.cancel_upstream()

    def cancel_socket(self, worker: int) -> str:
        """Where worker ``worker`` takes cancel requests passed on by its siblings."""
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        listen = self.config.listen
        return os.path.join(base, f"pgwarden-{listen.port}-cancel-{worker}.sock")

    async def start_cancel_listener(self) -> None:
        """With several workers: accept CancelRequests other workers pass on (Unix socket,
        owner-only permissions)."""
        path = self.cancel_socket(self.worker)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                packet = await asyncio.wait_for(reader.read(300), 5)
                parsed = decode_startup(packet[4:]) if len(packet) >= 8 else None
                if isinstance(parsed, CancelRequest):
                    await self.forward_cancel(parsed.pid, parsed.secret)
            except (OSError, TimeoutError, ProtocolError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_unix_server(handle, path)
        os.chmod(path, 0o600)
        self._servers.append(server)

    async def _pass_cancel(self, worker: int, pid: int, secret: bytes) -> None:
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.cancel_socket(worker)), 5
            )
            writer.write(CancelRequest(pid, secret).encode())
            await writer.drain()
            writer.close()
        except (OSError, TimeoutError) as exc:
            self.stats.cancels_dropped += 1
            log.warning("cancel_not_passed_on", worker=worker, error=str(exc))

    async def send_cancel(self, pid: int, secret: bytes) -> None:
        """Open a fresh connection to PostgreSQL carrying a CancelRequest for a backend."""
        up = self.config.upstream
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(up.host, up.port), self.config.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            log.warning("cancel_failed", error=str(exc))
            return
        try:
            if self.config.upstream_tls.mode in (
                UpstreamTLSMode.REQUIRE,
                UpstreamTLSMode.VERIFY_FULL,
            ):
                writer.write(SSLRequest().encode())
                answer = await reader.readexactly(1)
                if answer == b"S":
                    await writer.start_tls(
                        self.upstream_ssl,  # type: ignore[arg-type]
                        server_hostname=self.config.upstream_tls.server_name or up.host,
                    )
            writer.write(CancelRequest(pid, secret).encode())
            await writer.drain()
            # PostgreSQL closes the connection once it has read the request.
            await asyncio.wait_for(reader.read(), 5)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.warning("cancel_failed", error=str(exc))
        finally:
            writer.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let running statements finish, then end what is left."""
        if timeout is None:
            timeout = self.config.shutdown_timeout
        self.shutting_down = True
        for server in self._servers:
            server.close()
        log.info("shutdown_started", sessions=len(self.connections), timeout=timeout)
        for conn in list(self.connections):
            conn.run(conn.session.begin_shutdown())
        deadline = asyncio.get_running_loop().time() + timeout
        # Sessions whose backend is gone only wait to tell their client; they do not hold
        # the shutdown up.
        while (
            any(c.session.working for c in self.connections)
            and asyncio.get_running_loop().time() < deadline
        ):
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.run(conn.session.force_close())
            conn.close_now()
        for _ in range(40):
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        for server in self._servers:
            await server.wait_closed()
        log.info("shutdown_complete")


class ClientConnection(asyncio.Protocol):
    """The client side of one session, and the owner of its upstream connection."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.session = Session(
            proxy.settings,
            proxy.stats,
            lambda n: proxy.issue_cancel_secret(self, n),
            make_guard=proxy.runtime.make_guard if proxy.runtime is not None else None,
        )
        self.session_id = next(_session_ids)
        self.audit_id = f"{_PROCESS_TAG}-{self.session_id}"
        self._session_started = False
        self.log: Any = log
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # We have ended the client connection (FIN sent or transport closed): nothing more
        # may be written to it, and an upstream still being opened is not wanted any more.
        self._ending = False
        self._cancelling = False  # a CancelRequest is being forwarded; close after it
        self._linger: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = _set_up(transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.session.subject.client_addr = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self.session.subject.client_port = int(peer[1]) if isinstance(peer, tuple) else 0
        self.log = log.bind(session=self.session_id, client=f"{peer[0]}:{peer[1]}")
        self.proxy.connections.add(self)
        self.proxy.stats.connections_total += 1
        self.proxy.stats.connections_active += 1
        if self.proxy.shutting_down:
            self.run(self.session.begin_shutdown())

    def data_received(self, data: bytes) -> None:
        try:
            commands = self.session.client_data(data)
        except ProtocolError as exc:
            commands = self.session.protocol_error(exc)
        except Exception:
            commands = self._internal_error()
        self.run(commands)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._linger is not None:
            self._linger.cancel()
        self.react(self.session.client_closed)
        if self._session_started and self.proxy.runtime is not None:
            self.proxy.runtime.session_event("end", self.audit_id, self.session.subject)
        self.proxy.connections.discard(self)
        self.proxy.stats.connections_active -= 1
        key = self.session.client_key
        if key is not None and self.proxy.by_cancel_secret.get(key.secret) is self:
            del self.proxy.by_cancel_secret[key.secret]
        else:
            # The key may have been issued before start-up finished.
            for secret, conn in list(self.proxy.by_cancel_secret.items()):
                if conn is self:
                    del self.proxy.by_cancel_secret[secret]

    def pause_writing(self) -> None:
        # The client reads slower than PostgreSQL sends: stop reading PostgreSQL.
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- commands --------------------------------------------------------------------------

    def run(self, commands: list[cmd.Command]) -> None:
        for c in commands:
            if type(c) is cmd.SendToServer:
                if self.upstream is not None:
                    self.upstream.write(c.data)
            elif type(c) is cmd.SendToClient:
                # After write_eof() a write raises: a session closed while its upstream was
                # still being opened (found by loadtests/fuzz_sessions.py) has more to say.
                if self.transport is not None and not self._closed and not self._ending:
                    self.transport.write(c.data)
            elif type(c) is cmd.CloseClient:
                if not self._cancelling:
                    self._close_client()
            elif type(c) is cmd.CloseServer:
                if self.upstream is not None:
                    self.upstream.close()
            elif type(c) is cmd.OpenUpstream:
                self._spawn(self._open_upstream(c.startup))
            elif type(c) is cmd.StartClientTLS:
                self._start_tls()
            elif type(c) is cmd.PrepareSession:
                self._spawn(self._prepare_session())
            elif type(c) is cmd.ForwardCancel:
                self._cancelling = True
                self._spawn(self._forward_cancel(c.pid, c.secret))
            elif type(c) is cmd.CancelUpstream:
                self._spawn(self._cancel_then_release() if c.hold else self.cancel_upstream())
            elif type(c) is cmd.StatementDone:
                self._statement_done(c)
            elif type(c) is cmd.EndSession:
                self.log.warning("session_ended_by_policy", reason=c.message)
                if self.transport is not None and not self._ending:
                    self.transport.write(error_bytes("42501", c.message, fatal=True))
                    self._ending = True
                    self.transport.close()
                if self.upstream is not None:
                    self.upstream.close()
            elif type(c) is cmd.AwaitDurable:
                self._await_durable(c.done)
            elif type(c) is cmd.Log:
                getattr(self.log, c.level)(c.event, **(c.fields or {}))
                runtime = self.proxy.runtime
                if runtime is not None and c.event in ("session_ready", "auth_failed"):
                    if c.event == "session_ready":
                        self._session_started = True
                        runtime.session_event("start", self.audit_id, self.session.subject)
                    else:
                        message = (c.fields or {}).get("message")
                        runtime.session_event(
                            "auth_failure", self.audit_id, self.session.subject, message
                        )
            elif (
                type(c) is cmd.RecordUsage
                or type(c) is cmd.RefreshCounts
                or (type(c) is cmd.CanaryHit and c.hold)
            ):
                self._spawn(self._record_usage(c))
            elif type(c) is cmd.LookupAllowed:
                self._spawn(self._lookup_allowed(c))
            elif self.proxy.runtime is not None:
                origin = (self.session.subject, self.audit_id)
                self._spawn(self.proxy.runtime.handle(c, self.log, origin))

    def react(self, event: Callable[[], list[cmd.Command]]) -> None:
        """Run one session event and what it commands, outside ``data_received``.

        Events from callbacks and tasks (an audit write made durable, window counts
        recorded, a lookup answered) release client messages held behind a statement, and
        those are parsed only then: a malformed one must end its session as it would have
        on arrival, not escape into the event loop and leave the session hanging (found by
        loadtests/fuzz_sessions.py)."""
        try:
            commands = event()
        except ProtocolError as exc:
            commands = self.session.protocol_error(exc)
        except Exception:
            commands = self._internal_error()
        self.run(commands)

    async def _lookup_allowed(self, c: cmd.LookupAllowed) -> None:
        runtime = self.proxy.runtime
        try:
            tracker = self.session.tracker
            if runtime is not None and tracker is not None:
                expires, keys = await runtime.lookup_allowed(
                    self.session.subject.database, c.rule_id, c.person
                )
                tracker.guard.allowed[(c.rule_id, c.person)] = (expires, keys)
        finally:
            if not self._closed:
                self.react(self.session.counts_recorded)

    async def _record_usage(self, c: cmd.RecordUsage | cmd.RefreshCounts | cmd.CanaryHit) -> None:
        runtime = self.proxy.runtime
        try:
            if runtime is not None:
                await runtime.handle(c, self.log, (self.session.subject, self.audit_id))
        finally:
            if not self._closed:
                self.react(self.session.counts_recorded)

    def _await_durable(self, done: cmd.StatementDone) -> None:
        runtime = self.proxy.runtime
        assert runtime is not None
        self._statement_done(done, audit=False)
        waiting = runtime.submit_durable(done, self.audit_id, self.session.subject)
        if isinstance(waiting, asyncio.Future):
            # The usual case: a callback on the trail's future, not a task per labelled
            # statement (a task costs its creation and two steps on the loop).
            waiting.add_done_callback(self._durable_done)
        else:
            self._spawn(self._await_durable_slowly(waiting))

    def _durable_done(self, fut: asyncio.Future[Any]) -> None:
        runtime = self.proxy.runtime
        assert runtime is not None
        ok = runtime.durable_ok(fut)
        if not self._closed:
            self.react(lambda: self.session.durable_result(ok))

    async def _await_durable_slowly(self, waiting: Awaitable[Any] | None) -> None:
        """No future to hang a callback on: no audit trail, or a full queue to wait for."""
        runtime = self.proxy.runtime
        assert runtime is not None
        ok = await runtime.wait_durable(waiting)
        if not self._closed:
            self.react(lambda: self.session.durable_result(ok))

    def _statement_done(self, c: cmd.StatementDone, audit: bool = True) -> None:
        if audit and self.proxy.runtime is not None:
            self.proxy.runtime.audit_statement(c, self.audit_id, self.session.subject)
        facts = c.facts
        if facts is not None and facts.is_ddl and self.proxy.runtime is not None:
            # The catalog may have changed under the analysis: reload it soon.
            if facts.kind in _DATABASE_DDL:
                self.proxy.runtime.invalidate_all()
            else:
                self.proxy.runtime.invalidate(self.session.subject.database)

    def _close_client(self) -> None:
        """Flush, send FIN, and keep reading (and discarding) until the client closes.

        Closing a socket that still holds unread client bytes makes the kernel answer with
        RST, and a client that receives RST throws away what it had not read yet: the FATAL
        error saying why the session ended.  That happens whenever the client is still
        sending (the rest of an oversized message) or writes its next query into a session
        we ended while it sat idle (shutdown).
        """
        t = self.transport
        if t is None or self._closed or self._linger is not None:
            return
        self._ending = True
        if not t.can_write_eof():  # TLS: close_notify is the best we can do
            t.close()
            return
        t.write_eof()
        if not t.is_reading():
            t.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(CLOSE_LINGER_SECONDS, t.close)

    def close_now(self) -> None:
        """Close the client connection without waiting for the client."""
        if self._linger is not None:
            self._linger.cancel()
        self._ending = True
        if self.transport is not None:
            self.transport.close()

    async def _forward_cancel(self, pid: int, secret: bytes) -> None:
        # libpq's PQcancel returns when the server closes the cancel connection, which
        # PostgreSQL does only after signalling the backend.  Clients rely on that: once it
        # returns, the cancel cannot hit their next statement.  So the client's connection
        # is closed only once the cancel has reached PostgreSQL (or failed to).
        try:
            await self.proxy.forward_cancel(pid, secret)
        finally:
            self._close_client()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _internal_error(self) -> list[cmd.Command]:
        self.log.exception("internal_error")
        return self.session.protocol_error(
            ProtocolError("pgwarden internal error; the session was closed")
        )

    async def _cancel_then_release(self) -> None:
        """Cancel a cut-off statement; the client's held messages go on once PostgreSQL has
        taken the request (a cancel it then finds the backend idle for is ignored)."""
        try:
            await self.cancel_upstream()
        finally:
            if not self._closed:
                self.react(self.session.counts_recorded)

    async def cancel_upstream(self) -> None:
        key = self.session.upstream_key
        if key is not None:
            await self.proxy.send_cancel(key.pid, key.secret)

    def _start_tls(self) -> None:
        assert self.transport is not None
        # Stop reading now: the ClientHello must reach the TLS layer, not data_received.
        self.transport.pause_reading()
        self._spawn(self._tls_handshake())

    async def _tls_handshake(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.proxy.client_ssl is not None
        try:
            new = await loop.start_tls(
                self.transport, self, self.proxy.client_ssl, server_side=True,
                ssl_handshake_timeout=self.proxy.config.connect_timeout,
            )  # fmt: skip
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.log.warning("client_tls_failed", error=str(exc))
            self.transport.close()
            return
        if new is None:
            return
        self.transport = new
        self.react(self.session.tls_established)

    async def _open_upstream(self, startup: StartupMessage) -> None:
        loop = asyncio.get_running_loop()
        config = self.proxy.config
        up = config.upstream
        try:
            transport, proto = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), up.host, up.port),
                config.connect_timeout,
            )
            if config.upstream_tls.mode is not UpstreamTLSMode.DISABLE:
                transport = await self._upstream_tls(transport, proto)
            proto.transport = transport
        except (OSError, TimeoutError, ssl.SSLError, UpstreamRefused) as exc:
            self.run(self.session.upstream_failed(str(exc) or type(exc).__name__))
            return
        if self._closed or self._ending:
            # The client left, or its session ended (a protocol error in what it sent
            # while we connected): the session must not start after all.
            transport.close()
            return
        self.upstream = proto
        proto.negotiating = None
        ssl_object = transport.get_extra_info("ssl_object")
        same_cert = False
        if ssl_object is not None and self.proxy.client_cert_der is not None:
            same_cert = ssl_object.getpeercert(binary_form=True) == self.proxy.client_cert_der
        self.react(
            lambda: self.session.upstream_ready(
                startup, tls=ssl_object is not None, same_certificate=same_cert
            )
        )

    async def _prepare_session(self) -> None:
        """What the policy needs before an authenticated session goes on: its database's
        catalog (loaded once per database) and the user's roles."""
        runtime = self.proxy.runtime
        subject = self.session.subject
        failure = None
        if runtime is not None:
            try:
                await runtime.ensure_catalog(subject.database)
                subject.roles = await runtime.roles_of(subject.database, subject.user)
            except Exception as exc:
                self.log.error("catalog_unavailable", database=subject.database, error=str(exc))
                failure = (
                    f"policy cannot be enforced: the catalog of database "
                    f"{subject.database!r} could not be loaded ({exc})"
                )
        if self._closed:
            return
        try:
            commands = self.session.session_prepared(failure)
        except ProtocolError as exc:  # in the server's held messages
            commands = self.session.protocol_error(exc)
        except Exception:
            commands = self._internal_error()
        self.run(commands)

    async def _upstream_tls(
        self, transport: asyncio.Transport, proto: UpstreamConnection
    ) -> asyncio.Transport:
        config = self.proxy.config
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        proto.negotiating = fut
        transport.write(SSLRequest().encode())
        answer = await asyncio.wait_for(fut, config.connect_timeout)
        if answer == b"S":
            assert self.proxy.upstream_ssl is not None
            new = await asyncio.get_running_loop().start_tls(
                transport, proto, self.proxy.upstream_ssl,
                server_hostname=config.upstream_tls.server_name or config.upstream.host,
                ssl_handshake_timeout=config.connect_timeout,
            )  # fmt: skip
            assert new is not None
            return new
        if answer == b"N" and config.upstream_tls.mode is UpstreamTLSMode.PREFER:
            return transport
        transport.close()
        if answer == b"N":
            raise UpstreamRefused(
                f"the server does not offer TLS, but upstream_tls.mode is {config.upstream_tls.mode.value}"
            )
        raise UpstreamRefused("the server answered the TLS request with something unexpected")


class UpstreamRefused(Exception):
    pass


class UpstreamConnection(asyncio.Protocol):
    """The PostgreSQL side of one session."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.negotiating: asyncio.Future[bytes] | None = None
        self._paused = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _set_up(transport)

    def data_received(self, data: bytes) -> None:
        if self.negotiating is not None:
            if not self.negotiating.done():
                self.negotiating.set_result(data[:1])
            return
        client = self.client
        try:
            commands = client.session.server_data(data)
        except ProtocolError as exc:
            commands = client.session.protocol_error(exc)
        except Exception:
            commands = client._internal_error()
        client.run(commands)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.negotiating is not None and not self.negotiating.done():
            self.negotiating.set_exception(
                ConnectionError("connection closed during TLS negotiation")
            )
            return
        if self.client.upstream is self:
            self.client.react(self.client.session.server_closed)

    def pause_writing(self) -> None:
        # PostgreSQL reads slower than the client sends (a big COPY FROM): stop the client.
        t = self.client.transport
        if t is not None:
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self.client.transport
        if t is not None:
            t.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()


# What a service manager or a terminal sends: stop (SIGTERM, SIGINT) or reload (SIGHUP).
CONTROL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(
    config: ProxyConfig,
    reload: Callable[[], ProxyConfig] | None = None,
    ready: Callable[[list[tuple[str, int]]], None] | None = None,
    worker: int = 0,
) -> None:
    """Run the proxy until SIGTERM or SIGINT; SIGHUP calls ``reload`` for a new config."""
    from proxy.admin import AdminServer
    from proxy.logs import configure_logging

    # Signals are handled from the very start: a SIGTERM during start-up stops the proxy
    # once it has started (its audit writer included) rather than killing it half-way, and
    # a SIGHUP then reloads instead of killing it (SIGHUP's default action).
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloader: list[Callable[[], None]] = []
    hup_pending = False

    def hup() -> None:
        nonlocal hup_pending
        if reloader:
            reloader[0]()
        else:
            hup_pending = True

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup)
    # A supervisor starts its workers with these signals blocked (proxy.cli._supervise), so
    # that one sent while a worker is starting waits for this point.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)

    runtime = None
    if config.policy_file is not None or config.audit is not None:
        from policy.model import Policy, load_policy
        from proxy.policyrt import PolicyRuntime

        stats = Stats()
        # Audit without a policy still analyses every statement (fingerprint, relations,
        # labels, record keys); a policy without rules limits nobody.
        policy = (
            load_policy(config.policy_file)
            if config.policy_file is not None
            else Policy.model_validate({})
        )
        runtime = PolicyRuntime(
            policy, config.policy_file,
            (config.upstream.host, config.upstream.port), stats,
            ssl=_asyncpg_ssl(config), catalog_user=config.catalog_user,
            idle_timeout=config.catalog_idle_timeout,
            reload_settle=config.catalog_reload_settle,
            reload_max_delay=config.catalog_reload_max_delay,
        )  # fmt: skip
        if config.audit is not None:
            from audit.pipeline import AuditTrail

            runtime.trail = AuditTrail(config.audit)
            await runtime.trail.start()
        proxy = Proxy(config, stats, runtime, worker)
    else:
        proxy = Proxy(config, worker=worker)
    addresses = await proxy.start()
    if config.workers > 1:
        await proxy.start_cancel_listener()
    gc.freeze()  # what start-up built lives as long as the process (see PolicyRuntime)
    admin = None
    admin_address = None
    if config.admin_listen is not None:
        admin = AdminServer(proxy)
        port = config.admin_listen.port
        # Worker i serves its own /metrics on the configured port + i.
        host, bound = await admin.start(config.admin_listen.host, port + worker if port else 0)
        admin_address = f"{host}:{bound}"

    def on_hup() -> None:
        if reload is None:
            return
        old_listen = proxy.config.listen
        try:
            new = reload()
            proxy.apply_config(new)
        except Exception as exc:
            log.error("config_reload_failed", error=str(exc), kept="previous configuration")
            return
        if new.listen != old_listen:
            log.warning("config_listen_changed", note="a new listen address needs a restart")
        if runtime is not None:
            runtime.reload_logged("SIGHUP")
        configure_logging(new.log_level, new.log_format)
        log.info("config_reloaded")

    watcher = None
    if runtime is not None and runtime.source is not None:
        watcher = asyncio.create_task(runtime.watch_file(), name="pgwarden-policy-watch")
    reloader.append(on_hup)
    if hup_pending:
        on_hup()
    log.info(
        "listening",
        addresses=[f"{h}:{p}" for h, p in addresses],
        upstream=str(config.upstream),
        admin=admin_address,
        worker=worker,
        client_tls=config.client_tls.enabled,
        upstream_tls=config.upstream_tls.mode.value,
    )
    if ready is not None:
        ready(addresses)
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    await proxy.shutdown()
    if runtime is not None:
        await runtime.close()
    if admin is not None:
        await admin.stop()
