"""``pgwarden audit ...``: the incident responder's commands."""

from __future__ import annotations

import click


@click.group("audit")
def audit_group() -> None:
    """Query and verify the audit trail."""
