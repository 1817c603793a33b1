"""What a join's ON or a WHERE clause tells about the rows it keeps: ``a.x = b.y`` between
plain copies makes ``a.x`` name ``b``'s record too (``equate``), and a comparison between
labelled values and another relation's columns makes that relation's rows spell the labelled
values (``compared``).  Both replace the lineage of columns of the FROM items in place and
return what they replaced, for the FROM list's ``*`` (``swapped``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from policy.facts import SourceColumn
from policy.lineage.model import EMPTY, Columns, Exact, Lineage, Rel, combined
from policy.lineage.tree import Node, iter_nodes, names, node_type


def compared(
    node: Any, rels: list[Rel], labels_of: Callable[[Iterable[SourceColumn]], frozenset[str]]
) -> dict[int, tuple[Lineage, Lineage]]:
    """A comparison in a WHERE or ON between labelled values and columns of another of
    ``rels`` (``chr(x.code) = substr(c."Email", p.pos, 1)`` over generate_series rows):
    which rows of that relation come out spells the labelled values, so its columns
    carry them (combined: a row so chosen stands for a value of any record compared).
    Returns what was replaced, for the FROM list's ``*``."""
    replaced: dict[int, tuple[Lineage, Lineage]] = {}
    if not node or len(rels) < 2:
        return replaced
    for conj in _conjuncts(node):
        kind, e = node_type(conj)
        if kind != "A_Expr":
            continue
        sides = [e.get("lexpr"), e.get("rexpr")]
        lins = [_side_lineage(side, rels) for side in sides]
        plain = all(node_type(side or {})[0] == "ColumnRef" for side in sides)
        for side, other in ((0, 1), (1, 0)):
            labelled = frozenset(s for s in lins[other] if labels_of((s,)))
            if not labelled:
                continue
            sources = {id(r) for r in _side_rels(sides[other], rels)}
            for ref in iter_nodes(sides[side], "ColumnRef"):
                fields = ref.get("fields") or []
                if any("String" not in f for f in fields):
                    continue
                hit = _rel_column(names(fields), rels)
                if hit is None or id(hit[0]) in sources:
                    continue
                rel = hit[0]
                # Equal to a plain labelled column: a copy of its value; chosen by an
                # expression of it: standing for any of the values compared.
                tainted = labelled if plain else combined(labelled)
                new_cols = []
                for c, lin in rel.columns:
                    new = frozenset(lin | tainted)
                    replaced[id(lin)] = (lin, new)
                    new_cols.append((c, new))
                rel.columns = new_cols
                rel.colmap = {c: lin for c, lin in new_cols}
    return replaced


def equate(node: Any, keepers: list[Rel], others: list[Rel]) -> dict[int, tuple[Lineage, Lineage]]:
    """``a.x = b.y`` as a conjunct of a WHERE clause or a join's ON, both sides plain
    copies of stored columns (``Exact``): wherever the row of ``b`` is there, ``a.x``
    holds ``b.y``'s value, so ``a.x`` names the record of ``b`` as well as its own (as
    ``JOIN ... USING`` makes its merged column a copy of both sides).  That lets
    ``c.customer_id`` name the customer whose phone ``p.phone`` is, when the statement
    joined them on it: the record ledger and need-to-know find ``customer_phones``' key.

    Only ``a`` of ``keepers`` (rows never NULL-extended by this join: both sides of an
    inner join or a WHERE, the preserved side of an outer join) becomes a copy of ``b``
    of ``others``: a LEFT JOIN's NULL-extended ``b.y`` names nothing.  Wherever ``b``'s
    values are not NULL, ``a``'s row is there and equal, whatever joins are above.  Only
    the key identity (``Exact.columns``) grows, never the labels.  Returns what was
    replaced (id of the old lineage -> old, new), for the FROM list's ``*``."""
    replaced: dict[int, tuple[Lineage, Lineage]] = {}
    if not keepers or not others:
        return replaced
    rels = list({id(r): r for r in (*keepers, *others)}.values())
    for conj in _conjuncts(node):
        pair = _column_equality(conj)
        if pair is None:
            continue
        left = _rel_column(pair[0], rels)
        right = _rel_column(pair[1], rels)
        if left is None or right is None or left[0] is right[0]:
            continue
        for (krel, kname), (orel, oname) in ((left, right), (right, left)):
            if not (any(krel is r for r in keepers) and any(orel is r for r in others)):
                continue
            old = krel.colmap.get(kname)
            other = orel.colmap.get(oname)
            if not isinstance(old, Exact) or not isinstance(other, Exact):
                continue
            new = Exact(old, old.columns | other.columns)
            krel.columns = [
                (c, new if c == kname and lin is old else lin) for c, lin in krel.columns
            ]
            krel.colmap[kname] = new
            replaced[id(old)] = (old, new)
    return replaced


def swapped(columns: Columns, replaced: dict[int, tuple[Lineage, Lineage]]) -> Columns:
    """``columns`` (a ``*``) with the lineages ``equate`` replaced; one that appears twice
    (a relation joined to itself shares its columns' lineages) is left as it was."""
    if not replaced:
        return columns
    seen = Counter(id(lin) for _c, lin in columns)
    out: Columns = []
    for c, lin in columns:
        hit = replaced.get(id(lin))
        swap = hit is not None and hit[0] is lin and seen[id(lin)] == 1
        out.append((c, hit[1] if hit is not None and swap else lin))
    return out


def _conjuncts(node: Any) -> list[Node]:
    """The top-level AND terms of a condition (the condition itself if it is no AND)."""
    if not node:
        return []
    kind, n = node_type(node)
    if kind == "BoolExpr" and n.get("boolop") == "AND_EXPR":
        return [c for a in n.get("args") or () for c in _conjuncts(a)]
    return [node]


def _column_equality(node: Node) -> tuple[list[str], list[str]] | None:
    """``a.x = b.y`` between two plain column names: their fields; None for anything else."""
    kind, n = node_type(node)
    if kind != "A_Expr" or n.get("kind") != "AEXPR_OP":
        return None
    op = names(n.get("name"))
    if op not in (["="], ["pg_catalog", "="]):
        return None
    sides = []
    for side in (n.get("lexpr"), n.get("rexpr")):
        k, ref = node_type(side or {})
        if k != "ColumnRef" or any("String" not in f for f in ref["fields"]):
            return None
        sides.append(names(ref["fields"]))
    return sides[0], sides[1]


def _rel_column(fields: list[str], rels: list[Rel]) -> tuple[Rel, str] | None:
    """Which of ``rels`` a column name belongs to, when that is certain."""
    name = fields[-1]
    if len(fields) == 1:
        if any(r.opaque is not None or r.schema is not None for r in rels):
            return None  # a relation of unknown columns may have it too
        hits = [r for r in rels if name in r.colmap]
    else:
        qual = fields[:-1]
        hits = [
            r for r in rels
            if r.alias == qual[-1] and (len(qual) == 1 or r.relation == ".".join(qual[-2:]))
        ]  # fmt: skip
        hits = [r for r in hits if name in r.colmap]
    return (hits[0], name) if len(hits) == 1 else None


def _side_columns(node: Any, rels: list[Rel]) -> Iterator[tuple[Rel, str]]:
    """The columns of ``rels`` that one side of a comparison names: (relation, column)."""
    for ref in iter_nodes(node, "ColumnRef"):
        fields = ref.get("fields") or []
        if any("String" not in f for f in fields):
            continue
        hit = _rel_column(names(fields), rels)
        if hit is not None:
            yield hit


def _side_rels(node: Any, rels: list[Rel]) -> list[Rel]:
    """The ones of ``rels`` whose columns one side of a comparison names."""
    return [rel for rel, _column in _side_columns(node, rels)]


def _side_lineage(node: Any, rels: list[Rel]) -> Lineage:
    """What the columns of ``rels`` named in one side of a comparison carry."""
    out: set[SourceColumn] = set()
    for rel, column in _side_columns(node, rels):
        out |= rel.colmap.get(column, EMPTY)
    return frozenset(out)
