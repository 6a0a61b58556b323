//! The event log on SQLite: the statements of a group-committed append batch (the logic is shared, in
//! `batch`), and reads.
//!
//! SQLite serializes every write transaction on the store's single writer connection, so the "locks" of
//! [`AppendTx`] are plain reads here: nothing else can write between them.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use sqlx::{Sqlite, SqlitePool, Transaction};
use switchboard_proto::internal::v1::{ConversationRecord, ReadEventsRequest, ReadEventsResponse};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::batch::{
    AppendBackend, AppendTx, BatchFailure, Checked, Conversation, NewEventRow, Outcome, SummaryFields, SummaryRow,
    run_batch,
};
use crate::dialect::json_list;
use crate::error::{db, to_i64};
use crate::license::{self, DELETE_PERMITS, INSERT_PERMITS, LicenseChanges, SELECT_LICENSE, SET_LICENSE_USED};
use crate::records::{EventRow, agents_to_json, event_from_row};

pub(crate) const INSERT_CONVERSATION: &str = "INSERT INTO conversations (id, tenant_id, group_id, customer_name, \
     first_question, state, owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, \
     last_seq, shard, customer_token, offer_agent_id, offer_expires_at_ms, offered_to) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12, $13, $14, $15, $16) \
     ON CONFLICT (id) DO NOTHING";

// The statements of an append batch take their lists as one JSON array (`json_each`), so that they are
// static and prepared once, and a batch costs a handful of statements whatever its size: each statement is
// a round trip to SQLite's worker thread.

const SELECT_FENCE_EPOCHS: &str =
    "SELECT shard, epoch FROM shard_leases WHERE shard IN (SELECT value FROM json_each($1))";

const SELECT_CONVERSATIONS_FOR_APPEND: &str =
    "SELECT id, last_seq, shard FROM conversations WHERE id IN (SELECT value FROM json_each($1))";

/// `$1`: `[[conversation_id, client_msg_id], ...]`. `CROSS JOIN` keeps the list outside, so that each key
/// is one lookup in `events_by_client_msg_id`.
const SELECT_BY_CLIENT_MSG_IDS: &str = "SELECT e.conversation_id, e.seq, e.at_ms, e.author_role, e.author_id, \
     e.client_msg_id, e.kind, e.payload_json \
     FROM json_each($1) AS wanted CROSS JOIN events AS e \
     ON e.conversation_id = wanted.value ->> 0 AND e.client_msg_id = wanted.value ->> 1";

/// `$1`: one array per event, in column order (a JSON `null` client message id is SQL `NULL`).
const INSERT_EVENTS: &str = "INSERT INTO events (conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json, epoch) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, \
     value ->> 7, value ->> 8 FROM json_each($1)";

/// `$1`: `[[id, last_seq], ...]`: the summaries of a batch that only grew the log (messages, delivery
/// marks), so that the indexes on state, owner and offer are left alone.
const UPDATE_LAST_SEQS: &str = "UPDATE conversations SET last_seq = u.value ->> 1 \
     FROM json_each($1) AS u WHERE conversations.id = u.value ->> 0";

/// `$1`: `[[id, last_seq, state, owner, accepted_at_ms, closed_at_ms, group, queued_at_ms, offer_agent,
/// offer_expires_at_ms, offered_to], ...]`, every summary with an update. A `null` state, group or queue
/// time keeps the stored one.
const UPDATE_SUMMARIES: &str = "UPDATE conversations SET last_seq = u.value ->> 1, \
     state = COALESCE(u.value ->> 2, state), \
     owner_agent_id = u.value ->> 3, accepted_at_ms = u.value ->> 4, closed_at_ms = u.value ->> 5, \
     group_id = COALESCE(u.value ->> 6, group_id), queued_at_ms = COALESCE(u.value ->> 7, queued_at_ms), \
     offer_agent_id = u.value ->> 8, offer_expires_at_ms = u.value ->> 9, offered_to = u.value ->> 10 \
     FROM json_each($1) AS u WHERE conversations.id = u.value ->> 0";

pub(crate) const SELECT_EVENTS: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, client_msg_id, \
     kind, payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq";

pub(crate) const SELECT_EVENTS_LIMITED: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

pub(crate) const SELECT_EVENT_EPOCHS: &str = "SELECT seq, epoch FROM events WHERE conversation_id = $1 ORDER BY seq";

/// The append batches of a [`SqlStore`], on its writer connection.
pub(crate) struct SqliteAppender {
    pub writer: SqlitePool,
    /// Checkpoints of the write-ahead log, when the file has one.
    pub checkpoints: Option<Checkpoints>,
}

#[async_trait]
impl AppendBackend for SqliteAppender {
    async fn write(&self, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure> {
        let mut transaction = self.writer.begin().await.map_err(|error| BatchFailure::Batch(db(error)))?;
        let outcomes = run_batch(&mut transaction, batch).await?;
        transaction.commit().await.map_err(|error| BatchFailure::Batch(db(error)))?;
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.after_commit();
        }
        Ok(outcomes)
    }
}

/// Checkpoints of the write-ahead log, mostly off the write path. SQLite checkpoints inside the commit
/// that grows the log past 1,000 pages: that commit, and every append waiting behind it, then waits for
/// the log to be copied into the database file and for its fsync (10 to 25 ms here, against 1 to 2 ms for
/// a batch). So after a commit a `PASSIVE` checkpoint runs on a read connection, at most one at a time and
/// at most one per [`Checkpoints::GAP`]: it copies what it can without waiting for the writer. The writer
/// keeps its own automatic checkpoint, which then finds little left to copy, and which restarts the log
/// from its beginning once all of it is copied (a checkpoint beside a busy writer never catches up with
/// it exactly, so without the writer's the log would grow without end).
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
    pub(crate) const GAP: std::time::Duration = std::time::Duration::from_millis(500);

    pub(crate) fn new(reader: SqlitePool) -> Self {
        Checkpoints { reader, state: Default::default() }
    }

    fn after_commit(&self) {
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

#[async_trait]
impl AppendTx for Transaction<'static, Sqlite> {
    async fn fence_epochs(&mut self, shards: &[i32]) -> Result<HashMap<i32, i64>, sqlx::Error> {
        let rows: Vec<(i32, i64)> =
            sqlx::query_as(SELECT_FENCE_EPOCHS).bind(json_list(shards)?).fetch_all(&mut **self).await?;
        Ok(rows.into_iter().collect())
    }

    async fn conversations(&mut self, ids: &[&str]) -> Result<HashMap<String, Conversation>, sqlx::Error> {
        let rows: Vec<(String, i64, i32)> =
            sqlx::query_as(SELECT_CONVERSATIONS_FOR_APPEND).bind(json_list(ids)?).fetch_all(&mut **self).await?;
        Ok(rows.into_iter().map(|(id, last_seq, shard)| (id, Conversation { last_seq, shard })).collect())
    }

    async fn stored_events(&mut self, keys: &[(&str, &str)]) -> Result<Vec<EventRow>, sqlx::Error> {
        sqlx::query_as(SELECT_BY_CLIENT_MSG_IDS).bind(json_list(keys)?).fetch_all(&mut **self).await
    }

    async fn insert_conversation(&mut self, id: &str, create: &ConversationRecord) -> Result<bool, sqlx::Error> {
        let inserted = sqlx::query(INSERT_CONVERSATION)
            .bind(id)
            .bind(&create.tenant_id)
            .bind(&create.group_id)
            .bind(&create.customer_name)
            .bind(&create.first_question)
            .bind(&create.state)
            .bind(&create.owner_agent_id)
            .bind(create.created_at_ms)
            .bind(create.queued_at_ms)
            .bind(create.accepted_at_ms)
            .bind(create.closed_at_ms)
            .bind(i64::from(create.shard))
            .bind(&create.customer_token)
            .bind(&create.offer_agent_id)
            .bind(create.offer_expires_at_ms)
            .bind(agents_to_json(&create.offered_to))
            .execute(&mut **self)
            .await?
            .rows_affected();
        Ok(inserted == 1)
    }

    async fn insert_events(&mut self, events: &[NewEventRow]) -> Result<(), sqlx::Error> {
        let rows: Vec<_> = events
            .iter()
            .map(|event| {
                (
                    &event.conversation_id,
                    event.seq,
                    event.at_ms,
                    &event.author_role,
                    &event.author_id,
                    event.client_msg_id.as_deref(),
                    &event.kind,
                    &event.payload_json,
                    event.epoch,
                )
            })
            .collect();
        sqlx::query(INSERT_EVENTS).bind(json_list(&rows)?).execute(&mut **self).await?;
        Ok(())
    }

    async fn update_summaries(&mut self, summaries: &[SummaryRow]) -> Result<(), sqlx::Error> {
        let (updated, grown): (Vec<&SummaryRow>, Vec<&SummaryRow>) =
            summaries.iter().partition(|summary| summary.fields.is_some());
        if !grown.is_empty() {
            let rows: Vec<_> = grown.iter().map(|summary| (&summary.conversation_id, summary.last_seq)).collect();
            sqlx::query(UPDATE_LAST_SEQS).bind(json_list(&rows)?).execute(&mut **self).await?;
        }
        if !updated.is_empty() {
            let default = SummaryFields::default();
            let rows: Vec<_> = updated
                .iter()
                .map(|summary| {
                    let fields = summary.fields.as_ref().unwrap_or(&default);
                    (
                        &summary.conversation_id,
                        summary.last_seq,
                        summary.state.as_deref(),
                        &fields.owner_agent_id,
                        fields.accepted_at_ms,
                        fields.closed_at_ms,
                        summary.group_id.as_deref(),
                        summary.queued_at_ms,
                        &fields.offer_agent_id,
                        fields.offer_expires_at_ms,
                        &fields.offered_to,
                    )
                })
                .collect();
            sqlx::query(UPDATE_SUMMARIES).bind(json_list(&rows)?).execute(&mut **self).await?;
        }
        Ok(())
    }

    async fn lock_license(&mut self) -> Result<Option<(i64, i64)>, sqlx::Error> {
        // The single writer connection is the lock.
        sqlx::query_as(SELECT_LICENSE).fetch_optional(&mut **self).await
    }

    async fn held_permits(&mut self, ids: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
        license::held_permits(&mut **self, ids).await
    }

    async fn write_license(&mut self, changes: &LicenseChanges) -> Result<bool, sqlx::Error> {
        let set =
            sqlx::query(SET_LICENSE_USED).bind(changes.used).bind(changes.used_before).execute(&mut **self).await?;
        if set.rows_affected() != 1 {
            return Ok(false);
        }
        if !changes.acquired.is_empty() {
            let rows: Vec<_> = changes
                .acquired
                .iter()
                .map(|permit| (&permit.conversation_id, &permit.tenant_id, permit.acquired_at_ms))
                .collect();
            sqlx::query(INSERT_PERMITS).bind(json_list(&rows)?).execute(&mut **self).await?;
        }
        if !changes.released.is_empty() {
            let deleted = sqlx::query(DELETE_PERMITS).bind(json_list(&changes.released)?).execute(&mut **self).await?;
            // The permits were read under the single writer: they are all there.
            return Ok(deleted.rows_affected() == changes.released.len() as u64);
        }
        Ok(true)
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
