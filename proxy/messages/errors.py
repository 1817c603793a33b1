"""Protocol errors, by where they came from: ``ProtocolError`` for bytes that are not valid
PostgreSQL protocol, ``ClientProtocolError`` when the client sent them and
``ServerProtocolError`` when the upstream server did.  Each ends the session, never the
process, and carries SQLSTATE 08P01 for the client.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes that are not valid PostgreSQL protocol. Ends the session, never the process."""

    sqlstate = "08P01"  # protocol_violation

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientProtocolError(ProtocolError):
    """The client sent something the protocol does not allow."""


class ServerProtocolError(ProtocolError):
    """The upstream server sent something the protocol does not allow."""
