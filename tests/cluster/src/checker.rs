//! The invariant checker: reads PostgreSQL and the clients' logs after a run and lists every violation of
//!
//! - (a) [`Invariant::AckedStoredOnce`]: every acknowledged message is in `events` exactly once, at its acked seq;
//! - (b) [`Invariant::GapFreeSequence`]: per conversation the seqs are 1..=last_seq, no gap, no repeat, and
//!   `conversations.last_seq` agrees;
//! - (c) [`Invariant::UniqueClientMsgId`]: no client message id is stored twice per author per conversation;
//! - (d) [`Invariant::NoStrandedChat`]: every queued or active chat's shard has an unexpired lease held by a
//!   live router;
//! - (e) [`Invariant::OneNodePerEpoch`] (at most one node per granted `(shard, epoch)`),
//!   [`Invariant::LeasesRecorded`] (every lease held now is one of the recorded grants) and
//!   [`Invariant::FencedEpochs`] (every event carries an epoch granted for its conversation's shard, and the
//!   epochs of a conversation's events never go down);
//! - (f) [`Invariant::ClientViews`]: each connection was written a conversation's events from the seq it asked
//!   for, consecutively, each as stored.
//!
//! The checks themselves are a pure function of a [`Snapshot`] of the database (read by [`Db::snapshot`]) and
//! the [`LogData`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use anyhow::bail;

use crate::db::{ConversationRow, Db, EventRow, Lease, Snapshot};
use crate::log::{Author, LogData};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    AckedStoredOnce,
    GapFreeSequence,
    UniqueClientMsgId,
    NoStrandedChat,
    OneNodePerEpoch,
    LeasesRecorded,
    FencedEpochs,
    ClientViews,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.invariant, self.detail)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub conversations: usize,
    pub events: usize,
    pub acks: usize,
    pub received: usize,
    pub grants: usize,
}

/// How many violations of each invariant [`Report::ensure_ok`] prints.
const SHOWN_PER_INVARIANT: usize = 15;

impl Report {
    pub fn violated(&self, invariant: Invariant) -> bool {
        self.violations.iter().any(|violation| violation.invariant == invariant)
    }

    /// The invariants violated, each once.
    pub fn violated_invariants(&self) -> BTreeSet<Invariant> {
        self.violations.iter().map(|violation| violation.invariant).collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} conversations, {} events, {} acks, {} events received, {} lease grants checked",
            self.conversations, self.events, self.acks, self.received, self.grants
        )
    }

    /// Fails with the violations (the first few of each invariant) if there is any.
    pub fn ensure_ok(&self) -> anyhow::Result<()> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let mut text = format!("{} invariant violations ({}):\n", self.violations.len(), self.summary());
        for invariant in self.violated_invariants() {
            let of_this: Vec<&Violation> = self.violations.iter().filter(|v| v.invariant == invariant).collect();
            for violation in of_this.iter().take(SHOWN_PER_INVARIANT) {
                text.push_str(&format!("  {violation}\n"));
            }
            if of_this.len() > SHOWN_PER_INVARIANT {
                text.push_str(&format!("  … and {} more {invariant:?}\n", of_this.len() - SHOWN_PER_INVARIANT));
            }
        }
        bail!(text)
    }
}

/// Reads the database and checks everything; `live_routers` are the node ids of the routers running (and not
/// stopped) now.
pub async fn check(db: &Db, logs: &LogData, live_routers: &BTreeSet<String>) -> anyhow::Result<Report> {
    let snapshot = db.snapshot().await?;
    Ok(check_snapshot(&snapshot, logs, live_routers))
}

pub fn check_snapshot(snapshot: &Snapshot, logs: &LogData, live_routers: &BTreeSet<String>) -> Report {
    let mut violations = Vec::new();
    let mut violate = |invariant: Invariant, detail: String| violations.push(Violation { invariant, detail });
    check_acks(snapshot, logs, &mut violate);
    check_sequences(snapshot, &mut violate);
    check_client_msg_ids(snapshot, &mut violate);
    check_stranded(snapshot, live_routers, &mut violate);
    check_epochs(snapshot, &mut violate);
    check_client_views(snapshot, logs, &mut violate);
    Report {
        violations,
        conversations: snapshot.conversations.len(),
        events: snapshot.events.len(),
        acks: logs.acks.len(),
        received: logs.received.len(),
        grants: snapshot.grants.len(),
    }
}

type MessageKey<'a> = (&'a str, Author, &'a str);

fn author_of(event: &EventRow) -> Author {
    Author { role: event.author_role.clone(), id: event.author_id.clone() }
}

/// The seqs of stored messages by (conversation, author, client message id).
fn stored_messages(snapshot: &Snapshot) -> HashMap<MessageKey<'_>, Vec<u64>> {
    let mut stored: HashMap<MessageKey<'_>, Vec<u64>> = HashMap::new();
    for event in &snapshot.events {
        if let Some(client_msg_id) = &event.client_msg_id {
            stored.entry((&event.conversation_id, author_of(event), client_msg_id)).or_default().push(event.seq);
        }
    }
    stored
}

/// (a)
fn check_acks(snapshot: &Snapshot, logs: &LogData, violate: &mut impl FnMut(Invariant, String)) {
    let stored = stored_messages(snapshot);
    let mut seen = BTreeSet::new();
    for ack in &logs.acks {
        let key = (ack.conversation.as_str(), ack.author.clone(), ack.client_msg_id.as_str());
        // A message acked twice (a resend) is reported once, unless the two acks disagree.
        if !seen.insert((key.clone(), ack.seq)) {
            continue;
        }
        let who = format!(
            "{} ({}/{}) {:?} in {}",
            ack.client, ack.author.role, ack.author.id, ack.client_msg_id, ack.conversation
        );
        match stored.get(&key).map(Vec::as_slice) {
            None | Some([]) => {
                violate(Invariant::AckedStoredOnce, format!("{who} acked at seq {} is not stored", ack.seq))
            }
            Some([seq]) if *seq == ack.seq => {}
            Some([seq]) => {
                violate(Invariant::AckedStoredOnce, format!("{who} acked at seq {} is stored at seq {seq}", ack.seq))
            }
            Some(seqs) => violate(
                Invariant::AckedStoredOnce,
                format!("{who} acked at seq {} is stored {} times, at seqs {seqs:?}", ack.seq, seqs.len()),
            ),
        }
    }
}

fn events_by_conversation(snapshot: &Snapshot) -> BTreeMap<&str, Vec<&EventRow>> {
    let mut by_conversation: BTreeMap<&str, Vec<&EventRow>> = BTreeMap::new();
    for event in &snapshot.events {
        by_conversation.entry(&event.conversation_id).or_default().push(event);
    }
    for events in by_conversation.values_mut() {
        events.sort_by_key(|event| event.seq);
    }
    by_conversation
}

/// (b)
fn check_sequences(snapshot: &Snapshot, violate: &mut impl FnMut(Invariant, String)) {
    let by_conversation = events_by_conversation(snapshot);
    let rows: BTreeMap<&str, &ConversationRow> =
        snapshot.conversations.iter().map(|row| (row.id.as_str(), row)).collect();
    for (conversation, events) in &by_conversation {
        let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        if seqs != expected {
            violate(
                Invariant::GapFreeSequence,
                format!("{conversation}: seqs {} are not 1..={}", compact(&seqs), seqs.len()),
            );
        }
        match rows.get(conversation) {
            None => violate(Invariant::GapFreeSequence, format!("{conversation}: events without a conversation row")),
            Some(row) if Some(&row.last_seq) != seqs.last() => violate(
                Invariant::GapFreeSequence,
                format!("{conversation}: last_seq is {} but the last event is seq {:?}", row.last_seq, seqs.last()),
            ),
            Some(_) => {}
        }
    }
    for row in &snapshot.conversations {
        if !by_conversation.contains_key(row.id.as_str()) {
            violate(Invariant::GapFreeSequence, format!("{}: no event at all (last_seq {})", row.id, row.last_seq));
        }
    }
}

/// Seqs written as ranges: `1..=5, 7, 7, 9..=10`.
fn compact(seqs: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut index = 0;
    while index < seqs.len() {
        let start = seqs[index];
        let mut end = index;
        while end + 1 < seqs.len() && seqs[end + 1] == seqs[end] + 1 {
            end += 1;
        }
        parts.push(if end == index { start.to_string() } else { format!("{start}..={}", seqs[end]) });
        index = end + 1;
    }
    parts.join(", ")
}

/// (c)
fn check_client_msg_ids(snapshot: &Snapshot, violate: &mut impl FnMut(Invariant, String)) {
    let mut stored: Vec<(MessageKey<'_>, Vec<u64>)> = stored_messages(snapshot).into_iter().collect();
    stored.sort();
    for ((conversation, author, client_msg_id), seqs) in stored {
        if seqs.len() > 1 {
            violate(
                Invariant::UniqueClientMsgId,
                format!("{conversation}: {}/{} {client_msg_id:?} stored at seqs {seqs:?}", author.role, author.id),
            );
        }
    }
}

/// (d)
fn check_stranded(snapshot: &Snapshot, live_routers: &BTreeSet<String>, violate: &mut impl FnMut(Invariant, String)) {
    let leases: HashMap<u32, &Lease> = snapshot.leases.iter().map(|lease| (lease.shard, lease)).collect();
    for row in snapshot.conversations.iter().filter(|row| row.state == "queued" || row.state == "active") {
        let problem = match leases.get(&row.shard) {
            None => "has never had a lease".to_owned(),
            Some(lease) if lease.expires_at_ms <= snapshot.now_ms => {
                format!("has a lease of {} that expired {} ms ago", lease.owner, snapshot.now_ms - lease.expires_at_ms)
            }
            Some(lease) if !live_routers.contains(&lease.owner) => {
                format!("is leased to {}, which is not a live router (live: {live_routers:?})", lease.owner)
            }
            Some(_) => continue,
        };
        violate(Invariant::NoStrandedChat, format!("{} ({}): its shard {} {problem}", row.id, row.state, row.shard));
    }
}

/// (e)
fn check_epochs(snapshot: &Snapshot, violate: &mut impl FnMut(Invariant, String)) {
    let mut nodes_per_grant: BTreeMap<(u32, u64), BTreeSet<&str>> = BTreeMap::new();
    for grant in &snapshot.grants {
        nodes_per_grant.entry((grant.shard, grant.epoch)).or_default().insert(&grant.node_id);
    }
    for ((shard, epoch), nodes) in &nodes_per_grant {
        if nodes.len() > 1 {
            violate(Invariant::OneNodePerEpoch, format!("shard {shard} epoch {epoch} was granted to {nodes:?}"));
        }
    }
    // A released lease keeps its epoch with no owner: only held leases are grants.
    for lease in snapshot.leases.iter().filter(|lease| lease.epoch > 0 && !lease.owner.is_empty()) {
        let recorded = nodes_per_grant.get(&(lease.shard, lease.epoch));
        if !recorded.is_some_and(|nodes| nodes.contains(lease.owner.as_str())) {
            violate(
                Invariant::LeasesRecorded,
                format!(
                    "shard {} is leased to {} at epoch {}, a grant not in shard_lease_history (recorded: {recorded:?})",
                    lease.shard, lease.owner, lease.epoch
                ),
            );
        }
    }
    let shards: HashMap<&str, u32> = snapshot.conversations.iter().map(|row| (row.id.as_str(), row.shard)).collect();
    for (conversation, events) in events_by_conversation(snapshot) {
        let Some(&shard) = shards.get(conversation) else { continue };
        let mut previous: Option<(u64, u64)> = None;
        for event in events {
            let Some(epoch) = event.epoch else {
                violate(Invariant::FencedEpochs, format!("{conversation} seq {}: no epoch stored", event.seq));
                continue;
            };
            if !nodes_per_grant.contains_key(&(shard, epoch)) {
                violate(
                    Invariant::FencedEpochs,
                    format!("{conversation} seq {}: epoch {epoch} was never granted for shard {shard}", event.seq),
                );
            }
            match previous {
                // `previous` is the event with the highest epoch so far.
                Some((previous_seq, previous_epoch)) if epoch < previous_epoch => violate(
                    Invariant::FencedEpochs,
                    format!(
                        "{conversation} seq {} was written at epoch {epoch}, after seq {previous_seq} at epoch {previous_epoch}",
                        event.seq
                    ),
                ),
                _ => previous = Some((event.seq, epoch)),
            }
        }
    }
}

/// (f)
fn check_client_views(snapshot: &Snapshot, logs: &LogData, violate: &mut impl FnMut(Invariant, String)) {
    let stored: HashMap<(&str, u64), &EventRow> =
        snapshot.events.iter().map(|event| ((event.conversation_id.as_str(), event.seq), event)).collect();
    let starts: HashMap<(&str, u64, &str), u64> = logs
        .following
        .iter()
        .map(|following| {
            ((following.client.as_str(), following.connection, following.conversation.as_str()), following.after_seq)
        })
        .collect();
    let mut last_written: HashMap<(&str, u64, &str), u64> = HashMap::new();
    for received in &logs.received {
        let key = (received.client.as_str(), received.connection, received.conversation.as_str());
        let where_ = format!("{} connection {} in {}", received.client, received.connection, received.conversation);
        let previous = last_written.get(&key).copied().or_else(|| starts.get(&key).copied());
        if let Some(previous) = previous.filter(|&previous| received.seq != previous + 1) {
            violate(Invariant::ClientViews, format!("{where_}: was written seq {} after seq {previous}", received.seq));
        }
        last_written.insert(key, received.seq);
        match stored.get(&(received.conversation.as_str(), received.seq)) {
            None => {
                violate(Invariant::ClientViews, format!("{where_}: received seq {}, which is not stored", received.seq))
            }
            Some(event) => {
                let same = event.kind == received.kind
                    && author_of(event) == received.author
                    && event.client_msg_id == received.client_msg_id;
                if !same {
                    violate(
                        Invariant::ClientViews,
                        format!(
                            "{where_}: seq {} received as {} by {:?} ({:?}) but stored as {} by {}/{} ({:?})",
                            received.seq,
                            received.kind,
                            received.author,
                            received.client_msg_id,
                            event.kind,
                            event.author_role,
                            event.author_id,
                            event.client_msg_id
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_are_shown_as_ranges() {
        assert_eq!(compact(&[1, 2, 3, 5, 5, 6, 9]), "1..=3, 5, 5..=6, 9");
        assert_eq!(compact(&[]), "");
    }
}
