"""Backend messages: what the server sends, each a frozen value with its type code beside it
(``# 'D' DataRow``), a ``decode`` of its body and an ``encode`` to a whole frame;
authentication requests and their codes, RowDescription's fields, ``row_values`` (a DataRow's
values read in place), and the ErrorResponse / NoticeResponse field codes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

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

_FIELD = struct.Struct(
    "!IhIhih"
)  # RowDescription: table OID, column, type OID, size, modifier, format

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
        return frame(self.TYPE, I32.pack(self.code) + self.data)

    @classmethod
    def decode(cls, body: bytes) -> Authentication:
        r = BodyReader(body)
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
        return frame(self.TYPE, I32.pack(self.pid) + self.secret)

    @classmethod
    def decode(cls, body: bytes) -> BackendKeyData:
        r = BodyReader(body)
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
        return frame(self.TYPE, cstr(self.name) + cstr(self.value))

    @classmethod
    def decode(cls, body: bytes) -> ParameterStatus:
        r = BodyReader(body)
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
        parts = [I16.pack(len(self.fields))]
        for f in self.fields:
            parts.append(
                cstr(f.name)
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
            (n,) = I16.unpack_from(body, 0)
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
            self.TYPE, I16.pack(len(self.values)) + b"".join(nullable(v) for v in self.values)
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
    (n,) = I16.unpack_from(buf, start)
    if n < 0:
        raise ProtocolError("negative count")
    if 0 <= upto < n:
        n = upto + 1
        check_end = False
    else:
        check_end = True
    pos = start + 2
    out: list[bytes | None] = []
    unpack = I32.unpack_from
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
        return frame(self.TYPE, cstr(self.tag))

    @classmethod
    def decode(cls, body: bytes) -> CommandComplete:
        r = BodyReader(body)
        tag = r.cstring()
        r.done()
        return cls(tag)

    @property
    def rows(self) -> int | None:
        """The row count at the end of the tag ('SELECT 5', 'INSERT 0 5', 'COPY 5')."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else None


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(EmptyMessage):  # 'I' EmptyQueryResponse
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
        body = b"".join(k.encode() + cstr(v) for k, v in self.fields) + b"\0"
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: bytes) -> ErrorResponse:
        r = BodyReader(body)
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
        return frame(self.TYPE, I32.pack(self.pid) + cstr(self.channel) + cstr(self.payload))

    @classmethod
    def decode(cls, body: bytes) -> NotificationResponse:
        r = BodyReader(body)
        pid, channel, payload = r.int32(), r.cstring(), r.cstring()
        r.done()
        return cls(pid, channel, payload)


@dataclass(frozen=True, slots=True)
class ParseComplete(EmptyMessage):  # '1' ParseComplete
    TYPE: ClassVar[bytes] = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete(EmptyMessage):  # '2' BindComplete
    TYPE: ClassVar[bytes] = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete(EmptyMessage):  # '3' CloseComplete
    TYPE: ClassVar[bytes] = b"3"


@dataclass(frozen=True, slots=True)
class NoData(EmptyMessage):  # 'n' NoData
    TYPE: ClassVar[bytes] = b"n"


@dataclass(frozen=True, slots=True)
class PortalSuspended(EmptyMessage):  # 's' PortalSuspended
    TYPE: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True)
class ParameterDescription:  # 't' ParameterDescription
    TYPE: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(
            self.TYPE,
            I16.pack(len(self.type_oids)) + b"".join(U32.pack(t) for t in self.type_oids),
        )

    @classmethod
    def decode(cls, body: bytes) -> ParameterDescription:
        r = BodyReader(body)
        oids = tuple(r.uint32() for _ in range(read_count(r)))
        r.done()
        return cls(oids)


@dataclass(frozen=True, slots=True)
class _CopyResponse:
    TYPE: ClassVar[bytes] = b""
    format: int  # overall: 0 text, 1 binary
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        body = bytes([self.format]) + I16.pack(len(self.column_formats))
        body += b"".join(I16.pack(f) for f in self.column_formats)
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: bytes) -> _CopyResponse:
        r = BodyReader(body)
        fmt = r.byte()
        cols = tuple(r.int16() for _ in range(read_count(r)))
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
        return frame(self.TYPE, nullable(self.value))

    @classmethod
    def decode(cls, body: bytes) -> FunctionCallResponse:
        r = BodyReader(body)
        v = r.nullable()
        r.done()
        return cls(v)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:  # 'v' NegotiateProtocolVersion
    TYPE: ClassVar[bytes] = b"v"
    newest_version: int
    unrecognized: tuple[str, ...]

    def encode(self) -> bytes:
        body = I32.pack(self.newest_version) + I32.pack(len(self.unrecognized))
        body += b"".join(cstr(o) for o in self.unrecognized)
        return frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: bytes) -> NegotiateProtocolVersion:
        r = BodyReader(body)
        version, n = r.int32(), r.int32()
        if n < 0:
            raise ProtocolError("negative option count")
        opts = tuple(r.cstring() for _ in range(n))
        r.done()
        return cls(version, opts)
