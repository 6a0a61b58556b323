//! The persistence service of Switchboard: this crate owns the database. It holds the schema and its
//! migrations, the shard leases (who owns which shard, under which epoch), the conversation summaries and
//! the append-only event log, and implements [`StoreApi`] over them with [`SqlStore`] on SQLite. Every
//! write is one transaction; appends are fenced by the shard epoch, get gap-free sequence numbers and are
//! deduplicated on the client message id. The SQL is kept portable so that PostgreSQL can follow; the
//! few differences live in `dialect`.

mod conversations;
mod dialect;
mod error;
mod events;
mod leases;
mod memory;
mod migrate;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use switchboard_domain::Clock;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, GetConversationRequest,
    GetConversationResponse, ListConversationsRequest, ListConversationsResponse, ReadEventsRequest,
    ReadEventsResponse, RenewShardsRequest, RenewShardsResponse,
};
use switchboard_proto::store::{StoreApi, StoreError};

pub use memory::MemoryStore;
pub use migrate::LATEST_MIGRATION;

/// How long a statement waits for a lock held by another connection before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free connection before the store reports itself unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Read connections of a file database (WAL lets them read while the writer writes).
const READERS: u32 = 4;

/// The store on SQLite.
///
/// Every write transaction goes through one writer connection, so SQLite never has to upgrade a read lock
/// between two writers (no `SQLITE_BUSY` deadlocks) and appends to a conversation are serialized. Reads
/// use a separate small pool. Cloning is cheap and shares the pools.
#[derive(Clone)]
pub struct SqlStore {
    writer: SqlitePool,
    reader: SqlitePool,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore").finish_non_exhaustive()
    }
}

impl SqlStore {
    /// Opens (creating it when missing) the SQLite database at `url_or_path`, a file path or a
    /// `sqlite:` URL, and applies the pending migrations.
    ///
    /// The file runs in WAL mode with `synchronous=FULL`: an acknowledged append survives a crash of the
    /// process and a power loss. `clock` is the store's "database time" (lease expiry): see `dialect`.
    pub async fn open(url_or_path: &str, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        if url_or_path.contains(":memory:") || url_or_path.contains("mode=memory") {
            return Self::open_in_memory(clock).await;
        }
        let base = if url_or_path.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url_or_path)
                .map_err(|error| StoreError::Invalid(format!("bad database url {url_or_path:?}: {error}")))?
        } else {
            SqliteConnectOptions::new().filename(url_or_path)
        };
        let options = base
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let writer = single_connection_pool(options.clone()).await?;
        let store = Self { reader: writer.clone(), writer, clock };
        store.migrate().await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(error::db)?;
        Ok(Self { reader, ..store })
    }

    /// A private in-memory database, for tests. One connection serves reads and writes (each in-memory
    /// connection would otherwise see a database of its own); it is kept open for the life of the store.
    pub async fn open_in_memory(clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|error| StoreError::Invalid(error.to_string()))?
            .foreign_keys(true);
        let pool = single_connection_pool(options).await?;
        let store = Self { reader: pool.clone(), writer: pool, clock };
        store.migrate().await?;
        Ok(store)
    }

    /// Closes the connections, waiting for the ones in use to be returned.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    fn now_ms(&self) -> i64 {
        dialect::db_now_ms(self.clock.as_ref())
    }
}

/// A pool of exactly one connection that is never closed for idleness or age.
async fn single_connection_pool(options: SqliteConnectOptions) -> Result<SqlitePool, StoreError> {
    SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(error::db)
}

#[async_trait]
impl StoreApi for SqlStore {
    // Placeholders until the cluster operations land (issue 3, in progress).
    async fn release_shards(
        &self,
        _request: switchboard_proto::internal::v1::ReleaseShardsRequest,
    ) -> Result<switchboard_proto::internal::v1::ReleaseShardsResponse, StoreError> {
        Err(StoreError::Unavailable("release_shards not implemented yet".into()))
    }
    async fn register_node(
        &self,
        _request: switchboard_proto::internal::v1::RegisterNodeRequest,
    ) -> Result<switchboard_proto::internal::v1::RegisterNodeResponse, StoreError> {
        Err(StoreError::Unavailable("register_node not implemented yet".into()))
    }
    async fn get_placement(
        &self,
        _request: switchboard_proto::internal::v1::GetPlacementRequest,
    ) -> Result<switchboard_proto::internal::v1::Placement, StoreError> {
        Err(StoreError::Unavailable("get_placement not implemented yet".into()))
    }

    async fn acquire_shards(&self, request: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError> {
        leases::acquire(self, request).await
    }

    async fn renew_shards(&self, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
        leases::renew(self, request).await
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendResponse, StoreError> {
        events::append(self, request).await
    }

    async fn read_events(&self, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
        events::read(self, request).await
    }

    async fn get_conversation(&self, request: GetConversationRequest) -> Result<GetConversationResponse, StoreError> {
        conversations::get(self, request).await
    }

    async fn list_conversations(
        &self,
        request: ListConversationsRequest,
    ) -> Result<ListConversationsResponse, StoreError> {
        conversations::list(self, request).await
    }
}

#[cfg(test)]
mod tests {
    use switchboard_domain::FixedClock;

    use super::*;

    #[tokio::test]
    async fn a_file_database_is_durable_on_every_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pragmas.db");
        let store = SqlStore::open(path.to_str().unwrap(), Arc::new(FixedClock::new(0))).await.unwrap();
        for pool in [&store.writer, &store.reader] {
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(pool).await.unwrap();
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(pool).await.unwrap();
            let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(pool).await.unwrap();
            assert_eq!((journal.as_str(), synchronous, foreign_keys), ("wal", 2, 1), "WAL, FULL, foreign keys");
        }
        assert_eq!(store.writer.options().get_max_connections(), 1, "one writer");
    }
}
