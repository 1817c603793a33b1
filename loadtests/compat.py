"""psycopg's and asyncpg's own test suites, directly against PostgreSQL and through pgwarden.

    PSYCOPG_SRC=/path/to/psycopg ASYNCPG_SRC=/path/to/asyncpg python -m loadtests.compat

pgwarden promises that every client works unchanged; the clients' own test suites are the
largest set of protocol uses there is.  For each suite whose source tree is given (a
checkout or snapshot of the project's repository: ``--psycopg-src`` / ``PSYCOPG_SRC``,
``--asyncpg-src`` / ``ASYNCPG_SRC``; never part of this repository) this:

1. installs the suite's package from that tree, and what its tests need, into a virtualenv
   of its own (``--venv``, default ``.venv-compat``; reused while the trees are unchanged);
2. starts a throwaway PostgreSQL (``loadtests/cluster.py``, no TLS) and runs the suite
   against it (``direct``), then through pgwarden as a pass-through relay (``passthrough``),
   then through pgwarden with ``config/policy.yaml`` and the SQLite audit trail
   (``policy``; the suites connect as the DBA, whom the policy does not limit, so any
   difference is the analysis and tracking path itself, not a refusal);
3. prints, per suite and target, passed / failed / skipped, and the tests whose outcome
   differs from the direct run (passed directly but failed through pgwarden, and the
   reverse), each with the first line of its failure.

How the suites find their server: psycopg's from ``PSYCOPG_TEST_DSN`` (database
``psycopg_test``); asyncpg's from ``PGHOST``/``PGPORT``/``PGUSER``/``PGDATABASE`` (with
``PGHOST`` set, asyncpg's test base uses the running server instead of creating its own).
Both run with ``-p no:randomly`` where that plugin exists, so the order is the same in
every run, and with a per-test timeout.  asyncpg tests that start clusters of their own
or edit ``pg_hba.conf`` cannot work against an existing server: they fail or skip the
same way in every run and show no difference.

A tree that is not given is skipped with a message; when none is given, the command says
so and exits 0.  A tree that is given but is not a usable checkout (missing files, an
asyncpg without its ``pgproto`` submodule) exits 2.  Otherwise it exits 0 after printing;
differences are findings to read, not a failure of the command.  The last line gives
``name=value`` figures; full results go to ``loadtests/results/compat.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtests import harness
from loadtests.harness import progress
from proxy.sandbox.cluster import Cluster, running_cluster

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "config" / "policy.yaml"
TARGETS = ("direct", "passthrough", "policy")


class Unusable(Exception):
    """A source tree was given but cannot be used."""


@dataclass
class Suite:
    name: str
    src: Path

    def check(self) -> None:
        if not self.src.is_dir():
            raise Unusable(f"{self.name}: {self.src} is not a directory")
        need = {
            "psycopg": [
                "psycopg/pyproject.toml",
                "psycopg_pool/pyproject.toml",
                "tests/conftest.py",
            ],
            "asyncpg": ["setup.py", "asyncpg/_testbase/__init__.py", "tests/__init__.py"],
        }[self.name]
        missing = [p for p in need if not (self.src / p).exists()]
        if self.name == "asyncpg" and not (self.src / "asyncpg/pgproto/__init__.py").exists():
            missing.append(
                "asyncpg/pgproto/ (a git submodule: its files come from "
                "github.com/MagicStack/py-pgproto at the commit the asyncpg tree names)"
            )
        if missing:
            raise Unusable(f"{self.name}: {self.src} lacks " + ", ".join(missing))

    def fingerprint(self) -> str:
        """What the installed venv was built from: the tree's git commit, else its mtime."""
        head = subprocess.run(
            ["git", "-C", str(self.src), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        if head.returncode == 0:
            return head.stdout.strip()
        return str((self.src / "pyproject.toml").stat().st_mtime)


# --- the suites' virtualenv ------------------------------------------------------------------


def _pip(venv: Path, *args: str) -> None:
    cmd = [
        str(venv / "bin/python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unusable(f"pip install {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def prepare_venv(venv: Path, suites: Sequence[Suite]) -> None:
    """Install each suite's package from its tree, and its tests' needs, into ``venv``."""
    todo = []
    for s in suites:
        stamp = venv / f".compat-installed-{s.name}"
        if not stamp.exists() or stamp.read_text() != f"{s.src} {s.fingerprint()}":
            todo.append(s)
    if not todo:
        return
    if not (venv / "bin/python").exists():
        progress(f"compat: creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # asyncpg's setup.py imports pkg_resources, which setuptools 81 dropped; its Cython
    # build needs both, and --no-build-isolation makes pip use these.
    _pip(venv, "--upgrade", "pip", "wheel", "setuptools>=77,<81", "Cython>=3.2.1,<4",
         "pytest", "pytest-timeout")  # fmt: skip
    for s in todo:
        progress(f"compat: installing {s.name} from {s.src} into {venv}")
        if s.name == "psycopg":
            # The pure-Python implementation over the system libpq: no C build needed.  Not
            # editable: run from the tree's root, its psycopg/ project directory would
            # shadow an editable install's package as a namespace package.
            _pip(venv, f"{s.src / 'psycopg'}[test]", str(s.src / "psycopg_pool"))
        else:
            _pip(venv, "--no-build-isolation", "-e", str(s.src))
            # Its 'test' dependency group without gssapi/k5test (they need Kerberos
            # headers; only the GSS tests use them) and without the linters.
            _pip(venv, "uvloop>=0.22.1", "distro~=1.9.0")
        (venv / f".compat-installed-{s.name}").write_text(f"{s.src} {s.fingerprint()}")


# --- running one suite -----------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # passed, failed, skipped
    message: str = ""


@dataclass
class Run:
    suite: str
    target: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes.values() if o.status == status)


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:240]
    return ""


def parse_junit(path: Path) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    if not path.exists():
        return outcomes
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
                message = _first_line(child.get("message")) or _first_line(child.text)
                break
            if child.tag == "skipped":
                status = "skipped"
                message = _first_line(child.get("message"))
        outcomes[test_id] = outcome_merge(outcomes.get(test_id), Outcome(status, message))
    return outcomes


def outcome_merge(old: Outcome | None, new: Outcome) -> Outcome:
    # A test that fails in teardown appears twice in JUnit XML: failed wins.
    if old is None or new.status == "failed":
        return new
    return old


def run_suite(
    suite: Suite, venv: Path, target: str, host: str, port: int, workdir: Path,
    pytest_args: Sequence[str], timeout: float, test_timeout: int,
) -> Run:  # fmt: skip
    junit = workdir / f"{suite.name}-{target}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSYCOPG"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [str(venv / "bin/python"), "-m", "pytest", "-q", "-o", f"cache_dir={workdir / 'pytest-cache'}",
           f"--junitxml={junit}", f"--timeout={test_timeout}"]  # fmt: skip
    if suite.name == "psycopg":
        env["PSYCOPG_TEST_DSN"] = (
            f"host={host} port={port} user=postgres dbname=psycopg_test sslmode=disable"
        )
        env["PSYCOPG_IMPL"] = "python"
        cmd += ["-p", "no:randomly"]
    else:
        env.update(PGHOST=host, PGPORT=str(port), PGUSER="postgres", PGDATABASE="postgres",
                   PGSSLMODE="disable")  # fmt: skip
    if not any(a.startswith("tests") for a in pytest_args):
        cmd.append("tests")  # the whole suite unless a subset is named
    cmd += list(pytest_args)
    log = workdir / f"{suite.name}-{target}.log"
    progress(f"compat: {suite.name} {target}: {' '.join(cmd[2:])} (log {log})")
    began = time.monotonic()
    note = ""
    with open(log, "wb") as out:
        try:
            subprocess.run(cmd, cwd=suite.src, env=env, stdout=out, stderr=subprocess.STDOUT,
                           timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            note = f"stopped after {timeout:.0f}s"
    run = Run(suite.name, target, parse_junit(junit), time.monotonic() - began, note)
    if not run.outcomes:
        tail = log.read_text(errors="replace")[-1500:]
        run.note = (run.note + "; " if run.note else "") + f"no results; log ends:\n{tail}"
    progress(
        f"compat: {suite.name} {target}: {run.count('passed')} passed, {run.count('failed')} "
        f"failed, {run.count('skipped')} skipped in {run.seconds:.0f}s {run.note[:200]}"
    )
    return run


Differences = list[tuple[str, str]]


def differences(direct: Run, other: Run) -> tuple[Differences, Differences, Differences]:
    """Tests that pass directly but fail through ``other``, the reverse, and other changes
    of status (a skip one way only), each with the first line of the failure or skip."""
    worse, better, changed = [], [], []
    for test_id, d in sorted(direct.outcomes.items()):
        o = other.outcomes.get(test_id)
        if o is None:  # not run (the run was stopped): counted apart, not a difference
            continue
        if d.status == "passed" and o.status == "failed":
            worse.append((test_id, o.message))
        elif d.status == "failed" and o.status == "passed":
            better.append((test_id, d.message))
        elif d.status != o.status:
            why = o.message if o.status != "passed" else d.message
            changed.append((test_id, f"{d.status} directly, {o.status} through pgwarden: {why}"))
    return worse, better, changed


# --- the command -----------------------------------------------------------------------------


@contextlib.contextmanager
def target_endpoint(cluster: Cluster, target: str, workdir: Path) -> Iterator[tuple[str, int]]:
    if target == "direct":
        yield cluster.host, cluster.port
        return
    args: list[str] = []
    if target == "policy":
        args = ["--policy", str(POLICY), "--catalog-user", "postgres",
                "--audit-db", str(workdir / "audit.db")]  # fmt: skip
    with harness.pgwarden_target(cluster, workdir / f"pgwarden-{target}", args, name=target) as t:
        yield t.host, t.port
        if t.process is not None and t.process.poll() is not None:
            progress(f"compat: pgwarden ({target}) exited with {t.process.returncode}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.compat")
    p.add_argument("--psycopg-src", type=Path, default=os.environ.get("PSYCOPG_SRC") or None)
    p.add_argument("--asyncpg-src", type=Path, default=os.environ.get("ASYNCPG_SRC") or None)
    p.add_argument(
        "--venv", type=Path, default=Path(os.environ.get("COMPAT_VENV", REPO / ".venv-compat"))
    )
    p.add_argument("--targets", default=",".join(TARGETS), help="direct is always run first")
    p.add_argument("--psycopg-args", default="", help="extra pytest arguments (e.g. a subset)")
    p.add_argument("--asyncpg-args", default="", help="extra pytest arguments")
    p.add_argument("--suite-timeout", type=float, default=3600, help="seconds per suite run")
    p.add_argument("--test-timeout", type=int, default=120, help="seconds per test")
    p.add_argument("--output", type=Path, default=REPO / "loadtests/results/compat.json")
    p.add_argument(
        "--from-logs", type=Path, metavar="DIR",
        help="report again from the JUnit XML files a run left in DIR (compat-logs); runs nothing",
    )  # fmt: skip
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if not set(targets) <= set(TARGETS):
        p.error(f"--targets: some of {', '.join(TARGETS)}")
    args.targets = ["direct"] + [t for t in targets if t != "direct"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    suites = []
    for name in ("asyncpg", "psycopg"):  # the short suite first
        src = getattr(args, f"{name}_src")
        if src is None:
            progress(
                f"compat: {name} skipped: no source tree given (set {name.upper()}_SRC or "
                f"--{name}-src to a checkout of its repository)"
            )
            continue
        suites.append(Suite(name, Path(src).resolve()))
    if args.from_logs is not None:
        runs = {
            (s.name, t): Run(s.name, t, parse_junit(args.from_logs / f"{s.name}-{t}.xml"))
            for s in suites
            for t in args.targets
        }
        return report(suites, args.targets, runs, args.output)
    if not suites:
        print("compat: nothing to run: neither PSYCOPG_SRC nor ASYNCPG_SRC is set")
        print("suites=0")
        return 0
    try:
        for s in suites:
            s.check()
        prepare_venv(args.venv.resolve(), suites)
    except Unusable as exc:
        progress(f"compat: {exc}")
        print("suites=0 error=1")
        return 2
    venv = args.venv.resolve()
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-compat-"))
    runs: dict[tuple[str, str], Run] = {}
    try:
        with running_cluster(tls=False, schema=False) as cluster:
            if any(s.name == "psycopg" for s in suites):
                cluster.psql("CREATE DATABASE psycopg_test", database="postgres")
            for target in args.targets:
                with target_endpoint(cluster, target, workdir) as (host, port):
                    for s in suites:
                        extra = harness.split_args(getattr(args, f"{s.name}_args"))
                        runs[s.name, target] = run_suite(
                            s, venv, target, host, port, workdir, extra,
                            args.suite_timeout, args.test_timeout,
                        )  # fmt: skip
    finally:
        logs = args.output.parent / "compat-logs"
        with contextlib.suppress(OSError):
            logs.mkdir(parents=True, exist_ok=True)
            for f in workdir.rglob("*"):
                if f.is_file() and f.suffix in (".log", ".xml"):
                    shutil.copy(
                        f,
                        logs / f"{f.parent.name}-{f.name}"
                        if f.parent != workdir
                        else logs / f.name,
                    )
        shutil.rmtree(workdir, ignore_errors=True)
    return report(suites, args.targets, runs, args.output)


def report(
    suites: Sequence[Suite], targets: Sequence[str], runs: dict[tuple[str, str], Run], output: Path
) -> int:
    figures: dict[str, int] = {}
    result: dict[str, object] = {}
    for s in suites:
        direct = runs[s.name, "direct"]
        print(f"\n== {s.name} ({s.src}, {s.fingerprint()[:12]})")
        for target in targets:
            r = runs[s.name, target]
            print(f"{target:12} passed {r.count('passed'):5}  failed {r.count('failed'):5}  "
                  f"skipped {r.count('skipped'):5}  ({r.seconds:.0f}s) {r.note[:200]}")  # fmt: skip
            for status in ("passed", "failed", "skipped"):
                figures[f"{s.name}_{target}_{status}"] = r.count(status)
        for target in targets[1:]:
            worse, better, changed = differences(direct, runs[s.name, target])
            other = runs[s.name, target]
            not_run = sum(1 for t in direct.outcomes if t not in other.outcomes)
            if not_run:
                print(f"-- {s.name}: {not_run} tests of the direct run were not run through "
                      f"pgwarden ({target}): {other.note[:200]}")  # fmt: skip
            figures[f"{s.name}_{target}_not_run"] = not_run
            figures[f"{s.name}_{target}_worse"] = len(worse)
            figures[f"{s.name}_{target}_better"] = len(better)
            print(f"-- {s.name}: pass directly, fail through pgwarden ({target}): {len(worse)}")
            for test_id, msg in worse:
                print(f"   {test_id}: {msg}")
            print(f"-- {s.name}: fail directly, pass through pgwarden ({target}): {len(better)}")
            for test_id, msg in better:
                print(f"   {test_id}: {msg}")
            figures[f"{s.name}_{target}_changed"] = len(changed)
            print(f"-- {s.name}: skipped one way only ({target}): {len(changed)}")
            for test_id, msg in changed:
                print(f"   {test_id}: {msg}")
            result[f"{s.name}/{target}"] = {"worse": worse, "better": better, "changed": changed}
        for target in targets:
            r = runs[s.name, target]
            result[f"{s.name}/{target}/outcomes"] = {
                k: [o.status, o.message] for k, o in r.outcomes.items()
            }
    with contextlib.suppress(OSError):
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
