//! Tickets on PostgreSQL (the validation and SQL are shared with SQLite: see `tickets`).

use switchboard_proto::internal::v1::{
    CreateTicketRequest, CreateTicketResponse, ListTicketsRequest, ListTicketsResponse,
};
use switchboard_proto::store::StoreError;

use super::PgStore;
use crate::error::db;
use crate::records::{TicketRow, ticket_from_row};
use crate::tickets::{
    INSERT_TICKET, SELECT_TICKET_BY_KEY, bind_ticket, duplicate, lost_ticket, pg_list_statement, validate_ticket,
};

async fn stored_under_key(store: &PgStore, tenant_id: &str, key: &str) -> Result<Option<TicketRow>, StoreError> {
    sqlx::query_as(SELECT_TICKET_BY_KEY).bind(tenant_id).bind(key).fetch_optional(&store.pool).await.map_err(db)
}

/// Several store processes may store the same ticket at once: the insert does nothing on a conflict of the
/// key (after waiting for the other transaction), and a conflict it cannot absorb (the id, inserted by a
/// copy that was not visible yet) is checked against the key again before it is reported.
pub(super) async fn create(store: &PgStore, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError> {
    let ticket = validate_ticket(request)?;
    if let Some(stored) = stored_under_key(store, &ticket.tenant_id, &ticket.idempotency_key).await? {
        return Ok(duplicate(stored));
    }
    match bind_ticket(sqlx::query(INSERT_TICKET), &ticket).execute(&store.pool).await {
        Ok(done) if done.rows_affected() == 1 => Ok(CreateTicketResponse { ticket: Some(ticket), duplicate: false }),
        Ok(_) => {
            let stored = stored_under_key(store, &ticket.tenant_id, &ticket.idempotency_key).await?;
            stored.map(duplicate).ok_or_else(|| lost_ticket(&ticket))
        }
        Err(error) => {
            let error = db(error);
            if matches!(error, StoreError::Invalid(_))
                && let Some(stored) = stored_under_key(store, &ticket.tenant_id, &ticket.idempotency_key).await?
            {
                return Ok(duplicate(stored));
            }
            Err(error)
        }
    }
}

pub(super) async fn list(store: &PgStore, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError> {
    // LIMIT NULL is no limit.
    let limit = (request.limit > 0).then(|| i64::from(request.limit));
    let rows: Vec<TicketRow> = if request.tenant_id.is_empty() {
        sqlx::query_as(pg_list_statement(false)).bind(limit).fetch_all(&store.pool).await
    } else {
        sqlx::query_as(pg_list_statement(true)).bind(&request.tenant_id).bind(limit).fetch_all(&store.pool).await
    }
    .map_err(db)?;
    Ok(ListTicketsResponse { tickets: rows.into_iter().map(ticket_from_row).collect() })
}
