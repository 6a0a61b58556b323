//! What a gateway asks of the router, and what the router pushes back.
//!
//! The gateway never sees an actor: it calls [`RouterApi`] (in-process in `serve`; over the internal gRPC
//! package in the split roles) and receives [`Push`]es on the one channel it registered with
//! [`RouterApi::connect_gateway`]. A router keeps, per conversation and per queue, the set of *gateways*
//! subscribed, never sockets: each gateway fans out to its own sockets.

use std::sync::Arc;

use async_trait::async_trait;
use switchboard_domain::{
    AgentAvailability, AgentId, AgentStatus, Author, ConversationId, ConversationState, Event, GroupId, OfferEnd,
    Refusal, RequeueReason, TenantId, WaitingEntry,
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
    /// An earlier try of this very start (the same `conversation`) failed without an answer, so it may have
    /// been carried out: the gateway's cluster client tries a start again on its conversation's owner.
    pub tried_before: bool,
    /// The secret the customer will resume the chat with, chosen by the gateway: random
    /// ([`new_customer_token`](switchboard_domain::new_customer_token)), or derived from the start key
    /// ([`customer_token_for_start`](switchboard_domain::customer_token_for_start)) so that a start sent again
    /// is answered with the same one. Only its hash is stored.
    pub customer_token: String,
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
    /// The customer left the chat (a `customer_left` event) and has not returned since.
    pub customer_away: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedChat {
    pub view: ChatView,
    /// The secret the customer resumes this chat with.
    pub customer_token: String,
    /// The chat was started before, by a start with the same id (a repeated `chat.start` with its
    /// `start_key`): this is that chat as it is now, and nothing was stored.
    pub duplicate: bool,
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

/// Events of a conversation's log after a seq, in seq order, as one answer carries them. A log can outgrow
/// any one message between the processes (and any one frame to a client): an answer holds at most about a
/// page of them (the router's `page_bytes`), and at least one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// The seq of the log's last event when it was read. When the last event here is before it, the log
    /// goes on: read again after that event.
    pub last_seq: u64,
}

impl EventPage {
    /// The log goes on after this page.
    pub fn more(&self) -> bool {
        self.next_after().is_some()
    }

    /// The seq the next read starts after, when the log goes on: the last one here. (A page without events
    /// is never followed by another, lest a reader loop on it.)
    pub fn next_after(&self) -> Option<u64> {
        self.events.last().map(|event| event.seq).filter(|seq| *seq < self.last_seq)
    }
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
    Accepted {
        agent: AgentId,
    },
    /// Cancelled by its customer.
    Cancelled,
    /// Cancelled by the system: its customer went away and did not come back within the grace period.
    Abandoned,
    Closed,
    /// Transferred to another group's queue.
    Transferred {
        to_group: GroupId,
    },
}

/// A change of what one agent sees of their own work, pushed to the gateways where the agent is signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChange {
    /// Push routing offers the agent a waiting chat until `expires_at_ms`: accept it or reject it.
    /// `waiting_since_us` is since when the chat has waited for this offer (its arrival in the queue, or the
    /// end of its previous offer), for the offer latency; 0 when unknown.
    Offered { entry: WaitingEntry, expires_at_ms: i64, waiting_since_us: i64 },
    /// The offer ended without an accept (rejected, timed out, or withdrawn because the agent became
    /// unavailable); a chat taken by someone else is told by the queue's `Removed` instead.
    OfferEnded { conversation: ConversationId, reason: OfferEnd },
    /// A chat became the agent's without their accept (forwarded to them): they should follow it.
    Assigned { chat: ChatView },
    /// The agent's status or load changed (set from another connection, or offline after the grace period).
    Status { agent: AgentView },
}

/// A message a customer leaves when they cannot chat (the group is closed, the license limit is reached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineMessage {
    pub tenant: TenantId,
    pub group: GroupId,
    pub customer_name: String,
    /// How to reach the customer back (an e-mail address or a phone number).
    pub contact: String,
    pub body: String,
    /// Why the customer could not chat: a refusal code (`group_closed`, `group_offline`, `license_exhausted`).
    pub reason: String,
    /// Chosen by the client: sending the same message again stores one ticket.
    pub idempotency_key: String,
}

/// A stored ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub id: String,
    pub created_at_ms: i64,
    pub duplicate: bool,
}

/// What the queue of a group asks of the conversation owner on its behalf (push routing), or what the agent
/// owner asks (an agent who stays offline past the grace period).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemCommand {
    /// `group`: the group whose queue makes the offer, refused (`NotInGroup`) when the chat waits in another
    /// (a queue that still lists a chat moved away); `None` from routers before it, unchecked.
    Offer {
        agent: AgentId,
        expires_at_ms: i64,
        group: Option<GroupId>,
    },
    EndOffer {
        agent: AgentId,
        reason: OfferEnd,
    },
    Requeue {
        agent: AgentId,
        reason: RequeueReason,
    },
    /// The queue found the waiting chat's customer gone for the grace period: it is cancelled as abandoned
    /// (nothing once it no longer waits).
    Abandon,
    /// The agent's owner found the active chat's customer gone for the grace period, though no gateway said
    /// so (their gateway went with them: it crashed, its host was lost). The chat reads its customer again
    /// and records `customer_left` if they are gone still; nothing (and `false`: the reading answers later)
    /// when the chat is not active, the customer is recorded away already, or a reading of the chat's own
    /// began within the grace period (its own timer decides).
    CustomerGone,
}

/// An offer a gateway showed an agent's consoles, as it subscribes to the agent's pushes again (see
/// [`RouterApi::subscribe_agent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShownOffer {
    pub conversation: ConversationId,
    pub expires_at_ms: i64,
}

/// What the owner of a group's queue tells the owner of an agent about an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferUpdate {
    /// Reserve a slot and show the agent the offer; refused when the agent cannot take it. (`waiting_since_us`:
    /// see [`AgentChange::Offered`].)
    Made { entry: WaitingEntry, expires_at_ms: i64, waiting_since_us: i64 },
    /// The offer ended: free the slot and tell the agent. `expires_at_ms` is the expiry of the offer that
    /// ended, which tells it from a later offer of the same chat to the same agent (an end that arrives late
    /// leaves a newer offer alone); `None`: whichever offer of the chat the agent holds (from a router before
    /// offers carried it).
    Ended { conversation: ConversationId, reason: OfferEnd, expires_at_ms: Option<i64> },
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
    /// How long a customer waits per place in the queue, from the group's recent accepts; `None` while
    /// there is no estimate. A customer's estimated wait is their position times this.
    Estimate {
        wait_per_position_ms: Option<u64>,
    },
}

/// Where the client request behind a pushed event came from: when it reached its first gateway, and the
/// trace of the router's work on it. Neither is stored: a replayed event has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// Microseconds since the Unix epoch; 0 when unknown.
    pub received_at_us: i64,
    /// The W3C trace context of the span that pushed the event.
    pub traceparent: Option<String>,
}

/// What a router sends to a gateway, in order per conversation and per queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    Event {
        conversation: ConversationId,
        event: Arc<Event>,
        /// Where the request that caused the event came from, when known (for latency and traces).
        origin: Option<Origin>,
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
    /// For the gateways subscribed to the agent ([`RouterApi::subscribe_agent`]).
    Agent {
        tenant: TenantId,
        agent: AgentId,
        change: AgentChange,
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

    /// Subscribes the gateway to a conversation's events and returns the events after `after_seq` (their
    /// first page: `read_events` gives the rest); every later event is pushed. Together they have no gap.
    async fn subscribe(
        &self,
        gateway: &GatewayId,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError>;

    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId);

    /// The events after `after_seq`, a page of them, without subscribing (transcripts, catch-ups).
    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError>;

    async fn command(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError>;

    /// Typing indicators are pushed to the other side and never stored.
    async fn typing(&self, caller: &Caller, conversation: ConversationId, typing: bool) -> Result<(), RouterError>;

    /// A connection of the chat's customer began or ended at the calling gateway, which wrote that to
    /// presence first. The owner reads presence (the customer may have other connections, at other gateways)
    /// and records a `customer_left` once they stayed gone for the grace period, a `customer_returned` when
    /// they come back. Only the answer of the owner is awaited, not its reading.
    async fn customer_connection(&self, conversation: ConversationId) -> Result<(), RouterError>;

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

    /// Subscribes the gateway to an agent's own pushes ([`Push::Agent`]: offers, chats forwarded to them,
    /// status changes). Routed to the owner of the agent's shard. `shown`: the offers the gateway showed the
    /// agent's consoles and has not seen end (when it follows the agent again, after an owner move or a lost
    /// push stream); the owner pushes an [`AgentChange::OfferEnded`] for each one no longer outstanding, whose
    /// end it pushed while the gateway did not follow the agent there.
    async fn subscribe_agent(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        agent: &AgentId,
        shown: &[ShownOffer],
    ) -> Result<(), RouterError>;

    async fn unsubscribe_agent(&self, gateway: &GatewayId, tenant: &TenantId, agent: &AgentId);

    /// The agent declines the chat offered to them: it is offered to the next agent. Routed to the owner of
    /// the group's queue.
    async fn reject_offer(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError>;

    /// Moves a waiting or ongoing chat to another *online* group's waiting queue (else `group_offline`).
    /// Routed to the owner of the conversation's shard.
    async fn transfer_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_group: &GroupId,
    ) -> Result<ChatView, RouterError>;

    /// Hands a waiting or ongoing chat to another agent who is online with a free slot (else
    /// `agent_unavailable`). Routed to the owner of the *target agent's* shard: that agent's actor reserves
    /// the slot, then asks the conversation's owner ([`PeerApi::owner_forward`]).
    async fn forward_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError>;

    /// Stores a customer's offline message as a ticket. Routed to the owner of the group's queue.
    async fn leave_offline_message(&self, message: OfflineMessage) -> Result<Ticket, RouterError>;
}

/// What one router asks of another: the effects of an actor on actors that live on another node. The
/// router that owns the key's shard does the work; any other answers [`RouterError::NotOwner`].
#[async_trait]
pub trait PeerApi: Send + Sync + 'static {
    /// The conversation's owner records an accept that the agent's owner decided (capacity reserved).
    async fn owner_accept(&self, conversation: ConversationId, agent: &AgentId) -> Result<ChatView, RouterError>;

    /// A chat joined its group's queue: it began to wait at `waiting_since_us` (µs since the epoch), for the
    /// first offer's latency.
    async fn queue_add(&self, tenant: &TenantId, entry: WaitingEntry, waiting_since_us: i64)
    -> Result<(), RouterError>;

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

    /// The conversation's owner carries out a command of the system (an offer made or ended, a requeue);
    /// true when it stored an event, false when the command changed nothing.
    async fn conversation_system(
        &self,
        conversation: ConversationId,
        command: SystemCommand,
    ) -> Result<bool, RouterError>;

    /// The agent's owner reserves a slot for an offer (refused when the agent cannot take it) or frees it.
    async fn agent_offer(&self, tenant: &TenantId, agent: &AgentId, update: OfferUpdate) -> Result<(), RouterError>;

    /// The agent's availability as its owner knows it (for the queues that choose whom to offer a chat).
    async fn agent_availability(&self, tenant: &TenantId, agent: &AgentId) -> Result<AgentAvailability, RouterError>;

    /// An agent's availability changed: the owner of each of its groups' queues is told.
    async fn queue_agent_changed(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        availability: AgentAvailability,
    ) -> Result<(), RouterError>;

    /// The conversation's owner records a forward that the target agent's owner decided (its slot is
    /// reserved). Like [`PeerApi::owner_accept`], this goes from the agent side to the conversation side, so
    /// that no two actors ever wait on each other.
    async fn owner_forward(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError>;
}

/// The rest of the cluster as one router sees it: every operation, sent to the owner of its key's shard.
pub trait ClusterApi: RouterApi + PeerApi {}

impl<T: RouterApi + PeerApi> ClusterApi for T {}
