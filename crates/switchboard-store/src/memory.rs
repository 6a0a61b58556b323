//! An in-memory store with the same behaviour as the SQL store, for the router's actor tests on tokio's
//! paused clock (the SQL pool's timers cannot run on a clock that jumps). The shared conformance tests in
//! `tests/` run against both, so that this stand-in cannot drift from the real store.
//!
//! Each method mirrors the SQL of its counterpart in `leases`, `events`, `conversations`, `license` and
//! `tickets`: the same validation (with the same conversions from `error`), the same conditions and the
//! same order of results. A request is checked completely before anything is written, so that a refused one
//! changes nothing, as the SQL transaction rolls back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use switchboard_domain::{Clock, N_SHARDS};
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, ConversationRecord,
    CreateTicketRequest, CreateTicketResponse, EventRecord, GetConversationRequest, GetConversationResponse,
    GetLicenseRequest, GetPlacementRequest, License, ListConversationsRequest, ListConversationsResponse,
    ListTicketsRequest, ListTicketsResponse, NodeInfo, Placement, ReadEventsRequest, ReadEventsResponse,
    RegisterNodeRequest, RegisterNodeResponse, ReleaseShardsRequest, ReleaseShardsResponse, RenewShardsRequest,
    RenewShardsResponse, SetLicenseLimitRequest, ShardLease, ShardOwner, TicketRecord,
};
use switchboard_proto::store::{StoreApi, StoreError};

use crate::audit::{LeaseGrant, StoreAudit};
use crate::dialect::db_now_ms;
use crate::error::{shard_to_i32, to_i64};
use crate::leases::{expires_at, held, non_empty_node, renewal, validate_acquire};
use crate::license::{finishes, may_admit, validate_limit};
use crate::nodes::validate_registration;
use crate::records::Page;
use crate::tickets::validate_ticket;

/// A row of `shard_leases`.
#[derive(Debug, Clone)]
struct Lease {
    owner: String,
    epoch: u64,
    expires_at_ms: i64,
}

impl Lease {
    /// A row created for a shard nobody has held yet: free and expired, so that granting it bumps its
    /// epoch from 0 to 1.
    const FREE: Lease = Lease { owner: String::new(), epoch: 0, expires_at_ms: 0 };
}

impl Lease {
    /// Released: no owner, expired now (an expiry already in the past stays as it was); the epoch is kept.
    fn free(&mut self, now: i64) {
        self.owner.clear();
        self.expires_at_ms = self.expires_at_ms.min(now);
    }
}

/// A row of `events`: the record and the fence epoch it was written under.
#[derive(Debug, Clone)]
struct StoredEvent {
    record: EventRecord,
    epoch: u64,
}

#[derive(Default)]
struct Tables {
    leases: BTreeMap<u32, Lease>,
    /// `shard_lease_history`, by (shard, epoch).
    history: BTreeMap<(u32, u64), LeaseGrant>,
    /// `nodes`: address and expiry by node id (ordered bytewise, as the SQL stores order node ids).
    nodes: BTreeMap<String, (String, i64)>,
    conversations: HashMap<String, ConversationRecord>,
    /// Each conversation's log, in seq order.
    events: HashMap<String, Vec<StoredEvent>>,
    /// `license`: the limit (0: unlimited); `used` is `permits.len()`.
    max_sessions: u64,
    /// `license_permits`: the conversations holding a permit.
    permits: HashSet<String>,
    /// `tickets`, by id.
    tickets: HashMap<String, TicketRecord>,
    /// The ticket id stored under each (tenant, idempotency key).
    ticket_keys: HashMap<(String, String), String>,
}

pub struct MemoryStore {
    tables: Mutex<Tables>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        MemoryStore { tables: Mutex::default(), clock }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> i64 {
        db_now_ms(self.clock.as_ref())
    }
}

fn lease_of(shard: u32, lease: &Lease) -> ShardLease {
    ShardLease { shard, epoch: lease.epoch, expires_at_ms: lease.expires_at_ms }
}

#[async_trait]
impl StoreApi for MemoryStore {
    async fn release_shards(&self, request: ReleaseShardsRequest) -> Result<ReleaseShardsResponse, StoreError> {
        let node = non_empty_node(&request.node_id)?;
        held(&request.held)?;
        let mut tables = self.lock();
        let now = self.now_ms();
        let mut released = Vec::new();
        for fence in &request.held {
            if let Some(lease) = tables.leases.get_mut(&fence.shard)
                && lease.owner == node
                && lease.epoch == fence.epoch
            {
                lease.free(now);
                released.push(fence.shard);
            }
        }
        released.sort_unstable();
        released.dedup();
        Ok(ReleaseShardsResponse { released })
    }

    async fn register_node(&self, request: RegisterNodeRequest) -> Result<RegisterNodeResponse, StoreError> {
        let registration = validate_registration(&request)?;
        let mut tables = self.lock();
        let now = self.now_ms();
        if registration.leaving {
            tables.nodes.remove(registration.node);
            for lease in tables.leases.values_mut().filter(|lease| lease.owner == registration.node) {
                lease.free(now);
            }
        } else {
            let expires_at_ms = expires_at(now, registration.ttl_ms)?;
            tables.nodes.insert(registration.node.to_owned(), (registration.address.to_owned(), expires_at_ms));
        }
        tables.nodes.retain(|_, &mut (_, expires_at_ms)| expires_at_ms > now);
        Ok(RegisterNodeResponse { nodes: live_nodes(&tables, now) })
    }

    async fn get_placement(&self, _request: GetPlacementRequest) -> Result<Placement, StoreError> {
        let tables = self.lock();
        let now = self.now_ms();
        let owners = tables
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires_at_ms > now && !lease.owner.is_empty())
            .map(|(&shard, lease)| ShardOwner { shard, node_id: lease.owner.clone(), epoch: lease.epoch })
            .collect();
        Ok(Placement { owners, nodes: live_nodes(&tables, now) })
    }

    async fn acquire_shards(&self, request: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError> {
        let acquire = validate_acquire(&request)?;
        let node = acquire.node;

        let mut tables = self.lock();
        let now = self.now_ms();
        let expires_at_ms = expires_at(now, acquire.lease_ms)?;
        let shards: Vec<u32> = if acquire.shards.is_empty() {
            (0..N_SHARDS).collect()
        } else {
            acquire.shards.iter().map(|&shard| shard as u32).collect()
        };
        let mut room = acquire.limit.map_or(usize::MAX, |limit| limit as usize);
        let mut granted = Vec::new();
        for shard in shards {
            if room == 0 {
                break;
            }
            let lease = tables.leases.entry(shard).or_insert(Lease::FREE);
            if lease.expires_at_ms <= now || (lease.owner == node && acquire.limit.is_none()) {
                *lease = Lease { owner: node.to_owned(), epoch: lease.epoch + 1, expires_at_ms };
                granted.push(lease_of(shard, lease));
                room -= 1;
            }
        }
        for lease in &granted {
            let grant =
                LeaseGrant { shard: lease.shard, epoch: lease.epoch, node_id: node.to_owned(), acquired_at_ms: now };
            tables.history.insert((lease.shard, lease.epoch), grant);
        }
        Ok(AcquireShardsResponse { granted })
    }

    async fn renew_shards(&self, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
        let node = non_empty_node(&request.node_id)?;
        let lease_ms = to_i64(request.lease_ms, "lease_ms")?;
        for fence in &request.held {
            shard_to_i32(fence.shard)?;
            to_i64(fence.epoch, "epoch")?;
        }
        if request.held.is_empty() {
            return Ok(RenewShardsResponse::default());
        }

        let expires_at_ms = expires_at(self.now_ms(), lease_ms)?;
        let mut tables = self.lock();
        // Only the leases still owned by this node under the epoch it holds are extended, each once.
        let mut renewed = BTreeMap::new();
        for fence in &request.held {
            if let Some(lease) = tables.leases.get_mut(&fence.shard)
                && lease.owner == node
                && lease.epoch == fence.epoch
            {
                lease.expires_at_ms = expires_at_ms;
                renewed.insert(fence.shard, lease_of(fence.shard, lease));
            }
        }
        Ok(renewal(node, &request.held, renewed.into_values().collect()))
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendResponse, StoreError> {
        let fence = request.fence.ok_or_else(|| StoreError::Invalid("append without a fence".into()))?;
        shard_to_i32(fence.shard)?;
        to_i64(fence.epoch, "epoch")?;
        let id = request.conversation_id.as_str();
        if id.is_empty() {
            return Err(StoreError::Invalid("append without a conversation id".into()));
        }

        let mut tables = self.lock();
        if tables.leases.get(&fence.shard).map(|lease| lease.epoch) != Some(fence.epoch) {
            return Err(StoreError::StaleEpoch { shard: fence.shard });
        }
        // The conversation as the SQL transaction would see it after its `INSERT .. ON CONFLICT DO NOTHING`,
        // inserted only once the whole append is known to go through.
        let mut created = None;
        if let Some(create) = &request.create {
            if !create.id.is_empty() && create.id != id {
                return Err(StoreError::Invalid(format!("create record {} for conversation {id}", create.id)));
            }
            shard_to_i32(create.shard)?;
            if !tables.conversations.contains_key(id) {
                // A new chat's delivery marks are known: none yet.
                created = Some(ConversationRecord {
                    id: id.to_owned(),
                    last_seq: 0,
                    customer_delivered_up_to: 0,
                    agent_delivered_up_to: 0,
                    delivery_marks_known: true,
                    ..create.clone()
                });
            }
        }
        let conversation = created
            .as_ref()
            .or_else(|| tables.conversations.get(id))
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if conversation.shard != fence.shard {
            return Err(StoreError::Invalid(format!(
                "conversation {id} is on shard {}, the fence is for shard {}",
                conversation.shard, fence.shard
            )));
        }
        let last_seq = conversation.last_seq;

        let stored_events = tables.events.get(id).map(Vec::as_slice).unwrap_or_default();
        let duplicates: Vec<EventRecord> = stored_events
            .iter()
            .map(|stored| &stored.record)
            .filter(|stored| {
                !stored.client_msg_id.is_empty()
                    && request.events.iter().any(|event| event.client_msg_id == stored.client_msg_id)
            })
            .cloned()
            .collect();
        if !duplicates.is_empty() {
            // Nothing is written, not even the create.
            return Ok(AppendResponse { events: duplicates, duplicate: true, last_seq });
        }
        // The unique index on (conversation_id, client_msg_id) refuses one id twice in a request.
        let mut client_msg_ids = HashSet::new();
        for event in request.events.iter().filter(|event| !event.client_msg_id.is_empty()) {
            if !client_msg_ids.insert(event.client_msg_id.as_str()) {
                return Err(StoreError::Invalid(format!(
                    "constraint violated: client message id {} twice in one append to {id}",
                    event.client_msg_id
                )));
            }
        }
        // A new conversation takes a permit while one is free (0: unlimited).
        let admit = created.is_some() && may_admit(&request);
        if admit && tables.max_sessions > 0 && tables.permits.len() as u64 >= tables.max_sessions {
            return Err(StoreError::LicenseExhausted { max_sessions: tables.max_sessions });
        }

        let stored: Vec<EventRecord> = (last_seq + 1..)
            .zip(&request.events)
            .map(|(seq, event)| crate::batch::stored_record(id, seq, event))
            .collect();
        let last_seq = stored.last().map_or(last_seq, |event| event.seq);
        if let Some(created) = created {
            tables.conversations.insert(id.to_owned(), created);
            if admit {
                tables.permits.insert(id.to_owned());
            }
        }
        let epoch = fence.epoch;
        let rows = stored.iter().map(|record| StoredEvent { record: record.clone(), epoch });
        tables.events.entry(id.to_owned()).or_default().extend(rows);
        let conversation = tables.conversations.get_mut(id).ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        conversation.last_seq = last_seq;
        if let Some(update) = &request.update {
            // An empty state or group and a queue time of 0 leave them as they are.
            if !update.state.is_empty() {
                conversation.state.clone_from(&update.state);
            }
            if !update.group_id.is_empty() {
                conversation.group_id.clone_from(&update.group_id);
            }
            if update.queued_at_ms != 0 {
                conversation.queued_at_ms = update.queued_at_ms;
            }
            conversation.owner_agent_id.clone_from(&update.owner_agent_id);
            conversation.accepted_at_ms = update.accepted_at_ms;
            conversation.closed_at_ms = update.closed_at_ms;
            conversation.offer_agent_id.clone_from(&update.offer_agent_id);
            conversation.offer_expires_at_ms = update.offer_expires_at_ms;
            conversation.offered_to.clone_from(&update.offered_to);
            // As the SQL columns: marks not known read 0.
            conversation.delivery_marks_known = update.delivery_marks_known;
            (conversation.customer_delivered_up_to, conversation.agent_delivered_up_to) =
                match update.delivery_marks_known {
                    true => (update.customer_delivered_up_to, update.agent_delivered_up_to),
                    false => (0, 0),
                };
            if let Some(away) = update.customer_away {
                conversation.customer_away = away;
            }
        }
        if finishes(&request) {
            tables.permits.remove(id);
        }
        Ok(AppendResponse { events: stored, duplicate: false, last_seq })
    }

    async fn read_events(&self, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
        to_i64(request.after_seq, "after_seq")?;
        let limit = if request.limit == 0 { usize::MAX } else { request.limit as usize };
        let tables = self.lock();
        let read = tables
            .events
            .get(&request.conversation_id)
            .into_iter()
            .flatten()
            .map(|stored| &stored.record)
            .filter(|event| event.seq > request.after_seq)
            .filter(|event| request.dedupe_key.is_empty() || event.client_msg_id == request.dedupe_key)
            .take(limit);
        let mut page = Page::new(request.max_bytes);
        for event in read {
            if !page.add(event.clone()) {
                break;
            }
        }
        let events = page.into_events();
        Ok(ReadEventsResponse { events })
    }

    async fn get_conversation(&self, request: GetConversationRequest) -> Result<GetConversationResponse, StoreError> {
        let conversation = self.lock().conversations.get(&request.conversation_id).cloned();
        Ok(GetConversationResponse { conversation })
    }

    /// Every filter is optional: an empty tenant, owner or list matches everything.
    async fn list_conversations(
        &self,
        request: ListConversationsRequest,
    ) -> Result<ListConversationsResponse, StoreError> {
        for &shard in &request.shards {
            shard_to_i32(shard)?;
        }
        if request.after.is_some() && request.newest_first {
            return Err(StoreError::Invalid("a list newest first is not read after a cursor".into()));
        }
        let after = request.after.as_ref().map(|after| (after.queued_at_ms, after.id.as_str()));
        let tables = self.lock();
        let any_of = |wanted: &[String], value: &String| wanted.is_empty() || wanted.contains(value);
        let mut conversations: Vec<ConversationRecord> = tables
            .conversations
            .values()
            .filter(|c| request.tenant_id.is_empty() || c.tenant_id == request.tenant_id)
            .filter(|c| any_of(&request.states, &c.state) && any_of(&request.group_ids, &c.group_id))
            .filter(|c| request.owner_agent_id.is_empty() || c.owner_agent_id == request.owner_agent_id)
            .filter(|c| request.offer_agent_id.is_empty() || c.offer_agent_id == request.offer_agent_id)
            .filter(|c| request.shards.is_empty() || request.shards.contains(&c.shard))
            .filter(|c| after.is_none_or(|after| (c.queued_at_ms, c.id.as_str()) > after))
            .cloned()
            .collect();
        if request.newest_first {
            // ORDER BY closed_at_ms DESC, created_at_ms DESC, id DESC
            conversations.sort_by(|a, b| {
                (b.closed_at_ms, b.created_at_ms, &b.id).cmp(&(a.closed_at_ms, a.created_at_ms, &a.id))
            });
        } else {
            // ORDER BY queued_at_ms, id (ids compare bytewise, as SQLite's BINARY collation does)
            conversations.sort_by(|a, b| (a.queued_at_ms, &a.id).cmp(&(b.queued_at_ms, &b.id)));
        }
        if request.limit > 0 {
            conversations.truncate(request.limit as usize);
        }
        // As the SQL stores: records up to `max_bytes` encoded, one at least.
        let mut bytes = 0u64;
        let fits = conversations.iter().take_while(|record| {
            bytes = bytes.saturating_add(prost::Message::encoded_len(*record) as u64);
            request.max_bytes == 0 || bytes <= request.max_bytes
        });
        let kept = fits.count().max(1).min(conversations.len());
        let more = kept < conversations.len();
        conversations.truncate(kept);
        Ok(ListConversationsResponse { conversations, more })
    }

    async fn get_license(&self, _request: GetLicenseRequest) -> Result<License, StoreError> {
        let tables = self.lock();
        Ok(License { max_sessions: tables.max_sessions, used: tables.permits.len() as u64 })
    }

    async fn set_license_limit(&self, request: SetLicenseLimitRequest) -> Result<License, StoreError> {
        validate_limit(&request)?;
        let mut tables = self.lock();
        tables.max_sessions = request.max_sessions;
        Ok(License { max_sessions: tables.max_sessions, used: tables.permits.len() as u64 })
    }

    async fn create_ticket(&self, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError> {
        let ticket = validate_ticket(request)?;
        let mut tables = self.lock();
        let key = (ticket.tenant_id.clone(), ticket.idempotency_key.clone());
        if let Some(stored) = tables.ticket_keys.get(&key).and_then(|id| tables.tickets.get(id)) {
            return Ok(CreateTicketResponse { ticket: Some(stored.clone()), duplicate: true });
        }
        if tables.tickets.contains_key(&ticket.id) {
            return Err(StoreError::Invalid(format!("constraint violated: ticket {} exists already", ticket.id)));
        }
        tables.ticket_keys.insert(key, ticket.id.clone());
        tables.tickets.insert(ticket.id.clone(), ticket.clone());
        Ok(CreateTicketResponse { ticket: Some(ticket), duplicate: false })
    }

    /// Newest first: ORDER BY created_at_ms DESC, id DESC.
    async fn list_tickets(&self, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError> {
        let tables = self.lock();
        let mut tickets: Vec<TicketRecord> = tables
            .tickets
            .values()
            .filter(|ticket| request.tenant_id.is_empty() || ticket.tenant_id == request.tenant_id)
            .cloned()
            .collect();
        tickets.sort_by(|a, b| (b.created_at_ms, &b.id).cmp(&(a.created_at_ms, &a.id)));
        if request.limit > 0 {
            tickets.truncate(request.limit as usize);
        }
        Ok(ListTicketsResponse { tickets })
    }
}

fn live_nodes(tables: &Tables, now: i64) -> Vec<NodeInfo> {
    tables
        .nodes
        .iter()
        .filter(|(_, (_, expires_at_ms))| *expires_at_ms > now)
        .map(|(node_id, (address, expires_at_ms))| NodeInfo {
            node_id: node_id.clone(),
            address: address.clone(),
            expires_at_ms: *expires_at_ms,
        })
        .collect()
}

#[async_trait]
impl StoreAudit for MemoryStore {
    async fn lease_history(&self) -> Result<Vec<LeaseGrant>, StoreError> {
        Ok(self.lock().history.values().cloned().collect())
    }

    async fn event_epochs(&self, conversation_id: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let tables = self.lock();
        let events = tables.events.get(conversation_id).into_iter().flatten();
        Ok(events.map(|stored| (stored.record.seq, stored.epoch)).collect())
    }
}
