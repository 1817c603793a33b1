"""The insider replay: every red-team technique let through, then the audit trail asked.

Issue 13's "done when": in monitor mode (every statement allowed) on the second test
database, ``pgwarden audit records-seen --person P`` lists exactly the customers whose
labelled values reached P's client, by any channel, and no other.  For each technique of
``loadtests/redteam.py``:

* a pgwarden of its own, with the second database's policy without its allow-lists
  (``redteam.policy_without_allow_lists``), ``mode: monitor``, a SQLite audit trail and a
  ledger key made by ``pgwarden audit keygen --ledger``;
* the technique run exactly as the red team runs it (``redteam.run_technique``): its
  ``Outcome`` is what the client received, counted on the client side by the second
  database's own matcher (``tests/seconddb/data.py``), per channel;
* pgwarden stopped, then ``pgwarden audit sessions`` names the persons the trail saw and
  ``pgwarden audit records-seen --person P --table crm.customers --resolve-dsn ...`` lists,
  per person, the customers the trail says reached them.

missed = received - listed, extra = listed - received.  The Outcome counts every
connection of the technique together (an attacker and a second role, or the helpdesk
account naming several people), so when the trail names more than one person the
comparison is over the union of their lists, and the row says so (``persons`` > 1).

    python -m loadtests.replay [--techniques a,b,...] [--variant search_path|app]
                               [--json FILE]

prints one line per technique and, as the last line,
``techniques=N exact=N missed_customers=N extra_customers=N techniques_with_missed=N
techniques_with_extra=N``.  Nothing of pgwarden's matching code is used here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from loadtests import redteam
from proxy.sandbox.cluster import Cluster, running_cluster
from tests.auditcli import cli
from tests.proxyutil import ProxyProcess
from tests.seconddb import data as sdb

RESULTS = Path(__file__).resolve().parent / "results" / "replay.json"
TABLE = "crm.customers"
# Other relations whose records are a customer's (their key starts with customer_id): a miss
# under TABLE is looked up there, to tell a value attributed to another table's record from
# one the trail never noticed.
OTHER_TABLES = ("crm.customer_phones", "crm.legacy_customers", "crm.customer_directory")
VARIANTS = ("search_path", "app")


# --- what the client received, with where ----------------------------------------------------


class RecordingMatcher(sdb.Matcher):
    """The second database's matcher, keeping for each customer it finds the first text it
    was found in (an excerpt around the value), to show what kind of text a miss was."""

    def __init__(self, ds: sdb.Dataset) -> None:
        super().__init__(ds)
        self.ds = ds
        self.samples: dict[int, str] = {}

    def reset(self) -> None:
        self.samples = {}

    def customers_in(self, text: str) -> set[int]:
        found = super().customers_in(text)
        for cid in found - self.samples.keys():
            self.samples[cid] = self.excerpt(text, cid)
        return found

    def excerpt(self, text: str, cid: int, width: int = 70) -> str:
        c = self.ds.customers[cid]
        low = text.lower()
        for form, hay in (("", low), ("reversed: ", low[::-1])):
            for value in (c.email.lower(), c.name.lower(), *(p for p in (
                c.mobile, c.landline, c.alt_phone) if p)):  # fmt: skip
                i = hay.find(value)
                if i >= 0:
                    src = text if not form else text[::-1]
                    lo, hi = max(0, i - width), i + len(value) + width
                    return form + repr(src[lo:hi])
        # a phone written with other separators, an e-mail glued to its neighbours ...
        return "(value not located verbatim) " + repr(text[: 2 * width])


# --- pgwarden in monitor mode, audited -------------------------------------------------------


@dataclass
class ReplayEnv(redteam.Env):
    """redteam's Env whose ``proxy()`` starts pgwarden in monitor mode with an audit trail
    and a ledger key (one trail per technique: ``trail_of(tag)``)."""

    policy_file: Path = Path()
    ledger_key: Path = Path()
    direct: str = ""
    trails: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, pg: Cluster, workdir: Path) -> ReplayEnv:
        base = redteam.Env.build(pg, workdir)
        policy_file = redteam.policy_without_allow_lists(workdir / "monitor.yaml")
        policy = yaml.safe_load(policy_file.read_text())
        policy["mode"] = "monitor"
        policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
        ledger = workdir / "ledger.key"
        res = cli("keygen", "--ledger", "--out", str(ledger))
        if res.returncode != 0:
            raise RuntimeError(f"pgwarden audit keygen --ledger: {res.stderr}")
        return cls(
            pg=pg,
            ds=base.ds,
            matcher=RecordingMatcher(base.ds),
            workdir=workdir,
            policy_file=policy_file,
            ledger_key=ledger,
            direct=pg.url(database=sdb.DBNAME),
        )

    def proxy(
        self, tag: str, audit_db: Path | None = None, policy: Path | None = None
    ) -> ProxyProcess:
        work = self.workdir / tag
        work.mkdir(parents=True, exist_ok=True)
        trail = work / "audit.db"
        self.trails[tag] = trail
        config = {
            "policy_file": str(self.policy_file),
            "catalog_user": "postgres",
            "audit": {
                "sinks": [{"type": "sqlite", "path": str(trail)}],
                "ledger_key": str(self.ledger_key),
            },
        }
        return ProxyProcess(self.pg, work / "proxy", config=config, admin=False)


# --- the trail's answer ------------------------------------------------------------------------


def _audit_json(*args: str) -> Any:
    res = cli(*args, "--json")
    if res.returncode == 2 and "ledger has nothing for the table" in res.stderr:
        return None  # a true nothing: no record of the table reached anyone
    if res.returncode != 0:
        raise RuntimeError(f"pgwarden audit {' '.join(args)}: exit {res.returncode}: {res.stderr}")
    return orjson.loads(res.stdout)


def persons_in(trail: Path) -> list[str]:
    sessions = _audit_json("sessions", "--db", str(trail), "--limit", "100000")
    out: set[str] = set()
    for s in sessions:
        out.update(p for p in s.get("persons") or [] if p)
    return sorted(out)


def _customer_id(key: Any) -> int:
    """A resolved key as a customer id: ``"12"``, or a composite key (``["12", "mobile"]``,
    or the same as JSON text) whose first column is the customer id."""
    if isinstance(key, str) and key.startswith("["):
        key = json.loads(key)
    if isinstance(key, list):
        key = key[0]
    return int(key)


def records_seen(
    env: ReplayEnv, trail: Path, person: str, table: str = TABLE
) -> tuple[set[int], int, int]:
    """The customers records-seen resolves for ``person``, how many records (or values
    without a key) it could not resolve to a customer id, and how many statements it lists
    as returning records it cannot name (reported with their bound)."""
    out = _audit_json(
        "records-seen", "--db", str(trail), "--ledger-key", str(env.ledger_key),
        "--person", person, "--table", table, "--resolve-dsn", env.direct,
    )  # fmt: skip
    keys: set[int] = set()
    unresolved = 0
    if out is None:
        return keys, unresolved, 0
    values = out.get("values")
    for rec in [*out.get("records", []), *(values if isinstance(values, list) else [])]:
        key = rec.get("key")
        if key is None:
            unresolved += 1
            continue
        try:
            keys.add(_customer_id(key))
        except (TypeError, ValueError, IndexError):
            unresolved += 1
    unlisted = [*(out.get("unitemised_statements") or ()), *(out.get("computed_statements") or ())]
    return keys, unresolved, len(unlisted)


# --- one technique -------------------------------------------------------------------------


@dataclass
class Result:
    technique: str
    variant: str
    channel: str
    persons: list[str]
    received: set[int]
    listed: set[int]
    by_channel: dict[str, set[int]]
    per_person: dict[str, set[int]]
    unresolved: int = 0
    unitemised: int = 0  # statements records-seen reports as unlisted, with their bound
    samples: dict[int, str] = field(default_factory=dict)  # missed customer -> excerpt
    # missed customers that records-seen lists under another of OTHER_TABLES
    elsewhere: dict[str, set[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def missed(self) -> set[int]:
        return self.received - self.listed

    @property
    def extra(self) -> set[int]:
        return self.listed - self.received

    @property
    def exact(self) -> bool:
        return not self.missed and not self.extra

    def missed_channels(self) -> dict[str, int]:
        return {ch: len(self.missed & got) for ch, got in sorted(self.by_channel.items())}

    def to_json(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "variant": self.variant,
            "channel": self.channel,
            "persons": self.persons,
            "union_of_persons": len(self.persons) > 1,
            "received": len(self.received),
            "listed": len(self.listed),
            "missed": sorted(self.missed),
            "extra": sorted(self.extra),
            "exact": self.exact,
            "received_by_channel": {k: len(v) for k, v in sorted(self.by_channel.items())},
            "missed_by_channel": {k: v for k, v in self.missed_channels().items() if v},
            "listed_by_person": {p: len(v) for p, v in sorted(self.per_person.items())},
            "unresolved_records": self.unresolved,
            "unitemised_statements": self.unitemised,
            "missed_listed_under": {t: len(v) for t, v in sorted(self.elsewhere.items()) if v},
            "missed_samples": {str(k): v for k, v in sorted(self.samples.items())[:5]},
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
        }


def replay_technique(env: ReplayEnv, name: str, variant: str = "search_path") -> Result:
    assert isinstance(env.matcher, RecordingMatcher)
    env.matcher.reset()
    t0 = time.monotonic()
    out = redteam.run_technique(env, name, variant)
    trail = env.trails[f"{name}-{variant}"]
    persons: list[str] = []
    per_person: dict[str, set[int]] = {}
    unresolved = unitemised = 0
    trouble: list[str] = []
    try:
        persons = persons_in(trail) if trail.exists() else []
        for p in persons:
            per_person[p], u, n = records_seen(env, trail, p)
            unresolved += u
            unitemised += n
    except RuntimeError as exc:  # the trail could not answer: every customer counts missed
        trouble.append(f"audit CLI: {str(exc)[:300]}")
    listed: set[int] = set().union(*per_person.values()) if per_person else set()
    res = Result(
        technique=name,
        variant=variant,
        channel=out.channel,
        persons=persons,
        received=set(out.customers),
        listed=listed,
        by_channel={k: set(v) for k, v in out.per_channel.items() if v},
        per_person=per_person,
        unresolved=unresolved,
        unitemised=unitemised,
        notes=[*out.notes, *out.internal_errors, *trouble],
    )
    res.samples = {cid: env.matcher.samples.get(cid, "?") for cid in sorted(res.missed)}
    if res.missed:
        for other in OTHER_TABLES:
            there: set[int] = set()
            for p in persons:
                with contextlib.suppress(RuntimeError):
                    there |= records_seen(env, trail, p, other)[0]
            res.elsewhere[other] = res.missed & there
    res.seconds = time.monotonic() - t0
    return res


# --- report ----------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    head = (
        f"{'technique':36} {'variant':11} {'received':>8} {'listed':>6} {'missed':>6} "
        f"{'extra':>5} {'persons':>7} {'unlisted':>8}  missed by channel"
    )
    lines = [head]
    for r in results:
        chans = ",".join(f"{k}:{v}" for k, v in r.missed_channels().items() if v) or "-"
        lines.append(
            f"{r.technique:36} {r.variant:11} {len(r.received):>8} {len(r.listed):>6} "
            f"{len(r.missed):>6} {len(r.extra):>5} {len(r.persons):>7} {r.unitemised:>8}  {chans}"
        )
    return "\n".join(lines)


def summary(results: list[Result]) -> dict[str, int]:
    return {
        "techniques": len(results),
        "exact": sum(1 for r in results if r.exact),
        "missed_customers": sum(len(r.missed) for r in results),
        "extra_customers": sum(len(r.extra) for r in results),
        "techniques_with_missed": sum(1 for r in results if r.missed),
        "techniques_with_extra": sum(1 for r in results if r.extra),
        # missed customers with no statement records-seen reports as unlisted: lost silently
        "techniques_with_silent_misses": sum(1 for r in results if r.missed and not r.unitemised),
    }


def write_json(path: Path, results: list[Result], seconds: float, done: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "summary": summary(results),
        "complete": done,
        "seconds": round(seconds, 1),
        "techniques": [r.to_json() for r in results],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run(
    pg: Cluster,
    workdir: Path,
    names: list[str],
    variants: list[str],
    progress: bool = True,
    json_out: Path | None = None,
) -> list[Result]:
    """Replay ``names`` in each of ``variants``; with ``json_out``, the results so far are
    written there after every technique (a long run interrupted keeps its figures)."""
    env = ReplayEnv.create(pg, workdir)
    results: list[Result] = []
    t0 = time.monotonic()
    for variant in variants:
        for name in names:
            if progress:
                print(f"... {name} [{variant}]", file=sys.stderr, flush=True)
            results.append(replay_technique(env, name, variant))
            if json_out is not None:
                write_json(json_out, results, time.monotonic() - t0, done=False)
    if json_out is not None:
        write_json(json_out, results, time.monotonic() - t0, done=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--techniques", default="", help="comma-separated technique names")
    ap.add_argument(
        "--variant", default="search_path", help="search_path, app, or both: search_path,app"
    )
    ap.add_argument("--json", default=str(RESULTS), help="write the results here")
    args = ap.parse_args(argv)
    names = [n for n in args.techniques.split(",") if n] or list(redteam.TECHNIQUES)
    unknown = [n for n in names if n not in redteam.TECHNIQUES]
    if unknown:
        ap.error(f"unknown techniques: {', '.join(unknown)}")
    variants = [v for v in args.variant.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant: {', '.join(bad)} (search_path or app)")
    json_out = Path(args.json) if args.json else None
    with (
        tempfile.TemporaryDirectory(prefix="pgwarden-replay-") as tmp,
        running_cluster(tls=False, schema=False) as pg,
    ):
        results = run(pg, Path(tmp), names, variants, json_out=json_out)
    print(table(results))
    inexact = [r for r in results if not r.exact]
    if inexact:
        print()
    for r in inexact:
        union = " (union of persons: " + ", ".join(r.persons) + ")" if len(r.persons) > 1 else ""
        print(f"  {r.technique} [{r.variant}]{union}")
        for other, there in r.elsewhere.items():
            if there:
                print(f"    {len(there)} of the missed are listed under {other}")
        for cid, text in list(r.samples.items())[:3]:
            print(f"    missed {cid}: {text[:200]}")
        if r.extra:
            print(f"    extra: {sorted(r.extra)[:10]}")
    print(" ".join(f"{k}={v}" for k, v in summary(results).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
