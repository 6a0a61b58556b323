//! The newest events of a conversation's log that its actor appended, kept by it.
//!
//! A gateway that subscribes to a chat catches up from a sequence number: the customer's widget right after
//! the chat started, the agent's console when it accepts, either one after a reconnect. Each catch-up was a
//! read of the store (a gRPC call, a query of the database): two per chat start. The actor is the only
//! writer of its conversation's log and sees every event it appends as the store returned it, so it can
//! answer a catch-up that starts within the newest [`RecentEvents::MAX`] events it appended (and within a
//! page of them) from memory; an older one, or one right after an activation (which reads no event),
//! still reads the store.

use std::collections::VecDeque;
use std::sync::Arc;

use switchboard_domain::{AgentId, Author, Event, EventBody};

/// A contiguous run of stored events of one log, at most [`RecentEvents::MAX`] of them, and at most a page of
/// them ([`wire_bytes_at_most`] summed): a catch-up is answered from memory only when what it asks for fits
/// in a page, so older events would never be answered from here, and a chat of long messages would hold
/// megabytes. It answers for the log only while its last event is the log's last one, which the caller
/// gives (the conversation's `last_seq`, the one record of where the log ends): a run that fell behind
/// answers nothing.
#[derive(Debug)]
pub(crate) struct RecentEvents {
    events: VecDeque<Arc<Event>>,
    /// The bound of the run's size, and its size.
    max_bytes: u64,
    bytes: u64,
}

impl RecentEvents {
    /// The most events kept: a chat's opening events, its offers and acceptance, and its latest messages.
    pub(crate) const MAX: usize = 16;

    /// An empty run, which keeps at most `max_bytes` (a page) of events.
    pub(crate) fn new(max_bytes: u64) -> Self {
        RecentEvents { events: VecDeque::new(), max_bytes, bytes: 0 }
    }

    /// The newest of `events`, a log's events in order (all of them, or its newest ones).
    pub(crate) fn of_log(events: impl IntoIterator<Item = Event>, max_bytes: u64) -> Self {
        let mut recent = RecentEvents::new(max_bytes);
        for event in events {
            recent.push(Arc::new(event));
        }
        recent
    }

    /// Adds the event just stored at the log's end. An event that does not follow the run's last one (which
    /// the store's sequence numbers rule out) starts the run again from it.
    pub(crate) fn push(&mut self, event: Arc<Event>) {
        if self.events.back().is_some_and(|last| event.seq != last.seq + 1) {
            self.events.clear();
            self.bytes = 0;
        }
        self.bytes += wire_bytes_at_most(&event);
        self.events.push_back(event);
        // An event over the bound alone empties the run: the next one starts it again.
        while self.events.len() > Self::MAX || self.bytes > self.max_bytes {
            let Some(oldest) = self.events.pop_front() else { break };
            self.bytes -= wire_bytes_at_most(&oldest);
        }
    }

    /// Every event after `after_seq` of the log whose last event is `last_seq`, when the run holds them all
    /// and they fit in `max_bytes` (a page: see [`wire_bytes_at_most`]); `None` when some are older than the
    /// run, the run does not reach `last_seq`, or they may not fit: the store pages them then.
    pub(crate) fn after(&self, after_seq: u64, last_seq: u64, max_bytes: u64) -> Option<Vec<Event>> {
        if after_seq >= last_seq {
            return Some(Vec::new());
        }
        let (first, last) = (self.events.front()?, self.events.back()?);
        if last.seq != last_seq || after_seq + 1 < first.seq {
            return None;
        }
        let wanted = || self.events.iter().filter(|event| event.seq > after_seq);
        let bytes: u64 = wanted().map(|event| wire_bytes_at_most(event)).sum();
        if bytes > max_bytes {
            return None;
        }
        Some(wanted().map(|event| Event::clone(event)).collect())
    }
}

/// At most how many bytes an event takes as a stored record, without encoding it: its JSON escapes a byte
/// of text into six at most (`\u0001`), and the rest of the record (seq, time, kind, the names of its
/// fields, the conversation's id) is well under the fixed part.
pub(crate) fn wire_bytes_at_most(event: &Event) -> u64 {
    const FIXED: usize = 512;
    let author = match &event.author {
        Author::Agent(agent) => agent.as_str().len(),
        Author::Customer | Author::System => 0,
    };
    let optional = |agent: &Option<AgentId>| agent.as_ref().map_or(0, |agent| agent.as_str().len());
    let body = match &event.body {
        EventBody::Created { group, customer_name, question } => {
            group.as_str().len() + customer_name.len() + question.len()
        }
        EventBody::Message { body } => body.len(),
        EventBody::Accepted { agent } | EventBody::Offered { agent, .. } | EventBody::OfferEnded { agent, .. } => {
            agent.as_str().len()
        }
        EventBody::Requeued { from_agent, .. } => from_agent.as_str().len(),
        EventBody::Transferred { from_agent, to_group } => optional(from_agent) + to_group.as_str().len(),
        EventBody::Forwarded { from_agent, to_agent } => optional(from_agent) + to_agent.as_str().len(),
        EventBody::Delivered { .. }
        | EventBody::Closed
        | EventBody::Cancelled { .. }
        | EventBody::CustomerLeft
        | EventBody::CustomerReturned
        | EventBody::Unknown => 0,
    };
    // The author's id is in the record three times (its column, the event, the deduplication key), the
    // client message id twice (the event, the key).
    let text = 3 * author + 2 * event.client_msg_id.as_ref().map_or(0, String::len) + body;
    (FIXED + 6 * text) as u64
}

#[cfg(test)]
mod tests {
    use switchboard_domain::{Author, EventBody};

    use super::*;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            at_ms: 1_000 + seq as i64,
            author: Author::Customer,
            client_msg_id: Some(format!("m{seq}")),
            body: EventBody::Message { body: format!("message {seq}") },
        }
    }

    const PAGE: u64 = 1 << 20;

    fn seqs(events: Option<Vec<Event>>) -> Option<Vec<u64>> {
        events.map(|events| events.into_iter().map(|event| event.seq).collect())
    }

    #[test]
    fn a_catch_up_that_may_not_fit_in_a_page_is_left_to_the_store() {
        let recent = RecentEvents::of_log((1..=3).map(event), PAGE);
        let each = wire_bytes_at_most(&event(1));
        assert_eq!(seqs(recent.after(0, 3, 3 * each)), Some(vec![1, 2, 3]));
        assert_eq!(recent.after(0, 3, 3 * each - 1), None);
        assert_eq!(seqs(recent.after(1, 3, 2 * each)), Some(vec![2, 3]));
    }

    #[test]
    fn an_event_takes_at_most_its_bound_as_a_stored_record() {
        let agent = AgentId::new("agent-with-a-long-name").unwrap();
        let control = "\u{1}\u{7f}\"\\".repeat(1_000);
        let events = [
            Event { author: Author::Agent(agent.clone()), ..event(1) },
            Event {
                body: EventBody::Message { body: control.clone() },
                client_msg_id: Some(control.clone()),
                ..event(2)
            },
            Event {
                author: Author::System,
                client_msg_id: None,
                body: EventBody::Created {
                    group: switchboard_domain::GroupId::new("sales").unwrap(),
                    customer_name: control.clone(),
                    question: "é".repeat(500),
                },
                ..event(3)
            },
            Event {
                author: Author::System,
                client_msg_id: None,
                body: EventBody::Forwarded { from_agent: Some(agent.clone()), to_agent: agent },
                ..event(4)
            },
        ];
        for event in events {
            let new = switchboard_proto::convert::new_event(&event);
            let record = switchboard_proto::internal::v1::EventRecord {
                conversation_id: "019a0000-0000-7000-8000-000000000000".into(),
                seq: u64::MAX,
                at_ms: i64::MIN,
                author_role: new.author_role,
                author_id: new.author_id,
                client_msg_id: new.client_msg_id,
                kind: new.kind,
                payload_json: new.payload_json,
            };
            let encoded = prost::Message::encoded_len(&record) as u64;
            assert!(encoded <= wire_bytes_at_most(&event), "{encoded} bytes for {:?}", event.body.kind());
        }
    }

    #[test]
    fn a_whole_short_log_answers_every_catch_up() {
        let recent = RecentEvents::of_log((1..=3).map(event), PAGE);
        assert_eq!(seqs(recent.after(0, 3, PAGE)), Some(vec![1, 2, 3]));
        assert_eq!(seqs(recent.after(2, 3, PAGE)), Some(vec![3]));
        assert_eq!(seqs(recent.after(3, 3, PAGE)), Some(vec![]));
        assert_eq!(seqs(recent.after(9, 3, PAGE)), Some(vec![]), "a client claiming more than exists gets nothing");
        assert_eq!(recent.after(0, 3, PAGE).unwrap()[1], event(2), "the events as stored");
    }

    #[test]
    fn only_the_newest_events_are_kept_and_older_catch_ups_go_to_the_store() {
        let mut recent = RecentEvents::of_log((1..=2).map(event), PAGE);
        for seq in 3..=40 {
            recent.push(Arc::new(event(seq)));
        }
        let first = 40 - RecentEvents::MAX as u64 + 1;
        assert_eq!(seqs(recent.after(first - 1, 40, PAGE)), Some((first..=40).collect()));
        assert_eq!(recent.after(first - 2, 40, PAGE), None, "event {} is no longer kept", first - 1);
        assert_eq!(recent.after(0, 40, PAGE), None);
        assert_eq!(seqs(recent.after(39, 40, PAGE)), Some(vec![40]));
    }

    #[test]
    fn at_most_a_page_of_events_is_kept_and_a_longer_catch_up_goes_to_the_store() {
        let long = |seq| Event { body: EventBody::Message { body: "x".repeat(10_000) }, ..event(seq) };
        let each = wire_bytes_at_most(&long(1));
        // Room for three of them.
        let mut recent = RecentEvents::new(3 * each + each / 2);
        for seq in 1..=5 {
            recent.push(Arc::new(long(seq)));
        }
        assert_eq!(recent.events.len(), 3);
        assert_eq!(recent.bytes, 3 * each);
        assert_eq!(seqs(recent.after(2, 5, PAGE)), Some(vec![3, 4, 5]));
        assert_eq!(recent.after(1, 5, PAGE), None, "event 2 is no longer kept");
        // An event over the bound alone is not kept, nor are those before it; the run starts again after it.
        let mut recent = RecentEvents::new(each - 1);
        recent.push(Arc::new(event(1)));
        recent.push(Arc::new(long(2)));
        assert_eq!((recent.events.len(), recent.bytes), (0, 0));
        recent.push(Arc::new(event(3)));
        assert_eq!(seqs(recent.after(2, 3, PAGE)), Some(vec![3]));
        assert_eq!(recent.after(1, 3, PAGE), None);
    }

    #[test]
    fn a_log_read_that_does_not_reach_the_last_event_vouches_for_nothing() {
        // The summary says 4 events, the read found 3: the run cannot say what the fourth is.
        let recent = RecentEvents::of_log((1..=3).map(event), PAGE);
        assert_eq!(recent.after(0, 4, PAGE), None);
        assert_eq!(recent.after(3, 4, PAGE), None);
        assert_eq!(seqs(recent.after(4, 4, PAGE)), Some(vec![]));
    }

    #[test]
    fn an_event_out_of_sequence_starts_the_run_again() {
        let mut recent = RecentEvents::of_log((1..=3).map(event), PAGE);
        recent.push(Arc::new(event(5)));
        assert_eq!(recent.after(3, 5, PAGE), None, "event 4 was never seen");
        assert_eq!(seqs(recent.after(4, 5, PAGE)), Some(vec![5]));
        recent.push(Arc::new(event(6)));
        assert_eq!(seqs(recent.after(4, 6, PAGE)), Some(vec![5, 6]));
    }

    #[test]
    fn an_empty_log() {
        let mut recent = RecentEvents::of_log(Vec::new(), PAGE);
        assert_eq!(seqs(recent.after(0, 0, PAGE)), Some(vec![]));
        recent.push(Arc::new(event(1)));
        assert_eq!(seqs(recent.after(0, 1, PAGE)), Some(vec![1]));
    }

    #[test]
    fn a_run_that_fell_behind_the_log_answers_nothing() {
        // The log went on to event 4 without the run hearing of it: it must not answer "nothing more" for 3.
        let recent = RecentEvents::of_log((1..=3).map(event), PAGE);
        assert_eq!(recent.after(3, 4, PAGE), None);
        assert_eq!(recent.after(0, 4, PAGE), None);
    }
}
