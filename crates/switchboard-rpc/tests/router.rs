//! `GrpcRouterNode` → `RouterGrpcServer` → a real `Router` on a `MemoryStore`, over loopback sockets;
//! and the serving basics (health, reflection, bad input) every role gets from `serve_grpc`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{DEADLINE, Running, Watched, any_port, client_settings, eventually, within};
use switchboard_domain::{
    AgentAvailability, AgentEntry, AgentId, AgentStatus, Author, AvailabilityVersion, Clock, ConversationId,
    ConversationState, Directory, Event, EventBody, FixedClock, GroupEntry, GroupId, OfferEnd, Refusal, RequeueReason,
    TenantEntry, TenantId, WaitingEntry,
};
use switchboard_presence::{MemoryPresence, Presence};
use switchboard_proto::internal::v1 as pb;
use switchboard_proto::internal::v1::AcquireShardsRequest;
use switchboard_proto::internal::v1::router_service_client::RouterServiceClient;
use switchboard_proto::router::{
    AgentChange, AgentView, Caller, ChatCommand, ChatList, ChatView, CommandOutcome, EventPage, GatewayId, LeftQueue,
    OfferUpdate, OfflineMessage, Origin, PeerApi, Push, QueueChange, RouterApi, RouterError, ShownOffer, StartChat,
    StartedChat, SystemCommand, Ticket,
};
use switchboard_proto::store::StoreApi;
use switchboard_router::{LeaseSettings, PresenceSettings, Router, RouterSettings};
use switchboard_rpc::{ClientSettings, GrpcRouterNode, GrpcServices, PushLinkEvent, PushStream, RouterGrpcServer};
use switchboard_store::MemoryStore;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

const NOW_MS: i64 = 1_700_000_000_000;

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn group(name: &str) -> GroupId {
    GroupId::new(name).unwrap()
}

fn agent(name: &str) -> AgentId {
    AgentId::new(name).unwrap()
}

fn agent_caller(name: &str) -> Caller {
    Caller::Agent { tenant: tenant(), agent: agent(name) }
}

/// Groups g1 and g2; agents a (g1, g2; capacity 2) and b (g1; capacity 5).
fn directory() -> Directory {
    let groups = ["g1", "g2"].map(|id| (group(id), GroupEntry::new(group(id), id)));
    let agents = [("a", vec!["g1", "g2"], 2), ("b", vec!["g1"], 5)].map(|(id, groups, capacity)| {
        let entry =
            AgentEntry { id: agent(id), name: id.into(), groups: groups.into_iter().map(group).collect(), capacity };
        (agent(id), entry)
    });
    let entry = TenantEntry {
        id: tenant(),
        name: "Acme".into(),
        groups: BTreeMap::from(groups),
        agents: BTreeMap::from(agents),
    };
    let mut directory = Directory::default();
    directory.add_tenant(entry, vec![], vec![]).unwrap();
    directory
}

/// A chat start in group g1 at `at_ms` (the conversation id's time), from `customer`.
fn chat_request(at_ms: i64, customer: &str) -> StartChat {
    StartChat {
        conversation: ConversationId::new_v7(at_ms),
        tenant: tenant(),
        group: group("g1"),
        customer_name: customer.into(),
        question: format!("question from {customer}"),
        tried_before: false,
        customer_token: switchboard_domain::new_customer_token(),
    }
}

async fn start_router(node_id: &str, store: Arc<MemoryStore>, clock: Arc<FixedClock>) -> Router {
    let settings = RouterSettings {
        node_id: node_id.into(),
        advertise: String::new(),
        leases: LeaseSettings::default(),
        closed_list_limit: 50,
        page_bytes: RouterSettings::PAGE_BYTES,
        presence: PresenceSettings::default(),
    };
    let clock: Arc<dyn Clock> = clock;
    let presence: Arc<dyn Presence> = Arc::new(MemoryPresence::new());
    Router::start(settings, store, clock, Arc::new(directory()), presence, None).await.unwrap()
}

fn services<T: RouterApi + PeerApi + ?Sized>(node: Arc<T>, keepalive: Duration) -> GrpcServices {
    let mut services = GrpcServices::new();
    let server = RouterGrpcServer::new(node).with_keepalive(keepalive).with_draining(services.draining());
    services.add_service(server.into_service());
    services
}

struct Cluster {
    store: Arc<MemoryStore>,
    clock: Arc<FixedClock>,
    node: Arc<Router>,
    running: Running,
    client: GrpcRouterNode,
}

impl Cluster {
    async fn start() -> Cluster {
        let clock = Arc::new(FixedClock::new(NOW_MS));
        let clock_dyn: Arc<dyn Clock> = clock.clone();
        let store = Arc::new(MemoryStore::new(clock_dyn));
        let node = Arc::new(start_router("node-1", store.clone(), clock.clone()).await);
        let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
        let client = GrpcRouterNode::connect_lazy(&running.url(), client_settings()).unwrap();
        Cluster { store, clock, node, running, client }
    }

    async fn start_chat(&self, group_name: &str, customer: &str) -> StartedChat {
        self.clock.advance_ms(1);
        let request = StartChat {
            conversation: ConversationId::new_v7(self.clock.now_ms()),
            tenant: tenant(),
            group: group(group_name),
            customer_name: customer.into(),
            question: format!("question from {customer}"),
            tried_before: false,
            customer_token: switchboard_domain::new_customer_token(),
        };
        self.client.start_chat(request).await.unwrap()
    }
}

async fn next_push(stream: &mut PushStream) -> Push {
    within(stream.next()).await.expect("the stream is open").expect("a push")
}

/// The next push that is not a queue's estimated wait (those come when the router's estimate changes).
async fn next_list_push(stream: &mut PushStream) -> Push {
    loop {
        match next_push(stream).await {
            Push::Queue { change: QueueChange::Estimate { .. }, .. } => continue,
            push => return push,
        }
    }
}

#[tokio::test]
async fn a_chat_through_grpc_with_its_pushes() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let started = cluster.start_chat("g1", "carol").await;
    let chat = started.view.conversation;
    assert_eq!(started.view.state, ConversationState::Queued);
    let customer = Caller::Customer { conversation: chat };

    // Reads through gRPC answer what the router answers in-process.
    let view = client.authorize_customer(chat, &started.customer_token).await.unwrap();
    assert_eq!(view, cluster.node.authorize_customer(chat, &started.customer_token).await.unwrap());
    assert_eq!(view, started.view);
    assert_eq!(client.authorize_customer(chat, "wrong").await.unwrap_err(), {
        cluster.node.authorize_customer(chat, "wrong").await.unwrap_err()
    });
    assert_eq!(client.chat_view(&customer, chat).await.unwrap(), view);

    let gateway = GatewayId("gw-1".into());
    let mut pushes = client.open_push_stream(&gateway).await.unwrap();
    let backlog = client.subscribe(&gateway, &customer, chat, 0).await.unwrap();
    assert_eq!(backlog, cluster.node.read_events(&customer, chat, 0).await.unwrap());
    assert!(matches!(backlog.events.first().map(|event| &event.body), Some(EventBody::Created { .. })));
    assert!(!backlog.more(), "a short log in one page");

    // An agent takes the chat and writes: the customer's gateway gets every event, in order.
    client.set_agent_status(&tenant(), &agent("b"), AgentStatus::Online).await.unwrap();
    let accepted = client.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    assert_eq!((accepted.state, accepted.owner.clone()), (ConversationState::Active, Some(agent("b"))));
    let send = ChatCommand::Send { client_msg_id: "m-1".into(), body: "hello, Carol".into() };
    let outcome = client.command(&agent_caller("b"), chat, send.clone()).await.unwrap();
    assert!(!outcome.duplicate);
    let sent = outcome.event.clone().expect("the stored message");
    assert_eq!(sent.client_msg_id.as_deref(), Some("m-1"));

    let mut events: Vec<Arc<Event>> = Vec::new();
    while events.last().map(|event| event.seq) != Some(sent.seq) {
        match next_push(&mut pushes).await {
            Push::Event { conversation, event, .. } => {
                assert_eq!(conversation, chat);
                events.push(event);
            }
            other => panic!("unexpected push {other:?}"),
        }
    }
    assert_eq!(events.iter().map(|event| event.body.kind()).collect::<Vec<_>>(), ["accepted", "message"]);
    assert_eq!(*events[1], sent);
    // The gateway's copy is the stored one.
    let after_seq = backlog.events.last().unwrap().seq;
    let stored = cluster.node.read_events(&customer, chat, after_seq).await.unwrap().events;
    assert_eq!(events.iter().map(|event| (**event).clone()).collect::<Vec<_>>(), stored);

    // A resend is a duplicate through the wire too; typing is pushed and not stored.
    let again = client.command(&agent_caller("b"), chat, send).await.unwrap();
    assert_eq!(again, CommandOutcome { event: Some(sent.clone()), duplicate: true });
    client.typing(&customer, chat, true).await.unwrap();
    assert_eq!(
        next_push(&mut pushes).await,
        Push::Typing { conversation: chat, author: switchboard_domain::Author::Customer, typing: true }
    );
    let ongoing = client.list_chats(&tenant(), &agent("b"), ChatList::Ongoing).await.unwrap();
    assert_eq!(ongoing, cluster.node.list_chats(&tenant(), &agent("b"), ChatList::Ongoing).await.unwrap());
    assert_eq!(ongoing.iter().map(|view| view.conversation).collect::<Vec<_>>(), [chat]);
    client.unsubscribe(&gateway, chat).await;
    cluster.running.stop().await;
}

#[tokio::test]
async fn queue_pushes_arrive_through_the_push_stream() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let gateway = GatewayId("gw-queue".into());
    let mut pushes = client.open_push_stream(&gateway).await.unwrap();
    client.subscribe_queue(&gateway, &tenant(), &group("g1")).await.unwrap();
    let Push::Queue { tenant: pushed_tenant, group: pushed_group, change, .. } = next_list_push(&mut pushes).await
    else {
        panic!("a queue push first");
    };
    assert_eq!((pushed_tenant, pushed_group), (tenant(), group("g1")));
    assert_eq!(change, QueueChange::Snapshot { entries: vec![] });

    let started = cluster.start_chat("g1", "dave").await;
    let Push::Queue { change: QueueChange::Added { entry }, .. } = next_list_push(&mut pushes).await else {
        panic!("the chat joins the queue");
    };
    assert_eq!(entry.conversation, started.view.conversation);
    client.set_agent_status(&tenant(), &agent("b"), AgentStatus::Online).await.unwrap();
    client.accept_chat(&tenant(), &agent("b"), started.view.conversation).await.unwrap();
    let Push::Queue { change: QueueChange::Removed { conversation, reason }, .. } = next_list_push(&mut pushes).await
    else {
        panic!("the chat leaves the queue");
    };
    assert_eq!((conversation, reason), (started.view.conversation, LeftQueue::Accepted { agent: agent("b") }));

    // What another router would ask of this one (PeerApi) goes through the same way.
    let entry = WaitingEntry {
        conversation: ConversationId::new_v7(NOW_MS + 5),
        group: group("g1"),
        queued_at_ms: NOW_MS + 5,
        customer_name: "eve".into(),
        question: "?".into(),
    };
    client.queue_add(&tenant(), entry.clone(), (NOW_MS + 5) * 1_000).await.unwrap();
    let Push::Queue { change: QueueChange::Added { entry: added }, .. } = next_list_push(&mut pushes).await else {
        panic!("the peer's chat joins the queue");
    };
    assert_eq!(added, entry);
    client.queue_remove(&tenant(), &group("g1"), entry.conversation, LeftQueue::Cancelled).await.unwrap();
    let Push::Queue { change: QueueChange::Removed { conversation, reason }, .. } = next_list_push(&mut pushes).await
    else {
        panic!("the peer's chat leaves the queue");
    };
    assert_eq!((conversation, reason), (entry.conversation, LeftQueue::Cancelled));
    client.unsubscribe_queue(&gateway, &tenant(), &group("g1")).await;
    cluster.running.stop().await;
}

#[tokio::test]
async fn forwards_transfers_and_offline_messages_through_grpc_on_a_real_router() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let gateway = GatewayId("gw-agent".into());
    let mut pushes = client.open_push_stream(&gateway).await.unwrap();
    client.subscribe_agent(&gateway, &tenant(), &agent("a"), &[]).await.unwrap();
    for name in ["a", "b"] {
        client.set_agent_status(&tenant(), &agent(name), AgentStatus::Online).await.unwrap();
    }
    let chat = cluster.start_chat("g1", "carol").await.view.conversation;
    client.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();

    // b hands the chat to a: a's gateway is told, through the push stream, that the chat is a's now.
    let forwarded = client.forward_chat(&agent_caller("b"), chat, &agent("a")).await.unwrap();
    assert_eq!((forwarded.state, forwarded.owner.clone()), (ConversationState::Active, Some(agent("a"))));
    let assigned = within(async {
        loop {
            if let Push::Agent { agent: pushed, change: AgentChange::Assigned { chat: view }, .. } =
                next_push(&mut pushes).await
            {
                return (pushed, view);
            }
        }
    })
    .await;
    assert_eq!(assigned, (agent("a"), forwarded.clone()));
    // The same forward again is refused as the router refuses it.
    let again = client.forward_chat(&agent_caller("b"), chat, &agent("a")).await.unwrap_err();
    assert_eq!(again, cluster.node.forward_chat(&agent_caller("b"), chat, &agent("a")).await.unwrap_err());

    // a moves it to g2 (online: a is signed in there), where it waits again.
    let transferred = eventually(|| async {
        match client.transfer_chat(&agent_caller("a"), chat, &group("g2")).await {
            Ok(view) => Some(view),
            Err(RouterError::Refused(Refusal::GroupOffline)) => None,
            Err(error) => panic!("transfer failed: {error}"),
        }
    })
    .await;
    assert_eq!(
        (transferred.group, transferred.state, transferred.owner),
        (group("g2"), ConversationState::Queued, None)
    );

    // An offline message is stored once per idempotency key.
    let first = client.leave_offline_message(offline_message("key-1")).await.unwrap();
    assert!(!first.duplicate);
    let second = client.leave_offline_message(offline_message("key-1")).await.unwrap();
    assert_eq!((second.id, second.duplicate), (first.id, true));
    let unknown = OfflineMessage { group: group("nope"), ..offline_message("key-2") };
    assert_eq!(client.leave_offline_message(unknown).await.unwrap_err(), RouterError::UnknownGroup);
    client.unsubscribe_agent(&gateway, &tenant(), &agent("a")).await;
    cluster.running.stop().await;
}

#[tokio::test]
async fn a_refusal_arrives_as_the_same_refusal() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let view = client.set_agent_status(&tenant(), &agent("a"), AgentStatus::Online).await.unwrap();
    assert_eq!(
        view,
        AgentView {
            tenant: tenant(),
            agent: agent("a"),
            status: AgentStatus::Online,
            capacity: 2,
            groups: vec![group("g1"), group("g2")],
            active: vec![],
        }
    );
    for customer in ["x", "y"] {
        let chat = cluster.start_chat("g1", customer).await.view.conversation;
        client.accept_chat(&tenant(), &agent("a"), chat).await.unwrap();
    }
    let third = cluster.start_chat("g1", "z").await.view.conversation;
    let refused = client.accept_chat(&tenant(), &agent("a"), third).await.unwrap_err();
    assert_eq!(refused, RouterError::Refused(Refusal::AtCapacity { capacity: 2 }));

    // An agent who is away is refused; b is not in g2; an empty message is refused; an unknown group is not
    // found. Each answer through gRPC is the router's own (a refused call changes nothing, so it can be asked
    // twice).
    let in_g2 = cluster.start_chat("g2", "w").await.view.conversation;
    client.set_agent_status(&tenant(), &agent("a"), AgentStatus::Away).await.unwrap();
    let refused = client.accept_chat(&tenant(), &agent("a"), in_g2).await.unwrap_err();
    assert_eq!(refused, RouterError::Refused(Refusal::AgentNotOnline));
    client.set_agent_status(&tenant(), &agent("b"), AgentStatus::Online).await.unwrap();
    let refused = client.accept_chat(&tenant(), &agent("b"), in_g2).await.unwrap_err();
    assert_eq!(refused, cluster.node.accept_chat(&tenant(), &agent("b"), in_g2).await.unwrap_err());
    let empty = ChatCommand::Send { client_msg_id: "e".into(), body: String::new() };
    let customer = Caller::Customer { conversation: third };
    let refused = client.command(&customer, third, empty.clone()).await.unwrap_err();
    assert_eq!(refused, cluster.node.command(&customer, third, empty).await.unwrap_err());
    let request = StartChat {
        conversation: ConversationId::new_v7(NOW_MS),
        tenant: tenant(),
        group: group("nope"),
        customer_name: "v".into(),
        question: "?".into(),
        tried_before: false,
        customer_token: switchboard_domain::new_customer_token(),
    };
    assert_eq!(client.start_chat(request).await.unwrap_err(), RouterError::UnknownGroup);
    cluster.running.stop().await;
}

#[tokio::test]
async fn a_node_that_does_not_own_the_shard_answers_not_owner() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let chat = cluster.start_chat("g1", "x").await.view.conversation;
    // The leases expire in database time and another node takes every shard.
    cluster.clock.advance_ms(60_000);
    let takeover = AcquireShardsRequest { node_id: "node-2".into(), shards: vec![], lease_ms: 600_000, limit: 0 };
    assert_eq!(cluster.store.acquire_shards(takeover).await.unwrap().granted.len(), 1024);

    let send = ChatCommand::Send { client_msg_id: "m".into(), body: "too late".into() };
    let customer = Caller::Customer { conversation: chat };
    let error = client.command(&customer, chat, send).await.unwrap_err();
    assert_eq!(error, RouterError::NotOwner);
    assert!(error.is_retryable());
    let request = StartChat {
        conversation: ConversationId::new_v7(NOW_MS + 100_000),
        tenant: tenant(),
        group: group("g1"),
        customer_name: "y".into(),
        question: "?".into(),
        tried_before: false,
        customer_token: switchboard_domain::new_customer_token(),
    };
    assert_eq!(client.start_chat(request).await.unwrap_err(), RouterError::NotOwner);
    // The peer calls answer the same once the node knows it lost the shards (at its next renewal).
    let lost = eventually(|| async {
        let error = client.owner_accept(chat, &agent("b")).await.unwrap_err();
        (error == RouterError::NotOwner).then_some(error)
    })
    .await;
    assert_eq!(lost, RouterError::NotOwner);
    cluster.running.stop().await;
}

#[tokio::test]
async fn keepalives_flow_on_the_wire_and_never_reach_the_caller() {
    let cluster = Cluster::start().await;
    let running = Running::start(any_port().await, services(cluster.node.clone(), Duration::from_millis(10))).await;
    let client = GrpcRouterNode::connect_lazy(&running.url(), client_settings()).unwrap();

    let mut raw = RouterServiceClient::connect(running.url()).await.unwrap();
    let request = pb::ConnectRequest { gateway_id: "gw-raw".into() };
    let mut frames = raw.push_stream(request).await.unwrap().into_inner();
    let mut pushes = client.open_push_stream(&GatewayId("gw-1".into())).await.unwrap();
    for _ in 0..3 {
        let frame = within(frames.next()).await.unwrap().unwrap();
        assert!(matches!(frame.push, Some(pb::push_frame::Push::Keepalive(_))), "{frame:?}");
    }
    // Keepalives went by on gw-1's stream too; its first item is the first real push.
    let started = cluster.start_chat("g1", "x").await;
    let chat = started.view.conversation;
    let customer = Caller::Customer { conversation: chat };
    client.subscribe(&GatewayId("gw-1".into()), &customer, chat, 0).await.unwrap();
    client.typing(&customer, chat, true).await.unwrap();
    assert!(matches!(next_push(&mut pushes).await, Push::Typing { typing: true, .. }));
    running.stop().await;
    cluster.running.stop().await;
}

#[tokio::test]
async fn a_second_stream_for_the_same_gateway_ends_the_first() {
    let cluster = Cluster::start().await;
    let gateway = GatewayId("gw-1".into());
    let mut first = cluster.client.open_push_stream(&gateway).await.unwrap();
    let _second = cluster.client.open_push_stream(&gateway).await.unwrap();
    // The router dropped the first sink; its stream ends with an error, which is its last item.
    let end = within(first.next()).await;
    assert!(matches!(end, Some(Err(RouterError::Unavailable(_)))), "{end:?}");
    assert!(first.next().await.is_none());
    cluster.running.stop().await;
}

#[tokio::test]
async fn connect_gateway_forwards_pushes_and_reconnects_after_the_server_restarts() {
    let cluster = Cluster::start().await;
    let addr = cluster.running.addr;
    let client = &cluster.client;
    let gateway = GatewayId("gw-1".into());
    let (sink, mut pushes) = mpsc::unbounded_channel();
    let (link, mut links) = mpsc::unbounded_channel();
    client.connect_gateway_observed(gateway.clone(), sink, link);
    assert_eq!(within(links.recv()).await, Some(PushLinkEvent::Connected));

    let started = cluster.start_chat("g1", "x").await;
    let chat = started.view.conversation;
    let customer = Caller::Customer { conversation: chat };
    let backlog = client.subscribe(&gateway, &customer, chat, 0).await.unwrap();
    client.typing(&customer, chat, true).await.unwrap();
    assert!(matches!(within(pushes.recv()).await, Some(Push::Typing { typing: true, .. })));

    // The server goes away (draining ends the stream) and comes back on the same address.
    cluster.running.stop().await;
    assert!(matches!(within(links.recv()).await, Some(PushLinkEvent::Lost(_))));
    let running =
        Running::start(TcpListener::bind(addr).await.unwrap(), services(cluster.node.clone(), Duration::from_secs(5)))
            .await;
    // Reopening may fail a few times before the server is back; it is reopened in the end.
    within(async {
        while let Some(event) = links.recv().await {
            if event == PushLinkEvent::Connected {
                return;
            }
        }
        panic!("the link task ended");
    })
    .await;
    // Subscriptions are made again after a reconnect; pushes flow into the same sink.
    let last_seq = backlog.last_seq;
    client.subscribe(&gateway, &customer, chat, last_seq).await.unwrap();
    client.typing(&customer, chat, false).await.unwrap();
    assert!(matches!(within(pushes.recv()).await, Some(Push::Typing { typing: false, .. })));

    // Closing the sink stops the task.
    drop(pushes);
    assert_eq!(within(links.recv()).await, None, "the task ends when the sink is closed");
    running.stop().await;
}

#[tokio::test]
async fn a_stopped_router_is_unavailable() {
    let cluster = Cluster::start().await;
    let chat = cluster.start_chat("g1", "x").await.view.conversation;
    cluster.running.stop().await;
    let customer = Caller::Customer { conversation: chat };
    let error = within(cluster.client.chat_view(&customer, chat)).await.unwrap_err();
    assert!(matches!(error, RouterError::Unavailable(_)), "{error:?}");
    let error = within(cluster.client.open_push_stream(&GatewayId("gw".into()))).await.unwrap_err();
    assert!(matches!(error, RouterError::Unavailable(_)), "{error:?}");
}

/// A node that answers every call with the error it is given, or holds every call until released (never,
/// unless `release` is set), and records peer calls and how many calls it held at most at once.
#[derive(Default)]
struct Scripted {
    error: Mutex<Option<RouterError>>,
    hang: AtomicBool,
    release: tokio::sync::watch::Sender<bool>,
    held: AtomicUsize,
    most_held: AtomicUsize,
    peer_calls: Mutex<Vec<String>>,
    sinks: Mutex<Vec<mpsc::UnboundedSender<Push>>>,
}

impl Scripted {
    async fn outcome(&self) -> Result<(), RouterError> {
        if self.hang.load(Ordering::SeqCst) {
            let held = self.held.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_held.fetch_max(held, Ordering::SeqCst);
            let _ = self.release.subscribe().wait_for(|released| *released).await;
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        match self.error.lock().unwrap().clone() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn view(conversation: ConversationId) -> ChatView {
        ChatView {
            conversation,
            tenant: tenant(),
            group: group("g1"),
            state: ConversationState::Active,
            owner: Some(agent("a")),
            customer_name: "c".into(),
            first_question: "q".into(),
            created_at_ms: NOW_MS,
            accepted_at_ms: Some(NOW_MS + 1),
            closed_at_ms: None,
            last_seq: 3,
            customer_away: false,
        }
    }

    fn availability(agent: &AgentId) -> AgentAvailability {
        AgentAvailability {
            agent: agent.clone(),
            status: AgentStatus::Online,
            capacity: 3,
            held: 2,
            offer: Some(ConversationId::parse("01900000-0000-7000-8000-000000000001").unwrap()),
            idle_since_ms: NOW_MS - 60_000,
            version: AvailabilityVersion { epoch: 4, change: 17 },
        }
    }
}

#[tokio::test]
async fn every_router_error_arrives_as_it_was_raised() {
    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let client = GrpcRouterNode::connect_lazy(&running.url(), client_settings()).unwrap();
    let chat = ConversationId::new_v7(NOW_MS);
    let mut errors = vec![
        RouterError::NotFound,
        RouterError::UnknownAgent,
        RouterError::UnknownGroup,
        RouterError::NotOwner,
        RouterError::Unavailable("store unavailable: database is locked".into()),
        RouterError::Internal("conversation actor did not start".into()),
    ];
    errors.extend(
        [
            Refusal::ChatTaken,
            Refusal::NotAccepted,
            Refusal::NotParticipant,
            Refusal::ChatClosed,
            Refusal::AgentNotOnline,
            Refusal::AtCapacity { capacity: 4 },
            Refusal::NotInGroup,
            Refusal::EmptyMessage,
            Refusal::BadDeliveryMark { last_seq: 9 },
            Refusal::BadAfterSeq { last_seq: 9 },
            Refusal::NotOffered,
            Refusal::OfferOutstanding,
            Refusal::SameGroup,
            Refusal::SameAgent,
            Refusal::GroupClosed,
            Refusal::GroupOffline,
            Refusal::AgentUnavailable,
            Refusal::LicenseExhausted { max_sessions: 5_000 },
        ]
        .map(RouterError::Refused),
    );
    for error in errors {
        *node.error.lock().unwrap() = Some(error.clone());
        assert_eq!(client.command(&agent_caller("a"), chat, ChatCommand::Close).await.unwrap_err(), error);
        assert_eq!(client.owner_accept(chat, &agent("a")).await.unwrap_err(), error);
        // The calls of push routing, transfers and offline messages carry errors the same way.
        assert_eq!(client.transfer_chat(&agent_caller("a"), chat, &group("g2")).await.unwrap_err(), error);
        assert_eq!(client.forward_chat(&agent_caller("a"), chat, &agent("b")).await.unwrap_err(), error);
        assert_eq!(client.leave_offline_message(offline_message("k")).await.unwrap_err(), error);
        assert_eq!(client.reject_offer(&tenant(), &group("g1"), &agent("a"), chat).await.unwrap_err(), error);
        assert_eq!(
            client.subscribe_agent(&GatewayId("gw".into()), &tenant(), &agent("a"), &[]).await.unwrap_err(),
            error
        );
        let offer = SystemCommand::Offer { agent: agent("a"), expires_at_ms: NOW_MS, group: None };
        assert_eq!(client.conversation_system(chat, offer).await.unwrap_err(), error);
        assert_eq!(client.agent_availability(&tenant(), &agent("a")).await.unwrap_err(), error);
        assert_eq!(client.owner_forward(&agent_caller("a"), chat, &agent("b")).await.unwrap_err(), error);
    }
    // The license limit comes back with its number.
    *node.error.lock().unwrap() = Some(RouterError::Refused(Refusal::LicenseExhausted { max_sessions: 42 }));
    let request = StartChat {
        conversation: chat,
        tenant: tenant(),
        group: group("g1"),
        customer_name: "c".into(),
        question: "?".into(),
        tried_before: false,
        customer_token: switchboard_domain::new_customer_token(),
    };
    assert_eq!(
        client.start_chat(request).await.unwrap_err(),
        RouterError::Refused(Refusal::LicenseExhausted { max_sessions: 42 })
    );
    running.stop().await;
}

fn offline_message(key: &str) -> OfflineMessage {
    OfflineMessage {
        tenant: tenant(),
        group: group("g2"),
        customer_name: "Carol".into(),
        contact: "carol@example.com".into(),
        body: "Call me back, please: ünïcode.".into(),
        reason: "group_closed".into(),
        idempotency_key: key.into(),
    }
}

fn entry(conversation: ConversationId) -> WaitingEntry {
    WaitingEntry {
        conversation,
        group: group("g1"),
        queued_at_ms: NOW_MS,
        customer_name: "Carol".into(),
        question: "Where?".into(),
    }
}

#[tokio::test]
async fn push_routing_transfer_and_offline_calls_reach_the_node_with_their_arguments() {
    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let client = GrpcRouterNode::connect_lazy(&running.url(), client_settings()).unwrap();
    let chat = ConversationId::new_v7(NOW_MS);
    let gateway = GatewayId("gw-7".into());
    let customer = Caller::Customer { conversation: chat };

    let shown = [ShownOffer { conversation: chat, expires_at_ms: NOW_MS + 30_000 }];
    client.subscribe_agent(&gateway, &tenant(), &agent("a"), &shown).await.unwrap();
    client.unsubscribe_agent(&gateway, &tenant(), &agent("a")).await;
    client.reject_offer(&tenant(), &group("g1"), &agent("b"), chat).await.unwrap();
    let transferred = client.transfer_chat(&customer, chat, &group("g2")).await.unwrap();
    assert_eq!(transferred.group, group("g2"));
    let forwarded = client.forward_chat(&agent_caller("a"), chat, &agent("b")).await.unwrap();
    assert_eq!(forwarded.owner, Some(agent("b")));
    let ticket = client.leave_offline_message(offline_message("key-1")).await.unwrap();
    assert_eq!(ticket, Ticket { id: "ticket-key-1".into(), created_at_ms: NOW_MS, duplicate: false });
    let again = client.leave_offline_message(offline_message("dup")).await.unwrap();
    assert!(again.duplicate);

    let commands = [
        SystemCommand::Offer { agent: agent("a"), expires_at_ms: NOW_MS + 30_000, group: Some(group("sales")) },
        SystemCommand::EndOffer { agent: agent("a"), reason: OfferEnd::TimedOut },
        SystemCommand::Requeue { agent: agent("b"), reason: RequeueReason::AgentOffline },
    ];
    for command in &commands {
        assert!(client.conversation_system(chat, command.clone()).await.unwrap(), "the node says it stored");
    }
    let made =
        OfferUpdate::Made { entry: entry(chat), expires_at_ms: NOW_MS + 30_000, waiting_since_us: NOW_MS * 1_000 + 7 };
    let ended =
        OfferUpdate::Ended { conversation: chat, reason: OfferEnd::Rejected, expires_at_ms: Some(NOW_MS + 30_000) };
    client.agent_offer(&tenant(), &agent("a"), made.clone()).await.unwrap();
    client.agent_offer(&tenant(), &agent("a"), ended.clone()).await.unwrap();
    let availability = client.agent_availability(&tenant(), &agent("a")).await.unwrap();
    assert_eq!(availability, Scripted::availability(&agent("a")));
    let idle = AgentAvailability { offer: None, ..availability.clone() };
    client.queue_agent_changed(&tenant(), &group("g2"), idle.clone()).await.unwrap();
    let owned = client.owner_forward(&agent_caller("a"), chat, &agent("b")).await.unwrap();
    assert_eq!(owned.owner, Some(agent("b")));

    let mut expected = vec![
        format!("subscribe_agent gw-7 acme a {shown:?}"),
        "unsubscribe_agent gw-7 acme a".to_owned(),
        format!("reject_offer acme g1 b {chat}"),
        format!("transfer_chat {customer:?} {chat} g2"),
        format!("forward_chat {:?} {chat} b", agent_caller("a")),
        format!("leave_offline_message {:?}", offline_message("key-1")),
        format!("leave_offline_message {:?}", offline_message("dup")),
    ];
    expected.extend(commands.iter().map(|command| format!("conversation_system {chat} {command:?}")));
    expected.extend([
        format!("agent_offer acme a {made:?}"),
        format!("agent_offer acme a {ended:?}"),
        "agent_availability acme a".to_owned(),
        format!("queue_agent_changed acme g2 {idle:?}"),
        format!("owner_forward {:?} {chat} b", agent_caller("a")),
    ]);
    assert_eq!(*node.peer_calls.lock().unwrap(), expected);
    running.stop().await;
}

#[tokio::test]
async fn every_new_push_arrives_as_it_was_sent() {
    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let client = GrpcRouterNode::connect_lazy(&running.url(), client_settings()).unwrap();
    let mut pushes = client.open_push_stream(&GatewayId("gw-1".into())).await.unwrap();
    let sink = node.sinks.lock().unwrap().last().cloned().expect("the stream registered its sink");
    let chat = ConversationId::new_v7(NOW_MS);
    let agent_view = AgentView {
        tenant: tenant(),
        agent: agent("a"),
        status: AgentStatus::Away,
        capacity: 2,
        groups: vec![group("g1"), group("g2")],
        active: vec![chat],
    };
    let agent_push = |change| Push::Agent { tenant: tenant(), agent: agent("a"), change };
    let queue_push = |version, change| Push::Queue { tenant: tenant(), group: group("g1"), version, change };
    let event = |seq, body| Push::Event {
        conversation: chat,
        event: Arc::new(Event { seq, at_ms: NOW_MS + seq as i64, author: Author::System, client_msg_id: None, body }),
        origin: (seq % 2 == 0).then(|| Origin {
            received_at_us: 1_767_225_600_000_123,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }),
    };
    let sent = vec![
        agent_push(AgentChange::Offered {
            entry: entry(chat),
            expires_at_ms: NOW_MS + 30_000,
            waiting_since_us: NOW_MS * 1_000 + 7,
        }),
        agent_push(AgentChange::OfferEnded { conversation: chat, reason: OfferEnd::Withdrawn }),
        agent_push(AgentChange::Assigned { chat: Scripted::view(chat) }),
        agent_push(AgentChange::Status { agent: agent_view }),
        queue_push(7, QueueChange::Estimate { wait_per_position_ms: Some(45_000) }),
        queue_push(8, QueueChange::Estimate { wait_per_position_ms: None }),
        queue_push(
            9,
            QueueChange::Removed { conversation: chat, reason: LeftQueue::Transferred { to_group: group("g2") } },
        ),
        event(3, EventBody::Offered { agent: agent("a"), expires_at_ms: NOW_MS + 30_000 }),
        event(4, EventBody::OfferEnded { agent: agent("a"), reason: OfferEnd::Rejected }),
        event(5, EventBody::Transferred { from_agent: None, to_group: group("g2") }),
        event(6, EventBody::Forwarded { from_agent: Some(agent("a")), to_agent: agent("b") }),
        event(7, EventBody::Requeued { from_agent: agent("b"), reason: RequeueReason::AgentOffline }),
    ];
    for push in &sent {
        sink.send(push.clone()).unwrap();
    }
    let mut received = Vec::new();
    while received.len() < sent.len() {
        received.push(next_push(&mut pushes).await);
    }
    assert_eq!(received, sent);
    running.stop().await;
}

#[tokio::test]
async fn peer_calls_reach_the_peer_api_with_their_arguments() {
    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let client = GrpcRouterNode::connect_lazy(&running.url(), client_settings()).unwrap();
    let chat = ConversationId::new_v7(NOW_MS);
    assert_eq!(client.owner_accept(chat, &agent("a")).await.unwrap(), Scripted::view(chat));
    let entry = WaitingEntry {
        conversation: chat,
        group: group("g2"),
        queued_at_ms: NOW_MS,
        customer_name: "Carol".into(),
        question: "Where?".into(),
    };
    client.queue_add(&tenant(), entry.clone(), NOW_MS * 1_000 + 250).await.unwrap();
    client.queue_remove(&tenant(), &group("g2"), chat, LeftQueue::Accepted { agent: agent("b") }).await.unwrap();
    client.queue_remove(&tenant(), &group("g2"), chat, LeftQueue::Cancelled).await.unwrap();
    client.agent_finished(&tenant(), &agent("b"), chat).await.unwrap();
    assert_eq!(
        *node.peer_calls.lock().unwrap(),
        [
            format!("owner_accept {chat} a"),
            format!("queue_add acme {entry:?} waiting since {}µs", NOW_MS * 1_000 + 250),
            format!("queue_remove acme g2 {chat} {:?}", LeftQueue::Accepted { agent: agent("b") }),
            format!("queue_remove acme g2 {chat} Cancelled"),
            format!("agent_finished acme b {chat}"),
        ]
    );
    running.stop().await;
}

#[tokio::test]
async fn a_router_that_never_answers_is_unavailable_after_the_request_timeout() {
    let node = Arc::new(Scripted::default());
    node.hang.store(true, Ordering::SeqCst);
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let settings = ClientSettings { request_timeout: Duration::from_millis(300), ..client_settings() };
    let client = GrpcRouterNode::connect_lazy(&running.url(), settings).unwrap();
    let chat = ConversationId::new_v7(NOW_MS);
    let error = within(client.chat_view(&agent_caller("a"), chat)).await.unwrap_err();
    assert!(matches!(error, RouterError::Unavailable(_)), "{error:?}");
    assert!(error.is_retryable());
    running.stop().await;
}

#[tokio::test]
async fn bad_input_from_the_wire_is_invalid_argument_and_the_server_carries_on() {
    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let mut raw = RouterServiceClient::connect(running.url()).await.unwrap();
    let bad_requests = [
        pb::CommandRequest { caller: None, conversation_id: ConversationId::new_v7(NOW_MS).to_string(), command: None },
        pb::CommandRequest {
            caller: Some(pb::Caller { who: Some(pb::caller::Who::CustomerConversationId("nope".into())) }),
            conversation_id: "nope".into(),
            command: Some(pb::command_request::Command::Close(pb::Empty {})),
        },
    ];
    for request in bad_requests {
        let status = raw.command(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    let status = raw
        .set_agent_status(pb::SetAgentStatusRequest {
            tenant_id: "acme".into(),
            agent_id: "a".into(),
            status: "busy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = raw.push_stream(pb::ConnectRequest { gateway_id: String::new() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // The same connection still serves good requests.
    let reply = raw
        .owner_accept(pb::OwnerAcceptRequest {
            conversation_id: ConversationId::new_v7(NOW_MS).to_string(),
            agent_id: "a".into(),
        })
        .await
        .unwrap();
    assert!(reply.into_inner().view.is_some());
    running.stop().await;
}

#[tokio::test]
async fn health_answers_serving_and_reflection_lists_the_services() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node, Duration::from_secs(5))).await;
    let channel = tonic::transport::Endpoint::from_shared(running.url()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let router_service = "switchboard.internal.v1.RouterService";
    let check = |service: &str| HealthCheckRequest { service: service.into() };
    for service in ["", router_service] {
        let status = health.check(check(service)).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health.check(check("switchboard.internal.v1.StoreService")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "only what is served has a health");

    // A draining role says so.
    running.health.set_not_serving().await;
    for service in ["", router_service] {
        let status = health.check(check(service)).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::NotServing as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let reply = within(replies.next()).await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("a list of services: {reply:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    names.sort();
    assert_eq!(names, ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", router_service]);

    // Reflection describes the service from the committed descriptor set.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(router_service.into())),
    };
    let mut replies = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let reply = within(replies.next()).await.unwrap().unwrap();
    assert!(matches!(reply.message_response, Some(MessageResponse::FileDescriptorResponse(_))), "{reply:?}");
    running.stop().await;
}

#[tokio::test]
async fn stopping_a_server_with_open_push_streams_does_not_wait_for_them() {
    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node, Duration::from_secs(5))).await;
    let client = GrpcRouterNode::connect_lazy(&running.url(), client_settings()).unwrap();
    let mut streams = Vec::new();
    for gateway in ["gw-1", "gw-2"] {
        streams.push(client.open_push_stream(&GatewayId(gateway.into())).await.unwrap());
    }
    // `stop` waits for every connection to close, well before the 30 s grace.
    tokio::time::timeout(DEADLINE, running.stop()).await.expect("the drain ended the push streams");
    for mut stream in streams {
        assert!(matches!(within(stream.next()).await, Some(Err(RouterError::Unavailable(_)))));
    }
}

#[async_trait]
impl RouterApi for Scripted {
    fn connect_gateway(&self, _gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        // Kept open for the life of the node: its streams end only when the client goes or the server drains.
        self.sinks.lock().unwrap().push(sink);
    }
    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError> {
        self.outcome().await?;
        Ok(StartedChat { view: Scripted::view(request.conversation), customer_token: "t".into(), duplicate: false })
    }
    async fn authorize_customer(&self, conversation: ConversationId, _token: &str) -> Result<ChatView, RouterError> {
        self.outcome().await?;
        Ok(Scripted::view(conversation))
    }
    async fn chat_view(&self, _caller: &Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        self.outcome().await?;
        Ok(Scripted::view(conversation))
    }
    async fn subscribe(
        &self,
        _gateway: &GatewayId,
        _caller: &Caller,
        _conversation: ConversationId,
        _after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        self.outcome().await?;
        Ok(EventPage::default())
    }
    async fn unsubscribe(&self, _gateway: &GatewayId, _conversation: ConversationId) {}
    async fn read_events(
        &self,
        _caller: &Caller,
        _conversation: ConversationId,
        _after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        self.outcome().await?;
        Ok(EventPage::default())
    }
    async fn command(
        &self,
        _caller: &Caller,
        _conversation: ConversationId,
        _command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError> {
        self.outcome().await?;
        Ok(CommandOutcome { event: None, duplicate: false })
    }
    async fn typing(&self, _caller: &Caller, _conversation: ConversationId, _typing: bool) -> Result<(), RouterError> {
        self.outcome().await
    }
    async fn customer_connection(&self, _conversation: ConversationId) -> Result<(), RouterError> {
        self.outcome().await
    }
    async fn accept_chat(
        &self,
        _tenant: &TenantId,
        _agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError> {
        self.outcome().await?;
        Ok(Scripted::view(conversation))
    }
    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError> {
        self.outcome().await?;
        Ok(AgentView {
            tenant: tenant.clone(),
            agent: agent.clone(),
            status,
            capacity: 1,
            groups: vec![],
            active: vec![],
        })
    }
    async fn subscribe_agent(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        agent: &AgentId,
        shown: &[ShownOffer],
    ) -> Result<(), RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("subscribe_agent {} {tenant} {agent} {shown:?}", gateway.0));
        Ok(())
    }
    async fn unsubscribe_agent(&self, gateway: &GatewayId, tenant: &TenantId, agent: &AgentId) {
        self.peer_calls.lock().unwrap().push(format!("unsubscribe_agent {} {tenant} {agent}", gateway.0));
    }
    async fn reject_offer(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("reject_offer {tenant} {group} {agent} {conversation}"));
        Ok(())
    }
    async fn transfer_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_group: &GroupId,
    ) -> Result<ChatView, RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("transfer_chat {caller:?} {conversation} {to_group}"));
        Ok(ChatView {
            group: to_group.clone(),
            state: ConversationState::Queued,
            owner: None,
            accepted_at_ms: None,
            ..Scripted::view(conversation)
        })
    }
    async fn forward_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("forward_chat {caller:?} {conversation} {to_agent}"));
        Ok(ChatView { owner: Some(to_agent.clone()), ..Scripted::view(conversation) })
    }
    async fn leave_offline_message(&self, message: OfflineMessage) -> Result<Ticket, RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("leave_offline_message {message:?}"));
        let duplicate = message.idempotency_key == "dup";
        Ok(Ticket { id: format!("ticket-{}", message.idempotency_key), created_at_ms: NOW_MS, duplicate })
    }
    async fn subscribe_queue(
        &self,
        _gateway: &GatewayId,
        _tenant: &TenantId,
        _group: &GroupId,
    ) -> Result<(), RouterError> {
        self.outcome().await
    }
    async fn unsubscribe_queue(&self, _gateway: &GatewayId, _tenant: &TenantId, _group: &GroupId) {}
    async fn list_chats(
        &self,
        _tenant: &TenantId,
        _agent: &AgentId,
        _list: ChatList,
    ) -> Result<Vec<ChatView>, RouterError> {
        self.outcome().await?;
        Ok(vec![])
    }
}

#[async_trait]
impl PeerApi for Scripted {
    async fn owner_accept(&self, conversation: ConversationId, agent: &AgentId) -> Result<ChatView, RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("owner_accept {conversation} {agent}"));
        Ok(Scripted::view(conversation))
    }
    async fn queue_add(&self, tenant: &TenantId, entry: WaitingEntry, since_us: i64) -> Result<(), RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("queue_add {tenant} {entry:?} waiting since {since_us}µs"));
        Ok(())
    }
    async fn queue_remove(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        conversation: ConversationId,
        reason: LeftQueue,
    ) -> Result<(), RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("queue_remove {tenant} {group} {conversation} {reason:?}"));
        Ok(())
    }
    async fn agent_finished(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("agent_finished {tenant} {agent} {conversation}"));
        Ok(())
    }
    async fn conversation_system(
        &self,
        conversation: ConversationId,
        command: SystemCommand,
    ) -> Result<bool, RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("conversation_system {conversation} {command:?}"));
        Ok(true)
    }
    async fn agent_offer(&self, tenant: &TenantId, agent: &AgentId, update: OfferUpdate) -> Result<(), RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("agent_offer {tenant} {agent} {update:?}"));
        Ok(())
    }
    async fn agent_availability(&self, tenant: &TenantId, agent: &AgentId) -> Result<AgentAvailability, RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("agent_availability {tenant} {agent}"));
        Ok(Scripted::availability(agent))
    }
    async fn queue_agent_changed(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        availability: AgentAvailability,
    ) -> Result<(), RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("queue_agent_changed {tenant} {group} {availability:?}"));
        Ok(())
    }
    async fn owner_forward(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        self.outcome().await?;
        self.peer_calls.lock().unwrap().push(format!("owner_forward {caller:?} {conversation} {to_agent}"));
        Ok(ChatView { owner: Some(to_agent.clone()), ..Scripted::view(conversation) })
    }
}

/// Commands go on the `Commands` call stream: many at once on one stream, each answered with its own
/// result (matched by id, whatever the order they finish in), errors included.
#[tokio::test]
async fn concurrent_commands_on_the_call_stream_each_get_their_own_answer() {
    let cluster = Cluster::start().await;
    let mut chats = Vec::new();
    for i in 0..16 {
        chats.push(cluster.start_chat("g1", &format!("c{i}")).await.view.conversation);
    }
    let client = Arc::new(cluster.client);
    let mut calls = tokio::task::JoinSet::new();
    for (i, chat) in chats.iter().copied().enumerate() {
        for n in 0..4 {
            let client = client.clone();
            calls.spawn(async move {
                let send = ChatCommand::Send { client_msg_id: format!("m-{i}-{n}"), body: format!("{i}/{n}") };
                let outcome = client.command(&Caller::Customer { conversation: chat }, chat, send).await;
                (i, n, outcome)
            });
        }
    }
    // A customer of another conversation is refused, among the rest.
    let (first, second) = (chats[0], chats[1]);
    let other_customer = Caller::Customer { conversation: first };
    let intruder = within(client.command(&other_customer, second, ChatCommand::Close)).await.unwrap_err();
    let direct = cluster.node.command(&other_customer, second, ChatCommand::Close).await;
    assert_eq!(intruder, direct.unwrap_err());

    let mut answered = 0;
    while let Some(joined) = within(calls.join_next()).await {
        let (i, n, outcome) = joined.unwrap();
        let event = outcome.unwrap().event.expect("the stored message");
        assert_eq!(event.client_msg_id, Some(format!("m-{i}-{n}")));
        match &event.body {
            EventBody::Message { body, .. } => assert_eq!(body, &format!("{i}/{n}")),
            other => panic!("unexpected event {other:?}"),
        }
        answered += 1;
    }
    assert_eq!(answered, 64);
    for chat in chats {
        let customer = Caller::Customer { conversation: chat };
        let stored = cluster.node.read_events(&customer, chat, 0).await.unwrap().events;
        let sent = stored.iter().filter(|event| event.client_msg_id.as_deref().is_some_and(|id| id.starts_with("m-")));
        assert_eq!(sent.count(), 4);
    }
    cluster.running.stop().await;
}

/// The wire format of the call stream, spoken by a raw client: ids chosen by the client come back with
/// their results, and a bad call is answered INVALID_ARGUMENT while the stream carries on.
#[tokio::test]
async fn the_call_stream_answers_each_call_by_its_id() {
    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let mut raw = RouterServiceClient::connect(running.url()).await.unwrap();
    let chat = ConversationId::new_v7(NOW_MS);
    let good = pb::CommandRequest {
        caller: Some(pb::Caller { who: Some(pb::caller::Who::CustomerConversationId(chat.to_string())) }),
        conversation_id: chat.to_string(),
        command: Some(pb::command_request::Command::Close(pb::Empty {})),
    };
    let bad = pb::CommandRequest { caller: None, ..good.clone() };
    let call = |id, request| pb::CommandCall { id, context: Some(pb::CallContext::default()), request: Some(request) };
    let (calls, receiver) = mpsc::unbounded_channel();
    calls.send(call(7, good.clone())).unwrap();
    calls.send(call(3, bad)).unwrap();
    calls.send(call(11, good)).unwrap();
    let mut results =
        raw.commands(tokio_stream::wrappers::UnboundedReceiverStream::new(receiver)).await.unwrap().into_inner();
    let mut by_id = BTreeMap::new();
    for _ in 0..3 {
        let result = within(results.message()).await.unwrap().expect("a result");
        by_id.insert(result.id, result);
    }
    assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), [3, 7, 11]);
    assert_eq!(by_id[&7].reply, Some(pb::CommandReply::default()));
    assert_eq!(by_id[&7].error, None);
    let error = by_id[&3].error.clone().expect("an error");
    assert_eq!(error.code, i32::from(tonic::Code::InvalidArgument));
    assert!(error.message.contains("caller"), "{error:?}");
    assert_eq!(by_id[&3].reply, None);
    // Closing the client's side ends the stream once every call read is answered.
    drop(calls);
    assert!(within(results.message()).await.unwrap().is_none());
    running.stop().await;
}

/// The `Calls` stream on the wire, spoken by a raw client: each call is answered by its id with its
/// method's reply; a bad request is answered INVALID_ARGUMENT, and a call of a method the router does not
/// know (no request it can read) UNIMPLEMENTED, while the stream carries on.
#[tokio::test]
async fn the_calls_stream_answers_each_method_by_its_id() {
    use pb::router_call::Request as Call;
    use pb::router_call_result::Reply;
    let node = Arc::new(Scripted::default());
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let mut raw = RouterServiceClient::connect(running.url()).await.unwrap();
    let chat = ConversationId::new_v7(NOW_MS);
    let customer = pb::Caller { who: Some(pb::caller::Who::CustomerConversationId(chat.to_string())) };
    let view = pb::ChatViewRequest { caller: Some(customer), conversation_id: chat.to_string() };
    let bad = pb::ChatViewRequest { caller: None, ..view.clone() };
    let availability = pb::AgentRequest { tenant_id: tenant().to_string(), agent_id: "alice".into() };
    let call = |id, request| pb::RouterCall { id, context: Some(pb::CallContext::default()), request };
    let (calls, receiver) = mpsc::unbounded_channel();
    calls.send(call(5, Some(Call::ChatView(view)))).unwrap();
    calls.send(call(2, Some(Call::ChatView(bad)))).unwrap();
    calls.send(call(9, None)).unwrap();
    calls.send(call(4, Some(Call::AgentAvailability(availability)))).unwrap();
    let mut results =
        raw.calls(tokio_stream::wrappers::UnboundedReceiverStream::new(receiver)).await.unwrap().into_inner();
    let mut by_id = BTreeMap::new();
    for _ in 0..4 {
        let result = within(results.message()).await.unwrap().expect("a result");
        by_id.insert(result.id, result);
    }
    assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), [2, 4, 5, 9]);
    match by_id[&5].reply.clone() {
        Some(Reply::ChatView(reply)) => assert_eq!(reply.view.unwrap().conversation_id, chat.to_string()),
        other => panic!("not a chat view: {other:?}"),
    }
    match by_id[&4].reply.clone() {
        Some(Reply::Availability(reply)) => assert_eq!((reply.agent_id.as_str(), reply.held), ("alice", 2)),
        other => panic!("not an availability: {other:?}"),
    }
    let invalid = by_id[&2].error.clone().expect("an error");
    assert_eq!(invalid.code, i32::from(tonic::Code::InvalidArgument));
    assert!(invalid.message.contains("caller"), "{invalid:?}");
    assert_eq!(by_id[&2].reply, None);
    assert_eq!(by_id[&9].error.clone().expect("an error").code, i32::from(tonic::Code::Unimplemented));
    assert_eq!(node.peer_calls.lock().unwrap().as_slice(), [format!("agent_availability {} alice", tenant())]);
    // Closing the client's side ends the stream once every call read is answered.
    drop(calls);
    assert!(within(results.message()).await.unwrap().is_none());
    running.stop().await;
}

/// A server runs at most 1,024 calls of one call stream at once: it reads the next call only when one
/// finishes (HTTP/2 flow control then holds the client back), as a connection's limit of concurrent streams
/// bounds unary calls. Every call is answered once the calls held finish.
#[tokio::test]
async fn a_call_stream_runs_at_most_1024_calls_at_once() {
    const CALLS: u64 = 1_100;
    let node = Arc::new(Scripted::default());
    node.hang.store(true, Ordering::SeqCst);
    let running = Running::start(any_port().await, services(node.clone(), Duration::from_secs(5))).await;
    let mut raw = RouterServiceClient::connect(running.url()).await.unwrap();
    let chat = ConversationId::new_v7(NOW_MS);
    let customer = pb::Caller { who: Some(pb::caller::Who::CustomerConversationId(chat.to_string())) };
    let view = pb::ChatViewRequest { caller: Some(customer), conversation_id: chat.to_string() };
    let (calls, receiver) = mpsc::unbounded_channel();
    for id in 0..CALLS {
        let request = Some(pb::router_call::Request::ChatView(view.clone()));
        calls.send(pb::RouterCall { id, context: Some(pb::CallContext::default()), request }).unwrap();
    }
    let mut results =
        raw.calls(tokio_stream::wrappers::UnboundedReceiverStream::new(receiver)).await.unwrap().into_inner();
    eventually(|| async { (node.held.load(Ordering::SeqCst) >= 1024).then_some(()) }).await;
    node.release.send_replace(true);
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < CALLS as usize {
        let result = within(results.message()).await.unwrap().expect("a result");
        assert!(result.error.is_none(), "{result:?}");
        answered.insert(result.id);
    }
    assert_eq!(answered, (0..CALLS).collect());
    assert_eq!(node.most_held.load(Ordering::SeqCst), 1024, "never more than 1,024 at once");
    drop(calls);
    running.stop().await;
}

/// A router restarted on the same address: the stream the client had ends with the old server, and the
/// next command opens a new one there.
#[tokio::test]
async fn a_command_after_the_router_restarted_goes_on_a_new_stream() {
    let cluster = Cluster::start().await;
    let chat = cluster.start_chat("g1", "x").await.view.conversation;
    let customer = Caller::Customer { conversation: chat };
    let send = |id: &str| ChatCommand::Send { client_msg_id: id.into(), body: id.into() };
    cluster.client.command(&customer, chat, send("m-1")).await.unwrap();
    let addr = cluster.running.addr;
    cluster.running.stop().await;
    let error = within(cluster.client.command(&customer, chat, send("m-2"))).await.unwrap_err();
    assert!(matches!(error, RouterError::Unavailable(_)), "{error:?}");
    let running =
        Running::start(TcpListener::bind(addr).await.unwrap(), services(cluster.node.clone(), Duration::from_secs(5)))
            .await;
    let outcome = eventually(|| async { cluster.client.command(&customer, chat, send("m-2")).await.ok() }).await;
    assert_eq!(outcome.event.and_then(|event| event.client_msg_id).as_deref(), Some("m-2"));
    running.stop().await;
}

type RouterService = pb::router_service_server::RouterServiceServer<RouterGrpcServer<Router>>;

/// A real router on a memory store, served behind `watch` (which counts its calls, and may refuse its call
/// streams), and a client of it.
async fn watched_router(
    watch: fn(RouterService) -> Watched<RouterService>,
) -> (Arc<Router>, Watched<RouterService>, Running, GrpcRouterNode) {
    let clock = Arc::new(FixedClock::new(NOW_MS));
    let clock_dyn: Arc<dyn Clock> = clock.clone();
    let node = Arc::new(start_router("node-1", Arc::new(MemoryStore::new(clock_dyn)), clock.clone()).await);
    let mut services = GrpcServices::new();
    let watched = watch(RouterGrpcServer::new(node.clone()).with_draining(services.draining()).into_service());
    services.add_service(watched.clone());
    let running = Running::start(any_port().await, services).await;
    let client = GrpcRouterNode::connect_lazy(&running.url(), client_settings()).unwrap();
    (node, watched, running, client)
}

/// A router that does not know the `Commands` stream (an older version, during a rolling upgrade): the
/// client falls back to the unary `Command`, and stays with it.
#[tokio::test]
async fn a_router_without_the_call_stream_gets_unary_commands() {
    let (_node, older, running, client) = watched_router(Watched::without_call_streams).await;
    let chat = within(client.start_chat(chat_request(NOW_MS, "x"))).await.unwrap().view.conversation;
    let customer = Caller::Customer { conversation: chat };
    for n in 0..3 {
        let send = ChatCommand::Send { client_msg_id: format!("m-{n}"), body: "hi".into() };
        let outcome = within(client.command(&customer, chat, send)).await.unwrap();
        assert_eq!(outcome.event.and_then(|event| event.client_msg_id), Some(format!("m-{n}")));
    }
    // The other calls go unary as well, and stay so.
    for _ in 0..2 {
        let view = within(client.chat_view(&customer, chat)).await.unwrap();
        assert_eq!(view.conversation, chat);
    }
    let methods = older.methods();
    assert_eq!(older.refused.load(Ordering::SeqCst), 2, "each stream is asked for once: {methods:?}");
    assert_eq!((methods["Calls"], methods["Commands"]), (1, 1));
    assert_eq!((methods["StartChat"], methods["Command"], methods["ChatView"]), (1, 3, 2));
    running.stop().await;
}

/// A router replaced by an older version without the stream, after the stream had opened: the call that
/// finds out fails retryably (it was not carried out, and no copy of it was kept), and the next goes unary.
#[tokio::test]
async fn a_router_replaced_by_one_without_the_stream_fails_one_call_retryably_then_gets_unary_calls() {
    let (node, _watched, running, client) = watched_router(Watched::new).await;
    let chat = within(client.start_chat(chat_request(NOW_MS, "x"))).await.unwrap().view.conversation;
    let customer = Caller::Customer { conversation: chat };
    let addr = running.addr;
    running.stop().await;
    let mut services = GrpcServices::new();
    let older = Watched::without_call_streams(RouterGrpcServer::new(node.clone()).into_service());
    services.add_service(older.clone());
    let running = Running::start(TcpListener::bind(addr).await.unwrap(), services).await;
    // The old stream ended with the old server; the new server refuses the next opening.
    let refused = eventually(|| async {
        match within(client.chat_view(&customer, chat)).await {
            Err(error) if older.refused.load(Ordering::SeqCst) > 0 => Some(error),
            _ => None,
        }
    })
    .await;
    assert!(matches!(&refused, RouterError::Unavailable(text) if text.contains("no longer has")), "{refused:?}");
    assert_eq!(within(client.chat_view(&customer, chat)).await.unwrap().conversation, chat);
    assert_eq!(older.methods().get("ChatView"), Some(&1));
    running.stop().await;
}

/// A gateway's and a peer router's calls go on the `Calls` stream: however many calls, one HTTP/2 stream
/// (the router sees no unary call), each answered as its unary method would have.
#[tokio::test]
async fn a_chat_start_and_peer_calls_go_on_one_call_stream() {
    let (node, watched, running, client) = watched_router(Watched::new).await;
    let gateway = GatewayId("gw-1".into());
    let (sink, _pushes) = mpsc::unbounded_channel();
    client.connect_gateway(gateway.clone(), sink);
    for n in 0..3 {
        let started = within(client.start_chat(chat_request(NOW_MS + n, &format!("customer {n}")))).await.unwrap();
        let chat = started.view.conversation;
        let customer = Caller::Customer { conversation: chat };
        let events = within(client.subscribe(&gateway, &customer, chat, 0)).await.unwrap();
        assert_eq!(events, node.read_events(&customer, chat, 0).await.unwrap());
        assert_eq!(within(client.chat_view(&customer, chat)).await.unwrap(), started.view);
        let availability = within(client.agent_availability(&tenant(), &agent("a"))).await.unwrap();
        assert_eq!(availability, node.agent_availability(&tenant(), &agent("a")).await.unwrap());
        // A refusal crosses the stream as it would a unary call.
        let stranger = Caller::Customer { conversation: ConversationId::new_v7(NOW_MS) };
        let refused = within(client.chat_view(&stranger, chat)).await.unwrap_err();
        assert_eq!(refused, node.chat_view(&stranger, chat).await.unwrap_err());
    }
    let methods = watched.methods();
    assert_eq!(methods.get("Calls"), Some(&1), "{methods:?}");
    for unary in ["StartChat", "Subscribe", "ChatView", "AgentAvailability"] {
        assert!(!methods.contains_key(unary), "{unary} went unary: {methods:?}");
    }
    running.stop().await;
}
