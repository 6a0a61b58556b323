//! Conversation lookups and lists on PostgreSQL (the list's SQL is shared with SQLite).

use sqlx::AssertSqlSafe;
use switchboard_proto::internal::v1::{
    GetConversationRequest, GetConversationResponse, ListConversationsRequest, ListConversationsResponse,
};
use switchboard_proto::store::StoreError;

use super::PgStore;
use crate::conversations::{Bind, SELECT_CONVERSATION, list_page, list_query};
use crate::error::db;
use crate::records::{ConversationRow, conversation_from_row};

pub(super) async fn get(
    store: &PgStore,
    request: GetConversationRequest,
) -> Result<GetConversationResponse, StoreError> {
    let row: Option<ConversationRow> = sqlx::query_as(SELECT_CONVERSATION)
        .bind(&request.conversation_id)
        .fetch_optional(&store.pool)
        .await
        .map_err(db)?;
    Ok(GetConversationResponse { conversation: row.map(conversation_from_row).transpose()? })
}

pub(super) async fn list(
    store: &PgStore,
    request: ListConversationsRequest,
) -> Result<ListConversationsResponse, StoreError> {
    let built = list_query(&request, "id COLLATE \"C\"")?;
    // The filters vary from call to call: not worth a prepared statement each.
    let mut query = sqlx::query_as::<_, ConversationRow>(AssertSqlSafe(built.sql)).persistent(false);
    for value in built.binds {
        query = match value {
            Bind::Text(value) => query.bind(value),
            Bind::Int(value) => query.bind(value),
            Bind::Int32(value) => query.bind(value),
        };
    }
    list_page(query.fetch(&store.pool), request.max_bytes).await
}
