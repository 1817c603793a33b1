"""Shared fixtures: one real PostgreSQL cluster per test session, started from scratch, and
``pgwarden serve`` subprocesses in front of it."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtests.redis_server import RedisServer, RedisUnavailable
from proxy.sandbox.cluster import Cluster, running_cluster
from tests.proxyutil import ProxyProcess
from tests.support_data import enforce_db  # noqa: F401 (a fixture)

_proxy_dirs = itertools.count(1)
_bytecode_dir: str | None = None
_dont_write_bytecode = ""


def pytest_configure(config: pytest.Config) -> None:
    """Under PYTHONDONTWRITEBYTECODE (these sandboxes set it) every subprocess a test starts
    -- hundreds of ``pgwarden`` processes, the benchmarks, the audit command line --
    compiled the project's sources again before doing anything: 0.15 s of CPU a
    ``pgwarden serve``.  They keep their bytecode in a directory of this run instead
    (PYTHONPYCACHEPREFIX), so the first compiles and the others read; nothing is written
    into the source tree, and Python checks each file against its source as usual."""
    global _bytecode_dir, _dont_write_bytecode
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    _bytecode_dir = tempfile.mkdtemp(prefix="pgwarden-pyc-")
    os.environ["PYTHONPYCACHEPREFIX"] = _bytecode_dir
    _dont_write_bytecode = os.environ.pop("PYTHONDONTWRITEBYTECODE")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _bytecode_dir is not None:
        os.environ["PYTHONDONTWRITEBYTECODE"] = _dont_write_bytecode
        os.environ.pop("PYTHONPYCACHEPREFIX", None)
        shutil.rmtree(_bytecode_dir, ignore_errors=True)


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


def _redis(workdir: str) -> RedisServer:
    """A Redis server, or a skip where ``redis-server`` is not installed."""
    try:
        return RedisServer(workdir)
    except RedisUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the whole session; tests keep apart by using their own key prefix."""
    server = _redis(str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis for one test that may kill and restart it."""
    server = _redis(str(tmp_path_factory.mktemp("redis-own")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
