//! Shard ownership: the leases this node holds, with their epochs, and the keeper that takes and renews
//! them through the store and fences itself when it cannot renew in time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use switchboard_telemetry::names;

use switchboard_domain::{Epoch, Fence, N_SHARDS, ShardId, agent_key, conversation_key, queue_key, shard_of};
use switchboard_proto::convert::conversation_id;
use switchboard_proto::internal::v1::{
    self as pb, AcquireShardsRequest, ListConversationsRequest, RegisterNodeRequest, RenewShardsRequest,
};
use switchboard_proto::router::RouterError;
use switchboard_proto::store::{LIST_PAGE, list_all_conversations};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::context::Context;
use crate::error::from_store;
use crate::handles::{AgentHandle, ConversationHandle, QueueHandle};

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

    /// Whether this node owns the shard of `key` now.
    pub(crate) fn owns(&self, key: &str) -> bool {
        self.epochs.read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&shard_of(key))
    }

    pub(crate) fn owns_shard(&self, shard: ShardId) -> bool {
        self.epochs.read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&shard)
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
        report_owned(epochs.len());
    }

    fn drop_shards(&self, shards: impl IntoIterator<Item = ShardId>) {
        let mut epochs = self.epochs.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for shard in shards {
            epochs.remove(&shard);
        }
        report_owned(epochs.len());
    }

    fn drop_all(&self) {
        self.epochs.write().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
        report_owned(0);
    }
}

fn report_owned(n: usize) {
    metrics::gauge!(names::ROUTER_SHARDS_OWNED).set(n as f64);
}

/// Registers this node and takes its fair share of the shards (at start; later ticks rebalance).
pub(crate) async fn join(context: &Arc<Context>, settings: &LeaseSettings) -> Result<usize, RouterError> {
    let nodes = register(context, settings, false).await?;
    let taken = retake_own(context, settings).await?;
    Ok(taken + balance(context, settings, nodes.len()).await?)
}

/// Takes back, with new epochs, the shards whose unexpired leases the store still gives to this node: after
/// a restart under the same name, or after fencing itself while the store was unreachable. Without it they
/// would stay unserved until their leases expire.
async fn retake_own(context: &Arc<Context>, settings: &LeaseSettings) -> Result<usize, RouterError> {
    let placement = context.store.get_placement(pb::GetPlacementRequest {}).await.map_err(from_store)?;
    let own: Vec<u32> = placement
        .owners
        .iter()
        .filter(|owner| owner.node_id == context.node_id && !context.shards.owns_shard(ShardId(owner.shard)))
        .map(|owner| owner.shard)
        .collect();
    if own.is_empty() {
        return Ok(0);
    }
    let request = AcquireShardsRequest {
        node_id: context.node_id.clone(),
        shards: own,
        lease_ms: settings.lease.as_millis() as u64,
        limit: 0,
    };
    let granted = context.store.acquire_shards(request).await.map_err(from_store)?.granted;
    let n = granted.len();
    take(context, granted);
    Ok(n)
}

/// Starts serving newly granted shards: actors still running under an older epoch are stopped, and the
/// actors of the shards are rebuilt from the store.
fn take(context: &Arc<Context>, granted: Vec<pb::ShardLease>) {
    if granted.is_empty() {
        return;
    }
    let shards: HashSet<ShardId> = granted.iter().map(|lease| ShardId(lease.shard)).collect();
    stop_actors(context, &shards);
    context.shards.grant(&granted);
    tokio::spawn(activate_shards(context.clone(), shards));
}

/// The node's heartbeat: answers how many nodes are alive (this one included).
async fn register(
    context: &Context,
    settings: &LeaseSettings,
    leaving: bool,
) -> Result<Vec<pb::NodeInfo>, RouterError> {
    let request = RegisterNodeRequest {
        node_id: context.node_id.clone(),
        address: context.advertise.clone(),
        ttl_ms: settings.lease.as_millis() as u64,
        leaving,
    };
    Ok(context.store.register_node(request).await.map_err(from_store)?.nodes)
}

/// This node's fair share: every live node holds `ceil(S / nodes)` shards at most.
fn fair_share(n_nodes: usize) -> usize {
    (N_SHARDS as usize).div_ceil(n_nodes.max(1))
}

/// Takes free shards up to the fair share; gives back the surplus when another node is below its share.
/// Answers how many shards were taken.
async fn balance(context: &Arc<Context>, settings: &LeaseSettings, n_nodes: usize) -> Result<usize, RouterError> {
    let target = fair_share(n_nodes);
    let held = context.shards.n_owned();
    if held < target {
        let request = AcquireShardsRequest {
            node_id: context.node_id.clone(),
            shards: Vec::new(),
            lease_ms: settings.lease.as_millis() as u64,
            limit: (target - held) as u32,
        };
        let granted = context.store.acquire_shards(request).await.map_err(from_store)?.granted;
        let n = granted.len();
        take(context, granted);
        if n > 0 {
            info!(n, held = context.shards.n_owned(), target, "took shards");
        }
        return Ok(n);
    }
    if held > target {
        let placement = context.store.get_placement(pb::GetPlacementRequest {}).await.map_err(from_store)?;
        let mut counts: HashMap<&str, usize> = placement.nodes.iter().map(|node| (node.node_id.as_str(), 0)).collect();
        for owner in &placement.owners {
            *counts.entry(owner.node_id.as_str()).or_default() += 1;
        }
        let deficit: usize = counts
            .iter()
            .filter(|(node, _)| **node != context.node_id)
            .map(|(_, count)| target.saturating_sub(*count))
            .sum();
        let surplus = (held - target).min(deficit);
        if surplus > 0 {
            let mut fences = context.shards.held();
            fences.sort_by_key(|fence| std::cmp::Reverse(fence.shard));
            fences.truncate(surplus);
            release(context, fences).await?;
            info!(n = surplus, held = context.shards.n_owned(), target, "gave shards to less loaded nodes");
        }
    }
    Ok(0)
}

/// Stops serving the shards (requests get `NotOwner`, actors stop), then frees their leases at once.
async fn release(context: &Context, fences: Vec<Fence>) -> Result<(), RouterError> {
    let shards: HashSet<ShardId> = fences.iter().map(|fence| fence.shard).collect();
    context.shards.drop_shards(shards.iter().copied());
    stop_actors(context, &shards);
    let held = fences.iter().map(|fence| pb::Fence { shard: fence.shard.0, epoch: fence.epoch.0 }).collect();
    let request = pb::ReleaseShardsRequest { node_id: context.node_id.clone(), held };
    context.store.release_shards(request).await.map_err(from_store)?;
    Ok(())
}

/// Graceful shutdown: the node stops serving, then leaves the cluster, which frees all its leases in the same
/// transaction — so that the other nodes, woken by the change, already count one node less when they take
/// the shards.
pub(crate) async fn leave(context: &Context, settings: &LeaseSettings) -> Result<(), RouterError> {
    let n = context.shards.n_owned();
    give_up_all(context);
    register(context, settings, true).await?;
    info!(n_shards = n, "handed every shard over and left the cluster");
    Ok(())
}

/// Self-fencing: stops serving every shard at once.
fn give_up_all(context: &Context) {
    let all: HashSet<ShardId> = context.shards.held().iter().map(|fence| fence.shard).collect();
    context.shards.drop_all();
    stop_actors(context, &all);
}

/// Stops the actors whose keys fall in these shards.
fn stop_actors(context: &Context, shards: &HashSet<ShardId>) {
    context.subscribers.forget_where(|id| shards.contains(&shard_of(&conversation_key(id))));
    let n = context.conversations.stop_where(|id| shards.contains(&shard_of(&conversation_key(id))))
        + context.agents.stop_where(|(tenant, agent)| shards.contains(&shard_of(&agent_key(tenant, agent))))
        + context.queues.stop_where(|(tenant, group)| shards.contains(&shard_of(&queue_key(tenant, group))));
    if n > 0 {
        info!(n_actors = n, "stopped the actors of shards given up");
    }
}

/// Rebuilds the actors of newly taken shards from the store: every queue, every queued or active
/// conversation and every agent. Failures are logged; the actors are activated on first use anyway.
async fn activate_shards(context: Arc<Context>, shards: HashSet<ShardId>) {
    // A shard may have been given away again meanwhile: only what this node still owns is activated.
    let in_shards = |key: String| shards.contains(&shard_of(&key)) && context.shards.owns(&key);
    for tenant in context.directory.tenants() {
        for group in tenant.groups.keys() {
            if in_shards(queue_key(&tenant.id, group))
                && let Err(error) = QueueHandle::activate(&context, &tenant.id, group).await
            {
                warn!(%error, %group, "queue not activated after takeover");
            }
        }
        let request = ListConversationsRequest {
            tenant_id: tenant.id.to_string(),
            states: vec!["queued".into(), "active".into()],
            shards: shards.iter().map(|shard| shard.0).collect(),
            ..Default::default()
        };
        match list_all_conversations(&*context.store, request, LIST_PAGE).await {
            Ok(records) => {
                for record in records {
                    let Ok(id) = conversation_id(&record.id) else { continue };
                    if !context.shards.owns(&conversation_key(&id)) {
                        continue;
                    }
                    if let Err(error) = ConversationHandle::activate(&context, id).await {
                        warn!(%error, conversation = %id, "conversation not activated after takeover");
                    }
                }
            }
            Err(error) => warn!(%error, "cannot list the conversations of shards taken over"),
        }
        for agent in tenant.agents.keys() {
            if in_shards(agent_key(&tenant.id, agent))
                && let Err(error) = AgentHandle::activate(&context, &tenant.id, agent).await
            {
                warn!(%error, %agent, "agent not activated after takeover");
            }
        }
    }
}

/// Renews the leases until aborted, rebalances, and fences itself on a missed deadline.
pub(crate) async fn keep_leases(
    context: Arc<Context>,
    settings: LeaseSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_renewal = Instant::now();
    let mut fenced = false;
    let mut ticks = tokio::time::interval(settings.renew_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Stopped only here, between cycles: a request of a cycle must not reach the store after the node
        // has left (a heartbeat landing after the leave would register it again).
        tokio::select! {
            _ = ticks.tick() => {}
            () = context.placement_changed.notified() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        // Past the deadline another node may already own these shards: stop serving them before anything
        // else (a node resumed after a long pause must not answer as their owner even once).
        if last_renewal.elapsed() >= settings.renew_deadline && context.shards.n_owned() > 0 {
            warn!("lease renewal deadline passed: giving up every shard");
            give_up_all(&context);
            fenced = true;
        }
        let held: Vec<pb::Fence> = context
            .shards
            .held()
            .iter()
            .map(|fence| pb::Fence { shard: fence.shard.0, epoch: fence.epoch.0 })
            .collect();
        let request =
            RenewShardsRequest { node_id: context.node_id.clone(), held, lease_ms: settings.lease.as_millis() as u64 };
        let renewed = context.store.renew_shards(request).await;
        let outcome = if renewed.is_ok() { "ok" } else { "failed" };
        metrics::counter!(names::ROUTER_LEASE_RENEWALS, "outcome" => outcome).increment(1);
        match renewed {
            Ok(response) => {
                last_renewal = Instant::now();
                if std::mem::take(&mut fenced) {
                    match retake_own(&context, &settings).await {
                        Ok(n) => info!(n, "took back the shards given up while the store was unreachable"),
                        Err(error) => warn!(%error, "taking back own shards failed"),
                    }
                }
                if !response.lost.is_empty() {
                    warn!(n_lost = response.lost.len(), "shard leases lost to another node");
                    let lost: HashSet<ShardId> = response.lost.iter().map(|shard| ShardId(*shard)).collect();
                    context.shards.drop_shards(lost.iter().copied());
                    stop_actors(&context, &lost);
                }
                match register(&context, &settings, false).await {
                    Ok(nodes) => {
                        if let Err(error) = balance(&context, &settings, nodes.len()).await {
                            warn!(%error, "rebalancing shards failed");
                        }
                    }
                    Err(error) => warn!(%error, "node heartbeat failed"),
                }
            }
            Err(error) if last_renewal.elapsed() >= settings.renew_deadline => {
                if context.shards.n_owned() > 0 {
                    warn!(%error, "lease renewal deadline missed: giving up every shard");
                    give_up_all(&context);
                    fenced = true;
                }
            }
            Err(error) => warn!(%error, "lease renewal failed, will retry"),
        }
    }
}
