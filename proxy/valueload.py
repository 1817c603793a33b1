"""Building and refreshing a database's value index (``policy.valueindex``) on pgwarden's
own read-only connection (the catalog role).

The protected tables are those the catalog knows with a primary key and labelled columns:
tables and partitioned tables, read with their inheritance children and partitions (as a
read of the parent returns them, and as the ledger names them).  A build reads every row in
one read-only REPEATABLE READ transaction and notes the oldest transaction still running
then; a refresh reads the rows whose ``xmin`` is that or newer (added or changed since,
plus a few read twice), so it hashes only what changed.  Should the 32-bit transaction
counter have wrapped since, the refresh builds anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from audit.ledger import pk_bytes
from policy.catalog import CatalogRelation, CatalogSnapshot
from policy.rewrite import quote_ident
from policy.valueindex import IndexBuilder, ValueIndex

log = structlog.get_logger("pgwarden.values")

_BATCH = 10_000
_XMIN_SQL = "SELECT (txid_snapshot_xmin(txid_current_snapshot()) % 4294967296)::bigint"


class IndexTooLarge(Exception):
    """The protected tables hold more entries than the policy lets the index keep."""


@dataclass(frozen=True, slots=True)
class Protected:
    table: str  # schema.name, as the ledger spells it
    sql: str  # key columns then labelled columns, as text
    nkey: int  # how many of them are the key
    # Other protected tables whose record a row of this one belongs to, and the position of
    # that record's key in this table's key: crm.customer_phones (customer_id, kind) holds
    # phone numbers of the crm.customers record customer_id.
    owners: tuple[tuple[str, int], ...] = ()


def protected_tables(snapshot: CatalogSnapshot) -> list[Protected]:
    """The tables value matching indexes: tables and partitioned tables with a primary key
    and labelled columns.  A table whose primary key includes the one-column primary key
    of another such table in its schema (by name) names that table's record as well."""
    rels = [
        rel
        for rel in sorted(snapshot.relations.values(), key=lambda r: r.qualified)
        if rel.kind in ("r", "p")
        and rel.primary_key
        and any(c.labels and c.name not in rel.primary_key for c in rel.columns)
    ]
    # (schema, key column) -> the table keyed by it alone; where several are (a table and
    # its inheritance children), the one the others descend from; none if that is unclear.
    keyed: dict[tuple[str, str], list[CatalogRelation]] = {}
    for r in rels:
        if len(r.primary_key) == 1:
            keyed.setdefault((r.schema, r.primary_key[0]), []).append(r)
    single: dict[tuple[str, str], str] = {}
    for where, cands in keyed.items():
        oids = {c.oid for c in cands}
        roots = [c for c in cands if not oids.intersection(c.parents)]
        if len(roots) == 1:
            single[where] = roots[0].qualified
    out = []
    for rel in rels:
        labelled = [c.name for c in rel.columns if c.labels and c.name not in rel.primary_key]
        owners = tuple(
            (owner, i)
            for i, col in enumerate(rel.primary_key)
            if len(rel.primary_key) > 1
            and (owner := single.get((rel.schema, col))) is not None
            and owner != rel.qualified
        )
        out.append(Protected(rel.qualified, _select(rel, labelled), len(rel.primary_key), owners))
    return out


def _select(rel: CatalogRelation, labelled: list[str]) -> str:
    cols = ", ".join(f"{quote_ident(c)}::text" for c in [*rel.primary_key, *labelled])
    return f"SELECT {cols} FROM {quote_ident(rel.schema)}.{quote_ident(rel.name)}"


def _rows(records: list[Any], p: Protected) -> Iterator[tuple[str, bytes, list[bytes | None]]]:
    """(table, key as the ledger spells it, labelled values) for each row: under its own
    table, and under each owner whose key is part of it."""
    for r in records:
        parts = [None if v is None else v.encode() for v in r.values()]
        key = pk_bytes(parts[: p.nkey])
        if key is None:
            continue
        values = parts[p.nkey :]
        yield p.table, key, values
        for owner, i in p.owners:
            if (owner_key := parts[i]) is not None:
                yield owner, owner_key, values


async def build(
    conn: Any, snapshot: CatalogSnapshot, *, max_entries: int
) -> tuple[ValueIndex, int, float]:
    """A fresh index of every protected table; returns it, the xmin a refresh starts from,
    and the seconds the build took."""
    t0 = time.perf_counter()
    builder = IndexBuilder()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        xmin = int(await conn.fetchval(_XMIN_SQL))
        for p in protected_tables(snapshot):
            builder.table(p.table)  # in the build's figures even when empty
            async for batch in _batches(conn, p.sql):
                # Hashing is pure Python: in a thread, a batch at a time, the event loop
                # keeps serving sessions while a big table is indexed.
                await asyncio.to_thread(_add_rows, builder, batch, p)
                if builder.pending > max_entries:
                    raise IndexTooLarge(
                        f"the protected tables hold more than {max_entries:,} labelled "
                        "values (value_matching.max_entries)"
                    )
    index = await asyncio.to_thread(builder.build)
    return index, xmin, time.perf_counter() - t0


def _add_rows(builder: IndexBuilder, batch: list[Any], p: Protected) -> None:
    for table, key, values in _rows(batch, p):
        builder.add_row(builder.table(table), key, values)


async def _batches(conn: Any, sql: str, *args: Any) -> Any:
    cursor = await conn.cursor(sql, *args)
    while batch := await cursor.fetch(_BATCH):
        yield batch


async def refresh(
    conn: Any, snapshot: CatalogSnapshot, index: ValueIndex, since: int
) -> tuple[int, int] | None:
    """Add the rows added or changed since ``since`` to ``index``; returns the next xmin
    and how many rows were read, or None when the counter wrapped (build anew)."""
    rows = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        xmin = int(await conn.fetchval(_XMIN_SQL))
        if xmin < since:
            return None
        for p in protected_tables(snapshot):
            sql = f"{p.sql} WHERE xmin::text::bigint >= $1"
            async for batch in _batches(conn, sql, since):
                for table, key, values in _rows(batch, p):
                    index.add(table, key, values)
                    rows += table == p.table
    return xmin, rows


class ValueIndexes:
    """The value index of every database pgwarden has a catalog for: built before the
    database's first session goes on (as its catalog is), refreshed every ``refresh``
    seconds and on demand (``rebuild_all``: a policy reload, whose labels may differ).

    ``indexes`` is the mapping sessions' guards read; a rebuilt index replaces the old one
    in one step.  A build that fails leaves the database without value matching until the
    next attempt, and says so in the log: the rows' own keys are still recorded."""

    def __init__(
        self,
        connect: Callable[[str], Awaitable[Any]],
        snapshot: Callable[[str], CatalogSnapshot | None],
        *,
        refresh: float,
        max_entries: int,
    ) -> None:
        self._connect = connect
        self._snapshot = snapshot
        self.refresh_every = refresh
        self.max_entries = max_entries
        self.indexes: dict[str, ValueIndex] = {}
        self._since: dict[str, tuple[int, list[Protected]]] = {}
        self._building: dict[str, asyncio.Task[None]] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}

    async def ensure(self, database: str) -> None:
        """The database's first index (once; later sessions do not wait)."""
        if database in self.indexes or database in self._loops:
            task = self._building.get(database)
            if task is not None:
                await asyncio.shield(task)
            return
        task = self._building.get(database)
        if task is None:
            task = self._building[database] = asyncio.create_task(self._build(database))
        try:
            await asyncio.shield(task)
        finally:
            self._building.pop(database, None)
        if database not in self._loops:
            self._loops[database] = asyncio.create_task(self._loop(database))

    async def _build(self, database: str) -> None:
        snapshot = self._snapshot(database)
        if snapshot is None:
            return
        try:
            conn = await self._connect(database)
        except Exception as exc:
            log.error("value_index_failed", database=database, error=str(exc))
            return
        try:
            index, xmin, seconds = await build(conn, snapshot, max_entries=self.max_entries)
        except Exception as exc:
            log.error("value_index_failed", database=database, error=str(exc))
            return
        finally:
            await conn.close()
        self.indexes[database] = index
        self._since[database] = (xmin, protected_tables(snapshot))
        log.info(
            "value_index_built", database=database, seconds=round(seconds, 2),
            bytes=index.nbytes, **index.stats.as_dict(),
        )  # fmt: skip

    async def refresh(self, database: str) -> None:
        """Index the rows added or changed since the last build or refresh; build anew when
        the protected tables changed (DDL, a policy reload) or the counter wrapped."""
        snapshot = self._snapshot(database)
        index = self.indexes.get(database)
        since = self._since.get(database)
        if snapshot is None:
            return
        if index is None or since is None or since[1] != protected_tables(snapshot):
            await self._build(database)
            return
        conn = await self._connect(database)
        try:
            done = await refresh(conn, snapshot, index, since[0])
        finally:
            await conn.close()
        if done is None:
            await self._build(database)
            return
        self._since[database] = (done[0], since[1])
        if done[1]:
            log.info("value_index_refreshed", database=database, rows=done[1])

    async def _loop(self, database: str) -> None:
        while True:
            await asyncio.sleep(self.refresh_every)
            try:
                await self.refresh(database)
            except Exception as exc:  # the next round tries again
                log.error("value_index_refresh_failed", database=database, error=str(exc))

    def rebuild_all(self) -> None:
        """Build every database's index anew, in the background (a policy reload)."""
        for database in list(self.indexes):
            self._since.pop(database, None)
            if database not in self._building:
                task = self._building[database] = asyncio.create_task(self._build(database))
                task.add_done_callback(functools.partial(self._built, database))

    def _built(self, database: str, _task: asyncio.Task[None]) -> None:
        self._building.pop(database, None)

    async def close(self) -> None:
        for task in [*self._loops.values(), *self._building.values()]:
            task.cancel()
        for task in [*self._loops.values(), *self._building.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
