"""A very short run of the proxy benchmark: the output format, never the timings."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import harness

FIGURE = re.compile(r"^([a-z0-9_]+)=(nan|[0-9]+(?:\.[0-9]+)?)$")


@pytest.mark.slow
def test_bench_proxy_smoke(tmp_path: Path) -> None:
    targets = ["direct", "pgbouncer", "bare"]
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bench_proxy", "--duration", "1", "--rounds", "1",
         "--targets", ",".join(targets), "--modes", "simple,extended", "--scale", "1",
         "--warmup", "0", "--output", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()

    # Every figure line above the last is one name=value pair.
    figures: dict[str, float] = {}
    for line in lines[:-1]:
        m = FIGURE.match(line)
        if m:
            figures[m.group(1)] = float(m.group(2))
    for target in targets:
        for mode in ("simple", "extended"):
            assert figures[f"tps_{target}_{mode}"] > 0
            assert figures[f"latency_ms_{target}_{mode}"] > 0
    ratios = {k: v for k, v in figures.items() if k.startswith("ratio_")}
    for name in ("bare_vs_direct", "pgbouncer_vs_direct"):
        for mode in ("simple", "extended"):
            assert ratios[f"ratio_{name}_{mode}"] > 0

    # The last line holds several pairs and starts with the headline figure.
    last = lines[-1].split()
    assert last[0].startswith("ratio_vs_pgbouncer=")
    pairs = dict(p.split("=", 1) for p in last)
    assert all(FIGURE.match(f"{k}={v}") for k, v in pairs.items())
    headline = float(pairs["ratio_vs_pgbouncer"])
    assert figures["ratio_vs_pgbouncer"] == pytest.approx(headline, rel=1e-2, nan_ok=True)
    # pgwarden is not among the targets: its ratio is reported as not measured, never
    # filled in from another target.
    assert math.isnan(headline)
    assert "pgwarden was not measured" in proc.stderr
    for k, v in pairs.items():
        if k != "ratio_vs_pgbouncer":
            assert float(v) > 0, k

    data = json.loads(out.read_text())
    assert data["figures"]["ratio_bare_vs_direct_simple"] > 0
    assert {r["target"] for r in data["runs"]} == set(targets)
    assert all(r["error"] is None for r in data["runs"])
    assert data["summary"]["paired_ratios"]["bare_vs_direct_simple"]["median"] > 0


@pytest.mark.slow
def test_support_load_smoke(tmp_path: Path) -> None:
    out = tmp_path / "support.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.support_load", "--duration", "1", "--rounds", "1",
         "--customers", "500", "--scale", "1", "--bulk-rows", "20000", "--bulk-repeat", "1",
         "--modes", "simple",
         "--targets", "direct,bare", "--output", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert all(FIGURE.match(line) for line in lines[:-1])
    last = dict(pair.split("=", 1) for pair in lines[-1].split())
    assert list(last) == ["support_ratio", "bulk_select_ratio", "bulk_copy_ratio"]
    data = json.loads(out.read_text())
    figures = data["figures"]
    for name in ("support", "select_only"):
        assert figures[f"tps_{name}_direct_simple"] > 0
        assert figures[f"ratio_{name}_bare_vs_direct_simple"] > 0
        assert figures[f"p99_ms_{name}_bare_simple"] >= figures[f"p50_ms_{name}_bare_simple"] > 0
    for op in ("select", "select_psql", "copy", "copy_asyncpg"):
        assert figures[f"ratio_bulk_{op}_bare_vs_direct"] > 0
    assert all(b["error"] is None and b["rows"] == 20000 for b in data["bulk_runs"])
    assert all(r["error"] is None for r in data["pgbench_runs"])
    assert data["setup"]["generation"]["counts"]["customers"] == 500
    assert data["summary"]["paired_ratios"]["bare_vs_direct_bulk_copy"]["median"] > 0


@pytest.mark.slow
@pytest.mark.skipif(
    harness.pgwarden_serve_available() is not None, reason="'pgwarden serve' not in this checkout"
)
def test_bench_proxy_smoke_with_pgwarden(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bench_proxy", "--duration", "1", "--rounds", "1",
         "--targets", "pgbouncer,pgwarden", "--modes", "simple,extended", "--scale", "1",
         "--warmup", "0", "--output", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = dict(pair.split("=", 1) for pair in proc.stdout.strip().splitlines()[-1].split())
    assert float(last["ratio_vs_pgbouncer"]) > 0
    data = json.loads(out.read_text())
    assert not data["skipped"]
    assert all(r["error"] is None for r in data["runs"])


def test_the_chart_draws_every_bar_and_says_what_was_not_measured(tmp_path: Path) -> None:
    from loadtests.harness import write_chart

    out = tmp_path / "chart.html"
    write_chart(out, "t", {"simple": {"direct": 100.0, "pgwarden": 70.0, "bare": math.nan}}, "tps")
    page = out.read_text()
    assert page.count("<rect") == 2
    assert "100 tps" in page and "70 tps" in page and "not measured" in page
