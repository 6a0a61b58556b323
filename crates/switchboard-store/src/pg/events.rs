//! The event log on PostgreSQL: the statements of a group-committed append batch (the logic is shared, in
//! `batch`), and reads.
//!
//! A batch locks the lease rows of its fences `FOR SHARE` (in shard order; an acquire that would bump an
//! epoch waits for the batch to commit, so every event is written under the then-current epoch), then the
//! license row `FOR UPDATE` when it may create or finish a conversation (admissions of every store process
//! take turns: see `license`), then its conversations `FOR UPDATE` (in id order; two store processes
//! appending to one conversation take turns, so seqs stay gap-free and deduplication sees every earlier
//! write). Rows go in with one statement per table for the whole batch (`unnest` of arrays).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgPool, Postgres, Transaction};
use switchboard_proto::internal::v1::{ConversationRecord, ReadEventsRequest, ReadEventsResponse};
use switchboard_proto::store::StoreError;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::PgStore;
use crate::batch::{
    AppendBackend, AppendTx, BatchFailure, BatchReads, Checked, Conversation, NewEventRow, Outcome, SummaryFields,
    SummaryRow, client_msg_ids, needs_license, run_batch,
};
use crate::error::{db, to_i64};
use crate::events::{INSERT_CONVERSATION, SELECT_EVENT_BY_KEY, SELECT_EVENTS, page, read_limit};
use crate::license::{LicenseChanges, SET_LICENSE_USED};
use crate::records::{EventRow, agents_to_json};

const LOCK_FENCES: &str = "SELECT shard, epoch FROM shard_leases WHERE shard = ANY($1) ORDER BY shard FOR SHARE";

const LOCK_CONVERSATIONS: &str =
    "SELECT id, last_seq, shard FROM conversations WHERE id = ANY($1) ORDER BY id FOR UPDATE";

const SELECT_BY_CLIENT_MSG_IDS: &str = "SELECT e.conversation_id, e.seq, e.at_ms, e.author_role, e.author_id, \
     e.client_msg_id, e.kind, e.payload_json \
     FROM events AS e JOIN unnest($1::text[], $2::text[]) AS wanted (conversation_id, client_msg_id) \
     ON e.conversation_id = wanted.conversation_id AND e.client_msg_id = wanted.client_msg_id";

const INSERT_EVENTS: &str = "INSERT INTO events (conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json, epoch) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], \
     $8::text[], $9::int8[])";

const UPDATE_SUMMARIES: &str = "UPDATE conversations AS c SET last_seq = u.last_seq, \
     state = COALESCE(u.state, c.state), \
     group_id = COALESCE(u.group_id, c.group_id), \
     queued_at_ms = COALESCE(u.queued_at_ms, c.queued_at_ms), \
     owner_agent_id = CASE WHEN u.has_update THEN u.owner_agent_id ELSE c.owner_agent_id END, \
     accepted_at_ms = CASE WHEN u.has_update THEN u.accepted_at_ms ELSE c.accepted_at_ms END, \
     closed_at_ms = CASE WHEN u.has_update THEN u.closed_at_ms ELSE c.closed_at_ms END, \
     offer_agent_id = CASE WHEN u.has_update THEN u.offer_agent_id ELSE c.offer_agent_id END, \
     offer_expires_at_ms = CASE WHEN u.has_update THEN u.offer_expires_at_ms ELSE c.offer_expires_at_ms END, \
     offered_to = CASE WHEN u.has_update THEN u.offered_to ELSE c.offered_to END, \
     customer_delivered_up_to = CASE WHEN u.has_update THEN u.customer_delivered_up_to \
     ELSE c.customer_delivered_up_to END, \
     agent_delivered_up_to = CASE WHEN u.has_update THEN u.agent_delivered_up_to ELSE c.agent_delivered_up_to END, \
     customer_away = COALESCE(u.customer_away, c.customer_away) \
     FROM unnest($1::text[], $2::int8[], $3::text[], $4::bool[], $5::text[], $6::int8[], $7::int8[], \
     $8::text[], $9::int8[], $10::text[], $11::int8[], $12::text[], $13::int8[], $14::int8[], $15::int8[]) \
     AS u (id, last_seq, state, has_update, owner_agent_id, accepted_at_ms, closed_at_ms, group_id, queued_at_ms, \
     offer_agent_id, offer_expires_at_ms, offered_to, customer_delivered_up_to, agent_delivered_up_to, \
     customer_away) \
     WHERE c.id = u.id";

const LOCK_LICENSE: &str = "SELECT max_sessions, used FROM license WHERE id = 1 FOR UPDATE";

const SELECT_PERMITS: &str = "SELECT conversation_id FROM license_permits WHERE conversation_id = ANY($1)";

const INSERT_PERMITS: &str = "INSERT INTO license_permits (conversation_id, tenant_id, acquired_at_ms) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])";

const DELETE_PERMITS: &str = "DELETE FROM license_permits WHERE conversation_id = ANY($1)";

/// A kept connection idle for this long or longer is pinged before its next batch: far shorter than a restart
/// of the server takes (some 200 ms for a small database), so that a batch does not meet a connection the
/// server dropped meanwhile; far longer than the gap between two batches under load, which run back to back.
const PING_AFTER_IDLE: Duration = Duration::from_millis(20);

/// The append batches of a [`PgStore`], on a connection of its pool that the writer keeps from one batch to
/// the next.
///
/// The writer runs one batch at a time, hundreds a second under load. The pool pings a connection as it
/// hands it out and again as it takes it back (a round trip to the server each), so a connection taken and
/// given back for each batch cost two round trips per batch beside the batch's own statements. A kept
/// connection idle for [`PING_AFTER_IDLE`] or longer is pinged before its next batch, and replaced when that
/// fails (the server restarted meanwhile); one whose batch failed goes back to the pool, which tests it and
/// drops it if it is broken.
pub(super) struct PgAppender {
    pool: PgPool,
    kept: Mutex<Option<Kept>>,
}

struct Kept {
    connection: PoolConnection<Postgres>,
    used: Instant,
}

impl PgAppender {
    pub(super) fn new(pool: PgPool) -> Self {
        PgAppender { pool, kept: Mutex::new(None) }
    }

    /// The kept connection if it is (still) usable, else one from the pool.
    async fn connection(&self, kept: Option<Kept>) -> Result<PoolConnection<Postgres>, BatchFailure> {
        if let Some(Kept { mut connection, used }) = kept {
            if used.elapsed() < PING_AFTER_IDLE || connection.ping().await.is_ok() {
                return Ok(connection);
            }
            connection.close_on_drop();
        }
        self.pool.acquire().await.map_err(|error| BatchFailure::Batch(db(error)))
    }
}

#[async_trait]
impl AppendBackend for PgAppender {
    async fn write(&self, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure> {
        // Uncontended: the writer runs one batch at a time.
        let mut kept = self.kept.lock().await;
        let mut connection = self.connection(kept.take()).await?;
        let mut transaction = connection.begin().await.map_err(|error| BatchFailure::Batch(db(error)))?;
        let outcomes = run_batch(&mut transaction, batch).await?;
        transaction.commit().await.map_err(|error| BatchFailure::Batch(db(error)))?;
        *kept = Some(Kept { connection, used: Instant::now() });
        Ok(outcomes)
    }
}

#[async_trait]
impl AppendTx for Transaction<'_, Postgres> {
    /// One statement at a time, each locking its rows, in the lock order of every batch: the fences, then
    /// the license row when an append under a current fence may create or finish a conversation (so that
    /// every insert of a conversation happens under it: admissions are serialized across store processes,
    /// see `license`), then the conversations of the appends under a current fence, then their stored
    /// client message ids.
    async fn read_batch(&mut self, batch: &[Checked]) -> Result<BatchReads, BatchFailure> {
        let shards: Vec<i32> = batch.iter().map(|checked| checked.shard).collect::<BTreeSet<_>>().into_iter().collect();
        let rows: Vec<(i32, i64)> = sqlx::query_as(LOCK_FENCES).bind(&shards).fetch_all(&mut **self).await?;
        let epochs: HashMap<i32, i64> = rows.into_iter().collect();
        let current = |checked: &&Checked| epochs.get(&checked.shard) == Some(&checked.epoch);
        let license_row = if batch.iter().filter(current).any(|checked| needs_license(&checked.request)) {
            Some(sqlx::query_as(LOCK_LICENSE).fetch_optional(&mut **self).await?)
        } else {
            None
        };
        let ids: Vec<&str> = batch
            .iter()
            .filter(current)
            .map(|checked| checked.request.conversation_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let conversations = self.conversations(&ids).await?;
        let keys: Vec<(&str, &str)> = batch
            .iter()
            .filter(current)
            .filter(|checked| conversations.contains_key(&checked.request.conversation_id))
            .flat_map(|checked| {
                client_msg_ids(&checked.request).map(|cid| (checked.request.conversation_id.as_str(), cid))
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let stored = if keys.is_empty() { Vec::new() } else { self.stored_events(&keys).await? };
        Ok(BatchReads { epochs, license_row, conversations, stored })
    }

    async fn conversations(&mut self, ids: &[&str]) -> Result<HashMap<String, Conversation>, BatchFailure> {
        let rows: Vec<(String, i64, i32)> = sqlx::query_as(LOCK_CONVERSATIONS).bind(ids).fetch_all(&mut **self).await?;
        Ok(rows.into_iter().map(|(id, last_seq, shard)| (id, Conversation { last_seq, shard })).collect())
    }

    async fn stored_events(&mut self, keys: &[(&str, &str)]) -> Result<Vec<EventRow>, BatchFailure> {
        let (ids, client_msg_ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        Ok(sqlx::query_as(SELECT_BY_CLIENT_MSG_IDS).bind(ids).bind(client_msg_ids).fetch_all(&mut **self).await?)
    }

    async fn insert_conversation(&mut self, id: &str, create: &ConversationRecord) -> Result<bool, BatchFailure> {
        let shard = i32::try_from(create.shard)
            .map_err(|_| sqlx::Error::InvalidArgument(format!("no such shard: {}", create.shard)))?;
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
            .bind(shard)
            .bind(&create.customer_token)
            .bind(&create.offer_agent_id)
            .bind(create.offer_expires_at_ms)
            .bind(agents_to_json(&create.offered_to))
            .execute(&mut **self)
            .await?
            .rows_affected();
        Ok(inserted == 1)
    }

    async fn insert_events(&mut self, events: &[NewEventRow]) -> Result<(), BatchFailure> {
        let column = |f: fn(&NewEventRow) -> &str| events.iter().map(f).collect::<Vec<&str>>();
        sqlx::query(INSERT_EVENTS)
            .bind(column(|event| &event.conversation_id))
            .bind(events.iter().map(|event| event.seq).collect::<Vec<_>>())
            .bind(events.iter().map(|event| event.at_ms).collect::<Vec<_>>())
            .bind(column(|event| &event.author_role))
            .bind(column(|event| &event.author_id))
            .bind(events.iter().map(|event| event.client_msg_id.as_deref()).collect::<Vec<_>>())
            .bind(column(|event| &event.kind))
            .bind(column(|event| &event.payload_json))
            .bind(events.iter().map(|event| event.epoch).collect::<Vec<_>>())
            .execute(&mut **self)
            .await?;
        Ok(())
    }

    async fn update_summaries(&mut self, summaries: &[SummaryRow]) -> Result<(), BatchFailure> {
        let fields: Vec<SummaryFields> =
            summaries.iter().map(|summary| summary.fields.clone().unwrap_or_default()).collect();
        sqlx::query(UPDATE_SUMMARIES)
            .bind(summaries.iter().map(|summary| summary.conversation_id.as_str()).collect::<Vec<_>>())
            .bind(summaries.iter().map(|summary| summary.last_seq).collect::<Vec<_>>())
            .bind(summaries.iter().map(|summary| summary.state.as_deref()).collect::<Vec<_>>())
            .bind(summaries.iter().map(|summary| summary.fields.is_some()).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.owner_agent_id.as_str()).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.accepted_at_ms).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.closed_at_ms).collect::<Vec<_>>())
            .bind(summaries.iter().map(|summary| summary.group_id.as_deref()).collect::<Vec<_>>())
            .bind(summaries.iter().map(|summary| summary.queued_at_ms).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.offer_agent_id.as_str()).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.offer_expires_at_ms).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.offered_to.as_str()).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.customer_delivered_up_to).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.agent_delivered_up_to).collect::<Vec<_>>())
            .bind(fields.iter().map(|fields| fields.customer_away).collect::<Vec<_>>())
            .execute(&mut **self)
            .await?;
        Ok(())
    }

    async fn held_permits(&mut self, ids: &[&str]) -> Result<HashSet<String>, BatchFailure> {
        let rows: Vec<String> = sqlx::query_scalar(SELECT_PERMITS).bind(ids).fetch_all(&mut **self).await?;
        Ok(rows.into_iter().collect())
    }

    async fn write_license(&mut self, changes: &LicenseChanges) -> Result<bool, BatchFailure> {
        let set =
            sqlx::query(SET_LICENSE_USED).bind(changes.used).bind(changes.used_before).execute(&mut **self).await?;
        if set.rows_affected() != 1 {
            return Ok(false);
        }
        if !changes.acquired.is_empty() {
            let acquired = &changes.acquired;
            sqlx::query(INSERT_PERMITS)
                .bind(acquired.iter().map(|permit| permit.conversation_id.as_str()).collect::<Vec<_>>())
                .bind(acquired.iter().map(|permit| permit.tenant_id.as_str()).collect::<Vec<_>>())
                .bind(acquired.iter().map(|permit| permit.acquired_at_ms).collect::<Vec<_>>())
                .execute(&mut **self)
                .await?;
        }
        if !changes.released.is_empty() {
            let deleted = sqlx::query(DELETE_PERMITS).bind(&changes.released).execute(&mut **self).await?;
            // The permits were read under the license lock: they are all there.
            return Ok(deleted.rows_affected() == changes.released.len() as u64);
        }
        Ok(true)
    }
}

pub(super) async fn read(store: &PgStore, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
    let after_seq = to_i64(request.after_seq, "after_seq")?;
    let rows = if request.dedupe_key.is_empty() {
        sqlx::query_as(SELECT_EVENTS)
            .bind(&request.conversation_id)
            .bind(after_seq)
            .bind(read_limit(request.limit))
            .fetch(&store.pool)
    } else {
        sqlx::query_as(SELECT_EVENT_BY_KEY)
            .bind(&request.conversation_id)
            .bind(after_seq)
            .bind(&request.dedupe_key)
            .fetch(&store.pool)
    };
    let events = page(rows, request.max_bytes).await?;
    Ok(ReadEventsResponse { events })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use sqlx::postgres::{PgConnectOptions, PgConnection};
    use sqlx::{Connection as _, Row as _};
    use switchboard_testservices::Postgres;

    use super::*;
    use crate::pg::{PgOptions, append_session};

    /// The plan a session with `connect`'s options keeps for an append batch's lookup of stored client
    /// message ids when it first plans it on an empty log (as a prepared statement's generic plan is kept).
    async fn kept_plan(connect: &PgConnectOptions) -> String {
        let mut connection = PgConnection::connect_with(connect).await.unwrap();
        sqlx::raw_sql("SET plan_cache_mode = force_generic_plan").execute(&mut connection).await.unwrap();
        let prepare = format!("PREPARE lookup (text[], text[]) AS {SELECT_BY_CLIENT_MSG_IDS}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(prepare)).execute(&mut connection).await.unwrap();
        let rows = sqlx::raw_sql("EXPLAIN EXECUTE lookup('{c1}', '{m1}')").fetch_all(&mut connection).await.unwrap();
        rows.iter().map(|row| row.get::<String, _>(0)).collect::<Vec<_>>().join("\n")
    }

    #[tokio::test]
    async fn an_append_session_looks_up_client_ids_by_index_even_in_a_plan_made_on_an_empty_log() {
        let server = Postgres::start().unwrap();
        let url = server.create_database().unwrap();
        let store = PgStore::connect(&url, PgOptions::default()).await.unwrap();
        store.migrate().await.unwrap();
        let connect = PgConnectOptions::from_str(&url).unwrap();
        let plain = kept_plan(&connect).await;
        assert!(
            plain.contains("Seq Scan on events"),
            "a plain session's plan scans the log, kept as it grows: {plain}"
        );
        let append = kept_plan(&append_session(connect)).await;
        assert!(!append.contains("Seq Scan"), "{append}");
        assert!(append.contains("Index Scan using events_by_client_msg_id"), "{append}");
        store.close().await;
    }
}
