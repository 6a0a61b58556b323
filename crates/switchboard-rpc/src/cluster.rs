//! The cluster as one service: a client that sends every operation to the router that owns its key's
//! shard. Gateways use it as their [`RouterApi`]; routers use it as their [`PeerApi`] for actors that live
//! on other nodes.
//!
//! - **Placement** (`shard → node → address`) comes from the store: a watch stream, plus polling every
//!   `poll_every` and a refresh whenever a router answers `NotOwner`.
//! - **Retries.** `NotOwner` (the request was not executed) is retried on the new owner until
//!   `retry_for` has passed. `Unavailable` is retried too for the operations that are idempotent (reads,
//!   subscriptions, commands carrying a client message id, casts); `start_chat` and `accept_chat` return it
//!   to the client, which may retry.
//! - **Pushes** (gateway role). One push stream per router node. The client remembers what its gateway is
//!   subscribed to (conversations with the last seq seen, queues, agents' chosen status); when a shard
//!   changes owner, or the stream to a node is opened again, it subscribes again on the owner from the last
//!   seq seen and forwards the gap, so that sockets see no hole (they also fill holes themselves).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_domain::{
    AgentId, AgentStatus, ConversationId, Event, GroupId, N_SHARDS, ShardId, TenantId, WaitingEntry, agent_key,
    conversation_key, queue_key, shard_of,
};
use switchboard_proto::internal::v1::{GetPlacementRequest, Placement};
use switchboard_proto::router::{
    AgentView, Caller, ChatCommand, ChatList, ChatView, CommandOutcome, GatewayId, LeftQueue, PeerApi, Push, RouterApi,
    RouterError, StartChat, StartedChat,
};
use switchboard_proto::store::{StoreApi, StoreError};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tracing::{debug, info, warn};

use crate::{ClientSettings, GrpcRouterNode, GrpcStore};

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

/// What the gateway using this client is subscribed to, to subscribe again after a move.
#[derive(Default)]
struct Subscriptions {
    conversations: HashMap<ConversationId, (Caller, u64)>,
    queues: HashSet<(TenantId, GroupId)>,
    agents: HashMap<(TenantId, AgentId), AgentStatus>,
}

struct GatewayLink {
    gateway: GatewayId,
    sink: mpsc::UnboundedSender<Push>,
}

struct Inner {
    store: Arc<dyn StoreApi>,
    connector: Arc<dyn Connector>,
    settings: ClusterSettings,
    placement: watch::Sender<Arc<PlacementView>>,
    refresh: Arc<Notify>,
    nodes: Mutex<HashMap<String, Arc<dyn NodeClient>>>,
    link: RwLock<Option<Arc<GatewayLink>>>,
    streams: Mutex<HashSet<String>>,
    subscriptions: Mutex<Subscriptions>,
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
            refresh: Arc::new(Notify::new()),
            nodes: Mutex::default(),
            link: RwLock::default(),
            streams: Mutex::default(),
            subscriptions: Mutex::default(),
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

    fn node_for(&self, key: &str) -> Option<Arc<dyn NodeClient>> {
        let address = self.inner.placement.borrow().address_of(shard_of(key))?.to_owned();
        self.inner.node(&address).ok()
    }

    /// Runs `ask` on the owner of `key`, retrying on a move (and on unavailability when `idempotent`).
    async fn on_owner<T, F, Fut>(&self, key: &str, idempotent: bool, ask: F) -> Result<T, RouterError>
    where
        F: Fn(Arc<dyn NodeClient>) -> Fut,
        Fut: Future<Output = Result<T, RouterError>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.settings.retry_for;
        let mut delay = Duration::from_millis(10);
        let mut placement = self.inner.placement.subscribe();
        loop {
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
            if tokio::time::Instant::now() + delay >= deadline {
                return Err(last_error);
            }
            // Wake on a placement change, or after a short backoff.
            let _ = tokio::time::timeout(delay, placement.changed()).await;
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
    let placement = inner.store.get_placement(GetPlacementRequest {}).await?;
    apply_placement(inner, &placement);
    Ok(())
}

/// Installs a new placement; for a gateway, subscribes again where owners changed and opens streams to
/// new nodes.
fn apply_placement(inner: &Arc<Inner>, placement: &Placement) {
    let view = Arc::new(PlacementView::from_placement(placement));
    let previous = inner.placement.borrow().clone();
    if *previous == *view {
        return;
    }
    inner.placement.send_replace(view.clone());
    let moved: HashSet<ShardId> = (0..N_SHARDS)
        .map(ShardId)
        .filter(|shard| {
            let index = shard.0 as usize;
            view.owners.get(index) != previous.owners.get(index) && view.owners[index].is_some()
        })
        .collect();
    debug!(n_moved = moved.len(), "placement changed");
    let Some(link) = inner.link.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone() else {
        return;
    };
    let client = ClusterClient { inner: inner.clone() };
    // Streams first, so that the new owners have somewhere to push before the gateway subscribes again.
    let addresses: HashSet<String> = view.addresses.values().cloned().collect();
    tokio::spawn(async move {
        for address in &addresses {
            ensure_stream(&client, &link, address).await;
        }
        if !moved.is_empty() {
            resubscribe(&client, &link, |key| moved.contains(&shard_of(key))).await;
        }
    });
}

/// Subscribes again, on their owners now, everything this gateway follows whose key matches.
async fn resubscribe(client: &ClusterClient, link: &Arc<GatewayLink>, matches: impl Fn(&str) -> bool) {
    let (conversations, queues, agents) = {
        let subscriptions = lock(&client.inner.subscriptions);
        let conversations: Vec<(ConversationId, Caller, u64)> = subscriptions
            .conversations
            .iter()
            .filter(|(id, _)| matches(&conversation_key(id)))
            .map(|(id, (caller, seq))| (*id, caller.clone(), *seq))
            .collect();
        let queues: Vec<(TenantId, GroupId)> =
            subscriptions.queues.iter().filter(|(tenant, group)| matches(&queue_key(tenant, group))).cloned().collect();
        let agents: Vec<((TenantId, AgentId), AgentStatus)> = subscriptions
            .agents
            .iter()
            .filter(|((tenant, agent), _)| matches(&agent_key(tenant, agent)))
            .map(|(key, status)| (key.clone(), *status))
            .collect();
        (conversations, queues, agents)
    };
    if conversations.is_empty() && queues.is_empty() && agents.is_empty() {
        return;
    }
    info!(
        n_conversations = conversations.len(),
        n_queues = queues.len(),
        n_agents = agents.len(),
        "subscribing again on new owners"
    );
    for ((tenant, agent), status) in agents {
        if let Err(error) = client.set_agent_status(&tenant, &agent, status).await {
            warn!(%error, %agent, "agent status not restored on its new owner");
        }
    }
    for (tenant, group) in queues {
        if let Err(error) = client.subscribe_queue(&link.gateway, &tenant, &group).await {
            warn!(%error, %group, "queue not subscribed again on its new owner");
        }
    }
    for (conversation, caller, after_seq) in conversations {
        match client.subscribe(&link.gateway, &caller, conversation, after_seq).await {
            Ok(events) => {
                for event in events {
                    let _ = link.sink.send(Push::Event { conversation, event: Arc::new(event) });
                }
            }
            Err(error) => warn!(%error, %conversation, "conversation not subscribed again on its new owner"),
        }
    }
}

/// Keeps one push stream open to the node at `address` for as long as the node is in the placement.
async fn ensure_stream(client: &ClusterClient, link: &Arc<GatewayLink>, address: &str) {
    if !lock(&client.inner.streams).insert(address.to_owned()) {
        return;
    }
    let node = match client.inner.node(address) {
        Ok(node) => node,
        Err(error) => {
            warn!(%error, address, "no client for a router node");
            lock(&client.inner.streams).remove(address);
            return;
        }
    };
    let (weak, link, address) = (Arc::downgrade(&client.inner), link.clone(), address.to_owned());
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(50);
        let mut opened_before = false;
        loop {
            let Some(inner) = weak.upgrade() else { return };
            let in_placement = inner.placement.borrow().addresses.values().any(|known| *known == address);
            if !in_placement {
                lock(&inner.streams).remove(&address);
                return;
            }
            drop(inner);
            match node.open_push_stream(&link.gateway).await {
                Ok(mut stream) => {
                    delay = Duration::from_millis(50);
                    if opened_before && let Some(inner) = weak.upgrade() {
                        // The node may have restarted and forgotten this gateway: subscribe again on it.
                        let client = ClusterClient { inner };
                        let view = client.inner.placement.borrow().clone();
                        resubscribe(&client, &link, |key| view.address_of(shard_of(key)) == Some(address.as_str()))
                            .await;
                    }
                    opened_before = true;
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(push) => {
                                if let Some(inner) = weak.upgrade() {
                                    note_push(&inner, &push);
                                }
                                if link.sink.send(push).is_err() {
                                    return;
                                }
                            }
                            Err(error) => {
                                debug!(%error, %address, "push stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(error) => debug!(%error, %address, "push stream not opened"),
            }
            if let Some(inner) = weak.upgrade() {
                inner.refresh.notify_one();
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    });
}

/// Remembers the last seq pushed for each followed conversation.
fn note_push(inner: &Inner, push: &Push) {
    if let Push::Event { conversation, event } = push {
        let mut subscriptions = lock(&inner.subscriptions);
        if let Some((_, seq)) = subscriptions.conversations.get_mut(conversation) {
            *seq = (*seq).max(event.seq);
        }
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
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            let Some(inner) = weak.upgrade() else { return };
            match item {
                Ok(placement) => apply_placement(&inner, &placement),
                Err(error) => {
                    debug!(%error, "placement watch broke");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[async_trait]
impl RouterApi for ClusterClient {
    fn connect_gateway(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        let link = Arc::new(GatewayLink { gateway, sink });
        *self.inner.link.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(link.clone());
        let client = self.clone();
        tokio::spawn(async move {
            let addresses: HashSet<String> = client.inner.placement.borrow().addresses.values().cloned().collect();
            for address in &addresses {
                ensure_stream(&client, &link, address).await;
            }
        });
    }

    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError> {
        let key = conversation_key(&request.conversation);
        let request = &request;
        self.on_owner(&key, false, |node| async move { node.start_chat(request.clone()).await }).await
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
    ) -> Result<Vec<Event>, RouterError> {
        let events = self
            .on_owner(&conversation_key(&conversation), true, |node| async move {
                node.subscribe(gateway, caller, conversation, after_seq).await
            })
            .await?;
        let last_seq = events.last().map_or(after_seq, |event| event.seq);
        let mut subscriptions = lock(&self.inner.subscriptions);
        let entry = subscriptions.conversations.entry(conversation).or_insert_with(|| (caller.clone(), last_seq));
        entry.1 = entry.1.max(last_seq);
        Ok(events)
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
    ) -> Result<Vec<Event>, RouterError> {
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

    async fn accept_chat(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError> {
        self.on_owner(&agent_key(tenant, agent), false, |node| async move {
            node.accept_chat(tenant, agent, conversation).await
        })
        .await
    }

    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError> {
        let view = self
            .on_owner(&agent_key(tenant, agent), true, |node| async move {
                node.set_agent_status(tenant, agent, status).await
            })
            .await?;
        if self.link().is_some() {
            let mut subscriptions = lock(&self.inner.subscriptions);
            let key = (tenant.clone(), agent.clone());
            if status == AgentStatus::Offline {
                subscriptions.agents.remove(&key);
            } else {
                subscriptions.agents.insert(key, status);
            }
        }
        Ok(view)
    }

    async fn subscribe_queue(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        group: &GroupId,
    ) -> Result<(), RouterError> {
        self.on_owner(&queue_key(tenant, group), true, |node| async move {
            node.subscribe_queue(gateway, tenant, group).await
        })
        .await?;
        lock(&self.inner.subscriptions).queues.insert((tenant.clone(), group.clone()));
        Ok(())
    }

    async fn unsubscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId) {
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

    async fn queue_add(&self, tenant: &TenantId, entry: WaitingEntry) -> Result<(), RouterError> {
        let key = queue_key(tenant, &entry.group);
        let entry = &entry;
        self.on_owner(&key, true, |node| async move { node.queue_add(tenant, entry.clone()).await }).await
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
}
