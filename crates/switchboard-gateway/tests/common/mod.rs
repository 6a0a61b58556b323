#![allow(dead_code)] // each test uses a part
//! A gateway over an in-process router on `MemoryStore`, served on a real loopback socket exactly as the
//! binary serves it (`Gateway::routes` through `Gateway::serve`), and two protocol clients: gRPC and WebSocket.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_domain::{
    AgentEntry, AgentId, Clock, Directory, FixedClock, GroupEntry, GroupId, TenantEntry, TenantId,
};
use switchboard_gateway::{Gateway, GatewaySettings, Served};
use switchboard_presence::{MemoryPresence, Presence};
pub use switchboard_proto::public::v1 as pb;
use switchboard_proto::public::v1::chat_service_client::ChatServiceClient;
use switchboard_proto::router::RouterApi;
use switchboard_router::{LeaseSettings, PresenceSettings, Router, RouterSettings};
use switchboard_store::MemoryStore;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

pub use pb::ack::Result as AckResult;
pub use pb::client_frame::Request as Req;
pub use pb::server_frame::Frame;

pub const WIDGET: &str = "acme-widget-key";
pub const ALICE: &str = "alice-token-123";
pub const BOB: &str = "bob-token-12345";
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Group `sales`; agents `alice` and `bob` (sales, capacity 3).
pub fn directory() -> Directory {
    let tenant = TenantId::new("acme").unwrap();
    let sales = GroupId::new("sales").unwrap();
    let agent = |id: &str| {
        let id = AgentId::new(id).unwrap();
        (id.clone(), AgentEntry { id, name: "Agent".into(), groups: vec![sales.clone()], capacity: 3 })
    };
    let entry = TenantEntry {
        id: tenant,
        name: "Acme".into(),
        groups: BTreeMap::from([(sales.clone(), GroupEntry::new(sales.clone(), "Sales"))]),
        agents: BTreeMap::from([agent("alice"), agent("bob")]),
    };
    let tokens = vec![(AgentId::new("alice").unwrap(), ALICE.into()), (AgentId::new("bob").unwrap(), BOB.into())];
    let mut directory = Directory::default();
    directory.add_tenant(entry, vec![WIDGET.into()], tokens).unwrap();
    directory
}

pub struct Server {
    pub gateway: Gateway,
    pub addr: SocketAddr,
    pub router: Arc<Router>,
    pub store: Arc<MemoryStore>,
    /// What the router reads and writes, and what the gateway writes unless it was given another one.
    pub presence: Arc<MemoryPresence>,
    pub clock: Arc<FixedClock>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Served>,
}

/// What a test server is made of; [`Setup::new`] gives the defaults.
struct Setup {
    settings: GatewaySettings,
    directory: Directory,
    router_presence: PresenceSettings,
    presence: Arc<MemoryPresence>,
    /// What the gateway writes presence through (it may wrap `presence`, to fail on demand).
    gateway_presence: Arc<dyn Presence>,
    page_bytes: u64,
    /// How long the connections have to end once the server is stopped.
    grace: Duration,
}

impl Setup {
    fn new(settings: GatewaySettings) -> Setup {
        let presence = Arc::new(MemoryPresence::new());
        Setup {
            settings,
            directory: directory(),
            router_presence: PresenceSettings::default(),
            gateway_presence: presence.clone(),
            presence,
            page_bytes: RouterSettings::PAGE_BYTES,
            grace: DEADLINE,
        }
    }
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(GatewaySettings::default()).await
    }

    pub async fn start_with(settings: GatewaySettings) -> Server {
        Server::start_routed(Setup::new(settings), |router| router).await
    }

    /// A server with its own directory and router presence settings; the gateway writes presence through
    /// `gateway_presence` (which may wrap `presence`, to fail on demand).
    pub async fn start_full(
        settings: GatewaySettings,
        directory: Directory,
        router_presence: PresenceSettings,
        presence: Arc<MemoryPresence>,
        gateway_presence: Arc<dyn Presence>,
    ) -> Server {
        let setup = Setup { directory, router_presence, presence, gateway_presence, ..Setup::new(settings) };
        Server::start_routed(setup, |router| router).await
    }

    /// A server whose connections have `grace` to end once it is stopped ([`Server::stop_served`]).
    pub async fn start_with_grace(settings: GatewaySettings, grace: Duration) -> Server {
        Server::start_routed(Setup { grace, ..Setup::new(settings) }, |router| router).await
    }

    /// A default server whose router reads and answers a conversation's log in pages of `page_bytes`.
    pub async fn start_paged(page_bytes: u64) -> Server {
        Server::start_routed(Setup { page_bytes, ..Setup::new(GatewaySettings::default()) }, |router| router).await
    }

    /// A default server whose gateway asks `wrap(router)` instead of the router itself (a wrapper that holds
    /// or fails calls on demand); `Server::router` stays the router inside.
    pub async fn start_wrapped(wrap: impl FnOnce(Arc<Router>) -> Arc<dyn RouterApi>) -> Server {
        Server::start_routed(Setup::new(GatewaySettings::default()), wrap).await
    }

    async fn start_routed(setup: Setup, wrap: impl FnOnce(Arc<Router>) -> Arc<dyn RouterApi>) -> Server {
        let Setup { settings, directory, router_presence, presence, gateway_presence, page_bytes, grace } = setup;
        let clock = Arc::new(FixedClock::new(1_767_225_600_000));
        let clock_dyn: Arc<dyn Clock> = clock.clone();
        let directory = Arc::new(directory);
        let store = Arc::new(MemoryStore::new(clock_dyn.clone()));
        let router_settings = RouterSettings {
            node_id: "node-1".into(),
            advertise: String::new(),
            leases: LeaseSettings::default(),
            closed_list_limit: 200,
            page_bytes,
            presence: router_presence,
        };
        // As `serve` does: one in-process presence for the router and the gateway.
        let router_presence: Arc<dyn Presence> = presence.clone();
        let router =
            Router::start(router_settings, store.clone(), clock_dyn.clone(), directory.clone(), router_presence, None)
                .await
                .unwrap();
        let router = Arc::new(router);
        let gateway = Gateway::start(settings, wrap(router.clone()), directory, gateway_presence, clock_dyn);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let routes = gateway.routes();
        let serving = gateway.clone();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            serving.serve(listener, routes, shutdown, grace).await
        });
        Server { gateway, addr, router, store, presence, clock, stop: Some(stop), task }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.grpc_url()).unwrap().tcp_nodelay(true).connect().await.unwrap()
    }

    /// Shuts the server down the way the binary does: drain the gateway, then a graceful shutdown, which
    /// must end without waiting for the clients.
    /// Bob's live connections, as the gateway wrote them to presence.
    pub async fn bobs_connections(&self) -> usize {
        let (tenant, bob) = (TenantId::new("acme").unwrap(), AgentId::new("bob").unwrap());
        self.presence.agent_sessions(&tenant, &bob, self.clock.now_ms()).await.unwrap().len()
    }

    /// Waits until Bob has `n` live connections.
    pub async fn until_bob_has(&self, n: usize) {
        let waited = tokio::time::timeout(DEADLINE, async {
            while self.bobs_connections().await != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        waited.await.unwrap_or_else(|_| panic!("Bob never had {n} live connections"));
    }

    pub async fn stop(self) {
        let served = self.stop_served().await;
        assert_eq!(served, Served::Drained, "every client connection ended within the grace");
    }

    /// Stops the server as [`Server::stop`] does: how its connections ended.
    pub async fn stop_served(mut self) -> Served {
        self.gateway.drain();
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(2 * DEADLINE, &mut self.task).await.expect("the server stopped").unwrap()
    }
}

pub fn frame(id: &str, request: Req) -> pb::ClientFrame {
    pb::ClientFrame { id: id.into(), request: Some(request) }
}

/// A `switchboard.v1.ChatService/Session` stream.
pub struct GrpcClient {
    sender: Option<mpsc::Sender<pb::ClientFrame>>,
    frames: Streaming<pb::ServerFrame>,
    /// Pushes read while waiting for an answer, in order.
    pushes: VecDeque<Frame>,
    /// `agent_status` pushes, kept apart (they follow every change of the agent's status or load, the
    /// agent's own included): `push` skips them, `status_push` reads them.
    statuses: VecDeque<pb::AgentStatusPush>,
    next_id: u64,
    pub welcome: pb::Welcome,
}

impl GrpcClient {
    pub async fn connect(server: &Server) -> GrpcClient {
        GrpcClient::open(server.channel().await).await
    }

    pub async fn open(channel: Channel) -> GrpcClient {
        match GrpcClient::try_open(channel).await {
            Ok(client) => client,
            Err(status) => panic!("the stream ended instead of a welcome: {status:?}"),
        }
    }

    /// Opens a session stream, and reads the welcome; else the status the stream ended with.
    pub async fn try_open(channel: Channel) -> Result<GrpcClient, Status> {
        GrpcClient::try_open_forwarded(channel, None).await
    }

    /// A session stream whose call says, as a proxy would, that it forwards `forwarded_for`.
    pub async fn open_forwarded(server: &Server, forwarded_for: &str) -> GrpcClient {
        GrpcClient::try_open_forwarded(server.channel().await, Some(forwarded_for)).await.expect("a welcome")
    }

    /// A session stream forwarded for `forwarded_for` (as [`GrpcClient::open_forwarded`]), or the status it
    /// ended with.
    pub async fn try_open_forwarded(channel: Channel, forwarded_for: Option<&str>) -> Result<GrpcClient, Status> {
        let (sender, requests) = mpsc::channel(1024);
        let mut client = ChatServiceClient::new(channel);
        let mut call = tonic::Request::new(ReceiverStream::new(requests));
        if let Some(forwarded_for) = forwarded_for {
            call.metadata_mut().insert("x-forwarded-for", forwarded_for.parse().unwrap());
        }
        let frames = client.session(call).await?.into_inner();
        let mut client = GrpcClient {
            sender: Some(sender),
            frames,
            pushes: VecDeque::new(),
            statuses: VecDeque::new(),
            next_id: 0,
            welcome: Default::default(),
        };
        match client.read().await? {
            Some(Frame::Welcome(welcome)) => client.welcome = welcome,
            other => panic!("the first frame must be a welcome: {other:?}"),
        }
        Ok(client)
    }

    /// The next frame from the server, whatever it is; `Ok(None)` when the stream ended with OK.
    pub async fn read(&mut self) -> Result<Option<Frame>, Status> {
        let next = tokio::time::timeout(DEADLINE, self.frames.message()).await.expect("a frame before the deadline");
        next.map(|frame| frame.map(|frame| frame.frame.expect("a server frame holds a frame")))
    }

    pub async fn send(&mut self, frame: pb::ClientFrame) {
        self.sender.as_ref().expect("the request stream is open").send(frame).await.unwrap();
    }

    /// Closes the client's side of the stream.
    pub fn close_requests(&mut self) {
        self.sender = None;
    }

    pub fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("r{}", self.next_id)
    }

    /// Reads until the answer with this id; pushes on the way are kept for `push`.
    pub async fn answer(&mut self, id: &str) -> Frame {
        loop {
            match self.read().await {
                Ok(Some(Frame::Ack(ack))) => {
                    assert_eq!(ack.id, id, "answers come in request order");
                    return Frame::Ack(ack);
                }
                Ok(Some(Frame::Error(error))) => {
                    assert_eq!(error.id, id, "answers come in request order");
                    return Frame::Error(error);
                }
                Ok(Some(Frame::AgentStatus(status))) => self.statuses.push_back(status),
                Ok(Some(push)) => self.pushes.push_back(push),
                other => panic!("the stream ended before the answer to {id}: {other:?}"),
            }
        }
    }

    /// Sends a request and returns its answer: the ack's result, or the error.
    pub async fn call(&mut self, request: Req) -> Result<AckResult, pb::Error> {
        let id = self.fresh_id();
        self.send(frame(&id, request)).await;
        match self.answer(&id).await {
            Frame::Ack(ack) => Ok(ack.result.expect("an ack carries its result")),
            Frame::Error(error) => Err(error),
            _ => unreachable!(),
        }
    }

    pub async fn ack(&mut self, request: Req) -> AckResult {
        let what = format!("{request:?}");
        self.call(request).await.unwrap_or_else(|error| panic!("{what} refused: {error:?}"))
    }

    pub async fn refused(&mut self, request: Req) -> pb::Error {
        let what = format!("{request:?}");
        match self.call(request).await {
            Ok(result) => panic!("{what} acked: {result:?}"),
            Err(error) => error,
        }
    }

    /// The next push (one read while waiting for an answer first), `agent_status` pushes aside.
    pub async fn push(&mut self) -> Frame {
        if let Some(push) = self.pushes.pop_front() {
            return push;
        }
        loop {
            match self.read().await {
                Ok(Some(push @ (Frame::Ack(_) | Frame::Error(_)))) => {
                    panic!("an answer where a push was expected: {push:?}")
                }
                Ok(Some(Frame::AgentStatus(status))) => self.statuses.push_back(status),
                Ok(Some(push)) => return push,
                other => panic!("the stream ended while a push was expected: {other:?}"),
            }
        }
    }

    /// The next `agent_status` push; other pushes on the way are kept for `push`.
    pub async fn status_push(&mut self) -> pb::AgentStatusPush {
        loop {
            if let Some(status) = self.statuses.pop_front() {
                return status;
            }
            match self.read().await {
                Ok(Some(push @ (Frame::Ack(_) | Frame::Error(_)))) => {
                    panic!("an answer where a push was expected: {push:?}")
                }
                Ok(Some(Frame::AgentStatus(status))) => return status,
                Ok(Some(push)) => self.pushes.push_back(push),
                other => panic!("the stream ended while a push was expected: {other:?}"),
            }
        }
    }

    /// The next event push, skipping queue and typing pushes.
    pub async fn event(&mut self) -> pb::EventPush {
        loop {
            if let Frame::Event(event) = self.push().await {
                return event;
            }
        }
    }

    /// The next pushes are these events of `conversation`, by seq, and kind: `(seq, kind)`.
    pub async fn expect_events(&mut self, conversation: &str, expected: &[(u64, &str)]) {
        for (seq, kind) in expected {
            let push = self.event().await;
            assert_eq!(push.conversation, conversation);
            let event = push.event.unwrap();
            assert_eq!((event.seq, kind_of(&event)), (*seq, *kind), "{event:?}");
        }
    }

    /// Forgets the pushes read so far.
    pub fn forget_pushes(&mut self) {
        self.pushes.clear();
    }

    /// Nothing is pushed for a while (but `agent_status`).
    pub async fn expect_quiet(&mut self) {
        assert!(self.pushes.is_empty(), "unexpected pushes: {:?}", self.pushes);
        loop {
            let next = tokio::time::timeout(Duration::from_millis(300), self.frames.message()).await;
            match next {
                Err(_) => return,
                Ok(Ok(Some(pb::ServerFrame { frame: Some(Frame::AgentStatus(status)) }))) => {
                    self.statuses.push_back(status)
                }
                other => panic!("unexpected frame: {other:?}"),
            }
        }
    }
}

pub fn kind_of(event: &pb::Event) -> &'static str {
    use pb::event::Body;
    match event.body.as_ref().expect("an event has a body") {
        Body::Created(_) => "created",
        Body::Accepted(_) => "accepted",
        Body::Message(_) => "message",
        Body::Delivered(_) => "delivered",
        Body::Closed(_) => "closed",
        Body::Cancelled(_) => "cancelled",
        Body::Offered(_) => "offered",
        Body::OfferEnded(_) => "offer_ended",
        Body::Transferred(_) => "transferred",
        Body::Forwarded(_) => "forwarded",
        Body::Requeued(_) => "requeued",
        Body::CustomerLeft(_) => "customer_left",
        Body::CustomerReturned(_) => "customer_returned",
    }
}

pub fn chat_start(name: &str, question: &str) -> Req {
    Req::ChatStart(pb::ChatStartRequest {
        widget_key: WIDGET.into(),
        group: "sales".into(),
        name: name.into(),
        question: question.into(),
        ..Default::default()
    })
}

pub fn sign_in(token: &str) -> Req {
    Req::AgentSignIn(pb::AgentSignInRequest { token: token.into() })
}

pub fn send_message(conversation: &str, client_msg_id: &str, body: &str) -> Req {
    Req::MessageSend(pb::MessageSendRequest {
        conversation: conversation.into(),
        client_msg_id: client_msg_id.into(),
        body: body.into(),
    })
}

pub fn delivered(conversation: &str, up_to_seq: u64) -> Req {
    Req::MessageDelivered(pb::MessageDeliveredRequest { conversation: conversation.into(), up_to_seq })
}

pub fn accept(conversation: &str) -> Req {
    Req::ChatAccept(pb::ChatAcceptRequest { conversation: conversation.into() })
}

/// The seq of a `message_send` ack.
pub fn sent_seq(result: AckResult) -> u64 {
    match result {
        AckResult::MessageSend(sent) => {
            assert_eq!(sent.status(), pb::MessageStatus::Sent);
            sent.seq.expect("a stored message has a seq")
        }
        other => panic!("not a message_send ack: {other:?}"),
    }
}

/// A WebSocket connection speaking the JSON protocol.
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pushes: VecDeque<Value>,
    /// `agent.status` pushes, kept apart as `GrpcClient` does.
    statuses: VecDeque<Value>,
    next_id: u64,
}

impl WsClient {
    pub async fn connect(server: &Server) -> WsClient {
        match WsClient::try_connect(server).await {
            Ok(client) => client,
            Err(close) => panic!("closed instead of welcomed: {close:?}"),
        }
    }

    /// Connects, and reads the welcome; else the close code the connection ended with.
    pub async fn try_connect(server: &Server) -> Result<WsClient, Option<u16>> {
        WsClient::try_connect_as(server, None).await
    }

    /// A connection whose handshake says, as a proxy's would, that it forwards `forwarded_for`.
    pub async fn connect_forwarded(server: &Server, forwarded_for: &str) -> WsClient {
        match WsClient::try_connect_forwarded(server, forwarded_for).await {
            Ok(client) => client,
            Err(close) => panic!("closed instead of welcomed: {close:?}"),
        }
    }

    /// [`WsClient::connect_forwarded`], or the close code the connection ended with.
    pub async fn try_connect_forwarded(server: &Server, forwarded_for: &str) -> Result<WsClient, Option<u16>> {
        WsClient::try_connect_as(server, Some(forwarded_for)).await
    }

    /// Connects (its handshake saying, with `forwarded_for`, that a proxy forwards that address), and reads
    /// the welcome; else the close code the connection ended with.
    async fn try_connect_as(server: &Server, forwarded_for: Option<&str>) -> Result<WsClient, Option<u16>> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = server.ws_url().into_client_request().unwrap();
        if let Some(forwarded_for) = forwarded_for {
            request.headers_mut().insert("x-forwarded-for", forwarded_for.parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut client = WsClient { socket, pushes: VecDeque::new(), statuses: VecDeque::new(), next_id: 0 };
        let welcome = client.read_or_close().await?;
        assert_eq!(welcome["type"], "welcome");
        Ok(client)
    }

    /// A connection whose socket buffers little, for a client that stops reading.
    pub async fn connect_small_buffer(server: &Server) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(server.addr).await.unwrap();
        let (socket, _) =
            tokio_tungstenite::client_async(server.ws_url(), MaybeTlsStream::Plain(stream)).await.unwrap();
        let mut client = WsClient { socket, pushes: VecDeque::new(), statuses: VecDeque::new(), next_id: 0 };
        assert_eq!(client.read().await.expect("a welcome")["type"], "welcome");
        client
    }

    /// The next text frame; `None` once the server closed the connection.
    pub async fn read(&mut self) -> Option<Value> {
        self.read_or_close().await.ok()
    }

    /// The next text frame, or the close code the connection ended with (`None`: without a close frame).
    pub async fn read_or_close(&mut self) -> Result<Value, Option<u16>> {
        loop {
            let next = tokio::time::timeout(DEADLINE, self.socket.next()).await.expect("a frame before the deadline");
            match next {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(text.as_str()).unwrap()),
                Some(Ok(Message::Close(close))) => return Err(close.map(|close| u16::from(close.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    /// Writes only the header of a masked text frame whose payload would be `length` bytes, straight to the
    /// socket: what a server that reads no payload before its size check sees of a frame that large.
    pub async fn send_frame_header(&mut self, length: u64) {
        use tokio::io::AsyncWriteExt;
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        let MaybeTlsStream::Plain(stream) = self.socket.get_mut() else { panic!("a plain connection") };
        stream.write_all(&header).await.unwrap();
    }

    /// Reads until the server has pinged the connection `n` times (tungstenite answers each with a pong as it
    /// reads); the text frames read meanwhile are kept as pushes.
    pub async fn read_pings(&mut self, n: usize) {
        let mut pinged = 0;
        while pinged < n {
            let next = tokio::time::timeout(DEADLINE, self.socket.next()).await.expect("a frame before the deadline");
            match next {
                Some(Ok(Message::Ping(_))) => pinged += 1,
                Some(Ok(Message::Text(text))) => self.pushes.push_back(serde_json::from_str(text.as_str()).unwrap()),
                other => panic!("the connection ended after {pinged} pings of {n}: {other:?}"),
            }
        }
    }

    /// Reads what the server writes, as bytes, past tungstenite (which would answer a ping), until the server
    /// ends the connection: what a client that hangs would be sent. Frames that tungstenite read already are
    /// not among them.
    pub async fn raw_bytes_until_closed(&mut self) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let MaybeTlsStream::Plain(stream) = self.socket.get_mut() else { panic!("a plain connection") };
        let mut bytes = Vec::new();
        let mut buffer = [0u8; 4096];
        let read_all = async {
            // The end of the stream, or a reset: either way the server ended the connection.
            while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                bytes.extend_from_slice(&buffer[..n]);
            }
        };
        tokio::time::timeout(DEADLINE, read_all).await.expect("the server ended the connection before the deadline");
        bytes
    }

    /// Reads the server's frames raw, past tungstenite, until its close frame: that frame's code. Frames that
    /// tungstenite read already are not among them.
    pub async fn raw_close_code(&mut self) -> u16 {
        let frames = self.raw_frames_until(|opcode, _| opcode == 0x8).await;
        let (_, payload) = frames.last().expect("a close frame");
        u16::from_be_bytes([payload[0], payload[1]])
    }

    /// Reads the server's frames raw, past tungstenite (which would answer a ping), until one that `last`
    /// picks: each frame's opcode and payload, that one included. Frames that tungstenite read already are
    /// not among them.
    pub async fn raw_frames_until(&mut self, last: impl Fn(u8, &[u8]) -> bool) -> Vec<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let MaybeTlsStream::Plain(stream) = self.socket.get_mut() else { panic!("a plain connection") };
        let (mut bytes, mut frames) = (Vec::new(), Vec::new());
        let mut buffer = [0u8; 4096];
        let read = async {
            loop {
                // The server's frames are not masked: a header, a length, the payload.
                while bytes.len() >= 2 {
                    let (opcode, short) = (bytes[0] & 0x0f, usize::from(bytes[1] & 0x7f));
                    let (header, length) = match short {
                        126 if bytes.len() >= 4 => (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]]))),
                        127 if bytes.len() >= 10 => {
                            (10, usize::try_from(u64::from_be_bytes(bytes[2..10].try_into().unwrap())).unwrap())
                        }
                        126 | 127 => break,
                        length => (2, length),
                    };
                    if bytes.len() < header + length {
                        break;
                    }
                    let payload = bytes[header..header + length].to_vec();
                    bytes.drain(..header + length);
                    let done = last(opcode, &payload);
                    frames.push((opcode, payload));
                    if done {
                        return;
                    }
                }
                let n = stream.read(&mut buffer).await.expect("the connection ended before the frame looked for");
                assert!(n > 0, "the connection ended before the frame looked for: {frames:?}");
                bytes.extend_from_slice(&buffer[..n]);
            }
        };
        tokio::time::timeout(DEADLINE, read).await.expect("the frame looked for before the deadline");
        frames
    }

    /// Writes a frame raw, past tungstenite (which sends nothing once it has read a close): masked, as a
    /// client's must be, with a key of zeros. The error when the connection is reset.
    pub async fn send_raw_frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        assert!(payload.len() < 126, "a short frame");
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        let MaybeTlsStream::Plain(stream) = self.socket.get_mut() else { panic!("a plain connection") };
        stream.write_all(&frame).await
    }

    /// Reads raw until the server ends the connection: `Ok` when it ended it in order (a FIN), the error when
    /// it reset it.
    pub async fn raw_end(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncReadExt;
        let MaybeTlsStream::Plain(stream) = self.socket.get_mut() else { panic!("a plain connection") };
        let mut buffer = [0u8; 4096];
        let read = async {
            loop {
                if stream.read(&mut buffer).await? == 0 {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(DEADLINE, read).await.expect("the server ended the connection before the deadline")
    }

    pub async fn send_text(&mut self, text: String) {
        self.socket.send(Message::Text(text.into())).await.unwrap();
    }

    /// Sends `request` (without `id`: one is added) and returns the ack or error frame that answers it.
    pub async fn call(&mut self, mut request: Value) -> Value {
        self.next_id += 1;
        let id = format!("w{}", self.next_id);
        request["id"] = json!(id);
        self.send_text(request.to_string()).await;
        self.answer(Some(&id)).await
    }

    /// Reads until an answer (an ack or an error) with this id (`None`: `"id": null`).
    pub async fn answer(&mut self, id: Option<&str>) -> Value {
        loop {
            let frame = self.read().await.expect("the connection ended before the answer");
            if frame["type"] == "ack" || frame["type"] == "error" {
                assert_eq!(frame["id"].as_str(), id, "{frame}");
                return frame;
            }
            if frame["type"] == "agent.status" {
                self.statuses.push_back(frame);
            } else {
                self.pushes.push_back(frame);
            }
        }
    }

    pub async fn ack(&mut self, request: Value) -> Value {
        let answer = self.call(request.clone()).await;
        assert_eq!(answer["type"], "ack", "{request} → {answer}");
        answer
    }

    /// The next push read already (while waiting for an answer), without reading more.
    pub fn take_push(&mut self) -> Option<Value> {
        self.pushes.pop_front()
    }

    /// The next push, `agent.status` pushes aside.
    pub async fn push(&mut self) -> Value {
        if let Some(push) = self.pushes.pop_front() {
            return push;
        }
        loop {
            let frame = self.read().await.expect("the connection ended while a push was expected");
            assert!(frame.get("id").is_none(), "an answer where a push was expected: {frame}");
            if frame["type"] == "agent.status" {
                self.statuses.push_back(frame);
            } else {
                return frame;
            }
        }
    }

    /// The next `agent.status` push; other pushes on the way are kept for `push`.
    pub async fn status_push(&mut self) -> Value {
        loop {
            if let Some(status) = self.statuses.pop_front() {
                return status;
            }
            let frame = self.read().await.expect("the connection ended while a push was expected");
            assert!(frame.get("id").is_none(), "an answer where a push was expected: {frame}");
            if frame["type"] == "agent.status" {
                return frame;
            }
            self.pushes.push_back(frame);
        }
    }

    /// The next push of this type, skipping others.
    pub async fn push_of(&mut self, kind: &str) -> Value {
        loop {
            let push = self.push().await;
            if push["type"] == kind {
                return push;
            }
        }
    }

    pub async fn expect_events(&mut self, conversation: &str, expected: &[(u64, &str)]) {
        for (seq, kind) in expected {
            let push = self.push_of("event").await;
            assert_eq!(push["conversation"], conversation, "{push}");
            assert_eq!((push["event"]["seq"].as_u64(), push["event"]["kind"].as_str()), (Some(*seq), Some(*kind)));
        }
    }
}
