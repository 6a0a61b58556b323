//! Shard leases: acquisition, expiry, takeover and renewal, on database time.

mod common;

use common::*;
use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, Fence, RenewShardsRequest, ShardLease,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_store::SqlStore;

async fn acquire(store: &SqlStore, node: &str, shards: &[u32]) -> Vec<ShardLease> {
    let request = AcquireShardsRequest {
        node_id: node.into(),
        shards: shards.to_vec(),
        lease_ms: LEASE_MS,
    };
    store.acquire_shards(request).await.unwrap().granted
}

fn fences(leases: &[ShardLease]) -> Vec<Fence> {
    leases
        .iter()
        .map(|lease| Fence {
            shard: lease.shard,
            epoch: lease.epoch,
        })
        .collect()
}

#[tokio::test]
async fn a_held_shard_goes_to_another_node_only_after_expiry() {
    let Harness { store, clock } = in_memory().await;
    let a = acquire(&store, "node-a", &[3, 5]).await;
    assert_eq!(
        a,
        [3, 5].map(|shard| ShardLease {
            shard,
            epoch: 1,
            expires_at_ms: START_MS + LEASE_MS as i64
        })
    );

    // Unexpired: B gets only the free shard it asks for.
    clock.advance_ms(LEASE_MS as i64 - 1);
    let b = acquire(&store, "node-b", &[3, 4]).await;
    assert_eq!(
        b.iter()
            .map(|lease| (lease.shard, lease.epoch))
            .collect::<Vec<_>>(),
        [(4, 1)]
    );

    // Expired: B takes shard 3 with the next epoch.
    clock.advance_ms(1);
    let b = acquire(&store, "node-b", &[3]).await;
    assert_eq!(
        b,
        [ShardLease {
            shard: 3,
            epoch: 2,
            expires_at_ms: START_MS + 2 * LEASE_MS as i64
        }]
    );

    // A renews what it believes it holds: 3 is lost, 5 (expired, but nobody took it) is renewed.
    let request = RenewShardsRequest {
        node_id: "node-a".into(),
        held: fences(&a),
        lease_ms: LEASE_MS,
    };
    let renewal = store.renew_shards(request).await.unwrap();
    assert_eq!(renewal.lost, [3]);
    assert_eq!(
        renewal.renewed,
        [ShardLease {
            shard: 5,
            epoch: 1,
            expires_at_ms: START_MS + 2 * LEASE_MS as i64
        }]
    );
}

#[tokio::test]
async fn a_node_reacquiring_its_own_shards_gets_them_back_with_a_new_epoch() {
    let Harness { store, .. } = in_memory().await;
    let first = acquire(&store, "node-a", &[7]).await;
    let again = acquire(&store, "node-a", &[7]).await;
    assert_eq!(again[0].epoch, first[0].epoch + 1);

    // The old epoch cannot be renewed any more, even by the same node.
    let request = RenewShardsRequest {
        node_id: "node-a".into(),
        held: fences(&first),
        lease_ms: LEASE_MS,
    };
    let renewal = store.renew_shards(request).await.unwrap();
    assert_eq!(
        (renewal.renewed.len(), renewal.lost.as_slice()),
        (0, &[7][..])
    );
}

#[tokio::test]
async fn acquiring_every_shard_takes_the_free_ones() {
    let Harness { store, clock } = in_memory().await;
    acquire(&store, "node-b", &[0, 1023]).await;

    let a = acquire(&store, "node-a", &[]).await;
    assert_eq!(a.len(), N_SHARDS as usize - 2);
    assert!(
        a.iter()
            .all(|lease| lease.epoch == 1 && lease.shard != 0 && lease.shard != 1023)
    );
    assert!(
        a.windows(2).all(|pair| pair[0].shard < pair[1].shard),
        "sorted by shard"
    );

    // Node B renews; A asks for everything again: it re-takes its own, B's stay B's.
    clock.advance_ms(LEASE_MS as i64 / 2);
    let held = vec![
        Fence { shard: 0, epoch: 1 },
        Fence {
            shard: 1023,
            epoch: 1,
        },
    ];
    let request = RenewShardsRequest {
        node_id: "node-b".into(),
        held,
        lease_ms: LEASE_MS,
    };
    assert!(store.renew_shards(request).await.unwrap().lost.is_empty());
    let a = acquire(&store, "node-a", &[]).await;
    assert_eq!(a.len(), N_SHARDS as usize - 2);
    assert!(a.iter().all(|lease| lease.epoch == 2));

    // After everything expires, B takes all of it.
    clock.advance_ms(2 * LEASE_MS as i64);
    let b = acquire(&store, "node-b", &[]).await;
    assert_eq!(b.len(), N_SHARDS as usize);
}

#[tokio::test]
async fn renewal_extends_the_lease_on_database_time() {
    let Harness { store, clock } = in_memory().await;
    let a = acquire(&store, "node-a", &[1, 2]).await;
    clock.advance_ms(LEASE_MS as i64 - 1);
    let request = RenewShardsRequest {
        node_id: "node-a".into(),
        held: fences(&a),
        lease_ms: LEASE_MS,
    };
    let renewal = store.renew_shards(request).await.unwrap();
    assert!(renewal.lost.is_empty());
    let expected = START_MS + 2 * LEASE_MS as i64 - 1;
    assert!(
        renewal
            .renewed
            .iter()
            .all(|lease| lease.expires_at_ms == expected)
    );

    // Past the original expiry the renewed lease still keeps B out.
    clock.advance_ms(1);
    assert!(acquire(&store, "node-b", &[1, 2]).await.is_empty());

    // A node renewing leases it never held loses them.
    let request = RenewShardsRequest {
        node_id: "node-b".into(),
        held: fences(&a),
        lease_ms: LEASE_MS,
    };
    assert_eq!(store.renew_shards(request).await.unwrap().lost, [1, 2]);
}

#[tokio::test]
async fn malformed_lease_requests_are_invalid() {
    let Harness { store, .. } = in_memory().await;
    let request = AcquireShardsRequest {
        node_id: "node-a".into(),
        shards: vec![N_SHARDS],
        lease_ms: LEASE_MS,
    };
    assert!(matches!(
        store.acquire_shards(request).await,
        Err(StoreError::Invalid(_))
    ));
    let request = AcquireShardsRequest {
        node_id: String::new(),
        shards: vec![1],
        lease_ms: LEASE_MS,
    };
    assert!(matches!(
        store.acquire_shards(request).await,
        Err(StoreError::Invalid(_))
    ));
    let request = RenewShardsRequest {
        node_id: "node-a".into(),
        held: vec![],
        lease_ms: LEASE_MS,
    };
    assert_eq!(
        store.renew_shards(request).await.unwrap(),
        Default::default()
    );
}
