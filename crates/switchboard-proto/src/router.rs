//! What a gateway asks of the router, and what the router pushes back.
//!
//! The gateway never sees an actor: it calls [`RouterApi`] (in-process in `serve`; over the internal gRPC
//! package in the split roles) and receives [`Push`]es on the one channel it registered with
//! [`RouterApi::connect_gateway`]. A router keeps, per conversation and per queue, the set of *gateways*
//! subscribed, never sockets: each gateway fans out to its own sockets.

use std::sync::Arc;

use async_trait::async_trait;
use switchboard_domain::{
    AgentId, AgentStatus, Author, ConversationId, ConversationState, Event, GroupId, Refusal, TenantId, WaitingEntry,
};
use tokio::sync::mpsc;

/// One gateway process (or one gateway inside `serve`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayId(pub String);

/// Who is asking. The gateway authenticates agents (by token) and customers (by the conversation's token,
/// checked with [`RouterApi::authorize_customer`]); the router checks what each may see and do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Customer { conversation: ConversationId },
    Agent { tenant: TenantId, agent: AgentId },
}

impl Caller {
    pub fn author(&self) -> Author {
        match self {
            Caller::Customer { .. } => Author::Customer,
            Caller::Agent { agent, .. } => Author::Agent(agent.clone()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartChat {
    /// Chosen by the gateway (a UUID v7), so that the request goes to the owner of the conversation's shard.
    pub conversation: ConversationId,
    pub tenant: TenantId,
    pub group: GroupId,
    pub customer_name: String,
    pub question: String,
}

/// A conversation as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatView {
    pub conversation: ConversationId,
    pub tenant: TenantId,
    pub group: GroupId,
    pub state: ConversationState,
    pub owner: Option<AgentId>,
    pub customer_name: String,
    pub first_question: String,
    pub created_at_ms: i64,
    pub accepted_at_ms: Option<i64>,
    pub closed_at_ms: Option<i64>,
    pub last_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedChat {
    pub view: ChatView,
    /// The secret the customer resumes this chat with.
    pub customer_token: String,
}

/// A command on a conversation, made by a [`Caller`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// `client_msg_id` makes a resend idempotent: the message is stored once.
    Send {
        client_msg_id: String,
        body: String,
    },
    ConfirmDelivery {
        up_to_seq: u64,
    },
    /// The customer leaves, or the owning agent ends the chat.
    Close,
    /// The owning agent cancels the chat.
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// The stored event; `None` when the command changed nothing (a repeated mark, a second close).
    pub event: Option<Event>,
    /// The message had been stored before under the same client message id; `event` is that first copy.
    pub duplicate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatList {
    Ongoing,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    pub tenant: TenantId,
    pub agent: AgentId,
    pub status: AgentStatus,
    pub capacity: u32,
    pub groups: Vec<GroupId>,
    pub active: Vec<ConversationId>,
}

/// Why a chat left a waiting queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeftQueue {
    Accepted { agent: AgentId },
    Cancelled,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueChange {
    /// The whole queue: sent first to every newly subscribed gateway.
    Snapshot {
        entries: Vec<WaitingEntry>,
    },
    Added {
        entry: WaitingEntry,
    },
    Removed {
        conversation: ConversationId,
        reason: LeftQueue,
    },
}

/// What a router sends to a gateway, in order per conversation and per queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    Event {
        conversation: ConversationId,
        event: Arc<Event>,
    },
    Typing {
        conversation: ConversationId,
        author: Author,
        typing: bool,
    },
    /// `version` grows by one at every change of that queue, so a gateway can tell a stale change.
    Queue {
        tenant: TenantId,
        group: GroupId,
        version: u64,
        change: QueueChange,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// No such conversation, or not one the caller may see (the two are not told apart).
    #[error("no such conversation")]
    NotFound,
    #[error("no such agent")]
    UnknownAgent,
    #[error("no such support group")]
    UnknownGroup,
    /// This router does not own the shard: the caller refreshes its placement and retries.
    #[error("this router does not own the shard")]
    NotOwner,
    /// Storage is unreachable; retrying later may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RouterError {
    /// Whether the caller may retry the same request (with the same client message id).
    pub fn is_retryable(&self) -> bool {
        matches!(self, RouterError::NotOwner | RouterError::Unavailable(_))
    }
}

#[async_trait]
pub trait RouterApi: Send + Sync + 'static {
    /// Registers the channel a gateway receives its pushes on (replacing an earlier one).
    fn connect_gateway(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>);

    /// Creates a conversation, queued in its group, with the question as the customer's first message.
    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError>;

    /// Checks a customer's token for a conversation.
    async fn authorize_customer(&self, conversation: ConversationId, token: &str) -> Result<ChatView, RouterError>;

    async fn chat_view(&self, caller: &Caller, conversation: ConversationId) -> Result<ChatView, RouterError>;

    /// Subscribes the gateway to a conversation's events and returns the events after `after_seq`; every
    /// later event is pushed. Together they have no gap.
    async fn subscribe(
        &self,
        gateway: &GatewayId,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<Vec<Event>, RouterError>;

    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId);

    /// The events after `after_seq`, without subscribing (transcripts of closed chats).
    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<Vec<Event>, RouterError>;

    async fn command(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError>;

    /// Typing indicators are pushed to the other side and never stored.
    async fn typing(&self, caller: &Caller, conversation: ConversationId, typing: bool) -> Result<(), RouterError>;

    /// An agent accepts a waiting chat: exactly one of several concurrent accepts wins.
    async fn accept_chat(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError>;

    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError>;

    /// Subscribes the gateway to a group's waiting queue: a snapshot is pushed first, then every change.
    async fn subscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId)
    -> Result<(), RouterError>;

    async fn unsubscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId);

    async fn list_chats(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        list: ChatList,
    ) -> Result<Vec<ChatView>, RouterError>;
}

/// What one router asks of another: the effects of an actor on actors that live on another node. The
/// router that owns the key's shard does the work; any other answers [`RouterError::NotOwner`].
#[async_trait]
pub trait PeerApi: Send + Sync + 'static {
    /// The conversation's owner records an accept that the agent's owner decided (capacity reserved).
    async fn owner_accept(&self, conversation: ConversationId, agent: &AgentId) -> Result<ChatView, RouterError>;

    /// A chat joined its group's queue.
    async fn queue_add(&self, tenant: &TenantId, entry: WaitingEntry) -> Result<(), RouterError>;

    /// A chat left its group's queue.
    async fn queue_remove(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        conversation: ConversationId,
        reason: LeftQueue,
    ) -> Result<(), RouterError>;

    /// A chat of the agent ended: its slot is free.
    async fn agent_finished(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError>;
}

/// The rest of the cluster as one router sees it: every operation, sent to the owner of its key's shard.
pub trait ClusterApi: RouterApi + PeerApi {}

impl<T: RouterApi + PeerApi> ClusterApi for T {}
