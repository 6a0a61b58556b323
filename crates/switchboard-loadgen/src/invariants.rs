//! The invariant checkers, fed as the run goes:
//!
//! - [`SeqChecker`]: on one socket, the events of a conversation arrive in increasing seq, without a
//!   duplicate and without a gap (docs/protocol.md, "A gap-free sequence");
//! - [`MessageLedger`]: every message acked `sent` is received exactly once by the other side;
//! - [`ChatLedger`]: every chat is accepted exactly once;
//! - [`license_round_violations`]: admitted chats never above the license limit, and exactly the limit
//!   when a round starts from no open chat.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How many violations a report lists (all of them are counted).
pub const MAX_VIOLATIONS_LISTED: usize = 50;

/// The violations seen: the first [`MAX_VIOLATIONS_LISTED`] described, all counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Violations {
    pub total: u64,
    pub first: Vec<String>,
}

impl Violations {
    pub fn add(&mut self, description: String) {
        self.total += 1;
        if self.first.len() < MAX_VIOLATIONS_LISTED {
            self.first.push(description);
        }
    }

    /// Adds the violations of another process.
    pub fn merge(&mut self, other: &Violations) {
        let listed = other.first.len() as u64;
        for description in &other.first {
            self.add(description.clone());
        }
        self.total += other.total.saturating_sub(listed);
    }
}

/// The seq order of the events one socket receives, per conversation.
#[derive(Debug, Default)]
pub struct SeqChecker {
    last_seq: HashMap<String, u64>,
}

impl SeqChecker {
    /// Checks the next event of `conversation` on this socket: its seq must follow the previous one's, and
    /// the first must be seq 1 (`created`). No scenario resumes: a socket follows a chat from its
    /// `chat.start` or `chat.accept`, and both are followed by the chat's events from its first.
    pub fn observe(&mut self, conversation: &str, seq: u64) -> Result<(), String> {
        let Some(last) = self.last_seq.get_mut(conversation) else {
            self.last_seq.insert(conversation.to_owned(), seq);
            return match seq {
                1 => Ok(()),
                _ => Err(format!("conversation {conversation}: seq {seq} was the first event on a socket, not seq 1")),
            };
        };
        let previous = *last;
        if seq == previous + 1 {
            *last = seq;
            Ok(())
        } else if seq <= previous {
            Err(format!("conversation {conversation}: seq {seq} received after seq {previous} on one socket"))
        } else {
            *last = seq;
            Err(format!("conversation {conversation}: seq {seq} received right after seq {previous} (a gap)"))
        }
    }
}

/// Which side of a chat sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Customer,
    Agent,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Customer => "customer",
            Side::Agent => "agent",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Customer => Side::Agent,
            Side::Agent => Side::Customer,
        }
    }
}

/// A message: the conversation, who sent it and the sender's `client_msg_id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageKey {
    pub conversation: String,
    pub sender: Side,
    pub client_msg_id: String,
}

#[derive(Debug)]
struct MessageEntry {
    intended: Instant,
    measured: bool,
    acked_seq: Option<u64>,
    received: u32,
}

/// What the ledger says of a message received by the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// The first copy: latency from `intended`, recorded when `measured` (out of the warm-up).
    First { intended: Instant, measured: bool },
    /// Received again: this is the `n`-th copy.
    Duplicate(u32),
    /// Not a message of this run.
    Unknown,
}

/// The messages of a run, from before they are sent to their receipt by the other side.
#[derive(Debug, Default)]
pub struct MessageLedger {
    entries: HashMap<MessageKey, MessageEntry>,
}

impl MessageLedger {
    /// A ledger with room for `messages` entries, so that it never grows during a run: growing a map of
    /// tens of thousands of entries, under the lock every connection's reader takes, stalled the whole load
    /// generator for tens of milliseconds (seen as the bare relay's p99.9).
    pub fn with_capacity(messages: usize) -> MessageLedger {
        MessageLedger { entries: HashMap::with_capacity(messages) }
    }

    /// A message about to be sent at its `intended` time.
    pub fn expect(&mut self, key: MessageKey, intended: Instant, measured: bool) {
        self.entries.insert(key, MessageEntry { intended, measured, acked_seq: None, received: 0 });
    }

    /// The server acked the message `sent` with `seq`; returns its intended time and whether it is measured.
    pub fn acked(&mut self, key: &MessageKey, seq: u64) -> Option<(Instant, bool)> {
        let entry = self.entries.get_mut(key)?;
        entry.acked_seq = Some(seq);
        Some((entry.intended, entry.measured))
    }

    /// The other side's socket received the message's event.
    pub fn received(&mut self, key: &MessageKey) -> Receipt {
        let Some(entry) = self.entries.get_mut(key) else { return Receipt::Unknown };
        entry.received += 1;
        match entry.received {
            1 => Receipt::First { intended: entry.intended, measured: entry.measured },
            n => Receipt::Duplicate(n),
        }
    }

    /// Messages acked `sent` and not received by the other side yet.
    pub fn undelivered(&self) -> usize {
        self.entries.values().filter(|entry| entry.acked_seq.is_some() && entry.received == 0).count()
    }

    /// Messages received although their ack never came (a timeout or a lost connection): not a violation.
    pub fn received_unacked(&self) -> usize {
        self.entries.values().filter(|entry| entry.acked_seq.is_none() && entry.received > 0).count()
    }

    /// Every message acked `sent` must have been received exactly once; none may be received twice.
    pub fn violations(&self) -> Vec<String> {
        let mut violations: Vec<String> = self
            .entries
            .iter()
            .filter_map(|(key, entry)| {
                let what = format!(
                    "message {} of the {} in conversation {}",
                    key.client_msg_id,
                    key.sender.name(),
                    key.conversation
                );
                match (entry.acked_seq, entry.received) {
                    (Some(seq), 0) => Some(format!(
                        "{what} was acked sent (seq {seq}) but the {} never received it",
                        key.sender.other().name()
                    )),
                    (_, received) if received > 1 => {
                        Some(format!("{what} was received {received} times by the {}", key.sender.other().name()))
                    }
                    _ => None,
                }
            })
            .collect();
        violations.sort();
        violations
    }
}

/// The accepts of the chats a run started.
#[derive(Debug, Default)]
pub struct ChatLedger {
    /// The agents whose `chat.accept` was acked, per conversation.
    accept_acks: HashMap<String, Vec<String>>,
    /// `accepted` events received by the chat's customer, per conversation this process started.
    accepted_events: HashMap<String, u32>,
}

impl ChatLedger {
    /// This process started the chat.
    pub fn started(&mut self, conversation: &str) {
        self.accepted_events.entry(conversation.to_owned()).or_default();
    }

    /// `agent`, of this process, had its `chat.accept` acked: a violation if another agent had theirs. (An
    /// agent who accepts a chat they own already is acked again: the same offer pushed twice, say.)
    pub fn accept_acked(&mut self, conversation: &str, agent: &str) -> Option<String> {
        let agents = self.accept_acks.entry(conversation.to_owned()).or_default();
        if agents.iter().any(|won| won == agent) {
            return None;
        }
        agents.push(agent.to_owned());
        (agents.len() > 1)
            .then(|| format!("conversation {conversation}: chat.accept acked to {}", agents.join(" and ")))
    }

    /// The chats an agent of this process won, for the check over every process (`report::check_merged`).
    pub fn won(&self) -> Vec<String> {
        let mut won: Vec<String> = self.accept_acks.keys().cloned().collect();
        won.sort();
        won
    }

    /// The chat's customer received an `accepted` event.
    pub fn accepted_event(&mut self, conversation: &str) -> Option<String> {
        let events = self.accepted_events.entry(conversation.to_owned()).or_default();
        *events += 1;
        (*events > 1).then(|| format!("conversation {conversation}: the customer saw {events} accepted events"))
    }

    /// Chats started here whose customer has seen them accepted.
    pub fn accepted_count(&self) -> usize {
        self.accepted_events.values().filter(|events| **events > 0).count()
    }

    pub fn started_count(&self) -> usize {
        self.accepted_events.len()
    }

    /// At the end: every chat started here must have been accepted (exactly once is checked as it goes).
    pub fn unaccepted(&self) -> Vec<String> {
        let mut waiting: Vec<String> = self
            .accepted_events
            .iter()
            .filter(|(_, events)| **events == 0)
            .map(|(conversation, _)| format!("conversation {conversation} was never accepted"))
            .collect();
        waiting.sort();
        waiting
    }
}

/// The figures of one round of the license scenario, summed over the processes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LicenseRound {
    pub round: u32,
    /// `chat.start` requests sent.
    pub attempted: u64,
    pub admitted: u64,
    /// Refused with `license_exhausted`.
    pub refused: u64,
    /// Failed otherwise (another error code, a timeout, a lost connection): the exact check is skipped.
    pub failed: u64,
    /// Admitted chats closed again by their customer at the end of the round.
    pub closed: u64,
    /// Admitted chats whose close the server refused (an error code): still open, holding their permit (a
    /// customer who goes away does not close their chat). A close that got no answer (a timeout, a lost
    /// connection) may have closed its chat or not.
    #[serde(default)]
    pub close_refused: u64,
    /// `--release vanish`: admitted chats whose customer went away, seen abandoned by the server (their
    /// permits back) within the deadline.
    #[serde(default)]
    pub abandoned: u64,
    /// `--release vanish`: admitted chats whose customer went away, not seen abandoned within the deadline
    /// (a violation): still open, holding their permits.
    #[serde(default)]
    pub not_abandoned: u64,
    /// Chats admitted by earlier rounds whose close was refused: still open when this round starts.
    #[serde(default)]
    pub open_before: u64,
    /// Starts and closes of earlier rounds that got no answer (or failed otherwise): each may hold a permit.
    #[serde(default)]
    pub failed_before: u64,
}

impl LicenseRound {
    /// The round after this one starts with the chats this one surely left open (closes refused, chats not
    /// abandoned), and with what it cannot tell: its failed starts, and its closes that got no answer.
    pub fn carried(&self) -> (u64, u64) {
        let given_up = self.closed + self.close_refused + self.abandoned + self.not_abandoned;
        let unanswered_closes = self.admitted.saturating_sub(given_up);
        let open = self.open_before + self.close_refused + self.not_abandoned;
        (open, self.failed_before + self.failed + unanswered_closes)
    }
}

/// The license invariants of one round: never above the limit, counting the chats earlier rounds left open;
/// exactly the limit (or every attempt, when fewer), less those still open, when the round starts from no
/// other open chat and nothing failed, in it or before it.
pub fn license_round_violations(limit: u64, round: &LicenseRound) -> Vec<String> {
    let mut violations = Vec::new();
    let open = round.admitted + round.open_before;
    if open > limit {
        let before = match round.open_before {
            0 => String::new(),
            n => format!(" while {n} admitted before were still open"),
        };
        violations.push(format!(
            "round {}: {} chats admitted{before}, above the limit of {limit}",
            round.round, round.admitted
        ));
    }
    let expected = round.attempted.min(limit.saturating_sub(round.open_before));
    if round.failed == 0 && round.failed_before == 0 && round.admitted != expected {
        let before = match round.open_before {
            0 => String::new(),
            n => format!(", less the {n} chats earlier rounds left open"),
        };
        violations.push(format!(
            "round {}: {} of {} chats admitted, expected exactly {expected} (limit {limit}{before}; precondition: \
             no open chat in the cluster when the run starts)",
            round.round, round.admitted, round.attempted
        ));
    }
    violations
}

#[cfg(test)]
#[path = "invariants_tests.rs"]
mod tests;
