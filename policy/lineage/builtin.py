"""What PostgreSQL's own functions and views do with the data they are given, as the lineage
walk needs to know it: which functions pack many values into one, run SQL given as text, dump
whole schemas or read whole tables; the side channels data can be parked in and read back
from (large objects, notifications, settings, advisory locks, server files); the aggregate and
window functions, and those whose result carries no value of their arguments; and the
statistics views' sample-value columns.  Tables only: the walk that consults them is in
``policy.lineage.expressions``.
"""

from __future__ import annotations

from policy.facts import SourceColumn

# Functions and aggregates that pack many values, or a whole row, into one value: a way to
# move a whole table through one cell and past per-row limits.
PACKING_FUNCTIONS = frozenset(
    {
        "json_agg",
        "jsonb_agg",
        "json_agg_strict",
        "jsonb_agg_strict",
        "array_agg",
        "string_agg",
        "xmlagg",
        "json_object_agg",
        "jsonb_object_agg",
        "json_object_agg_strict",
        "jsonb_object_agg_strict",
        "json_object_agg_unique",
        "jsonb_object_agg_unique",
        "json_object_agg_unique_strict",
        "jsonb_object_agg_unique_strict",
        "row_to_json",
        "to_json",
        "to_jsonb",
        "array_to_json",
        "json_build_object",
        "jsonb_build_object",
        "json_build_array",
        "jsonb_build_array",
        "json_object",
        "jsonb_object",
        "hstore",
        "xmlforest",
        "xmlconcat",
        "row_to_xml",
        "json_populate_record",
        "range_agg",
    }
)

# Functions that run SQL given as text: nothing in the statement says what that SQL reads.
SQL_TEXT_FUNCTIONS = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "dblink",
        "dblink_exec",
        "dblink_open",
        "dblink_send_query",
        "dblink_fetch",
        "dblink_get_result",
        # Text search statistics and rewriting run the query given as text.
        "ts_stat",
        "ts_rewrite",
    }
)

# Functions that dump every table of a schema or database as XML.
WHOLE_SCHEMA_FUNCTIONS = frozenset(
    {
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
    }
)

# Side channels: data written into large objects or NOTIFY payloads leaves the table it came
# from; reading large objects back returns whatever was put there (tracked as a copy target).
LARGE_OBJECT = SourceColumn("pg_catalog", "pg_largeobject", "data")
LO_WRITE_FUNCTIONS = frozenset({"lo_from_bytea", "lo_put", "lowrite"})
LO_READ_FUNCTIONS = frozenset({"lo_get", "loread", "lo_export"})
NOTIFY_TARGET = "pg_catalog.pg_notify"

# set_config(name, value): a value kept in the session, read back with current_setting()
# past every row limit (accumulated over a table's rows in a WHERE clause).
SETTINGS_TARGET = "pg_catalog.set_config"

# pg_advisory_lock(key) and its kin: a key taken is read back from pg_locks by anyone (the
# lock is taken while the rows are read, before any limit can refuse the result).
LOCKS_TARGET = "pg_catalog.pg_locks"

# Files on the database server (COPY ... TO 'file' / PROGRAM, then pg_read_file).
SERVER_FILES = SourceColumn("pg_catalog", "server_files", "data")
SERVER_FILES_TARGET = "pg_catalog.server_files"
FILE_READ_FUNCTIONS = frozenset({"pg_read_file", "pg_read_binary_file", "lo_import"})

# Functions that read a whole table named by a regclass argument.
TABLE_TEXT_FUNCTIONS = frozenset(
    {"table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema"}
)

# PostgreSQL's own aggregate and window functions, for snapshots that do not list them (built
# from a schema file): a call to one combines the values of many rows into one.
BUILTIN_AGGREGATES = frozenset(
    {
        "any_value", "array_agg", "avg", "bit_and", "bit_or", "bit_xor", "bool_and", "bool_or",
        "corr", "count", "covar_pop", "covar_samp", "cume_dist", "dense_rank", "every",
        "first_value", "json_agg", "json_agg_strict", "json_object_agg",
        "json_object_agg_strict", "json_object_agg_unique", "json_object_agg_unique_strict",
        "jsonb_agg", "jsonb_agg_strict", "jsonb_object_agg", "jsonb_object_agg_strict",
        "jsonb_object_agg_unique", "jsonb_object_agg_unique_strict", "lag", "last_value",
        "lead", "max", "min", "mode", "nth_value", "ntile", "percent_rank", "percentile_cont",
        "percentile_disc", "range_agg", "range_intersect_agg", "rank", "regr_avgx",
        "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx",
        "regr_sxy", "regr_syy", "row_number", "stddev", "stddev_pop", "stddev_samp",
        "string_agg", "sum", "var_pop", "var_samp", "variance", "xmlagg",
    }
)  # fmt: skip

# Aggregate and window functions whose result carries none of their arguments' values: a
# count, a truth value, a rank. They may read labelled columns (a filter, in effect) without
# putting any labelled value in front of the client.
VALUELESS_AGGREGATES = frozenset(
    {
        "count", "bool_and", "bool_or", "every", "regr_count", "row_number", "rank",
        "dense_rank", "percent_rank", "cume_dist", "ntile",
    }
)  # fmt: skip

# Aggregate syntax that only aggregates (and window functions) accept.
AGG_SYNTAX = ("agg_star", "agg_distinct", "agg_order", "agg_within_group", "agg_filter", "over")

# Columns of the planner's statistics views that hold sample values of the columns they
# describe (up to default_statistics_target of them each: a hundred emails in one row).
# Readable for any column the reader may SELECT, so they carry every label, combined.
STATISTICS_VALUES = frozenset(
    ("pg_catalog", view, column)
    for view, columns in (
        ("pg_stats", ("most_common_vals", "histogram_bounds", "most_common_elems")),
        ("pg_stats_ext", ("most_common_vals", "most_common_base_freqs")),
        ("pg_stats_ext_exprs", ("most_common_vals", "histogram_bounds", "most_common_elems")),
    )
    for column in columns
)
