"""What one statement's walk accumulates, and the bottom layer of ``StatementWalker``.

``WalkerBase`` holds everything a walk finds (relations read and written, functions called,
packing calls, copies, filters, unresolved and unknown names, how many times each relation is
read) and the few ways the other layers add to it: counting relation instances, recording a
copy, taking in what a sub-walker of a function body found.  The walk itself (``query``,
``expr``) is declared here and defined by the layers above (``policy.lineage.walker``,
``policy.lineage.expressions``), which call each other recursively.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from typing import Any

from policy.facts import DataCopy, PackingCall, SourceColumn
from policy.lineage.model import Columns, Lineage, Scope
from policy.lineage.shared import Shared
from policy.lineage.tree import Node


class Unanalysable(Exception):
    """Raised inside the walker only; becomes ``QueryFacts.unanalysable``."""


class WalkerBase(ABC):
    """What one statement's walk accumulates; the layers of ``StatementWalker`` add to it."""

    def __init__(
        self,
        shared: Shared,
        search_path: tuple[str, ...],
        view_stack: tuple[int, ...] = (),
    ) -> None:
        self.shared = shared
        self.snapshot = shared.snapshot
        self.search_path = search_path
        self.view_stack = view_stack
        self.reads: set[str] = set()
        self.writes: set[str] = set()
        self.functions: set[str] = set()
        self.user_functions: set[str] = set()
        self.packing: list[PackingCall] = []
        self.star_tables: set[str] = set()
        self.filters: set[SourceColumn] = set()
        self.copies: list[DataCopy] = []
        self.unresolved: list[str] = []
        self.unknown: list[str] = []  # relations name resolution did not find
        self.columns_written: set[str] = set()  # "schema.table.column" or "schema.table.*"
        self.unanalysable: list[str] = []
        self.function_stack: set[str] = set()
        # How many times each stored relation is read where its rows can reach the output
        # (FROM items, scalar subqueries, CTE references, views, functions; not WHERE and
        # other filters): with two instances of customers (a self-join, a LATERAL or scalar
        # subquery over it) one row can carry one customer's key and another's email.
        self.instances: Counter[str] = Counter()
        self.filter_depth = 0  # > 0: walking a filter, whose reads never reach the output
        self.cte_instances: dict[int, tuple[Columns, Counter[str]]] = {}
        # A window function or grouping sets over labelled data: a row can hold values of
        # other rows (lag(email), the ROLLUP total row) beside a key of its own.
        self.row_mixing = False

    @abstractmethod
    def query(self, node: Node, scope: Scope | None, ctes: dict[str, Columns]) -> Columns:
        """Output columns of any statement that can be a subquery or CTE body."""

    @abstractmethod
    def expr(self, node: Any, scope: Scope | None) -> Lineage:
        """Source columns an expression (or list of them) derives from."""

    def _instance(self, counts: Mapping[str, int]) -> None:
        if not self.filter_depth:
            self.instances.update(counts)

    def record_copy(self, target: str, cols: Columns) -> None:
        """Data of ``cols`` is written into ``target``, each into the column it is named
        after ("" or "*": a column not known)."""
        for column, lin in cols:
            # Moving a table's data within itself is not a copy out of it.
            src = frozenset(s for s in lin if f"{s.schema}.{s.table}" != target)
            if src:
                labels = self.shared.lineage_labels
                self.copies.append(
                    DataCopy(
                        target, src, labels(src), column or "*",
                        labels(s for s in src if s.combined),
                    )
                )  # fmt: skip

    def _absorb(self, sub: WalkerBase) -> None:
        """What a function body's walker found that counts for the caller: what it reads,
        writes and copies, and relations it could not find (not its unresolved names, which
        are the function's parameters and variables)."""
        self.reads |= sub.reads
        self.writes |= sub.writes
        self.functions |= sub.functions
        self.user_functions |= sub.user_functions
        self.packing.extend(sub.packing)
        self.copies.extend(sub.copies)
        self.unknown.extend(sub.unknown)
        self.unanalysable.extend(sub.unanalysable)
