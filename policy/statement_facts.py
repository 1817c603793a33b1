"""One parsed statement -> ``QueryFacts``.  Dispatches on the statement's kind: queries are
walked by ``policy.lineage.walker.StatementWalker`` (with the shape of their outermost WHERE
and LIMIT), utility statements are read by ``policy.utility_facts``, EXPLAIN by the
statement it explains; then the walk's accumulators become the facts, with what only the
whole output can tell: where each labelled table's primary key sits (record keys), how many
records one row can carry and which output columns hold values no key accounts for.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from policy.catalog import CatalogSnapshot
from policy.facts import OutputColumn, QueryFacts, RecordKey
from policy.lineage.base import Unanalysable
from policy.lineage.model import Columns, Exact
from policy.lineage.shared import Shared
from policy.lineage.tree import Node, const_int, iter_nodes, names, node_type
from policy.lineage.walker import StatementWalker
from policy.normalize import fingerprint, normalize_and_shape
from policy.utility_facts import (
    after_keyword,
    copy_statement,
    defined_function,
    may_name_set_config,
    own_code,
    set_config_calls,
    variable_set,
)

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
                if may_name_set_config(text):
                    set_config_calls(n, f)
        elif kind == "CopyStmt":
            output = copy_statement(w, n, f)
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
            f["inner_sql"] = after_keyword(text, "AS")
            output = w.query(n["query"], None, {})
            _statement_shape(*node_type(n["query"]), f)
        elif kind == "ExecuteStmt":
            f["prepared_name"] = n.get("name")
            w.expr(n.get("params"), None)
        elif kind == "DeallocateStmt":
            f["prepared_name"] = n.get("name")
        elif kind == "DeclareCursorStmt":
            f["cursor_name"] = n.get("portalname")
            f["inner_sql"] = after_keyword(text, "FOR")
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
            variable_set(n, f)
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
            defined = defined_function(n, text, w)
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
            own_code(n, shared)
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
