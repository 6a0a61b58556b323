//! Shared helpers of the store's tests: a store on a fixed clock, leases, records.
#![allow(dead_code)] // each test binary uses a different part

use std::path::Path;
use std::sync::Arc;

use switchboard_domain::{FixedClock, shard_of};
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AppendRequest, AppendResponse, ConversationRecord, ConversationUpdate,
    Fence, NewEvent,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_store::SqlStore;

pub const LEASE_MS: u64 = 10_000;
pub const START_MS: i64 = 1_700_000_000_000;

pub struct Harness {
    pub store: SqlStore,
    pub clock: Arc<FixedClock>,
}

pub async fn in_memory() -> Harness {
    let clock = Arc::new(FixedClock::new(START_MS));
    let store = SqlStore::open_in_memory(clock.clone()).await.unwrap();
    Harness { store, clock }
}

pub async fn on_file(path: &Path) -> Harness {
    let clock = Arc::new(FixedClock::new(START_MS));
    let store = SqlStore::open(path.to_str().unwrap(), clock.clone())
        .await
        .unwrap();
    Harness { store, clock }
}

pub fn shard_of_conversation(id: &str) -> u32 {
    shard_of(&format!("conversation/{id}")).0
}

/// Takes the lease of `shard` for `node` and returns its fence.
pub async fn fence(store: &SqlStore, node: &str, shard: u32) -> Fence {
    let response = store
        .acquire_shards(AcquireShardsRequest {
            node_id: node.into(),
            shards: vec![shard],
            lease_ms: LEASE_MS,
        })
        .await
        .unwrap();
    let lease = response
        .granted
        .iter()
        .find(|lease| lease.shard == shard)
        .expect("shard granted");
    Fence {
        shard,
        epoch: lease.epoch,
    }
}

pub fn conversation(id: &str, tenant: &str, group: &str, queued_at_ms: i64) -> ConversationRecord {
    ConversationRecord {
        id: id.into(),
        tenant_id: tenant.into(),
        group_id: group.into(),
        customer_name: "Carol".into(),
        first_question: "Where is my parcel?".into(),
        state: "queued".into(),
        owner_agent_id: String::new(),
        created_at_ms: queued_at_ms,
        queued_at_ms,
        accepted_at_ms: 0,
        closed_at_ms: 0,
        last_seq: 0,
        shard: shard_of_conversation(id),
        customer_token: format!("token-{id}"),
    }
}

pub fn message(client_msg_id: &str, body: &str) -> NewEvent {
    NewEvent {
        at_ms: START_MS,
        author_role: "customer".into(),
        author_id: String::new(),
        client_msg_id: client_msg_id.into(),
        kind: "message".into(),
        payload_json: format!(r#"{{"body":"{body}"}}"#),
    }
}

pub fn system_event(kind: &str) -> NewEvent {
    NewEvent {
        at_ms: START_MS,
        author_role: "system".into(),
        author_id: String::new(),
        client_msg_id: String::new(),
        kind: kind.into(),
        payload_json: "{}".into(),
    }
}

pub fn update(
    state: &str,
    owner: &str,
    accepted_at_ms: i64,
    closed_at_ms: i64,
) -> ConversationUpdate {
    ConversationUpdate {
        state: state.into(),
        owner_agent_id: owner.into(),
        accepted_at_ms,
        closed_at_ms,
    }
}

/// Creates `record` with a `created` event under a fresh lease of its shard for `node`.
pub async fn create(store: &SqlStore, node: &str, record: ConversationRecord) -> Fence {
    let fence = fence(store, node, record.shard).await;
    store
        .append(AppendRequest {
            fence: Some(fence),
            conversation_id: record.id.clone(),
            create: Some(record),
            events: vec![system_event("created")],
            update: None,
        })
        .await
        .unwrap();
    fence
}

pub async fn append(
    store: &SqlStore,
    fence: Fence,
    id: &str,
    events: Vec<NewEvent>,
    update: Option<ConversationUpdate>,
) -> Result<AppendResponse, StoreError> {
    store
        .append(AppendRequest {
            fence: Some(fence),
            conversation_id: id.into(),
            create: None,
            events,
            update,
        })
        .await
}
