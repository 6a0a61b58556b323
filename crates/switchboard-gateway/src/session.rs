//! One WebSocket connection: read a request, check who may make it, ask the router, answer with an ack or
//! an error; and between requests, write the pushes the hub queued for this socket.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde_json::{Value, json};
use switchboard_domain::{AgentStatus, ConversationId, Event, GroupId};
use switchboard_proto::router::{Caller, ChatCommand, ChatList, StartChat};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};

use crate::Shared;
use crate::hub::{Needs, Outbound, Role, SocketId, SocketLink};
use crate::protocol::{self, ErrorReply, ListName, Request};

/// Close code for a client too slow to read what it is sent: reconnect and resume from the last seq.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a frame larger than the server reads (RFC 6455: message too big).
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

const MAX_NAME_CHARS: usize = 100;
const MAX_CLIENT_MSG_ID_CHARS: usize = 128;

struct Session {
    shared: Arc<Shared>,
    socket_id: SocketId,
    link: SocketLink,
    role: Option<Role>,
    /// The highest seq written to this socket, per conversation.
    written_seq: HashMap<ConversationId, u64>,
}

type Reply = Result<(Value, Vec<(ConversationId, Event)>), ErrorReply>;

pub(crate) async fn run(shared: Arc<Shared>, mut socket: WebSocket) {
    let socket_id = shared.next_socket_id.fetch_add(1, Ordering::Relaxed);
    let (outbound, mut queued) = mpsc::channel(shared.settings.outbound_queue_len);
    let link = SocketLink { outbound, kicked: Arc::new(Notify::new()), is_kicked: Arc::new(AtomicBool::new(false)) };
    let mut session = Session { shared, socket_id, link, role: None, written_seq: HashMap::new() };
    let welcome = protocol::welcome(session.shared.settings.max_message_bytes);
    if socket.send(Message::Text(welcome.into())).await.is_err() {
        return;
    }
    let kicked = session.link.kicked.clone();
    loop {
        tokio::select! {
            frame = socket.recv() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(error)) => {
                        close_after_read_error(&mut socket, &error, session.shared.settings.max_message_bytes).await;
                        break;
                    }
                    None => break,
                };
                let keep_going = match frame {
                    Message::Text(text) => session.on_text(&mut socket, text.as_str()).await,
                    Message::Binary(_) => {
                        let reply = ErrorReply::new("bad_frame", "binary frames are not supported: send JSON text");
                        send(&mut socket, protocol::error(None, &reply)).await
                    }
                    Message::Close(_) => false,
                    Message::Ping(_) | Message::Pong(_) => true,
                };
                if !keep_going {
                    break;
                }
            }
            Some(outbound) = queued.recv() => {
                if !session.write_outbound(&mut socket, outbound).await {
                    break;
                }
            }
            () = kicked.notified() => {
                let reason = "too slow to read: reconnect and resume from your last seq";
                let close = CloseFrame { code: CLOSE_SLOW_CONSUMER, reason: reason.into() };
                let _ = socket.send(Message::Close(Some(close))).await;
                break;
            }
        }
    }
    session.end().await;
}

/// A frame too large to read closes the connection with 1009 (message too big) and says the limit; other
/// read errors mean the connection is already gone.
async fn close_after_read_error(socket: &mut WebSocket, error: &axum::Error, max_message_bytes: usize) {
    // axum hides tungstenite's error type; its capacity error is the one that says "too long".
    if error.to_string().contains("too long") {
        let reason = format!("frame too large: a message body is at most {max_message_bytes} bytes");
        let close = CloseFrame { code: CLOSE_MESSAGE_TOO_BIG, reason: reason.into() };
        let _ = socket.send(Message::Close(Some(close))).await;
    }
}

async fn send(socket: &mut WebSocket, frame: String) -> bool {
    socket.send(Message::Text(frame.into())).await.is_ok()
}

impl Session {
    /// Handles one text frame; false when the connection must end.
    async fn on_text(&mut self, socket: &mut WebSocket, text: &str) -> bool {
        let (id, request) = match protocol::parse(text) {
            Ok(parsed) => parsed,
            Err((id, reply)) => return send(socket, protocol::error(id.as_deref(), &reply)).await,
        };
        match self.handle(request).await {
            Ok((body, events)) => {
                if !send(socket, protocol::ack(&id, body)).await {
                    return false;
                }
                for (conversation, event) in events {
                    if !self.write_event(socket, conversation, &event).await {
                        return false;
                    }
                }
                true
            }
            Err(reply) => send(socket, protocol::error(Some(&id), &reply)).await,
        }
    }

    async fn write_outbound(&mut self, socket: &mut WebSocket, outbound: Outbound) -> bool {
        match outbound {
            Outbound::Frame(frame) => send(socket, frame.to_string()).await,
            Outbound::Event { conversation, event, frame } => {
                let written = self.written_seq.get(&conversation).copied().unwrap_or(0);
                if event.seq <= written {
                    return true;
                }
                if event.seq > written + 1 && !self.fill_gap(socket, conversation, written).await {
                    return false;
                }
                if event.seq <= self.written_seq.get(&conversation).copied().unwrap_or(0) {
                    return true;
                }
                self.written_seq.insert(conversation, event.seq);
                send(socket, frame.to_string()).await
            }
        }
    }

    /// Writes the events a socket missed (it never should). When they cannot be read, the connection ends
    /// rather than go on with a gap: the client reconnects and resumes from its last seq.
    async fn fill_gap(&mut self, socket: &mut WebSocket, conversation: ConversationId, written: u64) -> bool {
        let Ok(caller) = self.caller_for(conversation) else { return false };
        let missed = match self.shared.router.read_events(&caller, conversation, written).await {
            Ok(missed) => missed,
            Err(error) => {
                warn!(%conversation, %error, "cannot fill a gap: closing the connection so that the client resumes");
                return false;
            }
        };
        for event in missed {
            if !self.write_event(socket, conversation, &event).await {
                return false;
            }
        }
        true
    }

    async fn write_event(&mut self, socket: &mut WebSocket, conversation: ConversationId, event: &Event) -> bool {
        let written = self.written_seq.entry(conversation).or_insert(0);
        if event.seq <= *written {
            return true;
        }
        *written = event.seq;
        send(socket, protocol::event(conversation, event)).await
    }

    async fn handle(&mut self, request: Request) -> Reply {
        let router = self.shared.router.clone();
        match request {
            Request::Ping {} => Ok((json!({}), vec![])),
            Request::ChatStart { widget_key, group, name, question } => {
                self.start_chat(widget_key, group, name, question).await
            }
            Request::CustomerResume { conversation, customer_token, after_seq } => {
                self.no_role_yet()?;
                let view =
                    router.authorize_customer(conversation, &customer_token).await.map_err(|error| match error {
                        switchboard_proto::router::RouterError::NotFound => unauthorized_customer(),
                        other => other.into(),
                    })?;
                let role = Role::Customer { conversation, tenant: view.tenant.clone(), group: view.group.clone() };
                self.become_role(role).await;
                match self.subscribe(conversation, after_seq).await {
                    Ok(events) => Ok((json!({ "chat": protocol::chat_json(&view) }), events)),
                    Err(error) => {
                        // A refused resume leaves the connection as it was: free to resume properly.
                        self.abandon_role().await;
                        Err(error)
                    }
                }
            }
            Request::AgentSignIn { token } => {
                self.no_role_yet()?;
                let Some((tenant, agent)) = self.shared.directory.agent_of_token(&token).cloned() else {
                    return Err(ErrorReply::new("unauthorized", "unknown agent token"));
                };
                let view = router.set_agent_status(&tenant, &agent, AgentStatus::Online).await?;
                self.become_role(Role::Agent { tenant, agent, groups: view.groups.clone() }).await;
                Ok((json!({ "agent": protocol::agent_json(&view) }), vec![]))
            }
            Request::AgentSetStatus { status } => {
                let (tenant, agent, _) = self.agent()?;
                let view = router.set_agent_status(&tenant, &agent, status.into()).await?;
                Ok((json!({ "agent": protocol::agent_json(&view) }), vec![]))
            }
            Request::QueueList {} => {
                let (tenant, _, groups) = self.agent()?;
                let entries = self.shared.hub.waiting_for(&tenant, &groups);
                Ok((json!({ "entries": entries }), vec![]))
            }
            Request::ChatAccept { conversation } => {
                let (tenant, agent, _) = self.agent()?;
                let view = router.accept_chat(&tenant, &agent, conversation).await?;
                let after = self.written_seq.get(&conversation).copied().unwrap_or(0);
                let events = self.subscribe(conversation, after).await?;
                Ok((json!({ "chat": protocol::chat_json(&view) }), events))
            }
            Request::ChatSubscribe { conversation, after_seq } => {
                let caller = self.caller_for(conversation)?;
                let view = router.chat_view(&caller, conversation).await?;
                let events = self.subscribe(conversation, after_seq).await?;
                Ok((json!({ "chat": protocol::chat_json(&view) }), events))
            }
            Request::ChatTranscript { conversation, after_seq } => {
                let caller = self.caller_for(conversation)?;
                let view = router.chat_view(&caller, conversation).await?;
                let events = router.read_events(&caller, conversation, after_seq).await?;
                Ok((json!({ "chat": protocol::chat_json(&view), "events": events }), vec![]))
            }
            Request::ChatList { list } => {
                let (tenant, agent, _) = self.agent()?;
                let list = match list {
                    ListName::Ongoing => ChatList::Ongoing,
                    ListName::Closed => ChatList::Closed,
                };
                let chats = router.list_chats(&tenant, &agent, list).await?;
                let chats: Vec<Value> = chats.iter().map(protocol::chat_json).collect();
                Ok((json!({ "chats": chats }), vec![]))
            }
            Request::MessageSend { conversation, client_msg_id, body } => {
                let caller = self.caller_for(conversation)?;
                self.check_message(&client_msg_id, &body)?;
                let command = ChatCommand::Send { client_msg_id, body };
                let outcome = router.command(&caller, conversation, command).await?;
                let seq = outcome.event.as_ref().map(|event| event.seq);
                Ok((json!({ "status": "sent", "seq": seq, "duplicate": outcome.duplicate }), vec![]))
            }
            Request::MessageDelivered { conversation, up_to_seq } => {
                let caller = self.caller_for(conversation)?;
                let outcome = router.command(&caller, conversation, ChatCommand::ConfirmDelivery { up_to_seq }).await?;
                Ok((json!({ "seq": outcome.event.map(|event| event.seq) }), vec![]))
            }
            Request::Typing { conversation, typing } => {
                let caller = self.caller_for(conversation)?;
                router.typing(&caller, conversation, typing).await?;
                Ok((json!({}), vec![]))
            }
            Request::ChatClose { conversation } => self.end_chat(conversation, ChatCommand::Close).await,
            Request::ChatCancel { conversation } => self.end_chat(conversation, ChatCommand::Cancel).await,
        }
    }

    async fn start_chat(&mut self, widget_key: String, group: String, name: String, question: String) -> Reply {
        self.no_role_yet()?;
        let Some(tenant) = self.shared.directory.tenant_of_widget_key(&widget_key).cloned() else {
            return Err(ErrorReply::new("unauthorized", "unknown widget key"));
        };
        let group = GroupId::new(group).map_err(|_| ErrorReply::new("unknown_group", "no such support group"))?;
        let name = name.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
            return Err(ErrorReply::new("bad_request", format!("a name has 1 to {MAX_NAME_CHARS} characters")));
        }
        self.check_body(&question)?;
        let request = StartChat {
            conversation: ConversationId::new_v7(self.shared.clock.now_ms()),
            tenant: tenant.clone(),
            group: group.clone(),
            customer_name: name,
            question,
        };
        let started = self.shared.router.start_chat(request).await?;
        let conversation = started.view.conversation;
        self.become_role(Role::Customer { conversation, tenant, group }).await;
        // The chat exists now: the customer must get its token even if the subscription failed, and then
        // subscribes again with `chat.subscribe`.
        let (events, subscribed) = match self.subscribe(conversation, 0).await {
            Ok(events) => (events, true),
            Err(error) => {
                warn!(%conversation, code = error.code, "new chat not subscribed");
                (Vec::new(), false)
            }
        };
        let body = json!({
            "conversation": conversation,
            "customer_token": started.customer_token,
            "chat": protocol::chat_json(&started.view),
            "subscribed": subscribed,
        });
        Ok((body, events))
    }

    async fn end_chat(&mut self, conversation: ConversationId, command: ChatCommand) -> Reply {
        let caller = self.caller_for(conversation)?;
        let outcome = self.shared.router.command(&caller, conversation, command).await?;
        Ok((json!({ "seq": outcome.event.map(|event| event.seq) }), vec![]))
    }

    /// Watches a conversation and returns the events after `after_seq` (later ones are pushed).
    async fn subscribe(
        &mut self,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<Vec<(ConversationId, Event)>, ErrorReply> {
        let caller = self.caller_for(conversation)?;
        // Watch before subscribing, so that no event pushed in between is missed.
        let first_watch = self.shared.hub.watch(self.socket_id, conversation);
        let subscribed = self.shared.router.subscribe(&self.shared.gateway_id, &caller, conversation, after_seq).await;
        let events = match subscribed {
            Ok(events) => events,
            Err(error) => {
                // Undo the watch; the gateway stays subscribed if another socket was already watching.
                if self.shared.hub.unwatch(self.socket_id, conversation) && !first_watch {
                    self.shared.router.unsubscribe(&self.shared.gateway_id, conversation).await;
                }
                return Err(error.into());
            }
        };
        // A client resuming from `after_seq` has seen everything up to it.
        // The client has everything up to `after_seq`; a socket that wrote more before is asked to send those
        // again.
        let written = self.written_seq.entry(conversation).or_insert(after_seq);
        *written = (*written).min(after_seq);
        Ok(events.into_iter().map(|event| (conversation, event)).collect())
    }

    async fn become_role(&mut self, role: Role) {
        let needs = self.shared.hub.register(self.socket_id, self.link.clone(), role.clone());
        self.role = Some(role);
        self.apply_needs(needs).await;
    }

    /// Undoes `become_role` after the request that took the role failed.
    async fn abandon_role(&mut self) {
        let needs = self.shared.hub.unregister(self.socket_id);
        self.role = None;
        self.written_seq.clear();
        self.apply_needs(needs).await;
    }

    async fn apply_needs(&self, needs: Needs) {
        let shared = &self.shared;
        for (tenant, group) in needs.subscribe_queues {
            if let Err(error) = shared.router.subscribe_queue(&shared.gateway_id, &tenant, &group).await {
                debug!(%error, %group, "queue subscription failed");
            }
        }
        for conversation in needs.unsubscribe_conversations {
            shared.router.unsubscribe(&shared.gateway_id, conversation).await;
        }
    }

    async fn end(self) {
        let needs = self.shared.hub.unregister(self.socket_id);
        self.apply_needs(needs).await;
        if let Some(Role::Agent { tenant, agent, .. }) = &self.role
            && self.shared.hub.n_agent_sockets(tenant, agent) == 0
        {
            let _ = self.shared.router.set_agent_status(tenant, agent, AgentStatus::Offline).await;
        }
    }

    fn no_role_yet(&self) -> Result<(), ErrorReply> {
        match self.role {
            None => Ok(()),
            Some(_) => Err(ErrorReply::new(
                "already_signed_in",
                "this connection already has a chat or a signed-in agent: open another connection",
            )),
        }
    }

    fn agent(&self) -> Result<(switchboard_domain::TenantId, switchboard_domain::AgentId, Vec<GroupId>), ErrorReply> {
        match &self.role {
            Some(Role::Agent { tenant, agent, groups }) => Ok((tenant.clone(), agent.clone(), groups.clone())),
            Some(Role::Customer { .. }) => Err(ErrorReply::new("forbidden", "only agents can do that")),
            None => Err(not_signed_in()),
        }
    }

    fn caller_for(&self, conversation: ConversationId) -> Result<Caller, ErrorReply> {
        match &self.role {
            Some(Role::Customer { conversation: own, .. }) if *own == conversation => {
                Ok(Caller::Customer { conversation })
            }
            Some(Role::Customer { .. }) => Err(ErrorReply::new("not_found", "no such conversation")),
            Some(Role::Agent { tenant, agent, .. }) => {
                Ok(Caller::Agent { tenant: tenant.clone(), agent: agent.clone() })
            }
            None => Err(not_signed_in()),
        }
    }

    fn check_body(&self, body: &str) -> Result<(), ErrorReply> {
        let max = self.shared.settings.max_message_bytes;
        if body.len() > max {
            return Err(ErrorReply::new(
                "message_too_large",
                format!("a message is at most {max} bytes; this one is {} bytes", body.len()),
            ));
        }
        if body.trim().is_empty() {
            return Err(ErrorReply::new("empty_message", "a message must not be empty"));
        }
        Ok(())
    }

    fn check_message(&self, client_msg_id: &str, body: &str) -> Result<(), ErrorReply> {
        if client_msg_id.is_empty() || client_msg_id.chars().count() > MAX_CLIENT_MSG_ID_CHARS {
            return Err(ErrorReply::new(
                "bad_request",
                format!("client_msg_id has 1 to {MAX_CLIENT_MSG_ID_CHARS} characters"),
            ));
        }
        self.check_body(body)
    }
}

fn not_signed_in() -> ErrorReply {
    ErrorReply::new("not_signed_in", "start a chat, resume one, or sign in as an agent first")
}

fn unauthorized_customer() -> ErrorReply {
    ErrorReply::new("unauthorized", "unknown conversation or wrong customer token")
}
