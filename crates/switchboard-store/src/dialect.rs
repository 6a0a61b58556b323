//! The few places where SQLite and PostgreSQL differ. Everything else in the store is portable SQL with
//! `$1, $2, ...` placeholders numbered in order of first appearance.

use switchboard_domain::Clock;

/// "Database time" in milliseconds since the Unix epoch: the time lease expiry is decided by.
///
/// On SQLite the database lives in the store's own process, so database time is the store's injected
/// clock (tests control it). On PostgreSQL it will be the server's clock, read inside the transaction
/// (`SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)`), so that every node judges
/// expiry by the same clock.
pub(crate) fn db_now_ms(clock: &dyn Clock) -> i64 {
    clock.now_ms()
}

/// The current epoch of a shard, read at the start of an append to check its fence.
///
/// SQLite serializes every write transaction on the store's single writer connection. PostgreSQL needs
/// `FOR SHARE` here, so that an acquire that bumps the epoch waits for the appends made under the old one.
pub(crate) const SELECT_FENCE_EPOCH: &str = "SELECT epoch FROM shard_leases WHERE shard = $1";

/// The conversation an append extends.
///
/// SQLite: see [`SELECT_FENCE_EPOCH`]. PostgreSQL needs `FOR UPDATE` here, so that two appends to one
/// conversation take turns (gap-free sequence numbers, deduplication).
pub(crate) const SELECT_CONVERSATION_FOR_APPEND: &str = "SELECT last_seq, shard FROM conversations WHERE id = $1";
