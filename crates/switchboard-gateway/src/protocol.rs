//! The public WebSocket protocol, version 1: JSON text frames. `docs/protocol.md` documents every frame.
//!
//! Every client frame has a `type` and an `id` chosen by the client; the server answers each with an `ack`
//! or an `error` frame carrying the same `id`. Frames the server pushes on its own (events, queue changes,
//! typing) have no `id`.

use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_domain::{AgentStatus, ConversationId, Event, WaitingEntry};
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

pub fn typing(conversation: ConversationId, author: &switchboard_domain::Author, typing: bool) -> String {
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

/// Splits a raw text frame into its request id and request. A frame that is not JSON, has no string `id`,
/// or does not match a known request is refused with a code that says which.
pub fn parse(text: &str) -> Result<(String, Request), (Option<String>, ErrorReply)> {
    let mut value: Value = serde_json::from_str(text)
        .map_err(|error| (None, ErrorReply::new("bad_json", format!("the frame is not valid JSON: {error}"))))?;
    let Some(object) = value.as_object_mut() else {
        return Err((None, ErrorReply::new("bad_frame", "a frame must be a JSON object")));
    };
    let id = match object.remove("id") {
        Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= 128 => id,
        _ => {
            return Err((
                None,
                ErrorReply::new("missing_id", "every request needs an \"id\" string of 1 to 128 characters"),
            ));
        }
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
