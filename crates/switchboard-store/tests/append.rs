//! Appends: gap-free sequence numbers, deduplication, fencing, and reads of the log.

mod common;

use common::*;
use switchboard_proto::internal::v1::{
    AppendRequest, ConversationRecord, Fence, GetConversationRequest, ReadEventsRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_store::SqlStore;

async fn read(store: &SqlStore, id: &str, after_seq: u64, limit: u32) -> Vec<u64> {
    let request = ReadEventsRequest {
        conversation_id: id.into(),
        after_seq,
        limit,
    };
    store
        .read_events(request)
        .await
        .unwrap()
        .events
        .iter()
        .map(|event| event.seq)
        .collect()
}

async fn last_seq(store: &SqlStore, id: &str) -> u64 {
    let request = GetConversationRequest {
        conversation_id: id.into(),
    };
    store
        .get_conversation(request)
        .await
        .unwrap()
        .conversation
        .unwrap()
        .last_seq
}

#[tokio::test]
async fn appends_get_gap_free_sequence_numbers() {
    let Harness { store, .. } = in_memory().await;
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;

    let first = append(
        &store,
        fence,
        "c1",
        vec![message("m1", "hi"), message("", "anyone?")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        first
            .events
            .iter()
            .map(|event| event.seq)
            .collect::<Vec<_>>(),
        [2, 3]
    );
    assert_eq!((first.last_seq, first.duplicate), (3, false));
    assert_eq!(first.events[0].conversation_id, "c1");
    assert_eq!(first.events[0].client_msg_id, "m1");
    let second = append(&store, fence, "c1", vec![message("m2", "hello?")], None)
        .await
        .unwrap();
    assert_eq!(second.events[0].seq, 4);

    assert_eq!(read(&store, "c1", 0, 0).await, [1, 2, 3, 4]);
    assert_eq!(read(&store, "c1", 2, 0).await, [3, 4]);
    assert_eq!(read(&store, "c1", 1, 2).await, [2, 3]);
    assert_eq!(read(&store, "c1", 4, 0).await, Vec::<u64>::new());
    assert_eq!(last_seq(&store, "c1").await, 4);

    let events = store
        .read_events(ReadEventsRequest {
            conversation_id: "c1".into(),
            after_seq: 1,
            limit: 1,
        })
        .await
        .unwrap()
        .events;
    assert_eq!(
        events[0], first.events[0],
        "the log holds what the append returned"
    );
}

#[tokio::test]
async fn a_retried_message_is_stored_once_and_its_update_not_reapplied() {
    let Harness { store, .. } = in_memory().await;
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;

    let accept = || Some(update("active", "alice", 5, 0));
    let first = append(&store, fence, "c1", vec![message("m1", "hi")], accept())
        .await
        .unwrap();
    // Something else changes the summary in between.
    append(
        &store,
        fence,
        "c1",
        vec![system_event("transferred")],
        Some(update("active", "bob", 5, 0)),
    )
    .await
    .unwrap();

    let retry = append(&store, fence, "c1", vec![message("m1", "hi")], accept())
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        retry.events, first.events,
        "the event stored the first time"
    );
    assert_eq!(retry.last_seq, 3);
    assert_eq!(read(&store, "c1", 0, 0).await, [1, 2, 3]);
    let request = GetConversationRequest {
        conversation_id: "c1".into(),
    };
    let record = store
        .get_conversation(request)
        .await
        .unwrap()
        .conversation
        .unwrap();
    assert_eq!(
        record.owner_agent_id, "bob",
        "the duplicate's update was not applied"
    );

    // The same client id in another conversation is another message.
    let fence2 = create(&store, "node-a", conversation("c2", "acme", "sales", 2)).await;
    let other = append(&store, fence2, "c2", vec![message("m1", "hi")], None)
        .await
        .unwrap();
    assert!(!other.duplicate);
}

#[tokio::test]
async fn the_update_changes_the_summary_and_an_empty_state_keeps_the_state() {
    let Harness { store, .. } = in_memory().await;
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    append(
        &store,
        fence,
        "c1",
        vec![system_event("accepted")],
        Some(update("active", "alice", 7, 0)),
    )
    .await
    .unwrap();
    append(&store, fence, "c1", vec![], Some(update("", "alice", 7, 9)))
        .await
        .unwrap();
    let request = GetConversationRequest {
        conversation_id: "c1".into(),
    };
    let record = store
        .get_conversation(request)
        .await
        .unwrap()
        .conversation
        .unwrap();
    assert_eq!(
        (
            record.state.as_str(),
            record.owner_agent_id.as_str(),
            record.accepted_at_ms,
            record.closed_at_ms
        ),
        ("active", "alice", 7, 9)
    );
    assert_eq!(
        (record.last_seq, record.customer_token.as_str()),
        (2, "token-c1")
    );
}

#[tokio::test]
async fn a_write_under_an_old_epoch_is_refused_and_stores_nothing() {
    let Harness { store, clock } = in_memory().await;
    let record = conversation("c1", "acme", "sales", 1);
    let shard = record.shard;
    let old = create(&store, "node-a", record).await;

    // The lease expires and node B takes the shard.
    clock.advance_ms(LEASE_MS as i64);
    let new = fence(&store, "node-b", shard).await;
    assert_eq!(new.epoch, old.epoch + 1);

    let refused = append(
        &store,
        old,
        "c1",
        vec![message("m1", "late")],
        Some(update("closed", "", 0, 1)),
    )
    .await;
    assert_eq!(refused.unwrap_err(), StoreError::StaleEpoch { shard });
    assert_eq!(read(&store, "c1", 0, 0).await, [1]);
    assert_eq!(last_seq(&store, "c1").await, 1);

    // Under the new fence the same message goes through, at the next seq.
    let accepted = append(&store, new, "c1", vec![message("m1", "late")], None)
        .await
        .unwrap();
    assert_eq!((accepted.events[0].seq, accepted.duplicate), (2, false));

    // A node re-acquiring its own shard bumps the epoch too: its old fence is stale.
    let newer = fence(&store, "node-b", shard).await;
    assert_eq!(newer.epoch, new.epoch + 1);
    let refused = append(&store, new, "c1", vec![message("m2", "x")], None).await;
    assert_eq!(refused.unwrap_err(), StoreError::StaleEpoch { shard });
}

#[tokio::test]
async fn bad_appends_are_refused() {
    let Harness { store, .. } = in_memory().await;
    let record = conversation("c1", "acme", "sales", 1);
    let shard = record.shard;
    let fence = fence(&store, "node-a", shard).await;

    // A shard never leased: stale. A missing fence: invalid.
    let never = Fence {
        shard: (shard + 1) % 1024,
        epoch: 1,
    };
    let error = append(&store, never, "c1", vec![message("m1", "hi")], None)
        .await
        .unwrap_err();
    assert_eq!(error, StoreError::StaleEpoch { shard: never.shard });
    let request = AppendRequest {
        conversation_id: "c1".into(),
        ..Default::default()
    };
    assert!(matches!(
        store.append(request).await,
        Err(StoreError::Invalid(_))
    ));

    // No such conversation and no create.
    let error = append(&store, fence, "c1", vec![message("m1", "hi")], None)
        .await
        .unwrap_err();
    assert_eq!(error, StoreError::NotFound("c1".into()));

    // The conversation lives on another shard than the fence's.
    let other = common::fence(&store, "node-a", (shard + 1) % 1024).await;
    let request = AppendRequest {
        fence: Some(other),
        conversation_id: "c1".into(),
        create: Some(record),
        events: vec![system_event("created")],
        update: None,
    };
    assert!(matches!(
        store.append(request).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(
        store
            .get_conversation(GetConversationRequest {
                conversation_id: "c1".into()
            })
            .await
            .unwrap()
            .conversation
            .is_none()
    );
}

#[tokio::test]
async fn a_retried_create_finds_the_conversation_and_deduplicates() {
    let Harness { store, .. } = in_memory().await;
    let record = conversation("c1", "acme", "sales", 1);
    let fence = fence(&store, "node-a", record.shard).await;
    let request = AppendRequest {
        fence: Some(fence),
        conversation_id: "c1".into(),
        create: Some(record.clone()),
        events: vec![message("first", "hello")],
        update: None,
    };
    let first = store.append(request.clone()).await.unwrap();
    let retry = store.append(request).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.events, first.events);

    // A create for a conversation that exists already appends to it.
    let request = AppendRequest {
        fence: Some(fence),
        conversation_id: "c1".into(),
        create: Some(ConversationRecord {
            customer_name: "Mallory".into(),
            ..record
        }),
        events: vec![message("second", "again")],
        update: None,
    };
    let second = store.append(request).await.unwrap();
    assert_eq!(second.events[0].seq, 2);
    let request = GetConversationRequest {
        conversation_id: "c1".into(),
    };
    let stored = store
        .get_conversation(request)
        .await
        .unwrap()
        .conversation
        .unwrap();
    assert_eq!(
        stored.customer_name, "Carol",
        "the existing conversation is kept"
    );
}

#[tokio::test]
async fn concurrent_appends_to_one_conversation_get_distinct_consecutive_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let Harness { store, .. } = on_file(&dir.path().join("store.db")).await;
    let fence = create(&store, "node-a", conversation("c1", "acme", "sales", 1)).await;

    const N: u64 = 50;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let response = append(
                    &store,
                    fence,
                    "c1",
                    vec![message(&format!("m{i}"), "hi")],
                    None,
                )
                .await
                .unwrap();
                response.events[0].seq
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(task.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=N + 1).collect::<Vec<_>>());
    assert_eq!(
        read(&store, "c1", 0, 0).await,
        (1..=N + 1).collect::<Vec<_>>()
    );
    assert_eq!(last_seq(&store, "c1").await, N + 1);
}
