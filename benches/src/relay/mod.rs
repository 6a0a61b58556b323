//! The bare relay: the baseline Switchboard is compared with end to end. A tokio + axum WebSocket server built
//! with the same crates as the gateway, that speaks the subset of the public protocol the load generator's
//! `idle`, `storm` and `steady` scenarios use, with the same JSON frames (`docs/protocol.md`), and does the
//! least that subset needs: chats live in memory maps (sharded, behind mutexes) and are forgotten when they
//! close; nothing is stored, there are no actors, no queues, no cluster, no presence, no capacity or license.
//!
//! Like the gateway, every socket has a bounded outbound queue: a push is encoded once and queued to each
//! socket following its conversation (the sender's included), and a socket whose queue is full is closed
//! with 4008. Requests of a socket are handled one at a time, in order, each answered by exactly one frame.

pub mod frames;
mod session;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::relay::frames::ChatFacts;

/// How many locks the conversations are spread over.
const SHARDS: usize = 64;

/// What the relay answers with; none of it is checked against a configuration.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Told to clients in `welcome`; longer message bodies are refused with `message_too_large`.
    pub max_message_bytes: usize,
    /// Frames waiting for one socket before it is closed with 4008 (the gateway's default is 1024).
    pub outbound_queue_len: usize,
    /// The tenant named in agent objects.
    pub tenant: String,
    /// The groups `groups.list` answers; every agent is in all of them.
    pub groups: Vec<String>,
    /// Agent tokens `PREFIX<i>` sign in as agent `a<i>`; any other token signs in as itself.
    pub agent_token_prefix: String,
    /// The capacity shown in agent objects (not enforced).
    pub agent_capacity: u32,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            max_message_bytes: 4096,
            outbound_queue_len: 1024,
            tenant: "load".into(),
            groups: vec!["g0".into()],
            agent_token_prefix: "load-agent-token-".into(),
            agent_capacity: 3,
        }
    }
}

/// How a push reaches one socket.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) socket: u64,
    pub(crate) outbound: mpsc::Sender<Utf8Bytes>,
    pub(crate) kicked: Arc<Notify>,
}

impl Link {
    /// Queues a frame without waiting; a full queue kicks the socket (it is closed with 4008). False when the
    /// socket is gone.
    pub(crate) fn push(&self, text: Utf8Bytes) -> bool {
        match self.outbound.try_send(text) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kicked.notify_one();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A chat while it is open.
#[derive(Debug)]
pub(crate) struct Chat {
    pub(crate) facts: ChatFacts,
    /// The sockets following it: its customer, and the agent once accepted.
    pub(crate) followers: Vec<Link>,
    /// The highest `up_to_seq` confirmed by the customer and by the agent.
    pub(crate) delivered_marks: [u64; 2],
}

impl Chat {
    /// Queues `text` to every follower, forgetting those that are gone.
    pub(crate) fn push(&mut self, text: &Utf8Bytes) {
        self.followers.retain(|link| link.push(text.clone()));
    }
}

pub(crate) type Shard = HashMap<Uuid, Chat>;

/// The relay's state, shared by every socket.
#[derive(Debug)]
pub struct Relay {
    pub(crate) settings: RelaySettings,
    shards: Vec<Mutex<Shard>>,
    pub(crate) next_socket: AtomicU64,
    /// Agent sockets signed in now (`groups.list` shows it as `signed_in` of every group).
    pub(crate) n_agents: AtomicUsize,
}

impl Relay {
    pub fn new(settings: RelaySettings) -> Arc<Relay> {
        Arc::new(Relay {
            settings,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_socket: AtomicU64::new(1),
            n_agents: AtomicUsize::new(0),
        })
    }

    /// The lock holding `conversation`.
    pub(crate) fn shard(&self, conversation: Uuid) -> MutexGuard<'_, Shard> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        conversation.hash(&mut hasher);
        let index = (hasher.finish() % SHARDS as u64) as usize;
        self.shards[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Open chats, for tests.
    pub fn n_chats(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()).sum()
    }

    /// The routes: `/v1/ws` and `/healthz`.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/v1/ws", get(upgrade))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self.clone())
    }
}

/// The read and write buffers of each WebSocket: the gateway's (`switchboard_gateway::WS_BUFFER_BYTES`), so
/// that the comparison measures the work and not the buffer sizes.
pub const WS_BUFFER_BYTES: usize = 8 * 1024;

async fn upgrade(State(relay): State<Arc<Relay>>, upgrade: WebSocketUpgrade) -> impl IntoResponse {
    let max_frame = relay.settings.max_message_bytes.saturating_mul(4).max(64 * 1024);
    upgrade
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(WS_BUFFER_BYTES)
        .max_message_size(max_frame)
        .on_upgrade(move |socket| session::run(relay, socket))
}

/// Serves the relay on `listener` until the process ends, with TCP_NODELAY on every connection as the
/// gateway sets it.
pub async fn serve(listener: tokio::net::TcpListener, relay: Arc<Relay>) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, relay.routes()).await
}

/// Binds `address` and returns the listener and the address it got (for `127.0.0.1:0`).
pub async fn bind(address: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    Ok((listener, address))
}

/// Milliseconds since the Unix epoch, for the `*_ms` fields.
pub(crate) fn now_ms() -> i64 {
    // The relay is a benchmark baseline, not Switchboard: it reads the real clock directly.
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(0))
}

pub(crate) fn next_socket_id(relay: &Relay) -> u64 {
    relay.next_socket.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_relay_has_the_gateways_websocket_buffers() {
        assert_eq!(super::WS_BUFFER_BYTES, switchboard_gateway::WS_BUFFER_BYTES);
    }
}
