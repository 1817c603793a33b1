"""What the database holds: an immutable snapshot of pg_catalog, and a holder that refreshes it.

Public API (what the proxy calls)::

    snapshot: CatalogSnapshot = await load_catalog(conn)            # read-only queries
    snapshot.relation(schema, name) -> CatalogRelation | None
    snapshot.column_at(table_oid, attnum) -> CatalogColumn | None   # RowDescription fields
    snapshot.with_rules(rules) -> CatalogSnapshot                   # labels = comments + rules

    catalog = Catalog(connect, refresh_interval=60.0, rules=LabelRules(...))
    await catalog.start(); catalog.snapshot; catalog.invalidate(); await catalog.close()

A snapshot is also built without a database from Python values (:meth:`CatalogSnapshot.build`)
or from CREATE statements (:func:`policy.schema_sql.snapshot_from_sql`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import structlog

from policy.labels import LabelRules, parse_comment_labels
from policy.ownconn import DEFAULT_IDLE_TIMEOUT, IdleConnection
from policy.parse import plpgsql_queries

log = structlog.get_logger("pgwarden.catalog")

# After DDL, the catalog is reloaded once no more DDL came for DEFAULT_SETTLE seconds, and at
# the latest DEFAULT_MAX_DELAY seconds after the first (see Catalog._coalesce).
DEFAULT_SETTLE = 0.1
DEFAULT_MAX_DELAY = 1.0

# Schemas whose relations we list (so name resolution knows pg_catalog shadows public) but
# whose views we never expand: their definitions are internals, not customer data.
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})

_versions = itertools.count(1)


@dataclass(frozen=True, slots=True)
class CatalogColumn:
    """One column of a relation, with the labels policy gives it."""

    schema: str
    table: str
    name: str
    attnum: int
    type_name: str
    table_oid: int = 0
    comment: str | None = None
    labels: frozenset[str] = frozenset()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}.{self.name}"

    @property
    def comment_labels(self) -> frozenset[str]:
        return parse_comment_labels(self.comment)


@dataclass(frozen=True, slots=True)
class CatalogRelation:
    """A table, view, materialized view, foreign or partitioned table."""

    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind: r table, v view, m matview, f foreign, p partitioned
    columns: tuple[CatalogColumn, ...]
    view_sql: str | None = None  # fully schema-qualified definition (see load_catalog)
    view_search_path: tuple[str, ...] = ("pg_catalog",)
    primary_key: tuple[str, ...] = ()
    parents: tuple[int, ...] = ()  # OIDs this table inherits from (partitions included)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def is_view(self) -> bool:
        return self.view_sql is not None

    @property
    def labels(self) -> frozenset[str]:
        out: set[str] = set()
        for c in self.columns:
            out |= c.labels
        return frozenset(out)

    def column(self, name: str) -> CatalogColumn | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None


@dataclass(frozen=True, slots=True)
class CatalogFunction:
    """A user-defined function or procedure (outside pg_catalog/information_schema)."""

    schema: str
    name: str
    language: str
    source: str
    security_definer: bool = False
    arguments: str = ""  # pg_get_function_arguments: the body's parameter names
    result: str = "void"  # pg_get_function_result
    # The function's own ``SET search_path`` (pg_proc.proconfig): its body resolves names
    # through it, whatever the caller's path. None: the caller's.
    search_path: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def runs_dynamic_sql(self) -> bool:
        """Whether the body builds SQL at run time, which analysis cannot follow (a body that
        does not parse counts: nothing can be followed)."""
        if self.language == "plpgsql":
            try:
                return plpgsql_queries(self.arguments, self.result, self.source)[1]
            except Exception:
                return True
        return self.language not in ("sql", "internal", "c")


@dataclass(frozen=True, eq=False)
class CatalogSnapshot:
    """Relations, columns, views and functions at one moment; never mutated.

    ``version`` is unique per snapshot so caches keyed on it die with it.
    """

    relations: Mapping[tuple[str, str], CatalogRelation]
    schemas: frozenset[str]
    functions: Mapping[tuple[str, str], tuple[CatalogFunction, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Names of pg_catalog functions. Empty means "not known" (a snapshot built from a schema
    # file): then a call to a function the catalog lacks cannot be told from a builtin.
    builtin_functions: frozenset[str] = frozenset()
    # Names of aggregate and window functions in every schema (pg_proc.prokind 'a' or 'w'),
    # user-defined ones included. Empty means "not known": PostgreSQL's own are assumed.
    aggregate_functions: frozenset[str] = frozenset()
    # (schema, name) of every type (pg_type: PostgreSQL's, users', tables' row types).
    # Empty means "not known" (a snapshot built from a schema file): no type is unknown.
    types: frozenset[tuple[str, str]] = frozenset()
    version: int = field(default_factory=lambda: next(_versions))
    _by_oid: Mapping[int, CatalogRelation] = field(init=False, repr=False)
    _by_name: Mapping[str, tuple[CatalogRelation, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_oid = {r.oid: r for r in self.relations.values()}
        by_name: dict[str, list[CatalogRelation]] = {}
        for r in self.relations.values():
            by_name.setdefault(r.name, []).append(r)
        object.__setattr__(self, "_by_oid", MappingProxyType(by_oid))
        object.__setattr__(
            self, "_by_name", MappingProxyType({k: tuple(v) for k, v in by_name.items()})
        )

    @classmethod
    def build(
        cls,
        relations: Iterable[CatalogRelation],
        schemas: Iterable[str] = (),
        functions: Iterable[CatalogFunction] = (),
        builtin_functions: Iterable[str] = (),
        aggregate_functions: Iterable[str] = (),
        types: Iterable[tuple[str, str]] = (),
    ) -> CatalogSnapshot:
        """A snapshot from Python values (unit tests, schema files)."""
        rels = inherit_labels({(r.schema, r.name): r for r in relations})
        funcs: dict[tuple[str, str], list[CatalogFunction]] = {}
        for f in functions:
            funcs.setdefault((f.schema, f.name), []).append(f)
        all_schemas = set(schemas) | {r.schema for r in rels.values()} | {"pg_catalog"}
        return cls(
            relations=MappingProxyType(rels),
            schemas=frozenset(all_schemas),
            functions=MappingProxyType({k: tuple(v) for k, v in funcs.items()}),
            builtin_functions=frozenset(builtin_functions),
            aggregate_functions=frozenset(aggregate_functions),
            types=frozenset(types),
        )

    def relation(self, schema: str, name: str) -> CatalogRelation | None:
        return self.relations.get((schema, name))

    def relation_by_oid(self, oid: int) -> CatalogRelation | None:
        return self._by_oid.get(oid)

    def relations_named(self, name: str) -> tuple[CatalogRelation, ...]:
        return self._by_name.get(name, ())

    def column_at(self, table_oid: int, attnum: int) -> CatalogColumn | None:
        """The catalog column behind a RowDescription field (table OID, attribute number)."""
        rel = self._by_oid.get(table_oid)
        if rel is None or attnum <= 0:
            return None
        for c in rel.columns:
            if c.attnum == attnum:
                return c
        return None

    def user_functions(self, schema: str, name: str) -> tuple[CatalogFunction, ...]:
        return self.functions.get((schema, name), ())

    def functions_named(self, name: str) -> tuple[CatalogFunction, ...]:
        return tuple(f for (_s, n), fs in self.functions.items() if n == name for f in fs)

    def with_rules(self, rules: LabelRules) -> CatalogSnapshot:
        """A copy whose columns carry comment labels plus the labels ``rules`` assign.

        The copy keeps this snapshot's version: it describes the same database state.
        """
        rels: dict[tuple[str, str], CatalogRelation] = {}
        for key, rel in self.relations.items():
            cols = tuple(
                replace(
                    c,
                    labels=parse_comment_labels(c.comment)
                    | rules.labels_for(c.schema, c.table, c.name),
                )
                for c in rel.columns
            )
            rels[key] = replace(rel, columns=cols)
        return CatalogSnapshot(
            relations=MappingProxyType(inherit_labels(rels)),
            schemas=self.schemas,
            functions=self.functions,
            builtin_functions=self.builtin_functions,
            aggregate_functions=self.aggregate_functions,
            types=self.types,
            version=self.version,
        )


def inherit_labels(
    rels: dict[tuple[str, str], CatalogRelation],
) -> dict[tuple[str, str], CatalogRelation]:
    """Give partitions and inheritance children their parents' column labels.

    Comments are not inherited in PostgreSQL, so without this ``SELECT * FROM
    customers_2024`` (a partition) would read labelled data unlabelled.
    """
    by_oid = {r.oid: key for key, r in rels.items()}
    done: dict[int, CatalogRelation] = {}

    def resolve(key: tuple[str, str], depth: int = 0) -> CatalogRelation:
        rel = rels[key]
        if rel.oid in done:
            return done[rel.oid]
        if not rel.parents or depth > 64:
            done[rel.oid] = rel
            return rel
        inherited: dict[str, frozenset[str]] = {}
        for p in rel.parents:
            pkey = by_oid.get(p)
            if pkey is None:
                continue
            for c in resolve(pkey, depth + 1).columns:
                inherited[c.name] = inherited.get(c.name, frozenset()) | c.labels
        cols = tuple(
            replace(c, labels=c.labels | inherited.get(c.name, frozenset())) for c in rel.columns
        )
        out = replace(rel, columns=cols)
        done[rel.oid] = out
        return out

    if not any(r.parents for r in rels.values()):
        return rels
    return {key: resolve(key) for key in rels}


# --- loading from PostgreSQL -------------------------------------------------------------

_RELATIONS_SQL = """
SELECT c.oid::int8 AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
       CASE WHEN c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            THEN pg_catalog.pg_get_viewdef(c.oid) END AS view_sql
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p')
  AND n.nspname NOT LIKE 'pg\\_toast%'
"""

_COLUMNS_SQL = """
SELECT a.attrelid::int8 AS oid, a.attnum::int4 AS attnum, a.attname AS name,
       pg_catalog.format_type(a.atttypid, a.atttypmod) AS type_name,
       pg_catalog.col_description(a.attrelid, a.attnum) AS comment
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
ORDER BY a.attrelid, a.attnum
"""

_PKEYS_SQL = """
SELECT con.conrelid::int8 AS oid,
       array(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
             ORDER BY k.ord) AS columns
FROM pg_catalog.pg_constraint con WHERE con.contype = 'p'
"""

# {source}: prosrc, or for SQL-standard bodies (BEGIN ATOMIC / RETURN, PostgreSQL 14+) their
# text, because prosrc is empty for those.
_FUNCTIONS_SQL = """
SELECT n.nspname AS schema, p.proname AS name, l.lanname AS language,
       {source} AS source, p.prosecdef AS secdef,
       coalesce(pg_catalog.pg_get_function_arguments(p.oid), '') AS arguments,
       coalesce(pg_catalog.pg_get_function_result(p.oid), 'void') AS result,
       (SELECT substr(c, length('search_path=') + 1) FROM unnest(p.proconfig) c
        WHERE c LIKE 'search\\_path=%' LIMIT 1) AS search_path
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""


# Other sessions' temporary schemas and TOAST are left out: no statement names their types.
_TYPES_SQL = """
SELECT n.nspname AS schema, t.typname AS name
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
"""


@dataclass(frozen=True, slots=True)
class CatalogRows:
    """What the catalog queries returned, as plain values: the input of a snapshot."""

    relations: list[dict[str, Any]]
    columns: list[dict[str, Any]]
    primary_keys: list[dict[str, Any]]
    inherits: list[dict[str, Any]]
    functions: list[dict[str, Any]]
    schemas: list[str]
    builtin_functions: list[str]
    aggregate_functions: list[str]
    types: list[tuple[str, str]]

    def digest(self) -> bytes:
        """A hash of every value, equal for two loads of an unchanged catalog.

        Rows are hashed in sorted order: most queries have no ORDER BY, and a catalog row
        rewritten in place (statistics) may come back elsewhere with the same values.
        """
        h = hashlib.blake2b(digest_size=32)
        for part in (
            self.relations, self.columns, self.primary_keys, self.inherits, self.functions,
            self.schemas, self.builtin_functions, self.aggregate_functions, self.types,
        ):  # fmt: skip
            # repr, not orjson.dumps: with one orjson output per row held for the sort, RSS
            # spiked 6-10 MB for a moment at every load and reload (VmHWM in make soak's
            # slow reader part; why is not established: allocator behaviour of orjson's
            # output buffers is the likely cause).  With repr it did not.  repr of these
            # values (str, int, bool, None, lists of str) is as deterministic.
            for row in sorted(map(repr, part)):
                data = row.encode()
                h.update(len(data).to_bytes(4, "big"))
                h.update(data)
            h.update(b"\xff" * 4)  # no row is that long: ends the part
        return h.digest()

    def snapshot(self) -> CatalogSnapshot:
        return snapshot_from_rows(
            self.relations, self.columns, self.primary_keys, self.inherits, self.functions,
            self.schemas, self.builtin_functions, self.aggregate_functions, self.types,
        )  # fmt: skip


async def fetch_catalog_rows(conn: Any) -> CatalogRows:
    """Run the catalog queries through an ``asyncpg.Connection`` (see :func:`load_catalog`)."""
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        await conn.execute("SET LOCAL search_path = pg_catalog")
        rel_rows = await conn.fetch(_RELATIONS_SQL)
        col_rows = await conn.fetch(_COLUMNS_SQL)
        pk_rows = await conn.fetch(_PKEYS_SQL)
        inh_rows = await conn.fetch(
            "SELECT inhrelid::int8 AS child, inhparent::int8 AS parent FROM pg_catalog.pg_inherits"
        )
        version = int(await conn.fetchval("SELECT current_setting('server_version_num')"))
        source = (
            "CASE WHEN p.prosqlbody IS NOT NULL THEN pg_catalog.pg_get_function_sqlbody(p.oid)"
            " ELSE coalesce(p.prosrc, '') END"
            if version >= 140000
            else "coalesce(p.prosrc, '')"
        )
        fn_rows = await conn.fetch(_FUNCTIONS_SQL.format(source=source))
        builtin_rows = await conn.fetch(
            "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p"
            " WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace"
        )
        schema_rows = await conn.fetch("SELECT nspname FROM pg_catalog.pg_namespace")
        agg_rows = await conn.fetch(
            "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p WHERE p.prokind IN ('a', 'w')"
        )
        type_rows = await conn.fetch(_TYPES_SQL)
    return CatalogRows(
        [dict(r) for r in rel_rows],
        [dict(r) for r in col_rows],
        [dict(r) for r in pk_rows],
        [dict(r) for r in inh_rows],
        [dict(r) for r in fn_rows],
        [str(r["nspname"]) for r in schema_rows],
        [str(r["proname"]) for r in builtin_rows],
        [str(r["proname"]) for r in agg_rows],
        [(str(r["schema"]), str(r["name"])) for r in type_rows],
    )


async def load_catalog(conn: Any) -> CatalogSnapshot:
    """Read a snapshot through an ``asyncpg.Connection`` with read-only catalog queries.

    Runs in one READ ONLY transaction (one consistent picture) with ``search_path`` set to
    ``pg_catalog`` only, so ``pg_get_viewdef`` schema-qualifies every name in view
    definitions and we can resolve them without knowing who created the view.
    """
    rows = await fetch_catalog_rows(conn)
    # Building the snapshot is pure Python over every relation and column (about 0.1 s of
    # CPU for 1,200 relations, more for wide tables): in a thread the event loop keeps
    # serving sessions meanwhile, in slices, where inline it stalled every session of the
    # process for that long after DDL.
    return await asyncio.to_thread(rows.snapshot)


def snapshot_from_rows(
    rel_rows: Iterable[Mapping[str, Any]],
    col_rows: Iterable[Mapping[str, Any]],
    pk_rows: Iterable[Mapping[str, Any]] = (),
    inh_rows: Iterable[Mapping[str, Any]] = (),
    fn_rows: Iterable[Mapping[str, Any]] = (),
    schemas: Iterable[str] = (),
    builtin_functions: Iterable[str] = (),
    aggregate_functions: Iterable[str] = (),
    types: Iterable[tuple[str, str]] = (),
) -> CatalogSnapshot:
    """Assemble a snapshot from catalog query rows (any driver)."""
    rel_meta = {int(r["oid"]): r for r in rel_rows}
    cols: dict[int, list[CatalogColumn]] = {}
    for c in col_rows:
        oid = int(c["oid"])
        meta = rel_meta.get(oid)
        if meta is None:
            continue
        cols.setdefault(oid, []).append(
            CatalogColumn(
                schema=str(meta["schema"]),
                table=str(meta["name"]),
                name=str(c["name"]),
                attnum=int(c["attnum"]),
                type_name=str(c["type_name"]),
                table_oid=oid,
                comment=c["comment"],
                labels=parse_comment_labels(c["comment"]),
            )
        )
    pkeys = {int(r["oid"]): tuple(r["columns"]) for r in pk_rows}
    parents: dict[int, list[int]] = {}
    for r in inh_rows:
        parents.setdefault(int(r["child"]), []).append(int(r["parent"]))
    relations = [
        CatalogRelation(
            oid=oid,
            schema=str(m["schema"]),
            name=str(m["name"]),
            kind=str(m["kind"]),
            columns=tuple(cols.get(oid, ())),
            view_sql=m["view_sql"],
            primary_key=pkeys.get(oid, ()),
            parents=tuple(parents.get(oid, ())),
        )
        for oid, m in rel_meta.items()
    ]
    functions = [
        CatalogFunction(
            schema=str(f["schema"]),
            name=str(f["name"]),
            language=str(f["language"]),
            source=str(f["source"]),
            security_definer=bool(f["secdef"]),
            arguments=str(f.get("arguments", "")),
            result=str(f.get("result", "void")),
            search_path=f.get("search_path"),
        )
        for f in fn_rows
    ]
    return CatalogSnapshot.build(
        relations, schemas, functions, builtin_functions, aggregate_functions, types
    )


def _labelled_snapshot(rows: CatalogRows, rules: LabelRules) -> CatalogSnapshot:
    return rows.snapshot().with_rules(rules)


class Catalog:
    """Holds the current snapshot; reloads it on an interval and soon after ``invalidate()``.

    ``connect`` opens a new asyncpg connection; the holder uses it for a reload and closes
    it ``idle_timeout`` seconds later (see ``policy.ownconn``), so pgwarden never holds a
    database its clients may want to drop or rename. Readers take ``catalog.snapshot``: an
    attribute read, never an await, so the proxy's hot path does not wait on the catalog,
    and the snapshot stays in force while the connection is closed or a reload runs. If a
    reload fails the previous snapshot stays in force and the error is logged; if it fails
    because the database no longer exists (dropped or renamed), ``gone`` is set and the
    holder stops reloading.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        refresh_interval: float = 60.0,
        rules: LabelRules | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        name: str = "",
        settle: float = DEFAULT_SETTLE,
        max_delay: float = DEFAULT_MAX_DELAY,
    ) -> None:
        self._own = IdleConnection(connect, idle_timeout)
        self._interval = refresh_interval
        self._rules = rules or LabelRules()
        self.name = name
        self._snapshot: CatalogSnapshot | None = None
        self._wake = asyncio.Event()
        self._settle = settle
        self._max_delay = max_delay
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.reloads = 0  # snapshots loaded, the first one included
        self.unchanged = 0  # reloads that found the catalog as the snapshot in force has it
        self._digest: bytes | None = None  # CatalogRows.digest() of the snapshot in force
        self._last_cost = 0.0  # seconds the last scheduled reload took
        self.last_error: BaseException | None = None
        self.gone = False

    @property
    def snapshot(self) -> CatalogSnapshot:
        if self._snapshot is None:
            raise RuntimeError("catalog not loaded yet: await Catalog.start() or refresh() first")
        return self._snapshot

    @property
    def rules(self) -> LabelRules:
        return self._rules

    def set_rules(self, rules: LabelRules) -> None:
        """Apply new label rules (policy reload) to the current snapshot at once."""
        self._rules = rules
        if self._snapshot is not None:
            self._snapshot = self._snapshot.with_rules(rules)

    async def refresh(self) -> CatalogSnapshot:
        """Reload now; returns the snapshot in force afterwards.

        When the catalog queries return what they returned for the snapshot in force, that
        snapshot stays (``reloads`` does not count it): the scheduled reload every
        ``refresh_interval`` then costs the queries and no new snapshot.  A new one, every
        minute, made each session's analysis and result caches start again, and the
        process's memory grew with each: ``make soak``'s RSS slope was 537 KiB/min.
        """
        try:
            async with self._own.use() as conn:
                rows = await fetch_catalog_rows(conn)
        except Exception as exc:
            # 3D000 invalid_catalog_name: the database was dropped or renamed under us.
            if getattr(exc, "sqlstate", None) == "3D000":
                self.gone = True
            raise
        # Hashing goes over every row, like building (see load_catalog): in a thread too.
        digest = await asyncio.to_thread(rows.digest)
        if self._snapshot is not None and digest == self._digest:
            self.last_error = None
            self.unchanged += 1
            return self._snapshot
        rules = self._rules
        snap = await asyncio.to_thread(_labelled_snapshot, rows, rules)
        if self._rules is not rules:  # a policy reload came meanwhile: its rules win
            snap = snap.with_rules(self._rules)
        self._snapshot = snap
        self._digest = digest
        self.last_error = None
        self.reloads += 1
        return self._snapshot

    def install(self, snapshot: CatalogSnapshot) -> None:
        """Use ``snapshot`` from now on (loaded elsewhere, or built for a test)."""
        self._snapshot = snapshot.with_rules(self._rules)
        self._digest = None  # not from the queries: the next refresh builds anew

    def invalidate(self) -> None:
        """Ask for a reload soon (DDL went through); safe to call from any coroutine."""
        self._wake.set()

    async def start(self) -> None:
        """Load the first snapshot (errors propagate) and start the refresh loop."""
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="pgwarden-catalog-refresh")

    async def _coalesce(self) -> None:
        """Wait out a burst of invalidations: until none came for ``settle`` seconds, or
        ``max_delay`` after the first, or four times what the last reload took if that is
        longer (at most 8 s): reloading never takes more than about a fifth of the process.

        A migration creating 1,000 tables one statement at a time invalidated the catalog
        1,000 times; reloaded back to back, the reloads took most of the process's time
        and the migration went from 3 s to over a minute. Meanwhile the loaded snapshot
        stays in force, which stays fail-closed: a relation it does not have yet is
        unknown to the analysis, and unknown is refused for subjects with limits.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self._max_delay, 4 * self._last_cost)
        while not self._stopping:
            self._wake.clear()
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(self._settle, left))
            except TimeoutError:
                return  # quiet for long enough

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            if self._stopping:
                return
            if self._wake.is_set():
                await self._coalesce()
            if self._stopping:
                return
            self._wake.clear()
            started = loop.time()
            try:
                before = self.reloads
                snap = await self.refresh()
                if self.reloads == before:
                    log.debug("catalog_unchanged", database=self.name, reloads=self.reloads)
                    continue
                self._last_cost = min(loop.time() - started, 2.0)
                log.info(
                    "catalog_reloaded", database=self.name, relations=len(snap.relations),
                    reloads=self.reloads,
                )  # fmt: skip
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the old snapshot
                self.last_error = exc
                if self.gone:
                    log.info("catalog_database_gone", database=self.name, error=str(exc))
                    return
                log.warning(
                    "catalog_refresh_failed", database=self.name, error=str(exc),
                    kept="previous snapshot",
                )  # fmt: skip

    async def close(self) -> None:
        # Python 3.11's wait_for (here, and inside asyncpg's connect) can swallow a
        # cancellation that lands as what it waits for completes: the loop then went on to
        # sleep a whole refresh interval, and the process did not exit after SIGTERM. The
        # flag ends the loop at its next step whatever became of the cancellation.
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=10)
        await self._own.close()
