"""Budget held by statements still running, so that statements judged at the same time do
not all see the whole of a window left.

A window's counters learn what a statement read when it has finished.  Twenty-four
connections of one person, each sending a statement at the same moment, were each judged
on the budget as it stood before any of them: each was allowed what was left of the hourly
budget, and together they read 375 customers against a budget of 200.  So a statement
allowed to read labelled rows under a window holds, from its judgement until its usage is in
the counters, as many records as it may read; the judgement of every other statement counts
that hold as spent.  The hold is released when the statement's usage has been recorded (it
is then counted as what it really read) or when the statement ends without rows.

The holds live in the process.  Workers of one ``serve --workers N`` that share a Redis
store each see their own holds only: statements judged at the same instant in two workers
can still each be allowed what is left (at most one statement's cap per worker).
"""

from __future__ import annotations

from collections.abc import Iterable

# (budget key, counter label, window seconds)
Slot = tuple[str, str, float]


class InFlight:
    """Records held by running statements, per window counter."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[Slot, int] = {}

    def held(self, key: str, label: str, window: float) -> int:
        return self._held.get((key, label, window), 0)

    def hold(self, items: Iterable[tuple[Slot, int]]) -> Hold:
        hold = Hold(self)
        for slot, n in items:
            if n > 0:
                self._held[slot] = self._held.get(slot, 0) + n
                hold.items[slot] = hold.items.get(slot, 0) + n
        return hold

    def _give_back(self, slot: Slot, n: int) -> None:
        left = self._held.get(slot, 0) - n
        if left > 0:
            self._held[slot] = left
        else:
            self._held.pop(slot, None)

    def __len__(self) -> int:
        return len(self._held)


class Hold:
    """One statement's hold.  Every part is given back once: ``release`` is idempotent."""

    __slots__ = ("_owner", "items")

    def __init__(self, owner: InFlight) -> None:
        self._owner = owner
        self.items: dict[Slot, int] = {}

    def __bool__(self) -> bool:
        return bool(self.items)

    def take(self, slot: Slot) -> Hold | None:
        """The part of this hold on one counter, as a hold of its own (given back after the
        statement's usage on that counter is recorded), or None."""
        n = self.items.pop(slot, 0)
        if not n:
            return None
        part = Hold(self._owner)
        part.items[slot] = n
        return part

    def release(self) -> None:
        for slot, n in self.items.items():
            self._owner._give_back(slot, n)
        self.items.clear()

    # A statement dropped on a path that forgot its hold (a session that ended mid-statement,
    # entries skipped after an error) gives it back when it is collected: a hold never
    # outlives its statement, or the person's budget would shrink for the life of the process.
    __del__ = release
