//! The router node: owns its shards, activates actors on demand and answers the gateways' requests.

use std::sync::Arc;

use async_trait::async_trait;
use switchboard_domain::{
    AgentId, AgentStatus, Clock, ConversationId, Directory, Event, GroupId, NewConversation, TenantId, WaitingEntry,
    agent_key, conversation_key, queue_key,
};
use switchboard_proto::convert::conversation_from_record;
use switchboard_proto::internal::v1::ListConversationsRequest;
use switchboard_proto::router::{
    AgentView, Caller, ChatCommand, ChatList, ChatView, ClusterApi, CommandOutcome, GatewayId, LeftQueue, PeerApi,
    Push, RouterApi, RouterError, StartChat, StartedChat,
};
use switchboard_proto::store::StoreApi;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use crate::context::{Context, Gateways};
use crate::conversation::view_of;
use crate::error::from_store;
use crate::handles::{AgentHandle, ConversationHandle, QueueHandle};
use crate::placement::{self, LeaseSettings, ShardTable};

#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// This node's stable name: a node restarted under the same name takes its shards back at once.
    pub node_id: String,
    /// Where this node's router service listens (for the other nodes and the gateways); empty in `serve`.
    pub advertise: String,
    pub leases: LeaseSettings,
    /// How many chats a closed list shows at most.
    pub closed_list_limit: u32,
}

pub struct Router {
    context: Arc<Context>,
    leases: LeaseSettings,
    stop_keeper: tokio::sync::watch::Sender<bool>,
    lease_keeper: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(keeper) = self.lease_keeper.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            keeper.abort();
        }
    }
}

impl Router {
    /// Joins the cluster (takes its fair share of the shards, all of them when alone), activates the
    /// actors of its shards, and keeps the leases renewed and balanced. `peers` reaches the actors that
    /// live on other nodes; `None` on a single node.
    pub async fn start(
        settings: RouterSettings,
        store: Arc<dyn StoreApi>,
        clock: Arc<dyn Clock>,
        directory: Arc<Directory>,
        peers: Option<Arc<dyn ClusterApi>>,
    ) -> Result<Router, RouterError> {
        let context = Arc::new(Context {
            node_id: settings.node_id.clone(),
            advertise: settings.advertise.clone(),
            peers,
            placement_changed: Default::default(),
            store,
            clock,
            directory,
            gateways: Gateways::default(),
            subscribers: Default::default(),
            shards: ShardTable::default(),
            conversations: Default::default(),
            agents: Default::default(),
            queues: Default::default(),
            closed_list_limit: settings.closed_list_limit,
        });
        let n_shards = placement::join(&context, &settings.leases).await?;
        info!(node = %settings.node_id, n_shards, "router started");
        let (stop_keeper, stop) = tokio::sync::watch::channel(false);
        let lease_keeper = tokio::spawn(placement::keep_leases(context.clone(), settings.leases, stop));
        Ok(Router {
            context,
            leases: settings.leases,
            stop_keeper,
            lease_keeper: std::sync::Mutex::new(Some(lease_keeper)),
        })
    }

    pub fn n_shards_owned(&self) -> usize {
        self.context.shards.n_owned()
    }

    /// Whether this node owns the shard of an actor key now.
    pub fn owns_key(&self, key: &str) -> bool {
        self.context.shards.owns(key)
    }

    /// Makes the lease keeper look at the placement now instead of at its next tick (another node freed
    /// shards: taking them at once shortens a handover).
    pub fn placement_changed(&self) {
        self.context.placement_changed.notify_one();
    }

    /// Graceful shutdown: stops renewing, stops every actor and hands every shard over at once.
    pub async fn shutdown(&self) -> Result<(), RouterError> {
        // The keeper finishes its cycle first, so that no heartbeat of it reaches the store after the leave.
        self.stop_keeper.send_replace(true);
        let keeper = self.lease_keeper.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(mut keeper) = keeper
            && tokio::time::timeout(self.leases.lease, &mut keeper).await.is_err()
        {
            keeper.abort();
        }
        placement::leave(&self.context, &self.leases).await
    }

    fn owns(&self, key: &str) -> Result<(), RouterError> {
        if self.context.shards.owns(key) { Ok(()) } else { Err(RouterError::NotOwner) }
    }
}

/// What other routers ask of this one: done here when this node owns the key's shard, else `NotOwner`.
#[async_trait]
impl PeerApi for Router {
    async fn owner_accept(&self, conversation: ConversationId, agent: &AgentId) -> Result<ChatView, RouterError> {
        self.owns(&conversation_key(&conversation))?;
        ConversationHandle::with(
            &self.context,
            conversation,
            |handle| async move { handle.accept(agent.clone()).await },
        )
        .await
    }

    async fn queue_add(&self, tenant: &TenantId, entry: WaitingEntry) -> Result<(), RouterError> {
        self.owns(&queue_key(tenant, &entry.group))?;
        QueueHandle::activate(&self.context, tenant, &entry.group).await?.add(entry);
        Ok(())
    }

    async fn queue_remove(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        conversation: ConversationId,
        reason: LeftQueue,
    ) -> Result<(), RouterError> {
        self.owns(&queue_key(tenant, group))?;
        QueueHandle::activate(&self.context, tenant, group).await?.remove(conversation, reason);
        Ok(())
    }

    async fn agent_finished(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.owns(&agent_key(tenant, agent))?;
        AgentHandle::activate(&self.context, tenant, agent).await?.finished(conversation);
        Ok(())
    }
}

#[async_trait]
impl RouterApi for Router {
    fn connect_gateway(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        self.context.gateways.connect(gateway, sink);
    }

    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError> {
        let known =
            self.context.directory.tenant(&request.tenant).is_some_and(|t| t.groups.contains_key(&request.group));
        if !known {
            return Err(RouterError::UnknownGroup);
        }
        let now_ms = self.context.clock.now_ms();
        let facts = NewConversation {
            id: request.conversation,
            tenant: request.tenant,
            group: request.group,
            customer_name: request.customer_name,
            question: request.question,
            created_at_ms: now_ms,
        };
        let (view, customer_token) = crate::conversation::create(&self.context, facts).await?;
        Ok(StartedChat { view, customer_token })
    }

    async fn authorize_customer(&self, conversation: ConversationId, token: &str) -> Result<ChatView, RouterError> {
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.check_token(token.to_owned()).await
        })
        .await
    }

    async fn chat_view(&self, caller: &Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.view(Some(caller.clone())).await
        })
        .await
    }

    async fn subscribe(
        &self,
        gateway: &GatewayId,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<Vec<Event>, RouterError> {
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.subscribe(gateway.clone(), caller.clone(), after_seq).await
        })
        .await
    }

    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId) {
        if let Some(actor) = self.context.conversations.get_running(&conversation) {
            ConversationHandle(actor).unsubscribe(gateway.clone());
        }
    }

    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<Vec<Event>, RouterError> {
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.read_events(caller.clone(), after_seq).await
        })
        .await
    }

    async fn command(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError> {
        let command = &command;
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.command(caller.clone(), command.clone()).await
        })
        .await
    }

    async fn typing(&self, caller: &Caller, conversation: ConversationId, typing: bool) -> Result<(), RouterError> {
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.typing(caller.clone(), typing).await
        })
        .await
    }

    async fn accept_chat(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError> {
        AgentHandle::activate(&self.context, tenant, agent).await?.accept(conversation).await
    }

    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError> {
        AgentHandle::activate(&self.context, tenant, agent).await?.set_status(status).await
    }

    async fn subscribe_queue(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        group: &GroupId,
    ) -> Result<(), RouterError> {
        QueueHandle::activate(&self.context, tenant, group).await?.subscribe(gateway.clone())
    }

    async fn unsubscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId) {
        if let Some(actor) = self.context.queues.get_running(&(tenant.clone(), group.clone())) {
            QueueHandle(actor).unsubscribe(gateway.clone());
        }
    }

    async fn list_chats(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        list: ChatList,
    ) -> Result<Vec<ChatView>, RouterError> {
        let (states, newest_first, limit) = match list {
            ChatList::Ongoing => (vec!["active".to_owned()], false, 0),
            ChatList::Closed => {
                (vec!["closed".to_owned(), "cancelled".to_owned()], true, self.context.closed_list_limit)
            }
        };
        let request = ListConversationsRequest {
            tenant_id: tenant.to_string(),
            states,
            owner_agent_id: agent.to_string(),
            limit,
            newest_first,
            ..Default::default()
        };
        let response = self.context.store.list_conversations(request).await.map_err(from_store)?;
        response
            .conversations
            .iter()
            .map(|record| conversation_from_record(record).map(|conversation| view_of(&conversation)))
            .collect::<Result<_, _>>()
            .map_err(|error| RouterError::Internal(error.to_string()))
    }
}
