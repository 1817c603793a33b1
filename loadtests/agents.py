"""The support workload as agents run it, and the pgwarden setups the load tests measure.

Agents work through the helpdesk's shared account (``support_app``) and the application
names the agent on every statement (``/* end_user='agent007' */``), so pgwarden judges
each agent by ``config/policy.yaml``: per-statement row limits, the hourly and daily
windows of distinct customers, the statement shapes, the canaries and -- enabled here --
need-to-know (an agent reads a customer only while one of that customer's open tickets is
theirs).  ``support_agent_workload.sql`` is one agent's unit of work; pgbench runs one copy
per agent with equal weights, so each transaction is a randomly chosen agent's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy.sandbox.supportdb import counts_for

TEMPLATE = Path(__file__).resolve().parent / "support_agent_workload.sql"
POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"
# pgbench accepts at most 128 scripts (MAX_SCRIPTS in pgbench.c).
MAX_AGENT_SCRIPTS = 128
AGENT_USER = "support_app"

# The need-to-know rule that config/policy.yaml carries commented out ("enable it once every
# agent tool names its agent per statement"): this workload does.  Violations are refused
# rather than withheld, so that a load with any of them shows refusals instead of quietly
# shorter results.
NEED_TO_KNOW_RULE: dict[str, Any] = {
    "id": "agent-need-to-know",
    "subjects": ["agents"],
    "need_to_know": {
        "table": "public.customers",
        "key_column": "customer_id",
        "lookup": (
            "SELECT t.customer_id FROM tickets t JOIN agents a ON a.agent_id = t.assigned_agent_id "
            "WHERE a.username = $1 AND t.status <> 'closed'"
        ),
        "on_violation": "block",
        "cache_seconds": 30,
        # Moving a ticket on is an agent's work; reassigning it is not (see README).
        "writable": ["public.tickets.status"],
    },
}


def agent_username(agent_id: int) -> str:
    """The generator's username for an agent id (``agent007``)."""
    return f"agent{agent_id:03d}"


def agents_for(customers: int) -> int:
    """How many agents the generator makes for a number of customers."""
    return counts_for(customers)[0]


def agent_scripts(workdir: Path, agents: int, queue: int) -> list[str]:
    """pgbench arguments for the agents' workload: one script per agent (the first
    ``MAX_AGENT_SCRIPTS`` agents when there are more), equal weights, ``queue`` open
    tickets each."""
    if queue < 1:
        raise ValueError("an agent's queue holds at least one ticket")
    template = TEMPLATE.read_text()
    workdir.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    for agent_id in range(1, min(agents, MAX_AGENT_SCRIPTS) + 1):
        script = workdir / f"{agent_username(agent_id)}.sql"
        script.write_text(
            template.replace("@AGENT_ID@", str(agent_id)).replace(
                "@USERNAME@", agent_username(agent_id)
            )
        )
        args += ["-f", f"{script}@1"]
    return [*args, "-D", f"queue={queue}"]


def agent_policy(out: Path, *, redis_url: str | None = None, need_to_know: bool = True) -> Path:
    """``config/policy.yaml`` with need-to-know enabled and, given ``redis_url``, its window
    counters and quarantine in Redis (for several workers); written to ``out``."""
    policy = yaml.safe_load(POLICY.read_text())
    if need_to_know:
        policy["rules"].append(NEED_TO_KNOW_RULE)
    if redis_url is not None:
        policy["store"] = {"backend": "redis", "url": redis_url}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(policy, sort_keys=False))
    return out


def sqlite_audit_config(out: Path, db: Path, synchronous: str) -> Path:
    """A ``pgwarden serve -c`` file whose audit trail is one SQLite sink with ``synchronous``
    (FULL: fsync at every group commit; NORMAL: survives kill -9 of pgwarden, not a power
    cut)."""
    config = {"audit": {"sinks": [{"type": "sqlite", "path": str(db), "synchronous": synchronous}]}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def postgres_audit_config(
    out: Path, dsn: str, workers: int, schema: str = "pgwarden_audit"
) -> Path:
    """A ``pgwarden serve -c`` file with ``workers`` processes and the audit trail in
    PostgreSQL (one sink all workers share, one hash chain per worker)."""
    config = {
        "workers": workers,
        "audit": {"sinks": [{"type": "postgres", "dsn": dsn, "schema_name": schema}]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out
