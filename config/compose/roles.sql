-- Login roles for the subjects of compose/policy.yaml, so the stack can show enforcement and
-- not only the DBA: support_app is the helpdesk application's shared account (subject
-- "agents"), analyst the analytics one.  Runs after ../support_schema.sql, once, when the
-- postgres container initialises an empty data directory.  Placeholder passwords, as in
-- docker-compose.yml: change them with your secret store.
CREATE ROLE support_app LOGIN PASSWORD 'change-me';
CREATE ROLE analyst LOGIN PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public, reporting TO support_app, analyst;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO support_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO support_app;
GRANT SELECT ON ALL TABLES IN SCHEMA public, reporting TO support_app, analyst;
