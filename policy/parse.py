"""The one place that calls the parser: libpg_query JSON decoded with orjson."""

from __future__ import annotations

from typing import Any

import orjson
from pglast import parser as _pg

ParseError = _pg.ParseError


def parse_json(sql: str) -> dict[str, Any]:
    """The parse tree of ``sql`` as plain dicts (raises ``ParseError`` with a position)."""
    tree: dict[str, Any] = orjson.loads(_pg.parse_sql_json(sql))
    return tree
