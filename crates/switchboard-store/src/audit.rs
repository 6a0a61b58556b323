//! Read access to the audit tables: the history of lease grants and the epoch every event was written
//! under. The external invariant checker reads the same tables straight from PostgreSQL
//! (`shard_lease_history`, `events.epoch`); this trait lets the conformance tests read them on every
//! backend.

use async_trait::async_trait;
use switchboard_proto::store::StoreError;

/// One row of `shard_lease_history`: `node_id` was granted `shard` under `epoch` at `acquired_at_ms`
/// (database time). The primary key `(shard, epoch)` makes "one owner per shard epoch" a constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    pub shard: u32,
    pub epoch: u64,
    pub node_id: String,
    pub acquired_at_ms: i64,
}

#[async_trait]
pub trait StoreAudit: Send + Sync + 'static {
    /// Every lease grant, ordered by shard, then epoch.
    async fn lease_history(&self) -> Result<Vec<LeaseGrant>, StoreError>;
    /// `(seq, epoch)` of every event of the conversation, in seq order: the fence epoch each was written
    /// under (0 for events written before migration 2).
    async fn event_epochs(&self, conversation_id: &str) -> Result<Vec<(u64, u64)>, StoreError>;
}
