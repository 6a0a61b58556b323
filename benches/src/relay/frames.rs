//! The JSON frames of the bare relay: the shapes of `docs/protocol.md` (fields in alphabetical order, as the
//! real server writes them), read and written with plain serde, without the gateway's validation.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

/// Any client request, flat: every field a request of the supported subset may have. Unknown fields are
/// ignored (the real server refuses them; the relay checks nothing it does not need).
#[derive(Debug, Default, Deserialize)]
pub struct Request {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub id: Option<String>,
    pub widget_key: Option<String>,
    pub group: Option<String>,
    pub name: Option<String>,
    pub question: Option<String>,
    pub token: Option<String>,
    pub status: Option<String>,
    pub conversation: Option<Uuid>,
    pub client_msg_id: Option<String>,
    pub body: Option<String>,
    pub up_to_seq: Option<u64>,
    pub typing: Option<bool>,
}

/// `{"role":"customer"}` or `{"id":…,"role":"agent"}`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AuthorJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    pub role: &'static str,
}

impl<'a> AuthorJson<'a> {
    pub const CUSTOMER: AuthorJson<'static> = AuthorJson { id: None, role: "customer" };
    pub const SYSTEM: AuthorJson<'static> = AuthorJson { id: None, role: "system" };

    pub fn agent(id: &'a str) -> Self {
        AuthorJson { id: Some(id), role: "agent" }
    }
}

/// A conversation event: the common fields and those of its kind, at the same level.
#[derive(Debug, Serialize)]
pub struct EventJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<&'a str>,
    pub at_ms: i64,
    pub author: AuthorJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<&'a str>,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question: Option<&'a str>,
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub up_to_seq: Option<u64>,
}

impl<'a> EventJson<'a> {
    /// An event of `kind` with none of the optional fields.
    pub fn new(kind: &'static str, seq: u64, at_ms: i64, author: AuthorJson<'a>) -> Self {
        EventJson {
            agent: None,
            at_ms,
            author,
            body: None,
            client_msg_id: None,
            customer_name: None,
            group: None,
            kind,
            question: None,
            seq,
            up_to_seq: None,
        }
    }
}

#[derive(Serialize)]
struct EventFrame<'a> {
    conversation: Uuid,
    event: &'a EventJson<'a>,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// An `event` push.
pub fn event(conversation: Uuid, event: &EventJson<'_>) -> String {
    to_text(&EventFrame { conversation, event, kind: "event" })
}

#[derive(Serialize)]
struct SendAck<'a> {
    duplicate: bool,
    id: &'a str,
    seq: u64,
    status: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The ack of a `message.send` (the relay stores nothing, so nothing is ever a duplicate).
pub fn send_ack(id: &str, seq: u64) -> String {
    to_text(&SendAck { duplicate: false, id, seq, status: "sent", kind: "ack" })
}

/// An ack with the request's result fields (an object) beside `type` and `id`.
pub fn ack(id: &str, mut body: Value) -> String {
    if let Some(fields) = body.as_object_mut() {
        fields.insert("type".into(), "ack".into());
        fields.insert("id".into(), id.into());
    }
    body.to_string()
}

/// An error frame; `id` is `null` for a frame without a usable id.
pub fn error(id: Option<&str>, code: &str, message: &str) -> String {
    json!({ "type": "error", "id": id, "code": code, "message": message, "retryable": false }).to_string()
}

pub fn welcome(max_message_bytes: usize) -> String {
    json!({ "type": "welcome", "protocol": 1, "max_message_bytes": max_message_bytes }).to_string()
}

/// What the relay keeps of a chat to answer with a Chat object (`docs/protocol.md`, section 3.3).
#[derive(Debug, Clone)]
pub struct ChatFacts {
    pub group: String,
    pub customer_name: String,
    pub question: String,
    pub created_at_ms: i64,
    pub accepted_at_ms: Option<i64>,
    pub owner: Option<String>,
    pub last_seq: u64,
}

pub fn chat_json(conversation: Uuid, chat: &ChatFacts) -> Value {
    json!({
        "conversation": conversation,
        "group": chat.group,
        "state": if chat.owner.is_some() { "active" } else { "queued" },
        "owner": chat.owner,
        "customer_name": chat.customer_name,
        "first_question": chat.question,
        "created_at_ms": chat.created_at_ms,
        "accepted_at_ms": chat.accepted_at_ms,
        "closed_at_ms": null,
        "last_seq": chat.last_seq,
    })
}

pub fn agent_json(tenant: &str, agent: &str, status: &str, capacity: u32, groups: &[String], active: &[Uuid]) -> Value {
    json!({
        "tenant": tenant,
        "agent": agent,
        "status": status,
        "capacity": capacity,
        "groups": groups,
        "active": active,
    })
}

fn to_text<T: Serialize>(value: &T) -> String {
    // Serializing these structs (strings, numbers, a UUID) cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_event_has_the_documented_shape() {
        let conversation = Uuid::from_u128(7);
        let mut message = EventJson::new("message", 4, 1_767_225_600_000, AuthorJson::agent("alice"));
        message.body = Some("Hi Dana! Yes, we do.");
        message.client_msg_id = Some("alice-msg-1");
        let expected = json!({
            "conversation": conversation,
            "event": {
                "at_ms": 1_767_225_600_000_i64,
                "author": { "id": "alice", "role": "agent" },
                "body": "Hi Dana! Yes, we do.",
                "client_msg_id": "alice-msg-1",
                "kind": "message",
                "seq": 4
            },
            "type": "event"
        });
        assert_eq!(event(conversation, &message), expected.to_string());
    }

    #[test]
    fn acks_carry_type_and_id_beside_their_fields() {
        assert_eq!(send_ack("r1", 5), r#"{"duplicate":false,"id":"r1","seq":5,"status":"sent","type":"ack"}"#);
        assert_eq!(ack("r2", json!({})), r#"{"id":"r2","type":"ack"}"#);
        assert_eq!(ack("r3", json!({ "seq": null })), r#"{"id":"r3","seq":null,"type":"ack"}"#);
    }
}
