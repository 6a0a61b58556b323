//! The gRPC transport: `switchboard.v1.ChatService` (`proto/switchboard/v1/chat.proto`), the public protocol
//! as one bidirectional stream of protobuf frames per connection. Like `ws.rs`, it only decodes what the
//! client sends into [`Request`]s and encodes the session's frames; the session does everything else, so
//! a gRPC stream behaves exactly like a WebSocket.
//!
//! Where the WebSocket closes with a close code, the stream ends with a gRPC status: `RESOURCE_EXHAUSTED` for
//! a client too slow to read (4008) or a frame over the limit (1009), `INVALID_ARGUMENT` for bytes that are
//! not a `ClientFrame`, `UNAVAILABLE` when the gateway shuts down (1001) or serves as many connections as it
//! may (1013, before any frame).
//!
//! The error of one request is an `Error` frame (the stream goes on); besides the stable code it carries the
//! gRPC status code the error corresponds to ([`grpc_code`]): `RESOURCE_EXHAUSTED` for `license_exhausted`,
//! so that a client can tell the license limit apart as it would from a unary call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use prost::Message as _;
use switchboard_domain::{
    AgentStatus, Author, CancelReason, ConversationId, ConversationState, Event, EventBody, OfferEnd, RequeueReason,
    WaitingEntry,
};
use switchboard_proto::public::v1 as pb;
use switchboard_proto::router::{AgentView, ChatView, LeftQueue};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Response, Status, Streaming};

use crate::Shared;
use crate::addresses::{Peer, X_FORWARDED_FOR};
use crate::protocol::{self, Ack, ErrorReply, GroupInfo, ListName, PushFrame, Request, SettableStatus};
use crate::session::{self, Close, Inbound, Outgoing, Transport};

/// Frames written to a stream and not yet taken by HTTP/2 (which has its own flow-control window behind).
const WRITE_BUFFER: usize = 16;

/// The implementation of `switchboard.v1.ChatService`; see [`crate::Gateway::grpc_service`].
#[derive(Clone)]
pub struct ChatGrpc {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ChatGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatGrpc").finish_non_exhaustive()
    }
}

impl ChatGrpc {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ChatGrpc { shared }
    }
}

#[tonic::async_trait]
impl pb::chat_service_server::ChatService for ChatGrpc {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: tonic::Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<SessionStream>, Status> {
        let forwarded_for = request.metadata().get_all(X_FORWARDED_FOR).iter().filter_map(|value| value.to_str().ok());
        let client = self.shared.client_address(request.extensions().get::<Peer>().copied(), forwarded_for);
        let (frames, written) = mpsc::channel(WRITE_BUFFER);
        let (close, closed) = oneshot::channel();
        let transport = GrpcTransport {
            incoming: request.into_inner(),
            frames,
            close: Some(close),
            max_message_bytes: self.shared.settings.max_message_bytes,
        };
        let running = session::Running::new(&self.shared.sessions);
        tokio::spawn(session::run(self.shared.clone(), transport, client, running));
        Ok(Response::new(SessionStream { frames: written, close: Some(closed), closing: None }))
    }
}

/// The server's side of one `Session` stream: the frames the session writes, then, if the session closed
/// the stream, its status.
#[derive(Debug)]
pub struct SessionStream {
    frames: mpsc::Receiver<pb::ServerFrame>,
    close: Option<oneshot::Receiver<Status>>,
    /// The status to end with once the frames written before it are out.
    closing: Option<Status>,
}

impl Stream for SessionStream {
    type Item = Result<pb::ServerFrame, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // The close does not queue behind frames the client is not reading: it is seen at once, and then
            // only the frames already written go before it.
            if let Some(close) = this.close.as_mut()
                && let Poll::Ready(closed) = Pin::new(close).poll(cx)
            {
                this.close = None;
                if let Ok(status) = closed {
                    this.frames.close();
                    this.closing = Some(status);
                }
            }
            if this.closing.is_some() {
                return Poll::Ready(match this.frames.try_recv() {
                    Ok(frame) => Some(Ok(frame)),
                    Err(_) => this.closing.take().map(Err),
                });
            }
            return match this.frames.poll_recv(cx) {
                Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
                // The session ended; it closes (or not) before it lets go of the frames, so the close is
                // settled by now.
                Poll::Ready(None) if this.close.is_some() => continue,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

struct GrpcTransport {
    incoming: Streaming<pb::ClientFrame>,
    frames: mpsc::Sender<pb::ServerFrame>,
    close: Option<oneshot::Sender<Status>>,
    max_message_bytes: usize,
}

impl Transport for GrpcTransport {
    const NAME: &'static str = "grpc";

    async fn recv(&mut self) -> Option<Inbound> {
        match self.incoming.message().await {
            Ok(Some(frame)) => Some(decode(frame)),
            // The client closed its side of the stream.
            Ok(None) => None,
            // tonic's codes for a message over the size limit, and for bytes that do not decode; other
            // errors mean the client is gone (a reset stream, a broken connection).
            Err(status) => match status.code() {
                Code::OutOfRange | Code::ResourceExhausted => {
                    Some(Inbound::Fatal(Close::FrameTooLarge { max_message_bytes: self.max_message_bytes }))
                }
                Code::Internal => Some(Inbound::Fatal(Close::Undecodable { detail: status.message().to_owned() })),
                _ => None,
            },
        }
    }

    /// The frame's encoded size is a walk of the message, made only when measured: not for pushes.
    async fn send(&mut self, frame: Outgoing<'_>, measure: bool) -> Option<usize> {
        let frame = encode(frame);
        let bytes = if measure { frame.encoded_len() } else { 0 };
        self.frames.send(frame).await.ok().map(|()| bytes)
    }

    /// Each frame is handed to the stream as it is sent: nothing waits here.
    async fn flush(&mut self) -> bool {
        true
    }

    async fn close(&mut self, reason: Close) {
        if let Some(close) = self.close.take() {
            let _ = close.send(status(&reason));
        }
    }
}

/// The status a stream the server closes ends with.
fn status(close: &Close) -> Status {
    let message = close.reason();
    match close {
        Close::SlowConsumer | Close::FrameTooLarge { .. } => Status::resource_exhausted(message),
        Close::Undecodable { .. } => Status::invalid_argument(message),
        // A gRPC session does not ping (`Transport::PINGS`): its HTTP/2 connection is pinged by the server
        // (`serve.rs`), which closes the connection itself. `Unresponsive` is a WebSocket's only.
        Close::ShuttingDown | Close::Unresponsive | Close::Full { .. } | Close::AddressFull { .. } => {
            Status::unavailable(message)
        }
    }
}

// ---- client frames → requests ----------------------------------------------------------------------------

/// A client frame as the session takes it: a request, or the error that answers it.
pub(crate) fn decode(frame: pb::ClientFrame) -> Inbound {
    let pb::ClientFrame { id, request } = frame;
    if !protocol::is_usable_id(&id) {
        return Inbound::Refused { id: None, error: protocol::missing_id() };
    }
    let Some(request) = request else {
        // Protobuf cannot tell a frame without a request from one with a request type of a later version.
        let error = ErrorReply::new("unknown_type", "the frame holds no request type this server knows");
        return Inbound::Refused { id: Some(id), error };
    };
    match decode_request(request) {
        Ok(request) => Inbound::Request { id, request },
        Err(error) => Inbound::Refused { id: Some(id), error },
    }
}

fn decode_request(request: pb::client_frame::Request) -> Result<Request, ErrorReply> {
    use pb::client_frame::Request as R;
    Ok(match request {
        R::ChatStart(r) => Request::ChatStart {
            start_key: (!r.start_key.is_empty())
                .then(|| uuid::Uuid::parse_str(&r.start_key))
                .transpose()
                .map_err(|_| bad_request("chat.start", &format!("start_key must be a UUID, not {:?}", r.start_key)))?,
            widget_key: r.widget_key,
            group: r.group,
            name: r.name,
            question: r.question,
        },
        R::CustomerResume(r) => Request::CustomerResume {
            conversation: conversation("customer.resume", &r.conversation)?,
            customer_token: r.customer_token,
            after_seq: r.after_seq,
        },
        R::AgentSignIn(r) => Request::AgentSignIn { token: r.token },
        R::AgentSetStatus(r) => {
            let status = match pb::AgentStatus::try_from(r.status) {
                Ok(pb::AgentStatus::Online) => SettableStatus::Online,
                Ok(pb::AgentStatus::Away) => SettableStatus::Away,
                _ => {
                    return Err(bad_request(
                        "agent.set_status",
                        "status must be AGENT_STATUS_ONLINE or AGENT_STATUS_AWAY",
                    ));
                }
            };
            Request::AgentSetStatus { status }
        }
        R::QueueList(pb::QueueListRequest {}) => Request::QueueList {},
        R::ChatAccept(r) => Request::ChatAccept { conversation: conversation("chat.accept", &r.conversation)? },
        R::ChatSubscribe(r) => Request::ChatSubscribe {
            conversation: conversation("chat.subscribe", &r.conversation)?,
            after_seq: r.after_seq,
        },
        R::ChatUnsubscribe(r) => {
            Request::ChatUnsubscribe { conversation: conversation("chat.unsubscribe", &r.conversation)? }
        }
        R::ChatTranscript(r) => Request::ChatTranscript {
            conversation: conversation("chat.transcript", &r.conversation)?,
            after_seq: r.after_seq,
        },
        R::ChatList(r) => {
            let list = match pb::ChatList::try_from(r.list) {
                Ok(pb::ChatList::Ongoing) => ListName::Ongoing,
                Ok(pb::ChatList::Closed) => ListName::Closed,
                _ => return Err(bad_request("chat.list", "list must be CHAT_LIST_ONGOING or CHAT_LIST_CLOSED")),
            };
            Request::ChatList { list }
        }
        R::MessageSend(r) => Request::MessageSend {
            conversation: conversation("message.send", &r.conversation)?,
            client_msg_id: r.client_msg_id,
            body: r.body,
        },
        R::MessageDelivered(r) => Request::MessageDelivered {
            conversation: conversation("message.delivered", &r.conversation)?,
            up_to_seq: r.up_to_seq,
        },
        R::Typing(r) => Request::Typing { conversation: conversation("typing", &r.conversation)?, typing: r.typing },
        R::ChatClose(r) => Request::ChatClose { conversation: conversation("chat.close", &r.conversation)? },
        R::ChatCancel(r) => Request::ChatCancel { conversation: conversation("chat.cancel", &r.conversation)? },
        R::Ping(pb::PingRequest {}) => Request::Ping {},
        R::GroupsList(r) => Request::GroupsList { widget_key: r.widget_key },
        R::OfflineMessage(r) => Request::OfflineMessage {
            widget_key: r.widget_key,
            group: r.group,
            name: r.name,
            contact: r.contact,
            body: r.body,
            reason: r.reason,
            idempotency_key: r.idempotency_key,
        },
        R::OfferReject(r) => Request::OfferReject { conversation: conversation("offer.reject", &r.conversation)? },
        R::ChatTransfer(r) => {
            Request::ChatTransfer { conversation: conversation("chat.transfer", &r.conversation)?, group: r.group }
        }
        R::ChatForward(r) => {
            Request::ChatForward { conversation: conversation("chat.forward", &r.conversation)?, agent: r.agent }
        }
        R::AgentSignOut(pb::AgentSignOutRequest {}) => Request::AgentSignOut {},
    })
}

fn conversation(kind: &str, text: &str) -> Result<ConversationId, ErrorReply> {
    ConversationId::parse(text)
        .map_err(|_| bad_request(kind, &format!("conversation must be a conversation id (a UUID), not {text:?}")))
}

fn bad_request(kind: &str, problem: &str) -> ErrorReply {
    ErrorReply::new("bad_request", format!("bad {kind} request: {problem}"))
}

// ---- frames → server frames ------------------------------------------------------------------------------

/// A frame of the session as a protobuf server frame.
pub(crate) fn encode(outgoing: Outgoing<'_>) -> pb::ServerFrame {
    use pb::server_frame::Frame;
    let frame = match outgoing {
        Outgoing::Welcome { max_message_bytes } => Frame::Welcome(pb::Welcome {
            protocol: protocol::PROTOCOL_VERSION,
            max_message_bytes: to_u64(max_message_bytes),
        }),
        Outgoing::Ack { id, ack } => Frame::Ack(pb::Ack { id: id.to_owned(), result: Some(ack_result(ack)) }),
        Outgoing::Error { id, error } => Frame::Error(pb::Error {
            id: id.unwrap_or_default().to_owned(),
            code: error.code.to_owned(),
            message: error.message.clone(),
            retryable: error.retryable,
            max_sessions: error.max_sessions,
            grpc_status: grpc_code(error.code) as i32,
            retry_after_ms: error.retry_after_ms,
        }),
        Outgoing::Push(outbound) => push(outbound.frame()),
    };
    pb::ServerFrame { frame: Some(frame) }
}

/// The gRPC status code an error of the protocol corresponds to (carried in the `Error` frame as
/// `grpc_status`; docs/protocol.md, section 6).
pub fn grpc_code(code: &str) -> Code {
    match code {
        "license_exhausted" | "rate_limited" | "follow_limit_reached" => Code::ResourceExhausted,
        "unavailable" | "not_owner" => Code::Unavailable,
        "internal" => Code::Internal,
        "bad_json" | "bad_frame" | "missing_id" | "missing_type" | "bad_request" | "message_too_large"
        | "empty_message" => Code::InvalidArgument,
        "unknown_type" => Code::Unimplemented,
        "unauthorized" => Code::Unauthenticated,
        "forbidden" => Code::PermissionDenied,
        "not_found" | "unknown_group" | "unknown_agent" => Code::NotFound,
        // The refusals (`chat_taken`, `at_capacity`, `group_closed`, ...) and the role errors.
        _ => Code::FailedPrecondition,
    }
}

fn ack_result(ack: &Ack) -> pb::ack::Result {
    use pb::ack::Result as R;
    match ack {
        Ack::Ping => R::Ping(pb::PingResult {}),
        Ack::ChatStart { conversation, customer_token, chat: view, subscribed, duplicate } => {
            R::ChatStart(pb::ChatStartResult {
                conversation: conversation.to_string(),
                customer_token: customer_token.clone(),
                chat: Some(chat(view)),
                subscribed: *subscribed,
                duplicate: *duplicate,
            })
        }
        Ack::CustomerResume { chat: view } => R::CustomerResume(pb::CustomerResumeResult { chat: Some(chat(view)) }),
        Ack::AgentSignIn { agent: view } => R::AgentSignIn(pb::AgentSignInResult { agent: Some(agent(view)) }),
        Ack::AgentSetStatus { agent: view } => R::AgentSetStatus(pb::AgentSetStatusResult { agent: Some(agent(view)) }),
        Ack::QueueList { entries } => {
            R::QueueList(pb::QueueListResult { entries: entries.iter().map(waiting_entry).collect() })
        }
        Ack::ChatAccept { chat: view } => R::ChatAccept(pb::ChatAcceptResult { chat: Some(chat(view)) }),
        Ack::ChatSubscribe { chat: view } => R::ChatSubscribe(pb::ChatSubscribeResult { chat: Some(chat(view)) }),
        Ack::ChatUnsubscribe { followed } => R::ChatUnsubscribe(pb::ChatUnsubscribeResult { followed: *followed }),
        Ack::ChatTranscript { chat: view, events, more } => R::ChatTranscript(pb::ChatTranscriptResult {
            chat: Some(chat(view)),
            events: events.iter().map(event).collect(),
            more: *more,
        }),
        Ack::ChatList { chats } => R::ChatList(pb::ChatListResult { chats: chats.iter().map(chat).collect() }),
        Ack::MessageSend { seq, duplicate } => R::MessageSend(pb::MessageSendResult {
            status: pb::MessageStatus::Sent.into(),
            seq: *seq,
            duplicate: *duplicate,
        }),
        Ack::MessageDelivered { seq } => R::MessageDelivered(pb::MessageDeliveredResult { seq: *seq }),
        Ack::Typing => R::Typing(pb::TypingResult {}),
        Ack::ChatClose { seq } => R::ChatClose(pb::ChatCloseResult { seq: *seq }),
        Ack::ChatCancel { seq } => R::ChatCancel(pb::ChatCancelResult { seq: *seq }),
        Ack::GroupsList { groups, stale } => {
            R::GroupsList(pb::GroupsListResult { groups: groups.iter().map(group_info).collect(), stale: *stale })
        }
        Ack::OfflineMessage { ticket } => R::OfflineMessage(pb::OfflineMessageResult {
            ticket: Some(pb::Ticket { id: ticket.id.clone(), created_at_ms: ticket.created_at_ms }),
            duplicate: ticket.duplicate,
        }),
        Ack::OfferReject => R::OfferReject(pb::OfferRejectResult {}),
        Ack::ChatTransfer { chat: view } => R::ChatTransfer(pb::ChatTransferResult { chat: Some(chat(view)) }),
        Ack::ChatForward { chat: view } => R::ChatForward(pb::ChatForwardResult { chat: Some(chat(view)) }),
        Ack::AgentSignOut { agent: view } => R::AgentSignOut(pb::AgentSignOutResult { agent: Some(agent(view)) }),
    }
}

fn group_info(group: &GroupInfo) -> pb::GroupInfo {
    pb::GroupInfo {
        id: group.id.to_string(),
        name: group.name.clone(),
        online: group.online,
        open: group.open,
        signed_in: group.signed_in,
        wait_sla_ms: group.wait_sla_ms.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0),
    }
}

fn push(frame: &PushFrame) -> pb::server_frame::Frame {
    use pb::server_frame::Frame;
    match frame {
        PushFrame::Event { conversation, event: body } => {
            Frame::Event(pb::EventPush { conversation: conversation.to_string(), event: Some(event(body)) })
        }
        PushFrame::Typing { conversation, author: who, typing } => Frame::Typing(pb::TypingPush {
            conversation: conversation.to_string(),
            author: Some(author(who)),
            typing: *typing,
        }),
        PushFrame::QueueSnapshot { entries } => {
            Frame::QueueSnapshot(pb::QueueSnapshot { entries: entries.iter().map(waiting_entry).collect() })
        }
        PushFrame::QueueAdded { entry } => Frame::QueueAdded(pb::QueueAdded { entry: Some(waiting_entry(entry)) }),
        PushFrame::QueueRemoved { conversation, reason } => {
            let (reason, agent, group) = match reason {
                LeftQueue::Accepted { agent } => (pb::QueueRemovedReason::Accepted, Some(agent.to_string()), None),
                LeftQueue::Cancelled => (pb::QueueRemovedReason::Cancelled, None, None),
                LeftQueue::Abandoned => (pb::QueueRemovedReason::Abandoned, None, None),
                LeftQueue::Closed => (pb::QueueRemovedReason::Closed, None, None),
                LeftQueue::Transferred { to_group } => {
                    (pb::QueueRemovedReason::Transferred, None, Some(to_group.to_string()))
                }
            };
            Frame::QueueRemoved(pb::QueueRemoved {
                conversation: conversation.to_string(),
                reason: reason.into(),
                agent,
                group,
            })
        }
        PushFrame::QueuePosition { conversation, position, estimated_wait_s } => {
            Frame::QueuePosition(pb::QueuePosition {
                conversation: conversation.to_string(),
                position: to_u64(*position),
                estimated_wait_s: *estimated_wait_s,
            })
        }
        PushFrame::Offer { entry, expires_at_ms, .. } => {
            Frame::Offer(pb::OfferPush { entry: Some(waiting_entry(entry)), expires_at_ms: *expires_at_ms })
        }
        PushFrame::OfferEnded { conversation, reason } => Frame::OfferEnded(pb::OfferEndedPush {
            conversation: conversation.to_string(),
            reason: offer_end_reason(*reason).into(),
        }),
        PushFrame::ChatAssigned { chat: view } => Frame::ChatAssigned(pb::ChatAssignedPush { chat: Some(chat(view)) }),
        PushFrame::AgentStatus { agent: view } => Frame::AgentStatus(pb::AgentStatusPush { agent: Some(agent(view)) }),
    }
}

fn offer_end_reason(reason: OfferEnd) -> pb::OfferEndReason {
    match reason {
        OfferEnd::Rejected => pb::OfferEndReason::Rejected,
        OfferEnd::TimedOut => pb::OfferEndReason::TimedOut,
        OfferEnd::Withdrawn => pb::OfferEndReason::Withdrawn,
    }
}

fn requeue_reason(reason: RequeueReason) -> pb::RequeueReason {
    match reason {
        RequeueReason::AgentOffline => pb::RequeueReason::AgentOffline,
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn chat(view: &ChatView) -> pb::Chat {
    let state = match view.state {
        ConversationState::Queued => pb::ChatState::Queued,
        ConversationState::Active => pb::ChatState::Active,
        ConversationState::Closed => pb::ChatState::Closed,
        ConversationState::Cancelled => pb::ChatState::Cancelled,
    };
    pb::Chat {
        conversation: view.conversation.to_string(),
        group: view.group.to_string(),
        state: state.into(),
        owner: view.owner.as_ref().map(ToString::to_string),
        customer_name: view.customer_name.clone(),
        first_question: view.first_question.clone(),
        created_at_ms: view.created_at_ms,
        accepted_at_ms: view.accepted_at_ms,
        closed_at_ms: view.closed_at_ms,
        last_seq: view.last_seq,
        customer_away: view.customer_away,
    }
}

fn agent(view: &AgentView) -> pb::Agent {
    let status = match view.status {
        AgentStatus::Online => pb::AgentStatus::Online,
        AgentStatus::Away => pb::AgentStatus::Away,
        AgentStatus::Offline => pb::AgentStatus::Offline,
    };
    pb::Agent {
        tenant: view.tenant.to_string(),
        agent: view.agent.to_string(),
        status: status.into(),
        capacity: view.capacity,
        groups: view.groups.iter().map(ToString::to_string).collect(),
        active: view.active.iter().map(ToString::to_string).collect(),
    }
}

fn waiting_entry(entry: &WaitingEntry) -> pb::WaitingEntry {
    pb::WaitingEntry {
        conversation: entry.conversation.to_string(),
        group: entry.group.to_string(),
        queued_at_ms: entry.queued_at_ms,
        customer_name: entry.customer_name.clone(),
        question: entry.question.clone(),
    }
}

fn author(author: &Author) -> pb::Author {
    let (role, id) = match author {
        Author::Customer => (pb::AuthorRole::Customer, String::new()),
        Author::Agent(agent) => (pb::AuthorRole::Agent, agent.to_string()),
        Author::System => (pb::AuthorRole::System, String::new()),
    };
    pb::Author { role: role.into(), id }
}

fn event(event: &Event) -> pb::Event {
    pb::Event {
        seq: event.seq,
        at_ms: event.at_ms,
        author: Some(author(&event.author)),
        client_msg_id: event.client_msg_id.clone(),
        body: event_body(&event.body),
    }
}

fn event_body(body: &EventBody) -> Option<pb::event::Body> {
    use pb::event::{
        Accepted, Body, Cancelled, Closed, Created, CustomerLeft, CustomerReturned, Delivered, Forwarded, Message,
        OfferEnded, Offered, Requeued, Transferred,
    };
    Some(match body {
        EventBody::Created { group, customer_name, question } => Body::Created(Created {
            group: group.to_string(),
            customer_name: customer_name.clone(),
            question: question.clone(),
        }),
        EventBody::Accepted { agent } => Body::Accepted(Accepted { agent: agent.to_string() }),
        EventBody::Message { body } => Body::Message(Message { body: body.clone() }),
        EventBody::Delivered { up_to_seq } => Body::Delivered(Delivered { up_to_seq: *up_to_seq }),
        EventBody::Closed => Body::Closed(Closed {}),
        EventBody::Cancelled { reason } => Body::Cancelled(Cancelled {
            reason: match reason {
                None => pb::CancelReason::Unspecified,
                Some(CancelReason::Abandoned) => pb::CancelReason::Abandoned,
            }
            .into(),
        }),
        EventBody::Offered { agent, expires_at_ms } => {
            Body::Offered(Offered { agent: agent.to_string(), expires_at_ms: *expires_at_ms })
        }
        EventBody::OfferEnded { agent, reason } => {
            Body::OfferEnded(OfferEnded { agent: agent.to_string(), reason: offer_end_reason(*reason).into() })
        }
        EventBody::Transferred { from_agent, to_group } => Body::Transferred(Transferred {
            from_agent: from_agent.as_ref().map(ToString::to_string),
            to_group: to_group.to_string(),
        }),
        EventBody::Forwarded { from_agent, to_agent } => Body::Forwarded(Forwarded {
            from_agent: from_agent.as_ref().map(ToString::to_string),
            to_agent: to_agent.to_string(),
        }),
        EventBody::Requeued { from_agent, reason } => {
            Body::Requeued(Requeued { from_agent: from_agent.to_string(), reason: requeue_reason(*reason).into() })
        }
        EventBody::CustomerLeft => Body::CustomerLeft(CustomerLeft {}),
        EventBody::CustomerReturned => Body::CustomerReturned(CustomerReturned {}),
        // Written by a newer version: no body, which a client skips as an event of a kind it does not know.
        EventBody::Unknown => return None,
    })
}

#[cfg(test)]
mod tests {
    use switchboard_domain::{AgentId, GroupId, Refusal, TenantId};
    use switchboard_proto::router::{RouterError, Ticket};

    use super::*;
    use crate::hub::Outbound;

    fn chat_id() -> ConversationId {
        ConversationId::parse("01900000-0000-7000-8000-000000000001").unwrap()
    }

    fn decoded(request: pb::client_frame::Request) -> Result<Request, ErrorReply> {
        match decode(pb::ClientFrame { id: "r".into(), request: Some(request) }) {
            Inbound::Request { request, .. } => Ok(request),
            Inbound::Refused { error, .. } => Err(error),
            Inbound::Fatal(close) => panic!("a request is never fatal: {close:?}"),
            Inbound::Alive => panic!("a gRPC frame is a request"),
        }
    }

    fn frame_of(outgoing: Outgoing<'_>) -> pb::server_frame::Frame {
        encode(outgoing).frame.expect("a frame")
    }

    fn pushed(frame: PushFrame) -> pb::server_frame::Frame {
        frame_of(Outgoing::Push(&Outbound::new(frame)))
    }

    #[test]
    fn the_new_requests_decode_as_their_websocket_twins() {
        use pb::client_frame::Request as R;
        let chat = chat_id();
        assert!(matches!(
            decoded(R::GroupsList(pb::GroupsListRequest { widget_key: None })),
            Ok(Request::GroupsList { widget_key: None })
        ));
        assert!(matches!(
            decoded(R::GroupsList(pb::GroupsListRequest { widget_key: Some("w".into()) })),
            Ok(Request::GroupsList { widget_key: Some(key) }) if key == "w"
        ));
        let offline = pb::OfflineMessageRequest {
            widget_key: "w".into(),
            group: "sales".into(),
            name: "Dana".into(),
            contact: "+1 555".into(),
            body: "Call me".into(),
            reason: "license_exhausted".into(),
            idempotency_key: "k".into(),
        };
        let Ok(Request::OfflineMessage { widget_key, group, name, contact, body, reason, idempotency_key }) =
            decoded(R::OfflineMessage(offline))
        else {
            panic!("an offline message");
        };
        assert_eq!(
            [widget_key, group, name, contact, body, reason, idempotency_key],
            ["w", "sales", "Dana", "+1 555", "Call me", "license_exhausted", "k"]
        );
        let reject = R::OfferReject(pb::OfferRejectRequest { conversation: chat.to_string() });
        assert!(matches!(decoded(reject), Ok(Request::OfferReject { conversation }) if conversation == chat));
        let transfer = R::ChatTransfer(pb::ChatTransferRequest { conversation: chat.to_string(), group: "g".into() });
        assert!(matches!(decoded(transfer), Ok(Request::ChatTransfer { group, .. }) if group == "g"));
        let forward = R::ChatForward(pb::ChatForwardRequest { conversation: chat.to_string(), agent: "bob".into() });
        assert!(matches!(decoded(forward), Ok(Request::ChatForward { agent, .. }) if agent == "bob"));
        assert!(matches!(decoded(R::AgentSignOut(pb::AgentSignOutRequest {})), Ok(Request::AgentSignOut {})));
        for bad in [
            R::OfferReject(pb::OfferRejectRequest { conversation: "nope".into() }),
            R::ChatTransfer(pb::ChatTransferRequest { conversation: String::new(), group: "g".into() }),
            R::ChatForward(pb::ChatForwardRequest { conversation: "x".into(), agent: "bob".into() }),
        ] {
            assert_eq!(decoded(bad).unwrap_err().code, "bad_request");
        }
    }

    #[test]
    fn an_error_frame_carries_its_grpc_status_and_the_license_limit() {
        let reply = ErrorReply::from(RouterError::Refused(Refusal::LicenseExhausted { max_sessions: 250 }));
        let pb::server_frame::Frame::Error(error) = frame_of(Outgoing::Error { id: Some("r1"), error: &reply }) else {
            panic!("an error frame");
        };
        assert_eq!(error.code, "license_exhausted");
        assert_eq!(error.max_sessions, Some(250));
        assert_eq!(error.grpc_status, Code::ResourceExhausted as i32);
        let cases = [
            (ErrorReply::from(RouterError::Refused(Refusal::GroupClosed)), Code::FailedPrecondition),
            (ErrorReply::from(RouterError::Refused(Refusal::ChatTaken)), Code::FailedPrecondition),
            (ErrorReply::from(RouterError::Unavailable("x".into())), Code::Unavailable),
            (ErrorReply::from(RouterError::NotOwner), Code::Unavailable),
            (ErrorReply::from(RouterError::NotFound), Code::NotFound),
            (ErrorReply::from(RouterError::Internal("x".into())), Code::Internal),
            (ErrorReply::new("bad_request", "x"), Code::InvalidArgument),
            (ErrorReply::new("unknown_type", "x"), Code::Unimplemented),
            (ErrorReply::new("unauthorized", "x"), Code::Unauthenticated),
            (ErrorReply::new("forbidden", "x"), Code::PermissionDenied),
            (ErrorReply::new("not_signed_in", "x"), Code::FailedPrecondition),
        ];
        for (reply, code) in cases {
            let pb::server_frame::Frame::Error(error) = frame_of(Outgoing::Error { id: None, error: &reply }) else {
                panic!("an error frame");
            };
            assert_eq!((error.code.as_str(), error.grpc_status, error.max_sessions), (reply.code, code as i32, None));
        }
    }

    #[test]
    fn the_new_acks_and_pushes_encode_with_their_fields() {
        use pb::ack::Result as R;
        use pb::server_frame::Frame;
        let chat = chat_id();
        let groups = vec![GroupInfo {
            id: GroupId::new("sales").unwrap(),
            name: "Sales".into(),
            online: false,
            open: true,
            signed_in: 0,
            wait_sla_ms: None,
        }];
        let ack = Ack::GroupsList { groups, stale: true };
        let Frame::Ack(pb::Ack { result: Some(R::GroupsList(result)), .. }) =
            frame_of(Outgoing::Ack { id: "1", ack: &ack })
        else {
            panic!("a groups list");
        };
        assert!(result.stale);
        assert_eq!(
            result.groups,
            [pb::GroupInfo {
                id: "sales".into(),
                name: "Sales".into(),
                online: false,
                open: true,
                signed_in: 0,
                wait_sla_ms: 0
            }]
        );
        let ack = Ack::OfflineMessage { ticket: Ticket { id: "t".into(), created_at_ms: 3, duplicate: true } };
        let Frame::Ack(pb::Ack { result: Some(R::OfflineMessage(result)), .. }) =
            frame_of(Outgoing::Ack { id: "2", ack: &ack })
        else {
            panic!("an offline message result");
        };
        assert_eq!((result.ticket, result.duplicate), (Some(pb::Ticket { id: "t".into(), created_at_ms: 3 }), true));

        let Frame::QueuePosition(position) =
            pushed(PushFrame::QueuePosition { conversation: chat, position: 2, estimated_wait_s: Some(60) })
        else {
            panic!("a queue position");
        };
        assert_eq!((position.position, position.estimated_wait_s), (2, Some(60)));
        let to_group = GroupId::new("support").unwrap();
        let Frame::QueueRemoved(removed) =
            pushed(PushFrame::QueueRemoved { conversation: chat, reason: LeftQueue::Transferred { to_group } })
        else {
            panic!("a queue removal");
        };
        assert_eq!(removed.reason, pb::QueueRemovedReason::Transferred as i32);
        assert_eq!((removed.agent, removed.group), (None, Some("support".into())));
        let Frame::OfferEnded(ended) =
            pushed(PushFrame::OfferEnded { conversation: chat, reason: OfferEnd::Withdrawn })
        else {
            panic!("an offer end");
        };
        assert_eq!(ended.reason, pb::OfferEndReason::Withdrawn as i32);
        let entry = WaitingEntry {
            conversation: chat,
            group: GroupId::new("sales").unwrap(),
            queued_at_ms: 1,
            customer_name: "Dana".into(),
            question: "?".into(),
        };
        let Frame::Offer(offer) = pushed(PushFrame::Offer { entry, expires_at_ms: 77, waiting_since_us: 0 }) else {
            panic!("an offer")
        };
        assert_eq!((offer.entry.unwrap().conversation, offer.expires_at_ms), (chat.to_string(), 77));
        let view = AgentView {
            tenant: TenantId::new("acme").unwrap(),
            agent: AgentId::new("alice").unwrap(),
            status: AgentStatus::Offline,
            capacity: 1,
            groups: vec![],
            active: vec![],
        };
        let Frame::AgentStatus(status) = pushed(PushFrame::AgentStatus { agent: view }) else { panic!("a status") };
        assert_eq!(status.agent.unwrap().status, pb::AgentStatus::Offline as i32);
    }

    #[test]
    fn the_new_events_map_to_their_bodies() {
        use pb::event::Body;
        let agent = |name: &str| AgentId::new(name).unwrap();
        let body = |body: EventBody| {
            event(&Event { seq: 1, at_ms: 2, author: Author::System, client_msg_id: None, body }).body.unwrap()
        };
        assert_eq!(
            body(EventBody::Offered { agent: agent("a"), expires_at_ms: 9 }),
            Body::Offered(pb::event::Offered { agent: "a".into(), expires_at_ms: 9 })
        );
        assert_eq!(
            body(EventBody::OfferEnded { agent: agent("a"), reason: OfferEnd::Rejected }),
            Body::OfferEnded(pb::event::OfferEnded { agent: "a".into(), reason: pb::OfferEndReason::Rejected.into() })
        );
        assert_eq!(
            body(EventBody::Transferred { from_agent: Some(agent("a")), to_group: GroupId::new("g").unwrap() }),
            Body::Transferred(pb::event::Transferred { from_agent: Some("a".into()), to_group: "g".into() })
        );
        assert_eq!(
            body(EventBody::Forwarded { from_agent: None, to_agent: agent("b") }),
            Body::Forwarded(pb::event::Forwarded { from_agent: None, to_agent: "b".into() })
        );
        assert_eq!(
            body(EventBody::Requeued { from_agent: agent("b"), reason: RequeueReason::AgentOffline }),
            Body::Requeued(pb::event::Requeued {
                from_agent: "b".into(),
                reason: pb::RequeueReason::AgentOffline.into()
            })
        );
        assert_eq!(body(EventBody::CustomerLeft), Body::CustomerLeft(pb::event::CustomerLeft {}));
        assert_eq!(body(EventBody::CustomerReturned), Body::CustomerReturned(pb::event::CustomerReturned {}));
        let unknown = Event { seq: 1, at_ms: 2, author: Author::System, client_msg_id: None, body: EventBody::Unknown };
        assert_eq!(event(&unknown).body, None, "a kind written by a newer version: no body");
    }
}
