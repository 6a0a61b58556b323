#![allow(dead_code)] // shared by several test binaries, each using a part
//! A router on the in-memory store, with a fixed clock for database time and tokio's paused clock
//! for timers.

use std::collections::BTreeMap;
use std::sync::Arc;

use switchboard_domain::{
    AgentEntry, AgentId, Clock, ConversationId, Directory, FixedClock, GroupEntry, GroupId, TenantEntry, TenantId,
};
use switchboard_proto::router::{GatewayId, Push, RouterApi, StartChat};
use switchboard_router::{LeaseSettings, Router, RouterSettings};
use switchboard_store::MemoryStore;
use tokio::sync::mpsc;

pub struct Fixture {
    pub router: Router,
    pub store: Arc<MemoryStore>,
    pub clock: Arc<FixedClock>,
    pub pushes: mpsc::UnboundedReceiver<Push>,
    pub gateway: GatewayId,
}

pub fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

pub fn group(name: &str) -> GroupId {
    GroupId::new(name).unwrap()
}

pub fn agent(name: &str) -> AgentId {
    AgentId::new(name).unwrap()
}

/// Groups g1 and g2; agents a (g1, g2; capacity 2), b and c (g1; capacity 5).
pub fn directory() -> Directory {
    let groups = ["g1", "g2"].map(|id| (group(id), GroupEntry { id: group(id), name: id.into() }));
    let agents =
        [("a", vec!["g1", "g2"], 2), ("b", vec!["g1"], 5), ("c", vec!["g1"], 5)].map(|(id, groups, capacity)| {
            let entry = AgentEntry {
                id: agent(id),
                name: id.into(),
                groups: groups.into_iter().map(group).collect(),
                capacity,
            };
            (agent(id), entry)
        });
    let entry = TenantEntry {
        id: tenant(),
        name: "Acme".into(),
        groups: BTreeMap::from(groups),
        agents: BTreeMap::from(agents),
    };
    let mut directory = Directory::default();
    directory.add_tenant(entry, vec![], vec![]).unwrap();
    directory
}

pub async fn start_router(node_id: &str, store: Arc<MemoryStore>, clock: Arc<FixedClock>) -> Router {
    let settings = RouterSettings {
        node_id: node_id.into(),
        advertise: String::new(),
        leases: LeaseSettings::default(),
        closed_list_limit: 50,
    };
    let clock_dyn: Arc<dyn Clock> = clock;
    Router::start(settings, store, clock_dyn, Arc::new(directory()), None).await.unwrap()
}

pub async fn fixture() -> Fixture {
    let clock = Arc::new(FixedClock::new(1_700_000_000_000));
    let clock_dyn: Arc<dyn Clock> = clock.clone();
    let store = Arc::new(MemoryStore::new(clock_dyn));
    let router = start_router("node-1", store.clone(), clock.clone()).await;
    let gateway = GatewayId("gw-1".into());
    let (sink, pushes) = mpsc::unbounded_channel();
    router.connect_gateway(gateway.clone(), sink);
    Fixture { router, store, clock, pushes, gateway }
}

impl Fixture {
    pub async fn start_chat(&self, group_name: &str, customer: &str) -> ConversationId {
        self.clock.advance_ms(1);
        let request = StartChat {
            conversation: ConversationId::new_v7(self.clock.now_ms()),
            tenant: tenant(),
            group: group(group_name),
            customer_name: customer.into(),
            question: format!("question from {customer}"),
        };
        self.router.start_chat(request).await.unwrap().view.conversation
    }
}
