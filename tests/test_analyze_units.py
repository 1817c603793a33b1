"""Analysis behaviour beyond the corpus: normalised text, search_path, cache, sessions, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy.analyze import Analyzer
from policy.catalog import CatalogColumn, CatalogRelation, CatalogSnapshot
from policy.facts import SourceColumn
from policy.labels import LabelRules
from policy.normalize import fingerprint, normalize
from policy.schema_sql import snapshot_from_sql
from policy.search_path import expand_user, parse_search_path, search_path_from_options
from policy.session_sql import SqlSession
from proxy.sandbox.cluster import schema_sql

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
    # Text PostgreSQL cannot parse still has a stable shape of its own.
    assert fingerprint("SELEC nonsense 1") == fingerprint("selec  nonsense 2") != a


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


@pytest.mark.parametrize(
    "call",
    ['"set_config"', "pg_catalog.SET_CONFIG", 'U&"set\\005fconfig"', 'u&"\\0073et_config"'],
)
def test_set_config_is_followed_however_its_name_is_spelled(analyzer: Analyzer, call: str) -> None:
    (f,) = analyzer.analyze(f"SELECT {call}('search_path', 'shadow', false)")
    assert f.search_path == ("shadow",)


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
        a.analyze(f"SELECT {i} AS c{i}")  # distinct shapes too (the alias differs)
    assert len(a._cache) == 3 and len(a._shapes) == 3
    a.analyze("SELECT 9 AS c9")
    assert a.hits == 1
    a.analyze("SELECT 0 AS c0")
    assert a.misses == 11


def test_new_snapshot_invalidates_cached_answers() -> None:
    from policy.catalog import Catalog

    async def unused() -> None:
        raise AssertionError("not called")

    catalog = Catalog(unused)
    catalog.install(SNAPSHOT)
    a = Analyzer(catalog)
    sql = 'SELECT note FROM "Mixed"."Customers"'
    assert a.analyze(sql)[0].output_labels == set()
    catalog.install(
        snapshot_from_sql(
            schema_sql()
            + EXTRA_SQL
            + """\nCOMMENT ON COLUMN "Mixed"."Customers".note IS 'pgwarden: pii.note';"""
        )
    )
    assert a.analyze(sql)[0].output_labels == {"pii.note"}


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


def test_data_copied_into_a_table_keeps_its_labels_there_once_committed() -> None:
    a = Analyzer(SNAPSHOT)
    create, copy = a.analyze(
        "CREATE TEMP TABLE stash AS SELECT email FROM customers; COPY stash TO STDOUT"
    )
    assert create.copied_labels == {"pii.email"}
    # Analysing a write taints nothing: it may yet be refused or rolled back. Until it has
    # committed, the new table is unknown (refused to subjects with limits).
    assert a.tainted == {}
    assert copy.unknown
    a.note_copies(create.copies)
    assert a.analyze("SELECT * FROM stash")[0].output_labels == {"pii.email"}
    (insert,) = a.analyze("INSERT INTO archive (payload) SELECT phone FROM customers")
    assert a.analyze("SELECT payload FROM archive")[0].output_labels == set()
    a.note_copies(insert.copies)
    assert a.analyze("SELECT payload FROM archive")[0].output_labels == {"pii.phone"}
    # Only the column the write filled carries the label.
    assert a.analyze("SELECT id FROM archive")[0].output_labels == set()
    assert a.tainted[("public", "archive")] == {"payload": {"pii.phone"}}
    # Another analyzer (another snapshot holder) knows nothing of it.
    assert Analyzer(SNAPSHOT).analyze("SELECT payload FROM archive")[0].output_labels == set()


def test_an_update_taints_only_the_columns_it_set() -> None:
    a = Analyzer(SNAPSHOT)
    (f,) = a.analyze(
        "UPDATE tickets t SET subject = c.email FROM customers c WHERE c.customer_id = t.customer_id"
    )
    assert {(cp.target, cp.column) for cp in f.copies} == {("public.tickets", "subject")}
    a.note_copies(f.copies)
    assert a.analyze("SELECT subject FROM tickets")[0].output_labels == {"pii.email"}
    assert (
        a.analyze("SELECT status, count(*) FROM tickets GROUP BY status")[0].output_labels == set()
    )


def test_set_role_changes_what_dollar_user_means(analyzer: Analyzer) -> None:
    s = SqlSession(analyzer, ("$user", "public"), user="alice")
    assert s.analyze("SELECT * FROM customers")[0].relations_read == {"public.customers"}
    s.analyze("SET ROLE shadow")
    assert s.analyze("SELECT * FROM customers")[0].relations_read == {"shadow.customers"}
    s.analyze("RESET ROLE")
    assert s.analyze("SELECT * FROM customers")[0].relations_read == {"public.customers"}


def test_unqualified_column_in_subquery_over_unknown_table_may_be_the_outer_one(
    analyzer: Analyzer,
) -> None:
    # If new_t has no column "email", PostgreSQL binds it to the outer customers.email.
    (f,) = analyzer.analyze("SELECT (SELECT email FROM new_t LIMIT 1) FROM customers")
    assert f.output_labels == {"pii.email"}


def test_group_by_output_alias_resolves_without_noise(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze(
        "SELECT split_part(email, '@', 2) AS domain, count(*) FROM customers GROUP BY domain"
    )
    assert f.unresolved == () and f.filter_labels == {"pii.email"}


def test_huge_statements_are_analysed_but_not_cached() -> None:
    a = Analyzer(SNAPSHOT, max_cached_text=1000)
    sql = "INSERT INTO archive VALUES " + ", ".join(f"({i}, 'x')" for i in range(500))
    (f,) = a.analyze(sql)
    assert f.kind == "insert" and f.relations_written == {"public.archive"}
    a.analyze(sql)
    assert a.hits == 0 and len(a._cache) == 0


def test_quoted_names_keep_their_case(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze('SELECT email FROM "Customers"')
    assert f.relations_read == {"public.Customers"} and "relation public.Customers" in f.unresolved
    (g,) = analyzer.analyze('SELECT "Email" FROM "Mixed"."Customers"')
    assert g.output_labels == {"pii.email"}
    (h,) = analyzer.analyze('SELECT "EMAIL" FROM customers')
    assert h.output_labels == set() and "column EMAIL" in h.unresolved


def test_column_at_includes_copy_taint() -> None:
    a = Analyzer(SNAPSHOT)
    archive = SNAPSHOT.relation("public", "archive")
    assert archive is not None
    assert a.column_at(archive.oid, 2).labels == set()  # type: ignore[union-attr]
    (f,) = a.analyze("INSERT INTO archive SELECT customer_id, email FROM customers")
    a.note_copies(f.copies)
    assert a.column_at(archive.oid, 2).labels == {"pii.email"}  # type: ignore[union-attr]
    assert a.column_at(archive.oid, 1).labels == set()  # type: ignore[union-attr]


def test_packing_inside_a_view_is_reported_to_its_readers() -> None:
    snap = snapshot_from_sql(
        schema_sql()
        + "\nCREATE VIEW reporting.all_mail AS SELECT json_agg(email) AS j FROM customers;"
    )
    (f,) = Analyzer(snap).analyze("SELECT j FROM reporting.all_mail")
    assert [(p.function, p.labels) for p in f.packing] == [("json_agg", {"pii.email"})]
    assert f.output_labels == {"pii.email"}


def test_analysis_before_the_catalog_is_loaded_fails_closed_without_raising() -> None:
    from policy.catalog import Catalog

    async def never() -> None:
        raise AssertionError("not called")

    a = Analyzer(Catalog(never))
    (f,) = a.analyze("SELECT email FROM customers WHERE email = 'ann@x.example'")
    assert f.unanalysable and "catalog" in f.unanalysable
    assert "ann@x.example" not in f.normalized


def test_row_description_gaps_name_what_the_analysis_missed(analyzer: Analyzer) -> None:
    customers = SNAPSHOT.relation("public", "customers")
    assert customers is not None
    email = customers.column("email")
    assert email is not None
    (f,) = analyzer.analyze("SELECT email, 1 FROM customers")
    assert analyzer.row_description_gaps(f, [(customers.oid, email.attnum), (0, 0)]) == []
    (g,) = analyzer.analyze("SELECT 'x' AS email")
    assert analyzer.row_description_gaps(g, [(customers.oid, email.attnum)]) == [(0, email)]


@pytest.mark.parametrize(
    ("create", "call", "labels"),
    [
        ("CREATE FUNCTION f1() RETURNS text BEGIN ATOMIC SELECT max(phone) FROM customers; END",
         "SELECT f1()", {"pii.phone"}),
        ("CREATE FUNCTION f2() RETURNS text RETURN (SELECT min(street) FROM customers)",
         "SELECT f2()", {"pii.address"}),
        ("CREATE FUNCTION f3() RETURNS TABLE(e text) LANGUAGE plpgsql AS $$ BEGIN"
         " RETURN QUERY SELECT full_name FROM customers; END $$",
         "SELECT * FROM f3()", {"pii.name"}),
    ],
)  # fmt: skip
def test_functions_created_in_the_session_are_followed_before_the_catalog_knows_them(
    create: str, call: str, labels: set[str]
) -> None:
    a = Analyzer(SNAPSHOT)
    (c,) = a.analyze(create)
    assert c.defines_function is not None and c.is_ddl
    (f,) = a.analyze(call)
    assert f.output_labels == labels and f.unanalysable is None


def test_large_objects_and_notify_are_tracked_as_copies() -> None:
    a = Analyzer(SNAPSHOT)
    (w,) = a.analyze(
        "SELECT lo_from_bytea(0, convert_to(string_agg(email, ','), 'UTF8')) FROM customers"
    )
    assert w.copied_labels == {"pii.email"}
    a.note_copies(w.copies)  # the write committed
    (r,) = a.analyze("SELECT lo_get(16400)")
    assert r.output_labels == {"pii.email"}
    (n,) = a.analyze("SELECT pg_notify('leak', phone) FROM customers")
    assert [(c.target, c.labels) for c in n.copies] == [("pg_catalog.pg_notify", {"pii.phone"})]


def test_server_files_are_tracked_as_copies() -> None:
    a = Analyzer(SNAPSHOT)
    (c,) = a.analyze("COPY (SELECT email FROM customers) TO '/tmp/out.csv'")
    assert [(x.target, x.labels) for x in c.copies] == [("pg_catalog.server_files", {"pii.email"})]
    a.note_copies(c.copies)  # the file is written
    (r,) = a.analyze("SELECT pg_read_file('/tmp/out.csv')")
    assert r.output_labels == {"pii.email"}
    (load,) = a.analyze("COPY archive FROM '/tmp/out.csv'")
    a.note_copies(load.copies)
    assert a.analyze("SELECT payload FROM archive")[0].output_labels == {"pii.email"}


def test_record_keys_locate_primary_keys_of_labelled_rows(analyzer: Analyzer) -> None:
    (f,) = analyzer.analyze("SELECT email, customer_id FROM customers")
    assert [(k.relation, k.positions) for k in f.record_keys] == [("public.customers", (1,))]
    (v,) = analyzer.analyze("SELECT name, customer_id FROM reporting.customer_contacts")
    assert [(k.relation, k.columns, k.positions) for k in v.record_keys] == [
        ("public.customers", ("customer_id",), (1,))
    ]
    (n,) = analyzer.analyze("SELECT email FROM customers")  # no key in the output
    assert n.record_keys == ()
    (p,) = analyzer.analyze("SELECT product_id, name FROM products")  # nothing labelled
    assert p.record_keys == ()


def test_output_labels_are_what_reaches_the_client(analyzer: Analyzer) -> None:
    (ctas,) = analyzer.analyze("CREATE TABLE x AS SELECT json_agg(email) FROM customers")
    assert ctas.output_labels == set() and ctas.copied_labels == {"pii.email"}
    (explain,) = analyzer.analyze("EXPLAIN SELECT json_agg(email) FROM customers")
    assert explain.output_labels == set() and explain.relations_read == {"public.customers"}
    (count,) = analyzer.analyze(
        "SELECT count(*) FROM (SELECT json_agg(email) AS j FROM customers) s"
    )
    assert count.output_labels == set() and count.packing[0].labels == {"pii.email"}


def test_cursor_and_prepared_statements_carry_their_querys_where_and_limit() -> None:
    from policy.schema_sql import snapshot_from_sql
    from policy.session_sql import SqlSession

    snap = snapshot_from_sql(
        (Path(__file__).resolve().parent.parent / "config" / "support_schema.sql").read_text()
    )
    s = SqlSession(Analyzer(snap))
    (declare,) = s.analyze(
        "DECLARE c CURSOR FOR SELECT email FROM customers WHERE customer_id < 5 LIMIT 3"
    )
    assert (declare.has_where, declare.has_limit, declare.limit) == (True, True, 3)
    (fetch,) = s.analyze("FETCH 2 FROM c")
    assert fetch.has_where and fetch.output_labels == declare.output_labels
    (prep,) = s.analyze("PREPARE p AS SELECT email FROM customers")
    assert not prep.has_where and not prep.has_limit


def _shape_analyzer() -> Analyzer:
    return Analyzer(snapshot_from_sql(schema_sql()))


def test_texts_differing_only_in_literals_share_their_analysis() -> None:
    a = _shape_analyzer()
    (f1,) = a.analyze("SELECT email FROM customers WHERE customer_id = 42", ("public",))
    (f2,) = a.analyze("SELECT email FROM customers WHERE customer_id = 4711", ("public",))
    assert a.shape_hits == 1
    assert f2.output_labels == f1.output_labels == {"pii.email"}
    assert f2.normalized == f1.normalized


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # A literal that is SQL: the second must be analysed on its own.
        ("SELECT query_to_xml('SELECT 1', true, true, '')",
         "SELECT query_to_xml('SELECT email FROM customers', true, true, '')"),
        ("SELECT set_config('search_path', 'public', false)",
         "SELECT set_config('search_path', 'shadow', false)"),
        # Not lexically plain: comments, dollar quotes, several statements.
        ("SELECT 1 /* x */, email FROM customers WHERE customer_id = 1",
         "SELECT 2 /* x */, email FROM customers WHERE customer_id = 1"),
        ("SELECT $$a$$, email FROM customers WHERE customer_id = 1",
         "SELECT $$b$$, email FROM customers WHERE customer_id = 1"),
        ("SELECT 1; SELECT email FROM customers WHERE customer_id = 1",
         "SELECT 2; SELECT email FROM customers WHERE customer_id = 1"),
    ],
)  # fmt: skip
def test_shapes_are_not_shared_where_a_literal_could_matter(first: str, second: str) -> None:
    a = _shape_analyzer()
    a.analyze(first, ("public",))
    a.analyze(second, ("public",))
    assert a.shape_hits == 0


def test_pure_helper_functions_do_not_stop_texts_sharing_their_analysis() -> None:
    # A support tool looks tickets up by the number typed in: 'TM-' || lpad(...).
    a = _shape_analyzer()
    sql = (
        "SELECT c.email FROM tickets t JOIN customers c ON c.customer_id = t.customer_id"
        " WHERE t.ticket_number = 'TM-' || lpad(CAST({} AS text), 7, '0')"
    )
    a.analyze(sql.format(17), ("public",))
    (f,) = a.analyze(sql.format(4711), ("public",))
    assert a.shape_hits == 1
    assert f.output_labels == {"pii.email"}
    assert {"public.tickets", "public.customers"} <= f.relations_read


def test_statements_naming_different_end_users_share_their_analysis() -> None:
    # sqlcommenter puts the end user in a trailing comment of every statement; the parser
    # ignores it, so agents' statements of one shape are analysed once.
    a = _shape_analyzer()
    (f1,) = a.analyze(
        "SELECT email FROM customers WHERE customer_id = 42 /* end_user='agent001' */",
        ("public",),
    )
    (f2,) = a.analyze(
        "SELECT email FROM customers WHERE customer_id = 7 /* end_user='agent002' */",
        ("public",),
    )
    assert a.shape_hits == 1
    assert f2.output_labels == {"pii.email"} and f2.normalized == f1.normalized
    assert "agent" not in f2.normalized


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # The comment is not the text's end, or a literal would swallow it.
        ("SELECT 1 /* a */ , email FROM customers /* b */",
         "SELECT 2 /* a */ , email FROM customers /* b */"),
        ("SELECT email FROM customers WHERE email = '/* x */' /* c */",
         "SELECT email FROM customers WHERE email = '/* y */' /* c */"),
    ],
)  # fmt: skip
def test_only_a_plain_trailing_comment_is_set_aside(first: str, second: str) -> None:
    a = _shape_analyzer()
    a.analyze(first, ("public",))
    a.analyze(second, ("public",))
    assert a.shape_hits == 0


def test_a_quote_inside_an_identifier_cannot_hide_a_different_statement() -> None:
    a = _shape_analyzer()
    a.analyze("""SELECT "x'" FROM products WHERE name = 'a' """.strip(), ("public",))
    (f,) = a.analyze("""SELECT "x'" FROM customers WHERE email = 'a' """.strip(), ("public",))
    assert a.shape_hits == 0
    assert "public.customers" in f.relations_read


@pytest.mark.parametrize(
    ("sql", "bounded"),
    [
        ("SELECT * FROM lookup_customer($1)", True),
        ("SELECT * FROM lookup_customer('%')", False),  # the constant filters nothing known
        ("SELECT * FROM customers c, lookup_customer($1) x", False),  # customers is not
        ("SELECT * FROM customers WHERE customer_id = $1", True),
    ],
)
def test_a_function_called_with_a_parameter_counts_as_filtered(
    analyzer: Analyzer, sql: str, bounded: bool
) -> None:
    assert analyzer.analyze(sql)[0].has_where is bounded
