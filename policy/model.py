"""The policy file security teams write, as pydantic models.

A policy names **labels** (which columns are sensitive, on top of the labels column comments
carry), **subjects** (who a session is: database user, application, client address, end
user, time of day) and **rules** (what each subject may read, and what happens otherwise).
The JSON Schema in ``config/policy.schema.json`` is generated from these models
(``pgwarden policy schema``), so editors can check a file as it is typed.

Errors name the file, the line and the problem: the YAML is composed first so that a
validation error's location (``rules -> 2 -> max_rows``) can be mapped back to a line.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from datetime import time as dtime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policy.labels import LABEL_RE, LabelRules


class PolicyError(Exception):
    """The policy cannot be used; each line of the message names file:line and the problem."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    """'90s', '15m', '1h', '7d' or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration like 90s, 15m, 1h or 7d")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Seconds = float


class Action(StrEnum):
    ALLOW = "allow"
    ALERT = "alert"  # allow, and raise an alert
    MASK = "mask"
    BLOCK = "block"  # refuse the statement (or cut its result off)
    END_SESSION = "end_session"
    QUARANTINE = "quarantine"  # block, and refuse the subject's statements for a while


class Mode(StrEnum):
    ENFORCE = "enforce"
    MONITOR = "monitor"  # decide and record, never block


class Check(StrEnum):
    """Statement rules: shapes of statement that are refused for a subject outright."""

    COPY_OUT = "copy_out"  # COPY ... TO (STDOUT, a file or a program)
    COPY_PROGRAM = "copy_program"  # COPY ... PROGRAM, either direction
    SELECT_STAR = "select_star"  # *, t.* or a whole-row reference over a labelled table
    UNBOUNDED_SCAN = "unbounded_scan"  # labelled data read with neither WHERE nor LIMIT
    DANGEROUS_FUNCTIONS = "dangerous_functions"  # pg_read_file, lo_export, dblink ...
    PACKING_AGGREGATES = "packing_aggregates"  # json_agg, string_agg ... over labelled columns
    COPY_INTO_TABLES = "copy_into_tables"  # CREATE TABLE AS / INSERT ... SELECT of labelled data
    UNANALYSABLE = "unanalysable"  # DO blocks, dynamic SQL, statements that do not parse


DANGEROUS_FUNCTIONS = frozenset(
    {
        "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "lo_export",
        "lo_import", "lo_get", "lo_open", "loread", "dblink", "dblink_exec", "dblink_open",
        "dblink_fetch", "dblink_send_query", "dblink_get_result", "dblink_connect",
        "pg_file_write", "pg_execute_server_program",
    }
)  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubjectMatch(_Strict):
    """Who a session is. Every field given must match; lists match if any entry does
    (glob patterns for names). An empty match is everyone."""

    users: list[str] | None = Field(None, description="database user names (globs)")
    roles: list[str] | None = Field(None, description="roles the user is a member of")
    applications: list[str] | None = Field(None, description="application_name globs")
    client_cidrs: list[str] | None = Field(None, description="client address ranges")
    end_users: list[str] | None = Field(None, description="end user globs (comment or SET)")
    hours: str | None = Field(None, description="time of day window, 'HH:MM-HH:MM' (UTC)")
    end_user_from: list[Literal["comment", "set"]] = Field(
        default_factory=list,
        description="where an end user name is trusted from, for sessions of this subject "
        "(a shared account's: comment, set); none by default: a person logged in as "
        "themselves cannot name a colleague",
    )
    end_user_signed: bool = Field(
        False,
        description="end user names must carry the application's signature (a token from "
        "`pgwarden policy sign-end-user`, HMAC with the policy's end_user_key); any other "
        "name is refused: a person with the account's password cannot name a colleague",
    )

    @field_validator("client_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str] | None) -> list[str] | None:
        for c in v or ():
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"{c!r} is not an address range like 10.0.0.0/8") from None
        return v

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hours(v)
        return v


def parse_hours(text: str) -> tuple[dtime, dtime]:
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a time window like 08:00-18:00")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"{text!r} has an impossible time")
    end = dtime(23, 59, 59, 999999) if h2 == 24 else dtime(h2, m2)
    return dtime(h1, m1), end


class Masking(_Strict):
    style: Literal["redact", "partial", "hash"] = Field(
        "partial",
        description="redact: '****'; partial: keep the first and last character and any "
        "domain of an email; hash: a keyed hash (joinable, not readable)",
    )


class Canary(_Strict):
    """Planted records nobody has a reason to read: any appearance triggers the rule."""

    table: str | None = Field(None, description="schema.table whose primary keys are listed")
    keys: list[str] = Field(default_factory=list, description="primary key values (as text)")
    values: list[str] = Field(default_factory=list, description="field values, any column")


Budget = Literal["end_user", "db_user"]


class EndUserChurn(_Strict):
    """Many end-user names in a short time, where a shared account names its end users
    (sqlcommenter comments, ``SET pgwarden.end_user``): a tool serves a few people per
    connection; a script that makes up a name every few statements to stay under each
    person's budget serves hundreds.  Raises an alert (the ``db_user`` budget of a window
    rule is what stops the reading)."""

    max_names: int = Field(ge=1, description="distinct end-user names allowed in the window")
    window: Seconds = Field(description="e.g. 1m")
    per: Literal["connection", "db_user"] = Field(
        "connection",
        description="connection: names on one client connection; db_user: names on all "
        "connections of one database user (across workers with the Redis store)",
    )

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: object) -> object:
        return parse_duration(v)


class NeedToKnow(_Strict):
    """Rows of ``table`` reach a subject only when ``lookup`` lists their key for the end user."""

    table: str = Field(description="schema.table the rule protects, e.g. public.customers")
    key_column: str = Field(description="the column whose value the lookup returns")
    lookup: str = Field(
        description="SQL run by pgwarden with $1 = the end user; returns the allowed keys"
    )
    on_violation: Literal["withhold", "mask", "block"] = Field(
        "block",
        description="withhold: drop the row; mask: pass the row with its labelled values "
        "masked; block: refuse the statement",
    )
    mask_style: Literal["redact", "partial", "hash"] = Field(
        "redact", description="how on_violation: mask masks (see Masking)"
    )
    cache_seconds: float = Field(30.0, gt=0)
    writable: list[str] = Field(
        default_factory=list,
        description="columns the lookup reads that the subject may still write "
        "(schema.table.column), e.g. a ticket's status; writes to the others are refused, "
        "or a subject could grant itself need-to-know (assign itself every ticket)",
    )


class Rule(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    subjects: list[str] = Field(default_factory=lambda: ["*"], description="subject names, or *")
    labels: list[str] = Field(
        default_factory=lambda: ["*"], description="label globs the rule is about"
    )
    mode: Mode | None = Field(None, description="enforce or monitor; the policy's mode if absent")
    action: Action = Action.BLOCK
    # --- what the rule checks: exactly one of these groups -------------------------------
    max_rows: int | None = Field(None, ge=0, description="labelled rows per statement or window")
    max_bytes: int | None = Field(None, ge=0, description="bytes of labelled values per statement")
    window: Seconds | None = Field(None, description="sliding window, e.g. 1h: limits add up")
    max_records: int | None = Field(None, ge=0, description="distinct records within the window")
    per: list[Budget] = Field(
        default_factory=lambda: ["end_user"],  # type: ignore[arg-type]
        description="whose budget a window is: end_user (each person: the end user the "
        "statement names, else the database user) and/or db_user (all end users of one "
        "database user together: a shared account's ceiling). With both, each has the limit",
    )
    deny: list[Check] | None = None
    mask: Masking | None = None
    canary: Canary | None = None
    need_to_know: NeedToKnow | None = None
    end_user_churn: EndUserChurn | None = None
    allow_statements: str | None = Field(
        None,
        description="allow-list file (pgwarden policy learn; relative to the policy file): "
        "a statement whose shape is not on it gets the rule's action",
    )

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: object) -> object:
        return None if v is None else parse_duration(v)

    @field_validator("per", mode="before")
    @classmethod
    def _per(cls, v: object) -> object:
        # per: db_user is the same as per: [db_user]
        return [v] if isinstance(v, str) else v

    @field_validator("per")
    @classmethod
    def _per_once(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("per names end_user, db_user or both")
        if len(set(v)) != len(v):
            raise ValueError("per names each of end_user and db_user at most once")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        for label in v:
            if not re.fullmatch(r"[a-z0-9_.*?\[\]-]+", label):
                raise ValueError(f"{label!r} is not a label or label glob like pii.*")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        kinds = [
            k
            for k, present in (
                (
                    "limit",
                    self.max_rows is not None
                    or self.max_bytes is not None
                    or self.max_records is not None
                    or self.window is not None,
                ),
                ("deny", self.deny is not None),
                ("mask", self.mask is not None),
                ("canary", self.canary is not None),
                ("need_to_know", self.need_to_know is not None),
                ("end_user_churn", self.end_user_churn is not None),
                ("allow_statements", self.allow_statements is not None),
            )
            if present
        ]
        if len(kinds) != 1:
            raise ValueError(
                "a rule checks exactly one thing: max_rows/max_bytes/max_records, deny, mask, "
                "canary, need_to_know, end_user_churn or allow_statements (this one has "
                f"{', '.join(kinds) or 'none'})"
            )
        if self.allow_statements is not None and self.action in (Action.ALLOW, Action.MASK):
            raise ValueError("allow_statements: action is alert, block, end_session or quarantine")
        if "per" in self.model_fields_set and self.window is None:
            raise ValueError("per says whose budget a window is: add window")
        if self.end_user_churn is not None:
            if "action" not in self.model_fields_set:
                object.__setattr__(self, "action", Action.ALERT)
            elif self.action is not Action.ALERT:
                raise ValueError(
                    "end_user_churn raises an alert (action: alert); a window rule with "
                    "per: db_user is what limits a shared account"
                )
        if self.max_records is not None and self.window is None:
            raise ValueError("max_records counts distinct records over a window: add window")
        if self.window is not None and self.max_rows is None and self.max_records is None:
            raise ValueError("a window needs max_rows or max_records")
        if self.window is not None and self.max_bytes is not None:
            raise ValueError("max_bytes is per statement; it cannot have a window")
        if self.mask is not None and self.action not in (Action.MASK,):
            object.__setattr__(self, "action", Action.MASK)
        return self

    @property
    def kind(self) -> str:
        if self.deny is not None:
            return "deny"
        if self.mask is not None:
            return "mask"
        if self.canary is not None:
            return "canary"
        if self.need_to_know is not None:
            return "need_to_know"
        if self.end_user_churn is not None:
            return "end_user_churn"
        if self.allow_statements is not None:
            return "allow_statements"
        return "window" if self.window is not None else "statement_limit"

    def covers_label(self, label: str) -> bool:
        return _covers(tuple(self.labels), label)


@functools.lru_cache(maxsize=4096)
def _covers(patterns: tuple[str, ...], label: str) -> bool:
    """Whether ``label`` matches one of a rule's label patterns (asked for every label of
    every statement of a subject with windows; a policy has few patterns and labels)."""
    return any(fnmatch.fnmatchcase(label, pattern) for pattern in patterns)


class Quarantine(_Strict):
    after_blocks: int = Field(3, ge=1, description="blocks within the window that quarantine")
    window: Seconds = Field(600.0, description="e.g. 10m")
    duration: Seconds = Field(3600.0, description="how long the subject stays quarantined")
    subjects: list[str] = Field(default_factory=lambda: ["*"])

    @field_validator("window", "duration", mode="before")
    @classmethod
    def _dur(cls, v: object) -> object:
        return parse_duration(v)


class StoreConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = Field(None, description="redis://host:port/db for the redis backend")

    @model_validator(mode="after")
    def _url(self) -> StoreConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError("the redis backend needs a url")
        return self


class ValueMatching(_Strict):
    """Value matching (``policy.valueindex``): the labelled values of the protected tables,
    indexed by pgwarden's catalog role, are looked for in everything a watched client
    receives, so the ledger and the windows name the records a packed result carried."""

    enabled: bool = Field(True, description="index labelled values and scan what clients receive")
    refresh: Seconds = Field(
        60.0, description="how often rows added or changed since the last build are indexed"
    )
    max_entries: int = Field(
        20_000_000, ge=1, description="entries the index may hold (about 12 bytes each)"
    )

    @field_validator("refresh", mode="before")
    @classmethod
    def _refresh(cls, v: object) -> object:
        return parse_duration(v)


class LabelEntry(_Strict):
    column: str = Field(description="schema.table.column glob (table.column matches any schema)")
    label: str | None = None
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _some(self) -> LabelEntry:
        names = self.names
        if not names:
            raise ValueError("give label or labels")
        for n in names:
            if not LABEL_RE.match(n):
                raise ValueError(f"label {n!r} is not a dotted lowercase name like pii.email")
        return self

    @property
    def names(self) -> list[str]:
        return ([self.label] if self.label else []) + list(self.labels or [])


class PolicyTest(_Strict):
    """A policy unit test: this subject sending this SQL gets this verdict."""

    name: str
    sql: str
    user: str = "app"
    application: str = ""
    client: str = "127.0.0.1"
    end_user: str | None = None
    roles: list[str] = Field(default_factory=list)
    search_path: list[str] = Field(
        default_factory=lambda: ["public"],
        description="the session's search_path (a role's ALTER ROLE ... SET search_path)",
    )
    expect: Action
    rule: str | None = Field(None, description="the rule id expected to decide")


class Policy(_Strict):
    version: Literal[1] = 1
    mode: Mode = Mode.ENFORCE
    fail_closed: bool = Field(
        True, description="block what cannot be analysed for subjects that have any limit"
    )
    catalog_user: str | None = Field(
        None, description="database role pgwarden's read-only catalog connection uses"
    )
    catalog_password_env: str | None = Field(
        None, description="environment variable holding that role's password"
    )
    record_key: str | None = Field(
        None, description="file with the HMAC key for record identities (random if absent)"
    )
    end_user_key: str | None = Field(
        None,
        description="file with the key applications sign end user names with (subjects with "
        "end_user_signed); relative to the policy file",
    )
    labels: list[LabelEntry] = Field(default_factory=list)
    subjects: dict[str, SubjectMatch] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    quarantine: Quarantine | None = None
    store: StoreConfig = StoreConfig(backend="memory", url=None)
    value_matching: ValueMatching = ValueMatching(
        enabled=True, refresh=60.0, max_entries=20_000_000
    )
    tests: list[PolicyTest] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> Policy:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} is used twice")
            seen.add(rule.id)
            for name in rule.subjects:
                if name != "*" and name not in self.subjects:
                    raise ValueError(
                        f"rule {rule.id!r} names subject {name!r}, which is not defined"
                    )
        signed = [n for n, m in self.subjects.items() if m.end_user_signed]
        if signed and not self.end_user_key:
            raise ValueError(
                f"subject {signed[0]!r} has end_user_signed: true, which needs end_user_key "
                "(the file with the key applications sign names with)"
            )
        if self.quarantine is not None:
            for name in self.quarantine.subjects:
                if name != "*" and name not in self.subjects:
                    raise ValueError(f"quarantine names subject {name!r}, which is not defined")
        return self

    def label_rules(self) -> LabelRules:
        return LabelRules(rules=tuple((e.column, n) for e in self.labels for n in e.names))


# --- loading with line numbers ---------------------------------------------------------------


def _locate(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (or its nearest parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == part:
                    node, line = v, k.start_mark.line + 1
                    break
            else:
                return line
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def load_policy_text(text: str, source: str = "<policy>") -> Policy:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise PolicyError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}:1: a policy is a mapping with labels, subjects and rules")
    if "policy" in data and isinstance(data["policy"], dict) and "rules" not in data:
        # The proxy config may embed the policy under a 'policy:' key.
        data = data["policy"]
        node = next((v for k, v in node.value if k.value == "policy"), node) if node else node
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(
                p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            line = _locate(node, loc)
            key = ".".join(str(p) for p in loc) or "(top level)"
            msg = (
                "unknown key"
                if err["type"] == "extra_forbidden"
                else err["msg"].removeprefix("Value error, ")
            )
            lines.append(f"{source}:{line or 1}: {key}: {msg}")
        raise PolicyError("\n".join(lines)) from None


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read the policy file: {exc.strerror}") from None
    policy = load_policy_text(text, str(p))
    if policy.end_user_key and not Path(policy.end_user_key).is_absolute():
        policy = policy.model_copy(update={"end_user_key": str(p.parent / policy.end_user_key)})
    rules = [
        r.model_copy(update={"allow_statements": str(p.parent / r.allow_statements)})
        if r.allow_statements and not Path(r.allow_statements).is_absolute()
        else r
        for r in policy.rules
    ]
    if any(a is not b for a, b in zip(rules, policy.rules, strict=True)):
        policy = policy.model_copy(update={"rules": rules})
    return policy


def json_schema() -> dict[str, Any]:
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pgwarden policy"
    return schema
