"""The insider replay (``loadtests/replay.py``) on a few techniques, one per channel a
client reads customers from in monitor mode: result rows, COPY and a notification payload.
``records-seen --person`` must list exactly the customers the client received (counted on
the client side by the second database's matcher), no fewer and no more.  An agent's error
and notice text is withheld whenever the statement reads labelled data (monitor mode too),
so those channels deliver nothing to compare here.  ``make replay`` runs every technique.
"""

from __future__ import annotations

import pytest

from loadtests import redteam, replay
from proxy.sandbox.cluster import Cluster

TECHNIQUES = ("plain_columns", "copy_to_stdout", "notify_payload")


@pytest.fixture(scope="module")
def env(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> replay.ReplayEnv:
    return replay.ReplayEnv.create(pg, tmp_path_factory.mktemp("replay"))


@pytest.mark.parametrize("name", TECHNIQUES)
def test_records_seen_is_exactly_what_the_client_received(env: replay.ReplayEnv, name: str) -> None:
    r = replay.replay_technique(env, name)
    assert r.received, f"{name}: calibration: nothing reached the client ({r.notes})"
    assert r.persons == [redteam.ATTACKER], r.persons
    assert not r.missed, (
        f"{name}: {len(r.missed)} customers received but not listed, e.g. "
        f"{list(r.samples.items())[:2]}"
    )
    assert not r.extra, f"{name}: listed but never received: {sorted(r.extra)[:10]}"
