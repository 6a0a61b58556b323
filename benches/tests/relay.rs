//! The bare relay over real sockets: the `bare-relay` binary, a customer and an agent speaking the frames of
//! `docs/protocol.md` that the load generator's scenarios use, with the pushes each side must get.

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A guard against a frame that never comes; frames normally arrive within milliseconds.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// The relay process (killed on drop) and its WebSocket URL.
async fn start_relay() -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bare-relay"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bare-relay starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(FRAME_DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap();
    let address = line.strip_prefix("bare-relay listening on http://").expect("the listening line").to_owned();
    (child, format!("ws://{address}/v1/ws"))
}

struct Client {
    name: &'static str,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u32,
}

impl Client {
    /// Connects and reads the welcome frame.
    async fn connect(url: &str, name: &'static str) -> Client {
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut client = Client { name, socket, next_id: 0 };
        let welcome = client.next().await;
        assert_eq!(welcome, json!({ "max_message_bytes": 4096, "protocol": 1, "type": "welcome" }));
        client
    }

    /// The next frame the server sent, as JSON.
    async fn next(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(FRAME_DEADLINE, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within {FRAME_DEADLINE:?}", self.name))
                .expect("the connection is open")
                .unwrap();
            match frame {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("{}: unexpected frame {other:?}", self.name),
            }
        }
    }

    /// Sends a request (its `type` and these fields, with a fresh id) and returns its id.
    async fn send(&mut self, kind: &str, mut fields: Value) -> String {
        self.next_id += 1;
        let id = format!("{}-{}", self.name, self.next_id);
        fields["type"] = kind.into();
        fields["id"] = id.clone().into();
        self.socket.send(Message::Text(fields.to_string().into())).await.unwrap();
        id
    }

    /// Sends a request and returns its answer, which must be an ack.
    async fn request(&mut self, kind: &str, fields: Value) -> Value {
        let id = self.send(kind, fields).await;
        let answer = self.next().await;
        assert_eq!((answer["type"].as_str(), answer["id"].as_str()), (Some("ack"), Some(id.as_str())), "{answer}");
        answer
    }
}

/// The `event` frame of `conversation` whose event is `event` (besides its `at_ms`, checked to be a time).
fn assert_event(frame: &Value, conversation: &str, event: Value) {
    assert_eq!((frame["type"].as_str(), frame["conversation"].as_str()), (Some("event"), Some(conversation)));
    let mut got = frame["event"].clone();
    assert!(got["at_ms"].as_i64().is_some_and(|at_ms| at_ms > 1_700_000_000_000), "{frame}");
    got.as_object_mut().unwrap().remove("at_ms");
    assert_eq!(got, event);
    assert_eq!(frame.as_object().unwrap().len(), 3, "only type, conversation and event: {frame}");
}

#[tokio::test]
async fn a_customer_and_an_agent_chat_through_the_relay() {
    let (_relay, url) = start_relay().await;

    let mut agent = Client::connect(&url, "agent").await;
    let groups = agent.request("groups.list", json!({ "widget_key": "load-widget-key" })).await;
    assert_eq!(groups["groups"][0]["id"], "g0");
    assert_eq!(groups["stale"], false);
    let signed_in = agent.request("agent.sign_in", json!({ "token": "load-agent-token-7" })).await;
    let expected_agent =
        json!({ "active": [], "agent": "a7", "capacity": 3, "groups": ["g0"], "status": "online", "tenant": "load" });
    assert_eq!(signed_in["agent"], expected_agent);
    assert_eq!(agent.next().await, json!({ "entries": [], "type": "queue.snapshot" }));
    let away = agent.request("agent.set_status", json!({ "status": "away" })).await;
    assert_eq!(away["agent"]["status"], "away");
    agent.request("agent.set_status", json!({ "status": "online" })).await;

    let mut customer = Client::connect(&url, "customer").await;
    let start = json!({ "widget_key": "load-widget-key", "group": "g0", "name": "Dana", "question": "Canada?" });
    let started = customer.request("chat.start", start).await;
    let conversation = started["conversation"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&conversation).is_ok());
    assert!(started["customer_token"].as_str().is_some_and(|token| !token.is_empty()));
    assert_eq!(started["subscribed"], true);
    let chat = &started["chat"];
    assert_eq!(
        (chat["state"].as_str(), chat["last_seq"].as_u64(), chat["owner"].is_null()),
        (Some("queued"), Some(2), true)
    );
    let created = json!({ "author": { "role": "system" }, "customer_name": "Dana", "group": "g0", "kind": "created", "question": "Canada?", "seq": 1 });
    let question = json!({ "author": { "role": "customer" }, "body": "Canada?", "kind": "message", "seq": 2 });
    assert_event(&customer.next().await, &conversation, created.clone());
    assert_event(&customer.next().await, &conversation, question.clone());
    assert_eq!(customer.next().await, json!({ "conversation": conversation, "position": 1, "type": "queue.position" }));

    let accepted = agent.request("chat.accept", json!({ "conversation": conversation })).await;
    assert_eq!((accepted["chat"]["state"].as_str(), accepted["chat"]["owner"].as_str()), (Some("active"), Some("a7")));
    let accepted_event =
        json!({ "agent": "a7", "author": { "id": "a7", "role": "agent" }, "kind": "accepted", "seq": 3 });
    assert_event(&agent.next().await, &conversation, created);
    assert_event(&agent.next().await, &conversation, question);
    assert_event(&agent.next().await, &conversation, accepted_event.clone());
    assert_event(&customer.next().await, &conversation, accepted_event);

    // A message is acked, then pushed to both sides, the sender's included.
    let send = json!({ "conversation": conversation, "client_msg_id": "c-1", "body": "Hello" });
    let sent = customer.request("message.send", send).await;
    assert_eq!(sent, json!({ "duplicate": false, "id": "customer-2", "seq": 4, "status": "sent", "type": "ack" }));
    let hello = json!({ "author": { "role": "customer" }, "body": "Hello", "client_msg_id": "c-1", "kind": "message", "seq": 4 });
    assert_event(&customer.next().await, &conversation, hello.clone());
    assert_event(&agent.next().await, &conversation, hello);
    let send = json!({ "conversation": conversation, "client_msg_id": "a-1", "body": "Hi Dana" });
    assert_eq!(agent.request("message.send", send).await["seq"], 5);
    let reply = json!({ "author": { "id": "a7", "role": "agent" }, "body": "Hi Dana", "client_msg_id": "a-1", "kind": "message", "seq": 5 });
    assert_event(&agent.next().await, &conversation, reply.clone());
    assert_event(&customer.next().await, &conversation, reply);

    let delivered =
        customer.request("message.delivered", json!({ "conversation": conversation, "up_to_seq": 5 })).await;
    assert_eq!(delivered["seq"], 6);
    let mark = json!({ "author": { "role": "customer" }, "kind": "delivered", "seq": 6, "up_to_seq": 5 });
    assert_event(&customer.next().await, &conversation, mark.clone());
    assert_event(&agent.next().await, &conversation, mark);
    let again = customer.request("message.delivered", json!({ "conversation": conversation, "up_to_seq": 5 })).await;
    assert_eq!(again["seq"], Value::Null, "a mark that does not move stores nothing");

    assert_eq!(customer.request("ping", json!({})).await.as_object().unwrap().len(), 2);
    let closed = agent.request("chat.close", json!({ "conversation": conversation })).await;
    assert_eq!(closed["seq"], 7);
    let end = json!({ "author": { "id": "a7", "role": "agent" }, "kind": "closed", "seq": 7 });
    assert_event(&agent.next().await, &conversation, end.clone());
    assert_event(&customer.next().await, &conversation, end);
}

#[tokio::test]
async fn requests_out_of_turn_are_refused_with_the_documented_codes() {
    let (_relay, url) = start_relay().await;
    let mut client = Client::connect(&url, "client").await;
    let conversation = uuid::Uuid::new_v4().to_string();
    let cases = [
        ("message.send", json!({ "conversation": conversation, "client_msg_id": "m", "body": "x" }), "not_signed_in"),
        ("chat.accept", json!({ "conversation": conversation }), "not_signed_in"),
        ("groups.list", json!({}), "not_signed_in"),
        ("no.such.type", json!({}), "unknown_type"),
    ];
    for (kind, fields, code) in cases {
        let id = client.send(kind, fields).await;
        let error = client.next().await;
        assert_eq!(
            (error["type"].as_str(), error["id"].as_str(), error["code"].as_str()),
            (Some("error"), Some(id.as_str()), Some(code))
        );
        assert_eq!(error["retryable"], false);
    }
    client.socket.send(Message::Text("{not json".into())).await.unwrap();
    let error = client.next().await;
    assert_eq!((error["code"].as_str(), error["id"].is_null()), (Some("bad_json"), true));

    // A second agent cannot take a chat the first accepted.
    let mut customer = Client::connect(&url, "customer").await;
    let start = json!({ "widget_key": "k", "group": "g0", "name": "Ann", "question": "Hi?" });
    let conversation = customer.request("chat.start", start).await["conversation"].as_str().unwrap().to_owned();
    let mut first = Client::connect(&url, "first").await;
    let mut second = Client::connect(&url, "second").await;
    for agent in [&mut first, &mut second] {
        agent.request("agent.sign_in", json!({ "token": format!("load-agent-token-{}", agent.name) })).await;
        agent.next().await;
    }
    first.request("chat.accept", json!({ "conversation": conversation })).await;
    let id = second.send("chat.accept", json!({ "conversation": conversation })).await;
    let taken = second.next().await;
    assert_eq!((taken["id"].as_str(), taken["code"].as_str()), (Some(id.as_str()), Some("chat_taken")));
}
