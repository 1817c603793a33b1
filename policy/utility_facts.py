"""The facts of utility statements, beyond what the lineage walk gives: COPY (direction,
target, options, the columns it reads and the server files it writes or reads), SET and
set_config() (search_path, role, and the settings that would make PostgreSQL read the SQL
differently from pgwarden, which are refused), CREATE TABLE's own function calls, and the
function a CREATE FUNCTION / PROCEDURE defines, as the catalog will show it.
"""

from __future__ import annotations

from typing import Any

from pglast import parser as _pg

from policy.catalog import CatalogFunction
from policy.encoding import foreign_encoding
from policy.lineage.base import Unanalysable
from policy.lineage.builtin import SERVER_FILES, SERVER_FILES_TARGET
from policy.lineage.model import Columns
from policy.lineage.shared import Shared
from policy.lineage.tree import Node, const_str, iter_nodes, names, sval
from policy.lineage.walker import StatementWalker
from policy.search_path import DEFAULT_SEARCH_PATH, parse_search_path


def copy_statement(w: StatementWalker, n: Node, f: dict[str, Any]) -> Columns:
    is_from = bool(n.get("is_from"))
    program = bool(n.get("is_program"))
    target = "program" if program else ("file" if n.get("filename") else None)
    f["copy_direction"] = "from" if is_from else "to"
    f["copy_target"] = target or ("stdin" if is_from else "stdout")
    f["copy_program"] = program
    f["copy_options"] = copy_options(n)
    out = _copy_columns(w, n, f, is_from)
    if target is not None:
        # Server files are a place data can be parked and read back (pg_read_file, COPY FROM).
        if is_from:
            schema, name = w.qualify_target(n["relation"])
            w.record_copy(f"{schema}.{name}", [("", frozenset((SERVER_FILES,)))])
        else:
            w.record_copy(SERVER_FILES_TARGET, [("*", lin) for _c, lin in out])
    return out


def copy_options(n: Node) -> tuple[tuple[str, str], ...]:
    """``WITH (FORMAT csv, DELIMITER ';', HEADER)`` -> (("format", "csv"), ...): what the
    proxy needs to read the rows of the COPY's output.  List-valued options are left out."""
    out: list[tuple[str, str]] = []
    for item in n.get("options") or ():
        d = item.get("DefElem") or {}
        arg = d.get("arg")
        if arg is None:
            value = "true"
        elif "String" in arg:
            value = str(arg["String"].get("sval", ""))
        elif "Boolean" in arg:
            value = "true" if arg["Boolean"].get("boolval") else "false"
        elif "Integer" in arg:
            value = str(arg["Integer"].get("ival", 0))
        else:
            continue
        out.append((str(d.get("defname", "")).lower(), value))
    return tuple(out)


def _copy_columns(w: StatementWalker, n: Node, f: dict[str, Any], is_from: bool) -> Columns:
    if n.get("query"):
        f["copy_source"] = "query"
        return w.query(n["query"], None, {})
    rv = n["relation"]
    attlist = names(n.get("attlist"))
    if is_from:
        schema, name = w.qualify_target(rv)
        w.writes.add(f"{schema}.{name}")
        w.columns_written |= {f"{schema}.{name}.{a}" for a in attlist or ("*",)}
        return []
    rel = w.range_var(rv, None, {})
    f["copy_source"] = rel.relation
    if not attlist:
        w._mark_star(rel)
        return list(rel.columns)
    out: Columns = []
    for a in attlist:
        lin = rel.lookup(a)
        out.append((a, lin if lin is not None else frozenset()))
    return out


def variable_set(n: Node, f: dict[str, Any]) -> None:
    name = n.get("name")
    vkind = n.get("kind")
    if name == "standard_conforming_strings" and vkind == "VAR_SET_VALUE":
        args = n.get("args") or []
        value = (const_str(args[0]) or "") if args else ""
        if value.lower() not in ("on", "true", "yes", "1"):
            raise Unanalysable(
                "standard_conforming_strings off: PostgreSQL would read backslashes in string "
                "literals as escapes, and pgwarden's reading of the SQL would differ"
            )
    if name == "client_encoding" and vkind == "VAR_SET_VALUE":
        args = n.get("args") or []
        value = (const_str(args[0]) or "") if args else ""
        if not value or foreign_encoding(value) is not None:
            raise Unanalysable(
                f"client_encoding {value or '(not a constant)'}: not an encoding known to keep "
                "quotes and backslashes whole characters, so PostgreSQL and pgwarden could read "
                "the statements after it differently"
            )
    if name in ("role", "session_authorization"):
        args = n.get("args") or []
        role = const_str(args[0]) if args and vkind == "VAR_SET_VALUE" else "none"
        f["role"] = role if role is not None else "none"
        return
    if vkind == "VAR_RESET_ALL" or (
        name == "search_path" and vkind in ("VAR_RESET", "VAR_SET_DEFAULT")
    ):
        f["search_path"] = DEFAULT_SEARCH_PATH
        f["search_path_local"] = bool(n.get("is_local"))
        f["search_path_reset"] = True
        return
    if name != "search_path" or vkind != "VAR_SET_VALUE":
        return
    path: list[str] = []
    for a in n.get("args") or ():
        s = const_str(a)
        if s is None:
            raise Unanalysable("search_path set to a value that is not a constant")
        # Each list element is one schema name, verbatim (PostgreSQL quotes it as needed).
        path.append(s)
    f["search_path"] = tuple(path)
    f["search_path_local"] = bool(n.get("is_local"))


def own_code(n: Node, shared: Shared) -> None:
    """A table whose defaults, generated columns or checks call a function that is not
    PostgreSQL's own runs that function on every INSERT, unseen by the analysis."""
    builtins = shared.snapshot.builtin_functions
    for call in iter_nodes(
        [n.get("tableElts"), n.get("constraints"), n.get("partspec")], "FuncCall"
    ):
        fname = names(call.get("funcname"))
        name = fname[-1].lower() if fname else ""
        if (len(fname) > 1 and fname[0] != "pg_catalog") or (builtins and name not in builtins):
            raise Unanalysable(f"CREATE TABLE calls function {'.'.join(fname)}")


def may_name_set_config(text: str) -> bool:
    """Whether a statement's text can call set_config: it names it, plainly, quoted, or in a
    Unicode-escaped identifier (``U&"set\\005fconfig"``).  Most statements do not, and the
    walk of their whole tree looking for the call was a tenth of an analysis."""
    low = text.lower()
    return "set_config" in low or "u&" in low


def set_config_calls(n: Node, f: dict[str, Any]) -> None:
    for call in iter_nodes(n, "FuncCall"):
        fname = names(call.get("funcname"))
        if not fname or fname[-1] != "set_config":
            continue
        args = call.get("args") or []
        if args and const_str(args[0]) in ("standard_conforming_strings", "client_encoding"):
            raise Unanalysable(f"set_config() of {const_str(args[0])}")
        if len(args) < 2 or const_str(args[0]) != "search_path":
            if args and const_str(args[0]) is None:
                raise Unanalysable("set_config() with a setting name chosen at run time")
            continue
        value = const_str(args[1])
        if value is None:
            raise Unanalysable("search_path set to a value that is not a constant")
        f["search_path"] = parse_search_path(value)
        local = args[2].get("A_Const", {}).get("boolval", {}) if len(args) > 2 else {}
        f["search_path_local"] = bool(local.get("boolval"))


def defined_function(n: Node, text: str, w: StatementWalker) -> CatalogFunction | None:
    """The function a CREATE FUNCTION/PROCEDURE defines, as the catalog will show it.

    Calls to it may arrive before the catalog refresh that the DDL triggers completes (or in
    the same query string); the analyzer uses this definition until then.
    """
    fname = names(n.get("funcname"))
    if not fname:
        return None
    schema = fname[-2] if len(fname) > 1 else w.creation_schema()
    language = "sql" if n.get("sql_body") else ""
    source = ""
    for o in n.get("options") or ():
        d = o.get("DefElem", {})
        if d.get("defname") == "language":
            language = sval(d.get("arg", {})).lower()
        elif d.get("defname") == "as":
            items = d.get("arg", {}).get("List", {}).get("items", [])
            source = sval(items[0]) if items else ""
    if n.get("sql_body"):
        source = _from_keyword(text, ("BEGIN_P", "RETURN")) or ""
    arguments, result = _signature(text, bool(n.get("is_procedure")))
    return CatalogFunction(schema, fname[-1], language, source, arguments=arguments, result=result)


def _signature(text: str, is_procedure: bool) -> tuple[str, str]:
    """Argument list and result type as ``pg_get_function_arguments``/``_result`` print them
    (near enough for the PL/pgSQL parser's checks of RETURN forms)."""
    from pglast import parse_sql  # node objects: slow, but CREATE FUNCTION is rare
    from pglast.stream import RawStream

    try:
        node: Any = parse_sql(text)[0].stmt
    except Exception:
        return "", "void"
    params = list(node.parameters or ())
    table = [p for p in params if str(p.mode.value) == "t"]
    args = ", ".join(RawStream()(p) for p in params if str(p.mode.value) != "t")
    if table:
        return args, "TABLE(" + ", ".join(RawStream()(p) for p in table) + ")"
    if node.returnType is not None:
        return args, RawStream()(node.returnType)
    has_out = any(str(p.mode.value) in ("o", "b") for p in params)
    return args, "record" if has_out and not is_procedure else "void"


def _top_level_token(text: str, keywords: tuple[str, ...]) -> Any:
    """The first token among ``keywords`` outside parentheses, or None."""
    try:
        tokens = _pg.scan(text)
    except Exception:
        return None
    depth = 0
    for t in tokens:
        if t.name == "ASCII_40":
            depth += 1
        elif t.name == "ASCII_41":
            depth -= 1
        elif depth == 0 and t.name in keywords:
            return t
    return None


def _from_keyword(text: str, keywords: tuple[str, ...]) -> str | None:
    """The text from the first top-level token among ``keywords`` to the end."""
    t = _top_level_token(text, keywords)
    return None if t is None else text[t.start :].strip().rstrip(";").strip()


def after_keyword(text: str, keyword: str) -> str | None:
    """The text after the first top-level ``keyword`` token (PREPARE ... AS, DECLARE ... FOR)."""
    t = _top_level_token(text, (keyword,))
    return None if t is None else text[t.end + 1 :].strip().rstrip(";").strip()
