//! The gateway: the client edge of Switchboard. It terminates WebSocket connections that speak the public
//! JSON protocol ([`protocol`], documented in `docs/protocol.md`), authenticates customers (widget key, then
//! the chat's customer token) and agents (their token), forwards every request to the router, and fans the
//! router's pushes out to its own sockets through the [`hub`].
//!
//! It holds no chat state beyond its sockets and never meets the database.

pub mod hub;
pub mod protocol;
mod session;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::{State, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use switchboard_domain::{Clock, Directory};
use switchboard_proto::router::{GatewayId, RouterApi};
use tokio::sync::mpsc;

use crate::hub::Hub;

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

pub(crate) struct Shared {
    pub(crate) settings: GatewaySettings,
    pub(crate) gateway_id: GatewayId,
    pub(crate) router: Arc<dyn RouterApi>,
    pub(crate) directory: Arc<Directory>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) hub: Hub,
    pub(crate) next_socket_id: AtomicU64,
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

    /// The HTTP routes: `/v1/ws` (the WebSocket protocol) and `/healthz`.
    pub fn http_routes(&self) -> axum::Router {
        axum::Router::new()
            .route("/v1/ws", get(upgrade))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self.shared.clone())
    }
}

async fn upgrade(State(shared): State<Arc<Shared>>, upgrade: WebSocketUpgrade) -> impl IntoResponse {
    // Frames a little over the body limit are still read, so that the client gets a clear
    // `message_too_large` error instead of a dropped connection; far larger ones close it (1009).
    let max_frame = shared.settings.max_message_bytes.saturating_mul(4).max(64 * 1024);
    upgrade.max_message_size(max_frame).on_upgrade(move |socket| session::run(shared, socket))
}
