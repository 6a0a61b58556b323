//! Conversation summaries: lookup by id and the filtered lists (waiting queues, an agent's chats, the
//! conversations of shards taken over, closed history).

use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};
use switchboard_proto::internal::v1::{
    ConversationRecord, GetConversationRequest, GetConversationResponse, ListConversationsRequest,
    ListConversationsResponse,
};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::{db, shard_from_i32, shard_to_i32, to_u64};

const COLUMNS: &str = "id, tenant_id, group_id, customer_name, first_question, state, owner_agent_id, \
     created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, last_seq, shard, customer_token";

const SELECT_CONVERSATION: &str = "SELECT id, tenant_id, group_id, customer_name, first_question, state, \
     owner_agent_id, created_at_ms, queued_at_ms, accepted_at_ms, closed_at_ms, last_seq, shard, \
     customer_token FROM conversations WHERE id = $1";

pub(crate) async fn get(
    store: &SqlStore,
    request: GetConversationRequest,
) -> Result<GetConversationResponse, StoreError> {
    let row = sqlx::query(SELECT_CONVERSATION)
        .bind(&request.conversation_id)
        .fetch_optional(&store.reader)
        .await
        .map_err(db)?;
    Ok(GetConversationResponse { conversation: row.as_ref().map(conversation_from_row).transpose()? })
}

/// Every filter is optional: an empty tenant, owner or list matches everything. The SQL is built from
/// fixed fragments and bind placeholders only, never from values.
pub(crate) async fn list(
    store: &SqlStore,
    request: ListConversationsRequest,
) -> Result<ListConversationsResponse, StoreError> {
    let shards = request.shards.iter().map(|&shard| shard_to_i32(shard)).collect::<Result<Vec<_>, _>>()?;
    let mut query = QueryBuilder::<Sqlite>::new("SELECT ");
    query.push(COLUMNS).push(" FROM conversations WHERE 1 = 1");
    if !request.tenant_id.is_empty() {
        query.push(" AND tenant_id = ").push_bind(&request.tenant_id);
    }
    if !request.states.is_empty() {
        query.push(" AND state IN (");
        let mut list = query.separated(", ");
        for state in &request.states {
            list.push_bind(state);
        }
        query.push(")");
    }
    if !request.group_ids.is_empty() {
        query.push(" AND group_id IN (");
        let mut list = query.separated(", ");
        for group in &request.group_ids {
            list.push_bind(group);
        }
        query.push(")");
    }
    if !request.owner_agent_id.is_empty() {
        query.push(" AND owner_agent_id = ").push_bind(&request.owner_agent_id);
    }
    if !shards.is_empty() {
        query.push(" AND shard IN (");
        let mut list = query.separated(", ");
        for &shard in &shards {
            list.push_bind(shard);
        }
        query.push(")");
    }
    if request.newest_first {
        query.push(" ORDER BY closed_at_ms DESC, created_at_ms DESC, id DESC");
    } else {
        query.push(" ORDER BY queued_at_ms, id");
    }
    if request.limit > 0 {
        query.push(" LIMIT ").push_bind(i64::from(request.limit));
    }
    let rows = query.build().persistent(false).fetch_all(&store.reader).await.map_err(db)?;
    let conversations = rows.iter().map(conversation_from_row).collect::<Result<_, _>>()?;
    Ok(ListConversationsResponse { conversations })
}

fn conversation_from_row(row: &SqliteRow) -> Result<ConversationRecord, StoreError> {
    Ok(ConversationRecord {
        id: row.try_get("id").map_err(db)?,
        tenant_id: row.try_get("tenant_id").map_err(db)?,
        group_id: row.try_get("group_id").map_err(db)?,
        customer_name: row.try_get("customer_name").map_err(db)?,
        first_question: row.try_get("first_question").map_err(db)?,
        state: row.try_get("state").map_err(db)?,
        owner_agent_id: row.try_get("owner_agent_id").map_err(db)?,
        created_at_ms: row.try_get("created_at_ms").map_err(db)?,
        queued_at_ms: row.try_get("queued_at_ms").map_err(db)?,
        accepted_at_ms: row.try_get("accepted_at_ms").map_err(db)?,
        closed_at_ms: row.try_get("closed_at_ms").map_err(db)?,
        last_seq: to_u64(row.try_get("last_seq").map_err(db)?, "last_seq")?,
        shard: shard_from_i32(row.try_get("shard").map_err(db)?)?,
        customer_token: row.try_get("customer_token").map_err(db)?,
    })
}
