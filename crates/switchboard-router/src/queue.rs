//! The support-queue actor: the chats waiting in one group, first come first served, and the gateways
//! that watch them. Each change is pushed to every watching gateway with the queue's version.

use std::collections::BTreeSet;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use switchboard_domain::{ConversationId, GroupId, TenantId, WaitingEntry, WaitingQueue, queue_key};
use switchboard_proto::convert::conversation_from_record;
use switchboard_proto::internal::v1::ListConversationsRequest;
use switchboard_proto::router::{GatewayId, LeftQueue, Push, QueueChange, RouterError};

use crate::context::Context;
use crate::error::from_store;

pub(crate) enum QueueMsg {
    Add {
        entry: WaitingEntry,
    },
    Remove {
        conversation: ConversationId,
        reason: LeftQueue,
    },
    /// The gateway gets a snapshot now and every change after it.
    Subscribe {
        gateway: GatewayId,
    },
    Unsubscribe {
        gateway: GatewayId,
    },
}

pub(crate) struct QueueActor;

pub(crate) struct QueueActorState {
    context: Arc<Context>,
    tenant: TenantId,
    group: GroupId,
    waiting: WaitingQueue,
    version: u64,
    subscribers: BTreeSet<GatewayId>,
}

impl Actor for QueueActor {
    type Msg = QueueMsg;
    type State = QueueActorState;
    type Arguments = QueueActorState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(state)
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let key = (state.tenant.clone(), state.group.clone());
        state.context.queues.forget(&key, &myself);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            QueueMsg::Add { entry } => {
                if !state.waiting.contains(&entry.conversation) {
                    state.waiting.insert(entry.clone());
                    state.broadcast(QueueChange::Added { entry });
                }
            }
            QueueMsg::Remove { conversation, reason } => {
                if state.waiting.remove(&conversation).is_some() {
                    state.broadcast(QueueChange::Removed { conversation, reason });
                }
            }
            QueueMsg::Subscribe { gateway } => {
                let entries = state.waiting.iter().cloned().collect();
                if state.push(&gateway, QueueChange::Snapshot { entries }) {
                    state.subscribers.insert(gateway);
                }
            }
            QueueMsg::Unsubscribe { gateway } => {
                state.subscribers.remove(&gateway);
            }
        }
        Ok(())
    }
}

impl QueueActorState {
    fn broadcast(&mut self, change: QueueChange) {
        self.version += 1;
        let gone: Vec<GatewayId> =
            self.subscribers.iter().filter(|gateway| !self.push(gateway, change.clone())).cloned().collect();
        for gateway in gone {
            self.subscribers.remove(&gateway);
        }
    }

    fn push(&self, gateway: &GatewayId, change: QueueChange) -> bool {
        let push =
            Push::Queue { tenant: self.tenant.clone(), group: self.group.clone(), version: self.version, change };
        self.context.gateways.push(gateway, push)
    }
}

/// The running actor of a support queue, activated with the chats the store says are waiting in it.
pub(crate) async fn activate(
    context: &Arc<Context>,
    tenant: &TenantId,
    group: &GroupId,
) -> Result<ActorRef<QueueMsg>, RouterError> {
    let key = (tenant.clone(), group.clone());
    context
        .queues
        .get_or_activate(&key, || async {
            if !context.shards.owns(&queue_key(tenant, group)) {
                return Err(RouterError::NotOwner);
            }
            let known = context.directory.tenant(tenant).is_some_and(|entry| entry.groups.contains_key(group));
            if !known {
                return Err(RouterError::UnknownGroup);
            }
            let request = ListConversationsRequest {
                tenant_id: tenant.to_string(),
                states: vec!["queued".into()],
                group_ids: vec![group.to_string()],
                ..Default::default()
            };
            let response = context.store.list_conversations(request).await.map_err(from_store)?;
            let mut waiting = WaitingQueue::default();
            for record in &response.conversations {
                let conversation =
                    conversation_from_record(record).map_err(|error| RouterError::Internal(error.to_string()))?;
                waiting.insert(WaitingEntry {
                    conversation: conversation.id,
                    group: conversation.group,
                    queued_at_ms: conversation.queued_at_ms,
                    customer_name: conversation.customer_name,
                    question: conversation.first_question,
                });
            }
            let state = QueueActorState {
                context: context.clone(),
                tenant: tenant.clone(),
                group: group.clone(),
                waiting,
                version: 0,
                subscribers: BTreeSet::new(),
            };
            let (actor, _) = Actor::spawn(None, QueueActor, state)
                .await
                .map_err(|error| RouterError::Internal(format!("queue actor did not start: {error}")))?;
            Ok(actor)
        })
        .await
}
