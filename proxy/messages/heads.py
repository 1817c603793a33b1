"""The few fields the relay reads, without building whole messages.

Tracking statements needs names and SQL text from Parse/Bind/Describe/Execute/Close, and
Bind's result formats; a full decode would also copy every parameter value (a 50 MB bytea
included).  These read just those fields; malformed bodies raise ProtocolError like the
full decoders.
"""

from __future__ import annotations

import struct

from proxy.messages.errors import ClientProtocolError
from proxy.messages.wire import I16, I32


def _z(body: bytes, start: int) -> int:
    end = body.find(b"\0", start)
    if end < 0:
        raise ClientProtocolError("string field is not NUL-terminated")
    return end


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_head(body: bytes) -> tuple[str, str]:
    """(statement name, SQL text) of a Parse body."""
    a = _z(body, 0)
    b = _z(body, a + 1)
    return _text(body[:a]), _text(body[a + 1 : b])


def bind_head(body: bytes) -> tuple[str, str, tuple[int, ...]]:
    """(portal, statement, result format codes) of a Bind body; parameter values are skipped."""
    a = _z(body, 0)
    b = _z(body, a + 1)
    try:
        pos = b + 1
        (nf,) = I16.unpack_from(body, pos)
        pos += 2 + 2 * nf
        (n,) = I16.unpack_from(body, pos)
        pos += 2
        for _ in range(n):
            (size,) = I32.unpack_from(body, pos)
            pos += 4 + (size if size > 0 else 0)
        (nr,) = I16.unpack_from(body, pos)
        pos += 2
        if nf < 0 or n < 0 or nr < 0 or pos + 2 * nr != len(body):
            raise ClientProtocolError("Bind message has inconsistent counts")
        formats = struct.unpack_from(f"!{nr}h", body, pos) if nr else ()
    except struct.error:
        raise ClientProtocolError("Bind message is shorter than its fields") from None
    return _text(body[:a]), _text(body[a + 1 : b]), tuple(formats)


def result_format(formats: tuple[int, ...], column: int) -> int:
    """The format (0 text, 1 binary) a Bind asked for one result column."""
    if not formats:
        return 0
    if len(formats) == 1:
        return formats[0]
    return formats[column] if column < len(formats) else 0


def target_head(body: bytes) -> tuple[str, str]:
    """(kind 'S' or 'P', name) of a Describe or Close body."""
    if len(body) < 2 or body[-1] != 0 or body[0] not in b"SP":
        raise ClientProtocolError("Describe/Close message is malformed")
    return chr(body[0]), _text(body[1:-1])


def execute_head(body: bytes) -> tuple[str, int]:
    """(portal, max_rows) of an Execute body."""
    if len(body) < 5 or body[-5] != 0:
        raise ClientProtocolError("Execute message is malformed")
    (max_rows,) = I32.unpack_from(body, len(body) - 4)
    return _text(body[:-5]), max_rows
