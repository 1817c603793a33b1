"""Analysis behaviour beyond the corpus: normalised text, search_path, cache, sessions, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.cluster import schema_sql
from policy.analyze import Analyzer
from policy.catalog import CatalogColumn, CatalogRelation, CatalogSnapshot
from policy.facts import SourceColumn
from policy.labels import LabelRules
from policy.normalize import fingerprint, normalize
from policy.schema_sql import snapshot_from_sql
from policy.search_path import expand_user, parse_search_path, search_path_from_options
from policy.session_sql import SqlSession

EXTRA_SQL = (Path(__file__).parent / "corpus" / "extra_schema.sql").read_text()
SNAPSHOT = snapshot_from_sql(schema_sql() + "\n" + EXTRA_SQL)


@pytest.fixture()
def analyzer() -> Analyzer:
    return Analyzer(SNAPSHOT)


# --- normalised text: no literal survives -----------------------------------------------

SECRETS = [
    ("ALTER ROLE app PASSWORD 'hunter2-secret'", "hunter2-secret"),
    ("CREATE USER bob WITH PASSWORD 'md5abcdef0123'", "md5abcdef0123"),
    ("SELECT * FROM customers WHERE email = 'ann@x.example'", "ann@x.example"),
    ("SELECT * FROM customers WHERE email = E'ann\\x40x.example'", "ann"),
    ("SELECT * FROM customers WHERE email = $$ann@x.example$$", "ann@x.example"),
    ("SELECT * FROM customers WHERE email = $q$ann@x.example$q$", "ann@x.example"),
    ("SELECT * FROM customers WHERE phone = U&'+31\\0020612'", "+31"),
    ("SELECT * FROM customers WHERE customer_id = 987654321", "987654321"),
    ("SELECT * FROM customers WHERE customer_id = 12.75e3", "12.75e3"),
    ("SELECT * FROM t WHERE b = B'1011011'", "1011011"),
    ("SELECT * FROM t WHERE b = X'DEADBEEF'", "DEADBEEF"),
    ("SELECT 1 /* ann@x.example */", "ann@x.example"),
    ("SELECT 1 -- ann@x.example", "ann@x.example"),
    ("COMMENT ON COLUMN customers.email IS 'contact ann@x.example'", "ann@x.example"),
    ("PREPARE p AS SELECT 'ann@x.example'", "ann@x.example"),
    ("CREATE TABLE t (a text DEFAULT 'ann@x.example')", "ann@x.example"),
    ("SELEC email FROM customers WHERE email = 'ann@x.example'", "ann@x.example"),
    ("SELECT 'ann@x.example", "ann@x.example"),  # unterminated: the scanner fails too
    ("SELECT $$ann@x.example", "ann@x.example"),
    ("SELECT * FROM customers WHERE email = 'a''nn@x.example'", "nn@x.example"),
]


@pytest.mark.parametrize(("sql", "secret"), SECRETS)
def test_normalised_text_holds_no_literal(analyzer: Analyzer, sql: str, secret: str) -> None:
    assert secret not in normalize(sql)
    for f in analyzer.analyze(sql):
        assert secret not in f.normalized
        assert secret not in (f.unanalysable or "")


def test_normalised_text_keeps_structure_and_numbers_placeholders_after_params() -> None:
    assert (
        normalize("SELECT email FROM customers WHERE customer_id = $1 AND tier = 'vip' LIMIT 10")
        == "SELECT email FROM customers WHERE customer_id = $1 AND tier = $2 LIMIT $3"
    )


def test_fingerprint_ignores_literals_but_not_structure() -> None:
    a = fingerprint("SELECT email FROM customers WHERE customer_id = 1")
    b = fingerprint("SELECT email FROM customers WHERE customer_id = 2")
    c = fingerprint("SELECT phone FROM customers WHERE customer_id = 1")
    assert a == b != c
    assert fingerprint("SELEC nonsense").startswith("x")


def test_multi_statement_string_gives_one_fact_per_statement(analyzer: Analyzer) -> None:
    facts = analyzer.analyze("SELECT 1; SELECT email FROM customers ;  SELECT phone FROM customers")
    assert [f.kind for f in facts] == ["select", "select", "select"]
    assert [f.output_labels for f in facts] == [
        frozenset(),
        frozenset({"pii.email"}),
        frozenset({"pii.phone"}),
    ]
    assert facts[1].normalized == "SELECT email FROM customers"
    assert facts[2].location > facts[1].location > 0


def test_non_ascii_text_is_split_on_the_right_boundaries(analyzer: Analyzer) -> None:
    facts = analyzer.analyze("SELECT 'Zoë' AS naïve; SELECT email AS \"é\" FROM customers")
    assert facts[1].output[0].name == "é"
    assert facts[1].output_labels == {"pii.email"}
    assert "Zoë" not in facts[0].normalized


def test_parse_error_is_reported_with_position_not_raised(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze("SELECT email FROM customers WHERE")
    assert f.kind == "unknown"
    assert f.unanalysable is not None and "parse error" in f.unanalysable
    assert f.error_position == len("SELECT email FROM customers WHERE")


def test_empty_text_gives_no_statements(analyzer: Analyzer) -> None:
    assert analyzer.analyze("") == ()
    assert analyzer.analyze("  ;  -- nothing") == ()


def test_deep_nesting_does_not_crash(analyzer: Analyzer) -> None:
    sql = "SELECT " + "lower(" * 300 + "email" + ")" * 300 + " FROM customers"
    (f,) = analyzer.analyze(sql)
    assert f.output_labels == {"pii.email"} or f.unanalysable


# --- search_path ---------------------------------------------------------------------------


def test_set_search_path_applies_to_later_statements_in_the_same_string(
    analyzer: Analyzer,
) -> None:
    facts = analyzer.analyze("SET search_path = shadow, public; SELECT * FROM customers")
    assert facts[0].search_path == ("shadow", "public")
    assert facts[1].relations_read == {"shadow.customers"}
    assert facts[1].output_labels == {"pii.email"}


def test_set_config_search_path_is_tracked(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze("SELECT set_config('search_path', 'Shadow, \"Mixed\"', true)")
    assert f.search_path == ("shadow", "Mixed")
    assert f.search_path_local


def test_search_path_set_from_a_runtime_value_is_unanalysable(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze("SELECT set_config('search_path', current_user, false)")
    assert f.unanalysable


def test_set_local_and_reset(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze('SET LOCAL search_path TO "Mixed", public')
    assert f.search_path == ("Mixed", "public") and f.search_path_local
    (g,) = analyzer.analyze("RESET search_path")
    assert g.search_path_reset


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a, b", ("a", "b")),
        ('"$user", public', ("$user", "public")),
        ('Foo, "Bar", "x,y"', ("foo", "Bar", "x,y")),
        ('"with ""quote"""', ('with "quote"',)),
        ("", ()),
    ],
)
def test_parse_search_path_like_postgres(value: str, expected: tuple[str, ...]) -> None:
    assert parse_search_path(value) == expected


def test_search_path_from_startup_options() -> None:
    assert search_path_from_options("-c search_path=shadow,public") == ("shadow", "public")
    assert search_path_from_options("-csearch_path=a --work_mem=4MB") == ("a",)
    assert search_path_from_options(r"-c search_path=a,\ b") == ("a", "b")
    assert search_path_from_options("-c work_mem=4MB") is None


def test_user_schema_shadows_public_through_dollar_user(analyzer: Analyzer) -> None:
    assert expand_user(("$user", "public"), "shadow") == ("shadow", "public")
    (f,) = analyzer.analyze("SELECT * FROM customers", ("$user", "public"), user="shadow")
    assert f.relations_read == {"shadow.customers"}
    (g,) = analyzer.analyze("SELECT * FROM customers", ("$user", "public"), user="nobody")
    assert g.relations_read == {"public.customers"}


def test_pg_catalog_is_searched_first_unless_placed() -> None:
    snap = CatalogSnapshot.build(
        [
            CatalogRelation(
                1, "pg_catalog", "pg_class", "r", (_col("pg_catalog", "pg_class", "relname", 1),)
            ),
            CatalogRelation(
                2,
                "public",
                "pg_class",
                "r",
                (_col("public", "pg_class", "email", 1, {"pii.email"}),),
            ),
        ]
    )
    a = Analyzer(snap)
    assert a.analyze("SELECT * FROM pg_class", ("public",))[0].relations_read == {
        "pg_catalog.pg_class"
    }
    f = a.analyze("SELECT * FROM pg_class", ("public", "pg_catalog"))[0]
    assert f.relations_read == {"public.pg_class"} and f.output_labels == {"pii.email"}


def _col(
    schema: str, table: str, name: str, attnum: int, labels: set[str] | None = None
) -> CatalogColumn:
    return CatalogColumn(schema, table, name, attnum, "text", labels=frozenset(labels or ()))


# --- cache ---------------------------------------------------------------------------------


def test_cache_hits_and_keys_include_search_path(analyzer: Analyzer) -> None:
    first = analyzer.analyze("SELECT * FROM customers", ("public",))
    again = analyzer.analyze("SELECT * FROM customers", ("public",))
    assert again is first and analyzer.hits == 1
    other = analyzer.analyze("SELECT * FROM customers", ("shadow",))
    assert other[0].relations_read == {"shadow.customers"}


def test_cache_is_bounded() -> None:
    a = Analyzer(SNAPSHOT, cache_size=3)
    for i in range(10):
        a.analyze(f"SELECT {i}")
    assert len(a._cache) == 3
    a.analyze("SELECT 9")
    assert a.hits == 1
    a.analyze("SELECT 0")
    assert a.misses == 11


def test_new_snapshot_invalidates_cached_answers() -> None:
    class Holder:
        snapshot = SNAPSHOT

    from policy.catalog import Catalog

    holder = Catalog.__new__(Catalog)
    holder._snapshot = SNAPSHOT
    a = Analyzer(holder)
    assert a.analyze('SELECT note FROM "Mixed"."Customers"')[0].output_labels == set()
    relabelled = snapshot_from_sql(
        schema_sql()
        + EXTRA_SQL
        + '\nCOMMENT ON COLUMN "Mixed"."Customers".note IS \'pgwarden: pii.note\';'
    )
    holder._snapshot = relabelled
    assert a.analyze('SELECT note FROM "Mixed"."Customers"')[0].output_labels == {"pii.note"}


def test_label_rules_add_labels_by_glob(analyzer: Analyzer) -> None:
    rules = LabelRules(
        (("public.products.name", "catalog.product"), ("*.agents.full_name", "pii.name"))
    )
    a = Analyzer(SNAPSHOT, rules)
    (f,) = a.analyze("SELECT p.name, a.full_name, a.email FROM products p, agents a")
    assert [c.labels for c in f.output] == [
        {"catalog.product"},
        {"pii.name"},
        {"pii.email"},  # the comment label stays
    ]
    assert a.column_at(SNAPSHOT.relation("public", "products").oid, 2).labels == {"catalog.product"}  # type: ignore[union-attr]


# --- sessions: PREPARE/EXECUTE and cursors ------------------------------------------------


def test_execute_carries_the_prepared_statement_lineage(analyzer: Analyzer) -> None:
    s = SqlSession(analyzer, ("public",))
    s.analyze("PREPARE q(bigint) AS SELECT email, phone FROM customers WHERE customer_id = $1")
    (f,) = s.analyze("EXECUTE q(7)")
    assert f.kind == "execute"
    assert f.output_labels == {"pii.email", "pii.phone"}
    assert f.relations_read == {"public.customers"}
    s.analyze("DEALLOCATE q")
    assert s.analyze("EXECUTE q(7)")[0].unanalysable


def test_execute_resolves_names_under_the_current_search_path(analyzer: Analyzer) -> None:
    s = SqlSession(analyzer, ("public",))
    s.analyze("PREPARE q AS SELECT * FROM customers")
    s.analyze("SET search_path = shadow")
    (f,) = s.analyze("EXECUTE q")
    assert f.relations_read == {"shadow.customers"}


def test_fetch_returns_what_the_cursor_was_declared_over(analyzer: Analyzer) -> None:
    s = SqlSession(analyzer, ("public",))
    s.analyze("BEGIN; DECLARE c CURSOR FOR SELECT name, email FROM reporting.customer_contacts")
    (f,) = s.analyze("FETCH 500 FROM c")
    assert f.kind == "fetch" and f.fetch_count == 500
    assert f.output_labels == {"pii.name", "pii.email"}
    (m,) = s.analyze("MOVE ALL IN c")
    assert m.output == () and m.fetch_count is None
    s.analyze("CLOSE c")
    assert s.analyze("FETCH c")[0].unanalysable


def test_session_tracks_search_path_and_local_scope(analyzer: Analyzer) -> None:
    s = SqlSession(analyzer)
    s.set_startup_options("-c search_path=shadow,public")
    assert s.search_path == ("shadow", "public")
    s.analyze("SET LOCAL search_path = public")
    assert s.search_path == ("public",)
    s.end_transaction()
    assert s.search_path == ("shadow", "public")
    s.analyze("SET search_path = reporting")
    s.analyze("RESET search_path")
    assert s.search_path == ("shadow", "public")


# --- statement facts -------------------------------------------------------------------------


def test_copy_facts(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze("COPY (SELECT email FROM customers) TO PROGRAM 'gzip > /tmp/x'")
    assert (f.copy_direction, f.copy_target, f.copy_program, f.copy_source) == (
        "to", "program", True, "query",
    )  # fmt: skip
    (g,) = analyzer.analyze("COPY customers TO STDOUT")
    assert (g.copy_direction, g.copy_target, g.copy_source) == ("to", "stdout", "public.customers")
    (h,) = analyzer.analyze("COPY archive FROM STDIN")
    assert h.copy_direction == "from" and h.relations_written == {"public.archive"}


def test_functions_and_user_functions_are_recorded(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze("SELECT pg_read_file('/etc/passwd'), lo_export(1, '/tmp/x')")
    assert {"pg_read_file", "lo_export"} <= f.functions


def test_ddl_is_flagged_for_catalog_invalidation(analyzer: Analyzer) -> None:
    for sql in (
        "CREATE TABLE t (a int)",
        "ALTER TABLE customers ADD COLUMN x text",
        "DROP VIEW reporting.vip_contacts",
        "COMMENT ON COLUMN customers.tier IS 'pgwarden: x'",
        "CREATE VIEW v AS SELECT email FROM customers",
    ):
        assert analyzer.analyze(sql)[0].is_ddl, sql
    assert not analyzer.analyze("SELECT 1")[0].is_ddl


def test_unknown_relation_is_followed_by_name_and_reported(analyzer: Analyzer) -> None:
    rules = LabelRules((("*.new_people.email", "pii.email"),))
    a = Analyzer(SNAPSHOT, rules)
    (f,) = a.analyze("SELECT email FROM new_people")
    assert f.output[0].sources == {SourceColumn("public", "new_people", "email")}
    assert f.output_labels == {"pii.email"}
    assert "relation public.new_people" in f.unresolved
