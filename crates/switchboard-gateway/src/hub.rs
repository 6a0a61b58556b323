//! The gateway's fan-out hub: which of this gateway's sockets watch which conversation and which queue,
//! and a mirror of every queue watched. Pushes from the router arrive here once per gateway and are
//! written into each interested socket's bounded outbound queue; a socket whose queue is full is kicked
//! (it resumes from its last seq) so that no producer ever waits on a slow client.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::extract::ws::Utf8Bytes;

use switchboard_domain::{AgentId, Author, ConversationId, GroupId, TenantId, WaitingQueue, merge_waiting};
use switchboard_proto::router::{Push, QueueChange};
use tokio::sync::{Notify, mpsc};
use tracing::debug;

use crate::protocol::PushFrame;

/// A connection of any transport (WebSocket or gRPC stream); "socket" in this module.
pub type SocketId = u64;

/// A push on its way to sockets. It is made once per router push and shared by every socket it goes to;
/// its JSON text is made once too, by the first WebSocket that writes it. A conversation event is skipped by
/// a socket that already wrote it (by seq).
#[derive(Debug)]
pub struct Outbound {
    frame: PushFrame,
    json: OnceLock<Utf8Bytes>,
}

impl Outbound {
    pub fn new(frame: PushFrame) -> Arc<Outbound> {
        Arc::new(Outbound { frame, json: OnceLock::new() })
    }

    pub fn frame(&self) -> &PushFrame {
        &self.frame
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
    watchers: HashSet<SocketId>,
}

struct SocketEntry {
    link: SocketLink,
    role: Role,
    last_position: Option<usize>,
}

#[derive(Default)]
struct HubState {
    sockets: HashMap<SocketId, SocketEntry>,
    conversation_watchers: HashMap<ConversationId, HashSet<SocketId>>,
    queues: HashMap<(TenantId, GroupId), QueueMirror>,
}

#[derive(Default)]
pub struct Hub {
    state: Mutex<HubState>,
}

/// What a caller must do after a hub change: subscribe the gateway to conversations or queues it was not
/// watching yet, or drop subscriptions nobody needs any more.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub subscribe_queues: Vec<(TenantId, GroupId)>,
    pub unsubscribe_conversations: Vec<ConversationId>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a socket with its role; returns the queues the gateway must now subscribe to.
    pub fn register(&self, socket: SocketId, link: SocketLink, role: Role) -> Needs {
        let mut state = self.lock();
        let groups: Vec<(TenantId, GroupId)> = match &role {
            Role::Customer { tenant, group, .. } => vec![(tenant.clone(), group.clone())],
            Role::Agent { tenant, groups, .. } => groups.iter().map(|group| (tenant.clone(), group.clone())).collect(),
        };
        let mut needs = Needs::default();
        for key in groups {
            let mirror = state.queues.entry(key.clone()).or_insert_with(|| {
                needs.subscribe_queues.push(key.clone());
                QueueMirror::default()
            });
            mirror.watchers.insert(socket);
        }
        state.sockets.insert(socket, SocketEntry { link, role, last_position: None });
        state.send_queue_view(socket);
        needs
    }

    /// Forgets a socket; returns the conversations no socket of this gateway watches any more.
    pub fn unregister(&self, socket: SocketId) -> Needs {
        let mut state = self.lock();
        state.sockets.remove(&socket);
        for mirror in state.queues.values_mut() {
            mirror.watchers.remove(&socket);
        }
        let mut needs = Needs::default();
        state.conversation_watchers.retain(|conversation, watchers| {
            watchers.remove(&socket);
            if watchers.is_empty() {
                needs.unsubscribe_conversations.push(*conversation);
            }
            !watchers.is_empty()
        });
        needs
    }

    /// The socket wants the conversation's pushes; true when the gateway was not subscribed yet.
    pub fn watch(&self, socket: SocketId, conversation: ConversationId) -> bool {
        let mut state = self.lock();
        let watchers = state.conversation_watchers.entry(conversation).or_default();
        let first = watchers.is_empty();
        watchers.insert(socket);
        first
    }

    /// The socket no longer wants the conversation's pushes; true when no socket of this gateway does.
    pub fn unwatch(&self, socket: SocketId, conversation: ConversationId) -> bool {
        let mut state = self.lock();
        let Some(watchers) = state.conversation_watchers.get_mut(&conversation) else { return true };
        watchers.remove(&socket);
        let nobody = watchers.is_empty();
        if nobody {
            state.conversation_watchers.remove(&conversation);
        }
        nobody
    }

    /// Sockets of this gateway signed in as the given agent.
    pub fn n_agent_sockets(&self, tenant: &TenantId, agent: &AgentId) -> usize {
        let state = self.lock();
        let is_agent =
            |role: &Role| matches!(role, Role::Agent { tenant: t, agent: a, .. } if t == tenant && a == agent);
        state.sockets.values().filter(|entry| is_agent(&entry.role)).count()
    }

    /// The merged waiting list of an agent's groups (those already mirrored).
    pub fn waiting_for(&self, tenant: &TenantId, groups: &[GroupId]) -> Vec<switchboard_domain::WaitingEntry> {
        let state = self.lock();
        let mirrors = groups.iter().filter_map(|group| state.queues.get(&(tenant.clone(), group.clone())));
        merge_waiting(mirrors.filter(|mirror| mirror.ready).map(|mirror| &mirror.waiting))
    }

    /// Dispatches one push from the router.
    pub fn dispatch(&self, push: Push) {
        let mut state = self.lock();
        match push {
            Push::Event { conversation, event } => {
                let outbound = Outbound::new(PushFrame::Event { conversation, event });
                let watchers: Vec<SocketId> =
                    state.conversation_watchers.get(&conversation).into_iter().flatten().copied().collect();
                for socket in watchers {
                    state.send(socket, outbound.clone());
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
            Push::Queue { tenant, group, version, change } => state.apply_queue_change(tenant, group, version, change),
        }
    }
}

fn is_author(role: &Role, author: &Author) -> bool {
    match (role, author) {
        (Role::Customer { .. }, Author::Customer) => true,
        (Role::Agent { agent, .. }, Author::Agent(author)) => agent == author,
        _ => false,
    }
}

impl HubState {
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
        let frame: Option<Arc<Outbound>> = match change {
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
                let frame = Outbound::new(PushFrame::QueueAdded { entry: entry.clone() });
                mirror.waiting.insert(entry);
                Some(frame)
            }
            QueueChange::Removed { conversation, reason } => {
                mirror.version = version;
                mirror.waiting.remove(&conversation);
                Some(Outbound::new(PushFrame::QueueRemoved { conversation, reason }))
            }
        };
        let watchers: Vec<SocketId> = mirror.watchers.iter().copied().collect();
        for socket in watchers {
            match (&frame, self.sockets.get(&socket).map(|entry| &entry.role)) {
                // Agents get the change itself once their whole view is ready, and a full view before that.
                (Some(frame), Some(Role::Agent { .. })) if self.view_ready(socket) => self.send(socket, frame.clone()),
                _ => self.send_queue_view(socket),
            }
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
                self.send(socket, Outbound::new(PushFrame::QueueSnapshot { entries }));
            }
            Role::Customer { conversation, tenant, group } => {
                let Some(mirror) = self.queues.get(&(tenant, group)) else {
                    return;
                };
                if !mirror.ready {
                    return;
                }
                let position = mirror.waiting.position(&conversation);
                let last_position = entry.last_position;
                if let Some(position) = position
                    && last_position != Some(position)
                {
                    if let Some(entry) = self.sockets.get_mut(&socket) {
                        entry.last_position = Some(position);
                    }
                    self.send(socket, Outbound::new(PushFrame::QueuePosition { conversation, position }));
                }
            }
        }
    }
}
