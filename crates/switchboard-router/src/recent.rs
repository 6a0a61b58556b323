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

/// A contiguous run of stored events of one log, at most [`RecentEvents::MAX`] of them. It answers for the
/// log only while its last event is the log's last one, which the caller gives (the conversation's
/// `last_seq`, the one record of where the log ends): a run that fell behind answers nothing.
#[derive(Debug, Default)]
pub(crate) struct RecentEvents {
    events: VecDeque<Arc<Event>>,
}

impl RecentEvents {
    /// The most events kept: a chat's opening events, its offers and acceptance, and its latest messages.
    pub(crate) const MAX: usize = 16;

    /// The newest of `events`, a log's events in order (all of them, or its newest ones).
    pub(crate) fn of_log(events: impl IntoIterator<Item = Event>) -> Self {
        let mut recent = RecentEvents::default();
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
        }
        if self.events.len() == Self::MAX {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Every event after `after_seq` of the log whose last event is `last_seq`, when the run holds them all;
    /// `None` when some are older than the run, or the run does not reach `last_seq`.
    pub(crate) fn after(&self, after_seq: u64, last_seq: u64) -> Option<Vec<Event>> {
        if after_seq >= last_seq {
            return Some(Vec::new());
        }
        let (first, last) = (self.events.front()?, self.events.back()?);
        if last.seq != last_seq || after_seq + 1 < first.seq {
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
        let recent = RecentEvents::of_log((1..=3).map(event));
        assert_eq!(seqs(recent.after(0, 3)), Some(vec![1, 2, 3]));
        assert_eq!(seqs(recent.after(2, 3)), Some(vec![3]));
        assert_eq!(seqs(recent.after(3, 3)), Some(vec![]));
        assert_eq!(seqs(recent.after(9, 3)), Some(vec![]), "a client claiming more than exists gets nothing");
        assert_eq!(recent.after(0, 3).unwrap()[1], event(2), "the events as stored");
    }

    #[test]
    fn only_the_newest_events_are_kept_and_older_catch_ups_go_to_the_store() {
        let mut recent = RecentEvents::of_log((1..=2).map(event));
        for seq in 3..=40 {
            recent.push(Arc::new(event(seq)));
        }
        let first = 40 - RecentEvents::MAX as u64 + 1;
        assert_eq!(seqs(recent.after(first - 1, 40)), Some((first..=40).collect()));
        assert_eq!(recent.after(first - 2, 40), None, "event {} is no longer kept", first - 1);
        assert_eq!(recent.after(0, 40), None);
        assert_eq!(seqs(recent.after(39, 40)), Some(vec![40]));
    }

    #[test]
    fn a_log_read_that_does_not_reach_the_last_event_vouches_for_nothing() {
        // The summary says 4 events, the read found 3: the run cannot say what the fourth is.
        let recent = RecentEvents::of_log((1..=3).map(event));
        assert_eq!(recent.after(0, 4), None);
        assert_eq!(recent.after(3, 4), None);
        assert_eq!(seqs(recent.after(4, 4)), Some(vec![]));
    }

    #[test]
    fn an_event_out_of_sequence_starts_the_run_again() {
        let mut recent = RecentEvents::of_log((1..=3).map(event));
        recent.push(Arc::new(event(5)));
        assert_eq!(recent.after(3, 5), None, "event 4 was never seen");
        assert_eq!(seqs(recent.after(4, 5)), Some(vec![5]));
        recent.push(Arc::new(event(6)));
        assert_eq!(seqs(recent.after(4, 6)), Some(vec![5, 6]));
    }

    #[test]
    fn an_empty_log() {
        let mut recent = RecentEvents::of_log(Vec::new());
        assert_eq!(seqs(recent.after(0, 0)), Some(vec![]));
        recent.push(Arc::new(event(1)));
        assert_eq!(seqs(recent.after(0, 1)), Some(vec![1]));
    }

    #[test]
    fn a_run_that_fell_behind_the_log_answers_nothing() {
        // The log went on to event 4 without the run hearing of it: it must not answer "nothing more" for 3.
        let recent = RecentEvents::of_log((1..=3).map(event));
        assert_eq!(recent.after(3, 4), None);
        assert_eq!(recent.after(0, 4), None);
    }
}
