"""Statement text for the audit trail: literals replaced by placeholders, and a fingerprint.

The audit trail must not become a second copy of the data, so :func:`normalize` removes every
literal (strings in any quoting, numbers, bit strings) and every comment. It works on the
token stream of PostgreSQL's own scanner (``pglast.parser.scan``) rather than on the parse
tree, because libpg_query's ``normalize`` leaves literals in utility statements (``PREPARE ...
AS SELECT 'x'``, ``COMMENT ... IS '...'``, column defaults) and fails on text that does not
parse. When even the scanner fails (an unterminated quote), a regular-expression redactor
takes over: it errs on the side of removing too much.
"""

from __future__ import annotations

import contextlib
import hashlib
import re

from pglast import parser as _pg

_LITERAL_TOKENS = frozenset({"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"})
_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})

_FALLBACK_RE = re.compile(
    r"""
      (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$.*?(?:\$(?P=tag)?\$|\Z))
    | (?P<string>[EeBbXxNn]?(?:[Uu]&)?'(?:[^']|'')*(?:'|\Z))
    | (?P<ident>"(?:[^"]|"")*(?:"|\Z))
    | (?P<param>\$\d+)
    | (?P<number>(?<![\w$])(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    """,
    re.VERBOSE | re.DOTALL,
)


def normalize(sql: str) -> str:
    """``sql`` with every literal replaced by ``$n`` and comments dropped.

    Placeholders are numbered after the highest ``$n`` parameter the text already has, so
    the result stays valid SQL and keeps distinct literals distinct.
    """
    try:
        tokens = _pg.scan(sql)
    except Exception:
        return _fallback(sql)
    next_param = 1
    for t in tokens:
        if t.name == "PARAM":
            with contextlib.suppress(ValueError):
                next_param = max(next_param, int(sql[t.start + 1 : t.end + 1]) + 1)
    out: list[str] = []
    prev_end = -1
    for t in tokens:
        name = t.name
        if name in _COMMENT_TOKENS:
            continue
        if out and t.start > prev_end + 1:
            out.append(" ")
        if name in _LITERAL_TOKENS:
            out.append(f"${next_param}")
            next_param += 1
        else:
            out.append(sql[t.start : t.end + 1])
        prev_end = t.end
    return "".join(out).strip()


def _fallback(sql: str) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group("comment"):
            return " "
        if m.group("ident") or m.group("param"):
            return m.group(0)
        return "?"

    return " ".join(_FALLBACK_RE.sub(repl, sql).split())


def fingerprint(sql: str, normalized: str | None = None) -> str:
    """libpg_query's fingerprint (same for statements differing only in literals).

    For text PostgreSQL cannot parse, a hash of the normalised text, prefixed ``x`` so the two
    kinds never collide.
    """
    try:
        return str(_pg.fingerprint(sql))
    except Exception:
        text = normalized if normalized is not None else normalize(sql)
        # A byte that is not UTF-8 arrives as a surrogate (surrogateescape): hash it as
        # that byte, or the session ends on a UnicodeEncodeError.
        raw = text.encode("utf-8", "surrogateescape")
        return "x" + hashlib.blake2b(raw, digest_size=8).hexdigest()
