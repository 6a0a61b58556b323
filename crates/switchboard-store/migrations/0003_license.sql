-- The cluster-wide license limit, tickets (offline messages), and the offer fields of the summaries.
-- Portable SQL: it runs unchanged on SQLite and PostgreSQL.

-- The license: one row. `max_sessions` is the most concurrent chat sessions (0 = unlimited); `used` is the
-- number of permits held, always the number of rows of `license_permits`. An append that creates a
-- conversation admits it only while used < max_sessions, under this row's lock (the append batch reads it
-- FOR UPDATE on PostgreSQL), so that no interleaving of store processes can over-admit.
CREATE TABLE license (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    max_sessions BIGINT NOT NULL DEFAULT 0 CHECK (max_sessions >= 0),
    used BIGINT NOT NULL DEFAULT 0 CHECK (used >= 0)
);

-- One permit per conversation not finished (queued or active): taken in the transaction that creates the
-- conversation, deleted in the one that closes or cancels it. The key makes a second permit for one
-- conversation impossible.
CREATE TABLE license_permits (
    conversation_id TEXT PRIMARY KEY REFERENCES conversations (id),
    tenant_id TEXT NOT NULL,
    acquired_at_ms BIGINT NOT NULL
);

-- The sessions open when this migration runs hold their permits; the limit starts unlimited.
INSERT INTO license_permits (conversation_id, tenant_id, acquired_at_ms)
SELECT id, tenant_id, created_at_ms FROM conversations WHERE state NOT IN ('closed', 'cancelled');
INSERT INTO license (id, max_sessions, used) SELECT 1, 0, COUNT(*) FROM license_permits;

-- The outstanding offer of a waiting chat (push routing): '' / 0 = none; `offered_to` is a JSON array of
-- the agent ids it was offered to already.
ALTER TABLE conversations ADD COLUMN offer_agent_id TEXT NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN offer_expires_at_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN offered_to TEXT NOT NULL DEFAULT '[]';

-- The chats offered to an agent.
CREATE INDEX conversations_by_offer ON conversations (tenant_id, offer_agent_id, state);

-- Offline messages and other requests answered later. `conversation_id` is '' when there is none.
CREATE TABLE tickets (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    customer_name TEXT NOT NULL,
    customer_contact TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    conversation_id TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    idempotency_key TEXT NOT NULL,
    -- A client's retry is the same ticket.
    UNIQUE (tenant_id, idempotency_key)
);

-- A tenant's tickets, newest first.
CREATE INDEX tickets_by_tenant ON tickets (tenant_id, created_at_ms, id);
