"""The hand-written corpus (tests/corpus/statements.yaml) against the analyser.

Each statement is checked twice: against a snapshot built from the schema SQL (no database),
and against the catalog loaded from a real PostgreSQL, where the statement also runs and
every output column PostgreSQL attributes to a labelled table column must carry that label
in the analysis (analysis ⊇ RowDescription).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from policy.analyze import Analyzer
from policy.catalog import CatalogSnapshot, load_catalog
from policy.facts import QueryFacts, SourceColumn
from policy.schema_sql import snapshot_from_sql
from policy.search_path import parse_search_path
from proxy.sandbox.cluster import Cluster, schema_sql

CORPUS_DIR = Path(__file__).parent / "corpus"
CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS_DIR / "statements.yaml").read_text())
EXTRA_SQL = (CORPUS_DIR / "extra_schema.sql").read_text()
ANALYSIS_DB = "analysis_corpus"


def _src(s: str) -> SourceColumn:
    """``table.column`` or ``schema.table.column``; a trailing ``+`` marks values that reach
    the column combined from many rows (an aggregate, an ARRAY sublink ...)."""
    many = s.endswith("+")
    parts = s.rstrip("+").split(".")
    src = (
        SourceColumn("public", parts[0], parts[1])
        if len(parts) == 2
        else SourceColumn(parts[0], parts[1], parts[2])
    )
    return src.as_combined() if many else src


def _path(case: dict[str, Any]) -> tuple[str, ...]:
    return parse_search_path(case.get("path", "public"))


def check_case(case: dict[str, Any], facts: tuple[QueryFacts, ...]) -> None:
    """Assert every expectation the case states."""
    sql = case["sql"]
    assert len(facts) == 1, sql
    f = facts[0]
    if "kind" in case:
        assert f.kind == case["kind"], sql
    if case.get("unanalysable"):
        assert f.unanalysable, f"{sql}: expected unanalysable"
    else:
        assert f.unanalysable is None, f"{sql}: {f.unanalysable}"
    if "labels" in case:
        assert f.output_labels == frozenset(case["labels"]), sql
    if "reads" in case:
        assert f.relations_read == frozenset(case["reads"]), sql
    if "written" in case:
        assert f.relations_written == frozenset(case["written"]), sql
    if "cols" in case:
        got = [(c.name, c.sources) for c in f.output]
        want = [(name, frozenset(_src(s) for s in srcs)) for name, srcs in case["cols"]]
        assert got == want, sql
    if "per_row" in case:
        assert f.records_per_row == case["per_row"], sql
    if "combined" in case:
        assert f.combined_labels == frozenset(case["combined"]), sql
    if "star" in case:
        assert f.select_star == case["star"], sql
    for fn in case.get("pack", ()):
        assert fn in {p.function for p in f.packing}, f"{sql}: no packing {fn}"
    if "copies" in case:
        assert f.copied_labels == frozenset(case["copies"]), sql
    if "where" in case:
        assert f.has_where == case["where"], sql
    if "limit" in case:
        assert f.limit == case["limit"], sql
    if "offset" in case:
        assert f.offset == case["offset"], sql
    if "filter" in case:
        assert frozenset(case["filter"]) <= f.filter_labels, sql


FILE_SNAPSHOT = snapshot_from_sql(schema_sql() + "\n" + EXTRA_SQL)


@pytest.fixture()
def file_analyzer() -> Analyzer:
    # A fresh analyzer per case: copies into tables taint them for later statements, and
    # each corpus case stands alone.
    return Analyzer(FILE_SNAPSHOT)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 150


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.get("db_only")], ids=lambda c: c["sql"][:60]
)
def test_corpus_case_against_schema_file(case: dict[str, Any], file_analyzer: Analyzer) -> None:
    check_case(case, file_analyzer.analyze(case["sql"], _path(case)))


# --- against a real PostgreSQL -------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_db(pg: Cluster) -> Iterator[str]:
    """A database of its own (the shared 'support' database stays as the schema file has it)."""
    pg.psql(
        f"DROP DATABASE IF EXISTS {ANALYSIS_DB}; CREATE DATABASE {ANALYSIS_DB};",
        database="postgres",
    )
    pg.psql(schema_sql() + "\n" + EXTRA_SQL, database=ANALYSIS_DB)
    yield pg.dsn(database=ANALYSIS_DB)


@pytest.fixture(scope="module")
def db_snapshot(corpus_db: str) -> CatalogSnapshot:
    async def load() -> CatalogSnapshot:
        conn = await asyncpg.connect(dsn=_asyncpg_dsn(corpus_db))
        try:
            return await load_catalog(conn)
        finally:
            await conn.close()

    return asyncio.run(load())


def _asyncpg_dsn(dsn: str) -> str:
    kv = dict(part.split("=", 1) for part in dsn.split())
    return f"postgresql://{kv['user']}@{kv['host']}:{kv['port']}/{kv['dbname']}"


def test_corpus_against_live_catalog(db_snapshot: CatalogSnapshot) -> None:
    failures = []
    for case in CASES:
        try:
            check_case(case, Analyzer(db_snapshot).analyze(case["sql"], _path(case)))
        except AssertionError as exc:
            failures.append(f"{case['sql']}: {exc}")
    assert not failures, "\n".join(failures)


def test_row_description_labels_are_covered_by_analysis(
    corpus_db: str, db_snapshot: CatalogSnapshot
) -> None:
    """Run each runnable statement; what PostgreSQL says a column comes from must be labelled."""
    checked_labelled = 0
    problems = []
    with psycopg.connect(corpus_db, autocommit=False) as conn:
        conn.execute(
            "INSERT INTO customers VALUES (1, 'Ann Example', 'ann@x.example', '+31 6 1234 5678',"
            " 'Main St 1', 'Utrecht', '1234 AB', 'NL', 'vip', now())"
        )
        for case in CASES:
            if case.get("run") is False or case.get("unanalysable"):
                continue
            facts = Analyzer(db_snapshot).analyze(case["sql"], _path(case))[0]
            with conn.cursor() as cur:
                cur.execute("SAVEPOINT s")
                cur.execute(f"SET LOCAL search_path = {case.get('path', 'public')}")
                try:
                    cur.execute(case["sql"])
                except psycopg.Error as exc:
                    problems.append(f"{case['sql']}: PostgreSQL rejected it: {exc}")
                    cur.execute("ROLLBACK TO SAVEPOINT s")
                    continue
                res = cur.pgresult
                assert res is not None
                fields = [(res.ftable(i), res.ftablecol(i)) for i in range(res.nfields)]
                checked_labelled += sum(
                    1 for oid, att in fields if (c := db_snapshot.column_at(oid, att)) and c.labels
                )
                for i, col in Analyzer(db_snapshot).row_description_gaps(facts, fields):
                    problems.append(f"{case['sql']}: column {i} ({col.qualified}) not labelled")
                cur.execute("ROLLBACK TO SAVEPOINT s")
        conn.rollback()
    assert not problems, "\n".join(problems)
    assert checked_labelled > 50
