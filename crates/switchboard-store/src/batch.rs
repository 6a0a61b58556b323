//! Group commit: appends wait in a queue, and one writer task takes every append waiting (up to
//! [`GroupCommit::max_batch`]) and runs them in ONE transaction, then answers each caller. A caller is
//! answered only after the transaction of its batch committed (persist before ack).
//!
//! The append logic itself ([`run_batch`]) is shared by the SQL backends: it locks what it reads (the
//! fences, then the license row when the batch may create or finish a conversation, then the
//! conversations, each in a fixed order, so that two writers never wait on each other in a cycle), decides
//! every append in order in memory (fence, existence, shard, deduplication, license permit), and writes the
//! batch's events, summaries and permits at the end. A refused append (stale epoch, invalid, not found,
//! duplicate, license exhausted) writes nothing and does not disturb the others.
//!
//! When a statement of a batch fails because of one request's data (a constraint, a value the database
//! refuses), the batch is rolled back and its appends are run again one transaction each, so that only the
//! culprit gets the error. When the connection fails or the commit fails, every caller of the batch gets
//! `Unavailable` (the outcome is unknown: a retry with the same client message id is deduplicated).
//!
//! A backend whose commit is not yet durable (SQLite, started with a [`WalSync`]) is synced by a second task
//! while the writer goes on with the next batch: the answers of a batch wait for a sync begun
//! after its commit, and one sync answers every batch committed before it. A failed sync fails every
//! append it was to answer and every append after it: what the database holds is no longer known to be
//! on the disk, and the store must be restarted (it then recovers what the disk holds).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use switchboard_telemetry::names;

use async_trait::async_trait;
use switchboard_proto::internal::v1::{
    AppendRequest, AppendResponse, ConversationRecord, ConversationUpdate, EventRecord,
};
use switchboard_proto::store::StoreError;
use tokio::sync::{mpsc, oneshot};

use crate::error::{blames_the_request, db, shard_to_i32, to_i64, to_u64};
use crate::license::{BatchLicense, LicenseChanges, finishes, may_admit};
use crate::records::{EventRow, agents_to_json, event_from_row};
use crate::wal::WalSync;

/// How appends are batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// The most appends one transaction carries. 1 means one commit per append.
    pub max_batch: usize,
}

impl GroupCommit {
    pub const DEFAULT_MAX_BATCH: usize = 256;
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit { max_batch: Self::DEFAULT_MAX_BATCH }
    }
}

/// How many appends may wait for the writer before callers wait to enqueue.
const QUEUE_PER_BATCH: usize = 4;

/// An append with everything checked that can be checked without the database.
#[derive(Debug)]
pub(crate) struct Checked {
    pub request: AppendRequest,
    pub shard: i32,
    pub epoch: i64,
}

/// The checks of an append that need no database, in the order the stores have always made them.
pub(crate) fn check(request: AppendRequest) -> Result<Checked, StoreError> {
    let fence = request.fence.ok_or_else(|| StoreError::Invalid("append without a fence".into()))?;
    let shard = shard_to_i32(fence.shard)?;
    let epoch = to_i64(fence.epoch, "epoch")?;
    let id = request.conversation_id.as_str();
    if id.is_empty() {
        return Err(StoreError::Invalid("append without a conversation id".into()));
    }
    if let Some(create) = &request.create {
        if !create.id.is_empty() && create.id != id {
            return Err(StoreError::Invalid(format!("create record {} for conversation {id}", create.id)));
        }
        shard_to_i32(create.shard)?;
    }
    Ok(Checked { request, shard, epoch })
}

/// The answer to one append of a batch.
pub(crate) type Outcome = Result<AppendResponse, StoreError>;

/// Why a batch did not commit.
#[derive(Debug)]
pub(crate) enum BatchFailure {
    /// A statement failed on one request's data: the appends are worth running again one by one.
    Request(StoreError),
    /// The connection, the database or the commit failed: every caller of the batch gets this.
    Batch(StoreError),
}

impl From<sqlx::Error> for BatchFailure {
    fn from(error: sqlx::Error) -> Self {
        if blames_the_request(&error) { BatchFailure::Request(db(error)) } else { BatchFailure::Batch(db(error)) }
    }
}

impl From<StoreError> for BatchFailure {
    fn from(error: StoreError) -> Self {
        BatchFailure::Request(error)
    }
}

/// A SQL backend's side of group commit: run a batch in one transaction and commit it.
#[async_trait]
pub(crate) trait AppendBackend: Send + Sync + 'static {
    /// Runs [`run_batch`] in one transaction and commits it; the outcomes only once it committed.
    async fn write(&self, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure>;
}

/// The answers of a committed batch, waiting for it to be durable.
type Answers = Vec<(oneshot::Sender<Outcome>, Outcome)>;

struct Pending {
    checked: Checked,
    reply: oneshot::Sender<Outcome>,
}

/// The queue in front of the writer task. Cloning shares the queue; the writer stops when the last clone
/// is dropped.
#[derive(Clone)]
pub(crate) struct Appender {
    queue: mpsc::Sender<Pending>,
}

impl Appender {
    /// Starts the writer task on the current tokio runtime. With `log`, a committed batch is durable only
    /// once the log is synced, and its callers are answered after that; without, once it committed.
    pub(crate) fn start(backend: Arc<dyn AppendBackend>, options: GroupCommit, log: Option<Arc<WalSync>>) -> Self {
        let max_batch = options.max_batch.max(1);
        let (queue, receiver) = mpsc::channel(max_batch * QUEUE_PER_BATCH);
        tokio::spawn(write_batches(backend, log, receiver, max_batch));
        Appender { queue }
    }

    pub(crate) async fn append(&self, request: AppendRequest) -> Outcome {
        let checked = check(request)?;
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { checked, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the append writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("the append writer stopped before answering".into()))?
    }
}

async fn write_batches(
    backend: Arc<dyn AppendBackend>,
    log: Option<Arc<WalSync>>,
    mut receiver: mpsc::Receiver<Pending>,
    max_batch: usize,
) {
    // Set once a sync failed: from then on every append fails.
    let failed: Arc<OnceLock<StoreError>> = Arc::default();
    let syncer = log.map(|log| {
        let (answers, waiting) = mpsc::unbounded_channel();
        tokio::spawn(sync_batches(log, waiting, failed.clone()));
        answers
    });
    let mut pending = Vec::with_capacity(max_batch);
    while receiver.recv_many(&mut pending, max_batch).await > 0 {
        let (batch, replies): (Vec<Checked>, Vec<_>) =
            pending.drain(..).map(|pending| (pending.checked, pending.reply)).unzip();
        let n = batch.len();
        if let Some(error) = failed.get() {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
            continue;
        }
        // On a task of its own, so that a panic fails this batch only, not the writer.
        let backend = backend.clone();
        let started = tokio::time::Instant::now();
        let outcomes = match tokio::spawn(async move { write_batch(backend.as_ref(), &batch).await }).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                tracing::error!(%error, "an append batch failed unexpectedly");
                vec![Err(StoreError::Unavailable("the append batch failed unexpectedly".into())); n]
            }
        };
        tracing::trace!(appends = n, "group commit");
        metrics::histogram!(names::STORE_APPEND_BATCH_DURATION).record(started.elapsed().as_secs_f64());
        metrics::histogram!(names::STORE_APPEND_BATCH_SIZE).record(n as f64);
        for outcome in &outcomes {
            let outcome = match outcome {
                Ok(response) if response.duplicate => "duplicate",
                Ok(_) => "stored",
                Err(_) => "refused",
            };
            metrics::counter!(names::STORE_APPENDS, "outcome" => outcome).increment(1);
        }
        let answers: Answers = replies.into_iter().zip(outcomes).collect();
        match &syncer {
            // Answered once durable. The sync task only stops with the writer, so a refusal here is a bug;
            // the callers then learn that the outcome is unknown.
            Some(syncer) => {
                if let Err(mpsc::error::SendError(answers)) = syncer.send(answers) {
                    answer_all(answers, &StoreError::Unavailable("the append sync task has stopped".into()));
                }
            }
            None => answer(answers),
        }
    }
}

/// Answers committed batches once a sync begun after their commits returned: every batch waiting when a
/// sync begins is answered by it.
async fn sync_batches(
    log: Arc<WalSync>,
    mut waiting: mpsc::UnboundedReceiver<Answers>,
    failed: Arc<OnceLock<StoreError>>,
) {
    let mut batches = Vec::new();
    while waiting.recv_many(&mut batches, usize::MAX).await > 0 {
        let started = tokio::time::Instant::now();
        let result = match failed.get() {
            Some(error) => Err(error.clone()),
            None => log.sync().await,
        };
        metrics::histogram!(names::STORE_WAL_SYNC_DURATION).record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => batches.drain(..).for_each(answer),
            Err(error) => {
                if failed.set(error.clone()).is_ok() {
                    tracing::error!(%error, "the database could not be made durable: every append fails until restart");
                }
                batches.drain(..).for_each(|answers| answer_all(answers, &error));
            }
        }
    }
}

fn answer(answers: Answers) {
    for (reply, outcome) in answers {
        // A caller that went away no longer wants its answer.
        let _ = reply.send(outcome);
    }
}

/// Answers every caller with `error`, whatever its batch decided: nothing of it is known to be durable.
fn answer_all(answers: Answers, error: &StoreError) {
    for (reply, _) in answers {
        let _ = reply.send(Err(error.clone()));
    }
}

/// One outcome per append of `batch`, in order.
async fn write_batch(backend: &dyn AppendBackend, batch: &[Checked]) -> Vec<Outcome> {
    match backend.write(batch).await {
        Ok(outcomes) => outcomes,
        Err(BatchFailure::Batch(error)) => vec![Err(error); batch.len()],
        Err(BatchFailure::Request(error)) if batch.len() == 1 => vec![Err(error)],
        Err(BatchFailure::Request(error)) => {
            tracing::debug!(%error, appends = batch.len(), "a batch failed on one append: one transaction each");
            let mut outcomes = Vec::with_capacity(batch.len());
            for (i, checked) in batch.iter().enumerate() {
                match backend.write(std::slice::from_ref(checked)).await {
                    Ok(mut outcome) => outcomes.push(outcome.pop().unwrap_or_else(|| Err(lost_outcome()))),
                    Err(BatchFailure::Request(error)) => outcomes.push(Err(error)),
                    Err(BatchFailure::Batch(error)) => {
                        outcomes.extend(std::iter::repeat_n(Err(error), batch.len() - i));
                        break;
                    }
                }
            }
            outcomes
        }
    }
}

fn lost_outcome() -> StoreError {
    StoreError::Unavailable("the batch answered no outcome for an append".into())
}

/// What a batch knows of a conversation it appends to (its row is locked).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conversation {
    pub last_seq: i64,
    pub shard: i32,
}

/// A new row of `events`.
#[derive(Debug, Clone)]
pub(crate) struct NewEventRow {
    pub conversation_id: String,
    pub seq: i64,
    pub at_ms: i64,
    pub author_role: String,
    pub author_id: String,
    /// `None` when the event has no client message id.
    pub client_msg_id: Option<String>,
    pub kind: String,
    pub payload_json: String,
    /// The fence epoch the event is written under.
    pub epoch: i64,
}

/// The change of a conversation's summary row once a batch's appends to it are applied in order.
#[derive(Debug, Clone)]
pub(crate) struct SummaryRow {
    pub conversation_id: String,
    pub last_seq: i64,
    /// `None` keeps the state (no update, or only updates with an empty state).
    pub state: Option<String>,
    /// `None` keeps the group (no update, or only updates with an empty group).
    pub group_id: Option<String>,
    /// `None` keeps the queue time (no update, or only updates with a queue time of 0).
    pub queued_at_ms: Option<i64>,
    /// `None` keeps owner, times and offer (no update in the batch).
    pub fields: Option<SummaryFields>,
}

/// The summary fields an update always replaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SummaryFields {
    pub owner_agent_id: String,
    pub accepted_at_ms: i64,
    pub closed_at_ms: i64,
    pub offer_agent_id: String,
    pub offer_expires_at_ms: i64,
    /// The `offered_to` column: a JSON array.
    pub offered_to: String,
}

impl SummaryRow {
    fn apply(&mut self, update: &ConversationUpdate) {
        if !update.state.is_empty() {
            self.state = Some(update.state.clone());
        }
        if !update.group_id.is_empty() {
            self.group_id = Some(update.group_id.clone());
        }
        if update.queued_at_ms != 0 {
            self.queued_at_ms = Some(update.queued_at_ms);
        }
        self.fields = Some(SummaryFields {
            owner_agent_id: update.owner_agent_id.clone(),
            accepted_at_ms: update.accepted_at_ms,
            closed_at_ms: update.closed_at_ms,
            offer_agent_id: update.offer_agent_id.clone(),
            offer_expires_at_ms: update.offer_expires_at_ms,
            offered_to: agents_to_json(&update.offered_to),
        });
    }
}

/// What a batch reads before it decides its appends.
#[derive(Debug, Default)]
pub(crate) struct BatchReads {
    /// The current epoch of the batch's shards that have a lease row.
    pub epochs: HashMap<i32, i64>,
    /// The license row (`Some(None)`: missing) when an append under a current fence may create or finish a
    /// conversation; a backend may read it for stale appends too, it is then ignored.
    pub license_row: Option<Option<(i64, i64)>>,
    /// The existing conversations of at least every append under a current fence.
    pub conversations: HashMap<String, Conversation>,
    /// The stored events with the client message ids of at least every append under a current fence to a
    /// conversation that exists.
    pub stored: Vec<EventRow>,
}

/// The statements of an append batch, inside one transaction, on one backend.
#[async_trait]
pub(crate) trait AppendTx: Send {
    /// Everything the batch reads before deciding (see [`BatchReads`]).
    async fn read_batch(&mut self, batch: &[Checked]) -> Result<BatchReads, sqlx::Error>;
    /// Each existing conversation of `ids` (sorted, distinct), locked until the transaction ends.
    async fn conversations(&mut self, ids: &[&str]) -> Result<HashMap<String, Conversation>, sqlx::Error>;
    /// The stored events with these (conversation, client message id) keys.
    async fn stored_events(&mut self, keys: &[(&str, &str)]) -> Result<Vec<EventRow>, sqlx::Error>;
    /// Inserts the conversation; `false` when it exists already (inserted meanwhile by another writer).
    async fn insert_conversation(&mut self, id: &str, create: &ConversationRecord) -> Result<bool, sqlx::Error>;
    async fn insert_events(&mut self, events: &[NewEventRow]) -> Result<(), sqlx::Error>;
    async fn update_summaries(&mut self, summaries: &[SummaryRow]) -> Result<(), sqlx::Error>;
    /// The conversations of `ids` (sorted, distinct) that hold a license permit.
    async fn held_permits(&mut self, ids: &[&str]) -> Result<HashSet<String>, sqlx::Error>;
    /// Sets `used` if it still is `used_before`, inserts the permits taken and deletes those given back.
    /// `false` when the stored count or permits were not as the batch read them: the batch must fail (its
    /// transaction is rolled back).
    async fn write_license(&mut self, changes: &LicenseChanges) -> Result<bool, sqlx::Error>;
}

/// The appends of a batch, decided in order and written inside the caller's transaction. The outcomes are
/// valid only if the caller then commits.
pub(crate) async fn run_batch(tx: &mut dyn AppendTx, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure> {
    let BatchReads { epochs, license_row, mut conversations, stored: stored_rows } = tx.read_batch(batch).await?;

    // Only the appends under a current fence are decided.
    let current = |checked: &&Checked| epochs.get(&checked.shard) == Some(&checked.epoch);
    // A backend may have read the license row for appends that turned out stale: only current ones use it.
    let license_row =
        license_row.filter(|_| batch.iter().filter(current).any(|checked| needs_license(&checked.request)));
    let mut stored = Stored::default();
    stored.add(stored_rows)?;

    let license = match license_row {
        Some(row) => {
            let finishing: Vec<&str> = batch
                .iter()
                .filter(current)
                .filter(|checked| {
                    finishes(&checked.request) && conversations.contains_key(&checked.request.conversation_id)
                })
                .map(|checked| checked.request.conversation_id.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let held = if finishing.is_empty() { HashSet::new() } else { tx.held_permits(&finishing).await? };
            Some(BatchLicense::new(row, held).map_err(BatchFailure::Batch)?)
        }
        None => None,
    };

    let complete = conversations.keys().cloned().collect();
    let mut state = BatchState {
        conversations: &mut conversations,
        stored,
        complete,
        events: Vec::new(),
        summaries: BTreeMap::new(),
        license,
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for checked in batch {
        if !current(&checked) {
            outcomes.push(Err(StoreError::StaleEpoch { shard: checked.shard.unsigned_abs() }));
            continue;
        }
        outcomes.push(decide(tx, checked, &mut state).await?);
    }
    if !state.events.is_empty() {
        tx.insert_events(&state.events).await?;
    }
    if !state.summaries.is_empty() {
        let summaries: Vec<SummaryRow> = state.summaries.into_values().collect();
        tx.update_summaries(&summaries).await?;
    }
    if let Some(changes) = state.license.and_then(BatchLicense::into_changes)
        && !tx.write_license(&changes).await?
    {
        // Impossible under the row lock; should it happen anyway, nothing of the batch is committed.
        return Err(BatchFailure::Batch(StoreError::Unavailable("the license count changed under a batch".into())));
    }
    Ok(outcomes)
}

/// The events a batch has seen stored (read, or written earlier in the batch), by (conversation, client
/// message id).
#[derive(Default)]
struct Stored(HashMap<(String, String), EventRecord>);

impl Stored {
    fn add(&mut self, rows: Vec<EventRow>) -> Result<(), StoreError> {
        for row in rows {
            let event = event_from_row(row)?;
            self.0.insert((event.conversation_id.clone(), event.client_msg_id.clone()), event);
        }
        Ok(())
    }
}

struct BatchState<'a> {
    conversations: &'a mut HashMap<String, Conversation>,
    stored: Stored,
    /// The conversations whose stored events `stored` knows for every client id of the batch: those read
    /// at the start of the batch, and those the batch created.
    complete: HashSet<String>,
    events: Vec<NewEventRow>,
    summaries: BTreeMap<String, SummaryRow>,
    /// The license row, when the batch may create or finish a conversation.
    license: Option<BatchLicense>,
}

/// Whether an append may take or give back a license permit.
pub(crate) fn needs_license(request: &AppendRequest) -> bool {
    request.create.is_some() || finishes(request)
}

pub(crate) fn client_msg_ids(request: &AppendRequest) -> impl Iterator<Item = &str> {
    request.events.iter().map(|event| event.client_msg_id.as_str()).filter(|cid| !cid.is_empty())
}

/// One append under a current fence.
async fn decide(tx: &mut dyn AppendTx, checked: &Checked, state: &mut BatchState<'_>) -> Result<Outcome, BatchFailure> {
    let request = &checked.request;
    let id = request.conversation_id.as_str();
    if !state.conversations.contains_key(id) {
        let Some(create) = &request.create else {
            return Ok(Err(StoreError::NotFound(id.to_owned())));
        };
        let shard = shard_to_i32(create.shard)?;
        if let Err(refusal) = check_shard(id, shard, checked.shard).and_then(|()| check_distinct_ids(request)) {
            return Ok(Err(refusal));
        }
        let admit = may_admit(request);
        if admit {
            let Some(license) = state.license.as_mut() else {
                return Err(BatchFailure::Batch(StoreError::Invalid("a create in a batch without the license".into())));
            };
            if let Err(refusal) = license.admit(id, &create.tenant_id, create.created_at_ms) {
                return Ok(Err(refusal));
            }
        }
        if tx.insert_conversation(id, create).await? {
            state.conversations.insert(id.to_owned(), Conversation { last_seq: 0, shard });
            state.complete.insert(id.to_owned());
        } else {
            // Created by another writer after this batch looked (every create takes the license lock
            // first, so this cannot happen with this store; kept for safety): no permit of its own, lock it
            // and read it as it is, with the permit the other writer took.
            if let Some(license) = state.license.as_mut().filter(|_| admit) {
                license.undo_admit(id);
            }
            let found = tx.conversations(&[id]).await?;
            let Some(conversation) = found.get(id) else {
                return Ok(Err(StoreError::NotFound(id.to_owned())));
            };
            state.conversations.insert(id.to_owned(), *conversation);
            if let Some(license) = state.license.as_mut()
                && tx.held_permits(&[id]).await?.contains(id)
            {
                license.note_held(id);
            }
        }
    }
    if !state.complete.contains(id) {
        // Each append to such a conversation reads its own client ids.
        let keys: Vec<(&str, &str)> = client_msg_ids(request).map(|cid| (id, cid)).collect();
        if !keys.is_empty() {
            state.stored.add(tx.stored_events(&keys).await?)?;
        }
    }
    let Some(conversation) = state.conversations.get_mut(id) else {
        return Ok(Err(StoreError::NotFound(id.to_owned())));
    };
    if let Err(refusal) = check_shard(id, conversation.shard, checked.shard) {
        return Ok(Err(refusal));
    }

    let mut duplicates: Vec<EventRecord> = client_msg_ids(request)
        .filter_map(|cid| state.stored.0.get(&(id.to_owned(), cid.to_owned())).cloned())
        .collect();
    if !duplicates.is_empty() {
        duplicates.sort_unstable_by_key(|event| event.seq);
        duplicates.dedup_by_key(|event| event.seq);
        return Ok(Ok(AppendResponse {
            events: duplicates,
            duplicate: true,
            last_seq: to_u64(conversation.last_seq, "last_seq")?,
        }));
    }
    if let Err(refusal) = check_distinct_ids(request) {
        return Ok(Err(refusal));
    }

    let mut stored = Vec::with_capacity(request.events.len());
    let mut seq = conversation.last_seq;
    for event in &request.events {
        seq += 1;
        let record = stored_record(id, to_u64(seq, "seq")?, event);
        state.events.push(NewEventRow {
            conversation_id: id.to_owned(),
            seq,
            at_ms: event.at_ms,
            author_role: event.author_role.clone(),
            author_id: event.author_id.clone(),
            client_msg_id: (!event.client_msg_id.is_empty()).then(|| event.client_msg_id.clone()),
            kind: event.kind.clone(),
            payload_json: event.payload_json.clone(),
            epoch: checked.epoch,
        });
        if !event.client_msg_id.is_empty() {
            state.stored.0.insert((id.to_owned(), event.client_msg_id.clone()), record.clone());
        }
        stored.push(record);
    }
    if seq != conversation.last_seq || request.update.is_some() {
        let summary = state.summaries.entry(id.to_owned()).or_insert_with(|| SummaryRow {
            conversation_id: id.to_owned(),
            last_seq: seq,
            state: None,
            group_id: None,
            queued_at_ms: None,
            fields: None,
        });
        summary.last_seq = seq;
        if let Some(update) = &request.update {
            summary.apply(update);
        }
    }
    if finishes(request)
        && let Some(license) = state.license.as_mut()
    {
        license.release(id);
    }
    conversation.last_seq = seq;
    Ok(Ok(AppendResponse { events: stored, duplicate: false, last_seq: to_u64(seq, "last_seq")? }))
}

fn check_shard(id: &str, stored_shard: i32, fence_shard: i32) -> Result<(), StoreError> {
    if stored_shard != fence_shard {
        return Err(StoreError::Invalid(format!(
            "conversation {id} is on shard {stored_shard}, the fence is for shard {fence_shard}"
        )));
    }
    Ok(())
}

/// One client message id twice in one append is refused, as the unique index would.
fn check_distinct_ids(request: &AppendRequest) -> Result<(), StoreError> {
    let mut seen = HashSet::new();
    for cid in client_msg_ids(request) {
        if !seen.insert(cid) {
            return Err(StoreError::Invalid(format!(
                "constraint violated: client message id {cid} twice in one append to {}",
                request.conversation_id
            )));
        }
    }
    Ok(())
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
