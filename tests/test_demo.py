"""``pgwarden demo``, the real command: the insider case replayed end to end.

The demo checks itself (it exits non-zero naming the step that misbehaved); this test runs it
as a user would and also reads its output for the facts a person is meant to see.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from proxy.sandbox.cluster import ClusterError, find_bindir
from tests.proxyutil import pgwarden_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    try:
        find_bindir()
    except ClusterError as exc:
        pytest.skip(str(exc))
    work = tmp_path_factory.mktemp("demo")
    # Wide enough that no table cell wraps, so each attempt is one line.
    env = dict(os.environ, COLUMNS="400", NO_COLOR="1", TERM="dumb")
    done = subprocess.run(
        [*pgwarden_command(), "demo", "--workdir", str(work)],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )  # fmt: skip
    return done, work


def lines(out: str, start: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(start)]


def test_the_demo_exits_0_and_nothing_misbehaved(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, _ = demo
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo complete" in done.stdout
    assert "✗" not in done.stdout


def test_every_client_works_and_normal_work_is_untouched(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    out = demo[0].stdout
    for client in ("psql", "psycopg 3", "asyncpg"):
        assert lines(out, client), client
    assert "SCRAM-SHA-256-PLUS" in out and "57014" in out
    assert re.search(r"alice, bob, carol, dave: \d+ statements .* 0 blocked", out)


def test_each_insider_attempt_is_refused_or_cut(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    out = demo[0].stdout
    mallory = lines(out, "mallory ")
    shapes = [
        ln
        for ln in mallory
        if "refused 42501 pgwarden: blocked by rule agent-statement-shapes" in ln
    ]
    assert len(shapes) == 4  # SELECT *, no WHERE, COPY TO STDOUT, json_agg
    assert any("COPY" in ln for ln in shapes) and any("json_agg() packs" in ln for ln in shapes)
    assert "mallory is quarantined" in out and "canary" in out
    trudy = lines(out, "trudy ")
    assert (
        sum("20 rows, then cut: 42501" in ln and "agent-statement-rows" in ln for ln in trudy) == 2
    )
    assert any("reporting.customer_contacts" in ln for ln in trudy)
    assert any("200 rows, then cut" in ln and "agent-hourly-records" in ln for ln in trudy)
    eve = lines(out, "eve ")
    assert any("trickle" in ln and "agent-hourly-records" in ln for ln in eve)
    assert "eve is quarantined" in out


def test_the_responder_sees_exactly_what_left(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, work = demo
    out = done.stdout
    assert re.search(r"alerts: \d+ block, 1 canary, 2 quarantine", out)
    assert "mallory quarantined for 1800 s after a canary read" in out
    seen = {}
    for who in ("mallory", "trudy", "eve"):
        m = re.search(
            rf"^{who}\s+(\d+) customers\s+(\d+) customers\s+✓ the same customers", out, re.M
        )
        assert m, who
        seen[who] = int(m.group(1))
        assert m.group(1) == m.group(2)  # ledger == what the clients counted
    assert seen["trudy"] == seen["eve"] == 200  # the hourly budget, not one more
    assert re.search(r"pgwarden audit verify ✓ chain \S+: intact", out)
    assert (work / "incident.html").stat().st_size > 0


def test_the_helpdesk_account_refuses_an_insider_by_shape(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Act 5: the allow-list learned from the normal day lets the tool's own lookup through
    and refuses an insider on the same account whatever names they make up."""
    done, work = demo
    out = done.stdout
    m = re.search(r"helpdesk-allow\.yaml: (\d+) statement shapes from (\d+) statements", out)
    assert m is not None and int(m.group(1)) >= 3, out[-3000:]
    alice = next(ln for ln in out.splitlines() if ln.startswith("alice ") and "1 row" in ln)
    assert "✓" in alice
    insider = next(ln for ln in out.splitlines() if ln.startswith("an insider on the helpdesk"))
    assert "6 refused, 0 customers" in insider and "helpdesk-known-statements" in insider
    assert re.search(r"policy drift: [1-9]\d* statement shapes", out)
    assert (work / "helpdesk-allow.yaml").read_text().startswith("# pgwarden allow-list")
