"""Every line pgwarden writes to stderr is in the configured log format, library output too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from proxy.sandbox.cluster import Cluster
from tests.conftest import ProxyFactory
from tests.proxyutil import wait_until
from tests.support_data import POLICY

# What a running pgwarden meets: its own events, a library logging through the standard
# library (asyncpg does, asyncio's "exception was never retrieved" does), a Python warning.
_SCRIPT = """
import logging, warnings, structlog
from proxy.logs import configure_logging
configure_logging("info", "json")
configure_logging("info", "json")  # a SIGHUP reload configures again: still one line each
structlog.get_logger("pgwarden").info("own_event", n=1)
logging.getLogger("asyncpg.pool").warning("connection %s was lost", "c1")
warnings.warn("a library is unhappy", RuntimeWarning)
logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=ValueError("x"))
logging.getLogger("quiet").debug("below the level")
"""


def _stderr_of(script: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_library_logs_and_warnings_are_json_lines() -> None:
    lines = _stderr_of(_SCRIPT).splitlines()
    events = [json.loads(line) for line in lines]  # every line parses
    assert [e["event"] for e in events] == [
        "own_event",
        "connection c1 was lost",
        "python_warning",
        "Task exception was never retrieved",
    ]
    assert events[1]["logger"] == "asyncpg.pool" and events[1]["level"] == "warning"
    assert "RuntimeWarning: a library is unhappy" in events[2]["warning"]
    assert "ValueError" in events[3]["exception"]
    assert all("timestamp" in e for e in events)


@pytest.mark.parametrize("fmt", ["console"])
def test_console_format_applies_to_library_lines_too(fmt: str) -> None:
    script = _SCRIPT.replace('"json")', f'"{fmt}")')
    text = _stderr_of(script)
    assert "connection c1 was lost" in text
    for line in text.splitlines():
        assert not line.startswith("{")


def test_a_running_proxys_stderr_is_all_json_with_a_catalog_refresh_warning(
    proxy_factory: ProxyFactory, pg: Cluster, tmp_path: Path
) -> None:
    pg.psql(
        "DROP DATABASE IF EXISTS logs_db WITH (FORCE); CREATE DATABASE logs_db;"
        "REVOKE CONNECT ON DATABASE logs_db FROM PUBLIC;"
        "GRANT CONNECT ON DATABASE logs_db TO trust_user;",
        database="postgres",
    )
    p = proxy_factory(
        "--policy",
        str(POLICY),
        "--catalog-user",
        "trust_user",
        "--log-format",
        "json",
        "--audit-db",
        str(tmp_path / "audit.db"),
    )
    with psycopg.connect(p.dsn(dbname="logs_db"), autocommit=True) as conn:
        conn.execute("select 1")
        # pgwarden's catalog role loses the right to connect; its connection closes when
        # idle, so the reload that the next DDL asks for fails: a warning, and the previous
        # catalog stays in force.
        pg.psql("REVOKE CONNECT ON DATABASE logs_db FROM trust_user", database="postgres")
        wait_until(
            lambda: (
                pg.psql(
                    "select count(*) from pg_stat_activity where datname = 'logs_db' "
                    "and application_name = 'pgwarden-catalog'"
                ).strip()
                == "0"
            ),
            10,
            what="pgwarden's catalog connection to close when idle",
        )
        conn.execute("create table t (id int)")
        event = p.wait_for_log_event("catalog_refresh_failed", timeout=20)
        assert event["database"] == "logs_db" and event["level"] == "warning"
        assert conn.execute("select count(*) from t").fetchone() == (0,)
    assert p.stop() == 0
    lines = p.log().splitlines()
    assert lines
    for line in lines:
        json.loads(line)  # every line, whoever wrote it
    pg.psql("DROP DATABASE logs_db WITH (FORCE)", database="postgres")
