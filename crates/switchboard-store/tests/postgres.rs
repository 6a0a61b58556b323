//! PostgreSQL only: several store processes (separate `PgStore`s, so separate pools and append writers) on
//! one database, racing; the server restarting under a store; database time.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use switchboard_domain::FixedClock;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AppendRequest, Fence, GetLicenseRequest, License, ReadEventsRequest, ReleaseShardsRequest,
    RenewShardsRequest, SetLicenseLimitRequest, ShardLease,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_store::{GroupCommit, LATEST_MIGRATION, PgOptions, PgStore, StoreAudit};
use switchboard_testservices::Postgres;

/// What the racing nodes were told, to check against the history the database kept.
#[derive(Default)]
struct Told {
    /// (shard, epoch) → (node, expiry when granted).
    grants: Vec<(u32, u64, String, i64)>,
    /// (shard, epoch) → the latest expiry a renewal answered.
    renewed: HashMap<(u32, u64), i64>,
    released: HashSet<(u32, u64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_acquirers_never_share_a_shard_epoch() {
    const NODES: usize = 8;
    const ROUNDS: usize = 40;
    let url = fresh_database();
    let clock = Arc::new(FixedClock::new(START_MS));
    let mut stores = Vec::new();
    for _ in 0..NODES {
        stores.push(pg_store(&url, clock.clone()).await);
    }
    let told = Arc::new(Mutex::new(Told::default()));
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(i, store)| {
            let (told, clock) = (told.clone(), clock.clone());
            tokio::spawn(async move {
                let node = format!("node-{i}");
                let mut held: BTreeMap<u32, u64> = BTreeMap::new();
                for round in 0..ROUNDS {
                    let fences: Vec<Fence> = held.iter().map(|(&shard, &epoch)| Fence { shard, epoch }).collect();
                    match (round + i) % 4 {
                        0 | 1 => {
                            // A few contended shards by name, or the lowest free ones with a limit.
                            let (shards, limit) =
                                if (round + i) % 4 == 0 { ((0..8).collect(), 0) } else { (vec![], 2) };
                            let request =
                                AcquireShardsRequest { node_id: node.clone(), shards, lease_ms: LEASE_MS, limit };
                            let granted = store.acquire_shards(request).await.unwrap().granted;
                            let mut told = told.lock().unwrap();
                            for lease in granted {
                                held.insert(lease.shard, lease.epoch);
                                told.grants.push((lease.shard, lease.epoch, node.clone(), lease.expires_at_ms));
                            }
                        }
                        2 => {
                            let request =
                                RenewShardsRequest { node_id: node.clone(), held: fences, lease_ms: LEASE_MS };
                            let renewal = store.renew_shards(request).await.unwrap();
                            let mut told = told.lock().unwrap();
                            for lease in renewal.renewed {
                                told.renewed.insert((lease.shard, lease.epoch), lease.expires_at_ms);
                            }
                            for shard in renewal.lost {
                                held.remove(&shard);
                            }
                        }
                        _ => {
                            let release = fences.into_iter().take(1).collect::<Vec<_>>();
                            let request = ReleaseShardsRequest { node_id: node.clone(), held: release.clone() };
                            let released = store.release_shards(request).await.unwrap().released;
                            let mut told = told.lock().unwrap();
                            for fence in release.iter().filter(|fence| released.contains(&fence.shard)) {
                                held.remove(&fence.shard);
                                told.released.insert((fence.shard, fence.epoch));
                            }
                        }
                    }
                    // Time moves in steps that do not divide the lease, so that an early grant would show.
                    if i == 0 && round % 2 == 0 {
                        clock.advance_ms(1_237);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }

    let audit = pg_store(&url, clock.clone()).await;
    let history = audit.lease_history().await.unwrap();
    let told = told.lock().unwrap();
    assert!(told.grants.len() > NODES * 4, "the race granted something: {}", told.grants.len());
    // Every grant answered is in the history, with its node; nothing else is; (shard, epoch) is a key.
    let answered: HashMap<(u32, u64), &str> =
        told.grants.iter().map(|(shard, epoch, node, _)| ((*shard, *epoch), node.as_str())).collect();
    assert_eq!(answered.len(), told.grants.len(), "no (shard, epoch) granted twice");
    assert_eq!(history.len(), told.grants.len());
    for grant in &history {
        assert_eq!(answered.get(&(grant.shard, grant.epoch)), Some(&grant.node_id.as_str()), "{grant:?}");
    }

    // Per shard, epochs count up from 1, and a shard went to another node only once the previous lease
    // (as last renewed) had expired, or had been released.
    let mut by_shard: BTreeMap<u32, Vec<&switchboard_store::LeaseGrant>> = BTreeMap::new();
    for grant in &history {
        by_shard.entry(grant.shard).or_default().push(grant);
    }
    let granted_expiry: HashMap<(u32, u64), i64> =
        told.grants.iter().map(|(shard, epoch, _, expires)| ((*shard, *epoch), *expires)).collect();
    let mut moves = 0;
    for (shard, grants) in &by_shard {
        let epochs: Vec<u64> = grants.iter().map(|grant| grant.epoch).collect();
        assert_eq!(epochs, (1..=grants.len() as u64).collect::<Vec<_>>(), "shard {shard}");
        for pair in grants.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            let key = (before.shard, before.epoch);
            let expiry = told.renewed.get(&key).copied().unwrap_or(granted_expiry[&key]).max(granted_expiry[&key]);
            let handed_over = told.released.contains(&key) || after.node_id == before.node_id;
            moves += usize::from(after.node_id != before.node_id);
            assert!(
                handed_over || after.acquired_at_ms >= expiry,
                "{before:?} then {after:?}: lease ran until {expiry}"
            );
        }
    }
    assert!(moves > 0, "shards moved between nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_through_several_stores_are_gap_free_and_deduplicated() {
    const STORES: usize = 4;
    const MESSAGES: u64 = 100;
    let url = fresh_database();
    let clock = Arc::new(FixedClock::new(START_MS));
    let mut stores: Vec<Arc<PgStore>> = Vec::new();
    for _ in 0..STORES {
        stores.push(Arc::new(pg_store(&url, clock.clone()).await));
    }
    let fence = create(stores[0].as_ref(), "node-a", conversation("c1", "acme", "sales", 1)).await;

    // Each message is sent twice, through two different stores, all at once.
    let mut tasks = Vec::new();
    for i in 0..MESSAGES {
        for copy in 0..2 {
            let store = stores[(i as usize + copy) % STORES].clone();
            tasks.push(tokio::spawn(async move {
                let response =
                    append(store.as_ref(), fence, "c1", vec![message(&format!("m{i}"), "hi")], None).await.unwrap();
                (format!("m{i}"), response.events[0].seq, response.duplicate)
            }));
        }
    }
    let mut answers: HashMap<String, Vec<(u64, bool)>> = HashMap::new();
    for task in tasks {
        let (id, seq, duplicate) = task.await.unwrap();
        answers.entry(id).or_default().push((seq, duplicate));
    }
    let mut seqs = Vec::new();
    for (id, copies) in &answers {
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].0, copies[1].0, "{id}: both copies answer the stored seq");
        assert_eq!(copies.iter().filter(|(_, duplicate)| !duplicate).count(), 1, "{id}: stored once: {copies:?}");
        seqs.push(copies[0].0);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=MESSAGES + 1).collect::<Vec<_>>());

    let request = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 0, ..Default::default() };
    let events = stores[1].read_events(request).await.unwrap().events;
    assert_eq!(events.iter().map(|event| event.seq).collect::<Vec<_>>(), (1..=MESSAGES + 1).collect::<Vec<_>>());
    let ids: HashSet<&str> = events.iter().map(|event| event.client_msg_id.as_str()).collect();
    assert_eq!(ids.len() as u64, MESSAGES + 1, "every client id once (and the created event's empty one)");
    assert_eq!(get(stores[2].as_ref(), "c1").await.last_seq, MESSAGES + 1);
    let epochs = stores[3].event_epochs("c1").await.unwrap();
    assert!(epochs.iter().all(|&(_, epoch)| epoch == fence.epoch));
}

/// The first append of a new conversation, retried through several stores at once: one creates it, the
/// others find it (the insert conflicts and is not an error) and answer the stored event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_creates_of_one_conversation_store_it_once() {
    let url = fresh_database();
    let clock = Arc::new(FixedClock::new(START_MS));
    let mut stores: Vec<Arc<PgStore>> = Vec::new();
    for _ in 0..6 {
        stores.push(Arc::new(pg_store(&url, clock.clone()).await));
    }
    let record = conversation("c1", "acme", "sales", 1);
    let fence = fence(stores[0].as_ref(), "node-a", record.shard).await;
    let tasks: Vec<_> = stores
        .iter()
        .cloned()
        .map(|store| {
            let record = record.clone();
            tokio::spawn(async move {
                let request = AppendRequest {
                    fence: Some(fence),
                    conversation_id: "c1".into(),
                    create: Some(record),
                    events: vec![message("first", "hello")],
                    update: None,
                };
                store.append(request).await.unwrap()
            })
        })
        .collect();
    let mut stored = 0;
    for task in tasks {
        let response = task.await.unwrap();
        assert_eq!((response.events[0].seq, response.last_seq), (1, 1));
        stored += usize::from(!response.duplicate);
    }
    assert_eq!(stored, 1);
    assert_eq!(get(stores[0].as_ref(), "c1").await.last_seq, 1);
}

/// A value PostgreSQL refuses (a NUL character) fails its own append only, even when it shares a group
/// commit with others.
#[tokio::test]
async fn a_value_the_database_refuses_fails_only_its_own_append() {
    let h = Harness::postgres().await;
    let fence = create(h.store(), "node-a", conversation("c1", "acme", "sales", 1)).await;
    let mut tasks = Vec::new();
    for i in 0..21 {
        let store = h.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut event = message(&format!("m{i}"), "hi");
            if i == 10 {
                event.author_id = "nul\0here".into();
            }
            (i, append(store.as_ref(), fence, "c1", vec![event], None).await)
        }));
    }
    for task in tasks {
        let (i, result) = task.await.unwrap();
        if i == 10 {
            assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
        } else {
            assert!(result.is_ok(), "{i}: {result:?}");
        }
    }
    let request = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 0, ..Default::default() };
    let seqs: Vec<u64> = h.store().read_events(request).await.unwrap().events.iter().map(|event| event.seq).collect();
    assert_eq!(seqs, (1..=21).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_restarted_server_makes_calls_unavailable_then_serves_them_again() {
    let server = Postgres::start().unwrap();
    let url = server.create_database().unwrap();
    let clock = Arc::new(FixedClock::new(START_MS));
    let options = PgOptions {
        test_clock: Some(clock.clone()),
        max_connections: 4,
        acquire_timeout: Duration::from_millis(500),
        group_commit: GroupCommit::default(),
    };
    let store = PgStore::connect(&url, options).await.unwrap();
    store.migrate().await.unwrap();
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;

    server.stop().unwrap();
    let acquired = store
        .acquire_shards(AcquireShardsRequest {
            node_id: "node-a".into(),
            shards: vec![1],
            lease_ms: LEASE_MS,
            limit: 0,
        })
        .await;
    assert!(matches!(acquired, Err(StoreError::Unavailable(_))), "{acquired:?}");
    let appended = append(&store, fence, "c1", vec![message("m1", "hi")], None).await;
    assert!(matches!(appended, Err(StoreError::Unavailable(_))), "{appended:?}");
    let read =
        store.read_events(ReadEventsRequest { conversation_id: "c1".into(), after_seq: 0, ..Default::default() }).await;
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");

    // The same store, without being rebuilt: the pool reconnects.
    server.restart().unwrap();
    let appended = append(&store, fence, "c1", vec![message("m1", "hi")], None).await.unwrap();
    assert_eq!((appended.events[0].seq, appended.duplicate), (2, false));
    let leases = store
        .acquire_shards(AcquireShardsRequest {
            node_id: "node-a".into(),
            shards: vec![1],
            lease_ms: LEASE_MS,
            limit: 0,
        })
        .await
        .unwrap();
    assert_eq!(leases.granted.len(), 1);
    let read =
        store.read_events(ReadEventsRequest { conversation_id: "c1".into(), after_seq: 0, ..Default::default() }).await;
    assert_eq!(read.unwrap().events.len(), 2);
}

/// The append writer keeps its connection from one batch to the next; a server restarted between two
/// batches dropped it, and the next batch must find that out (it pings a connection idle for a while) rather
/// than fail its appends on it.
#[tokio::test]
async fn an_append_after_a_restart_between_batches_is_written_on_a_new_connection() {
    let server = Postgres::start().unwrap();
    let url = server.create_database().unwrap();
    let options = PgOptions { test_clock: Some(Arc::new(FixedClock::new(START_MS))), ..PgOptions::default() };
    let store = PgStore::connect(&url, options).await.unwrap();
    store.migrate().await.unwrap();
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;

    // No append between the stop and the start: the writer's connection is dropped by the server unseen
    // (a restart, some 200 ms here, takes far longer than the writer's idle limit).
    server.stop().unwrap();
    server.restart().unwrap();
    let appended = append(&store, fence, "c1", vec![message("m1", "hi")], None).await.unwrap();
    assert_eq!((appended.events[0].seq, appended.duplicate), (2, false));
}

#[tokio::test]
async fn two_stores_migrating_at_once_apply_each_migration_once() {
    let url = fresh_database();
    let options = || PgOptions { test_clock: Some(Arc::new(FixedClock::new(START_MS))), ..PgOptions::default() };
    let (a, b) = (PgStore::connect(&url, options()).await.unwrap(), PgStore::connect(&url, options()).await.unwrap());
    let (applied_a, applied_b) = tokio::join!(a.migrate(), b.migrate());
    assert_eq!(applied_a.unwrap() + applied_b.unwrap(), LATEST_MIGRATION as usize);
    assert_eq!(a.applied_migrations().await.unwrap(), (1..=LATEST_MIGRATION).collect::<Vec<_>>());
    assert_eq!(b.migrate().await.unwrap(), 0);
}

/// Without a test clock, lease expiry is the server's clock plus the lease.
#[tokio::test]
async fn leases_expire_on_the_servers_clock() {
    let url = fresh_database();
    let store = PgStore::connect(&url, PgOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let server_ms = || async {
        let now: i64 = sqlx::query_scalar("SELECT CAST(floor(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)")
            .fetch_one(&pool)
            .await
            .unwrap();
        now
    };
    let before = server_ms().await;
    let granted = store
        .acquire_shards(AcquireShardsRequest {
            node_id: "node-a".into(),
            shards: vec![3],
            lease_ms: LEASE_MS,
            limit: 0,
        })
        .await
        .unwrap()
        .granted;
    let after = server_ms().await;
    let [ShardLease { expires_at_ms, .. }] = granted[..] else { panic!("one lease: {granted:?}") };
    assert!(
        (before..=after).contains(&(expires_at_ms - LEASE_MS as i64)),
        "{before} <= {expires_at_ms} - lease <= {after}"
    );
    let history = store.lease_history().await.unwrap();
    assert!((before..=after).contains(&history[0].acquired_at_ms));

    // Unexpired on the server's clock: another node cannot take it.
    let other = store
        .acquire_shards(AcquireShardsRequest {
            node_id: "node-b".into(),
            shards: vec![3],
            lease_ms: LEASE_MS,
            limit: 0,
        })
        .await
        .unwrap();
    assert!(other.granted.is_empty());
}

/// Creates of conversations `prefix0..prefixN` through `stores` (round robin), all at once, each a task of
/// its own. Answers the ids admitted; every other create must have been refused for the license.
async fn create_burst(stores: &[Arc<PgStore>], epochs: &Arc<HashMap<u32, u64>>, prefix: &str, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let epochs = epochs.clone();
            let id = format!("{prefix}{i}");
            tokio::spawn(async move {
                let record = conversation(&id, "acme", "sales", i as i64);
                let fence = Fence { shard: record.shard, epoch: epochs[&record.shard] };
                let request = AppendRequest {
                    fence: Some(fence),
                    conversation_id: id.clone(),
                    create: Some(record),
                    events: vec![system_event("created")],
                    update: None,
                };
                (id, store.append(request).await)
            })
        })
        .collect();
    let mut admitted = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (id, Ok(response)) => {
                assert!(!response.duplicate, "{id}");
                admitted.push(id);
            }
            (_, Err(StoreError::LicenseExhausted { max_sessions: 50 })) => {}
            (id, Err(other)) => panic!("{id}: {other:?}"),
        }
    }
    admitted
}

/// `used`, the rows of `license_permits` and the unfinished conversations, counted in the database.
async fn license_counts(url: &str) -> (i64, i64, i64) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let used: i64 = sqlx::query_scalar("SELECT used FROM license WHERE id = 1").fetch_one(&pool).await.unwrap();
    let permits: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM license_permits").fetch_one(&pool).await.unwrap();
    let open: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conversations WHERE state IN ('queued', 'active')")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    (used, permits, open)
}

/// The license limit holds exactly under group commit and several store processes: 2,000 creates at once
/// for 50 permits admit exactly 50; finishing 10 admits exactly 10 more out of the next burst; and the count
/// is the database's alone (a new store process reads the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_license_limit_holds_exactly_under_concurrent_creates() {
    const STORES: usize = 4;
    let url = fresh_database();
    let clock = Arc::new(FixedClock::new(START_MS));
    let mut stores: Vec<Arc<PgStore>> = Vec::new();
    for _ in 0..STORES {
        stores.push(Arc::new(pg_store(&url, clock.clone()).await));
    }
    let limit = SetLicenseLimitRequest { max_sessions: 50 };
    assert_eq!(stores[0].set_license_limit(limit).await.unwrap(), License { max_sessions: 50, used: 0 });
    let request = AcquireShardsRequest { node_id: "node-a".into(), shards: vec![], lease_ms: 3_600_000, limit: 0 };
    let granted = stores[0].acquire_shards(request).await.unwrap().granted;
    let epochs: Arc<HashMap<u32, u64>> = Arc::new(granted.iter().map(|lease| (lease.shard, lease.epoch)).collect());

    let admitted = create_burst(&stores, &epochs, "a", 2_000).await;
    assert_eq!(admitted.len(), 50, "exactly the limit admitted, 1,950 refused");
    assert_eq!(stores[1].get_license(GetLicenseRequest {}).await.unwrap(), License { max_sessions: 50, used: 50 });
    assert_eq!(license_counts(&url).await, (50, 50, 50));

    // Finish 10 (through different stores), then another burst: exactly 10 more.
    for (i, id) in admitted.iter().take(10).enumerate() {
        let shard = shard_of_conversation(id);
        let fence = Fence { shard, epoch: epochs[&shard] };
        let state = if i % 2 == 0 { "closed" } else { "cancelled" };
        let finish = Some(update(state, "", 0, START_MS));
        append(stores[i % STORES].as_ref(), fence, id, vec![system_event(state)], finish).await.unwrap();
    }
    assert_eq!(license_counts(&url).await, (40, 40, 40));
    let more = create_burst(&stores, &epochs, "b", 500).await;
    assert_eq!(more.len(), 10, "exactly the permits given back");
    assert_eq!(license_counts(&url).await, (50, 50, 50));

    // Only the database holds the count: a store process started now sees it and refuses the next.
    for store in &stores {
        store.close().await;
    }
    let fresh = Arc::new(pg_store(&url, clock.clone()).await);
    assert_eq!(fresh.get_license(GetLicenseRequest {}).await.unwrap(), License { max_sessions: 50, used: 50 });
    assert!(create_burst(&[fresh], &epochs, "c", 5).await.is_empty());
}
