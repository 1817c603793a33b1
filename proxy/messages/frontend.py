"""Frontend messages: what a client sends once started, each a frozen value with its type
code beside it (``# 'Q' Query``), a ``decode`` of its body and an ``encode`` to a whole frame.
CopyData and CopyDone travel in both directions and live here; the server's messages are in
``proxy.messages.backend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from proxy.messages.errors import ProtocolError
from proxy.messages.wire import (
    I16,
    I32,
    U32,
    BodyReader,
    EmptyMessage,
    cstr,
    frame,
    nullable,
    read_count,
)


@dataclass(frozen=True, slots=True)
class Query:  # 'Q' Query
    TYPE: ClassVar[bytes] = b"Q"
    sql: str

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.sql))

    @classmethod
    def decode(cls, body: bytes) -> Query:
        r = BodyReader(body)
        sql = r.cstring()
        r.done()
        return cls(sql)


@dataclass(frozen=True, slots=True)
class Parse:  # 'P' Parse
    TYPE: ClassVar[bytes] = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        body = cstr(self.name) + cstr(self.sql) + I16.pack(len(self.param_types))
        body += b"".join(U32.pack(t) for t in self.param_types)
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: bytes) -> Parse:
        r = BodyReader(body)
        name, sql = r.cstring(), r.cstring()
        n = r.int16()
        if n < 0:
            raise ProtocolError("negative parameter count in Parse")
        types = tuple(r.uint32() for _ in range(n))
        r.done()
        return cls(name, sql, types)


@dataclass(frozen=True, slots=True)
class Bind:  # 'B' Bind
    TYPE: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        parts = [cstr(self.portal), cstr(self.statement), I16.pack(len(self.param_formats))]
        parts += [I16.pack(f) for f in self.param_formats]
        parts.append(I16.pack(len(self.params)))
        parts += [nullable(p) for p in self.params]
        parts.append(I16.pack(len(self.result_formats)))
        parts += [I16.pack(f) for f in self.result_formats]
        return frame(self.TYPE, b"".join(parts))

    @classmethod
    def decode(cls, body: bytes) -> Bind:
        r = BodyReader(body)
        portal, stmt = r.cstring(), r.cstring()
        pf = tuple(r.int16() for _ in range(read_count(r)))
        params = tuple(r.nullable() for _ in range(read_count(r)))
        rf = tuple(r.int16() for _ in range(read_count(r)))
        r.done()
        return cls(portal, stmt, pf, params, rf)

    def result_format(self, column: int) -> int:
        """The format code (0 text, 1 binary) the client asked for one result column."""
        if not self.result_formats:
            return 0
        if len(self.result_formats) == 1:
            return self.result_formats[0]
        return self.result_formats[column] if column < len(self.result_formats) else 0


@dataclass(frozen=True, slots=True)
class _Target:
    """Describe and Close: a kind ('S' statement or 'P' portal) and a name."""

    TYPE: ClassVar[bytes] = b""
    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(self.TYPE, self.kind.encode() + cstr(self.name))

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = BodyReader(body)
        kind = chr(r.byte())
        if kind not in "SP":
            raise ProtocolError(f"{cls.__name__} of unknown kind {kind!r}")
        name = r.cstring()
        r.done()
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Describe(_Target):  # 'D' Describe (frontend)
    TYPE: ClassVar[bytes] = b"D"


@dataclass(frozen=True, slots=True)
class Execute:  # 'E' Execute
    TYPE: ClassVar[bytes] = b"E"
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.portal) + I32.pack(self.max_rows))

    @classmethod
    def decode(cls, body: bytes) -> Execute:
        r = BodyReader(body)
        portal, max_rows = r.cstring(), r.int32()
        r.done()
        return cls(portal, max_rows)


@dataclass(frozen=True, slots=True)
class Close(_Target):  # 'C' Close (frontend)
    TYPE: ClassVar[bytes] = b"C"


@dataclass(frozen=True, slots=True)
class Sync(EmptyMessage):  # 'S' Sync
    TYPE: ClassVar[bytes] = b"S"


@dataclass(frozen=True, slots=True)
class Flush(EmptyMessage):  # 'H' Flush
    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class Terminate(EmptyMessage):  # 'X' Terminate
    TYPE: ClassVar[bytes] = b"X"


@dataclass(frozen=True, slots=True)
class CopyData:  # 'd' CopyData (both directions)
    TYPE: ClassVar[bytes] = b"d"
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TYPE, self.data)

    @classmethod
    def decode(cls, body: bytes) -> CopyData:
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class CopyDone(EmptyMessage):  # 'c' CopyDone (both directions)
    TYPE: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True)
class CopyFail:  # 'f' CopyFail
    TYPE: ClassVar[bytes] = b"f"
    reason: str

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.reason))

    @classmethod
    def decode(cls, body: bytes) -> CopyFail:
        r = BodyReader(body)
        reason = r.cstring()
        r.done()
        return cls(reason)


@dataclass(frozen=True, slots=True)
class FunctionCall:  # 'F' FunctionCall
    TYPE: ClassVar[bytes] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int

    def encode(self) -> bytes:
        parts = [U32.pack(self.function_oid), I16.pack(len(self.arg_formats))]
        parts += [I16.pack(f) for f in self.arg_formats]
        parts.append(I16.pack(len(self.args)))
        parts += [nullable(a) for a in self.args]
        parts.append(I16.pack(self.result_format))
        return frame(self.TYPE, b"".join(parts))

    @classmethod
    def decode(cls, body: bytes) -> FunctionCall:
        r = BodyReader(body)
        oid = r.uint32()
        fmts = tuple(r.int16() for _ in range(read_count(r)))
        args = tuple(r.nullable() for _ in range(read_count(r)))
        rf = r.int16()
        r.done()
        return cls(oid, fmts, args, rf)


@dataclass(frozen=True, slots=True)
class PasswordMessage:  # 'p' PasswordMessage (also GSSResponse): meaning depends on the exchange
    TYPE: ClassVar[bytes] = b"p"
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TYPE, self.data)

    @classmethod
    def decode(cls, body: bytes) -> PasswordMessage:
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:  # 'p' SASLInitialResponse
    TYPE: ClassVar[bytes] = b"p"
    mechanism: str
    data: bytes | None

    def encode(self) -> bytes:
        return frame(self.TYPE, cstr(self.mechanism) + nullable(self.data))

    @classmethod
    def decode(cls, body: bytes) -> SASLInitialResponse:
        r = BodyReader(body)
        mech = r.cstring()
        data = r.nullable()
        r.done()
        return cls(mech, data)


@dataclass(frozen=True, slots=True)
class SASLResponse:  # 'p' SASLResponse
    TYPE: ClassVar[bytes] = b"p"
    data: bytes

    def encode(self) -> bytes:
        return frame(self.TYPE, self.data)

    @classmethod
    def decode(cls, body: bytes) -> SASLResponse:
        return cls(bytes(body))
