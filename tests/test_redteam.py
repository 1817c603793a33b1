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

import os
import subprocess
from collections.abc import Iterator

import pytest

from loadtests import redteam
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import pgwarden_command
from tests.seconddb import data as sdb

# What each technique leaks today (client-side counts; see the report printed by
# `python -m loadtests.redteam`), marked xfail; remove an entry when it stops leaking.
# Empty: the last one, 24 connections at once passing the hourly budget (budget_race),
# stopped when a running statement held its share of the window (policy.inflight).
LEAKS: dict[str, str] = {}

# Honest work refused today, per variant (false positives).  Empty: the honest agent's day
# runs without a refusal in both variants.
HONEST: dict[str, str] = {}


@pytest.fixture(scope="module")
def env(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[redteam.Env]:
    env = redteam.Env.build(pg, tmp_path_factory.mktemp("redteam"), prestart=True)
    try:
        yield env
    finally:
        env.close()


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


# `make test` runs the bare-names variant (the harder one: names resolve through the role's
# search_path); PGWARDEN_REDTEAM_VARIANTS=search_path,qualified runs both (as
# `python -m loadtests.redteam` does), to tell a name-resolution problem from another.
VARIANTS = tuple(
    v for v in os.environ.get("PGWARDEN_REDTEAM_VARIANTS", "search_path").split(",") if v
)


@pytest.mark.parametrize(
    ("name", "variant"), [_param(n, v) for v in VARIANTS for n in redteam.TECHNIQUES]
)
def test_technique(env: redteam.Env, name: str, variant: str) -> None:
    """``search_path``: the statements name crm's relations bare, as the agents' role-level
    search_path allows; ``qualified``: the same statements with ``crm.`` written out."""
    out = redteam.run_technique(env, name, variant)
    assert not out.violations(), f"{name}: {out.violations()} ({out.summary()})"


# Every technique runs through the application account in ``python -m loadtests.redteam``;
# ``make test`` takes every 24th (a pgwarden process each, and the suite has a time budget).
APP_SAMPLE = (
    list(redteam.TECHNIQUES)
    if os.environ.get("PGWARDEN_REDTEAM_APP") == "all"
    else list(redteam.TECHNIQUES)[::24]
)


@pytest.mark.parametrize("name", APP_SAMPLE)
def test_technique_through_the_application_account_is_refused_by_shape(
    env: redteam.Env, name: str
) -> None:
    """The ``app`` variant: the insider sends the technique through the helpdesk's shared
    account, with a name the application signed for them.  The account's allow-list
    (``tests/seconddb/helpdesk-allow.yaml``, learned from the honest day's work) refuses
    the technique's first statement by its shape, before any limit is reached."""
    out = redteam.run_technique(env, name, "app")
    assert not out.violations(), f"{name}: {out.violations()} ({out.summary()})"
    if out.through_app:
        # A session pgwarden cannot read as the server does (an encoding where a quote can
        # be half a character, standard_conforming_strings off) has every statement refused
        # before any shape is judged.
        first = (
            ("helpdesk-known-statements", "fail-closed")
            if name in SESSION_UNREADABLE
            else ("helpdesk-known-statements",)
        )
        assert out.first_refusal in first, out.summary()


SESSION_UNREADABLE = frozenset((
    "client_encoding_differential", "honest_latin1_gbk_client", "scs_off_startup",
    "scs_off_expressions", "scs_off_allowlisted_shape", "honest_legacy_scs_off",
))  # fmt: skip


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(
            v, marks=[pytest.mark.xfail(strict=True, reason=HONEST[v])] if v in HONEST else []
        )
        for v in VARIANTS
    ],
)
def test_honest_agent_is_never_refused(env: redteam.Env, variant: str) -> None:
    res = redteam.run_honest(env, variant)
    assert res.statements > 0
    assert res.internal_errors == []
    assert res.refused == [], "\n".join(
        f"{' '.join(q.split())[:100]} -> {m}" for q, m in res.refused
    )
