//! The node registry and the placement on PostgreSQL.

use switchboard_proto::internal::v1::{GetPlacementRequest, Placement, RegisterNodeRequest, RegisterNodeResponse};
use switchboard_proto::store::StoreError;

use super::PgStore;
use super::leases::FREE_LEASES_OF_NODE;
use crate::error::db;
use crate::leases::expires_at;
use crate::nodes::{DELETE_NODE, UPSERT_NODE, validate_registration};
use crate::records::{NodeRow, OwnerRow, node_from_row, owner_from_row};

/// Expired nodes are forgotten; rows another registration is changing right now are skipped (no waits).
const DELETE_EXPIRED_NODES: &str = "DELETE FROM nodes WHERE node_id IN ( \
     SELECT node_id FROM nodes WHERE expires_at_ms <= $1 ORDER BY node_id FOR UPDATE SKIP LOCKED)";

const SELECT_LIVE_NODES: &str = "SELECT node_id, address, expires_at_ms FROM nodes WHERE expires_at_ms > $1 \
     ORDER BY node_id COLLATE \"C\"";

const SELECT_OWNERS: &str =
    "SELECT shard, owner, epoch FROM shard_leases WHERE expires_at_ms > $1 AND owner <> '' ORDER BY shard";

pub(super) async fn register(
    store: &PgStore,
    request: RegisterNodeRequest,
) -> Result<RegisterNodeResponse, StoreError> {
    let registration = validate_registration(&request)?;
    let mut transaction = store.pool.begin().await.map_err(db)?;
    let now = store.now_ms(&mut transaction).await?;
    if registration.leaving {
        sqlx::query(DELETE_NODE).bind(registration.node).execute(&mut *transaction).await.map_err(db)?;
        sqlx::query(FREE_LEASES_OF_NODE)
            .bind(registration.node)
            .bind(now)
            .execute(&mut *transaction)
            .await
            .map_err(db)?;
    } else {
        sqlx::query(UPSERT_NODE)
            .bind(registration.node)
            .bind(registration.address)
            .bind(expires_at(now, registration.ttl_ms)?)
            .execute(&mut *transaction)
            .await
            .map_err(db)?;
    }
    sqlx::query(DELETE_EXPIRED_NODES).bind(now).execute(&mut *transaction).await.map_err(db)?;
    let rows: Vec<NodeRow> =
        sqlx::query_as(SELECT_LIVE_NODES).bind(now).fetch_all(&mut *transaction).await.map_err(db)?;
    transaction.commit().await.map_err(db)?;
    if registration.leaving {
        tracing::info!(node = registration.node, "node left");
    }
    Ok(RegisterNodeResponse { nodes: rows.into_iter().map(node_from_row).collect() })
}

pub(super) async fn placement(store: &PgStore, _request: GetPlacementRequest) -> Result<Placement, StoreError> {
    // One snapshot for both reads.
    let mut transaction = store.pool.begin().await.map_err(db)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *transaction)
        .await
        .map_err(db)?;
    let now = store.now_ms(&mut transaction).await?;
    let owners: Vec<OwnerRow> =
        sqlx::query_as(SELECT_OWNERS).bind(now).fetch_all(&mut *transaction).await.map_err(db)?;
    let nodes: Vec<NodeRow> =
        sqlx::query_as(SELECT_LIVE_NODES).bind(now).fetch_all(&mut *transaction).await.map_err(db)?;
    transaction.commit().await.map_err(db)?;
    Ok(Placement {
        owners: owners.into_iter().map(owner_from_row).collect::<Result<_, _>>()?,
        nodes: nodes.into_iter().map(node_from_row).collect(),
    })
}
