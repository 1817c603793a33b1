"""``pgwarden audit ...`` as a responder uses it, on the seeded scenario."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from audit.cli import audit_group
from audit.pipeline import PostgresSinkConfig
from proxy.sandbox.cluster import Cluster
from tests.audit_scenario import seed


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    asyncio.run(seed(d))
    return d


def run(*args: str) -> Any:
    res = CliRunner().invoke(audit_group, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def js(*args: str) -> Any:
    return orjson.loads(run(*args, "--json").output)


def test_search_filters(tmp: Path) -> None:
    db = ["--db", str(tmp / "audit.db")]
    assert {r["end_user"] for r in js("search", *db, "--kind", "statement")} == {
        "bob",
        "alice",
        "mallory",
    }
    rows = js("search", *db, "--end-user", "mallory", "--verdict", "block")
    assert len(rows) == 1 and rows[0]["rule_ids"] == ["no-copy-out"]
    # the literal in the blocked COPY was scrubbed before it was stored
    assert "carol@example.com" not in rows[0]["statement"]
    assert len(js("search", *db, "--min-rows", "1000")) == 1
    assert len(js("search", *db, "--relation", "products")) == 1
    assert len(js("search", *db, "--label", "pii.phone")) == 1
    assert len(js("search", *db, "--client", "10.0.0.6")) == 3
    assert len(js("search", *db, "--application", "psql", "--kind", "statement")) == 2
    assert len(js("search", *db, "--since", "2026-11-02T10:00", "--until", "2026-11-02T11:00")) == 3
    assert "mallory" in run("search", *db, "--user", "support_app").output


def test_sessions_timeline_top(tmp: Path) -> None:
    db = ["--db", str(tmp / "audit.db")]
    sessions = {s["session_id"]: s for s in js("sessions", *db)}
    assert sessions["s-bob"]["labelled_rows"] == 201 and sessions["s-bob"]["statements"] == 2
    assert sessions["s-mal"]["blocks"] == 1
    tl = js("timeline", *db, "--end-user", "bob")
    assert tl == [
        {
            "hour": "2026-11-02T09:00Z",
            "bucket": "2026-11-02T09:00Z",
            "statements": 2,
            "labelled_rows": 201,
            "blocks": 0,
            "sessions": 1,
        }
    ]
    top = js("top", *db)
    assert [t["person"] for t in top] == ["mallory", "bob", "alice"]
    assert [t["distinct_records"] for t in top] == [5000, 150, 11]
    assert "mallory" in run("top", *db).output


def test_export_jsonl_and_csv(tmp: Path) -> None:
    db = ["--db", str(tmp / "audit.db")]
    lines = run("export", *db, "--format", "jsonl").output.splitlines()
    # 11 scenario events and the checkpoint written at close
    assert len(lines) == 12 and orjson.loads(lines[0])["kind"] == "session_start"
    out = tmp / "x.csv"
    run("export", *db, "--format", "csv", "--out", str(out), "--end-user", "alice")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 3 and rows[1]["relations"] == '["public.customers"]'


def test_html_report_is_self_contained(tmp: Path) -> None:
    out = tmp / "report.html"
    run("report", "--db", str(tmp / "audit.db"), "--html", str(out))
    html = out.read_text()
    assert "<svg" in html and "<polyline" in html
    assert "no-copy-out" in html and "mallory" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "carol@example.com" not in html


def test_who_saw_and_records_seen(tmp: Path) -> None:
    common = ["--db", str(tmp / "audit.db"), "--ledger-key", str(tmp / "ledger.key")]
    rows = js("who-saw", *common, "--table", "customers", "--key", "4000")
    assert [(r["end_user"], r["session_id"]) for r in rows] == [("mallory", "s-mal")]
    text = run("who-saw", *common, "--value", "carol@example.com").output
    assert "alice" in text and "1 statement(s) in 1 session(s)" in text
    res = js("records-seen", *common, "--end-user", "bob", "--table", "customers")
    assert res["distinct_records"] == 150 and len(res["records"][0]["digest"]) == 32
    out = tmp / "bob.csv"
    txt = run(
        "records-seen", *common, "--end-user", "mallory", "--table", "customers", "--out", str(out)
    ).output
    assert "5000 distinct record(s)" in txt
    assert len(out.read_text().splitlines()) == 5001


def test_errors_are_sentences(tmp: Path) -> None:
    res = CliRunner().invoke(audit_group, ["search", "--db", str(tmp / "nope.db")])
    assert res.exit_code != 0 and "there is no audit database" in res.output
    res = CliRunner().invoke(audit_group, ["search"])
    assert "name exactly one audit store" in res.output
    res = CliRunner().invoke(
        audit_group, ["search", "--db", str(tmp / "audit.db"), "--since", "yesterday"]
    )
    assert "cannot read the time" in res.output


def test_keygen(tmp_path: Path) -> None:
    run("keygen", "--out", str(tmp_path / "sign.key"))
    assert (tmp_path / "sign.key.pub").exists()
    assert oct((tmp_path / "sign.key").stat().st_mode & 0o777) == "0o600"
    run("keygen", "--hmac", "--out", str(tmp_path / "hmac.key"))
    assert len(bytes.fromhex((tmp_path / "hmac.key").read_text().strip())) == 32
    again = CliRunner().invoke(audit_group, ["keygen", "--out", str(tmp_path / "sign.key")])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output


def test_commands_read_the_postgresql_store_with_dsn(pg: Cluster, tmp_path: Path) -> None:
    pg.psql(
        "DROP DATABASE IF EXISTS audit_cli WITH (FORCE); CREATE DATABASE audit_cli;",
        database="postgres",
    )
    asyncio.run(seed(tmp_path, extra_sinks=[PostgresSinkConfig(dsn=pg.url(database="audit_cli"))]))
    dsn = ["--dsn", pg.url(database="audit_cli")]
    assert [t["person"] for t in js("top", *dsn)] == ["mallory", "bob", "alice"]
    assert "intact" in run("verify", *dsn).output
    res = js(
        "records-seen",
        *dsn,
        "--ledger-key",
        str(tmp_path / "ledger.key"),
        "--end-user",
        "alice",
        "--table",
        "customers",
    )
    assert res["distinct_records"] == 11
