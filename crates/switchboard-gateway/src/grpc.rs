//! The gRPC transport: `switchboard.v1.ChatService` (`proto/switchboard/v1/chat.proto`), the public protocol
//! as one bidirectional stream of protobuf frames per connection. Like `ws.rs`, it only decodes what the
//! client sends into [`Request`]s and encodes the session's frames; the session does everything else, so
//! a gRPC stream behaves exactly like a WebSocket.
//!
//! Where the WebSocket closes with a close code, the stream ends with a gRPC status: `RESOURCE_EXHAUSTED` for
//! a client too slow to read (4008) or a frame over the limit (1009), `INVALID_ARGUMENT` for bytes that are
//! not a `ClientFrame`, `UNAVAILABLE` when the gateway shuts down (1001).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use switchboard_domain::{AgentStatus, Author, ConversationId, ConversationState, Event, EventBody, WaitingEntry};
use switchboard_proto::public::v1 as pb;
use switchboard_proto::router::{AgentView, ChatView, LeftQueue};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Response, Status, Streaming};

use crate::Shared;
use crate::protocol::{self, Ack, ErrorReply, ListName, PushFrame, Request, SettableStatus};
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
        let (frames, written) = mpsc::channel(WRITE_BUFFER);
        let (close, closed) = oneshot::channel();
        let transport = GrpcTransport {
            incoming: request.into_inner(),
            frames,
            close: Some(close),
            max_message_bytes: self.shared.settings.max_message_bytes,
        };
        tokio::spawn(session::run(self.shared.clone(), transport));
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

    async fn send(&mut self, frame: Outgoing<'_>) -> bool {
        let frame = encode(frame);
        self.frames.send(frame).await.is_ok()
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
        Close::ShuttingDown => Status::unavailable(message),
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
        R::ChatStart(r) => {
            Request::ChatStart { widget_key: r.widget_key, group: r.group, name: r.name, question: r.question }
        }
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
        }),
        Outgoing::Push(outbound) => push(outbound.frame()),
    };
    pb::ServerFrame { frame: Some(frame) }
}

fn ack_result(ack: &Ack) -> pb::ack::Result {
    use pb::ack::Result as R;
    match ack {
        Ack::Ping => R::Ping(pb::PingResult {}),
        Ack::ChatStart { conversation, customer_token, chat: view, subscribed } => R::ChatStart(pb::ChatStartResult {
            conversation: conversation.to_string(),
            customer_token: customer_token.clone(),
            chat: Some(chat(view)),
            subscribed: *subscribed,
        }),
        Ack::CustomerResume { chat: view } => R::CustomerResume(pb::CustomerResumeResult { chat: Some(chat(view)) }),
        Ack::AgentSignIn { agent: view } => R::AgentSignIn(pb::AgentSignInResult { agent: Some(agent(view)) }),
        Ack::AgentSetStatus { agent: view } => R::AgentSetStatus(pb::AgentSetStatusResult { agent: Some(agent(view)) }),
        Ack::QueueList { entries } => {
            R::QueueList(pb::QueueListResult { entries: entries.iter().map(waiting_entry).collect() })
        }
        Ack::ChatAccept { chat: view } => R::ChatAccept(pb::ChatAcceptResult { chat: Some(chat(view)) }),
        Ack::ChatSubscribe { chat: view } => R::ChatSubscribe(pb::ChatSubscribeResult { chat: Some(chat(view)) }),
        Ack::ChatTranscript { chat: view, events } => R::ChatTranscript(pb::ChatTranscriptResult {
            chat: Some(chat(view)),
            events: events.iter().map(event).collect(),
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
            let (reason, agent) = match reason {
                LeftQueue::Accepted { agent } => (pb::QueueRemovedReason::Accepted, Some(agent.to_string())),
                LeftQueue::Cancelled => (pb::QueueRemovedReason::Cancelled, None),
                LeftQueue::Closed => (pb::QueueRemovedReason::Closed, None),
            };
            Frame::QueueRemoved(pb::QueueRemoved {
                conversation: conversation.to_string(),
                reason: reason.into(),
                agent,
            })
        }
        PushFrame::QueuePosition { conversation, position } => Frame::QueuePosition(pb::QueuePosition {
            conversation: conversation.to_string(),
            position: to_u64(*position),
        }),
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
    use pb::event::{Accepted, Body, Cancelled, Closed, Created, Delivered, Message};
    let body = match &event.body {
        EventBody::Created { group, customer_name, question } => Body::Created(Created {
            group: group.to_string(),
            customer_name: customer_name.clone(),
            question: question.clone(),
        }),
        EventBody::Accepted { agent } => Body::Accepted(Accepted { agent: agent.to_string() }),
        EventBody::Message { body } => Body::Message(Message { body: body.clone() }),
        EventBody::Delivered { up_to_seq } => Body::Delivered(Delivered { up_to_seq: *up_to_seq }),
        EventBody::Closed => Body::Closed(Closed {}),
        EventBody::Cancelled => Body::Cancelled(Cancelled {}),
    };
    pb::Event {
        seq: event.seq,
        at_ms: event.at_ms,
        author: Some(author(&event.author)),
        client_msg_id: event.client_msg_id.clone(),
        body: Some(body),
    }
}
