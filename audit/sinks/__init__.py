"""Where sealed audit events go.  Every backend implements :class:`Sink`.

A sink receives batches of already-chained events (the chain is computed once, upstream, so
every sink stores the same hashes) and returns from :meth:`Sink.write` only when the batch is
persisted as far as the backend can promise.  ``durable`` says whether that promise survives
the process being killed: only durable sinks release a labelled statement's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from audit.events import Record
from audit.ledger import LedgerGroup


class SinkError(RuntimeError):
    """A sink could not persist a batch; the message names the sink and the reason."""


@dataclass(slots=True)
class Sealed:
    """One chained event and its ledger entries, ready to store."""

    record: Record
    ledger: tuple[LedgerGroup, ...]
    # The canonical JSON the hash was computed over (every field but "hash"), so a sink that
    # needs the event serialised anyway need not serialise it again.
    canonical: bytes = b""


@runtime_checkable
class Sink(Protocol):
    """A place audit events are written to."""

    name: str
    durable: bool

    async def start(self) -> None:
        """Open files / connections and create tables; raise :class:`SinkError` if impossible."""

    async def head(self, chain_id: str) -> tuple[int, str] | None:
        """The last stored ``(seq, hash)`` of a chain, so a restarted writer continues it."""

    async def write(self, batch: Sequence[Sealed]) -> None:
        """Persist a batch in order; raise :class:`SinkError` when it could not."""

    async def close(self) -> None:
        """Flush and release everything."""
