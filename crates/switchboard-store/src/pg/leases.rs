//! Shard leases on PostgreSQL: compare-and-set on database time under row locks taken in shard order.
//!
//! Each statement first locks the rows it may change (`SELECT ... ORDER BY shard FOR UPDATE` in a CTE),
//! then updates them with its condition checked again on the locked row: two nodes racing for a shard
//! take turns on its row, and the second finds the first's unexpired lease and leaves it. Locking in shard
//! order everywhere (append batches lock their fences `FOR SHARE` in shard order too) means no cycle of
//! waits. The grant and its history row are written by one statement.

use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, ReleaseShardsRequest, ReleaseShardsResponse, RenewShardsRequest,
    RenewShardsResponse,
};
use switchboard_proto::store::StoreError;

use super::PgStore;
use crate::error::db;
use crate::leases::{expires_at, held, non_empty_node, released, renewal, validate_acquire};
use crate::records::{LeaseRow, lease_from_row};

const INSERT_SHARDS: &str = "INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms) \
     SELECT shard, '', 0, 0 FROM unnest($1::int4[]) AS wanted (shard) ORDER BY shard \
     ON CONFLICT (shard) DO NOTHING";

/// $1 node, $2 new expiry, $3 now, $4 the shards wanted, $5 the limit (NULL: none), $6 whether limited
/// (then only free or expired shards are taken, never the node's own unexpired ones).
const GRANT: &str = "WITH chosen AS ( \
         SELECT shard FROM shard_leases \
         WHERE shard = ANY($4) AND (expires_at_ms <= $3 OR (owner = $1 AND NOT $6)) \
         ORDER BY shard LIMIT $5 FOR UPDATE \
     ), granted AS ( \
         UPDATE shard_leases AS lease SET owner = $1, epoch = lease.epoch + 1, expires_at_ms = $2 \
         FROM chosen \
         WHERE lease.shard = chosen.shard AND (lease.expires_at_ms <= $3 OR (lease.owner = $1 AND NOT $6)) \
         RETURNING lease.shard, lease.epoch, lease.expires_at_ms \
     ), history AS ( \
         INSERT INTO shard_lease_history (shard, epoch, node_id, acquired_at_ms) \
         SELECT shard, epoch, $1, $3 FROM granted \
     ) \
     SELECT shard, epoch, expires_at_ms FROM granted ORDER BY shard";

/// $1 node, $2 new expiry, $3 shards, $4 their epochs.
const RENEW: &str = "WITH chosen AS ( \
         SELECT lease.shard, lease.epoch FROM shard_leases AS lease \
         WHERE lease.owner = $1 AND (lease.shard, lease.epoch) IN (SELECT * FROM unnest($3::int4[], $4::int8[])) \
         ORDER BY lease.shard FOR UPDATE \
     ) \
     UPDATE shard_leases AS lease SET expires_at_ms = $2 FROM chosen \
     WHERE lease.shard = chosen.shard AND lease.owner = $1 AND lease.epoch = chosen.epoch \
     RETURNING lease.shard, lease.epoch, lease.expires_at_ms";

/// $1 node, $2 now, $3 shards, $4 their epochs.
const RELEASE: &str = "WITH chosen AS ( \
         SELECT lease.shard, lease.epoch FROM shard_leases AS lease \
         WHERE lease.owner = $1 AND (lease.shard, lease.epoch) IN (SELECT * FROM unnest($3::int4[], $4::int8[])) \
         ORDER BY lease.shard FOR UPDATE \
     ) \
     UPDATE shard_leases AS lease SET owner = '', \
         expires_at_ms = CASE WHEN lease.expires_at_ms < $2 THEN lease.expires_at_ms ELSE $2 END \
     FROM chosen WHERE lease.shard = chosen.shard AND lease.owner = $1 AND lease.epoch = chosen.epoch \
     RETURNING lease.shard";

/// $1 node, $2 now: every lease of a leaving node.
pub(super) const FREE_LEASES_OF_NODE: &str = "WITH chosen AS ( \
         SELECT shard FROM shard_leases WHERE owner = $1 ORDER BY shard FOR UPDATE \
     ) \
     UPDATE shard_leases AS lease SET owner = '', \
         expires_at_ms = CASE WHEN lease.expires_at_ms < $2 THEN lease.expires_at_ms ELSE $2 END \
     FROM chosen WHERE lease.shard = chosen.shard AND lease.owner = $1";

pub(super) async fn acquire(
    store: &PgStore,
    request: AcquireShardsRequest,
) -> Result<AcquireShardsResponse, StoreError> {
    let acquire = validate_acquire(&request)?;
    let shards = if acquire.shards.is_empty() {
        (0..N_SHARDS).map(|shard| shard as i32).collect()
    } else {
        acquire.shards.clone()
    };

    let mut transaction = store.pool.begin().await.map_err(db)?;
    let now = store.now_ms(&mut transaction).await?;
    let expires_at_ms = expires_at(now, acquire.lease_ms)?;
    sqlx::query(INSERT_SHARDS).bind(&shards).execute(&mut *transaction).await.map_err(db)?;
    let rows: Vec<LeaseRow> = sqlx::query_as(GRANT)
        .bind(acquire.node)
        .bind(expires_at_ms)
        .bind(now)
        .bind(&shards)
        .bind(acquire.limit)
        .bind(acquire.limit.is_some())
        .fetch_all(&mut *transaction)
        .await
        .map_err(db)?;
    transaction.commit().await.map_err(db)?;

    let granted = rows.into_iter().map(lease_from_row).collect::<Result<Vec<_>, _>>()?;
    tracing::debug!(node = acquire.node, granted = granted.len(), "acquired shards");
    Ok(AcquireShardsResponse { granted })
}

pub(super) async fn renew(store: &PgStore, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
    let node = non_empty_node(&request.node_id)?;
    let lease_ms = crate::error::to_i64(request.lease_ms, "lease_ms")?;
    let held = held(&request.held)?;
    if held.is_empty() {
        return Ok(RenewShardsResponse::default());
    }
    let (shards, epochs): (Vec<i32>, Vec<i64>) = held.into_iter().unzip();

    let mut transaction = store.pool.begin().await.map_err(db)?;
    let expires_at_ms = expires_at(store.now_ms(&mut transaction).await?, lease_ms)?;
    let rows: Vec<LeaseRow> = sqlx::query_as(RENEW)
        .bind(node)
        .bind(expires_at_ms)
        .bind(&shards)
        .bind(&epochs)
        .fetch_all(&mut *transaction)
        .await
        .map_err(db)?;
    transaction.commit().await.map_err(db)?;
    let renewed = rows.into_iter().map(lease_from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(renewal(node, &request.held, renewed))
}

pub(super) async fn release(
    store: &PgStore,
    request: ReleaseShardsRequest,
) -> Result<ReleaseShardsResponse, StoreError> {
    let node = non_empty_node(&request.node_id)?;
    let held = held(&request.held)?;
    if held.is_empty() {
        return Ok(ReleaseShardsResponse::default());
    }
    let (shards, epochs): (Vec<i32>, Vec<i64>) = held.into_iter().unzip();

    let mut transaction = store.pool.begin().await.map_err(db)?;
    let now = store.now_ms(&mut transaction).await?;
    let rows: Vec<(i32,)> = sqlx::query_as(RELEASE)
        .bind(node)
        .bind(now)
        .bind(&shards)
        .bind(&epochs)
        .fetch_all(&mut *transaction)
        .await
        .map_err(db)?;
    transaction.commit().await.map_err(db)?;
    released(node, rows.into_iter().map(|(shard,)| shard))
}
