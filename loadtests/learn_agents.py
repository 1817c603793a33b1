"""The helpdesk's allow-list learned from the agents' workload, then enforced on it.

1. A throwaway PostgreSQL with the support database (``loadtests/supportdb.py``).
2. pgwarden with ``config/policy.yaml`` plus need-to-know (``loadtests/agents.py``), a
   subject ``helpdesk`` for the shared account ``support_app`` and an SQLite audit trail;
   the agents' workload (``support_agent_workload.sql``, each statement naming its agent)
   runs through it with pgbench in each ``--modes`` protocol (simple, extended, prepared).
3. ``pgwarden policy learn --subject helpdesk`` writes the allow-list.
4. A new pgwarden adds a rule ``allow_statements`` (action: block) for the helpdesk, and the
   same workload runs again, in every mode: every refusal is a false positive.

stdout ends with ``name=value`` figures; the last line is
``refusals_after=N learned_shapes=N learned_statements=N transactions_after=N``.
Exit status 0 when nothing was refused and every run completed.

    python -m loadtests.learn_agents [--customers 2000] [--duration 8] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from loadtests import agents, harness
from proxy.sandbox.cluster import running_cluster
from proxy.sandbox.supportdb import generate

RULE_ID = "helpdesk-known-statements"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--customers", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--duration", type=int, default=8, help="seconds per pgbench run")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--queue", type=int, default=5, help="open tickets per agent")
    p.add_argument("--modes", default="simple,extended,prepared", help="pgbench -M modes")
    p.add_argument("--workdir", type=Path, help="keep the files here (default: a temp dir)")
    return p.parse_args(argv)


def helpdesk_policy(out: Path, allow_list: Path | None) -> Path:
    """The agents' policy, and with ``allow_list`` an allow_statements rule for its
    ``helpdesk`` subject (the shared account)."""
    agents.agent_policy(out)
    policy = yaml.safe_load(out.read_text())
    # The shipped policy's helpdesk subject: the shared account, which names its agents.
    assert agents.AGENT_USER in policy["subjects"]["helpdesk"]["users"]
    if allow_list is not None:
        policy["rules"].append(
            {
                "id": RULE_ID,
                "subjects": ["helpdesk"],
                "allow_statements": str(allow_list),
                "action": "block",
            }
        )
    out.write_text(yaml.safe_dump(policy, sort_keys=False))
    return out


def run_workload(
    target: harness.Target, args: argparse.Namespace, scripts: list[str]
) -> tuple[int, list[str]]:
    """(transactions, problems) of one pgbench run per mode."""
    done = 0
    problems: list[str] = []
    for mode in args.modes.split(","):
        r = harness.run_pgbench(
            target, "support", mode=mode, workload="agents", args=scripts,
            duration=args.duration, clients=args.clients, jobs=args.jobs,
            user=agents.AGENT_USER,
        )  # fmt: skip
        harness.progress(f"learn_agents: {target.name} {mode}: {r.transactions} transactions")
        done += r.transactions
        if r.error:
            problems.append(f"{target.name} {mode}: {r.error[-400:]}")
        if r.failed:
            problems.append(f"{target.name} {mode}: {r.failed} failed transactions")
    return done, problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="pgwarden-learn-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        cluster = stack.enter_context(running_cluster(tls=False, schema=True))
        asyncio.run(generate(cluster.url(), args.customers, args.seed))
        n_agents = agents.agents_for(args.customers)
        scripts = agents.agent_scripts(workdir / "scripts", n_agents, args.queue)
        audit_db = workdir / "audit.db"
        allow = workdir / "helpdesk-allow.yaml"

        learning = helpdesk_policy(workdir / "learn-policy.yaml", None)
        with harness.pgwarden_target(
            cluster, workdir / "learn",
            ["--policy", str(learning), "--catalog-user", "postgres", "--audit-db", str(audit_db)],
            name="learning",
        ) as target:  # fmt: skip
            learned_tx, problems = run_workload(target, args, scripts)
            refusals_before = harness.pgwarden_refusals(target) or 0
        proc = subprocess.run(
            [*harness.pgwarden_command(), "policy", "learn", "--policy", str(learning),
             "--subject", "helpdesk", "--db", str(audit_db), "--out", str(allow)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 2
        harness.progress(f"learn_agents: {proc.stdout.strip()}")
        shapes = yaml.safe_load(allow.read_text())["shapes"]
        statements = sum(int(e.get("seen", 0)) for e in shapes.values())

        enforcing = helpdesk_policy(workdir / "policy.yaml", allow)
        with harness.pgwarden_target(
            cluster, workdir / "enforce",
            ["--policy", str(enforcing), "--catalog-user", "postgres"], name="allow-list",
        ) as target:  # fmt: skip
            after_tx, more = run_workload(target, args, scripts)
            refusals = harness.pgwarden_refusals(target)
        problems += more
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    figures = {
        "transactions_learned": learned_tx,
        "refusals_while_learning": refusals_before,
    }
    for k, v in figures.items():
        print(f"{k}={v}")
    print(
        f"refusals_after={refusals if refusals is not None else 'nan'} "
        f"learned_shapes={len(shapes)} learned_statements={statements} "
        f"transactions_after={after_tx}"
    )
    return 0 if refusals == 0 and not problems and after_tx > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
