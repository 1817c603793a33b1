"""A minimal PostgreSQL v3 client on raw asyncio streams, for the soak test.

The soak test must tell apart what a client library would blur: an ErrorResponse with a
SQLSTATE, a connection closed with no error at all, and a statement that never answers.
So it speaks the protocol itself -- start-up with trust authentication, simple ``Query``,
``Terminate`` -- and reports each of those outcomes as its own exception.  It shares no
code with pgwarden's codec on purpose: the proxy's framing is what is being tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

PROTOCOL_3_0 = 196608
_HDR = struct.Struct("!cI")


class WireError(Exception):
    """Base of what a statement or connection attempt can end with besides success."""

    def __init__(self, message: str, completed: list[str] | None = None) -> None:
        super().__init__(message)
        # CommandComplete tags the client received before the failure.
        self.completed = completed or []


class ServerError(WireError):
    """An ErrorResponse reached the client (``fatal``: the connection ends after it)."""

    def __init__(
        self, sqlstate: str, message: str, fatal: bool, completed: list[str] | None = None
    ) -> None:
        super().__init__(f"{sqlstate}: {message}", completed)
        self.sqlstate = sqlstate
        self.fatal = fatal


class Dropped(WireError):
    """The connection ended without any ErrorResponse: the client cannot tell why."""


class Hung(WireError):
    """No answer within the client's timeout."""


@dataclass
class Result:
    """What one simple ``Query`` returned (all its statements)."""

    tags: list[str] = field(default_factory=list)
    rows: list[list[bytes | None]] = field(default_factory=list)


def _fields(body: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode(errors="replace")
    return out


def _data_row(body: bytes) -> list[bytes | None]:
    (n,) = struct.unpack_from("!H", body)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(n):
        (size,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + size])
            pos += size
    return values


class WireClient:
    """One client connection (trust authentication, no TLS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        user: str,
        database: str,
        *,
        application_name: str = "soak",
        timeout: float = 30.0,
    ) -> WireClient:
        """Connect and wait for the first ReadyForQuery."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except TimeoutError as exc:
            raise Hung(f"TCP connect to {host}:{port} timed out") from exc
        except OSError as exc:
            raise Dropped(f"TCP connect to {host}:{port} failed: {exc}") from exc
        client = cls(reader, writer)
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (
                ("user", user),
                ("database", database),
                ("application_name", application_name),
            )
        )
        body = struct.pack("!I", PROTOCOL_3_0) + params + b"\0"
        writer.write(struct.pack("!I", len(body) + 4) + body)
        try:
            await asyncio.wait_for(client._until_ready(), timeout)
        except TimeoutError as exc:
            client.abort()
            raise Hung("no ReadyForQuery after start-up") from exc
        except WireError:
            client.abort()
            raise
        return client

    async def _message(self) -> tuple[bytes, bytes]:
        try:
            head = await self.reader.readexactly(5)
            kind, length = _HDR.unpack(head)
            body = await self.reader.readexactly(length - 4)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self.closed = True
            raise EOFError(str(exc)) from exc
        return kind, body

    async def _until_ready(self, result: Result | None = None) -> Result:
        result = result if result is not None else Result()
        error: ServerError | None = None
        while True:
            try:
                kind, body = await self._message()
            except EOFError as exc:
                if error is not None:
                    error.fatal = True
                    raise error from None
                raise Dropped("connection closed without an ErrorResponse", result.tags) from exc
            if kind == b"R":
                (code,) = struct.unpack_from("!I", body)
                if code != 0:
                    raise ServerError("28000", f"authentication request {code} unsupported", True)
            elif kind == b"D":
                result.rows.append(_data_row(body))
            elif kind == b"C":
                result.tags.append(body.rstrip(b"\0").decode())
            elif kind == b"E":
                f = _fields(body)
                error = ServerError(
                    f.get("C", ""), f.get("M", ""), f.get("S") in ("FATAL", "PANIC"), result.tags
                )
            elif kind == b"Z":
                if error is not None:
                    raise error
                return result

    async def _drain_idle(self) -> None:
        error: ServerError | None = None
        while getattr(self.reader, "_buffer", b"") or getattr(self.reader, "_eof", False):
            try:
                kind, body = await self._message()
            except EOFError:
                if error is not None:
                    error.fatal = True
                    raise error from None
                raise Dropped("connection closed while idle, without an ErrorResponse") from None
            if kind == b"E":
                f = _fields(body)
                error = ServerError(f.get("C", ""), f.get("M", ""), True)
        if error is not None:
            self.abort()
            raise error

    async def query(self, sql: str, timeout: float = 30.0) -> Result:
        """Send one simple Query and read up to its ReadyForQuery."""
        if self.closed:
            raise Dropped("connection already closed")
        # A server that ended the session while we sat idle (FATAL, then close) left its
        # ErrorResponse in our buffer.  Read it before writing: once our write meets the
        # closed socket, the kernel's reset would make the stream raise without it -- libpq
        # likewise reads what is pending when it finds the connection closed.
        await self._drain_idle()
        payload = sql.encode() + b"\0"
        self.writer.write(b"Q" + struct.pack("!I", len(payload) + 4) + payload)
        result = Result()
        try:
            return await asyncio.wait_for(self._until_ready(result), timeout)
        except TimeoutError as exc:
            self.abort()
            raise Hung(f"no ReadyForQuery within {timeout:.0f} s", result.tags) from exc
        except ServerError as exc:
            if exc.fatal:
                self.abort()
            raise

    def abort(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def close(self) -> None:
        """Terminate politely (``X``) and close."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.write(b"X\0\0\0\4")
                self.writer.close()
                await asyncio.wait_for(self.writer.wait_closed(), 5)
        else:
            self.abort()


async def slow_read(
    host: str,
    port: int,
    user: str,
    database: str,
    sql: str,
    *,
    rate: float,
    timeout: float,
    chunk: int = 16 * 1024,
    rcvbuf: int = 128 * 1024,
) -> tuple[int, int, str]:
    """Run ``sql`` and read its result at ``rate`` bytes a second; (rows, bytes, tag).

    The socket's receive buffer is kept small and the stream reader's limit equal to one
    chunk, so what the client has not read stays with the sender: pgwarden's backpressure,
    not the client's memory, decides where the rest of the result waits.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 30)
    reader, writer = await asyncio.open_connection(sock=sock, limit=chunk)
    client = WireClient(reader, writer)
    params = f"user\0{user}\0database\0{database}\0application_name\0soak-slow-reader\0\0"
    body = struct.pack("!I", PROTOCOL_3_0) + params.encode()
    writer.write(struct.pack("!I", len(body) + 4) + body)
    await asyncio.wait_for(client._until_ready(), 30)
    payload = sql.encode() + b"\0"
    writer.write(b"Q" + struct.pack("!I", len(payload) + 4) + payload)
    buf = bytearray()
    rows = total = 0
    tag = ""
    error: str | None = None
    start = loop.time()
    deadline = start + timeout
    try:
        while True:
            now = loop.time()
            if now > deadline:
                raise Hung(f"result not read within {timeout:.0f} s")
            # Token bucket: never ahead of rate * elapsed.
            ahead = total / rate - (now - start)
            if ahead > 0:
                await asyncio.sleep(ahead)
            data = await asyncio.wait_for(reader.read(chunk), 60)
            if not data:
                raise Dropped("connection closed before ReadyForQuery")
            total += len(data)
            buf += data
            pos = 0
            done = False
            while len(buf) - pos >= 5:
                kind, length = _HDR.unpack_from(buf, pos)
                if len(buf) - pos < 1 + length:
                    break
                if kind == b"D":
                    rows += 1
                elif kind == b"C":
                    tag = bytes(buf[pos + 5 : pos + 1 + length]).rstrip(b"\0").decode()
                elif kind == b"E":
                    f = _fields(bytes(buf[pos + 5 : pos + 1 + length]))
                    error = f"{f.get('C', '')}: {f.get('M', '')}"
                elif kind == b"Z":
                    done = True
                pos += 1 + length
            del buf[:pos]
            if done:
                break
    finally:
        await client.close()
    if error is not None:
        raise WireError(error)
    return rows, total, tag
