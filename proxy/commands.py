"""What a session asks the server to do.  The session decides; only ``proxy.server`` acts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.messages import StartupMessage


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
class ForwardCancel:
    """A client's CancelRequest carrying the key pgwarden handed out; the server maps it."""

    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class CancelUpstream:
    """Cancel whatever this session's backend is running (client gone, result cut off)."""


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Flush what was queued for the client, then close its connection."""


@dataclass(frozen=True, slots=True)
class CloseServer:
    """Flush what was queued for the server, then close the upstream connection."""


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
    | ForwardCancel
    | CancelUpstream
    | CloseClient
    | CloseServer
    | Log
)
