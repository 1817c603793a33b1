"""Deterministic data for the second test database (``schema.sql``), the roles that log in
to it, and a client-side matcher that recognises any customer's name, e-mail or phone
number in whatever text reached a client.

Nothing here knows how pgwarden works: the matcher only knows what the generator wrote.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "schema.sql"
POLICY = HERE / "policy.yaml"
END_USER_KEY = HERE / "end_user.key"  # the helpdesk application's signing key (policy.yaml)

DBNAME = "crm_redteam"
PASSWORD = "redteam-secret"
AGENTS = ["agent_ann", "agent_bob", "agent_cat", "agent_dan", "agent_eve"]
APP_USER = "crm_app"  # the helpdesk's shared account (names agents per statement)
ANALYST = "crm_analyst"
ROLES = [*AGENTS, APP_USER, ANALYST]
CUSTOMERS = 3000  # in crm.customers
LEGACY = 300  # in crm.legacy_customers (inherits crm.customers)
CANARY_IDS = (777, 1555, 2333, 2999, 3111)  # 3111 is a legacy customer
SEED = 20261207

FIRST = [
    "Ada",
    "Bram",
    "Cleo",
    "Dara",
    "Emil",
    "Fenna",
    "Gita",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Lior",
    "Mira",
    "Nils",
    "Odette",
    "Pavel",
    "Quinn",
    "Rhea",
    "Sven",
    "Talia",
    "Ugo",
    "Vera",
    "Wim",
    "Xenia",
    "Yusuf",
    "Zora",
    "Anouk",
    "Bastian",
    "Celine",
    "Dmitri",
    "Elif",
    "Farid",
    "Greta",
    "Hamza",
    "Ilse",
    "Joris",
    "Katya",
    "Lennart",
    "Malak",
    "Noor",
    "Oskar",
    "Priya",
    "Ravi",
    "Saskia",
    "Timo",
    "Ulla",
    "Viggo",
    "Wanda",
    "Yara",
    "Zeno",
    "Amara",
    "Benedikt",
    "Carmen",
    "Deniz",
    "Esme",
    "Floris",
    "Gideon",
    "Hedda",
    "Ivo",
    "Jasmijn",
    "Koen",
    "Leonie",
    "Matteo",
    "Nadia",
    "Otto",
    "Petra",
    "Rosalie",
    "Stijn",
    "Thea",
]
LAST = [
    "Okafor",
    "Lindqvist",
    "Marchetti",
    "Nakamura",
    "Brennan",
    "Castellanos",
    "Dvorak",
    "Eriksen",
    "Fontaine",
    "Gallagher",
    "Haddad",
    "Ishikawa",
    "Jovanovic",
    "Kowalczyk",
    "Laurent",
    "Moreau",
    "Novak",
    "Oyelaran",
    "Petrakis",
    "Quispe",
    "Rasmussen",
    "Santoro",
    "Takahashi",
    "Ulrich",
    "Valdivia",
    "Wojcik",
    "Xiong",
    "Yilmaz",
    "Zielinski",
    "Abernathy",
    "Bergstrom",
    "Chandrasekar",
    "Delacroix",
    "Esposito",
    "Fairweather",
    "Gunnarsson",
    "Halvorsen",
    "Iglesias",
    "Janssen",
    "Kristiansen",
    "Lombardi",
    "Mbeki",
    "Nieminen",
    "Oliveira",
    "Pellegrino",
    "Ramaswamy",
    "Schreiber",
    "Thorvaldsen",
    "Umarov",
    "Vasquez",
    "Whitfield",
    "Yamamoto",
    "Zamora",
    "Achterberg",
    "Brandvold",
    "Cavendish",
    "Drummond",
    "Everhart",
    "Falkenrath",
    "Grimaldi",
    "Hollenbeck",
    "Inverness",
    "Jablonski",
    "Kettering",
    "Lowenthal",
    "Montague",
    "Northcott",
    "Ostrowski",
    "Penhaligon",
    "Rutherford",
]
DOMAINS = ("mailbox.example", "post.example", "inbox.example")


@dataclass
class Customer:
    customer_id: int
    name: str
    email: str
    mobile: str
    landline: str | None
    alt_phone: str
    region: str
    tier: str
    legacy: bool


@dataclass
class Ticket:
    ticket_id: int
    ticket_no: str
    customer_id: int
    agent_id: int | None
    status: str
    restricted: bool


@dataclass
class Dataset:
    customers: dict[int, Customer] = field(default_factory=dict)
    tickets: list[Ticket] = field(default_factory=list)

    def agent_id(self, username: str) -> int:
        return AGENTS.index(username) + 1

    def need_to_know(self, username: str) -> set[int]:
        """Customers the agent may see: a ticket of theirs assigned and not closed."""
        aid = self.agent_id(username) if username in AGENTS else None
        return {t.customer_id for t in self.tickets if t.agent_id == aid and t.status != "closed"}

    def open_tickets(self, username: str) -> list[Ticket]:
        aid = self.agent_id(username)
        return [
            t for t in self.tickets
            if t.agent_id == aid and t.status != "closed" and not t.restricted
        ]  # fmt: skip

    @property
    def canary_emails(self) -> list[str]:
        return [self.customers[i].email for i in CANARY_IDS]


def generate(seed: int = SEED) -> Dataset:
    rnd = random.Random(seed)
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rnd.shuffle(names)
    ds = Dataset()
    for cid in range(1, CUSTOMERS + LEGACY + 1):
        name = names[cid - 1]
        first, last = name.split(" ")
        if cid in CANARY_IDS:
            email = f"canary-{CANARY_IDS.index(cid) + 1}@pgwarden-canary.example"
        else:
            email = f"{first.lower()}.{last.lower()}{cid}@{DOMAINS[cid % 3]}"
        ds.customers[cid] = Customer(
            customer_id=cid,
            name=name,
            email=email,
            mobile=f"+44 7700 {cid:06d}",
            landline=f"+44 20 {cid:04d} {(cid * 7919) % 10000:04d}" if cid % 3 == 0 else None,
            alt_phone=f"+1 555 {cid:07d}",
            region=("emea", "amer", "apac")[cid % 3],
            tier="vip" if cid % 17 == 0 else ("test" if cid % 101 == 0 else "standard"),
            legacy=cid > CUSTOMERS,
        )
    tid = 0
    for cid in ds.customers:
        if cid in CANARY_IDS:
            continue  # planted: no ticket, no task reads them
        for _ in range(2 if rnd.random() < 0.4 else 1):
            tid += 1
            r = rnd.random()
            status = "open" if r < 0.45 else ("pending" if r < 0.6 else "closed")
            agent = None if rnd.random() < 0.1 else rnd.randint(1, len(AGENTS))
            ds.tickets.append(
                Ticket(tid, f"CRM-{tid:06d}", cid, agent, status, rnd.random() < 0.02)
            )
    return ds


# --- loading ---------------------------------------------------------------------------------


def _copy(cur: psycopg.Cursor, table: str, columns: str, rows: list[tuple]) -> None:  # type: ignore[type-arg]
    with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _pg_array(values: list[str]) -> str:
    return "{" + ",".join('"' + v + '"' for v in values) + "}"


def load(conninfo: str, ds: Dataset) -> None:
    """Fill a database that already has ``schema.sql`` (as the superuser, directly)."""
    with psycopg.connect(conninfo, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO crm.agents VALUES " + ",".join(
            f"({i + 1}, '{u}', 'Agent {u[6:].title()}', 'tier1')" for i, u in enumerate(AGENTS)
        ))  # fmt: skip
        plain: list[tuple[Any, ...]] = []
        legacy: list[tuple[Any, ...]] = []
        for c in ds.customers.values():
            profile = json.dumps({
                "name": c.name,
                "contact": {"email": c.email, "phone": c.mobile},
                "prefs": {"newsletter": c.customer_id % 2 == 0, "lang": "en"},
            })  # fmt: skip
            card = f'("{c.name}",{c.email},"{c.mobile}")'
            row = (c.customer_id, c.name, c.email, c.region, c.tier, profile, card,
                   _pg_array([c.alt_phone]))  # fmt: skip
            (legacy if c.legacy else plain).append(row)
        cols = 'customer_id, "FullName", "Email", region, tier, profile, card, alt_phones'
        _copy(cur, "crm.customers", cols, plain)
        _copy(cur, "crm.legacy_customers", cols + ", legacy_ref",
              [(*r, f"OLD-{r[0]}") for r in legacy])  # fmt: skip
        phones = []
        for c in ds.customers.values():
            phones.append((c.customer_id, "mobile", c.mobile))
            if c.landline:
                phones.append((c.customer_id, "landline", c.landline))
        _copy(cur, "crm.customer_phones", "customer_id, kind, phone", phones)
        _copy(cur, 'crm."Tickets"',
              'ticket_id, "TicketNo", customer_id, assigned_agent_id, subject, status, restricted',
              [(t.ticket_id, t.ticket_no, t.customer_id, t.agent_id,
                f"Order problem #{t.ticket_id % 97}", t.status, t.restricted)
               for t in ds.tickets])  # fmt: skip
        msgs, mid = [], 0
        for t in ds.tickets:
            for author, body in (("customer", "My parcel has not arrived."),
                                 ("agent", "We are looking into it.")):  # fmt: skip
                mid += 1
                msgs.append((mid, t.ticket_id, author, body))
        _copy(cur, "crm.ticket_messages", "message_id, ticket_id, author, body", msgs)
        cur.execute("INSERT INTO crm.products VALUES (1, 'Widget'), (2, 'Gadget')")
        cur.execute("REFRESH MATERIALIZED VIEW crm.customer_directory")
        cur.execute("ANALYZE")
        conn.commit()


def setup_sql() -> str:
    """Roles (cluster-wide: created once), their search_path, and the grants."""
    out = []
    for role in ROLES:
        out.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
            f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'; END IF; END $$;"
        )
        out.append(f"ALTER ROLE {role} SET search_path = crm, public;")
    return "\n".join(out)


def grants_sql() -> str:
    everyone = ", ".join(ROLES)
    agents = ", ".join([*AGENTS, APP_USER])
    return f"""
GRANT USAGE ON SCHEMA crm TO {everyone};
GRANT SELECT ON ALL TABLES IN SCHEMA crm TO {everyone};
GRANT UPDATE (status, assigned_agent_id, updated_at) ON crm."Tickets" TO {agents};
GRANT INSERT ON crm.ticket_messages TO {agents};
GRANT USAGE, CREATE ON SCHEMA scratch, public TO {agents};
GRANT TEMPORARY ON DATABASE {DBNAME} TO {everyone};
"""


def build(psql, conninfo: str, ds: Dataset | None = None) -> Dataset:  # type: ignore[no-untyped-def]
    """(Re)create the database in a cluster: ``psql(sql, database=...)`` runs SQL as the
    superuser, ``conninfo`` reaches the new database directly as the superuser."""
    ds = ds or generate()
    psql(f"DROP DATABASE IF EXISTS {DBNAME}; CREATE DATABASE {DBNAME};", database="postgres")
    psql(setup_sql(), database="postgres")
    psql(SCHEMA.read_text(), database=DBNAME)
    load(conninfo, ds)
    psql(grants_sql(), database=DBNAME)
    return ds


# --- the client-side matcher -----------------------------------------------------------------

_EMAIL = re.compile(r"[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}")
_PHONE = re.compile(r"\+?\d[\d \-().]{6,}\d")
_WORD = re.compile(r"[a-z]+")


class Matcher:
    """Which customers' values occur in a text (also reversed, also case-folded)."""

    def __init__(self, ds: Dataset) -> None:
        self.by_email: dict[str, int] = {}
        self.by_phone: dict[str, int] = {}
        self.by_name: dict[tuple[str, str], int] = {}
        for c in ds.customers.values():
            self.by_email[c.email.lower()] = c.customer_id
            for p in (c.mobile, c.landline, c.alt_phone):
                if p:
                    self.by_phone[re.sub(r"\D", "", p)] = c.customer_id
            first, last = c.name.lower().split(" ")
            self.by_name[(first, last)] = c.customer_id

    def _scan(self, text: str, found: set[int]) -> None:
        low = text.lower()
        for m in _EMAIL.findall(low):
            cid = self.by_email.get(m)
            if cid is None:  # an e-mail glued to its neighbours: try its suffixes
                for i in range(1, len(m)):
                    cid = self.by_email.get(m[i:])
                    if cid is not None:
                        break
            if cid is not None:
                found.add(cid)
        for m in _PHONE.findall(text):
            digits = re.sub(r"\D", "", m)
            cid = self.by_phone.get(digits)
            if cid is not None:
                found.add(cid)
            elif len(digits) > 12:  # several numbers run together
                for size in (11, 12):
                    for i in range(0, len(digits) - size + 1):
                        cid = self.by_phone.get(digits[i : i + size])
                        if cid is not None:
                            found.add(cid)
        words = _WORD.findall(low)
        for a, b in itertools.pairwise(words):
            cid = self.by_name.get((a, b))
            if cid is not None:
                found.add(cid)

    def customers_in(self, text: str) -> set[int]:
        found: set[int] = set()
        if not text:
            return found
        self._scan(text, found)
        self._scan(text[::-1], found)
        return found


def dump_io(rows: list[tuple]) -> str:  # type: ignore[type-arg]
    buf = io.StringIO()
    for r in rows:
        buf.write(repr(r))
        buf.write("\n")
    return buf.getvalue()
