"""The record ledger: keyed hashes of which records each statement returned.

For labelled tables the proxy hands the pipeline the primary keys (as text) of the rows a
statement returned, and optionally labelled values (an e-mail address).  The ledger stores
keyed hashes (MACs) of them under a secret kept in a file, so a responder holding the secret
can answer "who saw customer 12345" and "which customers did bob see" while the audit store
itself holds no customer data: without the secret the hashes cannot be tested against
guesses.  Storage: see ``LedgerGroup``; the MAC: see ``RecordHasher``.
"""

from __future__ import annotations

import array
import functools
import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

KIND_KEY = "k2"  # primary keys, AES-CMAC digests
KIND_VALUE = "v2"  # labelled values, AES-CMAC digests
LEGACY_KIND_KEY = "k"  # the HMAC digests of trails written before CMAC; still searched
LEGACY_KIND_VALUE = "v"
DIGEST_SIZE = 16

# One ledger row: (kind, relation or label, the 16-byte digests of the records, one per row
# returned, concatenated).  One row per statement and table rather than per record: a 100k-row result
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


def pk_bytes(parts: Sequence[bytes | None]) -> bytes | None:
    """The one spelling of a primary key, shared by the proxy (which reads it from a result
    row) and the responder's commands: the column's text for a one-column key; for a
    composite key a compact JSON array of the columns' texts (``["1","x,y"]``: no spaces,
    UTF-8, so a comma inside a value cannot shift columns).  None when a column is NULL: a
    key column cannot be NULL in its table, so the table's row is absent (an outer join) and
    the result row carries none of its data."""
    if len(parts) == 1:
        return parts[0]
    texts = []
    for p in parts:
        if p is None:
            return None
        # "replace": a key that is not UTF-8 (a client_encoding other than the server's)
        # still gets a digest, as its one-column form does.
        texts.append(p.decode("utf-8", "replace"))
    return orjson.dumps(texts)


def pk_text(values: Sequence[object]) -> str:
    """:func:`pk_bytes` for key values as text (or anything with a text form, such as the
    ints of a test), for the responder's side."""
    text = pk_bytes([None if v is None else str(v).encode() for v in values])
    if text is None:
        raise ValueError("a primary key column is NULL: such a row has no record to name")
    return text.decode()


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
    """AES-CMAC (RFC 4493) of each record, under a key derived per table (or label).

    A digest is ``AES-CMAC(K_rel, message)``: ``K_rel`` is HMAC-SHA256 of the ledger key
    file's secret over ``kind + "\\0" + relation`` (so equal texts in two tables never share a
    digest), ``message`` the key's text, padded with zero bytes to at least 16 bytes.  A
    record's text never holds a zero byte (PostgreSQL's text output cannot), so the padding
    keeps distinct keys distinct.

    Why CMAC rather than the HMAC of earlier trails: a key of up to 16 bytes (integers, ticket
    numbers) is one AES block, so the digests of a whole 100k-row result come from one
    encryption call over a packed buffer (about 0.1 µs a key) instead of six hash calls per
    key from Python (about 1 µs).  That is what keeps the ledger from doubling the time a big
    result takes to stream.  Longer keys (UUID texts) take one call per block position
    (``_cmac_many``).  The HMAC digests of older trails (kinds ``k`` and ``v``) are still searched:
    :meth:`legacy_key` and :meth:`legacy_value`.
    """

    __slots__ = ("_rels", "_secret")

    def __init__(self, key: bytes) -> None:
        self._secret = key
        # Per (kind, relation): the AES-ECB cipher and CMAC's first subkey.  Bounded.
        self._rels: dict[tuple[str, str], tuple[bytes, Any, bytes]] = {}

    def _rel(self, kind: str, rel: str) -> tuple[bytes, Any, bytes]:
        got = self._rels.get((kind, rel))
        if got is None:
            subkey = hmac.digest(self._secret, f"{kind}\0{rel}".encode(), "sha256")
            ecb = Cipher(algorithms.AES(subkey), modes.ECB())
            enc = ecb.encryptor()
            k1 = _double(enc.update(bytes(_BLOCK)) + enc.finalize())
            got = (subkey, ecb, k1)
            if len(self._rels) < 10_000:
                self._rels[(kind, rel)] = got
        return got

    def key(self, table: str, pk: str | bytes) -> bytes:
        """The digest of one primary key of ``table``."""
        return self._one(KIND_KEY, qualify(table), _utf8(pk))

    def value(self, label: str, value: str) -> bytes:
        """The digest of one labelled value (compared case- and space-insensitively)."""
        return self._one(KIND_VALUE, label, _utf8(normalise_value(value)))

    def keys(self, table: str, pks: Iterable[str | bytes]) -> list[bytes]:
        """The digest of each of ``pks``, in order."""
        return split(self._packed(KIND_KEY, qualify(table), pks))

    def values(self, label: str, vals: Iterable[str]) -> list[bytes]:
        """The digest of each of ``vals`` (as :meth:`value`), in order."""
        return split(self._packed(KIND_VALUE, label, [normalise_value(v) for v in vals]))

    def _one(self, kind: str, rel: str, msg: bytes) -> bytes:
        mac = CMAC(algorithms.AES(self._rel(kind, rel)[0]))
        mac.update(msg.ljust(_BLOCK, b"\0"))
        return mac.finalize()

    def _packed(self, kind: str, rel: str, texts: Iterable[str | bytes]) -> bytes:
        """The concatenated digests of ``texts`` (bytes as read from a result, or text), in
        their order.  A text that repeats is there each time: a row returned twice was
        returned twice, and finding repeats would cost as much as the hashing."""
        msgs = texts if isinstance(texts, list) else list(texts)
        if not msgs:
            return b""
        try:
            return self._packed_messages(kind, rel, msgs)
        except struct.error:  # text rather than bytes among them
            return self._packed_messages(kind, rel, [_utf8(t) for t in msgs])

    def _packed_messages(self, kind: str, rel: str, msgs: list[Any]) -> bytes:
        _subkey, ecb, k1 = self._rel(kind, rel)
        if max(map(len, msgs)) > _BLOCK:
            if set(map(type, msgs)) != {bytes}:
                msgs = [_utf8(m) for m in msgs]
            return _cmac_many(ecb, k1, msgs)
        # Every message is one block: CMAC is then AES(block XOR K1), done for all at once.
        n = len(msgs)
        blocks = b"".join(
            _pack_blocks(len(part)).pack(*part)  # each padded with zeros to 16 bytes
            for part in (msgs[i : i + _PACK_RUN] for i in range(0, n, _PACK_RUN))
        )
        return _encrypt(ecb, _xor(blocks, k1 * n))

    def entries(
        self,
        keys: Mapping[str, Sequence[str | bytes]] | None,
        values: Mapping[str, Sequence[str]] | None,
    ) -> tuple[LedgerGroup, ...]:
        """Ledger groups for one statement: per table (or label) the packed digests of the
        keys (or values) of the rows returned, in order.  A tuple, which the garbage collector
        can stop tracking, as it holds only strings and bytes."""
        out: list[LedgerGroup] = []
        if keys:
            for table, pks in keys.items():
                if pks:
                    rel = qualify(table)
                    out.append((KIND_KEY, rel, self._packed(KIND_KEY, rel, pks)))
        if values:
            for label, vals in values.items():
                if vals:
                    norm = map(normalise_value, vals)
                    out.append((KIND_VALUE, label, self._packed(KIND_VALUE, label, norm)))
        return tuple(out)

    def check_value(self) -> str:
        """A keyed check value of the ledger key (hex): the writer records it on each event
        that has ledger rows (``details.ledger_key_check``), so a responder holding another
        deployment's key is told so instead of "nobody saw it".  It tells nothing about the
        key itself (HMAC-SHA256 of a fixed text under it, 128 bits)."""
        return self._hmac(b"pgwarden ledger key check").hex()

    # --- the HMAC digests of trails written before CMAC (kinds "k" and "v") ----------------

    def legacy_key(self, table: str, pk: str | bytes) -> bytes:
        return self._hmac(b"k\0" + qualify(table).encode() + b"\0" + _utf8(pk))

    def legacy_value(self, label: str, value: str) -> bytes:
        return self._hmac(b"v\0" + label.encode() + b"\0" + _utf8(normalise_value(value)))

    def _hmac(self, msg: bytes) -> bytes:
        return hmac.digest(self._secret, msg, "sha256")[:DIGEST_SIZE]


def _cmac_many(ecb: Any, k1: bytes, msgs: list[bytes]) -> bytes:
    """CMAC of messages of any length (each zero-padded to at least one block), one AES
    call per block position for all messages with the same number of blocks: a UUID key's
    text (36 bytes) costs three calls for the whole result, not three per key."""
    k2 = _double(k1)
    sizes = set(map(len, msgs))
    if len(sizes) == 1 and (size := sizes.pop()) > _BLOCK:
        return _cmac_same_size(ecb, k1, k2, msgs, size)
    groups: dict[int, tuple[list[int], list[bytes], list[bytes]]] = {}
    for i, m in enumerate(msgs):
        size = len(m)
        if size <= _BLOCK:
            m, size = m.ljust(_BLOCK, b"\0"), _BLOCK
        n, rest = divmod(size, _BLOCK)
        if rest:  # an incomplete last block: padded 10..0 and masked with K2
            n += 1
            m += b"\x80".ljust(_BLOCK - rest, b"\0")
        where, padded, masks = groups.setdefault(n, ([], [], []))
        where.append(i)
        padded.append(m)
        masks.append(k2 if rest else k1)
    tags: list[bytes] = [b""] * len(msgs)
    for n, (where, padded, masks) in groups.items():
        state = b""
        for j in range(n):
            column = b"".join([m[j * _BLOCK : (j + 1) * _BLOCK] for m in padded])
            if j == n - 1:
                column = _xor(column, b"".join(masks))
            state = _encrypt(ecb, _xor(state, column) if state else column)
        for i, tag in zip(where, split(state), strict=True):
            tags[i] = tag
    return b"".join(tags)


def _cmac_same_size(ecb: Any, k1: bytes, k2: bytes, msgs: list[bytes], size: int) -> bytes:
    """:func:`_cmac_many` for messages of one length (UUID texts), with no call per message:
    the padded messages are joined in one call and each block position is gathered with
    strided array slices."""
    n, rest = divmod(size, _BLOCK)
    pad = b""
    if rest:
        n += 1
        pad = b"\x80".ljust(_BLOCK - rest, b"\0")
    words = array.array("Q")
    words.frombytes(pad.join(msgs) + pad)  # each message now n blocks: 2n words
    count = len(msgs)
    state = b""  # CBC-MAC's chaining value, zero before the first block
    column = array.array("Q", bytes(_BLOCK * count))
    for j in range(n):
        column[0::2] = words[2 * j :: 2 * n]
        column[1::2] = words[2 * j + 1 :: 2 * n]
        block = column.tobytes()
        if j == n - 1:
            block = _xor(block, (k2 if rest else k1) * count)
        state = _encrypt(ecb, _xor(state, block) if state else block)
    return state


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _encrypt(ecb: Any, data: bytes) -> bytes:
    enc = ecb.encryptor()
    out: bytes = enc.update(data) + enc.finalize()
    return out


def _utf8(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def _double(block: bytes) -> bytes:
    """CMAC's subkey step: multiply by x in GF(2^128) (RFC 4493, section 2.3)."""
    v = int.from_bytes(block, "big") << 1
    if v >> 128:
        v = (v ^ 0x87) & ((1 << 128) - 1)
    return v.to_bytes(_BLOCK, "big")


_BLOCK = 16
_PACK_RUN = 4096  # messages per struct call: "16s" pads each with zeros to one block


@functools.lru_cache(maxsize=64)
def _pack_blocks(n: int) -> struct.Struct:
    return struct.Struct("16s" * n)


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
