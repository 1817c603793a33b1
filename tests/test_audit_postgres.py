"""The PostgreSQL store against a real PostgreSQL: several writers, same answers as SQLite,
fail-closed when the store goes away."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit import query as q
from audit import report_data
from audit.events import AuditEvent, Subject
from audit.ledger import RecordHasher, load_key
from audit.pipeline import (
    AuditConfig,
    AuditTrail,
    AuditUnavailable,
    PostgresSinkConfig,
    SQLiteSinkConfig,
)
from proxy.sandbox.cluster import Cluster
from tests.audit_scenario import EXPECTED_DISTINCT, seed
from tests.test_audit_chain import events as any_event

SUBJ = Subject("app", "support", "helpdesk", "10.9.9.9", True, "gina")


def fresh_db(pg: Cluster, name: str) -> str:
    pg.psql(
        f"DROP DATABASE IF EXISTS {name} WITH (FORCE); CREATE DATABASE {name};", database="postgres"
    )
    return pg.url(database=name)


@pytest.fixture(scope="module")
def seeded(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("pgstore")
    url = fresh_db(pg, "audit_store")
    asyncio.run(seed(tmp, extra_sinks=[PostgresSinkConfig(dsn=url)]))
    return tmp, url


async def _both(seeded: tuple[Path, str], fn: Any) -> tuple[Any, Any]:
    tmp, url = seeded
    lite = q.SQLiteStore(tmp / "audit.db")
    pgs = await q.PostgresStore.connect(url)
    try:
        return await fn(lite), await fn(pgs)
    finally:
        await lite.close()
        await pgs.close()


def test_postgres_store_verifies_and_matches_sqlite(seeded: tuple[Path, str]) -> None:
    lite, pgr = asyncio.run(_both(seeded, lambda s: q.verify(s)))
    assert [r.as_dict() for r in lite] == [r.as_dict() for r in pgr]
    assert all(r.intact for r in pgr)


async def _report(s: q.Store) -> list[Any]:
    """What the HTML report is drawn from, as JSON-able values."""
    d = await report_data.gather(s, None, None, 10)
    people = [
        [p.name, p.totals, sorted(p.received.items()), p.new_records, p.blocked, p.canaries,
         p.quarantines, p.sessions]
        for p in d.people
    ]  # fmt: skip
    return [people, d.more_people, d.overview, d.blocked]


@pytest.mark.parametrize(
    "question",
    [
        lambda s: q.search(s, q.Filters(end_user="mallory")),
        lambda s: q.search(s, q.Filters(relation="customers", min_rows=100, label="pii.email")),
        lambda s: q.sessions(s, q.Filters()),
        lambda s: q.sessions(s, q.Filters(person="mallory")),
        lambda s: q.timeline(s, q.Who(end_user="bob")),
        lambda s: q.timeline(s, q.Who(person="bob"), bucket="1m"),
        lambda s: q.timeline(s, q.Who(db_user="support_app"), bucket="1d"),
        lambda s: q.top(s),
        lambda s: q.blocked(s, q.Filters()),
        lambda s: q.labelled_rows_by_person_minute(s, None, None),
        lambda s: report_data.received_by_minute(s, list(EXPECTED_DISTINCT), None, None),
        lambda s: report_data.new_records_by_minute(s, list(EXPECTED_DISTINCT), None, None),
        lambda s: _report(s),
    ],
)
def test_postgres_and_sqlite_answer_the_same(seeded: tuple[Path, str], question: Any) -> None:
    lite, pgr = asyncio.run(_both(seeded, question))
    # same values and same JSON: no Decimal or datetime leaks out of the PostgreSQL path
    assert lite == pgr
    assert orjson.dumps(lite) == orjson.dumps(pgr)
    assert lite


def test_ledger_questions_on_postgres(seeded: tuple[Path, str]) -> None:
    hasher = RecordHasher(load_key(seeded[0] / "ledger.key"))

    async def counts(s: q.Store) -> dict[str, int]:
        return {
            u: len((await q.records_seen(s, end_user=u, table="customers")).records)
            for u in EXPECTED_DISTINCT
        }

    lite, pgr = asyncio.run(_both(seeded, counts))
    assert lite == pgr == EXPECTED_DISTINCT
    who = asyncio.run(_both(seeded, lambda s: q.who_saw(s, hasher, table="customers", key="125")))
    assert who[0] == who[1]
    assert [r["end_user"] for r in who[1]] == ["bob", "alice", "mallory"]


def test_several_writers_keep_separate_chains(pg: Cluster) -> None:
    url = fresh_db(pg, "audit_multi")

    async def writer(name: str) -> None:
        async with AuditTrail(AuditConfig(sinks=[PostgresSinkConfig(dsn=url)], chain_id=name)) as t:
            await asyncio.gather(
                *(
                    t.submit(
                        AuditEvent.statement_event("s", SUBJ, fingerprint="f", statement="SELECT ?")
                    )
                    for _ in range(300)
                )
            )

    async def go() -> list[q.ChainReport]:
        await asyncio.gather(writer("w1"), writer("w2"), writer("w3"))
        store = await q.PostgresStore.connect(url)
        try:
            return await q.verify(store)
        finally:
            await store.close()

    reports = asyncio.run(go())
    assert sorted(r.chain_id for r in reports) == ["w1", "w2", "w3"]
    assert all(r.intact and r.events == 301 for r in reports), [r.as_dict() for r in reports]
    with psycopg.connect(pg.dsn(database="audit_multi"), autocommit=True) as conn:
        conn.execute(
            "UPDATE pgwarden_audit.events SET rows = 999 WHERE chain_id = 'w2' AND seq = 17"
        )
    bad = asyncio.run(go_verify(url))
    assert {r.chain_id: (r.problems[0].kind, r.problems[0].seq) for r in bad if not r.intact} == {
        "w2": ("edited", 17)
    }


async def go_verify(url: str) -> list[q.ChainReport]:
    store = await q.PostgresStore.connect(url)
    try:
        return await q.verify(store)
    finally:
        await store.close()


def test_store_that_goes_away_fails_closed_unless_another_durable_sink_holds(
    pg: Cluster, tmp_path: Path
) -> None:
    url = fresh_db(pg, "audit_gone")
    ev = AuditEvent.statement_event("s", SUBJ, fingerprint="f", statement="SELECT ?")

    async def go() -> None:
        only_pg = AuditTrail(AuditConfig(sinks=[PostgresSinkConfig(dsn=url)]))
        both = AuditTrail(
            AuditConfig(
                sinks=[SQLiteSinkConfig(path=tmp_path / "a.db"), PostgresSinkConfig(dsn=url)]
            )
        )
        await only_pg.start()
        await both.start()
        assert (await only_pg.submit(ev)).seq == 1
        pg.psql("DROP DATABASE audit_gone WITH (FORCE)", database="postgres")
        with pytest.raises(AuditUnavailable, match="PostgreSQL audit store"):
            await only_pg.submit(ev)
        assert (await both.submit(ev)).seq == 1
        await asyncio.sleep(0.05)
        assert both.stats()["sinks"]["postgres#1"]["failures"] >= 1
        await only_pg.close()
        await both.close()

    asyncio.run(go())


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(any_event(), min_size=1, max_size=6))
def test_any_events_round_trip_through_postgres_and_verify(
    pg: Cluster, batch: list[AuditEvent]
) -> None:
    url = pg.url(database="audit_rt")
    pg.psql("SELECT 1", database="postgres")

    async def go() -> list[q.ChainReport]:
        chain = f"rt-{id(batch)}-{len(batch)}"
        async with AuditTrail(
            AuditConfig(sinks=[PostgresSinkConfig(dsn=url)], chain_id=chain)
        ) as t:
            for e in batch:
                t.submit_nowait(e)
        store = await q.PostgresStore.connect(url)
        try:
            return await q.verify(store, chain_id=chain)
        finally:
            await store.close()

    (rep,) = asyncio.run(go())
    assert rep.intact, rep.problems


@pytest.fixture(scope="module", autouse=True)
def _rt_database(pg: Cluster) -> None:
    fresh_db(pg, "audit_rt")


def test_a_hung_store_neither_hangs_labelled_reads_nor_stalls_other_sinks(
    pg: Cluster, tmp_path: Path
) -> None:
    url = fresh_db(pg, "audit_hung")
    ev = AuditEvent.statement_event("s", SUBJ, fingerprint="f", statement="SELECT ?")
    hung_pg = PostgresSinkConfig(dsn=url, timeout_s=30)

    async def go() -> str:
        only_pg = AuditTrail(
            AuditConfig(sinks=[hung_pg], durable_timeout_s=0.5, chain_id="hung-only-pg")
        )
        both = AuditTrail(
            AuditConfig(
                sinks=[SQLiteSinkConfig(path=tmp_path / "a.db"), hung_pg],
                chain_id="hung-both",
                sink_queue_batches=1,
                sink_stall_s=0.3,
            )
        )
        await only_pg.start()
        await both.start()
        # Another session holds a lock on the store's table: COPY waits, as it would on a
        # store that stopped answering.
        locker = await asyncpg.connect(url)
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE pgwarden_audit.events IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(AuditUnavailable, match=r"within 0\.5 s"):
            await only_pg.submit(ev)
        # SQLite keeps acknowledging while PostgreSQL is stuck; PostgreSQL's batches are set
        # aside for it, not lost.
        for _ in range(5):
            await asyncio.wait_for(both.submit(ev), 5)
            await asyncio.sleep(0.1)
        assert both.stats()["sinks"]["postgres#1"]["failures"] >= 1
        await tx.rollback()
        await locker.close()
        await only_pg.close()
        await both.close()
        assert both.stats()["sinks"]["postgres#1"]["dropped"] == 0
        return both.chain_id

    chain_id = asyncio.run(go())
    # Once the lock is gone PostgreSQL catches up: the whole chain, in order.
    reports = {r.chain_id: r for r in asyncio.run(go_verify(url))}
    assert reports[chain_id].intact and reports[chain_id].events >= 6, reports[chain_id]


def test_a_store_down_at_start_up_is_picked_up_when_it_appears(pg: Cluster, tmp_path: Path) -> None:
    pg.psql("DROP DATABASE IF EXISTS audit_late WITH (FORCE)", database="postgres")
    url = pg.url(database="audit_late")
    ev = AuditEvent.statement_event("s", SUBJ, fingerprint="f", statement="SELECT ?")

    async def go() -> None:
        cfg = AuditConfig(
            sinks=[SQLiteSinkConfig(path=tmp_path / "a.db"), PostgresSinkConfig(dsn=url)],
            chain_id="late",
        )
        async with AuditTrail(cfg) as t:
            # the store's database does not exist yet: SQLite alone acknowledges
            assert (await t.submit(ev)).seq == 1
            # a fresh chain, so the unseen store cannot hold a fork of "late"
            assert t.chain_id.startswith("late~")
            pg.psql("CREATE DATABASE audit_late", database="postgres")
            for _ in range(3):
                await t.submit(ev)
            await asyncio.sleep(0.1)
        store = await q.PostgresStore.connect(url)
        rows = await store.fetch("SELECT seq FROM {events} ORDER BY seq")
        await store.close()
        # events from before the store appeared are missing there, later ones arrived
        assert [r["seq"] for r in rows][-3:] == [3, 4, 5]

    asyncio.run(go())


def test_no_literal_reaches_the_postgresql_store(seeded: tuple[Path, str], pg: Cluster) -> None:
    # The scenario's blocked COPY carried 'carol@example.com' and alice's ledger the same
    # address as a labelled value; neither may appear anywhere in the store.
    with psycopg.connect(pg.dsn(database="audit_store")) as conn:
        dump = conn.execute(
            "SELECT string_agg(t::text, E'\\n') FROM pgwarden_audit.events t"
        ).fetchone()
        ledger = conn.execute(
            "SELECT string_agg(encode(digests, 'escape'), '') FROM pgwarden_audit.ledger"
        ).fetchone()
    assert dump is not None and ledger is not None
    assert "carol" not in dump[0].lower()
    assert "WHERE email = ?" in dump[0]
    assert "carol" not in ledger[0].lower()


def test_policy_learn_reads_the_postgresql_store_as_it_reads_sqlite(
    seeded: tuple[Path, str],
) -> None:
    """``pgwarden policy learn --dsn``: the same shapes, counts and times from either store."""
    from audit.learn import learn
    from policy.model import Policy

    policy = Policy.model_validate({"subjects": {"helpdesk": {"users": ["support_app"]}}})

    async def shapes(s: q.Store) -> dict[str, tuple[object, ...]]:
        got, _n = await learn(s, policy, ["helpdesk"], None, None)
        return {
            fp: (e.text, sorted(e.labels), e.max_records, e.seen, e.first_seen, e.last_seen)
            for fp, e in got.items()
        }

    lite, pgr = asyncio.run(_both(seeded, shapes))
    assert lite == pgr
    assert lite and any(seen > 1 for _t, _l, _m, seen, _f, _l2 in lite.values())
