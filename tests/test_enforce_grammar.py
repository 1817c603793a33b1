"""Statements generated from a grammar, through the real proxy, on two unlike databases.

The grammar combines what SQL offers to move data past a per-row view of it: joins,
scalar, ARRAY, IN and EXISTS sublinks, CTEs (recursive ones too), aggregates and
ordered-set aggregates, window functions, casts, row constructors, set operations, GROUP BY
and LIMIT. Whatever the statement, valid or not, a limited subject's session must never end
with an internal error: each statement is answered (rows, or an error with a SQLSTATE that
is not XX000), and the session runs ``SELECT 1`` after it. A second property holds without a
database: the analysis never fails internally on what the grammar makes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.analyze import Analyzer
from policy.schema_sql import snapshot_from_sql
from proxy.sandbox.cluster import Cluster, schema_sql
from tests.proxyutil import ProxyProcess
from tests.support_data import DB as SUPPORT_DB
from tests.support_data import POLICY as SUPPORT_POLICY
from tests.test_enforce_soundness import DB as CRM_DB
from tests.test_enforce_soundness import POLICY as CRM_POLICY
from tests.test_enforce_soundness import crm_db  # noqa: F401 (a fixture)


@dataclass(frozen=True)
class Schema:
    """The names the grammar uses for one database."""

    people: str  # the customer table
    pk: str
    labelled: tuple[str, ...]  # its labelled columns
    other: str  # a table referring to it
    fk: str
    other_cols: tuple[str, ...]


SUPPORT = Schema(
    "customers", "customer_id", ("full_name", "email", "phone"),
    "tickets", "customer_id", ("ticket_id", "subject", "status"),
)  # fmt: skip
CRM = Schema(
    "customers", "id", ("full_name", "email", "phone"),
    "tickets", "customer_id", ("id", "subject", "agent"),
)  # fmt: skip


def statements(s: Schema) -> st.SearchStrategy[str]:
    """SQL over ``c`` (people) and ``t`` (other), valid more often than not."""
    col = st.sampled_from(
        [f"c.{x}" for x in (s.pk, *s.labelled)] + [f"t.{x}" for x in s.other_cols]
    )
    lab = st.sampled_from([f"c.{x}" for x in s.labelled])
    num = st.integers(min_value=0, max_value=400).map(str)
    agg = st.sampled_from(
        ["max", "min", "count", "string_agg", "array_agg", "json_agg", "bool_or", "mode"]
    )
    win = st.sampled_from(["lag", "lead", "first_value", "row_number", "rank", "nth_value"])
    sub_where = st.sampled_from([f"x.{s.pk} = c.{s.pk}", f"x.{s.pk} > 0", "true"])

    def aggregate(a: str, c: str) -> str:
        if a == "string_agg":
            return f"string_agg({c}::text, ',')"
        if a == "bool_or":
            return f"bool_or({c}::text LIKE '%a%')"
        if a == "mode":
            return f"mode() WITHIN GROUP (ORDER BY {c})"
        return f"{a}({c})"

    def window(w: str, c: str) -> str:
        args = {"row_number": "", "rank": "", "nth_value": f"{c}, 2"}.get(w, c)
        return f"{w}({args}) OVER (ORDER BY c.{s.pk})"

    expr = st.one_of(
        col,
        lab.map(lambda c: f"lower({c}) || ''"),
        lab.map(lambda c: f"reverse({c})"),
        lab.map(lambda c: f"{c}::int"),
        st.tuples(lab, lab).map(lambda p: f"row({p[0]}, {p[1]})::text"),
        st.tuples(agg, col).map(lambda p: aggregate(*p)),
        st.tuples(win, col).map(lambda p: window(*p)),
        st.tuples(lab, sub_where).map(
            lambda p: f"(SELECT {p[0].replace('c.', 'x.')} FROM {s.people} x WHERE {p[1]} LIMIT 1)"
        ),
        lab.map(lambda c: f"ARRAY(SELECT {c.replace('c.', 'x.')} FROM {s.people} x)"),
        lab.map(lambda c: f"(SELECT string_agg({c.replace('c.', 'x.')}, ';') FROM {s.people} x)"),
        st.just(f"percentile_disc(0.5) WITHIN GROUP (ORDER BY c.{s.pk})"),
    )
    source = st.sampled_from(
        [
            f"{s.people} c",
            f"{s.people} c JOIN {s.other} t ON t.{s.fk} = c.{s.pk}",
            f"{s.people} c LEFT JOIN {s.other} t ON t.{s.fk} = c.{s.pk}",
            f"(SELECT * FROM {s.people} WHERE {s.pk} < 50) c",
            f"{s.people} c, LATERAL (SELECT * FROM {s.other} t0 WHERE t0.{s.fk} = c.{s.pk}) t",
        ]
    )
    where = st.one_of(
        st.just(""),
        num.map(lambda n: f" WHERE c.{s.pk} < {n}"),
        lab.map(lambda c: f" WHERE {c} LIKE 'a%'"),
        st.just(f" WHERE EXISTS (SELECT 1 FROM {s.other} e WHERE e.{s.fk} = c.{s.pk})"),
        st.just(f" WHERE c.{s.pk} IN (SELECT {s.fk} FROM {s.other})"),
        lab.map(lambda c: f" WHERE {c}::int > 0"),
    )
    tail = st.sampled_from(["", " LIMIT 5", " ORDER BY 1 LIMIT 30", " GROUP BY 1", " OFFSET 3"])

    @st.composite
    def select(draw: st.DrawFn) -> str:
        cols = draw(st.lists(expr, min_size=1, max_size=3))
        body = f"SELECT {', '.join(cols)} FROM {draw(source)}{draw(where)}{draw(tail)}"
        shape = draw(st.integers(0, 5))
        if shape == 1:
            return f"WITH q AS ({body}) SELECT * FROM q"
        if shape == 2:
            other = f"SELECT {', '.join(cols)} FROM {s.people} c LIMIT 1"
            return f"({body}) UNION ALL ({other})"
        if shape == 3:
            return f"SELECT count(*) FROM ({body}) z"
        if shape == 4:
            lab_col = draw(lab).replace("c.", "")
            return (
                f"WITH RECURSIVE r(n, acc) AS (SELECT 1, ''::text UNION ALL SELECT n + 1, "
                f"acc || (SELECT {lab_col} FROM {s.people} WHERE {s.pk} = n) FROM r WHERE n < 40)"
                " SELECT acc FROM r ORDER BY n DESC LIMIT 1"
            )
        return body

    return select()


def test_the_analysis_never_fails_internally() -> None:
    analyzer = Analyzer(snapshot_from_sql(schema_sql()))

    @settings(max_examples=400, deadline=None)
    @given(statements(SUPPORT))
    def check(sql: str) -> None:
        for f in analyzer.analyze(sql):
            assert not (f.unanalysable or "").startswith("internal error"), (sql, f.unanalysable)

    check()


@pytest.fixture
def crm_proxy(pg: Cluster, crm_db: str, tmp_path: Path) -> Iterator[ProxyProcess]:  # noqa: F811
    policy = tmp_path / "crm-policy.yaml"
    policy.write_text(yaml.safe_dump(CRM_POLICY))
    p = ProxyProcess(pg, tmp_path / "crm", ["--policy", str(policy), "--catalog-user", "postgres"])
    yield p
    assert p.stop() == 0, p.log()


@pytest.fixture
def support_proxy(pg: Cluster, enforce_db: str, tmp_path: Path) -> Iterator[ProxyProcess]:
    # The shipped policy without quarantine: a quarantined agent is refused everything,
    # which would leave the rest of the examples nothing to exercise.
    policy = yaml.safe_load(SUPPORT_POLICY.read_text())
    policy.pop("quarantine", None)
    for rule in policy["rules"]:
        if rule.get("action") == "quarantine":
            rule["action"] = "block"
    path = tmp_path / "support-policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    p = ProxyProcess(
        pg, tmp_path / "support", ["--policy", str(path), "--catalog-user", "postgres"]
    )
    yield p
    assert p.stop() == 0, p.log()


def _no_internal_errors(conn: psycopg.Connection, grammar: st.SearchStrategy[str]) -> None:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(grammar)
    def check(sql: str) -> None:
        try:
            conn.execute(sql).fetchall()
        except psycopg.OperationalError as exc:  # the connection itself failed
            pytest.fail(f"session lost on {sql!r}: {exc}")
        except psycopg.Error as exc:
            assert exc.sqlstate and exc.sqlstate != "XX000", (sql, str(exc))
        try:
            assert conn.execute("SELECT 1").fetchone() == (1,), sql
        except psycopg.errors.InsufficientPrivilege as exc:
            # Enough refusals quarantine the subject: it is refused everything for a while,
            # which is an answer with a SQLSTATE, not a lost session.
            assert "quarantine" in str(exc), (sql, str(exc))

    check()


def test_no_generated_statement_ends_an_agent_session_on_the_crm_schema(
    crm_proxy: ProxyProcess,
) -> None:
    dsn = crm_proxy.pg.dsn(
        user="agent_rs", port=crm_proxy.port, sslmode="disable", password="agent-pw"
    )
    with psycopg.connect(f"{dsn} dbname={CRM_DB}", autocommit=True) as conn:
        _no_internal_errors(conn, statements(CRM))
    assert "internal_error" not in crm_proxy.log()


def test_no_generated_statement_ends_an_agent_session_on_the_support_schema(
    support_proxy: ProxyProcess,
) -> None:
    dsn = support_proxy.pg.dsn(user="support_app", port=support_proxy.port, sslmode="disable")
    with psycopg.connect(f"{dsn} dbname={SUPPORT_DB}", autocommit=True) as conn:
        # Past the hourly budget every labelled read is refused; that is an answer too.
        _no_internal_errors(conn, statements(SUPPORT))
    assert "internal_error" not in support_proxy.log()
