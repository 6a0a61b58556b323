//! What SREs see of a process: Prometheus metrics, OpenTelemetry traces, and the trace context that
//! crosses gRPC and actor hops. `docs/observability.md` is the catalogue of every metric; [`names`] holds
//! the same names for the code.
//!
//! - [`install_metrics`] installs the process-wide recorder (histograms with explicit buckets, never
//!   summaries) once; [`render_metrics`] is the exposition, the process metrics included; [`metrics_routes`]
//!   serves it at `GET /metrics`.
//! - [`init_tracing`] installs the log output and, only when an OTLP endpoint is configured, the span
//!   exporter.
//! - [`trace`]: the W3C `traceparent` of the current span, a span with a remote parent, and the moment a
//!   client request reached its first gateway (a task-local that crosses gRPC as a header).
//! - [`GrpcServerLayer`]: per-call metrics and the server span of every gRPC call, its parent taken from the
//!   caller's `traceparent`.

mod exposition;
mod grpc;
pub mod names;
mod process;
pub mod trace;

pub use exposition::{install_metrics, metrics_routes, render_metrics, serve_metrics};
pub use grpc::{GrpcServerLayer, GrpcServerService, StreamEnd, serve_streamed_call};
pub use trace::{TracingGuard, init_tracing};
