//! Appends to the event log on a SQLite file, every one durable before it is answered (WAL; the baselines
//! commit with `synchronous=FULL`, the store's writer with `NORMAL` and a sync of the log after), each
//! measured beside a bare baseline in the same run. One iteration is 64 appends of one message each, to 64
//! conversations (as 64 conversation actors would make them):
//! - `switchboard_concurrent`: the 64 `StoreApi::append`s at once, so that group commit gathers them into
//!   few transactions;
//! - `switchboard_sequential`: the same 64 one after the other, each its own transaction;
//! - `baseline_one_transaction` / `baseline_64_transactions`: bare sqlx INSERTs of 64 rows into a table like
//!   the store's `events` (same columns, key and unique index) on a file with the same pragmas.
//!
//! Criterion reports the time of 64 appends and, from the throughput, appends per second; the per-append
//! time is the first divided by 64.

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{APPENDS, START_MS, requests, runtime};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use switchboard_domain::FixedClock;
use switchboard_proto::internal::v1::Fence;
use switchboard_proto::store::StoreApi;
use switchboard_store::SqlStore;

/// A SQLite store with the conversations of [`common::conversations`].
async fn store_with_conversations(path: &str) -> (SqlStore, Vec<(String, Fence)>) {
    let store = SqlStore::open(path, Arc::new(FixedClock::new(START_MS))).await.unwrap();
    let fences = common::conversations(&store).await;
    (store, fences)
}

fn switchboard_appends(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let (store, fences) = runtime.block_on(store_with_conversations(path.to_str().unwrap()));
    let round = AtomicU64::new(0);

    let mut group = c.benchmark_group("store_append_64");
    group.throughput(Throughput::Elements(APPENDS as u64));
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    group.bench_function("switchboard_concurrent", |b| {
        b.iter(|| {
            let requests = requests(&fences, round.fetch_add(1, Ordering::Relaxed));
            runtime.block_on(async {
                for response in join_all(requests.into_iter().map(|request| store.append(request))).await {
                    assert!(!response.unwrap().duplicate);
                }
            })
        })
    });
    group.bench_function("switchboard_sequential", |b| {
        b.iter(|| {
            let requests = requests(&fences, round.fetch_add(1, Ordering::Relaxed));
            runtime.block_on(async {
                for request in requests {
                    assert!(!store.append(request).await.unwrap().duplicate);
                }
            })
        })
    });
    group.finish();
    runtime.block_on(store.close());
}

const CREATE_EVENTS: &str = "CREATE TABLE events (
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    author_role TEXT NOT NULL,
    author_id TEXT NOT NULL,
    client_msg_id TEXT NULL,
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
)";
const CREATE_DEDUP_INDEX: &str =
    "CREATE UNIQUE INDEX events_by_client_msg_id ON events (conversation_id, client_msg_id)";
const INSERT_EVENT: &str = "INSERT INTO events (conversation_id, seq, at_ms, author_role, author_id, client_msg_id, kind, \
     payload_json) VALUES (?, ?, ?, 'customer', '', ?, 'message', '{\"body\":\"hello\"}')";

/// One connection to a SQLite file with the store's pragmas, and the bare `events` table.
async fn bare_pool(path: &str) -> SqlitePool {
    let options = SqliteConnectOptions::from_str(&format!("sqlite:{path}"))
        .unwrap()
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
    sqlx::query(CREATE_EVENTS).execute(&pool).await.unwrap();
    sqlx::query(CREATE_DEDUP_INDEX).execute(&pool).await.unwrap();
    pool
}

async fn insert<'c, E: sqlx::SqliteExecutor<'c>>(executor: E, conversation: &str, round: u64) {
    let seq = i64::try_from(round).unwrap();
    sqlx::query(INSERT_EVENT)
        .bind(conversation)
        .bind(seq)
        .bind(START_MS)
        .bind(format!("m{round}"))
        .execute(executor)
        .await
        .unwrap();
}

fn bare_inserts(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bare.db");
    let pool = runtime.block_on(bare_pool(path.to_str().unwrap()));
    let conversations: Vec<String> = (0..APPENDS).map(|i| format!("bench-{i}")).collect();
    let round = AtomicU64::new(1);

    let mut group = c.benchmark_group("store_append_64");
    group.throughput(Throughput::Elements(APPENDS as u64));
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    group.bench_function("baseline_one_transaction", |b| {
        b.iter(|| {
            let round = round.fetch_add(1, Ordering::Relaxed);
            runtime.block_on(async {
                let mut transaction = pool.begin().await.unwrap();
                for conversation in &conversations {
                    insert(&mut *transaction, conversation, round).await;
                }
                transaction.commit().await.unwrap();
            })
        })
    });
    group.bench_function("baseline_64_transactions", |b| {
        b.iter(|| {
            let round = round.fetch_add(1, Ordering::Relaxed);
            runtime.block_on(async {
                for conversation in &conversations {
                    insert(&pool, conversation, round).await;
                }
            })
        })
    });
    group.finish();
    runtime.block_on(pool.close());
}

criterion_group!(benches, bare_inserts, switchboard_appends);
criterion_main!(benches);
