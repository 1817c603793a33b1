"""Verdicts as a table: (who, statement) -> what the engine decides, for the shipped policy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from policy.analyze import Analyzer
from policy.engine import Engine
from policy.model import Action, load_policy_text
from policy.schema_sql import snapshot_from_sql
from policy.state import MemoryWindowStore
from policy.subject import Subject
from policy.verdict import Verdict
from proxy.policyrt import _Counters
from proxy.sandbox.cluster import schema_sql

POLICY_TEXT = (Path(__file__).resolve().parent.parent / "config" / "policy.yaml").read_text()
SNAPSHOT = snapshot_from_sql(schema_sql())

AGENT = Subject("support_app", "support", "helpdesk", "10.1.2.3", "alice")
ANALYST = Subject("analyst", "support", "bi", "10.1.2.4")
DBA = Subject("postgres", "support", "psql", "10.1.2.5")


def decide(engine: Engine, who: Subject, sql: str, now: float | None = None) -> Verdict:
    # A fresh analyser each time: an analysed copy of labelled data into a table labels that
    # table from then on, which would leak between the rows of the table.
    analyzer = Analyzer(SNAPSHOT, engine.policy.label_rules())
    (facts,) = analyzer.analyze(sql, ("public",), who.user)
    return engine.decide(who, facts, now)


def limits(v: Verdict) -> dict[str, int | None]:
    assert v.plan is not None
    return {lim.rule_id: lim.max_rows for lim in v.plan.limits}


TABLE = [
    # who, statement, expected action, deciding rule (None: allowed)
    (AGENT, "SELECT c.email FROM tickets t JOIN customers c USING (customer_id) WHERE t.ticket_number = 'TM-1'", Action.ALLOW, None),
    (AGENT, "SELECT status, count(*) FROM tickets GROUP BY status", Action.ALLOW, None),
    (AGENT, "SELECT * FROM customers WHERE customer_id = 1", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "SELECT c FROM customers c WHERE customer_id = 1", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "SELECT lower(email) FROM customers", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "SELECT string_agg(phone, ',') FROM customers WHERE tier = 'vip'", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "COPY customers TO STDOUT", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "INSERT INTO products SELECT customer_id::int, email, 'x' FROM customers WHERE customer_id < 9", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "SELECT pg_read_file('/etc/passwd')", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "DO $$ BEGIN PERFORM 1; END $$", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "SELECT name FROM products", Action.ALLOW, None),
    (ANALYST, "SELECT * FROM customers", Action.ALLOW, None),
    (ANALYST, "CREATE TABLE x AS SELECT email FROM customers", Action.BLOCK, "analytics-no-export"),
    (DBA, "SELECT * FROM customers", Action.ALLOW, None),
    (DBA, "COPY customers TO STDOUT", Action.ALLOW, None),
    # Code and names: a subject with limits runs only what pgwarden analyses.
    (AGENT, "CREATE TEMP VIEW pg_settings AS SELECT email AS name FROM customers", Action.BLOCK, "code-and-names"),
    (AGENT, "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", Action.BLOCK, "code-and-names"),
    (AGENT, "CREATE RULE r AS ON INSERT TO products DO INSTEAD SELECT email FROM customers", Action.BLOCK, "code-and-names"),
    (AGENT, "ALTER TABLE products RENAME TO products_old", Action.BLOCK, "code-and-names"),
    (AGENT, "CREATE TEMP TABLE scratch (id int, note text DEFAULT now()::text)", Action.ALLOW, None),
    (AGENT, "CREATE TEMP TABLE scratch (id int, note text DEFAULT public.my_own_function())", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "SELECT set_config('x.y', email, false) FROM customers WHERE customer_id = 1", Action.BLOCK, "agent-statement-shapes"),
    (AGENT, "SELECT word FROM ts_stat('SELECT to_tsvector(email) FROM customers')", Action.BLOCK, "agent-statement-shapes"),
    (DBA, "CREATE TEMP VIEW v AS SELECT email FROM customers", Action.ALLOW, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("who", "sql", "action", "rule"), TABLE, ids=[f"{w.user}:{s[:40]}" for w, s, _, _ in TABLE]
)
def test_verdicts(who: Subject, sql: str, action: Action, rule: str | None) -> None:
    v = decide(Engine(load_policy_text(POLICY_TEXT)), who, sql)
    assert (v.action, v.rule_id) == (action, rule), v.message


def test_agent_reads_run_under_the_statement_and_window_limits() -> None:
    v = decide(
        Engine(load_policy_text(POLICY_TEXT)),
        AGENT,
        "SELECT email FROM customers WHERE tier = 'vip'",
    )
    assert limits(v) == {
        "agent-statement-rows": 20,
        "agent-hourly-records": 200,
        "agent-daily-records": 1000,
        "agent-account-hourly-records": 1000,
    }


def test_analytics_gets_masks_not_limits() -> None:
    v = decide(
        Engine(load_policy_text(POLICY_TEXT)), ANALYST, "SELECT email, phone, tier FROM customers"
    )
    assert v.plan is not None and v.plan.mask == {"pii.email": "partial", "pii.phone": "partial"}


def test_monitor_mode_reports_what_it_would_have_blocked() -> None:
    policy = yaml.safe_load(POLICY_TEXT)
    policy["mode"] = "monitor"
    v = decide(Engine(load_policy_text(yaml.safe_dump(policy))), AGENT, "SELECT * FROM customers")
    assert v.action is Action.ALLOW
    assert [(f.rule_id, f.monitored) for f in v.findings] == [("agent-statement-shapes", True)]


def test_a_used_up_window_refuses_before_execution_and_the_remainder_caps_the_next_read() -> None:
    store = MemoryWindowStore()
    engine = Engine(load_policy_text(POLICY_TEXT), _Counters(store))
    now = time.time()
    asyncio.run(
        store.record(
            AGENT.key,
            "rule:agent-hourly-records",
            150,
            [f"k{i}" for i in range(150)],
            [3600.0],
            now,
        )
    )
    v = decide(engine, AGENT, "SELECT email FROM customers WHERE tier = 'vip'", now)
    assert limits(v)["agent-hourly-records"] == 50
    asyncio.run(
        store.record(
            AGENT.key, "rule:agent-hourly-records", 50, [f"j{i}" for i in range(50)], [3600.0], now
        )
    )
    v = decide(engine, AGENT, "SELECT email FROM customers WHERE tier = 'vip'", now)
    assert (v.action, v.rule_id) == (Action.BLOCK, "agent-hourly-records")
    assert "200 records" in v.message
    # Another agent behind the same account has their own window.
    other = Subject("support_app", "support", "helpdesk", "10.1.2.3", "bob")
    assert (
        decide(engine, other, "SELECT email FROM customers WHERE tier = 'vip'", now).action
        is Action.ALLOW
    )


def test_a_db_user_budget_counts_every_end_user_of_the_account_together() -> None:
    # A new end-user name starts a new personal budget, not a new account budget.
    store = MemoryWindowStore()
    engine = Engine(load_policy_text(POLICY_TEXT), _Counters(store))
    now = time.time()
    sql = "SELECT email FROM customers WHERE tier = 'vip'"
    asyncio.run(store.record("db_user:support_app", "rule:agent-account-hourly-records", 990,
                             [f"k{i}" for i in range(990)], [3600.0], now))  # fmt: skip
    fresh = Subject("support_app", "support", "helpdesk", "10.1.2.3", "bot-0001")
    assert limits(decide(engine, fresh, sql, now))["agent-account-hourly-records"] == 10
    assert limits(decide(engine, fresh, sql, now))["agent-hourly-records"] == 200
    asyncio.run(store.record("db_user:support_app", "rule:agent-account-hourly-records", 10,
                             [f"j{i}" for i in range(10)], [3600.0], now))  # fmt: skip
    v = decide(engine, fresh, sql, now)
    assert (v.action, v.rule_id) == (Action.BLOCK, "agent-account-hourly-records")
    assert "1000 records of pii.email read by all end users of support_app" in v.message
    # Statements naming nobody are the account's too; another account is not.
    assert decide(engine, Subject("support_app"), sql, now).action is Action.BLOCK
    assert decide(engine, Subject("agent7"), sql, now).action is Action.ALLOW


def test_end_user_churn_rules_are_alerts_and_decide_no_statement() -> None:
    policy = load_policy_text(POLICY_TEXT)
    (churn,) = [r for r in policy.rules if r.kind == "end_user_churn"]
    assert churn.action is Action.ALERT and churn.end_user_churn is not None
    assert (churn.end_user_churn.max_names, churn.end_user_churn.window) == (5, 60.0)
    v = decide(Engine(policy), AGENT, "SELECT status FROM tickets WHERE ticket_id = 1")
    assert v.action is Action.ALLOW and not v.findings


def test_what_is_left_of_a_window_follows_the_counters_from_statement_to_statement() -> None:
    # One analyser: the same statement comes back as the same facts, as in a session that
    # repeats it, so only the counters change between the verdicts.
    store = MemoryWindowStore()
    engine = Engine(load_policy_text(POLICY_TEXT), _Counters(store))
    analyzer = Analyzer(SNAPSHOT, engine.policy.label_rules())
    (facts,) = analyzer.analyze("SELECT email FROM customers WHERE customer_id = 7", ("public",))
    now = time.time()

    def read(n: int, prefix: str) -> None:
        keys = [f"{prefix}{i}" for i in range(n)]
        asyncio.run(store.record(AGENT.key, "rule:agent-hourly-records", n, keys, [3600.0], now))

    read(150, "a")
    assert limits(engine.decide(AGENT, facts, now))["agent-hourly-records"] == 50
    assert limits(engine.decide(AGENT, facts, now))["agent-hourly-records"] == 50
    read(10, "b")
    assert limits(engine.decide(AGENT, facts, now))["agent-hourly-records"] == 40
    read(10, "b")  # the same customers again: distinct records do not grow
    assert limits(engine.decide(AGENT, facts, now))["agent-hourly-records"] == 40
    read(40, "c")
    v = engine.decide(AGENT, facts, now)
    assert (v.action, v.rule_id) == (Action.BLOCK, "agent-hourly-records")


def test_quarantine_refuses_everything_until_it_ends() -> None:
    counters = _Counters(MemoryWindowStore())
    engine = Engine(load_policy_text(POLICY_TEXT), counters)
    now = time.time()
    counters.quarantined[AGENT.key] = now + 60
    v = decide(engine, AGENT, "SELECT name FROM products", now)
    assert (v.action, v.rule_id) == (Action.QUARANTINE, "quarantine")
    assert decide(engine, AGENT, "SELECT name FROM products", now + 61).action is Action.ALLOW


def test_the_subject_cache_keeps_only_the_current_minutes_answers() -> None:
    """Answers are cached per (subject, minute); a past minute's are never asked for again.
    They stayed until the cache held 10,000 entries: with a helpdesk's sessions naming their
    agents, ~20 minutes of growth in make soak's pgwarden."""
    engine = Engine(load_policy_text(POLICY_TEXT))
    people = [Subject("support_app", "support", "helpdesk", "10.1.2.3", f"agent{i:03d}") for i in range(50)]  # fmt: skip
    start = 60 * (int(time.time()) // 60)
    for minute in range(5):
        for who in people:
            assert engine.subjects_of(who, start + 60 * minute + 1) == {"agents", "helpdesk"}
    assert len(engine._subject_cache) == len(people)
    # Within a minute, the answers are kept and reused.
    first = engine.subjects_of(people[0], start + 60 * 4 + 59)
    assert engine.subjects_of(people[0], start + 60 * 4 + 30) is first
