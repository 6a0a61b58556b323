//! Rows as the SQL backends read them (tuples, decoded by column position, so that both backends share one
//! decoding) and their conversion to the protobuf records.

use prost::Message as _;
use sqlx::{ColumnIndex, Decode, FromRow, Row, Type};
use switchboard_proto::internal::v1::{
    ConversationRecord, EventRecord, NodeInfo, ShardLease, ShardOwner, TicketRecord,
};
use switchboard_proto::store::StoreError;

use crate::error::{shard_from_i32, to_u64};

/// The columns of [`ConversationRow`], in order.
pub(crate) const CONVERSATION_COLUMNS: &str = "id, tenant_id, group_id, customer_name, first_question, state, \
     owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, last_seq, shard, customer_token, \
     offer_agent_id, offer_expires_at_ms, offered_to, customer_delivered_up_to, agent_delivered_up_to, customer_away";

/// A row of `conversations` as selected with [`CONVERSATION_COLUMNS`] (more columns than sqlx decodes into a
/// tuple, hence a struct decoded by position).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConversationRow {
    id: String,
    tenant_id: String,
    group_id: String,
    customer_name: String,
    first_question: String,
    state: String,
    owner_agent_id: String,
    created_at_ms: i64,
    queued_at_ms: i64,
    accepted_at_ms: i64,
    closed_at_ms: i64,
    last_seq: i64,
    shard: i32,
    customer_token: String,
    offer_agent_id: String,
    offer_expires_at_ms: i64,
    /// A JSON array of agent ids.
    offered_to: String,
    customer_delivered_up_to: i64,
    agent_delivered_up_to: i64,
    /// 1: the customer left the ongoing chat and has not returned; else 0.
    customer_away: i64,
}

impl<'r, R> FromRow<'r, R> for ConversationRow
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        Ok(ConversationRow {
            id: row.try_get(0)?,
            tenant_id: row.try_get(1)?,
            group_id: row.try_get(2)?,
            customer_name: row.try_get(3)?,
            first_question: row.try_get(4)?,
            state: row.try_get(5)?,
            owner_agent_id: row.try_get(6)?,
            created_at_ms: row.try_get(7)?,
            queued_at_ms: row.try_get(8)?,
            accepted_at_ms: row.try_get(9)?,
            closed_at_ms: row.try_get(10)?,
            last_seq: row.try_get(11)?,
            shard: row.try_get(12)?,
            customer_token: row.try_get(13)?,
            offer_agent_id: row.try_get(14)?,
            offer_expires_at_ms: row.try_get(15)?,
            offered_to: row.try_get(16)?,
            customer_delivered_up_to: row.try_get(17)?,
            agent_delivered_up_to: row.try_get(18)?,
            customer_away: row.try_get(19)?,
        })
    }
}

pub(crate) fn conversation_from_row(row: ConversationRow) -> Result<ConversationRecord, StoreError> {
    Ok(ConversationRecord {
        last_seq: to_u64(row.last_seq, "last_seq")?,
        shard: shard_from_i32(row.shard)?,
        offered_to: agents_from_json(&row.offered_to)?,
        id: row.id,
        tenant_id: row.tenant_id,
        group_id: row.group_id,
        customer_name: row.customer_name,
        first_question: row.first_question,
        state: row.state,
        owner_agent_id: row.owner_agent_id,
        created_at_ms: row.created_at_ms,
        queued_at_ms: row.queued_at_ms,
        accepted_at_ms: row.accepted_at_ms,
        closed_at_ms: row.closed_at_ms,
        customer_token: row.customer_token,
        offer_agent_id: row.offer_agent_id,
        offer_expires_at_ms: row.offer_expires_at_ms,
        delivery_marks_known: row.customer_delivered_up_to >= 0 && row.agent_delivered_up_to >= 0,
        customer_delivered_up_to: u64::try_from(row.customer_delivered_up_to).unwrap_or(0),
        agent_delivered_up_to: u64::try_from(row.agent_delivered_up_to).unwrap_or(0),
        customer_away: row.customer_away != 0,
    })
}

/// The `offered_to` column: the agent ids as a JSON array of strings.
pub(crate) fn agents_to_json(agents: &[String]) -> String {
    // Serializing strings cannot fail; should it ever, the column still holds a valid (empty) array.
    serde_json::to_string(agents).unwrap_or_else(|_| "[]".to_owned())
}

/// The agent ids of an `offered_to` column; a value that is not a JSON array of strings is corrupt data.
pub(crate) fn agents_from_json(json: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(json).map_err(|error| StoreError::Invalid(format!("stored offered_to is malformed: {error}")))
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

/// The answer of a read of the log, as it is filled: every event, or with `max_bytes` set, as many as fit
/// in it (their encoded records), and always the first, however large.
pub(crate) struct Page {
    max_bytes: u64,
    bytes: u64,
    events: Vec<EventRecord>,
}

impl Page {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Page { max_bytes, bytes: 0, events: Vec::new() }
    }

    /// Adds the next event; `false` when it does not fit (the page is complete without it).
    pub(crate) fn add(&mut self, event: EventRecord) -> bool {
        let bytes = self.bytes.saturating_add(event.encoded_len() as u64);
        if self.max_bytes > 0 && !self.events.is_empty() && bytes > self.max_bytes {
            return false;
        }
        self.bytes = bytes;
        self.events.push(event);
        true
    }

    pub(crate) fn into_events(self) -> Vec<EventRecord> {
        self.events
    }
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

/// The columns of [`TicketRow`], in order (every ticket statement selects them: checked by a test).
#[cfg(test)]
pub(crate) const TICKET_COLUMNS: &str = "id, tenant_id, group_id, kind, reason, customer_name, customer_contact, \
     subject, body, conversation_id, created_at_ms, idempotency_key";

/// A row of `tickets`, as selected with [`TICKET_COLUMNS`].
pub(crate) type TicketRow =
    (String, String, String, String, String, String, String, String, String, String, i64, String);

pub(crate) fn ticket_from_row(row: TicketRow) -> TicketRecord {
    let (
        id,
        tenant_id,
        group_id,
        kind,
        reason,
        customer_name,
        customer_contact,
        subject,
        body,
        conversation_id,
        created_at_ms,
        idempotency_key,
    ) = row;
    TicketRecord {
        id,
        tenant_id,
        group_id,
        kind,
        reason,
        customer_name,
        customer_contact,
        subject,
        body,
        conversation_id,
        created_at_ms,
        idempotency_key,
    }
}
