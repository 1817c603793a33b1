"""A labelled result reaches its client only as the audit trail allows: its CommandComplete
waits until the event is durable, and the rows that came with it wait too, so a client is
handed the whole result in one piece once it is recorded (and, if it cannot be recorded,
an error in place of the CommandComplete)."""

from __future__ import annotations

from proxy import commands as cmd
from proxy.messages.backend import CommandComplete, DataRow, ErrorResponse, ReadyForQuery
from proxy.messages.frontend import Query
from proxy.sandbox.cluster import Cluster
from proxy.tracker import Tracker
from tests.trackerutil import audited_tracker, customers_head

SQL = "SELECT customer_id, full_name, email FROM customers"

TAIL = CommandComplete("SELECT 3").encode() + ReadyForQuery("I").encode()


def _rows(first: int, n: int) -> bytes:
    return b"".join(
        DataRow((str(i).encode(), b"Name %d" % i, b"c%d@mail.example" % i)).encode()
        for i in range(first, first + n)
    )


def _split(commands: list[cmd.Command]) -> tuple[bytes, list[cmd.Command]]:
    sent = b"".join(c.data for c in commands if isinstance(c, cmd.SendToClient))
    return sent, [c for c in commands if not isinstance(c, cmd.SendToClient)]


def _held(pg: Cluster, sql: str = SQL) -> tuple[Tracker, bytes]:
    """A tracker of a session whose labelled results wait for the audit trail, after the
    client sent ``sql``; and the RowDescription of ``SQL``'s result."""
    tracker, oid = audited_tracker(pg, durable=True)
    tracker.client_data(Query(sql).encode())
    return tracker, customers_head(oid)


def test_rows_wait_with_their_command_complete_until_the_event_is_durable(
    pg: Cluster, enforce_db: str
) -> None:
    tracker, head = _held(pg)
    stream = head + _rows(1, 3) + TAIL
    sent, other = _split(tracker.server_data(stream))
    assert sent == b""  # nothing of the labelled result before the audit trail has it
    assert [type(c) for c in other] == [cmd.AwaitDurable]
    assert other[0].done.rows == 3  # type: ignore[attr-defined]
    sent, _ = _split(tracker.durable_result(True))
    assert sent == stream  # all of it, in order, in one write


def test_a_long_result_streams_and_only_its_last_chunk_waits(pg: Cluster, enforce_db: str) -> None:
    tracker, head = _held(pg)
    first, last = head + _rows(1, 200), _rows(201, 2) + TAIL
    sent, other = _split(tracker.server_data(first))
    assert sent == first and not other  # rows stream as they come
    sent, other = _split(tracker.server_data(last))
    assert sent == b"" and [type(c) for c in other] == [cmd.AwaitDurable]
    sent, _ = _split(tracker.durable_result(True))
    assert sent == last


def test_two_labelled_results_of_one_query_are_each_held(pg: Cluster, enforce_db: str) -> None:
    tracker, head = _held(pg, f"{SQL} WHERE customer_id < 4; {SQL} WHERE customer_id > 9")
    one = head + _rows(1, 3) + CommandComplete("SELECT 3").encode()
    two = head + _rows(10, 3) + TAIL
    sent, other = _split(tracker.server_data(one + two))
    assert sent == b"" and [type(c) for c in other] == [cmd.AwaitDurable]
    sent, other = _split(tracker.durable_result(True))
    assert sent == b"" and [type(c) for c in other] == [cmd.AwaitDurable]  # the second one
    sent, _ = _split(tracker.durable_result(True))
    assert sent == one + two


def test_a_result_the_trail_cannot_record_ends_in_an_error(pg: Cluster, enforce_db: str) -> None:
    tracker, head = _held(pg)
    rows = head + _rows(1, 3)
    tracker.server_data(rows + TAIL)
    sent, other = _split(tracker.durable_result(False))
    # Its event was already submitted (and awaited): the statement is not recorded twice.
    assert not [c for c in other if isinstance(c, cmd.StatementDone)], other
    assert sent.startswith(rows) and CommandComplete("SELECT 3").encode() not in sent
    assert sent[len(rows)] == ord("E")
    err = ErrorResponse.decode(sent[len(rows) + 5 : -len(ReadyForQuery("I").encode())])
    assert err.sqlstate == "58030" and "cannot be recorded in the audit trail" in err.message
    assert sent.endswith(ReadyForQuery("I").encode())
