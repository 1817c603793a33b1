"""Signed end-user names: the application vouches for who each statement is for.

Behind a shared account (the helpdesk's ``crm_app``) the end user is whatever the client
writes in its sqlcommenter comment or ``SET pgwarden.end_user``: an insider with the
account's password can name any colleague and read within their need-to-know.  A subject
with ``end_user_signed: true`` accepts only names the application signed with a key it
shares with pgwarden (the policy's ``end_user_key``), which a person at a SQL console does
not have:

    token = name "~" expires "~" signature
    signature = base64url(HMAC-SHA256(key, "pgwarden-end-user\\0" name "\\0" expires))[:22]

``expires`` is a Unix time in whole seconds; a token is good until then, and for at most
``MAX_TTL_S`` ahead (a stolen token is worth little).  pgwarden replaces the token by the
bare name in the text it sends to PostgreSQL and in its audit trail, so no other session
reads a live token from ``pg_stat_activity`` or the server's log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

MAX_TTL_S = 86_400
_CONTEXT = b"pgwarden-end-user\0"
_SIG_CHARS = 22


def _signature(key: bytes, name: str, expires: str) -> str:
    mac = hmac.new(key, _CONTEXT + name.encode() + b"\0" + expires.encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode()[:_SIG_CHARS]


def sign(key: bytes, name: str, ttl_s: int = 300, now: float | None = None) -> str:
    """A token naming ``name`` for the next ``ttl_s`` seconds (what the application sends)."""
    if not name or "'" in name or "~" in name:
        raise ValueError("an end-user name is not empty and holds no ' or ~")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s is between 1 and {MAX_TTL_S} seconds")
    expires = str(int((time.time() if now is None else now) + ttl_s))
    return f"{name}~{expires}~{_signature(key, name, expires)}"


def verify(key: bytes | None, token: str, now: float | None = None) -> tuple[str | None, str]:
    """(the name, "") for a good token, else (None, why not) in words for the refusal."""
    if key is None:
        return None, "the policy names no end_user_key to check signatures with"
    parts = token.rsplit("~", 2)
    if len(parts) != 3 or not parts[0]:
        return None, "the end-user name is not signed"
    name, expires, sig = parts
    if not expires.isdigit() or len(sig) != _SIG_CHARS:
        return None, "the end-user name is not signed"
    if not hmac.compare_digest(sig, _signature(key, name, expires)):
        return None, "the end-user name's signature is not valid"
    t = time.time() if now is None else now
    if int(expires) < t:
        return None, "the end-user name's signature has expired"
    if int(expires) > t + MAX_TTL_S + 60:
        return None, f"the end-user name's signature is valid for more than {MAX_TTL_S} s"
    return name, ""
