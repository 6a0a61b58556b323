//! What a router reads of presence: whether a group is online (open by its hours, at least one agent
//! signed in). Presence may be stale (Redis down): then the last status this node knew stands, with the
//! business hours evaluated here. And how long the customers of chats have been found gone, read every few
//! heartbeats.

use std::collections::HashMap;
use std::sync::Arc;

use switchboard_domain::{ConversationId, GroupId, TenantId};
use switchboard_presence::Connections;
use tracing::debug;

use crate::context::Context;

/// Whether the group is online now.
pub(crate) async fn group_online(context: &Arc<Context>, tenant: &TenantId, group: &GroupId) -> bool {
    let now_ms = context.clock.now_ms();
    let open = context.directory.group(tenant, group).is_some_and(|entry| entry.hours.is_open(now_ms));
    if !open {
        return false;
    }
    match context.presence.n_signed_in(tenant, group, now_ms).await {
        Ok(signed_in) => signed_in > 0,
        Err(error) => {
            debug!(%error, %group, "presence unavailable: the last group status known stands");
            let statuses = context.group_statuses.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            statuses.get(&(tenant.clone(), group.clone())).is_some_and(|status| status.signed_in > 0)
        }
    }
}

/// How long the customer of each chat has been gone, for the chats an actor reads every few heartbeats (a
/// queue its waiting chats, an agent their active ones). Presence says since when (the end or expiry of the
/// customer's last connection), which an actor activated on another node reads as its predecessor did: a
/// customer is gone for a period once presence says so and the actor's own readings have found them gone for
/// a confirmation span from the first that did (two customer heartbeats, see
/// [`crate::PresenceSettings::customer_heartbeat`]: a connection presence lost or restored stale is written
/// again by its gateway within one). A reading that failed starts every span again. Once answered, a chat is
/// answered again only when the readings have found its customer gone for the whole period again (the
/// telling or cancellation answered may have been lost). A customer nobody recorded (`Unknown`) is never
/// gone.
#[derive(Debug, Default)]
pub(crate) struct GoneCustomers {
    counts: HashMap<ConversationId, Count>,
    /// Heartbeats since a reading was last due.
    ticks: u32,
}

/// The readings that found a chat's customer gone: since `from_ms`, to be answered once they span `span_ms`.
#[derive(Debug, Clone, Copy)]
struct Count {
    from_ms: i64,
    span_ms: i64,
}

/// Whether a departure is to be acted on at `at_ms`: presence dates it `since_ms` (the end or lapse of the
/// last connection), `for_ms` ago at least, and this actor's own readings have found it since `found_at_ms`,
/// for `confirm_ms` at least (records may be stale: see [`GoneCustomers`]). The rule of the customers' and
/// the agents' departures alike.
pub(crate) fn departure_due(at_ms: i64, since_ms: i64, for_ms: i64, found_at_ms: i64, confirm_ms: i64) -> bool {
    at_ms.saturating_sub(since_ms) >= for_ms && at_ms.saturating_sub(found_at_ms) >= confirm_ms
}

/// How many heartbeats pass between two readings of the customers.
const READ_EVERY_TICKS: u32 = 5;

impl GoneCustomers {
    /// Counts a heartbeat; true every [`READ_EVERY_TICKS`]th counted, when the customers are to be read.
    pub(crate) fn reading_due(&mut self) -> bool {
        self.ticks += 1;
        if self.ticks < READ_EVERY_TICKS {
            return false;
        }
        self.ticks = 0;
        true
    }

    /// Counts the reading made at `at_ms` (`None`: it failed), and answers the chats whose customer presence
    /// says has been gone for `for_ms` at least, once this actor's readings have found them gone for
    /// `confirm_ms` (see [`crate::PresenceSettings::customer_confirm_ms`]). Chats no longer `listed` are
    /// forgotten.
    pub(crate) fn read(
        &mut self,
        at_ms: i64,
        read: Option<Vec<(ConversationId, Connections)>>,
        for_ms: i64,
        confirm_ms: i64,
        listed: impl Fn(&ConversationId) -> bool,
    ) -> Vec<ConversationId> {
        let Some(read) = read else {
            self.counts.clear();
            return Vec::new();
        };
        let mut gone = Vec::new();
        for (conversation, presence) in read {
            let Connections::Gone { since_ms } = presence else {
                self.counts.remove(&conversation);
                continue;
            };
            if !listed(&conversation) {
                self.counts.remove(&conversation);
                continue;
            }
            let count = self.counts.entry(conversation).or_insert(Count { from_ms: at_ms, span_ms: confirm_ms });
            if departure_due(at_ms, since_ms, for_ms, count.from_ms, count.span_ms) {
                gone.push(conversation);
                *count = Count { from_ms: at_ms, span_ms: for_ms };
            }
        }
        self.counts.retain(|conversation, _| listed(conversation));
        gone
    }

    /// Forgets every count (nothing is listed any more).
    pub(crate) fn clear(&mut self) {
        self.counts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_customer_is_gone_once_presence_says_so_for_the_period_and_the_readings_for_the_confirmation() {
        let (a, b, c) = (ConversationId::new_v7(1), ConversationId::new_v7(2), ConversationId::new_v7(3));
        let all = |_: &ConversationId| true;
        let gone = |since_ms| Connections::Gone { since_ms };
        let reading = |a_is, b_is| Some(vec![(a, a_is), (b, b_is), (c, Connections::Unknown)]);
        // Gone for 10, confirmed by readings over 4.
        let mut counts = GoneCustomers::default();
        assert_eq!(counts.read(0, reading(gone(0), gone(0)), 10, 4, all), []);
        // b is back for one reading, and leaves again at 7.
        assert_eq!(counts.read(5, reading(gone(0), Connections::Here), 10, 4, all), []);
        assert_eq!(counts.read(10, reading(gone(0), gone(7)), 10, 4, all), [a], "b left at 7");
        assert_eq!(counts.read(15, reading(gone(0), gone(7)), 10, 4, all), [], "b gone for 8 only");
        assert_eq!(counts.read(17, reading(gone(0), gone(7)), 10, 4, all), [b]);
        // Each is answered again only once the readings found them gone for the whole period again.
        assert_eq!(counts.read(19, reading(gone(0), gone(7)), 10, 4, all), []);
        assert_eq!(counts.read(20, reading(gone(0), gone(7)), 10, 4, all), [a]);
        assert_eq!(counts.read(26, reading(gone(0), gone(7)), 10, 4, all), []);
        assert_eq!(counts.read(27, reading(gone(0), gone(7)), 10, 4, all), [b]);

        // An actor activated elsewhere reads since when they left: it waits for its confirmation only.
        let mut moved = GoneCustomers::default();
        assert_eq!(moved.read(100, reading(gone(0), gone(95)), 10, 4, all), []);
        assert_eq!(moved.read(104, reading(gone(0), gone(95)), 10, 4, all), [a]);
        assert_eq!(moved.read(105, reading(gone(0), gone(95)), 10, 4, all), [b], "ten after b left");

        // A stale record (presence restored from an old copy) is written again by the gateway within the
        // confirmation: the count starts again; a failed reading starts every count again; so does a chat
        // listed again.
        let mut stale = GoneCustomers::default();
        assert_eq!(stale.read(0, reading(gone(-1_000), gone(-1_000)), 10, 4, all), []);
        assert_eq!(stale.read(3, reading(Connections::Here, gone(-1_000)), 10, 4, all), []);
        assert_eq!(stale.read(4, reading(gone(-1_000), gone(-1_000)), 10, 4, |chat| *chat != b), []);
        assert_eq!(stale.read(6, None, 10, 4, all), []);
        assert_eq!(stale.read(9, reading(gone(-1_000), gone(-1_000)), 10, 4, all), []);
        assert_eq!(stale.read(13, reading(gone(-1_000), gone(-1_000)), 10, 4, all), [a, b]);
    }
}
