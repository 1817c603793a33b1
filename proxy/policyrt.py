"""The policy as the running proxy holds it: catalogs, analyser, engine, window counters.

One ``PolicyRuntime`` per process.  Catalogs are per database (a session's names resolve in
the database it connected to) and are loaded before that database's first session goes
ahead, so no statement is ever judged against an empty catalog.  The window store is the
seam to memory or Redis; when it cannot be reached, subjects with limits fail closed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import Any

import structlog

from audit.events import AuditEvent
from audit.events import Subject as AuditSubject
from audit.pipeline import AuditTrail, AuditUnavailable
from policy.analyze import Analyzer
from policy.catalog import Catalog
from policy.engine import Engine, Subject
from policy.model import Action, Policy, load_policy
from policy.state import StoreUnavailable, WindowStore, open_window_store
from proxy import commands as cmd
from proxy.guard import Guard
from proxy.metrics import Stats
from proxy.session import Subject as SessionSubject

log = structlog.get_logger("pgwarden.policy")


class _Counters:
    """The engine's synchronous view of the window store (see ``policy.engine.CountersView``)."""

    def __init__(self, store: WindowStore) -> None:
        self.store = store
        self.quarantined: dict[str, float] = {}
        self.unavailable = False

    def cached_totals(self, subject: str, label: str, window: float) -> tuple[int, int] | None:
        totals = self.store.cached_totals(subject, label, window)
        return None if totals is None else (totals.rows, totals.records)

    def cached_quarantine(self, subject: str) -> float | None:
        return self.quarantined.get(subject)


class PolicyRuntime:
    def __init__(
        self,
        policy: Policy,
        source: Path | None,
        upstream: tuple[str, int],
        stats: Stats,
        ssl: Any = None,
        catalog_user: str | None = None,
    ) -> None:
        self.source = source
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
        self._install(policy)

    def _install(self, policy: Policy) -> None:
        self.policy = policy
        self.label_rules = policy.label_rules()
        self.engine = Engine(policy, self.counters)
        self.analyzers: dict[str, Analyzer] = {}
        for catalog in self.catalogs.values():
            catalog.set_rules(self.label_rules)

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

    # --- catalogs ----------------------------------------------------------------------------

    async def ensure_catalog(self, database: str) -> None:
        """Load the database's catalog before its first session goes on (once)."""
        if database in self.catalogs:
            return
        task = self._loading.get(database)
        if task is None:
            task = asyncio.create_task(self._load_catalog(database))
            self._loading[database] = task
        try:
            self.catalogs[database] = await task
        finally:
            self._loading.pop(database, None)

    async def _load_catalog(self, database: str) -> Catalog:
        import asyncpg

        host, port = self.upstream
        user = (
            self.catalog_user
            or self.policy.catalog_user
            or os.environ.get("PGWARDEN_CATALOG_USER")
            or "postgres"
        )
        password = (
            os.environ.get(self.policy.catalog_password_env)
            if self.policy.catalog_password_env
            else None
        )

        async def connect() -> Any:
            return await asyncpg.connect(
                host=host, port=port, user=user, password=password, database=database,
                ssl=self.ssl, server_settings={"application_name": "pgwarden-catalog"},
            )  # fmt: skip

        catalog = Catalog(connect, rules=self.label_rules)
        await catalog.start()
        log.info("catalog_loaded", database=database, relations=len(catalog.snapshot.relations))
        return catalog

    def invalidate(self, database: str) -> None:
        catalog = self.catalogs.get(database)
        if catalog is not None:
            catalog.invalidate()

    # --- sessions ----------------------------------------------------------------------------

    def make_guard(self, s: SessionSubject) -> Guard | None:
        catalog = self.catalogs.get(s.database)
        if catalog is None:
            return None
        analyzer = self.analyzers.get(s.database)
        if analyzer is None:
            analyzer = Analyzer(catalog, self.label_rules)
            self.analyzers[s.database] = analyzer
        subject = Subject(s.user, s.database, s.application_name, s.client_addr, None, frozenset())
        guard = Guard(self.engine, analyzer, subject, self.record_key, audit=self.trail is not None)
        guard.set_options(s.options)
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
        return AuditEvent.statement_event(
            session_id,
            self.audit_subject(s, c.end_user),
            fingerprint=f.fingerprint if f is not None else "",
            statement=f.normalized if f is not None else "",
            relations=sorted(f.relations_read) if f is not None else (),
            labels=sorted(f.output_labels) if f is not None else (),
            rows=c.rows,
            bytes=c.nbytes,
            duration_ms=c.seconds * 1000.0,
            verdict=c.verdict,
            rule_ids=c.rule_ids,
            sqlstate=c.sqlstate,
            ledger_keys={
                t: [k.decode("utf-8", "replace") for k in keys] for t, keys in c.records.items()
            }
            or None,
        )

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

    async def audit_durable(self, c: cmd.StatementDone, session_id: str, s: SessionSubject) -> bool:
        """Persist a labelled statement's event; False when no durable sink could."""
        ev = self.statement_event(c, session_id, s)
        if ev is None or self.trail is None:
            return True
        try:
            await self.trail.submit(ev)
            return True
        except AuditUnavailable as exc:
            self.stats.audit_failures += 1
            log.error("audit_unavailable", error=str(exc), refused="labelled read")
            return False

    def alert(self, kind: str, message: str, severity: str, subject: str, rule_id: str,
              session_id: str | None = None) -> None:  # fmt: skip
        if self.trail is None:
            return
        try:
            self.trail.alert(
                kind, message, severity=severity, session_id=session_id, rule_ids=(rule_id,),
                details={"subject": subject},
            )  # fmt: skip
        except AuditUnavailable as exc:
            log.error("alert_not_recorded", error=str(exc))

    async def handle(self, c: cmd.Command, log_: Any) -> None:
        """Carry out a policy command from a session (counters, quarantine, alerts)."""
        if isinstance(c, cmd.RecordUsage):
            try:
                await self.store.record(c.subject, c.label, c.rows, c.records, c.windows)
                self.counters.unavailable = False
            except StoreUnavailable as exc:
                self.counters.unavailable = True
                log_.error("window_store_unavailable", error=str(exc))
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
            self.alert("block", f"{_who(c.subject)}: {c.message}", "warning", c.subject, c.rule_id)
            if c.rule_id != "quarantine":
                # A refusal because the subject is already quarantined is no new offence:
                # counting it would re-quarantine (and re-alert) on every statement.
                await self._maybe_quarantine(
                    c.subject, c.action == Action.QUARANTINE.value, log_, f"rule {c.rule_id}"
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
            )
            self.alert(
                "canary", f"{_who(c.subject)} read a canary record (rule {c.rule_id})",
                "critical", c.subject, c.rule_id,
            )  # fmt: skip
            if not c.monitored and c.action == Action.QUARANTINE.value:
                await self._maybe_quarantine(c.subject, True, log_, "a canary read")

    async def _maybe_quarantine(
        self, subject: str, now_: bool, log_: Any, cause: str = "a block"
    ) -> None:
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
                    "critical", subject, "quarantine",
                )  # fmt: skip
        except StoreUnavailable as exc:
            log_.error("window_store_unavailable", error=str(exc))

    async def close(self) -> None:
        for catalog in self.catalogs.values():
            await catalog.close()
        await self.store.close()
        if self.trail is not None:
            await self.trail.close()


def _who(subject_key: str) -> str:
    """'end_user:alice' -> 'alice', 'user:bob' -> 'bob' (the key window counters use)."""
    return subject_key.split(":", 1)[-1]
