"""Very short runs of the workers benchmark and of the agents' support load: the figures'
format and what the runs show about pgwarden's behaviour, never the timings."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import harness

FIGURE = re.compile(r"^([a-z0-9_]+)=(nan|[0-9]+(?:\.[0-9]+)?)$")

needs_pgwarden = pytest.mark.skipif(
    harness.pgwarden_serve_available() is not None, reason="'pgwarden serve' not in this checkout"
)


def figure_lines(stdout: str) -> tuple[dict[str, float], dict[str, float]]:
    """(every figure above the last line, the pairs of the last line)."""
    lines = stdout.strip().splitlines()
    above = {}
    for line in lines[:-1]:
        m = FIGURE.match(line)
        assert m, f"not a figure line: {line!r}"
        above[m.group(1)] = float(m.group(2))
    last = {}
    for pair in lines[-1].split():
        assert FIGURE.match(pair), f"not a name=value pair: {pair!r}"
        name, value = pair.split("=", 1)
        last[name] = float(value)
    return above, last


@pytest.mark.slow
@needs_pgwarden
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_bench_workers_smoke(tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bench_workers", "--workers", "1,2", "--duration", "1",
         "--rounds", "1", "--customers", "500", "--scale", "1", "--warmup", "0",
         "--agent-queue", "5", "--output", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures, last = figure_lines(proc.stdout)
    assert list(last) == [
        "workers_1_tps", "workers_2_tps", "scaling_2_vs_1", "scaling_2_vs_1_full",
        "scaling_2_vs_1_agents_full",
    ]  # fmt: skip
    assert all(v > 0 for v in last.values()), last
    assert last["workers_2_tps"] == pytest.approx(figures["tps_select_only_plain_w2_simple"])

    data = json.loads(out.read_text())
    assert not data["skipped"]
    assert all(r["error"] is None for r in data["runs"])
    # Every agent reads only customers of their own open tickets: nothing is refused, with
    # the windows in Redis and need-to-know on, whichever worker a statement lands on.
    for name in ("full_w1", "full_w2"):
        assert figures[f"refused_agents_{name}_simple"] == 0
    shared = data["shared"]
    # The kernel spread the connections over both workers ...
    per_worker = shared["connections_per_worker"]["plain_w2"]
    assert len(per_worker) == 2 and min(per_worker) > 0
    assert min(shared["connections_per_worker"]["full_w2"]) > 0
    # ... the windows were kept in the one Redis, and each worker wrote its own audit chain
    # into the one PostgreSQL store.
    assert shared["redis_keys"] > 0
    assert len(shared["audit_events_per_chain"]["full_w2"]) == 2
    assert len(shared["audit_events_per_chain"]["full_w1"]) == 1


@pytest.mark.slow
@needs_pgwarden
def test_support_load_as_agents_with_both_durability_settings(tmp_path: Path) -> None:
    out = tmp_path / "support.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.support_load", "--duration", "1", "--rounds", "1",
         "--customers", "500", "--scale", "1", "--skip-bulk", "--workloads", "support,agents",
         "--modes", "simple,extended", "--targets", "direct,pgwarden", "--enforce",
         "--audit-sync", "FULL,NORMAL", "--agent-queue", "5", "--output", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures, last = figure_lines(proc.stdout)
    assert list(last) == ["support_ratio", "bulk_select_ratio", "bulk_copy_ratio"]
    assert last["support_ratio"] > 0
    assert math.isnan(last["bulk_select_ratio"])  # --skip-bulk: not measured, never made up
    for suffix in ("", "_normal"):
        assert figures[f"support_ratio{suffix}"] > 0
        assert figures[f"agents_ratio{suffix}"] > 0
        # Agents named per statement, judged by the policy with need-to-know: no refusals.
        assert figures[f"agent_refusals{suffix}"] == 0

    data = json.loads(out.read_text())
    assert all(r["error"] is None for r in data["pgbench_runs"])
    setups = data["setup"]["pgwarden"]
    assert "synchronous=FULL" in setups["pgwarden"]
    assert "synchronous=NORMAL" in setups["pgwarden_normal"]
    assert data["setup"]["agents"] == {"agents": 5, "queue": 5}
    assert "pgwarden_normal_vs_pgwarden_support_simple" in data["summary"]["paired_ratios"]
