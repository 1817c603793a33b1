"""The support-database generator: counts, canaries, determinism, labels."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from proxy.sandbox.cluster import Cluster
from proxy.sandbox.supportdb import (
    CANARY_DOMAIN,
    GenerationReport,
    build_rows,
    counts_for,
    generate,
)

CUSTOMERS = 3_000
E164 = re.compile(r"^\+[1-9]\d{7,14}$")
TICKET_NUMBER = re.compile(r"^TM-\d{7}$")


def _fresh_database(pg: Cluster, name: str) -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name};", database="postgres")
    return pg.url(database=name)


def _table_digest(pg: Cluster, database: str) -> dict[str, str]:
    """md5 of every table's rows in key order: equal digests mean equal contents."""
    keys = {
        "customers": "customer_id",
        "agents": "agent_id",
        "tickets": "ticket_id",
        "ticket_messages": "message_id",
        "products": "product_id",
    }
    out = {}
    for table, key in keys.items():
        out[table] = pg.psql(
            f"SELECT md5(string_agg(t::text, '|' ORDER BY {key})) FROM {table} t", database=database
        ).strip()
    return out


@pytest.fixture(scope="module")
def generated(pg: Cluster) -> Iterator[tuple[GenerationReport, str]]:
    # Own databases: the session cluster's 'support' database belongs to other tests too.
    url = _fresh_database(pg, "gen_a")
    report = asyncio.run(generate(url, customers=CUSTOMERS, seed=11))
    yield report, "gen_a"


def test_build_rows_is_deterministic_per_seed() -> None:
    rows_a, canaries_a = build_rows(1_000, seed=3)
    rows_b, canaries_b = build_rows(1_000, seed=3)
    rows_c, _ = build_rows(1_000, seed=4)
    assert rows_a == rows_b
    assert canaries_a == canaries_b
    assert rows_a["customers"] != rows_c["customers"]


def test_counts_are_the_ones_asked_for(
    pg: Cluster, generated: tuple[GenerationReport, str]
) -> None:
    report, db = generated
    n_agents, n_tickets = counts_for(CUSTOMERS)
    assert report.counts["customers"] == CUSTOMERS
    assert report.counts["agents"] == n_agents == 6
    assert report.counts["tickets"] == n_tickets == 4_500
    # One to five messages per ticket, three on average.
    per_ticket = report.counts["ticket_messages"] / n_tickets
    assert 2.8 < per_ticket < 3.2
    for table, expected in report.counts.items():
        assert int(pg.psql(f"SELECT count(*) FROM {table}", database=db)) == expected
    assert pg.psql("SELECT min(agent_id) FROM agents", database=db).strip() == "1"
    assert pg.psql("SELECT username FROM agents WHERE agent_id = 6", database=db).strip() == (
        "agent006"
    )


def test_rows_look_like_support_data(pg: Cluster, generated: tuple[GenerationReport, str]) -> None:
    _, db = generated
    phones = pg.psql("SELECT phone FROM customers WHERE phone IS NOT NULL", database=db).split()
    assert phones and all(E164.match(p) for p in phones)
    numbers = pg.psql("SELECT ticket_number FROM tickets", database=db).split()
    assert all(TICKET_NUMBER.match(n) for n in numbers)
    tiers = set(pg.psql("SELECT DISTINCT tier FROM customers", database=db).split())
    assert "vip" in tiers and "standard" in tiers
    statuses = set(pg.psql("SELECT DISTINCT status FROM tickets", database=db).split())
    assert statuses == {"open", "pending", "closed"}
    dupes = pg.psql("SELECT count(*) - count(DISTINCT email) FROM customers", database=db)
    assert int(dupes) == 0
    # The reporting views work over generated data.
    assert int(pg.psql("SELECT count(*) FROM reporting.vip_contacts", database=db)) > 0


def test_canaries_are_planted_and_listed(
    pg: Cluster, generated: tuple[GenerationReport, str]
) -> None:
    report, db = generated
    assert len(report.canaries) == 5
    for canary in report.canaries:
        row = pg.psql(
            f"SELECT email, full_name FROM customers WHERE customer_id = {canary.customer_id}",
            database=db,
        ).strip()
        assert row == f"{canary.email}|{canary.full_name}"
        assert canary.email.endswith("@" + CANARY_DOMAIN)
        assert canary.ticket_number is not None
        owner = pg.psql(
            f"SELECT customer_id, status FROM tickets WHERE ticket_number = '{canary.ticket_number}'",
            database=db,
        ).strip()
        # Closed: no agent's queue leads to a canary, only a sweep does.
        assert owner == f"{canary.customer_id}|closed"
        tickets = pg.psql(
            f"SELECT count(*) FROM tickets WHERE customer_id = {canary.customer_id}", database=db
        ).strip()
        assert tickets == "1"
    in_db = int(
        pg.psql(f"SELECT count(*) FROM customers WHERE email LIKE '%@{CANARY_DOMAIN}'", database=db)
    )
    assert in_db == len(report.canaries)


def test_labels_are_in_column_comments(
    pg: Cluster, generated: tuple[GenerationReport, str]
) -> None:
    _, db = generated
    labels = pg.psql(
        "SELECT c.relname || '.' || a.attname || '=' || d.description "
        "FROM pg_description d JOIN pg_class c ON c.oid = d.objoid "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid "
        "WHERE d.description LIKE 'pgwarden:%' ORDER BY 1",
        database=db,
    ).split("\n")
    assert "customers.email=pgwarden: pii.email" in labels
    assert "customers.phone=pgwarden: pii.phone" in labels
    assert "customers.full_name=pgwarden: pii.name" in labels
    assert "tickets.ticket_number=pgwarden: support.ticket" in labels


def test_same_seed_gives_same_database(
    pg: Cluster, generated: tuple[GenerationReport, str]
) -> None:
    report_a, db_a = generated
    url_b = _fresh_database(pg, "gen_b")
    report_b = asyncio.run(generate(url_b, customers=CUSTOMERS, seed=11))
    assert report_b.counts == report_a.counts
    assert report_b.canaries == report_a.canaries
    assert _table_digest(pg, "gen_b") == _table_digest(pg, db_a)
    # Generating again into a filled database replaces the rows, and another seed differs.
    asyncio.run(generate(url_b, customers=CUSTOMERS, seed=12))
    assert _table_digest(pg, "gen_b")["customers"] != _table_digest(pg, db_a)["customers"]


def test_command_line_prints_manifest(pg: Cluster) -> None:
    _fresh_database(pg, "gen_cli")
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.sandbox.supportdb", "--dsn", pg.dsn(database="gen_cli"),
         "--customers", "400", "--seed", "5"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["counts"]["customers"] == 400
    assert report["canaries"] and all(
        c["email"].endswith("@" + CANARY_DOMAIN) for c in report["canaries"]
    )
