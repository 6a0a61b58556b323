//! An OTLP/gRPC trace receiver on loopback: what a collector would get from the processes under test, kept in
//! memory for the test to inspect.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

/// One span as received, with the attributes of the resource (the process) that exported it. Ids are lower-case
/// hex, as in a `traceparent`; attribute values are rendered as text.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// `server`, `client`, `producer`, `consumer`, `internal` or `unspecified`.
    pub kind: &'static str,
    pub attributes: BTreeMap<String, String>,
    /// The resource's attributes: `service.name`, `process.pid`, ...
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    /// The resource's `service.name`.
    pub fn service_name(&self) -> Option<&str> {
        self.resource.get("service.name").map(String::as_str)
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

impl std::fmt::Display for ReceivedSpan {
    /// One line: service, pid, name, kind, then the ids and the span's attributes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pid={} {:?} ({}) trace={} span={} parent={} {:?}",
            self.service_name().unwrap_or("?"),
            self.resource.get("process.pid").map_or("?", String::as_str),
            self.name,
            self.kind,
            self.trace_id,
            self.span_id,
            self.parent_span_id.as_deref().unwrap_or("-"),
            self.attributes
        )
    }
}

/// The spans received so far; the watch counts them, so that a waiter wakes on each export.
#[derive(Debug)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    count: watch::Sender<usize>,
}

impl Received {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ReceivedSpan>> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct Collector(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = received_spans(request.into_inner());
        let count = {
            let mut all = self.0.lock();
            all.extend(spans);
            all.len()
        };
        self.0.count.send_replace(count);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// An OTLP/gRPC trace receiver on `127.0.0.1` (a free port), stopped when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    address: SocketAddr,
    received: Arc<Received>,
    server: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Starts the receiver; it accepts exports as soon as this returns. Call it inside a tokio runtime.
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind the OTLP receiver")?;
        let address = listener.local_addr()?;
        let received = Arc::new(Received { spans: Mutex::new(Vec::new()), count: watch::Sender::new(0) });
        let service = TraceServiceServer::new(Collector(received.clone()));
        let incoming = TcpIncoming::from(listener);
        let server = tokio::spawn(async move {
            if let Err(error) =
                tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await
            {
                eprintln!("the OTLP receiver stopped: {error}");
            }
        });
        Ok(OtlpReceiver { address, received, server })
    }

    /// Where exporters send spans: `http://127.0.0.1:PORT` (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.lock().clone()
    }

    /// Evaluates `check` on the spans received so far, and again after each export, until it returns `Ok`;
    /// past `deadline` returns its last `Err` (which should say what is still missing).
    pub async fn wait_for<T, E>(
        &self,
        deadline: Duration,
        mut check: impl FnMut(&[ReceivedSpan]) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut exports = self.received.count.subscribe();
        let end = tokio::time::Instant::now() + deadline;
        loop {
            // Marked seen before the spans are read: an export after this read wakes the wait below.
            exports.borrow_and_update();
            let outcome = check(&self.received.lock());
            if outcome.is_ok() {
                return outcome;
            }
            match tokio::time::timeout_at(end, exports.changed()).await {
                Ok(Ok(())) => {}
                // Past the deadline (or the receiver is gone): a last look, then the answer as it stands.
                Ok(Err(_)) | Err(_) => return check(&self.received.lock()),
            }
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn received_spans(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = attributes(resource_spans.resource.map(|resource| resource.attributes).unwrap_or_default());
        for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
            spans.push(ReceivedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: (!span.parent_span_id.is_empty()).then(|| hex(&span.parent_span_id)),
                kind: kind_name(span.kind),
                name: span.name,
                attributes: attributes(span.attributes),
                resource: resource.clone(),
            });
        }
    }
    spans
}

fn kind_name(kind: i32) -> &'static str {
    match SpanKind::try_from(kind) {
        Ok(SpanKind::Server) => "server",
        Ok(SpanKind::Client) => "client",
        Ok(SpanKind::Producer) => "producer",
        Ok(SpanKind::Consumer) => "consumer",
        Ok(SpanKind::Internal) => "internal",
        Ok(SpanKind::Unspecified) | Err(_) => "unspecified",
    }
}

fn attributes(attributes: Vec<KeyValue>) -> BTreeMap<String, String> {
    attributes
        .into_iter()
        .map(|attribute| (attribute.key, attribute.value.as_ref().map(text).unwrap_or_default()))
        .collect()
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::BoolValue(value)) => value.to_string(),
        Some(any_value::Value::IntValue(value)) => value.to_string(),
        Some(any_value::Value::DoubleValue(value)) => value.to_string(),
        Some(any_value::Value::BytesValue(bytes)) => hex(bytes),
        Some(any_value::Value::ArrayValue(array)) => {
            format!("[{}]", array.values.iter().map(text).collect::<Vec<_>>().join(", "))
        }
        Some(any_value::Value::KvlistValue(list)) => format!("{:?}", attributes(list.values.clone())),
        // A string-table index (profiles) has no text of its own.
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
