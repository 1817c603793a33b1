-- pgbench script: one unit of a support agent's work on the customer-support database.
--
-- Run with the data sizes of the generated database (loadtests/supportdb.py), e.g.:
--   pgbench -f loadtests/support_workload.sql -D ntickets=30000 -D nagents=40 support
-- ntickets and nagents are the row counts of tickets and agents; ids run 1..count.
--
-- The agent types a ticket number into the support tool, which shows the ticket, the
-- customer behind it and the latest messages; one lookup in four ends with a status change.

\set tid random(1, :ntickets)
\set aid random(1, :nagents)
\set st random(1, 3)
\set change random(1, 4)

-- 1. the ticket, by the number the agent typed in
SELECT ticket_id, ticket_number, subject, status, priority, assigned_agent_id, updated_at
  FROM tickets
 WHERE ticket_number = 'TM-' || lpad(CAST(:tid AS text), 7, '0');

-- 2. the customer behind the ticket (labelled columns: name, e-mail, phone)
SELECT c.customer_id, c.full_name, c.email, c.phone, c.tier, c.country
  FROM tickets t
  JOIN customers c ON c.customer_id = t.customer_id
 WHERE t.ticket_number = 'TM-' || lpad(CAST(:tid AS text), 7, '0');

-- 3. the conversation so far, newest first
SELECT m.message_id, m.author_kind, m.agent_id, m.body, m.created_at
  FROM ticket_messages m
 WHERE m.ticket_id = :tid
 ORDER BY m.created_at DESC
 LIMIT 10;

-- 4. sometimes the agent moves the ticket on and takes it
\if :change = 1
-- (a closed ticket stays closed: reopening one could put a canary customer -- planted with
-- one closed ticket -- into an agent's queue, and the agents' workload that runs on the same
-- data afterwards would then trip the canary rule)
UPDATE tickets
   SET status = (ARRAY['open', 'pending', 'closed'])[:st],
       assigned_agent_id = :aid,
       updated_at = now()
 WHERE ticket_id = :tid AND status <> 'closed';
\endif
