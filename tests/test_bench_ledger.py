"""A short run of the ledger benchmark: every streamed key reaches the ledger; never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_smoke import FIGURE


@pytest.mark.slow
def test_bench_ledger_records_every_key_of_the_streamed_result(tmp_path: Path) -> None:
    out = tmp_path / "ledger.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bench_ledger", "--rows", "3000", "--rounds", "1",
         "--output", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert all(FIGURE.match(line) for line in lines), lines
    assert lines[-1].startswith("ledger_ratio=")
    figures = {k: float(v) for k, v in (line.split("=") for line in lines)}
    for target in ("direct", "pgwarden", "pgwarden_ledger"):
        assert figures[f"rows_per_s_{target}"] > 0
    assert figures["ledger_ratio"] > 0
    result = json.loads(out.read_text())
    # The warm-up stream and the measured one, each with all 3000 customers in its ledger.
    assert result["ledger_keys_per_statement"] == [3000, 3000]
    assert result["errors"] == []
