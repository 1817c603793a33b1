"""``pgwarden demo``: a throwaway PostgreSQL, pgwarden in front of it, real clients through it.

Everything is started here and removed afterwards; the demo exits 0 when every step did
what it should, and non-zero (saying which step failed) otherwise.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)

SAMPLE_DATA = """
INSERT INTO agents (agent_id, username, full_name, email, team)
SELECT i, format('agent%s', lpad(i::text, 3, '0')), format('Agent %s', i),
       format('agent%s@support.example', i), (ARRAY['billing','tech','accounts'])[1 + i % 3]
FROM generate_series(1, 5) i;
INSERT INTO customers (customer_id, full_name, email, phone, street, city, postcode, country, tier)
SELECT i, format('Customer %s', i), format('customer%s@mail.example', i),
       format('+4420%s', lpad(i::text, 7, '0')), format('%s High Street', i), 'London',
       'EC1A 1BB', 'GB', CASE WHEN i % 50 = 0 THEN 'vip' ELSE 'standard' END
FROM generate_series(1, 2000) i;
INSERT INTO tickets (ticket_id, ticket_number, customer_id, assigned_agent_id, subject, status)
SELECT i, format('TM-%s', lpad(i::text, 7, '0')), 1 + (i * 7) % 2000, 1 + i % 5,
       'Cannot log in', (ARRAY['open','pending','closed'])[1 + i % 3]
FROM generate_series(1, 3000) i;
ANALYZE;
"""


def _pgwarden_executable() -> list[str]:
    found = shutil.which("pgwarden", path=str(Path(sys.executable).parent)) or shutil.which(
        "pgwarden"
    )
    return [found] if found else [sys.executable, "-m", "proxy"]


@contextmanager
def running_proxy(args: list[str], listen_port: int) -> Iterator[subprocess.Popen[bytes]]:
    from loadtests.cluster import wait_for_port

    proc = subprocess.Popen(
        [*_pgwarden_executable(), "serve", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", listen_port, timeout=20)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


class Steps:
    """Runs the demo's steps, each printed as one line: what was done and what came back."""

    def __init__(self) -> None:
        self.table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        self.table.add_column("client")
        self.table.add_column("what it did")
        self.table.add_column("what came back")
        self.table.add_column("ms", justify="right")
        self.failures: list[str] = []

    def run(self, client: str, what: str, fn: Any, expect: Any = None) -> Any:
        start = time.perf_counter()
        try:
            result = fn()
            ok = expect is None or expect(result)
        except Exception as exc:
            result, ok = f"{type(exc).__name__}: {exc}".strip(), False
        ms = f"{(time.perf_counter() - start) * 1000:.1f}"
        shown = str(result).splitlines()[0][:70] if str(result) else ""
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        self.table.add_row(client, what, f"{mark} {shown}", ms)
        if not ok:
            self.failures.append(f"{client}: {what}: {result}")
        return result


def run_demo(serve: bool = False) -> int:
    from loadtests.cluster import ClusterError, free_port, running_cluster

    console.print(
        "[bold]pgwarden demo[/] — a throwaway PostgreSQL with a customer-support database,"
    )
    console.print("pgwarden in front of it, and real clients going through pgwarden.\n")
    try:
        cluster_cm = running_cluster(tls=True, schema=True)
        pg = cluster_cm.__enter__()
    except ClusterError as exc:
        console.print(f"[red]cannot start PostgreSQL:[/] {exc}")
        return 1
    try:
        pg.psql(SAMPLE_DATA)
        console.print(
            f"PostgreSQL {pg.psql('show server_version').strip()} on 127.0.0.1:{pg.port} "
            "(2000 customers, 3000 tickets)"
        )
        port, admin = free_port(), free_port()
        # pgwarden shows clients the same certificate PostgreSQL shows it, so SCRAM
        # channel binding holds end to end (see the README on TLS and SCRAM).
        cert, key = pg.datadir / "server.crt", pg.datadir / "server.key"
        args = [
            "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{pg.port}",
            "--admin", f"127.0.0.1:{admin}", "--tls-cert", str(cert),
            "--tls-key", str(key), "--upstream-tls", "verify-full",
            "--upstream-ca", str(pg.ca_cert), "--log-format", "console", "--log-level", "warning",
        ]  # fmt: skip
        with running_proxy(args, port) as proc:
            console.print(
                f"pgwarden on 127.0.0.1:{port} (TLS both ways), admin on 127.0.0.1:{admin}\n"
            )
            if serve:
                return _serve_forever(pg, port, admin, proc)
            steps = Steps()
            _client_steps(steps, pg, port)
            metrics = _scrape(admin)
            console.print(steps.table)
            console.print()
            _print_metrics(metrics)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            console.print(f"\npgwarden stopped on SIGTERM (exit code {code}).")
            if steps.failures or code != 0:
                console.print("[red]demo failed:[/]")
                for f in steps.failures:
                    console.print(f"  {f}")
                return 1
            console.print(
                "[green]demo complete: every client worked through pgwarden unchanged.[/]"
            )
            return 0
    finally:
        cluster_cm.__exit__(None, None, None)


def _client_steps(steps: Steps, pg: Any, port: int) -> None:
    import psycopg

    ca = str(pg.ca_cert)
    env = dict(
        os.environ, PGPASSWORD="scram-secret", PGSSLMODE="verify-full", PGSSLROOTCERT=ca,
        PGCHANNELBINDING="require",
    )  # fmt: skip

    def psql(sql: str) -> str:
        out = subprocess.run(
            ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "scram_user", "-d", "support", "-c", sql],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        if out.returncode:
            raise RuntimeError(out.stderr.strip())
        return out.stdout.strip()

    steps.run("psql", "SCRAM with channel binding over TLS; count open tickets",
              lambda: psql("select count(*) from tickets where status = 'open'"), lambda r: r == "1000")  # fmt: skip
    dsn = pg.dsn(user="md5_user", port=port, sslmode="verify-full", sslrootcert=ca)

    def lookup() -> Any:
        with psycopg.connect(dsn) as conn:
            return conn.execute(
                "select t.ticket_number, c.full_name from tickets t join customers c using (customer_id) "
                "where t.ticket_number = %s",
                ("TM-0000042",),
            ).fetchone()

    steps.run("psycopg 3", "md5 login; look up one ticket (extended protocol)", lookup,
              lambda r: r is not None and r[0] == "TM-0000042")  # fmt: skip

    def pipeline() -> Any:
        with psycopg.connect(dsn) as conn, conn.pipeline():
            curs = [conn.execute("select %s::int * 2", (i,)) for i in range(20)]
            return sum(c.fetchone()[0] for c in curs)  # type: ignore[index]

    steps.run("psycopg 3", "20 statements in one pipeline", pipeline, lambda r: r == 380)

    def cancel() -> str:
        with psycopg.connect(dsn) as conn:
            import threading

            threading.Timer(0.5, conn.cancel_safe).start()
            try:
                conn.execute("select pg_sleep(30)")
            except psycopg.errors.QueryCanceled as exc:
                return f"{exc.sqlstate} {str(exc).strip()}"
            return "not cancelled"

    steps.run(
        "psycopg 3", "cancel a 30 s pg_sleep after 0.5 s", cancel, lambda r: r.startswith("57014")
    )

    async def with_asyncpg() -> Any:
        import ssl

        import asyncpg

        ctx = ssl.create_default_context(cafile=ca)
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="trust_user", database="support", ssl=ctx
        )
        try:
            stmt = await conn.prepare("select count(*) from customers where tier = $1")
            return await stmt.fetchval("vip")
        finally:
            await conn.close()

    steps.run(
        "asyncpg",
        "trust login; prepared statement",
        lambda: asyncio.run(with_asyncpg()),
        lambda r: r == 40,
    )


def _scrape(admin: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(pgwarden_[a-z_]+(?:_total|_count|_sum)?) ([0-9.e+]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _print_metrics(metrics: dict[str, float]) -> None:
    shown = [
        ("connections", "pgwarden_connections_total"),
        ("statements", "pgwarden_statements_total"),
        ("cancels forwarded", "pgwarden_cancels_forwarded_total"),
        ("bytes from clients", "pgwarden_client_bytes_total"),
        ("bytes from PostgreSQL", "pgwarden_server_bytes_total"),
    ]
    parts = [f"{label} {int(metrics.get(key, 0))}" for label, key in shown]
    console.print("pgwarden /metrics: " + ", ".join(parts))


def _serve_forever(pg: Any, port: int, admin: int, proc: subprocess.Popen[bytes]) -> int:
    console.print("Try it by hand (Ctrl-C to stop):")
    console.print(
        f"  PGPASSWORD=scram-secret psql 'host=127.0.0.1 port={port} user=scram_user dbname=support "
        f"sslmode=verify-full sslrootcert={pg.ca_cert}'"
    )
    console.print(f"  curl http://127.0.0.1:{admin}/metrics")
    with suppress(KeyboardInterrupt):
        proc.wait()
    return 0


@click.command("demo")
@click.option("--serve", is_flag=True, help="Keep the setup running and print how to connect.")
def demo_command(serve: bool) -> None:
    """Run pgwarden against a throwaway PostgreSQL with real clients, and show what happened."""
    sys.exit(run_demo(serve=serve))
