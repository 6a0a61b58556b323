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
use switchboard_domain::{AgentStatus, Author, ConversationId, Event, WaitingEntry};
use switchboard_proto::router::{AgentView, ChatView, LeftQueue, RouterError};

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
    "chat.transcript",
    "chat.list",
    "message.send",
    "message.delivered",
    "typing",
    "chat.close",
    "chat.cancel",
    "ping",
];

/// A frame from a client, after its `id` was taken out.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Request {
    #[serde(rename = "chat.start")]
    ChatStart { widget_key: String, group: String, name: String, question: String },
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
}

impl ErrorReply {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ErrorReply { code, message: message.into(), retryable: false }
    }
}

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
        ErrorReply { code, message, retryable }
    }
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
    ChatTranscript {
        chat: ChatView,
        events: Vec<Event>,
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
}

impl Ack {
    /// The ack's fields besides `type` and `id`, as a JSON object.
    pub fn to_json(&self) -> Value {
        match self {
            Ack::Ping | Ack::Typing => json!({}),
            Ack::ChatStart { conversation, customer_token, chat, subscribed } => json!({
                "conversation": conversation,
                "customer_token": customer_token,
                "chat": chat_json(chat),
                "subscribed": subscribed,
            }),
            Ack::CustomerResume { chat } | Ack::ChatAccept { chat } | Ack::ChatSubscribe { chat } => {
                json!({ "chat": chat_json(chat) })
            }
            Ack::AgentSignIn { agent } | Ack::AgentSetStatus { agent } => json!({ "agent": agent_json(agent) }),
            Ack::QueueList { entries } => json!({ "entries": entries }),
            Ack::ChatTranscript { chat, events } => json!({ "chat": chat_json(chat), "events": events }),
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
    /// Customers: the 1-based place of their chat in its queue.
    QueuePosition {
        conversation: ConversationId,
        position: usize,
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
            PushFrame::QueuePosition { conversation, position } => queue_position(*conversation, *position),
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
    json!({
        "type": "error",
        "id": id,
        "code": reply.code,
        "message": reply.message,
        "retryable": reply.retryable,
    })
    .to_string()
}

pub fn welcome(max_message_bytes: usize) -> String {
    json!({ "type": "welcome", "protocol": PROTOCOL_VERSION, "max_message_bytes": max_message_bytes }).to_string()
}

pub fn event(conversation: ConversationId, event: &Event) -> String {
    json!({ "type": "event", "conversation": conversation, "event": event }).to_string()
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

pub fn queue_removed(conversation: ConversationId, reason: &LeftQueue) -> String {
    let (reason, agent) = match reason {
        LeftQueue::Accepted { agent } => ("accepted", Some(agent)),
        LeftQueue::Cancelled => ("cancelled", None),
        LeftQueue::Closed => ("closed", None),
    };
    json!({ "type": "queue.removed", "conversation": conversation, "reason": reason, "agent": agent }).to_string()
}

pub fn queue_position(conversation: ConversationId, position: usize) -> String {
    json!({ "type": "queue.position", "conversation": conversation, "position": position }).to_string()
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

    #[test]
    fn acks_carry_the_request_id_and_the_body() {
        let frame: Value = serde_json::from_str(&ack("r2", json!({ "seq": 4 }))).unwrap();
        assert_eq!(frame, json!({ "type": "ack", "id": "r2", "seq": 4 }));
    }
}
