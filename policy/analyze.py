"""SQL text -> ``QueryFacts``: what each statement reads, writes and can show its sender.

Public API (what the proxy calls)::

    analyzer = Analyzer(catalog: Catalog | CatalogSnapshot, label_rules: LabelRules,
                        cache_size=10000)
    facts: tuple[QueryFacts, ...] = analyzer.analyze(sql, search_path=("public",), user=None)
    analyzer.column_at(table_oid, attnum) -> CatalogColumn | None   # labels included
    analyzer.row_description_gaps(facts, [(table_oid, attnum), ...]) -> [(position, column)]
    analyzer.snapshot                                                # labelled snapshot in use

One ``QueryFacts`` per statement of a multi-statement string, in order. A ``SET search_path``
inside the string applies to the statements after it. ``analyze`` never raises: a statement
that cannot be parsed or followed comes back with ``unanalysable`` set (parse errors keep
their position), and an empty string gives ``()``.

Results are cached by ``(search_path, user, text)`` in an LRU; the cache empties itself when
the catalog snapshot changes (the facts depend on it) and when a write that copied labelled
data into a table (``CREATE TABLE AS``, ``INSERT ... SELECT``, ``UPDATE ... SET``) has
committed (``analyzer.note_copies``, called by the proxy): from then on the columns it wrote
carry the copied labels (``analyzer.tainted``), in this analyzer, for all sessions.
Likewise a function defined by ``CREATE FUNCTION`` is followed at once, until the catalog
shows it; a call to a function that is neither builtin nor in the catalog is unanalysable.

Session-level statements that refer to earlier ones (``EXECUTE``, ``FETCH``) and the running
``search_path``/role are handled by ``policy.session_sql.SqlSession``, one per connection::

    session = SqlSession(analyzer, search_path=startup_path, user=login_role)
    facts = session.analyze(sql)
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pglast import parser as _pg

from policy.catalog import Catalog, CatalogColumn, CatalogFunction, CatalogSnapshot
from policy.encoding import foreign_encoding
from policy.facts import DataCopy, OutputColumn, QueryFacts, RecordKey
from policy.labels import LabelRules
from policy.lineage.base import Unanalysable
from policy.lineage.builtin import SERVER_FILES, SERVER_FILES_TARGET
from policy.lineage.model import Columns, Exact
from policy.lineage.shared import Shared, tainted_labels
from policy.lineage.tree import Node, const_int, const_str, iter_nodes, names, node_type, sval
from policy.lineage.walker import StatementWalker
from policy.normalize import fingerprint, normalize, normalize_and_shape
from policy.parse import parse_json
from policy.search_path import DEFAULT_SEARCH_PATH, expand_user, parse_search_path

_QUERY_KINDS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_DDL_KINDS = frozenset(
    {
        "ViewStmt",
        "IndexStmt",
        "RuleStmt",
        "CommentStmt",
        "RenameStmt",
        "GrantStmt",
        "GrantRoleStmt",
        "CompositeTypeStmt",
        "DefineStmt",
        "CreateTableAsStmt",
        "SecLabelStmt",
        "ImportForeignSchemaStmt",
    }
)
FETCH_ALL = 9223372036854775807
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def kind_name(node_kind: str) -> str:
    """``CreateTableAsStmt`` -> ``create_table_as``."""
    base = node_kind[:-4] if node_kind.endswith("Stmt") else node_kind
    return _CAMEL.sub("_", base).lower()


class Analyzer:
    """Analyses SQL text against a catalog with label rules; thread-compatible, not thread-safe."""

    def __init__(
        self,
        catalog: Catalog | CatalogSnapshot,
        label_rules: LabelRules | None = None,
        cache_size: int = 10000,
        max_cached_text: int = 65536,
    ) -> None:
        self._catalog = catalog
        self._max_cached_text = max_cached_text
        self._rules = label_rules or LabelRules()
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[Any, ...], tuple[QueryFacts, ...]] = OrderedDict()
        # Facts by statement *shape* (literals blanked), for applications that inline values
        # (simple protocol): only for shapes whose facts cannot depend on a literal.
        self._shapes: dict[tuple[Any, ...], tuple[QueryFacts, ...]] = {}
        self.shape_hits = 0
        self._source: CatalogSnapshot | None = None
        self._shared: Shared | None = None
        self._taint: dict[tuple[str, str], dict[str, frozenset[str]]] = {}
        self._pending: dict[tuple[str, str], CatalogFunction] = {}
        self.hits = 0
        self.misses = 0

    def _current(self) -> Shared:
        snap = self._catalog.snapshot if isinstance(self._catalog, Catalog) else self._catalog
        shared = self._shared
        if shared is None or snap is not self._source:
            # A new snapshot: labels, views and every cached answer may have changed.
            labelled = snap.with_rules(self._rules) if self._rules.rules else snap
            # Functions created through us that the new snapshot now shows need no stand-in.
            for key in [k for k in self._pending if snap.user_functions(*k)]:
                del self._pending[key]
            pending = {k: (f,) for k, f in self._pending.items()}
            taint = {k: dict(v) for k, v in self._taint.items()}
            shared = Shared(labelled, self._rules.labels_for, taint, pending)
            self._shared = shared
            self._source = snap
            self._cache.clear()
            self._shapes.clear()
        return shared

    @property
    def snapshot(self) -> CatalogSnapshot:
        return self._current().snapshot

    def set_rules(self, rules: LabelRules) -> None:
        """New label rules (policy reload): drops the cache."""
        self._rules = rules
        self._source = None

    def column_at(self, table_oid: int, attnum: int) -> CatalogColumn | None:
        """The labelled catalog column behind a RowDescription field (copy taint included)."""
        col = self._current().snapshot.column_at(table_oid, attnum)
        if col is not None:
            schema = "pg_temp" if col.schema.startswith("pg_temp_") else col.schema
            columns = self._taint.get((schema, col.table))
            tainted = tainted_labels(columns, col.name) if columns else frozenset()
            if tainted and not tainted <= col.labels:
                col = replace(col, labels=col.labels | tainted)
        return col

    def row_description_gaps(
        self, facts: QueryFacts, fields: Sequence[tuple[int, int]]
    ) -> list[tuple[int, CatalogColumn]]:
        """Cross-check the analysis against a RowDescription.

        ``fields`` are the (table OID, attribute number) pairs of the result's columns, in
        order. Returns the positions whose catalog column carries a label the analysis did not
        give that output column (an empty list when the analysis covered everything). A gap
        means the analysis missed something: the proxy should treat the statement as reading
        those labels, and log it.
        """
        gaps: list[tuple[int, CatalogColumn]] = []
        for i, (oid, attnum) in enumerate(fields):
            if not oid:
                continue
            col = self.column_at(oid, attnum)
            if col is None or not col.labels:
                continue
            if i >= len(facts.output) or not col.labels <= facts.output[i].labels:
                gaps.append((i, col))
        return gaps

    def cache_clear(self) -> None:
        self._cache.clear()
        self._shapes.clear()

    def analyze(
        self,
        sql: str,
        search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH,
        user: str | None = None,
    ) -> tuple[QueryFacts, ...]:
        """Facts for each statement in ``sql``; cached; never raises."""
        try:
            shared = self._current()
        except Exception as exc:  # no catalog yet: nothing can be resolved, fail closed
            norm, shape_text = normalize_and_shape(sql)
            return (
                QueryFacts(
                    kind="unknown",
                    normalized=norm,
                    fingerprint=fingerprint(sql, shape_text),
                    unanalysable=f"no catalog to analyse against: {exc}",
                ),
            )
        if type(search_path) is not tuple:
            search_path = tuple(search_path)
        key = (search_path, user, sql)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        shape = shape_key(sql)
        if shape is not None:
            reused = self._shapes.get((search_path, user, shape))
            if reused is not None:
                self.shape_hits += 1
                return reused
        try:
            result = analyze_text(sql, search_path, user, shared)
        except Exception as exc:  # a bug here must not take the session down
            norm, shape_text = normalize_and_shape(sql)
            result = (
                QueryFacts(
                    kind="unknown",
                    normalized=norm,
                    fingerprint=fingerprint(sql, shape_text),
                    unanalysable=f"internal error in analysis: {type(exc).__name__}",
                ),
            )
        if self._note_functions(result):
            # A function was defined: from now on calls to it are followed, for this text
            # too (a later statement in the same string may call it).
            shared = self._current()
            result = analyze_text(sql, search_path, user, shared)
            cache = self._cache
        # Bulk INSERT ... VALUES texts are large and rarely repeat: keep them out of the cache.
        if len(sql) <= self._max_cached_text:
            cache[key] = result
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
            if shape is not None and shape_reusable(result):
                shapes = self._shapes
                shapes[(search_path, user, shape)] = tuple(
                    f
                    if f.limit is None and f.offset is None and f.fetch_count is None
                    else replace(f, limit=None, offset=None, fetch_count=None)
                    for f in result
                )
                if len(shapes) > self._cache_size:
                    shapes.pop(next(iter(shapes)))
        return result

    @property
    def tainted(self) -> dict[tuple[str, str], dict[str, frozenset[str]]]:
        """Columns labelled data was copied into (by committed writes), and the labels they
        now carry; column "*" stands for a column not known."""
        return {k: dict(v) for k, v in self._taint.items()}

    def note_copies(self, copies: Sequence[DataCopy]) -> bool:
        """Writes that copied labelled data have committed: from now on the columns they
        wrote carry the copied labels, for every session of this analyzer.  Called by the
        proxy when the transaction that made the copies commits, never for a refused or
        rolled-back statement.  True when a label was added (the cache is then dropped)."""
        changed = False
        for cp in copies:
            if not cp.labels:
                continue
            schema, _, name = cp.target.partition(".")
            columns = self._taint.setdefault((schema, name), {})
            old = columns.get(cp.column, frozenset())
            if not cp.labels <= old:
                columns[cp.column] = old | cp.labels
                changed = True
        if changed:
            self._source = None  # rebuild labels and drop cached answers
        return changed

    def _note_functions(self, facts: tuple[QueryFacts, ...]) -> bool:
        changed = False
        for f in facts:
            if f.defines_function is not None:
                key = (f.defines_function.schema, f.defines_function.name)
                if self._pending.get(key) != f.defines_function:
                    self._pending[key] = f.defines_function
                    changed = True
        if changed:
            self._source = None  # rebuild and drop cached answers
        return changed


def analyze_text(
    sql: str, search_path: tuple[str, ...], user: str | None, shared: Shared
) -> tuple[QueryFacts, ...]:
    """Uncached analysis of every statement in ``sql``."""
    try:
        tree = parse_json(sql)
    except UnicodeEncodeError:
        norm, shape_text = normalize_and_shape(sql)
        return (
            QueryFacts(
                kind="unknown", normalized=norm, fingerprint=fingerprint(sql, shape_text),
                unanalysable="the statement's bytes are not UTF-8 (pgwarden reads SQL as "
                "UTF-8: set client_encoding to UTF8)",
            ),
        )  # fmt: skip
    except ValueError:
        # The parser's tree nests deeper than the JSON decoder goes (~150 levels of
        # subqueries): refused as what it is, not as an internal error.
        norm, shape_text = normalize_and_shape(sql)
        return (
            QueryFacts(
                kind="unknown", normalized=norm, fingerprint=fingerprint(sql, shape_text),
                unanalysable="statement nests too deeply to analyse",
            ),
        )  # fmt: skip
    except _pg.ParseError as exc:
        norm, shape_text = normalize_and_shape(sql)
        pos = exc.args[1] if len(exc.args) > 1 else None
        if not isinstance(pos, int):
            pos = len(sql)  # "at end of input"
        where = f" at offset {pos}"
        message = _redact_error(str(exc.args[0]) if exc.args else str(exc))
        return (
            QueryFacts(
                kind="unknown",
                normalized=norm,
                fingerprint=fingerprint(sql, shape_text),
                unanalysable=f"parse error{where}: {message}",
                error_position=pos,
            ),
        )
    stmts = tree.get("stmts") or []
    if not stmts:
        return ()
    raw_bytes = None if sql.isascii() else sql.encode()
    path = search_path
    out: list[QueryFacts] = []
    for raw in stmts:
        start = raw.get("stmt_location", 0)
        length = raw.get("stmt_len", 0)
        if raw_bytes is None:
            text = sql[start : start + length] if length else sql[start:]
            char_start = start
        else:
            chunk = raw_bytes[start : start + length] if length else raw_bytes[start:]
            text = chunk.decode(errors="replace")
            char_start = len(raw_bytes[:start].decode(errors="replace"))
        facts = analyze_statement(raw["stmt"], text.strip(), expand_user(path, user), shared)
        if char_start:
            facts = replace(facts, location=char_start)
        if facts.search_path is not None:
            path = facts.search_path
        out.append(facts)
    return tuple(out)


_NEAR_RE = re.compile(r'at or near "(.*)"$', re.DOTALL)


def _redact_error(message: str) -> str:
    """PostgreSQL quotes the offending text in parse errors; it may be a literal."""
    return _NEAR_RE.sub(lambda m: f'at or near "{normalize(m.group(1))}"', message)


def analyze_statement(
    stmt: Node, text: str, search_path: tuple[str, ...], shared: Shared
) -> QueryFacts:
    """Facts for one parsed statement whose text is ``text``."""
    kind, n = node_type(stmt)
    norm, shape_text = normalize_and_shape(text)
    fp = fingerprint(text, shape_text)
    w = StatementWalker(shared, search_path)
    f: dict[str, Any] = {"kind": kind_name(kind)}
    output: Columns = []
    try:
        if kind in _QUERY_KINDS:
            output = w.query(stmt, None, {})
            _statement_shape(kind, n, f)
            if kind == "SelectStmt":
                if n.get("intoClause"):
                    f["kind"] = "select_into"
                    output = []
                if _may_name_set_config(text):
                    _set_config_calls(n, f)
        elif kind == "CopyStmt":
            output = _copy(w, n, f)
        elif kind == "CreateTableAsStmt":
            f["is_ddl"] = True
            qk, _q = node_type(n["query"])
            if qk == "ExecuteStmt":
                raise Unanalysable(
                    "CREATE TABLE AS EXECUTE: the prepared statement is not known here"
                )
            cols = w.query(n["query"], None, {})
            w.write_copy(n["into"]["rel"], cols, names(n["into"].get("colNames")))
        elif kind == "PrepareStmt":
            f["prepared_name"] = n.get("name")
            f["inner_sql"] = _after_keyword(text, "AS")
            output = w.query(n["query"], None, {})
            _statement_shape(*node_type(n["query"]), f)
        elif kind == "ExecuteStmt":
            f["prepared_name"] = n.get("name")
            w.expr(n.get("params"), None)
        elif kind == "DeallocateStmt":
            f["prepared_name"] = n.get("name")
        elif kind == "DeclareCursorStmt":
            f["cursor_name"] = n.get("portalname")
            f["inner_sql"] = _after_keyword(text, "FOR")
            output = w.query(n["query"], None, {})
            # The cursor's query decides whether the read is bounded (WHERE / LIMIT).
            _statement_shape(*node_type(n["query"]), f)
        elif kind == "FetchStmt":
            f["kind"] = "move" if n.get("ismove") else "fetch"
            f["cursor_name"] = n.get("portalname")
            how = n.get("howMany", 0)
            f["fetch_count"] = None if how == FETCH_ALL else how
        elif kind == "ClosePortalStmt":
            f["cursor_name"] = n.get("portalname")
        elif kind == "VariableSetStmt":
            _variable_set(n, f)
        elif kind == "DoStmt":
            raise Unanalysable("DO block: procedural code cannot be analysed")
        elif kind == "CallStmt":
            w.expr(n.get("funccall"), None)
        elif kind == "ExplainStmt":
            inner = analyze_statement(n["query"], text, search_path, shared)
            analyse_run = any(
                o.get("DefElem", {}).get("defname") == "analyze" for o in n.get("options") or ()
            )
            return replace(
                inner,
                kind="explain",
                normalized=norm,
                fingerprint=fp,
                output=(),
                record_keys=(),
                value_positions=(),
                # Plain EXPLAIN plans without running: nothing is written or copied.
                relations_written=inner.relations_written if analyse_run else frozenset(),
                copies=inner.copies if analyse_run else (),
            )
        elif kind == "CreateFunctionStmt":
            f["kind"] = "create_procedure" if n.get("is_procedure") else "create_function"
            f["is_ddl"] = True
            defined = _defined_function(n, text, w)
            if defined is not None:
                f["defines_function"] = defined
        elif kind == "ViewStmt":
            f["kind"] = "create_view"
            f["is_ddl"] = True
            schema, name = w.qualify_target(n["view"])
            f["relations_written"] = frozenset({f"{schema}.{name}"})
            w.query(n["query"], None, {})
        elif kind == "TruncateStmt":
            for rv in n.get("relations") or ():
                schema, name = w.qualify_target(rv["RangeVar"])
                w.writes.add(f"{schema}.{name}")
        elif kind in _DDL_KINDS or kind.startswith(("Create", "Alter", "Drop")):
            f["is_ddl"] = True
        if kind in ("CreateStmt", "CreateTableAsStmt"):
            _own_code(n, shared)
    except Unanalysable as exc:
        w.unanalysable.append(str(exc))
    except RecursionError:
        w.unanalysable.append("statement nests too deeply to analyse")
    inner_sql = f.get("inner_sql")
    if inner_sql and f["kind"] in ("prepare", "declare_cursor"):
        # The shape of what it runs: PREPARE s AS q, DECLARE c CURSOR FOR q and q sent by
        # Query or Parse are one statement shape (allow-lists, the trail's fingerprints).
        fp = fingerprint(inner_sql)
    return _finish(w, f, output, norm, fp)


def _finish(
    w: StatementWalker, f: dict[str, Any], output: Columns, norm: str, fp: str
) -> QueryFacts:
    lab = w.shared.lineage_labels
    out_cols = tuple(
        OutputColumn(name, lin, lab(lin), lab(s for s in lin if s.combined)) for name, lin in output
    )
    filters = frozenset(w.filters)
    writes = frozenset(w.writes) | f.pop("relations_written", frozenset())
    unanalysable = "; ".join(dict.fromkeys(w.unanalysable)) or None
    if w.reads or writes:
        # The relations as resolved: the same text reads crm.customers under one
        # search_path and public.customers under another; a shape is one of them.
        fp = fingerprint("", " ".join((fp, *sorted(w.reads), "|", *sorted(writes))))
    return QueryFacts(
        normalized=norm,
        fingerprint=fp,
        relations_read=frozenset(w.reads),
        relations_written=writes,
        output=out_cols,
        filter_columns=filters,
        filter_labels=lab(filters),
        functions=frozenset(w.functions),
        packing=tuple(dict.fromkeys(w.packing)),
        star_tables=frozenset(w.star_tables),
        copies=tuple(dict.fromkeys(w.copies)),
        user_functions=frozenset(w.user_functions),
        unresolved=tuple(dict.fromkeys(w.unresolved)),
        unknown=tuple(dict.fromkeys(w.unknown)),
        records_per_row=_records_per_row(w, out_cols),
        mixed_relations=_mixed_relations(w, out_cols),
        columns_written=frozenset(w.columns_written),
        unanalysable=unanalysable,
        record_keys=(keys := _record_keys(w.snapshot, out_cols)),
        value_positions=_value_positions(w, out_cols, keys),
        **f,
    )


def _record_keys(snapshot: CatalogSnapshot, out: tuple[OutputColumn, ...]) -> tuple[RecordKey, ...]:
    """Where the primary key of each labelled table sits in the output, when all of it does.

    Only plain copies of a key column count (``lineage.Exact``: the column itself, through
    views, subqueries, CTEs and joins; not ``customer_id + 1000`` or ``nullif(customer_id,
    7)``, which derive from the key alone but name another record or none); the record
    ledger hashes these values to answer "which customers did this person see".
    """
    if not out:
        return ()
    positions: dict[tuple[str, str], dict[str, int]] = {}
    labelled: set[tuple[str, str]] = set()
    for i, col in enumerate(out):
        for src in col.sources:
            if col.labels:
                labelled.add((src.schema, src.table))
        if isinstance(col.sources, Exact):
            for src in col.sources.columns:
                positions.setdefault((src.schema, src.table), {}).setdefault(src.column, i)
    keys: list[RecordKey] = []
    for rel_key in sorted(labelled):
        rel = snapshot.relation(*rel_key)
        if rel is None or not rel.primary_key:
            continue
        found = positions.get(rel_key, {})
        if all(k in found for k in rel.primary_key):
            keys.append(
                RecordKey(rel.qualified, rel.primary_key, tuple(found[k] for k in rel.primary_key))
            )
    return tuple(keys)


def _records_per_row(w: StatementWalker, out: tuple[OutputColumn, ...]) -> int:
    """How many rows of one labelled relation can meet in one output row: the times the
    statement reads it where its rows reach the output (``StatementWalker.instances``)."""
    labels_of = w.shared.labels_of
    most = 1
    seen: set[str] = set()
    for col in out:
        if not col.labels:
            continue
        for s in col.sources:
            rel = f"{s.schema}.{s.table}"
            if rel not in seen and labels_of(s):
                seen.add(rel)
                most = max(most, w.instances.get(rel, 1))
    return most


def _mixed_relations(w: StatementWalker, out: tuple[OutputColumn, ...]) -> frozenset[str]:
    """Labelled relations whose values reach the output from more than one of their rows
    per output row (see ``QueryFacts.mixed_relations``)."""
    labels_of = w.shared.labels_of
    reaching = {
        f"{s.schema}.{s.table}" for col in out if col.labels for s in col.sources if labels_of(s)
    }
    if w.row_mixing:
        return frozenset(reaching)
    return frozenset(rel for rel in reaching if w.instances.get(rel, 1) > 1)


def _value_positions(
    w: StatementWalker, out: tuple[OutputColumn, ...], keys: tuple[RecordKey, ...]
) -> tuple[int, ...]:
    """Output columns whose labelled values no record key in the same row accounts for: the
    ledger keeps their values.  A key accounts for a relation's labelled columns only when
    the statement reads that relation once where rows reach the output and no window
    function or grouping set mixes rows; otherwise (a self-join, a scalar subquery over
    customers, ``lag(email)``) a row may carry one record's key and another's data."""
    if not out:
        return ()
    keyed = (
        set() if w.row_mixing else {k.relation for k in keys if w.instances.get(k.relation, 0) <= 1}
    )
    labels_of = w.shared.labels_of
    return tuple(
        i
        for i, col in enumerate(out)
        if col.labels
        and any(f"{s.schema}.{s.table}" not in keyed for s in col.sources if labels_of(s))
    )


def _statement_shape(kind: str, n: Node, f: dict[str, Any]) -> None:
    """WHERE / LIMIT / OFFSET of the outermost query."""
    if kind == "SelectStmt":
        f["has_where"] = _select_has_where(n)
        count = n.get("limitCount")
        if count is not None and not _is_null_const(count):
            f["has_limit"] = True
            if n.get("limitOption") != "LIMIT_OPTION_WITH_TIES":
                f["limit"] = const_int(count)
        f["offset"] = const_int(n.get("limitOffset"))
    elif kind in ("UpdateStmt", "DeleteStmt"):
        f["has_where"] = _real_where(n.get("whereClause"))


def _select_has_where(n: Node, ctes: dict[str, Node] | None = None) -> bool:
    """Whether every row a SELECT returns passed a filter: its own WHERE, or, for each of
    its FROM items, one of theirs (a subquery or CTE with a WHERE, a function called with a
    parameter); a SELECT of no table (``SELECT 0, '-'`` beside a UNION) reads nothing."""
    ctes = dict(ctes or {})
    wc = n.get("withClause")
    if wc:
        body = wc.get("WithClause", wc)
        if not body.get("recursive"):
            for item in body.get("ctes") or ():
                c = item.get("CommonTableExpr", {})
                ctes[c.get("ctename", "")] = c.get("ctequery", {})
    if n.get("op", "SETOP_NONE") != "SETOP_NONE":
        return _select_has_where(n["larg"], ctes) and _select_has_where(n["rarg"], ctes)
    if _real_where(n.get("whereClause")):
        return True
    from_clause = n.get("fromClause")
    if not from_clause:
        return True
    return all(_filtered_item(item, ctes) for item in from_clause)


def _filtered_item(item: Node, ctes: dict[str, Node]) -> bool:
    """A FROM item all of whose rows passed a filter of their own."""
    kind, v = node_type(item)
    if kind == "RangeSubselect":
        qk, q = node_type(v.get("subquery", {}))
        return qk == "SelectStmt" and _select_has_where(q, ctes)
    if kind == "RangeVar" and not v.get("schemaname") and v.get("relname") in ctes:
        qk, q = node_type(ctes[v["relname"]])
        inner = {k: c for k, c in ctes.items() if k != v["relname"]}
        return qk == "SelectStmt" and _select_has_where(q, inner)
    if kind == "JoinExpr":
        return _filtered_item(v["larg"], ctes) and _filtered_item(v["rarg"], ctes)
    return _parameterised_function([item])


def _parameterised_function(from_clause: list[Node] | None) -> bool:
    """FROM items that are all functions called with a parameter (``ticket_customer($1)``):
    the argument is the filter, applied inside the function. (A constant argument is not:
    ``search_customers('%')`` is the classic way around such a rule.) The row limit and the
    windows still count whatever it returns."""
    if not from_clause:
        return False
    for item in from_clause:
        rf = item.get("RangeFunction")
        if rf is None or not any(
            any(True for _ in iter_nodes(call.get("args"), "ParamRef"))
            for call in iter_nodes(rf.get("functions"), "FuncCall")
        ):
            return False  # another FROM item (a table) with no WHERE of its own
    return True


def _real_where(where: Node | None) -> bool:
    """A WHERE that mentions no column (``WHERE true``, ``WHERE 1 = 1``) filters nothing: it
    is the classic way to get past a "no unfiltered scans" rule."""
    if where is None:
        return False
    return any(True for _ in iter_nodes(where, "ColumnRef"))


def _is_null_const(node: Node) -> bool:
    c = node.get("A_Const")
    return bool(c is not None and c.get("isnull"))


def _copy(w: StatementWalker, n: Node, f: dict[str, Any]) -> Columns:
    is_from = bool(n.get("is_from"))
    program = bool(n.get("is_program"))
    target = "program" if program else ("file" if n.get("filename") else None)
    f["copy_direction"] = "from" if is_from else "to"
    f["copy_target"] = target or ("stdin" if is_from else "stdout")
    f["copy_program"] = program
    f["copy_options"] = _copy_options(n)
    out = _copy_columns(w, n, f, is_from)
    if target is not None:
        # Server files are a place data can be parked and read back (pg_read_file, COPY FROM).
        if is_from:
            schema, name = w.qualify_target(n["relation"])
            w.record_copy(f"{schema}.{name}", [("", frozenset((SERVER_FILES,)))])
        else:
            w.record_copy(SERVER_FILES_TARGET, [("*", lin) for _c, lin in out])
    return out


def _copy_options(n: Node) -> tuple[tuple[str, str], ...]:
    """``WITH (FORMAT csv, DELIMITER ';', HEADER)`` -> (("format", "csv"), ...): what the
    proxy needs to read the rows of the COPY's output.  List-valued options are left out."""
    out: list[tuple[str, str]] = []
    for item in n.get("options") or ():
        d = item.get("DefElem") or {}
        arg = d.get("arg")
        if arg is None:
            value = "true"
        elif "String" in arg:
            value = str(arg["String"].get("sval", ""))
        elif "Boolean" in arg:
            value = "true" if arg["Boolean"].get("boolval") else "false"
        elif "Integer" in arg:
            value = str(arg["Integer"].get("ival", 0))
        else:
            continue
        out.append((str(d.get("defname", "")).lower(), value))
    return tuple(out)


def _copy_columns(w: StatementWalker, n: Node, f: dict[str, Any], is_from: bool) -> Columns:
    if n.get("query"):
        f["copy_source"] = "query"
        return w.query(n["query"], None, {})
    rv = n["relation"]
    attlist = names(n.get("attlist"))
    if is_from:
        schema, name = w.qualify_target(rv)
        w.writes.add(f"{schema}.{name}")
        w.columns_written |= {f"{schema}.{name}.{a}" for a in attlist or ("*",)}
        return []
    rel = w.range_var(rv, None, {})
    f["copy_source"] = rel.relation
    if not attlist:
        w._mark_star(rel)
        return list(rel.columns)
    out: Columns = []
    for a in attlist:
        lin = rel.lookup(a)
        out.append((a, lin if lin is not None else frozenset()))
    return out


def _variable_set(n: Node, f: dict[str, Any]) -> None:
    name = n.get("name")
    vkind = n.get("kind")
    if name == "standard_conforming_strings" and vkind == "VAR_SET_VALUE":
        args = n.get("args") or []
        value = (const_str(args[0]) or "") if args else ""
        if value.lower() not in ("on", "true", "yes", "1"):
            raise Unanalysable(
                "standard_conforming_strings off: PostgreSQL would read backslashes in string "
                "literals as escapes, and pgwarden's reading of the SQL would differ"
            )
    if name == "client_encoding" and vkind == "VAR_SET_VALUE":
        args = n.get("args") or []
        value = (const_str(args[0]) or "") if args else ""
        if not value or foreign_encoding(value) is not None:
            raise Unanalysable(
                f"client_encoding {value or '(not a constant)'}: not an encoding known to keep "
                "quotes and backslashes whole characters, so PostgreSQL and pgwarden could read "
                "the statements after it differently"
            )
    if name in ("role", "session_authorization"):
        args = n.get("args") or []
        role = const_str(args[0]) if args and vkind == "VAR_SET_VALUE" else "none"
        f["role"] = role if role is not None else "none"
        return
    if vkind == "VAR_RESET_ALL" or (
        name == "search_path" and vkind in ("VAR_RESET", "VAR_SET_DEFAULT")
    ):
        f["search_path"] = DEFAULT_SEARCH_PATH
        f["search_path_local"] = bool(n.get("is_local"))
        f["search_path_reset"] = True
        return
    if name != "search_path" or vkind != "VAR_SET_VALUE":
        return
    path: list[str] = []
    for a in n.get("args") or ():
        s = const_str(a)
        if s is None:
            raise Unanalysable("search_path set to a value that is not a constant")
        # Each list element is one schema name, verbatim (PostgreSQL quotes it as needed).
        path.append(s)
    f["search_path"] = tuple(path)
    f["search_path_local"] = bool(n.get("is_local"))


def _own_code(n: Node, shared: Shared) -> None:
    """A table whose defaults, generated columns or checks call a function that is not
    PostgreSQL's own runs that function on every INSERT, unseen by the analysis."""
    builtins = shared.snapshot.builtin_functions
    for call in iter_nodes(
        [n.get("tableElts"), n.get("constraints"), n.get("partspec")], "FuncCall"
    ):
        fname = names(call.get("funcname"))
        name = fname[-1].lower() if fname else ""
        if (len(fname) > 1 and fname[0] != "pg_catalog") or (builtins and name not in builtins):
            raise Unanalysable(f"CREATE TABLE calls function {'.'.join(fname)}")


def _may_name_set_config(text: str) -> bool:
    """Whether a statement's text can call set_config: it names it, plainly, quoted, or in a
    Unicode-escaped identifier (``U&"set\\005fconfig"``).  Most statements do not, and the
    walk of their whole tree looking for the call was a tenth of an analysis."""
    low = text.lower()
    return "set_config" in low or "u&" in low


def _set_config_calls(n: Node, f: dict[str, Any]) -> None:
    for call in iter_nodes(n, "FuncCall"):
        fname = names(call.get("funcname"))
        if not fname or fname[-1] != "set_config":
            continue
        args = call.get("args") or []
        if args and const_str(args[0]) in ("standard_conforming_strings", "client_encoding"):
            raise Unanalysable(f"set_config() of {const_str(args[0])}")
        if len(args) < 2 or const_str(args[0]) != "search_path":
            if args and const_str(args[0]) is None:
                raise Unanalysable("set_config() with a setting name chosen at run time")
            continue
        value = const_str(args[1])
        if value is None:
            raise Unanalysable("search_path set to a value that is not a constant")
        f["search_path"] = parse_search_path(value)
        local = args[2].get("A_Const", {}).get("boolval", {}) if len(args) > 2 else {}
        f["search_path_local"] = bool(local.get("boolval"))


def _defined_function(n: Node, text: str, w: StatementWalker) -> CatalogFunction | None:
    """The function a CREATE FUNCTION/PROCEDURE defines, as the catalog will show it.

    Calls to it may arrive before the catalog refresh that the DDL triggers completes (or in
    the same query string); the analyzer uses this definition until then.
    """
    fname = names(n.get("funcname"))
    if not fname:
        return None
    schema = fname[-2] if len(fname) > 1 else w.creation_schema()
    language = "sql" if n.get("sql_body") else ""
    source = ""
    for o in n.get("options") or ():
        d = o.get("DefElem", {})
        if d.get("defname") == "language":
            language = sval(d.get("arg", {})).lower()
        elif d.get("defname") == "as":
            items = d.get("arg", {}).get("List", {}).get("items", [])
            source = sval(items[0]) if items else ""
    if n.get("sql_body"):
        source = _from_keyword(text, ("BEGIN_P", "RETURN")) or ""
    arguments, result = _signature(text, bool(n.get("is_procedure")))
    return CatalogFunction(schema, fname[-1], language, source, arguments=arguments, result=result)


def _signature(text: str, is_procedure: bool) -> tuple[str, str]:
    """Argument list and result type as ``pg_get_function_arguments``/``_result`` print them
    (near enough for the PL/pgSQL parser's checks of RETURN forms)."""
    from pglast import parse_sql  # node objects: slow, but CREATE FUNCTION is rare
    from pglast.stream import RawStream

    try:
        node: Any = parse_sql(text)[0].stmt
    except Exception:
        return "", "void"
    params = list(node.parameters or ())
    table = [p for p in params if str(p.mode.value) == "t"]
    args = ", ".join(RawStream()(p) for p in params if str(p.mode.value) != "t")
    if table:
        return args, "TABLE(" + ", ".join(RawStream()(p) for p in table) + ")"
    if node.returnType is not None:
        return args, RawStream()(node.returnType)
    has_out = any(str(p.mode.value) in ("o", "b") for p in params)
    return args, "record" if has_out and not is_procedure else "void"


def _top_level_token(text: str, keywords: tuple[str, ...]) -> Any:
    """The first token among ``keywords`` outside parentheses, or None."""
    try:
        tokens = _pg.scan(text)
    except Exception:
        return None
    depth = 0
    for t in tokens:
        if t.name == "ASCII_40":
            depth += 1
        elif t.name == "ASCII_41":
            depth -= 1
        elif depth == 0 and t.name in keywords:
            return t
    return None


def _from_keyword(text: str, keywords: tuple[str, ...]) -> str | None:
    """The text from the first top-level token among ``keywords`` to the end."""
    t = _top_level_token(text, keywords)
    return None if t is None else text[t.start :].strip().rstrip(";").strip()


def _after_keyword(text: str, keyword: str) -> str | None:
    """The text after the first top-level ``keyword`` token (PREPARE ... AS, DECLARE ... FOR)."""
    t = _top_level_token(text, (keyword,))
    return None if t is None else text[t.end + 1 :].strip().rstrip(";").strip()


# --- statement shapes -------------------------------------------------------------------------
#
# Applications that inline values (``WHERE aid = 48121``) send a new text for every statement,
# and analysing each from scratch costs ~100 us.  Two texts that differ only inside literals
# have the same lineage, unless a literal *names* something: SQL in query_to_xml('...'), a
# setting in set_config('search_path', ...), a file, a sequence.  So a shape is shared only
#
# * when the text is lexically plain: no comments, no dollar quoting or parameters, no
#   backslashes (no escape-string rules), a single statement; anything else is analysed in
#   full, so no lexing subtlety can make two different statements look alike; and
# * when the facts are of a plain query (SELECT/INSERT/UPDATE/DELETE), fully analysed,
#   changing no setting, calling only functions from an allowlist of value functions.
#
# The blanked key keeps everything but the contents of '...' literals and numbers verbatim,
# double-quoted identifiers included.
#
# Written so that every alternative starts with a character (a quote or a digit): the regex
# engine then skips to the next such character instead of trying each position, and a quoted
# run is consumed a stretch at a time rather than a character at a time (twice as fast on
# the support workload's texts; the same matches: the digit's look-behind checks the
# character before the number, as ``(?<![\w$"])\d+`` did).
_SHAPE_TOKEN = re.compile(
    r"""'[^']*(?:''[^']*)*'|"[^"]*(?:""[^"]*)*"|\d(?<![\w$"]\d)\d*(?:\.\d+)?(?:[eE][+-]?\d+)?"""
)
# The same without quoted identifiers, for the common text that has none: a plain
# replacement, with no Python callback per literal.
_SHAPE_LITERAL = re.compile(
    r"""'[^']*(?:''[^']*)*'|\d(?<![\w$"]\d)\d*(?:\.\d+)?(?:[eE][+-]?\d+)?"""
)
# The text before a final /* ... */ (no '*' inside it) and an optional ';' after it.
_TRAILING_COMMENT = re.compile(r"(?s)^(.*?)\s*/\*[^*]*\*/\s*(;?)\s*$")
_SHAPE_UNSAFE = re.compile(r"/\*|--|\$|\\|;.*\S", re.DOTALL)
_SHAPE_KINDS = frozenset({"select", "insert", "update", "delete"})
SHAPE_SAFE_FUNCTIONS = frozenset({
    "count", "sum", "avg", "min", "max", "lower", "upper", "coalesce", "nullif", "greatest",
    "least", "length", "char_length", "trim", "btrim", "ltrim", "rtrim", "substr", "substring",
    "left", "right", "concat", "concat_ws", "replace", "abs", "round", "floor", "ceil",
    "now", "current_date", "current_timestamp", "date_trunc", "date_part", "extract", "age",
    "to_char", "to_date", "to_timestamp", "position", "strpos", "split_part", "initcap",
    "bool_and", "bool_or", "every", "row_number", "rank", "dense_rank", "random",
    # Pure text, number and date helpers: a literal argument cannot change what is read.
    "lpad", "rpad", "reverse", "repeat", "translate", "starts_with", "md5", "to_number",
    "format", "octet_length", "bit_length", "mod", "power", "sqrt", "trunc", "sign",
    "make_date", "make_time", "make_timestamp", "make_timestamptz", "make_interval",
    "date_bin", "justify_days", "justify_hours", "array_length", "cardinality",
})  # fmt: skip


def shape_key(sql: str) -> str | None:
    """The text with literal contents blanked, or None when the text is not plain enough.

    A trailing comment (sqlcommenter's ``/* end_user='alice' */``, which applications add to
    every statement) is dropped first: the parser ignores it, so facts cannot depend on it,
    and the rest of the text must pass the same checks as any other."""
    if len(sql) > 8192:
        return None
    if sql.rstrip().endswith(("*/", "*/;")):
        m = _TRAILING_COMMENT.match(sql)
        if m is None:
            return None
        sql = m.group(1) + m.group(2)
    if _SHAPE_UNSAFE.search(sql) or sql.count("'") % 2 or sql.count('"') % 2:
        return None
    if '"' not in sql:
        return _SHAPE_LITERAL.sub("?", sql)
    return _SHAPE_TOKEN.sub(lambda m: m.group(0) if m.group(0)[0] == '"' else "?", sql)


def shape_reusable(facts: tuple[QueryFacts, ...]) -> bool:
    """Whether these facts hold for every text of the same shape (see above)."""
    if len(facts) != 1:
        return False
    f = facts[0]
    return (
        f.kind in _SHAPE_KINDS
        and f.unanalysable is None
        and f.search_path is None
        and not f.is_ddl
        and not f.copies
        and not f.user_functions
        and all(fn.rsplit(".", 1)[-1] in SHAPE_SAFE_FUNCTIONS for fn in f.functions)
    )
