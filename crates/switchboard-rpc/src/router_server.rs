//! A router node (`RouterApi + PeerApi`) served as the generated `RouterService`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_proto::internal::v1::router_service_server::{RouterService, RouterServiceServer};
use switchboard_proto::internal::v1::{
    AcceptChatRequest, AgentAvailabilityMsg, AgentFinishedRequest, AgentOfferRequest, AgentRequest,
    AgentSubscriptionRequest, AgentViewReply, AuthorizeCustomerRequest, ChatViewReply, ChatViewRequest, CommandCall,
    CommandReply, CommandRequest, CommandResult, ConnectRequest, ConversationSystemReply, ConversationSystemRequest,
    CustomerConnectionRequest, Empty, EventsReply, ForwardChatRequest, ListChatsReply, ListChatsRequest,
    OfflineMessageRequest, OwnerAcceptRequest, OwnerForwardRequest, PushFrame, QueueAddRequest,
    QueueAgentChangedRequest, QueueRemoveRequest, QueueRequest, RejectOfferRequest, RouterCall, RouterCallResult,
    RouterReadEventsRequest, SetAgentStatusRequest, StartChatRequest, StartedChatReply, SubscribeRequest, TicketReply,
    TransferChatRequest, TypingRequest, UnsubscribeRequest, router_call, router_call_result,
};
use switchboard_proto::router::{PeerApi, Push, RouterApi, RouterError};
use switchboard_telemetry::serve_streamed_call;
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::{Request, Response, Status, Streaming};

use crate::call_stream::{command_result, router_call_result, serve_call_stream, within_deadline};
use crate::channel::MAX_MESSAGE_BYTES;
use crate::convert::{
    agent_id, agent_status, agent_view_to_proto, availability_from_proto, availability_to_proto, caller_from_proto,
    chat_list, chat_view_to_proto, command_from_proto, conversation_id, events_to_proto, gateway_id, group_id,
    keepalive_frame, left_queue_from_proto, offer_update_from_proto, offline_message_from_proto, outcome_to_proto,
    push_to_frame, shown_offers_from_proto, start_chat_from_proto, started_chat_to_proto, system_command_from_proto,
    tenant_id, ticket_to_proto, waiting_entry_from_proto,
};
use crate::error::status_from_router_error;
use crate::serve::Draining;

/// How often a push stream carries a keepalive frame by default.
const DEFAULT_KEEPALIVE_EVERY: Duration = Duration::from_secs(5);

/// Serves a router node: the gateway-facing `RouterApi` and the router-to-router `PeerApi`.
///
/// `T` is a `Router`, or anything else that is both (`dyn ClusterApi` included).
pub struct RouterGrpcServer<T: ?Sized> {
    node: Arc<T>,
    keepalive_every: Duration,
    draining: Draining,
}

impl<T: ?Sized> Clone for RouterGrpcServer<T> {
    fn clone(&self) -> Self {
        RouterGrpcServer {
            node: self.node.clone(),
            keepalive_every: self.keepalive_every,
            draining: self.draining.clone(),
        }
    }
}

impl<T: ?Sized> std::fmt::Debug for RouterGrpcServer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterGrpcServer").field("keepalive_every", &self.keepalive_every).finish_non_exhaustive()
    }
}

impl<T: RouterApi + PeerApi + ?Sized> RouterGrpcServer<T> {
    pub fn new(node: Arc<T>) -> Self {
        RouterGrpcServer { node, keepalive_every: DEFAULT_KEEPALIVE_EVERY, draining: Draining::never() }
    }

    /// How often a push stream carries a keepalive frame (default 5 s).
    pub fn with_keepalive(mut self, every: Duration) -> Self {
        self.keepalive_every = every.max(Duration::from_millis(1));
        self
    }

    /// Ends every push stream when the server drains (see [`crate::GrpcServices::draining`]), so that a
    /// graceful shutdown does not wait for them: each gateway sees its stream end and reconnects elsewhere.
    pub fn with_draining(mut self, draining: Draining) -> Self {
        self.draining = draining;
        self
    }

    /// The generated service, to add to [`crate::GrpcServices`].
    pub fn into_service(self) -> RouterServiceServer<Self> {
        RouterServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The service's name in its calls' metrics and spans.
const ROUTER_SERVICE: &str = "switchboard.internal.v1.RouterService";

type Served<'a> = Pin<Box<dyn Future<Output = Result<router_call_result::Reply, Status>> + Send + 'a>>;

/// A unary method's answer as a result on the `Calls` stream carries it.
fn served<'a, R: Send + 'a>(
    call: impl Future<Output = Result<Response<R>, Status>> + Send + 'a,
    reply: fn(R) -> router_call_result::Reply,
) -> Served<'a> {
    Box::pin(async move { call.await.map(|response| reply(response.into_inner())) })
}

impl<T: RouterApi + PeerApi + ?Sized> RouterGrpcServer<T> {
    /// One call of the `Calls` stream, served by the unary method it names: the method's name (for the
    /// call's metrics and span) and its answer.
    fn serve_call(&self, call: router_call::Request) -> (&'static str, Served<'_>) {
        use router_call::Request as Call;
        use router_call_result::Reply;
        match call {
            Call::StartChat(r) => ("StartChat", served(self.start_chat(Request::new(r)), Reply::StartedChat)),
            Call::AuthorizeCustomer(r) => {
                ("AuthorizeCustomer", served(self.authorize_customer(Request::new(r)), Reply::ChatView))
            }
            Call::ChatView(r) => ("ChatView", served(self.chat_view(Request::new(r)), Reply::ChatView)),
            Call::Subscribe(r) => ("Subscribe", served(self.subscribe(Request::new(r)), Reply::Events)),
            Call::Unsubscribe(r) => ("Unsubscribe", served(self.unsubscribe(Request::new(r)), Reply::Empty)),
            Call::ReadEvents(r) => ("ReadEvents", served(self.read_events(Request::new(r)), Reply::Events)),
            Call::Typing(r) => ("Typing", served(self.typing(Request::new(r)), Reply::Empty)),
            Call::CustomerConnection(r) => {
                ("CustomerConnection", served(self.customer_connection(Request::new(r)), Reply::Empty))
            }
            Call::AcceptChat(r) => ("AcceptChat", served(self.accept_chat(Request::new(r)), Reply::ChatView)),
            Call::SetAgentStatus(r) => {
                ("SetAgentStatus", served(self.set_agent_status(Request::new(r)), Reply::AgentView))
            }
            Call::SubscribeQueue(r) => ("SubscribeQueue", served(self.subscribe_queue(Request::new(r)), Reply::Empty)),
            Call::UnsubscribeQueue(r) => {
                ("UnsubscribeQueue", served(self.unsubscribe_queue(Request::new(r)), Reply::Empty))
            }
            Call::ListChats(r) => ("ListChats", served(self.list_chats(Request::new(r)), Reply::Chats)),
            Call::OwnerAccept(r) => ("OwnerAccept", served(self.owner_accept(Request::new(r)), Reply::ChatView)),
            Call::QueueAdd(r) => ("QueueAdd", served(self.queue_add(Request::new(r)), Reply::Empty)),
            Call::QueueRemove(r) => ("QueueRemove", served(self.queue_remove(Request::new(r)), Reply::Empty)),
            Call::AgentFinished(r) => ("AgentFinished", served(self.agent_finished(Request::new(r)), Reply::Empty)),
            Call::SubscribeAgent(r) => ("SubscribeAgent", served(self.subscribe_agent(Request::new(r)), Reply::Empty)),
            Call::UnsubscribeAgent(r) => {
                ("UnsubscribeAgent", served(self.unsubscribe_agent(Request::new(r)), Reply::Empty))
            }
            Call::RejectOffer(r) => ("RejectOffer", served(self.reject_offer(Request::new(r)), Reply::Empty)),
            Call::TransferChat(r) => ("TransferChat", served(self.transfer_chat(Request::new(r)), Reply::ChatView)),
            Call::ForwardChat(r) => ("ForwardChat", served(self.forward_chat(Request::new(r)), Reply::ChatView)),
            Call::LeaveOfflineMessage(r) => {
                ("LeaveOfflineMessage", served(self.leave_offline_message(Request::new(r)), Reply::Ticket))
            }
            Call::ConversationSystem(r) => {
                ("ConversationSystem", served(self.conversation_system(Request::new(r)), Reply::ConversationSystem))
            }
            Call::AgentOffer(r) => ("AgentOffer", served(self.agent_offer(Request::new(r)), Reply::Empty)),
            Call::AgentAvailability(r) => {
                ("AgentAvailability", served(self.agent_availability(Request::new(r)), Reply::Availability))
            }
            Call::QueueAgentChanged(r) => {
                ("QueueAgentChanged", served(self.queue_agent_changed(Request::new(r)), Reply::Empty))
            }
            Call::OwnerForward(r) => ("OwnerForward", served(self.owner_forward(Request::new(r)), Reply::ChatView)),
        }
    }
}

/// `Command`, whichever way it came (a unary call, or a call on the `Commands` stream).
async fn command<T: RouterApi + ?Sized>(node: &T, request: &CommandRequest) -> Result<CommandReply, Status> {
    let caller = caller_from_proto(request.caller.as_ref())?;
    let conversation = conversation_id(&request.conversation_id)?;
    let command = command_from_proto(request.command.as_ref())?;
    let result = node.command(&caller, conversation, command).await;
    answer(result, |outcome| outcome_to_proto(conversation, outcome)).map(Response::into_inner)
}

fn answer<T, R>(result: Result<T, RouterError>, to_proto: impl FnOnce(&T) -> R) -> Result<Response<R>, Status> {
    match result {
        Ok(value) => Ok(Response::new(to_proto(&value))),
        Err(error) => Err(status_from_router_error(&error)),
    }
}

fn empty(result: Result<(), RouterError>) -> Result<Response<Empty>, Status> {
    answer(result, |()| Empty {})
}

fn chat_view_reply(view: &switchboard_proto::router::ChatView) -> ChatViewReply {
    ChatViewReply { view: Some(chat_view_to_proto(view)) }
}

/// The frames of one `PushStream` call: every push the node sends to the gateway, and a keepalive every
/// interval. It ends when the node drops the gateway's sink (a newer stream for the same gateway replaced
/// it) or the server drains.
pub struct PushFrames {
    pushes: mpsc::UnboundedReceiver<Push>,
    keepalive: Interval,
    draining: Option<WatchStream<bool>>,
    done: bool,
}

impl std::fmt::Debug for PushFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushFrames").field("done", &self.done).finish_non_exhaustive()
    }
}

impl Stream for PushFrames {
    type Item = Result<PushFrame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(draining) = this.draining.as_mut() {
            loop {
                match Pin::new(&mut *draining).poll_next(cx) {
                    Poll::Ready(Some(false)) => continue,
                    Poll::Ready(Some(true)) => {
                        this.done = true;
                        return Poll::Ready(None);
                    }
                    // The server is gone without draining: nothing more to watch.
                    Poll::Ready(None) => {
                        this.draining = None;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        match this.pushes.poll_recv(cx) {
            Poll::Ready(Some(push)) => return Poll::Ready(Some(Ok(push_to_frame(&push)))),
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        match this.keepalive.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(keepalive_frame()))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[async_trait]
impl<T: RouterApi + PeerApi + ?Sized> RouterService for RouterGrpcServer<T> {
    type PushStreamStream = PushFrames;

    async fn push_stream(&self, request: Request<ConnectRequest>) -> Result<Response<PushFrames>, Status> {
        let gateway = gateway_id(&request.get_ref().gateway_id)?;
        let (sink, pushes) = mpsc::unbounded_channel();
        self.node.connect_gateway(gateway, sink);
        let start = tokio::time::Instant::now() + self.keepalive_every;
        let mut keepalive = tokio::time::interval_at(start, self.keepalive_every);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let draining = self.draining.receiver().map(WatchStream::new);
        Ok(Response::new(PushFrames { pushes, keepalive, draining, done: false }))
    }

    async fn start_chat(&self, request: Request<StartChatRequest>) -> Result<Response<StartedChatReply>, Status> {
        let request = start_chat_from_proto(request.get_ref())?;
        answer(self.node.start_chat(request).await, started_chat_to_proto)
    }

    async fn authorize_customer(
        &self,
        request: Request<AuthorizeCustomerRequest>,
    ) -> Result<Response<ChatViewReply>, Status> {
        let request = request.get_ref();
        let conversation = conversation_id(&request.conversation_id)?;
        answer(self.node.authorize_customer(conversation, &request.token).await, chat_view_reply)
    }

    async fn chat_view(&self, request: Request<ChatViewRequest>) -> Result<Response<ChatViewReply>, Status> {
        let request = request.get_ref();
        let caller = caller_from_proto(request.caller.as_ref())?;
        let conversation = conversation_id(&request.conversation_id)?;
        answer(self.node.chat_view(&caller, conversation).await, chat_view_reply)
    }

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<EventsReply>, Status> {
        let request = request.get_ref();
        let gateway = gateway_id(&request.gateway_id)?;
        let caller = caller_from_proto(request.caller.as_ref())?;
        let conversation = conversation_id(&request.conversation_id)?;
        let result = self.node.subscribe(&gateway, &caller, conversation, request.after_seq).await;
        answer(result, |events| events_to_proto(conversation, events))
    }

    async fn unsubscribe(&self, request: Request<UnsubscribeRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let gateway = gateway_id(&request.gateway_id)?;
        let conversation = conversation_id(&request.conversation_id)?;
        self.node.unsubscribe(&gateway, conversation).await;
        Ok(Response::new(Empty {}))
    }

    async fn read_events(&self, request: Request<RouterReadEventsRequest>) -> Result<Response<EventsReply>, Status> {
        let request = request.get_ref();
        let caller = caller_from_proto(request.caller.as_ref())?;
        let conversation = conversation_id(&request.conversation_id)?;
        let result = self.node.read_events(&caller, conversation, request.after_seq).await;
        answer(result, |events| events_to_proto(conversation, events))
    }

    async fn command(&self, request: Request<CommandRequest>) -> Result<Response<CommandReply>, Status> {
        command(&*self.node, request.get_ref()).await.map(Response::new)
    }

    type CommandsStream = ReceiverStream<Result<CommandResult, Status>>;

    async fn commands(
        &self,
        request: Request<Streaming<CommandCall>>,
    ) -> Result<Response<Self::CommandsStream>, Status> {
        let node = self.node.clone();
        let results = serve_call_stream(request.into_inner(), self.draining.clone(), move |call: CommandCall| {
            let node = node.clone();
            async move {
                let context = call.context.unwrap_or_default();
                let request = call.request.unwrap_or_default();
                let outcome = serve_streamed_call(
                    ROUTER_SERVICE,
                    "Command",
                    &context.traceparent,
                    context.received_at_us,
                    within_deadline(&context, command(&*node, &request)),
                )
                .await;
                command_result(call.id, outcome)
            }
        });
        Ok(Response::new(results))
    }

    type CallsStream = ReceiverStream<Result<RouterCallResult, Status>>;

    async fn calls(&self, request: Request<Streaming<RouterCall>>) -> Result<Response<Self::CallsStream>, Status> {
        let server = self.clone();
        let results = serve_call_stream(request.into_inner(), self.draining.clone(), move |call: RouterCall| {
            let server = server.clone();
            async move {
                let context = call.context.unwrap_or_default();
                let outcome = match call.request {
                    // A method newer than this router.
                    None => Err(Status::unimplemented("a call of a method this router does not know")),
                    Some(request) => {
                        let (method, served) = server.serve_call(request);
                        let served = within_deadline(&context, served);
                        serve_streamed_call(
                            ROUTER_SERVICE,
                            method,
                            &context.traceparent,
                            context.received_at_us,
                            served,
                        )
                        .await
                    }
                };
                router_call_result(call.id, outcome)
            }
        });
        Ok(Response::new(results))
    }

    async fn typing(&self, request: Request<TypingRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let caller = caller_from_proto(request.caller.as_ref())?;
        let conversation = conversation_id(&request.conversation_id)?;
        empty(self.node.typing(&caller, conversation, request.typing).await)
    }

    async fn customer_connection(
        &self,
        request: Request<CustomerConnectionRequest>,
    ) -> Result<Response<Empty>, Status> {
        let conversation = conversation_id(&request.get_ref().conversation_id)?;
        empty(self.node.customer_connection(conversation).await)
    }

    async fn accept_chat(&self, request: Request<AcceptChatRequest>) -> Result<Response<ChatViewReply>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let agent = agent_id(&request.agent_id)?;
        let conversation = conversation_id(&request.conversation_id)?;
        answer(self.node.accept_chat(&tenant, &agent, conversation).await, chat_view_reply)
    }

    async fn set_agent_status(
        &self,
        request: Request<SetAgentStatusRequest>,
    ) -> Result<Response<AgentViewReply>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let agent = agent_id(&request.agent_id)?;
        let status = agent_status(&request.status)?;
        answer(self.node.set_agent_status(&tenant, &agent, status).await, agent_view_to_proto)
    }

    async fn subscribe_queue(&self, request: Request<QueueRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let gateway = gateway_id(&request.gateway_id)?;
        let tenant = tenant_id(&request.tenant_id)?;
        let group = group_id(&request.group_id)?;
        empty(self.node.subscribe_queue(&gateway, &tenant, &group).await)
    }

    async fn unsubscribe_queue(&self, request: Request<QueueRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let gateway = gateway_id(&request.gateway_id)?;
        let tenant = tenant_id(&request.tenant_id)?;
        let group = group_id(&request.group_id)?;
        self.node.unsubscribe_queue(&gateway, &tenant, &group).await;
        Ok(Response::new(Empty {}))
    }

    async fn list_chats(&self, request: Request<ListChatsRequest>) -> Result<Response<ListChatsReply>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let agent = agent_id(&request.agent_id)?;
        let list = chat_list(&request.list)?;
        answer(self.node.list_chats(&tenant, &agent, list).await, |chats| ListChatsReply {
            chats: chats.iter().map(chat_view_to_proto).collect(),
        })
    }

    async fn owner_accept(&self, request: Request<OwnerAcceptRequest>) -> Result<Response<ChatViewReply>, Status> {
        let request = request.get_ref();
        let conversation = conversation_id(&request.conversation_id)?;
        let agent = agent_id(&request.agent_id)?;
        answer(self.node.owner_accept(conversation, &agent).await, chat_view_reply)
    }

    async fn queue_add(&self, request: Request<QueueAddRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let entry = request.entry.as_ref().ok_or_else(|| Status::invalid_argument("missing waiting entry"))?;
        let entry = waiting_entry_from_proto(entry)?;
        empty(self.node.queue_add(&tenant, entry, request.waiting_since_us).await)
    }

    async fn queue_remove(&self, request: Request<QueueRemoveRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let group = group_id(&request.group_id)?;
        let removed = request.removed.as_ref().ok_or_else(|| Status::invalid_argument("missing removal"))?;
        let (conversation, reason) = left_queue_from_proto(removed)?;
        empty(self.node.queue_remove(&tenant, &group, conversation, reason).await)
    }

    async fn agent_finished(&self, request: Request<AgentFinishedRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let agent = agent_id(&request.agent_id)?;
        let conversation = conversation_id(&request.conversation_id)?;
        empty(self.node.agent_finished(&tenant, &agent, conversation).await)
    }

    async fn subscribe_agent(&self, request: Request<AgentSubscriptionRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let gateway = gateway_id(&request.gateway_id)?;
        let tenant = tenant_id(&request.tenant_id)?;
        let agent = agent_id(&request.agent_id)?;
        let shown = shown_offers_from_proto(&request.shown_offers)?;
        empty(self.node.subscribe_agent(&gateway, &tenant, &agent, &shown).await)
    }

    async fn unsubscribe_agent(&self, request: Request<AgentSubscriptionRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let gateway = gateway_id(&request.gateway_id)?;
        let tenant = tenant_id(&request.tenant_id)?;
        let agent = agent_id(&request.agent_id)?;
        self.node.unsubscribe_agent(&gateway, &tenant, &agent).await;
        Ok(Response::new(Empty {}))
    }

    async fn reject_offer(&self, request: Request<RejectOfferRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let group = group_id(&request.group_id)?;
        let agent = agent_id(&request.agent_id)?;
        let conversation = conversation_id(&request.conversation_id)?;
        empty(self.node.reject_offer(&tenant, &group, &agent, conversation).await)
    }

    async fn transfer_chat(&self, request: Request<TransferChatRequest>) -> Result<Response<ChatViewReply>, Status> {
        let request = request.get_ref();
        let caller = caller_from_proto(request.caller.as_ref())?;
        let conversation = conversation_id(&request.conversation_id)?;
        let to_group = group_id(&request.to_group_id)?;
        answer(self.node.transfer_chat(&caller, conversation, &to_group).await, chat_view_reply)
    }

    async fn forward_chat(&self, request: Request<ForwardChatRequest>) -> Result<Response<ChatViewReply>, Status> {
        let request = request.get_ref();
        let caller = caller_from_proto(request.caller.as_ref())?;
        let conversation = conversation_id(&request.conversation_id)?;
        let to_agent = agent_id(&request.to_agent_id)?;
        answer(self.node.forward_chat(&caller, conversation, &to_agent).await, chat_view_reply)
    }

    async fn leave_offline_message(
        &self,
        request: Request<OfflineMessageRequest>,
    ) -> Result<Response<TicketReply>, Status> {
        let message = offline_message_from_proto(request.get_ref())?;
        answer(self.node.leave_offline_message(message).await, ticket_to_proto)
    }

    async fn conversation_system(
        &self,
        request: Request<ConversationSystemRequest>,
    ) -> Result<Response<ConversationSystemReply>, Status> {
        let request = request.get_ref();
        let conversation = conversation_id(&request.conversation_id)?;
        let command = system_command_from_proto(request.command.as_ref())?;
        answer(self.node.conversation_system(conversation, command).await, |stored| ConversationSystemReply {
            stored: *stored,
        })
    }

    async fn agent_offer(&self, request: Request<AgentOfferRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let agent = agent_id(&request.agent_id)?;
        let update = offer_update_from_proto(request.update.as_ref())?;
        empty(self.node.agent_offer(&tenant, &agent, update).await)
    }

    async fn agent_availability(
        &self,
        request: Request<AgentRequest>,
    ) -> Result<Response<AgentAvailabilityMsg>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let agent = agent_id(&request.agent_id)?;
        answer(self.node.agent_availability(&tenant, &agent).await, availability_to_proto)
    }

    async fn queue_agent_changed(&self, request: Request<QueueAgentChangedRequest>) -> Result<Response<Empty>, Status> {
        let request = request.get_ref();
        let tenant = tenant_id(&request.tenant_id)?;
        let group = group_id(&request.group_id)?;
        let availability = request
            .availability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("missing availability"))
            .and_then(availability_from_proto)?;
        empty(self.node.queue_agent_changed(&tenant, &group, availability).await)
    }

    async fn owner_forward(&self, request: Request<OwnerForwardRequest>) -> Result<Response<ChatViewReply>, Status> {
        let request = request.get_ref();
        let caller = caller_from_proto(request.caller.as_ref())?;
        let conversation = conversation_id(&request.conversation_id)?;
        let to_agent = agent_id(&request.to_agent_id)?;
        answer(self.node.owner_forward(&caller, conversation, &to_agent).await, chat_view_reply)
    }
}
