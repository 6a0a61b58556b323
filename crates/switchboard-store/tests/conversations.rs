//! Conversation lookups and the filtered lists.

mod common;

use common::*;
use switchboard_proto::internal::v1::{GetConversationRequest, ListConversationsRequest};
use switchboard_proto::store::StoreApi;
use switchboard_store::SqlStore;

async fn ids(store: &SqlStore, request: ListConversationsRequest) -> Vec<String> {
    let response = store.list_conversations(request).await.unwrap();
    response
        .conversations
        .into_iter()
        .map(|conversation| conversation.id)
        .collect()
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|&value| value.to_owned()).collect()
}

/// acme: queued c1 (g1, t=30), c2 (g2, t=10), c3 (g3, t=5), c7 (g1, t=30); active c4 (alice);
/// closed c5 (alice, closed t=100), c6 (bob, closed t=200). globex: queued o1 (g1, t=1).
async fn seeded() -> Harness {
    let harness = in_memory().await;
    let store = &harness.store;
    for (id, group, queued_at) in [
        ("c1", "g1", 30),
        ("c2", "g2", 10),
        ("c3", "g3", 5),
        ("c7", "g1", 30),
    ] {
        create(store, "node-a", conversation(id, "acme", group, queued_at)).await;
    }
    create(store, "node-a", conversation("o1", "globex", "g1", 1)).await;
    let fence = create(store, "node-a", conversation("c4", "acme", "g1", 2)).await;
    append(
        store,
        fence,
        "c4",
        vec![system_event("accepted")],
        Some(update("active", "alice", 3, 0)),
    )
    .await
    .unwrap();
    for (id, owner, closed_at) in [("c5", "alice", 100), ("c6", "bob", 200)] {
        let fence = create(store, "node-a", conversation(id, "acme", "g2", 2)).await;
        let closed = Some(update("closed", owner, 3, closed_at));
        append(store, fence, id, vec![system_event("closed")], closed)
            .await
            .unwrap();
    }
    harness
}

#[tokio::test]
async fn a_tenants_waiting_queue_is_first_come_first_served() {
    let Harness { store, .. } = seeded().await;
    let request = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["queued"]),
        group_ids: strings(&["g1", "g2"]),
        ..Default::default()
    };
    assert_eq!(
        ids(&store, request.clone()).await,
        ["c2", "c1", "c7"],
        "by queue time, then id"
    );
    let limited = ListConversationsRequest {
        limit: 2,
        ..request
    };
    assert_eq!(ids(&store, limited).await, ["c2", "c1"]);

    let every_group = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["queued"]),
        ..Default::default()
    };
    assert_eq!(ids(&store, every_group).await, ["c3", "c2", "c1", "c7"]);
}

#[tokio::test]
async fn an_agents_active_conversations() {
    let Harness { store, .. } = seeded().await;
    let request = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["active"]),
        owner_agent_id: "alice".into(),
        ..Default::default()
    };
    assert_eq!(ids(&store, request).await, ["c4"]);
    let any_state = ListConversationsRequest {
        tenant_id: "acme".into(),
        owner_agent_id: "alice".into(),
        ..Default::default()
    };
    assert_eq!(ids(&store, any_state).await, ["c4", "c5"]);
}

#[tokio::test]
async fn closed_history_is_newest_first() {
    let Harness { store, .. } = seeded().await;
    let request = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["closed", "cancelled"]),
        newest_first: true,
        ..Default::default()
    };
    assert_eq!(ids(&store, request).await, ["c6", "c5"]);
}

#[tokio::test]
async fn filters_by_shard_across_tenants() {
    let Harness { store, .. } = seeded().await;
    let shard = shard_of_conversation("o1");
    let request = ListConversationsRequest {
        shards: vec![shard],
        ..Default::default()
    };
    let found = store
        .list_conversations(request)
        .await
        .unwrap()
        .conversations;
    assert!(found.iter().any(|conversation| conversation.id == "o1"));
    assert!(found.iter().all(|conversation| conversation.shard == shard));
    let everything = ids(&store, ListConversationsRequest::default()).await;
    assert_eq!(everything.len(), 8);
    let other_tenant = ListConversationsRequest {
        tenant_id: "globex".into(),
        ..Default::default()
    };
    assert_eq!(ids(&store, other_tenant).await, ["o1"]);
}

#[tokio::test]
async fn get_returns_the_whole_record_or_nothing() {
    let Harness { store, .. } = seeded().await;
    let request = GetConversationRequest {
        conversation_id: "c5".into(),
    };
    let record = store
        .get_conversation(request)
        .await
        .unwrap()
        .conversation
        .unwrap();
    let expected = switchboard_proto::internal::v1::ConversationRecord {
        state: "closed".into(),
        owner_agent_id: "alice".into(),
        accepted_at_ms: 3,
        closed_at_ms: 100,
        last_seq: 2,
        ..conversation("c5", "acme", "g2", 2)
    };
    assert_eq!(record, expected);
    let missing = GetConversationRequest {
        conversation_id: "nope".into(),
    };
    assert_eq!(
        store.get_conversation(missing).await.unwrap().conversation,
        None
    );
}
