"""Fail-closed audit trail through the real proxy: what happens to labelled reads when the
audit store breaks under them (writer killed, store locked, PostgreSQL store terminated,
sinks too slow), and what the trail holds after pgwarden itself is killed.

The promise under test: a labelled read is either reported complete with its event and
ledger persisted, or refused with SQLSTATE 58030 and a sentence saying why -- within
``durable_timeout_s`` -- and the next reads work again once the store is back, without a
restart; ``pgwarden audit verify`` afterwards tells the truth.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess, audit_cli, audit_keys, wait_until
from tests.support_data import DB, policy_naming_as_dba

DURABLE_TIMEOUT = 2.0
# Slack for a busy shared 2-core machine on top of durable_timeout_s.
SLACK = 3.0


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return audit_keys(tmp_path)


def start(
    pg: Cluster, tmp_path: Path, keys: tuple[Path, Path], name: str = "proxy", **audit: Any
) -> tuple[ProxyProcess, Path]:
    db = tmp_path / f"{name}-audit.db"
    section: dict[str, Any] = {
        "sinks": [{"type": "sqlite", "path": str(db)}],
        "ledger_key": str(keys[0]),
        "signing_key": str(keys[1]),
        "durable_timeout_s": DURABLE_TIMEOUT,
    }
    section.update(audit)
    # Scenarios tag their statements with an end-user name of their own, as the DBA.
    policy = policy_naming_as_dba(tmp_path)
    config = {"policy_file": str(policy), "catalog_user": "postgres", "audit": section}
    return ProxyProcess(pg, tmp_path / name, config=config), db


def dsn(p: ProxyProcess, user: str = "support_app") -> str:
    return p.pg.dsn(user=user, port=p.port, dbname=DB, sslmode="disable")


def writer_pids(p: ProxyProcess) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(p.proc.pid), "-f", "sqlite_writer"], capture_output=True, text=True
    )
    return [int(x) for x in out.stdout.split()]


@dataclass
class Outcome:
    end_user: str
    key: int
    ok: bool
    seconds: float
    sqlstate: str | None = None
    message: str = ""


def labelled_read(conn: psycopg.Connection[Any], end_user: str, key: int) -> Outcome:
    sql = f"SELECT customer_id, email FROM customers WHERE customer_id = {key} /* end_user='{end_user}' */"
    t0 = time.monotonic()
    try:
        rows = conn.execute(sql).fetchall()
    except psycopg.Error as exc:
        return Outcome(end_user, key, False, time.monotonic() - t0, exc.sqlstate, str(exc).strip())
    assert rows == [(key, f"customer{key}@mail.example")]
    return Outcome(end_user, key, True, time.monotonic() - t0)


class Readers:
    """Clients reading one labelled row at a time, each read under its own end user so its
    event can be found afterwards."""

    def __init__(self, p: ProxyProcess, n: int) -> None:
        self.p = p
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        try:
            with psycopg.connect(dsn(self.p), autocommit=True) as conn:
                n = 0
                while not self.stop.is_set():
                    n += 1
                    o = labelled_read(conn, f"r{i}-{n}", 1 + (i * 37 + n) % 300)
                    with self._lock:
                        self.outcomes.append(o)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for_more(self, n: int) -> None:
        target = self.count() + n
        wait_until(lambda: self.count() >= target, what=f"{n} more reads")


def assert_fail_closed(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        assert o.seconds < DURABLE_TIMEOUT + SLACK, o
        if not o.ok:
            assert o.sqlstate == "58030", o
            assert "cannot be recorded in the audit trail" in o.message, o


def statement_events(db: Path) -> dict[str, list[sqlite3.Row]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT e.*, (SELECT sum(n) FROM ledger l WHERE l.chain_id = e.chain_id "
            "AND l.seq = e.seq AND l.kind = 'k2') AS ledger_n FROM events e "
            "WHERE kind = 'statement' AND end_user IS NOT NULL AND relations LIKE '%customers%'"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, list[sqlite3.Row]] = {}
    for r in rows:
        out.setdefault(r["end_user"], []).append(r)
    return out


def assert_reads_recorded(db: Path, outcomes: list[Outcome], completed_only: bool = False) -> None:
    evs = statement_events(db)
    for o in outcomes:
        if o.ok or not completed_only:
            got = evs.get(o.end_user)
            assert got, f"the read {o} has no event"
            assert len(got) == 1, [dict(ev) for ev in got]  # one event per statement
            (ev,) = got
            assert ev["rows"] == 1 and ev["ledger_n"] == 1, dict(ev)


def verify(db: Path, keys: tuple[Path, Path]) -> dict[str, Any]:
    out = audit_cli("verify", "--db", str(db), "--public-key", str(keys[1]) + ".pub", "--json")
    assert out.stdout, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def read_ok(p: ProxyProcess, end_user: str, key: int) -> Outcome:
    with psycopg.connect(dsn(p), autocommit=True) as conn:
        return labelled_read(conn, end_user, key)


# --- 1. the SQLite writer process is killed ---------------------------------------------------


def test_kill_9_of_the_sqlite_writer_fails_reads_closed_and_a_new_writer_takes_over(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    p, db = start(pg, tmp_path, keys, "writer-killed")
    try:
        with Readers(p, 3) as readers:
            for _ in range(3):
                readers.wait_for_more(20)
                for pid in writer_pids(p):
                    os.kill(pid, signal.SIGKILL)
            readers.wait_for_more(20)
        assert not readers.errors, readers.errors
        assert_fail_closed(readers.outcomes)
        assert read_ok(p, "after-kill", 5).ok
        assert writer_pids(p), "no new writer process"
    finally:
        p.stop()
    # The refused reads' rows had gone over the wire before their CommandComplete was held:
    # once the new writer is up, their events are stored too, and the chain has no hole that
    # verify would have to call a deletion.
    assert_reads_recorded(db, readers.outcomes)
    result = verify(db, keys)
    assert result["intact"], result


# --- 2. the SQLite store is locked by another process -----------------------------------------


class Webhook:
    """An HTTP receiver for the alert webhook, in a thread of the test."""

    def __init__(self) -> None:
        import http.server

        bodies: list[dict[str, Any]] = []
        self.bodies = bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers["Content-Length"])
                bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of_type(self, t: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b.get("type") == t]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_locked_sqlite_store_fails_labelled_reads_closed_and_recovers_after_the_lock(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    hook = Webhook()
    p, db = start(pg, tmp_path, keys, "locked", alerts=[{"type": "webhook", "url": hook.url}])
    try:
        with psycopg.connect(dsn(p), autocommit=True) as conn:
            assert labelled_read(conn, "before-lock", 1).ok
            locker = sqlite3.connect(db, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            locker.execute("INSERT INTO events (v, chain_id, seq, prev_hash, hash, ts, kind) "
                           "VALUES (1, 'locker', 1, '', '', '', 'x')")  # fmt: skip
            try:
                refused = [labelled_read(conn, f"locked-{i}", 2 + i) for i in range(3)]
                assert_fail_closed(refused)
                assert not any(o.ok for o in refused), refused
                # Unlabelled work goes on.
                assert conn.execute("SELECT count(*) FROM products").fetchone() == (1,)
                wait_until(lambda: hook.of_type("sink_failure"), what="a sink_failure alert")
                time.sleep(DURABLE_TIMEOUT)  # longer than durable_timeout_s in all
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            # No restart: the next reads work again.
            after = wait_until(
                lambda: (o := labelled_read(conn, "after-lock", 9)).ok and o,
                timeout=DURABLE_TIMEOUT + SLACK + 5,
                what="a labelled read to work after the lock",
            )
            assert after.ok
    finally:
        p.stop()
        hook.close()
    assert_reads_recorded(db, [*refused, after])
    result = verify(db, keys)
    assert result["intact"], result


# --- 4. a stuck sink fills the bounded queue --------------------------------------------------


@pytest.mark.parametrize("overflow", ["block", "raise"])
def test_a_stuck_sink_with_a_full_queue_fails_reads_closed_in_time(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path], overflow: str
) -> None:
    # A tiny queue and a long stall allowance: the queue fills long before the trail gives
    # up on the stuck writer.
    p, _db = start(pg, tmp_path, keys, f"stuck-{overflow}", overflow=overflow, queue_size=2,
                   max_batch=1, sink_queue_batches=1, sink_stall_s=60)  # fmt: skip
    try:
        with psycopg.connect(dsn(p), autocommit=True) as conn:
            assert labelled_read(conn, "before", 1).ok
        (writer,) = writer_pids(p)
        os.kill(writer, signal.SIGSTOP)
        try:
            outcomes: list[Outcome] = []

            def one(i: int) -> None:
                with psycopg.connect(dsn(p), autocommit=True) as c:
                    outcomes.append(labelled_read(c, f"stuck-{i}", 10 + i))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(DURABLE_TIMEOUT + SLACK + 10)
            assert len(outcomes) == 8, "some clients hung on the full audit queue"
            assert_fail_closed(outcomes)
            assert not any(o.ok for o in outcomes)
        finally:
            os.kill(writer, signal.SIGCONT)
    finally:
        p.stop()


# --- 3. the PostgreSQL store's backend is terminated or the store is unavailable ---------------


def _terminate_store_backends(pg: Cluster, name: str) -> None:
    pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        database="postgres",
    )


def pg_verify(url: str, keys: tuple[Path, Path]) -> dict[str, Any]:
    out = audit_cli("verify", "--dsn", url, "--public-key", str(keys[1]) + ".pub", "--json")
    assert out.stdout, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def pg_statement_events(pg: Cluster, name: str) -> dict[str, int]:
    out = pg.psql(
        "SELECT e.end_user, count(*) FROM pgwarden_audit.events e "
        "JOIN pgwarden_audit.ledger l ON l.chain_id = e.chain_id AND l.seq = e.seq "
        "WHERE e.kind = 'statement' AND e.end_user IS NOT NULL GROUP BY 1",
        database=name,
    )
    return {u: int(n) for u, n in (line.split("|") for line in out.split())}


def test_a_terminated_postgresql_store_reconnects_and_fails_closed_when_it_is_the_last(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    name = "failclosed_store"
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE); CREATE DATABASE {name};",
            database="postgres")  # fmt: skip
    url = pg.url(database=name)
    # The PostgreSQL store alone: it is the last durable sink.
    p, _db = start(pg, tmp_path, keys, "pgstore", sinks=[{"type": "postgres", "dsn": url}])
    outcomes: list[Outcome] = []
    try:
        with psycopg.connect(dsn(p), autocommit=True) as conn:
            outcomes.append(labelled_read(conn, "pg-0", 1))
            # Its backend is terminated between statements: the sink reconnects, and the
            # read completes (or at worst is refused), never hangs.
            for i in range(1, 4):
                _terminate_store_backends(pg, name)
                outcomes.append(labelled_read(conn, f"pg-{i}", 1 + i))
            assert outcomes[-1].ok, outcomes
            # The store refuses connections for a while: reads fail closed in time.
            pg.psql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false", database="postgres")
            try:
                _terminate_store_backends(pg, name)
                refused = [labelled_read(conn, f"pg-down-{i}", 10 + i) for i in range(2)]
                assert not any(o.ok for o in refused), refused
                outcomes += refused
                assert conn.execute("SELECT count(*) FROM products").fetchone() == (1,)
            finally:
                pg.psql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true", database="postgres")
            after = wait_until(
                lambda: (o := labelled_read(conn, "pg-after", 20)).ok and o,
                timeout=DURABLE_TIMEOUT + SLACK + 5,
                what="a labelled read once the store is back",
            )
            outcomes.append(after)
        assert_fail_closed(outcomes)
    finally:
        p.stop()
    stored = pg_statement_events(pg, name)
    for o in outcomes:
        assert stored.get(o.end_user) == 1, (o, stored)
    result = pg_verify(url, keys)
    assert result["intact"], result


# --- 5. kill -9 of pgwarden: what clients saw completed is in the trail ----------------------


def test_kill_9_during_a_burst_of_labelled_reads_from_several_clients(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    p, db = start(pg, tmp_path, keys, "burst")
    with Readers(p, 4) as readers:
        readers.wait_for_more(150)
        for pid in [p.proc.pid, *writer_pids(p)]:
            os.kill(pid, signal.SIGKILL)
        p.proc.wait(10)
    p.stop()
    completed = [o for o in readers.outcomes if o.ok]
    assert len(completed) >= 150
    assert_reads_recorded(db, completed)
    result = verify(db, keys)
    # The chain is intact up to the crash (no final checkpoint: the process was killed).
    assert result["intact"], result
    # who-saw finds the customer each completed read returned.
    for o in completed[-3:]:
        who = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keys[0]),
                        "--table", "customers", "--key", str(o.key), "--json")  # fmt: skip
        assert who.returncode == 0, who.stderr
        assert o.end_user in who.stdout, (o, who.stdout)


def test_kill_9_during_a_100k_row_labelled_read(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    p, db = start(pg, tmp_path, keys, "big")
    sql = (
        "SELECT c.customer_id, c.email FROM customers c, generate_series(1, 250) g "
        "WHERE c.customer_id > 0 /* end_user='{}' */"
    )
    try:
        with psycopg.connect(dsn(p, "postgres"), autocommit=True) as conn:
            rows = conn.execute(sql.format("big-1")).fetchall()  # type: ignore[arg-type]
            assert len(rows) == 100_000
            # The next one is killed mid-stream.
            cur = conn.cursor()
            t = threading.Timer(0.3, lambda: [os.kill(x, signal.SIGKILL)
                                              for x in [p.proc.pid, *writer_pids(p)]])  # fmt: skip
            t.start()
            with pytest.raises(psycopg.OperationalError):
                for _ in range(20):
                    cur.execute(sql.format("big-2")).fetchall()  # type: ignore[arg-type]
            t.join()
    finally:
        p.proc.wait(10)
        p.stop()
    conn2 = sqlite3.connect(db)
    try:
        got = conn2.execute(
            "SELECT e.rows, e.ledger_count, (SELECT sum(n) FROM ledger l WHERE l.chain_id = "
            "e.chain_id AND l.seq = e.seq AND l.kind = 'k2') FROM events e "
            "WHERE e.end_user = 'big-1'"
        ).fetchall()
    finally:
        conn2.close()
    assert got == [(100_000, 100_000, 100_000)]
    assert verify(db, keys)["intact"]
    for key in (1, 400):
        who = audit_cli("who-saw", "--db", str(db), "--ledger-key", str(keys[0]),
                        "--table", "customers", "--key", str(key), "--json")  # fmt: skip
        assert who.returncode == 0 and "big-1" in who.stdout, who


def test_a_store_locked_under_steady_traffic_keeps_every_event_for_after_the_lock(
    pg: Cluster, enforce_db: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    # The writer waits out SQLite's 5 s busy timeout per attempt while reads keep coming:
    # the sink's own queue fills and stays full for longer than sink_stall_s.
    p, db = start(pg, tmp_path, keys, "locked-busy", sink_stall_s=0.5, sink_queue_batches=1)
    try:
        with Readers(p, 3) as readers:
            readers.wait_for_more(10)
            locker = sqlite3.connect(db, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            locker.execute("INSERT INTO events (v, chain_id, seq, prev_hash, hash, ts, kind) "
                           "VALUES (1, 'locker', 1, '', '', '', 'x')")  # fmt: skip
            try:
                time.sleep(7)
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            wait_until(
                lambda: readers.outcomes[-1].ok, timeout=DURABLE_TIMEOUT + SLACK + 5,
                what="reads to work again after the lock",
            )  # fmt: skip
            readers.wait_for_more(10)
        assert not readers.errors, readers.errors
        assert_fail_closed(readers.outcomes)
        assert sum(not o.ok for o in readers.outcomes) >= 3
    finally:
        p.stop()
    assert_reads_recorded(db, readers.outcomes)
    result = verify(db, keys)
    assert result["intact"], result
