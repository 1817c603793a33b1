"""PostgreSQL ends a session while a labelled read's CommandComplete waits for the audit
trail (``pg_terminate_backend`` right after the statement).

The statement completed on the server and its event becomes durable: the client must get
its result and then the server's own FATAL (57P01), as it would without pgwarden.  pgwarden
used to drop both and answer 08006 "connection ... was lost" at once (found by
``make soak``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from loadtests.wire import ServerError, WireClient
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess
from tests.support_data import DB, POLICY

APP = "held-then-terminated"


def test_result_then_the_servers_fatal_reach_the_client(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    db = tmp_path / "audit.db"
    config = {
        "policy_file": str(POLICY),
        "catalog_user": "postgres",
        "audit": {"sinks": [{"type": "sqlite", "path": str(db)}], "durable_timeout_s": 15},
    }
    p = ProxyProcess(pg, tmp_path / "proxy", config=config)
    try:

        async def scenario() -> tuple[list[str], ServerError]:
            c = await WireClient.connect("127.0.0.1", p.port, "postgres", DB, application_name=APP)
            await c.query("SELECT 1")
            # Another process holds the audit database's write lock: the read's event waits.
            lock = sqlite3.connect(db, isolation_level=None, timeout=10)
            lock.execute("BEGIN EXCLUSIVE")
            try:
                read = asyncio.create_task(
                    c.query("SELECT full_name, email FROM customers WHERE customer_id = 7", 20)
                )
                await asyncio.sleep(1.0)
                assert not read.done()  # held for the trail
                pg.psql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    f" WHERE application_name = '{APP}'"
                )
                await asyncio.sleep(0.5)
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            result = await read
            with pytest.raises(ServerError) as info:
                await c.query("SELECT 1", 10)
            return result.tags, info.value

        tags, error = asyncio.run(scenario())
    finally:
        p.stop()
    assert tags == ["SELECT 1"]
    assert error.sqlstate == "57P01" and error.fatal
