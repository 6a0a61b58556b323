//! `ClusterClient` over real gRPC on loopback: one `MemoryStore` served by `StoreGrpcServer`, three routers
//! each served by `RouterGrpcServer` on its own port, and a gateway-side `ClusterClient`.
//!
//! Every router node runs in a tokio runtime of its own, as it would in a process of its own: killing a
//! node shuts its runtime down, which drops every task and socket of the node at once (kill -9: no
//! handover, connections reset), and a node restarted on the same address is a fresh runtime.
//!
//! Database time is a `FixedClock`, moved only by the tests (to expire a dead node's leases); real time
//! drives the renewals, and every wait is a condition polled with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{Running, any_port, client_settings, eventually, within};
use switchboard_domain::{
    AgentAvailability, AgentEntry, AgentId, AgentStatus, Author, Clock, ConversationId, ConversationState, Directory,
    Event, EventBody, FixedClock, GroupEntry, GroupId, N_SHARDS, Refusal, Routing, TenantEntry, TenantId, WaitingEntry,
    agent_key, conversation_key, queue_key, shard_of,
};
use switchboard_presence::{MemoryPresence, Presence};
use switchboard_proto::internal::v1::GetPlacementRequest;
use switchboard_proto::router::{
    AgentChange, AgentView, Caller, ChatCommand, ChatList, ChatView, ClusterApi, CommandOutcome, EventPage, GatewayId,
    LeftQueue, OfferUpdate, OfflineMessage, PeerApi, Push, QueueChange, RouterApi, RouterError, ShownOffer, StartChat,
    StartedChat, SystemCommand, Ticket,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_router::{LeaseSettings, PresenceSettings, Router, RouterSettings};
use switchboard_rpc::cluster::{
    ClusterClient, ClusterSettings, Connector, GrpcConnector, NodeClient, NodePushes, PlacementUpdates, PlacementView,
};
use switchboard_rpc::{GrpcServices, GrpcStore, RouterGrpcServer, ServerSettings, StoreGrpcServer, serve_grpc};
use switchboard_store::MemoryStore;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const NOW_MS: i64 = 1_700_000_000_000;
const N_GROUPS: usize = 32;
const N_AGENTS: usize = 32;
/// Push-routed groups, besides the `N_GROUPS` pull-routed ones.
const N_PUSH_GROUPS: usize = 16;

fn leases() -> LeaseSettings {
    LeaseSettings {
        lease: Duration::from_secs(2),
        renew_every: Duration::from_millis(200),
        renew_deadline: Duration::from_secs(1),
    }
}

fn cluster_settings() -> ClusterSettings {
    ClusterSettings { retry_for: Duration::from_secs(10), poll_every: Duration::from_millis(100) }
}

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn group(i: usize) -> GroupId {
    GroupId::new(format!("g{i:02}")).unwrap()
}

fn push_group(i: usize) -> GroupId {
    GroupId::new(format!("p{i:02}")).unwrap()
}

fn agent(i: usize) -> AgentId {
    AgentId::new(format!("a{i:02}")).unwrap()
}

/// Many groups and agents (every agent in every group), so that each router owns some of each. The offers of
/// the push-routed groups never time out: the clock stands still.
fn directory() -> Directory {
    let pushed = |i| {
        let mut entry = GroupEntry::new(push_group(i), format!("push group {i}"));
        entry.routing = Routing::Push { offer_timeout_ms: 60_000 };
        (push_group(i), entry)
    };
    let groups = (0..N_GROUPS).map(|i| (group(i), GroupEntry::new(group(i), format!("group {i}"))));
    let groups: Vec<(GroupId, GroupEntry)> = groups.chain((0..N_PUSH_GROUPS).map(pushed)).collect();
    let ids: Vec<GroupId> = groups.iter().map(|(id, _)| id.clone()).collect();
    let agents = (0..N_AGENTS).map(|i| {
        let entry = AgentEntry { id: agent(i), name: format!("agent {i}"), groups: ids.clone(), capacity: 5 };
        (agent(i), entry)
    });
    let entry = TenantEntry {
        id: tenant(),
        name: "Acme".into(),
        groups: groups.into_iter().collect(),
        agents: agents.collect(),
    };
    let mut directory = Directory::default();
    directory.add_tenant(entry, vec![], vec![]).unwrap();
    directory
}

/// The node that owns the shard of `key` in `view`.
fn owner_of<'a>(view: &'a PlacementView, key: &str) -> Option<&'a str> {
    view.owners[shard_of(key).0 as usize].as_ref().map(|(node, _)| node.as_str())
}

/// A router node: a `Router` with its own `ClusterClient` as peers, served on its own port, in a runtime of its
/// own.
struct Node {
    id: String,
    addr: SocketAddr,
    router: Arc<Router>,
    /// `None` once the node is dead.
    runtime: Option<tokio::runtime::Runtime>,
    stop_server: oneshot::Sender<()>,
    served: JoinHandle<()>,
}

/// What every node shares: the store's address, database time, the directory and presence (Redis in the
/// split roles).
#[derive(Clone)]
struct Shared {
    store_url: String,
    clock: Arc<FixedClock>,
    directory: Arc<Directory>,
    presence: Arc<dyn Presence>,
    /// The routers' page of a conversation's log (`RouterSettings::page_bytes`).
    page_bytes: u64,
}

impl Node {
    /// Starts node `id` listening on `addr` (port 0: any), once it can bind it (a node restarted on the address
    /// of one just killed may have to wait for the old socket to close).
    async fn start(id: &str, addr: SocketAddr, shared: &Shared) -> Node {
        let listener = eventually(|| async { std::net::TcpListener::bind(addr).ok() }).await;
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(id.to_owned())
            .enable_all()
            .build()
            .unwrap();
        let (stop_server, stopped) = oneshot::channel::<()>();
        let (node_id, shared) = (id.to_owned(), shared.clone());
        let started = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let store = Arc::new(GrpcStore::connect_lazy(&shared.store_url, client_settings()).unwrap());
            let connector = GrpcConnector { store: store.clone(), settings: client_settings() };
            let peers = ClusterClient::start(store.clone(), Arc::new(connector), cluster_settings());
            let settings = RouterSettings {
                node_id,
                advertise: format!("http://{addr}"),
                leases: leases(),
                closed_list_limit: 50,
                page_bytes: shared.page_bytes,
                presence: PresenceSettings::default(),
            };
            let clock: Arc<dyn Clock> = shared.clock.clone();
            let peers_api: Arc<dyn ClusterApi> = Arc::new(peers.clone());
            let presence = shared.presence.clone();
            let router =
                Router::start(settings, store, clock, shared.directory.clone(), presence, Some(peers_api)).await;
            let router = Arc::new(router.unwrap());
            // As the router role does: shards freed elsewhere are taken at once, not at the next renewal.
            let mut placement = peers.placement();
            let watched = router.clone();
            tokio::spawn(async move {
                while placement.changed().await.is_ok() {
                    if placement.borrow_and_update().n_unowned() > 0 {
                        watched.placement_changed();
                    }
                }
            });
            let mut services = GrpcServices::new();
            let node: Arc<dyn ClusterApi> = router.clone();
            services.add_service(RouterGrpcServer::new(node).with_draining(services.draining()).into_service());
            let settings = ServerSettings { shutdown_grace: Duration::from_secs(2), ..ServerSettings::default() };
            let served = tokio::spawn(async move {
                let stopped = async move {
                    let _ = stopped.await;
                };
                serve_grpc(listener, services, &settings, stopped).await.unwrap();
            });
            (router, served)
        });
        let (router, served) = within(started).await.unwrap();
        Node { id: id.to_owned(), addr, router, runtime: Some(runtime), stop_server, served }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("a live node")
    }

    /// kill -9: every task and socket of the node goes at once; nothing is handed over.
    fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// SIGTERM, as the router role handles it: hands every shard over while still answering (`NotOwner`), then
    /// drains the server and exits.
    async fn terminate(mut self) {
        let router = self.router.clone();
        within(self.runtime().spawn(async move { router.shutdown().await })).await.unwrap().unwrap();
        let stop_server = std::mem::replace(&mut self.stop_server, oneshot::channel().0);
        let _ = stop_server.send(());
        within(&mut self.served).await.unwrap();
        self.kill();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A runtime cannot be dropped inside another one; it can be shut down without waiting.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Every push the gateway received, in order.
#[derive(Clone, Default)]
struct Pushes(Arc<Mutex<Vec<Push>>>);

impl Pushes {
    fn collect(mut receiver: mpsc::UnboundedReceiver<Push>) -> Pushes {
        let pushes = Pushes::default();
        let all = pushes.0.clone();
        tokio::spawn(async move {
            while let Some(push) = receiver.recv().await {
                all.lock().unwrap().push(push);
            }
        });
        pushes
    }

    /// The seqs of the conversation's events pushed so far.
    fn seqs(&self, conversation: ConversationId) -> BTreeSet<u64> {
        let pushes = self.0.lock().unwrap();
        pushes
            .iter()
            .filter_map(|push| match push {
                Push::Event { conversation: id, event, .. } if *id == conversation => Some(event.seq),
                _ => None,
            })
            .collect()
    }

    fn queue_changes(&self, group: &GroupId) -> Vec<QueueChange> {
        let pushes = self.0.lock().unwrap();
        pushes
            .iter()
            .filter_map(|push| match push {
                Push::Queue { group: pushed, change, .. } if pushed == group => Some(change.clone()),
                _ => None,
            })
            .collect()
    }

    fn agent_changes(&self, agent: &AgentId) -> Vec<AgentChange> {
        let pushes = self.0.lock().unwrap();
        pushes
            .iter()
            .filter_map(|push| match push {
                Push::Agent { agent: pushed, change, .. } if pushed == agent => Some(change.clone()),
                _ => None,
            })
            .collect()
    }

    fn n_snapshots(&self, group: &GroupId) -> usize {
        self.queue_changes(group).iter().filter(|change| matches!(change, QueueChange::Snapshot { .. })).count()
    }
}

/// Calls of the gateway's client held on their way to a node, one at a time: the test arms a gate for a call
/// by its name, the next call of that name waits at it until released, and the test learns when that call
/// has been answered.
#[derive(Default)]
struct Holds {
    gates: Mutex<HashMap<&'static str, Gate>>,
    /// While set, every subscription to a conversation fails as if its owner were unavailable.
    refuse_subscribes: AtomicBool,
    /// The subscriptions refused so.
    refused_subscribes: AtomicUsize,
    /// While set, every subscription to a conversation waits on its way until it is unset.
    park_subscribes: AtomicBool,
    /// The subscriptions waiting so now, and the most that ever waited at once.
    parked: AtomicUsize,
    most_parked: AtomicUsize,
}

/// A call held by [`Holds`].
struct Gate {
    entered: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
    answered: oneshot::Sender<()>,
}

/// The test's side of an armed [`Gate`].
struct Held {
    entered: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
    answered: oneshot::Receiver<()>,
}

impl Holds {
    /// Holds the next call named `call` (`"subscribe"`, `"unsubscribe_agent"`...).
    fn arm(&self, call: &'static str) -> Held {
        let (entered, entered_rx) = oneshot::channel();
        let (release_tx, release) = oneshot::channel();
        let (answered, answered_rx) = oneshot::channel();
        self.gates.lock().unwrap().insert(call, Gate { entered, release, answered });
        Held { entered: entered_rx, release: release_tx, answered: answered_rx }
    }

    /// Runs `future`, the call named `call`, first waiting at its gate if one is armed.
    async fn pass<T>(&self, call: &'static str, future: impl Future<Output = T>) -> T {
        let gate = self.gates.lock().unwrap().remove(call);
        let Some(gate) = gate else { return future.await };
        let _ = gate.entered.send(());
        let _ = gate.release.await;
        let answer = future.await;
        let _ = gate.answered.send(());
        answer
    }
}

impl Held {
    /// Waits until the held call reached the gate.
    async fn entered(&mut self) {
        within(&mut self.entered).await.expect("the gate is still armed");
    }

    /// Checks that the call does not reach its gate while another held call it must wait for is held. (A
    /// call that does not wait reaches it at once; 200 ms is a bound on how long that takes, not a condition
    /// waited for.)
    async fn waits(&mut self) {
        let early = tokio::time::timeout(Duration::from_millis(200), &mut self.entered).await;
        assert!(early.is_err(), "the call reached the owner while the call it must wait for was held");
    }

    /// Lets the call through and waits until the node answered it.
    async fn release(self) {
        let _ = self.release.send(());
        within(self.answered).await.expect("the held call was answered");
    }
}

/// The gateway's connector, with push streams that take `delay` to open (a slow network, a busy node): a node
/// must not be given subscriptions before this gateway's stream to it is open, or their pushes are lost. It
/// also loses the answers of the next `lost_start_answers` chat starts, after the router carried them out (a
/// router that stored the chat and went away before it answered).
struct SlowStreams {
    connector: GrpcConnector,
    delay: Duration,
    lost_start_answers: Arc<AtomicUsize>,
    holds: Arc<Holds>,
}

#[async_trait]
impl Connector for SlowStreams {
    fn node(&self, address: &str) -> Result<Arc<dyn NodeClient>, RouterError> {
        let (lost_start_answers, holds) = (self.lost_start_answers.clone(), self.holds.clone());
        Ok(Arc::new(SlowNode { node: self.connector.node(address)?, delay: self.delay, lost_start_answers, holds }))
    }

    async fn watch_placement(&self) -> Option<Result<PlacementUpdates, StoreError>> {
        self.connector.watch_placement().await
    }
}

struct SlowNode {
    node: Arc<dyn NodeClient>,
    delay: Duration,
    lost_start_answers: Arc<AtomicUsize>,
    holds: Arc<Holds>,
}

#[async_trait]
impl NodeClient for SlowNode {
    async fn open_push_stream(&self, gateway: &GatewayId) -> Result<NodePushes, RouterError> {
        tokio::time::sleep(self.delay).await;
        self.node.open_push_stream(gateway).await
    }
}

#[async_trait]
impl RouterApi for SlowNode {
    fn connect_gateway(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        self.node.connect_gateway(gateway, sink);
    }

    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError> {
        let started = self.node.start_chat(request).await;
        let lose = self.lost_start_answers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match lose {
            Ok(_) => Err(RouterError::Unavailable("the connection was reset before the answer".into())),
            Err(_) => started,
        }
    }

    async fn authorize_customer(&self, conversation: ConversationId, token: &str) -> Result<ChatView, RouterError> {
        self.node.authorize_customer(conversation, token).await
    }

    async fn chat_view(&self, caller: &Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        self.node.chat_view(caller, conversation).await
    }

    async fn subscribe(
        &self,
        gateway: &GatewayId,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        if self.holds.refuse_subscribes.load(Ordering::SeqCst) {
            self.holds.refused_subscribes.fetch_add(1, Ordering::SeqCst);
            return Err(RouterError::Unavailable("the owner is unavailable (the test says)".into()));
        }
        if self.holds.park_subscribes.load(Ordering::SeqCst) {
            let now = self.holds.parked.fetch_add(1, Ordering::SeqCst) + 1;
            self.holds.most_parked.fetch_max(now, Ordering::SeqCst);
            while self.holds.park_subscribes.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.holds.parked.fetch_sub(1, Ordering::SeqCst);
        }
        self.holds.pass("subscribe", self.node.subscribe(gateway, caller, conversation, after_seq)).await
    }

    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId) {
        self.holds.pass("unsubscribe", self.node.unsubscribe(gateway, conversation)).await;
    }

    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        self.node.read_events(caller, conversation, after_seq).await
    }

    async fn command(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError> {
        self.node.command(caller, conversation, command).await
    }

    async fn typing(&self, caller: &Caller, conversation: ConversationId, typing: bool) -> Result<(), RouterError> {
        self.node.typing(caller, conversation, typing).await
    }

    async fn customer_connection(&self, conversation: ConversationId) -> Result<(), RouterError> {
        self.node.customer_connection(conversation).await
    }

    async fn accept_chat(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError> {
        self.node.accept_chat(tenant, agent, conversation).await
    }

    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError> {
        self.node.set_agent_status(tenant, agent, status).await
    }

    async fn subscribe_queue(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        group: &GroupId,
    ) -> Result<(), RouterError> {
        self.holds.pass("subscribe_queue", self.node.subscribe_queue(gateway, tenant, group)).await
    }

    async fn unsubscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId) {
        self.holds.pass("unsubscribe_queue", self.node.unsubscribe_queue(gateway, tenant, group)).await;
    }

    async fn list_chats(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        list: ChatList,
    ) -> Result<Vec<ChatView>, RouterError> {
        self.node.list_chats(tenant, agent, list).await
    }
    async fn subscribe_agent(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        agent: &AgentId,
        shown: &[ShownOffer],
    ) -> Result<(), RouterError> {
        self.holds.pass("subscribe_agent", self.node.subscribe_agent(gateway, tenant, agent, shown)).await
    }

    async fn unsubscribe_agent(&self, gateway: &GatewayId, tenant: &TenantId, agent: &AgentId) {
        self.holds.pass("unsubscribe_agent", self.node.unsubscribe_agent(gateway, tenant, agent)).await;
    }

    async fn reject_offer(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.node.reject_offer(tenant, group, agent, conversation).await
    }

    async fn transfer_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_group: &GroupId,
    ) -> Result<ChatView, RouterError> {
        self.node.transfer_chat(caller, conversation, to_group).await
    }

    async fn forward_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        self.node.forward_chat(caller, conversation, to_agent).await
    }

    async fn leave_offline_message(&self, message: OfflineMessage) -> Result<Ticket, RouterError> {
        self.node.leave_offline_message(message).await
    }
}

#[async_trait]
impl PeerApi for SlowNode {
    async fn owner_accept(&self, conversation: ConversationId, agent: &AgentId) -> Result<ChatView, RouterError> {
        self.node.owner_accept(conversation, agent).await
    }

    async fn queue_add(&self, tenant: &TenantId, entry: WaitingEntry, since_us: i64) -> Result<(), RouterError> {
        self.node.queue_add(tenant, entry, since_us).await
    }

    async fn queue_remove(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        conversation: ConversationId,
        reason: LeftQueue,
    ) -> Result<(), RouterError> {
        self.node.queue_remove(tenant, group, conversation, reason).await
    }

    async fn agent_finished(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.node.agent_finished(tenant, agent, conversation).await
    }
    async fn conversation_system(
        &self,
        conversation: ConversationId,
        command: SystemCommand,
    ) -> Result<bool, RouterError> {
        self.node.conversation_system(conversation, command).await
    }

    async fn agent_offer(&self, tenant: &TenantId, agent: &AgentId, update: OfferUpdate) -> Result<(), RouterError> {
        self.node.agent_offer(tenant, agent, update).await
    }

    async fn agent_availability(&self, tenant: &TenantId, agent: &AgentId) -> Result<AgentAvailability, RouterError> {
        self.node.agent_availability(tenant, agent).await
    }

    async fn queue_agent_changed(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        availability: AgentAvailability,
    ) -> Result<(), RouterError> {
        self.node.queue_agent_changed(tenant, group, availability).await
    }

    async fn owner_forward(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        self.node.owner_forward(caller, conversation, to_agent).await
    }
}

struct Cluster {
    shared: Shared,
    store: Arc<MemoryStore>,
    _store_server: Running,
    nodes: BTreeMap<String, Node>,
    gateway_id: GatewayId,
    client: ClusterClient,
    pushes: Pushes,
    /// How many of the next chat starts' answers the gateway's client loses.
    lost_start_answers: Arc<AtomicUsize>,
    /// The gateway's client's calls held on their way.
    holds: Arc<Holds>,
}

impl Cluster {
    /// `n_nodes` routers; the gateway's push streams take `stream_delay` to open.
    async fn start(n_nodes: usize, stream_delay: Duration) -> Cluster {
        Cluster::start_paged(n_nodes, stream_delay, RouterSettings::PAGE_BYTES).await
    }

    /// As [`Cluster::start`], the routers answering reads of a log in pages of `page_bytes`.
    async fn start_paged(n_nodes: usize, stream_delay: Duration, page_bytes: u64) -> Cluster {
        Cluster::start_full(n_nodes, stream_delay, page_bytes, cluster_settings()).await
    }

    /// As [`Cluster::start_paged`], the gateway's client with `settings`.
    async fn start_full(n_nodes: usize, stream_delay: Duration, page_bytes: u64, settings: ClusterSettings) -> Cluster {
        // RUST_LOG=switchboard_rpc=debug (for example) shows what the nodes and the client do.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let clock = Arc::new(FixedClock::new(NOW_MS));
        let clock_dyn: Arc<dyn Clock> = clock.clone();
        let store = Arc::new(MemoryStore::new(clock_dyn));
        let mut services = GrpcServices::new();
        let server = StoreGrpcServer::new(store.clone())
            .with_poll_interval(Duration::from_millis(50))
            .with_draining(services.draining());
        services.add_service(server.into_service());
        let store_server = Running::start(any_port().await, services).await;
        let presence: Arc<dyn Presence> = Arc::new(MemoryPresence::new());
        let directory = Arc::new(directory());
        let shared = Shared { store_url: store_server.url(), clock, directory, presence, page_bytes };
        let mut nodes = BTreeMap::new();
        for i in 1..=n_nodes {
            let id = format!("node-{i}");
            let node = Node::start(&id, "127.0.0.1:0".parse().unwrap(), &shared).await;
            nodes.insert(id, node);
        }
        let gateway_store = Arc::new(GrpcStore::connect_lazy(&shared.store_url, client_settings()).unwrap());
        let connector = GrpcConnector { store: gateway_store.clone(), settings: client_settings() };
        let lost_start_answers = Arc::new(AtomicUsize::new(0));
        let holds = Arc::new(Holds::default());
        let connector = SlowStreams {
            connector,
            delay: stream_delay,
            lost_start_answers: lost_start_answers.clone(),
            holds: holds.clone(),
        };
        let client = ClusterClient::start(gateway_store, Arc::new(connector), settings);
        let gateway_id = GatewayId("gw-1".into());
        let (sink, receiver) = mpsc::unbounded_channel();
        client.connect_gateway(gateway_id.clone(), sink);
        let pushes = Pushes::collect(receiver);
        let cluster = Cluster {
            shared,
            store,
            _store_server: store_server,
            nodes,
            gateway_id,
            client,
            pushes,
            lost_start_answers,
            holds,
        };
        cluster.converged().await;
        cluster
    }

    fn view(&self) -> Arc<PlacementView> {
        self.client.placement().borrow().clone()
    }

    /// Waits until the live nodes hold their fair shares, every shard is owned, and the client sees exactly
    /// that placement; otherwise fails with what the store, the nodes and the client hold.
    async fn converged(&self) {
        let fair = (N_SHARDS as usize).div_ceil(self.nodes.len());
        let is_converged = || {
            let view = self.view();
            let counts: Vec<usize> = self.nodes.values().map(|node| node.router.n_shards_owned()).collect();
            let fair_everywhere = counts.iter().all(|&n| n <= fair && n + self.nodes.len() > fair);
            let seen_by_client = self.nodes.values().all(|node| {
                let owned = view.owners.iter().flatten().filter(|(owner, _)| *owner == node.id).count();
                owned == node.router.n_shards_owned()
                    && view.addresses.get(&node.id) == Some(&format!("http://{}", node.addr))
            });
            let only_live = view.addresses.len() == self.nodes.len();
            fair_everywhere && seen_by_client && only_live && view.n_unowned() == 0
        };
        let waited = tokio::time::timeout(common::DEADLINE, async {
            while !is_converged() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if waited.is_err() {
            let placement = self.store.get_placement(GetPlacementRequest {}).await.unwrap();
            let registered: Vec<&str> = placement.nodes.iter().map(|node| node.node_id.as_str()).collect();
            let mut leases: BTreeMap<&str, usize> = BTreeMap::new();
            for owner in &placement.owners {
                *leases.entry(owner.node_id.as_str()).or_default() += 1;
            }
            let held: BTreeMap<&str, usize> =
                self.nodes.values().map(|node| (node.id.as_str(), node.router.n_shards_owned())).collect();
            panic!(
                "the placement did not converge within {:?}: the store has nodes {registered:?} registered and \
                 leases {leases:?}; the live nodes hold {held:?}; the client sees {} nodes and {} shards unowned",
                common::DEADLINE,
                self.view().addresses.len(),
                self.view().n_unowned(),
            );
        }
    }

    /// A new conversation id whose shard `node` owns now.
    fn conversation_on(&self, node: &str) -> ConversationId {
        let view = self.view();
        loop {
            let id = ConversationId::new_v7(self.shared.clock.now_ms());
            if owner_of(&view, &conversation_key(&id)) == Some(node) {
                return id;
            }
        }
    }

    /// A group whose queue `node` owns now.
    fn group_on(&self, node: &str, except: &[GroupId]) -> GroupId {
        let view = self.view();
        (0..N_GROUPS)
            .map(group)
            .find(|group| !except.contains(group) && owner_of(&view, &queue_key(&tenant(), group)) == Some(node))
            .expect("a group on every node")
    }

    /// A push-routed group whose queue `node` owns now.
    fn push_group_on(&self, node: &str) -> GroupId {
        let view = self.view();
        (0..N_PUSH_GROUPS)
            .map(push_group)
            .find(|group| owner_of(&view, &queue_key(&tenant(), group)) == Some(node))
            .expect("a push-routed group on every node")
    }

    /// An agent whose actor `node` owns now.
    fn agent_on(&self, node: &str, except: &[AgentId]) -> AgentId {
        let view = self.view();
        (0..N_AGENTS)
            .map(agent)
            .find(|agent| !except.contains(agent) && owner_of(&view, &agent_key(&tenant(), agent)) == Some(node))
            .expect("an agent on every node")
    }

    /// Starts a chat, through the client, whose conversation lives on `node`; and subscribes the gateway to it.
    async fn start_chat(&self, node: &str, group: &GroupId, customer: &str) -> (ConversationId, Vec<u64>) {
        let conversation = self.conversation_on(node);
        let request = StartChat {
            conversation,
            tenant: tenant(),
            group: group.clone(),
            customer_name: customer.into(),
            question: format!("question from {customer}"),
            tried_before: false,
            customer_token: switchboard_domain::new_customer_token(),
        };
        let started = self.client.start_chat(request).await.unwrap();
        assert_eq!(started.view.state, ConversationState::Queued);
        let customer = Caller::Customer { conversation };
        let backlog = self.client.subscribe(&self.gateway_id, &customer, conversation, 0).await.unwrap();
        // As a gateway's session does, the pages after the first are read.
        let mut seqs: Vec<u64> = backlog.events.iter().map(|event| event.seq).collect();
        if let Some(after_seq) = backlog.next_after() {
            seqs.extend(self.log(conversation, after_seq).await.iter().map(|event| event.seq));
        }
        (conversation, seqs)
    }

    /// Two online agents, one on node-1 whose own pushes the gateway follows and one on node-2, and a group
    /// whose queue is on node-3: for [`Cluster::forwarded_chat_is_pushed`] once node-1's shards moved.
    async fn agents_to_forward_between(&self) -> (AgentId, AgentId, GroupId) {
        let moving = self.agent_on("node-1", &[]);
        let forwarding = self.agent_on("node-2", &[]);
        let queue = self.group_on("node-3", &[]);
        self.client.subscribe_agent(&self.gateway_id, &tenant(), &moving, &[]).await.unwrap();
        for agent in [&moving, &forwarding] {
            self.client.set_agent_status(&tenant(), agent, AgentStatus::Online).await.unwrap();
        }
        (moving, forwarding, queue)
    }

    /// A chat of `queue`, started on node-2 and accepted by `from`, is forwarded to `to` (once `to` is
    /// available on its owner), whose owner pushes it to this gateway as `to`'s.
    async fn forwarded_chat_is_pushed(&self, queue: &GroupId, from: &AgentId, to: &AgentId) {
        let (chat, _) = self.start_chat("node-2", queue, "carol").await;
        self.client.accept_chat(&tenant(), from, chat).await.unwrap();
        let by = Caller::Agent { tenant: tenant(), agent: from.clone() };
        let forwarded = eventually(|| async {
            match self.client.forward_chat(&by, chat, to).await {
                Ok(view) => Some(view),
                Err(RouterError::Refused(Refusal::AgentUnavailable)) => None,
                Err(error) => panic!("forward failed: {error}"),
            }
        })
        .await;
        assert_eq!(forwarded.owner.as_ref(), Some(to));
        eventually(|| async {
            let assigned = |change: &AgentChange| {
                matches!(change, AgentChange::Assigned { chat: view } if view.conversation == chat)
            };
            self.pushes.agent_changes(to).iter().any(assigned).then_some(())
        })
        .await;
    }

    /// The conversation's log after `after_seq`, every page of it.
    async fn log(&self, conversation: ConversationId, after_seq: u64) -> Vec<Event> {
        let customer = Caller::Customer { conversation };
        let (mut events, mut next) = (Vec::new(), Some(after_seq));
        while let Some(after_seq) = next {
            let page = self.client.read_events(&customer, conversation, after_seq).await.unwrap();
            next = page.next_after();
            events.extend(page.events);
        }
        events
    }

    /// Waits until every stored event of the conversation reached the gateway (pushed, forwarded by a
    /// resubscription, or in `backlog`, what the gateway's own subscribe returned); answers the last seq.
    async fn gap_free(&self, conversation: ConversationId, backlog: &[u64]) -> u64 {
        let stored = self.log(conversation, 0).await;
        let last = stored.last().unwrap().seq;
        assert_eq!(stored.iter().map(|event| event.seq).collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>());
        let wanted: BTreeSet<u64> = (1..=last).collect();
        within(async {
            loop {
                let mut seen = self.pushes.seqs(conversation);
                seen.extend(backlog);
                if wanted.is_subset(&seen) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        last
    }

    /// Moves database time by `by_ms` in steps, each once the live nodes renewed their registrations (and so
    /// their leases) at the time of the previous one, as they would when time flows.
    async fn advance_database_time(&self, by_ms: i64, live: &[&str]) {
        let (step, lease_ms) = (400, leases().lease.as_millis() as i64);
        let mut moved = 0;
        while moved < by_ms {
            self.shared.clock.advance_ms(step);
            moved += step;
            let now = self.shared.clock.now_ms();
            eventually(|| async {
                let placement = self.store.get_placement(GetPlacementRequest {}).await.unwrap();
                let renewed = live.iter().all(|id| {
                    placement.nodes.iter().any(|node| node.node_id == *id && node.expires_at_ms >= now + lease_ms)
                });
                renewed.then_some(())
            })
            .await;
        }
    }
}

/// A customer sending m1, m2, ... one after the other through the gateway's client until stopped.
struct Customer {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<SendReport>>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone, Default)]
struct SendReport {
    n_sent: usize,
    longest: Duration,
    failures: Vec<(String, RouterError)>,
    /// The message being sent, and since when.
    in_flight: Option<(String, Instant)>,
}

impl Customer {
    fn start(client: ClusterClient, conversation: ConversationId) -> Customer {
        let (stop, report) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(SendReport::default())));
        let (stopped, shared) = (stop.clone(), report.clone());
        let task = tokio::spawn(async move {
            let customer = Caller::Customer { conversation };
            // A steady pace: a message every few milliseconds.
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            for i in 1.. {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                pace.tick().await;
                let client_msg_id = format!("m{i}");
                let send = ChatCommand::Send { client_msg_id: client_msg_id.clone(), body: client_msg_id.clone() };
                let started = Instant::now();
                shared.lock().unwrap().in_flight = Some((client_msg_id.clone(), started));
                let result = client.command(&customer, conversation, send).await;
                let mut report = shared.lock().unwrap();
                report.in_flight = None;
                report.longest = report.longest.max(started.elapsed());
                match result {
                    // A duplicate is fine: an attempt that the client retried had been stored.
                    Ok(_) => report.n_sent += 1,
                    Err(error) => report.failures.push((client_msg_id, error)),
                }
            }
        });
        Customer { stop, report, task }
    }

    fn report(&self) -> SendReport {
        self.report.lock().unwrap().clone()
    }

    /// Waits until `n` more messages were sent.
    async fn sends(&self, n: usize) {
        let target = self.report().n_sent + n;
        let sent = tokio::time::timeout(common::DEADLINE, async {
            while self.report().n_sent < target {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if sent.is_err() {
            let report = self.report();
            let in_flight = report.in_flight.as_ref().map(|(id, since)| (id.clone(), since.elapsed()));
            panic!("{n} more messages not sent within {:?}: {report:?}, in flight: {in_flight:?}", common::DEADLINE);
        }
    }

    async fn stop(self) -> SendReport {
        self.stop.store(true, Ordering::SeqCst);
        let report = self.report.clone();
        within(self.task).await.unwrap();
        report.lock().unwrap().clone()
    }
}

/// Waits until the gateway is told that `conversation` is in the queue of `group`: by its addition, or by a
/// snapshot of the queue that holds it (a subscription made again after the chat started, which the gateway
/// takes for the whole queue as well).
async fn queue_added(cluster: &Cluster, group: &GroupId, conversation: ConversationId) {
    eventually(|| async {
        let changes = cluster.pushes.queue_changes(group);
        let told = |change: &QueueChange| match change {
            QueueChange::Added { entry } => entry.conversation == conversation,
            QueueChange::Snapshot { entries } => entries.iter().any(|entry| entry.conversation == conversation),
            _ => false,
        };
        changes.iter().any(told).then_some(())
    })
    .await;
}

/// Every message m1..mN is stored exactly once, in order.
async fn stored_once(cluster: &Cluster, conversation: ConversationId, n_sent: usize) {
    let events = cluster.log(conversation, 0).await;
    let ids: Vec<&str> = events
        .iter()
        .filter(|event| matches!(event.body, EventBody::Message { .. }) && event.author == Author::Customer)
        .filter_map(|event| event.client_msg_id.as_deref())
        .filter(|id| id.starts_with('m'))
        .collect();
    let expected: Vec<String> = (1..=n_sent).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_across_routers_and_a_graceful_handover() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    // 1. Placement converged: every node owns its fair share, and the client sees every shard owned.
    let view = cluster.view();
    assert_eq!(view.n_unowned(), 0);
    assert_eq!(view.addresses.len(), 3);

    // 2. The queue lives on node-3, the agent on node-2, the conversation on node-1.
    let queue = cluster.group_on("node-3", &[]);
    let accepting = cluster.agent_on("node-2", &[]);
    let gateway = cluster.gateway_id.clone();
    cluster.client.subscribe_queue(&gateway, &tenant(), &queue).await.unwrap();
    eventually(|| async { (cluster.pushes.n_snapshots(&queue) >= 1).then_some(()) }).await;
    cluster.client.set_agent_status(&tenant(), &accepting, AgentStatus::Online).await.unwrap();

    let (chat, backlog) = cluster.start_chat("node-1", &queue, "carol").await;
    let (other_chat, _) = cluster.start_chat("node-2", &queue, "dave").await;
    let accepted = cluster.client.accept_chat(&tenant(), &accepting, chat).await.unwrap();
    assert_eq!((accepted.state, accepted.owner.clone()), (ConversationState::Active, Some(accepting.clone())));
    let customer = Caller::Customer { conversation: chat };
    let agent_caller = Caller::Agent { tenant: tenant(), agent: accepting.clone() };
    let hello = ChatCommand::Send { client_msg_id: "c-1".into(), body: "hello".into() };
    cluster.client.command(&customer, chat, hello).await.unwrap();
    let hi = ChatCommand::Send { client_msg_id: "a-1".into(), body: "hi, Carol".into() };
    let answer = cluster.client.command(&agent_caller, chat, hi).await.unwrap().event.unwrap();
    cluster.gap_free(chat, &backlog).await;
    // A client claiming more of the log than it holds is refused, and the gateway's record of what reached
    // it is left as it was: the gaps of the handover below are still found and filled.
    for after_seq in [answer.seq + 1, u64::MAX] {
        let refused = cluster.client.subscribe(&gateway, &customer, chat, after_seq).await.unwrap_err();
        assert_eq!(refused, RouterError::Refused(Refusal::BadAfterSeq { last_seq: answer.seq }));
    }
    let pushed = cluster.pushes.0.lock().unwrap().clone();
    assert!(pushed.iter().any(|push| matches!(push, Push::Event { event, .. } if **event == answer)));
    // The queue on node-3 heard of both chats (from node-1 and node-2) and of the accept (from node-1).
    eventually(|| async {
        let changes = cluster.pushes.queue_changes(&queue);
        let added = |id| {
            changes.iter().any(|change| matches!(change, QueueChange::Added { entry } if entry.conversation == id))
        };
        let removed = changes.iter().any(|change| {
            matches!(change, QueueChange::Removed { conversation, reason: LeftQueue::Accepted { agent } }
                if *conversation == chat && *agent == accepting)
        });
        (added(chat) && added(other_chat) && removed).then_some(())
    })
    .await;

    // 3. node-1 hands its shards over while the customer keeps sending. An agent and a queue of node-1 are
    // followed too: the agent's status and the queue's subscription must follow them to their new owners.
    let moving_agent = cluster.agent_on("node-1", &[]);
    cluster.client.set_agent_status(&tenant(), &moving_agent, AgentStatus::Online).await.unwrap();
    let moving_queue = cluster.group_on("node-1", &[]);
    cluster.client.subscribe_queue(&gateway, &tenant(), &moving_queue).await.unwrap();
    eventually(|| async { (cluster.pushes.n_snapshots(&moving_queue) >= 1).then_some(()) }).await;

    let sender = Customer::start(cluster.client.clone(), chat);
    sender.sends(20).await;
    let node = cluster.nodes.remove("node-1").unwrap();
    let handover = Instant::now();
    node.terminate().await;
    let terminated = handover.elapsed();
    cluster.converged().await;
    sender.sends(40).await;
    let report = sender.stop().await;
    println!("graceful handover: terminate took {terminated:?}; {report:?}");
    // Database time stands still here: node-1's leases never expire, so every shard taken over was released
    // by the handover (`converged` above), and a send waiting for them to expire would have failed (after
    // `retry_for`). How long the sends waited is printed, not asserted: it is this machine's load.
    assert!(report.failures.is_empty(), "{report:?}");
    stored_once(&cluster, chat, report.n_sent).await;
    cluster.gap_free(chat, &backlog).await;

    // The queue is followed on its new owner: a new chat in it is pushed...
    let (next_chat, _) = cluster.start_chat("node-2", &moving_queue, "erin").await;
    queue_added(&cluster, &moving_queue, next_chat).await;
    // ... and the agent is online there: it can take the chat.
    let view = eventually(|| async {
        match cluster.client.accept_chat(&tenant(), &moving_agent, next_chat).await {
            Ok(view) => Some(view),
            Err(RouterError::Refused(Refusal::AgentNotOnline)) => None,
            Err(error) => panic!("accept failed: {error}"),
        }
    })
    .await;
    assert_eq!(view.owner, Some(moving_agent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_router_is_replaced_once_its_leases_expire() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    let queue = cluster.group_on("node-3", &[]);
    let (chat, backlog) = cluster.start_chat("node-1", &queue, "carol").await;
    let sender = Customer::start(cluster.client.clone(), chat);
    sender.sends(20).await;

    let node = cluster.nodes.remove("node-1").unwrap();
    let crash = Instant::now();
    node.kill();
    // Its leases and its registration expire in database time; the others keep renewing theirs.
    cluster.advance_database_time(leases().lease.as_millis() as i64 + 400, &["node-2", "node-3"]).await;
    cluster.converged().await;
    sender.sends(40).await;
    let report = sender.stop().await;
    println!("crash: leases expired and sends went on within {:?}; {report:?}", crash.elapsed());
    assert!(report.failures.is_empty(), "{report:?}");
    stored_once(&cluster, chat, report.n_sent).await;
    cluster.gap_free(chat, &backlog).await;
}

/// node-2 is killed and started again at once under the same name: it takes its own shards back at once (new
/// epochs) and knows nothing of the gateway, which must follow its conversation and its queue there again.
async fn restart(same_address: bool, stream_delay: Duration, page_bytes: u64) {
    let mut cluster = Cluster::start_paged(3, stream_delay, page_bytes).await;
    let queue = cluster.group_on("node-2", &[]);
    let gateway = cluster.gateway_id.clone();
    cluster.client.subscribe_queue(&gateway, &tenant(), &queue).await.unwrap();
    eventually(|| async { (cluster.pushes.n_snapshots(&queue) >= 1).then_some(()) }).await;
    let (chat, backlog) = cluster.start_chat("node-2", &queue, "carol").await;
    let sender = Customer::start(cluster.client.clone(), chat);
    sender.sends(20).await;

    let node = cluster.nodes.remove("node-2").unwrap();
    let addr = if same_address { node.addr } else { "127.0.0.1:0".parse().unwrap() };
    let restart = Instant::now();
    node.kill();
    let node = Node::start("node-2", addr, &cluster.shared).await;
    let restarted = restart.elapsed();
    cluster.nodes.insert("node-2".into(), node);
    cluster.converged().await;
    sender.sends(40).await;
    let report = sender.stop().await;
    println!("restart (same address: {same_address}): node back after {restarted:?}; {report:?}");
    assert!(report.failures.is_empty(), "{report:?}");
    stored_once(&cluster, chat, report.n_sent).await;
    cluster.gap_free(chat, &backlog).await;
    // The queue is followed again on the restarted node, and its pushes reach the gateway.
    let (late_chat, late_backlog) = cluster.start_chat("node-2", &queue, "dave").await;
    queue_added(&cluster, &queue, late_chat).await;
    let customer = Caller::Customer { conversation: late_chat };
    let send = ChatCommand::Send { client_msg_id: "late".into(), body: "still there?".into() };
    let sent = cluster.client.command(&customer, late_chat, send).await.unwrap().event.unwrap();
    eventually(|| async { cluster.pushes.seqs(late_chat).contains(&sent.seq).then_some(()) }).await;
    cluster.gap_free(late_chat, &late_backlog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_restarted_on_the_same_address_gets_its_subscriptions_back() {
    restart(true, Duration::ZERO, RouterSettings::PAGE_BYTES).await;
}

/// The gateway's stream to the new address takes a while to open: nothing may be subscribed there before it
/// is (its pushes would be lost). The gateway also subscribes to the queue before its first streams open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_back_on_another_address_gets_its_subscriptions_back() {
    restart(false, Duration::from_millis(300), RouterSettings::PAGE_BYTES).await;
}

/// As above, the routers answering in pages of one event or so: what the gateway missed while its stream to
/// the new address opened is forwarded to it page after page, and a subscription's backlog read the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_back_on_another_address_fills_the_gateway_s_gaps_page_after_page() {
    restart(false, Duration::from_millis(300), 600).await;
}

/// The gateway follows an agent's own pushes; the agent's shard moves (a graceful handover): the gateway
/// follows the agent on its new owner, which pushes the agent a chat forwarded to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_subscription_follows_the_agent_to_its_new_owner() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    let gateway = cluster.gateway_id.clone();
    let (moving, forwarding, queue) = cluster.agents_to_forward_between().await;

    let node = cluster.nodes.remove("node-1").unwrap();
    node.terminate().await;
    cluster.converged().await;
    assert_ne!(owner_of(&cluster.view(), &agent_key(&tenant(), &moving)), Some("node-1"));

    // A chat accepted by one agent is forwarded to the agent who moved (once its status is restored there).
    cluster.forwarded_chat_is_pushed(&queue, &forwarding, &moving).await;

    cluster.client.unsubscribe_agent(&gateway, &tenant(), &moving).await;
}

/// A router that stored a chat and went away before it answered (the answer lost with the connection): the
/// gateway's client tries the start again on the conversation's owner, which finds the chat stored and answers
/// it with its token. The customer sees no error, and no second chat is made (one whose customer never got its
/// token, left in the queue). Starts with and without a start key alike: the conversation id is the same in
/// every try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_start_whose_answer_is_lost_is_tried_again_and_stored_once() {
    let cluster = Cluster::start(2, Duration::ZERO).await;
    let keyless = cluster.conversation_on("node-1");
    let key = uuid::Uuid::new_v4();
    let keyed = ConversationId::for_start(&tenant(), key);
    // The tokens the gateway chooses: a random one, and the key's.
    let keyed_token = switchboard_domain::customer_token_for_start(&tenant(), key);
    let request = |conversation, customer_token: &str| StartChat {
        conversation,
        tenant: tenant(),
        group: group(0),
        customer_name: "ann".into(),
        question: "hello?".into(),
        tried_before: false,
        customer_token: customer_token.to_owned(),
    };
    for (conversation, token) in [(keyless, switchboard_domain::new_customer_token()), (keyed, keyed_token.clone())] {
        cluster.lost_start_answers.store(1, Ordering::SeqCst);
        let started = cluster.client.start_chat(request(conversation, &token)).await.unwrap();
        assert_eq!(cluster.lost_start_answers.load(Ordering::SeqCst), 0, "the first try's answer was lost");
        assert_eq!(started.view.conversation, conversation);
        assert_eq!(started.view.state, ConversationState::Queued);
        assert!(!started.duplicate, "the client sent this start once");
        let customer = Caller::Customer { conversation };
        let events = cluster.client.read_events(&customer, conversation, 0).await.unwrap().events;
        let created = events.iter().filter(|event| matches!(event.body, EventBody::Created { .. })).count();
        assert_eq!(created, 1, "stored once: {events:?}");
        assert_eq!(events.iter().map(|event| event.seq).collect::<Vec<_>>(), [1, 2]);
        // The token answered is the gateway's: the customer can resume the chat with it.
        assert_eq!(started.customer_token, token);
        cluster.client.authorize_customer(conversation, &started.customer_token).await.unwrap();
    }
    // A keyed start that the client itself sends again is still answered as a duplicate, with its token.
    let again = cluster.client.start_chat(request(keyed, &keyed_token)).await.unwrap();
    assert_eq!((again.view.conversation, again.duplicate, again.customer_token), (keyed, true, keyed_token));
}

/// The chat's owner moves, and the gateway's client subscribes to it again on the new owner; its last socket
/// stops following it meanwhile, so the resubscription undoes itself with an unsubscribe. A socket follows
/// the chat again before that unsubscribe lands on the owner, which removes the new subscription too: the
/// client must subscribe once more, or the chat's pushes stop reaching a gateway that believes it follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_followed_again_while_a_resubscription_undoes_itself_stays_followed() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    let gateway = cluster.gateway_id.clone();
    let queue = cluster.group_on("node-3", &[]);
    let (chat, backlog) = cluster.start_chat("node-2", &queue, "carol").await;
    let customer = Caller::Customer { conversation: chat };

    let mut resubscription = cluster.holds.arm("subscribe");
    cluster.nodes.remove("node-2").unwrap().terminate().await;
    resubscription.entered().await;
    // The last socket stops following the chat while the resubscription is on its way.
    cluster.client.unsubscribe(&gateway, chat).await;
    let mut undo = cluster.holds.arm("unsubscribe");
    resubscription.release().await;
    undo.entered().await;
    // A socket follows the chat again before the undo lands.
    let last = *backlog.last().unwrap();
    let page = cluster.client.subscribe(&gateway, &customer, chat, last).await.unwrap();
    assert!(page.events.is_empty(), "nothing was sent since: {page:?}");
    undo.release().await;

    let send = ChatCommand::Send { client_msg_id: "m1".into(), body: "anyone?".into() };
    let sent = cluster.client.command(&customer, chat, send).await.unwrap().event.unwrap();
    eventually(|| async { cluster.pushes.seqs(chat).contains(&sent.seq).then_some(()) }).await;
}

/// For an agent's own pushes, unlike a chat's, nothing fills a hole: the agent's last socket here signs out
/// while the subscription made again after an owner move is on its way, and the agent signs in again at
/// once. The sign-out waits for that subscription, and the sign-in for the sign-out, so that the gateway is
/// never left unsubscribed while it follows the agent. (Before, the subscription found the agent no longer
/// followed and undid itself, and that undo could land after the sign-in: the gateway was unsubscribed until
/// it subscribed once more, and a chat forwarded to the agent meanwhile was never pushed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_signed_out_and_in_again_while_a_resubscription_is_on_its_way_stays_followed() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    let gateway = cluster.gateway_id.clone();
    let (moving, forwarding, queue) = cluster.agents_to_forward_between().await;

    let mut resubscription = cluster.holds.arm("subscribe_agent");
    cluster.nodes.remove("node-1").unwrap().terminate().await;
    resubscription.entered().await;
    let mut sign_out = cluster.holds.arm("unsubscribe_agent");
    let signed_out = {
        let (client, gateway, moving) = (cluster.client.clone(), gateway.clone(), moving.clone());
        tokio::spawn(async move { client.unsubscribe_agent(&gateway, &tenant(), &moving).await })
    };
    sign_out.waits().await;
    resubscription.release().await;
    sign_out.entered().await;
    let signed_in = {
        let (client, gateway, moving) = (cluster.client.clone(), gateway.clone(), moving.clone());
        tokio::spawn(async move {
            client.subscribe_agent(&gateway, &tenant(), &moving, &[]).await?;
            client.set_agent_status(&tenant(), &moving, AgentStatus::Online).await
        })
    };
    sign_out.release().await;
    within(signed_out).await.unwrap();
    within(signed_in).await.unwrap().unwrap();

    // A chat forwarded to the agent is pushed to this gateway.
    cluster.forwarded_chat_is_pushed(&queue, &forwarding, &moving).await;
}

/// An agent's pushes have no seq to resume from: a chat forwarded to the agent on their new owner before the
/// gateway follows them there (its subscription made again after the move is held on its way) reaches the
/// gateway once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_forwarded_to_an_agent_before_the_gateway_follows_them_on_their_new_owner_reaches_it() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    let (moving, forwarding, queue) = cluster.agents_to_forward_between().await;

    let mut resubscription = cluster.holds.arm("subscribe_agent");
    cluster.nodes.remove("node-1").unwrap().terminate().await;
    resubscription.entered().await;
    let (chat, _) = cluster.start_chat("node-2", &queue, "carol").await;
    cluster.client.accept_chat(&tenant(), &forwarding, chat).await.unwrap();
    let by = Caller::Agent { tenant: tenant(), agent: forwarding.clone() };
    // The agent is online on the new owner once the gateway gives them their status back there.
    let forwarded = eventually(|| async {
        match cluster.client.forward_chat(&by, chat, &moving).await {
            Ok(view) => Some(view),
            Err(RouterError::Refused(Refusal::AgentUnavailable)) => None,
            Err(error) => panic!("forward failed: {error}"),
        }
    })
    .await;
    assert_eq!(forwarded.owner.as_ref(), Some(&moving));
    resubscription.release().await;

    eventually(|| async {
        let assigned =
            |change: &AgentChange| matches!(change, AgentChange::Assigned { chat: view } if view.conversation == chat);
        cluster.pushes.agent_changes(&moving).iter().any(assigned).then_some(())
    })
    .await;
}

/// An offer the agent's consoles were shown ends on the agent's new owner (the agent declines it there) before
/// the gateway follows the agent there: its end was pushed to nobody. Following the agent again, the gateway
/// tells the offers it showed, and the new owner ends this one for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_that_ends_on_the_agents_new_owner_before_the_gateway_follows_them_there_is_ended_for_it() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    let moving = cluster.agent_on("node-1", &[]);
    let queue = cluster.push_group_on("node-3");
    cluster.client.subscribe_agent(&cluster.gateway_id, &tenant(), &moving, &[]).await.unwrap();
    cluster.client.set_agent_status(&tenant(), &moving, AgentStatus::Online).await.unwrap();
    // The only agent online: the chat is offered to them.
    let (chat, _) = cluster.start_chat("node-2", &queue, "carol").await;
    let is_offer =
        |change: &AgentChange| matches!(change, AgentChange::Offered { entry, .. } if entry.conversation == chat);
    let is_end =
        |change: &AgentChange| matches!(change, AgentChange::OfferEnded { conversation, .. } if *conversation == chat);
    eventually(|| async { cluster.pushes.agent_changes(&moving).iter().any(is_offer).then_some(()) }).await;

    let mut resubscription = cluster.holds.arm("subscribe_agent");
    cluster.nodes.remove("node-1").unwrap().terminate().await;
    resubscription.entered().await;
    let rejected = eventually(|| async {
        match cluster.client.reject_offer(&tenant(), &queue, &moving, chat).await {
            Ok(()) => Some(()),
            Err(error) if error.is_retryable() => None,
            Err(error) => panic!("reject failed: {error}"),
        }
    });
    rejected.await;
    let no_offer = || async {
        let availability = cluster.client.agent_availability(&tenant(), &moving).await.ok()?;
        availability.offer.is_none().then_some(())
    };
    eventually(no_offer).await;
    assert!(!cluster.pushes.agent_changes(&moving).iter().any(is_end), "the end reached nobody");
    resubscription.release().await;

    eventually(|| async { cluster.pushes.agent_changes(&moving).iter().any(is_end).then_some(()) }).await;
}

/// As for an agent, for a queue: the gateway stops following a queue while the subscription made again after
/// an owner move is on its way, and follows it again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_left_and_followed_again_while_a_resubscription_is_on_its_way_stays_followed() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    let gateway = cluster.gateway_id.clone();
    let queue = cluster.group_on("node-2", &[]);
    cluster.client.subscribe_queue(&gateway, &tenant(), &queue).await.unwrap();

    let mut resubscription = cluster.holds.arm("subscribe_queue");
    cluster.nodes.remove("node-2").unwrap().terminate().await;
    resubscription.entered().await;
    let mut left = cluster.holds.arm("unsubscribe_queue");
    let unsubscribed = {
        let (client, gateway, queue) = (cluster.client.clone(), gateway.clone(), queue.clone());
        tokio::spawn(async move { client.unsubscribe_queue(&gateway, &tenant(), &queue).await })
    };
    left.waits().await;
    resubscription.release().await;
    left.entered().await;
    let subscribed = {
        let (client, gateway, queue) = (cluster.client.clone(), gateway.clone(), queue.clone());
        tokio::spawn(async move { client.subscribe_queue(&gateway, &tenant(), &queue).await })
    };
    left.release().await;
    within(unsubscribed).await.unwrap();
    within(subscribed).await.unwrap().unwrap();

    // A new chat in the queue is pushed to this gateway.
    let (chat, _) = cluster.start_chat("node-1", &queue, "erin").await;
    queue_added(&cluster, &queue, chat).await;
}

/// The status an agent chose is set again on the agent's next owner only while the agent is signed in
/// through this gateway: once its last socket here is gone, the gateway forgets it. The agent may have chosen
/// another status through another gateway since, which a move must not overwrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_forgets_the_status_of_an_agent_no_longer_signed_in_there() {
    let cluster = Cluster::start(2, Duration::ZERO).await;
    let (gateway, agent) = (cluster.gateway_id.clone(), agent(0));
    cluster.client.subscribe_agent(&gateway, &tenant(), &agent, &[]).await.unwrap();
    cluster.client.set_agent_status(&tenant(), &agent, AgentStatus::Away).await.unwrap();
    assert_eq!(cluster.client.chosen_status(&tenant(), &agent), Some(AgentStatus::Away));
    cluster.client.unsubscribe_agent(&gateway, &tenant(), &agent).await;
    assert_eq!(cluster.client.chosen_status(&tenant(), &agent), None);
    // Signed in again, the agent's choice is kept again.
    cluster.client.subscribe_agent(&gateway, &tenant(), &agent, &[]).await.unwrap();
    cluster.client.set_agent_status(&tenant(), &agent, AgentStatus::Online).await.unwrap();
    assert_eq!(cluster.client.chosen_status(&tenant(), &agent), Some(AgentStatus::Online));
}

/// A router dies with 40 chats the gateway follows: the gateway subscribes again to them on their new owners
/// at most 16 at a time, so that the chats of a node that went away do not all reach the others at once; and
/// to each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resubscriptions_of_a_move_reach_the_new_owners_at_most_16_at_a_time() {
    let mut cluster = Cluster::start(3, Duration::ZERO).await;
    let queue = cluster.group_on("node-3", &[]);
    let mut chats = Vec::new();
    for i in 0..40 {
        chats.push(cluster.start_chat("node-2", &queue, &format!("customer {i}")).await.0);
    }
    let parked = || cluster.holds.parked.load(Ordering::SeqCst);
    cluster.holds.park_subscribes.store(true, Ordering::SeqCst);
    cluster.nodes.remove("node-2").unwrap().terminate().await;
    eventually(|| async { (parked() == 16).then_some(()) }).await;
    // No more come while those 16 wait (more would come at once: 200 ms bounds how long that takes).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cluster.holds.most_parked.load(Ordering::SeqCst), 16);
    cluster.holds.park_subscribes.store(false, Ordering::SeqCst);

    // Every chat is followed on its new owner: a message sent now reaches the gateway.
    for &chat in &chats {
        let send = ChatCommand::Send { client_msg_id: "after".into(), body: "still there?".into() };
        let customer = Caller::Customer { conversation: chat };
        let sent = cluster.client.command(&customer, chat, send).await.unwrap().event.unwrap();
        eventually(|| async { cluster.pushes.seqs(chat).contains(&sent.seq).then_some(()) }).await;
    }
    assert_eq!(cluster.holds.most_parked.load(Ordering::SeqCst), 16);
}

/// The chat's new owner stays unavailable to the gateway for longer than its client retries a call (1 s
/// here): the subscription made again after the move fails. It is tried again later, while the gateway
/// follows the chat, and what was sent meanwhile reaches the gateway. (Nothing else would subscribe it
/// again: no push comes to show a gap.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubscription_that_fails_is_tried_again_while_the_chat_is_followed() {
    let settings = ClusterSettings { retry_for: Duration::from_secs(1), ..cluster_settings() };
    let mut cluster = Cluster::start_full(3, Duration::ZERO, RouterSettings::PAGE_BYTES, settings).await;
    let queue = cluster.group_on("node-3", &[]);
    let (chat, backlog) = cluster.start_chat("node-2", &queue, "carol").await;
    let customer = Caller::Customer { conversation: chat };

    cluster.holds.refuse_subscribes.store(true, Ordering::SeqCst);
    cluster.nodes.remove("node-2").unwrap().terminate().await;
    cluster.converged().await;
    let send = ChatCommand::Send { client_msg_id: "m1".into(), body: "anyone?".into() };
    let sent = cluster.client.command(&customer, chat, send).await.unwrap().event.unwrap();
    eventually(|| async { (cluster.holds.refused_subscribes.load(Ordering::SeqCst) > 0).then_some(()) }).await;
    // The owner is unavailable to the gateway for 2 s from the first refusal: past the client's retries (1 s).
    // The resubscription is tried again 1–2 s after it gave up, then 2–4 s after that: one of them finds the
    // owner back, well within the deadline below.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.holds.refuse_subscribes.store(false, Ordering::SeqCst);

    eventually(|| async { cluster.pushes.seqs(chat).contains(&sent.seq).then_some(()) }).await;
    cluster.gap_free(chat, &backlog).await;
}
