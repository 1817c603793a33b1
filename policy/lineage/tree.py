"""Reading libpg_query's JSON parse tree: ``Node`` and the accessors every walk over it uses.

We walk the plain dicts that ``pglast.parser.parse_sql_json`` + orjson produce instead of
pglast's node objects: measured ~10x cheaper to build, and the walk only needs a handful of
node types. Each dict node is ``{"NodeType": {fields}}``; set-operation arms are bare field
dicts. Offsets in the tree are byte offsets into the UTF-8 text.  This module takes a node
apart (its type, a string, a constant, the nodes of one kind below it) and knows nothing of
lineage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

Node = dict[str, Any]


def node_type(node: Node) -> tuple[str, Node]:
    for k, v in node.items():
        return k, v
    return "", {}


def sval(node: Node) -> str:
    s = node.get("String")
    if s is not None:
        return str(s.get("sval", ""))
    return ""


def names(nodes: Iterable[Node] | None) -> list[str]:
    return [sval(n) for n in nodes or ()]


def const_int(node: Node | None) -> int | None:
    """The integer value of an ``A_Const`` (None for anything else, NULL included)."""
    if not node:
        return None
    c = node.get("A_Const")
    if c is None:
        return None
    if "ival" in c:
        return int(c["ival"].get("ival", 0))
    if "fval" in c:
        try:
            return int(float(c["fval"]["fval"]))
        except ValueError:
            return None
    return None


def const_str(node: Node | None) -> str | None:
    if not node:
        return None
    c = node.get("A_Const")
    if c is not None and "sval" in c:
        return str(c["sval"].get("sval", ""))
    tc = node.get("TypeCast")
    if tc is not None:
        return const_str(tc.get("arg"))
    return None


def iter_nodes(node: Any, kind: str) -> Iterator[Node]:
    if isinstance(node, list):
        for x in node:
            yield from iter_nodes(x, kind)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k == kind and isinstance(v, dict):
                yield v
            if isinstance(v, (dict, list)):
                yield from iter_nodes(v, kind)
