"""Values and checks shared by the window-store implementations."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowTotals:
    """What one subject received for one label within one window."""

    rows: int
    records: int  # distinct record keys


ZERO = WindowTotals(0, 0)


class StoreUnavailable(RuntimeError):
    """The shared window-counter store cannot be reached or refused the update.

    The engine treats this as "limits unknown" and fails closed for subjects with limits.
    """


def stamp_for(now: float, resolution: float) -> float:
    """``now`` rounded up to a multiple of ``resolution``: never earlier than ``now``, so a
    rounded event leaves its window late (counts too high), never early."""
    if resolution <= 0:
        return now
    stamp = math.ceil(now / resolution) * resolution
    # Floating-point division can land a hair below ``now``; rounding must never go down.
    return stamp if stamp >= now else now


def check_windows(windows: Collection[float]) -> list[float]:
    """The window lengths as a list, refusing lengths a window cannot have."""
    out = list(windows)
    for w in out:
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"window lengths must be positive seconds, got {w!r}")
    return out


def check_rows(rows: int) -> None:
    """Refuse negative row counts: they would let a caller erase what a subject has read."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows!r}")


def check_until(until: float) -> None:
    """Refuse a quarantine end that is not a finite time (``inf`` cannot become a TTL)."""
    if not math.isfinite(until):
        raise ValueError(f"quarantine end must be a finite time, got {until!r}")
