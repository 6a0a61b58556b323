//! Rows as the SQL backends read them (tuples, decoded by column position, so that both backends share one
//! decoding) and their conversion to the protobuf records.

use switchboard_proto::internal::v1::{ConversationRecord, EventRecord, NodeInfo, ShardLease, ShardOwner};
use switchboard_proto::store::StoreError;

use crate::error::{shard_from_i32, to_u64};

/// The columns of [`ConversationRow`], in order.
pub(crate) const CONVERSATION_COLUMNS: &str = "id, tenant_id, group_id, customer_name, first_question, state, \
     owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, last_seq, shard, customer_token";

pub(crate) type ConversationRow =
    (String, String, String, String, String, String, String, i64, i64, i64, i64, i64, i32, String);

pub(crate) fn conversation_from_row(row: ConversationRow) -> Result<ConversationRecord, StoreError> {
    let (
        id,
        tenant_id,
        group_id,
        customer_name,
        first_question,
        state,
        owner_agent_id,
        created_at_ms,
        queued_at_ms,
        accepted_at_ms,
        closed_at_ms,
        last_seq,
        shard,
        customer_token,
    ) = row;
    Ok(ConversationRecord {
        id,
        tenant_id,
        group_id,
        customer_name,
        first_question,
        state,
        owner_agent_id,
        created_at_ms,
        queued_at_ms,
        accepted_at_ms,
        closed_at_ms,
        last_seq: to_u64(last_seq, "last_seq")?,
        shard: shard_from_i32(shard)?,
        customer_token,
    })
}

/// A stored event; the client message id is NULL when the event has none.
pub(crate) type EventRow = (String, i64, i64, String, String, Option<String>, String, String);

pub(crate) fn event_from_row(row: EventRow) -> Result<EventRecord, StoreError> {
    let (conversation_id, seq, at_ms, author_role, author_id, client_msg_id, kind, payload_json) = row;
    Ok(EventRecord {
        conversation_id,
        seq: to_u64(seq, "seq")?,
        at_ms,
        author_role,
        author_id,
        client_msg_id: client_msg_id.unwrap_or_default(),
        kind,
        payload_json,
    })
}

/// `shard, epoch, expires_at_ms` of `shard_leases`.
pub(crate) type LeaseRow = (i32, i64, i64);

pub(crate) fn lease_from_row((shard, epoch, expires_at_ms): LeaseRow) -> Result<ShardLease, StoreError> {
    Ok(ShardLease { shard: shard_from_i32(shard)?, epoch: to_u64(epoch, "epoch")?, expires_at_ms })
}

/// `shard, owner, epoch` of `shard_leases`.
pub(crate) type OwnerRow = (i32, String, i64);

pub(crate) fn owner_from_row((shard, node_id, epoch): OwnerRow) -> Result<ShardOwner, StoreError> {
    Ok(ShardOwner { shard: shard_from_i32(shard)?, node_id, epoch: to_u64(epoch, "epoch")? })
}

/// `node_id, address, expires_at_ms` of `nodes`.
pub(crate) type NodeRow = (String, String, i64);

pub(crate) fn node_from_row((node_id, address, expires_at_ms): NodeRow) -> NodeInfo {
    NodeInfo { node_id, address, expires_at_ms }
}

/// `shard, epoch, node_id, acquired_at_ms` of `shard_lease_history`.
pub(crate) type GrantRow = (i32, i64, String, i64);

pub(crate) fn grant_from_row(
    (shard, epoch, node_id, acquired_at_ms): GrantRow,
) -> Result<crate::LeaseGrant, StoreError> {
    Ok(crate::LeaseGrant { shard: shard_from_i32(shard)?, epoch: to_u64(epoch, "epoch")?, node_id, acquired_at_ms })
}
