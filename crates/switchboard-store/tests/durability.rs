//! What is acknowledged survives closing and reopening the database file; migrations run once. SqlStore
//! only: the in-memory stand-in has no file to reopen.

mod common;

use common::*;
use switchboard_proto::internal::v1::{GetConversationRequest, ReadEventsRequest, RenewShardsRequest};
use switchboard_proto::store::StoreApi;
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

    let request = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 1, limit: 0 };
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
