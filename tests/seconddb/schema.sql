-- A second customer-support database for adversarial tests, deliberately unlike
-- config/support_schema.sql: everything lives in schema "crm" (reached through the login
-- roles' own search_path), names are quoted mixed case, customer data is spread over a
-- partitioned table, an inheritance child, a materialized view, JSONB, a composite type and
-- an array, and there is row-level security, a security-barrier view and SECURITY DEFINER
-- functions that hand out customer data.
--
-- No column carries a 'pgwarden:' comment: the labels come from tests/seconddb/policy.yaml.

CREATE SCHEMA crm;
CREATE SCHEMA scratch;          -- where agents may keep tables of their own

CREATE TYPE crm.contact_card AS (name text, email text, phone text);

CREATE TABLE crm.agents (
    agent_id      integer PRIMARY KEY,
    username      text NOT NULL UNIQUE,          -- login role / end-user name
    "DisplayName" text NOT NULL,
    team          text NOT NULL
);

-- The customers: name and e-mail in quoted mixed-case columns, a JSONB profile repeating
-- them, a composite contact card and an array of alternative phone numbers.
CREATE TABLE crm.customers (
    customer_id   bigint PRIMARY KEY,
    "FullName"    text NOT NULL,
    "Email"       text NOT NULL,
    region        text NOT NULL,
    tier          text NOT NULL DEFAULT 'standard',
    profile       jsonb NOT NULL DEFAULT '{}',   -- {"name":..,"contact":{"email":..,"phone":..},"prefs":{..}}
    card          crm.contact_card,
    alt_phones    text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Customers migrated from an old system: an inheritance child, so a plain scan of
-- crm.customers returns them too.
CREATE TABLE crm.legacy_customers (
    legacy_ref    text NOT NULL
) INHERITS (crm.customers);
ALTER TABLE crm.legacy_customers ADD PRIMARY KEY (customer_id);

-- Phone numbers: a partitioned table.
CREATE TABLE crm.customer_phones (
    customer_id   bigint NOT NULL,
    kind          text NOT NULL,
    phone         text NOT NULL,
    PRIMARY KEY (customer_id, kind)
) PARTITION BY LIST (kind);
CREATE TABLE crm.customer_phones_mobile PARTITION OF crm.customer_phones FOR VALUES IN ('mobile');
CREATE TABLE crm.customer_phones_other PARTITION OF crm.customer_phones DEFAULT;

CREATE TABLE crm."Tickets" (
    ticket_id          bigint PRIMARY KEY,
    "TicketNo"         text NOT NULL UNIQUE,
    customer_id        bigint NOT NULL,
    assigned_agent_id  integer REFERENCES crm.agents,
    subject            text NOT NULL,
    status             text NOT NULL DEFAULT 'open',
    restricted         boolean NOT NULL DEFAULT false,
    opened_at          timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tickets_customer_idx ON crm."Tickets" (customer_id);
CREATE INDEX tickets_agent_idx ON crm."Tickets" (assigned_agent_id, status);

-- Row-level security: restricted (legal-hold) tickets are hidden from everyone but their
-- owner's role; ordinary tickets are visible to all agents.
ALTER TABLE crm."Tickets" ENABLE ROW LEVEL SECURITY;
CREATE POLICY tickets_visible ON crm."Tickets" FOR ALL
    USING (NOT restricted) WITH CHECK (NOT restricted);

CREATE TABLE crm.ticket_messages (
    message_id   bigint PRIMARY KEY,
    ticket_id    bigint NOT NULL REFERENCES crm."Tickets",
    author       text NOT NULL CHECK (author IN ('customer', 'agent')),
    body         text NOT NULL,
    sent_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ticket_messages_ticket_idx ON crm.ticket_messages (ticket_id);

CREATE TABLE crm.products (product_id integer PRIMARY KEY, name text NOT NULL);

-- A directory for the reporting team, refreshed nightly.
CREATE MATERIALIZED VIEW crm.customer_directory AS
    SELECT c.customer_id, c."FullName" AS full_name, c."Email" AS email, p.phone
    FROM crm.customers c
    LEFT JOIN crm.customer_phones p ON p.customer_id = c.customer_id AND p.kind = 'mobile'
WITH NO DATA;

-- A security-barrier view: the contact sheet without test accounts.
CREATE VIEW crm."ContactSheet" WITH (security_barrier = true) AS
    SELECT c.customer_id, c."FullName" AS "Name", c."Email" AS "Mail", p.phone AS "Tel"
    FROM crm.customers c
    LEFT JOIN crm.customer_phones p ON p.customer_id = c.customer_id AND p.kind = 'mobile'
    WHERE c.tier <> 'test';

-- SECURITY DEFINER functions (owned by the superuser): the customer card of a ticket, and
-- a "search" the old tool used.
CREATE FUNCTION crm.ticket_customer(p_ticket text)
RETURNS TABLE (customer_id bigint, name text, email text, phone text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = crm, pg_temp AS $$
    SELECT c.customer_id, c."FullName", c."Email", p.phone
    FROM crm."Tickets" t JOIN crm.customers c ON c.customer_id = t.customer_id
    LEFT JOIN crm.customer_phones p ON p.customer_id = c.customer_id AND p.kind = 'mobile'
    WHERE t."TicketNo" = p_ticket
$$;

CREATE FUNCTION crm.search_customers(p_pattern text)
RETURNS SETOF crm.contact_card
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = crm, pg_temp AS $$
    SELECT (c.card).* FROM crm.customers c WHERE c."Email" ILIKE p_pattern
$$;
