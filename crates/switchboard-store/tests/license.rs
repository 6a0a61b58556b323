//! The cluster-wide license limit: a permit per unfinished conversation, taken by the append that creates
//! it and given back by the one that finishes it. Every scenario runs against each backend (see
//! `on_every_backend!`).

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AppendRequest, ConversationRecord, Fence, GetConversationRequest, GetLicenseRequest, License,
    ListConversationsRequest, ReadEventsRequest, SetLicenseLimitRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};

on_every_backend!(
    admits_up_to_the_limit_then_refuses_and_stores_nothing,
    finishing_gives_back_exactly_one_permit,
    a_duplicate_create_takes_no_second_permit,
    a_lowered_limit_refuses_until_enough_have_finished,
    used_is_the_number_of_unfinished_conversations,
    a_refused_create_does_not_fail_the_others_of_its_batch,
);

async fn license(store: &dyn StoreApi) -> License {
    store.get_license(GetLicenseRequest {}).await.unwrap()
}

async fn set_limit(store: &dyn StoreApi, max_sessions: u64) -> License {
    store.set_license_limit(SetLicenseLimitRequest { max_sessions }).await.unwrap()
}

/// The first append of a new conversation, under `fence`, with a customer message.
fn create_request(fence: Fence, record: ConversationRecord) -> AppendRequest {
    AppendRequest {
        fence: Some(fence),
        conversation_id: record.id.clone(),
        create: Some(record),
        events: vec![system_event("created"), message("first", "hello")],
        update: None,
    }
}

/// The fences of every shard, taken once (taking a lease again would fence off the earlier appends).
#[derive(Clone)]
struct Leases(Arc<HashMap<u32, u64>>);

impl Leases {
    async fn take(store: &dyn StoreApi) -> Leases {
        let request = AcquireShardsRequest { node_id: "node-a".into(), shards: vec![], lease_ms: LEASE_MS, limit: 0 };
        let granted = store.acquire_shards(request).await.unwrap().granted;
        assert_eq!(granted.len(), N_SHARDS as usize);
        Leases(Arc::new(granted.iter().map(|lease| (lease.shard, lease.epoch)).collect()))
    }

    fn fence(&self, record: &ConversationRecord) -> Fence {
        Fence { shard: record.shard, epoch: self.0[&record.shard] }
    }
}

/// Creates conversation `id` (group g1).
async fn try_create(store: &dyn StoreApi, leases: &Leases, id: &str) -> Result<Fence, StoreError> {
    let record = conversation(id, "acme", "g1", 1);
    let fence = leases.fence(&record);
    store.append(create_request(fence, record)).await.map(|_| fence)
}

async fn finish(store: &dyn StoreApi, fence: Fence, id: &str, state: &str) {
    let closing = Some(update(state, "", 0, 5));
    append(store, fence, id, vec![system_event(state)], closing).await.unwrap();
}

async fn exists(store: &dyn StoreApi, id: &str) -> bool {
    let request = GetConversationRequest { conversation_id: id.into() };
    store.get_conversation(request).await.unwrap().conversation.is_some()
}

async fn admits_up_to_the_limit_then_refuses_and_stores_nothing(h: Harness) {
    let store = h.store();
    let leases = Leases::take(store).await;
    assert_eq!(license(store).await, License { max_sessions: 0, used: 0 }, "unlimited until configured");
    assert_eq!(set_limit(store, 3).await, License { max_sessions: 3, used: 0 });
    for id in ["c1", "c2", "c3"] {
        try_create(store, &leases, id).await.unwrap();
    }
    assert_eq!(license(store).await, License { max_sessions: 3, used: 3 });

    assert_eq!(try_create(store, &leases, "c4").await, Err(StoreError::LicenseExhausted { max_sessions: 3 }));
    assert!(!exists(store, "c4").await, "a refused create stores no conversation");
    let read = ReadEventsRequest { conversation_id: "c4".into(), after_seq: 0, ..Default::default() };
    assert!(store.read_events(read).await.unwrap().events.is_empty(), "nor events");
    assert_eq!(license(store).await.used, 3);

    // A create that is refused for another reason takes no permit either, even with a free one.
    set_limit(store, 10).await;
    let record = conversation("c5", "acme", "g1", 1);
    let stale = fence(store, "node-a", record.shard).await;
    fence(store, "node-a", record.shard).await;
    let refused = store.append(create_request(stale, record)).await;
    assert!(matches!(refused, Err(StoreError::StaleEpoch { .. })), "{refused:?}");
    assert_eq!(license(store).await.used, 3);
}

async fn finishing_gives_back_exactly_one_permit(h: Harness) {
    let store = h.store();
    let leases = Leases::take(store).await;
    set_limit(store, 2).await;
    let f1 = try_create(store, &leases, "c1").await.unwrap();
    let f2 = try_create(store, &leases, "c2").await.unwrap();
    assert_eq!(try_create(store, &leases, "c3").await, Err(StoreError::LicenseExhausted { max_sessions: 2 }));

    // Accepting keeps the permit; closing gives it back, once.
    append(store, f1, "c1", vec![system_event("accepted")], Some(update("active", "alice", 3, 0))).await.unwrap();
    assert_eq!(license(store).await.used, 2);
    finish(store, f1, "c1", "closed").await;
    assert_eq!(license(store).await.used, 1);
    finish(store, f1, "c1", "closed").await;
    assert_eq!(license(store).await.used, 1, "closing twice gives back one permit");
    // A retried close (its client message id already stored) changes nothing either.
    let close = || Some(update("closed", "alice", 3, 6));
    append(store, f2, "c2", vec![message("bye", "bye")], None).await.unwrap();
    let retry = append(store, f2, "c2", vec![message("bye", "bye")], close()).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(license(store).await.used, 1);
    // An update that keeps the state gives nothing back.
    append(store, f2, "c2", vec![], Some(update("", "", 0, 0))).await.unwrap();
    assert_eq!(license(store).await.used, 1);

    // The freed permit admits one more, no more.
    let f3 = try_create(store, &leases, "c3").await.unwrap();
    assert_eq!(try_create(store, &leases, "c4").await, Err(StoreError::LicenseExhausted { max_sessions: 2 }));
    // Cancelling a waiting chat gives its permit back too.
    finish(store, f3, "c3", "cancelled").await;
    finish(store, f2, "c2", "cancelled").await;
    assert_eq!(license(store).await.used, 0);
    try_create(store, &leases, "c4").await.unwrap();
    assert_eq!(license(store).await, License { max_sessions: 2, used: 1 });
}

async fn a_duplicate_create_takes_no_second_permit(h: Harness) {
    let store = h.store();
    let leases = Leases::take(store).await;
    set_limit(store, 2).await;
    let record = conversation("c1", "acme", "g1", 1);
    let fence = leases.fence(&record);
    let first = store.append(create_request(fence, record.clone())).await.unwrap();
    assert!(!first.duplicate);

    // The same create again (a retry): the stored message is answered, no permit taken.
    let retry = store.append(create_request(fence, record.clone())).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(license(store).await.used, 1);
    // A create of an existing conversation with new events appends them, without a permit.
    let again = AppendRequest { events: vec![message("second", "still there?")], ..create_request(fence, record) };
    assert!(!store.append(again).await.unwrap().duplicate);
    assert_eq!(license(store).await.used, 1);

    try_create(store, &leases, "c2").await.unwrap();
    assert_eq!(try_create(store, &leases, "c3").await, Err(StoreError::LicenseExhausted { max_sessions: 2 }));
}

async fn a_lowered_limit_refuses_until_enough_have_finished(h: Harness) {
    let store = h.store();
    let leases = Leases::take(store).await;
    let mut fences = Vec::new();
    for id in ["c1", "c2", "c3"] {
        fences.push((id, try_create(store, &leases, id).await.unwrap()));
    }
    assert_eq!(license(store).await, License { max_sessions: 0, used: 3 }, "unlimited, still counted");

    // Below what is used: nothing is evicted, new chats wait until used < max.
    assert_eq!(set_limit(store, 2).await, License { max_sessions: 2, used: 3 });
    assert!(exists(store, "c3").await);
    assert_eq!(try_create(store, &leases, "n1").await, Err(StoreError::LicenseExhausted { max_sessions: 2 }));
    let (id, fence) = fences[0];
    finish(store, fence, id, "closed").await;
    assert_eq!(try_create(store, &leases, "n1").await, Err(StoreError::LicenseExhausted { max_sessions: 2 }), "2 of 2");
    let (id, fence) = fences[1];
    finish(store, fence, id, "closed").await;
    try_create(store, &leases, "n1").await.unwrap();
    assert_eq!(license(store).await, License { max_sessions: 2, used: 2 });

    // Raised, then unlimited again.
    set_limit(store, 3).await;
    try_create(store, &leases, "n2").await.unwrap();
    assert_eq!(try_create(store, &leases, "n3").await, Err(StoreError::LicenseExhausted { max_sessions: 3 }));
    assert_eq!(set_limit(store, 0).await, License { max_sessions: 0, used: 3 });
    try_create(store, &leases, "n3").await.unwrap();
    assert_eq!(license(store).await.used, 4);
    let too_big = store.set_license_limit(SetLicenseLimitRequest { max_sessions: u64::MAX }).await;
    assert!(matches!(too_big, Err(StoreError::Invalid(_))), "{too_big:?}");
    assert_eq!(license(store).await.max_sessions, 0, "a refused limit changes nothing");
}

async fn unfinished(store: &dyn StoreApi) -> u64 {
    let request = ListConversationsRequest { states: vec!["queued".into(), "active".into()], ..Default::default() };
    store.list_conversations(request).await.unwrap().conversations.len() as u64
}

async fn used_is_the_number_of_unfinished_conversations(h: Harness) {
    let store = h.store();
    let leases = Leases::take(store).await;
    set_limit(store, 100).await;
    let mut fences = Vec::new();
    for i in 0..6 {
        let id = format!("c{i}");
        fences.push((id.clone(), try_create(store, &leases, &id).await.unwrap()));
        assert_eq!(license(store).await.used, unfinished(store).await);
    }
    // A conversation stored already finished holds no permit.
    let record = ConversationRecord { state: "cancelled".into(), ..conversation("gone", "acme", "g1", 1) };
    store.append(create_request(leases.fence(&record), record)).await.unwrap();
    // Created and closed in one append: taken and given back.
    let record = conversation("brief", "acme", "g1", 1);
    let fence = leases.fence(&record);
    let brief = AppendRequest { update: Some(update("closed", "", 0, 2)), ..create_request(fence, record) };
    store.append(brief).await.unwrap();
    assert_eq!(license(store).await.used, unfinished(store).await);

    for (i, (id, fence)) in fences.iter().enumerate() {
        let step = match i % 3 {
            0 => update("active", "alice", 3, 0),
            1 => update("closed", "", 0, 4),
            _ => update("cancelled", "", 0, 4),
        };
        append(store, *fence, id, vec![system_event("step")], Some(step)).await.unwrap();
        assert_eq!(license(store).await.used, unfinished(store).await, "after {id}");
    }
    // Requeued (active → queued) keeps its permit.
    let (id, fence) = &fences[0];
    append(store, *fence, id, vec![system_event("requeued")], Some(update("queued", "", 0, 0))).await.unwrap();
    assert_eq!(license(store).await, License { max_sessions: 100, used: 2 });
    assert_eq!(unfinished(store).await, 2);
}

/// Creates racing for the last permits, group-committed together: each refused one gets its own refusal,
/// the others are stored.
async fn a_refused_create_does_not_fail_the_others_of_its_batch(h: Harness) {
    let store = h.store.clone();
    set_limit(store.as_ref(), 4).await;
    let leases = Leases::take(store.as_ref()).await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (store, leases) = (store.clone(), leases.clone());
            tokio::spawn(async move {
                let record = conversation(&format!("r{i}"), "acme", "g1", i);
                store.append(create_request(leases.fence(&record), record)).await
            })
        })
        .collect();
    let (mut admitted, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => {
                assert_eq!((response.duplicate, response.last_seq), (false, 2));
                admitted += 1;
            }
            Err(StoreError::LicenseExhausted { max_sessions: 4 }) => refused += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((admitted, refused), (4, 8));
    assert_eq!(license(store.as_ref()).await, License { max_sessions: 4, used: 4 });
    assert_eq!(unfinished(store.as_ref()).await, 4);
}
