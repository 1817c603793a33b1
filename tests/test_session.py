"""The session state machine fed with messages, no sockets: what goes in, what comes out."""

from __future__ import annotations

import pytest

from proxy import commands as cmd
from proxy.messages.backend import (
    AUTH_CLEARTEXT,
    Authentication,
    BackendKeyData,
    BindComplete,
    CommandComplete,
    DataRow,
    ErrorResponse,
    Field,
    ParameterStatus,
    ParseComplete,
    ReadyForQuery,
    RowDescription,
)
from proxy.messages.decode import decode_backend
from proxy.messages.errors import ClientProtocolError
from proxy.messages.frontend import (
    Bind,
    Execute,
    Parse,
    PasswordMessage,
    Query,
    SASLInitialResponse,
    Sync,
    Terminate,
)
from proxy.messages.startup import (
    PROTOCOL_3_0,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
)
from proxy.metrics import Stats
from proxy.session import Phase, Session, SessionSettings

STARTUP = StartupMessage(
    PROTOCOL_3_0, (("user", "alice"), ("database", "support"), ("application_name", "helpdesk"))
)


def new_session(**settings: object) -> Session:
    keys = iter([b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"])
    return Session(SessionSettings(**settings), Stats(), lambda n: next(keys))  # type: ignore[arg-type]


def to_client(commands: list[cmd.Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, cmd.SendToClient))


def to_server(commands: list[cmd.Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, cmd.SendToServer))


def client_messages(data: bytes) -> list[object]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        out.append(decode_backend(data[pos], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def ready_session() -> Session:
    """A session that has passed start-up and authentication."""
    s = new_session()
    out = s.client_data(STARTUP.encode())
    assert any(isinstance(c, cmd.OpenUpstream) for c in out)
    assert to_server(s.upstream_ready(STARTUP)) == STARTUP.encode()
    s.server_data(
        Authentication(0).encode()
        + ParameterStatus("application_name", "helpdesk").encode()
        + BackendKeyData(77, b"real").encode()
        + ReadyForQuery("I").encode()
    )
    assert s.phase is Phase.READY
    return s


def test_startup_records_the_subject_and_opens_upstream() -> None:
    s = new_session()
    s.subject.client_addr = "10.0.0.5"
    out = s.client_data(STARTUP.encode())
    opened = [c for c in out if isinstance(c, cmd.OpenUpstream)]
    assert opened == [cmd.OpenUpstream(STARTUP)]
    assert (s.subject.user, s.subject.database, s.subject.application_name) == (
        "alice",
        "support",
        "helpdesk",
    )
    assert s.phase is Phase.CONNECTING


def test_startup_split_across_many_chunks() -> None:
    s = new_session()
    wire = STARTUP.encode()
    outs = [s.client_data(wire[i : i + 3]) for i in range(0, len(wire), 3)]
    assert sum(isinstance(c, cmd.OpenUpstream) for out in outs for c in out) == 1


def test_ssl_request_is_declined_without_a_certificate() -> None:
    s = new_session()
    assert to_client(s.client_data(SSLRequest().encode())) == b"N"
    assert s.phase is Phase.STARTUP  # the client may go on in clear


def test_ssl_request_starts_tls_with_a_certificate() -> None:
    s = new_session(tls_available=True)
    out = s.client_data(SSLRequest().encode())
    assert to_client(out) == b"S"
    assert any(isinstance(c, cmd.StartClientTLS) for c in out)
    s.tls_established()
    assert s.subject.tls is True
    assert any(isinstance(c, cmd.OpenUpstream) for c in s.client_data(STARTUP.encode()))


def test_bytes_smuggled_after_ssl_request_end_the_session() -> None:
    s = new_session(tls_available=True)
    with pytest.raises(ClientProtocolError, match="unencrypted data after SSL request"):
        s.client_data(SSLRequest().encode() + Query("select 1").encode())


def test_gssenc_request_is_declined_and_startup_continues() -> None:
    s = new_session()
    assert to_client(s.client_data(GSSENCRequest().encode())) == b"N"
    assert any(isinstance(c, cmd.OpenUpstream) for c in s.client_data(STARTUP.encode()))


def test_cancel_request_is_handed_to_the_server_and_the_connection_closed() -> None:
    s = new_session()
    out = s.client_data(CancelRequest(1001, b"\x01\x02\x03\x04").encode())
    assert cmd.ForwardCancel(1001, b"\x01\x02\x03\x04") in out
    assert cmd.CloseClient() in out
    assert to_client(out) == b""  # PostgreSQL answers a cancel with silence, so do we


@pytest.mark.parametrize("value", ["true", "database", "on"])
def test_replication_is_refused_unless_allowed(value: str) -> None:
    startup = StartupMessage(PROTOCOL_3_0, (("user", "u"), ("replication", value)))
    out = new_session().client_data(startup.encode())
    (err,) = client_messages(to_client(out))
    assert isinstance(err, ErrorResponse)
    assert err.sqlstate == "28000"
    assert "replication connections are not allowed" in err.message
    assert not any(isinstance(c, cmd.OpenUpstream) for c in out)
    allowed = new_session(allow_replication=True).client_data(startup.encode())
    assert any(isinstance(c, cmd.OpenUpstream) for c in allowed)


def test_plain_connection_refused_when_tls_is_required() -> None:
    out = new_session(tls_available=True, tls_required=True).client_data(STARTUP.encode())
    (err,) = client_messages(to_client(out))
    assert isinstance(err, ErrorResponse)
    assert (err.sqlstate, err.get("S")) == ("28000", "FATAL")
    assert "only TLS" in err.message


def test_channel_binding_mechanisms_are_not_offered() -> None:
    s = new_session()
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP)
    out = s.server_data(Authentication.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")).encode())
    (auth,) = client_messages(to_client(out))
    assert isinstance(auth, Authentication)
    assert auth.mechanisms == ("SCRAM-SHA-256",)


def test_a_server_offering_only_channel_binding_is_refused_clearly() -> None:
    s = new_session()
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP)
    out = s.server_data(Authentication.sasl(("SCRAM-SHA-256-PLUS",)).encode())
    (err,) = client_messages(to_client(out))
    assert isinstance(err, ErrorResponse)
    assert "channel-binding" in err.message


def test_password_messages_pass_through_unread() -> None:
    s = new_session()
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP)
    s.server_data(Authentication(AUTH_CLEARTEXT).encode())
    password = PasswordMessage(b"hunter2\0").encode()
    out = s.client_data(password)
    assert to_server(out) == password
    assert not any(isinstance(c, cmd.Log) and "hunter2" in repr(c) for c in out)


def test_queries_before_authentication_ends_are_a_protocol_error() -> None:
    s = new_session()
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP)
    with pytest.raises(ClientProtocolError, match="during authentication"):
        s.client_data(Query("select 1").encode())


def test_client_gets_the_backends_pid_with_a_secret_of_the_proxys() -> None:
    s = new_session()
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP)
    out = s.server_data(
        Authentication(0).encode()
        + BackendKeyData(77, b"real").encode()
        + ReadyForQuery("I").encode()
    )
    msgs = client_messages(to_client(out))
    assert msgs == [
        Authentication(0),
        BackendKeyData(77, b"\x01\x02\x03\x04"),
        ReadyForQuery("I"),
    ]
    assert s.upstream_key == BackendKeyData(77, b"real")


def test_long_protocol_3_2_keys_are_replaced_by_keys_of_the_same_length() -> None:
    lengths = []

    def issue(n: int) -> bytes:
        lengths.append(n)
        return b"k" * n

    s = Session(SessionSettings(), Stats(), issue)
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP)
    s.server_data(BackendKeyData(77, b"x" * 32).encode() + ReadyForQuery("I").encode())
    assert lengths == [32]


def test_authentication_failure_is_passed_on_and_counted() -> None:
    s = new_session()
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP)
    err = ErrorResponse.make(
        "28P01", 'password authentication failed for user "alice"', severity="FATAL"
    )
    out = s.server_data(err.encode())
    assert client_messages(to_client(out)) == [err]
    assert s.stats.auth_failures == 1
    assert s.server_closed() == [cmd.CloseClient()]  # no second error on top of PostgreSQL's


def test_results_are_forwarded_whole_and_cycles_tracked() -> None:
    s = ready_session()
    q = Query("select 1").encode()
    assert to_server(s.client_data(q)) == q
    assert s.busy
    result = (
        RowDescription((Field("x", 0, 0, 23, 4, -1, 0),)).encode()
        + DataRow((b"1",)).encode()
        + CommandComplete("SELECT 1").encode()
        + ReadyForQuery("I").encode()
    )
    assert to_client(s.server_data(result)) == result
    assert not s.busy
    assert s.stats.latency_count == 1


def test_pipelined_extended_batch_is_one_cycle_per_sync() -> None:
    s = ready_session()
    batch = b"".join(
        x.encode()
        for x in (Parse("", "select 1"), Bind("", ""), Execute(""), Parse("", "select x"), Bind("", ""),
                  Execute(""), Sync())
    )  # fmt: skip
    assert to_server(s.client_data(batch)) == batch
    assert s.stats.statements == 2
    assert s.busy
    err = ErrorResponse.make("42703", 'column "x" does not exist')
    s.server_data(
        ParseComplete().encode() + BindComplete().encode() + CommandComplete("SELECT 1").encode()
    )
    assert s.busy
    s.server_data(err.encode() + ReadyForQuery("I").encode())
    assert not s.busy


def test_an_error_without_sqlstate_passes_through_and_the_session_goes_on() -> None:
    s = ready_session()
    s.client_data(Query("select 1").encode())
    odd = (
        ErrorResponse((("S", "ERROR"), ("M", "something odd"))).encode()
        + ReadyForQuery("I").encode()
    )
    assert to_client(s.server_data(odd)) == odd
    assert s.phase is Phase.READY and not s.busy


def test_parameter_status_mid_session_updates_what_we_know() -> None:
    s = ready_session()
    s.server_data(ParameterStatus("application_name", "reports").encode())
    assert s.subject.application_name == "reports"
    assert s.server_params["application_name"] == "reports"


def test_unknown_client_message_type_is_a_protocol_error() -> None:
    s = ready_session()
    with pytest.raises(ClientProtocolError, match="unknown message type"):
        s.client_data(b"~\x00\x00\x00\x04")


def test_protocol_error_tells_the_client_and_closes_only_this_session() -> None:
    s = ready_session()
    out = s.protocol_error(ClientProtocolError("bad thing"))
    (err,) = client_messages(to_client(out))
    assert isinstance(err, ErrorResponse)
    assert err.sqlstate == "08P01"
    assert "bad thing" in err.message
    assert cmd.CloseClient() in out and cmd.CloseServer() in out


def test_a_client_gone_mid_statement_has_its_statement_cancelled() -> None:
    s = ready_session()
    s.client_data(Query("select pg_sleep(60)").encode())
    out = s.client_closed()
    assert cmd.CancelUpstream() in out and cmd.CloseServer() in out
    idle = ready_session()
    assert cmd.CancelUpstream() not in idle.client_closed()


def test_terminate_is_passed_on_and_both_sides_close() -> None:
    s = ready_session()
    out = s.client_data(Terminate().encode())
    assert to_server(out) == Terminate().encode()
    assert cmd.CloseServer() in out and cmd.CloseClient() in out


def test_losing_the_server_is_reported_to_the_client() -> None:
    s = ready_session()
    out = s.server_closed()
    (err,) = client_messages(to_client(out))
    assert isinstance(err, ErrorResponse)
    assert (err.sqlstate, err.get("S")) == ("08006", "FATAL")


def test_shutdown_waits_for_the_running_statement_and_transaction() -> None:
    s = ready_session()
    s.client_data(Query("begin; select pg_sleep(1)").encode())
    assert s.begin_shutdown() == []
    # The statement ends inside a transaction block: keep going.
    assert cmd.CloseClient() not in s.server_data(
        CommandComplete("SELECT 1").encode() + ReadyForQuery("T").encode()
    )
    s.client_data(Query("commit").encode())
    out = s.server_data(CommandComplete("COMMIT").encode() + ReadyForQuery("I").encode())
    assert client_messages(to_client(out)) == [CommandComplete("COMMIT"), ReadyForQuery("I")]
    # The backend is ended now; the client hears why as the answer to its next message
    # (a FATAL sent while libpq is idle would only show as a notice).
    assert to_server(out) == Terminate().encode()
    assert cmd.CloseServer() in out
    later = s.client_data(Query("select 1").encode())
    (err,) = client_messages(to_client(later))
    assert isinstance(err, ErrorResponse) and err.sqlstate == "57P01"
    assert cmd.CloseClient() in later


def test_idle_sessions_end_at_once_on_shutdown() -> None:
    s = ready_session()
    out = s.begin_shutdown()
    (err,) = client_messages(to_client(out))
    assert isinstance(err, ErrorResponse) and err.sqlstate == "57P01"
    assert to_server(out) == Terminate().encode()


def _sasl_session(
    *, client_tls: bool, upstream_tls: bool, same_certificate: bool = False
) -> tuple[Session, bytes]:
    s = new_session(tls_available=True)
    if client_tls:
        s.client_data(SSLRequest().encode())
        s.tls_established()
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP, tls=upstream_tls, same_certificate=same_certificate)
    out = s.server_data(Authentication.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")).encode())
    return s, to_client(out)


def test_scram_downgrade_flag_over_tls_both_ways_gets_an_explanation_not_a_riddle() -> None:
    s, _ = _sasl_session(client_tls=True, upstream_tls=True)
    first = SASLInitialResponse("SCRAM-SHA-256", b"y,,n=,r=abcdef").encode()
    out = s.client_data(first)
    assert to_server(out) == b""  # never reaches PostgreSQL, which would blame the client
    (err,) = client_messages(to_client(out))
    assert isinstance(err, ErrorResponse)
    assert err.sqlstate == "28000"
    assert "channel binding cannot pass through pgwarden" in err.message
    assert "channel_binding=disable" in (err.get("H") or "")


@pytest.mark.parametrize(("client_tls", "upstream_tls"), [(True, False), (False, True)])
def test_scram_passes_when_only_one_side_uses_tls(client_tls: bool, upstream_tls: bool) -> None:
    s, _ = _sasl_session(client_tls=client_tls, upstream_tls=upstream_tls)
    first = SASLInitialResponse("SCRAM-SHA-256", b"y,,n=,r=abcdef").encode()
    assert to_server(s.client_data(first)) == first


def test_channel_binding_is_offered_when_pgwarden_shows_the_servers_own_certificate() -> None:
    s, offered = _sasl_session(client_tls=True, upstream_tls=True, same_certificate=True)
    (auth,) = client_messages(offered)
    assert isinstance(auth, Authentication)
    assert auth.mechanisms == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    first = SASLInitialResponse("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=x").encode()
    assert to_server(s.client_data(first)) == first


# --- a guarded session: the catalog is loaded once PostgreSQL has authenticated the client ---


def guarded_session() -> Session:
    s = new_session()
    s.make_guard = lambda subject: None
    s.client_data(STARTUP.encode())
    s.upstream_ready(STARTUP)
    return s


AFTER_AUTH = BackendKeyData(77, b"real").encode() + ReadyForQuery("I").encode()


def test_a_guarded_session_waits_for_its_catalog_after_authentication() -> None:
    s = guarded_session()
    out = s.server_data(Authentication(0).encode() + AFTER_AUTH)
    assert client_messages(to_client(out)) == [Authentication(0)]
    assert cmd.PrepareSession() in out
    assert s.phase is Phase.AUTH
    out = s.session_prepared(None)
    assert client_messages(to_client(out)) == [
        BackendKeyData(77, b"\x01\x02\x03\x04"),
        ReadyForQuery("I"),
    ]
    assert s.phase is Phase.READY


def test_a_catalog_that_cannot_load_ends_the_session_with_pgwardens_error() -> None:
    s = guarded_session()
    s.server_data(Authentication(0).encode() + AFTER_AUTH)
    (err,) = client_messages(to_client(s.session_prepared("policy cannot be enforced: x")))
    assert isinstance(err, ErrorResponse)
    assert (err.sqlstate, err.message) == ("08001", "pgwarden: policy cannot be enforced: x")


def test_postgresqls_refusal_after_authentication_reaches_the_client() -> None:
    # PostgreSQL checks the database after authentication: AuthenticationOk, then FATAL.
    s = guarded_session()
    refusal = ErrorResponse.make("3D000", 'database "nosuchdb" does not exist', severity="FATAL")
    s.server_data(Authentication(0).encode() + refusal.encode())
    out = s.session_prepared("the catalog could not be loaded")
    assert client_messages(to_client(out)) == [refusal]
    # ... also when PostgreSQL has closed the connection before the catalog load failed.
    s = guarded_session()
    s.server_data(Authentication(0).encode() + refusal.encode())
    assert client_messages(to_client(s.server_closed())) == [refusal]
    assert s.session_prepared("the catalog could not be loaded") == []
