//! The cluster operations: lease release, the node registry, the placement, acquisition with a limit, the
//! history of lease grants and the epoch of every event, and group commit as callers see it. Every
//! scenario runs against each backend (see `on_every_backend!`).

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AppendRequest, Fence, GetPlacementRequest, NodeInfo, Placement, ReadEventsRequest,
    RegisterNodeRequest, ReleaseShardsRequest, RenewShardsRequest, ShardLease, ShardOwner,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_store::LeaseGrant;

on_every_backend!(
    a_released_shard_is_taken_at_once_with_a_new_epoch,
    only_the_holder_at_that_epoch_releases,
    malformed_releases_are_invalid_and_release_nothing,
    registered_nodes_live_until_their_time_to_live,
    a_leaving_node_is_forgotten_and_its_leases_freed,
    malformed_registrations_are_invalid,
    the_placement_is_the_unexpired_leases_and_the_live_nodes,
    a_limited_acquire_takes_the_lowest_free_shards,
    a_limited_acquire_never_takes_a_shard_held_by_another_node,
    every_grant_is_in_the_history_once,
    every_event_carries_the_epoch_it_was_written_under,
    concurrent_appends_are_each_answered_on_their_own,
);

const NO_LIMIT: u32 = 0;

async fn acquire(store: &dyn StoreApi, node: &str, shards: &[u32], limit: u32) -> Vec<ShardLease> {
    let request = AcquireShardsRequest { node_id: node.into(), shards: shards.to_vec(), lease_ms: LEASE_MS, limit };
    store.acquire_shards(request).await.unwrap().granted
}

async fn release(store: &dyn StoreApi, node: &str, held: Vec<Fence>) -> Vec<u32> {
    let request = ReleaseShardsRequest { node_id: node.into(), held };
    store.release_shards(request).await.unwrap().released
}

async fn register(store: &dyn StoreApi, node: &str, ttl_ms: u64) -> Vec<NodeInfo> {
    let request =
        RegisterNodeRequest { node_id: node.into(), address: format!("http://{node}:7001"), ttl_ms, leaving: false };
    store.register_node(request).await.unwrap().nodes
}

async fn leave(store: &dyn StoreApi, node: &str) -> Vec<NodeInfo> {
    let request = RegisterNodeRequest { node_id: node.into(), address: String::new(), ttl_ms: 0, leaving: true };
    store.register_node(request).await.unwrap().nodes
}

async fn placement(store: &dyn StoreApi) -> Placement {
    store.get_placement(GetPlacementRequest {}).await.unwrap()
}

fn node(id: &str, expires_at_ms: i64) -> NodeInfo {
    NodeInfo { node_id: id.into(), address: format!("http://{id}:7001"), expires_at_ms }
}

fn ids(nodes: &[NodeInfo]) -> Vec<&str> {
    nodes.iter().map(|node| node.node_id.as_str()).collect()
}

fn fences(leases: &[ShardLease]) -> Vec<Fence> {
    leases.iter().map(|lease| Fence { shard: lease.shard, epoch: lease.epoch }).collect()
}

fn shards_and_epochs(leases: &[ShardLease]) -> Vec<(u32, u64)> {
    leases.iter().map(|lease| (lease.shard, lease.epoch)).collect()
}

fn owners(placement: &Placement) -> Vec<(u32, &str, u64)> {
    placement.owners.iter().map(|owner| (owner.shard, owner.node_id.as_str(), owner.epoch)).collect()
}

async fn a_released_shard_is_taken_at_once_with_a_new_epoch(h: Harness) {
    let store = h.store();
    let a = acquire(store, "node-a", &[1, 2, 3], NO_LIMIT).await;
    assert_eq!(release(store, "node-a", fences(&a[..2])).await, [1, 2]);

    // No time passed: B takes the released shards at once, with the next epoch; shard 3 is still A's.
    let b = acquire(store, "node-b", &[1, 2, 3], NO_LIMIT).await;
    assert_eq!(shards_and_epochs(&b), [(1, 2), (2, 2)]);

    // A's released fences are stale now: its writes under them are refused, its renewal loses them.
    let (renewal, shard3) = (
        store
            .renew_shards(RenewShardsRequest { node_id: "node-a".into(), held: fences(&a), lease_ms: LEASE_MS })
            .await
            .unwrap(),
        a[2],
    );
    assert_eq!(renewal.lost, [1, 2]);
    assert_eq!(shards_and_epochs(&renewal.renewed), [(shard3.shard, shard3.epoch)]);

    // The releasing node itself may take a released shard back too, under a new epoch.
    assert_eq!(release(store, "node-b", fences(&b[..1])).await, [1]);
    assert_eq!(shards_and_epochs(&acquire(store, "node-a", &[1], NO_LIMIT).await), [(1, 3)]);
}

async fn only_the_holder_at_that_epoch_releases(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let a = acquire(store, "node-a", &[4, 5], NO_LIMIT).await;

    // Another node, or the holder with another epoch, releases nothing.
    assert!(release(store, "node-b", fences(&a)).await.is_empty());
    let wrong_epoch = vec![Fence { shard: 4, epoch: 2 }, Fence { shard: 5, epoch: 0 }];
    assert!(release(store, "node-a", wrong_epoch).await.is_empty());
    assert!(release(store, "node-a", vec![Fence { shard: 6, epoch: 1 }]).await.is_empty(), "never leased");
    assert!(acquire(store, "node-b", &[4, 5], NO_LIMIT).await.is_empty(), "both still A's");

    // After the lease expired and B took shard 4, A's release of its old epoch leaves B's lease alone.
    clock.advance_ms(LEASE_MS as i64);
    let b = acquire(store, "node-b", &[4], NO_LIMIT).await;
    assert_eq!(release(store, "node-a", fences(&a)).await, [5], "shard 5 was expired but still A's");
    assert_eq!(owners(&placement(store).await), [(4, "node-b", b[0].epoch)]);

    // A shard named twice is released once.
    let c = acquire(store, "node-c", &[7], NO_LIMIT).await;
    assert_eq!(release(store, "node-c", vec![fences(&c)[0], fences(&c)[0]]).await, [7]);
    assert!(release(store, "node-c", fences(&c)).await.is_empty(), "released already");
}

async fn malformed_releases_are_invalid_and_release_nothing(h: Harness) {
    let store = h.store();
    let a = acquire(store, "node-a", &[1], NO_LIMIT).await;
    let request = ReleaseShardsRequest { node_id: String::new(), held: fences(&a) };
    assert!(matches!(store.release_shards(request).await, Err(StoreError::Invalid(_))));
    for bad in [Fence { shard: N_SHARDS, epoch: 1 }, Fence { shard: 1, epoch: u64::MAX }] {
        let request = ReleaseShardsRequest { node_id: "node-a".into(), held: vec![fences(&a)[0], bad] };
        assert!(matches!(store.release_shards(request).await, Err(StoreError::Invalid(_))), "{bad:?}");
    }
    assert!(release(store, "node-a", vec![]).await.is_empty());
    assert_eq!(owners(&placement(store).await), [(1, "node-a", 1)], "still held");
}

async fn registered_nodes_live_until_their_time_to_live(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    const TTL: u64 = 3_000;
    assert_eq!(register(store, "node-b", TTL).await, [node("node-b", START_MS + TTL as i64)]);
    clock.advance_ms(1_000);
    let nodes = register(store, "node-a", TTL).await;
    assert_eq!(nodes, [node("node-a", START_MS + 1_000 + TTL as i64), node("node-b", START_MS + TTL as i64)]);

    // B's time to live runs out exactly at its expiry; A's heartbeat no longer lists it.
    clock.advance_ms(2_000);
    assert_eq!(ids(&register(store, "node-a", TTL).await), ["node-a"]);
    assert_eq!(ids(&placement(store).await.nodes), ["node-a"]);

    // B comes back with a heartbeat, at a new address; ordering is by node id, bytewise.
    let request = RegisterNodeRequest {
        node_id: "node-b".into(),
        address: "http://10.0.0.2:7001".into(),
        ttl_ms: TTL,
        leaving: false,
    };
    let nodes = store.register_node(request).await.unwrap().nodes;
    assert_eq!(ids(&nodes), ["node-a", "node-b"]);
    assert_eq!(nodes[1].address, "http://10.0.0.2:7001");
    assert_eq!(ids(&register(store, "Node-Z", TTL).await), ["Node-Z", "node-a", "node-b"], "bytewise order");
}

async fn a_leaving_node_is_forgotten_and_its_leases_freed(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    register(store, "node-a", LEASE_MS).await;
    register(store, "node-b", LEASE_MS).await;
    let a = acquire(store, "node-a", &[5, 6], NO_LIMIT).await;
    let b = acquire(store, "node-b", &[7], NO_LIMIT).await;
    clock.advance_ms(1);

    assert_eq!(ids(&leave(store, "node-a").await), ["node-b"], "the leaving node is not listed");
    let now = placement(store).await;
    assert_eq!(ids(&now.nodes), ["node-b"]);
    assert_eq!(owners(&now), [(7, "node-b", 1)], "A's leases are free, B's untouched");

    // B takes A's shards at once, each with the next epoch; A's old fences are stale.
    let taken = acquire(store, "node-b", &[5, 6, 7], 2).await;
    assert_eq!(shards_and_epochs(&taken), [(5, 2), (6, 2)]);
    let renewal = store
        .renew_shards(RenewShardsRequest { node_id: "node-a".into(), held: fences(&a), lease_ms: LEASE_MS })
        .await
        .unwrap();
    assert_eq!(renewal.lost, [5, 6]);
    let renewal = store
        .renew_shards(RenewShardsRequest { node_id: "node-b".into(), held: fences(&b), lease_ms: LEASE_MS })
        .await
        .unwrap();
    assert!(renewal.lost.is_empty());

    // Leaving twice, or never having registered, is harmless.
    assert_eq!(ids(&leave(store, "node-a").await), ["node-b"]);
    assert_eq!(ids(&leave(store, "node-x").await), ["node-b"]);
}

async fn malformed_registrations_are_invalid(h: Harness) {
    let store = h.store();
    let bad = [
        RegisterNodeRequest { node_id: String::new(), address: "http://a".into(), ttl_ms: 1_000, leaving: false },
        RegisterNodeRequest { node_id: "node-a".into(), address: "http://a".into(), ttl_ms: 0, leaving: false },
        RegisterNodeRequest { node_id: "node-a".into(), address: "http://a".into(), ttl_ms: u64::MAX, leaving: false },
        RegisterNodeRequest {
            node_id: "node-a".into(),
            address: "http://a".into(),
            ttl_ms: i64::MAX as u64,
            leaving: false,
        },
        RegisterNodeRequest { node_id: String::new(), address: String::new(), ttl_ms: 0, leaving: true },
    ];
    for request in bad {
        let result = store.register_node(request.clone()).await;
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{request:?}: {result:?}");
    }
    assert!(placement(store).await.nodes.is_empty(), "nothing registered");
}

async fn the_placement_is_the_unexpired_leases_and_the_live_nodes(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    assert_eq!(placement(store).await, Placement::default(), "nothing yet");
    register(store, "node-b", 2 * LEASE_MS).await;
    register(store, "node-a", 2 * LEASE_MS).await;
    acquire(store, "node-b", &[9, 3], NO_LIMIT).await;
    clock.advance_ms(LEASE_MS as i64 / 2);
    let a = acquire(store, "node-a", &[1, 2], NO_LIMIT).await;
    acquire(store, "node-a", &[2], NO_LIMIT).await;
    release(store, "node-a", fences(&a[..1])).await;

    let now = placement(store).await;
    let expected = [(2, "node-a", 2), (3, "node-b", 1), (9, "node-b", 1)];
    assert_eq!(owners(&now), expected, "by shard; released shard 1 has no owner");
    assert_eq!(ids(&now.nodes), ["node-a", "node-b"]);
    assert_eq!(now.nodes[0].expires_at_ms, START_MS + 2 * LEASE_MS as i64);

    // B's leases expire: its shards have no owner now, though nobody took them.
    clock.advance_ms(LEASE_MS as i64 / 2);
    assert_eq!(placement(store).await.owners, [ShardOwner { shard: 2, node_id: "node-a".into(), epoch: 2 }]);
}

async fn a_limited_acquire_takes_the_lowest_free_shards(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let first = acquire(store, "node-a", &[], 3).await;
    assert_eq!(shards_and_epochs(&first), [(0, 1), (1, 1), (2, 1)]);

    // The node's own unexpired shards are neither re-taken nor counted: the next ones are.
    let next = acquire(store, "node-a", &[], 2).await;
    assert_eq!(shards_and_epochs(&next), [(3, 1), (4, 1)]);
    let listed = acquire(store, "node-a", &[12, 2, 10, 11], 2).await;
    assert_eq!(shards_and_epochs(&listed), [(10, 1), (11, 1)], "from the list, lowest first, own ones skipped");

    // Without a limit the node re-takes its own shards, as before (new epochs).
    let again = acquire(store, "node-a", &[0, 12], NO_LIMIT).await;
    assert_eq!(shards_and_epochs(&again), [(0, 2), (12, 1)]);

    // A limit larger than what is free takes what is free.
    let b = acquire(store, "node-b", &[0, 1, 2, 20], 10).await;
    assert_eq!(shards_and_epochs(&b), [(20, 1)]);

    // Once A's leases expired, its own expired shards are free too, lowest first.
    clock.advance_ms(LEASE_MS as i64);
    let a = acquire(store, "node-a", &[], 4).await;
    assert_eq!(shards_and_epochs(&a), [(0, 3), (1, 2), (2, 2), (3, 2)]);
    let all = acquire(store, "node-c", &[], NO_LIMIT).await;
    assert_eq!(all.len(), N_SHARDS as usize - 4, "every other shard, once");
}

async fn a_limited_acquire_never_takes_a_shard_held_by_another_node(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    acquire(store, "node-a", &[0, 1, 2, 4], NO_LIMIT).await;
    clock.advance_ms(LEASE_MS as i64 - 1);
    let b = acquire(store, "node-b", &[], 3).await;
    assert_eq!(shards_and_epochs(&b), [(3, 1), (5, 1), (6, 1)]);
    let b = acquire(store, "node-b", &[0, 1, 2, 4], 3).await;
    assert!(b.is_empty(), "A's leases have a millisecond left");
    clock.advance_ms(1);
    let b = acquire(store, "node-b", &[4, 2, 1, 0], 3).await;
    assert_eq!(shards_and_epochs(&b), [(0, 2), (1, 2), (2, 2)]);
}

async fn every_grant_is_in_the_history_once(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    acquire(store, "node-a", &[2, 1], NO_LIMIT).await;
    clock.advance_ms(5);
    let a = acquire(store, "node-a", &[1], NO_LIMIT).await;
    // Neither renewals nor releases nor refused acquires are grants.
    store
        .renew_shards(RenewShardsRequest { node_id: "node-a".into(), held: fences(&a), lease_ms: LEASE_MS })
        .await
        .unwrap();
    assert!(acquire(store, "node-b", &[1, 2], NO_LIMIT).await.is_empty());
    release(store, "node-a", fences(&a)).await;
    clock.advance_ms(5);
    acquire(store, "node-b", &[1], 1).await;

    let grant = |shard, epoch, node_id: &str, acquired_at_ms| LeaseGrant {
        shard,
        epoch,
        node_id: node_id.into(),
        acquired_at_ms,
    };
    assert_eq!(
        h.audit().lease_history().await.unwrap(),
        [
            grant(1, 1, "node-a", START_MS),
            grant(1, 2, "node-a", START_MS + 5),
            grant(1, 3, "node-b", START_MS + 10),
            grant(2, 1, "node-a", START_MS),
        ]
    );

    // Acquiring everything records every grant; each (shard, epoch) once.
    clock.advance_ms(LEASE_MS as i64);
    let all = acquire(store, "node-c", &[], NO_LIMIT).await;
    let history = h.audit().lease_history().await.unwrap();
    assert_eq!(history.len(), 4 + all.len());
    let keys: HashSet<(u32, u64)> = history.iter().map(|grant| (grant.shard, grant.epoch)).collect();
    assert_eq!(keys.len(), history.len());
    for lease in &all {
        assert!(history.contains(&grant(lease.shard, lease.epoch, "node-c", START_MS + 10 + LEASE_MS as i64)));
    }
}

async fn every_event_carries_the_epoch_it_was_written_under(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let record = conversation("c1", "acme", "sales", 1);
    let shard = record.shard;
    let old = create(store, "node-a", record).await;
    append(store, old, "c1", vec![message("m1", "hi")], None).await.unwrap();

    clock.advance_ms(LEASE_MS as i64);
    let new = fence(store, "node-b", shard).await;
    assert_eq!(
        append(store, old, "c1", vec![message("m2", "late")], None).await,
        Err(StoreError::StaleEpoch { shard })
    );
    append(store, new, "c1", vec![message("m2", "now"), system_event("note")], None).await.unwrap();
    let retry = append(store, new, "c1", vec![message("m1", "hi")], None).await.unwrap();
    assert!(retry.duplicate, "a duplicate writes nothing, under any epoch");

    let epochs = h.audit().event_epochs("c1").await.unwrap();
    assert_eq!(epochs, [(1, old.epoch), (2, old.epoch), (3, new.epoch), (4, new.epoch)]);
    assert!(h.audit().event_epochs("nope").await.unwrap().is_empty());

    // Every event's epoch was granted to some node for its shard.
    let history = h.audit().lease_history().await.unwrap();
    for (_, epoch) in epochs {
        assert!(history.iter().any(|grant| grant.shard == shard && grant.epoch == epoch));
    }
}

/// Appends that arrive together (and so share a group commit on the SQL stores) are decided one by one:
/// a refused one (stale, unknown conversation, invalid) or a duplicate does not disturb the others.
async fn concurrent_appends_are_each_answered_on_their_own(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let c1 = create(store, "node-a", conversation("c1", "acme", "sales", 1)).await;
    let c2 = create(store, "node-a", conversation("c2", "acme", "sales", 2)).await;
    let old_c3 = create(store, "node-a", conversation("c3", "acme", "sales", 3)).await;
    clock.advance_ms(LEASE_MS as i64 - 1);
    store
        .renew_shards(RenewShardsRequest { node_id: "node-a".into(), held: vec![c1, c2], lease_ms: LEASE_MS })
        .await
        .unwrap();
    clock.advance_ms(1);
    let c3 = fence(store, "node-b", old_c3.shard).await;
    let shards = [c1.shard, c2.shard, c3.shard];
    assert_eq!(shards.iter().collect::<HashSet<_>>().len(), 3, "the scenario needs three shards");
    let never_leased = (0..N_SHARDS).find(|shard| !shards.contains(shard)).unwrap();

    // (conversation, fence, client id, what is expected)
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Expect {
        Stored,
        Stale,
        NotFound,
        Invalid,
    }
    let mut cases = Vec::new();
    for i in 0..20 {
        cases.push(("c1", c1, format!("a{i}"), Expect::Stored));
        cases.push(("c2", c2, format!("b{i}"), Expect::Stored));
    }
    for i in 0..5 {
        cases.push(("c3", old_c3, format!("stale{i}"), Expect::Stale));
        cases.push(("c3", c3, format!("c{i}"), Expect::Stored));
        cases.push(("nope", c1, format!("n{i}"), Expect::NotFound));
        cases.push(("c1", Fence { shard: never_leased, epoch: 1 }, format!("x{i}"), Expect::Stale));
        cases.push(("c2", c2, "twice".to_owned(), Expect::Invalid));
    }
    let tasks: Vec<_> = cases
        .iter()
        .cloned()
        .map(|(id, fence, cid, expect)| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move {
                let events = if expect == Expect::Invalid {
                    vec![message(&cid, "one"), message(&cid, "two")]
                } else {
                    vec![message(&cid, "hi")]
                };
                let request = AppendRequest {
                    fence: Some(fence),
                    conversation_id: id.into(),
                    create: None,
                    events,
                    update: None,
                };
                (store.append(request).await, expect)
            })
        })
        .collect();
    for task in tasks {
        let (result, expect) = task.await.unwrap();
        match expect {
            Expect::Stored => assert!(result.as_ref().is_ok_and(|response| !response.duplicate), "{result:?}"),
            Expect::Stale => assert!(matches!(result, Err(StoreError::StaleEpoch { .. })), "{result:?}"),
            Expect::NotFound => assert_eq!(result, Err(StoreError::NotFound("nope".into()))),
            Expect::Invalid => assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}"),
        }
    }
    for (id, n) in [("c1", 20), ("c2", 20), ("c3", 5)] {
        let request = ReadEventsRequest { conversation_id: id.into(), after_seq: 0, ..Default::default() };
        let events = store.read_events(request).await.unwrap().events;
        let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
        assert_eq!(seqs, (1..=n + 1).collect::<Vec<_>>(), "{id}: gap-free");
        assert_eq!(get(store, id).await.last_seq, n + 1);
    }
}
