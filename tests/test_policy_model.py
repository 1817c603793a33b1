"""The policy file: loading, errors with file:line, the shipped policy and its schema."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from policy.model import PolicyError, json_schema, load_policy, load_policy_text
from tests.proxyutil import pgwarden_command

CONFIG = Path(__file__).resolve().parent.parent / "config"


def test_the_committed_json_schema_is_the_generated_one() -> None:
    committed = json.loads((CONFIG / "policy.schema.json").read_text())
    assert committed == json.loads(json.dumps(json_schema())), (
        "run: pgwarden policy schema --out config/policy.schema.json"
    )


def test_the_shipped_policy_loads_and_its_own_tests_pass() -> None:
    policy = load_policy(CONFIG / "policy.yaml")
    assert {"agents", "analytics", "dba"} <= set(policy.subjects)
    out = subprocess.run([*pgwarden_command(), "policy", "test", str(CONFIG / "policy.yaml")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(policy.tests)} passed, 0 failed" in out.stdout


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        (
            "rules:\n  - id: a\n    max_rows: 5\n  - id: b\n    max_rows: -1\n",
            5,
            "rules.1.max_rows",
        ),
        (
            "rules:\n  - id: a\n    subjects: [nobody]\n    max_rows: 5\n",
            1,
            "subject 'nobody', which is not defined",
        ),
        ("subjects:\n  x:\n    client_cidrs: [10.0.0.300/8]\n", 3, "not an address range"),
        (
            "rules:\n  - id: a\n    max_rows: 5\n    deny: [copy_out]\n",
            2,
            "checks exactly one thing",
        ),
        ("rules:\n  - id: w\n    window: 1h\n", 2, "a window needs max_rows or max_records"),
        ("rules:\n  - id: w\n    max_records: 10\n", 2, "add window"),
        ("labels:\n  - column: a.b.c\n    label: PII Email\n", 2, "dotted lowercase"),
        ("mode: sometimes\n", 1, "mode"),
        (
            "rules:\n  - id: w\n    window: 1h\n    max_records: 9\n    per: [team]\n",
            5,
            "rules.0.per.0: Input should be 'end_user' or 'db_user'",
        ),
        (
            "rules:\n  - id: w\n    window: 1h\n    max_records: 9\n    per: [db_user, db_user]\n",
            5,
            "at most once",
        ),
        ("rules:\n  - id: w\n    max_rows: 9\n    per: db_user\n", 2, "add window"),
        (
            "rules:\n  - id: c\n    action: block\n    end_user_churn: {max_names: 5, window: 1m}\n",
            2,
            "end_user_churn raises an alert",
        ),
        (
            "rules:\n  - id: c\n    end_user_churn:\n      max_names: 5\n      window: soon\n",
            5,
            "rules.0.end_user_churn.window: 'soon' is not a duration",
        ),
        ("rulez: []\n", 1, "unknown key"),
    ],
)
def test_errors_name_the_line_and_the_problem(text: str, line: int, says: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, "p.yaml")
    assert f"p.yaml:{line}:" in str(err.value)
    assert says in str(err.value)


def test_yaml_syntax_errors_have_a_line_too() -> None:
    with pytest.raises(PolicyError, match=r"p.yaml:[23]: not valid YAML"):
        load_policy_text("rules:\n  - id: [unclosed\n", "p.yaml")


def test_policy_check_command_reports_ok_and_errors(tmp_path: Path) -> None:
    ok = subprocess.run([*pgwarden_command(), "policy", "check", str(CONFIG / "policy.yaml")],
                        capture_output=True, text=True, check=False)  # fmt: skip
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    max_rows: lots\n")
    out = subprocess.run(
        [*pgwarden_command(), "policy", "check", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1
    assert f"{bad}:3: rules.0.max_rows" in out.stderr


def test_the_compose_policy_is_the_shipped_one_with_redis_and_a_catalog_password() -> None:
    shipped = load_policy(CONFIG / "policy.yaml")
    compose = load_policy(CONFIG / "compose" / "policy.yaml")
    assert compose.store.backend == "redis" and compose.catalog_password_env
    same = {"labels", "subjects", "rules", "quarantine", "tests", "mode", "fail_closed"}
    assert compose.model_dump(include=same) == shipped.model_dump(include=same)


def test_the_grafana_dashboard_only_queries_metrics_pgwarden_exports() -> None:
    import re

    from proxy.metrics import Stats, StatsCollector

    exported = {m.name for m in StatsCollector(Stats()).collect()}
    dashboard = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    used = {
        name.removesuffix("_total").removesuffix("_bucket")
        for p in dashboard["panels"] for t in p["targets"]
        for name in re.findall(r"pgwarden_[a-z_]+", t["expr"])
    }  # fmt: skip
    assert used and used <= exported, used - exported
