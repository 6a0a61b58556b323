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
    /// The chat was cancelled: by its customer while it waited (`chat.cancel`, or leaving it), by its agent,
    /// or abandoned ([`CancelReason::Abandoned`]).
    Cancelled {
        /// `None`: by a person, the event's author.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<CancelReason>,
    },
    /// Push routing offered the waiting chat to one agent, until `expires_at_ms`.
    Offered {
        agent: AgentId,
        expires_at_ms: i64,
    },
    /// The outstanding offer to `agent` ended without an accept; the chat is offered to someone else next.
    OfferEnded {
        agent: AgentId,
        reason: OfferEnd,
    },
    /// The chat moved to another group's waiting queue (from its owner when it was ongoing). It keeps its
    /// original arrival time there, so it is placed among that group's chats by when the customer came.
    Transferred {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_agent: Option<AgentId>,
        to_group: GroupId,
    },
    /// The chat was handed to another agent, who owns it from now on.
    Forwarded {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_agent: Option<AgentId>,
        to_agent: AgentId,
    },
    /// The owner stopped serving the chat (went offline past the grace period): it waits again in its
    /// group, at its original arrival time (so ahead of every chat that came after it).
    Requeued {
        from_agent: AgentId,
        reason: RequeueReason,
    },
    /// Every connection of the customer to the ongoing chat closed or lapsed, and none came back within the
    /// presence grace period: the agent is talking to nobody (author `system`).
    CustomerLeft,
    /// The customer connected to the chat again after a `customer_left` (author `system`).
    CustomerReturned,
    /// An event of a kind this version does not know, written by a newer one (during a rolling upgrade, or
    /// after a rollback): it keeps its place in the log (its seq) and changes nothing here. Never decided.
    #[serde(other)]
    Unknown,
}

/// Why an offer ended without an accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferEnd {
    /// The agent declined it.
    Rejected,
    /// The agent did not answer before the offer timed out.
    TimedOut,
    /// The agent became unavailable (offline, away, out of reach) while it was outstanding. Unlike the
    /// others, it does not count as the agent having had the chat in this round of offers.
    Withdrawn,
}

impl OfferEnd {
    pub fn as_str(&self) -> &'static str {
        match self {
            OfferEnd::Rejected => "rejected",
            OfferEnd::TimedOut => "timed_out",
            OfferEnd::Withdrawn => "withdrawn",
        }
    }
}

/// Why the system cancelled a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The customer went away while it waited (every connection closed or lost) and did not come back
    /// within the grace period.
    Abandoned,
}

impl CancelReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            CancelReason::Abandoned => "abandoned",
        }
    }
}

/// Why a chat went back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequeueReason {
    /// Its agent lost their connection and did not come back within the grace period.
    AgentOffline,
}

/// An outstanding offer of a waiting chat to one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub agent: AgentId,
    pub expires_at_ms: i64,
}

impl EventBody {
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Created { .. } => "created",
            EventBody::Accepted { .. } => "accepted",
            EventBody::Message { .. } => "message",
            EventBody::Delivered { .. } => "delivered",
            EventBody::Closed => "closed",
            EventBody::Cancelled { .. } => "cancelled",
            EventBody::Offered { .. } => "offered",
            EventBody::OfferEnded { .. } => "offer_ended",
            EventBody::Transferred { .. } => "transferred",
            EventBody::Forwarded { .. } => "forwarded",
            EventBody::Requeued { .. } => "requeued",
            EventBody::CustomerLeft => "customer_left",
            EventBody::CustomerReturned => "customer_returned",
            EventBody::Unknown => "unknown",
        }
    }

    /// Whether the event changes the conversation's summary, its state, owner, times, offer or delivery
    /// marks (not only its log).
    pub fn changes_summary(&self) -> bool {
        !matches!(self, EventBody::Created { .. } | EventBody::Message { .. } | EventBody::Unknown)
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
    /// `offered_only`: the group routes by push, so only the agent the chat is offered to may accept it.
    Accept {
        agent: AgentId,
        offered_only: bool,
    },
    /// Offer the waiting chat to an agent (push routing); at most one offer is outstanding per chat.
    Offer {
        agent: AgentId,
        expires_at_ms: i64,
    },
    /// End the outstanding offer to `agent` (no-op when it is no longer outstanding).
    EndOffer {
        agent: AgentId,
        reason: OfferEnd,
    },
    /// Move the chat to another group's queue. Whether that group is online is checked by the caller.
    Transfer {
        by: Author,
        to_group: GroupId,
    },
    /// Give the chat to another agent, whose capacity the caller has reserved.
    Forward {
        by: Author,
        to_agent: AgentId,
    },
    /// The owner is gone: the chat waits again.
    Requeue {
        agent: AgentId,
        reason: RequeueReason,
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
    /// The system cancels the waiting chat whose customer went away (no-op once it is no longer waiting).
    Abandon,
    /// The system found the customer connected to the chat (`here`) or gone for the grace period: the
    /// change is recorded (`customer_left` only while an agent owns the chat; nothing once it ended, or when
    /// it is what the chat knows already).
    CustomerPresence {
        here: bool,
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
    /// The outstanding offer (push routing), if any.
    pub offer: Option<Offer>,
    /// The agents whose offer of this chat ended without an accept since it last entered a queue, in order.
    pub offered_to: Vec<AgentId>,
    /// The customer left (a `customer_left` event) and has not returned since.
    pub customer_away: bool,
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
            offer: None,
            offered_to: Vec::new(),
            customer_away: false,
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
        Command::Accept { agent, offered_only } => match state {
            Queued if *offered_only && conversation.offer.as_ref().is_none_or(|offer| offer.agent != *agent) => {
                Err(Refusal::NotOffered)
            }
            Queued => Ok(Some(EventBody::Accepted { agent: agent.clone() })),
            Active if conversation.is_owner(agent) => Ok(None),
            Active => Err(Refusal::ChatTaken),
            Closed | Cancelled => Err(Refusal::ChatClosed),
        },
        Command::Offer { agent, expires_at_ms } => match (state, &conversation.offer) {
            (Queued, None) => Ok(Some(EventBody::Offered { agent: agent.clone(), expires_at_ms: *expires_at_ms })),
            (Queued, Some(offer)) if offer.agent == *agent => Ok(None),
            (Queued, Some(_)) => Err(Refusal::OfferOutstanding),
            (Active, _) => Err(Refusal::ChatTaken),
            (Closed | Cancelled, _) => Err(Refusal::ChatClosed),
        },
        Command::EndOffer { agent, reason } => match &conversation.offer {
            Some(offer) if offer.agent == *agent && state == Queued => {
                Ok(Some(EventBody::OfferEnded { agent: agent.clone(), reason: *reason }))
            }
            _ => Ok(None),
        },
        Command::Transfer { by, to_group } => {
            if state.is_finished() {
                return Err(Refusal::ChatClosed);
            }
            if *to_group == conversation.group && state == Queued {
                return Err(Refusal::SameGroup);
            }
            let from_agent = match (by, state) {
                (Author::Agent(agent), Active) if conversation.is_owner(agent) => Some(agent.clone()),
                (Author::Agent(_), Active) => return Err(Refusal::NotParticipant),
                (Author::Customer, _) => return Err(Refusal::NotParticipant),
                (Author::Agent(_) | Author::System, _) => conversation.owner.clone(),
            };
            Ok(Some(EventBody::Transferred { from_agent, to_group: to_group.clone() }))
        }
        Command::Forward { by, to_agent } => {
            if state.is_finished() {
                return Err(Refusal::ChatClosed);
            }
            if conversation.is_owner(to_agent) {
                return Err(Refusal::SameAgent);
            }
            let from_agent = match (by, state) {
                (Author::Agent(agent), Active) if conversation.is_owner(agent) => Some(agent.clone()),
                (Author::Agent(_), Active) | (Author::Customer, _) => return Err(Refusal::NotParticipant),
                (Author::Agent(_) | Author::System, _) => conversation.owner.clone(),
            };
            Ok(Some(EventBody::Forwarded { from_agent, to_agent: to_agent.clone() }))
        }
        Command::Requeue { agent, reason } => match state {
            Active if conversation.is_owner(agent) => {
                Ok(Some(EventBody::Requeued { from_agent: agent.clone(), reason: *reason }))
            }
            _ => Ok(None),
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
                (Author::Customer, Queued) => Ok(Some(EventBody::Cancelled { reason: None })),
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
                Author::Agent(agent) if conversation.is_owner(agent) => Ok(Some(EventBody::Cancelled { reason: None })),
                Author::Agent(_) if state == Queued => Err(Refusal::NotAccepted),
                _ => Err(Refusal::NotParticipant),
            }
        }
        // Accepted, transferred away or ended since the customer was found gone: nothing to do (an agent who
        // took the chat finds out for themselves).
        Command::Abandon => match state {
            Queued => Ok(Some(EventBody::Cancelled { reason: Some(CancelReason::Abandoned) })),
            Active | Closed | Cancelled => Ok(None),
        },
        // Told only while an agent owns the chat (a waiting chat's customer who stays away abandons it); a
        // return is recorded whatever the chat's state until it ends, so that a `customer_left` is never the
        // last word while the customer is there.
        Command::CustomerPresence { here } => match (state, conversation.customer_away, *here) {
            (Closed | Cancelled, _, _) => Ok(None),
            (_, true, true) => Ok(Some(EventBody::CustomerReturned)),
            (Active, false, false) => Ok(Some(EventBody::CustomerLeft)),
            _ => Ok(None),
        },
    }
}

/// Fold an appended event into the state. Events come from the log in sequence order.
pub fn apply(conversation: &mut Conversation, event: &Event) {
    conversation.last_seq = conversation.last_seq.max(event.seq);
    match &event.body {
        EventBody::Created { .. } | EventBody::Message { .. } | EventBody::Unknown => {}
        EventBody::CustomerLeft => conversation.customer_away = true,
        EventBody::CustomerReturned => conversation.customer_away = false,
        EventBody::Accepted { agent } => {
            conversation.state = ConversationState::Active;
            conversation.owner = Some(agent.clone());
            conversation.accepted_at_ms = Some(event.at_ms);
            conversation.offer = None;
            conversation.offered_to.clear();
        }
        EventBody::Offered { agent, expires_at_ms } => {
            conversation.offer = Some(Offer { agent: agent.clone(), expires_at_ms: *expires_at_ms });
        }
        EventBody::OfferEnded { agent, reason } => {
            if conversation.offer.as_ref().is_some_and(|offer| offer.agent == *agent) {
                conversation.offer = None;
            }
            // A withdrawn offer (the agent became unavailable: away, offline, out of reach) does not count as
            // the agent having had the chat: once available again they may be offered it in this round.
            if *reason != OfferEnd::Withdrawn && !conversation.offered_to.contains(agent) {
                conversation.offered_to.push(agent.clone());
            }
        }
        EventBody::Transferred { to_group, .. } => {
            conversation.state = ConversationState::Queued;
            conversation.group = to_group.clone();
            conversation.owner = None;
            conversation.accepted_at_ms = None;
            conversation.offer = None;
            conversation.offered_to.clear();
        }
        EventBody::Forwarded { to_agent, .. } => {
            conversation.state = ConversationState::Active;
            conversation.owner = Some(to_agent.clone());
            conversation.accepted_at_ms = conversation.accepted_at_ms.or(Some(event.at_ms));
            conversation.offer = None;
            conversation.offered_to.clear();
        }
        EventBody::Requeued { from_agent, .. } => {
            conversation.state = ConversationState::Queued;
            conversation.owner = None;
            conversation.accepted_at_ms = None;
            conversation.offer = None;
            conversation.offered_to = vec![from_agent.clone()];
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
            conversation.offer = None;
        }
        EventBody::Cancelled { .. } => {
            conversation.state = ConversationState::Cancelled;
            conversation.closed_at_ms = Some(event.at_ms);
            conversation.offer = None;
        }
    }
}

#[cfg(test)]
#[path = "conversation_tests.rs"]
mod tests;
