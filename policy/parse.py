"""The one place that calls the parser: libpg_query JSON decoded with orjson."""

from __future__ import annotations

from typing import Any

import orjson
from pglast import parser as _pg

ParseError = _pg.ParseError


def parse_json(sql: str) -> dict[str, Any]:
    """The parse tree of ``sql`` as plain dicts (raises ``ParseError`` with a position)."""
    tree: dict[str, Any] = orjson.loads(_pg.parse_sql_json(sql))
    return tree


_DYNAMIC_KEYS = (b'"PLpgSQL_stmt_dynexecute"', b'"PLpgSQL_stmt_dynfors"', b'"dynquery"')


def plpgsql_queries(arguments: str, result: str, source: str) -> tuple[tuple[str, ...], bool]:
    """The SQL a PL/pgSQL body runs, as standalone statements, and whether it also builds SQL
    at run time (``EXECUTE``, ``FOR ... IN EXECUTE``, ``OPEN ... FOR EXECUTE``).

    The body is compiled by libpg_query's PL/pgSQL parser inside a CREATE FUNCTION with the
    function's real signature (the grammar checks RETURN forms against it). Raises
    ``ParseError`` or ``ValueError`` when it cannot be parsed.
    """
    tag = "pgw"
    while f"${tag}$" in source:
        tag += "x"
    text = (
        f"CREATE FUNCTION pgwarden_probe({arguments}) RETURNS {result or 'void'} "
        f"LANGUAGE plpgsql AS ${tag}${source}${tag}$"
    )
    raw = _pg.parse_plpgsql_json(text)
    data = raw.encode() if isinstance(raw, str) else raw
    dynamic = any(k in data for k in _DYNAMIC_KEYS)
    queries: list[str] = []
    _collect_plpgsql(orjson.loads(data), queries)
    return tuple(queries), dynamic


def _collect_plpgsql(node: Any, out: list[str]) -> None:
    if isinstance(node, list):
        for x in node:
            _collect_plpgsql(x, out)
    elif isinstance(node, dict):
        expr = node.get("PLpgSQL_expr")
        if isinstance(expr, dict) and isinstance(expr.get("query"), str):
            q = expr["query"]
            mode = expr.get("parseMode", 0)
            if mode == 0:
                out.append(q)
            else:
                # Expressions and assignments ("v := expr"): evaluate them as a SELECT.
                if mode >= 3:
                    q = q.split(":=", 1)[1] if ":=" in q else q.split("=", 1)[-1]
                out.append("SELECT " + q)
            return
        for v in node.values():
            if isinstance(v, (dict, list)):
                _collect_plpgsql(v, out)


_RESULT_MODES = ("FUNC_PARAM_OUT", "FUNC_PARAM_INOUT", "FUNC_PARAM_TABLE")


def function_result_columns(arguments: str, result: str) -> tuple[str, ...]:
    """The names of a function's result columns from its signature as the catalog prints it
    (``pg_get_function_arguments``, ``pg_get_function_result``): a ``RETURNS TABLE``'s
    columns or its OUT parameters, in order.  Empty when the result has no named columns
    (a scalar, a composite type, ``record``) or the signature does not parse."""
    try:
        tree = parse_json(
            f"CREATE FUNCTION pgwarden_probe({arguments}) RETURNS {result or 'void'} "
            "LANGUAGE sql AS ''"
        )
        params = tree["stmts"][0]["stmt"]["CreateFunctionStmt"].get("parameters") or ()
    except (ParseError, KeyError, IndexError):
        return ()
    out = []
    for p in params:
        fp = p.get("FunctionParameter", {})
        if fp.get("mode") in _RESULT_MODES:
            if not fp.get("name"):
                return ()  # an unnamed OUT parameter: PostgreSQL names it column1 ...
            out.append(str(fp["name"]))
    return tuple(out)


def function_body_statements(source: str) -> list[dict[str, Any]]:
    """The statements of a SQL-language function body, as parse-tree nodes.

    Handles both the string form (``AS 'SELECT ...'``) and SQL-standard bodies (``BEGIN
    ATOMIC ... END`` / ``RETURN expr``, as ``pg_get_function_sqlbody`` prints them); the
    latter yield ``ReturnStmt`` nodes for ``RETURN``.
    """
    head = source.lstrip()[:12].upper()
    if head.startswith(("BEGIN", "RETURN")):
        tree = parse_json(f"CREATE FUNCTION pgwarden_probe() RETURNS void {source}")
        body = tree["stmts"][0]["stmt"]["CreateFunctionStmt"].get("sql_body") or {}
        out: list[dict[str, Any]] = []
        _flatten_body(body, out)
        return out
    return [raw["stmt"] for raw in parse_json(source).get("stmts", ())]


def _flatten_body(node: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(node, list):
        for x in node:
            _flatten_body(x, out)
    elif isinstance(node, dict):
        if "List" in node:
            _flatten_body(node["List"].get("items", []), out)
        elif node:
            out.append(node)
