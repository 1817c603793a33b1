"""Enforcement that does not depend on the schema or on a list of bad shapes.

A database laid out unlike the shipped one: the customer tables live in schema ``crm`` and
each agent logs in as a role of their own whose ``search_path`` is set by ``ALTER ROLE ...
SET`` (one agent) or ``ALTER ROLE ... IN DATABASE ... SET`` (another), the usual ways to place
an application's tables outside ``public``.  Names must resolve as the server resolves them;
a name pgwarden cannot find is refused, never taken for unlabelled; and labelled values of
many records combined into one value are refused whatever function or construct combines
them.  Every test asserts what the client received.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess

DB = "crmsound"
CUSTOMERS = 300

SCHEMA = f"""
CREATE SCHEMA crm;
CREATE TABLE crm.customers (id int PRIMARY KEY, full_name text, email text, phone text);
CREATE TABLE crm.tickets (id int PRIMARY KEY, customer_id int REFERENCES crm.customers,
                          agent text, subject text);
INSERT INTO crm.customers
SELECT i, 'Name ' || i, 'person' || i || '@crm.example', '+1555' || lpad(i::text, 6, '0')
FROM generate_series(1, {CUSTOMERS}) i;
INSERT INTO crm.tickets SELECT i, i, CASE WHEN i % 2 = 0 THEN 'agent_rs' ELSE 'agent_db' END,
       'subject ' || i FROM generate_series(1, {CUSTOMERS}) i;
CREATE VIEW crm.contact_list AS SELECT id, email FROM crm.customers;
CREATE TYPE crm.ticket_state AS ENUM ('open', 'closed');
ANALYZE crm.customers;
"""

ROLES = f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_rs') THEN CREATE ROLE agent_rs LOGIN; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_db') THEN CREATE ROLE agent_db LOGIN; END IF;
END $$;
SET password_encryption = 'scram-sha-256';
ALTER ROLE agent_rs PASSWORD 'agent-pw';
ALTER ROLE agent_db PASSWORD 'agent-pw';
ALTER ROLE agent_rs SET search_path = crm, public;
ALTER ROLE agent_db IN DATABASE {DB} SET search_path = crm, public;
"""

FUNCTIONS = """
CREATE FUNCTION crm.contact_of(i int) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = crm AS $$ SELECT email FROM customers WHERE id = i $$;
CREATE FUNCTION crm.noisy(i int) RETURNS int LANGUAGE plpgsql AS $$
DECLARE e text;
BEGIN
  SELECT email INTO e FROM crm.customers WHERE id = i;
  RAISE NOTICE 'looked at %', e;
  RETURN 1;
END $$;
"""

GRANTS = """
GRANT USAGE ON SCHEMA crm TO agent_rs, agent_db;
GRANT SELECT ON ALL TABLES IN SCHEMA crm TO agent_rs, agent_db;
"""

POLICY = {
    "version": 1,
    "mode": "enforce",
    "fail_closed": True,
    "labels": [
        {"column": "crm.customers.full_name", "label": "pii.name"},
        {"column": "crm.customers.email", "label": "pii.email"},
        {"column": "crm.customers.phone", "label": "pii.phone"},
    ],
    "subjects": {"agents": {"users": ["agent_*"]}, "dba": {"users": ["postgres"]}},
    "rules": [
        {
            "id": "agent-statement-rows",
            "subjects": ["agents"],
            "labels": ["pii.*"],
            "max_rows": 20,
            "action": "block",
        },
        {
            "id": "agent-hourly-records",
            "subjects": ["agents"],
            "labels": ["pii.*"],
            "window": "1h",
            "max_records": 200,
            "action": "block",
        },
    ],
}


@pytest.fixture(scope="module")
def crm_db(pg: Cluster) -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {DB}; CREATE DATABASE {DB};", database="postgres")
    pg.psql(ROLES, database="postgres")
    pg.psql(SCHEMA + FUNCTIONS + GRANTS, database=DB)
    return DB


@pytest.fixture
def proxy(pg: Cluster, crm_db: str, tmp_path: Path) -> Iterator[ProxyProcess]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    p = ProxyProcess(
        pg, tmp_path / "proxy", ["--policy", str(policy), "--catalog-user", "postgres"]
    )
    yield p
    assert p.stop() == 0, p.log()


def connect(p: ProxyProcess, user: str) -> psycopg.Connection:
    extra = {"password": "agent-pw"} if user.startswith("agent_") else {}
    return psycopg.connect(
        p.pg.dsn(user=user, port=p.port, dbname=DB, sslmode="disable", **extra), autocommit=True
    )


def refusal(conn: psycopg.Connection, sql: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql).fetchall()
    return info.value


@pytest.mark.parametrize("user", ["agent_rs", "agent_db"])
def test_a_role_level_search_path_is_the_path_names_resolve_through(
    proxy: ProxyProcess, user: str
) -> None:
    with connect(proxy, user) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("crm, public",)
        # Within the limit: the rows arrive.
        rows = conn.execute("SELECT email FROM customers WHERE id <= 20").fetchall()
        assert len(rows) == 20
        # Past it: cut off at the limit, because `customers` is crm.customers, labelled.
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT email FROM customers WHERE id <= 100").fetchall()
        assert info.value.sqlstate == "42501"
        assert "agent-statement-rows" in str(info.value)


def test_set_and_reset_follow_the_session_then_return_to_the_role_default(
    proxy: ProxyProcess,
) -> None:
    with connect(proxy, "agent_rs") as conn:
        conn.execute("SET search_path = public")
        # crm.customers is no longer on the path: the server says it does not exist.
        err = refusal(conn, "SELECT email FROM customers WHERE id <= 100")
        assert err.sqlstate in ("42P01", "42501")
        conn.execute("RESET search_path")
        err = refusal(conn, "SELECT email FROM customers WHERE id <= 100")
        assert err.sqlstate == "42501" and "agent-statement-rows" in str(err)


def test_a_name_pgwarden_cannot_resolve_is_refused_not_taken_for_unlabelled(
    proxy: ProxyProcess, pg: Cluster
) -> None:
    with connect(proxy, "agent_rs") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)  # pgwarden has its catalog now
        # A table created behind pgwarden's back, holding copies of customer emails: until
        # the catalog shows it, nothing says what it holds.
        pg.psql(
            "CREATE TABLE crm.shadow AS SELECT email FROM crm.customers;"
            "GRANT SELECT ON crm.shadow TO agent_rs;",
            database=DB,
        )
        try:
            for sql in ("SELECT email FROM shadow", "SELECT * FROM nosuchschema.customers"):
                err = refusal(conn, sql)
                assert err.sqlstate == "42501", sql
                assert "fail-closed" in str(err), sql
                assert "not in pgwarden's catalog" in str(err), sql
            # The session goes on.
            assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            pg.psql("DROP TABLE IF EXISTS crm.shadow", database=DB)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT string_agg(email, ',') FROM customers WHERE id > 0",
        "SELECT array_agg(phone) FROM customers WHERE id > 0",
        "SELECT max(email) FROM customers WHERE id > 0",
        "SELECT percentile_disc(ARRAY[0.1, 0.2, 0.3, 0.4, 0.5]) WITHIN GROUP (ORDER BY email)"
        " FROM customers WHERE id > 0",
        "SELECT ARRAY(SELECT email FROM customers) AS a",
        "SELECT (SELECT string_agg(full_name, ';') FROM customers) AS all_names",
        "SELECT id, lag(email, 1) OVER (ORDER BY id), lag(email, 2) OVER (ORDER BY id)"
        " FROM customers WHERE id <= 15",
        "WITH RECURSIVE r(n, acc) AS (SELECT 1, ''::text UNION ALL"
        " SELECT n + 1, acc || (SELECT email FROM customers WHERE id = n) FROM r WHERE n < 150)"
        " SELECT acc FROM r ORDER BY n DESC LIMIT 1",
        "SELECT x FROM (SELECT jsonb_agg(c) AS x FROM customers c WHERE id > 0) s",
        "SELECT email FROM contact_list WHERE id = (SELECT max(id) FROM customers)"
        " UNION ALL SELECT string_agg(email, ',') FROM contact_list WHERE id > 0",
    ],
)
def test_labelled_values_of_many_records_in_one_value_are_refused(
    proxy: ProxyProcess, sql: str
) -> None:
    with connect(proxy, "agent_rs") as conn:
        err = refusal(conn, sql)
        assert err.sqlstate == "42501", sql
        assert "one-record-per-row" in str(err), str(err)
        assert "@crm.example" not in str(err)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT count(email) FROM customers", (CUSTOMERS,)),
        ("SELECT count(DISTINCT email) FROM customers", (CUSTOMERS,)),
        ("SELECT bool_or(email LIKE '%@crm.example') FROM customers", (True,)),
        ("SELECT max(id) FROM customers", (CUSTOMERS,)),
    ],
)
def test_aggregates_that_carry_no_labelled_value_are_allowed(
    proxy: ProxyProcess, sql: str, expected: tuple[object, ...]
) -> None:
    with connect(proxy, "agent_rs") as conn:
        assert conn.execute(sql).fetchone() == expected


def test_the_dba_is_not_limited_by_the_one_record_rule(proxy: ProxyProcess) -> None:
    with connect(proxy, "postgres") as conn:
        conn.execute("SET search_path = crm, public")
        (packed,) = conn.execute("SELECT string_agg(email, ',') FROM customers").fetchone()
        assert packed.count("@crm.example") == CUSTOMERS


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email::int FROM customers WHERE id = 5",
        "SELECT id FROM customers WHERE full_name::int > 0",
        "SELECT 1 WHERE (SELECT string_agg(email, ',') FROM customers)::int > 0",
        "SELECT id FROM customers WHERE id = (SELECT string_agg(full_name, ';') FROM customers)::int",
    ],
)
def test_error_text_carries_no_labelled_value(proxy: ProxyProcess, sql: str) -> None:
    with connect(proxy, "agent_rs") as conn:
        err = refusal(conn, sql)
        # The server's own SQLSTATE (invalid_text_representation), pgwarden's sentence.
        assert err.sqlstate == "22P02", str(err)
        text = " ".join(
            str(x) for x in (err, err.diag.message_detail, err.diag.message_hint, err.diag.context)
        )
        assert "@crm.example" not in text and "+1555" not in text and "Name " not in text
        assert "withheld" in err.diag.message_primary
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_notice_text_from_a_followed_function_carries_no_labelled_value(
    proxy: ProxyProcess,
) -> None:
    notices: list[str] = []
    with connect(proxy, "agent_rs") as conn:
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        assert conn.execute("SELECT noisy(7)").fetchone() == (1,)
    assert len(notices) == 1
    assert "withheld" in notices[0] and "person7" not in notices[0]


def test_the_dba_still_reads_the_server_s_own_error_text(proxy: ProxyProcess) -> None:
    with connect(proxy, "postgres") as conn:
        err = refusal(conn, "SELECT email::int FROM crm.customers WHERE id = 5")
        assert err.sqlstate == "22P02"
        assert "person5@crm.example" in str(err)


def test_rows_carrying_two_customers_count_twice(proxy: ProxyProcess) -> None:
    # 15 rows of a self-join hold 30 customers: more than the 20 a statement may return.
    with connect(proxy, "agent_rs") as conn:
        err = refusal(
            conn,
            "SELECT a.email, b.email FROM customers a JOIN customers b ON b.id = a.id + 150"
            " WHERE a.id <= 15",
        )
        assert err.sqlstate == "42501" and "agent-statement-rows" in str(err)
        assert "10 rows is the most" in str(err)
        # Ten such rows (twenty customers) are within the limit.
        rows = conn.execute(
            "SELECT a.email, b.email FROM customers a JOIN customers b ON b.id = a.id + 150"
            " WHERE a.id <= 10"
        ).fetchall()
        assert len(rows) == 10


def test_a_function_resolves_names_through_its_own_search_path(proxy: ProxyProcess) -> None:
    # crm.contact_of runs with SET search_path = crm: its body's `customers` is
    # crm.customers whatever the caller's path, and its result carries pii.email.
    with connect(proxy, "agent_rs") as conn:
        conn.execute("SET search_path = public")
        assert conn.execute("SELECT crm.contact_of(5)").fetchone() == ("person5@crm.example",)
        err = refusal(conn, "SELECT crm.contact_of(id) FROM crm.tickets WHERE id <= 60")
        assert err.sqlstate == "42501" and "agent-statement-rows" in str(err)


@pytest.mark.parametrize(
    "sql",
    [
        # Stored packed, to be read back as one value later.
        "CREATE TEMP TABLE stash AS SELECT string_agg(email, ',') AS s FROM customers",
        "SELECT lo_from_bytea(0, convert_to(string_agg(email, ','), 'UTF8')) FROM customers",
        # Sent as notification payloads, which nothing counts or masks.
        "SELECT pg_notify('leak', email) FROM customers WHERE id <= 5",
    ],
)
def test_labelled_values_cannot_be_parked_packed_or_sent_as_notifications(
    proxy: ProxyProcess, sql: str
) -> None:
    with connect(proxy, "agent_rs") as conn:
        conn.execute("LISTEN leak")
        err = refusal(conn, sql)
        assert err.sqlstate == "42501" and "one-record-per-row" in str(err), str(err)
        assert not list(conn.notifies(timeout=0.5, stop_after=1))


def test_the_planner_s_sample_values_are_labelled_data_too(proxy: ProxyProcess) -> None:
    # pg_stats shows up to a hundred values of every column its reader may SELECT.
    with connect(proxy, "agent_rs") as conn:
        err = refusal(
            conn,
            "SELECT histogram_bounds::text FROM pg_stats"
            " WHERE tablename = 'customers' AND attname = 'email'",
        )
        assert err.sqlstate == "42501" and "one-record-per-row" in str(err), str(err)
        # What pg_stats says of a column's shape, not its values, is fine.
        (n,) = conn.execute(
            "SELECT n_distinct FROM pg_stats WHERE tablename = 'customers' AND attname = 'email'"
        ).fetchone()
        assert n == -1


def test_a_session_in_an_encoding_where_a_quote_can_be_half_a_character_is_refused(
    proxy: ProxyProcess,
) -> None:
    """PostgreSQL reads a client's SQL in its client_encoding; pgwarden reads it as UTF-8.
    In SJIS, BIG5 or GBK the second byte of a character can be a backslash, so text that is
    valid UTF-8 can end a string literal for one and not for the other: the analysis would
    judge other SQL than the server runs.  Such a session is refused for subjects with
    limits, however the encoding was chosen; an encoding that keeps ASCII bytes ASCII
    (LATIN1) reads alike and is not."""
    dsn = proxy.pg.dsn(user="agent_rs", port=proxy.port, dbname=DB, sslmode="disable")
    with psycopg.connect(dsn, password="agent-pw", autocommit=True, client_encoding="SJIS") as c:
        err = refusal(c, "SELECT email FROM customers WHERE id <= 5")
        assert err.sqlstate == "42501" and "client_encoding is SJIS" in str(err)
    with psycopg.connect(dsn, password="agent-pw", autocommit=True, client_encoding="LATIN1") as c:
        assert len(c.execute("SELECT email FROM customers WHERE id <= 5").fetchall()) == 5
    with connect(proxy, "agent_rs") as conn:
        for switch in ("SET client_encoding TO 'SJIS'", "SET NAMES 'BIG5'",
                       "SET client_encoding = 'win936'",
                       "SELECT set_config('client_encoding', 'GBK', false)"):  # fmt: skip
            err = refusal(conn, switch)
            assert err.sqlstate == "42501" and "client_encoding" in str(err), switch
        # Refused, the switch never reached the server: the session reads as before.
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        assert len(conn.execute("SELECT email FROM customers WHERE id <= 5").fetchall()) == 5
        conn.execute("SET client_encoding TO 'LATIN1'")  # reads alike: allowed
        assert conn.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
        assert len(conn.execute("SELECT email FROM customers WHERE id <= 5").fetchall()) == 5
    with connect(proxy, "postgres") as dba:  # nobody's limits: the DBA may use SJIS
        dba.execute("SET client_encoding TO 'SJIS'")
        assert len(dba.execute("SELECT email FROM crm.customers").fetchall()) == CUSTOMERS


def test_a_type_pgwarden_cannot_resolve_is_refused_and_known_types_are_not(
    proxy: ProxyProcess,
) -> None:
    """Types resolve as the server resolves them (pg_catalog, then the role's path), like
    relations and functions; one missing from the catalog pgwarden read is unknown."""
    with connect(proxy, "agent_rs") as conn:
        for sql in ("SELECT email::crm.no_such_type FROM customers WHERE id = 1",
                    "SELECT CAST(email AS no_such_type) FROM customers WHERE id = 1",
                    "SELECT email::otherdb.crm.t FROM customers WHERE id = 1"):  # fmt: skip
            err = refusal(conn, sql)
            assert err.sqlstate == "42501", sql
            assert "type " in str(err) and ("no_such_type" in str(err) or "otherdb" in str(err))
        # PostgreSQL's types, a type of the schema on the role's path, a table's row type.
        row = conn.execute(
            "SELECT id::text, email::varchar(80), 'open'::ticket_state, "
            "'closed'::crm.ticket_state, interval '1 day', now()::date, "
            "row(id, email)::text, (c)::customers IS NOT NULL "
            "FROM customers c WHERE id = 1"
        ).fetchone()
        assert row is not None and row[0] == "1" and row[2] == "open"
