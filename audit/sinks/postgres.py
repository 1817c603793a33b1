"""PostgreSQL sink: the central store several pgwarden processes write to.

It has its own DSN and may be a different server from the one being watched (it should be:
the people pgwarden watches should not be able to edit their own trail).  Each batch is one
transaction of two ``COPY``s (events, then ledger rows) through asyncpg's
``copy_records_to_table``.  Each writer process keeps its own chain (``chain_id``), so
concurrent writers never interleave one chain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from audit.events import COLUMNS, parse_ts
from audit.ledger import DIGEST_SIZE
from audit.sinks import Sealed, SinkError


def schema_sql(schema: str) -> str:
    """DDL of the PostgreSQL store (idempotent)."""
    return f"""
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- storage order
    v             integer NOT NULL,
    chain_id      text NOT NULL,
    seq           bigint NOT NULL,
    prev_hash     text NOT NULL,
    hash          text NOT NULL,
    ts            timestamptz NOT NULL,
    kind          text NOT NULL,
    session_id    text,
    db_user       text,
    database      text,
    application   text,
    client_addr   text,
    tls           boolean,
    end_user      text,
    fingerprint   text,
    statement     text,
    full_text     text,
    relations     text[],
    labels        text[],
    rows          bigint,
    bytes         bigint,
    duration_ms   double precision,
    verdict       text,
    rule_ids      text[],
    sqlstate      text,
    severity      text,
    message       text,
    details       json,     -- json, not jsonb: the chain hash covers the exact text
    ledger_count  integer,
    ledger_digest text
);
CREATE INDEX IF NOT EXISTS events_chain ON {schema}.events (chain_id, seq);
CREATE INDEX IF NOT EXISTS events_ts ON {schema}.events (ts);
CREATE INDEX IF NOT EXISTS events_end_user ON {schema}.events (end_user, ts);
CREATE INDEX IF NOT EXISTS events_session ON {schema}.events (session_id);
CREATE TABLE IF NOT EXISTS {schema}.ledger (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id  text NOT NULL,
    seq       bigint NOT NULL,
    kind      text NOT NULL,
    relation  text NOT NULL,
    n         integer NOT NULL,
    digests   bytea NOT NULL    -- n HMAC-SHA256-128 digests, 16 bytes each
);
CREATE INDEX IF NOT EXISTS ledger_event ON {schema}.ledger (chain_id, seq);
"""


_LEDGER_COLUMNS = ("chain_id", "seq", "kind", "relation", "n", "digests")


def _row(rec: dict[str, Any]) -> tuple[Any, ...]:
    r = dict(rec)
    r["ts"] = parse_ts(r["ts"])
    if r["details"] is not None:
        r["details"] = orjson.dumps(r["details"], option=orjson.OPT_SORT_KEYS).decode()
    return tuple(r[c] for c in COLUMNS)


class PostgresSink:
    """Writes batches with COPY over one asyncpg connection, reconnecting after failures."""

    durable = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "pgwarden_audit",
        name: str = "postgres",
        timeout: float = 30.0,
    ) -> None:
        if not schema.isidentifier():
            raise ValueError(f"the audit schema name {schema!r} must be a plain identifier")
        self.dsn = dsn
        # A store that stops answering (a network partition without RST) must fail the batch,
        # not hold the sink forever.
        self.timeout = timeout
        self.schema = schema
        self.name = name
        self._conn: Any = None
        self._ready = False  # tables known to exist (a store down at start-up is set up later)
        self._lock = asyncio.Lock()

    async def _connect(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await asyncpg.connect(self.dsn, timeout=10)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                raise SinkError(f"cannot connect to the PostgreSQL audit store: {exc}") from exc
        return self._conn

    async def start(self) -> None:
        await self._ensure_schema()

    async def _ensure_schema(self) -> None:
        conn = await self._connect()
        try:
            # Several pgwarden processes start at once; CREATE ... IF NOT EXISTS is not safe
            # against a concurrent CREATE, so the DDL runs under an advisory lock.
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgwarden_audit_ddl'))")
                await conn.execute(schema_sql(self.schema))
        except asyncpg.PostgresError as exc:
            raise SinkError(
                f"cannot create the audit tables in the PostgreSQL store: {exc}"
            ) from exc
        self._ready = True

    async def head(self, chain_id: str) -> tuple[int, str] | None:
        # Also asked before a failed batch is written again, maybe of a store that was down
        # at start-up (no tables yet) or whose connection just broke.
        if not self._ready:
            await self._ensure_schema()
        conn = await self._connect()
        try:
            row = await conn.fetchrow(
                f"SELECT seq, hash FROM {self.schema}.events WHERE chain_id = $1 "
                "ORDER BY seq DESC LIMIT 1",
                chain_id,
                timeout=self.timeout,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not conn.is_closed():
                conn.terminate()
            self._conn = None
            raise SinkError(f"cannot read the PostgreSQL audit store: {exc}") from exc
        return (int(row["seq"]), str(row["hash"])) if row else None

    async def write(self, batch: Sequence[Sealed]) -> None:
        async with self._lock:
            if not self._ready:
                await self._ensure_schema()
            conn = await self._connect()
            events = [_row(s.record) for s in batch]
            ledger = [
                (s.record["chain_id"], s.record["seq"], k, rel, len(p) // DIGEST_SIZE, p)
                for s in batch
                for k, rel, p in s.ledger
            ]
            try:
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "events",
                        records=events,
                        columns=COLUMNS,
                        schema_name=self.schema,
                        timeout=self.timeout,
                    )
                    if ledger:
                        await conn.copy_records_to_table(
                            "ledger",
                            records=ledger,
                            columns=_LEDGER_COLUMNS,
                            schema_name=self.schema,
                            timeout=self.timeout,
                        )
            except (
                OSError,
                TimeoutError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                # A connection the server has just terminated, whose goodbye asyncpg has not
                # read yet, refuses the COPY this way.
                asyncpg.InternalClientError,
            ) as exc:
                # A broken connection is replaced on the next batch.
                if not conn.is_closed():
                    conn.terminate()
                self._conn = None
                raise SinkError(
                    f"the PostgreSQL audit store could not write {len(events)} events: {exc}"
                ) from exc

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
        self._conn = None
