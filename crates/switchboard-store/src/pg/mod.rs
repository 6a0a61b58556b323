//! The store on PostgreSQL: the same schema, migrations and behaviour as [`SqlStore`](crate::SqlStore), for
//! several store processes sharing one database.
//!
//! Leases are taken and renewed by compare-and-set on database time (the server's `clock_timestamp()`,
//! read inside the transaction), under row locks taken in shard order. Appends are group-committed like on
//! SQLite; a batch locks its fences `FOR SHARE` and its conversations `FOR UPDATE` (see `dialect`).
//!
//! The pool reconnects by itself: a connection the server dropped (restart, failover) fails the request
//! that was using it with `Unavailable`, is discarded, and later requests open new connections. While the
//! server is down, a request waits up to [`PgOptions::acquire_timeout`] for a connection, then fails with
//! `Unavailable`.

mod conversations;
mod events;
mod leases;
mod license;
mod nodes;
mod tickets;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use switchboard_domain::Clock;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, CreateTicketRequest,
    CreateTicketResponse, GetConversationRequest, GetConversationResponse, GetLicenseRequest, GetPlacementRequest,
    License, ListConversationsRequest, ListConversationsResponse, ListTicketsRequest, ListTicketsResponse, Placement,
    ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse, ReleaseShardsRequest,
    ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse, SetLicenseLimitRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};

use crate::audit::{LeaseGrant, StoreAudit};
use crate::batch::{Appender, GroupCommit};
use crate::dialect::PG_NOW_MS;
use crate::error::{db, to_u64};
use crate::records::{GrantRow, grant_from_row};

/// How a [`PgStore`] connects and batches.
#[derive(Clone)]
pub struct PgOptions {
    /// `None` (production): database time is the PostgreSQL server's clock. `Some`: this clock instead,
    /// so that tests can expire leases by advancing a `FixedClock`. Every store process sharing a
    /// database must use the same choice.
    pub test_clock: Option<Arc<dyn Clock>>,
    /// Connections of this store process.
    pub max_connections: u32,
    /// How long a request waits for a connection (the server down, the pool busy) before `Unavailable`.
    pub acquire_timeout: Duration,
    pub group_commit: GroupCommit,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            test_clock: None,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            group_commit: GroupCommit::default(),
        }
    }
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("test_clock", &self.test_clock.is_some())
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("group_commit", &self.group_commit)
            .finish()
    }
}

/// The store on PostgreSQL. Cloning is cheap and shares the pools and the append writer.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    /// The append writer's connections (see [`append_session`]).
    append_pool: PgPool,
    test_clock: Option<Arc<dyn Clock>>,
    appender: Appender,
}

/// How many connections the append writer uses: it writes one batch at a time.
const APPEND_CONNECTIONS: u32 = 2;

/// The options of the append writer's sessions: `connect`'s, with scans of tables and hash and merge joins
/// turned off in the planner.
///
/// Every statement of an append batch finds its rows by key (fences by shard, conversations by id, stored
/// client message ids by conversation and id, permits by conversation), and each is prepared once per
/// connection, its plan kept: after five runs PostgreSQL may keep a *generic* plan, costed with the
/// statistics of the moment. On a new database the tables are empty then (never analyzed until
/// autovacuum's first pass, a minute or more later), and the cheapest way to look up client message ids in
/// an empty `events` is to scan it: a plan that then stays while the log grows. In the split cluster at
/// 4,000 messages/s that lookup took 5.3 ms a batch after 8 s (0.07 ms with its index), until the store
/// fell behind for good. With scans and the other joins off, every plan of these statements is a nested
/// loop over index lookups whatever the statistics say. Only these sessions: the others read and write
/// small, often rewritten tables (`nodes`) for which a scan is the right plan.
pub(crate) fn append_session(connect: PgConnectOptions) -> PgConnectOptions {
    connect.options([("enable_seqscan", "off"), ("enable_hashjoin", "off"), ("enable_mergejoin", "off")])
}

/// The options of a pool of `max` connections, each tested (pinged) before it is handed out: a connection
/// the server dropped while it sat idle (a restart, a failover) is replaced before a request meets it. The
/// append writer keeps its connection between batches instead (`events::PgAppender`).
fn pool_options(max: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new().max_connections(max).acquire_timeout(acquire_timeout).test_before_acquire(true)
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/database`). Does not migrate: see
    /// [`PgStore::migrate`], or [`crate::open`], which does both.
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|error| StoreError::Invalid(format!("bad database url: {error}")))?;
        let pool = pool_options(options.max_connections.max(1), options.acquire_timeout)
            .connect_with(connect.clone())
            .await
            .map_err(db)?;
        let append_pool = pool_options(APPEND_CONNECTIONS, options.acquire_timeout)
            .connect_with(append_session(connect))
            .await
            .map_err(db)?;
        let backend = Arc::new(events::PgAppender::new(append_pool.clone()));
        let appender = Appender::start(backend, options.group_commit);
        Ok(PgStore { pool, append_pool, test_clock: options.test_clock, appender })
    }

    /// Closes the connections, waiting for the ones in use to be returned.
    pub async fn close(&self) {
        self.appender.close().await;
        self.append_pool.close().await;
        self.pool.close().await;
    }

    /// Database time, read on the transaction's connection (or the test clock).
    pub(crate) async fn now_ms(&self, connection: &mut PgConnection) -> Result<i64, StoreError> {
        match &self.test_clock {
            Some(clock) => Ok(clock.now_ms()),
            None => sqlx::query_scalar(PG_NOW_MS).fetch_one(connection).await.map_err(db),
        }
    }
}

#[async_trait]
impl StoreApi for PgStore {
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
}

const SELECT_HISTORY: &str =
    "SELECT shard, epoch, node_id, acquired_at_ms FROM shard_lease_history ORDER BY shard, epoch";

#[async_trait]
impl StoreAudit for PgStore {
    async fn lease_history(&self) -> Result<Vec<LeaseGrant>, StoreError> {
        let rows: Vec<GrantRow> = sqlx::query_as(SELECT_HISTORY).fetch_all(&self.pool).await.map_err(db)?;
        rows.into_iter().map(grant_from_row).collect()
    }

    async fn event_epochs(&self, conversation_id: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(crate::events::SELECT_EVENT_EPOCHS)
            .bind(conversation_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.into_iter().map(|(seq, epoch)| Ok((to_u64(seq, "seq")?, to_u64(epoch, "epoch")?))).collect()
    }
}
