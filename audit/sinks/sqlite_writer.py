"""The SQLite writer process behind :class:`audit.sinks.sqlite.SQLiteSink`.

    python -m audit.sinks.sqlite_writer PATH SYNCHRONOUS

Frames on stdin: 4-byte big-endian length of the rest, 4-byte big-endian length ``m`` of the
events, ``m`` bytes of events, then (to the end of the frame, possibly empty) a pickle of the
ledger rows ``(chain_id, seq, kind, relation, n, packed digests)``.  Each event is one line:
its 64-character hash, then the canonical JSON the hash covers (orjson never writes a raw
newline), then ``\n``.
For each frame it runs one transaction and answers a frame on stdout: ``ok`` once COMMIT
has returned, or the error text.  It answers ``ok`` once at start-up when the schema exists.
End of stdin (the parent closed it, or died) ends the process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sqlite3
import struct
import sys
from operator import itemgetter
from typing import IO

import orjson

from audit.events import COLUMNS

HDR = struct.Struct(">I")
FRAME = struct.Struct(">II")

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
-- Partial: most statements name no end user, and "what did bob do" always names one.
-- (Stores created before this keep their full index; both answer the same queries.)
CREATE INDEX IF NOT EXISTS events_end_user ON events (end_user, ts) WHERE end_user IS NOT NULL;
CREATE TABLE IF NOT EXISTS ledger (
    id        INTEGER PRIMARY KEY,
    chain_id  TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    kind      TEXT NOT NULL,             -- 'k2' primary key, 'v2' labelled value (SCHEMA.md)
    relation  TEXT NOT NULL,             -- schema.table for keys, label for values
    n         INTEGER NOT NULL,          -- number of digests (one per row returned)
    digests   BLOB NOT NULL              -- n digests of 16 bytes each (SCHEMA.md)
);
CREATE INDEX IF NOT EXISTS ledger_event ON ledger (chain_id, seq);
"""

INSERT_LEDGER = (
    "INSERT INTO ledger (chain_id, seq, kind, relation, n, digests) VALUES (?, ?, ?, ?, ?, ?)"
)


_PLAIN = tuple(c for c in COLUMNS if c not in ("relations", "labels", "rule_ids", "details"))
_ORDER = [*_PLAIN, "relations", "labels", "rule_ids", "details"]
INSERT_EVENT = (
    f"INSERT INTO events ({', '.join(chr(34) + c + chr(34) for c in _ORDER)}) "
    f"VALUES ({', '.join('?' * len(_ORDER))})"
)


_plain = itemgetter(*_PLAIN)


def _json(v: object) -> str | None:
    if v is None:
        return None
    return orjson.dumps(v).decode() if v else "[]"


def _row(line: bytes) -> tuple[object, ...]:
    d = orjson.loads(line[64:])
    d["hash"] = line[:64].decode()
    details = d["details"]
    return (
        *_plain(d),
        _json(d["relations"]),
        _json(d["labels"]),
        _json(d["rule_ids"]),
        None if details is None else orjson.dumps(details, option=orjson.OPT_SORT_KEYS).decode(),
    )


def _send(out: IO[bytes], msg: bytes) -> None:
    out.write(HDR.pack(len(msg)) + msg)
    out.flush()


def _no_wakeup_preemption() -> None:
    """Ask Linux not to let us preempt the process that woke us.

    A pipe write wakes its reader "synchronously": the kernel tends to run the reader on
    the writer's CPU at once, expecting the writer to block next.  The proxy's event loop
    does not block; it would lose its CPU to us for a whole insert and commit on every
    batch, stalling every session.  SCHED_BATCH keeps our share of CPU but drops the
    wake-up preemption.  Not available everywhere, and not essential.
    """
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def main(argv: list[str]) -> int:
    """Serve write requests until stdin closes."""
    path, synchronous = argv[1], argv[2]
    # Ctrl-C, a service manager's SIGTERM and a terminal's hang-up reach the whole process
    # group; the parent then flushes its last batches through us (or, on SIGHUP, goes on
    # serving), so we stay until it closes our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _no_wakeup_preemption()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        # Fewer, larger WAL checkpoints: each one is extra fsyncs inside some commit.
        conn.execute("PRAGMA wal_autocheckpoint=10000")
        conn.executescript(SCHEMA)
    except sqlite3.Error as exc:
        _send(out, f"cannot open {path}: {exc}".encode())
        return 1
    _send(out, b"ok")
    while True:
        hdr = inp.read(FRAME.size)
        if len(hdr) < FRAME.size:
            break
        n, m = FRAME.unpack(hdr)
        payload = inp.read(n - 4)
        if len(payload) < n - 4:
            break
        rows = [_row(line) for line in payload[:m].split(b"\n")[:-1]]
        ledger = pickle.loads(payload[m:]) if len(payload) > m else None
        try:
            conn.execute("BEGIN")
            conn.executemany(INSERT_EVENT, rows)
            if ledger:
                conn.executemany(INSERT_LEDGER, ledger)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            _send(out, str(exc).encode() or b"sqlite error")
            continue
        _send(out, b"ok")
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
