//! The public gRPC API (`switchboard.v1.ChatService`) over real sockets, on the same port as the WebSocket
//! endpoint, against a gateway on an in-process router: the seed scenario with customers on gRPC and agents on
//! both transports, bad input answered with the WebSocket's error codes, resume by seq, the slow client,
//! draining, reflection.

mod common;

use std::collections::BTreeSet;
use std::sync::{Mutex, Once};
use std::time::Duration;

use common::*;
use prost::Message as _;
use prost::bytes::BufMut;
use serde_json::{Value, json};
use switchboard_gateway::GatewaySettings;
use switchboard_proto::public::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

const UNKNOWN_CHAT: &str = "0190f5a2-7c1e-7d3b-9a4e-2b8c6d0e1f23";

/// Records the threads that panicked. A `#[tokio::test]` runs on one thread, with every task it spawns (the
/// server's sessions included), so a test checks that its own thread never panicked.
fn watch_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or_default().to_owned();
            PANICKED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(thread);
            previous(info);
        }));
    });
}

static PANICKED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn assert_no_panic() {
    let thread = std::thread::current().name().unwrap_or_default().to_owned();
    let panicked = PANICKED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(&thread);
    assert!(!panicked, "something panicked on this test's runtime");
}

#[tokio::test]
async fn the_seed_scenario_over_grpc_with_agents_on_both_transports() {
    let server = Server::start().await;

    // Agents: alice on a WebSocket, bob on gRPC. Each gets its (empty) waiting list.
    let mut alice = WsClient::connect(&server).await;
    let signed = alice.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;
    assert_eq!(signed["agent"]["status"], "online");
    assert_eq!(alice.push_of("queue.snapshot").await["entries"], json!([]));
    let mut bob = GrpcClient::connect(&server).await;
    assert_eq!((bob.welcome.protocol, bob.welcome.max_message_bytes), (1, 4096));
    let AckResult::AgentSignIn(signed) = bob.ack(sign_in(BOB)).await else { panic!("an agent_sign_in ack") };
    let agent = signed.agent.unwrap();
    assert_eq!((agent.tenant.as_str(), agent.agent.as_str()), ("acme", "bob"));
    assert_eq!(
        (agent.status(), agent.capacity, agent.groups.clone()),
        (pb::AgentStatus::Online, 3, vec!["sales".into()])
    );
    let Frame::QueueSnapshot(snapshot) = bob.push().await else { panic!("a queue snapshot after sign-in") };
    assert!(snapshot.entries.is_empty());

    // A customer starts a chat over gRPC: ack, then events 1 and 2, then its place in the queue.
    let mut dana = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = dana.ack(chat_start("Dana", "Do you ship to Canada?")).await else {
        panic!("a chat_start ack")
    };
    assert!(started.subscribed);
    assert!(!started.customer_token.is_empty());
    let chat = started.chat.unwrap();
    assert_eq!((chat.state(), chat.last_seq, chat.owner.clone()), (pb::ChatState::Queued, 2, None));
    assert_eq!((chat.customer_name.as_str(), chat.first_question.as_str()), ("Dana", "Do you ship to Canada?"));
    let c1 = started.conversation;
    assert_eq!(chat.conversation, c1);
    dana.expect_events(&c1, &[(1, "created"), (2, "message")]).await;
    let Frame::QueuePosition(position) = dana.push().await else { panic!("a queue position") };
    assert_eq!((position.conversation.as_str(), position.position), (c1.as_str(), 1));

    // Both agents see it waiting.
    assert_eq!(alice.push_of("queue.added").await["entry"]["conversation"], c1);
    let Frame::QueueAdded(added) = bob.push().await else { panic!("queue_added") };
    let entry = added.entry.unwrap();
    assert_eq!((entry.conversation.as_str(), entry.customer_name.as_str()), (c1.as_str(), "Dana"));
    let AckResult::QueueList(list) = bob.ack(Req::QueueList(pb::QueueListRequest {})).await else { panic!() };
    assert_eq!(list.entries, vec![entry]);

    // Bob accepts over gRPC: the ack, then the events he had not been sent, up to `accepted`.
    let AckResult::ChatAccept(accepted) = bob.ack(accept(&c1)).await else { panic!("a chat_accept ack") };
    let chat = accepted.chat.unwrap();
    assert_eq!((chat.state(), chat.owner.as_deref(), chat.last_seq), (pb::ChatState::Active, Some("bob"), 3));
    bob.expect_events(&c1, &[(1, "created"), (2, "message"), (3, "accepted")]).await;
    let Frame::QueueRemoved(removed) = bob.push().await else { panic!("queue_removed") };
    assert_eq!(removed.reason(), pb::QueueRemovedReason::Accepted);
    assert_eq!((removed.conversation.as_str(), removed.agent.as_deref()), (c1.as_str(), Some("bob")));
    let removed = alice.push_of("queue.removed").await;
    assert_eq!((removed["reason"].as_str(), removed["agent"].as_str()), (Some("accepted"), Some("bob")));
    dana.expect_events(&c1, &[(3, "accepted")]).await;

    // Customer → agent, with the agent's delivery mark seen by both.
    assert_eq!(sent_seq(dana.ack(send_message(&c1, "dana-1", "Hello?")).await), 4);
    let push = dana.event().await.event.unwrap();
    assert_eq!((push.seq, push.client_msg_id.as_deref()), (4, Some("dana-1")));
    let push = bob.event().await.event.unwrap();
    assert_eq!(push.author.unwrap().role(), pb::AuthorRole::Customer);
    assert_eq!(push.body, Some(pb::event::Body::Message(pb::event::Message { body: "Hello?".into() })));
    let AckResult::MessageDelivered(mark) = bob.ack(delivered(&c1, 4)).await else { panic!() };
    assert_eq!(mark.seq, Some(5));
    for client in [&mut bob, &mut dana] {
        let event = client.event().await.event.unwrap();
        assert_eq!(event.body, Some(pb::event::Body::Delivered(pb::event::Delivered { up_to_seq: 4 })));
        let author = event.author.unwrap();
        assert_eq!((author.role(), author.id.as_str()), (pb::AuthorRole::Agent, "bob"));
    }

    // Typing reaches the other side only.
    let typing = Req::Typing(pb::TypingRequest { conversation: c1.clone(), typing: true });
    assert_eq!(bob.ack(typing).await, AckResult::Typing(pb::TypingResult {}));
    let Frame::Typing(typing) = dana.push().await else { panic!("a typing push") };
    assert!(typing.typing);
    assert_eq!(typing.author.unwrap().id, "bob");

    // Agent → customer, confirmed by the customer.
    assert_eq!(sent_seq(bob.ack(send_message(&c1, "bob-1", "Yes, we do.")).await), 6);
    bob.expect_events(&c1, &[(6, "message")]).await;
    dana.expect_events(&c1, &[(6, "message")]).await;
    let AckResult::MessageDelivered(mark) = dana.ack(delivered(&c1, 6)).await else { panic!() };
    assert_eq!(mark.seq, Some(7));
    bob.expect_events(&c1, &[(7, "delivered")]).await;
    dana.expect_events(&c1, &[(7, "delivered")]).await;
    // A mark that is not higher stores nothing.
    let AckResult::MessageDelivered(mark) = dana.ack(delivered(&c1, 6)).await else { panic!() };
    assert_eq!(mark.seq, None);

    // A resend is acked with the first copy's seq and pushes nothing.
    let AckResult::MessageSend(resent) = dana.ack(send_message(&c1, "dana-1", "Hello?")).await else { panic!() };
    assert_eq!((resent.seq, resent.duplicate), (Some(4), true));

    // Bob closes; both sides see it; the chat is then closed to messages and in bob's closed list.
    let AckResult::ChatClose(closed) = bob.ack(Req::ChatClose(pb::ChatCloseRequest { conversation: c1.clone() })).await
    else {
        panic!()
    };
    assert_eq!(closed.seq, Some(8));
    bob.expect_events(&c1, &[(8, "closed")]).await;
    dana.expect_events(&c1, &[(8, "closed")]).await;
    assert_eq!(dana.refused(send_message(&c1, "dana-2", "Still there?")).await.code, "chat_closed");
    let list = Req::ChatList(pb::ChatListRequest { list: pb::ChatList::Closed.into() });
    let AckResult::ChatList(list) = bob.ack(list).await else { panic!() };
    assert_eq!(list.chats.iter().map(|chat| chat.conversation.as_str()).collect::<Vec<_>>(), [c1.as_str()]);
    let transcript = Req::ChatTranscript(pb::ChatTranscriptRequest { conversation: c1.clone(), after_seq: 0 });
    let AckResult::ChatTranscript(transcript) = dana.ack(transcript).await else { panic!() };
    let kinds: Vec<_> = transcript.events.iter().map(|event| (event.seq, kind_of(event))).collect();
    assert_eq!(
        kinds,
        [
            (1, "created"),
            (2, "message"),
            (3, "accepted"),
            (4, "message"),
            (5, "delivered"),
            (6, "message"),
            (7, "delivered"),
            (8, "closed")
        ]
    );
    assert_eq!(transcript.chat.unwrap().state(), pb::ChatState::Closed);

    // A second chat, accepted by alice on her WebSocket: gRPC and WebSocket talk to each other.
    let mut eve = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = eve.ack(chat_start("Eve", "Is it open on Sunday?")).await else { panic!() };
    let c2 = started.conversation;
    eve.expect_events(&c2, &[(1, "created"), (2, "message")]).await;
    assert_eq!(alice.push_of("queue.added").await["entry"]["conversation"], c2);
    let accepted = alice.ack(json!({ "type": "chat.accept", "conversation": c2 })).await;
    assert_eq!(
        (accepted["chat"]["state"].as_str(), accepted["chat"]["owner"].as_str()),
        (Some("active"), Some("alice"))
    );
    alice.expect_events(&c2, &[(1, "created"), (2, "message"), (3, "accepted")]).await;
    let Frame::QueueRemoved(removed) = bob.push_until_queue_removed().await else { unreachable!() };
    assert_eq!((removed.conversation.as_str(), removed.agent.as_deref()), (c2.as_str(), Some("alice")));
    eve.expect_events(&c2, &[(3, "accepted")]).await;
    let sent =
        alice.ack(json!({ "type": "message.send", "conversation": c2, "client_msg_id": "a-1", "body": "Yes." })).await;
    assert_eq!(sent["seq"], 4);
    let push = eve.event().await.event.unwrap();
    assert_eq!((push.seq, push.author.unwrap().id.as_str()), (4, "alice"));
    let AckResult::MessageDelivered(mark) = eve.ack(delivered(&c2, 4)).await else { panic!() };
    assert_eq!(mark.seq, Some(5));
    alice.expect_events(&c2, &[(4, "message"), (5, "delivered")]).await;
    assert_eq!(sent_seq(eve.ack(send_message(&c2, "e-1", "Thanks!")).await), 6);
    let pushed = alice.push_of("event").await;
    assert_eq!(
        (pushed["event"]["body"].as_str(), pushed["event"]["client_msg_id"].as_str()),
        (Some("Thanks!"), Some("e-1"))
    );
    alice.ack(json!({ "type": "message.delivered", "conversation": c2, "up_to_seq": 6 })).await;
    eve.expect_events(&c2, &[(5, "delivered"), (6, "message"), (7, "delivered")]).await;
    // The customer leaves an active chat: closed.
    let AckResult::ChatClose(closed) = eve.ack(Req::ChatClose(pb::ChatCloseRequest { conversation: c2.clone() })).await
    else {
        panic!()
    };
    assert_eq!(closed.seq, Some(8));
    alice.expect_events(&c2, &[(7, "delivered"), (8, "closed")]).await;
    eve.expect_events(&c2, &[(8, "closed")]).await;

    // Closing the request stream ends the session with OK, after the answers to what was sent before.
    bob.close_requests();
    loop {
        match bob.read().await {
            Ok(Some(Frame::Ack(_) | Frame::Error(_))) => panic!("no answer without a request"),
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(status) => panic!("the stream ended with {status:?}"),
        }
    }
    server.stop().await;
}

impl GrpcClient {
    async fn push_until_queue_removed(&mut self) -> Frame {
        loop {
            let push = self.push().await;
            if matches!(push, Frame::QueueRemoved(_)) {
                return push;
            }
        }
    }
}

/// A bad request of a customer, over gRPC and over WebSocket, each naming its own chat; and the code.
type CustomerCase = (&'static str, Box<dyn Fn(&str) -> Req>, Box<dyn Fn(&str) -> Value>, &'static str);

/// Sends the same bad request over both transports; both must refuse it with `code`.
async fn refused_alike(
    grpc: &mut GrpcClient,
    ws: &mut WsClient,
    what: &str,
    frame: pb::ClientFrame,
    json: Value,
    code: &str,
) {
    let id = if frame.id.is_empty() || frame.id.chars().count() > 128 { String::new() } else { frame.id.clone() };
    grpc.send(frame).await;
    let Frame::Error(error) = grpc.answer(&id).await else { panic!("{what}: acked over gRPC") };
    assert_eq!(error.code, code, "{what} over gRPC: {error:?}");
    assert!(!error.message.trim().is_empty() && !error.retryable, "{what}: {error:?}");
    let ws_id = json["id"].as_str().filter(|id| !id.is_empty() && id.chars().count() <= 128).map(str::to_owned);
    ws.send_text(json.to_string()).await;
    let answer = ws.answer(ws_id.as_deref()).await;
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("error"), Some(code)),
        "{what} over WebSocket"
    );
}

#[tokio::test]
async fn bad_input_over_grpc_gets_the_websocket_error_codes_and_the_stream_stays_usable() {
    watch_panics();
    let server = Server::start().await;
    let (mut g, mut w) = (GrpcClient::connect(&server).await, WsClient::connect(&server).await);
    let big = "x".repeat(5000);
    let chat_start_with = |name: &str, group: &str, question: &str, widget: &str| {
        Req::ChatStart(pb::ChatStartRequest {
            widget_key: widget.into(),
            group: group.into(),
            name: name.into(),
            question: question.into(),
            ..Default::default()
        })
    };
    let ws_start = |name: &str, group: &str, question: &str, widget: &str| json!({ "id": "x", "type": "chat.start", "widget_key": widget, "group": group, "name": name, "question": question });

    // Frames that are not a request.
    refused_alike(
        &mut g,
        &mut w,
        "no id",
        frame("", Req::Ping(pb::PingRequest {})),
        json!({ "type": "ping" }),
        "missing_id",
    )
    .await;
    let long_id = "i".repeat(129);
    refused_alike(
        &mut g,
        &mut w,
        "an id too long",
        frame(&long_id, Req::Ping(pb::PingRequest {})),
        json!({ "id": long_id, "type": "ping" }),
        "missing_id",
    )
    .await;
    refused_alike(
        &mut g,
        &mut w,
        "no request",
        pb::ClientFrame { id: "n1".into(), request: None },
        json!({ "id": "n1", "type": "teleport" }),
        "unknown_type",
    )
    .await;

    // Before a role.
    let cases: Vec<(&str, Req, Value, &str)> = vec![
        ("queue list", Req::QueueList(pb::QueueListRequest {}), json!({ "type": "queue.list" }), "not_signed_in"),
        (
            "accept",
            accept(UNKNOWN_CHAT),
            json!({ "type": "chat.accept", "conversation": UNKNOWN_CHAT }),
            "not_signed_in",
        ),
        ("not a uuid", accept("nope"), json!({ "type": "chat.accept", "conversation": "nope" }), "bad_request"),
        (
            "set status",
            Req::AgentSetStatus(pb::AgentSetStatusRequest { status: pb::AgentStatus::Online.into() }),
            json!({ "type": "agent.set_status", "status": "online" }),
            "not_signed_in",
        ),
        (
            "wrong token",
            sign_in("wrong-token"),
            json!({ "type": "agent.sign_in", "token": "wrong-token" }),
            "unauthorized",
        ),
        (
            "wrong customer token",
            Req::CustomerResume(pb::CustomerResumeRequest {
                conversation: UNKNOWN_CHAT.into(),
                customer_token: "nope".into(),
                after_seq: 0,
            }),
            json!({ "type": "customer.resume", "conversation": UNKNOWN_CHAT, "customer_token": "nope" }),
            "unauthorized",
        ),
        (
            "wrong widget key",
            chat_start_with("Dana", "sales", "Hi", "wrong-key"),
            ws_start("Dana", "sales", "Hi", "wrong-key"),
            "unauthorized",
        ),
        (
            "unknown group",
            chat_start_with("Dana", "support", "Hi", WIDGET),
            ws_start("Dana", "support", "Hi", WIDGET),
            "unknown_group",
        ),
        (
            "a group that is no slug",
            chat_start_with("Dana", "a b", "Hi", WIDGET),
            ws_start("Dana", "a b", "Hi", WIDGET),
            "unknown_group",
        ),
        ("no name", chat_start_with("  ", "sales", "Hi", WIDGET), ws_start("  ", "sales", "Hi", WIDGET), "bad_request"),
        (
            "an empty question",
            chat_start_with("Dana", "sales", " \n ", WIDGET),
            ws_start("Dana", "sales", " \n ", WIDGET),
            "empty_message",
        ),
        (
            "a question too long",
            chat_start_with("Dana", "sales", &big, WIDGET),
            ws_start("Dana", "sales", &big, WIDGET),
            "message_too_large",
        ),
        // U+0000 cannot be stored in PostgreSQL's text: refused whichever database holds the chat.
        (
            "a NUL in a name",
            chat_start_with("Da\0na", "sales", "Hi", WIDGET),
            ws_start("Da\0na", "sales", "Hi", WIDGET),
            "bad_request",
        ),
        (
            "a NUL in a question",
            chat_start_with("Dana", "sales", "H\0i", WIDGET),
            ws_start("Dana", "sales", "H\0i", WIDGET),
            "bad_request",
        ),
    ];
    for (n, (what, request, mut json, code)) in cases.into_iter().enumerate() {
        let id = format!("a{n}");
        json["id"] = json!(id);
        refused_alike(&mut g, &mut w, what, frame(&id, request), json, code).await;
    }

    // As customers: each transport's own chat.
    let AckResult::ChatStart(started) = g.ack(chat_start("Dana", "Hi")).await else { panic!() };
    let own_g = started.conversation;
    let own_w = w.ack(ws_start("Wes", "sales", "Hi", WIDGET)).await["conversation"].as_str().unwrap().to_owned();
    let cases: Vec<CustomerCase> = vec![
        (
            "agents only",
            Box::new(|_| Req::QueueList(pb::QueueListRequest {})),
            Box::new(|_| json!({ "type": "queue.list" })),
            "forbidden",
        ),
        (
            "a second role",
            Box::new(|_| sign_in(ALICE)),
            Box::new(|_| json!({ "type": "agent.sign_in", "token": ALICE })),
            "already_signed_in",
        ),
        (
            "another chat",
            Box::new(|_| send_message(UNKNOWN_CHAT, "m1", "hi")),
            Box::new(
                |_| json!({ "type": "message.send", "conversation": UNKNOWN_CHAT, "client_msg_id": "m1", "body": "hi" }),
            ),
            "not_found",
        ),
        (
            "a message too long",
            Box::new(move |own| send_message(own, "m1", &"y".repeat(4097))),
            Box::new(
                move |own| json!({ "type": "message.send", "conversation": own, "client_msg_id": "m1", "body": "y".repeat(4097) }),
            ),
            "message_too_large",
        ),
        (
            "a NUL in a message",
            Box::new(|own| send_message(own, "m1", "h\0i")),
            Box::new(
                |own| json!({ "type": "message.send", "conversation": own, "client_msg_id": "m1", "body": "h\0i" }),
            ),
            "bad_request",
        ),
        (
            "a NUL in a client_msg_id",
            Box::new(|own| send_message(own, "m\0", "hi")),
            Box::new(
                |own| json!({ "type": "message.send", "conversation": own, "client_msg_id": "m\0", "body": "hi" }),
            ),
            "bad_request",
        ),
        (
            "an empty message",
            Box::new(|own| send_message(own, "m1", "   ")),
            Box::new(
                |own| json!({ "type": "message.send", "conversation": own, "client_msg_id": "m1", "body": "   " }),
            ),
            "empty_message",
        ),
        (
            "no client_msg_id",
            Box::new(|own| send_message(own, "", "hi")),
            Box::new(|own| json!({ "type": "message.send", "conversation": own, "client_msg_id": "", "body": "hi" })),
            "bad_request",
        ),
        (
            "a mark beyond the log",
            Box::new(|own| delivered(own, 999)),
            Box::new(|own| json!({ "type": "message.delivered", "conversation": own, "up_to_seq": 999 })),
            "bad_delivery_mark",
        ),
        (
            "customers leave with close",
            Box::new(|own| Req::ChatCancel(pb::ChatCancelRequest { conversation: own.into() })),
            Box::new(|own| json!({ "type": "chat.cancel", "conversation": own })),
            "not_participant",
        ),
    ];
    for (n, (what, grpc, ws, code)) in cases.iter().enumerate() {
        let id = format!("c{n}");
        let mut json = ws(&own_w);
        json["id"] = json!(id);
        refused_alike(&mut g, &mut w, what, frame(&id, grpc(&own_g)), json, code).await;
    }

    // As agents.
    let (mut g, mut w) = (GrpcClient::connect(&server).await, WsClient::connect(&server).await);
    g.ack(sign_in(BOB)).await;
    w.ack(json!({ "type": "agent.sign_in", "token": BOB })).await;
    let status = |status: pb::AgentStatus| Req::AgentSetStatus(pb::AgentSetStatusRequest { status: status.into() });
    let cases: Vec<(&str, Req, Value, &str)> = vec![
        (
            "no status",
            status(pb::AgentStatus::Unspecified),
            json!({ "type": "agent.set_status", "status": "busy" }),
            "bad_request",
        ),
        (
            "offline is not chosen",
            status(pb::AgentStatus::Offline),
            json!({ "type": "agent.set_status", "status": "offline" }),
            "bad_request",
        ),
        (
            "a status from the future",
            Req::AgentSetStatus(pb::AgentSetStatusRequest { status: 42 }),
            json!({ "type": "agent.set_status", "status": "lunch" }),
            "bad_request",
        ),
        (
            "no list",
            Req::ChatList(pb::ChatListRequest { list: 0 }),
            json!({ "type": "chat.list", "list": "all" }),
            "bad_request",
        ),
        (
            "an unknown chat",
            accept(UNKNOWN_CHAT),
            json!({ "type": "chat.accept", "conversation": UNKNOWN_CHAT }),
            "not_found",
        ),
        (
            "writing before accepting",
            send_message(&own_g, "m1", "hi"),
            json!({ "type": "message.send", "conversation": own_w, "client_msg_id": "m1", "body": "hi" }),
            "not_accepted",
        ),
    ];
    for (n, (what, request, mut json, code)) in cases.into_iter().enumerate() {
        let id = format!("g{n}");
        json["id"] = json!(id);
        refused_alike(&mut g, &mut w, what, frame(&id, request), json, code).await;
    }

    // The streams are still usable, and nothing panicked.
    assert_eq!(g.ack(Req::Ping(pb::PingRequest {})).await, AckResult::Ping(pb::PingResult {}));
    assert_eq!(w.ack(json!({ "type": "ping" })).await["type"], "ack");
    assert_no_panic();
    server.stop().await;
}

/// Raw bytes for the request stream, for what the typed client cannot send; server frames decoded as usual.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct FrameDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = pb::ServerFrame;
    type Encoder = RawEncoder;
    type Decoder = FrameDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> FrameDecoder {
        FrameDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for FrameDecoder {
    type Item = pb::ServerFrame;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::ServerFrame>, tonic::Status> {
        pb::ServerFrame::decode(src).map(Some).map_err(|error| tonic::Status::internal(error.to_string()))
    }
}

struct RawSession {
    sender: mpsc::Sender<Vec<u8>>,
    frames: tonic::Streaming<pb::ServerFrame>,
}

impl RawSession {
    async fn open(server: &Server) -> RawSession {
        let mut grpc = tonic::client::Grpc::new(server.channel().await);
        grpc.ready().await.unwrap();
        let (sender, requests) = mpsc::channel(16);
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/switchboard.v1.ChatService/Session");
        let response = grpc.streaming(tonic::Request::new(ReceiverStream::new(requests)), path, RawCodec).await;
        let mut session = RawSession { sender, frames: response.unwrap().into_inner() };
        assert!(matches!(session.read().await, Ok(Some(Frame::Welcome(_)))));
        session
    }

    async fn read(&mut self) -> Result<Option<Frame>, tonic::Status> {
        let next = tokio::time::timeout(DEADLINE, self.frames.message()).await.expect("a frame before the deadline");
        next.map(|frame| frame.and_then(|frame| frame.frame))
    }

    async fn send(&mut self, bytes: Vec<u8>) {
        self.sender.send(bytes).await.unwrap();
    }
}

#[tokio::test]
async fn frames_protobuf_cannot_express_or_decode() {
    watch_panics();
    let server = Server::start().await;

    // A request type of a later version (an unknown field) is an unknown type; the stream goes on.
    let mut raw = RawSession::open(&server).await;
    let mut bytes = pb::ClientFrame { id: "future-1".into(), request: None }.encode_to_vec();
    prost::encoding::encode_key(99, prost::encoding::WireType::LengthDelimited, &mut bytes);
    prost::encoding::encode_varint(2, &mut bytes);
    bytes.put_slice(&[0x08, 0x01]);
    raw.send(bytes).await;
    let Ok(Some(Frame::Error(error))) = raw.read().await else { panic!("an error frame") };
    assert_eq!((error.id.as_str(), error.code.as_str()), ("future-1", "unknown_type"));
    raw.send(frame("p", Req::Ping(pb::PingRequest {})).encode_to_vec()).await;
    assert!(matches!(raw.read().await, Ok(Some(Frame::Ack(ack))) if ack.id == "p"));

    // Bytes that are no ClientFrame end the stream: INVALID_ARGUMENT.
    raw.send(vec![0x0a, 0x05, 0x61]).await;
    let status = raw.read().await.expect_err("the stream ends with a status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A frame over the frame limit ends the stream: RESOURCE_EXHAUSTED (the WebSocket closes with 1009).
    let mut client = GrpcClient::connect(&server).await;
    client.ack(chat_start("Dana", "Hi")).await;
    client.send(frame("huge", send_message(UNKNOWN_CHAT, "m", &"z".repeat(70_000)))).await;
    let status = loop {
        match client.read().await {
            Ok(Some(Frame::Ack(_) | Frame::Error(_))) => panic!("no answer to a frame over the limit"),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("frame too large"), "{status:?}");
    let mut ws = WsClient::connect(&server).await;
    ws.send_text(json!({ "id": "huge", "type": "ping", "pad": "z".repeat(70_000) }).to_string()).await;
    assert_eq!(ws.read_or_close().await.unwrap_err(), Some(switchboard_gateway::CLOSE_MESSAGE_TOO_BIG));

    // The server serves on.
    let mut client = GrpcClient::connect(&server).await;
    client.ack(Req::Ping(pb::PingRequest {})).await;
    assert_no_panic();
    server.stop().await;
}

#[tokio::test]
async fn resuming_from_a_seq_over_grpc_fills_the_gap_and_goes_on_live() {
    let server = Server::start().await;
    let mut bob = GrpcClient::connect(&server).await;
    bob.ack(sign_in(BOB)).await;
    let mut dana = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = dana.ack(chat_start("Dana", "Hi")).await else { panic!() };
    let (chat, token) = (started.conversation, started.customer_token);
    bob.ack(accept(&chat)).await;
    bob.expect_events(&chat, &[(1, "created"), (2, "message"), (3, "accepted")]).await;
    assert_eq!(sent_seq(dana.ack(send_message(&chat, "d1", "one")).await), 4);
    dana.expect_events(&chat, &[(1, "created"), (2, "message"), (3, "accepted"), (4, "message")]).await;

    // The customer's connection goes; the agent writes twice meanwhile.
    drop(dana);
    assert_eq!(sent_seq(bob.ack(send_message(&chat, "b1", "two")).await), 5);
    assert_eq!(sent_seq(bob.ack(send_message(&chat, "b2", "three")).await), 6);

    // A wrong token is refused and leaves the stream free to resume properly.
    let resume = |token: &str, after_seq: u64| {
        Req::CustomerResume(pb::CustomerResumeRequest {
            conversation: chat.clone(),
            customer_token: token.into(),
            after_seq,
        })
    };
    let mut dana = GrpcClient::connect(&server).await;
    assert_eq!(dana.refused(resume("not-the-token", 4)).await.code, "unauthorized");
    // Resuming after seq 4: the ack, then exactly 5 and 6, then live events.
    let AckResult::CustomerResume(resumed) = dana.ack(resume(&token, 4)).await else { panic!() };
    let resumed = resumed.chat.unwrap();
    assert_eq!((resumed.last_seq, resumed.state()), (6, pb::ChatState::Active));
    let Frame::Event(first) = dana.push().await else { panic!("the first event right after the ack") };
    assert_eq!(first.event.unwrap().seq, 5);
    dana.expect_events(&chat, &[(6, "message")]).await;
    assert_eq!(sent_seq(bob.ack(send_message(&chat, "b3", "four")).await), 7);
    dana.expect_events(&chat, &[(7, "message")]).await;
    dana.expect_quiet().await;

    // The agent resumes on a new stream with chat_subscribe from seq 5.
    let mut bob = GrpcClient::connect(&server).await;
    bob.ack(sign_in(BOB)).await;
    let subscribe = Req::ChatSubscribe(pb::ChatSubscribeRequest { conversation: chat.clone(), after_seq: 5 });
    let AckResult::ChatSubscribe(subscribed) = bob.ack(subscribe).await else { panic!() };
    assert_eq!(subscribed.chat.unwrap().last_seq, 7);
    bob.expect_events(&chat, &[(6, "message"), (7, "message")]).await;

    // A resume that misses nothing gets the ack alone; the next push is the next event.
    let mut again = GrpcClient::connect(&server).await;
    again.ack(resume(&token, 7)).await;
    again.expect_quiet().await;
    assert_eq!(sent_seq(bob.ack(send_message(&chat, "b4", "five")).await), 8);
    let Frame::Event(next) = again.push().await else { panic!("the next event") };
    assert_eq!(next.event.unwrap().seq, 8);

    // More than the log holds cannot have been received: refused, and the stream can resume properly.
    let mut beyond = GrpcClient::connect(&server).await;
    for after_seq in [9, u64::MAX] {
        assert_eq!(beyond.refused(resume(&token, after_seq)).await.code, "bad_after_seq");
    }
    beyond.ack(resume(&token, 8)).await;
    let too_far = Req::ChatSubscribe(pb::ChatSubscribeRequest { conversation: chat.clone(), after_seq: 9 });
    assert_eq!(bob.refused(too_far).await.code, "bad_after_seq");
    assert_eq!(sent_seq(bob.ack(send_message(&chat, "b5", "six")).await), 9);
    let Frame::Event(next) = beyond.push().await else { panic!("the next event") };
    assert_eq!(next.event.unwrap().seq, 9);
    // The refused subscription left the agent's own, made before it, in place.
    bob.expect_events(&chat, &[(8, "message"), (9, "message")]).await;
    server.stop().await;
}

/// A stream follows at most `max_followed_chats` chats with `chat_subscribe`; `chat_unsubscribe` makes room.
/// The agent's own chats are followed whatever the count: those it accepts (the accept has taken the chat by
/// then), and those it subscribes to again.
#[tokio::test]
async fn a_stream_follows_a_bounded_number_of_chats_and_unsubscribes_to_follow_others() {
    let settings = GatewaySettings { max_followed_chats: 2, ..GatewaySettings::default() };
    let server = Server::start_with(settings).await;
    let mut chats = Vec::new();
    for name in ["Ann", "Ben", "Cy", "Di"] {
        let mut customer = GrpcClient::connect(&server).await;
        let AckResult::ChatStart(started) = customer.ack(chat_start(name, "Hi")).await else { panic!() };
        chats.push(started.conversation);
    }
    let subscribe =
        |chat: &str| Req::ChatSubscribe(pb::ChatSubscribeRequest { conversation: chat.into(), after_seq: 0 });
    let unsubscribe = |chat: &str| Req::ChatUnsubscribe(pb::ChatUnsubscribeRequest { conversation: chat.into() });
    let mut bob = GrpcClient::connect(&server).await;
    bob.ack(sign_in(BOB)).await;
    for chat in &chats[..2] {
        bob.ack(subscribe(chat)).await;
        bob.expect_events(chat, &[(1, "created"), (2, "message")]).await;
    }

    let refused = bob.refused(subscribe(&chats[2])).await;
    assert_eq!((refused.code.as_str(), refused.grpc_status), ("follow_limit_reached", Code::ResourceExhausted as i32));
    // A chat the stream follows already may be subscribed to again.
    bob.ack(Req::ChatSubscribe(pb::ChatSubscribeRequest { conversation: chats[0].clone(), after_seq: 2 })).await;
    let followed = |result| match result {
        AckResult::ChatUnsubscribe(result) => result.followed,
        other => panic!("{other:?}"),
    };
    assert!(followed(bob.ack(unsubscribe(&chats[1])).await));
    assert!(!followed(bob.ack(unsubscribe(&chats[1])).await), "followed no more");
    assert!(!followed(bob.ack(unsubscribe(UNKNOWN_CHAT)).await), "never followed");
    assert_eq!(bob.refused(unsubscribe("not-a-chat")).await.code, "bad_request");
    bob.ack(subscribe(&chats[2])).await;
    bob.expect_events(&chats[2], &[(1, "created"), (2, "message")]).await;

    // At the limit, an accept still follows the chat it takes; a subscription past the limit does not.
    bob.ack(accept(&chats[3])).await;
    bob.expect_events(&chats[3], &[(1, "created"), (2, "message"), (3, "accepted")]).await;
    assert_eq!(bob.refused(subscribe(&chats[1])).await.code, "follow_limit_reached");
    // His own chats he may follow again at the limit (a console that reconnects follows its chats first).
    assert!(followed(bob.ack(unsubscribe(&chats[3])).await));
    bob.ack(Req::ChatSubscribe(pb::ChatSubscribeRequest { conversation: chats[3].clone(), after_seq: 3 })).await;
    assert_eq!(bob.refused(subscribe(&chats[1])).await.code, "follow_limit_reached");

    // A customer's stream follows its own chat for as long as it is its customer.
    let mut eve = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = eve.ack(chat_start("Eve", "Hi")).await else { panic!() };
    assert_eq!(eve.refused(unsubscribe(&started.conversation)).await.code, "forbidden");
    server.stop().await;
}

/// A log longer than a page (here 2 KiB, some five messages) is read a page at a time: a transcript is
/// answered in pages, each saying whether more follow; a resume or a subscription from its start gets every
/// event, one frame each, from pages read one after the other, then the live ones.
#[tokio::test]
async fn a_log_longer_than_a_page_is_answered_a_page_at_a_time() {
    const MESSAGES: u64 = 20;
    let server = Server::start_paged(2048).await;
    let mut bob = GrpcClient::connect(&server).await;
    bob.ack(sign_in(BOB)).await;
    let mut dana = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = dana.ack(chat_start("Dana", "Hi")).await else { panic!() };
    let (chat, token) = (started.conversation, started.customer_token);
    bob.ack(accept(&chat)).await;
    let body = |n: u64| format!("{n:03} {}", "x".repeat(300));
    for n in 1..=MESSAGES {
        assert_eq!(sent_seq(dana.ack(send_message(&chat, &format!("d{n}"), &body(n))).await), 3 + n);
    }
    let last_seq = 3 + MESSAGES;
    let expected: Vec<u64> = (1..=last_seq).collect();
    let is_body = |event: &pb::Event, n: u64| match &event.body {
        Some(pb::event::Body::Message(message)) => message.body == body(n),
        _ => false,
    };

    // The transcript, page after page.
    let (mut events, mut pages, mut after_seq) = (Vec::new(), Vec::new(), 0);
    loop {
        let request = Req::ChatTranscript(pb::ChatTranscriptRequest { conversation: chat.clone(), after_seq });
        let AckResult::ChatTranscript(page) = bob.ack(request).await else { panic!() };
        assert!(!page.events.is_empty(), "a page of a log that goes on holds events");
        after_seq = page.events.last().unwrap().seq;
        pages.push((page.events.len(), page.more));
        events.extend(page.events);
        if !page.more {
            break;
        }
    }
    assert_eq!(events.iter().map(|event| event.seq).collect::<Vec<_>>(), expected);
    assert!(is_body(&events[3], 1) && is_body(&events[22], MESSAGES), "the messages as sent");
    assert!(pages.len() >= 4, "pages of 2 KiB: {pages:?}");
    assert!(pages[..pages.len() - 1].iter().all(|(_, more)| *more), "{pages:?}");
    // The same on a WebSocket.
    let mut w = WsClient::connect(&server).await;
    w.ack(json!({ "type": "agent.sign_in", "token": BOB })).await;
    let page = w.ack(json!({ "type": "chat.transcript", "conversation": chat, "after_seq": 3 })).await;
    assert_eq!((page["events"][0]["seq"].clone(), page["more"].clone()), (json!(4), json!(true)));
    let page = w.ack(json!({ "type": "chat.transcript", "conversation": chat, "after_seq": last_seq - 1 })).await;
    assert_eq!((page["events"].as_array().unwrap().len(), page["more"].clone()), (1, json!(false)));

    // A resume from the start: every event, in order, then the live ones.
    let mut again = GrpcClient::connect(&server).await;
    let resume = pb::CustomerResumeRequest { conversation: chat.clone(), customer_token: token, after_seq: 0 };
    again.ack(Req::CustomerResume(resume)).await;
    let mut resumed = Vec::new();
    for _ in 1..=last_seq {
        let push = again.event().await;
        assert_eq!(push.conversation, chat);
        resumed.push(push.event.unwrap());
    }
    assert_eq!(resumed, events, "the events of the transcript, as pushes");
    assert_eq!(sent_seq(bob.ack(send_message(&chat, "b1", "live")).await), last_seq + 1);
    assert_eq!(again.event().await.event.unwrap().seq, last_seq + 1);
    again.expect_quiet().await;

    // An agent's console subscribing from seq 2 on a new stream.
    let mut console = GrpcClient::connect(&server).await;
    console.ack(sign_in(BOB)).await;
    let subscribe = Req::ChatSubscribe(pb::ChatSubscribeRequest { conversation: chat.clone(), after_seq: 2 });
    console.ack(subscribe).await;
    let mut subscribed = Vec::new();
    for _ in 3..=last_seq + 1 {
        subscribed.push(console.event().await.event.unwrap().seq);
    }
    assert_eq!(subscribed, (3..=last_seq + 1).collect::<Vec<_>>());
    console.expect_quiet().await;
    server.stop().await;
}

/// Bob signed in on a channel that takes little before HTTP/2 flow control holds the server back.
async fn slow_bob(server: &Server) -> GrpcClient {
    let endpoint = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024));
    let mut slow = GrpcClient::open(endpoint.connect().await.unwrap()).await;
    slow.ack(sign_in(BOB)).await;
    slow
}

/// Reads a slow client's stream to its end: the events in order from seq 1, then `RESOURCE_EXHAUSTED`
/// before the chat's last seq `last`. Answers the last seq read.
async fn read_until_too_slow(slow: &mut GrpcClient, last: u64) -> u64 {
    let mut seen = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), slow.read()).await.expect("the stream ends") {
            Ok(Some(Frame::Event(push))) => {
                let seq = push.event.unwrap().seq;
                assert_eq!(seq, seen + 1, "in order, without gap");
                seen = seq;
            }
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too slow to read"), "{status:?}");
    assert!(seen < last, "the client was disconnected before it got everything ({seen} of {last})");
    seen
}

#[tokio::test]
async fn a_grpc_client_too_slow_to_read_ends_with_resource_exhausted_and_resumes() {
    // The client sends as fast as it can: no request budget here.
    let settings = GatewaySettings {
        outbound_queue_len: 8,
        request_rate: switchboard_gateway::RequestRate::UNLIMITED,
        ..GatewaySettings::default()
    };
    let server = Server::start_with(settings).await;
    let mut slow = slow_bob(&server).await;
    let mut dana = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = dana.ack(chat_start("Dana", "Hi")).await else { panic!() };
    let chat = started.conversation;
    slow.ack(accept(&chat)).await;

    // The agent stops reading while the customer writes a lot.
    let body = "w".repeat(4000);
    let mut last = 0;
    for n in 0..400 {
        last = sent_seq(dana.ack(send_message(&chat, &format!("m{n}"), &body)).await);
        // The customer's own copies are not needed.
        dana.forget_pushes();
    }
    assert_eq!(last, 403);

    // Reading again: events in order from seq 1, then the stream's end.
    let seen = read_until_too_slow(&mut slow, last).await;

    // It resumes from its last seq and gets the rest.
    let mut bob = GrpcClient::connect(&server).await;
    bob.ack(sign_in(BOB)).await;
    bob.ack(Req::ChatSubscribe(pb::ChatSubscribeRequest { conversation: chat.clone(), after_seq: seen })).await;
    for seq in seen + 1..=last {
        let push = bob.event().await;
        assert_eq!(push.event.unwrap().seq, seq);
    }
    server.stop().await;
}

/// A client that stops reading in the middle of a long backlog, with no push behind it to fill its queue
/// (the chat is quiet), is disconnected once a write has waited for it `write_stall_timeout`: it would
/// otherwise hold its session, and the page being written, for as long as it stays connected.
#[tokio::test]
async fn a_client_that_stops_reading_a_backlog_with_no_push_behind_it_is_disconnected_after_the_stall_timeout() {
    let settings = GatewaySettings {
        write_stall_timeout: Duration::from_secs(1),
        request_rate: switchboard_gateway::RequestRate::UNLIMITED,
        ..GatewaySettings::default()
    };
    let server = Server::start_with(settings).await;
    let mut dana = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = dana.ack(chat_start("Dana", "Hi")).await else { panic!() };
    let chat = started.conversation;
    {
        let mut bob = GrpcClient::connect(&server).await;
        bob.ack(sign_in(BOB)).await;
        bob.ack(accept(&chat)).await;
    }
    server.until_bob_has(0).await;
    // Over a megabyte of messages, more than HTTP/2 and the kernel hold for a client that does not read.
    let body = "w".repeat(4000);
    let mut last = 0;
    for n in 0..300 {
        last = sent_seq(dana.ack(send_message(&chat, &format!("m{n}"), &body)).await);
        dana.forget_pushes();
    }

    let mut slow = slow_bob(&server).await;
    slow.ack(Req::ChatSubscribe(pb::ChatSubscribeRequest { conversation: chat.clone(), after_seq: 0 })).await;
    // It reads nothing more: the gateway gives up on it (it leaves presence).
    server.until_bob_has(0).await;

    // Reading again: events in order from seq 1, then the stream's end, as any slow client's.
    read_until_too_slow(&mut slow, last).await;
    server.stop().await;
}

/// The same session code disconnects a slow WebSocket, with its close code.
#[tokio::test]
async fn a_websocket_too_slow_to_read_is_closed_with_4008() {
    // The client sends as fast as it can: no request budget here.
    let settings = GatewaySettings {
        outbound_queue_len: 8,
        request_rate: switchboard_gateway::RequestRate::UNLIMITED,
        ..GatewaySettings::default()
    };
    let server = Server::start_with(settings).await;
    let mut slow = WsClient::connect_small_buffer(&server).await;
    slow.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;
    let mut dana = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = dana.ack(chat_start("Dana", "Hi")).await else { panic!() };
    let chat = started.conversation;
    slow.ack(json!({ "type": "chat.accept", "conversation": chat })).await;

    // More than the kernel buffers between the server and a client that does not read (4 MiB at most).
    let body = "w".repeat(4000);
    let started_at = tokio::time::Instant::now();
    let mut last = 0;
    for n in 0..1600 {
        last = sent_seq(dana.ack(send_message(&chat, &format!("m{n}"), &body)).await);
        dana.forget_pushes();
    }
    // The client must read again before the server gives up waiting for it to take the close (10 s).
    assert!(started_at.elapsed() < Duration::from_secs(8), "too slow to test: {:?}", started_at.elapsed());

    let mut seen = 0;
    let close = loop {
        match slow.read_or_close().await {
            Ok(frame) if frame["type"] == "event" => {
                let seq = frame["event"]["seq"].as_u64().unwrap();
                assert_eq!(seq, seen + 1, "in order, without gap");
                seen = seq;
            }
            Ok(_) => continue,
            Err(close) => break close,
        }
    };
    assert_eq!(close, Some(switchboard_gateway::CLOSE_SLOW_CONSUMER));
    assert!(seen < last, "the client was disconnected before it got everything ({seen})");
    server.stop().await;
}

#[tokio::test]
async fn draining_closes_grpc_streams_with_unavailable_and_websockets_with_1001() {
    let server = Server::start().await;
    let mut grpc = GrpcClient::connect(&server).await;
    grpc.ack(sign_in(BOB)).await;
    let mut ws = WsClient::connect(&server).await;
    ws.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;

    server.gateway.drain();
    let status = loop {
        match grpc.read().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let close = loop {
        match ws.read_or_close().await {
            Ok(_) => continue,
            Err(close) => break close,
        }
    };
    assert_eq!(close, Some(switchboard_gateway::CLOSE_GOING_AWAY));
    // A new stream is told at once.
    let mut late = GrpcClient::connect(&server).await;
    assert_eq!(late.read().await.unwrap_err().code(), Code::Unavailable);
    // An open stream does not hold the graceful shutdown back.
    server.stop().await;
}

#[tokio::test]
async fn the_shared_port_answers_health_and_reflection_and_refuses_unknown_paths() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = Server::start().await;
    let channel = server.channel().await;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let listed = reflect(&mut reflection, MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("a list of services")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    names.sort();
    assert_eq!(names, ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "switchboard.v1.ChatService"]);
    assert_eq!(file_of_symbol(&mut reflection, "switchboard.v1.ChatService").await.package(), "switchboard.v1");

    // The standard health service answers for the chat service and for the server as a whole.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "switchboard.v1.ChatService"] {
        let mut status = tonic_health::pb::health_check_response::ServingStatus::Unknown as i32;
        // The chat service's status is set by a task of its own as the routes are built.
        for _ in 0..100 {
            let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
            status = health.check(request).await.unwrap().into_inner().status;
            if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }

    // An unknown gRPC method is UNIMPLEMENTED; an unknown HTTP path is 404; the WebSocket and health stay.
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/switchboard.v1.ChatService/NoSuchMethod");
    let unknown = grpc
        .unary::<pb::PingRequest, pb::PingResult, _>(
            tonic::Request::new(pb::PingRequest {}),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented, "{unknown:?}");
    let (status, body) = http_get(&server, "/nope").await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    drop(body);
    let (status, body) = http_get(&server, "/healthz").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.ends_with("ok"), "{body}");
    server.stop().await;
}

async fn reflect(
    client: &mut tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient<tonic::transport::Channel>,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::ServerReflectionResponse {
    let request =
        tonic_reflection::pb::v1::ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut replies = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    replies.message().await.unwrap().unwrap()
}

/// The file that reflection says defines `symbol`.
async fn file_of_symbol(
    client: &mut tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient<tonic::transport::Channel>,
    symbol: &str,
) -> prost_types::FileDescriptorProto {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let reply = reflect(client, MessageRequest::FileContainingSymbol(symbol.into())).await;
    let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
        panic!("the file of {symbol}: {reply:?}")
    };
    prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice()).unwrap()
}

/// Reflection registered with the internal descriptor set alone (as the internal gRPC servers do) describes
/// the public package too: the set is shared.
#[tokio::test]
async fn reflection_from_the_shared_descriptor_set_describes_both_packages() {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchboard_proto::internal::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, tonic::service::Routes::new(reflection).into_axum_router()).await.unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    assert_eq!(file_of_symbol(&mut client, "switchboard.v1.ChatService").await.package(), "switchboard.v1");
    let internal = file_of_symbol(&mut client, "switchboard.internal.v1.RouterService").await;
    assert_eq!(internal.package(), "switchboard.internal.v1");
    server.abort();
}

async fn http_get(server: &Server, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response)).await.unwrap().unwrap();
    let status = response.lines().next().unwrap_or_default().to_owned();
    (status, response)
}

/// The proto mirrors the WebSocket protocol: one request per WebSocket request type (`chat.start` is
/// `chat_start`), one ack result under the same name and number, one server frame per WebSocket frame type.
#[test]
fn the_proto_has_every_request_and_frame_of_the_websocket_protocol() {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let file = set.file.iter().find(|file| file.package() == "switchboard.v1").expect("switchboard.v1 is in the set");
    let message = |name: &str| file.message_type.iter().find(|message| message.name() == name).unwrap();
    let oneof_fields = |name: &str| -> Vec<(String, i32)> {
        let message = message(name);
        let mut fields: Vec<_> = message
            .field
            .iter()
            .filter(|field| field.oneof_index.is_some())
            .map(|field| (field.name().to_owned(), field.number()))
            .collect();
        fields.sort();
        fields
    };
    let requests = oneof_fields("ClientFrame");
    let mut names: Vec<String> = requests.iter().map(|(name, _)| name.clone()).collect();
    let mut expected: Vec<String> =
        switchboard_gateway::protocol::REQUEST_TYPES.iter().map(|kind| kind.replace('.', "_")).collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(oneof_fields("Ack"), requests, "each request's result has its name and number");
    let mut frames: Vec<String> = oneof_fields("ServerFrame").into_iter().map(|(name, _)| name).collect();
    frames.sort();
    let mut expected: Vec<String> = [
        "welcome",
        "ack",
        "error",
        "event",
        "typing",
        "queue.snapshot",
        "queue.added",
        "queue.removed",
        "queue.position",
        "offer",
        "offer.ended",
        "chat.assigned",
        "agent.status",
    ]
    .iter()
    .map(|kind| kind.replace('.', "_"))
    .collect();
    expected.sort();
    assert_eq!(frames, expected);

    // One descriptor set describes the internal packages and the public one.
    assert_eq!(pb::FILE_DESCRIPTOR_SET, switchboard_proto::internal::v1::FILE_DESCRIPTOR_SET);
    let packages: std::collections::BTreeSet<&str> = set.file.iter().map(|file| file.package()).collect();
    assert!(packages.contains("switchboard.internal.v1") && packages.contains("switchboard.v1"), "{packages:?}");
}

#[tokio::test]
async fn a_stream_over_its_request_budget_is_told_to_wait_as_a_websocket_is() {
    let rate = switchboard_gateway::RequestRate { per_second: 4, burst: 2 };
    let server = Server::start_with(GatewaySettings { request_rate: rate, ..GatewaySettings::default() }).await;
    let mut dana = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = dana.ack(chat_start("Dana", "Hello?")).await else { panic!() };
    let seq = sent_seq(dana.ack(send_message(&started.conversation, "d-1", "one")).await);
    let error = dana.refused(send_message(&started.conversation, "d-2", "two")).await;
    assert_eq!(
        (error.code.as_str(), error.retryable, error.retry_after_ms, error.grpc_status),
        ("rate_limited", true, Some(250), Code::ResourceExhausted as i32)
    );
    server.clock.advance_ms(250);
    assert_eq!(sent_seq(dana.ack(send_message(&started.conversation, "d-2", "two")).await), seq + 1);
    server.stop().await;
}

/// A stream's answers cost what they carry, as a WebSocket's do: a transcript page of some 200 KB costs
/// four requests, and the request after it waits for them.
#[tokio::test]
async fn a_streams_large_answer_costs_what_it_carries_as_a_websockets_does() {
    const MESSAGES: usize = 50;
    let burst = 1 + MESSAGES as u32 + 1;
    let rate = switchboard_gateway::RequestRate { per_second: 10, burst };
    let server = Server::start_with(GatewaySettings { request_rate: rate, ..GatewaySettings::default() }).await;
    let mut dana = GrpcClient::connect(&server).await;
    let AckResult::ChatStart(started) = dana.ack(chat_start("Dana", "Hello?")).await else { panic!() };
    for n in 0..MESSAGES {
        let body = format!("{n:04}").repeat(1_000);
        dana.ack(send_message(&started.conversation, &format!("d-{n}"), &body)).await;
    }
    let transcript =
        Req::ChatTranscript(pb::ChatTranscriptRequest { conversation: started.conversation, after_seq: 0 });
    let AckResult::ChatTranscript(page) = dana.ack(transcript).await else { panic!() };
    let carried: usize = page.events.iter().map(prost::Message::encoded_len).sum();
    let kib_64 = switchboard_gateway::REPLY_BYTES_PER_REQUEST as usize;
    assert!((3 * kib_64..4 * kib_64 - 4_096).contains(&carried), "{carried} bytes of events");
    // One token was left for the transcript, which took three more.
    let error = dana.refused(Req::Ping(pb::PingRequest {})).await;
    assert_eq!((error.code.as_str(), error.retry_after_ms), ("rate_limited", Some(400)));
    server.clock.advance_ms(400);
    assert_eq!(dana.ack(Req::Ping(pb::PingRequest {})).await, AckResult::Ping(pb::PingResult {}));
    server.stop().await;
}
