"""The proxy's configuration file (YAML), validated with errors that name the key.

Every setting has a default, so ``pgwarden serve --listen HOST:PORT --upstream HOST:PORT``
runs with no file at all; a file and command-line flags layer on top of the defaults, flags
last.
"""

from __future__ import annotations

import os
import ssl
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from audit.pipeline import AuditConfig


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, key and problem."""


class Address(BaseModel):
    model_config = ConfigDict(frozen=True)
    host: str
    port: int = Field(ge=0, le=65535)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: object, default_port: int | None = None) -> object:
    """Accept 'host:port', '[v6]:port', ':port' or a mapping."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not HOST:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            if default_port is None:
                raise ValueError(f"{value!r} is not HOST:PORT")
            host, port = text, str(default_port)
    if not port.isdigit():
        raise ValueError(f"port {port!r} in {value!r} is not a number")
    return {"host": host or "127.0.0.1", "port": int(port)}


class UpstreamTLSMode(StrEnum):
    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_FULL = "verify-full"


class ClientTLS(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cert: Path | None = None
    key: Path | None = None
    required: bool = False

    @model_validator(mode="after")
    def _pair(self) -> ClientTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        if self.required and self.cert is None:
            raise ValueError("required: true needs a cert and key to offer TLS with")
        for p in (self.cert, self.key):
            if p is not None and not p.is_file():
                raise ValueError(f"file {str(p)!r} does not exist")
        if self.cert is not None and self.key is not None:
            # Load them now: a file that is there but unusable must be a config error (exit
            # 2 at start, old config kept on reload), not a failure half-way through.
            try:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.load_cert_chain(str(self.cert), str(self.key))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"cannot load {str(self.cert)!r} and {str(self.key)!r} as a PEM "
                    f"certificate and its private key ({exc})"
                ) from None
        return self

    @property
    def enabled(self) -> bool:
        return self.cert is not None


class UpstreamTLS(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: UpstreamTLSMode = UpstreamTLSMode.PREFER
    ca: Path | None = None  # CA bundle for verify-full; the system store when absent
    server_name: str | None = None  # name to verify; the upstream host when absent

    @field_validator("ca")
    @classmethod
    def _ca(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        if not v.is_file():
            raise ValueError(f"file {str(v)!r} does not exist")
        try:
            ssl.create_default_context(cafile=str(v))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cannot load {str(v)!r} as PEM CA certificates ({exc})") from None
        return v


class ProxyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: Address = Address(host="127.0.0.1", port=6432)
    upstream: Address = Address(host="127.0.0.1", port=5432)
    admin_listen: Address | None = Address(host="127.0.0.1", port=9930)
    client_tls: ClientTLS = ClientTLS()
    upstream_tls: UpstreamTLS = UpstreamTLS()
    allow_replication: bool = False
    workers: int = Field(
        default=1, ge=1, le=64,
        description="processes sharing the listen port (SO_REUSEPORT); worker i's admin "
        "listener is admin_listen's port + i",
    )  # fmt: skip
    policy_file: Path | None = Field(None, description="policy YAML to enforce")
    catalog_user: str | None = Field(None, description="role for pgwarden's catalog connection")
    catalog_idle_timeout: float = Field(
        default=1.0, ge=0, le=60,
        description="seconds after which pgwarden's own connections (catalog, lookups) close "
        "when unused; below 5 s, a client's DROP or ALTER DATABASE ... RENAME never fails on them",
    )  # fmt: skip
    catalog_reload_settle: float = Field(
        default=0.1, ge=0, le=60,
        description="after DDL, seconds without more DDL before the catalog is reloaded (a "
        "burst of DDL is one reload)",
    )  # fmt: skip
    catalog_reload_max_delay: float = Field(
        default=1.0, ge=0, le=300,
        description="at the latest this many seconds after the first DDL of a burst, the "
        "catalog is reloaded; until then relations it does not have are unknown to the policy",
    )  # fmt: skip
    audit: AuditConfig | None = Field(None, description="the audit trail (sinks, keys, alerts)")
    max_message_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, le=2**30)
    connect_timeout: float = Field(default=10.0, gt=0)
    shutdown_timeout: float = Field(default=30.0, ge=0)
    log_level: str = "info"
    log_format: str = "json"

    @field_validator("listen", "upstream", mode="before")
    @classmethod
    def _addr(cls, v: object) -> object:
        return parse_address(v, default_port=5432)

    @field_validator("admin_listen", mode="before")
    @classmethod
    def _admin(cls, v: object) -> object:
        if v in (None, "", "off", "none", False):
            return None
        return parse_address(v, default_port=9930)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be one of debug, info, warning, error")
        return v.lower()

    @field_validator("log_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in ("json", "console"):
            raise ValueError("must be json or console")
        return v


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg.removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None
) -> ProxyConfig:
    """Read the YAML file (if any), apply command-line overrides, validate."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the config file: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of settings")
        # Policy and audit settings live in the same file; their own loaders read them.
        data = dict(loaded)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    try:
        return ProxyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
