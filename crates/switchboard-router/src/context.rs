//! What every actor of a router node shares: the store, the clock, the directory, the gateways' push
//! channels, the shard table and the actor registries.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use switchboard_domain::{AgentId, Clock, ConversationId, Directory, GroupId, TenantId};
use switchboard_presence::{GroupStatus, Presence};
use switchboard_proto::router::{ClusterApi, GatewayId, Push};
use switchboard_proto::store::StoreApi;
use tokio::sync::mpsc;

use crate::agent::AgentMsg;
use crate::conversation::ConversationMsg;
use crate::placement::ShardTable;
use crate::queue::QueueMsg;
use crate::registry::Registry;

pub(crate) struct Context {
    pub(crate) node_id: String,
    /// Where this node's router service listens, for the other nodes and the gateways.
    pub(crate) advertise: String,
    /// The rest of the cluster, for actors whose shard another node owns; `None` on a single node.
    pub(crate) peers: Option<Arc<dyn ClusterApi>>,
    /// Wakes the lease keeper at once (shards were freed somewhere).
    pub(crate) placement_changed: tokio::sync::Notify,
    pub(crate) store: Arc<dyn StoreApi>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) directory: Arc<Directory>,
    pub(crate) gateways: Gateways,
    /// The gateways subscribed to each conversation. Kept outside the actors, so that an actor stopped after
    /// a failed write (and rebuilt from the store) still pushes to them; forgotten when the shard is given up
    /// (the gateways subscribe again on the new owner).
    pub(crate) subscribers: Subscribers,
    pub(crate) shards: ShardTable,
    pub(crate) conversations: Registry<ConversationId, ConversationMsg>,
    pub(crate) agents: Registry<(TenantId, AgentId), AgentMsg>,
    pub(crate) queues: Registry<(TenantId, GroupId), QueueMsg>,
    pub(crate) closed_list_limit: u32,
    /// The most bytes of events one read answers with (`RouterSettings::page_bytes`).
    pub(crate) page_bytes: u64,
    /// Agent presence and group status (Redis in a cluster, in memory in `serve`).
    pub(crate) presence: Arc<dyn Presence>,
    pub(crate) presence_settings: PresenceSettings,
    /// The group statuses this node read or wrote last, for when presence cannot be read.
    pub(crate) group_statuses: Mutex<HashMap<(TenantId, GroupId), GroupStatus>>,
}

/// How presence is kept and how long an absent agent keeps their chats.
#[derive(Debug, Clone, Copy)]
pub struct PresenceSettings {
    /// How often agents' connections are checked, signed-in agents refreshed and group statuses evaluated.
    pub heartbeat: Duration,
    /// How long an agent whose connections are all gone stays signed in (their chats kept) before going
    /// offline (their chats go back to the head of their queue, their offer moves on).
    pub grace: Duration,
    /// How long the customer of an active chat stays gone (every connection closed or expired in presence)
    /// before the chat records `customer_left`.
    pub customer_grace: Duration,
    /// How long the customer of a waiting chat must be found gone (every connection closed or expired in
    /// presence) before the chat is cancelled as abandoned; `None`: never. Longer than the gateways'
    /// customer heartbeat, so that connections presence lost (a Redis restart) are written again first.
    pub abandon_after: Option<Duration>,
    /// How often the gateways write each customer connection to presence again (their setting): a customer
    /// presence says is gone must be found gone over two of them before anything is recorded, so that a
    /// connection presence lost or restored stale (a Redis restart, a failover) is written again first.
    pub customer_heartbeat: Duration,
}

/// The default of [`PresenceSettings::abandon_after`].
pub const DEFAULT_ABANDON_AFTER: Duration = Duration::from_secs(60);

impl Default for PresenceSettings {
    fn default() -> Self {
        PresenceSettings {
            heartbeat: Duration::from_secs(1),
            grace: Duration::from_secs(30),
            customer_grace: Duration::from_secs(30),
            abandon_after: Some(DEFAULT_ABANDON_AFTER),
            customer_heartbeat: Duration::from_secs(10),
        }
    }
}

impl PresenceSettings {
    /// How long a signed-in mark lives without a refresh.
    pub(crate) fn ttl_ms(&self) -> i64 {
        i64::try_from(self.heartbeat.as_millis().saturating_mul(3)).unwrap_or(i64::MAX)
    }

    pub(crate) fn grace_ms(&self) -> i64 {
        i64::try_from(self.grace.as_millis()).unwrap_or(i64::MAX)
    }

    pub(crate) fn customer_grace_ms(&self) -> i64 {
        i64::try_from(self.customer_grace.as_millis()).unwrap_or(i64::MAX)
    }

    /// How long heartbeats must find an agent without a live connection, from the first that did, before a
    /// grace period over (by presence's own instant) is acted on: two heartbeats (the gateways write each
    /// agent connection again every heartbeat), or the grace period when shorter.
    pub(crate) fn agent_confirm_ms(&self) -> i64 {
        let two_heartbeats = i64::try_from(self.heartbeat.as_millis().saturating_mul(2)).unwrap_or(i64::MAX);
        two_heartbeats.min(self.grace_ms())
    }

    /// How long readings must find a customer gone, from the first that did, before a departure of at least
    /// `for_ms` (by presence's own instant) is acted on: two customer heartbeats, or `for_ms` when shorter.
    pub(crate) fn customer_confirm_ms(&self, for_ms: i64) -> i64 {
        let two_heartbeats = i64::try_from(self.customer_heartbeat.as_millis().saturating_mul(2)).unwrap_or(i64::MAX);
        two_heartbeats.min(for_ms)
    }
}

/// The push channel of every connected gateway.
#[derive(Default)]
pub(crate) struct Gateways {
    sinks: Mutex<HashMap<GatewayId, mpsc::UnboundedSender<Push>>>,
}

impl Gateways {
    pub(crate) fn connect(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        self.lock().insert(gateway, sink);
    }

    /// Sends a push to one gateway; false when that gateway is gone (its subscriptions should be dropped).
    pub(crate) fn push(&self, gateway: &GatewayId, push: Push) -> bool {
        let mut sinks = self.lock();
        match sinks.get(gateway) {
            Some(sink) if sink.send(push).is_ok() => true,
            Some(_) => {
                sinks.remove(gateway);
                false
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GatewayId, mpsc::UnboundedSender<Push>>> {
        self.sinks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Default)]
pub(crate) struct Subscribers {
    by_conversation: Mutex<HashMap<ConversationId, BTreeSet<GatewayId>>>,
}

impl Subscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationId, BTreeSet<GatewayId>>> {
        self.by_conversation.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn add(&self, conversation: ConversationId, gateway: GatewayId) {
        self.lock().entry(conversation).or_default().insert(gateway);
    }

    pub(crate) fn remove(&self, conversation: ConversationId, gateway: &GatewayId) {
        let mut all = self.lock();
        if let Some(gateways) = all.get_mut(&conversation) {
            gateways.remove(gateway);
            if gateways.is_empty() {
                all.remove(&conversation);
            }
        }
    }

    pub(crate) fn of(&self, conversation: ConversationId) -> Vec<GatewayId> {
        self.lock().get(&conversation).map(|gateways| gateways.iter().cloned().collect()).unwrap_or_default()
    }

    pub(crate) fn forget_where(&self, matches: impl Fn(&ConversationId) -> bool) {
        self.lock().retain(|conversation, _| !matches(conversation));
    }
}
