"""An end user named in a comment of a prepared statement, executed again later.

Found by the agents' load test in pgbench's prepared mode (loadtests/support_load.py
--modes prepared): the helpdesk account's connection prepares one statement per agent, each
naming its agent in a sqlcommenter comment, and executes them again without a new Parse.
pgwarden took the end user from the statement text it saw, so a re-executed statement was
judged as whoever the session named last.  Each decision now keeps the subject it was made
for, and an Execute whose person's need-to-know lookup has expired waits for a fresh one.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import yaml

from proxy.sandbox.cluster import Cluster
from tests.proxyutil import ProxyProcess
from tests.support_data import DB
from tests.test_need_to_know import LOOKUP


def test_a_prepared_statement_keeps_the_end_user_its_comment_names(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    policy = {
        "subjects": {"agents": {"users": ["support_app"], "end_user_from": ["comment"]}},
        "rules": [
            {
                "id": "their-customers",
                "subjects": ["agents"],
                "need_to_know": {
                    "table": "public.customers", "key_column": "customer_id",
                    "lookup": LOOKUP, "on_violation": "block", "cache_seconds": 1,
                },
            }
        ],
    }  # fmt: skip
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    p = ProxyProcess(pg, tmp_path / "proxy", ["--policy", str(path), "--catalog-user", "postgres"])
    # Customer 3's ticket is agent1's, customer 4's agent2's (tests/support_data.py).
    mine = {
        "agent1": "SELECT customer_id, email FROM customers WHERE customer_id = 3 "
        "/* end_user='agent1' */",
        "agent2": "SELECT customer_id, email FROM customers WHERE customer_id = 4 "
        "/* end_user='agent2' */",
    }
    try:
        dsn = pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute(mine["agent1"], prepare=True).fetchall()[0][0] == 3
            assert conn.execute(mine["agent2"], prepare=True).fetchall()[0][0] == 4
            # Bind and Execute of agent1's prepared statement: no text, no comment this time.
            assert conn.execute(mine["agent1"], prepare=True).fetchall()[0][0] == 3
            # Later than the lookup cache lasts: the Execute waits for a fresh lookup for
            # agent1 instead of judging with none (which would refuse every row).
            time.sleep(1.3)
            assert conn.execute(mine["agent1"], prepare=True).fetchall()[0][0] == 3
    finally:
        assert p.stop() == 0
