-- The delivery marks of each conversation: the highest seq the customer, and the agents, confirmed as
-- delivered. Kept in the summary so that a conversation's actor starts from it without reading the whole log.
-- Portable SQL: it runs unchanged on SQLite and PostgreSQL.
ALTER TABLE conversations ADD COLUMN customer_delivered_up_to BIGINT NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN agent_delivered_up_to BIGINT NOT NULL DEFAULT 0;
-- The conversations stored before: not known (-1), their logs tell (read once, when each is next activated).
UPDATE conversations SET customer_delivered_up_to = -1, agent_delivered_up_to = -1;
