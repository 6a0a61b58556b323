//! Shared helpers of the store's tests: a store on a fixed clock, leases, records, and the macro that runs a
//! scenario against every implementation of [`StoreApi`] (SQLite throwaway, SQLite on a file, PostgreSQL,
//! and the in-memory stand-in the router's actor tests use), so that the stand-in provably behaves like the
//! store.
#![allow(dead_code)] // each test binary uses a different part

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use switchboard_domain::{FixedClock, shard_of};
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AppendRequest, AppendResponse, ConversationRecord, ConversationUpdate, Fence, NewEvent,
    TicketRecord,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_store::{GroupCommit, MemoryStore, PgOptions, PgStore, SqlStore, StoreAudit};
use switchboard_testservices::Postgres;
use tempfile::TempDir;

pub const LEASE_MS: u64 = 10_000;
pub const START_MS: i64 = 1_700_000_000_000;

/// A store behind the trait, the clock that is its "database time", and what keeps its file alive.
pub struct Harness {
    pub store: Arc<dyn StoreApi>,
    /// The same store, for its audit tables.
    pub audit: Arc<dyn StoreAudit>,
    pub clock: Arc<FixedClock>,
    /// The directory of a file database; deleted when the harness is dropped.
    dir: Option<TempDir>,
}

impl Harness {
    fn new<S: StoreApi + StoreAudit>(store: S, clock: Arc<FixedClock>, dir: Option<TempDir>) -> Self {
        let store = Arc::new(store);
        Harness { store: store.clone(), audit: store, clock, dir }
    }

    /// [`SqlStore`] on a private throwaway database (`open_temporary`: a file never synced, removed with the
    /// store).
    pub async fn sql_in_memory() -> Self {
        let clock = Arc::new(FixedClock::new(START_MS));
        let store = SqlStore::open_temporary(clock.clone()).await.unwrap();
        Harness::new(store, clock, None)
    }

    /// [`SqlStore`] on a SQLite file (WAL, a writer and a pool of readers) in a fresh temporary directory.
    pub async fn sql_on_file() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (store, clock) = sql_on_file(&dir.path().join("store.db")).await;
        Harness::new(store, clock, Some(dir))
    }

    /// [`PgStore`] on a fresh database of this test binary's PostgreSQL server, its database time the
    /// harness's clock.
    pub async fn postgres() -> Self {
        let clock = Arc::new(FixedClock::new(START_MS));
        let store = pg_store(&fresh_database(), clock.clone()).await;
        Harness::new(store, clock, None)
    }

    /// The in-memory stand-in, [`MemoryStore`].
    pub fn memory() -> Self {
        let clock = Arc::new(FixedClock::new(START_MS));
        Harness::new(MemoryStore::new(clock.clone()), clock, None)
    }

    pub fn store(&self) -> &dyn StoreApi {
        self.store.as_ref()
    }

    pub fn audit(&self) -> &dyn StoreAudit {
        self.audit.as_ref()
    }
}

/// The PostgreSQL server of this test binary, started on first use. A watchdog process stops it (and
/// deletes its data directory) once the test binary has exited, since statics are never dropped.
pub fn postgres() -> &'static Postgres {
    static SERVER: OnceLock<Postgres> = OnceLock::new();
    SERVER.get_or_init(|| {
        let server = Postgres::start().expect("PostgreSQL starts (apt-get install postgresql)");
        stop_when_this_process_exits(&server);
        server
    })
}

/// A new, empty database on [`postgres()`].
pub fn fresh_database() -> String {
    postgres().create_database().expect("createdb")
}

/// A [`PgStore`] on `url` (migrated), on the test clock, with short waits for a connection.
pub async fn pg_store(url: &str, clock: Arc<FixedClock>) -> PgStore {
    pg_store_with(url, clock, GroupCommit::default()).await
}

pub async fn pg_store_with(url: &str, clock: Arc<FixedClock>, group_commit: GroupCommit) -> PgStore {
    let options = PgOptions {
        test_clock: Some(clock),
        max_connections: 4,
        acquire_timeout: Duration::from_secs(2),
        group_commit,
    };
    let store = PgStore::connect(url, options).await.unwrap();
    store.migrate().await.unwrap();
    store
}

fn stop_when_this_process_exits(server: &Postgres) {
    let url = server.url("postgres");
    let output = Command::new("psql").args([url.as_str(), "-tAc", "SHOW data_directory"]).output().expect("psql");
    let data_dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let root = Path::new(&data_dir).parent().expect("the data directory has a parent").to_owned();
    assert!(root.to_string_lossy().contains("switchboard-pg-"), "unexpected data directory {data_dir}");
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         kill -QUIT \"$(head -n 1 '{data_dir}/postmaster.pid')\" 2>/dev/null; sleep 1; rm -rf '{root}'",
        pid = std::process::id(),
        root = root.display(),
    );
    // Never waited for: it must outlive this process.
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the watchdog starts");
}

/// Opens (or reopens) the SQLite file at `path`, on a fixed clock at [`START_MS`].
pub async fn sql_on_file(path: &Path) -> (SqlStore, Arc<FixedClock>) {
    let clock = Arc::new(FixedClock::new(START_MS));
    let store = SqlStore::open(path.to_str().unwrap(), clock.clone()).await.unwrap();
    (store, clock)
}

/// For each `async fn scenario(h: Harness)`, a module `scenario` with one test per backend:
/// `scenario::sqlite_in_memory`, `scenario::sqlite_on_file`, `scenario::postgres` and
/// `scenario::memory_store`.
#[allow(unused_macros)] // durability.rs is SqlStore-only
macro_rules! on_every_backend {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            use crate::common::Harness;

            #[tokio::test]
            async fn sqlite_in_memory() {
                super::$scenario(Harness::sql_in_memory().await).await;
            }

            #[tokio::test]
            async fn sqlite_on_file() {
                super::$scenario(Harness::sql_on_file().await).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$scenario(Harness::postgres().await).await;
            }

            #[tokio::test]
            async fn memory_store() {
                super::$scenario(Harness::memory()).await;
            }
        }
    )+};
}
#[allow(unused_imports)]
pub(crate) use on_every_backend;

pub fn shard_of_conversation(id: &str) -> u32 {
    shard_of(&format!("conversation/{id}")).0
}

/// Takes the lease of `shard` for `node` and returns its fence.
pub async fn fence(store: &dyn StoreApi, node: &str, shard: u32) -> Fence {
    let response = store
        .acquire_shards(AcquireShardsRequest {
            node_id: node.into(),
            shards: vec![shard],
            lease_ms: LEASE_MS,
            limit: 0,
        })
        .await
        .unwrap();
    let lease = response.granted.iter().find(|lease| lease.shard == shard).expect("shard granted");
    Fence { shard, epoch: lease.epoch }
}

pub fn conversation(id: &str, tenant: &str, group: &str, queued_at_ms: i64) -> ConversationRecord {
    ConversationRecord {
        id: id.into(),
        tenant_id: tenant.into(),
        group_id: group.into(),
        customer_name: "Carol".into(),
        first_question: "Where is my parcel?".into(),
        state: "queued".into(),
        owner_agent_id: String::new(),
        created_at_ms: queued_at_ms,
        queued_at_ms,
        accepted_at_ms: 0,
        closed_at_ms: 0,
        last_seq: 0,
        shard: shard_of_conversation(id),
        customer_token: format!("token-{id}"),
        // A new chat's delivery marks are known: none yet.
        delivery_marks_known: true,
        ..Default::default()
    }
}

/// An offline-message ticket of `tenant` with idempotency key `key`.
pub fn ticket(id: &str, tenant: &str, key: &str, created_at_ms: i64) -> TicketRecord {
    TicketRecord {
        id: id.into(),
        tenant_id: tenant.into(),
        group_id: "sales".into(),
        kind: "offline_message".into(),
        reason: "group_closed".into(),
        customer_name: "Carol".into(),
        customer_contact: "carol@example.com".into(),
        subject: "Parcel".into(),
        body: format!("Where is my parcel? ({id})"),
        conversation_id: String::new(),
        created_at_ms,
        idempotency_key: key.into(),
    }
}

pub fn message(client_msg_id: &str, body: &str) -> NewEvent {
    NewEvent {
        at_ms: START_MS,
        author_role: "customer".into(),
        author_id: String::new(),
        client_msg_id: client_msg_id.into(),
        kind: "message".into(),
        payload_json: format!(r#"{{"body":"{body}"}}"#),
    }
}

pub fn system_event(kind: &str) -> NewEvent {
    NewEvent {
        at_ms: START_MS,
        author_role: "system".into(),
        author_id: String::new(),
        client_msg_id: String::new(),
        kind: kind.into(),
        payload_json: "{}".into(),
    }
}

pub fn update(state: &str, owner: &str, accepted_at_ms: i64, closed_at_ms: i64) -> ConversationUpdate {
    ConversationUpdate {
        state: state.into(),
        owner_agent_id: owner.into(),
        accepted_at_ms,
        closed_at_ms,
        // As a router sends them: with the delivery marks (none here).
        delivery_marks_known: true,
        ..Default::default()
    }
}

/// Creates `record` with a `created` event under a fresh lease of its shard for `node`.
pub async fn create(store: &dyn StoreApi, node: &str, record: ConversationRecord) -> Fence {
    let fence = fence(store, node, record.shard).await;
    store
        .append(AppendRequest {
            fence: Some(fence),
            conversation_id: record.id.clone(),
            create: Some(record),
            events: vec![system_event("created")],
            update: None,
        })
        .await
        .unwrap();
    fence
}

pub async fn append(
    store: &dyn StoreApi,
    fence: Fence,
    id: &str,
    events: Vec<NewEvent>,
    update: Option<ConversationUpdate>,
) -> Result<AppendResponse, StoreError> {
    store.append(AppendRequest { fence: Some(fence), conversation_id: id.into(), create: None, events, update }).await
}

/// A conversation's summary, which must exist.
pub async fn get(store: &dyn StoreApi, id: &str) -> ConversationRecord {
    let request = switchboard_proto::internal::v1::GetConversationRequest { conversation_id: id.into() };
    store.get_conversation(request).await.unwrap().conversation.expect("conversation exists")
}
