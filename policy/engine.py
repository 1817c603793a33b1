"""(Subject, QueryFacts) -> Verdict, and the plan for watching the result as it streams.

Decisions are values: the engine never raises to carry a refusal and never does I/O. What it
needs from the window counters it reads through the store's synchronous ``cached_totals``
(exact for the in-memory store, the latest seen value for Redis); what must be counted after a
statement the session reports back through ``ResultPlan.window_rules``.

Order of evaluation for one statement, first refusal wins:

1. the subject is quarantined;
2. the statement cannot be analysed and the subject has any limit (fail closed);
3. statement rules (``deny``);
4. window limits already used up (refused before execution);
then the statement runs with a ``ResultPlan``: per-statement and remaining-window row limits,
masking, canaries.  Rules in monitor mode are evaluated the same way but only reported.

This module owns that order, the caches that make a repeated statement cheap, and the plan
outline with its window limits filled in.  The values it returns are in ``policy.verdict``,
who the subject is in ``policy.subject``, and the checks that refuse a statement on its facts
alone (deny rules, soundness) in ``policy.statement_checks``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from policy.allowlist import AllowList, AllowListError
from policy.allowlist import load as load_allow_list
from policy.facts import QueryFacts
from policy.inflight import InFlight
from policy.model import Action, Check, Mode, Policy, PolicyError, Rule
from policy.statement_checks import beyond_analysis, deny_reason, know_table
from policy.subject import DB_USER_KEY, Subject, budget_key, subject_matches, window_rule_key
from policy.verdict import ALLOW, Finding, KnowCheck, ResultPlan, RowLimit, Verdict, refusal


class CountersView(Protocol):
    """What the engine reads from the window store, synchronously."""

    def cached_totals(self, subject: str, label: str, window: float) -> tuple[int, int] | None:
        """(rows, records) seen in the window, or None if unknown."""
        ...

    def cached_quarantine(self, subject: str) -> float | None:
        """Until when (epoch seconds) the subject is quarantined, or None."""
        ...

    @property
    def available(self) -> bool:
        """False while the shared counter store cannot be reached: windows fail closed."""
        ...

    @property
    def in_flight(self) -> InFlight | None:
        """What statements still running hold of each window (counted in ``cached_totals``),
        or None where nothing is counted."""
        ...


class NoCounters:
    available = True
    in_flight = None

    def cached_totals(self, subject: str, label: str, window: float) -> tuple[int, int] | None:
        return None

    def cached_quarantine(self, subject: str) -> float | None:
        return None


class Engine:
    """Decides for one policy; cheap to call per statement (decisions are cached by facts)."""

    def __init__(self, policy: Policy, counters: CountersView | None = None) -> None:
        self.policy = policy
        self.counters: CountersView = counters or NoCounters()
        self._subject_cache: dict[tuple[Subject, int], frozenset[str]] = {}
        self._subject_minute = -1  # the minute the cached answers are for
        self._verdicts: dict[tuple[int, int], tuple[QueryFacts, Subject, int, Verdict]] = {}
        self._uses_counters = False
        # The rules of each set of subject names (an engine holds one policy).
        self._rules_for: dict[frozenset[str], list[Rule]] = {}
        self._statics: dict[tuple[int, frozenset[str]], tuple[QueryFacts, _Static]] = {}
        # allow_statements rules: rule id -> its allow-list (read once per engine).
        self.allow_lists: dict[str, AllowList] = {}
        for rule in policy.rules:
            if rule.allow_statements is not None:
                try:
                    self.allow_lists[rule.id] = load_allow_list(rule.allow_statements)
                except AllowListError as exc:
                    raise PolicyError(f"rule {rule.id}: {exc}") from None

    # --- subjects ------------------------------------------------------------------------

    def subjects_of(self, s: Subject, now: float | None = None) -> frozenset[str]:
        """Names of the policy's subjects this session is (cached per minute)."""
        t = time.time() if now is None else now
        minute = int(t // 60)
        if minute != self._subject_minute:
            # An answer holds for its minute only: the past minutes' entries are dead.  They
            # stayed until the cache reached 10,000 entries (one per session and person a
            # minute: ~20 minutes of make soak), the fastest-growing Python allocation in
            # its pgwarden (tracemalloc: ~120 KiB/min).
            self._subject_cache.clear()
            self._subject_minute = minute
        key = (s, minute)
        hit = self._subject_cache.get(key)
        if hit is not None:
            return hit
        dt = datetime.fromtimestamp(t, UTC)
        names = frozenset(n for n, m in self.policy.subjects.items() if subject_matches(m, s, dt))
        if len(self._subject_cache) > 10_000:
            self._subject_cache.clear()
        self._subject_cache[key] = names
        return names

    def trusted_end_user_sources(self, s: Subject) -> frozenset[str]:
        """Where an end-user name may come from for this session ('comment', 'set')."""
        sources: set[str] = set()
        base = Subject(s.user, s.database, s.application, s.client_addr, None, s.roles)
        for name in self.subjects_of(base):
            sources.update(self.policy.subjects[name].end_user_from)
        if not self.policy.subjects:
            sources.update(("comment", "set"))
        return frozenset(sources)

    def signs_end_users(self, s: Subject) -> bool:
        """Whether this session's end-user names must carry the application's signature."""
        base = Subject(s.user, s.database, s.application, s.client_addr, None, s.roles)
        return any(self.policy.subjects[n].end_user_signed for n in self.subjects_of(base))

    def rules_for(self, names: frozenset[str]) -> list[Rule]:
        rules = self._rules_for.get(names)
        if rules is None:
            if len(self._rules_for) > 1024:
                self._rules_for.clear()
            rules = self._rules_for[names] = [
                r for r in self.policy.rules if "*" in r.subjects or names.intersection(r.subjects)
            ]
        return list(rules)

    def _monitored(self, rule: Rule) -> bool:
        return (rule.mode or self.policy.mode) is Mode.MONITOR

    def has_limits(self, rules: list[Rule]) -> bool:
        return any(r.kind in ("statement_limit", "window", "deny", "need_to_know") for r in rules)

    # --- one statement ----------------------------------------------------------------------

    def decide(self, s: Subject, facts: QueryFacts, now: float | None = None) -> Verdict:
        """The verdict for one statement of one subject.

        Verdicts that do not depend on window counters are cached per (facts, subject,
        minute): the analyser hands out the same facts object for the same text, and a
        session keeps its subject object, so a repeated statement costs a dict lookup.
        """
        t = time.time() if now is None else now
        minute = int(t // 60)
        key = (id(facts), id(s))
        hit = self._verdicts.get(key)
        if hit is not None and hit[0] is facts and hit[1] is s and hit[2] == minute:
            until = self.counters.cached_quarantine(s.key)
            if until is None or until <= t:
                return hit[3]
        self._uses_counters = False
        verdict = self._decide(s, facts, t)
        if not self._uses_counters:
            if len(self._verdicts) > 50_000:
                self._verdicts.clear()
            self._verdicts[key] = (facts, s, minute, verdict)
        return verdict

    def _decide(self, s: Subject, facts: QueryFacts, t: float) -> Verdict:
        names = self.subjects_of(s, t)
        until = self.counters.cached_quarantine(s.key)
        if until is not None:
            self._uses_counters = True  # the answer changes when the quarantine ends
        if (
            until is not None and until > t and self.policy.quarantine is not None
            and facts.kind not in _ENDINGS
        ):  # fmt: skip
            left = int(until - t)
            return refusal(
                "quarantine", f"{s.key.split(':', 1)[1]} is quarantined (a canary read or repeated blocks)",
                Action.QUARANTINE, hint=f"the quarantine ends in {left} s; ask a security admin",
            )  # fmt: skip

        st = self._static_part(facts, names)
        if st.verdict is not None:
            return st.verdict
        findings = list(st.findings)
        used_by_rule: dict[str, int] = {}
        for rule, covered in st.windows:
            if not self.counters.available:
                self._uses_counters = True
                reason = "the window counters are unavailable, so reads of labelled data cannot be counted"
                if self._monitored(rule):
                    findings.append(Finding(rule.id, rule.action, reason, monitored=True))
                    continue
                return refusal(
                    rule.id, reason, Action.BLOCK,
                    hint="the shared counter store (Redis) is unreachable; try again when it is back",
                    findings=(*findings, Finding(rule.id, Action.BLOCK, reason)), offence=False,
                )  # fmt: skip
            used, whose = self._window_spent(s, rule, covered)
            used_by_rule[rule.id] = used
            cap = rule.max_records if rule.max_records is not None else rule.max_rows
            assert cap is not None and rule.window is not None
            if used >= cap:
                what = "records" if rule.max_records is not None else "rows"
                by = f" by all end users of {s.user}" if whose.startswith(DB_USER_KEY) else ""
                reason = f"{used} {what} of {', '.join(sorted(covered))} read{by} in the last {_human(rule.window)} (limit {cap})"
                if self._monitored(rule):
                    findings.append(Finding(rule.id, rule.action, reason, monitored=True))
                elif rule.action not in (Action.ALLOW, Action.ALERT):
                    return refusal(
                        rule.id, reason, rule.action,
                        hint=f"the limit is {cap} {what} per {_human(rule.window)}",
                        findings=(*findings, Finding(rule.id, rule.action, reason)),
                    )  # fmt: skip

        plan = self._fill_plan(st, s, used_by_rule)
        if st.copy_unmasked is not None:
            rule_id, reason = st.copy_unmasked
            return refusal(
                rule_id, reason, Action.BLOCK,
                hint="read these columns with SELECT, where pgwarden applies the rule",
                findings=(*findings, Finding(rule_id, Action.BLOCK, reason)),
            )  # fmt: skip
        if not findings and not st.findings:
            # Same plan as last time (nothing new counted in between): the same verdict.
            if st.allowed is None or st.allowed.plan is not plan:
                st.allowed = Verdict(Action.ALLOW, plan=plan)
            return st.allowed
        return Verdict(Action.ALLOW, findings=tuple(findings), plan=plan)

    def _copy_unmasked(
        self, rules: list[Rule], mask: dict[str, str], need_to_know: tuple[KnowCheck, ...]
    ) -> tuple[str, str] | None:
        """A COPY's output goes out as COPY data, which pgwarden does not rewrite: for a
        subject whose rules mask columns of it, or check its rows against a need-to-know
        lookup, the COPY would hand them over unmasked and unchecked.  (rule id, reason)."""
        if mask:
            rule = next(
                r for r in rules
                if r.kind == "mask" and not self._monitored(r)
                and any(r.covers_label(lb) for lb in mask)
            )  # fmt: skip
            labels = ", ".join(sorted(mask))
            return rule.id, f"COPY ... TO would return {labels} unmasked"
        know = next((k for k in need_to_know if not k.monitored), None)
        if know is not None:
            return know.rule_id, (
                f"COPY ... TO of {know.table} rows cannot be checked against the "
                "need-to-know lookup"
            )
        return None

    def _static_part(self, facts: QueryFacts, names: frozenset[str]) -> _Static:
        """Everything of a verdict that the window counters cannot change, kept per
        (statement facts, subject names): for a subject with windows a verdict is made on
        every statement, but its rules, statement checks and plan outline are the same."""
        key = (id(facts), names)
        hit = self._statics.get(key)
        if hit is not None and hit[0] is facts:
            return hit[1]
        st = self._make_static(facts, self.rules_for(names))
        if len(self._statics) > 50_000:
            self._statics.clear()
        self._statics[key] = (facts, st)
        return st

    def _make_static(self, facts: QueryFacts, rules: list[Rule]) -> _Static:
        findings: list[Finding] = []
        if not rules:
            verdict = (
                Verdict(Action.ALLOW, plan=self._fill_plan(self._outline(facts, []), None, {}))
                if facts.output
                else ALLOW
            )
            return _Static(verdict)

        # The positive model first: a shape the subject's application never sent is refused
        # as that, whatever else might be said of it.
        for rule in rules:
            allow = self.allow_lists.get(rule.id)
            if allow is None or allow.allows(facts):
                continue
            reason = (
                f"the statement's shape ({facts.fingerprint}: {_short(facts.normalized)}) is not "
                f"on the allow-list {Path(allow.path).name}"
            )
            if self._monitored(rule) or rule.action is Action.ALERT:
                findings.append(
                    Finding(rule.id, rule.action, reason, monitored=self._monitored(rule))
                )
            else:
                return _Static(refusal(
                    rule.id, reason, rule.action,
                    hint="this account sends the statements its application was seen to send; "
                    "a new one must be reviewed and added (pgwarden policy drift / learn)",
                    findings=(*findings, Finding(rule.id, rule.action, reason)),
                ))  # fmt: skip

        if facts.unanalysable and self.policy.fail_closed and self.has_limits(rules):
            deny_rule = next((r for r in rules if r.deny and Check.UNANALYSABLE in r.deny), None)
            reason = f"the statement cannot be analysed ({facts.unanalysable})"
            if deny_rule is not None and self._monitored(deny_rule):
                findings.append(Finding(deny_rule.id, Action.BLOCK, reason, monitored=True))
            else:
                return _Static(refusal(
                    deny_rule.id if deny_rule else "fail-closed", reason,
                    hint="statements pgwarden cannot follow are refused for subjects with limits",
                ))  # fmt: skip

        for rule in rules:
            if rule.deny is None:
                continue
            denied = deny_reason(rule, facts)
            if denied is None:
                continue
            reason = denied
            if self._monitored(rule):
                findings.append(Finding(rule.id, rule.action, reason, monitored=True))
            elif rule.action in (Action.ALLOW, Action.ALERT):
                findings.append(Finding(rule.id, rule.action, reason))
            else:
                return _Static(
                    refusal(
                        rule.id,
                        reason,
                        rule.action,
                        findings=(*findings, Finding(rule.id, rule.action, reason)),
                    )
                )

        unsound = beyond_analysis(facts, rules, findings, self._monitored, self.policy.fail_closed)
        if unsound is not None:
            return _Static(unsound)

        st = self._outline(facts, rules)
        st.findings = tuple(findings)
        if facts.copy_direction == "to" and facts.copy_target == "stdout":
            st.copy_unmasked = self._copy_unmasked(rules, st.mask, st.need_to_know)
        return st

    def _window_used(self, s: Subject, rule: Rule, labels: frozenset[str]) -> int:
        return self._window_spent(s, rule, labels)[0]

    def _window_spent(self, s: Subject, rule: Rule, labels: frozenset[str]) -> tuple[int, str]:
        """What is spent of a window rule's budget, and whose budget is the fullest: the
        person's (their counters per rule and per label) and/or the database user's (all its
        end users together, per rule)."""
        assert rule.window is not None
        self._uses_counters = True
        used, whose = 0, s.key
        for per in rule.per:
            key = budget_key(per, s)
            own = (
                (window_rule_key(rule.id), *labels) if key == s.key else (window_rule_key(rule.id),)
            )
            for label in own:
                totals = self.counters.cached_totals(key, label, rule.window)
                if totals is not None:
                    n = totals[1] if rule.max_records is not None else totals[0]
                    if n > used:
                        used, whose = n, key
        return used, whose

    def _outline(self, facts: QueryFacts, rules: list[Rule]) -> _Static:
        """The plan of a statement's result with the limits of windows left open (what is
        left of a window depends on the counters at the time)."""
        labels = facts.output_labels
        slots: list[RowLimit | tuple[Rule, frozenset[str]]] = []
        windows: list[tuple[Rule, frozenset[str]]] = []
        mask: dict[str, str] = {}
        canary_values: list[bytes] = []
        canary_keys: dict[str, set[str]] = {}
        canary_rules: list[Finding] = []
        window_rules: list[Rule] = []
        know: list[KnowCheck] = []
        for rule in rules:
            kind = rule.kind
            if kind == "statement_limit":
                covered = frozenset(lb for lb in labels if rule.covers_label(lb))
                if covered or (not facts.output and rule.labels == ["*"]):
                    slots.append(RowLimit(
                        rule.id, _per_row(rule.max_rows, facts), rule.max_bytes, covered,
                        f"more than {rule.max_rows} rows of {', '.join(sorted(covered)) or 'labelled data'} in one statement"
                        if rule.max_rows is not None else
                        f"more than {rule.max_bytes} bytes of {', '.join(sorted(covered))} in one statement",
                        rule.action, self._monitored(rule),
                    ))  # fmt: skip
            elif kind == "window":
                window_rules.append(rule)
                covered = frozenset(lb for lb in labels if rule.covers_label(lb))
                if covered:
                    slots.append((rule, covered))
                    windows.append((rule, covered))
            elif kind == "mask" and not self._monitored(rule):
                assert rule.mask is not None
                for lb in labels:
                    if rule.covers_label(lb):
                        mask[lb] = rule.mask.style
            elif kind == "need_to_know":
                ntk = rule.need_to_know
                assert ntk is not None
                table = know_table(rule)
                if table in facts.relations_read and facts.output:
                    know.append(KnowCheck(
                        rule.id, table, ntk.key_column, ntk.on_violation == "withhold",
                        self._monitored(rule),
                        ntk.mask_style if ntk.on_violation == "mask" else None,
                    ))  # fmt: skip
            elif kind == "canary":
                assert rule.canary is not None
                canary_values.extend(v.encode() for v in rule.canary.values)
                if rule.canary.table and rule.canary.keys:
                    canary_keys.setdefault(rule.canary.table, set()).update(rule.canary.keys)
                canary_rules.append(
                    Finding(rule.id, rule.action, "a canary record was read", self._monitored(rule))
                )
        return _Static(
            None,
            labels=labels,
            windows=tuple(windows),
            slots=tuple(slots),
            mask=mask,
            canary_values=tuple(canary_values),
            canary_keys={k: frozenset(v) for k, v in canary_keys.items()},
            canary_rules=tuple(canary_rules),
            canary_cut=_canary_cut(facts, canary_rules),
            window_rules=tuple(window_rules),
            need_to_know=tuple(know),
            per_row=facts.records_per_row,
        )

    def _fill_plan(self, st: _Static, s: Subject | None, used: dict[str, int]) -> ResultPlan:
        """The plan of an outline, with what is left of each window now (the plan made last
        time, when that is the same)."""
        spent_by_slot: list[int] = []
        for slot in st.slots:
            if not isinstance(slot, RowLimit):
                rule, covered = slot
                spent = used.get(rule.id)
                if spent is None:
                    assert s is not None
                    spent = self._window_used(s, rule, covered)
                spent_by_slot.append(spent)
        key = tuple(spent_by_slot)
        if st.filled is not None and st.filled[0] == key:
            return st.filled[1]
        limits: list[RowLimit] = []
        spent_of = iter(spent_by_slot)
        for slot in st.slots:
            if isinstance(slot, RowLimit):
                limits.append(slot)
                continue
            rule, covered = slot
            cap = rule.max_records if rule.max_records is not None else rule.max_rows
            assert cap is not None and rule.window is not None
            spent = next(spent_of)
            what = "records" if rule.max_records is not None else "rows"
            # Not the user's name: a plan is shared by every subject with these rules.
            by = (
                "" if rule.per == ["end_user"]
                else " for the database user's end users together" if rule.per == ["db_user"]
                else " per person or for the database user's end users together"
            )  # fmt: skip
            limits.append(RowLimit(
                rule.id, max(0, cap - spent) // st.per_row, None, covered,
                f"more than {cap} {what} of {', '.join(sorted(covered))} in {_human(rule.window)}{by}",
                rule.action, self._monitored(rule), rule.window, tuple(rule.per),
            ))  # fmt: skip
        plan = ResultPlan(
            labels=st.labels,
            limits=tuple(limits),
            mask=st.mask,
            canary_values=st.canary_values,
            canary_keys=st.canary_keys,
            canary_rules=st.canary_rules,
            canary_cut=st.canary_cut,
            window_rules=st.window_rules,
            need_to_know=st.need_to_know,
        )
        st.filled = (key, plan)
        return plan


@dataclass(slots=True)
class _Static:
    """The part of a verdict the window counters cannot change (see ``Engine._static_part``):
    a final verdict, or findings and a plan outline whose window limits are filled in per
    statement."""

    verdict: Verdict | None
    findings: tuple[Finding, ...] = ()
    labels: frozenset[str] = frozenset()
    windows: tuple[tuple[Rule, frozenset[str]], ...] = ()  # window rules covering the output
    slots: tuple[RowLimit | tuple[Rule, frozenset[str]], ...] = ()  # limits, in rule order
    mask: dict[str, str] = field(default_factory=dict)
    canary_values: tuple[bytes, ...] = ()
    canary_keys: dict[str, frozenset[str]] = field(default_factory=dict)
    canary_rules: tuple[Finding, ...] = ()
    canary_cut: Finding | None = None
    window_rules: tuple[Rule, ...] = ()
    need_to_know: tuple[KnowCheck, ...] = ()
    per_row: int = 1  # records one output row can carry (QueryFacts.records_per_row)
    # A COPY ... TO STDOUT that would hand over masked or need-to-know rows unchecked:
    # (rule id, reason) of its refusal, made after the window checks.
    copy_unmasked: tuple[str, str] | None = None
    # The last plan made from this outline, by what had been spent of each window, and the
    # last verdict allowing with it (windows rarely move between two statements).
    filled: tuple[tuple[int, ...], ResultPlan] | None = None
    allowed: Verdict | None = None


def _per_row(max_rows: int | None, facts: QueryFacts) -> int | None:
    """A per-statement row cap for a result whose rows carry several records each."""
    if max_rows is None or facts.records_per_row <= 1:
        return max_rows
    return max_rows // facts.records_per_row


# Statements that return rows though the analysis lists no output column of their own.
_ROWS_WITHOUT_OUTPUT = frozenset(("copy", "fetch", "execute", "call", "explain"))


def _canary_cut(facts: QueryFacts, canary_rules: list[Finding]) -> Finding | None:
    """The canary rule that refuses a result holding a canary, for a statement that can
    return labelled data: the first one in force whose action blocks.  Only such statements
    are watched for it (and the client's later messages held while they run): a canary is
    a customer's record, so a result with no labelled column (pgbench's balances, a count of
    tickets) cannot carry one, unless the analysis missed a column, which the RowDescription
    cross-check catches and judges again. Rows of unlabelled results are still scanned, and
    a canary value found there raises the rule's alert and action after delivery."""
    if not facts.output_labels and facts.kind not in _ROWS_WITHOUT_OUTPUT:
        return None
    return next(
        (
            f for f in canary_rules
            if not f.monitored and f.action in (Action.BLOCK, Action.QUARANTINE, Action.END_SESSION)
        ),
        None,
    )  # fmt: skip


# What a quarantined subject may still run: statements that end or let go of something
# and read nothing (a ROLLBACK refused would leave the session stuck in a failed
# transaction, holding its locks).
_ENDINGS = frozenset({"transaction", "close_portal", "deallocate", "discard", "unlisten"})


def _short(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
