//! Several routers on one store, reaching each other through an in-process stand-in for the cluster
//! client: shards are shared fairly, actors on different nodes cooperate, and a node that leaves hands its
//! shards over. Paused tokio time; database time is the fixed clock.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use common::{CountedReads, agent, directory, group, start_request, tenant};
use switchboard_domain::{
    AgentAvailability, AgentId, AgentStatus, Clock, ConversationId, ConversationState, EventBody, FixedClock, GroupId,
    OfferEnd, Refusal, TenantId, WaitingEntry, agent_key, conversation_key, queue_key,
};
use switchboard_presence::{MemoryPresence, Outage, Presence};
use switchboard_proto::internal::v1::GetConversationRequest;
use switchboard_proto::router::{
    AgentChange, AgentView, Caller, ChatCommand, ChatList, ChatView, ClusterApi, CommandOutcome, EventPage, GatewayId,
    LeftQueue, OfferUpdate, OfflineMessage, PeerApi, Push, QueueChange, RouterApi, RouterError, ShownOffer, StartChat,
    StartedChat, SystemCommand, Ticket,
};
use switchboard_proto::store::StoreApi;
use switchboard_router::Router;
use switchboard_store::MemoryStore;
use tokio::sync::mpsc;

/// Sends each call to the first router that does not answer `NotOwner`, as the gRPC cluster client does
/// with real placement.
#[derive(Default)]
struct LocalCluster {
    routers: std::sync::Mutex<Vec<Arc<Router>>>,
    /// While set, every cast of an agent's availability to another node's queue is lost (fails for good).
    lose_availability: AtomicBool,
    /// While set, a chat's cast to another node's queue takes this long on the clock (a slow hop, retries).
    slow_queue_adds: OnceLock<(Arc<FixedClock>, i64)>,
    /// While set, every offer shown to an agent of another node never arrives nor answers (a node that stops
    /// between recording an offer and showing it).
    hold_offers: AtomicBool,
    /// While set, every offer shown to an agent of another node waits, and arrives once it is cleared (and
    /// `offers_released` notified): a slow hop. How many waited, in `offers_delayed`.
    delay_offers: AtomicBool,
    offers_released: tokio::sync::Notify,
    offers_delayed: AtomicUsize,
    /// How many of those arrived, late.
    offers_arrived_late: AtomicUsize,
    /// While set, every offer shown to an agent of another node is refused by the agent.
    refuse_offers: AtomicBool,
    /// While set, every system command to a conversation of another node is lost.
    lose_system_commands: AtomicBool,
    /// While set, every offer end told to an agent of another node is lost (as when all its retries fail).
    lose_offer_ends: AtomicBool,
    /// While set, every accept of a chat of another node is carried out, and its answer lost.
    lose_accept_answers: AtomicBool,
    /// While set, every chat's hand-over to, or removal from, a queue of another node is lost; how many were,
    /// in `queue_changes_lost`.
    lose_queue_changes: AtomicBool,
    queue_changes_lost: AtomicUsize,
    /// While set, every end of a chat told to an agent of another node is lost; how many were, in
    /// `agent_finishes_lost`.
    lose_agent_finishes: AtomicBool,
    agent_finishes_lost: AtomicUsize,
}

impl LocalCluster {
    /// Whether a queue change is lost on its way (counted).
    fn queue_change_lost(&self) -> bool {
        let lost = self.lose_queue_changes.load(Ordering::SeqCst);
        if lost {
            self.queue_changes_lost.fetch_add(1, Ordering::SeqCst);
        }
        lost
    }
}

impl LocalCluster {
    /// Lets the offers held by `delay_offers` go on.
    fn release_offers(&self) {
        self.delay_offers.store(false, Ordering::SeqCst);
        self.offers_released.notify_waiters();
    }
}

impl LocalCluster {
    fn routers(&self) -> Vec<Arc<Router>> {
        self.routers.lock().unwrap().clone()
    }

    async fn first<T, Fut>(&self, ask: impl Fn(Arc<Router>) -> Fut) -> Result<T, RouterError>
    where
        Fut: Future<Output = Result<T, RouterError>>,
    {
        for router in self.routers() {
            match ask(router.clone()).await {
                Err(RouterError::NotOwner) => continue,
                result => return result,
            }
        }
        Err(RouterError::NotOwner)
    }
}

#[async_trait]
impl RouterApi for LocalCluster {
    fn connect_gateway(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        for router in self.routers() {
            router.connect_gateway(gateway.clone(), sink.clone());
        }
    }
    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError> {
        self.first(|router| {
            let request = request.clone();
            async move { router.start_chat(request).await }
        })
        .await
    }
    async fn authorize_customer(&self, conversation: ConversationId, token: &str) -> Result<ChatView, RouterError> {
        self.first(|router| async move { router.authorize_customer(conversation, token).await }).await
    }
    async fn chat_view(&self, caller: &Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        self.first(|router| async move { router.chat_view(caller, conversation).await }).await
    }
    async fn subscribe(
        &self,
        gateway: &GatewayId,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        self.first(|router| async move { router.subscribe(gateway, caller, conversation, after_seq).await }).await
    }
    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId) {
        for router in self.routers() {
            router.unsubscribe(gateway, conversation).await;
        }
    }
    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        self.first(|router| async move { router.read_events(caller, conversation, after_seq).await }).await
    }
    async fn command(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError> {
        self.first(|router| {
            let command = command.clone();
            async move { router.command(caller, conversation, command).await }
        })
        .await
    }
    async fn typing(&self, caller: &Caller, conversation: ConversationId, typing: bool) -> Result<(), RouterError> {
        self.first(|router| async move { router.typing(caller, conversation, typing).await }).await
    }
    async fn customer_connection(&self, conversation: ConversationId) -> Result<(), RouterError> {
        self.first(|router| async move { router.customer_connection(conversation).await }).await
    }
    async fn accept_chat(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError> {
        self.first(|router| async move { router.accept_chat(tenant, agent, conversation).await }).await
    }
    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError> {
        self.first(|router| async move { router.set_agent_status(tenant, agent, status).await }).await
    }
    async fn subscribe_queue(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        group: &GroupId,
    ) -> Result<(), RouterError> {
        self.first(|router| async move { router.subscribe_queue(gateway, tenant, group).await }).await
    }
    async fn unsubscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId) {
        for router in self.routers() {
            router.unsubscribe_queue(gateway, tenant, group).await;
        }
    }
    async fn subscribe_agent(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        agent: &AgentId,
        shown: &[ShownOffer],
    ) -> Result<(), RouterError> {
        self.first(|router| async move { router.subscribe_agent(gateway, tenant, agent, shown).await }).await
    }
    async fn unsubscribe_agent(&self, gateway: &GatewayId, tenant: &TenantId, agent: &AgentId) {
        for router in self.routers() {
            router.unsubscribe_agent(gateway, tenant, agent).await;
        }
    }
    async fn reject_offer(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.first(|router| async move { router.reject_offer(tenant, group, agent, conversation).await }).await
    }
    async fn transfer_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_group: &GroupId,
    ) -> Result<ChatView, RouterError> {
        self.first(|router| async move { router.transfer_chat(caller, conversation, to_group).await }).await
    }
    async fn forward_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        self.first(|router| async move { router.forward_chat(caller, conversation, to_agent).await }).await
    }
    async fn leave_offline_message(&self, message: OfflineMessage) -> Result<Ticket, RouterError> {
        self.first(|router| {
            let message = message.clone();
            async move { router.leave_offline_message(message).await }
        })
        .await
    }
    async fn list_chats(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        list: ChatList,
    ) -> Result<Vec<ChatView>, RouterError> {
        self.first(|router| async move { router.list_chats(tenant, agent, list).await }).await
    }
}

#[async_trait]
impl PeerApi for LocalCluster {
    async fn owner_accept(&self, conversation: ConversationId, agent: &AgentId) -> Result<ChatView, RouterError> {
        let accepted = self.first(|router| async move { router.owner_accept(conversation, agent).await }).await;
        if self.lose_accept_answers.load(Ordering::SeqCst) {
            return Err(RouterError::Unavailable("the answer was lost on the way".into()));
        }
        accepted
    }
    async fn queue_add(&self, tenant: &TenantId, entry: WaitingEntry, since_us: i64) -> Result<(), RouterError> {
        if let Some((clock, ms)) = self.slow_queue_adds.get() {
            clock.advance_ms(*ms);
        }
        if self.queue_change_lost() {
            return Err(RouterError::Unavailable("lost on the way".into()));
        }
        self.first(|router| {
            let entry = entry.clone();
            async move { router.queue_add(tenant, entry, since_us).await }
        })
        .await
    }
    async fn queue_remove(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        conversation: ConversationId,
        reason: LeftQueue,
    ) -> Result<(), RouterError> {
        if self.queue_change_lost() {
            return Err(RouterError::Unavailable("lost on the way".into()));
        }
        self.first(|router| {
            let reason = reason.clone();
            async move { router.queue_remove(tenant, group, conversation, reason).await }
        })
        .await
    }
    async fn agent_finished(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        if self.lose_agent_finishes.load(Ordering::SeqCst) {
            self.agent_finishes_lost.fetch_add(1, Ordering::SeqCst);
            return Err(RouterError::Unavailable("lost on the way".into()));
        }
        self.first(|router| async move { router.agent_finished(tenant, agent, conversation).await }).await
    }
    async fn conversation_system(
        &self,
        conversation: ConversationId,
        command: SystemCommand,
    ) -> Result<bool, RouterError> {
        if self.lose_system_commands.load(Ordering::SeqCst) {
            return Err(RouterError::Internal("lost on the way".into()));
        }
        self.first(|router| {
            let command = command.clone();
            async move { router.conversation_system(conversation, command).await }
        })
        .await
    }
    async fn agent_offer(&self, tenant: &TenantId, agent: &AgentId, update: OfferUpdate) -> Result<(), RouterError> {
        if matches!(update, OfferUpdate::Ended { .. }) && self.lose_offer_ends.load(Ordering::SeqCst) {
            return Err(RouterError::Unavailable("lost on the way".into()));
        }
        if matches!(update, OfferUpdate::Made { .. }) {
            if self.hold_offers.load(Ordering::SeqCst) {
                return std::future::pending().await;
            }
            if self.refuse_offers.load(Ordering::SeqCst) {
                return Err(RouterError::Refused(Refusal::AgentUnavailable));
            }
            if self.delay_offers.load(Ordering::SeqCst) {
                self.offers_delayed.fetch_add(1, Ordering::SeqCst);
                while self.delay_offers.load(Ordering::SeqCst) {
                    let released = self.offers_released.notified();
                    tokio::pin!(released);
                    released.as_mut().enable();
                    if !self.delay_offers.load(Ordering::SeqCst) {
                        break;
                    }
                    released.await;
                }
                let result = self.first(|router| {
                    let update = update.clone();
                    async move { router.agent_offer(tenant, agent, update).await }
                });
                let result = result.await;
                self.offers_arrived_late.fetch_add(1, Ordering::SeqCst);
                return result;
            }
        }
        self.first(|router| {
            let update = update.clone();
            async move { router.agent_offer(tenant, agent, update).await }
        })
        .await
    }
    async fn agent_availability(&self, tenant: &TenantId, agent: &AgentId) -> Result<AgentAvailability, RouterError> {
        self.first(|router| async move { router.agent_availability(tenant, agent).await }).await
    }
    async fn queue_agent_changed(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        availability: AgentAvailability,
    ) -> Result<(), RouterError> {
        if self.lose_availability.load(Ordering::SeqCst) {
            return Err(RouterError::Internal("lost on the way".into()));
        }
        self.first(|router| {
            let availability = availability.clone();
            async move { router.queue_agent_changed(tenant, group, availability).await }
        })
        .await
    }
    async fn owner_forward(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        self.first(|router| async move { router.owner_forward(caller, conversation, to_agent).await }).await
    }
}

struct Nodes {
    cluster: Arc<LocalCluster>,
    routers: Vec<Arc<Router>>,
    store: Arc<MemoryStore>,
    /// The routers' store: `store`, able to hold an append.
    counted: Arc<CountedReads>,
    clock: Arc<FixedClock>,
    presence: Arc<MemoryPresence>,
    /// The routers' presence: `presence`, until an outage.
    outage: Arc<Outage>,
}

async fn start_nodes(n: usize) -> Nodes {
    let clock = Arc::new(FixedClock::new(1_700_000_000_000));
    let clock_dyn: Arc<dyn Clock> = clock.clone();
    let store = Arc::new(MemoryStore::new(clock_dyn.clone()));
    let counted = Arc::new(CountedReads::new(store.clone()));
    let cluster = Arc::new(LocalCluster::default());
    let memory_presence = Arc::new(MemoryPresence::new());
    let outage = Arc::new(Outage::new(memory_presence.clone()));
    let mut nodes = Nodes { cluster, routers: Vec::new(), store, counted, clock, presence: memory_presence, outage };
    for i in 0..n {
        let router = join(&nodes, i).await;
        nodes.routers.push(router);
    }
    nodes
}

/// Starts router `node-{i}` on the nodes' store, clock and presence, reachable through their cluster.
async fn join(nodes: &Nodes, i: usize) -> Arc<Router> {
    let mut settings = common::router_settings(&format!("node-{i}"));
    settings.advertise = format!("local://node-{i}");
    let peers: Arc<dyn ClusterApi> = nodes.cluster.clone();
    let clock: Arc<dyn Clock> = nodes.clock.clone();
    let presence: Arc<dyn Presence> = nodes.outage.clone();
    let router = Router::start(settings, nodes.counted.clone(), clock, Arc::new(directory()), presence, Some(peers));
    let router = Arc::new(router.await.unwrap());
    nodes.cluster.routers.lock().unwrap().push(router.clone());
    router
}

/// Lets the lease keepers run until `done` holds (paused time: each round is one renewal period).
async fn settle(nodes: &Nodes, done: impl Fn(&[Arc<Router>]) -> bool) {
    for _ in 0..20 {
        if done(&nodes.routers) {
            return;
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }
    let owned: Vec<usize> = nodes.routers.iter().map(|router| router.n_shards_owned()).collect();
    panic!("the cluster did not settle: shards owned {owned:?}");
}

fn balanced(routers: &[Arc<Router>]) -> bool {
    let owned: Vec<usize> = routers.iter().map(|router| router.n_shards_owned()).collect();
    owned.iter().sum::<usize>() == 1024 && owned.iter().all(|n| *n == 1024 / routers.len())
}

/// A new conversation id for which `wanted` holds.
fn conversation_where(clock: &FixedClock, wanted: impl Fn(ConversationId) -> bool) -> ConversationId {
    loop {
        clock.advance_ms(1);
        let id = ConversationId::new_v7(clock.now_ms());
        if wanted(id) {
            return id;
        }
    }
}

/// Signs `agent` in online through gateway `gw`, connected all along (a session that a gateway keeps alive
/// for a day); answers the gateway's pushes.
async fn sign_in(nodes: &Nodes, agent: &AgentId) -> mpsc::UnboundedReceiver<Push> {
    let gateway = GatewayId("gw".into());
    let (sink, pushes) = mpsc::unbounded_channel();
    nodes.cluster.connect_gateway(gateway.clone(), sink);
    nodes.cluster.subscribe_agent(&gateway, &tenant(), agent, &[]).await.unwrap();
    let expires = nodes.clock.now_ms() + 24 * 60 * 60_000;
    nodes.presence.session_alive(&tenant(), agent, "s-1", "gw", expires).await.unwrap();
    nodes.cluster.set_agent_status(&tenant(), agent, AgentStatus::Online).await.unwrap();
    pushes
}

#[tokio::test(start_paused = true)]
async fn a_second_node_gets_its_fair_share_of_the_shards() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
}

#[tokio::test(start_paused = true)]
async fn an_agent_accepts_a_chat_that_lives_on_another_node_and_its_queue_is_told() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let (first, second) = (&nodes.routers[0], &nodes.routers[1]);
    let cluster = nodes.cluster.clone();
    let gateway = GatewayId("gw".into());
    let (sink, mut pushes) = mpsc::unbounded_channel();
    cluster.connect_gateway(gateway.clone(), sink);
    cluster.set_agent_status(&tenant(), &agent("b"), AgentStatus::Online).await.unwrap();
    cluster.subscribe_queue(&gateway, &tenant(), &group("g1")).await.unwrap();
    // The conversation on the node that does not own agent b.
    let agent_on_first = first.set_agent_status(&tenant(), &agent("b"), AgentStatus::Online).await.is_ok();
    let (agent_node, other) = if agent_on_first { (first, second) } else { (second, first) };
    let chat = conversation_where(&nodes.clock, |id| {
        other.owns_key(&conversation_key(&id)) && !agent_node.owns_key(&conversation_key(&id))
    });
    assert!(agent_node.owns_key(&agent_key(&tenant(), &agent("b"))));
    let request = start_request(chat, group("g1"), "x", "hello?");
    cluster.start_chat(request).await.unwrap();
    let view = cluster.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    assert_eq!(view.owner, Some(agent("b")));
    // The queue (wherever it lives) saw the chat come and go.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        tokio::task::yield_now().await;
        match tokio::time::timeout(Duration::from_secs(5), pushes.recv()).await {
            Ok(Some(Push::Queue { change, .. })) => seen.push(change),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("queue pushes missing: {seen:?}"),
        }
    }
    assert!(matches!(&seen[0], QueueChange::Snapshot { entries } if entries.is_empty()));
    assert!(matches!(&seen[1], QueueChange::Added { entry } if entry.conversation == chat));
    assert!(
        matches!(&seen[2], QueueChange::Removed { conversation, reason: LeftQueue::Accepted { agent: who } } if *conversation == chat && *who == agent("b"))
    );
    // The agent's node counts the chat: a close frees the slot again, across nodes.
    let agent_caller = Caller::Agent { tenant: tenant(), agent: agent("b") };
    cluster.command(&agent_caller, chat, ChatCommand::Close).await.unwrap();
    let mut active = usize::MAX;
    for _ in 0..50 {
        tokio::task::yield_now().await;
        active = cluster.set_agent_status(&tenant(), &agent("b"), AgentStatus::Online).await.unwrap().active.len();
        if active == 0 {
            break;
        }
    }
    assert_eq!(active, 0, "the agent's node was not told that the chat ended");
}

#[tokio::test(start_paused = true)]
async fn a_node_that_leaves_hands_its_shards_over_and_its_chats_go_on() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let (first, second) = (&nodes.routers[0], &nodes.routers[1]);
    let chat = conversation_where(&nodes.clock, |id| second.owns_key(&conversation_key(&id)));
    let request = start_request(chat, group("g1"), "x", "hello?");
    let started = nodes.cluster.start_chat(request).await.unwrap();
    let customer = Caller::Customer { conversation: chat };
    let send = ChatCommand::Send { client_msg_id: "m1".into(), body: "one".into() };
    nodes.cluster.command(&customer, chat, send).await.unwrap();

    second.shutdown().await.unwrap();
    assert_eq!(second.n_shards_owned(), 0);
    // The freed shards are taken at the next look at the placement.
    first.placement_changed();
    settle(&nodes, |routers| routers[0].n_shards_owned() == 1024).await;
    let send = ChatCommand::Send { client_msg_id: "m2".into(), body: "two".into() };
    let outcome = nodes.cluster.command(&customer, chat, send).await.unwrap();
    assert_eq!(outcome.event.map(|event| event.seq), Some(started.view.last_seq + 2));
    // The old node refuses what it no longer owns.
    let late = ChatCommand::Send { client_msg_id: "m3".into(), body: "three".into() };
    assert_eq!(second.command(&customer, chat, late).await, Err(RouterError::NotOwner));
}

#[tokio::test(start_paused = true)]
async fn a_queue_that_lost_an_agents_return_hears_of_it_at_a_later_heartbeat() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    let queue_node = push_queue_owner(&nodes);
    // An agent of the push group whose actor lives on the other node: their casts to the queue cross nodes.
    let remote = agent_of(&nodes.routers[1 - queue_node], &["x", "y", "z"]);
    let mut pushes = sign_in(&nodes, &remote).await;
    cluster.set_agent_status(&tenant(), &remote, AgentStatus::Away).await.unwrap();
    let offered = |pushes: &mut mpsc::UnboundedReceiver<Push>| {
        let mut offers = Vec::new();
        while let Ok(push) = pushes.try_recv() {
            if let Push::Agent { change: AgentChange::Offered { entry, .. }, .. } = push {
                offers.push(entry.conversation);
            }
        }
        offers
    };
    let pass = |seconds: u64| async move {
        for _ in 0..seconds {
            tokio::time::advance(Duration::from_secs(1)).await;
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
        }
    };
    pass(1).await;

    // The agent comes back, and the queue is not told.
    cluster.lose_availability.store(true, Ordering::SeqCst);
    cluster.set_agent_status(&tenant(), &remote, AgentStatus::Online).await.unwrap();
    pass(1).await;
    nodes.clock.advance_ms(1);
    let chat = ConversationId::new_v7(nodes.clock.now_ms());
    let request = start_request(chat, group("push"), "x", "anyone?");
    cluster.start_chat(request).await.unwrap();
    pass(2).await;
    assert_eq!(offered(&mut pushes), [], "the queue still takes the agent for away");

    // The way between the nodes works again: within the retelling period the queue knows, and offers.
    cluster.lose_availability.store(false, Ordering::SeqCst);
    pass(u64::from(switchboard_router::RETELL_EVERY_TICKS) + 1).await;
    assert_eq!(offered(&mut pushes), [chat]);
}

#[tokio::test(start_paused = true)]
async fn a_first_offer_counts_its_wait_from_when_the_chat_was_stored_however_long_the_hop_to_its_queue() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let queue_node = nodes.routers[push_queue_owner(&nodes)].clone();
    let agent = agent_of(&queue_node, &["x", "y", "z"]);
    let mut pushes = sign_in(&nodes, &agent).await;
    // The chat lives on the other node: its queue hears of it by a call that takes 40 ms.
    let chat = conversation_where(&nodes.clock, |id| !queue_node.owns_key(&conversation_key(&id)));
    assert!(nodes.cluster.slow_queue_adds.set((nodes.clock.clone(), 40)).is_ok());
    let stored_at_us = nodes.clock.now_ms() * 1_000;
    nodes.cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    let offered = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Some(Push::Agent { change: AgentChange::Offered { entry, waiting_since_us, .. }, .. }) =
                pushes.recv().await
            {
                return (entry.conversation, waiting_since_us);
            }
        }
    });
    assert_eq!(offered.await, Ok((chat, stored_at_us)), "waiting since the store took the chat, not 40 ms later");
    assert_eq!(nodes.clock.now_ms() * 1_000 - stored_at_us, 40_000, "the hop took its time");
}

/// The index of the node that owns the queue of group `push`.
fn push_queue_owner(nodes: &Nodes) -> usize {
    let owner = nodes.routers.iter().position(|router| router.owns_key(&queue_key(&tenant(), &group("push"))));
    owner.expect("some node owns the queue")
}

/// One of `candidates` whose agent actor lives on `router`.
fn agent_of(router: &Router, candidates: &[&str]) -> AgentId {
    let found = candidates.iter().map(|name| agent(name)).find(|who| router.owns_key(&agent_key(&tenant(), who)));
    found.unwrap_or_else(|| panic!("none of {candidates:?} lives on that node: pick others for this shard map"))
}

/// Lets `seconds` of heartbeats pass, on the database's clock and tokio's.
async fn heartbeats(nodes: &Nodes, seconds: u64) {
    for _ in 0..seconds {
        nodes.clock.advance_ms(1_000);
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }
}

/// On the node `on`: an agent signed in and connected all along, with their gateway's pushes; and another who
/// was online and whose last connection just closed, holding a chat (`holding`) or nothing.
async fn connected_and_gone(
    nodes: &Nodes,
    on: &Router,
    holding: bool,
) -> (AgentId, mpsc::UnboundedReceiver<Push>, AgentId, Option<ConversationId>) {
    let cluster = &nodes.cluster;
    let connected = agent_of(on, &["x", "y", "z"]);
    let pushes = sign_in(nodes, &connected).await;
    let gone = agent_of(on, &["a", "b", "c", "w"]);
    let expires = nodes.clock.now_ms() + 24 * 60 * 60_000;
    nodes.presence.session_alive(&tenant(), &gone, "s-2", "gw", expires).await.unwrap();
    cluster.set_agent_status(&tenant(), &gone, AgentStatus::Online).await.unwrap();
    let mut held = None;
    if holding {
        nodes.clock.advance_ms(1);
        let chat = ConversationId::new_v7(nodes.clock.now_ms());
        let pull_group = if gone == agent("w") { group("t") } else { group("g1") };
        cluster.start_chat(start_request(chat, pull_group, "y", "still there?")).await.unwrap();
        cluster.accept_chat(&tenant(), &gone, chat).await.unwrap();
        held = Some(chat);
    }
    nodes.presence.session_gone(&tenant(), &gone, "s-2", nodes.clock.now_ms()).await.unwrap();
    (connected, pushes, gone, held)
}

/// The status the next `agent.status` push about `who` tells, within a second.
async fn status_told(
    pushes: &mut mpsc::UnboundedReceiver<Push>,
    who: &AgentId,
) -> Result<AgentStatus, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Some(Push::Agent { agent, change: AgentChange::Status { agent: view }, .. }) = pushes.recv().await
                && agent == *who
            {
                return view.status;
            }
        }
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn agents_whose_status_was_lost_with_their_node_come_back_away_and_their_chats_do_not_stay_with_the_absent() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    let (leaving, staying) = (nodes.routers[0].clone(), nodes.routers[1].clone());
    // One agent connected all along; another who holds a chat and whose last connection just closed.
    let (connected, mut pushes, gone, held) = connected_and_gone(&nodes, &leaving, true).await;
    let held = held.unwrap();

    // Presence loses what the agents chose (as a Redis that restarted empty would), then their node leaves.
    for who in [&connected, &gone] {
        nodes.presence.signed_out(&tenant(), who, &[]).await.unwrap();
        assert_eq!(nodes.presence.chosen_status(&tenant(), who).await.unwrap(), None);
    }
    leaving.shutdown().await.unwrap();
    staying.placement_changed();
    settle(&nodes, |routers| routers.iter().map(|router| router.n_shards_owned()).max() == Some(1024)).await;
    let status = |who: &AgentId| {
        let (cluster, who) = (cluster.clone(), who.clone());
        async move { cluster.agent_availability(&tenant(), &who).await.unwrap().status }
    };
    assert_eq!(status(&connected).await, AgentStatus::Away, "signed in, but what they chose is not known");
    assert_eq!(status(&gone).await, AgentStatus::Away, "signed in: they hold a chat");

    // The connected agent's gateway follows them on their new node, and their console is told.
    while pushes.try_recv().is_ok() {}
    cluster.subscribe_agent(&GatewayId("gw".into()), &tenant(), &connected, &[]).await.unwrap();
    let told = status_told(&mut pushes, &connected);
    assert_eq!(told.await, Ok(AgentStatus::Away));

    // Without a connection, the grace period, then offline and the chat waits again; the connected agent
    // stays away until they choose, and is then as they chose.
    heartbeats(&nodes, common::GRACE.as_secs() + 2).await;
    assert_eq!(status(&gone).await, AgentStatus::Offline);
    let view = cluster.chat_view(&Caller::Customer { conversation: held }, held).await.unwrap();
    assert_eq!((view.state, view.owner), (ConversationState::Queued, None), "the absent agent's chat waits again");
    assert_eq!(status(&connected).await, AgentStatus::Away);
    cluster.set_agent_status(&tenant(), &connected, AgentStatus::Online).await.unwrap();
    assert_eq!(status(&connected).await, AgentStatus::Online);
    assert_eq!(nodes.presence.chosen_status(&tenant(), &connected).await.unwrap(), Some(AgentStatus::Online));
}

#[tokio::test(start_paused = true)]
async fn agents_taken_over_while_presence_does_not_answer_come_back_away_not_offline_and_unaware() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    let (leaving, staying) = (nodes.routers[0].clone(), nodes.routers[1].clone());
    // An agent connected all along and holding nothing; another whose last connection just closed.
    let (connected, mut pushes, gone, _) = connected_and_gone(&nodes, &leaving, false).await;

    // Redis stops answering, then the agents' node leaves: the new owner can read neither their status nor
    // their connections.
    nodes.outage.set_down(true);
    leaving.shutdown().await.unwrap();
    staying.placement_changed();
    settle(&nodes, |routers| routers.iter().map(|router| router.n_shards_owned()).max() == Some(1024)).await;
    let status = |who: &AgentId| {
        let (cluster, who) = (cluster.clone(), who.clone());
        async move { cluster.agent_availability(&tenant(), &who).await.unwrap().status }
    };
    assert_eq!(status(&connected).await, AgentStatus::Away, "maybe connected: not left offline");
    assert_eq!(status(&gone).await, AgentStatus::Away);
    while pushes.try_recv().is_ok() {}
    cluster.subscribe_agent(&GatewayId("gw".into()), &tenant(), &connected, &[]).await.unwrap();
    let told = status_told(&mut pushes, &connected);
    assert_eq!(told.await, Ok(AgentStatus::Away), "the console is told, not left showing online");

    // However long presence is down, nobody goes offline for it; once it answers, the absent agent goes
    // offline after the grace period, and the connected one stays away until they choose.
    heartbeats(&nodes, common::GRACE.as_secs() + 2).await;
    assert_eq!(status(&gone).await, AgentStatus::Away);
    nodes.outage.set_down(false);
    heartbeats(&nodes, common::GRACE.as_secs() + 2).await;
    assert_eq!(status(&gone).await, AgentStatus::Offline);
    assert_eq!(status(&connected).await, AgentStatus::Away);
    cluster.set_agent_status(&tenant(), &connected, AgentStatus::Online).await.unwrap();
    assert_eq!(status(&connected).await, AgentStatus::Online);
}

#[tokio::test(start_paused = true)]
async fn agents_taken_over_by_another_node_keep_their_status_their_offer_and_their_grace_period() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    // The node that leaves owns the push queue and one of its agents: both are rebuilt on the other node.
    let leaving = push_queue_owner(&nodes);
    let (leaving, staying) = (nodes.routers[leaving].clone(), nodes.routers[1 - leaving].clone());
    let moving = agent_of(&leaving, &["x", "y", "z"]);
    let mut pushes = sign_in(&nodes, &moving).await;
    nodes.clock.advance_ms(1);
    let chat = ConversationId::new_v7(nodes.clock.now_ms());
    let request = start_request(chat, group("push"), "x", "anyone?");
    cluster.start_chat(request).await.unwrap();
    let offered = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Some(Push::Agent { change: AgentChange::Offered { entry, .. }, .. }) = pushes.recv().await {
                return entry.conversation;
            }
        }
    });
    assert_eq!(offered.await, Ok(chat), "the only agent online is offered the chat");

    // Another agent of that node whose last connection just closed (inside the grace period, still online).
    let gone = agent_of(&leaving, &["a", "b", "c", "w"]);
    let expires = nodes.clock.now_ms() + 24 * 60 * 60_000;
    nodes.presence.session_alive(&tenant(), &gone, "s-2", "gw", expires).await.unwrap();
    cluster.set_agent_status(&tenant(), &gone, AgentStatus::Online).await.unwrap();
    let held = ConversationId::new_v7(nodes.clock.now_ms());
    let pull_group = if gone == agent("w") { group("t") } else { group("g1") };
    let request = start_request(held, pull_group, "y", "still there?");
    cluster.start_chat(request).await.unwrap();
    cluster.accept_chat(&tenant(), &gone, held).await.unwrap();
    nodes.presence.session_gone(&tenant(), &gone, "s-2", nodes.clock.now_ms()).await.unwrap();

    // The node hands everything over; nobody gives the agents their status back (no gateway here does).
    leaving.shutdown().await.unwrap();
    staying.placement_changed();
    settle(&nodes, |routers| routers.iter().map(|router| router.n_shards_owned()).max() == Some(1024)).await;
    assert!(staying.owns_key(&agent_key(&tenant(), &moving)));
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let availability = cluster.agent_availability(&tenant(), &moving).await.unwrap();
    assert_eq!(
        (availability.status, availability.offer),
        (AgentStatus::Online, Some(chat)),
        "the rebuilt agent is online, with the offer the queue rebuilt beside it kept"
    );
    let view = cluster.accept_chat(&tenant(), &moving, chat).await.unwrap();
    assert_eq!(view.owner, Some(moving.clone()));
    // Without a live connection the agent is back too, for a grace period from the takeover (the one that
    // began on the leaving node went with it); then offline, as a lost agent goes.
    let status = |cluster: Arc<LocalCluster>, who: AgentId| async move {
        cluster.agent_availability(&tenant(), &who).await.unwrap().status
    };
    assert_eq!(status(cluster.clone(), gone.clone()).await, AgentStatus::Online);
    heartbeats(&nodes, common::GRACE.as_secs() + 2).await;
    assert_eq!(status(cluster.clone(), gone).await, AgentStatus::Offline);
    let customer = Caller::Customer { conversation: held };
    let view = cluster.chat_view(&customer, held).await.unwrap();
    assert_eq!((view.state, view.owner), (ConversationState::Queued, None), "the lost agent's chat waits again");
    assert_eq!(status(cluster, moving).await, AgentStatus::Online, "connected all along");
}

/// The next offer shown to the agent whose pushes these are, within a second: the chat and the offer's expiry.
async fn next_offer(
    pushes: &mut mpsc::UnboundedReceiver<Push>,
) -> Result<(ConversationId, i64), tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Some(Push::Agent { change: AgentChange::Offered { entry, expires_at_ms, .. }, .. }) =
                pushes.recv().await
            {
                return (entry.conversation, expires_at_ms);
            }
        }
    })
    .await
}

/// Hands every shard of `leaving` over to `staying`.
async fn take_over(nodes: &Nodes, leaving: &Router, staying: &Router) {
    leaving.shutdown().await.unwrap();
    staying.placement_changed();
    settle(nodes, |routers| routers.iter().map(|router| router.n_shards_owned()).max() == Some(1024)).await;
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_console_that_follows_its_agent_to_the_node_that_took_them_over_is_shown_their_outstanding_offer() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    // The agent's node leaves; the queue's stays.
    let queue_node = push_queue_owner(&nodes);
    let (leaving, staying) = (nodes.routers[1 - queue_node].clone(), nodes.routers[queue_node].clone());
    let moving = agent_of(&leaving, &["x", "y", "z"]);
    let mut pushes = sign_in(&nodes, &moving).await;
    nodes.clock.advance_ms(1);
    let chat = ConversationId::new_v7(nodes.clock.now_ms());
    nodes.cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    let (offered, expires_at_ms) = next_offer(&mut pushes).await.unwrap();
    assert_eq!(offered, chat);

    take_over(&nodes, &leaving, &staying).await;
    // The agent's gateway follows them to their new node: their console is shown the offer it still holds,
    // with the same expiry, and the agent can take it.
    while pushes.try_recv().is_ok() {}
    nodes.cluster.subscribe_agent(&GatewayId("gw".into()), &tenant(), &moving, &[]).await.unwrap();
    assert_eq!(next_offer(&mut pushes).await, Ok((chat, expires_at_ms)));
    let view = nodes.cluster.accept_chat(&tenant(), &moving, chat).await.unwrap();
    assert_eq!(view.owner, Some(moving));
}

#[tokio::test(start_paused = true)]
async fn an_offer_recorded_by_a_queue_whose_node_stopped_before_showing_it_is_shown_by_the_queue_rebuilt_after() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    // The queue's node leaves; the agent's stays.
    let queue_node = push_queue_owner(&nodes);
    let (leaving, staying) = (nodes.routers[queue_node].clone(), nodes.routers[1 - queue_node].clone());
    let agent_here = agent_of(&staying, &["x", "y", "z"]);
    let mut pushes = sign_in(&nodes, &agent_here).await;
    nodes.cluster.hold_offers.store(true, Ordering::SeqCst);
    nodes.clock.advance_ms(1);
    let chat = ConversationId::new_v7(nodes.clock.now_ms());
    nodes.cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    // The offer is recorded; the agent never hears of it.
    let offer = loop {
        let request = GetConversationRequest { conversation_id: chat.to_string() };
        let stored = nodes.store.get_conversation(request).await.unwrap().conversation.unwrap();
        if !stored.offer_agent_id.is_empty() {
            break stored;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(offer.offer_agent_id, agent_here.to_string());
    let availability = nodes.cluster.agent_availability(&tenant(), &agent_here).await.unwrap();
    assert_eq!(availability.offer, None);
    assert!(pushes.try_recv().is_err());

    nodes.cluster.hold_offers.store(false, Ordering::SeqCst);
    take_over(&nodes, &leaving, &staying).await;
    // The queue rebuilt from the store shows it, with the expiry recorded; the agent can take it.
    assert_eq!(next_offer(&mut pushes).await, Ok((chat, offer.offer_expires_at_ms)));
    let view = nodes.cluster.accept_chat(&tenant(), &agent_here, chat).await.unwrap();
    assert_eq!(view.owner, Some(agent_here));
}

#[tokio::test(start_paused = true)]
async fn an_offer_never_shown_to_an_agent_who_went_away_meanwhile_is_withdrawn_by_the_rebuilt_queue_not_left_to_expire()
{
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let queue_node = push_queue_owner(&nodes);
    let (leaving, staying) = (nodes.routers[queue_node].clone(), nodes.routers[1 - queue_node].clone());
    let agent_here = agent_of(&staying, &["x", "y", "z"]);
    let _pushes = sign_in(&nodes, &agent_here).await;
    nodes.cluster.hold_offers.store(true, Ordering::SeqCst);
    nodes.clock.advance_ms(1);
    let chat = ConversationId::new_v7(nodes.clock.now_ms());
    nodes.cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    let stored = || async {
        let request = GetConversationRequest { conversation_id: chat.to_string() };
        nodes.store.get_conversation(request).await.unwrap().conversation.unwrap()
    };
    while stored().await.offer_agent_id.is_empty() {
        tokio::task::yield_now().await;
    }
    // The agent, never shown the offer, goes away; then the queue's node stops.
    nodes.cluster.set_agent_status(&tenant(), &agent_here, AgentStatus::Away).await.unwrap();
    nodes.cluster.hold_offers.store(false, Ordering::SeqCst);
    take_over(&nodes, &leaving, &staying).await;

    // Well inside the offer's 10 s, the agent's refusal ended it: the chat is free for the next agent.
    let events = nodes.cluster.read_events(&Caller::Customer { conversation: chat }, chat, 0).await.unwrap().events;
    let last = events.last().map(|event| event.body.clone());
    let withdrawn = EventBody::OfferEnded { agent: agent_here.clone(), reason: OfferEnd::Withdrawn };
    assert_eq!(last, Some(withdrawn));
    assert!(stored().await.offer_agent_id.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_offer_shown_again_that_arrives_after_its_end_is_ended_for_its_agent_too() {
    // Four nodes, so that the queue can be rebuilt on one node while its agent lives on another.
    let nodes = start_nodes(4).await;
    settle(&nodes, |routers| {
        let owned: Vec<usize> = routers.iter().map(|router| router.n_shards_owned()).collect();
        owned.iter().sum::<usize>() == 1024 && owned.iter().all(|n| *n > 200)
    })
    .await;
    let cluster = nodes.cluster.clone();
    // The queue's node leaves; its agent lives on another node, which stays.
    let queue_node = push_queue_owner(&nodes);
    let owner_of = |who: &AgentId| nodes.routers.iter().position(|router| router.owns_key(&agent_key(&tenant(), who)));
    let offered = ["x", "y", "z"].iter().map(|name| agent(name)).find(|who| owner_of(who) != Some(queue_node));
    let offered = offered.expect("an agent of the group lives on another node than its queue");
    let agent_node = owner_of(&offered).unwrap();
    let mut pushes = sign_in(&nodes, &offered).await;
    nodes.clock.advance_ms(1);
    let chat = ConversationId::new_v7(nodes.clock.now_ms());
    cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    assert_eq!(next_offer(&mut pushes).await.map(|(offer, _)| offer), Ok(chat));

    // The queue is rebuilt on a third node, and shows the offer again over a slow hop.
    cluster.delay_offers.store(true, Ordering::SeqCst);
    nodes.routers[queue_node].shutdown().await.unwrap();
    for router in &nodes.routers {
        router.placement_changed();
    }
    settle(&nodes, |routers| {
        routers[queue_node].n_shards_owned() == 0
            && routers.iter().map(|router| router.n_shards_owned()).sum::<usize>() == 1024
    })
    .await;
    assert!(
        !nodes.routers[agent_node].owns_key(&queue_key(&tenant(), &group("push"))),
        "the queue moved to the agent's node: pick other agents for this shard map"
    );
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(cluster.offers_delayed.load(Ordering::SeqCst), 1, "the rebuilt queue shows the offer again");
    // Meanwhile the agent rejects the offer (or it expired during the takeover): the end reaches them first.
    let _ = cluster.reject_offer(&tenant(), &group("push"), &offered, chat).await;
    assert_eq!(cluster.agent_availability(&tenant(), &offered).await.unwrap().offer, None);

    // The late showing takes the ended offer afresh; the queue, told so, ends it for the agent too.
    while pushes.try_recv().is_ok() {}
    cluster.release_offers();
    while cluster.offers_arrived_late.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let mut told = Vec::new();
    while let Ok(push) = pushes.try_recv() {
        match push {
            Push::Agent { change: AgentChange::Offered { entry, .. }, .. } => {
                told.push(("offered", entry.conversation))
            }
            Push::Agent { change: AgentChange::OfferEnded { conversation, .. }, .. } => {
                told.push(("ended", conversation));
            }
            _ => {}
        }
    }
    assert_eq!(told, [("offered", chat), ("ended", chat)], "the console is told it ended");
    assert_eq!(cluster.agent_availability(&tenant(), &offered).await.unwrap().offer, None, "not held for good");
}

/// A new conversation id living on the node that does not own `group`'s queue (of two): the chat's hand-over
/// to its queue, its removal, and the record of its offers' ends cross nodes.
fn chat_across_from_queue(nodes: &Nodes, group_name: &str) -> ConversationId {
    let owns_queue = |router: &Arc<Router>| router.owns_key(&queue_key(&tenant(), &group(group_name)));
    let queue_node = nodes.routers.iter().position(owns_queue).expect("some node owns the queue");
    let other = nodes.routers[1 - queue_node].clone();
    conversation_where(&nodes.clock, |id| other.owns_key(&conversation_key(&id)))
}

/// On two settled nodes, a chat living on the node that does not own the push queue (recording its offer's end
/// crosses nodes), offered to an agent of the queue's node: the chat, the agent, their console's pushes and the
/// offer's expiry.
async fn offered_across_from_its_chat(nodes: &Nodes) -> (ConversationId, AgentId, mpsc::UnboundedReceiver<Push>, i64) {
    settle(nodes, balanced).await;
    let chat = chat_across_from_queue(nodes, "push");
    let offered = agent_of(&nodes.routers[push_queue_owner(nodes)], &["x", "y", "z"]);
    let mut pushes = sign_in(nodes, &offered).await;
    nodes.cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    let (conversation, expires_at_ms) = next_offer(&mut pushes).await.unwrap();
    assert_eq!(conversation, chat);
    (chat, offered, pushes, expires_at_ms)
}

/// The pushes received so far.
fn received(pushes: &mut mpsc::UnboundedReceiver<Push>) -> Vec<Push> {
    std::iter::from_fn(|| pushes.try_recv().ok()).collect()
}

/// The offer ends told to consoles, in order.
fn offer_ends(pushes: &[Push]) -> Vec<(ConversationId, OfferEnd)> {
    let end = |push: &Push| match push {
        Push::Agent { change: AgentChange::OfferEnded { conversation, reason }, .. } => Some((*conversation, *reason)),
        _ => None,
    };
    pushes.iter().filter_map(end).collect()
}

#[tokio::test(start_paused = true)]
async fn a_withdrawal_that_could_not_be_recorded_is_recorded_as_a_withdrawal_later_not_as_a_timeout() {
    let nodes = start_nodes(2).await;
    let (chat, offered, mut pushes, _) = offered_across_from_its_chat(&nodes).await;
    let cluster = nodes.cluster.clone();

    // The agent goes away while the way to the chat's node is down: the withdrawal is not recorded.
    cluster.lose_system_commands.store(true, Ordering::SeqCst);
    cluster.set_agent_status(&tenant(), &offered, AgentStatus::Away).await.unwrap();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let events = || async {
        let customer = Caller::Customer { conversation: chat };
        cluster.read_events(&customer, chat, 0).await.unwrap().events
    };
    assert!(matches!(events().await.last().map(|event| &event.body), Some(EventBody::Offered { .. })));

    // Once the way is back, a heartbeat records it, as a withdrawal: the agent may have the chat when back.
    cluster.lose_system_commands.store(false, Ordering::SeqCst);
    heartbeats(&nodes, 2).await;
    let withdrawn = EventBody::OfferEnded { agent: offered.clone(), reason: OfferEnd::Withdrawn };
    assert_eq!(events().await.last().map(|event| event.body.clone()), Some(withdrawn));
    cluster.set_agent_status(&tenant(), &offered, AgentStatus::Online).await.unwrap();
    assert_eq!(next_offer(&mut pushes).await.map(|(offer, _)| offer), Ok(chat));
}

#[tokio::test(start_paused = true)]
async fn an_agent_whose_offer_end_was_lost_on_the_way_frees_the_offer_past_its_expiry_and_is_offered_chats_again() {
    let repaired = repairs("offer_end_lost");
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    // The agent lives on the node that does not own the queue: the offer's end crosses nodes.
    let queue_node = push_queue_owner(&nodes);
    let offered = agent_of(&nodes.routers[1 - queue_node], &["x", "y", "z"]);
    let mut pushes = sign_in(&nodes, &offered).await;
    nodes.clock.advance_ms(1);
    let chat = ConversationId::new_v7(nodes.clock.now_ms());
    cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    let (_, expires_at_ms) = next_offer(&mut pushes).await.unwrap();

    // The agent rejects it; the end is recorded, but never reaches the agent's node.
    cluster.lose_offer_ends.store(true, Ordering::SeqCst);
    cluster.reject_offer(&tenant(), &group("push"), &offered, chat).await.unwrap();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    cluster.lose_offer_ends.store(false, Ordering::SeqCst);
    let held = || async { cluster.agent_availability(&tenant(), &offered).await.unwrap().offer };
    assert_eq!(held().await, Some(chat), "the agent still holds the offer, and is offered nothing");

    // Well past the offer's expiry, the agent's heartbeat finds it over in the store: the console is told,
    // the slot is free, and a new round offers the agent the chat again.
    let checked_at_ms = expires_at_ms + switchboard_router::OFFER_CHECKED_AFTER_MS;
    let seconds = u64::try_from((checked_at_ms - nodes.clock.now_ms()) / 1_000).unwrap();
    heartbeats(&nodes, seconds - 1).await;
    assert_eq!(held().await, Some(chat), "not before");
    while pushes.try_recv().is_ok() {}
    heartbeats(&nodes, 3).await;
    let told = received(&mut pushes);
    assert_eq!(offer_ends(&told), [(chat, OfferEnd::Rejected)], "as it ended: rejected");
    assert!(repairs("offer_end_lost") > repaired, "counted for SREs");
    let again = told.iter().find_map(|push| match push {
        Push::Agent { change: AgentChange::Offered { entry, expires_at_ms: later, .. }, .. } => {
            Some((entry.conversation, *later > expires_at_ms))
        }
        _ => None,
    });
    assert_eq!(again, Some((chat, true)), "offered again, a new offer");
    assert_eq!(cluster.accept_chat(&tenant(), &offered, chat).await.unwrap().owner, Some(offered));
}

#[tokio::test(start_paused = true)]
async fn an_offer_past_its_expiry_whose_end_cannot_be_recorded_stays_the_agents_until_it_is() {
    let nodes = start_nodes(2).await;
    let (chat, offered, mut pushes, expires_at_ms) = offered_across_from_its_chat(&nodes).await;
    let cluster = nodes.cluster.clone();

    // The way to the chat's node is down through the offer's expiry and well past it: its timeout is not
    // recorded, so the stored offer is still the agent's, and the agent keeps it.
    cluster.lose_system_commands.store(true, Ordering::SeqCst);
    let past_check_ms = expires_at_ms + switchboard_router::OFFER_CHECKED_AFTER_MS + 3_000;
    let seconds = u64::try_from((past_check_ms - nodes.clock.now_ms()) / 1_000).unwrap();
    heartbeats(&nodes, seconds).await;
    let held = || async { cluster.agent_availability(&tenant(), &offered).await.unwrap().offer };
    assert_eq!(held().await, Some(chat), "held while the store says it is theirs");
    assert_eq!(offer_ends(&received(&mut pushes)), []);

    // Once the way is back, the queue records the timeout and tells the agent: once.
    cluster.lose_system_commands.store(false, Ordering::SeqCst);
    heartbeats(&nodes, 2).await;
    assert_eq!(offer_ends(&received(&mut pushes)), [(chat, OfferEnd::TimedOut)]);
    assert_eq!(held().await, None);
}

#[tokio::test(start_paused = true)]
async fn a_chat_accepted_whose_answer_was_lost_counts_among_the_agents_chats_once_the_offer_is_checked() {
    let nodes = start_nodes(2).await;
    let (chat, offered, mut pushes, expires_at_ms) = offered_across_from_its_chat(&nodes).await;
    let cluster = nodes.cluster.clone();
    // The agent accepts; the chat's node records it, but the answer never reaches the agent's node.
    cluster.lose_accept_answers.store(true, Ordering::SeqCst);
    assert!(cluster.accept_chat(&tenant(), &offered, chat).await.is_err());
    cluster.lose_accept_answers.store(false, Ordering::SeqCst);
    let view = cluster.chat_view(&Caller::Customer { conversation: chat }, chat).await.unwrap();
    assert_eq!(view.owner.as_ref(), Some(&offered));
    let availability = || async {
        let availability = cluster.agent_availability(&tenant(), &offered).await.unwrap();
        (availability.offer, availability.held)
    };
    assert_eq!(availability().await, (Some(chat), 1), "the slot is held as the offer's");

    // Past the offer's expiry, the agent's check finds the chat theirs: it counts among their chats, and their
    // console is told so.
    while pushes.try_recv().is_ok() {}
    let checked_at_ms = expires_at_ms + switchboard_router::OFFER_CHECKED_AFTER_MS;
    let seconds = u64::try_from((checked_at_ms - nodes.clock.now_ms()) / 1_000).unwrap();
    heartbeats(&nodes, seconds + 1).await;
    assert_eq!(availability().await, (None, 1), "held as a chat, not freed");
    let told = received(&mut pushes);
    assert_eq!(offer_ends(&told), []);
    assert!(assigned(&told, chat), "{told:?}");
}

/// Whether the pushes tell an agent's consoles that `chat` is theirs (`chat.assigned`).
fn assigned(pushes: &[Push], chat: ConversationId) -> bool {
    pushes.iter().any(|push| {
        matches!(push, Push::Agent { change: AgentChange::Assigned { chat: view }, .. } if view.conversation == chat)
    })
}

/// How many repairs of `kind` this process's routers counted (`switchboard_router_repairs_total`); the
/// process's recorder is installed by the first call. Tests run side by side in the process: a test knows
/// only that its own repair adds one.
fn repairs(kind: &str) -> f64 {
    switchboard_telemetry::install_metrics("router");
    let prefix = format!("{}{{kind=\"{kind}\"}} ", switchboard_telemetry::names::ROUTER_REPAIRS);
    let exposition = switchboard_telemetry::render_metrics();
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// Lets the heartbeats pass until the queue change being lost has been tried its 8 times and given up, then
/// lets the changes through again.
async fn lost_for_good(nodes: &Nodes) {
    for _ in 0..20 {
        if nodes.cluster.queue_changes_lost.load(Ordering::SeqCst) >= 8 {
            break;
        }
        heartbeats(nodes, 1).await;
    }
    heartbeats(nodes, 2).await;
    assert_eq!(nodes.cluster.queue_changes_lost.load(Ordering::SeqCst), 8, "given up after its tries");
    nodes.cluster.lose_queue_changes.store(false, Ordering::SeqCst);
}

#[tokio::test(start_paused = true)]
async fn a_chat_whose_hand_over_to_its_queue_was_lost_is_listed_and_offered_once_the_queue_reads_the_store() {
    let repaired = repairs("chat_listed");
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    let chat = chat_across_from_queue(&nodes, "push");
    let offered = agent_of(&nodes.routers[push_queue_owner(&nodes)], &["x", "y", "z"]);
    let mut pushes = sign_in(&nodes, &offered).await;
    // The chat is stored; its hand-over to the queue on the other node is lost, every try.
    cluster.lose_queue_changes.store(true, Ordering::SeqCst);
    cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    lost_for_good(&nodes).await;

    // Listed nowhere, it would be offered to nobody; the queue's next comparison with the store (within 30
    // heartbeats, whenever in its period the loss fell) lists it, and it is offered.
    heartbeats(&nodes, 30).await;
    assert_eq!(next_offer(&mut pushes).await.map(|(offer, _)| offer), Ok(chat));
    assert!(repairs("chat_listed") > repaired, "counted for SREs");
}

#[tokio::test(start_paused = true)]
async fn a_chat_whose_removal_from_its_queue_was_lost_leaves_the_list_once_the_queue_reads_the_store() {
    let repaired = repairs("chat_removed");
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    // A pull-routed group (no offer would find the ghost), its chat on the node that does not own its queue.
    let chat = chat_across_from_queue(&nodes, "g1");
    let mut pushes = sign_in(&nodes, &agent("b")).await;
    let gateway = GatewayId("gw".into());
    cluster.subscribe_queue(&gateway, &tenant(), &group("g1")).await.unwrap();
    cluster.start_chat(start_request(chat, group("g1"), "x", "anyone?")).await.unwrap();
    heartbeats(&nodes, 1).await;
    let listed = |pushes: &[Push]| {
        pushes.iter().any(|push| {
            matches!(push, Push::Queue { change: QueueChange::Added { entry }, .. } if entry.conversation == chat)
        })
    };
    assert!(listed(&received(&mut pushes)));

    // b takes it; its removal from the queue on the other node is lost, every try.
    cluster.lose_queue_changes.store(true, Ordering::SeqCst);
    cluster.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    lost_for_good(&nodes).await;

    // It would stay listed to everyone who watches the queue; the queue's next comparison with the store
    // (within 30 heartbeats, whenever in its period the loss fell) removes it, with how it left.
    heartbeats(&nodes, 30).await;
    let removed = received(&mut pushes).into_iter().find_map(|push| match push {
        Push::Queue { change: QueueChange::Removed { conversation, reason }, .. } if conversation == chat => {
            Some(reason)
        }
        _ => None,
    });
    assert_eq!(removed, Some(LeftQueue::Accepted { agent: agent("b") }));
    assert!(repairs("chat_removed") > repaired, "counted for SREs");
}

#[tokio::test(start_paused = true)]
async fn a_chat_that_leaves_while_the_queue_reads_the_store_is_not_listed_from_that_read() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    let chat = chat_across_from_queue(&nodes, "g1");
    let (sink, mut pushes) = mpsc::unbounded_channel();
    let gateway = GatewayId("watcher".into());
    cluster.connect_gateway(gateway.clone(), sink);
    cluster.subscribe_queue(&gateway, &tenant(), &group("g1")).await.unwrap();
    // The chat is stored, its hand-over lost; the queue's next read of the store has it, and its answer is
    // held.
    let release = nodes.counted.hold_next_list_with(chat);
    cluster.lose_queue_changes.store(true, Ordering::SeqCst);
    cluster.start_chat(start_request(chat, group("g1"), "x", "anyone?")).await.unwrap();
    lost_for_good(&nodes).await;
    for _ in 0..31 {
        if nodes.counted.list_held.load(Ordering::SeqCst) {
            break;
        }
        heartbeats(&nodes, 1).await;
    }
    assert!(nodes.counted.list_held.load(Ordering::SeqCst), "the queue read the store");

    // Meanwhile the customer leaves: the queue hears of it (a chat it did not list), then gets the read.
    let customer = Caller::Customer { conversation: chat };
    cluster.command(&customer, chat, ChatCommand::Close).await.unwrap();
    heartbeats(&nodes, 1).await;
    release.send(()).unwrap();
    heartbeats(&nodes, 1).await;
    let listed = received(&mut pushes).into_iter().any(
        |push| matches!(push, Push::Queue { change: QueueChange::Added { entry }, .. } if entry.conversation == chat),
    );
    assert!(!listed, "the read, older than the customer's leaving, lists no ghost");
}

#[tokio::test(start_paused = true)]
async fn an_agent_who_cannot_take_an_offer_shown_is_passed_over_for_the_others_free() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    // The agent idle the longest lives on the node that does not own the queue, and refuses (their own actor
    // knows better than the queue); another agent is free too.
    let queue_node = push_queue_owner(&nodes);
    let first = agent_of(&nodes.routers[1 - queue_node], &["x", "y", "z"]);
    let second = ["x", "y", "z"].iter().map(|name| agent(name)).find(|who| *who != first).unwrap();
    let _first_pushes = sign_in(&nodes, &first).await;
    nodes.clock.advance_ms(1_000);
    tokio::time::advance(Duration::from_secs(1)).await;
    let mut pushes = sign_in(&nodes, &second).await;
    cluster.refuse_offers.store(true, Ordering::SeqCst);
    nodes.clock.advance_ms(1);
    let chat = ConversationId::new_v7(nodes.clock.now_ms());
    cluster.start_chat(start_request(chat, group("push"), "x", "anyone?")).await.unwrap();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    cluster.refuse_offers.store(false, Ordering::SeqCst);

    // At the retry the other agent has it, not the one who could not take it a second ago.
    heartbeats(&nodes, 2).await;
    let mut shown = Vec::new();
    while let Ok(push) = pushes.try_recv() {
        if let Push::Agent { agent, change: AgentChange::Offered { entry, .. }, .. } = push {
            shown.push((agent, entry.conversation));
        }
    }
    assert_eq!(shown, [(second, chat)]);
}

/// Until every router owns a fair share of the shards (as the lease keepers count it, give or take two).
fn fair(routers: &[Arc<Router>]) -> bool {
    let owned: Vec<usize> = routers.iter().map(|router| router.n_shards_owned()).collect();
    owned.iter().sum::<usize>() == 1024 && owned.iter().all(|n| *n + 2 >= 1024 / routers.len())
}

#[tokio::test(start_paused = true)]
async fn a_chat_stored_with_its_offer_while_its_queue_moves_to_another_node_is_offered_there() {
    // A chat whose conversation stays on node 0 when node 1 joins, while its queue moves to node 1, found on
    // a cluster of its own (the placement is the same each time).
    let chat = {
        let mut dry = start_nodes(1).await;
        settle(&dry, fair).await;
        let ids: Vec<ConversationId> = (0..50)
            .map(|_| {
                dry.clock.advance_ms(1);
                ConversationId::new_v7(dry.clock.now_ms())
            })
            .collect();
        let joined = join(&dry, 1).await;
        dry.routers.push(joined);
        settle(&dry, fair).await;
        assert_eq!(push_queue_owner(&dry), 1, "the queue moves to the node that joins: pick another group");
        *ids.iter().find(|id| dry.routers[0].owns_key(&conversation_key(id))).unwrap()
    };
    let mut nodes = start_nodes(1).await;
    settle(&nodes, fair).await;
    let _ = sign_in(&nodes, &agent("x")).await;
    // The chat finds x free: the queue reserves x, and the chat is being stored with its offer (held).
    let release = nodes.counted.hold_next_opening_offer_unstored();
    let cluster = nodes.cluster.clone();
    let start = tokio::spawn(async move { cluster.start_chat(start_request(chat, group("push"), "x", "hi?")).await });
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(nodes.counted.appends(), 1, "the opening append is on its way");

    // Node 1 joins and takes the queue, rebuilt from a store without the chat; the conversation stays.
    let joined = join(&nodes, 1).await;
    nodes.routers.push(joined);
    settle(&nodes, fair).await;
    assert_eq!(push_queue_owner(&nodes), 1);
    assert!(nodes.routers[0].owns_key(&conversation_key(&chat)));
    // (x's gateway connects to the new node too, and follows x, who may have moved.)
    let (sink, mut pushes) = mpsc::unbounded_channel();
    nodes.cluster.connect_gateway(GatewayId("gw".into()), sink);
    nodes.cluster.subscribe_agent(&GatewayId("gw".into()), &tenant(), &agent("x"), &[]).await.unwrap();
    // Its console watches the queue, rebuilt on node 1 (before the chat is stored).
    nodes.cluster.subscribe_queue(&GatewayId("gw".into()), &tenant(), &group("push")).await.unwrap();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let snapshot = std::iter::from_fn(|| pushes.try_recv().ok()).find_map(|push| match push {
        Push::Queue { change: QueueChange::Snapshot { entries }, .. } => Some(entries),
        _ => None,
    });
    assert_eq!(snapshot, Some(Vec::new()), "the rebuilt queue read the store before the chat was in it");

    // The chat is stored; the queue it was reserved in is gone: its new owner is told, lists it and offers
    // it to x (the offer the conversation has already: the same, not a second). Before, the chat was handed
    // to the stopped queue and lost: listed nowhere, its offer never shown nor timed.
    drop(release);
    assert!(start.await.unwrap().is_ok());
    assert_eq!(next_offer(&mut pushes).await.map(|(offered, _)| offered), Ok(chat));
    let view = nodes.cluster.accept_chat(&tenant(), &agent("x"), chat).await.unwrap();
    assert_eq!(view.owner, Some(agent("x")));
}

/// On two settled nodes: agent b signed in, with their console's pushes, and a new chat id of g1 living on
/// the node that b does not (b's accept, and the chat's end told to b, cross nodes).
async fn b_and_a_chat_across(nodes: &Nodes) -> (mpsc::UnboundedReceiver<Push>, ConversationId) {
    settle(nodes, balanced).await;
    let b_node = nodes.routers.iter().position(|router| router.owns_key(&agent_key(&tenant(), &agent("b"))));
    let other = nodes.routers[1 - b_node.expect("some node owns b")].clone();
    let pushes = sign_in(nodes, &agent("b")).await;
    let chat = conversation_where(&nodes.clock, |id| other.owns_key(&conversation_key(&id)));
    nodes.cluster.start_chat(start_request(chat, group("g1"), "x", "anyone?")).await.unwrap();
    (pushes, chat)
}

/// How many chats agent b holds, as their queues are told.
async fn held_by_b(nodes: &Nodes) -> u32 {
    nodes.cluster.agent_availability(&tenant(), &agent("b")).await.unwrap().held
}

#[tokio::test(start_paused = true)]
async fn a_chat_whose_end_never_reached_its_agent_frees_their_slot_once_the_agent_reads_the_store() {
    let repaired = repairs("chat_freed");
    let nodes = start_nodes(2).await;
    let (_pushes, chat) = b_and_a_chat_across(&nodes).await;
    let cluster = nodes.cluster.clone();
    cluster.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    assert_eq!(held_by_b(&nodes).await, 1);
    // The customer closes the chat; its end never reaches b's node, for all its tries.
    cluster.lose_agent_finishes.store(true, Ordering::SeqCst);
    cluster.command(&Caller::Customer { conversation: chat }, chat, ChatCommand::Close).await.unwrap();
    for _ in 0..20 {
        if cluster.agent_finishes_lost.load(Ordering::SeqCst) >= 8 {
            break;
        }
        heartbeats(&nodes, 1).await;
    }
    heartbeats(&nodes, 2).await;
    assert_eq!(cluster.agent_finishes_lost.load(Ordering::SeqCst), 8, "given up after its tries");
    cluster.lose_agent_finishes.store(false, Ordering::SeqCst);
    assert_eq!(held_by_b(&nodes).await, 1, "b still holds a chat that ended: a slot taken by nothing");

    // b's next comparison with the store (within 30 heartbeats, whenever in its period the loss fell) frees it.
    heartbeats(&nodes, 30).await;
    assert_eq!(held_by_b(&nodes).await, 0);
    assert!(repairs("chat_freed") > repaired, "counted for SREs");
}

#[tokio::test(start_paused = true)]
async fn a_chat_accepted_whose_answer_was_lost_counts_among_the_agents_chats_once_the_agent_reads_the_store() {
    let repaired = repairs("chat_counted");
    let nodes = start_nodes(2).await;
    let (mut pushes, chat) = b_and_a_chat_across(&nodes).await;
    let cluster = nodes.cluster.clone();
    // b accepts a chat of a pull-routed group (no offer to check); the chat's node records it, but the answer
    // never reaches b's node, which gives the slot back.
    cluster.lose_accept_answers.store(true, Ordering::SeqCst);
    assert!(cluster.accept_chat(&tenant(), &agent("b"), chat).await.is_err());
    cluster.lose_accept_answers.store(false, Ordering::SeqCst);
    let view = cluster.chat_view(&Caller::Customer { conversation: chat }, chat).await.unwrap();
    assert_eq!(view.owner, Some(agent("b")));
    assert_eq!(held_by_b(&nodes).await, 0, "b's chat is not counted: b could be given more than b's capacity");

    // b's next comparison with the store counts it, and b's console is told.
    while pushes.try_recv().is_ok() {}
    heartbeats(&nodes, 30).await;
    assert_eq!(held_by_b(&nodes).await, 1);
    assert!(assigned(&received(&mut pushes), chat), "b's console is told the chat is theirs");
    assert!(repairs("chat_counted") > repaired, "counted for SREs");
}

#[tokio::test(start_paused = true)]
async fn an_agent_taken_over_goes_offline_a_grace_period_after_their_last_connection_ended_not_after_the_takeover() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    let (leaving, staying) = (nodes.routers[0].clone(), nodes.routers[1].clone());
    // An agent who holds a chat and whose last connection closed (presence recorded its end, now).
    let (_connected, _pushes, gone, held) = connected_and_gone(&nodes, &leaving, true).await;
    let held = held.unwrap();
    let status = |who: &AgentId| {
        let (cluster, who) = (cluster.clone(), who.clone());
        async move { cluster.agent_availability(&tenant(), &who).await.unwrap().status }
    };
    // Most of the grace period passes on their node, which then leaves.
    let grace_s = common::GRACE.as_secs();
    heartbeats(&nodes, grace_s - 2).await;
    assert_eq!(status(&gone).await, AgentStatus::Online, "within the grace period");
    leaving.shutdown().await.unwrap();
    staying.placement_changed();
    settle(&nodes, |routers| routers.iter().map(|router| router.n_shards_owned()).max() == Some(1024)).await;
    assert_eq!(status(&gone).await, AgentStatus::Online, "taken over with their status");

    // The new owner reads since when they have been disconnected: what is left of the grace period, and two
    // heartbeats at least to confirm it; not a whole grace period from the takeover.
    heartbeats(&nodes, 3).await;
    assert!(3 < grace_s, "a grace period from the takeover would still run");
    assert_eq!(status(&gone).await, AgentStatus::Offline);
    let view = cluster.chat_view(&Caller::Customer { conversation: held }, held).await.unwrap();
    assert_eq!((view.state, view.owner), (ConversationState::Queued, None), "the absent agent's chat waits again");
}

#[tokio::test(start_paused = true)]
async fn an_agent_whose_connection_presence_restored_stale_stays_once_their_gateway_writes_it_again() {
    let nodes = start_nodes(2).await;
    settle(&nodes, balanced).await;
    let cluster = nodes.cluster.clone();
    let (connected, _pushes, _gone, _) = connected_and_gone(&nodes, &nodes.routers[0], false).await;
    // Presence restarted from an old copy: the connected agent's connection reads as expired an hour ago.
    // Their gateway writes it again at its next heartbeat.
    let old = nodes.clock.now_ms() - 60 * 60_000;
    nodes.presence.session_alive(&tenant(), &connected, "s-1", "gw", old).await.unwrap();
    heartbeats(&nodes, 1).await;
    let expires = nodes.clock.now_ms() + 24 * 60 * 60_000;
    nodes.presence.session_alive(&tenant(), &connected, "s-1", "gw", expires).await.unwrap();
    heartbeats(&nodes, common::GRACE.as_secs() + 2).await;
    let availability = cluster.agent_availability(&tenant(), &connected).await.unwrap();
    assert_eq!(availability.status, AgentStatus::Online, "not taken for gone on one heartbeat's reading");
}
