"""The audit trail's durability settings through the real proxy: with the SQLite sink at
``synchronous: NORMAL`` (no fsync at each commit) a kill -9 of pgwarden -- and of its SQLite
writer with it -- still loses no event of a labelled read the client completed, which is the
durability the audit trail promises.  What NORMAL gives up is a power cut or an OS crash."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import psycopg
import pytest

from loadtests.harness import process_stats
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess
from tests.support_data import DB, POLICY


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_kill_9_of_pgwarden_and_its_writer_loses_no_completed_labelled_read(
    pg: Cluster, enforce_db: str, tmp_path: Path, synchronous: str
) -> None:
    db = tmp_path / "audit.db"
    config = {
        "policy_file": str(POLICY),
        "catalog_user": "postgres",
        "audit": {"sinks": [{"type": "sqlite", "path": str(db), "synchronous": synchronous}]},
    }
    p = ProxyProcess(pg, tmp_path / "proxy", config=config)
    try:
        dsn = p.pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(1, 40):
                sql = f"SELECT email FROM customers WHERE customer_id = {i} /* end_user='erin' */"
                assert len(conn.execute(sql).fetchall()) == 1
            # Everything at once, as the OOM killer or a container stop with SIGKILL does.
            for pid in [p.proc.pid, *_children(p.proc.pid)]:
                os.kill(pid, signal.SIGKILL)
    finally:
        p.proc.wait(10)
    conn2 = sqlite3.connect(db)
    try:
        rows = conn2.execute(
            "SELECT count(*) FROM events WHERE kind = 'statement' AND end_user = 'erin' AND rows = 1"
        ).fetchone()[0]
    finally:
        conn2.close()
    assert rows == 39  # every labelled read the client completed


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the SQLite writer process), from /proc."""
    return [child for child, fields in process_stats() if int(fields[1]) == pid]
