"""Behaviour shared by every window store: the same tests run on memory and on Redis.

Time is injected (``now=``) so windows slide deterministically; resolution 0 keeps stamps
exact unless a test is about rounding.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from policy.state import (
    MemoryWindowStore,
    RedisWindowStore,
    WindowStore,
    WindowTotals,
    open_window_store,
)

S, L = "end_user:alice", "pii.email"
H, D = 3600.0, 86400.0

StoreFactory = Callable[..., WindowStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    if request.param == "memory":
        return lambda **kw: MemoryWindowStore(**kw)
    server = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex[:10]}:"  # tests share one Redis; keys must not
    return lambda **kw: RedisWindowStore(server.url, prefix=prefix, **kw)


def run(store: WindowStore, body: Callable[[WindowStore], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(go())


def T(rows: int, records: int) -> WindowTotals:
    return WindowTotals(rows, records)


def test_store_classes_satisfy_the_protocol() -> None:
    assert isinstance(MemoryWindowStore(), WindowStore)
    assert isinstance(RedisWindowStore("redis://127.0.0.1:1/0"), WindowStore)
    assert isinstance(open_window_store(None), MemoryWindowStore)
    assert isinstance(open_window_store("redis://127.0.0.1:1/0"), RedisWindowStore)
    with pytest.raises(ValueError, match="unknown window-store URL"):
        open_window_store("mysql://x")


def test_rows_and_records_slide_off_the_edge(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        assert await st.record(S, L, 5, ["a", "b"], [60, H], now=1000) == {
            60: T(5, 2),
            H: T(5, 2),
        }
        assert await st.record(S, L, 3, ["b", "c"], [60, H], now=1030) == {
            60: T(8, 3),
            H: T(8, 3),
        }
        # Just inside: the first read (t=1000) is still in a 60 s window at t=1059.999.
        assert await st.totals(S, L, [60, H], now=1059.999) == {60: T(8, 3), H: T(8, 3)}
        # On the edge: now - w == stamp is outside. "b" was read again at 1030, so it stays.
        assert await st.totals(S, L, [60, H], now=1060) == {60: T(3, 2), H: T(8, 3)}
        assert await st.totals(S, L, [60, H], now=1090) == {60: T(0, 0), H: T(8, 3)}
        assert await st.totals(S, L, [60, H], now=1000 + H) == {60: T(0, 0), H: T(3, 2)}
        assert await st.totals(S, L, [60, H], now=1030 + H) == {60: T(0, 0), H: T(0, 0)}
        # After everything left, new reads start from zero.
        assert await st.record(S, L, 1, ["a"], [60, H], now=1040 + H) == {
            60: T(1, 1),
            H: T(1, 1),
        }

    run(make_store(resolution=0), body)


def test_same_record_counts_once_and_rereads_refresh_it(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        await st.record(S, L, 1, ["cust-1"], [60], now=0)
        assert await st.record(S, L, 2, ["cust-1", "cust-1"], [60], now=50) == {60: T(3, 1)}
        # The read at 50 keeps cust-1 in the window after the read at 0 slid out.
        assert await st.totals(S, L, [60], now=100) == {60: T(2, 1)}
        assert await st.totals(S, L, [60], now=110) == {60: T(0, 0)}

    run(make_store(resolution=0), body)


def test_offset_paging_and_trickling_accumulate(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        # SELECT ... LIMIT 100 OFFSET n*100, ten pages a minute apart: 1000 distinct customers.
        for page in range(10):
            got = await st.record(
                S, L, 100, [f"c{page * 100 + i}" for i in range(100)], [H, D], now=page * 60.0
            )
        assert got == {H: T(1000, 1000), D: T(1000, 1000)}
        # Trickling: 5 customers an hour for a day stays under any hourly limit...
        for hour in range(24):
            got = await st.record(
                "end_user:bob", L, 5, [f"t{hour * 5 + i}" for i in range(5)], [H, D], now=hour * H
            )
            assert got[H] == T(5, 5)
        # ... and still adds up over the day.
        assert got[D] == T(120, 120)

    run(make_store(resolution=0), body)


def test_subjects_and_labels_are_separate(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        await st.record("a|b", "c", 1, ["x"], [H], now=10)
        await st.record("a", "b|c", 2, ["x", "y"], [H], now=10)
        await st.record("a", "pii.phone", 4, ["x"], [H], now=10)
        assert await st.totals("a|b", "c", [H], now=11) == {H: T(1, 1)}
        assert await st.totals("a", "b|c", [H], now=11) == {H: T(2, 2)}
        assert await st.totals("a", "pii.phone", [H], now=11) == {H: T(4, 1)}
        assert await st.totals("nobody", "c", [H], now=11) == {H: T(0, 0)}

    run(make_store(resolution=0), body)


def test_a_longer_window_asked_by_another_caller_keeps_its_data(
    make_store: StoreFactory,
) -> None:
    async def body(st: WindowStore) -> None:
        await st.record(S, L, 7, ["a"], [60], now=0)
        await st.record(S, L, 1, ["b"], [H], now=1)  # another worker's rule uses one hour
        # A caller that only cares about 60 s must not trim what the hourly rule needs.
        assert await st.record(S, L, 1, ["c"], [60], now=600) == {60: T(1, 1)}
        assert await st.totals(S, L, [H], now=601) == {H: T(9, 3)}

    run(make_store(resolution=0), body)


def test_a_clock_stepping_back_never_lowers_counts(make_store: StoreFactory) -> None:
    """A worker whose clock is behind (or stepped back by NTP) stamps no earlier than the
    latest stamp already stored, so its reads never leave a window before earlier ones."""

    async def body(st: WindowStore) -> None:
        await st.record(S, L, 1, ["a"], [60], now=1000)
        await st.record(S, L, 1, ["b"], [60], now=990)
        assert (await st.totals(S, L, [60], now=1059))[60] == T(2, 2)
        assert (await st.totals(S, L, [60], now=1060))[60] == T(0, 0)

    run(make_store(resolution=0), body)


def test_records_only_and_rows_only(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        assert await st.record(S, L, 0, ["a", "b"], [H], now=5) == {H: T(0, 2)}
        assert await st.record(S, L, 9, [], [H], now=6) == {H: T(9, 2)}
        assert await st.record(S, L, 0, (), [H], now=7) == {H: T(9, 2)}
        assert await st.totals(S, L, [], now=8) == {}

    run(make_store(resolution=0), body)


def test_resolution_rounds_up_never_down(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        # Both reads land in the slot ending at 110 and are stamped 110.
        await st.record(S, L, 1, ["a"], [60], now=101)
        await st.record(S, L, 1, ["b"], [60], now=109)
        # Exact times would drop the read at 101 at t=161; rounded, it stays until 170.
        assert await st.totals(S, L, [60], now=165) == {60: T(2, 2)}
        assert await st.totals(S, L, [60], now=169.9) == {60: T(2, 2)}
        assert await st.totals(S, L, [60], now=170) == {60: T(0, 0)}

    run(make_store(resolution=10), body)


def test_bad_arguments_are_refused(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        with pytest.raises(ValueError, match="rows"):
            await st.record(S, L, -1, [], [H], now=0)
        with pytest.raises(ValueError, match="positive"):
            await st.record(S, L, 1, [], [0], now=0)
        with pytest.raises(ValueError, match="at least one window"):
            await st.record(S, L, 1, [], [], now=0)
        with pytest.raises(ValueError, match="positive"):
            await st.note_block(S, -5, now=0)
        with pytest.raises(ValueError, match="finite"):
            await st.quarantine(S, float("inf"), now=0)

    run(make_store(), body)


def test_blocks_count_within_their_window(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        assert await st.note_block(S, 600, now=1000) == 1
        assert await st.note_block(S, 600, now=1100) == 2
        assert await st.note_block("end_user:bob", 600, now=1100) == 1
        assert await st.note_block(S, 600, now=1599) == 3
        assert await st.note_block(S, 600, now=1650) == 3  # the one at 1000 slid out
        assert await st.note_block(S, 60, now=1700) == 2  # a shorter rule, same history

    run(make_store(), body)


def test_quarantine_sets_extends_and_expires(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        assert await st.quarantined_until(S, now=1000) is None
        await st.quarantine(S, 2000, now=1000)
        assert await st.quarantined_until(S, now=1000) == 2000
        assert await st.quarantined_until("end_user:bob", now=1000) is None
        await st.quarantine(S, 1500, now=1001)  # a shorter one does not cut it short
        assert await st.quarantined_until(S, now=1600) == 2000
        await st.quarantine(S, 3000, now=1700)
        assert await st.quarantined_until(S, now=2500) == 3000
        assert await st.quarantined_until(S, now=3000) is None

    run(make_store(), body)


def test_quarantine_on_the_store_clock(make_store: StoreFactory) -> None:
    import time

    async def body(st: WindowStore) -> None:
        await st.quarantine(S, time.time() + 300)
        until = await st.quarantined_until(S)
        assert until is not None and until > time.time()
        await st.quarantine("end_user:bob", time.time() - 1)  # already over
        assert await st.quarantined_until("end_user:bob") is None

    run(make_store(), body)


def test_store_clock_counts_when_now_is_not_given(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        await st.record(S, L, 2, ["a"], [H, D])
        assert await st.record(S, L, 3, ["a", "b"], [H, D]) == {H: T(5, 2), D: T(5, 2)}
        assert await st.totals(S, L, [H]) == {H: T(5, 2)}

    run(make_store(), body)


def test_cached_totals_follow_record_and_totals(make_store: StoreFactory) -> None:
    async def body(st: WindowStore) -> None:
        if isinstance(st, RedisWindowStore):
            assert st.cached_totals(S, L, H) is None  # never seen by this process
        await st.record(S, L, 4, ["a", "b"], [60, H], now=1000)
        if isinstance(st, MemoryWindowStore):
            assert st.cached_totals(S, L, 60, now=1001) == T(4, 2)
            assert st.cached_totals(S, L, 60, now=1060) == T(0, 0)  # exact at any time
        else:
            assert st.cached_totals(S, L, 60) == T(4, 2)
            await st.totals(S, L, [60], now=1060)
            assert st.cached_totals(S, L, 60) == T(0, 0)
            assert st.cached_totals(S, L, H) == T(4, 2)

    run(make_store(resolution=0), body)


def _model_totals(
    events: list[tuple[float, int, list[str]]], window: float, now: float
) -> WindowTotals:
    inside = [e for e in events if e[0] > now - window]
    return WindowTotals(sum(e[1] for e in inside), len({k for e in inside for k in e[2]}))


@pytest.mark.parametrize("resolution", [0, 7])
def test_random_operations_match_a_brute_force_model(
    make_store: StoreFactory, resolution: float
) -> None:
    """Random reads with random gaps, checked after each step against re-counting the history.
    With rounding, counts must lie between the exact ones and those with times moved up by
    one resolution step."""
    rng = random.Random(20261129)
    windows = [10.0, 45.0, 200.0]
    subjects = ["end_user:a", "end_user:b"]

    async def body(st: WindowStore) -> None:
        history: dict[str, list[tuple[float, int, list[str]]]] = {s: [] for s in subjects}
        now = 1000.0
        for step in range(150):
            now += rng.choice([0, 0.5, 1, 3, 11, 40, 120])
            subject = rng.choice(subjects)
            keys = [f"k{rng.randrange(60)}" for _ in range(rng.randrange(6))]
            rows = rng.randrange(4)
            history[subject].append((now, rows, keys))
            if step % 3 == 0:
                got = await st.totals(subject, L, windows, now=now)
                history[subject].pop()
            else:
                got = await st.record(subject, L, rows, keys, windows, now=now)
            for w in windows:
                exact = _model_totals(history[subject], w, now)
                if resolution == 0:
                    assert got[w] == exact, (step, w)
                else:
                    late = _model_totals(history[subject], w + resolution, now)
                    assert exact.rows <= got[w].rows <= late.rows, (step, w)
                    assert exact.records <= got[w].records <= late.records, (step, w)

    run(make_store(resolution=resolution), body)
