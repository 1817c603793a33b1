"""Benchmark of the window-counter stores: ``python -m loadtests.bench_state``.

Measures ``record()`` calls per second with 1 and 100 distinct records per call, for the
in-process store and for Redis (sequential calls: latency-bound; and 32 concurrent calls,
as many sessions in one worker would make), then the memory one subject reading 1,000,000
distinct records costs in each store.

Redis: ``PGWARDEN_REDIS_URL`` if set, else a throwaway ``redis-server`` on a free loopback
port with persistence off. The last line is machine-readable:
``memory_ops_per_s=<n> redis_ops_per_s=<n>`` (1 record per call; Redis with 32 in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator

import redis.asyncio as aioredis

from policy.state import MemoryWindowStore, RedisWindowStore, WindowStore
from proxy.sandbox.cluster import free_port

WINDOWS = (3600.0, 86400.0)
LABEL = "pii.email"


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """A Redis to measure against: the configured one, or a throwaway local server."""
    url = os.environ.get("PGWARDEN_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: install it or set PGWARDEN_REDIS_URL")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", workdir]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("redis-server did not start") from None
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait()


async def ops_per_s(
    store: WindowStore, per_call: int, seconds: float, concurrency: int = 1
) -> float:
    """record() calls per second over ``seconds``, spread over 100 subjects, each call
    carrying ``per_call`` new distinct record keys (the worst case: nothing coalesces)."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            keys = [f"{w:x}-{n:x}-{i}" for i in range(per_call)]
            await store.record(f"end_user:{n % 100}", LABEL, per_call, keys, WINDOWS)
            n += 1
        done += n

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - start)


async def memory_bytes_per_record(n: int) -> float:
    """Bytes the memory store holds per distinct record, one subject, ``n`` records."""
    store = MemoryWindowStore()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for start in range(0, n, 10_000):
        keys = [f"{i:016x}" for i in range(start, min(n, start + 10_000))]
        await store.record("end_user:bulk", LABEL, len(keys), keys, WINDOWS, now=1000.0)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert store.stats().live_records == n
    return used / n


async def redis_bytes_per_record(url: str, n: int) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    raw = aioredis.Redis.from_url(url)
    store = RedisWindowStore(url, prefix=prefix)
    try:
        before = int((await raw.info("memory"))["used_memory"])
        for start in range(0, n, 10_000):
            keys = [f"{i:016x}" for i in range(start, min(n, start + 10_000))]
            await store.record("end_user:bulk", LABEL, len(keys), keys, WINDOWS)
        after = int((await raw.info("memory"))["used_memory"])
        totals = await store.totals("end_user:bulk", LABEL, WINDOWS)
        assert totals[WINDOWS[0]].records == n
        async for key in raw.scan_iter(match=f"{prefix}*"):
            await raw.delete(key)
        return (after - before) / n
    finally:
        await store.close()
        await raw.aclose()


async def main() -> None:
    seconds = float(os.environ.get("BENCH_SECONDS", "3"))
    results: dict[str, float] = {}
    for per_call in (1, 100):
        mem = MemoryWindowStore()
        results[f"memory/{per_call}"] = await ops_per_s(mem, per_call, seconds)
        print(
            f"memory   records/call={per_call:<4} {results[f'memory/{per_call}']:>10,.0f} calls/s"
        )
    with redis_url() as url:
        for per_call in (1, 100):
            for conc in (1, 32):
                store = RedisWindowStore(url, prefix=f"bench-{uuid.uuid4().hex[:8]}:")
                try:
                    rate = await ops_per_s(store, per_call, seconds, conc)
                finally:
                    await store.close()
                results[f"redis/{per_call}/{conc}"] = rate
                print(
                    f"redis    records/call={per_call:<4} in-flight={conc:<3} {rate:>10,.0f} calls/s"
                )
        n = int(os.environ.get("BENCH_RECORDS", "1000000"))
        redis_b = await redis_bytes_per_record(url, n)
    mem_b = await memory_bytes_per_record(n)
    print(
        f"memory   {n:,} distinct records, one subject: {mem_b:.0f} B/record, {mem_b * n / 2**20:.0f} MiB"
    )
    print(
        f"redis    {n:,} distinct records, one subject: {redis_b:.0f} B/record, {redis_b * n / 2**20:.0f} MiB"
    )
    print(f"memory_ops_per_s={results['memory/1']:.0f} redis_ops_per_s={results['redis/1/32']:.0f}")


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
