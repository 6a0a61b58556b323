//! The store service as a trait. Implementations: the SQL store in `switchboard-store` (in-process in
//! `serve`), and a gRPC client over the same messages in the split roles.

use async_trait::async_trait;

use crate::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, CreateTicketRequest,
    CreateTicketResponse, GetConversationRequest, GetConversationResponse, GetLicenseRequest, GetPlacementRequest,
    License, ListConversationsRequest, ListConversationsResponse, ListTicketsRequest, ListTicketsResponse, Placement,
    ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse, ReleaseShardsRequest,
    ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse, SetLicenseLimitRequest,
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
    /// An append that creates a conversation was refused: the cluster's `max_sessions` concurrent chat
    /// sessions are all open (stable code `license_exhausted`). Nothing of the append was stored; it can
    /// succeed once a session has finished.
    #[error("license exhausted: all {max_sessions} concurrent chat sessions are in use")]
    LicenseExhausted { max_sessions: u64 },
}

impl StoreError {
    /// The stable code of the error, as the gRPC mapping carries it: `stale_epoch`, `not_found`, `invalid`,
    /// `unavailable` or `license_exhausted`.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::StaleEpoch { .. } => "stale_epoch",
            StoreError::NotFound(_) => "not_found",
            StoreError::Invalid(_) => "invalid",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::LicenseExhausted { .. } => "license_exhausted",
        }
    }
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
    /// The cluster-wide license: the limit (0: unlimited) and the permits held now (the conversations
    /// not finished).
    async fn get_license(&self, request: GetLicenseRequest) -> Result<License, StoreError>;
    /// Sets the license limit (0: unlimited) and answers the license as it is then. A limit below the
    /// permits held is allowed: nothing is evicted, new conversations are refused until enough finish.
    async fn set_license_limit(&self, request: SetLicenseLimitRequest) -> Result<License, StoreError>;
    /// Stores a ticket (an offline message), once per tenant and idempotency key: a retry answers the
    /// ticket stored the first time with `duplicate` set. Missing required fields are `Invalid`.
    async fn create_ticket(&self, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError>;
    /// A tenant's tickets (every tenant's when the tenant is empty), newest first.
    async fn list_tickets(&self, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError>;
}
