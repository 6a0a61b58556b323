//! The store service as a trait. Implementations: the SQL store in `switchboard-store` (in-process in
//! `serve`), and a gRPC client over the same messages in the split roles.

use async_trait::async_trait;

use crate::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, ConversationRecord,
    CreateTicketRequest, CreateTicketResponse, GetConversationRequest, GetConversationResponse, GetLicenseRequest,
    GetPlacementRequest, License, ListConversationsRequest, ListConversationsResponse, ListCursor, ListTicketsRequest,
    ListTicketsResponse, Placement, ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse,
    ReleaseShardsRequest, ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse, SetLicenseLimitRequest,
};

/// What can go wrong in the store. Callers branch on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The write's epoch is not the shard's current one: another node owns the shard now.
    #[error("stale epoch for shard {shard}: the shard has moved to another owner")]
    StaleEpoch { shard: u32 },
    #[error("no such conversation: {0}")]
    NotFound(String),
    /// The request is malformed (a bug in the caller, not bad client input).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The database cannot be reached or refused the transaction; retrying may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// An append that creates a conversation was refused: the cluster's `max_sessions` concurrent chat
    /// sessions are all open (stable code `license_exhausted`). Nothing of the append was stored; it can
    /// succeed once a session has finished.
    #[error("license exhausted: all {max_sessions} concurrent chat sessions are in use")]
    LicenseExhausted { max_sessions: u64 },
}

impl StoreError {
    /// The stable code of the error, as the gRPC mapping carries it: `stale_epoch`, `not_found`, `invalid`,
    /// `unavailable` or `license_exhausted`.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::StaleEpoch { .. } => "stale_epoch",
            StoreError::NotFound(_) => "not_found",
            StoreError::Invalid(_) => "invalid",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::LicenseExhausted { .. } => "license_exhausted",
        }
    }
}

#[async_trait]
pub trait StoreApi: Send + Sync + 'static {
    async fn acquire_shards(&self, request: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError>;
    async fn renew_shards(&self, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError>;
    async fn append(&self, request: AppendRequest) -> Result<AppendResponse, StoreError>;
    async fn read_events(&self, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError>;
    async fn get_conversation(&self, request: GetConversationRequest) -> Result<GetConversationResponse, StoreError>;
    async fn list_conversations(
        &self,
        request: ListConversationsRequest,
    ) -> Result<ListConversationsResponse, StoreError>;
    /// Frees the shards held at the given epochs at once (graceful handover).
    async fn release_shards(&self, request: ReleaseShardsRequest) -> Result<ReleaseShardsResponse, StoreError>;
    /// A router's heartbeat: its address with a time to live; answers the nodes alive now.
    async fn register_node(&self, request: RegisterNodeRequest) -> Result<RegisterNodeResponse, StoreError>;
    /// The unexpired leases and the live nodes.
    async fn get_placement(&self, request: GetPlacementRequest) -> Result<Placement, StoreError>;
    /// The cluster-wide license: the limit (0: unlimited) and the permits held now (the conversations
    /// not finished).
    async fn get_license(&self, request: GetLicenseRequest) -> Result<License, StoreError>;
    /// Sets the license limit (0: unlimited) and answers the license as it is then. A limit below the
    /// permits held is allowed: nothing is evicted, new conversations are refused until enough finish.
    async fn set_license_limit(&self, request: SetLicenseLimitRequest) -> Result<License, StoreError>;
    /// Stores a ticket (an offline message), once per tenant and idempotency key: a retry answers the
    /// ticket stored the first time with `duplicate` set. Missing required fields are `Invalid`.
    async fn create_ticket(&self, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError>;
    /// A tenant's tickets (every tenant's when the tenant is empty), newest first.
    async fn list_tickets(&self, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError>;
}

/// How many conversations a page of [`list_all_conversations`] holds at most.
pub const LIST_PAGE: u32 = 1_000;

/// How many encoded bytes of records a page of [`list_all_conversations`] holds at most (one record at
/// least): a first question may be as long as `max_message_bytes`, up to 1 MiB, and the internal gRPC
/// message limit is 64 MiB.
pub const LIST_PAGE_BYTES: u64 = 16 << 20;

/// Every conversation of an oldest-first list (`request.limit` and `request.after` are the function's),
/// read a page of `page` at a time: a list of any length never has to fit in one message.
///
/// Pages are read one after the other, not in one snapshot: a conversation that moves meanwhile (a chat
/// requeued, with a new `queued_at_ms`) may be listed twice or missed, as it may be by any list read just
/// before it moved.
pub async fn list_all_conversations(
    store: &(impl StoreApi + ?Sized),
    request: ListConversationsRequest,
    page: u32,
) -> Result<Vec<ConversationRecord>, StoreError> {
    list_in_pages(request, page, |request| store.list_conversations(request)).await
}

/// [`list_all_conversations`] with `list` reading each page.
async fn list_in_pages<F, Fut>(
    mut request: ListConversationsRequest,
    page: u32,
    mut list: F,
) -> Result<Vec<ConversationRecord>, StoreError>
where
    F: FnMut(ListConversationsRequest) -> Fut,
    Fut: std::future::Future<Output = Result<ListConversationsResponse, StoreError>>,
{
    request.newest_first = false;
    request.limit = page.max(1);
    request.max_bytes = LIST_PAGE_BYTES;
    request.after = None;
    let mut all = Vec::new();
    loop {
        let answer = list(request.clone()).await?;
        let conversations = answer.conversations;
        // A store that ignores the cursor (one from before it, in a rolling upgrade) would answer the same
        // page for ever: the list is read whole from it instead, in one answer, as before pages.
        if let (Some(after), Some(first)) = (&request.after, conversations.first())
            && (first.queued_at_ms, first.id.as_str()) <= (after.queued_at_ms, after.id.as_str())
        {
            let whole = ListConversationsRequest { limit: 0, after: None, ..request };
            return Ok(list(whole).await?.conversations);
        }
        let full = answer.more || conversations.len() >= request.limit as usize;
        if let Some(last) = conversations.last() {
            request.after = Some(ListCursor { queued_at_ms: last.queued_at_ms, id: last.id.clone() });
        }
        all.extend(conversations);
        if !full {
            return Ok(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, queued_at_ms: i64) -> ConversationRecord {
        ConversationRecord { id: id.into(), queued_at_ms, ..Default::default() }
    }

    /// The list `c1`..`c5` (c2 and c3 queued at the same moment), read as a store reads it: after the cursor,
    /// `limit` at most, and `per_answer` at most as if its bytes filled `max_bytes` (`more` then); or, with
    /// `ignore_cursor`, as a store that knows no cursor (nor byte bound).
    fn store(
        ignore_cursor: bool,
        per_answer: usize,
    ) -> impl FnMut(ListConversationsRequest) -> std::future::Ready<Result<ListConversationsResponse, StoreError>> {
        let all = [record("c1", 1), record("c2", 2), record("c3", 2), record("c4", 3), record("c5", 4)];
        move |request: ListConversationsRequest| {
            let after = request.after.filter(|_| !ignore_cursor).map(|after| (after.queued_at_ms, after.id));
            let limit = if request.limit == 0 { usize::MAX } else { request.limit as usize };
            let mut conversations: Vec<ConversationRecord> = all
                .iter()
                .filter(|c| after.as_ref().is_none_or(|(at, id)| (c.queued_at_ms, &c.id) > (*at, id)))
                .take(limit)
                .cloned()
                .collect();
            let cut = !ignore_cursor && request.max_bytes > 0 && conversations.len() > per_answer;
            if cut {
                conversations.truncate(per_answer);
            }
            std::future::ready(Ok(ListConversationsResponse { conversations, more: cut }))
        }
    }

    #[tokio::test]
    async fn a_list_is_read_whole_a_page_at_a_time_or_in_one_answer_from_a_store_without_cursors() {
        let ids = |read: Vec<ConversationRecord>| read.into_iter().map(|c| c.id).collect::<Vec<_>>();
        for (ignore_cursor, per_answer) in [(false, usize::MAX), (true, usize::MAX), (false, 2)] {
            for page in [1, 2, 3, 5, 6] {
                let store = store(ignore_cursor, per_answer);
                let read = list_in_pages(ListConversationsRequest::default(), page, store).await;
                let case = format!("pages of {page}, {ignore_cursor}, {per_answer} an answer");
                assert_eq!(ids(read.unwrap()), ["c1", "c2", "c3", "c4", "c5"], "{case}");
            }
        }
    }
}
