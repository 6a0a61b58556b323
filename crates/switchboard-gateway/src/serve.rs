//! The gateway's port served: HTTP/1.1 (the WebSocket protocol, `/healthz`, and whatever routes are merged
//! in) and HTTP/2 (gRPC) on one listener, as `axum::serve` does, with what `axum::serve` cannot be told:
//!
//! - **HTTP/2 pings.** A gRPC client that sends nothing for [`GatewaySettings::idle_ping`] is pinged, and one
//!   that sends nothing, not even the ping's answer its HTTP/2 stack sends by itself, for as long again has its
//!   connection closed: its streams end, and with them its sessions (an agent leaves presence). The same rule
//!   as a WebSocket's pings (close code 4009); TCP keepalive finds the peers that are gone, this those still
//!   there that take no part (a process that hangs, or stopped reading).
//! - **A deadline for a request's headers.** An HTTP/1.1 client that takes longer than `idle_ping` to send a
//!   request's headers (a WebSocket handshake among them) is disconnected, so that connections opened and
//!   left half-spoken do not pile up.
//! - **Client sockets tuned** as they are accepted ([`tune_client_socket`]: no Nagle delay, keepalive).
//!
//! [`GatewaySettings::idle_ping`]: crate::GatewaySettings::idle_ping

use std::future::Future;
use std::io;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use switchboard_telemetry::names;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::{Gateway, tune_client_socket};

/// How a [`Gateway::serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Every connection ended within the grace.
    Drained,
    /// The grace ran out with this many connections still open; they were closed.
    GaveUp { open: usize },
}

impl Gateway {
    /// Serves `routes` (the gateway's [`routes`](Gateway::routes), with any others merged in) on `listener`
    /// until `shutdown` completes; then accepts no more connections, asks every open one to end (HTTP/2:
    /// GOAWAY, its streams finish; HTTP/1.1: after the request under way) and waits at most `grace` for them.
    /// Drain the gateway's sessions in `shutdown` ([`Gateway::drain`]): an upgraded WebSocket is no longer
    /// the server's, and a gRPC stream ends only when its session does.
    pub async fn serve(
        &self,
        listener: TcpListener,
        routes: axum::Router,
        shutdown: impl Future<Output = ()> + Send,
        grace: Duration,
    ) -> Served {
        let idle = self.shared.settings.idle_ping;
        let mut builder = Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(idle);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(idle)
            .keep_alive_timeout(idle)
            // WebSockets over HTTP/2 (RFC 8441), as `axum::serve` allows.
            .enable_connect_protocol();
        let (ending, _) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            accept_failed(error).await;
                            continue;
                        }
                    };
                    if let Err(error) = tune_client_socket(&tcp) {
                        debug!(%error, %peer, "a client connection's socket options not set");
                    }
                    let builder = builder.clone();
                    let service = TowerToHyperService::new(routes.clone());
                    let mut ending = ending.subscribe();
                    connections.spawn(async move {
                        let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                        let mut connection = std::pin::pin!(connection);
                        let mut asked_to_end = false;
                        loop {
                            tokio::select! {
                                served = connection.as_mut() => {
                                    if let Err(error) = served {
                                        ended_with(&*error, peer);
                                    }
                                    break;
                                }
                                changed = ending.wait_for(|ending| *ending), if !asked_to_end => {
                                    asked_to_end = true;
                                    if changed.is_ok() {
                                        connection.as_mut().graceful_shutdown();
                                    }
                                }
                            }
                        }
                    });
                }
            }
        }
        drop(listener);
        ending.send_replace(true);
        let open = connections.len();
        if open > 0 {
            info!(open, ?grace, "waiting for client connections to end");
        }
        let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} });
        match drained.await {
            Ok(()) => Served::Drained,
            Err(_) => {
                let open = connections.len();
                warn!(open, ?grace, "connections still open after the shutdown grace; closing them");
                connections.abort_all();
                Served::GaveUp { open }
            }
        }
    }
}

/// A connection that ended with an error: one closed for answering nothing is counted
/// (`switchboard_gateway_unresponsive_disconnects_total`), by what it failed to answer.
fn ended_with(error: &(dyn std::error::Error + 'static), peer: std::net::SocketAddr) {
    let unanswered = error.downcast_ref::<hyper::Error>().filter(|error| error.is_timeout()).map(|error| {
        // hyper's two deadlines here: an HTTP/1.1 request's headers (an error of its own kind, without a
        // cause) and an HTTP/2 ping (an HTTP/2 error caused by the ping's timeout).
        if std::error::Error::source(error).is_some() { "grpc" } else { "http" }
    });
    match unanswered {
        Some(transport) => {
            debug!(%error, %peer, transport, "a client connection answered nothing; closed");
            metrics::counter!(names::GATEWAY_UNRESPONSIVE_DISCONNECTS, "transport" => transport).increment(1);
        }
        None => debug!(%error, %peer, "a client connection ended with an error"),
    }
}

/// An accept that failed: a connection reset before it was taken is nothing; anything else (out of file
/// descriptors, say) is logged and the listener rests a moment rather than spin.
async fn accept_failed(error: io::Error) {
    match error.kind() {
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused => {
            debug!(%error, "a connection ended before it was accepted");
        }
        _ => {
            error!(%error, "accepting a client connection failed; trying again in 1 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
