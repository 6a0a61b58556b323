//! An agent's availability: status × capacity × the chats they hold.
//!
//! Accepting is two steps because the conversation decides who wins: the agent first *reserves* a slot
//! (refused when not online or at capacity), then either *confirms* it (the conversation accepted) or
//! *releases* it (the chat was taken). Reserved and held chats together never exceed the capacity.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{AgentId, ConversationId, GroupId, Refusal, TenantId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Signed in and taking chats.
    Online,
    /// Signed in, keeps their chats, takes no new ones.
    Away,
    /// Not signed in.
    Offline,
}

impl AgentStatus {
    /// Its name in the protocol, as serde writes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            AgentStatus::Online => "online",
            AgentStatus::Away => "away",
            AgentStatus::Offline => "offline",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "online" => AgentStatus::Online,
            "away" => AgentStatus::Away,
            "offline" => AgentStatus::Offline,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    pub tenant: TenantId,
    pub id: AgentId,
    pub groups: Vec<GroupId>,
    pub capacity: u32,
    pub status: AgentStatus,
    /// Chats this agent owns and that are not finished.
    pub active: BTreeSet<ConversationId>,
    /// Chats this agent is accepting right now (the conversation has not answered yet), or is being
    /// offered: an offer holds a slot until it is accepted or ends.
    pub reserved: BTreeSet<ConversationId>,
    /// The chat offered to this agent now (push routing): at most one at a time.
    pub offer: Option<ConversationId>,
    /// Since when the agent has been idle: set when they come online, get a chat or finish one. Push
    /// routing offers the longest idle first.
    pub idle_since_ms: i64,
}

/// What a support queue needs to know of an agent to choose whom to offer a chat (push routing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAvailability {
    pub agent: AgentId,
    pub status: AgentStatus,
    pub capacity: u32,
    /// Chats held and slots reserved.
    pub held: u32,
    pub offer: Option<ConversationId>,
    pub idle_since_ms: i64,
    /// Which state of the agent this is, for a queue to keep the newest it heard of.
    pub version: AvailabilityVersion,
}

/// Orders the reports of one agent's availability. They reach a queue by several ways that can cross: a
/// change's cast (retried from a task of its own when the queue lives on another node), a read the queue
/// asked for, the read of every member when the queue starts. A queue keeps the newest it heard of, so an
/// older report arriving late (an agent's "offline" after their "online") is dropped instead of leaving
/// the queue with a state the agent has left: nothing offered to an agent who is online, with chats waiting.
///
/// An activation of the agent's actor takes the epoch of its shard's lease, higher than that of any
/// owner before it; under one epoch, a count kept by the owning process goes up with each new state (so
/// also across a restart of the actor under the same lease). Equal versions are the same state. `0/0` is
/// unversioned: a report from a router of an older version, which a queue takes as it comes, as before
/// there were versions (during a rolling upgrade an agent's actor can move to such a router).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AvailabilityVersion {
    pub epoch: u64,
    pub change: u64,
}

impl AvailabilityVersion {
    pub fn is_versioned(self) -> bool {
        self != AvailabilityVersion::default()
    }
}

impl AgentAvailability {
    /// Online, with a free slot, and no offer outstanding.
    pub fn can_take_offer(&self) -> bool {
        self.status == AgentStatus::Online && self.held < self.capacity && self.offer.is_none()
    }
}

impl AgentState {
    pub fn new(tenant: TenantId, id: AgentId, groups: Vec<GroupId>, capacity: u32) -> Self {
        AgentState {
            tenant,
            id,
            groups,
            capacity,
            status: AgentStatus::Offline,
            active: BTreeSet::new(),
            reserved: BTreeSet::new(),
            offer: None,
            idle_since_ms: 0,
        }
    }

    /// The agent's availability now, at `version` (the agent's actor keeps the count).
    pub fn availability(&self, version: AvailabilityVersion) -> AgentAvailability {
        AgentAvailability {
            agent: self.id.clone(),
            status: self.status,
            capacity: self.capacity,
            held: u32::try_from(self.n_held()).unwrap_or(u32::MAX),
            offer: self.offer,
            idle_since_ms: self.idle_since_ms,
            version,
        }
    }

    /// Changes the status; coming online starts an idle period.
    pub fn set_status(&mut self, status: AgentStatus, now_ms: i64) {
        if status == AgentStatus::Online && self.status != AgentStatus::Online {
            self.idle_since_ms = now_ms;
        }
        self.status = status;
    }

    /// Push routing offers this agent a chat: a slot is reserved until the offer is accepted or ends.
    pub fn take_offer(&mut self, conversation: ConversationId, group: &GroupId) -> Result<(), Refusal> {
        if self.offer == Some(conversation) {
            return Ok(());
        }
        if self.offer.is_some() {
            return Err(Refusal::OfferOutstanding);
        }
        if self.active.contains(&conversation) {
            return Err(Refusal::SameAgent);
        }
        self.reserve(conversation, group)?;
        self.offer = Some(conversation);
        Ok(())
    }

    /// The offer ended without an accept: its slot is free again.
    pub fn end_offer(&mut self, conversation: &ConversationId) {
        if self.offer.as_ref() == Some(conversation) {
            self.offer = None;
            self.reserved.remove(conversation);
        }
    }

    pub fn is_member_of(&self, group: &GroupId) -> bool {
        self.groups.contains(group)
    }

    pub fn n_held(&self) -> usize {
        self.active.len() + self.reserved.len()
    }

    pub fn has_free_capacity(&self) -> bool {
        self.n_held() < self.capacity as usize
    }

    /// Take a slot for a chat this agent is about to accept.
    pub fn reserve(&mut self, conversation: ConversationId, group: &GroupId) -> Result<(), Refusal> {
        if !self.is_member_of(group) {
            return Err(Refusal::NotInGroup);
        }
        if self.status != AgentStatus::Online {
            return Err(Refusal::AgentNotOnline);
        }
        if self.active.contains(&conversation) || self.reserved.contains(&conversation) {
            return Ok(());
        }
        if !self.has_free_capacity() {
            return Err(Refusal::AtCapacity { capacity: self.capacity });
        }
        self.reserved.insert(conversation);
        Ok(())
    }

    /// The conversation accepted this agent: the reservation becomes a held chat.
    pub fn confirm(&mut self, conversation: ConversationId, now_ms: i64) {
        self.reserved.remove(&conversation);
        if self.offer == Some(conversation) {
            self.offer = None;
        }
        self.active.insert(conversation);
        self.idle_since_ms = now_ms;
    }

    /// The accept failed: give the slot back (an outstanding offer keeps it until the offer ends).
    pub fn release(&mut self, conversation: &ConversationId) {
        if self.offer.as_ref() != Some(conversation) {
            self.reserved.remove(conversation);
        }
    }

    /// The chat ended (or moved away from this agent).
    pub fn finish(&mut self, conversation: &ConversationId, now_ms: i64) {
        self.reserved.remove(conversation);
        if self.offer.as_ref() == Some(conversation) {
            self.offer = None;
        }
        if self.active.remove(conversation) {
            self.idle_since_ms = now_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;

    fn online_agent(capacity: u32) -> AgentState {
        let mut agent = AgentState::new(
            TenantId::new("t").unwrap(),
            AgentId::new("a").unwrap(),
            vec![GroupId::new("g").unwrap()],
            capacity,
        );
        agent.status = AgentStatus::Online;
        agent
    }

    fn chat(n: u128) -> ConversationId {
        ConversationId::from_uuid(Uuid::from_u128(n))
    }

    #[test]
    fn an_agent_must_be_online_and_in_the_group_to_take_a_chat() {
        let group = GroupId::new("g").unwrap();
        let mut agent = online_agent(2);
        assert_eq!(agent.reserve(chat(1), &GroupId::new("other").unwrap()), Err(Refusal::NotInGroup));
        agent.status = AgentStatus::Away;
        assert_eq!(agent.reserve(chat(1), &group), Err(Refusal::AgentNotOnline));
    }

    #[test]
    fn reservations_count_against_capacity() {
        let group = GroupId::new("g").unwrap();
        let mut agent = online_agent(2);
        agent.reserve(chat(1), &group).unwrap();
        agent.reserve(chat(2), &group).unwrap();
        assert_eq!(agent.reserve(chat(3), &group), Err(Refusal::AtCapacity { capacity: 2 }));
        agent.release(&chat(2));
        agent.confirm(chat(1), 5);
        agent.reserve(chat(3), &group).unwrap();
        assert_eq!(agent.n_held(), 2);
        agent.finish(&chat(1), 6);
        assert_eq!(agent.n_held(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u128),
        Confirm(u128),
        Release(u128),
        Finish(u128),
        Offer(u128),
        EndOffer(u128),
        Status(AgentStatus),
    }

    fn any_op() -> impl Strategy<Value = Op> {
        let id = 0u128..6;
        prop_oneof![
            id.clone().prop_map(Op::Reserve),
            id.clone().prop_map(Op::Confirm),
            id.clone().prop_map(Op::Release),
            id.clone().prop_map(Op::Finish),
            id.clone().prop_map(Op::Offer),
            id.prop_map(Op::EndOffer),
            prop::sample::select(vec![AgentStatus::Online, AgentStatus::Away]).prop_map(Op::Status),
        ]
    }

    proptest! {
        /// Confirm is only called for a reservation that succeeded, as the agent actor does.
        #[test]
        fn capacity_is_never_exceeded(capacity in 0u32..4, ops in prop::collection::vec(any_op(), 0..50)) {
            let group = GroupId::new("g").unwrap();
            let mut agent = online_agent(capacity);
            for op in ops {
                match op {
                    Op::Reserve(n) => { let _ = agent.reserve(chat(n), &group); }
                    Op::Confirm(n) => if agent.reserved.contains(&chat(n)) { agent.confirm(chat(n), 1) },
                    Op::Release(n) => agent.release(&chat(n)),
                    Op::Finish(n) => agent.finish(&chat(n), 1),
                    Op::Offer(n) => { let _ = agent.take_offer(chat(n), &group); }
                    Op::EndOffer(n) => agent.end_offer(&chat(n)),
                    Op::Status(status) => agent.status = status,
                }
                prop_assert!(agent.n_held() <= capacity as usize);
                prop_assert!(agent.active.is_disjoint(&agent.reserved));
                if let Some(offer) = agent.offer {
                    prop_assert!(agent.reserved.contains(&offer), "an offer always holds its slot");
                }
            }
        }
    }
}
