//! One socket of the bare relay: the welcome frame, then requests (each answered by one frame, and the frames
//! it causes on this socket written after it) and the pushes queued for it, until it closes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use serde_json::json;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::relay::frames::{self, AuthorJson, ChatFacts, EventJson, Request};
use crate::relay::{Chat, Link, Relay, next_socket_id, now_ms};

/// Close code for a client too slow to read what it is sent (as the gateway's).
const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// How long the close frame may wait for a client that does not read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ID_BYTES: usize = 128;

/// A refusal: the error code and its message.
type Refusal = (&'static str, String);
/// The frames to write in answer to a request: its ack first.
type Reply = Result<Vec<String>, Refusal>;

#[derive(Debug)]
enum Role {
    None,
    Customer { conversation: Uuid },
    Agent { agent: String, status: &'static str, active: Vec<Uuid> },
}

struct Session {
    relay: Arc<Relay>,
    link: Link,
    role: Role,
    /// The conversations this socket follows (it is among their followers).
    following: Vec<Uuid>,
}

pub(crate) async fn run(relay: Arc<Relay>, mut socket: WebSocket) {
    let (outbound, mut queued) = mpsc::channel(relay.settings.outbound_queue_len);
    let kicked = Arc::new(Notify::new());
    let link = Link { socket: next_socket_id(&relay), outbound, kicked: kicked.clone() };
    let welcome = frames::welcome(relay.settings.max_message_bytes);
    let mut session = Session { relay, link, role: Role::None, following: Vec::new() };
    if socket.send(Message::Text(welcome.into())).await.is_err() {
        return;
    }
    let slow = loop {
        let written = tokio::select! {
            frame = socket.recv() => match frame {
                Some(Ok(Message::Text(text))) => write_all(&mut socket, session.handle(text.as_str())).await,
                Some(Ok(Message::Binary(_))) => {
                    let refused = frames::error(None, "bad_frame", "binary frames are not supported: send JSON text");
                    socket.send(Message::Text(refused.into())).await.is_ok()
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => true,
                Some(Ok(Message::Close(_)) | Err(_)) | None => false,
            },
            Some(text) = queued.recv() => socket.send(Message::Text(text)).await.is_ok(),
            () = kicked.notified() => break true,
        };
        if !written {
            break false;
        }
    };
    session.end();
    if slow {
        let reason = "too slow to read: reconnect and resume from your last seq";
        let close = Message::Close(Some(CloseFrame { code: CLOSE_SLOW_CONSUMER, reason: reason.into() }));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(close)).await;
    }
}

async fn write_all(socket: &mut WebSocket, texts: Vec<String>) -> bool {
    for text in texts {
        if socket.send(Message::Text(text.into())).await.is_err() {
            return false;
        }
    }
    true
}

fn refusal(code: &'static str, message: &str) -> Refusal {
    (code, message.to_owned())
}

fn missing(field: &str) -> Refusal {
    ("bad_request", format!("{field} is missing"))
}

impl Session {
    fn handle(&mut self, text: &str) -> Vec<String> {
        let Ok(mut request) = serde_json::from_str::<Request>(text) else {
            return vec![frames::error(None, "bad_json", "the frame is not a JSON object of known field types")];
        };
        let Some(id) = request.id.clone().filter(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES) else {
            return vec![frames::error(None, "missing_id", "a request needs an id string of 1 to 128 bytes")];
        };
        let kind = request.kind.take();
        let reply = match kind.as_deref() {
            None => Err(refusal("missing_type", "a request needs a type")),
            Some("ping") => Ok(vec![frames::ack(&id, json!({}))]),
            Some("groups.list") => self.groups_list(&id, &request),
            Some("agent.sign_in") => self.sign_in(&id, &request),
            Some("agent.set_status" | "agent.status") => self.set_status(&id, &request),
            Some("queue.list") => self.agent().map(|_| vec![frames::ack(&id, json!({ "entries": [] }))]),
            Some("chat.list") => self.agent().map(|_| vec![frames::ack(&id, json!({ "chats": [] }))]),
            Some("chat.start") => self.start(&id, request),
            Some("chat.accept") => self.accept(&id, &request),
            Some("message.send") => self.send(&id, &request),
            Some("message.delivered") => self.delivered(&id, &request),
            Some("typing") => self.typing(&id, &request),
            Some("chat.close") => self.close(&id, &request),
            Some(_) => Err(refusal("unknown_type", "this relay does not know this request type")),
        };
        reply.unwrap_or_else(|(code, message)| vec![frames::error(Some(&id), code, &message)])
    }

    fn agent(&self) -> Result<&str, Refusal> {
        match &self.role {
            Role::Agent { agent, .. } => Ok(agent),
            Role::Customer { .. } => Err(refusal("forbidden", "only agents may make this request")),
            Role::None => Err(refusal("not_signed_in", "sign in or start a chat first")),
        }
    }

    /// This socket as the author of an event of `conversation`, and its side (0 customer, 1 agent).
    fn author(&self, conversation: Uuid) -> Result<(usize, AuthorJson<'_>), Refusal> {
        match &self.role {
            Role::Customer { conversation: own } if *own == conversation => Ok((0, AuthorJson::CUSTOMER)),
            Role::Customer { .. } => Err(refusal("not_found", "no such conversation")),
            Role::Agent { agent, .. } => Ok((1, AuthorJson::agent(agent))),
            Role::None => Err(refusal("not_signed_in", "sign in or start a chat first")),
        }
    }

    fn agent_json(&self) -> serde_json::Value {
        let settings = &self.relay.settings;
        match &self.role {
            Role::Agent { agent, status, active } => {
                frames::agent_json(&settings.tenant, agent, status, settings.agent_capacity, &settings.groups, active)
            }
            _ => serde_json::Value::Null,
        }
    }

    fn groups_list(&self, id: &str, request: &Request) -> Reply {
        if matches!(self.role, Role::None) && request.widget_key.is_none() {
            return Err(refusal("not_signed_in", "give a widget_key, or sign in first"));
        }
        let signed_in = self.relay.n_agents.load(Ordering::Relaxed);
        let groups: Vec<_> = self
            .relay
            .settings
            .groups
            .iter()
            .map(|group| json!({ "id": group, "name": group, "online": signed_in > 0, "open": true, "signed_in": signed_in }))
            .collect();
        Ok(vec![frames::ack(id, json!({ "groups": groups, "stale": false }))])
    }

    fn sign_in(&mut self, id: &str, request: &Request) -> Reply {
        if !matches!(self.role, Role::None) {
            return Err(refusal("already_signed_in", "this connection already has a role: open another one"));
        }
        let token = request
            .token
            .as_deref()
            .filter(|token| !token.is_empty())
            .ok_or_else(|| refusal("unauthorized", "no token"))?;
        let agent = match token.strip_prefix(self.relay.settings.agent_token_prefix.as_str()) {
            Some(n) => format!("a{n}"),
            None => token.to_owned(),
        };
        self.role = Role::Agent { agent, status: "online", active: Vec::new() };
        self.relay.n_agents.fetch_add(1, Ordering::Relaxed);
        let snapshot = json!({ "type": "queue.snapshot", "entries": [] }).to_string();
        Ok(vec![frames::ack(id, json!({ "agent": self.agent_json() })), snapshot])
    }

    fn set_status(&mut self, id: &str, request: &Request) -> Reply {
        let wanted = match request.status.as_deref() {
            Some("online") => "online",
            Some("away") => "away",
            Some(_) => return Err(refusal("bad_request", "status is online or away")),
            None => return Err(missing("status")),
        };
        self.agent()?;
        if let Role::Agent { status, .. } = &mut self.role {
            *status = wanted;
        }
        Ok(vec![frames::ack(id, json!({ "agent": self.agent_json() }))])
    }

    fn start(&mut self, id: &str, request: Request) -> Reply {
        if !matches!(self.role, Role::None) {
            return Err(refusal("already_signed_in", "this connection already has a role: open another one"));
        }
        request.widget_key.as_ref().ok_or_else(|| missing("widget_key"))?;
        let group = request.group.ok_or_else(|| missing("group"))?;
        let customer_name = request.name.ok_or_else(|| missing("name"))?;
        let question = request.question.ok_or_else(|| missing("question"))?;
        self.check_body(&question)?;
        let conversation = Uuid::new_v4();
        let customer_token = Uuid::new_v4().simple().to_string();
        let created_at_ms = now_ms();
        let facts =
            ChatFacts { group, customer_name, question, created_at_ms, accepted_at_ms: None, owner: None, last_seq: 2 };
        let ack = frames::ack(
            id,
            json!({
                "chat": frames::chat_json(conversation, &facts),
                "conversation": conversation,
                "customer_token": customer_token,
                "duplicate": false,
                "subscribed": true,
            }),
        );
        let mut replies = vec![ack];
        replies.extend(first_events(conversation, &facts));
        replies.push(json!({ "type": "queue.position", "conversation": conversation, "position": 1 }).to_string());
        let chat = Chat { facts, followers: vec![self.link.clone()], delivered_marks: [0, 0] };
        self.relay.shard(conversation).insert(conversation, chat);
        self.role = Role::Customer { conversation };
        self.following.push(conversation);
        Ok(replies)
    }

    fn accept(&mut self, id: &str, request: &Request) -> Reply {
        let agent = self.agent()?.to_owned();
        let conversation = request.conversation.ok_or_else(|| missing("conversation"))?;
        let mut shard = self.relay.shard(conversation);
        let chat = shard.get_mut(&conversation).ok_or_else(|| refusal("not_found", "no such conversation"))?;
        match chat.facts.owner.as_deref() {
            Some(owner) if owner == agent => {
                return Ok(vec![frames::ack(id, json!({ "chat": frames::chat_json(conversation, &chat.facts) }))]);
            }
            Some(_) => return Err(refusal("chat_taken", "this chat was already accepted by another agent")),
            None => {}
        }
        let at_ms = now_ms();
        chat.facts.last_seq += 1;
        chat.facts.owner = Some(agent.clone());
        chat.facts.accepted_at_ms = Some(at_ms);
        let mut accepted = EventJson::new("accepted", chat.facts.last_seq, at_ms, AuthorJson::agent(&agent));
        accepted.agent = Some(&agent);
        let accepted = frames::event(conversation, &accepted);
        chat.push(&Utf8Bytes::from(accepted.clone()));
        chat.followers.push(self.link.clone());
        // The events this socket was not written yet, after the ack: the relay keeps no log, only the first two.
        let mut replies = vec![frames::ack(id, json!({ "chat": frames::chat_json(conversation, &chat.facts) }))];
        replies.extend(first_events(conversation, &chat.facts));
        replies.push(accepted);
        drop(shard);
        if let Role::Agent { active, .. } = &mut self.role {
            active.push(conversation);
        }
        self.following.push(conversation);
        Ok(replies)
    }

    fn send(&mut self, id: &str, request: &Request) -> Reply {
        let conversation = request.conversation.ok_or_else(|| missing("conversation"))?;
        let client_msg_id = request.client_msg_id.as_deref().ok_or_else(|| missing("client_msg_id"))?;
        let body = request.body.as_deref().ok_or_else(|| missing("body"))?;
        self.check_body(body)?;
        let (_, author) = self.author(conversation)?;
        let mut shard = self.relay.shard(conversation);
        let chat = shard.get_mut(&conversation).ok_or_else(|| refusal("not_found", "no such conversation"))?;
        check_participant(chat, author)?;
        chat.facts.last_seq += 1;
        let seq = chat.facts.last_seq;
        let mut message = EventJson::new("message", seq, now_ms(), author);
        message.body = Some(body);
        message.client_msg_id = Some(client_msg_id);
        // Pushed under the lock, so that every socket gets the conversation's events in seq order.
        chat.push(&frames::event(conversation, &message).into());
        Ok(vec![frames::send_ack(id, seq)])
    }

    fn delivered(&mut self, id: &str, request: &Request) -> Reply {
        let conversation = request.conversation.ok_or_else(|| missing("conversation"))?;
        let up_to_seq = request.up_to_seq.ok_or_else(|| missing("up_to_seq"))?;
        let (side, author) = self.author(conversation)?;
        let mut shard = self.relay.shard(conversation);
        let chat = shard.get_mut(&conversation).ok_or_else(|| refusal("not_found", "no such conversation"))?;
        check_participant(chat, author)?;
        if up_to_seq > chat.facts.last_seq {
            return Err(refusal("bad_delivery_mark", "up_to_seq is beyond the last seq of the conversation"));
        }
        if up_to_seq <= chat.delivered_marks[side] {
            return Ok(vec![frames::ack(id, json!({ "seq": null }))]);
        }
        chat.delivered_marks[side] = up_to_seq;
        chat.facts.last_seq += 1;
        let seq = chat.facts.last_seq;
        let mut delivered = EventJson::new("delivered", seq, now_ms(), author);
        delivered.up_to_seq = Some(up_to_seq);
        chat.push(&frames::event(conversation, &delivered).into());
        Ok(vec![frames::ack(id, json!({ "seq": seq }))])
    }

    fn typing(&mut self, id: &str, request: &Request) -> Reply {
        let conversation = request.conversation.ok_or_else(|| missing("conversation"))?;
        let typing = request.typing.ok_or_else(|| missing("typing"))?;
        let (_, author) = self.author(conversation)?;
        let mut shard = self.relay.shard(conversation);
        let chat = shard.get_mut(&conversation).ok_or_else(|| refusal("not_found", "no such conversation"))?;
        check_participant(chat, author)?;
        let frame = json!({ "type": "typing", "conversation": conversation, "author": author, "typing": typing });
        let text = Utf8Bytes::from(frame.to_string());
        let own = self.link.socket;
        chat.followers.iter().filter(|link| link.socket != own).for_each(|link| {
            link.push(text.clone());
        });
        Ok(vec![frames::ack(id, json!({}))])
    }

    fn close(&mut self, id: &str, request: &Request) -> Reply {
        let conversation = request.conversation.ok_or_else(|| missing("conversation"))?;
        let (_, author) = self.author(conversation)?;
        let mut shard = self.relay.shard(conversation);
        let chat = shard.get_mut(&conversation).ok_or_else(|| refusal("not_found", "no such conversation"))?;
        check_participant(chat, author)?;
        // The chat is forgotten once it ends: the relay keeps nothing.
        let Some(mut chat) = shard.remove(&conversation) else {
            return Err(refusal("not_found", "no such conversation"));
        };
        drop(shard);
        let kind = if chat.facts.owner.is_some() { "closed" } else { "cancelled" };
        let seq = chat.facts.last_seq + 1;
        chat.push(&frames::event(conversation, &EventJson::new(kind, seq, now_ms(), author)).into());
        if let Role::Agent { active, .. } = &mut self.role {
            active.retain(|held| *held != conversation);
        }
        Ok(vec![frames::ack(id, json!({ "seq": seq }))])
    }

    fn check_body(&self, body: &str) -> Result<(), Refusal> {
        if body.len() > self.relay.settings.max_message_bytes {
            return Err(refusal("message_too_large", "the message is longer than max_message_bytes"));
        }
        if body.trim().is_empty() {
            return Err(refusal("empty_message", "the message is empty"));
        }
        Ok(())
    }

    /// Leaves every conversation followed.
    fn end(&mut self) {
        for conversation in self.following.drain(..) {
            if let Some(chat) = self.relay.shard(conversation).get_mut(&conversation) {
                chat.followers.retain(|link| link.socket != self.link.socket);
            }
        }
        if matches!(self.role, Role::Agent { .. }) {
            self.relay.n_agents.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Only the customer and the owning agent write to a chat.
fn check_participant(chat: &Chat, author: AuthorJson<'_>) -> Result<(), Refusal> {
    match (author.id, chat.facts.owner.as_deref()) {
        (None, _) => Ok(()),
        (Some(agent), Some(owner)) if agent == owner => Ok(()),
        (Some(_), Some(_)) => Err(refusal("not_participant", "another agent owns this chat")),
        (Some(_), None) => Err(refusal("not_accepted", "accept the chat first")),
    }
}

/// The events seq 1 (`created`) and 2 (the question as a `message`) of a chat.
fn first_events(conversation: Uuid, facts: &ChatFacts) -> [String; 2] {
    let mut created = EventJson::new("created", 1, facts.created_at_ms, AuthorJson::SYSTEM);
    created.group = Some(&facts.group);
    created.customer_name = Some(&facts.customer_name);
    created.question = Some(&facts.question);
    let mut question = EventJson::new("message", 2, facts.created_at_ms, AuthorJson::CUSTOMER);
    question.body = Some(&facts.question);
    [frames::event(conversation, &created), frames::event(conversation, &question)]
}
