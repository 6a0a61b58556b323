//! WebSocket connections that speak the public protocol (docs/protocol.md): the `welcome` frame, requests
//! answered by exactly one `ack` or `error` with the same `id` (pipelined, matched by id), and pushes.
//!
//! Each connection has a reader task that matches answers to requests, checks the seq order of every
//! `event` it receives, hands events to the scenario's [`EventObserver`] and, when asked, the other pushes
//! to a channel. Nothing the server sends can make it panic: a frame it cannot read is counted as an error.
//!
//! The reader also checks what the protocol promises of every connection: each request is answered once
//! (a second answer, or one to a request never sent, is a violation; an answer after the request timed out
//! is counted as late), and a connection receives the events only of the conversations that an ack of its
//! own named (its `chat.start`, `chat.accept` or `chat.subscribe`, which the protocol writes before their
//! events; any ack that names a chat counts): another conversation's event is one delivered to the wrong
//! socket.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::future::BoxFuture;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::invariants::{SeqChecker, Side};
use crate::metrics::{Metrics, lock};

type Socket = WebSocketStream<TcpStream>;

/// What a connection is to the server: a chat's customer, an agent console, or nothing yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Anonymous,
    Side(Side),
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Anonymous => "anonymous",
            Role::Side(side) => side.name(),
        }
    }
}

/// Sees every conversation event a connection receives, after its seq was checked.
pub trait EventObserver: Send + Sync {
    fn on_event(&self, role: Role, conversation: &str, event: &Value, at: Instant);
}

/// For connections whose events nobody looks at (beyond the seq check).
#[derive(Debug)]
pub struct IgnoreEvents;

impl EventObserver for IgnoreEvents {
    fn on_event(&self, _role: Role, _conversation: &str, _event: &Value, _at: Instant) {}
}

/// A push other than an event (`queue.added`, `offer`, …), with the time it was read.
#[derive(Debug)]
pub struct Push {
    pub at: Instant,
    pub kind: String,
    pub frame: Value,
}

/// An `ack`, with the time it was read.
#[derive(Debug, Clone)]
pub struct Ack {
    pub at: Instant,
    pub frame: Value,
}

#[derive(Debug, Clone)]
pub enum RequestError {
    /// The server answered with an `error` frame.
    Refused {
        code: String,
        max_sessions: Option<u64>,
        at: Instant,
    },
    Closed,
    Timeout,
    Send,
}

impl RequestError {
    /// The key of this error in `errors_by_reason`.
    pub fn reason(&self) -> String {
        match self {
            RequestError::Refused { code, .. } => code.clone(),
            RequestError::Closed => "connection_closed".into(),
            RequestError::Timeout => "request_timeout".into(),
            RequestError::Send => "send_failed".into(),
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            RequestError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub enum ConnectError {
    Tcp(std::io::Error),
    /// The source address (`None`: the one the kernel chose) has no ephemeral port left towards the server,
    /// and there is none to move on to.
    NoPort(Option<IpAddr>),
    /// A source address that cannot be bound for another reason than its ports (not this machine's, say).
    Source(IpAddr, std::io::Error),
    Handshake(String),
    /// The server closed the connection before its welcome, with this close code (1013: it serves as many
    /// connections as it may; 1001: it is shutting down).
    Closed(u16),
    NoWelcome(String),
    Timeout,
}

impl ConnectError {
    pub fn reason(&self) -> String {
        match self {
            ConnectError::Tcp(error) => format!("connect: {}", error.kind()),
            ConnectError::NoPort(_) => "no_source_port".into(),
            ConnectError::Source(_, error) => format!("source_address: {}", error.kind()),
            ConnectError::Handshake(_) => "websocket_handshake_failed".into(),
            ConnectError::Closed(code) => format!("closed_{code}"),
            ConnectError::NoWelcome(_) => "no_welcome".into(),
            ConnectError::Timeout => "connect_timeout".into(),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Tcp(error) => write!(f, "cannot connect: {error}"),
            ConnectError::NoPort(Some(source)) => {
                write!(f, "no ephemeral port left from {source}: give more addresses with --source-addrs")
            }
            ConnectError::NoPort(None) => {
                write!(f, "no ephemeral port left: give source addresses with --source-addrs")
            }
            ConnectError::Source(source, error) => write!(f, "cannot bind to the source address {source}: {error}"),
            ConnectError::Handshake(error) => write!(f, "websocket handshake failed: {error}"),
            ConnectError::Closed(code) => write!(f, "the server closed the connection ({code}) before its welcome"),
            ConnectError::NoWelcome(first) => write!(f, "the server did not send welcome first, but {first}"),
            ConnectError::Timeout => write!(f, "no welcome within the request timeout"),
        }
    }
}

struct Target {
    url: String,
    address: SocketAddr,
}

/// How many more loopback source addresses a run may move on to when ports run short.
const MAX_LOOPBACK_SOURCES: u32 = 4096;

/// The `n`th loopback address after 127.0.0.1 (127.0.0.1 itself for 0, then 127.0.0.2, …, 127.0.1.0, …):
/// every 127/8 address is this machine's, each with its own ephemeral ports towards the same server address.
fn loopback_source(n: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::LOCALHOST).wrapping_add(n)))
}

/// Where connections go: the gateways in turn, each socket bound to the next source address.
///
/// Without `--source-addrs`, towards servers on IPv4 loopback, connections come from 127.0.0.1 until its
/// ephemeral ports run short (about 28,000 connections to one address; `DialError::ports_ran_short`), then from
/// 127.0.0.2, and so on.
pub struct Network {
    targets: Vec<Target>,
    sources: Vec<IpAddr>,
    next_target: AtomicUsize,
    next_source: AtomicUsize,
    /// Whether to move on to another loopback source when ports run short (see above).
    auto_sources: bool,
    /// The loopback source connections come from now: 0 is the kernel's choice (127.0.0.1), n is
    /// [`loopback_source`]`(n)`.
    auto_source: AtomicU32,
    /// Connects a socket: the kernel's `connect`, or in unit tests one that runs out of ports on demand.
    dial: Dial,
    pub timeout: Duration,
    metrics: Arc<Metrics>,
}

/// How a new socket is bound to a source address (any port), if one is given, and connected to an address.
type Dial = Arc<
    dyn Fn(TcpSocket, Option<IpAddr>, SocketAddr) -> BoxFuture<'static, Result<TcpStream, DialError>> + Send + Sync,
>;

/// The step of a dial that failed.
#[derive(Debug)]
enum DialError {
    Bind(std::io::Error),
    Connect(std::io::Error),
}

impl DialError {
    /// Whether the source address has no ephemeral port left towards the server: the `connect` of an
    /// unbound socket fails with `EADDRNOTAVAIL` (and so does that of a bound socket whose four-tuple is
    /// taken), a `bind` to a source address and port 0 with `EADDRINUSE`. (A bind's `EADDRNOTAVAIL` is
    /// another matter: the address is not this machine's.)
    fn ports_ran_short(&self) -> bool {
        match self {
            DialError::Bind(error) => error.kind() == std::io::ErrorKind::AddrInUse,
            DialError::Connect(error) => error.kind() == std::io::ErrorKind::AddrNotAvailable,
        }
    }
}

fn kernel_dial() -> Dial {
    Arc::new(|socket: TcpSocket, source, address| {
        async move {
            if let Some(source) = source {
                socket.bind(SocketAddr::new(source, 0)).map_err(DialError::Bind)?;
            }
            socket.connect(address).await.map_err(DialError::Connect)
        }
        .boxed()
    })
}

impl Network {
    /// Resolves every `ws://HOST:PORT/PATH` once, at the start.
    pub async fn resolve(
        urls: &[String],
        sources: Vec<IpAddr>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Network> {
        let mut targets = Vec::new();
        for url in urls {
            let Some(rest) = url.strip_prefix("ws://") else {
                bail!(
                    "--url {url}: expected ws://HOST:PORT/v1/ws (wss:// is not supported: put the load generator behind the TLS proxy)"
                );
            };
            let host_port = rest.split('/').next().unwrap_or_default();
            let host_port = if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:80") };
            let address = tokio::net::lookup_host(&host_port)
                .await
                .with_context(|| format!("--url {url}: cannot resolve {host_port}"))?
                .next()
                .with_context(|| format!("--url {url}: {host_port} has no address"))?;
            targets.push(Target { url: url.clone(), address });
        }
        if targets.is_empty() {
            bail!("give the server with --url ws://HOST:PORT/v1/ws");
        }
        let auto_sources = sources.is_empty()
            && targets.iter().all(|target| matches!(target.address.ip(), IpAddr::V4(ip) if ip.is_loopback()));
        Ok(Network {
            targets,
            sources,
            next_target: AtomicUsize::new(0),
            next_source: AtomicUsize::new(0),
            auto_sources,
            auto_source: AtomicU32::new(0),
            dial: kernel_dial(),
            timeout,
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Opens a connection and reads its `welcome`. With `pushes`, the pushes other than events are handed
    /// to [`Connection::pushes`].
    pub async fn connect(
        &self,
        role: Role,
        observer: Arc<dyn EventObserver>,
        pushes: bool,
    ) -> Result<Connection, ConnectError> {
        let target = &self.targets[self.next_target.fetch_add(1, Ordering::Relaxed) % self.targets.len()];
        let handshake = async {
            let stream = self.connect_tcp(target.address).await?;
            stream.set_nodelay(true).map_err(ConnectError::Tcp)?;
            // Small buffers: an idle session must cost the load generator little.
            let config = WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(0);
            let (socket, _) = client_async_with_config(target.url.as_str(), stream, Some(config))
                .await
                .map_err(|error| ConnectError::Handshake(error.to_string()))?;
            let (sink, mut stream) = socket.split();
            let first = stream.next().await;
            let welcome_at = Instant::now();
            match first {
                Some(Ok(Message::Text(text)))
                    if serde_json::from_str::<Value>(&text).is_ok_and(|frame| frame["type"] == "welcome") =>
                {
                    Ok((sink, stream, welcome_at))
                }
                Some(Ok(Message::Close(Some(close)))) => Err(ConnectError::Closed(close.code.into())),
                other => Err(ConnectError::NoWelcome(format!("{other:?}").chars().take(200).collect())),
            }
        };
        let (sink, stream, welcome_at) =
            tokio::time::timeout(self.timeout, handshake).await.map_err(|_| ConnectError::Timeout)??;
        let shared = Arc::new(Shared::default());
        let (push_tx, push_rx) = if pushes {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let reader = Reader { role, shared: shared.clone(), observer, pushes: push_tx, metrics: self.metrics.clone() };
        let reader = tokio::spawn(reader.run(stream));
        Ok(Connection {
            sink: tokio::sync::Mutex::new(sink),
            shared,
            reader,
            pushes: push_rx,
            welcome_at,
            timeout: self.timeout,
        })
    }
}

impl Network {
    /// A TCP connection to `address` from the next source address (see [`Network`]).
    async fn connect_tcp(&self, address: SocketAddr) -> Result<TcpStream, ConnectError> {
        loop {
            let socket = match address {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            }
            .map_err(ConnectError::Tcp)?;
            let auto = self.auto_source.load(Ordering::Relaxed);
            let source = if !self.sources.is_empty() {
                Some(self.sources[self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len()])
            } else {
                (auto > 0).then(|| loopback_source(auto))
            };
            match (self.dial)(socket, source, address).await {
                Ok(stream) => return Ok(stream),
                Err(error) if !error.ports_ran_short() => {
                    return Err(match (error, source) {
                        (DialError::Bind(error), Some(source)) => ConnectError::Source(source, error),
                        (DialError::Bind(error) | DialError::Connect(error), _) => ConnectError::Tcp(error),
                    });
                }
                Err(_) if self.auto_sources && auto < MAX_LOOPBACK_SOURCES => {
                    // Another connection may have moved on already: then this one follows it.
                    if self.auto_source.compare_exchange(auto, auto + 1, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                        let (from, to) = (loopback_source(auto), loopback_source(auto + 1));
                        eprintln!("\nthe ports from {from} ran short: connecting from {to} on");
                    }
                }
                // Nowhere to move on to: addresses given with --source-addrs are kept to, short or not, and
                // so is the kernel's choice towards a server elsewhere.
                Err(_) => return Err(ConnectError::NoPort(source)),
            }
        }
    }
}

type Answer = Result<Ack, RequestError>;

/// The requests of a connection that the server has not answered.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, Waiting>,
    /// Requests that timed out unanswered: an answer may still come, once (and whether it follows a chat).
    timed_out: HashMap<u64, bool>,
}

/// A request sent, waiting for its answer.
struct Waiting {
    answer: oneshot::Sender<Answer>,
    /// Whether its ack makes the connection follow the chat it names (docs/protocol.md: the requests after
    /// whose ack the chat's events are written to the connection).
    follows: bool,
}

/// The requests whose ack makes the connection follow the chat it names. A `chat.transcript` names a chat
/// too, but its events come inside its ack, not after it.
fn follows(request_type: &str) -> bool {
    matches!(request_type, "chat.start" | "customer.resume" | "chat.accept" | "chat.subscribe")
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    /// We are closing it: the end of the stream is not an error.
    closing: AtomicBool,
    /// The reader has stopped.
    ended: AtomicBool,
}

/// One WebSocket to the server.
pub struct Connection {
    sink: tokio::sync::Mutex<SplitSink<Socket, Message>>,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    /// The pushes other than events, when asked for at connect.
    pub pushes: Option<mpsc::UnboundedReceiver<Push>>,
    pub welcome_at: Instant,
    timeout: Duration,
}

impl Connection {
    /// Sends a request (`fields` is a JSON object without `type` and `id`) and waits for its answer.
    pub async fn request(&self, request_type: &str, fields: Value) -> Result<Ack, RequestError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut frame = match fields {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        frame.insert("type".into(), request_type.into());
        frame.insert("id".into(), id.to_string().into());
        let (answer_tx, answer_rx) = oneshot::channel();
        let waiting = Waiting { answer: answer_tx, follows: follows(request_type) };
        lock(&self.shared.pending).waiting.insert(id, waiting);
        if self.shared.ended.load(Ordering::Acquire) {
            lock(&self.shared.pending).waiting.remove(&id);
            return Err(RequestError::Closed);
        }
        let text = Value::Object(frame).to_string();
        let sent = self.sink.lock().await.send(Message::text(text)).await;
        if sent.is_err() {
            lock(&self.shared.pending).waiting.remove(&id);
            return Err(RequestError::Send);
        }
        match tokio::time::timeout(self.timeout, answer_rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(RequestError::Closed),
            Err(_) => {
                let mut pending = lock(&self.shared.pending);
                // (Unless the answer came as the time ran out: the reader took it, and it is dropped here.)
                if let Some(waiting) = pending.waiting.remove(&id) {
                    pending.timed_out.insert(id, waiting.follows);
                }
                Err(RequestError::Timeout)
            }
        }
    }

    /// Whether the server has not closed it.
    pub fn is_open(&self) -> bool {
        !self.shared.ended.load(Ordering::Acquire)
    }

    /// Closes it with a close frame and waits (briefly) for the server's.
    pub async fn close(mut self) {
        self.shared.closing.store(true, Ordering::Release);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.sink.lock().await.close().await;
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.reader.abort();
    }
}

struct Reader {
    role: Role,
    shared: Arc<Shared>,
    observer: Arc<dyn EventObserver>,
    pushes: Option<mpsc::UnboundedSender<Push>>,
    metrics: Arc<Metrics>,
}

impl Reader {
    async fn run(self, mut stream: SplitStream<Socket>) {
        let mut seqs = SeqChecker::default();
        let mut followed = HashSet::new();
        let ended_by = loop {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => self.frame(&text, Instant::now(), &mut seqs, &mut followed),
                Some(Ok(Message::Binary(_))) => self.metrics.error("binary_frame_from_server"),
                Some(Ok(Message::Close(frame))) => {
                    break frame.map_or("closed_without_code".to_owned(), |f| format!("closed_{}", u16::from(f.code)));
                }
                Some(Ok(_)) => {} // ping, pong: tungstenite answers pings itself
                Some(Err(_)) => break "connection_lost".to_owned(),
                None => break "connection_eof".to_owned(),
            }
        };
        self.shared.ended.store(true, Ordering::Release);
        if !self.shared.closing.load(Ordering::Acquire) {
            self.metrics.error(&ended_by);
        }
        // Waiting requests fail with `Closed`.
        lock(&self.shared.pending).waiting.clear();
    }

    /// One frame from the server; `followed` are the conversations the acks of this connection named.
    fn frame(&self, text: &str, at: Instant, seqs: &mut SeqChecker, followed: &mut HashSet<String>) {
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            self.metrics.error("unreadable_frame_from_server");
            return;
        };
        let kind = frame["type"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "ack" => {
                // The chat's events come after the ack (the reader handles frames in order).
                let named = [&frame["conversation"], &frame["chat"]["conversation"]];
                let named: Vec<String> =
                    named.into_iter().filter_map(|named| named.as_str().map(str::to_owned)).collect();
                if self.answer(&kind, frame, at) {
                    followed.extend(named);
                }
            }
            "error" => {
                self.answer(&kind, frame, at);
            }
            "event" => {
                let conversation = frame["conversation"].as_str();
                let seq = frame["event"]["seq"].as_u64();
                let (Some(conversation), Some(seq)) = (conversation, seq) else {
                    self.metrics.error("event_without_conversation_or_seq");
                    return;
                };
                if !followed.contains(conversation) {
                    self.metrics.violation(format!(
                        "conversation {conversation}: event seq {seq} delivered to a {} connection that never started, \
                         accepted or subscribed to it",
                        self.role.name()
                    ));
                    return;
                }
                if let Err(violation) = seqs.observe(conversation, seq) {
                    self.metrics.violation(violation);
                }
                self.observer.on_event(self.role, conversation, &frame["event"], at);
            }
            "welcome" => self.metrics.error("second_welcome"),
            _ => {
                if let Some(pushes) = &self.pushes {
                    let _ = pushes.send(Push { at, kind, frame });
                }
            }
        }
    }

    /// Hands an answer to its request; whether the request was one that follows the chat its ack names.
    fn answer(&self, kind: &str, frame: Value, at: Instant) -> bool {
        let Some(id) = frame["id"].as_str().and_then(|id| id.parse::<u64>().ok()) else {
            let code = frame["code"].as_str().unwrap_or("?");
            self.metrics.error(&format!("error_without_id: {code}"));
            return false;
        };
        let waiting = {
            let mut pending = lock(&self.shared.pending);
            match pending.waiting.remove(&id) {
                Some(waiting) => waiting,
                None => {
                    if let Some(follows) = pending.timed_out.remove(&id) {
                        // Its error (a timeout) was counted then; what it did on the server stands.
                        self.metrics.count("late_answers", 1);
                        return follows;
                    } else {
                        self.metrics.violation(format!(
                            "an {kind} for request {id} of a {} connection, which was answered already or never \
                             sent",
                            self.role.name()
                        ));
                    }
                    return false;
                }
            }
        };
        let answer = if kind == "ack" {
            Ok(Ack { at, frame })
        } else {
            let code = frame["code"].as_str().unwrap_or("error_without_code").to_owned();
            Err(RequestError::Refused { code, max_sessions: frame["max_sessions"].as_u64(), at })
        };
        let _ = waiting.answer.send(answer);
        waiting.follows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::Side;
    use serde_json::json;

    /// An agent's connection reads a chat's transcript, then subscribes to another chat: an event of the
    /// first is a violation (its transcript came inside the ack; nothing follows it), one of the second is not.
    #[test]
    fn only_the_requests_that_follow_a_chat_let_its_events_in() {
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared::default());
        let reader = Reader {
            role: Role::Side(Side::Agent),
            shared: shared.clone(),
            observer: Arc::new(IgnoreEvents),
            pushes: None,
            metrics: metrics.clone(),
        };
        for (id, request) in [(1, "chat.transcript"), (2, "chat.subscribe")] {
            let (answer, _) = oneshot::channel();
            lock(&shared.pending).waiting.insert(id, Waiting { answer, follows: follows(request) });
        }
        let (mut seqs, mut followed) = (SeqChecker::default(), HashSet::new());
        let mut read = |frame: Value| reader.frame(&frame.to_string(), Instant::now(), &mut seqs, &mut followed);
        let event =
            |conversation: &str| json!({ "type": "event", "conversation": conversation, "event": { "seq": 1 } });
        read(json!({ "type": "ack", "id": "1", "chat": { "conversation": "read" }, "events": [], "more": false }));
        read(event("read"));
        read(json!({ "type": "ack", "id": "2", "chat": { "conversation": "followed" } }));
        read(event("followed"));
        let violations = metrics.snapshot().violations;
        assert_eq!(violations.total, 1, "{:?}", violations.first);
        assert!(violations.first[0].contains("conversation read: event seq 1"), "{:?}", violations.first);
    }

    #[test]
    fn loopback_sources_count_up_from_127_0_0_1() {
        let at = |n| loopback_source(n).to_string();
        assert_eq!(
            (at(0), at(1), at(254), at(255)),
            ("127.0.0.1".into(), "127.0.0.2".into(), "127.0.0.255".into(), "127.0.1.0".into())
        );
    }

    async fn network(url: &str, sources: Vec<IpAddr>) -> Network {
        Network::resolve(&[url.to_owned()], sources, Duration::from_secs(5), Arc::new(Metrics::new())).await.unwrap()
    }

    /// Connects through `network` and answers where the server saw the connection come from.
    async fn seen_from(network: &Network, listener: &tokio::net::TcpListener) -> IpAddr {
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(network.connect_tcp(address), listener.accept());
        drop(client.unwrap());
        accepted.unwrap().1.ip()
    }

    #[tokio::test]
    async fn connections_come_from_the_source_addresses_given_or_chosen_when_ports_ran_short() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
        let given = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
        let explicit = network(&url, given.clone()).await;
        assert!(!explicit.auto_sources, "addresses given: only those");
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(seen_from(&explicit, &listener).await);
        }
        assert_eq!(seen, vec![given[0], given[1], given[0]]);

        let automatic = network(&url, Vec::new()).await;
        assert!(automatic.auto_sources, "a server on loopback");
        assert_eq!(seen_from(&automatic, &listener).await, loopback_source(0));
        // As after the ports of 127.0.0.1 to 127.0.0.5 ran short.
        automatic.auto_source.store(5, Ordering::Relaxed);
        assert_eq!(seen_from(&automatic, &listener).await.to_string(), "127.0.0.6");
        // A server elsewhere is reached as the routes say, from whichever address they give.
        assert!(!network("ws://10.0.0.1:1/v1/ws", Vec::new()).await.auto_sources);
    }

    /// The kernel's dial, except that the ports of the first `short` loopback sources have run out, as they
    /// do after some 28,000 connections: the connect of an unbound socket (the kernel picks 127.0.0.1) fails
    /// with `EADDRNOTAVAIL`, the bind to another source with `EADDRINUSE`. (`tests/scenarios.rs` meets the
    /// kernel's own, in a namespace with ten ports.)
    fn ports_short_on_first(short: u32) -> Dial {
        Arc::new(move |socket: TcpSocket, source: Option<IpAddr>, address| {
            async move {
                let short_of = std::io::Error::from;
                let (from, error) = match source {
                    None => (0, DialError::Connect(short_of(std::io::ErrorKind::AddrNotAvailable))),
                    Some(IpAddr::V4(ip)) => (
                        u32::from(ip) - u32::from(std::net::Ipv4Addr::LOCALHOST),
                        DialError::Bind(short_of(std::io::ErrorKind::AddrInUse)),
                    ),
                    Some(IpAddr::V6(_)) => (u32::MAX, DialError::Bind(short_of(std::io::ErrorKind::AddrInUse))),
                };
                if from < short {
                    // As a connect does: the others begin theirs before this one fails.
                    tokio::task::yield_now().await;
                    return Err(error);
                }
                kernel_dial()(socket, source, address).await
            }
            .boxed()
        })
    }

    #[tokio::test]
    async fn connections_move_on_to_the_next_loopback_source_when_one_has_no_port_left() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut net = network(&format!("ws://{address}/v1/ws"), Vec::new()).await;
        net.dial = ports_short_on_first(3);

        // Twenty connections at once all meet the shortage at 127.0.0.1; each source is given up once,
        // not once per connection, so none skips past the first source that has ports.
        let connects = futures_util::future::join_all((0..20).map(|_| net.connect_tcp(address)));
        let accepts = async {
            let mut seen = Vec::new();
            for _ in 0..20 {
                seen.push(listener.accept().await.unwrap().1.ip().to_string());
            }
            seen
        };
        let (clients, seen) = tokio::join!(connects, accepts);
        assert!(clients.iter().all(Result::is_ok), "{clients:?}");
        assert_eq!(seen, vec!["127.0.0.4".to_owned(); 20]);
        assert_eq!(net.auto_source.load(Ordering::Relaxed), 3);

        // With no source left to move on to, the error is the connection's.
        net.auto_source.store(MAX_LOOPBACK_SOURCES, Ordering::Relaxed);
        net.dial = ports_short_on_first(u32::MAX);
        let error = net.connect_tcp(address).await.unwrap_err();
        assert!(matches!(error, ConnectError::NoPort(Some(source)) if source == loopback_source(MAX_LOOPBACK_SOURCES)));
        assert_eq!(error.reason(), "no_source_port");
        // Addresses given with --source-addrs are kept to, short or not.
        let given: IpAddr = "127.0.0.2".parse().unwrap();
        let mut explicit = network(&format!("ws://{address}/v1/ws"), vec![given]).await;
        explicit.dial = ports_short_on_first(2);
        let error = explicit.connect_tcp(address).await.unwrap_err();
        assert!(matches!(error, ConnectError::NoPort(Some(source)) if source == given), "{error:?}");
        // Any other failure is the connection's, as it is.
        let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let error = network(&format!("ws://{refused}/v1/ws"), Vec::new()).await.connect_tcp(refused).await.unwrap_err();
        assert!(
            matches!(&error, ConnectError::Tcp(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{error:?}"
        );
        // A source that is not this machine's fails its bind with the kernel's EADDRNOTAVAIL: said so, not
        // taken for ports run short.
        let foreign: IpAddr = "192.0.2.1".parse().unwrap();
        let error =
            network(&format!("ws://{address}/v1/ws"), vec![foreign]).await.connect_tcp(address).await.unwrap_err();
        assert!(matches!(&error, ConnectError::Source(source, _) if *source == foreign), "{error:?}");
        assert_eq!(error.reason(), "source_address: address not available");
    }
}
