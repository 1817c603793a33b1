"""Shared pieces of the load tests: targets to measure, pgbench runs, figure lines.

A *target* is one way for a client to reach the same PostgreSQL: directly, through
PgBouncer, through pgwarden, or through the bare Python forwarder.  Each is started as its
own process (so its CPU use is its own, as in production), listens on 127.0.0.1 and a free
port, and is stopped with SIGTERM when the measurement ends.
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.sandbox.cluster import Cluster, find_bindir, free_port, free_ports, wait_for_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Every target is reached over TCP without TLS: libpq's default sslmode=prefer would
# negotiate TLS with PostgreSQL (directly and through the byte forwarders) but not with a
# PgBouncer that has no certificate, and the comparison would then measure encryption.
CLIENT_ENV = {"PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}


class TargetUnavailable(RuntimeError):
    """A target cannot be started here (tool missing, command not implemented yet)."""


def progress(message: str) -> None:
    """One line of progress on stderr (stdout is kept for the results)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Target:
    """A running endpoint that speaks the PostgreSQL protocol."""

    name: str
    host: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    user: str = "postgres"  # the role pgbench connects as
    # pgwarden's admin listeners, one per worker (/metrics of each).
    admin_ports: tuple[int, ...] = ()


def pgbench_binary() -> str:
    """Path of pgbench, preferring the one next to the server binaries."""
    with contextlib.suppress(Exception):
        candidate = find_bindir() / "pgbench"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("pgbench")
    if not found:
        raise TargetUnavailable("pgbench not found: install postgresql-contrib (make sysdeps)")
    return found


def psql_binary() -> str:
    """Path of psql, preferring the one next to the server binaries."""
    with contextlib.suppress(Exception):
        candidate = find_bindir() / "psql"
        if candidate.exists():
            return str(candidate)
    return shutil.which("psql") or "psql"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    # Each target runs in its own session, so the whole group (runuser and its child) stops.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _spawn(cmd: Sequence[str], log: Path, name: str, port: int) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise TargetUnavailable(
                    f"{name} exited with code {proc.returncode} at start:\n"
                    + log.read_text(errors="replace")[-2000:]
                )
            try:
                wait_for_port("127.0.0.1", port, timeout=0.2)
                return proc
            except OSError:
                if time.monotonic() > deadline:
                    raise TargetUnavailable(
                        f"{name} did not listen on port {port} in 15 s"
                    ) from None
    except BaseException:
        _stop(proc)
        raise


@contextlib.contextmanager
def direct_target(cluster: Cluster) -> Iterator[Target]:
    """PostgreSQL itself, for the baseline."""
    yield Target("direct", cluster.host, cluster.port)


@contextlib.contextmanager
def pgbouncer_target(cluster: Cluster, workdir: Path, pool_size: int = 20) -> Iterator[Target]:
    """A PgBouncer in session pool mode in front of ``cluster``.

    PgBouncer refuses to run as root, so as root it runs as the ``postgres`` OS user (the
    same one the cluster runs as); its directory is handed to that user.
    """
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise TargetUnavailable("pgbouncer not found: install it (make sysdeps)")
    d = workdir / "pgbouncer"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # auth_type=trust still wants every user listed; support_app runs the agents' workload.
    (d / "userlist.txt").write_text('"postgres" ""\n"support_app" ""\n')
    (d / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"* = host={cluster.host} port={cluster.port}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {d / 'userlist.txt'}",
                "pool_mode = session",
                "max_client_conn = 200",
                f"default_pool_size = {pool_size}",
                "server_tls_sslmode = disable",
                "client_tls_sslmode = disable",
                "ignore_startup_parameters = extra_float_digits",
                f"logfile = {d / 'pgbouncer.log'}",
                f"pidfile = {d / 'pgbouncer.pid'}",
                "log_connections = 0",
                "log_disconnections = 0",
                "",
            ]
        )
    )
    cmd = [binary, str(d / "pgbouncer.ini")]
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in [workdir, d, *d.iterdir()]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = _spawn(cmd, d / "stdout.log", "pgbouncer", port)
    try:
        yield Target("pgbouncer", "127.0.0.1", port, proc, d / "pgbouncer.log")
    finally:
        _stop(proc)


def pgwarden_command() -> list[str]:
    """How to run the ``pgwarden`` command of this environment."""
    beside = Path(sys.executable).parent / "pgwarden"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("pgwarden")
    if found:
        return [found]
    return [sys.executable, "-c", "from proxy.cli import main; main()"]


def pgwarden_serve_available() -> str | None:
    """None when ``pgwarden serve`` exists here, else the reason it cannot be measured."""
    try:
        proc = subprocess.run(
            [*pgwarden_command(), "serve", "--help"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pgwarden could not be run: {exc}"
    if proc.returncode != 0:
        return "'pgwarden serve' is not implemented in this checkout yet"
    return None


@contextlib.contextmanager
def pgwarden_target(
    cluster: Cluster,
    workdir: Path,
    extra_args: Sequence[str] = (),
    name: str = "pgwarden",
    user: str = "postgres",
    workers: int = 1,
) -> Iterator[Target]:
    """``pgwarden serve`` in front of ``cluster`` (pass-through unless ``extra_args`` add a
    policy), with ``workers`` processes sharing its port."""
    reason = pgwarden_serve_available()
    if reason:
        raise TargetUnavailable(reason)
    port = free_port()
    # Worker i's admin listener is on the admin port + i: take a run of free ports.
    admin = free_ports(workers, avoid=port)
    cmd = [
        *pgwarden_command(), "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"{cluster.host}:{cluster.port}",
        "--admin", f"127.0.0.1:{admin}",
    ]  # fmt: skip
    if workers > 1:
        cmd += ["--workers", str(workers)]
    if cluster.ca_cert is None:
        # The benchmark cluster runs without TLS.  Say so rather than leave pgwarden on its
        # default 'prefer': with a policy, pgwarden's catalog connection did not fall back
        # to plain TCP when PostgreSQL refused the SSL upgrade (seen on main at 06:30 UTC).
        cmd += ["--upstream-tls", "disable"]
    cmd += list(extra_args)
    workdir.mkdir(parents=True, exist_ok=True)
    proc = _spawn(cmd, workdir / "pgwarden.log", "pgwarden", port)
    admin_ports = tuple(range(admin, admin + workers))
    try:
        if workers > 1:
            # The port answers as soon as one worker listens; measure only once all do.
            _wait_for_workers(proc, admin_ports, workdir / "pgwarden.log")
        else:
            _check_healthz(admin)
        yield Target(name, "127.0.0.1", port, proc, workdir / "pgwarden.log", user, admin_ports)
    finally:
        _stop(proc)


def _check_healthz(admin_port: int) -> None:
    # The admin endpoint is part of the contract, but a missing one must not void the
    # throughput measurement: report it and carry on.
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=5) as r:
            if r.status != 200:
                progress(f"warning: pgwarden /healthz answered {r.status}")
    except OSError as exc:
        progress(f"warning: pgwarden /healthz not reachable: {exc}")


def _wait_for_workers(
    proc: subprocess.Popen[bytes], admin_ports: Sequence[int], log: Path, timeout: float = 20
) -> None:
    waiting = set(admin_ports)
    deadline = time.monotonic() + timeout
    while waiting:
        if proc.poll() is not None:
            raise TargetUnavailable(
                f"pgwarden exited with code {proc.returncode} while its workers started:\n"
                + log.read_text(errors="replace")[-2000:]
            )
        if time.monotonic() > deadline:
            raise TargetUnavailable(
                f"pgwarden workers on admin ports {sorted(waiting)} did not answer /healthz"
            )
        for admin in sorted(waiting):
            url = f"http://127.0.0.1:{admin}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    waiting.discard(admin)
        time.sleep(0.05)


def pgwarden_refusals(target: Target) -> int | None:
    """Statements the target has refused so far, over all its workers (None when it is not
    pgwarden or its /metrics do not say)."""
    if not target.admin_ports:
        return None
    values = pgwarden_metric(target, "pgwarden_policy_blocks_total") + pgwarden_metric(
        target, "pgwarden_audit_failures_total"
    )
    return None if any(math.isnan(v) for v in values) else int(sum(values))


def pgwarden_metric(target: Target, name: str) -> list[float]:
    """The value of the unlabelled Prometheus metric ``name`` on each of the target's
    workers (NaN for a worker whose /metrics does not answer or lacks it)."""
    values = []
    for admin in target.admin_ports:
        value = math.nan
        try:
            url = f"http://127.0.0.1:{admin}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith(name + " "):
                        value = float(line.split()[1])
                        break
        except OSError as exc:
            progress(f"warning: pgwarden /metrics on port {admin} not reachable: {exc}")
        values.append(value)
    return values


@contextlib.contextmanager
def bare_target(cluster: Cluster, workdir: Path, uvloop: bool = True) -> Iterator[Target]:
    """The bare Python byte forwarder (``loadtests.bare_forwarder``) in front of ``cluster``."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "loadtests.bare_forwarder",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"{cluster.host}:{cluster.port}",
    ]  # fmt: skip
    if not uvloop:
        cmd.append("--no-uvloop")
    workdir.mkdir(parents=True, exist_ok=True)
    proc = _spawn(cmd, workdir / "bare.log", "bare forwarder", port)
    try:
        yield Target("bare", "127.0.0.1", port, proc, workdir / "bare.log")
    finally:
        _stop(proc)


def session_cpu_seconds(sid: int) -> float:
    """User+system CPU seconds of every live process in session ``sid`` (Linux /proc).

    Targets start in their own session, so this counts the proxy and any children (runuser
    and PgBouncer).  CPU per transaction hardly moves with other load on the machine,
    unlike tps, so it is the steadier measure of what a proxy costs.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for _pid, fields in process_stats():
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name) of every live process:
    fields[1] is the parent, fields[3] the session, fields[11:13] user and system ticks."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the fields after it are fixed.
        yield int(entry), stat[stat.rindex(")") + 2 :].split()


# --- pgbench ------------------------------------------------------------------------------


@dataclass
class PgbenchResult:
    """One pgbench run."""

    target: str
    mode: str
    workload: str
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    seconds: float
    percentiles_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    # 1-minute load average after the run (the benchmark's own processes included).
    loadavg: float = 0.0
    round: int = 0
    # CPU the target's own processes used per transaction (None for direct PostgreSQL).
    proxy_cpu_us_per_tx: float | None = None
    # pgbench clients that stopped on an SQL error (a refusal among them): pgbench 15 has
    # no way to go on after one, so the run is incomplete and carries an error as well.
    aborted_clients: int = 0
    # Statements pgwarden refused during the run (policy blocks and labelled reads refused
    # for want of a durable audit sink, from its /metrics); None when not read.
    refusals: int | None = None


_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_TX = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_ABORTED = re.compile(r"client \d+ (?:script \d+ )?aborted in command")


def parse_pgbench(output: str) -> tuple[float, float, int, int]:
    """(tps, average latency ms, transactions, failed transactions) from pgbench's summary."""
    tps = _TPS.search(output)
    lat = _LAT.search(output)
    tx = _TX.search(output)
    failed = _FAILED.search(output)
    if not (tps and lat and tx):
        raise ValueError("pgbench output has no summary:\n" + output[-2000:])
    return (
        float(tps.group(1)),
        float(lat.group(1)),
        int(tx.group(1)),
        int(failed.group(1)) if failed else 0,
    )


def latency_percentiles(log_files: Sequence[Path]) -> dict[str, float]:
    """p50/p90/p95/p99/max latency in ms from pgbench per-transaction logs (``--log``)."""
    values: list[int] = []
    for path in log_files:
        with open(path) as f:
            for line in f:
                parts = line.split()
                # client_id transaction_no time_us script_no epoch epoch_us
                if len(parts) >= 3 and parts[2].isdigit():
                    values.append(int(parts[2]))
    if not values:
        return {}
    values.sort()

    def pick(q: float) -> float:
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] / 1000.0

    return {
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": values[-1] / 1000.0,
    }


def run_pgbench(
    target: Target,
    database: str,
    *,
    mode: str,
    workload: str,
    args: Sequence[str],
    duration: int,
    clients: int,
    jobs: int,
    user: str | None = None,
    percentiles: bool = False,
) -> PgbenchResult:
    """Run pgbench once against ``target`` and parse its summary.

    ``args`` selects the workload (``-S``, or ``-f script -D n=...``).  Failures are
    returned as a result with ``error`` set, so one broken run does not lose a whole
    benchmark.
    """
    logdir = Path(tempfile.mkdtemp(prefix="pgwarden-pgbench-")) if percentiles else None
    cmd = [
        pgbench_binary(), "-n", "-M", mode, "-c", str(clients), "-j", str(jobs),
        "-T", str(duration), "-h", target.host, "-p", str(target.port), "-U", user or target.user,
        *args,
    ]  # fmt: skip
    if logdir is not None:
        cmd += ["--log", f"--log-prefix={logdir / 'tx'}"]
    cmd.append(database)
    env = {**os.environ, **CLIENT_ENV}
    sid = target.process.pid if target.process is not None else None
    cpu0 = session_cpu_seconds(sid) if sid else 0.0
    t0 = time.monotonic()
    aborted = 0
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=duration + 60, check=False
        )
        output = proc.stdout + proc.stderr
        aborted = len(_ABORTED.findall(proc.stderr))
        if proc.returncode != 0:
            raise ValueError(f"pgbench exited with {proc.returncode}:\n{output[-2000:]}")
        tps, lat, tx, failed = parse_pgbench(proc.stdout)
        cpu = (session_cpu_seconds(sid) - cpu0) / tx * 1e6 if sid and tx else None
        pcts = latency_percentiles(sorted(logdir.iterdir())) if logdir else {}
        return PgbenchResult(
            target.name, mode, workload, tps, lat, tx, failed, time.monotonic() - t0, pcts,
            loadavg=os.getloadavg()[0], proxy_cpu_us_per_tx=cpu,
        )  # fmt: skip
    except (ValueError, subprocess.TimeoutExpired) as exc:
        return PgbenchResult(
            target.name, mode, workload, 0.0, 0.0, 0, 0, time.monotonic() - t0, error=str(exc),
            aborted_clients=aborted,
        )  # fmt: skip
    finally:
        if logdir is not None:
            shutil.rmtree(logdir, ignore_errors=True)


def pgbench_init(cluster: Cluster, database: str, scale: int) -> float:
    """Create ``database`` and fill it with ``pgbench -i -s scale``; returns seconds taken."""
    cluster.psql(f"CREATE DATABASE {database};", database="postgres")
    t0 = time.monotonic()
    subprocess.run(
        [pgbench_binary(), "-i", "-q", "-s", str(scale), "-h", str(cluster.socket_dir),
         "-p", str(cluster.port), "-U", "postgres", database],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    cluster.psql("VACUUM ANALYZE;", database=database)
    # The agents' account reads them too (the policy-enforcing target runs pgbench as it).
    cluster.psql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO support_app;", database=database)
    return time.monotonic() - t0


def check_target(target: Target, database: str, user: str | None = None) -> None:
    """One query through the target, so a broken target fails loudly before measuring."""
    proc = subprocess.run(
        [psql_binary(), "-X", "-At", "-h", target.host, "-p", str(target.port), "-U", user or target.user,
         "-d", database, "-c", "SELECT 1"],
        capture_output=True, text=True, env={**os.environ, **CLIENT_ENV}, timeout=30,
    )  # fmt: skip
    if proc.returncode != 0 or proc.stdout.strip() != "1":
        raise TargetUnavailable(
            f"{target.name}: 'SELECT 1' failed: {proc.stderr.strip() or proc.stdout.strip()}"
        )


# --- results ------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Median of the successful measurements (NaN when there are none)."""
    good = [v for v in values if v > 0 and not math.isnan(v)]
    return statistics.median(good) if good else math.nan


def paired_ratios(
    samples: Sequence[tuple[str, str, int, float]], pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """Per-round ratios of (target, kind, round, value) samples, and their median.

    Within one round the runs are seconds apart, so each round's ratio cancels slow drifts
    of machine load; the spread of the per-round ratios shows how far to trust the ratio of
    medians that the figure lines report.
    """
    values = {(t, k, r): v for t, k, r, v in samples if v > 0}
    kinds = sorted({k for _, k, _, _ in samples})
    rounds = sorted({r for _, _, r, _ in samples})
    out: dict[str, Any] = {}
    for kind in kinds:
        for a, b in pairs:
            per_round = [
                values[a, kind, r] / values[b, kind, r]
                for r in rounds
                if (a, kind, r) in values and (b, kind, r) in values
            ]
            if per_round:
                out[f"{a}_vs_{b}_{kind}"] = {
                    "median": median(per_round),
                    "each_round": per_round,
                }
    return out


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either side was not measured."""
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def fmt(value: float) -> str:
    """A figure as printed on a ``name=value`` line."""
    if math.isnan(value):
        return "nan"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def figure_lines(figures: Mapping[str, float]) -> list[str]:
    """``name=value`` lines, one per figure, in insertion order."""
    return [f"{name}={fmt(value)}" for name, value in figures.items()]


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Other work on the machine skews every figure; the load average says how much.
        "loadavg": os.getloadavg(),
    }
    with contextlib.suppress(Exception):
        info["pgbench"] = subprocess.run(
            [pgbench_binary(), "--version"], capture_output=True, text=True
        ).stdout.strip()
    with contextlib.suppress(Exception):
        info["pgbouncer"] = (
            subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True)
            .stdout.splitlines()[0]
            .strip()
        )
    with contextlib.suppress(Exception):
        import uvloop

        info["uvloop"] = getattr(uvloop, "__version__", "?")
    return info


def split_args(value: str | None) -> list[str]:
    """Shell-style splitting for options that pass arguments through to a target."""
    return shlex.split(value) if value else []


def write_chart(path: Path, title: str, groups: dict[str, dict[str, float]], unit: str) -> None:
    """A self-contained HTML page with one horizontal bar chart (inline SVG) per group.

    ``groups`` maps a group title (e.g. a pgbench mode) to {bar label: value}; NaN values
    are drawn as missing, never as zero.
    """
    import html
    import math

    bar_h, gap, label_w, width = 22, 6, 170, 760
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em}text{font-size:12px}</style>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for group, values in groups.items():
        finite = [v for v in values.values() if not math.isnan(v)]
        top = max(finite, default=1.0) or 1.0
        height = len(values) * (bar_h + gap) + gap
        parts.append(f"<h2>{html.escape(group)}</h2>")
        parts.append(f"<svg width='{width}' height='{height}' role='img'>")
        for i, (name, value) in enumerate(values.items()):
            y = gap + i * (bar_h + gap)
            parts.append(
                f"<text x='{label_w - 8}' y='{y + bar_h * 0.7}' text-anchor='end'>"
                f"{html.escape(name)}</text>"
            )
            if math.isnan(value):
                parts.append(f"<text x='{label_w}' y='{y + bar_h * 0.7}'>not measured</text>")
                continue
            w = max(1.0, (width - label_w - 120) * value / top)
            parts.append(
                f"<rect x='{label_w}' y='{y}' width='{w:.1f}' height='{bar_h}' fill='#4a7bb7'/>"
                f"<text x='{label_w + w + 6:.1f}' y='{y + bar_h * 0.7}'>{value:,.0f} {unit}</text>"
            )
        parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
