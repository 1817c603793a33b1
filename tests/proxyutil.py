"""Helpers for integration tests: the real ``pgwarden serve`` as a subprocess, and a tiny
raw-socket PostgreSQL client built on ``proxy.messages``.

The proxy runs exactly as a user runs it (the installed ``pgwarden`` script), so these tests
cover the command line, config loading, signals and the admin endpoint along with the
protocol relay.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from proxy.messages.backend import ErrorResponse
from proxy.messages.startup import PROTOCOL_3_0, SSLRequest, StartupMessage
from proxy.sandbox.cluster import Cluster, free_port, free_ports

_HEADER = struct.Struct("!BI")


def pgwarden_command() -> list[str]:
    """The installed console script next to this interpreter (the venv's ``pgwarden``)."""
    script = shutil.which("pgwarden", path=str(Path(sys.executable).parent))
    if script is None:
        raise RuntimeError(
            "the pgwarden script is not installed next to this Python; run "
            "'pip install -e .[dev]' in the virtualenv"
        )
    return [script]


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``pgwarden audit ARGS``, run as a responder runs it (its own process)."""
    return subprocess.run(
        [*pgwarden_command(), "audit", *args], capture_output=True, text=True, check=False
    )


def audit_keys(tmp_path: Path) -> tuple[Path, Path]:
    """A ledger key and a signing key in ``tmp_path``, made by ``pgwarden audit keygen``."""
    ledger, signing = tmp_path / "ledger.key", tmp_path / "sign.key"
    assert audit_cli("keygen", "--ledger", "--out", str(ledger)).returncode == 0
    assert audit_cli("keygen", "--out", str(signing)).returncode == 0
    return ledger, signing


def start_with_policy(
    pg: Cluster, workdir: Path, policy: dict[str, object], audit: bool = False
) -> ProxyProcess:
    """A proxy enforcing ``policy`` (written to ``workdir``), with a SQLite audit trail
    when ``audit``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    args = ["--policy", str(path), "--catalog-user", "postgres"]
    if audit:
        args += ["--audit-db", str(workdir / "audit.db")]
    return ProxyProcess(pg, workdir / "proxy", args)


def audited_config(work: Path, policy_file: Path) -> dict[str, Any]:
    """A ``pgwarden serve -c`` configuration enforcing ``policy_file`` with an audit trail
    in SQLite (keys made in ``work``): every session followed, the DBA's too."""
    ledger, signing = audit_keys(work)
    return {
        "policy_file": str(policy_file),
        "catalog_user": "postgres",
        "audit": {
            "sinks": [{"type": "sqlite", "path": str(work / "audit.db")}],
            "ledger_key": str(ledger),
            "signing_key": str(signing),
        },
    }


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class ProxyProcess:
    """One ``pgwarden serve`` subprocess in front of the test cluster."""

    def __init__(
        self,
        pg: Cluster,
        workdir: Path,
        args: Iterable[str] = (),
        config: dict[str, Any] | None = None,
        admin: bool = True,
        admin_ports: int = 1,
        wait: bool = True,
    ) -> None:
        """Start ``pgwarden serve`` and, when ``wait``, return once it accepts clients
        (otherwise the caller calls ``wait_ready`` before using it)."""
        self.pg = pg
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        # Workers each take the admin port + their index: find a run of free ports.
        self.admin_port = free_ports(admin_ports, avoid=self.port) if admin else None
        self.log_path = workdir / "pgwarden.log"
        self.config_path: Path | None = None
        self._terminated = False
        cmd = [
            *pgwarden_command(), "serve",
            "--listen", f"{self.host}:{self.port}",
            "--upstream", f"{pg.host}:{pg.port}",
            "--admin", f"{self.host}:{self.admin_port}" if admin else "off",
        ]  # fmt: skip
        if config is not None:
            self.config_path = workdir / "pgwarden.yaml"
            self.write_config(config)
            cmd += ["-c", str(self.config_path)]
        cmd += list(args)
        self.cmd = cmd
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=self._log_file, cwd=workdir
        )
        if wait:
            self.wait_ready()

    # --- life cycle ---------------------------------------------------------------------

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pgwarden exited with {self.proc.returncode} before accepting:\n{self.log()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                if self.admin_port is None or self.http_get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"pgwarden did not accept within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if sig == signal.SIGTERM:
            self._terminated = True
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 45.0) -> int:
        """SIGTERM, wait for the exit, and return the exit code (killing it if it hangs)."""
        if self.proc.poll() is None:
            if not self._terminated:  # a second SIGTERM while exiting would kill it
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log_file.close()
                raise AssertionError(
                    f"pgwarden did not exit within {timeout}s of SIGTERM:\n{self.log()}"
                ) from None
        self._log_file.close()
        return self.proc.returncode

    def write_config(self, config: dict[str, Any] | str) -> None:
        assert self.config_path is not None, "start the proxy with config= to use a file"
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    # --- what a test looks at -----------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def wait_for_log_event(
        self, event: str, after: int = 0, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first log event named ``event`` among the events from index ``after`` on."""

        def find() -> dict[str, Any] | None:
            for e in self.log_events()[after:]:
                if e.get("event") == event:
                    return e
            return None

        found: dict[str, Any] = wait_until(find, timeout, what=f"log event {event!r}")
        return found

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    def http_get(self, path: str) -> tuple[int, str]:
        assert self.admin_port is not None
        url = f"http://{self.host}:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        """The value of one unlabelled sample from /metrics."""
        status, text = self.http_get("/metrics")
        assert status == 200
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        raise AssertionError(f"metric {name} not found in /metrics:\n{text}")

    # --- connection strings -------------------------------------------------------------

    def dsn(self, user: str = "postgres", **extra: str) -> str:
        extra.setdefault("sslmode", "disable")
        extra.setdefault("connect_timeout", "10")
        return self.pg.dsn(user=user, port=self.port, **extra)

    def url(self, user: str = "postgres") -> str:
        return self.pg.url(user=user, port=self.port)


# --- raw protocol client ------------------------------------------------------------------


class RawClient:
    """A blocking socket that speaks just enough protocol for framing tests."""

    def __init__(self, host: str, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_tls(self, cafile: str) -> None:
        """SSLRequest, then a verified TLS handshake on the same socket."""
        self.send(SSLRequest().encode())
        answer = self.read_exact(1)
        assert answer == b"S", f"TLS refused: {answer!r}"
        ctx = ssl.create_default_context(cafile=cafile)
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self._buf += data
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed with {len(self._buf)} of {n} bytes read")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read_message(self) -> tuple[str, bytes]:
        """The next (type, body) from the server; EOFError when the connection closes."""
        t, length = _HEADER.unpack(self.read_exact(5))
        return chr(t), self.read_exact(length - 4)

    def read_until_ready(self) -> list[tuple[str, bytes]]:
        """Messages up to and including the next ReadyForQuery."""
        out = []
        while True:
            msg = self.read_message()
            out.append(msg)
            if msg[0] == "Z":
                return out

    def at_eof(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection (whatever it sends first)."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        return True

    def startup(self, user: str = "postgres", database: str = "support", **params: str) -> None:
        """Start a session (trust authentication only) and read up to ReadyForQuery."""
        all_params = (("user", user), ("database", database), *params.items())
        self.send(StartupMessage(PROTOCOL_3_0, all_params).encode())
        msgs = self.read_until_ready()
        types = [t for t, _ in msgs]
        assert "E" not in types, error_of(msgs)
        assert msgs[0] == ("R", b"\0\0\0\0"), msgs[0]


def error_of(msgs: list[tuple[str, bytes]]) -> ErrorResponse:
    """The one ErrorResponse among ``msgs``."""
    errors = [ErrorResponse.decode(body) for t, body in msgs if t == "E"]
    assert len(errors) == 1, f"expected one ErrorResponse, got {msgs!r}"
    return errors[0]


def messages_until_eof(client: RawClient, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    """Everything the server sends until it closes the connection."""
    client.sock.settimeout(timeout)
    out = []
    while True:
        try:
            out.append(client.read_message())
        except (EOFError, ConnectionResetError):
            return out
