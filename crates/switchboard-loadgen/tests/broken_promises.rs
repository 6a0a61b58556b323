//! The load generator against a server that breaks one of the protocol's promises on purpose: the run must
//! report it as a violation and exit 1. The same server keeping its promises gives a clean run, so each
//! failure below is its broken promise's and nothing else's.
//!
//! The server speaks just enough of the protocol (docs/protocol.md) for the `license` scenario: `welcome`,
//! `chat.start` (admitted up to its limit, else `license_exhausted`), the new chat's events, `chat.close`.
//! Every connection's checks (answers, events) run in the load generator's reader, whatever the scenario.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const LOADGEN: &str = env!("CARGO_BIN_EXE_switchboard-loadgen");
const LIMIT: u64 = 5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// One chat more than the limit is admitted.
    AdmitsOneMore,
    /// The first two closes are refused, but their permits are let go all the same.
    FreesPermitsOfFailedCloses,
    /// The first chat's events come as seq 1, 3, 2.
    EventsOutOfOrder,
    /// The first chat's events start at seq 2.
    FirstEventMissed,
    /// The first customer also gets an event of a chat that is not theirs.
    EventOfAnotherChat,
    /// The first `chat.close` is answered twice.
    AnswersTwice,
    /// Not a broken promise: every third connection is closed at once, before its welcome, with 1013 (a
    /// gateway serving as many connections as it may).
    Full,
}

struct FakeServer {
    fault: Fault,
    /// Chats open now (the permits held).
    open: AtomicU64,
    closes: AtomicU64,
    chats: AtomicU64,
    connections: AtomicU64,
    /// The fault that concerns one chat was done.
    done: AtomicBool,
}

impl FakeServer {
    /// Serves on a free loopback port; answers the WebSocket URL.
    async fn start(fault: Fault) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
        let server = Arc::new(FakeServer {
            fault,
            open: AtomicU64::new(0),
            closes: AtomicU64::new(0),
            chats: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            done: AtomicBool::new(false),
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(server.clone().serve(stream));
            }
        });
        url
    }

    /// Whether the one-chat fault is to be done now (the first time only).
    fn once(&self, fault: Fault) -> bool {
        self.fault == fault && !self.done.swap(true, Ordering::SeqCst)
    }

    async fn serve(self: Arc<Self>, stream: TcpStream) {
        let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else { return };
        if self.fault == Fault::Full && self.connections.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
            let full = CloseFrame { code: CloseCode::Again, reason: "full: try again later".into() };
            let _ = socket.send(Message::Close(Some(full))).await;
            return;
        }
        let mut out = vec![json!({ "type": "welcome", "protocol": 1 })];
        loop {
            for frame in out.drain(..) {
                if socket.send(Message::text(frame.to_string())).await.is_err() {
                    return;
                }
            }
            let Some(Ok(Message::Text(text))) = socket.next().await else { return };
            let Ok(request) = serde_json::from_str::<Value>(&text) else { return };
            self.answer(&request, &mut out);
        }
    }

    fn answer(&self, request: &Value, out: &mut Vec<Value>) {
        let id = request["id"].clone();
        match request["type"].as_str() {
            Some("chat.start") => {
                let limit = if self.fault == Fault::AdmitsOneMore { LIMIT + 1 } else { LIMIT };
                let admitted = self
                    .open
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| (open < limit).then_some(open + 1));
                if admitted.is_err() {
                    out.push(json!({
                        "type": "error", "id": id, "code": "license_exhausted", "message": "all in use",
                        "retryable": false, "max_sessions": LIMIT,
                    }));
                    return;
                }
                let conversation = format!("chat-{}", self.chats.fetch_add(1, Ordering::SeqCst));
                let chat = json!({ "conversation": conversation, "state": "queued", "last_seq": 2 });
                out.push(json!({
                    "type": "ack", "id": id, "conversation": conversation, "customer_token": "t", "chat": chat,
                    "subscribed": true, "duplicate": false,
                }));
                let event =
                    |seq: u64| json!({ "type": "event", "conversation": conversation, "event": { "seq": seq } });
                if self.once(Fault::EventsOutOfOrder) {
                    out.extend([event(1), event(3), event(2)]);
                } else if self.once(Fault::FirstEventMissed) {
                    out.push(event(2));
                } else if self.once(Fault::EventOfAnotherChat) {
                    out.extend([event(1), event(2)]);
                    out.push(json!({ "type": "event", "conversation": "someone-else", "event": { "seq": 1 } }));
                } else {
                    out.extend([event(1), event(2)]);
                }
            }
            Some("chat.close") => {
                self.open.fetch_sub(1, Ordering::SeqCst);
                let closes = self.closes.fetch_add(1, Ordering::SeqCst);
                if self.fault == Fault::FreesPermitsOfFailedCloses && closes < 2 {
                    out.push(
                        json!({ "type": "error", "id": id, "code": "internal", "message": "oops", "retryable": true }),
                    );
                    return;
                }
                let ack = json!({ "type": "ack", "id": id, "chat": { "conversation": request["conversation"] } });
                if self.once(Fault::AnswersTwice) {
                    out.push(ack.clone());
                }
                out.push(ack);
            }
            _ => out.push(json!({ "type": "error", "id": id, "code": "bad_request", "message": "not here" })),
        }
    }
}

struct Run {
    code: i32,
    violations: Vec<String>,
    errors: Value,
    output: String,
}

/// Two rounds of the `license` scenario against a fake server with `fault`.
async fn license_run(fault: Fault) -> Run {
    let url = FakeServer::start(fault).await;
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("report.json");
        let output = Command::new(LOADGEN)
            .args(["license", "--url", &url, "--limit", &LIMIT.to_string(), "--burst", "8", "--rounds", "2"])
            .args(["--request-timeout-s", "5", "--quiet", "--report"])
            .arg(&report)
            .output()
            .unwrap();
        let output_text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_default())
            .unwrap_or_else(|_| panic!("no report: {output_text}"));
        let violations = report["invariants"]["violations"]
            .as_array()
            .map(|all| all.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let errors = report["errors_by_reason"].clone();
        Run { code: output.status.code().unwrap_or(-1), violations, errors, output: output_text }
    })
    .await
    .unwrap()
}

/// The run exits 1 and reports a violation that contains `expected`.
async fn assert_caught(fault: Fault, expected: &str) {
    let run = license_run(fault).await;
    assert_eq!(run.code, 1, "exit code: {}", run.output);
    assert!(
        run.violations.iter().any(|violation| violation.contains(expected)),
        "{expected:?} in {:?}",
        run.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_keeps_its_promises_gives_a_clean_run() {
    let run = license_run(Fault::None).await;
    assert_eq!((run.code, run.violations.len()), (0, 0), "{:?}\n{}", run.violations, run.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_admitted_above_the_limit_is_caught() {
    assert_caught(Fault::AdmitsOneMore, "6 chats admitted, above the limit of 5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_whose_close_failed_still_count_against_the_limit_of_the_next_round() {
    // The second round alone looks exact (5 of 8 admitted): only the chats left open say otherwise.
    assert_caught(Fault::FreesPermitsOfFailedCloses, "5 chats admitted while 2 admitted before were still open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_out_of_order_are_caught() {
    assert_caught(Fault::EventsOutOfOrder, "seq 2 received after seq 3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_whose_first_events_never_came_is_caught() {
    assert_caught(Fault::FirstEventMissed, "seq 2 was the first event on a socket, not seq 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_delivered_to_a_socket_not_in_its_chat_is_caught() {
    assert_caught(
        Fault::EventOfAnotherChat,
        "conversation someone-else: event seq 1 delivered to a customer connection",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answered_twice_is_caught() {
    assert_caught(Fault::AnswersTwice, "which was answered already or never sent").await;
}

/// A connection the server closes before its welcome is an error of its close code, not a broken promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_before_their_welcome_are_errors_of_their_close_code() {
    let run = license_run(Fault::Full).await;
    assert!(run.violations.is_empty(), "{:?}\n{}", run.violations, run.output);
    let closed = run.errors["closed_1013"].as_u64().unwrap_or(0);
    assert!(closed > 0, "errors: {}\n{}", run.errors, run.output);
    assert_eq!(run.errors.get("no_welcome"), None, "errors: {}", run.errors);
}
