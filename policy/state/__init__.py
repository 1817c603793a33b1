"""Counters for sliding time windows and quarantine, per subject and label.

The policy engine asks two kinds of question about a *subject key* (``end_user:alice``,
``user:support_app``, or ``db_user:support_app`` for all end users of a shared account
together) and a *label* (``pii.email``, or ``rule:<id>`` for everything a rule covers):

- how many labelled **rows** did this subject receive in the last hour / day;
- how many **distinct records** (primary keys, passed as keyed hashes, never raw values) did it
  receive in that window. Reading the same customer twice counts once, so paging with
  ``OFFSET`` or trickling a few rows an hour for weeks still adds up.

(``end_user_churn`` rules count distinct end-user names the same way, as records under
``conn:<id>`` or ``db_user:<name>`` with the label ``end_users:<rule id>``)
and keeps two facts about the subject alone: how many statements were **blocked** in a window
(the quarantine rule counts them) and whether it is **quarantined**, and until when.

``WindowStore`` is the seam (as psycopg's ``pq/abc.py``): ``MemoryWindowStore`` answers exactly
for one process; ``RedisWindowStore`` shares exact counts between worker processes and hosts.

Precision, both stores: an event is counted in a window of length ``w`` at time ``now`` when
its stamp ``s`` satisfies ``now - w < s``. Stamps are the event time rounded *up* to a multiple
of ``resolution`` (default 1 s; ``0`` keeps the raw time), so counts are never too low and an
event stays counted at most ``resolution`` seconds longer than it would with exact times. The
rounding is what keeps storage bounded: per (subject, label) there is at most one rows entry
per ``resolution`` slot, and re-reading a record inside one slot adds nothing.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, runtime_checkable

from policy.state._common import StoreUnavailable, WindowTotals
from policy.state.memory import MemoryWindowStore
from policy.state.redis_store import RedisWindowStore

__all__ = [
    "MemoryWindowStore",
    "RedisWindowStore",
    "StoreUnavailable",
    "WindowStore",
    "WindowTotals",
    "open_window_store",
]


@runtime_checkable
class WindowStore(Protocol):
    """Sliding-window counters and quarantine for subjects; one implementation per backend.

    ``now`` is seconds since the epoch; ``None`` means the store's clock (``time.time()`` for
    memory, the Redis server's ``TIME`` for Redis, so that every host shares one clock).
    Window lengths are seconds (> 0). A store keeps the data of a (subject, label) for the
    longest window passed to ``record``/``totals`` for that pair (until the pair has been
    idle for that long). So pass, on every ``record`` call, every window length any rule may
    ask about for that label: a longer window asked for later sees only what was kept.
    """

    async def record(
        self,
        subject: str,
        label: str,
        rows: int,
        records: Collection[str],
        windows: Collection[float],
        now: float | None = None,
    ) -> dict[float, WindowTotals]:
        """Add ``rows`` and the distinct ``records`` atomically; return the totals after adding,
        for each window length in ``windows``."""
        ...

    async def totals(
        self,
        subject: str,
        label: str,
        windows: Collection[float],
        now: float | None = None,
    ) -> dict[float, WindowTotals]:
        """The totals for each window length, without adding anything."""
        ...

    async def note_block(self, subject: str, window: float, now: float | None = None) -> int:
        """Count one blocked statement; return the blocks within ``window`` including this one."""
        ...

    async def quarantine(self, subject: str, until: float, now: float | None = None) -> None:
        """Quarantine ``subject`` until ``until``; never shortens an existing quarantine."""
        ...

    async def quarantined_until(self, subject: str, now: float | None = None) -> float | None:
        """The end of the subject's quarantine if it is quarantined at ``now``, else ``None``."""
        ...

    def cached_totals(self, subject: str, label: str, window: float) -> WindowTotals | None:
        """Cheap, synchronous totals for the hot path (see each implementation for freshness)."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


def open_window_store(url: str | None, *, prefix: str = "pgwarden:") -> WindowStore:
    """The store named by a config value: ``None``/``""``/``memory://`` or ``redis://...``
    (also ``rediss://`` and ``unix://``)."""
    if not url or url.startswith("memory:"):
        return MemoryWindowStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisWindowStore(url, prefix=prefix)
    raise ValueError(f"unknown window-store URL {url!r}: use memory:// or redis://host:port/db")
