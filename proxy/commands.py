"""What a session asks the server to do.  The session decides; only ``proxy.server`` acts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policy.inflight import Hold
from proxy.messages.startup import StartupMessage


@dataclass(frozen=True, slots=True)
class SendToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToServer:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartClientTLS:
    """Upgrade the client connection to TLS (after the 'S' answer has been written)."""


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Connect to PostgreSQL (TLS as configured) and report back with ``upstream_ready``."""

    startup: StartupMessage


@dataclass(frozen=True, slots=True)
class PrepareSession:
    """PostgreSQL has authenticated the client: load what the policy needs for this session
    (its database's catalog, the user's roles) and report back with
    ``Session.session_prepared``.  Until then the server's next messages are held."""


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    """A client's CancelRequest carrying the key pgwarden handed out; the server maps it."""

    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class CancelUpstream:
    """Cancel whatever this session's backend is running (client gone, result cut off).

    ``hold``: the tracker holds the client's next messages until the request has reached the
    server (then ``Session.counts_recorded``), or a late cancel would hit one of them."""

    hold: bool = False


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Flush what was queued for the client, then close its connection."""


@dataclass(frozen=True, slots=True)
class CloseServer:
    """Flush what was queued for the server, then close the upstream connection."""


@dataclass(frozen=True, slots=True)
class PolicyBlock:
    """A statement was refused or its result cut off."""

    subject: str
    rule_id: str
    action: str
    message: str
    facts: Any = None
    offence: bool = True  # counts towards a quarantine (not when pgwarden failed closed)


@dataclass(frozen=True, slots=True)
class PolicyAlert:
    """A rule fired that allows (action alert) or only watches (monitor mode)."""

    subject: str
    rule_id: str
    reason: str
    monitored: bool


@dataclass(frozen=True, slots=True)
class CanaryHit:
    """A canary record was read (``blocked``: it was cut off before reaching the client).
    With ``hold``, the client's next statements wait until the rule's action (a quarantine)
    is in force, as for ``RecordUsage``."""

    subject: str
    rule_id: str
    action: str
    monitored: bool
    blocked: bool = False
    hold: bool = False


@dataclass(frozen=True, slots=True)
class RecordUsage:
    """Add a statement's labelled rows and record identities to the subject's windows."""

    subject: str
    label: str
    rows: int
    records: frozenset[str]
    windows: tuple[float, ...]
    # The statement's hold on this counter (policy.inflight), given back once the usage is
    # recorded: until then other statements are judged as if the hold were spent.
    hold: Hold | None = None


@dataclass(frozen=True, slots=True)
class RefreshCounts:
    """Read the subject's window totals from the shared store before judging a statement."""

    subject: str
    labels: tuple[tuple[str, tuple[float, ...]], ...]  # label -> windows


@dataclass(frozen=True, slots=True)
class NoteEndUser:
    """An end-user name was used: count it among the distinct names of ``scope`` (a
    connection, or a database user) for an ``end_user_churn`` rule; alert past its limit.
    Nothing waits for it."""

    scope: str  # the store's subject key: conn:<id> or db_user:<name>
    rule_id: str
    name: str  # a keyed hash of the end-user name
    window: float
    max_names: int
    monitored: bool
    subject: str  # who the alert names (the database user)


@dataclass(frozen=True, slots=True)
class LookupAllowed:
    """Run a need-to-know rule's lookup for a person; the answer goes to the session's guard."""

    rule_id: str
    person: str


@dataclass(frozen=True, slots=True)
class StatementDone:
    """One statement finished (for the audit trail)."""

    facts: Any
    rows: int
    nbytes: int
    seconds: float
    sqlstate: str | None
    cut: bool | str
    records: dict[str, list[bytes]]  # table -> primary keys of the rows returned
    values: dict[str, list[bytes]] = field(default_factory=dict)  # label -> values, when no key
    end_user: str | None = None
    rule_ids: tuple[str, ...] = ()
    verdict: str = "allow"
    text: str | None = None  # what the client sent; kept only with audit.store_full_text


@dataclass(frozen=True, slots=True)
class AwaitDurable:
    """Persist this statement's audit event, then report with ``Session.durable_result``."""

    done: StatementDone


@dataclass(frozen=True, slots=True)
class EndSession:
    """A rule's action ends the session after the client has been told why."""

    message: str


@dataclass(frozen=True, slots=True)
class Log:
    event: str
    level: str = "info"
    fields: dict[str, Any] | None = None


Command = (
    SendToClient
    | SendToServer
    | StartClientTLS
    | OpenUpstream
    | PrepareSession
    | ForwardCancel
    | CancelUpstream
    | CloseClient
    | CloseServer
    | PolicyBlock
    | PolicyAlert
    | CanaryHit
    | RecordUsage
    | RefreshCounts
    | NoteEndUser
    | LookupAllowed
    | StatementDone
    | AwaitDurable
    | EndSession
    | Log
)
