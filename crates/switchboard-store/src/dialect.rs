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
//! - **Lists of values.** SQLite gets one JSON array (`json_each($1)`), PostgreSQL one array per column
//!   (`= ANY($1)`, `unnest`), so that the statements are static and prepared once per connection, and an
//!   append batch is a handful of statements whatever its size.
//! - **Ordering of ids.** Ids sort bytewise on both: SQLite's default BINARY collation, `COLLATE "C"` on
//!   PostgreSQL whatever the database's collation.

use switchboard_domain::Clock;

/// "Database time" on SQLite, in milliseconds since the Unix epoch: the time lease expiry is decided by.
pub(crate) fn db_now_ms(clock: &dyn Clock) -> i64 {
    clock.now_ms()
}

/// Database time on PostgreSQL, in milliseconds since the Unix epoch.
pub(crate) const PG_NOW_MS: &str = "SELECT CAST(floor(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)";

/// A list bound as one JSON array, for SQLite's `json_each($1)`.
pub(crate) fn json_list<T: serde::Serialize + ?Sized>(items: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(items).map_err(|error| sqlx::Error::Encode(Box::new(error)))
}
