//! Conversation summaries: lookup by id and the filtered lists (waiting queues, an agent's chats, the
//! conversations of shards taken over, closed history). The list's SQL is built here for both backends.

use sqlx::AssertSqlSafe;
use switchboard_proto::internal::v1::{
    GetConversationRequest, GetConversationResponse, ListConversationsRequest, ListConversationsResponse,
};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::{db, shard_to_i32};
use crate::records::{CONVERSATION_COLUMNS, ConversationRow, conversation_from_row};

/// The columns are those of `records::CONVERSATION_COLUMNS`.
pub(crate) const SELECT_CONVERSATION: &str = "SELECT id, tenant_id, group_id, customer_name, first_question, state, \
     owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, last_seq, shard, \
     customer_token, offer_agent_id, offer_expires_at_ms, offered_to, customer_delivered_up_to, \
     agent_delivered_up_to, customer_away FROM conversations WHERE id = $1";

/// A value bound to a placeholder of a built statement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Bind {
    Text(String),
    Int(i64),
    Int32(i32),
}

/// SQL built from fixed fragments and numbered placeholders (`$1`, `$2`, ...), never from values.
#[derive(Debug, Default)]
pub(crate) struct Built {
    pub sql: String,
    pub binds: Vec<Bind>,
}

impl Built {
    fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    fn bind(&mut self, value: Bind) -> &mut Self {
        self.binds.push(value);
        self.sql.push_str(&format!("${}", self.binds.len()));
        self
    }

    fn list(&mut self, values: impl IntoIterator<Item = Bind>) -> &mut Self {
        self.sql.push('(');
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.sql.push_str(", ");
            }
            self.bind(value);
        }
        self.sql.push(')');
        self
    }
}

/// The list query. Every filter is optional: an empty tenant, owner, offer agent or list matches everything.
/// `id_order` is how ids sort: bytewise on both backends (`id` on SQLite, `id COLLATE "C"` on PostgreSQL),
/// whatever the database's collation.
pub(crate) fn list_query(request: &ListConversationsRequest, id_order: &str) -> Result<Built, StoreError> {
    let shards = request.shards.iter().map(|&shard| shard_to_i32(shard)).collect::<Result<Vec<_>, _>>()?;
    let mut query = Built::default();
    query.push("SELECT ").push(CONVERSATION_COLUMNS).push(" FROM conversations WHERE 1 = 1");
    if !request.tenant_id.is_empty() {
        query.push(" AND tenant_id = ").bind(Bind::Text(request.tenant_id.clone()));
    }
    if !request.states.is_empty() {
        query.push(" AND state IN ").list(request.states.iter().cloned().map(Bind::Text));
    }
    if !request.group_ids.is_empty() {
        query.push(" AND group_id IN ").list(request.group_ids.iter().cloned().map(Bind::Text));
    }
    if !request.owner_agent_id.is_empty() {
        query.push(" AND owner_agent_id = ").bind(Bind::Text(request.owner_agent_id.clone()));
    }
    if !request.offer_agent_id.is_empty() {
        query.push(" AND offer_agent_id = ").bind(Bind::Text(request.offer_agent_id.clone()));
    }
    if !shards.is_empty() {
        query.push(" AND shard IN ").list(shards.into_iter().map(Bind::Int32));
    }
    if let Some(after) = &request.after {
        if request.newest_first {
            return Err(StoreError::Invalid("a list newest first is not read after a cursor".into()));
        }
        // Keyset paging in the list's order: (queued_at_ms, id) after the cursor's.
        query.push(" AND (queued_at_ms > ").bind(Bind::Int(after.queued_at_ms));
        query.push(" OR (queued_at_ms = ").bind(Bind::Int(after.queued_at_ms));
        query.push(" AND ").push(id_order).push(" > ").bind(Bind::Text(after.id.clone())).push("))");
    }
    if request.newest_first {
        query.push(" ORDER BY closed_at_ms DESC, created_at_ms DESC, ").push(id_order).push(" DESC");
    } else {
        query.push(" ORDER BY queued_at_ms, ").push(id_order);
    }
    if request.limit > 0 {
        query.push(" LIMIT ").bind(Bind::Int(i64::from(request.limit)));
    }
    Ok(query)
}

pub(crate) async fn get(
    store: &SqlStore,
    request: GetConversationRequest,
) -> Result<GetConversationResponse, StoreError> {
    let row: Option<ConversationRow> = sqlx::query_as(SELECT_CONVERSATION)
        .bind(&request.conversation_id)
        .fetch_optional(&store.reader)
        .await
        .map_err(db)?;
    Ok(GetConversationResponse { conversation: row.map(conversation_from_row).transpose()? })
}

pub(crate) async fn list(
    store: &SqlStore,
    request: ListConversationsRequest,
) -> Result<ListConversationsResponse, StoreError> {
    let built = list_query(&request, "id")?;
    let mut query = sqlx::query_as::<_, ConversationRow>(AssertSqlSafe(built.sql)).persistent(false);
    for value in built.binds {
        query = match value {
            Bind::Text(value) => query.bind(value),
            Bind::Int(value) => query.bind(value),
            Bind::Int32(value) => query.bind(value),
        };
    }
    list_page(query.fetch(&store.reader), request.max_bytes).await
}

/// The conversations of a list's rows, in their order, until the next one would take the answer past
/// `max_bytes` (0: no bound; one at least). The rows after it are not read.
pub(crate) async fn list_page(
    mut rows: futures_util::stream::BoxStream<'_, Result<ConversationRow, sqlx::Error>>,
    max_bytes: u64,
) -> Result<ListConversationsResponse, StoreError> {
    use futures_util::TryStreamExt as _;
    let mut answer = ListConversationsResponse::default();
    let mut bytes = 0u64;
    while let Some(row) = rows.try_next().await.map_err(db)? {
        let record = conversation_from_row(row)?;
        bytes = bytes.saturating_add(prost::Message::encoded_len(&record) as u64);
        if max_bytes > 0 && !answer.conversations.is_empty() && bytes > max_bytes {
            answer.more = true;
            break;
        }
        answer.conversations.push(record);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_lists_select_the_same_columns() {
        assert!(SELECT_CONVERSATION.contains(CONVERSATION_COLUMNS), "{SELECT_CONVERSATION}");
        let request = ListConversationsRequest { offer_agent_id: "alice".into(), ..Default::default() };
        let built = list_query(&request, "id").unwrap();
        assert!(built.sql.contains(CONVERSATION_COLUMNS));
        assert!(built.sql.contains(" AND offer_agent_id = $1"), "{}", built.sql);
        assert_eq!(built.binds, [Bind::Text("alice".into())]);
    }

    #[test]
    fn a_malformed_offered_to_column_is_invalid_not_a_panic() {
        assert!(matches!(crate::records::agents_from_json("{"), Err(StoreError::Invalid(_))));
        assert!(matches!(crate::records::agents_from_json("[1]"), Err(StoreError::Invalid(_))));
        let agents = vec!["alice".to_owned(), "b\"ob".to_owned()];
        assert_eq!(crate::records::agents_from_json(&crate::records::agents_to_json(&agents)), Ok(agents));
    }
}
