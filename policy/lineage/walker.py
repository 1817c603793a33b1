"""``StatementWalker``: one statement's walk, the top layer over ``policy.lineage.from_clause``
and the layers below it.  Queries and their set operations, VALUES, WITH (recursive CTEs to a
fixpoint), target lists and ``*``, and the data-modifying statements with their targets,
assignments, ON CONFLICT and RETURNING; SELECT INTO and writes record the copies they make.
A walker is one-shot: it analyses one statement and fills the accumulators that
``policy.statement_facts`` turns into a ``QueryFacts``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from policy.facts import SourceColumn
from policy.lineage.base import Unanalysable
from policy.lineage.conditions import compared, equate, swapped
from policy.lineage.from_clause import FromClauseWalker
from policy.lineage.model import (
    EMPTY,
    Columns,
    Exact,
    Lineage,
    Rel,
    Scope,
    apply_colnames,
    combined,
)
from policy.lineage.tree import Node, iter_nodes, names, node_type, sval


class StatementWalker(FromClauseWalker):
    """Analyses one statement's tree; results accumulate on the instance."""

    def query(self, node: Node, scope: Scope | None, ctes: dict[str, Columns]) -> Columns:
        """Output columns of any statement that can be a subquery or CTE body."""
        kind, n = node_type(node)
        if kind == "SelectStmt":
            return self.select(n, scope, ctes)
        if kind == "InsertStmt":
            return self.insert(n, scope, ctes)
        if kind == "UpdateStmt":
            return self.update(n, scope, ctes)
        if kind == "DeleteStmt":
            return self.delete(n, scope, ctes)
        if kind == "MergeStmt":
            return self.merge(n, scope, ctes)
        raise Unanalysable(f"unexpected {kind} used as a query")

    def with_clause(
        self, n: Node, scope: Scope | None, ctes: dict[str, Columns]
    ) -> dict[str, Columns]:
        wc = n.get("withClause")
        if not wc:
            return ctes
        ctes = dict(ctes)
        body = wc.get("WithClause", wc)
        items = [
            (c["ctename"], names(c.get("aliascolnames")), c["ctequery"])
            for item in body.get("ctes") or ()
            for c in (item["CommonTableExpr"],)
        ]
        if not body.get("recursive"):
            for name, aliases, q in items:
                before = self.instances.copy()
                cols = apply_colnames(self.query(q, scope, ctes), aliases)
                # The body's reads count where the CTE is referenced, once per reference.
                delta = self.instances - before
                self.instances = before
                self.cte_instances[id(cols)] = (cols, delta)
                ctes[name] = cols
            return ctes
        before = self.instances.copy()
        ctes = self._recursive_with(items, scope, ctes)
        # A recursive CTE joins its rows to earlier ones of itself: its relations are read
        # as if twice.
        self.instances.update(self.instances - before)
        return ctes

    def _recursive_with(
        self,
        items: list[tuple[str, list[str], Node]],
        scope: Scope | None,
        ctes: dict[str, Columns],
    ) -> dict[str, Columns]:
        """WITH RECURSIVE: any CTE may refer to itself or to any other, in any order.

        Lineage only grows, so iterate to the fixpoint on a scratch walker, starting from
        each CTE's non-recursive term; then walk once more for real (reads, filters ...).
        """
        approx: dict[str, Columns] = {name: [] for name, _a, _q in items}
        scratch = self._scratch()
        for name, aliases, q in items:
            kind, sel = node_type(q)
            if kind == "SelectStmt" and sel.get("op", "SETOP_NONE") != "SETOP_NONE":
                seed = scratch.select(sel["larg"], scope, {**ctes, **approx})
                approx[name] = apply_colnames(seed, aliases)
        for _ in range(2 * len(items) + 16):
            changed = False
            scratch = self._scratch()
            for name, aliases, q in items:
                cols = apply_colnames(scratch.query(q, scope, {**ctes, **approx}), aliases)
                merged = _merge_positional(approx[name], cols) if approx[name] else cols
                if merged != approx[name]:
                    approx[name] = merged
                    changed = True
            if not changed:
                break
        # Each row of a recursive CTE can carry values accumulated from every row before it
        # (``acc || email`` over the whole table): its columns combine many rows.
        for name in approx:
            approx[name] = [(c, combined(lin)) for c, lin in approx[name]]
        for _name, _aliases, q in items:
            self.query(q, scope, {**ctes, **approx})
        ctes.update(approx)
        return ctes

    def _scratch(self) -> StatementWalker:
        w = StatementWalker(self.shared, self.search_path, self.view_stack)
        w.function_stack = self.function_stack
        return w

    def select(self, n: Node, scope: Scope | None, ctes: dict[str, Columns]) -> Columns:
        ctes = self.with_clause(n, scope, ctes)
        op = n.get("op", "SETOP_NONE")
        if op != "SETOP_NONE":
            left = self.select(n["larg"], scope, ctes)
            right = self.select(n["rarg"], scope, ctes)
            out = _merge_positional(left, right)
            own = Scope([], out, scope, ctes)
            for key in ("sortClause",):
                self.filters |= self.expr(n.get(key), own)
            return out
        if n.get("valuesLists"):
            return self.values(n["valuesLists"], scope)
        local = Scope([], [], scope, ctes)
        for item in n.get("fromClause") or ():
            rels, star = self.from_item(item, local, ctes)
            local.rels.extend(rels)
            local.star = local.star + star
        local.star = swapped(local.star, equate(n.get("whereClause"), local.rels, local.rels))
        local.star = swapped(
            local.star, compared(n.get("whereClause"), local.rels, self.shared.lineage_labels)
        )
        out = self.target_list(n.get("targetList") or (), local)
        for key in ("whereClause", "havingClause"):
            self.filters |= self.filter_expr(n.get(key), local)
        # GROUP BY, DISTINCT ON and ORDER BY may name output columns (after input columns).
        sort_scope = Scope([*local.rels, Rel("", out)], local.star, scope, ctes)
        for key in ("groupClause", "distinctClause", "sortClause"):
            self.filters |= self.filter_expr(n.get(key), sort_scope)
        if any(iter_nodes(n.get("groupClause"), "GroupingSet")):
            self.row_mixing = True  # ROLLUP / CUBE / GROUPING SETS: rows of several groups
        self.filters |= self.filter_expr(n.get("windowClause"), local)
        self.filter_expr(n.get("limitCount"), local)
        self.filter_expr(n.get("limitOffset"), local)
        into = n.get("intoClause")
        if into:
            self.write_copy(into["rel"], out, names(into.get("colNames")))
        return out

    def values(self, rows: list[Node], scope: Scope | None) -> Columns:
        local = Scope([], [], scope, scope.ctes if scope else {})
        width = 0
        lins: list[set[SourceColumn]] = []
        for row in rows:
            items = row.get("List", {}).get("items", [])
            width = max(width, len(items))
            while len(lins) < width:
                lins.append(set())
            for i, e in enumerate(items):
                lins[i] |= self.expr(e, local)
        return [(f"column{i + 1}", frozenset(lin)) for i, lin in enumerate(lins)]

    def target_list(self, targets: Iterable[Node], scope: Scope) -> Columns:
        out: Columns = []
        for t in targets:
            rt = t.get("ResTarget", t)
            val = rt.get("val")
            if val is None:
                continue
            kind, v = node_type(val)
            if kind == "ColumnRef":
                fields = v["fields"]
                if "A_Star" in fields[-1]:
                    out.extend(self.star(fields, scope))
                    continue
                # A plain column: its lineage as is (an Exact copy stays one).
                out.append((rt.get("name") or _expr_name(val), self.column_ref(fields, scope)))
                continue
            if kind == "A_Indirection" and any("A_Star" in i for i in v.get("indirection", ())):
                lin = self.expr(v["arg"], scope)
                sub = self._composite_columns(v["arg"], scope)
                if sub is not None:
                    out.extend(sub)
                else:
                    out.append((_expr_name(val), lin))
                continue
            lin = self.expr(val, scope)
            out.append((rt.get("name") or _expr_name(val), lin))
        return out

    def star(self, fields: list[Node], scope: Scope) -> Columns:
        if len(fields) == 1:
            for r in scope.rels:
                self._mark_star(r)
                if r.schema is not None:
                    self.unresolved.append(f"* over {r.relation}")
            return list(scope.star)
        qual = [sval(f) for f in fields[:-1]]
        found = self.find_rel(qual, scope)
        if found is None:
            self.unresolved.append(f"{'.'.join(qual)}.*")
            return []
        r = found
        self._mark_star(r)
        if r.schema is not None:
            self.unresolved.append(f"* over {r.relation}")
        return list(r.columns)

    def _composite_columns(self, arg: Node, scope: Scope) -> Columns | None:
        """``(c).*`` where ``c`` names a FROM item: that item's columns."""
        kind, v = node_type(arg)
        if kind == "ColumnRef" and len(v["fields"]) == 1:
            name = sval(v["fields"][0])
            if self._column_lookup([name], scope) is None:
                r = self.find_rel([name], scope)
                if r is not None:
                    self._mark_star(r)
                    return list(r.columns)
        return None

    def insert(self, n: Node, scope: Scope | None, ctes: dict[str, Columns]) -> Columns:
        ctes = self.with_clause(n, scope, ctes)
        rv = n["relation"]
        schema, name = self.qualify_target(rv)
        target = f"{schema}.{name}"
        self.writes.add(target)
        self._instance({target: 1})
        target_rel = self.snapshot.relation(schema, name)
        tcols = [c.name for c in target_rel.columns] if target_rel else []
        chosen = [rt["ResTarget"]["name"] for rt in n.get("cols") or ()] or tcols
        self.columns_written |= {f"{target}.{c}" for c in chosen or ("*",)}
        inserted: Columns = []
        if n.get("selectStmt"):
            inserted = self.query(n["selectStmt"], scope, ctes)
        # Each value goes into the target column at its position (unknown past the list).
        self.record_copy(
            target,
            [(chosen[i] if i < len(chosen) else "*", lin) for i, (_c, lin) in enumerate(inserted)],
        )
        by_col = {c: inserted[i][1] for i, c in enumerate(chosen) if i < len(inserted)}
        own = self._target_rel(rv, schema, name, by_col)
        occ = n.get("onConflictClause")
        if occ:
            self.columns_written.add(f"{target}.*")
            oc = occ.get("OnConflictClause", occ)
            excluded = Rel("excluded", own.columns)
            cscope = Scope([own, excluded], own.columns, scope, ctes)
            assigned = self.expr(oc.get("targetList"), cscope)
            self.filters |= self.expr(oc.get("whereClause"), cscope)
            self.record_copy(target, [("", assigned)])
        return self.returning(n, own, [], scope, ctes)

    def _target_rel(self, rv: Node, schema: str, name: str, assigned: dict[str, Lineage]) -> Rel:
        rel = self.snapshot.relation(schema, name)
        alias_node = rv.get("alias")
        alias = alias_node["aliasname"] if alias_node else name
        if rel is None:
            return self._unknown_rel(alias, schema, name)
        # RETURNING gives the stored row: a column stays an exact copy of itself whatever
        # was assigned to it (and carries what was assigned, for labels).
        cols = [(c, _assign(lin, assigned.get(c))) for c, lin in self.relation_columns(rel)]
        labelled = any(self.shared.lineage_labels(lin) for _n, lin in cols)
        return Rel(alias, cols, relation=rel.qualified, labelled=labelled)

    def returning(
        self,
        n: Node,
        own: Rel,
        others: list[Rel],
        scope: Scope | None,
        ctes: dict[str, Columns],
    ) -> Columns:
        rc = n.get("returningClause")
        if not rc:
            return []
        body = rc.get("ReturningClause", rc)
        rels = [own, *others, Rel("old", own.columns), Rel("new", own.columns)]
        local = Scope(rels, own.columns + [c for r in others for c in r.columns], scope, ctes)
        return self.target_list(body.get("exprs") or (), local)

    def update(self, n: Node, scope: Scope | None, ctes: dict[str, Columns]) -> Columns:
        ctes = self.with_clause(n, scope, ctes)
        rv = n["relation"]
        schema, name = self.qualify_target(rv)
        target = f"{schema}.{name}"
        self.writes.add(target)
        self.reads.add(target)
        self._instance({target: 1})
        base = self._target_rel(rv, schema, name, {})
        local = Scope([base], list(base.columns), scope, ctes)
        others = self._join_into(n.get("fromClause") or (), local, ctes)
        assigned: dict[str, Lineage] = {}
        for t in n.get("targetList") or ():
            rt = t["ResTarget"]
            col = rt.get("name", "")
            assigned[col] = assigned.get(col, EMPTY) | self.expr(rt.get("val"), local)
        self.filters |= self.filter_expr(n.get("whereClause"), local)
        self.columns_written |= {f"{target}.{c}" for c in assigned}
        self.record_copy(target, [(c, lin) for c, lin in assigned.items()])
        own = self._target_rel(rv, schema, name, assigned)
        return self.returning(n, own, others, scope, ctes)

    def _join_into(self, items: Any, local: Scope, ctes: dict[str, Columns]) -> list[Rel]:
        """UPDATE ... FROM / DELETE ... USING: add the extra relations to the statement's scope."""
        others: list[Rel] = []
        for item in items:
            rels, star = self.from_item(item, local, ctes)
            local.rels.extend(rels)
            local.star = local.star + star
            others.extend(rels)
        return others

    def delete(self, n: Node, scope: Scope | None, ctes: dict[str, Columns]) -> Columns:
        ctes = self.with_clause(n, scope, ctes)
        rv = n["relation"]
        schema, name = self.qualify_target(rv)
        self.writes.add(f"{schema}.{name}")
        self.reads.add(f"{schema}.{name}")
        self._instance({f"{schema}.{name}": 1})
        own = self._target_rel(rv, schema, name, {})
        local = Scope([own], list(own.columns), scope, ctes)
        others = self._join_into(n.get("usingClause") or (), local, ctes)
        self.filters |= self.filter_expr(n.get("whereClause"), local)
        return self.returning(n, own, others, scope, ctes)

    def merge(self, n: Node, scope: Scope | None, ctes: dict[str, Columns]) -> Columns:
        ctes = self.with_clause(n, scope, ctes)
        rv = n["relation"]
        schema, name = self.qualify_target(rv)
        target = f"{schema}.{name}"
        self.writes.add(target)
        self.reads.add(target)
        self.columns_written.add(f"{target}.*")
        self._instance({target: 1})
        own = self._target_rel(rv, schema, name, {})
        local = Scope([own], list(own.columns), scope, ctes)
        srels, sstar = self.from_item(n["sourceRelation"], local, ctes)
        local.rels.extend(srels)
        local.star = local.star + sstar
        self.filters |= self.expr(n.get("joinCondition"), local)
        assigned: set[SourceColumn] = set()
        for w in n.get("mergeWhenClauses") or ():
            wc = w["MergeWhenClause"]
            self.filters |= self.expr(wc.get("condition"), local)
            assigned |= self.expr(wc.get("targetList"), local)
            assigned |= self.expr(wc.get("values"), local)
        self.record_copy(target, [("", frozenset(assigned))])
        own2 = Rel(own.alias, [(c, lin | assigned) for c, lin in own.columns], own.relation)
        return self.returning(n, own2, srels, scope, ctes)

    def write_copy(self, into_rel: Node, cols: Columns, colnames: list[str] | None = None) -> None:
        cols = apply_colnames(cols, colnames or [])
        schema, name = self.qualify_target(into_rel)
        target = f"{schema}.{name}"
        self.writes.add(target)
        self.record_copy(target, cols)


def _assign(lin: Lineage, assigned: Lineage | None) -> Lineage:
    if not assigned:
        return lin
    if isinstance(lin, Exact):
        return Exact(lin | assigned, lin.columns)
    return lin | assigned


def _merge_positional(left: Columns, right: Columns) -> Columns:
    out: Columns = []
    for i in range(max(len(left), len(right))):
        name = left[i][0] if i < len(left) else right[i][0]
        lin = (left[i][1] if i < len(left) else EMPTY) | (right[i][1] if i < len(right) else EMPTY)
        out.append((name, lin))
    return out


def _expr_name(node: Node) -> str:
    """PostgreSQL's default output column name (FigureColname, simplified)."""
    kind, v = node_type(node)
    if kind == "ColumnRef":
        last = v["fields"][-1]
        return sval(last) or "?column?"
    if kind == "FuncCall":
        return names(v.get("funcname"))[-1]
    if kind == "TypeCast":
        inner = _expr_name(v["arg"])
        if inner != "?column?":
            return inner
        tn = names(v.get("typeName", {}).get("names"))
        return tn[-1] if tn else "?column?"
    if kind == "A_Indirection":
        for i in reversed(v.get("indirection") or []):
            if "String" in i:
                return sval(i)
        return _expr_name(v["arg"])
    if kind == "SubLink":
        if v.get("subLinkType") == "EXISTS_SUBLINK":
            return "exists"
        if v.get("subLinkType") == "ARRAY_SUBLINK":
            return "array"
        sub = v.get("subselect", {}).get("SelectStmt", {})
        tl = sub.get("targetList") or []
        if tl:
            rt = tl[0]["ResTarget"]
            return str(rt.get("name") or _expr_name(rt["val"]))
    if kind == "CaseExpr":
        return "case"
    if kind == "CoalesceExpr":
        return "coalesce"
    return "?column?"
