"""Need-to-know through keys the statement equated, on the second test database.

``crm.customer_phones`` has a need-to-know rule keyed by ``customer_id`` of its own.  A
result that carries ``c.customer_id`` of a customer joined ``ON p.customer_id =
c.customer_id`` names whose phone each row holds; so does the ``customer_id`` column of a
SQL function that returns that join (``crm.ticket_customer``, the helpdesk's customer card).
Each test asserts what the client received: the agent's own customers' phones, nobody
else's, whichever way the statement is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from loadtests import redteam
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess
from tests.seconddb import data as sdb

AGENT = "agent_bob"


@pytest.fixture(scope="module")
def env(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[redteam.Env]:
    yield redteam.Env.build(pg, tmp_path_factory.mktemp("equated"))


@pytest.fixture
def proxy(env: redteam.Env, request: pytest.FixtureRequest) -> Iterator[ProxyProcess]:
    p = env.proxy(request.node.name[:40])
    yield p
    assert p.stop() == 0, p.log()


def query(p: ProxyProcess, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(
        p.dsn(AGENT, dbname=sdb.DBNAME, password=sdb.PASSWORD), autocommit=True
    ) as conn:
        return conn.execute(sql, params).fetchall()


def refused(p: ProxyProcess, sql: str, params: Any = None) -> str:
    with pytest.raises(psycopg.Error) as info:
        query(p, sql, params)
    assert info.value.sqlstate == "42501", info.value
    return str(info.value)


def mine_and_others(env: redteam.Env) -> tuple[list[int], list[int]]:
    mine = sorted(env.ds.need_to_know(AGENT))[:3]
    others = [i for i in range(1, 200) if i not in env.ds.need_to_know(AGENT)][:3]
    return mine, others


def phones_of(env: redteam.Env, ids: list[int]) -> set[str]:
    conn = psycopg.connect(env.pg.dsn(database=sdb.DBNAME), autocommit=True)
    with conn:
        rows = conn.execute(
            "SELECT phone FROM crm.customer_phones WHERE customer_id = ANY(%s)", (ids,)
        ).fetchall()
    return {r[0] for r in rows}


def test_the_helpdesk_card_function_shows_own_customers_and_withholds_others(
    env: redteam.Env, proxy: ProxyProcess
) -> None:
    own_tickets = env.ds.open_tickets(AGENT)[:3]
    own = [r for t in own_tickets for r in query(
        proxy, "SELECT customer_id, name, email, phone FROM ticket_customer(%s)", (t.ticket_no,)
    )]  # fmt: skip
    assert {r[0] for r in own} == {t.customer_id for t in own_tickets}
    assert any(r[3] is not None for r in own), "no phone of the agent's own customers came"
    _mine, others = mine_and_others(env)
    other_tickets = [t for t in env.ds.tickets if t.customer_id in set(others)]
    assert other_tickets
    for t in other_tickets:
        rows = query(
            proxy, "SELECT customer_id, name, email, phone FROM ticket_customer(%s)",
            (t.ticket_no,),
        )  # fmt: skip
        assert rows == [], f"ticket {t.ticket_no} of customer {t.customer_id} leaked {rows}"


def test_a_join_s_equated_key_checks_the_phones_it_joined(
    env: redteam.Env, proxy: ProxyProcess
) -> None:
    mine, others = mine_and_others(env)
    rows = query(
        proxy,
        "SELECT c.customer_id, p.phone FROM customers c "
        "JOIN customer_phones p ON p.customer_id = c.customer_id WHERE c.customer_id = ANY(%s)",
        (mine + others,),
    )
    assert {r[0] for r in rows} <= set(mine)
    assert {r[1] for r in rows} & phones_of(env, mine)
    assert not {r[1] for r in rows} & phones_of(env, others)


def test_a_second_read_of_the_phones_is_not_named_by_the_first_one_s_key(
    env: redteam.Env, proxy: ProxyProcess
) -> None:
    """``c.customer_id`` names the phones of ``p``, not those of another read of the table
    joined on anything else."""
    mine, others = mine_and_others(env)
    sql = (
        "SELECT c.customer_id, p2.phone FROM customers c "
        "JOIN customer_phones p ON p.customer_id = c.customer_id "
        "JOIN customer_phones p2 ON p2.customer_id = ANY(%s) WHERE c.customer_id = %s"
    )
    try:
        rows = query(proxy, sql, (others, mine[0]))
    except psycopg.Error as exc:
        assert exc.sqlstate == "42501", exc
        return
    assert not {r[1] for r in rows} & phones_of(env, others), rows


def test_an_outer_join_s_null_extended_side_names_no_record(
    env: redteam.Env, proxy: ProxyProcess
) -> None:
    """``p.customer_id`` of a LEFT JOIN that matched nothing is NULL: it is no key of the
    customers beside it, whose e-mails are checked by their own key."""
    mine, others = mine_and_others(env)
    rows = query(
        proxy,
        'SELECT p.customer_id, c."Email" FROM customers c '
        "LEFT JOIN customer_phones p ON p.customer_id = c.customer_id AND p.kind = 'none' "
        "WHERE c.customer_id = ANY(%s)",
        (mine + others,),
    )
    emails = {r[1] for r in rows}
    assert not emails & {env.ds.customers[i].email for i in others}, rows


def test_a_second_read_of_the_customers_is_not_named_by_the_first_one_s_key(
    env: redteam.Env, proxy: ProxyProcess
) -> None:
    mine, others = mine_and_others(env)
    sql = (
        'SELECT c.customer_id, c2."Email" FROM customers c '
        "JOIN customers c2 ON c2.customer_id = ANY(%s) WHERE c.customer_id = %s"
    )
    try:
        rows = query(proxy, sql, (others, mine[0]))
    except psycopg.Error as exc:
        assert exc.sqlstate == "42501", exc
        return
    assert not {r[1] for r in rows} & {env.ds.customers[i].email for i in others}, rows
