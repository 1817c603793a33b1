"""Sans-IO session tests for the behaviours the integration tests found broken: how a
session ends on shutdown, and which SASL mechanisms reach a TLS client."""

from __future__ import annotations

from proxy import commands as cmd
from proxy.messages.backend import (
    AUTH_OK,
    Authentication,
    BackendKeyData,
    CommandComplete,
    ErrorResponse,
    ReadyForQuery,
)
from proxy.messages.frontend import Query
from proxy.messages.startup import PROTOCOL_3_0, StartupMessage
from proxy.metrics import Stats
from proxy.session import Phase, Session, SessionSettings

STARTUP = StartupMessage(PROTOCOL_3_0, (("user", "alice"), ("database", "support")))
TERMINATE = b"X\0\0\0\4"


def new_session(tls: bool = False) -> Session:
    s = Session(SessionSettings(), Stats(), lambda n: b"k" * n)
    s.subject.tls = tls
    out = s.client_data(STARTUP.encode())
    assert any(isinstance(c, cmd.OpenUpstream) for c in out)
    return s


def ready_session() -> Session:
    s = new_session()
    s.upstream_ready(STARTUP)
    s.server_data(
        Authentication(AUTH_OK).encode()
        + BackendKeyData(99, b"abcd").encode()
        + ReadyForQuery("I").encode()
    )
    assert s.phase is Phase.READY
    return s


def to_client(out: list[cmd.Command]) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, cmd.SendToClient))


def sqlstate_sent(out: list[cmd.Command]) -> str | None:
    data = to_client(out)
    if not data.startswith(b"E"):
        return None
    return ErrorResponse.decode(data[5:]).sqlstate


def test_idle_session_ends_at_once_on_shutdown() -> None:
    s = ready_session()
    out = s.begin_shutdown()
    assert sqlstate_sent(out) == "57P01"
    assert cmd.SendToServer(TERMINATE) in out
    assert cmd.CloseClient() in out
    assert s.phase is Phase.CLOSED


def test_busy_session_gets_its_result_then_the_fatal_on_its_next_message() -> None:
    s = ready_session()
    s.client_data(Query("select pg_sleep(1)").encode())
    assert s.begin_shutdown() == []
    result = CommandComplete("SELECT 1").encode() + ReadyForQuery("I").encode()
    out = s.server_data(result)
    # The result goes on alone: a FATAL right behind ReadyForQuery would reach libpq while
    # it is idle, and libpq shows it only as a notice.
    assert to_client(out) == result
    assert cmd.SendToServer(TERMINATE) in out
    assert cmd.CloseServer() in out
    assert cmd.CloseClient() not in out
    assert s.phase is Phase.ENDING
    assert not s.working
    assert s.server_closed() == []  # we closed it; nothing to report
    out = s.client_data(Query("select 2").encode())
    assert sqlstate_sent(out) == "57P01"
    assert cmd.CloseClient() in out
    assert not any(isinstance(c, cmd.SendToServer) for c in out)


def test_session_in_a_transaction_waits_for_it_to_end() -> None:
    s = ready_session()
    s.client_data(Query("begin").encode())
    s.server_data(CommandComplete("BEGIN").encode() + ReadyForQuery("T").encode())
    assert s.begin_shutdown() == []
    assert s.working
    s.client_data(Query("commit").encode())
    s.server_data(CommandComplete("COMMIT").encode() + ReadyForQuery("I").encode())
    assert s.phase is Phase.ENDING


def test_force_close_of_an_ending_session_says_shutting_down() -> None:
    s = ready_session()
    s.client_data(Query("select 1").encode())
    s.begin_shutdown()
    s.server_data(CommandComplete("SELECT 1").encode() + ReadyForQuery("I").encode())
    out = s.force_close()
    assert sqlstate_sent(out) == "57P01"
    assert b"proxy is shutting down" in to_client(out)
    assert not any(isinstance(c, cmd.CancelUpstream) for c in out)


def _offered_to_client(same_certificate: bool) -> tuple[str, ...]:
    s = new_session(tls=True)
    s.upstream_ready(STARTUP, same_certificate=same_certificate)
    out = s.server_data(Authentication.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")).encode())
    data = to_client(out)
    assert data.startswith(b"R")
    return Authentication.decode(data[5:]).mechanisms


def test_channel_binding_mechanism_dropped_for_a_tls_client() -> None:
    assert _offered_to_client(same_certificate=False) == ("SCRAM-SHA-256",)


def test_channel_binding_mechanism_kept_when_certificates_match() -> None:
    assert _offered_to_client(same_certificate=True) == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
