"""A Tracker with the real catalog of the test database, as a session with an audit trail
has it, for tests that feed it server bytes directly."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

from policy.model import Policy
from proxy.messages.backend import Field, RowDescription
from proxy.metrics import Stats
from proxy.policyrt import PolicyRuntime
from proxy.sandbox.cluster import Cluster
from proxy.session import Subject
from proxy.tracker import Tracker
from tests.support_data import DB


def audited_tracker(
    pg: Cluster, policy: dict[str, object] | None = None, *, durable: bool = False
) -> tuple[Tracker, int]:
    """A tracker for ``postgres`` in the test database that follows every statement and
    keeps record keys (as with an audit trail), and the OID of ``customers``."""

    async def setup() -> tuple[Tracker, int]:
        conn = await asyncpg.connect(pg.url(database=DB))
        oid = await conn.fetchval("SELECT 'customers'::regclass::oid")
        await conn.close()
        stats = Stats()
        rt = PolicyRuntime(
            Policy.model_validate(policy or {}), None, (pg.host, pg.port), stats,
            catalog_user="postgres",
        )  # fmt: skip
        await rt.ensure_catalog(DB)
        rt.trail = object()  # as with an audit trail: every session is followed
        tracker = Tracker(rt.make_guard(Subject(user="postgres", database=DB)), stats, 1 << 20)
        rt.trail = None
        await rt.close()  # what the catalog loaded stays; no connection is left behind
        tracker.ledger = True
        tracker.durable = durable
        return tracker, int(oid)

    return asyncio.run(setup())


def customers_head(oid: int, order: Sequence[int] = (0, 1, 2)) -> bytes:
    """The RowDescription of ``SELECT customer_id, full_name, email FROM customers`` (its
    columns in ``order``)."""
    fields = (
        Field("customer_id", oid, 1, 20, 8, -1, 0),
        Field("full_name", oid, 2, 25, -1, -1, 0),
        Field("email", oid, 3, 25, -1, -1, 0),
    )
    return RowDescription(tuple(fields[c] for c in order)).encode()
