"""The framing primitives every message is built from: the integer codecs, ``frame`` (type
byte, length counting itself, body), ``BodyReader`` (a cursor over a body whose every read
checks bounds and raises ``ProtocolError``), the encoders of C strings and nullable values,
``EmptyMessage`` (the base of messages with no body) and ``Message``, what every message is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol

from proxy.messages.errors import ProtocolError

I16 = struct.Struct("!h")
I32 = struct.Struct("!i")
U32 = struct.Struct("!I")


class Message(Protocol):
    def encode(self) -> bytes: ...


class BodyReader:
    """Cursor over a message body; every read checks bounds and raises ProtocolError."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ProtocolError("message body is shorter than its fields")

    def int16(self) -> int:
        self._need(2)
        (v,) = I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def int32(self) -> int:
        self._need(4)
        (v,) = I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def uint32(self) -> int:
        self._need(4)
        (v,) = U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def byte(self) -> int:
        self._need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def raw(self, n: int) -> bytes:
        self._need(n)
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(v)

    def rest(self) -> bytes:
        v = self.buf[self.pos :]
        self.pos = len(self.buf)
        return bytes(v)

    def cstring(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("string field is not NUL-terminated")
        raw = self.buf[self.pos : end]
        self.pos = end + 1
        # Names and SQL travel in the client encoding; the proxy only needs a faithful
        # round trip, so undecodable bytes are kept with surrogateescape.
        return bytes(raw).decode("utf-8", "surrogateescape")

    def nullable(self) -> bytes | None:
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise ProtocolError(f"negative value length {n}")
        return self.raw(n)

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError("message body has trailing bytes")


def read_count(r: BodyReader) -> int:
    n = r.int16()
    if n < 0:
        raise ProtocolError("negative count")
    return n


def cstr(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    if b"\0" in b:
        raise ValueError("protocol strings cannot contain NUL")
    return b + b"\0"


def frame(type_code: bytes, body: bytes) -> bytes:
    """One typed message: type byte, length (counting itself) and body."""
    return type_code + I32.pack(len(body) + 4) + body


def nullable(v: bytes | None) -> bytes:
    return I32.pack(-1) if v is None else I32.pack(len(v)) + v


@dataclass(frozen=True, slots=True)
class EmptyMessage:
    TYPE: ClassVar[bytes] = b""

    def encode(self) -> bytes:
        return frame(self.TYPE, b"")

    @classmethod
    def decode(cls, body: bytes) -> EmptyMessage:
        if body:
            raise ProtocolError(f"{cls.__name__} has a body")
        return cls()
