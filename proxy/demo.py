"""``pgwarden demo``: the 2019 insider case, replayed against pgwarden.

A throwaway PostgreSQL holds a generated customer-support database with planted canary
customers; pgwarden runs in front of it with the shipped policy (``config/policy.yaml``) and
an audit trail in SQLite.  Then, with real clients:

1. every client works unchanged through pgwarden (psql with SCRAM channel binding over TLS,
   psycopg extended protocol and pipeline, asyncpg prepared statements, cancel);
2. a day of normal agent work passes untouched;
3. insiders try to take the customer list every way the policy foresees, and each is shown
   what their client received: the refusal, or how many rows got out before the cut;
4. the responder's view: alerts, who read most, exactly which customers left (checked
   against what the clients counted), and the hash chain verified.

The demo exits 0 when everything behaved as it should and 1 otherwise, naming the step.
``--serve`` builds the same setup and keeps it running for trying it by hand.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

# A terminal gets its own width; a log (make demo in CI, a test) gets one wide enough that
# each attempt and its refusal stay readable.
console = Console(
    highlight=False,
    width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 132,
)

CUSTOMERS = 20_000
SEED = 7
POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"


class DemoFailed(Exception):
    """A step did not behave as it should; the message names the step."""


def _pgwarden_executable() -> list[str]:
    found = shutil.which("pgwarden", path=str(Path(sys.executable).parent)) or shutil.which(
        "pgwarden"
    )
    return [found] if found else [sys.executable, "-c", "from proxy.cli import main; main()"]


def _pgwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_pgwarden_executable(), *args], capture_output=True, text=True, check=False
    )


@contextmanager
def running_proxy(config: Path, listen_port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``pgwarden serve -c CONFIG`` until the block ends (SIGTERM, then wait)."""
    from proxy.sandbox.cluster import wait_for_port

    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [*_pgwarden_executable(), "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=logf,
        )
    try:
        try:
            wait_for_port("127.0.0.1", listen_port, timeout=30)
        except OSError:
            raise DemoFailed(
                f"setup: pgwarden did not start; its log:\n{log.read_text()}"
            ) from None
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- what a client got back ---------------------------------------------------------------------


@dataclass
class Outcome:
    """What one attempt's client actually received."""

    rows: int = 0
    customers: set[int] = field(default_factory=set)
    sqlstate: str | None = None
    message: str | None = None

    @property
    def refused(self) -> bool:
        return self.sqlstate is not None

    def error_line(self) -> str:
        return f"{self.sqlstate} {self.message}"


def _catch(outcome: Outcome, fn: Callable[[], None]) -> Outcome:
    import psycopg

    try:
        fn()
    except psycopg.Error as exc:
        outcome.sqlstate = exc.sqlstate
        outcome.message = exc.diag.message_primary or str(exc).strip()
    return outcome


class Agent:
    """One person working through the helpdesk account (db user ``support_app``), named as
    the support tool would name them: in a sqlcommenter comment on every statement, or once
    per connection with ``SET pgwarden.end_user``."""

    def __init__(self, dsn: str, name: str, by_set: bool = False) -> None:
        import psycopg

        self.name = name
        self.by_set = by_set
        self.conn = psycopg.connect(dsn, autocommit=True)
        if by_set:
            self.conn.execute(f"SET pgwarden.end_user = '{name}'")

    def sql(self, text: str) -> str:
        return text if self.by_set else f"{text} /* end_user='{self.name}' */"

    def read(self, text: str, params: Any = None, id_col: int | None = 0) -> Outcome:
        """Run a query in single-row mode, counting every row as it arrives: a result cut
        off at the limit still delivered its first rows, and those count as gone."""
        out = Outcome()

        def run() -> None:
            cur = self.conn.cursor()
            for row in cur.stream(self.sql(text), params):
                out.rows += 1
                if id_col is not None:
                    out.customers.add(int(row[id_col]))

        return _catch(out, run)

    def close(self) -> None:
        self.conn.close()


# --- the demo ----------------------------------------------------------------------------------


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pg: Any = None
        self.port = 0
        self.admin = 0
        self.canaries: list[Any] = []
        self.received: dict[str, set[int]] = {}  # end user -> customer ids their client got
        self.started = time.monotonic()
        self.normal_day_end = ""  # ISO time: the end of act 2, what act 5 learns from

    # --- setup -------------------------------------------------------------------------------

    def build_database(self) -> None:
        from proxy.sandbox.supportdb import generate

        t0 = time.monotonic()
        report = asyncio.run(generate(self.pg.url(), customers=CUSTOMERS, seed=SEED))
        self.canaries = report.canaries
        planted = {c.email for c in report.canaries}
        policy = yaml.safe_load(POLICY.read_text())
        listed = {
            v for r in policy["rules"] if "canary" in r for v in r["canary"].get("values", [])
        }
        if not planted <= listed:
            raise DemoFailed(f"setup: canaries {sorted(planted - listed)} are not in the policy")
        version = self.pg.psql("show server_version").strip().split()[0]
        console.print(
            f"PostgreSQL {version}, database [bold]support[/]: {report.counts['customers']} "
            f"customers, {report.counts['tickets']} tickets, {report.counts['ticket_messages']} "
            f"messages (seed {SEED}, built in {time.monotonic() - t0:.1f} s), "
            f"{len(report.canaries)} canary customers planted"
        )

    def write_config(self) -> Path:
        from proxy.sandbox.cluster import free_port

        for args in (("--ledger", "--out", "ledger.key"), ("--out", "audit-sign.key")):
            done = _pgwarden("audit", "keygen", *args[:-1], str(self.workdir / args[-1]))
            if done.returncode != 0:
                raise DemoFailed(f"setup: pgwarden audit keygen failed: {done.stderr.strip()}")
        self.port, self.admin = free_port(), free_port()
        pg = self.pg
        # pgwarden shows clients the same certificate PostgreSQL shows it, so SCRAM channel
        # binding holds end to end (see the README on TLS and SCRAM).
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "upstream": f"127.0.0.1:{pg.port}",
            "admin_listen": f"127.0.0.1:{self.admin}",
            "client_tls": {
                "cert": str(pg.datadir / "server.crt"),
                "key": str(pg.datadir / "server.key"),
            },
            "upstream_tls": {"mode": "verify-full", "ca": str(pg.ca_cert)},
            "policy_file": str(POLICY),
            "catalog_user": "postgres",
            "audit": {
                "sinks": [{"type": "sqlite", "path": str(self.audit_db)}],
                "ledger_key": str(self.workdir / "ledger.key"),
                "signing_key": str(self.workdir / "audit-sign.key"),
                "checkpoint_file": str(self.workdir / "checkpoints.jsonl"),
            },
            "log_level": "warning",
            "log_format": "console",
        }
        path = self.workdir / "pgwarden.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    @property
    def audit_db(self) -> Path:
        return self.workdir / "audit.db"

    def dsn(self, user: str) -> str:
        return str(
            self.pg.dsn(
                user=user, port=self.port, sslmode="verify-full", sslrootcert=str(self.pg.ca_cert)
            )
        )

    def agent(self, name: str, by_set: bool = False) -> Agent:
        return Agent(self.dsn("support_app"), name, by_set)

    # --- act 1: every client works -------------------------------------------------------------

    def act_clients(self) -> None:
        import psycopg

        heading("1", "Every PostgreSQL client works through pgwarden unchanged")
        pg = self.pg
        table = _table("client", "what it did", "what came back")
        failures: list[str] = []

        def step(client: str, what: str, fn: Callable[[], Any], want: Any) -> None:
            try:
                got = fn()
                ok = got == want
                shown = str(got) if ok else f"{got} (expected {want})"
            except Exception as exc:
                ok, shown = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            table.add_row(client, what, f"{_mark(ok)} {shown}")
            if not ok:
                failures.append(f"{client}: {what}: {shown}")

        def direct(sql: str) -> str:
            return str(pg.psql(sql).strip())

        env = dict(
            os.environ, PGPASSWORD="scram-secret", PGSSLMODE="verify-full",
            PGSSLROOTCERT=str(pg.ca_cert), PGCHANNELBINDING="require",
        )  # fmt: skip

        def psql() -> str:
            out = subprocess.run(
                ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(self.port), "-U", "scram_user",
                 "-d", "support", "-c", "select count(*) from tickets where status = 'open'"],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            if out.returncode:
                raise RuntimeError(out.stderr.strip())
            return out.stdout.strip()

        open_tickets = direct("select count(*) from tickets where status = 'open'")
        step("psql", "SCRAM-SHA-256-PLUS (channel binding) over TLS: count open tickets",
             psql, open_tickets)  # fmt: skip

        dsn = self.dsn("md5_user")

        def lookup() -> Any:
            with psycopg.connect(dsn) as conn:
                row = conn.execute(
                    "select t.ticket_number, t.status from tickets t where t.ticket_number = %s",
                    ("TM-0000042",),
                ).fetchone()
                return tuple(row) if row else None

        status = direct("select status from tickets where ticket_number = 'TM-0000042'")
        step("psycopg 3", "md5 login; one ticket by number (extended protocol)", lookup,
             ("TM-0000042", status))  # fmt: skip

        def pipeline() -> int:
            with psycopg.connect(dsn) as conn, conn.pipeline():
                curs = [conn.execute("select %s::int * 2", (i,)) for i in range(20)]
                return sum(c.fetchone()[0] for c in curs)  # type: ignore[index]

        step("psycopg 3", "20 statements in one pipeline", pipeline, 380)

        def cancel() -> str:
            with psycopg.connect(dsn) as conn:
                threading.Timer(0.5, conn.cancel_safe).start()
                try:
                    conn.execute("select pg_sleep(30)")
                except psycopg.errors.QueryCanceled as exc:
                    return f"{exc.sqlstate} {exc.diag.message_primary}"
                return "not cancelled"

        step("psycopg 3", "cancel a 30 s pg_sleep after 0.5 s", cancel,
             "57014 canceling statement due to user request")  # fmt: skip

        async def with_asyncpg() -> int:
            import ssl

            import asyncpg

            ctx = ssl.create_default_context(cafile=str(pg.ca_cert))
            conn = await asyncpg.connect(
                host="127.0.0.1", port=self.port, user="trust_user", database="support", ssl=ctx
            )
            try:
                stmt = await conn.prepare("select count(*) from customers where tier = $1")
                return int(await stmt.fetchval("vip"))
            finally:
                await conn.close()

        vips = int(direct("select count(*) from customers where tier = 'vip'"))
        step("asyncpg", "trust login; prepared statement, binary results",
             lambda: asyncio.run(with_asyncpg()), vips)  # fmt: skip
        console.print(table)
        if failures:
            raise DemoFailed("act 1 (clients): " + "; ".join(failures))

    # --- act 2: a day of normal work -------------------------------------------------------------

    def act_normal_day(self) -> None:
        heading("2", "A day of normal agent work passes untouched")
        rows = self.pg.psql(
            "select a.agent_id, t.ticket_number from agents a join lateral ("
            " select ticket_number from tickets where assigned_agent_id = a.agent_id"
            " and status = 'open' order by ticket_id limit 4) t on true"
            " where a.agent_id <= 4 order by 1, 2"
        )
        by_agent: dict[int, list[str]] = {}
        for line in rows.split():
            aid, number = line.split("|")
            by_agent.setdefault(int(aid), []).append(number)
        people = ["alice", "bob", "carol", "dave"]
        statements = blocked = customers = 0
        problems: list[str] = []
        for name, (agent_id, tickets) in zip(people, sorted(by_agent.items()), strict=False):
            a = self.agent(name, by_set=name in ("bob", "dave"))
            try:
                work: list[tuple[str, Any]] = [
                    ("SELECT ticket_number, subject, status, priority FROM tickets "
                     "WHERE assigned_agent_id = %s AND status = 'open' ORDER BY updated_at DESC LIMIT 10",
                     (agent_id,)),
                ]  # fmt: skip
                for number in tickets:
                    work.append(
                        ("SELECT t.ticket_number, c.customer_id, c.full_name, c.email, c.phone "
                         "FROM tickets t JOIN customers c USING (customer_id) WHERE t.ticket_number = %s",
                         (number,))
                    )  # fmt: skip
                    work.append(
                        ("SELECT m.author_kind, m.body FROM ticket_messages m JOIN tickets t USING (ticket_id) "
                         "WHERE t.ticket_number = %s ORDER BY m.created_at", (number,))
                    )  # fmt: skip
                for text, params in work:
                    out = a.read(text, params, id_col=1 if "c.customer_id" in text else None)
                    statements += 1
                    customers += len(out.customers)
                    self.received.setdefault(name, set()).update(out.customers)
                    if out.refused:
                        blocked += 1
                        problems.append(f"{name}: {out.error_line()}")

                def update(a: Agent = a, number: str = tickets[0]) -> None:
                    a.conn.execute(a.sql(
                        "UPDATE tickets SET status = 'pending', updated_at = now() WHERE ticket_number = %s"
                    ), (number,))  # fmt: skip

                out = _catch(Outcome(), update)
                statements += 1
                if out.refused:
                    blocked += 1
                    problems.append(f"{name}: status update: {out.error_line()}")
            finally:
                a.close()
        ok = blocked == 0
        console.print(
            f"{_mark(ok)} {', '.join(people)}: {statements} statements (their open tickets, the "
            f"customer of each ticket by ticket number, the messages, a status update) — "
            f"{customers} customer lookups, [bold]{blocked} blocked[/]. [dim](alice and carol are "
            "named in a sqlcommenter comment on each statement, bob and dave by SET "
            "pgwarden.end_user.)[/]"
        )
        if problems:
            raise DemoFailed("act 2 (normal work): refused: " + "; ".join(problems))

    # --- act 3: the insiders -----------------------------------------------------------------

    def act_insiders(self) -> None:
        heading("3", "Insiders try to take the customer list")
        console.print(
            "[dim]Each insider works through the same helpdesk account as the agents. The policy "
            "quarantines a person after 5 blocks in 10 minutes, and an hour's budget is 200 "
            "customers, so each insider shows a few of the ways.[/]"
        )
        table = _table("who", "tried", "what their client got")
        failures: list[str] = []

        def show(
            who: str, tried: str, out: Outcome, expect: str, rule: str = "", note: str = ""
        ) -> None:
            """expect: 'refused' (no rows), 'cut' (rows, then the error), 'rows' (no error)."""
            if expect == "refused":
                ok = out.refused and out.rows == 0 and rule in (out.message or "")
                got = f"[red]refused[/] {out.error_line()}"
            elif expect == "cut":
                ok = out.refused and out.rows > 0 and rule in (out.message or "")
                got = f"[yellow]{out.rows} rows, then cut:[/] {out.error_line()}"
            else:
                ok = not out.refused
                got = f"[yellow]{out.rows} rows[/]" + (
                    f"; {out.error_line()}" if out.refused else ""
                )
            table.add_row(who, tried, f"{_mark(ok)} {got}{note}")
            if not ok:
                failures.append(f"{who}: {tried}: {got}")
            self.received.setdefault(who, set()).update(out.customers)

        # mallory: the export shapes, then a sweep by ticket number that trips a canary.
        m = self.agent("mallory")
        try:
            show("mallory", "SELECT * FROM customers", m.read("SELECT * FROM customers"),
                 "refused", "agent-statement-shapes")  # fmt: skip
            show("mallory", "SELECT email FROM customers (no WHERE)",
                 m.read("SELECT email FROM customers", id_col=None), "refused",
                 "agent-statement-shapes")  # fmt: skip

            def copy() -> Outcome:
                out = Outcome()

                def run() -> None:
                    cur = m.conn.cursor()
                    with cur.copy(m.sql(
                        "COPY (SELECT full_name, email, phone FROM customers WHERE customer_id > 0) TO STDOUT"
                    )) as cp:  # fmt: skip
                        for _ in cp.rows():
                            out.rows += 1

                return _catch(out, run)

            show("mallory", "COPY (SELECT full_name, email, phone ...) TO STDOUT", copy(),
                 "refused", "agent-statement-shapes")  # fmt: skip
            show("mallory", "SELECT json_agg(email) FROM customers WHERE customer_id > 0  "
                 "-- every email in one row",
                 m.read("SELECT json_agg(email) FROM customers WHERE customer_id > 0", id_col=None),
                 "refused", "agent-statement-shapes")  # fmt: skip
            canary = self.canaries[0]
            assert canary.ticket_number is not None
            lo, hi = _around(canary.ticket_number, 7)
            show("mallory", f"customers of tickets {lo} .. {hi} (a sweep)",
                 m.read("SELECT c.customer_id, c.full_name, c.email, c.phone FROM tickets t "
                        "JOIN customers c USING (customer_id) "
                        "WHERE t.ticket_number BETWEEN %s AND %s ORDER BY t.ticket_number",
                        (lo, hi)), "cut", "canary-customers",
                 note=f" — cut before canary customer {canary.customer_id} ({canary.email}): "
                 "[red]mallory is quarantined[/]")  # fmt: skip
            show("mallory", "the customer of one of her own tickets",
                 m.read("SELECT c.customer_id, c.email FROM tickets t JOIN customers c "
                        "USING (customer_id) WHERE t.ticket_number = 'TM-0000042'"),
                 "refused", "quarantine")  # fmt: skip
        finally:
            m.close()

        # trudy: stays under the per-statement limit and pages through.
        t = self.agent("trudy")
        try:
            show("trudy", "SELECT customer_id, name, email FROM reporting.customer_contacts "
                 "WHERE customer_id > 0",
                 t.read("SELECT customer_id, name, email FROM reporting.customer_contacts "
                        "WHERE customer_id > 0 ORDER BY customer_id"),
                 "cut", "agent-statement-rows")  # fmt: skip

            def named_cursor() -> Outcome:
                out = Outcome()

                def run() -> None:
                    with t.conn.transaction(), t.conn.cursor(name="sweep") as cur:
                        cur.itersize = 5
                        cur.execute(t.sql("SELECT customer_id, full_name, email, phone FROM customers "
                                          "WHERE customer_id > 0 ORDER BY customer_id"))  # fmt: skip
                        for row in cur:
                            out.rows += 1
                            out.customers.add(int(row[0]))

                return _catch(out, run)

            show("trudy", "server-side cursor (DECLARE ... FETCH 5 at a time)", named_cursor(),
                 "cut", "agent-statement-rows")  # fmt: skip
            pages = Outcome()
            n = 0
            while n < 50:
                page = t.read("SELECT customer_id, full_name, email, phone FROM customers "
                              "WHERE customer_id > 0 ORDER BY 1 LIMIT 20 OFFSET %s", (20 * n,))  # fmt: skip
                pages.rows += page.rows
                pages.customers |= page.customers
                n += 1
                if page.refused:
                    pages.sqlstate, pages.message = page.sqlstate, page.message
                    break
            show("trudy", f"pages: ... WHERE customer_id > 0 ORDER BY 1 LIMIT 20 OFFSET n "
                 f"({n} pages)", pages, "cut", "agent-hourly-records")  # fmt: skip
        finally:
            t.close()

        # eve: a few rows per statement, many statements.
        e = self.agent("eve")
        try:
            trickle = Outcome()
            n = 0
            start = 5001
            while n < 100:
                got = e.read("SELECT customer_id, full_name, email, phone FROM customers "
                             "WHERE customer_id BETWEEN %s AND %s", (start + 5 * n, start + 5 * n + 4))  # fmt: skip
                trickle.rows += got.rows
                trickle.customers |= got.customers
                n += 1
                if got.refused:
                    trickle.sqlstate, trickle.message = got.sqlstate, got.message
                    break
            show("eve", f"a trickle: 5 customers per statement ({n} statements)", trickle, "cut",
                 "agent-hourly-records")  # fmt: skip
            one = "SELECT customer_id, phone FROM customers WHERE customer_id = %s"
            tries = [e.read(one, (7001 + k,)) for k in range(4)]
            refused = [
                x for x in tries if x.refused and "agent-hourly-records" in (x.message or "")
            ]
            table.add_row(
                "eve", "keeps trying, one customer at a time (4 more)",
                f"{_mark(len(refused) == 4)} [red]refused[/] 4 times by agent-hourly-records: "
                "5 blocks in 10 minutes",
            )  # fmt: skip
            if len(refused) != 4:
                failures.append("eve: 4 more tries were not all refused by agent-hourly-records")
            show("eve", "one more", e.read(one, (7100,)), "refused", "quarantine")
        finally:
            e.close()
        console.print(table)
        if failures:
            raise DemoFailed("act 3 (insiders): " + "; ".join(failures))

    # --- act 4: the responder ------------------------------------------------------------------

    # --- act 5: the helpdesk account learns its statements ----------------------------------

    def act_allow_list(self) -> None:
        """The helpdesk account's allow-list, learned from act 2's normal day; then an
        insider on that account, under every volume limit, refused by shape."""
        from proxy.sandbox.cluster import free_port

        heading("5", "The helpdesk account learns what its application sends")
        allow = self.workdir / "helpdesk-allow.yaml"
        until = self.normal_day_end
        learned = _pgwarden(
            "policy", "learn", "--policy", str(POLICY), "--subject", "helpdesk",
            "--db", str(self.audit_db), "--until", until, "--out", str(allow),
        )  # fmt: skip
        if learned.returncode != 0:
            raise DemoFailed(f"act 5: pgwarden policy learn failed: {learned.stderr.strip()}")
        console.print(f"[bold]$ pgwarden policy learn --subject helpdesk --until {until[11:19]}[/]")
        console.print(f"  {learned.stdout.strip()}")
        policy = yaml.safe_load(POLICY.read_text())
        policy["rules"].append({
            "id": "helpdesk-known-statements", "subjects": ["helpdesk"],
            "allow_statements": str(allow), "action": "block",
        })  # fmt: skip
        policy_path = self.workdir / "policy-with-allow-list.yaml"
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        config = yaml.safe_load((self.workdir / "pgwarden.yaml").read_text())
        config.update(
            policy_file=str(policy_path), listen=f"127.0.0.1:{(port := free_port())}",
            admin_listen=f"127.0.0.1:{free_port()}",
        )  # fmt: skip
        config.pop("audit", None)
        config_path = self.workdir / "pgwarden-allow-list.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        failures: list[str] = []
        table = _table("who", "sent", "what their client got")
        with running_proxy(config_path, port, self.workdir / "pgwarden-allow-list.log"):
            self.port, saved = port, self.port
            try:
                number = self.pg.psql(
                    "select ticket_number from tickets where assigned_agent_id = 1 "
                    "and status = 'open' order by ticket_id limit 1"
                ).strip()
                alice = self.agent("alice")
                try:
                    out = alice.read(
                        "SELECT t.ticket_number, c.customer_id, c.full_name, c.email, c.phone "
                        "FROM tickets t JOIN customers c USING (customer_id) WHERE t.ticket_number = %s",
                        (number,), id_col=1,
                    )  # fmt: skip
                finally:
                    alice.close()
                table.add_row("alice", "her ticket's customer, as the tool asks",
                              f"{_mark(not out.refused)} {out.rows} row")  # fmt: skip
                if out.refused:
                    failures.append(f"alice's learned lookup refused: {out.error_line()}")
                refused = got = 0
                first = ""
                for i in range(6):
                    # A new end-user name every two statements, 5 customers each: under the
                    # row limit, every person's budget and the account's.
                    who = self.agent(f"temp{i // 2}")
                    try:
                        out = who.read(
                            "SELECT customer_id, full_name, email FROM customers "
                            "WHERE customer_id BETWEEN %s AND %s", (100 + 5 * i, 104 + 5 * i),
                        )  # fmt: skip
                    finally:
                        who.close()
                    got += len(out.customers)
                    refused += out.refused
                    first = first or (out.message or "")
                table.add_row(
                    "an insider on the helpdesk account",
                    "6 small customer reads, a new end-user name every 2",
                    f"{_mark(refused == 6 and got == 0)} {refused} refused, {got} customers: "
                    f"{first[:90]}",
                )
                if refused != 6 or got:
                    failures.append(f"insider by shape: {refused}/6 refused, {got} customers")
            finally:
                self.port = saved
        console.print(table)
        drift = _pgwarden(
            "policy", "drift", "--policy", str(policy_path), "--db", str(self.audit_db), "--json"
        )
        shapes = json.loads(drift.stdout) if drift.returncode == 0 else []
        console.print(
            f"[bold]$ pgwarden policy drift[/]: {len(shapes)} statement shapes the helpdesk "
            "account sent after the normal day that its list does not hold (act 3's insiders), "
            "for the weekly review"
        )
        if drift.returncode != 0 or not shapes:
            failures.append(f"policy drift: {drift.stderr.strip() or 'no shapes'}")
        if failures:
            raise DemoFailed("act 5 (allow-list): " + "; ".join(failures))

    def act_responder(self) -> None:
        heading("4", "The responder's view (pgwarden audit ...)")
        db = ["--db", str(self.audit_db)]
        failures: list[str] = []

        alerts = self._audit_json("search", *db, "--kind", "alert", "--since", "1h")
        kinds: dict[str, int] = {}
        for a in alerts:
            kinds[a.get("verdict") or "?"] = kinds.get(a.get("verdict") or "?", 0) + 1
        console.print("[bold]alerts:[/] " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        for a in sorted(alerts, key=lambda a: str(a.get("ts"))):
            if a.get("verdict") in ("canary", "quarantine"):
                console.print(
                    f"  {str(a.get('ts'))[11:19]} [red]{a.get('verdict')}[/] {a.get('message')}"
                )
        for want in ("block", "canary", "quarantine"):
            if not kinds.get(want):
                failures.append(f"no {want} alert in the audit trail")

        console.print("[bold]$ pgwarden audit top --since 1h[/]  (who read the most labelled data)")
        top = _table("person", "labelled rows", "distinct records", "statements", "blocks")
        for r in self._audit_json("top", *db, "--since", "1h", "--limit", "8"):
            top.add_row(*(str(r.get(k)) for k in (
                "person", "labelled_rows", "distinct_records", "statements", "blocks")))  # fmt: skip
        console.print(top)

        table = _table("end user", "records-seen (ledger)", "their clients received", "")
        for who in ("mallory", "trudy", "eve", "alice"):
            out_csv = self.workdir / f"{who}-customers.csv"
            res = self._audit_json(
                "records-seen", *db, "--ledger-key", str(self.workdir / "ledger.key"),
                "--end-user", who, "--table", "customers", "--since", "1h",
                "--out", str(out_csv), "--resolve-dsn", self.pg.url(),
            )  # fmt: skip
            count = res.get("distinct_records") if isinstance(res, dict) else None
            with open(out_csv, newline="") as fh:
                keys = {int(r["key"]) for r in csv.DictReader(fh) if r.get("key")}
            client = self.received.get(who, set())
            ok = count == len(client) and keys == client
            table.add_row(who, f"{count} customers", f"{len(client)} customers",
                          f"{_mark(ok)} {'the same customers' if ok else 'MISMATCH'}")  # fmt: skip
            if not ok:
                failures.append(
                    f"records-seen --end-user {who}: ledger {count} ({len(keys)} resolved), "
                    f"client {len(client)}"
                )
        console.print("[bold]$ pgwarden audit records-seen --end-user WHO --table customers[/]")
        console.print(table)

        ver = _pgwarden(
            "audit", "verify", *db, "--public-key", str(self.workdir / "audit-sign.key.pub"),
            "--checkpoints", str(self.workdir / "checkpoints.jsonl"),
        )  # fmt: skip
        line = (ver.stdout.strip() or ver.stderr.strip()).splitlines()
        console.print(
            f"[bold]$ pgwarden audit verify[/] {_mark(ver.returncode == 0)} "
            + (line[0] if line else "")
        )
        if ver.returncode != 0:
            failures.append(f"audit verify: {ver.stdout.strip()} {ver.stderr.strip()}")

        html = self.workdir / "incident.html"
        rep = _pgwarden("audit", "report", *db, "--html", str(html), "--since", "1h")
        if rep.returncode == 0:
            console.print(f"[bold]$ pgwarden audit report --html[/] {html}")
        else:
            failures.append(f"audit report failed: {rep.stderr.strip()}")
        if failures:
            raise DemoFailed("act 4 (responder): " + "; ".join(failures))

    def _audit_json(self, *args: str) -> Any:
        done = _pgwarden("audit", *args, "--json")
        if done.returncode != 0:
            raise DemoFailed(f"act 4 (responder): pgwarden audit {args[0]} failed: {done.stderr}")
        return json.loads(done.stdout)

    # --- serve -------------------------------------------------------------------------------

    def serve_forever(self, proc: subprocess.Popen[bytes]) -> int:
        pg, db, key = self.pg, self.audit_db, self.workdir / "ledger.key"
        conn = (
            f"host=127.0.0.1 port={self.port} dbname=support sslmode=verify-full "
            f"sslrootcert={pg.ca_cert}"
        )
        canaries = ", ".join(str(c.customer_id) for c in self.canaries)
        pgwarden = " ".join(_pgwarden_executable())
        console.print(
            f"""
Try it by hand (Ctrl-C stops everything):

  [bold]as an agent[/] (20 labelled rows a statement, 200 customers an hour, no bulk shapes):
    psql '{conn} user=support_app'
      SET pgwarden.end_user = 'alice';
      SELECT c.full_name, c.email FROM tickets t JOIN customers c USING (customer_id)
        WHERE t.ticket_number = 'TM-0000042';
      SELECT * FROM customers;
  [bold]as the analyst[/] (contact data masked):
    psql '{conn} user=analyst' -c "SELECT full_name, email, phone FROM customers WHERE tier = 'vip' LIMIT 5"
  [bold]as the DBA[/] (not limited, audited):
    psql '{conn} user=postgres' -c 'SELECT count(*) FROM customers'
  [bold]the audit trail[/] (written as you go):
    {pgwarden} audit top --db {db} --since 1h
    {pgwarden} audit records-seen --db {db} --ledger-key {key} --end-user alice --table customers
  canary customers (reading one quarantines the reader): {canaries}
  metrics: curl http://127.0.0.1:{self.admin}/metrics""",
            soft_wrap=True,
        )
        with suppress(KeyboardInterrupt):
            proc.wait()
        return 0


def _around(ticket: str, span: int) -> tuple[str, str]:
    n = int(ticket.split("-", 1)[1])
    return f"TM-{n - span:07d}", f"TM-{n + span:07d}"


def heading(n: str, title: str) -> None:
    console.print()
    console.rule(f"[bold]{n}. {title}[/]", align="left")


def _table(*cols: str) -> Table:
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for c in cols:
        table.add_column(c, overflow="fold")
    return table


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[red]✗[/]"


def _stop_on_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP end the demo the way Ctrl-C does: every context it opened
    closes, so pgwarden (and its audit writer) and the throwaway PostgreSQL stop too.
    Without this, SIGTERM or a closed terminal killed only the demo process itself and left
    the rest running.  Only the first signal counts: a second one must not cut the clean-up
    short (a no-op handler, not SIG_IGN, which the commands run while cleaning up would
    inherit)."""

    def ignore(_signum: int, _frame: object) -> None:
        pass

    def stop(_signum: int, _frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, ignore)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)


def run_demo(serve: bool = False, workdir: Path | None = None) -> int:
    from proxy.sandbox.cluster import ClusterError, running_cluster

    _stop_on_signals()

    console.print(
        "[bold]pgwarden demo[/] — the 2019 insider case: a support employee sold ~68,000 "
        "customers' names, emails, phones and ticket numbers; confirming who took three months."
    )
    work = workdir or Path(tempfile.mkdtemp(prefix="pgwarden-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(work)
    try:
        with running_cluster(tls=True, schema=True) as pg:
            demo.pg = pg
            demo.build_database()
            config = demo.write_config()
            with running_proxy(config, demo.port, work / "pgwarden.log") as proc:
                console.print(
                    f"pgwarden on 127.0.0.1:{demo.port} (TLS both ways) enforcing "
                    f"config/policy.yaml; audit trail {demo.audit_db} (ledger and signing keys "
                    "from pgwarden audit keygen)"
                )
                if serve:
                    return demo.serve_forever(proc)
                demo.act_clients()
                demo.act_normal_day()
                # What the helpdesk's allow-list is learned from (act 5): the normal day.
                time.sleep(1.0)
                demo.normal_day_end = datetime.now(UTC).isoformat()
                demo.act_insiders()
                # Stop pgwarden first: the audit trail is flushed and a final signed
                # checkpoint written, as a responder would find it.
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(45)
                if code != 0:
                    raise DemoFailed(f"pgwarden exited with {code} on SIGTERM")
            demo.act_responder()
            demo.act_allow_list()
    except ClusterError as exc:
        console.print(f"[red]demo failed: setup: cannot start PostgreSQL:[/] {exc}")
        return 1
    except DemoFailed as exc:
        console.print(f"\n[red]demo failed: {exc}[/]")
        console.print(f"files (pgwarden.log, audit.db): {work}")
        return 1
    except KeyboardInterrupt:
        if serve:
            return 0  # how --serve is meant to end
        console.print(f"\n[yellow]demo interrupted[/]; files kept in {work}")
        return 130
    console.print(
        f"\n[green]demo complete in {time.monotonic() - demo.started:.0f} s:[/] normal work "
        f"untouched, every insider attempt refused or cut, the audit trail names exactly "
        f"which customers left, and the helpdesk's learned statements refuse an insider by "
        f"shape. Files kept in {work}"
    )
    return 0


@click.command("demo")
@click.option("--serve", is_flag=True, help="Keep the setup running and print how to connect.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to keep the audit trail, keys, report and log (default: a new temp dir).",
)
def demo_command(serve: bool, workdir: Path | None) -> None:
    """Replay the insider case: normal work, exfiltration attempts, the responder's view."""
    sys.exit(run_demo(serve=serve, workdir=workdir))
