"""COPY output rows are read back field for field as PostgreSQL wrote them (text and CSV,
with the options people use), so the ledger gets the right keys from a COPY."""

from __future__ import annotations

import json

import psycopg
import pytest
from pglast.parser import parse_sql_json

from policy.utility_facts import copy_options
from proxy.copyrows import reader_for
from proxy.messages.errors import ProtocolError
from proxy.sandbox.cluster import Cluster

TRICKY = [
    "plain",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash",
    "pipe|and;semi,comma",
    'quote"inside',
    "Ņ utf-8 whose bytes hold \x85-like continuation bytes: Ņ…",
    "",
    None,
    "\\N",
    "long " * 60_000,  # 300 KB: past the csv module's default field limit
]


@pytest.fixture(scope="module")
def table(pg: Cluster) -> str:
    with psycopg.connect(pg.dsn(database="postgres"), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS copy_rows; CREATE TABLE copy_rows (id int, v text)")
        for i, v in enumerate(TRICKY):
            conn.execute("INSERT INTO copy_rows VALUES (%s, %s)", (i, v))
    return "copy_rows"


@pytest.mark.parametrize(
    "options",
    [
        "",
        "(DELIMITER '|')",
        "(NULL 'nil')",
        "(FORMAT csv)",
        "(FORMAT csv, HEADER, DELIMITER ';')",
        "(FORMAT csv, QUOTE '''', ESCAPE '\\', NULL 'NULL')",
        "CSV HEADER",
    ],
)
def test_fields_come_back_as_postgresql_wrote_them(pg: Cluster, table: str, options: str) -> None:
    sql = f"COPY (SELECT id, v FROM {table} ORDER BY id) TO STDOUT {options}"
    with psycopg.connect(pg.dsn(database="postgres")) as conn:
        with conn.cursor().copy(sql) as copy:
            messages = [bytes(m) for m in copy]  # one CopyData message each, as sent
    # the options as the analyser records them for the statement
    node = json.loads(parse_sql_json(sql))["stmts"][0]["stmt"]["CopyStmt"]
    reader = reader_for(copy_options(node), binary=False)
    assert reader is not None
    rows = [fields for m in messages for fields in reader.rows(m)]
    want = [[str(i).encode(), None if v is None else v.encode()] for i, v in enumerate(TRICKY)]
    if "csv" in options.lower() and "NULL 'NULL'" not in options:
        # CSV writes NULL and '' alike unless NULL is given: both read back as ''.
        want = [[i, v if v is not None else b""] for i, v in want]
    assert rows == want


def test_a_row_split_across_messages_is_carried_over() -> None:
    reader = reader_for((), binary=False)
    assert reader is not None
    got = [*reader.rows(b"1\ta\n2\tb"), *reader.rows(b"c\n3\t\\N\n")]
    assert got == [[b"1", b"a"], [b"2", b"bc"], [b"3", None]]


def test_binary_tuples_come_back_as_postgresql_wrote_them(pg: Cluster, table: str) -> None:
    sql = f"COPY (SELECT id, v FROM {table} ORDER BY id) TO STDOUT (FORMAT binary)"
    with psycopg.connect(pg.dsn(database="postgres")) as conn:
        with conn.cursor().copy(sql) as copy:
            stream = b"".join(bytes(m) for m in copy)
    reader = reader_for((("format", "binary"),), binary=True)
    # cut anywhere: a tuple (or the header) left incomplete is carried over
    rows = [fields for i in range(0, len(stream), 7) for fields in reader.rows(stream[i : i + 7])]
    got = [(int.from_bytes(i or b"", "big"), v) for i, v in rows]
    assert got == [(i, None if v is None else v.encode()) for i, v in enumerate(TRICKY)]


def test_binary_output_without_its_signature_ends_the_session() -> None:
    with pytest.raises(ProtocolError):
        reader_for((), binary=True).rows(b"NOTPGCOPY" + bytes(20))
