"""What ``pgwarden audit report`` shows of each person, read from the store.

The ranking, the sessions, the blocked statements and the alerts come from
:mod:`audit.query`; this module adds the two questions only the report asks: labelled rows
per minute by the kind of statement that carried them, and when each distinct record first
reached a person.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from audit import query as q
from audit.ledger import split

Row = dict[str, Any]

# The trail records the statement, not the protocol messages that carried its answer, so a
# result's channel is read from the statement's first word: rows of a query, rows a cursor
# FETCH sent (its DECLARE sent none), COPY output, rows an INSERT/UPDATE/DELETE RETURNING
# sent, and what a prepared EXECUTE or a procedure CALL returned.
CHANNELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("query rows", ("SELECT", "WITH", "TABLE", "VALUES")),
    ("cursor FETCH", ("FETCH",)),
    ("COPY", ("COPY",)),
    ("DML RETURNING", ("INSERT", "UPDATE", "DELETE", "MERGE")),
    ("EXECUTE / CALL", ("EXECUTE", "CALL", "DO")),
)
OTHER = "other"
# Leading characters that are not part of the first word: "(SELECT ...) UNION ...".
_LEAD = " (\t\r\n"


def channel(statement_head: str | None) -> str:
    """The channel a statement's result left by, from the start of its normalised text."""
    word = (statement_head or "").lstrip(_LEAD).upper().split(None, 1)
    first = word[0] if word else ""
    for name, words in CHANNELS:
        if first in words:
            return name
    return OTHER


@dataclass
class PersonReport:
    """Everything the report shows of one person (the end user, else the database user)."""

    name: str
    rank: int
    totals: Row  # audit.query.top's row
    # (minute "2026-11-02T09:01", channel) -> statements, labelled_rows, labelled_bytes,
    # errors (statements that ended in an error after or instead of sending rows)
    received: dict[tuple[str, str], Row] = field(default_factory=dict)
    # minute -> distinct records first received in it (ledger keys, every table)
    new_records: dict[str, int] = field(default_factory=dict)
    blocked: list[Row] = field(default_factory=list)
    canaries: list[Row] = field(default_factory=list)
    quarantines: list[Row] = field(default_factory=list)
    sessions: list[Row] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        # Names come from clients (any text): the page's ids are the ranks.
        return f"person-{self.rank}"


@dataclass
class ReportData:
    people: list[PersonReport]
    more_people: bool  # the ranking goes on beyond the people shown
    overview: list[Row]  # audit.query.labelled_rows_by_person_minute
    blocked: list[Row]  # everyone's, newest first


def _of(people: Sequence[str]) -> str:
    """The condition that an event ``e`` is about one of ``people`` (one parameter each)."""
    return f"{q.PERSON} IN ({', '.join('?' * len(people))})" if people else "FALSE"


async def received_by_minute(
    store: q.Store, people: Sequence[str], since: datetime | None, until: datetime | None
) -> list[Row]:
    """Labelled statements per person of ``people``, UTC minute and the first word of their
    text (not the refused ones: they received nothing, and the report shows them as blocked
    attempts)."""
    d = store.dialect
    where, args = q.Filters(since=since, until=until, kinds=("statement",)).where(d)
    rows = await store.fetch(
        f"""
        SELECT person, minute, head, COUNT(*) AS statements,
               COALESCE(SUM(rows), 0) AS labelled_rows,
               COALESCE(SUM(bytes), 0) AS labelled_bytes,
               COUNT(sqlstate) AS errors
        FROM (SELECT {q.PERSON} AS person, {d.minute} AS minute,
                     upper(substr(ltrim(e.statement, ?), 1, 12)) AS head,
                     e.rows, e.bytes, e.sqlstate
              FROM {{events}} e
              WHERE {where} AND {_of(people)} AND {d.labelled}
                AND (e.verdict IS NULL OR e.verdict <> 'block')) s
        GROUP BY person, minute, head
        ORDER BY minute
        """,
        _LEAD,
        *args,
        *people,
    )
    return [q._plain(r) for r in rows]


async def new_records_by_minute(
    store: q.Store, people: Sequence[str], since: datetime | None, until: datetime | None
) -> dict[str, dict[str, int]]:
    """Per person, the UTC minutes in which distinct records (ledger keys of any table, counted
    as :func:`audit.query.top` counts them) first reached them in the window."""
    d = store.dialect
    where, args = q.Filters(since=since, until=until, kinds=("statement",)).where(d)
    seen: dict[str, set[tuple[str, bytes]]] = {p: set() for p in people}
    out: dict[str, dict[str, int]] = {p: {} for p in people}
    async for r in store.stream(
        f"""
        SELECT {q.PERSON} AS person, {d.minute} AS minute, l.relation, l.digests
        FROM {{events}} e JOIN {{ledger}} l ON l.chain_id = e.chain_id AND l.seq = e.seq
        WHERE {where} AND {_of(people)} AND l.kind IN ('k2', 'k')
        ORDER BY e.ts, e.id
        """,
        *args,
        *people,
    ):
        mine = seen.get(r["person"])
        if mine is None:
            continue
        rel = str(r["relation"])
        before = len(mine)
        mine.update((rel, dg) for dg in split(bytes(r["digests"])))
        if len(mine) > before:
            minutes = out[r["person"]]
            minutes[r["minute"]] = minutes.get(r["minute"], 0) + len(mine) - before
    return out


async def gather(
    store: q.Store, since: datetime | None, until: datetime | None, people: int
) -> ReportData:
    """The report's data for the first ``people`` of the ranking by distinct records."""
    ranking = await q.top(store, since, until, people + 1)
    shown = [PersonReport(str(r["person"]), rank, r) for rank, r in enumerate(ranking[:people], 1)]
    by_name = {p.name: p for p in shown}
    for r in await received_by_minute(store, list(by_name), since, until):
        p = by_name.get(r["person"])
        if p is None:
            continue
        key = (str(r["minute"]), channel(r["head"]))
        acc = p.received.setdefault(
            key, {"statements": 0, "labelled_rows": 0, "labelled_bytes": 0, "errors": 0}
        )
        for k in acc:
            acc[k] += int(r[k])
    for name, minutes in (await new_records_by_minute(store, list(by_name), since, until)).items():
        by_name[name].new_records = minutes
    for alert_type, attr in (("canary", "canaries"), ("quarantine", "quarantines")):
        alerts = q.Filters(since=since, until=until, kinds=("alert",), verdict=alert_type)
        for r in await q.search(store, alerts, limit=_MOST):
            p = by_name.get(r["person"])
            if p is not None:
                getattr(p, attr).append(r)
    # Everyone's at once and shared out here: asked person by person, each question would
    # read every event of the window again (no index serves a person).
    window = q.Filters(since=since, until=until)
    blocked = await q.blocked(store, window, limit=_MOST)
    for r in blocked:
        p = by_name.get(r.get("end_user") or r.get("db_user") or "")
        if p is not None:
            p.blocked.append(r)
    for r in await q.sessions(store, window, limit=_MOST):
        for name in r["persons"]:
            if name in by_name:
                by_name[name].sessions.append(r)
    return ReportData(
        people=shown,
        more_people=len(ranking) > people,
        overview=await q.labelled_rows_by_person_minute(store, since, until),
        blocked=blocked[:_SHOWN_BLOCKED],
    )


# Beyond these, a window is better narrowed than drawn.
_MOST = 100_000
_SHOWN_BLOCKED = 500
