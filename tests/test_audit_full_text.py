"""``audit.store_full_text``: the trail keeps the text each client sent.

The option was documented and accepted, but the proxy never handed the text to the audit
event, so the column stayed NULL whatever the setting (found by ``make soak``, which finds
each labelled read in the trail by a traceparent in its comment).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess
from tests.support_data import DB, POLICY


def _trail(pg: Cluster, tmp_path: Path, full_text: bool) -> Path:
    db = tmp_path / f"audit-{full_text}.db"
    config = {
        "policy_file": str(POLICY),
        "catalog_user": "postgres",
        "audit": {"sinks": [{"type": "sqlite", "path": str(db)}], "store_full_text": full_text},
    }
    p = ProxyProcess(pg, tmp_path / f"proxy-{full_text}", config=config)
    try:
        dsn = pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT full_name, email FROM customers WHERE customer_id = 7"
                " /* end_user='alice',traceparent='t-1' */"
            ).fetchall()
            # Extended protocol: the Parse's text.
            conn.execute(
                "SELECT email FROM customers WHERE customer_id = %s /* end_user='alice' */",
                (8,),
            ).fetchall()
    finally:
        p.stop()
    return db


def _full_texts(db: Path) -> list[str | None]:
    conn = sqlite3.connect(db)
    try:
        return [
            r[0]
            for r in conn.execute(
                "SELECT full_text FROM events WHERE kind = 'statement' AND labels <> '[]' ORDER BY id"
            )
        ]
    finally:
        conn.close()


def test_full_text_is_kept_when_configured(pg: Cluster, enforce_db: str, tmp_path: Path) -> None:
    texts = _full_texts(_trail(pg, tmp_path, True))
    assert texts == [
        "SELECT full_name, email FROM customers WHERE customer_id = 7"
        " /* end_user='alice',traceparent='t-1' */",
        "SELECT email FROM customers WHERE customer_id = $1 /* end_user='alice' */",
    ]


def test_full_text_is_not_kept_by_default(pg: Cluster, enforce_db: str, tmp_path: Path) -> None:
    texts = _full_texts(_trail(pg, tmp_path, False))
    assert texts == [None, None]
