//! Conversation lookups and the filtered lists. Every scenario runs against each backend (see
//! `on_every_backend!`).

mod common;

use common::*;
use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{
    ConversationRecord, ConversationUpdate, GetConversationRequest, ListConversationsRequest, ListCursor,
};
use switchboard_proto::store::{StoreApi, StoreError, list_all_conversations};

on_every_backend!(
    a_tenants_waiting_queue_is_first_come_first_served,
    an_agents_active_conversations,
    owner_and_state_filters_combine_and_follow_the_updates,
    closed_history_is_newest_first,
    closed_lists_are_ordered_by_closing_time_newest_first,
    filters_by_shard_across_tenants,
    get_returns_the_whole_record_or_nothing,
    offer_fields_round_trip_and_each_update_replaces_them,
    a_group_change_moves_the_chat_to_its_new_queue,
    a_list_is_read_a_page_at_a_time_in_its_order,
    delivery_marks_are_kept_by_the_updates_and_left_by_the_other_appends,
    whether_the_customer_is_away_is_kept_until_an_update_says_otherwise,
);

async fn ids(store: &dyn StoreApi, request: ListConversationsRequest) -> Vec<String> {
    let response = store.list_conversations(request).await.unwrap();
    response.conversations.into_iter().map(|conversation| conversation.id).collect()
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|&value| value.to_owned()).collect()
}

fn owned_by(tenant: &str, owner: &str, states: &[&str]) -> ListConversationsRequest {
    ListConversationsRequest {
        tenant_id: tenant.into(),
        owner_agent_id: owner.into(),
        states: strings(states),
        ..Default::default()
    }
}

/// acme: queued c1 (g1, t=30), c2 (g2, t=10), c3 (g3, t=5), c7 (g1, t=30); active c4 (alice);
/// closed c5 (alice, closed t=100), c6 (bob, closed t=200). globex: queued o1 (g1, t=1).
async fn seed(store: &dyn StoreApi) {
    for (id, group, queued_at) in [("c1", "g1", 30), ("c2", "g2", 10), ("c3", "g3", 5), ("c7", "g1", 30)] {
        create(store, "node-a", conversation(id, "acme", group, queued_at)).await;
    }
    create(store, "node-a", conversation("o1", "globex", "g1", 1)).await;
    let fence = create(store, "node-a", conversation("c4", "acme", "g1", 2)).await;
    append(store, fence, "c4", vec![system_event("accepted")], Some(update("active", "alice", 3, 0))).await.unwrap();
    for (id, owner, closed_at) in [("c5", "alice", 100), ("c6", "bob", 200)] {
        let fence = create(store, "node-a", conversation(id, "acme", "g2", 2)).await;
        let closed = Some(update("closed", owner, 3, closed_at));
        append(store, fence, id, vec![system_event("closed")], closed).await.unwrap();
    }
}

async fn a_tenants_waiting_queue_is_first_come_first_served(h: Harness) {
    let store = h.store();
    seed(store).await;
    let request = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["queued"]),
        group_ids: strings(&["g1", "g2"]),
        ..Default::default()
    };
    assert_eq!(ids(store, request.clone()).await, ["c2", "c1", "c7"], "by queue time, then id");
    let limited = ListConversationsRequest { limit: 2, ..request };
    assert_eq!(ids(store, limited).await, ["c2", "c1"]);

    let every_group =
        ListConversationsRequest { tenant_id: "acme".into(), states: strings(&["queued"]), ..Default::default() };
    assert_eq!(ids(store, every_group).await, ["c3", "c2", "c1", "c7"]);
}

/// A list longer than a message should hold is read a page at a time after the last conversation of the
/// page before (by queue time, then id: c1 and c7 were queued at the same moment).
async fn a_list_is_read_a_page_at_a_time_in_its_order(h: Harness) {
    let store = h.store();
    seed(store).await;
    let waiting =
        ListConversationsRequest { tenant_id: "acme".into(), states: strings(&["queued"]), ..Default::default() };
    let whole = ids(store, waiting.clone()).await;
    assert_eq!(whole, ["c3", "c2", "c1", "c7"]);
    for page in [1, 2, 3, 4, 100] {
        let paged = list_all_conversations(store, waiting.clone(), page).await.unwrap();
        assert_eq!(paged.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), whole, "pages of {page}");
    }
    let after = |queued_at_ms, id: &str| ListConversationsRequest {
        after: Some(ListCursor { queued_at_ms, id: id.into() }),
        limit: 2,
        ..waiting.clone()
    };
    assert_eq!(ids(store, after(10, "c2")).await, ["c1", "c7"]);
    assert_eq!(ids(store, after(30, "c1")).await, ["c7"], "the same queue time, a later id");
    assert_eq!(ids(store, after(30, "c7")).await, Vec::<String>::new());
    let newest_first = ListConversationsRequest { newest_first: true, ..after(10, "c2") };
    assert!(matches!(store.list_conversations(newest_first).await, Err(StoreError::Invalid(_))));

    // A bound on the answer's bytes ends it early, one record at least, and says so.
    let one = prost::Message::encoded_len(&store.list_conversations(waiting.clone()).await.unwrap().conversations[0]);
    let bounded = |max_bytes: usize| ListConversationsRequest { max_bytes: max_bytes as u64, ..waiting.clone() };
    for (max_bytes, expected) in [(1, 1), (one, 1), (2 * one + 1, 2)] {
        let answer = store.list_conversations(bounded(max_bytes)).await.unwrap();
        assert_eq!((answer.conversations.len(), answer.more), (expected, true), "at most {max_bytes} bytes");
    }
    let roomy = store.list_conversations(bounded(100 * one)).await.unwrap();
    assert_eq!((roomy.conversations.len(), roomy.more), (4, false));
    let limited = store.list_conversations(ListConversationsRequest { limit: 2, ..bounded(100 * one) }).await.unwrap();
    assert_eq!((limited.conversations.len(), limited.more), (2, false), "ended by its limit, not its bytes");
}

async fn an_agents_active_conversations(h: Harness) {
    let store = h.store();
    seed(store).await;
    let request = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["active"]),
        owner_agent_id: "alice".into(),
        ..Default::default()
    };
    assert_eq!(ids(store, request).await, ["c4"]);
    let any_state =
        ListConversationsRequest { tenant_id: "acme".into(), owner_agent_id: "alice".into(), ..Default::default() };
    assert_eq!(ids(store, any_state).await, ["c4", "c5"]);
}

/// The router lists an agent's conversations in some states (its open chats, its closed history); the
/// owner comes from the append updates, so a transfer moves the conversation from one list to the other.
async fn owner_and_state_filters_combine_and_follow_the_updates(h: Harness) {
    let store = h.store();
    seed(store).await;
    assert_eq!(ids(store, owned_by("acme", "alice", &["closed"])).await, ["c5"]);
    assert_eq!(ids(store, owned_by("acme", "alice", &["active", "closed"])).await, ["c4", "c5"]);
    assert_eq!(ids(store, owned_by("acme", "alice", &["queued", "cancelled"])).await, Vec::<String>::new());
    assert_eq!(ids(store, owned_by("acme", "bob", &["active"])).await, Vec::<String>::new());
    assert_eq!(ids(store, owned_by("acme", "bob", &["closed"])).await, ["c6"]);
    assert_eq!(ids(store, owned_by("", "alice", &["active"])).await, ["c4"], "without a tenant");
    assert_eq!(ids(store, owned_by("globex", "alice", &[])).await, Vec::<String>::new(), "another tenant's");

    // A transfer to bob.
    let shard = shard_of_conversation("c4");
    let fence = fence(store, "node-a", shard).await;
    append(store, fence, "c4", vec![system_event("transferred")], Some(update("active", "bob", 3, 0))).await.unwrap();
    assert_eq!(ids(store, owned_by("acme", "alice", &["active"])).await, Vec::<String>::new());
    assert_eq!(ids(store, owned_by("acme", "bob", &["active"])).await, ["c4"]);
    assert_eq!(ids(store, owned_by("acme", "bob", &["active", "closed"])).await, ["c4", "c6"]);

    // Requeued: nobody owns it, and the queue has it again.
    append(store, fence, "c4", vec![system_event("requeued")], Some(update("queued", "", 0, 0))).await.unwrap();
    assert_eq!(ids(store, owned_by("acme", "bob", &["active", "queued"])).await, Vec::<String>::new());
    let queue = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["queued"]),
        group_ids: strings(&["g1"]),
        ..Default::default()
    };
    assert_eq!(ids(store, queue).await, ["c4", "c1", "c7"], "by its original queue time");
}

async fn closed_history_is_newest_first(h: Harness) {
    let store = h.store();
    seed(store).await;
    let request = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["closed", "cancelled"]),
        newest_first: true,
        ..Default::default()
    };
    assert_eq!(ids(store, request).await, ["c6", "c5"]);
}

/// Newest first orders by closing time, then creation time, then id, all descending: never by queue time
/// or id alone. Here the three orders disagree.
async fn closed_lists_are_ordered_by_closing_time_newest_first(h: Harness) {
    let store = h.store();
    // (id, created_at, queued_at, state, owner, closed_at)
    let closed = [
        ("x1", 10, 90, "closed", "alice", 300),
        ("x2", 20, 80, "closed", "alice", 100),
        ("x3", 30, 70, "closed", "bob", 200),
        ("x4", 5, 95, "closed", "alice", 200),
        ("x5", 30, 70, "cancelled", "", 200),
    ];
    for (id, created_at_ms, queued_at_ms, state, owner, closed_at_ms) in closed {
        let record = ConversationRecord { created_at_ms, queued_at_ms, ..conversation(id, "acme", "g1", 0) };
        let fence = create(store, "node-a", record).await;
        let accepted_at_ms = if owner.is_empty() { 0 } else { queued_at_ms + 1 };
        let closing = Some(update(state, owner, accepted_at_ms, closed_at_ms));
        append(store, fence, id, vec![system_event(state)], closing).await.unwrap();
    }
    create(store, "node-a", conversation("q1", "acme", "g1", 1)).await;

    let history = ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["closed", "cancelled"]),
        newest_first: true,
        ..Default::default()
    };
    assert_eq!(ids(store, history.clone()).await, ["x1", "x5", "x3", "x4", "x2"]);
    let latest = ListConversationsRequest { limit: 2, ..history.clone() };
    assert_eq!(ids(store, latest).await, ["x1", "x5"], "the limit keeps the newest");
    let alices = ListConversationsRequest { owner_agent_id: "alice".into(), ..history.clone() };
    assert_eq!(ids(store, alices).await, ["x1", "x4", "x2"]);
    let alices_latest = ListConversationsRequest { owner_agent_id: "alice".into(), limit: 1, ..history.clone() };
    assert_eq!(ids(store, alices_latest).await, ["x1"]);

    // Oldest first is by queue time, then id.
    let oldest_first = ListConversationsRequest { newest_first: false, ..history };
    assert_eq!(ids(store, oldest_first).await, ["x3", "x5", "x2", "x1", "x4"]);
    // Open conversations (closed_at 0) come last in a newest-first list of every state.
    let everything = ListConversationsRequest { tenant_id: "acme".into(), newest_first: true, ..Default::default() };
    assert_eq!(ids(store, everything).await, ["x1", "x5", "x3", "x4", "x2", "q1"]);
}

async fn filters_by_shard_across_tenants(h: Harness) {
    let store = h.store();
    seed(store).await;
    let shard = shard_of_conversation("o1");
    let request = ListConversationsRequest { shards: vec![shard], ..Default::default() };
    let found = store.list_conversations(request).await.unwrap().conversations;
    assert!(found.iter().any(|conversation| conversation.id == "o1"));
    assert!(found.iter().all(|conversation| conversation.shard == shard));
    let everything = ids(store, ListConversationsRequest::default()).await;
    assert_eq!(everything.len(), 8);
    let other_tenant = ListConversationsRequest { tenant_id: "globex".into(), ..Default::default() };
    assert_eq!(ids(store, other_tenant).await, ["o1"]);

    // Several shards: exactly the conversations on any of them.
    let shards = vec![shard_of_conversation("c1"), shard_of_conversation("c6")];
    let request = ListConversationsRequest { shards: shards.clone(), ..Default::default() };
    let found = ids(store, request).await;
    let mut expected: Vec<&str> = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "o1"]
        .into_iter()
        .filter(|id| shards.contains(&shard_of_conversation(id)))
        .collect();
    expected.sort_by_key(|&id| (seeded_queued_at(id), id));
    assert_eq!(found, expected);

    let request = ListConversationsRequest { shards: vec![shard, N_SHARDS], ..Default::default() };
    assert!(matches!(store.list_conversations(request).await, Err(StoreError::Invalid(_))));
}

/// The queue time of a seeded conversation.
fn seeded_queued_at(id: &str) -> i64 {
    match id {
        "c1" | "c7" => 30,
        "c2" => 10,
        "c3" => 5,
        "o1" => 1,
        _ => 2,
    }
}

async fn get_returns_the_whole_record_or_nothing(h: Harness) {
    let store = h.store();
    seed(store).await;
    let request = GetConversationRequest { conversation_id: "c5".into() };
    let record = store.get_conversation(request).await.unwrap().conversation.unwrap();
    let expected = ConversationRecord {
        state: "closed".into(),
        owner_agent_id: "alice".into(),
        accepted_at_ms: 3,
        closed_at_ms: 100,
        last_seq: 2,
        ..conversation("c5", "acme", "g2", 2)
    };
    assert_eq!(record, expected);
    let missing = GetConversationRequest { conversation_id: "nope".into() };
    assert_eq!(store.get_conversation(missing).await.unwrap().conversation, None);
}

fn offered(tenant: &str, agent: &str) -> ListConversationsRequest {
    ListConversationsRequest {
        tenant_id: tenant.into(),
        states: strings(&["queued"]),
        offer_agent_id: agent.into(),
        ..Default::default()
    }
}

/// The summary keeps each side's delivery mark, so that a conversation's actor starts without reading its
/// whole log: an update sets them, an append without one (a message) leaves them, and an update without them
/// (from a router before they were kept) makes them not known.
async fn delivery_marks_are_kept_by_the_updates_and_left_by_the_other_appends(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "g1", 1)).await;
    let marks = |record: &ConversationRecord| {
        (record.delivery_marks_known, record.customer_delivered_up_to, record.agent_delivered_up_to)
    };
    assert_eq!(marks(&get(store, "c1").await), (true, 0, 0), "a new chat: none yet");
    let delivered = ConversationUpdate {
        customer_delivered_up_to: 3,
        agent_delivered_up_to: 2,
        delivery_marks_known: true,
        ..Default::default()
    };
    append(store, fence, "c1", vec![system_event("delivered")], Some(delivered)).await.unwrap();
    assert_eq!(marks(&get(store, "c1").await), (true, 3, 2));
    append(store, fence, "c1", vec![system_event("message")], None).await.unwrap();
    let stored = get(store, "c1").await;
    assert_eq!((marks(&stored), stored.last_seq, stored.state.as_str()), ((true, 3, 2), 3, "queued"), "kept");
    let waiting =
        ListConversationsRequest { tenant_id: "acme".into(), states: strings(&["queued"]), ..Default::default() };
    assert_eq!(store.list_conversations(waiting).await.unwrap().conversations, [stored], "lists have them too");
    let from_before = ConversationUpdate { delivery_marks_known: false, ..update("queued", "", 0, 0) };
    append(store, fence, "c1", vec![system_event("offered")], Some(from_before)).await.unwrap();
    assert_eq!(marks(&get(store, "c1").await), (false, 0, 0), "an update without them");
}

/// The summary says whether the customer left the ongoing chat, so that its actor knows whether a customer
/// who connects again returns: an update sets it; an append without an update, or an update without it (from
/// a router before it was kept), leaves it.
async fn whether_the_customer_is_away_is_kept_until_an_update_says_otherwise(h: Harness) {
    let store = h.store();
    let fence = create(store, "node-a", conversation("c1", "acme", "g1", 1)).await;
    assert!(!get(store, "c1").await.customer_away, "a new chat's customer is there");
    let left = ConversationUpdate { customer_away: Some(true), ..update("active", "alice", 5, 0) };
    append(store, fence, "c1", vec![system_event("customer_left")], Some(left)).await.unwrap();
    assert!(get(store, "c1").await.customer_away);
    append(store, fence, "c1", vec![system_event("message")], None).await.unwrap();
    let from_before = update("active", "alice", 5, 0);
    append(store, fence, "c1", vec![system_event("delivered")], Some(from_before)).await.unwrap();
    let stored = get(store, "c1").await;
    assert!(stored.customer_away, "kept by an append without it");
    let active =
        ListConversationsRequest { tenant_id: "acme".into(), states: strings(&["active"]), ..Default::default() };
    assert_eq!(store.list_conversations(active).await.unwrap().conversations, [stored], "lists have it too");
    let back = ConversationUpdate { customer_away: Some(false), ..update("active", "alice", 5, 0) };
    append(store, fence, "c1", vec![system_event("customer_returned")], Some(back)).await.unwrap();
    assert!(!get(store, "c1").await.customer_away);
}

/// The outstanding offer of a waiting chat is part of its summary: given at the create, replaced by every
/// update (an update without an offer clears it), and listed by the agent it is offered to.
async fn offer_fields_round_trip_and_each_update_replaces_them(h: Harness) {
    let store = h.store();
    let record = ConversationRecord {
        offer_agent_id: "alice".into(),
        offer_expires_at_ms: 1_000,
        offered_to: strings(&["zoe"]),
        ..conversation("c1", "acme", "g1", 1)
    };
    let fence = create(store, "node-a", record.clone()).await;
    assert_eq!(get(store, "c1").await, ConversationRecord { last_seq: 1, ..record });
    create(store, "node-a", conversation("c2", "acme", "g1", 2)).await;
    assert_eq!(ids(store, offered("acme", "alice")).await, ["c1"]);

    let offer = ConversationUpdate {
        state: "queued".into(),
        offer_agent_id: "bob".into(),
        offer_expires_at_ms: 2_000,
        offered_to: strings(&["zoe", "alice"]),
        ..Default::default()
    };
    append(store, fence, "c1", vec![system_event("offered")], Some(offer)).await.unwrap();
    let stored = get(store, "c1").await;
    assert_eq!(
        (stored.offer_agent_id.as_str(), stored.offer_expires_at_ms, stored.offered_to.clone()),
        ("bob", 2_000, strings(&["zoe", "alice"]))
    );
    assert_eq!((stored.group_id.as_str(), stored.queued_at_ms), ("g1", 1), "kept: empty group, queue time 0");
    assert_eq!(ids(store, offered("acme", "alice")).await, Vec::<String>::new());
    assert_eq!(ids(store, offered("acme", "bob")).await, ["c1"]);
    assert_eq!(ids(store, offered("globex", "bob")).await, Vec::<String>::new());
    assert_eq!(ids(store, offered("", "bob")).await, ["c1"], "without a tenant");
    let listed = store.list_conversations(offered("acme", "bob")).await.unwrap().conversations;
    assert_eq!(listed, [stored], "lists return the offer fields too");

    // An update without an offer (the offer ended) clears it.
    append(store, fence, "c1", vec![system_event("offer_ended")], Some(update("queued", "", 0, 0))).await.unwrap();
    let stored = get(store, "c1").await;
    assert_eq!((stored.offer_agent_id.as_str(), stored.offer_expires_at_ms), ("", 0));
    assert!(stored.offered_to.is_empty());
    assert_eq!(ids(store, offered("acme", "bob")).await, Vec::<String>::new());
}

/// A transfer to another group: the chat leaves its old queue and waits in the new one, at the queue time
/// the update gives it.
async fn a_group_change_moves_the_chat_to_its_new_queue(h: Harness) {
    let store = h.store();
    seed(store).await;
    let queue = |group: &str| ListConversationsRequest {
        tenant_id: "acme".into(),
        states: strings(&["queued"]),
        group_ids: strings(&[group]),
        ..Default::default()
    };
    assert_eq!(ids(store, queue("g1")).await, ["c1", "c7"]);
    assert_eq!(ids(store, queue("g2")).await, ["c2"]);

    let shard = shard_of_conversation("c7");
    let fence = fence(store, "node-a", shard).await;
    let transfer =
        ConversationUpdate { state: "queued".into(), group_id: "g2".into(), queued_at_ms: 3, ..Default::default() };
    append(store, fence, "c7", vec![system_event("transferred")], Some(transfer)).await.unwrap();
    assert_eq!(ids(store, queue("g1")).await, ["c1"]);
    assert_eq!(ids(store, queue("g2")).await, ["c7", "c2"], "by its new queue time");
    let stored = get(store, "c7").await;
    assert_eq!((stored.group_id.as_str(), stored.queued_at_ms), ("g2", 3));

    // An update from an older caller (no group, no queue time) keeps both.
    append(store, fence, "c7", vec![], Some(update("queued", "", 0, 0))).await.unwrap();
    let stored = get(store, "c7").await;
    assert_eq!((stored.group_id.as_str(), stored.queued_at_ms), ("g2", 3));
    assert_eq!(ids(store, queue("g2")).await, ["c7", "c2"]);
}
