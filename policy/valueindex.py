"""Value matching: which records a piece of text reaching a client names, whatever SQL made it.

A record key in each result row is what the ledger and the windows count, but SQL can send
a customer without its key: ``json_agg(c)``, ``string_agg(email, ',')``, an XML document,
a row read back from a temporary table, an error message quoting a value.  So pgwarden
also keeps an index of the labelled values of the protected tables, each mapped to the
record (table and primary key) that holds it, and looks for them in every text that leaves
for a watched client.

**Tokens.**  A value and a scanned text are cut into the same tokens: runs of bytes that are
not white space, control bytes or the punctuation that packings put between values (quotes,
commas, brackets, braces, parentheses, ``;:|=<>\\``).  Letters are lower-cased (ASCII).  An
indexed entry is a value's tokens joined by one space (``"O'Brien, Ann"`` -> ``o brien ann``),
and also each part of it between packing punctuation (the leaves of a JSON document, the
fields of a composite, the elements of an array).  The scanner hashes every run of 1 to
``max_tokens`` tokens of the text, so a value is found however it was packed (JSON, XML,
CSV, arrays, delimited strings, composite text), as long as its own characters are intact.

**What names a record.**  An entry is kept only if it names one record of its table: a
value several records share (a first name, a JSON key such as ``"email"``) identifies
nobody and is dropped, as are entries shorter than ``MIN_BYTES``.  The same value in two
tables (a customer and the row of its inheritance parent) names one record in each.

**Hashing and memory.**  Entries are 64-bit keyed hashes: Python's ``hash()`` of bytes is
SipHash under a key drawn at random when the process starts (``PYTHONHASHSEED`` unset), so
the index holds no value and cannot be tested against guesses from outside the process; it
is never written anywhere.  They live in one sorted ``array('Q')`` beside an
``array('I')`` of record numbers (12 bytes an entry), a bitmap of the hashes of entries'
first tokens (8 MB) that turns most tokens away with one lookup, and the records' keys
packed in one ``bytearray``: 1,000,000 customers with three labelled columns take about 50 MB.
Rows added or changed since the last build are merged in by :meth:`ValueIndex.add` (see
``proxy.valueload``), into a small overlay.
"""

from __future__ import annotations

import array
import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# The bytes between tokens: control bytes, space, and the punctuation packings put between
# values.  Everything else (letters, digits, '@', '.', '-', '+', '_', '/', non-ASCII) is
# part of a token.
_TOKEN = re.compile(rb"[^\x00-\x20\"'`,;:|{}()\[\]<>\\=]+")
# The parts of a structured value (JSON leaves, composite fields, array elements).
_PART = re.compile(rb"[^\x00-\x1f\"`,;|{}()\[\]<>\\=]+")
_PACKING = re.compile(rb"[\x00-\x1f\"`,;|{}()\[\]<>\\=]")
MIN_BYTES = 5  # an entry shorter than this names nobody for certain (and would match noise)
MAX_TOKENS = 6  # longer values are indexed by their parts only
# Two bitmaps of 4 MB: the hashes of entries' first tokens (most tokens of a text are turned
# away by one lookup there) and of whole entries (most runs of tokens that start like one
# are not one); with 3M entries about 1 in 11 false hashes passes each.
_BITMAP_BITS = 1 << 25
_MASK64 = (1 << 64) - 1
_REC_BITS = 32


def _h(token: bytes) -> int:
    return hash(token) & _MASK64


def tokens(text: bytes) -> list[bytes]:
    """The tokens of a text, as the index and the scanner cut it (lower-cased)."""
    return list(_TOKEN.findall(text.lower()))


def entries(value: bytes) -> list[tuple[bytes, bytes, int]]:
    """What an indexed value is found by: for the whole value, and for each part of it
    between packing punctuation when there are several, the tokens joined by a space, the
    first token and the number of tokens (distinct, in order)."""
    low = value.lower()
    whole = _TOKEN.findall(low)
    out: list[tuple[bytes, bytes, int]] = []
    if whole and len(whole) <= MAX_TOKENS:
        joined = b" ".join(whole)
        if len(joined) >= MIN_BYTES:
            out.append((joined, whole[0], len(whole)))
    if _PACKING.search(low) is None:
        return out  # one part: the whole value (most values)
    for part in _PART.findall(low):
        toks = _TOKEN.findall(part)
        if toks and len(toks) <= MAX_TOKENS:
            joined = b" ".join(toks)
            if len(joined) >= MIN_BYTES and all(joined != e[0] for e in out):
                out.append((joined, toks[0], len(toks)))
    return out


@dataclass
class IndexStats:
    tables: dict[str, int] = field(default_factory=dict)  # table -> rows read
    entries: int = 0
    dropped_shared: int = 0  # entries several records of one table share
    records: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "tables": dict(self.tables),
            "entries": self.entries,
            "dropped_shared": self.dropped_shared,
            "records": self.records,
        }


class IndexBuilder:
    """Collects the labelled values of the protected tables, row by row, then freezes them
    into a :class:`ValueIndex`."""

    def __init__(self) -> None:
        self.tables: list[str] = []
        self._table_ids: dict[str, int] = {}
        self._rec_table = array.array("H")
        self._key_off = array.array("I", [0])
        self._keys = bytearray()
        self._packed: list[int] = []  # hash << 32 | record number
        self._starts = bytearray(_BITMAP_BITS >> 3)
        self._whole = bytearray(_BITMAP_BITS >> 3)
        self._max_tokens = 1
        self._rows: list[int] = []  # rows read, by table id
        self.stats = IndexStats()

    @property
    def pending(self) -> int:
        """Entries collected so far (before shared ones are dropped)."""
        return len(self._packed)

    def table(self, name: str) -> int:
        tid = self._table_ids.get(name)
        if tid is None:
            tid = self._table_ids[name] = len(self.tables)
            self.tables.append(name)
            self._rows.append(0)
        return tid

    def add_row(self, table_id: int, key: bytes, values: Iterable[bytes | None]) -> None:
        rec = len(self._rec_table)
        seen: list[bytes] = []
        packed = self._packed
        starts, whole = self._starts, self._whole
        smask = len(starts) - 1
        for value in values:
            if not value:
                continue
            for joined, first, ntok in entries(value):
                if joined in seen:
                    continue
                seen.append(joined)
                h = hash(joined) & _MASK64
                f = hash(first) & _MASK64
                starts[(f >> 3) & smask] |= 1 << (f & 7)
                whole[(h >> 3) & smask] |= 1 << (h & 7)
                packed.append(h << _REC_BITS | rec)
                if ntok > self._max_tokens:
                    self._max_tokens = ntok
        if seen:
            self._rec_table.append(table_id)
            self._keys += key
            self._key_off.append(len(self._keys))
        self._rows[table_id] += 1

    def _key(self, rec: int) -> bytes:
        return bytes(self._keys[self._key_off[rec] : self._key_off[rec + 1]])

    def build(self) -> ValueIndex:
        packed, self._packed = self._packed, []
        packed.sort()
        hashes = array.array("Q")
        recs = array.array("I")
        rec_table = self._rec_table
        mask = (1 << _REC_BITS) - 1
        i, n = 0, len(packed)
        dropped = 0
        while i < n:
            h = packed[i] >> _REC_BITS
            j = i + 1
            while j < n and packed[j] >> _REC_BITS == h:
                j += 1
            # One record per table for this hash, or the entry names nobody in that table.
            by_table: dict[int, int | None] = {}
            for k in range(i, j):
                rec = packed[k] & mask
                tid = rec_table[rec]
                prev = by_table.get(tid, -1)
                if prev == -1:
                    by_table[tid] = rec
                elif prev is not None and prev != rec and self._key(prev) != self._key(rec):
                    by_table[tid] = None  # two records (a record added twice is one)
            for rec_or_none in by_table.values():
                if rec_or_none is None:
                    dropped += 1
                else:
                    hashes.append(h)
                    recs.append(rec_or_none)
            i = j
        self.stats.tables = dict(zip(self.tables, self._rows, strict=True))
        self.stats.entries = len(hashes)
        self.stats.dropped_shared = dropped
        self.stats.records = len(rec_table)
        return ValueIndex(
            tables=tuple(self.tables),
            hashes=hashes,
            recs=recs,
            rec_table=rec_table,
            key_off=self._key_off,
            keys=bytes(self._keys),
            starts=self._starts,
            whole=self._whole,
            max_tokens=self._max_tokens,
            stats=self.stats,
        )


class ValueIndex:
    """The frozen index, and the scanner over it.  Not thread-safe; one per database."""

    def __init__(
        self,
        *,
        tables: Sequence[str],
        hashes: array.array[int],
        recs: array.array[int],
        rec_table: array.array[int],
        key_off: array.array[int],
        keys: bytes,
        starts: bytearray,
        whole: bytearray,
        max_tokens: int,
        stats: IndexStats,
    ) -> None:
        self.tables = list(tables)
        self._hashes = hashes
        self._recs = recs
        self._rec_table = rec_table
        self._key_off = key_off
        self._keys = keys
        self._starts = starts
        self._whole = whole
        self._smask = len(starts) - 1
        self.max_tokens = max_tokens
        self.stats = stats
        # Rows added or changed since the build: hash -> [(table id, key)], and the
        # (hash, table id) pairs found shared by then.
        self._extra: dict[int, list[tuple[int, bytes]]] = {}
        self._shared: set[tuple[int, int]] = set()

    @property
    def nbytes(self) -> int:
        """Memory held by the index's arrays (the overlay counted roughly)."""
        return (
            self._hashes.itemsize * len(self._hashes)
            + self._recs.itemsize * len(self._recs)
            + self._rec_table.itemsize * len(self._rec_table)
            + self._key_off.itemsize * len(self._key_off)
            + len(self._keys)
            + len(self._starts)
            + len(self._whole)
            + 120 * len(self._extra)
        )

    def _key(self, rec: int) -> bytes:
        return self._keys[self._key_off[rec] : self._key_off[rec + 1]]

    def lookup(self, h: int) -> list[tuple[int, bytes]]:
        """The records (table id, key) the entry with hash ``h`` names."""
        out: list[tuple[int, bytes]] = []
        hashes = self._hashes
        i = bisect.bisect_left(hashes, h)
        while i < len(hashes) and hashes[i] == h:
            rec = self._recs[i]
            tid = self._rec_table[rec]
            if (h, tid) not in self._shared:
                out.append((tid, self._key(rec)))
            i += 1
        extra = self._extra.get(h)
        if extra:
            for tid, key in extra:
                if (h, tid) not in self._shared and (tid, key) not in out:
                    out.append((tid, key))
        return out

    def add(self, table: str, key: bytes, values: Iterable[bytes | None]) -> None:
        """A row added or changed since the build (incremental refresh).  A value it shares
        with another record of its table stops naming either."""
        try:
            tid = self.tables.index(table)
        except ValueError:
            tid = len(self.tables)
            self.tables.append(table)
        seen: set[int] = set()
        for value in values:
            if not value:
                continue
            for joined, first_token, ntok in entries(value):
                h = _h(joined)
                if h in seen:
                    continue
                seen.add(h)
                others = [k for t, k in self.lookup(h) if t == tid]
                if others and others != [key]:
                    self._shared.add((h, tid))
                    continue
                if others:
                    continue  # already known for this record
                first = _h(first_token)
                self._starts[(first >> 3) & self._smask] |= 1 << (first & 7)
                self._whole[(h >> 3) & self._smask] |= 1 << (h & 7)
                self._extra.setdefault(h, []).append((tid, key))
                self.max_tokens = max(self.max_tokens, ntok)

    def scan(self, text: bytes, found: dict[str, set[bytes]]) -> None:
        """Add to ``found`` (table -> keys) every record a labelled value in ``text`` names."""
        if len(text) < MIN_BYTES:
            return
        tokens = _TOKEN.findall(text.lower())
        starts = self._starts
        whole = self._whole
        smask = self._smask
        maxn = self.max_tokens
        ntok = len(tokens)
        for i, tok in enumerate(tokens):
            h = hash(tok) & _MASK64
            if not starts[(h >> 3) & smask] >> (h & 7) & 1:
                continue
            if whole[(h >> 3) & smask] >> (h & 7) & 1:
                self._found(h, found)
            for n in range(2, min(maxn, ntok - i) + 1):
                h = hash(b" ".join(tokens[i : i + n])) & _MASK64
                if whole[(h >> 3) & smask] >> (h & 7) & 1:
                    self._found(h, found)

    def _found(self, h: int, found: dict[str, set[bytes]]) -> None:
        for tid, key in self.lookup(h):
            found.setdefault(self.tables[tid], set()).add(key)

    def scan_values(self, values: Iterable[bytes | None], found: dict[str, set[bytes]]) -> None:
        """:meth:`scan` over a row's fields, as one text (fields apart, as a packing's
        values are)."""
        text = b"\x00".join(v for v in values if v is not None and len(v) >= MIN_BYTES)
        if text:
            self.scan(text, found)
