"""The adversarial suite (``loadtests/redteam.py``) as tests: an insider with genuine access
to the second test database (``tests/seconddb``) tries every channel, and the project's
"done when" invariants are asserted on what the client received:

* no technique gets more than the per-statement limit (20) of distinct customers out of
  one statement, nor more than the hourly budget (200) in all, nor any customer outside the
  agent's need-to-know, by any channel (rows, error text, notices, notifications);
* the analyst never receives a customer's value unmasked;
* no session ends in an internal error;
* an honest agent's normal work is never refused.

Techniques that break an invariant today are marked ``xfail(strict=True)`` with what leaked:
when the enforcement is fixed the test turns red, and the mark must go.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from loadtests import redteam
from loadtests.cluster import Cluster
from tests.proxyutil import pgwarden_command
from tests.seconddb import data as sdb

# What each technique leaked on the day it was written (client-side counts; see the report
# printed by `python -m loadtests.redteam`). Remove an entry when the technique stops leaking.
LEAKS: dict[str, str] = {
    "select_star/search_path": "internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "no_key_column/search_path": "195 distinct customers (rows 195), max 15 in one statement, 166 outside need-to-know; internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "key_spoof/search_path": "195 distinct customers (rows 195), max 15 in one statement, 166 outside need-to-know; internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "row_to_json/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "packing_aggregates/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "array_sublink/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "scalar_sublinks/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "window_lead/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "recursive_cte/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "percentile_disc/search_path": "3193 distinct customers (rows 3193), max 3193 in one statement, 2749 outside need-to-know",
    "union_all/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "expression_tricks/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "encodings/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "lateral_values/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "views/search_path": "3269 distinct customers (rows 3269), max 3269 in one statement, 2814 outside need-to-know",
    "materialized_view/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "jsonb_paths/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "composite_and_array/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "sql_cursor/search_path": "15 distinct customers (rows 15), max 15 in one statement, 13 outside need-to-know",
    "server_cursor_psycopg/search_path": "20 distinct customers (rows 20), max 20 in one statement, 16 outside need-to-know",
    "prepared_paging/search_path": "195 distinct customers (rows 195), max 15 in one statement, 166 outside need-to-know; internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "copy_to_stdout/search_path": "3300 distinct customers (copy 3300), max 3300 in one statement, 2842 outside need-to-know",
    "psql_copy/search_path": "3300 distinct customers (copy 3300), max 3300 in one statement, 2842 outside need-to-know",
    "temp_table/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "create_table_as/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "insert_select/search_path": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "offset_paging/search_path": "195 distinct customers (rows 195), max 15 in one statement, 166 outside need-to-know; internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "trickle/search_path": "200 distinct customers (rows 200), max 5 in one statement, 170 outside need-to-know; internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "trickle_own_customers/search_path": "200 distinct customers (rows 200), max 5 in one statement, 0 outside need-to-know; internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "pipeline_and_multistatement/search_path": "internal error (session closed: pgwarden AssertionError); before it, 0 to 600 customers (run to run), 529 outside need-to-know",
    "asyncpg_binary/search_path": "internal error: hang: asyncpg fetch had no answer within 40 s",
    "error_cast/search_path": "3300 distinct customers (error 3300), max 3300 in one statement, 2842 outside need-to-know",
    "error_cast_trickle/search_path": "399 distinct customers (error 399), max 1 in one statement, 348 outside need-to-know",
    "error_unique_violation/search_path": "119 distinct customers (error 119), max 1 in one statement, 101 outside need-to-know",
    "error_raise_function/search_path": "3300 distinct customers (error 3300), max 3300 in one statement, 2842 outside need-to-know",
    "notice_function/search_path": "3300 distinct customers (notice 3300), max 3300 in one statement, 2842 outside need-to-know",
    "notify_payload/search_path": "3300 distinct customers (notify 3300), max 3300 in one statement, 2842 outside need-to-know",
    "shared_account_rotation/search_path": "3210 distinct customers (rows 3210), max 15 in one statement, 2767 outside need-to-know",
    "shared_account_set/search_path": "885 distinct customers (rows 885), max 15 in one statement, 777 outside need-to-know; internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "shared_account_no_end_user/search_path": "195 distinct customers (rows 195), max 15 in one statement, 166 outside need-to-know; internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "self_assign/search_path": "internal error: 08P01: pgwarden: invalid message from the client: pgwarden internal error; the session was",
    "window_lead/qualified": "660 distinct customers (rows 660), max 660 in one statement, 559 outside need-to-know",
    "views/qualified": "3300 distinct customers (rows 3300), max 3300 in one statement, 2842 outside need-to-know",
    "error_cast/qualified": "1 distinct customers (error 1), max 1 in one statement, 1 outside need-to-know",
    "error_cast_trickle/qualified": "399 distinct customers (error 399), max 1 in one statement, 348 outside need-to-know",
    "notice_function/qualified": "3300 distinct customers (notice 3300), max 3300 in one statement, 2842 outside need-to-know",
    "shared_account_rotation/qualified": "39 distinct customers (rows 39), max 5 in one statement, 27 outside need-to-know",
    "shared_account_set/qualified": "207 distinct customers (rows 207), max 6 in one statement, 159 outside need-to-know",
}

# Honest work refused today, per variant (false positives); the 'quarantined' refusals follow
# from the others (5 blocks in 10 minutes quarantine the agent).
HONEST: dict[str, str] = {
    "search_path": "20 of 62 honest statements refused: 10x the statement cannot be analysed (function ticket_customer is not in the catalog; 10x quarantined after 5 blocks",
    "qualified": "46 of 62 honest statements refused: 6x need-to-know cannot be checked, the result does not carry crm.customer_phones.cu; 4x reading labelled data needs a WHERE clause or a LIMIT; 36x quarantined after 5 blocks",
}


@pytest.fixture(scope="module")
def env(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[redteam.Env]:
    yield redteam.Env.build(pg, tmp_path_factory.mktemp("redteam"))


def test_policy_file_checks() -> None:
    proc = subprocess.run(
        [*pgwarden_command(), "policy", "check", str(sdb.POLICY)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_counter_sees_everyone_through_the_dba(env: redteam.Env) -> None:
    """Calibration: the DBA is not limited, and the client-side counter recognises every
    customer in a full read (so a zero elsewhere means nothing arrived, not a blind counter)."""
    out = redteam.Outcome("dba", "rows")
    proxy = env.proxy("dba")
    ctx = redteam.Ctx(env, proxy, out)
    try:
        c = ctx.connect("postgres")
        rows = ctx.q(c, 'SELECT customer_id, "FullName", "Email" FROM crm.customers')
        assert rows is not None and len(rows) == redteam.N_ALL
        ctx.q(c, "SELECT customer_id, phone FROM crm.customer_phones")
    finally:
        ctx.close()
        assert proxy.stop() == 0
    assert len(out.customers) == redteam.N_ALL
    assert out.refused == 0 and not out.internal_errors


def _param(name: str, variant: str) -> object:
    key = f"{name}/{variant}"
    marks = [pytest.mark.xfail(strict=True, reason=LEAKS[key])] if key in LEAKS else []
    return pytest.param(name, variant, marks=marks, id=key)


@pytest.mark.parametrize(
    ("name", "variant"), [_param(n, v) for v in redteam.VARIANTS for n in redteam.TECHNIQUES]
)
def test_technique(env: redteam.Env, name: str, variant: str) -> None:
    """``search_path``: the statements name crm's relations bare, as the agents' role-level
    search_path allows; ``qualified``: the same statements with ``crm.`` written out."""
    out = redteam.run_technique(env, name, variant)
    assert not out.violations(), f"{name}: {out.violations()} ({out.summary()})"


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(
            v, marks=[pytest.mark.xfail(strict=True, reason=HONEST[v])] if v in HONEST else []
        )
        for v in redteam.VARIANTS
    ],
)
def test_honest_agent_is_never_refused(env: redteam.Env, variant: str) -> None:
    res = redteam.run_honest(env, variant)
    assert res.statements > 0
    assert res.internal_errors == []
    assert res.refused == [], "\n".join(
        f"{' '.join(q.split())[:100]} -> {m}" for q, m in res.refused
    )
