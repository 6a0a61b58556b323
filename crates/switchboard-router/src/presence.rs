//! What a router reads of presence: whether a group is online (open by its hours, at least one agent
//! signed in). Presence may be stale (Redis down): then the last status this node knew stands, with the
//! business hours evaluated here. And how long the customers of chats have been found gone, read every few
//! heartbeats.

use std::collections::HashMap;
use std::sync::Arc;

use switchboard_domain::{ConversationId, GroupId, TenantId};
use switchboard_presence::CustomerPresence;
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

/// Since when every reading has found the customer of each chat gone, for the chats an actor reads every
/// few heartbeats (a queue its waiting chats, an agent their active ones). A customer counts as gone from
/// the first reading that found them gone, and only while every later one does: a reading that failed
/// starts every count again (presence may have lost connections that were live, which the gateways write
/// again within a customer heartbeat), as an actor activated on another node does. A customer nobody
/// recorded (`Unknown`) is never gone.
#[derive(Debug, Default)]
pub(crate) struct GoneCustomers {
    since_ms: HashMap<ConversationId, i64>,
    /// Heartbeats since a reading was last due.
    ticks: u32,
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

    /// Counts the reading made at `at_ms` (`None`: it failed), and answers the chats whose customer has been
    /// gone for `for_ms` at least: their counts start again, from the next reading. Chats no longer
    /// `listed` are forgotten.
    pub(crate) fn read(
        &mut self,
        at_ms: i64,
        read: Option<Vec<(ConversationId, CustomerPresence)>>,
        for_ms: i64,
        listed: impl Fn(&ConversationId) -> bool,
    ) -> Vec<ConversationId> {
        let Some(read) = read else {
            self.since_ms.clear();
            return Vec::new();
        };
        let mut gone = Vec::new();
        for (conversation, presence) in read {
            if presence != CustomerPresence::Gone || !listed(&conversation) {
                self.since_ms.remove(&conversation);
                continue;
            }
            let since = *self.since_ms.entry(conversation).or_insert(at_ms);
            if at_ms.saturating_sub(since) >= for_ms {
                gone.push(conversation);
            }
        }
        self.since_ms.retain(|conversation, _| listed(conversation));
        for conversation in &gone {
            self.since_ms.remove(conversation);
        }
        gone
    }

    /// Forgets every count (nothing is listed any more).
    pub(crate) fn clear(&mut self) {
        self.since_ms.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_customer_is_gone_once_every_reading_for_the_period_found_them_gone_and_counts_again_after() {
        let (a, b, c) = (ConversationId::new_v7(1), ConversationId::new_v7(2), ConversationId::new_v7(3));
        let mut gone = GoneCustomers::default();
        let reading = |a_is, b_is| Some(vec![(a, a_is), (b, b_is), (c, CustomerPresence::Unknown)]);
        let all = |_: &ConversationId| true;
        use CustomerPresence::{Gone, Here};
        assert_eq!(gone.read(0, reading(Gone, Gone), 10, all), []);
        // b is back for one reading: its count starts again.
        assert_eq!(gone.read(5, reading(Gone, Here), 10, all), []);
        assert_eq!(gone.read(10, reading(Gone, Gone), 10, all), [a]);
        // a's count starts again after it was answered; b's from 10.
        assert_eq!(gone.read(15, reading(Gone, Gone), 10, all), []);
        assert_eq!(gone.read(20, reading(Gone, Gone), 10, all), [b]);
        // A failed reading starts every count again.
        assert_eq!(gone.read(25, None, 10, all), []);
        assert_eq!(gone.read(30, reading(Gone, Gone), 10, all), []);
        assert_eq!(gone.read(40, reading(Gone, Gone), 10, |chat| *chat != a), [b], "a is no longer listed");
        assert_eq!(gone.read(45, reading(Gone, Gone), 10, all), [], "a counts afresh");
        assert_eq!(gone.read(55, reading(Gone, Gone), 10, all), [a, b]);
    }
}
