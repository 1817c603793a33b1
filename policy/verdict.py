"""Decisions as values: what the engine says about one statement.  A ``Verdict`` (allow,
or a refusal with its rule, a sentence, a hint and a SQLSTATE), the ``Finding``s of rules
that fired, and the ``ResultPlan`` the session watches the result with (row limits, masks,
canaries, need-to-know checks).  Made by ``policy.engine``, enforced by the proxy; nothing
here decides.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from policy.model import Action, Rule

BLOCK_SQLSTATE = "42501"  # insufficient_privilege: what PostgreSQL itself uses for "not allowed"


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
