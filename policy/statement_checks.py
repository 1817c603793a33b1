"""What one statement is refused for whatever the window counters say: the checks of deny
rules (``COPY ... PROGRAM``, ``SELECT *`` of labelled tables, unbounded scans, packing
aggregates, copies into tables ...), and the refusals that keep enforcement sound for subjects
with limits (statements that define code or change what a name means, unknown relations,
labelled values of many records combined in one value or parked in a side channel).  Pure
functions of the facts and the rules; ``policy.engine`` calls them.
"""

from __future__ import annotations

from collections.abc import Callable

from policy.facts import QueryFacts
from policy.model import DANGEROUS_FUNCTIONS, Action, Check, Rule
from policy.verdict import Finding, Verdict, refusal


def beyond_analysis(
    facts: QueryFacts,
    rules: list[Rule],
    findings: list[Finding],
    monitored: Callable[[Rule], bool],
    fail_closed: bool,
) -> Verdict | None:
    """The refusals that keep enforcement sound whatever the SQL (DESIGN.md, "How
    enforcement stays sound"), for subjects with limits:

    * a relation name resolution could not find is *unknown*, never "unlabelled";
    * a labelled value may leave only in a column fed by one record per output row: an
      aggregate, an ARRAY sublink, a window function reading other rows or a recursive
      CTE that combines labelled values of many records is refused, whatever its shape;
      so is a write that stores such a value (to be read back as one later) and a
      labelled notification payload (which nothing counts or masks).

    Readable deny rules (``packing_aggregates`` ...) are judged first and name the
    refusal when they match; these two hold where no rule names the shape. A refusal
    under a monitored rule is a monitored finding instead. None: nothing to refuse.
    """
    limiting = [r for r in rules if r.kind in ("statement_limit", "window", "deny", "need_to_know")]
    if not limiting:
        return None
    checks: list[tuple[str, str, str, list[Rule]]] = []
    if facts.kind not in LIMITED_KINDS:
        checks.append((
            "code-and-names",
            f"a subject with limits cannot run {_statement_words(facts.normalized)}: "
            "views, rules, triggers, functions, operators, casts, types, indexes and "
            "ALTER or RENAME define code or change what a name means, and that code would "
            "run where pgwarden does not see it",
            "ask someone the rules do not limit (a DBA) to change the schema",
            limiting,
        ))  # fmt: skip
    if facts.unknown and fail_closed:
        checks.append((
            "fail-closed",
            f"relation {', '.join(facts.unknown)} is not in pgwarden's catalog, so what it "
            "holds cannot be known",
            "check the name and the session's search_path; a table created moments ago is "
            "known once pgwarden's catalog has been refreshed",
            limiting,
        ))  # fmt: skip
    packed = facts.combined_labels
    if packed:
        covering = [
            r for r in limiting
            if (r.kind == "need_to_know" and know_table(r) in facts.relations_read)
            or any(r.covers_label(lb) for lb in packed)
        ]  # fmt: skip
        if covering:
            checks.append((
                "one-record-per-row",
                f"{', '.join(sorted(packed))} of many records would reach the client "
                "combined in one value (an aggregate, an ARRAY subquery, a window function "
                "or a recursive query)",
                "read labelled columns row by row: one customer's values per row",
                covering,
            ))  # fmt: skip
    packed_copies = frozenset().union(*(cp.combined_labels for cp in facts.copies))
    notified = frozenset().union(
        *(cp.labels for cp in facts.copies if cp.target == "pg_catalog.pg_notify")
    )
    settings = frozenset().union(
        *(
            cp.labels for cp in facts.copies
            if cp.target in ("pg_catalog.set_config", "pg_catalog.pg_locks")
        )
    )  # fmt: skip
    for labels, rule_id, reason, hint in (
        (
            packed_copies, "one-record-per-row",
            f"it would store {', '.join(sorted(packed_copies))} of many records combined "
            "in one value, to be read back as one",
            "copy labelled columns row by row: one customer's values per row",
        ),
        (
            notified, "one-record-per-row",
            f"it would send {', '.join(sorted(notified))} in notification payloads, which "
            "pgwarden cannot count or mask",
            "read labelled columns with SELECT, where pgwarden applies the rules",
        ),
        (
            settings, "one-record-per-row",
            f"it would keep {', '.join(sorted(settings))} in a setting (set_config) or "
            "the keys of advisory locks, to be read back past every limit",
            "read labelled columns with SELECT, where pgwarden applies the rules",
        ),
    ):  # fmt: skip
        if labels:
            covering = [r for r in limiting if any(r.covers_label(lb) for lb in labels)]
            if covering:
                checks.append((rule_id, reason, hint, covering))
    for rule_id, reason, hint, covering in checks:
        if all(monitored(r) for r in covering):
            findings.append(Finding(rule_id, Action.BLOCK, reason, monitored=True))
            continue
        return refusal(
            rule_id, reason, hint=hint,
            findings=(*findings, Finding(rule_id, Action.BLOCK, reason)),
        )  # fmt: skip
    return None


def deny_reason(rule: Rule, f: QueryFacts) -> str | None:
    assert rule.deny is not None
    labelled = frozenset(lb for lb in f.output_labels | f.copied_labels if rule.covers_label(lb))
    for check in rule.deny:
        if check is Check.COPY_PROGRAM and f.copy_program:
            return "COPY ... PROGRAM runs commands on the database server"
        if check is Check.COPY_OUT and f.copy_direction == "to" and (labelled or f.copy_program):
            return f"COPY ... TO of labelled data ({', '.join(sorted(labelled))}) is not allowed"
        if check is Check.SELECT_STAR and f.star_tables and labelled:
            return f"SELECT * or a whole-row read of {', '.join(sorted(f.star_tables))} returns labelled columns"
        if (
            check is Check.UNBOUNDED_SCAN
            and labelled
            and not f.has_where
            and not f.has_limit
            and f.kind in ("select", "copy", "declare_cursor", "execute")
        ):
            return "reading labelled data needs a WHERE clause or a LIMIT"
        if check is Check.DANGEROUS_FUNCTIONS:
            bad = sorted(fn for fn in f.functions if fn.rsplit(".", 1)[-1] in DANGEROUS_FUNCTIONS)
            if bad:
                return f"function {', '.join(bad)} reads server files or other databases"
        if check is Check.PACKING_AGGREGATES:
            for p in f.packing:
                packed = frozenset(lb for lb in p.labels if rule.covers_label(lb))
                if packed:
                    return f"{p.function}() packs many rows of {', '.join(sorted(packed))} into one value"
        if check is Check.COPY_INTO_TABLES:
            for c in f.copies:
                copied = frozenset(lb for lb in c.labels if rule.covers_label(lb))
                if copied:
                    return f"copying {', '.join(sorted(copied))} into {c.target} is not allowed"
        if check is Check.UNANALYSABLE and f.unanalysable:
            return f"the statement cannot be analysed ({f.unanalysable})"
    return None


def know_table(rule: Rule) -> str:
    """The schema-qualified table of a need-to-know rule."""
    assert rule.need_to_know is not None
    table = rule.need_to_know.table
    return table if "." in table else f"public.{table}"


# What a subject with limits may run: statements pgwarden analyses, and DDL that defines no
# code and changes what no name means (CREATE TABLE is checked for functions it would call).
# Everything else (views, rules, triggers, functions, operators, casts, types, indexes,
# ALTER, RENAME, COMMENT, GRANT ...) is refused: a positive list, not a list of bad shapes.
LIMITED_KINDS = frozenset({
    "select", "select_into", "insert", "update", "delete", "merge", "copy", "explain", "call",
    "transaction", "variable_set", "variable_show", "discard", "prepare", "execute",
    "deallocate", "declare_cursor", "fetch", "move", "close_portal", "listen", "unlisten",
    "notify", "lock", "vacuum", "create", "create_table_as", "create_seq", "drop",
    "truncate", "do", "unknown",
})  # fmt: skip


def _statement_words(normalized: str) -> str:
    """``CREATE VIEW``, ``CREATE OR REPLACE FUNCTION``, ``ALTER TABLE``: what a statement is."""
    words = normalized.split()[:4]
    n = 4 if len(words) > 1 and words[1].lower() == "or" else 2
    picked = [w.upper() for w in words[:n] if w.isalpha()]
    return " ".join(picked) or "this statement"
