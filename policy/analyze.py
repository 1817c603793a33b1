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

This module owns the cache and the splitting of a text into statements; the facts of one
statement are made by ``policy.statement_facts`` (utility statements read by
``policy.utility_facts``), and statement shapes are keyed by ``policy.shapes``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pglast import parser as _pg

from policy.catalog import Catalog, CatalogColumn, CatalogFunction, CatalogSnapshot
from policy.facts import DataCopy, QueryFacts
from policy.labels import LabelRules
from policy.lineage.shared import Shared, tainted_labels
from policy.normalize import fingerprint, normalize, normalize_and_shape
from policy.parse import parse_json
from policy.search_path import DEFAULT_SEARCH_PATH, expand_user
from policy.shapes import shape_key, shape_reusable
from policy.statement_facts import analyze_statement


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
