"""One client connection's protocol state, without any I/O.

The server feeds it events (bytes from the client, bytes from PostgreSQL, connections
opening and closing) and carries out the commands it returns.  Everything that decides how a
session moves between phases lives in ``TRANSITIONS`` and ``_set_phase``; a message that the
current phase does not allow is a ``ProtocolError``, never a silent fall-through.

Relaying after authentication is the hot path: client chunks are split into whole messages
(so a later policy check can hold or refuse one before it reaches PostgreSQL), server chunks
are scanned by header only and forwarded whole.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from policy.encoding import foreign_encoding
from proxy import commands as cmd
from proxy.codec import FrameReader, FrameScanner, StartupReader
from proxy.messages.backend import (
    AUTH_OK,
    AUTH_SASL,
    Authentication,
    BackendKeyData,
    DataRow,
    ErrorResponse,
    ParameterStatus,
)
from proxy.messages.errors import ClientProtocolError, ProtocolError, ServerProtocolError
from proxy.messages.frontend import Query, SASLInitialResponse
from proxy.messages.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
)
from proxy.metrics import Stats
from proxy.tracker import Tracker

if TYPE_CHECKING:
    from proxy.guard import Guard


class Phase(enum.Enum):
    STARTUP = "startup"  # waiting for SSLRequest, GSSENCRequest, StartupMessage or CancelRequest
    TLS = "tls"  # the server is running the client's TLS handshake
    CONNECTING = "connecting"  # StartupMessage received, upstream connection being opened
    AUTH = "auth"  # relaying the authentication exchange PostgreSQL drives
    # Authenticated; asking the server for the session's settings name resolution needs
    # before the client's first ReadyForQuery is passed on (policy sessions only).
    SETTINGS = "settings"
    READY = "ready"  # authenticated: relaying queries and results
    ENDING = "ending"  # shutting down: upstream ended; the client is told at its next message
    CLOSED = "closed"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTUP: frozenset({Phase.TLS, Phase.CONNECTING, Phase.CLOSED}),
    Phase.TLS: frozenset({Phase.STARTUP, Phase.CLOSED}),
    Phase.CONNECTING: frozenset({Phase.AUTH, Phase.CLOSED}),
    Phase.AUTH: frozenset({Phase.SETTINGS, Phase.READY, Phase.CLOSED}),
    Phase.SETTINGS: frozenset({Phase.READY, Phase.CLOSED}),
    Phase.READY: frozenset({Phase.ENDING, Phase.CLOSED}),
    Phase.ENDING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}

# Message type bytes, as ints (what indexing bytes gives).
_Q, _P, _B, _D, _E, _C, _S, _H, _F, _X = (ord(c) for c in "QPBDECSHFX")
_d, _c, _f, _p = (ord(c) for c in "dcfp")
_R, _K, _Z, _N, _v, _A = (ord(c) for c in "RKZNvA")
_T = ord("T")

FRONTEND_TYPES = frozenset((_Q, _P, _B, _D, _E, _C, _S, _H, _F, _X, _d, _c, _f))
# A client message that the server answers with exactly one ReadyForQuery.
_CYCLE_TYPES = frozenset((_Q, _S, _F))
# Server messages whose bodies the relay reads; every other body is skipped unread.
_SERVER_WANTED = frozenset((_Z, _S, _E))

_REPLICATION_ON = frozenset({"true", "on", "yes", "1", "database"})

_SHUTTING_DOWN = "pgwarden: terminating connection: proxy is shutting down"

# The search_path this session starts with, as the server computed it: the server default,
# ALTER DATABASE / ALTER ROLE [IN DATABASE] ... SET, and the startup packet's options, in
# PostgreSQL's own order of precedence. Qualified: the path may place pg_catalog last.
SETTINGS_QUERY = Query("SELECT pg_catalog.current_setting('search_path')").encode()
_SETTINGS_CLIENT_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class SessionSettings:
    tls_available: bool = False
    tls_required: bool = False
    allow_replication: bool = False
    max_message: int = 256 * 1024 * 1024


@dataclass(slots=True)
class Subject:
    """Who is on the other end, as known from start-up (and kept current)."""

    user: str = ""
    database: str = ""
    application_name: str = ""
    client_addr: str = ""
    client_port: int = 0
    tls: bool = False
    options: str = ""
    roles: frozenset[str] = frozenset()  # roles the user is a member of (policy subjects)


def error_bytes(
    sqlstate: str, message: str, *, fatal: bool = False, hint: str | None = None
) -> bytes:
    severity = "FATAL" if fatal else "ERROR"
    return ErrorResponse.make(sqlstate, message, severity=severity, hint=hint).encode()


@dataclass(slots=True)
class Session:
    settings: SessionSettings
    stats: Stats
    issue_key: Callable[[int], bytes]  # secret length -> a secret of pgwarden's for the client
    subject: Subject = field(default_factory=Subject)
    phase: Phase = Phase.STARTUP
    # Keys: what PostgreSQL gave us, and what we gave the client: the same backend pid (a
    # client's pg_terminate_backend, NOTIFY sender pids and pg_stat_activity lookups need
    # it), with a secret of pgwarden's own, so only pgwarden can cancel the backend.
    upstream_key: BackendKeyData | None = None
    client_key: BackendKeyData | None = None
    server_params: dict[str, str] = field(default_factory=dict)
    transaction_status: str = "I"
    shutting_down: bool = False
    _startup: StartupReader = field(default_factory=StartupReader)
    _client_reader: FrameReader | None = None
    _server_reader: FrameReader | None = None
    _scanner: FrameScanner | None = None
    # One entry per client message that PostgreSQL will answer with ReadyForQuery.
    _cycles: deque[float] = field(default_factory=deque)
    _early_client_bytes: bytes = b""
    # SETTINGS phase: what the client is yet to receive (the end of the authentication
    # exchange, its ReadyForQuery included), what the client sent meanwhile, and the answer.
    _held_for_client: bytes = b""
    _settings_client_bytes: bytes = b""
    _settings_value: str | None = None
    _settings_error: str | None = None
    _expect_sasl_initial: bool = False
    upstream_tls: bool = False
    channel_binding_passes: bool = False
    _server_sent_fatal: bool = False
    # Between AuthenticationOk and PrepareSession's answer: the server's bytes, held.
    _preparing: bool = False
    _held_server: bytes = b""
    # PostgreSQL closed while a statement's CommandComplete waited for the audit trail: what
    # it sent before closing (that CommandComplete, and the FATAL saying why) is still owed to
    # the client, so the client connection closes only once the trail has answered.
    _server_gone: bool = False
    # With a policy in force, the READY phase is relayed by a Tracker built from a Guard.
    make_guard: Callable[[Subject], Guard | None] | None = None
    tracker: Tracker | None = None

    def __post_init__(self) -> None:
        limit = self.settings.max_message
        self._client_reader = FrameReader(limit, from_client=True)
        self._server_reader = FrameReader(limit, from_client=False)
        self._scanner = FrameScanner(_SERVER_WANTED, limit, from_client=False, report_all=False)

    # --- phase bookkeeping ------------------------------------------------------------

    def _set_phase(self, new: Phase) -> None:
        if new not in TRANSITIONS[self.phase]:
            raise ProtocolError(f"session cannot move from {self.phase.value} to {new.value}")
        self.phase = new

    @property
    def busy(self) -> bool:
        """True while PostgreSQL owes the client a ReadyForQuery."""
        if self.tracker is not None:
            return self.tracker.busy
        return bool(self._cycles)

    @property
    def _idle(self) -> bool:
        status = self.tracker.transaction_status if self.tracker else self.transaction_status
        return not self.busy and status == "I"

    def _close_with(
        self, sqlstate: str, message: str, *, hint: str | None = None
    ) -> list[cmd.Command]:
        self.phase = Phase.CLOSED
        return [
            cmd.SendToClient(error_bytes(sqlstate, message, fatal=True, hint=hint)),
            cmd.CloseClient(),
            cmd.CloseServer(),
        ]

    def protocol_error(self, exc: ProtocolError) -> list[cmd.Command]:
        """The session broke the protocol: tell the client why (if it is the client's
        fault or the server's) and end this session only."""
        self.stats.protocol_errors += 1
        side = "server" if isinstance(exc, ServerProtocolError) else "client"
        out: list[cmd.Command] = [
            cmd.Log("protocol_error", "warning", {"side": side, "error": exc.message})
        ]
        if self.busy:
            out.append(cmd.CancelUpstream())
        if side == "server":
            message = f"pgwarden: invalid data from the PostgreSQL server: {exc.message}"
        else:
            message = f"pgwarden: invalid message from the client: {exc.message}"
        return out + self._close_with(exc.sqlstate, message)

    # --- events from the client -----------------------------------------------------------

    def client_data(self, data: bytes) -> list[cmd.Command]:
        if self.phase is Phase.READY:
            if self.tracker is not None:
                self.stats.bytes_from_client += len(data)
                out = self.tracker.client_data(data)
                if self.tracker.closed:
                    self.phase = Phase.CLOSED
                return out
            return self._relay_client(data)
        self.stats.bytes_from_client += len(data)
        if self.phase is Phase.STARTUP:
            self._startup.feed(data)
            return self._read_startup()
        if self.phase is Phase.AUTH:
            return self._auth_client(data)
        if self.phase is Phase.SETTINGS:
            # The client has not had its ReadyForQuery yet; a pipelining client may send
            # its first statements all the same. They go to the tracker once it is ready.
            self._settings_client_bytes += data
            if len(self._settings_client_bytes) > _SETTINGS_CLIENT_LIMIT:
                raise ClientProtocolError("client sent too much data before its session was ready")
            return []
        if self.phase is Phase.CONNECTING:
            # Nothing may come before PostgreSQL has answered the start-up; keep it so a
            # pipelining client is not broken, and let the AUTH phase judge it.
            self._early_client_bytes += data
            if len(self._early_client_bytes) > 65536:
                raise ClientProtocolError("client sent data before authentication started")
            return []
        if self.phase is Phase.TLS:
            raise ClientProtocolError("client sent data during the TLS handshake")
        if self.phase is Phase.ENDING:
            return self._close_with("57P01", _SHUTTING_DOWN)
        return []

    def _read_startup(self) -> list[cmd.Command]:
        if self._startup.starts_with_tls():
            return self._close_with(
                "08P01",
                "pgwarden: direct TLS negotiation is not supported",
                hint="connect with sslnegotiation=postgres (the default)",
            )
        body = self._startup.next_packet()
        if body is None:
            return []
        packet = decode_startup(body)
        if isinstance(packet, SSLRequest):
            if self.subject.tls:
                raise ClientProtocolError("SSLRequest received on a connection already using TLS")
            if self._startup.take_rest():
                # Bytes after SSLRequest before the handshake: a man-in-the-middle could
                # inject them as if they were protected (CVE-2021-23214); refuse.
                raise ClientProtocolError("unencrypted data after SSL request")
            if self.settings.tls_available:
                self._set_phase(Phase.TLS)
                return [cmd.SendToClient(b"S"), cmd.StartClientTLS()]
            return [cmd.SendToClient(b"N")]
        if isinstance(packet, GSSENCRequest):
            # GSSAPI encryption is not offered; libpq then falls back to SSL or plain.
            return [cmd.SendToClient(b"N")]
        if isinstance(packet, CancelRequest):
            self.phase = Phase.CLOSED
            return [cmd.ForwardCancel(packet.pid, packet.secret), cmd.CloseClient()]
        return self._startup_message(packet)

    def tls_established(self) -> list[cmd.Command]:
        self._set_phase(Phase.STARTUP)
        self.subject.tls = True
        return self._read_startup()

    def _startup_message(self, msg: StartupMessage) -> list[cmd.Command]:
        s = self.subject
        s.user = msg.get("user") or ""
        s.database = msg.get("database") or s.user
        s.application_name = msg.get("application_name") or ""
        s.options = msg.get("options") or ""
        if not s.user:
            self.stats.refused_connections += 1
            return self._close_with("28000", "no PostgreSQL user name specified in startup packet")
        if self.settings.tls_required and not s.tls:
            self.stats.refused_connections += 1
            return self._close_with(
                "28000",
                "pgwarden: this proxy accepts only TLS connections",
                hint="connect with sslmode=require (or stricter)",
            )
        replication = (msg.get("replication") or "").lower()
        if replication in _REPLICATION_ON and not self.settings.allow_replication:
            self.stats.refused_connections += 1
            return self._close_with(
                "28000",
                "pgwarden: replication connections are not allowed through this proxy",
                hint="set allow_replication: true in the pgwarden config to permit them",
            )
        self._early_client_bytes = self._startup.take_rest()
        self._set_phase(Phase.CONNECTING)
        return [
            cmd.Log(
                "session_start",
                fields={
                    "user": s.user,
                    "database": s.database,
                    "application_name": s.application_name,
                    "client": f"{s.client_addr}:{s.client_port}",
                    "tls": s.tls,
                },
            ),
            cmd.OpenUpstream(msg),
        ]

    def upstream_ready(
        self, startup: StartupMessage, *, tls: bool = False, same_certificate: bool = False
    ) -> list[cmd.Command]:
        """The upstream connection is open (and TLS set up as configured).

        ``same_certificate`` says pgwarden showed the client the very certificate
        PostgreSQL showed pgwarden, so SCRAM channel binding holds end to end.
        """
        self.upstream_tls = tls
        self.channel_binding_passes = same_certificate and self.subject.tls
        self._set_phase(Phase.AUTH)
        out: list[cmd.Command] = [cmd.SendToServer(startup.encode())]
        if self._early_client_bytes:
            early, self._early_client_bytes = self._early_client_bytes, b""
            out += self._auth_client(early)
        return out

    def upstream_failed(self, reason: str) -> list[cmd.Command]:
        self.stats.refused_connections += 1
        return [cmd.Log("upstream_unreachable", "error", {"error": reason})] + self._close_with(
            "08001", f"pgwarden: could not connect to the PostgreSQL server: {reason}"
        )

    def _auth_client(self, data: bytes) -> list[cmd.Command]:
        assert self._client_reader is not None
        raw, frames = self._client_reader.feed(data)
        for t, start, end in frames:
            # Password, SASL and GSS responses all travel as 'p'; pgwarden never reads them,
            # except for the channel-binding flag at the very start of a SCRAM exchange.
            if t == _p and self._expect_sasl_initial:
                self._expect_sasl_initial = False
                refusal = self._check_gs2_header(raw[start:end])
                if refusal:
                    return refusal
            if t == _X:
                self.phase = Phase.CLOSED
                return [cmd.SendToServer(raw), cmd.CloseServer(), cmd.CloseClient()]
            if t != _p:
                raise ClientProtocolError(
                    f"unexpected message type {chr(t)!r} during authentication"
                )
        return [cmd.SendToServer(raw)] if raw else []

    def _relay_client(self, data: bytes) -> list[cmd.Command]:
        stats = self.stats
        stats.bytes_from_client += len(data)
        assert self._client_reader is not None
        raw, types = self._client_reader.feed_types(data)
        cycles = self._cycles
        for t in types:
            if t in _CYCLE_TYPES:
                cycles.append(time.perf_counter())
                if t == _Q:
                    stats.statements += 1
            elif t == _E:
                stats.statements += 1
            elif t == _X:
                self.phase = Phase.CLOSED
                return [cmd.SendToServer(raw), cmd.CloseServer(), cmd.CloseClient()]
            elif t not in FRONTEND_TYPES:
                raise ClientProtocolError(f"unknown message type {chr(t)!r}")
        return [cmd.SendToServer(raw)] if raw else []

    def client_closed(self) -> list[cmd.Command]:
        """The client went away (closed, reset, or killed)."""
        if self.phase is Phase.CLOSED:
            return [cmd.CloseServer()]
        was_busy = self.busy and self.phase is Phase.READY
        self.phase = Phase.CLOSED
        if self.tracker is not None:
            self.tracker.abandon()
        out: list[cmd.Command] = []
        if was_busy:
            # The backend may be deep in a long statement and will not notice the closed
            # socket until it writes; cancel it so it is freed now.
            out.append(cmd.CancelUpstream())
            out.append(cmd.Log("client_gone_mid_statement", "warning"))
        out.append(cmd.CloseServer())
        return out

    # --- events from the server ---------------------------------------------------------------

    def server_data(self, data: bytes) -> list[cmd.Command]:
        if self.phase is Phase.READY:
            if self.tracker is not None:
                return self._relay_tracked_server(data)
            return self._relay_server(data)
        self.stats.bytes_from_server += len(data)
        if self.phase is Phase.AUTH:
            if self._preparing:
                self._held_server += data
                return []
            return self._auth_server(data)
        if self.phase is Phase.SETTINGS:
            return self._settings_server(data)
        if self.phase in (Phase.ENDING, Phase.CLOSED):
            return []
        raise ServerProtocolError(f"server sent data while the session is {self.phase.value}")

    def _auth_server(self, data: bytes) -> list[cmd.Command]:
        assert self._server_reader is not None
        raw, frames = self._server_reader.feed(data)
        out: list[cmd.Command] = []
        pieces: list[bytes] = []
        for t, start, end in frames:
            body = raw[start:end]
            whole = raw[start - 5 : end]
            if t == _R:
                auth = Authentication.decode(body)
                if auth.code == AUTH_SASL:
                    self._expect_sasl_initial = True
                    whole, refusal = self._filter_sasl(auth)
                    if refusal:
                        return refusal
                pieces.append(whole)
                if auth.code == AUTH_OK:
                    out.append(cmd.Log("authenticated"))
                    if self.make_guard is not None:
                        # Only now, with the server's word that the client may use this
                        # database, does pgwarden load its catalog: an unknown database, a
                        # wrong password or a full server reach the client as PostgreSQL's
                        # own errors, and no unauthenticated client makes pgwarden connect
                        # anywhere.  What follows waits until the policy can be enforced.
                        self._preparing = True
                        self._held_server = raw[end:] + self._server_reader.take_pending()
                        out.insert(0, cmd.SendToClient(b"".join(pieces)))
                        out.append(cmd.PrepareSession())
                        return out
            elif t == _K:
                self.upstream_key = BackendKeyData.decode(body)
                secret = self.issue_key(len(self.upstream_key.secret))
                self.client_key = BackendKeyData(self.upstream_key.pid, secret)
                pieces.append(self.client_key.encode())
            elif t == _S:
                p = ParameterStatus.decode(body)
                self._parameter(p.name, p.value)
                pieces.append(whole)
            elif t == _E:
                err = ErrorResponse.decode(body)
                self.stats.auth_failures += 1
                self._server_sent_fatal = True
                pieces.append(whole)
                out.append(
                    cmd.Log(
                        "auth_failed",
                        "warning",
                        {
                            "sqlstate": err.sqlstate,
                            "message": err.message,
                            "user": self.subject.user,
                        },
                    )
                )
            elif t == _Z:
                pieces.append(whole)
                self._start_tracking()
                leftover = raw[end:] + self._server_reader.take_pending()
                if self.tracker is not None:
                    # Names in the client's statements resolve through the search_path the
                    # server gave this session: ask for it before the client may send any.
                    self._set_phase(Phase.SETTINGS)
                    self._held_for_client = b"".join(pieces)
                    out.append(cmd.SendToServer(SETTINGS_QUERY))
                    if leftover:
                        out += self.server_data(leftover)
                    return out
                self._set_phase(Phase.READY)
                out.insert(0, cmd.SendToClient(b"".join(pieces)))
                out.append(cmd.Log("session_ready"))
                # Anything after ReadyForQuery belongs to the relay (e.g. a NOTIFY).
                if leftover:
                    out += self.server_data(leftover)
                return out
            elif t in (_N, _v):
                pieces.append(whole)
            else:
                raise ServerProtocolError(
                    f"unexpected message type {chr(t)!r} during authentication"
                )
        if pieces:
            out.insert(0, cmd.SendToClient(b"".join(pieces)))
        return out

    def _settings_server(self, data: bytes) -> list[cmd.Command]:
        """The server's answer to ``SETTINGS_QUERY``; at its ReadyForQuery the session is
        ready and the client gets the ReadyForQuery held for it."""
        assert self._server_reader is not None and self.tracker is not None
        raw, frames = self._server_reader.feed(data)
        out: list[cmd.Command] = []
        for t, start, end in frames:
            body = raw[start:end]
            if t == _D:
                values = DataRow.decode(body).values
                value = values[0] if values else None
                self._settings_value = value.decode("utf-8", "replace") if value else ""
            elif t == _E:
                err = ErrorResponse.decode(body)
                self._settings_error = f"{err.sqlstate}: {err.message}"
                if err.get("S") in ("FATAL", "PANIC"):
                    # The server is ending the session (shutdown, terminated backend).
                    self._server_sent_fatal = True
                    held, self._held_for_client = self._held_for_client, b""
                    return [cmd.SendToClient(held + raw[start - 5 : end])]
            elif t == _S:
                p = ParameterStatus.decode(body)
                self._parameter(p.name, p.value)
                self._held_for_client += raw[start - 5 : end]
            elif t in (_N, _A):
                self._held_for_client += raw[start - 5 : end]
            elif t == _Z:
                out += self._settings_done()
                leftover = raw[end:] + self._server_reader.take_pending()
                early, self._settings_client_bytes = self._settings_client_bytes, b""
                if early:
                    out += self.client_data(early)
                if leftover:
                    out += self.server_data(leftover)
                return out
            elif t not in (_T, _C):
                raise ServerProtocolError(
                    f"unexpected message type {chr(t)!r} while reading the session's settings"
                )
        return out

    def _settings_done(self) -> list[cmd.Command]:
        assert self.tracker is not None
        out: list[cmd.Command] = []
        if self._settings_value is not None:
            self.tracker.guard.set_server_search_path(self._settings_value)
        else:
            # The startup options' path (or the default) stays: say so, since names may
            # then resolve otherwise than on the server.
            out.append(
                cmd.Log(
                    "settings_unknown",
                    "warning",
                    {"reason": self._settings_error or "no value", "user": self.subject.user},
                )
            )
        self._set_phase(Phase.READY)
        held, self._held_for_client = self._held_for_client, b""
        return [cmd.SendToClient(held), cmd.Log("session_ready"), *out]

    def session_prepared(self, failure: str | None) -> list[cmd.Command]:
        """The catalog and roles for this session are loaded (``failure`` None), or cannot be:
        then the session ends, with pgwarden's own error saying so, since the policy could
        not be enforced on it.  If PostgreSQL itself refused the session after
        authenticating it (an unknown database, too many connections), the client gets
        PostgreSQL's error instead: it is the true reason."""
        if self.phase is not Phase.AUTH or not self._preparing:
            return []
        self._preparing = False
        held, self._held_server = self._held_server, b""
        if failure is not None:
            refused = self._server_refusal(held)
            if refused:
                return refused + [cmd.CloseClient(), cmd.CloseServer()]
            self.stats.refused_connections += 1
            return [cmd.Log("session_refused", "error", {"error": failure})] + self._close_with(
                "08001", f"pgwarden: {failure}"
            )
        return self._auth_server(held) if held else []

    def _server_refusal(self, held: bytes) -> list[cmd.Command]:
        """Relay the first ErrorResponse among held server bytes (nothing else of them)."""
        pos = 0
        while len(held) - pos >= 5:
            t = held[pos]
            end = pos + 1 + int.from_bytes(held[pos + 1 : pos + 5], "big")
            if end > len(held):
                break
            if t == _E:
                self.phase = Phase.CLOSED
                return self._auth_server(held[pos:end])
            pos = end
        return []

    def _filter_sasl(self, auth: Authentication) -> tuple[bytes, list[cmd.Command]]:
        # With TLS terminated here, channel binding would bind the client to pgwarden's
        # certificate and the server to its own: SCRAM-SHA-256-PLUS can never succeed, so
        # offer only what survives.  A client that requires channel binding then fails
        # with libpq's own clear message.  The exception: when pgwarden presents the same
        # certificate as PostgreSQL, both ends compute the same binding and -PLUS works.
        # (Without -PLUS, libpq on TLS sends the gs2 flag 'y', which PostgreSQL on a TLS
        # link refuses as a downgrade: plain SCRAM then needs a non-TLS upstream link.)
        if self.channel_binding_passes:
            return Authentication.sasl(auth.mechanisms).encode(), []
        kept = tuple(m for m in auth.mechanisms if not m.endswith("-PLUS"))
        if not kept:
            return b"", self._close_with(
                "28000",
                "pgwarden: the server offers only channel-binding SASL mechanisms, "
                "which cannot work through a proxy that terminates TLS",
            )
        return Authentication.sasl(kept).encode(), []

    def _check_gs2_header(self, body: bytes) -> list[cmd.Command]:
        # A TLS client that is not offered -PLUS answers "y": "I can bind, I think you
        # cannot".  PostgreSQL on a TLS connection *can*, so it must refuse that as a
        # possible downgrade attack, with a message that blames the client.  Say what is
        # really going on instead, and how to fix it.
        if not (self.subject.tls and self.upstream_tls):
            return []
        try:
            first = SASLInitialResponse.decode(body)
        except ProtocolError:
            return []
        if first.data is None or not first.data.startswith(b"y,"):
            return []
        self.stats.refused_connections += 1
        return self._close_with(
            "28000",
            "pgwarden: SCRAM channel binding cannot pass through pgwarden: it terminates "
            "the client's TLS and opens its own TLS connection to PostgreSQL",
            hint="connect with channel_binding=disable, or give pgwarden the same "
            "certificate and key as the PostgreSQL server so channel binding holds end to end",
        )

    def _parameter(self, name: str, value: str) -> None:
        self.server_params[name] = value
        if name == "standard_conforming_strings" and self.tracker is not None:
            self.tracker.guard.nonstandard_strings = value != "on"
        if name == "client_encoding" and self.tracker is not None:
            self.tracker.guard.foreign_encoding = foreign_encoding(
                self.server_params.get("client_encoding")
            )
        if name == "application_name":
            self.subject.application_name = value
            if self.tracker is not None:
                self.tracker.guard.set_application(value)

    def _start_tracking(self) -> None:
        if self.make_guard is None:
            return
        guard = self.make_guard(self.subject)
        if guard is None:
            return
        # Set by a startup option or ALTER ROLE ... SET: the server reads '\'' as a quote.
        guard.nonstandard_strings = self.server_params.get("standard_conforming_strings") == "off"
        guard.foreign_encoding = foreign_encoding(self.server_params.get("client_encoding"))
        assert self._client_reader is not None
        tracker = Tracker(guard, self.stats, self.settings.max_message, self._parameter)
        tracker.ledger = tracker.durable = guard.audit
        # Bytes the client sent early continue in the tracker's reader.
        tracker.client_reader = self._client_reader
        self.tracker = tracker

    def counts_recorded(self) -> list[cmd.Command]:
        """A RecordUsage, a need-to-know lookup or the cancel of a cut-off statement is done
        (or failed): held statements may go on."""
        if self.tracker is None or self.phase is not Phase.READY:
            return []
        return self.tracker.counts_recorded()

    def durable_result(self, ok: bool) -> list[cmd.Command]:
        """The audit trail persisted (or failed to persist) a held statement's event."""
        if self.tracker is None or self.phase is not Phase.READY:
            return []
        out = self.tracker.durable_result(ok)
        if self._server_gone and self.tracker.awaiting is None:
            self._server_gone = False
            self._server_sent_fatal |= self.tracker.server_sent_fatal
            return out + self.server_closed()
        if self.shutting_down and self._idle:
            out += self._end_upstream()
        return out

    def _relay_tracked_server(self, data: bytes) -> list[cmd.Command]:
        assert self.tracker is not None
        self.stats.bytes_from_server += len(data)
        out = self.tracker.server_data(data)
        if self.tracker.server_sent_fatal:
            self._server_sent_fatal = True
        if self.shutting_down and self._idle:
            out += self._end_upstream()
        return out

    def _relay_server(self, data: bytes) -> list[cmd.Command]:
        self.stats.bytes_from_server += len(data)
        assert self._scanner is not None
        out: list[cmd.Command] = [cmd.SendToClient(data)]
        for t, _end, body in self._scanner.scan(data):
            if t == _Z:
                assert body is not None
                self._ready_for_query(body)
            elif t == _S:
                assert body is not None
                p = ParameterStatus.decode(body)
                self._parameter(p.name, p.value)
            elif t == _E:
                assert body is not None
                err = ErrorResponse.decode(body)
                if err.get("V") in ("FATAL", "PANIC") or err.get("S") in ("FATAL", "PANIC"):
                    self._server_sent_fatal = True
        if self.shutting_down and not self._cycles and self.transaction_status == "I":
            out += self._end_upstream()
        return out

    def _ready_for_query(self, body: bytes) -> None:
        if len(body) != 1:
            raise ServerProtocolError("ReadyForQuery with an invalid status")
        self.transaction_status = chr(body[0])
        if self._cycles:
            started = self._cycles.popleft()
            self.stats.observe_latency(time.perf_counter() - started)

    def server_closed(self) -> list[cmd.Command]:
        """PostgreSQL closed the connection (terminated backend, crash, network)."""
        if self._preparing:
            # Refused right after authenticating the client (unknown database, too many
            # connections): what it said is held; pass its error on, not "lost".
            self._preparing = False
            held, self._held_server = self._held_server, b""
            refused = self._server_refusal(held)
            if refused:
                return refused + [cmd.CloseClient()]
        if self.phase is Phase.CLOSED:
            return [cmd.CloseClient()]
        if self.phase is Phase.ENDING:
            return []  # we ended it; the client hears why at its next message
        if (
            self.phase is Phase.READY
            and self.tracker is not None
            and self.tracker.awaiting is not None
        ):
            self._server_gone = True
            return []
        self.phase = Phase.CLOSED
        if self._server_sent_fatal:
            # PostgreSQL already told the client why (e.g. authentication failed).
            return [cmd.CloseClient()]
        return [
            cmd.Log("upstream_lost", "warning"),
            cmd.SendToClient(
                error_bytes(
                    "08006",
                    "pgwarden: the connection to the PostgreSQL server was lost",
                    fatal=True,
                )
            ),
            cmd.CloseClient(),
        ]

    # --- shutdown ----------------------------------------------------------------------------

    def begin_shutdown(self) -> list[cmd.Command]:
        """Stop at the next idle point: an idle session ends now, a busy one after its
        statement (and transaction) completes."""
        self.shutting_down = True
        if self.phase is not Phase.READY:
            if self.phase in (Phase.ENDING, Phase.CLOSED):
                return []
            return self._close_with("57P01", _SHUTTING_DOWN)
        if self._idle:
            return self._end_upstream() + self._close_with("57P01", _SHUTTING_DOWN)
        return []

    def _end_upstream(self) -> list[cmd.Command]:
        """The last statement of a shutting-down session is done: end the backend, and keep
        the client connection until the client sends its next message.

        A FATAL sent right behind the ReadyForQuery reaches libpq while it is idle, and
        libpq then shows it only as a notice; the client's next query meets a closed
        connection with no reason given.  Sent as the answer to that query, it is an error
        the client sees (57P01, as PostgreSQL's own shutdown gives).
        """
        self._set_phase(Phase.ENDING)
        return [cmd.SendToServer(b"X\x00\x00\x00\x04"), cmd.CloseServer()]

    @property
    def working(self) -> bool:
        """True while shutdown must wait for this session (it still has a backend)."""
        return self.phase not in (Phase.ENDING, Phase.CLOSED)

    def force_close(self) -> list[cmd.Command]:
        """Shutdown timeout reached: end the session whatever it is doing."""
        if self.phase is Phase.CLOSED:
            return [cmd.CloseClient(), cmd.CloseServer()]
        if self.phase is Phase.ENDING:
            return self._close_with("57P01", _SHUTTING_DOWN)
        out: list[cmd.Command] = [cmd.CancelUpstream()] if self.busy else []
        return out + self._close_with(
            "57P01", "pgwarden: terminating connection: proxy shutdown timeout reached"
        )
