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
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from policy.allowlist import AllowList, AllowListError
from policy.allowlist import load as load_allow_list
from policy.facts import QueryFacts
from policy.inflight import InFlight
from policy.model import (
    DANGEROUS_FUNCTIONS,
    Action,
    Check,
    Mode,
    Policy,
    PolicyError,
    Rule,
    SubjectMatch,
    parse_hours,
)

BLOCK_SQLSTATE = "42501"  # insufficient_privilege: what PostgreSQL itself uses for "not allowed"


@dataclass(frozen=True, slots=True)
class Subject:
    """Who sent a statement, as the proxy knows it."""

    user: str
    database: str = ""
    application: str = ""
    client_addr: str = ""
    end_user: str | None = None
    roles: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """The identity window counters and quarantine are kept under: the person, named
        by the application or logged in as themselves (agent_ann through the helpdesk
        account and agent_ann with her own role are one budget, one quarantine)."""
        return f"person:{self.end_user or self.user}"


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


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule that fired."""

    rule_id: str
    action: Action
    reason: str
    monitored: bool = False


@dataclass(frozen=True, slots=True)
class RowLimit:
    """A cap on labelled rows/bytes for one statement's result."""

    rule_id: str
    max_rows: int | None
    max_bytes: int | None
    labels: frozenset[str]
    reason: str
    action: Action
    monitored: bool
    window: float | None = None  # set when the cap is what is left of a window
    per: tuple[str, ...] = ()  # whose counters the window is kept in (see ``budget_key``)


@dataclass(frozen=True, slots=True)
class KnowCheck:
    """Rows of ``table`` may reach the subject only if their key is in the rule's lookup."""

    rule_id: str
    table: str  # schema.table
    key_column: str
    withhold: bool  # True: drop the row; False: refuse the statement (or mask it)
    monitored: bool
    mask_style: str | None = None  # set: the row passes with its labelled values masked


@functools.lru_cache(maxsize=64)
def _canary_search(
    values: tuple[bytes, ...],
) -> Callable[[bytes, int, int], re.Match[bytes] | None]:
    """One search for all canary values (built once per set of values: a plan is made for
    every statement of a subject with windows)."""
    return re.compile(b"|".join(re.escape(v) for v in values)).search


@dataclass(frozen=True, slots=True)
class ResultPlan:
    """How the session watches one statement's result."""

    labels: frozenset[str]
    limits: tuple[RowLimit, ...] = ()
    mask: dict[str, str] = field(default_factory=dict)  # label -> style
    canary_values: tuple[bytes, ...] = ()
    canary_keys: dict[str, frozenset[str]] = field(default_factory=dict)  # table -> keys
    canary_rules: tuple[Finding, ...] = ()
    # The canary rule that refuses a result holding a canary (its action blocks, it is not
    # monitored): the result is cut off before that row reaches the client.
    canary_cut: Finding | None = None
    window_rules: tuple[Rule, ...] = ()
    need_to_know: tuple[KnowCheck, ...] = ()
    # One search for all canary values: a row is scanned once, not once per value.
    canary_search: Callable[[bytes, int, int], re.Match[bytes] | None] | None = field(
        default=None, compare=False
    )

    # Whether the result may be cut off part-way (see proxy.guard.Decision.limited).
    may_cut: bool = field(default=False, init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "may_cut",
            bool(
                self.limits
                or self.mask
                or self.canary_cut
                or any(not k.withhold for k in self.need_to_know)
            ),
        )
        if self.canary_values and self.canary_search is None:
            object.__setattr__(self, "canary_search", _canary_search(self.canary_values))

    @property
    def needs_rows(self) -> bool:
        """Whether the session must look at rows at all (beyond counting them)."""
        return bool(self.mask or self.canary_values or self.canary_keys or self.need_to_know)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule_id: str | None = None
    message: str = ""
    hint: str | None = None
    sqlstate: str = BLOCK_SQLSTATE
    findings: tuple[Finding, ...] = ()
    plan: ResultPlan | None = None
    # False when the refusal is pgwarden failing closed (its counter store is unreachable),
    # not something the subject did: it must not count towards a quarantine.
    offence: bool = True

    @property
    def blocks(self) -> bool:
        return self.action in (Action.BLOCK, Action.END_SESSION, Action.QUARANTINE)


ALLOW = Verdict(Action.ALLOW)


def refusal(rule_id: str, reason: str, action: Action = Action.BLOCK, hint: str | None = None,
            findings: tuple[Finding, ...] = (), offence: bool = True) -> Verdict:  # fmt: skip
    return Verdict(
        action, rule_id, f"pgwarden: blocked by rule {rule_id}: {reason}", hint, BLOCK_SQLSTATE,
        findings, offence=offence,
    )  # fmt: skip


def _glob_any(value: str | None, patterns: Iterable[str]) -> bool:
    return value is not None and any(fnmatch.fnmatchcase(value, p) for p in patterns)


def subject_matches(match: SubjectMatch, s: Subject, now: datetime) -> bool:
    if match.users is not None and not _glob_any(s.user, match.users):
        return False
    if match.roles is not None and not (set(match.roles) & (s.roles | {s.user})):
        return False
    if match.applications is not None and not _glob_any(s.application, match.applications):
        return False
    if match.end_users is not None and not _glob_any(s.end_user, match.end_users):
        return False
    if match.client_cidrs is not None:
        try:
            addr = ipaddress.ip_address(s.client_addr)
        except ValueError:
            return False
        if not any(addr in ipaddress.ip_network(c, strict=False) for c in match.client_cidrs):
            return False
    if match.hours is not None:
        start, end = parse_hours(match.hours)
        t = now.time()
        inside = start <= t <= end if start <= end else (t >= start or t <= end)
        if not inside:
            return False
    return True


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
            denied = self._deny_reason(rule, facts)
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

        unsound = self._beyond_analysis(facts, rules, findings)
        if unsound is not None:
            return _Static(unsound)

        st = self._outline(facts, rules)
        st.findings = tuple(findings)
        if facts.copy_direction == "to" and facts.copy_target == "stdout":
            st.copy_unmasked = self._copy_unmasked(rules, st.mask, st.need_to_know)
        return st

    def _beyond_analysis(
        self, facts: QueryFacts, rules: list[Rule], findings: list[Finding]
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
        limiting = [
            r for r in rules if r.kind in ("statement_limit", "window", "deny", "need_to_know")
        ]
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
        if facts.unknown and self.policy.fail_closed:
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
                if (r.kind == "need_to_know" and _know_table(r) in facts.relations_read)
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
            if all(self._monitored(r) for r in covering):
                findings.append(Finding(rule_id, Action.BLOCK, reason, monitored=True))
                continue
            return refusal(
                rule_id, reason, hint=hint,
                findings=(*findings, Finding(rule_id, Action.BLOCK, reason)),
            )  # fmt: skip
        return None

    def _deny_reason(self, rule: Rule, f: QueryFacts) -> str | None:
        assert rule.deny is not None
        labelled = frozenset(
            lb for lb in f.output_labels | f.copied_labels if rule.covers_label(lb)
        )
        for check in rule.deny:
            if check is Check.COPY_PROGRAM and f.copy_program:
                return "COPY ... PROGRAM runs commands on the database server"
            if (
                check is Check.COPY_OUT
                and f.copy_direction == "to"
                and (labelled or f.copy_program)
            ):
                return (
                    f"COPY ... TO of labelled data ({', '.join(sorted(labelled))}) is not allowed"
                )
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
                bad = sorted(
                    fn for fn in f.functions if fn.rsplit(".", 1)[-1] in DANGEROUS_FUNCTIONS
                )
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
                table = _know_table(rule)
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


def _know_table(rule: Rule) -> str:
    """The schema-qualified table of a need-to-know rule."""
    assert rule.need_to_know is not None
    table = rule.need_to_know.table
    return table if "." in table else f"public.{table}"


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


DB_USER_KEY = "db_user:"


def budget_key(per: str, s: Subject) -> str:
    """The subject key a window's counters are kept under for one of its budgets (a rule's
    ``per``): the person's (``end_user:alice``, or ``user:support_app`` for a statement
    naming no end user) or the database user's, all its end users together
    (``db_user:support_app``: apart from ``user:``, which is that user's own statements)."""
    return DB_USER_KEY + s.user if per == "db_user" else s.key


def window_rule_key(rule_id: str) -> str:
    """The window-store 'label' under which a window rule counts everything it covers."""
    return f"rule:{rule_id}"


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


# What a quarantined subject may still run: statements that end or let go of something
# and read nothing (a ROLLBACK refused would leave the session stuck in a failed
# transaction, holding its locks).
_ENDINGS = frozenset({"transaction", "close_portal", "deallocate", "discard", "unlisten"})


def _statement_words(normalized: str) -> str:
    """``CREATE VIEW``, ``CREATE OR REPLACE FUNCTION``, ``ALTER TABLE``: what a statement is."""
    words = normalized.split()[:4]
    n = 4 if len(words) > 1 and words[1].lower() == "or" else 2
    picked = [w.upper() for w in words[:n] if w.isalpha()]
    return " ".join(picked) or "this statement"


def _short(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
