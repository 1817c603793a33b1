"""A throwaway ``redis-server`` for tests and benchmarks that share window counters."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from proxy.sandbox.cluster import free_port


class RedisUnavailable(RuntimeError):
    """``redis-server`` is not installed here."""


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, in a temporary directory, with
    persistence off. ``stop()``/``start()`` simulate an outage on the same address."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RedisUnavailable("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = str(workdir)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.workdir,
                "--logfile", os.path.join(self.workdir, "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
