"""The ``pgwarden`` command line."""

from __future__ import annotations

import click

from audit.cli import audit_group
from policy.cli import classify_command, policy_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pgwarden")
def main() -> None:
    """pgwarden: a PostgreSQL proxy that watches for bulk reads of customer data."""


main.add_command(policy_group)
main.add_command(audit_group)
main.add_command(classify_command)
