"""A small customer-support database for enforcement and audit tests (module-scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.sandbox.cluster import Cluster, schema_sql

DB = "enforce"
POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"


def policy_naming_as_dba(directory: Path) -> Path:
    """The shipped policy with the DBA's sessions trusted to name an end user (comment or
    SET): the audit tests tag each scenario's statements with a name of its own that way.
    (The shipped policy trusts names from the helpdesk account only.)"""
    import yaml

    policy = yaml.safe_load(POLICY.read_text())
    policy["subjects"]["dba"]["end_user_from"] = ["comment", "set"]
    path = directory / "policy-dba-names.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


CUSTOMERS = 400

DATA = f"""
INSERT INTO agents (agent_id, username, full_name, email, team)
SELECT i, 'agent' || i, 'Agent ' || i, 'agent' || i || '@support.example', 'tech'
FROM generate_series(1, 3) i;
INSERT INTO customers (customer_id, full_name, email, phone, country, tier)
SELECT i, 'Customer ' || i,
       CASE WHEN i = 333 THEN 'canary-1@pgwarden-canary.example' ELSE 'customer' || i || '@mail.example' END,
       '+4420' || lpad(i::text, 7, '0'), 'GB', CASE WHEN i % 10 = 0 THEN 'vip' ELSE 'standard' END
FROM generate_series(1, {CUSTOMERS}) i;
INSERT INTO tickets (ticket_id, ticket_number, customer_id, assigned_agent_id, subject)
SELECT i, 'TM-' || lpad(i::text, 7, '0'), i, 1 + i % 3, 'help' FROM generate_series(1, {CUSTOMERS}) i;
INSERT INTO products VALUES (1, 'Widget', 'tools');
"""


@pytest.fixture(scope="module")
def enforce_db(pg: Cluster) -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {DB}; CREATE DATABASE {DB};", database="postgres")
    pg.psql(schema_sql() + DATA, database=DB)
    pg.psql(
        "GRANT USAGE ON SCHEMA public, reporting TO support_app, analyst;\n"
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO support_app, analyst;\n"
        "GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO support_app, analyst;\n"
        "GRANT CREATE ON SCHEMA public TO support_app;",
        database=DB,
    )
    return DB
