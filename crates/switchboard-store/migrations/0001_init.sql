-- Shard leases, conversation summaries and the event log.
-- Portable SQL: it runs unchanged on SQLite and PostgreSQL.

CREATE TABLE shard_leases (
    shard INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    customer_name TEXT NOT NULL,
    first_question TEXT NOT NULL,
    state TEXT NOT NULL,
    owner_agent_id TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    queued_at_ms BIGINT NOT NULL,
    -- 0 = unset
    accepted_at_ms BIGINT NOT NULL DEFAULT 0,
    -- 0 = unset
    closed_at_ms BIGINT NOT NULL DEFAULT 0,
    last_seq BIGINT NOT NULL DEFAULT 0,
    shard INTEGER NOT NULL,
    customer_token TEXT NOT NULL DEFAULT ''
);

-- A group's waiting queue, first come first served.
CREATE INDEX conversations_by_queue ON conversations (tenant_id, state, group_id, queued_at_ms, id);
-- An agent's conversations.
CREATE INDEX conversations_by_owner ON conversations (tenant_id, owner_agent_id, state);
-- The conversations to activate after a shard takeover.
CREATE INDEX conversations_by_shard ON conversations (shard, state);

CREATE TABLE events (
    conversation_id TEXT NOT NULL REFERENCES conversations (id),
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    author_role TEXT NOT NULL,
    author_id TEXT NOT NULL,
    -- NULL when the event has no client message id, so that such events never collide below.
    client_msg_id TEXT NULL,
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);

-- Deduplication of client retries.
CREATE UNIQUE INDEX events_by_client_msg_id ON events (conversation_id, client_msg_id);
