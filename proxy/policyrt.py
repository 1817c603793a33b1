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
from policy.state import StoreUnavailable, WindowStore, open_window_store

from policy.analyze import Analyzer
from policy.catalog import Catalog
from policy.engine import Engine, Subject
from policy.model import Action, Policy, load_policy
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
        guard = Guard(self.engine, analyzer, subject, self.record_key)
        guard.set_options(s.options)
        return guard

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
            await self._maybe_quarantine(c.subject, c.action == Action.QUARANTINE.value, log_)
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
            if not c.monitored and c.action == Action.QUARANTINE.value:
                await self._maybe_quarantine(c.subject, True, log_)

    async def _maybe_quarantine(self, subject: str, now_: bool, log_: Any) -> None:
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
        except StoreUnavailable as exc:
            log_.error("window_store_unavailable", error=str(exc))

    async def close(self) -> None:
        for catalog in self.catalogs.values():
            await catalog.close()
        await self.store.close()
