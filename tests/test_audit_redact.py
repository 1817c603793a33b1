"""The redact step leaves no literal behind, whatever quoting the statement uses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.redact import redact_message, redact_sql

CASES = [
    ("SELECT * FROM customers WHERE email = 'alice@example.com'",
     "SELECT * FROM customers WHERE email = ?"),
    ("select * from t where id = 12345 and x = -1.5e3", "select * from t where id = ? and x = -?"),
    ("ALTER ROLE bob PASSWORD 'hunter2' VALID UNTIL 'infinity'", "ALTER ROLE bob PASSWORD ?"),
    ("CREATE USER x WITH ENCRYPTED password 'md5abc'", "CREATE USER x WITH ENCRYPTED PASSWORD ?"),
    ("SELECT E'it\\'s alice@example.com', $$x$$, $tag$ a $ b $tag$", "SELECT ?, ?, ?"),
    ("SELECT U&'d\\0061t', B'1010', X'ff', N'x'", "SELECT ?, ?, ?, ?"),
    ("SELECT a FROM t WHERE b = $1 AND c = $2", "SELECT a FROM t WHERE b = $1 AND c = $2"),
    ("SELECT col_2, t1.x::int4 FROM t1", "SELECT col_2, t1.x::int4 FROM t1"),
    ("SELECT 1 /* user=alice@example.com */ -- 'x'\n+ 2", "SELECT ?  \n+ ?"),
    ("SELECT 'unterminated alice@example.com", "SELECT ?"),
    ('SELECT "alice@example.com" FROM t', 'SELECT "?" FROM t'),
    ("SELECT 'it''s' || 'x'", "SELECT ? || ?"),
    ("SELECT 0x1F, 1_000_000, .5", "SELECT ?, ?, ?"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "expected"), CASES)
def test_redact_table(sql: str, expected: str) -> None:
    assert redact_sql(sql) == expected


_secret = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=6, max_size=20)


@st.composite
def literal(draw: st.DrawFn) -> str:
    """One way of writing a random secret as a literal in SQL."""
    s = draw(_secret)
    form = draw(st.sampled_from(["plain", "estring", "dollar", "tagged"]))
    if form == "plain":
        return "'" + s.replace("'", "''") + "'"
    if form == "estring":
        return "E'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if form == "dollar":
        return "$$" + s.replace("$", "") + "$$"
    return "$q$" + s.replace("$", "") + "$q$"


BEFORE = st.sampled_from(["SELECT ", "SELECT a FROM t WHERE b = ", "INSERT INTO t VALUES ("])


@given(lit=literal(), before=BEFORE)
def test_a_literal_is_replaced_whole_whatever_it_holds(lit: str, before: str) -> None:
    # Exactly as if the literal had been 'x': nothing of it survives, nothing around it moves.
    assert redact_sql(before + lit + " AND 1 = 1") == redact_sql(before + "'x' AND 1 = 1")


@given(secret=_secret, before=st.sampled_from(["ALTER ROLE r ", "CREATE USER u WITH "]))
def test_nothing_after_password_survives(secret: str, before: str) -> None:
    assert redact_sql(before + "PASSWORD " + secret) == redact_sql(before) + " PASSWORD ?"


@given(n=st.integers(0, 10**12))
def test_numbers_are_scrubbed(n: int) -> None:
    assert (
        str(n) not in redact_sql(f"SELECT * FROM customers WHERE customer_id = {n}").split("= ")[1]
    )


def test_messages_keep_numbers_but_lose_quoted_data() -> None:
    assert redact_message("returned 5000 rows, limit 1000") == "returned 5000 rows, limit 1000"
    assert (
        redact_message("Key (email)=(bob@example.com) already exists")
        == "Key (email)=(?) already exists"
    )
    assert redact_message("invalid input syntax for type integer: 'abc'") == (
        "invalid input syntax for type integer: ?"
    )
    assert "alice@example.com" not in redact_message("mail alice@example.com failed")
