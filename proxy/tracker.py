"""Follows statements through the protocol so policy can act on them; sans-IO.

PostgreSQL answers client messages strictly in order, so a FIFO of what the client sent
attributes every server message to the statement it belongs to: rows to the Query statement
or Execute that produced them, a RowDescription to the Describe that asked for it.  After an
error the server skips to the next Sync; the FIFO skips the same way.

What policy needs from here:

* **refusal before execution**: a refused statement is replaced by one that makes PostgreSQL
  raise our error (``guard.raise_statement``), so the server fails exactly as it would on any
  error at that point (transaction aborted, rest of the string or pipeline skipped) while the
  refused text never reaches it;
* **exact streaming limits**: the client gets at most the allowed rows, then an
  ErrorResponse; the statement is cancelled upstream, everything up to ReadyForQuery is
  discarded, and the server's transaction is made to fail as the client was told it did.
  While a watched statement runs, later client messages are held back, so nothing the client
  pipelined after it can run on the server when the client will be told it did not;
* masking of labelled values in text-format rows, canaries (a row holding one is checked
  before it is forwarded, and a refusing canary rule cuts the result there, as a limit
  does), and record identities (keyed hashes of primary keys) for window counters and the
  audit ledger.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from audit.ledger import pk_bytes
from policy.facts import DataCopy, SourceColumn
from policy.inflight import Hold
from policy.lineage.builtin import SERVER_FILES_TARGET
from policy.lineage.model import names_record_by
from policy.model import Action, Mode
from policy.subject import budget_key, window_rule_key
from policy.valueindex import ValueIndex
from policy.verdict import Finding, KnowCheck, ResultPlan, RowLimit, Verdict
from proxy import commands as cmd
from proxy.codec import FrameReader
from proxy.copyrows import BinaryCopyRowReader, CopyRowReader, reader_for
from proxy.guard import ColumnInfo, Decision, Guard, ResultShape, raise_statement
from proxy.keyfetch import bind_with_keys, strip_description, strip_row, with_keys
from proxy.masking import mask_value
from proxy.messages.backend import (
    CommandComplete,
    DataRow,
    ErrorResponse,
    NoticeResponse,
    ParameterStatus,
    row_values,
)
from proxy.messages.errors import ClientProtocolError, ProtocolError
from proxy.messages.frontend import Bind, Close, Execute, Parse, Query
from proxy.messages.heads import bind_head, execute_head, parse_head, target_head
from proxy.metrics import Stats

_Q, _P, _B, _D, _E, _C, _S, _H, _F, _X = (ord(c) for c in "QPBDECSHFX")
_d, _c, _f = (ord(c) for c in "dcf")
_ONE, _TWO, _THREE, _n, _T, _I, _s, _Z = (ord(c) for c in "123nTIsZ")
_COPY_OUT = ord("H")  # from the server, 'H' is CopyOutResponse
_PS = ord("S")  # from the server, 'S' is ParameterStatus
_NOTICE = ord("N")
_NOTIFY = ord("A")  # NotificationResponse
_FRONTEND = frozenset((_Q, _P, _B, _D, _E, _C, _S, _H, _F, _X, _d, _c, _f))

SERVER_MESSAGE_LIMIT = 2**30 + 2**20
_LENGTH = struct.Struct("!i")  # a message's length, after its type byte
_ROW_FRAME = struct.Struct("!BI2xI")  # DataRow: type, length, (column count), first value's size
_ROW_FRAME_COLS = struct.Struct("!BIHI")  # the same with the column count
_U32 = struct.Struct("!I")
_NULL_SIZE = 2**32 - 1  # a NULL value's size (-1) read unsigned
# need-to-know: where a row's key cannot be found, or cannot vouch for the row
NO_KEY, BINARY_KEY, MIXED_KEY = -1, -2, -3
_BINARY_AS_TEXT = frozenset((19, 25, 1042, 1043))  # name, text, char(n), varchar: same bytes
FLUSH = b"H\x00\x00\x00\x04"

# What a FIFO entry waits for.
PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, QUERY, FUNC, FIXUP, HIDDEN = range(10)
# The statement a refused prepared statement's portals are bound to (see the Bind branch).
REFUSAL_STATEMENT = "pgwarden_refusal"
_SYNC_POINTS = (SYNC, QUERY, FUNC, FIXUP)  # entries answered by ReadyForQuery


@dataclass(slots=True)
class Running:
    """One row-producing statement: a statement of a Query, or an Execute of a portal."""

    decision: Decision | None
    fields: bytes | None = None  # the RowDescription body
    columns: list[ColumnInfo] | None = None
    rows: int = 0
    nbytes: int = 0
    copy_out: bool = False
    copy_binary: bool = False  # CopyOutResponse said binary
    copy_reader: CopyRowReader | BinaryCopyRowReader | None = None  # COPY rows, when wanted
    copy_bulk: bool = False  # the reader takes whole runs of CopyData: no limit to apply
    # Key columns in binary format: position -> reader giving the key's text (None: no
    # reader for that type; such keys are left out and logged)
    key_readers: dict[int, Callable[[bytes], bytes] | None] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    keys: dict[str, list[bytes]] = field(default_factory=dict)  # table -> primary keys seen
    value_capture: tuple[tuple[int, str], ...] = ()  # (column, label) when there is no key
    values: dict[str, list[bytes]] = field(default_factory=dict)  # label -> values seen
    portal: str | None = None
    cursor: str | None = None
    prepared: bool = False  # columns and what to watch worked out (at the first row)
    watch: bool = False  # rows are inspected (limits, masks, canaries, record keys)
    capture: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (table, key positions)
    # (check, key position, allowed keys, reads a binary key as text or None); the position
    # is NO_KEY when the result lacks the key column, BINARY_KEY when its format is unreadable,
    # MIXED_KEY when a row may hold values of several rows of the table
    know: tuple[tuple[KnowCheck, int, frozenset[bytes], Callable[[bytes], bytes] | None], ...] = ()
    withheld: int = 0  # rows need-to-know kept from the client
    key_upto: int = -1  # >= 0: rows are read only up to this column (record keys alone)
    key_list: list[bytes] | None = None  # set: each row's key (at key_upto) goes here, no more
    # False: not audited yet; True: persisted (or not needed); None: the audit trail failed.
    durable_done: bool | None = False
    hold: Hold | None = None  # the window budget this statement holds while it runs
    # Value matching (policy.valueindex): the index while this result is scanned, and the
    # records (table -> keys) whose labelled values its rows, COPY data, error and notice
    # text carried to the client.
    scan: ValueIndex | None = None
    scan_skip: frozenset[int] = frozenset()  # columns not scanned (see _prepare)
    matched: dict[str, set[bytes]] = field(default_factory=dict)


@dataclass(slots=True)
class Entry:
    kind: int
    running: Running | None = None
    statements: list[Decision] | None = None  # QUERY: every statement of the string
    index: int = 0  # QUERY: the statement producing output now
    name: str = ""  # DESCRIBE: 'S' or 'P' followed by the name
    hidden: int = 0  # DESCRIBE: columns pgwarden appended, kept from the client
    holds: list[Hold | None] | None = None  # QUERY: each statement's hold, until it runs


@dataclass(slots=True)
class Portal:
    decision: Decision | None
    fields: bytes | None = None  # the RowDescription body from a Describe
    formats: tuple[int, ...] = ()  # Bind's result format codes, known before any RowDescription
    rows: int = 0  # rows sent by earlier Execute calls (max_rows > 0)


class Tracker:
    """The READY-phase relay when a policy is in force. Owned by ``Session``."""

    def __init__(
        self,
        guard: Guard,
        stats: Stats,
        max_message: int,
        on_parameter: Callable[[str, str], None] | None = None,
    ) -> None:
        self.guard = guard
        self.on_parameter = on_parameter
        self.server_sent_fatal = False
        self.closed = False
        self.stats = stats
        self.max_message = max_message
        self.client_reader = FrameReader(max_message, from_client=True)
        # Server messages are whole-buffered here (a row may have to be cut or rewritten),
        # so their bound is PostgreSQL's own (1 GB fields), not the client-message limit.
        self.server_reader = FrameReader(SERVER_MESSAGE_LIMIT, from_client=False)
        self.fifo: deque[Entry] = deque()
        self.prepared: dict[str, Decision | None] = {}
        self.statement_fields: dict[str, bytes] = {}
        self.refused: set[str] = set()  # prepared statements replaced by a refusal
        self.portals: dict[str, Portal] = {}
        self.cursor_rows: dict[str, int] = {}
        self.held = b""  # client bytes held back while a watched statement runs
        self.holding = False
        # After a cut-off: server output is discarded up to ReadyForQuery; in the extended
        # protocol client messages are dropped up to Sync, as the server drops them.
        self.discarding = False
        self.cut_simple = False
        self.skip_client_until_sync = False
        self.cancel_sent = False
        self.transaction_status = "I"
        self.cycles: deque[float] = deque()
        # The audit trail: when on, labelled results keep their primary keys (the record
        # ledger) and their CommandComplete waits until the event is persisted.
        self.ledger = False
        self.durable = False
        self.awaiting: Running | None = None
        # Usage sent to the window store and not yet counted there: the client's next
        # statements wait, so they are judged on totals that include it (across processes).
        self.pending_counts = 0
        self._fresh = False
        # Labelled data copied into tables by statements whose transaction has not ended,
        # and whether an error came since the last ReadyForQuery (see _ready).
        self.uncommitted_copies: list[DataCopy] = []
        self.cycle_failed = False
        self.server_pending = b""  # server bytes that arrived while a CommandComplete is held
        self.client_pending = b""  # bytes for the client held with that CommandComplete
        # Records named by text that reached the client outside any statement's result (a
        # notification between statements): they go with the next statement that finishes.
        self.loose_matched: dict[str, set[bytes]] = {}

    @property
    def busy(self) -> bool:
        return bool(self.cycles)

    # --- client -> server ------------------------------------------------------------------

    def client_data(self, data: bytes) -> list[cmd.Command]:
        raw, frames = self.client_reader.feed(data)
        return self._client_frames(raw, frames)

    def _client_frames(self, raw: bytes, frames: list[tuple[int, int, int]]) -> list[cmd.Command]:
        if self.holding or self.pending_counts:
            self.held += raw
            return []
        out: list[cmd.Command] = []
        parts: list[bytes] = []
        fwd = 0
        for t, start, end in frames:
            head = start - 5
            if self.skip_client_until_sync and t != _S:
                parts.append(raw[fwd:head])  # the server would ignore it after the error
                fwd = end
                continue
            if t == _Q:
                sql = Query.decode(raw[start:end]).sql
                checked = self.guard.check(sql)
                sent, decisions = with_keys(self.guard, self.guard.upstream(sql), checked)
                out += self.guard.end_user_notes()
                refresh = self._needs_fresh_counts(decisions)
                if refresh is not None:
                    return self._refresh_first(refresh, out, parts, raw, fwd, head)
                self.stats.statements += 1
                self.cycles.append(time.perf_counter())
                self._forget_renamed(decisions)
                blocked = self.guard.blocked(decisions)
                entry = Entry(QUERY, statements=decisions)
                self.fifo.append(entry)
                if blocked is not None:
                    # Instead of the client's text (never beside it).
                    parts += (raw[fwd:head], Query(self._substitute(sql, blocked)).encode())
                    fwd = end
                    out.append(self._block_command(blocked))
                    continue
                if sent is not sql:
                    # Need-to-know keys appended (proxy.keyfetch), removed from the result;
                    # a signed end-user name's token replaced by the name.
                    parts += (raw[fwd:head], Query(sent).encode())
                    fwd = end
                entry.holds = self._holds(decisions)
                if any(d.limited for d in decisions):
                    return self._hold_after(out, parts, raw, fwd, end)
            elif t == _P:
                name, sql = parse_head(raw[start:end])
                checked = self.guard.check(sql)
                sent, decisions = with_keys(self.guard, self.guard.upstream(sql), checked)
                out += self.guard.end_user_notes()
                refresh = self._needs_fresh_counts(decisions)
                if refresh is not None:
                    return self._refresh_first(refresh, out, parts, raw, fwd, head)
                blocked = self.guard.blocked(decisions)
                decision = decisions[0] if decisions else None
                if blocked is not None:
                    # The server parses the client's text (Parse reads no data), so that a
                    # Describe tells the client its real parameters: asyncpg checks the
                    # arguments it was given against them before it sends the Bind.  No
                    # portal of it ever runs: the Bind branch binds them to the refusal.
                    sent = self.guard.upstream(sql)
                if sent is not sql:
                    parse = Parse.decode(raw[start:end])
                    parts += (raw[fwd:head], Parse(name, sent, parse.param_types).encode())
                    fwd = end
                if blocked is not None:
                    out.append(self._block_command(blocked))
                    # Kept (its plan is None, so nothing is watched) so that the Execute of
                    # the substitute is audited as this refusal, not as an anonymous allow.
                    decision = blocked
                    self.refused.add(name)
                else:
                    self.refused.discard(name)
                self.prepared[name] = decision
                self.statement_fields.pop(name, None)
                self.fifo.append(Entry(PARSE))
            elif t == _B:
                portal_name, statement, formats = bind_head(raw[start:end])
                refused = self.prepared.get(statement) if statement in self.refused else None
                if refused is None and statement not in self.prepared:
                    # Prepared by SQL PREPARE (the protocol and SQL share one namespace):
                    # its text was judged as a PREPARE, never as what a portal of it runs.
                    refused = self.guard.unfollowed(
                        f"<Bind of statement {statement!r}>",
                        "a Bind of a statement this session did not Parse (one made with SQL "
                        "PREPARE) runs SQL pgwarden did not judge for it",
                        "run it with EXECUTE, or Parse the statement",
                    )
                    if refused is not None:
                        out.append(self._block_command(refused))
                if refused is not None:
                    # A portal of a refused statement runs the refusal instead: a statement
                    # of pgwarden's that raises it, made anew for each such Bind (its
                    # CloseComplete and ParseComplete are not the client's), bound without
                    # the client's parameters (it takes none).
                    parts += (raw[fwd:head], _refusal_portal(refused.verdict, portal_name))
                    fwd = end
                    self.fifo += (Entry(HIDDEN), Entry(HIDDEN))
                    self.portals[portal_name] = Portal(refused, None, ())
                    self.fifo.append(Entry(BIND))
                    continue
                if len(formats) > 1 and (hidden := _hidden(self.prepared.get(statement))):
                    # One format code per column: the server's result has the appended ones.
                    parts += (raw[fwd:head], bind_with_keys(raw[start:end], formats, hidden))
                    fwd = end
                    formats += (0,) * hidden
                self.portals[portal_name] = Portal(
                    self.prepared.get(statement), self.statement_fields.get(statement), formats
                )
                self.fifo.append(Entry(BIND))
            elif t == _D:
                kind, name = target_head(raw[start:end])
                described = (
                    self.prepared.get(name) if kind == "S"
                    else portal.decision if (portal := self.portals.get(name)) is not None
                    else None
                )  # fmt: skip
                self.fifo.append(Entry(DESCRIBE, name=kind + name, hidden=_hidden(described)))
            elif t == _E:
                portal_name, _max_rows = execute_head(raw[start:end])
                portal = self.portals.get(portal_name)
                if portal is None and (unseen := self._unbound(portal_name)) is not None:
                    # A portal this session did not Bind: a SQL cursor (DECLARE), whose rows
                    # pgwarden judges at FETCH.  Its refusal runs in a portal of its own.
                    parts += (
                        raw[fwd:head],
                        _refusal_portal(unseen.verdict, REFUSAL_STATEMENT),
                        Execute(REFUSAL_STATEMENT).encode(),
                    )
                    fwd = end
                    self.fifo += (Entry(HIDDEN), Entry(HIDDEN), Entry(HIDDEN))
                    out.append(self._block_command(unseen))
                    self.stats.statements += 1
                    self.fifo.append(Entry(EXECUTE, running=self._running(unseen)))
                    continue
                decision = portal.decision if portal is not None else None
                plan = decision.plan if decision is not None else None
                if (
                    decision is not None
                    and plan is not None
                    and (plan.need_to_know or plan.window_rules)
                ):
                    # A prepared statement run again, maybe long after its Parse: the lookup
                    # for the person it was prepared for may have expired since, and what is
                    # left of its windows is what the counters say now, not then.
                    refresh = self._needs_fresh_counts([decision], windows=bool(plan.window_rules))
                    if refresh is not None:
                        return self._refresh_first(refresh, out, parts, raw, fwd, head)
                    if plan.window_rules:
                        decision = self._rejudged(decision)
                self.stats.statements += 1
                running = self._running(decision)
                running.hold = self._hold(decision)
                running.portal = portal_name
                running.fields = portal.fields if portal is not None else None
                self.fifo.append(Entry(EXECUTE, running=running))
                if decision is not None and decision.limited:
                    # PostgreSQL keeps the end of a result in its buffer until Flush or Sync,
                    # and the client's are held back: ask for the flush ourselves.
                    parts += (raw[fwd:end], FLUSH)
                    return self._hold_after(out, parts, raw, end, end)
            elif t == _C:
                kind, name = target_head(raw[start:end])
                if kind == "S":
                    self.prepared.pop(name, None)
                    self.refused.discard(name)
                    self.statement_fields.pop(name, None)
                else:
                    self.portals.pop(name, None)
                self.fifo.append(Entry(CLOSE))
            elif t == _S:
                self.cycles.append(time.perf_counter())
                if self.skip_client_until_sync:
                    # Whatever the cancel achieved, make the server fail the way the client
                    # was told it failed before this Sync ends the implicit transaction.
                    self.skip_client_until_sync = False
                    parts += (raw[fwd:head], _failing_extended())
                    fwd = head
                self.fifo.append(Entry(SYNC))
            elif t == _F:
                self.stats.statements += 1
                self.cycles.append(time.perf_counter())
                refused = self.guard.function_call()
                self.fifo.append(Entry(FUNC))
                if refused is not None:
                    # The fast path calls a function by number, with no SQL to analyse
                    # (query_to_xml with a whole table's query as its argument): its
                    # refusal goes instead, answered as a call is (an error, then Ready).
                    v = refused.verdict
                    parts += (
                        raw[fwd:head],
                        Query(raise_statement(v.message, v.hint, v.sqlstate)).encode(),
                    )
                    fwd = end
                    out.append(self._block_command(refused))
            elif t == _X:
                parts.append(raw[fwd:end])
                self.closed = True
                return [
                    *out,
                    cmd.SendToServer(b"".join(parts)),
                    cmd.CloseServer(),
                    cmd.CloseClient(),
                ]
            elif t not in _FRONTEND:
                raise ClientProtocolError(f"unknown message type {chr(t)!r}")
        return self._send(out, parts, raw, fwd, len(raw))

    @staticmethod
    def _send(
        out: list[cmd.Command], parts: list[bytes], raw: bytes, fwd: int, end: int
    ) -> list[cmd.Command]:
        parts.append(raw[fwd:end])
        data = b"".join(parts)
        return [cmd.SendToServer(data), *out] if data else out

    def _hold_after(
        self, out: list[cmd.Command], parts: list[bytes], raw: bytes, fwd: int, end: int
    ) -> list[cmd.Command]:
        """Forward up to a watched statement and hold back what the client sent after it."""
        self.holding = True
        self.held = raw[end:] + self.held
        return self._send(out, parts, raw, fwd, end)

    def _needs_fresh_counts(
        self, decisions: list[Decision], windows: bool = True
    ) -> list[cmd.Command] | None:
        """What must be read before these statements are judged (once per statement): a
        shared store's window totals (unless ``windows`` is False), and need-to-know lookups
        not in the cache."""
        if self._fresh:
            self._fresh = False
            return None
        wanted: dict[str, set[float]] = {}
        shared: dict[str, dict[str, set[float]]] = {}  # budgets of others: key -> label -> windows
        lookups: dict[str, cmd.Command] = {}
        for d in decisions:
            plan = d.plan
            if plan is None:
                continue
            if windows and self.guard.shared_counts:
                for limit in plan.limits:
                    if limit.window is None:
                        continue
                    for key in {budget_key(per, d.subject) for per in limit.per}:
                        if key != decisions[0].subject.key:
                            labels = shared.setdefault(key, {})
                            labels.setdefault(window_rule_key(limit.rule_id), set()).add(
                                limit.window
                            )
                            continue
                        for label in (*limit.labels, window_rule_key(limit.rule_id)):
                            wanted.setdefault(label, set()).add(limit.window)
            for check in plan.need_to_know:
                if self.guard.allowed_keys(check.rule_id, d.person) is None:
                    lookups[check.rule_id] = cmd.LookupAllowed(check.rule_id, d.person)
        todo: list[cmd.Command] = list(lookups.values())
        if wanted:
            todo.append(cmd.RefreshCounts(
                decisions[0].subject.key, tuple((lb, tuple(sorted(w))) for lb, w in sorted(wanted.items()))
            ))  # fmt: skip
        for key, labels in sorted(shared.items()):
            todo.append(cmd.RefreshCounts(
                key, tuple((lb, tuple(sorted(w))) for lb, w in sorted(labels.items()))
            ))  # fmt: skip
        return todo or None

    def _refresh_first(
        self, todo: list[cmd.Command], out: list[cmd.Command], parts: list[bytes],
        raw: bytes, fwd: int, head: int,
    ) -> list[cmd.Command]:  # fmt: skip
        """Hold this message (and all after it) until every answer is in; it is then judged
        again with them."""
        self._fresh = True
        self.pending_counts += len(todo)
        self.held = raw[head:] + self.held
        return self._send([*out, *todo], parts, raw, fwd, head)

    def counts_recorded(self) -> list[cmd.Command]:
        """A statement's usage is in the window store, a lookup is answered or a cut-off
        statement's cancel has reached the server: the next statement may go on."""
        self.pending_counts = max(0, self.pending_counts - 1)
        if self.pending_counts or self.holding:
            return []
        return self._release()

    def _release(self) -> list[cmd.Command]:
        self.holding = False
        if not self.held or self.pending_counts:
            return []
        held, self.held = self.held, b""
        raw, frames = FrameReader(self.max_message, from_client=True).feed(held)
        return self._client_frames(raw, frames)

    def _rejudged(self, decision: Decision) -> Decision:
        """A prepared statement's decision with its window limits as the counters stand now
        (psycopg prepares a statement run five times: judged once at its Parse, it read
        past the hourly budget).  The server has it parsed, so a refusal can no longer
        replace it: its result is cut off at the first row instead."""
        plan = decision.plan
        assert plan is not None
        verdict = self.guard.engine.decide(decision.subject, decision.facts)
        if verdict is decision.verdict:
            return decision  # nothing counted since: the engine hands back the same verdict
        if verdict.plan is not None:
            return decision.with_verdict(verdict)
        if not verdict.blocks:
            return decision
        return _refused_at_first_row(decision, verdict, plan)

    def _holds(self, decisions: list[Decision]) -> list[Hold | None] | None:
        """The holds of a string's statements.  All of them were judged before any ran, so
        one after an earlier statement's hold is judged again with it (two statements in
        one string each read what was left of the hour)."""
        holds: list[Hold | None] = []
        for i, d in enumerate(decisions):
            if any(holds) and d.plan is not None and d.plan.window_rules:
                d = decisions[i] = self._rejudged(d)
            holds.append(self._hold(d))
        return holds if any(holds) else None

    def _hold(self, decision: Decision | None) -> Hold | None:
        """What this statement holds of its windows while it runs (``policy.inflight``):
        as many records as it may read."""
        plan = decision.plan if decision is not None else None
        if plan is None or not plan.window_rules or not plan.labels or decision is None:
            return None
        in_flight = self.guard.engine.counters.in_flight
        if in_flight is None:
            return None
        caps = [lim.max_rows for lim in plan.limits if lim.max_rows is not None and lim.labels]
        if not caps:
            return None
        n = min(caps) * max(1, decision.facts.records_per_row)
        slots = [
            ((key, window_rule_key(lim.rule_id), lim.window), n)
            for lim in plan.limits
            if lim.window is not None and not lim.monitored
            for key in dict.fromkeys(budget_key(per, decision.subject) for per in lim.per)
        ]
        return in_flight.hold(slots) if slots and n else None

    def abandon(self) -> None:
        """The session ended: every statement still in flight gives back its hold."""
        for entry in self.fifo:
            _let_go(entry)

    def _running(self, decision: Decision | None) -> Running:
        running = Running(decision)
        if decision is not None and decision.facts.kind == "fetch":
            running.cursor = decision.facts.cursor_name
        return running

    @staticmethod
    def _substitute(sql: str, blocked: Decision) -> str:
        v = blocked.verdict
        raising = raise_statement(v.message, v.hint, v.sqlstate)
        # Statements before the refused one run as PostgreSQL would run them; the refused one
        # and everything after it are replaced by the raise (nothing after an error runs).
        loc = blocked.facts.location
        prefix = sql[:loc].rstrip().rstrip(";") if 0 < loc <= len(sql) else ""
        return f"{prefix};\n{raising}" if prefix.strip() else raising

    def _key_rows_lead(self) -> Callable[[bytes], int] | None:
        """While a result's rows are read only for their record key (the ledger's use): a
        walker for the rows that open the next chunk, which for a big result is all of
        them but the chunk's last, cut-off one.  It reads each row's header once, where
        ``feed_runs`` and then ``_collect_keys`` would each walk it."""
        fifo = self.fifo
        if self.discarding or not fifo:
            return None
        entry = fifo[0]
        r = entry.running
        if (
            r is None or r.key_list is None or not r.watch
            or not r.prepared or r.copy_out or entry.kind not in (EXECUTE, QUERY)
        ):  # fmt: skip
            return None
        keys, limit, column = r.key_list, self.server_reader.max_message, r.key_upto

        def lead(raw: bytes) -> int:
            pos, rows = _lead_key_rows(raw, keys, limit, column)
            r.rows += rows
            r.nbytes += pos - 5 * rows
            return pos

        return lead

    def _block_command(self, blocked: Decision) -> cmd.Command:
        v = blocked.verdict
        return cmd.PolicyBlock(
            subject=blocked.subject.key, rule_id=v.rule_id or "", action=v.action.value,
            message=v.message, facts=blocked.facts, offence=v.offence,
        )  # fmt: skip

    # --- server -> client --------------------------------------------------------------------

    def server_data(self, data: bytes) -> list[cmd.Command]:
        if self.awaiting is not None:
            self.server_pending += data
            return []
        raw, frames = self.server_reader.feed_runs(data, self._key_rows_lead())
        out: list[cmd.Command] = []
        parts: list[bytes] = []
        fwd = 0
        fifo = self.fifo
        for t, start, end, n in frames:
            head = start - 5
            if self.discarding and t != _Z:
                # After a cut-off: the server's cancel error, the tag of a statement that
                # finished anyway, the output of later statements: none of it reaches the client.
                parts.append(raw[fwd:head])
                fwd = end
                if t == _E:
                    self._skip_to_sync()
                continue
            if t in (_D, _d):
                # A run of n rows (DataRow or CopyData) from raw[head] to raw[end].
                entry = fifo[0] if fifo else None
                if entry is None or entry.kind not in (EXECUTE, QUERY):
                    continue
                r = entry.running
                if r is not None and r.prepared and (t == _D or r.copy_out):
                    # The bulk of every big result: rows nobody inspects are only counted,
                    # and rows whose only use is their record key (the ledger) give just
                    # that, with no call per row.
                    if not r.watch:
                        r.rows += n if t == _D else _copy_rows(raw, head, end, r.copy_binary)
                        r.nbytes += end - start - 5 * (n - 1)
                        if r.scan is not None:
                            _scan_run(r.scan, raw, head, end, t == _d, r.matched, r.scan_skip)
                        continue
                    if t == _D and r.key_list is not None:
                        r.rows += n
                        r.nbytes += end - start - 5 * (n - 1)
                        _collect_keys(raw, head, end, r.key_upto, r.key_list)
                        if r.scan is not None:
                            _scan_run(r.scan, raw, head, end, False, r.matched, r.scan_skip)
                        continue
                    if t == _d and r.copy_bulk:
                        # COPY output read for keys with no limit to apply: the run's
                        # rows as one block.
                        payloads = _copy_payloads(raw, head, end)
                        block = b"".join(payloads)
                        r.rows += (
                            len(payloads) - payloads.count(_BINARY_TRAILER) if r.copy_binary
                            else block.count(b"\n")
                        )  # fmt: skip
                        r.nbytes += end - start - 5 * (n - 1)
                        self._inspect_copy(r, block, out)
                        if r.scan is not None:
                            r.scan.scan(block, r.matched)
                        continue
                pos = head
                while pos < end:
                    (length,) = _LENGTH.unpack_from(raw, pos + 1)
                    row_start, row_end = pos + 5, pos + 1 + length
                    running = self._current(entry)
                    if t == _d and not running.copy_out:
                        break
                    rows = 1
                    if t == _d:
                        rows = _copy_rows(raw, pos, row_end, running.copy_binary)
                    replacement = self._row(running, raw, row_start, row_end, rows, t == _d, out)
                    if (
                        t == _D and replacement != b"" and not self.discarding
                        and (hidden := _hidden(running.decision))
                    ):  # fmt: skip
                        row = raw[pos:row_end] if replacement is None else replacement
                        replacement = strip_row(row, hidden)
                    if running.scan is not None and replacement != b"" and not self.discarding:
                        # What the client receives of this row (masked, keys pgwarden
                        # appended taken out) is looked for labelled values.
                        _scan_run(
                            running.scan, raw if replacement is None else replacement,
                            pos if replacement is None else 0,
                            row_end if replacement is None else len(replacement),
                            t == _d, running.matched, running.scan_skip,
                        )  # fmt: skip
                    if replacement is not None:
                        parts += (raw[fwd:pos], replacement)
                        fwd = row_end
                    if self.discarding:
                        # Cut off here: the rest of the run never reaches the client.
                        parts.append(raw[fwd:row_end])
                        fwd = end
                        break
                    pos = row_end
            elif t == _T:
                hidden = self._row_description(raw[start:end])
                if hidden:
                    parts += (raw[fwd:head], strip_description(raw[start:end], hidden))
                    fwd = end
            elif t in (_C, _I, _s):
                entry = fifo[0] if fifo else None
                if entry is None or entry.kind not in (EXECUTE, QUERY):
                    continue
                tag = CommandComplete.decode(raw[start:end]).tag if t == _C else ""
                running = self._current(entry)
                if running.withheld and tag:
                    # Rows need-to-know kept back are not in the client's count either.
                    tag = _recount(tag, running.withheld)
                    parts += (raw[fwd:head], CommandComplete(tag).encode())
                    fwd = end
                if running.durable_done is None:
                    # The audit trail could not persist this labelled read: it is refused.
                    parts += (raw[fwd:head], self._refuse_unaudited(running, out))
                    fwd = end
                    continue
                if not running.durable_done:
                    done = self._finished(running, tag, None, suspended=t == _s)
                    if self.durable and self._labelled(running):
                        # Hold CommandComplete (and all after it) until the event is
                        # persisted: libpq hands a result over only once it is complete.
                        running.durable_done = True
                        self.awaiting = running
                        self.server_pending = raw[head:] + self.server_reader.take_pending()
                        out += [
                            cmd.AwaitDurable(c) if isinstance(c, cmd.StatementDone) else c
                            for c in done
                        ]
                        # What came before it in this chunk (the rows, for a small result)
                        # waits too and leaves with the CommandComplete in one write: the
                        # client can do nothing with a result until it is complete, and a
                        # write now would only wake it to read half a result (and cost a
                        # system call and a context switch per labelled statement).
                        parts.append(raw[fwd:head])
                        self.client_pending += b"".join(parts)
                        return out
                    out += done
                if entry.kind == EXECUTE:
                    fifo.popleft()
                else:
                    entry.index += 1
                    entry.running = None
                if self.holding and running.decision is not None and running.decision.limited:
                    out += self._release()
            elif t == _E:
                err = ErrorResponse.decode(raw[start:end])
                if err.get("V") in ("FATAL", "PANIC") or err.get("S") in ("FATAL", "PANIC"):
                    self.server_sent_fatal = True
                if err.message.startswith("pgwarden: ") and err.get("W"):
                    # Our own refusal, raised by a DO block in place of the refused
                    # statement: the PL/pgSQL context and source position are noise.
                    parts += (raw[fwd:head], _without_context(err))
                    fwd = end
                elif self._withholds_text():
                    parts += (raw[fwd:head], _withheld(err, ErrorResponse))
                    fwd = end
                    out.append(cmd.Log("server_text_withheld", "info", {"sqlstate": err.sqlstate}))
                else:
                    self._scan_text(raw[start:end], 0)
                self._error(err, out)
            elif t == _NOTICE:
                if self._withholds_text():
                    notice = NoticeResponse.decode(raw[start:end])
                    parts += (raw[fwd:head], _withheld(notice, NoticeResponse))
                    fwd = end
                else:
                    self._scan_text(raw[start:end], 0)
            elif t == _NOTIFY:
                self._scan_text(raw[start:end], 4)
            elif t == _PS:
                if self.on_parameter is not None:
                    p = ParameterStatus.decode(raw[start:end])
                    self.on_parameter(p.name, p.value)
            elif t in (_ONE, _TWO, _THREE, _n):
                if fifo and fifo[0].kind == HIDDEN:
                    fifo.popleft()  # an answer to pgwarden's own Close or Parse
                    parts.append(raw[fwd:head])
                    fwd = end
                elif fifo and fifo[0].kind in (PARSE, BIND, CLOSE, DESCRIBE):
                    fifo.popleft()
            elif t == _COPY_OUT:
                if fifo and fifo[0].kind in (EXECUTE, QUERY):
                    running = self._current(fifo[0])
                    running.copy_out = True
                    running.copy_binary = end > start and raw[start] == 1
            elif t == _Z:
                forward, more = self._ready(raw[start:end])
                out += more
                if not forward:
                    parts.append(raw[fwd:head])
                    fwd = end
        parts.append(raw[fwd:])
        data_out = b"".join(parts)
        if self.client_pending:
            data_out = self.client_pending + data_out
            self.client_pending = b""
        return [cmd.SendToClient(data_out), *out] if data_out else out

    def _answering(self) -> Running | None:
        """The statement whose output the server is sending, if it is one that reads data
        (not a Parse, Bind or Describe)."""
        entry = self.fifo[0] if self.fifo else None
        if entry is not None and entry.kind == QUERY:
            return self._current(entry)
        if entry is not None and entry.kind == EXECUTE:
            return entry.running
        return None

    def _scan_text(self, body: bytes, skip: int) -> None:
        """An error, notice or notification the client receives: its text fields (after
        ``skip`` bytes) are looked for labelled values.  Each field is a code byte (a
        channel name for a notification) and a NUL-terminated string."""
        index = self.guard.value_index
        if index is None:
            return
        texts = [f[1:] if skip == 0 else f for f in body[skip:].split(b"\x00") if f]
        running = self._answering()
        index.scan_values(texts, running.matched if running is not None else self.loose_matched)

    def _withholds_text(self) -> bool:
        """Whether the statement the server is answering may not show its error or notice
        text to this client (``Guard.withholds_server_text``)."""
        running = self._answering()
        if running is None:
            return False  # Parse, Bind, Describe: no data has been read yet
        return self.guard.withholds_server_text(running.decision)

    def _labelled(self, running: Running) -> bool:
        d = running.decision
        return bool(running.keys) or (
            d is not None and bool(d.facts.output_labels) and running.rows > 0
        )

    def durable_result(self, ok: bool) -> list[cmd.Command]:
        """The audit trail answered for the statement whose CommandComplete is held."""
        running, self.awaiting = self.awaiting, None
        if running is None:
            return []
        if not ok:
            running.durable_done = None
        pending, self.server_pending = self.server_pending, b""
        if pending:
            return self.server_data(pending)
        held, self.client_pending = self.client_pending, b""
        return [cmd.SendToClient(held)] if held else []

    def _refuse_unaudited(self, running: Running, out: list[cmd.Command]) -> bytes:
        message = "pgwarden: this read of labelled data cannot be recorded in the audit trail, so it is refused"
        running.durable_done = True
        self.stats.policy_blocks += 1
        self.discarding = True
        head = self.fifo[0] if self.fifo else None
        self.cut_simple = head is not None and head.kind == QUERY
        if not self.cut_simple:
            self.skip_client_until_sync = True
            out += self._release()
        if head is not None and head.kind == EXECUTE:
            self.fifo.popleft()
        elif head is not None and head.kind == QUERY:
            # Its event was submitted when the CommandComplete was held (the trail stores it
            # once the store is back): ReadyForQuery must not record the statement again.
            head.running = None
            head.index = len(head.statements or ())
        return ErrorResponse.make(
            "58030", message, hint="the audit store is unavailable; try again when it is back"
        ).encode()

    def _current(self, entry: Entry) -> Running:
        if entry.running is None:
            decision = None
            if entry.statements:
                decision = entry.statements[min(entry.index, len(entry.statements) - 1)]
            entry.running = self._running(decision)
            if entry.holds is not None and entry.index < len(entry.holds):
                entry.running.hold, entry.holds[entry.index] = entry.holds[entry.index], None
        return entry.running

    def _row_description(self, body: bytes) -> int:
        """Note a RowDescription; returns how many of its last columns pgwarden appended
        (to be removed before the client sees it)."""
        # Kept as bytes: most results never need their columns decoded.
        if not self.fifo:
            return 0
        entry = self.fifo[0]
        if entry.kind == DESCRIBE:
            self.fifo.popleft()
            kind, name = entry.name[0], entry.name[1:]
            if kind == "S":
                self.statement_fields[name] = body
            elif (portal := self.portals.get(name)) is not None:
                portal.fields = body
            return entry.hidden
        if entry.kind == QUERY:
            running = self._current(entry)
            running.fields = body
            return _hidden(running.decision)
        return 0

    def _row(self, running: Running, raw: bytes, start: int, end: int, rows: int, copy: bool,
             out: list[cmd.Command]) -> bytes | None:  # fmt: skip
        """Count one DataRow (or CopyData); returns bytes to send instead of it, or None."""
        if not running.prepared:
            self._prepare(running, out)
        plan = running.decision.plan if running.decision is not None else None
        if plan is None or not running.watch:
            running.rows += rows
            running.nbytes += end - start
            return None
        size = end - start
        if plan.limits:
            limit_out = self._over_limit(running, plan, rows, size, out)
            if limit_out is not None:
                return limit_out
        running.rows += rows
        running.nbytes += size
        if copy:
            if running.copy_reader is not None and self._inspect_copy(running, raw[start:end], out):
                return self._cut_canary(running, plan, rows, size, out)
            return None
        return self._inspect(running, plan, raw, start, end, out)

    def _inspect_copy(self, running: Running, data: bytes, out: list[cmd.Command]) -> bool:
        """Rows of a COPY's output (one CopyData message's, or a run's joined): their record
        keys (ledger, windows, canary keys) and canary values.  Masks and need-to-know do
        not apply here: a COPY of data they would change is refused before it runs.
        Returns True when they hold a canary that refuses the result (not yet reported:
        the caller cuts the result off)."""
        reader = running.copy_reader
        plan = running.decision.plan if running.decision is not None else None
        assert reader is not None and plan is not None
        canary_values = plan.canary_search is not None and plan.canary_search(data, 0, len(data))
        capture = running.capture
        if (
            not canary_values and len(capture) == 1 and len(capture[0][1]) == 1
            and not (running.key_readers or plan.canary_keys or running.value_capture)
            and isinstance(reader, CopyRowReader)
        ):  # fmt: skip
            # One key column and nothing else to look for: all its values in one pass.
            keys = reader.column(data, capture[0][1][0])
            if keys is not None:
                running.keys.setdefault(capture[0][0], []).extend(keys)
                return False
        for fields in reader.rows(data):
            if canary_values and any(v in plan.canary_values for v in fields if v is not None):
                if plan.canary_cut is not None:
                    return True
                out += self._canary(running, plan)
                canary_values = False
            if self._capture(running, plan, fields, out):
                return True
        return False

    def _capture(
        self, running: Running, plan: ResultPlan, values: Sequence[bytes | None],
        out: list[cmd.Command],
    ) -> bool:  # fmt: skip
        """Record one row's primary keys (as text: binary-format keys are turned into it),
        or its labelled values where the result has no key, and see whether a key is a
        canary.  Returns True, keeping nothing, when a key is a canary that refuses the
        result: the row never reaches the client, so no one has seen it."""
        if plan.canary_cut is not None and plan.canary_keys and self._canary_key(running, values):
            return True
        for i, label in running.value_capture:
            if i < len(values) and (v := values[i]) is not None:
                running.values.setdefault(label, []).append(v)
        readers = running.key_readers
        for table, positions in running.capture:
            if positions[-1] >= len(values):
                continue
            if readers:
                if any(i in readers and readers[i] is None for i in positions):
                    continue  # a binary key of a type with no reader (logged)
                parts = [_read_key(readers, i, values[i]) for i in positions]
            else:
                parts = [values[i] for i in positions]
            key = parts[0] if len(parts) == 1 else pk_bytes(parts)
            if key is None:
                continue
            running.keys.setdefault(table, []).append(key)
            wanted = plan.canary_keys.get(table)
            if wanted and key.decode("utf-8", "replace") in wanted:
                out += self._canary(running, plan)
        return False

    def _canary_key(self, running: Running, values: Sequence[bytes | None]) -> bool:
        """Whether one of the row's record keys is a canary's."""
        plan = running.decision.plan if running.decision is not None else None
        assert plan is not None
        readers = running.key_readers
        for table, positions in running.capture:
            wanted = plan.canary_keys.get(table)
            if not wanted or positions[-1] >= len(values):
                continue
            if readers and any(i in readers and readers[i] is None for i in positions):
                continue
            parts = [_read_key(readers, i, values[i]) for i in positions]
            key = parts[0] if len(parts) == 1 else pk_bytes(parts)
            if key is not None and key.decode("utf-8", "replace") in wanted:
                return True
        return False

    def _over_limit(
        self, running: Running, plan: ResultPlan, rows: int, size: int, out: list[cmd.Command]
    ) -> bytes | None:
        """The cut-off error if these rows would pass a limit (alerts for those that only
        watch), else None."""
        earlier = 0
        if running.portal is not None and (portal := self.portals.get(running.portal)) is not None:
            earlier += portal.rows
        if running.cursor is not None:
            earlier += self.cursor_rows.get(running.cursor, 0)
        for limit in plan.limits:
            over_rows = (
                limit.max_rows is not None and earlier + running.rows + rows > limit.max_rows
            )
            over_bytes = limit.max_bytes is not None and running.nbytes + size > limit.max_bytes
            if not (over_rows or over_bytes):
                continue
            if limit.monitored or limit.action in (Action.ALLOW, Action.ALERT):
                out.append(
                    cmd.PolicyAlert(
                        self._who(running), limit.rule_id, limit.reason, limit.monitored
                    )
                )
                continue
            return self._cut(running, limit, out)
        return None

    def _shape(self, running: Running) -> tuple[ResultShape | None, tuple[int, ...]]:
        fields = running.fields
        formats: tuple[int, ...] = ()
        if running.portal is not None and (portal := self.portals.get(running.portal)) is not None:
            # A pipelined Describe's RowDescription may have come in after the Execute.
            fields = fields or portal.fields
            formats = portal.formats
        return (self.guard.result_shape(fields) if fields is not None else None), formats

    def _columns(self, running: Running) -> list[ColumnInfo]:
        shape, formats = self._shape(running)
        return self.guard.columns(running.decision, shape, formats)

    def _prepare(self, running: Running, out: list[cmd.Command]) -> None:
        """At a statement's first row: cross-check the analysis against the catalog and work
        out what must be watched."""
        running.prepared = True
        decision = running.decision
        running.scan = self.guard.value_index
        if running.scan is not None:
            shape, _formats = self._shape(running)
            if shape is not None:
                # Numbers, times, booleans and uuids cannot spell a name or an address.
                typed = frozenset(i for i, c in enumerate(shape.columns) if c[3] in _NO_TEXT_TYPES)
                running.scan_skip = typed
                if len(typed) == len(shape.columns):
                    running.scan = None
        # Appended columns (proxy.keyfetch) are removed from every row: none skips the walk.
        running.watch = _hidden(decision) > 0
        if decision is None or decision.plan is None:
            return
        if self.guard.watchful or self.ledger:
            shape, _formats = self._shape(running)
            missed = shape.labels - decision.facts.output_labels if shape is not None else None
            if missed:
                # A result column the catalog knows is labelled, which the analysis did not
                # see: treat it as labelled from here on, and say so.
                out.append(cmd.Log("analysis_miss", "warning", {
                    "labels": sorted(missed), "statement": decision.facts.normalized[:200],
                }))  # fmt: skip
                if running.hold is not None:  # judged again without its own hold
                    running.hold.release()
                decision = self.guard.redecide(decision, missed)
                running.hold = self._hold(decision)
                if decision.plan is None:
                    # Judged again with those labels, the statement is refused: it is
                    # already running, so its result is cut off at the first row.
                    decision = _refused_at_first_row(
                        decision, decision.verdict, ResultPlan(labels=missed)
                    )
                running.decision = decision
        plan = decision.plan
        if plan is None:  # a refusal's substitute: nothing of it is inspected
            plan = ResultPlan(labels=frozenset())
        facts = decision.facts
        if not (facts.output_labels or plan.limits or plan.needs_rows):
            # Nothing in this result is limited, captured or inspected (most statements an
            # audit trail follows): its rows are only counted.
            return
        if facts.output_labels and (self.ledger or plan.window_rules or plan.canary_keys):
            capture = [(k.relation, k.positions) for k in facts.record_keys]
            if not capture:
                running.columns = running.columns or self._columns(running)
                capture = [(c.pk_of, (i,)) for i, c in enumerate(running.columns) if c.pk_of]
            running.capture = tuple(capture)
            if self.ledger and not capture:
                # No primary key in the result: the ledger keeps keyed hashes of the labelled
                # values instead, so "who saw alice@example.com" still has an answer.
                running.value_capture = tuple(
                    (i, label)
                    for i, col in enumerate(running.columns or ())
                    for label in sorted(col.labels)
                )
            elif self.ledger and facts.value_positions:
                # Labelled columns no key in the row accounts for (a ticket number beside
                # the customer's key, another customer's email in a self-join): their values
                # too, or who-saw would never find that data.
                running.value_capture = tuple(
                    (i, label)
                    for i in facts.value_positions
                    for label in sorted(facts.output[i].labels)
                )
        know = []
        for check in plan.need_to_know:
            schema, _, table = check.table.partition(".")
            position = next(
                (i for i, col in enumerate(facts.output)
                 if names_record_by(col.sources, SourceColumn(schema, table, check.key_column))),
                None,
            )  # fmt: skip
            reader = None
            if check.table in facts.mixed_relations:
                # c.customer_id beside c2."Email" of a self-join: the key names one
                # customer, the row holds another's values.
                position = MIXED_KEY
            elif position is None:
                position = NO_KEY
            else:
                if running.columns is None:
                    running.columns = self._columns(running)
                col = running.columns[position] if position < len(running.columns) else None
                if col is not None and col.binary and col.type_oid not in _BINARY_AS_TEXT:
                    # The lookup's keys are text; a binary integer or uuid key is turned
                    # into text, any other binary key cannot be compared.
                    reader = _BINARY_KEY_READERS.get(col.type_oid)
                    position = position if reader is not None else BINARY_KEY
            know.append(
                (
                    check,
                    position,
                    self.guard.allowed_keys(check.rule_id, decision.person, fresh=False)
                    or frozenset(),
                    reader,
                )
            )
        running.know = tuple(know)
        if running.capture:
            self._key_readers(running, out)
        running.watch = bool(
            plan.limits or plan.needs_rows or running.capture or running.value_capture
            or decision.hidden  # every row passes through strip_row
        )  # fmt: skip
        if running.capture and not (
            plan.mask or running.know or running.value_capture or running.key_readers
        ):
            running.key_upto = max(max(positions) for _table, positions in running.capture)
            if (
                len(running.capture) == 1
                and len(running.capture[0][1]) == 1
                and not (plan.limits or plan.canary_search or plan.canary_keys)
            ):
                running.key_list = running.keys.setdefault(running.capture[0][0], [])
        if running.copy_out and (
            running.capture or running.value_capture or plan.canary_keys or plan.canary_search
        ):
            running.copy_reader = reader_for(facts.copy_options, running.copy_binary)
            running.copy_bulk = not (plan.limits or plan.canary_cut)
        if running.columns is None and (
            plan.mask or any(k.mask_style is not None for k in plan.need_to_know)
        ):
            running.columns = self._columns(running)

    def _key_readers(self, running: Running, out: list[cmd.Command]) -> None:
        """Record keys are kept as text, as responders type them and as need-to-know and the
        windows compare them.  A key column the client asked for in binary format (asyncpg
        does for integers) gets a reader that turns it into its text."""
        readers: dict[int, Callable[[bytes], bytes] | None] = {}
        if running.copy_out:
            if not running.copy_binary:
                return
            # Binary COPY output says nothing of its types: the catalog's give the readers.
            assert running.decision is not None
            for k in running.decision.facts.record_keys:
                for column, i in zip(k.columns, k.positions, strict=True):
                    type_name = self.guard.column_type(k.relation, column) or ""
                    if not type_name.startswith(_TEXT_TYPE_NAMES):
                        readers[i] = _BINARY_KEY_READERS_BY_NAME.get(type_name)
        else:
            shape, formats = self._shape(running)
            if not any(formats) and not (shape is not None and any(c[1] for c in shape.columns)):
                return  # all text: the common case, decided without building column info
            running.columns = running.columns or self._columns(running)
            for _table, positions in running.capture:
                for i in positions:
                    col = running.columns[i] if i < len(running.columns) else None
                    if col is None or not col.binary or col.type_oid in _BINARY_AS_TEXT:
                        continue
                    readers[i] = _BINARY_KEY_READERS.get(col.type_oid)
        running.key_readers = readers
        if any(r is None for r in readers.values()):
            out.append(cmd.Log("ledger_key_unreadable", "warning", {
                "reason": "a record key column comes in a binary format pgwarden cannot turn "
                          "into text; those keys are not in the ledger or the windows",
                "statement": running.decision.facts.normalized[:200]
                if running.decision is not None else "",
            }))  # fmt: skip

    def _inspect(
        self, running: Running, plan: ResultPlan, raw: bytes, start: int, end: int,
        out: list[cmd.Command],
    ) -> bytes | None:  # fmt: skip
        """One DataRow (``raw[start:end]``) of a watched result; returns bytes to send
        instead of it, or None."""
        columns = running.columns or []
        values: tuple[bytes | None, ...] | None = None
        if plan.canary_search is not None and plan.canary_search(raw, start, end):
            values = row_values(raw, start, end)
            if any(v in plan.canary_values for v in values if v is not None):
                if plan.canary_cut is not None:
                    return self._cut_canary(running, plan, 1, end - start, out)
                out += self._canary(running, plan)
        if not (
            plan.mask or running.capture or plan.canary_keys or running.know
            or running.value_capture
        ):  # fmt: skip
            return None
        if values is None:
            # Only the key columns when nothing else reads the row (the common ledger case).
            values = row_values(raw, start, end, running.key_upto)
        know_mask: str | None = None  # a need-to-know rule lets this row pass masked
        for check, position, allowed, reader in running.know:
            key = values[position] if 0 <= position < len(values) else None
            if key is not None and reader is not None:
                key = reader(key)
            if key is not None and key in allowed:
                continue
            if check.monitored:
                out.append(cmd.PolicyAlert(self._who(running), check.rule_id,
                                           f"a row of {check.table} outside the need-to-know lookup", True))  # fmt: skip
                continue
            if position < 0:
                return self._cut(running, None, out, know=check)
            if check.withhold:
                running.withheld += 1
                running.rows -= 1
                return b""
            if check.mask_style is not None:
                know_mask = know_mask or check.mask_style
                continue
            return self._cut(running, None, out, know=check)
        if (running.capture or running.value_capture) and self._capture(running, plan, values, out):
            return self._cut_canary(running, plan, 1, end - start, out)
        if not plan.mask and know_mask is None:
            return None
        masked = list(values)
        changed = False
        for i, col in enumerate(columns[: len(values)]):
            styles = [plan.mask[lb] for lb in sorted(col.labels) if lb in plan.mask]
            if know_mask is not None and col.labels:
                styles.append(know_mask)
            current = masked[i]
            if not styles or current is None:
                continue
            if col.binary:
                return self._cut(running, None, out)
            style = styles[0]
            if col.derived and style == "partial":
                # reverse(email) under a partial mask would show the local part, a row
                # constructor the phone beside the masked email: mask such values whole.
                style = "redact"
            if col.type_oid not in _TEXT_TYPES:
                # length(email) is an integer, string_to_array(email, '@') an array: a
                # masked text in their place breaks the client's decoding; NULL does not.
                masked[i] = None
            else:
                masked[i] = mask_value(current, style, self.guard.record_key)
            changed = True
        return DataRow(tuple(masked)).encode() if changed else None

    def _cut_canary(
        self, running: Running, plan: ResultPlan, rows: int, size: int, out: list[cmd.Command]
    ) -> bytes:
        """A row about to go out holds a canary: it never reaches the client.  The result is
        cut off there, and the rule's action (a quarantine) is in force before the client's
        next statement is judged."""
        running.rows -= rows
        running.nbytes -= size
        cutting = plan.canary_cut
        assert cutting is not None
        for f in plan.canary_rules:
            if f is not cutting:
                out += [cmd.CanaryHit(self._who(running), f.rule_id, f.action.value, f.monitored)]
        self.pending_counts += 1
        out.append(cmd.CanaryHit(
            self._who(running), cutting.rule_id, cutting.action.value, False, blocked=True,
            hold=True,
        ))  # fmt: skip
        return self._cut(running, None, out, canary=cutting)

    def _cut(
        self, running: Running, limit: RowLimit | None, out: list[cmd.Command],
        know: KnowCheck | None = None, canary: Finding | None = None,
    ) -> bytes:  # fmt: skip
        """End the result here: our error to the client; cancel and discard upstream."""
        if canary is not None:
            rule, action = canary.rule_id, canary.action
            message = (f"pgwarden: blocked by rule {rule}: the result holds a canary record, "
                       "planted data that no task reads")  # fmt: skip
            hint = "the security team has been alerted"
        elif know is not None:
            rule, action = know.rule_id, Action.BLOCK
            position = next((p for k, p, _, _ in running.know if k is know), 0)
            if position == NO_KEY:
                message = (f"pgwarden: blocked by rule {rule}: need-to-know cannot be checked, the "
                           f"result does not carry {know.table}.{know.key_column}")  # fmt: skip
                unkeyed = running.decision.unkeyed if running.decision is not None else None
                if unkeyed:
                    message += f" and pgwarden cannot add it: {unkeyed}"
                hint = f"select {know.key_column} as well, so each row can be checked"
            elif position == MIXED_KEY:
                message = (f"pgwarden: blocked by rule {rule}: need-to-know cannot be checked, a row "
                           f"can hold values of several {know.table} rows (the statement reads it "
                           "more than once, or mixes rows), and one key cannot vouch for them all")  # fmt: skip
                hint = f"read {know.table} once, joined on {know.key_column}"
            elif position == BINARY_KEY:
                message = (f"pgwarden: blocked by rule {rule}: need-to-know cannot be checked, "
                           f"{know.table}.{know.key_column} was requested in binary format")  # fmt: skip
                hint = f"request {know.key_column} in text format"
            else:
                message = f"pgwarden: blocked by rule {rule}: a row of {know.table} outside what you need to know"
                hint = f"only {know.table} rows related to your own work can be read"
        elif limit is not None:
            rule, action = limit.rule_id, limit.action
            message = f"pgwarden: blocked by rule {rule}: {limit.reason}"
            if limit.max_rows is not None:
                hint = f"{limit.max_rows} rows is the most allowed; narrow the query with WHERE or LIMIT"
            else:
                hint = f"at most {limit.max_bytes} bytes of labelled data per statement"
        else:
            rule, action = "mask-binary", Action.BLOCK
            message = (
                f"pgwarden: blocked by rule {rule}: a masked column was requested in binary format"
            )
            hint = "request this result in text format; masking rewrites text values"
        self.stats.results_cut += 1
        if canary is None:  # a canary's refusal was reported with its CanaryHit
            out.append(
                cmd.PolicyBlock(
                    self._who(running),
                    rule,
                    action.value,
                    message,
                    running.decision.facts if running.decision else None,
                )
            )
        if not self.cancel_sent:
            # The client's next messages wait until the cancel request has reached the
            # server: one that lands after the cut statement has finished (it often has:
            # the rows were already on their way) would cancel the client's next statement.
            self.pending_counts += 1
            out.append(cmd.CancelUpstream(hold=True))
            self.cancel_sent = True
        out += self._finished(running, "", "42501", cut=rule)
        self.discarding = True
        head = self.fifo[0] if self.fifo else None
        self.cut_simple = head is not None and head.kind == QUERY
        if self.cut_simple and head is not None and head.running is running:
            # Its event is written: when the server's ReadyForQuery comes in the same read
            # (a small result the server had finished), it must not be written again as an
            # allowed statement with the same rows and records (as the server fails the rest
            # of the string after an error).
            head.running = None
            head.index = len(head.statements or ())
        if action is Action.END_SESSION:
            out.append(cmd.EndSession(message))
        if not self.cut_simple:
            # Extended protocol: what the client pipelined up to its Sync is skipped, as the
            # server skips after an error; held messages are judged now.
            self.skip_client_until_sync = True
            out += self._release()
        return ErrorResponse.make("42501", message, hint=hint).encode()

    def _skip_to_sync(self) -> None:
        fifo = self.fifo
        while fifo and fifo[0].kind not in _SYNC_POINTS:
            _let_go(fifo.popleft())

    def _error(self, err: ErrorResponse, out: list[cmd.Command]) -> None:
        self.cycle_failed = True
        fifo = self.fifo
        if not fifo:
            return
        entry = fifo[0]
        running = entry.running
        if entry.kind == QUERY:
            running = self._current(entry)
            entry.index = len(entry.statements or ())
            entry.running = None
        if running is not None:
            out += self._finished(running, "", err.sqlstate or "")
        if entry.kind != QUERY:
            self._skip_to_sync()  # extended protocol: the server now skips to Sync
        if self.holding:
            # The watched statement failed by itself: what was held is judged as usual.
            out += self._release()

    def _ready(self, body: bytes) -> tuple[bool, list[cmd.Command]]:
        """ReadyForQuery: returns whether to forward it, and commands."""
        status = chr(body[0]) if body else "I"
        out: list[cmd.Command] = []
        # Copies of labelled data count from their commit: a transaction that failed ('E')
        # or an implicit one an error ended ('I' after an error) rolls them back.
        if status == "E" or (status == "I" and self.cycle_failed):
            self.uncommitted_copies.clear()
        elif status == "I":
            self._commit_copies()
        self.cycle_failed = False
        self._skip_to_sync()
        entry = self.fifo.popleft() if self.fifo else None
        if entry is not None and entry.kind == FIXUP:
            # The forced failure after a cut-off is answered: the client gets this
            # ReadyForQuery ('E') in place of the one we held back.
            self.discarding = False
            self.cancel_sent = False
            self.transaction_status = status
            return True, out + self._release()
        if entry is not None and entry.running is not None:
            out += self._finished(entry.running, "", None)
        if entry is not None:
            _let_go(entry)  # statements of the string that never ran
        if self.cycles:
            self.stats.observe_latency(time.perf_counter() - self.cycles.popleft())
        if self.discarding:
            if self.cut_simple and status == "T":
                # The cancel came too late: the statement succeeded inside a transaction
                # block the client now believes failed. Make it fail on the server too, or
                # the client's COMMIT would commit what it was told had failed.
                self.fifo.appendleft(Entry(FIXUP))
                out.append(
                    cmd.SendToServer(
                        Query(raise_statement("pgwarden: result cut off", None, "42501")).encode()
                    )
                )
                return False, out
            self.discarding = False
            self.cancel_sent = False
            self.transaction_status = status
            return True, out + (self._release() if self.cut_simple else [])
        self.transaction_status = status
        if status == "I":
            self.guard.sql.end_transaction()
        return True, out

    def _forget_renamed(self, decisions: list[Decision]) -> None:
        """SQL PREPARE, DEALLOCATE and DISCARD reach the statements the protocol names too
        (one namespace): a name pgwarden saw Parsed may now be another statement, which a
        Bind must not run as the one judged."""
        for d in decisions:
            kind = d.facts.kind
            if kind in ("prepare", "deallocate"):
                if d.facts.prepared_name is None:
                    self.prepared.clear()  # DEALLOCATE ALL
                else:
                    self.prepared.pop(d.facts.prepared_name, None)
            elif kind == "discard":
                self.prepared.clear()

    def _unbound(self, portal_name: str) -> Decision | None:
        return self.guard.unfollowed(
            f"<Execute of portal {portal_name!r}>",
            "an Execute of a portal this session did not Bind (a SQL cursor) reads rows "
            "pgwarden judges only at FETCH",
            "read the cursor with FETCH",
        )

    def _more_than_learned(
        self, running: Running, decision: Decision, rows: int
    ) -> list[cmd.Command]:
        """An alert when a statement of a listed shape returned more rows than any statement
        of that shape did while its allow-list was learned (the same lookup, now a sweep)."""
        engine = self.guard.engine
        out: list[cmd.Command] = []
        fp = decision.facts.fingerprint
        for rule in engine.rules_for(engine.subjects_of(decision.subject)):
            allow = engine.allow_lists.get(rule.id)
            if allow is None:
                continue
            most = allow.max_records.get(fp)
            if most is not None and rows > max(most, 1):
                out.append(cmd.PolicyAlert(
                    self._who(running), rule.id,
                    f"a statement of shape {fp} returned {rows} rows; at most {most} were "
                    f"seen while {Path(allow.path).name} was learned",
                    (rule.mode or engine.policy.mode) is Mode.MONITOR,
                ))  # fmt: skip
        return out

    def _finished(self, running: Running, tag: str, sqlstate: str | None, *, suspended: bool = False,
                  cut: bool | str = False) -> list[cmd.Command]:  # fmt: skip
        if (
            running.portal is not None
            and suspended
            and (portal := self.portals.get(running.portal))
        ):
            portal.rows += running.rows
        if running.cursor is not None:
            self.cursor_rows[running.cursor] = (
                self.cursor_rows.get(running.cursor, 0) + running.rows
            )
        decision = running.decision
        if decision is not None and sqlstate is None:
            self._copies_done(decision.facts.copies, tag)
        rows = running.rows
        # MOVE's tag counts the rows it skipped, none of which the client received.
        if tag and not tag.startswith("MOVE") and not (decision is not None and decision.limited):
            last = tag.rsplit(" ", 1)[-1]
            if last.isdigit():
                rows = int(last)
        out: list[cmd.Command] = []
        plan = decision.plan if decision is not None else None
        keyed_by_capture = bool(running.keys)
        labels = plan.labels if plan is not None else frozenset()
        if running.matched or self.loose_matched:
            # Records in a result the analysis found no label in (a temporary table read
            # back, say) count in the windows under their table's labels.
            labels = labels | self._merge_matched(running, plan, out)
        if decision is not None and rows and self.guard.engine.allow_lists:
            out += self._more_than_learned(running, decision, rows)
        if plan is not None and labels and plan.window_rules and rows:
            who = self._who(running)
            records: set[str] = set()
            for table, keys in running.keys.items():
                records.update(self.guard.record_id(table, k) for k in keys)
            # No primary key in the result, or labelled columns no key in the row accounts
            # for (another customer's email beside a key that never changes): count each
            # row as its own record (fail closed) for the labels concerned.
            # Named uniquely: an id() of the Running comes back for a later statement (and
            # the same in another worker), which made its rows the "same" records again.
            facts = decision.facts if decision is not None else None
            loose: set[str] = set()
            if records and facts is not None:
                for i in facts.value_positions:
                    loose |= facts.output[i].labels
            # Records only value matching found (a packed result): counted, and each row as
            # well, as when none were found, should a value have escaped it.
            matched_only = bool(records) and not keyed_by_capture and bool(plan.labels)
            by_row: frozenset[str] = frozenset()
            if loose or not records or matched_only:  # most results carry their key
                uniq = uuid.uuid4().hex
                # A row of a self-join (or of two subqueries over the table) carries as
                # many records as the statement reads the table.
                per_row = facts.records_per_row if facts is not None else 1
                by_row = frozenset(f"row:{uniq}:{i}" for i in range(rows * per_row))
            keyed = frozenset(records) if records else by_row
            if matched_only:
                keyed |= by_row
            for label in labels:
                windows = tuple(
                    r.window for r in plan.window_rules if r.window and r.covers_label(label)
                )
                if windows:
                    self.pending_counts += 1
                    seen = by_row if label in loose else keyed
                    out.append(cmd.RecordUsage(who, label, rows, seen, windows))
            # Per rule as well: a rule over several labels limits distinct records carrying
            # any of them, or 200 emails, then 200 other customers' phones, then 200 more
            # names would each pass a per-label count.
            # And per budget: a rule ``per: db_user`` counts all end users of the database
            # user together, so a new end-user name per statement starts no new budget.
            assert decision is not None
            for r in plan.window_rules:
                covered = [label for label in labels if r.covers_label(label)]
                if r.window and covered:
                    seen = by_row if loose.intersection(covered) else keyed
                    for key in dict.fromkeys(budget_key(per, decision.subject) for per in r.per):
                        self.pending_counts += 1
                        label = window_rule_key(r.id)
                        hold = running.hold.take((key, label, r.window)) if running.hold else None
                        out.append(cmd.RecordUsage(key, label, rows, seen, (r.window,), hold))
        if running.hold is not None:
            running.hold.release()  # what was not read (the usage above gives back the rest)
            running.hold = None
        if not (self.ledger or (decision is not None and decision.facts.is_ddl)):
            return out  # nobody consumes the event (no audit trail, catalog unchanged)
        out.append(
            cmd.StatementDone(
                facts=decision.facts if decision is not None else None,
                rows=rows,
                nbytes=running.nbytes,
                seconds=time.perf_counter() - running.started,
                sqlstate=sqlstate,
                cut=cut,
                records=running.keys,
                values=running.values,
                end_user=(
                    decision.subject if decision is not None else self.guard.subject
                ).end_user,
                rule_ids=_rule_ids(decision, cut),
                verdict=_verdict(decision, cut, sqlstate),
                text=decision.text if decision is not None else None,
            )
        )
        return out

    def _merge_matched(
        self, running: Running, plan: ResultPlan | None, out: list[cmd.Command]
    ) -> frozenset[str]:
        """Records value matching found in what the statement sent the client join the keys
        its rows carried (the ledger and the windows count them alike), and a canary's
        record among them raises the canary rules.  Returns the labels of the tables of
        records the rows did not carry the keys of."""
        matched = running.matched
        if self.loose_matched:
            for table, loose in self.loose_matched.items():
                matched.setdefault(table, set()).update(loose)
            self.loose_matched = {}
        canary = False
        labels: set[str] = set()
        for table, found in matched.items():
            keys = running.keys.setdefault(table, [])
            have = set(keys)
            new = sorted(k for k in found if k not in have)
            keys.extend(new)
            if new:
                labels |= self.guard.table_labels(table)
            wanted = plan.canary_keys.get(table) if plan is not None else None
            if wanted and any(k.decode("utf-8", "replace") in wanted for k in new):
                canary = True
        running.matched = {}
        if canary and plan is not None:
            out += self._canary(running, plan)
        return frozenset(labels)

    def _copies_done(self, copies: Sequence[DataCopy], tag: str) -> None:
        """A statement succeeded: labelled data it copied into tables counts once its
        transaction commits (``_ready``, or a COMMIT in the same string); a ROLLBACK drops
        it. Files on the server are written whatever the transaction does."""
        for cp in copies:
            if cp.labels:
                if cp.target == SERVER_FILES_TARGET:
                    self.guard.analyzer.note_copies((cp,))
                else:
                    self.uncommitted_copies.append(cp)
        if tag in ("COMMIT", "COMMIT PREPARED", "PREPARE TRANSACTION"):
            # Prepared: it may yet be rolled back, but counting it now only errs on the side
            # of labelling (ROLLBACK TO SAVEPOINT errs the same way: what it undid counts).
            self._commit_copies()
        elif tag == "ROLLBACK":
            self.uncommitted_copies.clear()

    def _commit_copies(self) -> None:
        if self.uncommitted_copies:
            copies, self.uncommitted_copies = self.uncommitted_copies, []
            self.guard.analyzer.note_copies(copies)

    def _who(self, running: Running) -> str:
        """The subject key a statement's counters, alerts and blocks go under."""
        d = running.decision
        return (d.subject if d is not None else self.guard.subject).key

    def _canary(self, running: Running, plan: ResultPlan) -> list[cmd.Command]:
        return [
            cmd.CanaryHit(self._who(running), f.rule_id, f.action.value, f.monitored)
            for f in plan.canary_rules
        ]


def _let_go(entry: Entry) -> None:
    """Give back what an entry's statements still hold of their windows."""
    if entry.running is not None and entry.running.hold is not None:
        entry.running.hold.release()
    for hold in entry.holds or ():
        if hold is not None:
            hold.release()


def _refused_at_first_row(decision: Decision, verdict: Verdict, plan: ResultPlan) -> Decision:
    """``decision`` for a statement the server is already running, whose verdict is now a
    refusal: allowed with a limit of no rows, so its result is cut at the first row with
    the refusal's reason (a statement the server has parsed can no longer be replaced)."""
    prefix = f"pgwarden: blocked by rule {verdict.rule_id}: "
    reason = verdict.message.removeprefix(prefix)
    stop = RowLimit(verdict.rule_id or "", 0, None, plan.labels, reason, verdict.action, False)
    return replace(
        decision,
        verdict=Verdict(Action.ALLOW, findings=verdict.findings,
                        plan=replace(plan, limits=(stop, *plan.limits))),
    )  # fmt: skip


def _refusal_portal(verdict: Verdict, portal: str) -> bytes:
    """Close, Parse and Bind that make ``portal`` a portal of pgwarden's refusal statement
    (made anew each time; their CloseComplete and ParseComplete are not the client's)."""
    sub = raise_statement(verdict.message, verdict.hint, verdict.sqlstate)
    return (
        Close("S", REFUSAL_STATEMENT).encode()
        + Parse(REFUSAL_STATEMENT, sub).encode()
        + Bind(portal, REFUSAL_STATEMENT).encode()
    )


def _failing_extended() -> bytes:
    sql = raise_statement("pgwarden: result cut off", None, "42501")
    return Parse("", sql).encode() + Bind("", "").encode() + Execute("").encode()


# Types whose text form a mask may take ('****', 'a***@example.com'): text, varchar, bpchar,
# name, and columns whose type is not known (0).
_TEXT_TYPES = frozenset({0, 19, 25, 705, 1042, 1043})
# Types whose text form is a number, a time, a boolean or a uuid: value matching skips them.
_NO_TEXT_TYPES = frozenset(
    {16, 20, 21, 23, 26, 700, 701, 790, 1082, 1083, 1114, 1184, 1186, 1266, 1700, 2950}
)

# Fields of a server error or notice that say what kind of failure, never a value: kept.
# Not the schema, table, column, data type and constraint names (s t c d n): a function's
# RAISE ... USING COLUMN = <anything> fills them with whatever it likes.
_NAMING_FIELDS = frozenset("SVCPpFLR")


def _withheld(err: ErrorResponse, kind: type[ErrorResponse]) -> bytes:
    """``err`` with its message, detail, hint, context and the names it gives (schema,
    table, column, constraint) replaced by pgwarden's sentence; its severity, SQLSTATE and
    position stay, so a client still knows what kind of failure it was."""
    sqlstate = err.sqlstate or "XX000"
    what = "error" if kind is ErrorResponse else "notice"
    kept = [(k, v) for k, v in err.fields if k in _NAMING_FIELDS]
    kept.append((
        "M",
        f"pgwarden: the server's {what} text is withheld (SQLSTATE {sqlstate}): the "
        "statement reads labelled data, and such text can quote it",
    ))  # fmt: skip
    return kind(tuple(kept)).encode()


def _without_context(err: ErrorResponse) -> bytes:
    return ErrorResponse(tuple((k, v) for k, v in err.fields if k not in "WFLRqP")).encode()


def _copy_payloads(raw: bytes, pos: int, end: int) -> list[bytes]:
    """The data of each message of a run of CopyData messages."""
    parts = []
    while pos < end:
        (length,) = _LENGTH.unpack_from(raw, pos + 1)
        parts.append(raw[pos + 5 : pos + 1 + length])
        pos += 1 + length
    return parts


def _copy_rows(raw: bytes, pos: int, end: int, binary: bool = False) -> int:
    """Rows in a run of CopyData messages: lines of text or CSV (a message's header may
    hold a newline byte, so each is counted within its data), or for binary COPY one tuple
    per message (PostgreSQL's way; the header rides with the first) but the trailer's."""
    rows = 0
    while pos < end:
        (length,) = _LENGTH.unpack_from(raw, pos + 1)
        if binary:
            rows += raw[pos + 5 : pos + 1 + length] != _BINARY_TRAILER
        else:
            rows += raw.count(b"\n", pos + 5, pos + 1 + length)
        pos += 1 + length
    return rows


_BINARY_TRAILER = b"\xff\xff"


def _lead_key_rows(
    raw: bytes, keys: list[bytes], limit: int, column: int = 0, pos: int = 0,
    end: int | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Append the value at ``column`` of each whole DataRow from ``raw[pos]`` (up to ``end``)
    to ``keys``; return where the rows end and how many there were.  Stops at any other
    message, an incomplete one, or a row that is not plainly well formed or has a NULL key
    (the general path then reads it, and reports what is wrong)."""
    n = len(raw) if end is None else end
    if column:
        return _lead_key_rows_at(raw, keys, limit, column, pos, n)
    last = n - 11  # the last offset where a row's header and first value's size fit
    had = len(keys)
    unpack = _ROW_FRAME.unpack_from
    append = keys.append
    while pos <= last:
        # Unsigned sizes: a NULL (-1) fails the bounds check below, and so does a row too
        # short to hold its first value, or with no columns (10 + size > length).
        t, length, size = unpack(raw, pos)
        row_end = pos + 1 + length
        pos += 11
        if t != _D or pos + size > row_end or row_end > n or length > limit:
            pos -= 11
            break
        append(raw[pos : pos + size])
        pos = row_end
    return pos, len(keys) - had


def _lead_key_rows_at(
    raw: bytes, keys: list[bytes], limit: int, column: int, pos: int, n: int
) -> tuple[int, int]:
    """:func:`_lead_key_rows` for a key that is not the first column: the values before it
    are skipped by their sizes."""
    last = n - 11
    had = len(keys)
    unpack = _ROW_FRAME_COLS.unpack_from
    size_at = _U32.unpack_from
    append = keys.append
    while pos <= last:
        t, length, ncols, size = unpack(raw, pos)
        row_end = pos + 1 + length
        if t != _D or row_end > n or length > limit or ncols <= column:
            break
        p = pos + 11
        for _ in range(column):
            if size != _NULL_SIZE:
                p += size
            if p + 4 > row_end:
                break
            (size,) = size_at(raw, p)
            p += 4
        else:
            if p + size <= row_end:  # a NULL key (2**32 - 1) is not
                append(raw[p : p + size])
                pos = row_end
                continue
        break
    return pos, len(keys) - had


def _scan_run(
    index: ValueIndex, raw: bytes, pos: int, end: int, copy: bool, found: dict[str, set[bytes]],
    skip: frozenset[int] = frozenset(),
) -> None:  # fmt: skip
    """Look for labelled values in a run of DataRow (or CopyData) messages ``raw[pos:end]``
    that goes to the client whole, but for the columns in ``skip``."""
    if copy:
        index.scan_values(_copy_payloads(raw, pos, end), found)
        return
    while pos < end:
        (length,) = _LENGTH.unpack_from(raw, pos + 1)
        row_end = pos + 1 + length
        values = row_values(raw, pos + 5, row_end)
        if skip:
            values = tuple(v for i, v in enumerate(values) if i not in skip)
        index.scan_values(values, found)
        pos = row_end


def _collect_keys(raw: bytes, pos: int, end: int, column: int, keys: list[bytes]) -> None:
    """Append the value at ``column`` of each DataRow in ``raw[pos:end]`` (a run whose frames
    ``feed_runs`` checked) to ``keys``: the lead walker's loop, and at a row it will not take,
    the general reader, which skips a NULL key and refuses a malformed row."""
    while pos < end:
        pos, _rows = _lead_key_rows(raw, keys, SERVER_MESSAGE_LIMIT, column, pos, end)
        if pos >= end:
            return
        (length,) = _LENGTH.unpack_from(raw, pos + 1)
        row_end = pos + 1 + length
        values = row_values(raw, pos + 5, row_end, column)
        if len(values) <= column:
            raise ProtocolError("malformed DataRow: fewer columns than its result has")
        if (key := values[column]) is not None:
            keys.append(key)
        pos = row_end


def _binary_int(value: bytes) -> bytes:
    return str(int.from_bytes(value, "big", signed=True)).encode()


def _binary_uuid(value: bytes) -> bytes:
    return str(uuid.UUID(bytes=value)).encode()


# int8, int2, int4, uuid: binary key values whose text pgwarden can give
_BINARY_KEY_READERS: dict[int, Callable[[bytes], bytes]] = {
    20: _binary_int, 21: _binary_int, 23: _binary_int, 2950: _binary_uuid,
}  # fmt: skip
# The same by the catalog's type names (binary COPY output carries no type OIDs); text
# types' binary form is their text.
_BINARY_KEY_READERS_BY_NAME: dict[str, Callable[[bytes], bytes]] = {
    "bigint": _binary_int, "smallint": _binary_int, "integer": _binary_int,
    "uuid": _binary_uuid,
}  # fmt: skip
_TEXT_TYPE_NAMES = ("text", "character varying", "character", "name")


def _read_key(
    readers: dict[int, Callable[[bytes], bytes] | None], i: int, value: bytes | None
) -> bytes | None:
    reader = readers.get(i)
    return value if value is None or reader is None else reader(value)


def _rule_ids(decision: Decision | None, cut: bool | str) -> tuple[str, ...]:
    if decision is None:
        return ()
    v = decision.verdict
    if not v.findings and not isinstance(cut, str):
        # Nearly every statement: no rule had anything to say (the audit trail asks for
        # every one of them).
        return (v.rule_id,) if v.rule_id else ()
    ids = [f.rule_id for f in v.findings]
    if v.rule_id:
        ids.append(v.rule_id)
    if isinstance(cut, str):
        ids.append(cut)
    return tuple(dict.fromkeys(ids))


def _verdict(decision: Decision | None, cut: bool | str, sqlstate: str | None) -> str:
    if cut:
        return "limit"
    if decision is None:
        return "allow"
    v = decision.verdict
    if v.blocks:
        return "block"
    plan = v.plan
    if plan is not None and plan.mask:
        return "mask"
    if v.findings and any(f.monitored for f in v.findings):
        return "monitor"
    return "allow"


def _recount(tag: str, withheld: int) -> str:
    head, _, last = tag.rpartition(" ")
    if not last.isdigit():
        return tag
    return f"{head} {max(0, int(last) - withheld)}"


def _hidden(decision: Decision | None) -> int:
    """Columns pgwarden appended to the statement (proxy.keyfetch), kept from the client."""
    return decision.hidden if decision is not None else 0
