//! The agent actor: an agent's availability (status × capacity × chats held). Accepting a chat goes
//! through it, so that capacity is checked and held while the conversation decides who wins.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use switchboard_domain::{AgentId, AgentState, AgentStatus, ConversationId, TenantId, agent_key};
use switchboard_proto::convert::conversation_id;
use switchboard_proto::internal::v1::ListConversationsRequest;
use switchboard_proto::router::{AgentView, Caller, ChatView, RouterError};

use crate::context::Context;
use crate::error::from_store;
use crate::remote;

type Reply<T> = RpcReplyPort<Result<T, RouterError>>;

pub(crate) enum AgentMsg {
    SetStatus {
        status: AgentStatus,
        reply: Reply<AgentView>,
    },
    Accept {
        conversation: ConversationId,
        reply: Reply<ChatView>,
    },
    /// A chat of this agent ended.
    Finished {
        conversation: ConversationId,
    },
}

pub(crate) struct AgentActor;

pub(crate) struct AgentActorState {
    context: Arc<Context>,
    agent: AgentState,
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentActorState;
    type Arguments = (Arc<Context>, AgentState);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (context, agent): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(AgentActorState { context, agent })
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let key = (state.agent.tenant.clone(), state.agent.id.clone());
        state.context.agents.forget(&key, &myself);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentMsg::SetStatus { status, reply } => {
                state.agent.status = status;
                let _ = reply.send(Ok(view_of(&state.agent)));
            }
            AgentMsg::Accept { conversation, reply } => {
                let result = state.accept(conversation).await;
                let _ = reply.send(result);
            }
            AgentMsg::Finished { conversation } => state.agent.finish(&conversation),
        }
        Ok(())
    }
}

impl AgentActorState {
    async fn accept(&mut self, conversation: ConversationId) -> Result<ChatView, RouterError> {
        let caller = Caller::Agent { tenant: self.agent.tenant.clone(), agent: self.agent.id.clone() };
        let view = remote::conversation_view(&self.context, &caller, conversation).await?;
        self.agent.reserve(conversation, &view.group)?;
        let accepted = remote::conversation_accept(&self.context, conversation, &self.agent.id).await;
        match &accepted {
            Ok(_) => self.agent.confirm(conversation),
            Err(_) => self.agent.release(&conversation),
        }
        accepted
    }
}

pub(crate) fn view_of(agent: &AgentState) -> AgentView {
    AgentView {
        tenant: agent.tenant.clone(),
        agent: agent.id.clone(),
        status: agent.status,
        capacity: agent.capacity,
        groups: agent.groups.clone(),
        active: agent.active.iter().copied().collect(),
    }
}

/// The running actor of an agent, activated with the chats the store says the agent holds.
pub(crate) async fn activate(
    context: &Arc<Context>,
    tenant: &TenantId,
    agent: &AgentId,
) -> Result<ActorRef<AgentMsg>, RouterError> {
    let key = (tenant.clone(), agent.clone());
    context
        .agents
        .get_or_activate(&key, || async {
            if !context.shards.owns(&agent_key(tenant, agent)) {
                return Err(RouterError::NotOwner);
            }
            let entry = context.directory.agent(tenant, agent).ok_or(RouterError::UnknownAgent)?;
            let mut state = AgentState::new(tenant.clone(), agent.clone(), entry.groups.clone(), entry.capacity);
            let request = ListConversationsRequest {
                tenant_id: tenant.to_string(),
                states: vec!["active".into()],
                owner_agent_id: agent.to_string(),
                ..Default::default()
            };
            let held = context.store.list_conversations(request).await.map_err(from_store)?;
            for record in held.conversations {
                let id = conversation_id(&record.id).map_err(|error| RouterError::Internal(error.to_string()))?;
                state.active.insert(id);
            }
            let (actor, _) = Actor::spawn(None, AgentActor, (context.clone(), state))
                .await
                .map_err(|error| RouterError::Internal(format!("agent actor did not start: {error}")))?;
            Ok(actor)
        })
        .await
}
