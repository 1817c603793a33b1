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
