//! The event log on SQLite: the statements of a group-committed append batch (the logic is shared, in
//! `batch`), and reads.
//!
//! SQLite serializes every write transaction on the store's single writer connection, and a batch's
//! transaction takes the database's write lock as it begins (`BEGIN IMMEDIATE`), so the "locks" of
//! [`AppendTx`] are plain reads here: nothing else can write between them and the batch's writes.

use std::collections::{BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::{Row, Sqlite, SqliteConnection, SqlitePool};
use switchboard_proto::internal::v1::{ConversationRecord, ReadEventsRequest, ReadEventsResponse};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::batch::{
    AppendBackend, AppendTx, BatchFailure, BatchReads, Checked, Conversation, NewEventRow, Outcome, SummaryFields,
    SummaryRow, client_msg_ids, needs_license, run_batch,
};
use crate::dialect::json_list;
use crate::error::{db, to_i64};
use crate::license::{self, LicenseChanges};
use crate::records::{EventRow, agents_to_json, event_from_row};

pub(crate) const INSERT_CONVERSATION: &str = "INSERT INTO conversations (id, tenant_id, group_id, customer_name, \
     first_question, state, owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, \
     last_seq, shard, customer_token, offer_agent_id, offer_expires_at_ms, offered_to) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12, $13, $14, $15, $16) \
     ON CONFLICT (id) DO NOTHING";

// The statements of an append batch take their lists as one JSON array (`json_each`), so that they are
// static and prepared once whatever the batch's size. Each call to SQLite is a round trip to the
// connection's worker thread, so a batch is two texts of several statements each: one that begins the
// transaction and reads, then one that writes and commits. Such a text numbers its parameters (`$N`)
// across all its statements. (sqlx 0.9 runs every statement of a text with arguments on SQLite, and calls
// that behaviour deprecated; the store's tests would fail at once were it removed.)

/// Begins a batch's transaction, taking the write lock at once, and reads everything the batch may need,
/// in one statement: `$1` the shards (a JSON array), `$2` whether to read the license row (0 or 1), `$3`
/// the conversation ids, `$4` the `[[conversation_id, client_msg_id], ...]` keys. Column 0 tells which
/// read a row answers: 0 a lease `(shard, epoch)`, 1 the license `(max_sessions, used)`, 2 a conversation
/// `(id, last_seq, shard)`, 3 a stored event (the columns of [`SELECT_BY_CLIENT_MSG_IDS`]); the unused
/// columns are `NULL`.
///
/// The batch commits with `synchronous=NORMAL`, set here and put back to `FULL` after `COMMIT` (or
/// `ROLLBACK`): it is made durable by [`WalSync`](crate::wal::WalSync) before its callers are answered.
const BEGIN_AND_READ_BATCH: &str = "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE; \
     SELECT 0, shard, epoch, NULL, NULL, NULL, NULL, NULL, NULL FROM shard_leases \
     WHERE shard IN (SELECT value FROM json_each($1)) \
     UNION ALL SELECT 1, max_sessions, used, NULL, NULL, NULL, NULL, NULL, NULL FROM license WHERE id = 1 AND $2 \
     UNION ALL SELECT 2, id, last_seq, shard, NULL, NULL, NULL, NULL, NULL FROM conversations \
     WHERE id IN (SELECT value FROM json_each($3)) \
     UNION ALL SELECT 3, e.conversation_id, e.seq, e.at_ms, e.author_role, e.author_id, e.client_msg_id, e.kind, \
     e.payload_json FROM json_each($4) AS wanted CROSS JOIN events AS e \
     ON e.conversation_id = wanted.value ->> 0 AND e.client_msg_id = wanted.value ->> 1";

/// Writes a batch and commits it. Each list is a JSON array of arrays, in the column order of its
/// statement, and empty when the batch has nothing of its kind:
/// - `$1` the new conversations (a JSON `null` is SQL `NULL`);
/// - `$2` the events;
/// - `$3` `[id, last_seq]` of the conversations whose log only grew (messages, delivery marks), so that the
///   indexes on state, owner and offer are left alone;
/// - `$4` `[id, last_seq, state, owner, accepted_at_ms, closed_at_ms, group, queued_at_ms, offer_agent,
///   offer_expires_at_ms, offered_to]` of those with an update (a `null` state, group or queue time keeps
///   the stored one);
/// - `$5` whether the license count changes, from `$7` (as read) to `$6`; `$8` the permits taken
///   `[conversation_id, tenant_id, acquired_at_ms]`, `$9` the ids of those given back. A count that is not
///   `$7` any more is set to `NULL`, which its `NOT NULL` refuses: the batch fails and commits nothing.
const WRITE_BATCH: &str = "\
     INSERT INTO conversations (id, tenant_id, group_id, customer_name, first_question, state, owner_agent_id, \
     created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, last_seq, shard, customer_token, offer_agent_id, \
     offer_expires_at_ms, offered_to) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7, \
     value ->> 8, value ->> 9, value ->> 10, 0, value ->> 11, value ->> 12, value ->> 13, value ->> 14, \
     value ->> 15 FROM json_each($1); \
     INSERT INTO events (conversation_id, seq, at_ms, author_role, author_id, client_msg_id, kind, payload_json, \
     epoch) SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, \
     value ->> 7, value ->> 8 FROM json_each($2); \
     UPDATE conversations SET last_seq = u.value ->> 1 FROM json_each($3) AS u WHERE conversations.id = u.value ->> 0; \
     UPDATE conversations SET last_seq = u.value ->> 1, state = COALESCE(u.value ->> 2, state), \
     owner_agent_id = u.value ->> 3, accepted_at_ms = u.value ->> 4, closed_at_ms = u.value ->> 5, \
     group_id = COALESCE(u.value ->> 6, group_id), queued_at_ms = COALESCE(u.value ->> 7, queued_at_ms), \
     offer_agent_id = u.value ->> 8, offer_expires_at_ms = u.value ->> 9, offered_to = u.value ->> 10 \
     FROM json_each($4) AS u WHERE conversations.id = u.value ->> 0; \
     UPDATE license SET used = CASE WHEN used = $7 THEN $6 END WHERE id = 1 AND $5; \
     INSERT INTO license_permits (conversation_id, tenant_id, acquired_at_ms) \
     SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each($8); \
     DELETE FROM license_permits WHERE conversation_id IN (SELECT value FROM json_each($9)); \
     COMMIT; PRAGMA synchronous = FULL";

const SELECT_CONVERSATIONS_FOR_APPEND: &str =
    "SELECT id, last_seq, shard FROM conversations WHERE id IN (SELECT value FROM json_each($1))";

/// `$1`: `[[conversation_id, client_msg_id], ...]`. `CROSS JOIN` keeps the list outside, so that each key
/// is one lookup in `events_by_client_msg_id`.
const SELECT_BY_CLIENT_MSG_IDS: &str = "SELECT e.conversation_id, e.seq, e.at_ms, e.author_role, e.author_id, \
     e.client_msg_id, e.kind, e.payload_json \
     FROM json_each($1) AS wanted CROSS JOIN events AS e \
     ON e.conversation_id = wanted.value ->> 0 AND e.client_msg_id = wanted.value ->> 1";

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
    /// A batch in two round trips to the connection's thread: `BEGIN IMMEDIATE` and every read
    /// ([`BEGIN_AND_READ_BATCH`]), then every write and `COMMIT` ([`WRITE_BATCH`]). Each round trip is two
    /// thread wake-ups, which cost 0.1 to 0.3 ms each on a loaded machine: one statement per round trip
    /// (seven in all) made most of a batch's time.
    async fn write(&self, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure> {
        let connection = self.writer.acquire().await.map_err(|error| BatchFailure::Batch(db(error)))?;
        let mut open = OpenTransaction { connection, closed: false };
        let mut tx = SqliteBatch { connection: &mut open.connection, writes: BatchWrites::default() };
        let result = match run_batch(&mut tx, batch).await {
            Ok(outcomes) => tx.commit().await.map(|()| outcomes).map_err(BatchFailure::from),
            Err(failure) => Err(failure),
        };
        match result {
            Ok(outcomes) => {
                open.committed();
                if let Some(checkpoints) = &self.checkpoints {
                    checkpoints.after_commit();
                }
                Ok(outcomes)
            }
            Err(failure) => {
                open.roll_back().await;
                Err(failure)
            }
        }
    }
}

/// The writer connection while a batch's transaction may be open (the transaction is begun and committed
/// by the batch's own statements, not by a `sqlx::Transaction`). Dropped before it is known to be closed
/// (a batch task that panicked, a failed rollback), the connection is closed rather than handed back to
/// the pool with a transaction open; the pool opens a new one.
struct OpenTransaction {
    connection: PoolConnection<Sqlite>,
    closed: bool,
}

impl OpenTransaction {
    fn committed(mut self) {
        self.closed = true;
    }

    async fn roll_back(mut self) {
        match sqlx::raw_sql("ROLLBACK; PRAGMA synchronous = FULL").execute(&mut *self.connection).await {
            Ok(_) => self.closed = true,
            // Also when BEGIN itself failed and there was no transaction: the connection is replaced, which is
            // rare enough.
            Err(error) => tracing::warn!(%error, "a failed append batch was not rolled back: reconnecting"),
        }
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if !self.closed {
            self.connection.close_on_drop();
        }
    }
}

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
    pub(crate) const GAP: std::time::Duration = std::time::Duration::from_millis(25);
    /// The log's size, in pages, at which the writer checkpoints in its own commit (SQLite's default is
    /// 1,000).
    pub(crate) const WRITER_AFTER_PAGES: u32 = 8_000;

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

/// Everything a batch may need to read, whatever its fences turn out to be: the shards, conversation ids
/// and (conversation, client message id) keys of all its appends (each list sorted and distinct), and
/// whether any append may create or finish a conversation. For a backend that reads it all in one
/// statement (SQLite, whose single writer needs no locks).
struct ReadAll<'a> {
    shards: Vec<i32>,
    license: bool,
    ids: Vec<&'a str>,
    keys: Vec<(&'a str, &'a str)>,
}

impl<'a> ReadAll<'a> {
    fn of(batch: &'a [Checked]) -> Self {
        let shards = batch.iter().map(|checked| checked.shard).collect::<BTreeSet<_>>();
        let ids = batch.iter().map(|checked| checked.request.conversation_id.as_str());
        let keys = batch.iter().flat_map(|checked| {
            client_msg_ids(&checked.request).map(|cid| (checked.request.conversation_id.as_str(), cid))
        });
        ReadAll {
            shards: shards.into_iter().collect(),
            license: batch.iter().any(|checked| needs_license(&checked.request)),
            ids: ids.collect::<BTreeSet<_>>().into_iter().collect(),
            keys: keys.collect::<BTreeSet<_>>().into_iter().collect(),
        }
    }
}

/// A batch's transaction on the writer connection: reads go to the database at once, writes are kept
/// until [`SqliteBatch::commit`] sends them all, with `COMMIT`, in one round trip.
struct SqliteBatch<'c> {
    connection: &'c mut SqliteConnection,
    writes: BatchWrites,
}

/// The writes of a batch, each list one JSON array for [`WRITE_BATCH`].
#[derive(Default)]
struct BatchWrites {
    conversations: Vec<serde_json::Value>,
    events: String,
    last_seqs: String,
    summaries: String,
    license: Option<LicenseChanges>,
}

impl SqliteBatch<'_> {
    async fn commit(self) -> Result<(), sqlx::Error> {
        let BatchWrites { conversations, events, last_seqs, summaries, license } = self.writes;
        let (used, used_before, acquired, released) = match &license {
            Some(changes) => {
                let acquired: Vec<_> = changes
                    .acquired
                    .iter()
                    .map(|permit| (&permit.conversation_id, &permit.tenant_id, permit.acquired_at_ms))
                    .collect();
                (Some(changes.used), Some(changes.used_before), json_list(&acquired)?, json_list(&changes.released)?)
            }
            None => (None, None, EMPTY_LIST.to_owned(), EMPTY_LIST.to_owned()),
        };
        sqlx::query(WRITE_BATCH)
            .bind(json_list(&conversations)?)
            .bind(or_empty(events))
            .bind(or_empty(last_seqs))
            .bind(or_empty(summaries))
            .bind(license.is_some())
            .bind(used)
            .bind(used_before)
            .bind(acquired)
            .bind(released)
            .execute(&mut *self.connection)
            .await?;
        Ok(())
    }
}

const EMPTY_LIST: &str = "[]";

fn or_empty(list: String) -> String {
    if list.is_empty() { EMPTY_LIST.to_owned() } else { list }
}

#[async_trait]
impl AppendTx for SqliteBatch<'_> {
    async fn read_batch(&mut self, batch: &[Checked]) -> Result<BatchReads, sqlx::Error> {
        // The transaction takes the write lock first, then reads everything the batch may need, in one
        // statement: the single writer connection needs no row locks.
        let wanted = ReadAll::of(batch);
        let rows = sqlx::query(BEGIN_AND_READ_BATCH)
            .bind(json_list(&wanted.shards)?)
            .bind(wanted.license)
            .bind(json_list(&wanted.ids)?)
            .bind(json_list(&wanted.keys)?)
            .fetch_all(&mut *self.connection)
            .await?;
        let mut reads = BatchReads::default();
        for row in rows {
            match row.try_get::<i64, _>(0)? {
                0 => {
                    reads.epochs.insert(row.try_get(1)?, row.try_get(2)?);
                }
                1 => reads.license_row = Some(Some((row.try_get(1)?, row.try_get(2)?))),
                2 => {
                    let conversation = Conversation { last_seq: row.try_get(2)?, shard: row.try_get(3)? };
                    reads.conversations.insert(row.try_get(1)?, conversation);
                }
                _ => reads.stored.push((
                    row.try_get(1)?,
                    row.try_get(2)?,
                    row.try_get(3)?,
                    row.try_get(4)?,
                    row.try_get(5)?,
                    row.try_get(6)?,
                    row.try_get(7)?,
                    row.try_get(8)?,
                )),
            }
        }
        if wanted.license && reads.license_row.is_none() {
            // Asked for and not there: the license row is missing.
            reads.license_row = Some(None);
        }
        Ok(reads)
    }

    // `conversations` and `stored_events` serve `decide`'s second looks, which a batch here never needs
    // (its one read covers every append, and its inserts never find the row there): kept correct anyway.
    async fn conversations(&mut self, ids: &[&str]) -> Result<HashMap<String, Conversation>, sqlx::Error> {
        let rows: Vec<(String, i64, i32)> = sqlx::query_as(SELECT_CONVERSATIONS_FOR_APPEND)
            .bind(json_list(ids)?)
            .fetch_all(&mut *self.connection)
            .await?;
        Ok(rows.into_iter().map(|(id, last_seq, shard)| (id, Conversation { last_seq, shard })).collect())
    }

    async fn stored_events(&mut self, keys: &[(&str, &str)]) -> Result<Vec<EventRow>, sqlx::Error> {
        sqlx::query_as(SELECT_BY_CLIENT_MSG_IDS).bind(json_list(keys)?).fetch_all(&mut *self.connection).await
    }

    /// Kept for the commit. The batch read every conversation it appends to under the write lock, so the
    /// conversation cannot exist: were it there anyway, the insert fails the batch, which then runs its
    /// appends one by one.
    async fn insert_conversation(&mut self, id: &str, create: &ConversationRecord) -> Result<bool, sqlx::Error> {
        self.writes.conversations.push(serde_json::json!([
            id,
            create.tenant_id,
            create.group_id,
            create.customer_name,
            create.first_question,
            create.state,
            create.owner_agent_id,
            create.created_at_ms,
            create.queued_at_ms,
            create.accepted_at_ms,
            create.closed_at_ms,
            create.shard,
            create.customer_token,
            create.offer_agent_id,
            create.offer_expires_at_ms,
            agents_to_json(&create.offered_to),
        ]));
        Ok(true)
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
        self.writes.events = json_list(&rows)?;
        Ok(())
    }

    async fn update_summaries(&mut self, summaries: &[SummaryRow]) -> Result<(), sqlx::Error> {
        let (updated, grown): (Vec<&SummaryRow>, Vec<&SummaryRow>) =
            summaries.iter().partition(|summary| summary.fields.is_some());
        if !grown.is_empty() {
            let rows: Vec<_> = grown.iter().map(|summary| (&summary.conversation_id, summary.last_seq)).collect();
            self.writes.last_seqs = json_list(&rows)?;
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
            self.writes.summaries = json_list(&rows)?;
        }
        Ok(())
    }

    async fn held_permits(&mut self, ids: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
        license::held_permits(&mut *self.connection, ids).await
    }

    /// Kept for the commit, whose compare-and-set fails the batch if the count is not the one read (it
    /// cannot be: the batch read it under the write lock).
    async fn write_license(&mut self, changes: &LicenseChanges) -> Result<bool, sqlx::Error> {
        self.writes.license = Some(changes.clone());
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
