//! The process-wide metrics recorder and its Prometheus exposition.

use std::sync::OnceLock;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tracing::warn;

use crate::names::*;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle), describes every metric
/// and sets `switchboard_build_info{role}`. Until this runs, the `metrics` macros record nothing, which is
/// what unit tests get.
pub fn install_metrics(role: &str) -> PrometheusHandle {
    let mut installed = false;
    let handle = HANDLE.get_or_init(|| {
        installed = true;
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), WAIT_BUCKETS)
            .and_then(|builder| {
                builder.set_buckets_for_metric(Matcher::Full(STORE_APPEND_BATCH_SIZE.into()), BATCH_SIZE_BUCKETS)
            })
            .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS));
        // The bucket lists are constants, never empty: a failure here is a bug caught by the tests.
        let builder = builder.expect("the bucket lists are valid");
        match builder.install_recorder() {
            Ok(handle) => handle,
            Err(error) => {
                // Another recorder is installed (a test process): render an empty one of our own.
                warn!(%error, "a metrics recorder was installed already");
                PrometheusBuilder::new().build_recorder().handle()
            }
        }
    });
    describe();
    // A few counters are shown from the start (at 0), not from their first event; set once, so that a later
    // call does not take back what was counted.
    if installed {
        metrics::counter!(GATEWAY_SLOW_CONSUMER_DISCONNECTS).absolute(0);
        for transport in ["websocket", "grpc", "http"] {
            metrics::counter!(GATEWAY_UNRESPONSIVE_DISCONNECTS, "transport" => transport).absolute(0);
        }
    }
    metrics::gauge!(BUILD_INFO, "role" => role.to_owned(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    handle.clone()
}

/// The exposition: every recorded metric, then the process metrics.
pub fn render_metrics() -> String {
    let mut text = HANDLE.get().map(PrometheusHandle::render).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&crate::process::render());
    text
}

/// `GET /metrics`, to merge into a role's HTTP routes.
pub fn metrics_routes() -> Router {
    Router::new().route("/metrics", get(metrics_page))
}

async fn metrics_page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render_metrics())
}

/// Serves `GET /metrics` on its own listener (the roles whose main port speaks only gRPC), in the
/// background.
pub fn serve_metrics(listener: TcpListener) {
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, metrics_routes()).await {
            warn!(%error, "the metrics endpoint stopped");
        }
    });
}

fn describe() {
    describe_gauge!(BUILD_INFO, "Always 1: the role and version of this process.");
    describe_counter!(GRPC_SERVER_REQUESTS, "gRPC calls served, by service, method and status code.");
    describe_counter!(
        GRPC_SERVER_STREAMS_ENDED,
        "gRPC streams ended, by service, method and the status they ended with (cancelled: the client left first)."
    );
    describe_histogram!(
        GRPC_SERVER_REQUEST_DURATION,
        "Time to answer a gRPC call (a streaming call: until its response headers)."
    );
    describe_gauge!(GATEWAY_CONNECTIONS, "Open client connections, by transport and role.");
    describe_gauge!(
        GATEWAY_CONNECTIONS_MAX,
        "The connections a gateway serves at once (limits.max_connections; 0: no limit)."
    );
    describe_counter!(GATEWAY_CONNECTIONS_OPENED, "Client connections accepted, by transport.");
    describe_counter!(GATEWAY_REQUESTS, "Client requests received, by request type.");
    describe_counter!(GATEWAY_REFUSALS, "Client requests refused, by error code.");
    describe_counter!(GATEWAY_SLOW_CONSUMER_DISCONNECTS, "Connections closed because their outbound queue was full.");
    describe_counter!(
        GATEWAY_UNRESPONSIVE_DISCONNECTS,
        "Client connections closed because they answered nothing, by transport: a WebSocket or an HTTP/2 (gRPC) \
         connection silent after a ping, a connection that did not say which protocol it speaks in time."
    );
    describe_histogram!(
        MESSAGE_LATENCY,
        "A message received by a gateway until written to the other side's connection."
    );
    describe_histogram!(
        OFFER_LATENCY,
        "A chat waiting for an offer (since it joined the queue, or since its previous offer ended) until the offer was written to the agent's connection."
    );
    describe_gauge!(ROUTER_ACTORS, "Actors alive on this router, by kind.");
    describe_gauge!(ROUTER_SHARDS_OWNED, "Shard leases this router holds.");
    describe_counter!(ROUTER_LEASE_RENEWALS, "Lease renewal rounds, by outcome.");
    describe_gauge!(QUEUE_WAITING_CHATS, "Chats waiting in a group's queue.");
    describe_gauge!(QUEUE_OLDEST_WAIT, "How long the head of a group's queue has waited.");
    describe_histogram!(QUEUE_WAIT, "How long chats waited in a group's queue before an agent accepted them.");
    describe_gauge!(QUEUE_WAIT_SLA, "The group's waiting-time SLA (only for a group that has one).");
    describe_gauge!(QUEUE_SLA_BREACHED_CHATS, "Chats waiting in a group's queue that have waited past its SLA.");
    describe_counter!(
        QUEUE_SLA_BREACHES,
        "Chats that left a group's queue (accepted, cancelled, abandoned or transferred) after waiting past its SLA."
    );
    describe_gauge!(GROUP_OPEN, "1 when the group is inside its business hours.");
    describe_gauge!(GROUP_AGENTS_SIGNED_IN, "Agents signed in to the group (online or away).");
    describe_gauge!(GROUP_AGENTS_ONLINE, "Agents of the group online (taking chats, whether or not at capacity).");
    describe_counter!(CHATS_STARTED, "Chats admitted.");
    describe_counter!(CHATS_FINISHED, "Chats ended, by reason (closed, cancelled, abandoned).");
    describe_counter!(CUSTOMERS_LEFT, "Customers of ongoing chats found gone for the grace period (customer_left).");
    describe_counter!(OFFERS_ENDED, "Offers ended, by reason.");
    describe_counter!(
        ROUTER_REPAIRS,
        "Routing state repaired from the store after a message between routers was lost."
    );
    describe_histogram!(
        STORE_APPEND_DURATION,
        "An append as its caller waits for it: queued for the writer, written in a batch, made durable."
    );
    describe_histogram!(STORE_APPEND_BATCH_DURATION, "One group-commit transaction of appends.");
    describe_histogram!(STORE_APPEND_BATCH_SIZE, "Appends per group-commit transaction.");
    describe_counter!(STORE_APPENDS, "Appends, by outcome.");
    describe_histogram!(
        STORE_WAL_SYNC_DURATION,
        "One sync of SQLite's write-ahead log, making every batch committed before it durable."
    );
    describe_gauge!(
        STORE_WRITER_FAILED,
        "1 once a sync of SQLite's write-ahead log failed, or the append writer's connection could not be put \
         back in order: every append fails until the process restarts."
    );
    describe_gauge!(LICENSE_SESSIONS_IN_USE, "Chat sessions holding a license permit.");
    describe_gauge!(LICENSE_SESSIONS_MAX, "The license limit of concurrent chat sessions; 0 is unlimited.");
}
