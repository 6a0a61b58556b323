-- The delivery marks of each conversation: the highest seq the customer, and the agents, confirmed as
-- delivered; -1: not known (the log tells). Kept in the summary so that a conversation's actor starts from it
-- without reading the whole log. The conversations stored before read -1 from the default, which needs no
-- rewrite of the table's rows; every insert since gives the marks.
-- Portable SQL: it runs unchanged on SQLite and PostgreSQL.
ALTER TABLE conversations ADD COLUMN customer_delivered_up_to BIGINT NOT NULL DEFAULT -1;
ALTER TABLE conversations ADD COLUMN agent_delivered_up_to BIGINT NOT NULL DEFAULT -1;
