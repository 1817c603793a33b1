"""What only the Redis store must do: exact counts under concurrency from several clients and
processes, batching, expiry, and failing loudly (then recovering) when Redis goes away."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from policy.state import RedisWindowStore, StoreUnavailable, WindowTotals
from policy.state.redis_store import CHUNK, TTL_MARGIN, _redact

S, L = "end_user:alice", "pii.email"
H, D = 3600.0, 86400.0


def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}:"


def test_two_clients_updating_concurrently_sum_exactly(redis_server: Any) -> None:
    prefix = _prefix()

    async def body() -> None:
        a = RedisWindowStore(redis_server.url, prefix=prefix, resolution=0)
        b = RedisWindowStore(redis_server.url, prefix=prefix, resolution=0)
        try:
            calls = []
            for i in range(200):
                # Overlapping record sets: each shared key must still count once.
                calls.append(a.record(S, L, 3, [f"shared{i % 37}", f"a{i}"], [H, D], now=1000 + i))
                calls.append(b.record(S, L, 2, [f"shared{i % 37}", f"b{i}"], [H, D], now=1000 + i))
            results = await asyncio.gather(*calls)
            assert max(r[H].rows for r in results) == 200 * 5
            final = await a.totals(S, L, [H, D], now=1300)
            assert final == {H: WindowTotals(1000, 37 + 400), D: WindowTotals(1000, 437)}
            assert await b.totals(S, L, [H], now=1300) == {H: WindowTotals(1000, 437)}
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


_HAMMER = textwrap.dedent(
    """
    import asyncio, sys
    from policy.state import RedisWindowStore

    async def main(url, prefix, who, n):
        store = RedisWindowStore(url, prefix=prefix)
        gate = asyncio.Semaphore(32)

        async def one(i):
            async with gate:
                await store.record("end_user:alice", "pii.email", 3,
                                   [f"r{(i * 7) % 500}", f"{who}-{i}"], [3600.0, 86400.0])

        await asyncio.gather(*(one(i) for i in range(n)))
        await store.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    print("done")
    """
)


def test_two_processes_hammering_one_subject_count_exactly(redis_server: Any) -> None:
    """Two OS processes, as two pgwarden workers would be, on the Redis server clock."""
    prefix, n = _prefix(), 400
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, redis_server.url, prefix, who, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for who in ("w1", "w2")
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert out.strip() == b"done"

    async def check() -> dict[float, WindowTotals]:
        store = RedisWindowStore(redis_server.url, prefix=prefix)
        try:
            return await store.totals("end_user:alice", "pii.email", [H, D])
        finally:
            await store.close()

    shared = len({(i * 7) % 500 for i in range(n)})
    expected = WindowTotals(2 * n * 3, shared + 2 * n)
    assert asyncio.run(check()) == {H: expected, D: expected}


def test_large_results_go_in_chunks_and_count_exactly(redis_server: Any) -> None:
    prefix = _prefix()
    big = [f"c{i}" for i in range(CHUNK * 2 + 123)]

    async def evalsha_calls(raw: aioredis.Redis) -> int:
        stats = await raw.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    async def body() -> None:
        store = RedisWindowStore(redis_server.url, prefix=prefix, resolution=0)
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await store.record(S, L, 0, [], [H], now=99)  # loads the script
            before = await evalsha_calls(raw)
            # A 10,000-row result is one script call; a larger one goes in CHUNK-sized calls.
            await store.record("end_user:bob", L, CHUNK, big[:CHUNK], [H], now=100)
            assert await evalsha_calls(raw) == before + 1
            got = await store.record(S, L, len(big), big, [H], now=100)
            assert await evalsha_calls(raw) == before + 1 + 3
            assert got == {H: WindowTotals(len(big), len(big))}
            again = await store.record(S, L, 10, big[:5] + ["new"], [H], now=101)
            assert again == {H: WindowTotals(len(big) + 10, len(big) + 1)}
        finally:
            await store.close()
            await raw.aclose()

    asyncio.run(body())


def test_keys_carry_a_ttl_of_the_longest_window(redis_server: Any) -> None:
    prefix = _prefix()

    async def body() -> None:
        store = RedisWindowStore(redis_server.url, prefix=prefix)
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await store.record(S, L, 1, ["a"], [60, H])
            await store.note_block(S, 600)
            await store.quarantine(S, 10_000, now=9_000)
            keys = [k async for k in raw.scan_iter(match=f"{prefix}*")]
            assert len(keys) == 3 + 2 + 1
            for key in keys:
                ttl = await raw.pttl(key)
                assert 0 < ttl <= (H + 1 + TTL_MARGIN) * 1000, key
        finally:
            await store.close()
            await raw.aclose()

    asyncio.run(body())


def test_a_lost_state_hash_never_yields_negative_counts(redis_server: Any) -> None:
    """If the state hash vanished (eviction, manual DEL) while row entries remain, counts
    restart from zero instead of going negative."""
    prefix = _prefix()

    async def body() -> None:
        store = RedisWindowStore(redis_server.url, prefix=prefix, resolution=0)
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await store.record(S, L, 5, ["a"], [H], now=100)
            await raw.delete(store._series_keys(S, L)[0])
            assert (await store.totals(S, L, [H], now=101))[H].rows == 0
            assert (await store.record(S, L, 2, ["b"], [H], now=102))[H] == WindowTotals(2, 2)
        finally:
            await store.close()
            await raw.aclose()

    asyncio.run(body())


def test_unreachable_redis_raises_store_unavailable_then_recovers(own_redis_server: Any) -> None:
    server = own_redis_server

    async def body() -> None:
        store = RedisWindowStore(server.url, prefix=_prefix(), resolution=0, timeout=1.0)
        try:
            assert (await store.record(S, L, 1, ["a"], [H], now=10))[H] == WindowTotals(1, 1)
            server.stop()  # Redis dies while pgwarden holds pooled connections
            for call in (
                store.record(S, L, 1, ["b"], [H], now=11),
                store.totals(S, L, [H], now=11),
                store.note_block(S, 60, now=11),
                store.quarantine(S, 100, now=11),
                store.quarantined_until(S, now=11),
                store.ping(),
            ):
                with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{server.port}"):
                    await call
            server.start()  # same address; without persistence the counters start empty
            assert (await store.record(S, L, 1, ["b"], [H], now=12))[H] == WindowTotals(1, 1)
            await store.quarantine(S, 100, now=12)
            assert await store.quarantined_until(S, now=13) == 100
            # A restart between two calls: the pooled connection is dead, the retry on a new
            # one succeeds, and the caller never sees the restart.
            server.stop()
            server.start()
            assert (await store.record(S, L, 1, ["c"], [H], now=14))[H] == WindowTotals(1, 1)
        finally:
            await store.close()

    asyncio.run(body())


def test_nothing_listening_is_store_unavailable() -> None:
    from proxy.sandbox.cluster import free_port

    async def body() -> None:
        store = RedisWindowStore(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
        try:
            with pytest.raises(StoreUnavailable, match="failed during record"):
                await store.record(S, L, 1, ["a"], [H])
        finally:
            await store.close()

    asyncio.run(body())


def test_passwords_stay_out_of_error_messages() -> None:
    assert _redact("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert _redact("redis://app:s3cret@h/1") == "redis://app:***@h/1"
    assert _redact("redis://h:6379/0") == "redis://h:6379/0"
