"""The ``pgwarden`` command line."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from proxy.config import ProxyConfig


def _policy_group() -> click.Command:
    from audit.learn import drift_command, learn_command
    from policy.cli import policy_group
    from policy.commands import check_command, schema_command, test_command

    for command in (check_command, test_command, schema_command, learn_command, drift_command):
        policy_group.add_command(command)
    return policy_group


def _audit_group() -> click.Command:
    from audit.cli import audit_group

    return audit_group


def _classify_command() -> click.Command:
    from policy.cli import classify_command

    return classify_command


def _demo_command() -> click.Command:
    from proxy.demo import demo_command

    return demo_command


class _LazyGroup(click.Group):
    """Subcommands defined elsewhere are imported when named, so ``pgwarden serve`` does not
    load the audit, policy and demo command lines (with pglast, rich and the policy
    analysis behind them) before it can accept a client, nor ``pgwarden audit`` the proxy's."""

    lazy: dict[str, Callable[[], click.Command]] = {
        "audit": _audit_group,
        "classify": _classify_command,
        "demo": _demo_command,
        "policy": _policy_group,
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            self.add_command(self.lazy[cmd_name](), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pgwarden")
def main() -> None:
    """pgwarden: a PostgreSQL proxy that watches for bulk reads of customer data."""


def _overrides(**flags: Any) -> dict[str, Any]:
    mapping = {
        "listen": "listen",
        "upstream": "upstream",
        "admin": "admin_listen",
        "tls_cert": "client_tls.cert",
        "tls_key": "client_tls.key",
        "require_tls": "client_tls.required",
        "upstream_tls": "upstream_tls.mode",
        "upstream_ca": "upstream_tls.ca",
        "allow_replication": "allow_replication",
        "policy": "policy_file",
        "catalog_user": "catalog_user",
        "audit_db": "audit",
        "max_message_bytes": "max_message_bytes",
        "workers": "workers",
        "log_level": "log_level",
        "log_format": "log_format",
    }
    return {mapping[k]: v for k, v in flags.items() if v is not None and v is not False}


@main.command()
@click.option(
    "-c", "--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file."
)
@click.option("--listen", help="Address to accept clients on, HOST:PORT (default 127.0.0.1:6432).")
@click.option("--upstream", help="PostgreSQL server, HOST:PORT (default 127.0.0.1:5432).")
@click.option("--admin", help="Admin HTTP address for /metrics and /healthz, or 'off'.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Certificate for client TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Private key for client TLS.")
@click.option(
    "--require-tls", is_flag=True, default=None, help="Refuse clients that do not use TLS."
)
@click.option(
    "--upstream-tls",
    type=click.Choice(["disable", "prefer", "require", "verify-full"]),
    help="TLS to PostgreSQL (default prefer).",
)
@click.option("--upstream-ca", type=click.Path(dir_okay=False), help="CA file for verify-full.")
@click.option(
    "--allow-replication", is_flag=True, default=None, help="Let replication connections through."
)
@click.option("--policy", type=click.Path(dir_okay=False), help="Policy file to enforce.")
@click.option("--catalog-user", help="Database role for pgwarden's read-only catalog connection.")
@click.option(
    "--audit-db", type=click.Path(dir_okay=False), help="Audit trail in this SQLite file."
)
@click.option("--workers", type=int, help="Processes sharing the port (SO_REUSEPORT).")
@click.option("--worker-index", type=int, default=None, hidden=True)
@click.option("--max-message-bytes", type=int, help="Largest protocol message accepted.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["json", "console"]))
def serve(config_file: str | None, **flags: Any) -> None:
    """Run the proxy in the foreground (SIGTERM stops it gracefully, SIGHUP reloads)."""
    from proxy.config import ConfigError, load_config
    from proxy.logs import configure_logging
    from proxy.server import install_uvloop
    from proxy.server import serve as run_server

    worker_index = flags.pop("worker_index", None)
    audit_db = flags.pop("audit_db", None)
    overrides = _overrides(**flags)
    if audit_db:
        overrides["audit"] = {"sinks": [{"type": "sqlite", "path": audit_db}]}

    def load() -> ProxyConfig:
        return load_config(Path(config_file) if config_file else None, overrides)

    try:
        config = load()
    except ConfigError as exc:
        click.echo(f"pgwarden: {exc}", err=True)
        sys.exit(2)
    configure_logging(config.log_level, config.log_format)
    if config.workers > 1 and worker_index is None:
        sys.exit(_supervise(config.workers))
    install_uvloop()
    from audit.chain import SigningKeyError
    from audit.ledger import LedgerKeyError
    from audit.pipeline import AuditUnavailable
    from policy.model import PolicyError

    try:
        asyncio.run(run_server(config, reload=load, worker=worker_index or 0))
    except PolicyError as exc:
        click.echo(f"pgwarden: the policy cannot be loaded:\n{exc}", err=True)
        sys.exit(2)
    except (AuditUnavailable, LedgerKeyError, SigningKeyError) as exc:
        click.echo(f"pgwarden: the audit trail cannot start: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        # asyncio's bind error names the address itself, which may be the admin one.
        click.echo(f"pgwarden: cannot listen: {exc.strerror or exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


def _supervise(workers: int) -> int:
    """Run ``workers`` copies of this very command line, each with its worker index, and pass
    SIGTERM, SIGINT and SIGHUP on to them; return the worst exit code.

    The workers share the listen port through SO_REUSEPORT, so the kernel spreads new
    connections over them.  State that must be exact across them (window counters,
    quarantine) needs ``store: {backend: redis}``; the audit trail needs a sink that several
    writers may share (PostgreSQL) or one file per worker.
    """
    import signal
    import subprocess

    from proxy.server import CONTROL_SIGNALS

    argv = [sys.executable, "-m", "proxy", *sys.argv[1:]]
    children: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in CONTROL_SIGNALS:
        signal.signal(sig, forward)
    # The workers start with these signals blocked (the mask survives exec) and unblock them
    # once their handlers are in place: a signal forwarded while a worker is still starting
    # waits for it, instead of killing it (SIGHUP's default action would, leaving one worker
    # fewer) or stopping it half-started.  Signals to us meanwhile wait for the unblock below.
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
    try:
        for i in range(workers):
            children.append(subprocess.Popen([*argv, "--worker-index", str(i)]))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
    codes = [child.wait() for child in children]
    return max((abs(c) for c in codes), default=0)
