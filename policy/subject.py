"""Who sent a statement, as the policy sees it: ``Subject``, whether it matches one of the
policy file's subject definitions (users, roles, applications, end users, client networks,
hours), and the keys its window counters and quarantine are kept under (the person's, or all
end users of a database user together).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from policy.model import SubjectMatch, parse_hours


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
