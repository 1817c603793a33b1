"""The values column lineage is made of, and the FROM scope names are looked up in.

A column's lineage is the set of stored columns (``SourceColumn``) its value derives from;
``Exact`` marks a plain copy of stored columns (the only kind that can name a record) and
``combined`` marks sources whose values reach one output value from many rows.  ``Rel`` is one
name a FROM clause makes visible, with its columns' lineage, and ``Scope`` one level of them
with its CTEs.  This module owns those types and the small operations on them (the merged
column of ``JOIN ... USING``, column aliases); the walk that fills them is in the layers of
``policy.lineage.walker``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from policy.facts import SourceColumn

Lineage = frozenset[SourceColumn]
Columns = list[tuple[str, Lineage]]
EMPTY: Lineage = frozenset()


class Exact(frozenset[SourceColumn]):
    """The lineage of a plain copy of a stored column (one of ``columns``): in every row the
    value *is* that column's value in one row of its relation (through subqueries, CTEs,
    views, joins and RETURNING), not something computed from it.  Only such a copy of a
    primary key identifies the record the rest of the row came from: ``customer_id + 1000``,
    ``nullif(customer_id, 7)``, ``count(customer_id)`` or ``lag(customer_id)`` derive from
    the key alone but name another record or none.  Any set operation on it yields a plain
    frozenset, so whatever combines lineages drops the mark by itself.  A column merged by
    ``JOIN ... USING`` is an exact copy of both sides' columns (equal wherever both rows are
    there), hence several ``columns``."""

    __slots__ = ("columns",)
    columns: frozenset[SourceColumn]

    def __new__(cls, items: Iterable[SourceColumn], columns: Iterable[SourceColumn]) -> Exact:
        self = super().__new__(cls, items)
        self.columns = frozenset(columns)
        return self

    def __reduce__(
        self,
    ) -> tuple[type[Exact], tuple[frozenset[SourceColumn], frozenset[SourceColumn]]]:
        return (Exact, (frozenset(self), self.columns))


def names_record_by(lin: Lineage, key: SourceColumn) -> bool:
    """Whether an output column of lineage ``lin`` can serve as ``key`` for need-to-know:
    it derives from that key column, or is a plain copy of a column the statement equated
    with it (``c.customer_id`` joined ``ON p.customer_id = c.customer_id``)."""
    return key in lin or (isinstance(lin, Exact) and key in lin.columns)


def combined(lin: Iterable[SourceColumn]) -> Lineage:
    """``lin`` as it reaches a value that combines several rows (an aggregate's result, an
    ARRAY sublink, a window function reading other rows): each source is marked, so the
    output column says that one value may carry many records."""
    return frozenset(src.as_combined() for src in lin)


@dataclass(slots=True)
class Rel:
    """One name visible in a FROM scope, and its columns' lineage."""

    alias: str
    columns: Columns
    relation: str | None = None  # schema.name of a stored relation or view
    labelled: bool = False  # star over it reads labelled data
    opaque: Lineage | None = None  # unknown columns: any name resolves to this lineage
    schema: str | None = None  # for relations missing from the catalog
    table: str | None = None
    colmap: dict[str, Lineage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, lin in self.columns:
            prev = self.colmap.get(name)
            self.colmap[name] = lin if prev is None else prev | lin

    def lookup(self, name: str) -> Lineage | None:
        hit = self.colmap.get(name)
        if hit is not None:
            return hit
        if self.opaque is not None:
            return self.opaque
        if self.schema is not None and self.table is not None:
            # A relation the catalog does not know: follow the column by name.
            return frozenset((SourceColumn(self.schema, self.table, name),))
        return None

    def whole(self) -> Lineage:
        out: set[SourceColumn] = set()
        for _n, lin in self.columns:
            out |= lin
        if self.opaque:
            out |= self.opaque
        return frozenset(out)


@dataclass(slots=True)
class Scope:
    rels: list[Rel]
    star: Columns  # what an unqualified * expands to
    parent: Scope | None
    ctes: dict[str, Columns]


def merge_using(left: Lineage, right: Lineage) -> Lineage:
    if isinstance(left, Exact) and isinstance(right, Exact):
        return Exact(left | right, left.columns | right.columns)
    return left | right


def apply_colnames(cols: Columns, colnames: list[str]) -> Columns:
    if not colnames:
        return cols
    out = [(colnames[i] if i < len(colnames) else c, lin) for i, (c, lin) in enumerate(cols)]
    return out
