"""Scrub anything literal-like from statement text before it is stored.

The SQL analyser already hands the audit pipeline normalised text with literals replaced by
placeholders.  This is the second line of defence for when it did not (a statement that would
not parse, a new code path, a bug): the audit trail must not become a second copy of customer
data, nor of passwords.  It is a tokenizer-shaped regular expression rather than a parser so
that it cannot fail: whatever comes in, something safe comes out.
"""

from __future__ import annotations

import re
from functools import lru_cache

PLACEHOLDER = "?"

# One alternation, scanned left to right, so a quote inside a comment or a comment marker
# inside a string is consumed by whichever token starts first -- as PostgreSQL's lexer does.
_TOKENS = re.compile(
    r"""
    (?P<password>\bPASSWORD\b.*)                      # ALTER ROLE .. PASSWORD '..': drop the rest
  | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))            # comments may carry data (sqlcommenter)
  | (?P<estring>(?<![\w$])[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z))   # E'..' with backslash escapes
  | (?P<string>(?<![\w$])(?:[uU]&|[bBxXnN])?'(?:[^']|'')*(?:'|\Z))  # '..', U&'..', B'..', X'..'
  | (?P<dollar>\$(?P<tag>[A-Za-z_\x80-\uffff][\w\x80-\uffff]*|)\$.*?(?:\$(?P=tag)\$|\Z))
  | (?P<param>\$\d+)                                  # $1: a bind placeholder, keep it
  | (?P<ident>"(?:[^"]|"")*"|[A-Za-z_\x80-\uffff][\w$\x80-\uffff]*)  # keep identifiers whole
  | (?P<number>(?:0[xXoObB][0-9a-fA-F_]+|\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)
    """,
    re.VERBOSE | re.DOTALL | re.IGNORECASE,
)

# Anything that still looks like an e-mail address (say, in a quoted identifier).
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def _replace(m: re.Match[str]) -> str:
    kind = m.lastgroup
    if kind == "password":
        return "PASSWORD " + PLACEHOLDER
    if kind == "comment":
        return ""
    if kind in ("string", "estring", "dollar", "number"):
        return PLACEHOLDER
    if kind == "tag":  # pragma: no cover - the tag group is nested in "dollar"
        return PLACEHOLDER
    return m.group(0)


@lru_cache(maxsize=8192)
def redact_sql(text: str) -> str:
    """Replace literals, comments and anything after ``PASSWORD`` with ``?``.

    Cached because applications repeat the same normalised statements.
    """
    out = _TOKENS.sub(_replace, text.replace("\x00", ""))
    if "@" in out:
        out = _EMAIL.sub(PLACEHOLDER, out)
    return out.strip()


# Messages are mostly pgwarden's own sentences ("returned 5000 rows, limit 1000"), whose
# numbers matter; but a server error passed through can quote data, as PostgreSQL's
# 'Key (email)=(alice@example.com) already exists' does.  So: quoted text, the value part
# of "(...)=(...)", anything after PASSWORD, and e-mail addresses.
_MESSAGE = re.compile(
    r"(?P<password>\bPASSWORD\b.*)|(?P<string>'(?:[^']|'')*(?:'|\Z))|(?P<value>=\((?:[^()]|\([^()]*\))*\))",
    re.IGNORECASE | re.DOTALL,
)


def _replace_message(m: re.Match[str]) -> str:
    kind = m.lastgroup
    if kind == "password":
        return "PASSWORD " + PLACEHOLDER
    if kind == "value":
        return "=(" + PLACEHOLDER + ")"
    return PLACEHOLDER


def redact_message(text: str) -> str:
    """Scrub data a message may quote (see above) while keeping its numbers."""
    out = _MESSAGE.sub(_replace_message, text.replace("\x00", ""))
    if "@" in out:
        out = _EMAIL.sub(PLACEHOLDER, out)
    return out
