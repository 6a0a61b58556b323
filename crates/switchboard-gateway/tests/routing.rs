//! Presence, business hours, push routing, transfers, forwards, offline messages and the license limit, over
//! real sockets: a gateway over an in-process router on `MemoryStore` and `MemoryPresence`, clients on the
//! WebSocket and on gRPC.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::{AckResult, DEADLINE, Frame, GrpcClient, Req, Server, WIDGET, WsClient};
use serde_json::{Value, json};
use switchboard_domain::{
    AgentEntry, AgentId, AgentStatus, Author, BusinessHours, Clock, ConversationId, Directory, Event, EventBody,
    GroupEntry, GroupId, HoursSpec, Routing, TenantEntry, TenantId, WeeklySpec, conversation_key,
    customer_token_for_start, shard_of, stored_customer_token,
};
use switchboard_gateway::GatewaySettings;
use switchboard_presence::{LiveSession, MemoryPresence, Outage, Presence};
use switchboard_proto::convert::new_event;
use switchboard_proto::internal::v1::{
    AppendRequest, ConversationRecord, Fence, GetConversationRequest, GetPlacementRequest, ListTicketsRequest,
    ReadEventsRequest, SetLicenseLimitRequest,
};
use switchboard_proto::public::v1 as pb;
use switchboard_proto::router::PeerApi;
use switchboard_proto::store::StoreApi;
use switchboard_router::PresenceSettings;
use uuid::Uuid;

const ALICE: &str = "alice-token-123";
const BOB: &str = "bob-token-12345";

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn group(name: &str) -> GroupId {
    GroupId::new(name).unwrap()
}

fn agent(name: &str) -> AgentId {
    AgentId::new(name).unwrap()
}

/// Groups `sales` and `support` (pull, always open), `night` (open on Mondays 09:00-10:00 UTC only: closed at
/// the test clock's time, a Thursday at midnight; no waiting-time SLA) and `vip` (push routing; an SLA of 30 s);
/// agents `alice` (sales, support, night, vip) and `bob` (sales).
fn directory() -> Directory {
    let spec = HoursSpec {
        time_zone: "UTC".into(),
        weekly: WeeklySpec { mon: vec!["09:00-10:00".into()], ..WeeklySpec::default() },
        holidays: vec![],
    };
    let night = GroupEntry {
        hours: BusinessHours::new(&spec).unwrap(),
        wait_sla_ms: None,
        ..GroupEntry::new(group("night"), "Night")
    };
    let vip = GroupEntry {
        routing: Routing::Push { offer_timeout_ms: 600_000 },
        wait_sla_ms: Some(30_000),
        ..GroupEntry::new(group("vip"), "VIP")
    };
    let groups = [GroupEntry::new(group("sales"), "Sales"), GroupEntry::new(group("support"), "Support"), night, vip];
    let member = |id: &str, groups: &[&str]| {
        let entry = AgentEntry {
            id: agent(id),
            name: id.into(),
            groups: groups.iter().map(|name| group(name)).collect(),
            capacity: 3,
        };
        (agent(id), entry)
    };
    let entry = TenantEntry {
        id: tenant(),
        name: "Acme".into(),
        groups: groups.into_iter().map(|entry| (entry.id.clone(), entry)).collect(),
        agents: BTreeMap::from([member("alice", &["sales", "support", "night", "vip"]), member("bob", &["sales"])]),
    };
    let tokens = vec![(agent("alice"), ALICE.into()), (agent("bob"), BOB.into())];
    let mut directory = Directory::default();
    directory.add_tenant(entry, vec![WIDGET.into()], tokens).unwrap();
    directory
}

/// Group statuses are evaluated and connections checked every 20 ms.
fn router_presence() -> PresenceSettings {
    PresenceSettings {
        heartbeat: Duration::from_millis(20),
        grace: Duration::from_secs(30),
        ..PresenceSettings::default()
    }
}

fn gateway_settings() -> GatewaySettings {
    GatewaySettings {
        presence_heartbeat: Duration::from_millis(20),
        presence_ttl: Some(Duration::from_millis(60)),
        ..GatewaySettings::default()
    }
}

async fn start() -> Server {
    let presence = Arc::new(MemoryPresence::new());
    Server::start_full(gateway_settings(), directory(), router_presence(), presence.clone(), presence).await
}

/// A server whose gateway's presence can be taken down.
async fn start_flaky() -> (Server, Arc<Outage>) {
    let presence = Arc::new(MemoryPresence::new());
    let flaky = Arc::new(Outage::new(presence.clone()));
    let server = Server::start_full(gateway_settings(), directory(), router_presence(), presence, flaky.clone()).await;
    (server, flaky)
}

/// Runs `future` (a loop that polls a condition), up to the deadline.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future).await.unwrap_or_else(|_| panic!("not within {DEADLINE:?}: {what}"))
}

async fn pause() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Polls `check` until it answers something, up to the deadline.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let polled = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            pause().await;
        }
    })
    .await;
    polled.unwrap_or_else(|_| panic!("not within {DEADLINE:?}: {what}"))
}

async fn signed_in(server: &Server, token: &str) -> WsClient {
    let mut client = WsClient::connect(server).await;
    let signed = client.ack(json!({ "type": "agent.sign_in", "token": token })).await;
    assert_eq!(signed["agent"]["status"], "online");
    client.push_of("queue.snapshot").await;
    client
}

/// A customer's chat in `group_name`; answers the connection and the conversation id.
async fn customer(server: &Server, group_name: &str) -> (WsClient, String) {
    let mut client = WsClient::connect(server).await;
    let started = client
        .ack(json!({ "type": "chat.start", "widget_key": WIDGET, "group": group_name, "name": "Dana", "question": "Hi?" }))
        .await;
    let conversation = started["conversation"].as_str().unwrap().to_owned();
    client.expect_events(&conversation, &[(1, "created"), (2, "message")]).await;
    (client, conversation)
}

/// The status `groups.list` gives each group: `(id, online, open, signed_in)`.
fn statuses(ack: &Value) -> Vec<(String, bool, bool, u64)> {
    ack["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| {
            (
                group["id"].as_str().unwrap().to_owned(),
                group["online"].as_bool().unwrap(),
                group["open"].as_bool().unwrap(),
                group["signed_in"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The waiting-time SLA `groups.list` gives each group, in order.
fn slas(ack: &Value) -> Vec<Value> {
    ack["groups"].as_array().unwrap().iter().map(|group| group["wait_sla_ms"].clone()).collect()
}

fn row(id: &str, online: bool, open: bool, signed_in: u64) -> (String, bool, bool, u64) {
    (id.to_owned(), online, open, signed_in)
}

async fn live_sessions(server: &Server, name: &str) -> Vec<LiveSession> {
    server.presence.agent_sessions(&tenant(), &agent(name), server.clock.now_ms()).await.unwrap()
}

#[tokio::test]
async fn groups_list_tells_each_group_its_status_and_the_last_ones_read_while_presence_is_down() {
    let (server, presence) = start_flaky().await;
    let mut widget = WsClient::connect(&server).await;
    let list = json!({ "type": "groups.list", "widget_key": WIDGET });
    // Nobody signed in: every group is offline; `night` is also closed.
    let before = vec![
        row("night", false, false, 0),
        row("sales", false, true, 0),
        row("support", false, true, 0),
        row("vip", false, true, 0),
    ];
    let answer = widget.ack(list.clone()).await;
    assert_eq!(statuses(&answer), before);
    assert_eq!(answer["stale"], false);
    assert_eq!(answer["groups"][1]["name"], "Sales");
    // Each group's waiting-time SLA, for consoles to flag the chats waiting past it: the default, its own, none.
    let sla = vec![json!(null), json!(120_000), json!(120_000), json!(30_000)];
    assert_eq!(slas(&answer), sla);

    // Alice signs in: her groups come online, but `night`, which is closed.
    let mut alice = signed_in(&server, ALICE).await;
    let after = vec![
        row("night", false, false, 1),
        row("sales", true, true, 1),
        row("support", true, true, 1),
        row("vip", true, true, 1),
    ];
    within("alice's groups online", async {
        while statuses(&widget.ack(list.clone()).await) != after {
            pause().await;
        }
    })
    .await;
    // An agent lists its own tenant's groups without a key.
    let own = alice.ack(json!({ "type": "groups.list" })).await;
    assert_eq!((statuses(&own), slas(&own)), (after.clone(), sla));

    // Presence goes down: the last statuses read, marked stale; nothing else fails.
    presence.set_down(true);
    let stale = widget.ack(list.clone()).await;
    assert_eq!((statuses(&stale), &stale["stale"]), (after.clone(), &json!(true)));
    let mut bob = WsClient::connect(&server).await;
    let signed = bob.ack(json!({ "type": "agent.sign_in", "token": BOB })).await;
    assert_eq!(signed["agent"]["status"], "online", "a presence outage never fails a request");
    assert!(live_sessions(&server, "bob").await.is_empty());
    // It comes back: within a heartbeat bob's connection is in presence, and the statuses are fresh again.
    presence.set_down(false);
    eventually("bob's connection written again", || async {
        (live_sessions(&server, "bob").await.len() == 1).then_some(())
    })
    .await;
    assert_eq!(widget.ack(list).await["stale"], false);

    // Without a key, a connection with no role is told to sign in; a wrong key is refused.
    let answer = WsClient::connect(&server).await.call(json!({ "type": "groups.list" })).await;
    assert_eq!(answer["code"], "not_signed_in");
    let answer = widget.call(json!({ "type": "groups.list", "widget_key": "nope" })).await;
    assert_eq!(answer["code"], "unauthorized");
    server.stop().await;
}

#[tokio::test]
async fn an_agents_connections_are_in_presence_and_the_last_one_closing_does_not_sign_it_out() {
    let server = start().await;
    let first = signed_in(&server, ALICE).await;
    let second = signed_in(&server, ALICE).await;
    let sessions = live_sessions(&server, "alice").await;
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert!(sessions.iter().all(|session| session.gateway == "gateway"));
    assert_ne!(sessions[0].session, sessions[1].session);

    // The heartbeat keeps them alive as time goes by.
    server.clock.advance_ms(10_000);
    eventually("the heartbeat wrote them again", || async {
        let sessions = live_sessions(&server, "alice").await;
        (sessions.len() == 2).then_some(())
    })
    .await;
    let expires = live_sessions(&server, "alice").await[0].expires_at_ms;
    assert!(expires > server.clock.now_ms(), "{expires}");

    // Each connection that closes leaves presence at once; the agent stays online (its owner decides, after a
    // grace period, not the gateway).
    drop(first);
    eventually("one connection left", || async { (live_sessions(&server, "alice").await.len() == 1).then_some(()) })
        .await;
    drop(second);
    eventually("no connection left", || async { live_sessions(&server, "alice").await.is_empty().then_some(()) }).await;
    let availability = server.router.agent_availability(&tenant(), &agent("alice")).await.unwrap();
    assert_eq!(availability.status, AgentStatus::Online);
    server.stop().await;
}

#[tokio::test]
async fn signing_out_sets_the_agent_offline_at_once_and_frees_the_connection() {
    let server = start().await;
    let mut first = signed_in(&server, ALICE).await;
    let mut second = signed_in(&server, ALICE).await;
    let signed_out = first.ack(json!({ "type": "agent.sign_out" })).await;
    assert_eq!(signed_out["agent"]["status"], "offline");
    // Her other connection is told; this one is out of presence and has no role any more.
    let status = within("the other tab told", async {
        loop {
            let status = second.status_push().await;
            if status["agent"]["status"] == "offline" {
                return status;
            }
        }
    })
    .await;
    assert_eq!(status["agent"]["agent"], "alice");
    eventually("one connection left", || async { (live_sessions(&server, "alice").await.len() == 1).then_some(()) })
        .await;
    assert_eq!(first.call(json!({ "type": "queue.list" })).await["code"], "not_signed_in");
    assert_eq!(first.call(json!({ "type": "agent.sign_out" })).await["code"], "not_signed_in");
    // It may sign in again.
    let again = first.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;
    assert_eq!(again["agent"]["status"], "online");
    server.stop().await;
}

#[tokio::test]
async fn a_chat_refused_outside_business_hours_leaves_an_offline_message_once() {
    let server = start().await;
    let _alice = signed_in(&server, ALICE).await;
    let mut widget = WsClient::connect(&server).await;
    let start =
        json!({ "type": "chat.start", "widget_key": WIDGET, "group": "night", "name": "Dana", "question": "Hi?" });
    let refused = widget.call(start).await;
    assert_eq!((refused["code"].as_str(), refused["retryable"].as_bool()), (Some("group_closed"), Some(false)));
    assert!(refused.get("max_sessions").is_none());

    let message = json!({
        "type": "offline.message", "widget_key": WIDGET, "group": "night", "name": " Dana ",
        "contact": "dana@example.com", "body": "Please call me back.", "reason": "group_closed",
        "idempotency_key": "dana-1",
    });
    let first = widget.ack(message.clone()).await;
    assert_eq!(first["duplicate"], false);
    assert!(first["ticket"]["id"].as_str().is_some_and(|id| !id.is_empty()), "{first}");
    assert_eq!(first["ticket"]["created_at_ms"], server.clock.now_ms());
    let again = widget.ack(message.clone()).await;
    assert_eq!((&again["ticket"], &again["duplicate"]), (&first["ticket"], &json!(true)));
    // Sent again after a reconnection that met another refusal: the same message.
    let mut other_reason = message.clone();
    other_reason["reason"] = json!("group_offline");
    assert_eq!(widget.ack(other_reason).await["duplicate"], json!(true));
    // Another customer who chose the same key: refused, not acked as Dana's message (which would drop theirs).
    let mut erin = message.clone();
    (erin["name"], erin["contact"], erin["body"]) = (json!("Erin"), json!("erin@example.com"), json!("Call me?"));
    let reused = WsClient::connect(&server).await.call(erin).await;
    assert_eq!((reused["code"].as_str(), reused["retryable"].as_bool()), (Some("idempotency_key_reused"), Some(false)));
    let tickets = server.store.list_tickets(ListTicketsRequest::default()).await.unwrap().tickets;
    assert_eq!(tickets.iter().map(|ticket| ticket.customer_name.as_str()).collect::<Vec<_>>(), ["Dana"]);
    // It took no role: the same connection may still start a chat elsewhere.
    let started = widget
        .ack(json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Dana", "question": "Hi?" }))
        .await;
    assert_eq!(started["chat"]["state"], "queued");

    let with = |field: &str, value: Value| {
        let mut message = message.clone();
        message[field] = value;
        message
    };
    let cases = [
        (with("contact", json!("  ")), "bad_request"),
        (with("contact", json!("x".repeat(255))), "bad_request"),
        (with("name", json!("")), "bad_request"),
        (with("reason", json!("bored")), "bad_request"),
        (with("idempotency_key", json!("")), "bad_request"),
        (with("idempotency_key", json!("k".repeat(129))), "bad_request"),
        (with("body", json!(" ")), "empty_message"),
        (with("body", json!("b".repeat(4097))), "message_too_large"),
        (with("group", json!("nope")), "unknown_group"),
        (with("widget_key", json!("nope")), "unauthorized"),
    ];
    for (request, code) in cases {
        assert_eq!(widget.call(request.clone()).await["code"], code, "{request}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_license_limit_refuses_a_chat_with_its_number_on_both_transports() {
    let server = start().await;
    let _alice = signed_in(&server, ALICE).await;
    server.store.set_license_limit(SetLicenseLimitRequest { max_sessions: 1 }).await.unwrap();
    let (_dana, _) = customer(&server, "sales").await;

    let mut erin = WsClient::connect(&server).await;
    let refused = erin
        .call(
            json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Erin", "question": "Hi?" }),
        )
        .await;
    assert_eq!((refused["code"].as_str(), refused["max_sessions"].as_u64()), (Some("license_exhausted"), Some(1)));
    let mut frank = GrpcClient::connect(&server).await;
    let refused = frank.refused(common::chat_start("Frank", "Hi?")).await;
    assert_eq!(refused.code, "license_exhausted");
    assert_eq!(refused.max_sessions, Some(1));
    assert_eq!(refused.grpc_status, tonic::Code::ResourceExhausted as i32);
    assert!(!refused.retryable);
    // Another error keeps its own status.
    let unknown = frank.refused(Req::ChatList(pb::ChatListRequest { list: 1 })).await;
    assert_eq!((unknown.code.as_str(), unknown.grpc_status), ("not_signed_in", tonic::Code::FailedPrecondition as i32));
    server.stop().await;
}

/// A `chat_start` over gRPC in `sales` with a `start_key`.
fn keyed_start(name: &str, question: &str, key: &str) -> Req {
    Req::ChatStart(pb::ChatStartRequest {
        widget_key: WIDGET.into(),
        group: "sales".into(),
        name: name.into(),
        question: question.into(),
        start_key: key.into(),
    })
}

#[tokio::test]
async fn a_chat_start_sent_again_with_its_start_key_gets_the_chat_it_started_on_either_transport() {
    let server = start().await;
    let mut alice = signed_in(&server, ALICE).await;
    server.store.set_license_limit(SetLicenseLimitRequest { max_sessions: 1 }).await.unwrap();
    let key = "6f3c2a1e-9b8d-4c7e-a5f4-3e2d1c0b9a88";
    let start = |question: &str| json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Dana", "question": question, "start_key": key });

    let mut first = WsClient::connect(&server).await;
    let started = first.ack(start("Hi?")).await;
    assert_eq!((&started["duplicate"], &started["chat"]["state"]), (&json!(false), &json!("queued")));
    let conversation = started["conversation"].as_str().unwrap().to_owned();
    first.expect_events(&conversation, &[(1, "created"), (2, "message")]).await;

    // Its answer lost, the widget sends the same start again on a new stream, here over gRPC: the same chat,
    // with its token and its events from the first, and no second permit (the limit is 1).
    let mut again = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(restarted) = again.ack(keyed_start("Dana", "Hi?", key)).await else {
        panic!("not a chat_start result")
    };
    assert_eq!(restarted.conversation, conversation);
    assert_eq!(restarted.customer_token, started["customer_token"].as_str().unwrap());
    assert!(restarted.duplicate && restarted.subscribed);
    again.expect_events(&conversation, &[(1, "created"), (2, "message")]).await;
    let mut other = WsClient::connect(&server).await;
    let refused = other
        .call(
            json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Erin", "question": "Hi?" }),
        )
        .await;
    assert_eq!(refused["code"], "license_exhausted", "one chat holds the one permit");

    // The same key for another chat is refused, and stores nothing.
    let reused = other.call(start("Something else?")).await;
    assert_eq!((reused["code"].as_str(), reused["retryable"].as_bool()), (Some("start_key_reused"), Some(false)));
    let mut grpc = GrpcClient::connect(&server).await;
    assert_eq!(grpc.refused(keyed_start("Dana", "Hi?", "dana-1")).await.code, "bad_request");
    let mut bad = start("Hi?");
    bad["start_key"] = json!("dana-1");
    assert_eq!(other.call(bad).await["code"], "bad_request");
    // A message whose client id is the one the store knows the start by is a message like any other.
    let send =
        json!({ "type": "message.send", "conversation": conversation, "client_msg_id": "chat.start", "body": "x" });
    let sent = first.ack(send).await;
    assert_eq!((&sent["seq"], &sent["duplicate"]), (&json!(3), &json!(false)));

    // Accepted and closed, the chat is still what its start answers, without a permit: a new chat gets it.
    alice.ack(json!({ "type": "chat.accept", "conversation": conversation })).await;
    first.ack(json!({ "type": "chat.close", "conversation": conversation })).await;
    let late = WsClient::connect(&server).await.ack(start("Hi?")).await;
    assert_eq!((&late["conversation"], &late["duplicate"]), (&json!(conversation), &json!(true)));
    assert_eq!(late["chat"]["state"], "closed");
    let events = server
        .store
        .read_events(ReadEventsRequest { conversation_id: conversation.clone(), ..Default::default() })
        .await
        .unwrap()
        .events;
    assert_eq!(events.iter().filter(|event| event.kind == "created").count(), 1, "{events:?}");
    WsClient::connect(&server)
        .await
        .ack(json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Erin", "question": "Hi?" }))
        .await;
    server.stop().await;
}

/// What a start leaves when the store's answer is lost after its commit: the chat stored (as the router
/// stores it: its `created` event deduplicated as "chat.start", `stored_token` kept of its token), and no
/// queue told.
async fn store_unannounced_start(server: &Server, key: &str, stored_token: String) -> ConversationId {
    let id = ConversationId::for_start(&tenant(), Uuid::parse_str(key).unwrap());
    let shard = shard_of(&conversation_key(&id));
    let placement = server.store.get_placement(GetPlacementRequest::default()).await.unwrap();
    let epoch = placement.owners.iter().find(|owner| owner.shard == shard.0).unwrap().epoch;
    let now_ms = server.clock.now_ms();
    let created = EventBody::Created { group: group("sales"), customer_name: "Dana".into(), question: "Hi?".into() };
    let mut created =
        new_event(&Event { seq: 0, at_ms: now_ms, author: Author::System, client_msg_id: None, body: created });
    created.client_msg_id = "chat.start".into();
    let question = EventBody::Message { body: "Hi?".into() };
    let question =
        new_event(&Event { seq: 0, at_ms: now_ms, author: Author::Customer, client_msg_id: None, body: question });
    let record = ConversationRecord {
        id: id.to_string(),
        tenant_id: "acme".into(),
        group_id: "sales".into(),
        customer_name: "Dana".into(),
        first_question: "Hi?".into(),
        state: "queued".into(),
        created_at_ms: now_ms,
        queued_at_ms: now_ms,
        shard: shard.0,
        customer_token: stored_token,
        ..Default::default()
    };
    let append = AppendRequest {
        fence: Some(Fence { shard: shard.0, epoch }),
        conversation_id: id.to_string(),
        create: Some(record),
        events: vec![created, question],
        update: None,
    };
    assert!(!server.store.append(append).await.unwrap().duplicate);
    id
}

#[tokio::test]
async fn a_start_stored_before_its_queue_heard_of_it_is_queued_when_sent_again() {
    let server = start().await;
    let mut alice = signed_in(&server, ALICE).await;
    let key = "3c9d2b1a-8e7f-4a6b-9c5d-4e3f2a1b0c9d";
    let token = customer_token_for_start(&tenant(), Uuid::parse_str(key).unwrap());
    let id = store_unannounced_start(&server, key, stored_customer_token(&token)).await;

    let start = json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Dana", "question": "Hi?", "start_key": key });
    let mut widget = WsClient::connect(&server).await;
    let again = widget.ack(start).await;
    assert_eq!((&again["conversation"], &again["duplicate"]), (&json!(id.to_string()), &json!(true)));
    assert_eq!(again["customer_token"], token);
    let added = alice.push_of("queue.added").await;
    assert_eq!(added["entry"]["conversation"], id.to_string());
    alice.ack(json!({ "type": "chat.accept", "conversation": id.to_string() })).await;
    server.stop().await;
}

#[tokio::test]
async fn a_chats_token_is_stored_hashed_and_one_stored_before_hashing_still_works() {
    let server = start().await;
    let key = "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d";
    let start = json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Dana", "question": "Hi?", "start_key": key });
    let started = WsClient::connect(&server).await.ack(start).await;
    let token = started["customer_token"].as_str().unwrap().to_owned();
    let id = started["conversation"].as_str().unwrap().to_owned();
    let stored = server.store.get_conversation(GetConversationRequest { conversation_id: id.clone() }).await.unwrap();
    let stored = stored.conversation.unwrap().customer_token;
    assert_eq!(stored, stored_customer_token(&token), "the store keeps its hash only");
    assert!(!stored.contains(&token));
    let resume = json!({ "type": "customer.resume", "conversation": id, "customer_token": token });
    WsClient::connect(&server).await.ack(resume).await;

    // A chat whose token was stored as it is, before tokens were hashed: resumed with it, and a start sent
    // again is answered with it.
    let key = "6b5c4d3e-2f1a-4b0c-9d8e-7f6a5b4c3d2e";
    let id = store_unannounced_start(&server, key, "an-old-plain-token".into()).await;
    let start = json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Dana", "question": "Hi?", "start_key": key });
    let again = WsClient::connect(&server).await.ack(start).await;
    assert_eq!((&again["duplicate"], &again["customer_token"]), (&json!(true), &json!("an-old-plain-token")));
    let resume =
        json!({ "type": "customer.resume", "conversation": id.to_string(), "customer_token": "an-old-plain-token" });
    WsClient::connect(&server).await.ack(resume).await;
    let wrong = json!({ "type": "customer.resume", "conversation": id.to_string(), "customer_token": "another" });
    let refused = WsClient::connect(&server).await.call(wrong).await;
    assert_eq!(refused["type"], "error", "{refused}");
    server.stop().await;
}

#[tokio::test]
async fn a_start_sent_again_after_its_group_closed_gets_the_chat_started_while_it_was_open() {
    let server = start().await;
    // `night` is open on Mondays 09:00-10:00 UTC; the clock starts on a Thursday at midnight.
    server.clock.advance_ms((4 * 24 + 9) * 3_600_000 + 30 * 60_000);
    let start = json!({
        "type": "chat.start", "widget_key": WIDGET, "group": "night", "name": "Dana", "question": "Hi?",
        "start_key": "0d6b1f52-3c4e-4a7d-8e9f-1a2b3c4d5e6f",
    });
    let started = WsClient::connect(&server).await.ack(start.clone()).await;
    assert_eq!(started["duplicate"], false);
    server.clock.advance_ms(3_600_000);
    let mut late = WsClient::connect(&server).await;
    let again = late.ack(start.clone()).await;
    assert_eq!((&again["conversation"], &again["duplicate"]), (&started["conversation"], &json!(true)));
    // A new chat in the closed group is refused as before; the key in another group is another chat.
    let mut other = start.clone();
    other["start_key"] = json!("9e8d7c6b-5a4f-4e3d-9c2b-1a0f9e8d7c6b");
    assert_eq!(WsClient::connect(&server).await.call(other).await["code"], "group_closed");
    let mut moved = start;
    moved["group"] = json!("sales");
    assert_eq!(WsClient::connect(&server).await.call(moved).await["code"], "start_key_reused");
    server.stop().await;
}

#[tokio::test]
async fn a_waiting_customer_follows_a_transfer_to_the_other_group() {
    let server = start().await;
    let mut alice = signed_in(&server, ALICE).await;
    let mut bob = signed_in(&server, BOB).await;
    let (mut dana, chat) = customer(&server, "sales").await;
    let position = dana.push_of("queue.position").await;
    assert_eq!(position["position"], 1);
    assert!(position.get("estimated_wait_s").is_none(), "no estimate yet: {position}");
    // Bob's list shows it (a chat that comes and goes before a list is written is never shown).
    assert_eq!(bob.push_of("queue.added").await["entry"]["conversation"], chat.as_str());

    // Support is online once alice counts there.
    let transfer = json!({ "type": "chat.transfer", "conversation": chat, "group": "support" });
    let moved = within("support online", async {
        loop {
            let answer = alice.call(transfer.clone()).await;
            if answer["code"] != "group_offline" {
                return answer;
            }
            pause().await;
        }
    })
    .await;
    assert_eq!(moved["type"], "ack", "{moved}");
    assert_eq!((moved["chat"]["group"].as_str(), moved["chat"]["state"].as_str()), (Some("support"), Some("queued")));

    // Dana sees the event, and her place in the new queue.
    let event = dana.push_of("event").await;
    assert_eq!(
        (event["event"]["kind"].as_str(), event["event"]["to_group"].as_str()),
        (Some("transferred"), Some("support"))
    );
    let position = dana.push_of("queue.position").await;
    assert_eq!((position["conversation"].as_str(), position["position"].as_u64()), (Some(chat.as_str()), Some(1)));
    // Bob (sales only) sees it leave his queue, and why.
    let removed = bob.push_of("queue.removed").await;
    assert_eq!(
        (removed["reason"].as_str(), removed["group"].as_str(), &removed["agent"]),
        (Some("transferred"), Some("support"), &Value::Null)
    );
    // The same group again, an unknown one, a customer: refused.
    let again = alice.call(json!({ "type": "chat.transfer", "conversation": chat, "group": "support" })).await;
    assert_eq!(again["code"], "same_group");
    let unknown = alice.call(json!({ "type": "chat.transfer", "conversation": chat, "group": "nope" })).await;
    assert_eq!(unknown["code"], "unknown_group");
    let forbidden = dana.call(json!({ "type": "chat.transfer", "conversation": chat, "group": "sales" })).await;
    assert_eq!(forbidden["code"], "forbidden");
    server.stop().await;
}

#[tokio::test]
async fn a_forwarded_chat_is_assigned_to_its_new_agent() {
    let server = start().await;
    let mut alice = signed_in(&server, ALICE).await;
    let mut bob = signed_in(&server, BOB).await;
    let (_dana, chat) = customer(&server, "sales").await;
    let accepted = bob.ack(json!({ "type": "chat.accept", "conversation": chat })).await;
    assert_eq!(accepted["chat"]["owner"], "bob");

    let forwarded = bob.ack(json!({ "type": "chat.forward", "conversation": chat, "agent": "alice" })).await;
    assert_eq!(
        (forwarded["chat"]["owner"].as_str(), forwarded["chat"]["state"].as_str()),
        (Some("alice"), Some("active"))
    );
    let assigned = alice.push_of("chat.assigned").await;
    assert_eq!(assigned["chat"], forwarded["chat"]);
    // Bob follows the chat: he sees it go.
    let event = within("the forward event", async {
        loop {
            let event = bob.push_of("event").await;
            if event["event"]["kind"] != "accepted" && event["event"]["seq"].as_u64() > Some(3) {
                return event;
            }
        }
    })
    .await;
    assert_eq!(
        (event["event"]["kind"].as_str(), event["event"]["to_agent"].as_str(), event["event"]["from_agent"].as_str()),
        (Some("forwarded"), Some("alice"), Some("bob"))
    );
    // Alice follows it with chat.subscribe and writes in it.
    alice.ack(json!({ "type": "chat.subscribe", "conversation": chat, "after_seq": 0 })).await;
    let sent = alice
        .ack(json!({ "type": "message.send", "conversation": chat, "client_msg_id": "a-1", "body": "Hello" }))
        .await;
    assert_eq!(sent["status"], "sent");
    let unknown = alice.call(json!({ "type": "chat.forward", "conversation": chat, "agent": "nobody" })).await;
    assert_eq!(unknown["code"], "unknown_agent");
    let same = alice.call(json!({ "type": "chat.forward", "conversation": chat, "agent": "alice" })).await;
    assert_eq!(same["code"], "same_agent");
    server.stop().await;
}

#[tokio::test]
async fn push_routing_offers_a_chat_to_an_agent_who_may_reject_it() {
    let server = start().await;
    // Alice on gRPC, the only agent of `vip`; bob on the WebSocket.
    let mut alice = GrpcClient::connect(&server).await;
    alice.ack(common::sign_in(ALICE)).await;
    let mut bob = signed_in(&server, BOB).await;
    let (_dana, chat) = customer(&server, "vip").await;

    let offer = loop {
        if let Frame::Offer(offer) = alice.push().await {
            break offer;
        }
    };
    let entry = offer.entry.unwrap();
    assert_eq!((entry.conversation.as_str(), entry.group.as_str()), (chat.as_str(), "vip"));
    assert!(offer.expires_at_ms > server.clock.now_ms());

    // Bob was offered nothing: he cannot reject it.
    let refused = bob.call(json!({ "type": "offer.reject", "conversation": chat })).await;
    assert_eq!(refused["code"], "not_offered");
    let rejected = alice.ack(Req::OfferReject(pb::OfferRejectRequest { conversation: chat.clone() })).await;
    assert_eq!(rejected, AckResult::OfferReject(pb::OfferRejectResult {}));
    let ended = loop {
        if let Frame::OfferEnded(ended) = alice.push().await {
            break ended;
        }
    };
    assert_eq!((ended.conversation.as_str(), ended.reason()), (chat.as_str(), pb::OfferEndReason::Rejected));
    // It is no longer hers to reject.
    let again = alice.refused(Req::OfferReject(pb::OfferRejectRequest { conversation: chat.clone() })).await;
    assert_eq!(again.code, "not_offered");
    server.stop().await;
}

/// A waiting list shows the first 500 characters of each question, whatever the longest message allowed:
/// a queue's list goes whole in one message to every gateway and every agent's console. The chat itself
/// keeps the whole question.
#[tokio::test]
async fn the_waiting_list_shows_the_start_of_a_long_question_and_the_chat_all_of_it() {
    let server = start().await;
    let mut alice = signed_in(&server, ALICE).await;
    let question = format!("{} and so on", "ö".repeat(1_500));
    let start =
        json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": "Dana", "question": question });
    let started = WsClient::connect(&server).await.ack(start).await;
    assert_eq!(started["chat"]["first_question"], question.as_str());

    let added = alice.push_of("queue.added").await;
    assert_eq!(added["entry"]["question"], "ö".repeat(500), "the preview");
    let listed = alice.ack(json!({ "type": "queue.list" })).await;
    assert_eq!(listed["entries"][0]["question"], "ö".repeat(500));
    let accepted = alice.ack(json!({ "type": "chat.accept", "conversation": started["conversation"] })).await;
    assert_eq!(accepted["chat"]["first_question"], question.as_str(), "the whole question");
    server.stop().await;
}
