//! Bad input: malformed frames, oversized messages, wrong tokens, other tenants' chats and actions the
//! chat's state forbids each get a clear error frame; nothing is stored; the connection stays usable; the
//! server never panics.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use switchboard_e2e::{Client, SEED_CONFIG, Server};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WIDGET: &str = "acme-widget-key";
const DEADLINE: Duration = Duration::from_secs(20);
const UNKNOWN_CHAT: &str = "0190f5a2-7c1e-7d3b-9a4e-2b8c6d0e1f23";

/// A bare connection for what `Client` cannot send (binary frames, frames without an id); it reads the one
/// ack or error that answers each frame.
struct Raw(WebSocketStream<MaybeTlsStream<TcpStream>>);

impl Raw {
    async fn connect(url: &str) -> anyhow::Result<Raw> {
        let (socket, _) = tokio_tungstenite::connect_async(url).await?;
        let mut raw = Raw(socket);
        let welcome = raw.next().await?.context("closed before the welcome")?;
        assert_eq!(welcome["type"], "welcome");
        Ok(raw)
    }

    /// The next text frame; `None` once the server closed the connection.
    async fn next(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            match tokio::time::timeout(DEADLINE, self.0.next()).await.context("no frame before the deadline")? {
                Some(Ok(Message::Text(text))) => return Ok(Some(serde_json::from_str(text.as_str())?)),
                Some(Ok(Message::Close(_)) | Err(_)) | None => return Ok(None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends a frame and returns the ack or error that answers it; pushes in between are skipped.
    async fn exchange(&mut self, message: Message) -> anyhow::Result<Value> {
        self.0.send(message).await?;
        loop {
            let frame = self.next().await?.context("connection closed instead of an answer")?;
            if frame["type"] == "ack" || frame["type"] == "error" {
                return Ok(frame);
            }
        }
    }

    async fn text(&mut self, text: &str) -> anyhow::Result<Value> {
        self.exchange(Message::Text(text.into())).await
    }

    async fn ping(&mut self, id: &str) -> anyhow::Result<()> {
        let answer = self.text(&json!({ "type": "ping", "id": id }).to_string()).await?;
        assert_eq!((answer["type"].as_str(), answer["id"].as_str()), (Some("ack"), Some(id)), "{answer}");
        Ok(())
    }
}

/// The id an answer must carry: the frame's `id` if it is a string of 1 to 128 bytes, else null.
fn expected_id(text: &str) -> Option<String> {
    let value: Value = serde_json::from_str(text).ok()?;
    let id = value.as_object()?.get("id")?.as_str()?;
    (!id.is_empty() && id.len() <= 128).then(|| id.to_owned())
}

/// An error frame with this id (`None`: `"id": null`), this code and a message for people.
fn assert_error(frame: &Value, id: Option<&str>, code: &str, what: &str) {
    assert_eq!(frame["type"], "error", "{what}: {frame}");
    assert_eq!(frame.get("id"), Some(&id.map_or(Value::Null, |id| json!(id))), "{what}: {frame}");
    assert_eq!(frame["code"], code, "{what}: {frame}");
    assert!(frame["message"].as_str().is_some_and(|m| !m.trim().is_empty()), "{what}: no message: {frame}");
}

/// Sends a request that must be refused with `code`; returns the error frame.
async fn refuse(client: &mut Client, kind: &str, fields: Value, code: &str) -> anyhow::Result<Value> {
    let what = format!("{kind} {fields}");
    match client.request(kind, fields).await? {
        Ok(ack) => bail!("{what} should have been refused with {code}, got {ack}"),
        Err(error) => {
            assert_error(&error, error["id"].as_str(), code, &what);
            Ok(error)
        }
    }
}

/// A chat's stored events, checked to have gap-free seqs from 1.
async fn transcript(reader: &mut Client, chat: &str) -> anyhow::Result<Vec<Value>> {
    let ack = reader.ok("chat.transcript", json!({ "conversation": chat })).await?;
    let events = ack["events"].as_array().context("no events")?.clone();
    let seqs: Vec<u64> = events.iter().map(|event| event["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>(), "seqs of {chat}");
    Ok(events)
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|event| event["kind"].as_str().unwrap_or("?")).collect()
}

fn waiting(queue_ack: &Value) -> Vec<&str> {
    queue_ack["entries"].as_array().into_iter().flatten().filter_map(|e| e["conversation"].as_str()).collect()
}

fn assert_healthy(server: &mut Server) {
    assert!(server.is_running(), "the server exited; stderr:\n{}", server.stderr());
    assert!(!server.stderr().contains("panicked"), "the server panicked:\n{}", server.stderr());
}

/// A tiny deterministic PRNG (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Every request type with its fields, and one unknown type.
const SHAPES: &str = "chat.start:widget_key,group,name,question customer.resume:conversation,customer_token,after_seq \
    agent.sign_in:token agent.set_status:status queue.list: chat.accept:conversation \
    chat.subscribe:conversation,after_seq chat.transcript:conversation,after_seq chat.list:list \
    message.send:conversation,client_msg_id,body message.delivered:conversation,up_to_seq \
    typing:conversation,typing chat.close:conversation chat.cancel:conversation ping: teleport:extra";

fn random_text(rng: &mut Rng, max: usize) -> String {
    let pieces = ["a", "Z", "7", " ", "\"", "\\", "{", "}", "é", "€", "😀", "\u{0}", "\n"];
    (0..rng.below(max)).map(|_| *rng.pick(&pieces)).collect()
}

/// A plausible value for a field (often valid, sometimes not).
fn field_value(rng: &mut Rng, field: &str, chats: &[String]) -> Value {
    match field {
        "conversation" if rng.below(4) == 0 => json!(rng.pick(&[UNKNOWN_CHAT, "nope"])),
        "conversation" => json!(rng.pick(chats)),
        "widget_key" => json!(rng.pick(&[WIDGET, "other-widget-key", "wrong"])),
        "group" => json!(rng.pick(&["g1", "g2", "g9", "a/b"])),
        "token" => json!(rng.pick(&["token-agent-a", "token-agent-x", "", "wrong"])),
        "after_seq" | "up_to_seq" => json!(rng.below(8)),
        "status" => json!(rng.pick(&["online", "away", "offline"])),
        "list" => json!(rng.pick(&["ongoing", "closed"])),
        "typing" => json!(rng.below(2) == 0),
        "client_msg_id" => json!(format!("c{}", rng.below(10))),
        _ => json!(random_text(rng, 100)),
    }
}

fn random_value(rng: &mut Rng, chats: &[String], depth: u32) -> Value {
    match rng.below(if depth > 1 { 7 } else { 9 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(*rng.pick(&[-1, 0, 3, 99, i64::MAX])),
        3 => json!(*rng.pick(&[1.5, -0.0, 1e300])),
        4 => json!(random_text(rng, 300)),
        5 | 6 => {
            let field = *rng.pick(&["conversation", "widget_key", "group", "token", "up_to_seq", "status", "body"]);
            field_value(rng, field, chats)
        }
        7 => json!([random_value(rng, chats, depth + 1), random_value(rng, chats, depth + 1)]),
        _ => json!({ "k": random_value(rng, chats, depth + 1) }),
    }
}

fn random_frame(rng: &mut Rng, n: usize, chats: &[String]) -> String {
    if rng.below(5) == 0 {
        let bytes: Vec<u8> = (0..rng.below(400)).map(|_| rng.next() as u8).collect();
        return String::from_utf8_lossy(&bytes).into_owned();
    }
    let shapes: Vec<&str> = SHAPES.split_whitespace().collect();
    let (kind, fields) = rng.pick(&shapes).split_once(':').unwrap_or_default();
    let mut frame = Map::new();
    match rng.below(10) {
        0 => None,
        1 => frame.insert("id".into(), random_value(rng, chats, 0)),
        _ => frame.insert("id".into(), json!(format!("f{n}"))),
    };
    frame.insert("type".into(), if rng.below(10) == 0 { random_value(rng, chats, 0) } else { json!(kind) });
    for field in fields.split(',').filter(|field| !field.is_empty()) {
        if rng.below(8) != 0 {
            frame.insert(field.into(), field_value(rng, field, chats));
        }
    }
    if rng.below(3) == 0 {
        let field = *rng.pick(&["conversation", "body", "up_to_seq", "token", "extra", "type", "status"]);
        frame.insert(field.into(), random_value(rng, chats, 0));
    }
    let text = Value::Object(frame).to_string();
    if rng.below(8) != 0 {
        return text;
    }
    let cut = rng.below(text.len());
    text[..(0..=cut).rev().find(|&at| text.is_char_boundary(at)).unwrap_or(0)].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_clear_errors_and_the_connection_stays_usable() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(SEED_CONFIG, data.path()).await?;
    let mut raw = Raw::connect(&server.ws_url()).await?;
    let long_id = json!({ "id": "i".repeat(129), "type": "ping" }).to_string();
    let garbage = "{\"x\": [".repeat(8_000); // 56 KB: under the frame limit (64 KiB), far over the body limit
    let bad_seq = json!({ "id": "m8", "type": "message.delivered", "conversation": UNKNOWN_CHAT, "up_to_seq": -1 });
    let cases: &[(&str, &str)] = &[
        ("{nope", "bad_json"),
        ("", "bad_json"),
        (&garbage, "bad_json"),
        ("[1, 2]", "bad_frame"),
        ("\"hello\"", "bad_frame"),
        ("42", "bad_frame"),
        ("null", "bad_frame"),
        (r#"{"type":"ping"}"#, "missing_id"),
        (r#"{"id":7,"type":"ping"}"#, "missing_id"),
        (r#"{"id":"","type":"ping"}"#, "missing_id"),
        (&long_id, "missing_id"),
        (r#"{"id":"m1"}"#, "missing_type"),
        (r#"{"id":"m2","type":5}"#, "missing_type"),
        (r#"{"id":"m3","type":"teleport"}"#, "unknown_type"),
        (r#"{"id":"m4","type":"agent.sign_in"}"#, "bad_request"),
        (r#"{"id":"m5","type":"agent.sign_in","token":5}"#, "bad_request"),
        (r#"{"id":"m6","type":"ping","extra":true}"#, "bad_request"),
        (r#"{"id":"m7","type":"chat.accept","conversation":"not-a-uuid"}"#, "bad_request"),
        (&bad_seq.to_string(), "bad_request"),
        (r#"{"id":"m9","type":"typing","conversation":null,"typing":"yes"}"#, "bad_request"),
    ];
    for (n, (text, code)) in cases.iter().enumerate() {
        let answer = raw.text(text).await?;
        assert_error(&answer, expected_id(text).as_deref(), code, &text.chars().take(80).collect::<String>());
        raw.ping(&format!("p{n}")).await?;
    }
    // A binary frame is refused, not ignored.
    let answer = raw.exchange(Message::Binary(vec![0u8, 159, 146, 150].into())).await?;
    assert_error(&answer, None, "bad_frame", "binary frame");
    raw.ping("after-binary").await?;
    // A frame over the frame limit ends that connection only.
    let mut flooder = Raw::connect(&server.ws_url()).await?;
    flooder.0.send(Message::Text("x".repeat(70_000).into())).await?;
    let closed = tokio::time::timeout(DEADLINE, flooder.0.next()).await.context("no close before the deadline")?;
    match closed {
        Some(Ok(Message::Close(Some(close)))) => {
            assert_eq!(u16::from(close.code), 1009, "message too big");
            assert!(close.reason.contains("bytes"), "the reason says the limit: {}", close.reason);
        }
        other => panic!("a frame over the frame limit closes its connection with 1009, got {other:?}"),
    }
    raw.ping("after-flood").await?;
    assert_healthy(&mut server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_type_with_a_bad_enum_value_is_a_bad_request() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(SEED_CONFIG, data.path()).await?;
    let mut raw = Raw::connect(&server.ws_url()).await?;
    let mut wrong = Vec::new();
    for text in
        [r#"{"id":"s1","type":"agent.set_status","status":"busy"}"#, r#"{"id":"s2","type":"chat.list","list":"x"}"#]
    {
        let answer = raw.text(text).await?;
        if answer["code"] != "bad_request" {
            wrong.push(format!("{text} → {answer}"));
        }
        raw.ping("p").await?;
    }
    assert_healthy(&mut server);
    assert!(wrong.is_empty(), "{wrong:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_are_refused_and_not_stored() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let mut agent = Client::sign_in(&url, "token-agent-a").await?;
    assert_eq!(agent.push_of("queue.snapshot").await?["entries"], json!([]));
    let mut customer = Client::connect(&url).await?;
    assert_eq!(customer.welcome["max_message_bytes"], 256);

    // An over-limit question creates no chat, and leaves the connection free to start one.
    let start = |question: String| json!({ "widget_key": WIDGET, "group": "g1", "name": "Ann", "question": question });
    let error = refuse(&mut customer, "chat.start", start("q".repeat(257)), "message_too_large").await?;
    assert!(error["message"].as_str().unwrap_or_default().contains("256"), "{error}");
    refuse(&mut customer, "chat.start", start("€".repeat(86)), "message_too_large").await?; // 86 chars, 258 bytes
    assert_eq!(waiting(&agent.ok("queue.list", json!({})).await?), Vec::<&str>::new());
    let question = "é".repeat(128); // exactly 256 bytes
    let ack = customer.ok("chat.start", start(question.clone())).await?;
    let chat = ack["conversation"].as_str().context("no conversation")?.to_owned();
    // The first chat the queue ever got is this one.
    assert_eq!(agent.push_of("queue.added").await?["entry"]["conversation"], chat);
    assert_eq!(waiting(&agent.ok("queue.list", json!({})).await?), [chat.as_str()]);
    agent.ok("chat.accept", json!({ "conversation": chat })).await?;

    let send = |id: &str, body: String| json!({ "conversation": chat, "client_msg_id": id, "body": body });
    refuse(&mut customer, "message.send", send("c-1", "x".repeat(257)), "message_too_large").await?;
    refuse(&mut customer, "message.send", send("c-1", "€".repeat(86)), "message_too_large").await?;
    refuse(&mut agent, "message.send", send("a-1", "y".repeat(257)), "message_too_large").await?;
    refuse(&mut agent, "message.send", send("a-1", "y".repeat(10_000)), "message_too_large").await?;
    // Exactly at the limit (in bytes) is fine; the refused client_msg_ids were not recorded.
    let ok = customer.ok("message.send", send("c-1", "x".repeat(256))).await?;
    assert_eq!((ok["seq"].as_u64(), ok["duplicate"].as_bool()), (Some(4), Some(false)));
    let euro = format!("{}a", "€".repeat(85));
    let ok = agent.ok("message.send", send("a-1", euro.clone())).await?;
    assert_eq!((ok["seq"].as_u64(), ok["duplicate"].as_bool()), (Some(5), Some(false)));

    let events = transcript(&mut agent, &chat).await?;
    assert_eq!(kinds(&events), ["created", "message", "accepted", "message", "message"]);
    let bodies: Vec<&str> = events.iter().filter_map(|event| event["body"].as_str()).collect();
    assert_eq!(bodies, [question.as_str(), &"x".repeat(256), &euro]);
    customer.ok("ping", json!({})).await?;
    assert_healthy(&mut server);

    // The limit is configurable.
    let small = tempfile::tempdir()?;
    let mut small_server = Server::start(&SEED_CONFIG.replace("256", "32"), small.path()).await?;
    let mut customer = Client::connect(&small_server.ws_url()).await?;
    assert_eq!(customer.welcome["max_message_bytes"], 32);
    refuse(&mut customer, "chat.start", start("q".repeat(33)), "message_too_large").await?;
    customer.ok("chat.start", start("q".repeat(32))).await?;
    assert_healthy(&mut small_server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_credentials_are_refused() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let (_owner, chat, token) = Client::start_chat(&url, WIDGET, "g1", "Ann", "hello?").await?;
    let mut anon = Client::connect(&url).await?;
    refuse(&mut anon, "agent.sign_in", json!({ "token": "token-agent-z" }), "unauthorized").await?;
    refuse(&mut anon, "agent.sign_in", json!({ "token": "" }), "unauthorized").await?;
    refuse(&mut anon, "agent.sign_in", json!({}), "bad_request").await?;
    let start = |key: &str, group: &str, name: &str| json!({ "widget_key": key, "group": group, "name": name, "question": "hi" });
    refuse(&mut anon, "chat.start", start("wrong-key", "g1", "Bo"), "unauthorized").await?;
    refuse(&mut anon, "chat.start", start(WIDGET, "g9", "Bo"), "unknown_group").await?;
    refuse(&mut anon, "chat.start", start(WIDGET, "a/b", "Bo"), "unknown_group").await?;
    refuse(&mut anon, "chat.start", start("other-widget-key", "g2", "Bo"), "unknown_group").await?;
    refuse(&mut anon, "chat.start", start(WIDGET, "g1", "   "), "bad_request").await?;
    let resume = |conversation: &str, token: &str| json!({ "conversation": conversation, "customer_token": token });
    refuse(&mut anon, "customer.resume", resume(&chat, "not-the-token"), "unauthorized").await?;
    refuse(&mut anon, "customer.resume", resume(UNKNOWN_CHAT, &token), "unauthorized").await?;
    refuse(&mut anon, "customer.resume", resume("chat-1", &token), "bad_request").await?;
    let on_chat = json!({ "conversation": chat });
    let agent_only =
        [("queue.list", json!({})), ("chat.list", json!({ "list": "ongoing" })), ("chat.accept", on_chat.clone())];
    let send = json!({ "conversation": chat, "client_msg_id": "m1", "body": "hi" });
    let chat_requests = [("message.send", send), ("chat.transcript", on_chat.clone()), ("chat.close", on_chat)];
    for (kind, fields) in agent_only.iter().chain(&chat_requests) {
        refuse(&mut anon, kind, fields.clone(), "not_signed_in").await?;
    }
    refuse(&mut anon, "agent.set_status", json!({ "status": "away" }), "not_signed_in").await?;
    // None of that bound the connection: it can still resume the chat, and then be nothing else.
    anon.ok("customer.resume", resume(&chat, &token)).await?;
    let mut customer = anon;
    refuse(&mut customer, "customer.resume", resume(&chat, &token), "already_signed_in").await?;
    refuse(&mut customer, "chat.start", start(WIDGET, "g1", "Bo"), "already_signed_in").await?;
    refuse(&mut customer, "agent.sign_in", json!({ "token": "token-agent-a" }), "already_signed_in").await?;
    for (kind, fields) in agent_only {
        refuse(&mut customer, kind, fields, "forbidden").await?;
    }
    refuse(&mut customer, "agent.set_status", json!({ "status": "online" }), "forbidden").await?;
    let mut agent = Client::sign_in(&url, "token-agent-a").await?;
    refuse(&mut agent, "agent.sign_in", json!({ "token": "token-agent-b" }), "already_signed_in").await?;
    refuse(&mut agent, "chat.start", start(WIDGET, "g1", "Bo"), "already_signed_in").await?;
    refuse(&mut agent, "customer.resume", resume(&chat, &token), "already_signed_in").await?;

    // Nothing was stored: one chat, untouched.
    assert_eq!(waiting(&agent.push_of("queue.snapshot").await?), [chat.as_str()]);
    assert_eq!(waiting(&agent.ok("queue.list", json!({})).await?), [chat.as_str()]);
    assert_eq!(kinds(&transcript(&mut agent, &chat).await?), ["created", "message"]);
    customer.ok("ping", json!({})).await?;
    assert_healthy(&mut server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_tenants_and_other_chats_are_not_found() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let mut agent_a = Client::sign_in(&url, "token-agent-a").await?;
    agent_a.push_of("queue.snapshot").await?;
    let (mut customer_a, chat_a, _) = Client::start_chat(&url, WIDGET, "g1", "Ann", "secret-question-a").await?;
    let (mut customer_b, chat_b, _) = Client::start_chat(&url, WIDGET, "g2", "Ben", "secret-question-b").await?;
    // Accepted once the agent's list shows it (a chat that comes and goes before a list is written is never
    // shown, nor its removal).
    agent_a.push_matching(|frame| frame["type"] == "queue.added" && frame["entry"]["conversation"] == *chat_a).await?;
    agent_a.ok("chat.accept", json!({ "conversation": chat_a })).await?;
    customer_a.ok("message.send", json!({ "conversation": chat_a, "client_msg_id": "c1", "body": "hi" })).await?;

    let requests = |chat: &str| {
        let on_chat = json!({ "conversation": chat });
        [
            ("chat.subscribe", on_chat.clone()),
            ("chat.transcript", on_chat.clone()),
            ("message.send", json!({ "conversation": chat, "client_msg_id": "x1", "body": "intrusion" })),
            ("message.delivered", json!({ "conversation": chat, "up_to_seq": 1 })),
            ("typing", json!({ "conversation": chat, "typing": true })),
            ("chat.close", on_chat.clone()),
            ("chat.cancel", on_chat),
        ]
    };
    let mut agent_x = Client::sign_in(&url, "token-agent-x").await?; // another tenant
    let mut agent_b = Client::sign_in(&url, "token-agent-b").await?; // g1 only: chat B (g2) is not theirs
    for chat in [&chat_a, &chat_b] {
        for (kind, fields) in requests(chat) {
            let error = refuse(&mut agent_x, kind, fields, "not_found").await?;
            assert!(!error.to_string().contains("secret-question"), "{error}");
        }
        refuse(&mut agent_x, "chat.accept", json!({ "conversation": chat }), "not_found").await?;
    }
    for (kind, fields) in requests(&chat_b) {
        refuse(&mut agent_b, kind, fields.clone(), "not_found").await?;
        refuse(&mut customer_a, kind, fields, "not_found").await?;
    }
    refuse(&mut agent_b, "chat.accept", json!({ "conversation": chat_b }), "not_found").await?;
    for (kind, fields) in requests(&chat_a) {
        refuse(&mut customer_b, kind, fields, "not_found").await?;
    }
    for (kind, fields) in requests(UNKNOWN_CHAT) {
        refuse(&mut agent_a, kind, fields, "not_found").await?;
    }
    refuse(&mut agent_a, "chat.accept", json!({ "conversation": UNKNOWN_CHAT }), "not_found").await?;

    // Agent X was never told of acme's chats; both chats are as they were.
    agent_x.ok("ping", json!({})).await?;
    let leaks = |frame: &Value| frame.to_string().contains(&chat_a) || frame.to_string().contains(&chat_b);
    assert!(!agent_x.pending_pushes().iter().any(leaks), "{:?}", agent_x.pending_pushes());
    assert_eq!(kinds(&transcript(&mut agent_a, &chat_a).await?), ["created", "message", "accepted", "message"]);
    assert_eq!(kinds(&transcript(&mut agent_a, &chat_b).await?), ["created", "message"]);
    agent_a.push_matching(|frame| frame["type"] == "queue.removed" && frame["conversation"] == *chat_a).await?;
    assert_eq!(waiting(&agent_a.ok("queue.list", json!({})).await?), [chat_b.as_str()]);
    assert_healthy(&mut server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_the_chat_state_forbids_are_refused() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let mut agent_a = Client::sign_in(&url, "token-agent-a").await?;
    let mut agent_b = Client::sign_in(&url, "token-agent-b").await?;
    let (mut customer, chat, _) = Client::start_chat(&url, WIDGET, "g1", "Ann", "hello?").await?;
    let on_chat = json!({ "conversation": chat });
    let typing = json!({ "conversation": chat, "typing": true });
    let send = |id: &str, body: &str| json!({ "conversation": chat, "client_msg_id": id, "body": body });
    let mark = |up_to_seq: u64| json!({ "conversation": chat, "up_to_seq": up_to_seq });

    refuse(&mut agent_a, "message.send", send("a-0", "too early"), "not_accepted").await?;
    refuse(&mut agent_a, "chat.close", on_chat.clone(), "not_accepted").await?;
    refuse(&mut agent_a, "typing", typing.clone(), "not_accepted").await?;
    agent_a.ok("chat.accept", on_chat.clone()).await?; // seq 3
    refuse(&mut agent_b, "chat.accept", on_chat.clone(), "chat_taken").await?;
    refuse(&mut agent_b, "message.send", send("b-1", "me too"), "not_participant").await?;
    refuse(&mut agent_b, "chat.close", on_chat.clone(), "not_participant").await?;
    refuse(&mut agent_b, "chat.cancel", on_chat.clone(), "not_participant").await?;
    refuse(&mut agent_b, "message.delivered", mark(2), "not_participant").await?;
    for (who, client) in [("agent", &mut agent_a), ("customer", &mut customer)] {
        refuse(client, "message.delivered", mark(99), "bad_delivery_mark").await.context(who)?;
        for body in ["", "   ", "\n\t "] {
            refuse(client, "message.send", send("e-1", body), "empty_message").await.context(who)?;
        }
        refuse(client, "message.send", send("", "no id"), "bad_request").await.context(who)?;
        refuse(client, "message.send", send(&"i".repeat(129), "long id"), "bad_request").await.context(who)?;
    }
    assert_eq!(agent_a.ok("message.send", send("a-1", "hello Ann")).await?["seq"], 4);
    customer.ok("message.delivered", mark(4)).await?; // seq 5
    agent_a.ok("chat.close", on_chat.clone()).await?; // seq 6

    refuse(&mut customer, "message.send", send("c-9", "still there?"), "chat_closed").await?;
    refuse(&mut agent_a, "message.send", send("a-9", "one more"), "chat_closed").await?;
    refuse(&mut agent_b, "chat.accept", on_chat.clone(), "chat_closed").await?;
    refuse(&mut agent_a, "chat.accept", on_chat.clone(), "chat_closed").await?;
    refuse(&mut customer, "typing", typing, "chat_closed").await?;
    assert_eq!(agent_a.ok("chat.close", on_chat).await?["seq"], Value::Null, "closing twice stores nothing");

    // An away agent takes no new chat; back online, the same accept succeeds.
    let (_customer_2, chat_2, _) = Client::start_chat(&url, WIDGET, "g1", "Ben", "anyone?").await?;
    agent_a.ok("agent.set_status", json!({ "status": "away" })).await?;
    refuse(&mut agent_a, "chat.accept", json!({ "conversation": chat_2 }), "agent_not_online").await?;
    agent_a.ok("agent.set_status", json!({ "status": "online" })).await?;
    agent_a.ok("chat.accept", json!({ "conversation": chat_2 })).await?;

    let events = transcript(&mut agent_a, &chat).await?;
    assert_eq!(kinds(&events), ["created", "message", "accepted", "message", "delivered", "closed"]);
    assert_eq!(kinds(&transcript(&mut agent_a, &chat_2).await?), ["created", "message", "accepted"]);
    customer.ok("ping", json!({})).await?;
    agent_b.ok("ping", json!({})).await?;
    assert_healthy(&mut server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_range_after_seq_is_a_client_error_that_binds_nothing() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let (_owner, chat, token) = Client::start_chat(&url, WIDGET, "g1", "Ann", "hello?").await?;
    let mut agent = Client::sign_in(&url, "token-agent-a").await?;
    let mut customer = Client::connect(&url).await?;
    let mut wrong = Vec::new();
    // No client can have received a seq that large: refused with its own code, never an internal error.
    let transcript = agent.request("chat.transcript", json!({ "conversation": chat, "after_seq": u64::MAX })).await?;
    let resume = json!({ "conversation": chat, "customer_token": token, "after_seq": u64::MAX });
    let resumed = customer.request("customer.resume", resume).await?;
    for answer in [&transcript, &resumed] {
        if !matches!(answer, Err(error) if error["code"] == "bad_after_seq") {
            wrong.push(format!("{answer:?}"));
        }
    }
    // A refused resume leaves the connection free to resume properly.
    let again = customer.request("customer.resume", json!({ "conversation": chat, "customer_token": token })).await?;
    if let Err(error) = again {
        wrong.push(format!("resume after a refused resume: {error}"));
    }
    assert_healthy(&mut server);
    assert!(wrong.is_empty(), "{wrong:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_each_get_exactly_one_answer() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    // Every frame is to reach the request's checks, none to be held back by the connection's request budget.
    let config = SEED_CONFIG.replace("limits:\n", "limits:\n  requests_per_second: 0\n");
    let mut server = Server::start(&config, data.path()).await?;
    let url = server.ws_url();
    let (_owner, chat, _) = Client::start_chat(&url, WIDGET, "g1", "Ann", "hello?").await?;
    let mut chats = vec![chat]; // and every chat the fuzz itself starts
    let mut raw = Raw::connect(&url).await?;
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    for n in 0..300 {
        let text = random_frame(&mut rng, n, &chats);
        let answer = raw.text(&text).await.with_context(|| format!("frame {n}: {text}"))?;
        // The answer carries this frame's id: a missing or extra answer would show as a mismatch.
        assert_eq!(answer["id"].as_str(), expected_id(&text).as_deref(), "frame {n}: {text} → {answer}");
        chats.extend(answer["conversation"].as_str().map(str::to_owned));
        if answer["type"] == "error" {
            let code = answer["code"].as_str().unwrap_or_default();
            assert!(!code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{answer}");
            assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
        }
    }
    raw.ping("final").await?;
    assert_healthy(&mut server);
    Ok(())
}

/// `serve` limits the chats one client address starts as its configuration says: from this address a second
/// chat in the same minute is refused `rate_limited`, on a new connection too, and nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_started_from_one_address_are_limited_as_configured() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let limits = "limits:\n  chat_starts_per_minute_per_address: 1\n  chat_start_burst_per_address: 1\n";
    let mut server = Server::start(&SEED_CONFIG.replace("limits:\n", limits), data.path()).await?;
    let url = server.ws_url();
    let (_ann, chat, _) = Client::start_chat(&url, WIDGET, "g1", "Ann", "hello?").await?;
    let mut bea = Client::connect(&url).await?;
    let start = json!({ "widget_key": WIDGET, "group": "g1", "name": "Bea", "question": "me too?" });
    assert_eq!(bea.refused("chat.start", start).await?, "rate_limited");
    let mut agent = Client::sign_in(&url, "token-agent-a").await?;
    assert_eq!(waiting(&agent.ok("queue.list", json!({})).await?), [chat.as_str()]);
    assert_healthy(&mut server);
    Ok(())
}
