"""Sensitivity labels of columns.

A label (``pii.email``, ``support.ticket`` ...) reaches a column in two ways:

* a glob rule on ``schema.table.column`` in a :class:`LabelRules` (the policy file, or the
  YAML file ``pgwarden classify`` writes for a person to review);
* a column comment ``COMMENT ON COLUMN ... IS 'pgwarden: pii.email, pii.name'``, so the labels
  travel with the database (:func:`parse_comment_labels`).

Public API::

    LabelRules(rules=(("public.customers.email", "pii.email"), ...))
    LabelRules.from_mapping(data) / LabelRules.from_yaml(path)
    rules.labels_for(schema, table, column) -> frozenset[str]
    parse_comment_labels(comment) -> frozenset[str]
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A label is dotted lowercase words; anything else in a comment is prose, not a label.
_LABEL = r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*"
_COMMENT_RE = re.compile(r"pgwarden:\s*(" + _LABEL + r"(?:\s*,\s*" + _LABEL + r")*)", re.IGNORECASE)
LABEL_RE = re.compile(r"^" + _LABEL + r"$")


def parse_comment_labels(comment: str | None) -> frozenset[str]:
    """Labels named in a column comment: ``'pgwarden: pii.email, pii.name'``.

    The marker may sit anywhere in the comment (people keep their own prose around it) and may
    appear more than once; labels are lowercased.
    """
    if not comment:
        return frozenset()
    found: set[str] = set()
    for m in _COMMENT_RE.finditer(comment):
        found.update(part.strip().lower() for part in m.group(1).split(","))
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class LabelRules:
    """Glob patterns on ``schema.table.column`` and the label each assigns.

    Patterns use :mod:`fnmatch` syntax (``*``, ``?``, ``[..]``) and match case-sensitively
    against PostgreSQL's own spelling of names (unquoted names are lowercase there). A
    pattern with two parts (``table.column``) matches that table in any schema.
    """

    rules: tuple[tuple[str, str], ...] = ()
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = field(
        init=False, repr=False, compare=False, default=()
    )
    _memo: dict[tuple[str, str, str], frozenset[str]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        compiled = []
        for pattern, label in self.rules:
            if not LABEL_RE.match(label):
                raise ValueError(f"label {label!r} is not a dotted lowercase name like pii.email")
            if pattern.count(".") == 1:
                pattern = "*." + pattern
            compiled.append((re.compile(fnmatch.translate(pattern)), label))
        object.__setattr__(self, "_compiled", tuple(compiled))

    def __hash__(self) -> int:
        return hash(self.rules)

    def labels_for(self, schema: str, table: str, column: str) -> frozenset[str]:
        """The labels the rules give ``schema.table.column`` (memoised: hot path)."""
        key = (schema, table, column)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        name = f"{schema}.{table}.{column}"
        labels = frozenset(label for rx, label in self._compiled if rx.match(name))
        if len(self._memo) < 100_000:
            self._memo[key] = labels
        return labels

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(label for _p, label in self.rules)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> LabelRules:
        return cls(rules=tuple(pairs))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> LabelRules:
        """Build rules from the labels file layout::

        labels:
          - column: public.customers.email     # glob allowed
            label: pii.email                   # or labels: [a, b]
        """
        pairs: list[tuple[str, str]] = []
        for i, entry in enumerate(data.get("labels") or ()):
            if not isinstance(entry, Mapping) or "column" not in entry:
                raise ValueError(f"labels[{i}] needs a 'column' pattern")
            names = entry.get("labels") or [entry.get("label")]
            for name in names:
                if not isinstance(name, str):
                    raise ValueError(f"labels[{i}] needs 'label' or 'labels'")
                pairs.append((str(entry["column"]), name))
        return cls(rules=tuple(pairs))

    @classmethod
    def from_yaml(cls, path: str | Path) -> LabelRules:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping with a 'labels' list")
        return cls.from_mapping(data)
