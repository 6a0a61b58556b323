//! Shard leases on SQLite: acquire, renew and release, each in one transaction of a few statements
//! whatever the number of shards; and the validation the backends share.
//!
//! Every grant bumps the shard's epoch and is recorded in `shard_lease_history` in the same transaction.

use sqlx::{QueryBuilder, Sqlite};
use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, Fence, ReleaseShardsRequest, ReleaseShardsResponse,
    RenewShardsRequest, RenewShardsResponse, ShardLease,
};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::{db, shard_from_i32, shard_to_i32, to_i64};
use crate::records::{LeaseRow, lease_from_row};

/// Creates the missing rows of every shard, free (no owner, epoch 0, expired), so that granting is one
/// UPDATE. `WHERE true` keeps SQLite from parsing `ON CONFLICT` as a join constraint.
const INSERT_ALL_SHARDS: &str = "WITH RECURSIVE wanted (shard) AS \
     (SELECT 0 UNION ALL SELECT shard + 1 FROM wanted WHERE shard + 1 < $1) \
     INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms) \
     SELECT shard, '', 0, 0 FROM wanted WHERE true \
     ON CONFLICT (shard) DO NOTHING";

const RETURNING_LEASE: &str = " RETURNING shard, epoch, expires_at_ms";

/// An acquire, validated.
pub(crate) struct Acquire<'a> {
    pub node: &'a str,
    /// Sorted, distinct; empty means every shard.
    pub shards: Vec<i32>,
    pub lease_ms: i64,
    /// `None`: no limit. With a limit only free or expired shards are taken: re-taking a shard this node
    /// holds would bump its epoch (fencing off the node's own actors) without adding a shard.
    pub limit: Option<i64>,
}

pub(crate) fn validate_acquire(request: &AcquireShardsRequest) -> Result<Acquire<'_>, StoreError> {
    let node = non_empty_node(&request.node_id)?;
    let mut shards = request.shards.iter().map(|&shard| shard_to_i32(shard)).collect::<Result<Vec<_>, _>>()?;
    shards.sort_unstable();
    shards.dedup();
    let lease_ms = to_i64(request.lease_ms, "lease_ms")?;
    let limit = (request.limit > 0).then(|| i64::from(request.limit));
    Ok(Acquire { node, shards, lease_ms, limit })
}

/// The fences of a renew or release as `(shard, epoch)` column values, each checked.
pub(crate) fn held(fences: &[Fence]) -> Result<Vec<(i32, i64)>, StoreError> {
    fences.iter().map(|fence| Ok((shard_to_i32(fence.shard)?, to_i64(fence.epoch, "epoch")?))).collect()
}

pub(crate) async fn acquire(
    store: &SqlStore,
    request: AcquireShardsRequest,
) -> Result<AcquireShardsResponse, StoreError> {
    let acquire = validate_acquire(&request)?;

    let mut transaction = store.begin_write().await?;
    let now = store.now_ms();
    let expires_at_ms = expires_at(now, acquire.lease_ms)?;
    if acquire.shards.is_empty() {
        sqlx::query(INSERT_ALL_SHARDS).bind(i64::from(N_SHARDS)).execute(&mut *transaction).await.map_err(db)?;
    } else {
        let mut insert = QueryBuilder::<Sqlite>::new("INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms) ");
        insert.push_values(&acquire.shards, |mut row, &shard| {
            row.push_bind(shard).push_bind("").push_bind(0_i64).push_bind(0_i64);
        });
        insert.push(" ON CONFLICT (shard) DO NOTHING");
        insert.build().persistent(false).execute(&mut *transaction).await.map_err(db)?;
    }

    // The shards to take, lowest first; then one UPDATE of exactly those.
    let mut grant = QueryBuilder::<Sqlite>::new("UPDATE shard_leases SET owner = ");
    grant.push_bind(acquire.node).push(", epoch = epoch + 1, expires_at_ms = ").push_bind(expires_at_ms);
    grant.push(" WHERE shard IN (SELECT shard FROM shard_leases WHERE (expires_at_ms <= ").push_bind(now);
    if acquire.limit.is_none() {
        grant.push(" OR owner = ").push_bind(acquire.node);
    }
    grant.push(")");
    if !acquire.shards.is_empty() {
        grant.push(" AND shard IN (");
        let mut list = grant.separated(", ");
        for &shard in &acquire.shards {
            list.push_bind(shard);
        }
        grant.push(")");
    }
    grant.push(" ORDER BY shard");
    if let Some(limit) = acquire.limit {
        grant.push(" LIMIT ").push_bind(limit);
    }
    grant.push(")").push(RETURNING_LEASE);
    let rows: Vec<LeaseRow> =
        grant.build_query_as().persistent(false).fetch_all(&mut *transaction).await.map_err(db)?;

    if !rows.is_empty() {
        let mut history =
            QueryBuilder::<Sqlite>::new("INSERT INTO shard_lease_history (shard, epoch, node_id, acquired_at_ms) ");
        history.push_values(&rows, |mut row, &(shard, epoch, _)| {
            row.push_bind(shard).push_bind(epoch).push_bind(acquire.node).push_bind(now);
        });
        history.build().persistent(false).execute(&mut *transaction).await.map_err(db)?;
    }
    transaction.commit().await.map_err(db)?;

    let mut granted = rows.into_iter().map(lease_from_row).collect::<Result<Vec<_>, _>>()?;
    granted.sort_unstable_by_key(|lease| lease.shard);
    tracing::debug!(node = acquire.node, granted = granted.len(), "acquired shards");
    Ok(AcquireShardsResponse { granted })
}

pub(crate) async fn renew(store: &SqlStore, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
    let node = non_empty_node(&request.node_id)?;
    let lease_ms = to_i64(request.lease_ms, "lease_ms")?;
    let held = held(&request.held)?;
    if held.is_empty() {
        return Ok(RenewShardsResponse::default());
    }

    let expires_at_ms = expires_at(store.now_ms(), lease_ms)?;
    let mut pairs = held;
    pairs.sort_unstable();
    pairs.dedup();
    // One statement: only the rows still owned by this node under the epoch it holds are extended. Without
    // `RETURNING`: SQLite hands a statement's rows to sqlx one by one through a bounded channel, and keeps
    // the statement, and with it the database's write lock, open until the last is taken. For a node's
    // 1,024 shards that held the lock for 2-8 ms every renewal, while every append waited for it.
    let mut renew = QueryBuilder::<Sqlite>::new("UPDATE shard_leases SET expires_at_ms = ");
    renew.push_bind(expires_at_ms).push(" WHERE owner = ").push_bind(node);
    push_pairs(&mut renew, &pairs);
    let extended = renew.build().persistent(false).execute(&store.writer).await.map_err(db)?.rows_affected();
    let renewed = if extended == pairs.len() as u64 {
        // Every lease asked for: each row matched is one of the distinct pairs.
        pairs.into_iter().map(|(shard, epoch)| lease_from_row((shard, epoch, expires_at_ms))).collect()
    } else {
        // Some were lost: the answer is what this node holds now under the epochs asked for, read after the
        // lock is let go. A lease just renewed is not expired, so no other node can have taken it since;
        // only this node's own release or re-acquire could have moved it, and then it is no longer held
        // under the epoch asked for, which is what "lost" tells the node.
        let mut still =
            QueryBuilder::<Sqlite>::new("SELECT shard, epoch, expires_at_ms FROM shard_leases WHERE owner = ");
        still.push_bind(node);
        push_pairs(&mut still, &pairs);
        let rows: Vec<LeaseRow> =
            still.build_query_as().persistent(false).fetch_all(&store.writer).await.map_err(db)?;
        rows.into_iter().map(lease_from_row).collect::<Result<Vec<_>, _>>()
    }?;
    Ok(renewal(node, &request.held, renewed))
}

/// ` AND (shard, epoch) IN (VALUES ...)` of a statement's `WHERE`.
fn push_pairs(query: &mut QueryBuilder<Sqlite>, pairs: &[(i32, i64)]) {
    query.push(" AND (shard, epoch) IN (");
    query.push_values(pairs, |mut row, &(shard, epoch)| {
        row.push_bind(shard).push_bind(epoch);
    });
    query.push(")");
}

/// The answer to a renewal: the leases renewed in shard order, and every other shard asked for, once.
pub(crate) fn renewal(node: &str, asked: &[Fence], mut renewed: Vec<ShardLease>) -> RenewShardsResponse {
    renewed.sort_unstable_by_key(|lease| lease.shard);
    let mut lost: Vec<u32> = asked
        .iter()
        .map(|fence| fence.shard)
        .filter(|shard| renewed.binary_search_by_key(shard, |lease| lease.shard).is_err())
        .collect();
    lost.sort_unstable();
    lost.dedup();
    if !lost.is_empty() {
        tracing::info!(node, ?lost, "shard leases lost");
    }
    RenewShardsResponse { renewed, lost }
}

/// Frees the leases still held by the node at the given epochs: no owner, expired now (an expiry already
/// in the past stays as it was). The epoch is kept: the next grant bumps it.
pub(crate) async fn release(
    store: &SqlStore,
    request: ReleaseShardsRequest,
) -> Result<ReleaseShardsResponse, StoreError> {
    let node = non_empty_node(&request.node_id)?;
    let held = held(&request.held)?;
    if held.is_empty() {
        return Ok(ReleaseShardsResponse::default());
    }
    let now = store.now_ms();
    let mut release =
        QueryBuilder::<Sqlite>::new("UPDATE shard_leases SET owner = '', expires_at_ms = CASE WHEN expires_at_ms < ");
    release.push_bind(now).push(" THEN expires_at_ms ELSE ").push_bind(now).push(" END WHERE owner = ");
    release.push_bind(node);
    push_pairs(&mut release, &held);
    release.push(" RETURNING shard");
    let rows: Vec<(i32,)> = release.build_query_as().persistent(false).fetch_all(&store.writer).await.map_err(db)?;
    released(node, rows.into_iter().map(|(shard,)| shard))
}

pub(crate) fn released(node: &str, shards: impl Iterator<Item = i32>) -> Result<ReleaseShardsResponse, StoreError> {
    let mut released = shards.map(shard_from_i32).collect::<Result<Vec<_>, _>>()?;
    released.sort_unstable();
    tracing::info!(node, n_released = released.len(), "shard leases released");
    Ok(ReleaseShardsResponse { released })
}

pub(crate) fn non_empty_node(node_id: &str) -> Result<&str, StoreError> {
    if node_id.is_empty() {
        return Err(StoreError::Invalid("empty node id".into()));
    }
    Ok(node_id)
}

pub(crate) fn expires_at(now_ms: i64, lease_ms: i64) -> Result<i64, StoreError> {
    now_ms.checked_add(lease_ms).ok_or_else(|| StoreError::Invalid(format!("lease_ms out of range: {lease_ms}")))
}
