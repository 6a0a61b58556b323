//! What a connection may send, over real WebSockets (and gRPC) and in a test process of its own (the metrics recorder
//! is the process's): requests over the connection's budget are refused `rate_limited` with how long to
//! wait, nothing of them is done, and they count as refusals by reason, as does a frame over the size
//! limit. A client address starts at most its limit of chats, whatever its connections. A gateway serves at
//! most its limit of connections: one more is closed at once, and counted.

mod common;

use common::{GrpcClient, Server, WsClient, chat_start};
use serde_json::{Value, json};
use std::sync::Arc;

use switchboard_gateway::{AddressLimits, GatewaySettings, RequestRate};
use switchboard_presence::{MemoryPresence, Outage, Presence};
use switchboard_proto::internal::v1::{ListConversationsRequest, ListTicketsRequest};
use switchboard_proto::store::StoreApi;
use switchboard_router::PresenceSettings;
use switchboard_telemetry::names;

/// Held by the tests that are refused `rate_limited`, one of which counts those refusals: the recorder is the
/// process's, and the tests of a file run at once (each counts from what was counted before it).
static RATE_LIMITED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The refusals counted with `reason` so far.
fn refusals(reason: &str) -> u64 {
    let exposition = switchboard_telemetry::render_metrics();
    let prefix = format!("{}{{reason=\"{reason}\"}} ", names::GATEWAY_REFUSALS);
    exposition.lines().find_map(|line| line.strip_prefix(prefix.as_str())).map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn requests_over_a_connections_budget_are_refused_undone_and_counted() {
    let _counting = RATE_LIMITED.lock().await;
    switchboard_telemetry::install_metrics("gateway");
    let rate_limited = refusals("rate_limited");
    let settings = GatewaySettings { request_rate: RequestRate { per_second: 2, burst: 3 }, ..Default::default() };
    let server = Server::start_with(settings).await;
    let mut ann = WsClient::connect(&server).await;
    let start = json!({ "type": "chat.start", "widget_key": common::WIDGET, "group": "sales", "name": "Ann",
                        "question": "Hello?" });
    let chat = ann.ack(start).await["conversation"].as_str().unwrap().to_owned();
    let send = |id: &str| json!({ "type": "message.send", "conversation": chat, "client_msg_id": id, "body": id });
    let first = ann.ack(send("m-1")).await["seq"].as_u64().unwrap();
    ann.ack(send("m-2")).await;

    // The burst is spent, and the clock stands still: the next request waits half a second (2 a second).
    let refused = ann.call(send("m-3")).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str(), refused["retryable"].as_bool()),
        (Some("error"), Some("rate_limited"), Some(true)),
        "{refused}"
    );
    assert_eq!(refused["retry_after_ms"], 500);
    // Any frame counts, a malformed one too (it is not looked at).
    ann.send_text("{ not json".into()).await;
    assert_eq!(ann.answer(None).await["code"], "rate_limited");
    assert_eq!(refusals("rate_limited"), rate_limited + 2);
    assert_eq!(refusals("bad_json"), 0);

    // Once the wait is over, the same message is stored, once: the refused one was not.
    server.clock.advance_ms(499);
    assert_eq!(ann.call(send("m-3")).await["retry_after_ms"], 1);
    server.clock.advance_ms(1);
    assert_eq!(ann.ack(send("m-3")).await["seq"].as_u64(), Some(first + 2));
    // The budget is the connection's: another connection has its own.
    let mut bea = WsClient::connect(&server).await;
    bea.ack(json!({ "type": "groups.list", "widget_key": common::WIDGET })).await;

    // A frame over the size limit closes the connection (1009), and counts as a refusal too.
    let limit = GatewaySettings::default().max_frame_bytes();
    bea.send_text("x".repeat(limit + 1)).await;
    assert_eq!(bea.read_or_close().await, Err(Some(switchboard_gateway::CLOSE_MESSAGE_TOO_BIG)));
    assert_eq!(refusals("frame_too_large"), 1);
    // The size is checked on the frame's header, before its payload: a frame announced larger than the
    // limit closes the connection without the server waiting for (and holding) the bytes announced.
    let mut cal = WsClient::connect(&server).await;
    cal.send_frame_header(8 * 1024 * 1024).await;
    assert_eq!(cal.read_or_close().await, Err(Some(switchboard_gateway::CLOSE_MESSAGE_TOO_BIG)));
    assert_eq!(refusals("frame_too_large"), 2);
    server.stop().await;
}

/// An answer costs one request per 64 KiB it carries: a transcript page, and the backlog a resume writes,
/// take what they cost from the connection's budget once written, below empty if need be, and the requests
/// after them wait for it.
#[tokio::test]
async fn an_answer_costs_what_it_carries_and_the_requests_after_it_wait() {
    let _refused = RATE_LIMITED.lock().await;
    const MESSAGES: usize = 50;
    const BODY: usize = 4_000;
    // Enough for the chat's start and its messages, the clock standing still.
    let burst = 1 + MESSAGES as u32 + 1;
    let settings = GatewaySettings { request_rate: RequestRate { per_second: 10, burst }, ..Default::default() };
    let server = Server::start_with(settings).await;
    let mut ann = WsClient::connect(&server).await;
    let start = json!({ "type": "chat.start", "widget_key": common::WIDGET, "group": "sales", "name": "Ann",
                        "question": "Hello?" });
    let started = ann.ack(start).await;
    let chat = started["conversation"].as_str().unwrap().to_owned();
    let token = started["customer_token"].as_str().unwrap().to_owned();
    for n in 0..MESSAGES {
        let body = format!("{n:04}").repeat(BODY / 4);
        ann.ack(json!({ "type": "message.send", "conversation": chat, "client_msg_id": format!("m-{n}"),
                        "body": body }))
            .await;
    }
    // One token left. The transcript holds the 50 messages, some 200 KB: more than three times 64 KiB, less
    // than four, so it costs four requests. The bucket goes from 1 to 3 below empty.
    let page = ann.ack(json!({ "type": "chat.transcript", "conversation": chat })).await;
    let carried: usize = page["events"].as_array().unwrap().iter().map(|event| event.to_string().len()).sum();
    let kib_64 = switchboard_gateway::REPLY_BYTES_PER_REQUEST as usize;
    assert!((3 * kib_64..4 * kib_64 - 4_096).contains(&carried), "{carried} bytes of events");
    assert_eq!(page["more"], false);
    // The next request waits for 4 tokens at 10 a second.
    let ping = json!({ "type": "ping" });
    assert_eq!(ann.call(ping.clone()).await["retry_after_ms"], 400);
    server.clock.advance_ms(399);
    assert_eq!(ann.call(ping.clone()).await["retry_after_ms"], 1);
    server.clock.advance_ms(1);
    ann.ack(ping.clone()).await;

    // A resume from the start writes the same events after its ack, and costs them too: on a connection of
    // its own, a full bucket of 52 leaves 48 requests after it.
    let mut again = WsClient::connect(&server).await;
    let resume = json!({ "type": "customer.resume", "conversation": chat, "customer_token": token, "after_seq": 0 });
    again.ack(resume).await;
    for _ in 0..burst - 4 {
        again.ack(ping.clone()).await;
    }
    assert_eq!(again.call(ping.clone()).await["retry_after_ms"], 100);
    // The backlog was written whole, in order, before the pings' answers.
    let seqs: Vec<u64> = std::iter::from_fn(|| again.take_push())
        .filter(|push| push["type"] == "event")
        .map(|push| push["event"]["seq"].as_u64().unwrap())
        .collect();
    let last_seq = seqs.last().copied().unwrap();
    assert_eq!(seqs, (1..=last_seq).collect::<Vec<_>>());
    assert!(last_seq > MESSAGES as u64);

    // Small answers cost nothing more: pings spend the bucket one by one.
    let mut bea = WsClient::connect(&server).await;
    for _ in 0..burst {
        bea.ack(ping.clone()).await;
    }
    assert_eq!(bea.call(ping).await["retry_after_ms"], 100);
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_gateways_limit_are_closed_at_once_and_counted() {
    switchboard_telemetry::install_metrics("gateway");
    let server = Server::start_with(GatewaySettings { max_connections: 2, ..Default::default() }).await;
    let mut ann = WsClient::connect(&server).await;
    let bea = GrpcClient::connect(&server).await;

    // Full: a third connection is told to try again later, over either transport, and nothing else.
    let refused = WsClient::try_connect(&server).await.err();
    assert_eq!(refused, Some(Some(switchboard_gateway::CLOSE_TRY_AGAIN_LATER)));
    let status = GrpcClient::try_open(server.channel().await).await.err().expect("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("try again later"), "{status:?}");
    assert_eq!(refusals("gateway_full"), 2);
    // The two admitted are served as ever.
    assert_eq!(ann.ack(json!({ "type": "ping" })).await["type"], "ack");

    // Once one of them is gone, a new connection is served (its slot is given back as its session ends).
    drop(bea);
    let admitted = tokio::time::timeout(common::DEADLINE, async {
        loop {
            if let Ok(client) = WsClient::try_connect(&server).await {
                return client;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
    let mut cy = admitted.await.expect("a connection served once a slot is free");
    assert_eq!(cy.ack(json!({ "type": "ping" })).await["type"], "ack");
    drop((ann, cy));
    server.stop().await;
}

fn start(name: &str) -> Value {
    json!({ "type": "chat.start", "widget_key": common::WIDGET, "group": "sales", "name": name, "question": "Hi?" })
}

/// A gateway whose client addresses may start a chat a minute, two at once, behind proxies on `trusted`.
async fn start_limited(trusted: &[&str]) -> Server {
    let trusted_proxies = trusted.iter().map(|net| net.parse().unwrap()).collect();
    let limits = AddressLimits { per_minute: 1, burst: 2, trusted_proxies, ..Default::default() };
    Server::start_with(GatewaySettings { per_address: limits, ..Default::default() }).await
}

/// Chats started from one address count together, whatever the connection and the transport: one over the
/// limit is refused `rate_limited` with how long to wait, nothing of it done, and counted; so is an offline
/// message. The peer here (loopback) is no trusted proxy: a header naming another address changes nothing.
#[tokio::test]
async fn chat_starts_over_an_addresss_limit_are_refused_whatever_the_connection() {
    let _counting = RATE_LIMITED.lock().await;
    switchboard_telemetry::install_metrics("gateway");
    let (rate_limited, address_limited) = (refusals("rate_limited"), refusals("address_rate_limited"));
    let server = start_limited(&[]).await;
    let (mut ann, mut bea) = (WsClient::connect(&server).await, WsClient::connect(&server).await);
    ann.ack(start("Ann")).await;
    bea.ack(start("Bea")).await;

    let mut cy = GrpcClient::connect(&server).await;
    let refused = cy.refused(chat_start("Cy", "Hi?")).await;
    assert_eq!(
        (refused.code.as_str(), refused.retryable, refused.retry_after_ms),
        ("rate_limited", true, Some(60_000))
    );
    assert!(refused.message.contains("address"), "{refused:?}");
    let mut dee = WsClient::connect_forwarded(&server, "203.0.113.7").await;
    let refused = dee.call(start("Dee")).await;
    assert_eq!((refused["code"].as_str(), refused["retry_after_ms"].as_u64()), (Some("rate_limited"), Some(60_000)));
    let offline = json!({ "type": "offline.message", "widget_key": common::WIDGET, "group": "sales", "name": "Dee",
                          "contact": "dee@example.com", "body": "Call me?", "reason": "group_offline",
                          "idempotency_key": "dee-1" });
    assert_eq!(dee.call(offline.clone()).await["code"], "rate_limited");
    // Counted apart from a connection's requests over its budget.
    assert_eq!(refusals("address_rate_limited"), address_limited + 3);
    assert_eq!(refusals("rate_limited"), rate_limited);
    // Nothing of them was done: the two chats and no ticket.
    let all = ListConversationsRequest { tenant_id: "acme".into(), ..Default::default() };
    let chats = server.store.list_conversations(all).await.unwrap().conversations;
    assert_eq!(chats.len(), 2, "{chats:?}");
    assert!(server.store.list_tickets(ListTicketsRequest::default()).await.unwrap().tickets.is_empty());

    // A second later, still refused, and told the rest of the wait; a minute after the first, one more.
    server.clock.advance_ms(1_000);
    assert_eq!(dee.call(start("Dee")).await["retry_after_ms"], 59_000);
    server.clock.advance_ms(59_000);
    assert_eq!(dee.ack(offline).await["duplicate"], false);
    assert_eq!(cy.refused(chat_start("Cy", "Hi?")).await.code, "rate_limited");
    drop((ann, bea, cy, dee));
    server.stop().await;
}

/// A resend answered with what its first send started (an offline message's idempotency key, a chat start's
/// `start_key`) gives back the chat start it took, to this gateway's budget or the one shared in presence:
/// a client whose answer was lost may send again without using up its address's budget. A resend is taken
/// like any start first: over the limit it is refused too.
#[tokio::test]
async fn a_resend_that_started_nothing_gives_back_its_chat_start() {
    let _counting = RATE_LIMITED.lock().await;
    for shared in [false, true] {
        let limits = AddressLimits { per_minute: 1, burst: 2, shared, ..Default::default() };
        let server = Server::start_with(GatewaySettings { per_address: limits, ..Default::default() }).await;
        let mut dee = WsClient::connect(&server).await;
        let offline = json!({ "type": "offline.message", "widget_key": common::WIDGET, "group": "sales",
                              "name": "Dee", "contact": "dee@example.com", "body": "Call me?",
                              "reason": "group_offline", "idempotency_key": "dee-1" });
        assert_eq!(dee.ack(offline.clone()).await["duplicate"], false, "shared: {shared}");
        // Two resends, the second of which would have found the budget of two empty.
        for _ in 0..2 {
            assert_eq!(dee.ack(offline.clone()).await["duplicate"], true, "shared: {shared}");
        }
        let key = "0199a0e4-7b7e-7c3e-9d2a-3f1b2c4d5e6f";
        let mut start_keyed = start("Dee");
        start_keyed["start_key"] = json!(key);
        let started = WsClient::connect(&server).await.ack(start_keyed.clone()).await;
        assert_eq!(started["duplicate"], false, "shared: {shared}");
        // The budget is spent now (the ticket, the chat): a new start is refused, and so is a resend.
        let refused = WsClient::connect(&server).await.call(start("Eve")).await;
        assert_eq!(refused["code"], "rate_limited", "shared: {shared}");
        assert_eq!(WsClient::connect(&server).await.call(start_keyed.clone()).await["code"], "rate_limited");
        // A minute later one more may start: a resend of the chat takes it and gives it back.
        server.clock.advance_ms(60_000);
        let again = WsClient::connect(&server).await.ack(start_keyed).await;
        assert_eq!((&again["duplicate"], &again["conversation"]), (&json!(true), &started["conversation"]));
        WsClient::connect(&server).await.ack(start("Eve")).await;
        assert_eq!(WsClient::connect(&server).await.call(start("Fay")).await["code"], "rate_limited");
        server.stop().await;
    }
}

/// Behind a trusted proxy (here the loopback peer), each address its `X-Forwarded-For` names has its own
/// limit, over either transport: the rightmost address not trusted, so that a client cannot choose another by
/// writing it to the left of its own.
#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_counts() {
    let _counting = RATE_LIMITED.lock().await;
    let server = start_limited(&["127.0.0.0/8", "::1"]).await;
    for name in ["Ann", "Bea"] {
        WsClient::connect_forwarded(&server, "203.0.113.7").await.ack(start(name)).await;
    }
    let mut cy = WsClient::connect_forwarded(&server, "203.0.113.7").await;
    assert_eq!(cy.call(start("Cy")).await["code"], "rate_limited");
    // A forged address to the left of the client's own changes nothing.
    let mut forger = GrpcClient::open_forwarded(&server, "198.51.100.2, 203.0.113.7").await;
    assert_eq!(forger.refused(chat_start("Forger", "Hi?")).await.code, "rate_limited");
    // Another address, and the proxy itself (no header), have their own.
    GrpcClient::open_forwarded(&server, "198.51.100.2").await.ack(chat_start("Dee", "Hi?")).await;
    WsClient::connect(&server).await.ack(start("Eve")).await;
    server.stop().await;
}

/// The split gateways count an address's chat starts together, in presence: a start at one takes from the
/// budget the others see. While presence does not answer, a gateway counts alone, from a budget of its own.
#[tokio::test]
async fn gateways_sharing_presence_count_an_addresss_chat_starts_together() {
    let _counting = RATE_LIMITED.lock().await;
    let presence = Arc::new(MemoryPresence::new());
    let flaky = Arc::new(Outage::new(presence.clone()));
    let limits = AddressLimits { per_minute: 1, burst: 2, shared: true, ..Default::default() };
    let settings = || GatewaySettings { per_address: limits.clone(), ..Default::default() };
    let start_on = |gateway_presence: Arc<dyn Presence>| {
        let settings = settings();
        let presence = presence.clone();
        async move {
            let router_presence = PresenceSettings::default();
            Server::start_full(settings, common::directory(), router_presence, presence, gateway_presence).await
        }
    };
    let (one, two) = (start_on(flaky.clone()).await, start_on(presence.clone()).await);
    WsClient::connect(&one).await.ack(start("Ann")).await;
    WsClient::connect(&two).await.ack(start("Bea")).await;
    for gateway in [&one, &two] {
        let refused = WsClient::connect(gateway).await.call(start("Cy")).await;
        assert_eq!(
            (refused["code"].as_str(), refused["retry_after_ms"].as_u64()),
            (Some("rate_limited"), Some(60_000))
        );
    }
    // Presence stops answering gateway one: it counts alone, and its own budget is full.
    flaky.set_down(true);
    for name in ["Dee", "Eve"] {
        WsClient::connect(&one).await.ack(start(name)).await;
    }
    assert_eq!(WsClient::connect(&one).await.call(start("Fay")).await["code"], "rate_limited");
    assert_eq!(WsClient::connect(&two).await.call(start("Fay")).await["code"], "rate_limited");
    one.stop().await;
    two.stop().await;
}

/// One client address has at most its limit of connections open at once, whatever the transport: one more
/// is closed at once (1013, `UNAVAILABLE`) and counted, while other addresses (behind a trusted proxy, those
/// it names) are served; a connection that ends gives its place back.
#[tokio::test]
async fn connections_over_an_addresss_limit_are_closed_at_once_and_counted() {
    let _counting = RATE_LIMITED.lock().await;
    switchboard_telemetry::install_metrics("gateway");
    let refused_before = refusals("address_full");
    let limits = AddressLimits {
        max_connections: 2,
        trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    };
    let server = Server::start_with(GatewaySettings { per_address: limits, ..Default::default() }).await;
    let mut ann = WsClient::connect_forwarded(&server, "203.0.113.7").await;
    let bea = GrpcClient::open_forwarded(&server, "203.0.113.7").await;

    let refused = WsClient::try_connect_forwarded(&server, "203.0.113.7").await.err();
    assert_eq!(refused, Some(Some(switchboard_gateway::CLOSE_TRY_AGAIN_LATER)));
    let status =
        GrpcClient::try_open_forwarded(server.channel().await, Some("203.0.113.7")).await.err().expect("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("this address"), "{status:?}");
    assert_eq!(refusals("address_full"), refused_before + 2);
    // Another address, and the proxy's own, are served; the two admitted as ever.
    let mut cy = WsClient::connect_forwarded(&server, "198.51.100.2").await;
    let mut proxy = WsClient::connect(&server).await;
    for client in [&mut ann, &mut cy, &mut proxy] {
        assert_eq!(client.ack(json!({ "type": "ping" })).await["type"], "ack");
    }

    // Once one of the address's is gone, it may open another.
    drop(bea);
    let admitted = tokio::time::timeout(common::DEADLINE, async {
        loop {
            if let Ok(client) = WsClient::try_connect_forwarded(&server, "203.0.113.7").await {
                return client;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
    let mut dee = admitted.await.expect("a connection served once the address has a place free");
    assert_eq!(dee.ack(json!({ "type": "ping" })).await["type"], "ack");
    drop((ann, cy, proxy, dee));
    server.stop().await;
}
