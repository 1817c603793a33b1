"""Window counters shared through Redis by two pgwarden processes, and failing closed."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
import yaml

from proxy.sandbox.cluster import Cluster
from tests.conftest import RedisServer
from tests.proxyutil import ProxyProcess
from tests.support_data import DB


def policy_file(tmp_path: Path, redis_url: str) -> Path:
    policy = {
        "subjects": {"agents": {"users": ["support_app"], "end_user_from": ["set"]}},
        "rules": [
            {
                "id": "hourly",
                "subjects": ["agents"],
                "labels": ["pii.*"],
                "window": "1h",
                "max_records": 30,
            },
        ],
        "store": {"backend": "redis", "url": redis_url},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def start(pg: Cluster, workdir: Path, policy: Path) -> ProxyProcess:
    return ProxyProcess(pg, workdir, ["--policy", str(policy), "--catalog-user", "postgres"])


def page(conn: psycopg.Connection[tuple[object, ...]], lo: int) -> int:
    sql = f"SELECT customer_id, email FROM customers WHERE customer_id BETWEEN {lo} AND {lo + 9}"
    return len(conn.execute(sql).fetchall())


def connect(p: ProxyProcess, who: str) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(
        p.pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable"), autocommit=True
    )
    conn.execute(f"SET pgwarden.end_user = '{who}'")
    return conn


def test_two_proxies_share_one_window_through_redis(
    pg: Cluster, enforce_db: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, redis_server.url)
    a, b = start(pg, tmp_path / "a", path), start(pg, tmp_path / "b", path)
    who = f"trent-{uuid.uuid4().hex[:8]}"
    try:
        with connect(a, who) as ca, connect(b, who) as cb:
            assert page(ca, 1) == 10 and page(ca, 11) == 10  # 20 distinct records via A
            assert page(cb, 21) == 10  # 30 via B: the hour's budget, counted across both
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="hourly"):
                page(cb, 31)
            # Reading records already counted does not use budget the subject does not have:
            # the window is full, so every labelled read is refused, through either proxy.
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="hourly"):
                page(ca, 41)
    finally:
        assert a.stop() == 0 and b.stop() == 0


def test_windows_fail_closed_while_redis_is_down(
    pg: Cluster, enforce_db: str, own_redis_server: RedisServer, tmp_path: Path
) -> None:
    p = start(pg, tmp_path / "p", policy_file(tmp_path, own_redis_server.url))
    try:
        with connect(p, f"ivan-{uuid.uuid4().hex[:8]}") as conn:
            assert page(conn, 1) == 10
            own_redis_server.stop()
            # Totals are read from Redis before each windowed statement: with Redis gone the
            # very next labelled read is refused, and so is every one until it is back.
            for lo in (11, 21):
                with pytest.raises(
                    psycopg.errors.InsufficientPrivilege, match="window counters are unavailable"
                ):
                    page(conn, lo)
            p.wait_for_log_event("window_store_unavailable")
            assert conn.execute("SELECT count(*) FROM products").fetchone() == (
                1,
            )  # unlabelled: fine
            own_redis_server.start()
            p.wait_for_log_event("window_store_available", timeout=15)
            assert page(conn, 31) == 10
    finally:
        assert p.stop() == 0


def test_a_redis_outage_quarantines_nobody(
    pg: Cluster, enforce_db: str, own_redis_server: RedisServer, tmp_path: Path
) -> None:
    """Refusals because the counters are unreachable are pgwarden failing closed, not the
    subject's offence.  They used to count towards the quarantine: those decided just after
    Redis came back (pgwarden probes it once a second) reached the restarted Redis, and
    ``make soak`` saw busy agents quarantined for 30 minutes after a 3 s outage."""
    policy = yaml.safe_load(policy_file(tmp_path, own_redis_server.url).read_text())
    policy["quarantine"] = {
        "after_blocks": 1, "window": "10m", "duration": "30m", "subjects": ["agents"],
    }  # fmt: skip
    path = tmp_path / "quarantine.yaml"
    path.write_text(yaml.safe_dump(policy))
    p = start(pg, tmp_path / "p", path)
    try:
        with connect(p, f"olga-{uuid.uuid4().hex[:8]}") as conn:
            assert page(conn, 1) == 10
            own_redis_server.stop()
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unavailable"):
                page(conn, 11)
            p.wait_for_log_event("window_store_unavailable")
            own_redis_server.start()
            # Before pgwarden's next probe it still refuses, now with Redis there to count.
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unavailable"):
                page(conn, 21)
            p.wait_for_log_event("window_store_available", timeout=15)
            assert page(conn, 31) == 10
    finally:
        assert p.stop() == 0
