"""Statement allow-lists: the shapes an application sends, learned from the audit trail.

A helpdesk sends a few dozen statement shapes all day; an insider with its credentials, or
an agent at a SQL console, sends something else.  A *shape* is the statement's fingerprint
(``QueryFacts.fingerprint``, ``policy.normalize.normalize_and_shape`` with the relations as
resolved): the same whatever the literals, comments (sqlcommenter tags included),
whitespace, keyword case, ``IN`` lists of any length, ``$n`` or literal parameters;
``PREPARE s AS q`` and ``DECLARE c CURSOR FOR q`` take the shape of ``q``, so the simple
protocol, Parse/Bind and SQL ``PREPARE`` agree.  Statements that read different columns or
tables never share one.

``EXECUTE``, ``FETCH``, ``MOVE``, ``CLOSE`` and ``DEALLOCATE`` run what was checked when it
was prepared or declared: they are not shapes of their own.

The file (YAML, written by ``pgwarden policy learn``, reviewed like code)::

    version: 1
    learned: {subjects: [helpdesk], since: ..., until: ..., source: audit.db}
    shapes:
      8f2c...:                 # the fingerprint
        text: SELECT ... WHERE t.ticket_no = $1
        labels: [pii.email]
        max_records: 1         # the most records one statement of it returned
        seen: 1520
        first_seen: 2026-12-07T08:00:01Z
        last_seen: 2026-12-07T17:59:58Z
        # allowed: false       # a reviewer's veto: kept on a re-learn, never allowed

Comments and vetoes survive a re-learn (the file is updated in place, ruamel.yaml).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from policy.facts import QueryFacts

# Statements that run something checked earlier (a prepared statement, a cursor).
EXEMPT_KINDS = frozenset(("execute", "fetch", "move", "close_portal", "deallocate"))
_EXEMPT_WORDS = ("execute", "fetch", "move", "close", "deallocate")


_KEYS = frozenset(("version", "learned", "shapes"))


class AllowListError(ValueError):
    """The file cannot be used; the message names it and the problem."""


@dataclass(frozen=True, slots=True)
class AllowList:
    path: str
    shapes: frozenset[str]  # allowed fingerprints
    texts: Mapping[str, str] = field(default_factory=dict)
    max_records: Mapping[str, int] = field(default_factory=dict)

    def allows(self, facts: QueryFacts) -> bool:
        return facts.kind in EXEMPT_KINDS or facts.fingerprint in self.shapes


_CACHE: dict[str, tuple[tuple[float, int], AllowList]] = {}


def load(path: str | Path) -> AllowList:
    """The allow-list in ``path`` (re-read only when the file changed)."""
    p = str(path)
    try:
        st = os.stat(p)
        stamp = (st.st_mtime, st.st_size)
        hit = _CACHE.get(p)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        data = yaml.safe_load(Path(p).read_text())
    except OSError as exc:
        raise AllowListError(f"{p}: cannot read the allow-list: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AllowListError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != 1 or set(data) - _KEYS:
        raise AllowListError(f"{p}: not a pgwarden allow-list (version: 1 and shapes: ...)")
    shapes = data.get("shapes") or {}
    if not isinstance(shapes, dict):
        raise AllowListError(f"{p}: shapes is a mapping of fingerprint -> entry")
    allowed: set[str] = set()
    texts: dict[str, str] = {}
    most: dict[str, int] = {}
    for fp, entry in shapes.items():
        entry = entry or {}
        if not isinstance(entry, dict):
            raise AllowListError(f"{p}: shape {fp}: an entry is a mapping (text, labels ...)")
        texts[str(fp)] = str(entry.get("text", ""))
        if isinstance(entry.get("max_records"), int):
            most[str(fp)] = entry["max_records"]
        if entry.get("allowed", True) is not False:
            allowed.add(str(fp))
    out = AllowList(p, frozenset(allowed), texts, most)
    _CACHE[p] = (stamp, out)
    return out


def exempt_text(statement: str) -> bool:
    """Whether a statement (normalised text from the trail) runs something checked earlier."""
    head = statement.lstrip().split(None, 1)
    return bool(head) and head[0].lower() in _EXEMPT_WORDS


@dataclass(slots=True)
class Learned:
    """What the trail says about one shape."""

    text: str
    labels: set[str] = field(default_factory=set)
    max_records: int = 0
    seen: int = 0
    first_seen: str = ""
    last_seen: str = ""

    def add(self, labels: Iterable[str], records: int, ts: str) -> None:
        self.labels.update(labels)
        self.max_records = max(self.max_records, records)
        self.seen += 1
        if not self.first_seen or ts < self.first_seen:
            self.first_seen = ts
        if ts > self.last_seen:
            self.last_seen = ts


def write(path: Path, learned: Mapping[str, Learned], meta: Mapping[str, Any]) -> tuple[int, int]:
    """Write (or update in place) the allow-list at ``path``: (shapes added, shapes updated).

    An existing file keeps its comments, its entries' extra keys (``allowed: false``) and
    shapes the new range did not see; counts add up, first/last seen widen."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    ry = YAML()
    ry.width = 4096
    ry.preserve_quotes = True
    if path.exists():
        with path.open() as fh:
            doc = ry.load(fh)
        if not isinstance(doc, dict) or doc.get("version") != 1 or set(doc) - _KEYS:
            raise AllowListError(f"{path}: not a pgwarden allow-list; not overwritten")
    else:
        doc = CommentedMap()
        doc.yaml_set_start_comment(
            "pgwarden allow-list, written by `pgwarden policy learn`. Each entry is a statement\n"
            "shape the subjects may send (its fingerprint, with the normalised text as an\n"
            "example). Review it: delete a shape, or set `allowed: false` to veto it for good;\n"
            "comments survive a re-learn."
        )
        doc["version"] = 1
    doc["learned"] = CommentedMap(meta)
    shapes = doc.get("shapes")
    if shapes is None:
        shapes = doc["shapes"] = CommentedMap()
    added = updated = 0
    for fp in sorted(learned, key=lambda k: learned[k].first_seen):
        got = learned[fp]
        entry = shapes.get(fp)
        if entry is None:
            entry = shapes[fp] = CommentedMap()
            entry["text"] = got.text
            entry["labels"] = sorted(got.labels)
            entry["max_records"] = got.max_records
            entry["seen"] = got.seen
            entry["first_seen"] = got.first_seen
            entry["last_seen"] = got.last_seen
            added += 1
            continue
        entry["labels"] = sorted(set(entry.get("labels") or ()) | got.labels)
        entry["max_records"] = max(int(entry.get("max_records") or 0), got.max_records)
        entry["seen"] = int(entry.get("seen") or 0) + got.seen
        if not entry.get("first_seen") or got.first_seen < str(entry["first_seen"]):
            entry["first_seen"] = got.first_seen
        if got.last_seen > str(entry.get("last_seen") or ""):
            entry["last_seen"] = got.last_seen
        updated += 1
    buf = io.StringIO()
    ry.dump(doc, buf)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)
    _CACHE.pop(str(path), None)
    return added, updated
