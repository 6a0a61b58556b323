//! `GrpcStore` → `StoreGrpcServer` → a real `MemoryStore`, over loopback sockets.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{Running, Watched, any_port, client_settings, eventually, within};
use switchboard_domain::{FixedClock, shard_of};
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendRequest, AppendResponse, ConversationRecord, ConversationUpdate,
    CreateTicketRequest, CreateTicketResponse, Fence, GetConversationRequest, GetConversationResponse,
    GetLicenseRequest, GetPlacementRequest, License, ListConversationsRequest, ListConversationsResponse,
    ListTicketsRequest, ListTicketsResponse, NewEvent, NodeInfo, Placement, ReadEventsRequest, ReadEventsResponse,
    RegisterNodeRequest, RegisterNodeResponse, ReleaseShardsRequest, ReleaseShardsResponse, RenewShardsRequest,
    RenewShardsResponse, SetLicenseLimitRequest, ShardOwner, TicketRecord,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_rpc::{ClientSettings, GrpcServices, GrpcStore, StoreGrpcServer};
use switchboard_store::MemoryStore;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

const NOW_MS: i64 = 1_700_000_000_000;

fn memory_store() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new(Arc::new(FixedClock::new(NOW_MS))))
}

fn services(server: StoreGrpcServer) -> GrpcServices {
    let mut services = GrpcServices::new();
    let server = server.with_draining(services.draining());
    services.add_service(server.into_service());
    services
}

async fn serve(listener: TcpListener, store: Arc<dyn StoreApi>) -> Running {
    Running::start(listener, services(StoreGrpcServer::new(store))).await
}

fn client(running: &Running) -> GrpcStore {
    GrpcStore::connect_lazy(&running.url(), client_settings()).unwrap()
}

fn shard_of_conversation(id: &str) -> u32 {
    shard_of(&format!("conversation/{id}")).0
}

async fn fence(store: &dyn StoreApi, node: &str, shard: u32) -> Fence {
    let request = AcquireShardsRequest { node_id: node.into(), shards: vec![shard], lease_ms: 10_000, limit: 0 };
    let granted = store.acquire_shards(request).await.unwrap().granted;
    let lease = granted.iter().find(|lease| lease.shard == shard).expect("shard granted");
    Fence { shard, epoch: lease.epoch }
}

fn record(id: &str) -> ConversationRecord {
    ConversationRecord {
        id: id.into(),
        tenant_id: "acme".into(),
        group_id: "sales".into(),
        customer_name: "Carol".into(),
        first_question: "Where is my parcel?".into(),
        state: "queued".into(),
        created_at_ms: NOW_MS,
        queued_at_ms: NOW_MS,
        shard: shard_of_conversation(id),
        customer_token: format!("token-{id}"),
        ..Default::default()
    }
}

fn message(client_msg_id: &str, body: &str) -> NewEvent {
    NewEvent {
        at_ms: NOW_MS,
        author_role: "customer".into(),
        author_id: String::new(),
        client_msg_id: client_msg_id.into(),
        kind: "message".into(),
        payload_json: format!(r#"{{"body":"{body}"}}"#),
    }
}

fn create(fence: Fence, id: &str) -> AppendRequest {
    AppendRequest {
        fence: Some(fence),
        conversation_id: id.into(),
        create: Some(record(id)),
        events: vec![message("m1", "hello")],
        update: None,
    }
}

/// A store that does not know the `Appends` stream (an older version, during a rolling upgrade): the
/// client falls back to the unary `Append`, and stays with it.
#[tokio::test]
async fn a_store_without_the_call_stream_gets_unary_appends() {
    let store = memory_store();
    let older = Watched::without_call_streams(StoreGrpcServer::new(store.clone()).into_service());
    let mut services = GrpcServices::new();
    services.add_service(older.clone());
    let running = Running::start(any_port().await, services).await;
    let client = client(&running);
    let fence = fence(&client, "node-1", shard_of_conversation("c1")).await;
    let appended = within(client.append(create(fence, "c1"))).await.unwrap();
    assert_eq!(appended.last_seq, 1);
    let more = AppendRequest {
        fence: Some(fence),
        conversation_id: "c1".into(),
        create: None,
        events: vec![message("m2", "again")],
        update: None,
    };
    assert_eq!(within(client.append(more)).await.unwrap().last_seq, 2);
    assert_eq!(older.refused.load(Ordering::SeqCst), 1, "the stream is asked for once");
    let stored = store.read_events(ReadEventsRequest { conversation_id: "c1".into(), ..Default::default() });
    assert_eq!(stored.await.unwrap().events.len(), 2);
    running.stop().await;
}

#[tokio::test]
async fn appends_and_reads_go_through_unchanged() {
    let store = memory_store();
    let running = serve(any_port().await, store.clone()).await;
    let client = client(&running);

    let fence = fence(&client, "node-1", shard_of_conversation("c1")).await;
    let appended = client.append(create(fence, "c1")).await.unwrap();
    assert_eq!(appended.events.len(), 1);
    assert!(!appended.duplicate);
    let more = AppendRequest {
        fence: Some(fence),
        conversation_id: "c1".into(),
        create: None,
        events: vec![message("m2", "anyone?"), message("m3", "hello??")],
        update: None,
    };
    let more = client.append(more).await.unwrap();
    assert_eq!(more.events.iter().map(|event| event.seq).collect::<Vec<_>>(), [2, 3]);
    // A resend is recognised through the wire as well.
    let again = client.append(create(fence, "c1")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.events, appended.events);

    // What the client reads is what the store holds.
    let read = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 0, ..Default::default() };
    let through_grpc = client.read_events(read.clone()).await.unwrap();
    assert_eq!(through_grpc, store.read_events(read).await.unwrap());
    assert_eq!(through_grpc.events.len(), 3);
    let get = GetConversationRequest { conversation_id: "c1".into() };
    let conversation = client.get_conversation(get.clone()).await.unwrap();
    assert_eq!(conversation, store.get_conversation(get).await.unwrap());
    assert_eq!(conversation.conversation.unwrap().last_seq, 3);
    let list = ListConversationsRequest { tenant_id: "acme".into(), ..Default::default() };
    assert_eq!(client.list_conversations(list.clone()).await.unwrap(), store.list_conversations(list).await.unwrap());

    // Errors keep their variant and their text.
    let missing = AppendRequest { create: None, conversation_id: "c2".into(), ..create(fence, "c2") };
    let direct = store.append(missing.clone()).await.unwrap_err();
    assert!(matches!(direct, StoreError::NotFound(_)), "{direct:?}");
    assert_eq!(client.append(missing).await.unwrap_err(), direct);
    let unfenced = AppendRequest { fence: None, ..create(fence, "c3") };
    let direct = store.append(unfenced.clone()).await.unwrap_err();
    assert!(matches!(direct, StoreError::Invalid(_)), "{direct:?}");
    assert_eq!(client.append(unfenced).await.unwrap_err(), direct);
    running.stop().await;
}

#[tokio::test]
async fn a_stale_epoch_arrives_as_stale_epoch_with_its_shard() {
    let store = memory_store();
    let running = serve(any_port().await, store.clone()).await;
    let client = client(&running);
    let shard = shard_of_conversation("c1");
    let old = fence(&client, "node-1", shard).await;
    client.append(create(old, "c1")).await.unwrap();
    // Taking the lease again (a restarted node) moves the epoch on: the old fence may no longer write.
    let new = fence(&client, "node-1", shard).await;
    assert!(new.epoch > old.epoch);
    let late = AppendRequest { events: vec![message("m2", "too late")], create: None, ..create(old, "c1") };
    assert_eq!(client.append(late).await.unwrap_err(), StoreError::StaleEpoch { shard });
    running.stop().await;
}

#[tokio::test]
async fn the_license_goes_through_and_a_refused_create_arrives_as_license_exhausted_with_its_limit() {
    let store = memory_store();
    let running = serve(any_port().await, store.clone()).await;
    let client = client(&running);
    assert_eq!(client.get_license(GetLicenseRequest {}).await.unwrap(), License { max_sessions: 0, used: 0 });
    let limit = SetLicenseLimitRequest { max_sessions: 1 };
    assert_eq!(client.set_license_limit(limit).await.unwrap(), License { max_sessions: 1, used: 0 });

    let f1 = fence(&client, "node-1", shard_of_conversation("c1")).await;
    client.append(create(f1, "c1")).await.unwrap();
    let f2 = fence(&client, "node-1", shard_of_conversation("c2")).await;
    let refused = client.append(create(f2, "c2")).await.unwrap_err();
    assert_eq!(refused, StoreError::LicenseExhausted { max_sessions: 1 });
    assert_eq!(store.get_license(GetLicenseRequest {}).await.unwrap(), License { max_sessions: 1, used: 1 });

    // Closing c1 gives its permit back: c2 is admitted now.
    let close = AppendRequest {
        create: None,
        events: vec![message("bye", "bye")],
        update: Some(ConversationUpdate { state: "closed".into(), closed_at_ms: NOW_MS, ..Default::default() }),
        ..create(f1, "c1")
    };
    client.append(close).await.unwrap();
    client.append(create(f2, "c2")).await.unwrap();
    assert_eq!(
        client.get_license(GetLicenseRequest {}).await.unwrap(),
        store.get_license(GetLicenseRequest {}).await.unwrap()
    );
    let too_big = client.set_license_limit(SetLicenseLimitRequest { max_sessions: u64::MAX }).await.unwrap_err();
    assert!(matches!(too_big, StoreError::Invalid(_)), "{too_big:?}");
    running.stop().await;
}

#[tokio::test]
async fn tickets_and_the_offer_fields_go_through_unchanged() {
    let store = memory_store();
    let running = serve(any_port().await, store.clone()).await;
    let client = client(&running);
    let ticket = TicketRecord {
        id: "t1".into(),
        tenant_id: "acme".into(),
        group_id: "sales".into(),
        kind: "offline_message".into(),
        reason: "license_exhausted".into(),
        customer_name: "Carol".into(),
        customer_contact: "carol@example.com".into(),
        subject: "Parcel".into(),
        body: "Where is my parcel?".into(),
        conversation_id: String::new(),
        created_at_ms: NOW_MS,
        idempotency_key: "k1".into(),
    };
    let created = client.create_ticket(CreateTicketRequest { ticket: Some(ticket.clone()) }).await.unwrap();
    assert_eq!(created, CreateTicketResponse { ticket: Some(ticket.clone()), duplicate: false });
    let retry = TicketRecord { id: "t2".into(), ..ticket.clone() };
    let again = client.create_ticket(CreateTicketRequest { ticket: Some(retry) }).await.unwrap();
    assert_eq!(again, CreateTicketResponse { ticket: Some(ticket.clone()), duplicate: true });
    let list = ListTicketsRequest { tenant_id: "acme".into(), limit: 0 };
    assert_eq!(client.list_tickets(list.clone()).await.unwrap().tickets, [ticket]);
    let incomplete = CreateTicketRequest { ticket: Some(TicketRecord { body: String::new(), ..Default::default() }) };
    let direct = store.create_ticket(incomplete.clone()).await.unwrap_err();
    assert_eq!(client.create_ticket(incomplete).await.unwrap_err(), direct);

    // The summary's offer and group fields, both ways.
    let fence = fence(&client, "node-1", shard_of_conversation("c1")).await;
    client.append(create(fence, "c1")).await.unwrap();
    let offer = ConversationUpdate {
        state: "queued".into(),
        group_id: "support".into(),
        queued_at_ms: NOW_MS + 5,
        offer_agent_id: "alice".into(),
        offer_expires_at_ms: NOW_MS + 30_000,
        offered_to: vec!["bob".into(), "zoe".into()],
        ..Default::default()
    };
    let offered = AppendRequest { create: None, events: vec![], update: Some(offer), ..create(fence, "c1") };
    client.append(offered).await.unwrap();
    let by_offer = ListConversationsRequest { offer_agent_id: "alice".into(), ..Default::default() };
    let listed = client.list_conversations(by_offer).await.unwrap().conversations;
    let expected = ConversationRecord {
        group_id: "support".into(),
        queued_at_ms: NOW_MS + 5,
        offer_agent_id: "alice".into(),
        offer_expires_at_ms: NOW_MS + 30_000,
        offered_to: vec!["bob".into(), "zoe".into()],
        last_seq: 1,
        ..record("c1")
    };
    assert_eq!(listed, [expected]);
    running.stop().await;
}

#[tokio::test]
async fn a_stopped_store_is_unavailable_and_the_same_client_reaches_it_again_after_a_restart() {
    let store = memory_store();
    let listener = any_port().await;
    let addr = listener.local_addr().unwrap();
    let running = serve(listener, store.clone()).await;
    let client = client(&running);
    let fence = fence(&client, "node-1", shard_of_conversation("c1")).await;
    client.append(create(fence, "c1")).await.unwrap();

    running.stop().await;
    let read = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 0, ..Default::default() };
    let error = within(client.read_events(read.clone())).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    // A write fails the same way, retryably, and stores nothing.
    let write = AppendRequest { events: vec![message("m2", "lost?")], create: None, ..create(fence, "c1") };
    let error = within(client.append(write.clone())).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");

    // The store comes back on the same address: the same client reaches it.
    let running = serve(TcpListener::bind(addr).await.unwrap(), store.clone()).await;
    let events = eventually(|| async { client.read_events(read.clone()).await.ok() }).await;
    assert_eq!(events.events.len(), 1);
    client.append(write).await.unwrap();
    assert_eq!(client.read_events(read).await.unwrap().events.len(), 2);
    running.stop().await;
}

#[tokio::test]
async fn a_client_made_before_its_store_starts_reaches_it_once_it_is_up() {
    let addr = any_port().await.local_addr().unwrap(); // a free port, closed again
    let client = GrpcStore::connect_lazy(&format!("http://{addr}"), client_settings()).unwrap();
    let get = GetConversationRequest { conversation_id: "c1".into() };
    let error = within(client.get_conversation(get.clone())).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    let running = serve(TcpListener::bind(addr).await.unwrap(), memory_store()).await;
    let answer = eventually(|| async { client.get_conversation(get.clone()).await.ok() }).await;
    assert_eq!(answer.conversation, None);
    running.stop().await;
}

#[tokio::test]
async fn a_store_that_never_answers_is_unavailable_after_the_request_timeout() {
    let fake = Arc::new(Scripted::default());
    fake.hang.store(true, Ordering::SeqCst);
    let running = Running::start(any_port().await, services(StoreGrpcServer::new(fake))).await;
    let settings = ClientSettings { request_timeout: Duration::from_millis(300), ..client_settings() };
    let client = GrpcStore::connect_lazy(&running.url(), settings).unwrap();
    let error = within(client.append(AppendRequest::default())).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    running.stop().await;
}

#[tokio::test]
async fn a_placement_change_made_through_the_server_is_sent_at_once_and_only_once() {
    let fake = Arc::new(Scripted::default());
    // Polling so rarely that only the notification after a call can deliver a change in this test.
    let server = StoreGrpcServer::new(fake.clone()).with_poll_interval(Duration::from_secs(3600));
    let running = Running::start(any_port().await, services(server)).await;
    let client = client(&running);
    let mut watch = client.watch_placement().await.unwrap();
    assert_eq!(within(watch.next()).await.unwrap().unwrap(), Placement::default());

    client.register_node(register("n1", 1_000)).await.unwrap();
    let placement = within(watch.next()).await.unwrap().unwrap();
    assert_eq!(placement.nodes.iter().map(|node| node.node_id.as_str()).collect::<Vec<_>>(), ["n1"]);
    // A heartbeat only moves the expiry: nothing is sent for it. The next change is the next item.
    client.register_node(register("n1", 2_000)).await.unwrap();
    fake.set_owner(7, "n1");
    client.acquire_shards(AcquireShardsRequest::default()).await.unwrap();
    let placement = within(watch.next()).await.unwrap().unwrap();
    assert_eq!(placement.owners, [ShardOwner { shard: 7, node_id: "n1".into(), epoch: 1 }]);
    assert_eq!(placement.nodes[0].expires_at_ms, 2_000, "what is sent is the placement now");

    // The server drains: the stream ends instead of holding the shutdown.
    running.stop().await;
    assert!(!matches!(within(watch.next()).await, Some(Ok(_))));
}

#[tokio::test]
async fn a_placement_change_made_elsewhere_is_found_by_polling() {
    let fake = Arc::new(Scripted::default());
    let server = StoreGrpcServer::new(fake.clone()).with_poll_interval(Duration::from_millis(20));
    let running = Running::start(any_port().await, services(server)).await;
    let client = client(&running);
    let mut watch = client.watch_placement().await.unwrap();
    assert_eq!(within(watch.next()).await.unwrap().unwrap(), Placement::default());
    // Changed behind the server's back (another store process, or a lease expiring).
    fake.set_owner(3, "n2");
    let placement = within(watch.next()).await.unwrap().unwrap();
    assert_eq!(placement.owners, [ShardOwner { shard: 3, node_id: "n2".into(), epoch: 1 }]);
    running.stop().await;
}

#[tokio::test]
async fn watching_the_placement_of_a_memory_store() {
    let store = memory_store();
    let server = StoreGrpcServer::new(store.clone()).with_poll_interval(Duration::from_secs(3600));
    let running = Running::start(any_port().await, services(server)).await;
    let client = client(&running);
    match client.get_placement(GetPlacementRequest {}).await {
        // The store's cluster operations are not there yet: the error must still come through as it is.
        Err(StoreError::Unavailable(text)) if text.contains("not implemented") => {
            let error = client.watch_placement().await.unwrap_err();
            assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
            running.stop().await;
            return;
        }
        other => {
            other.unwrap();
        }
    }
    let register = RegisterNodeRequest {
        node_id: "n1".into(),
        address: "http://127.0.0.1:1".into(),
        ttl_ms: 10_000,
        leaving: false,
    };
    client.register_node(register).await.unwrap();
    let mut watch = client.watch_placement().await.unwrap();
    let first = within(watch.next()).await.unwrap().unwrap();
    assert_eq!(first, store.get_placement(GetPlacementRequest {}).await.unwrap());
    assert!(first.owners.iter().all(|owner| owner.shard != 5));
    fence(&client, "n1", 5).await;
    let placement = within(watch.next()).await.unwrap().unwrap();
    assert!(placement.owners.iter().any(|owner| owner.shard == 5 && owner.node_id == "n1"), "{placement:?}");
    running.stop().await;
}

fn register(node: &str, ttl_ms: u64) -> RegisterNodeRequest {
    RegisterNodeRequest { node_id: node.into(), address: format!("http://{node}"), ttl_ms, leaving: false }
}

/// A store whose placement the test sets, and that can be told never to answer.
#[derive(Default)]
struct Scripted {
    placement: Mutex<Placement>,
    hang: AtomicBool,
}

impl Scripted {
    fn set_owner(&self, shard: u32, node: &str) {
        let owner = ShardOwner { shard, node_id: node.into(), epoch: 1 };
        self.placement.lock().unwrap().owners = vec![owner];
    }

    async fn maybe_hang(&self) {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl StoreApi for Scripted {
    async fn acquire_shards(&self, _: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError> {
        self.maybe_hang().await;
        Ok(AcquireShardsResponse::default())
    }
    async fn renew_shards(&self, _: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
        self.maybe_hang().await;
        Ok(RenewShardsResponse::default())
    }
    async fn append(&self, _: AppendRequest) -> Result<AppendResponse, StoreError> {
        self.maybe_hang().await;
        Err(StoreError::Invalid("not scripted".into()))
    }
    async fn read_events(&self, _: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
        self.maybe_hang().await;
        Ok(ReadEventsResponse::default())
    }
    async fn get_conversation(&self, _: GetConversationRequest) -> Result<GetConversationResponse, StoreError> {
        self.maybe_hang().await;
        Ok(GetConversationResponse::default())
    }
    async fn list_conversations(&self, _: ListConversationsRequest) -> Result<ListConversationsResponse, StoreError> {
        self.maybe_hang().await;
        Ok(ListConversationsResponse::default())
    }
    async fn release_shards(&self, _: ReleaseShardsRequest) -> Result<ReleaseShardsResponse, StoreError> {
        self.maybe_hang().await;
        Ok(ReleaseShardsResponse::default())
    }
    async fn register_node(&self, request: RegisterNodeRequest) -> Result<RegisterNodeResponse, StoreError> {
        self.maybe_hang().await;
        let mut placement = self.placement.lock().unwrap();
        placement.nodes.retain(|node| node.node_id != request.node_id);
        if !request.leaving {
            placement.nodes.push(NodeInfo {
                node_id: request.node_id,
                address: request.address,
                expires_at_ms: request.ttl_ms as i64,
            });
        }
        placement.nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(RegisterNodeResponse { nodes: placement.nodes.clone() })
    }
    async fn get_placement(&self, _: GetPlacementRequest) -> Result<Placement, StoreError> {
        self.maybe_hang().await;
        Ok(self.placement.lock().unwrap().clone())
    }
    async fn get_license(&self, _: GetLicenseRequest) -> Result<License, StoreError> {
        self.maybe_hang().await;
        Ok(License::default())
    }
    async fn set_license_limit(&self, _: SetLicenseLimitRequest) -> Result<License, StoreError> {
        self.maybe_hang().await;
        Ok(License::default())
    }
    async fn create_ticket(&self, _: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError> {
        self.maybe_hang().await;
        Err(StoreError::Invalid("not scripted".into()))
    }
    async fn list_tickets(&self, _: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError> {
        self.maybe_hang().await;
        Ok(ListTicketsResponse::default())
    }
}
