//! The waiting queue: first come, first served, within a group and across all of an agent's groups.
//!
//! A chat's place is its `queued_at_ms`, ties broken by its (time-ordered) id, so that every node and every
//! client that merges the queues of several groups computes the same order.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{ConversationId, GroupId};

/// A chat waiting for an agent, as agents see it in their waiting queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingEntry {
    pub conversation: ConversationId,
    pub group: GroupId,
    pub queued_at_ms: i64,
    pub customer_name: String,
    /// The customer's first question, its first [`WaitingEntry::QUESTION_PREVIEW_CHARS`] characters (the
    /// whole of it is the chat's `first_question`).
    pub question: String,
}

impl WaitingEntry {
    /// How much of the question a waiting list shows. A queue's list goes whole in one message (to the
    /// gateways, and to each agent's console), so each entry is kept small whatever `max_message_bytes` is.
    pub const QUESTION_PREVIEW_CHARS: usize = 500;

    /// The first [`Self::QUESTION_PREVIEW_CHARS`] characters of `question`.
    pub fn question_preview(question: &str) -> String {
        match question.char_indices().nth(Self::QUESTION_PREVIEW_CHARS) {
            Some((end, _)) => question[..end].to_owned(),
            None => question.to_owned(),
        }
    }

    fn order_key(&self) -> (i64, ConversationId) {
        (self.queued_at_ms, self.conversation)
    }
}

/// The chats waiting in one support group, in first-come-first-served order.
#[derive(Debug, Clone, Default)]
pub struct WaitingQueue {
    by_order: BTreeMap<(i64, ConversationId), WaitingEntry>,
    order_of: HashMap<ConversationId, (i64, ConversationId)>,
}

impl WaitingQueue {
    /// Adds a chat; adding one that is already there replaces it (it keeps the new place).
    pub fn insert(&mut self, entry: WaitingEntry) {
        self.remove(&entry.conversation);
        let key = entry.order_key();
        self.order_of.insert(entry.conversation, key);
        self.by_order.insert(key, entry);
    }

    pub fn remove(&mut self, conversation: &ConversationId) -> Option<WaitingEntry> {
        let key = self.order_of.remove(conversation)?;
        self.by_order.remove(&key)
    }

    pub fn contains(&self, conversation: &ConversationId) -> bool {
        self.order_of.contains_key(conversation)
    }

    /// 1-based position of a chat in this queue.
    pub fn position(&self, conversation: &ConversationId) -> Option<usize> {
        let key = self.order_of.get(conversation)?;
        Some(self.by_order.range(..key).count() + 1)
    }

    /// The 1-based position of every chat, counted in one pass.
    pub fn positions(&self) -> HashMap<ConversationId, usize> {
        self.by_order.values().enumerate().map(|(index, entry)| (entry.conversation, index + 1)).collect()
    }

    pub fn len(&self) -> usize {
        self.by_order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_order.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &WaitingEntry> {
        self.by_order.values()
    }

    /// How many chats have waited since `at_ms` or before: the head of the queue, in one pass over them
    /// alone.
    pub fn queued_by(&self, at_ms: i64) -> usize {
        self.by_order.keys().take_while(|(queued_at_ms, _)| *queued_at_ms <= at_ms).count()
    }
}

/// One waiting list across several groups, first come first served.
pub fn merge_waiting<'a>(queues: impl IntoIterator<Item = &'a WaitingQueue>) -> Vec<WaitingEntry> {
    let mut all: Vec<WaitingEntry> = queues.into_iter().flat_map(|queue| queue.iter().cloned()).collect();
    all.sort_by_key(WaitingEntry::order_key);
    all
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn a_waiting_list_shows_the_first_characters_of_a_long_question() {
        let limit = WaitingEntry::QUESTION_PREVIEW_CHARS;
        assert_eq!(WaitingEntry::question_preview("Hi?"), "Hi?");
        let exact = "q".repeat(limit);
        assert_eq!(WaitingEntry::question_preview(&exact), exact);
        // Characters, not bytes: a multi-byte character is never cut.
        let long = "é".repeat(limit + 10);
        let preview = WaitingEntry::question_preview(&long);
        assert_eq!((preview.chars().count(), preview.len()), (limit, 2 * limit));
    }

    fn entry(n: u128, group: &str, queued_at_ms: i64) -> WaitingEntry {
        WaitingEntry {
            conversation: ConversationId::from_uuid(Uuid::from_u128(n)),
            group: GroupId::new(group).unwrap(),
            queued_at_ms,
            customer_name: format!("c{n}"),
            question: "q".into(),
        }
    }

    #[test]
    fn the_seed_scenario_orders_all_groups_by_arrival() {
        let mut g1 = WaitingQueue::default();
        let mut g2 = WaitingQueue::default();
        g1.insert(entry(1, "g1", 10));
        g2.insert(entry(2, "g2", 11));
        g1.insert(entry(3, "g1", 12));
        let for_a: Vec<_> = merge_waiting([&g1, &g2]).into_iter().map(|e| e.customer_name).collect();
        assert_eq!(for_a, ["c1", "c2", "c3"]);
        let for_b: Vec<_> = merge_waiting([&g1]).into_iter().map(|e| e.customer_name).collect();
        assert_eq!(for_b, ["c1", "c3"]);
        assert_eq!(g1.position(&entry(3, "g1", 12).conversation), Some(2));
    }

    #[test]
    fn the_chats_queued_by_an_instant_are_the_head_of_the_queue() {
        let mut queue = WaitingQueue::default();
        for (n, queued_at_ms) in [(1, 30), (2, 10), (3, 20), (4, 20)] {
            queue.insert(entry(n, "g", queued_at_ms));
        }
        let counts: Vec<usize> = [9, 10, 19, 20, 29, 30, 31].into_iter().map(|at| queue.queued_by(at)).collect();
        assert_eq!(counts, [0, 1, 1, 3, 3, 4, 4]);
        queue.remove(&entry(2, "g", 10).conversation);
        assert_eq!(queue.queued_by(20), 2);
    }

    #[test]
    fn ties_on_time_are_broken_by_id() {
        let mut queue = WaitingQueue::default();
        queue.insert(entry(9, "g", 5));
        queue.insert(entry(4, "g", 5));
        let names: Vec<_> = queue.iter().map(|e| e.customer_name.clone()).collect();
        assert_eq!(names, ["c4", "c9"]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Enqueue { group: usize },
        Accept { nth: usize },
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![(0usize..3).prop_map(|group| Op::Enqueue { group }), (0usize..8).prop_map(|nth| Op::Accept { nth })]
    }

    proptest! {
        /// Interleaved enqueues (into any group) and accepts (of any waiting chat) keep the merged list in
        /// exactly the order of arrival of the chats still waiting.
        #[test]
        fn interleaved_enqueues_and_accepts_keep_arrival_order(ops in prop::collection::vec(any_op(), 0..60)) {
            let groups = ["g0", "g1", "g2"];
            let mut queues = vec![WaitingQueue::default(), WaitingQueue::default(), WaitingQueue::default()];
            let mut arrivals: Vec<(u128, usize)> = Vec::new(); // (id, group) in arrival order, still waiting
            let mut next_id = 1u128;
            for op in ops {
                match op {
                    Op::Enqueue { group } => {
                        // Several chats may arrive in the same millisecond.
                        queues[group].insert(entry(next_id, groups[group], (next_id / 3) as i64));
                        arrivals.push((next_id, group));
                        next_id += 1;
                    }
                    Op::Accept { nth } if !arrivals.is_empty() => {
                        let (id, group) = arrivals.remove(nth % arrivals.len());
                        let removed = queues[group].remove(&ConversationId::from_uuid(Uuid::from_u128(id)));
                        prop_assert!(removed.is_some());
                    }
                    Op::Accept { .. } => {}
                }
                let merged: Vec<u128> = merge_waiting(&queues).iter().map(|e| e.conversation.as_uuid().as_u128()).collect();
                let expected: Vec<u128> = arrivals.iter().map(|(id, _)| *id).collect();
                prop_assert_eq!(merged, expected);
                for (group, queue) in queues.iter().enumerate() {
                    let in_group: Vec<u128> = arrivals.iter().filter(|(_, g)| *g == group).map(|(id, _)| *id).collect();
                    let positions = queue.positions();
                    prop_assert_eq!(positions.len(), in_group.len());
                    for (index, id) in in_group.iter().enumerate() {
                        let conversation = ConversationId::from_uuid(Uuid::from_u128(*id));
                        prop_assert_eq!(queue.position(&conversation), Some(index + 1));
                        prop_assert_eq!(positions.get(&conversation), Some(&(index + 1)));
                    }
                }
            }
        }
    }
}
