//! Shard ownership: the leases this node holds, with their epochs, and the keeper that takes and renews
//! them through the store and fences itself when it cannot renew in time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use switchboard_domain::{Epoch, Fence, N_SHARDS, ShardId, shard_of};
use switchboard_proto::internal::v1::{self as pb, AcquireShardsRequest, RenewShardsRequest};
use switchboard_proto::router::RouterError;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::context::Context;
use crate::error::from_store;

#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// How long a lease lasts without renewal (database time).
    pub lease: Duration,
    /// Renew this often.
    pub renew_every: Duration,
    /// Give up the shards when no renewal succeeded for this long; shorter than `lease`, so that the node
    /// stops writing before another may take over.
    pub renew_deadline: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            lease: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(7),
        }
    }
}

/// The shards this node owns, with the epoch of each lease.
#[derive(Default)]
pub(crate) struct ShardTable {
    epochs: RwLock<HashMap<ShardId, Epoch>>,
}

impl ShardTable {
    /// The fence for a write to `key`, or `NotOwner` when this node does not own its shard.
    pub(crate) fn fence_for(&self, key: &str) -> Result<Fence, RouterError> {
        let shard = shard_of(key);
        let epochs = self.epochs.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let epoch = epochs.get(&shard).copied().ok_or(RouterError::NotOwner)?;
        Ok(Fence { shard, epoch })
    }

    pub(crate) fn held(&self) -> Vec<Fence> {
        let epochs = self.epochs.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        epochs.iter().map(|(shard, epoch)| Fence { shard: *shard, epoch: *epoch }).collect()
    }

    pub(crate) fn n_owned(&self) -> usize {
        self.epochs.read().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    fn grant(&self, leases: &[pb::ShardLease]) {
        let mut epochs = self.epochs.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for lease in leases {
            epochs.insert(ShardId(lease.shard), Epoch(lease.epoch));
        }
    }

    fn drop_shards(&self, shards: impl IntoIterator<Item = ShardId>) {
        let mut epochs = self.epochs.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for shard in shards {
            epochs.remove(&shard);
        }
    }

    fn drop_all(&self) {
        self.epochs.write().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
    }
}

/// Takes every shard that can be taken (at start: all of them, including this node's own from before a
/// restart, each with a new epoch).
pub(crate) async fn acquire(context: &Context, settings: &LeaseSettings) -> Result<usize, RouterError> {
    acquire_shards(context, settings, Vec::new()).await
}

/// Takes the free shards this node does not hold. Never asks for a shard it holds: granting bumps the
/// epoch, which would fence off this node's own actors.
async fn acquire_missing(context: &Context, settings: &LeaseSettings) -> Result<usize, RouterError> {
    let held: std::collections::HashSet<ShardId> = context.shards.held().iter().map(|fence| fence.shard).collect();
    let missing: Vec<u32> = (0..N_SHARDS).filter(|shard| !held.contains(&ShardId(*shard))).collect();
    if missing.is_empty() {
        return Ok(0);
    }
    acquire_shards(context, settings, missing).await
}

async fn acquire_shards(context: &Context, settings: &LeaseSettings, shards: Vec<u32>) -> Result<usize, RouterError> {
    let request = AcquireShardsRequest {
        node_id: context.node_id.clone(),
        shards,
        lease_ms: settings.lease.as_millis() as u64,
        limit: 0,
    };
    let response = context.store.acquire_shards(request).await.map_err(from_store)?;
    context.shards.grant(&response.granted);
    Ok(response.granted.len())
}

/// Renews the leases until the context is dropped; takes free shards; fences itself on a missed deadline.
pub(crate) async fn keep_leases(context: Arc<Context>, settings: LeaseSettings) {
    let mut last_renewal = Instant::now();
    let mut ticks = tokio::time::interval(settings.renew_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let held: Vec<pb::Fence> = context
            .shards
            .held()
            .iter()
            .map(|fence| pb::Fence { shard: fence.shard.0, epoch: fence.epoch.0 })
            .collect();
        let request =
            RenewShardsRequest { node_id: context.node_id.clone(), held, lease_ms: settings.lease.as_millis() as u64 };
        match context.store.renew_shards(request).await {
            Ok(response) => {
                last_renewal = Instant::now();
                if !response.lost.is_empty() {
                    warn!(n_lost = response.lost.len(), "shard leases lost to another node");
                    context.shards.drop_shards(response.lost.iter().map(|shard| ShardId(*shard)));
                }
                if let Err(error) = acquire_missing(&context, &settings).await {
                    warn!(%error, "taking free shards failed");
                }
            }
            Err(error) if last_renewal.elapsed() >= settings.renew_deadline => {
                if context.shards.n_owned() > 0 {
                    warn!(%error, "lease renewal deadline missed: giving up every shard");
                    context.shards.drop_all();
                }
            }
            Err(error) => warn!(%error, "lease renewal failed, will retry"),
        }
        if context.shards.n_owned() == 0 {
            info!("this node owns no shard");
        }
    }
}
