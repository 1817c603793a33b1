"""The result of analysing one statement: frozen values the engine and the audit trail read.

``QueryFacts`` answers *which sensitive columns can this statement put in front of the person
who sent it*, plus what policy rules need besides (relations, functions, packing aggregates,
WHERE/LIMIT, COPY, copies into other tables, statements that cannot be followed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from policy.catalog import CatalogFunction


# Marks a source whose values reach an output row combined from several rows of its table
# (an aggregate, an ARRAY sublink, a window function, recursive accumulation): such a value
# can carry many records at once, so it is kept apart from a plain row-by-row source.
COMBINED_MARK = "\x00combined"


class SourceColumn(NamedTuple):
    """A column of a stored relation that data derives from (views are expanded away)."""

    schema: str
    table: str
    column: str

    def __str__(self) -> str:
        if self.column.endswith(COMBINED_MARK):
            return f"{self.schema}.{self.table}.{self.plain.column} (combined from many rows)"
        return f"{self.schema}.{self.table}.{self.column}"

    @property
    def combined(self) -> bool:
        """True when values of this column arrive combined from several of its rows."""
        return self.column.endswith(COMBINED_MARK)

    @property
    def plain(self) -> SourceColumn:
        """The stored column itself, without the combined mark."""
        if self.column.endswith(COMBINED_MARK):
            return SourceColumn(self.schema, self.table, self.column[: -len(COMBINED_MARK)])
        return self

    def as_combined(self) -> SourceColumn:
        if self.column.endswith(COMBINED_MARK):
            return self
        return SourceColumn(self.schema, self.table, self.column + COMBINED_MARK)


@dataclass(frozen=True, slots=True)
class OutputColumn:
    """One column of the result the client receives, and where its values come from."""

    name: str
    sources: frozenset[SourceColumn]
    labels: frozenset[str]

    # Labels whose values reach this column combined from several records (an aggregate,
    # an ARRAY sublink, a window function reading other rows, recursive accumulation).
    combined_labels: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PackingCall:
    """An aggregate or function that packs many values or a whole row into one value."""

    function: str
    sources: frozenset[SourceColumn]
    labels: frozenset[str]


@dataclass(frozen=True, slots=True)
class DataCopy:
    """Data written into ``target`` derives from ``sources`` (CREATE TABLE AS, INSERT SELECT)."""

    target: str
    sources: frozenset[SourceColumn]
    labels: frozenset[str]
    column: str = "*"  # the column of ``target`` written; "*": any (not known which)
    # Labels stored combined from many records (string_agg(email) into a column or a large
    # object): read back later, one value carries them all.
    combined_labels: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RecordKey:
    """The output positions holding the primary key of a labelled relation's rows."""

    relation: str
    columns: tuple[str, ...]
    positions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class QueryFacts:
    """Everything policy needs to know about one statement.

    ``kind`` is the statement's node name without ``Stmt`` in lower snake case (``select``,
    ``insert``, ``copy``, ``declare_cursor``, ``fetch``, ``execute``, ``variable_set`` ...).
    Relation names are ``schema.name``; source columns are ``(schema, table, column)``.
    ``unanalysable`` is None when the statement was followed completely; otherwise it says
    what could not be followed, and a fail-closed engine must treat the statement as reading
    anything.
    """

    kind: str
    normalized: str
    fingerprint: str
    relations_read: frozenset[str] = frozenset()
    relations_written: frozenset[str] = frozenset()
    output: tuple[OutputColumn, ...] = ()
    filter_columns: frozenset[SourceColumn] = frozenset()
    filter_labels: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    packing: tuple[PackingCall, ...] = ()
    has_where: bool = False
    has_limit: bool = False
    limit: int | None = None
    offset: int | None = None
    star_tables: frozenset[str] = frozenset()
    copy_direction: str | None = None  # "to" (data leaves) or "from" (data arrives)
    copy_target: str | None = None  # "stdout", "stdin", "program", "file"
    copy_program: bool = False
    copy_source: str | None = None  # table name, or "query"
    copy_options: tuple[tuple[str, str], ...] = ()  # (("format", "csv"), ("header", "true"))
    copies: tuple[DataCopy, ...] = ()
    prepared_name: str | None = None  # PREPARE name / EXECUTE name / DEALLOCATE name
    inner_sql: str | None = None  # PREPARE's and DECLARE's query text, for re-analysis
    cursor_name: str | None = None  # DECLARE / FETCH / MOVE / CLOSE
    fetch_count: int | None = None  # FETCH n; None = ALL or unknown
    search_path: tuple[str, ...] | None = None  # new search_path, when the statement sets one
    search_path_local: bool = False
    search_path_reset: bool = False  # RESET / SET ... TO DEFAULT: back to the session default
    record_keys: tuple[RecordKey, ...] = ()  # for the record ledger
    # Labelled output columns no record key accounts for: the ledger keeps their values.
    value_positions: tuple[int, ...] = ()
    defines_function: CatalogFunction | None = None  # CREATE FUNCTION / PROCEDURE
    role: str | None = None  # SET ROLE / SET SESSION AUTHORIZATION: "$user" follows it
    is_ddl: bool = False  # the catalog may have changed: invalidate it
    user_functions: frozenset[str] = frozenset()
    unresolved: tuple[str, ...] = ()  # names not in the catalog (followed by name only)
    # Relations the statement reads that name resolution could not find in the catalog, as
    # PostgreSQL would look them up: what they hold is unknown, so a fail-closed engine
    # refuses them to subjects with limits (never "unlabelled").
    unknown: tuple[str, ...] = ()
    # The most records of one labelled relation a single output row can carry: a self-join,
    # two scalar subqueries over customers, or a UNION of two reads put one customer's values
    # beside another's. Row limits and windows count each row as this many records.
    records_per_row: int = 1
    # Labelled relations whose values in one output row may come from several of its rows
    # (read more than once where rows reach the output, or rows mixed by a window function
    # or grouping sets): no key column in the row vouches for all of them.
    mixed_relations: frozenset[str] = frozenset()
    # Columns the statement writes, "schema.table.column" ("schema.table.*": any of them):
    # what need-to-know checks against the columns its lookup reads.
    columns_written: frozenset[str] = frozenset()
    unanalysable: str | None = None
    location: int = 0  # offset of the statement in the text the client sent
    error_position: int | None = None  # where parsing failed
    # Worked out once: the tracker and the audit trail ask for it several times for every
    # execution of a statement, and the analyser hands out the same facts object each time.
    _output_labels: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out: set[str] = set()
        for c in self.output:
            out |= c.labels
        object.__setattr__(self, "_output_labels", frozenset(out))

    @property
    def output_labels(self) -> frozenset[str]:
        """Labels of every column the client can receive (packing that reaches the output is
        part of an output column's lineage; packing inside e.g. CREATE TABLE AS is not)."""
        return self._output_labels

    @property
    def combined_labels(self) -> frozenset[str]:
        """Labels that reach the client combined from several records in one output row."""
        out: frozenset[str] = frozenset()
        for c in self.output:
            if c.combined_labels:
                out = out | c.combined_labels
        return out

    @property
    def output_sources(self) -> frozenset[SourceColumn]:
        out: set[SourceColumn] = set()
        for c in self.output:
            out |= c.sources
        return frozenset(out)

    @property
    def copied_labels(self) -> frozenset[str]:
        out: set[str] = set()
        for c in self.copies:
            out |= c.labels
        return frozenset(out)

    @property
    def labels(self) -> frozenset[str]:
        """All labels the statement touches: output, copies and filters."""
        return self.output_labels | self.copied_labels | self.filter_labels

    @property
    def select_star(self) -> bool:
        """``*``, ``t.*`` or a whole-row reference read a labelled relation."""
        return bool(self.star_tables)

    @property
    def reads_labelled(self) -> bool:
        return bool(self.output_labels or self.copied_labels)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (sets sorted), for explain output and audit records."""
        f = self
        return {
            "kind": f.kind,
            "normalized": f.normalized,
            "fingerprint": f.fingerprint,
            "relations_read": sorted(f.relations_read),
            "relations_written": sorted(f.relations_written),
            "output": [
                {
                    "name": c.name,
                    "labels": sorted(c.labels),
                    "combined_labels": sorted(c.combined_labels),
                    "sources": sorted(map(str, c.sources)),
                }
                for c in f.output
            ],
            "labels": sorted(f.labels),
            "output_labels": sorted(f.output_labels),
            "filter_labels": sorted(f.filter_labels),
            "functions": sorted(f.functions),
            "packing": [{"function": p.function, "labels": sorted(p.labels)} for p in f.packing],
            "copies": [{"target": c.target, "labels": sorted(c.labels)} for c in f.copies],
            "star_tables": sorted(f.star_tables),
            "has_where": f.has_where,
            "has_limit": f.has_limit,
            "limit": f.limit,
            "offset": f.offset,
            "copy": (
                {"direction": f.copy_direction, "target": f.copy_target, "source": f.copy_source}
                if f.copy_direction
                else None
            ),
            "search_path": list(f.search_path) if f.search_path is not None else None,
            "record_keys": [
                {"relation": k.relation, "columns": list(k.columns), "positions": list(k.positions)}
                for k in f.record_keys
            ],
            "value_positions": list(f.value_positions),
            "user_functions": sorted(f.user_functions),
            "defines_function": f.defines_function.qualified if f.defines_function else None,
            "unresolved": list(f.unresolved),
            "unknown": list(f.unknown),
            "records_per_row": f.records_per_row,
            "mixed_relations": sorted(f.mixed_relations),
            "unanalysable": f.unanalysable,
        }
