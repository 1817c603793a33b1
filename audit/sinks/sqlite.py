"""SQLite sink: the embedded default store.

WAL mode with ``synchronous=FULL``: a commit is on disk when it returns, and readers (the
responder CLI) never block the writer.  All SQLite work happens on one writer thread that
drains every batch waiting for it into one transaction -- group commit, so one fsync covers
many events however many sessions are waiting on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from audit.events import COLUMNS, Record
from audit.sinks import Sealed, SinkError

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id            INTEGER PRIMARY KEY,   -- storage order; verify compares it with seq
    v             INTEGER NOT NULL,
    chain_id      TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL,
    ts            TEXT NOT NULL,         -- ISO-8601 UTC, microseconds, 'Z'
    kind          TEXT NOT NULL,
    session_id    TEXT,
    db_user       TEXT,
    database      TEXT,
    application   TEXT,
    client_addr   TEXT,
    tls           INTEGER,
    end_user      TEXT,
    fingerprint   TEXT,
    statement     TEXT,
    full_text     TEXT,
    relations     TEXT,                  -- JSON array
    labels        TEXT,                  -- JSON array
    rows          INTEGER,
    bytes         INTEGER,
    duration_ms   REAL,
    verdict       TEXT,
    rule_ids      TEXT,                  -- JSON array
    sqlstate      TEXT,
    severity      TEXT,
    message       TEXT,
    details       TEXT,                  -- JSON object
    ledger_count  INTEGER,
    ledger_digest TEXT
);
CREATE INDEX IF NOT EXISTS events_chain ON events (chain_id, seq);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_end_user ON events (end_user, ts);
CREATE INDEX IF NOT EXISTS events_session ON events (session_id);
CREATE TABLE IF NOT EXISTS ledger (
    id        INTEGER PRIMARY KEY,
    chain_id  TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    kind      TEXT NOT NULL,             -- 'k' primary key, 'v' labelled value
    relation  TEXT NOT NULL,             -- schema.table for 'k', label for 'v'
    digest    BLOB NOT NULL              -- HMAC-SHA256
);
CREATE INDEX IF NOT EXISTS ledger_digest ON ledger (digest);
CREATE INDEX IF NOT EXISTS ledger_event ON ledger (chain_id, seq);
"""

INSERT_LEDGER = "INSERT INTO ledger (chain_id, seq, kind, relation, digest) VALUES (?, ?, ?, ?, ?)"


def _dumps(v: Any) -> str | None:
    return None if v is None else orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()


_PLAIN = tuple(c for c in COLUMNS if c not in ("relations", "labels", "rule_ids", "details"))
_ORDER = [*_PLAIN, "relations", "labels", "rule_ids", "details"]
INSERT_EVENT = (
    f"INSERT INTO events ({', '.join(chr(34) + c + chr(34) for c in _ORDER)}) "
    f"VALUES ({', '.join('?' * len(_ORDER))})"
)


def _list(v: Any) -> str | None:
    return None if v is None else orjson.dumps(v).decode()


def row_of(rec: Record) -> tuple[Any, ...]:
    """A record as the tuple INSERT_EVENT expects (lists and details as JSON text)."""
    return (
        *[rec[c] for c in _PLAIN],
        _list(rec["relations"]),
        _list(rec["labels"]),
        _list(rec["rule_ids"]),
        _dumps(rec["details"]),
    )


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open an audit database (the CLI reads with ``readonly=True``)."""
    if readonly:
        if not Path(path).exists():
            raise FileNotFoundError(f"there is no audit database at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


_STOP = object()


class SQLiteSink:
    """Writes to one SQLite database file from a dedicated thread."""

    durable = True

    def __init__(
        self, path: Path | str, *, synchronous: str = "FULL", name: str = "sqlite"
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.name = name
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._conn = await asyncio.to_thread(self._open)
        except (sqlite3.Error, OSError) as exc:
            raise SinkError(f"the SQLite audit store {self.path} cannot be opened: {exc}") from exc
        self._thread = threading.Thread(
            target=self._run, name=f"pgwarden-audit-{self.name}", daemon=True
        )
        self._thread.start()

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.executescript(SCHEMA)
        return conn

    async def head(self, chain_id: str) -> tuple[int, str] | None:
        def q() -> tuple[int, str] | None:
            conn = connect(self.path)
            try:
                row = conn.execute(
                    "SELECT seq, hash FROM events WHERE chain_id = ? ORDER BY seq DESC LIMIT 1",
                    (chain_id,),
                ).fetchone()
            finally:
                conn.close()
            return (int(row[0]), str(row[1])) if row else None

        return await asyncio.to_thread(q)

    async def write(self, batch: Sequence[Sealed]) -> None:
        if self._thread is None or self._loop is None:
            raise SinkError(f"the SQLite audit store {self.path} is not started")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._q.put((batch, fut))
        await fut

    def _run(self) -> None:
        assert self._conn is not None and self._loop is not None
        conn, loop = self._conn, self._loop
        stop = False
        while not stop:
            items = [self._q.get()]
            # Group commit: everything that queued up while we were committing goes in one
            # transaction and costs one fsync.
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            work = []
            for it in items:
                if it is _STOP:
                    stop = True
                else:
                    work.append(it)
            if not work:
                continue
            err: BaseException | None = None
            try:
                events = []
                ledger: list[tuple[Any, ...]] = []
                for batch, _fut in work:
                    for s in batch:
                        rec = s.record
                        events.append(row_of(rec))
                        if s.ledger:
                            cid, seq = rec["chain_id"], rec["seq"]
                            ledger.extend((cid, seq, k, rel, d) for k, rel, d in s.ledger)
                conn.execute("BEGIN")
                conn.executemany(INSERT_EVENT, events)
                if ledger:
                    conn.executemany(INSERT_LEDGER, ledger)
                conn.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                err = SinkError(f"the SQLite audit store {self.path} could not write: {exc}")
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for _batch, fut in work:
                loop.call_soon_threadsafe(_settle, fut, err)
        conn.close()

    async def close(self) -> None:
        if self._thread is not None:
            self._q.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)
