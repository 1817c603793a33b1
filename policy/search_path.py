"""Tracking ``search_path`` the way PostgreSQL computes it, so names resolve as the server does.

A session's path starts from the server default (``"$user", public``), may be set by the
startup packet's ``options`` (``-c search_path=...``) or ``search_path`` parameter, and changes
with ``SET [LOCAL|SESSION] search_path``, ``RESET``, ``SET ... TO DEFAULT`` and
``set_config('search_path', ..., is_local)``. The analyser reports each change in
``QueryFacts.search_path``; the proxy keeps the current value per session.

Public API::

    DEFAULT_SEARCH_PATH
    parse_search_path(value) -> tuple[str, ...]          # the GUC's string form
    search_path_from_options(options) -> tuple | None    # startup 'options' string
    expand_user(path, user) -> tuple[str, ...]           # "$user" -> the role name
"""

from __future__ import annotations

DEFAULT_SEARCH_PATH: tuple[str, ...] = ("$user", "public")


def parse_search_path(value: str) -> tuple[str, ...]:
    """Split a search_path string like PostgreSQL's ``SplitIdentifierString``.

    Unquoted names are lowercased and trimmed, ``"quoted"`` names keep their case, commas
    and spaces inside quotes, and ``""`` for a literal quote.
    """
    out: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i].isspace():
            i += 1
        if i >= n:
            break
        if value[i] == '"':
            i += 1
            buf = []
            while i < n:
                if value[i] == '"':
                    if i + 1 < n and value[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(value[i])
                i += 1
            name = "".join(buf)
        else:
            start = i
            while i < n and value[i] != "," and not value[i].isspace():
                i += 1
            name = value[start:i].lower()
        while i < n and value[i].isspace():
            i += 1
        if name:
            out.append(name)
        if i < n and value[i] == ",":
            i += 1
            continue
        if i < n:
            # Junk after a name: PostgreSQL rejects the whole value; keep what we have.
            break
    return tuple(out)


def search_path_from_options(options: str | None) -> tuple[str, ...] | None:
    """``search_path`` from a startup packet's ``options`` (``-c search_path=a,b`` or
    ``--search_path=a,b``); backslash escapes a space as libpq documents."""
    if not options:
        return None
    words: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(options):
        ch = options[i]
        if ch == "\\" and i + 1 < len(options):
            buf.append(options[i + 1])
            i += 2
            continue
        if ch.isspace():
            if buf:
                words.append("".join(buf))
                buf = []
        else:
            buf.append(ch)
        i += 1
    if buf:
        words.append("".join(buf))
    found: tuple[str, ...] | None = None
    k = 0
    while k < len(words):
        w = words[k]
        setting: str | None = None
        if w == "-c" and k + 1 < len(words):
            setting = words[k + 1]
            k += 1
        elif w.startswith("-c") or w.startswith("--"):
            setting = w[2:]
        if setting is not None and "=" in setting:
            name, _, val = setting.partition("=")
            if name.strip().lower().replace("-", "_") == "search_path":
                found = parse_search_path(val)
        k += 1
    return found


def expand_user(path: tuple[str, ...], user: str | None) -> tuple[str, ...]:
    """Replace ``$user`` by the role name; without one, drop it (it matches no schema)."""
    if "$user" not in path:
        return path
    return tuple((user if s == "$user" else s) for s in path if s != "$user" or user)  # type: ignore[misc]
