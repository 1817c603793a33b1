"""``pgwarden policy ...`` and ``pgwarden classify``: commands for security teams.

``pgwarden policy explain [--dsn DSN | --schema-sql FILE] [--search-path a,b] [--labels FILE]
[--json] "SQL"`` shows what each statement reads, which labelled columns reach the client and
through what. ``pgwarden classify --dsn DSN [--sample N] [--out FILE]`` suggests labels.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from policy import enduser
from policy.analyze import Analyzer
from policy.catalog import CatalogSnapshot, load_catalog
from policy.facts import DataCopy, QueryFacts
from policy.labels import LabelRules
from policy.search_path import parse_search_path

DEFAULT_SCHEMA_SQL = Path("config/support_schema.sql")


@click.group("policy")
def policy_group() -> None:
    """Check, test and explain policy files."""


def _asyncpg_dsn(dsn: str) -> str:
    """asyncpg takes URLs; accept libpq key=value strings too."""
    if "://" in dsn:
        return dsn
    kv = dict(part.split("=", 1) for part in dsn.split())
    user = kv.get("user", "postgres")
    cred = f"{user}:{kv['password']}" if "password" in kv else user
    host = kv.get("host", "localhost")
    return f"postgresql://{cred}@{host}:{kv.get('port', '5432')}/{kv.get('dbname', user)}"


async def _load_from_dsn(dsn: str) -> CatalogSnapshot:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(dsn))
    try:
        return await load_catalog(conn)
    finally:
        await conn.close()


def _snapshot(dsn: str | None, schema_sql: Path | None) -> CatalogSnapshot:
    if dsn:
        try:
            return asyncio.run(_load_from_dsn(dsn))
        except Exception as exc:
            raise click.ClickException(f"could not read the catalog through --dsn: {exc}") from exc
    from policy.schema_sql import snapshot_from_file

    path = schema_sql or DEFAULT_SCHEMA_SQL
    if not path.exists():
        raise click.ClickException(
            f"no schema to analyse against: {path} does not exist. Give --dsn to read the "
            "catalog of a database, or --schema-sql FILE with its CREATE statements."
        )
    try:
        return snapshot_from_file(path)
    except ValueError as exc:
        raise click.ClickException(f"{path}: {exc}") from exc


def facts_to_dict(f: QueryFacts) -> dict[str, Any]:
    """A JSON-friendly view of one statement's facts (sets sorted)."""
    return f.as_dict()


def _print_facts(console: Console, i: int, f: QueryFacts) -> None:
    console.rule(f"[bold]statement {i}[/bold]: {f.kind}")
    console.print(Text.assemble(("normalised: ", "dim"), f.normalized))
    console.print(Text.assemble(("fingerprint: ", "dim"), f.fingerprint))
    if f.unanalysable:
        console.print(Text.assemble(("UNANALYSABLE: ", "bold red"), f.unanalysable))
    info = Table.grid(padding=(0, 2))
    info.add_column(style="dim")
    info.add_column()
    info.add_row("reads", ", ".join(sorted(f.relations_read)) or "-")
    if f.relations_written:
        info.add_row("writes", ", ".join(sorted(f.relations_written)))
    info.add_row("labels out", ", ".join(sorted(f.output_labels)) or "none")
    if f.filter_labels:
        info.add_row("filters on", ", ".join(sorted(f.filter_labels)))
    info.add_row("WHERE", "yes" if f.has_where else "no")
    limit = (
        "no" if not f.has_limit else (str(f.limit) if f.limit is not None else "yes (not literal)")
    )
    info.add_row("LIMIT", limit + (f", OFFSET {f.offset}" if f.offset is not None else ""))
    if f.star_tables:
        info.add_row("whole rows of", ", ".join(sorted(f.star_tables)))
    if f.copy_direction:
        info.add_row("COPY", f"{f.copy_direction} {f.copy_target} (source: {f.copy_source or '-'})")
    for p in f.packing:
        info.add_row("packs", f"{p.function}: {', '.join(sorted(p.labels)) or 'no labels'}")
    for cp in f.copies:
        info.add_row("copies into", f"{cp.target}: {', '.join(sorted(cp.labels)) or 'no labels'}")
    if f.functions:
        info.add_row("functions", ", ".join(sorted(f.functions)))
    if f.search_path is not None:
        info.add_row("search_path ->", ", ".join(f.search_path))
    if f.unresolved:
        info.add_row("not in catalog", ", ".join(f.unresolved))
    if f.unknown:
        info.add_row(
            "UNKNOWN",
            Text(
                f"{', '.join(f.unknown)}: refused to subjects with limits (fail-closed)",
                style="bold red",
            ),
        )
    if f.combined_labels:
        info.add_row(
            "COMBINED",
            Text(
                f"{', '.join(sorted(f.combined_labels))} of many records in one value: "
                "refused to subjects with limits (one-record-per-row)",
                style="bold red",
            ),
        )
    if f.records_per_row > 1:
        info.add_row("records a row", f"{f.records_per_row} (limits count each row as that many)")
    console.print(info)
    if f.output:
        table = Table(show_header=True, header_style="bold")
        table.add_column("#", justify="right")
        table.add_column("column")
        table.add_column("labels", style="red")
        table.add_column("derived from")
        for n, c in enumerate(f.output, 1):
            table.add_row(
                str(n),
                c.name,
                ", ".join(sorted(c.labels)),
                ", ".join(sorted(map(str, c.sources))) or "-",
            )
        console.print(table)


@policy_group.command("explain")
@click.argument("sql")
@click.option("--dsn", help="Read the catalog from this database (read-only queries).")
@click.option(
    "--schema-sql",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"Without --dsn: build the catalog from CREATE statements (default {DEFAULT_SCHEMA_SQL}).",
)
@click.option("--search-path", default="public", show_default=True, help="Comma-separated.")
@click.option("--user", help="Role name that $user in the search_path stands for.")
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A labels YAML file (as `pgwarden classify` writes) to apply on top of comments.",
)
@click.option(
    "--admin",
    help="A running pgwarden's admin URL (http://127.0.0.1:9930): apply the labels its "
    "sessions' committed writes copied into other tables (GET /taint).",
)
@click.option("--database", default="support", show_default=True, help="With --admin.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def explain_command(
    sql: str,
    dsn: str | None,
    schema_sql: Path | None,
    search_path: str,
    user: str | None,
    labels_file: Path | None,
    admin: str | None,
    database: str,
    as_json: bool,
) -> None:
    """Show what SQL reads, which labelled columns reach the client, and through what."""
    snapshot = _snapshot(dsn, schema_sql)
    try:
        rules = LabelRules.from_yaml(labels_file) if labels_file else LabelRules()
    except ValueError as exc:
        raise click.ClickException(f"{labels_file}: {exc}") from exc
    analyzer = Analyzer(snapshot, rules)
    if admin:
        analyzer.note_copies(_live_taint(admin, database))
    facts = analyzer.analyze(sql, parse_search_path(search_path), user)
    if as_json:
        click.echo(orjson.dumps([facts_to_dict(f) for f in facts], option=orjson.OPT_INDENT_2))
        return
    console = Console()
    if not facts:
        console.print("no statements")
    for i, f in enumerate(facts, 1):
        _print_facts(console, i, f)


@policy_group.command("sign-end-user")
@click.argument("name")
@click.option(
    "--key", "key_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The policy's end_user_key file.",
)  # fmt: skip
@click.option("--ttl", default=300, show_default=True, help="Seconds the token is good for.")
def sign_end_user_command(name: str, key_file: Path, ttl: int) -> None:
    """Print a token naming NAME as the end user, for subjects with end_user_signed.

    Applications sign in their own code (policy.enduser.sign, or the same HMAC in any
    language); this command is for trying a policy by hand.  Send the token where the name
    went: /* end_user='TOKEN' */ or SET pgwarden.end_user = 'TOKEN'."""
    try:
        key = key_file.read_bytes().strip()
    except OSError as exc:
        raise click.ClickException(f"{key_file}: cannot read the key: {exc.strerror}") from None
    try:
        click.echo(enduser.sign(key, name, ttl))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _live_taint(admin: str, database: str) -> list[DataCopy]:
    """What a running pgwarden's /taint says was copied where, as copies to apply."""
    url = admin.rstrip("/") + "/taint"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            taint = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"could not read {url}: {exc}") from exc
    return [
        DataCopy(table, frozenset(), frozenset(labels), column)
        for table, columns in taint.get(database, {}).items()
        for column, labels in columns.items()
    ]


@click.command("classify")
@click.option("--dsn", required=True, help="Database to sample (read-only).")
@click.option("--sample", default=200, show_default=True, help="Values sampled per column.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the suggested labels YAML here (default: print it).",
)
def classify_command(dsn: str, sample: int, out: Path | None) -> None:
    """Suggest column labels from column names and sampled values, for a person to review."""
    from policy.classify import labels_yaml, sample_database, suggest

    async def run() -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(_asyncpg_dsn(dsn))
        try:
            return await sample_database(conn, sample)
        finally:
            await conn.close()

    try:
        samples = asyncio.run(run())
    except Exception as exc:
        raise click.ClickException(f"could not sample the database: {exc}") from exc
    suggestions = suggest(samples)
    console = Console(stderr=out is None)
    table = Table(title=f"suggested labels ({len(samples)} columns sampled)", header_style="bold")
    for col in ("column", "label", "evidence", "examples (masked)"):
        table.add_column(col)
    for s in suggestions:
        table.add_row(s.column, s.label, s.evidence, ", ".join(s.examples))
    console.print(table)
    text = labels_yaml(suggestions, source="sampled data")
    if out is None:
        click.echo(text)
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {len(suggestions)} suggestions to {out}: review before use")
