//! What the test clients saw, shared by all of them: every acknowledged message, every event received (per
//! connection), every operation with its failed tries, and every non-retryable error.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::bail;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Who wrote a message, as stored in `events.author_role` / `author_id`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Author {
    pub role: String,
    pub id: String,
}

impl Author {
    pub fn customer() -> Author {
        Author { role: "customer".to_owned(), id: String::new() }
    }

    pub fn agent(id: &str) -> Author {
        Author { role: "agent".to_owned(), id: id.to_owned() }
    }
}

/// An acknowledged `message.send`.
#[derive(Debug, Clone)]
pub struct Ack {
    pub client: String,
    pub conversation: String,
    pub author: Author,
    pub client_msg_id: String,
    pub seq: u64,
    pub duplicate: bool,
    /// When the operation was first tried and when its ack arrived.
    pub started: Instant,
    pub acked: Instant,
}

/// A connection of a client began following a conversation after `after_seq`: the next event it is
/// written must be `after_seq + 1`.
#[derive(Debug, Clone)]
pub struct Following {
    pub client: String,
    pub connection: u64,
    pub conversation: String,
    pub after_seq: u64,
}

/// An `event` push.
#[derive(Debug, Clone)]
pub struct Received {
    pub client: String,
    pub connection: u64,
    pub conversation: String,
    pub seq: u64,
    pub kind: String,
    pub author: Author,
    pub client_msg_id: Option<String>,
}

/// One client operation, retried until it succeeded or failed for good.
#[derive(Debug, Clone)]
pub struct Operation {
    pub client: String,
    pub kind: String,
    pub started: Instant,
    /// The first failed try (retryable error, broken or unusable connection).
    pub first_failure: Option<Instant>,
    pub finished: Instant,
    pub tries: u32,
    /// What the failed tries got (the first few).
    pub errors: Vec<String>,
    pub succeeded: bool,
}

impl Operation {
    /// From the first try to success (or giving up): how long the client waited for it, failures or not.
    pub fn latency(&self) -> Duration {
        self.finished.saturating_duration_since(self.started)
    }

    /// From the first failed try to success: how long this client could not do this.
    pub fn unavailability(&self) -> Duration {
        self.first_failure.map(|first| self.finished.saturating_duration_since(first)).unwrap_or_default()
    }
}

/// Everything recorded so far.
#[derive(Debug, Clone, Default)]
pub struct LogData {
    pub acks: Vec<Ack>,
    pub following: Vec<Following>,
    pub received: Vec<Received>,
    pub operations: Vec<Operation>,
    /// Non-retryable errors and operations that gave up: a test under faults expects none.
    pub failures: Vec<String>,
}

impl LogData {
    /// The longest unavailability of a successful operation, and that operation.
    pub fn worst_unavailability(&self) -> Option<&Operation> {
        self.operations.iter().filter(|op| op.succeeded).max_by_key(|op| op.unavailability())
    }

    /// For each conversation with a message first tried at or after `since` and acknowledged, how long after
    /// `since` the first such ack came.
    pub fn continued_after(&self, since: Instant) -> BTreeMap<String, Duration> {
        let mut continued: BTreeMap<String, Duration> = BTreeMap::new();
        for ack in self.acks.iter().filter(|ack| ack.started >= since) {
            let delay = ack.acked.saturating_duration_since(since);
            continued
                .entry(ack.conversation.clone())
                .and_modify(|earliest| *earliest = (*earliest).min(delay))
                .or_insert(delay);
        }
        continued
    }

    /// The successful operation that took longest from its first try, failed tries or not.
    pub fn slowest(&self) -> Option<&Operation> {
        self.operations.iter().filter(|op| op.succeeded).max_by_key(|op| op.latency())
    }

    /// Operations that needed more than one try.
    pub fn retried(&self) -> impl Iterator<Item = &Operation> {
        self.operations.iter().filter(|op| op.tries > 1)
    }
}

/// The log shared by every client of a test; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ClientLog {
    data: Arc<Mutex<LogData>>,
    changed: Arc<Notify>,
}

impl ClientLog {
    pub fn new() -> ClientLog {
        ClientLog::default()
    }

    fn lock(&self) -> MutexGuard<'_, LogData> {
        self.data.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records something and wakes the waiters of [`ClientLog::wait_until`].
    pub fn record(&self, update: impl FnOnce(&mut LogData)) {
        update(&mut self.lock());
        self.changed.notify_waiters();
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> LogData {
        self.lock().clone()
    }

    /// Reads the log without copying it.
    pub fn read<T>(&self, read: impl FnOnce(&LogData) -> T) -> T {
        read(&self.lock())
    }

    /// Waits until `condition` holds on the log, re-checked at every change; fails after `deadline`.
    pub async fn wait_until(
        &self,
        what: &str,
        deadline: Duration,
        mut condition: impl FnMut(&LogData) -> bool,
    ) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if condition(&self.lock()) {
                return Ok(());
            }
            if tokio::time::timeout_at(end, changed).await.is_err() {
                bail!("{what}: not reached within {deadline:?}");
            }
        }
    }
}
