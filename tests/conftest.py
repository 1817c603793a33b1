"""Shared fixtures: one real PostgreSQL cluster per test session, started from scratch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtests.cluster import Cluster, running_cluster


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    with running_cluster(tls=True, schema=True) as cluster:
        yield cluster
