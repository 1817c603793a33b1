"""The record ledger: keyed hashes of which records each statement returned.

For labelled tables the proxy hands the pipeline the primary keys (as text) of the rows a
statement returned, and optionally labelled values (an e-mail address).  The ledger stores
HMAC-SHA256 of them under a key kept in a file, so a responder holding the key can answer
"who saw customer 12345" and "which customers did bob see" while the audit store itself holds
no customer data: without the key the hashes cannot be tested against guesses.

Message layout (so that a key in one table never collides with the same text in another):
``b"k\\0" + schema.table + b"\\0" + pk_text`` for keys, ``b"v\\0" + label + b"\\0" +
normalised value`` for values.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import orjson

KIND_KEY = "k"
KIND_VALUE = "v"
DIGEST_SIZE = 32

LedgerEntry = tuple[str, str, bytes]  # (kind, relation or label, digest): one stored row
# What the pipeline carries: (kind, relation or label, digests).  One tuple per table rather
# than per key, because a 100k-row result would otherwise cost 100k tuples on the way.
LedgerGroup = tuple[str, str, list[bytes]]


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
    """HMAC-SHA256 with the key's pads hashed once.

    ``hmac.digest`` re-derives both pads on every call; with 100k keys per statement that is
    half the cost, so we keep the two prefix states and copy them (about 0.6 µs a key).
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def _mac(self, msg: bytes) -> bytes:
        i = self._inner.copy()
        i.update(msg)
        o = self._outer.copy()
        o.update(i.digest())
        return o.digest()

    def key(self, table: str, pk: str) -> bytes:
        """The digest of one primary key of ``table``."""
        return self._mac(b"k\0" + qualify(table).encode() + b"\0" + pk.encode())

    def value(self, label: str, value: str) -> bytes:
        """The digest of one labelled value."""
        return self._mac(b"v\0" + label.encode() + b"\0" + normalise_value(value).encode())

    def keys(self, table: str, pks: Iterable[str]) -> list[bytes]:
        """Digests of many keys of one table (the prefix is encoded once)."""
        prefix = b"k\0" + qualify(table).encode() + b"\0"
        inner, outer = self._inner, self._outer
        out = []
        for pk in pks:
            i = inner.copy()
            i.update(prefix + pk.encode())
            o = outer.copy()
            o.update(i.digest())
            out.append(o.digest())
        return out

    def entries(
        self,
        keys: Mapping[str, Sequence[str]] | None,
        values: Mapping[str, Sequence[str]] | None,
    ) -> list[LedgerGroup]:
        """Ledger entries for one statement, grouped by table or label, duplicates removed,
        in first-seen order."""
        out: list[LedgerGroup] = []
        if keys:
            for table, pks in keys.items():
                rel = qualify(table)
                out.append((KIND_KEY, rel, list(dict.fromkeys(self.keys(rel, pks)))))
        if values:
            for label, vals in values.items():
                digests = list(dict.fromkeys(self.value(label, v) for v in vals))
                out.append((KIND_VALUE, label, digests))
        return out


def ledger_digest(groups: Iterable[LedgerGroup]) -> str:
    """SHA-256 over a statement's ledger rows (each ``kind NUL relation NUL digest``, in
    order), stored in the chained event so that ledger rows cannot be added, removed or
    edited without ``verify`` noticing."""
    h = hashlib.sha256()
    for kind, rel, digests in groups:
        prefix = kind.encode() + b"\0" + rel.encode() + b"\0"
        h.update(b"".join(prefix + d for d in digests))
    return h.hexdigest()


def ledger_count(groups: Iterable[LedgerGroup]) -> int:
    """How many ledger rows the groups become."""
    return sum(len(g[2]) for g in groups)


def rows_of(chain_id: str, seq: int, groups: Iterable[LedgerGroup]) -> list[tuple[object, ...]]:
    """The ``ledger`` table rows ``(chain_id, seq, kind, relation, digest)`` of one event."""
    return [(chain_id, seq, kind, rel, d) for kind, rel, digests in groups for d in digests]
