"""Per-session SQL state the analysis needs: search_path, SQL-level prepared statements, cursors.

``EXECUTE p`` and ``FETCH c`` say nothing by themselves about what they return; their data
comes from an earlier ``PREPARE`` or ``DECLARE``. ``SqlSession`` remembers those and hands back
facts for ``EXECUTE``/``FETCH`` that carry the lineage and labels of the underlying query.

Public API::

    session = SqlSession(analyzer, search_path=DEFAULT_SEARCH_PATH, user="alice")
    facts = session.analyze(sql)        # tuple[QueryFacts, ...], state updated
    session.search_path                 # current path (for name resolution)
    session.set_startup_options(options)

Transaction rollback of ``SET`` and ``SET LOCAL`` scoping are approximated: ``SET LOCAL``
changes the path until ``end_transaction()`` (the proxy calls it on ReadyForQuery 'I').
"""

from __future__ import annotations

from dataclasses import replace

from policy.analyze import Analyzer
from policy.facts import QueryFacts
from policy.search_path import DEFAULT_SEARCH_PATH, search_path_from_options


class SqlSession:
    """Statement-level state of one client session."""

    def __init__(
        self,
        analyzer: Analyzer,
        search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH,
        user: str | None = None,
    ) -> None:
        self.analyzer = analyzer
        self.default_search_path = search_path
        self._session_path = search_path
        self._local_path: tuple[str, ...] | None = None
        self.user = user
        self.session_user = user
        self.prepared: dict[str, str] = {}  # name -> query text
        self.cursors: dict[str, QueryFacts] = {}

    @property
    def search_path(self) -> tuple[str, ...]:
        return self._local_path if self._local_path is not None else self._session_path

    def set_startup_options(self, options: str | None) -> None:
        """Apply ``-c search_path=...`` from the startup packet's ``options``."""
        path = search_path_from_options(options)
        if path is not None:
            self.default_search_path = path
            self._session_path = path

    def set_session_default(self, path: tuple[str, ...]) -> None:
        """The path the server computed for this session at its start (server default,
        ``ALTER DATABASE``/``ALTER ROLE ... SET``, startup options): what ``RESET`` returns
        to, and the path until the session sets another."""
        self.default_search_path = path
        self._session_path = path
        self._local_path = None

    def end_transaction(self) -> None:
        self._local_path = None

    def analyze(self, sql: str) -> tuple[QueryFacts, ...]:
        """Analyse ``sql`` in this session's state and update the state from it."""
        out: list[QueryFacts] = []
        # Statements after a SET in the same string see the new path: analyze() handles
        # that inside one call; here we only carry the result forward.
        for f in self.analyzer.analyze(sql, self.search_path, self.user):
            out.append(self._apply(f))
        return tuple(out)

    def _apply(self, f: QueryFacts) -> QueryFacts:
        if f.role is not None:
            # "$user" in search_path means current_user, which SET ROLE changes.
            self.user = self.session_user if f.role == "none" else f.role
        if f.search_path is not None:
            path = f.search_path
            if f.search_path_reset:
                path = self.default_search_path
            if f.search_path_local:
                self._local_path = path
            else:
                self._session_path = path
                self._local_path = None
            return f
        if f.kind == "prepare" and f.prepared_name and f.inner_sql:
            self.prepared[f.prepared_name] = f.inner_sql
            return f
        if f.kind == "deallocate":
            if f.prepared_name is None:
                self.prepared.clear()
            else:
                self.prepared.pop(f.prepared_name, None)
            return f
        if f.kind == "execute" and f.prepared_name is not None:
            text = self.prepared.get(f.prepared_name)
            if text is None:
                return replace(
                    f, unanalysable=f"EXECUTE of unknown prepared statement {f.prepared_name}"
                )
            # Re-analysed under the current path: PostgreSQL re-plans when search_path changes.
            inner = self.analyzer.analyze(text, self.search_path, self.user)
            if not inner:
                return f
            return _borrow(f, inner[0])
        if f.kind == "declare_cursor" and f.cursor_name:
            self.cursors[f.cursor_name] = f
            return f
        if f.kind in ("fetch", "move") and f.cursor_name is not None:
            decl = self.cursors.get(f.cursor_name)
            if decl is None:
                return replace(f, unanalysable=f"FETCH from unknown cursor {f.cursor_name}")
            borrowed = _borrow(f, decl)
            return borrowed if f.kind == "fetch" else replace(borrowed, output=(), packing=())
        if f.kind == "close_portal":
            if f.cursor_name is None:
                self.cursors.clear()
            else:
                self.cursors.pop(f.cursor_name, None)
        if f.kind == "discard":
            self.prepared.clear()
            self.cursors.clear()
        return f


def _borrow(f: QueryFacts, src: QueryFacts) -> QueryFacts:
    """``f`` (EXECUTE/FETCH) carrying what ``src`` (the underlying query) reads and returns."""
    return replace(
        src,
        kind=f.kind,
        normalized=f.normalized,
        fingerprint=f.fingerprint,
        prepared_name=f.prepared_name or src.prepared_name,
        cursor_name=f.cursor_name or src.cursor_name,
        fetch_count=f.fetch_count,
        inner_sql=src.inner_sql,
        location=f.location,
        unanalysable=f.unanalysable or src.unanalysable,
    )
