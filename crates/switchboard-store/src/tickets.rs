//! Tickets (offline messages) on SQLite, and the validation and SQL the backends share.
//!
//! A ticket is stored once per (tenant, idempotency key): a retry answers the ticket stored the first
//! time, marked `duplicate`. Its id is chosen by the caller; another ticket with the same id is `Invalid`.

use switchboard_proto::internal::v1::{
    CreateTicketRequest, CreateTicketResponse, ListTicketsRequest, ListTicketsResponse, TicketRecord,
};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::db;
use crate::records::{TicketRow, ticket_from_row};

/// The columns are those of `records::TICKET_COLUMNS`.
pub(crate) const SELECT_TICKET_BY_KEY: &str = "SELECT id, tenant_id, group_id, kind, reason, customer_name, \
     customer_contact, subject, body, conversation_id, created_at_ms, idempotency_key FROM tickets \
     WHERE tenant_id = $1 AND idempotency_key = $2";

/// A retry that races the first copy (PostgreSQL) finds it after the insert did nothing: the insert waits
/// for the first copy's transaction to end before deciding the conflict.
pub(crate) const INSERT_TICKET: &str = "INSERT INTO tickets (id, tenant_id, group_id, kind, reason, customer_name, \
     customer_contact, subject, body, conversation_id, created_at_ms, idempotency_key) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
     ON CONFLICT (tenant_id, idempotency_key) DO NOTHING";

/// Every tenant's tickets, newest first (`$1`: the limit, -1 for none on SQLite, NULL on PostgreSQL).
const SELECT_TICKETS: &str = "SELECT id, tenant_id, group_id, kind, reason, customer_name, customer_contact, \
     subject, body, conversation_id, created_at_ms, idempotency_key FROM tickets \
     ORDER BY created_at_ms DESC, id DESC LIMIT $1";

/// A tenant's tickets, newest first (`$2`: the limit, as above).
const SELECT_TENANT_TICKETS: &str = "SELECT id, tenant_id, group_id, kind, reason, customer_name, \
     customer_contact, subject, body, conversation_id, created_at_ms, idempotency_key FROM tickets \
     WHERE tenant_id = $1 ORDER BY created_at_ms DESC, id DESC LIMIT $2";

/// The ticket of a `CreateTicket`, with its required fields checked: id, tenant, group, kind, body and
/// idempotency key must not be empty.
pub(crate) fn validate_ticket(request: CreateTicketRequest) -> Result<TicketRecord, StoreError> {
    let ticket = request.ticket.ok_or_else(|| StoreError::Invalid("create ticket without a ticket".into()))?;
    let required = [
        ("id", &ticket.id),
        ("tenant_id", &ticket.tenant_id),
        ("group_id", &ticket.group_id),
        ("kind", &ticket.kind),
        ("body", &ticket.body),
        ("idempotency_key", &ticket.idempotency_key),
    ];
    if let Some((field, _)) = required.iter().find(|(_, value)| value.is_empty()) {
        return Err(StoreError::Invalid(format!("ticket without {field}")));
    }
    Ok(ticket)
}

pub(crate) fn lost_ticket(ticket: &TicketRecord) -> StoreError {
    StoreError::Unavailable(format!("ticket {} was neither stored nor found: retry", ticket.id))
}

/// The answer for a ticket stored earlier under the request's key.
pub(crate) fn duplicate(stored: TicketRow) -> CreateTicketResponse {
    CreateTicketResponse { ticket: Some(ticket_from_row(stored)), duplicate: true }
}

pub(crate) async fn create(store: &SqlStore, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError> {
    let ticket = validate_ticket(request)?;
    // Under the write lock from the start: nothing can store the key between the lookup and the insert.
    let mut transaction = store.begin_write().await?;
    let stored: Option<TicketRow> = sqlx::query_as(SELECT_TICKET_BY_KEY)
        .bind(&ticket.tenant_id)
        .bind(&ticket.idempotency_key)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(db)?;
    if let Some(stored) = stored {
        return Ok(duplicate(stored));
    }
    let inserted =
        bind_ticket(sqlx::query(INSERT_TICKET), &ticket).execute(&mut *transaction).await.map_err(db)?.rows_affected();
    transaction.commit().await.map_err(db)?;
    if inserted != 1 {
        return Err(lost_ticket(&ticket));
    }
    Ok(CreateTicketResponse { ticket: Some(ticket), duplicate: false })
}

/// [`INSERT_TICKET`] with its values.
pub(crate) fn bind_ticket<'q, 't, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>,
    ticket: &'t TicketRecord,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    DB: sqlx::Database,
    &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    query
        .bind(ticket.id.as_str())
        .bind(ticket.tenant_id.as_str())
        .bind(ticket.group_id.as_str())
        .bind(ticket.kind.as_str())
        .bind(ticket.reason.as_str())
        .bind(ticket.customer_name.as_str())
        .bind(ticket.customer_contact.as_str())
        .bind(ticket.subject.as_str())
        .bind(ticket.body.as_str())
        .bind(ticket.conversation_id.as_str())
        .bind(ticket.created_at_ms)
        .bind(ticket.idempotency_key.as_str())
}

pub(crate) async fn list(store: &SqlStore, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError> {
    // SQLite: a negative limit is no limit.
    let limit = if request.limit == 0 { -1 } else { i64::from(request.limit) };
    let rows: Vec<TicketRow> = if request.tenant_id.is_empty() {
        sqlx::query_as(SELECT_TICKETS).bind(limit).fetch_all(&store.reader).await
    } else {
        sqlx::query_as(SELECT_TENANT_TICKETS).bind(&request.tenant_id).bind(limit).fetch_all(&store.reader).await
    }
    .map_err(db)?;
    Ok(ListTicketsResponse { tickets: rows.into_iter().map(ticket_from_row).collect() })
}

/// The list statement for PostgreSQL (`LIMIT NULL` is no limit there), with ids ordered bytewise.
pub(crate) fn pg_list_statement(by_tenant: bool) -> &'static str {
    if by_tenant {
        "SELECT id, tenant_id, group_id, kind, reason, customer_name, customer_contact, subject, body, \
         conversation_id, created_at_ms, idempotency_key FROM tickets WHERE tenant_id = $1 \
         ORDER BY created_at_ms DESC, id COLLATE \"C\" DESC LIMIT $2"
    } else {
        "SELECT id, tenant_id, group_id, kind, reason, customer_name, customer_contact, subject, body, \
         conversation_id, created_at_ms, idempotency_key FROM tickets \
         ORDER BY created_at_ms DESC, id COLLATE \"C\" DESC LIMIT $1"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::TICKET_COLUMNS;

    #[test]
    fn every_required_field_is_checked() {
        let full = TicketRecord {
            id: "t1".into(),
            tenant_id: "acme".into(),
            group_id: "sales".into(),
            kind: "offline_message".into(),
            body: "call me".into(),
            idempotency_key: "k1".into(),
            ..Default::default()
        };
        assert_eq!(validate_ticket(CreateTicketRequest { ticket: Some(full.clone()) }), Ok(full.clone()));
        assert!(matches!(validate_ticket(CreateTicketRequest { ticket: None }), Err(StoreError::Invalid(_))));
        let blanks: [fn(&mut TicketRecord); 6] = [
            |t| t.id.clear(),
            |t| t.tenant_id.clear(),
            |t| t.group_id.clear(),
            |t| t.kind.clear(),
            |t| t.body.clear(),
            |t| t.idempotency_key.clear(),
        ];
        for blank in blanks {
            let mut ticket = full.clone();
            blank(&mut ticket);
            assert!(matches!(
                validate_ticket(CreateTicketRequest { ticket: Some(ticket) }),
                Err(StoreError::Invalid(_))
            ));
        }
    }

    #[test]
    fn the_statements_select_the_ticket_columns() {
        for sql in [SELECT_TICKET_BY_KEY, SELECT_TICKETS, SELECT_TENANT_TICKETS, pg_list_statement(true)] {
            assert!(sql.contains(TICKET_COLUMNS), "{sql}");
        }
        assert!(pg_list_statement(false).contains(TICKET_COLUMNS));
    }
}
