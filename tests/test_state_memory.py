"""What only the in-process store must do: stay bounded as windows pass, cope with a subject
reading a million distinct records, and keep its logs compact."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from policy.state import MemoryWindowStore, WindowTotals
from policy.state.memory import _COMPACT_MIN

S, L = "end_user:alice", "pii.email"
H, D = 3600.0, 86400.0


def test_memory_is_released_after_every_window_has_passed() -> None:
    async def body() -> None:
        st = MemoryWindowStore(resolution=0, sweep_interval=60)
        for u in range(300):
            await st.record(f"end_user:{u}", L, 2, [f"{u}-{i}" for i in range(20)], [60, H], now=0)
            await st.note_block(f"end_user:{u}", 600, now=0)
            await st.quarantine(f"end_user:{u}", 100)
        stats = st.stats()
        assert (stats.series, stats.live_records, stats.block_subjects) == (300, 6000, 300)
        # Calls after the longest window run the periodic sweep, a few hundred series a call.
        for i in range(3):
            await st.record("end_user:new", L, 1, ["x"], [60], now=H + 1 + i / 10)
        stats = st.stats()
        assert stats.series == 1
        assert stats.live_records == 1
        assert stats.row_entries == 3  # one per call of end_user:new
        assert stats.block_subjects == 0
        assert stats.quarantined == 0
        # sweep() does it all at once.
        await st.record("end_user:z", L, 1, ["x"], [60], now=2 * H)
        st.sweep(now=3 * H)
        assert st.stats().series == 0

    asyncio.run(body())


def test_one_subject_reading_for_days_keeps_only_its_window() -> None:
    """Steady reads for three days against a one-hour window: the logs stay near one
    window's worth (plus the compaction slack), not three days' worth."""

    async def body() -> None:
        st = MemoryWindowStore(resolution=1)
        per_hour = 3600 // 10
        for k in range(3 * 24 * per_hour):
            now = k * 10.0
            got = await st.record(S, L, 1, [f"c{k}", "regular"], [H], now=now)
            assert got[H] == WindowTotals(min(k + 1, per_hour), min(k + 1, per_hour) + 1)
        stats = st.stats()
        assert stats.row_entries <= per_hour + 1
        assert stats.live_records <= per_hour + 2
        series = st._series[(S, L)]
        assert len(series.rec_keys) <= 2 * (2 * per_hour + 2) + _COMPACT_MIN * 2

    asyncio.run(body())


def test_rereads_within_one_slot_add_no_entries() -> None:
    async def body() -> None:
        st = MemoryWindowStore(resolution=1)
        for i in range(1000):
            await st.record(S, L, 1, ["c1", "c2"], [H], now=100.5 + i / 10_000)
        assert st.stats().row_entries == 1
        assert st.stats().record_entries == 2
        assert (await st.totals(S, L, [H], now=101))[H] == WindowTotals(1000, 2)

    asyncio.run(body())


@pytest.mark.slow
def test_a_million_distinct_records_in_one_window() -> None:
    async def body() -> None:
        st = MemoryWindowStore()
        keys = [f"{i:016x}" for i in range(1_000_000)]
        for n, start in enumerate(range(0, len(keys), 10_000)):
            got = await st.record(S, L, 10_000, keys[start : start + 10_000], [H, D], now=n)
        assert got == {H: WindowTotals(1_000_000, 1_000_000), D: WindowTotals(1_000_000, 1_000_000)}
        # Reading them all again counts no new records.
        got = await st.record(S, L, 5, keys[:5], [H, D], now=200)
        assert got[D] == WindowTotals(1_000_005, 1_000_000)
        assert (await st.totals(S, L, [H, D], now=H + 150))[H] == WindowTotals(5, 5)

    asyncio.run(body())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=hs.lists(
        hs.tuples(
            hs.sampled_from([0.0, 0.25, 1.0, 4.0, 9.0, 30.0]),  # time gap
            hs.integers(0, 5),  # rows
            hs.lists(hs.integers(0, 12), max_size=6),  # record keys
            hs.sets(hs.sampled_from([5.0, 20.0, 50.0]), min_size=1),  # windows asked
        ),
        max_size=60,
    ),
    resolution=hs.sampled_from([0.0, 0.5, 2.0]),
)
def test_memory_store_matches_the_model_even_while_compacting(
    steps: list[tuple[float, int, list[int], set[float]]], resolution: float
) -> None:
    """Hypothesis drives random reads; the log compaction threshold is lowered so every
    path that renumbers entries runs constantly."""
    import policy.state.memory as memory

    saved = memory._COMPACT_MIN
    memory._COMPACT_MIN = 1
    try:

        async def body() -> None:
            store = MemoryWindowStore(resolution=resolution, sweep_interval=15)
            events: list[tuple[float, int, set[str]]] = []
            now = 100.0
            # The longest window first, so nothing a later question needs is dropped.
            await store.record(S, L, 0, [], [50.0], now=now)
            for gap, rows, keys, windows in steps:
                now += gap
                recs = {f"k{k}" for k in keys}
                events.append((now, rows, recs))
                got = await store.record(S, L, rows, [f"k{k}" for k in keys], windows, now=now)
                for w in windows:
                    exact = [e for e in events if e[0] > now - w]
                    late = [e for e in events if e[0] > now - w - resolution]
                    lo = WindowTotals(
                        sum(e[1] for e in exact), len(set().union(*(e[2] for e in exact)))
                    )
                    hi = WindowTotals(
                        sum(e[1] for e in late), len(set().union(*(e[2] for e in late)))
                    )
                    assert lo.rows <= got[w].rows <= hi.rows
                    assert lo.records <= got[w].records <= hi.records
                    if resolution == 0:
                        assert got[w] == lo

        asyncio.run(body())
    finally:
        memory._COMPACT_MIN = saved
