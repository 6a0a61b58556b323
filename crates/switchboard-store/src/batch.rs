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
//! The writer is a task (PostgreSQL, [`Appender::start`]) or a thread that owns its connection (SQLite,
//! [`Appender::start_on_thread`], see `writer`). On SQLite a commit is not yet durable: the log is synced
//! (`wal`) before the batch's callers are answered, by the writer itself when no other append waits, else
//! by a sync thread while the writer goes on with the next batch; one sync answers every batch committed
//! before it began. A failed sync fails every append it was to answer and every append after it: what the
//! database holds is no longer known to be on the disk, and the store must be restarted (it then recovers
//! what the disk holds).

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

/// A SQL backend's side of group commit, async (PostgreSQL): run a batch in one transaction and commit
/// it durably.
#[async_trait]
pub(crate) trait AppendBackend: Send + Sync + 'static {
    /// Runs [`run_batch`] in one transaction and commits it; the outcomes only once it committed.
    async fn write(&self, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure>;
}

/// A SQL backend's side of group commit that runs on a thread of its own (SQLite, in the store's process).
pub(crate) trait BlockingAppendBackend: Send + 'static {
    /// Runs [`run_batch`] in one transaction and commits it; the outcomes only once it committed (durable
    /// only once the log is synced, when the writer was started with one).
    fn write(&mut self, batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure>;
    /// Puts the connection back in order after a batch panicked (rolls back a transaction left open).
    fn recover(&mut self);
    /// Why the connection could not be put back in order after a failed batch, if it could not (its
    /// transaction neither rolled back nor dropped with the connection, which could not be opened again):
    /// every later batch would fail, and a restart is what recovers it.
    fn broken(&self) -> Option<StoreError>;
}

/// The answers of a committed batch, waiting for it to be durable.
type Answers = Vec<(oneshot::Sender<Outcome>, Outcome)>;

struct Pending {
    checked: Checked,
    reply: oneshot::Sender<Outcome>,
}

enum Command {
    Append(Box<Pending>),
    /// Stop once every append queued before it is answered; answered once stopped.
    Close(oneshot::Sender<()>),
}

/// The queue in front of the writer. Cloning shares the queue; the writer stops when it is closed or the
/// last clone is dropped.
#[derive(Clone)]
pub(crate) struct Appender {
    queue: mpsc::Sender<Command>,
    /// Set once a sync of the log failed (SQLite): every append fails from then on, until a restart.
    failed: Option<Arc<OnceLock<StoreError>>>,
}

impl Appender {
    /// Starts the writer as a task on the current tokio runtime; a caller is answered once its batch
    /// committed.
    pub(crate) fn start(backend: Arc<dyn AppendBackend>, options: GroupCommit) -> Self {
        let max_batch = options.max_batch.max(1);
        let (queue, receiver) = mpsc::channel(max_batch * QUEUE_PER_BATCH);
        tokio::spawn(write_batches(backend, receiver, max_batch));
        Appender { queue, failed: None }
    }

    /// Starts the writer on a thread of its own, which owns `backend`. With `log`, a committed batch is
    /// durable only once the log is synced, and its callers are answered after that (see the module
    /// documentation); without, once it committed. The thread enters `runtime`, for the tasks the backend
    /// spawns.
    pub(crate) fn start_on_thread<B: BlockingAppendBackend>(
        backend: B,
        options: GroupCommit,
        log: Option<Arc<WalSync>>,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        let max_batch = options.max_batch.max(1);
        let (queue, receiver) = mpsc::channel(max_batch * QUEUE_PER_BATCH);
        let failed: Arc<OnceLock<StoreError>> = Arc::default();
        let syncer = log.map(|log| SyncThread::start(log, failed.clone())).transpose()?;
        metrics::gauge!(names::STORE_WRITER_FAILED).set(0.0);
        let thread_failed = failed.clone();
        std::thread::Builder::new().name("store-appender".into()).spawn(move || {
            let _runtime = runtime.enter();
            write_batches_on_thread(backend, syncer, thread_failed, receiver, max_batch);
        })?;
        Ok(Appender { queue, failed: Some(failed) })
    }

    /// Why every append fails until the store is restarted (a sync of the log failed, or the writer's
    /// connection could not be put back in order after a failed batch), if it does.
    pub(crate) fn failure(&self) -> Option<StoreError> {
        self.failed.as_ref().and_then(|failed| failed.get().cloned())
    }

    /// Queues an append for the writer and waits for its outcome. How long that takes is recorded as
    /// [`names::STORE_APPEND_DURATION`]: what a message waits for before it is acknowledged, which the
    /// batch's own duration leaves out (the wait for the writer, the sync of the log).
    pub(crate) async fn append(&self, request: AppendRequest) -> Outcome {
        let checked = check(request)?;
        let started = tokio::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Command::Append(Box::new(Pending { checked, reply })))
            .await
            .map_err(|_| StoreError::Unavailable("the append writer has stopped".into()))?;
        let outcome =
            answer.await.map_err(|_| StoreError::Unavailable("the append writer stopped before answering".into()))?;
        metrics::histogram!(names::STORE_APPEND_DURATION).record(started.elapsed().as_secs_f64());
        outcome
    }

    /// Stops the writer once the appends queued before are answered (and, on a thread, once its connection
    /// is closed); later appends fail.
    pub(crate) async fn close(&self) {
        let (done, stopped) = oneshot::channel();
        if self.queue.send(Command::Close(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

/// The appends of some commands received, up to the first `Close`; the appends after it are refused.
/// Returns the closes received, each to be answered once the writer stopped (none: go on).
fn take_batch(commands: &mut Vec<Command>) -> (Vec<Checked>, Vec<oneshot::Sender<Outcome>>, Vec<oneshot::Sender<()>>) {
    let mut batch = Vec::with_capacity(commands.len());
    let mut replies = Vec::with_capacity(commands.len());
    let mut closes = Vec::new();
    for command in commands.drain(..) {
        match command {
            Command::Append(pending) if closes.is_empty() => {
                batch.push(pending.checked);
                replies.push(pending.reply);
            }
            Command::Append(pending) => {
                let _ = pending.reply.send(Err(closed()));
            }
            Command::Close(done) => closes.push(done),
        }
    }
    (batch, replies, closes)
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

/// Once the writer stopped: refuses what is still queued, then answers every close.
fn stopped(receiver: &mut mpsc::Receiver<Command>, mut closes: Vec<oneshot::Sender<()>>) {
    receiver.close();
    while let Ok(command) = receiver.try_recv() {
        match command {
            Command::Append(pending) => {
                let _ = pending.reply.send(Err(closed()));
            }
            Command::Close(done) => closes.push(done),
        }
    }
    for done in closes {
        let _ = done.send(());
    }
}

async fn write_batches(backend: Arc<dyn AppendBackend>, mut receiver: mpsc::Receiver<Command>, max_batch: usize) {
    let mut commands = Vec::with_capacity(max_batch);
    while receiver.recv_many(&mut commands, max_batch).await > 0 {
        let (batch, replies, closes) = take_batch(&mut commands);
        if !batch.is_empty() {
            let n = batch.len();
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
            record_batch(started, &outcomes);
            answer(replies.into_iter().zip(outcomes).collect());
        }
        if !closes.is_empty() {
            stopped(&mut receiver, closes);
            return;
        }
    }
}

/// The writer's loop on its thread. A batch's callers are answered once it is durable: at once without a
/// log; with one, after a sync begun after its commit, made by the writer itself when no other append
/// waits (there is nothing better to do meanwhile, and no hand-over to wait for), else by the sync thread
/// while the writer goes on with the next batch. A failed sync fails every append after it.
fn write_batches_on_thread<B: BlockingAppendBackend>(
    mut backend: B,
    syncer: Option<SyncThread>,
    failed: Arc<OnceLock<StoreError>>,
    mut receiver: mpsc::Receiver<Command>,
    max_batch: usize,
) {
    let mut commands = Vec::with_capacity(max_batch);
    let mut closes = Vec::new();
    while closes.is_empty() && receiver.blocking_recv_many(&mut commands, max_batch) > 0 {
        let (batch, replies, closing) = take_batch(&mut commands);
        closes = closing;
        if batch.is_empty() {
            continue;
        }
        if let Some(error) = failed.get() {
            replies.into_iter().for_each(|reply| drop(reply.send(Err(error.clone()))));
            continue;
        }
        let n = batch.len();
        let started = tokio::time::Instant::now();
        let outcomes =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_batch_now(&mut backend, &batch))) {
                Ok(outcomes) => outcomes,
                Err(_) => {
                    tracing::error!("an append batch failed unexpectedly");
                    backend.recover();
                    vec![Err(StoreError::Unavailable("the append batch failed unexpectedly".into())); n]
                }
            };
        record_batch(started, &outcomes);
        if let Some(error) = backend.broken() {
            fail_for_good(&failed, error);
        }
        let answers: Answers = replies.into_iter().zip(outcomes).collect();
        match &syncer {
            Some(syncer) if receiver.is_empty() && closes.is_empty() => syncer.sync_here(answers),
            Some(syncer) => syncer.hand_over(answers),
            None => answer(answers),
        }
    }
    // Every batch committed is answered, and the connection closed, before the close is.
    if let Some(syncer) = syncer {
        syncer.stop();
    }
    drop(backend);
    stopped(&mut receiver, closes);
}

/// The thread that syncs the log for the writer, and the writer's way to sync it itself.
struct SyncThread {
    log: Arc<WalSync>,
    failed: Arc<OnceLock<StoreError>>,
    waiting: std::sync::mpsc::Sender<Answers>,
    thread: std::thread::JoinHandle<()>,
}

impl SyncThread {
    fn start(log: Arc<WalSync>, failed: Arc<OnceLock<StoreError>>) -> std::io::Result<Self> {
        let (waiting, batches) = std::sync::mpsc::channel();
        let (thread_log, thread_failed) = (log.clone(), failed.clone());
        let thread = std::thread::Builder::new()
            .name("store-log-sync".into())
            .spawn(move || sync_batches(&thread_log, &batches, &thread_failed))?;
        Ok(SyncThread { log, failed, waiting, thread })
    }

    /// Answers once a sync begun now returned.
    fn sync_here(&self, answers: Answers) {
        sync_and_answer(&self.log, &self.failed, vec![answers]);
    }

    /// Answers once a sync of the sync thread, begun after now, returned.
    fn hand_over(&self, answers: Answers) {
        // The thread only stops when the writer stops it; should it have died all the same, the callers
        // learn that the outcome is unknown.
        if let Err(std::sync::mpsc::SendError(answers)) = self.waiting.send(answers) {
            answer_all(answers, &StoreError::Unavailable("the append sync thread has stopped".into()));
        }
    }

    /// Waits for the batches handed over to be answered.
    fn stop(self) {
        drop(self.waiting);
        if self.thread.join().is_err() {
            tracing::error!("the append sync thread panicked");
        }
    }
}

/// The sync thread: answers committed batches once a sync begun after their commits returned; every
/// batch waiting when a sync begins is answered by it.
fn sync_batches(log: &WalSync, waiting: &std::sync::mpsc::Receiver<Answers>, failed: &OnceLock<StoreError>) {
    while let Ok(first) = waiting.recv() {
        let mut batches = vec![first];
        batches.extend(waiting.try_iter());
        sync_and_answer(log, failed, batches);
    }
}

fn sync_and_answer(log: &WalSync, failed: &OnceLock<StoreError>, batches: Vec<Answers>) {
    let started = tokio::time::Instant::now();
    let result = match failed.get() {
        Some(error) => Err(error.clone()),
        None => log.sync(),
    };
    metrics::histogram!(names::STORE_WAL_SYNC_DURATION).record(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => batches.into_iter().for_each(answer),
        Err(error) => {
            fail_for_good(failed, error.clone());
            batches.into_iter().for_each(|answers| answer_all(answers, &error));
        }
    }
}

/// From now on every append fails with `error` until the store is restarted, and health checks say so
/// ([`Appender::failure`], the `switchboard_store_writer_failed` gauge). The first failure is the one kept.
fn fail_for_good(failed: &OnceLock<StoreError>, error: StoreError) {
    if failed.set(error.clone()).is_ok() {
        metrics::gauge!(names::STORE_WRITER_FAILED).set(1.0);
        tracing::error!(%error, "the append writer cannot go on: every append fails until restart");
    }
}

fn record_batch(started: tokio::time::Instant, outcomes: &[Outcome]) {
    tracing::trace!(appends = outcomes.len(), "group commit");
    metrics::histogram!(names::STORE_APPEND_BATCH_DURATION).record(started.elapsed().as_secs_f64());
    metrics::histogram!(names::STORE_APPEND_BATCH_SIZE).record(outcomes.len() as f64);
    for outcome in outcomes {
        let outcome = match outcome {
            Ok(response) if response.duplicate => "duplicate",
            Ok(_) => "stored",
            Err(_) => "refused",
        };
        metrics::counter!(names::STORE_APPENDS, "outcome" => outcome).increment(1);
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
    let first = backend.write(batch).await;
    let mut outcomes = OneByOne::after(first, batch.len());
    while let Some(i) = outcomes.next_alone() {
        outcomes.record(backend.write(std::slice::from_ref(&batch[i])).await);
    }
    outcomes.into_outcomes()
}

/// [`write_batch`] on the writer's thread.
fn write_batch_now<B: BlockingAppendBackend>(backend: &mut B, batch: &[Checked]) -> Vec<Outcome> {
    let first = backend.write(batch);
    let mut outcomes = OneByOne::after(first, batch.len());
    while let Some(i) = outcomes.next_alone() {
        outcomes.record(backend.write(std::slice::from_ref(&batch[i])));
    }
    outcomes.into_outcomes()
}

/// The outcomes of a batch whose write failed on one request's data, collected by running its appends
/// again one transaction each, so that only the culprit gets the error; a failure of the database itself
/// fails the rest.
struct OneByOne {
    outcomes: Vec<Outcome>,
    /// The appends still to run alone; none once the batch is decided.
    len: usize,
}

impl OneByOne {
    fn after(first: Result<Vec<Outcome>, BatchFailure>, len: usize) -> Self {
        let done = |outcomes| OneByOne { outcomes, len: 0 };
        match first {
            Ok(outcomes) => done(outcomes),
            Err(BatchFailure::Batch(error)) => done(vec![Err(error); len]),
            Err(BatchFailure::Request(error)) if len == 1 => done(vec![Err(error)]),
            Err(BatchFailure::Request(error)) => {
                tracing::debug!(%error, appends = len, "a batch failed on one append: one transaction each");
                OneByOne { outcomes: Vec::with_capacity(len), len }
            }
        }
    }

    /// The index of the next append to run alone.
    fn next_alone(&self) -> Option<usize> {
        (self.outcomes.len() < self.len).then_some(self.outcomes.len())
    }

    fn record(&mut self, result: Result<Vec<Outcome>, BatchFailure>) {
        match result {
            Ok(mut outcome) => self.outcomes.push(outcome.pop().unwrap_or_else(|| Err(lost_outcome()))),
            Err(BatchFailure::Request(error)) => self.outcomes.push(Err(error)),
            Err(BatchFailure::Batch(error)) => {
                let rest = self.len - self.outcomes.len();
                self.outcomes.extend(std::iter::repeat_n(Err(error), rest));
            }
        }
    }

    fn into_outcomes(self) -> Vec<Outcome> {
        self.outcomes
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
    /// `None` keeps owner, times, offer and delivery marks (no update in the batch).
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
    /// The delivery marks' columns: -1 when the update has none (a router from before them).
    pub customer_delivered_up_to: i64,
    pub agent_delivered_up_to: i64,
    /// The `customer_away` column (0 or 1); `None` keeps the stored one (updates from routers from before it).
    pub customer_away: Option<i64>,
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
        let earlier_away = self.fields.as_ref().and_then(|fields| fields.customer_away);
        self.fields = Some(SummaryFields {
            owner_agent_id: update.owner_agent_id.clone(),
            accepted_at_ms: update.accepted_at_ms,
            closed_at_ms: update.closed_at_ms,
            offer_agent_id: update.offer_agent_id.clone(),
            offer_expires_at_ms: update.offer_expires_at_ms,
            offered_to: agents_to_json(&update.offered_to),
            customer_delivered_up_to: delivery_mark(update, update.customer_delivered_up_to),
            agent_delivered_up_to: delivery_mark(update, update.agent_delivered_up_to),
            customer_away: update.customer_away.map(i64::from).or(earlier_away),
        });
    }
}

/// A delivery mark's column value: -1 (not known) when the update does not have the marks.
fn delivery_mark(update: &ConversationUpdate, mark: u64) -> i64 {
    match update.delivery_marks_known {
        true => i64::try_from(mark).unwrap_or(i64::MAX),
        false => -1,
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

/// The statements of an append batch, inside one transaction, on one backend. A statement's failure is
/// a [`BatchFailure`]: the request's (a constraint, a value refused) or the batch's.
#[async_trait]
pub(crate) trait AppendTx: Send {
    /// Everything the batch reads before deciding (see [`BatchReads`]).
    async fn read_batch(&mut self, batch: &[Checked]) -> Result<BatchReads, BatchFailure>;
    /// Each existing conversation of `ids` (sorted, distinct), locked until the transaction ends.
    async fn conversations(&mut self, ids: &[&str]) -> Result<HashMap<String, Conversation>, BatchFailure>;
    /// The stored events with these (conversation, client message id) keys.
    async fn stored_events(&mut self, keys: &[(&str, &str)]) -> Result<Vec<EventRow>, BatchFailure>;
    /// Inserts the conversation; `false` when it exists already (inserted meanwhile by another writer).
    async fn insert_conversation(&mut self, id: &str, create: &ConversationRecord) -> Result<bool, BatchFailure>;
    async fn insert_events(&mut self, events: &[NewEventRow]) -> Result<(), BatchFailure>;
    async fn update_summaries(&mut self, summaries: &[SummaryRow]) -> Result<(), BatchFailure>;
    /// The conversations of `ids` (sorted, distinct) that hold a license permit.
    async fn held_permits(&mut self, ids: &[&str]) -> Result<HashSet<String>, BatchFailure>;
    /// Sets `used` if it still is `used_before`, inserts the permits taken and deletes those given back.
    /// `false` when the stored count or permits were not as the batch read them: the batch must fail (its
    /// transaction is rolled back).
    async fn write_license(&mut self, changes: &LicenseChanges) -> Result<bool, BatchFailure>;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use switchboard_proto::internal::v1::Fence;

    use super::*;

    /// A backend whose every batch fails on the database, and whose connection cannot be put back in order
    /// after its first failure when `breaks`.
    struct FailingBackend {
        breaks: bool,
        batches: Arc<AtomicUsize>,
        broken: Option<StoreError>,
    }

    impl BlockingAppendBackend for FailingBackend {
        fn write(&mut self, _batch: &[Checked]) -> Result<Vec<Outcome>, BatchFailure> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            if self.breaks {
                self.broken = Some(StoreError::Unavailable("cannot reopen the database".into()));
            }
            Err(BatchFailure::Batch(StoreError::Unavailable("disk I/O error".into())))
        }

        fn recover(&mut self) {}

        fn broken(&self) -> Option<StoreError> {
            self.broken.clone()
        }
    }

    fn start(breaks: bool) -> (Appender, Arc<AtomicUsize>) {
        let batches = Arc::new(AtomicUsize::new(0));
        let backend = FailingBackend { breaks, batches: batches.clone(), broken: None };
        let appender =
            Appender::start_on_thread(backend, GroupCommit::default(), None, tokio::runtime::Handle::current())
                .unwrap();
        (appender, batches)
    }

    fn request(id: &str) -> AppendRequest {
        AppendRequest {
            fence: Some(Fence { shard: 1, epoch: 1 }),
            conversation_id: id.into(),
            create: None,
            events: Vec::new(),
            update: None,
        }
    }

    /// A batch that fails, its connection put back in order, fails alone: the writer is not failed, and the
    /// next batch is tried.
    #[tokio::test]
    async fn a_failed_batch_fails_only_its_own_appends() {
        let (appender, batches) = start(false);
        let first = appender.append(request("c1")).await;
        assert!(matches!(first, Err(StoreError::Unavailable(ref why)) if why == "disk I/O error"), "{first:?}");
        assert_eq!(appender.failure(), None);
        let next = appender.append(request("c2")).await;
        assert!(matches!(next, Err(StoreError::Unavailable(ref why)) if why == "disk I/O error"), "{next:?}");
        assert_eq!(batches.load(Ordering::SeqCst), 2, "the next batch reached the database");
        appender.close().await;
    }

    /// A batch that fails and leaves the connection out of order fails the writer until a restart, which
    /// health checks see; later appends are refused without reaching the database.
    #[tokio::test]
    async fn a_connection_left_out_of_order_fails_the_writer_for_good() {
        let (appender, batches) = start(true);
        let first = appender.append(request("c1")).await;
        assert!(matches!(first, Err(StoreError::Unavailable(ref why)) if why == "disk I/O error"), "{first:?}");
        let failure = appender.failure();
        assert!(
            matches!(failure, Some(StoreError::Unavailable(ref why)) if why == "cannot reopen the database"),
            "{failure:?}"
        );
        let later = appender.append(request("c2")).await;
        assert!(
            matches!(later, Err(StoreError::Unavailable(ref why)) if why == "cannot reopen the database"),
            "{later:?}"
        );
        assert_eq!(batches.load(Ordering::SeqCst), 1, "no batch reached the database after the failure");
        appender.close().await;
    }
}
