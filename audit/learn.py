"""``pgwarden policy learn`` and ``pgwarden policy drift``: allow-lists from the audit trail.

``learn`` reads the statements some subjects ran in a time range (SQLite or PostgreSQL store)
and writes, or updates in place, a reviewable allow-list (``policy.allowlist``) of their
shapes.  ``drift`` lists the shapes seen since an allow-list was learned that are not on it,
per subject, with counts and example times: what the security team reviews each week.

Only statements the policy let run are learned (refused ones are exactly what must not be
learned), and the subject of each is worked out as the policy would (database user,
application, client address, end user; subjects matched by role membership cannot be told
from the trail, which does not record roles).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from audit.query import Filters, QueryError, Store, export, open_store, parse_time
from policy import allowlist
from policy.engine import Engine
from policy.model import Policy, PolicyError, load_policy
from policy.subject import Subject

T = TypeVar("T")

# Verdicts of statements that did not run: never learned.
_REFUSED = frozenset(("block", "quarantine", "end_session"))


def _run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except (QueryError, allowlist.AllowListError, PolicyError) as exc:
        raise click.ClickException(str(exc)) from None


@dataclass
class _Subjects:
    """Which of the policy's subjects each trail event's session was (cached by who)."""

    engine: Engine
    cache: dict[tuple[Any, ...], frozenset[str]] = field(default_factory=dict)

    def of(self, e: dict[str, Any]) -> frozenset[str]:
        key = (e.get("db_user"), e.get("database"), e.get("application"),
               e.get("client_addr"), e.get("end_user"))  # fmt: skip
        hit = self.cache.get(key)
        if hit is None:
            s = Subject(key[0] or "", key[1] or "", key[2] or "", key[3] or "", key[4], frozenset())
            hit = self.cache[key] = self.engine.subjects_of(s)
        return hit


async def _statements(store: Store, since: datetime | None, until: datetime | None) -> Any:
    async for e in export(store, Filters(since=since, until=until, kinds=("statement",))):
        yield e


async def learn(
    store: Store, policy: Policy, subjects: list[str], since: datetime | None,
    until: datetime | None,
) -> tuple[dict[str, allowlist.Learned], int]:  # fmt: skip
    """(shape -> what the trail says of it, statements read) for the subjects' statements."""
    who = _Subjects(Engine(policy))
    wanted = frozenset(subjects)
    out: dict[str, allowlist.Learned] = {}
    n = 0
    async for e in _statements(store, since, until):
        if (e.get("verdict") or "") in _REFUSED or not (who.of(e) & wanted):
            continue
        text = e.get("statement") or ""
        fp = e.get("fingerprint")
        if not fp or allowlist.exempt_text(text):
            continue
        n += 1
        got = out.get(fp)
        if got is None:
            got = out[fp] = allowlist.Learned(text)
        records = e.get("ledger_count") or e.get("rows") or 0
        got.add(e.get("labels") or (), int(records), str(e.get("ts") or ""))
    return out, n


@dataclass
class Drift:
    subject: str
    fingerprint: str
    text: str
    count: int = 0
    first_seen: str = ""
    last_seen: str = ""


async def drift(
    store: Store, policy: Policy, engine: Engine, since: datetime | None, rule_ids: list[str]
) -> list[Drift]:
    """Shapes the subjects of each allow_statements rule sent that its list does not allow."""
    rules = [r for r in policy.rules if r.allow_statements and (not rule_ids or r.id in rule_ids)]
    if not rules:
        raise QueryError("the policy has no allow_statements rule" + (
            f" named {', '.join(rule_ids)}" if rule_ids else ""
        ))  # fmt: skip
    who = _Subjects(engine)
    found: dict[tuple[str, str], Drift] = {}
    async for e in _statements(store, since, None):
        text = e.get("statement") or ""
        fp = e.get("fingerprint")
        if not fp or allowlist.exempt_text(text):
            continue
        names = who.of(e)
        for rule in rules:
            hit = names if "*" in rule.subjects else names & set(rule.subjects)
            if not hit or fp in engine.allow_lists[rule.id].shapes:
                continue
            for subject in sorted(hit):
                d = found.get((subject, fp))
                if d is None:
                    d = found[(subject, fp)] = Drift(subject, fp, text)
                ts = str(e.get("ts") or "")
                d.count += 1
                d.first_seen = min(d.first_seen or ts, ts)
                d.last_seen = max(d.last_seen, ts)
    return sorted(found.values(), key=lambda d: (d.subject, -d.count, d.first_seen))


def _store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--schema", default="pgwarden_audit", show_default=True,
                      help="Schema of the PostgreSQL store.")(fn)  # fmt: skip
    fn = click.option("--dsn", help="The PostgreSQL audit store.")(fn)
    fn = click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
                      help="The SQLite audit store.")(fn)  # fmt: skip
    return click.option(
        "--policy", "policy_file", required=True, type=click.Path(dir_okay=False),
        help="The policy file (its subjects, and its allow_statements rules for drift).",
    )(fn)  # fmt: skip


def _policy(path: str) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("learn")
@_store_options
@click.option("--subject", "subjects", multiple=True, required=True,
              help="A subject of the policy whose statements to learn (repeatable).")  # fmt: skip
@click.option("--since", help="From this time (ISO-8601 or an age like 24h); default: all.")
@click.option("--until", help="Up to this time (ISO-8601 or an age); default: now.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The allow-list to write, or to update in place.")  # fmt: skip
def learn_command(
    policy_file: str, db: Path | None, dsn: str | None, schema: str, subjects: tuple[str, ...],
    since: str | None, until: str | None, out: Path,
) -> None:  # fmt: skip
    """Write the statement shapes some subjects ran into a reviewable allow-list."""
    policy = _policy(policy_file)
    unknown = [s for s in subjects if s not in policy.subjects]
    if unknown:
        raise click.ClickException(
            f"{policy_file} has no subject {', '.join(map(repr, unknown))} "
            f"(it has: {', '.join(policy.subjects) or 'none'})"
        )
    if db is not None and not db.exists():
        raise click.ClickException(f"{db}: no such audit store")
    t0 = _when(since)
    t1 = _when(until) or datetime.now(UTC)

    async def go() -> tuple[dict[str, allowlist.Learned], int]:
        store = await open_store(db, dsn, schema)
        try:
            return await learn(store, policy, list(subjects), t0, t1)
        finally:
            await store.close()

    learned, n = _run(go())
    meta = {
        "subjects": list(subjects),
        "since": t0.isoformat() if t0 else None,
        "until": t1.isoformat(),
        "source": str(db) if db is not None else "postgresql",
    }
    try:
        added, updated = allowlist.write(out, learned, meta)
    except allowlist.AllowListError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{out}: {len(learned)} statement shapes from {n} statements of "
        f"{', '.join(subjects)} ({added} new, {updated} already listed)"
    )
    if not learned:
        click.echo("nothing learned: no statement of these subjects in that range", err=True)
        sys.exit(1)


@click.command("drift")
@_store_options
@click.option("--rule", "rule_ids", multiple=True,
              help="Only this allow_statements rule (repeatable); default: all of them.")  # fmt: skip
@click.option("--since", help="From this time (ISO-8601 or an age like 7d); default: each "
              "list's learned.until.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def drift_command(
    policy_file: str, db: Path | None, dsn: str | None, schema: str, rule_ids: tuple[str, ...],
    since: str | None, as_json: bool,
) -> None:  # fmt: skip
    """The statement shapes seen that the policy's allow-lists do not list, per subject."""
    policy = _policy(policy_file)
    try:
        engine = Engine(policy)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    t0 = _when(since)
    if t0 is None:
        ends = [_learned_until(a.path) for a in engine.allow_lists.values()]
        t0 = min((e for e in ends if e is not None), default=None)
    if db is not None and not db.exists():
        raise click.ClickException(f"{db}: no such audit store")

    async def go() -> list[Drift]:
        store = await open_store(db, dsn, schema)
        try:
            return await drift(store, policy, engine, t0, list(rule_ids))
        finally:
            await store.close()

    found = _run(go())
    if as_json:
        click.echo(json.dumps([d.__dict__ for d in found], indent=2))
        return
    console = Console(highlight=False)
    if not found:
        console.print(f"no new statement shapes since {t0.isoformat() if t0 else 'the start'}")
        return
    table = Table(box=None, header_style="bold")
    for col in ("subject", "shape", "count", "first seen", "last seen", "statement"):
        table.add_column(col, overflow="fold")
    for d in found:
        table.add_row(d.subject, d.fingerprint, str(d.count), d.first_seen, d.last_seen,
                      d.text[:120])  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} shapes not on the allow-lists")


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_time(text)
    except QueryError as exc:
        raise click.ClickException(str(exc)) from None


def _learned_until(path: str) -> datetime | None:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        text = (data.get("learned") or {}).get("until")
        return parse_time(str(text)) if text else None
    except (OSError, yaml.YAMLError, QueryError, AttributeError):
        return None
