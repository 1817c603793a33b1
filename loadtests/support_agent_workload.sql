-- pgbench script template: one unit of one agent's work, as the helpdesk application sends it.
--
-- The application connects as its shared account (support_app) and names the agent on every
-- statement in a sqlcommenter comment, so pgwarden judges the agent, not the account.
-- loadtests/agents.py writes one copy of this file per agent with @AGENT_ID@ and @USERNAME@
-- filled in: pgbench turns every :variable into a $n parameter in extended and prepared
-- mode, comments included, so the agent's name cannot come from a pgbench variable.
-- Run with -D queue=N (how many open tickets each agent is working on).
--
-- The agent picks one of the tickets in their queue (their first :queue open or pending
-- tickets), looks at it, at the customer behind it and at the conversation; one time in
-- four the ticket moves between open and pending.  Tickets are not closed here, so the
-- queue -- and with it the set of customers each agent reads -- stays the same however long
-- the load runs.

\set aid @AGENT_ID@
\set st random(1, 2)
\set change random(1, 4)

-- 0. one ticket from the agent's queue
SELECT ticket_id AS tid
  FROM (SELECT ticket_id FROM tickets
         WHERE assigned_agent_id = :aid AND status <> 'closed'
         ORDER BY ticket_id LIMIT :queue) AS queue
 ORDER BY random() LIMIT 1 /* end_user='@USERNAME@' */
\gset

-- 1. the ticket
SELECT ticket_id, ticket_number, subject, status, priority, assigned_agent_id, updated_at
  FROM tickets
 WHERE ticket_number = 'TM-' || lpad(CAST(:tid AS text), 7, '0') /* end_user='@USERNAME@' */;

-- 2. the customer behind the ticket (labelled columns: name, e-mail, phone)
SELECT c.customer_id, c.full_name, c.email, c.phone, c.tier, c.country
  FROM tickets t
  JOIN customers c ON c.customer_id = t.customer_id
 WHERE t.ticket_id = :tid /* end_user='@USERNAME@' */;

-- 3. the conversation so far, newest first
SELECT m.message_id, m.author_kind, m.agent_id, m.body, m.created_at
  FROM ticket_messages m
 WHERE m.ticket_id = :tid
 ORDER BY m.created_at DESC
 LIMIT 10 /* end_user='@USERNAME@' */;

-- 4. sometimes the ticket moves on
\if :change = 1
UPDATE tickets
   SET status = (ARRAY['open', 'pending'])[:st], updated_at = now()
 WHERE ticket_id = :tid AND assigned_agent_id = :aid /* end_user='@USERNAME@' */;
\endif
