//! What the store benchmarks share: conversations in a store, with fences it accepts, and their appends.

#![allow(dead_code)] // each bench uses a part

use switchboard_domain::shard_of;
use switchboard_proto::internal::v1::{AcquireShardsRequest, AppendRequest, ConversationRecord, Fence, NewEvent};
use switchboard_proto::store::StoreApi;
use tokio::runtime::Runtime;

/// Appends per iteration: one message to each of this many conversations.
pub const APPENDS: usize = 64;
pub const START_MS: i64 = 1_767_225_600_000;
const NODE: &str = "bench-node";
/// Long enough that no lease expires during a run (the store's clock is fixed anyway).
const LEASE_MS: u64 = 3_600_000;

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn record(id: &str) -> ConversationRecord {
    ConversationRecord {
        id: id.into(),
        tenant_id: "bench".into(),
        group_id: "g0".into(),
        customer_name: "Carol".into(),
        first_question: "Where is my parcel?".into(),
        state: "queued".into(),
        created_at_ms: START_MS,
        queued_at_ms: START_MS,
        shard: shard_of(&format!("conversation/{id}")).0,
        customer_token: format!("token-{id}"),
        ..Default::default()
    }
}

fn event(kind: &str, client_msg_id: &str, payload_json: String) -> NewEvent {
    NewEvent {
        at_ms: START_MS,
        author_role: "customer".into(),
        author_id: String::new(),
        client_msg_id: client_msg_id.into(),
        kind: kind.into(),
        payload_json,
    }
}

async fn acquire(store: &dyn StoreApi, shards: Vec<u32>) -> Vec<(u32, u64)> {
    let request = AcquireShardsRequest { node_id: NODE.into(), shards, lease_ms: LEASE_MS, limit: 0 };
    store.acquire_shards(request).await.unwrap().granted.iter().map(|lease| (lease.shard, lease.epoch)).collect()
}

/// Creates `APPENDS` queued conversations in `store`; answers a fence of each that the store accepts.
pub async fn conversations(store: &dyn StoreApi) -> Vec<(String, Fence)> {
    let ids: Vec<String> = (0..APPENDS).map(|i| format!("bench-{i}")).collect();
    for id in &ids {
        let record = record(id);
        let (shard, epoch) = acquire(store, vec![record.shard]).await[0];
        let request = AppendRequest {
            fence: Some(Fence { shard, epoch }),
            conversation_id: id.clone(),
            create: Some(record),
            events: vec![event("created", "", "{}".into())],
            update: None,
        };
        store.append(request).await.unwrap();
    }
    // Each create took its shard again (a new epoch): take every shard once more, for fences valid for all.
    let mut shards: Vec<u32> = ids.iter().map(|id| record(id).shard).collect();
    shards.sort_unstable();
    shards.dedup();
    let granted = acquire(store, shards).await;
    ids.into_iter()
        .map(|id| {
            let shard = record(&id).shard;
            let epoch = granted.iter().find(|(granted, _)| *granted == shard).unwrap().1;
            (id, Fence { shard, epoch })
        })
        .collect()
}

/// One message append per conversation, with client message ids never used before.
pub fn requests(fences: &[(String, Fence)], round: u64) -> Vec<AppendRequest> {
    fences
        .iter()
        .map(|(id, fence)| AppendRequest {
            fence: Some(*fence),
            conversation_id: id.clone(),
            create: None,
            events: vec![event("message", &format!("m{round}"), r#"{"body":"hello"}"#.into())],
            update: None,
        })
        .collect()
}
