"""Need-to-know for results that do not carry the protected table's key.

A need-to-know rule checks each row's key (``customers.customer_id``) against what the
person may see.  When a statement does not select the key, pgwarden sends it upstream with
the key appended to its select list (``policy.rewrite``), judges it as sent (so the key's
position, the record ledger and the masks all follow the server's columns) and removes
the appended columns from RowDescription and DataRow before the client sees them: the
client gets exactly the columns it asked for, in the formats it asked for.

The rewrite is used only when the analysis of the rewritten statement confirms it: the
appended column is a plain copy of the key, and it accounts for every labelled value of
that table in the row (the table read once, no row mixing; for a key that is not the
primary key, the table read once per row).
(Unlabelled columns of the table read a second time through a view in the same statement
are not told apart: the analysis counts a table's reads for its labelled columns only.)
Anything else keeps the refusal, which then says why the key could not be added.
"""

from __future__ import annotations

import struct
from dataclasses import replace

from policy.catalog import CatalogSnapshot
from policy.facts import QueryFacts, SourceColumn
from policy.lineage.builtin import BUILTIN_AGGREGATES
from policy.lineage.model import Exact, names_record_by
from policy.rewrite import KeyRef, NotRewritten, append_keys
from proxy.guard import Decision, Guard
from proxy.messages.backend import RowDescription, row_values
from proxy.messages.errors import ProtocolError

_STATELESS = frozenset(("select", "transaction", "variable_set", "variable_show"))
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")

# The rewritten statements' facts, shown to the audit trail as the client's statement:
# (rewritten facts, client's facts) -> the facts judged.  Kept by identity, as the
# analyser's cache hands out the same facts object for the same text, and the engine
# caches its verdicts by the facts object.
_PATCHED: dict[tuple[int, int], tuple[QueryFacts, QueryFacts, QueryFacts]] = {}


def missing_keys(decision: Decision) -> tuple[KeyRef, ...]:
    """The keys the decision's need-to-know checks need that its result does not carry."""
    plan = decision.plan
    if plan is None or not plan.need_to_know:
        return ()
    out: list[KeyRef] = []
    for check in plan.need_to_know:
        schema, _, table = check.table.partition(".")
        source = SourceColumn(schema, table, check.key_column)
        if any(names_record_by(col.sources, source) for col in decision.facts.output):
            continue
        key = KeyRef(schema, table, check.key_column)
        if key not in out:
            out.append(key)
    return tuple(out)


def with_keys(guard: Guard, sql: str, decisions: list[Decision]) -> tuple[str, list[Decision]]:
    """The text to send and the decisions to follow it with.

    Unchanged when every need-to-know check finds its key in the result.  Otherwise, the
    text with the missing keys appended and the rewritten statements' decisions (with
    ``hidden`` columns), or, where that is not sound, the decisions with ``unkeyed``
    saying why (the refusal quotes it)."""
    wants = [(d, keys) for d in decisions if (keys := missing_keys(d))]
    if not wants:
        return sql, decisions
    reason = _not_rewritable(guard, sql, decisions, wants)
    if isinstance(reason, str):
        return sql, _unkeyed(decisions, reason)
    new_sql, new_decisions = reason
    return new_sql, new_decisions


def _reanalysable(f: QueryFacts) -> bool:
    """Whether analysing the statement leaves the session's SQL state (search_path, role,
    prepared statements, cursors) as it was."""
    # A SELECT can set search_path too (set_config('search_path', ...)).
    changes = f.search_path is not None or f.search_path_reset or f.role is not None
    return not changes and f.kind in _STATELESS


def _unkeyed(decisions: list[Decision], reason: str) -> list[Decision]:
    return [replace(d, unkeyed=reason) if missing_keys(d) else d for d in decisions]


def _not_rewritable(
    guard: Guard,
    sql: str,
    decisions: list[Decision],
    wants: list[tuple[Decision, tuple[KeyRef, ...]]],
) -> str | tuple[str, list[Decision]]:
    if not all(_reanalysable(d.facts) for d in decisions):
        # Analysing the text again must not apply a SET (search_path, role) of the string
        # twice: the second analysis would start where the first one left the session.
        return "only SELECT statements (beside transaction control and SET) can be given the key"
    if guard.blocked(decisions) is not None:
        return "the statement is refused"
    snapshot = guard.analyzer.snapshot
    for _d, keys in wants:
        for key in keys:
            if snapshot.relation(key.schema, key.table) is None:
                return f"{key.schema}.{key.table} is not in pgwarden's catalog"
    aggregates = snapshot.aggregate_functions or BUILTIN_AGGREGATES
    index = {id(d): i for i, d in enumerate(decisions)}
    new_sql = append_keys(sql, tuple((index[id(d)], keys) for d, keys in wants), aggregates)
    if isinstance(new_sql, NotRewritten):
        return new_sql.reason
    new_facts = guard.sql.analyze(new_sql)
    if len(new_facts) != len(decisions):
        return "the rewritten statement could not be analysed"
    added = {id(d): keys for d, keys in wants}
    out: list[Decision] = []
    for d, f in zip(decisions, new_facts, strict=True):
        keys = added.get(id(d), ())
        if not keys:
            out.append(d)
            continue
        unsound = _unsound(d.facts, f, keys, snapshot)
        if unsound is not None:
            return unsound
        judged = _as_sent_by_client(f, d.facts)
        verdict = guard.engine.decide(d.subject, judged)
        if verdict.blocks or verdict.plan is None:
            return "the statement with the key added is refused"
        out.append(Decision(judged, verdict, d.subject, d.text, hidden=len(keys)))
    return new_sql, out


def _unsound(
    old: QueryFacts, new: QueryFacts, keys: tuple[KeyRef, ...], snapshot: CatalogSnapshot
) -> str | None:
    """Why the rewritten statement's appended columns do not identify the records of the
    protected table that each row carries, or None when they do.  A key column that is not
    the table's primary key (a customer's phones, keyed by customer_id) still names whose
    values a row holds when the statement reads the table once per row."""
    n = len(old.output)
    if new.unanalysable or len(new.output) != n + len(keys):
        return "the statement with the key added could not be analysed"
    if new.records_per_row != old.records_per_row:
        return "the key added changes how many records a row carries"
    for j, key in enumerate(keys):
        source = SourceColumn(key.schema, key.table, key.column)
        col = new.output[n + j]
        if not isinstance(col.sources, Exact) or set(col.sources) != {source}:
            return f"the column added is not {key.schema}.{key.table}.{key.column} itself"
        relation = f"{key.schema}.{key.table}"
        rel = snapshot.relation(key.schema, key.table)
        if rel is None or rel.primary_key != (key.column,):
            if new.records_per_row != 1:
                return f"a row can carry {relation} values of several rows"
            continue
        for i in new.value_positions:
            if any(s.schema == key.schema and s.table == key.table for s in new.output[i].sources):
                return f"a row can carry {relation} values of another record than its key's"
    return None


def _as_sent_by_client(new: QueryFacts, old: QueryFacts) -> QueryFacts:
    """The rewritten statement's facts under the client's text (the audit trail records
    the statement the client sent, not pgwarden's addition to it)."""
    key = (id(new), id(old))
    hit = _PATCHED.get(key)
    if hit is not None and hit[0] is new and hit[1] is old:
        return hit[2]
    patched = replace(new, normalized=old.normalized, fingerprint=old.fingerprint)
    if len(_PATCHED) >= 4096:
        _PATCHED.clear()
    _PATCHED[key] = (new, old, patched)
    return patched


def strip_description(body: bytes, hidden: int) -> bytes:
    """A whole RowDescription message without its last ``hidden`` fields."""
    fields = RowDescription.decode(body).fields
    if len(fields) < hidden:
        raise ProtocolError("RowDescription has fewer columns than the statement selects")
    return RowDescription(fields[: len(fields) - hidden]).encode()


def strip_row(row: bytes, hidden: int) -> bytes:
    """A whole DataRow message (type byte and length included) without its last
    ``hidden`` values."""
    (n,) = _I16.unpack_from(row, 5)
    keep = n - hidden
    if keep < 0:
        raise ProtocolError("DataRow has fewer columns than the statement selects")
    values = row_values(row, 5, len(row), keep - 1) if keep else ()
    pos = 7
    for v in values:
        pos += 4 + (len(v) if v is not None else 0)
    body = _I16.pack(keep) + row[7:pos]
    return b"D" + _I32.pack(len(body) + 4) + body


def bind_with_keys(body: bytes, formats: tuple[int, ...], hidden: int) -> bytes:
    """A whole Bind message (from its body, whose result format codes are ``formats``)
    with a text format code for each appended column.  Only needed with one code per
    column: no code means all text, one code applies to every column, the appended ones
    included."""
    nr = len(formats)
    cut = len(body) - 2 - 2 * nr
    new_body = body[:cut] + _I16.pack(nr + hidden) + body[cut + 2 :] + _I16.pack(0) * hidden
    return b"B" + _I32.pack(len(new_body) + 4) + new_body
