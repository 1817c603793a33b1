"""The incident-responder queries behind ``pgwarden audit ...``.

The same questions run against the SQLite store and the PostgreSQL store: the SQL is written
once with ``?`` placeholders and ``{events}`` / ``{ledger}`` table names, and the few places the
two dialects differ (JSON arrays vs ``text[]``, text vs ``timestamptz`` time) are the small
snippet table in :class:`Dialect`.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import orjson

from audit.chain import ChainReport, ChainVerifier, ExternalCheckpoint
from audit.events import COLUMNS, normalise_record, ts_of
from audit.ledger import (
    KIND_KEY,
    KIND_VALUE,
    LEGACY_KIND_KEY,
    LEGACY_KIND_VALUE,
    RecordHasher,
    ledger_update,
    pk_text,
    qualify,
    split,
)

Row = dict[str, Any]


class QueryError(RuntimeError):
    """A question could not be answered; the message says why."""


# --- time ------------------------------------------------------------------------------------

_REL = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """``2026-11-29T05:00``, ``2026-11-29`` (UTC when no zone is given) or ``24h`` / ``7d``
    (that long ago)."""
    m = _REL.match(text.strip())
    if m:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise QueryError(
            f"cannot read the time {text!r}: use ISO-8601 (2026-11-29T05:00) or an age like 24h, 7d"
        ) from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# --- stores ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    hour: str
    minute: str
    day: str
    labelled: str
    has_relation: str
    has_label: str
    # True when the packed digests of ledger row l hold the digest parameter at a 16-byte
    # boundary (a misaligned match would straddle two digests).
    holds_digest: str
    # The distinct end users of a group of events, as a JSON array (SQLite) or text[].
    end_users: str
    # The distinct persons (end user, else database user) of a group of events, likewise.
    persons: str


SQLITE = Dialect(
    name="sqlite",
    hour="substr(e.ts, 1, 13)",
    minute="substr(e.ts, 1, 16)",
    day="substr(e.ts, 1, 10)",
    labelled="(e.labels IS NOT NULL AND e.labels <> '[]')",
    has_relation="EXISTS (SELECT 1 FROM json_each(e.relations) WHERE value = ?)",
    has_label="EXISTS (SELECT 1 FROM json_each(e.labels) WHERE value = ?)",
    holds_digest="instr(l.digests, ?) % 16 = 1",
    end_users="json_group_array(DISTINCT e.end_user) FILTER (WHERE e.end_user IS NOT NULL)",
    persons="json_group_array(DISTINCT COALESCE(e.end_user, e.db_user))",
)
POSTGRES = Dialect(
    name="postgres",
    hour="to_char(e.ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24')",
    minute="to_char(e.ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI')",
    day="to_char(e.ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    labelled="(cardinality(e.labels) > 0)",
    has_relation="? = ANY(e.relations)",
    has_label="? = ANY(e.labels)",
    holds_digest="position(? in l.digests) % 16 = 1",
    end_users="array_agg(DISTINCT e.end_user) FILTER (WHERE e.end_user IS NOT NULL)",
    persons="array_agg(DISTINCT COALESCE(e.end_user, e.db_user))",
)


class Store(Protocol):
    """A readable audit store."""

    dialect: Dialect

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a query (``{events}``/``{ledger}`` placeholders, ``?`` parameters)."""

    def stream(self, sql: str, *args: Any) -> AsyncIterator[Row]:
        """Like :meth:`fetch` but without holding every row in memory."""

    async def close(self) -> None:
        """Disconnect."""


class SQLiteStore:
    """Reads an SQLite audit database (read-only)."""

    dialect = SQLITE

    def __init__(self, path: Path | str) -> None:
        from audit.sinks.sqlite import connect

        try:
            self._conn = connect(path, readonly=True)
        except FileNotFoundError as exc:
            raise QueryError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise QueryError(f"cannot open the audit database {path}: {exc}") from exc
        self._path = path
        try:
            tables = {
                r[0]
                for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise QueryError(
                f"{path} is not an SQLite database ({exc}); --db names the file the proxy's "
                "SQLite audit sink writes"
            ) from exc
        if not {"events", "ledger"} <= tables:
            self._conn.close()
            raise QueryError(
                f"{path} is not a pgwarden audit database (it has no events and ledger tables)"
            )
        # One read transaction for the whole command: every query sees the same snapshot
        # while pgwarden goes on writing (WAL), so verify never pairs events with a ledger
        # read a moment earlier, and top's two queries count the same events.
        self._conn.execute("BEGIN")

    def _error(self, exc: sqlite3.Error) -> QueryError:
        # A writer holding the file for longer than the busy timeout, a damaged file: the
        # responder gets a sentence, not a traceback.
        return QueryError(f"reading the audit database {self._path} failed: {exc}")

    def _prep(self, sql: str, args: Sequence[Any]) -> tuple[str, list[Any]]:
        sql = sql.replace("{events}", "events").replace("{ledger}", "ledger")
        return sql, [ts_of(a) if isinstance(a, datetime) else a for a in args]

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        q, params = self._prep(sql, args)
        try:
            return [dict(r) for r in self._conn.execute(q, params).fetchall()]
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    async def stream(self, sql: str, *args: Any) -> AsyncIterator[Row]:
        q, params = self._prep(sql, args)
        try:
            cur = self._conn.execute(q, params)
            while True:
                rows = cur.fetchmany(1000)
                if not rows:
                    return
                for r in rows:
                    yield dict(r)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    async def close(self) -> None:
        self._conn.rollback()
        self._conn.close()


class PostgresStore:
    """Reads the central PostgreSQL audit store."""

    dialect = POSTGRES

    def __init__(self, conn: Any, schema: str) -> None:
        self._conn = conn
        self._schema = schema

    @classmethod
    async def connect(cls, dsn: str, schema: str = "pgwarden_audit") -> PostgresStore:
        import asyncpg

        if not schema.isidentifier():
            raise QueryError(f"the audit schema name {schema!r} must be a plain identifier")
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except (OSError, TimeoutError, ValueError, asyncpg.PostgresError) as exc:
            # ValueError covers asyncpg's ClientConfigurationError (a malformed DSN); its
            # text names the part of the DSN that is wrong, never the password.
            raise QueryError(f"cannot connect to the PostgreSQL audit store: {exc}") from exc
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename IN "
            "('events', 'ledger')",
            schema,
        )
        if found != 2:
            await conn.close()
            raise QueryError(
                f"the PostgreSQL database has no pgwarden audit store in schema {schema!r} "
                "(no events and ledger tables there); check --dsn and --schema"
            )
        # One snapshot for the whole command while writers go on (see SQLiteStore); the
        # streams' own transactions become savepoints inside it.
        await conn.transaction(isolation="repeatable_read", readonly=True).start()
        return cls(conn, schema)

    def _prep(self, sql: str) -> str:
        sql = sql.replace("{events}", f"{self._schema}.events").replace(
            "{ledger}", f"{self._schema}.ledger"
        )
        n = 0

        def num(_m: re.Match[str]) -> str:
            nonlocal n
            n += 1
            return f"${n}"

        return re.sub(r"\?", num, sql)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        import asyncpg

        try:
            return [dict(r) for r in await self._conn.fetch(self._prep(sql), *args)]
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise QueryError(f"reading the PostgreSQL audit store failed: {exc}") from exc

    async def stream(self, sql: str, *args: Any) -> AsyncIterator[Row]:
        import asyncpg

        try:
            async with self._conn.transaction():
                async for r in self._conn.cursor(self._prep(sql), *args, prefetch=1000):
                    yield dict(r)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise QueryError(f"reading the PostgreSQL audit store failed: {exc}") from exc

    async def close(self) -> None:
        await self._conn.close()


async def open_store(
    db: Path | str | None, dsn: str | None, schema: str = "pgwarden_audit"
) -> Store:
    """The store named on the command line: ``--db`` (SQLite) or ``--dsn`` (PostgreSQL)."""
    if (db is None) == (dsn is None):
        raise QueryError(
            "name exactly one audit store: --db PATH (SQLite) or --dsn DSN (PostgreSQL)"
        )
    if db is not None:
        return SQLiteStore(db)
    assert dsn is not None
    return await PostgresStore.connect(dsn, schema)


def clean(row: Row) -> Row:
    """A stored event row as plain JSON-able values (canonical time text, lists)."""
    out = normalise_record(row)
    for k, v in row.items():
        if k not in out:
            out[k] = ts_of(v) if isinstance(v, datetime) else v
    return out


# --- filters ---------------------------------------------------------------------------------

# The person an event is about: the end user the application named, else the database user
# (staff logged in as their own role name nobody else).
PERSON = "COALESCE(e.end_user, e.db_user)"


@dataclass(frozen=True, slots=True)
class Who:
    """Whose events a question is about: one of an end user, a database user, or a person
    (the end user where one was named, otherwise the database user)."""

    end_user: str | None = None
    db_user: str | None = None
    person: str | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.end_user, self.db_user, self.person)) != 1:
            raise QueryError("name one person: --person, --end-user or --db-user")

    @property
    def name(self) -> str:
        return str(self.person if self.person is not None else self.end_user or self.db_user)

    @property
    def what(self) -> str:
        if self.person is not None:
            return "person"
        return "end user" if self.end_user is not None else "database user"

    def condition(self) -> tuple[str, str]:
        """(SQL condition on events ``e``, its parameter)."""
        if self.person is not None:
            return f"{PERSON} = ?", self.person
        if self.end_user is not None:
            return "e.end_user = ?", self.end_user
        return "e.db_user = ?", str(self.db_user)


@dataclass
class Filters:
    """What ``search``, ``sessions`` and ``export`` narrow by.  None means any."""

    db_user: str | None = None
    end_user: str | None = None
    application: str | None = None
    client_addr: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    relation: str | None = None
    label: str | None = None
    verdict: str | None = None
    min_rows: int | None = None
    session_id: str | None = None
    kinds: Sequence[str] = field(default_factory=tuple)
    person: str | None = None  # the end user, else the database user

    def where(self, d: Dialect) -> tuple[str, list[Any]]:
        conds: list[str] = []
        args: list[Any] = []
        for col in ("db_user", "end_user", "application", "client_addr", "verdict", "session_id"):
            val = getattr(self, col)
            if val is not None:
                conds.append(f"e.{col} = ?")
                args.append(val)
        if self.person is not None:
            conds.append(f"{PERSON} = ?")
            args.append(self.person)
        if self.since is not None:
            conds.append("e.ts >= ?")
            args.append(self.since)
        if self.until is not None:
            conds.append("e.ts < ?")
            args.append(self.until)
        if self.relation is not None:
            conds.append(d.has_relation)
            args.append(qualify(self.relation))
        if self.label is not None:
            conds.append(d.has_label)
            args.append(self.label)
        if self.min_rows is not None:
            conds.append("e.rows >= ?")
            args.append(self.min_rows)
        if self.kinds:
            conds.append("e.kind IN (" + ", ".join("?" * len(self.kinds)) + ")")
            args.extend(self.kinds)
        return (" AND ".join(conds) or "TRUE"), args


_EVENT_COLS = ", ".join(f"e.{c}" for c in COLUMNS)


async def search(store: Store, f: Filters, limit: int = 200) -> list[Row]:
    """Events matching the filters, oldest first."""
    where, args = f.where(store.dialect)
    rows = await store.fetch(
        f"SELECT {_EVENT_COLS} FROM {{events}} e WHERE {where} ORDER BY e.ts, e.id LIMIT ?",
        *args,
        limit,
    )
    return [_with_person(clean(r)) for r in rows]


def _with_person(row: Row) -> Row:
    return {**row, "person": row.get("end_user") or row.get("db_user")}


async def export(store: Store, f: Filters) -> AsyncIterator[Row]:
    """Every event matching the filters, in storage order, streamed."""
    where, args = f.where(store.dialect)
    async for r in store.stream(
        f"SELECT {_EVENT_COLS} FROM {{events}} e WHERE {where} ORDER BY e.id", *args
    ):
        yield clean(r)


async def sessions(store: Store, f: Filters, limit: int = 200) -> list[Row]:
    """One row per session: who, from where, when, how much labelled data, how many blocks.

    The filters choose which sessions are listed (those with an event that matches); the
    totals are always the whole session's: a pooled connection that served ten people is
    not shown as the share of the one asked about."""
    d = store.dialect
    where, args = f.where(d)
    if where != "TRUE":
        where = (
            "e.session_id IN (SELECT DISTINCT e.session_id FROM {events} e "
            f"WHERE e.session_id IS NOT NULL AND {where})"
        )
    rows = await store.fetch(
        f"""
        SELECT e.session_id,
               MIN(e.ts) AS started, MAX(e.ts) AS last_seen,
               MAX(e.db_user) AS db_user, MAX(e.end_user) AS end_user,
               {d.end_users} AS end_users, {d.persons} AS persons,
               MAX(e.application) AS application, MAX(e.client_addr) AS client_addr,
               COUNT(*) FILTER (WHERE e.kind = 'statement') AS statements,
               COALESCE(SUM(CASE WHEN e.kind = 'statement' AND {d.labelled}
                                 THEN e.rows ELSE 0 END), 0) AS labelled_rows,
               COUNT(*) FILTER (WHERE e.kind = 'statement' AND e.verdict = 'block') AS blocks,
               COUNT(*) FILTER (WHERE e.kind = 'session_end') AS ended
        FROM {{events}} e
        WHERE e.session_id IS NOT NULL AND {where}
        GROUP BY e.session_id
        ORDER BY MIN(e.ts)
        LIMIT ?
        """,
        *args,
        limit,
    )
    # An application's pooled connection serves many people: one session, several end users.
    return [
        {**_plain(r), "end_users": _names(r["end_users"]), "persons": _names(r["persons"])}
        for r in rows
    ]


def _names(v: Any) -> list[str]:
    if v is None:
        return []
    return sorted(n for n in (orjson.loads(v) if isinstance(v, str) else v) if n is not None)


def _scalar(v: Any) -> Any:
    if isinstance(v, datetime):
        return ts_of(v)
    if isinstance(v, Decimal):  # PostgreSQL's SUM(bigint) is numeric
        return int(v) if v == v.to_integral_value() else float(v)
    return v


def _plain(r: Row) -> Row:
    return {k: _scalar(v) for k, v in r.items()}


# timeline --bucket: the SQL snippet (a Dialect field) and how its text is completed.
BUCKETS = {"1m": ("minute", "Z"), "1h": ("hour", ":00Z"), "1d": ("day", "")}


async def timeline(
    store: Store,
    who: Who,
    since: datetime | None = None,
    until: datetime | None = None,
    bucket: str = "1h",
) -> list[Row]:
    """Per UTC minute, hour or day (``bucket``: 1m, 1h, 1d) for one person: statements,
    labelled rows, blocks, sessions.  Each row's ``bucket`` is the start of its period
    (``2026-11-02T09:01Z``, ``2026-11-02T09:00Z``, ``2026-11-02``); hourly rows also keep
    the name ``hour`` for older scripts."""
    if bucket not in BUCKETS:
        raise QueryError(f"--bucket must be one of {', '.join(BUCKETS)}, not {bucket!r}")
    d = store.dialect
    field_, suffix = BUCKETS[bucket]
    period = getattr(d, field_)
    f = Filters(
        end_user=who.end_user, db_user=who.db_user, person=who.person,
        since=since, until=until, kinds=("statement",),
    )  # fmt: skip
    where, args = f.where(d)
    rows = await store.fetch(
        f"""
        SELECT {period} AS bucket,
               COUNT(*) AS statements,
               COALESCE(SUM(CASE WHEN {d.labelled} THEN e.rows ELSE 0 END), 0) AS labelled_rows,
               COUNT(*) FILTER (WHERE e.verdict = 'block') AS blocks,
               COUNT(DISTINCT e.session_id) AS sessions
        FROM {{events}} e WHERE {where}
        GROUP BY {period} ORDER BY {period}
        """,
        *args,
    )
    if not rows:
        await _check_person(store, who)
    out = [{**_plain(r), "bucket": f"{r['bucket']}{suffix}"} for r in rows]
    if bucket == "1h":
        out = [{"hour": r["bucket"], **r} for r in out]
    return out


async def _check_person(store: Store, who: Who) -> None:
    """Raise when the trail never names the person: "Bob" for "bob" would otherwise read as
    "bob did nothing"."""
    cond, arg = who.condition()
    if await store.fetch(f"SELECT 1 AS x FROM {{events}} e WHERE {cond} LIMIT 1", arg):
        return
    column = {"person": PERSON, "end user": "e.end_user"}.get(who.what, "e.db_user")
    alike = [
        r["name"]
        for r in await store.fetch(
            f"SELECT DISTINCT {column} AS name FROM {{events}} e "
            f"WHERE lower({column}) = lower(?) ORDER BY 1 LIMIT 5",
            arg.strip(),
        )
    ]
    hint = ""
    if (
        who.end_user is not None
        and not alike
        and await store.fetch("SELECT 1 AS x FROM {events} e WHERE e.db_user = ? LIMIT 1", arg)
    ):
        hint = f"; it is a database user: ask with --person {arg} or --db-user {arg}"
    raise QueryError(
        f"the trail never names the {who.what} {arg!r} (names match exactly, case included)"
        + (f"; did you mean {', '.join(map(repr, alike))}?" if alike else hint)
    )


async def top(
    store: Store, since: datetime | None = None, until: datetime | None = None, limit: int = 20
) -> list[Row]:
    """Who received the most distinct labelled records in a window, with the bytes of their
    labelled results beside: a whole table packed into two rows is few rows but many bytes.
    Ranked by distinct records, then labelled bytes, then labelled rows."""
    d = store.dialect
    f = Filters(since=since, until=until, kinds=("statement",))
    where, args = f.where(d)
    rows = await store.fetch(
        f"""
        SELECT {PERSON} AS person,
               COUNT(*) AS statements,
               COALESCE(SUM(CASE WHEN {d.labelled} THEN e.rows ELSE 0 END), 0) AS labelled_rows,
               COALESCE(SUM(CASE WHEN {d.labelled} THEN e.bytes ELSE 0 END), 0)
                   AS labelled_bytes,
               COUNT(*) FILTER (WHERE e.verdict = 'block') AS blocks,
               COUNT(DISTINCT e.session_id) AS sessions
        FROM {{events}} e WHERE {where}
        GROUP BY {PERSON}
        """,
        *args,
    )
    # Distinct records per person and table (k2 and k digests counted apart); every person
    # needs theirs, since they decide the ranking.
    people: dict[str, dict[str, set[bytes]]] = {r["person"]: {} for r in rows}
    async for r in store.stream(
        f"""
        SELECT {PERSON} AS person, l.relation, l.digests
        FROM {{events}} e JOIN {{ledger}} l ON l.chain_id = e.chain_id AND l.seq = e.seq
        WHERE {where} AND l.kind IN ('k2', 'k')
        """,
        *args,
    ):
        tables = people.get(r["person"])
        if tables is None:
            continue
        recs = tables.get(r["relation"])
        if recs is None:
            recs = tables[r["relation"]] = set()
        recs.update(split(bytes(r["digests"])))
    out = [
        {**_plain(r), "distinct_records": sum(map(len, people[r["person"]].values()))} for r in rows
    ]
    out.sort(
        key=lambda r: (
            -r["distinct_records"], -r["labelled_bytes"], -r["labelled_rows"],
            -r["statements"], str(r["person"]),
        )
    )  # fmt: skip
    return out[:limit]


async def blocked(store: Store, f: Filters, limit: int = 500) -> list[Row]:
    """Blocked statements (and auth failures), newest first.  Not the ``block`` alerts: each
    refused statement raises one, and the report listed every refusal twice."""
    kinds = f.kinds or ("statement", "auth_failure")
    f2 = Filters(**{**f.__dict__, "verdict": "block", "kinds": kinds})
    where, args = f2.where(store.dialect)
    rows = await store.fetch(
        f"SELECT {_EVENT_COLS} FROM {{events}} e WHERE {where} ORDER BY e.ts DESC LIMIT ?",
        *args,
        limit,
    )
    return [clean(r) for r in rows]


async def labelled_rows_by_person_minute(
    store: Store, since: datetime | None, until: datetime | None
) -> list[Row]:
    """(person, minute, labelled_rows) for the report's plot (``minute``: UTC,
    ``2026-11-02T09:01``)."""
    d = store.dialect
    where, args = Filters(since=since, until=until, kinds=("statement",)).where(d)
    rows = await store.fetch(
        f"""
        SELECT {PERSON} AS person, {d.minute} AS minute,
               COALESCE(SUM(e.rows), 0) AS labelled_rows
        FROM {{events}} e WHERE {where} AND {d.labelled}
        GROUP BY {PERSON}, {d.minute}
        ORDER BY 2
        """,
        *args,
    )
    return [_plain(r) for r in rows]


# --- verification ----------------------------------------------------------------------------


async def verify(
    store: Store,
    *,
    public_key: Any = None,
    external: Iterable[ExternalCheckpoint] = (),
    chain_id: str | None = None,
) -> list[ChainReport]:
    """Verify every chain in the store (or one), including ledger rows against their events."""
    ext = list(external)
    chains = [
        r["chain_id"]
        for r in await store.fetch("SELECT DISTINCT chain_id FROM {events} ORDER BY chain_id")
    ]
    for cp in ext:
        if cp.chain_id not in chains:
            chains.append(cp.chain_id)
    if chain_id is not None:
        chains = [c for c in chains if c == chain_id]
    reports = []
    for cid in chains:
        # Ledger first: an incremental hash per event, never the digests themselves.
        states: dict[int, Any] = {}
        async for lr in store.stream(
            "SELECT seq, kind, relation, digests FROM {ledger} WHERE chain_id = ? ORDER BY id", cid
        ):
            st = states.get(int(lr["seq"]))
            if st is None:
                st = states[int(lr["seq"])] = hashlib.sha256()
            ledger_update(st, (lr["kind"], lr["relation"], bytes(lr["digests"])))
        digests = {seq: st.hexdigest() for seq, st in states.items()}
        v = ChainVerifier(cid, public_key=public_key, ledger_digests=digests)
        async for row in store.stream(
            f"SELECT {_EVENT_COLS} FROM {{events}} e WHERE e.chain_id = ? ORDER BY e.id", cid
        ):
            v.feed(row)
        rep = v.finish(ext)
        reports.append(rep)
    return reports


def read_checkpoints(path: Path) -> list[ExternalCheckpoint]:
    """Checkpoints saved from the alert channel or checkpoint file (JSON lines; a line may be
    the checkpoint itself or an alert whose ``details`` hold it)."""
    out = []
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = orjson.loads(line)
            if "details" in d and "signature" in d.get("details", {}):
                d = d["details"]
            out.append(ExternalCheckpoint.from_dict(d))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise QueryError(
                f"line {n} of {path} is not a checkpoint (a JSON object with chain_id, seq, "
                "hash, signature)"
            ) from exc
    return out


# --- the record ledger -----------------------------------------------------------------------


async def who_saw(
    store: Store,
    hasher: RecordHasher,
    *,
    table: str | None = None,
    key: str | Sequence[str] | None = None,
    value: str | None = None,
    label: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    resolved: Sequence[tuple[str, str, bytes]] = (),
) -> list[Row]:
    """Statements (with session and person) that returned a given record or labelled value.

    ``resolved`` adds more ledger entries to look for, as (kind, relation or label,
    digest), from :func:`resolve_who_saw` (the record's values for a key, the records
    holding a value)."""
    if key is not None:
        if table is None:
            raise QueryError("--key needs --table: a primary key only means something in its table")
        rel = qualify(table)
        targets = []
        for text in key_spellings(key):
            targets += [
                (KIND_KEY, rel, hasher.key(table, text)),
                (LEGACY_KIND_KEY, rel, hasher.legacy_key(table, text)),
            ]
    elif value is not None:
        labels = (
            [label]
            if label
            else [
                r["relation"]
                for r in await store.fetch(
                    "SELECT DISTINCT relation FROM {ledger} WHERE kind IN ('v2', 'v')"
                )
            ]
        )
        targets = [(KIND_VALUE, lb, hasher.value(lb, value)) for lb in labels]
        targets += [(LEGACY_KIND_VALUE, lb, hasher.legacy_value(lb, value)) for lb in labels]
    else:
        raise QueryError("say what to look for: --key (with --table) or --value")
    targets += list(resolved)
    out: list[Row] = []
    for kind, rel, digest in targets:
        conds: list[str] = ["l.kind = ?", "l.relation = ?", store.dialect.holds_digest]
        args: list[Any] = [kind, rel, digest]
        if since is not None:
            conds.append("e.ts >= ?")
            args.append(since)
        if until is not None:
            conds.append("e.ts < ?")
            args.append(until)
        rows = await store.fetch(
            f"""
            SELECT {_EVENT_COLS} FROM {{ledger}} l
            JOIN {{events}} e ON e.chain_id = l.chain_id AND e.seq = l.seq
            WHERE {" AND ".join(conds)} ORDER BY e.ts
            """,
            *args,
        )
        out.extend({**_with_person(clean(r)), "matched": rel, "by": kind} for r in rows)
    if not out:
        if key is not None:
            await _check_known(store, (KIND_KEY, LEGACY_KIND_KEY), qualify(str(table)), "table")
        elif label:
            await _check_known(store, (KIND_VALUE, LEGACY_KIND_VALUE), label, "label")
        elif not targets:
            raise QueryError("the record ledger holds no labelled values at all")
    # One line per statement, though it may be found by its key and by a value.
    out = list({(r["chain_id"], r["seq"]): r for r in reversed(out)}.values())
    out.sort(key=lambda r: r["ts"])
    return out


async def resolve_who_saw(
    hasher: RecordHasher,
    monitored_dsn: str,
    store: Store,
    *,
    table: str | None,
    key: str | Sequence[str] | None,
    value: str | None,
) -> list[tuple[str, str, bytes]]:
    """More ledger entries for ``who-saw``, read from the monitored database: for a key, its
    row's values (as ``v2`` digests under every label the ledger holds), so a read that
    carried the customer's e-mail without the key is found; for a value, the keys of the
    rows holding it (``--table``, else every table with a primary key), so a read that
    carried the key, or that pgwarden's value matching named, is found."""
    import asyncpg

    try:
        conn = await asyncpg.connect(monitored_dsn, timeout=10)
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError) as exc:
        raise QueryError(f"cannot connect to the monitored database: {exc}") from exc
    try:
        async with conn.transaction(readonly=True):
            if key is not None and table is not None:
                labels = [
                    str(r["relation"])
                    for r in await store.fetch(
                        "SELECT DISTINCT relation FROM {ledger} WHERE kind = 'v2'"
                    )
                ]
                texts = await _record_texts(conn, qualify(table), key)
                return [(KIND_VALUE, lb, hasher.value(lb, t)) for lb in labels for t in texts]
            if value is not None:
                return [
                    (KIND_KEY, rel, hasher.key(rel, pk))
                    for rel, pk in await _records_holding(conn, table, value)
                ]
            return []
    except asyncpg.PostgresError as exc:
        raise QueryError(f"cannot read the monitored database: {exc}") from exc
    finally:
        await conn.close()


async def _primary_keys(conn: Any, table: str | None) -> dict[str, list[str]]:
    """``schema.table`` -> its primary key's columns: ``table`` alone, or every table of
    the database's own schemas that has one."""
    rows = await conn.fetch(
        """
        SELECT n.nspname || '.' || c.relname AS rel, a.attname
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
        WHERE i.indisprimary AND c.relkind IN ('r', 'p')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_%'
          AND ($1::text IS NULL OR n.nspname || '.' || c.relname = $1)
        ORDER BY 1, k.ord
        """,
        None if table is None else qualify(table),
    )
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(str(r["rel"]), []).append(str(r["attname"]))
    if table is not None and not out:
        raise QueryError(f"{qualify(table)} has no primary key in the monitored database")
    return out


def _rel_sql(rel: str) -> str:
    from policy.rewrite import quote_ident

    schema, name = rel.split(".", 1)
    return f"{quote_ident(schema)}.{quote_ident(name)}"


async def _record_texts(conn: Any, rel: str, key: str | Sequence[str]) -> list[str]:
    """The text of every non-NULL column of the record with this key (none if it is gone)."""
    from policy.rewrite import quote_ident

    pk = (await _primary_keys(conn, rel))[rel]
    wanted = set(key_spellings(key))
    cond = " AND ".join(f"{quote_ident(c)}::text = ${i}" for i, c in enumerate(pk, start=1))
    for spelling in wanted:
        parts = orjson.loads(spelling) if len(pk) > 1 and spelling.startswith("[") else [spelling]
        if len(parts) != len(pk):
            continue
        row = await conn.fetchrow(
            f"SELECT to_jsonb(t) AS j FROM {_rel_sql(rel)} t WHERE {cond}", *map(str, parts)
        )
        if row is not None:
            doc = orjson.loads(row["j"])
            return [
                v if isinstance(v, str) else orjson.dumps(v).decode()
                for v in doc.values()
                if v is not None
            ]
    return []


async def _records_holding(conn: Any, table: str | None, value: str) -> list[tuple[str, str]]:
    """(table, key) of the rows whose text holds ``value`` as a whole run of tokens (as
    pgwarden's value matching finds it: ``policy.valueindex``)."""
    from policy.rewrite import quote_ident
    from policy.valueindex import tokens

    want = tokens(value.encode())
    if not want:
        return []
    out: list[tuple[str, str]] = []
    for rel, pk in (await _primary_keys(conn, table)).items():
        keys = ", ".join(f"{quote_ident(c)}::text" for c in pk)
        async for r in conn.cursor(
            f"SELECT {keys}, t::text AS row_text FROM {_rel_sql(rel)} t "
            "WHERE strpos(lower(t::text), lower($1)) > 0",
            value,
        ):
            vals = list(r.values())
            if _holds_run(tokens(str(vals[-1]).encode()), want):
                out.append((rel, pk_text(vals[:-1])))
    return out


def _holds_run(have: list[bytes], want: list[bytes]) -> bool:
    n = len(want)
    return any(have[i : i + n] == want for i in range(len(have) - n + 1))


def key_spellings(key: str | Sequence[str]) -> list[str]:
    """The ledger texts a responder's ``--key`` may stand for: the columns of a composite
    key given one by one (``--key 1 --key x,y``) spelled as the ledger spells them
    (:func:`audit.ledger.pk_text`), and a JSON array typed by hand (``[1, "x,y"]``: spaces,
    a number unquoted) respelled that way too, besides the text as typed (a one-column key
    may look like anything); and each composite key as older proxies spelled it."""
    if not isinstance(key, str):
        parts: list[Any] = list(key)
        out = []
    else:
        out = [key]
        try:
            parts = orjson.loads(key)
        except orjson.JSONDecodeError:
            return out
        if not (
            isinstance(parts, list)
            and len(parts) > 1
            and all(isinstance(v, str | int) and not isinstance(v, bool) for v in parts)
        ):
            return out
    texts = [str(v) for v in parts]
    # and as proxies before 2026-12-07 spelled it (json.dumps: spaces, ASCII escapes)
    for spelling in (pk_text(texts), json.dumps(texts)):
        if spelling not in out:
            out.append(spelling)
    return out


async def _check_known(store: Store, kinds: tuple[str, str], name: str, what: str) -> None:
    """Raise when the ledger never recorded ``name``: an empty answer for a misspelt table or
    label ("customer") would read as "nobody saw anything"."""
    marks = ", ".join("?" * len(kinds))
    hit = await store.fetch(
        f"SELECT 1 AS x FROM {{ledger}} WHERE relation = ? AND kind IN ({marks}) LIMIT 1",
        name,
        *kinds,
    )
    if hit:
        return
    known = [
        r["relation"]
        for r in await store.fetch(
            f"SELECT DISTINCT relation FROM {{ledger}} WHERE kind IN ({marks}) ORDER BY 1", *kinds
        )
    ]
    raise QueryError(
        f"the record ledger has nothing for the {what} {name!r} (check the spelling); "
        + (f"{what}s in the ledger: {', '.join(known)}" if known else f"it names no {what} at all")
    )


@dataclass
class KeyCheck:
    """How a responder's ledger key compares with the keys that wrote the trail's ledger:
    the writers (chains) whose ledger events carry the key's check value, those with events
    carrying another one (a chain may be in both), and those from before check values were
    recorded."""

    matching: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


async def check_ledger_key(store: Store, hasher: RecordHasher) -> KeyCheck:
    """Compare ``hasher``'s key with the check value recorded on the first and last event
    with ledger rows of each chain (found through the ledger's index, not a scan)."""
    mine = hasher.check_value()
    out = KeyCheck()
    for c in await store.fetch(
        "SELECT chain_id, MIN(seq) AS first, MAX(seq) AS last FROM {ledger} GROUP BY chain_id"
    ):
        found: set[str] = set()
        for r in await store.fetch(
            "SELECT e.details FROM {events} e WHERE e.chain_id = ? AND e.seq IN (?, ?)",
            c["chain_id"],
            c["first"],
            c["last"],
        ):
            details = r["details"]
            if isinstance(details, str | bytes):
                details = orjson.loads(details)
            if isinstance(details, dict) and isinstance(details.get("ledger_key_check"), str):
                found.add(details["ledger_key_check"])
        chain = str(c["chain_id"])
        if mine in found:
            out.matching.append(chain)
        if found - {mine}:  # (a chain continued after a key rotation has both)
            out.other.append(chain)
        if not found:
            out.unknown.append(chain)
    return out


@dataclass
class RecordsSeen:
    """The distinct records one person received: the breach-notification list."""

    who: Who
    table: str
    records: list[Row]  # digest (hex), first_seen, last_seen, times, and key when resolved
    resolved: int = 0
    # Labelled values the person received in rows that carried no usable key (``v2``
    # digests, any table): digest, label, first_seen, last_seen, times; resolving names the
    # row of ``table`` that holds one (key, column) and adds that row to ``records``.
    values: list[Row] = field(default_factory=list)
    # Statements that returned labelled rows of ``table`` and left no key of it in the
    # ledger (keys unreadable, values pgwarden could not match): ts, session_id, seq,
    # rows, statement.  Their records cannot be listed; each is reported with its bound.
    unitemised: list[Row] = field(default_factory=list)
    # Statements that read ``table`` and returned rows with no labelled column and no key of
    # it: counts, comparisons, values computed from it (an implicit flow can spell a
    # customer out one character a row).  Same fields; listed with the same bound.
    computed: list[Row] = field(default_factory=list)
    table_rows: int | None = None  # the table's size now (with --resolve-dsn): the bound

    def as_dict(self) -> dict[str, Any]:
        return {
            "end_user": self.who.end_user,
            "db_user": self.who.db_user,
            "person": self.who.person,
            "table": self.table,
            "distinct_records": len(self.records),
            "resolved": self.resolved,
            "records": self.records,
            "values_without_key": len(self.values),
            "values": self.values,
            "unitemised_statements": self.unitemised,
            "computed_statements": self.computed,
            "table_rows": self.table_rows,
        }


def _tally(seen: dict[Any, list[Any]], key: Any, ts: Any) -> None:
    s = seen.get(key)
    if s is None:
        seen[key] = [ts, ts, 1]
    else:
        s[1] = ts
        s[2] += 1


async def records_seen(
    store: Store,
    *,
    end_user: str | None = None,
    table: str,
    since: datetime | None = None,
    until: datetime | None = None,
    person: str | None = None,
    db_user: str | None = None,
) -> RecordsSeen:
    """Distinct records of ``table`` that one person (``end_user``, ``person`` or
    ``db_user``: see :class:`Who`) received in the window, and the
    labelled values they received in rows without a usable key (which may be of any table
    carrying those labels until :func:`resolve_keys` ties them to rows of ``table``)."""
    who = Who(end_user=end_user, db_user=db_user, person=person)
    cond, person_arg = who.condition()
    rel = qualify(table)
    window: list[str] = []
    args: list[Any] = []
    if since is not None:
        window.append("AND e.ts >= ?")
        args.append(since)
    if until is not None:
        window.append("AND e.ts < ?")
        args.append(until)
    seen: dict[bytes, list[Any]] = {}  # digest -> [first, last, times]
    values: dict[tuple[str, bytes], list[Any]] = {}  # (label, digest) -> [first, last, times]
    legacy: set[bytes] = set()  # digests from trails written before CMAC
    async for r in store.stream(
        f"""
        SELECT e.ts, l.kind, l.relation, l.digests
        FROM {{events}} e JOIN {{ledger}} l ON l.chain_id = e.chain_id AND l.seq = e.seq
        WHERE {cond} {" ".join(window)}
          AND ((l.kind IN ('k2', 'k') AND l.relation = ?) OR l.kind IN ('v2', 'v'))
        ORDER BY e.ts
        """,
        person_arg,
        *args,
        rel,
    ):
        ts = _scalar(r["ts"])
        kind = r["kind"]
        digests = split(bytes(r["digests"]))
        if kind in (LEGACY_KIND_KEY, LEGACY_KIND_VALUE):
            legacy.update(digests)
        if kind in (KIND_KEY, LEGACY_KIND_KEY):
            for d in digests:
                _tally(seen, d, ts)
        else:
            label = str(r["relation"])
            for d in digests:
                _tally(values, (label, d), ts)
    recs = [
        {"digest": d.hex(), "first_seen": f, "last_seen": la, "times": n}
        | ({"legacy": True} if d in legacy else {})
        for d, (f, la, n) in sorted(seen.items(), key=lambda kv: (kv[1][0], kv[0]))
    ]
    vals = [
        {"digest": d.hex(), "label": label, "first_seen": f, "last_seen": la, "times": n}
        | ({"legacy": True} if d in legacy else {})
        for (label, d), (f, la, n) in sorted(values.items(), key=lambda kv: (kv[1][0], kv[0]))
    ]
    unitemised: list[Row] = []
    computed: list[Row] = []
    for r in await store.fetch(
        f"""
        SELECT e.ts, e.session_id, e.chain_id, e.seq, e.rows, e.statement,
               {store.dialect.labelled} AS labelled
        FROM {{events}} e
        WHERE {cond} {" ".join(window)} AND e.kind = 'statement' AND e.rows > 0
          AND {store.dialect.has_relation}
          AND NOT EXISTS (
            SELECT 1 FROM {{ledger}} l WHERE l.chain_id = e.chain_id AND l.seq = e.seq
              AND l.kind IN ('k2', 'k') AND l.relation = ?)
        ORDER BY e.ts
        """,
        person_arg,
        *args,
        rel,
        rel,
    ):
        row = {k: _scalar(r[k]) for k in ("ts", "session_id", "chain_id", "seq", "rows")}
        row["statement"] = r["statement"]
        (unitemised if r["labelled"] else computed).append(row)
    if not seen and not values and not unitemised and not computed:
        # Nothing at all: a misspelt table or person must not read as "nobody saw anything".
        await _check_known(store, (KIND_KEY, LEGACY_KIND_KEY), rel, "table")
        await _check_person(store, who)
    return RecordsSeen(who, rel, recs, values=vals, unitemised=unitemised, computed=computed)


async def resolve_keys(
    result: RecordsSeen, hasher: RecordHasher, monitored_dsn: str
) -> RecordsSeen:
    """Turn ledger digests back into primary keys by hashing every key of the table in the
    monitored database (read-only; the keys never leave this process)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(monitored_dsn, timeout=10)
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError) as exc:
        raise QueryError(f"cannot connect to the monitored database: {exc}") from exc
    try:
        return await _resolve(conn, result, hasher)
    except asyncpg.PostgresError as exc:
        raise QueryError(
            f"cannot read the keys of {result.table} in the monitored database: {exc}"
        ) from exc
    finally:
        await conn.close()


async def _resolve(conn: Any, result: RecordsSeen, hasher: RecordHasher) -> RecordsSeen:
    schema, name = result.table.split(".", 1)
    pk_names = (await _primary_keys(conn, result.table))[result.table]
    # Values received without a key are looked for in every column of the table: the
    # ledger knows their label, not their column, and hashing a column costs little.
    others: list[str] = []
    if result.values:
        others = [
            str(r["attname"])
            for r in await conn.fetch(
                """
                SELECT a.attname FROM pg_attribute a
                JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum
                """,
                schema,
                name,
            )
            if r["attname"] not in pk_names
        ]
    idents = ", ".join(f'"{c}"::text' for c in [*pk_names, *others])
    want = {r["digest"]: r for r in result.records}
    labels = sorted({v["label"] for v in result.values})
    want_values = {(v["label"], v["digest"]): v for v in result.values}
    legacy = any(r.get("legacy") for r in [*result.records, *result.values])
    found = 0
    table = result.table
    npk = len(pk_names)

    def match(rows: list[list[str | None]]) -> int:
        """Name the wanted digests among these rows' keys (hashed as one batch), and the
        rows holding a wanted value."""
        pks = [pk_text(r[:npk]) for r in rows]
        pairs = list(zip(pks, hasher.keys(table, pks), strict=True))
        if legacy:
            pairs += [(pk, hasher.legacy_key(table, pk)) for pk in pks]
        hit = 0
        for pk, d in pairs:
            r = want.get(d.hex())
            if r is not None and "key" not in r:
                r["key"] = pk
                hit += 1
        for j, column in enumerate(others, start=npk):
            # The rows with a value in this column (NULL and '' are never a labelled value).
            owners = [pk for pk, r in zip(pks, rows, strict=True) if r[j]]
            texts = [t for r in rows if (t := r[j])]
            if not texts:
                continue
            if legacy:
                owners += owners
            for label in labels:
                digests = hasher.values(label, texts)
                if legacy:
                    digests += [hasher.legacy_value(label, t) for t in texts]
                for pk, d in zip(owners, digests, strict=True):
                    v = want_values.get((label, d.hex()))
                    if v is not None and "key" not in v:
                        v["key"], v["column"] = pk, column
        return hit

    async with conn.transaction(readonly=True):
        if result.unitemised or result.computed:
            result.table_rows = int(
                await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{name}"')
            )
        batch: list[list[str | None]] = []
        async for row in conn.cursor(f'SELECT {idents} FROM "{schema}"."{name}"', prefetch=5000):
            batch.append(list(row.values()))
            if len(batch) == 5000:
                found += match(batch)
                batch = []
                if found == len(want) and not want_values:
                    break
        if batch:
            found += match(batch)
    result.resolved = found + _records_from_values(result, hasher)
    return result


def _records_from_values(result: RecordsSeen, hasher: RecordHasher) -> int:
    """Rows of the table that a value without a key was found in, and no key digest
    already names: they are records the person received too.  Added to ``records`` under
    their key's digest (so a list made another way compares), marked ``via`` the label."""
    by_key = {r["key"]: r for r in result.records if "key" in r}
    added = 0
    for v in result.values:
        pk = v.get("key")
        if pk is None:
            continue
        rec = by_key.get(pk)
        if rec is None:
            rec = by_key[pk] = {
                "digest": hasher.key(result.table, pk).hex(),
                "key": pk,
                "first_seen": v["first_seen"],
                "last_seen": v["last_seen"],
                "times": v["times"],
                "via": v["label"],
            }
            result.records.append(rec)
            added += 1
        else:
            rec["first_seen"] = min(rec["first_seen"], v["first_seen"])
            rec["last_seen"] = max(rec["last_seen"], v["last_seen"])
    return added
