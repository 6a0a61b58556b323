//! The store service as a trait. Implementations: the SQL store in `switchboard-store` (in-process in
//! `serve`), and a gRPC client over the same messages in the split roles.

use async_trait::async_trait;

use crate::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, GetConversationRequest,
    GetConversationResponse, GetPlacementRequest, ListConversationsRequest, ListConversationsResponse, Placement,
    ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse, ReleaseShardsRequest,
    ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse,
};

/// What can go wrong in the store. Callers branch on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The write's epoch is not the shard's current one: another node owns the shard now.
    #[error("stale epoch for shard {shard}: the shard has moved to another owner")]
    StaleEpoch { shard: u32 },
    #[error("no such conversation: {0}")]
    NotFound(String),
    /// The request is malformed (a bug in the caller, not bad client input).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The database cannot be reached or refused the transaction; retrying may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait StoreApi: Send + Sync + 'static {
    async fn acquire_shards(&self, request: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError>;
    async fn renew_shards(&self, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError>;
    async fn append(&self, request: AppendRequest) -> Result<AppendResponse, StoreError>;
    async fn read_events(&self, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError>;
    async fn get_conversation(&self, request: GetConversationRequest) -> Result<GetConversationResponse, StoreError>;
    async fn list_conversations(
        &self,
        request: ListConversationsRequest,
    ) -> Result<ListConversationsResponse, StoreError>;
    /// Frees the shards held at the given epochs at once (graceful handover).
    async fn release_shards(&self, request: ReleaseShardsRequest) -> Result<ReleaseShardsResponse, StoreError>;
    /// A router's heartbeat: its address with a time to live; answers the nodes alive now.
    async fn register_node(&self, request: RegisterNodeRequest) -> Result<RegisterNodeResponse, StoreError>;
    /// The unexpired leases and the live nodes.
    async fn get_placement(&self, request: GetPlacementRequest) -> Result<Placement, StoreError>;
}
