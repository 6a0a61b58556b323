//! Where SQLite and PostgreSQL differ. The schema (`migrations/`) and most statements are portable SQL
//! with `$1, $2, ...` placeholders numbered in order of first appearance; the differences are:
//!
//! - **Database time.** On SQLite the database lives in the store's own process, so database time is the
//!   store's injected clock ([`db_now_ms`]). On PostgreSQL it is the server's clock, read inside the
//!   transaction ([`PG_NOW_MS`]), so that every store process judges expiry by the same clock; a test clock
//!   can be injected instead (`PgOptions::test_clock`).
//! - **Locks.** SQLite serializes every write transaction on the store's single writer connection, so its
//!   reads need no locks. PostgreSQL takes row locks (`pg` module): `FOR SHARE` on the fence's lease row
//!   for the length of an append batch (an acquire that bumps the epoch waits for the appends made under
//!   the old one), `FOR UPDATE` on the license row when the batch may create or finish a conversation
//!   (admissions serialized: the license limit holds exactly), `FOR UPDATE` on the conversations appended
//!   to (gap-free seqs, deduplication), and `FOR UPDATE` on lease rows in shard order before changing them
//!   (no deadlocks between acquires, renewals, releases and append batches).
//! - **Lists of values.** SQLite gets one placeholder per value; PostgreSQL gets one array (`= ANY($1)`,
//!   `unnest`), so that its statements are static and prepared once per connection.
//! - **Ordering of ids.** Ids sort bytewise on both: SQLite's default BINARY collation, `COLLATE "C"` on
//!   PostgreSQL whatever the database's collation.

use switchboard_domain::Clock;

/// "Database time" on SQLite, in milliseconds since the Unix epoch: the time lease expiry is decided by.
pub(crate) fn db_now_ms(clock: &dyn Clock) -> i64 {
    clock.now_ms()
}

/// Database time on PostgreSQL, in milliseconds since the Unix epoch.
pub(crate) const PG_NOW_MS: &str = "SELECT CAST(floor(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)";

/// The current epoch of a shard, read at the start of an append batch to check its fence (SQLite).
pub(crate) const SELECT_FENCE_EPOCH: &str = "SELECT epoch FROM shard_leases WHERE shard = $1";

/// The conversation an append extends (SQLite).
pub(crate) const SELECT_CONVERSATION_FOR_APPEND: &str = "SELECT last_seq, shard FROM conversations WHERE id = $1";
