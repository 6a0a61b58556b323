//! The domain of Switchboard: identifiers, value types and the pure state machines that decide what
//! happens to a conversation, a support queue and an agent.
//!
//! Everything here is a plain function of state and command: no tokio, no I/O, no clock read except through
//! the [`Clock`] trait, and no other workspace crate. The actors in `switchboard-router` load state, call
//! these functions, persist the events they return and apply them; all the rules live here so that they can be
//! tested with plain unit and property tests.

mod agent;
mod clock;
mod conversation;
mod directory;
mod hours;
mod ids;
mod queue;
mod refusal;
mod shard;
mod token;

pub use agent::{AgentAvailability, AgentState, AgentStatus, AvailabilityVersion};
pub use clock::{Clock, FixedClock, SystemClock};
pub use conversation::{
    Author, CancelReason, Command, Conversation, ConversationState, Event, EventBody, NewConversation, Offer, OfferEnd,
    RequeueReason, apply, decide,
};
pub use directory::{AgentEntry, Directory, DirectoryError, GroupEntry, Routing, TenantEntry};
pub use hours::*;
pub use ids::{AgentId, ConversationId, GroupId, IdError, TenantId};
pub use queue::{WaitingEntry, WaitingQueue, merge_waiting};
pub use refusal::Refusal;
pub use shard::{Epoch, Fence, N_SHARDS, ShardId, agent_key, conversation_key, queue_key, shard_of};
pub use token::{
    customer_token_for_start, customer_token_matches, new_customer_token, stored_customer_token,
    unhashed_customer_token,
};
