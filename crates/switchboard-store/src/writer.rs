//! The append writer of the SQLite store: a connection of its own (rusqlite, on the same database file as
//! the store's sqlx pools), owned by a thread of its own (`batch`'s `Appender::start_on_thread`).
//!
//! SQLite runs in the store's process, so a statement is a function call, not a network round trip; but a
//! call through sqlx is a round trip to the connection's worker thread, two thread wake-ups of 0.1 to
//! 0.3 ms each on a loaded machine, and a batch on sqlx's writer connection took a pool acquire and two
//! round trips (some 1.7 ms at 7,000 appends/s, most of it waiting). Here the batch's statements are plain
//! calls on the writer's thread: one wake-up to take a batch, none inside it.
//!
//! The writer connection is the only one that appends; the store's sqlx writer connection does the other
//! writes (leases, nodes, tickets, the license limit, migrations). Two connections write, so each write
//! transaction takes the database's write lock as it begins (`BEGIN IMMEDIATE`: a transaction that read
//! first could not take it later, SQLite then fails it at once) and waits for the other's with the busy
//! timeout. An append batch reads under that lock, so its reads are its "locks" (see [`AppendTx`]).
//!
//! The connection runs with `synchronous=NORMAL` on a file store: a commit writes the log without waiting
//! for the disk, and the batch's callers are answered after a sync of the log (`wal`). A throwaway store
//! (`SqlStore::open_temporary`) runs with `OFF` and is never synced.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use switchboard_proto::internal::v1::ConversationRecord;
use switchboard_proto::store::StoreError;

use crate::batch::{
    AppendTx, BatchFailure, BatchReads, BlockingAppendBackend, Checked, Conversation, NewEventRow, Outcome,
    SummaryFields, SummaryRow, client_msg_ids, needs_license, run_batch,
};
use crate::events::{Checkpoints, INSERT_CONVERSATION};
use crate::license::{LicenseChanges, SELECT_LICENSE, SET_LICENSE_USED};
use crate::records::{EventRow, agents_to_json};

// SQLite numbers `$N` parameters in the order they first appear in the text, whatever N: the writer's own
// statements use `?N`, which SQLite numbers N. The statements shared with sqlx (`INSERT_CONVERSATION`,
// `SET_LICENSE_USED`) have theirs in order.
const SELECT_EPOCH: &str = "SELECT epoch FROM shard_leases WHERE shard = ?1";
const SELECT_CONVERSATION: &str = "SELECT last_seq, shard FROM conversations WHERE id = ?1";
const SELECT_BY_CLIENT_MSG_ID: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, client_msg_id, \
     kind, payload_json FROM events WHERE conversation_id = ?1 AND client_msg_id = ?2";
const SELECT_PERMIT: &str = "SELECT 1 FROM license_permits WHERE conversation_id = ?1";
const INSERT_EVENT: &str = "INSERT INTO events (conversation_id, seq, at_ms, author_role, author_id, \
     client_msg_id, kind, payload_json, epoch) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
/// A conversation whose log only grew (messages, delivery marks): the indexes on state, owner and offer
/// are left alone.
const UPDATE_LAST_SEQ: &str = "UPDATE conversations SET last_seq = ?2 WHERE id = ?1";
/// A conversation with an update: a `NULL` state, group or queue time keeps the stored one.
const UPDATE_SUMMARY: &str = "UPDATE conversations SET last_seq = ?2, state = COALESCE(?3, state), \
     owner_agent_id = ?4, accepted_at_ms = ?5, closed_at_ms = ?6, group_id = COALESCE(?7, group_id), \
     queued_at_ms = COALESCE(?8, queued_at_ms), offer_agent_id = ?9, offer_expires_at_ms = ?10, offered_to = ?11, \
     customer_delivered_up_to = ?12, agent_delivered_up_to = ?13, customer_away = COALESCE(?14, customer_away) \
     WHERE id = ?1";
const INSERT_PERMIT: &str =
    "INSERT INTO license_permits (conversation_id, tenant_id, acquired_at_ms) VALUES (?1, ?2, ?3)";
const DELETE_PERMIT: &str = "DELETE FROM license_permits WHERE conversation_id = ?1";

/// How the writer's commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The log is written at commit and synced by the append writer before the callers are answered.
    SyncedLog,
    /// Never synced: a throwaway database.
    None,
}

impl Durability {
    fn synchronous(self) -> &'static str {
        match self {
            Durability::SyncedLog => "NORMAL",
            Durability::None => "OFF",
        }
    }
}

/// The append writer's connection, and what it needs to open it again.
pub(crate) struct SqliteWriter {
    connection: Connection,
    path: PathBuf,
    durability: Durability,
    checkpoints: Checkpoints,
    /// Set once a failed batch could neither be rolled back nor dropped with a new connection.
    broken: Option<StoreError>,
}

impl SqliteWriter {
    /// Opens the writer's connection to the database file `path`, which exists and is migrated, in WAL mode.
    pub(crate) fn open(
        path: &Path,
        durability: Durability,
        checkpoints: Checkpoints,
    ) -> Result<SqliteWriter, StoreError> {
        let connection = connect(path, durability)?;
        Ok(SqliteWriter { connection, path: path.to_owned(), durability, checkpoints, broken: None })
    }

    fn roll_back(&mut self) {
        if self.connection.is_autocommit() {
            return;
        }
        if let Err(error) = self.connection.execute_batch("ROLLBACK") {
            tracing::warn!(%error, "a failed append batch was not rolled back: reconnecting");
            match connect(&self.path, self.durability) {
                // The old connection, with its transaction, is closed as it is dropped.
                Ok(connection) => self.connection = connection,
                // Its transaction is still open on the old connection, so every later batch would fail to
                // begin; what it wrote was never committed, so a restart recovers the store.
                Err(reopen) => {
                    self.broken = Some(StoreError::Unavailable(format!(
                        "the append writer could neither roll back a failed batch ({error}) nor reopen the \
                         database ({reopen})"
                    )))
                }
            }
        }
    }
}

fn connect(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let failed = |error: rusqlite::Error| {
        StoreError::Unavailable(format!("cannot open the append writer on {}: {error}", path.display()))
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags).map_err(failed)?;
    connection.busy_timeout(crate::BUSY_TIMEOUT).map_err(failed)?;
    connection
        .execute_batch(&format!(
            "PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; PRAGMA synchronous = {}; \
             PRAGMA wal_autocheckpoint = {};",
            durability.synchronous(),
            Checkpoints::WRITER_AFTER_PAGES,
        ))
        .map_err(failed)?;
    let journal: String = connection.query_row("PRAGMA journal_mode", [], |row| row.get(0)).map_err(failed)?;
    if !journal.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!("{} is not in WAL mode but {journal}", path.display())));
    }
    connection.set_prepared_statement_cache_capacity(32);
    Ok(connection)
}

impl BlockingAppendBackend for SqliteWriter {
    fn write(&mut self, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure> {
        self.connection
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut begin| begin.execute([]))
            .map_err(batch_error)?;
        let result = ready(run_batch(&mut SqliteBatch { connection: &mut self.connection }, batch))
            .unwrap_or_else(|| {
                Err(BatchFailure::Batch(StoreError::Unavailable(
                    "an append batch waited inside its transaction".into(),
                )))
            })
            .and_then(|outcomes| {
                let mut commit = self.connection.prepare_cached("COMMIT").map_err(batch_error)?;
                commit.execute([]).map_err(batch_error)?;
                Ok(outcomes)
            });
        match result {
            Ok(outcomes) => {
                self.checkpoints.after_commit();
                Ok(outcomes)
            }
            Err(failure) => {
                self.roll_back();
                Err(failure)
            }
        }
    }

    fn recover(&mut self) {
        self.roll_back();
    }

    fn broken(&self) -> Option<StoreError> {
        self.broken.clone()
    }
}

/// The output of a future that never waits, without an executor: [`run_batch`] over a [`SqliteBatch`],
/// whose statements all run at once. `None` should it wait all the same.
fn ready<F: Future>(future: F) -> Option<F::Output> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// A statement's failure: a violated constraint or a value that does not fit is the request's (the batch's
/// other appends are run again without it), anything else the batch's.
impl From<rusqlite::Error> for BatchFailure {
    fn from(error: rusqlite::Error) -> Self {
        match &error {
            rusqlite::Error::SqliteFailure(failure, _)
                if matches!(failure.code, ErrorCode::ConstraintViolation | ErrorCode::TooBig) =>
            {
                BatchFailure::Request(StoreError::Invalid(format!("constraint violated: {error}")))
            }
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::Utf8Error(..)
            | rusqlite::Error::ToSqlConversionFailure(_) => {
                BatchFailure::Request(StoreError::Invalid(format!("malformed row or argument: {error}")))
            }
            _ => batch_error(error),
        }
    }
}

/// A failure of the database or the connection: every append of the batch gets it.
fn batch_error(error: rusqlite::Error) -> BatchFailure {
    tracing::warn!(%error, "database error");
    BatchFailure::Batch(StoreError::Unavailable(error.to_string()))
}

/// A batch's transaction on the writer connection, its write lock taken.
struct SqliteBatch<'c> {
    connection: &'c mut Connection,
}

impl SqliteBatch<'_> {
    fn conversations_now(&self, ids: &[&str]) -> Result<HashMap<String, Conversation>, BatchFailure> {
        let mut select = self.connection.prepare_cached(SELECT_CONVERSATION)?;
        let mut found = HashMap::with_capacity(ids.len());
        for &id in ids {
            let row = select.query_row([id], |row| Ok(Conversation { last_seq: row.get(0)?, shard: row.get(1)? }));
            if let Some(conversation) = row.optional()? {
                found.insert(id.to_owned(), conversation);
            }
        }
        Ok(found)
    }

    fn stored_events_now(&self, keys: &[(&str, &str)]) -> Result<Vec<EventRow>, BatchFailure> {
        let mut select = self.connection.prepare_cached(SELECT_BY_CLIENT_MSG_ID)?;
        let mut stored = Vec::new();
        for &(id, client_msg_id) in keys {
            let row = select.query_row([id, client_msg_id], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                    row.get(7)?,
                ))
            });
            stored.extend(row.optional()?);
        }
        Ok(stored)
    }

    fn held_permits_now(&self, ids: &[&str]) -> Result<HashSet<String>, BatchFailure> {
        let mut select = self.connection.prepare_cached(SELECT_PERMIT)?;
        let mut held = HashSet::new();
        for &id in ids {
            if select.exists([id])? {
                held.insert(id.to_owned());
            }
        }
        Ok(held)
    }
}

#[async_trait]
impl AppendTx for SqliteBatch<'_> {
    /// Everything any append of the batch may need, whatever its fence turns out to be: one indexed lookup
    /// each, under the write lock.
    async fn read_batch(&mut self, batch: &[Checked]) -> Result<BatchReads, BatchFailure> {
        let shards: BTreeSet<i32> = batch.iter().map(|checked| checked.shard).collect();
        let ids: BTreeSet<&str> = batch.iter().map(|checked| checked.request.conversation_id.as_str()).collect();
        let keys: BTreeSet<(&str, &str)> = batch
            .iter()
            .flat_map(|checked| {
                client_msg_ids(&checked.request).map(|cid| (checked.request.conversation_id.as_str(), cid))
            })
            .collect();
        let mut reads = BatchReads::default();
        let mut select = self.connection.prepare_cached(SELECT_EPOCH)?;
        for shard in shards {
            if let Some(epoch) = select.query_row([shard], |row| row.get(0)).optional()? {
                reads.epochs.insert(shard, epoch);
            }
        }
        drop(select);
        if batch.iter().any(|checked| needs_license(&checked.request)) {
            let mut select = self.connection.prepare_cached(SELECT_LICENSE)?;
            reads.license_row = Some(select.query_row([], |row| Ok((row.get(0)?, row.get(1)?))).optional()?);
        }
        reads.conversations = self.conversations_now(&ids.into_iter().collect::<Vec<_>>())?;
        reads.stored = self.stored_events_now(&keys.into_iter().collect::<Vec<_>>())?;
        Ok(reads)
    }

    // `conversations` and `stored_events` serve `decide`'s second looks, which a batch here never needs
    // (its reads cover every append, and its inserts never find the row there): kept correct anyway.
    async fn conversations(&mut self, ids: &[&str]) -> Result<HashMap<String, Conversation>, BatchFailure> {
        self.conversations_now(ids)
    }

    async fn stored_events(&mut self, keys: &[(&str, &str)]) -> Result<Vec<EventRow>, BatchFailure> {
        self.stored_events_now(keys)
    }

    async fn insert_conversation(&mut self, id: &str, create: &ConversationRecord) -> Result<bool, BatchFailure> {
        let mut insert = self.connection.prepare_cached(INSERT_CONVERSATION)?;
        let inserted = insert.execute(params![
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
        ])?;
        Ok(inserted == 1)
    }

    async fn insert_events(&mut self, events: &[NewEventRow]) -> Result<(), BatchFailure> {
        let mut insert = self.connection.prepare_cached(INSERT_EVENT)?;
        for event in events {
            insert.execute(params![
                event.conversation_id,
                event.seq,
                event.at_ms,
                event.author_role,
                event.author_id,
                event.client_msg_id,
                event.kind,
                event.payload_json,
                event.epoch,
            ])?;
        }
        Ok(())
    }

    async fn update_summaries(&mut self, summaries: &[SummaryRow]) -> Result<(), BatchFailure> {
        for summary in summaries {
            match &summary.fields {
                None => {
                    let mut update = self.connection.prepare_cached(UPDATE_LAST_SEQ)?;
                    update.execute(params![summary.conversation_id, summary.last_seq])?;
                }
                Some(fields) => {
                    let SummaryFields {
                        owner_agent_id,
                        accepted_at_ms,
                        closed_at_ms,
                        offer_agent_id,
                        offer_expires_at_ms,
                        offered_to,
                        customer_delivered_up_to,
                        agent_delivered_up_to,
                        customer_away,
                    } = fields;
                    let mut update = self.connection.prepare_cached(UPDATE_SUMMARY)?;
                    update.execute(params![
                        summary.conversation_id,
                        summary.last_seq,
                        summary.state,
                        owner_agent_id,
                        accepted_at_ms,
                        closed_at_ms,
                        summary.group_id,
                        summary.queued_at_ms,
                        offer_agent_id,
                        offer_expires_at_ms,
                        offered_to,
                        customer_delivered_up_to,
                        agent_delivered_up_to,
                        customer_away,
                    ])?;
                }
            }
        }
        Ok(())
    }

    async fn held_permits(&mut self, ids: &[&str]) -> Result<HashSet<String>, BatchFailure> {
        self.held_permits_now(ids)
    }

    async fn write_license(&mut self, changes: &LicenseChanges) -> Result<bool, BatchFailure> {
        let mut set = self.connection.prepare_cached(SET_LICENSE_USED)?;
        if set.execute(params![changes.used, changes.used_before])? != 1 {
            return Ok(false);
        }
        let mut insert = self.connection.prepare_cached(INSERT_PERMIT)?;
        for permit in &changes.acquired {
            insert.execute(params![permit.conversation_id, permit.tenant_id, permit.acquired_at_ms])?;
        }
        let mut delete = self.connection.prepare_cached(DELETE_PERMIT)?;
        for id in &changes.released {
            // The permits were read under the write lock: they are all there.
            if delete.execute([id])? != 1 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
