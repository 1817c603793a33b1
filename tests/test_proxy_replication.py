"""Replication connections: refused unless allowed, and then the whole protocol works."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from proxy.sandbox.cluster import Cluster
from tests.conftest import ProxyFactory
from tests.proxyutil import ProxyProcess

# --- 12. replication connections ------------------------------------------------------------


def _psql_replication(
    proxy: ProxyProcess, mode: str = "database"
) -> subprocess.CompletedProcess[str]:
    dsn = (
        f"host={proxy.host} port={proxy.port} user=postgres dbname=support "
        f"replication={mode} sslmode=disable"
    )
    return subprocess.run(
        ["psql", "-X", "-At", dsn, "-c", "IDENTIFY_SYSTEM"],
        capture_output=True, text=True, timeout=30, env=dict(os.environ),
    )  # fmt: skip


def test_replication_refused_by_default(proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError, match="replication connections are not allowed"):
        psycopg.connect(proxy.dsn(replication="database"))
    for mode in ("database", "true"):
        out = _psql_replication(proxy, mode)
        assert out.returncode != 0
        assert "replication connections are not allowed through this proxy" in out.stderr


def test_replication_allowed_with_flag(proxy_factory: ProxyFactory, pg: Cluster) -> None:
    proxy = proxy_factory("--allow-replication")
    system_id = pg.psql("select system_identifier from pg_control_system()").strip()
    for mode in ("database", "true"):
        out = _psql_replication(proxy, mode)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("|")[0] == system_id


def test_base_backup_streams_through_proxy(
    proxy_factory: ProxyFactory, pg: Cluster, tmp_path: Path
) -> None:
    # BASE_BACKUP (COPY out) and START_REPLICATION (CopyBoth, the WAL stream) on a second
    # connection: the whole physical replication protocol through the proxy.
    proxy = proxy_factory("--allow-replication")
    target = tmp_path / "backup"
    out = subprocess.run(
        [str(pg.bindir / "pg_basebackup"), "-h", proxy.host, "-p", str(proxy.port),
         "-U", "postgres", "-D", str(target), "-X", "stream", "-c", "fast", "--no-sync"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PGSSLMODE="disable"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (target / "PG_VERSION").read_text().strip() == "15"
    assert (target / "backup_label").exists()
