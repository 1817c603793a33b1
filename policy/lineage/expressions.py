"""Expressions: the source columns a value derives from.  Column references resolved through
the FROM scopes (a whole-row reference, ``(c).email``), sublinks, function calls (packing
functions, aggregates that combine many rows, functions that run SQL given as text or park
data in a side channel, user functions followed into their bodies), type names, and filters
(what a WHERE reads decides which rows come out, never what they hold).
"""

from __future__ import annotations

from typing import Any

from policy.facts import PackingCall, SourceColumn
from policy.lineage.builtin import (
    AGG_SYNTAX,
    BUILTIN_AGGREGATES,
    FILE_READ_FUNCTIONS,
    LARGE_OBJECT,
    LO_READ_FUNCTIONS,
    LO_WRITE_FUNCTIONS,
    LOCKS_TARGET,
    NOTIFY_TARGET,
    PACKING_FUNCTIONS,
    SERVER_FILES,
    SETTINGS_TARGET,
    SQL_TEXT_FUNCTIONS,
    TABLE_TEXT_FUNCTIONS,
    VALUELESS_AGGREGATES,
    WHOLE_SCHEMA_FUNCTIONS,
)
from policy.lineage.functions import FunctionFollower
from policy.lineage.model import EMPTY, Exact, Lineage, Rel, Scope, combined, merge_using
from policy.lineage.tree import Node, const_str, names, node_type, sval

# SQL-language node types that pack in the same way.
_PACKING_NODES = {
    "JsonArrayAgg": "json_arrayagg",
    "JsonObjectAgg": "json_objectagg",
    "JsonArrayQueryConstructor": "json_array",
    "JsonArrayConstructor": "json_array",
    "JsonObjectConstructor": "json_object",
}
_COMBINING_NODES = frozenset({"JsonArrayAgg", "JsonObjectAgg", "JsonArrayQueryConstructor"})


class ExpressionWalker(FunctionFollower):
    """Gives the lineage of expressions."""

    def filter_expr(self, node: Any, scope: Scope | None) -> Lineage:
        """:meth:`expr` for a filter (WHERE, ON, HAVING, ORDER BY ...): what it reads
        decides which rows come out, never what they hold."""
        self.filter_depth += 1
        try:
            return self.expr(node, scope)
        finally:
            self.filter_depth -= 1

    def find_rel(self, qual: list[str], scope: Scope | None) -> Rel | None:
        s = scope
        while s is not None:
            for r in reversed(s.rels):
                if len(qual) == 1 and r.alias == qual[0]:
                    return r
                if len(qual) >= 2 and r.relation == ".".join(qual[-2:]) and r.alias == qual[-1]:
                    return r
            s = s.parent
        return None

    def _column_lookup(self, fields: list[str], scope: Scope | None) -> Lineage | None:
        if len(fields) == 1:
            name = fields[0]
            # A relation whose columns we do not know may or may not have this column; if it
            # does not, PostgreSQL looks further out. Keep both readings (superset).
            soft: list[Lineage] = []
            s = scope
            while s is not None:
                hits = [lin for r in s.rels if (lin := r.colmap.get(name)) is not None]
                if hits and not soft and all(h is hits[0] for h in hits):
                    return hits[0]  # one column (RETURNING sees it also as old.x and new.x)
                if hits and not soft and all(isinstance(h, Exact) for h in hits):
                    # Several FROM items have it: PostgreSQL accepts that only for a column
                    # merged by JOIN ... USING (or NATURAL), a copy of each of them.
                    merged = hits[0]
                    for h in hits[1:]:
                        merged = merge_using(merged, h)
                    return merged
                if hits:
                    return frozenset().union(*hits, *soft)
                soft.extend(
                    lin
                    for r in s.rels
                    if r.opaque is not None or r.schema is not None
                    if (lin := r.lookup(name)) is not None
                )
                s = s.parent
            return frozenset().union(*soft) if soft else None
        r = self.find_rel(fields[:-1], scope)
        if r is None:
            return None
        return r.lookup(fields[-1])

    def column_ref(self, fields: list[Node], scope: Scope | None) -> Lineage:
        parts = [sval(f) for f in fields]
        if "A_Star" in fields[-1]:
            # t.* inside an expression: the whole row of t.
            r = self.find_rel(parts[:-1], scope) if len(parts) > 1 else None
            if r is not None:
                self._mark_star(r)
                return r.whole()
            if scope is not None:
                for rr in scope.rels:
                    self._mark_star(rr)
                return frozenset().union(*(rr.whole() for rr in scope.rels))
            return EMPTY
        hit = self._column_lookup(parts, scope)
        if hit is not None:
            return hit
        # Not a column: a whole-row reference to a FROM item (SELECT c FROM customers c).
        r = self.find_rel(parts, scope)
        if r is not None:
            self._mark_star(r)
            return r.whole()
        if len(parts) >= 2:
            # (composite).field spelled without parentheses is an error in PostgreSQL, but a
            # composite column reached through a qualified name is not: follow its table.
            r = self.find_rel(parts[:1], scope)
            if r is not None:
                return r.whole()
        self.unresolved.append(f"column {'.'.join(parts)}")
        return EMPTY

    def _mark_star(self, r: Rel) -> None:
        if r.labelled and r.relation is not None:
            self.star_tables.add(r.relation)

    def expr(self, node: Any, scope: Scope | None) -> Lineage:
        """Source columns an expression (or list of them) derives from."""
        acc: set[SourceColumn] = set()
        self._expr(node, scope, acc)
        return frozenset(acc)

    def _expr(self, node: Any, scope: Scope | None, acc: set[SourceColumn]) -> None:
        if isinstance(node, list):
            for x in node:
                self._expr(x, scope, acc)
            return
        if not isinstance(node, dict):
            return
        for kind, v in node.items():
            if kind == "ColumnRef":
                acc |= self.column_ref(v["fields"], scope)
            elif kind == "FuncCall":
                self.func_call(v, scope, acc)
            elif kind == "SubLink":
                self.sublink(v, scope, acc)
            elif kind == "A_Indirection":
                self.indirection(v, scope, acc)
            elif kind in _PACKING_NODES:
                inner = self.expr(v, scope)
                self.add_packing(_PACKING_NODES[kind], inner)
                # JSON_ARRAYAGG, JSON_OBJECTAGG and JSON_ARRAY(query) combine many rows;
                # JSON_ARRAY(a, b) and JSON_OBJECT(...) pack one row's values.
                acc |= combined(inner) if kind in _COMBINING_NODES else inner
            elif kind in ("A_Const", "ParamRef", "TypeName", "location"):
                continue
            elif kind == "typeName":  # a cast's, a JSON function's RETURNING, XMLSERIALIZE's
                self.type_name(v)
            elif kind in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt"):
                for _n, lin in self.query(node, scope, scope.ctes if scope else {}):
                    acc |= lin
            elif isinstance(v, (dict, list)):
                self._expr(v, scope, acc)

    def type_name(self, v: Node) -> None:
        """A type named in an expression must be one the catalog knows, found as the server
        finds it (pg_catalog, then the path); one it does not know is unknown, like a
        relation or a function (fail closed)."""
        types = self.snapshot.types
        parts = [sval(n) for n in v.get("names") or ()]
        if not types or not parts:
            return
        if len(parts) == 2:
            known = (parts[0], parts[1]) in types
        elif len(parts) == 1:
            known = any((s, parts[0]) in types for s in self.effective_path())
        else:
            known = False  # database.schema.type: another database's names are not followed
        if not known:
            self.unknown.append(f"type {'.'.join(parts)}")

    def indirection(self, v: Node, scope: Scope | None, acc: set[SourceColumn]) -> None:
        arg = v["arg"]
        ind = v.get("indirection") or []
        kind, a = node_type(arg)
        if kind == "ColumnRef" and ind and "String" in ind[0]:
            parts = [sval(f) for f in a["fields"]]
            if "A_Star" not in a["fields"][-1] and self._column_lookup(parts, scope) is None:
                r = self.find_rel(parts, scope)
                if r is not None:
                    # (c).email: one column of the row, not the whole row.
                    hit = r.lookup(sval(ind[0]))
                    if hit is not None:
                        acc |= hit
                        self._expr(ind[1:], scope, acc)
                        return
        self._expr(arg, scope, acc)
        self._expr(ind, scope, acc)

    def sublink(self, v: Node, scope: Scope | None, acc: set[SourceColumn]) -> None:
        link = v.get("subLinkType", "")
        self._expr(v.get("testexpr"), scope, acc)
        exists = link == "EXISTS_SUBLINK"
        self.filter_depth += exists
        try:
            cols = self.query(v["subselect"], scope, scope.ctes if scope else {})
        finally:
            self.filter_depth -= exists
        lin: set[SourceColumn] = set()
        for _n, c in cols:
            lin |= c
        if link == "EXISTS_SUBLINK":
            # EXISTS yields one bit per row: a filter, not an output of the subquery's data.
            self.filters |= lin
            return
        if link == "ARRAY_SUBLINK":
            self.add_packing("array", frozenset(lin))
            acc |= combined(lin)
            return
        acc |= lin

    def func_call(self, v: Node, scope: Scope | None, acc: set[SourceColumn]) -> None:
        fname = names(v.get("funcname"))
        name = fname[-1].lower() if fname else ""
        qualified = ".".join(fname)
        self.functions.add(qualified if len(fname) > 1 and fname[0] != "pg_catalog" else name)
        args = v.get("args") or []
        inner: set[SourceColumn] = set()
        self._expr(args, scope, inner)
        self._expr(v.get("agg_order"), scope, inner)
        self.filters |= self.filter_expr(v.get("agg_filter"), scope)
        self.filters |= self.filter_expr(v.get("over"), scope)
        if v.get("over") is not None and self.shared.lineage_labels(inner):
            self.row_mixing = True
        if name in SQL_TEXT_FUNCTIONS and (len(fname) == 1 or fname[0] == "pg_catalog"):
            self.unanalysable.append(f"{name}() runs SQL given as text")
        elif name in WHOLE_SCHEMA_FUNCTIONS and (len(fname) == 1 or fname[0] == "pg_catalog"):
            self.unanalysable.append(f"{name}() dumps every table of a schema or database")
        elif name in TABLE_TEXT_FUNCTIONS and args:
            inner |= self._table_argument(args[0], name)
        builtin = len(fname) == 1 or fname[0] == "pg_catalog"
        if builtin and name in LO_WRITE_FUNCTIONS:
            self.record_copy("pg_catalog.pg_largeobject", [("", frozenset(inner))])
        elif builtin and name in LO_READ_FUNCTIONS:
            inner.add(LARGE_OBJECT)
        elif builtin and name in FILE_READ_FUNCTIONS:
            inner.add(SERVER_FILES)
            if name == "lo_import":
                self.record_copy("pg_catalog.pg_largeobject", [("", frozenset((SERVER_FILES,)))])
        elif builtin and name == "pg_notify":
            self.record_copy(NOTIFY_TARGET, [("", frozenset(inner))])
        elif builtin and name == "set_config":
            self.record_copy(SETTINGS_TARGET, [("", frozenset(inner))])
        elif builtin and name.startswith(("pg_advisory", "pg_try_advisory")):
            self.record_copy(LOCKS_TARGET, [("", frozenset(inner))])
        found = self.user_function(fname, inner)
        builtins = self.snapshot.builtin_functions
        if not found and builtins and name not in builtins:
            # Not builtin and not in the catalog: created since the last refresh (perhaps
            # earlier in this very string). Whatever its body reads cannot be followed.
            self.unanalysable.append(f"function {qualified} is not in the catalog")
        if name in PACKING_FUNCTIONS:
            self.add_packing(name, frozenset(inner))
        if self._aggregates(v, name):
            if builtin and name in VALUELESS_AGGREGATES:
                # count(email), bool_or(...), rank(): no value of the arguments comes out.
                self.filters |= inner
                return
            acc |= combined(inner)
            return
        acc |= inner

    def _aggregates(self, v: Node, name: str) -> bool:
        """Whether a call combines values of several rows: aggregate syntax, an OVER
        clause, or a name the catalog lists as an aggregate or window function."""
        if any(v.get(k) for k in AGG_SYNTAX):
            return True
        known = self.snapshot.aggregate_functions or BUILTIN_AGGREGATES
        return name in known

    def _table_argument(self, arg: Node, fname: str) -> Lineage:
        text = const_str(arg)
        if text is None:
            self.unanalysable.append(f"{fname}() reads a table chosen at run time")
            return EMPTY
        parts = [p.strip('"') if p.startswith('"') else p.lower() for p in text.split(".")]
        rel = self.find_relation(parts[0] if len(parts) > 1 else None, parts[-1])
        if rel is None:
            self.unresolved.append(f"relation {text}")
            return EMPTY
        self.reads.add(rel.qualified)
        cols = self.relation_columns(rel)
        lin = frozenset().union(*(c for _n, c in cols)) if cols else EMPTY
        if self.shared.lineage_labels(lin):
            self.star_tables.add(rel.qualified)
        return lin

    def add_packing(self, name: str, lin: Lineage) -> None:
        self.packing.append(PackingCall(name, lin, self.shared.lineage_labels(lin)))
