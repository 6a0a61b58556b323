//! Refusals: the domain's answer when a command is not allowed. A refusal is a normal reply with a
//! stable code, not a failure: nothing is stored and the caller is told what to do.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("this chat was already accepted by another agent")]
    ChatTaken,
    #[error("accept the chat before writing to the customer")]
    NotAccepted,
    #[error("only an agent of this chat can do that")]
    NotParticipant,
    #[error("this chat is closed")]
    ChatClosed,
    #[error("the agent is not online: go online to accept chats")]
    AgentNotOnline,
    #[error("the agent is at capacity ({capacity} chats): end a chat first")]
    AtCapacity { capacity: u32 },
    #[error("the agent is not a member of this chat's support group")]
    NotInGroup,
    #[error("a message must not be empty")]
    EmptyMessage,
    #[error("delivery can only be confirmed for messages that exist (up to seq {last_seq})")]
    BadDeliveryMark { last_seq: u64 },
    #[error("the chat has no events after seq {last_seq}: resume from the last seq received, at most {last_seq}")]
    BadAfterSeq { last_seq: u64 },
    #[error("this group routes chats by offer: only the agent a chat is offered to can accept it")]
    NotOffered,
    #[error("this chat is already offered to another agent")]
    OfferOutstanding,
    #[error("the chat is already in that group")]
    SameGroup,
    #[error("the chat is already that agent's")]
    SameAgent,
    #[error("the group is closed (outside its business hours): leave an offline message instead")]
    GroupClosed,
    #[error("the group is not online (closed, or no agent signed in)")]
    GroupOffline,
    #[error("that agent cannot take the chat now (not online, or at capacity)")]
    AgentUnavailable,
    #[error("the maximum number of concurrent chats ({max_sessions}) is reached: leave an offline message instead")]
    LicenseExhausted { max_sessions: u64 },
    #[error("this start_key started another chat (another name, group or question): choose a new key for a new chat")]
    StartKeyReused,
    #[error(
        "this idempotency_key left another offline message (another group, name, contact or body): choose a new key \
         for a new message"
    )]
    IdempotencyKeyReused,
}

impl Refusal {
    /// The stable code clients branch on. Never change one; add new ones.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::ChatTaken => "chat_taken",
            Refusal::NotAccepted => "not_accepted",
            Refusal::NotParticipant => "not_participant",
            Refusal::ChatClosed => "chat_closed",
            Refusal::AgentNotOnline => "agent_not_online",
            Refusal::AtCapacity { .. } => "at_capacity",
            Refusal::NotInGroup => "not_in_group",
            Refusal::EmptyMessage => "empty_message",
            Refusal::BadDeliveryMark { .. } => "bad_delivery_mark",
            Refusal::BadAfterSeq { .. } => "bad_after_seq",
            Refusal::NotOffered => "not_offered",
            Refusal::OfferOutstanding => "offer_outstanding",
            Refusal::SameGroup => "same_group",
            Refusal::SameAgent => "same_agent",
            Refusal::GroupClosed => "group_closed",
            Refusal::GroupOffline => "group_offline",
            Refusal::AgentUnavailable => "agent_unavailable",
            Refusal::LicenseExhausted { .. } => "license_exhausted",
            Refusal::StartKeyReused => "start_key_reused",
            Refusal::IdempotencyKeyReused => "idempotency_key_reused",
        }
    }
}
