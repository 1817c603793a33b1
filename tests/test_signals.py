"""Signals leave nothing behind: every process pgwarden started (workers, audit writers, the
demo's PostgreSQL) is gone once the process a user signalled has exited.

Processes are found by walking /proc: the descendants of the signalled process while it
runs, plus (for the demo) the PostgreSQL server, which pg_ctl detaches from its parent and
which is found by its data directory instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from proxy.sandbox.cluster import Cluster, ClusterError, find_bindir
from tests.proxyutil import ProxyProcess, pgwarden_command, wait_until

# --- /proc ---------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


Procs = dict[int, tuple[int, str]]  # pid -> (start time, command line)


def descendants(root: int) -> Procs:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[1], []).append(pid)
    out: Procs = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        st = _stat(pid)
        if st is not None:
            out[pid] = (st[2], _cmdline(pid))
        todo += children.get(pid, [])
    return out


def processes_mentioning(text: str) -> Procs:
    out: Procs = {}
    for pid in _all_pids():
        cmd = _cmdline(pid)
        st = _stat(pid)
        if text in cmd and st is not None:
            out[pid] = (st[2], cmd)
    return out


def still_running(procs: Procs) -> Procs:
    """Those of ``procs`` that are still alive (the same process: same start time)."""
    out: Procs = {}
    for pid, (start, cmd) in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[0] != "Z":
            out[pid] = (start, cmd)
    return out


def _kill_left(procs: Procs) -> None:
    for pid in still_running(procs):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# --- pgwarden demo --serve ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
def test_a_signal_to_demo_serve_stops_everything_it_started(
    tmp_path: Path, sig: signal.Signals
) -> None:
    try:
        find_bindir()
    except ClusterError as exc:
        pytest.skip(str(exc))
    # The demo's PostgreSQL lives in a temporary directory: in this one (outside tmp_path,
    # which the server's OS user may not be able to enter).
    tmp = Path(tempfile.mkdtemp(prefix="pgwarden-signals-"))
    tmp.chmod(0o755)
    out = tmp_path / "demo.out"
    env = dict(os.environ, TMPDIR=str(tmp), COLUMNS="200", NO_COLOR="1", TERM="dumb")
    with open(out, "wb") as f:
        demo = subprocess.Popen(
            [*pgwarden_command(), "demo", "--serve", "--workdir", str(tmp_path / "work")],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    procs: Procs = {}
    try:
        wait_until(
            lambda: "Try it by hand" in out.read_text(errors="replace") or demo.poll() is not None,
            240, 0.2, what="the demo to be serving",
        )  # fmt: skip
        assert demo.poll() is None, out.read_text()
        procs = descendants(demo.pid) | processes_mentioning(str(tmp))
        commands = " | ".join(cmd for _start, cmd in procs.values())
        assert "serve" in commands and "audit.sinks.sqlite_writer" in commands, commands
        assert "postgres" in commands, commands
        demo.send_signal(sig)
        assert demo.wait(120) == 0, out.read_text()
        left = wait_until(lambda: not still_running(procs), 15, what="every process to exit")
        assert left
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        left_over = still_running(procs)
        _kill_left(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not left_over


# --- pgwarden serve --workers N ----------------------------------------------------------------


def _workers(pg: Cluster, tmp_path: Path) -> tuple[ProxyProcess, Procs]:
    """``serve --workers 2`` with both workers listening.  The machine is shared: a worker's
    admin port found free can be taken before it binds it, so start again on new ports."""
    for attempt in range(3):
        p = ProxyProcess(
            pg, tmp_path / f"proxy{attempt}",
            ["--workers", "2", "--audit-db", str(tmp_path / f"audit{attempt}.db")],
            admin_ports=2,
        )  # fmt: skip
        wait_until(
            lambda: "cannot listen" in p.log()  # noqa: B023 (called in this iteration)
            or sum(e.get("event") == "listening" for e in p.log_events()) == 2,  # noqa: B023
            20, what="both workers to listen",
        )  # fmt: skip
        if "cannot listen" not in p.log():
            break
        p.stop()
    # Two workers, each with its audit writer.
    procs = wait_until(
        lambda: len(d := descendants(p.proc.pid)) == 4 and d, 20, what="2 workers, 2 writers"
    )
    return p, procs


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_to_serve_with_workers_leaves_no_child(
    pg: Cluster, tmp_path: Path, sig: signal.Signals
) -> None:
    p, procs = _workers(pg, tmp_path)
    try:
        p.signal(sig)
        assert p.proc.wait(60) == 0, p.log()
        wait_until(lambda: not still_running(procs), 15, what="every worker and writer to exit")
    finally:
        p.stop()
        _kill_left(procs)


def test_sighup_to_serve_with_workers_reloads_and_starts_no_process(
    pg: Cluster, tmp_path: Path
) -> None:
    p, procs = _workers(pg, tmp_path)
    try:
        p.signal(signal.SIGHUP)
        wait_until(
            lambda: sum(e.get("event") == "config_reloaded" for e in p.log_events()) == 2,
            20, what="both workers to reload",
        )  # fmt: skip
        assert descendants(p.proc.pid) == procs  # the same processes, no more, no fewer
        assert p.stop() == 0, p.log()
        wait_until(lambda: not still_running(procs), 15, what="every worker and writer to exit")
    finally:
        p.stop()
        _kill_left(procs)
