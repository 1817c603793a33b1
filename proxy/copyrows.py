"""Reading the fields of ``COPY ... TO STDOUT`` rows, for the ledger and canary keys.

The server sends a COPY's output as CopyData messages, one row each (PostgreSQL's
behaviour; a message that ends inside a row is carried over to the next).  Text format:
fields split by the delimiter (tab by default), ``\\N`` for NULL, backslash escapes.  CSV:
the ``csv`` module with the statement's delimiter, quote and escape, an optional header
line.  The options come from the statement (``Facts.copy_options``); the protocol's
CopyOutResponse only says text or binary.  Binary: the header, then per tuple a field count
and each field's length and bytes; the values stay binary (the caller turns key columns into
text with the types the catalog gives).
"""

from __future__ import annotations

import csv
import io
import re
import struct
from collections.abc import Iterator

from proxy.messages.errors import ProtocolError

# A COPY field can be as big as a PostgreSQL value (1 GB); the csv module stops at 128 KB
# unless told otherwise, which would end the session of whoever copies a long text.
csv.field_size_limit(1 << 30)

_TEXT_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.DOTALL)
_SIMPLE_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_TRUE = frozenset(("true", "on", "1", "match"))


def _unescape(m: re.Match[bytes]) -> bytes:
    octal, hexa, char = m.groups()
    if octal is not None:
        return bytes((int(octal, 8) & 0xFF,))
    if hexa is not None:
        return bytes((int(hexa, 16),))
    return _SIMPLE_ESCAPES.get(char, char)


class CopyRowReader:
    """Splits CopyData payloads into rows of fields (bytes, or None for NULL)."""

    __slots__ = (
        "_carry", "_columns", "_csv", "_delimiter", "_escape", "_header", "_null", "_quote",
    )  # fmt: skip

    def __init__(self, options: dict[str, str]) -> None:
        self._csv = options.get("format", "text").lower() == "csv"
        self._delimiter = options.get("delimiter", "," if self._csv else "\t")
        self._null = options.get("null", "" if self._csv else "\\N").encode()
        self._quote = options.get("quote", '"')
        self._escape = options.get("escape", self._quote)
        self._header = options.get("header", "false").lower() in _TRUE
        self._carry = b""
        self._columns: dict[int, re.Pattern[bytes]] = {}  # field -> its pattern

    def rows(self, data: bytes) -> Iterator[list[bytes | None]]:
        """The complete rows in ``data`` (after any carried-over part of a row)."""
        data, self._carry = self._split(data)
        if not data:
            return
        lines = self._csv_rows(data) if self._csv else self._text_rows(data)
        if self._header:
            self._header = False
            next(lines, None)
        yield from lines

    def column(self, data: bytes, i: int) -> list[bytes] | None:
        """Field ``i`` of each complete row in ``data``, in one pass of a regular expression
        (the bulk of a COPY whose rows are read for one key), or None where that would not
        be exact: CSV, a header still to skip, a backslash (an escape, or a NULL) anywhere,
        or a row with fewer fields.  Then nothing was consumed: use :meth:`rows`."""
        if self._csv or self._header:
            return None
        block, rest = self._split(data)
        if b"\\" in block:
            return None
        pattern = self._columns.get(i)
        if pattern is None:
            d = re.escape(self._delimiter.encode())
            pattern = re.compile(rb"^(?:[^%s\n]*%s){%d}([^%s\n]*)" % (d, d, i, d), re.M)
            self._columns[i] = pattern
        # Up to the last row's newline, not past it: ^ would match once more there.
        keys: list[bytes] = pattern.findall(block, 0, len(block) - 1) if block else []
        if len(keys) != block.count(b"\n"):
            return None
        self._carry = rest
        return keys

    def _split(self, data: bytes) -> tuple[bytes, bytes]:
        """``data`` behind the carried-over start of a row: its complete rows, and the start
        of the next one (to be carried over by whoever consumes the rows)."""
        whole = self._carry + data if self._carry else data
        cut = whole.rfind(b"\n") + 1
        return whole[:cut], whole[cut:]

    def _text_rows(self, data: bytes) -> Iterator[list[bytes | None]]:
        delimiter = self._delimiter.encode()
        null = self._null
        for line in data.split(b"\n")[:-1]:
            if b"\\" not in line:
                yield [None if raw == null else raw for raw in line.split(delimiter)]
                continue
            # A delimiter inside a value comes escaped (\|): split where it is not.
            yield [
                None if raw == null else _TEXT_ESCAPE.sub(_unescape, raw)
                for raw in _split_escaped(line, delimiter)
            ]

    def _csv_rows(self, data: bytes) -> Iterator[list[bytes | None]]:
        # latin-1 maps bytes to characters one to one, so fields come back byte for byte.
        text = data.decode("latin-1")
        if self._escape != self._quote:
            yield from self._csv_rows_escaped(text)
            return
        reader = csv.reader(
            io.StringIO(text, newline=""),  # not splitlines: it also splits at \x85 and more
            delimiter=self._delimiter,
            quotechar=self._quote,
            doublequote=True,
            strict=False,
        )
        null = self._null.decode("latin-1")
        for row in reader:
            yield [None if f == null and null else f.encode("latin-1") for f in row]

    def _csv_rows_escaped(self, text: str) -> Iterator[list[bytes | None]]:
        """CSV with an ESCAPE other than the quote: PostgreSQL escapes with it only inside
        quotes (an unquoted field keeps its backslashes), which the csv module cannot
        express."""
        q, e, d = (re.escape(c) for c in (self._quote, self._escape, self._delimiter))
        field = re.compile(f"(?:{q}((?:[^{q}{e}]|{e}.)*){q}|([^{d}{q}\n]*))({d}|\n|$)", re.DOTALL)
        unescape = re.compile(f"{e}(.)", re.DOTALL)
        null = self._null.decode("latin-1")
        row: list[bytes | None] = []
        pos = 0
        while pos < len(text):
            m = field.match(text, pos)
            if m is None or m.end() == pos:
                break
            quoted, plain, sep = m.groups()
            if quoted is not None:
                row.append(unescape.sub(r"\1", quoted).encode("latin-1"))
            else:
                row.append(None if plain == null else plain.encode("latin-1"))
            pos = m.end()
            if sep != self._delimiter:
                yield row
                row = []


def _split_escaped(line: bytes, delimiter: bytes) -> list[bytes]:
    """``line`` split at each delimiter that no backslash escapes (escapes kept)."""
    fields: list[bytes] = []
    start = i = 0
    n = len(line)
    while i < n:
        c = line[i : i + 1]
        if c == b"\\":
            i += 2
        elif c == delimiter:
            fields.append(line[start:i])
            i += 1
            start = i
        else:
            i += 1
    fields.append(line[start:])
    return fields


class BinaryCopyRowReader:
    """Splits binary COPY output into tuples of fields (bytes in the column's binary
    format, or None for NULL), carrying an incomplete tuple over to the next message."""

    __slots__ = ("_carry", "_in_header")

    SIGNATURE = b"PGCOPY\n\xff\r\n\x00"

    def __init__(self) -> None:
        self._carry = b""
        self._in_header = True

    def rows(self, data: bytes) -> list[list[bytes | None]]:
        buf = self._carry + data if self._carry else data
        pos = 0
        if self._in_header:
            if len(buf) < 19:
                self._carry = buf
                return []
            if buf[:11] != self.SIGNATURE:
                raise ProtocolError("binary COPY output without its signature")
            (extension,) = _U32.unpack_from(buf, 15)
            if len(buf) < 19 + extension:
                self._carry = buf
                return []
            pos = 19 + extension
            self._in_header = False
        out: list[list[bytes | None]] = []
        n = len(buf)
        while pos + 2 <= n:
            (count,) = _I16.unpack_from(buf, pos)
            if count < 0:  # the trailer
                pos = n
                break
            p = pos + 2
            fields: list[bytes | None] = []
            while len(fields) < count and p + 4 <= n:
                (size,) = _I32.unpack_from(buf, p)
                p += 4
                if size < 0:
                    fields.append(None)
                elif p + size <= n:
                    fields.append(buf[p : p + size])
                    p += size
                else:
                    break
            if len(fields) < count:
                break  # the tuple goes on in the next message
            out.append(fields)
            pos = p
        self._carry = buf[pos:]
        return out


_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")


def reader_for(
    options: tuple[tuple[str, str], ...], binary: bool
) -> CopyRowReader | BinaryCopyRowReader:
    """The reader for a COPY's output."""
    opts = dict(options)
    if binary or opts.get("format", "text").lower() == "binary":
        return BinaryCopyRowReader()
    return CopyRowReader(opts)
