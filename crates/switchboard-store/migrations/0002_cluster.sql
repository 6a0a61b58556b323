-- The cluster: the node registry, the history of lease grants, and the epoch each event was written under.
-- Portable SQL: it runs unchanged on SQLite and PostgreSQL.

-- Routers alive now: each heartbeat pushes expires_at_ms forward (database time).
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    -- Where the node's internal gRPC service listens.
    address TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

-- Append-only: one row per lease grant, written in the transaction of the grant. The primary key makes
-- "at most one owner per shard epoch" a constraint an invariant checker can rely on.
CREATE TABLE shard_lease_history (
    shard INTEGER NOT NULL,
    epoch BIGINT NOT NULL,
    node_id TEXT NOT NULL,
    acquired_at_ms BIGINT NOT NULL,
    PRIMARY KEY (shard, epoch)
);

-- The leases current when this migration ran (their grant time is unknown: 0).
INSERT INTO shard_lease_history (shard, epoch, node_id, acquired_at_ms)
SELECT shard, epoch, owner, 0 FROM shard_leases WHERE epoch > 0;

-- The fence epoch each event was written under; 0 for the events written before this migration.
ALTER TABLE events ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;

-- A leaving node's leases.
CREATE INDEX shard_leases_by_owner ON shard_leases (owner);
