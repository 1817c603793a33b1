"""A table with a two-column primary key, read through the real proxy: the responder's
``records-seen`` and ``who-saw --key`` must find the records the proxy put in the ledger.

The proxy and the audit package used to spell a composite key two ways (``["1", "a"]``
against ``["1","a"]``), so every composite-key digest in the ledger named a record no
responder's question could reach.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import audit_cli
from tests.support_data import DB
from tests.test_audit_proxy import keys, start

__all__ = ["keys"]  # a fixture

TABLE = """
DROP TABLE IF EXISTS order_lines;
CREATE TABLE order_lines (order_id int, line_code text, note text,
                          PRIMARY KEY (order_id, line_code));
COMMENT ON COLUMN order_lines.note IS 'pgwarden: pii.note';
INSERT INTO order_lines VALUES (1, 'a', 'n1'), (1, 'x,y', 'n2'), (2, 'é', 'n3'), (3, 'b', 'n4'),
                               (4, 'c', 'n5');
"""


@pytest.fixture
def trail(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path]
) -> Iterator[tuple[Path, Path]]:
    pg.psql(TABLE, database=DB)
    p, db = start(pg, tmp_path, keys)
    try:
        dsn = p.pg.dsn(user="postgres", port=p.port, dbname=DB, sslmode="disable")
        with psycopg.connect(dsn, autocommit=True) as conn:  # text format
            conn.execute(
                "/* end_user='rita' */ SELECT order_id, line_code, note FROM order_lines "
                "WHERE order_id IN (1, 2)"
            ).fetchall()

        async def binary() -> None:  # asyncpg asks for the int key in binary format
            conn = await asyncpg.connect(
                host="127.0.0.1", port=p.port, user="postgres", database=DB, ssl=False
            )
            try:
                await conn.fetch(
                    "/* end_user='sam' */ SELECT o.line_code, o.note, o.order_id "
                    "FROM order_lines o WHERE o.order_id = $1",
                    3,
                )
            finally:
                await conn.close()

        asyncio.run(binary())
    finally:
        p.stop()
    yield db, keys[0]


def run(db: Path, keyfile: Path, *args: str) -> Any:
    out = audit_cli(args[0], "--db", str(db), "--ledger-key", str(keyfile), *args[1:], "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_composite_keys_read_through_the_proxy_are_found_by_the_responder(
    pg: Cluster, trail: tuple[Path, Path]
) -> None:
    db, kf = trail
    seen = run(db, kf, "records-seen", "--end-user", "rita", "--table", "order_lines",
               "--resolve-dsn", pg.url(database=DB))  # fmt: skip
    assert seen["distinct_records"] == 3 and seen["resolved"] == 3
    assert {r["key"] for r in seen["records"]} == {'["1","a"]', '["1","x,y"]', '["2","é"]'}
    seen = run(db, kf, "records-seen", "--end-user", "sam", "--table", "order_lines",
               "--resolve-dsn", pg.url(database=DB))  # fmt: skip
    assert [r["key"] for r in seen["records"]] == ['["3","b"]']

    def who(*key: str) -> list[str]:
        keyargs = [a for k in key for a in ("--key", k)]
        return [r["end_user"] for r in run(db, kf, "who-saw", "--table", "order_lines", *keyargs)]

    assert who('["1","x,y"]') == ["rita"]
    assert who("1", "x,y") == ["rita"]  # one --key per column
    assert who('[1, "x,y"]') == ["rita"]  # typed by hand: spaces, a bare number
    assert who("2", "é") == ["rita"]
    assert who("3", "b") == ["sam"]
    assert who("4", "c") == []  # in the table, read by nobody


def test_who_saw_finds_composite_keys_spelled_by_older_proxies(tmp_path: Path) -> None:
    from audit.events import AuditEvent, Subject
    from audit.ledger import generate_key_file
    from audit.pipeline import AuditConfig, AuditTrail, SQLiteSinkConfig

    generate_key_file(tmp_path / "ledger.key")
    una = Subject("postgres", DB, "psql", "10.0.0.9", False, "una")

    async def write() -> None:
        trail = AuditTrail(
            AuditConfig(
                sinks=[SQLiteSinkConfig(path=tmp_path / "audit.db")],
                ledger_key=tmp_path / "ledger.key",
            )
        )
        await trail.start()
        await trail.submit(
            AuditEvent.statement_event(
                "s-una", una, fingerprint="o", statement="SELECT * FROM order_lines",
                relations=["public.order_lines"], labels=["pii.note"], rows=1,
                # what proxy/tracker.py wrote before the spelling was shared (json.dumps)
                ledger_keys={"order_lines": ['["7", "\\u00e9"]']},
            )
        )  # fmt: skip
        await trail.close()

    asyncio.run(write())
    rows = run(tmp_path / "audit.db", tmp_path / "ledger.key", "who-saw", "--table",
               "order_lines", "--key", "7", "--key", "é")  # fmt: skip
    assert [r["end_user"] for r in rows] == ["una"]
