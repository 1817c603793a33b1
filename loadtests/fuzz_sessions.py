"""Socket-level fuzzing: real client sessions, recorded, mutated and replayed to pgwarden.

    python -m loadtests.fuzz_sessions [--iterations 20000] [--seed 1] [--modes passthrough,policy]

1. **Record.** Real clients -- psql (simple protocol, COPY in and out), psycopg (extended
   protocol, prepared statements, a server-side cursor, a pipeline, COPY, cancel) and
   asyncpg (prepared statements, a cursor, COPY in and out, executemany) -- run against
   PostgreSQL through a small recording forwarder, with TLS off.  What each client
   connection sent is one recording (a cancel request is a connection of its own).  Nothing
   is written to disk unless ``--save-corpus DIR`` asks for it; ``--corpus DIR`` replays a
   saved corpus instead of recording one, so a failure can be reproduced byte for byte.
2. **Mutate and replay.** Iteration *i* draws everything from ``Random(f"{seed}/{i}")``: a
   recording, one to three mutations (bit flips, byte overwrites, truncation, reordered,
   dropped or repeated messages, oversized, negative, short and off-by-some lengths,
   garbage, unknown message types, messages spliced in from other sessions, start-up
   packet damage, untyped packets mid-stream, a large message) and how the bytes are cut
   into writes (whole, random chunks, byte by byte, a pause between messages).  The bytes
   go to pgwarden over a fresh socket while its answers are read; the connection ends when
   pgwarden closes it, or after a quiet period, when the fuzzer closes it.
3. **Watch.** Beside the fuzzer a psycopg connection runs ``SELECT 1`` in a loop through the
   same pgwarden and must never fail; pgwarden's process must never exit; its log must hold
   no ``internal_error`` or traceback; after the run its ``pgwarden_connections_active``
   and PostgreSQL's client backends must come back to what they were, and pgwarden's RSS
   (after a warm-up of a tenth of the iterations) must not grow more than
   ``--max-rss-growth-mib``.

Each mode runs its own pgwarden: ``passthrough`` (no policy) and ``policy`` (the shipped
``config/policy.yaml`` with its catalog, and the SQLite audit trail).  The last line gives
``name=value`` figures; the exit code is 1 when any check failed.  Replay one iteration
with ``--only I`` (and the same ``--seed``, modes and corpus).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy.sandbox.cluster import Cluster, schema_sql

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
_LEN = struct.Struct("!i")
_HEADER = struct.Struct("!Bi")

FUZZ_DB = "fuzz"
POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"
CUSTOMERS = 300
DATA = f"""
INSERT INTO agents (agent_id, username, full_name, email, team)
SELECT i, 'agent' || i, 'Agent ' || i, 'agent' || i || '@support.example', 'tech'
FROM generate_series(1, 3) i;
INSERT INTO customers (customer_id, full_name, email, phone, country, tier)
SELECT i, 'Customer ' || i, 'customer' || i || '@mail.example', '+4420' || lpad(i::text, 7, '0'),
       'GB', CASE WHEN i % 10 = 0 THEN 'vip' ELSE 'standard' END
FROM generate_series(1, {CUSTOMERS}) i;
INSERT INTO tickets (ticket_id, ticket_number, customer_id, assigned_agent_id, subject)
SELECT i, 'TM-' || lpad(i::text, 7, '0'), i, 1 + i % 3, 'help' FROM generate_series(1, {CUSTOMERS}) i;
INSERT INTO products VALUES (1, 'Widget', 'tools');
GRANT USAGE ON SCHEMA public, reporting TO support_app, analyst;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO support_app, analyst;
GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO support_app, analyst;
GRANT CREATE ON SCHEMA public TO support_app;
"""

# What pgwarden's log must never hold: a bug escaping the protocol error handling.
_LOG_FAILURE = re.compile(r"internal_error|Traceback|never retrieved|Exception in callback")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_database(cluster: Cluster) -> None:
    """A small support database of its own (``fuzz``): schema, customers, grants."""
    cluster.psql(
        f"DROP DATABASE IF EXISTS {FUZZ_DB}; CREATE DATABASE {FUZZ_DB};", database="postgres"
    )
    cluster.psql(schema_sql() + DATA, database=FUZZ_DB)


# --- recording -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    name: str
    data: bytes


class RecordingForwarder:
    """A TCP forwarder (own thread and event loop) that keeps what each client sent."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._streams: list[bytearray] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-recorder", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = bytearray()
        with self._lock:
            self._streams.append(sent)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            try:
                while data := await src.read(65536):
                    if keep:
                        with self._lock:
                            sent.extend(data)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    def take(self) -> list[bytes]:
        """The streams of the connections made since the last call (after they settle)."""
        time.sleep(0.3)  # the forwarder thread may still be copying the last bytes
        with self._lock:
            streams, self._streams = self._streams, []
        return [bytes(s) for s in streams]

    def close(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _dsn(port: int, user: str) -> str:
    return (
        f"host=127.0.0.1 port={port} user={user} dbname={FUZZ_DB} sslmode=disable "
        "gssencmode=disable connect_timeout=10 application_name=fuzz"
    )


PSQL_SCRIPT = """\
SELECT customer_id, full_name, email FROM customers WHERE customer_id <= 5 ORDER BY 1;
SELECT 1 AS a; SELECT 'two' AS b
;
BEGIN;
CREATE TEMP TABLE scratch (a int, b text);
COPY scratch FROM STDIN;
1\tone
2\ttwo
\\.
COPY (SELECT * FROM scratch ORDER BY a) TO STDOUT WITH (FORMAT csv);
SELECT no_such_column FROM scratch;
ROLLBACK;
SELECT ticket_number FROM tickets WHERE ticket_id = 7;
"""


def _psql(port: int, user: str, workdir: Path) -> None:
    from loadtests.harness import psql_binary

    script = workdir / "fuzz.sql"
    script.write_text(PSQL_SCRIPT)
    subprocess.run(
        [psql_binary(), "-X", "-q", "-d", _dsn(port, user), "-f", str(script)],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def _psycopg_extended(port: int, user: str) -> None:
    import psycopg

    with psycopg.connect(_dsn(port, user), autocommit=True) as conn:
        conn.execute("SELECT customer_id, email FROM customers WHERE customer_id = %s", [3])
        conn.execute("SELECT %s::int + %s::int, %s::text", [1, 2, "x"], prepare=True).fetchall()
        conn.execute("SELECT %s::int + %s::int, %s::text", [3, 4, "y"], prepare=True).fetchall()
        with conn.cursor() as cur:
            cur.executemany("SELECT %s::int", [(i,) for i in range(4)])
            with contextlib.suppress(psycopg.Error):
                cur.execute("SELECT 1/%s::int", [0])
            cur.execute("SELECT full_name FROM customers WHERE tier = %s LIMIT 3", ["vip"])
            cur.fetchall()
        with conn.transaction():
            with conn.cursor(name="fuzz_cursor") as named:
                named.execute("SELECT customer_id FROM customers ORDER BY 1 LIMIT 12")
                named.fetchmany(5)
                named.fetchmany(5)
        # Binary results and parameters.
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT %b::bytea, %s::numeric", [b"\x00\xff", 1.5]).fetchone()


def _psycopg_pipeline(port: int, user: str) -> None:
    import psycopg

    with psycopg.connect(_dsn(port, user)) as conn:
        with conn.pipeline():
            conn.execute("SELECT customer_id FROM customers WHERE customer_id = %s", [1])
            conn.execute("SELECT %s::text", ["piped"])
            with contextlib.suppress(psycopg.Error), conn.pipeline():
                conn.execute("SELECT 1/0")
                conn.execute("SELECT 2")
        conn.rollback()
        with conn.pipeline():
            cur = conn.execute("SELECT ticket_number FROM tickets WHERE ticket_id = %s", [2])
            conn.execute("SELECT 3")
        cur.fetchall()


def _psycopg_copy(port: int, user: str) -> None:
    import psycopg

    with psycopg.connect(_dsn(port, user)) as conn:
        conn.execute("CREATE TEMP TABLE scratch (a int, b text)")
        with conn.cursor() as cur:
            with cur.copy("COPY scratch (a, b) FROM STDIN") as copy:
                for i in range(20):
                    copy.write_row((i, f"row {i}"))
            with cur.copy("COPY scratch TO STDOUT (FORMAT binary)") as copy:
                for _ in copy:
                    pass
            with cur.copy("COPY (SELECT customer_id, phone FROM customers LIMIT 5) TO STDOUT") as c:
                for _ in c:
                    pass
        conn.commit()


def _psycopg_cancel(port: int, user: str) -> None:
    import psycopg

    with psycopg.connect(_dsn(port, user), autocommit=True) as conn:
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(3)")
        timer.join()
        conn.execute("SELECT 1")


def _asyncpg_session(port: int, user: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=user, database=FUZZ_DB, ssl=False
        )
        try:
            await conn.fetch("SELECT customer_id, email FROM customers WHERE customer_id = $1", 4)
            stmt = await conn.prepare("SELECT $1::int * 2, $2::text")
            await stmt.fetchrow(21, "z")
            await conn.executemany("SELECT $1::int", [(i,) for i in range(5)])
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.execute("SELECT * FROM no_such_table")
            async with conn.transaction():
                async for _ in conn.cursor("SELECT customer_id FROM customers LIMIT 9", prefetch=4):
                    pass
            await conn.execute("CREATE TEMP TABLE scratch (a int, b text)")
            await conn.copy_records_to_table("scratch", records=[(i, str(i)) for i in range(10)])
            sink = _Sink()
            await conn.copy_from_query("SELECT * FROM scratch", output=sink)
            await conn.execute("SELECT 1; SELECT 2")  # simple protocol, two statements
        finally:
            await conn.close()

    asyncio.run(run())


class _Sink:
    async def __call__(self, data: bytes) -> None:
        pass


# name, client function, database role
SCENARIOS: list[tuple[str, Callable[..., None], str]] = [
    ("psql", _psql, "postgres"),
    ("psql-agent", _psql, "support_app"),
    ("psycopg-extended", _psycopg_extended, "postgres"),
    ("psycopg-extended-agent", _psycopg_extended, "support_app"),
    ("psycopg-pipeline", _psycopg_pipeline, "postgres"),
    ("psycopg-copy", _psycopg_copy, "postgres"),
    ("psycopg-cancel", _psycopg_cancel, "postgres"),
    ("asyncpg", _asyncpg_session, "postgres"),
    ("asyncpg-agent", _asyncpg_session, "support_app"),
]


def record_corpus(target: tuple[str, int], workdir: Path) -> list[Recording]:
    """Run every scenario's client through a recording forwarder to ``target``."""
    fwd = RecordingForwarder(target)
    corpus: list[Recording] = []
    try:
        for name, run, user in SCENARIOS:
            try:
                if run is _psql:
                    run(fwd.port, user, workdir)
                else:
                    run(fwd.port, user)
            except Exception as exc:  # a client refused by policy still sent its bytes
                progress(f"fuzz: recording {name}: client ended with {type(exc).__name__}: {exc}")
            for k, stream in enumerate(fwd.take()):
                if stream:
                    corpus.append(Recording(f"{name}#{k}" if k else name, stream))
    finally:
        fwd.close()
    return corpus


def save_corpus(corpus: Sequence[Recording], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # The index keeps the order: iteration i draws its recording by position.
    for k, rec in enumerate(corpus):
        (directory / f"{k:03d}-{rec.name}.bin").write_bytes(rec.data)


def load_corpus(directory: Path) -> list[Recording]:
    return [
        Recording(p.stem.partition("-")[2], p.read_bytes()) for p in sorted(directory.glob("*.bin"))
    ]


# --- mutations -----------------------------------------------------------------------------


def split_units(data: bytes) -> tuple[list[bytes], int]:
    """The packets of a client stream -- untyped start-up packets, then typed messages -- and
    how many of them are start-up packets.  A tail that does not parse stays one unit."""
    units: list[bytes] = []
    pos, n, startup, first = 0, len(data), True, 0
    while pos < n:
        if startup:
            if n - pos < 8:
                break
            (length,) = _LEN.unpack_from(data, pos)
            (code,) = _LEN.unpack_from(data, pos + 4)
            if length < 8 or pos + length > n:
                break
            units.append(data[pos : pos + length])
            pos += length
            first += 1
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                continue
            if code == CANCEL_REQUEST:
                break
            startup = False
        else:
            if n - pos < 5:
                break
            _t, length = _HEADER.unpack_from(data, pos)
            if length < 4 or pos + 1 + length > n:
                break
            units.append(data[pos : pos + 1 + length])
            pos += 1 + length
    if pos < n:
        units.append(data[pos:])
    return units, first


def _with_length(unit: bytes, length: int, typed: bool) -> bytes:
    at = 1 if typed else 0
    return unit[:at] + struct.pack("!i", length) + unit[at + 4 :]


def _pick_typed(units: list[bytes], first: int, rng: random.Random) -> int | None:
    typed = [i for i in range(first, len(units)) if len(units[i]) >= 5]
    return rng.choice(typed) if typed else None


Units = list[bytes]
Mutation = Callable[[Units, int, random.Random, Sequence[Recording]], Units]


def m_reorder(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    if len(units) - first < 2:
        return units
    i, j = sorted(rng.sample(range(first, len(units)), 2))
    if rng.random() < 0.5:
        units[i], units[j] = units[j], units[i]
    else:
        part = units[i : j + 1]
        rng.shuffle(part)
        units[i : j + 1] = part
    return units


def m_drop(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    if len(units) > first:
        del units[rng.randrange(first, len(units))]
    return units


def m_repeat(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    i = _pick_typed(units, first, rng)
    if i is not None:
        # At most ~8 MB more: 200 copies of a 4 MB message would test throughput, not
        # framing, and hold the fuzzer's own loop long enough to time other sessions out.
        times = min(rng.choice([1, 2, 10, 200]), max(1, 8_000_000 // len(units[i])))
        units[i:i] = [units[i]] * times
    return units


def m_length_huge(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    i = _pick_typed(units, first, rng)
    if i is not None:
        big = rng.choice([0x7FFFFFFF, 256 * 1024 * 1024 + 1, 64 * 1024 * 1024, 1_000_000, 70_000])
        units[i] = _with_length(units[i], big, True)
    return units


def m_length_negative(
    units: Units, first: int, rng: random.Random, _c: Sequence[Recording]
) -> Units:
    i = _pick_typed(units, first, rng)
    if i is not None:
        units[i] = _with_length(units[i], rng.choice([-1, -4, -(2**31), 0, 1, 3]), True)
    return units


def m_length_off(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    """A length a little off: the messages after it are read out of step."""
    i = _pick_typed(units, first, rng)
    if i is not None:
        real = len(units[i]) - 1
        units[i] = _with_length(
            units[i], max(4, real + rng.choice([-3, -2, -1, 1, 2, 5, 64])), True
        )
    return units


def m_garbage(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    at = rng.randrange(first, len(units) + 1) if len(units) >= first else len(units)
    units.insert(at, rng.randbytes(rng.choice([1, 3, 5, 17, 64])))
    return units


def m_unknown_type(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    known = set(b"QPBDECSHXdcfFp")
    t = rng.choice([c for c in range(256) if c not in known])
    body = rng.randbytes(rng.choice([0, 1, 8, 100]))
    at = rng.randrange(first, len(units) + 1) if len(units) >= first else len(units)
    units.insert(at, bytes([t]) + struct.pack("!i", len(body) + 4) + body)
    return units


def m_splice(units: Units, first: int, rng: random.Random, corpus: Sequence[Recording]) -> Units:
    """Messages of another session (a Bind, CopyData, Execute ...) in this one."""
    other, other_first = split_units(rng.choice(corpus).data)
    pool = other[other_first:]
    if pool:
        for _ in range(rng.choice([1, 1, 3])):
            at = rng.randrange(first, len(units) + 1) if len(units) >= first else len(units)
            units.insert(at, rng.choice(pool))
    return units


def m_startup(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    if not first:
        return units
    i = first - 1
    pkt = bytearray(units[i])
    how = rng.randrange(5)
    if how == 0:  # a length that disagrees with the packet
        pkt[0:4] = struct.pack("!i", rng.choice([0, 7, 8, 9, len(pkt) - 1, len(pkt) + 9, 10_001]))
    elif how == 1:  # another protocol version (3.2, 2.0, nonsense)
        pkt[4:8] = struct.pack("!i", rng.choice([196610, 131072, 0x12345678, 196608 + 99]))
    elif how == 2 and len(pkt) > 9:  # the terminating NULs gone
        pkt = pkt[:-1]
        pkt[0:4] = struct.pack("!i", len(pkt))
    elif how == 3:  # many or odd parameters
        extra = b"".join(b"_pq_.x%d\x00v\x00" % k for k in range(rng.choice([1, 50, 400])))
        extra += rng.choice([b"options\x00-c search_path=pg_catalog\x00", b"replication\x00on\x00"])
        pkt = pkt[:-1] + extra + b"\x00"
        pkt[0:4] = struct.pack("!i", len(pkt))
    else:  # an SSLRequest, GSSENCRequest or CancelRequest first
        code = rng.choice([SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST])
        pre = struct.pack("!ii", 8, code)
        if code == CANCEL_REQUEST:
            pre = struct.pack("!iiii", 16, code, rng.randrange(2**31), rng.randrange(2**31))
        units.insert(0, pre)
        return units
    units[i] = bytes(pkt)
    return units


def m_untyped_midstream(
    units: Units, first: int, rng: random.Random, _c: Sequence[Recording]
) -> Units:
    """A start-up style packet where a typed message belongs."""
    code = rng.choice([SSL_REQUEST, CANCEL_REQUEST, 196608])
    at = rng.randrange(first, len(units) + 1) if len(units) >= first else len(units)
    units.insert(at, struct.pack("!ii", 8, code))
    return units


def m_large(units: Units, first: int, rng: random.Random, _c: Sequence[Recording]) -> Units:
    """A large but legal message: a long query or CopyData."""
    size = rng.choice([100_000, 1_000_000, 4_000_000])
    if rng.random() < 0.5:
        body = b"SELECT '" + b"x" * size + b"'\x00"
        msg = b"Q" + struct.pack("!i", len(body) + 4) + body
    else:
        body = b"a\tb\n" * (size // 4)
        msg = b"d" + struct.pack("!i", len(body) + 4) + body
    at = rng.randrange(first, len(units) + 1) if len(units) >= first else len(units)
    units.insert(at, msg)
    return units


UNIT_MUTATIONS: dict[str, Mutation] = {
    "reorder": m_reorder,
    "drop": m_drop,
    "repeat": m_repeat,
    "length_huge": m_length_huge,
    "length_negative": m_length_negative,
    "length_off": m_length_off,
    "garbage": m_garbage,
    "unknown_type": m_unknown_type,
    "splice": m_splice,
    "startup": m_startup,
    "untyped_midstream": m_untyped_midstream,
    "large": m_large,
}
BYTE_MUTATIONS = ("bitflip", "overwrite", "truncate")
WEIGHTS = {
    "reorder": 3, "drop": 2, "repeat": 2, "length_huge": 2, "length_negative": 2,
    "length_off": 2, "garbage": 2, "unknown_type": 1, "splice": 3, "startup": 1,
    "untyped_midstream": 1, "large": 1, "bitflip": 5, "overwrite": 2, "truncate": 2,
}  # fmt: skip


@dataclass
class Case:
    """One mutated session: its bytes, the writes they go out in, and how it was made."""

    index: int
    recording: str
    ops: list[str]
    data: bytes
    chunks: list[tuple[int, float]]  # (end offset of the write, pause before the next)


def make_case(index: int, seed: int, corpus: Sequence[Recording]) -> Case:
    rng = random.Random(f"{seed}/{index}")
    rec = rng.choice(corpus)
    names = list(WEIGHTS)
    ops = rng.choices(names, weights=[WEIGHTS[n] for n in names], k=rng.choice([1, 1, 1, 2, 3]))
    units, first = split_units(rec.data)
    for op in sorted(ops, key=lambda o: o in BYTE_MUTATIONS):  # unit level first
        if op in UNIT_MUTATIONS:
            units = UNIT_MUTATIONS[op](units, first, rng, corpus)
    data = bytearray(b"".join(units))
    # Most damage goes after the start-up packet: that is where the most code is.
    skip = sum(len(u) for u in units[:first]) if rng.random() < 0.85 else 0
    for op in ops:
        if not data or skip >= len(data):
            break
        if op == "bitflip":
            for _ in range(rng.choice([1, 1, 2, 4, 8])):
                at = rng.randrange(skip, len(data))
                data[at] ^= 1 << rng.randrange(8)
        elif op == "overwrite":
            for _ in range(rng.choice([1, 2, 4])):
                data[rng.randrange(skip, len(data))] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x01])
        elif op == "truncate":
            del data[rng.randrange(max(1, skip), len(data) + 1) :]
    return Case(index, rec.name, ops, bytes(data), _chunking(len(data), rng))


def _chunking(n: int, rng: random.Random) -> list[tuple[int, float]]:
    how = rng.choice(["whole", "whole", "random", "random", "bytes", "paced"])
    if how == "whole" or n == 0:
        return [(n, 0.0)]
    ends: list[tuple[int, float]] = []
    pos = 0
    if how == "bytes":  # the first 200 bytes one at a time (headers split everywhere)
        while pos < min(n, 200):
            pos += 1
            ends.append((pos, 0.0))
        if pos < n:
            ends.append((n, 0.0))
        return ends
    while pos < n:
        pos = min(n, pos + rng.choice([1, 2, 3, 5, 7, 64, 500, 4096, 70_000]))
        ends.append((pos, rng.choice([0.0, 0.0, 0.0, 0.002, 0.02]) if how == "paced" else 0.0))
    return ends


# --- replay --------------------------------------------------------------------------------

QUIET_SECONDS = 0.6  # no answer for this long: the fuzzer closes the connection
SESSION_SECONDS = 6.0  # the longest one mutated session may take


async def replay(host: str, port: int, case: Case) -> str:
    """Send ``case`` to pgwarden while reading its answers; how the connection ended."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError) as exc:
        return f"connect_failed:{type(exc).__name__}"
    got = 0
    closed_by_server = asyncio.Event()

    async def read() -> None:
        nonlocal got
        try:
            while data := await reader.read(65536):
                got += len(data)
        except OSError:
            pass
        closed_by_server.set()

    reading = asyncio.create_task(read())
    outcome = "closed_by_pgwarden"
    try:
        start = 0
        for end, pause in case.chunks:
            if closed_by_server.is_set():
                break
            writer.write(case.data[start:end])
            start = end
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        deadline = time.monotonic() + SESSION_SECONDS
        while not closed_by_server.is_set():
            before = got
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed_by_server.wait(), QUIET_SECONDS)
            if closed_by_server.is_set():
                break
            if got == before or time.monotonic() > deadline:
                outcome = "closed_by_fuzzer"
                break
    except (OSError, ConnectionError):
        outcome = "reset"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    return outcome


# --- the watched pgwarden ------------------------------------------------------------------


@dataclass
class Watched:
    """The pgwarden under test and how to look at it."""

    host: str
    port: int
    pid: int
    log: Path
    admin_port: int | None
    alive: Callable[[], bool]

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return -1

    def metric(self, name: str) -> float:
        import urllib.request

        if self.admin_port is None:
            return float("nan")
        try:
            url = f"http://{self.host}:{self.admin_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return float("nan")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return float("nan")

    def log_failures(self) -> list[str]:
        """Each log line that says a bug escaped, with the traceback lines after it."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = text.splitlines()
        found: list[str] = []
        i = 0
        while i < len(lines):
            if lines[i].startswith("{") and _LOG_FAILURE.search(lines[i]):
                found.append(_summarise_event(lines[i]))
                i += 1
                continue
            if _LOG_FAILURE.search(lines[i]) and not lines[i].startswith("Traceback"):
                block = [lines[i][:500]]
                i += 1
                while i < len(lines) and not lines[i].startswith("{"):
                    if not _LOG_FAILURE.search(lines[i]) or lines[i].startswith("Traceback"):
                        block.append(lines[i][:300])
                    else:
                        break
                    i += 1
                # The first traceback names the cause; its last line and innermost frame
                # say what and where.
                first_tb = block[
                    : next(
                        (k for k in range(2, len(block)) if block[k].startswith("During handling")),
                        len(block),
                    )
                ]
                frames = [b.strip() for b in first_tb if b.strip().startswith("File ")]
                where = f" (at {frames[-1]})" if frames else ""
                cause = next((b.strip() for b in reversed(first_tb) if b.strip()), "")
                found.append(f"{block[0]}: {cause}{where}"[:600])
                continue
            i += 1
        return found


def _summarise_event(line: str) -> str:
    """A JSON log event with a traceback, as its event name, the exception's last line and
    the innermost frame: one line to read among thousands."""
    try:
        event = json.loads(line)
    except ValueError:
        return line[:500]
    tb = str(event.get("exception", "")).strip().splitlines()
    frames = [t.strip() for t in tb if t.strip().startswith("File ")]
    where = f" (at {frames[-1]})" if frames else ""
    return f"{event.get('event')}: {tb[-1] if tb else ''}{where}"[:600]


class SideSession:
    """A live psycopg connection running ``SELECT 1`` in a loop beside the fuzzer."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fuzz-side", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                row = self.conn.execute("SELECT 1").fetchone()
                if row != (1,):
                    self.errors.append(f"SELECT 1 returned {row!r}")
                self.ok += 1
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if self.conn.closed:
                    return
            self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self.conn.close()


def client_backends(cluster: Cluster) -> int:
    out = cluster.psql(
        f"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        f"AND datname = '{FUZZ_DB}' AND application_name <> 'fuzz-side'",
        database="postgres",
    )
    return int(out.strip().splitlines()[-1].strip())


@dataclass
class FuzzResult:
    mode: str
    iterations: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    rss_start_kib: int = 0
    rss_mid_kib: int = 0
    rss_end_kib: int = 0
    side_queries: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def figures(self) -> dict[str, float]:
        m = self.mode
        return {
            f"{m}_sessions": self.iterations,
            f"{m}_closed_by_pgwarden": self.outcomes["closed_by_pgwarden"],
            f"{m}_closed_by_fuzzer": self.outcomes["closed_by_fuzzer"],
            f"{m}_reset": self.outcomes["reset"],
            f"{m}_rss_start_kib": self.rss_start_kib,
            f"{m}_rss_mid_kib": self.rss_mid_kib,
            f"{m}_rss_end_kib": self.rss_end_kib,
            f"{m}_rss_growth_kib": self.rss_end_kib - self.rss_start_kib,
            f"{m}_side_queries": self.side_queries,
            f"{m}_failures": len(self.failures),
            f"{m}_seconds": round(self.seconds, 1),
        }


def fuzz(
    watched: Watched,
    cluster: Cluster,
    corpus: Sequence[Recording],
    *,
    mode: str,
    iterations: int,
    seed: int,
    concurrency: int = 8,
    max_rss_growth_mib: float = 32.0,
    only: int | None = None,
    side_dsn: str | None = None,
) -> FuzzResult:
    """Replay ``iterations`` mutated sessions to ``watched`` and check it stayed whole."""
    result = FuzzResult(mode)
    began = time.monotonic()

    async def clean_replays() -> list[str]:
        # The unmutated sessions first: they check the replay works, and open what pgwarden
        # opens once (catalog connections) before the baselines are taken.
        cases = [Case(-1, r.name, [], r.data, [(len(r.data), 0.0)]) for r in corpus]
        return await asyncio.gather(*(replay(watched.host, watched.port, c) for c in cases))

    for rec, outcome in zip(corpus, asyncio.run(clean_replays()), strict=True):
        if outcome != "closed_by_pgwarden":
            progress(f"fuzz {mode}: clean replay of {rec.name}: {outcome}")
    baseline_backends = client_backends(cluster)
    side = SideSession(side_dsn) if side_dsn else None
    baseline_active = watched.metric("pgwarden_connections_active")
    indices = [only] if only is not None else list(range(iterations))
    warmup = 0 if only is not None else max(1, len(indices) // 10)

    async def run_all() -> None:
        sem = asyncio.Semaphore(concurrency)
        in_flight: dict[int, Case] = {}

        async def one(i: int) -> None:
            async with sem:
                if result.failures and not watched.alive():
                    return
                case = make_case(i, seed, corpus)
                in_flight[i] = case
                outcome = await replay(watched.host, watched.port, case)
                del in_flight[i]
                result.outcomes[outcome.split(":")[0]] += 1
                result.ops.update(case.ops)
                result.iterations += 1
                # A reset alone is no fault: pgwarden closes a connection whose client is
                # still sending (an oversized message) once its linger time is over.
                if outcome.startswith("connect_failed") or not watched.alive():
                    alive = watched.alive()
                    result.failures.append(
                        f"iteration {i} ({case.recording}, {'+'.join(case.ops)}): {outcome}"
                        + ("" if alive else "; pgwarden's process has exited")
                    )

        # The warm-up first (caches fill, the allocator settles), then batches of 200.
        bounds = [0, warmup] if warmup else [0]
        bounds += list(range(bounds[-1] + 200, len(indices), 200)) + [len(indices)]
        for start, stop in itertools.pairwise(bounds):
            batch = indices[start:stop]
            await asyncio.gather(*(one(i) for i in batch))
            done = stop
            if start == 0:
                result.rss_start_kib = watched.rss_kib()
            if done >= len(indices) // 2 and not result.rss_mid_kib:
                result.rss_mid_kib = watched.rss_kib()
            if done % 2000 < 200:
                progress(
                    f"fuzz {mode}: {done}/{len(indices)} sessions, rss {watched.rss_kib()} KiB"
                )
            if not watched.alive():
                result.failures.append(
                    f"pgwarden's process exited during iterations {batch[0]}..{batch[-1]}"
                )
                return

    asyncio.run(run_all())
    if not result.rss_start_kib:
        result.rss_start_kib = watched.rss_kib()
    result.rss_end_kib = watched.rss_kib()
    if not watched.alive():
        result.failures.append("pgwarden's process is not running after the fuzzing")
    # Every fuzzed connection is closed on our side: pgwarden must let go of all of them.
    deadline = time.monotonic() + 15
    active = watched.metric("pgwarden_connections_active")
    while active > baseline_active and time.monotonic() < deadline:
        time.sleep(0.2)
        active = watched.metric("pgwarden_connections_active")
    if active > baseline_active:
        result.failures.append(
            f"pgwarden still holds {active - baseline_active:.0f} fuzzed client connections"
        )
    backends = client_backends(cluster)
    while backends > baseline_backends and time.monotonic() < deadline:
        time.sleep(0.2)
        backends = client_backends(cluster)
    if backends > baseline_backends:
        result.failures.append(
            f"{backends - baseline_backends} PostgreSQL backends of fuzzed sessions are left"
        )
    if side is not None:
        side.stop()
        result.side_queries = side.ok
        if side.errors:
            result.failures.append(
                f"the live session beside the fuzzer failed {len(side.errors)} times: "
                f"{side.errors[0]}"
            )
        if side.ok == 0:
            result.failures.append("the live session beside the fuzzer ran no query")
    growth_mib = (result.rss_end_kib - result.rss_start_kib) / 1024
    if only is None and growth_mib > max_rss_growth_mib:
        result.failures.append(
            f"pgwarden's RSS grew {growth_mib:.1f} MiB (from {result.rss_start_kib} to "
            f"{result.rss_end_kib} KiB; limit {max_rss_growth_mib} MiB)"
        )
    logged = watched.log_failures()
    for block in logged[:3]:
        result.failures.append(f"pgwarden log: {block}")
    if len(logged) > 3:
        result.failures.append(f"pgwarden log: {len(logged) - 3} more like these")
    result.seconds = time.monotonic() - began
    return result


# --- the command ---------------------------------------------------------------------------


@contextlib.contextmanager
def pgwarden_for(cluster: Cluster, workdir: Path, mode: str) -> Iterator[Watched]:
    from loadtests import harness

    args: list[str] = []
    if mode == "policy":
        args = ["--policy", str(POLICY), "--catalog-user", "postgres",
                "--audit-db", str(workdir / "audit.db")]  # fmt: skip
    with harness.pgwarden_target(cluster, workdir, args, name=f"pgwarden-{mode}") as target:
        proc = target.process
        assert proc is not None and target.log is not None
        yield Watched(
            target.host, target.port, proc.pid, target.log,
            target.admin_ports[0] if target.admin_ports else None,
            lambda: proc.poll() is None,
        )  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.fuzz_sessions")
    p.add_argument("--iterations", type=int, default=20_000, help="mutated sessions per mode")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--modes", default="passthrough,policy")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-rss-growth-mib", type=float, default=32.0)
    p.add_argument("--only", type=int, help="replay this one iteration")
    p.add_argument("--corpus", type=Path, help="replay a saved corpus instead of recording")
    p.add_argument("--save-corpus", type=Path, help="write the recorded corpus here")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= {"passthrough", "policy"} or not args.modes:
        p.error("--modes: passthrough, policy or both")
    if not 1 <= args.iterations <= 10_000_000:
        p.error("--iterations 1..10000000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from proxy.sandbox.cluster import running_cluster

    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-fuzz-"))
    figures: dict[str, float] = {}
    failures: list[str] = []
    try:
        with running_cluster(tls=False, schema=True) as cluster:
            prepare_database(cluster)
            if args.corpus:
                corpus = load_corpus(args.corpus)
            else:
                corpus = record_corpus((cluster.host, cluster.port), workdir)
            if args.save_corpus:
                save_corpus(corpus, args.save_corpus)
            progress(
                f"fuzz: {len(corpus)} recorded sessions "
                f"({sum(len(r.data) for r in corpus)} bytes): {', '.join(r.name for r in corpus)}"
            )
            figures["recordings"] = len(corpus)
            for mode in args.modes:
                mode_dir = workdir / mode
                with pgwarden_for(cluster, mode_dir, mode) as watched:
                    res = fuzz(
                        watched, cluster, corpus, mode=mode, iterations=args.iterations,
                        seed=args.seed, concurrency=args.concurrency,
                        max_rss_growth_mib=args.max_rss_growth_mib, only=args.only,
                        side_dsn=_dsn(watched.port, "postgres").replace(
                            "application_name=fuzz", "application_name=fuzz-side"
                        ),
                    )  # fmt: skip
                progress(
                    f"fuzz {mode}: {res.iterations} sessions in {res.seconds:.0f}s, "
                    f"outcomes {dict(res.outcomes)}, mutations {dict(res.ops)}"
                )
                failures += [f"{mode}: {f}" for f in res.failures]
                figures.update(res.figures())
                results = {"mode": mode, "seed": args.seed, **res.figures(), "failures": res.failures,
                           "outcomes": dict(res.outcomes), "ops": dict(res.ops)}  # fmt: skip
                out = Path("loadtests/results")
                with contextlib.suppress(OSError):
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"fuzz_sessions_{mode}.json").write_text(json.dumps(results, indent=2))
                    if res.failures:  # keep pgwarden's log to read the failures in
                        shutil.copy(mode_dir / "pgwarden.log", out / f"fuzz_sessions_{mode}.log")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for f in failures:
        progress(f"FAILED {f}")
    figures["failures"] = len(failures)
    figures["seed"] = args.seed
    print(
        " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    )
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
