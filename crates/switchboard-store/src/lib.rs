//! The persistence service of Switchboard: this crate owns the database. It holds the schema and its
//! migrations, the shard leases (who owns which shard, under which epoch) and their history, the node
//! registry, the conversation summaries and the append-only event log, the cluster-wide license limit and
//! its permits, and the tickets, and implements [`StoreApi`] over them with [`SqlStore`] on SQLite and
//! [`PgStore`] on PostgreSQL ([`open`] chooses by URL). Every write is one transaction; appends are fenced
//! by the shard epoch, get gap-free sequence numbers, are deduplicated on the client message id, take and
//! give back license permits (`license`), and are group-committed (`batch`). The SQL is portable where it
//! can be; the differences are described in `dialect`.

mod audit;
mod batch;
mod conversations;
mod dialect;
mod error;
mod events;
mod leases;
mod license;
mod memory;
mod migrate;
mod nodes;
mod pg;
mod records;
mod store;
mod tickets;
mod wal;
mod writer;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, SqlitePool};
use switchboard_domain::Clock;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, CreateTicketRequest,
    CreateTicketResponse, GetConversationRequest, GetConversationResponse, GetLicenseRequest, GetPlacementRequest,
    License, ListConversationsRequest, ListConversationsResponse, ListTicketsRequest, ListTicketsResponse, Placement,
    ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse, ReleaseShardsRequest,
    ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse, SetLicenseLimitRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};

pub use audit::{LeaseGrant, StoreAudit};
pub use batch::GroupCommit;
pub use memory::MemoryStore;
pub use migrate::LATEST_MIGRATION;
pub use pg::{PgOptions, PgStore};
pub use store::{Store, open};

use crate::batch::Appender;
use crate::error::{db, to_u64};
use crate::records::{GrantRow, grant_from_row};
use crate::writer::Durability;

/// How long a statement waits for a lock held by another connection before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free connection before the store reports itself unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Read connections of a file database (WAL lets them read while the writer writes).
const READERS: u32 = 4;

/// The store on SQLite.
///
/// Appends are group-committed by the append writer, a connection of its own on a thread of its own
/// (`writer`); the other writes (leases, nodes, tickets, the license limit, migrations) go through one
/// sqlx writer connection. Each write transaction takes the write lock as it begins, so the two never
/// deadlock on an upgrade (`BEGIN IMMEDIATE`, `SqlStore::begin_write`). Reads use a separate small pool.
/// Cloning is cheap and shares the pools and the append writer.
#[derive(Clone)]
pub struct SqlStore {
    writer: SqlitePool,
    reader: SqlitePool,
    clock: Arc<dyn Clock>,
    appender: Appender,
    /// The directory of a throwaway database ([`SqlStore::open_temporary`]), removed with the last clone.
    _temporary: Option<Arc<tempfile::TempDir>>,
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore").finish_non_exhaustive()
    }
}

impl SqlStore {
    /// Opens (creating it when missing) the SQLite database at `url_or_path`, a file path or a
    /// `sqlite:` URL, and applies the pending migrations. `sqlite::memory:` is a throwaway database
    /// ([`SqlStore::open_temporary`]).
    ///
    /// The file runs in WAL mode with `synchronous=FULL`: an acknowledged append survives a crash of the
    /// process and a power loss (append batches commit with `NORMAL` and are answered after a sync of the
    /// log: see `wal`). `clock` is the store's "database time" (lease expiry): see `dialect`.
    pub async fn open(url_or_path: &str, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Self::open_with(url_or_path, clock, GroupCommit::default()).await
    }

    /// [`SqlStore::open`] with the group commit settings given.
    pub async fn open_with(
        url_or_path: &str,
        clock: Arc<dyn Clock>,
        group_commit: GroupCommit,
    ) -> Result<Self, StoreError> {
        if url_or_path.contains(":memory:") || url_or_path.contains("mode=memory") {
            return Self::open_temporary(clock).await;
        }
        let base = if url_or_path.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url_or_path)
                .map_err(|error| StoreError::Invalid(format!("bad database url {url_or_path:?}: {error}")))?
        } else {
            SqliteConnectOptions::new().filename(url_or_path)
        };
        let options = base.synchronous(SqliteSynchronous::Full);
        Self::open_file(options, clock, group_commit, Durability::SyncedLog, None).await
    }

    /// A private throwaway database, for tests: a file in a new temporary directory, removed when the last
    /// clone of the store is dropped, and never synced to the disk.
    pub async fn open_temporary(clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let directory = tempfile::tempdir()
            .map_err(|error| StoreError::Unavailable(format!("cannot make a temporary directory: {error}")))?;
        let options =
            SqliteConnectOptions::new().filename(directory.path().join("store.db")).synchronous(SqliteSynchronous::Off);
        Self::open_file(options, clock, GroupCommit::default(), Durability::None, Some(Arc::new(directory))).await
    }

    async fn open_file(
        options: SqliteConnectOptions,
        clock: Arc<dyn Clock>,
        group_commit: GroupCommit,
        durability: Durability,
        temporary: Option<Arc<tempfile::TempDir>>,
    ) -> Result<Self, StoreError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            // Statement journals (for the multi-row statements) in memory, not in temporary files: they
            // only serve to undo a statement that fails halfway.
            .pragma("temp_store", "memory")
            // The writer checkpoints in its own commit only once the log holds this many pages (96 MiB);
            // until then the checkpoints run beside it (`events::Checkpoints`).
            .pragma("wal_autocheckpoint", events::Checkpoints::WRITER_AFTER_PAGES.to_string())
            .busy_timeout(BUSY_TIMEOUT);
        let path = options.get_filename().to_owned();
        let writer = single_connection_pool(options.clone()).await?;
        migrate::migrate_sqlite(&writer, clock.as_ref()).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .test_before_acquire(false)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(error::db)?;
        // The connection that pins the log between checkpoints (`events::Checkpoints`).
        let pin = sqlx::SqliteConnection::connect_with(&options).await.map_err(error::db)?;
        let checkpoints = events::Checkpoints::new(reader.clone(), pin);
        let log = (durability == Durability::SyncedLog).then(|| wal::WalSync::new(&path));
        let backend = tokio::task::spawn_blocking(move || writer::SqliteWriter::open(&path, durability, checkpoints))
            .await
            .map_err(|error| StoreError::Unavailable(format!("opening the append writer failed: {error}")))??;
        let appender = Appender::start_on_thread(backend, group_commit, log, tokio::runtime::Handle::current())
            .map_err(|error| StoreError::Unavailable(format!("cannot start the append writer: {error}")))?;
        Ok(SqlStore { writer, reader, clock, appender, _temporary: temporary })
    }

    /// Why the store refuses every append until it is restarted, if it does: a sync of the write-ahead log
    /// failed, so what the database holds since is not known to be on the disk (restarting recovers what
    /// is); or the append writer's connection could neither roll back a failed batch nor be opened again.
    /// For a health check.
    pub fn writer_failure(&self) -> Option<StoreError> {
        self.appender.failure()
    }

    /// Closes the store: the append writer once the appends queued are answered, then the connections,
    /// waiting for the ones in use to be returned. Later requests fail.
    pub async fn close(&self) {
        self.appender.close().await;
        self.reader.close().await;
        self.writer.close().await;
    }

    /// A write transaction on the writer connection, holding the database's write lock from its start
    /// (the append writer is another connection: a transaction that read first could not take it later).
    pub(crate) async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(error::db)
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
        // Not pinged at every acquire: a round trip to the connection's thread before every append batch.
        // A broken connection fails the statement that uses it instead.
        .test_before_acquire(false)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(error::db)
}

#[async_trait]
impl StoreApi for SqlStore {
    async fn release_shards(&self, request: ReleaseShardsRequest) -> Result<ReleaseShardsResponse, StoreError> {
        leases::release(self, request).await
    }

    async fn register_node(&self, request: RegisterNodeRequest) -> Result<RegisterNodeResponse, StoreError> {
        nodes::register(self, request).await
    }

    async fn get_placement(&self, request: GetPlacementRequest) -> Result<Placement, StoreError> {
        nodes::placement(self, request).await
    }

    async fn get_license(&self, request: GetLicenseRequest) -> Result<License, StoreError> {
        license::get(self, request).await
    }

    async fn set_license_limit(&self, request: SetLicenseLimitRequest) -> Result<License, StoreError> {
        license::set_limit(self, request).await
    }

    async fn create_ticket(&self, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError> {
        tickets::create(self, request).await
    }

    async fn list_tickets(&self, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError> {
        tickets::list(self, request).await
    }

    async fn acquire_shards(&self, request: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError> {
        leases::acquire(self, request).await
    }

    async fn renew_shards(&self, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
        leases::renew(self, request).await
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendResponse, StoreError> {
        self.appender.append(request).await
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

const SELECT_HISTORY: &str =
    "SELECT shard, epoch, node_id, acquired_at_ms FROM shard_lease_history ORDER BY shard, epoch";

#[async_trait]
impl StoreAudit for SqlStore {
    async fn lease_history(&self) -> Result<Vec<LeaseGrant>, StoreError> {
        let rows: Vec<GrantRow> = sqlx::query_as(SELECT_HISTORY).fetch_all(&self.reader).await.map_err(db)?;
        rows.into_iter().map(grant_from_row).collect()
    }

    async fn event_epochs(&self, conversation_id: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(events::SELECT_EVENT_EPOCHS)
            .bind(conversation_id)
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.into_iter().map(|(seq, epoch)| Ok((to_u64(seq, "seq")?, to_u64(epoch, "epoch")?))).collect()
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
            let temp_store: i64 = sqlx::query_scalar("PRAGMA temp_store").fetch_one(pool).await.unwrap();
            assert_eq!(
                (journal.as_str(), synchronous, foreign_keys, temp_store),
                ("wal", 2, 1, 2),
                "WAL, FULL, foreign keys, temporary files in memory"
            );
        }
        assert_eq!(store.writer.options().get_max_connections(), 1, "one writer");
    }
}
