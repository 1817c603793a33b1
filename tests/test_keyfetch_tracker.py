"""The tracker with a need-to-know rule, fed bytes directly: the statement goes upstream with
the key appended, and the client receives exactly its own columns, however the server's
bytes are cut into chunks."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import pytest

from proxy import commands as cmd
from proxy.messages.backend import (
    BindComplete,
    CommandComplete,
    DataRow,
    Field,
    ParseComplete,
    ReadyForQuery,
    RowDescription,
)
from proxy.messages.frontend import Bind, Describe, Execute, Parse, Query, Sync
from proxy.sandbox.cluster import Cluster
from proxy.tracker import Tracker
from tests.support_data import DB
from tests.trackerutil import audited_tracker

SQL = (
    "SELECT t.ticket_number, c.full_name, c.email FROM tickets t JOIN customers c"
    " ON c.customer_id = t.customer_id WHERE t.ticket_id < $1"
)
POLICY = {
    "subjects": {"dba": {"users": ["postgres"]}},
    "rules": [
        {
            "id": "ntk",
            "subjects": ["dba"],
            "need_to_know": {
                "table": "public.customers", "key_column": "customer_id",
                "lookup": "SELECT 3", "on_violation": "withhold",
            },
        }
    ],
}  # fmt: skip


def _tracker(pg: Cluster) -> tuple[Tracker, list[Field]]:
    tracker, customers = audited_tracker(pg, POLICY)

    async def tickets() -> int:
        conn = await asyncpg.connect(pg.url(database=DB))
        try:
            return int(await conn.fetchval("SELECT 'tickets'::regclass::oid"))
        finally:
            await conn.close()

    # The lookup's answer, as the runtime would give it: agent may see customer 3.
    tracker.guard.allowed[("ntk", "postgres")] = (time.monotonic() + 600, frozenset({b"3"}))
    fields = [
        Field("ticket_number", asyncio.run(tickets()), 2, 25, -1, -1, 0),
        Field("full_name", customers, 2, 25, -1, -1, 0),
        Field("email", customers, 3, 25, -1, -1, 0),
        Field("pgwarden_key", customers, 1, 20, 8, -1, 0),  # the appended key
    ]
    return tracker, fields


def _row(i: int) -> DataRow:
    return DataRow(
        (f"TM-{i:07d}".encode(), f"Customer {i}".encode(), f"c{i}@x".encode(), str(i).encode())
    )


def _feed(tracker: Tracker, stream: bytes, rng: random.Random) -> bytes:
    cuts = sorted(rng.sample(range(1, len(stream)), 6))
    sent = b""
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        for c in tracker.server_data(stream[a:b]):
            if isinstance(c, cmd.SendToClient):
                sent += c.data
    return sent


def _upstream(commands: list[cmd.Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, cmd.SendToServer))


@pytest.mark.parametrize("seed", range(4))
def test_simple_query(pg: Cluster, enforce_db: str, seed: int) -> None:
    tracker, fields = _tracker(pg)
    sql = SQL.replace("$1", "10")
    sent = _upstream(tracker.client_data(Query(sql).encode()))
    assert (
        sent
        == Query(sql.replace(" FROM", ' , "c"."customer_id" AS "pgwarden_key" FROM', 1)).encode()
    )
    rows = [_row(i) for i in range(1, 10)]
    stream = b"".join(
        (
            RowDescription(tuple(fields)).encode(),
            *(r.encode() for r in rows),
            CommandComplete("SELECT 9").encode(),
            ReadyForQuery("I").encode(),
        )
    )
    assert _feed(tracker, stream, random.Random(seed)) == b"".join(
        (
            RowDescription(tuple(fields[:3])).encode(),
            DataRow(rows[2].values[:3]).encode(),
            CommandComplete("SELECT 1").encode(),
            ReadyForQuery("I").encode(),
        )
    )


@pytest.mark.parametrize("seed", range(4))
def test_extended_protocol_with_per_column_formats(pg: Cluster, enforce_db: str, seed: int) -> None:
    tracker, fields = _tracker(pg)
    client = Parse("", SQL).encode() + Bind("", "", (), (b"10",), (0, 0, 0)).encode()
    client += Describe("P", "").encode() + Execute("").encode() + Sync().encode()
    sent = _upstream(tracker.client_data(client))
    # The server is asked for four columns, the fourth (the key) in text.
    assert Bind("", "", (), (b"10",), (0, 0, 0, 0)).encode() in sent
    assert b'"c"."customer_id" AS "pgwarden_key"' in sent
    rows = [_row(i) for i in range(1, 10)]
    stream = b"".join(
        (
            ParseComplete().encode(),
            BindComplete().encode(),
            RowDescription(tuple(fields)).encode(),
            *(r.encode() for r in rows),
            CommandComplete("SELECT 9").encode(),
            ReadyForQuery("I").encode(),
        )
    )
    assert _feed(tracker, stream, random.Random(seed)) == b"".join(
        (
            ParseComplete().encode(),
            BindComplete().encode(),
            RowDescription(tuple(fields[:3])).encode(),
            DataRow(rows[2].values[:3]).encode(),
            CommandComplete("SELECT 1").encode(),
            ReadyForQuery("I").encode(),
        )
    )
