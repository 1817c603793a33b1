"""The FROM clause: what each FROM item makes visible and what ``*`` expands to for it.  Tables
and views (CTE references counted again each time), subqueries, joins (``USING`` and
``NATURAL`` merged columns, the ON condition's equalities and comparisons), functions in FROM
(one SQL function with named result columns read like a view), and everything else
(XMLTABLE, JSON_TABLE ...) whose mentions all flow out.
"""

from __future__ import annotations

from policy.catalog import SYSTEM_SCHEMAS
from policy.facts import SourceColumn
from policy.lineage.builtin import AGG_SYNTAX
from policy.lineage.conditions import compared, equate, swapped
from policy.lineage.expressions import ExpressionWalker
from policy.lineage.model import EMPTY, Columns, Rel, Scope, apply_colnames, merge_using
from policy.lineage.tree import Node, names, node_type
from policy.parse import function_body_statements, function_result_columns
from policy.search_path import parse_search_path

_QUERY_KINDS = ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")


class FromClauseWalker(ExpressionWalker):
    """Gives the names FROM items make visible."""

    def range_var(self, rv: Node, scope: Scope | None, ctes: dict[str, Columns]) -> Rel:
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        alias_node = rv.get("alias")
        alias = alias_node["aliasname"] if alias_node else name
        if schema is None:
            cte = _lookup_cte(name, scope, ctes)
            if cte is not None:
                # Each reference reads the CTE's rows anew: its relations count once more.
                counted = self.cte_instances.get(id(cte))
                self._instance(counted[1] if counted is not None else {})
                return _rename(Rel(alias, cte), alias_node)
        rel = self.find_relation(schema, name)
        if rel is None:
            target_schema = schema or (
                "pg_temp" if ("pg_temp", name) in self.shared.taint else self.creation_schema()
            )
            qualified = f"{target_schema}.{name}"
            self.reads.add(qualified)
            self.unresolved.append(f"relation {qualified}")
            self.unknown.append(
                f"{schema}.{name}"
                if schema
                else f"{name} (search_path: {', '.join(self.search_path)})"
            )
            return _rename(self._unknown_rel(alias, target_schema, name), alias_node)
        self.reads.add(rel.qualified)
        if not (rel.is_view and rel.schema not in SYSTEM_SCHEMAS):
            # A view counts what it reads (expand_view); a partition or inheritance child
            # is read as its ancestors too: its rows are theirs (need-to-know, instances).
            ancestors = self.ancestors(rel)
            self.reads.update(a.qualified for a in ancestors)
            self._instance({r.qualified: 1 for r in (rel, *ancestors)})
        cols = self.relation_columns(rel)
        labelled = self.shared.rel_labelled.get(rel.oid)
        if labelled is None:
            labelled = any(self.shared.lineage_labels(lin) for _n, lin in cols)
            self.shared.rel_labelled[rel.oid] = labelled
        return _rename(Rel(alias, cols, relation=rel.qualified, labelled=labelled), alias_node)

    def from_item(
        self, item: Node, scope: Scope, ctes: dict[str, Columns]
    ) -> tuple[list[Rel], Columns]:
        """Names one FROM item makes visible, and what ``*`` expands to for it."""
        kind, n = node_type(item)
        if kind == "RangeVar":
            r = self.range_var(n, scope, ctes)
            return [r], r.columns
        if kind == "RangeSubselect":
            cols = self.query(n["subquery"], scope, ctes)
            alias_node = n.get("alias")
            r = _rename(Rel(alias_node["aliasname"] if alias_node else "", cols), alias_node)
            return [r], r.columns
        if kind == "JoinExpr":
            return self.join(n, scope, ctes)
        if kind == "RangeFunction":
            r = self.range_function(n, scope)
            return [r], r.columns
        # XMLTABLE, JSON_TABLE, TABLESAMPLE and others: everything they mention flows out.
        if kind == "RangeTableSample":
            rels, star = self.from_item(n["relation"], scope, ctes)
            self.expr(n.get("args"), scope)
            return rels, star
        lin = self.expr(n, scope)
        alias_node = n.get("alias")
        alias = alias_node["aliasname"] if alias_node else ""
        cols = [(c, lin) for c in _column_names_of(n)]
        r = _rename(Rel(alias, cols or [(alias or "?column?", lin)], opaque=lin), alias_node)
        return [r], r.columns

    def join(self, n: Node, scope: Scope, ctes: dict[str, Columns]) -> tuple[list[Rel], Columns]:
        lrels, lstar = self.from_item(n["larg"], scope, ctes)
        inner = Scope(scope.rels + lrels, scope.star, scope.parent, scope.ctes)
        rrels, rstar = self.from_item(n["rarg"], inner, ctes)
        using = names(n.get("usingClause"))
        if n.get("isNatural"):
            rnames = {c for c, _l in rstar}
            using = [c for c, _l in lstar if c in rnames]
        if using:
            lmap = dict(lstar)
            rmap = dict(rstar)
            merged = [(c, merge_using(lmap.get(c, EMPTY), rmap.get(c, EMPTY))) for c in using]
            star = merged + [c for c in lstar if c[0] not in using]
            star += [c for c in rstar if c[0] not in using]
        else:
            merged = []
            star = lstar + rstar
        rels = lrels + rrels
        quals = n.get("quals")
        if quals is not None:
            qscope = Scope(scope.rels + rels, star, scope.parent, scope.ctes)
            self.filters |= self.filter_expr(quals, qscope)
            jointype = n.get("jointype", "JOIN_INNER")
            preserved = (
                (lrels, rrels) if jointype == "JOIN_LEFT"
                else (rrels, lrels) if jointype == "JOIN_RIGHT"
                else (rels, rels) if jointype == "JOIN_INNER"
                else ([], [])
            )  # fmt: skip
            star = swapped(star, equate(quals, *preserved))
            star = swapped(star, compared(quals, rels, self.shared.lineage_labels))
        for c in using:
            for lin in (dict(lstar).get(c, EMPTY), dict(rstar).get(c, EMPTY)):
                self.filters |= lin
        ua = n.get("join_using_alias")
        if ua:
            rels = [*rels, Rel(ua["aliasname"], merged)]
        alias_node = n.get("alias")
        if alias_node:
            jr = _rename(Rel(alias_node["aliasname"], star), alias_node)
            # PostgreSQL hides the inner names behind a join alias; keeping them visible
            # can only add lineage, never lose it.
            rels = [*rels, jr]
            star = jr.columns
        return rels, star

    def range_function(self, n: Node, scope: Scope) -> Rel:
        mapped = self._sql_function_rel(n, scope)
        if mapped is not None:
            return mapped
        lin: set[SourceColumn] = set()
        fnames: list[str] = []
        for item in n.get("functions") or ():
            parts = item.get("List", {}).get("items", [])
            if parts:
                lin |= self.expr(parts[0], scope)
                k, f = node_type(parts[0])
                if k == "FuncCall":
                    fnames.append(names(f.get("funcname"))[-1])
        lineage = frozenset(lin)
        alias_node = n.get("alias")
        colnames = names(alias_node.get("colnames")) if alias_node else []
        if not colnames:
            colnames = [
                cd["ColumnDef"]["colname"] for cd in n.get("coldeflist") or () if "ColumnDef" in cd
            ]
        if not colnames:
            colnames = fnames[:1] or ["?column?"]
        alias = alias_node["aliasname"] if alias_node else (fnames[0] if fnames else "")
        return Rel(alias, [(c, lineage) for c in colnames], opaque=lineage)

    def _sql_function_rel(self, n: Node, scope: Scope) -> Rel | None:
        """``FROM f(args)`` where ``f`` is one SQL function with named result columns
        (``RETURNS TABLE (...)`` or OUT parameters): its columns, each with the lineage of
        the same column of the body's last statement (which is what a SQL function
        returns), as for a view.  A function's arguments can reach any of its columns.
        None when the call is anything else (the caller then unites every lineage)."""
        items: list[Node] = n.get("functions") or []
        if len(items) != 1 or n.get("ordinality") or n.get("is_rowsfrom") or n.get("coldeflist"):
            return None
        parts = items[0].get("List", {}).get("items", [])
        kind, call = node_type(parts[0]) if parts else ("", {})
        if kind != "FuncCall" or any(call.get(k) for k in (*AGG_SYNTAX, "over")):
            return None
        fname = names(call.get("funcname"))
        candidates = self._resolve_function(fname)
        if len(candidates) != 1:
            return None
        f = candidates[0]
        if f.language != "sql" or f.qualified in self.function_stack:
            return None
        result_names = function_result_columns(f.arguments, f.result)
        if not result_names:
            return None
        try:
            stmts = function_body_statements(f.source)
        except Exception:
            return None
        if not stmts or node_type(stmts[-1])[0] not in _QUERY_KINDS:
            return None
        if any(node_type(s)[0] not in (*_QUERY_KINDS, "ReturnStmt") for s in stmts):
            return None
        path = parse_search_path(f.search_path) if f.search_path is not None else None
        sub = type(self)(
            self.shared, path if path is not None else self.search_path, self.view_stack
        )
        sub.function_stack = self.function_stack
        self.function_stack.add(f.qualified)
        try:
            columns: Columns = []
            for stmt in stmts:
                columns = sub.query(stmt, None, {}) if node_type(stmt)[0] in _QUERY_KINDS else []
        finally:
            self.function_stack.discard(f.qualified)
        if len(columns) != len(result_names):
            return None
        args = self.expr(call.get("args") or [], scope)
        self.functions.add(".".join(fname) if len(fname) > 1 else fname[0].lower())
        self.user_functions.add(f.qualified)
        # Read like a view: each of the body's relations once per row of the result.
        self._absorb(sub)
        self._instance(sub.instances)
        self.row_mixing |= sub.row_mixing
        cols = [
            (name, lin | args if args else lin)
            for name, (_n, lin) in zip(result_names, columns, strict=True)
        ]
        alias_node = n.get("alias")
        alias = alias_node["aliasname"] if alias_node else fname[-1]
        return _rename(Rel(alias, cols), alias_node)


def _lookup_cte(name: str, scope: Scope | None, ctes: dict[str, Columns]) -> Columns | None:
    hit = ctes.get(name)
    if hit is not None:
        return hit
    s = scope
    while s is not None:
        hit = s.ctes.get(name)
        if hit is not None:
            return hit
        s = s.parent
    return None


def _rename(r: Rel, alias_node: Node | None) -> Rel:
    if not alias_node:
        return r
    colnames = names(alias_node.get("colnames"))
    if not colnames:
        return r
    cols = apply_colnames(r.columns, colnames)
    return Rel(r.alias, cols, r.relation, r.labelled, r.opaque, r.schema, r.table)


def _column_names_of(n: Node) -> list[str]:
    cols = []
    for key in ("columns", "coldeflist"):
        for c in n.get(key) or ():
            for _k, v in c.items():
                nm = v.get("colname") or v.get("name")
                if isinstance(nm, str):
                    cols.append(nm)
    return cols
