//! Where SQLite and PostgreSQL differ. The schema (`migrations/`) and most statements are portable SQL
//! with `$1, $2, ...` placeholders numbered in order of first appearance; the differences are:
//!
//! - **Database time.** On SQLite the database lives in the store's own process, so database time is the
//!   store's injected clock ([`db_now_ms`]). On PostgreSQL it is the server's clock, read inside the
//!   transaction ([`PG_NOW_MS`]), so that every store process judges expiry by the same clock; a test clock
//!   can be injected instead (`PgOptions::test_clock`).
//! - **Locks.** SQLite takes the database's write lock as a write transaction begins (`BEGIN IMMEDIATE`), so
//!   an append batch's reads need no locks. PostgreSQL takes row locks (`pg` module): `FOR SHARE` on the fence's lease row
//!   for the length of an append batch (an acquire that bumps the epoch waits for the appends made under
//!   the old one), `FOR UPDATE` on the license row when the batch may create or finish a conversation
//!   (admissions serialized: the license limit holds exactly), `FOR UPDATE` on the conversations appended
//!   to (gap-free seqs, deduplication), and `FOR UPDATE` on lease rows in shard order before changing them
//!   (no deadlocks between acquires, renewals, releases and append batches).
//! - **Lists of values.** An append batch on PostgreSQL binds one array per column (`= ANY($1)`,
//!   `unnest`), so that it is a handful of statements, each a round trip, whatever its size. On SQLite a
//!   statement is a call in the store's own process (`writer`), so a batch runs one prepared statement per
//!   row.
//! - **Ordering of ids.** Ids sort bytewise on both: SQLite's default BINARY collation, `COLLATE "C"` on
//!   PostgreSQL whatever the database's collation.

use switchboard_domain::Clock;

/// "Database time" on SQLite, in milliseconds since the Unix epoch: the time lease expiry is decided by.
pub(crate) fn db_now_ms(clock: &dyn Clock) -> i64 {
    clock.now_ms()
}

/// Database time on PostgreSQL, in milliseconds since the Unix epoch.
pub(crate) const PG_NOW_MS: &str = "SELECT CAST(floor(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)";
