"""A bare TCP byte forwarder: the reference for what pure-Python forwarding costs.

It parses nothing: every byte from the client goes to the upstream and back, through
asyncio protocols (uvloop when installed), with write-buffer backpressure in both
directions.  The benchmark runs it beside pgwarden so that the cost of pgwarden's own
work (framing, analysis, policy) can be told apart from the cost of having a Python
process in the path at all.

Same command-line contract as ``pgwarden serve``::

    python -m loadtests.bare_forwarder --listen 127.0.0.1:6500 --upstream 127.0.0.1:5432
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import cast


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


class _Half(asyncio.Protocol):
    """One side of a forwarded connection; writes what it receives to its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        # Bytes that arrive before the peer's connection is up (the client's startup packet
        # usually does): kept here, sent once the upstream is connected.
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, only behave like one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        if self.peer is not None and self.peer.transport is not None:
            if self.peer.transport.can_write_eof():
                self.peer.transport.write_eof()
            else:
                self.peer.transport.close()
        return True  # keep our own write side open until the peer closes it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Backpressure: when our outgoing buffer fills, stop reading from the peer.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _ClientSide(_Half):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            _, server = await loop.create_connection(_Half, *self.upstream)
        except OSError:
            self.transport.close()
            return
        server.peer, self.peer = self, server
        if self.transport.is_closing():
            assert server.transport is not None
            server.transport.close()
            return
        assert server.transport is not None
        if self.pending:
            server.transport.write(b"".join(self.pending))
            self.pending.clear()
        self.transport.resume_reading()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    """Forward connections on ``listen`` to ``upstream`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientSide(upstream), *listen, backlog=512)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"bare_forwarder: {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}", file=sys.stderr
    )
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--listen HOST:PORT --upstream HOST:PORT [--no-uvloop]``."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.bare_forwarder")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    args = parser.parse_args(argv)
    coro = serve(_split_hostport(args.listen), _split_hostport(args.upstream))
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return 0
    asyncio.run(coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
