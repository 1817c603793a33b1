"""Synthetic, deterministic data for the reference customer-support database.

Fills the tables of ``config/support_schema.sql`` (customers, agents, tickets,
ticket_messages, products) with plausible rows: names from built-in lists, e-mail addresses
derived from them, E.164 phone numbers, street addresses, tiers including some ``vip``,
tickets numbered ``TM-0001234`` with a realistic status mix, and a few short messages per
ticket.  The same ``seed`` always gives the same rows, so load tests and policy tests can
name concrete ids.

A few **canary customers** are planted among the real-looking ones.  Their ids and e-mail
addresses (``canary-<n>@pgwarden-canary.example``) are returned in the report's manifest so
that a policy can list them: no legitimate support task ever needs to read them, so reading
one is a strong sign of a bulk pull.

All addresses use reserved example domains (RFC 2606 / RFC 6761) so that no generated row
is a real person's mailbox.

Usage::

    python -m proxy.sandbox.supportdb --dsn postgresql://postgres@127.0.0.1:5432/support \
        --customers 100000 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from proxy.sandbox.cluster import schema_sql

# Every timestamp is an offset from this fixed instant: using now() would break determinism.
EPOCH = datetime(2021, 1, 1, tzinfo=UTC)
HISTORY = timedelta(days=5 * 365)
CANARY_DOMAIN = "pgwarden-canary.example"
DEFAULT_CANARIES = 5

FIRST_NAMES = (  # noqa: SIM905 (a word list reads better as prose)
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara "
    "Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy "
    "Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily "
    "Andrew Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Dorothy George Melissa "
    "Timothy Deborah Ronald Stephanie Edward Rebecca Jason Sharon Jeffrey Laura Ryan Cynthia "
    "Jacob Kathleen Gary Amy Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry "
    "Pamela Justin Emma Scott Nicole Brandon Helen Benjamin Samantha Samuel Katherine Gregory "
    "Christine Alexander Debra Frank Rachel Patrick Carolyn Raymond Janet Jack Catherine "
    "Dennis Maria Jerry Heather Tyler Diane Aaron Ruth Jose Julie Adam Olivia Nathan Joyce "
    "Henry Virginia Douglas Victoria Zachary Kelly Peter Lauren Kyle Christina Noah Joan "
    "Ethan Evelyn Jeremy Judith Walter Megan Christian Andrea Keith Cheryl Roger Hannah "
    "Terry Jacqueline Austin Martha Sean Gloria Gerald Teresa Carl Ann Harold Sara Dylan "
    "Madison Arthur Frances Lawrence Kathryn Jordan Janice Jesse Jean Bryan Abigail Billy "
    "Alice Bruce Judy Gabriel Sophia Joe Grace Logan Denise Alan Amber Juan Doris Albert "
    "Marilyn Willie Danielle Elijah Beverly Wayne Isabella Randy Theresa Vincent Diana "
    "Mason Natalie Roy Brittany Ralph Charlotte Bobby Marie Russell Kayla Bradley Alexis "
    "Philip Lori Eugene Lukas Mia Jonas Lea Finn Hannah Luca Sofia Matteo Giulia Hugo Chloe "
    "Louis Camille Lars Ingrid Sven Astrid Pieter Sanne Daan Femke Sean Aoife Conor Niamh "
    "Oliver Amelia Harry Isla Jack Ava Jamal Aisha Omar Fatima Wei Mei Hiroshi Yuki Raj Priya"
).split()

LAST_NAMES = (  # noqa: SIM905
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez "
    "Lopez Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson "
    "White Harris Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott "
    "Torres Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter "
    "Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart "
    "Morris Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed "
    "Kelly Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Wood James Bennett Gray "
    "Mendoza Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers Long Ross Foster "
    "Jimenez Powell Jenkins Perry Russell Sullivan Bell Coleman Butler Henderson Barnes "
    "Fisher Vasquez Simmons Romero Jordan Patterson Alexander Hamilton Graham Reynolds "
    "Griffin Wallace West Cole Hayes Bryant Gibson Ellis Stevens Murray Ford Marshall Owens "
    "Mcdonald Harrison Ruiz Kennedy Wells Alvarez Woods Mendoza Castro Olson Webb Washington "
    "Tucker Freeman Burns Henry Vasquez Snyder Simpson Crawford Jimenez Porter Mason Shaw "
    "Gordon Wagner Hunter Romero Hicks Dixon Hunt Palmer Robertson Black Holmes Stone Meyer "
    "Boyd Mills Warren Fox Rose Rice Moreno Schmidt Patel Ferguson Nichols Herrera Medina "
    "Ryan Fernandez Weaver Daniels Stephens Gardner Payne Kelley Dunn Pierce Arnold Tran "
    "Spencer Peters Hawkins Grant Hansen Castro Hoffman Hart Elliott Cunningham Knight "
    "Mueller Schneider Fischer Weber Becker Wagner Schulz Dubois Laurent Bernard Moreau "
    "Jansen Visser Bakker Smit Andersson Johansson Karlsson Nilsson Byrne Walsh Doyle "
    "Rossi Russo Bianchi Romano Tanaka Suzuki Sato Chen Wang Zhang Sharma Singh Khan Ali"
).split()

# country code: (E.164 prefix, national number length, cities, postcode pattern, weight)
# Postcode patterns: 9 = digit, A = letter, anything else is literal.
COUNTRIES: dict[str, tuple[str, int, tuple[str, ...], str, int]] = {
    "US": ("1", 10, ("Springfield", "Portland", "Austin", "Denver", "Columbus", "Madison",
                     "Raleigh", "Sacramento", "Boise", "Omaha", "Tucson", "Albany"), "99999", 40),
    "GB": ("44", 10, ("London", "Manchester", "Leeds", "Bristol", "Glasgow", "Cardiff",
                      "Norwich", "York"), "AA9 9AA", 14),
    "DE": ("49", 10, ("Berlin", "Hamburg", "Munich", "Cologne", "Leipzig", "Dresden"), "99999", 10),
    "FR": ("33", 9, ("Paris", "Lyon", "Marseille", "Toulouse", "Lille", "Nantes"), "99999", 8),
    "NL": ("31", 9, ("Amsterdam", "Rotterdam", "Utrecht", "Eindhoven", "Groningen"), "9999 AA", 6),
    "CA": ("1", 10, ("Toronto", "Montreal", "Vancouver", "Calgary", "Ottawa"), "A9A 9A9", 8),
    "AU": ("61", 9, ("Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide"), "9999", 6),
    "IE": ("353", 9, ("Dublin", "Cork", "Galway", "Limerick"), "A99 A9A9", 4),
    "SE": ("46", 9, ("Stockholm", "Gothenburg", "Malmo", "Uppsala"), "999 99", 4),
}  # fmt: skip

STREETS = (  # noqa: SIM905
    "Oak Maple Cedar Pine Elm Willow Birch Main High Church Station Mill Park Lake Hill "
    "River Bridge Market Queen King Victoria Green Spring Meadow Forest Garden Chestnut "
    "Ash Harbour Castle Orchard Sunset Highland Valley Union Washington Lincoln Jefferson"
).split()
STREET_KINDS = ("Street", "Avenue", "Road", "Lane", "Drive", "Way", "Court", "Place", "Close")
EMAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example", "inbox.example")
TIERS = (("standard", 72), ("plus", 16), ("business", 7), ("vip", 5))
TEAMS = ("billing", "technical", "accounts", "escalations", "onboarding")
STATUSES = (("closed", 68), ("pending", 12), ("open", 20))
PRIORITIES = (("low", 20), ("normal", 60), ("high", 15), ("urgent", 5))

SUBJECTS = (
    "Cannot log in to my account", "Refund for duplicate charge", "Invoice shows wrong VAT",
    "Update billing address", "Product arrived damaged", "Change of subscription plan",
    "Password reset e-mail not received", "Export of my data", "App crashes on start",
    "Delivery is late", "Cancel my subscription", "Two-factor authentication problem",
    "Licence key not accepted", "Question about pricing", "Account locked after update",
    "Wrong item shipped", "Card was declined", "Feature request: dark mode",
    "Sync fails with error 502", "Please close my account",
)  # fmt: skip
CUSTOMER_LINES = (
    "Hi, I still have this problem, can you help?", "Thanks, that worked.",
    "I tried that already and it did not help.", "Any update on this?",
    "Attached is a screenshot of the error.", "It happens on both my laptop and phone.",
    "I need this fixed before Friday please.", "Please call me back when you can.",
)  # fmt: skip
AGENT_LINES = (
    "Thanks for reaching out, I am looking into it now.",
    "Could you tell me which version you are using?",
    "I have issued the refund; it should appear within 5 business days.",
    "I escalated this to our technical team.", "Please try clearing the cache and retry.",
    "This should now be resolved, let us know if not.",
    "I have updated the details on your account.", "Closing this ticket as solved.",
)  # fmt: skip
PRODUCTS = (
    ("Starter plan", "subscription"), ("Pro plan", "subscription"),
    ("Business plan", "subscription"), ("Enterprise plan", "subscription"),
    ("Antivirus Home", "software"), ("Antivirus Business", "software"),
    ("Mobile Security", "software"), ("VPN Add-on", "software"),
    ("Backup 100 GB", "storage"), ("Backup 1 TB", "storage"),
    ("Password Manager", "software"), ("Router X200", "hardware"),
    ("USB Security Key", "hardware"), ("Premium Support", "service"),
    ("Onboarding Session", "service"), ("Extended Warranty", "service"),
)  # fmt: skip

# Load order respects the foreign keys; truncation goes the other way round.
TABLES = ("products", "agents", "customers", "tickets", "ticket_messages")
COLUMNS: dict[str, tuple[str, ...]] = {
    "products": ("product_id", "name", "category"),
    "agents": ("agent_id", "username", "full_name", "email", "team", "active"),
    "customers": ("customer_id", "full_name", "email", "phone", "street", "city", "postcode",
                  "country", "tier", "created_at"),
    "tickets": ("ticket_id", "ticket_number", "customer_id", "assigned_agent_id", "subject",
                "status", "priority", "created_at", "updated_at"),
    "ticket_messages": ("message_id", "ticket_id", "author_kind", "agent_id", "body",
                        "created_at"),
}  # fmt: skip


@dataclass(frozen=True)
class Canary:
    """One planted canary customer: a policy lists these, no real task ever reads them."""

    customer_id: int
    email: str
    full_name: str
    phone: str
    ticket_number: str | None


@dataclass
class GenerationReport:
    """What :func:`generate` loaded: row counts, the canary manifest and timings."""

    seed: int
    counts: dict[str, int]
    canaries: list[Canary]
    seconds: float = 0.0
    build_seconds: float = 0.0
    load_seconds: float = 0.0
    analyze_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of the report."""
        return asdict(self)


def ticket_number(ticket_id: int) -> str:
    """The human-facing ticket number for a ticket id (``TM-0001234``)."""
    return f"TM-{ticket_id:07d}"


def counts_for(customers: int) -> tuple[int, int]:
    """(agents, tickets) for a number of customers: ~1 agent per 500, ~1.5 tickets each."""
    return max(5, round(customers / 500)), (customers * 3) // 2


def _weighted(rng: random.Random, table: Sequence[tuple[str, int]], n: int) -> list[str]:
    values = [v for v, _ in table]
    weights = [w for _, w in table]
    return rng.choices(values, weights=weights, k=n)


def _pattern(rng: random.Random, pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch == "9":
            out.append(str(rng.randrange(10)))
        elif ch == "A":
            out.append(chr(65 + rng.randrange(26)))
        else:
            out.append(ch)
    return "".join(out)


def _phone(rng: random.Random, country: str) -> str:
    prefix, length, *_ = COUNTRIES[country]
    # National numbers never start with 0 or 1 after the country code in these plans.
    first = str(rng.randrange(2, 10))
    rest = "".join(str(rng.randrange(10)) for _ in range(length - 1))
    return f"+{prefix}{first}{rest}"


def _email(rng: random.Random, first: str, last: str, taken: set[str]) -> str:
    f, lname = first.lower(), last.lower()
    style = rng.randrange(5)
    if style == 0:
        local = f"{f}.{lname}"
    elif style == 1:
        local = f"{f[0]}{lname}"
    elif style == 2:
        local = f"{f}_{lname}{rng.randrange(1, 100)}"
    elif style == 3:
        local = f"{f}.{lname}{rng.randrange(1960, 2006)}"
    else:
        local = f"{lname}.{f}"
    domain = rng.choice(EMAIL_DOMAINS)
    email = f"{local}@{domain}"
    n = 2
    # Uniqueness is what a real customer table has (one account per address).
    while email in taken:
        email = f"{local}{n}@{domain}"
        n += 1
    taken.add(email)
    return email


def build_rows(
    customers: int = 100_000, seed: int = 7, canaries: int = DEFAULT_CANARIES
) -> tuple[dict[str, list[tuple[Any, ...]]], list[Canary]]:
    """Build every row in memory, deterministically from ``seed``.

    Returns the rows per table (in ``COLUMNS`` order) and the canary manifest.  Kept separate
    from loading so determinism can be tested without a database.
    """
    if customers < 1:
        raise ValueError("customers must be at least 1")
    rng = random.Random(seed)
    n_agents, n_tickets = counts_for(customers)
    history_s = int(HISTORY.total_seconds())
    country_codes = list(COUNTRIES)
    country_weights = [COUNTRIES[c][4] for c in country_codes]

    products = [(i + 1, name, cat) for i, (name, cat) in enumerate(PRODUCTS)]

    agents: list[tuple[Any, ...]] = []
    for agent_id in range(1, n_agents + 1):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        agents.append(
            (
                agent_id,
                f"agent{agent_id:03d}",
                f"{first} {last}",
                f"{first.lower()}.{last.lower()}.{agent_id}@support.example",
                rng.choice(TEAMS),
                rng.random() > 0.08,
            )
        )

    # Canaries sit at random positions among ordinary customers, so id ranges do not give
    # them away; at most one in ten customers is a canary on tiny datasets.
    n_canaries = min(canaries, max(1, customers // 10)) if canaries > 0 else 0
    canary_ids = sorted(rng.sample(range(1, customers + 1), n_canaries))
    canary_index = {cid: i + 1 for i, cid in enumerate(canary_ids)}

    taken: set[str] = set()
    tiers = _weighted(rng, TIERS, customers)
    countries = rng.choices(country_codes, weights=country_weights, k=customers)
    customer_rows: list[tuple[Any, ...]] = []
    customer_created: list[int] = [0]  # seconds after EPOCH, indexed by customer_id
    for i in range(customers):
        cid = i + 1
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        country = countries[i]
        _prefix, _len, cities, postcode_pattern, _w = COUNTRIES[country]
        if cid in canary_index:
            email = f"canary-{canary_index[cid]}@{CANARY_DOMAIN}"
            taken.add(email)
        else:
            email = _email(rng, first, last, taken)
        created = rng.randrange(history_s)
        customer_created.append(created)
        customer_rows.append(
            (
                cid,
                f"{first} {last}",
                email,
                _phone(rng, country) if rng.random() > 0.03 else None,
                f"{rng.randrange(1, 400)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}",
                rng.choice(cities),
                _pattern(rng, postcode_pattern),
                country,
                tiers[i],
                EPOCH + timedelta(seconds=created),
            )
        )

    ticket_customers = [rng.randrange(1, customers + 1) for _ in range(n_tickets)]
    # A ticket drawn for a canary goes to the next ordinary customer instead (no draw from
    # rng, so every other row stays as it was): a canary has exactly its one ticket below.
    if n_canaries < customers:
        for t, cid in enumerate(ticket_customers):
            while cid in canary_index:
                cid = cid % customers + 1
            ticket_customers[t] = cid
    # Every canary gets one ticket, so it looks like a customer who once asked for help.
    canary_ticket: dict[int, int] = {}
    if n_tickets >= n_canaries:
        for cid, tix in zip(canary_ids, rng.sample(range(n_tickets), n_canaries), strict=True):
            ticket_customers[tix] = cid
            canary_ticket[cid] = tix + 1
    statuses = _weighted(rng, STATUSES, n_tickets)
    # A canary's one ticket is closed: the customer asked for help once, long ago, so no
    # agent's queue (and no need-to-know lookup) ever leads to it; only a sweep does.
    for tix in canary_ticket.values():
        statuses[tix - 1] = "closed"
    priorities = _weighted(rng, PRIORITIES, n_tickets)
    tickets: list[tuple[Any, ...]] = []
    messages: list[tuple[Any, ...]] = []
    message_id = 0
    for t in range(n_tickets):
        tid = t + 1
        cid = ticket_customers[t]
        status = statuses[t]
        agent = rng.randrange(1, n_agents + 1)
        assigned = None if status == "open" and rng.random() < 0.25 else agent
        start = customer_created[cid] + rng.randrange(max(1, history_s - customer_created[cid]))
        opened = EPOCH + timedelta(seconds=start)
        n_messages = rng.randrange(1, 6)  # 1..5, three on average
        at = opened
        for k in range(n_messages):
            message_id += 1
            at = at + timedelta(seconds=rng.randrange(60, 86_400))
            # The customer opens the ticket; then agent and customer take turns.
            if k % 2 == 0:
                messages.append((message_id, tid, "customer", None, rng.choice(CUSTOMER_LINES), at))
            else:
                messages.append(
                    (message_id, tid, "agent", assigned or agent, rng.choice(AGENT_LINES), at)
                )
        tickets.append(
            (
                tid,
                ticket_number(tid),
                cid,
                assigned,
                rng.choice(SUBJECTS),
                status,
                priorities[t],
                opened,
                at,
            )
        )

    manifest = []
    for cid in canary_ids:
        row = customer_rows[cid - 1]
        ticket = canary_ticket.get(cid)
        manifest.append(
            Canary(
                customer_id=cid,
                email=row[2],
                full_name=row[1],
                phone=row[3] or "",
                ticket_number=ticket_number(ticket) if ticket else None,
            )
        )
    rows = {
        "products": products,
        "agents": agents,
        "customers": customer_rows,
        "tickets": tickets,
        "ticket_messages": messages,
    }
    return rows, manifest


def connect_kwargs(dsn_or_url: str) -> dict[str, Any]:
    """asyncpg arguments for a URL or a libpq ``key=value`` string.

    asyncpg only understands URLs; the cluster harness hands out both forms.
    """
    if "://" in dsn_or_url:
        return {"dsn": dsn_or_url}
    names = {"host": "host", "port": "port", "user": "user", "password": "password",
             "dbname": "database"}  # fmt: skip
    out: dict[str, Any] = {}
    for part in dsn_or_url.split():
        key, _, value = part.partition("=")
        if key in names:
            out[names[key]] = int(value) if key == "port" else value
        elif key == "sslmode":
            out["ssl"] = value
    return out


async def _ensure_schema(conn: asyncpg.Connection) -> None:
    exists = await conn.fetchval("SELECT to_regclass('public.customers') IS NOT NULL")
    if not exists:
        await conn.execute(schema_sql())


def _chunks(rows: list[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


async def generate(
    dsn_or_url: str,
    customers: int = 100_000,
    seed: int = 7,
    *,
    canaries: int = DEFAULT_CANARIES,
    progress: bool = False,
) -> GenerationReport:
    """Fill the support database at ``dsn_or_url`` with deterministic synthetic data.

    Creates the schema when ``customers`` does not exist yet, empties the five tables, loads
    them with binary COPY and runs ANALYZE.  Returns the counts and the canary manifest.
    """
    t0 = time.perf_counter()
    rows, manifest = build_rows(customers, seed, canaries)
    t1 = time.perf_counter()
    if progress:
        print(f"supportdb: built rows in {t1 - t0:.1f}s", file=sys.stderr)
    conn = await asyncpg.connect(**connect_kwargs(dsn_or_url))
    try:
        await _ensure_schema(conn)
        is_super = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        async with conn.transaction():
            await conn.execute("TRUNCATE " + ", ".join(reversed(TABLES)))
            if is_super:
                # Foreign-key triggers would check every ticket and message row one by one;
                # the rows are built consistent, so a superuser skips that (4x faster load).
                await conn.execute("SET LOCAL session_replication_role = replica")
            for table in TABLES:
                # Chunks keep asyncpg's encode buffer bounded for the 450k-message table.
                for chunk in _chunks(rows[table], 50_000):
                    await conn.copy_records_to_table(
                        table, records=chunk, columns=list(COLUMNS[table])
                    )
                if progress:
                    print(f"supportdb: loaded {table} ({len(rows[table])} rows)", file=sys.stderr)
        t2 = time.perf_counter()
        await conn.execute("ANALYZE " + ", ".join(TABLES))
        t3 = time.perf_counter()
    finally:
        await conn.close()
    counts = {table: len(rows[table]) for table in TABLES}
    return GenerationReport(
        seed=seed,
        counts=counts,
        canaries=manifest,
        seconds=t3 - t0,
        build_seconds=t1 - t0,
        load_seconds=t2 - t1,
        analyze_seconds=t3 - t2,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate, then print the report (with the canary manifest) as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m proxy.sandbox.supportdb",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dsn", required=True, help="URL or libpq key=value string")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--canaries", type=int, default=DEFAULT_CANARIES)
    args = parser.parse_args(argv)
    report = asyncio.run(
        generate(args.dsn, args.customers, args.seed, canaries=args.canaries, progress=True)
    )
    print(
        f"supportdb: {report.counts['customers']} customers loaded in {report.seconds:.1f}s "
        f"(build {report.build_seconds:.1f}s, copy {report.load_seconds:.1f}s, "
        f"analyze {report.analyze_seconds:.1f}s)",
        file=sys.stderr,
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
