"""Catalog loading from a real PostgreSQL, RowDescription mapping, refresh and invalidation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from policy.analyze import Analyzer
from policy.catalog import Catalog, CatalogSnapshot, load_catalog
from policy.labels import LabelRules, parse_comment_labels
from proxy.sandbox.cluster import Cluster, schema_sql

DB = "analysis_catalog"


@pytest.fixture(scope="module")
def catalog_db(pg: Cluster) -> Iterator[str]:
    pg.psql(f"DROP DATABASE IF EXISTS {DB}; CREATE DATABASE {DB};", database="postgres")
    pg.psql(
        schema_sql()
        + """
        CREATE TABLE notes (id int PRIMARY KEY, body text);
        COMMENT ON COLUMN notes.body IS 'free text. pgwarden: pii.name, support.note';
        CREATE FUNCTION all_emails() RETURNS SETOF text LANGUAGE sql
            AS 'SELECT email FROM public.customers';
        CREATE FUNCTION sneaky(t text) RETURNS SETOF record LANGUAGE plpgsql AS $$
            BEGIN RETURN QUERY EXECUTE 'SELECT * FROM ' || t; END $$;
        CREATE VIEW reporting.emails_upper AS SELECT upper(email) AS e FROM customers;
        CREATE FUNCTION static_pl() RETURNS SETOF text LANGUAGE plpgsql AS $$
            BEGIN RETURN QUERY SELECT phone FROM public.customers; END $$;
        CREATE FUNCTION out_pl(OUT a text, OUT b text) LANGUAGE plpgsql AS $$
            BEGIN SELECT full_name, street INTO a, b FROM public.customers LIMIT 1; END $$;
        CREATE FUNCTION atomic_phone() RETURNS text BEGIN ATOMIC
            SELECT max(phone) FROM public.customers; END;
        CREATE FUNCTION return_city() RETURNS text RETURN (SELECT min(city) FROM public.customers);
        SET check_function_bodies = off;
        CREATE FUNCTION loop_a() RETURNS SETOF text LANGUAGE sql
            AS 'SELECT email FROM public.customers UNION ALL SELECT * FROM public.loop_a()';
        CREATE TABLE contacts_part (id int, email text) PARTITION BY RANGE (id);
        COMMENT ON COLUMN contacts_part.email IS 'pgwarden: pii.email';
        CREATE TABLE contacts_p1 PARTITION OF contacts_part FOR VALUES FROM (0) TO (1000);
        CREATE TABLE customers_legacy (note text) INHERITS (customers);
        """,
        database=DB,
    )
    yield f"postgresql://postgres@{pg.host}:{pg.port}/{DB}"


async def _load(url: str) -> CatalogSnapshot:
    conn = await asyncpg.connect(url)
    try:
        return await load_catalog(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def snapshot(catalog_db: str) -> CatalogSnapshot:
    return asyncio.run(_load(catalog_db))


def test_loaded_snapshot_has_relations_columns_keys_and_comment_labels(
    snapshot: CatalogSnapshot,
) -> None:
    customers = snapshot.relation("public", "customers")
    assert customers is not None and customers.kind == "r"
    assert customers.primary_key == ("customer_id",)
    email = customers.column("email")
    assert email is not None and email.labels == {"pii.email"} and email.type_name == "text"
    assert [c.attnum for c in customers.columns] == list(range(1, 11))
    notes = snapshot.relation("public", "notes")
    assert notes is not None and notes.column("body").labels == {"pii.name", "support.note"}  # type: ignore[union-attr]
    view = snapshot.relation("reporting", "vip_contacts")
    assert (
        view is not None and view.is_view and "reporting.customer_contacts" in (view.view_sql or "")
    )
    assert snapshot.relation("pg_catalog", "pg_class") is not None
    assert {"public", "reporting", "pg_catalog"} <= snapshot.schemas


def test_column_at_maps_row_description_fields_back_to_labelled_columns(
    catalog_db: str, snapshot: CatalogSnapshot
) -> None:
    with psycopg.connect(catalog_db) as conn:
        cur = conn.execute("SELECT c.phone, t.ticket_number, 1 AS one FROM customers c, tickets t")
        res = cur.pgresult
        assert res is not None
        fields = [snapshot.column_at(res.ftable(i), res.ftablecol(i)) for i in range(res.nfields)]
    assert fields[0] is not None and fields[0].qualified == "public.customers.phone"
    assert fields[0].labels == {"pii.phone"}
    assert fields[1] is not None and fields[1].labels == {"support.ticket"}
    assert fields[2] is None


def test_views_loaded_from_postgres_expand_to_base_columns(snapshot: CatalogSnapshot) -> None:
    a = Analyzer(snapshot)
    (f,) = a.analyze("SELECT e FROM reporting.emails_upper", ("public",))
    assert f.output_labels == {"pii.email"}
    assert f.relations_read == {"reporting.emails_upper", "public.customers"}


def test_function_bodies_are_followed_and_dynamic_sql_is_unanalysable(
    snapshot: CatalogSnapshot,
) -> None:
    a = Analyzer(snapshot)
    (f,) = a.analyze("SELECT * FROM all_emails()", ("public",))
    assert f.output_labels == {"pii.email"} and "public.all_emails" in f.user_functions
    (g,) = a.analyze("SELECT all_emails()", ("public",))
    assert g.output_labels == {"pii.email"}
    (p,) = a.analyze("SELECT static_pl()", ("public",))
    assert p.output_labels == {"pii.phone"} and p.unanalysable is None
    assert p.relations_read == {"public.customers"}
    (o,) = a.analyze("SELECT * FROM out_pl()", ("public",))
    assert o.output_labels == {"pii.name", "pii.address"} and o.unanalysable is None
    (sb,) = a.analyze("SELECT atomic_phone(), return_city()", ("public",))
    assert sb.output_labels == {"pii.phone", "pii.address"} and sb.unanalysable is None
    (r,) = a.analyze("SELECT loop_a()", ("public",))
    assert r.output_labels == {"pii.email"} and r.unanalysable is None
    (h,) = a.analyze("SELECT * FROM sneaky('customers') AS x(a text)", ("public",))
    assert h.unanalysable and "dynamic SQL" in h.unanalysable


def test_partitions_and_inheritance_children_carry_their_parents_labels(
    snapshot: CatalogSnapshot,
) -> None:
    a = Analyzer(snapshot)
    assert a.analyze("SELECT email FROM contacts_p1")[0].output_labels == {"pii.email"}
    (f,) = a.analyze("SELECT * FROM customers_legacy")
    assert f.output_labels == {"pii.name", "pii.email", "pii.phone", "pii.address"}
    ruled = Analyzer(snapshot, LabelRules((("public.customers.tier", "customer.tier"),)))
    assert ruled.analyze("SELECT tier FROM customers_legacy")[0].output_labels == {"customer.tier"}


def test_calls_to_functions_missing_from_the_catalog_are_unanalysable(
    snapshot: CatalogSnapshot,
) -> None:
    a = Analyzer(snapshot)
    assert (
        a.analyze("SELECT lower(email), count(*) FROM customers GROUP BY 1")[0].unanalysable is None
    )
    (f,) = a.analyze("SELECT created_since_refresh()")
    assert f.unanalysable and "not in the catalog" in f.unanalysable
    # Defined through the proxy: followed at once, before any refresh.
    create, call = a.analyze(
        "CREATE FUNCTION created_since_refresh() RETURNS SETOF text LANGUAGE sql"
        " AS 'SELECT email FROM customers'; SELECT created_since_refresh()"
    )
    assert create.kind == "create_function" and create.is_ddl
    assert call.unanalysable is None and call.output_labels == {"pii.email"}


def test_label_rules_apply_on_top_of_comments(snapshot: CatalogSnapshot) -> None:
    labelled = snapshot.with_rules(LabelRules((("public.customers.tier", "customer.tier"),)))
    cust = labelled.relation("public", "customers")
    assert cust is not None
    assert cust.column("tier").labels == {"customer.tier"}  # type: ignore[union-attr]
    assert cust.column("email").labels == {"pii.email"}  # type: ignore[union-attr]
    assert labelled.version == snapshot.version


def test_catalog_holder_refreshes_on_invalidate(pg: Cluster, catalog_db: str) -> None:
    async def scenario() -> None:
        catalog = Catalog(lambda: asyncpg.connect(catalog_db), refresh_interval=3600)
        await catalog.start()
        try:
            first = catalog.snapshot
            analyzer = Analyzer(catalog)
            assert analyzer.analyze("SELECT body FROM notes")[0].output_labels == {
                "pii.name", "support.note",
            }  # fmt: skip
            conn = await asyncpg.connect(catalog_db)
            try:
                await conn.execute("COMMENT ON COLUMN notes.body IS 'pgwarden: support.note'")
            finally:
                await conn.close()
            catalog.invalidate()
            for _ in range(100):
                if catalog.snapshot is not first:
                    break
                await asyncio.sleep(0.02)
            assert catalog.snapshot is not first
            assert analyzer.analyze("SELECT body FROM notes")[0].output_labels == {"support.note"}
        finally:
            await catalog.close()

    asyncio.run(scenario())


def test_snapshot_without_a_database_raises_a_clear_error_before_loading() -> None:
    catalog = Catalog(lambda: asyncpg.connect("postgresql://nobody@127.0.0.1:1/x"))
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = catalog.snapshot


@pytest.mark.parametrize(
    ("comment", "labels"),
    [
        ("pgwarden: pii.email", {"pii.email"}),
        ("pgwarden: pii.email, pii.name", {"pii.email", "pii.name"}),
        ("Customer's e-mail. PGWARDEN: Pii.Email", {"pii.email"}),
        ("no labels here", set()),
        (None, set()),
    ],
)
def test_comment_labels(comment: str | None, labels: set[str]) -> None:
    assert parse_comment_labels(comment) == labels


def test_catalog_holder_refreshes_on_its_interval_and_survives_failures(catalog_db: str) -> None:
    async def scenario() -> None:
        attempts = 0

        async def connect() -> asyncpg.Connection:
            nonlocal attempts
            attempts += 1
            if attempts == 2:
                raise OSError("database briefly unreachable")
            return await asyncpg.connect(catalog_db)

        # No idle time: every refresh opens a new connection (and the second one fails).
        catalog = Catalog(connect, refresh_interval=0.05, idle_timeout=0)
        await catalog.start()
        try:
            first = catalog.snapshot
            for _ in range(200):
                if attempts >= 3 and catalog.last_error is None:
                    break
                await asyncio.sleep(0.02)
            assert attempts >= 3
            assert catalog.last_error is None
            # Nothing changed in the database: the snapshot in force stays.
            assert catalog.snapshot is first
            assert catalog.snapshot.relation("public", "customers") is not None
        finally:
            await catalog.close()

    asyncio.run(scenario())


def test_interval_reloads_keep_an_unchanged_snapshot_and_load_a_changed_one(
    catalog_db: str,
) -> None:
    """The scheduled reload (every minute by default) built a new snapshot even when nothing
    had changed: each one emptied the analyser's cache and every session's caches keyed by
    the snapshot, and pgwarden's RSS grew with the reloads (make soak: 537 KiB/min)."""

    async def scenario() -> None:
        connects = 0

        async def connect() -> asyncpg.Connection:
            nonlocal connects
            connects += 1
            return await asyncpg.connect(catalog_db)

        # No idle time: every reload opens a connection, so ``connects`` counts them.
        catalog = Catalog(connect, refresh_interval=0.05, idle_timeout=0)
        await catalog.start()
        admin = await asyncpg.connect(catalog_db)
        try:
            first = catalog.snapshot
            analyzer = Analyzer(catalog)
            facts = analyzer.analyze("SELECT body FROM notes")
            for _ in range(500):
                if connects >= 5:
                    break
                await asyncio.sleep(0.02)
            assert connects >= 5
            assert catalog.snapshot is first
            assert (catalog.reloads, catalog.unchanged >= 3) == (1, True)
            assert analyzer.analyze("SELECT body FROM notes") is facts  # still cached
            # A change made straight in PostgreSQL (no invalidate()): the next reload has it.
            await admin.execute(
                "CREATE TABLE interval_probe (id int PRIMARY KEY, email text);"
                " COMMENT ON COLUMN interval_probe.email IS 'pgwarden: pii.email'"
            )
            for _ in range(500):
                if catalog.snapshot is not first:
                    break
                await asyncio.sleep(0.02)
            assert catalog.snapshot is not first
            assert catalog.reloads == 2
            probe = catalog.snapshot.relation("public", "interval_probe")
            assert probe is not None and probe.column("email").labels == {"pii.email"}  # type: ignore[union-attr]
            assert analyzer.analyze("SELECT email FROM interval_probe")[0].output_labels == {
                "pii.email"
            }
        finally:
            await admin.execute("DROP TABLE IF EXISTS interval_probe")
            await admin.close()
            await catalog.close()

    asyncio.run(scenario())


def test_closing_ends_the_refresh_loop_even_when_a_cancellation_is_swallowed(
    catalog_db: str,
) -> None:
    # Python 3.11's asyncio.wait_for (and asyncpg's connect, which uses it) can swallow a
    # cancellation that arrives as the awaited thing completes: the refresh loop then went
    # on to sleep a whole interval, and `pgwarden serve` did not exit after SIGTERM (seen by
    # the red team after a DDL woke the loop just before shutdown). Here the connect step
    # swallows the cancellation on purpose; close() must still end the loop at once.
    async def scenario() -> None:
        swallowing = asyncio.Event()

        async def connect() -> asyncpg.Connection:
            if swallowing.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(30)
            return await asyncpg.connect(catalog_db)

        catalog = Catalog(connect, refresh_interval=3600, idle_timeout=0)
        await catalog.start()
        swallowing.set()
        catalog.invalidate()  # a DDL statement: the loop reconnects to reload
        await asyncio.sleep(0.2)
        task = catalog._task
        started = time.monotonic()
        await asyncio.wait_for(catalog.close(), 15)
        assert time.monotonic() - started < 12
        assert task is not None
        await asyncio.wait({task}, timeout=5)
        assert task.done()

    asyncio.run(scenario())
