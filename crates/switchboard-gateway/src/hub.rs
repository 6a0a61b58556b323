//! The gateway's fan-out hub: which of this gateway's sockets watch which conversation and which queue,
//! which are signed in as which agent, and a mirror of every queue watched. Pushes from the router arrive
//! here once per gateway and are written into each interested socket's bounded outbound queue; a socket
//! whose queue is full is kicked (it resumes from its last seq) so that no producer ever waits on a slow
//! client.
//!
//! Agents' waiting-list changes (`queue.added`, `queue.removed`) are held for [`QUEUE_VIEW_DELAY`] and then
//! written together ([`Hub::flush_queue_views`]); a chat that joined the list and left it again within that
//! time is not shown at all. In a push-routed group most chats are offered and accepted within a few
//! milliseconds: each chat used to cost two frames for every agent of its group, which in a storm of chat
//! starts were most of the gateway's frames. The mirror itself (`queue.list`, snapshots, customers'
//! positions) changes at once.
//!
//! The hub also remembers each agent's outstanding offers (from the `Offered` pushes), so that a rejection
//! can be sent to the queue of the offer's group, and moves a waiting customer to the queue of the group their
//! chat was transferred to, so that their position and estimated wait follow the chat.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;

use switchboard_domain::{
    AgentId, Author, ConversationId, EventBody, GroupId, TenantId, WaitingEntry, WaitingQueue, merge_waiting,
};
use switchboard_proto::router::{AgentChange, Origin, Push, QueueChange};
use tokio::sync::{Notify, mpsc};
use tracing::debug;

use crate::protocol::{PushFrame, estimated_wait_s};

/// A connection of any transport (WebSocket or gRPC stream); "socket" in this module.
pub type SocketId = u64;

/// How long agents' waiting-list changes are held before they are written (see the module's documentation).
pub const QUEUE_VIEW_DELAY: Duration = Duration::from_millis(50);

/// A push on its way to sockets. It is made once per router push and shared by every socket it goes to;
/// its JSON text is made once too, by the first WebSocket that writes it. A conversation event is skipped by
/// a socket that already wrote it (by seq).
#[derive(Debug)]
pub struct Outbound {
    frame: PushFrame,
    json: OnceLock<Utf8Bytes>,
    /// Where the request behind a pushed event came from (latency and trace of its delivery).
    origin: Option<Origin>,
}

impl Outbound {
    pub fn new(frame: PushFrame) -> Arc<Outbound> {
        Arc::new(Outbound { frame, json: OnceLock::new(), origin: None })
    }

    pub fn with_origin(frame: PushFrame, origin: Option<Origin>) -> Arc<Outbound> {
        Arc::new(Outbound { frame, json: OnceLock::new(), origin })
    }

    pub fn frame(&self) -> &PushFrame {
        &self.frame
    }

    pub fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
    }

    /// The frame as JSON text, made on first use (a clone shares the text).
    pub fn json(&self) -> Utf8Bytes {
        self.json.get_or_init(|| self.frame.to_json().into()).clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Customer { conversation: ConversationId, tenant: TenantId, group: GroupId },
    Agent { tenant: TenantId, agent: AgentId, groups: Vec<GroupId> },
}

/// A socket's side of the hub: how to reach it, and how to kick it.
#[derive(Debug, Clone)]
pub struct SocketLink {
    pub outbound: mpsc::Sender<Arc<Outbound>>,
    pub kicked: Arc<Notify>,
    pub is_kicked: Arc<AtomicBool>,
}

#[derive(Default)]
struct QueueMirror {
    ready: bool,
    version: u64,
    waiting: WaitingQueue,
    /// How long a customer waits per place, from the last `Estimate`.
    wait_per_position_ms: Option<u64>,
    /// The sockets of agents of the group.
    agents: HashSet<SocketId>,
    /// The sockets of customers whose chat belongs to the group, by their chat: a change of the list tells
    /// the customers of the chats in it (and of the one it removed) their position, in the time of the list,
    /// not of every customer still connected whose chat left it long ago.
    customers: HashMap<ConversationId, HashSet<SocketId>>,
}

impl QueueMirror {
    /// The customer sockets of the chats now waiting, and of `also` (a chat that just left the list).
    fn customers_of_waiting(&self, also: Option<ConversationId>) -> Vec<SocketId> {
        let waiting = self.waiting.iter().map(|entry| entry.conversation);
        waiting.chain(also).filter_map(|conversation| self.customers.get(&conversation)).flatten().copied().collect()
    }
}

/// How a socket watches a queue's mirror.
#[derive(Debug, Clone, Copy)]
enum Watcher {
    Agent,
    /// A customer, for their chat's position.
    Customer(ConversationId),
}

struct SocketEntry {
    link: SocketLink,
    role: Role,
    /// Customers: the position and estimated wait sent last (sent again only when one changes).
    last_position: Option<(usize, Option<u64>)>,
    /// Agents: the [`HubState::stamp`] of the last waiting list sent whole; the changes held since before it
    /// are in it.
    view_stamp: u64,
}

/// A waiting-list change held for the agents (see [`QUEUE_VIEW_DELAY`]).
struct HeldChange {
    /// Its place among the hub's changes.
    stamp: u64,
    queue: (TenantId, GroupId),
    conversation: ConversationId,
    added: bool,
    frame: Arc<Outbound>,
}

type AgentKey = (TenantId, AgentId);

#[derive(Default)]
struct HubState {
    sockets: HashMap<SocketId, SocketEntry>,
    conversation_watchers: HashMap<ConversationId, HashSet<SocketId>>,
    /// The conversations each socket watches (the index of `conversation_watchers` by socket, so that a
    /// socket leaves in the time of its own conversations, not of every conversation of the gateway).
    watched_by: HashMap<SocketId, HashSet<ConversationId>>,
    queues: HashMap<(TenantId, GroupId), QueueMirror>,
    /// The sockets signed in as each agent.
    agents: HashMap<AgentKey, HashSet<SocketId>>,
    /// Each agent's outstanding offers, as they were shown, by chat.
    offers: HashMap<AgentKey, HashMap<ConversationId, ShownOffer>>,
    /// Counts the waiting-list changes; see [`SocketEntry::view_stamp`].
    stamp: u64,
    /// Waiting-list changes not written to agents yet, in the order they were made (across queues: a chat
    /// transferred between two groups of an agent leaves one list before it joins the other).
    held: Vec<HeldChange>,
    /// A flush of `held` was asked for ([`Needs::flush_queue_views`]) and has not run yet.
    flush_claimed: bool,
}

/// An offer outstanding, as its push showed it: shown again to a socket of the agent that signs in later.
struct ShownOffer {
    entry: WaitingEntry,
    expires_at_ms: i64,
}

/// What [`Hub::watch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// No socket of this gateway watched the conversation: the gateway is not subscribed to it yet.
    pub first_of_gateway: bool,
    /// This socket watched it already.
    pub already_watching: bool,
}

#[derive(Default)]
pub struct Hub {
    state: Mutex<HubState>,
}

/// What a caller must do after a hub change: subscribe the gateway to queues or agents it was not watching
/// yet, or drop subscriptions nobody needs any more.
///
/// Agents are hints: whoever applies them checks again, under a lock of that agent, whether a socket of the
/// agent is signed in (a sign-in and the end of another socket may race).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub subscribe_queues: Vec<(TenantId, GroupId)>,
    pub unsubscribe_conversations: Vec<ConversationId>,
    /// Agents with a first socket on this gateway: follow their own pushes.
    pub subscribe_agents: Vec<(TenantId, AgentId)>,
    /// Agents whose last socket on this gateway went.
    pub unsubscribe_agents: Vec<(TenantId, AgentId)>,
    /// Waiting-list changes are held and no flush is due yet: run [`Hub::flush_queue_views`] after
    /// [`QUEUE_VIEW_DELAY`].
    pub flush_queue_views: bool,
}

impl Needs {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.subscribe_queues.is_empty()
            && self.unsubscribe_conversations.is_empty()
            && self.subscribe_agents.is_empty()
            && self.unsubscribe_agents.is_empty()
            && !self.flush_queue_views
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a socket with its role (once: [`Hub::unregister`] before registering it again); returns the
    /// queues the gateway must now subscribe to.
    pub fn register(&self, socket: SocketId, link: SocketLink, role: Role) -> Needs {
        let mut state = self.lock();
        let mut needs = Needs::default();
        // A session takes its role once, and gives it up (`unregister`) before it could take another.
        debug_assert!(!state.sockets.contains_key(&socket), "socket {socket} registered twice");
        for (key, watcher) in queues_watched(&role) {
            state.watch_queue(socket, key, watcher, &mut needs);
        }
        let agent_key = match &role {
            Role::Agent { tenant, agent, .. } => Some((tenant.clone(), agent.clone())),
            _ => None,
        };
        if let Some(key) = &agent_key {
            let sockets = state.agents.entry(key.clone()).or_default();
            if sockets.is_empty() {
                needs.subscribe_agents.push(key.clone());
            }
            sockets.insert(socket);
        }
        state.sockets.insert(socket, SocketEntry { link, role, last_position: None, view_stamp: 0 });
        state.send_queue_view(socket);
        // Another console of the agent here saw these offers: this one sees them too (shown again, not offered
        // again: no waiting time for the offer latency). A first console gets them from the agent's owner,
        // when the gateway follows the agent.
        let offers = agent_key.and_then(|key| state.offers.get(&key));
        let shown: Vec<PushFrame> = offers
            .into_iter()
            .flat_map(HashMap::values)
            .map(|offer| PushFrame::Offer {
                entry: offer.entry.clone(),
                expires_at_ms: offer.expires_at_ms,
                waiting_since_us: 0,
            })
            .collect();
        for frame in shown {
            state.send(socket, Outbound::new(frame));
        }
        needs
    }

    /// Forgets a socket; returns the conversations no socket of this gateway watches any more.
    pub fn unregister(&self, socket: SocketId) -> Needs {
        let mut state = self.lock();
        let mut needs = Needs::default();
        let role = state.sockets.remove(&socket).map(|entry| entry.role);
        for (key, watcher) in role.iter().flat_map(queues_watched) {
            state.unwatch_queue(socket, &key, watcher);
        }
        if let Some(Role::Agent { tenant, agent, .. }) = role {
            let key = (tenant, agent);
            if let Some(sockets) = state.agents.get_mut(&key) {
                sockets.remove(&socket);
                if sockets.is_empty() {
                    state.agents.remove(&key);
                    // Nobody follows the agent's pushes here any more: its offers are no longer known.
                    state.offers.remove(&key);
                    needs.unsubscribe_agents.push(key);
                }
            }
        }
        for conversation in state.watched_by.remove(&socket).unwrap_or_default() {
            if state.stop_watching(socket, conversation) {
                needs.unsubscribe_conversations.push(conversation);
            }
        }
        needs
    }

    /// The socket wants the conversation's pushes.
    pub fn watch(&self, socket: SocketId, conversation: ConversationId) -> Watch {
        let mut state = self.lock();
        state.watched_by.entry(socket).or_default().insert(conversation);
        let watchers = state.conversation_watchers.entry(conversation).or_default();
        Watch { first_of_gateway: watchers.is_empty(), already_watching: !watchers.insert(socket) }
    }

    /// The socket no longer wants the conversation's pushes; true when no socket of this gateway does.
    pub fn unwatch(&self, socket: SocketId, conversation: ConversationId) -> bool {
        let mut state = self.lock();
        if let Some(watched) = state.watched_by.get_mut(&socket) {
            watched.remove(&conversation);
            if watched.is_empty() {
                state.watched_by.remove(&socket);
            }
        }
        state.stop_watching(socket, conversation)
    }

    /// Whether the socket watches the conversation.
    pub fn watches(&self, socket: SocketId, conversation: ConversationId) -> bool {
        self.lock().watched_by.get(&socket).is_some_and(|watched| watched.contains(&conversation))
    }

    /// How many conversations the socket watches.
    pub fn n_watched(&self, socket: SocketId) -> usize {
        self.lock().watched_by.get(&socket).map_or(0, HashSet::len)
    }

    /// Whether any socket of this gateway watches the conversation.
    pub fn is_watched(&self, conversation: ConversationId) -> bool {
        self.lock().conversation_watchers.get(&conversation).is_some_and(|watchers| !watchers.is_empty())
    }

    /// Sockets of this gateway signed in as the given agent.
    pub fn n_agent_sockets(&self, tenant: &TenantId, agent: &AgentId) -> usize {
        self.lock().agents.get(&(tenant.clone(), agent.clone())).map_or(0, HashSet::len)
    }

    /// Every socket signed in as an agent, with its agent (for the presence heartbeat).
    pub fn agent_sockets(&self) -> Vec<(SocketId, TenantId, AgentId)> {
        let state = self.lock();
        let mut sockets: Vec<(SocketId, TenantId, AgentId)> = state
            .agents
            .iter()
            .flat_map(|((tenant, agent), sockets)| {
                sockets.iter().map(move |socket| (*socket, tenant.clone(), agent.clone()))
            })
            .collect();
        sockets.sort_by_key(|(socket, _, _)| *socket);
        sockets
    }

    /// Every socket of a customer, with their chat (for the customers' presence heartbeat).
    pub fn customer_sockets(&self) -> Vec<(SocketId, TenantId, ConversationId)> {
        let state = self.lock();
        let mut sockets: Vec<(SocketId, TenantId, ConversationId)> = state
            .sockets
            .iter()
            .filter_map(|(socket, entry)| match &entry.role {
                Role::Customer { conversation, tenant, .. } => Some((*socket, tenant.clone(), *conversation)),
                Role::Agent { .. } => None,
            })
            .collect();
        sockets.sort_by_key(|(socket, _, _)| *socket);
        sockets
    }

    /// The group of the chat offered to the agent now, if this gateway saw the offer and it is outstanding.
    pub fn offer_group(&self, tenant: &TenantId, agent: &AgentId, conversation: ConversationId) -> Option<GroupId> {
        let state = self.lock();
        let offer = state.offers.get(&(tenant.clone(), agent.clone()))?.get(&conversation)?;
        Some(offer.entry.group.clone())
    }

    /// The role of a socket now (a customer's group follows a transfer of their chat).
    pub fn role(&self, socket: SocketId) -> Option<Role> {
        self.lock().sockets.get(&socket).map(|entry| entry.role.clone())
    }

    /// The merged waiting list of an agent's groups (those already mirrored).
    pub fn waiting_for(&self, tenant: &TenantId, groups: &[GroupId]) -> Vec<switchboard_domain::WaitingEntry> {
        let state = self.lock();
        let mirrors = groups.iter().filter_map(|group| state.queues.get(&(tenant.clone(), group.clone())));
        merge_waiting(mirrors.filter(|mirror| mirror.ready).map(|mirror| &mirror.waiting))
    }

    /// Dispatches one push from the router; returns the queues the gateway must now subscribe to (a waiting
    /// customer followed their chat to another group), and the chats it must unsubscribe from (an event of a
    /// chat no socket here follows).
    pub fn dispatch(&self, push: Push) -> Needs {
        let mut state = self.lock();
        let mut needs = Needs::default();
        match push {
            Push::Event { conversation, event, origin } => {
                let watchers: Vec<SocketId> =
                    state.conversation_watchers.get(&conversation).into_iter().flatten().copied().collect();
                let transferred_to = match &event.body {
                    EventBody::Transferred { to_group, .. } => Some(to_group.clone()),
                    _ => None,
                };
                // No socket here follows the chat: the gateway is subscribed for nothing (the answer of a
                // subscription it gave up on came after all, or overtook its undo). Whoever applies the need
                // checks again, under the conversation's lock, that no socket has started to follow it.
                if watchers.is_empty() {
                    needs.unsubscribe_conversations.push(conversation);
                }
                let outbound = Outbound::with_origin(PushFrame::Event { conversation, event }, origin);
                for socket in watchers {
                    state.send(socket, outbound.clone());
                    if let Some(group) = &transferred_to {
                        state.follow_transfer(socket, conversation, group, &mut needs);
                    }
                }
            }
            Push::Typing { conversation, author, typing } => {
                let watchers: Vec<SocketId> =
                    state.conversation_watchers.get(&conversation).into_iter().flatten().copied().collect();
                // Nobody needs to be told that they themselves are typing.
                let watchers: Vec<SocketId> = watchers
                    .into_iter()
                    .filter(|socket| !state.sockets.get(socket).is_some_and(|entry| is_author(&entry.role, &author)))
                    .collect();
                let outbound = Outbound::new(PushFrame::Typing { conversation, author, typing });
                for socket in watchers {
                    state.send(socket, outbound.clone());
                }
            }
            Push::Queue { tenant, group, version, change } => {
                state.apply_queue_change(tenant, group, version, change);
                // Once for each batch of held changes.
                needs.flush_queue_views = !state.held.is_empty() && !std::mem::replace(&mut state.flush_claimed, true);
            }
            Push::Agent { tenant, agent, change } => state.apply_agent_change((tenant, agent), change),
        }
        needs
    }

    /// Writes the held waiting-list changes to the agents whose whole list is ready: to each, the changes
    /// of its groups made after its last whole list, without the chats that both joined and left the list
    /// among them.
    pub fn flush_queue_views(&self) {
        let mut state = self.lock();
        state.flush_claimed = false;
        let held = std::mem::take(&mut state.held);
        let Some(first_stamp) = held.first().map(|change| change.stamp) else { return };
        let queues: HashSet<&(TenantId, GroupId)> = held.iter().map(|change| &change.queue).collect();
        let mut agents: Vec<SocketId> = queues
            .iter()
            .filter_map(|key| state.queues.get(*key))
            .flat_map(|mirror| mirror.agents.iter().copied())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        agents.sort_unstable();
        // Agents of the same groups that had their whole list before these changes get the same frames.
        let mut shared: HashMap<(TenantId, Vec<GroupId>), Vec<Arc<Outbound>>> = HashMap::new();
        for socket in agents {
            let Some(SocketEntry { role: Role::Agent { tenant, groups, .. }, view_stamp, .. }) =
                state.sockets.get(&socket)
            else {
                continue;
            };
            if !state.view_ready(socket) {
                continue;
            }
            let since = *view_stamp;
            let frames = if since < first_stamp {
                shared
                    .entry((tenant.clone(), groups.clone()))
                    .or_insert_with(|| net_changes(&held, tenant, groups, since))
                    .clone()
            } else {
                net_changes(&held, tenant, groups, since)
            };
            for frame in frames {
                state.send(socket, frame);
            }
        }
    }
}

/// The queues a socket of this role watches, and how.
fn queues_watched(role: &Role) -> Vec<((TenantId, GroupId), Watcher)> {
    match role {
        Role::Customer { conversation, tenant, group } => {
            vec![((tenant.clone(), group.clone()), Watcher::Customer(*conversation))]
        }
        Role::Agent { tenant, groups, .. } => {
            groups.iter().map(|group| ((tenant.clone(), group.clone()), Watcher::Agent)).collect()
        }
    }
}

/// The frames of the changes in `held` to the queues of `groups` made after `since`, without the chats that
/// first joined and last left the list among them.
fn net_changes(held: &[HeldChange], tenant: &TenantId, groups: &[GroupId], since: u64) -> Vec<Arc<Outbound>> {
    let changes: Vec<&HeldChange> = held
        .iter()
        .filter(|change| change.stamp > since && change.queue.0 == *tenant && groups.contains(&change.queue.1))
        .collect();
    // Each chat's first and last change.
    let mut ends: HashMap<ConversationId, (bool, bool)> = HashMap::new();
    for change in &changes {
        ends.entry(change.conversation)
            .and_modify(|ends| ends.1 = change.added)
            .or_insert((change.added, change.added));
    }
    changes
        .into_iter()
        .filter(|change| ends.get(&change.conversation) != Some(&(true, false)))
        .map(|change| change.frame.clone())
        .collect()
}

pub(crate) fn is_author(role: &Role, author: &Author) -> bool {
    match (role, author) {
        (Role::Customer { .. }, Author::Customer) => true,
        (Role::Agent { agent, .. }, Author::Agent(author)) => agent == author,
        _ => false,
    }
}

impl HubState {
    /// Takes the socket off the conversation's watchers; true when no socket watches it any more.
    fn stop_watching(&mut self, socket: SocketId, conversation: ConversationId) -> bool {
        let Some(watchers) = self.conversation_watchers.get_mut(&conversation) else { return true };
        watchers.remove(&socket);
        let nobody = watchers.is_empty();
        if nobody {
            self.conversation_watchers.remove(&conversation);
        }
        nobody
    }

    /// Adds the socket to the watchers of a queue's mirror (made, and to subscribe to, when new).
    fn watch_queue(&mut self, socket: SocketId, key: (TenantId, GroupId), watcher: Watcher, needs: &mut Needs) {
        let mirror = self.queues.entry(key.clone()).or_insert_with(|| {
            needs.subscribe_queues.push(key);
            QueueMirror::default()
        });
        match watcher {
            Watcher::Agent => {
                mirror.agents.insert(socket);
            }
            Watcher::Customer(conversation) => {
                mirror.customers.entry(conversation).or_default().insert(socket);
            }
        }
    }

    /// Takes the socket off the watchers of a queue's mirror (which stays, subscribed, as before).
    fn unwatch_queue(&mut self, socket: SocketId, key: &(TenantId, GroupId), watcher: Watcher) {
        let Some(mirror) = self.queues.get_mut(key) else { return };
        match watcher {
            Watcher::Agent => {
                mirror.agents.remove(&socket);
            }
            Watcher::Customer(conversation) => {
                if let Some(sockets) = mirror.customers.get_mut(&conversation) {
                    sockets.remove(&socket);
                    if sockets.is_empty() {
                        mirror.customers.remove(&conversation);
                    }
                }
            }
        }
    }

    /// A customer's chat moved to `group`: the customer now waits there.
    fn follow_transfer(&mut self, socket: SocketId, conversation: ConversationId, group: &GroupId, needs: &mut Needs) {
        let Some(entry) = self.sockets.get_mut(&socket) else { return };
        let Role::Customer { conversation: own, tenant, group: current } = &mut entry.role else { return };
        if *own != conversation || current == group {
            return;
        }
        let old = (tenant.clone(), std::mem::replace(current, group.clone()));
        let new = (tenant.clone(), group.clone());
        entry.last_position = None;
        self.unwatch_queue(socket, &old, Watcher::Customer(conversation));
        self.watch_queue(socket, new, Watcher::Customer(conversation), needs);
        self.send_queue_view(socket);
    }

    fn apply_agent_change(&mut self, key: AgentKey, change: AgentChange) {
        let frame = match change {
            AgentChange::Offered { entry, expires_at_ms, waiting_since_us } => {
                let shown = ShownOffer { entry: entry.clone(), expires_at_ms };
                self.offers.entry(key.clone()).or_default().insert(entry.conversation, shown);
                PushFrame::Offer { entry, expires_at_ms, waiting_since_us }
            }
            AgentChange::OfferEnded { conversation, reason } => {
                self.forget_offer(&key, conversation);
                PushFrame::OfferEnded { conversation, reason }
            }
            AgentChange::Assigned { chat } => {
                self.forget_offer(&key, chat.conversation);
                PushFrame::ChatAssigned { chat }
            }
            AgentChange::Status { agent } => PushFrame::AgentStatus { agent },
        };
        let sockets: Vec<SocketId> = self.agents.get(&key).into_iter().flatten().copied().collect();
        if sockets.is_empty() {
            // Nobody here follows the agent (a push after the last socket went).
            self.offers.remove(&key);
            return;
        }
        let outbound = Outbound::new(frame);
        for socket in sockets {
            self.send(socket, outbound.clone());
        }
    }

    fn forget_offer(&mut self, key: &AgentKey, conversation: ConversationId) {
        if let Some(offers) = self.offers.get_mut(key) {
            offers.remove(&conversation);
            if offers.is_empty() {
                self.offers.remove(key);
            }
        }
    }

    /// A chat left its queue: it is no longer offered to anyone.
    fn forget_offers_of(&mut self, conversation: ConversationId) {
        self.offers.retain(|_, offers| {
            offers.remove(&conversation);
            !offers.is_empty()
        });
    }

    fn send(&mut self, socket: SocketId, outbound: Arc<Outbound>) {
        let Some(entry) = self.sockets.get(&socket) else {
            return;
        };
        if entry.link.outbound.try_send(outbound).is_err() && !entry.link.is_kicked.swap(true, Ordering::SeqCst) {
            debug!(socket, "outbound queue full: disconnecting the slow client");
            entry.link.kicked.notify_one();
        }
    }

    fn apply_queue_change(&mut self, tenant: TenantId, group: GroupId, version: u64, change: QueueChange) {
        let key = (tenant, group);
        let Some(mirror) = self.queues.get_mut(&key) else {
            return;
        };
        let frame: Option<(ConversationId, bool, Arc<Outbound>)> = match change {
            // Not a change of the list: only customers' estimated waits change. It is kept even before the
            // snapshot (the snapshot does not carry it).
            QueueChange::Estimate { wait_per_position_ms } => {
                if version < mirror.version || mirror.wait_per_position_ms == wait_per_position_ms {
                    return;
                }
                mirror.version = mirror.version.max(version);
                mirror.wait_per_position_ms = wait_per_position_ms;
                let customers = mirror.customers_of_waiting(None);
                self.send_positions(&key, customers);
                return;
            }
            QueueChange::Snapshot { entries } => {
                mirror.waiting = WaitingQueue::default();
                for entry in entries {
                    mirror.waiting.insert(entry);
                }
                mirror.ready = true;
                mirror.version = version;
                None
            }
            _ if !mirror.ready || version <= mirror.version => return,
            QueueChange::Added { entry } => {
                mirror.version = version;
                let (conversation, frame) =
                    (entry.conversation, Outbound::new(PushFrame::QueueAdded { entry: entry.clone() }));
                mirror.waiting.insert(entry);
                Some((conversation, true, frame))
            }
            QueueChange::Removed { conversation, reason } => {
                mirror.version = version;
                mirror.waiting.remove(&conversation);
                let frame = Outbound::new(PushFrame::QueueRemoved { conversation, reason });
                self.forget_offers_of(conversation);
                Some((conversation, false, frame))
            }
        };
        let changed = frame.is_some();
        let mut removed = None;
        if let Some((conversation, added, frame)) = frame {
            self.stamp += 1;
            self.held.push(HeldChange { stamp: self.stamp, queue: key.clone(), conversation, added, frame });
            removed = (!added).then_some(conversation);
        }
        let Some(mirror) = self.queues.get(&key) else { return };
        // A snapshot may have dropped any chat: every customer of the group is told (or forgets) their place.
        // A change moves only the chats in the list, and the one it removed.
        let customers = if changed {
            mirror.customers_of_waiting(removed)
        } else {
            mirror.customers.values().flatten().copied().collect()
        };
        let agents: Vec<SocketId> = mirror.agents.iter().copied().collect();
        for socket in agents {
            // Agents get the change itself once their whole view is ready (held, then flushed), and a whole
            // view before that.
            if !(changed && self.view_ready(socket)) {
                self.send_queue_view(socket);
            }
        }
        self.send_positions(&key, customers);
    }

    /// Sends each of the customer sockets waiting in the queue `key` its position and estimated wait, when
    /// they changed: the positions are counted once for all of them (a change of a long queue is not paid
    /// once per customer waiting in it).
    fn send_positions(&mut self, key: &(TenantId, GroupId), sockets: Vec<SocketId>) {
        let Some(mirror) = self.queues.get(key).filter(|mirror| mirror.ready) else { return };
        if sockets.is_empty() {
            return;
        }
        let positions = mirror.waiting.positions();
        let per_position = mirror.wait_per_position_ms;
        for socket in sockets {
            let Some(SocketEntry { role: Role::Customer { conversation, .. }, .. }) = self.sockets.get(&socket) else {
                continue;
            };
            let position = positions.get(conversation).copied();
            self.send_position(socket, position, per_position);
        }
    }

    /// Sends a customer socket its position (`None`: not waiting) and the estimated wait from the queue's
    /// wait per position, unless they are what it was sent last.
    fn send_position(&mut self, socket: SocketId, position: Option<usize>, per_position_ms: Option<u64>) {
        let Some(entry) = self.sockets.get_mut(&socket) else { return };
        let Role::Customer { conversation, .. } = &entry.role else { return };
        let conversation = *conversation;
        let now = position
            .map(|position| (position, per_position_ms.map(|per_position| estimated_wait_s(position, per_position))));
        if now == entry.last_position {
            return;
        }
        // Not waiting (any more): a chat that waits again later is told its position again.
        entry.last_position = now;
        if let Some((position, estimated_wait_s)) = now {
            let frame = PushFrame::QueuePosition { conversation, position, estimated_wait_s };
            self.send(socket, Outbound::new(frame));
        }
    }

    fn view_ready(&self, socket: SocketId) -> bool {
        let Some(Role::Agent { tenant, groups, .. }) = self.sockets.get(&socket).map(|entry| &entry.role) else {
            return false;
        };
        groups.iter().all(|group| self.queues.get(&(tenant.clone(), group.clone())).is_some_and(|mirror| mirror.ready))
    }

    /// Sends an agent its whole waiting list, or a customer their position, when the mirrors are ready.
    fn send_queue_view(&mut self, socket: SocketId) {
        let Some(entry) = self.sockets.get(&socket) else {
            return;
        };
        match entry.role.clone() {
            Role::Agent { tenant, groups, .. } => {
                if !self.view_ready(socket) {
                    return;
                }
                let mirrors = groups.iter().filter_map(|group| self.queues.get(&(tenant.clone(), group.clone())));
                let entries = merge_waiting(mirrors.map(|mirror| &mirror.waiting));
                let stamp = self.stamp;
                if let Some(entry) = self.sockets.get_mut(&socket) {
                    entry.view_stamp = stamp;
                }
                self.send(socket, Outbound::new(PushFrame::QueueSnapshot { entries }));
            }
            Role::Customer { conversation, tenant, group } => {
                let Some(mirror) = self.queues.get(&(tenant, group)).filter(|mirror| mirror.ready) else {
                    return;
                };
                let (position, per_position_ms) = (mirror.waiting.position(&conversation), mirror.wait_per_position_ms);
                self.send_position(socket, position, per_position_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use switchboard_domain::{AgentStatus, ConversationState, Event, OfferEnd, WaitingEntry};
    use switchboard_proto::router::{AgentView, ChatView, LeftQueue};

    use super::*;

    fn tenant() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    fn group(name: &str) -> GroupId {
        GroupId::new(name).unwrap()
    }

    fn agent(name: &str) -> AgentId {
        AgentId::new(name).unwrap()
    }

    fn chat(n: u128) -> ConversationId {
        ConversationId::from_uuid(uuid::Uuid::from_u128(n))
    }

    fn entry(conversation: ConversationId, group_name: &str, queued_at_ms: i64) -> WaitingEntry {
        WaitingEntry {
            conversation,
            group: group(group_name),
            queued_at_ms,
            customer_name: "Dana".into(),
            question: "?".into(),
        }
    }

    /// A socket's link and what is written to it.
    fn socket() -> (SocketLink, mpsc::Receiver<Arc<Outbound>>) {
        let (outbound, written) = mpsc::channel(64);
        let link =
            SocketLink { outbound, kicked: Arc::new(Notify::new()), is_kicked: Arc::new(AtomicBool::new(false)) };
        (link, written)
    }

    fn drain(written: &mut mpsc::Receiver<Arc<Outbound>>) -> Vec<PushFrame> {
        let mut frames = Vec::new();
        while let Ok(outbound) = written.try_recv() {
            frames.push(outbound.frame().clone());
        }
        frames
    }

    fn agent_role(name: &str, groups: &[&str]) -> Role {
        Role::Agent { tenant: tenant(), agent: agent(name), groups: groups.iter().map(|name| group(name)).collect() }
    }

    fn customer_role(conversation: ConversationId, group_name: &str) -> Role {
        Role::Customer { conversation, tenant: tenant(), group: group(group_name) }
    }

    fn queue(group_name: &str, version: u64, change: QueueChange) -> Push {
        Push::Queue { tenant: tenant(), group: group(group_name), version, change }
    }

    fn agent_push(name: &str, change: AgentChange) -> Push {
        Push::Agent { tenant: tenant(), agent: agent(name), change }
    }

    fn agent_view(name: &str) -> AgentView {
        AgentView {
            tenant: tenant(),
            agent: agent(name),
            status: AgentStatus::Away,
            capacity: 2,
            groups: vec![group("sales")],
            active: vec![],
        }
    }

    fn chat_view(conversation: ConversationId, owner: &str) -> ChatView {
        ChatView {
            conversation,
            tenant: tenant(),
            group: group("sales"),
            state: ConversationState::Active,
            owner: Some(agent(owner)),
            customer_name: "Dana".into(),
            first_question: "?".into(),
            created_at_ms: 1,
            accepted_at_ms: Some(2),
            closed_at_ms: None,
            last_seq: 3,
            customer_away: false,
        }
    }

    fn key(name: &str) -> (TenantId, AgentId) {
        (tenant(), agent(name))
    }

    #[test]
    fn a_conversation_is_followed_until_its_last_watcher_leaves_or_stops() {
        let hub = Hub::default();
        let (link, _written) = socket();
        hub.register(1, link.clone(), agent_role("alice", &["sales"]));
        hub.register(2, link.clone(), agent_role("bob", &["sales"]));
        assert!(hub.watch(1, chat(7)).first_of_gateway, "the first watcher subscribes");
        assert!(!hub.watch(2, chat(7)).first_of_gateway);
        assert!(hub.watch(1, chat(8)).first_of_gateway);
        assert!(hub.watch(2, chat(9)).first_of_gateway);
        assert_eq!(hub.watch(2, chat(9)), Watch { first_of_gateway: false, already_watching: true });
        assert_eq!((hub.n_watched(1), hub.n_watched(2)), (2, 2));
        assert!(hub.unwatch(2, chat(9)), "bob was the only one following chat 9");
        assert_eq!((hub.watches(2, chat(7)), hub.watches(2, chat(9)), hub.n_watched(2)), (true, false, 1));

        let mut gone = hub.unregister(1).unsubscribe_conversations;
        gone.sort();
        assert_eq!(gone, [chat(8)], "chat 7 is still followed by bob");
        assert!(hub.is_watched(chat(7)));
        assert!(!hub.is_watched(chat(8)));
        assert_eq!(hub.unregister(2).unsubscribe_conversations, [chat(7)]);
        assert!(!hub.is_watched(chat(7)));
        assert!(hub.unregister(3).unsubscribe_conversations.is_empty(), "an unknown socket watched nothing");
    }

    #[test]
    fn an_agent_is_followed_from_its_first_socket_to_its_last() {
        let hub = Hub::default();
        let (link, _written) = socket();
        let needs = hub.register(1, link.clone(), agent_role("alice", &["sales"]));
        assert_eq!(needs.subscribe_agents, [key("alice")]);
        assert_eq!(needs.subscribe_queues, [(tenant(), group("sales"))]);
        let needs = hub.register(2, link.clone(), agent_role("alice", &["sales"]));
        assert!(needs.is_empty(), "a second tab needs nothing new: {needs:?}");
        assert_eq!(hub.n_agent_sockets(&tenant(), &agent("alice")), 2);
        assert_eq!(hub.agent_sockets(), [(1, tenant(), agent("alice")), (2, tenant(), agent("alice"))]);
        assert!(hub.unregister(1).unsubscribe_agents.is_empty());
        assert_eq!(hub.unregister(2).unsubscribe_agents, [key("alice")]);
        assert!(hub.agent_sockets().is_empty());
        // A customer is no agent.
        assert!(hub.register(3, link, customer_role(chat(1), "sales")).subscribe_agents.is_empty());
    }

    #[test]
    fn agent_pushes_reach_every_socket_of_that_agent_and_no_other() {
        let hub = Hub::default();
        let (alice_1, mut written_1) = socket();
        let (alice_2, mut written_2) = socket();
        let (bob, mut written_bob) = socket();
        let (customer, mut written_customer) = socket();
        hub.register(1, alice_1, agent_role("alice", &["sales"]));
        hub.register(2, alice_2, agent_role("alice", &["sales"]));
        hub.register(3, bob, agent_role("bob", &["sales"]));
        hub.register(4, customer, customer_role(chat(9), "sales"));
        hub.dispatch(queue("sales", 1, QueueChange::Snapshot { entries: vec![] }));
        for written in [&mut written_1, &mut written_2, &mut written_bob, &mut written_customer] {
            drain(written);
        }

        let pushes = [
            AgentChange::Offered { entry: entry(chat(1), "sales", 10), expires_at_ms: 99, waiting_since_us: 7 },
            AgentChange::OfferEnded { conversation: chat(1), reason: OfferEnd::TimedOut },
            AgentChange::Assigned { chat: chat_view(chat(2), "alice") },
            AgentChange::Status { agent: agent_view("alice") },
        ];
        for change in pushes {
            assert!(hub.dispatch(agent_push("alice", change)).is_empty());
        }
        let expected = vec![
            PushFrame::Offer { entry: entry(chat(1), "sales", 10), expires_at_ms: 99, waiting_since_us: 7 },
            PushFrame::OfferEnded { conversation: chat(1), reason: OfferEnd::TimedOut },
            PushFrame::ChatAssigned { chat: chat_view(chat(2), "alice") },
            PushFrame::AgentStatus { agent: agent_view("alice") },
        ];
        assert_eq!(drain(&mut written_1), expected);
        assert_eq!(drain(&mut written_2), expected);
        assert_eq!(drain(&mut written_bob), []);
        assert_eq!(drain(&mut written_customer), []);
        // An agent of another tenant with the same id is someone else.
        let other = Push::Agent {
            tenant: TenantId::new("globex").unwrap(),
            agent: agent("alice"),
            change: AgentChange::Status { agent: agent_view("alice") },
        };
        hub.dispatch(other);
        assert_eq!(drain(&mut written_1), []);
    }

    #[test]
    fn agents_get_waiting_list_changes_together_without_the_chats_that_came_and_went() {
        let hub = Hub::default();
        let (alice, mut written_alice) = socket();
        hub.register(1, alice, agent_role("alice", &["sales", "support"]));
        for name in ["sales", "support"] {
            hub.dispatch(queue(name, 1, QueueChange::Snapshot { entries: vec![] }));
        }
        let flush_due = |needs: Needs| needs.flush_queue_views;
        assert!(flush_due(hub.dispatch(queue("sales", 2, QueueChange::Added { entry: entry(chat(1), "sales", 10) }))));
        assert!(matches!(drain(&mut written_alice)[..], [PushFrame::QueueSnapshot { .. }]));
        hub.flush_queue_views();
        assert_eq!(drain(&mut written_alice), [PushFrame::QueueAdded { entry: entry(chat(1), "sales", 10) }]);
        let estimate = QueueChange::Estimate { wait_per_position_ms: Some(1_000) };
        assert!(!flush_due(hub.dispatch(queue("support", 1, estimate))), "nothing is held");

        // Held until the flush: chat 2 comes and goes, chat 1 (shown) leaves, chat 3 comes and moves on to
        // another group of alice (it ends on her list: all of its changes are written), chat 4 comes and
        // stays.
        let removed = |conversation, reason| QueueChange::Removed { conversation, reason };
        assert!(flush_due(hub.dispatch(queue("sales", 3, QueueChange::Added { entry: entry(chat(2), "sales", 20) }))));
        let added = hub.dispatch(queue("sales", 4, QueueChange::Added { entry: entry(chat(3), "sales", 30) }));
        assert!(!flush_due(added), "one flush for the whole batch");
        hub.dispatch(queue("sales", 5, removed(chat(2), LeftQueue::Accepted { agent: agent("bob") })));
        hub.dispatch(queue("sales", 6, removed(chat(1), LeftQueue::Cancelled)));
        // A console that signs in now gets the list as it is, and only the changes after it.
        let (bob, mut written_bob) = socket();
        hub.register(2, bob, agent_role("bob", &["sales"]));
        let transferred = LeftQueue::Transferred { to_group: group("support") };
        hub.dispatch(queue("sales", 7, removed(chat(3), transferred.clone())));
        hub.dispatch(queue("support", 2, QueueChange::Added { entry: entry(chat(3), "support", 30) }));
        hub.dispatch(queue("sales", 8, QueueChange::Added { entry: entry(chat(4), "sales", 40) }));
        assert_eq!(drain(&mut written_alice), []);
        assert_eq!(drain(&mut written_bob), [PushFrame::QueueSnapshot { entries: vec![entry(chat(3), "sales", 30)] }]);

        hub.flush_queue_views();
        assert_eq!(
            drain(&mut written_alice),
            [
                PushFrame::QueueAdded { entry: entry(chat(3), "sales", 30) },
                PushFrame::QueueRemoved { conversation: chat(1), reason: LeftQueue::Cancelled },
                PushFrame::QueueRemoved { conversation: chat(3), reason: transferred.clone() },
                PushFrame::QueueAdded { entry: entry(chat(3), "support", 30) },
                PushFrame::QueueAdded { entry: entry(chat(4), "sales", 40) },
            ]
        );
        assert_eq!(
            drain(&mut written_bob),
            [
                PushFrame::QueueRemoved { conversation: chat(3), reason: transferred },
                PushFrame::QueueAdded { entry: entry(chat(4), "sales", 40) },
            ]
        );
        // The mirror changed at once all along.
        assert_eq!(
            hub.waiting_for(&tenant(), &[group("sales"), group("support")]),
            [entry(chat(3), "support", 30), entry(chat(4), "sales", 40)]
        );
    }

    #[test]
    fn offers_are_remembered_until_they_end() {
        let hub = Hub::default();
        let (link, _written) = socket();
        hub.register(1, link.clone(), agent_role("alice", &["sales", "support"]));
        hub.register(2, link, agent_role("bob", &["sales"]));
        for name in ["sales", "support"] {
            hub.dispatch(queue(name, 1, QueueChange::Snapshot { entries: vec![] }));
        }
        let offer = |name: &str, conversation, group_name| {
            agent_push(
                name,
                AgentChange::Offered {
                    entry: entry(conversation, group_name, 10),
                    expires_at_ms: 99,
                    waiting_since_us: 0,
                },
            )
        };
        hub.dispatch(offer("alice", chat(1), "sales"));
        hub.dispatch(offer("alice", chat(2), "support"));
        hub.dispatch(offer("bob", chat(3), "sales"));
        assert_eq!(hub.offer_group(&tenant(), &agent("alice"), chat(1)), Some(group("sales")));
        assert_eq!(hub.offer_group(&tenant(), &agent("alice"), chat(2)), Some(group("support")));
        assert_eq!(hub.offer_group(&tenant(), &agent("alice"), chat(3)), None, "offered to bob, not alice");

        // Ended, taken by someone, or assigned: no longer outstanding.
        hub.dispatch(agent_push(
            "alice",
            AgentChange::OfferEnded { conversation: chat(1), reason: OfferEnd::Rejected },
        ));
        assert_eq!(hub.offer_group(&tenant(), &agent("alice"), chat(1)), None);
        let removed =
            QueueChange::Removed { conversation: chat(3), reason: LeftQueue::Accepted { agent: agent("bob") } };
        hub.dispatch(queue("sales", 2, removed));
        assert_eq!(hub.offer_group(&tenant(), &agent("bob"), chat(3)), None);
        hub.dispatch(agent_push("alice", AgentChange::Assigned { chat: chat_view(chat(2), "alice") }));
        assert_eq!(hub.offer_group(&tenant(), &agent("alice"), chat(2)), None);

        // The agent's last socket goes: its offers are forgotten with it.
        hub.dispatch(offer("bob", chat(4), "sales"));
        hub.unregister(2);
        assert_eq!(hub.offer_group(&tenant(), &agent("bob"), chat(4)), None);
    }

    #[test]
    fn a_console_that_signs_in_beside_another_is_shown_the_agents_outstanding_offers_as_shown_before() {
        let hub = Hub::default();
        let (first, mut written_first) = socket();
        hub.register(1, first, agent_role("alice", &["sales"]));
        let offered = |conversation, waiting_since_us| AgentChange::Offered {
            entry: entry(conversation, "sales", 10),
            expires_at_ms: 99,
            waiting_since_us,
        };
        hub.dispatch(agent_push("alice", offered(chat(1), 7)));
        hub.dispatch(agent_push("alice", offered(chat(2), 8)));
        hub.dispatch(agent_push(
            "alice",
            AgentChange::OfferEnded { conversation: chat(2), reason: OfferEnd::Rejected },
        ));
        drain(&mut written_first);

        // The agent's second console here: followed already, so nobody else would show it the offer.
        let (second, mut written_second) = socket();
        let needs = hub.register(2, second, agent_role("alice", &["sales"]));
        assert!(needs.subscribe_agents.is_empty(), "followed since the first console");
        let shown: Vec<PushFrame> =
            drain(&mut written_second).into_iter().filter(|frame| matches!(frame, PushFrame::Offer { .. })).collect();
        let again = PushFrame::Offer { entry: entry(chat(1), "sales", 10), expires_at_ms: 99, waiting_since_us: 0 };
        assert_eq!(shown, [again], "the outstanding offer, shown again (not waited for: no offer latency)");
        assert_eq!(drain(&mut written_first), [], "the first console saw it already");
        // Someone else's console is shown none of them.
        let (bob, mut written_bob) = socket();
        hub.register(3, bob, agent_role("bob", &["sales"]));
        assert!(!drain(&mut written_bob).iter().any(|frame| matches!(frame, PushFrame::Offer { .. })));
    }

    #[test]
    fn a_queue_change_visits_the_customers_of_the_chats_in_the_list_not_every_customer_connected() {
        let hub = Hub::default();
        let (link, mut written) = socket();
        for n in 1..=3 {
            hub.register(n as SocketId, link.clone(), customer_role(chat(n), "sales"));
        }
        let entries = (1..=3).map(|n| entry(chat(n), "sales", n as i64)).collect();
        hub.dispatch(queue("sales", 1, QueueChange::Snapshot { entries }));
        drain(&mut written);
        let visited = |hub: &Hub, removed: Option<ConversationId>| {
            let state = hub.lock();
            let mirror = &state.queues[&(tenant(), group("sales"))];
            let mut sockets = mirror.customers_of_waiting(removed);
            sockets.sort_unstable();
            sockets
        };
        assert_eq!(visited(&hub, None), [1, 2, 3]);

        // Chat 1 is accepted: its customer, still connected, is told no more places, and is not visited again.
        let accepted =
            QueueChange::Removed { conversation: chat(1), reason: LeftQueue::Accepted { agent: agent("bob") } };
        hub.dispatch(queue("sales", 2, accepted));
        let position =
            |conversation, position| PushFrame::QueuePosition { conversation, position, estimated_wait_s: None };
        assert_eq!(drain(&mut written), [position(chat(2), 1), position(chat(3), 2)]);
        assert_eq!(visited(&hub, None), [2, 3]);
        hub.dispatch(queue("sales", 3, QueueChange::Added { entry: entry(chat(4), "sales", 0) }));
        assert_eq!(drain(&mut written), [position(chat(2), 2), position(chat(3), 3)]);

        // Sockets that go leave nothing behind in the mirror.
        for n in 1..=3 {
            hub.unregister(n);
        }
        assert!(hub.lock().queues[&(tenant(), group("sales"))].customers.is_empty());
    }

    #[test]
    fn a_customer_is_told_position_and_estimated_wait_and_again_when_either_changes() {
        let hub = Hub::default();
        let (link, mut written) = socket();
        let mine = chat(2);
        hub.register(1, link, customer_role(mine, "sales"));
        // An estimate before the snapshot is kept; nothing is told before the snapshot.
        hub.dispatch(queue("sales", 1, QueueChange::Estimate { wait_per_position_ms: Some(30_000) }));
        assert_eq!(drain(&mut written), []);
        let entries = vec![entry(chat(1), "sales", 10), entry(mine, "sales", 20)];
        hub.dispatch(queue("sales", 2, QueueChange::Snapshot { entries }));
        let position =
            |position, estimated_wait_s| PushFrame::QueuePosition { conversation: mine, position, estimated_wait_s };
        assert_eq!(drain(&mut written), [position(2, Some(60))]);

        // A new estimate: told again; the same estimate again: nothing.
        hub.dispatch(queue("sales", 3, QueueChange::Estimate { wait_per_position_ms: Some(45_500) }));
        assert_eq!(drain(&mut written), [position(2, Some(91))]);
        hub.dispatch(queue("sales", 4, QueueChange::Estimate { wait_per_position_ms: Some(45_500) }));
        assert_eq!(drain(&mut written), []);
        // The chat ahead leaves: a new position with its wait.
        hub.dispatch(queue("sales", 5, QueueChange::Removed { conversation: chat(1), reason: LeftQueue::Cancelled }));
        assert_eq!(drain(&mut written), [position(1, Some(46))]);
        // No estimate any more: the position alone.
        hub.dispatch(queue("sales", 6, QueueChange::Estimate { wait_per_position_ms: None }));
        assert_eq!(drain(&mut written), [position(1, None)]);
        // A stale estimate (an older version) is ignored.
        hub.dispatch(queue("sales", 5, QueueChange::Estimate { wait_per_position_ms: Some(1_000) }));
        assert_eq!(drain(&mut written), []);

        // Accepted, then back in the queue (requeued): the position is told again even if it is the same.
        let accepted =
            QueueChange::Removed { conversation: mine, reason: LeftQueue::Accepted { agent: agent("alice") } };
        hub.dispatch(queue("sales", 7, accepted));
        assert_eq!(drain(&mut written), []);
        hub.dispatch(queue("sales", 8, QueueChange::Added { entry: entry(mine, "sales", 20) }));
        assert_eq!(drain(&mut written), [position(1, None)]);
    }

    #[test]
    fn a_waiting_customer_follows_their_chat_to_the_group_it_is_transferred_to() {
        let hub = Hub::default();
        let (link, mut written) = socket();
        let mine = chat(5);
        hub.register(1, link, customer_role(mine, "sales"));
        assert!(hub.watch(1, mine).first_of_gateway);
        hub.dispatch(queue("sales", 1, QueueChange::Snapshot { entries: vec![entry(mine, "sales", 50)] }));
        drain(&mut written);

        let transferred = Event {
            seq: 4,
            at_ms: 60,
            author: Author::Agent(agent("alice")),
            client_msg_id: None,
            body: EventBody::Transferred { from_agent: None, to_group: group("support") },
        };
        let needs =
            hub.dispatch(Push::Event { conversation: mine, event: Arc::new(transferred.clone()), origin: None });
        assert_eq!(needs.subscribe_queues, [(tenant(), group("support"))], "the new group's queue is followed");
        assert_eq!(hub.role(1), Some(customer_role(mine, "support")));
        let frames = drain(&mut written);
        assert!(matches!(&frames[..], [PushFrame::Event { event, .. }] if **event == transferred), "{frames:?}");

        // The old queue says nothing to them any more; the new one tells their place there.
        let left =
            QueueChange::Removed { conversation: mine, reason: LeftQueue::Transferred { to_group: group("support") } };
        hub.dispatch(queue("sales", 2, left));
        assert_eq!(drain(&mut written), []);
        hub.dispatch(queue("support", 1, QueueChange::Estimate { wait_per_position_ms: Some(10_000) }));
        let entries = vec![entry(chat(1), "support", 10), entry(mine, "support", 50)];
        hub.dispatch(queue("support", 2, QueueChange::Snapshot { entries }));
        assert_eq!(
            drain(&mut written),
            [PushFrame::QueuePosition { conversation: mine, position: 2, estimated_wait_s: Some(20) }]
        );
        // A second transfer to a group already followed needs nothing new.
        let back = Event {
            seq: 5,
            body: EventBody::Transferred { from_agent: None, to_group: group("sales") },
            ..transferred
        };
        assert!(hub.dispatch(Push::Event { conversation: mine, event: Arc::new(back), origin: None }).is_empty());
        assert_eq!(hub.role(1), Some(customer_role(mine, "sales")));
    }

    #[test]
    fn agents_watching_a_transferred_chat_keep_their_role() {
        let hub = Hub::default();
        let (link, _written) = socket();
        let role = agent_role("alice", &["sales"]);
        hub.register(1, link, role.clone());
        hub.watch(1, chat(1));
        let event = Event {
            seq: 9,
            at_ms: 1,
            author: Author::Agent(agent("alice")),
            client_msg_id: None,
            body: EventBody::Transferred { from_agent: Some(agent("alice")), to_group: group("support") },
        };
        assert!(hub.dispatch(Push::Event { conversation: chat(1), event: Arc::new(event), origin: None }).is_empty());
        assert_eq!(hub.role(1), Some(role));
    }

    #[test]
    fn an_event_of_a_chat_nobody_here_follows_asks_for_an_unsubscription() {
        let hub = Hub::default();
        let (link, _written) = socket();
        hub.register(1, link, agent_role("alice", &["sales"]));
        hub.watch(1, chat(1));
        let event = |seq| Event { seq, at_ms: 1, author: Author::System, client_msg_id: None, body: EventBody::Closed };
        let followed = hub.dispatch(Push::Event { conversation: chat(1), event: Arc::new(event(4)), origin: None });
        assert!(followed.is_empty(), "{followed:?}");
        let stray = hub.dispatch(Push::Event { conversation: chat(2), event: Arc::new(event(5)), origin: None });
        assert_eq!(stray.unsubscribe_conversations, [chat(2)]);
    }
}
