//! What is acknowledged survives closing and reopening the database file; migrations run once. SqlStore
//! only: the in-memory stand-in has no file to reopen.

mod common;

use common::*;
use switchboard_proto::internal::v1::{
    CreateTicketRequest, GetConversationRequest, ListTicketsRequest, ReadEventsRequest, RenewShardsRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_store::LATEST_MIGRATION;

#[tokio::test]
async fn data_survives_a_reopen_and_migrations_are_not_reapplied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested-name.db");

    let (store, _clock) = sql_on_file(&path).await;
    assert_eq!(store.applied_migrations().await.unwrap(), (1..=LATEST_MIGRATION).collect::<Vec<_>>());
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    let appended =
        append(&store, fence, "c1", vec![message("m1", "hi")], Some(update("active", "alice", 2, 0))).await.unwrap();
    store.close().await;
    drop(store);

    let (store, _clock) = sql_on_file(&path).await;
    assert_eq!(store.migrate().await.unwrap(), 0, "nothing left to apply");
    assert_eq!(store.applied_migrations().await.unwrap(), (1..=LATEST_MIGRATION).collect::<Vec<_>>());

    let request = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 1, ..Default::default() };
    assert_eq!(store.read_events(request).await.unwrap().events, appended.events);
    let request = GetConversationRequest { conversation_id: "c1".into() };
    let record = store.get_conversation(request).await.unwrap().conversation.unwrap();
    assert_eq!((record.last_seq, record.owner_agent_id.as_str()), (2, "alice"));

    // The lease survived too: the fence still holds, and the dedupe index.
    let request = RenewShardsRequest { node_id: "node-a".into(), held: vec![fence], lease_ms: LEASE_MS };
    assert!(store.renew_shards(request).await.unwrap().lost.is_empty());
    let retry = append(&store, fence, "c1", vec![message("m1", "hi")], None).await.unwrap();
    assert!(retry.duplicate);
    let next = append(&store, fence, "c1", vec![message("m2", "bye")], None).await.unwrap();
    assert_eq!(next.events[0].seq, 3);
}

#[tokio::test]
async fn a_sqlite_url_opens_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("url.db");
    let (store, _clock) = sql_on_file(&path).await;
    create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    store.close().await;

    let clock = std::sync::Arc::new(switchboard_domain::FixedClock::new(START_MS));
    let url = format!("sqlite://{}", path.display());
    let store = switchboard_store::SqlStore::open(&url, clock).await.unwrap();
    let request = GetConversationRequest { conversation_id: "c1".into() };
    assert!(store.get_conversation(request).await.unwrap().conversation.is_some());
}

/// An append batch on SQLite begins, writes and commits with statements of its own: when the database
/// refuses one append's write, that append alone gets the error, nothing of it is kept, the others of the
/// batch are stored, and the writer connection goes on (no transaction left open).
#[tokio::test]
async fn a_write_the_database_refuses_fails_only_its_append_and_the_writer_goes_on() {
    use sqlx::Connection;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refusal.db");
    let (store, _clock) = sql_on_file(&path).await;
    let ids = ["c0", "c1", "c2", "c3"];
    let mut fences = Vec::new();
    for id in ids {
        fences.push(create(&store, "node-a", conversation(id, "acme", "sales", 1)).await);
    }
    // A second message whose body holds "poison" breaks a unique index only this test has.
    let mut admin = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    sqlx::query("CREATE UNIQUE INDEX test_one_poison ON events (payload_json) WHERE payload_json LIKE '%poison%'")
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    append(&store, fences[0], "c0", vec![message("m0", "poison")], None).await.unwrap();

    // Sent together, so that they may share a batch; the outcomes are the same whether they do or not.
    let (fine, poison, also_fine) = tokio::join!(
        append(&store, fences[1], "c1", vec![message("m1", "fine")], None),
        append(&store, fences[2], "c2", vec![message("m1", "poison")], None),
        append(&store, fences[3], "c3", vec![message("m1", "also fine")], None),
    );
    assert_eq!(fine.unwrap().events[0].seq, 2);
    assert!(matches!(&poison, Err(StoreError::Invalid(_))), "{poison:?}");
    assert_eq!(also_fine.unwrap().events[0].seq, 2);

    let request = ReadEventsRequest { conversation_id: "c2".into(), after_seq: 1, ..Default::default() };
    assert!(store.read_events(request).await.unwrap().events.is_empty(), "nothing of the refused append is kept");
    let next = append(&store, fences[2], "c2", vec![message("m2", "hello")], None).await.unwrap();
    assert_eq!(next.events[0].seq, 2, "the writer goes on after the refusal");
}

/// An append batch commits without waiting for the disk and is answered only after a sync of the
/// write-ahead log. When that sync fails (here the log's file is gone, so nothing proves the commit is on
/// the disk), the append is not answered as stored, and neither is any later one, even once a sync could
/// succeed again: what the database holds since the failure is not known to be durable.
#[tokio::test]
async fn an_append_whose_log_cannot_be_synced_is_not_acknowledged_nor_any_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let wal = dir.path().join("store.db-wal");
    let (store, _clock) = sql_on_file(&path).await;
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    append(&store, fence, "c1", vec![message("m1", "synced")], None).await.unwrap();
    assert!(wal.exists(), "the database runs with a write-ahead log");

    assert_eq!(store.writer_failure(), None);

    std::fs::remove_file(&wal).unwrap();
    let failed = append(&store, fence, "c1", vec![message("m2", "not synced")], None).await;
    assert!(matches!(failed, Err(StoreError::Unavailable(_))), "{failed:?}");
    // Health checks see it.
    assert!(
        matches!(store.writer_failure(), Some(StoreError::Unavailable(ref why)) if why.contains("cannot find the log")),
        "{:?}",
        store.writer_failure()
    );

    // A log file that could be synced again does not make the store trustworthy again.
    std::fs::write(&wal, b"").unwrap();
    let later = append(&store, fence, "c1", vec![message("m3", "after the failure")], None).await;
    assert!(matches!(later, Err(StoreError::Unavailable(_))), "{later:?}");
}

/// Closing the store answers the appends made before it and refuses those after it; what was acknowledged
/// is there when the file is opened again.
#[tokio::test]
async fn a_closed_store_refuses_appends_and_keeps_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("closed.db");
    let (store, _clock) = sql_on_file(&path).await;
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    let (first, second) = tokio::join!(
        append(&store, fence, "c1", vec![message("m1", "one")], None),
        append(&store, fence, "c1", vec![message("m2", "two")], None),
    );
    let mut acknowledged: Vec<_> = [first, second].into_iter().flat_map(|answer| answer.unwrap().events).collect();
    store.close().await;

    let after = append(&store, fence, "c1", vec![message("m3", "three")], None).await;
    assert!(matches!(after, Err(StoreError::Unavailable(_))), "{after:?}");
    drop(store);

    let (store, _clock) = sql_on_file(&path).await;
    let request = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 1, ..Default::default() };
    acknowledged.sort_by_key(|event| event.seq);
    assert_eq!(store.read_events(request).await.unwrap().events, acknowledged);
}

/// Appends are written on a connection of their own, the other writes (leases, tickets) on another. Each
/// write transaction takes the database's write lock as it begins, so that they interleave without
/// failing: a ticket's transaction reads (is the key taken?) before it writes, and SQLite fails such a
/// transaction at once if another connection committed in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_tickets_and_lease_renewals_interleave_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _clock) = sql_on_file(&dir.path().join("writers.db")).await;
    let store = std::sync::Arc::new(store);
    let ids = ["c0", "c1", "c2", "c3"];
    let mut fences = Vec::new();
    for id in ids {
        fences.push(create(store.as_ref(), "node-a", conversation(id, "acme", "sales", 1)).await);
    }
    const ROUNDS: usize = 150;
    let mut tasks = tokio::task::JoinSet::new();
    for (id, fence) in ids.into_iter().zip(fences.clone()) {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..ROUNDS {
                append(store.as_ref(), fence, id, vec![message(&format!("m{i}"), "hello")], None).await.map(drop)?;
            }
            Ok::<_, StoreError>(())
        });
    }
    for writer in 0..2 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..ROUNDS {
                let ticket = ticket(&format!("t{writer}-{i}"), "acme", &format!("k{writer}-{i}"), START_MS);
                store.create_ticket(CreateTicketRequest { ticket: Some(ticket) }).await.map(drop)?;
            }
            Ok(())
        });
    }
    let renewer = store.clone();
    tasks.spawn(async move {
        for _ in 0..ROUNDS {
            let request = RenewShardsRequest { node_id: "node-a".into(), held: fences.clone(), lease_ms: LEASE_MS };
            assert!(renewer.renew_shards(request).await?.lost.is_empty());
        }
        Ok(())
    });
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    for id in ids {
        assert_eq!(get(store.as_ref(), id).await.last_seq, 1 + ROUNDS as u64, "{id}");
    }
    let listed = store.list_tickets(ListTicketsRequest { tenant_id: "acme".into(), limit: 1000 }).await.unwrap();
    assert_eq!(listed.tickets.len(), 2 * ROUNDS);
}
