"""Several worker processes sharing one port (SO_REUSEPORT)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import psycopg

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess, wait_until


def connections_total(admin_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("pgwarden_connections_total "):
                return float(line.split()[1])
    raise AssertionError("no pgwarden_connections_total in /metrics")


def test_two_workers_share_the_port_and_stop_together(pg: Cluster, tmp_path: Path) -> None:
    p = ProxyProcess(pg, tmp_path / "proxy", ["--workers", "2"], admin_ports=2)
    assert p.admin_port is not None
    # Worker 1's admin listener is on the next port; wait until it answers too.
    wait_until(lambda: _answers(p.admin_port + 1), what="worker 1's admin listener")  # type: ignore[operator]
    try:
        for _ in range(24):
            with psycopg.connect(p.dsn()) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
        counts = [connections_total(p.admin_port), connections_total(p.admin_port + 1)]
        assert sum(counts) >= 24
        assert min(counts) > 0  # the kernel spread the connections over both workers
    finally:
        assert p.stop() == 0


def _answers(port: int) -> bool:
    try:
        connections_total(port)
        return True
    except OSError:
        return False


def test_a_cancel_reaches_the_session_whichever_worker_takes_it(
    pg: Cluster, tmp_path: Path
) -> None:
    import threading
    import time

    import pytest

    p = ProxyProcess(pg, tmp_path / "proxy", ["--workers", "2"], admin_ports=2)
    try:
        # Each cancel arrives on a new connection, which the kernel gives to either worker:
        # over 8 tries some land on the worker that does not own the session.
        for _ in range(8):
            with psycopg.connect(p.dsn()) as conn:
                # The client holds its backend's real pid; the secret names the worker.
                assert conn.execute("select pg_backend_pid()").fetchone() == (
                    conn.info.backend_pid,
                )
                threading.Timer(0.3, conn.cancel_safe).start()
                started = time.monotonic()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    conn.execute("select pg_sleep(20)")
                assert time.monotonic() - started < 10
    finally:
        assert p.stop() == 0
