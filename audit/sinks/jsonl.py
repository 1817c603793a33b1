"""JSON lines sink, for log shippers (Filebeat, Vector, Fluent Bit).

One event per line, the same fields as the ``events`` table, keys sorted.  The file is rotated
by size: ``audit.jsonl`` -> ``audit.jsonl.1`` -> ... up to ``backups`` old files, the way
shippers expect (they follow the name, not the inode).  With ``fsync`` on, a batch is flushed
to disk before ``write`` returns and the sink counts as durable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from audit.events import Record
from audit.sinks import Sealed, SinkError


def rotated_files(path: Path) -> list[Path]:
    """The live file and its rotated predecessors, oldest first."""
    older = []
    i = 1
    while Path(f"{path}.{i}").exists():
        older.append(Path(f"{path}.{i}"))
        i += 1
    files = list(reversed(older))
    if path.exists():
        files.append(path)
    return files


def read_jsonl(path: Path) -> Iterator[Record]:
    """Every event in a JSON lines trail (rotated files included), in file order."""
    for f in rotated_files(Path(path)):
        with open(f, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield orjson.loads(line)


class JsonlSink:
    """Appends events to a size-rotated JSON lines file."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = 100 * 1024 * 1024,
        backups: int = 10,
        fsync: bool = False,
        include_ledger: bool = False,
        name: str = "jsonl",
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self.durable = fsync
        self.include_ledger = include_ledger
        self.name = name
        self._fh: IO[bytes] | None = None
        self._size = 0
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._open)
        except OSError as exc:
            raise SinkError(
                f"the JSON lines audit file {self.path} cannot be opened: {exc}"
            ) from exc

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")  # noqa: SIM115 - held open for the sink's lifetime
        self._size = self._fh.tell()

    async def head(self, chain_id: str) -> tuple[int, str] | None:
        def scan() -> tuple[int, str] | None:
            last: tuple[int, str] | None = None
            for rec in read_jsonl(self.path):
                if rec.get("chain_id") == chain_id:
                    last = (int(rec["seq"]), str(rec["hash"]))
            return last

        return await asyncio.to_thread(scan)

    async def write(self, batch: Sequence[Sealed]) -> None:
        lines = []
        for s in batch:
            rec: dict[str, Any] = s.record
            if self.include_ledger and s.ledger:
                rec = {
                    **rec,
                    "ledger": [[k, r, p.hex()] for k, r, p in s.ledger],
                }
            lines.append(orjson.dumps(rec, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE))
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, lines)
            except OSError as exc:
                raise SinkError(
                    f"the JSON lines audit file {self.path} could not be written: {exc}"
                ) from exc

    def _write(self, lines: list[bytes]) -> None:
        if self._fh is None:
            raise OSError("the file is not open")
        chunk: list[bytes] = []
        for line in lines:
            # Rotate between lines, so no file grows past max_bytes (unless one line does).
            if self._size and self._size + len(line) > self.max_bytes:
                self._flush(chunk)
                chunk = []
                self._rotate()
            chunk.append(line)
            self._size += len(line)
        self._flush(chunk)

    def _flush(self, chunk: list[bytes]) -> None:
        assert self._fh is not None
        if chunk:
            self._fh.write(b"".join(chunk))
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def _rotate(self) -> None:
        assert self._fh is not None
        self._fh.close()
        for i in range(self.backups - 1, 0, -1):
            src = Path(f"{self.path}.{i}")
            if src.exists():
                src.replace(Path(f"{self.path}.{i + 1}"))
        if self.backups > 0:
            self.path.replace(Path(f"{self.path}.1"))
        else:
            self.path.unlink()
        self._open()

    async def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            await asyncio.to_thread(fh.close)
