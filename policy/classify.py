"""Suggest labels for columns from their names and from sampled values.

``pgwarden classify --dsn DSN [--sample N] [--out FILE]`` samples every text-like column of
every user table, runs the detectors below over the values, and writes a YAML labels file
(the layout ``LabelRules.from_yaml`` reads) for a person to review. Evidence shows the share
of sampled values that matched and masked examples: raw values are never printed in full.

Public API::

    detect(value) -> set[str]                      # labels one value looks like
    classify_values(values, column_name) -> list[Suggestion]
    await sample_database(conn, sample=200) -> list[ColumnSample]
    suggest(samples) -> list[Suggestion]
    labels_yaml(suggestions) -> str
    mask(value) -> str
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import yaml

# Share of non-empty sampled values that must match before a detector speaks.
VALUE_THRESHOLD = 0.6

_EMAIL = re.compile(r"^[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$")
_PHONE_CHARS = re.compile(r"^\+?[\d\s().\-/]{7,24}$")
_CARD_CHARS = re.compile(r"^\d[\d \-]{11,22}\d$")
_NAME = re.compile(
    r"^[A-Z\u00C0-\u00DE][a-z\u00DF-\u00FF'\u2019-]+"
    r"(?:\s+(?:(?:van|von|de|der|den|da|di|le|la|du|del|ten|ter|bin|al)\s+)*"
    r"[A-Z\u00C0-\u00DE][a-z\u00DF-\u00FF'\u2019-]+){1,3}$"
)
_STREET_WORDS = (
    r"street|st|road|rd|avenue|ave|lane|ln|boulevard|blvd|drive|dr|way|court|ct|place|pl|"
    r"square|sq|terrace|crescent|close|straat|str|weg|laan|plein|gracht|kade|strasse|straße|"
    r"gasse|allee|rue|via|calle|avenida"
)
_STREET = re.compile(
    rf"(?:^\d+[a-z]?\s+(?:[\w'.-]+\s+)*?(?:{_STREET_WORDS})\.?\b)"
    rf"|(?:^(?:[\w'.-]+\s+)+(?:{_STREET_WORDS})\.?\s+\d+[a-z]?\b)"
    rf"|(?:^[\w'.-]*(?:straat|weg|laan|strasse|straße|gasse|gracht|kade|plein|singel|dijk|steeg)\s+\d+)",
    re.IGNORECASE,
)

# Common given names (several languages): a capitalised pair of words is a personal name
# only when it starts with one of these, or when the column's name says it holds names.
GIVEN_NAMES = frozenset(
    [
        "aaron",
        "adam",
        "ahmed",
        "aisha",
        "alan",
        "albert",
        "alex",
        "alexander",
        "alice",
        "amanda",
        "amy",
        "ana",
        "andrea",
        "andrew",
        "angela",
        "ann",
        "anna",
        "anne",
        "anthony",
        "antonio",
        "barbara",
        "ben",
        "benjamin",
        "bob",
        "brian",
        "carl",
        "carlos",
        "carol",
        "caroline",
        "catherine",
        "charles",
        "charlotte",
        "chris",
        "christian",
        "christina",
        "christopher",
        "claire",
        "daniel",
        "david",
        "deborah",
        "dennis",
        "diana",
        "donna",
        "dorothy",
        "edward",
        "elena",
        "elizabeth",
        "emily",
        "emma",
        "eric",
        "eva",
        "fatima",
        "frank",
        "george",
        "hannah",
        "hans",
        "harry",
        "helen",
        "henry",
        "ian",
        "isabel",
        "jack",
        "james",
        "jan",
        "jane",
        "janet",
        "jason",
        "jean",
        "jennifer",
        "jessica",
        "joe",
        "johan",
        "john",
        "jonathan",
        "jose",
        "joseph",
        "joshua",
        "juan",
        "julia",
        "julie",
        "karen",
        "kate",
        "kenneth",
        "kevin",
        "kim",
        "laura",
        "lars",
        "lisa",
        "linda",
        "lucas",
        "lucy",
        "luis",
        "maria",
        "mark",
        "martin",
        "mary",
        "matthew",
        "michael",
        "michelle",
        "mohammed",
        "nancy",
        "nicole",
        "olivia",
        "omar",
        "oscar",
        "patricia",
        "paul",
        "peter",
        "pierre",
        "rachel",
        "richard",
        "robert",
        "ronald",
        "rosa",
        "ryan",
        "sam",
        "samuel",
        "sandra",
        "sarah",
        "sophie",
        "stephen",
        "steven",
        "susan",
        "thomas",
        "tim",
        "timothy",
        "tom",
        "wei",
        "william",
        "yuki",
        "zoe",
    ]
)

# Column names that say what a column holds, strongest first.
_NAME_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|_)e_?mail(_address)?($|_)"), "pii.email"),
    (re.compile(r"(^|_)(phone|mobile|cell|tel|telephone|fax)(_?number|_no)?($|_)"), "pii.phone"),
    (re.compile(r"(^|_)(full_?name|first_?name|last_?name|surname|given_?name|family_?name)$"),
     "pii.name"),
    (re.compile(r"(^|_)(street|address(_line\d?)?|addr|city|town|postcode|post_code|zip(_?code)?)$"),
     "pii.address"),
    (re.compile(r"(^|_)(ip|ip_?addr(ess)?|client_?ip|remote_?addr)$"), "pii.ip"),
    (re.compile(r"(^|_)(card_?number|cc_?number|pan|credit_?card)$"), "pii.card"),
    (re.compile(r"(^|_)ticket_?(number|no|ref)$"), "support.ticket"),
)  # fmt: skip


def luhn_ok(digits: str) -> bool:
    """The Luhn check digit test that payment card numbers pass."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def detect(value: str, names_by_shape: bool = False) -> set[str]:
    """Labels a single value looks like (usually none or one).

    A value shaped like "Ann Example" counts as a personal name only when its first word is
    a common given name, unless ``names_by_shape`` (the column's name already says names).
    """
    v = value.strip()
    if not v or len(v) > 320:
        return set()
    found: set[str] = set()
    if "@" in v and _EMAIL.match(v):
        found.add("pii.email")
        return found
    digits = re.sub(r"\D", "", v)
    if _CARD_CHARS.match(v) and 13 <= len(digits) <= 19 and luhn_ok(digits):
        found.add("pii.card")
    elif (
        _PHONE_CHARS.match(v)
        and 7 <= len(digits) <= 15
        and not _looks_like_date(v)
        # Bare integers are ids more often than phone numbers: ask for + or separators.
        and (v.startswith("+") or re.search(r"[\s().\-/]", v) or v.startswith("0"))
    ):
        found.add("pii.phone")
    if (":" in v or v.count(".") == 3) and _is_ip(v):
        found.add("pii.ip")
    if _NAME.match(v) and (names_by_shape or v.split()[0].lower() in GIVEN_NAMES):
        found.add("pii.name")
    if any(ch.isdigit() for ch in v) and _STREET.search(v):
        found.add("pii.address")
    return found


def _looks_like_date(v: str) -> bool:
    return bool(re.match(r"^\d{4}-\d{2}-\d{2}", v) or re.match(r"^\d{2}[./-]\d{2}[./-]\d{4}$", v))


def _is_ip(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


def name_hint(column: str) -> str | None:
    """The label a column's name suggests, if any."""
    c = column.lower()
    for rx, label in _NAME_HINTS:
        if rx.search(c):
            return label
    return None


def mask(value: str) -> str:
    """Enough of a value to recognise its shape, never the value itself."""
    v = value.strip()
    if "@" in v:
        local, _, domain = v.partition("@")
        parts = domain.split(".")
        return f"{local[:1]}***@{parts[0][:1]}***." + ".".join(parts[1:])
    out = []
    for i, ch in enumerate(v):
        if i < 2 or ch in " -.,()+:/" or (i >= len(v) - 1 and len(v) > 8):
            out.append(ch)
        else:
            out.append("#" if ch.isdigit() else "*")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ColumnSample:
    schema: str
    table: str
    column: str
    type_name: str
    values: tuple[str, ...]
    existing_labels: frozenset[str] = frozenset()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"


@dataclass(frozen=True, slots=True)
class Suggestion:
    column: str  # schema.table.column
    label: str
    share: float  # of sampled non-empty values that matched (0 when from the name only)
    sampled: int
    by_name: bool
    examples: tuple[str, ...] = field(default=())  # masked
    already_labelled: bool = False
    embedded_in: bool = False  # found inside longer text rather than as the whole value

    @property
    def evidence(self) -> str:
        parts = []
        if self.sampled and self.embedded_in:
            parts.append(f"{self.share:.0%} of {self.sampled} sampled values contain one")
        elif self.sampled and self.share > 0:
            parts.append(f"{self.share:.0%} of {self.sampled} sampled values match")
        elif self.sampled:
            parts.append(f"no detector for this label matched the {self.sampled} sampled values")
        if self.by_name:
            parts.append("column name")
        if self.already_labelled:
            parts.append("already labelled in a column comment")
        return "; ".join(parts)


# Free text (ticket bodies, notes, JSON) that carries personal data inside it.
EMBEDDED_THRESHOLD = 0.2
_EMBEDDED_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_EMBEDDED_PHONE = re.compile(r"(?<![\w+])\+\d{1,3}[ \-]?(?:\(?\d+\)?[ \-]?){2,6}\d(?!\w)")
_EMBEDDED_CARD = re.compile(r"(?<!\d)\d(?:[ \-]?\d){12,18}(?!\d)")


def embedded(value: str) -> set[str]:
    """Labels of personal data found *inside* a longer value (not the whole value)."""
    found: set[str] = set()
    if _EMBEDDED_EMAIL.search(value):
        found.add("pii.email")
    for m in _EMBEDDED_PHONE.finditer(value):
        if 7 <= sum(ch.isdigit() for ch in m.group(0)) <= 15:
            found.add("pii.phone")
            break
    for m in _EMBEDDED_CARD.finditer(value):
        if luhn_ok(re.sub(r"\D", "", m.group(0))):
            found.add("pii.card")
            break
    return found


def classify_values(
    values: Sequence[str], column: str, qualified: str | None = None
) -> list[Suggestion]:
    """Suggestions for one column from its name and sampled values."""
    nonempty = [v for v in values if v and v.strip()]
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    hint = name_hint(column)
    inside: dict[str, int] = {}
    for v in nonempty:
        whole = detect(v, names_by_shape=hint == "pii.name")
        for label in whole:
            counts[label] = counts.get(label, 0) + 1
            ex = examples.setdefault(label, [])
            if len(ex) < 3:
                ex.append(mask(v))
        if len(v) > 24:
            for label in embedded(v) - whole:
                inside[label] = inside.get(label, 0) + 1
    out: list[Suggestion] = []
    n = len(nonempty)
    for label, k in sorted(counts.items()):
        share = k / n
        if share >= VALUE_THRESHOLD or (label == hint and share >= 0.2):
            out.append(
                Suggestion(
                    qualified or column, label, share, n, label == hint, tuple(examples[label])
                )
            )
    for label, k in sorted(inside.items()):
        if k / n >= EMBEDDED_THRESHOLD and not any(s.label == label for s in out):
            out.append(Suggestion(qualified or column, label, k / n, n, False, embedded_in=True))
    if hint and not any(s.label == hint for s in out):
        # A telling name with no contradicting values (or none sampled): still worth a look.
        share = counts.get(hint, 0) / n if n else 0.0
        if n == 0 or share > 0 or hint in ("pii.address", "support.ticket", "pii.name"):
            out.append(Suggestion(qualified or column, hint, share, n, True))
    return out


def suggest(samples: Iterable[ColumnSample]) -> list[Suggestion]:
    out: list[Suggestion] = []
    for s in samples:
        for sug in classify_values(s.values, s.column, s.qualified):
            if sug.label in s.existing_labels:
                sug = replace(sug, already_labelled=True)
            out.append(sug)
    return out


def labels_yaml(suggestions: Iterable[Suggestion], source: str = "") -> str:
    """The labels file a person reviews (``LabelRules.from_yaml`` reads it)."""
    entries: list[dict[str, Any]] = [
        {"column": s.column, "label": s.label, "evidence": s.evidence} for s in suggestions
    ]
    header = (
        "# Labels suggested by `pgwarden classify`"
        + (f" from {source}" if source else "")
        + f" on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n"
        "# Review every entry: remove wrong ones, add what the sample missed.\n"
    )
    return header + yaml.safe_dump({"labels": entries}, sort_keys=False, allow_unicode=True)


_TEXTLIKE = (
    "text", "character varying", "character", "citext", "inet", "cidr", "varchar", "bpchar",
    "bigint", "numeric", "json", "jsonb",
)  # fmt: skip

_COLUMNS_SQL = """
SELECT n.nspname AS schema, c.relname AS table, a.attname AS column,
       pg_catalog.format_type(a.atttypid, a.atttypmod) AS type_name,
       pg_catalog.col_description(c.oid, a.attnum) AS comment,
       c.reltuples::float8 AS reltuples
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm', 'f') AND a.attnum > 0 AND NOT a.attisdropped
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY n.nspname, c.relname, a.attnum
"""


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def sample_database(conn: Any, sample: int = 200) -> list[ColumnSample]:
    """Sample up to ``sample`` non-null values of every text-like column (read-only)."""
    from policy.labels import parse_comment_labels

    out: list[ColumnSample] = []
    async with conn.transaction(readonly=True):
        rows = await conn.fetch(_COLUMNS_SQL)
        for r in rows:
            type_name = str(r["type_name"])
            if not type_name.startswith(_TEXTLIKE):
                continue
            table = f"{_quote_ident(r['schema'])}.{_quote_ident(r['table'])}"
            col = _quote_ident(r["column"])
            # Big tables: a block sample keeps this cheap; small ones are read from the start.
            sampling = ""
            if r["reltuples"] and r["reltuples"] > sample * 20:
                pct = min(100.0, max(0.01, 100.0 * sample * 5 / float(r["reltuples"])))
                sampling = f" TABLESAMPLE SYSTEM ({pct:.4f})"
            values = await conn.fetch(
                f"SELECT {col}::text AS v FROM {table}{sampling} WHERE {col} IS NOT NULL LIMIT $1",
                sample,
            )
            out.append(
                ColumnSample(
                    str(r["schema"]),
                    str(r["table"]),
                    str(r["column"]),
                    type_name,
                    tuple(str(v["v"]) for v in values),
                    parse_comment_labels(r["comment"]),
                )
            )
    return out
