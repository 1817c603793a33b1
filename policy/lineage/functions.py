"""Calls into user-defined functions: which functions a call's name reaches (the catalog's,
and those created through pgwarden that it does not show yet), and what their bodies can
return, walked by a sub-walker under the function's own search_path (SQL bodies, and the
queries of PL/pgSQL ones; dynamic SQL and other languages are unanalysable).  A recursive
call adds nothing its first expansion did not.
"""

from __future__ import annotations

from policy.catalog import CatalogFunction
from policy.facts import SourceColumn
from policy.lineage.model import EMPTY, Lineage
from policy.lineage.relations import RelationResolver
from policy.lineage.tree import node_type
from policy.parse import function_body_statements, plpgsql_queries
from policy.search_path import parse_search_path


class FunctionFollower(RelationResolver):
    """Follows calls into user functions' bodies."""

    def _function_candidates(self, schema: str, name: str) -> tuple[CatalogFunction, ...]:
        found = self.snapshot.user_functions(schema, name)
        pending = self.shared.pending_functions.get((schema, name))
        return found + pending if pending else found

    def _resolve_function(self, fname: list[str]) -> tuple[CatalogFunction, ...]:
        """The user functions a call's name reaches: by its schema, else the first schema
        of the search_path that has one by that name."""
        if len(fname) > 1:
            return self._function_candidates(fname[-2], fname[-1])
        for s in self.search_path:
            candidates = self._function_candidates(s, fname[0])
            if candidates:
                return candidates
        return ()

    def user_function(self, fname: list[str], acc: set[SourceColumn]) -> bool:
        """Follow a call into a user-defined function; False if there is none by that name."""
        if not self.snapshot.functions and not self.shared.pending_functions:
            return False
        candidates = self._resolve_function(fname)
        for f in candidates:
            self.user_functions.add(f.qualified)
            if f.qualified in self.function_stack:
                continue  # a recursive call adds nothing its first expansion did not
            if f.language == "sql":
                queries: tuple[str, ...] = (f.source,)
            elif f.language == "plpgsql":
                try:
                    queries, dynamic = plpgsql_queries(f.arguments, f.result, f.source)
                except Exception:
                    self.unanalysable.append(f"body of function {f.qualified} does not parse")
                    continue
                if dynamic:
                    self.unanalysable.append(f"function {f.qualified} runs dynamic SQL")
                    continue
            elif f.language in ("internal", "c"):
                continue
            else:
                self.unanalysable.append(f"function {f.qualified} is written in {f.language}")
                continue
            self.function_stack.add(f.qualified)
            path = parse_search_path(f.search_path) if f.search_path is not None else None
            try:
                for q in queries:
                    acc |= self._function_query(f.qualified, q, path)
            finally:
                self.function_stack.discard(f.qualified)
        return bool(candidates)

    def _function_query(
        self, qualified: str, source: str, search_path: tuple[str, ...] | None = None
    ) -> Lineage:
        """What a statement inside a function body can return: the union of its outputs.

        A sub-walker keeps the body's unresolved names (its parameters and variables) out of
        the caller's facts; what it reads, writes and copies counts for the caller, and so do
        relations it could not find. The body resolves names through the function's own
        ``SET search_path`` when it has one.
        """
        try:
            stmts = function_body_statements(source)
        except Exception:
            self.unanalysable.append(f"body of function {qualified} could not be parsed")
            return EMPTY
        sub = type(self)(
            self.shared, search_path if search_path is not None else self.search_path,
            self.view_stack,
        )  # fmt: skip
        sub.function_stack = self.function_stack
        out: set[SourceColumn] = set()
        for stmt in stmts:
            kind, n = node_type(stmt)
            if kind in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
                for _n, lin in sub.query(stmt, None, {}):
                    out |= lin
            elif kind == "ReturnStmt":
                out |= sub.expr(n.get("returnval"), None)
        self._absorb(sub)
        # What a function returns cannot be tied to the caller's rows: its reads count twice.
        self._instance(sub.instances + sub.instances)
        self.row_mixing |= bool(sub.instances)
        return frozenset(out)
