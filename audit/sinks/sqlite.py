"""SQLite sink: the embedded default store.

WAL mode with ``synchronous=FULL``: a commit is on disk when it returns, and readers (the
responder CLI) never block the writer.  All writes go through one writer (see
:class:`SQLiteSink` for why it is a child process) that takes every batch waiting for it
into one transaction -- group commit, so one fsync covers many events however many sessions
are waiting on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from audit.sinks import Sealed, SinkError
from audit.sinks.sqlite_writer import FRAME, HDR, INSERT_EVENT, INSERT_LEDGER, SCHEMA

__all__ = ["INSERT_EVENT", "INSERT_LEDGER", "SCHEMA", "SQLiteSink", "connect", "encode_batch"]


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


def encode_batch(batch: Sequence[Sealed]) -> bytes:
    """One frame for the writer process (layout in :mod:`audit.sinks.sqlite_writer`).

    Events travel as the canonical JSON already made for the hash, one per line behind its
    hash, so this side only joins bytes: no pickling of per-event objects, and the child
    parses on its own core.
    """
    parts: list[bytes] = []
    ledger: list[tuple[Any, ...]] = []
    for s in batch:
        rec = s.record
        canon = s.canonical or orjson.dumps(
            {k: v for k, v in rec.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS
        )
        parts += (rec["hash"].encode(), canon, b"\n")
        if s.ledger:
            cid, seq = rec["chain_id"], rec["seq"]
            for k, rel, p in s.ledger:
                ledger.append((cid, seq, k, rel, len(p) // 16, p))
    events = b"".join(parts)
    tail = pickle.dumps(ledger, protocol=pickle.HIGHEST_PROTOCOL) if ledger else b""
    return FRAME.pack(4 + len(events) + len(tail), len(events)) + events + tail


class SQLiteSink:
    """Writes to one SQLite database file through a writer *process*.

    Why a process: Python's sqlite3 module releases the GIL around every row it inserts and
    must win it back for the next one.  With the proxy's event loop busy, every one of those
    hand-overs waits for the interpreter's switch interval, and inserts slow down ten-fold.
    A child process (``python -m audit.sinks.sqlite_writer``) has its own interpreter.

    The event loop talks to it over non-blocking pipes: a batch is one ``write`` of joined
    bytes and the answer arrives like any socket read.  No thread sits in between, so a
    batch costs no thread wake-ups and no GIL hand-overs (each of which, with the loop busy,
    costs more CPU than building the frame).  A batch is acknowledged only after the
    child's COMMIT returned, so a kill -9 of either process loses no acknowledged event; if
    the child dies, the batch fails and the next one starts a new child.
    """

    durable = True

    def __init__(
        self, path: Path | str, *, synchronous: str = "FULL", name: str = "sqlite"
    ) -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self.name = name
        self._proc: asyncio.subprocess.Process | None = None
        # One frame in flight: the writer answers frames in order, but a second writer
        # interleaving its bytes would corrupt the stream.
        self._lock = asyncio.Lock()
        self._started = False

    async def start(self) -> None:
        try:
            await self._spawn()
        except (OSError, EOFError, SinkError, asyncio.IncompleteReadError) as exc:
            raise SinkError(f"the SQLite audit store {self.path} cannot be opened: {exc}") from exc
        self._started = True

    async def _spawn(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "audit.sinks.sqlite_writer",
            str(self.path),
            self.synchronous,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
        )
        try:
            reply = await self._reply(proc)
        except BaseException:
            await self._kill(proc)
            raise
        if reply != b"ok":
            await self._kill(proc)
            raise SinkError(reply.decode(errors="replace"))
        self._proc = proc

    @staticmethod
    async def _reply(proc: asyncio.subprocess.Process) -> bytes:
        assert proc.stdout is not None
        (n,) = HDR.unpack(await proc.stdout.readexactly(HDR.size))
        return await proc.stdout.readexactly(n)

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
        if not self._started:
            raise SinkError(f"the SQLite audit store {self.path} is not started")
        frame = encode_batch(batch)
        async with self._lock:
            try:
                if self._proc is None or self._proc.returncode is not None:
                    await self._discard_proc()
                    await self._spawn()
                proc = self._proc
                assert proc is not None and proc.stdin is not None
                proc.stdin.write(frame)
                await proc.stdin.drain()
                reply = await self._reply(proc)
            except (OSError, EOFError, asyncio.IncompleteReadError, SinkError) as exc:
                await self._discard_proc()
                raise SinkError(
                    f"the SQLite audit store {self.path} could not write: {exc}"
                ) from exc
            except asyncio.CancelledError:
                # The frame may be half written: the stream is unusable.
                await self._discard_proc()
                raise
        if reply != b"ok":
            raise SinkError(
                f"the SQLite audit store {self.path} could not write: "
                f"{reply.decode(errors='replace')}"
            )

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    async def _discard_proc(self, graceful: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if not graceful:
            await self._kill(proc)
            return
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            await self._kill(proc)

    async def close(self) -> None:
        if self._started:
            self._started = False
            async with self._lock:
                await self._discard_proc(graceful=True)
