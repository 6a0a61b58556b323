//! The router node: owns its shards, activates actors on demand and answers the gateways' requests.

use std::sync::Arc;
use switchboard_telemetry::names;

use async_trait::async_trait;
use switchboard_domain::{
    AgentAvailability, AgentId, AgentStatus, Clock, ConversationId, Directory, GroupId, NewConversation, Refusal,
    TenantId, WaitingEntry, agent_key, conversation_key, queue_key,
};
use switchboard_presence::Presence;
use switchboard_proto::convert::conversation_from_record;
use switchboard_proto::internal::v1::{CreateTicketRequest, GetLicenseRequest, ListConversationsRequest, TicketRecord};
use switchboard_proto::router::{
    AgentView, Caller, ChatCommand, ChatList, ChatView, ClusterApi, CommandOutcome, EventPage, GatewayId, LeftQueue,
    OfferUpdate, OfflineMessage, PeerApi, Push, RouterApi, RouterError, ShownOffer, StartChat, StartedChat,
    SystemCommand, Ticket,
};
use switchboard_proto::store::StoreApi;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{Instrument as _, debug, info};

use crate::context::{Context, Gateways, PresenceSettings};
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
    /// How many bytes of events a read of a conversation's log answers with at most (about: the encoded
    /// records; at least one event, however large): a log can outgrow any one gRPC message, and a
    /// transcript any one frame to a client. [`RouterSettings::PAGE_BYTES`] unless a test wants smaller.
    pub page_bytes: u64,
    pub presence: PresenceSettings,
}

impl RouterSettings {
    /// The page of a read of the log: 1 MiB, thousands of a chat's usual events, a quarter of tonic's
    /// default limit on a message it decodes, a sixty-fourth of the cluster's.
    pub const PAGE_BYTES: u64 = 1 << 20;
}

pub struct Router {
    context: Arc<Context>,
    leases: LeaseSettings,
    stop_keeper: tokio::sync::watch::Sender<bool>,
    lease_keeper: std::sync::Mutex<Option<JoinHandle<()>>>,
    heartbeat: JoinHandle<()>,
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(keeper) = self.lease_keeper.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            keeper.abort();
        }
        self.heartbeat.abort();
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
        presence: Arc<dyn Presence>,
        peers: Option<Arc<dyn ClusterApi>>,
    ) -> Result<Router, RouterError> {
        // Every kind of repair from the store is there from the start, at 0: an alert sees the first one.
        for kind in names::ROUTER_REPAIR_KINDS {
            metrics::counter!(names::ROUTER_REPAIRS, "kind" => *kind).increment(0);
        }
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
            page_bytes: settings.page_bytes.max(1),
            presence,
            presence_settings: settings.presence,
            group_statuses: Default::default(),
        });
        let n_shards = placement::join(&context, &settings.leases).await?;
        info!(node = %settings.node_id, n_shards, "router started");
        let (stop_keeper, stop) = tokio::sync::watch::channel(false);
        let lease_keeper = tokio::spawn(placement::keep_leases(context.clone(), settings.leases, stop));
        let heartbeat = tokio::spawn(heartbeat(context.clone()));
        Ok(Router {
            context,
            leases: settings.leases,
            stop_keeper,
            lease_keeper: std::sync::Mutex::new(Some(lease_keeper)),
            heartbeat,
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

/// Every heartbeat: each agent checks its connections, each queue its timers, routing and group status; and
/// the owner of shard 0 mirrors the license count in use to presence for dashboards.
async fn heartbeat(context: Arc<Context>) {
    let mut ticks = tokio::time::interval(context.presence_settings.heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for (_, agent) in context.agents.running() {
            let _ = agent.cast(crate::agent::AgentMsg::Tick);
        }
        for (_, queue) in context.queues.running() {
            let _ = queue.cast(crate::queue::QueueMsg::Tick);
        }
        // One node mirrors for the cluster: the owner of shard 0 (every shard has exactly one owner).
        if !context.shards.owns_shard(switchboard_domain::ShardId(0)) {
            continue;
        }
        match context.store.get_license(GetLicenseRequest {}).await {
            Ok(license) => {
                let now_ms = context.clock.now_ms();
                if let Err(error) = context.presence.mirror_license(license.used, license.max_sessions, now_ms).await {
                    debug!(%error, "license count not mirrored to presence");
                }
            }
            Err(error) => debug!(%error, "license count not read"),
        }
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

    async fn queue_add(
        &self,
        tenant: &TenantId,
        entry: WaitingEntry,
        waiting_since_us: i64,
    ) -> Result<(), RouterError> {
        self.owns(&queue_key(tenant, &entry.group))?;
        let queue = QueueHandle::activate(&self.context, tenant, &entry.group).await?;
        // A queue that stops before taking it (its shard just moved) sends the caller to the new owner.
        if queue.add(entry, waiting_since_us).await { Ok(()) } else { Err(RouterError::NotOwner) }
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

    async fn conversation_system(
        &self,
        conversation: ConversationId,
        command: SystemCommand,
    ) -> Result<bool, RouterError> {
        self.owns(&conversation_key(&conversation))?;
        let command = &command;
        ConversationHandle::with(
            &self.context,
            conversation,
            |handle| async move { handle.system(command.clone()).await },
        )
        .await
    }

    async fn agent_offer(&self, tenant: &TenantId, agent: &AgentId, update: OfferUpdate) -> Result<(), RouterError> {
        self.owns(&agent_key(tenant, agent))?;
        AgentHandle::activate(&self.context, tenant, agent).await?.offer(update).await
    }

    async fn agent_availability(&self, tenant: &TenantId, agent: &AgentId) -> Result<AgentAvailability, RouterError> {
        self.owns(&agent_key(tenant, agent))?;
        AgentHandle::activate(&self.context, tenant, agent).await?.availability().await
    }

    async fn queue_agent_changed(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        availability: AgentAvailability,
    ) -> Result<(), RouterError> {
        self.owns(&queue_key(tenant, group))?;
        QueueHandle::activate(&self.context, tenant, group).await?.agent_changed(availability);
        Ok(())
    }

    async fn owner_forward(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        self.owns(&conversation_key(&conversation))?;
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.forward(caller.clone(), to_agent.clone()).await
        })
        .await
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
        let (tried_before, customer_token) = (request.tried_before, request.customer_token);
        let facts = NewConversation {
            id: request.conversation,
            tenant: request.tenant,
            group: request.group,
            customer_name: request.customer_name,
            question: request.question,
            created_at_ms: now_ms,
        };
        // Carried through even if the caller goes away meanwhile (a call reset, a client's deadline): a chat
        // stored but never handed to its queue would be listed nowhere, its stored offer shown to nobody,
        // until its queue is rebuilt from the store. Its span and received-at moment go with it.
        let context = self.context.clone();
        let creating = async move {
            let (tenant, group) = (facts.tenant.to_string(), facts.group.to_string());
            let started = crate::conversation::create(&context, facts, customer_token, tried_before).await?;
            if !started.duplicate {
                metrics::counter!(names::CHATS_STARTED, "tenant" => tenant, "group" => group).increment(1);
            }
            Ok(started)
        }
        .instrument(tracing::Span::current());
        let task = match switchboard_telemetry::trace::received_at_us() {
            Some(at_us) => tokio::spawn(switchboard_telemetry::trace::with_received_at(at_us, creating)),
            None => tokio::spawn(creating),
        };
        task.await.map_err(|error| RouterError::Internal(format!("the chat start failed: {error}")))?
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
    ) -> Result<EventPage, RouterError> {
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.subscribe(gateway.clone(), caller.clone(), after_seq).await
        })
        .await
    }

    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId) {
        // The subscribers are the context's, and outlive the chat's actor (a finished chat is passivated
        // whether or not it is followed): the gateway is forgotten whether or not one runs.
        self.context.subscribers.remove(conversation, gateway);
        if let Some(actor) = self.context.conversations.get_running(&conversation) {
            // And again in the actor's turn: a subscription of the gateway's whose caller gave up on it (a
            // timeout) may still wait in the mailbox.
            ConversationHandle(actor).unsubscribe(gateway.clone());
        }
    }

    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
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

    async fn customer_connection(&self, conversation: ConversationId) -> Result<(), RouterError> {
        ConversationHandle::activate(&self.context, conversation).await?.customer_connection();
        Ok(())
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

    async fn subscribe_agent(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        agent: &AgentId,
        shown: &[ShownOffer],
    ) -> Result<(), RouterError> {
        AgentHandle::activate(&self.context, tenant, agent).await?.subscribe(gateway.clone(), shown.to_vec())
    }

    async fn unsubscribe_agent(&self, gateway: &GatewayId, tenant: &TenantId, agent: &AgentId) {
        if let Some(actor) = self.context.agents.get_running(&(tenant.clone(), agent.clone())) {
            AgentHandle::from(actor).unsubscribe(gateway.clone());
        }
    }

    async fn reject_offer(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        QueueHandle::activate(&self.context, tenant, group).await?.reject_offer(agent.clone(), conversation).await
    }

    async fn transfer_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_group: &GroupId,
    ) -> Result<ChatView, RouterError> {
        ConversationHandle::with(&self.context, conversation, |handle| async move {
            handle.transfer(caller.clone(), to_group.clone()).await
        })
        .await
    }

    async fn forward_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        let Caller::Agent { tenant, .. } = caller else {
            return Err(RouterError::NotFound);
        };
        AgentHandle::activate(&self.context, tenant, to_agent).await?.forward(caller.clone(), conversation).await
    }

    async fn leave_offline_message(&self, message: OfflineMessage) -> Result<Ticket, RouterError> {
        if self.context.directory.group(&message.tenant, &message.group).is_none() {
            return Err(RouterError::UnknownGroup);
        }
        let now_ms = self.context.clock.now_ms();
        let subject: String = message.body.chars().take(120).collect();
        let ticket = TicketRecord {
            id: uuid::Uuid::new_v4().to_string(),
            tenant_id: message.tenant.to_string(),
            group_id: message.group.to_string(),
            kind: "offline_message".into(),
            reason: message.reason,
            customer_name: message.customer_name,
            customer_contact: message.contact,
            subject,
            body: message.body,
            conversation_id: String::new(),
            created_at_ms: now_ms,
            idempotency_key: message.idempotency_key,
        };
        let request = CreateTicketRequest { ticket: Some(ticket.clone()) };
        let response = self.context.store.create_ticket(request).await.map_err(from_store)?;
        let stored = response.ticket.ok_or_else(|| RouterError::Internal("the store returned no ticket".into()))?;
        // A key is the customer's choice, per tenant: another message under a key used before is refused, not
        // acked as the first one (which would drop it).
        if response.duplicate && !same_message(&stored, &ticket) {
            return Err(RouterError::Refused(Refusal::IdempotencyKeyReused));
        }
        Ok(Ticket { id: stored.id, created_at_ms: stored.created_at_ms, duplicate: response.duplicate })
    }
}

/// Whether an offline message sent again is the one stored first under its key: the same group, customer and
/// body. (Not its reason: a widget sending it again after a reconnection may meet another refusal.)
fn same_message(stored: &TicketRecord, sent: &TicketRecord) -> bool {
    (&stored.group_id, &stored.customer_name, &stored.customer_contact, &stored.body)
        == (&sent.group_id, &sent.customer_name, &sent.customer_contact, &sent.body)
}
