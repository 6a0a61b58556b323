//! Typed handles in front of the actors: callers use methods, never `ActorRef`s and message enums, so that a
//! remote version can later sit behind the same methods.

use std::future::Future;
use std::sync::Arc;

use ractor::{ActorRef, RpcReplyPort};
use switchboard_domain::{AgentAvailability, AgentId, AgentStatus, ConversationId, GroupId, TenantId, WaitingEntry};
use switchboard_proto::router::{
    AgentView, Caller, ChatCommand, ChatView, CommandOutcome, EventPage, GatewayId, LeftQueue, OfferUpdate,
    RouterError, ShownOffer, SystemCommand,
};

use crate::agent::AgentMsg;
use crate::context::Context;
use crate::conversation::ConversationMsg;
use crate::queue::QueueMsg;
use crate::registry::is_alive;

type Reply<T> = RpcReplyPort<Result<T, RouterError>>;

/// Asks an actor and waits for its answer; an actor that stopped meanwhile is a retryable failure.
async fn call<M: ractor::Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    message: impl FnOnce(Reply<T>) -> M,
) -> Result<T, RouterError> {
    match actor.call(message, None).await {
        Ok(ractor::rpc::CallResult::Success(result)) => result,
        Ok(_) | Err(_) => Err(RouterError::Unavailable("the actor stopped; retry".into())),
    }
}

#[derive(Clone)]
pub(crate) struct ConversationHandle(pub(crate) ActorRef<ConversationMsg>);

impl ConversationHandle {
    /// The running conversation, activated from the store when needed.
    pub(crate) async fn activate(context: &Arc<Context>, conversation: ConversationId) -> Result<Self, RouterError> {
        crate::conversation::activate(context, conversation).await.map(ConversationHandle)
    }

    /// Runs `ask` on the conversation; when its actor stopped in between (passivation, a failed write), it is
    /// activated again from the store and asked once more.
    pub(crate) async fn with<T, Fut>(
        context: &Arc<Context>,
        conversation: ConversationId,
        ask: impl Fn(ConversationHandle) -> Fut,
    ) -> Result<T, RouterError>
    where
        Fut: Future<Output = Result<T, RouterError>>,
    {
        let handle = Self::activate(context, conversation).await?;
        match ask(handle.clone()).await {
            Err(RouterError::Unavailable(_)) if !is_alive(&handle.0) => {
                ask(Self::activate(context, conversation).await?).await
            }
            result => result,
        }
    }

    pub(crate) async fn view(&self, caller: Option<Caller>) -> Result<ChatView, RouterError> {
        call(&self.0, |reply| ConversationMsg::View { caller, reply }).await
    }

    pub(crate) async fn check_token(&self, token: String) -> Result<ChatView, RouterError> {
        call(&self.0, |reply| ConversationMsg::CheckToken { token, reply }).await
    }

    pub(crate) async fn subscribe(
        &self,
        gateway: GatewayId,
        caller: Caller,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        call(&self.0, |reply| ConversationMsg::Subscribe { gateway, caller, after_seq, reply }).await
    }

    pub(crate) fn unsubscribe(&self, gateway: GatewayId) {
        let _ = self.0.cast(ConversationMsg::Unsubscribe { gateway });
    }

    pub(crate) async fn read_events(&self, caller: Caller, after_seq: u64) -> Result<EventPage, RouterError> {
        call(&self.0, |reply| ConversationMsg::ReadEvents { caller, after_seq, reply }).await
    }

    pub(crate) async fn command(&self, caller: Caller, command: ChatCommand) -> Result<CommandOutcome, RouterError> {
        let trace = crate::conversation::Trace::here();
        call(&self.0, |reply| ConversationMsg::Command { caller, command, trace, reply }).await
    }

    pub(crate) async fn accept(&self, agent: AgentId) -> Result<ChatView, RouterError> {
        call(&self.0, |reply| ConversationMsg::Accept { agent, reply }).await
    }

    pub(crate) async fn typing(&self, caller: Caller, typing: bool) -> Result<(), RouterError> {
        call(&self.0, |reply| ConversationMsg::Typing { caller, typing, reply }).await
    }

    /// Tells the chat that a connection of its customer began or ended; it reads presence by itself.
    pub(crate) fn customer_connection(&self) {
        let _ = self.0.cast(ConversationMsg::CustomerConnection);
    }

    pub(crate) async fn system(&self, command: SystemCommand) -> Result<bool, RouterError> {
        call(&self.0, |reply| ConversationMsg::System { command, reply }).await
    }

    pub(crate) async fn transfer(&self, caller: Caller, to_group: GroupId) -> Result<ChatView, RouterError> {
        call(&self.0, |reply| ConversationMsg::Transfer { caller, to_group, reply }).await
    }

    pub(crate) async fn forward(&self, caller: Caller, to_agent: AgentId) -> Result<ChatView, RouterError> {
        call(&self.0, |reply| ConversationMsg::Forward { caller, to_agent, reply }).await
    }
}

#[derive(Clone)]
pub(crate) struct AgentHandle(ActorRef<AgentMsg>);

impl From<ActorRef<AgentMsg>> for AgentHandle {
    fn from(actor: ActorRef<AgentMsg>) -> Self {
        AgentHandle(actor)
    }
}

impl AgentHandle {
    pub(crate) async fn activate(
        context: &Arc<Context>,
        tenant: &TenantId,
        agent: &AgentId,
    ) -> Result<Self, RouterError> {
        crate::agent::activate(context, tenant, agent).await.map(AgentHandle)
    }

    pub(crate) async fn set_status(&self, status: AgentStatus) -> Result<AgentView, RouterError> {
        call(&self.0, |reply| AgentMsg::SetStatus { status, reply }).await
    }

    pub(crate) async fn accept(&self, conversation: ConversationId) -> Result<ChatView, RouterError> {
        call(&self.0, |reply| AgentMsg::Accept { conversation, reply }).await
    }

    /// A chat of this agent ended: its slot is free.
    pub(crate) fn finished(&self, conversation: ConversationId) {
        let _ = self.0.cast(AgentMsg::Finished { conversation });
    }

    pub(crate) async fn forward(&self, caller: Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        call(&self.0, |reply| AgentMsg::Forward { caller, conversation, reply }).await
    }

    pub(crate) async fn offer(&self, update: OfferUpdate) -> Result<(), RouterError> {
        call(&self.0, |reply| AgentMsg::Offer { update, reply }).await
    }

    pub(crate) async fn availability(&self) -> Result<AgentAvailability, RouterError> {
        call(&self.0, |reply| AgentMsg::Availability { reply }).await
    }

    pub(crate) fn subscribe(&self, gateway: GatewayId, shown: Vec<ShownOffer>) -> Result<(), RouterError> {
        self.0
            .cast(AgentMsg::Subscribe { gateway, shown })
            .map_err(|_| RouterError::Unavailable("the agent stopped; retry".into()))
    }

    pub(crate) fn unsubscribe(&self, gateway: GatewayId) {
        let _ = self.0.cast(AgentMsg::Unsubscribe { gateway });
    }
}

#[derive(Clone)]
pub(crate) struct QueueHandle(pub(crate) ActorRef<QueueMsg>);

impl QueueHandle {
    pub(crate) async fn activate(
        context: &Arc<Context>,
        tenant: &TenantId,
        group: &GroupId,
    ) -> Result<Self, RouterError> {
        crate::queue::activate(context, tenant, group).await.map(QueueHandle)
    }

    /// Adds a chat that began to wait at `waiting_since_us` (0: now); false when the queue stopped before
    /// taking it (its shard moved: the queue rebuilt by the new owner may have read the store before the chat
    /// was in it).
    pub(crate) async fn add(&self, entry: WaitingEntry, waiting_since_us: i64) -> bool {
        let message = |reply| QueueMsg::Add { entry, waiting_since_us, reply };
        matches!(self.0.call(message, None).await, Ok(ractor::rpc::CallResult::Success(())))
    }

    pub(crate) fn remove(&self, conversation: ConversationId, reason: LeftQueue) {
        let _ = self.0.cast(QueueMsg::Remove { conversation, reason });
    }

    /// The gateway gets a snapshot pushed now, then every change.
    pub(crate) fn subscribe(&self, gateway: GatewayId) -> Result<(), RouterError> {
        self.0
            .cast(QueueMsg::Subscribe { gateway })
            .map_err(|_| RouterError::Unavailable("the queue stopped; retry".into()))
    }

    pub(crate) fn unsubscribe(&self, gateway: GatewayId) {
        let _ = self.0.cast(QueueMsg::Unsubscribe { gateway });
    }

    pub(crate) fn agent_changed(&self, availability: AgentAvailability) {
        let _ = self.0.cast(QueueMsg::AgentChanged { availability });
    }

    pub(crate) async fn reject_offer(&self, agent: AgentId, conversation: ConversationId) -> Result<(), RouterError> {
        call(&self.0, |reply| QueueMsg::RejectOffer { agent, conversation, reply }).await
    }

    /// An agent free now for a new chat, to be stored with its offer; `None` when no agent is free once the
    /// chats waiting have had theirs (or the queue is not push-routed, or did not answer).
    pub(crate) async fn reserve(&self, conversation: ConversationId) -> Option<Reservation> {
        match self.0.call(|reply| QueueMsg::Reserve { conversation, reply }, None).await {
            Ok(ractor::rpc::CallResult::Success(Some((agent, expires_at_ms)))) => {
                Some(Reservation { queue: self.0.clone(), conversation, agent, expires_at_ms, handed_over: false })
            }
            _ => None,
        }
    }
}

/// An agent a queue keeps for a new chat while it is stored with its offer. The chat is handed to the queue
/// once stored ([`Reservation::offered`]); dropped without that (the start refused, failed or cancelled), the
/// agent is let go.
pub(crate) struct Reservation {
    queue: ActorRef<QueueMsg>,
    conversation: ConversationId,
    pub(crate) agent: AgentId,
    pub(crate) expires_at_ms: i64,
    handed_over: bool,
}

impl Reservation {
    /// The chat is stored with the offer: it waits from `waiting_since_us`, and the agent is shown the offer.
    /// False when the queue stopped before taking it (see [`QueueHandle::add`]; the reservation went
    /// with it).
    pub(crate) async fn offered(mut self, entry: WaitingEntry, waiting_since_us: i64) -> bool {
        self.handed_over = true;
        let (agent, expires_at_ms) = (self.agent.clone(), self.expires_at_ms);
        let message = |reply| QueueMsg::AddOffered { entry, agent, expires_at_ms, waiting_since_us, reply };
        matches!(self.queue.call(message, None).await, Ok(ractor::rpc::CallResult::Success(())))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.handed_over {
            let _ = self.queue.cast(QueueMsg::Unreserve { conversation: self.conversation });
        }
    }
}
