//! Shard leases: acquire and renew, each in one transaction of a few statements whatever the number of
//! shards.

use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};
use switchboard_domain::N_SHARDS;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, RenewShardsRequest, RenewShardsResponse, ShardLease,
};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::{db, shard_from_i32, shard_to_i32, to_i64, to_u64};

/// Creates the missing rows of every shard, free (no owner, epoch 0, expired), so that granting is one
/// UPDATE. `WHERE true` keeps SQLite from parsing `ON CONFLICT` as a join constraint.
const INSERT_ALL_SHARDS: &str = "WITH RECURSIVE wanted (shard) AS \
     (SELECT 0 UNION ALL SELECT shard + 1 FROM wanted WHERE shard + 1 < $1) \
     INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms) \
     SELECT shard, '', 0, 0 FROM wanted WHERE true \
     ON CONFLICT (shard) DO NOTHING";

/// Grants every shard that is expired or already this node's. A new row goes from epoch 0 to 1.
const GRANT_ALL_SHARDS: &str = "UPDATE shard_leases SET owner = $1, epoch = epoch + 1, expires_at_ms = $2 \
     WHERE owner = $1 OR expires_at_ms <= $3 \
     RETURNING shard, epoch, expires_at_ms";

const RETURNING_LEASE: &str = " RETURNING shard, epoch, expires_at_ms";

pub(crate) async fn acquire(
    store: &SqlStore,
    request: AcquireShardsRequest,
) -> Result<AcquireShardsResponse, StoreError> {
    let node = non_empty_node(&request.node_id)?;
    let mut shards = request.shards.iter().map(|&shard| shard_to_i32(shard)).collect::<Result<Vec<_>, _>>()?;
    shards.sort_unstable();
    shards.dedup();
    let lease_ms = to_i64(request.lease_ms, "lease_ms")?;

    let mut transaction = store.writer.begin().await.map_err(db)?;
    let now = store.now_ms();
    let expires_at_ms = expires_at(now, lease_ms)?;
    let rows = if shards.is_empty() {
        sqlx::query(INSERT_ALL_SHARDS).bind(i64::from(N_SHARDS)).execute(&mut *transaction).await.map_err(db)?;
        sqlx::query(GRANT_ALL_SHARDS)
            .bind(node)
            .bind(expires_at_ms)
            .bind(now)
            .fetch_all(&mut *transaction)
            .await
            .map_err(db)?
    } else {
        let mut insert = QueryBuilder::<Sqlite>::new("INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms) ");
        insert.push_values(&shards, |mut row, &shard| {
            row.push_bind(shard).push_bind("").push_bind(0_i64).push_bind(0_i64);
        });
        insert.push(" ON CONFLICT (shard) DO NOTHING");
        insert.build().persistent(false).execute(&mut *transaction).await.map_err(db)?;

        let mut grant = QueryBuilder::<Sqlite>::new("UPDATE shard_leases SET owner = ");
        grant.push_bind(node).push(", epoch = epoch + 1, expires_at_ms = ").push_bind(expires_at_ms);
        grant.push(" WHERE (owner = ").push_bind(node).push(" OR expires_at_ms <= ").push_bind(now);
        grant.push(") AND shard IN (");
        let mut list = grant.separated(", ");
        for &shard in &shards {
            list.push_bind(shard);
        }
        grant.push(")").push(RETURNING_LEASE);
        grant.build().persistent(false).fetch_all(&mut *transaction).await.map_err(db)?
    };
    transaction.commit().await.map_err(db)?;

    let mut granted = rows.iter().map(lease_from_row).collect::<Result<Vec<_>, _>>()?;
    granted.sort_unstable_by_key(|lease| lease.shard);
    tracing::debug!(node, granted = granted.len(), "acquired shards");
    Ok(AcquireShardsResponse { granted })
}

pub(crate) async fn renew(store: &SqlStore, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
    let node = non_empty_node(&request.node_id)?;
    let lease_ms = to_i64(request.lease_ms, "lease_ms")?;
    let held = request
        .held
        .iter()
        .map(|fence| Ok((shard_to_i32(fence.shard)?, to_i64(fence.epoch, "epoch")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    if held.is_empty() {
        return Ok(RenewShardsResponse::default());
    }

    let expires_at_ms = expires_at(store.now_ms(), lease_ms)?;
    // One statement: only the rows still owned by this node under the epoch it holds are extended.
    let mut renew = QueryBuilder::<Sqlite>::new("UPDATE shard_leases SET expires_at_ms = ");
    renew.push_bind(expires_at_ms).push(" WHERE owner = ").push_bind(node);
    renew.push(" AND (shard, epoch) IN (");
    renew.push_values(&held, |mut row, &(shard, epoch)| {
        row.push_bind(shard).push_bind(epoch);
    });
    renew.push(")").push(RETURNING_LEASE);
    let rows = renew.build().persistent(false).fetch_all(&store.writer).await.map_err(db)?;

    let mut renewed = rows.iter().map(lease_from_row).collect::<Result<Vec<_>, _>>()?;
    renewed.sort_unstable_by_key(|lease| lease.shard);
    let mut lost: Vec<u32> = request
        .held
        .iter()
        .map(|fence| fence.shard)
        .filter(|shard| renewed.binary_search_by_key(shard, |lease| lease.shard).is_err())
        .collect();
    lost.sort_unstable();
    lost.dedup();
    if !lost.is_empty() {
        tracing::info!(node, ?lost, "shard leases lost");
    }
    Ok(RenewShardsResponse { renewed, lost })
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

fn lease_from_row(row: &SqliteRow) -> Result<ShardLease, StoreError> {
    Ok(ShardLease {
        shard: shard_from_i32(row.try_get("shard").map_err(db)?)?,
        epoch: to_u64(row.try_get("epoch").map_err(db)?, "epoch")?,
        expires_at_ms: row.try_get("expires_at_ms").map_err(db)?,
    })
}
