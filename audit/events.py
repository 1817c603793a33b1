"""The audit event schema: one flat record per statement, session start/end, auth failure,
policy reload, alert and chain checkpoint.

Every event becomes one row of the ``events`` table (see ``audit/SCHEMA.md``) with the same
field names, so what the proxy hands in, what the hash chain covers, what the JSON lines carry
and what a responder queries are one vocabulary.  ``v`` is the schema version: readers refuse
versions they do not know instead of misreading them.

The proxy builds events with the ``AuditEvent.<kind>(...)`` constructors; it never fills the
chain fields (``chain_id``, ``seq``, ``prev_hash``, ``hash``), which the pipeline assigns.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = 1


class EventKind(StrEnum):
    SESSION_START = "session_start"
    AUTH_FAILURE = "auth_failure"
    STATEMENT = "statement"
    POLICY_RELOAD = "policy_reload"
    ALERT = "alert"
    SESSION_END = "session_end"
    # Written by the pipeline itself: a signed statement about the chain so far.
    CHECKPOINT = "checkpoint"


class Verdict(StrEnum):
    """How a statement ended, as far as policy is concerned (free text is allowed too)."""

    ALLOW = "allow"
    ALERT = "alert"
    MASK = "mask"
    BLOCK = "block"
    # A streaming limit cut the result short after some rows were sent.
    LIMIT = "limit"
    END_SESSION = "end_session"
    QUARANTINE = "quarantine"
    MONITOR = "monitor"


# Columns of the ``events`` table, in table order.  The hash of an event is SHA-256 over the
# canonical JSON of all of these except ``hash`` itself.
COLUMNS: tuple[str, ...] = (
    "v",
    "chain_id",
    "seq",
    "prev_hash",
    "hash",
    "ts",
    "kind",
    "session_id",
    "db_user",
    "database",
    "application",
    "client_addr",
    "tls",
    "end_user",
    "fingerprint",
    "statement",
    "full_text",
    "relations",
    "labels",
    "rows",
    "bytes",
    "duration_ms",
    "verdict",
    "rule_ids",
    "sqlstate",
    "severity",
    "message",
    "details",
    "ledger_count",
    "ledger_digest",
)
LIST_COLUMNS = frozenset({"relations", "labels", "rule_ids"})
INT_COLUMNS = frozenset({"v", "seq", "rows", "bytes", "ledger_count"})
FLOAT_COLUMNS = frozenset({"duration_ms"})
BOOL_COLUMNS = frozenset({"tls"})
JSON_COLUMNS = frozenset({"details"})

Record = dict[str, Any]


_ts_cache: tuple[int, str] = (-1, "")


def format_ts(ts: float) -> str:
    """Unix seconds -> the canonical ISO-8601 UTC text stored in every sink."""
    global _ts_cache
    us = round(ts * 1_000_000)
    sec, frac = divmod(us, 1_000_000)
    # Formatting a datetime costs more than the rest of an event; within one second only the
    # microseconds change.
    cached_sec, prefix = _ts_cache
    if sec != cached_sec:
        prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _ts_cache = (sec, prefix)
    return f"{prefix}.{frac:06d}Z"


def parse_ts(text: str) -> datetime:
    """The canonical text (or any ISO-8601 time, naive meaning UTC) -> aware datetime."""
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def ts_of(dt: datetime) -> str:
    """An aware datetime read back from a store -> the canonical text."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Subject:
    """Who is behind a session or statement, as the proxy knows them."""

    db_user: str
    database: str
    application: str = ""
    client_addr: str = ""
    tls: bool = False
    # Named by a sqlcommenter comment or ``SET pgwarden.end_user``; None when unknown.
    end_user: str | None = None


# A primary key as text, or as the UTF-8 bytes the proxy reads from a result.
LedgerKey = str | bytes


@dataclass(slots=True)
class AuditEvent:
    """One thing that happened.  Build with the class-method constructors.

    ``ledger_keys`` maps a labelled table (``schema.table``) to the primary keys, as text or
    its UTF-8 bytes, of the rows a statement returned; ``ledger_values`` maps a label (``pii.email``) to labelled
    values seen.  Both are turned into keyed hashes by the pipeline and never reach a sink as
    text.  Use :func:`audit.ledger.pk_text` to spell composite keys.
    """

    kind: EventKind
    ts: float = field(default_factory=time.time)
    session_id: str | None = None
    subject: Subject | None = None
    fingerprint: str | None = None
    statement: str | None = None
    full_text: str | None = None
    relations: Sequence[str] | None = None
    labels: Sequence[str] | None = None
    rows: int | None = None
    bytes: int | None = None
    duration_ms: float | None = None
    verdict: str | None = None
    rule_ids: Sequence[str] | None = None
    sqlstate: str | None = None
    severity: str | None = None
    message: str | None = None
    details: Mapping[str, Any] | None = None
    ledger_keys: Mapping[str, Sequence[LedgerKey]] | None = None
    ledger_values: Mapping[str, Sequence[str]] | None = None

    # --- constructors the proxy calls ----------------------------------------------------

    @classmethod
    def session_start(
        cls, session_id: str, subject: Subject, *, details: Mapping[str, Any] | None = None
    ) -> AuditEvent:
        """A client connected and authenticated."""
        return cls(EventKind.SESSION_START, session_id=session_id, subject=subject, details=details)

    @classmethod
    def auth_failure(
        cls,
        subject: Subject,
        message: str,
        *,
        sqlstate: str | None = "28P01",
        session_id: str | None = None,
    ) -> AuditEvent:
        """A client failed to authenticate (the server's message, no password)."""
        return cls(
            EventKind.AUTH_FAILURE,
            session_id=session_id,
            subject=subject,
            message=message,
            sqlstate=sqlstate,
            verdict=Verdict.BLOCK,
        )

    @classmethod
    def statement_event(
        cls,
        session_id: str,
        subject: Subject,
        *,
        fingerprint: str,
        statement: str,
        relations: Sequence[str] = (),
        labels: Sequence[str] = (),
        rows: int = 0,
        bytes: int = 0,
        duration_ms: float = 0.0,
        verdict: str = Verdict.ALLOW,
        rule_ids: Sequence[str] = (),
        sqlstate: str | None = None,
        message: str | None = None,
        full_text: str | None = None,
        ledger_keys: Mapping[str, Sequence[LedgerKey]] | None = None,
        ledger_values: Mapping[str, Sequence[str]] | None = None,
        ts: float | None = None,
    ) -> AuditEvent:
        """One statement finished (or was blocked).  ``statement`` is the normalised text."""
        # Positional, in field order: called for every statement, and passing twenty
        # keywords on costs twice what building the event does.
        return cls(
            EventKind.STATEMENT,
            time.time() if ts is None else ts,
            session_id,
            subject,
            fingerprint,
            statement,
            full_text,
            relations,
            labels,
            rows,
            bytes,
            duration_ms,
            verdict,
            rule_ids,
            sqlstate,
            None,  # severity
            message,
            None,  # details
            ledger_keys,
            ledger_values,
        )

    @classmethod
    def policy_reload(
        cls, *, ok: bool, message: str, details: Mapping[str, Any] | None = None
    ) -> AuditEvent:
        """The policy file was reloaded (or a reload was refused)."""
        return cls(
            EventKind.POLICY_RELOAD,
            verdict="ok" if ok else "rejected",
            message=message,
            details=details,
        )

    @classmethod
    def alert(
        cls,
        alert_type: str,
        message: str,
        *,
        severity: str = "warning",
        session_id: str | None = None,
        subject: Subject | None = None,
        rule_ids: Sequence[str] = (),
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Something a person should look at (block, canary hit, quarantine, sink failure)."""
        return cls(
            EventKind.ALERT,
            session_id=session_id,
            subject=subject,
            verdict=alert_type,
            severity=severity,
            message=message,
            rule_ids=rule_ids,
            details=details,
        )

    @classmethod
    def session_end(
        cls,
        session_id: str,
        subject: Subject,
        *,
        message: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """The session closed (``message`` says why when it was not the client's doing)."""
        return cls(
            EventKind.SESSION_END,
            session_id=session_id,
            subject=subject,
            message=message,
            details=details,
        )

    # --- record --------------------------------------------------------------------------

    def to_record(self) -> Record:
        """The flat row (chain fields empty), with every value in its canonical type.

        Types are forced here (``int`` rows, ``float`` duration) because the hash covers the
        JSON form: ``5`` and ``5.0`` hash differently, and a store would hand back the
        column's type.  Arrays are tuples (the same JSON as lists): a record holding only
        strings, numbers and tuples of strings is dropped from the garbage collector's
        tracking after its first young collection, so a backlog of queued records does not
        make every full collection slower.
        """
        # A copy of a template whose keys are already in sorted order: the chain hashes
        # sorted-key JSON, and a dict that is already sorted can be serialised without
        # orjson sorting it again on every event.  Copying it and setting what this event
        # has costs less than spelling out all thirty fields.
        rec = _RECORD_TEMPLATE.copy()
        s = self.subject
        if s is not None:
            rec["application"] = s.application
            rec["client_addr"] = s.client_addr
            rec["database"] = s.database
            rec["db_user"] = s.db_user
            rec["end_user"] = s.end_user
            rec["tls"] = bool(s.tls)
        if self.bytes is not None:
            rec["bytes"] = int(self.bytes)
        if self.details is not None:
            rec["details"] = dict(self.details)
        if self.duration_ms is not None:
            rec["duration_ms"] = float(self.duration_ms)
        rec["fingerprint"] = self.fingerprint
        rec["full_text"] = self.full_text
        rec["kind"] = str(self.kind)
        if self.labels is not None:
            rec["labels"] = tuple(self.labels)
        rec["message"] = self.message
        if self.relations is not None:
            rec["relations"] = tuple(self.relations)
        if self.rows is not None:
            rec["rows"] = int(self.rows)
        if self.rule_ids is not None:
            rec["rule_ids"] = tuple(self.rule_ids)
        rec["session_id"] = self.session_id
        rec["severity"] = self.severity
        rec["sqlstate"] = self.sqlstate
        rec["statement"] = self.statement
        rec["ts"] = format_ts(self.ts)
        if self.verdict is not None:
            rec["verdict"] = str(self.verdict)
        return rec


_RECORD_TEMPLATE: Record = dict.fromkeys(sorted(COLUMNS))
_RECORD_TEMPLATE["v"] = SCHEMA_VERSION


def normalise_record(raw: Mapping[str, Any]) -> Record:
    """A row as a store hands it back -> the canonical record the hash was computed over.

    SQLite keeps booleans as 0/1 and lists as JSON text; PostgreSQL hands back datetimes.
    """
    import orjson

    out: Record = {}
    for col in COLUMNS:
        val = raw.get(col)
        if val is not None:
            if col == "ts" and isinstance(val, datetime):
                val = ts_of(val)
            elif col in BOOL_COLUMNS:
                val = bool(val)
            elif col in FLOAT_COLUMNS:
                val = float(val)
            elif col in INT_COLUMNS:
                val = int(val)
            elif col in LIST_COLUMNS:
                val = orjson.loads(val) if isinstance(val, str | bytes) else list(val)
            elif col in JSON_COLUMNS and isinstance(val, str | bytes):
                val = orjson.loads(val)
        out[col] = val
    return out
