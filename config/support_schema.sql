-- The reference customer-support database that pgwarden guards.
--
-- The demo, the tests and the load tests all build this schema; the data generator
-- (loadtests/supportdb.py) fills it.  Column comments of the form 'pgwarden: <label>'
-- label the sensitive columns, so the labels travel with the database itself.

CREATE SCHEMA IF NOT EXISTS reporting;

CREATE TABLE agents (
    agent_id    integer PRIMARY KEY,
    username    text NOT NULL UNIQUE,          -- the end-user name the support tool reports
    full_name   text NOT NULL,
    email       text NOT NULL,
    team        text NOT NULL,
    active      boolean NOT NULL DEFAULT true
);

CREATE TABLE customers (
    customer_id   bigint PRIMARY KEY,
    full_name     text NOT NULL,
    email         text NOT NULL,
    phone         text,
    street        text,
    city          text,
    postcode      text,
    country       text NOT NULL,
    tier          text NOT NULL DEFAULT 'standard',
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tickets (
    ticket_id          bigint PRIMARY KEY,
    ticket_number      text NOT NULL UNIQUE,
    customer_id        bigint NOT NULL REFERENCES customers,
    assigned_agent_id  integer REFERENCES agents,
    subject            text NOT NULL,
    status             text NOT NULL DEFAULT 'open',
    priority           text NOT NULL DEFAULT 'normal',
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tickets_customer_idx ON tickets (customer_id);
CREATE INDEX tickets_agent_idx ON tickets (assigned_agent_id, status);

CREATE TABLE ticket_messages (
    message_id   bigint PRIMARY KEY,
    ticket_id    bigint NOT NULL REFERENCES tickets,
    author_kind  text NOT NULL CHECK (author_kind IN ('customer', 'agent')),
    agent_id     integer REFERENCES agents,
    body         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ticket_messages_ticket_idx ON ticket_messages (ticket_id);

-- A harmless table: nothing in it is about a person.
CREATE TABLE products (
    product_id  integer PRIMARY KEY,
    name        text NOT NULL,
    category    text NOT NULL
);

COMMENT ON COLUMN customers.full_name IS 'pgwarden: pii.name';
COMMENT ON COLUMN customers.email     IS 'pgwarden: pii.email';
COMMENT ON COLUMN customers.phone     IS 'pgwarden: pii.phone';
COMMENT ON COLUMN customers.street    IS 'pgwarden: pii.address';
COMMENT ON COLUMN customers.city      IS 'pgwarden: pii.address';
COMMENT ON COLUMN customers.postcode  IS 'pgwarden: pii.address';
COMMENT ON COLUMN tickets.ticket_number IS 'pgwarden: support.ticket';
COMMENT ON COLUMN agents.email        IS 'pgwarden: pii.email';

-- Views people reach for when a table is watched: a contact sheet, and a view over it.
CREATE VIEW reporting.customer_contacts AS
    SELECT c.customer_id, c.full_name AS name, c.email, c.phone
    FROM customers c;

CREATE VIEW reporting.vip_contacts AS
    SELECT cc.name, cc.email AS contact
    FROM reporting.customer_contacts cc
    JOIN customers c USING (customer_id)
    WHERE c.tier = 'vip';

CREATE VIEW reporting.open_tickets AS
    SELECT t.ticket_number, t.subject, t.status, a.username AS agent
    FROM tickets t LEFT JOIN agents a ON a.agent_id = t.assigned_agent_id
    WHERE t.status <> 'closed';

CREATE VIEW reporting.ticket_counts AS
    SELECT status, count(*) AS n FROM tickets GROUP BY status;
