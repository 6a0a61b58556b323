//! Effects of one actor on another that may live on another node. When this node owns the target's shard
//! the actor is called directly; otherwise the call goes to the owner through the cluster client (gRPC in
//! the split roles), which finds the owner and retries while a shard moves.
//!
//! Casts (queue add/remove, agent finished) are sent from a task of their own, so that an actor never
//! waits on another node to go on; a cast lost to a crash is repaired when the target is rebuilt from the
//! store (queues and agents derive their state from the conversations' summaries).

use std::sync::Arc;
use std::time::Duration;

use switchboard_domain::{
    AgentAvailability, AgentId, ConversationId, GroupId, TenantId, WaitingEntry, agent_key, conversation_key, queue_key,
};
use switchboard_proto::router::{Caller, ChatView, LeftQueue, OfferUpdate, RouterError, SystemCommand};
use tracing::{debug, warn};

use crate::context::Context;
use crate::handles::{AgentHandle, ConversationHandle, QueueHandle};

/// How often a cast to another node is tried before it is left to the target's rebuild.
const CAST_ATTEMPTS: u32 = 8;

/// Runs `send` until it succeeds or fails for good, from a task of its own.
fn cast_remote<F, Fut>(what: &'static str, send: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), RouterError>> + Send,
{
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=CAST_ATTEMPTS {
            match send().await {
                Ok(()) => return,
                Err(error) if error.is_retryable() && attempt < CAST_ATTEMPTS => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(error) => {
                    warn!(%error, what, "cast to another node not delivered; the target repairs it from the store");
                    return;
                }
            }
        }
    });
}

/// Tells the chat's queue that the chat waits, from now: its first offer's latency counts from here, however
/// long the call to another node takes.
pub(crate) async fn queue_add(context: &Arc<Context>, tenant: &TenantId, entry: WaitingEntry) {
    let waiting_since_us = context.clock.now_us();
    if context.shards.owns(&queue_key(tenant, &entry.group)) || context.peers.is_none() {
        match QueueHandle::activate(context, tenant, &entry.group).await {
            Ok(queue) if queue.add(entry.clone(), waiting_since_us).await => return,
            Ok(_) => debug!(conversation = %entry.conversation, "the queue stopped before taking a new chat"),
            Err(error) => debug!(%error, conversation = %entry.conversation, "queue not activated for a new chat"),
        }
        // Given up meanwhile (its shard moved): its new owner is told, as for a queue on another node.
    }
    let Some(peers) = context.peers.clone() else {
        warn!(conversation = %entry.conversation, "queue not told of a new chat: listed when next activated");
        return;
    };
    let tenant = tenant.clone();
    cast_remote("queue add", move || {
        let (peers, tenant, entry) = (peers.clone(), tenant.clone(), entry.clone());
        async move { peers.queue_add(&tenant, entry, waiting_since_us).await }
    });
}

pub(crate) async fn queue_remove(
    context: &Arc<Context>,
    tenant: &TenantId,
    group: &GroupId,
    conversation: ConversationId,
    reason: LeftQueue,
) {
    if context.shards.owns(&queue_key(tenant, group)) || context.peers.is_none() {
        match QueueHandle::activate(context, tenant, group).await {
            Ok(queue) => queue.remove(conversation, reason),
            Err(error) => warn!(%error, %conversation, "queue not told of a removal"),
        }
    } else if let Some(peers) = context.peers.clone() {
        let (tenant, group) = (tenant.clone(), group.clone());
        cast_remote("queue remove", move || {
            let (peers, tenant, group, reason) = (peers.clone(), tenant.clone(), group.clone(), reason.clone());
            async move { peers.queue_remove(&tenant, &group, conversation, reason).await }
        });
    }
}

pub(crate) async fn agent_finished(
    context: &Arc<Context>,
    tenant: &TenantId,
    agent: &AgentId,
    conversation: ConversationId,
) {
    if context.shards.owns(&agent_key(tenant, agent)) || context.peers.is_none() {
        match AgentHandle::activate(context, tenant, agent).await {
            Ok(handle) => handle.finished(conversation),
            Err(error) => warn!(%error, %conversation, "agent not told of the end of a chat"),
        }
    } else if let Some(peers) = context.peers.clone() {
        let (tenant, agent) = (tenant.clone(), agent.clone());
        cast_remote("agent finished", move || {
            let (peers, tenant, agent) = (peers.clone(), tenant.clone(), agent.clone());
            async move { peers.agent_finished(&tenant, &agent, conversation).await }
        });
    }
}

/// The conversation as the caller may see it, from wherever it lives.
pub(crate) async fn conversation_view(
    context: &Arc<Context>,
    caller: &Caller,
    conversation: ConversationId,
) -> Result<ChatView, RouterError> {
    match remote_peers(context, &conversation_key(&conversation)) {
        None => {
            ConversationHandle::with(
                context,
                conversation,
                |handle| async move { handle.view(Some(caller.clone())).await },
            )
            .await
        }
        Some(peers) => peers.chat_view(caller, conversation).await,
    }
}

/// Records the accept on the conversation, wherever it lives.
pub(crate) async fn conversation_accept(
    context: &Arc<Context>,
    conversation: ConversationId,
    agent: &AgentId,
) -> Result<ChatView, RouterError> {
    match remote_peers(context, &conversation_key(&conversation)) {
        None => {
            ConversationHandle::with(context, conversation, |handle| async move { handle.accept(agent.clone()).await })
                .await
        }
        Some(peers) => peers.owner_accept(conversation, agent).await,
    }
}

/// The cluster client when `key` lives on another node; `None` when it is (or may only be) local.
fn remote_peers(context: &Context, key: &str) -> Option<Arc<dyn switchboard_proto::router::ClusterApi>> {
    if context.shards.owns(key) { None } else { context.peers.clone() }
}

/// Records a forward on the conversation, wherever it lives (the target agent's slot is reserved).
pub(crate) async fn owner_forward(
    context: &Arc<Context>,
    caller: &Caller,
    conversation: ConversationId,
    to_agent: &AgentId,
) -> Result<ChatView, RouterError> {
    match remote_peers(context, &conversation_key(&conversation)) {
        None => {
            ConversationHandle::with(context, conversation, |handle| async move {
                handle.forward(caller.clone(), to_agent.clone()).await
            })
            .await
        }
        Some(peers) => peers.owner_forward(caller, conversation, to_agent).await,
    }
}

/// A system command on the conversation, wherever it lives; true when it stored an event.
pub(crate) async fn conversation_system(
    context: &Arc<Context>,
    conversation: ConversationId,
    command: SystemCommand,
) -> Result<bool, RouterError> {
    match remote_peers(context, &conversation_key(&conversation)) {
        None => {
            let command = &command;
            ConversationHandle::with(
                context,
                conversation,
                |handle| async move { handle.system(command.clone()).await },
            )
            .await
        }
        Some(peers) => peers.conversation_system(conversation, command).await,
    }
}

/// An offer made to an agent or ended, on the agent's owner.
pub(crate) async fn agent_offer(
    context: &Arc<Context>,
    tenant: &TenantId,
    agent: &AgentId,
    update: OfferUpdate,
) -> Result<(), RouterError> {
    match remote_peers(context, &agent_key(tenant, agent)) {
        None => AgentHandle::activate(context, tenant, agent).await?.offer(update).await,
        Some(peers) => peers.agent_offer(tenant, agent, update).await,
    }
}

/// An agent's availability, from the agent's owner.
pub(crate) async fn agent_availability(
    context: &Arc<Context>,
    tenant: &TenantId,
    agent: &AgentId,
) -> Result<AgentAvailability, RouterError> {
    match remote_peers(context, &agent_key(tenant, agent)) {
        None => AgentHandle::activate(context, tenant, agent).await?.availability().await,
        Some(peers) => peers.agent_availability(tenant, agent).await,
    }
}

/// Tells a group's queue that one of its agents' availability changed (a cast).
pub(crate) async fn queue_agent_changed(
    context: &Arc<Context>,
    tenant: &TenantId,
    group: &GroupId,
    availability: AgentAvailability,
) {
    if context.shards.owns(&queue_key(tenant, group)) || context.peers.is_none() {
        match QueueHandle::activate(context, tenant, group).await {
            Ok(queue) => queue.agent_changed(availability),
            Err(error) => warn!(%error, %group, "queue not told of an agent's availability"),
        }
    } else if let Some(peers) = context.peers.clone() {
        let (tenant, group) = (tenant.clone(), group.clone());
        cast_remote("queue agent changed", move || {
            let (peers, tenant, group, availability) =
                (peers.clone(), tenant.clone(), group.clone(), availability.clone());
            async move { peers.queue_agent_changed(&tenant, &group, availability).await }
        });
    }
}
