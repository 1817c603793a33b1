"""``pgwarden audit ...`` run as a subprocess, the way a responder under time pressure runs it:
wrong files, misspelt names, odd time formats, hostile values sent by a client through the
real proxy, and a store that pgwarden is still writing.

Expected answers come from the seeded scenario (``tests/audit_scenario.py``) or from what the
test itself sent, never from the code under test.
"""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg
import pytest

from audit.pipeline import AuditConfig, AuditTrail, PostgresSinkConfig, SQLiteSinkConfig
from proxy.sandbox.cluster import Cluster
from tests.audit_scenario import EXPECTED_DISTINCT, scenario_events, seed
from tests.auditcli import cli, js, ok, refused
from tests.proxyutil import ProxyProcess, pgwarden_command
from tests.support_data import DB, POLICY


def table_rows(text: str) -> list[list[str]]:
    """The data rows of a table the CLI printed (rich box drawing)."""
    return [
        [c.strip() for c in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("responder")
    asyncio.run(seed(d))
    return d


# --- wrong inputs --------------------------------------------------------------------------


def test_a_file_that_is_not_an_audit_store_is_named_as_such(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE customers (id int)")
    conn.commit()
    conn.close()
    (tmp_path / "notes.txt").write_text("incident notes\n")
    (tmp_path / "empty.db").write_bytes(b"")
    for name in ("other.db", "empty.db"):
        for cmd in ("search", "top", "verify"):
            err = refused(cmd, "--db", str(tmp_path / name))
            assert "is not a pgwarden audit database" in err
    err = refused("timeline", "--db", str(tmp_path / "notes.txt"), "--end-user", "bob")
    assert "is not an SQLite database" in err


def test_unreadable_keys_and_files_are_sentences(scenario: Path, tmp_path: Path) -> None:
    db = ["--db", str(scenario / "audit.db")]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a key\n")
    err = refused("who-saw", *db, "--ledger-key", str(notes), "--table", "customers", "--key", "1")
    assert "does not hold a hex key" in err
    err = refused("verify", *db, "--public-key", str(notes))
    assert "is not a PEM key" in err
    err = refused("verify", *db, "--checkpoints", str(notes))
    assert "line 1" in err and "is not a checkpoint" in err
    err = refused("verify", "--jsonl", str(notes))
    assert "event 1 is not valid JSON" in err
    (tmp_path / "x.jsonl").write_text('{"user": "bob"}\n')
    err = refused("verify", "--jsonl", str(tmp_path / "x.jsonl"))
    assert "is not an audit event" in err
    err = refused("top", "--dsn", "host=audit-db port=notaport password=hunter2")
    assert "cannot connect to the PostgreSQL audit store" in err and "hunter2" not in err


def test_an_output_file_that_cannot_be_written_is_a_sentence(scenario: Path) -> None:
    db = ["--db", str(scenario / "audit.db")]
    missing = scenario / "no-such-dir"
    refused("report", *db, "--html", str(missing / "r.html"))
    refused("export", *db, "--format", "csv", "--out", str(missing / "e.csv"))
    err = refused("records-seen", *db, "--ledger-key", str(scenario / "ledger.key"),
                  "--end-user", "bob", "--table", "customers", "--out", str(missing / "b.csv"))  # fmt: skip
    assert f"there is no directory {missing}" in err
    refused("keygen", "--ledger", "--out", str(missing / "ledger.key"))


def test_export_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    async def write() -> None:
        from audit.events import AuditEvent, Subject

        bob = Subject("support_app", "support", "helpdesk", "10.0.0.5", True, "bob")
        trail = AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path=tmp_path / "audit.db")]))
        await trail.start()
        for i in range(400):  # a few hundred kB: more than a pipe holds
            trail.submit_nowait(
                AuditEvent.statement_event("s", bob, fingerprint="f", statement=f"SELECT {i}")
            )
        await trail.close()

    asyncio.run(write())
    # `pgwarden audit export ... | head -1`
    proc = subprocess.Popen(
        [*pgwarden_command(), "audit", "export", "--db", str(tmp_path / "audit.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert orjson.loads(proc.stdout.readline())["kind"] == "statement"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141  # like a tool killed by SIGPIPE
    assert err == ""


def test_misspelt_table_or_label_is_not_answered_with_zero(scenario: Path) -> None:
    common = ["--db", str(scenario / "audit.db"), "--ledger-key", str(scenario / "ledger.key")]
    # "customer" for "customers": "bob received 0 records" would end an investigation.
    err = refused("records-seen", *common, "--end-user", "bob", "--table", "customer")
    assert "public.customer'" in err and "public.customers" in err
    err = refused("who-saw", *common, "--table", "customer", "--key", "42")
    assert "public.customers" in err
    err = refused("who-saw", *common, "--value", "carol@example.com", "--label", "pii.emial")
    assert "pii.email" in err
    # The same for a person: end users match exactly, "Bob" is not bob.
    err = refused("records-seen", *common, "--end-user", "Bob", "--table", "customers")
    assert "never names the end user 'Bob'" in err and "'bob'" in err
    err = refused("timeline", "--db", str(scenario / "audit.db"), "--end-user", "Bob")
    assert "'bob'" in err
    assert js("timeline", "--db", str(scenario / "audit.db"), "--end-user", "bob",
              "--since", "2026-11-03") == []  # fmt: skip
    # A real table read by nobody in the window is a true zero, not an error.
    out = js("records-seen", *common, "--end-user", "bob", "--table", "customers",
             "--since", "2026-11-03")  # fmt: skip
    assert out["distinct_records"] == 0


def test_an_empty_store_answers_empty(tmp_path: Path) -> None:
    async def create() -> None:
        trail = AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path=tmp_path / "audit.db")]))
        await trail.start()
        await trail.close()

    asyncio.run(create())
    db = ["--db", str(tmp_path / "audit.db")]
    assert js("search", *db) == [] and js("top", *db) == [] and js("sessions", *db) == []
    assert "no matching events" in ok("search", *db)
    assert "holds no events" in ok("verify", *db)


# --- time ----------------------------------------------------------------------------------


def _count_before(until: datetime) -> int:
    return sum(1 for e in scenario_events() if e.ts < until.timestamp())


def test_times_in_any_zone_and_form_mean_the_same_instant(scenario: Path) -> None:
    db = ["--db", str(scenario / "audit.db")]
    ten_utc = datetime(2026, 11, 2, 10, tzinfo=UTC)
    expected = _count_before(ten_utc)
    assert 0 < expected < len(scenario_events())
    for form in (
        "2026-11-02T10:00:00Z",
        "2026-11-02T10:00:00+00:00",
        "2026-11-02T11:00:00+01:00",
        "2026-11-02T05:00:00-05:00",
        "2026-11-02T10:00",  # no zone: UTC, as documented
        "2026-11-02 10:00:00",
    ):
        # The responder's own zone must not shift a zone-less time.
        res = cli("search", *db, "--until", form, "--json", env={"TZ": "America/New_York"})
        assert res.returncode == 0, res.stderr
        assert len(orjson.loads(res.stdout)) == expected, form
    assert len(js("search", *db, "--since", "2026-11-02", "--until", "2026-11-03")) == len(
        scenario_events()
    )
    statements = sum(1 for e in scenario_events() if e.kind == "statement")
    age = (datetime.now(UTC) - datetime(2026, 11, 1, tzinfo=UTC)).days + 2
    for since in (f"{age}d", f"{age * 24}h", f"{age + 7}d"):
        assert len(js("search", *db, "--kind", "statement", "--since", since)) == statements
    assert js("search", *db, "--kind", "statement", "--since", "1h") == []


def test_bad_or_swapped_times_name_the_option(scenario: Path) -> None:
    db = ["--db", str(scenario / "audit.db")]
    err = refused("top", *db, "--since", "yesterday")
    assert "--since" in err and "cannot read the time" in err
    # Swapped, the window matches nothing and "no matching events" would mislead.
    for cmd in (["search"], ["top"], ["timeline", "--end-user", "bob"]):
        err = refused(*cmd, *db, "--since", "2026-11-03", "--until", "2026-11-02")
        assert "is not before --until" in err


def test_timeline_says_its_hours_are_utc(scenario: Path) -> None:
    db = ["--db", str(scenario / "audit.db")]
    # bob's two statements were at 09:01 and 09:02 UTC on 2 November.
    env = {"TZ": "Asia/Tokyo"}
    res = cli("timeline", *db, "--end-user", "bob", env=env)
    assert res.returncode == 0, res.stderr
    assert "hour (UTC)" in res.stdout and "per hour in UTC" in res.stdout
    assert [r[0] for r in table_rows(res.stdout)] == ["2026-11-02T09:00Z"]
    res = cli("timeline", *db, "--end-user", "bob", "--json", env=env)
    assert [r["hour"] for r in orjson.loads(res.stdout)] == ["2026-11-02T09:00Z"]


# --- --json and the table view ---------------------------------------------------------------


def test_json_is_complete_and_matches_the_table(scenario: Path) -> None:
    db = ["--db", str(scenario / "audit.db")]
    common = [*db, "--ledger-key", str(scenario / "ledger.key")]
    for args, key in (
        (["search", *db], "ts"),
        (["sessions", *db], "session_id"),
        (["top", *db], "person"),
        (["timeline", *db, "--end-user", "mallory"], "hour"),
        (["who-saw", *common, "--table", "customers", "--key", "125"], "ts"),
    ):
        rows = js(*args)
        assert isinstance(rows, list) and rows, args
        shown = table_rows(ok(*args))
        # (a long statement folds onto more lines of the same row: first cell empty)
        assert [r[0] for r in shown if r[0]] == [str(r[key]) for r in rows], args
    top = {r["person"]: r for r in js("top", *db)}
    assert {p: r["distinct_records"] for p, r in top.items()} == EXPECTED_DISTINCT
    # who-saw --key 125: bob's second read (50..150), alice's (120..130), mallory's (1..5000)
    assert {r["end_user"] for r in js("who-saw", *common, "--table", "customers",
                                      "--key", "125")} == {"bob", "alice", "mallory"}  # fmt: skip


def test_a_truncated_answer_says_so(scenario: Path) -> None:
    db = ["--db", str(scenario / "audit.db")]
    res = cli("search", *db, "--limit", "3", "--json")
    assert res.returncode == 0 and len(orjson.loads(res.stdout)) == 3
    assert "showing the first 3 events" in res.stderr
    res = cli("search", *db, "--limit", "1000")
    assert "showing the first" not in res.stderr


# --- hostile values from a real client -----------------------------------------------------

# Under 64 bytes: PostgreSQL (and so the proxy) keeps only 63 bytes of application_name.
HOSTILE_APP = '=HYPERLINK("http://e.x","go")[/]<script>alert(1)</script>'
# End users arrive in a sqlcommenter comment: no quote, no '*'.
HOSTILE_USERS = [
    "<script>alert(2)</script>",
    "[/]mallory",
    "+cmd|/C calc!A0",
    "@SUM(1+1)",
    "-2+3",
    "ev\x1b[2Jil\x1b]8;;http://evil.example\x07",
    'a,b"c\nd',
]


@pytest.fixture
def hostile_trail(pg: Cluster, enforce_db: str, tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A trail written by the real proxy for a client that chose its own application name
    and end-user names."""
    ledger = tmp_path / "ledger.key"
    assert cli("keygen", "--ledger", "--out", str(ledger)).returncode == 0
    db = tmp_path / "audit.db"
    config = {
        "policy_file": str(POLICY),
        "catalog_user": "postgres",
        "audit": {"sinks": [{"type": "sqlite", "path": str(db)}], "ledger_key": str(ledger)},
    }
    p = ProxyProcess(pg, tmp_path / "proxy", config=config)
    users = list(HOSTILE_USERS)
    try:
        conninfo = p.pg.dsn(user="support_app", port=p.port, dbname=DB, sslmode="disable")
        with psycopg.connect(conninfo, autocommit=True, application_name=HOSTILE_APP) as conn:
            for i, user in enumerate(users, 1):
                conn.execute(
                    f"/* end_user='{user}' */ SELECT customer_id, full_name, email FROM customers "
                    f"WHERE customer_id = {i}"
                ).fetchall()
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"/* end_user='{user}' */ SELECT * FROM customers")
    finally:
        p.stop()
    yield db, users


def test_hostile_values_neither_crash_nor_drive_the_terminal(
    hostile_trail: tuple[Path, list[str]],
) -> None:
    db, users = hostile_trail
    recorded = {r["end_user"] for r in js("search", "--db", str(db), "--kind", "statement")}
    assert recorded == set(users)
    # rich markup in a value ("[/]") crashed the table view; "[bold]" would restyle it
    for cmd in (["search"], ["sessions"], ["top"], ["timeline", "--end-user", "[/]mallory"]):
        out = ok(*cmd, "--db", str(db))
        assert "\x1b" not in out, cmd  # shown as the text \x1b, never sent to the terminal
        assert "[/]mallory" in out, cmd
    assert "\\x1b[2J" in ok("search", "--db", str(db))
    who = ok("who-saw", "--db", str(db), "--ledger-key", str(db.parent / "ledger.key"),
             "--table", "customers", "--key", "2")  # fmt: skip
    assert "[/]mallory" in who.splitlines()[-1]
    # One pooled connection, several people: the session lists every one of them.
    (session,) = js("sessions", "--db", str(db))
    assert session["end_users"] == sorted(users)


def test_csv_export_defuses_spreadsheet_formulas(
    hostile_trail: tuple[Path, list[str]], tmp_path: Path
) -> None:
    db, users = hostile_trail
    out = tmp_path / "events.csv"
    ok("export", "--db", str(db), "--format", "csv", "--out", str(out), "--kind", "statement")
    rows = list(csv.DictReader(io.StringIO(out.read_text(), newline="")))
    assert len(rows) == 2 * len(users)  # the CSV holds every event, newlines and all
    for r in rows:
        assert r["application"] == "'" + HOSTILE_APP  # starts with '='
    exported = {r["end_user"] for r in rows}
    for user in users:
        dangerous = user[0] in "=+-@\t\r"
        assert ("'" + user if dangerous else user) in exported, user
    assert {r["rows"] for r in rows} <= {"0", "1"}  # numbers stay numbers
    # JSON lines stay exact, for machines.
    lines = ok("export", "--db", str(db), "--kind", "statement").splitlines()
    assert {orjson.loads(x)["application"] for x in lines} == {HOSTILE_APP}


def test_records_seen_list_defuses_formulas_in_resolved_keys(pg: Cluster, tmp_path: Path) -> None:
    # Text primary keys come from the monitored database, where anyone who can insert a row
    # chooses them.
    keys = ['=HYPERLINK("http://e.x","go")', "@cmd", "-5", "plain"]
    pg.psql(
        "DROP DATABASE IF EXISTS notes_db WITH (FORCE); CREATE DATABASE notes_db;",
        database="postgres",
    )
    pg.psql(
        "CREATE TABLE notes (id text PRIMARY KEY);"
        + "".join(f"INSERT INTO notes VALUES ('{k}');" for k in keys),
        database="notes_db",
    )

    async def write() -> None:
        from audit.events import AuditEvent, Subject
        from audit.ledger import generate_key_file

        generate_key_file(tmp_path / "ledger.key")
        eve = Subject("support_app", "support", "helpdesk", "10.0.0.7", True, "eve")
        trail = AuditTrail(
            AuditConfig(
                sinks=[SQLiteSinkConfig(path=tmp_path / "audit.db")],
                ledger_key=tmp_path / "ledger.key",
            )
        )
        await trail.start()
        await trail.submit(
            AuditEvent.statement_event(
                "s-eve", eve, fingerprint="n", statement="SELECT id FROM notes",
                relations=["public.notes"], labels=["pii.note"], rows=len(keys),
                ledger_keys={"public.notes": keys},
            )
        )  # fmt: skip
        await trail.close()

    asyncio.run(write())
    out = tmp_path / "eve.csv"
    ok("records-seen", "--db", str(tmp_path / "audit.db"), "--ledger-key",
       str(tmp_path / "ledger.key"), "--end-user", "eve", "--table", "notes",
       "--out", str(out), "--resolve-dsn", pg.url(database="notes_db"))  # fmt: skip
    listed = {r["key"] for r in csv.DictReader(io.StringIO(out.read_text(), newline=""))}
    assert listed == {"'" + keys[0], "'@cmd", "-5", "plain"}
    # A resolve that cannot run says why.
    seen = ["records-seen", "--db", str(tmp_path / "audit.db"), "--ledger-key",
            str(tmp_path / "ledger.key"), "--end-user", "eve", "--table", "notes"]  # fmt: skip
    err = refused(*seen, "--resolve-dsn", "not a dsn")
    assert "cannot connect to the monitored database" in err
    err = refused(*seen, "--resolve-dsn", pg.url(user="analyst", database="notes_db"))
    assert "cannot read the keys of public.notes" in err and "permission denied" in err


def test_html_report_escapes_client_values(hostile_trail: tuple[Path, list[str]]) -> None:
    db, _ = hostile_trail
    page = db.parent / "report.html"
    ok("report", "--db", str(db), "--html", str(page))
    html = page.read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the application, shown as text
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert "<polyline" in html and "<svg" in html  # the plot still renders


# --- a store pgwarden is writing ---------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from audit.events import AuditEvent, Subject
    from audit.pipeline import AuditConfig, AuditTrail, PostgresSinkConfig, SQLiteSinkConfig

    async def main() -> None:
        d = Path(sys.argv[1])
        subject = Subject("support_app", "support", "helpdesk", "10.0.0.5", True, "bob")
        sinks = [SQLiteSinkConfig(path=d / "live.db")]
        sinks += [PostgresSinkConfig(dsn=dsn) for dsn in sys.argv[2:]]
        trail = AuditTrail(AuditConfig(sinks=sinks, ledger_key=d / "ledger.key",
                                       checkpoint_every=500))
        await trail.start()
        print("started", flush=True)
        i = 0
        while not (d / "stop").exists():
            i += 1
            await trail.submit(AuditEvent.statement_event(
                "s1", subject, fingerprint="f", statement="SELECT email FROM customers",
                relations=["public.customers"], labels=["pii.email"], rows=2,
                ledger_keys={"customers": [str(i), str(i + 1)]}))
        await trail.close()
        print(i, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_reading_while_pgwarden_writes(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    assert cli("keygen", "--ledger", "--out", str(tmp_path / "ledger.key")).returncode == 0
    extra: list[str] = []
    db = ["--db", str(tmp_path / "live.db")]
    if store == "postgres":
        pg: Cluster = request.getfixturevalue("pg")
        pg.psql(
            "DROP DATABASE IF EXISTS audit_live WITH (FORCE); CREATE DATABASE audit_live;",
            database="postgres",
        )
        extra = [pg.url(database="audit_live")]
        db = ["--dsn", extra[0]]
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), *extra], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "started"
        time.sleep(1.0)
        for _ in range(8):
            # verify reads the ledger and the events: both must come from one snapshot, or
            # events committed in between look like deleted ledger rows ("ledger_edited").
            res = cli("verify", *db, "--json")
            assert res.returncode == 0, res.stdout[:2000] + res.stderr
            assert orjson.loads(res.stdout)["intact"] is True
            top = js("top", *db)
            assert isinstance(top, list) and top[0]["person"] == "bob"
            # every row a statement returned is a record: the two counts come from one snapshot
            assert top[0]["distinct_records"] == top[0]["labelled_rows"] // 2 + 1
    finally:
        (tmp_path / "stop").touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and int(out.split()[-1]) > 0


# --- the PostgreSQL store ----------------------------------------------------------------------


def test_postgresql_store_exact_and_errors(pg: Cluster, tmp_path: Path) -> None:
    pg.psql(
        "DROP DATABASE IF EXISTS audit_responder WITH (FORCE); CREATE DATABASE audit_responder;",
        database="postgres",
    )
    url = pg.url(database="audit_responder")
    asyncio.run(seed(tmp_path, extra_sinks=[PostgresSinkConfig(dsn=url)]))
    dsn = ["--dsn", url]
    common = [*dsn, "--ledger-key", str(tmp_path / "ledger.key")]
    top = {r["person"]: r for r in js("top", *dsn)}
    assert {p: r["distinct_records"] for p, r in top.items()} == EXPECTED_DISTINCT
    labelled: dict[str, int] = {}
    for e in scenario_events():
        if e.kind == "statement" and e.labels and e.subject is not None:
            who = str(e.subject.end_user)
            labelled[who] = labelled.get(who, 0) + (e.rows or 0)
    assert {p: r["labelled_rows"] for p, r in top.items()} == labelled
    for person, n in EXPECTED_DISTINCT.items():
        res = js("records-seen", *common, "--end-user", person, "--table", "customers")
        assert res["distinct_records"] == n
    tl = js("timeline", *dsn, "--end-user", "bob")
    assert [r["hour"] for r in tl] == ["2026-11-02T09:00Z"]
    # the same answers as the SQLite store written by the same pipeline
    sq = ["--db", str(tmp_path / "audit.db")]
    for args in (["sessions"], ["search", "--kind", "statement"]):
        assert js(*args, *dsn) == js(*args, *sq), args
    err = refused("records-seen", *common, "--end-user", "bob", "--table", "customer")
    assert "public.customers" in err
    err = refused("top", *dsn, "--schema", "audit_typo")
    assert "no pgwarden audit store in schema 'audit_typo'" in err
    err = refused("top", "--dsn", pg.url(database="postgres"))
    assert "no pgwarden audit store" in err
