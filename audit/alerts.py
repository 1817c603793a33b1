"""Alert delivery: webhook (JSON POST) and syslog (RFC 5424 over UDP or TCP).

Alerts are blocks, canary hits, quarantines, signed chain checkpoints and sink failures.  Each
channel has its own bounded queue and worker task, so a slow webhook never delays syslog or
the proxy; when a queue is full the newest alert is dropped and counted (``dropped``) rather
than growing memory without limit.  Delivery retries with exponential backoff; repeats of the
same alert inside a deduplication window are suppressed (checkpoints never repeat: each names
its own sequence number).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
import structlog

log = structlog.get_logger("pgwarden.audit.alerts")

# RFC 5424 section 6.2.1 severities.
SEVERITIES = {
    "emergency": 0,
    "alert": 1,
    "critical": 2,
    "error": 3,
    "warning": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
FACILITY_LOG_AUDIT = 13


@dataclass(frozen=True, slots=True)
class Alert:
    """Something a person should look at soon."""

    type: str  # block | canary | quarantine | checkpoint | sink_failure | ...
    message: str
    severity: str = "warning"
    details: Mapping[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    dedup_key: str | None = None

    def key(self) -> str:
        return self.dedup_key or f"{self.type}\0{self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": "pgwarden",
            "type": self.type,
            "severity": self.severity,
            "message": self.message,
            "ts": datetime.fromtimestamp(self.ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "details": dict(self.details),
        }


class AlertDeliveryError(RuntimeError):
    """An alert could not be delivered (after retries); the message says where and why."""


class Channel(Protocol):
    """One alert destination."""

    name: str

    async def deliver(self, alert: Alert) -> None:
        """Deliver once; raise :class:`AlertDeliveryError` on failure."""

    async def close(self) -> None:
        """Release sockets."""


# --- webhook --------------------------------------------------------------------------------


class WebhookChannel:
    """POSTs each alert as JSON to an http(s) URL, with asyncio streams only."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        ca_file: str | None = None,
        name: str = "webhook",
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the webhook URL {url!r} must be http:// or https:// with a host")
        self.url = url
        self.name = name
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        # An internal CA for the alert endpoint; the system's trust store otherwise.
        self._ssl = ssl.create_default_context(cafile=ca_file) if self._tls else None
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    async def deliver(self, alert: Alert) -> None:
        body = orjson.dumps(alert.as_dict())
        try:
            await asyncio.wait_for(self._post(body), self.timeout)
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            ValueError,
            ssl.SSLError,
        ) as exc:
            raise AlertDeliveryError(
                f"webhook {self.url} did not accept the alert: {exc!r}"
            ) from exc

    async def _post(self, body: bytes) -> None:
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._ssl)
        try:
            head = [
                f"POST {self._target} HTTP/1.1",
                f"Host: {self._host}:{self._port}",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                "User-Agent: pgwarden",
                "Connection: close",
                *(f"{k}: {v}" for k, v in self.headers.items()),
            ]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
            status = int(parts[1])
            if not 200 <= status < 300:
                raise ValueError(f"HTTP status {status}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        return None


# --- syslog ---------------------------------------------------------------------------------


def _sd_escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_rfc5424(
    alert: Alert,
    *,
    app_name: str = "pgwarden",
    hostname: str | None = None,
    facility: int = FACILITY_LOG_AUDIT,
) -> bytes:
    """One RFC 5424 syslog message: header, a ``pgwarden@32473`` structured-data element with
    the alert type, and the alert as JSON for the message part."""
    pri = facility * 8 + SEVERITIES.get(alert.severity, 4)
    ts = datetime.fromtimestamp(alert.ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    host = (hostname or socket.gethostname() or "-")[:255]
    msgid = alert.type[:32] or "-"
    sd = f'[pgwarden@32473 type="{_sd_escape(alert.type)}" severity="{_sd_escape(alert.severity)}"]'
    msg = orjson.dumps(alert.as_dict()).decode()
    return f"<{pri}>1 {ts} {host} {app_name} {os.getpid()} {msgid} {sd} {msg}".encode()


class SyslogChannel:
    """Sends RFC 5424 messages to a syslog collector over UDP, or TCP with octet counting
    (RFC 6587), keeping the TCP connection open between alerts."""

    def __init__(
        self,
        host: str,
        port: int = 514,
        *,
        protocol: str = "udp",
        app_name: str = "pgwarden",
        facility: int = FACILITY_LOG_AUDIT,
        name: str = "syslog",
    ) -> None:
        if protocol not in ("udp", "tcp"):
            raise ValueError(f"syslog protocol must be 'udp' or 'tcp', not {protocol!r}")
        self.host, self.port, self.protocol = host, port, protocol
        self.app_name, self.facility, self.name = app_name, facility, name
        self._writer: asyncio.StreamWriter | None = None
        self._udp: socket.socket | None = None

    async def deliver(self, alert: Alert) -> None:
        data = format_rfc5424(alert, app_name=self.app_name, facility=self.facility)
        try:
            if self.protocol == "udp":
                if self._udp is None:
                    infos = await asyncio.get_running_loop().getaddrinfo(
                        self.host, self.port, type=socket.SOCK_DGRAM
                    )
                    fam, _, _, _, addr = infos[0]
                    self._udp = socket.socket(fam, socket.SOCK_DGRAM)
                    self._udp.setblocking(False)
                    self._udp.connect(addr)
                self._udp.send(data)
            else:
                if self._writer is None or self._writer.is_closing():
                    _r, self._writer = await asyncio.open_connection(self.host, self.port)
                self._writer.write(b"%d " % len(data) + data)
                await self._writer.drain()
        except OSError as exc:
            await self.close()
            raise AlertDeliveryError(
                f"syslog {self.protocol}://{self.host}:{self.port} did not take the alert: {exc}"
            ) from exc

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._writer is not None:
            w, self._writer = self._writer, None
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()


# --- dispatch -------------------------------------------------------------------------------


class _Worker:
    def __init__(
        self, channel: Channel, *, queue_size: int, retries: int, backoff: float, max_backoff: float
    ) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(queue_size)
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.delivered = self.failed = self.dropped = 0
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            alert = await self.queue.get()
            try:
                await self._deliver_with_retries(alert)
            finally:
                self.queue.task_done()

    async def _deliver_with_retries(self, alert: Alert) -> None:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                await self.channel.deliver(alert)
                self.delivered += 1
                return
            except AlertDeliveryError as exc:
                if attempt == self.retries:
                    self.failed += 1
                    log.warning("alert_delivery_failed", channel=self.channel.name, error=str(exc))
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)


class Alerter:
    """Fans alerts out to channels, without ever blocking the caller."""

    def __init__(
        self,
        channels: Sequence[Channel] = (),
        *,
        dedup_seconds: float = 60.0,
        retries: int = 4,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        queue_size: int = 1000,
    ) -> None:
        self.dedup_seconds = dedup_seconds
        self._workers = [
            _Worker(
                c, queue_size=queue_size, retries=retries, backoff=backoff, max_backoff=max_backoff
            )
            for c in channels
        ]
        self._seen: dict[str, float] = {}
        self.suppressed = 0

    def __bool__(self) -> bool:
        return bool(self._workers)

    async def start(self) -> None:
        for w in self._workers:
            w.task = asyncio.create_task(w.run(), name=f"pgwarden-alert-{w.channel.name}")

    def send(self, alert: Alert) -> bool:
        """Queue an alert for every channel; False if it was a duplicate within the window."""
        now = time.monotonic()
        key = alert.key()
        last = self._seen.get(key)
        if last is not None and now - last < self.dedup_seconds:
            self.suppressed += 1
            return False
        self._seen[key] = now
        if len(self._seen) > 10_000:
            # Forget keys older than the window so the table stays small.
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.dedup_seconds}
        for w in self._workers:
            try:
                w.queue.put_nowait(alert)
            except asyncio.QueueFull:
                w.dropped += 1
        return True

    def stats(self) -> dict[str, dict[str, int]]:
        """Delivered / failed / dropped counts per channel."""
        return {
            w.channel.name: {"delivered": w.delivered, "failed": w.failed, "dropped": w.dropped}
            for w in self._workers
        }

    async def close(self, timeout: float = 5.0) -> None:
        """Give queued alerts ``timeout`` seconds to go out, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(w.queue.join() for w in self._workers)), timeout
            )
        for w in self._workers:
            if w.task is not None:
                w.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w.task
            await w.channel.close()
