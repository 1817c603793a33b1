"""The codec with plain bytes: message tables, round trips, framing under any chunking."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.codec import FrameReader, FrameScanner, StartupReader
from proxy.messages.backend import (
    Authentication,
    BackendKeyData,
    BindComplete,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    Field,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ParseComplete,
    PortalSuspended,
    ReadyForQuery,
    RowDescription,
)
from proxy.messages.decode import decode_backend, decode_frontend
from proxy.messages.errors import ClientProtocolError, ProtocolError, ServerProtocolError
from proxy.messages.frontend import (
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    FunctionCall,
    Parse,
    PasswordMessage,
    Query,
    Sync,
    Terminate,
)
from proxy.messages.heads import bind_head, execute_head, parse_head, result_format, target_head
from proxy.messages.startup import (
    PROTOCOL_3_0,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
)
from proxy.messages.wire import Message

# (message, its bytes on the wire), written out from the protocol documentation.
WIRE_TABLE: list[tuple[object, bytes]] = [
    (Query("select 1"), b"Q\x00\x00\x00\x0dselect 1\x00"),
    (Sync(), b"S\x00\x00\x00\x04"),
    (Flush(), b"H\x00\x00\x00\x04"),
    (Terminate(), b"X\x00\x00\x00\x04"),
    (Execute("", 0), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
    (Describe("S", "s1"), b"D\x00\x00\x00\x08Ss1\x00"),
    (Close("P", ""), b"C\x00\x00\x00\x06P\x00"),
    (
        Parse("", "select $1", (23,)),
        b"P\x00\x00\x00\x15\x00select $1\x00\x00\x01\x00\x00\x00\x17",
    ),
    (ReadyForQuery("I"), b"Z\x00\x00\x00\x05I"),
    (CommandComplete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00"),
    (DataRow((b"42", None)), b"D\x00\x00\x00\x10\x00\x02\x00\x00\x00\x0242\xff\xff\xff\xff"),
    (Authentication(0), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (Authentication(5, b"salt"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"),
    (
        BackendKeyData(1234, b"\x00\x00\x00\x07"),
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x00\x00\x00\x07",
    ),
    (ParameterStatus("a", "b"), b"S\x00\x00\x00\x08a\x00b\x00"),
    (EmptyQueryResponse(), b"I\x00\x00\x00\x04"),
    (NoData(), b"n\x00\x00\x00\x04"),
    (PortalSuspended(), b"s\x00\x00\x00\x04"),
    (CopyDone(), b"c\x00\x00\x00\x04"),
    (CopyData(b"1\t2\n"), b"d\x00\x00\x00\x081\t2\n"),
    (SSLRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (GSSENCRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
    (CancelRequest(7, b"abcd"), b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x07abcd"),
    (
        StartupMessage(PROTOCOL_3_0, (("user", "u"),)),
        b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00",
    ),
]


@pytest.mark.parametrize(("message", "wire"), WIRE_TABLE, ids=lambda x: type(x).__name__)
def test_encoding_matches_the_protocol_documentation(message: Message, wire: bytes) -> None:
    assert message.encode() == wire


# --- round trips for every message type -------------------------------------------------

text = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40
)
i16 = st.integers(-(2**15), 2**15 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
value = st.one_of(st.none(), st.binary(max_size=40))
secret = st.binary(min_size=4, max_size=256)

FRONTEND_STRATEGIES = [
    st.builds(Query, text),
    st.builds(Parse, text, text, st.tuples(u32, u32)),
    st.builds(
        Bind,
        text,
        text,
        st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple),
        st.lists(value, max_size=4).map(tuple),
        st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple),
    ),
    st.builds(Describe, st.sampled_from("SP"), text),
    st.builds(Execute, text, i32),
    st.builds(Close, st.sampled_from("SP"), text),
    st.just(Sync()),
    st.just(Flush()),
    st.just(Terminate()),
    st.builds(CopyData, st.binary(max_size=60)),
    st.just(CopyDone()),
    st.builds(CopyFail, text),
    st.builds(
        FunctionCall,
        u32,
        st.just((0,)),
        st.lists(value, max_size=3).map(tuple),
        st.sampled_from([0, 1]),
    ),
    st.builds(PasswordMessage, st.binary(max_size=40)),
]

BACKEND_STRATEGIES = [
    st.builds(Authentication, st.sampled_from([0, 3])),
    st.builds(Authentication, st.just(5), st.binary(min_size=4, max_size=4)),
    st.builds(Authentication, st.sampled_from([11, 12]), st.binary(max_size=40)),
    st.builds(
        Authentication.sasl,
        st.lists(st.sampled_from(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]), min_size=1).map(tuple),
    ),
    st.builds(BackendKeyData, i32, secret),
    st.builds(ParameterStatus, text, text),
    st.builds(ReadyForQuery, st.sampled_from("ITE")),
    st.builds(
        RowDescription,
        st.lists(
            st.builds(Field, text, u32, i16, u32, i16, i32, st.sampled_from([0, 1])), max_size=4
        ).map(tuple),
    ),
    st.builds(DataRow, st.lists(value, max_size=5).map(tuple)),
    st.builds(CommandComplete, text),
    st.just(EmptyQueryResponse()),
    st.builds(
        ErrorResponse,
        st.lists(st.tuples(st.sampled_from("SVCMDHPW"), text), max_size=5).map(tuple),
    ),
    st.builds(
        NoticeResponse, st.lists(st.tuples(st.sampled_from("SVCM"), text), max_size=4).map(tuple)
    ),
    st.builds(NotificationResponse, i32, text, text),
    st.just(ParseComplete()),
    st.just(BindComplete()),
    st.just(CloseComplete()),
    st.just(NoData()),
    st.just(PortalSuspended()),
    st.builds(ParameterDescription, st.lists(u32, max_size=4).map(tuple)),
    st.builds(
        CopyInResponse,
        st.sampled_from([0, 1]),
        st.lists(st.sampled_from([0, 1]), max_size=4).map(tuple),
    ),
    st.builds(
        CopyOutResponse,
        st.sampled_from([0, 1]),
        st.lists(st.sampled_from([0, 1]), max_size=4).map(tuple),
    ),
    st.builds(
        CopyBothResponse,
        st.sampled_from([0, 1]),
        st.lists(st.sampled_from([0, 1]), max_size=4).map(tuple),
    ),
    st.builds(CopyData, st.binary(max_size=60)),
    st.just(CopyDone()),
    st.builds(FunctionCallResponse, value),
    st.builds(NegotiateProtocolVersion, i32, st.lists(text, max_size=3).map(tuple)),
]


def _split(wire: bytes) -> tuple[int, bytes]:
    (length,) = struct.unpack_from("!I", wire, 1)
    assert length == len(wire) - 1
    return wire[0], wire[5:]


@settings(max_examples=300)
@given(st.one_of(FRONTEND_STRATEGIES))
def test_frontend_messages_round_trip(msg: Message) -> None:
    t, body = _split(msg.encode())
    assert decode_frontend(t, body) == msg


@settings(max_examples=300)
@given(st.one_of(BACKEND_STRATEGIES))
def test_backend_messages_round_trip(msg: Message) -> None:
    t, body = _split(msg.encode())
    assert decode_backend(t, body) == msg


@given(
    st.builds(
        StartupMessage,
        st.just(PROTOCOL_3_0),
        st.lists(st.tuples(text.filter(bool), text), max_size=5).map(tuple),
    )
)
def test_startup_messages_round_trip(msg: StartupMessage) -> None:
    wire = msg.encode()
    reader = StartupReader()
    reader.feed(wire)
    body = reader.next_packet()
    assert body is not None
    assert decode_startup(body) == msg


@given(st.builds(CancelRequest, i32, secret))
def test_cancel_requests_round_trip_with_long_keys_of_protocol_3_2(msg: CancelRequest) -> None:
    assert decode_startup(msg.encode()[4:]) == msg


@settings(max_examples=500)
@given(st.integers(0, 255), st.binary(max_size=64))
def test_any_body_decodes_or_raises_protocol_error(type_code: int, body: bytes) -> None:
    for decode in (decode_frontend, decode_backend):
        with contextlib.suppress(ProtocolError):
            decode(type_code, body)


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_any_startup_body_decodes_or_raises_protocol_error(body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_startup(body)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.integers(1, 50), max_size=10))
def test_readers_never_raise_anything_but_protocol_error(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader(1000, from_client=True)
    scanner = FrameScanner({ord("Q")}, 1000)
    pos = 0
    try:
        for n in [*cuts, len(data)]:
            reader.feed(data[pos : pos + n])
            scanner.scan(data[pos : pos + n])
            pos += n
    except ProtocolError:
        pass


# --- framing under arbitrary chunking ------------------------------------------------------

stream_messages = st.lists(st.one_of(BACKEND_STRATEGIES), min_size=1, max_size=12)


@settings(max_examples=300)
@given(stream_messages, st.lists(st.integers(1, 40), max_size=30))
def test_scanner_and_reader_see_the_same_frames_however_the_stream_is_cut(
    msgs: list[Message], cuts: list[int]
) -> None:
    wire = b"".join(x.encode() for x in msgs)
    chunks, pos = [], 0
    for n in cuts:
        if pos >= len(wire):
            break
        chunks.append(wire[pos : pos + n])
        pos += n
    if pos < len(wire):
        chunks.append(wire[pos:])

    wanted = {ord("Z"), ord("D"), ord("S")}
    scanner = FrameScanner(wanted)
    quiet = FrameScanner(wanted, report_all=False)
    reader = FrameReader(from_client=False)
    typer = FrameReader(from_client=False)
    scanned, only_wanted, read, types, forwarded, forwarded2 = [], [], [], bytearray(), b"", b""
    for chunk in chunks:
        for t, end, body in scanner.scan(chunk):
            assert 0 < end <= len(chunk)
            scanned.append((t, body))
        only_wanted += [(t, body) for t, _end, body in quiet.scan(chunk)]
        raw, frames = reader.feed(chunk)
        forwarded += raw
        read += [(t, raw[s:e]) for t, s, e in frames]
        raw2, got_types = typer.feed_types(chunk)
        forwarded2 += raw2
        types += got_types
    assert scanner.at_boundary and quiet.at_boundary
    assert forwarded == forwarded2 == wire  # every byte handed on, in order, nothing twice
    expected = [_split(x.encode()) for x in msgs]
    assert read == expected
    assert bytes(types) == bytes(t for t, _ in expected)
    assert scanned == [(t, body if t in wanted else None) for t, body in expected]
    assert only_wanted == [(t, body) for t, body in expected if t in wanted]


rows_and_more = st.lists(
    st.one_of(
        st.builds(DataRow, st.lists(value, max_size=3).map(tuple)),
        st.builds(CopyData, st.binary(max_size=12)),
        *BACKEND_STRATEGIES,
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=300)
@given(rows_and_more, st.lists(st.integers(1, 40), max_size=30))
def test_runs_of_rows_hold_exactly_the_frames_the_reader_sees(
    msgs: list[Message], cuts: list[int]
) -> None:
    wire = b"".join(x.encode() for x in msgs)
    runner = FrameReader(from_client=False)
    forwarded, frames, pos = b"", [], 0
    for n in [*cuts, len(wire)]:
        raw, runs = runner.feed_runs(wire[pos : pos + n])
        pos += n
        forwarded += raw
        for t, start, end, count in runs:
            # Walk the run message by message: each is whole and of the run's type.
            at, seen = start - 5, 0
            while at < end:
                assert raw[at] == t
                length = int.from_bytes(raw[at + 1 : at + 5], "big")
                frames.append((t, raw[at + 5 : at + 1 + length]))
                at += 1 + length
                seen += 1
            assert at == end and seen == count
            assert count == 1 or t in (ord("D"), ord("d"))
    assert forwarded == wire
    assert frames == [_split(x.encode()) for x in msgs]


def test_scanner_reports_message_ends_inside_the_chunk() -> None:
    wire = DataRow((b"a",)).encode() + CommandComplete("SELECT 1").encode()
    ends = [end for _, end, _ in FrameScanner(set()).scan(wire)]
    assert ends == [len(DataRow((b"a",)).encode()), len(wire)]


@pytest.mark.parametrize("length", [0, 3, -1])
def test_lengths_below_four_are_refused(length: int) -> None:
    bad = b"Q" + struct.pack("!i", length)
    with pytest.raises(ClientProtocolError, match="invalid length"):
        FrameReader(from_client=True).feed(bad + b"x" * 10)
    with pytest.raises(ServerProtocolError):
        FrameScanner(set()).scan(bad)


def test_oversized_messages_are_refused_from_the_header_alone() -> None:
    header = b"Q" + struct.pack("!I", 10_000_000)
    with pytest.raises(ClientProtocolError, match="over the limit of 65536 bytes"):
        FrameReader(65536, from_client=True).feed(header)
    with pytest.raises(ServerProtocolError, match="over the limit"):
        FrameScanner({ord("Q")}, 65536).scan(header)
    # A body the scanner only skips costs no memory, so it is not limited.
    assert FrameScanner(set(), 65536).scan(header) == []


def test_startup_packet_length_is_checked_before_reading_it() -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!I", 1_000_000))
    with pytest.raises(ClientProtocolError, match="invalid length of startup packet"):
        reader.next_packet()


def test_unknown_protocol_version_is_refused_with_a_reason() -> None:
    with pytest.raises(ClientProtocolError, match=r"unsupported frontend protocol 2\.0"):
        decode_startup(struct.pack("!I", 2 << 16) + b"user\0u\0\0")


def test_error_response_without_sqlstate_decodes() -> None:
    err = decode_backend(ord("E"), b"SERROR\0Mno code here\0\0")
    assert isinstance(err, ErrorResponse)
    assert err.sqlstate is None
    assert err.message == "no code here"


def test_bind_result_formats_follow_the_protocol_rules() -> None:
    assert Bind("", "", result_formats=()).result_format(3) == 0
    assert Bind("", "", result_formats=(1,)).result_format(3) == 1
    assert Bind("", "", result_formats=(0, 1)).result_format(1) == 1


def test_sasl_mechanism_list() -> None:
    auth = Authentication.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert auth.mechanisms == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    assert auth.data == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"


@settings(max_examples=300)
@given(st.one_of(FRONTEND_STRATEGIES))
def test_relay_field_readers_agree_with_full_decoding(msg: Message) -> None:
    _t, body = _split(msg.encode())
    if isinstance(msg, Parse):
        assert parse_head(body) == (msg.name, msg.sql)
    elif isinstance(msg, Bind):
        assert bind_head(body) == (msg.portal, msg.statement, msg.result_formats)
        for i in range(4):
            assert result_format(msg.result_formats, i) == msg.result_format(i)
    elif isinstance(msg, Describe | Close):
        assert target_head(body) == (msg.kind, msg.name)
    elif isinstance(msg, Execute):
        assert execute_head(body) == (msg.portal, msg.max_rows)


@settings(max_examples=500)
@given(st.binary(max_size=64))
def test_relay_field_readers_refuse_garbage_with_protocol_errors(body: bytes) -> None:
    for read in (parse_head, bind_head, target_head, execute_head):
        with contextlib.suppress(ProtocolError):
            read(body)
