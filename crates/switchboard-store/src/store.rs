//! The store the binary opens, chosen by the database URL.

use std::sync::Arc;

use async_trait::async_trait;
use switchboard_domain::Clock;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, CreateTicketRequest,
    CreateTicketResponse, GetConversationRequest, GetConversationResponse, GetLicenseRequest, GetPlacementRequest,
    License, ListConversationsRequest, ListConversationsResponse, ListTicketsRequest, ListTicketsResponse, Placement,
    ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse, ReleaseShardsRequest,
    ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse, SetLicenseLimitRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};

use crate::{LeaseGrant, PgOptions, PgStore, SqlStore, StoreAudit};

/// A store on SQLite or on PostgreSQL. Cloning is cheap and shares the connections.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqlStore),
    Postgres(PgStore),
}

/// Opens the store at `url` and applies the pending migrations:
///
/// - `postgres://...` or `postgresql://...`: [`PgStore`] with the default [`PgOptions`]; database time is
///   the PostgreSQL server's clock (`clock` is not used for it).
/// - `sqlite:PATH`, `sqlite::memory:` or a plain file path: [`SqlStore`] (created when missing); database
///   time is `clock`.
pub async fn open(url: &str, clock: Arc<dyn Clock>) -> Result<Store, StoreError> {
    if is_postgres_url(url) {
        let store = PgStore::connect(url, PgOptions::default()).await?;
        store.migrate().await?;
        Ok(Store::Postgres(store))
    } else {
        Ok(Store::Sqlite(SqlStore::open(url, clock).await?))
    }
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Store {
    /// Applies the migrations not applied yet. Returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(store) => store.migrate().await,
            Store::Postgres(store) => store.migrate().await,
        }
    }

    /// The versions recorded in `schema_migrations`, oldest first.
    pub async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        match self {
            Store::Sqlite(store) => store.applied_migrations().await,
            Store::Postgres(store) => store.applied_migrations().await,
        }
    }

    /// Closes the connections, waiting for the ones in use to be returned.
    pub async fn close(&self) {
        match self {
            Store::Sqlite(store) => store.close().await,
            Store::Postgres(store) => store.close().await,
        }
    }

    /// Why the store refuses every append until it is restarted, if it does: on SQLite, a sync of the
    /// write-ahead log failed, or the append writer could not put its connection back in order (see
    /// [`SqlStore::writer_failure`]). A PostgreSQL store never does: a failed batch fails its own appends,
    /// and the next batch is tried afresh.
    pub fn writer_failure(&self) -> Option<StoreError> {
        match self {
            Store::Sqlite(store) => store.writer_failure(),
            Store::Postgres(_) => None,
        }
    }

    /// Whether the store may come to refuse every append until it is restarted ([`Store::writer_failure`]):
    /// only on SQLite.
    pub fn may_fail_until_restart(&self) -> bool {
        matches!(self, Store::Sqlite(_))
    }

    /// `"sqlite"` or `"postgres"`, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    fn api(&self) -> &dyn StoreApi {
        match self {
            Store::Sqlite(store) => store,
            Store::Postgres(store) => store,
        }
    }

    fn audit(&self) -> &dyn StoreAudit {
        match self {
            Store::Sqlite(store) => store,
            Store::Postgres(store) => store,
        }
    }
}

#[async_trait]
impl StoreApi for Store {
    async fn acquire_shards(&self, request: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError> {
        self.api().acquire_shards(request).await
    }

    async fn renew_shards(&self, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
        self.api().renew_shards(request).await
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendResponse, StoreError> {
        self.api().append(request).await
    }

    async fn read_events(&self, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
        self.api().read_events(request).await
    }

    async fn get_conversation(&self, request: GetConversationRequest) -> Result<GetConversationResponse, StoreError> {
        self.api().get_conversation(request).await
    }

    async fn list_conversations(
        &self,
        request: ListConversationsRequest,
    ) -> Result<ListConversationsResponse, StoreError> {
        self.api().list_conversations(request).await
    }

    async fn release_shards(&self, request: ReleaseShardsRequest) -> Result<ReleaseShardsResponse, StoreError> {
        self.api().release_shards(request).await
    }

    async fn register_node(&self, request: RegisterNodeRequest) -> Result<RegisterNodeResponse, StoreError> {
        self.api().register_node(request).await
    }

    async fn get_placement(&self, request: GetPlacementRequest) -> Result<Placement, StoreError> {
        self.api().get_placement(request).await
    }

    async fn get_license(&self, request: GetLicenseRequest) -> Result<License, StoreError> {
        self.api().get_license(request).await
    }

    async fn set_license_limit(&self, request: SetLicenseLimitRequest) -> Result<License, StoreError> {
        self.api().set_license_limit(request).await
    }

    async fn create_ticket(&self, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError> {
        self.api().create_ticket(request).await
    }

    async fn list_tickets(&self, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError> {
        self.api().list_tickets(request).await
    }
}

#[async_trait]
impl StoreAudit for Store {
    async fn lease_history(&self) -> Result<Vec<LeaseGrant>, StoreError> {
        self.audit().lease_history().await
    }

    async fn event_epochs(&self, conversation_id: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        self.audit().event_epochs(conversation_id).await
    }
}

#[cfg(test)]
mod tests {
    use switchboard_domain::FixedClock;

    use super::*;

    #[test]
    fn postgres_urls_are_recognised() {
        assert!(is_postgres_url("postgres://postgres@127.0.0.1:5432/switchboard"));
        assert!(is_postgres_url("postgresql://localhost/db"));
        assert!(!is_postgres_url("sqlite:/var/lib/switchboard.db"));
        assert!(!is_postgres_url("/var/lib/postgres/switchboard.db"));
    }

    #[tokio::test]
    async fn a_path_or_sqlite_url_opens_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("open.db");
        let store = open(path.to_str().unwrap(), Arc::new(FixedClock::new(0))).await.unwrap();
        assert_eq!(store.backend(), "sqlite");
        assert_eq!(store.migrate().await.unwrap(), 0, "open migrated already");
        let memory = open("sqlite::memory:", Arc::new(FixedClock::new(0))).await.unwrap();
        assert_eq!(memory.applied_migrations().await.unwrap().last(), Some(&crate::LATEST_MIGRATION));
    }

    #[tokio::test]
    async fn a_bad_postgres_url_is_invalid() {
        let error = open("postgres://[nope", Arc::new(FixedClock::new(0))).await.unwrap_err();
        assert!(matches!(error, StoreError::Invalid(_)), "{error:?}");
    }
}
