"""Adding a protected table's key to the result of a statement that does not select it.

A need-to-know rule checks each result row's key against what the person may see.  The
support tool's own statements select the customer's name and email but not
``customer_id``: rather than refuse them, the proxy sends the statement with
``alias.customer_id`` appended to the select list, checks each row by it and removes it
before the client sees the result.

Only statements where that is sound are rewritten: a plain top-level SELECT (no set
operation, DISTINCT, GROUP BY/HAVING, aggregate or window function, or INTO) whose
FROM reaches the protected table exactly once, as a range variable directly or through
joins (not inside a subquery, a function or an aliased join, and the table named nowhere
else in the statement).  Appending at the end keeps ``ORDER BY 2`` pointing where it did,
and a unique alias keeps ``ORDER BY name`` from meeting the new column.

The text is spliced, not deparsed: the statement PostgreSQL runs is the client's, comments
(sqlcommenter's ``/* end_user='...' */``) and layout included, plus one select-list item.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pglast import ast, parse_sql
from pglast.enums.parsenodes import SetOperation
from pglast.parser import ParseError, Token, scan

KEY_ALIAS = "pgwarden_key"  # the appended columns' names (never seen by the client)


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A protected table's key column: the value a need-to-know rule checks."""

    schema: str
    table: str
    column: str


@dataclass(frozen=True, slots=True)
class NotRewritten:
    """Why a statement's result cannot be given the key (said in the refusal)."""

    reason: str


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@functools.lru_cache(maxsize=2048)
def append_keys(
    sql: str,
    wants: tuple[tuple[int, tuple[KeyRef, ...]], ...],
    aggregates: frozenset[str],
) -> str | NotRewritten:
    """``sql`` with, for each ``(index, keys)`` in ``wants``, its statement number ``index``
    (from 0) given ``keys`` as extra select-list items at the end of its target list, in
    that order; or why that cannot be done soundly.

    ``aggregates`` are the names of aggregate and window functions (a call to one turns
    the statement into a grouped one, where an extra column is an error)."""
    try:
        stmts = parse_sql(sql)
    except ParseError:
        return NotRewritten("the statement cannot be parsed")
    inserts: list[tuple[int, str]] = []
    for index, keys in wants:
        if not 0 <= index < len(stmts):
            return NotRewritten("the statement was not found in the text")
        found = _insertion(sql, stmts[index].stmt, keys, aggregates)
        if isinstance(found, NotRewritten):
            return found
        inserts.append(found)
    out = sql
    for offset, text in sorted(inserts, reverse=True):
        out = out[:offset] + text + out[offset:]
    return out


def _insertion(
    sql: str, stmt: ast.Node | None, keys: tuple[KeyRef, ...], aggregates: frozenset[str]
) -> tuple[int, str] | NotRewritten:
    """Where to insert and what: the select-list items naming ``keys``."""
    if not isinstance(stmt, ast.SelectStmt):
        return NotRewritten("only a plain SELECT can be given the key")
    shape = _unsupported_shape(stmt, aggregates)
    if shape is not None:
        return NotRewritten(f"the statement has {shape}")
    assert stmt.targetList and stmt.fromClause
    items: list[str] = []
    for j, key in enumerate(keys):
        ref = _range_variable(stmt, key)
        if isinstance(ref, NotRewritten):
            return ref
        alias = KEY_ALIAS if j == 0 else f"{KEY_ALIAS}_{j + 1}"
        items.append(f", {quote_ident(ref)}.{quote_ident(key.column)} AS {quote_ident(alias)}")
    offset = _from_keyword(sql, stmt)
    if offset is None:
        return NotRewritten("the end of its select list could not be found")
    return offset, "".join(items) + " "


def _unsupported_shape(stmt: ast.SelectStmt, aggregates: frozenset[str]) -> str | None:
    if stmt.op not in (None, SetOperation.SETOP_NONE, 0) or stmt.larg or stmt.rarg:
        return "a set operation (UNION, INTERSECT, EXCEPT)"
    if stmt.valuesLists:
        return "a VALUES list"
    if stmt.intoClause is not None:
        return "SELECT INTO"
    if stmt.distinctClause:
        return "DISTINCT"
    if stmt.groupClause or stmt.havingClause is not None or stmt.groupDistinct:
        return "GROUP BY or HAVING"
    if stmt.windowClause:
        return "a WINDOW clause"
    if not stmt.targetList:
        return "no select list"
    if not stmt.fromClause:
        return "no FROM clause"
    for node in (*stmt.targetList, *(stmt.sortClause or ())):
        if _has_aggregate(node, aggregates):
            return "an aggregate or window function"
    return None


def _children(node: ast.Node) -> Iterator[ast.Node]:
    slots: Iterable[str] = getattr(type(node), "__slots__", ())
    for name in slots:
        value = getattr(node, name, None)
        if isinstance(value, ast.Node):
            yield value
        elif isinstance(value, (tuple, list)):
            stack = list(value)
            while stack:
                item = stack.pop()
                if isinstance(item, ast.Node):
                    yield item
                elif isinstance(item, (tuple, list)):
                    stack.extend(item)


def _walk(node: ast.Node) -> Iterator[ast.Node]:
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(_children(n))


def _has_aggregate(node: ast.Node, aggregates: frozenset[str]) -> bool:
    """An aggregate or window call of this query level (subqueries are their own level)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.SubLink, ast.SelectStmt)):
            continue
        if isinstance(n, ast.FuncCall):
            if (
                n.agg_star or n.agg_distinct or n.agg_order or n.agg_within_group
                or n.agg_filter is not None or n.over is not None
            ):  # fmt: skip
                return True
            name = n.funcname[-1].sval if n.funcname else ""
            if name in aggregates:
                return True
        stack.extend(_children(n))
    return False


def _reachable(items: tuple[ast.Node, ...] | list[ast.Node]) -> Iterator[ast.RangeVar]:
    """Range variables whose columns the select list can name: FROM items and the sides
    of joins, but not those inside an aliased join (its alias hides them)."""
    stack = list(items)
    while stack:
        n = stack.pop()
        if isinstance(n, ast.RangeVar):
            yield n
        elif isinstance(n, ast.JoinExpr) and n.alias is None:
            stack += [side for side in (n.larg, n.rarg) if side is not None]


def _range_variable(stmt: ast.SelectStmt, key: KeyRef) -> str | NotRewritten:
    """The name the select list can use for the one range variable of ``key.table``."""
    assert stmt.fromClause
    named = [n for n in _walk(stmt) if isinstance(n, ast.RangeVar) and n.relname == key.table]
    if len(named) != 1:
        return NotRewritten(
            f"{key.schema}.{key.table} is named {len(named)} times in it (once is needed)"
        )
    rv = named[0]
    ctes = stmt.withClause.ctes if stmt.withClause is not None else None
    if any(isinstance(c, ast.CommonTableExpr) and c.ctename == key.table for c in ctes or ()):
        # The name would be the WITH query's, not the table's.
        return NotRewritten(f"a WITH query is named {key.table}")
    if not any(r is rv for r in _reachable(stmt.fromClause)):
        return NotRewritten(
            f"{key.schema}.{key.table} is not a table of its top-level FROM (it is in a "
            "subquery, a function or an aliased join)"
        )
    if rv.catalogname or (rv.schemaname and rv.schemaname != key.schema):
        return NotRewritten(f"its {key.table} is not {key.schema}.{key.table}")
    if rv.alias is not None and rv.alias.colnames:
        return NotRewritten(f"its alias renames the columns of {key.table}")
    name = rv.alias.aliasname if rv.alias is not None else rv.relname
    return name if name else NotRewritten(f"its {key.table} has no name to refer to")


def _first_location(node: ast.Node) -> int | None:
    found = [
        loc for n in _walk(node)
        if isinstance(loc := getattr(n, "location", None), int) and loc >= 0
    ]  # fmt: skip
    return min(found) if found else None


def _from_keyword(sql: str, stmt: ast.SelectStmt) -> int | None:
    """The offset of the FROM keyword that ends ``stmt``'s select list: the last FROM
    outside parentheses between its first select-list item and its first FROM item
    (``a IS DISTINCT FROM b`` or ``extract(year FROM d)`` are not it)."""
    assert stmt.targetList and stmt.fromClause
    start = stmt.targetList[0].location
    stop = _first_location(stmt.fromClause[0])
    if start is None or start < 0 or stop is None or stop <= start:
        return None
    depth = 0
    found = None
    for tok in _tokens(sql):
        if tok.start < start:
            continue
        if tok.start >= stop:
            break
        if tok.name in ("ASCII_40", "ASCII_91"):  # ( [
            depth += 1
        elif tok.name in ("ASCII_41", "ASCII_93"):  # ) ]
            depth -= 1
            if depth < 0:
                return None
        elif tok.name == "FROM" and depth == 0:
            found = tok.start
    return found


@functools.lru_cache(maxsize=256)
def _tokens(sql: str) -> tuple[Token, ...]:
    return tuple(scan(sql))
