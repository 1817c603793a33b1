"""``pgwarden policy ...`` and ``pgwarden classify``: commands for security teams."""

from __future__ import annotations

import click


@click.group("policy")
def policy_group() -> None:
    """Check, test and explain policy files."""
