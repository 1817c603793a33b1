"""PostgreSQL protocol v3 messages as small frozen values.

Each class knows its one-letter type code, how to decode its body and how to encode itself
as a whole frame (type byte, int32 length that counts itself, body).  Several letters mean
one thing from the client and another from the server ('D' is Describe going up and DataRow
coming down), so decoding is split into ``decode_frontend`` and ``decode_backend``.

Only the decoders raise, and only ``ProtocolError`` (or its two subclasses): any byte string
either decodes or is refused with a reason, which the property tests check.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_FIELD = struct.Struct(
    "!IhIhih"
)  # RowDescription: table OID, column, type OID, size, modifier, format

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


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


class Message(Protocol):
    def encode(self) -> bytes: ...


# --- body readers ---------------------------------------------------------------------


class _Reader:
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
        (v,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def uint32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
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


def _cstr(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    if b"\0" in b:
        raise ValueError("protocol strings cannot contain NUL")
    return b + b"\0"


def frame(type_code: bytes, body: bytes) -> bytes:
    """One typed message: type byte, length (counting itself) and body."""
    return type_code + _I32.pack(len(body) + 4) + body


def _nullable(v: bytes | None) -> bytes:
    return _I32.pack(-1) if v is None else _I32.pack(len(v)) + v


# --- start-up packets (no type byte) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    params: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        body = _I32.pack(self.protocol) + b"".join(_cstr(k) + _cstr(v) for k, v in self.params)
        body += b"\0"
        return _I32.pack(len(body) + 4) + body

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return default


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes  # 4 bytes in protocol 3.0; up to 256 in 3.2

    def encode(self) -> bytes:
        body = _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(self.pid) + self.secret
        return _I32.pack(len(body) + 4) + body


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup(body: bytes) -> StartupPacket:
    """Decode the body (after the length word) of a start-up packet."""
    r = _Reader(body)
    code = r.int32()
    if code == SSL_REQUEST_CODE:
        r.done()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        r.done()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        pid = r.int32()
        secret = r.rest()
        if not 4 <= len(secret) <= 256:
            raise ClientProtocolError("cancel request key has an invalid length")
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise ClientProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "pgwarden speaks protocol 3"
        )
    params: list[tuple[str, str]] = []
    while True:
        key = r.cstring()
        if key == "":
            break
        params.append((key, r.cstring()))
    r.done()
    return StartupMessage(code, tuple(params))


# --- frontend messages --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:  # 'Q' Query
    TYPE: ClassVar[bytes] = b"Q"
    sql: str

    def encode(self) -> bytes:
        return frame(self.TYPE, _cstr(self.sql))

    @classmethod
    def decode(cls, body: bytes) -> Query:
        r = _Reader(body)
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
        body = _cstr(self.name) + _cstr(self.sql) + _I16.pack(len(self.param_types))
        body += b"".join(_U32.pack(t) for t in self.param_types)
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: bytes) -> Parse:
        r = _Reader(body)
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
        parts = [_cstr(self.portal), _cstr(self.statement), _I16.pack(len(self.param_formats))]
        parts += [_I16.pack(f) for f in self.param_formats]
        parts.append(_I16.pack(len(self.params)))
        parts += [_nullable(p) for p in self.params]
        parts.append(_I16.pack(len(self.result_formats)))
        parts += [_I16.pack(f) for f in self.result_formats]
        return frame(self.TYPE, b"".join(parts))

    @classmethod
    def decode(cls, body: bytes) -> Bind:
        r = _Reader(body)
        portal, stmt = r.cstring(), r.cstring()
        pf = tuple(r.int16() for _ in range(_count(r)))
        params = tuple(r.nullable() for _ in range(_count(r)))
        rf = tuple(r.int16() for _ in range(_count(r)))
        r.done()
        return cls(portal, stmt, pf, params, rf)

    def result_format(self, column: int) -> int:
        """The format code (0 text, 1 binary) the client asked for one result column."""
        if not self.result_formats:
            return 0
        if len(self.result_formats) == 1:
            return self.result_formats[0]
        return self.result_formats[column] if column < len(self.result_formats) else 0


def _count(r: _Reader) -> int:
    n = r.int16()
    if n < 0:
        raise ProtocolError("negative count")
    return n


@dataclass(frozen=True, slots=True)
class _Target:
    """Describe and Close: a kind ('S' statement or 'P' portal) and a name."""

    TYPE: ClassVar[bytes] = b""
    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(self.TYPE, self.kind.encode() + _cstr(self.name))

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body)
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
        return frame(self.TYPE, _cstr(self.portal) + _I32.pack(self.max_rows))

    @classmethod
    def decode(cls, body: bytes) -> Execute:
        r = _Reader(body)
        portal, max_rows = r.cstring(), r.int32()
        r.done()
        return cls(portal, max_rows)


@dataclass(frozen=True, slots=True)
class Close(_Target):  # 'C' Close (frontend)
    TYPE: ClassVar[bytes] = b"C"


@dataclass(frozen=True, slots=True)
class _Empty:
    TYPE: ClassVar[bytes] = b""

    def encode(self) -> bytes:
        return frame(self.TYPE, b"")

    @classmethod
    def decode(cls, body: bytes) -> _Empty:
        if body:
            raise ProtocolError(f"{cls.__name__} has a body")
        return cls()


@dataclass(frozen=True, slots=True)
class Sync(_Empty):  # 'S' Sync
    TYPE: ClassVar[bytes] = b"S"


@dataclass(frozen=True, slots=True)
class Flush(_Empty):  # 'H' Flush
    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class Terminate(_Empty):  # 'X' Terminate
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
class CopyDone(_Empty):  # 'c' CopyDone (both directions)
    TYPE: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True)
class CopyFail:  # 'f' CopyFail
    TYPE: ClassVar[bytes] = b"f"
    reason: str

    def encode(self) -> bytes:
        return frame(self.TYPE, _cstr(self.reason))

    @classmethod
    def decode(cls, body: bytes) -> CopyFail:
        r = _Reader(body)
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
        parts = [_U32.pack(self.function_oid), _I16.pack(len(self.arg_formats))]
        parts += [_I16.pack(f) for f in self.arg_formats]
        parts.append(_I16.pack(len(self.args)))
        parts += [_nullable(a) for a in self.args]
        parts.append(_I16.pack(self.result_format))
        return frame(self.TYPE, b"".join(parts))

    @classmethod
    def decode(cls, body: bytes) -> FunctionCall:
        r = _Reader(body)
        oid = r.uint32()
        fmts = tuple(r.int16() for _ in range(_count(r)))
        args = tuple(r.nullable() for _ in range(_count(r)))
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
        return frame(self.TYPE, _cstr(self.mechanism) + _nullable(self.data))

    @classmethod
    def decode(cls, body: bytes) -> SASLInitialResponse:
        r = _Reader(body)
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


# --- backend messages ------------------------------------------------------------------------


AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class Authentication:  # 'R' Authentication* (Ok, CleartextPassword, MD5Password, SASL, ...)
    TYPE: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""  # MD5: 4-byte salt; SASLContinue/Final: SCRAM data; others: as sent

    def encode(self) -> bytes:
        return frame(self.TYPE, _I32.pack(self.code) + self.data)

    @classmethod
    def decode(cls, body: bytes) -> Authentication:
        r = _Reader(body)
        code = r.int32()
        data = r.rest()
        if code in (AUTH_OK, AUTH_CLEARTEXT) and data:
            raise ProtocolError("authentication request has unexpected data")
        if code == AUTH_MD5 and len(data) != 4:
            raise ProtocolError("MD5 authentication request without a 4-byte salt")
        if code == AUTH_SASL and not data.endswith(b"\0\0") and data != b"\0":
            raise ProtocolError("SASL mechanism list is not terminated")
        return cls(code, data)

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms offered (only for AuthenticationSASL)."""
        return tuple(m.decode("ascii", "replace") for m in self.data.split(b"\0") if m)

    @classmethod
    def sasl(cls, mechanisms: tuple[str, ...]) -> Authentication:
        return cls(AUTH_SASL, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


@dataclass(frozen=True, slots=True)
class BackendKeyData:  # 'K' BackendKeyData
    TYPE: ClassVar[bytes] = b"K"
    pid: int
    secret: bytes  # 4 bytes in protocol 3.0, up to 256 in 3.2

    def encode(self) -> bytes:
        return frame(self.TYPE, _I32.pack(self.pid) + self.secret)

    @classmethod
    def decode(cls, body: bytes) -> BackendKeyData:
        r = _Reader(body)
        pid = r.int32()
        secret = r.rest()
        if not 4 <= len(secret) <= 256:
            raise ProtocolError("BackendKeyData secret has an invalid length")
        return cls(pid, secret)


@dataclass(frozen=True, slots=True)
class ParameterStatus:  # 'S' ParameterStatus
    TYPE: ClassVar[bytes] = b"S"
    name: str
    value: str

    def encode(self) -> bytes:
        return frame(self.TYPE, _cstr(self.name) + _cstr(self.value))

    @classmethod
    def decode(cls, body: bytes) -> ParameterStatus:
        r = _Reader(body)
        name, value = r.cstring(), r.cstring()
        r.done()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:  # 'Z' ReadyForQuery
    TYPE: ClassVar[bytes] = b"Z"
    status: str  # 'I' idle, 'T' in a transaction block, 'E' in a failed transaction block

    def encode(self) -> bytes:
        return frame(self.TYPE, self.status.encode())

    @classmethod
    def decode(cls, body: bytes) -> ReadyForQuery:
        if len(body) != 1 or body[0] not in b"ITE":
            raise ProtocolError("ReadyForQuery with an invalid status")
        return cls(chr(body[0]))


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    table_oid: int
    column: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@dataclass(frozen=True, slots=True)
class RowDescription:  # 'T' RowDescription
    TYPE: ClassVar[bytes] = b"T"
    fields: tuple[Field, ...]

    def encode(self) -> bytes:
        parts = [_I16.pack(len(self.fields))]
        for f in self.fields:
            parts.append(
                _cstr(f.name)
                + struct.pack(
                    "!IhIhih", f.table_oid, f.column, f.type_oid, f.type_size, f.type_modifier,
                    f.format,
                )
            )  # fmt: skip
        return frame(self.TYPE, b"".join(parts))

    @classmethod
    def decode(cls, body: bytes) -> RowDescription:
        # Decoded once per result, so it is written for speed: one struct call per field.
        try:
            (n,) = _I16.unpack_from(body, 0)
            if n < 0:
                raise ProtocolError("negative count")
            pos = 2
            fields = []
            unpack = _FIELD.unpack_from
            for _ in range(n):
                end = body.index(b"\0", pos)
                name = body[pos:end].decode("utf-8", "surrogateescape")
                fields.append(Field(name, *unpack(body, end + 1)))
                pos = end + 1 + _FIELD.size
        except (struct.error, ValueError):
            raise ProtocolError("RowDescription is shorter than its fields") from None
        if pos != len(body):
            raise ProtocolError("message body has trailing bytes")
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class DataRow:  # 'D' DataRow
    TYPE: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        return frame(
            self.TYPE, _I16.pack(len(self.values)) + b"".join(_nullable(v) for v in self.values)
        )

    @classmethod
    def decode(cls, body: bytes) -> DataRow:
        if type(body) is not bytes:
            body = bytes(body)
        return cls(row_values(body, 0, len(body)))


def row_values(buf: bytes, start: int, end: int, upto: int = -1) -> tuple[bytes | None, ...]:
    """The values of the DataRow whose body is ``buf[start:end]``, without copying the body.

    With ``upto`` >= 0 only the first ``upto + 1`` values are read (a key at a known
    position), and the rest of the body is not checked.  Rows are the bulk of every result,
    so this is one tight loop rather than a reader object; bounds are checked all the same.
    """
    if end - start < 2:
        raise ProtocolError("message body is shorter than its fields")
    (n,) = _I16.unpack_from(buf, start)
    if n < 0:
        raise ProtocolError("negative count")
    if 0 <= upto < n:
        n = upto + 1
        check_end = False
    else:
        check_end = True
    pos = start + 2
    out: list[bytes | None] = []
    unpack = _I32.unpack_from
    for _ in range(n):
        if pos + 4 > end:
            raise ProtocolError("message body is shorter than its fields")
        (size,) = unpack(buf, pos)
        pos += 4
        if size < 0:
            if size != -1:
                raise ProtocolError(f"negative value length {size}")
            out.append(None)
            continue
        if pos + size > end:
            raise ProtocolError("message body is shorter than its fields")
        out.append(buf[pos : pos + size])
        pos += size
    if check_end and pos != end:
        raise ProtocolError("message body has trailing bytes")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CommandComplete:  # 'C' CommandComplete
    TYPE: ClassVar[bytes] = b"C"
    tag: str

    def encode(self) -> bytes:
        return frame(self.TYPE, _cstr(self.tag))

    @classmethod
    def decode(cls, body: bytes) -> CommandComplete:
        r = _Reader(body)
        tag = r.cstring()
        r.done()
        return cls(tag)

    @property
    def rows(self) -> int | None:
        """The row count at the end of the tag ('SELECT 5', 'INSERT 0 5', 'COPY 5')."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else None


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(_Empty):  # 'I' EmptyQueryResponse
    TYPE: ClassVar[bytes] = b"I"


# Error and notice field codes (protocol "Error and Notice Message Fields").
FIELD_SEVERITY = "S"
FIELD_SEVERITY_NONLOCALIZED = "V"
FIELD_SQLSTATE = "C"
FIELD_MESSAGE = "M"
FIELD_DETAIL = "D"
FIELD_HINT = "H"


@dataclass(frozen=True, slots=True)
class ErrorResponse:  # 'E' ErrorResponse
    TYPE: ClassVar[bytes] = b"E"
    fields: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        body = b"".join(k.encode() + _cstr(v) for k, v in self.fields) + b"\0"
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: bytes) -> ErrorResponse:
        r = _Reader(body)
        fields = []
        while True:
            code = r.byte()
            if code == 0:
                break
            fields.append((chr(code), r.cstring()))
        r.done()
        return cls(tuple(fields))

    def get(self, code: str) -> str | None:
        for k, v in self.fields:
            if k == code:
                return v
        return None

    @property
    def sqlstate(self) -> str | None:
        # A server may omit SQLSTATE (seen from poolers and old servers); callers must cope.
        return self.get(FIELD_SQLSTATE)

    @property
    def message(self) -> str:
        return self.get(FIELD_MESSAGE) or ""

    @classmethod
    def make(
        cls,
        sqlstate: str,
        message: str,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
    ) -> ErrorResponse:
        fields = [
            (FIELD_SEVERITY, severity),
            (FIELD_SEVERITY_NONLOCALIZED, severity),
            (FIELD_SQLSTATE, sqlstate),
            (FIELD_MESSAGE, message),
        ]
        if detail:
            fields.append((FIELD_DETAIL, detail))
        if hint:
            fields.append((FIELD_HINT, hint))
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class NoticeResponse(ErrorResponse):  # 'N' NoticeResponse
    TYPE: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class NotificationResponse:  # 'A' NotificationResponse
    TYPE: ClassVar[bytes] = b"A"
    pid: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        return frame(self.TYPE, _I32.pack(self.pid) + _cstr(self.channel) + _cstr(self.payload))

    @classmethod
    def decode(cls, body: bytes) -> NotificationResponse:
        r = _Reader(body)
        pid, channel, payload = r.int32(), r.cstring(), r.cstring()
        r.done()
        return cls(pid, channel, payload)


@dataclass(frozen=True, slots=True)
class ParseComplete(_Empty):  # '1' ParseComplete
    TYPE: ClassVar[bytes] = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete(_Empty):  # '2' BindComplete
    TYPE: ClassVar[bytes] = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete(_Empty):  # '3' CloseComplete
    TYPE: ClassVar[bytes] = b"3"


@dataclass(frozen=True, slots=True)
class NoData(_Empty):  # 'n' NoData
    TYPE: ClassVar[bytes] = b"n"


@dataclass(frozen=True, slots=True)
class PortalSuspended(_Empty):  # 's' PortalSuspended
    TYPE: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True)
class ParameterDescription:  # 't' ParameterDescription
    TYPE: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(
            self.TYPE,
            _I16.pack(len(self.type_oids)) + b"".join(_U32.pack(t) for t in self.type_oids),
        )

    @classmethod
    def decode(cls, body: bytes) -> ParameterDescription:
        r = _Reader(body)
        oids = tuple(r.uint32() for _ in range(_count(r)))
        r.done()
        return cls(oids)


@dataclass(frozen=True, slots=True)
class _CopyResponse:
    TYPE: ClassVar[bytes] = b""
    format: int  # overall: 0 text, 1 binary
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        body = bytes([self.format]) + _I16.pack(len(self.column_formats))
        body += b"".join(_I16.pack(f) for f in self.column_formats)
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: bytes) -> _CopyResponse:
        r = _Reader(body)
        fmt = r.byte()
        cols = tuple(r.int16() for _ in range(_count(r)))
        r.done()
        return cls(fmt, cols)


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):  # 'G' CopyInResponse
    TYPE: ClassVar[bytes] = b"G"


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):  # 'H' CopyOutResponse
    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):  # 'W' CopyBothResponse (replication)
    TYPE: ClassVar[bytes] = b"W"


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:  # 'V' FunctionCallResponse
    TYPE: ClassVar[bytes] = b"V"
    value: bytes | None

    def encode(self) -> bytes:
        return frame(self.TYPE, _nullable(self.value))

    @classmethod
    def decode(cls, body: bytes) -> FunctionCallResponse:
        r = _Reader(body)
        v = r.nullable()
        r.done()
        return cls(v)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:  # 'v' NegotiateProtocolVersion
    TYPE: ClassVar[bytes] = b"v"
    newest_version: int
    unrecognized: tuple[str, ...]

    def encode(self) -> bytes:
        body = _I32.pack(self.newest_version) + _I32.pack(len(self.unrecognized))
        body += b"".join(_cstr(o) for o in self.unrecognized)
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: bytes) -> NegotiateProtocolVersion:
        r = _Reader(body)
        version, n = r.int32(), r.int32()
        if n < 0:
            raise ProtocolError("negative option count")
        opts = tuple(r.cstring() for _ in range(n))
        r.done()
        return cls(version, opts)


# --- dispatch ------------------------------------------------------------------------------------

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


# --- the few fields the relay reads, without building whole messages -------------------------
#
# Tracking statements needs names and SQL text from Parse/Bind/Describe/Execute/Close, and
# Bind's result formats; a full decode would also copy every parameter value (a 50 MB bytea
# included).  These read just those fields; malformed bodies raise ProtocolError like the
# full decoders.


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
        (nf,) = _I16.unpack_from(body, pos)
        pos += 2 + 2 * nf
        (n,) = _I16.unpack_from(body, pos)
        pos += 2
        for _ in range(n):
            (size,) = _I32.unpack_from(body, pos)
            pos += 4 + (size if size > 0 else 0)
        (nr,) = _I16.unpack_from(body, pos)
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
    (max_rows,) = _I32.unpack_from(body, len(body) - 4)
    return _text(body[:-5]), max_rows
