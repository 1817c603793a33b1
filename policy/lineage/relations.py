"""Names to relations: the search_path lookup PostgreSQL does, a stored relation's columns
(a partition or inheritance child's are its ancestors' too), and views expanded into the
lineage of their definitions (memoised per snapshot in ``Shared``); a relation the catalog
does not have becomes one whose columns are followed by name.  The layer of
``StatementWalker`` that every other layer resolves names through.
"""

from __future__ import annotations

from policy.catalog import SYSTEM_SCHEMAS, CatalogRelation
from policy.facts import SourceColumn
from policy.lineage.base import WalkerBase
from policy.lineage.builtin import STATISTICS_VALUES
from policy.lineage.model import EMPTY, Columns, Exact, Lineage, Rel, combined
from policy.lineage.shared import ViewExpansion
from policy.lineage.tree import Node
from policy.parse import parse_json


class RelationResolver(WalkerBase):
    """Resolves relation names and gives their columns' lineage."""

    def effective_path(self) -> list[str]:
        """PostgreSQL's lookup order: pg_temp, then pg_catalog, unless placed explicitly."""
        path = list(self.search_path)
        out = []
        if "pg_temp" not in path:
            out.append("pg_temp")
        if "pg_catalog" not in path:
            out.append("pg_catalog")
        return out + path

    def find_relation(self, schema: str | None, name: str) -> CatalogRelation | None:
        if schema is not None:
            return self.snapshot.relation(schema, name)
        candidates = self.snapshot.relations_named(name)
        if not candidates:
            return None
        for s in self.effective_path():
            for rel in candidates:
                if rel.schema == s:
                    return rel
        return None

    def creation_schema(self) -> str:
        """Where an unqualified new relation goes: the first existing schema on the path."""
        for s in self.search_path:
            if s in self.snapshot.schemas and s not in SYSTEM_SCHEMAS and s != "pg_temp":
                return s
        return self.search_path[0] if self.search_path else "public"

    def qualify_target(self, rv: Node) -> tuple[str, str]:
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        if rv.get("relpersistence") == "t" and schema is None:
            return "pg_temp", name
        rel = self.find_relation(schema, name)
        if rel is not None:
            return rel.schema, rel.name
        return (schema or self.creation_schema()), name

    def relation_columns(self, rel: CatalogRelation) -> Columns:
        if rel.is_view and rel.schema not in SYSTEM_SCHEMAS:
            exp = self.expand_view(rel)
            return exp.columns
        cached = self.shared.rel_columns.get(rel.oid)
        if cached is None:
            ancestors = self.ancestors(rel)
            cached = []
            for c in rel.columns:
                src = SourceColumn(rel.schema, rel.name, c.name)
                if (rel.schema, rel.name, c.name) in STATISTICS_VALUES:
                    cached.append((c.name, combined((src,))))
                    continue
                # customer_phones_mobile.phone is customer_phones.phone of that row.
                same = [src] + [
                    SourceColumn(a.schema, a.name, c.name)
                    for a in ancestors
                    if any(ac.name == c.name for ac in a.columns)
                ]
                cached.append((c.name, Exact(same, same)))
            self.shared.rel_columns[rel.oid] = cached
        return cached

    def ancestors(self, rel: CatalogRelation) -> tuple[CatalogRelation, ...]:
        """The relations ``rel`` is a partition or inheritance child of, all the way up."""
        if not rel.parents:
            return ()
        out: list[CatalogRelation] = []
        todo = list(rel.parents)
        seen: set[int] = set()
        while todo and len(seen) < 64:
            oid = todo.pop()
            if oid in seen:
                continue
            seen.add(oid)
            parent = self.snapshot.relation_by_oid(oid)
            if parent is not None:
                out.append(parent)
                todo.extend(parent.parents)
        return tuple(out)

    def expand_view(self, rel: CatalogRelation) -> ViewExpansion:
        hit = self.shared.views.get(rel.oid)
        if hit is None:
            hit = self._expand_view(rel)
            self.shared.views[rel.oid] = hit
        self.reads |= hit.reads
        self.functions |= hit.functions
        self.user_functions |= hit.user_functions
        self._instance(hit.instances)
        self.row_mixing |= hit.row_mixing
        # A view that packs (json_agg over customers) packs for whoever reads it.
        self.packing.extend(hit.packing)
        if hit.unanalysable:
            self.unanalysable.append(hit.unanalysable)
        return hit

    def _expand_view(self, rel: CatalogRelation) -> ViewExpansion:

        if rel.oid in self.view_stack:
            return ViewExpansion(
                [(c.name, EMPTY) for c in rel.columns],
                frozenset(),
                frozenset(),
                frozenset(),
                f"view {rel.qualified} refers to itself",
            )
        sub = type(self)(self.shared, rel.view_search_path, (*self.view_stack, rel.oid))
        problem: str | None = None
        lineages: list[Lineage] = []
        try:
            tree = parse_json(rel.view_sql or "")
            stmt = tree["stmts"][0]["stmt"]
            cols = sub.query(stmt, None, {})
            lineages = [lin for _n, lin in cols]
        except Exception as exc:
            problem = f"definition of view {rel.qualified} could not be analysed: {exc}"
        if sub.unanalysable:
            problem = problem or sub.unanalysable[0]
        out: Columns = []
        for i, c in enumerate(rel.columns):
            lin = lineages[i] if i < len(lineages) else EMPTY
            own = SourceColumn(rel.schema, rel.name, c.name)
            if c.labels or problem:
                # A label on the view's own column counts too.
                lin = Exact(lin | {own}, lin.columns) if isinstance(lin, Exact) else lin | {own}
            if isinstance(lin, Exact):
                # A plain copy is a copy of the view's own column too: need-to-know keyed on
                # the view (a materialized view's stored rows) finds its key.
                lin = Exact(lin, lin.columns | {own})
            out.append((c.name, lin))
        return ViewExpansion(
            out,
            frozenset(sub.reads),
            frozenset(sub.functions),
            frozenset(sub.user_functions),
            problem,
            tuple(sub.packing),
            dict(sub.instances),
            sub.row_mixing,
        )

    def _unknown_rel(self, alias: str, schema: str, name: str) -> Rel:
        """A relation the catalog does not have (yet): columns are followed by name, and ``*``
        or a whole-row reference yields the pseudo column ``schema.name.*``, which carries
        the labels of data copied into it earlier (``Shared.taint``)."""
        whole = frozenset((SourceColumn(schema, name, "*"),))
        return Rel(
            alias,
            [("*", whole)],
            relation=f"{schema}.{name}",
            labelled=bool(self.shared.lineage_labels(whole)),
            schema=schema,
            table=name,
        )
