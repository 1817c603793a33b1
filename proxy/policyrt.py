"""The policy as the running proxy holds it: catalogs, analyser, engine, window counters.

One ``PolicyRuntime`` per process.  Catalogs are per database (a session's names resolve in
the database it connected to) and are loaded before that database's first session goes
ahead, so no statement is ever judged against an empty catalog.  The window store is the
seam to memory or Redis; when it cannot be reached, subjects with limits fail closed.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import time
import weakref
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import structlog

from audit.events import AuditEvent
from audit.events import Subject as AuditSubject
from audit.pipeline import AuditTrail, AuditUnavailable, Receipt
from policy.analyze import Analyzer
from policy.catalog import DEFAULT_MAX_DELAY, DEFAULT_SETTLE, Catalog
from policy.engine import Engine
from policy.inflight import InFlight
from policy.model import Action, Policy, PolicyError, load_policy
from policy.ownconn import DEFAULT_IDLE_TIMEOUT, IdleConnection
from policy.state import StoreUnavailable, WindowStore, open_window_store
from policy.subject import Subject
from proxy import commands as cmd
from proxy.guard import Guard
from proxy.metrics import Stats
from proxy.session import Subject as SessionSubject
from proxy.valueload import ValueIndexes

# The session a policy command came from, and its audit session id (alerts carry both).
Origin = tuple[SessionSubject, str]

log = structlog.get_logger("pgwarden.policy")

_ROLES_SQL = """
WITH RECURSIVE m(oid) AS (
    SELECT oid FROM pg_roles WHERE rolname = $1
    UNION
    SELECT am.roleid FROM pg_auth_members am JOIN m ON am.member = m.oid
)
SELECT r.rolname FROM pg_roles r JOIN m USING (oid)
"""


class _Counters:
    """The engine's synchronous view of the window store (see ``policy.engine.CountersView``)."""

    def __init__(self, store: WindowStore) -> None:
        self.store = store
        self.quarantined: dict[str, float] = {}
        self.unavailable = False
        self.in_flight = InFlight()

    @property
    def available(self) -> bool:
        return not self.unavailable

    def cached_totals(self, subject: str, label: str, window: float) -> tuple[int, int] | None:
        totals = self.store.cached_totals(subject, label, window)
        held = self.in_flight.held(subject, label, window)
        if totals is None:
            return (held, held) if held else None
        return (totals.rows + held, totals.records + held)

    def cached_quarantine(self, subject: str) -> float | None:
        return self.quarantined.get(subject)


# (fingerprint, normalised text, relations, labels) of a statement's audit event
_AuditFacts = tuple[str, str, tuple[str, ...], tuple[str, ...]]


class PolicyRuntime:
    def __init__(
        self,
        policy: Policy,
        source: Path | None,
        upstream: tuple[str, int],
        stats: Stats,
        ssl: Any = None,
        catalog_user: str | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        reload_settle: float = DEFAULT_SETTLE,
        reload_max_delay: float = DEFAULT_MAX_DELAY,
    ) -> None:
        self.source = source
        # After DDL the catalogs are reloaded once a burst of it ends (see Catalog._coalesce).
        self.reload_settle = reload_settle
        self.reload_max_delay = reload_max_delay
        # pgwarden's own connections close when idle (see policy.ownconn).
        self.idle_timeout = idle_timeout
        self.upstream = upstream
        self.stats = stats
        self.ssl = ssl
        self.catalog_user = catalog_user
        self.catalogs: dict[str, Catalog] = {}
        self._loading: dict[str, asyncio.Task[Catalog]] = {}
        self.store = open_window_store(
            policy.store.url if policy.store.backend == "redis" else None
        )
        self.counters = _Counters(self.store)
        self.record_key = self._record_key(policy)
        self.trail: AuditTrail | None = None
        # Audit subjects by what they say: a session's statements share one, so building
        # it (a frozen dataclass, ~0.8 us) is not paid per statement.
        self._audit_subjects: dict[tuple[Any, ...], AuditSubject] = {}
        self._audit_facts_of: dict[int, tuple[Any, _AuditFacts]] = {}
        self._probe: asyncio.Task[None] | None = None
        self._allowed: dict[tuple[str, str, str], tuple[float, frozenset[bytes]]] = {}
        self._lookup_conns: dict[str, IdleConnection] = {}
        # The lookup connections are shared by every session, and asyncpg runs one operation
        # at a time on a connection: concurrent lookups must take turns (an overlapping one
        # fails with "another operation is in progress", and a failed need-to-know lookup
        # allows nothing).
        self._lookup_lock = asyncio.Lock()
        self._roles: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
        # end_user_churn alerts raised: (scope, rule id) -> when (one per window)
        self._churn_alerted: dict[tuple[str, str], float] = {}
        self._install(policy)

    def _install(self, policy: Policy) -> None:
        # Everything that can fail (key file, allow-lists) before anything is replaced: a
        # policy that cannot be installed leaves the running one whole.
        end_user_key = self._end_user_key(policy)
        engine = Engine(policy, self.counters)
        self.end_user_key = end_user_key
        self.policy = policy
        matching = policy.value_matching
        if not hasattr(self, "values"):
            self.values = ValueIndexes(
                lambda database: self._connect(database, "pgwarden-values"),
                lambda database: c.snapshot if (c := self.catalogs.get(database)) else None,
                refresh=matching.refresh,
                max_entries=matching.max_entries,
            )
        else:
            # The labels may have changed: every index is built anew.
            self.values.refresh_every = matching.refresh
            self.values.max_entries = matching.max_entries
            self.values.rebuild_all()
        self.label_rules = policy.label_rules()
        self.engine = engine
        for catalog in self.catalogs.values():
            catalog.set_rules(self.label_rules)
        if not hasattr(self, "analyzers"):
            self.analyzers: dict[str, Analyzer] = {}
            self.guards: weakref.WeakSet[Guard] = weakref.WeakSet()
        for analyzer in self.analyzers.values():
            analyzer.set_rules(self.label_rules)
        # Sessions already open follow the new policy from their next statement: a reload
        # never drops a connection, and never leaves one on the old rules.
        for guard in list(self.guards):
            guard.use_engine(self.engine, self.end_user_key)

    @staticmethod
    def _end_user_key(policy: Policy) -> bytes | None:
        if not policy.end_user_key:
            return None
        try:
            key = Path(policy.end_user_key).read_bytes().strip()
        except OSError as exc:
            raise PolicyError(
                f"{policy.end_user_key}: cannot read the end_user_key file: {exc.strerror}"
            ) from None
        if len(key) < 16:
            raise PolicyError(f"{policy.end_user_key}: an end_user_key has at least 16 bytes")
        return key

    @staticmethod
    def _record_key(policy: Policy) -> bytes:
        if policy.record_key:
            return Path(policy.record_key).read_bytes().strip()
        return secrets.token_bytes(32)

    def reload(self) -> None:
        """Re-read the policy file; an invalid file raises and leaves the running policy."""
        if self.source is None:
            return
        self._install(load_policy(self.source))

    def reload_logged(self, reason: str) -> bool:
        """Reload, log it, record it in the audit trail; an invalid policy keeps the old one
        and raises an alert."""
        try:
            self.reload()
        except Exception as exc:
            log.error("policy_reload_failed", reason=reason, error=str(exc), kept="previous policy")
            if self.trail is not None:
                self._submit_nowait(AuditEvent.policy_reload(ok=False, message=str(exc)[:2000]))
                self.alert(
                    "policy_rejected",
                    f"invalid policy not loaded: {exc}"[:2000],
                    "error",
                    "-",
                    "policy",
                )
            return False
        log.info(
            "policy_reloaded", reason=reason, file=str(self.source), rules=len(self.policy.rules)
        )
        if self.trail is not None:
            self._submit_nowait(
                AuditEvent.policy_reload(ok=True, message=f"{self.source} ({reason})")
            )
        return True

    async def watch_file(self, interval: float = 1.0) -> None:
        """Reload when the policy file changes on disk (as well as on SIGHUP)."""
        assert self.source is not None

        def stamp() -> tuple[float, int] | None:
            try:
                st = os.stat(self.source)  # type: ignore[arg-type]
            except OSError:
                return None
            return st.st_mtime, st.st_size

        last = stamp()
        while True:
            await asyncio.sleep(interval)
            now = stamp()
            if now is not None and now != last:
                last = now
                self.reload_logged("file changed")

    # --- catalogs ----------------------------------------------------------------------------

    async def ensure_catalog(self, database: str) -> None:
        """Load the database's catalog before its first session goes on (once).

        A catalog whose database was found gone (dropped, or renamed away) is loaded anew:
        a database created since under that name is another database.
        """
        known = self.catalogs.get(database)
        if known is not None and not known.gone:
            return
        task = self._loading.get(database)
        if task is None:
            task = asyncio.create_task(self._load_catalog(database))
            self._loading[database] = task
        try:
            fresh = await task
        finally:
            self._loading.pop(database, None)
        old = self.catalogs.get(database)
        if old is not fresh:
            # Swapped in one step: a session never finds its database without a catalog
            # (make_guard refuses that), even while a replacement loads.
            self.catalogs[database] = fresh
            self.analyzers.pop(database, None)
            if old is not None:
                await old.close()
        if self.policy.value_matching.enabled:
            await self.values.ensure(database)
        # The catalog and the parser's structures live as long as the process: keep them out
        # of the collector's way, or every full collection walks them again (measured with
        # pgbench -S as an agent: 60 -> 54 us of proxy CPU per statement).
        gc.freeze()

    async def _connect(self, database: str, application: str) -> Any:
        """pgwarden's own read-only connection to a database (the catalog role)."""
        import asyncpg

        host, port = self.upstream
        user = (
            self.catalog_user
            or self.policy.catalog_user
            or os.environ.get("PGWARDEN_CATALOG_USER")
            or "postgres"
        )
        env = self.policy.catalog_password_env
        password = os.environ.get(env) if env else None
        return await asyncpg.connect(
            host=host, port=port, user=user, password=password, database=database,
            ssl=self.ssl, server_settings={"application_name": application},
        )  # fmt: skip

    async def _load_catalog(self, database: str) -> Catalog:
        async def connect() -> Any:
            return await self._connect(database, "pgwarden-catalog")

        catalog = Catalog(
            connect, rules=self.label_rules, idle_timeout=self.idle_timeout, name=database,
            settle=self.reload_settle, max_delay=self.reload_max_delay,
        )  # fmt: skip
        await catalog.start()
        log.info("catalog_loaded", database=database, relations=len(catalog.snapshot.relations))
        return catalog

    async def lookup_allowed(
        self, database: str, rule_id: str, person: str
    ) -> tuple[float, frozenset[bytes]]:
        """The keys a need-to-know rule lets ``person`` see, and until when that answer holds.

        Run on pgwarden's own connection to the database (the catalog role); answers are
        shared by every session of the process for ``cache_seconds``.  A lookup that fails
        allows nothing (fail closed) and is retried at the next statement.
        """
        rule = next((r for r in self.policy.rules if r.id == rule_id), None)
        now = time.monotonic()
        if rule is None or rule.need_to_know is None:
            return now + 1.0, frozenset()
        ntk = rule.need_to_know
        key = (database, rule_id, person)
        hit = self._allowed.get(key)
        if hit is not None and hit[0] > now:
            return hit
        async with self._lookup_lock:
            # Sessions that waited for the lock find the answer the first one fetched.
            now = time.monotonic()
            hit = self._allowed.get(key)
            if hit is not None and hit[0] > now:
                return hit
            try:
                async with self._lookup_conn(database).use() as conn:
                    rows = await conn.fetch(ntk.lookup, person)
            except Exception as exc:
                log.error(
                    "need_to_know_lookup_failed", rule=rule_id, error=str(exc),
                    effect="nothing allowed",
                )  # fmt: skip
                return now, frozenset()
            answer = (now + ntk.cache_seconds, frozenset(str(r[0]).encode() for r in rows))
            self._allowed[key] = answer
            return answer

    def _lookup_conn(self, database: str) -> IdleConnection:
        """pgwarden's connection for lookups (need-to-know, role membership), opened when
        needed and closed when idle."""
        conn = self._lookup_conns.get(database)
        if conn is None:

            async def connect() -> Any:
                return await self._connect(database, "pgwarden-lookups")

            conn = self._lookup_conns[database] = IdleConnection(connect, self.idle_timeout)
        return conn

    async def roles_of(self, database: str, user: str) -> frozenset[str]:
        """The roles ``user`` is a member of, directly or through other roles (cached a
        minute), for subjects that match on role membership."""
        if not any(m.roles is not None for m in self.policy.subjects.values()):
            return frozenset()
        now = time.monotonic()
        hit = self._roles.get((database, user))
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            async with self._lookup_lock, self._lookup_conn(database).use() as conn:
                rows = await conn.fetch(_ROLES_SQL, user)
        except Exception as exc:
            # Fail closed in the sense that matters: a subject defined by role membership
            # that cannot be confirmed is not granted (nor exempted from) anything by it.
            log.error("role_lookup_failed", user=user, error=str(exc))
            return frozenset()
        roles = frozenset(r[0] for r in rows)
        self._roles[(database, user)] = (now + 60.0, roles)
        return roles

    def invalidate(self, database: str) -> None:
        catalog = self.catalogs.get(database)
        if catalog is not None:
            catalog.invalidate()

    def invalidate_all(self) -> None:
        """A database was created, dropped or renamed: every catalog checks its database
        (one found gone is loaded anew by the next session that needs it)."""
        for catalog in self.catalogs.values():
            catalog.invalidate()

    # --- sessions ----------------------------------------------------------------------------

    def _may_apply(self, subject: Subject) -> bool:
        """Whether any rule could ever apply to this session.

        The end user and application_name can change mid-session, so subjects that match on
        them keep every session under watch; otherwise the start-up subject decides.
        """
        if any(
            m.end_users is not None or m.applications is not None
            for m in self.policy.subjects.values()
        ):
            return True
        engine = self.engine
        return bool(engine.rules_for(engine.subjects_of(subject)))

    def make_guard(self, s: SessionSubject) -> Guard | None:
        catalog = self.catalogs.get(s.database)
        if catalog is None:
            # ensure_catalog runs before every session goes on; relaying one unwatched
            # because its catalog is missing would fail open.  The session ends instead.
            raise RuntimeError(f"no catalog loaded for database {s.database!r}")
        analyzer = self.analyzers.get(s.database)
        if analyzer is None:
            analyzer = Analyzer(catalog, self.label_rules)
            self.analyzers[s.database] = analyzer
        subject = Subject(s.user, s.database, s.application_name, s.client_addr, None, s.roles)
        if self.trail is None and not self._may_apply(subject):
            # Nothing to enforce and nothing to record: the session is relayed untouched.
            return None
        guard = Guard(
            self.engine, analyzer, subject, self.record_key, audit=self.trail is not None,
            end_user_key=self.end_user_key,
        )  # fmt: skip
        guard.shared_counts = self.policy.store.backend == "redis"
        if self.policy.value_matching.enabled:
            guard.values = self.values.indexes
        guard.set_options(s.options)
        self.guards.add(guard)
        return guard

    # --- audit -----------------------------------------------------------------------------

    @staticmethod
    def audit_subject(s: SessionSubject, end_user: str | None = None) -> AuditSubject:
        return AuditSubject(s.user, s.database, s.application_name, s.client_addr, s.tls, end_user)

    def session_event(
        self, kind: str, session_id: str, s: SessionSubject, message: str | None = None
    ) -> None:
        if self.trail is None:
            return
        subject = self.audit_subject(s)
        if kind == "start":
            ev = AuditEvent.session_start(session_id, subject, details={"tls": s.tls})
        elif kind == "auth_failure":
            ev = AuditEvent.auth_failure(subject, message or "", session_id=session_id)
        else:
            ev = AuditEvent.session_end(session_id, subject, message=message)
        self._submit_nowait(ev)

    def statement_event(
        self, c: cmd.StatementDone, session_id: str, s: SessionSubject
    ) -> AuditEvent | None:
        if self.trail is None:
            return None
        f = c.facts
        key = (s.user, s.database, s.application_name, s.client_addr, s.tls, c.end_user)
        subject = self._audit_subjects.get(key)
        if subject is None:
            if len(self._audit_subjects) >= 4096:
                self._audit_subjects.clear()
            subject = self._audit_subjects[key] = self.audit_subject(s, c.end_user)
        fingerprint, statement, relations, labels = self._audit_facts(f)
        records, values = c.records, c.values
        return AuditEvent.statement_event(
            session_id,
            subject,
            fingerprint=fingerprint,
            statement=statement,
            relations=relations,
            labels=labels,
            rows=c.rows,
            bytes=c.nbytes,
            duration_ms=c.seconds * 1000.0,
            verdict=c.verdict,
            rule_ids=c.rule_ids,
            sqlstate=c.sqlstate,
            full_text=c.text,
            # As read from the result: the ledger hashes the bytes (no copy per key here).
            ledger_keys=dict(records) if records else None,
            ledger_values={
                lb: [v.decode("utf-8", "replace") for v in vals] for lb, vals in values.items()
            }
            if values
            else None,
        )

    def _audit_facts(self, f: Any) -> _AuditFacts:
        """What a statement's event says about its text: the same for every execution of
        the same facts object (the analyser hands out one per statement shape), so the
        sorting is not paid per statement."""
        if f is None:
            return "", "", (), ()
        hit = self._audit_facts_of.get(id(f))
        if hit is not None and hit[0] is f:
            return hit[1]
        part = (
            f.fingerprint,
            f.normalized,
            tuple(sorted(f.relations_read)),
            tuple(sorted(f.output_labels)) if f.output_labels else (),
        )
        if len(self._audit_facts_of) >= 4096:
            self._audit_facts_of.clear()
        # The facts object is kept alive beside its id, so the id cannot be reused while
        # the entry exists.
        self._audit_facts_of[id(f)] = (f, part)
        return part

    def _submit_nowait(self, ev: AuditEvent) -> None:
        assert self.trail is not None
        try:
            self.trail.submit_nowait(ev)
        except AuditUnavailable as exc:
            self.stats.audit_dropped += 1
            log.error("audit_queue_full", error=str(exc))

    def audit_statement(self, c: cmd.StatementDone, session_id: str, s: SessionSubject) -> None:
        ev = self.statement_event(c, session_id, s)
        if ev is not None:
            self._submit_nowait(ev)

    async def wait_durable(self, waiting: Awaitable[Receipt] | None) -> bool:
        """Await what ``submit_durable`` returned; False when no durable sink could persist."""
        if waiting is None:
            return True
        try:
            await waiting
            return True
        except AuditUnavailable as exc:
            return self._not_durable(exc)

    def submit_durable(
        self, c: cmd.StatementDone, session_id: str, s: SessionSubject
    ) -> Awaitable[Receipt] | None:
        """Queue a labelled statement's event; what resolves once a durable sink holds it
        (see ``durable_ok``), or None when there is no audit trail."""
        ev = self.statement_event(c, session_id, s)
        if ev is None or self.trail is None:
            return None
        return self.trail.submit(ev)

    def durable_ok(self, fut: asyncio.Future[Receipt]) -> bool:
        """Whether the event behind a finished ``submit_durable`` future was persisted."""
        if fut.cancelled():
            return self._not_durable(AuditUnavailable("the audit submission was cancelled"))
        exc = fut.exception()
        if exc is None:
            return True
        if isinstance(exc, AuditUnavailable):
            return self._not_durable(exc)
        raise exc

    def _not_durable(self, exc: AuditUnavailable) -> bool:
        self.stats.audit_failures += 1
        log.error("audit_unavailable", error=str(exc), refused="labelled read")
        return False

    def alert(self, kind: str, message: str, severity: str, subject: str, rule_id: str,
              origin: Origin | None = None) -> None:  # fmt: skip
        """Record and send an alert; ``origin`` (the session it arose in, and its audit id)
        gives the event its database user, end user and session, so a responder finds it by
        person like the statement that caused it."""
        if self.trail is None:
            return
        audit_subject, session_id = None, None
        if origin is not None:
            session, session_id = origin
            kind_, _, name = subject.partition(":")
            # The subject key names the person (policy.subject.Subject.key): the end user, or
            # the database user when none was named; "user:" keys name the account.
            end_user = name if kind_ == "person" and name != session.user else None
            audit_subject = self.audit_subject(session, end_user)
        try:
            self.trail.alert(
                kind, message, severity=severity, session_id=session_id, subject=audit_subject,
                rule_ids=(rule_id,), details={"subject": subject},
            )  # fmt: skip
        except AuditUnavailable as exc:
            log.error("alert_not_recorded", error=str(exc))

    async def handle(self, c: cmd.Command, log_: Any, origin: Origin | None = None) -> None:
        """Carry out a policy command from a session (counters, quarantine, alerts);
        ``origin``: that session's subject and audit id, for the alerts."""
        if isinstance(c, cmd.RefreshCounts):
            for label, windows in c.labels:
                if not await self._store_call(self.store.totals(c.subject, label, windows)):
                    break
        elif isinstance(c, cmd.RecordUsage):
            try:
                await self._store_call(
                    self.store.record(c.subject, c.label, c.rows, c.records, c.windows)
                )
            finally:
                if c.hold is not None:
                    c.hold.release()
        elif isinstance(c, cmd.NoteEndUser):
            await self._note_end_user(c, log_, origin)
        elif isinstance(c, cmd.PolicyBlock):
            self.stats.policy_blocks += 1
            log_.warning(
                "policy_block",
                subject=c.subject,
                rule=c.rule_id,
                action=c.action,
                message=c.message,
            )
            # Responders and alert channels hear of every refusal, not only of quarantines.
            self.alert(
                "block", f"{_who(c.subject)}: {c.message}", "warning", c.subject, c.rule_id, origin
            )
            if c.rule_id != "quarantine" and c.offence:
                # A refusal because the subject is already quarantined is no new offence:
                # counting it would re-quarantine (and re-alert) on every statement.  Nor is
                # one because the counter store was unreachable: a Redis outage (with the
                # refusals decided before pgwarden saw it back) quarantined every busy agent.
                await self._maybe_quarantine(
                    c.subject,
                    c.action == Action.QUARANTINE.value,
                    log_,
                    f"rule {c.rule_id}",
                    origin,
                )
        elif isinstance(c, cmd.PolicyAlert):
            self.stats.policy_alerts += 1
            log_.warning(
                "policy_alert",
                subject=c.subject,
                rule=c.rule_id,
                reason=c.reason,
                monitor=c.monitored,
            )
        elif isinstance(c, cmd.CanaryHit):
            self.stats.policy_alerts += 1
            log_.error(
                "canary_read",
                subject=c.subject,
                rule=c.rule_id,
                action=c.action,
                monitor=c.monitored,
                refused=c.blocked,
            )
            what = (
                "was refused a result holding a canary record" if c.blocked
                else "read a canary record"
            )  # fmt: skip
            self.alert(
                "canary", f"{_who(c.subject)} {what} (rule {c.rule_id})",
                "critical", c.subject, c.rule_id, origin,
            )  # fmt: skip
            if c.blocked:
                # The refusal is a block like any other (it counts towards a quarantine).
                self.stats.policy_blocks += 1
                await self._maybe_quarantine(
                    c.subject, c.action == Action.QUARANTINE.value, log_, "a canary read", origin
                )
            elif not c.monitored and c.action == Action.QUARANTINE.value:
                await self._maybe_quarantine(c.subject, True, log_, "a canary read", origin)

    async def _note_end_user(
        self, c: cmd.NoteEndUser, log_: Any, origin: Origin | None = None
    ) -> None:
        """Count an end-user name among its scope's distinct names (the window store's
        distinct records, so workers sharing Redis count one set); alert when there are more
        than the rule allows, once per window and scope (per worker)."""
        try:
            totals = await self.store.record(
                c.scope, f"end_users:{c.rule_id}", 0, (c.name,), (c.window,)
            )
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        names = totals[c.window].records
        if names <= c.max_names:
            return
        now = time.monotonic()
        key = (c.scope, c.rule_id)
        if self._churn_alerted.get(key, float("-inf")) > now - c.window:
            return
        if len(self._churn_alerted) >= 10_000:
            self._churn_alerted.clear()
        self._churn_alerted[key] = now
        self.stats.policy_alerts += 1
        where = "on one connection" if c.scope.startswith("conn:") else "on its connections"
        message = (
            f"{_who(c.subject)}: {names} end-user names {where} in {int(c.window)} s "
            f"(rule {c.rule_id} allows {c.max_names})"
        )
        log_.warning(
            "end_user_churn", subject=c.subject, rule=c.rule_id, names=names,
            limit=c.max_names, scope=c.scope.split(":", 1)[0], monitor=c.monitored,
        )  # fmt: skip
        self.alert("end_user_churn", message, "warning", c.subject, c.rule_id, origin)

    async def _maybe_quarantine(
        self, subject: str, now_: bool, log_: Any, cause: str = "a block",
        origin: Origin | None = None,
    ) -> None:  # fmt: skip
        q = self.policy.quarantine
        if q is None:
            return
        try:
            blocks = await self.store.note_block(subject, q.window)
            if now_ or blocks >= q.after_blocks:
                until = time.time() + q.duration
                await self.store.quarantine(subject, until)
                self.counters.quarantined[subject] = until
                log_.error("subject_quarantined", subject=subject, blocks=blocks, until=until)
                why = cause if now_ else f"{blocks} blocks in {int(q.window)} s"
                self.alert(
                    "quarantine", f"{_who(subject)} quarantined for {int(q.duration)} s after {why}",
                    "critical", subject, "quarantine", origin,
                )  # fmt: skip
        except StoreUnavailable as exc:
            self._store_down(exc)

    async def _store_call(self, call: Awaitable[object]) -> bool:
        """Await one window-store call; a store that cannot be reached fails windows closed."""
        try:
            await call
        except StoreUnavailable as exc:
            self._store_down(exc)
            return False
        self.counters.unavailable = False
        return True

    def _store_down(self, exc: Exception) -> None:
        """Windows fail closed until the store answers again (probed every second)."""
        if not self.counters.unavailable:
            log.error("window_store_unavailable", error=str(exc), effect="windowed reads refused")
            self.alert(
                "store_unavailable", f"window counters unavailable: {exc}", "critical", "-", "store"
            )
        self.counters.unavailable = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_store())

    async def _probe_store(self) -> None:
        ping = getattr(self.store, "ping", None)
        while self.counters.unavailable:
            await asyncio.sleep(1.0)
            try:
                if ping is not None:
                    await ping()
            except StoreUnavailable:
                continue
            self.counters.unavailable = False
            log.info("window_store_available")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.values.close()
        for conn in self._lookup_conns.values():
            await conn.close()
        for catalog in self.catalogs.values():
            await catalog.close()
        await self.store.close()
        if self.trail is not None:
            await self.trail.close()


def _who(subject_key: str) -> str:
    """'person:alice' -> 'alice' (the key window counters use)."""
    return subject_key.split(":", 1)[-1]
