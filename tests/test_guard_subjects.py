"""A connection that names another end user on each unit of work (a helpdesk's shared
account) keeps one subject object per person, so the engine's verdict cache -- keyed by
the subject object -- hits when a person comes back instead of filling with dead entries
(``make soak`` saw pgwarden's RSS grow by ~15 MB over 30 minutes)."""

from __future__ import annotations

from proxy.sandbox.cluster import Cluster
from tests.trackerutil import audited_tracker

POLICY = {
    "subjects": {"agents": {"users": ["postgres"], "end_user_from": ["comment"]}},
}


def test_each_person_keeps_one_subject_object(pg: Cluster, enforce_db: str) -> None:
    tracker, _oid = audited_tracker(pg, POLICY)
    guard = tracker.guard
    seen = {}
    for _ in range(3):
        for who in ("alice", "bob", "carol"):
            (decision,) = guard.check(f"SELECT count(*) FROM products /* end_user='{who}' */")
            assert decision.subject.end_user == who
            seen.setdefault(who, decision.subject)
            assert decision.subject is seen[who]
    verdicts = guard.engine._verdicts
    # One cached verdict per (statement, person), however often they alternate.
    assert len([k for k in verdicts if k[1] in {id(s) for s in seen.values()}]) == 3
