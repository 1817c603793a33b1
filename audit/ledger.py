"""The record ledger: keyed hashes of which records each statement returned.

For labelled tables the proxy hands the pipeline the primary keys (as text) of the rows a
statement returned, and optionally labelled values (an e-mail address).  The ledger stores
HMAC-SHA256 of them under a key kept in a file, so a responder holding the key can answer
"who saw customer 12345" and "which customers did bob see" while the audit store itself holds
no customer data: without the key the hashes cannot be tested against guesses.

Storage: see ``LedgerGroup`` below.  Message layout (so that a key in one table never
collides with the same text in another):
``b"k\\0" + schema.table + b"\\0" + pk_text`` for keys, ``b"v\\0" + label + b"\\0" +
normalised value`` for values.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

KIND_KEY = "k"
KIND_VALUE = "v"
DIGEST_SIZE = 16

# One ledger row: (kind, relation or label, the 16-byte digests of the distinct records,
# concatenated).  One row per statement and table rather than per record: a 100k-row result
# is one 1.6 MB insert instead of 100k index insertions, which is what keeps the ledger from
# doubling the time a large result takes to reach the client.  "Who saw record X" becomes a
# scan for the digest inside the packed values (an aligned substring search), which the
# database does in C at memory speed.
LedgerGroup = tuple[str, str, bytes]


class LedgerKeyError(ValueError):
    """The ledger HMAC key file is missing or malformed."""


def qualify(table: str) -> str:
    """``customers`` -> ``public.customers``: both the proxy and responders may omit the schema."""
    return table if "." in table else f"public.{table}"


def pk_text(values: Sequence[object]) -> str:
    """The text form of a primary key: the value's text for one column, a JSON array of the
    columns' texts for a composite key (so a comma inside a value cannot shift columns)."""
    if len(values) == 1:
        return str(values[0])
    return orjson.dumps([str(v) for v in values]).decode()


def normalise_value(value: str) -> str:
    """Labelled values are compared case- and space-insensitively (``Alice@Example.com ``)."""
    return value.strip().casefold()


def generate_key_file(path: Path) -> None:
    """Write a new random 256-bit HMAC key (hex) readable only by its owner."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def load_key(path: Path) -> bytes:
    """Read an HMAC key file written by :func:`generate_key_file` (hex, at least 16 bytes)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise LedgerKeyError(f"cannot read the ledger key file {path}: {exc.strerror}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise LedgerKeyError(f"the ledger key file {path} does not hold a hex key") from exc
    if len(key) < 16:
        raise LedgerKeyError(f"the ledger key in {path} is too short (need at least 16 bytes)")
    return key


class RecordHasher:
    """HMAC-SHA256, truncated to 128 bits, with the key's pads hashed once.

    ``hmac.digest`` re-derives both pads on every call; with 100k keys per statement that is
    half the cost, so we keep the two prefix states and copy them (about 0.6 µs a key).
    Truncation to 16 bytes (as HMAC-SHA-256-128 in RFC 4868) halves what the ledger stores
    and scans; collisions stay out of reach.
    """

    __slots__ = ("_inner", "_outer", "_tables")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        # Per table: its qualified name and the inner state with the message prefix already
        # absorbed, so a key costs one copy+update less.  Bounded by the number of tables.
        self._tables: dict[str, tuple[str, Any]] = {}

    def _table(self, table: str) -> tuple[str, Any]:
        got = self._tables.get(table)
        if got is None:
            rel = qualify(table)
            base = self._inner.copy()
            base.update(b"k\0" + rel.encode() + b"\0")
            got = (rel, base)
            if len(self._tables) < 10_000:
                self._tables[table] = got
        return got

    def _mac(self, msg: bytes) -> bytes:
        i = self._inner.copy()
        i.update(msg)
        o = self._outer.copy()
        o.update(i.digest())
        return o.digest()[:DIGEST_SIZE]

    def key(self, table: str, pk: str) -> bytes:
        """The digest of one primary key of ``table``."""
        return next(iter(self._packed_keys(table, (pk,))[1]))

    def value(self, label: str, value: str) -> bytes:
        """The digest of one labelled value."""
        norm = normalise_value(value).encode("utf-8", "surrogateescape")
        return self._mac(b"v\0" + label.encode() + b"\0" + norm)

    def keys(self, table: str, pks: Iterable[str]) -> list[bytes]:
        """Digests of the distinct keys among ``pks``, in first-seen order."""
        return list(self._packed_keys(table, pks)[1])

    def _packed_keys(self, table: str, pks: Iterable[str | bytes]) -> tuple[str, dict[bytes, None]]:
        """Keys are text, or its UTF-8 bytes as the proxy reads them from a result (the same
        digest either way).  A key seen twice is hashed once."""
        rel, base = self._table(table)
        outer = self._outer
        seen: dict[bytes, None] = {}
        for pk in dict.fromkeys(pks):
            i = base.copy()
            i.update(pk if isinstance(pk, bytes) else pk.encode("utf-8", "surrogateescape"))
            o = outer.copy()
            o.update(i.digest())
            seen[o.digest()[:DIGEST_SIZE]] = None
        return rel, seen

    def entries(
        self,
        keys: Mapping[str, Sequence[str | bytes]] | None,
        values: Mapping[str, Sequence[str]] | None,
    ) -> tuple[LedgerGroup, ...]:
        """Ledger groups for one statement: per table (or label) the packed digests of the
        distinct keys (or values), in first-seen order.  A tuple, which the garbage collector
        can stop tracking, as it holds only strings and bytes."""
        out: list[LedgerGroup] = []
        if keys:
            for table, pks in keys.items():
                if pks:
                    rel, seen = self._packed_keys(table, pks)
                    out.append((KIND_KEY, rel, b"".join(seen)))
        if values:
            for label, vals in values.items():
                if vals:
                    digests = dict.fromkeys(self.value(label, v) for v in vals)
                    out.append((KIND_VALUE, label, b"".join(digests)))
        return tuple(out)


def split(packed: bytes) -> list[bytes]:
    """Packed digests -> the individual 16-byte digests."""
    return [packed[i : i + DIGEST_SIZE] for i in range(0, len(packed), DIGEST_SIZE)]


def ledger_digest(groups: Iterable[LedgerGroup]) -> str:
    """SHA-256 over a statement's ledger rows (kind, relation, length, packed digests), stored
    in the chained event so that ledger rows cannot be added, removed or edited without
    ``verify`` noticing."""
    h = hashlib.sha256()
    for g in groups:
        ledger_update(h, g)
    return h.hexdigest()


def ledger_update(h: Any, group: LedgerGroup) -> None:
    """Feed one ledger row into a running :func:`ledger_digest` (for streaming verify)."""
    kind, rel, packed = group
    h.update(kind.encode() + b"\0" + rel.encode() + b"\0" + struct.pack(">Q", len(packed)))
    h.update(packed)


def ledger_count(groups: Iterable[LedgerGroup]) -> int:
    """How many records the groups name."""
    return sum(len(g[2]) // DIGEST_SIZE for g in groups)
