"""FrameReader reassembly: frames split at any byte come out whole, in order, unchanged."""

from __future__ import annotations

import random

import pytest

from proxy.codec import FrameReader, FrameScanner
from proxy.messages.backend import DataRow, ErrorResponse, ReadyForQuery
from proxy.messages.errors import ProtocolError
from proxy.messages.frontend import Bind, Query, Sync


def test_frames_split_anywhere_are_reassembled() -> None:
    rng = random.Random(7)
    msgs = [
        Query("select 1").encode(),
        Bind("", "", (1,), (rng.randbytes(3_000_000),), (1,)).encode(),
        Sync().encode(),
        Query("x" * 70_000).encode(),
        Sync().encode(),
    ]
    stream = b"".join(msgs)
    for _ in range(20):
        reader = FrameReader(from_client=True)
        raw_all, whole, pos = b"", [], 0
        while pos < len(stream):
            n = rng.choice([1, 2, 4, 5, 6, 1000, 65536, 262144])
            raw, frames = reader.feed(stream[pos : pos + n])
            pos += n
            raw_all += raw
            whole += [raw[start - 5 : end] for _t, start, end in frames]
        assert whole == msgs
        assert raw_all == stream
        assert reader.buffered == 0


def test_scanner_limit_applies_to_the_bodies_it_keeps() -> None:
    big_row = DataRow((b"x" * 100_000,)).encode()
    rfq = ReadyForQuery("I").encode()
    scanner = FrameScanner(frozenset({ord("Z"), ord("E")}), max_message=65536)
    stream = big_row + rfq
    seen = []
    for i in range(0, len(stream), 4096):
        seen += scanner.scan(stream[i : i + 4096])
    assert [(chr(t), body) for t, _end, body in seen] == [("D", None), ("Z", b"I")]
    big_error = ErrorResponse.make("XX000", "e" * 100_000).encode()
    with pytest.raises(ProtocolError, match="over the limit"):
        FrameScanner(frozenset({ord("E")}), max_message=65536).scan(big_error)
