#![allow(dead_code)] // shared by several test binaries, each using a part
//! A router on the in-memory store, with a fixed clock for database time and tokio's paused clock
//! for timers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use switchboard_domain::{
    AgentEntry, AgentId, BusinessHours, Clock, ConversationId, Directory, FixedClock, GroupEntry, GroupId, HoursSpec,
    Routing, TenantEntry, TenantId,
};
use switchboard_presence::{MemoryPresence, Presence};
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, CreateTicketRequest,
    CreateTicketResponse, GetConversationRequest, GetConversationResponse, GetLicenseRequest, GetPlacementRequest,
    License, ListConversationsRequest, ListConversationsResponse, ListTicketsRequest, ListTicketsResponse, Placement,
    ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse, ReleaseShardsRequest,
    ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse, SetLicenseLimitRequest,
};
use switchboard_proto::router::{GatewayId, Push, RouterApi, StartChat};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_router::{LeaseSettings, PresenceSettings, Router, RouterSettings};
use switchboard_store::MemoryStore;
use tokio::sync::mpsc;

/// How long an offer lasts in group `push`.
pub const OFFER_TIMEOUT_MS: i64 = 10_000;
/// The presence heartbeat and grace period of the test routers.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
pub const GRACE: Duration = Duration::from_secs(5);
/// How long an active chat's customer is gone before `customer_left`: another figure than the agents', so that
/// the tests tell them apart.
pub const CUSTOMER_GRACE: Duration = Duration::from_secs(8);
/// How long the customer of a waiting chat is found gone before the chat is abandoned.
pub const ABANDON_AFTER: Duration = Duration::from_secs(20);
/// How often the gateways write each customer connection again: a departure is acted on once readings have
/// found it over two of them (6 s), or its grace period when shorter.
pub const CUSTOMER_HEARTBEAT: Duration = Duration::from_secs(3);

pub struct Fixture {
    pub router: Router,
    pub store: Arc<MemoryStore>,
    pub clock: Arc<FixedClock>,
    pub presence: Arc<MemoryPresence>,
    pub pushes: mpsc::UnboundedReceiver<Push>,
    pub gateway: GatewayId,
    /// The router's store: `store`, counting its event reads.
    pub counted: Arc<CountedReads>,
}

/// A store that counts the reads of events and the appends it serves, for `inner`.
pub struct CountedReads {
    inner: Arc<MemoryStore>,
    reads: AtomicUsize,
    /// The `get_conversation` calls: one per activation of a conversation.
    gets: AtomicUsize,
    appends: AtomicUsize,
    /// Appends whose update names a finished state (the store gives the license permit back for them).
    finishing: AtomicUsize,
    /// Held: the next append that creates a chat with its offer, until the sender goes; stored before (its
    /// answer held) or after (the append itself held) when the flag says so.
    held: std::sync::Mutex<Option<(tokio::sync::oneshot::Receiver<()>, bool)>>,
    /// Held: the answer to the next list of conversations (read already) that has this one, until the sender
    /// goes; `list_held` is set once it is held.
    held_list: std::sync::Mutex<Option<(ConversationId, tokio::sync::oneshot::Receiver<()>)>>,
    pub list_held: std::sync::atomic::AtomicBool,
    /// Held: the next append of any kind, not stored yet, until the sender goes.
    held_append: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// Records answered as a database migrated from before the delivery marks has them: not known.
    pub marks_unknown: std::sync::atomic::AtomicBool,
}

impl CountedReads {
    pub fn new(inner: Arc<MemoryStore>) -> Self {
        CountedReads {
            inner,
            reads: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
            appends: AtomicUsize::new(0),
            finishing: AtomicUsize::new(0),
            held: Default::default(),
            held_list: Default::default(),
            list_held: Default::default(),
            held_append: Default::default(),
            marks_unknown: Default::default(),
        }
    }

    /// Holds the answer to the next list of conversations that has `conversation` (read before it is held)
    /// until the returned sender is used or dropped.
    pub fn hold_next_list_with(&self, conversation: ConversationId) -> tokio::sync::oneshot::Sender<()> {
        let (release, held) = tokio::sync::oneshot::channel();
        *self.held_list.lock().unwrap() = Some((conversation, held));
        release
    }

    /// Holds the answer to the next append that creates a chat with its offer (it is stored at once) until the
    /// returned sender is used or dropped.
    pub fn hold_next_opening_offer(&self) -> tokio::sync::oneshot::Sender<()> {
        let (release, held) = tokio::sync::oneshot::channel();
        *self.held.lock().unwrap() = Some((held, true));
        release
    }

    /// Holds the next append that creates a chat with its offer, not stored yet, until the returned sender is
    /// used or dropped.
    pub fn hold_next_opening_offer_unstored(&self) -> tokio::sync::oneshot::Sender<()> {
        let (release, held) = tokio::sync::oneshot::channel();
        *self.held.lock().unwrap() = Some((held, false));
        release
    }

    /// Holds the next append, whatever it stores, before it is stored, until the returned sender is used or
    /// dropped: the conversation appending waits in its turn meanwhile.
    pub fn hold_next_append(&self) -> tokio::sync::oneshot::Sender<()> {
        let (release, held) = tokio::sync::oneshot::channel();
        *self.held_append.lock().unwrap() = Some(held);
        release
    }

    /// The `read_events` calls so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// The `get_conversation` calls so far (one per activation).
    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// The `append` calls so far.
    pub fn appends(&self) -> usize {
        self.appends.load(Ordering::SeqCst)
    }

    /// The appends so far whose update names the state `closed` or `cancelled`.
    pub fn finishing_appends(&self) -> usize {
        self.finishing.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl StoreApi for CountedReads {
    async fn acquire_shards(&self, request: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError> {
        self.inner.acquire_shards(request).await
    }
    async fn renew_shards(&self, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
        self.inner.renew_shards(request).await
    }
    async fn append(&self, request: AppendRequest) -> Result<AppendResponse, StoreError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        if request.update.as_ref().is_some_and(|update| matches!(update.state.as_str(), "closed" | "cancelled")) {
            self.finishing.fetch_add(1, Ordering::SeqCst);
        }
        let held_append = self.held_append.lock().unwrap().take();
        if let Some(held) = held_append {
            let _ = held.await;
        }
        let opening_offer = request.create.is_some() && request.events.iter().any(|event| event.kind == "offered");
        let held = if opening_offer { self.held.lock().unwrap().take() } else { None };
        let (held, stored_first) = match held {
            Some((held, stored_first)) => (Some(held), stored_first),
            None => (None, true),
        };
        if !stored_first && let Some(held) = held {
            let _ = held.await;
            return self.inner.append(request).await;
        }
        let answer = self.inner.append(request).await;
        if let Some(held) = held {
            let _ = held.await;
        }
        answer
    }
    async fn read_events(&self, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_events(request).await
    }
    async fn get_conversation(&self, request: GetConversationRequest) -> Result<GetConversationResponse, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let mut answer = self.inner.get_conversation(request).await?;
        if self.marks_unknown.load(Ordering::SeqCst)
            && let Some(record) = answer.conversation.as_mut()
        {
            (record.customer_delivered_up_to, record.agent_delivered_up_to, record.delivery_marks_known) =
                (0, 0, false);
        }
        Ok(answer)
    }
    async fn list_conversations(
        &self,
        request: ListConversationsRequest,
    ) -> Result<ListConversationsResponse, StoreError> {
        let answer = self.inner.list_conversations(request).await;
        let has = |id: ConversationId| {
            answer.as_ref().is_ok_and(|list| list.conversations.iter().any(|record| record.id == id.to_string()))
        };
        let held = {
            let mut held_list = self.held_list.lock().unwrap();
            match held_list.take() {
                Some((id, held)) if has(id) => Some(held),
                other => {
                    *held_list = other;
                    None
                }
            }
        };
        if let Some(held) = held {
            self.list_held.store(true, Ordering::SeqCst);
            let _ = held.await;
        }
        answer
    }
    async fn release_shards(&self, request: ReleaseShardsRequest) -> Result<ReleaseShardsResponse, StoreError> {
        self.inner.release_shards(request).await
    }
    async fn register_node(&self, request: RegisterNodeRequest) -> Result<RegisterNodeResponse, StoreError> {
        self.inner.register_node(request).await
    }
    async fn get_placement(&self, request: GetPlacementRequest) -> Result<Placement, StoreError> {
        self.inner.get_placement(request).await
    }
    async fn get_license(&self, request: GetLicenseRequest) -> Result<License, StoreError> {
        self.inner.get_license(request).await
    }
    async fn set_license_limit(&self, request: SetLicenseLimitRequest) -> Result<License, StoreError> {
        self.inner.set_license_limit(request).await
    }
    async fn create_ticket(&self, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError> {
        self.inner.create_ticket(request).await
    }
    async fn list_tickets(&self, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError> {
        self.inner.list_tickets(request).await
    }
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

/// Groups g1 (without a waiting-time SLA) and g2 (an SLA of [`G2_WAIT_SLA_MS`]); agents a (g1, g2; capacity 2),
/// b and c (g1; capacity 5). The other groups have the default SLA.
/// Group `push` routes by offer (x capacity 1, y capacity 2, z capacity 3); group `never` is never open (a
/// schedule with no opening); group `t` (pull) has agent w; group `office` is open on weekdays 09:00-17:00 in
/// Berlin (member w).
pub const G2_WAIT_SLA_MS: i64 = 60_000;

pub fn directory() -> Directory {
    let mut push = GroupEntry::new(group("push"), "push");
    push.routing = Routing::Push { offer_timeout_ms: OFFER_TIMEOUT_MS };
    let mut never = GroupEntry::new(group("never"), "never");
    never.hours = BusinessHours::new(&HoursSpec { time_zone: "Europe/Berlin".into(), ..Default::default() }).unwrap();
    let weekdays = vec!["09:00-17:00".to_owned()];
    let mut office = GroupEntry::new(group("office"), "office");
    office.hours = BusinessHours::new(&HoursSpec {
        time_zone: "Europe/Berlin".into(),
        weekly: switchboard_domain::WeeklySpec {
            mon: weekdays.clone(),
            tue: weekdays.clone(),
            wed: weekdays.clone(),
            thu: weekdays.clone(),
            fri: weekdays,
            ..Default::default()
        },
        holidays: vec![],
    })
    .unwrap();
    let groups = [
        (group("office"), office),
        (group("g1"), GroupEntry { wait_sla_ms: None, ..GroupEntry::new(group("g1"), "g1") }),
        (group("g2"), GroupEntry { wait_sla_ms: Some(G2_WAIT_SLA_MS), ..GroupEntry::new(group("g2"), "g2") }),
        (group("push"), push),
        (group("never"), never),
        (group("t"), GroupEntry::new(group("t"), "t")),
    ];
    let agents = [
        ("a", vec!["g1", "g2"], 2),
        ("b", vec!["g1"], 5),
        ("c", vec!["g1"], 5),
        ("x", vec!["push"], 1),
        ("y", vec!["push"], 2),
        ("z", vec!["push"], 3),
        ("w", vec!["t", "never", "office"], 2),
    ]
    .map(|(id, groups, capacity)| {
        let entry =
            AgentEntry { id: agent(id), name: id.into(), groups: groups.into_iter().map(group).collect(), capacity };
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

pub fn router_settings(node_id: &str) -> RouterSettings {
    RouterSettings {
        node_id: node_id.into(),
        advertise: String::new(),
        leases: LeaseSettings::default(),
        closed_list_limit: 50,
        page_bytes: RouterSettings::PAGE_BYTES,
        presence: PresenceSettings {
            heartbeat: HEARTBEAT,
            grace: GRACE,
            customer_grace: CUSTOMER_GRACE,
            abandon_after: Some(ABANDON_AFTER),
            customer_heartbeat: CUSTOMER_HEARTBEAT,
        },
    }
}

pub async fn start_router(node_id: &str, store: Arc<MemoryStore>, clock: Arc<FixedClock>) -> Router {
    start_router_with(node_id, store, clock, Arc::new(MemoryPresence::new())).await
}

pub async fn start_router_with(
    node_id: &str,
    store: Arc<dyn StoreApi>,
    clock: Arc<FixedClock>,
    presence: Arc<MemoryPresence>,
) -> Router {
    start_router_from(router_settings(node_id), store, clock, presence).await
}

pub async fn start_router_from(
    settings: RouterSettings,
    store: Arc<dyn StoreApi>,
    clock: Arc<FixedClock>,
    presence: Arc<MemoryPresence>,
) -> Router {
    let clock_dyn: Arc<dyn Clock> = clock;
    let presence: Arc<dyn Presence> = presence;
    Router::start(settings, store, clock_dyn, Arc::new(directory()), presence, None).await.unwrap()
}

pub async fn fixture() -> Fixture {
    let clock = Arc::new(FixedClock::new(1_700_000_000_000));
    let clock_dyn: Arc<dyn Clock> = clock.clone();
    let store = Arc::new(MemoryStore::new(clock_dyn));
    let presence = Arc::new(MemoryPresence::new());
    let counted = Arc::new(CountedReads::new(store.clone()));
    let router = start_router_with("node-1", counted.clone(), clock.clone(), presence.clone()).await;
    let gateway = GatewayId("gw-1".into());
    let (sink, pushes) = mpsc::unbounded_channel();
    router.connect_gateway(gateway.clone(), sink);
    Fixture { router, store, clock, presence, pushes, gateway, counted }
}

impl Fixture {
    /// Lets `ms` pass on both clocks (the injected one and tokio's paused one), then lets the actors run.
    pub async fn pass(&self, ms: i64) {
        pass(&self.clock, ms).await;
    }

    /// Drains the pushes received so far.
    pub fn drain(&mut self) -> Vec<Push> {
        let mut pushes = Vec::new();
        while let Ok(push) = self.pushes.try_recv() {
            pushes.push(push);
        }
        pushes
    }

    pub async fn start_chat(&self, group_name: &str, customer: &str) -> ConversationId {
        self.clock.advance_ms(1);
        let conversation = ConversationId::new_v7(self.clock.now_ms());
        let request = start_request(conversation, group(group_name), customer, &format!("question from {customer}"));
        self.router.start_chat(request).await.unwrap().view.conversation
    }
}

/// A chat start without a key in the test tenant, as a gateway sends it (a token of its own, a first try).
pub fn start_request(conversation: ConversationId, group: GroupId, customer: &str, question: &str) -> StartChat {
    StartChat {
        conversation,
        tenant: tenant(),
        group,
        customer_name: customer.into(),
        question: question.into(),
        tried_before: false,
        customer_token: switchboard_domain::new_customer_token(),
    }
}

/// Lets `ms` pass on both clocks (the injected one and tokio's paused one), in steps of 100 ms, then lets the
/// actors run.
pub async fn pass(clock: &FixedClock, ms: i64) {
    let step = 100;
    let mut left = ms;
    while left > 0 {
        let now = left.min(step);
        clock.advance_ms(now);
        tokio::time::advance(Duration::from_millis(u64::try_from(now).unwrap())).await;
        left -= now;
    }
    settle().await;
}

/// Lets every actor and task process what it was sent (paused time: no time passes).
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}
