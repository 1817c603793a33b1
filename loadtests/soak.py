"""Soak test: many sessions, a slow reader, a long audited run, and faults injected into it.

``make soak`` = ``python -m loadtests.soak`` (``--quick`` runs every part shortened, in
about three minutes, to check the script itself).  Everything is real and on loopback: a
throwaway PostgreSQL (``max_connections`` raised to hold the sessions), ``redis-server``,
one ``pgwarden serve`` process per part with ``config/policy.yaml`` plus need-to-know
(``loadtests/agents.py``), its windows in Redis and its audit trail in SQLite at
``synchronous: FULL``, and clients that speak the protocol themselves
(``loadtests/wire.py``) so that an ErrorResponse, a connection dropped without one and a
statement that never answers are told apart.

1. **Sessions**: ``--sessions`` (2,000) clients connect through one pgwarden process and
   stay idle.  Connect time (TCP connect to ReadyForQuery) p50/p99, pgwarden's RSS per idle
   session ((RSS with them open - RSS before) / sessions), its file descriptors per session,
   and that every descriptor is given back once they close.
2. **Slow reader**: one client reads a ``--slow-rows`` (1,000,000) row result at
   ``--slow-rate`` (1 MB/s).  pgwarden stops reading PostgreSQL while a client's write
   buffer is above 256 KiB (``proxy/server.py``, ``WRITE_HIGH_WATER``); one more read from
   PostgreSQL (at most 256 KiB with uvloop) may land on top, so a slow reader holds about
   0.5 MiB in pgwarden, whatever the result size.  Checked: peak RSS - RSS before the
   statement stays under ``--slow-bound-mib``.
3. **Soak**: ``--clients`` agents' clients run the agents' workload
   (``support_agent_workload.sql``, as the helpdesk sends it: one statement per Query, the
   agent named in a sqlcommenter comment) at ``--rate`` units of work a second for
   ``--duration-min`` minutes.  pgwarden's RSS and open descriptors are sampled every
   ``--sample-s`` (60 s) from ``/proc``; their slopes (least squares, after the warm-up) are
   checked.  Every labelled read carries a ``traceparent`` of its own in its comment and
   the trail keeps full text, so the reads a client saw complete can be found in the trail
   one by one.
4. **Faults**, one after another during the soak: a client's PostgreSQL backend terminated
   (``pg_terminate_backend``), ``redis-server`` killed and restarted, the audit database
   locked by another process (``BEGIN EXCLUSIVE`` for ``--lock-s``), the SQLite writer
   process killed.  After each: every client that failed got a SQLSTATE (no connection
   dropped without an ErrorResponse, no statement without an answer), pgwarden still serves
   (labelled reads complete after the fault, a new connection works), ``pgwarden audit
   verify`` finds the chain intact, and every labelled read a client saw complete is in the
   trail.  Errors outside the fault windows count against the soak (0 allowed).

stdout: ``name=value`` figure lines, then one ``check <name>: met|NOT MET (value vs bound)``
line per check, and last the headline figures.  Full results in
``loadtests/results/soak.json``.  Exit status 0 when every check was met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loadtests import agents, harness
from loadtests.harness import Target, progress
from loadtests.redis_server import RedisServer
from loadtests.support_load import create_bulk_table
from loadtests.wire import Hung, ServerError, WireClient, WireError, slow_read
from proxy.sandbox.cluster import Cluster, find_bindir, free_port
from proxy.sandbox.supportdb import generate

RESULTS = harness.RESULTS_DIR / "soak.json"
AGENT_APP = "soak-agent-{}"


# --- what pgwarden uses, from /proc ----------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    """Peak RSS of the process's life (the kernel keeps it; no sampling can miss it)."""
    return _status_kib(pid, "VmHWM")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def writer_pids(pid: int) -> list[int]:
    """The SQLite writer processes (``audit.sinks.sqlite_writer``) pgwarden runs."""
    found = []
    for child, fields in harness.process_stats():
        if int(fields[1]) != pid:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"audit.sinks.sqlite_writer" in f.read():
                found.append(child)
    return found


def slope_per_min(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute (NaN under 2 points)."""
    if len(points) < 2:
        return math.nan
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return math.nan
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / den


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# --- checks ----------------------------------------------------------------------------------


@dataclass
class Check:
    """One pass/fail line: what was measured against what it must stay within."""

    name: str
    met: bool
    value: str
    bound: str

    def line(self) -> str:
        return f"check {self.name}: {'met' if self.met else 'NOT MET'} ({self.value}; bound {self.bound})"


@dataclass
class Report:
    figures: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, met: bool, value: str, bound: str) -> None:
        c = Check(name, bool(met), value, bound)
        self.checks.append(c)
        progress("soak: " + c.line())


# --- set-up ------------------------------------------------------------------------------------


@contextlib.contextmanager
def soak_cluster(max_connections: int) -> Iterator[Cluster]:
    """A throwaway PostgreSQL with room for every session (``cluster.py`` allows 200)."""
    tmp = Path(tempfile.mkdtemp(prefix="pgwarden-soak-pg-"))
    cluster = Cluster(root=tmp, port=free_port(), bindir=find_bindir())
    try:
        cluster.init(tls=False)
        # A later line wins in postgresql.conf.
        with open(cluster.datadir / "postgresql.conf", "a") as f:
            f.write(f"max_connections = {max_connections}\n")
        cluster.start()
        cluster.setup_roles_and_database(schema=True)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft open-file limit (pgwarden, started from here, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pgwarden_args(workdir: Path, redis_url: str, audit_db: Path) -> list[str]:
    """config/policy.yaml + need-to-know, windows in Redis, SQLite trail at FULL with full
    text (so each labelled read can be found by its own traceparent)."""
    policy = agents.agent_policy(workdir / "policy.yaml", redis_url=redis_url)
    config = {
        "audit": {
            "store_full_text": True,
            "sinks": [{"type": "sqlite", "path": str(audit_db), "synchronous": "FULL"}],
        }
    }
    conf = workdir / "pgwarden.yaml"
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    return [
        "-c", str(conf), "--policy", str(policy), "--catalog-user", "postgres",
        "--log-level", "warning",
    ]  # fmt: skip


@contextlib.contextmanager
def pgwarden(cluster: Cluster, workdir: Path, name: str, redis_url: str) -> Iterator[Target]:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    args = pgwarden_args(d, redis_url, d / "audit.db")
    with harness.pgwarden_target(cluster, d, args, name=name) as target:
        harness.check_target(target, "support")
        yield target


def audit_db(workdir: Path, name: str) -> Path:
    return workdir / name / "audit.db"


def verify_trail(db: Path) -> tuple[bool, str]:
    """``pgwarden audit verify --db`` on the (live) store: (intact, summary)."""
    proc = subprocess.run(
        [*harness.pgwarden_command(), "audit", "verify", "--db", str(db), "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        return False, f"verify exited {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]}"
    events = sum(int(c.get("events", 0)) for c in out.get("chains", []))
    return bool(out.get("intact")), f"{len(out.get('chains', []))} chain(s), {events} events"


# --- 1. sessions -------------------------------------------------------------------------------


async def open_sessions(
    host: str, port: int, n: int, concurrency: int, prefix: str
) -> tuple[list[WireClient], list[float], Counter[str]]:
    """``n`` idle sessions, ``concurrency`` connecting at a time: (clients, connect ms,
    failures by reason)."""
    sem = asyncio.Semaphore(concurrency)
    times: list[float] = []
    failures: Counter[str] = Counter()
    loop = asyncio.get_running_loop()

    async def one(i: int) -> WireClient | None:
        async with sem:
            t0 = loop.time()
            try:
                c = await WireClient.connect(
                    host, port, agents.AGENT_USER, "support",
                    application_name=f"{prefix}-{i}", timeout=60,
                )  # fmt: skip
            except ServerError as exc:
                failures[f"{exc.sqlstate} {exc}"[:120]] += 1
                return None
            except WireError as exc:
                failures[f"{type(exc).__name__}: {exc}"[:120]] += 1
                return None
            times.append((loop.time() - t0) * 1000)
            return c

    opened = [c for c in await asyncio.gather(*(one(i) for i in range(n))) if c]
    return opened, times, failures


async def sessions_part(
    target: Target, cluster: Cluster, args: argparse.Namespace, report: Report
) -> None:
    assert target.process is not None
    pid = target.process.pid
    host, port = target.host, target.port
    # A first session loads the catalog and the policy's caches: not a per-session cost.
    warm = await WireClient.connect(host, port, agents.AGENT_USER, "support")
    await warm.query("SELECT 1")
    await warm.close()
    await asyncio.sleep(1)
    # The same sessions straight to PostgreSQL first: what a connection costs without us.
    direct, direct_times, _ = await open_sessions(
        cluster.host, cluster.port, args.sessions, args.connect_concurrency, "soak-direct"
    )
    await asyncio.gather(*(c.close() for c in direct))
    await asyncio.sleep(2)
    rss0, fd0 = rss_kib(pid), fd_count(pid)
    sem = asyncio.Semaphore(args.connect_concurrency)
    t0 = time.monotonic()
    opened, times, failures = await open_sessions(
        host, port, args.sessions, args.connect_concurrency, "soak-idle"
    )
    open_s = time.monotonic() - t0
    await asyncio.sleep(2)  # let pgwarden settle (no session is mid-start-up any more)
    rss1, fd1 = rss_kib(pid), fd_count(pid)
    progress(
        f"soak: {len(opened)} sessions open in {open_s:.1f}s; pgwarden RSS {rss0} -> {rss1} KiB,"
        f" fds {fd0} -> {fd1}"
    )

    async def ping(c: WireClient) -> bool:
        async with sem:
            try:
                r = await c.query("SELECT 1", timeout=60)
                return r.rows == [[b"1"]]
            except WireError:
                return False

    answered = sum(await asyncio.gather(*(ping(c) for c in opened)))
    rss2 = rss_kib(pid)
    await asyncio.gather(*(c.close() for c in opened))
    deadline = time.monotonic() + 20
    while fd_count(pid) > fd0 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    fd3, rss3 = fd_count(pid), rss_kib(pid)
    n = max(1, len(opened))
    per_session = (rss1 - rss0) / n
    f = report.figures
    f["sessions"] = float(len(opened))
    f["sessions_open_s"] = open_s
    f["connect_p50_ms"] = percentile(times, 0.50)
    f["connect_p99_ms"] = percentile(times, 0.99)
    f["connect_max_ms"] = max(times, default=math.nan)
    f["direct_connect_p50_ms"] = percentile(direct_times, 0.50)
    f["direct_connect_p99_ms"] = percentile(direct_times, 0.99)
    f["sessions_rss_before_mib"] = rss0 / 1024
    f["sessions_rss_idle_mib"] = rss1 / 1024
    f["sessions_rss_after_select_mib"] = rss2 / 1024
    f["sessions_rss_after_close_mib"] = rss3 / 1024
    f["rss_kib_per_idle_session"] = per_session
    f["fds_per_session"] = (fd1 - fd0) / n
    f["sessions_fds_left_after_close"] = float(fd3 - fd0)
    report.details["sessions"] = {"failures": dict(failures), "answered_select_1": answered}
    report.check(
        "sessions_connected",
        len(opened) == args.sessions and answered == len(opened),
        f"{len(opened)} connected, {answered} answered SELECT 1"
        + (f", failures {dict(failures)}" if failures else ""),
        f"all {args.sessions}",
    )
    report.check(
        "connect_p99",
        f["connect_p99_ms"] <= args.connect_p99_bound_ms,
        f"p99 {f['connect_p99_ms']:.1f} ms, p50 {f['connect_p50_ms']:.1f} ms"
        f" ({args.connect_concurrency} connecting at once; straight to PostgreSQL"
        f" p99 {f['direct_connect_p99_ms']:.1f} ms, p50 {f['direct_connect_p50_ms']:.1f} ms)",
        f"<= {args.connect_p99_bound_ms:.0f} ms",
    )
    report.check(
        "rss_per_idle_session",
        per_session <= args.session_bound_kib,
        f"{per_session:.1f} KiB",
        f"<= {args.session_bound_kib:.0f} KiB",
    )
    report.check("session_fds_released", fd3 <= fd0, f"{fd3 - fd0:+d} fds after close", "<= 0")


# --- 2. slow reader ----------------------------------------------------------------------------


async def slow_reader_part(target: Target, args: argparse.Namespace, report: Report) -> None:
    assert target.process is not None
    pid = target.process.pid
    warm = await WireClient.connect(target.host, target.port, "postgres", "support")
    await warm.query("SELECT count(*) FROM loadtest.bulk_rows")
    await warm.close()
    await asyncio.sleep(1)
    base, hwm0 = rss_kib(pid), hwm_kib(pid)
    peak = base
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kib(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    sampler = asyncio.create_task(sample())
    expected_s = args.slow_rows * 110 / args.slow_rate
    t0 = time.monotonic()
    error = None
    rows = nbytes = 0
    try:
        rows, nbytes, tag = await slow_read(
            target.host, target.port, "postgres", "support", "SELECT * FROM loadtest.bulk_rows",
            rate=args.slow_rate, timeout=max(120.0, 3 * expected_s),
        )  # fmt: skip
    except WireError as exc:
        error = f"{type(exc).__name__}: {exc}"
        tag = ""
    seconds = time.monotonic() - t0
    stop.set()
    await sampler
    hwm1 = hwm_kib(pid)
    # VmHWM covers start-up too; it says something about the stream only if it moved.
    if hwm1 > hwm0:
        peak = max(peak, hwm1)
    over = (peak - base) / 1024
    f = report.figures
    f["slow_rows"] = float(rows)
    f["slow_mb"] = nbytes / 1e6
    f["slow_seconds"] = seconds
    f["slow_rate_mb_s"] = nbytes / 1e6 / seconds if seconds else math.nan
    f["slow_rss_before_mib"] = base / 1024
    f["slow_rss_peak_mib"] = peak / 1024
    f["slow_rss_peak_over_before_mib"] = over
    report.details["slow_reader"] = {"tag": tag, "error": error}
    report.check(
        "slow_reader_complete",
        error is None and rows == args.slow_rows and tag == f"SELECT {args.slow_rows}",
        error or f"{rows} rows, {nbytes / 1e6:.1f} MB in {seconds:.0f} s",
        f"{args.slow_rows} rows at <= {args.slow_rate / 1e6:g} MB/s",
    )
    report.check(
        "slow_reader_rss_bounded",
        over <= args.slow_bound_mib,
        f"peak {peak / 1024:.1f} MiB = before + {over:.2f} MiB",
        f"before + {args.slow_bound_mib:g} MiB",
    )


# --- 3 + 4. soak with faults -------------------------------------------------------------------


@dataclass
class Outcome:
    """A statement or connection attempt that did not succeed."""

    t: float
    client: int
    kind: str  # error | dropped | hung
    sqlstate: str
    message: str
    step: str


@dataclass
class Fault:
    name: str
    start: float
    end: float = 0.0
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class Load:
    """What the agents' clients did, as they saw it."""

    started: float
    outcomes: list[Outcome] = field(default_factory=list)
    # (time, traceparent) of every labelled read whose CommandComplete arrived.
    completed: list[tuple[float, str]] = field(default_factory=list)
    transactions: int = 0
    statements: int = 0
    reconnects: int = 0


def _queue_sql(aid: int, user: str, queue: int) -> str:
    return (
        "SELECT ticket_id AS tid FROM (SELECT ticket_id FROM tickets"
        f" WHERE assigned_agent_id = {aid} AND status <> 'closed'"
        f" ORDER BY ticket_id LIMIT {queue}) AS queue"
        f" ORDER BY random() LIMIT 1 /* end_user='{user}' */"
    )


def unit_of_work(
    aid: int, tid: int, tag: str, change: bool, status: str
) -> list[tuple[str, str, bool]]:
    """(step, SQL, labelled) of one unit after the queue pick, as in
    ``support_agent_workload.sql``; labelled reads carry ``traceparent`` = their tag."""
    user = agents.agent_username(aid)
    steps = [
        (
            "ticket",
            "SELECT ticket_id, ticket_number, subject, status, priority, assigned_agent_id,"
            f" updated_at FROM tickets WHERE ticket_number = 'TM-' || lpad(CAST({tid} AS text),"
            f" 7, '0') /* end_user='{user}',traceparent='{tag}-t' */",
            True,
        ),
        (
            "customer",
            "SELECT c.customer_id, c.full_name, c.email, c.phone, c.tier, c.country"
            " FROM tickets t JOIN customers c ON c.customer_id = t.customer_id"
            f" WHERE t.ticket_id = {tid} /* end_user='{user}',traceparent='{tag}-c' */",
            True,
        ),
        (
            "messages",
            "SELECT m.message_id, m.author_kind, m.agent_id, m.body, m.created_at"
            f" FROM ticket_messages m WHERE m.ticket_id = {tid} ORDER BY m.created_at DESC"
            f" LIMIT 10 /* end_user='{user}' */",
            False,
        ),
    ]
    if change:
        steps.append(
            (
                "update",
                f"UPDATE tickets SET status = '{status}', updated_at = now()"
                f" WHERE ticket_id = {tid} AND assigned_agent_id = {aid}"
                f" /* end_user='{user}' */",
                False,
            )
        )
    return steps


async def agent_client(
    i: int, target: Target, args: argparse.Namespace, n_agents: int, load: Load,
    stop: asyncio.Event,
) -> None:  # fmt: skip
    """One helpdesk connection: a random agent's unit of work, again and again, paced."""
    loop = asyncio.get_running_loop()
    rng = random.Random(args.seed * 1000 + i)
    per_client = args.rate / args.clients
    conn: WireClient | None = None
    seq = 0
    due = loop.time()

    def record(exc: WireError, step: str) -> None:
        now = loop.time() - load.started
        if isinstance(exc, ServerError):
            load.outcomes.append(Outcome(now, i, "error", exc.sqlstate, str(exc)[:300], step))
        elif isinstance(exc, Hung):
            load.outcomes.append(Outcome(now, i, "hung", "", str(exc)[:300], step))
        else:
            load.outcomes.append(Outcome(now, i, "dropped", "", str(exc)[:300], step))

    try:
        while not stop.is_set():
            due = max(due + 1 / per_client, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
            if stop.is_set():
                break
            if conn is None or conn.closed:
                try:
                    conn = await WireClient.connect(
                        target.host, target.port, agents.AGENT_USER, "support",
                        application_name=AGENT_APP.format(i), timeout=args.statement_timeout,
                    )  # fmt: skip
                    load.reconnects += 1
                except WireError as exc:
                    record(exc, "connect")
                    conn = None
                    continue
            aid = rng.randint(1, n_agents)
            user = agents.agent_username(aid)
            try:
                res = await conn.query(
                    _queue_sql(aid, user, args.agent_queue), args.statement_timeout
                )
                load.statements += 1
                if not res.rows:
                    continue
                tid = int(res.rows[0][0] or b"0")
                seq += 1
                tag = f"soak-{i}-{seq}"
                steps = unit_of_work(
                    aid, tid, tag, rng.randint(1, 4) == 1, rng.choice(("open", "pending"))
                )
                for step, sql, labelled in steps:
                    try:
                        await conn.query(sql, args.statement_timeout)
                        load.statements += 1
                        if labelled:
                            load.completed.append((loop.time() - load.started, _tag(sql)))
                    except WireError as exc:
                        if labelled and exc.completed:
                            load.completed.append((loop.time() - load.started, _tag(sql)))
                        record(exc, step)
                        break
                else:
                    load.transactions += 1
            except WireError as exc:
                record(exc, "queue")
    finally:
        if conn is not None:
            await conn.close()


_TAG = re.compile(r"traceparent='([^']+)'")


def _tag(sql: str) -> str:
    m = _TAG.search(sql)
    assert m is not None
    return m.group(1)


class TrailReader:
    """Reads the traceparents of labelled reads from the live SQLite trail, incrementally."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.last_id = 0
        self.tags: set[str] = set()

    def refresh(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute(
                "SELECT id, full_text FROM events WHERE id > ? AND kind = 'statement'"
                " AND full_text LIKE '%traceparent=%'",
                (self.last_id,),
            ).fetchall()
        finally:
            conn.close()
        for rid, text in rows:
            self.last_id = max(self.last_id, int(rid))
            m = _TAG.search(text or "")
            if m:
                self.tags.add(m.group(1))

    def missing(self, completed: Sequence[tuple[float, str]]) -> list[str]:
        # The client's list is read first: a read it saw complete was durable before its
        # CommandComplete left pgwarden, so it must be in the store by now.
        snapshot = [t for _, t in completed]
        self.refresh()
        return [t for t in snapshot if t not in self.tags]


def hold_exclusive_lock(db: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Another process takes the audit database's write lock and keeps it ``seconds``."""
    code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "c.execute('ROLLBACK')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(db), str(seconds)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # returns once the lock is held
    return proc


async def inject(
    name: str, cluster: Cluster, redis: RedisServer, pid: int, db: Path,
    args: argparse.Namespace,
) -> str:  # fmt: skip
    """Do one fault; returns what was done."""
    if name == "terminate_backend":
        out = cluster.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            f" WHERE application_name = '{AGENT_APP.format(0)}'"
        ).strip()
        return f"terminated {out} backend(s) of client 0"
    if name == "redis_restart":
        redis.stop()
        await asyncio.sleep(args.outage_s)
        await asyncio.to_thread(redis.start)
        return f"redis-server killed, restarted after {args.outage_s:g} s"
    if name == "audit_lock":
        proc = await asyncio.to_thread(hold_exclusive_lock, db, args.lock_s)
        await asyncio.to_thread(proc.wait, args.lock_s + 30)
        return f"BEGIN EXCLUSIVE held {args.lock_s:g} s by pid {proc.pid}"
    if name == "writer_kill":
        writers = writer_pids(pid)
        for w in writers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
        return f"SIGKILL to writer pid(s) {writers}"
    raise ValueError(name)


FAULTS = ("terminate_backend", "redis_restart", "audit_lock", "writer_kill")


async def probe(target: Target) -> str | None:
    """A new session through pgwarden answers; None when it did, else why not."""
    try:
        c = await WireClient.connect(target.host, target.port, "postgres", "support", timeout=30)
        r = await c.query("SELECT 1", timeout=30)
        await c.close()
        return None if r.rows == [[b"1"]] else f"unexpected answer {r.rows}"
    except WireError as exc:
        return f"{type(exc).__name__}: {exc}"


async def soak_part(
    target: Target, cluster: Cluster, redis: RedisServer, db: Path, n_agents: int,
    args: argparse.Namespace, report: Report,
) -> None:  # fmt: skip
    assert target.process is not None
    pid = target.process.pid
    loop = asyncio.get_running_loop()
    duration = args.duration_min * 60
    load = Load(started=loop.time())
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(agent_client(i, target, args, n_agents, load, stop))
        for i in range(args.clients)
    ]
    samples: list[dict[str, float]] = []

    def take_sample() -> None:
        writers = writer_pids(pid)
        s = {
            "t": loop.time() - load.started,
            "rss_kib": float(rss_kib(pid)),
            "fds": float(fd_count(pid)),
            "writer_rss_kib": float(sum(rss_kib(w) for w in writers)),
            "transactions": float(load.transactions),
            "loadavg": os.getloadavg()[0],
        }
        samples.append(s)
        progress(
            f"soak: t={s['t']:.0f}s rss={s['rss_kib'] / 1024:.1f} MiB fds={s['fds']:.0f}"
            f" writer={s['writer_rss_kib'] / 1024:.1f} MiB tx={load.transactions}"
            f" errors={len(load.outcomes)} load={s['loadavg']:.1f}"
        )

    async def sampler() -> None:
        while not stop.is_set():
            take_sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.sample_s)

    sampling = asyncio.create_task(sampler())
    trail = TrailReader(db)
    warmup = min(120.0, duration * 0.1)
    gap = (duration - warmup) / (len(FAULTS) + 1)
    faults: list[Fault] = []
    try:
        for k, name in enumerate(FAULTS):
            at = warmup + gap * k
            await asyncio.sleep(max(0.0, at - (loop.time() - load.started)))
            fault = Fault(name, loop.time() - load.started)
            progress(f"soak: fault {name} at t={fault.start:.0f}s")
            fault.checks["action"] = await inject(name, cluster, redis, pid, db, args)
            fault.end = loop.time() - load.started
            await asyncio.sleep(args.settle_s)
            await check_fault(fault, load, target, trail, db, pid, args)
            faults.append(fault)
        await asyncio.sleep(max(0.0, duration - (loop.time() - load.started)))
        take_sample()  # the last one while the clients still run
    finally:
        stop.set()
        await asyncio.wait(clients, timeout=args.statement_timeout + 10)
        for c in clients:
            c.cancel()
        await sampling
    await summarise_soak(load, samples, faults, warmup, trail, db, args, report)


async def check_fault(
    fault: Fault, load: Load, target: Target, trail: TrailReader, db: Path, pid: int,
    args: argparse.Namespace,
) -> None:  # fmt: skip
    now = asyncio.get_running_loop().time() - load.started
    during = [o for o in load.outcomes if fault.start <= o.t <= now]
    bare = [o for o in during if o.kind != "error"]
    served_after = sum(1 for t, _ in load.completed if t > fault.end)
    fault.checks.update(
        {
            "errors": len(during),
            "sqlstates": dict(Counter(o.sqlstate for o in during if o.kind == "error")),
            "messages": sorted({f"{o.sqlstate} {o.step}: {o.message}"[:200] for o in during})[:8],
            "without_sqlstate": [asdict(o) for o in bare],
            "labelled_reads_after": served_after,
            "probe": await probe(target),
        }
    )
    if fault.name == "terminate_backend":
        fault.checks["victim_sqlstates"] = sorted(
            {o.sqlstate for o in during if o.client == 0 and o.kind == "error"}
        )
    if fault.name == "writer_kill":
        fault.checks["writers_now"] = writer_pids(pid)
    intact, summary = await asyncio.to_thread(verify_trail, db)
    fault.checks["verify"] = {"intact": intact, "summary": summary}
    missing = await asyncio.to_thread(trail.missing, list(load.completed))
    fault.checks["completed_labelled_reads"] = len(load.completed)
    fault.checks["missing_from_trail"] = missing[:20]
    fault.checks["missing_count"] = len(missing)
    fault.checks["met"] = bool(
        not bare
        and served_after > 0
        and fault.checks["probe"] is None
        and intact
        and not missing
        and (fault.name != "terminate_backend" or fault.checks["victim_sqlstates"])
    )
    progress(
        f"soak: after {fault.name}: {len(during)} errors {fault.checks['sqlstates']},"
        f" {len(bare)} without SQLSTATE, {served_after} labelled reads since,"
        f" probe {fault.checks['probe'] or 'ok'}, verify {summary} intact={intact},"
        f" {len(missing)} of {len(load.completed)} completed reads missing from the trail"
    )


async def summarise_soak(
    load: Load, samples: list[dict[str, float]], faults: list[Fault], warmup: float,
    trail: TrailReader, db: Path, args: argparse.Namespace, report: Report,
) -> None:  # fmt: skip
    windows = [(f.start, f.end + args.settle_s) for f in faults]
    outside = [o for o in load.outcomes if not any(a <= o.t <= b for a, b in windows)]
    steady = [s for s in samples if s["t"] >= warmup] or samples
    rss_slope = slope_per_min([(s["t"], s["rss_kib"]) for s in steady])
    fd_slope = slope_per_min([(s["t"], s["fds"]) for s in steady])
    missing = await asyncio.to_thread(trail.missing, list(load.completed))
    intact, summary = await asyncio.to_thread(verify_trail, db)
    minutes = (samples[-1]["t"] if samples else 0) / 60
    f = report.figures
    f["soak_minutes"] = minutes
    f["soak_transactions"] = float(load.transactions)
    f["soak_statements"] = float(load.statements)
    f["soak_tx_per_s"] = load.transactions / (minutes * 60) if minutes else math.nan
    f["soak_labelled_reads"] = float(len(load.completed))
    f["soak_missing_from_trail"] = float(len(missing))
    f["soak_errors_in_faults"] = float(len(load.outcomes) - len(outside))
    f["soak_errors_outside_faults"] = float(len(outside))
    f["soak_reconnects"] = float(load.reconnects)
    f["soak_rss_first_mib"] = steady[0]["rss_kib"] / 1024 if steady else math.nan
    f["soak_rss_last_mib"] = steady[-1]["rss_kib"] / 1024 if steady else math.nan
    f["soak_fds_first"] = steady[0]["fds"] if steady else math.nan
    f["soak_fds_last"] = steady[-1]["fds"] if steady else math.nan
    f["rss_slope_kib_per_min"] = rss_slope
    f["fd_slope_per_min"] = fd_slope
    f["soak_loadavg_max"] = max((s["loadavg"] for s in samples), default=math.nan)
    report.details["soak"] = {
        "samples": samples,
        "faults": [asdict(x) for x in faults],
        "errors_outside_faults": [asdict(o) for o in outside[:50]],
        "missing_from_trail": missing[:50],
        "final_verify": summary,
    }
    report.check(
        "soak_rss_slope",
        not math.isnan(rss_slope) and rss_slope <= args.rss_slope_bound,
        f"{rss_slope:.1f} KiB/min over {len(steady)} samples after the warm-up",
        f"<= {args.rss_slope_bound:g} KiB/min",
    )
    report.check(
        "soak_fd_slope",
        not math.isnan(fd_slope) and fd_slope <= args.fd_slope_bound,
        f"{fd_slope:.2f} fds/min ({f['soak_fds_first']:.0f} -> {f['soak_fds_last']:.0f})",
        f"<= {args.fd_slope_bound:g} fds/min",
    )
    report.check(
        "soak_no_errors",
        not outside,
        f"{len(outside)} errors outside fault windows"
        + (
            f" (first: {outside[0].kind} {outside[0].sqlstate} {outside[0].message})"
            if outside
            else ""
        ),
        "0",
    )
    report.check(
        "soak_trail_complete",
        not missing and intact and bool(load.completed),
        f"{len(load.completed) - len(missing)} of {len(load.completed)} completed labelled reads"
        f" in the trail; verify: {summary}, intact={intact}",
        "all, chain intact",
    )
    for fault in faults:
        c = fault.checks
        report.check(
            f"fault_{fault.name}",
            bool(c["met"]),
            f"{c['action']}; {c['errors']} errors {c['sqlstates']},"
            f" {len(c['without_sqlstate'])} without SQLSTATE,"
            f" {c['labelled_reads_after']} labelled reads since, probe {c['probe'] or 'ok'},"
            f" verify intact={c['verify']['intact']}, {c['missing_count']} missing from trail"
            + (f", victim got {c['victim_sqlstates']}" if "victim_sqlstates" in c else ""),
            "every failure has a SQLSTATE, still serving, trail intact and complete",
        )


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="every part shortened (~3 min)")
    p.add_argument("--duration-min", type=float, default=None, help="soak minutes (30)")
    p.add_argument("--parts", default="sessions,slow,soak", help="comma-separated")
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--connect-concurrency", type=int, default=20)
    p.add_argument("--connect-p99-bound-ms", type=float, default=1000.0)
    p.add_argument("--session-bound-kib", type=float, default=64.0)
    p.add_argument("--slow-rows", type=int, default=None, help="1,000,000 (quick: 100,000)")
    p.add_argument("--slow-rate", type=float, default=1e6, help="bytes per second")
    p.add_argument("--slow-bound-mib", type=float, default=8.0)
    p.add_argument("--customers", type=int, default=None, help="20,000 (quick: 2,000)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rate", type=float, default=40.0, help="units of work a second, all clients")
    p.add_argument("--agent-queue", type=int, default=20)
    p.add_argument("--statement-timeout", type=float, default=30.0)
    p.add_argument("--sample-s", type=float, default=None, help="60 (quick: 10)")
    p.add_argument("--settle-s", type=float, default=None, help="after each fault: 15 (quick: 5)")
    p.add_argument("--outage-s", type=float, default=None, help="Redis down: 10 (quick: 3)")
    p.add_argument("--lock-s", type=float, default=5.0, help="audit database locked")
    p.add_argument("--rss-slope-bound", type=float, default=100.0, help="KiB/min")
    p.add_argument("--fd-slope-bound", type=float, default=0.1, help="fds/min")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, trail)")
    a = p.parse_args(argv)
    quick = a.quick

    def pick(value: Any, full: Any, short: Any) -> Any:
        return value if value is not None else (short if quick else full)

    a.duration_min = pick(a.duration_min, 30.0, 1.5)
    a.slow_rows = pick(a.slow_rows, 1_000_000, 100_000)
    a.customers = pick(a.customers, 20_000, 2_000)
    a.sample_s = pick(a.sample_s, 60.0, 10.0)
    a.settle_s = pick(a.settle_s, 15.0, 5.0)
    a.outage_s = pick(a.outage_s, 10.0, 3.0)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if set(a.parts) - {"sessions", "slow", "soak"}:
        p.error("parts are among sessions, slow, soak")
    if not (0.5 <= a.duration_min <= 24 * 60):
        p.error("--duration-min 0.5..1440")
    if not (1 <= a.sessions <= 10_000 and 1 <= a.clients <= 200 and a.rate > 0):
        p.error("--sessions 1..10000, --clients 1..200, --rate > 0")
    if not (1 <= a.slow_rows <= 20_000_000 and a.slow_rate >= 1e4):
        p.error("--slow-rows 1..20000000, --slow-rate >= 10000")
    return a


async def run(args: argparse.Namespace, report: Report) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-soak-"))
    # Each session is two descriptors in pgwarden (client, PostgreSQL) and one here.
    limit = raise_fd_limit(2 * args.sessions + 1024)
    report.details["fd_limit"] = limit
    try:
        with soak_cluster(args.sessions + 200) as cluster:
            progress(
                f"soak: PostgreSQL on port {cluster.port}, max_connections {args.sessions + 200}"
            )
            gen = await generate(cluster.url(), args.customers, args.seed)
            n_agents = gen.counts["agents"]
            progress(f"soak: {gen.counts['customers']} customers, {n_agents} agents")
            if "slow" in args.parts:
                await asyncio.to_thread(create_bulk_table, cluster, args.slow_rows)
            redis = RedisServer(workdir / "redis")
            redis.start()
            try:
                if "sessions" in args.parts:
                    with pgwarden(cluster, workdir, "sessions", redis.url) as target:
                        await sessions_part(target, cluster, args, report)
                if "slow" in args.parts:
                    with pgwarden(cluster, workdir, "slow", redis.url) as target:
                        await slow_reader_part(target, args, report)
                if "soak" in args.parts:
                    with pgwarden(cluster, workdir, "soak", redis.url) as target:
                        await soak_part(
                            target, cluster, redis, audit_db(workdir, "soak"), n_agents, args,
                            report,
                        )  # fmt: skip
                        log = (workdir / "soak" / "pgwarden.log").read_text(errors="replace")
                        report.details["pgwarden_log_tail"] = log[-4000:]
            finally:
                redis.stop()
    finally:
        if args.keep:
            progress(f"soak: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


HEADLINE = (
    "sessions", "connect_p99_ms", "rss_kib_per_idle_session", "slow_rss_peak_over_before_mib",
    "rss_slope_kib_per_min", "fd_slope_per_min", "soak_errors_outside_faults",
    "soak_missing_from_trail",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report()
    started = time.monotonic()
    env = harness.environment()
    try:
        asyncio.run(run(args, report))
    except Exception as exc:  # the figures so far still go out, with the failure named
        report.check("run_completed", False, f"{type(exc).__name__}: {exc}", "no exception")
    figures = {k: v for k, v in report.figures.items() if not math.isnan(v)}
    met = sum(c.met for c in report.checks)
    payload = {
        "benchmark": "soak",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "loadavg_end": os.getloadavg(),
        "elapsed_seconds": time.monotonic() - started,
        "figures": figures,
        "checks": [asdict(c) for c in report.checks],
        "details": report.details,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    progress(f"soak: results written to {args.output}")
    for line in harness.figure_lines(figures):
        print(line)
    for c in report.checks:
        print(c.line())
    head = {k: figures[k] for k in HEADLINE if k in figures}
    print(
        " ".join(f"{k}={harness.fmt(v)}" for k, v in head.items())
        + f" checks_met={met}/{len(report.checks)}"
    )
    return 0 if met == len(report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
