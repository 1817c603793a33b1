"""Masking of text-format values: what an analytics role sees instead of contact data."""

from __future__ import annotations

import hashlib
import hmac


def mask_value(value: bytes, style: str, key: bytes) -> bytes:
    """Mask one text value.

    * ``redact``: ``****``;
    * ``partial``: first and last character kept (``a***e``), and an email keeps its domain
      (``a***e@example.com``) so support analytics can still group by provider;
    * ``hash``: a keyed hash — equal inputs give equal outputs (joins and counts still work),
      nothing readable remains, and without the key it cannot be brute-forced from a phone
      number list.
    """
    if style == "redact":
        return b"****"
    if style == "hash":
        return b"h:" + hmac.new(key, value, hashlib.sha256).hexdigest()[:16].encode()
    text = value.decode("utf-8", "replace")
    local, at, domain = text.partition("@")
    if not at:
        local, domain = text, ""
    masked = "*" * len(local) if len(local) <= 2 else local[0] + "*" * (len(local) - 2) + local[-1]
    return (masked + (at + domain if at else "")).encode()
