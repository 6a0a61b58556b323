//! The conversation lifecycle: queued → active → closed, or cancelled.
//!
//! A conversation is the fold of its event log. [`decide`] looks at the current state and a command and
//! returns the event to append (or a refusal, or nothing when the command changes nothing); [`apply`] folds
//! an appended event into the state. The store gives each appended event the next sequence number.

use serde::{Deserialize, Serialize};

use crate::{AgentId, ConversationId, GroupId, Refusal, TenantId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationState {
    /// Waiting in its group's queue for an agent.
    Queued,
    /// Accepted by an agent, who owns it.
    Active,
    /// Ended normally; the transcript stays readable.
    Closed,
    /// Ended before it was resolved: abandoned by the customer while waiting, or cancelled by the agent.
    Cancelled,
}

impl ConversationState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ConversationState::Queued => "queued",
            ConversationState::Active => "active",
            ConversationState::Closed => "closed",
            ConversationState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "queued" => ConversationState::Queued,
            "active" => ConversationState::Active,
            "closed" => ConversationState::Closed,
            "cancelled" => ConversationState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_finished(&self) -> bool {
        matches!(self, ConversationState::Closed | ConversationState::Cancelled)
    }
}

/// Who did something in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "role", content = "id", rename_all = "snake_case")]
pub enum Author {
    Customer,
    Agent(AgentId),
    System,
}

/// What happened, as stored in the event log. The tag names are part of the public protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// The chat was started and queued in `group`.
    Created {
        group: GroupId,
        customer_name: String,
        question: String,
    },
    /// An agent accepted the chat and owns it from now on.
    Accepted {
        agent: AgentId,
    },
    Message {
        body: String,
    },
    /// The author's side confirms it received every message of the other side up to `up_to_seq`.
    Delivered {
        up_to_seq: u64,
    },
    /// The chat ended; its transcript stays readable.
    Closed,
    /// The chat was cancelled (abandoned while waiting, or cancelled by the agent).
    Cancelled,
}

impl EventBody {
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Created { .. } => "created",
            EventBody::Accepted { .. } => "accepted",
            EventBody::Message { .. } => "message",
            EventBody::Delivered { .. } => "delivered",
            EventBody::Closed => "closed",
            EventBody::Cancelled => "cancelled",
        }
    }

    /// Whether the event changes the conversation's state, owner or times (not only its log).
    pub fn changes_summary(&self) -> bool {
        matches!(self, EventBody::Accepted { .. } | EventBody::Closed | EventBody::Cancelled)
    }
}

/// An appended event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: i64,
    pub author: Author,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(flatten)]
    pub body: EventBody,
}

/// What an actor is asked to do to a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Accept {
        agent: AgentId,
    },
    Send {
        author: Author,
        body: String,
    },
    ConfirmDelivery {
        by: Author,
        up_to_seq: u64,
    },
    /// The customer leaves or an agent ends the chat.
    Close {
        by: Author,
    },
    /// An agent cancels the chat (the customer is told).
    Cancel {
        by: Author,
    },
}

/// The facts a new conversation starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConversation {
    pub id: ConversationId,
    pub tenant: TenantId,
    pub group: GroupId,
    pub customer_name: String,
    pub question: String,
    pub created_at_ms: i64,
}

/// The state of one conversation, derived from its event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: ConversationId,
    pub tenant: TenantId,
    pub group: GroupId,
    pub customer_name: String,
    pub first_question: String,
    pub state: ConversationState,
    pub owner: Option<AgentId>,
    pub created_at_ms: i64,
    pub queued_at_ms: i64,
    pub accepted_at_ms: Option<i64>,
    pub closed_at_ms: Option<i64>,
    pub last_seq: u64,
    /// The highest seq each side has confirmed as delivered.
    pub customer_delivered_up_to: u64,
    pub agent_delivered_up_to: u64,
}

impl Conversation {
    /// The state right after the `created` event, before any event is appended.
    pub fn new(facts: &NewConversation) -> Self {
        Conversation {
            id: facts.id,
            tenant: facts.tenant.clone(),
            group: facts.group.clone(),
            customer_name: facts.customer_name.clone(),
            first_question: facts.question.clone(),
            state: ConversationState::Queued,
            owner: None,
            created_at_ms: facts.created_at_ms,
            queued_at_ms: facts.created_at_ms,
            accepted_at_ms: None,
            closed_at_ms: None,
            last_seq: 0,
            customer_delivered_up_to: 0,
            agent_delivered_up_to: 0,
        }
    }

    /// The events that open a conversation: it is created (and queued), then the first question is the
    /// customer's first message.
    pub fn opening_events(facts: &NewConversation) -> Vec<(Author, EventBody)> {
        vec![
            (
                Author::System,
                EventBody::Created {
                    group: facts.group.clone(),
                    customer_name: facts.customer_name.clone(),
                    question: facts.question.clone(),
                },
            ),
            (Author::Customer, EventBody::Message { body: facts.question.clone() }),
        ]
    }

    pub fn is_owner(&self, agent: &AgentId) -> bool {
        self.owner.as_ref() == Some(agent)
    }
}

/// Decide what a command does to a conversation: the event to append, `Ok(None)` when it changes nothing
/// (a repeated delivery mark), or a refusal.
pub fn decide(conversation: &Conversation, command: &Command) -> Result<Option<EventBody>, Refusal> {
    use ConversationState::*;
    let state = conversation.state;
    match command {
        Command::Accept { agent } => match state {
            Queued => Ok(Some(EventBody::Accepted { agent: agent.clone() })),
            Active if conversation.is_owner(agent) => Ok(None),
            Active => Err(Refusal::ChatTaken),
            Closed | Cancelled => Err(Refusal::ChatClosed),
        },
        Command::Send { author, body } => {
            if body.trim().is_empty() {
                return Err(Refusal::EmptyMessage);
            }
            if state.is_finished() {
                return Err(Refusal::ChatClosed);
            }
            match author {
                Author::Customer | Author::System => {}
                Author::Agent(agent) if conversation.is_owner(agent) => {}
                Author::Agent(_) if state == Queued => return Err(Refusal::NotAccepted),
                Author::Agent(_) => return Err(Refusal::NotParticipant),
            }
            Ok(Some(EventBody::Message { body: body.clone() }))
        }
        Command::ConfirmDelivery { by, up_to_seq } => {
            if *up_to_seq > conversation.last_seq {
                return Err(Refusal::BadDeliveryMark { last_seq: conversation.last_seq });
            }
            let already = match by {
                Author::Customer => conversation.customer_delivered_up_to,
                Author::Agent(agent) if conversation.is_owner(agent) => conversation.agent_delivered_up_to,
                Author::Agent(_) | Author::System => return Err(Refusal::NotParticipant),
            };
            if *up_to_seq <= already {
                return Ok(None);
            }
            Ok(Some(EventBody::Delivered { up_to_seq: *up_to_seq }))
        }
        Command::Close { by } => {
            if state.is_finished() {
                return Ok(None);
            }
            match (by, state) {
                // A customer who leaves before anyone answered abandons the chat.
                (Author::Customer, Queued) => Ok(Some(EventBody::Cancelled)),
                (Author::Customer | Author::System, _) => Ok(Some(EventBody::Closed)),
                (Author::Agent(agent), Active) if conversation.is_owner(agent) => Ok(Some(EventBody::Closed)),
                (Author::Agent(_), Queued) => Err(Refusal::NotAccepted),
                (Author::Agent(_), _) => Err(Refusal::NotParticipant),
            }
        }
        Command::Cancel { by } => {
            if state.is_finished() {
                return Ok(None);
            }
            match by {
                Author::Agent(agent) if conversation.is_owner(agent) => Ok(Some(EventBody::Cancelled)),
                Author::Agent(_) if state == Queued => Err(Refusal::NotAccepted),
                _ => Err(Refusal::NotParticipant),
            }
        }
    }
}

/// Fold an appended event into the state. Events come from the log in sequence order.
pub fn apply(conversation: &mut Conversation, event: &Event) {
    conversation.last_seq = conversation.last_seq.max(event.seq);
    match &event.body {
        EventBody::Created { .. } | EventBody::Message { .. } => {}
        EventBody::Accepted { agent } => {
            conversation.state = ConversationState::Active;
            conversation.owner = Some(agent.clone());
            conversation.accepted_at_ms = Some(event.at_ms);
        }
        EventBody::Delivered { up_to_seq } => match &event.author {
            Author::Customer => {
                conversation.customer_delivered_up_to = conversation.customer_delivered_up_to.max(*up_to_seq)
            }
            Author::Agent(_) => conversation.agent_delivered_up_to = conversation.agent_delivered_up_to.max(*up_to_seq),
            Author::System => {}
        },
        EventBody::Closed => {
            conversation.state = ConversationState::Closed;
            conversation.closed_at_ms = Some(event.at_ms);
        }
        EventBody::Cancelled => {
            conversation.state = ConversationState::Cancelled;
            conversation.closed_at_ms = Some(event.at_ms);
        }
    }
}

#[cfg(test)]
#[path = "conversation_tests.rs"]
mod tests;
