"""The per-snapshot memo every walker of one catalog snapshot shares: the labels of each
source column (catalog labels, label rules, and the copy taint of tables labelled data was
copied into), every label the catalog carries, each view's expansion and each relation's
columns.  It is built once per snapshot by ``policy.analyze.Analyzer`` and lives as long as
that snapshot does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policy.catalog import CatalogFunction, CatalogSnapshot
from policy.facts import PackingCall, SourceColumn
from policy.lineage.builtin import STATISTICS_VALUES
from policy.lineage.model import Columns


def tainted_labels(columns: Mapping[str, frozenset[str]], column: str) -> frozenset[str]:
    """Labels copied into ``column`` of a table (``columns``: what each column, or "*" any
    column, received); for the pseudo column "*" (the whole row), every column's."""
    if column == "*":
        return frozenset().union(*columns.values())
    return columns.get(column, frozenset()) | columns.get("*", frozenset())


@dataclass(slots=True)
class ViewExpansion:
    columns: Columns
    reads: frozenset[str]
    functions: frozenset[str]
    user_functions: frozenset[str]
    unanalysable: str | None
    packing: tuple[PackingCall, ...] = ()
    instances: Mapping[str, int] = field(default_factory=dict)  # see StatementWalker.instances
    row_mixing: bool = False


class Shared:
    """Per-snapshot memo shared by all walkers: view expansions and column labels."""

    def __init__(
        self,
        snapshot: CatalogSnapshot,
        rules_labels: Any,
        taint: Mapping[tuple[str, str], Mapping[str, frozenset[str]]] | None = None,
        pending_functions: Mapping[tuple[str, str], tuple[CatalogFunction, ...]] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.rules_labels = rules_labels  # callable(schema, table, column) -> frozenset
        # Tables that labelled data was copied into (CREATE TABLE AS, INSERT ... SELECT):
        # every column of them carries those labels from then on.
        self.taint: Mapping[tuple[str, str], Mapping[str, frozenset[str]]] = taint or {}
        # Functions created through us that the catalog does not show yet.
        self.pending_functions: Mapping[tuple[str, str], tuple[CatalogFunction, ...]] = (
            pending_functions or {}
        )
        self._all_labels: frozenset[str] | None = None
        self.views: dict[int, ViewExpansion] = {}
        self.labels: dict[SourceColumn, frozenset[str]] = {}
        self.rel_columns: dict[int, Columns] = {}
        self.rel_labelled: dict[int, bool] = {}  # relation oid -> any column labelled

    def labels_of(self, src: SourceColumn) -> frozenset[str]:
        hit = self.labels.get(src)
        if hit is not None:
            return hit
        if src.combined:
            return self.labels_of(src.plain)
        if src in STATISTICS_VALUES:
            return self.all_labels
        rel = self.snapshot.relation(src.schema, src.table)
        col = rel.column(src.column) if rel is not None else None
        labels = col.labels if col is not None else self.rules_labels(*src)
        # A session's own temporary schema is pg_temp_N on the server, pg_temp in its text.
        schema = "pg_temp" if src.schema.startswith("pg_temp_") else src.schema
        tainted = self.taint.get((schema, src.table))
        if tainted:
            labels = labels | tainted_labels(tainted, src.column)
        # Names of relations missing from the catalog come from client text: do not let
        # them grow the memo without bound.
        if rel is not None or len(self.labels) < 50_000:
            self.labels[src] = labels
        return labels

    @property
    def all_labels(self) -> frozenset[str]:
        """Every label a column of the catalog carries (copy taint included)."""
        if self._all_labels is None:
            found: set[str] = set()
            for rel in self.snapshot.relations.values():
                for c in rel.columns:
                    found |= c.labels
            for columns in self.taint.values():
                for labels in columns.values():
                    found |= labels
            self._all_labels = frozenset(found)
        return self._all_labels

    def lineage_labels(self, lin: Iterable[SourceColumn]) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for src in lin:
            lab = self.labels_of(src)
            if lab:
                out = out | lab
        return out
