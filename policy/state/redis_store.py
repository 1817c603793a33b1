"""Window counters shared by worker processes and hosts, in Redis.

Every update is one Lua script (``register_script``), so concurrent pgwarden processes never
lose or double an increment. Per (subject, label), under one hash tag so Redis Cluster keeps
them in one slot:

- ``...:rec``  sorted set, member = record key, score = stamp of its last read. The distinct
  records in a window are ``ZCOUNT (now - w, +inf]``: O(log n), exact.
- ``...:rows`` sorted set, one member per stamp, score = stamp, member = *cumulative* rows
  up to and including that stamp. The rows in a window are ``total - cumulative at the
  window's start``, found with one ``ZREVRANGEBYSCORE ... LIMIT 0 1``: O(log n), exact.
- ``...:st``   hash: ``total`` rows ever added, ``base`` (cumulative rows of the last entry
  trimmed away), ``horizon`` (longest window asked about, so one process asking for 1 h
  never trims what another needs for 24 h) and ``last`` (latest stamp: stamps never go
  backwards, or cumulative values would stop being sorted).

Entries older than the horizon are removed on each write and every key gets a TTL of
horizon + resolution + a margin, so idle subjects vanish. Stamps are rounded up to
``resolution`` (see ``policy.state``), which bounds ``...:rows`` to horizon / resolution
entries and makes re-reads within one slot free.

Time: with ``now=None`` the scripts use the Redis server's ``TIME``, so hosts whose clocks
disagree still share one timeline. Redis >= 6.2 is needed (``ZADD GT``); scripts replicate
as effects (the default since 5.0), which is what makes ``TIME`` inside a script safe.

Durability is Redis's: a Redis restarted without persistence forgets every counter.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from policy.state._common import (
    StoreUnavailable,
    WindowTotals,
    check_rows,
    check_until,
    check_windows,
)

# One script call carries at most this many record keys; a larger result goes as several
# calls in one pipelined round trip. 10,000 keys is ~0.5 MB of arguments and a few ms of
# Redis time, short enough not to stall other clients.
CHUNK = 10_000

# Extra TTL (seconds) beyond the longest window, so a key never expires while something in
# it may still count, whatever the difference between the callers' clocks and Redis's.
TTL_MARGIN = 300.0

_LUA_COMMON = """
local function fmt(x) return string.format('%.17g', x) end
local function clock(arg)
  local now = tonumber(arg)
  if now then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- total: rows ever added; base: cumulative rows of the last entry trimmed (nil: no state).
local function window_totals(rowsk, reck, now, wins, total, base)
  local out = {}
  for _, w in ipairs(wins) do
    local b = fmt(now - w)
    local rows = 0
    if total then
      local m = redis.call('ZREVRANGEBYSCORE', rowsk, b, '-inf', 'LIMIT', 0, 1)
      rows = total - (tonumber(m[1]) or base)
    end
    out[#out + 1] = rows
    out[#out + 1] = redis.call('ZCOUNT', reck, '(' .. b, '+inf')
  end
  return out
end
"""

# KEYS: st, rows, rec.  ARGV: now|'', resolution, rows, margin, nwin, windows..., records...
_LUA_RECORD = (
    _LUA_COMMON
    + """
local st, rowsk, reck = KEYS[1], KEYS[2], KEYS[3]
local now = clock(ARGV[1])
local res = tonumber(ARGV[2])
local add = tonumber(ARGV[3])
local margin = tonumber(ARGV[4])
local nwin = tonumber(ARGV[5])
local state = redis.call('HMGET', st, 'horizon', 'last', 'total', 'base')
-- Without the state hash (expired, or never written) the cumulative values in rows have no
-- total to be subtracted from: drop them rather than report nonsense.
if not state[1] then redis.call('DEL', rowsk) end
local horizon = tonumber(state[1]) or 0
local wins = {}
for i = 1, nwin do
  local w = tonumber(ARGV[5 + i])
  wins[i] = w
  if w > horizon then horizon = w end
end
local stamp = now
if res > 0 then
  stamp = math.ceil(now / res) * res
  if stamp < now then stamp = now end
end
local last = tonumber(state[2])
if last and stamp < last then stamp = last end
local sstamp = fmt(stamp)
local total = tonumber(state[3]) or 0
local base = tonumber(state[4]) or 0
if add > 0 then
  total = redis.call('HINCRBY', st, 'total', add)
  local top = redis.call('ZRANGE', rowsk, -1, -1, 'WITHSCORES')
  if top[1] and tonumber(top[2]) == stamp then redis.call('ZREM', rowsk, top[1]) end
  redis.call('ZADD', rowsk, sstamp, string.format('%d', total))
end
local batch = {}
for i = 6 + nwin, #ARGV do
  batch[#batch + 1] = sstamp
  batch[#batch + 1] = ARGV[i]
  -- unpack() is limited by the Lua C stack (~8000 values): add in slices.
  if #batch >= 2000 then
    redis.call('ZADD', reck, 'GT', unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('ZADD', reck, 'GT', unpack(batch)) end
local hb = fmt(now - horizon)
local cut = redis.call('ZREVRANGEBYSCORE', rowsk, hb, '-inf', 'LIMIT', 0, 1)
if cut[1] then
  base = tonumber(cut[1])
  redis.call('ZREMRANGEBYSCORE', rowsk, '-inf', hb)
end
redis.call('ZREMRANGEBYSCORE', reck, '-inf', hb)
redis.call('HSET', st, 'horizon', fmt(horizon), 'last', sstamp, 'base', string.format('%d', base))
local ttl = math.ceil((horizon + res + margin) * 1000)
redis.call('PEXPIRE', st, ttl)
redis.call('PEXPIRE', rowsk, ttl)
redis.call('PEXPIRE', reck, ttl)
return window_totals(rowsk, reck, now, wins, total, base)
"""
)

# KEYS: st, rows, rec.  ARGV: now|'', windows...
_LUA_TOTALS = (
    _LUA_COMMON
    + """
local wins = {}
for i = 2, #ARGV do wins[#wins + 1] = tonumber(ARGV[i]) end
-- horizon is always set while the state hash exists; without it, row entries are orphans.
local state = redis.call('HMGET', KEYS[1], 'horizon', 'total', 'base')
local total = nil
if state[1] then total = tonumber(state[2]) or 0 end
return window_totals(KEYS[2], KEYS[3], clock(ARGV[1]), wins, total, tonumber(state[3]) or 0)
"""
)

# KEYS: blocks (sorted set), horizon (string).  ARGV: now|'', window, event id, margin
_LUA_BLOCK = (
    _LUA_COMMON
    + """
local now = clock(ARGV[1])
local w = tonumber(ARGV[2])
local h = tonumber(redis.call('GET', KEYS[2])) or 0
if w > h then h = w end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - h))
redis.call('ZADD', KEYS[1], fmt(now), ARGV[3])
local ttl = math.ceil((h + tonumber(ARGV[4])) * 1000)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], fmt(h), 'PX', ttl)
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now - w), '+inf')
"""
)

# KEYS: quarantine.  ARGV: until, now|'', margin
_LUA_QUARANTINE = (
    _LUA_COMMON
    + """
local now = clock(ARGV[2])
local untl = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]))
if (cur and cur >= untl) or untl <= now then return 0 end
redis.call('SET', KEYS[1], fmt(untl), 'PX', math.ceil((untl - now + tonumber(ARGV[3])) * 1000))
return 1
"""
)

# KEYS: quarantine.  ARGV: now|''
_LUA_QUARANTINED = (
    _LUA_COMMON
    + """
local now = clock(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) > now then return cur end
return false
"""
)


def _num(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def _redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RedisWindowStore:
    """Exact window counters and quarantine shared through Redis (see the module docstring).

    ``url``: a redis-py URL (``redis://host:6379/0``, ``rediss://``, ``unix://``).
    ``prefix``: put before every key, so several deployments can share one Redis.
    ``resolution``: seconds; stamps are rounded up to it (0 = exact times), see
    ``policy.state``. ``timeout``: seconds to wait for Redis (or for a free pooled
    connection) before ``StoreUnavailable``. ``max_connections``: pool size per process.

    Any Redis failure surfaces as ``StoreUnavailable``. After Redis comes back, the next call
    reconnects by itself. A connection that breaks is retried once: the command cannot have
    run on a server that has restarted, and if Redis died mid-command the counters died with
    it (without persistence) or the retry counts twice — too high, never too low.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "pgwarden:",
        *,
        resolution: float = 1.0,
        timeout: float = 2.0,
        max_connections: int = 32,
        cache_size: int = 100_000,
    ) -> None:
        if resolution < 0:
            raise ValueError("resolution must be >= 0")
        self.prefix = prefix
        self.resolution = resolution
        self._where = _redact(url)
        # A blocking pool makes a burst of concurrent statements wait briefly for a connection
        # instead of failing with "too many connections" (which would fail closed for
        # nothing). Timeouts are *not* retried: the script may have run, and a retry would
        # count twice.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
        self._record = self._redis.register_script(_LUA_RECORD)
        self._totals = self._redis.register_script(_LUA_TOTALS)
        self._block = self._redis.register_script(_LUA_BLOCK)
        self._quarantine = self._redis.register_script(_LUA_QUARANTINE)
        self._quarantined = self._redis.register_script(_LUA_QUARANTINED)
        self._cache: dict[tuple[str, str, float], WindowTotals] = {}
        self._cache_size = cache_size

    # -- keys ----------------------------------------------------------------------------

    def _series_keys(self, subject: str, label: str) -> list[str]:
        # The length prefix keeps ("a|b", "c") and ("a", "b|c") apart; the braces are a Redis
        # Cluster hash tag, so the three keys one script touches share a slot.
        base = f"{self.prefix}w{{{len(subject)}:{subject}|{label}}}"
        return [base + ":st", base + ":rows", base + ":rec"]

    def _block_keys(self, subject: str) -> list[str]:
        base = f"{self.prefix}b{{{subject}}}"
        return [base, base + ":h"]

    def _quarantine_key(self, subject: str) -> str:
        return f"{self.prefix}q{{{subject}}}"

    # -- calls ---------------------------------------------------------------------------

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except RedisError as exc:
            raise StoreUnavailable(
                f"window-counter store {self._where} failed during {what}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except OSError as exc:
            raise StoreUnavailable(
                f"window-counter store {self._where} is unreachable during {what}: {exc}"
            ) from exc

    def _remember(
        self, subject: str, label: str, wins: list[float], flat: list[int]
    ) -> dict[float, WindowTotals]:
        out: dict[float, WindowTotals] = {}
        cache = self._cache
        if len(cache) >= self._cache_size:
            # Oldest-inserted first: cheap, and a hot key is re-inserted on its next call.
            for key in list(cache)[: self._cache_size // 10 + 1]:
                del cache[key]
        for i, w in enumerate(wins):
            totals = WindowTotals(int(flat[2 * i]), int(flat[2 * i + 1]))
            out[w] = totals
            cache.pop((subject, label, w), None)
            cache[(subject, label, w)] = totals
        return out

    async def record(
        self,
        subject: str,
        label: str,
        rows: int,
        records: Collection[str],
        windows: Collection[float],
        now: float | None = None,
    ) -> dict[float, WindowTotals]:
        """Add ``rows`` and ``records`` in one script call (or one pipelined round trip of
        several for more than ``CHUNK`` records); return the totals after adding."""
        check_rows(rows)
        wins = check_windows(windows)
        if not wins:
            raise ValueError("record() needs at least one window: it decides how long data is kept")
        keys = self._series_keys(subject, label)
        keyset = list(records)
        tail = [repr(TTL_MARGIN), str(len(wins))] + [repr(float(w)) for w in wins]

        def args(n_rows: int, chunk: list[str]) -> list[str]:
            return [_num(now), repr(float(self.resolution)), str(n_rows), *tail, *chunk]

        if len(keyset) <= CHUNK:
            flat = await self._call("record", self._record(keys=keys, args=args(rows, keyset)))
        else:
            # Each chunk is atomic on its own; rows go with the first, and the totals of the
            # last chunk include every chunk. A concurrent reader may see a partial result,
            # never a wrong one.
            pipe = self._redis.pipeline(transaction=False)
            for start in range(0, len(keyset), CHUNK):
                chunk = keyset[start : start + CHUNK]
                await self._record(
                    keys=keys, args=args(rows if start == 0 else 0, chunk), client=pipe
                )
            flat = (await self._call("record", pipe.execute()))[-1]
        return self._remember(subject, label, wins, flat)

    async def totals(
        self,
        subject: str,
        label: str,
        windows: Collection[float],
        now: float | None = None,
    ) -> dict[float, WindowTotals]:
        """The totals per window, without adding anything (one round trip)."""
        wins = check_windows(windows)
        if not wins:
            return {}
        args = [_num(now)] + [repr(float(w)) for w in wins]
        flat = await self._call(
            "totals", self._totals(keys=self._series_keys(subject, label), args=args)
        )
        return self._remember(subject, label, wins, flat)

    def cached_totals(self, subject: str, label: str, window: float) -> WindowTotals | None:
        """The totals this process last received for (subject, label, window) from
        ``record``/``totals``, or ``None``. Stale by design: other processes' reads since
        then are missing, and rows that slid out since are still included."""
        return self._cache.get((subject, label, window))

    async def note_block(self, subject: str, window: float, now: float | None = None) -> int:
        """Count one block for ``subject``; return the blocks within ``window`` after it."""
        check_windows((window,))
        args = [_num(now), repr(float(window)), uuid.uuid4().hex, repr(TTL_MARGIN)]
        n = await self._call("note_block", self._block(keys=self._block_keys(subject), args=args))
        return int(n)

    async def quarantine(self, subject: str, until: float, now: float | None = None) -> None:
        """Quarantine ``subject`` until ``until`` (keeps a later end already set). The key
        expires by itself shortly after ``until``."""
        check_until(until)
        args = [repr(float(until)), _num(now), repr(TTL_MARGIN)]
        await self._call(
            "quarantine", self._quarantine(keys=[self._quarantine_key(subject)], args=args)
        )

    async def quarantined_until(self, subject: str, now: float | None = None) -> float | None:
        """The end of the quarantine in force at ``now``, or ``None``."""
        raw = await self._call(
            "quarantined_until",
            self._quarantined(keys=[self._quarantine_key(subject)], args=[_num(now)]),
        )
        return None if raw is None else float(raw)

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless Redis answers (for ``/readyz``)."""
        await self._call("ping", self._redis.ping())

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
