//! The event log on SQLite: reads, and the checkpoints of the write-ahead log that the append writer
//! (`writer`) starts after its commits.

use futures_util::TryStreamExt as _;
use futures_util::stream::BoxStream;
use sqlx::{SqliteConnection, SqlitePool};
use switchboard_proto::internal::v1::{EventRecord, ReadEventsRequest, ReadEventsResponse};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::{db, to_i64};
use crate::records::{EventRow, Page, event_from_row};

pub(crate) const INSERT_CONVERSATION: &str = "INSERT INTO conversations (id, tenant_id, group_id, customer_name, \
     first_question, state, owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, \
     last_seq, shard, customer_token, offer_agent_id, offer_expires_at_ms, offered_to, customer_delivered_up_to, \
     agent_delivered_up_to) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12, $13, $14, $15, $16, 0, 0) \
     ON CONFLICT (id) DO NOTHING";

/// A log's events after a seq, at most `$3` of them.
pub(crate) const SELECT_EVENTS: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, client_msg_id, \
     kind, payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

/// The event stored under a deduplication key, by the index of `(conversation_id, client_msg_id)`.
pub(crate) const SELECT_EVENT_BY_KEY: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json FROM events WHERE conversation_id = $1 AND client_msg_id = $3 AND seq > $2";

pub(crate) const SELECT_EVENT_EPOCHS: &str = "SELECT seq, epoch FROM events WHERE conversation_id = $1 ORDER BY seq";

/// Checkpoints of the write-ahead log, off the write path. SQLite checkpoints inside the commit that grows
/// the log past `wal_autocheckpoint` pages: that commit, and every append waiting behind it, then waits for
/// the log to be copied into the database file and for its fsync. At 7,000 appends/s a batch writes some
/// 40 pages, so with SQLite's default of 1,000 pages the writer checkpointed every few batches, and a
/// batch's write-and-commit took 1.6 ms instead of 0.9. So after a commit a `PASSIVE` checkpoint runs on a
/// read connection, at most one at a time and at most one per [`Checkpoints::GAP`]: it copies what it can
/// without waiting for the writer, on another thread. The writer's own automatic checkpoint, at
/// [`Checkpoints::WRITER_AFTER_PAGES`], is only a bound on the log's size should these never catch up.
///
/// A checkpoint copies each page once however often the log rewrote it since the last one, and an append
/// rewrites the same few pages of its conversation (the last page of its events, of its index by client
/// message id, its row): checkpoints every 100 ms instead of every 25 copied a tenth fewer bytes and took a
/// tenth of `serve`'s CPU less at 5,000 messages/s, with the same latency. With the log pinned (below),
/// every 10 ms lowered `serve`'s p99 at 5,000 messages/s from 8.4 to 6.7 ms (means of 8 runs each: each
/// checkpoint's fsync of the database file, which the log's flush waits behind, is shorter), but took enough
/// CPU that `serve` fell behind at 14,000 messages/s where it kept up every 100 ms: not kept.
///
/// **The log is pinned** until it holds [`Checkpoints::UNPIN_AT_PAGES`]. The first commit after a complete
/// checkpoint starts the log over from its beginning, and SQLite then syncs the log's new header inside that
/// commit (`fsync`, 4–13 ms on this project's machine, while every append waits; SQLite requires it, see its
/// ticket ff5be73dee). With a checkpoint every 100 ms catching up with the writer between two batches, that
/// was nine stalls a second at 5,000 messages/s. So a connection of its own (the *pin*, which reads nothing)
/// holds a read transaction at the log's end, renewed just before each checkpoint: the checkpoint copies up
/// to it, and the log cannot start over while a reader uses it (SQLite's rule), so the writer appends after
/// the copied frames instead. Once a checkpoint finds the log at `UNPIN_AT_PAGES` or more, the pin lets go
/// until the log has started over: at 5,000 messages/s (some 20,000 pages a second) the log starts over
/// about once a second instead of nine times. The pin holds a checkpoint back by one [`Checkpoints::GAP`] at
/// most, and other readers not at all.
pub(crate) struct Checkpoints {
    reader: SqlitePool,
    state: std::sync::Arc<std::sync::Mutex<CheckpointState>>,
}

#[derive(Default)]
struct CheckpointState {
    running: bool,
    last: Option<tokio::time::Instant>,
    /// The pin, while no checkpoint uses it; `None` once it failed (the log is then never pinned).
    pin: Option<Pin>,
}

/// The connection that pins the log.
struct Pin {
    connection: SqliteConnection,
    /// Whether the connection is inside its read transaction.
    holding: bool,
    /// The log's size, in pages, at the last checkpoint.
    log_pages: i64,
    /// The log's size, in pages, from which the pin lets go.
    unpin_at: i64,
}

impl Pin {
    fn new(connection: SqliteConnection, unpin_at: u32) -> Self {
        Pin { connection, holding: false, log_pages: 0, unpin_at: i64::from(unpin_at) }
    }

    /// Ends the pin's read transaction, and begins a new one at the log's end unless the log is to start
    /// over.
    async fn renew(&mut self) -> Result<(), sqlx::Error> {
        if self.holding {
            sqlx::query("COMMIT").execute(&mut self.connection).await?;
            self.holding = false;
        }
        if self.log_pages < self.unpin_at {
            sqlx::query("BEGIN").execute(&mut self.connection).await?;
            self.holding = true;
            // The first read takes the transaction's snapshot (`BEGIN` alone takes none).
            sqlx::query("SELECT count(*) FROM sqlite_schema").execute(&mut self.connection).await?;
        }
        Ok(())
    }
}

/// One checkpoint: renews the pin, then copies what the log holds up to it. Returns the log's size and
/// the pages copied. A pin that fails is dropped (with its connection, which ends its transaction).
async fn checkpoint(reader: &SqlitePool, pin: &mut Option<Pin>) -> Result<(i64, i64), sqlx::Error> {
    if let Some(held) = pin.as_mut()
        && let Err(error) = held.renew().await
    {
        // Without the pin the log starts over after each complete checkpoint, as SQLite does by itself.
        tracing::warn!(%error, "the pin of the write-ahead log failed; the log is no longer pinned");
        *pin = None;
    }
    let (_, log_pages, copied): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(reader).await?;
    if let Some(pin) = pin.as_mut() {
        pin.log_pages = log_pages;
    }
    Ok((log_pages, copied))
}

impl Checkpoints {
    /// The least time between the starts of two checkpoints.
    pub(crate) const GAP: std::time::Duration = std::time::Duration::from_millis(100);
    /// The log's size, in pages, at which the writer checkpoints in its own commit (SQLite's default is
    /// 1,000): 96 MiB, well past [`Checkpoints::UNPIN_AT_PAGES`], so that it never runs while the log is
    /// pinned (it would copy in every commit then). Under a steady load it is what starts the log over all
    /// the same: once the pin lets go, a checkpoint beside the writer is complete only if no commit lands
    /// while it copies. At 5,000 messages/s the writer's own checkpoint ran about every 1.2 s, holding the
    /// writer 4-10 ms (mostly the database file's fsync); a log that never started over gained little
    /// (benches/README.md).
    pub(crate) const WRITER_AFTER_PAGES: u32 = 24_000;
    /// The log's size, in pages, from which it is no longer pinned (48 MiB).
    pub(crate) const UNPIN_AT_PAGES: u32 = 12_000;

    /// Checkpoints through `reader`, the log pinned by `pin`: a connection to the same database, used for
    /// nothing else.
    pub(crate) fn new(reader: SqlitePool, pin: SqliteConnection) -> Self {
        let state = CheckpointState { pin: Some(Pin::new(pin, Self::UNPIN_AT_PAGES)), ..Default::default() };
        Checkpoints { reader, state: std::sync::Arc::new(std::sync::Mutex::new(state)) }
    }

    /// Called after each commit of the append writer, on a thread that entered the tokio runtime.
    pub(crate) fn after_commit(&self) {
        let now = tokio::time::Instant::now();
        let mut pin = {
            let Ok(mut state) = self.state.lock() else { return };
            if state.running || state.last.is_some_and(|last| now.duration_since(last) < Self::GAP) {
                return;
            }
            state.running = true;
            state.last = Some(now);
            state.pin.take()
        };
        let (reader, state) = (self.reader.clone(), self.state.clone());
        tokio::spawn(async move {
            match checkpoint(&reader, &mut pin).await {
                Ok((log_pages, copied)) => tracing::trace!(log_pages, copied, "checkpoint"),
                Err(sqlx::Error::PoolClosed) => {}
                Err(error) => tracing::warn!(%error, "a checkpoint of the write-ahead log failed"),
            }
            if let Ok(mut state) = state.lock() {
                state.running = false;
                state.pin = pin;
            }
        });
    }
}

pub(crate) async fn read(store: &SqlStore, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
    let after_seq = to_i64(request.after_seq, "after_seq")?;
    let rows = if request.dedupe_key.is_empty() {
        sqlx::query_as(SELECT_EVENTS)
            .bind(&request.conversation_id)
            .bind(after_seq)
            .bind(read_limit(request.limit))
            .fetch(&store.reader)
    } else {
        sqlx::query_as(SELECT_EVENT_BY_KEY)
            .bind(&request.conversation_id)
            .bind(after_seq)
            .bind(&request.dedupe_key)
            .fetch(&store.reader)
    };
    let events = page(rows, request.max_bytes).await?;
    Ok(ReadEventsResponse { events })
}

/// A read's `LIMIT`: the request's, or none (`0`).
pub(crate) fn read_limit(limit: u32) -> i64 {
    if limit == 0 { i64::MAX } else { i64::from(limit) }
}

/// The events of a read's rows, in their order, as many as its page holds ([`Page`]). The rows after the
/// page are not read.
pub(crate) async fn page(
    mut rows: BoxStream<'_, Result<EventRow, sqlx::Error>>,
    max_bytes: u64,
) -> Result<Vec<EventRecord>, StoreError> {
    let mut page = Page::new(max_bytes);
    while let Some(row) = rows.try_next().await.map_err(db)? {
        if !page.add(event_from_row(row)?) {
            break;
        }
    }
    Ok(page.into_events())
}

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    use super::*;

    /// The log's size after each of `commits` one-row commits, each followed by a checkpoint, on a new
    /// database whose log is pinned up to `unpin_at` pages, or never with `None`.
    async fn log_sizes(unpin_at: Option<u32>, commits: usize) -> Vec<i64> {
        let directory = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(directory.path().join("pin.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Only the checkpoints under test copy the log.
            .pragma("wal_autocheckpoint", "0");
        let mut writer = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER)").execute(&mut writer).await.unwrap();
        let reader = SqlitePoolOptions::new().max_connections(1).connect_with(options.clone()).await.unwrap();
        let mut pin = match unpin_at {
            Some(unpin_at) => Some(Pin::new(SqliteConnection::connect_with(&options).await.unwrap(), unpin_at)),
            None => None,
        };
        let mut sizes = Vec::new();
        for x in 0..commits {
            sqlx::query("INSERT INTO t (x) VALUES ($1)").bind(x as i64).execute(&mut writer).await.unwrap();
            let (log_pages, copied) = checkpoint(&reader, &mut pin).await.unwrap();
            assert_eq!(copied, log_pages, "the checkpoint copies the whole log, up to the pin at its end");
            sizes.push(log_pages);
        }
        assert!(unpin_at.is_none() || pin.is_some(), "the pin did not fail");
        sizes
    }

    #[tokio::test]
    async fn without_a_pin_each_commit_after_a_complete_checkpoint_starts_the_log_over() {
        let sizes = log_sizes(None, 12).await;
        // The first commit after the table's creation already found the log copied.
        assert!(sizes[1..].iter().all(|&size| size == sizes[1]), "{sizes:?}");
    }

    #[tokio::test]
    async fn a_pinned_log_grows_until_it_reaches_the_bound_then_starts_over() {
        let sizes = log_sizes(Some(10), 30).await;
        let restarts: Vec<usize> = (1..sizes.len()).filter(|&i| sizes[i] < sizes[i - 1]).collect();
        // Two in 30 commits, where the log without a pin starts over at each.
        assert_eq!(restarts.len(), 2, "{sizes:?}");
        assert!(restarts.iter().all(|&i| sizes[i - 1] >= 10), "only once it reached the bound: {sizes:?}");
        assert!(
            (1..sizes.len()).all(|i| restarts.contains(&i) || sizes[i] >= sizes[i - 1]),
            "between restarts the log only grows: {sizes:?}"
        );
    }
}
