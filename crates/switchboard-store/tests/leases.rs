//! Shard leases: acquisition, expiry, takeover and renewal, on database time. Every scenario runs against
//! each backend (see `on_every_backend!`).

mod common;

use common::*;
use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{AcquireShardsRequest, Fence, RenewShardsRequest, ShardLease};
use switchboard_proto::store::{StoreApi, StoreError};

on_every_backend!(
    a_held_shard_goes_to_another_node_only_after_expiry,
    a_node_reacquiring_its_own_shards_gets_them_back_with_a_new_epoch,
    acquiring_every_shard_takes_the_free_ones,
    acquiring_a_list_of_shards_touches_only_those_shards,
    a_shard_list_is_a_set_granted_in_shard_order,
    renewal_extends_the_lease_on_database_time,
    renewing_a_lease_whose_epoch_moved_on_reports_it_lost,
    renewal_answers_per_shard_in_shard_order,
    malformed_lease_requests_are_invalid,
    a_malformed_acquire_grants_nothing,
);

async fn acquire(store: &dyn StoreApi, node: &str, shards: &[u32]) -> Vec<ShardLease> {
    let request = AcquireShardsRequest { node_id: node.into(), shards: shards.to_vec(), lease_ms: LEASE_MS, limit: 0 };
    store.acquire_shards(request).await.unwrap().granted
}

async fn renew(store: &dyn StoreApi, node: &str, held: Vec<Fence>) -> (Vec<ShardLease>, Vec<u32>) {
    let request = RenewShardsRequest { node_id: node.into(), held, lease_ms: LEASE_MS };
    let response = store.renew_shards(request).await.unwrap();
    (response.renewed, response.lost)
}

fn fences(leases: &[ShardLease]) -> Vec<Fence> {
    leases.iter().map(|lease| Fence { shard: lease.shard, epoch: lease.epoch }).collect()
}

fn shards_and_epochs(leases: &[ShardLease]) -> Vec<(u32, u64)> {
    leases.iter().map(|lease| (lease.shard, lease.epoch)).collect()
}

async fn a_held_shard_goes_to_another_node_only_after_expiry(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let a = acquire(store, "node-a", &[3, 5]).await;
    assert_eq!(a, [3, 5].map(|shard| ShardLease { shard, epoch: 1, expires_at_ms: START_MS + LEASE_MS as i64 }));

    // Unexpired: B gets only the free shard it asks for.
    clock.advance_ms(LEASE_MS as i64 - 1);
    let b = acquire(store, "node-b", &[3, 4]).await;
    assert_eq!(b.iter().map(|lease| (lease.shard, lease.epoch)).collect::<Vec<_>>(), [(4, 1)]);

    // Expired: B takes shard 3 with the next epoch.
    clock.advance_ms(1);
    let b = acquire(store, "node-b", &[3]).await;
    assert_eq!(b, [ShardLease { shard: 3, epoch: 2, expires_at_ms: START_MS + 2 * LEASE_MS as i64 }]);

    // A renews what it believes it holds: 3 is lost, 5 (expired, but nobody took it) is renewed.
    let request = RenewShardsRequest { node_id: "node-a".into(), held: fences(&a), lease_ms: LEASE_MS };
    let renewal = store.renew_shards(request).await.unwrap();
    assert_eq!(renewal.lost, [3]);
    assert_eq!(renewal.renewed, [ShardLease { shard: 5, epoch: 1, expires_at_ms: START_MS + 2 * LEASE_MS as i64 }]);
}

async fn a_node_reacquiring_its_own_shards_gets_them_back_with_a_new_epoch(h: Harness) {
    let store = h.store();
    let first = acquire(store, "node-a", &[7]).await;
    let again = acquire(store, "node-a", &[7]).await;
    assert_eq!(again[0].epoch, first[0].epoch + 1);

    // The old epoch cannot be renewed any more, even by the same node.
    let request = RenewShardsRequest { node_id: "node-a".into(), held: fences(&first), lease_ms: LEASE_MS };
    let renewal = store.renew_shards(request).await.unwrap();
    assert_eq!((renewal.renewed.len(), renewal.lost.as_slice()), (0, &[7][..]));
}

async fn acquiring_every_shard_takes_the_free_ones(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    acquire(store, "node-b", &[0, 1023]).await;

    let a = acquire(store, "node-a", &[]).await;
    assert_eq!(a.len(), N_SHARDS as usize - 2);
    assert!(a.iter().all(|lease| lease.epoch == 1 && lease.shard != 0 && lease.shard != 1023));
    assert!(a.windows(2).all(|pair| pair[0].shard < pair[1].shard), "sorted by shard");

    // Node B renews; A asks for everything again: it re-takes its own, B's stay B's.
    clock.advance_ms(LEASE_MS as i64 / 2);
    let held = vec![Fence { shard: 0, epoch: 1 }, Fence { shard: 1023, epoch: 1 }];
    let request = RenewShardsRequest { node_id: "node-b".into(), held, lease_ms: LEASE_MS };
    assert!(store.renew_shards(request).await.unwrap().lost.is_empty());
    let a = acquire(store, "node-a", &[]).await;
    assert_eq!(a.len(), N_SHARDS as usize - 2);
    assert!(a.iter().all(|lease| lease.epoch == 2));

    // After everything expires, B takes all of it.
    clock.advance_ms(2 * LEASE_MS as i64);
    let b = acquire(store, "node-b", &[]).await;
    assert_eq!(b.len(), N_SHARDS as usize);
    let expected = (0..N_SHARDS).map(|shard| (shard, if shard == 0 || shard == 1023 { 2 } else { 3 }));
    assert_eq!(shards_and_epochs(&b), expected.collect::<Vec<_>>(), "every shard once, in shard order");
}

/// A node asks for the shards it wants (after a rebalance, say): the other shards' leases are left as
/// they are, whoever holds them and whatever their epoch.
async fn acquiring_a_list_of_shards_touches_only_those_shards(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let a = acquire(store, "node-a", &[3, 5]).await;
    assert_eq!(shards_and_epochs(&a), [(3, 1), (5, 1)]);

    // Re-taking shard 5 leaves shard 3's lease (epoch and expiry) alone.
    clock.advance_ms(1);
    let again = acquire(store, "node-a", &[5]).await;
    assert_eq!(again, [ShardLease { shard: 5, epoch: 2, expires_at_ms: START_MS + LEASE_MS as i64 + 1 }]);
    let (renewed, lost) = renew(store, "node-a", vec![Fence { shard: 3, epoch: 1 }]).await;
    assert_eq!((shards_and_epochs(&renewed), lost), (vec![(3, 1)], vec![]));

    // Shards nobody asked for are still free and on their first epoch.
    let b = acquire(store, "node-b", &[4, 6]).await;
    assert_eq!(shards_and_epochs(&b), [(4, 1), (6, 1)]);
    let c = acquire(store, "node-c", &[]).await;
    assert_eq!(c.len(), N_SHARDS as usize - 4);
    assert!(c.iter().all(|lease| lease.epoch == 1 && ![3, 4, 5, 6].contains(&lease.shard)));

    // And B's acquire of 4 and 6 left A's shards alone: A still renews both under its epochs.
    let (renewed, lost) =
        renew(store, "node-a", vec![Fence { shard: 3, epoch: 1 }, Fence { shard: 5, epoch: 2 }]).await;
    assert_eq!((shards_and_epochs(&renewed), lost), (vec![(3, 1), (5, 2)], vec![]));
}

async fn a_shard_list_is_a_set_granted_in_shard_order(h: Harness) {
    let store = h.store();
    let a = acquire(store, "node-a", &[9, 2, 9, 7, 2]).await;
    let expires_at_ms = START_MS + LEASE_MS as i64;
    assert_eq!(a, [2, 7, 9].map(|shard| ShardLease { shard, epoch: 1, expires_at_ms }), "each shard once");
    let again = acquire(store, "node-a", &[7, 7]).await;
    assert_eq!(shards_and_epochs(&again), [(7, 2)], "a repeated shard bumps the epoch once");
}

async fn renewal_extends_the_lease_on_database_time(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let a = acquire(store, "node-a", &[1, 2]).await;
    clock.advance_ms(LEASE_MS as i64 - 1);
    let request = RenewShardsRequest { node_id: "node-a".into(), held: fences(&a), lease_ms: LEASE_MS };
    let renewal = store.renew_shards(request).await.unwrap();
    assert!(renewal.lost.is_empty());
    let expected = START_MS + 2 * LEASE_MS as i64 - 1;
    assert!(renewal.renewed.iter().all(|lease| lease.expires_at_ms == expected));
    assert_eq!(shards_and_epochs(&renewal.renewed), [(1, 1), (2, 1)], "renewal keeps the epoch");

    // Past the original expiry the renewed lease still keeps B out.
    clock.advance_ms(1);
    assert!(acquire(store, "node-b", &[1, 2]).await.is_empty());

    // A node renewing leases it never held loses them.
    let request = RenewShardsRequest { node_id: "node-b".into(), held: fences(&a), lease_ms: LEASE_MS };
    assert_eq!(store.renew_shards(request).await.unwrap().lost, [1, 2]);

    // At the renewed expiry the lease is up for grabs.
    clock.advance_ms(LEASE_MS as i64 - 1);
    assert_eq!(shards_and_epochs(&acquire(store, "node-b", &[1, 2]).await), [(1, 2), (2, 2)]);
}

/// The router's renewal loop: a node that missed its renewals finds out which shards moved on, and stops
/// serving exactly those.
async fn renewing_a_lease_whose_epoch_moved_on_reports_it_lost(h: Harness) {
    let (store, clock) = (h.store(), &h.clock);
    let a = acquire(store, "node-a", &[1, 2, 3]).await;
    clock.advance_ms(LEASE_MS as i64);
    let b = acquire(store, "node-b", &[2]).await;
    assert_eq!(b, [ShardLease { shard: 2, epoch: 2, expires_at_ms: START_MS + 2 * LEASE_MS as i64 }]);

    clock.advance_ms(1);
    let (renewed, lost) = renew(store, "node-a", fences(&a)).await;
    let expires_at_ms = START_MS + 2 * LEASE_MS as i64 + 1;
    assert_eq!(renewed, [1, 3].map(|shard| ShardLease { shard, epoch: 1, expires_at_ms }));
    assert_eq!(lost, [2]);

    // Knowing the new epoch does not help a node that does not own the shard.
    let (renewed, lost) = renew(store, "node-a", fences(&b)).await;
    assert_eq!((renewed, lost), (vec![], vec![2]));

    // The failed renewals left B's lease as it was: it expires on B's own schedule.
    clock.advance_ms(LEASE_MS as i64 - 1);
    let c = acquire(store, "node-c", &[1, 2, 3]).await;
    assert_eq!(shards_and_epochs(&c), [(2, 3)], "B's lease expired; A's renewed ones did not");

    // B, renewing late, has lost it too.
    let (renewed, lost) = renew(store, "node-b", fences(&b)).await;
    assert_eq!((renewed, lost), (vec![], vec![2]));
}

async fn renewal_answers_per_shard_in_shard_order(h: Harness) {
    let store = h.store();
    let a = acquire(store, "node-a", &[1, 5]).await;
    acquire(store, "node-b", &[4, 8]).await;
    let held = vec![
        Fence { shard: 8, epoch: 1 },
        Fence { shard: 5, epoch: 1 },
        Fence { shard: 4, epoch: 1 },
        Fence { shard: 1, epoch: 1 },
        Fence { shard: 8, epoch: 1 },
        Fence { shard: 5, epoch: 1 },
    ];
    let (renewed, lost) = renew(store, "node-a", held).await;
    assert_eq!(renewed, a, "each shard once");
    assert_eq!(lost, [4, 8], "each shard once, in shard order");

    // Every shard asked for still held, some asked for twice: each renewed once.
    let held = vec![Fence { shard: 5, epoch: 1 }, Fence { shard: 1, epoch: 1 }, Fence { shard: 5, epoch: 1 }];
    let (renewed, lost) = renew(store, "node-a", held).await;
    assert_eq!((renewed, lost), (a.clone(), vec![]));

    // A shard asked for under its epoch and an old one: the lease is renewed, and not reported lost.
    let held = vec![Fence { shard: 1, epoch: 0 }, Fence { shard: 1, epoch: 1 }];
    let (renewed, lost) = renew(store, "node-a", held).await;
    assert_eq!((renewed, lost), (vec![a[0]], vec![]));
}

async fn malformed_lease_requests_are_invalid(h: Harness) {
    let store = h.store();
    let request =
        AcquireShardsRequest { node_id: "node-a".into(), shards: vec![N_SHARDS], lease_ms: LEASE_MS, limit: 0 };
    assert!(matches!(store.acquire_shards(request).await, Err(StoreError::Invalid(_))));
    let request = AcquireShardsRequest { node_id: String::new(), shards: vec![1], lease_ms: LEASE_MS, limit: 0 };
    assert!(matches!(store.acquire_shards(request).await, Err(StoreError::Invalid(_))));
    let request = AcquireShardsRequest { node_id: String::new(), shards: vec![], lease_ms: LEASE_MS, limit: 0 };
    assert!(matches!(store.acquire_shards(request).await, Err(StoreError::Invalid(_))));
    let request = RenewShardsRequest { node_id: "node-a".into(), held: vec![], lease_ms: LEASE_MS };
    assert_eq!(store.renew_shards(request).await.unwrap(), Default::default());

    // Leases too long for database time.
    for lease_ms in [u64::MAX, i64::MAX as u64] {
        let request = AcquireShardsRequest { node_id: "node-a".into(), shards: vec![1], lease_ms, limit: 0 };
        assert!(matches!(store.acquire_shards(request).await, Err(StoreError::Invalid(_))), "{lease_ms}");
    }
    let held = fences(&acquire(store, "node-a", &[1]).await);
    for lease_ms in [u64::MAX, i64::MAX as u64] {
        let request = RenewShardsRequest { node_id: "node-a".into(), held: held.clone(), lease_ms };
        assert!(matches!(store.renew_shards(request).await, Err(StoreError::Invalid(_))), "{lease_ms}");
    }

    // A renewal without a node, or of a shard or epoch out of range.
    let request = RenewShardsRequest { node_id: String::new(), held: held.clone(), lease_ms: LEASE_MS };
    assert!(matches!(store.renew_shards(request).await, Err(StoreError::Invalid(_))));
    let request = RenewShardsRequest { node_id: String::new(), held: vec![], lease_ms: LEASE_MS };
    assert!(matches!(store.renew_shards(request).await, Err(StoreError::Invalid(_))));
    for bad in [Fence { shard: N_SHARDS, epoch: 1 }, Fence { shard: 1, epoch: u64::MAX }] {
        let held = vec![held[0], bad];
        let request = RenewShardsRequest { node_id: "node-a".into(), held, lease_ms: LEASE_MS };
        assert!(matches!(store.renew_shards(request).await, Err(StoreError::Invalid(_))), "{bad:?}");
    }

    // None of it changed the lease.
    let (renewed, lost) = renew(store, "node-a", held).await;
    assert_eq!((shards_and_epochs(&renewed), lost), (vec![(1, 1)], vec![]));
}

/// A request that is refused takes nothing, even the valid shards in it.
async fn a_malformed_acquire_grants_nothing(h: Harness) {
    let store = h.store();
    let request =
        AcquireShardsRequest { node_id: "node-a".into(), shards: vec![1, 2, N_SHARDS], lease_ms: LEASE_MS, limit: 0 };
    assert!(matches!(store.acquire_shards(request).await, Err(StoreError::Invalid(_))));
    let request = AcquireShardsRequest { node_id: "node-a".into(), shards: vec![3], lease_ms: u64::MAX, limit: 0 };
    assert!(matches!(store.acquire_shards(request).await, Err(StoreError::Invalid(_))));
    let b = acquire(store, "node-b", &[1, 2, 3]).await;
    assert_eq!(shards_and_epochs(&b), [(1, 1), (2, 1), (3, 1)]);
}
