"""Start-up packets, which have no type byte: ``StartupMessage`` (protocol version and
parameters), ``SSLRequest``, ``GSSENCRequest`` and ``CancelRequest``, and ``decode_startup``,
which tells them apart by their code and refuses protocols other than 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.messages.errors import ClientProtocolError
from proxy.messages.wire import I32, BodyReader, cstr

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    params: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        body = I32.pack(self.protocol) + b"".join(cstr(k) + cstr(v) for k, v in self.params)
        body += b"\0"
        return I32.pack(len(body) + 4) + body

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return default


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return I32.pack(8) + I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return I32.pack(8) + I32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes  # 4 bytes in protocol 3.0; up to 256 in 3.2

    def encode(self) -> bytes:
        body = I32.pack(CANCEL_REQUEST_CODE) + I32.pack(self.pid) + self.secret
        return I32.pack(len(body) + 4) + body


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup(body: bytes) -> StartupPacket:
    """Decode the body (after the length word) of a start-up packet."""
    r = BodyReader(body)
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
