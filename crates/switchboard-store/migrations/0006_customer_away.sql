-- Whether the customer left the ongoing chat (a `customer_left` event) and has not returned since: 1, else 0.
-- Kept in the summary so that a conversation's actor, which starts from it, knows whether a customer who
-- connects again returns. Every conversation stored before reads 0, which needs no rewrite of the rows.
-- Portable SQL: it runs unchanged on SQLite and PostgreSQL.
ALTER TABLE conversations ADD COLUMN customer_away BIGINT NOT NULL DEFAULT 0;
