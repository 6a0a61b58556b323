//! The newest events of a conversation's log, kept by its actor.
//!
//! A gateway that subscribes to a chat catches up from a sequence number: the customer's widget right after
//! the chat started, the agent's console when it accepts, either one after a reconnect. Each catch-up was a
//! read of the store (a gRPC call, a query of the database): two per chat start. The actor is the only
//! writer of its conversation's log and sees every event it appends as the store returned it, so it can
//! answer a catch-up that starts within its newest [`RecentEvents::MAX`] events from memory; an older one
//! still reads the store.

use std::collections::VecDeque;
use std::sync::Arc;

use switchboard_domain::Event;

/// A contiguous run of the newest stored events of one log: every event after `first_seq - 1` up to
/// `last_seq`, or none when it cannot vouch for any.
#[derive(Debug, Default)]
pub(crate) struct RecentEvents {
    events: VecDeque<Arc<Event>>,
    /// The sequence number of the log's last event (0: the log is empty).
    last_seq: u64,
}

impl RecentEvents {
    /// The most events kept: a chat's opening events, its offers and acceptance, and its latest messages.
    pub(crate) const MAX: usize = 16;

    /// The newest events of a log whose last sequence number is `last_seq`, from `events`, the log's events
    /// in order (all of them, or its newest ones). Events that are not the log's contiguous end are not
    /// kept: the run then holds none.
    pub(crate) fn of_log(events: impl IntoIterator<Item = Event>, last_seq: u64) -> Self {
        let mut recent = RecentEvents { events: VecDeque::new(), last_seq: 0 };
        for event in events {
            recent.push(Arc::new(event));
        }
        if recent.last_seq != last_seq {
            recent.events.clear();
            recent.last_seq = last_seq;
        }
        recent
    }

    /// Adds the event just stored at the log's end. An event that does not follow the last one (which the
    /// store's sequence numbers rule out) leaves the run empty from there.
    pub(crate) fn push(&mut self, event: Arc<Event>) {
        if event.seq != self.last_seq + 1 {
            self.events.clear();
        }
        self.last_seq = event.seq;
        if self.events.len() == Self::MAX {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Every event after `after_seq`, when the run holds them all; `None` when some are older than the run.
    pub(crate) fn after(&self, after_seq: u64) -> Option<Vec<Event>> {
        if after_seq >= self.last_seq {
            return Some(Vec::new());
        }
        let first_seq = self.events.front()?.seq;
        if after_seq + 1 < first_seq {
            return None;
        }
        Some(self.events.iter().filter(|event| event.seq > after_seq).map(|event| Event::clone(event)).collect())
    }
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

    fn seqs(events: Option<Vec<Event>>) -> Option<Vec<u64>> {
        events.map(|events| events.into_iter().map(|event| event.seq).collect())
    }

    #[test]
    fn a_whole_short_log_answers_every_catch_up() {
        let recent = RecentEvents::of_log((1..=3).map(event), 3);
        assert_eq!(seqs(recent.after(0)), Some(vec![1, 2, 3]));
        assert_eq!(seqs(recent.after(2)), Some(vec![3]));
        assert_eq!(seqs(recent.after(3)), Some(vec![]));
        assert_eq!(seqs(recent.after(9)), Some(vec![]), "a client claiming more than exists gets nothing");
        assert_eq!(recent.after(0).unwrap()[1], event(2), "the events as stored");
    }

    #[test]
    fn only_the_newest_events_are_kept_and_older_catch_ups_go_to_the_store() {
        let mut recent = RecentEvents::of_log((1..=2).map(event), 2);
        for seq in 3..=40 {
            recent.push(Arc::new(event(seq)));
        }
        let first = 40 - RecentEvents::MAX as u64 + 1;
        assert_eq!(seqs(recent.after(first - 1)), Some((first..=40).collect()));
        assert_eq!(recent.after(first - 2), None, "event {} is no longer kept", first - 1);
        assert_eq!(recent.after(0), None);
        assert_eq!(seqs(recent.after(39)), Some(vec![40]));
    }

    #[test]
    fn a_log_read_that_does_not_reach_the_last_event_vouches_for_nothing() {
        // The summary says 4 events, the read found 3: the run cannot say what the fourth is.
        let recent = RecentEvents::of_log((1..=3).map(event), 4);
        assert_eq!(recent.after(0), None);
        assert_eq!(recent.after(3), None);
        assert_eq!(seqs(recent.after(4)), Some(vec![]));
    }

    #[test]
    fn an_event_out_of_sequence_starts_the_run_again() {
        let mut recent = RecentEvents::of_log((1..=3).map(event), 3);
        recent.push(Arc::new(event(5)));
        assert_eq!(recent.after(3), None, "event 4 was never seen");
        assert_eq!(seqs(recent.after(4)), Some(vec![5]));
        recent.push(Arc::new(event(6)));
        assert_eq!(seqs(recent.after(4)), Some(vec![5, 6]));
    }

    #[test]
    fn an_empty_log() {
        let mut recent = RecentEvents::of_log(Vec::new(), 0);
        assert_eq!(seqs(recent.after(0)), Some(vec![]));
        recent.push(Arc::new(event(1)));
        assert_eq!(seqs(recent.after(0)), Some(vec![1]));
    }
}
