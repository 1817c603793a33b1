"""``pgwarden policy check|test|schema``: policy files reviewed like code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from policy.analyze import Analyzer
from policy.catalog import CatalogSnapshot
from policy.engine import Engine
from policy.model import Action, Policy, PolicyError, PolicyTest, json_schema, load_policy
from policy.subject import Subject
from policy.verdict import Verdict

DEFAULT_SCHEMA = Path(__file__).resolve().parent.parent / "config" / "support_schema.sql"


def _load(path: str) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)


@click.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def check_command(file: str) -> None:
    """Validate a policy file; errors name file:line and the problem."""
    policy = _load(file)
    kinds: dict[str, int] = {}
    for r in policy.rules:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items()))
    click.echo(
        f"{file}: ok — {len(policy.labels)} label patterns, {len(policy.subjects)} subjects, "
        f"{len(policy.rules)} rules ({summary or 'none'}), {len(policy.tests)} tests, "
        f"mode {policy.mode.value}"
    )


def outcome(verdict: Verdict) -> tuple[Action, str | None]:
    """What a policy test compares: the action and the deciding rule.

    A statement that runs under a streaming limit counts as 'allow' with that rule noted; a
    masked result as 'mask'.
    """
    if verdict.blocks:
        return verdict.action, verdict.rule_id
    plan = verdict.plan
    if plan is not None and plan.mask:
        return Action.MASK, None
    alerts = [f for f in verdict.findings if f.action is Action.ALERT and not f.monitored]
    if alerts:
        return Action.ALERT, alerts[0].rule_id
    return Action.ALLOW, None


def run_test(engine: Engine, analyzer: Analyzer, t: PolicyTest) -> tuple[bool, str]:
    subject = Subject(t.user, "", t.application, t.client, t.end_user, frozenset(t.roles))
    facts = analyzer.analyze(t.sql, tuple(t.search_path), t.user)
    verdicts = [engine.decide(subject, f) for f in facts]
    got = next(
        (v for v in verdicts if v.blocks), verdicts[-1] if verdicts else Verdict(Action.ALLOW)
    )
    action, rule = outcome(got)
    ok = action is t.expect and (t.rule is None or t.rule == rule)
    shown = action.value + (f" by {rule}" if rule else "")
    return ok, shown


@click.command("test")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--schema-sql",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="CREATE statements describing the database the policy guards "
    "[default: support_schema.sql beside FILE, else the repository's config/support_schema.sql].",
)
def test_command(file: str, schema_sql: Path | None) -> None:
    """Run the test cases written beside a policy (statement + subject -> expected verdict)."""
    from policy.schema_sql import snapshot_from_sql

    policy = _load(file)
    if schema_sql is None:
        beside = Path(file).resolve().parent / DEFAULT_SCHEMA.name
        schema_sql = beside if beside.is_file() else DEFAULT_SCHEMA
        if not schema_sql.is_file():
            raise click.ClickException(
                f"no schema to test against: neither {beside} nor {DEFAULT_SCHEMA} exists; "
                "give --schema-sql FILE with the CREATE statements of the guarded database"
            )
    snapshot: CatalogSnapshot = snapshot_from_sql(schema_sql.read_text())
    analyzer = Analyzer(snapshot, policy.label_rules())
    engine = Engine(policy)
    console = Console(highlight=False)
    table = Table(box=None, show_header=True, header_style="bold")
    for col in ("", "test", "expected", "got"):
        table.add_column(col)
    failed = 0
    for t in policy.tests:
        ok, shown = run_test(engine, analyzer, t)
        failed += not ok
        expected = t.expect.value + (f" by {t.rule}" if t.rule else "")
        table.add_row("[green]✓[/]" if ok else "[red]✗[/]", t.name, expected, shown)
    console.print(table)
    console.print(f"{len(policy.tests) - failed} passed, {failed} failed")
    if failed:
        sys.exit(1)


@click.command("schema")
@click.option("--out", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
def schema_command(out: str | None) -> None:
    """Print the JSON Schema of policy files (for editors and CI)."""
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if out:
        Path(out).write_text(text)
    else:
        click.echo(text, nl=False)
