-- Objects the analysis corpus needs beyond config/support_schema.sql: a schema that shadows
-- public.customers through search_path, mixed-case quoted names, a harmless archive table.
CREATE SCHEMA shadow;
CREATE TABLE shadow.customers (
    customer_id bigint PRIMARY KEY,
    nickname    text,
    email       text
);
COMMENT ON COLUMN shadow.customers.email IS 'pgwarden: pii.email';

CREATE SCHEMA "Mixed";
CREATE TABLE "Mixed"."Customers" (
    "Email" text,
    note    text
);
COMMENT ON COLUMN "Mixed"."Customers"."Email" IS 'pgwarden: pii.email';

CREATE TABLE archive (
    id      bigint,
    payload text
);

-- A third level of views: over vip_contacts, which is over customer_contacts.
CREATE VIEW reporting.vip_emails AS
    SELECT v.contact AS address FROM reporting.vip_contacts v;
