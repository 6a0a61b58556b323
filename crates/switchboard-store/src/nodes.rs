//! The node registry and the placement on SQLite, and the validation the backends share.
//!
//! A node is alive while its row's `expires_at_ms` is after database time (the same rule as a lease:
//! expired means `expires_at_ms <= now`). Each registration also forgets the nodes that expired.

use switchboard_proto::internal::v1::{GetPlacementRequest, Placement, RegisterNodeRequest, RegisterNodeResponse};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::{db, to_i64};
use crate::leases::{expires_at, non_empty_node};
use crate::records::{NodeRow, OwnerRow, node_from_row, owner_from_row};

pub(crate) const UPSERT_NODE: &str = "INSERT INTO nodes (node_id, address, expires_at_ms) VALUES ($1, $2, $3) \
     ON CONFLICT (node_id) DO UPDATE SET address = excluded.address, expires_at_ms = excluded.expires_at_ms";

pub(crate) const DELETE_NODE: &str = "DELETE FROM nodes WHERE node_id = $1";

const DELETE_EXPIRED_NODES: &str = "DELETE FROM nodes WHERE expires_at_ms <= $1";

/// Frees every lease of a leaving node (as a release does: no owner, expired now).
const FREE_LEASES_OF_NODE: &str = "UPDATE shard_leases SET owner = '', \
     expires_at_ms = CASE WHEN expires_at_ms < $2 THEN expires_at_ms ELSE $2 END WHERE owner = $1";

pub(crate) const SELECT_LIVE_NODES: &str =
    "SELECT node_id, address, expires_at_ms FROM nodes WHERE expires_at_ms > $1 ORDER BY node_id";

const SELECT_OWNERS: &str =
    "SELECT shard, owner, epoch FROM shard_leases WHERE expires_at_ms > $1 AND owner <> '' ORDER BY shard";

/// A registration, validated.
pub(crate) struct Registration<'a> {
    pub node: &'a str,
    pub address: &'a str,
    pub ttl_ms: i64,
    pub leaving: bool,
}

pub(crate) fn validate_registration(request: &RegisterNodeRequest) -> Result<Registration<'_>, StoreError> {
    let node = non_empty_node(&request.node_id)?;
    let ttl_ms = to_i64(request.ttl_ms, "ttl_ms")?;
    if ttl_ms == 0 && !request.leaving {
        return Err(StoreError::Invalid(format!("node {node} registers with a time to live of 0")));
    }
    Ok(Registration { node, address: &request.address, ttl_ms, leaving: request.leaving })
}

pub(crate) async fn register(
    store: &SqlStore,
    request: RegisterNodeRequest,
) -> Result<RegisterNodeResponse, StoreError> {
    let registration = validate_registration(&request)?;
    let mut transaction = store.begin_write().await?;
    let now = store.now_ms();
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

pub(crate) async fn placement(store: &SqlStore, _request: GetPlacementRequest) -> Result<Placement, StoreError> {
    // Both reads on one connection in one transaction: one consistent picture.
    let mut transaction = store.reader.begin().await.map_err(db)?;
    let now = store.now_ms();
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
