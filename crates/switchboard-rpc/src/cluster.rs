//! The cluster as one service: a client that sends every operation to the router that owns its key's
//! shard. Gateways use it as their [`RouterApi`]; routers use it as their [`PeerApi`] for actors that live
//! on other nodes.
//!
//! - **Placement** (`shard → node → address`) comes from the store: a watch stream, plus polling every
//!   `poll_every` and a refresh whenever a router answers `NotOwner`. A placement read by a poll is dropped
//!   when another was installed while it was being read (it may be the older of the two).
//! - **Retries.** `NotOwner` (the request was not executed) is retried on the new owner until
//!   `retry_for` has passed. `Unavailable` is retried too for the operations that are idempotent (reads,
//!   subscriptions, commands carrying a client message id, casts, offers and their ends, availability
//!   reads, offline messages with their idempotency key, chat starts: their conversation id, the gateway's,
//!   is the same in every try and the store keeps one start per id); `accept_chat`, `transfer_chat`,
//!   `forward_chat` and `owner_forward` return it to the client, which may retry (each may have been carried
//!   out before the connection failed). A chat start tried again after a try without an answer says so
//!   (`tried_before`), and its answer is never `duplicate`: the client sent it once.
//! - **Routing.** Each call goes to the owner of one key: conversations by `conversation_key`; agents
//!   (`accept_chat`, statuses, `subscribe_agent`, `agent_offer`, `agent_availability`, `agent_finished`) by
//!   `agent_key`, and `forward_chat` by the key of the *target* agent (its owner reserves the slot first);
//!   queues (`subscribe_queue`, `queue_add`, `reject_offer`, `queue_agent_changed`, `leave_offline_message`)
//!   by `queue_key`.
//! - **Pushes** (gateway role). One push stream per router node, kept open while the node is in the
//!   placement. The client remembers what its gateway follows: conversations with the seq up to which every
//!   event reached the gateway (pushed, or returned by a subscription), queues, agents (their own pushes),
//!   and the status each agent chose. A node has somewhere to push before anything is subscribed on it: when a shard moves to a node
//!   whose stream is open, the client subscribes again there at once; otherwise the node's stream, once it
//!   opens, subscribes again to everything the gateway follows on that node. So does every stream that
//!   opens again (the node may have restarted, and pushes are lost while no stream is open). Subscribing
//!   again starts from the seq the gateway has every event up to, and forwards the events returned into
//!   the sink, so that sockets see no hole; a push that skips seqs starts the same catch-up. Agents get
//!   their chosen status back on their new owner. A queue's or an agent's subscription, made or made
//!   again, and its unsubscription take a lock of that queue or agent (`Inner::things`), so that the
//!   owner sees them in the order the gateway decided them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_domain::{
    AgentAvailability, AgentId, AgentStatus, ConversationId, GroupId, N_SHARDS, ShardId, TenantId, WaitingEntry,
    agent_key, conversation_key, queue_key, shard_of,
};
use switchboard_proto::internal::v1::{GetPlacementRequest, Placement};
use switchboard_proto::keyed_locks::KeyedLocks;
use switchboard_proto::router::{
    AgentChange, AgentView, Caller, ChatCommand, ChatList, ChatView, CommandOutcome, EventPage, GatewayId, LeftQueue,
    OfferUpdate, OfflineMessage, PeerApi, Push, QueueChange, RouterApi, RouterError, ShownOffer, StartChat,
    StartedChat, SystemCommand, Ticket,
};
use switchboard_proto::store::{StoreApi, StoreError};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_stream::{Stream, StreamExt};
use tracing::{debug, info, warn};

use crate::{ClientSettings, GrpcRouterNode, GrpcStore};

/// The first wait before a push stream that failed is opened again; it doubles up to [`STREAM_RETRY_MAX`].
const STREAM_RETRY_FIRST: Duration = Duration::from_millis(50);
const STREAM_RETRY_MAX: Duration = Duration::from_secs(1);
/// How long to wait before opening the store's placement watch again.
const WATCH_RETRY: Duration = Duration::from_millis(500);
/// How many subscriptions are made again at once, after moves (a node's shards may move in several steps),
/// streams opened again and retries together.
const RESUBSCRIBE_CONCURRENCY: usize = 16;
/// How long a resubscription that failed on a retryable error (its owner unavailable past the client's own
/// retries, or its actor too busy to answer) waits before it is tried again, first and at most. The gateway
/// still follows the thing, and nothing else would subscribe it again: no push comes to show a gap.
const RESUBSCRIBE_RETRY_FIRST: Duration = Duration::from_secs(2);
const RESUBSCRIBE_RETRY_MAX: Duration = Duration::from_secs(60);

/// A stream of pushes from one router node.
pub type NodePushes = Pin<Box<dyn Stream<Item = Result<Push, RouterError>> + Send>>;
/// A stream of placements from the store.
pub type PlacementUpdates = Pin<Box<dyn Stream<Item = Result<Placement, StoreError>> + Send>>;

/// A client of one router node.
#[async_trait]
pub trait NodeClient: RouterApi + PeerApi {
    /// Opens this gateway's push stream on the node. It is registered on the node when this returns.
    async fn open_push_stream(&self, gateway: &GatewayId) -> Result<NodePushes, RouterError>;
}

/// Makes clients of router nodes by address, and opens the placement watch of the store.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    fn node(&self, address: &str) -> Result<Arc<dyn NodeClient>, RouterError>;
    /// The store's placement watch; `None` when there is none (polling alone is used then).
    async fn watch_placement(&self) -> Option<Result<PlacementUpdates, StoreError>>;
}

/// The gRPC connector: router nodes through [`GrpcRouterNode`], the watch through [`GrpcStore`].
#[derive(Debug, Clone)]
pub struct GrpcConnector {
    pub store: Arc<GrpcStore>,
    pub settings: ClientSettings,
}

#[async_trait]
impl Connector for GrpcConnector {
    fn node(&self, address: &str) -> Result<Arc<dyn NodeClient>, RouterError> {
        Ok(Arc::new(GrpcRouterNode::connect_lazy(address, self.settings.clone())?))
    }

    async fn watch_placement(&self) -> Option<Result<PlacementUpdates, StoreError>> {
        Some(self.store.watch_placement().await.map(|stream| Box::pin(stream) as PlacementUpdates))
    }
}

#[async_trait]
impl NodeClient for GrpcRouterNode {
    async fn open_push_stream(&self, gateway: &GatewayId) -> Result<NodePushes, RouterError> {
        GrpcRouterNode::open_push_stream(self, gateway).await.map(|stream| Box::pin(stream) as NodePushes)
    }
}

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// How long an operation is retried while its shard has no reachable owner.
    pub retry_for: Duration,
    /// How often the placement is read even when the watch stream says nothing.
    pub poll_every: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings { retry_for: Duration::from_secs(8), poll_every: Duration::from_secs(1) }
    }
}

/// Who owns each shard, and where each node listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementView {
    /// Indexed by shard: the owning node and the lease epoch.
    pub owners: Vec<Option<(String, u64)>>,
    pub addresses: HashMap<String, String>,
}

impl PlacementView {
    fn from_placement(placement: &Placement) -> PlacementView {
        let mut owners = vec![None; N_SHARDS as usize];
        for owner in &placement.owners {
            if let Some(slot) = owners.get_mut(owner.shard as usize) {
                *slot = Some((owner.node_id.clone(), owner.epoch));
            }
        }
        let addresses = placement.nodes.iter().map(|node| (node.node_id.clone(), node.address.clone())).collect();
        PlacementView { owners, addresses }
    }

    /// The address of the node that owns `shard`, if any.
    pub fn address_of(&self, shard: ShardId) -> Option<&str> {
        let (node, _) = self.owners.get(shard.0 as usize)?.as_ref()?;
        self.addresses.get(node).map(String::as_str)
    }

    /// How many shards have no owner.
    pub fn n_unowned(&self) -> usize {
        self.owners.iter().filter(|owner| owner.is_none()).count()
    }
}

/// A conversation the gateway follows.
struct Followed {
    /// Who subscribed last: subscriptions are made again as them.
    caller: Caller,
    /// Every event up to this seq reached the gateway.
    through: u64,
    /// Events past a hole that reached the gateway.
    ahead: BTreeSet<u64>,
    /// A subscription under way will fill any hole: no catch-up is started meanwhile.
    catching_up: bool,
}

impl Followed {
    /// Notes that the event `seq` reached the gateway.
    fn note(&mut self, seq: u64) {
        if Some(seq) == self.through.checked_add(1) {
            self.through = seq;
            self.close_up();
        } else if seq > self.through {
            self.ahead.insert(seq);
        }
    }

    /// The gateway has every event up to `seq`.
    fn has_through(&mut self, seq: u64) {
        if seq > self.through {
            self.through = seq;
            self.ahead.retain(|ahead| *ahead > seq);
            self.close_up();
        }
    }

    /// Moves `through` over the events ahead that now follow it without a hole. (Seqs come from the store,
    /// and a client's `after_seq` beyond the log is refused by the conversation: `through` never nears
    /// `u64::MAX`, but no seq can make this overflow.)
    fn close_up(&mut self) {
        while let Some(next) = self.through.checked_add(1)
            && self.ahead.remove(&next)
        {
            self.through = next;
        }
    }

    /// Notes the events of a page a subscription answered. The events after it, up to its `last_seq`, are
    /// read by whoever subscribed (a session, or `forward_pages`) and count as reaching the gateway.
    fn note_page(&mut self, page: &EventPage) {
        for event in &page.events {
            self.note(event.seq);
        }
        if page.more() {
            self.has_through(page.last_seq);
        }
    }

    fn has_hole(&self) -> bool {
        !self.ahead.is_empty()
    }
}

/// What the gateway using this client follows, to subscribe again after a move.
#[derive(Default)]
struct Subscriptions {
    conversations: HashMap<ConversationId, Followed>,
    queues: HashSet<(TenantId, GroupId)>,
    /// The agents whose own pushes the gateway follows.
    followed_agents: HashSet<(TenantId, AgentId)>,
    /// The status each agent signed in here chose last (offline ones are not kept: a new owner starts them
    /// offline).
    agents: HashMap<(TenantId, AgentId), AgentStatus>,
    /// The offers pushed to each followed agent and not seen to end, with their expiry: told to the agent's
    /// owner when the gateway follows the agent again, which ends those whose end the gateway missed.
    offers: HashMap<(TenantId, AgentId), HashMap<ConversationId, i64>>,
    /// The resubscriptions waiting to be tried again (`retry_later`).
    retrying: HashSet<Resubscription>,
}

impl Subscriptions {
    /// Notes what a push says of the offers shown to followed agents.
    fn note_offers(&mut self, push: &Push) {
        match push {
            Push::Agent { tenant, agent, change } => {
                let key = (tenant.clone(), agent.clone());
                match change {
                    AgentChange::Offered { entry, expires_at_ms, .. } if self.followed_agents.contains(&key) => {
                        self.offers.entry(key).or_default().insert(entry.conversation, *expires_at_ms);
                    }
                    AgentChange::OfferEnded { conversation, .. } => self.forget_offer(&key, *conversation),
                    AgentChange::Assigned { chat } => self.forget_offer(&key, chat.conversation),
                    _ => {}
                }
            }
            // Taken (by anyone), or gone: its offers ended.
            Push::Queue { change: QueueChange::Removed { conversation, .. }, .. } => {
                self.offers.retain(|_, offers| {
                    offers.remove(conversation);
                    !offers.is_empty()
                });
            }
            _ => {}
        }
    }

    fn forget_offer(&mut self, key: &(TenantId, AgentId), conversation: ConversationId) {
        if let Some(offers) = self.offers.get_mut(key) {
            offers.remove(&conversation);
            if offers.is_empty() {
                self.offers.remove(key);
            }
        }
    }

    /// The offers shown to the agent and not seen to end, for their owner (see [`RouterApi::subscribe_agent`]).
    fn shown_offers(&self, key: &(TenantId, AgentId)) -> Vec<ShownOffer> {
        let offers = self.offers.get(key).into_iter().flatten();
        offers.map(|(&conversation, &expires_at_ms)| ShownOffer { conversation, expires_at_ms }).collect()
    }
}

struct GatewayLink {
    gateway: GatewayId,
    sink: mpsc::UnboundedSender<Push>,
}

/// The push stream kept open to one node.
struct NodeStream {
    id: u64,
    /// Whether the stream is open now (the node has somewhere to push this gateway's pushes).
    open: bool,
    /// `None` while it is being started.
    task: Option<AbortHandle>,
}

struct Inner {
    store: Arc<dyn StoreApi>,
    connector: Arc<dyn Connector>,
    settings: ClusterSettings,
    placement: watch::Sender<Arc<PlacementView>>,
    /// How many placements were installed.
    installed: Mutex<u64>,
    refresh: Arc<Notify>,
    nodes: Mutex<HashMap<String, Arc<dyn NodeClient>>>,
    link: RwLock<Option<Arc<GatewayLink>>>,
    /// By node address. Never locked while `nodes` is.
    streams: Mutex<HashMap<String, NodeStream>>,
    next_stream_id: AtomicU64,
    subscriptions: Mutex<Subscriptions>,
    /// The resubscriptions that may run at once, over every move, stream opened again and retry
    /// (`RESUBSCRIBE_CONCURRENCY`).
    resubscribe_permits: Arc<Semaphore>,
    /// One lock per queue and per agent, held while a call subscribes or unsubscribes the gateway on the
    /// owner together with the change of what the gateway follows that goes with it. A resubscription so
    /// sees the gateway's own calls for the thing before or after it, never in between: were it to find the
    /// thing no longer followed after its call and undo its subscription, that undo could land after the
    /// gateway followed the thing again, leaving it unsubscribed until a re-subscription (an agent's pushes
    /// made meanwhile, a chat forwarded to them, would be lost; a queue has its snapshot).
    things: KeyedLocks<Resubscription, ()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let streams = self.streams.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        for task in streams.drain().filter_map(|(_, stream)| stream.task) {
            task.abort();
        }
    }
}

/// The cluster seen from a gateway or a router. Cheap to clone.
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient").field("settings", &self.inner.settings).finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClusterClient {
    /// Starts following the placement (watch stream and polling). The client works at once; until the
    /// first placement arrives, operations wait for it (up to `retry_for`).
    pub fn start(store: Arc<dyn StoreApi>, connector: Arc<dyn Connector>, settings: ClusterSettings) -> ClusterClient {
        let (placement, _) = watch::channel(Arc::new(PlacementView::default()));
        let inner = Arc::new(Inner {
            store,
            connector,
            settings,
            placement,
            installed: Mutex::new(0),
            refresh: Arc::new(Notify::new()),
            nodes: Mutex::default(),
            link: RwLock::default(),
            streams: Mutex::default(),
            next_stream_id: AtomicU64::new(0),
            resubscribe_permits: Arc::new(Semaphore::new(RESUBSCRIBE_CONCURRENCY)),
            subscriptions: Mutex::default(),
            things: KeyedLocks::default(),
        });
        tokio::spawn(follow_placement(Arc::downgrade(&inner)));
        tokio::spawn(watch_placement(Arc::downgrade(&inner)));
        ClusterClient { inner }
    }

    /// The placement now, and every change.
    pub fn placement(&self) -> watch::Receiver<Arc<PlacementView>> {
        self.inner.placement.subscribe()
    }

    /// Reads the placement from the store now.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        refresh(&self.inner).await
    }

    /// The status the agent chose through this gateway, which it sets again on the agent's next owner after
    /// a move: kept while the agent is signed in here (`None` for offline).
    pub fn chosen_status(&self, tenant: &TenantId, agent: &AgentId) -> Option<AgentStatus> {
        lock(&self.inner.subscriptions).agents.get(&(tenant.clone(), agent.clone())).copied()
    }

    fn node_for(&self, key: &str) -> Option<Arc<dyn NodeClient>> {
        let address = self.inner.placement.borrow().address_of(shard_of(key))?.to_owned();
        self.inner.node(&address).ok()
    }

    /// Runs `ask` on the owner of `key`, retrying on a move (and on unavailability when `idempotent`) until
    /// `retry_for` has passed.
    async fn on_owner<T, F, Fut>(&self, key: &str, idempotent: bool, ask: F) -> Result<T, RouterError>
    where
        F: Fn(Arc<dyn NodeClient>) -> Fut,
        Fut: Future<Output = Result<T, RouterError>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.settings.retry_for;
        let mut delay = Duration::from_millis(10);
        let mut placement = self.inner.placement.subscribe();
        loop {
            // Marks the placement seen before it is used: a change after this wakes the wait below at once.
            placement.borrow_and_update();
            let last_error = match self.node_for(key) {
                None => RouterError::Unavailable("no router owns this shard now; retry".into()),
                Some(node) => match ask(node).await {
                    Err(RouterError::NotOwner) => {
                        self.inner.refresh.notify_one();
                        RouterError::Unavailable("the shard is moving; retry".into())
                    }
                    Err(RouterError::Unavailable(detail)) if idempotent => {
                        self.inner.refresh.notify_one();
                        RouterError::Unavailable(detail)
                    }
                    result => return result,
                },
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(last_error);
            }
            // Wake on a placement change, or after a short backoff (a last try at the deadline).
            let _ = tokio::time::timeout(delay.min(deadline - now), placement.changed()).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    fn link(&self) -> Option<Arc<GatewayLink>> {
        self.inner.link.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl Inner {
    fn node(&self, address: &str) -> Result<Arc<dyn NodeClient>, RouterError> {
        let mut nodes = lock(&self.nodes);
        if let Some(node) = nodes.get(address) {
            return Ok(node.clone());
        }
        let node = self.connector.node(address)?;
        nodes.insert(address.to_owned(), node.clone());
        Ok(node)
    }
}

async fn refresh(inner: &Arc<Inner>) -> Result<(), StoreError> {
    let since = *lock(&inner.installed);
    let placement = inner.store.get_placement(GetPlacementRequest {}).await?;
    apply_placement(inner, &placement, Some(since));
    Ok(())
}

/// Which subscriptions to make again, by the key of what is followed, in the placement of now.
type Matches = Box<dyn Fn(&PlacementView, &str) -> bool + Send + Sync>;

/// What the node at `address` owns.
fn on_node(address: String) -> Matches {
    Box::new(move |view, key| view.address_of(shard_of(key)) == Some(address.as_str()))
}

/// Installs a placement (unless it was read by a poll while another was installed: it may be older); for a
/// gateway, opens streams to new nodes, closes those to nodes gone, and subscribes again where owners
/// changed.
fn apply_placement(inner: &Arc<Inner>, placement: &Placement, read_since: Option<u64>) {
    let view = Arc::new(PlacementView::from_placement(placement));
    let previous = {
        let mut installed = lock(&inner.installed);
        if read_since.is_some_and(|since| since != *installed) {
            return;
        }
        let mut previous = None;
        inner.placement.send_if_modified(|current| {
            if **current == *view {
                return false;
            }
            previous = Some(std::mem::replace(current, view.clone()));
            true
        });
        let Some(previous) = previous else { return };
        *installed += 1;
        previous
    };
    // A shard moved when its lease changed hands (or epoch), or its owner now listens elsewhere.
    let moved: HashSet<ShardId> = (0..N_SHARDS)
        .map(ShardId)
        .filter(|&shard| {
            let index = shard.0 as usize;
            view.address_of(shard).is_some()
                && (view.owners.get(index) != previous.owners.get(index)
                    || view.address_of(shard) != previous.address_of(shard))
        })
        .collect();
    debug!(n_moved = moved.len(), n_nodes = view.addresses.len(), "placement changed");
    let addresses: HashSet<&str> = view.addresses.values().map(String::as_str).collect();
    lock(&inner.nodes).retain(|address, _| addresses.contains(address.as_str()));
    let Some(link) = inner.link.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone() else {
        return;
    };
    // No stream to a node that left; one to every node there is.
    let gone: Vec<AbortHandle> = {
        let mut streams = lock(&inner.streams);
        let gone: Vec<String> =
            streams.keys().filter(|address| !addresses.contains(address.as_str())).cloned().collect();
        gone.iter().filter_map(|address| streams.remove(address)).filter_map(|stream| stream.task).collect()
    };
    for task in gone {
        task.abort();
    }
    let open: HashSet<String> = addresses
        .iter()
        .filter(|address| ensure_stream(inner, &link, address))
        .map(|address| (*address).to_owned())
        .collect();
    // Where the new owner's stream is open, subscribe again now; the other streams do it when they open.
    if !moved.is_empty() {
        let client = ClusterClient { inner: inner.clone() };
        let matches: Matches = Box::new(move |view, key| {
            let shard = shard_of(key);
            moved.contains(&shard) && view.address_of(shard).is_some_and(|address| open.contains(address))
        });
        tokio::spawn(resubscribe(client, link, matches));
    }
}

/// Subscribes again, on their owners now, to everything this gateway follows whose key matches.
async fn resubscribe(client: ClusterClient, link: Arc<GatewayLink>, matches: Matches) {
    let view = client.inner.placement.borrow().clone();
    let (conversations, queues, agents, followed_agents) = {
        let subscriptions = lock(&client.inner.subscriptions);
        let conversations: Vec<ConversationId> =
            subscriptions.conversations.keys().filter(|id| matches(&view, &conversation_key(id))).copied().collect();
        let queues: Vec<(TenantId, GroupId)> = subscriptions
            .queues
            .iter()
            .filter(|(tenant, group)| matches(&view, &queue_key(tenant, group)))
            .cloned()
            .collect();
        let agents: Vec<(TenantId, AgentId)> = subscriptions
            .agents
            .keys()
            .filter(|(tenant, agent)| matches(&view, &agent_key(tenant, agent)))
            .cloned()
            .collect();
        let followed_agents: Vec<(TenantId, AgentId)> = subscriptions
            .followed_agents
            .iter()
            .filter(|(tenant, agent)| matches(&view, &agent_key(tenant, agent)))
            .cloned()
            .collect();
        (conversations, queues, agents, followed_agents)
    };
    if conversations.is_empty() && queues.is_empty() && agents.is_empty() && followed_agents.is_empty() {
        return;
    }
    info!(
        n_conversations = conversations.len(),
        n_queues = queues.len(),
        n_agents = agents.len(),
        n_followed_agents = followed_agents.len(),
        "subscribing again on new owners"
    );
    let mut tasks = JoinSet::new();
    // Agents' own pushes are followed before their statuses are restored, so that what the restore causes
    // (an offer to an agent back online) reaches the gateway.
    for (tenant, agent) in followed_agents {
        let task = resubscribe_thing(
            client.clone(),
            link.clone(),
            Resubscription::Agent(tenant, agent),
            RESUBSCRIBE_RETRY_FIRST,
        );
        spawn_limited(&client, &mut tasks, task).await;
    }
    for (tenant, agent) in agents {
        let task = restore_status(client.clone(), link.clone(), tenant, agent, RESUBSCRIBE_RETRY_FIRST);
        spawn_limited(&client, &mut tasks, task).await;
    }
    for (tenant, group) in queues {
        let task = resubscribe_thing(
            client.clone(),
            link.clone(),
            Resubscription::Queue(tenant, group),
            RESUBSCRIBE_RETRY_FIRST,
        );
        spawn_limited(&client, &mut tasks, task).await;
    }
    for conversation in conversations {
        let task = resubscribe_conversation(client.clone(), link.clone(), conversation, RESUBSCRIBE_RETRY_FIRST);
        spawn_limited(&client, &mut tasks, task).await;
    }
    while tasks.join_next().await.is_some() {}
}

/// Runs a resubscription once one of the client's `RESUBSCRIBE_CONCURRENCY` permits is free (in the order
/// they are asked for).
async fn spawn_limited(
    client: &ClusterClient,
    tasks: &mut JoinSet<()>,
    task: impl Future<Output = ()> + Send + 'static,
) {
    let Ok(permit) = client.inner.resubscribe_permits.clone().acquire_owned().await else { return };
    tasks.spawn(async move {
        let _permit = permit;
        task.await;
    });
}

/// Gives an agent its chosen status on its owner now. The gateway may change the status meanwhile, and its
/// call and this one may arrive in either order: the status chosen last is set again until it is the one
/// this task set last.
async fn restore_status(
    client: ClusterClient,
    link: Arc<GatewayLink>,
    tenant: TenantId,
    agent: AgentId,
    retry: Duration,
) {
    let key = (tenant, agent);
    // `None` once the agent's last socket here ended: the agent's status is no longer this gateway's to set
    // (read as offline, it would sign the agent out at once, past the grace period, or over a status chosen
    // since through another gateway).
    let chosen = |client: &ClusterClient| {
        let subscriptions = lock(&client.inner.subscriptions);
        subscriptions
            .followed_agents
            .contains(&key)
            .then(|| subscriptions.agents.get(&key).copied().unwrap_or(AgentStatus::Offline))
    };
    let Some(mut status) = chosen(&client).filter(|status| *status != AgentStatus::Offline) else { return };
    loop {
        let (tenant, agent) = &key;
        let set = client
            .on_owner(&agent_key(tenant, agent), true, |node| async move {
                node.set_agent_status(tenant, agent, status).await
            })
            .await;
        if let Err(error) = set {
            warn!(%error, %agent, ?retry, "agent status not restored on its new owner");
            if error.is_retryable() {
                retry_later(client.clone(), link, Resubscription::Agent(tenant.clone(), agent.clone()), retry);
            }
            return;
        }
        match chosen(&client) {
            Some(now) if now != status => status = now,
            _ => return,
        }
    }
}

/// Subscribes the gateway again to a queue or an agent (`thing`) on its owner now, if it still follows it. The
/// gateway's own calls for the thing wait meanwhile (`Inner::things`).
async fn resubscribe_thing(client: ClusterClient, link: Arc<GatewayLink>, thing: Resubscription, retry: Duration) {
    let _ordered = client.inner.things.lock(&thing).await;
    let gateway = &link.gateway;
    let subscribed = match &thing {
        Resubscription::Queue(tenant, group) => {
            if !lock(&client.inner.subscriptions).queues.contains(&(tenant.clone(), group.clone())) {
                return;
            }
            client
                .on_owner(&queue_key(tenant, group), true, |node| async move {
                    node.subscribe_queue(gateway, tenant, group).await
                })
                .await
        }
        Resubscription::Agent(tenant, agent) => {
            let shown = {
                let subscriptions = lock(&client.inner.subscriptions);
                let key = (tenant.clone(), agent.clone());
                if !subscriptions.followed_agents.contains(&key) {
                    return;
                }
                subscriptions.shown_offers(&key)
            };
            let shown = &shown;
            client
                .on_owner(&agent_key(tenant, agent), true, |node| async move {
                    node.subscribe_agent(gateway, tenant, agent, shown).await
                })
                .await
        }
        // Subscribed again from a seq, and undone rather than ordered (`resubscribe_conversation`).
        Resubscription::Conversation(_) => return,
    };
    if let Err(error) = subscribed {
        warn!(%error, ?thing, ?retry, "not subscribed again on its new owner");
        if error.is_retryable() {
            retry_later(client.clone(), link.clone(), thing, retry);
        }
    }
}

/// Subscribes again to a conversation on its owner now, from the seq up to which the gateway has every
/// event, and forwards the events returned (every page of them); again while a hole remains (a push lost
/// meanwhile), a few times. Undone if the gateway stopped following it meanwhile.
async fn resubscribe_conversation(
    client: ClusterClient,
    link: Arc<GatewayLink>,
    conversation: ConversationId,
    retry: Duration,
) {
    const ROUNDS: usize = 3;
    let key = conversation_key(&conversation);
    let mut round = 1;
    loop {
        let (caller, through) = {
            let mut subscriptions = lock(&client.inner.subscriptions);
            let Some(followed) = subscriptions.conversations.get_mut(&conversation) else { return };
            followed.catching_up = true;
            (followed.caller.clone(), followed.through)
        };
        let (gateway, caller_ref) = (&link.gateway, &caller);
        let subscribed = client
            .on_owner(
                &key,
                true,
                |node| async move { node.subscribe(gateway, caller_ref, conversation, through).await },
            )
            .await;
        let followed = {
            let mut subscriptions = lock(&client.inner.subscriptions);
            subscriptions.conversations.get_mut(&conversation).map(|followed| {
                // What is after the page is forwarded below, page by page.
                if let Ok(page) = &subscribed {
                    followed.note_page(page);
                }
                let again = subscribed.is_ok() && followed.has_hole() && round < ROUNDS;
                followed.catching_up = again;
                again
            })
        };
        match (subscribed, followed) {
            (Err(error), followed) => {
                warn!(%error, %conversation, ?retry, "conversation not subscribed again on its new owner");
                if error.is_retryable() && followed.is_some() {
                    retry_later(client, link, Resubscription::Conversation(conversation), retry);
                }
                return;
            }
            // Unsubscribed meanwhile: undo. A subscription made since may have reached the owner before the
            // undo and been removed by it: if the conversation is followed again now, it is subscribed again.
            (Ok(_), None) => {
                if let Some(node) = client.node_for(&key) {
                    node.unsubscribe(&link.gateway, conversation).await;
                }
                if !lock(&client.inner.subscriptions).conversations.contains_key(&conversation) {
                    return;
                }
                round = 1;
                continue;
            }
            (Ok(page), Some(again)) => {
                if !forward_pages(&client, &link, &caller, conversation, page).await || !again {
                    return;
                }
            }
        }
        round += 1;
        // Pushes still on their way may fill the hole meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A resubscription to try again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Resubscription {
    Conversation(ConversationId),
    Queue(TenantId, GroupId),
    Agent(TenantId, AgentId),
}

/// Tries a resubscription that failed on a retryable error again, about `delay` later, in a task of its own
/// (it holds none of the resubscriptions' permits while it waits), waiting twice as long each time it fails
/// again. One retry waits per thing: a move, a stream opened again and a push past a hole may each see the
/// same one fail. The retries are spread over half their delay and run, with the moves' resubscriptions, at
/// most `RESUBSCRIBE_CONCURRENCY` at a time, so that the things of a node that was unavailable do not all
/// reach it at once. A retry ends with the gateway (its link closed, or replaced), or once the gateway no
/// longer follows the thing.
fn retry_later(client: ClusterClient, link: Arc<GatewayLink>, what: Resubscription, delay: Duration) {
    if !lock(&client.inner.subscriptions).retrying.insert(what.clone()) {
        return;
    }
    let (delay, next) = retry_schedule(delay, RandomState::new().hash_one(&what));
    let weak = Arc::downgrade(&client.inner);
    drop(client);
    tokio::spawn(async move {
        let gone = tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = link.sink.closed() => true,
        };
        let Some(inner) = weak.upgrade() else { return };
        lock(&inner.subscriptions).retrying.remove(&what);
        let client = ClusterClient { inner };
        if gone || !client.link().is_some_and(|now| Arc::ptr_eq(&now, &link)) {
            return;
        }
        let Ok(_permit) = client.inner.resubscribe_permits.clone().acquire_owned().await else { return };
        match what {
            Resubscription::Conversation(conversation) => {
                resubscribe_conversation(client, link, conversation, next).await;
            }
            Resubscription::Queue(..) => resubscribe_thing(client, link, what, next).await,
            Resubscription::Agent(ref tenant, ref agent) => {
                let (tenant, agent) = (tenant.clone(), agent.clone());
                resubscribe_thing(client.clone(), link.clone(), what, next).await;
                restore_status(client, link, tenant, agent, next).await;
            }
        }
    });
}

/// A retry's wait, somewhere in the second half of `delay` as `draw` (a random number) picks, and the delay
/// of the retry after it: twice `delay`, at most `RESUBSCRIBE_RETRY_MAX`.
fn retry_schedule(delay: Duration, draw: u64) -> (Duration, Duration) {
    let next = delay.saturating_mul(2).min(RESUBSCRIBE_RETRY_MAX);
    let spread = u64::try_from(delay.as_millis() / 2).unwrap_or(u64::MAX);
    (delay / 2 + Duration::from_millis(draw % spread.saturating_add(1)), next)
}

/// Forwards a page of a conversation's events to the gateway as pushes, then the pages after it, read from
/// the owner. `false` when the gateway is gone.
async fn forward_pages(
    client: &ClusterClient,
    link: &GatewayLink,
    caller: &Caller,
    conversation: ConversationId,
    mut page: EventPage,
) -> bool {
    loop {
        let next_after = page.next_after();
        for event in page.events {
            if link.sink.send(Push::Event { conversation, event: Arc::new(event), origin: None }).is_err() {
                return false;
            }
        }
        let Some(after_seq) = next_after else { return true };
        let read = client
            .on_owner(&conversation_key(&conversation), true, |node| async move {
                node.read_events(caller, conversation, after_seq).await
            })
            .await;
        page = match read {
            Ok(page) => page,
            // The gateway's sockets find the gap at their next event, and read it themselves.
            Err(error) => {
                warn!(%error, %conversation, "events after a subscription's first page not read");
                return true;
            }
        };
    }
}

/// Starts keeping a push stream open to the node at `address` if there is none; answers whether one is
/// open now.
fn ensure_stream(inner: &Arc<Inner>, link: &Arc<GatewayLink>, address: &str) -> bool {
    let id = {
        let mut streams = lock(&inner.streams);
        if let Some(stream) = streams.get(address) {
            return stream.open;
        }
        let id = inner.next_stream_id.fetch_add(1, Ordering::Relaxed);
        streams.insert(address.to_owned(), NodeStream { id, open: false, task: None });
        id
    };
    let stream = StreamTask { inner: Arc::downgrade(inner), address: address.to_owned(), id };
    let node = match inner.node(address) {
        Ok(node) => node,
        Err(error) => {
            warn!(%error, address, "no client for a router node");
            return false; // dropping `stream` forgets it
        }
    };
    // Spawned without the lock held: a runtime that is shutting down drops the task at once, and dropping it
    // takes the lock.
    let task = tokio::spawn(stream.run(link.clone(), node)).abort_handle();
    let ended = match lock(&inner.streams).get_mut(address).filter(|stream| stream.id == id) {
        Some(stream) => {
            stream.task = Some(task);
            None
        }
        None => Some(task),
    };
    if let Some(task) = ended {
        task.abort();
    }
    false
}

/// The task that keeps one push stream open. When it ends (or is aborted), its entry goes.
struct StreamTask {
    inner: Weak<Inner>,
    address: String,
    id: u64,
}

impl Drop for StreamTask {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut streams = lock(&inner.streams);
            if streams.get(&self.address).is_some_and(|stream| stream.id == self.id) {
                streams.remove(&self.address);
            }
        }
    }
}

impl StreamTask {
    fn set_open(&self, inner: &Inner, open: bool) {
        if let Some(stream) = lock(&inner.streams).get_mut(&self.address).filter(|stream| stream.id == self.id) {
            stream.open = open;
        }
    }

    async fn run(self, link: Arc<GatewayLink>, node: Arc<dyn NodeClient>) {
        let mut delay = STREAM_RETRY_FIRST;
        loop {
            let opened = tokio::select! {
                () = link.sink.closed() => return,
                opened = node.open_push_stream(&link.gateway) => opened,
            };
            match opened {
                Ok(mut stream) => {
                    delay = STREAM_RETRY_FIRST;
                    {
                        let Some(inner) = self.inner.upgrade() else { return };
                        self.set_open(&inner, true);
                        // The node may have restarted and forgotten this gateway, or shards may have moved to it
                        // before its stream was open; pushes sent while no stream was open are lost: subscribe
                        // again there to everything the gateway follows, from what it has.
                        let client = ClusterClient { inner };
                        tokio::spawn(resubscribe(client, link.clone(), on_node(self.address.clone())));
                    }
                    loop {
                        let item = tokio::select! {
                            () = link.sink.closed() => return,
                            item = stream.next() => item,
                        };
                        match item {
                            Some(Ok(push)) => {
                                let Some(inner) = self.inner.upgrade() else { return };
                                let event = match &push {
                                    Push::Event { conversation, event, .. } => Some((*conversation, event.seq)),
                                    Push::Agent { .. } | Push::Queue { change: QueueChange::Removed { .. }, .. } => {
                                        lock(&inner.subscriptions).note_offers(&push);
                                        None
                                    }
                                    Push::Queue { .. } | Push::Typing { .. } => None,
                                };
                                if link.sink.send(push).is_err() {
                                    return;
                                }
                                if let Some((conversation, seq)) = event {
                                    note_pushed(&inner, &link, conversation, seq);
                                }
                            }
                            Some(Err(error)) => {
                                debug!(%error, address = %self.address, "push stream broke");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Err(error) => debug!(%error, address = %self.address, "push stream not opened"),
            }
            let Some(inner) = self.inner.upgrade() else { return };
            self.set_open(&inner, false);
            inner.refresh.notify_one();
            if !inner.placement.borrow().addresses.values().any(|known| *known == self.address) {
                return; // the node left
            }
            drop(inner);
            tokio::select! {
                () = link.sink.closed() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(STREAM_RETRY_MAX);
        }
    }
}

/// Notes a pushed event; a push past a hole starts a catch-up (pushes sent while no stream was open are
/// lost).
fn note_pushed(inner: &Arc<Inner>, link: &Arc<GatewayLink>, conversation: ConversationId, seq: u64) {
    let catch_up = {
        let mut subscriptions = lock(&inner.subscriptions);
        let Some(followed) = subscriptions.conversations.get_mut(&conversation) else { return };
        followed.note(seq);
        let catch_up = followed.has_hole() && !followed.catching_up;
        if catch_up {
            followed.catching_up = true;
        }
        catch_up
    };
    if catch_up {
        debug!(%conversation, seq, "a push past a hole: subscribing again from the hole");
        let client = ClusterClient { inner: inner.clone() };
        tokio::spawn(resubscribe_conversation(client, link.clone(), conversation, RESUBSCRIBE_RETRY_FIRST));
    }
}

/// Polls the placement, and reads it at once when asked (a `NotOwner`, a broken stream).
async fn follow_placement(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if let Err(error) = refresh(&inner).await {
            debug!(%error, "placement not read");
        }
        let (poll_every, refresh_asked) = (inner.settings.poll_every, inner.refresh.clone());
        drop(inner);
        let _ = tokio::time::timeout(poll_every, refresh_asked.notified()).await;
    }
}

/// Follows the store's placement watch, opening it again when it ends.
async fn watch_placement(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let connector = inner.connector.clone();
        drop(inner);
        let mut stream = match connector.watch_placement().await {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                debug!(%error, "placement watch not opened");
                tokio::time::sleep(WATCH_RETRY).await;
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            let Some(inner) = weak.upgrade() else { return };
            match item {
                Ok(placement) => apply_placement(&inner, &placement, None),
                Err(error) => {
                    debug!(%error, "placement watch broke");
                    break;
                }
            }
        }
        tokio::time::sleep(WATCH_RETRY).await;
    }
}

#[async_trait]
impl RouterApi for ClusterClient {
    /// Opens a push stream to every router node (and to every node that joins later), forwarding their
    /// pushes into `sink`; replaces the streams of an earlier call.
    fn connect_gateway(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        let link = Arc::new(GatewayLink { gateway, sink });
        *self.inner.link.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(link.clone());
        let earlier: Vec<AbortHandle> =
            lock(&self.inner.streams).drain().filter_map(|(_, stream)| stream.task).collect();
        for task in earlier {
            task.abort();
        }
        let addresses: Vec<String> = self.inner.placement.borrow().addresses.values().cloned().collect();
        for address in &addresses {
            ensure_stream(&self.inner, &link, address);
        }
    }

    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError> {
        let key = conversation_key(&request.conversation);
        // Whether a try failed without an answer (the router may have stored the chat before it went away).
        let unanswered = AtomicBool::new(false);
        let (request, unanswered_ref) = (&request, &unanswered);
        let mut started = self
            .on_owner(&key, true, |node| async move {
                let tried_before = request.tried_before || unanswered_ref.load(Ordering::SeqCst);
                let result = node.start_chat(StartChat { tried_before, ..request.clone() }).await;
                if matches!(result, Err(RouterError::Unavailable(_))) {
                    unanswered_ref.store(true, Ordering::SeqCst);
                }
                result
            })
            .await?;
        // The chat found stored is the one this call's own unanswered try started, not an earlier start's.
        if unanswered.load(Ordering::SeqCst) {
            started.duplicate = false;
        }
        Ok(started)
    }

    async fn authorize_customer(&self, conversation: ConversationId, token: &str) -> Result<ChatView, RouterError> {
        self.on_owner(&conversation_key(&conversation), true, |node| async move {
            node.authorize_customer(conversation, token).await
        })
        .await
    }

    async fn chat_view(&self, caller: &Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        self.on_owner(&conversation_key(&conversation), true, |node| async move {
            node.chat_view(caller, conversation).await
        })
        .await
    }

    async fn subscribe(
        &self,
        gateway: &GatewayId,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        // Followed before the call, so that pushes arriving before its answer are noted; no catch-up starts
        // meanwhile (the answer fills what comes before them).
        let created = {
            let mut subscriptions = lock(&self.inner.subscriptions);
            let mut created = false;
            let followed = subscriptions.conversations.entry(conversation).or_insert_with(|| {
                created = true;
                Followed { caller: caller.clone(), through: after_seq, ahead: BTreeSet::new(), catching_up: true }
            });
            followed.caller = caller.clone();
            followed.catching_up = true;
            created
        };
        let subscribed = self
            .on_owner(&conversation_key(&conversation), true, |node| async move {
                node.subscribe(gateway, caller, conversation, after_seq).await
            })
            .await;
        let catch_up = {
            let mut subscriptions = lock(&self.inner.subscriptions);
            match (&subscribed, subscriptions.conversations.get_mut(&conversation)) {
                (Ok(page), Some(followed)) => {
                    followed.has_through(after_seq);
                    followed.note_page(page);
                    followed.catching_up = followed.has_hole();
                    followed.catching_up
                }
                (Err(_), Some(_)) if created => {
                    subscriptions.conversations.remove(&conversation);
                    false
                }
                (Err(_), Some(followed)) => {
                    followed.catching_up = false;
                    false
                }
                (_, None) => false,
            }
        };
        if catch_up && let Some(link) = self.link() {
            tokio::spawn(resubscribe_conversation(self.clone(), link, conversation, RESUBSCRIBE_RETRY_FIRST));
        }
        subscribed
    }

    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId) {
        lock(&self.inner.subscriptions).conversations.remove(&conversation);
        if let Some(node) = self.node_for(&conversation_key(&conversation)) {
            node.unsubscribe(gateway, conversation).await;
        }
    }

    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        self.on_owner(&conversation_key(&conversation), true, |node| async move {
            node.read_events(caller, conversation, after_seq).await
        })
        .await
    }

    async fn command(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError> {
        let command = &command;
        self.on_owner(&conversation_key(&conversation), true, |node| async move {
            node.command(caller, conversation, command.clone()).await
        })
        .await
    }

    async fn typing(&self, caller: &Caller, conversation: ConversationId, typing: bool) -> Result<(), RouterError> {
        // Typing is ephemeral: one try.
        match self.node_for(&conversation_key(&conversation)) {
            Some(node) => node.typing(caller, conversation, typing).await,
            None => Err(RouterError::Unavailable("no router owns this shard now; retry".into())),
        }
    }

    async fn customer_connection(&self, conversation: ConversationId) -> Result<(), RouterError> {
        // The owner reads presence, whatever the call says: sent again, it reads it again.
        self.on_owner(&conversation_key(&conversation), true, |node| async move {
            node.customer_connection(conversation).await
        })
        .await
    }

    async fn accept_chat(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError> {
        let accepted = self
            .on_owner(&agent_key(tenant, agent), false, |node| async move {
                node.accept_chat(tenant, agent, conversation).await
            })
            .await;
        if accepted.is_ok() {
            lock(&self.inner.subscriptions).forget_offer(&(tenant.clone(), agent.clone()), conversation);
        }
        accepted
    }

    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError> {
        // The choice is noted before the call, so that a status restored on a new owner meanwhile is this one.
        let key = (tenant.clone(), agent.clone());
        let before = self.link().map(|_| {
            let mut subscriptions = lock(&self.inner.subscriptions);
            match status {
                AgentStatus::Offline => subscriptions.agents.remove(&key),
                status => subscriptions.agents.insert(key.clone(), status),
            }
        });
        let set = self
            .on_owner(&agent_key(tenant, agent), true, |node| async move {
                node.set_agent_status(tenant, agent, status).await
            })
            .await;
        // A choice that cannot be made (an unknown agent) is not kept.
        if let (Err(error), Some(before)) = (&set, before)
            && !error.is_retryable()
        {
            let mut subscriptions = lock(&self.inner.subscriptions);
            let noted = subscriptions.agents.get(&key).copied().unwrap_or(AgentStatus::Offline);
            if noted == status {
                match before {
                    Some(before) => subscriptions.agents.insert(key, before),
                    None => subscriptions.agents.remove(&key),
                };
            }
        }
        set
    }

    async fn subscribe_queue(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        group: &GroupId,
    ) -> Result<(), RouterError> {
        // Followed before the call, so that a stream that opens meanwhile subscribes again to it (a snapshot
        // pushed before the gateway's stream is open on the node is lost, and the node forgets the gateway).
        let key = (tenant.clone(), group.clone());
        let _ordered = self.inner.things.lock(&Resubscription::Queue(tenant.clone(), group.clone())).await;
        let created = self.link().is_some() && lock(&self.inner.subscriptions).queues.insert(key.clone());
        let subscribed = self
            .on_owner(&queue_key(tenant, group), true, |node| async move {
                node.subscribe_queue(gateway, tenant, group).await
            })
            .await;
        if subscribed.is_err() && created {
            lock(&self.inner.subscriptions).queues.remove(&key);
        }
        subscribed
    }

    async fn unsubscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId) {
        let _ordered = self.inner.things.lock(&Resubscription::Queue(tenant.clone(), group.clone())).await;
        lock(&self.inner.subscriptions).queues.remove(&(tenant.clone(), group.clone()));
        if let Some(node) = self.node_for(&queue_key(tenant, group)) {
            node.unsubscribe_queue(gateway, tenant, group).await;
        }
    }

    async fn list_chats(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        list: ChatList,
    ) -> Result<Vec<ChatView>, RouterError> {
        self.on_owner(&agent_key(tenant, agent), true, |node| async move { node.list_chats(tenant, agent, list).await })
            .await
    }

    async fn subscribe_agent(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        agent: &AgentId,
        shown_here: &[ShownOffer],
    ) -> Result<(), RouterError> {
        // Followed before the call, as queues are (see `subscribe_queue`). The offers this client saw shown are
        // told as well as the caller's.
        let key = (tenant.clone(), agent.clone());
        let _ordered = self.inner.things.lock(&Resubscription::Agent(tenant.clone(), agent.clone())).await;
        let (created, shown) = {
            let mut subscriptions = lock(&self.inner.subscriptions);
            let created = self.link().is_some() && subscriptions.followed_agents.insert(key.clone());
            let mut shown = subscriptions.shown_offers(&key);
            for offer in shown_here {
                if !shown.contains(offer) {
                    shown.push(*offer);
                }
            }
            (created, shown)
        };
        let shown = &shown;
        let subscribed = self
            .on_owner(&agent_key(tenant, agent), true, |node| async move {
                node.subscribe_agent(gateway, tenant, agent, shown).await
            })
            .await;
        if subscribed.is_err() && created {
            lock(&self.inner.subscriptions).followed_agents.remove(&key);
        }
        subscribed
    }

    async fn unsubscribe_agent(&self, gateway: &GatewayId, tenant: &TenantId, agent: &AgentId) {
        // The agent's last socket here is gone: its status is not this gateway's to set again after a move
        // (the agent may choose another one through another gateway; its owner's grace period applies).
        let key = (tenant.clone(), agent.clone());
        let _ordered = self.inner.things.lock(&Resubscription::Agent(tenant.clone(), agent.clone())).await;
        {
            let mut subscriptions = lock(&self.inner.subscriptions);
            subscriptions.followed_agents.remove(&key);
            subscriptions.agents.remove(&key);
            subscriptions.offers.remove(&key);
        }
        if let Some(node) = self.node_for(&agent_key(tenant, agent)) {
            node.unsubscribe_agent(gateway, tenant, agent).await;
        }
    }

    async fn reject_offer(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        // Idempotent: an offer rejected twice ends once.
        self.on_owner(&queue_key(tenant, group), true, |node| async move {
            node.reject_offer(tenant, group, agent, conversation).await
        })
        .await
    }

    async fn transfer_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_group: &GroupId,
    ) -> Result<ChatView, RouterError> {
        // Not retried on unavailability: the transfer may have been recorded (a second one would be refused
        // `same_group`, or move the chat again after someone took it there).
        self.on_owner(&conversation_key(&conversation), false, |node| async move {
            node.transfer_chat(caller, conversation, to_group).await
        })
        .await
    }

    async fn forward_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        // The target agent's owner reserves its slot, then asks the conversation's owner. Only agents forward.
        let Caller::Agent { tenant, .. } = caller else {
            return Err(RouterError::NotFound);
        };
        // Not retried on unavailability, as an accept is not: it may have been carried out.
        self.on_owner(&agent_key(tenant, to_agent), false, |node| async move {
            node.forward_chat(caller, conversation, to_agent).await
        })
        .await
    }

    async fn leave_offline_message(&self, message: OfflineMessage) -> Result<Ticket, RouterError> {
        // Retried on unavailability: the idempotency key makes a second store of it the first ticket.
        let key = queue_key(&message.tenant, &message.group);
        let message = &message;
        self.on_owner(&key, true, |node| async move { node.leave_offline_message(message.clone()).await }).await
    }
}

#[async_trait]
impl PeerApi for ClusterClient {
    async fn owner_accept(&self, conversation: ConversationId, agent: &AgentId) -> Result<ChatView, RouterError> {
        // Not retried on unavailability: the accept may have been recorded; the agent's owner releases the
        // reserved slot and the agent may try again.
        self.on_owner(&conversation_key(&conversation), false, |node| async move {
            node.owner_accept(conversation, agent).await
        })
        .await
    }

    async fn queue_add(
        &self,
        tenant: &TenantId,
        entry: WaitingEntry,
        waiting_since_us: i64,
    ) -> Result<(), RouterError> {
        let key = queue_key(tenant, &entry.group);
        let entry = &entry;
        self.on_owner(&key, true, |node| async move { node.queue_add(tenant, entry.clone(), waiting_since_us).await })
            .await
    }

    async fn queue_remove(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        conversation: ConversationId,
        reason: LeftQueue,
    ) -> Result<(), RouterError> {
        let reason = &reason;
        self.on_owner(&queue_key(tenant, group), true, |node| async move {
            node.queue_remove(tenant, group, conversation, reason.clone()).await
        })
        .await
    }

    async fn agent_finished(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.on_owner(&agent_key(tenant, agent), true, |node| async move {
            node.agent_finished(tenant, agent, conversation).await
        })
        .await
    }
    async fn conversation_system(
        &self,
        conversation: ConversationId,
        command: SystemCommand,
    ) -> Result<bool, RouterError> {
        // Idempotent: an offer to the agent it is already offered to, an offer that already ended, a chat
        // already requeued change nothing the second time.
        let command = &command;
        self.on_owner(&conversation_key(&conversation), true, |node| async move {
            node.conversation_system(conversation, command.clone()).await
        })
        .await
    }

    async fn agent_offer(&self, tenant: &TenantId, agent: &AgentId, update: OfferUpdate) -> Result<(), RouterError> {
        // Idempotent: the agent's owner takes an offer it holds already, or ends one that is gone, as a no-op.
        let update = &update;
        self.on_owner(&agent_key(tenant, agent), true, |node| async move {
            node.agent_offer(tenant, agent, update.clone()).await
        })
        .await
    }

    async fn agent_availability(&self, tenant: &TenantId, agent: &AgentId) -> Result<AgentAvailability, RouterError> {
        self.on_owner(
            &agent_key(tenant, agent),
            true,
            |node| async move { node.agent_availability(tenant, agent).await },
        )
        .await
    }

    async fn queue_agent_changed(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        availability: AgentAvailability,
    ) -> Result<(), RouterError> {
        let availability = &availability;
        self.on_owner(&queue_key(tenant, group), true, |node| async move {
            node.queue_agent_changed(tenant, group, availability.clone()).await
        })
        .await
    }

    async fn owner_forward(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        // Not retried on unavailability, as `owner_accept`: the forward may have been recorded; the target
        // agent's owner releases the reserved slot.
        self.on_owner(&conversation_key(&conversation), false, |node| async move {
            node.owner_forward(caller, conversation, to_agent).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use switchboard_domain::OfferEnd;

    use super::*;

    fn followed(through: u64) -> Followed {
        let caller = Caller::Customer { conversation: ConversationId::new_v7(1_700_000_000_000) };
        Followed { caller, through, ahead: BTreeSet::new(), catching_up: false }
    }

    #[test]
    fn the_watermark_stops_at_the_first_hole() {
        let mut followed = followed(3);
        followed.note(4);
        assert_eq!((followed.through, followed.has_hole()), (4, false));
        // 5 is lost: 6 and 7 are kept aside, the watermark stays.
        followed.note(6);
        followed.note(7);
        assert_eq!((followed.through, followed.has_hole()), (4, true));
        // Old and repeated events change nothing.
        followed.note(2);
        followed.note(6);
        assert_eq!(followed.through, 4);
        // The hole is filled: the watermark moves past what was kept aside.
        followed.note(5);
        assert_eq!((followed.through, followed.has_hole()), (7, false));
    }

    #[test]
    fn the_offers_shown_to_a_followed_agent_are_those_pushed_and_not_seen_to_end() {
        let (tenant, group) = (TenantId::new("acme").unwrap(), GroupId::new("sales").unwrap());
        let (alice, bob) = (AgentId::new("alice").unwrap(), AgentId::new("bob").unwrap());
        let chats: Vec<ConversationId> = (0..4).map(|i| ConversationId::new_v7(1_700_000_000_000 + i)).collect();
        let agent_push = |agent: &AgentId, change| Push::Agent { tenant: tenant.clone(), agent: agent.clone(), change };
        let offered = |agent: &AgentId, conversation, expires_at_ms| {
            let entry = WaitingEntry {
                conversation,
                group: group.clone(),
                queued_at_ms: 0,
                customer_name: "ann".into(),
                question: String::new(),
            };
            agent_push(agent, AgentChange::Offered { entry, expires_at_ms, waiting_since_us: 0 })
        };
        let shown = |subscriptions: &Subscriptions, agent: &AgentId| {
            let mut shown = subscriptions.shown_offers(&(tenant.clone(), agent.clone()));
            shown.sort_by_key(|offer| offer.conversation);
            shown.into_iter().map(|offer| (offer.conversation, offer.expires_at_ms)).collect::<Vec<_>>()
        };
        let mut subscriptions = Subscriptions::default();
        subscriptions.followed_agents.insert((tenant.clone(), alice.clone()));
        for (i, &chat) in chats.iter().enumerate() {
            subscriptions.note_offers(&offered(&alice, chat, 10 + i as i64));
        }
        // Bob is not followed here: his offers are not kept.
        subscriptions.note_offers(&offered(&bob, chats[0], 10));
        assert_eq!(shown(&subscriptions, &bob), []);
        // A later offer of the same chat replaces the first.
        subscriptions.note_offers(&offered(&alice, chats[0], 20));
        let change = AgentChange::OfferEnded { conversation: chats[1], reason: OfferEnd::Rejected };
        subscriptions.note_offers(&agent_push(&alice, change));
        // Taken by someone: it left its queue.
        let taken = QueueChange::Removed { conversation: chats[2], reason: LeftQueue::Accepted { agent: bob.clone() } };
        subscriptions.note_offers(&Push::Queue {
            tenant: tenant.clone(),
            group: group.clone(),
            version: 1,
            change: taken,
        });
        assert_eq!(shown(&subscriptions, &alice), [(chats[0], 20), (chats[3], 13)]);
        subscriptions.forget_offer(&(tenant.clone(), alice.clone()), chats[3]);
        subscriptions.forget_offer(&(tenant.clone(), alice.clone()), chats[0]);
        assert!(subscriptions.offers.is_empty(), "nothing kept for an agent without offers");
    }

    #[test]
    fn a_subscription_answer_moves_the_watermark_past_what_came_before() {
        let mut followed = followed(0);
        followed.note(9);
        followed.note(12);
        // A subscription after seq 8 says the gateway has everything up to 8; its answer brings 9..=10.
        followed.has_through(8);
        assert_eq!((followed.through, followed.has_hole()), (9, true));
        followed.note(10);
        assert_eq!((followed.through, followed.ahead.iter().copied().collect::<Vec<_>>()), (10, vec![12]));
        followed.has_through(12);
        assert_eq!((followed.through, followed.has_hole()), (12, false));
    }

    #[test]
    fn no_seq_overflows_the_watermark() {
        let mut followed = followed(u64::MAX - 2);
        followed.note(u64::MAX);
        followed.note(u64::MAX - 1);
        assert_eq!((followed.through, followed.has_hole()), (u64::MAX, false));
        followed.note(u64::MAX);
        let mut followed = self::followed(0);
        followed.note(u64::MAX);
        followed.has_through(u64::MAX - 1);
        assert_eq!((followed.through, followed.has_hole()), (u64::MAX, false));
    }

    #[test]
    fn a_page_that_goes_on_counts_the_rest_of_the_log_as_the_subscriber_s_to_read() {
        let event = |seq| switchboard_domain::Event {
            seq,
            at_ms: 0,
            author: switchboard_domain::Author::System,
            client_msg_id: None,
            body: switchboard_domain::EventBody::Closed,
        };
        let mut followed = followed(2);
        followed.note(12);
        followed.note_page(&EventPage { events: vec![event(3), event(4)], last_seq: 4 });
        assert_eq!((followed.through, followed.has_hole()), (4, true), "the whole log: 12 is still past a hole");
        followed.note_page(&EventPage { events: vec![event(5), event(6)], last_seq: 11 });
        assert_eq!((followed.through, followed.has_hole()), (12, false), "7..=11 are read by the subscriber");
    }

    #[test]
    fn retries_wait_in_the_second_half_of_a_delay_that_doubles_up_to_a_minute() {
        let mut delay = RESUBSCRIBE_RETRY_FIRST;
        let mut delays = Vec::new();
        for _ in 0..8 {
            for draw in [0, 1, 999, 1_000, 1_001, u64::MAX / 3, u64::MAX] {
                let (wait, _) = retry_schedule(delay, draw);
                assert!(wait >= delay / 2 && wait <= delay, "{wait:?} within the second half of {delay:?}");
            }
            delays.push(delay.as_secs());
            delay = retry_schedule(delay, 0).1;
        }
        assert_eq!(delays, [2, 4, 8, 16, 32, 60, 60, 60]);
        // Spread over the whole half: the draws of 0 and of the half's last millisecond are its two ends.
        assert_eq!(retry_schedule(RESUBSCRIBE_RETRY_FIRST, 0).0, Duration::from_secs(1));
        assert_eq!(retry_schedule(RESUBSCRIBE_RETRY_FIRST, 1_000).0, Duration::from_secs(2));
    }
}
