"""Signed end-user names behind a shared account (``end_user_signed``).

On the second test database the helpdesk account ``crm_app`` names the agent each
statement is for, and its policy asks for names the application signed with
``tests/seconddb/end_user.key``.  A person with crm_app's password but not the key cannot
name a colleague (by comment or by SET), cannot stretch or edit a token, and cannot lift a
live token from ``pg_stat_activity``: pgwarden sends PostgreSQL the bare name.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from loadtests import redteam
from policy import enduser
from policy.model import PolicyError, load_policy
from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess, pgwarden_command
from tests.seconddb import data as sdb

KEY = sdb.END_USER_KEY.read_bytes().strip()
OWN = "agent_cat"  # whose tickets the statements read


@pytest.fixture(scope="module")
def env(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[redteam.Env]:
    yield redteam.Env.build(pg, tmp_path_factory.mktemp("signed"))


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The second database's policy without its allow-list of the helpdesk's statement
    shapes (which has no SET pgwarden.end_user: the helpdesk names agents by comment)."""
    return redteam.policy_without_allow_lists(
        tmp_path_factory.mktemp("signed-policy") / "policy.yaml"
    )


@pytest.fixture
def proxy(env: redteam.Env, policy: Path, request: pytest.FixtureRequest) -> Iterator[ProxyProcess]:
    p = env.proxy(request.node.name[:40], policy=policy)
    yield p
    assert p.stop() == 0, p.log()


def app(p: ProxyProcess) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        p.dsn(sdb.APP_USER, dbname=sdb.DBNAME, password=sdb.PASSWORD), autocommit=True
    )


def own_ticket(env: redteam.Env) -> tuple[str, int]:
    t = env.ds.open_tickets(OWN)[0]
    return t.ticket_no, t.customer_id


# The helpdesk's customer card, as its application sends it (on the account's allow-list).
CARD = (
    'SELECT t."TicketNo", c.customer_id, c."FullName", c."Email", p.phone FROM "Tickets" t '
    "JOIN customers c ON c.customer_id = t.customer_id LEFT JOIN customer_phones p "
    "ON p.customer_id = c.customer_id AND p.kind = 'mobile' WHERE t.\"TicketNo\" = %s"
)


def read_card(conn: psycopg.Connection[tuple[Any, ...]], prefix: str, ticket: str) -> list[Any]:
    return [(r[1], r[3]) for r in conn.execute(prefix + CARD, (ticket,)).fetchall()]


def test_a_signed_name_reads_within_that_agent_s_need_to_know(
    env: redteam.Env, proxy: ProxyProcess
) -> None:
    token = enduser.sign(KEY, OWN)
    ticket, customer = own_ticket(env)
    with app(proxy) as conn:
        rows = read_card(conn, f"/* end_user='{token}' */ ", ticket)
        assert rows == [(customer, env.ds.customers[customer].email)]
        conn.execute(f"SET pgwarden.end_user = '{token}'")
        assert read_card(conn, "", ticket) == rows


def test_a_refused_statement_with_a_signed_name_sends_nothing_upstream(
    env: redteam.Env, proxy: ProxyProcess
) -> None:
    """The token is taken out of the text sent upstream; a refused statement's text is not
    sent at all (its refusal is sent instead, never beside it)."""
    token = enduser.sign(KEY, OWN)
    with app(proxy) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f"/* end_user='{token}' */ SELECT * FROM customers").fetchall()
        assert info.value.sqlstate == "42501"
        with pytest.raises(psycopg.Error) as info:
            conn.execute(
                f"/* end_user='{token}' */ SELECT c FROM customers c WHERE c.customer_id > %s",
                (0,),
            ).fetchall()
        assert info.value.sqlstate == "42501"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(OWN, id="plain name"),
        pytest.param(enduser.sign(b"another key of 32 bytes or so...", OWN), id="other key"),
        pytest.param(enduser.sign(KEY, OWN, now=1_000_000), id="expired"),
        pytest.param(enduser.sign(KEY, "agent_bob").replace("agent_bob", OWN, 1), id="name edited"),
    ],
)
def test_a_name_without_a_good_signature_is_refused_by_comment_and_by_set(
    env: redteam.Env, proxy: ProxyProcess, name: str
) -> None:
    ticket, _customer = own_ticket(env)
    with app(proxy) as conn:
        with pytest.raises(psycopg.Error) as info:
            read_card(conn, f"/* end_user='{name}' */ ", ticket)
        assert info.value.sqlstate == "42501"
        assert "end-user-signature" in str(info.value), info.value
        assert "Email" not in str(info.value) and "@" not in str(info.value)
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f"SET pgwarden.end_user = '{name}'")
        assert info.value.sqlstate == "42501"
        # The refused SET named nobody: the account reads as itself, outside anyone's
        # need-to-know.
        assert read_card(conn, "", ticket) == []


def test_postgres_never_sees_the_token(env: redteam.Env, proxy: ProxyProcess) -> None:
    """Another session of crm_app (or the server's log) would see a live token in the
    statement text and could replay it; pgwarden sends the bare name."""
    token = enduser.sign(KEY, OWN)
    with app(proxy) as conn:
        read_card(conn, f"/* end_user='{token}' */ ", own_ticket(env)[0])
        pid = conn.info.backend_pid
        conn.execute(f"SET pgwarden.end_user = '{token}'")
        assert conn.execute("SELECT current_setting('pgwarden.end_user')").fetchone() == (OWN,)
    with psycopg.connect(env.pg.dsn(database=sdb.DBNAME), autocommit=True) as dba:
        (last,) = dba.execute(
            "SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone() or ("",)
    assert token not in last
    assert token.rsplit("~", 2)[2] not in proxy.log()


def test_a_policy_asking_for_signatures_names_its_key(tmp_path: Path) -> None:
    data = yaml.safe_load(sdb.POLICY.read_text())
    del data["end_user_key"]
    bad = tmp_path / "policy.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError, match="end_user_signed: true, which needs end_user_key"):
        load_policy(bad)
    # A relative key path is the policy file's neighbour, wherever pgwarden runs from.
    assert load_policy(sdb.POLICY).end_user_key == str(sdb.END_USER_KEY)


def test_sign_end_user_command_prints_a_token_pgwarden_accepts() -> None:
    proc = subprocess.run(
        [*pgwarden_command(), "policy", "sign-end-user", OWN, "--key", str(sdb.END_USER_KEY)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert enduser.verify(KEY, proc.stdout.strip()) == (OWN, "")
    proc = subprocess.run(
        [*pgwarden_command(), "policy", "sign-end-user", "it's", "--key", str(sdb.END_USER_KEY)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "holds no ' or ~" in proc.stderr
