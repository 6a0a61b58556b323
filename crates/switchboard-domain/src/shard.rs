//! Placement keys. Every actor key maps to one of a fixed number of shards; shards move between router
//! nodes, keys never change shard. Ownership of a shard is a lease with an epoch; a write carries the
//! [`Fence`] it was made under, and the store rejects it when the epoch is no longer current.

use serde::{Deserialize, Serialize};

/// The number of shards. Fixed forever: changing it would move keys between shards.
pub const N_SHARDS: u32 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

/// The generation of a shard's lease: it grows by one at every change of owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

/// The shard and lease epoch a write is made under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    pub shard: ShardId,
    pub epoch: Epoch,
}

/// The shard of an actor key such as `conversation/{id}` or `queue/{tenant}/{group}`.
///
/// FNV-1a, because it must never change between versions or platforms (std's hasher may).
pub fn shard_of(key: &str) -> ShardId {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = key.bytes().fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME));
    ShardId((hash % u64::from(N_SHARDS)) as u32)
}

/// The placement key of a conversation actor.
pub fn conversation_key(conversation: &crate::ConversationId) -> String {
    format!("conversation/{conversation}")
}

/// The placement key of an agent actor.
pub fn agent_key(tenant: &crate::TenantId, agent: &crate::AgentId) -> String {
    format!("agent/{tenant}/{agent}")
}

/// The placement key of a support-queue actor.
pub fn queue_key(tenant: &crate::TenantId, group: &crate::GroupId) -> String {
    format!("queue/{tenant}/{group}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_stable_across_versions() {
        // These values are part of the on-disk format: a change here moves every key.
        assert_eq!(shard_of("conversation/0"), ShardId(225));
        assert_eq!(shard_of("queue/demo/sales"), ShardId(9));
        assert_eq!(shard_of("agent/demo/alice"), ShardId(639));
        assert_eq!(shard_of(""), ShardId(805));
    }

    #[test]
    fn keys_spread_over_many_shards() {
        let shards: std::collections::HashSet<_> = (0..4096).map(|i| shard_of(&format!("conversation/{i}"))).collect();
        assert!(shards.len() > 900, "only {} shards used", shards.len());
    }
}
