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
import queue
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from audit.sinks import Sealed, SinkError
from audit.sinks.sqlite_writer import INSERT_EVENT, INSERT_LEDGER, SCHEMA

__all__ = ["INSERT_EVENT", "INSERT_LEDGER", "SCHEMA", "SQLiteSink", "connect"]


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
_HDR = struct.Struct(">I")


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) < n:
        raise EOFError("the SQLite writer process went away")
    return data


class SQLiteSink:
    """Writes to one SQLite database file through a writer *process*.

    Why a process: Python's sqlite3 module releases the GIL around every row it inserts and
    must win it back for the next one.  With the proxy's event loop busy, every one of those
    hand-overs waits for the interpreter's switch interval, and inserts slow down ten-fold.
    A child process (``python -m audit.sinks.sqlite_writer``) has its own interpreter; this
    side only pickles a batch and waits on a pipe, which costs the GIL nothing.  A batch is
    acknowledged only after the child's COMMIT returned, so a kill -9 of either process loses
    no acknowledged event; if the child dies, the batch fails and the next one restarts it.
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
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._spawn)
        except (OSError, EOFError, SinkError) as exc:
            raise SinkError(f"the SQLite audit store {self.path} cannot be opened: {exc}") from exc
        self._thread = threading.Thread(
            target=self._run, name=f"pgwarden-audit-{self.name}", daemon=True
        )
        self._thread.start()

    def _spawn(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "audit.sinks.sqlite_writer", str(self.path), self.synchronous],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
        )
        assert proc.stdout is not None
        reply = self._reply(proc)
        if reply != b"ok":
            proc.kill()
            proc.wait()
            raise SinkError(reply.decode(errors="replace"))
        self._proc = proc

    @staticmethod
    def _reply(proc: subprocess.Popen[bytes]) -> bytes:
        assert proc.stdout is not None
        (n,) = _HDR.unpack(_read_exact(proc.stdout, 4))
        return _read_exact(proc.stdout, n)

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
        assert self._loop is not None
        loop = self._loop
        stop = False
        while not stop:
            items = [self._q.get()]
            # Group commit: everything that queued up during the last commit goes in one
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
                self._commit(work)
            except (OSError, EOFError, SinkError) as exc:
                err = SinkError(f"the SQLite audit store {self.path} could not write: {exc}")
                self._discard_proc()
            for _batch, fut in work:
                loop.call_soon_threadsafe(_settle, fut, err)
        self._discard_proc(graceful=True)

    def _commit(self, work: list[tuple[Sequence[Sealed], Any]]) -> None:
        # The canonical JSON (already made for the hash) goes over the pipe; the child turns
        # it into a row on its own core.
        events: list[tuple[bytes, str]] = []
        ledger: list[tuple[Any, ...]] = []
        for batch, _fut in work:
            for s in batch:
                rec = s.record
                canon = s.canonical or orjson.dumps(
                    {k: v for k, v in rec.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS
                )
                events.append((canon, rec["hash"]))
                if s.ledger:
                    cid, seq = rec["chain_id"], rec["seq"]
                    for k, rel, p in s.ledger:
                        ledger.append((cid, seq, k, rel, len(p) // 16, p))
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        payload = pickle.dumps((events, ledger), protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.write(_HDR.pack(len(payload)))
        proc.stdin.write(payload)
        proc.stdin.flush()
        reply = self._reply(proc)
        if reply != b"ok":
            raise SinkError(reply.decode(errors="replace"))

    def _discard_proc(self, graceful: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        if not graceful:
            proc.kill()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

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
