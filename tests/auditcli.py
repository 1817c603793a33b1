"""Running ``pgwarden audit ...`` as a responder does, for the responder tests."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import orjson

from tests.proxyutil import pgwarden_command


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pgwarden_command(), "audit", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def ok(*args: str) -> str:
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout


def js(*args: str) -> Any:
    return orjson.loads(ok(*args, "--json"))


def refused(*args: str) -> str:
    """A command that cannot answer: exit 2 and one sentence, never a traceback."""
    res = cli(*args)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Error:" in res.stderr, res.stderr
    return res.stderr
