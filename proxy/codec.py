"""Sans-IO framing of the PostgreSQL v3 protocol.

Nothing here touches a socket or asyncio: bytes go in, frame boundaries come out, and the
caller decides what to decode (``proxy.messages``).  Two readers serve two needs:

* ``FrameReader`` yields *complete* frames.  The proxy uses it where it may have to hold,
  rewrite or refuse a message before it goes on (everything a client sends, the server's
  start-up and authentication messages).  The common case — a chunk that holds whole
  messages only — costs no copy at all.
* ``FrameScanner`` walks a stream reading only the 5-byte headers, so a result of any size
  flows through with the bodies untouched.  It reports where each message ends inside the
  chunk, which lets the caller forward the chunk whole or cut it at a message boundary,
  and it copies the bodies of only the few message types asked for.

Both enforce the length rules before allocating anything: a length below 4 or above the
configured maximum is a ``ProtocolError``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from proxy.messages.errors import ClientProtocolError, ProtocolError, ServerProtocolError

_HEADER = struct.Struct("!Bi")  # type byte, length (which counts itself)
_LEN = struct.Struct("!i")
_DATA_ROW, _COPY_DATA = ord("D"), ord("d")

# PostgreSQL itself refuses start-up packets over 10000 bytes (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10_000
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024

TLS_HANDSHAKE = 0x16  # first byte of a TLS ClientHello: PostgreSQL 17 direct TLS


def _bad_length(from_client: bool, t: int, length: int, limit: int) -> ProtocolError:
    if length < 4:
        message = f"message of type {chr(t)!r} has invalid length {length}"
    else:
        message = f"message of type {chr(t)!r} is {length} bytes, over the limit of {limit} bytes"
    return ClientProtocolError(message) if from_client else ServerProtocolError(message)


class StartupReader:
    """Reads the untyped packets a client sends first (SSLRequest, StartupMessage, ...)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def starts_with_tls(self) -> bool:
        """True when the client opened with a TLS ClientHello instead of a packet."""
        return bool(self._buf) and self._buf[0] == TLS_HANDSHAKE

    def next_packet(self) -> bytes | None:
        """The body (after the length word) of the next packet, or None until it is whole."""
        if len(self._buf) < 4:
            return None
        (length,) = _LEN.unpack_from(self._buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ClientProtocolError(f"invalid length of startup packet ({length} bytes)")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return body

    def take_rest(self) -> bytes:
        """Bytes received after the packets read so far (e.g. an early pipelined message)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


class FrameReader:
    """Splits a byte stream into complete frames.

    ``feed`` returns ``(raw, frames)``: ``raw`` holds exactly the bytes of the complete frames
    (ready to forward unchanged) and ``frames`` lists ``(type, body_start, end)`` offsets into
    ``raw``.  An incomplete trailing frame is kept until the rest arrives.
    """

    __slots__ = ("_from_client", "_have", "_need", "_parts", "max_message")

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, *, from_client: bool) -> None:
        self.max_message = max_message
        self._from_client = from_client
        # An incomplete trailing frame, kept as the chunks it arrived in: joining them on
        # every feed would copy a large message (a 50 MB Bind) once per chunk, quadratically.
        self._parts: list[bytes] = []
        self._have = 0  # bytes in _parts
        self._need = 0  # bytes that complete the pending frame (5 while its header is short)

    @property
    def buffered(self) -> int:
        return self._have

    def take_pending(self) -> bytes:
        """Hand over the bytes of an incomplete frame (when another reader takes over)."""
        pending = b"".join(self._parts)
        self._parts, self._have, self._need = [], 0, 0
        return pending

    def _join(self, data: bytes) -> bytes | None:
        """``data`` behind any pending partial frame; None while that frame is incomplete."""
        self._parts.append(data)
        self._have += len(data)
        if self._have < self._need:
            return None
        return self.take_pending()

    def _keep(self, data: bytes, pos: int, need: int) -> bytes:
        """Keep the incomplete tail from ``pos``; return the complete part."""
        # The partial frame's header was already checked when it was complete.
        self._parts = [data[pos:]]
        self._have = len(data) - pos
        self._need = need
        return data[:pos]

    def feed_types(self, data: bytes) -> tuple[bytes, bytearray]:
        """Like ``feed`` for callers that need only each frame's type (the relay's hot
        path): no offsets, no tuples, one small bytearray."""
        if self._parts:
            joined = self._join(data)
            if joined is None:
                return b"", bytearray()
            data = joined
        types = bytearray()
        pos = 0
        n = len(data)
        limit = self.max_message
        unpack = _HEADER.unpack_from
        while n - pos >= 5:
            t, length = unpack(data, pos)
            if length < 4 or length > limit:
                raise self._bad_length(t, length)
            end = pos + 1 + length
            if end > n:
                return self._keep(data, pos, end - pos), types
            types.append(t)
            pos = end
        if pos < n:
            return self._keep(data, pos, 5), types
        return data, types

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
        if self._parts:
            joined = self._join(data)
            if joined is None:
                return b"", []
            data = joined
        frames: list[tuple[int, int, int]] = []
        pos = 0
        n = len(data)
        limit = self.max_message
        need = 5
        while n - pos >= 5:
            t, length = _HEADER.unpack_from(data, pos)
            if length < 4 or length > limit:
                raise self._bad_length(t, length)
            end = pos + 1 + length
            if end > n:
                need = end - pos
                break
            frames.append((t, pos + 5, end))
            pos = end
        if pos < n:
            return self._keep(data, pos, need), frames
        return data, frames

    def feed_runs(
        self, data: bytes, lead: Callable[[bytes], int] | None = None
    ) -> tuple[bytes, list[tuple[int, int, int, int]]]:
        """Like ``feed``, but ``(type, body_start, end, count)``: consecutive DataRow (or
        CopyData) messages come as one run, ``body_start`` being the first one's and ``end``
        the last one's.  A big result is then a few entries per chunk instead of one per
        row, for a caller that can count or scan a run in one go.

        ``lead``, when given, walks the complete frames at the start of the (joined) data
        itself and returns where it stopped; they are in ``raw`` but not in ``frames``.  A
        caller that must look into every row of a big result so avoids walking each row's
        header twice.  It must stop at any frame it does not fully vouch for."""
        if self._parts:
            joined = self._join(data)
            if joined is None:
                return b"", []
            data = joined
        frames: list[tuple[int, int, int, int]] = []
        pos = lead(data) if lead is not None else 0
        n = len(data)
        limit = self.max_message
        need = 5
        unpack = _HEADER.unpack_from
        run_t, run_start, run_end, run_n = -1, 0, 0, 0  # the run being gathered
        while n - pos >= 5:
            t, length = unpack(data, pos)
            if length < 4 or length > limit:
                raise self._bad_length(t, length)
            end = pos + 1 + length
            if end > n:
                need = end - pos
                break
            if t == run_t:
                run_end = end
                run_n += 1
            else:
                if run_n:
                    frames.append((run_t, run_start, run_end, run_n))
                    run_t, run_n = -1, 0
                if t in (_DATA_ROW, _COPY_DATA):
                    run_t, run_start, run_end, run_n = t, pos + 5, end, 1
                else:
                    frames.append((t, pos + 5, end, 1))
            pos = end
        if run_n:
            frames.append((run_t, run_start, run_end, run_n))
        if pos < n:
            return self._keep(data, pos, need), frames
        return data, frames

    def _bad_length(self, t: int, length: int) -> ProtocolError:
        return _bad_length(self._from_client, t, length, self.max_message)


class FrameScanner:
    """Follows message boundaries in a stream without buffering bodies.

    ``scan(chunk)`` returns ``(type, end, body)`` for each message that *ends* in this chunk,
    ``end`` being the offset just past it in ``chunk``.  ``body`` is the message body for the
    types in ``wanted`` and None for all others, whose bytes are only skipped.

    ``max_message`` bounds only the wanted types, the bodies it copies: a skipped body costs
    no memory, and a legal 100 MB DataRow must not end the session because the limit was
    set low to stop huge client messages.
    """

    __slots__ = (
        "_body", "_from_client", "_header", "_remaining", "_type", "max_message", "report_all",
        "wanted",
    )  # fmt: skip

    def __init__(
        self,
        wanted: frozenset[int] | set[int],
        max_message: int = DEFAULT_MAX_MESSAGE,
        *,
        from_client: bool = False,
        report_all: bool = True,
    ) -> None:
        self.wanted = wanted
        # False: report only the wanted messages (the relay needs nothing about the others,
        # and not building a tuple per DataRow is most of the cost of scanning).
        self.report_all = report_all
        self.max_message = max_message
        self._from_client = from_client
        self._header = b""  # a header split across chunks
        self._remaining = 0  # body bytes of the current message still to come
        self._type = 0
        self._body: list[bytes] | None = None

    @property
    def at_boundary(self) -> bool:
        """True when no message is half-way through."""
        return not self._remaining and not self._header

    def scan(self, chunk: bytes) -> list[tuple[int, int, bytes | None]]:
        out: list[tuple[int, int, bytes | None]] = []
        n = len(chunk)
        pos = 0
        if self._remaining:
            take = self._remaining if self._remaining <= n else n
            if self._body is not None:
                self._body.append(chunk[:take])
            self._remaining -= take
            pos = take
            if self._remaining:
                return out
            body = b"".join(self._body) if self._body is not None else None
            self._body = None
            if body is not None or self.report_all:
                out.append((self._type, pos, body))
        elif self._header:
            need = 5 - len(self._header)
            self._header += chunk[:need]
            if len(self._header) < 5:
                return out
            pos = need
            t, length = _HEADER.unpack_from(self._header, 0)
            self._header = b""
            pos = self._start(t, length, chunk, pos, out)
        wanted = self.wanted
        limit = self.max_message
        report_all = self.report_all
        while pos < n:
            if n - pos < 5:
                self._header = chunk[pos:]
                break
            t, length = _HEADER.unpack_from(chunk, pos)
            if length < 4 or (length > limit and t in wanted):
                raise self._bad_length(t, length)
            end = pos + 1 + length
            if end <= n:
                if t in wanted:
                    out.append((t, end, chunk[pos + 5 : end]))
                elif report_all:
                    out.append((t, end, None))
                pos = end
            else:
                self._type = t
                self._remaining = end - n
                self._body = [chunk[pos + 5 :]] if t in wanted else None
                break
        return out

    def _start(
        self, t: int, length: int, chunk: bytes, pos: int, out: list[tuple[int, int, bytes | None]]
    ) -> int:
        """Begin a message whose header straddled the previous chunk; returns the new pos."""
        if length < 4 or (length > self.max_message and t in self.wanted):
            raise self._bad_length(t, length)
        body_len = length - 4
        avail = len(chunk) - pos
        if body_len <= avail:
            end = pos + body_len
            if t in self.wanted:
                out.append((t, end, chunk[pos:end]))
            elif self.report_all:
                out.append((t, end, None))
            return end
        self._type = t
        self._remaining = body_len - avail
        self._body = [chunk[pos:]] if t in self.wanted else None
        return len(chunk)

    def _bad_length(self, t: int, length: int) -> ProtocolError:
        return _bad_length(self._from_client, t, length, self.max_message)
