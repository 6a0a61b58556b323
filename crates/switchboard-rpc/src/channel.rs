//! The client side of a connection: one lazily connected channel per server, its settings, and the
//! per-request deadline.

use std::future::Future;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// The largest message a client or server of this crate encodes or decodes (a long transcript or a full
/// placement is far below it; tonic's default of 4 MiB is not).
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How a client reaches a server.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// How long establishing a TCP connection may take.
    pub connect_timeout: Duration,
    /// How long a unary call may take, connecting included; it is also sent as the gRPC deadline. Opening a
    /// stream is bounded by it; a stream once open is not.
    pub request_timeout: Duration,
    /// How often an HTTP/2 PING is sent on a connection, idle or not, to notice a dead peer.
    pub keepalive_interval: Duration,
    /// How long the answer to a PING may take before the connection is considered dead.
    pub keepalive_timeout: Duration,
    /// A push stream on which no frame (not even a keepalive) arrives for this long is considered dead.
    /// Keep it a few times the server's keepalive interval.
    pub push_idle_timeout: Duration,
    /// The first wait before reopening a push stream that failed; it doubles up to `reconnect_max`.
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            push_idle_timeout: Duration::from_secs(20),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// A channel to `url` (`http://host:port`; a bare `host:port` is taken as `http`) that connects on first
/// use and reconnects by itself after the server went away, so that a server that starts later or restarts
/// is reached again without rebuilding the client.
pub(crate) fn lazy_channel(url: &str, settings: &ClientSettings) -> Result<Channel, String> {
    let url = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
    let endpoint =
        Endpoint::from_shared(url.clone()).map_err(|error| format!("bad server address {url:?}: {error}"))?;
    Ok(endpoint
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Runs one unary call with the request timeout: sent to the server as the gRPC deadline, and enforced here
/// as well, so that a server that does not answer at all (stopped, partitioned) cannot hold the caller.
pub(crate) async fn unary<M, R, F, Fut>(timeout: Duration, message: M, call: F) -> Result<R, Status>
where
    F: FnOnce(Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    // The trace of the caller, and when the client request being served reached its gateway.
    switchboard_telemetry::trace::inject(request.metadata_mut());
    match tokio::time::timeout(timeout, call(request)).await {
        Ok(result) => result.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {timeout:?}"))),
    }
}
