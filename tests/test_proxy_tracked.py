"""The client and raw-protocol tests again, through a proxy that tracks every statement.

With the audit trail on, every session goes through the statement tracker (the path that
policy enforcement uses) instead of the plain relay: applications must not notice either.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess
from tests.test_proxy_clients import *  # noqa: F403 (the same tests, collected here again)
from tests.test_proxy_raw import *  # noqa: F403


@pytest.fixture(scope="module")
def proxy(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("pgwarden-tracked")
    p = ProxyProcess(pg, workdir, ["--audit-db", str(workdir / "audit.db")])
    yield p
    code = p.stop()
    assert code == 0, f"pgwarden exited with {code} after SIGTERM:\n{p.log()}"
