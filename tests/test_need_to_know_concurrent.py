"""Need-to-know under concurrency: several sessions of one agent asking at the same moment.

Found by the agents' load test (loadtests/support_load.py --enforce): the first statements
of an agent's concurrent sessions were refused, because their lookups ran at once on
pgwarden's one lookup connection and asyncpg refuses a second operation in progress -- a
failed lookup allows nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path

from proxy.sandbox.cluster import Cluster
from tests.test_need_to_know import agent, start


def test_concurrent_first_reads_of_one_agent_are_all_allowed(
    pg: Cluster, enforce_db: str, tmp_path: Path
) -> None:
    p = start(pg, tmp_path, "block")
    conns = [agent(p, name) for name in ["agent1"] * 6 + ["agent2"] * 6]
    barrier = threading.Barrier(len(conns))
    results: dict[int, object] = {}

    def read(i: int) -> None:
        barrier.wait()
        try:
            # Customer 3's ticket is agent1's, customer 4's agent2's.
            mine = 3 if i < 6 else 4
            cur = conns[i].execute(
                f"SELECT customer_id, email FROM customers WHERE customer_id = {mine}"
            )
            results[i] = [r[0] for r in cur.fetchall()]
        except Exception as exc:  # the refusal, reported below with the others
            results[i] = exc

    try:
        # A first lookup (agent3's) opens pgwarden's lookup connection; the burst then finds
        # it open, with no answer cached for agent1 or agent2.
        with agent(p, "agent3") as first:
            assert first.execute(
                "SELECT customer_id FROM customers WHERE customer_id = 5"
            ).fetchall()
        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {i: [3] if i < 6 else [4] for i in range(len(conns))}
    finally:
        for c in conns:
            c.close()
        assert p.stop() == 0
