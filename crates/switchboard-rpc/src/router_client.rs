//! A client of one router node: `RouterApi` and `PeerApi` over gRPC.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_domain::{AgentAvailability, AgentId, AgentStatus, ConversationId, GroupId, TenantId, WaitingEntry};
use switchboard_proto::internal::v1::router_service_client::RouterServiceClient;
use switchboard_proto::internal::v1::{
    AcceptChatRequest, AgentFinishedRequest, AgentOfferRequest, AgentRequest, AgentSubscriptionRequest,
    AuthorizeCustomerRequest, ChatViewRequest, CommandCall, CommandRequest, CommandResult, ConnectRequest,
    ConversationSystemRequest, CustomerConnectionRequest, ForwardChatRequest, ListChatsRequest, OwnerAcceptRequest,
    OwnerForwardRequest, PushFrame, QueueAddRequest, QueueAgentChangedRequest, QueueRemoveRequest, QueueRequest,
    RejectOfferRequest, RouterCall, RouterCallResult, RouterReadEventsRequest, SetAgentStatusRequest, SubscribeRequest,
    TransferChatRequest, TypingRequest, UnsubscribeRequest, router_call, router_call_result,
};
use switchboard_proto::internal::v1::{
    AgentAvailabilityMsg, AgentViewReply, ChatViewReply, ConversationSystemReply, Empty, EventsReply, ListChatsReply,
    StartedChatReply, TicketReply,
};
use switchboard_proto::router::{
    AgentView, Caller, ChatCommand, ChatList, ChatView, CommandOutcome, EventPage, GatewayId, LeftQueue, OfferUpdate,
    OfflineMessage, PeerApi, Push, RouterApi, RouterError, ShownOffer, StartChat, StartedChat, SystemCommand, Ticket,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tracing::{debug, info, warn};

use crate::call_stream::{Attempt, CallStream, Open, command_call, router_call};
use crate::channel::{ClientSettings, MAX_MESSAGE_BYTES, lazy_channel, unary};
use crate::convert::{
    agent_view_from_proto, availability_from_proto, availability_to_proto, caller_to_proto, chat_list_str,
    chat_view_from_proto, chat_view_from_reply, command_to_proto, events_from_proto, left_queue_to_proto,
    offer_update_to_proto, offline_message_to_proto, outcome_from_proto, push_from_frame, reply_error,
    shown_offers_to_proto, start_chat_to_proto, started_chat_from_proto, system_command_to_proto, ticket_from_proto,
    waiting_entry_to_proto,
};
use crate::error::{ERROR_CODE, router_error_from_status};

/// What happened to the push stream a [`GrpcRouterNode::connect_gateway_observed`] task maintains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushLinkEvent {
    /// The stream is open: pushes flow from now on. Subscriptions made before a `Lost` must be made again
    /// (the router forgets a gateway's subscriptions when its stream goes), and pushes in between are lost:
    /// resubscribe with the last seq seen to fill the gap.
    Connected,
    /// The stream failed or ended; the task reopens it after a backoff.
    Lost(RouterError),
}

/// A client of *one* router node, at one URL.
///
/// Every unary call has the request timeout of [`ClientSettings`]; a timeout, a refused connection or any
/// other transport failure is the retryable [`RouterError::Unavailable`]. The channel connects on first
/// use and reconnects by itself. The push stream of a gateway is opened with [`Self::open_push_stream`]
/// (the primitive), or kept open with reconnects by [`RouterApi::connect_gateway`].
///
/// Dropping the node stops the tasks `connect_gateway` started.
pub struct GrpcRouterNode {
    url: Arc<str>,
    client: RouterServiceClient<Channel>,
    settings: ClientSettings,
    push_tasks: Mutex<HashMap<GatewayId, JoinHandle<()>>>,
    /// `command`, the call of every message, goes on this stream (the unary `Command` is the fallback for
    /// a router that does not know it).
    commands: CallStream<CommandCall, CommandResult>,
    /// Every other unary call goes on this one (the unary call is the fallback, as for `commands`).
    calls: CallStream<RouterCall, RouterCallResult>,
}

impl std::fmt::Debug for GrpcRouterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcRouterNode").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Drop for GrpcRouterNode {
    fn drop(&mut self) {
        for task in self.push_tasks.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).values() {
            task.abort();
        }
    }
}

impl GrpcRouterNode {
    /// A client of the router node at `url` (`http://host:port`); nothing is connected until the first call.
    pub fn connect_lazy(url: &str, settings: ClientSettings) -> Result<Self, RouterError> {
        let channel = lazy_channel(url, &settings).map_err(RouterError::Internal)?;
        Ok(Self::from_channel(url, channel, settings))
    }

    /// A client over a channel built elsewhere (`url` only names it in errors and logs).
    pub fn from_channel(url: &str, channel: Channel, settings: ClientSettings) -> Self {
        let client = RouterServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let opener = client.clone();
        let open: Open<CommandCall, CommandResult> = Arc::new(move |calls| {
            let mut client = opener.clone();
            Box::pin(async move { client.commands(calls).await.map(tonic::Response::into_inner) })
        });
        let commands = CallStream::new("Commands", settings.request_timeout, open);
        let opener = client.clone();
        let open: Open<RouterCall, RouterCallResult> = Arc::new(move |calls| {
            let mut client = opener.clone();
            Box::pin(async move { client.calls(calls).await.map(tonic::Response::into_inner) })
        });
        let calls = CallStream::new("Calls", settings.request_timeout, open);
        GrpcRouterNode { url: url.into(), client, settings, push_tasks: Mutex::default(), commands, calls }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Opens the push stream of `gateway` on this node, replacing any earlier stream of the same gateway
    /// there. When this returns, the node has registered the stream: a subscription made after it has its
    /// pushes on this stream.
    ///
    /// The stream yields pushes (keepalives are consumed) until it fails — the connection broke, the node
    /// ended it (drained, or a newer stream for the gateway replaced it), or no frame came for
    /// `push_idle_timeout` — and then yields one error, its last item. Opening is bounded by the request
    /// timeout; the stream itself is not.
    pub async fn open_push_stream(&self, gateway: &GatewayId) -> Result<PushStream, RouterError> {
        open_push_stream(self.client.clone(), self.url.clone(), &self.settings, gateway).await
    }

    /// [`RouterApi::connect_gateway`], also telling `link` every time the stream is (re)opened or lost, so
    /// that the caller knows when to resubscribe.
    pub fn connect_gateway_observed(
        &self,
        gateway: GatewayId,
        sink: mpsc::UnboundedSender<Push>,
        link: mpsc::UnboundedSender<PushLinkEvent>,
    ) {
        let forwarder = Forwarder {
            client: self.client.clone(),
            url: self.url.clone(),
            settings: self.settings.clone(),
            gateway: gateway.clone(),
            sink,
            link,
        };
        let task = tokio::spawn(forwarder.run());
        let mut tasks = self.push_tasks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tasks.retain(|_, task| !task.is_finished());
        if let Some(previous) = tasks.insert(gateway, task) {
            previous.abort();
        }
    }

    /// Makes one call on the `Calls` stream (`as_call` says which method it is), or as the unary call `call`
    /// when the router does not know the stream.
    async fn call<M, R, F, Fut>(
        &self,
        message: M,
        as_call: fn(M) -> router_call::Request,
        call: F,
    ) -> Result<R, RouterError>
    where
        M: Clone,
        R: CallReply,
        F: FnOnce(RouterServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let make = |message, id, context| router_call(as_call(message), id, context);
        match self.calls.call_or_unary(self.settings.request_timeout, message, make).await {
            Attempt::Answered(outcome) => outcome
                .and_then(|reply| {
                    R::from_reply(reply).ok_or_else(|| Status::internal("the router answered another method's reply"))
                })
                .map_err(|status| self.error_from(&status)),
            Attempt::Unary(message) => self.unary(message, call).await,
        }
    }

    async fn unary<M, R, F, Fut>(&self, message: M, call: F) -> Result<R, RouterError>
    where
        F: FnOnce(RouterServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let client = self.client.clone();
        unary(self.settings.request_timeout, message, |request| call(client, request))
            .await
            .map_err(|status| self.error_from(&status))
    }

    fn error_from(&self, status: &Status) -> RouterError {
        match router_error_from_status(status) {
            // A transport failure says which server it could not reach; the server's own errors are kept as
            // they were raised.
            RouterError::Unavailable(text) if !status.metadata().contains_key(ERROR_CODE) => {
                RouterError::Unavailable(format!("{}: {text}", self.url))
            }
            other => other,
        }
    }
}

async fn open_push_stream(
    mut client: RouterServiceClient<Channel>,
    url: Arc<str>,
    settings: &ClientSettings,
    gateway: &GatewayId,
) -> Result<PushStream, RouterError> {
    let request = ConnectRequest { gateway_id: gateway.0.clone() };
    let open = async move { client.push_stream(request).await };
    let frames = match tokio::time::timeout(settings.request_timeout, open).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(router_error_from_status(&status)),
        Err(_) => {
            let timeout = settings.request_timeout;
            return Err(RouterError::Unavailable(format!("{url}: no push stream within {timeout:?}")));
        }
    };
    let idle_timeout = settings.push_idle_timeout;
    Ok(PushStream { frames, url, idle_timeout, idle: Box::pin(tokio::time::sleep(idle_timeout)), done: false })
}

/// The pushes of one push stream (see [`GrpcRouterNode::open_push_stream`]). After an error, which is its
/// last item, it ends.
pub struct PushStream {
    frames: Streaming<PushFrame>,
    url: Arc<str>,
    idle_timeout: Duration,
    /// When the stream is considered dead if no frame arrived.
    idle: Pin<Box<Sleep>>,
    done: bool,
}

impl std::fmt::Debug for PushStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushStream").field("url", &self.url).field("done", &self.done).finish_non_exhaustive()
    }
}

impl PushStream {
    fn fail(&mut self, error: RouterError) -> Poll<Option<Result<Push, RouterError>>> {
        self.done = true;
        Poll::Ready(Some(Err(error)))
    }
}

impl Stream for PushStream {
    type Item = Result<Push, RouterError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.frames).poll_next(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                    match push_from_frame(&frame) {
                        Ok(Some(push)) => return Poll::Ready(Some(Ok(push))),
                        Ok(None) => continue, // a keepalive
                        Err(status) => return this.fail(reply_error(status)),
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    let error = match router_error_from_status(&status) {
                        RouterError::Unavailable(text) if !status.metadata().contains_key(ERROR_CODE) => {
                            RouterError::Unavailable(format!("{}: {text}", this.url))
                        }
                        other => other,
                    };
                    return this.fail(error);
                }
                Poll::Ready(None) => {
                    let error = RouterError::Unavailable(format!("{}: the push stream was ended", this.url));
                    return this.fail(error);
                }
                Poll::Pending => break,
            }
        }
        match this.idle.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let error = RouterError::Unavailable(format!(
                    "{}: no frame on the push stream for {:?}",
                    this.url, this.idle_timeout
                ));
                this.fail(error)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The task behind `connect_gateway`: keeps the push stream open and forwards its pushes into the sink,
/// until the sink is closed.
struct Forwarder {
    client: RouterServiceClient<Channel>,
    url: Arc<str>,
    settings: ClientSettings,
    gateway: GatewayId,
    sink: mpsc::UnboundedSender<Push>,
    link: mpsc::UnboundedSender<PushLinkEvent>,
}

impl Forwarder {
    async fn run(self) {
        let mut backoff = self.settings.reconnect_initial;
        loop {
            let opened = tokio::select! {
                () = self.sink.closed() => return,
                opened = open_push_stream(self.client.clone(), self.url.clone(), &self.settings, &self.gateway) => opened,
            };
            let error = match opened {
                Ok(mut stream) => {
                    info!(url = %self.url, gateway = %self.gateway.0, "push stream open");
                    backoff = self.settings.reconnect_initial;
                    let _ = self.link.send(PushLinkEvent::Connected);
                    loop {
                        let next = tokio::select! {
                            () = self.sink.closed() => return,
                            next = stream.next() => next,
                        };
                        match next {
                            Some(Ok(push)) => {
                                if self.sink.send(push).is_err() {
                                    return;
                                }
                            }
                            Some(Err(error)) => break error,
                            None => break RouterError::Unavailable("the push stream ended".into()),
                        }
                    }
                }
                Err(error) => error,
            };
            warn!(url = %self.url, gateway = %self.gateway.0, %error, ?backoff, "push stream lost; reopening");
            let _ = self.link.send(PushLinkEvent::Lost(error));
            tokio::select! {
                () = self.sink.closed() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.settings.reconnect_max);
            debug!(url = %self.url, gateway = %self.gateway.0, "reopening the push stream");
        }
    }
}

/// What a unary method of `RouterService` answers, as a result on the `Calls` stream carries it.
trait CallReply: Sized {
    fn from_reply(reply: router_call_result::Reply) -> Option<Self>;
}

macro_rules! call_replies {
    ($($reply:ty => $variant:ident),* $(,)?) => {$(
        impl CallReply for $reply {
            fn from_reply(reply: router_call_result::Reply) -> Option<Self> {
                match reply {
                    router_call_result::Reply::$variant(reply) => Some(reply),
                    _ => None,
                }
            }
        }
    )*};
}

call_replies!(
    Empty => Empty,
    StartedChatReply => StartedChat,
    ChatViewReply => ChatView,
    EventsReply => Events,
    AgentViewReply => AgentView,
    ListChatsReply => Chats,
    TicketReply => Ticket,
    ConversationSystemReply => ConversationSystem,
    AgentAvailabilityMsg => Availability,
);

fn read<T>(result: Result<T, Status>) -> Result<T, RouterError> {
    result.map_err(reply_error)
}

#[async_trait]
impl RouterApi for GrpcRouterNode {
    /// Keeps the gateway's push stream on this node open, reopening it with backoff when it fails, and
    /// forwards every push into `sink` until the sink is closed (or the node is dropped). Replaces the
    /// task of an earlier call for the same gateway. To know when to resubscribe after a reconnect, use
    /// [`GrpcRouterNode::connect_gateway_observed`].
    fn connect_gateway(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        self.connect_gateway_observed(gateway, sink, mpsc::unbounded_channel().0);
    }

    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError> {
        let request = start_chat_to_proto(&request);
        let reply = self
            .call(request, router_call::Request::StartChat, |mut client, request| async move {
                client.start_chat(request).await
            })
            .await?;
        read(started_chat_from_proto(&reply))
    }

    async fn authorize_customer(&self, conversation: ConversationId, token: &str) -> Result<ChatView, RouterError> {
        let request = AuthorizeCustomerRequest { conversation_id: conversation.to_string(), token: token.to_owned() };
        let reply = self
            .call(request, router_call::Request::AuthorizeCustomer, |mut client, request| async move {
                client.authorize_customer(request).await
            })
            .await?;
        read(chat_view_from_reply(&reply))
    }

    async fn chat_view(&self, caller: &Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        let request =
            ChatViewRequest { caller: Some(caller_to_proto(caller)), conversation_id: conversation.to_string() };
        let reply = self
            .call(request, router_call::Request::ChatView, |mut client, request| async move {
                client.chat_view(request).await
            })
            .await?;
        read(chat_view_from_reply(&reply))
    }

    async fn subscribe(
        &self,
        gateway: &GatewayId,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        let request = SubscribeRequest {
            gateway_id: gateway.0.clone(),
            caller: Some(caller_to_proto(caller)),
            conversation_id: conversation.to_string(),
            after_seq,
        };
        let reply = self
            .call(request, router_call::Request::Subscribe, |mut client, request| async move {
                client.subscribe(request).await
            })
            .await?;
        read(events_from_proto(&reply))
    }

    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId) {
        let request = UnsubscribeRequest { gateway_id: gateway.0.clone(), conversation_id: conversation.to_string() };
        let result = self
            .call(request, router_call::Request::Unsubscribe, |mut client, request| async move {
                client.unsubscribe(request).await
            })
            .await;
        if let Err(error) = result {
            // The trait has no error here: a node that cannot be told forgets the gateway with its stream.
            debug!(url = %self.url, %error, "unsubscribe failed");
        }
    }

    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        let request = RouterReadEventsRequest {
            caller: Some(caller_to_proto(caller)),
            conversation_id: conversation.to_string(),
            after_seq,
        };
        let reply = self
            .call(request, router_call::Request::ReadEvents, |mut client, request| async move {
                client.read_events(request).await
            })
            .await?;
        read(events_from_proto(&reply))
    }

    async fn command(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError> {
        let request = || CommandRequest {
            caller: Some(caller_to_proto(caller)),
            conversation_id: conversation.to_string(),
            command: Some(command_to_proto(&command)),
        };
        // Not `call_or_unary`: the request is rebuilt from the arguments for the unary call, so no copy is
        // kept even before the stream has opened, and a router that lost the stream still gets the command.
        let make = |id, context| command_call(request(), id, context);
        let reply = match self.commands.call(self.settings.request_timeout, make).await {
            Err(status) if status.code() == Code::Unimplemented => {
                self.unary(request(), |mut client, request| async move { client.command(request).await }).await?
            }
            result => result.map_err(|status| self.error_from(&status))?,
        };
        read(outcome_from_proto(&reply))
    }

    async fn typing(&self, caller: &Caller, conversation: ConversationId, typing: bool) -> Result<(), RouterError> {
        let request =
            TypingRequest { caller: Some(caller_to_proto(caller)), conversation_id: conversation.to_string(), typing };
        self.call(
            request,
            router_call::Request::Typing,
            |mut client, request| async move { client.typing(request).await },
        )
        .await
        .map(drop)
    }

    async fn customer_connection(&self, conversation: ConversationId) -> Result<(), RouterError> {
        let request = CustomerConnectionRequest { conversation_id: conversation.to_string() };
        self.call(request, router_call::Request::CustomerConnection, |mut client, request| async move {
            client.customer_connection(request).await
        })
        .await
        .map(drop)
    }

    async fn accept_chat(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError> {
        let request = AcceptChatRequest {
            tenant_id: tenant.to_string(),
            agent_id: agent.to_string(),
            conversation_id: conversation.to_string(),
        };
        let reply = self
            .call(request, router_call::Request::AcceptChat, |mut client, request| async move {
                client.accept_chat(request).await
            })
            .await?;
        read(chat_view_from_reply(&reply))
    }

    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError> {
        let request = SetAgentStatusRequest {
            tenant_id: tenant.to_string(),
            agent_id: agent.to_string(),
            status: status.as_str().to_owned(),
        };
        let reply = self
            .call(request, router_call::Request::SetAgentStatus, |mut client, request| async move {
                client.set_agent_status(request).await
            })
            .await?;
        read(agent_view_from_proto(&reply))
    }

    async fn subscribe_queue(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        group: &GroupId,
    ) -> Result<(), RouterError> {
        let request =
            QueueRequest { gateway_id: gateway.0.clone(), tenant_id: tenant.to_string(), group_id: group.to_string() };
        self.call(request, router_call::Request::SubscribeQueue, |mut client, request| async move {
            client.subscribe_queue(request).await
        })
        .await
        .map(drop)
    }

    async fn unsubscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId) {
        let request =
            QueueRequest { gateway_id: gateway.0.clone(), tenant_id: tenant.to_string(), group_id: group.to_string() };
        let result = self
            .call(request, router_call::Request::UnsubscribeQueue, |mut client, request| async move {
                client.unsubscribe_queue(request).await
            })
            .await;
        if let Err(error) = result {
            debug!(url = %self.url, %error, "unsubscribe_queue failed");
        }
    }

    async fn list_chats(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        list: ChatList,
    ) -> Result<Vec<ChatView>, RouterError> {
        let request = ListChatsRequest {
            tenant_id: tenant.to_string(),
            agent_id: agent.to_string(),
            list: chat_list_str(list).to_owned(),
        };
        let reply = self
            .call(request, router_call::Request::ListChats, |mut client, request| async move {
                client.list_chats(request).await
            })
            .await?;
        read(reply.chats.iter().map(chat_view_from_proto).collect())
    }

    async fn subscribe_agent(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        agent: &AgentId,
        shown: &[ShownOffer],
    ) -> Result<(), RouterError> {
        let request = AgentSubscriptionRequest {
            gateway_id: gateway.0.clone(),
            tenant_id: tenant.to_string(),
            agent_id: agent.to_string(),
            shown_offers: shown_offers_to_proto(shown),
        };
        self.call(request, router_call::Request::SubscribeAgent, |mut client, request| async move {
            client.subscribe_agent(request).await
        })
        .await
        .map(drop)
    }

    async fn unsubscribe_agent(&self, gateway: &GatewayId, tenant: &TenantId, agent: &AgentId) {
        let request = AgentSubscriptionRequest {
            gateway_id: gateway.0.clone(),
            tenant_id: tenant.to_string(),
            agent_id: agent.to_string(),
            shown_offers: Vec::new(),
        };
        let result = self
            .call(request, router_call::Request::UnsubscribeAgent, |mut client, request| async move {
                client.unsubscribe_agent(request).await
            })
            .await;
        if let Err(error) = result {
            debug!(url = %self.url, %error, "unsubscribe_agent failed");
        }
    }

    async fn reject_offer(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        let request = RejectOfferRequest {
            tenant_id: tenant.to_string(),
            group_id: group.to_string(),
            agent_id: agent.to_string(),
            conversation_id: conversation.to_string(),
        };
        self.call(request, router_call::Request::RejectOffer, |mut client, request| async move {
            client.reject_offer(request).await
        })
        .await
        .map(drop)
    }

    async fn transfer_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_group: &GroupId,
    ) -> Result<ChatView, RouterError> {
        let request = TransferChatRequest {
            caller: Some(caller_to_proto(caller)),
            conversation_id: conversation.to_string(),
            to_group_id: to_group.to_string(),
        };
        let reply = self
            .call(request, router_call::Request::TransferChat, |mut client, request| async move {
                client.transfer_chat(request).await
            })
            .await?;
        read(chat_view_from_reply(&reply))
    }

    async fn forward_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        let request = ForwardChatRequest {
            caller: Some(caller_to_proto(caller)),
            conversation_id: conversation.to_string(),
            to_agent_id: to_agent.to_string(),
        };
        let reply = self
            .call(request, router_call::Request::ForwardChat, |mut client, request| async move {
                client.forward_chat(request).await
            })
            .await?;
        read(chat_view_from_reply(&reply))
    }

    async fn leave_offline_message(&self, message: OfflineMessage) -> Result<Ticket, RouterError> {
        let request = offline_message_to_proto(&message);
        let reply = self
            .call(request, router_call::Request::LeaveOfflineMessage, |mut client, request| async move {
                client.leave_offline_message(request).await
            })
            .await?;
        read(ticket_from_proto(&reply))
    }
}

#[async_trait]
impl PeerApi for GrpcRouterNode {
    async fn owner_accept(&self, conversation: ConversationId, agent: &AgentId) -> Result<ChatView, RouterError> {
        let request = OwnerAcceptRequest { conversation_id: conversation.to_string(), agent_id: agent.to_string() };
        let reply = self
            .call(request, router_call::Request::OwnerAccept, |mut client, request| async move {
                client.owner_accept(request).await
            })
            .await?;
        read(chat_view_from_reply(&reply))
    }

    async fn queue_add(
        &self,
        tenant: &TenantId,
        entry: WaitingEntry,
        waiting_since_us: i64,
    ) -> Result<(), RouterError> {
        let entry = Some(waiting_entry_to_proto(&entry));
        let request = QueueAddRequest { tenant_id: tenant.to_string(), entry, waiting_since_us };
        self.call(request, router_call::Request::QueueAdd, |mut client, request| async move {
            client.queue_add(request).await
        })
        .await
        .map(drop)
    }

    async fn queue_remove(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        conversation: ConversationId,
        reason: LeftQueue,
    ) -> Result<(), RouterError> {
        let request = QueueRemoveRequest {
            tenant_id: tenant.to_string(),
            group_id: group.to_string(),
            removed: Some(left_queue_to_proto(conversation, &reason)),
        };
        self.call(request, router_call::Request::QueueRemove, |mut client, request| async move {
            client.queue_remove(request).await
        })
        .await
        .map(drop)
    }

    async fn agent_finished(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        let request = AgentFinishedRequest {
            tenant_id: tenant.to_string(),
            agent_id: agent.to_string(),
            conversation_id: conversation.to_string(),
        };
        self.call(request, router_call::Request::AgentFinished, |mut client, request| async move {
            client.agent_finished(request).await
        })
        .await
        .map(drop)
    }

    async fn conversation_system(
        &self,
        conversation: ConversationId,
        command: SystemCommand,
    ) -> Result<bool, RouterError> {
        let request = ConversationSystemRequest {
            conversation_id: conversation.to_string(),
            command: Some(system_command_to_proto(&command)),
        };
        let reply = self
            .call(request, router_call::Request::ConversationSystem, |mut client, request| async move {
                client.conversation_system(request).await
            })
            .await?;
        Ok(reply.stored)
    }

    async fn agent_offer(&self, tenant: &TenantId, agent: &AgentId, update: OfferUpdate) -> Result<(), RouterError> {
        let request = AgentOfferRequest {
            tenant_id: tenant.to_string(),
            agent_id: agent.to_string(),
            update: Some(offer_update_to_proto(&update)),
        };
        self.call(request, router_call::Request::AgentOffer, |mut client, request| async move {
            client.agent_offer(request).await
        })
        .await
        .map(drop)
    }

    async fn agent_availability(&self, tenant: &TenantId, agent: &AgentId) -> Result<AgentAvailability, RouterError> {
        let request = AgentRequest { tenant_id: tenant.to_string(), agent_id: agent.to_string() };
        let reply = self
            .call(request, router_call::Request::AgentAvailability, |mut client, request| async move {
                client.agent_availability(request).await
            })
            .await?;
        read(availability_from_proto(&reply))
    }

    async fn queue_agent_changed(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        availability: AgentAvailability,
    ) -> Result<(), RouterError> {
        let request = QueueAgentChangedRequest {
            tenant_id: tenant.to_string(),
            group_id: group.to_string(),
            availability: Some(availability_to_proto(&availability)),
        };
        self.call(request, router_call::Request::QueueAgentChanged, |mut client, request| async move {
            client.queue_agent_changed(request).await
        })
        .await
        .map(drop)
    }

    async fn owner_forward(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        let request = OwnerForwardRequest {
            caller: Some(caller_to_proto(caller)),
            conversation_id: conversation.to_string(),
            to_agent_id: to_agent.to_string(),
        };
        let reply = self
            .call(request, router_call::Request::OwnerForward, |mut client, request| async move {
                client.owner_forward(request).await
            })
            .await?;
        read(chat_view_from_reply(&reply))
    }
}
