//! The gateway's port served: HTTP/1.1 (the WebSocket protocol, `/healthz`, and whatever routes are merged
//! in) and HTTP/2 (gRPC) on one listener, as `axum::serve` does, with what `axum::serve` cannot be told:
//!
//! - **HTTP/2 pings.** A gRPC client that sends nothing for [`GatewaySettings::idle_ping`] is pinged, and one
//!   that sends nothing, not even the ping's answer its HTTP/2 stack sends by itself, for as long again has its
//!   connection closed: its streams end, and with them its sessions (an agent leaves presence). The same rule
//!   as a WebSocket's pings (close code 4009); TCP keepalive finds the peers that are gone, this those still
//!   there that take no part (a process that hangs, or stopped reading).
//! - **Deadlines for connections that say nothing.** A connection whose first bytes do not tell HTTP/1.1
//!   from HTTP/2 within `idle_ping` (hyper's server would wait for them for good), and an HTTP/1.1 request
//!   whose headers take longer than that (a WebSocket handshake among them; and an idle keep-alive
//!   connection between requests), are closed, so that connections opened and left silent or half-spoken
//!   do not pile up.
//! - **Client sockets tuned** as they are accepted ([`tune_client_socket`]: no Nagle delay, keepalive).
//!
//! [`GatewaySettings::idle_ping`]: crate::GatewaySettings::idle_ping

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use switchboard_telemetry::names;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::addresses::Peer;
use crate::{Gateway, tune_client_socket};

/// How a [`Gateway::serve`] ended: its HTTP connections (the HTTP/2 ones of gRPC included) and its sessions
/// (an upgraded WebSocket, no longer the HTTP server's, is ended by its session: [`Gateway::drain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Every connection and session ended within the grace.
    Drained,
    /// The grace ran out with these still open (some may have been ending at that moment): HTTP connections
    /// (an HTTP/2 one with its gRPC session streams), and sessions (WebSockets, no longer their connection's;
    /// gRPC session streams, inside theirs). The connections were closed (the sessions end with the process).
    GaveUp { connections: usize, sessions: usize },
}

impl Gateway {
    /// Serves `routes` (the gateway's [`routes`](Gateway::routes), with any others merged in) on `listener`
    /// until `shutdown` completes; then accepts no more connections, asks every open one to end (HTTP/2:
    /// GOAWAY, its streams finish; HTTP/1.1: after the request under way) and waits at most `grace` for them
    /// and for every session (a WebSocket's until its close frame is written). Drain the gateway's sessions in
    /// `shutdown` ([`Gateway::drain`]): an upgraded WebSocket is no longer the server's, and a gRPC stream
    /// ends only when its session does.
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
        builder.http2().timer(TokioTimer::new()).keep_alive_interval(idle).keep_alive_timeout(idle);
        // Not offered: WebSockets over HTTP/2 (RFC 8441, which `axum::serve` offers). `/v1/ws` answers GET
        // only, the HTTP/1.1 handshake; browsers speak HTTP/2 only over TLS, which the gateway leaves to
        // whatever is in front of it.
        let (ending, _) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        'accepting: loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tokio::select! {
                                () = accept_failed(error) => continue,
                                () = &mut shutdown => break 'accepting,
                            }
                        }
                    };
                    if let Err(error) = tune_client_socket(&tcp) {
                        debug!(%error, %peer, "a client connection's socket options not set");
                    }
                    let connection = serve_connection(tcp, peer, builder.clone(), routes.clone(), ending.subscribe(), idle);
                    connections.spawn(connection);
                }
            }
        }
        drop(listener);
        ending.send_replace(true);
        let mut sessions = self.shared.sessions.subscribe();
        let (connections_open, sessions_open) = (connections.len(), *sessions.borrow());
        if connections_open + sessions_open > 0 {
            info!(
                connections = connections_open,
                sessions = sessions_open,
                ?grace,
                "waiting for client connections to end"
            );
        }
        let drained = tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
            let _ = sessions.wait_for(|running| *running == 0).await;
        });
        match drained.await {
            Ok(()) => Served::Drained,
            Err(_) => {
                let (sessions, connections_open) = (*self.shared.sessions.borrow(), connections.len());
                warn!(
                    connections = connections_open,
                    sessions,
                    ?grace,
                    "connections still open after the shutdown grace; closing them"
                );
                connections.abort_all();
                Served::GaveUp { connections: connections_open, sessions }
            }
        }
    }
}

/// Serves one client connection. Its first bytes are read here, until they tell HTTP/1.1 from HTTP/2 (as
/// hyper's server would read them, without a deadline): a connection that has not said which it speaks
/// within `idle` is closed. Then hyper serves it, the bytes read first given back to it ahead of the rest.
async fn serve_connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    builder: Builder<TokioExecutor>,
    routes: axum::Router,
    mut ending: watch::Receiver<bool>,
    idle: Duration,
) {
    let first = tokio::select! {
        first = tokio::time::timeout(idle, first_bytes(&mut tcp)) => first,
        // Shutting down: a connection that has asked for nothing yet is closed at once.
        _ = ending.wait_for(|ending| *ending) => return,
    };
    let first = match first {
        Ok(Ok(first)) => first,
        Ok(Err(error)) => {
            debug!(%error, %peer, "a client connection failed before its first request");
            return;
        }
        Err(_) => {
            debug!(%peer, ?idle, "a client connection said nothing of its protocol in time; closed");
            metrics::counter!(names::GATEWAY_UNRESPONSIVE_DISCONNECTS, "transport" => "http").increment(1);
            return;
        }
    };
    let http2 = first.as_slice() == HTTP2_PREFACE;
    let io = TokioIo::new(ReadFirst { first, at: 0, io: tcp });
    let service = WithPeer { peer: Peer(peer), inner: TowerToHyperService::new(routes) };
    let connection = builder.serve_connection_with_upgrades(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut asked_to_end = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    ended_with(&*error, peer, http2);
                }
                return;
            }
            changed = ending.wait_for(|ending| *ending), if !asked_to_end => {
                asked_to_end = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// A connection's service: each request carries the connection's peer in its extensions ([`Peer`], which the
/// chat starts per address count by).
struct WithPeer<S> {
    peer: Peer,
    inner: S,
}

impl<S: hyper::service::Service<hyper::Request<Incoming>>> hyper::service::Service<hyper::Request<Incoming>>
    for WithPeer<S>
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: hyper::Request<Incoming>) -> S::Future {
        request.extensions_mut().insert(self.peer);
        self.inner.call(request)
    }
}

/// What an HTTP/2 connection begins with (RFC 9113, 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes until they tell its protocol: all of HTTP/2's preface, or a byte that
/// differs from it (HTTP/1.1), or the end of the connection.
async fn first_bytes(tcp: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut first = [0; HTTP2_PREFACE.len()];
    let mut read = 0;
    while read < first.len() {
        let more = tcp.read(&mut first[read..]).await?;
        if more == 0 {
            break;
        }
        read += more;
        if first[..read] != HTTP2_PREFACE[..read] {
            break;
        }
    }
    Ok(first[..read].to_vec())
}

/// A connection whose first bytes were read already: they are read again, then the rest.
struct ReadFirst<T> {
    first: Vec<u8>,
    at: usize,
    io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadFirst<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.first.len() {
            let give = (this.first.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.first[this.at..this.at + give]);
            this.at += give;
            if this.at == this.first.len() {
                this.first = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadFirst<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A connection that ended with an error. An HTTP/2 connection that answered no ping is counted; an HTTP/1.1
/// connection closed by its headers' deadline is not: hyper's deadline also closes a keep-alive connection
/// left idle between requests, which is no fault of its client. (hyper's deadlines are its only timeouts
/// here: a ping's on HTTP/2, the headers' on HTTP/1.1.)
fn ended_with(error: &(dyn std::error::Error + 'static), peer: SocketAddr, http2: bool) {
    let timed_out = error.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
    match (timed_out, http2) {
        (true, true) => {
            debug!(%error, %peer, "a client connection answered no HTTP/2 ping; closed");
            metrics::counter!(names::GATEWAY_UNRESPONSIVE_DISCONNECTS, "transport" => "grpc").increment(1);
        }
        (true, false) => debug!(%peer, "a client connection sent no request's headers in time; closed"),
        (false, _) => debug!(%error, %peer, "a client connection ended with an error"),
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
