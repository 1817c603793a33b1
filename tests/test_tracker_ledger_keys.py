"""The tracker hands the ledger exactly the keys of the rows the client received, however
the server's bytes are cut into chunks (the bulk of a big result takes a fast path that
reads only each row's key; a row cut in two, a NULL key or a malformed row leaves it), and
for COPY ... TO STDOUT in text and CSV format too, where a planted canary is also seen."""

from __future__ import annotations

import random
import struct

import pytest

from proxy import commands as cmd
from proxy.messages.backend import CommandComplete, CopyOutResponse, DataRow, ReadyForQuery
from proxy.messages.errors import ProtocolError
from proxy.messages.frontend import CopyData, CopyDone, Query
from proxy.sandbox.cluster import Cluster
from proxy.tracker import Tracker
from tests.trackerutil import audited_tracker, customers_head

SQL = "SELECT customer_id, full_name, email FROM customers"


def _tracker(
    pg: Cluster, policy: dict[str, object] | None = None, order: list[int] | None = None
) -> tuple[Tracker, bytes]:
    tracker, oid = audited_tracker(pg, policy)
    return tracker, customers_head(oid, order or (0, 1, 2))


def _run(
    tracker: Tracker, stream: bytes, cuts: list[int], sql: str = SQL
) -> tuple[bytes, list[cmd.Command]]:
    tracker.client_data(Query(sql).encode())
    sent, done = b"", []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        for c in tracker.server_data(stream[a:b]):
            if isinstance(c, cmd.SendToClient):
                sent += c.data
            else:
                done.append(c)
    return sent, done


@pytest.mark.parametrize("key_column", [0, 2])
def test_keys_and_counts_survive_any_chunking(
    pg: Cluster, enforce_db: str, key_column: int
) -> None:
    rng = random.Random(5)
    order = [1, 2, 0] if key_column == 2 else [0, 1, 2]  # columns as SQL and head name them
    names = ["customer_id", "full_name", "email"]
    sql = f"SELECT {', '.join(names[c] for c in order)} FROM customers"

    def row(values: tuple[bytes | None, ...]) -> bytes:
        return DataRow(tuple(values[c] for c in order)).encode()

    rows = [
        row((str(i).encode(), b"Name %d" % i, b"c%d@mail.example" % i * rng.randint(1, 40)))
        for i in range(1, 3001)
    ]
    rows[1500] = row((None, b"no key", b"x@y"))  # a NULL key: no ledger entry, still a row
    rows[1600] = row((b"1601", None, None))  # NULLs before the key are skipped over
    tail = CommandComplete("SELECT 3000").encode() + ReadyForQuery("I").encode()
    for trial in range(8):
        tracker, head = _tracker(pg, order=order)
        stream = head + b"".join(rows) + tail
        size = rng.choice([1, 7, 11, 12, 100, 4096, 65536])
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, len(stream) // size)))
        sent, done = _run(tracker, stream, cuts, sql)
        assert sent == stream, trial  # forwarded unchanged
        (finished,) = [c for c in done if isinstance(c, cmd.StatementDone)]
        assert finished.rows == 3000
        want = [str(i).encode() for i in range(1, 3001) if i != 1501]
        assert list(finished.records.values()) == [want], trial


def test_a_malformed_row_in_the_bulk_ends_the_session(pg: Cluster, enforce_db: str) -> None:
    tracker, head = _tracker(pg)
    good = b"".join(DataRow((str(i).encode(), b"n", b"e")).encode() for i in range(50))
    bad = b"D" + (12).to_bytes(4, "big") + (3).to_bytes(2, "big") + (400).to_bytes(4, "big") + b"12"
    tracker.client_data(Query(SQL).encode())
    tracker.server_data(head + good[:100])
    with pytest.raises(ProtocolError):
        tracker.server_data(good[100:] + bad + good)


def _tuple(key: int, email: bytes | None) -> bytes:
    """One binary COPY tuple: an int4 key and a text email."""
    fields = struct.pack("!hi", 2, 4) + key.to_bytes(4, "big", signed=True)
    return fields + (
        struct.pack("!i", -1) if email is None else struct.pack("!i", len(email)) + email
    )


def _copy_out(lines: list[bytes], binary: bool = False) -> bytes:
    return (
        CopyOutResponse(1 if binary else 0, (1 if binary else 0,) * 2).encode()
        + b"".join(CopyData(line).encode() for line in lines)
        + CopyDone().encode()
        + CommandComplete(f"COPY {len(lines)}").encode()
        + ReadyForQuery("I").encode()
    )


@pytest.mark.parametrize(
    ("sql", "lines", "want"),
    [
        (
            "COPY (SELECT customer_id, email FROM customers) TO STDOUT",
            [b"1\tc1@x\n", b"2\tc\\t2@x\n", b"3\t\\N\n"],
            [b"1", b"2", b"3"],
        ),
        (  # the key in the second column, a header line, another delimiter, quoted fields
            "COPY (SELECT email, customer_id FROM customers) TO STDOUT "
            "WITH (FORMAT csv, HEADER, DELIMITER ';')",
            [b"email;customer_id\n", b'"a;b@x";7\n', b'"line\nbreak@x";8\n', b"c@x;9\n"],
            [b"7", b"8", b"9"],
        ),
        (  # a message that ends inside a row (not what PostgreSQL sends, but legal)
            "COPY (SELECT customer_id, email FROM customers) TO STDOUT",
            [b"10\ta@x\n11\tb", b"@x\n12\tc@x\n"],
            [b"10", b"11", b"12"],
        ),
        (  # binary: types from the catalog; a tuple cut across messages; NULL; the trailer
            "COPY (SELECT customer_id, email FROM customers) TO STDOUT (FORMAT binary)",
            [
                b"PGCOPY\n\xff\r\n\x00" + bytes(8) + _tuple(41, b"a@x") + _tuple(42, b"b")[:7],
                _tuple(42, b"b")[7:] + _tuple(43, None),
                _tuple(-44, b"d@x") + b"\xff\xff",
            ],
            [b"41", b"42", b"43", b"-44"],
        ),
    ],
)
def test_copy_output_keys_reach_the_ledger(
    pg: Cluster, enforce_db: str, sql: str, lines: list[bytes], want: list[bytes]
) -> None:
    tracker, _head = _tracker(pg)
    stream = _copy_out(lines, binary="binary" in sql)
    sent, done = _run(tracker, stream, [7, 20, 33], sql)
    assert sent == stream  # COPY output is never rewritten
    (finished,) = [c for c in done if isinstance(c, cmd.StatementDone)]
    assert finished.records.get("public.customers", []) == want
    assert not [c for c in done if isinstance(c, cmd.Log) and c.event.endswith("unreadable")]


def test_a_canary_in_copy_output_is_seen(pg: Cluster, enforce_db: str) -> None:
    policy = {
        "rules": [
            {"id": "canary", "subjects": ["*"], "action": "quarantine",
             "canary": {"values": ["canary-1@pgwarden-canary.example"]}},
        ],
    }  # fmt: skip
    tracker, _head = _tracker(pg, policy)
    sql = "COPY (SELECT customer_id, email FROM customers) TO STDOUT"
    lines = [b"332\tc332@x\n", b"333\tcanary-1@pgwarden-canary.example\n"]
    _sent, done = _run(tracker, _copy_out(lines), [], sql)
    assert [c.rule_id for c in done if isinstance(c, cmd.CanaryHit)] == ["canary"]


@pytest.mark.parametrize("fmt", ["text", "csv"])
def test_big_copy_output_keys_survive_any_chunking(pg: Cluster, enforce_db: str, fmt: str) -> None:
    # Past the first chunk a COPY's rows are read a run at a time (one pass for the key
    # column); rows with an escape or a NULL take the row-by-row way within the same run.
    rng = random.Random(11)
    sep = "\t" if fmt == "text" else ","
    lines = [f"{i}{sep}c{i}@x".encode() + b"\n" for i in range(1, 3001)]
    lines[700] = b"\\N\tnull key\n" if fmt == "text" else b",null key\n"  # no key: skipped
    lines[1200] = b"1201\ttab\\there\n" if fmt == "text" else b'1201,"quoted, comma"\n'
    want = [str(i).encode() for i in range(1, 3001) if i != 701]
    if fmt == "csv":
        want.insert(700, b"")  # CSV writes NULL as an empty field: read as the empty text
    sql = "COPY (SELECT customer_id, email FROM customers) TO STDOUT" + (
        " WITH CSV" if fmt == "csv" else ""
    )
    for trial in range(6):
        tracker, _head = _tracker(pg)
        stream = _copy_out(lines)
        size = rng.choice([5, 100, 4096, 65536])
        cuts = sorted(rng.sample(range(1, len(stream)), len(stream) // size))
        sent, done = _run(tracker, stream, cuts, sql)
        assert sent == stream, trial
        (finished,) = [c for c in done if isinstance(c, cmd.StatementDone)]
        assert finished.rows == 3000
        assert finished.records["public.customers"] == want, (trial, size)


def test_binary_copy_rows_count_against_a_statement_limit(pg: Cluster, enforce_db: str) -> None:
    # Binary COPY data has no newlines to count: its tuples must still count, or a row
    # limit could be walked past in binary format.
    policy = {
        "rules": [
            {"id": "ten-rows", "subjects": ["*"], "labels": ["pii.*"], "max_rows": 10,
             "action": "block"},
        ],
    }  # fmt: skip
    tracker, _head = _tracker(pg, policy)
    sql = "COPY (SELECT customer_id, email FROM customers) TO STDOUT (FORMAT binary)"
    header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    lines = [header + _tuple(100, b"a@x"), *(_tuple(i, b"a@x") for i in range(101, 150))]
    lines.append(b"\xff\xff")
    assert not any(b"\n" in line for line in lines[1:])
    for cuts in ([], [200], [40, 41, 300]):
        tracker, _head = _tracker(pg, policy)
        sent, done = _run(tracker, _copy_out(lines, binary=True), cuts, sql)
        blocks = [c for c in done if isinstance(c, cmd.PolicyBlock)]
        assert [b.rule_id for b in blocks] == ["ten-rows"], cuts
        assert b"more than 10 rows" in sent


def test_a_result_the_catalog_shows_labelled_is_cut_when_judged_again_refused(
    pg: Cluster, enforce_db: str
) -> None:
    # The analysis sees no labelled column (here: the statement text says nothing of
    # customers), the RowDescription says customers.email: judged again with that label,
    # the unbounded read is refused. It is running already, so its first row is withheld and
    # the client gets the refusal; before, the session ended with an internal error.
    policy = {
        "subjects": {"limited": {"users": ["postgres"]}},
        "rules": [
            {"id": "shapes", "subjects": ["limited"], "deny": ["unbounded_scan"]},
        ],
    }
    tracker, head = _tracker(pg, policy)
    rows = DataRow((b"1", b"Name 1", b"secret@mail.example")).encode()
    tail = CommandComplete("SELECT 1").encode() + ReadyForQuery("I").encode()
    sent, done = _run(tracker, head + rows + tail, [], sql="SELECT 1 AS a, 2 AS b, 3 AS c")
    assert b"secret@mail.example" not in sent
    errors = [m for m in _messages(sent) if m[0] == "E"]
    assert len(errors) == 1 and b"42501" in errors[0][1] and b"shapes" in errors[0][1]
    assert any(isinstance(c, cmd.Log) and c.event == "analysis_miss" for c in done)


def _messages(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("!i", data, pos + 1)
        out.append((chr(data[pos]), data[pos + 5 : pos + 1 + n]))
        pos += 1 + n
    return out
