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
    return normalize_and_shape(sql)[0]


def normalize_and_shape(sql: str) -> tuple[str, str]:
    """(:func:`normalize`'s text, the statement's shape text) from one scan.

    The shape is what stays when a client varies what it may vary: literals and parameters
    are ``?`` (a cast of one too, a sign before a number too), lists of them one ``?``
    (``IN (1, 2, 3)``, multi-row ``VALUES``), comments gone (sqlcommenter tags), keywords
    upper case (reserved ones; the others may be names), unquoted names lower case (as
    PostgreSQL folds them), whitespace one
    space.  Every name and operator stays: two statements that read different columns
    or tables never share a shape.  (libpg_query's fingerprint does not do for this: it
    takes ``FROM tickets c`` and ``FROM customers c`` for one shape, and LIMIT for OFFSET.)
    """
    try:
        tokens = _pg.scan(sql)
    except Exception:
        norm = _fallback(sql)
        return norm, "x " + norm
    next_param = 1
    if "$" in sql:
        for t in tokens:
            if t.name == "PARAM":
                with contextlib.suppress(ValueError):
                    next_param = max(next_param, int(sql[t.start + 1 : t.end + 1]) + 1)
    out: list[str] = []
    shape: list[str] = []
    put = out.append
    prev_end = -1
    cast = _NOT_A_TYPE  # after '::' of a constant: the type name is skipped
    for t in tokens:
        name = t.name
        if name in _COMMENT_TOKENS:
            continue
        start = t.start
        text = sql[start : t.end + 1]
        if start > prev_end + 1 and out:
            put(" ")
        prev_end = t.end
        constant = name in _LITERAL_TOKENS
        if constant:
            put(f"${next_param}")
            next_param += 1
        else:
            put(text)
        # --- the shape ---
        if cast is not _NOT_A_TYPE:
            cast = _type_part(cast, name, t.kind, text)
            if cast is not _NOT_A_TYPE:
                continue
        if constant or name == "PARAM":
            if shape and shape[-1] in _SIGNS and _unary(shape):
                shape.pop()
            shape.append("?")
            _collapse(shape)
            continue
        if name == "TYPECAST" and shape and shape[-1] == "?":
            cast = _TYPE_START
            continue
        if name == "IDENT":
            if text.startswith('"'):
                inner = text[1:-1]
                text = inner if _LOWER_NAME.fullmatch(inner) else text
            else:
                text = text.lower()
        elif t.kind == "RESERVED_KEYWORD":
            text = text.upper()
        elif t.kind != "NO_KEYWORD":
            text = text.lower()  # an unreserved keyword may be a name: folded like one
        shape.append(text)
        if text == ")":
            _collapse(shape)
    return "".join(out).strip(), " ".join(shape)


_SIGNS = frozenset(("-", "+"))
_LOWER_NAME = re.compile(r"[a-z_][a-z0-9_$]*")
# The state of a cast's type name being skipped: what may come next.
_NOT_A_TYPE = "not a type"
_TYPE_START = "start"  # a type name (or schema) word
_AFTER_WORD = "after a word"  # '.', '(' typmod, '[' or a word the last one continues
_IN_TYPMOD = "in typmod"
_IN_ARRAY = "in array"
# Type names of several words: the words that may follow each.
_TYPE_NEXT: dict[str, frozenset[str]] = {
    "double": frozenset(("precision",)),
    "character": frozenset(("varying",)),
    "char": frozenset(("varying",)),
    "bit": frozenset(("varying",)),
    "national": frozenset(("character", "char")),
    "timestamp": frozenset(("with", "without")),
    "time": frozenset(("with", "without", "zone")),
    "with": frozenset(("time",)),
    "without": frozenset(("time",)),
}
_last_word = ""


def _type_part(state: str, name: str, kind: str, text: str) -> str:
    """The next state of skipping a cast's type, or ``_NOT_A_TYPE`` when this token is no
    part of it (and is shaped as usual)."""
    global _last_word
    word = name == "IDENT" or kind != "NO_KEYWORD"
    if state == _TYPE_START:
        if word:
            _last_word = text.lower()
            return _AFTER_WORD
        return _NOT_A_TYPE
    if state == _AFTER_WORD:
        if name == "ASCII_46":
            return _TYPE_START
        if name == "ASCII_40":
            return _IN_TYPMOD
        if name == "ASCII_91":
            return _IN_ARRAY
        if word and text.lower() in _TYPE_NEXT.get(_last_word, ()):
            _last_word = text.lower()
            return _AFTER_WORD
        return _NOT_A_TYPE
    if state == _IN_TYPMOD:
        return _AFTER_WORD if name == "ASCII_41" else _IN_TYPMOD
    if state == _IN_ARRAY:
        return _AFTER_WORD if name == "ASCII_93" else _IN_ARRAY
    return _NOT_A_TYPE


def _unary(shape: list[str]) -> bool:
    """Whether the sign at the end of ``shape`` is a number's (not a subtraction)."""
    if len(shape) < 2:
        return True
    before = shape[-2]
    operand = (
        before in ("?", ")", "]", "NULL", "TRUE", "FALSE")
        or before[0] in '"_'
        or before[0].islower()
        or before.startswith("CURRENT_")
    )
    return not operand


def _collapse(shape: list[str]) -> None:
    """``? , ?`` -> ``?`` and ``( ? ) , ( ? )`` -> ``( ? )`` at the end of ``shape``."""
    while True:
        if len(shape) >= 3 and shape[-1] == "?" and shape[-2] == "," and shape[-3] == "?":
            del shape[-2:]
        elif shape[-7:] == ["(", "?", ")", ",", "(", "?", ")"]:
            del shape[-4:]
        else:
            return


def _fallback(sql: str) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group("comment"):
            return " "
        if m.group("ident") or m.group("param"):
            return m.group(0)
        return "?"

    return " ".join(_FALLBACK_RE.sub(repl, sql).split())


def fingerprint(sql: str, shape: str | None = None) -> str:
    """A statement's shape (:func:`normalize_and_shape`) as a short hash: the same for
    statements that differ only in what a client may vary."""
    text = shape if shape is not None else normalize_and_shape(sql)[1]
    # A byte that is not UTF-8 arrives as a surrogate (surrogateescape): hash it as that
    # byte, or the session ends on a UnicodeEncodeError.
    raw = text.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(raw, digest_size=8).hexdigest()
