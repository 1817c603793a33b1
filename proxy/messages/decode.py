"""Decoding by direction: which message a type code means from the client (``FRONTEND``)
and from the server (``BACKEND``), and ``decode_frontend`` / ``decode_backend``, which turn
any failure into a ``ClientProtocolError`` or a ``ServerProtocolError`` naming its side.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.messages.backend import (
    Authentication,
    BackendKeyData,
    BindComplete,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ParseComplete,
    PortalSuspended,
    ReadyForQuery,
    RowDescription,
)
from proxy.messages.errors import ClientProtocolError, ProtocolError, ServerProtocolError
from proxy.messages.frontend import (
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    FunctionCall,
    Parse,
    PasswordMessage,
    Query,
    Sync,
    Terminate,
)

_Decoder = Callable[[bytes], object]
FRONTEND: dict[int, _Decoder] = {
    ord(c.TYPE): c.decode
    for c in (
        Query, Parse, Bind, Describe, Execute, Close, Sync, Flush, Terminate, CopyData,
        CopyDone, CopyFail, FunctionCall, PasswordMessage,
    )
}  # fmt: skip
BACKEND: dict[int, _Decoder] = {
    ord(c.TYPE): c.decode
    for c in (
        Authentication, BackendKeyData, ParameterStatus, ReadyForQuery, RowDescription, DataRow,
        CommandComplete, EmptyQueryResponse, ErrorResponse, NoticeResponse,
        NotificationResponse, ParseComplete, BindComplete, CloseComplete, NoData,
        PortalSuspended, ParameterDescription, CopyInResponse, CopyOutResponse,
        CopyBothResponse, CopyData, CopyDone, FunctionCallResponse, NegotiateProtocolVersion,
    )
}  # fmt: skip


def decode_frontend(type_code: int, body: bytes) -> object:
    """Decode one message a client sent; unknown types are a ClientProtocolError."""
    decoder = FRONTEND.get(type_code)
    if decoder is None:
        raise ClientProtocolError(f"unknown frontend message type {_show(type_code)}")
    try:
        return decoder(body)
    except ClientProtocolError:
        raise
    except ProtocolError as exc:
        raise ClientProtocolError(exc.message) from None


def decode_backend(type_code: int, body: bytes) -> object:
    """Decode one message the server sent; unknown types are a ServerProtocolError."""
    decoder = BACKEND.get(type_code)
    if decoder is None:
        raise ServerProtocolError(f"unknown backend message type {_show(type_code)}")
    try:
        return decoder(body)
    except ServerProtocolError:
        raise
    except ProtocolError as exc:
        raise ServerProtocolError(exc.message) from None


def _show(type_code: int) -> str:
    return repr(chr(type_code)) if 32 <= type_code < 127 else f"0x{type_code:02x}"
