"""The audit pipeline: redact -> enrich -> ledger -> chain -> write.

::

    trail = AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path="audit.db")]))
    await trail.start()
    receipt = await trail.submit(event)   # resolves once a durable sink has committed it
    trail.submit_nowait(event)            # fire and forget (unlabelled statements)
    await trail.close()                   # flushes, writes a final checkpoint

``submit`` only puts the event on a bounded queue.  A dispatcher task takes whatever has
queued up as one batch (events nobody awaits first linger up to ``batch_linger_s`` for
company), seals it (record building, redaction, ledger digests, hashing, checkpoint signing)
and hands it to every sink's own bounded queue.  An ordinary batch is sealed right there on
the event loop: that takes a few microseconds an event, less than handing it to another
thread and back costs while the loop is busy.  A batch that is very large, carries a big
ledger or is due a checkpoint (a signature, maybe an fsync of the checkpoint file) goes to a
single chainer thread instead, so a 100k-key ledger never stalls the proxy.  Each sink
writes its queue in order; the first durable sink to commit a batch resolves the batch's
futures, and if every durable sink fails they raise :class:`AuditUnavailable` -- the proxy
then fails the labelled read closed.

Backpressure: when sinks are slow the sink queues fill, the dispatcher waits, the main queue
fills, and ``submit`` either waits for room (``overflow="block"``) or fails at once
(``overflow="raise"``).  Nothing grows without bound.  A sink that stays stuck for
``sink_stall_s`` stops holding the others up: its batches are set aside for it (and a write
that failed is kept) to be written in order once it recovers, up to ``queue_size`` events;
past that it loses batches (alerted; ``verify`` on that store shows the gap).  ``submit``'s
awaitable gives up after ``durable_timeout_s`` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from audit.alerts import Alert, Alerter, Channel, SyslogChannel, WebhookChannel
from audit.chain import Chain, checkpoint_message, key_id, load_signing_key
from audit.events import AuditEvent, EventKind, Record, Subject
from audit.ledger import LedgerGroup, RecordHasher, ledger_count, ledger_digest, load_key
from audit.redact import redact_message, redact_sql
from audit.sinks import Sealed, Sink, SinkError
from audit.sinks.jsonl import JsonlSink
from audit.sinks.postgres import PostgresSink
from audit.sinks.sqlite import SQLiteSink

log = structlog.get_logger("pgwarden.audit")


# --- configuration --------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SQLiteSinkConfig(_Model):
    type: Literal["sqlite"] = "sqlite"
    path: Path
    # FULL: fsync the WAL at every (group) commit.  NORMAL survives a process crash but not a
    # power cut.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"


class PostgresSinkConfig(_Model):
    type: Literal["postgres"] = "postgres"
    dsn: str
    schema_name: str = "pgwarden_audit"
    timeout_s: float = Field(30.0, gt=0)


class JsonlSinkConfig(_Model):
    type: Literal["jsonl"] = "jsonl"
    path: Path
    max_bytes: int = Field(100 * 1024 * 1024, gt=0)
    backups: int = Field(10, ge=0)
    # With fsync the file counts as a durable sink.
    fsync: bool = False
    include_ledger: bool = False


class WebhookConfig(_Model):
    type: Literal["webhook"] = "webhook"
    url: str
    timeout: float = 5.0
    headers: dict[str, str] = Field(default_factory=dict)
    ca_file: Path | None = None


class SyslogConfig(_Model):
    type: Literal["syslog"] = "syslog"
    host: str
    port: int = 514
    protocol: Literal["udp", "tcp"] = "udp"
    app_name: str = "pgwarden"


SinkConfig = Annotated[
    SQLiteSinkConfig | PostgresSinkConfig | JsonlSinkConfig, Field(discriminator="type")
]
AlertConfig = Annotated[WebhookConfig | SyslogConfig, Field(discriminator="type")]


def _default_sink() -> SQLiteSinkConfig | PostgresSinkConfig | JsonlSinkConfig:
    return SQLiteSinkConfig(path=Path("pgwarden-audit.db"))


class AuditConfig(_Model):
    """Everything the audit trail needs; the ``audit:`` section of the proxy config."""

    sinks: list[SinkConfig] = Field(default_factory=lambda: [_default_sink()])
    alerts: list[AlertConfig] = Field(default_factory=list)
    # One chain per writer.  Set it (e.g. "host1-worker0") to continue the same chain across
    # restarts; by default every process start begins a new chain.
    chain_id: str | None = None
    signing_key: Path | None = None
    checkpoint_every: int = Field(10_000, gt=0)
    checkpoint_interval_s: float = Field(60.0, gt=0)
    # An append-only JSON lines copy of each checkpoint, ideally on another machine's mount.
    checkpoint_file: Path | None = None
    ledger_key: Path | None = None
    store_full_text: bool = False
    # Events in flight are bounded by queue_size + max_batch * (sink_queue_batches + 1), plus
    # for each failing or stuck sink up to 2 * queue_size events kept to write when it recovers.
    queue_size: int = Field(10_000, gt=0)
    overflow: Literal["block", "raise"] = "block"
    max_batch: int = Field(2_000, gt=0)
    # Events nobody waits on (everything but labelled statements) wait up to this long for
    # company before they are sealed and written, so that a burst costs one commit (one
    # fsync, one set of index pages) instead of one each.  A submit() that someone awaits
    # cuts the wait short.  What a crash can lose of unacknowledged events grows by at most
    # this much; acknowledged ones are never lost.  0 writes at once.
    batch_linger_s: float = Field(0.01, ge=0, le=1)
    # A sink writes all its queued batches in one transaction, so a short queue costs no
    # group-commit efficiency; a long one only holds more records in memory.
    sink_queue_batches: int = Field(4, gt=0)
    # A sink whose queue stays full this long gets the batch set aside for when it recovers
    # (a sink_failure alert; up to queue_size events, then it loses batches: a gap that
    # verify reports) instead of stalling every other sink behind it.
    sink_stall_s: float = Field(2.0, gt=0)
    # submit()'s awaitable raises AuditUnavailable if no durable sink confirmed in time, so a
    # hung store fails labelled reads closed instead of hanging them.
    durable_timeout_s: float = Field(10.0, gt=0)
    alert_dedup_seconds: float = 60.0
    alert_retries: int = 4
    alert_backoff_s: float = 0.2

    @model_validator(mode="after")
    def _needs_durable(self) -> AuditConfig:
        durable = [s for s in self.sinks if not isinstance(s, JsonlSinkConfig) or s.fsync]
        if not durable:
            raise ValueError(
                "the audit trail needs at least one durable sink (sqlite, postgres, or jsonl with "
                "fsync: true): without one no labelled statement could ever be released"
            )
        return self


# --- errors and receipts ----------------------------------------------------------------------


class AuditUnavailable(RuntimeError):
    """No durable sink persisted the event: the caller must fail closed."""


class AuditQueueFull(AuditUnavailable):
    """The audit queue is at capacity (sinks are slower than the traffic)."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where a persisted event sits in its chain."""

    chain_id: str
    seq: int
    hash: str


# --- internals --------------------------------------------------------------------------------

_Item = tuple[AuditEvent, "asyncio.Future[Receipt] | None"]
_STOP: Any = object()
# A failed sink write is retried after this, doubling up to _RETRY_MAX_S (sooner when new
# events arrive for it).
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0

# Above either bound a batch is sealed on the chainer thread rather than on the event loop
# (about 4 us an event, 0.1 us a ledger key).  The chainer needs the GIL for nearly all of
# that work too, so it spares the loop little on an ordinary batch; it is there so that a
# huge ledger is interrupted every switch interval instead of blocking the loop outright.
_INLINE_EVENTS = 256
_INLINE_LEDGER_KEYS = 64


@dataclass(slots=True)
class _Ticket:
    """Tracks one sealed batch until a durable sink has it (or none can)."""

    waiters: list[tuple[asyncio.Future[Receipt], Receipt]]
    durable_left: int
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    done: bool = False

    def report(self, trail: AuditTrail, durable: bool, error: str | None) -> None:
        if self.done or not durable:
            return
        if error is None:
            self.done = True
            for fut, receipt in self.waiters:
                if not fut.done():
                    fut.set_result(receipt)
            for cp in self.checkpoints:
                trail._publish_checkpoint(cp)
            return
        self.errors.append(error)
        self.durable_left -= 1
        if self.durable_left <= 0:
            self.done = True
            exc_text = "no durable audit sink could persist the event: " + "; ".join(self.errors)
            for fut, _ in self.waiters:
                if not fut.done():
                    fut.set_exception(AuditUnavailable(exc_text))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future[Receipt], message: str) -> None:
    if not fut.done():
        fut.set_exception(AuditUnavailable(message))


def _sanitised(v: Any) -> Any:
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, dict):
        return {str(_sanitised(k)): _sanitised(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_sanitised(x) for x in v]
    if v is None or isinstance(v, bool | int | float):
        return v
    return _sanitised(str(v))


def _expire(fut: asyncio.Future[Receipt], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(
            AuditUnavailable(
                f"no durable audit sink confirmed the event within {timeout} s; the audit "
                "stores are hung or overloaded"
            )
        )


class _SinkRunner:
    def __init__(self, sink: Sink, maxsize: int) -> None:
        self.sink = sink
        self.queue: asyncio.Queue[tuple[list[Sealed], _Ticket] | Any] = asyncio.Queue(maxsize)
        self.task: asyncio.Task[None] | None = None
        self.written = 0
        self.failures = 0
        self.dropped = 0
        # Batches the dispatcher could not queue within sink_stall_s (bounded by queue_size
        # events); the runner writes them with the next batches.
        self.backlog: deque[tuple[list[Sealed], _Ticket]] = deque()
        self.backlog_events = 0


def _default_chain_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"


def build_sinks(config: AuditConfig) -> list[Sink]:
    """Sink objects for the configured backends."""
    sinks: list[Sink] = []
    for i, sc in enumerate(config.sinks):
        if isinstance(sc, SQLiteSinkConfig):
            sinks.append(SQLiteSink(sc.path, synchronous=sc.synchronous, name=f"sqlite#{i}"))
        elif isinstance(sc, PostgresSinkConfig):
            sinks.append(
                PostgresSink(
                    sc.dsn, schema=sc.schema_name, name=f"postgres#{i}", timeout=sc.timeout_s
                )
            )
        else:
            sinks.append(
                JsonlSink(
                    sc.path,
                    max_bytes=sc.max_bytes,
                    backups=sc.backups,
                    fsync=sc.fsync,
                    include_ledger=sc.include_ledger,
                    name=f"jsonl#{i}",
                )
            )
    return sinks


def build_channels(config: AuditConfig) -> list[Channel]:
    """Alert channel objects for the configured destinations."""
    out: list[Channel] = []
    for i, ac in enumerate(config.alerts):
        if isinstance(ac, WebhookConfig):
            out.append(
                WebhookChannel(
                    ac.url,
                    timeout=ac.timeout,
                    headers=ac.headers,
                    ca_file=str(ac.ca_file) if ac.ca_file else None,
                    name=f"webhook#{i}",
                )
            )
        else:
            out.append(
                SyslogChannel(
                    ac.host, ac.port, protocol=ac.protocol, app_name=ac.app_name, name=f"syslog#{i}"
                )
            )
    return out


class AuditTrail:
    """The audit pipeline the proxy talks to.  One per process; use from one event loop."""

    def __init__(
        self,
        config: AuditConfig,
        *,
        sinks: Sequence[Sink] | None = None,
        channels: Sequence[Channel] | None = None,
    ) -> None:
        self.config = config
        self.sinks: list[Sink] = list(sinks) if sinks is not None else build_sinks(config)
        if not any(s.durable for s in self.sinks):
            raise ValueError("the audit trail needs at least one durable sink")
        self.alerter = Alerter(
            build_channels(config) if channels is None else channels,
            dedup_seconds=config.alert_dedup_seconds,
            retries=config.alert_retries,
            backoff=config.alert_backoff_s,
        )
        self.hasher: RecordHasher | None = (
            RecordHasher(load_key(config.ledger_key)) if config.ledger_key else None
        )
        self._key_check = self.hasher.check_value() if self.hasher else None
        self._signer = load_signing_key(config.signing_key) if config.signing_key else None
        self._key_id = key_id(self._signer.public_key()) if self._signer else None
        self.chain = Chain(config.chain_id or _default_chain_id())
        # A deque rather than asyncio.Queue: put/get on the hot path cost a fraction as
        # much, and the dispatcher takes a whole batch at once.
        self._items: deque[_Item] = deque()
        # The dispatcher sleeps on this future; _push resolves it when there is something to
        # do (a cheaper wake-up than an asyncio.Event and wait_for's task per batch).
        self._waiter: asyncio.Future[None] | None = None
        # While the dispatcher lingers only an awaited event, a full batch or close wakes it.
        self._lingering = False
        # An awaited event is queued: do not linger until the queue has been emptied.
        self._urgent = False
        self._room = asyncio.Event()  # set when blocked producers may retry
        # submit()s waiting for room (overflow="block"); referenced so they are not collected
        self._room_waiters: set[asyncio.Task[None]] = set()
        self._stop = False
        self._runners = [_SinkRunner(s, config.sink_queue_batches) for s in self.sinks]
        self._durable_count = sum(1 for s in self.sinks if s.durable)
        # One thread: the chain is a sequence, so sealing must be too.  Batches sealed inline
        # on the loop never overlap with it: the dispatcher awaits each batch's sealing.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pgwarden-audit-chain")
        self._dispatcher: asyncio.Task[None] | None = None
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._state = "new"
        self._ledger_dropped = 0
        self.rejected = 0
        self.submitted = 0

    @property
    def chain_id(self) -> str:
        return self.chain.chain_id

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open every sink and continue this writer's chain where the stores left it."""
        if self._state != "new":
            raise RuntimeError("an AuditTrail can be started once")
        started: list[Sink] = []
        failed: list[tuple[Sink, Exception]] = []
        for s in self.sinks:
            try:
                await s.start()
                started.append(s)
            except (SinkError, OSError) as exc:
                failed.append((s, exc))
        if not any(s.durable for s in started):
            for s in started:
                with contextlib.suppress(SinkError, OSError):
                    await s.close()
            reasons = "; ".join(f"{s.name}: {why}" for s, why in failed)
            raise AuditUnavailable(f"no durable audit sink could be opened: {reasons}")
        if failed and self.config.chain_id:
            # A store we cannot see may hold a later head of this chain; continuing from the
            # stores we can see would fork the chain there.  Start a fresh chain instead.
            self.chain.chain_id = f"{self.config.chain_id}~{int(time.time())}"
        heads = [h for s in started if s.durable for h in [await s.head(self.chain.chain_id)] if h]
        if heads:
            self.chain.seq, self.chain.head = max(heads)
        await self.alerter.start()
        for s, why in failed:
            # The sink stays configured: each batch retries it (PostgreSQL reconnects).
            log.error("audit_sink_unavailable_at_start", sink=s.name, error=str(why))
            self._sink_alert(s, f"audit sink {s.name} could not be opened: {why}", "sink_failure")
        for r in self._runners:
            r.task = asyncio.create_task(self._run_sink(r), name=f"pgwarden-audit-{r.sink.name}")
        self._dispatcher = asyncio.create_task(self._dispatch(), name="pgwarden-audit-dispatch")
        self._state = "running"

    async def close(self) -> None:
        """Write everything queued, a final checkpoint, then close sinks and alert channels."""
        if self._state != "running":
            return
        self._state = "closing"
        self._stop = True
        self._wake()
        self._room.set()  # producers waiting for room get AuditUnavailable
        assert self._dispatcher is not None
        await self._dispatcher
        for r in self._runners:
            await r.queue.put(_STOP)
        for r in self._runners:
            assert r.task is not None
            await r.task
        for s in self.sinks:
            with contextlib.suppress(SinkError):
                await s.close()
        await self.alerter.close()
        self._executor.shutdown(wait=True)
        self._state = "closed"

    async def __aenter__(self) -> AuditTrail:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- submitting -----------------------------------------------------------------------

    def submit(self, event: AuditEvent) -> Awaitable[Receipt]:
        """Queue an event; await the result to know a durable sink has committed it.

        Never blocks.  The awaitable raises :class:`AuditUnavailable` if no durable sink could
        persist the event within ``durable_timeout_s``, or :class:`AuditQueueFull` when the
        queue is full and ``overflow`` is ``"raise"``; with ``overflow="block"`` the event
        waits for room (the awaitable still gives up after ``durable_timeout_s``).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Receipt] = loop.create_future()
        if self._state != "running":
            fut.set_exception(AuditUnavailable(f"the audit trail is {self._state}, not running"))
            return fut
        self._arm_timeout(loop, fut)
        if len(self._items) >= self.config.queue_size:
            if self.config.overflow == "raise":
                fut.set_exception(self._full_error())
                return fut
            # The waiting is a task beside the future, not something the caller awaits
            # first: durable_timeout_s counts from here, so a queue that stays full fails the
            # labelled read closed in time instead of holding it until the sinks catch up.
            # The event still goes in when there is room (its rows were already sent).
            task = loop.create_task(self._push_when_room(event, fut))
            self._room_waiters.add(task)
            task.add_done_callback(self._room_waiters.discard)
            return fut
        self._push((event, fut))
        return fut

    def _push(self, item: _Item) -> None:
        q = self._items
        q.append(item)
        self.submitted += 1
        if item[1] is not None:
            self._urgent = True
        elif self._lingering and len(q) < self.config.max_batch:
            return
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _sleep(self, timeout: float, *, linger: bool) -> None:
        """Sleep until ``timeout`` or until :meth:`_push` (or close) wakes the dispatcher."""
        loop = asyncio.get_running_loop()
        w: asyncio.Future[None] = loop.create_future()
        self._waiter, self._lingering = w, linger
        handle = loop.call_later(timeout, _resolve, w)
        try:
            await w
        finally:
            handle.cancel()
            self._waiter, self._lingering = None, False

    def _arm_timeout(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Receipt]) -> None:
        timeout = self.config.durable_timeout_s
        handle = loop.call_later(timeout, _expire, fut, timeout)
        fut.add_done_callback(lambda _f: handle.cancel())

    async def _push_when_room(self, event: AuditEvent, fut: asyncio.Future[Receipt]) -> None:
        await self.wait_for_room()
        if self._state != "running":
            _fail(fut, f"the audit trail is {self._state}, not running")
            return
        self._push((event, fut))

    def submit_nowait(self, event: AuditEvent) -> None:
        """Queue an event without waiting for it to be stored.

        Raises :class:`AuditQueueFull` when the queue is full (whatever ``overflow`` says:
        a fire-and-forget call has nothing to wait on) and :class:`AuditUnavailable` when the
        trail is not running.
        """
        if self._state != "running":
            raise AuditUnavailable(f"the audit trail is {self._state}, not running")
        if len(self._items) >= self.config.queue_size:
            raise self._full_error()
        self._push((event, None))

    def has_room(self) -> bool:
        """False when ``submit_nowait`` would raise :class:`AuditQueueFull`."""
        return len(self._items) < self.config.queue_size

    def queued(self) -> int:
        """Events waiting for the dispatcher."""
        return len(self._items)

    async def wait_for_room(self) -> None:
        """Wait until the queue has room (for producers that prefer waiting to dropping)."""
        while len(self._items) >= self.config.queue_size and self._state == "running":
            self._room.clear()
            await self._room.wait()

    def _full_error(self) -> AuditQueueFull:
        return AuditQueueFull(
            f"the audit queue is full ({self.config.queue_size} events waiting): the audit sinks "
            "are not keeping up"
        )

    def alert(
        self,
        alert_type: str,
        message: str,
        *,
        severity: str = "warning",
        session_id: str | None = None,
        subject: Subject | None = None,
        rule_ids: Sequence[str] = (),
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record an alert in the trail and send it to every alert channel (blocks, canary
        hits, quarantines; checkpoints and sink failures are sent by the trail itself)."""
        ev = AuditEvent.alert(
            alert_type,
            message,
            severity=severity,
            session_id=session_id,
            subject=subject,
            rule_ids=rule_ids,
            details=details,
        )
        with contextlib.suppress(AuditUnavailable):
            self.submit_nowait(ev)
        d = dict(details or {})
        if session_id:
            d["session_id"] = session_id
        if subject is not None:
            d.update(
                db_user=subject.db_user, end_user=subject.end_user, client_addr=subject.client_addr
            )
        if rule_ids:
            d["rule_ids"] = list(rule_ids)
        self.alerter.send(Alert(alert_type, message, severity=severity, details=d))

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics."""
        return {
            "chain_id": self.chain.chain_id,
            "seq": self.chain.seq,
            "submitted": self.submitted,
            "queued": len(self._items),
            "ledger_dropped_no_key": self._ledger_dropped,
            "sinks": {
                r.sink.name: {
                    "dropped": r.dropped,
                    "written": r.written,
                    "failures": r.failures,
                    "queued_batches": r.queue.qsize(),
                }
                for r in self._runners
            },
            "alerts": self.alerter.stats(),
        }

    # --- dispatch -------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._items
        max_batch = self.config.max_batch
        linger = self.config.batch_linger_s
        stopping = False
        while not stopping:
            if not q and not self._stop:
                timeout = self.config.checkpoint_interval_s - (
                    time.monotonic() - self._last_checkpoint
                )
                await self._sleep(max(timeout, 0.001), linger=False)
            if linger and q and not self._urgent and not self._stop and len(q) < max_batch:
                await self._sleep(linger, linger=True)
            n = min(len(q), max_batch)
            items: list[_Item] = [q.popleft() for _ in range(n)]
            if n:
                self._room.set()
            if not q:
                self._urgent = False
            stopping = self._stop and not q
            force_cp = stopping or (
                time.monotonic() - self._last_checkpoint >= self.config.checkpoint_interval_s
            )
            if not items and not (force_cp and self._since_checkpoint):
                if force_cp:
                    self._last_checkpoint = time.monotonic()
                continue
            try:
                if self._seal_inline(items, force_cp):
                    sealed, waiters, cps = self._seal(items, force_cp)
                else:
                    sealed, waiters, cps = await loop.run_in_executor(
                        self._executor, self._seal, items, force_cp
                    )
            except Exception as exc:  # a bug in sealing must not kill the trail silently
                log.error("audit_seal_failed", error=repr(exc))
                for _, fut in items:
                    if fut is not None and not fut.done():
                        fut.set_exception(
                            AuditUnavailable(f"the audit event could not be sealed: {exc!r}")
                        )
                continue
            ticket = _Ticket(waiters, self._durable_count, cps)
            for r in self._runners:
                try:
                    r.queue.put_nowait((sealed, ticket))
                except asyncio.QueueFull:
                    await self._put_or_drop(r, sealed, ticket)

    def _seal_inline(self, items: list[_Item], force_checkpoint: bool) -> bool:
        """Whether sealing ``items`` is cheap enough to do on the event loop."""
        if (
            force_checkpoint
            or len(items) > _INLINE_EVENTS
            or self._since_checkpoint + len(items) >= self.config.checkpoint_every
        ):
            return False
        keys = 0
        for ev, _ in items:
            if ev.ledger_keys:
                keys += sum(map(len, ev.ledger_keys.values()))
            if ev.ledger_values:
                keys += sum(map(len, ev.ledger_values.values()))
            if keys > _INLINE_LEDGER_KEYS:
                return False
        return True

    async def _put_or_drop(self, r: _SinkRunner, sealed: list[Sealed], ticket: _Ticket) -> None:
        try:
            await asyncio.wait_for(r.queue.put((sealed, ticket)), self.config.sink_stall_s)
            return
        except TimeoutError:
            pass
        r.failures += 1
        kept = r.backlog_events + len(sealed) <= self.config.queue_size
        if kept:
            # Set aside for the sink to write once it moves again (in seq order with the
            # rest): its waiters are not held for it, but the store does not lose the events.
            r.backlog.append((sealed, ticket))
            r.backlog_events += len(sealed)
            msg = (
                f"audit sink {r.sink.name} has not kept up for {self.config.sink_stall_s} s; "
                f"{len(sealed)} events wait for it to recover"
            )
        else:
            r.dropped += len(sealed)
            msg = (
                f"audit sink {r.sink.name} has not kept up for {self.config.sink_stall_s} s; "
                f"{len(sealed)} events were not written to it"
            )
        log.error("audit_sink_stalled", sink=r.sink.name, events=len(sealed), kept=kept)
        self._sink_alert(r.sink, msg, "sink_stall", dropped=r.dropped)
        ticket.report(self, r.sink.durable, f"{r.sink.name}: {msg}")

    def _seal(
        self, items: list[_Item], force_checkpoint: bool
    ) -> tuple[list[Sealed], list[tuple[asyncio.Future[Receipt], Receipt]], list[dict[str, Any]]]:
        """Redact, hash the ledger, chain, checkpoint (on the chainer thread or, for a small
        batch, on the loop; never both at once)."""
        chain = self.chain
        hasher = self.hasher
        keep_full = self.config.store_full_text
        every = self.config.checkpoint_every
        out: list[Sealed] = []
        waiters: list[tuple[asyncio.Future[Receipt], Receipt]] = []
        cps: list[dict[str, Any]] = []
        for ev, fut in items:
            try:
                rec, entries, canon = self._seal_one(ev, hasher, keep_full)
            except (TypeError, ValueError) as exc:
                # One unserialisable event (a detail that is not JSON) must not take the
                # batch down with it.
                self.rejected += 1
                log.error("audit_event_rejected", kind=str(ev.kind), error=repr(exc))
                if fut is not None:
                    fut.get_loop().call_soon_threadsafe(
                        _fail, fut, f"the audit event could not be serialised: {exc}"
                    )
                continue
            out.append(Sealed(rec, entries, canon))
            if fut is not None:
                waiters.append((fut, Receipt(chain.chain_id, rec["seq"], rec["hash"])))
            self._since_checkpoint += 1
            if self._since_checkpoint >= every:
                cps.append(self._checkpoint(out))
        if force_checkpoint and self._since_checkpoint:
            cps.append(self._checkpoint(out))
        return out, waiters, cps

    def _seal_one(
        self, ev: AuditEvent, hasher: RecordHasher | None, keep_full: bool
    ) -> tuple[Record, tuple[LedgerGroup, ...], bytes]:
        rec = ev.to_record()
        try:
            return self._seal_record(ev, rec, hasher, keep_full)
        except TypeError:
            # Text the client sent in an encoding we decoded with surrogateescape, or a
            # detail value orjson does not know: store a faithful, escaped rendering.
            return self._seal_record(ev, _sanitised(ev.to_record()), hasher, keep_full)

    def _seal_record(
        self, ev: AuditEvent, rec: Record, hasher: RecordHasher | None, keep_full: bool
    ) -> tuple[Record, tuple[LedgerGroup, ...], bytes]:
        if rec["statement"]:
            rec["statement"] = redact_sql(rec["statement"])
        if rec["message"]:
            rec["message"] = redact_message(rec["message"])
        if not keep_full:
            rec["full_text"] = None
        entries: tuple[LedgerGroup, ...] = ()
        if ev.ledger_keys or ev.ledger_values:
            if hasher is None:
                if not self._ledger_dropped:
                    log.warning(
                        "audit_ledger_dropped",
                        reason="events carry ledger keys but audit.ledger_key is not set",
                    )
                self._ledger_dropped += 1
            else:
                entries = hasher.entries(ev.ledger_keys, ev.ledger_values)
            if entries:
                rec["ledger_count"] = ledger_count(entries)
                rec["ledger_digest"] = ledger_digest(entries)
                # Which key wrote these digests, so a responder's key can be checked.
                rec["details"] = {**(rec["details"] or {}), "ledger_key_check": self._key_check}
        return rec, entries, self.chain.seal_canonical(rec, presorted=True)

    def _checkpoint(self, out: list[Sealed]) -> dict[str, Any]:
        chain = self.chain
        seq, head = chain.seq, chain.head
        sig = (
            self._signer.sign(checkpoint_message(chain.chain_id, seq, head)).hex()
            if self._signer
            else ""
        )
        cp = {
            "chain_id": chain.chain_id,
            "seq": seq,
            "hash": head,
            "signature": sig,
            "key_id": self._key_id,
        }
        ev = AuditEvent(
            EventKind.CHECKPOINT,
            severity="info",
            message=f"checkpoint of events 1..{seq}",
            details=cp,
        )
        rec: Record = ev.to_record()
        canon = chain.seal_canonical(rec)
        out.append(Sealed(rec, (), canon))
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        if self.config.checkpoint_file is not None:
            with open(self.config.checkpoint_file, "ab") as f:
                f.write(orjson.dumps(cp, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE))
                f.flush()
                os.fsync(f.fileno())
        return cp

    def _publish_checkpoint(self, cp: dict[str, Any]) -> None:
        # Sent only once a durable sink holds the checkpoint: an external checkpoint for events
        # that never reached the store would look like truncation.
        self.alerter.send(
            Alert(
                "checkpoint",
                f"audit chain {cp['chain_id']} checkpoint at event {cp['seq']}",
                severity="info",
                details=cp,
                dedup_key=f"checkpoint\0{cp['chain_id']}\0{cp['seq']}",
            )
        )

    async def _run_sink(self, r: _SinkRunner) -> None:
        """Write the sink's queue in order; keep what failed and retry it before anything
        newer, so a store that comes back (a new SQLite writer, a reconnected PostgreSQL
        backend, a lock released) ends up holding every event: the rows of a read that was
        refused for want of a durable sink had already gone over the wire, so its event
        belongs in the trail, and a batch simply skipped would read as deleted to verify."""
        q = r.queue
        # [sealed batch, its ticket, whether this sink already reported on the ticket]
        pending: deque[list[Any]] = deque()
        delay = 0.0  # back-off before retrying a failed write when nothing new arrives
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                arrived = [await q.get()]
            elif stopping:
                arrived = []
            else:
                try:
                    arrived = [await asyncio.wait_for(q.get(), delay)]
                except TimeoutError:
                    arrived = []
            while True:
                try:
                    arrived.append(q.get_nowait())
                except asyncio.QueueEmpty:
                    break
            if any(w is _STOP for w in arrived):
                stopping = True
            fresh: list[list[Any]] = [[w[0], w[1], False] for w in arrived if w is not _STOP]
            if r.backlog:
                # Batches the dispatcher set aside while this sink was stuck: their tickets
                # heard already.  Batches are contiguous runs of seq: sorting restores order.
                fresh += [[b[0], b[1], True] for b in r.backlog]
                r.backlog.clear()
                r.backlog_events = 0
                fresh.sort(key=lambda w: w[0][0].record["seq"] if w[0] else 0)
            pending.extend(fresh)
            self._bound_retries(r, pending)
            if not pending:
                continue
            batch: list[Sealed] = [s for p in pending for s in p[0]]
            retrying = delay > 0
            error: str | None = None
            try:
                if retrying:
                    batch = await _not_yet_stored(r.sink, batch)
                if batch:
                    await r.sink.write(batch)
                r.written += len(batch)
            except Exception as exc:  # any sink failure is reported, never fatal to the trail
                r.failures += 1
                error = f"{r.sink.name}: {exc}"
                log.error("audit_sink_failed", sink=r.sink.name, error=str(exc))
                self._sink_alert(
                    r.sink, f"audit sink {r.sink.name} failed: {exc}", "sink_failure",
                    events=len(batch),
                )  # fmt: skip
            if error is None:
                if retrying:
                    log.info("audit_sink_recovered", sink=r.sink.name, events=len(batch))
                for _s, ticket, _reported in pending:
                    ticket.report(self, r.sink.durable, None)
                pending.clear()
                delay = 0.0
                continue
            for p in pending:
                if not p[2]:
                    p[2] = True
                    p[1].report(self, r.sink.durable, error)
            if stopping:
                n = sum(len(p[0]) for p in pending)
                r.dropped += n
                log.error("audit_sink_gave_up", sink=r.sink.name, events=n)
                return
            delay = min(max(delay * 2, _RETRY_FIRST_S), _RETRY_MAX_S)

    def _bound_retries(self, r: _SinkRunner, pending: deque[list[Any]]) -> None:
        """Failed batches kept for a retry are bounded like the queue: past ``queue_size``
        failed events the oldest are given up on (alerted; verify on that store shows the
        gap).  Their tickets already heard of the failure."""
        n = sum(len(p[0]) for p in pending if p[2])
        lost = 0
        while n > self.config.queue_size and pending[0][2]:
            sealed = pending.popleft()[0]
            n -= len(sealed)
            lost += len(sealed)
        if lost:
            r.dropped += lost
            msg = (
                f"audit sink {r.sink.name} has been failing with more than "
                f"{self.config.queue_size} events waiting for it; {lost} events were not "
                "written to it"
            )
            log.error("audit_sink_retries_dropped", sink=r.sink.name, dropped=lost)
            self._sink_alert(r.sink, msg, "sink_retry_drop", dropped=r.dropped)

    def _sink_alert(self, sink: Sink, message: str, dedup: str, **details: Any) -> None:
        """A ``sink_failure`` alert, deduplicated per sink and per kind of trouble."""
        self.alerter.send(
            Alert(
                "sink_failure",
                message,
                severity="error",
                details={"sink": sink.name, **details},
                dedup_key=f"{dedup}\0{sink.name}",
            )
        )


async def _not_yet_stored(sink: Sink, batch: list[Sealed]) -> list[Sealed]:
    """The part of a retried batch the store does not hold yet: a write that failed may have
    committed before the failure was seen (a writer killed between COMMIT and its answer, a
    connection lost after COMMIT), and writing it again would store events twice."""
    if not batch:
        return batch
    chain_id = batch[0].record["chain_id"]
    head = await sink.head(chain_id)
    if head is None:
        return batch
    return [s for s in batch if s.record["chain_id"] != chain_id or s.record["seq"] > head[0]]
