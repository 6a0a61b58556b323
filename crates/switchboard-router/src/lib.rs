//! The router: it hosts the actors. Every conversation, agent and support queue is a ractor actor living on
//! exactly one router node at a time, on the node that holds the lease of its shard.
//!
//! The actors are thin: they load their state from the store, ask `switchboard-domain` what a command does,
//! persist the resulting events through the store under their shard's fence, apply them, reply, and push the
//! change to the subscribed gateways. This crate speaks no HTTP and no WebSocket, and never touches a
//! database except through `StoreApi`.
//!
//! Call order between actors is one way, so that no two actors ever wait on each other:
//! agent → conversation → queue. The other direction is a cast (a message with no reply).

mod agent;
mod context;
mod conversation;
mod error;
mod handles;
mod placement;
mod presence;
mod queue;
mod recent;
mod registry;
mod remote;
mod router;

pub use agent::{OFFER_CHECKED_AFTER_MS, RETELL_EVERY_TICKS};
pub use context::PresenceSettings;
pub use placement::LeaseSettings;
pub use router::{Router, RouterSettings};
