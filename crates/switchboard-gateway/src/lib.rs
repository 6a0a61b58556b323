//! The gateway: the client edge of Switchboard. It terminates client connections that speak the public
//! protocol ([`protocol`], documented in `docs/protocol.md`) over either transport: WebSocket with JSON text
//! frames (`/v1/ws`, for browsers) or gRPC (`switchboard.v1.ChatService`, one bidirectional stream per
//! connection, for other clients). It authenticates customers (widget key, then the chat's customer token)
//! and agents (their token), forwards every request to the router, and fans the router's pushes out to its
//! own connections through the [`hub`].
//!
//! One session implementation (`session.rs`) serves both transports; `ws.rs` and `grpc.rs` only translate
//! frames. The gateway holds no chat state beyond its connections and never meets the database.
//!
//! **Presence.** The gateway records every signed-in agent connection in [`Presence`] (`session_alive` when
//! the agent signs in and then every `presence_heartbeat`, good for `presence_ttl`; `session_gone` when the
//! connection ends). It never sets an agent offline when a connection closes: the agent's owner (a router)
//! does, after a grace period without any live connection. A presence outage never fails a request; the
//! heartbeat writes every connection again at each tick, so presence is whole again one heartbeat after it
//! is back.
//!
//! It also records every customer's connection to their chat (`customers_alive` when it starts or resumes
//! the chat and then, all of them in one call, every `customer_heartbeat`, good for three of them;
//! `customer_gone` when it ends), so that the router that owns the chat's queue can find a waiting chat whose
//! customer went away without a word and cancel it as abandoned after its grace period.

mod addresses;
mod admission;
mod grpc;
pub mod hub;
pub mod protocol;
mod serve;
mod session;
mod ws;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use axum::Extension;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use switchboard_domain::{AgentId, Clock, ConversationId, Directory, TenantId};
use switchboard_presence::{CustomerSession, GroupStatus, Presence, StartBudget};
use switchboard_proto::public::v1::chat_service_server::ChatServiceServer;
use switchboard_proto::router::{GatewayId, RouterApi};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use crate::addresses::{AddressConnections, AddressLimiter, Peer, StartTaken};
pub use crate::addresses::{AddressLimits, IpNet};
pub use crate::admission::{REPLY_BYTES_PER_REQUEST, RequestRate};
pub use crate::grpc::{ChatGrpc, SessionStream};
use crate::hub::{Hub, Needs, SocketId};
pub use crate::serve::Served;
pub use crate::ws::{
    CLOSE_GOING_AWAY, CLOSE_MESSAGE_TOO_BIG, CLOSE_SLOW_CONSUMER, CLOSE_TRY_AGAIN_LATER, CLOSE_UNRESPONSIVE,
};
use switchboard_proto::keyed_locks::{KeyedGuard, KeyedLocks};

/// The full name of the public gRPC service.
pub const CHAT_SERVICE: &str = "switchboard.v1.ChatService";

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub gateway_id: String,
    /// The largest message body a client may send, in bytes; larger ones are refused with
    /// `message_too_large` and the connection stays open.
    pub max_message_bytes: usize,
    /// How many frames may wait for a slow socket before it is disconnected (close code 4008).
    pub outbound_queue_len: usize,
    /// How long one write to a connection may wait for the client to read before it is disconnected as too
    /// slow (close code 4008), whether or not pushes queue behind it: a client that stops reading in the
    /// middle of a long backlog would otherwise hold its session, and the page of events being written,
    /// for good (default 30 s).
    pub write_stall_timeout: Duration,
    /// How long a WebSocket client may send nothing before it is pinged; one that then sends nothing, not
    /// even the pong its WebSocket stack answers a ping with, for as long again is disconnected (close code
    /// 4009): its process hangs, or it stopped reading. TCP keepalive finds the peers that are gone; this
    /// finds those still there that no longer take part (default 30 s). [`Gateway::serve`] pings HTTP/2
    /// (gRPC) connections by the same rule, and gives a new connection this long to say which protocol it
    /// speaks and an HTTP/1.1 request this long for its headers.
    pub idle_ping: Duration,
    /// How many chats one connection may follow (`chat.subscribe` past it is refused `follow_limit_reached`;
    /// an agent's own chats, and the chats the connection started, resumed or accepted, are followed whatever
    /// the count). Each followed chat costs the gateway and its router a few hundred bytes, and its events
    /// are written to the connection.
    pub max_followed_chats: usize,
    /// How many requests each connection may make (frames that are not valid requests included); one over
    /// it is refused `rate_limited` and nothing of it is done.
    pub request_rate: RequestRate,
    /// How many chats (`chat.start`, and `offline.message`) one client address may start, whatever its
    /// connections (one over it is refused `rate_limited` and nothing of it is done), and how many
    /// connections it may have open at once (one more is closed at once, as one over `max_connections`).
    /// Counted only for connections served by [`Gateway::serve`], which knows their peers.
    pub per_address: AddressLimits,
    /// How many client connections (WebSockets and gRPC session streams) the gateway serves at once; one
    /// more is closed as soon as it is open (WebSocket close code 1013, gRPC `UNAVAILABLE`: try again later,
    /// or another gateway). 0: no limit. It bounds the gateway's memory (some 20 KiB per idle connection).
    pub max_connections: usize,
    /// How often every signed-in agent connection is written to presence again (default 1 s).
    pub presence_heartbeat: Duration,
    /// How long a connection counts in presence after it was written; `None` (the default): 3 ×
    /// `presence_heartbeat`. A gateway that dies stops counting for its agents after this.
    pub presence_ttl: Option<Duration>,
    /// How often every customer connection is written to presence again (default 10 s); each counts for
    /// three of these. A gateway that dies stops counting for its customers after that.
    pub customer_heartbeat: Duration,
}

/// How long a client connection may be silent before the kernel asks its peer whether it is still there
/// (TCP keepalive), how often it asks again, and how many times, unanswered, before it drops the connection:
/// a peer gone without a word (a laptop closed, a network lost) is found within some 50 s, its session ends,
/// and an agent's chats go back to their queues after the presence grace period rather than stay with them
/// for good.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 3;
/// How long data written to a client may stay unacknowledged before the kernel drops the connection (Linux's
/// `TCP_USER_TIMEOUT`; by default it retransmits for some 15 minutes).
pub const UNACKNOWLEDGED_TIMEOUT: Duration = Duration::from_secs(60);

/// Tunes an accepted client connection: no Nagle delay, and a peer gone without a word is found
/// ([`KEEPALIVE_IDLE`], [`UNACKNOWLEDGED_TIMEOUT`]).
pub fn tune_client_socket(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_TIMEOUT))?;
    Ok(())
}

/// The default presence heartbeat.
pub const DEFAULT_PRESENCE_HEARTBEAT: Duration = Duration::from_secs(1);

/// The default of [`GatewaySettings::customer_heartbeat`].
pub const DEFAULT_CUSTOMER_HEARTBEAT: Duration = Duration::from_secs(10);

/// The default of [`GatewaySettings::write_stall_timeout`].
pub const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The default of [`GatewaySettings::idle_ping`].
pub const DEFAULT_IDLE_PING: Duration = Duration::from_secs(30);

/// The default of [`GatewaySettings::max_followed_chats`].
pub const DEFAULT_MAX_FOLLOWED_CHATS: usize = 1000;

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            gateway_id: "gateway".into(),
            max_message_bytes: 4096,
            outbound_queue_len: 1024,
            write_stall_timeout: DEFAULT_WRITE_STALL_TIMEOUT,
            idle_ping: DEFAULT_IDLE_PING,
            max_followed_chats: DEFAULT_MAX_FOLLOWED_CHATS,
            request_rate: RequestRate::default(),
            per_address: AddressLimits::default(),
            max_connections: 0,
            presence_heartbeat: DEFAULT_PRESENCE_HEARTBEAT,
            presence_ttl: None,
            customer_heartbeat: DEFAULT_CUSTOMER_HEARTBEAT,
        }
    }
}

impl GatewaySettings {
    /// The largest client frame read (a WebSocket frame, a gRPC `ClientFrame`). Frames a little over the body
    /// limit are still read, so that the client gets a clear `message_too_large` error instead of a dropped
    /// connection; far larger ones end the connection.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_message_bytes.saturating_mul(4).max(64 * 1024)
    }

    /// How long a connection written to presence counts: `presence_ttl`, or 3 heartbeats.
    pub fn presence_ttl(&self) -> Duration {
        self.presence_ttl.unwrap_or(self.presence_heartbeat.saturating_mul(3))
    }
}

/// How many presence writes of one heartbeat are in flight at once.
const HEARTBEAT_CONCURRENCY: usize = 32;

pub(crate) struct Shared {
    pub(crate) settings: GatewaySettings,
    pub(crate) gateway_id: GatewayId,
    pub(crate) router: Arc<dyn RouterApi>,
    pub(crate) directory: Arc<Directory>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) presence: Arc<dyn Presence>,
    pub(crate) hub: Hub,
    pub(crate) next_socket_id: AtomicU64,
    /// The connections served now, against [`GatewaySettings::max_connections`].
    pub(crate) open_connections: Arc<AtomicUsize>,
    /// The chat starts of each client address, against [`GatewaySettings::per_address`].
    pub(crate) chat_starts: AddressLimiter,
    /// The sessions open of each client address, against its `max_connections`.
    pub(crate) address_connections: Arc<AddressConnections>,
    /// Sessions running (WebSockets and gRPC session streams, refused ones while they close): a shutdown
    /// waits for them ([`Gateway::serve`]), an upgraded WebSocket being no longer its HTTP server's.
    pub(crate) sessions: watch::Sender<usize>,
    /// Makes presence session ids unique across restarts of a gateway with the same id.
    boot_id: String,
    /// Whether the gateway is subscribed to each agent's pushes, behind the lock that orders its changes.
    agent_subscriptions: KeyedLocks<(TenantId, AgentId), bool>,
    /// Order the subscription and unsubscription of one conversation: an unsubscription decided when the
    /// last socket stopped watching may not overtake the subscription of a socket that started watching
    /// since (the router would forget the gateway while a socket waits for pushes).
    conversation_locks: KeyedLocks<ConversationId, ()>,
    /// The group statuses read last, per tenant: `groups.list` answers them (marked stale) while presence
    /// cannot be read.
    pub(crate) group_statuses: Mutex<HashMap<TenantId, Vec<GroupStatus>>>,
    /// What `/healthz` checks besides answering ([`Gateway::set_health_check`]).
    health_check: OnceLock<HealthCheck>,
    /// True once the gateway drains: every connection is closed (and new ones at once).
    pub(crate) draining: watch::Sender<bool>,
    /// True once the gateway is told it will stop ([`Gateway::leave`]): `/readyz` fails, all else goes on.
    leaving: AtomicBool,
    /// The gRPC health of [`Gateway::grpc_routes`], made `NOT_SERVING` by [`Gateway::leave`].
    grpc_health: Mutex<Vec<tonic_health::server::HealthReporter>>,
}

impl Shared {
    /// The address a connection's chat starts count against: its peer's, or the one its trusted proxy names
    /// (`addresses`); `None` without a peer (routes served other than by [`Gateway::serve`]).
    pub(crate) fn client_address<'a>(
        &self,
        peer: Option<Peer>,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Option<std::net::IpAddr> {
        let trusted = &self.settings.per_address.trusted_proxies;
        peer.map(|Peer(peer)| addresses::client_address(peer.ip(), forwarded_for, trusted))
    }

    /// The presence session id of a connection.
    pub(crate) fn session_id(&self, socket: SocketId) -> String {
        format!("{}/{}/{socket}", self.gateway_id.0, self.boot_id)
    }

    /// When a presence entry written now expires.
    pub(crate) fn presence_expiry_ms(&self) -> i64 {
        let ttl = i64::try_from(self.settings.presence_ttl().as_millis()).unwrap_or(i64::MAX);
        self.clock.now_ms().saturating_add(ttl)
    }

    /// Records a connection of an agent in presence; a failure is logged (the heartbeat writes it again).
    pub(crate) async fn session_alive(&self, socket: SocketId, tenant: &TenantId, agent: &AgentId) -> bool {
        let session = self.session_id(socket);
        let expires_at_ms = self.presence_expiry_ms();
        match self.presence.session_alive(tenant, agent, &session, &self.gateway_id.0, expires_at_ms).await {
            Ok(()) => true,
            Err(error) => {
                debug!(%error, %agent, "presence not written");
                false
            }
        }
    }

    /// The presence record of a customer's connection to their chat.
    pub(crate) fn customer_session(
        &self,
        socket: SocketId,
        tenant: &TenantId,
        conversation: ConversationId,
    ) -> CustomerSession {
        CustomerSession { tenant: tenant.clone(), conversation, session: self.session_id(socket) }
    }

    /// When a customer's connection written now expires: three customer heartbeats.
    fn customer_expiry_ms(&self) -> i64 {
        let ttl = self.settings.customer_heartbeat.saturating_mul(3);
        self.clock.now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
    }

    /// Takes one chat start of `client` from its address's budget: in presence, shared by every gateway, when
    /// the settings say so ([`AddressLimits::shared`]) and presence answers; else at this gateway alone.
    /// `Ok`: from which budget (to give it back to); `Err(ms)`: none left, one in `ms`.
    pub(crate) async fn take_chat_start(&self, client: IpAddr) -> Result<StartTaken, u64> {
        let limits = &self.settings.per_address;
        if limits.per_minute == 0 {
            return Ok(StartTaken::Unlimited);
        }
        if limits.shared {
            let address = crate::addresses::key_text(client);
            match self.presence.take_chat_start(&address, self.start_budget(), self.clock.now_us()).await {
                Ok(taken) => return taken.map(|()| StartTaken::Shared(client)),
                Err(error) => debug!(%error, %client, "a chat start counted at this gateway alone (presence down)"),
            }
        }
        self.chat_starts.take(client, || self.clock.now_us()).map(|()| StartTaken::Here(client))
    }

    /// Gives back a chat start that started nothing (a resend answered with what its first send started, which
    /// had been counted then) to the budget it was taken from. A failure is logged: the start stays counted.
    pub(crate) async fn give_back_chat_start(&self, taken: StartTaken) {
        match taken {
            StartTaken::Unlimited => {}
            StartTaken::Here(client) => self.chat_starts.give_back(client, || self.clock.now_us()),
            StartTaken::Shared(client) => {
                let address = crate::addresses::key_text(client);
                let now_us = self.clock.now_us();
                if let Err(error) = self.presence.give_back_chat_start(&address, self.start_budget(), now_us).await {
                    debug!(%error, %client, "a resend's chat start not given back (presence down)");
                }
            }
        }
    }

    /// An address's chat starts, as presence shares them between gateways.
    fn start_budget(&self) -> StartBudget {
        let limits = &self.settings.per_address;
        StartBudget { per_minute: limits.per_minute, burst: limits.burst }
    }

    /// Records customers' connections in presence; a failure is logged (the heartbeat writes them again).
    pub(crate) async fn customers_alive(&self, sessions: &[CustomerSession]) -> bool {
        match self.presence.customers_alive(sessions, self.customer_expiry_ms()).await {
            Ok(()) => true,
            Err(error) => {
                debug!(%error, n_sessions = sessions.len(), "customers' connections not written to presence");
                false
            }
        }
    }

    /// Tells the owner of a chat that a connection of its customer began or ended here (written to presence
    /// before), in a task of its own: the owner records a customer who left or returned. A failure is logged.
    pub(crate) fn tell_customer_connection(&self, conversation: ConversationId) {
        let router = self.router.clone();
        tokio::spawn(async move {
            if let Err(error) = router.customer_connection(conversation).await {
                debug!(%conversation, %error, "the chat's owner not told of its customer's connection");
            }
        });
    }

    /// Records the end of a customer's connection; a failure is logged (the entry expires by itself).
    pub(crate) async fn customer_gone(&self, session: &CustomerSession) {
        if let Err(error) = self.presence.customer_gone(session, self.clock.now_ms()).await {
            warn!(%error, conversation = %session.conversation, "presence not told that a customer's connection ended; it expires by itself");
        }
    }

    /// Records in presence that a connection of an agent ended now; a failure is logged (the entry expires
    /// by itself).
    pub(crate) async fn session_gone(&self, socket: SocketId, tenant: &TenantId, agent: &AgentId) {
        let session = self.session_id(socket);
        if let Err(error) = self.presence.session_gone(tenant, agent, &session, self.clock.now_ms()).await {
            warn!(%error, %agent, "presence not told that a connection ended; it expires by itself");
        }
    }

    /// Carries out what a hub change asks: subscriptions to queues and agents, and unsubscriptions.
    pub(crate) async fn apply_needs(&self, needs: Needs) {
        for (tenant, group) in needs.subscribe_queues {
            if let Err(error) = self.router.subscribe_queue(&self.gateway_id, &tenant, &group).await {
                debug!(%error, %group, "queue subscription failed");
            }
        }
        for conversation in needs.unsubscribe_conversations {
            let _ordered = self.conversation_lock(conversation).await;
            // A socket may have started watching since the last one stopped: it subscribed, so stay.
            if !self.hub.is_watched(conversation) {
                self.router.unsubscribe(&self.gateway_id, conversation).await;
            }
        }
        for (tenant, agent) in needs.subscribe_agents.into_iter().chain(needs.unsubscribe_agents) {
            if let Err(error) = self.sync_agent_subscription(&tenant, &agent).await {
                debug!(%error, %agent, "agent subscription failed");
            }
        }
    }

    /// The lock that orders the gateway's subscription changes for one conversation.
    pub(crate) async fn conversation_lock(&self, conversation: ConversationId) -> KeyedGuard<'_, ConversationId, ()> {
        self.conversation_locks.lock(&conversation).await
    }

    /// Makes the gateway subscribed to the agent's own pushes exactly while a socket of the agent is signed in
    /// here. Changes of one agent are ordered by a lock, and each looks at the hub under it, so that a sign-in
    /// racing with the end of the agent's last other socket never ends up unsubscribed.
    pub(crate) async fn sync_agent_subscription(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
    ) -> Result<(), switchboard_proto::router::RouterError> {
        let mut subscribed = self.agent_subscriptions.lock(&(tenant.clone(), agent.clone())).await;
        let wanted = self.hub.n_agent_sockets(tenant, agent) > 0;
        if wanted && !*subscribed {
            let result = self.router.subscribe_agent(&self.gateway_id, tenant, agent, &[]).await;
            *subscribed = result.is_ok();
            result
        } else {
            if !wanted && *subscribed {
                self.router.unsubscribe_agent(&self.gateway_id, tenant, agent).await;
                *subscribed = false;
            }
            Ok(())
        }
    }
}

#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

/// A check of something a gateway's process depends on, run by `/healthz`: `Err` says what is wrong.
pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("settings", &self.shared.settings).finish()
    }
}

impl Gateway {
    /// Connects to the router, starts dispatching its pushes to this gateway's sockets, and starts the
    /// presence heartbeat of its signed-in agents. Call it inside a tokio runtime.
    pub fn start(
        settings: GatewaySettings,
        router: Arc<dyn RouterApi>,
        directory: Arc<Directory>,
        presence: Arc<dyn Presence>,
        clock: Arc<dyn Clock>,
    ) -> Gateway {
        let gateway_id = GatewayId(settings.gateway_id.clone());
        // An f64 holds every limit the configuration allows (at most 10,000,000) exactly. One gateway per
        // process but in tests (where the last one started sets it).
        metrics::gauge!(switchboard_telemetry::names::GATEWAY_CONNECTIONS_MAX).set(settings.max_connections as f64);
        let shared = Arc::new(Shared {
            chat_starts: AddressLimiter::new(&settings.per_address),
            address_connections: AddressConnections::new(settings.per_address.max_connections),
            settings,
            gateway_id: gateway_id.clone(),
            router,
            directory,
            clock,
            presence,
            hub: Hub::default(),
            next_socket_id: AtomicU64::new(1),
            open_connections: Arc::default(),
            sessions: watch::Sender::new(0),
            boot_id: uuid::Uuid::new_v4().simple().to_string(),
            agent_subscriptions: KeyedLocks::default(),
            conversation_locks: KeyedLocks::default(),
            group_statuses: Mutex::default(),
            health_check: OnceLock::new(),
            leaving: AtomicBool::new(false),
            grpc_health: Mutex::new(Vec::new()),
            draining: watch::channel(false).0,
        });
        let (push_sender, mut pushes) = mpsc::unbounded_channel();
        shared.router.connect_gateway(gateway_id, push_sender);
        let dispatcher = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some(push) = pushes.recv().await {
                let Some(shared) = dispatcher.upgrade() else {
                    break;
                };
                let mut needs = shared.hub.dispatch(push);
                if std::mem::take(&mut needs.flush_queue_views) {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(hub::QUEUE_VIEW_DELAY).await;
                        shared.hub.flush_queue_views();
                    });
                }
                if !needs.is_empty() {
                    // Never waits on the router here: pushes keep flowing meanwhile.
                    tokio::spawn(async move { shared.apply_needs(needs).await });
                }
            }
        });
        tokio::spawn(heartbeat(Arc::downgrade(&shared)));
        tokio::spawn(customer_heartbeat(Arc::downgrade(&shared)));
        Gateway { shared }
    }

    /// Everything a gateway serves, on one port: the WebSocket protocol (`/v1/ws`), `/healthz`, `/readyz`, and over
    /// HTTP/2 the gRPC [`CHAT_SERVICE`] with reflection ([`Gateway::grpc_routes`]). Serve it with
    /// [`Gateway::serve`] (HTTP/1.1 and HTTP/2 on the same port, with HTTP/2 pings). Other paths are 404, or
    /// the gRPC status UNIMPLEMENTED for gRPC requests.
    pub fn routes(&self) -> axum::Router {
        let layer = switchboard_telemetry::GrpcServerLayer::new(&[
            switchboard_proto::public::v1::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ]);
        let grpc = self.grpc_routes().into_axum_router().layer(layer);
        self.http_routes().merge(grpc).fallback(not_found)
    }

    /// The HTTP routes only: `/v1/ws` (the WebSocket protocol), `/healthz` (200 `ok`, or 503 with the
    /// reason while the [health check](Gateway::set_health_check) fails: restart me) and `/readyz` (the same,
    /// and 503 `leaving` once the gateway was told it will stop, [`Gateway::leave`]: send me no one new).
    pub fn http_routes(&self) -> axum::Router {
        axum::Router::new()
            .route("/v1/ws", get(upgrade))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self.shared.clone())
    }

    /// Makes `/healthz` run `check` at each request and answer 503 with its reason while it fails: for a
    /// part of the process the gateway cannot see (in `serve`, the store, which refuses every write once its
    /// log could not be made durable or its append writer's connection put back in order, until a restart).
    /// Only the first check set counts.
    pub fn set_health_check(&self, check: HealthCheck) {
        let _ = self.shared.health_check.set(check);
    }

    /// The public gRPC service alone, `switchboard.v1.ChatService`, to add to a tonic server of one's own
    /// (its reflection can register `switchboard_proto::public::v1::FILE_DESCRIPTOR_SET`).
    pub fn grpc_service(&self) -> ChatServiceServer<ChatGrpc> {
        ChatServiceServer::new(ChatGrpc::new(self.shared.clone()))
            .max_decoding_message_size(self.shared.settings.max_frame_bytes())
    }

    /// The gRPC routes: [`Gateway::grpc_service`], the standard health service (`grpc.health.v1`: the chat
    /// service and `""` SERVING, `NOT_SERVING` once [`Gateway::leave`] was called) and reflection (`grpc.reflection.v1`) describing them. Call it inside a
    /// tokio runtime.
    pub fn grpc_routes(&self) -> tonic::service::Routes {
        let (reporter, health) = tonic_health::server::health_reporter();
        self.shared.grpc_health.lock().unwrap_or_else(PoisonError::into_inner).push(reporter.clone());
        let leaving = self.shared.leaving.load(Ordering::Relaxed);
        tokio::spawn(async move {
            let status =
                if leaving { tonic_health::ServingStatus::NotServing } else { tonic_health::ServingStatus::Serving };
            reporter.set_service_status(CHAT_SERVICE, status).await;
        });
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchboard_proto::public::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(CHAT_SERVICE)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .build_v1()
            // The descriptor sets are compiled in: failing to read them is a bug the tests catch.
            .expect("the compiled descriptor sets are valid");
        tonic::service::Routes::new(self.grpc_service()).add_service(reflection).add_service(health)
    }

    /// Announces that the gateway will stop: `/readyz` answers 503 and the gRPC health `NOT_SERVING` from
    /// now on, so that load balancers stop sending it new connections, while it goes on serving every
    /// connection, new ones included, until [`Gateway::drain`]. Call it inside a tokio runtime.
    pub fn leave(&self) {
        self.shared.leaving.store(true, Ordering::Relaxed);
        let reporters = self.shared.grpc_health.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for reporter in reporters {
            tokio::spawn(async move {
                for service in ["", CHAT_SERVICE] {
                    reporter.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
                }
            });
        }
    }

    /// Closes every connection, and every new one at once: WebSockets with 1001 (going away), gRPC streams
    /// with UNAVAILABLE, each after the frames already written. Call it when the server shuts down, so that
    /// a graceful shutdown does not wait for long-lived streams (clients reconnect elsewhere and resume).
    pub fn drain(&self) {
        self.shared.draining.send_replace(true);
    }
}

/// The ticks of a heartbeat of the gateway (`None` once it is dropped); a tick missed waits for the next.
fn heartbeat_ticks(
    weak: &std::sync::Weak<Shared>,
    period: impl Fn(&GatewaySettings) -> Duration,
) -> Option<tokio::time::Interval> {
    let every = period(&weak.upgrade()?.settings).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Some(ticks)
}

/// Writes every signed-in agent connection to presence again, every `presence_heartbeat`, until the gateway
/// is dropped. A failure is logged once until presence works again.
async fn heartbeat(weak: std::sync::Weak<Shared>) {
    let Some(mut ticks) = heartbeat_ticks(&weak, |settings| settings.presence_heartbeat) else { return };
    let mut failing = false;
    loop {
        ticks.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        let sockets = shared.hub.agent_sockets();
        let shared_ref = &shared;
        let n_failed = futures_util::stream::iter(sockets)
            .map(|(socket, tenant, agent)| async move {
                let written = shared_ref.session_alive(socket, &tenant, &agent).await;
                // The connection ended while it was written: it must not stay alive until it expires.
                if shared_ref.hub.role(socket).is_none() {
                    shared_ref.session_gone(socket, &tenant, &agent).await;
                }
                written
            })
            .buffer_unordered(HEARTBEAT_CONCURRENCY)
            .filter(|written| std::future::ready(!written))
            .count()
            .await;
        match (n_failed, failing) {
            (0, true) => {
                info!("presence written again");
                failing = false;
            }
            (1.., false) => {
                warn!(n_failed, "presence cannot be written; agents' connections are written again every heartbeat");
                failing = true;
            }
            _ => {}
        }
    }
}

/// Writes every customer connection to presence again, all in one call, every `customer_heartbeat`, until
/// the gateway is dropped. A failure is logged once until presence works again.
async fn customer_heartbeat(weak: std::sync::Weak<Shared>) {
    let Some(mut ticks) = heartbeat_ticks(&weak, |settings| settings.customer_heartbeat) else { return };
    let mut failing = false;
    loop {
        ticks.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        let sessions: Vec<(SocketId, CustomerSession)> = shared
            .hub
            .customer_sockets()
            .into_iter()
            .map(|(socket, tenant, conversation)| (socket, shared.customer_session(socket, &tenant, conversation)))
            .collect();
        if sessions.is_empty() {
            continue;
        }
        let records: Vec<CustomerSession> = sessions.iter().map(|(_, session)| session.clone()).collect();
        let written = shared.customers_alive(&records).await;
        // Connections that ended while they were written must not stay alive until they expire. Their owner
        // is told again: its reading after the connection's own end may have met this write's revival.
        for (socket, session) in &sessions {
            if shared.hub.role(*socket).is_none() {
                shared.customer_gone(session).await;
                shared.tell_customer_connection(session.conversation);
            }
        }
        match (written, failing) {
            (true, true) => {
                info!("customers' connections written to presence again");
                failing = false;
            }
            (false, false) => {
                warn!(
                    n_sessions = records.len(),
                    "customers' connections cannot be written to presence; written again every customer heartbeat"
                );
                failing = true;
            }
            _ => {}
        }
    }
}

/// The read and write buffers of each WebSocket. tungstenite's default is 128 KiB each, allocated for every
/// connection and zeroed again before every read: most sockets are idle widgets sending frames of a few
/// hundred bytes, and a frame larger than the buffer still arrives whole (the buffer grows for it).
pub const WS_BUFFER_BYTES: usize = 8 * 1024;

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> impl IntoResponse {
    let forwarded_for = headers.get_all(addresses::X_FORWARDED_FOR).iter().filter_map(|value| value.to_str().ok());
    let client = shared.client_address(peer.map(|Extension(peer)| peer), forwarded_for);
    let max_frame = shared.settings.max_frame_bytes();
    let max_message_bytes = shared.settings.max_message_bytes;
    upgrade
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(WS_BUFFER_BYTES)
        .max_message_size(max_frame)
        // Checked on each frame's header too, before its payload is read (tungstenite's own default is 16 MiB).
        .max_frame_size(max_frame)
        // Counted from here: the session's task starts only once the upgrade is done (and hyper's connection
        // with it), and a shutdown in between must wait for it.
        .on_upgrade({
            let running = session::Running::new(&shared.sessions);
            move |socket| session::run(shared, ws::WsTransport::new(socket, max_message_bytes), client, running)
        })
}

/// `/healthz`: `ok`, or 503 with the reason while the [health check](Gateway::set_health_check) fails.
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    match shared.health_check.get().map(|check| check()) {
        Some(Err(reason)) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {reason}")).into_response(),
        _ => "ok".into_response(),
    }
}

/// `/readyz`: 503 `leaving` once the gateway was told it will stop, else as `/healthz`.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.leaving.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "leaving: this gateway is shutting down").into_response();
    }
    healthz(State(shared)).await
}

/// Unknown paths: 404, or UNIMPLEMENTED to a gRPC client (an unknown service or method).
async fn not_found(request: axum::extract::Request) -> Response {
    let content_type = request.headers().get(CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("");
    if content_type.starts_with("application/grpc") {
        let status = tonic::Status::unimplemented(format!("no such gRPC method: {}", request.uri().path()));
        return status.into_http();
    }
    StatusCode::NOT_FOUND.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_socket_is_tuned_to_find_a_peer_gone_without_a_word() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune_client_socket(&accepted).unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(accepted.nodelay().unwrap() && socket.keepalive().unwrap());
        assert_eq!(
            (socket.tcp_keepalive_time().unwrap(), socket.tcp_keepalive_interval().unwrap()),
            (KEEPALIVE_IDLE, KEEPALIVE_INTERVAL)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(UNACKNOWLEDGED_TIMEOUT));
    }

    #[test]
    fn the_presence_ttl_follows_the_heartbeat_unless_set() {
        let settings = GatewaySettings::default();
        assert_eq!(
            (settings.presence_heartbeat, settings.presence_ttl()),
            (Duration::from_secs(1), Duration::from_secs(3))
        );
        let slow = GatewaySettings { presence_heartbeat: Duration::from_secs(5), ..GatewaySettings::default() };
        assert_eq!(slow.presence_ttl(), Duration::from_secs(15));
        let set = GatewaySettings { presence_ttl: Some(Duration::from_millis(700)), ..slow };
        assert_eq!(set.presence_ttl(), Duration::from_millis(700));
    }
}
