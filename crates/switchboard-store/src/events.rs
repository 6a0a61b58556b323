//! The event log on SQLite: reads, and the checkpoints of the write-ahead log that the append writer
//! (`writer`) starts after its commits.

use sqlx::SqlitePool;
use switchboard_proto::internal::v1::{ReadEventsRequest, ReadEventsResponse};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::{db, to_i64};
use crate::records::{EventRow, event_from_row};

pub(crate) const INSERT_CONVERSATION: &str = "INSERT INTO conversations (id, tenant_id, group_id, customer_name, \
     first_question, state, owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, \
     last_seq, shard, customer_token, offer_agent_id, offer_expires_at_ms, offered_to) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12, $13, $14, $15, $16) \
     ON CONFLICT (id) DO NOTHING";

pub(crate) const SELECT_EVENTS: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, client_msg_id, \
     kind, payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq";

pub(crate) const SELECT_EVENTS_LIMITED: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

pub(crate) const SELECT_EVENT_EPOCHS: &str = "SELECT seq, epoch FROM events WHERE conversation_id = $1 ORDER BY seq";

/// Checkpoints of the write-ahead log, off the write path. SQLite checkpoints inside the commit that grows
/// the log past `wal_autocheckpoint` pages: that commit, and every append waiting behind it, then waits for
/// the log to be copied into the database file and for its fsync. At 7,000 appends/s a batch writes some
/// 40 pages, so with SQLite's default of 1,000 pages the writer checkpointed every few batches, and a
/// batch's write-and-commit took 1.6 ms instead of 0.9. So after a commit a `PASSIVE` checkpoint runs on a
/// read connection, at most one at a time and at most one per [`Checkpoints::GAP`]: it copies what it can
/// without waiting for the writer, on another thread. The writer keeps its own automatic checkpoint, at
/// [`Checkpoints::WRITER_AFTER_PAGES`], which then finds little left to copy, and which restarts the log
/// from its beginning once all of it is copied (a checkpoint beside a busy writer never catches up with it
/// exactly, so without the writer's the log would grow without end).
///
/// A checkpoint copies each page once however often the log rewrote it since the last one, and an append
/// rewrites the same few pages of its conversation (the last page of its events, of its index by client
/// message id, its row): checkpoints every 100 ms instead of every 25 copied a tenth fewer bytes and took a
/// tenth of `serve`'s CPU less at 5,000 messages/s, with the same latency.
pub(crate) struct Checkpoints {
    reader: SqlitePool,
    state: std::sync::Arc<std::sync::Mutex<CheckpointState>>,
}

#[derive(Default)]
struct CheckpointState {
    running: bool,
    last: Option<tokio::time::Instant>,
}

impl Checkpoints {
    /// The least time between the starts of two checkpoints.
    pub(crate) const GAP: std::time::Duration = std::time::Duration::from_millis(100);
    /// The log's size, in pages, at which the writer checkpoints in its own commit (SQLite's default is
    /// 1,000).
    pub(crate) const WRITER_AFTER_PAGES: u32 = 8_000;

    pub(crate) fn new(reader: SqlitePool) -> Self {
        Checkpoints { reader, state: Default::default() }
    }

    /// Called after each commit of the append writer, on a thread that entered the tokio runtime.
    pub(crate) fn after_commit(&self) {
        let now = tokio::time::Instant::now();
        {
            let Ok(mut state) = self.state.lock() else { return };
            if state.running || state.last.is_some_and(|last| now.duration_since(last) < Self::GAP) {
                return;
            }
            state.running = true;
            state.last = Some(now);
        }
        let (reader, state) = (self.reader.clone(), self.state.clone());
        tokio::spawn(async move {
            let result: Result<(i64, i64, i64), sqlx::Error> =
                sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&reader).await;
            match result {
                Ok((_, log_pages, copied)) => tracing::trace!(log_pages, copied, "checkpoint"),
                Err(sqlx::Error::PoolClosed) => {}
                Err(error) => tracing::warn!(%error, "a checkpoint of the write-ahead log failed"),
            }
            if let Ok(mut state) = state.lock() {
                state.running = false;
            }
        });
    }
}

pub(crate) async fn read(store: &SqlStore, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
    let after_seq = to_i64(request.after_seq, "after_seq")?;
    let query = if request.limit == 0 {
        sqlx::query_as(SELECT_EVENTS).bind(&request.conversation_id).bind(after_seq)
    } else {
        sqlx::query_as(SELECT_EVENTS_LIMITED)
            .bind(&request.conversation_id)
            .bind(after_seq)
            .bind(i64::from(request.limit))
    };
    let rows: Vec<EventRow> = query.fetch_all(&store.reader).await.map_err(db)?;
    let events = rows.into_iter().map(event_from_row).collect::<Result<_, _>>()?;
    Ok(ReadEventsResponse { events })
}
