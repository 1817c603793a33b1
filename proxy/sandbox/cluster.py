"""Throwaway PostgreSQL clusters for the demo, the benchmarks and the tests.

A cluster lives in a temporary directory, listens on 127.0.0.1 and a free port, and has
roles that log in by each method pgwarden must pass through: trust, md5 and SCRAM-SHA-256.
TLS certificates are made on the fly with trustme, so clients can verify the server.

PostgreSQL refuses to run as root; when we are root, the server runs as the ``postgres``
OS user (Debian's packages create it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROLES = {
    # role name: (password, auth method in pg_hba.conf)
    "trust_user": (None, "trust"),
    "md5_user": ("md5-secret", "md5"),
    "scram_user": ("scram-secret", "scram-sha-256"),
    # The customer-support deployment's roles (config/policy.yaml names them).
    "support_app": (None, "trust"),
    "analyst": (None, "trust"),
}
SUPERUSER = "postgres"
DATABASE = "support"


class ClusterError(RuntimeError):
    """PostgreSQL could not be set up; the message says what to install or check."""


def find_bindir() -> Path:
    """The directory holding ``postgres`` and ``initdb`` (newest version wins)."""
    env = os.environ.get("PGWARDEN_PG_BINDIR")
    if env:
        return Path(env)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise ClusterError(
        "PostgreSQL server binaries (postgres, initdb) were not found. Install them, for example "
        "'apt-get install postgresql' on Debian/Ubuntu, or set PGWARDEN_PG_BINDIR."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int, avoid: int = 0) -> int:
    """The first of ``n`` consecutive free loopback ports (none of them ``avoid``)."""
    for _ in range(200):
        base = free_port()
        if avoid in range(base, base + n):
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


@dataclass
class Cluster:
    """One running PostgreSQL server and what a client needs to reach it."""

    root: Path
    port: int
    bindir: Path
    host: str = "127.0.0.1"
    ca_cert: Path | None = None
    _run_as: str | None = None
    _started: bool = field(default=False, repr=False)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def dsn(
        self, user: str = SUPERUSER, database: str = DATABASE, port: int | None = None, **extra: str
    ) -> str:
        parts = [
            f"host={self.host}",
            f"port={port or self.port}",
            f"user={user}",
            f"dbname={database}",
        ]
        password = ROLES.get(user, (None, ""))[0]
        if password and "password" not in extra:
            parts.append(f"password={password}")
        parts.extend(f"{k}={v}" for k, v in extra.items())
        return " ".join(parts)

    def url(self, user: str = SUPERUSER, database: str = DATABASE, port: int | None = None) -> str:
        password = ROLES.get(user, (None, ""))[0]
        cred = f"{user}:{password}" if password else user
        return f"postgresql://{cred}@{self.host}:{port or self.port}/{database}"

    # --- running commands as the server's OS user ---------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        if self._run_as:
            return ["runuser", "-u", self._run_as, "--", *args]
        return list(args)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
        return proc

    def psql(self, sql: str, user: str = SUPERUSER, database: str = DATABASE) -> str:
        """Run SQL with psql over the Unix socket (bypasses any proxy); returns stdout."""
        proc = subprocess.run(
            [
                str(self.bindir / "psql") if (self.bindir / "psql").exists() else "psql",
                "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", database,
            ],
            input=sql, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ClusterError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    # --- life cycle ----------------------------------------------------------------------

    def init(self, tls: bool = True) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ClusterError(
                    "running as root, but there is no 'postgres' OS user to run the server as"
                ) from exc
            self._run_as = "postgres"
            for p in (self.root, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.socket_dir}'",
            "max_connections = 200",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "shared_buffers = 128MB",
            "log_min_messages = warning",
            "password_encryption = 'scram-sha-256'",
            "max_wal_senders = 4",
            "wal_level = replica",
        ]
        if tls:
            conf += self._make_certs()
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n".join(conf) + "\n")
        hba = ["local all all trust"]
        for role, (_pw, method) in ROLES.items():
            hba.append(f"host all {role} 127.0.0.1/32 {method}")
        hba += [
            f"host all {SUPERUSER} 127.0.0.1/32 trust",
            "host replication all 127.0.0.1/32 trust",
            "host all all 127.0.0.1/32 scram-sha-256",
        ]
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def _make_certs(self) -> list[str]:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        certdir = self.root / "certs"
        certdir.mkdir(exist_ok=True)
        ca.cert_pem.write_to_path(str(certdir / "ca.crt"))
        cert.private_key_pem.write_to_path(str(self.datadir / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(self.datadir / "server.crt"))
        # A second certificate from the same CA, for pgwarden's own client-facing TLS.
        proxy_cert = ca.issue_cert("127.0.0.1", "localhost")
        proxy_cert.private_key_pem.write_to_path(str(certdir / "proxy.key"))
        proxy_cert.cert_chain_pems[0].write_to_path(str(certdir / "proxy.crt"))
        os.chmod(self.datadir / "server.key", 0o600)
        if self._run_as:
            pw = pwd.getpwnam(self._run_as)
            for name in ("server.key", "server.crt"):
                os.chown(self.datadir / name, pw.pw_uid, pw.pw_gid)
        self.ca_cert = certdir / "ca.crt"
        return ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "server.log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        self._started = True

    def stop(self) -> None:
        if self._started:
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-m",
                "immediate",
                "stop",
                check=False,
            )
            self._started = False

    def setup_roles_and_database(self, schema: bool = True) -> None:
        statements = []
        for role, (password, method) in ROLES.items():
            if method == "md5":
                statements.append("SET password_encryption = 'md5';")
            else:
                statements.append("SET password_encryption = 'scram-sha-256';")
            pw_sql = f" PASSWORD '{password}'" if password else ""
            statements.append(f"CREATE ROLE {role} LOGIN{pw_sql};")
        statements.append(f"CREATE DATABASE {DATABASE};")
        self.psql("\n".join(statements), database="postgres")
        if schema:
            self.psql(schema_sql())
            grants = ", ".join(ROLES)
            self.psql(
                f"GRANT USAGE ON SCHEMA public, reporting TO {grants};\n"
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {grants};\n"
                f"GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO {grants};\n"
            )

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def schema_sql() -> str:
    return (Path(__file__).resolve().parents[2] / "config" / "support_schema.sql").read_text()


@contextlib.contextmanager
def running_cluster(tls: bool = True, schema: bool = True, root: Path | None = None):  # type: ignore[no-untyped-def]
    """Start a fresh cluster with the pgwarden roles and the support schema; remove it after."""
    bindir = find_bindir()
    tmp = Path(tempfile.mkdtemp(prefix="pgwarden-pg-")) if root is None else root
    cluster = Cluster(root=tmp, port=free_port(), bindir=bindir)
    try:
        cluster.init(tls=tls)
        cluster.start()
        cluster.setup_roles_and_database(schema=schema)
        yield cluster
    finally:
        cluster.stop()
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
