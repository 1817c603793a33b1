"""Policy for one session: SQL in, decisions out, and what to record when a statement ends.

The tracker (``proxy.tracker``) follows the protocol; the guard knows the policy.  It owns the
session's SQL state (search_path, SQL-level prepared statements and cursors, the end user
named by the application), asks the analyser for facts and the engine for a verdict, and
maps result columns to labels using both the analysis and the catalog (RowDescription's
table OID and column number), so a column the analysis missed is still treated as labelled.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from policy import enduser
from policy.analyze import Analyzer
from policy.catalog import CatalogSnapshot
from policy.engine import Engine
from policy.facts import OutputColumn, QueryFacts
from policy.lineage.model import Exact
from policy.model import Mode, Rule
from policy.search_path import parse_search_path
from policy.session_sql import SqlSession
from policy.subject import DB_USER_KEY, Subject
from policy.valueindex import ValueIndex
from policy.verdict import ResultPlan, Verdict, refusal
from proxy import commands as cmd
from proxy.messages.backend import RowDescription
from proxy.messages.heads import result_format

# sqlcommenter puts key='value' pairs in a trailing /* */ comment; values are URL-encoded.
_COMMENT_END_USER = re.compile(r"/\*[^*]*?\bend_user\s*=\s*'([^']{1,300})'[^*]*\*/")
_SET_END_USER = re.compile(
    r"^\s*set\s+(?:session\s+|local\s+)?pgwarden\.end_user\s*(?:=|to)\s*'([^']{0,300})'\s*;?\s*$",
    re.IGNORECASE,
)
_RESET_END_USER = re.compile(r"^\s*reset\s+pgwarden\.end_user\s*;?\s*$", re.IGNORECASE)


def raise_statement(message: str, hint: str | None, sqlstate: str) -> str:
    """SQL that makes PostgreSQL itself raise our refusal.

    Sending this instead of a refused statement lets the server fail exactly as it would
    for any error at that point: the transaction is aborted, the rest of a multi-statement
    string is skipped, a pipeline skips to Sync.  The refused text never reaches the server.
    """

    def lit(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"

    using = f"ERRCODE = {lit(sqlstate)}, MESSAGE = {lit(message)}"
    if hint:
        using += f", HINT = {lit(hint)}"
    return f"DO $pgwarden$ BEGIN RAISE EXCEPTION USING {using}; END $pgwarden$"


@dataclass(slots=True)
class Decision:
    """What the guard decided for one statement, and for whom: a prepared statement keeps
    the end user its text named, however often it is executed and whoever the session names
    in between."""

    facts: QueryFacts
    verdict: Verdict
    subject: Subject
    # The text the client sent (the whole Query string, or the Parse's statement), for an
    # audit trail configured with ``store_full_text``.
    text: str | None = None
    # Columns pgwarden appended to the statement it sent (the protected table's key, for
    # need-to-know: proxy.keyfetch); they are removed before the client sees the result.
    hidden: int = 0
    # Why such a key could not be appended (quoted when the result is refused for lacking it).
    unkeyed: str | None = None

    @property
    def person(self) -> str:
        """Who need-to-know lookups are run for: the end user, else the database user."""
        return self.subject.end_user or self.subject.user

    def with_verdict(self, verdict: Verdict) -> Decision:
        """The same decision judged anew (built directly: dataclasses.replace costs
        microseconds, and a prepared statement is judged again at every Execute)."""
        return Decision(self.facts, verdict, self.subject, self.text, self.hidden, self.unkeyed)

    @property
    def plan(self) -> ResultPlan | None:
        return self.verdict.plan

    @property
    def limited(self) -> bool:
        """True when the result may be cut off part-way (row or byte limits, a refusing or
        masking need-to-know rule, a mask that refuses binary results, a canary rule whose
        action refuses): what the client sent after it is then held back until it has
        finished.  Withholding and canaries that only alert never cut, so they cost no such
        wait."""
        plan = self.verdict.plan
        return plan is not None and plan.may_cut


@dataclass(slots=True)
class ColumnInfo:
    labels: frozenset[str]
    binary: bool
    pk_of: str | None  # "schema.table" when this column is that table's primary key
    type_oid: int = 0  # 0: not known (no RowDescription seen)
    # Computed from labelled values (reverse(email), a row constructor), not a plain copy of
    # a stored column: a mask that keeps part of the value would keep part of something
    # else, so such a column is masked whole.
    derived: bool = False


@dataclass(frozen=True, slots=True)
class ResultShape:
    """A RowDescription as the catalog sees it."""

    # (labels, binary, primary key of, type OID) per column
    columns: tuple[tuple[frozenset[str], bool, str | None, int], ...]
    labels: frozenset[str]  # every label the catalog puts on these columns


_SHAPE_CACHE_SIZE = 512

# A name in use is counted again for end_user_churn at most this often (seconds): often
# enough that a name used throughout a window stays in it, rarely enough that a statement
# costs no store call.
_NOTE_NAME_EVERY = 1.0


def _written_and_read(written: str, read: frozenset[str]) -> set[str]:
    """Which of the columns ``read`` a write of ``written`` changes; "schema.table.*" on
    either side stands for every column of that table."""
    table, _, column = written.rpartition(".")
    if column == "*":
        return {c for c in read if c.rpartition(".")[0] == table}
    if f"{table}.*" in read:
        return {written}
    return {written} & read


def _derived(column: OutputColumn) -> bool:
    """A labelled output column that is not a plain copy of one stored column."""
    return bool(column.labels) and not isinstance(column.sources, Exact)


def _result_shape(snapshot: CatalogSnapshot, fields: bytes) -> ResultShape:
    columns = []
    for f in RowDescription.decode(fields).fields:
        labels: frozenset[str] = frozenset()
        pk_of = None
        if f.table_oid:
            col = snapshot.column_at(f.table_oid, f.column)
            if col is not None:
                labels = col.labels
                rel = snapshot.relation(col.schema, col.table)
                if rel is not None and rel.primary_key == (col.name,):
                    pk_of = rel.qualified
        columns.append((labels, f.format == 1, pk_of, f.type_oid))
    return ResultShape(tuple(columns), frozenset().union(*(c[0] for c in columns)))


@dataclass(slots=True, weakref_slot=True, eq=False)
class Guard:
    engine: Engine
    analyzer: Analyzer
    subject: Subject
    record_key: bytes
    audit: bool = False  # an audit trail records every statement (and the record ledger)
    end_user_key: bytes | None = None  # checks signed end-user names (policy.enduser)
    # The server reports standard_conforming_strings off: it reads backslashes in string
    # literals as escapes, pgwarden's parser does not, so the two would read different SQL.
    nonstandard_strings: bool = False
    # The session's client_encoding, when it is one whose characters can end in an ASCII
    # byte (SJIS, BIG5, GBK ...): the server reads a quote or a backslash as half of a
    # character where pgwarden, reading UTF-8, sees it, so the two read different SQL.
    foreign_encoding: str | None = None
    shared_counts: bool = False  # window counters live in a store other processes write too
    # Value indexes by database (PolicyRuntime.value_indexes; see policy.valueindex).
    values: Mapping[str, ValueIndex] = field(default_factory=dict)
    # Need-to-know lookups: (rule id, person) -> (valid until, keys the person may see).
    allowed: dict[tuple[str, str], tuple[float, frozenset[bytes]]] = field(default_factory=dict)
    sql: SqlSession = field(init=False)
    end_user_sources: frozenset[str] = field(init=False)
    _watchful: tuple[Subject, Engine, bool] | None = field(init=False, default=None)
    _shapes: dict[bytes, ResultShape] = field(init=False, default_factory=dict)
    _shapes_of: CatalogSnapshot | None = field(init=False, default=None)
    # Columns each need-to-know lookup reads, per catalog snapshot (see _lookup_write).
    _lookups: dict[tuple[str, str], tuple[CatalogSnapshot, frozenset[str]]] = field(
        init=False, default_factory=dict
    )
    # The end user named by SET pgwarden.end_user: the session's, until RESET.  A comment
    # names the end user of its own statement only.
    _session_end_user: str | None = field(init=False, default=None)
    # Subjects with end_user_signed: whether names must be signed; the last statement's
    # token and the name it vouches for (the token never goes upstream); why its name was
    # refused.
    _signed: bool = field(init=False, default=False)
    _token: tuple[str, str] | None = field(init=False, default=None)
    _forged: str | None = field(init=False, default=None)
    # Who declared each SQL cursor and prepared each SQL statement: a FETCH or EXECUTE with
    # no comment of its own reads for them (psycopg's named cursors send a bare FETCH).
    _owners: dict[tuple[str, str], str | None] = field(init=False, default_factory=dict)
    # end_user_churn: this connection's own key in the window store, the rules that apply
    # (cached per engine, application and minute) and when each name was last counted.
    connection_id: str = field(init=False, default_factory=lambda: uuid.uuid4().hex[:16])
    _churn: tuple[Engine, str, int, tuple[Rule, ...]] | None = field(init=False, default=None)
    _names_noted: dict[str, float] = field(init=False, default_factory=dict)
    # One Subject object per person the session names.  The engine caches verdicts by the
    # subject object, and a helpdesk connection names another agent on nearly every unit of
    # work: a new object each time missed that cache, and filled it with dead entries until
    # it emptied itself at 50,000 (pgwarden's RSS grew ~15 MB over make soak's 30 minutes).
    _subjects: dict[Subject, Subject] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.sql = SqlSession(self.analyzer, user=self.subject.user)
        self.end_user_sources = self.engine.trusted_end_user_sources(self.subject)
        self._signed = self.engine.signs_end_users(self.subject)

    def use_engine(self, engine: Engine, end_user_key: bytes | None = None) -> None:
        """A reloaded policy: decide with the new engine from the next statement on."""
        self.engine = engine
        self.end_user_key = end_user_key
        self.end_user_sources = engine.trusted_end_user_sources(self.subject)
        self._signed = engine.signs_end_users(self.subject)

    def set_options(self, options: str | None) -> None:
        self.sql.set_startup_options(options)

    def set_server_search_path(self, value: str) -> None:
        """The search_path the server gave this session at its start (its default too)."""
        self.sql.set_session_default(parse_search_path(value))

    def _end_user(self, sql: str) -> str | None:
        """Who this statement is for: the end user its sqlcommenter comment names, else the
        one the session SET (else nobody).  A comment does not carry over to the next
        statement: on a pooled connection that is another person's, or a job's, and a
        statement judged and recorded as the previous person's would blame them for it."""
        sources = self.end_user_sources
        named = None
        self._token = self._forged = None
        if "comment" in sources and "end_user" in sql:
            m = _COMMENT_END_USER.search(sql)
            if m:
                named = self._vouched(m.group(1))
        if "set" in sources and "pgwarden" in sql:
            m = _SET_END_USER.match(sql)
            if m:
                value = self._vouched(m.group(1)) if m.group(1) else None
                if self._forged is None:
                    self._session_end_user = value
            elif _RESET_END_USER.match(sql):
                self._session_end_user = None
        self._set_end_user(named if named is not None else self._session_end_user)
        return named

    def _vouched(self, value: str) -> str | None:
        """The end-user name ``value`` gives, once its signature is checked when the subject
        asks for one (else None, and ``_forged`` says why)."""
        if not self._signed:
            return value
        name, why = enduser.verify(self.end_user_key, value)
        if name is None:
            self._forged = why
            return None
        self._token = (value, name)
        return name

    def upstream(self, sql: str) -> str:
        """The text to send PostgreSQL (and keep in the audit trail): a signed name's token
        replaced by the bare name, so no other session can read a live one from
        ``pg_stat_activity`` and reuse it.  ``sql`` itself when there is none."""
        token = self._token
        return sql.replace(token[0], token[1]) if token is not None else sql

    def _set_end_user(self, name: str | None) -> None:
        s = self.subject
        if name != s.end_user:
            self.subject = self._interned(
                Subject(s.user, s.database, s.application, s.client_addr, name, s.roles)
            )

    def set_application(self, name: str) -> None:
        s = self.subject
        if name != s.application:
            self.subject = self._interned(
                Subject(s.user, s.database, name, s.client_addr, s.end_user, s.roles)
            )

    def _interned(self, s: Subject) -> Subject:
        known = self._subjects.get(s)
        if known is None:
            if len(self._subjects) >= 256:
                self._subjects.clear()
            known = self._subjects[s] = s
        return known

    def check(self, sql: str) -> list[Decision]:
        """Decisions for every statement of a Query (or the one of a Parse)."""
        named = self._end_user(sql)
        s = self.subject
        out: list[Decision] = []
        if self._forged is not None:
            return self._unvouched(sql)
        if self.nonstandard_strings and self.watchful:
            return self._refused_all(
                sql,
                refusal(
                    "fail-closed",
                    "this session has standard_conforming_strings off, so PostgreSQL reads "
                    "backslashes in string literals as escapes and pgwarden cannot read the "
                    "statement as the server will",
                    hint="connect with standard_conforming_strings on (the default)",
                ),
            )
        if self.foreign_encoding is not None and self.watchful:
            return self._refused_all(
                sql,
                refusal(
                    "fail-closed",
                    f"this session's client_encoding is {self.foreign_encoding}, in which a "
                    "quote or a backslash can be half of a character: PostgreSQL and pgwarden "
                    "could read different SQL",
                    hint="connect with client_encoding UTF8 (or another encoding a database "
                    "can have: LATIN1, WIN1252, EUC_JP ...)",
                ),
            )
        text = self.upstream(sql)
        for f in self.sql.analyze(sql):
            subject = s
            key = (
                ("cursor", f.cursor_name) if f.cursor_name
                else ("prepared", f.prepared_name) if f.prepared_name
                else None
            )  # fmt: skip
            if key is not None:
                if f.kind in ("declare_cursor", "prepare"):
                    if len(self._owners) >= 1024:
                        self._owners.clear()
                    self._owners[key] = s.end_user
                elif named is None and key in self._owners:
                    owner = self._owners[key]
                    if owner != s.end_user:
                        subject = Subject(
                            s.user, s.database, s.application, s.client_addr, owner, s.roles
                        )
            verdict = self.engine.decide(subject, f)
            if f.columns_written and not verdict.blocks:
                verdict = self._lookup_write(f, subject) or verdict
            out.append(Decision(f, verdict, subject, text))
        return out

    def function_call(self) -> Decision | None:
        """The refusal of a FunctionCall message (the protocol's fast path: a function
        called by its number, with arguments and no SQL), or None when no rule applies to
        this session: whatever the function reads or returns cannot be followed."""
        return self.unfollowed(
            "<FunctionCall message>",
            "a FunctionCall message calls a function by number, with no SQL pgwarden can follow",
            "call the function in a SELECT",
        )

    def unfollowed(self, what: str, reason: str, hint: str) -> Decision | None:
        """The refusal of a protocol message pgwarden cannot judge (``what``), or None when
        no rule applies to this session."""
        if not self.watchful:
            return None
        facts = QueryFacts(kind="protocol", normalized=what, fingerprint="protocol")
        return Decision(facts, refusal("fail-closed", reason, hint=hint), self.subject, what)

    def _unvouched(self, sql: str) -> list[Decision]:
        """Every statement of ``sql`` refused: it names an end user without the signature
        its subject asks for.  Not analysed: a SET or a cursor it declares does not happen."""
        verdict = refusal(
            "end-user-signature",
            f"{self._forged}; this account's end users must be named with a token the "
            "application signs",
            hint="name the end user with a token from the application (pgwarden policy "
            "sign-end-user)",
        )
        return self._refused_all(sql, verdict)

    def _refused_all(self, sql: str, verdict: Verdict) -> list[Decision]:
        """Every statement of ``sql`` refused with ``verdict``, not analysed as the session's
        SQL (a SET in it does not happen)."""
        facts = self.analyzer.analyze(sql, self.sql.search_path, self.subject.user)
        return [Decision(f, verdict, self.subject, sql) for f in facts]

    def _lookup_write(self, f: QueryFacts, subject: Subject) -> Verdict | None:
        """A refusal when the statement writes a column a need-to-know lookup of this
        subject reads (and the rule does not list as writable): assigning oneself every
        open ticket would make every customer one's own."""
        engine = self.engine
        for rule in engine.rules_for(engine.subjects_of(subject)):
            ntk = rule.need_to_know
            if ntk is None or (rule.mode or engine.policy.mode) is Mode.MONITOR:
                continue
            read = self._lookup_columns(rule.id, ntk.lookup)
            writable = frozenset(ntk.writable)
            for col in sorted(f.columns_written):
                hit = _written_and_read(col, read) - writable
                if hit:
                    return refusal(
                        rule.id,
                        f"it writes {', '.join(sorted(hit))}, which decides who may see which "
                        f"rows of {ntk.table}",
                        hint="ask someone the need-to-know rule does not cover to change it, "
                        "or list the column under the rule's writable",
                    )
        return None

    def _lookup_columns(self, rule_id: str, lookup: str) -> frozenset[str]:
        """The columns a need-to-know lookup reads ("schema.table.column"), per catalog;
        every column of its tables when it cannot be followed."""
        snapshot = self.analyzer.snapshot
        key = (rule_id, lookup)
        hit = self._lookups.get(key)
        if hit is not None and hit[0] is snapshot:
            return hit[1]
        cols: set[str] = set()
        for lf in self.analyzer.analyze(lookup, self.sql.search_path, self.subject.user):
            for src in lf.filter_columns | lf.output_sources:
                cols.add(f"{src.schema}.{src.table}.{src.plain.column}")
            if lf.unanalysable or lf.unknown:
                cols |= {f"{rel}.*" for rel in lf.relations_read}
        found = frozenset(cols)
        self._lookups[key] = (snapshot, found)
        return found

    def end_user_notes(self) -> list[cmd.Command]:
        """The end-user name the last statement was judged for, to be counted by the
        ``end_user_churn`` rules of this session's subject (a few per second at most)."""
        name = self.subject.end_user
        if name is None:
            return []
        rules = self._churn_rules()
        if not rules:
            return []
        now = time.monotonic()
        last = self._names_noted.get(name)
        if last is not None and now - last < _NOTE_NAME_EVERY:
            return []
        if len(self._names_noted) >= 1024:
            self._names_noted.clear()
        self._names_noted[name] = now
        s = self.subject
        named = self.record_id("end_user", name.encode())
        out: list[cmd.Command] = []
        for rule in rules:
            churn = rule.end_user_churn
            assert churn is not None
            scope = (
                f"conn:{self.connection_id}" if churn.per == "connection"
                else DB_USER_KEY + s.user
            )  # fmt: skip
            monitored = (rule.mode or self.engine.policy.mode) is Mode.MONITOR
            out.append(cmd.NoteEndUser(
                scope, rule.id, named, churn.window, churn.max_names, monitored, f"user:{s.user}",
            ))  # fmt: skip
        return out

    def _churn_rules(self) -> tuple[Rule, ...]:
        s, engine = self.subject, self.engine
        minute = int(time.time() // 60)
        cached = self._churn
        if cached is not None and cached[:3] == (engine, s.application, minute):
            return cached[3]
        # Matched without the end user: the rule is about the account the names come through.
        base = Subject(s.user, s.database, s.application, s.client_addr, None, s.roles)
        rules = tuple(
            r for r in engine.rules_for(engine.subjects_of(base)) if r.end_user_churn is not None
        )
        self._churn = (engine, s.application, minute, rules)
        return rules

    def result_shape(self, fields: bytes) -> ResultShape:
        """What the catalog says about a RowDescription body (cached: one statement's
        results all carry the same bytes, so this is decoded once, not per execution)."""
        snapshot = self.analyzer.snapshot
        if snapshot is not self._shapes_of:
            self._shapes.clear()
            self._shapes_of = snapshot
        shape = self._shapes.get(fields)
        if shape is None:
            if len(self._shapes) >= _SHAPE_CACHE_SIZE:
                self._shapes.clear()
            shape = self._shapes[fields] = _result_shape(snapshot, fields)
        return shape

    def table_labels(self, relation: str) -> frozenset[str]:
        """The labels of ``schema.table``'s columns, as the catalog knows them."""
        schema, _, name = relation.partition(".")
        rel = self.analyzer.snapshot.relation(schema, name)
        return rel.labels if rel is not None else frozenset()

    def column_type(self, relation: str, column: str) -> str | None:
        """The catalog's type name (``format_type``) of ``schema.table.column``, if known."""
        schema, _, name = relation.partition(".")
        rel = self.analyzer.snapshot.relation(schema, name)
        if rel is None:
            return None
        return next((c.type_name for c in rel.columns if c.name == column), None)

    def columns(
        self, decision: Decision | None, shape: ResultShape | None, formats: tuple[int, ...] = ()
    ) -> list[ColumnInfo]:
        """Labels (analysis and catalog together) and format of each result column.

        ``formats`` are Bind's result format codes, which decide the format of a portal's
        columns before its RowDescription is seen."""
        outputs = decision.facts.output if decision is not None else ()
        if shape is None:
            return [
                ColumnInfo(o.labels, result_format(formats, i) == 1, None, 0, _derived(o))
                for i, o in enumerate(outputs)
            ]
        out: list[ColumnInfo] = []
        if outputs and len(outputs) != len(shape.columns):
            # The server returns columns the analysis did not account for one by one
            # ((c.card).* of a composite inside a subquery): each may hold any of them.
            every = frozenset().union(*(o.labels for o in outputs))
            outputs = tuple(replace(o, labels=every, sources=frozenset(o.sources)) for o in outputs)
            outputs = outputs[:1] * len(shape.columns)
        for i, (labels, binary, pk_of, type_oid) in enumerate(shape.columns):
            derived = False
            if i < len(outputs):
                # The cross-check: the catalog knows a column is labelled even where the
                # analysis did not follow the expression that produced it.
                labels = labels | outputs[i].labels
                derived = _derived(outputs[i])
            out.append(
                ColumnInfo(
                    labels, binary or result_format(formats, i) == 1, pk_of, type_oid, derived
                )
            )
        return out

    def record_id(self, table: str, key: bytes) -> str:
        """A keyed hash naming one record: countable and joinable, not reversible."""
        return hmac.new(self.record_key, table.encode() + b":" + key, hashlib.sha256).hexdigest()[
            :24
        ]

    @property
    def value_index(self) -> ValueIndex | None:
        """The database's value index, when what this session receives is scanned: it is
        audited, or a rule applies to it."""
        if not self.values or not (self.audit or self.watchful):
            return None
        return self.values.get(self.subject.database)

    @property
    def watchful(self) -> bool:
        """Whether any rule applies to this subject (then results are cross-checked)."""
        cached = self._watchful
        if cached is not None and cached[0] is self.subject and cached[1] is self.engine:
            return cached[2]
        engine = self.engine
        value = bool(engine.rules_for(engine.subjects_of(self.subject)))
        self._watchful = (self.subject, engine, value)
        return value

    def withholds_server_text(self, decision: Decision | None) -> bool:
        """Whether the server's error and notice text for this statement must not reach the
        client: the subject has limits and the statement touches labelled data. A failed
        cast quotes the value it could not convert (``'a@x,b@y,...'::int`` puts a whole
        packed column in the message), a unique violation's DETAIL quotes the key, and a
        followed function may RAISE whatever it read."""
        if decision is None:
            return False
        f = decision.facts
        if not (f.labels or f.unknown or f.unanalysable):
            return False
        engine = self.engine
        return engine.has_limits(engine.rules_for(engine.subjects_of(decision.subject)))

    def redecide(self, decision: Decision, missed: frozenset[str]) -> Decision:
        """Decide again, knowing the result carries labels the analysis did not see."""
        extra = OutputColumn("(unanalysed)", frozenset(), missed)
        # What the analysis said of the statement's filters cannot be trusted either: the
        # labelled rows it missed are judged as an unfiltered read.
        facts = replace(
            decision.facts, output=(*decision.facts.output, extra), has_where=False,
            has_limit=False, limit=None,
        )  # fmt: skip
        return replace(decision, facts=facts, verdict=self.engine.decide(decision.subject, facts))

    @property
    def person(self) -> str:
        """Who need-to-know lookups are run for: the end user, else the database user."""
        return self.subject.end_user or self.subject.user

    def allowed_keys(
        self, rule_id: str, person: str | None = None, *, fresh: bool = True
    ) -> frozenset[bytes] | None:
        """The keys ``person`` (default: the session's current one) may see, if cached (and
        not expired, unless ``fresh`` is False: a statement judged with a fresh answer keeps
        it for its result even if the cache time runs out in between)."""
        hit = self.allowed.get((rule_id, person or self.person))
        if hit is None or (fresh and hit[0] < time.monotonic()):
            return None
        return hit[1]

    def blocked(self, decisions: list[Decision]) -> Decision | None:
        for d in decisions:
            if d.verdict.blocks:
                return d
        return None
