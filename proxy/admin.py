"""The admin HTTP listener: /metrics (Prometheus), /healthz, /readyz and /taint.

A deliberately tiny HTTP/1.1 responder on asyncio streams: three GET routes do not justify
a web framework, and it must keep answering while the proxy is busy.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from proxy.metrics import StatsCollector

if TYPE_CHECKING:
    from proxy.server import Proxy


class AdminServer:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.registry = CollectorRegistry()
        self.registry.register(StatsCollector(proxy.stats))
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        return str(sock[0]), int(sock[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _route(self, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if self.proxy.shutting_down:
                return 503, "text/plain", b"shutting down\n"
            return 200, "text/plain", b"ready\n"
        if path == "/taint":
            return 200, "application/json", self._taint()
        return 404, "text/plain", b"not found: try /metrics, /healthz, /readyz or /taint\n"

    def _taint(self) -> bytes:
        """Columns labelled data was copied into by committed writes, per database:
        ``{"db": {"schema.table": {"column": ["label", ...]}}}`` ("*": a column not known).
        ``pgwarden policy explain --admin URL`` applies it."""
        runtime = self.proxy.runtime
        analyzers = getattr(runtime, "analyzers", {}) if runtime is not None else {}
        out = {
            db: {
                f"{schema}.{table}": {col: sorted(labels) for col, labels in cols.items()}
                for (schema, table), cols in analyzer.tainted.items()
            }
            for db, analyzer in analyzers.items()
        }
        return json.dumps(out, sort_keys=True).encode() + b"\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) < 2 or line[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"only GET is supported\n"
            else:
                status, ctype, body = self._route(line[1])
            reason = {
                200: "OK",
                404: "Not Found",
                405: "Method Not Allowed",
                503: "Service Unavailable",
            }
            head = (
                f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if line[0] == "GET" else b""))
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
