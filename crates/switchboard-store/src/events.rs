//! The event log: fenced, gap-free, deduplicated appends, and reads.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use switchboard_proto::internal::v1::{
    AppendRequest, AppendResponse, ConversationRecord, EventRecord, ReadEventsRequest, ReadEventsResponse,
};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::dialect::{SELECT_CONVERSATION_FOR_APPEND, SELECT_FENCE_EPOCH};
use crate::error::{db, shard_to_i32, to_i64, to_u64};

const INSERT_CONVERSATION: &str = "INSERT INTO conversations (id, tenant_id, group_id, customer_name, \
     first_question, state, owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, \
     last_seq, shard, customer_token) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12, $13) \
     ON CONFLICT (id) DO NOTHING";

const SELECT_BY_CLIENT_MSG_ID: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json FROM events WHERE conversation_id = $1 AND client_msg_id = $2";

const INSERT_EVENT: &str = "INSERT INTO events (conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

const SET_LAST_SEQ: &str = "UPDATE conversations SET last_seq = $1 WHERE id = $2";

/// An empty state leaves the state as it is.
const SET_LAST_SEQ_AND_SUMMARY: &str = "UPDATE conversations SET last_seq = $1, \
     state = CASE WHEN $2 = '' THEN state ELSE $2 END, \
     owner_agent_id = $3, accepted_at_ms = $4, closed_at_ms = $5 WHERE id = $6";

const SELECT_EVENTS: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, client_msg_id, kind, \
     payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq";

const SELECT_EVENTS_LIMITED: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, client_msg_id, \
     kind, payload_json FROM events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

pub(crate) async fn append(store: &SqlStore, request: AppendRequest) -> Result<AppendResponse, StoreError> {
    let fence = request.fence.ok_or_else(|| StoreError::Invalid("append without a fence".into()))?;
    let shard = shard_to_i32(fence.shard)?;
    let epoch = to_i64(fence.epoch, "epoch")?;
    let id = request.conversation_id.as_str();
    if id.is_empty() {
        return Err(StoreError::Invalid("append without a conversation id".into()));
    }

    let mut transaction = store.writer.begin().await.map_err(db)?;
    let current: Option<i64> =
        sqlx::query_scalar(SELECT_FENCE_EPOCH).bind(shard).fetch_optional(&mut *transaction).await.map_err(db)?;
    if current != Some(epoch) {
        return Err(StoreError::StaleEpoch { shard: fence.shard });
    }
    if let Some(create) = &request.create {
        insert_conversation(&mut transaction, id, create).await?;
    }
    let (last_seq, stored_shard): (i64, i32) = sqlx::query_as(SELECT_CONVERSATION_FOR_APPEND)
        .bind(id)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    if stored_shard != shard {
        return Err(StoreError::Invalid(format!(
            "conversation {id} is on shard {stored_shard}, the fence is for shard {shard}"
        )));
    }

    let duplicates = stored_duplicates(&mut transaction, &request).await?;
    if !duplicates.is_empty() {
        // Nothing was written: dropping the transaction rolls it back.
        return Ok(AppendResponse { events: duplicates, duplicate: true, last_seq: to_u64(last_seq, "last_seq")? });
    }

    let mut stored = Vec::with_capacity(request.events.len());
    let mut seq = last_seq;
    for event in &request.events {
        seq += 1;
        let client_msg_id = (!event.client_msg_id.is_empty()).then_some(event.client_msg_id.as_str());
        sqlx::query(INSERT_EVENT)
            .bind(id)
            .bind(seq)
            .bind(event.at_ms)
            .bind(&event.author_role)
            .bind(&event.author_id)
            .bind(client_msg_id)
            .bind(&event.kind)
            .bind(&event.payload_json)
            .execute(&mut *transaction)
            .await
            .map_err(db)?;
        stored.push(stored_record(id, to_u64(seq, "seq")?, event));
    }
    match &request.update {
        Some(update) => {
            sqlx::query(SET_LAST_SEQ_AND_SUMMARY)
                .bind(seq)
                .bind(&update.state)
                .bind(&update.owner_agent_id)
                .bind(update.accepted_at_ms)
                .bind(update.closed_at_ms)
                .bind(id)
                .execute(&mut *transaction)
                .await
                .map_err(db)?;
        }
        None if seq != last_seq => {
            sqlx::query(SET_LAST_SEQ).bind(seq).bind(id).execute(&mut *transaction).await.map_err(db)?;
        }
        None => {}
    }
    transaction.commit().await.map_err(db)?;
    Ok(AppendResponse { events: stored, duplicate: false, last_seq: to_u64(seq, "last_seq")? })
}

/// Creates the conversation, or leaves it as it is when it exists already (a retried first append).
async fn insert_conversation(
    connection: &mut SqliteConnection,
    id: &str,
    create: &ConversationRecord,
) -> Result<(), StoreError> {
    if !create.id.is_empty() && create.id != id {
        return Err(StoreError::Invalid(format!("create record {} for conversation {id}", create.id)));
    }
    sqlx::query(INSERT_CONVERSATION)
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
        .bind(shard_to_i32(create.shard)?)
        .bind(&create.customer_token)
        .execute(connection)
        .await
        .map_err(db)?;
    Ok(())
}

/// The events already stored under any of the request's client message ids, in seq order.
async fn stored_duplicates(
    connection: &mut SqliteConnection,
    request: &AppendRequest,
) -> Result<Vec<EventRecord>, StoreError> {
    let mut found = Vec::new();
    for event in request.events.iter().filter(|event| !event.client_msg_id.is_empty()) {
        let row = sqlx::query(SELECT_BY_CLIENT_MSG_ID)
            .bind(&request.conversation_id)
            .bind(&event.client_msg_id)
            .fetch_optional(&mut *connection)
            .await
            .map_err(db)?;
        if let Some(row) = row {
            found.push(event_from_row(&row)?);
        }
    }
    found.sort_unstable_by_key(|event| event.seq);
    found.dedup_by_key(|event| event.seq);
    Ok(found)
}

pub(crate) async fn read(store: &SqlStore, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
    let after_seq = to_i64(request.after_seq, "after_seq")?;
    let query = if request.limit == 0 {
        sqlx::query(SELECT_EVENTS).bind(&request.conversation_id).bind(after_seq)
    } else {
        sqlx::query(SELECT_EVENTS_LIMITED).bind(&request.conversation_id).bind(after_seq).bind(i64::from(request.limit))
    };
    let rows = query.fetch_all(&store.reader).await.map_err(db)?;
    let events = rows.iter().map(event_from_row).collect::<Result<_, _>>()?;
    Ok(ReadEventsResponse { events })
}

fn event_from_row(row: &SqliteRow) -> Result<EventRecord, StoreError> {
    let client_msg_id: Option<String> = row.try_get("client_msg_id").map_err(db)?;
    Ok(EventRecord {
        conversation_id: row.try_get("conversation_id").map_err(db)?,
        seq: to_u64(row.try_get("seq").map_err(db)?, "seq")?,
        at_ms: row.try_get("at_ms").map_err(db)?,
        author_role: row.try_get("author_role").map_err(db)?,
        author_id: row.try_get("author_id").map_err(db)?,
        client_msg_id: client_msg_id.unwrap_or_default(),
        kind: row.try_get("kind").map_err(db)?,
        payload_json: row.try_get("payload_json").map_err(db)?,
    })
}

/// The record of a new event once the store gave it its seq.
pub(crate) fn stored_record(
    conversation_id: &str,
    seq: u64,
    event: &switchboard_proto::internal::v1::NewEvent,
) -> EventRecord {
    EventRecord {
        conversation_id: conversation_id.to_owned(),
        seq,
        at_ms: event.at_ms,
        author_role: event.author_role.clone(),
        author_id: event.author_id.clone(),
        client_msg_id: event.client_msg_id.clone(),
        kind: event.kind.clone(),
        payload_json: event.payload_json.clone(),
    }
}
