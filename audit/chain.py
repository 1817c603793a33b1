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

    def seal_canonical(self, record: Record) -> bytes:
        """Like :meth:`seal`, returning the canonical bytes that were hashed.

        If the record cannot be serialised (``TypeError``), the chain does not advance.
        """
        seq = self.seq + 1
        record["chain_id"] = self.chain_id
        record["seq"] = seq
        record["prev_hash"] = self.head
        # Same bytes as canonical(): the hash field is absent while hashing.
        record.pop("hash", None)
        canon = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
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


def verify_chain(
    chain_id: str,
    rows: Iterable[Mapping[str, Any]],
    *,
    public_key: Ed25519PublicKey | None = None,
    external: Iterable[ExternalCheckpoint] = (),
    ledger_digests: Mapping[int, str] | None = None,
) -> ChainReport:
    """Check one chain whose rows are given in storage order (rowid / id / file order).

    ``ledger_digests`` maps seq -> digest recomputed from the ledger rows, when the store has
    a ledger; events whose ``ledger_digest`` disagrees were tampered with through the ledger.
    Problems are returned sorted by ``seq``, so the first one is the earliest damage.
    """
    rep = ChainReport(chain_id)
    by_seq: dict[int, Record] = {}
    storage_order: list[int] = []
    problems: list[Problem] = []
    for raw in rows:
        rec = normalise_record(raw)
        seq = int(rec["seq"])
        rep.events += 1
        if seq in by_seq:
            problems.append(Problem(chain_id, seq, "duplicated", f"event {seq} is stored twice"))
            continue
        by_seq[seq] = rec
        storage_order.append(seq)
        if record_hash(rec) != rec["hash"]:
            problems.append(
                Problem(
                    chain_id,
                    seq,
                    "edited",
                    f"event {seq} was edited: its contents no longer match its hash",
                )
            )
    if not by_seq:
        rep.problems = problems
        return rep

    # Reordering: hashes still match but storage order disagrees with seq order.
    prev = 0
    for seq in storage_order:
        if seq < prev:
            problems.append(
                Problem(
                    chain_id,
                    seq,
                    "reordered",
                    f"event {seq} is stored after event {prev}: events were moved out of order",
                )
            )
            break
        prev = seq

    seqs = sorted(by_seq)
    rep.first_seq, rep.last_seq = seqs[0], seqs[-1]
    expected, head = 1, GENESIS
    for seq in seqs:
        rec = by_seq[seq]
        if seq != expected:
            gap = f"{expected}" if seq - expected == 1 else f"{expected}..{seq - 1}"
            problems.append(
                Problem(
                    chain_id,
                    expected,
                    "deleted",
                    f"events {gap} are missing (deleted) before event {seq}",
                )
            )
        elif rec["prev_hash"] != head:
            problems.append(
                Problem(
                    chain_id,
                    seq,
                    "forged_link",
                    f"event {seq} does not follow event {seq - 1}: its predecessor hash is wrong",
                )
            )
        expected, head = seq + 1, rec["hash"]
        if ledger_digests is not None:
            want = rec.get("ledger_digest") if rec.get("ledger_count") else None
            if ledger_digests.get(seq) != want:
                problems.append(
                    Problem(
                        chain_id,
                        seq,
                        "ledger_edited",
                        f"the record-ledger rows of event {seq} were added, removed or edited",
                    )
                )
        if rec["kind"] == "checkpoint":
            d = rec.get("details") or {}
            rep.checkpoints += 1
            cseq, chash, sig = (
                int(d.get("seq", 0)),
                str(d.get("hash", "")),
                str(d.get("signature", "")),
            )
            rep.last_checkpoint_seq = cseq
            if not _signature_ok(public_key, chain_id, cseq, chash, sig):
                problems.append(
                    Problem(
                        chain_id,
                        seq,
                        "bad_signature",
                        f"checkpoint event {seq} has an invalid signature",
                    )
                )
            elif cseq in by_seq and by_seq[cseq]["hash"] != chash:
                problems.append(
                    Problem(
                        chain_id,
                        cseq,
                        "edited",
                        f"event {cseq} differs from what checkpoint {seq} signed: the chain "
                        "up to it was rewritten",
                    )
                )

    last = seqs[-1]
    for cp in external:
        if cp.chain_id != chain_id:
            continue
        if not _signature_ok(public_key, chain_id, cp.seq, cp.hash, cp.signature):
            problems.append(
                Problem(
                    chain_id,
                    cp.seq,
                    "bad_signature",
                    f"external checkpoint for event {cp.seq} has an invalid signature",
                )
            )
        elif cp.seq > last:
            problems.append(
                Problem(
                    chain_id,
                    last + 1,
                    "truncated",
                    f"the trail ends at event {last} but a signed checkpoint vouches for event "
                    f"{cp.seq}: events {last + 1}..{cp.seq} were cut off",
                )
            )
        elif cp.seq in by_seq and by_seq[cp.seq]["hash"] != cp.hash:
            problems.append(
                Problem(
                    chain_id,
                    cp.seq,
                    "edited",
                    f"event {cp.seq} differs from what a signed checkpoint vouched for",
                )
            )
    problems.sort(key=lambda p: p.seq)
    rep.problems = problems
    return rep
