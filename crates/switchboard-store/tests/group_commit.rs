//! A measurement, not a check: appends per second with one commit per append and with group commit, on
//! PostgreSQL (fsync on) and on a SQLite file (WAL, synchronous=FULL). Run it with
//!
//! ```text
//! cargo test -p switchboard-store --release --test group_commit -- --ignored --nocapture
//! ```
//!
//! Each of `WRITERS` tasks appends `APPENDS` messages, one at a time, to a conversation of its own (as many
//! conversation actors would), all on one store.

mod common;

use std::sync::Arc;

use common::*;
use switchboard_domain::FixedClock;
use switchboard_proto::store::StoreApi;
use switchboard_store::{GroupCommit, SqlStore};
use tokio::time::Instant;

const WRITERS: usize = 64;
const APPENDS: usize = 50;

/// Appends per second through `store`, with `WRITERS` concurrent writers.
async fn appends_per_second(store: Arc<dyn StoreApi>) -> f64 {
    let mut fences = Vec::new();
    for w in 0..WRITERS {
        let id = format!("bench-{w}");
        fences.push((id.clone(), create(store.as_ref(), "node-a", conversation(&id, "acme", "sales", 1)).await));
    }
    // Conversations on one shard would be fenced off by each other's create: re-take every shard once.
    let shards: Vec<u32> = fences.iter().map(|(_, fence)| fence.shard).collect();
    let request = switchboard_proto::internal::v1::AcquireShardsRequest {
        node_id: "node-a".into(),
        shards,
        lease_ms: 3_600_000,
        limit: 0,
    };
    let granted = store.acquire_shards(request).await.unwrap().granted;
    let epoch_of = |shard| granted.iter().find(|lease| lease.shard == shard).unwrap().epoch;

    let started = Instant::now();
    let tasks: Vec<_> = fences
        .into_iter()
        .map(|(id, fence)| {
            let store = store.clone();
            let fence = switchboard_proto::internal::v1::Fence { shard: fence.shard, epoch: epoch_of(fence.shard) };
            tokio::spawn(async move {
                for i in 0..APPENDS {
                    append(store.as_ref(), fence, &id, vec![message(&format!("m{i}"), "hello")], None).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (WRITERS * APPENDS) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture, preferably --release"]
async fn group_commit_throughput() {
    for (name, max_batch) in [("one commit per append", 1), ("group commit (256)", GroupCommit::DEFAULT_MAX_BATCH)] {
        let clock = Arc::new(FixedClock::new(START_MS));
        let store = pg_store_with(&fresh_database(), clock, GroupCommit { max_batch }).await;
        let rate = appends_per_second(Arc::new(store)).await;
        println!("postgres  {name:>22}: {rate:>8.0} appends/s ({WRITERS} writers x {APPENDS} appends)");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.db");
        let clock = Arc::new(FixedClock::new(START_MS));
        let store = SqlStore::open_with(path.to_str().unwrap(), clock, GroupCommit { max_batch }).await.unwrap();
        let rate = appends_per_second(Arc::new(store)).await;
        println!("sqlite    {name:>22}: {rate:>8.0} appends/s ({WRITERS} writers x {APPENDS} appends)");
    }
}
