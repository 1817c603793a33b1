"""Exact sliding-window counters for one process.

Per (subject, label) a ``_Series`` holds two append-only logs in time order:

- rows: one entry per ``resolution`` slot, holding the *cumulative* rows up to that slot, so
  the rows of any window are ``total - cumulative(at the window's start)``: one bisection;
- records: one entry per (record, slot) in which the record was read. The entry a record's
  ``_rec_last`` points to is its *live* one (its last read); older entries are dead. Each
  window keeps a cursor at its first entry and a count of live entries after it, updated as
  the cursor moves and as records are read again, so a read costs O(windows), not O(records).

Entries older than the longest window are dropped lazily on each access to the series, and a
sweep over all series (every ``sweep_interval`` seconds of store time, or ``sweep()``)
removes subjects that stopped reading. Everything runs without ``await``, so each call is
atomic with respect to other tasks on the event loop.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from policy.state._common import (
    ZERO,
    WindowTotals,
    check_rows,
    check_until,
    check_windows,
    stamp_for,
)

# Physically dropping a log prefix moves the rest of the array; only do it when the dead
# prefix is large, so the cost is amortised to O(1) per entry.
_COMPACT_MIN = 4096

# Series visited per call by the periodic sweep: a full pass over 100,000 subjects at once
# would stall the event loop (and every connection of this worker) for a noticeable time.
_SWEEP_BATCH = 256


class _Cursor:
    __slots__ = ("count", "pos", "window")

    def __init__(self, window: float, pos: int, count: int) -> None:
        self.window = window
        self.pos = pos  # absolute index of the first record entry inside the window
        self.count = count  # live record entries at or after ``pos``


class _Series:
    __slots__ = (
        "cursors",
        "horizon",
        "last_now",
        "last_stamp",
        "last_write",
        "rec_keys",
        "rec_last",
        "rec_off",
        "rec_stamps",
        "rec_start",
        "row_base",
        "row_cum",
        "row_stamps",
        "row_start",
        "total_rows",
    )

    def __init__(self) -> None:
        self.cursors: dict[float, _Cursor] = {}
        self.horizon = 0.0  # longest window asked about: nothing older is kept
        self.last_now = float("-inf")
        self.last_write = float("-inf")  # store time of the last record()
        self.last_stamp = float("-inf")
        self.total_rows = 0
        self.row_stamps = array("d")
        self.row_cum = array("q")
        self.row_start = 0  # physical index of the first row entry still kept
        self.row_base = 0  # cumulative rows of the last entry dropped
        self.rec_stamps = array("d")
        self.rec_keys: list[str] = []
        self.rec_off = 0  # absolute index of physical element 0
        self.rec_start = 0  # absolute index of the first record entry still kept
        self.rec_last: dict[str, int] = {}  # record key -> absolute index of its live entry

    # -- time ----------------------------------------------------------------------------

    def clock(self, now: float) -> float:
        # Cursors only move forward; a caller whose clock stepped back is answered as of the
        # latest time this series has seen (the counts can only be higher, never lower).
        if now > self.last_now:
            self.last_now = now
        return self.last_now

    # -- windows -------------------------------------------------------------------------

    def ensure(self, window: float, t: float) -> _Cursor:
        cur = self.cursors.get(window)
        if cur is not None:
            return cur
        off = self.rec_off
        pos = bisect_right(self.rec_stamps, t - window, self.rec_start - off) + off
        keys, last = self.rec_keys, self.rec_last
        count = sum(1 for i in range(pos, off + len(keys)) if last.get(keys[i - off]) == i)
        cur = self.cursors[window] = _Cursor(window, pos, count)
        if window > self.horizon:
            self.horizon = window
        return cur

    def advance(self, t: float) -> None:
        stamps, keys, last, off = self.rec_stamps, self.rec_keys, self.rec_last, self.rec_off
        for cur in self.cursors.values():
            new = bisect_right(stamps, t - cur.window, cur.pos - off) + off
            if new > cur.pos:
                cur.count -= sum(1 for i in range(cur.pos, new) if last.get(keys[i - off]) == i)
                cur.pos = new
        self._trim(t)

    def _trim(self, t: float) -> None:
        if not self.cursors:
            return
        # The longest window's cursor marks what no window can see any more.
        end = self.cursors[self.horizon].pos
        keys, last, off = self.rec_keys, self.rec_last, self.rec_off
        for i in range(self.rec_start, end):
            key = keys[i - off]
            if last.get(key) == i:
                del last[key]
        self.rec_start = end
        dead = end - off
        if dead >= _COMPACT_MIN and dead * 2 >= len(keys):
            del keys[:dead]
            del self.rec_stamps[:dead]
            self.rec_off = end

        start = bisect_right(self.row_stamps, t - self.horizon, self.row_start)
        if start > self.row_start:
            self.row_base = self.row_cum[start - 1]
            self.row_start = start
        if start >= _COMPACT_MIN and start * 2 >= len(self.row_stamps):
            del self.row_stamps[:start]
            del self.row_cum[:start]
            self.row_start = 0

    def window_totals(self, cur: _Cursor, t: float) -> WindowTotals:
        i = bisect_right(self.row_stamps, t - cur.window, self.row_start)
        before = self.row_cum[i - 1] if i > self.row_start else self.row_base
        return WindowTotals(self.total_rows - before, cur.count)

    # -- adding --------------------------------------------------------------------------

    def add(self, rows: int, records: Collection[str], stamp: float) -> None:
        # Stamps never go backwards, so the logs stay sorted for bisection.
        if stamp < self.last_stamp:
            stamp = self.last_stamp
        self.last_stamp = stamp
        if rows:
            self.total_rows += rows
            if len(self.row_stamps) > self.row_start and self.row_stamps[-1] == stamp:
                self.row_cum[-1] = self.total_rows
            else:
                self.row_stamps.append(stamp)
                self.row_cum.append(self.total_rows)
        if not records:
            return
        stamps, keys, last = self.rec_stamps, self.rec_keys, self.rec_last
        off = self.rec_off
        pos = first = off + len(keys)
        fresh = 0  # records never seen in the longest window
        back: list[int] = []  # previous live entries of records read again
        get, append = last.get, keys.append
        for key in records:
            i = get(key)
            if i is None:
                fresh += 1
            elif i >= first or stamps[i - off] == stamp:
                continue  # already read in this slot (or earlier in this call)
            else:
                back.append(i)
            last[key] = pos
            pos += 1
            append(key)
        stamps.extend(array("d", (stamp,)) * (pos - first))
        for cur in self.cursors.values():
            # A record read again re-enters a window its last read had already left.
            cur.count += fresh + sum(1 for i in back if i < cur.pos)

    def idle(self, now: float) -> bool:
        # Kept until the horizon has passed since the last write even when nothing is left
        # to count, as a Redis key's TTL would: forgetting the horizon early would let a
        # caller passing only a short window trim what a longer rule still needs.
        return (
            not self.rec_last
            and self.row_start >= len(self.row_stamps)
            and now >= self.last_write + self.horizon
        )


class _Blocks:
    __slots__ = ("horizon", "stamps")

    def __init__(self) -> None:
        self.horizon = 0.0
        self.stamps: deque[float] = deque()


@dataclass(frozen=True, slots=True)
class MemoryStats:
    """How much a ``MemoryWindowStore`` holds (entries, not bytes)."""

    series: int  # (subject, label) pairs
    row_entries: int
    record_entries: int  # including dead entries not yet compacted away
    live_records: int
    block_subjects: int
    quarantined: int


class MemoryWindowStore:
    """Exact sliding windows for one process (see the module docstring for the layout).

    ``resolution``: seconds; event times are rounded up to a multiple of it (0 keeps them
    exact). Counts are never too low; an event may stay counted up to ``resolution`` seconds
    past its window. ``sweep_interval``: seconds of store time between sweeps of all series;
    a sweep visits a few hundred series per call, so it never stalls the event loop.

    Memory: a distinct record costs about 145 bytes (16-character keys) while it is inside
    the longest window (``loadtests/bench_state.py`` measures it); a subject reading one
    million distinct records in a day holds about 140 MiB until they slide out.
    """

    def __init__(self, *, resolution: float = 1.0, sweep_interval: float = 60.0) -> None:
        if resolution < 0:
            raise ValueError("resolution must be >= 0")
        self.resolution = resolution
        self.sweep_interval = sweep_interval
        self._series: dict[tuple[str, str], _Series] = {}
        self._blocks: dict[str, _Blocks] = {}
        self._quarantine: dict[str, float] = {}
        self._next_sweep: float | None = None
        self._sweep_todo: list[tuple[str, str]] = []  # series the current sweep has yet to visit

    async def record(
        self,
        subject: str,
        label: str,
        rows: int,
        records: Collection[str],
        windows: Collection[float],
        now: float | None = None,
    ) -> dict[float, WindowTotals]:
        """Add ``rows`` and ``records``; return the totals after adding, per window."""
        check_rows(rows)
        wins = check_windows(windows)
        if not wins:
            raise ValueError("record() needs at least one window: it decides how long data is kept")
        if now is None:
            now = time.time()
        self._maybe_sweep(now)
        series = self._series.get((subject, label))
        if series is None:
            series = self._series[(subject, label)] = _Series()
        t = series.clock(now)
        series.last_write = t
        curs = [series.ensure(w, t) for w in wins]
        series.advance(t)
        # Stamped at the series' clock, so an entry is never born outside a window it is
        # counted in, even when the caller's clock stepped back.
        series.add(rows, records, stamp_for(t, self.resolution))
        return {w: series.window_totals(c, t) for w, c in zip(wins, curs, strict=True)}

    async def totals(
        self,
        subject: str,
        label: str,
        windows: Collection[float],
        now: float | None = None,
    ) -> dict[float, WindowTotals]:
        """The totals per window, without adding anything."""
        wins = check_windows(windows)
        return {w: self._exact(subject, label, w, now) for w in wins}

    def cached_totals(
        self, subject: str, label: str, window: float, now: float | None = None
    ) -> WindowTotals:
        """Exact totals at ``now`` (this store is the source of truth), computed synchronously."""
        check_windows((window,))
        return self._exact(subject, label, window, now)

    def _exact(self, subject: str, label: str, window: float, now: float | None) -> WindowTotals:
        series = self._series.get((subject, label))
        if series is None:
            return ZERO
        t = series.clock(time.time() if now is None else now)
        cur = series.ensure(window, t)
        series.advance(t)
        return series.window_totals(cur, t)

    async def note_block(self, subject: str, window: float, now: float | None = None) -> int:
        """Count one block for ``subject``; return the blocks within ``window`` after it."""
        check_windows((window,))
        if now is None:
            now = time.time()
        self._maybe_sweep(now)
        blocks = self._blocks.get(subject)
        if blocks is None:
            blocks = self._blocks[subject] = _Blocks()
        blocks.horizon = max(blocks.horizon, window)
        stamps = blocks.stamps
        stamps.append(max(now, stamps[-1]) if stamps else now)
        while stamps and stamps[0] <= now - blocks.horizon:
            stamps.popleft()
        return len(stamps) - bisect_right(stamps, now - window)

    async def quarantine(self, subject: str, until: float, now: float | None = None) -> None:
        """Quarantine ``subject`` until ``until`` (keeps a later end already set)."""
        check_until(until)
        if until > self._quarantine.get(subject, float("-inf")):
            self._quarantine[subject] = until

    async def quarantined_until(self, subject: str, now: float | None = None) -> float | None:
        """The end of the quarantine in force at ``now``, or ``None``."""
        until = self._quarantine.get(subject)
        if until is None:
            return None
        if until > (time.time() if now is None else now):
            return until
        return None

    def sweep(self, now: float | None = None) -> None:
        """Drop what every window has left behind, for all subjects, now."""
        if now is None:
            now = time.time()
        self._start_sweep(now)
        self._sweep_some(now, len(self._sweep_todo))

    def _maybe_sweep(self, now: float) -> None:
        if self._sweep_todo:
            self._sweep_some(now, _SWEEP_BATCH)
        elif self._next_sweep is None:
            self._next_sweep = now + self.sweep_interval
        elif now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            self._start_sweep(now)
            self._sweep_some(now, _SWEEP_BATCH)

    def _start_sweep(self, now: float) -> None:
        # Blocks and quarantines are few (one per misbehaving subject): swept in one go.
        for subject, blocks in list(self._blocks.items()):
            while blocks.stamps and blocks.stamps[0] <= now - blocks.horizon:
                blocks.stamps.popleft()
            if not blocks.stamps:
                del self._blocks[subject]
        for subject, until in list(self._quarantine.items()):
            if until <= now:
                del self._quarantine[subject]
        self._sweep_todo = list(self._series)

    def _sweep_some(self, now: float, n: int) -> None:
        todo = self._sweep_todo
        for _ in range(min(n, len(todo))):
            key = todo.pop()
            series = self._series.get(key)
            if series is None:
                continue
            series.advance(series.clock(now))
            if series.idle(now):
                del self._series[key]

    def stats(self) -> MemoryStats:
        """Entry counts, for tests, benchmarks and metrics."""
        return MemoryStats(
            series=len(self._series),
            row_entries=sum(len(s.row_stamps) - s.row_start for s in self._series.values()),
            record_entries=sum(
                s.rec_off + len(s.rec_keys) - s.rec_start for s in self._series.values()
            ),
            live_records=sum(len(s.rec_last) for s in self._series.values()),
            block_subjects=len(self._blocks),
            quarantined=len(self._quarantine),
        )

    async def close(self) -> None:
        """Forget everything."""
        self._series.clear()
        self._sweep_todo.clear()
        self._blocks.clear()
        self._quarantine.clear()
