"""``pgwarden audit ...``: the incident responder's commands.

Every query command reads either the SQLite store (``--db PATH``) or the central PostgreSQL
store (``--dsn DSN``), prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from audit import query as q
from audit.chain import SigningKeyError, generate_signing_key, load_public_key
from audit.events import ts_of
from audit.ledger import LedgerKeyError, RecordHasher, generate_key_file, load_key

F = TypeVar("F", bound=Callable[..., Any])


def _console() -> Console:
    # Piped output (a file, a ticket, a test) gets wide lines instead of words folded over
    # several rows; a terminal keeps its own width.
    return Console(width=None if sys.stdout.isatty() else 200)


class CannotAnswer(click.ClickException):
    """The question could not be answered (unreadable store, key or file).

    Exit code 2, like click's usage errors, so that a script can tell it from ``verify``'s 1
    ("the trail has a problem")."""

    exit_code = 2


_INPUT_ERRORS = (q.QueryError, LedgerKeyError, SigningKeyError, OSError)


def _run(coro: Awaitable[Any]) -> Any:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except BrokenPipeError:
        raise  # the reader of our output went away; see _AuditGroup
    except _INPUT_ERRORS as exc:
        raise CannotAnswer(_sentence(exc)) from exc


def _sentence(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        # a file names itself; a socket (a store connection lost mid-query) does not
        return f"{exc.filename}: {exc.strerror}" if exc.filename else f"{exc.strerror}."
    return str(exc)


def _hasher(path: Path) -> RecordHasher:
    try:
        return RecordHasher(load_key(path))
    except LedgerKeyError as exc:
        raise CannotAnswer(str(exc)) from exc


def store_options(fn: F) -> F:
    """--db / --dsn / --schema / --json on every query command."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
    fn = click.option(
        "--schema",
        default="pgwarden_audit",
        show_default=True,
        help="Schema of the PostgreSQL store.",
    )(fn)
    fn = click.option("--dsn", default=None, help="DSN of the PostgreSQL audit store.")(fn)
    fn = click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="SQLite audit database.",
    )(fn)
    return fn


_SINCE_HELP = (
    "From this time: ISO-8601 (UTC unless it carries a zone such as +02:00 or Z) "
    "or an age (30m, 24h, 7d, 2w)."
)
_UNTIL_HELP = "Before this time (same forms as --since)."


_PERSON_HELP = (
    "Person: the end user the application named, otherwise the database user "
    "(staff logged in as their own role)."
)


def person_options(fn: F) -> F:
    """--person / --end-user / --db-user for the commands about one person."""
    fn = click.option("--db-user", help="Database user (every end user it named, and none).")(fn)
    fn = click.option("--end-user", help="End user named by the application.")(fn)
    return click.option("--person", help=_PERSON_HELP)(fn)


def _who(person: str | None, end_user: str | None, db_user: str | None) -> q.Who:
    try:
        return q.Who(end_user=end_user, db_user=db_user, person=person)
    except q.QueryError as exc:
        raise click.UsageError(
            "name exactly one person: --person NAME (the end user, else the database user), "
            "--end-user NAME or --db-user NAME"
        ) from exc


def filter_options(fn: F) -> F:
    """The filters shared by search, sessions and export."""
    for opt in reversed(
        [
            click.option("--person", help=_PERSON_HELP),
            click.option("--db-user", "--user", "db_user", help="Database user."),
            click.option("--end-user", help="End user named by the application."),
            click.option("--application", help="application_name."),
            click.option("--client", "client_addr", help="Client address."),
            click.option("--since", help=_SINCE_HELP),
            click.option("--until", help=_UNTIL_HELP),
            click.option("--relation", help="Table or view (schema.table; public. assumed)."),
            click.option("--label", help="Label such as pii.email."),
            click.option("--verdict", help="allow, block, limit, mask, ..."),
            click.option(
                "--min-rows", type=int, help="Only statements returning at least this many rows."
            ),
            click.option("--session", "session_id", help="Session id."),
            click.option("--kind", "kinds", multiple=True, help="Event kind (repeatable)."),
        ]
    ):
        fn = opt(fn)
    return fn


def _filters(kw: dict[str, Any]) -> q.Filters:
    since, until = _window(kw.pop("since", None), kw.pop("until", None))
    return q.Filters(
        db_user=kw.pop("db_user", None),
        end_user=kw.pop("end_user", None),
        person=kw.pop("person", None),
        application=kw.pop("application", None),
        client_addr=kw.pop("client_addr", None),
        since=since,
        until=until,
        relation=kw.pop("relation", None),
        label=kw.pop("label", None),
        verdict=kw.pop("verdict", None),
        min_rows=kw.pop("min_rows", None),
        session_id=kw.pop("session_id", None),
        kinds=tuple(kw.pop("kinds", ()) or ()),
    )


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        return q.parse_time(text)
    except q.QueryError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def _window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """--since and --until read, and checked to make a window: swapped, they would match
    nothing, and "no matching events" would read as "nothing happened"."""
    s_t, u_t = _time(since, "--since"), _time(until, "--until")
    if s_t is not None and u_t is not None and s_t >= u_t:
        raise click.BadParameter(
            f"--since ({ts_of(s_t)}) is not before --until ({ts_of(u_t)}): the window is empty",
            param_hint="--since/--until",
        )
    return s_t, u_t


async def _with_store(
    db: Path | None, dsn: str | None, schema: str, fn: Callable[[q.Store], Awaitable[Any]]
) -> Any:
    store = await q.open_store(db, dsn, schema)
    try:
        return await fn(store)
    finally:
        await store.close()


def _emit(
    rows: Sequence[dict[str, Any]],
    cols: Sequence[str],
    as_json: bool,
    title: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(list(rows), option=orjson.OPT_INDENT_2) + b"\n")
        return
    table = Table(title=Text(title) if title else None)
    for c in cols:
        table.add_column((headers or {}).get(c, c), overflow="fold")
    for r in rows:
        table.add_row(*[_cell(r.get(c)) for c in cols])
    _console().print(table)
    if not rows:
        _console().print("[dim]no matching events[/dim]")


# Terminal control characters (ESC starts colour, cursor and hyperlink sequences; CR
# overwrites a line) and bidi overrides that reorder what is shown.  Application names, end
# users and statement text come from clients: they must reach the responder's terminal as
# visible escapes, never as instructions to it.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(text: str) -> str:
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _limit_note(rows: Sequence[Any], limit: int, what: str) -> None:
    # On stderr, so that --json stays one JSON document; a responder must not take the
    # first page for the whole answer.
    if len(rows) >= limit:
        click.echo(
            f"showing the first {limit} {what} only: there may be more; raise --limit, "
            "narrow the window, or use export",
            err=True,
        )


def _cell(v: Any) -> Text:
    # A Text is never parsed as rich markup: a value such as "[/]" would otherwise crash the
    # table, and "[white on white]" would hide itself.
    if v is None:
        return Text("")
    if isinstance(v, list):
        return Text(_visible(", ".join(map(str, v))))
    return Text(_visible(str(v)))


def _safe(v: Any) -> str:
    """A stored value to embed in a rich markup string."""
    return escape(_visible(str(v)))


# Spreadsheets run a cell that starts with one of these as a formula (=HYPERLINK(...),
# +cmd|'/C calc'!A0, @SUM(...)); OWASP's defence is a leading apostrophe, which the
# spreadsheet shows as text.  Plain numbers such as -5 are left alone: no formula there.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?([eE][+-]?\d+)?")


def csv_cell(v: Any) -> Any:
    """A value as written to a CSV file a responder may open in a spreadsheet."""
    if v is None:
        return ""
    if isinstance(v, list | dict):
        v = orjson.dumps(v).decode()
    if isinstance(v, str) and v.startswith(_FORMULA_START) and not _NUMBER.fullmatch(v):
        return "'" + v
    return v


def _check_out(path: Path | None) -> None:
    """Refuse an output file that cannot be created before the query runs, not after."""
    if path is not None and not path.parent.is_dir():
        raise CannotAnswer(f"cannot write {path}: there is no directory {path.parent}")


class _AuditGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # `pgwarden audit export ... | head`: the reader has all it wanted.  Exit as
            # a tool killed by SIGPIPE would, without a traceback, and keep Python's
            # final flush of stdout from failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)


@click.group("audit", cls=_AuditGroup)
def audit_group() -> None:
    """Query and verify the audit trail."""


# --- keys ------------------------------------------------------------------------------------


@audit_group.command("keygen")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Key file to create.",
)
@click.option(
    "--ledger",
    "--hmac",
    "hmac_key",
    is_flag=True,
    help="Make a record-ledger key (a 256-bit secret) instead of a signing key.",
)
def keygen(out: Path, hmac_key: bool) -> None:
    """Create a checkpoint signing key (Ed25519, plus OUT.pub) or a record-ledger key."""
    _check_out(out)
    try:
        if hmac_key:
            generate_key_file(out)
            click.echo(f"wrote ledger key {out} (mode 600); set audit.ledger_key to it")
        else:
            pub = generate_signing_key(out)
            click.echo(f"wrote signing key {out} (mode 600) and public key {pub}")
            click.echo("give the public key to whoever runs `pgwarden audit verify --public-key`")
    except FileExistsError as exc:
        raise click.ClickException(f"{out} already exists; refusing to overwrite a key") from exc
    except OSError as exc:
        raise CannotAnswer(f"cannot write the key {out}: {exc.strerror}") from exc


# --- verify ----------------------------------------------------------------------------------


@audit_group.command("verify")
@store_options
@click.option(
    "--jsonl",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify a JSON lines trail instead.",
)
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Checks checkpoint signatures.",
)
@click.option(
    "--checkpoints",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Checkpoints received out of band (JSON lines): detects truncation.",
)
@click.option("--chain", "chain_id", help="Only this chain id.")
def verify_cmd(
    db: Path | None, dsn: str | None, schema: str, as_json: bool, jsonl: Path | None,
    public_key: Path | None, checkpoints: Path | None, chain_id: str | None,
) -> None:  # fmt: skip
    """Check the hash chain: report the first edited, deleted, reordered or missing event."""
    try:
        pub = load_public_key(public_key) if public_key else None
        ext = q.read_checkpoints(checkpoints) if checkpoints else []
    except _INPUT_ERRORS as exc:
        raise CannotAnswer(_sentence(exc)) from exc

    async def go(store: q.Store) -> list[Any]:
        return await q.verify(store, public_key=pub, external=ext, chain_id=chain_id)

    if jsonl is not None:
        from audit.chain import ChainVerifier
        from audit.sinks.jsonl import read_jsonl

        # One pass over the files, one streaming verifier per chain.
        verifiers: dict[str, ChainVerifier] = {}
        records = read_jsonl(jsonl)
        for n, rec in enumerate(_readable(records, jsonl), 1):
            if not isinstance(rec, dict) or not rec.keys() >= _CHAIN_FIELDS:
                raise CannotAnswer(
                    f"event {n} of {jsonl} is not an audit event (no chain_id, seq, hash); "
                    "is this a pgwarden JSON lines trail?"
                )
            cid = str(rec.get("chain_id"))
            if chain_id is not None and cid != chain_id:
                continue
            if cid not in verifiers:
                verifiers[cid] = ChainVerifier(cid, public_key=pub)
            verifiers[cid].feed(rec)
        for cp in ext:
            if cp.chain_id not in verifiers and (chain_id is None or cp.chain_id == chain_id):
                verifiers[cp.chain_id] = ChainVerifier(cp.chain_id, public_key=pub)
        reports = [v.finish(ext) for v in verifiers.values()]
    else:
        reports = _run(_with_store(db, dsn, schema, go))
    ok = all(r.intact for r in reports)
    if as_json:
        sys.stdout.buffer.write(
            orjson.dumps(
                {"intact": ok, "chains": [r.as_dict() for r in reports]}, option=orjson.OPT_INDENT_2
            )
            + b"\n"
        )
    else:
        if not reports:
            _console().print("the trail holds no events")
        for r in reports:
            if r.intact:
                _console().print(
                    f"[green]chain {_safe(r.chain_id)}: intact[/green] — {r.events} events "
                    f"({r.first_seq}..{r.last_seq}), {r.checkpoints} checkpoints"
                )
            else:
                first = r.problems[0]
                _console().print(
                    f"[red]chain {_safe(r.chain_id)}: {first.kind}[/red] — {_safe(first.message)}"
                )
                if len(r.problems) > 1:
                    _console().print(
                        f"  and {len(r.problems) - 1} more problem(s); --json lists them all"
                    )
        if pub is None:
            _console().print(
                "[yellow]no --public-key: checkpoint signatures were not checked[/yellow]"
            )
    sys.exit(0 if ok else 1)


_CHAIN_FIELDS = {"chain_id", "seq", "prev_hash", "hash"}


def _readable(records: Iterator[Any], path: Path) -> Iterator[Any]:
    """The records of a JSON lines trail; a line that is not JSON ends the run with a sentence
    (a torn last line after a crash, or a file that is not a trail at all)."""
    n = 0
    try:
        for rec in records:
            n += 1
            yield rec
    except orjson.JSONDecodeError as exc:
        raise CannotAnswer(
            f"{path}: event {n + 1} is not valid JSON ({exc}); is this a pgwarden JSON lines trail?"
        ) from exc
    except OSError as exc:
        raise CannotAnswer(_sentence(exc)) from exc


# --- queries ---------------------------------------------------------------------------------

_SEARCH_COLS = [
    "ts",
    "kind",
    "person",
    "db_user",
    "client_addr",
    "statement",
    "labels",
    "rows",
    "verdict",
    "rule_ids",
]


@audit_group.command("search")
@store_options
@filter_options
@click.option("--limit", default=200, show_default=True)
def search_cmd(
    db: Path | None, dsn: str | None, schema: str, as_json: bool, limit: int, **kw: Any
) -> None:
    """Find events by person, application, client, time, relation, label, verdict, rows."""
    f = _filters(kw)
    rows = _run(_with_store(db, dsn, schema, lambda s: q.search(s, f, limit)))
    _emit(rows, _SEARCH_COLS, as_json, "audit events")
    _limit_note(rows, limit, "events (oldest first)")


@audit_group.command("sessions")
@store_options
@filter_options
@click.option("--limit", default=200, show_default=True)
def sessions_cmd(
    db: Path | None, dsn: str | None, schema: str, as_json: bool, limit: int, **kw: Any
) -> None:
    """One line per session: who, from where, when, labelled rows, blocks."""
    f = _filters(kw)
    rows = _run(_with_store(db, dsn, schema, lambda s: q.sessions(s, f, limit)))
    cols = [
        "session_id",
        "started",
        "last_seen",
        "persons",
        "db_user",
        "application",
        "client_addr",
        "statements",
        "labelled_rows",
        "blocks",
    ]
    _emit(rows, cols, as_json, "sessions")
    _limit_note(rows, limit, "sessions (earliest first)")


@audit_group.command("timeline")
@store_options
@person_options
@click.option("--since", help=_SINCE_HELP)
@click.option("--until", help=_UNTIL_HELP)
@click.option(
    "--bucket",
    type=click.Choice(list(q.BUCKETS)),
    default="1h",
    show_default=True,
    help="One row per UTC minute, hour or day.",
)
def timeline_cmd(
    db: Path | None, dsn: str | None, schema: str, as_json: bool, person: str | None,
    end_user: str | None, db_user: str | None, since: str | None, until: str | None,
    bucket: str,
) -> None:  # fmt: skip
    """Per minute, hour or day for one person: statements, labelled rows, blocks."""
    who = _who(person, end_user, db_user)
    s_t, u_t = _window(since, until)
    rows = _run(_with_store(db, dsn, schema, lambda s: q.timeline(s, who, s_t, u_t, bucket)))
    unit = q.BUCKETS[bucket][0]
    _emit(
        rows,
        ["bucket", "statements", "labelled_rows", "blocks", "sessions"],
        as_json,
        f"timeline of {_visible(who.name)}, per {unit} in UTC",
        headers={"bucket": f"{unit} (UTC)"},
    )


@audit_group.command("top")
@store_options
@click.option("--since", help=_SINCE_HELP)
@click.option("--until", help=_UNTIL_HELP)
@click.option("--limit", default=20, show_default=True)
def top_cmd(
    db: Path | None,
    dsn: str | None,
    schema: str,
    as_json: bool,
    since: str | None,
    until: str | None,
    limit: int,
) -> None:
    """Who received the most distinct labelled records in a window (bytes beside)."""
    s_t, u_t = _window(since, until)
    rows = _run(_with_store(db, dsn, schema, lambda s: q.top(s, s_t, u_t, limit)))
    _emit(
        rows,
        [
            "person",
            "distinct_records",
            "labelled_bytes",
            "labelled_rows",
            "statements",
            "blocks",
            "sessions",
        ],
        as_json,
        "top readers of labelled data, by distinct records",
    )


@audit_group.command("export")
@store_options
@filter_options
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="File to write (default stdout)."
)
def export_cmd(
    db: Path | None,
    dsn: str | None,
    schema: str,
    as_json: bool,
    fmt: str,
    out: Path | None,
    **kw: Any,
) -> None:
    """Export matching events for a SIEM (JSON lines or CSV, all columns)."""
    f = _filters(kw)
    _check_out(out)

    async def go(store: q.Store) -> int:
        fh = open(out, "w", newline="") if out else sys.stdout  # noqa: SIM115
        n = 0
        try:
            from audit.events import COLUMNS

            writer = csv.DictWriter(fh, fieldnames=list(COLUMNS)) if fmt == "csv" else None
            if writer:
                writer.writeheader()
            async for row in q.export(store, f):
                n += 1
                if writer:
                    writer.writerow({k: csv_cell(v) for k, v in row.items()})
                else:
                    fh.write(orjson.dumps(row, option=orjson.OPT_SORT_KEYS).decode() + "\n")
        finally:
            if out:
                fh.close()
        return n

    n = _run(_with_store(db, dsn, schema, go))
    if out:
        click.echo(f"exported {n} events to {out}", err=True)


@audit_group.command("report")
@store_options
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--since", help=_SINCE_HELP)
@click.option("--until", help=_UNTIL_HELP)
@click.option(
    "--people",
    type=click.IntRange(min=1),
    default=25,
    show_default=True,
    help="A section for each of this many people, by distinct records received.",
)
def report_cmd(
    db: Path | None, dsn: str | None, schema: str, as_json: bool, html_out: Path,
    since: str | None, until: str | None, people: int,
) -> None:  # fmt: skip
    """Write a self-contained HTML report: people ranked by distinct records received, and per
    person their reads by minute and channel, sessions, blocks, canary hits and quarantines."""
    from audit.report import render_html
    from audit.report_data import gather

    s_t, u_t = _window(since, until)

    async def go(store: q.Store) -> str:
        data = await gather(store, s_t, u_t, people)
        reports = await q.verify(store)
        bad = [r for r in reports if not r.intact]
        summary = (
            f"{len(reports)} chain(s) intact (signatures not checked here; run verify --public-key)"
            if not bad
            else "; ".join(f"{r.chain_id}: {r.problems[0].message}" for r in bad)
        )
        window = f"{since or 'beginning'} to {until or 'now'}"
        return render_html(
            title="pgwarden audit report", window=window, data=data, verify_summary=summary
        )

    _check_out(html_out)
    html = _run(_with_store(db, dsn, schema, go))
    try:
        html_out.write_text(html)
    except OSError as exc:
        raise CannotAnswer(f"cannot write {html_out}: {exc.strerror}") from exc
    if as_json:
        click.echo(orjson.dumps({"written": str(html_out)}).decode())
    else:
        click.echo(f"wrote {html_out}")


# --- the record ledger -----------------------------------------------------------------------


def ledger_key_option(fn: F) -> F:
    return click.option(
        "--ledger-key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        required=True,
        help="The ledger key file the proxy's audit.ledger_key names.",
    )(fn)


async def _check_key(store: q.Store, hasher: RecordHasher, path: Path) -> None:
    """Refuse a ledger key that did not write this trail's ledger: every digest it makes
    would be missing, and "nobody" would read as an answer."""
    check = await q.check_ledger_key(store, hasher)
    if check.other and not check.matching:
        raise q.QueryError(
            f"the ledger key {path} is not the key this trail's ledger was written with (its "
            "check value matches none recorded in the trail): every record would be reported "
            "as seen by nobody; use the file that audit.ledger_key named in the pgwarden that "
            "wrote this trail"
        )
    if check.other:
        click.echo(
            f"warning: part of this trail's ledger was written with another key than {path} "
            "(a key rotation, or several deployments in one store): records written with it "
            f"are not found with this one (writers: {', '.join(map(_visible, check.other))})",
            err=True,
        )


@audit_group.command("who-saw")
@store_options
@ledger_key_option
@click.option("--table", help="Labelled table (schema.table; public. assumed).")
@click.option(
    "--key",
    multiple=True,
    help="Primary key as text; a composite key as one --key per column, in key order "
    '(or a JSON array such as \'["1","x,y"]\').',
)
@click.option("--value", help="A labelled value, e.g. an e-mail address.")
@click.option("--label", help="Label of --value (default: every label in the ledger).")
@click.option("--since", help=_SINCE_HELP)
@click.option("--until", help=_UNTIL_HELP)
@click.option(
    "--resolve-dsn",
    help="DSN of the monitored database: also find reads of the record's values (--key), or "
    "of the records holding the value (--value; in --table, else every table with a key).",
)
def who_saw_cmd(
    db: Path | None, dsn: str | None, schema: str, as_json: bool, ledger_key: Path,
    table: str | None, key: tuple[str, ...], value: str | None, label: str | None,
    since: str | None, until: str | None, resolve_dsn: str | None,
) -> None:  # fmt: skip
    """Which sessions and people received a given record (or labelled value)."""
    hasher = _hasher(ledger_key)
    s_t, u_t = _window(since, until)
    key_arg: str | tuple[str, ...] | None = (key[0] if len(key) == 1 else key) or None

    async def go(store: q.Store) -> list[dict[str, Any]]:
        await _check_key(store, hasher, ledger_key)
        resolved = (
            await q.resolve_who_saw(
                hasher, resolve_dsn, store, table=table, key=key_arg, value=value
            )
            if resolve_dsn
            else []
        )
        return await q.who_saw(
            store, hasher, table=table, key=key_arg, value=value, label=label,
            since=s_t, until=u_t, resolved=resolved,
        )  # fmt: skip

    rows = _run(_with_store(db, dsn, schema, go))
    _emit(
        rows,
        [
            "ts",
            "person",
            "db_user",
            "client_addr",
            "application",
            "session_id",
            "statement",
            "rows",
        ],
        as_json,
        "who saw it",
    )
    if not as_json:
        people = sorted({str(r.get("end_user") or r.get("db_user")) for r in rows})
        n_sessions = len({r["session_id"] for r in rows})
        _console().print(
            f"{len(rows)} statement(s) in {n_sessions} session(s) by: "
            f"{_safe(', '.join(people)) or 'nobody'}"
        )


@audit_group.command("records-seen")
@store_options
@ledger_key_option
@person_options
@click.option("--table", required=True)
@click.option("--since", help=_SINCE_HELP)
@click.option("--until", help=_UNTIL_HELP)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the list (CSV: digest, key, first_seen, last_seen, times, via).",
)
@click.option(
    "--resolve-dsn",
    help="DSN of the monitored database: hash its keys to turn digests back into keys.",
)
def records_seen_cmd(
    db: Path | None, dsn: str | None, schema: str, as_json: bool, ledger_key: Path,
    person: str | None, end_user: str | None, db_user: str | None, table: str,
    since: str | None, until: str | None, out: Path | None, resolve_dsn: str | None,
) -> None:  # fmt: skip
    """Count and export the distinct records one person received: the notification list."""
    who = _who(person, end_user, db_user)
    hasher = _hasher(ledger_key)
    s_t, u_t = _window(since, until)

    async def go(store: q.Store) -> q.RecordsSeen:
        await _check_key(store, hasher, ledger_key)
        res = await q.records_seen(
            store, end_user=who.end_user, db_user=who.db_user, person=who.person,
            table=table, since=s_t, until=u_t,
        )  # fmt: skip
        if resolve_dsn:
            res = await q.resolve_keys(res, hasher, resolve_dsn)
        return res

    _check_out(out)
    res = _run(_with_store(db, dsn, schema, go))
    if out:
        try:
            with open(out, "w", newline="") as fh:
                w = csv.writer(fh)
                # "via": "key" for a record named by its key digest, else the label of the
                # value it was found by; a value not (yet) tied to a row has no key.
                w.writerow(["digest", "key", "first_seen", "last_seen", "times", "via"])
                unplaced = [v for v in res.values if "key" not in v]
                for r in [*res.records, *unplaced]:
                    via = r.get("via") or r.get("label") or "key"
                    w.writerow(
                        [
                            csv_cell(v)
                            for v in (r["digest"], r.get("key"), r["first_seen"], r["last_seen"])
                        ]
                        + [r["times"], via]
                    )
        except OSError as exc:
            raise CannotAnswer(f"cannot write {out}: {exc.strerror}") from exc
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(res.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        return
    _console().print(
        f"{_safe(who.name)} received {len(res.records)} distinct record(s) of {_safe(res.table)}"
        + (f"; {res.resolved} resolved to keys" if resolve_dsn else "")
    )
    unplaced = [v for v in res.values if "key" not in v]
    if unplaced:
        per_label: dict[str, int] = {}
        for v in unplaced:
            per_label[v["label"]] = per_label.get(v["label"], 0) + 1
        labels = ", ".join(f"{n} {lb}" for lb, n in sorted(per_label.items()))
        _console().print(
            f"and {len(unplaced)} labelled value(s) in rows without a key ({_safe(labels)})"
            + (
                f": none is in a row of {_safe(res.table)} now"
                if resolve_dsn
                else f"; --resolve-dsn finds the rows of {_safe(res.table)} that hold them"
            )
        )
    bound = (
        f"up to {res.table_rows:,} records (the table's size now)"
        if res.table_rows is not None
        else "up to every record of the table (--resolve-dsn gives its size)"
    )
    for rows, what in (
        (res.unitemised, "returned labelled rows of"),
        (res.computed, "read, and returned rows computed from,"),
    ):
        if not rows:
            continue
        _console().print(
            f"[bold]{len(rows)} statement(s) {what} {_safe(res.table)} without naming "
            f"its records[/bold]; each may hold {bound}:"
        )
        for u in rows[:50]:
            _console().print(
                f"  statement {u['seq']} at {u['ts']} (session {_safe(str(u['session_id']))}, "
                f"{u['rows']} row(s)): {_safe(str(u['statement'])[:120])}"
            )
    if out:
        _console().print(f"list written to {_safe(out)}")
    else:
        _emit(res.records[:50], ["digest", "key", "first_seen", "last_seen", "times"], False)
        if len(res.records) > 50:
            _console().print(
                f"[dim]... {len(res.records) - 50} more; use --out FILE or --json[/dim]"
            )
