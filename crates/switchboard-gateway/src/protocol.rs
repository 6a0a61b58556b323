//! The public protocol, version 1. `docs/protocol.md` documents every frame.
//!
//! Every client frame has a `type` and an `id` chosen by the client; the server answers each with an `ack`
//! or an `error` frame carrying the same `id`. Frames the server pushes on its own (events, queue changes,
//! typing) have no `id`.
//!
//! The frames are defined here once, independently of the transport: a [`Request`] in, an [`Ack`] (or an
//! [`ErrorReply`]) and [`PushFrame`]s out. This module also holds their JSON form (the WebSocket transport);
//! `grpc.rs` holds their protobuf form (`switchboard.v1`, the gRPC transport).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_domain::{
    AgentStatus, Author, ConversationId, Event, EventBody, GroupId, OfferEnd, Refusal, WaitingEntry,
};
use switchboard_proto::router::{AgentView, ChatView, LeftQueue, RouterError, Ticket};
use uuid::Uuid;

pub const PROTOCOL_VERSION: u32 = 1;

/// Every request type of [`Request`], so that an unknown type is told apart from a bad field value.
pub const REQUEST_TYPES: &[&str] = &[
    "chat.start",
    "customer.resume",
    "agent.sign_in",
    "agent.set_status",
    "queue.list",
    "chat.accept",
    "chat.subscribe",
    "chat.unsubscribe",
    "chat.transcript",
    "chat.list",
    "message.send",
    "message.delivered",
    "typing",
    "chat.close",
    "chat.cancel",
    "ping",
    "groups.list",
    "offline.message",
    "offer.reject",
    "chat.transfer",
    "chat.forward",
    "agent.sign_out",
];

/// A frame from a client, after its `id` was taken out.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Request {
    #[serde(rename = "chat.start")]
    ChatStart {
        widget_key: String,
        group: String,
        name: String,
        question: String,
        /// Chosen by the client once per chat: the same start sent again gets the chat the first one made.
        #[serde(default)]
        start_key: Option<Uuid>,
    },
    #[serde(rename = "customer.resume")]
    CustomerResume {
        conversation: ConversationId,
        customer_token: String,
        #[serde(default)]
        after_seq: u64,
    },
    #[serde(rename = "agent.sign_in")]
    AgentSignIn { token: String },
    #[serde(rename = "agent.set_status")]
    AgentSetStatus { status: SettableStatus },
    #[serde(rename = "queue.list")]
    QueueList {},
    #[serde(rename = "chat.accept")]
    ChatAccept { conversation: ConversationId },
    #[serde(rename = "chat.subscribe")]
    ChatSubscribe {
        conversation: ConversationId,
        #[serde(default)]
        after_seq: u64,
    },
    /// The connection stops following the chat (see `chat.subscribe`).
    #[serde(rename = "chat.unsubscribe")]
    ChatUnsubscribe { conversation: ConversationId },
    #[serde(rename = "chat.transcript")]
    ChatTranscript {
        conversation: ConversationId,
        #[serde(default)]
        after_seq: u64,
    },
    #[serde(rename = "chat.list")]
    ChatList { list: ListName },
    #[serde(rename = "message.send")]
    MessageSend { conversation: ConversationId, client_msg_id: String, body: String },
    #[serde(rename = "message.delivered")]
    MessageDelivered { conversation: ConversationId, up_to_seq: u64 },
    #[serde(rename = "typing")]
    Typing { conversation: ConversationId, typing: bool },
    #[serde(rename = "chat.close")]
    ChatClose { conversation: ConversationId },
    #[serde(rename = "chat.cancel")]
    ChatCancel { conversation: ConversationId },
    #[serde(rename = "ping")]
    Ping {},
    /// The groups of the tenant of `widget_key` (or of the connection when absent) and their status.
    #[serde(rename = "groups.list")]
    GroupsList {
        #[serde(default)]
        widget_key: Option<String>,
    },
    /// A customer who cannot chat leaves a message, stored as a ticket.
    #[serde(rename = "offline.message")]
    OfflineMessage {
        widget_key: String,
        group: String,
        name: String,
        contact: String,
        body: String,
        reason: String,
        idempotency_key: String,
    },
    /// The agent declines the chat offered to them.
    #[serde(rename = "offer.reject")]
    OfferReject { conversation: ConversationId },
    /// Moves a chat to another group's queue.
    #[serde(rename = "chat.transfer")]
    ChatTransfer { conversation: ConversationId, group: String },
    /// Hands a chat to another agent.
    #[serde(rename = "chat.forward")]
    ChatForward { conversation: ConversationId, agent: String },
    /// The agent goes offline at once; the connection has no role any more.
    #[serde(rename = "agent.sign_out")]
    AgentSignOut {},
}

impl Request {
    /// The request's `type`, as the client wrote it (a label of the gateway's metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            Request::ChatStart { .. } => "chat.start",
            Request::CustomerResume { .. } => "customer.resume",
            Request::AgentSignIn { .. } => "agent.sign_in",
            Request::AgentSetStatus { .. } => "agent.set_status",
            Request::QueueList { .. } => "queue.list",
            Request::ChatAccept { .. } => "chat.accept",
            Request::ChatSubscribe { .. } => "chat.subscribe",
            Request::ChatUnsubscribe { .. } => "chat.unsubscribe",
            Request::ChatTranscript { .. } => "chat.transcript",
            Request::ChatList { .. } => "chat.list",
            Request::MessageSend { .. } => "message.send",
            Request::MessageDelivered { .. } => "message.delivered",
            Request::Typing { .. } => "typing",
            Request::ChatClose { .. } => "chat.close",
            Request::ChatCancel { .. } => "chat.cancel",
            Request::Ping { .. } => "ping",
            Request::GroupsList { .. } => "groups.list",
            Request::OfflineMessage { .. } => "offline.message",
            Request::OfferReject { .. } => "offer.reject",
            Request::ChatTransfer { .. } => "chat.transfer",
            Request::ChatForward { .. } => "chat.forward",
            Request::AgentSignOut { .. } => "agent.sign_out",
        }
    }
}

/// The statuses an agent may choose; offline is what signing out (or losing the connection) makes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettableStatus {
    Online,
    Away,
}

impl From<SettableStatus> for AgentStatus {
    fn from(status: SettableStatus) -> Self {
        match status {
            SettableStatus::Online => AgentStatus::Online,
            SettableStatus::Away => AgentStatus::Away,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListName {
    Ongoing,
    Closed,
}

/// An error frame's content: a stable code, a message for people, and whether a retry may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
    /// `license_exhausted` only: the cluster-wide limit of concurrent chats (an extra field of the frame).
    pub max_sessions: Option<u64>,
    /// `rate_limited` only: how long to wait before the request may be sent again, in ms (an extra field of
    /// the frame).
    pub retry_after_ms: Option<u64>,
    /// The `reason` the refusal is counted under (`switchboard_gateway_refusals_total`): the code, but where
    /// one code has several causes an SRE tells apart (`address_rate_limited`: a client address's chat starts,
    /// not a connection's requests). Not sent.
    pub reason: &'static str,
}

impl ErrorReply {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
            retryable: false,
            max_sessions: None,
            retry_after_ms: None,
            reason: code,
        }
    }

    /// The connection made more requests than its budget allows: nothing was done; the same request may be
    /// sent again after `retry_after_ms`.
    pub fn rate_limited(retry_after_ms: u64) -> Self {
        let per_request_kib = crate::admission::REPLY_BYTES_PER_REQUEST / 1024;
        let message = format!(
            "too many requests on this connection (a large answer counts as one request per {per_request_kib} KiB \
             it carries): send it again in {retry_after_ms} ms"
        );
        ErrorReply { retryable: true, retry_after_ms: Some(retry_after_ms), ..ErrorReply::new("rate_limited", message) }
    }

    /// The client's address started more chats (or left more offline messages) than the gateway's limit per
    /// address allows: nothing was done; the same request may be sent again after `retry_after_ms`.
    pub fn address_rate_limited(retry_after_ms: u64) -> Self {
        let message = format!("too many chats started from this address: send it again in {retry_after_ms} ms");
        ErrorReply {
            retryable: true,
            retry_after_ms: Some(retry_after_ms),
            reason: "address_rate_limited",
            ..ErrorReply::new("rate_limited", message)
        }
    }
}

/// The codes an offline message may give as its `reason`: the refusals after which a chat cannot start.
pub const OFFLINE_REASONS: &[&str] = &["group_closed", "group_offline", "license_exhausted"];

impl From<RouterError> for ErrorReply {
    fn from(error: RouterError) -> Self {
        // The client gets a short message; the operator gets the detail.
        match &error {
            RouterError::Internal(detail) => tracing::error!(%detail, "request failed: internal error"),
            RouterError::Unavailable(detail) => tracing::warn!(%detail, "request failed: storage unavailable"),
            _ => {}
        }
        let retryable = error.is_retryable();
        let code = match &error {
            RouterError::Refused(refusal) => refusal.code(),
            RouterError::NotFound => "not_found",
            RouterError::UnknownAgent => "unknown_agent",
            RouterError::UnknownGroup => "unknown_group",
            RouterError::NotOwner => "not_owner",
            RouterError::Unavailable(_) => "unavailable",
            RouterError::Internal(_) => "internal",
        };
        let message = match &error {
            RouterError::Unavailable(_) | RouterError::NotOwner => {
                "the service is briefly unavailable: retry the same request".to_owned()
            }
            RouterError::Internal(_) => "internal error: the request was not carried out".to_owned(),
            other => other.to_string(),
        };
        let max_sessions = match &error {
            RouterError::Refused(Refusal::LicenseExhausted { max_sessions }) => Some(*max_sessions),
            _ => None,
        };
        ErrorReply { code, message, retryable, max_sessions, retry_after_ms: None, reason: code }
    }
}

/// A support group and its status, as `groups.list` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub id: GroupId,
    pub name: String,
    /// Open and at least one agent signed in: the group takes chats.
    pub online: bool,
    /// Within its business hours.
    pub open: bool,
    /// How many of its agents are signed in.
    pub signed_in: u32,
    /// Its waiting-time SLA: a chat waiting longer breaches it (`None`: the group has none).
    pub wait_sla_ms: Option<i64>,
}

/// The result of a request that succeeded: what its ack carries besides its `id`.
#[derive(Debug, Clone, PartialEq)]
pub enum Ack {
    Ping,
    ChatStart {
        conversation: ConversationId,
        customer_token: String,
        chat: ChatView,
        subscribed: bool,
        /// The chat was started before by a start with the same `start_key`.
        duplicate: bool,
    },
    CustomerResume {
        chat: ChatView,
    },
    AgentSignIn {
        agent: AgentView,
    },
    AgentSetStatus {
        agent: AgentView,
    },
    QueueList {
        entries: Vec<WaitingEntry>,
    },
    ChatAccept {
        chat: ChatView,
    },
    ChatSubscribe {
        chat: ChatView,
    },
    /// `followed`: the connection followed the chat until this request.
    ChatUnsubscribe {
        followed: bool,
    },
    ChatTranscript {
        chat: ChatView,
        events: Vec<Event>,
        /// The transcript goes on after the last event (it was answered a page at a time).
        more: bool,
    },
    ChatList {
        chats: Vec<ChatView>,
    },
    /// `seq` is the stored message's (the first copy's when `duplicate`).
    MessageSend {
        seq: Option<u64>,
        duplicate: bool,
    },
    /// `seq` is the stored `delivered` event's; `None` when the mark stored nothing.
    MessageDelivered {
        seq: Option<u64>,
    },
    Typing,
    /// `seq` is the `closed`/`cancelled` event's; `None` when the chat had already ended.
    ChatClose {
        seq: Option<u64>,
    },
    ChatCancel {
        seq: Option<u64>,
    },
    /// `stale`: presence could not be read; these are the statuses this gateway read last.
    GroupsList {
        groups: Vec<GroupInfo>,
        stale: bool,
    },
    OfflineMessage {
        ticket: Ticket,
    },
    OfferReject,
    ChatTransfer {
        chat: ChatView,
    },
    ChatForward {
        chat: ChatView,
    },
    AgentSignOut {
        agent: AgentView,
    },
}

impl Ack {
    /// The ack's fields besides `type` and `id`, as a JSON object.
    pub fn to_json(&self) -> Value {
        match self {
            Ack::Ping | Ack::Typing | Ack::OfferReject => json!({}),
            Ack::ChatStart { conversation, customer_token, chat, subscribed, duplicate } => json!({
                "conversation": conversation,
                "customer_token": customer_token,
                "chat": chat_json(chat),
                "subscribed": subscribed,
                "duplicate": duplicate,
            }),
            Ack::CustomerResume { chat }
            | Ack::ChatAccept { chat }
            | Ack::ChatSubscribe { chat }
            | Ack::ChatTransfer { chat }
            | Ack::ChatForward { chat } => json!({ "chat": chat_json(chat) }),
            Ack::AgentSignIn { agent } | Ack::AgentSetStatus { agent } | Ack::AgentSignOut { agent } => {
                json!({ "agent": agent_json(agent) })
            }
            Ack::GroupsList { groups, stale } => {
                let groups: Vec<Value> = groups.iter().map(group_json).collect();
                json!({ "groups": groups, "stale": stale })
            }
            Ack::OfflineMessage { ticket } => json!({
                "ticket": { "id": ticket.id, "created_at_ms": ticket.created_at_ms },
                "duplicate": ticket.duplicate,
            }),
            Ack::QueueList { entries } => json!({ "entries": entries }),
            Ack::ChatUnsubscribe { followed } => json!({ "followed": followed }),
            Ack::ChatTranscript { chat, events, more } => {
                json!({ "chat": chat_json(chat), "events": events, "more": more })
            }
            Ack::ChatList { chats } => {
                let chats: Vec<Value> = chats.iter().map(chat_json).collect();
                json!({ "chats": chats })
            }
            Ack::MessageSend { seq, duplicate } => json!({ "status": "sent", "seq": seq, "duplicate": duplicate }),
            Ack::MessageDelivered { seq } | Ack::ChatClose { seq } | Ack::ChatCancel { seq } => json!({ "seq": seq }),
        }
    }
}

/// A frame the server sends on its own, without a request id.
#[derive(Debug, Clone, PartialEq)]
pub enum PushFrame {
    /// An event of a conversation the connection follows.
    Event {
        conversation: ConversationId,
        event: Arc<Event>,
    },
    /// The other side of a followed conversation started or stopped typing.
    Typing {
        conversation: ConversationId,
        author: Author,
        typing: bool,
    },
    /// Agents: their whole waiting list.
    QueueSnapshot {
        entries: Vec<WaitingEntry>,
    },
    QueueAdded {
        entry: WaitingEntry,
    },
    QueueRemoved {
        conversation: ConversationId,
        reason: LeftQueue,
    },
    /// Customers: the 1-based place of their chat in its queue, and the estimated wait in seconds when the
    /// group has an estimate.
    QueuePosition {
        conversation: ConversationId,
        position: usize,
        estimated_wait_s: Option<u64>,
    },
    /// Agents: a waiting chat is offered to this agent until `expires_at_ms`. `waiting_since_us` (not sent
    /// to clients) is since when the chat waited for this offer, for the offer latency; 0: not a new offer.
    Offer {
        entry: WaitingEntry,
        expires_at_ms: i64,
        waiting_since_us: i64,
    },
    /// Agents: the offer ended without an accept.
    OfferEnded {
        conversation: ConversationId,
        reason: OfferEnd,
    },
    /// Agents: a chat became this agent's without an accept (forwarded to them).
    ChatAssigned {
        chat: ChatView,
    },
    /// Agents: this agent's status or chats changed.
    AgentStatus {
        agent: AgentView,
    },
}

impl PushFrame {
    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        match self {
            PushFrame::Event { conversation, event: body } => event(*conversation, body),
            PushFrame::Typing { conversation, author, typing: is_typing } => typing(*conversation, author, *is_typing),
            PushFrame::QueueSnapshot { entries } => queue_snapshot(entries),
            PushFrame::QueueAdded { entry } => queue_added(entry),
            PushFrame::QueueRemoved { conversation, reason } => queue_removed(*conversation, reason),
            PushFrame::QueuePosition { conversation, position, estimated_wait_s } => {
                queue_position(*conversation, *position, *estimated_wait_s)
            }
            PushFrame::Offer { entry, expires_at_ms, .. } => {
                json!({ "type": "offer", "entry": entry, "expires_at_ms": expires_at_ms }).to_string()
            }
            PushFrame::OfferEnded { conversation, reason } => {
                json!({ "type": "offer.ended", "conversation": conversation, "reason": reason }).to_string()
            }
            PushFrame::ChatAssigned { chat } => json!({ "type": "chat.assigned", "chat": chat_json(chat) }).to_string(),
            PushFrame::AgentStatus { agent } => {
                json!({ "type": "agent.status", "agent": agent_json(agent) }).to_string()
            }
        }
    }
}

impl Ack {
    /// The whole `ack` frame of request `id` as JSON text. A message's ack (one per message sent) is written
    /// directly, without building a [`Value`]; it is the very text the general path writes (keys sorted).
    pub fn frame(&self, id: &str) -> String {
        #[derive(serde::Serialize)]
        struct MessageSent<'a> {
            duplicate: bool,
            id: &'a str,
            seq: Option<u64>,
            status: &'static str,
            #[serde(rename = "type")]
            kind: &'static str,
        }
        match self {
            Ack::MessageSend { seq, duplicate } => {
                let frame = MessageSent { duplicate: *duplicate, id, seq: *seq, status: "sent", kind: "ack" };
                serde_json::to_string(&frame).unwrap_or_else(|_| ack(id, self.to_json()))
            }
            _ => ack(id, self.to_json()),
        }
    }
}

pub fn ack(id: &str, body: Value) -> String {
    let mut frame = json!({ "type": "ack", "id": id });
    if let (Some(frame), Value::Object(body)) = (frame.as_object_mut(), body) {
        frame.extend(body);
    }
    frame.to_string()
}

pub fn error(id: Option<&str>, reply: &ErrorReply) -> String {
    let mut frame = json!({
        "type": "error",
        "id": id,
        "code": reply.code,
        "message": reply.message,
        "retryable": reply.retryable,
    });
    if let (Some(max_sessions), Some(frame)) = (reply.max_sessions, frame.as_object_mut()) {
        frame.insert("max_sessions".into(), max_sessions.into());
    }
    if let (Some(retry_after_ms), Some(frame)) = (reply.retry_after_ms, frame.as_object_mut()) {
        frame.insert("retry_after_ms".into(), retry_after_ms.into());
    }
    frame.to_string()
}

pub fn welcome(max_message_bytes: usize) -> String {
    json!({ "type": "welcome", "protocol": PROTOCOL_VERSION, "max_message_bytes": max_message_bytes }).to_string()
}

pub fn event(conversation: ConversationId, event: &Event) -> String {
    if let EventBody::Message { body } = &event.body {
        let frame = MessageEventFrame {
            conversation,
            event: MessageEvent {
                at_ms: event.at_ms,
                author: SortedAuthor(&event.author),
                body,
                client_msg_id: event.client_msg_id.as_deref(),
                kind: "message",
                seq: event.seq,
            },
            kind: "event",
        };
        if let Ok(text) = serde_json::to_string(&frame) {
            return text;
        }
    }
    json!({ "type": "event", "conversation": conversation, "event": event }).to_string()
}

/// A message's `event` push (the most frequent frame by far), written directly instead of through a
/// [`Value`]: the same keys in the same (sorted) order as every other frame, so the very same text.
#[derive(serde::Serialize)]
struct MessageEventFrame<'a> {
    conversation: ConversationId,
    event: MessageEvent<'a>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(serde::Serialize)]
struct MessageEvent<'a> {
    at_ms: i64,
    author: SortedAuthor<'a>,
    body: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<&'a str>,
    kind: &'static str,
    seq: u64,
}

/// An [`Author`] with its keys sorted (`id` before `role`), as a [`Value`] writes it.
struct SortedAuthor<'a>(&'a Author);

impl serde::Serialize for SortedAuthor<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (id, role) = match self.0 {
            Author::Customer => (None, "customer"),
            Author::Agent(agent) => (Some(agent.as_str()), "agent"),
            Author::System => (None, "system"),
        };
        let mut map = serializer.serialize_map(Some(1 + usize::from(id.is_some())))?;
        if let Some(id) = id {
            map.serialize_entry("id", id)?;
        }
        map.serialize_entry("role", role)?;
        map.end()
    }
}

pub fn typing(conversation: ConversationId, author: &Author, typing: bool) -> String {
    json!({ "type": "typing", "conversation": conversation, "author": author, "typing": typing }).to_string()
}

pub fn queue_snapshot(entries: &[WaitingEntry]) -> String {
    json!({ "type": "queue.snapshot", "entries": entries }).to_string()
}

pub fn queue_added(entry: &WaitingEntry) -> String {
    json!({ "type": "queue.added", "entry": entry }).to_string()
}

/// A `queue.removed` frame; `group` is there only for a transfer.
pub fn queue_removed(conversation: ConversationId, reason: &LeftQueue) -> String {
    let (reason, agent, group) = match reason {
        LeftQueue::Accepted { agent } => ("accepted", Some(agent), None),
        LeftQueue::Cancelled => ("cancelled", None, None),
        LeftQueue::Abandoned => ("abandoned", None, None),
        LeftQueue::Closed => ("closed", None, None),
        LeftQueue::Transferred { to_group } => ("transferred", None, Some(to_group)),
    };
    let mut frame = json!({ "type": "queue.removed", "conversation": conversation, "reason": reason, "agent": agent });
    // Only a transfer names a group (older frames are unchanged).
    if let (Some(group), Some(frame)) = (group, frame.as_object_mut()) {
        frame.insert("group".into(), json!(group));
    }
    frame.to_string()
}

/// A `queue.position` frame; `estimated_wait_s` is left out while there is none.
pub fn queue_position(conversation: ConversationId, position: usize, estimated_wait_s: Option<u64>) -> String {
    let mut frame = json!({ "type": "queue.position", "conversation": conversation, "position": position });
    if let (Some(wait), Some(frame)) = (estimated_wait_s, frame.as_object_mut()) {
        frame.insert("estimated_wait_s".into(), wait.into());
    }
    frame.to_string()
}

/// The estimated wait of the chat at `position` (1-based) when each place takes `wait_per_position_ms`, in
/// whole seconds rounded up (a wait of a few milliseconds is 1 s, not 0).
pub fn estimated_wait_s(position: usize, wait_per_position_ms: u64) -> u64 {
    let position = u64::try_from(position).unwrap_or(u64::MAX);
    position.saturating_mul(wait_per_position_ms).div_ceil(1000)
}

/// A [`GroupInfo`] as the JSON object of `groups.list`.
pub fn group_json(group: &GroupInfo) -> Value {
    json!({
        "id": group.id,
        "name": group.name,
        "online": group.online,
        "open": group.open,
        "signed_in": group.signed_in,
        "wait_sla_ms": group.wait_sla_ms,
    })
}

pub fn chat_json(view: &ChatView) -> Value {
    json!({
        "conversation": view.conversation,
        "group": view.group,
        "state": view.state,
        "owner": view.owner,
        "customer_name": view.customer_name,
        "first_question": view.first_question,
        "created_at_ms": view.created_at_ms,
        "accepted_at_ms": view.accepted_at_ms,
        "closed_at_ms": view.closed_at_ms,
        "last_seq": view.last_seq,
        "customer_away": view.customer_away,
    })
}

pub fn agent_json(view: &AgentView) -> Value {
    json!({
        "tenant": view.tenant,
        "agent": view.agent,
        "status": view.status,
        "capacity": view.capacity,
        "groups": view.groups,
        "active": view.active,
    })
}

/// The longest request id, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// Whether a request id can be echoed: 1 to [`MAX_ID_CHARS`] characters.
pub fn is_usable_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= MAX_ID_CHARS
}

/// The error for a frame without a usable id (answered with no id).
pub fn missing_id() -> ErrorReply {
    ErrorReply::new("missing_id", "every request needs an \"id\" string of 1 to 128 characters")
}

/// Splits a raw text frame into its request id and request. A frame that is not JSON, has no string `id`,
/// or does not match a known request is refused with a code that says which.
pub fn parse(text: &str) -> Result<(String, Request), (Option<String>, ErrorReply)> {
    let mut value: Value = serde_json::from_str(text)
        .map_err(|error| (None, ErrorReply::new("bad_json", format!("the frame is not valid JSON: {error}"))))?;
    let Some(object) = value.as_object_mut() else {
        return Err((None, ErrorReply::new("bad_frame", "a frame must be a JSON object")));
    };
    let id = match object.remove("id") {
        Some(Value::String(id)) if is_usable_id(&id) => id,
        _ => return Err((None, missing_id())),
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        _ => {
            return Err((Some(id), ErrorReply::new("missing_type", "every request needs a \"type\" string")));
        }
    };
    if !REQUEST_TYPES.contains(&kind.as_str()) {
        return Err((Some(id), ErrorReply::new("unknown_type", format!("unknown request type {kind:?}"))));
    }
    match serde_json::from_value::<Request>(value) {
        Ok(request) => Ok((id, request)),
        Err(error) => Err((Some(id), ErrorReply::new("bad_request", format!("bad {kind} request: {error}")))),
    }
}

#[cfg(test)]
mod tests {
    use switchboard_domain::EventBody;

    use super::*;

    #[test]
    fn malformed_frames_get_distinct_codes() {
        assert_eq!(parse("{nope").unwrap_err().1.code, "bad_json");
        assert_eq!(parse("[1]").unwrap_err().1.code, "bad_frame");
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap_err().1.code, "missing_id");
        assert_eq!(parse(r#"{"id":"1"}"#).unwrap_err().1.code, "missing_type");
        let (id, reply) = parse(r#"{"id":"7","type":"teleport"}"#).unwrap_err();
        assert_eq!((id.as_deref(), reply.code), (Some("7"), "unknown_type"));
        let (_, reply) = parse(r#"{"id":"8","type":"chat.accept","conversation":"x"}"#).unwrap_err();
        assert_eq!(reply.code, "bad_request");
        let (_, reply) = parse(r#"{"id":"9","type":"ping","extra":1}"#).unwrap_err();
        assert_eq!(reply.code, "bad_request");
        // A bad value of a known type's field is a bad request, not an unknown type.
        let (_, reply) = parse(r#"{"id":"10","type":"agent.set_status","status":"busy"}"#).unwrap_err();
        assert_eq!(reply.code, "bad_request");
    }

    #[test]
    fn a_good_frame_parses_with_its_id() {
        let (id, request) = parse(r#"{"id":"r1","type":"agent.sign_in","token":"t"}"#).unwrap();
        assert_eq!(id, "r1");
        assert!(matches!(request, Request::AgentSignIn { token } if token == "t"));
    }

    fn conversation() -> ConversationId {
        ConversationId::parse("01900000-0000-7000-8000-000000000001").unwrap()
    }

    #[test]
    fn the_new_requests_parse_with_their_fields() {
        let chat = conversation();
        let parsed = |text: &str| parse(text).map(|(_, request)| request).map_err(|(_, error)| error.code);
        assert!(matches!(
            parsed(r#"{"id":"1","type":"groups.list","widget_key":"w"}"#),
            Ok(Request::GroupsList { widget_key: Some(key) }) if key == "w"
        ));
        assert!(matches!(parsed(r#"{"id":"1","type":"groups.list"}"#), Ok(Request::GroupsList { widget_key: None })));
        let offline = r#"{"id":"2","type":"offline.message","widget_key":"w","group":"sales","name":"Dana",
            "contact":"dana@example.com","body":"Call me","reason":"group_closed","idempotency_key":"k1"}"#;
        let Ok(Request::OfflineMessage { widget_key, group, name, contact, body, reason, idempotency_key }) =
            parsed(offline)
        else {
            panic!("an offline message");
        };
        assert_eq!(
            [widget_key, group, name, contact, body, reason, idempotency_key],
            ["w", "sales", "Dana", "dana@example.com", "Call me", "group_closed", "k1"]
        );
        let text = format!(r#"{{"id":"3","type":"offer.reject","conversation":"{chat}"}}"#);
        assert!(matches!(parsed(&text), Ok(Request::OfferReject { conversation }) if conversation == chat));
        let text = format!(r#"{{"id":"4","type":"chat.transfer","conversation":"{chat}","group":"support"}}"#);
        assert!(matches!(
            parsed(&text),
            Ok(Request::ChatTransfer { conversation, group }) if conversation == chat && group == "support"
        ));
        let text = format!(r#"{{"id":"5","type":"chat.forward","conversation":"{chat}","agent":"bob"}}"#);
        assert!(matches!(
            parsed(&text),
            Ok(Request::ChatForward { conversation, agent }) if conversation == chat && agent == "bob"
        ));
        assert!(matches!(parsed(r#"{"id":"6","type":"agent.sign_out"}"#), Ok(Request::AgentSignOut {})));
    }

    #[test]
    fn bad_fields_of_the_new_requests_are_bad_requests() {
        let code = |text: &str| parse(text).unwrap_err().1.code;
        for text in [
            r#"{"id":"1","type":"groups.list","widget_key":7}"#,
            r#"{"id":"1","type":"groups.list","group":"sales"}"#,
            r#"{"id":"2","type":"offline.message","widget_key":"w","group":"sales","name":"Dana"}"#,
            r#"{"id":"3","type":"offer.reject","conversation":"not-a-uuid"}"#,
            r#"{"id":"3","type":"offer.reject"}"#,
            r#"{"id":"4","type":"chat.transfer","conversation":"01900000-0000-7000-8000-000000000001"}"#,
            r#"{"id":"5","type":"chat.forward","conversation":"01900000-0000-7000-8000-000000000001","agent":1}"#,
            r#"{"id":"6","type":"agent.sign_out","now":true}"#,
        ] {
            assert_eq!(code(text), "bad_request", "{text}");
        }
    }

    fn json_of(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    fn entry() -> WaitingEntry {
        WaitingEntry {
            conversation: conversation(),
            group: GroupId::new("sales").unwrap(),
            queued_at_ms: 10,
            customer_name: "Dana".into(),
            question: "Hello?".into(),
        }
    }

    fn agent_view() -> AgentView {
        AgentView {
            tenant: switchboard_domain::TenantId::new("acme").unwrap(),
            agent: switchboard_domain::AgentId::new("alice").unwrap(),
            status: AgentStatus::Offline,
            capacity: 3,
            groups: vec![GroupId::new("sales").unwrap()],
            active: vec![],
        }
    }

    fn chat_view() -> ChatView {
        ChatView {
            conversation: conversation(),
            tenant: switchboard_domain::TenantId::new("acme").unwrap(),
            group: GroupId::new("support").unwrap(),
            state: switchboard_domain::ConversationState::Queued,
            owner: None,
            customer_name: "Dana".into(),
            first_question: "Hello?".into(),
            created_at_ms: 5,
            accepted_at_ms: None,
            closed_at_ms: None,
            last_seq: 4,
            customer_away: false,
        }
    }

    #[test]
    fn the_new_acks_serialize_with_their_fields() {
        let groups = vec![GroupInfo {
            id: GroupId::new("sales").unwrap(),
            name: "Sales".into(),
            online: true,
            open: true,
            signed_in: 2,
            wait_sla_ms: Some(60_000),
        }];
        assert_eq!(
            Ack::GroupsList { groups, stale: false }.to_json(),
            json!({ "groups": [{ "id": "sales", "name": "Sales", "online": true, "open": true, "signed_in": 2,
                                 "wait_sla_ms": 60_000 }],
                    "stale": false })
        );
        let ticket = Ticket { id: "t-1".into(), created_at_ms: 77, duplicate: true };
        assert_eq!(
            Ack::OfflineMessage { ticket }.to_json(),
            json!({ "ticket": { "id": "t-1", "created_at_ms": 77 }, "duplicate": true })
        );
        assert_eq!(Ack::OfferReject.to_json(), json!({}));
        assert_eq!(Ack::ChatTransfer { chat: chat_view() }.to_json(), json!({ "chat": chat_json(&chat_view()) }));
        assert_eq!(Ack::ChatForward { chat: chat_view() }.to_json(), json!({ "chat": chat_json(&chat_view()) }));
        assert_eq!(Ack::AgentSignOut { agent: agent_view() }.to_json(), json!({ "agent": agent_json(&agent_view()) }));
        assert_eq!(agent_json(&agent_view())["status"], "offline");
    }

    #[test]
    fn the_new_pushes_serialize_with_their_fields() {
        let chat = conversation();
        let frame = |push: PushFrame| json_of(&push.to_json());
        assert_eq!(
            frame(PushFrame::Offer { entry: entry(), expires_at_ms: 1_000, waiting_since_us: 5 }),
            json!({ "type": "offer", "entry": entry(), "expires_at_ms": 1_000 })
        );
        assert_eq!(
            frame(PushFrame::OfferEnded { conversation: chat, reason: OfferEnd::TimedOut }),
            json!({ "type": "offer.ended", "conversation": chat, "reason": "timed_out" })
        );
        assert_eq!(
            frame(PushFrame::ChatAssigned { chat: chat_view() }),
            json!({ "type": "chat.assigned", "chat": chat_json(&chat_view()) })
        );
        assert_eq!(
            frame(PushFrame::AgentStatus { agent: agent_view() }),
            json!({ "type": "agent.status", "agent": agent_json(&agent_view()) })
        );
        // The estimated wait is there only while the group has an estimate.
        assert_eq!(
            frame(PushFrame::QueuePosition { conversation: chat, position: 3, estimated_wait_s: Some(135) }),
            json!({ "type": "queue.position", "conversation": chat, "position": 3, "estimated_wait_s": 135 })
        );
        assert_eq!(
            frame(PushFrame::QueuePosition { conversation: chat, position: 3, estimated_wait_s: None }),
            json!({ "type": "queue.position", "conversation": chat, "position": 3 })
        );
        // A transfer names its group; the other reasons are as before.
        let to_group = GroupId::new("support").unwrap();
        assert_eq!(
            frame(PushFrame::QueueRemoved { conversation: chat, reason: LeftQueue::Transferred { to_group } }),
            json!({ "type": "queue.removed", "conversation": chat, "reason": "transferred", "agent": null,
                    "group": "support" })
        );
        assert_eq!(
            frame(PushFrame::QueueRemoved { conversation: chat, reason: LeftQueue::Cancelled }),
            json!({ "type": "queue.removed", "conversation": chat, "reason": "cancelled", "agent": null })
        );
    }

    #[test]
    fn the_new_events_are_their_serde_form() {
        let body = EventBody::Transferred { from_agent: None, to_group: GroupId::new("support").unwrap() };
        let event = Event { seq: 5, at_ms: 9, author: Author::System, client_msg_id: None, body };
        assert_eq!(
            json_of(&PushFrame::Event { conversation: conversation(), event: Arc::new(event) }.to_json())["event"],
            json!({ "seq": 5, "at_ms": 9, "author": { "role": "system" }, "kind": "transferred", "to_group": "support" })
        );
    }

    #[test]
    fn a_license_refusal_says_the_limit_and_other_errors_are_unchanged() {
        let reply = ErrorReply::from(RouterError::Refused(Refusal::LicenseExhausted { max_sessions: 500 }));
        assert_eq!((reply.code, reply.retryable, reply.max_sessions), ("license_exhausted", false, Some(500)));
        let frame = json_of(&error(Some("r1"), &reply));
        assert_eq!(frame["max_sessions"], 500);
        assert_eq!(frame["code"], "license_exhausted");
        let closed = ErrorReply::from(RouterError::Refused(Refusal::GroupClosed));
        assert_eq!(closed.code, "group_closed");
        let frame = json_of(&error(Some("r2"), &closed));
        assert_eq!(
            frame.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["code", "id", "message", "retryable", "type"],
            "no extra field"
        );
    }

    #[test]
    fn the_estimated_wait_rounds_up_to_whole_seconds() {
        assert_eq!(estimated_wait_s(1, 30_000), 30);
        assert_eq!(estimated_wait_s(3, 45_500), 137);
        assert_eq!(estimated_wait_s(1, 1), 1);
        assert_eq!(estimated_wait_s(2, 0), 0);
        assert_eq!(estimated_wait_s(usize::MAX, u64::MAX), u64::MAX.div_ceil(1000));
    }

    #[test]
    fn a_message_event_is_written_as_the_general_path_writes_it() {
        let agent = switchboard_domain::AgentId::new("alice").unwrap();
        for author in [Author::Customer, Author::Agent(agent), Author::System] {
            for client_msg_id in [None, Some("m-\"1\"\u{e9}".to_owned())] {
                let event = Event {
                    seq: 42,
                    at_ms: -3,
                    author: author.clone(),
                    client_msg_id,
                    body: EventBody::Message { body: "Hello \"there\"\n\u{1F600} <b>".into() },
                };
                let general = json!({ "type": "event", "conversation": conversation(), "event": &event }).to_string();
                assert_eq!(super::event(conversation(), &event), general);
            }
        }
    }

    #[test]
    fn a_message_ack_is_written_as_the_general_path_writes_it() {
        for (seq, duplicate) in [(Some(7), false), (Some(7), true), (None, true)] {
            let sent = Ack::MessageSend { seq, duplicate };
            assert_eq!(sent.frame("r\"9"), ack("r\"9", sent.to_json()));
        }
        assert_eq!(Ack::MessageDelivered { seq: Some(3) }.frame("r1"), ack("r1", json!({ "seq": 3 })));
    }

    #[test]
    fn acks_carry_the_request_id_and_the_body() {
        let frame: Value = serde_json::from_str(&ack("r2", json!({ "seq": 4 }))).unwrap();
        assert_eq!(frame, json!({ "type": "ack", "id": "r2", "seq": 4 }));
    }
}
