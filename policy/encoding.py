"""Client encodings in which PostgreSQL and pgwarden read one statement alike.

pgwarden reads SQL as UTF-8.  PostgreSQL reads a client's bytes in its ``client_encoding``.
In every encoding PostgreSQL can use for a database, an ASCII byte is always an ASCII
character, as in UTF-8, so quotes, backslashes and every other character of the statement's
structure read the same either way (bytes that are not UTF-8 are refused as such by the
analysis).  In the client-only encodings (SJIS, BIG5, GBK, UHC, GB18030, JOHAB,
SHIFT_JIS_2004) the second byte of a character can be a backslash or a quote: there the two
readings can differ.  A positive list: the encodings known to keep ASCII bytes ASCII.
"""

from __future__ import annotations

# PostgreSQL's server-side encodings (pg_enc2name_tbl up to PG_ENCODING_BE_LAST), and the
# ISO 8859 names of the LATIN ones, compared as PostgreSQL compares names (encoding_key).
ASCII_SAFE_ENCODINGS = frozenset((
    "UTF8", "UNICODE", "SQLASCII", "MULEINTERNAL",
    "EUCJP", "EUCCN", "EUCKR", "EUCTW", "EUCJIS2004",
    "LATIN1", "LATIN2", "LATIN3", "LATIN4", "LATIN5", "LATIN6", "LATIN7", "LATIN8",
    "LATIN9", "LATIN10",
    "ISO88591", "ISO88592", "ISO88593", "ISO88594", "ISO88599", "ISO885910", "ISO885913",
    "ISO885914", "ISO885915", "ISO885916",
    "ISO88595", "ISO88596", "ISO88597", "ISO88598",
    "WIN866", "WIN874", "WIN1250", "WIN1251", "WIN1252", "WIN1253", "WIN1254", "WIN1255",
    "WIN1256", "WIN1257", "WIN1258",
    "KOI8R", "KOI8U",
))  # fmt: skip


def encoding_key(name: str) -> str:
    """An encoding name as PostgreSQL compares them: letters and digits, upper case."""
    return "".join(ch for ch in name if ch.isalnum()).upper()


def foreign_encoding(client: str | None) -> str | None:
    """The client_encoding, when PostgreSQL could read a client's SQL with another structure
    than pgwarden does (an encoding not known to keep ASCII bytes ASCII); else None."""
    if not client or encoding_key(client) in ASCII_SAFE_ENCODINGS:
        return None
    return client
