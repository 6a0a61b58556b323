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
    AppendBackend, AppendTx, BatchFailure, Checked, Conversation, NewEventRow, Outcome, SummaryRow, run_batch,
};
use crate::dialect::{SELECT_CONVERSATION_FOR_APPEND, SELECT_FENCE_EPOCH};
use crate::error::{db, to_i64};
use crate::license::{self, DELETE_PERMIT, INSERT_PERMIT, LicenseChanges, SELECT_LICENSE, SET_LICENSE_USED};
use crate::records::{EventRow, agents_to_json, event_from_row};

pub(crate) const INSERT_CONVERSATION: &str = "INSERT INTO conversations (id, tenant_id, group_id, customer_name, \
     first_question, state, owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, \
     last_seq, shard, customer_token, offer_agent_id, offer_expires_at_ms, offered_to) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12, $13, $14, $15, $16) \
     ON CONFLICT (id) DO NOTHING";

const SELECT_BY_CLIENT_MSG_ID: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json FROM events WHERE conversation_id = $1 AND client_msg_id = $2";

const INSERT_EVENT: &str = "INSERT INTO events (conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json, epoch) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// NULL state, group, queue time keep the stored values; so do owner, times and offer unless `$3` (whether
/// the batch had a summary update).
const UPDATE_SUMMARY: &str = "UPDATE conversations SET last_seq = $1, state = COALESCE($2, state), \
     owner_agent_id = CASE WHEN $3 THEN $4 ELSE owner_agent_id END, \
     accepted_at_ms = CASE WHEN $3 THEN $5 ELSE accepted_at_ms END, \
     closed_at_ms = CASE WHEN $3 THEN $6 ELSE closed_at_ms END, \
     group_id = COALESCE($8, group_id), queued_at_ms = COALESCE($9, queued_at_ms), \
     offer_agent_id = CASE WHEN $3 THEN $10 ELSE offer_agent_id END, \
     offer_expires_at_ms = CASE WHEN $3 THEN $11 ELSE offer_expires_at_ms END, \
     offered_to = CASE WHEN $3 THEN $12 ELSE offered_to END WHERE id = $7";

pub(crate) const SELECT_EVENTS: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, client_msg_id, \
     kind, payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq";

pub(crate) const SELECT_EVENTS_LIMITED: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

pub(crate) const SELECT_EVENT_EPOCHS: &str = "SELECT seq, epoch FROM events WHERE conversation_id = $1 ORDER BY seq";

/// The append batches of a [`SqlStore`], on its writer connection.
pub(crate) struct SqliteAppender {
    pub writer: SqlitePool,
}

#[async_trait]
impl AppendBackend for SqliteAppender {
    async fn write(&self, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure> {
        let mut transaction = self.writer.begin().await.map_err(|error| BatchFailure::Batch(db(error)))?;
        let outcomes = run_batch(&mut transaction, batch).await?;
        transaction.commit().await.map_err(|error| BatchFailure::Batch(db(error)))?;
        Ok(outcomes)
    }
}

#[async_trait]
impl AppendTx for Transaction<'static, Sqlite> {
    async fn fence_epochs(&mut self, shards: &[i32]) -> Result<HashMap<i32, i64>, sqlx::Error> {
        let mut epochs = HashMap::with_capacity(shards.len());
        for &shard in shards {
            let epoch: Option<i64> =
                sqlx::query_scalar(SELECT_FENCE_EPOCH).bind(shard).fetch_optional(&mut **self).await?;
            if let Some(epoch) = epoch {
                epochs.insert(shard, epoch);
            }
        }
        Ok(epochs)
    }

    async fn conversations(&mut self, ids: &[&str]) -> Result<HashMap<String, Conversation>, sqlx::Error> {
        let mut found = HashMap::with_capacity(ids.len());
        for &id in ids {
            let row: Option<(i64, i32)> =
                sqlx::query_as(SELECT_CONVERSATION_FOR_APPEND).bind(id).fetch_optional(&mut **self).await?;
            if let Some((last_seq, shard)) = row {
                found.insert(id.to_owned(), Conversation { last_seq, shard });
            }
        }
        Ok(found)
    }

    async fn stored_events(&mut self, keys: &[(&str, &str)]) -> Result<Vec<EventRow>, sqlx::Error> {
        let mut found = Vec::new();
        for &(id, client_msg_id) in keys {
            let row: Option<EventRow> = sqlx::query_as(SELECT_BY_CLIENT_MSG_ID)
                .bind(id)
                .bind(client_msg_id)
                .fetch_optional(&mut **self)
                .await?;
            found.extend(row);
        }
        Ok(found)
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
        for event in events {
            sqlx::query(INSERT_EVENT)
                .bind(&event.conversation_id)
                .bind(event.seq)
                .bind(event.at_ms)
                .bind(&event.author_role)
                .bind(&event.author_id)
                .bind(event.client_msg_id.as_deref())
                .bind(&event.kind)
                .bind(&event.payload_json)
                .bind(event.epoch)
                .execute(&mut **self)
                .await?;
        }
        Ok(())
    }

    async fn update_summaries(&mut self, summaries: &[SummaryRow]) -> Result<(), sqlx::Error> {
        for summary in summaries {
            let fields = summary.fields.clone().unwrap_or_default();
            sqlx::query(UPDATE_SUMMARY)
                .bind(summary.last_seq)
                .bind(summary.state.as_deref())
                .bind(summary.fields.is_some())
                .bind(fields.owner_agent_id)
                .bind(fields.accepted_at_ms)
                .bind(fields.closed_at_ms)
                .bind(&summary.conversation_id)
                .bind(summary.group_id.as_deref())
                .bind(summary.queued_at_ms)
                .bind(fields.offer_agent_id)
                .bind(fields.offer_expires_at_ms)
                .bind(fields.offered_to)
                .execute(&mut **self)
                .await?;
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
        for permit in &changes.acquired {
            sqlx::query(INSERT_PERMIT)
                .bind(&permit.conversation_id)
                .bind(&permit.tenant_id)
                .bind(permit.acquired_at_ms)
                .execute(&mut **self)
                .await?;
        }
        for id in &changes.released {
            sqlx::query(DELETE_PERMIT).bind(id).execute(&mut **self).await?;
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
