"""Property: for generated SELECTs over the reference schema, every output column carries at
least the labels of every column its expression references, however it is wrapped.

The label table below is written from config/support_schema.sql by hand (including what the
views expose), independently of the analyser.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.analyze import Analyzer
from policy.schema_sql import snapshot_from_sql
from proxy.sandbox.cluster import Cluster, schema_sql

EXTRA_SQL = (Path(__file__).parent / "corpus" / "extra_schema.sql").read_text()
ANALYZER = Analyzer(snapshot_from_sql(schema_sql() + "\n" + EXTRA_SQL))

E, N, P, A, T = "pii.email", "pii.name", "pii.phone", "pii.address", "support.ticket"
SCHEMA: dict[str, dict[str, frozenset[str]]] = {
    "customers": {
        "customer_id": frozenset(), "full_name": frozenset({N}), "email": frozenset({E}),
        "phone": frozenset({P}), "street": frozenset({A}), "city": frozenset({A}),
        "postcode": frozenset({A}), "country": frozenset(), "tier": frozenset(),
    },
    "agents": {"agent_id": frozenset(), "username": frozenset(), "full_name": frozenset(),
               "email": frozenset({E}), "team": frozenset()},
    "tickets": {"ticket_id": frozenset(), "ticket_number": frozenset({T}),
                "subject": frozenset(), "status": frozenset()},
    "products": {"product_id": frozenset(), "name": frozenset(), "category": frozenset()},
    "reporting.customer_contacts": {"customer_id": frozenset(), "name": frozenset({N}),
                                    "email": frozenset({E}), "phone": frozenset({P})},
    "reporting.vip_contacts": {"name": frozenset({N}), "contact": frozenset({E})},
    "reporting.open_tickets": {"ticket_number": frozenset({T}), "subject": frozenset(),
                               "agent": frozenset()},
    "reporting.vip_emails": {"address": frozenset({E})},
}  # fmt: skip

WRAPPERS = [
    "lower({}::text)", "{}::text", "({})::varchar", "coalesce({}::text, 'x')", "concat('a', {})",
    "md5({}::text)", "substr({}::text, 1, 2)", "{}::text || '-'", "json_build_object('k', {})",
    "(SELECT {})", "CASE WHEN true THEN {}::text END", "format('%s', {})", "reverse({}::text)",
    "ARRAY[{}::text]", "to_jsonb({})", "upper(trim({}::text))", "split_part({}::text, '@', 1)",
]  # fmt: skip


def spell(name: str, style: int) -> str:
    """The same identifier in the spellings PostgreSQL folds to it."""
    if style == 1:
        return name.upper()
    if style == 2:
        return f'"{name}"'
    if style == 3:
        return 'U&"' + "".join(f"\\{ord(ch):04x}" for ch in name) + '"'
    return name


@st.composite
def queries(draw: st.DrawFn) -> tuple[str, list[frozenset[str]], frozenset[str]]:
    tables = draw(st.lists(st.sampled_from(sorted(SCHEMA)), min_size=1, max_size=3))
    aliases = [f"t{i}" for i in range(len(tables))]
    items: list[str] = []
    expected: list[frozenset[str]] = []
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(tables) - 1))
        cols = SCHEMA[tables[i]]
        if draw(st.integers(0, 9)) == 0:
            expr = f"row_to_json({aliases[i]})"
            labels = frozenset().union(*cols.values())
        else:
            col = draw(st.sampled_from(sorted(cols)))
            qual = spell(aliases[i], draw(st.integers(0, 1)))
            expr = f"{qual}.{spell(col, draw(st.integers(0, 3)))}"
            labels = cols[col]
            if draw(st.booleans()):
                other = draw(st.sampled_from(sorted(cols)))
                expr = f"concat({expr}, {aliases[i]}.{other})"
                labels = labels | cols[other]
        for _w in range(draw(st.integers(0, 3))):
            expr = draw(st.sampled_from(WRAPPERS)).format(expr)
        items.append(f"{expr} AS c{len(items)}")
        expected.append(labels)
    from_items = []
    for t, a in zip(tables, aliases, strict=True):
        schema, _, name = t.rpartition(".")
        qualified = f"{spell(schema, draw(st.integers(0, 2)))}.{name}" if schema else name
        from_items.append(f"{qualified} AS {a}")
    sql = f"SELECT {', '.join(items)} FROM {' CROSS JOIN '.join(from_items)}"
    where_labels: frozenset[str] = frozenset()
    if draw(st.booleans()):
        i = draw(st.integers(0, len(tables) - 1))
        col = draw(st.sampled_from(sorted(SCHEMA[tables[i]])))
        sql += f" WHERE {aliases[i]}.{col}::text <> '' /* {col} */"
        where_labels = SCHEMA[tables[i]][col]
    outer = draw(st.integers(0, 4))
    if outer == 1:
        sql = f"SELECT * FROM ({sql}) AS s"
    elif outer == 2:
        sql = f"WITH w AS ({sql}) SELECT * FROM w"
    elif outer == 3:
        sql = f"({sql}) UNION ALL (SELECT {', '.join(['NULL'] * len(items))})"
    elif outer == 4:
        names = ", ".join(f"x{i}" for i in range(len(items)))
        sql = f"WITH w({names}) AS ({sql}) SELECT {names} FROM w LIMIT 10"
    return sql, expected, where_labels


@settings(max_examples=400, deadline=None)
@given(queries())
def test_output_labels_cover_every_referenced_column(
    case: tuple[str, list[frozenset[str]], frozenset[str]],
) -> None:
    sql, expected, where_labels = case
    (f,) = ANALYZER.analyze(sql, ("public",))
    assert f.unanalysable is None, (sql, f.unanalysable)
    assert len(f.output) == len(expected), sql
    for col, labels in zip(f.output, expected, strict=True):
        assert labels <= col.labels, (sql, col)
    assert where_labels <= f.filter_labels, sql


PROPERTY_DB = "analysis_property"


@pytest.fixture(scope="module")
def property_db(pg: Cluster) -> Iterator[psycopg.Connection[Any]]:
    pg.psql(
        f"DROP DATABASE IF EXISTS {PROPERTY_DB}; CREATE DATABASE {PROPERTY_DB};",
        database="postgres",
    )
    pg.psql(schema_sql() + "\n" + EXTRA_SQL, database=PROPERTY_DB)
    with psycopg.connect(pg.dsn(database=PROPERTY_DB), autocommit=True) as conn:
        yield conn


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(queries())
def test_generated_queries_run_and_postgres_agrees(
    property_db: psycopg.Connection[Any], case: tuple[str, list[frozenset[str]], frozenset[str]]
) -> None:
    """The generated SQL is valid, and each column PostgreSQL traces to a labelled table column
    is labelled by the analysis too."""
    sql, _expected, _where = case
    (f,) = ANALYZER.analyze(sql, ("public",))
    snapshot = ANALYZER.snapshot
    oids = {
        int(r[0]): r[1]
        for r in property_db.execute(
            "SELECT c.oid, n.nspname || '.' || c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname IN ('public', 'reporting')"
        )
    }
    cur = property_db.execute(sql)
    res = cur.pgresult
    assert res is not None
    for i in range(res.nfields):
        table = oids.get(res.ftable(i))
        if table is None:
            continue
        schema, _, name = table.partition(".")
        rel = snapshot.relation(schema, name)
        assert rel is not None
        col = next(c for c in rel.columns if c.attnum == res.ftablecol(i))
        assert col.labels <= f.output[i].labels, (sql, i)


SECRET = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=6, max_size=40
).filter(lambda s: s.strip() == s and any(ch.isalnum() for ch in s))


@settings(max_examples=300, deadline=None)
@given(SECRET, st.sampled_from(["plain", "escape", "dollar", "unicode", "comment"]))
def test_no_literal_survives_normalisation(secret: str, quoting: str) -> None:
    if quoting == "plain":
        lit = "'" + secret.replace("'", "''") + "'"
    elif quoting == "escape":
        lit = "E'" + secret.replace("\\", "\\\\").replace("'", "\\'") + "'"
    elif quoting == "dollar":
        tag = "q"
        while f"${tag}$" in secret:
            tag += "q"
        lit = f"${tag}${secret}${tag}$"
    elif quoting == "unicode":
        lit = "U&'" + "".join(f"\\{ord(c):04x}" if ord(c) < 0x10000 else c for c in secret) + "'"
    else:
        # PostgreSQL nests block comments: a "/*" inside would leave the comment open.
        secret = secret.replace("*/", "").replace("/*", "")
        lit = "1 /* " + secret + " */"
    sql = f"SELECT email FROM customers WHERE email = {lit} LIMIT 3"
    (f,) = ANALYZER.analyze(sql, ("public",))
    assert secret.replace("*/", "") not in f.normalized or secret in sql.replace(lit, "")
    assert f.output_labels == {"pii.email"}


SQL_WORDS = [
    "SELECT", "FROM", "WHERE", "JOIN", "LATERAL", "(", ")", ",", "*", "customers", "c", "email",
    "UNION", "WITH", "RECURSIVE", "AS", "x", "'lit'", "$1", "1", "c.*", "row_to_json(c)", ";",
    "INSERT", "INTO", "VALUES", "RETURNING", "COPY", "TO", "STDOUT", "reporting.vip_contacts",
    "ORDER", "BY", "LIMIT", "GROUP", "(SELECT", "EXISTS", "CASE", "WHEN", "THEN", "END", "=",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(SQL_WORDS), max_size=30)))
def test_analysis_never_raises(text: str | list[str]) -> None:
    sql = text if isinstance(text, str) else " ".join(text)
    facts = Analyzer(ANALYZER.snapshot).analyze(sql, ("public",))
    assert isinstance(facts, tuple)
    for f in facts:
        assert f.unanalysable is None or "internal error" not in f.unanalysable, (sql, f)
