"""Alert delivery to a real local HTTP receiver and real syslog sockets (loopback only)."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import orjson

from audit.alerts import Alert, Alerter, SyslogChannel, WebhookChannel, format_rfc5424
from audit.chain import checkpoint_message, generate_signing_key, load_public_key
from audit.events import AuditEvent, Subject
from audit.pipeline import AuditConfig, AuditTrail, SQLiteSinkConfig, SyslogConfig, WebhookConfig

RFC5424 = re.compile(
    rb"^<(\d{1,3})>1 (\S+Z) (\S+) pgwarden (\d+) (\S+) \[pgwarden@32473 type=\"([^\"]+)\" "
    rb"severity=\"([^\"]+)\"\] (\{.*\})$"
)


class Receiver:
    """A minimal HTTP/1.1 server: answers each POST with the next scripted status."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.got = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        body = await reader.readexactly(length)
        self.attempts += 1
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.bodies.append(orjson.loads(body))
            self.got.set()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        async def until() -> None:
            while len(self.bodies) < n:
                self.got.clear()
                await self.got.wait()

        await asyncio.wait_for(until(), timeout)


def test_webhook_delivers_retries_and_deduplicates() -> None:
    async def go() -> Receiver:
        rx = Receiver(statuses=[500, 503])
        url = await rx.start()
        alerter = Alerter([WebhookChannel(url)], dedup_seconds=60, backoff=0.01)
        await alerter.start()
        a = Alert(
            "block", "mallory: COPY TO blocked", severity="error", details={"rule": "no-copy"}
        )
        assert alerter.send(a)
        assert not alerter.send(a)  # the same alert inside the window is suppressed
        assert alerter.send(Alert("canary", "canary customer 999 was read"))
        await rx.wait_for(2)
        await alerter.close()
        rx.server.close()
        assert alerter.stats()["webhook"]["delivered"] == 2
        assert alerter.suppressed == 1
        return rx

    rx = asyncio.run(go())
    assert rx.attempts == 4  # two failures, then both alerts
    assert [b["type"] for b in rx.bodies] == ["block", "canary"]
    assert rx.bodies[0]["details"] == {"rule": "no-copy"}
    assert rx.bodies[0]["source"] == "pgwarden"


def test_webhook_gives_up_after_retries() -> None:
    async def go() -> dict[str, int]:
        rx = Receiver(statuses=[500] * 10)
        url = await rx.start()
        alerter = Alerter([WebhookChannel(url)], retries=2, backoff=0.01)
        await alerter.start()
        alerter.send(Alert("block", "x"))
        for _ in range(500):  # a loaded machine may take a while for three attempts
            if alerter.stats()["webhook"]["failed"]:
                break
            await asyncio.sleep(0.01)
        await alerter.close(timeout=0.1)
        rx.server.close()
        return alerter.stats()["webhook"]

    assert asyncio.run(go()) == {"delivered": 0, "failed": 1, "dropped": 0}


def test_syslog_udp_and_tcp_carry_rfc5424() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5)
    received_tcp: list[bytes] = []

    async def tcp_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        received_tcp.append(data)
        writer.close()

    async def go() -> None:
        server = await asyncio.start_server(tcp_handler, "127.0.0.1", 0)
        tcp_port = server.sockets[0].getsockname()[1]
        alerter = Alerter(
            [
                SyslogChannel("127.0.0.1", udp.getsockname()[1], protocol="udp", name="u"),
                SyslogChannel("127.0.0.1", tcp_port, protocol="tcp", name="t"),
            ]
        )
        await alerter.start()
        alerter.send(Alert("quarantine", 'bob quarantined for 1h "bulk"]', severity="critical"))
        for _ in range(100):
            if received_tcp:
                break
            await asyncio.sleep(0.02)
        await alerter.close()
        server.close()

    asyncio.run(go())
    dgram = udp.recv(65536)
    udp.close()
    m = RFC5424.match(dgram)
    assert m, dgram
    assert int(m.group(1)) == 13 * 8 + 2  # facility log audit, severity critical
    assert m.group(6) == b"quarantine"
    assert orjson.loads(m.group(8))["message"] == 'bob quarantined for 1h "bulk"]'
    # TCP uses octet counting: "<len> <message>"
    (frame,) = received_tcp
    length, _, msg = frame.partition(b" ")
    assert int(length) == len(msg) and RFC5424.match(msg)


def test_sd_param_values_are_escaped() -> None:
    msg = format_rfc5424(Alert('a"b]c\\', "m"), hostname="h")
    assert b'type="a\\"b\\]c\\\\"' in msg


def test_trail_sends_alerts_and_signed_checkpoints_to_the_webhook(tmp_path: Path) -> None:
    generate_signing_key(tmp_path / "k")
    pub = load_public_key(tmp_path / "k.pub")

    async def go() -> Receiver:
        rx = Receiver()
        url = await rx.start()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        cfg = AuditConfig(
            sinks=[SQLiteSinkConfig(path=tmp_path / "a.db")],
            alerts=[
                WebhookConfig(url=url),
                SyslogConfig(host="127.0.0.1", port=udp.getsockname()[1]),
            ],
            signing_key=tmp_path / "k",
            checkpoint_every=3,
        )
        subj = Subject("app", "support", "x", "10.0.0.1", False, "hank")
        async with AuditTrail(cfg) as t:
            t.alert(
                "block", "hank: SELECT * on customers blocked", subject=subj, rule_ids=["no-star"]
            )
            for _ in range(3):
                await t.submit(
                    AuditEvent.statement_event("s", subj, fingerprint="f", statement="SELECT ?")
                )
            await rx.wait_for(2)
        udp.close()
        rx.server.close()
        return rx

    rx = asyncio.run(go())
    by_type = {b["type"]: b for b in rx.bodies}
    assert by_type["block"]["details"]["end_user"] == "hank"
    cp = by_type["checkpoint"]["details"]
    pub.verify(
        bytes.fromhex(cp["signature"]), checkpoint_message(cp["chain_id"], cp["seq"], cp["hash"])
    )


def test_webhook_over_https_with_an_internal_ca(tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)

    async def go() -> tuple[Receiver, dict[str, int]]:
        rx = Receiver()
        rx.server = await asyncio.start_server(rx.handle, "127.0.0.1", 0, ssl=server_ctx)
        port = rx.server.sockets[0].getsockname()[1]
        url = f"https://127.0.0.1:{port}/hook"
        good = Alerter([WebhookChannel(url, ca_file=str(tmp_path / "ca.pem"), name="good")])
        # without the CA the certificate is refused, and that counts as a failed delivery
        bad = Alerter([WebhookChannel(url, name="bad")], retries=0)
        await good.start()
        await bad.start()
        good.send(Alert("block", "over TLS"))
        bad.send(Alert("block", "over TLS, unverified"))
        await rx.wait_for(1)
        await good.close()
        await bad.close()
        rx.server.close()
        return rx, bad.stats()["bad"]

    rx, bad_stats = asyncio.run(go())
    assert [b["message"] for b in rx.bodies] == ["over TLS"]
    assert bad_stats["failed"] == 1
