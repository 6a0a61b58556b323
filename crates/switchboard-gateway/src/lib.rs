//! The gateway: the client edge of Switchboard. It terminates client connections that speak the public
//! protocol ([`protocol`], documented in `docs/protocol.md`) over either transport: WebSocket with JSON text
//! frames (`/v1/ws`, for browsers) or gRPC (`switchboard.v1.ChatService`, one bidirectional stream per
//! connection, for other clients). It authenticates customers (widget key, then the chat's customer token)
//! and agents (their token), forwards every request to the router, and fans the router's pushes out to its
//! own connections through the [`hub`].
//!
//! One session implementation (`session.rs`) serves both transports; `ws.rs` and `grpc.rs` only translate
//! frames. The gateway holds no chat state beyond its connections and never meets the database.

mod grpc;
pub mod hub;
pub mod protocol;
mod session;
mod ws;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use switchboard_domain::{Clock, Directory};
use switchboard_proto::public::v1::chat_service_server::ChatServiceServer;
use switchboard_proto::router::{GatewayId, RouterApi};
use tokio::sync::{mpsc, watch};

pub use crate::grpc::{ChatGrpc, SessionStream};
use crate::hub::Hub;
pub use crate::ws::{CLOSE_GOING_AWAY, CLOSE_MESSAGE_TOO_BIG, CLOSE_SLOW_CONSUMER};

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
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings { gateway_id: "gateway".into(), max_message_bytes: 4096, outbound_queue_len: 1024 }
    }
}

impl GatewaySettings {
    /// The largest client frame read (a WebSocket frame, a gRPC `ClientFrame`). Frames a little over the body
    /// limit are still read, so that the client gets a clear `message_too_large` error instead of a dropped
    /// connection; far larger ones end the connection.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_message_bytes.saturating_mul(4).max(64 * 1024)
    }
}

pub(crate) struct Shared {
    pub(crate) settings: GatewaySettings,
    pub(crate) gateway_id: GatewayId,
    pub(crate) router: Arc<dyn RouterApi>,
    pub(crate) directory: Arc<Directory>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) hub: Hub,
    pub(crate) next_socket_id: AtomicU64,
    /// True once the gateway drains: every connection is closed (and new ones at once).
    pub(crate) draining: watch::Sender<bool>,
}

#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("settings", &self.shared.settings).finish()
    }
}

impl Gateway {
    /// Connects to the router and starts dispatching its pushes to this gateway's sockets.
    pub fn start(
        settings: GatewaySettings,
        router: Arc<dyn RouterApi>,
        directory: Arc<Directory>,
        clock: Arc<dyn Clock>,
    ) -> Gateway {
        let gateway_id = GatewayId(settings.gateway_id.clone());
        let shared = Arc::new(Shared {
            settings,
            gateway_id: gateway_id.clone(),
            router,
            directory,
            clock,
            hub: Hub::default(),
            next_socket_id: AtomicU64::new(1),
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
                shared.hub.dispatch(push);
            }
        });
        Gateway { shared }
    }

    /// Everything a gateway serves, on one port: the WebSocket protocol (`/v1/ws`), `/healthz`, and over
    /// HTTP/2 the gRPC [`CHAT_SERVICE`] with reflection ([`Gateway::grpc_routes`]). Serve it with
    /// `axum::serve` (which speaks HTTP/1.1 and HTTP/2 on the same port). Other paths are 404, or the gRPC
    /// status UNIMPLEMENTED for gRPC requests.
    pub fn routes(&self) -> axum::Router {
        self.http_routes().merge(self.grpc_routes().into_axum_router()).fallback(not_found)
    }

    /// The HTTP routes only: `/v1/ws` (the WebSocket protocol) and `/healthz`.
    pub fn http_routes(&self) -> axum::Router {
        axum::Router::new()
            .route("/v1/ws", get(upgrade))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self.shared.clone())
    }

    /// The public gRPC service alone, `switchboard.v1.ChatService`, to add to a tonic server of one's own
    /// (its reflection can register `switchboard_proto::public::v1::FILE_DESCRIPTOR_SET`).
    pub fn grpc_service(&self) -> ChatServiceServer<ChatGrpc> {
        ChatServiceServer::new(ChatGrpc::new(self.shared.clone()))
            .max_decoding_message_size(self.shared.settings.max_frame_bytes())
    }

    /// The gRPC routes: [`Gateway::grpc_service`], the standard health service (`grpc.health.v1`: the chat
    /// service and `""` SERVING) and reflection (`grpc.reflection.v1`) describing them. Call it inside a
    /// tokio runtime.
    pub fn grpc_routes(&self) -> tonic::service::Routes {
        let (reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(async move {
            reporter.set_service_status(CHAT_SERVICE, tonic_health::ServingStatus::Serving).await;
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

    /// Closes every connection, and every new one at once: WebSockets with 1001 (going away), gRPC streams
    /// with UNAVAILABLE, each after the frames already written. Call it when the server shuts down, so that
    /// a graceful shutdown does not wait for long-lived streams (clients reconnect elsewhere and resume).
    pub fn drain(&self) {
        self.shared.draining.send_replace(true);
    }
}

async fn upgrade(State(shared): State<Arc<Shared>>, upgrade: WebSocketUpgrade) -> impl IntoResponse {
    let max_frame = shared.settings.max_frame_bytes();
    let max_message_bytes = shared.settings.max_message_bytes;
    upgrade
        .max_message_size(max_frame)
        .on_upgrade(move |socket| session::run(shared, ws::WsTransport::new(socket, max_message_bytes)))
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
