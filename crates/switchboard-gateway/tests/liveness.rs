//! Connections that are open but take no part are found: a WebSocket client that sends nothing is pinged,
//! and one that then answers nothing, not even the pong its WebSocket stack answers a ping with, is
//! disconnected with 4009 and leaves presence (its process hangs, or it stopped reading). gRPC clients are
//! pinged by HTTP/2 under the same rule; a connection has as long to say which protocol it speaks, and an
//! HTTP/1.1 request as long for its headers. TCP
//! keepalive finds the peers that are gone (`tests/e2e/tests/connections.rs`); these are still there. A client
//! closed while it still sends gets its close, not a reset.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{BOB, DEADLINE, GrpcClient, Req, Server, WsClient, pb, sign_in};
use serde_json::json;
use switchboard_gateway::{CLOSE_UNRESPONSIVE, GatewaySettings, Served};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tonic::transport::Endpoint;

fn settings() -> GatewaySettings {
    GatewaySettings { idle_ping: Duration::from_millis(200), ..GatewaySettings::default() }
}

/// `switchboard_gateway_unresponsive_disconnects_total{transport}` as this process's recorder shows it (the
/// tests of this file run at once; one test only of each transport expects a count).
fn unresponsive_disconnects(transport: &str) -> u64 {
    switchboard_telemetry::install_metrics("gateway");
    let exposition = switchboard_telemetry::render_metrics();
    let line = format!("switchboard_gateway_unresponsive_disconnects_total{{transport=\"{transport}\"}} ");
    let count = exposition.lines().find_map(|sample| sample.strip_prefix(&line));
    count.map_or(0, |count| count.trim().parse().expect("a count"))
}

async fn until(what: &str, condition: impl Fn() -> bool) {
    let reached = tokio::time::timeout(DEADLINE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    reached.await.unwrap_or_else(|_| panic!("{what} before the deadline"));
}

/// The close frame that ends `bytes` (server frames are not masked): its code.
fn closing_code(bytes: &[u8]) -> Option<u16> {
    (0..bytes.len().saturating_sub(3)).find_map(|at| {
        let frame = &bytes[at..];
        (frame[0] == 0x88 && usize::from(frame[1]) + 2 == frame.len()).then(|| u16::from_be_bytes([frame[2], frame[3]]))
    })
}

#[tokio::test]
async fn a_quiet_client_whose_stack_answers_pings_stays_connected() {
    let server = Server::start_with(settings()).await;
    let mut bob = WsClient::connect(&server).await;
    bob.ack(json!({ "type": "agent.sign_in", "token": BOB })).await;
    let signed_in = Instant::now();
    // Bob's console sends nothing but the pongs tungstenite answers with: pinged again and again, each time
    // after 200 ms without a frame from it, never disconnected. (Unanswered, the second ping would have been
    // a close.)
    bob.read_pings(4).await;
    let pinged_for = signed_in.elapsed();
    assert!(pinged_for >= Duration::from_millis(3 * 200), "four pings 200 ms of silence apart, not {pinged_for:?}");
    assert_eq!(bob.ack(json!({ "type": "ping" })).await["type"], "ack");
    assert_eq!(server.bobs_connections().await, 1);
    server.stop().await;
}

/// A client's frames are heard as well as its pongs: one that sends requests more often than the ping
/// interval, and never reads (so its stack answers no ping), is never pinged nor disconnected.
#[tokio::test]
async fn a_client_that_sends_requests_but_answers_no_ping_stays_connected() {
    let server = Server::start_with(settings()).await;
    let mut bob = WsClient::connect(&server).await;
    bob.ack(json!({ "type": "agent.sign_in", "token": BOB })).await;
    // Five times the 200 ms a silent client is pinged after, and as long again closed after: a request every
    // 50 ms, and nothing read meanwhile.
    for n in 0..20 {
        let request = format!(r#"{{"id":"r-{n}","type":"ping"}}"#);
        bob.send_raw_frame(0x1, request.as_bytes()).await.expect("still connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bob.send_raw_frame(0x1, br#"{"id":"last","type":"ping"}"#).await.expect("still connected");
    let frames = bob
        .raw_frames_until(|opcode, payload| {
            opcode == 0x1 && String::from_utf8_lossy(payload).contains(r#""id":"last""#)
        })
        .await;
    let controls: Vec<u8> = frames.iter().map(|(opcode, _)| *opcode).filter(|opcode| *opcode != 0x1).collect();
    assert!(controls.is_empty(), "pinged (0x9) or closed (0x8): {controls:?}");
    assert_eq!(frames.len(), 21, "an answer to every request");
    assert_eq!(server.bobs_connections().await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_answers_nothing_is_disconnected_with_4009_and_leaves_presence() {
    let server = Server::start_with(settings()).await;
    let counted = unresponsive_disconnects("websocket");
    let mut bob = WsClient::connect(&server).await;
    bob.ack(json!({ "type": "agent.sign_in", "token": BOB })).await;
    assert_eq!(server.bobs_connections().await, 1);
    // Bob's console hangs: nothing is read from the connection, so no pong is sent.
    let bytes = bob.raw_bytes_until_closed().await;
    let pinged = bytes.windows(2).any(|frame| frame == [0x89, 0x00]);
    assert!(pinged, "an empty ping before the close: {bytes:?}");
    assert_eq!(closing_code(&bytes), Some(CLOSE_UNRESPONSIVE), "{bytes:?}");
    server.until_bob_has(0).await;
    assert_eq!(unresponsive_disconnects("websocket"), counted + 1);
    server.stop().await;
}

/// One gRPC client's connection, passed through a loopback proxy that counts the HTTP/2 pings the server
/// sends and can freeze: from then on nothing more is passed either way (what arrives is read and dropped)
/// and nothing is closed, as with a client whose process hangs.
struct Proxy {
    address: std::net::SocketAddr,
    pings: Arc<AtomicUsize>,
    frozen: Arc<AtomicBool>,
    closed_by_server: Arc<AtomicBool>,
}

impl Proxy {
    async fn to(server: &Server) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            address: listener.local_addr().unwrap(),
            pings: Arc::default(),
            frozen: Arc::default(),
            closed_by_server: Arc::default(),
        };
        let (pings, frozen, closed) = (proxy.pings.clone(), proxy.frozen.clone(), proxy.closed_by_server.clone());
        let upstream = server.addr;
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(upstream).await.unwrap();
            let (mut client_reads, mut client_writes) = client.into_split();
            let (mut server_reads, mut server_writes) = server.into_split();
            let frozen_up = frozen.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0; 16 * 1024];
                while let Ok(read @ 1..) = client_reads.read(&mut buffer).await {
                    if !frozen_up.load(Ordering::SeqCst) && server_writes.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
                std::future::pending::<()>().await;
            });
            let mut buffer = vec![0; 16 * 1024];
            let mut frames = Vec::new();
            loop {
                let read = match server_reads.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => read,
                };
                frames.extend_from_slice(&buffer[..read]);
                pings.fetch_add(take_pings(&mut frames), Ordering::SeqCst);
                if !frozen.load(Ordering::SeqCst) && client_writes.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
            }
            closed.store(true, Ordering::SeqCst);
            // The client's side stays open: a hung client does not close its socket.
            std::future::pending::<()>().await;
        });
        proxy
    }

    async fn client(&self) -> GrpcClient {
        let channel = Endpoint::from_shared(format!("http://{}", self.address)).unwrap().connect().await.unwrap();
        GrpcClient::open(channel).await
    }

    fn pings(&self) -> usize {
        self.pings.load(Ordering::SeqCst)
    }
}

/// Takes the whole HTTP/2 frames off the front of `bytes` (from the server: no connection preface), and
/// counts the pings among them (PING frames without the ACK flag).
fn take_pings(bytes: &mut Vec<u8>) -> usize {
    let mut pings = 0;
    while bytes.len() >= 9 {
        let length = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes.len() < 9 + length {
            break;
        }
        if bytes[3] == 0x6 && bytes[4] & 0x1 == 0 {
            pings += 1;
        }
        bytes.drain(..9 + length);
    }
    pings
}

#[tokio::test]
async fn a_quiet_grpc_client_whose_stack_answers_pings_stays_connected() {
    let server = Server::start_with(settings()).await;
    let proxy = Proxy::to(&server).await;
    let mut bob = proxy.client().await;
    bob.ack(sign_in(BOB)).await;
    let signed_in = Instant::now();
    // Bob's client sends nothing but the answers its HTTP/2 stack gives to pings: pinged again and again,
    // each time after 200 ms without a frame from it (unanswered, the first would have closed it).
    until("four HTTP/2 pings", || proxy.pings() >= 4).await;
    let pinged_for = signed_in.elapsed();
    assert!(pinged_for >= Duration::from_millis(3 * 200), "four pings 200 ms of silence apart, not {pinged_for:?}");
    assert_eq!(bob.ack(Req::Ping(pb::PingRequest {})).await, common::AckResult::Ping(pb::PingResult {}));
    assert_eq!(server.bobs_connections().await, 1);
    assert!(!proxy.closed_by_server.load(Ordering::SeqCst));
    drop(bob);
    server.stop().await;
}

#[tokio::test]
async fn a_grpc_client_that_answers_nothing_is_disconnected_and_leaves_presence() {
    let server = Server::start_with(settings()).await;
    let counted = unresponsive_disconnects("grpc");
    let proxy = Proxy::to(&server).await;
    let mut bob = proxy.client().await;
    bob.ack(sign_in(BOB)).await;
    assert_eq!(server.bobs_connections().await, 1);
    // Bob's client hangs: nothing more reaches it, nothing comes from it, its socket stays open.
    proxy.frozen.store(true, Ordering::SeqCst);
    let pings_before = proxy.pings();
    until("the server closed the connection", || proxy.closed_by_server.load(Ordering::SeqCst)).await;
    assert!(proxy.pings() > pings_before, "pinged before the connection was closed");
    server.until_bob_has(0).await;
    until("the closed connection counted", || unresponsive_disconnects("grpc") == counted + 1).await;
    drop(bob);
    server.stop().await;
}

/// Reads what the server sends until it closes the connection: how long it stayed open.
async fn open_until_closed(mut client: TcpStream, since: Instant) -> Duration {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, client.read_to_end(&mut answer)).await;
    read.expect("the connection closed before the deadline").expect("read to the end");
    since.elapsed()
}

#[tokio::test]
async fn a_request_whose_headers_never_end_is_disconnected() {
    let server = Server::start_with(settings()).await;
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    let connected = Instant::now();
    client.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: switchboard\r\n").await.unwrap();
    let open_for = open_until_closed(client, connected).await;
    assert!(open_for >= Duration::from_millis(200), "given the whole 200 ms for its headers, not {open_for:?}");
    server.stop().await;
}

/// A connection that sends nothing, and one that stops inside HTTP/2's preface, never say which protocol
/// they speak (hyper's server waits for that without a deadline): both are closed, and counted.
#[tokio::test]
async fn connections_that_never_say_which_protocol_they_speak_are_disconnected_and_counted() {
    let server = Server::start_with(settings()).await;
    let counted = unresponsive_disconnects("http");
    let silent = TcpStream::connect(server.addr).await.unwrap();
    let mut halting = TcpStream::connect(server.addr).await.unwrap();
    let connected = Instant::now();
    halting.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for client in [silent, halting] {
        let open_for = open_until_closed(client, connected).await;
        assert!(open_for >= Duration::from_millis(200), "given the whole 200 ms, not {open_for:?}");
    }
    until("both closed connections counted", || unresponsive_disconnects("http") == counted + 2).await;
    server.stop().await;
}

/// A connection still open when the shutdown grace runs out (here a request that never finishes its headers,
/// given far longer than the grace for them) is closed, and the server says so.
#[tokio::test]
async fn connections_still_open_past_the_shutdown_grace_are_closed() {
    let server = Server::start_with_grace(GatewaySettings::default(), Duration::from_millis(200)).await;
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    client.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: switchboard\r\n").await.unwrap();
    let mut quiet = WsClient::connect(&server).await;
    assert_eq!(quiet.ack(json!({ "type": "ping" })).await["type"], "ack");
    // The WebSocket client reads, as clients do: its stack answers the server's close.
    let quiet = tokio::spawn(async move { while quiet.read_or_close().await.is_ok() {} });
    let stopping = Instant::now();
    // The WebSocket is drained (its session's to end, not the server's); the half-sent request is not.
    assert_eq!(server.stop_served().await, Served::GaveUp { connections: 1, sessions: 0 });
    quiet.await.unwrap();
    open_until_closed(client, stopping).await;
}

/// A client still sending when the server closes its connection (here at a shutdown; a slow consumer or an
/// unanswered ping alike) reads the close frame and then an orderly end: the server reads on, discarding, until
/// the client's own close, as RFC 6455 asks. Closed with bytes unread, the socket would be reset by the kernel,
/// and a client whose write failed on the reset would never read the close frame before it.
#[tokio::test]
async fn a_client_still_sending_when_it_is_closed_gets_the_close_and_an_orderly_end() {
    let server = Server::start().await;
    let mut client = WsClient::connect(&server).await;
    server.gateway.drain();
    assert_eq!(client.raw_close_code().await, switchboard_gateway::CLOSE_GOING_AWAY);
    // Requests sent as the close came, then the client's close.
    for id in 0..20 {
        let request = format!(r#"{{"id":"late-{id}","type":"ping"}}"#);
        client.send_raw_frame(0x1, request.as_bytes()).await.expect("the connection was reset as the client sent");
    }
    client.send_raw_frame(0x8, &1000u16.to_be_bytes()).await.expect("the connection was reset as the client closed");
    client.raw_end().await.expect("the connection was reset, not ended in order");
    server.stop().await;
}
