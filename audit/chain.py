"""The hash chain: every event carries the hash of its predecessor, and signed checkpoints
vouch for the chain so far.

``hash = SHA-256(canonical JSON of the record without "hash")`` where canonical JSON is orjson
with sorted keys.  ``prev_hash`` of the first event of a chain is 64 zeros and ``seq`` counts
from 1, so deleting the head is visible too.  Each writer process has its own ``chain_id``:
several pgwarden processes can share one PostgreSQL store without interleaving one chain.

Editing an event breaks its own hash; deleting one leaves a hole in ``seq``; moving one puts
``seq`` out of storage order; cutting off the tail is the one thing a chain cannot show by
itself, which is what checkpoints are for: every ``checkpoint_every`` events the writer signs
``(chain_id, seq, hash)`` with Ed25519 and sends it to the alert channels (and, if configured,
to an append-only file elsewhere).  A trail that ends before a signed checkpoint was truncated.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.events import Record, normalise_record

GENESIS = "0" * 64


class SigningKeyError(ValueError):
    """The checkpoint signing key (or its public half) could not be loaded."""


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes the hash covers: sorted-key JSON of every field but ``hash``."""
    return orjson.dumps(
        {k: v for k, v in record.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS
    )


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash an event should carry."""
    return hashlib.sha256(canonical(record)).hexdigest()


def checkpoint_message(chain_id: str, seq: int, head: str) -> bytes:
    """What a checkpoint signature covers."""
    return orjson.dumps(
        {"chain_id": chain_id, "hash": head, "seq": seq}, option=orjson.OPT_SORT_KEYS
    )


# --- keys ---------------------------------------------------------------------------------


def generate_signing_key(path: Path) -> Path:
    """Write a new Ed25519 private key (PEM, mode 600) and its public key beside it
    (``<path>.pub``); returns the public key's path."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path = Path(f"{path}.pub")
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pub_path


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read the PEM private key written by ``pgwarden audit keygen``."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise SigningKeyError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a key that is not Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a public key (``<key>.pub``), or derive it from a private key file."""
    data = Path(path).read_bytes()
    try:
        if b"PRIVATE KEY" in data:
            priv = serialization.load_pem_private_key(data, password=None)
            if isinstance(priv, Ed25519PrivateKey):
                return priv.public_key()
            raise SigningKeyError(f"{path} holds a key that is not Ed25519")
        pub = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SigningKeyError(f"{path} is not a PEM key: {exc}") from exc
    if not isinstance(pub, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a key that is not Ed25519")
    return pub


def key_id(pub: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key, shown next to checkpoints."""
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- writing --------------------------------------------------------------------------------


_SORTED_KEYS: tuple[str, ...] = ()


def _is_sorted(record: Record) -> bool:
    # Comparing the key tuple with the known sorted column list is far cheaper than sorting.
    global _SORTED_KEYS
    keys = tuple(record)
    if keys == _SORTED_KEYS:
        return True
    if list(keys) == sorted(keys):
        _SORTED_KEYS = keys
        return True
    return False


class Chain:
    """The running head of one writer's chain.  Not thread-safe: one chainer thread owns it."""

    __slots__ = ("chain_id", "head", "seq")

    def __init__(self, chain_id: str, seq: int = 0, head: str = GENESIS) -> None:
        self.chain_id = chain_id
        self.seq = seq
        self.head = head

    def seal(self, record: Record) -> Record:
        """Give ``record`` its place in the chain (mutates and returns it)."""
        self.seal_canonical(record)
        return record

    def seal_canonical(self, record: Record, *, presorted: bool = False) -> bytes:
        """Like :meth:`seal`, returning the canonical bytes that were hashed.

        ``presorted`` promises that the record's keys are in sorted order (as
        :meth:`AuditEvent.to_record` makes them), which spares checking.  If the record
        cannot be serialised (``TypeError``), the chain does not advance.
        """
        seq = self.seq + 1
        record["chain_id"] = self.chain_id
        record["seq"] = seq
        record["prev_hash"] = self.head
        # Same bytes as canonical(): the hash field is absent while hashing.
        record.pop("hash", None)
        # AuditEvent.to_record() emits keys sorted; only nested details need orjson's sort.
        presorted = record.get("details") is None and (presorted or _is_sorted(record))
        canon = orjson.dumps(record, option=0 if presorted else orjson.OPT_SORT_KEYS)
        h = hashlib.sha256(canon).hexdigest()
        record["hash"] = h
        self.seq, self.head = seq, h
        return canon


# --- verifying ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One way the stored trail differs from what was written."""

    chain_id: str
    seq: int
    # edited | deleted | reordered | duplicated | forged_link | truncated | bad_signature |
    # ledger_edited
    kind: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "seq": self.seq,
            "kind": self.kind,
            "message": self.message,
        }


@dataclass
class ChainReport:
    """The verdict on one chain."""

    chain_id: str
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "events": self.events,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "checkpoints": self.checkpoints,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "intact": self.intact,
            "problems": [p.as_dict() for p in self.problems],
        }


@dataclass(frozen=True, slots=True)
class ExternalCheckpoint:
    """A checkpoint as delivered to an alert channel or checkpoint file."""

    chain_id: str
    seq: int
    hash: str
    signature: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExternalCheckpoint:
        return cls(str(d["chain_id"]), int(d["seq"]), str(d["hash"]), str(d["signature"]))


def _signature_ok(
    pub: Ed25519PublicKey | None, chain_id: str, seq: int, head: str, sig: str
) -> bool:
    if pub is None:
        return True
    try:
        pub.verify(bytes.fromhex(sig), checkpoint_message(chain_id, seq, head))
    except (InvalidSignature, ValueError):
        return False
    return True


class ChainVerifier:
    """Checks one chain fed row by row in storage order (rowid / id / file order).

    Memory stays small per event (its hash, and a little more for events out of place), so
    a responder can verify a store with tens of millions of events.  Problems come back
    sorted by ``seq``: the first one is the earliest damage.
    """

    def __init__(
        self,
        chain_id: str,
        *,
        public_key: Ed25519PublicKey | None = None,
        ledger_digests: Mapping[int, str] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.public_key = public_key
        self.ledger_digests = ledger_digests
        self.rep = ChainReport(chain_id)
        self.problems: list[Problem] = []
        self.hashes: dict[int, str] = {}
        # prev_hash of events whose predecessor has not been seen yet
        self._pending_links: dict[int, str] = {}
        # checkpoints naming an event not seen yet: seq -> (hash, checkpoint seq)
        self._pending_claims: dict[int, tuple[str, int]] = {}
        self._gaps: list[tuple[int, int]] = []  # seq ranges skipped when first passed
        self._max = 0
        self._reordered = False
        self._ledger_seen: set[int] = set()

    def _problem(self, seq: int, kind: str, message: str) -> None:
        self.problems.append(Problem(self.chain_id, seq, kind, message))

    def feed(self, raw: Mapping[str, Any]) -> None:
        """One stored row of this chain."""
        rec = normalise_record(raw)
        seq = int(rec["seq"])
        rep = self.rep
        rep.events += 1
        if seq in self.hashes:
            self._problem(seq, "duplicated", f"event {seq} is stored twice")
            return
        h = rec["hash"]
        if record_hash(rec) != h:
            self._problem(
                seq, "edited", f"event {seq} was edited: its contents no longer match its hash"
            )
        self.hashes[seq] = h
        if rep.first_seq is None or seq < rep.first_seq:
            rep.first_seq = seq
        # Ordering and gaps.
        if seq < self._max:
            if not self._reordered:
                self._reordered = True
                self._problem(
                    seq,
                    "reordered",
                    f"event {seq} is stored after event {self._max}: events were moved out "
                    "of order",
                )
        elif seq > self._max + 1:
            self._gaps.append((self._max + 1, seq - 1))
        self._max = max(self._max, seq)
        # The link to the predecessor, now or when it shows up.
        if seq == 1:
            if rec["prev_hash"] != GENESIS:
                self._forged(seq)
        elif seq - 1 in self.hashes:
            if rec["prev_hash"] != self.hashes[seq - 1]:
                self._forged(seq)
        else:
            self._pending_links[seq] = rec["prev_hash"]
        nxt = self._pending_links.pop(seq + 1, None)
        if nxt is not None and nxt != h:
            self._forged(seq + 1)
        # The ledger rows of this event.
        if self.ledger_digests is not None:
            want = rec.get("ledger_digest") if rec.get("ledger_count") else None
            self._ledger_seen.add(seq)
            if self.ledger_digests.get(seq) != want:
                self._problem(
                    seq,
                    "ledger_edited",
                    f"the record-ledger rows of event {seq} were added, removed or edited",
                )
        # Checkpoints.
        claim = self._pending_claims.pop(seq, None)
        if claim is not None and claim[0] != h:
            self._checkpoint_mismatch(seq, claim[1])
        if rec["kind"] == "checkpoint":
            d = rec.get("details") or {}
            rep.checkpoints += 1
            cseq, chash = int(d.get("seq", 0)), str(d.get("hash", ""))
            rep.last_checkpoint_seq = cseq
            if not _signature_ok(
                self.public_key, self.chain_id, cseq, chash, str(d.get("signature", ""))
            ):
                self._problem(
                    seq, "bad_signature", f"checkpoint event {seq} has an invalid signature"
                )
            elif cseq in self.hashes:
                if self.hashes[cseq] != chash:
                    self._checkpoint_mismatch(cseq, seq)
            else:
                self._pending_claims[cseq] = (chash, seq)

    def _forged(self, seq: int) -> None:
        self._problem(
            seq,
            "forged_link",
            f"event {seq} does not follow event {seq - 1}: its predecessor hash is wrong",
        )

    def _checkpoint_mismatch(self, seq: int, cp_seq: int) -> None:
        self._problem(
            seq,
            "edited",
            f"event {seq} differs from what checkpoint {cp_seq} signed: the chain up to it was "
            "rewritten",
        )

    def _unseen(self, a: int, b: int) -> list[tuple[int, int]]:
        """Sub-ranges of [a, b] with no stored event."""
        if b - a + 1 <= len(self.hashes) * 4:
            present = [s for s in range(a, b + 1) if s in self.hashes]
        else:
            present = sorted(s for s in self.hashes if a <= s <= b)
        out, start = [], a
        for s in present:
            if s > start:
                out.append((start, s - 1))
            start = s + 1
        if start <= b:
            out.append((start, b))
        return out

    def finish(self, external: Iterable[ExternalCheckpoint] = ()) -> ChainReport:
        """The report, after every row was fed."""
        rep = self.rep
        rep.last_seq = self._max or None
        for a, b in self._gaps:
            for x, y in self._unseen(a, b):
                gap = f"{x}" if x == y else f"{x}..{y}"
                self._problem(
                    x, "deleted", f"events {gap} are missing (deleted) before event {y + 1}"
                )
        if self.ledger_digests is not None:
            for seq in self.ledger_digests:
                if seq not in self._ledger_seen:
                    self._problem(
                        seq, "ledger_edited", f"ledger rows name event {seq}, which is not stored"
                    )
        last = self._max
        for cp in external:
            if cp.chain_id != self.chain_id:
                continue
            if not _signature_ok(self.public_key, self.chain_id, cp.seq, cp.hash, cp.signature):
                self._problem(
                    cp.seq,
                    "bad_signature",
                    f"external checkpoint for event {cp.seq} has an invalid signature",
                )
            elif cp.seq > last:
                if last == 0:
                    msg = f"chain {self.chain_id} has signed checkpoints but no events at all"
                else:
                    msg = (
                        f"the trail ends at event {last} but a signed checkpoint vouches for "
                        f"event {cp.seq}: events {last + 1}..{cp.seq} were cut off"
                    )
                self._problem(last + 1, "truncated", msg)
            elif cp.seq in self.hashes and self.hashes[cp.seq] != cp.hash:
                self._problem(
                    cp.seq,
                    "edited",
                    f"event {cp.seq} differs from what a signed checkpoint vouched for",
                )
        self.problems.sort(key=lambda p: p.seq)
        rep.problems = self.problems
        return rep


def verify_chain(
    chain_id: str,
    rows: Iterable[Mapping[str, Any]],
    *,
    public_key: Ed25519PublicKey | None = None,
    external: Iterable[ExternalCheckpoint] = (),
    ledger_digests: Mapping[int, str] | None = None,
) -> ChainReport:
    """Check one chain whose rows are given in storage order (see :class:`ChainVerifier`).

    ``ledger_digests`` maps seq -> digest recomputed from the ledger rows, when the store has
    a ledger; events whose ``ledger_digest`` disagrees were tampered with through the ledger.
    """
    v = ChainVerifier(chain_id, public_key=public_key, ledger_digests=ledger_digests)
    for raw in rows:
        v.feed(raw)
    return v.finish(external)
