//! Traces: the subscriber of a process (log lines, and OTLP export when configured), and the context that
//! follows one request across processes and actors.
//!
//! Across gRPC a call carries the W3C `traceparent` of the caller's span and, when the call serves a client
//! request, `x-switchboard-received-at-us`: when that request reached its first gateway (microseconds since
//! the Unix epoch). The server side ([`crate::GrpcServerLayer`]) makes its span a child of the caller's and
//! scopes the received-at moment over the call, so that the router's actors can carry it on to the pushes
//! that deliver the request's result.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The header that carries the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The header that carries when a client request reached its first gateway.
pub const RECEIVED_AT_HEADER: &str = "x-switchboard-received-at-us";

/// Whether spans are exported: without an exporter no trace context is made or carried.
static EXPORTING: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    static RECEIVED_AT_US: i64;
}

/// Flushes and stops the span exporter (if any) when dropped: keep it alive for the life of the process.
#[derive(Debug)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Whether spans are exported.
    pub fn exports(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("the span exporter did not shut down cleanly: {error}");
        }
    }
}

/// Installs the process's subscriber: log lines filtered by `RUST_LOG` (else `default_filter`) and, when
/// `otlp_endpoint` is given, every span exported over OTLP/gRPC as service `service`. Without an endpoint no
/// exporter is installed (nothing tries to reach a collector). Call it inside the tokio runtime.
pub fn init_tracing(service: &str, otlp_endpoint: Option<&str>, default_filter: &str) -> anyhow::Result<TracingGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let fmt = tracing_subscriber::fmt::layer().with_filter(log_filter(default_filter));
    let Some(endpoint) = otlp_endpoint.filter(|endpoint| !endpoint.is_empty()) else {
        tracing_subscriber::registry().with(fmt).try_init()?;
        return Ok(TracingGuard { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource(service)).build();
    let tracer = provider.tracer("switchboard");
    // Spans are exported at INFO and above whatever the log filter says.
    let otel =
        tracing_opentelemetry::layer().with_tracer(tracer).with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry().with(fmt).with(otel).try_init()?;
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(TracingGuard { provider: Some(provider) })
}

/// What the log lines show: the events `RUST_LOG` (else `default_filter`) enables and, only when it enables
/// something at DEBUG or finer, the spans around them.
///
/// A span the log shows has its fields formatted when it is made, whether or not anything is logged inside it:
/// at INFO (the default) that was a few percent of the CPU of a message's path (a `gateway.request`, a
/// `conversation.command` and a `grpc.server` span each). Without an exporter a span nobody shows is not made
/// at all; with one, it is exported whatever this filter says.
fn log_filter<S>(default_filter: &str) -> impl tracing_subscriber::layer::Filter<S> + use<S> {
    log_filter_of(EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()))
}

/// [`log_filter`] with `events` as the events' filter.
fn log_filter_of<S>(events: EnvFilter) -> impl tracing_subscriber::layer::Filter<S> + use<S> {
    use tracing_subscriber::filter::{FilterExt, LevelFilter, filter_fn};
    let spans_shown = spans_shown(events.max_level_hint());
    // The hint keeps the events' finest level as the process's (`log` records finer than it are not even made).
    let spans = filter_fn(move |metadata| spans_shown || !metadata.is_span()).with_max_level_hint(LevelFilter::TRACE);
    events.and(spans)
}

/// Whether the log shows spans, given the finest level it shows.
fn spans_shown(finest: Option<tracing_subscriber::filter::LevelFilter>) -> bool {
    finest.is_none_or(|finest| finest >= tracing_subscriber::filter::LevelFilter::DEBUG)
}

/// The resource of the process's spans: `service` as `service.name` (the role: every gateway has the same one),
/// and `process.pid`, which tells the processes of one role apart; `OTEL_RESOURCE_ATTRIBUTES` adds others.
fn resource(service: &str) -> Resource {
    Resource::builder()
        .with_service_name(service.to_owned())
        .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
        .build()
}

/// The W3C `traceparent` of the current span; `None` when it is not traced (no exporter, or not sampled).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` of `span`; `None` when it is not traced.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span `traceparent` (nothing happens when it does not parse).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Runs `future` with `received_at_us` as the moment its client request reached the first gateway.
pub async fn with_received_at<F: Future>(received_at_us: i64, future: F) -> F::Output {
    RECEIVED_AT_US.scope(received_at_us, future).await
}

/// When the client request being served reached its first gateway, if this task serves one.
pub fn received_at_us() -> Option<i64> {
    RECEIVED_AT_US.try_with(|at| *at).ok()
}

/// Adds the current trace context and received-at moment to an outgoing gRPC call.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(traceparent) = current_traceparent()
        && let Ok(value) = traceparent.parse()
    {
        metadata.insert(TRACEPARENT, value);
    }
    if let Some(at) = received_at_us()
        && let Ok(value) = at.to_string().parse()
    {
        metadata.insert(RECEIVED_AT_HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_received_at_moment_is_scoped_to_its_future() {
        assert_eq!(received_at_us(), None);
        let inside = with_received_at(42, async { received_at_us() }).await;
        assert_eq!(inside, Some(42));
        assert_eq!(received_at_us(), None);
        let mut metadata = tonic::metadata::MetadataMap::new();
        with_received_at(7, async { inject(&mut metadata) }).await;
        assert_eq!(metadata.get(RECEIVED_AT_HEADER).and_then(|value| value.to_str().ok()), Some("7"));
        // Without a tracing layer there is no trace to carry.
        assert!(metadata.get(TRACEPARENT).is_none());
    }

    #[test]
    fn the_log_shows_spans_only_when_it_shows_debug_lines() {
        use tracing_subscriber::filter::LevelFilter;
        assert!(!spans_shown(Some(LevelFilter::INFO)));
        assert!(!spans_shown(Some(LevelFilter::WARN)));
        assert!(spans_shown(Some(LevelFilter::DEBUG)));
        assert!(spans_shown(Some(LevelFilter::TRACE)));
        // No hint: a filter that cannot tell (dynamic directives) may show anything.
        assert!(spans_shown(None));
    }

    #[test]
    fn the_log_filter_keeps_the_finest_level_of_its_events() {
        use tracing_subscriber::filter::LevelFilter;
        use tracing_subscriber::layer::Filter;
        type S = tracing_subscriber::Registry;
        // Without the hint `log` records of every level (tungstenite's traces) would reach the subscriber.
        let hint = |directives: &str| Filter::<S>::max_level_hint(&log_filter_of::<S>(EnvFilter::new(directives)));
        assert_eq!(hint("info,sqlx=warn"), Some(LevelFilter::INFO));
        assert_eq!(hint("warn,switchboard_router=debug"), Some(LevelFilter::DEBUG));
    }

    #[test]
    fn the_resource_names_the_role_and_the_process() {
        let resource = resource("switchboard-gateway");
        let get = |key: &'static str| resource.get(&opentelemetry::Key::from_static_str(key));
        assert_eq!(get("service.name"), Some("switchboard-gateway".into()));
        assert_eq!(get("process.pid"), Some(i64::from(std::process::id()).into()));
    }
}
