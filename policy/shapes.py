"""Statement shapes: the key under which texts that differ only inside literals share their
facts (``shape_key``), and whether a statement's facts may be shared so (``shape_reusable``).

Applications that inline values (``WHERE aid = 48121``) send a new text for every statement,
and analysing each from scratch costs ~100 us.  Two texts that differ only inside literals
have the same lineage, unless a literal *names* something: SQL in query_to_xml('...'), a
setting in set_config('search_path', ...), a file, a sequence.  So a shape is shared only

* when the text is lexically plain: no comments, no dollar quoting or parameters, no
  backslashes (no escape-string rules), a single statement; anything else is analysed in
  full, so no lexing subtlety can make two different statements look alike; and
* when the facts are of a plain query (SELECT/INSERT/UPDATE/DELETE), fully analysed,
  changing no setting, calling only functions from an allowlist of value functions.

The blanked key keeps everything but the contents of '...' literals and numbers verbatim,
double-quoted identifiers included.
"""

from __future__ import annotations

import re

from policy.facts import QueryFacts

# Written so that every alternative starts with a character (a quote or a digit): the regex
# engine then skips to the next such character instead of trying each position, and a quoted
# run is consumed a stretch at a time rather than a character at a time (twice as fast on
# the support workload's texts; the same matches: the digit's look-behind checks the
# character before the number, as ``(?<![\w$"])\d+`` did).
_SHAPE_TOKEN = re.compile(
    r"""'[^']*(?:''[^']*)*'|"[^"]*(?:""[^"]*)*"|\d(?<![\w$"]\d)\d*(?:\.\d+)?(?:[eE][+-]?\d+)?"""
)

# The same without quoted identifiers, for the common text that has none: a plain
# replacement, with no Python callback per literal.
_SHAPE_LITERAL = re.compile(
    r"""'[^']*(?:''[^']*)*'|\d(?<![\w$"]\d)\d*(?:\.\d+)?(?:[eE][+-]?\d+)?"""
)

# The text before a final /* ... */ (no '*' inside it) and an optional ';' after it.
_TRAILING_COMMENT = re.compile(r"(?s)^(.*?)\s*/\*[^*]*\*/\s*(;?)\s*$")
_SHAPE_UNSAFE = re.compile(r"/\*|--|\$|\\|;.*\S", re.DOTALL)
_SHAPE_KINDS = frozenset({"select", "insert", "update", "delete"})
SHAPE_SAFE_FUNCTIONS = frozenset({
    "count", "sum", "avg", "min", "max", "lower", "upper", "coalesce", "nullif", "greatest",
    "least", "length", "char_length", "trim", "btrim", "ltrim", "rtrim", "substr", "substring",
    "left", "right", "concat", "concat_ws", "replace", "abs", "round", "floor", "ceil",
    "now", "current_date", "current_timestamp", "date_trunc", "date_part", "extract", "age",
    "to_char", "to_date", "to_timestamp", "position", "strpos", "split_part", "initcap",
    "bool_and", "bool_or", "every", "row_number", "rank", "dense_rank", "random",
    # Pure text, number and date helpers: a literal argument cannot change what is read.
    "lpad", "rpad", "reverse", "repeat", "translate", "starts_with", "md5", "to_number",
    "format", "octet_length", "bit_length", "mod", "power", "sqrt", "trunc", "sign",
    "make_date", "make_time", "make_timestamp", "make_timestamptz", "make_interval",
    "date_bin", "justify_days", "justify_hours", "array_length", "cardinality",
})  # fmt: skip


def shape_key(sql: str) -> str | None:
    """The text with literal contents blanked, or None when the text is not plain enough.

    A trailing comment (sqlcommenter's ``/* end_user='alice' */``, which applications add to
    every statement) is dropped first: the parser ignores it, so facts cannot depend on it,
    and the rest of the text must pass the same checks as any other."""
    if len(sql) > 8192:
        return None
    if sql.rstrip().endswith(("*/", "*/;")):
        m = _TRAILING_COMMENT.match(sql)
        if m is None:
            return None
        sql = m.group(1) + m.group(2)
    if _SHAPE_UNSAFE.search(sql) or sql.count("'") % 2 or sql.count('"') % 2:
        return None
    if '"' not in sql:
        return _SHAPE_LITERAL.sub("?", sql)
    return _SHAPE_TOKEN.sub(lambda m: m.group(0) if m.group(0)[0] == '"' else "?", sql)


def shape_reusable(facts: tuple[QueryFacts, ...]) -> bool:
    """Whether these facts hold for every text of the same shape (see above)."""
    if len(facts) != 1:
        return False
    f = facts[0]
    return (
        f.kind in _SHAPE_KINDS
        and f.unanalysable is None
        and f.search_path is None
        and not f.is_ddl
        and not f.copies
        and not f.user_functions
        and all(fn.rsplit(".", 1)[-1] in SHAPE_SAFE_FUNCTIONS for fn in f.functions)
    )
