//! Appends: gap-free sequence numbers, deduplication, fencing, and reads of the log. Every scenario runs
//! against each backend (see `on_every_backend!`).

mod common;

use std::sync::Arc;

use common::*;
use prost::Message as _;
use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{
    AppendRequest, ConversationRecord, EventRecord, Fence, GetConversationRequest, NewEvent, ReadEventsRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};

on_every_backend!(
    appends_get_gap_free_sequence_numbers,
    a_retried_message_is_stored_once_and_its_update_not_reapplied,
    the_update_changes_the_summary_and_an_empty_state_keeps_the_state,
    a_write_under_an_old_epoch_is_refused_and_stores_nothing,
    bad_appends_are_refused,
    a_retried_create_finds_the_conversation_and_deduplicates,
    concurrent_appends_to_one_conversation_get_distinct_consecutive_seqs,
    one_client_id_twice_in_one_append_is_refused_and_stores_nothing,
    out_of_range_values_are_invalid_and_store_nothing,
    a_read_bounded_by_bytes_is_a_page_and_the_pages_make_the_log,
    an_event_is_found_by_its_deduplication_key,
);

async fn read(store: &dyn StoreApi, id: &str, after_seq: u64, limit: u32) -> Vec<u64> {
    let request = ReadEventsRequest { conversation_id: id.into(), after_seq, limit, ..Default::default() };
    store.read_events(request).await.unwrap().events.iter().map(|event| event.seq).collect()
}

async fn last_seq(store: &dyn StoreApi, id: &str) -> u64 {
    get(store, id).await.last_seq
}

async fn appends_get_gap_free_sequence_numbers(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;

    let first = append(store, fence, "c1", vec![message("m1", "hi"), message("", "anyone?")], None).await.unwrap();
    assert_eq!(first.events.iter().map(|event| event.seq).collect::<Vec<_>>(), [2, 3]);
    assert_eq!((first.last_seq, first.duplicate), (3, false));
    assert_eq!(first.events[0].conversation_id, "c1");
    assert_eq!(first.events[0].client_msg_id, "m1");
    let second = append(store, fence, "c1", vec![message("m2", "hello?")], None).await.unwrap();
    assert_eq!(second.events[0].seq, 4);

    assert_eq!(read(store, "c1", 0, 0).await, [1, 2, 3, 4]);
    assert_eq!(read(store, "c1", 2, 0).await, [3, 4]);
    assert_eq!(read(store, "c1", 1, 2).await, [2, 3]);
    assert_eq!(read(store, "c1", 4, 0).await, Vec::<u64>::new());
    assert_eq!(read(store, "nope", 0, 0).await, Vec::<u64>::new(), "no such conversation: no events");
    assert_eq!(last_seq(store, "c1").await, 4);

    let events = store
        .read_events(ReadEventsRequest { conversation_id: "c1".into(), after_seq: 1, limit: 1, ..Default::default() })
        .await
        .unwrap()
        .events;
    assert_eq!(events[0], first.events[0], "the log holds what the append returned");
    let events = store.read_events(ReadEventsRequest { conversation_id: "c1".into(), ..Default::default() });
    let events = events.await.unwrap().events;
    assert_eq!(events[2], first.events[1], "an event without a client id reads back with an empty one");
}

async fn a_retried_message_is_stored_once_and_its_update_not_reapplied(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;

    let accept = || Some(update("active", "alice", 5, 0));
    let first = append(store, fence, "c1", vec![message("m1", "hi")], accept()).await.unwrap();
    // Something else changes the summary in between.
    append(store, fence, "c1", vec![system_event("transferred")], Some(update("active", "bob", 5, 0))).await.unwrap();

    let retry = append(store, fence, "c1", vec![message("m1", "hi")], accept()).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.events, first.events, "the event stored the first time");
    assert_eq!(retry.last_seq, 3);
    assert_eq!(read(store, "c1", 0, 0).await, [1, 2, 3]);
    let request = GetConversationRequest { conversation_id: "c1".into() };
    let record = store.get_conversation(request).await.unwrap().conversation.unwrap();
    assert_eq!(record.owner_agent_id, "bob", "the duplicate's update was not applied");

    // A batch with one stored client id is a duplicate as a whole: only the stored event comes back and
    // the new one in the batch is not written.
    let batch = vec![message("m9", "new"), message("m1", "hi"), system_event("note")];
    let retry = append(store, fence, "c1", batch, Some(update("closed", "", 5, 6))).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!((retry.events, retry.last_seq), (first.events.clone(), 3));
    assert_eq!(read(store, "c1", 0, 0).await, [1, 2, 3]);
    assert_eq!(get(store, "c1").await.state, "active");

    // The same client id in another conversation is another message.
    let fence2 = create(store, "node-a", conversation("c2", "acme", "sales", 2)).await;
    let other = append(store, fence2, "c2", vec![message("m1", "hi")], None).await.unwrap();
    assert!(!other.duplicate);
}

async fn the_update_changes_the_summary_and_an_empty_state_keeps_the_state(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    append(store, fence, "c1", vec![system_event("accepted")], Some(update("active", "alice", 7, 0))).await.unwrap();
    let empty = append(store, fence, "c1", vec![], Some(update("", "alice", 7, 9))).await.unwrap();
    assert_eq!((empty.events.len(), empty.duplicate, empty.last_seq), (0, false, 2), "no events, no new seq");
    let request = GetConversationRequest { conversation_id: "c1".into() };
    let record = store.get_conversation(request).await.unwrap().conversation.unwrap();
    assert_eq!(
        (record.state.as_str(), record.owner_agent_id.as_str(), record.accepted_at_ms, record.closed_at_ms),
        ("active", "alice", 7, 9)
    );
    assert_eq!((record.last_seq, record.customer_token.as_str()), (2, "token-c1"));

    // Without an update the summary stays as it is, whatever the events.
    append(store, fence, "c1", vec![system_event("closed")], None).await.unwrap();
    let record = get(store, "c1").await;
    assert_eq!((record.state.as_str(), record.owner_agent_id.as_str(), record.last_seq), ("active", "alice", 3));
}

async fn a_write_under_an_old_epoch_is_refused_and_stores_nothing(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let record = conversation("c1", "acme", "sales", 1);
    let shard = record.shard;
    let old = create(store, "node-a", record).await;

    // The lease expires and node B takes the shard.
    clock.advance_ms(LEASE_MS as i64);
    let new = fence(store, "node-b", shard).await;
    assert_eq!(new.epoch, old.epoch + 1);

    let refused = append(store, old, "c1", vec![message("m1", "late")], Some(update("closed", "", 0, 1))).await;
    assert_eq!(refused.unwrap_err(), StoreError::StaleEpoch { shard });
    assert_eq!(read(store, "c1", 0, 0).await, [1]);
    assert_eq!(last_seq(store, "c1").await, 1);
    assert_eq!(get(store, "c1").await.state, "queued", "the refused update was not applied");

    // Under the new fence the same message goes through, at the next seq.
    let accepted = append(store, new, "c1", vec![message("m1", "late")], None).await.unwrap();
    assert_eq!((accepted.events[0].seq, accepted.duplicate), (2, false));

    // A node re-acquiring its own shard bumps the epoch too: its old fence is stale.
    let newer = fence(store, "node-b", shard).await;
    assert_eq!(newer.epoch, new.epoch + 1);
    let refused = append(store, new, "c1", vec![message("m2", "x")], None).await;
    assert_eq!(refused.unwrap_err(), StoreError::StaleEpoch { shard });

    // A fence from the future is as stale as one from the past.
    let future = Fence { shard, epoch: newer.epoch + 1 };
    let refused = append(store, future, "c1", vec![message("m2", "x")], None).await;
    assert_eq!(refused.unwrap_err(), StoreError::StaleEpoch { shard });
    assert_eq!(read(store, "c1", 0, 0).await, [1, 2]);
}

async fn bad_appends_are_refused(h: Harness) {
    let store = h.store();
    let record = conversation("c1", "acme", "sales", 1);
    let shard = record.shard;
    let fence = fence(store, "node-a", shard).await;

    // A shard never leased: stale. A missing fence: invalid.
    let never = Fence { shard: (shard + 1) % 1024, epoch: 1 };
    let error = append(store, never, "c1", vec![message("m1", "hi")], None).await.unwrap_err();
    assert_eq!(error, StoreError::StaleEpoch { shard: never.shard });
    let request = AppendRequest { conversation_id: "c1".into(), ..Default::default() };
    assert!(matches!(store.append(request).await, Err(StoreError::Invalid(_))));
    // No conversation id: invalid.
    let error = append(store, fence, "", vec![message("m1", "hi")], None).await.unwrap_err();
    assert!(matches!(error, StoreError::Invalid(_)), "{error:?}");

    // No such conversation and no create.
    let error = append(store, fence, "c1", vec![message("m1", "hi")], None).await.unwrap_err();
    assert_eq!(error, StoreError::NotFound("c1".into()));

    // A create record naming another conversation.
    let request = AppendRequest {
        fence: Some(fence),
        conversation_id: "c1".into(),
        create: Some(ConversationRecord { id: "c2".into(), ..record.clone() }),
        events: vec![system_event("created")],
        update: None,
    };
    assert!(matches!(store.append(request).await, Err(StoreError::Invalid(_))));

    // The conversation lives on another shard than the fence's.
    let other = common::fence(store, "node-a", (shard + 1) % 1024).await;
    let request = AppendRequest {
        fence: Some(other),
        conversation_id: "c1".into(),
        create: Some(record),
        events: vec![system_event("created")],
        update: None,
    };
    assert!(matches!(store.append(request).await, Err(StoreError::Invalid(_))));
    assert!(
        store
            .get_conversation(GetConversationRequest { conversation_id: "c1".into() })
            .await
            .unwrap()
            .conversation
            .is_none()
    );
    assert_eq!(read(store, "c1", 0, 0).await, Vec::<u64>::new());

    // Once it exists on its own shard, a fence for another shard is still refused, and writes nothing.
    create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    let error = append(store, other, "c1", vec![message("m1", "hi")], Some(update("closed", "", 0, 1))).await;
    assert!(matches!(error, Err(StoreError::Invalid(_))), "{error:?}");
    assert_eq!(read(store, "c1", 0, 0).await, [1]);
    assert_eq!(get(store, "c1").await.state, "queued");
}

async fn a_retried_create_finds_the_conversation_and_deduplicates(h: Harness) {
    let store = h.store();
    let record = conversation("c1", "acme", "sales", 1);
    let fence = fence(store, "node-a", record.shard).await;
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
        create: Some(ConversationRecord { customer_name: "Mallory".into(), ..record.clone() }),
        events: vec![message("second", "again")],
        update: None,
    };
    let second = store.append(request).await.unwrap();
    assert_eq!(second.events[0].seq, 2);
    let request = GetConversationRequest { conversation_id: "c1".into() };
    let stored = store.get_conversation(request).await.unwrap().conversation.unwrap();
    assert_eq!(stored.customer_name, "Carol", "the existing conversation is kept");

    // The stored record is the create record, with the store's own last_seq (an empty id means "this one").
    let record2 = ConversationRecord { last_seq: 99, ..conversation("c2", "acme", "sales", 3) };
    let fence2 = common::fence(store, "node-a", record2.shard).await;
    let request = AppendRequest {
        fence: Some(fence2),
        conversation_id: "c2".into(),
        create: Some(ConversationRecord { id: String::new(), ..record2.clone() }),
        events: vec![system_event("created")],
        update: None,
    };
    assert_eq!(store.append(request).await.unwrap().last_seq, 1);
    assert_eq!(get(store, "c2").await, ConversationRecord { last_seq: 1, ..record2 });
}

async fn concurrent_appends_to_one_conversation_get_distinct_consecutive_seqs(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;

    const N: u64 = 50;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move {
                let response =
                    append(store.as_ref(), fence, "c1", vec![message(&format!("m{i}"), "hi")], None).await.unwrap();
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
    assert_eq!(read(store, "c1", 0, 0).await, (1..=N + 1).collect::<Vec<_>>());
    assert_eq!(last_seq(store, "c1").await, N + 1);
}

async fn one_client_id_twice_in_one_append_is_refused_and_stores_nothing(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    let twice = vec![message("m1", "hi"), system_event("note"), message("m1", "hi again")];
    let error = append(store, fence, "c1", twice, Some(update("active", "alice", 2, 0))).await.unwrap_err();
    assert!(matches!(error, StoreError::Invalid(_)), "{error:?}");
    assert_eq!(read(store, "c1", 0, 0).await, [1]);
    let record = get(store, "c1").await;
    assert_eq!((record.last_seq, record.state.as_str()), (1, "queued"));

    // Nothing of it was stored: the id is still free.
    let once = append(store, fence, "c1", vec![message("m1", "hi")], None).await.unwrap();
    assert_eq!((once.duplicate, once.last_seq), (false, 2));
}

async fn out_of_range_values_are_invalid_and_store_nothing(h: Harness) {
    let store = h.store();
    let record = conversation("c1", "acme", "sales", 1);
    let fence = create(store, "node-a", record.clone()).await;

    let no_such_shard = Fence { shard: N_SHARDS, epoch: 1 };
    let error = append(store, no_such_shard, "c1", vec![message("m1", "hi")], None).await.unwrap_err();
    assert!(matches!(error, StoreError::Invalid(_)), "a shard out of range is invalid, not stale: {error:?}");
    let huge_epoch = Fence { shard: fence.shard, epoch: u64::MAX };
    let error = append(store, huge_epoch, "c1", vec![message("m1", "hi")], None).await.unwrap_err();
    assert!(matches!(error, StoreError::Invalid(_)), "an epoch out of range is invalid, not stale: {error:?}");

    // A create record on a shard out of range, even for a conversation that exists.
    let request = AppendRequest {
        fence: Some(fence),
        conversation_id: "c1".into(),
        create: Some(ConversationRecord { shard: N_SHARDS, ..record }),
        events: vec![message("m1", "hi")],
        update: None,
    };
    assert!(matches!(store.append(request).await, Err(StoreError::Invalid(_))));
    assert_eq!(read(store, "c1", 0, 0).await, [1]);

    let request = ReadEventsRequest { conversation_id: "c1".into(), after_seq: u64::MAX, ..Default::default() };
    assert!(matches!(store.read_events(request).await, Err(StoreError::Invalid(_))));
}

async fn a_read_bounded_by_bytes_is_a_page_and_the_pages_make_the_log(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    // Seq 2..=11: small messages, then one far larger than any page, then small ones again.
    let mut events: Vec<NewEvent> = (0..5).map(|i| message(&format!("m{i}"), &"a".repeat(100))).collect();
    events.push(message("big", &"b".repeat(10_000)));
    events.extend((5..9).map(|i| message(&format!("m{i}"), &"c".repeat(100))));
    append(store, fence, "c1", events, None).await.unwrap();
    let whole = store.read_events(ReadEventsRequest { conversation_id: "c1".into(), ..Default::default() });
    let whole = whole.await.unwrap().events;
    assert_eq!(whole.len(), 11);
    let size = |event: &EventRecord| event.encoded_len() as u64;
    let max_bytes = 3 * size(&whole[1]) + 10;

    let mut pages = Vec::new();
    let mut after_seq = 0;
    while after_seq < 11 {
        let request = ReadEventsRequest { conversation_id: "c1".into(), after_seq, max_bytes, ..Default::default() };
        let page = store.read_events(request).await.unwrap().events;
        assert!(!page.is_empty(), "a page after {after_seq} of a longer log holds an event");
        after_seq = page.last().unwrap().seq;
        pages.push(page);
    }
    let seqs: Vec<Vec<u64>> = pages.iter().map(|page| page.iter().map(|event| event.seq).collect()).collect();
    // `created` is smaller than a message: it and two messages fit in the first page.
    assert_eq!(seqs, [vec![1, 2, 3], vec![4, 5, 6], vec![7], vec![8, 9, 10], vec![11]]);
    for page in &pages {
        let bytes: u64 = page.iter().map(size).sum();
        assert!(page.len() == 1 || bytes <= max_bytes, "a page of several events stays within its bound");
    }
    assert_eq!(pages.concat(), whole, "the pages, one after the other, are the log");

    let request = |limit| ReadEventsRequest {
        conversation_id: "c1".into(),
        after_seq: 1,
        limit,
        max_bytes,
        ..Default::default()
    };
    let limited = store.read_events(request(2)).await.unwrap().events;
    assert_eq!(limited.iter().map(|event| event.seq).collect::<Vec<_>>(), [2, 3], "the tighter of the two bounds");
    let beyond = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 11, max_bytes, ..Default::default() };
    assert!(store.read_events(beyond).await.unwrap().events.is_empty(), "nothing after the log's end");
}

async fn an_event_is_found_by_its_deduplication_key(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    let other = create(store, "node-a", conversation("c2", "acme", "sales", 1)).await;
    append(store, fence, "c1", vec![message("m1", "hi"), message("m2", "there"), message("", "unkeyed")], None)
        .await
        .unwrap();
    append(store, other, "c2", vec![message("m3", "elsewhere")], None).await.unwrap();
    let find = |id: &str, key: &str, after_seq| {
        let request =
            ReadEventsRequest { conversation_id: id.into(), after_seq, dedupe_key: key.into(), ..Default::default() };
        async move { store.read_events(request).await.unwrap().events }
    };

    let found = find("c1", "m2", 0).await;
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].seq, found[0].payload_json.as_str()), (3, r#"{"body":"there"}"#));
    assert!(find("c1", "m3", 0).await.is_empty(), "another conversation's key is not this one's");
    assert!(find("c1", "m9", 0).await.is_empty(), "an unknown key finds nothing");
    assert!(find("c1", "m2", 3).await.is_empty(), "only after after_seq");
    assert_eq!(find("c1", "m1", 1).await[0].seq, 2);
}
