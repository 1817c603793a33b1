"""Shared fixtures: one real PostgreSQL cluster per test session, started from scratch, and
``pgwarden serve`` subprocesses in front of it."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtests.cluster import Cluster, running_cluster
from tests.proxyutil import ProxyProcess

_proxy_dirs = itertools.count(1)


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    with running_cluster(tls=True, schema=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def proxy(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The default proxy: command-line flags only, no config file; shared by a module."""
    p = ProxyProcess(pg, tmp_path_factory.mktemp("pgwarden-default"))
    yield p
    code = p.stop()
    assert code == 0, f"pgwarden exited with {code} after SIGTERM:\n{p.log()}"


ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture
def proxy_factory(pg: Cluster, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start a proxy with special flags (``args``) and/or a YAML ``config`` dict.

    Every proxy started is stopped with SIGTERM at the end of the test and must exit 0.
    """
    started: list[ProxyProcess] = []

    def start(*args: str, config: dict[str, Any] | None = None, admin: bool = True) -> ProxyProcess:
        p = ProxyProcess(pg, tmp_path / f"proxy{next(_proxy_dirs)}", args, config, admin)
        started.append(p)
        return p

    yield start
    for p in started:
        code = p.stop()
        assert code == 0, f"pgwarden exited with {code} after SIGTERM:\n{p.log()}"


# -- Redis (window counters shared between workers) ------------------------------------------


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, in a temporary directory, with
    persistence off. ``stop()``/``start()`` simulate an outage on the same address."""

    def __init__(self, workdir: str) -> None:
        # Imports stay local so this block can be appended without touching the file's head.
        import os
        import shutil

        from loadtests.cluster import free_port

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        import os
        import socket
        import subprocess
        import time

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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the whole session; tests keep apart by using their own key prefix."""
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis for one test that may kill and restart it."""
    server = RedisServer(str(tmp_path_factory.mktemp("redis-own")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
