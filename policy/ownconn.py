"""pgwarden's own connections to a database (catalog, need-to-know and role lookups), open
only while they are used.

A connection of pgwarden's held open to a database stops that database's owner from
dropping or renaming it ("database ... is being accessed by other users"), although no
client of pgwarden uses it any more.  So each one closes after a short idle time and is
opened again on demand.  PostgreSQL's ``DROP DATABASE`` and ``ALTER DATABASE ... RENAME``
wait up to five seconds for other sessions to leave, so an idle time below that never
makes them fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

DEFAULT_IDLE_TIMEOUT = 1.0


class IdleConnection:
    """One asyncpg connection, opened by ``connect`` when ``use()`` needs it and closed
    ``idle_timeout`` seconds after its last use.  Users take turns (asyncpg runs one
    operation at a time on a connection).  A use that fails closes the connection, so the
    next one starts on a fresh connection."""

    def __init__(
        self, connect: Callable[[], Awaitable[Any]], idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    ) -> None:
        self._connect = connect
        self.idle_timeout = idle_timeout
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Any]:
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self.is_open:
                self._conn = await self._connect()
            try:
                yield self._conn
            except BaseException:
                await self._close_now()
                raise
            self._timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._close_idle)

    def _close_idle(self) -> None:
        self._timer = None
        if self._lock.locked():  # in use again; that use sets a new timer
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            task = asyncio.get_running_loop().create_task(_close(conn))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_now(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)

    async def close(self) -> None:
        """Close for good (the process is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._close_now()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task


async def _close(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:
        conn.terminate()
