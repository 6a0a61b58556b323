//! The server side of every gRPC call: its metrics, and its span as a child of the caller's.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{Request, Response};
use prost::Message;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::names::{GRPC_SERVER_REQUEST_DURATION, GRPC_SERVER_REQUESTS, GRPC_SERVER_STREAMS_ENDED};
use crate::trace::{RECEIVED_AT_HEADER, TRACEPARENT, set_remote_parent, with_received_at};

/// Counts every call by service, method and status code, times it, and serves it inside a `grpc.server`
/// span whose parent is the caller's `traceparent`, with the caller's received-at moment in scope. A call
/// of a streaming method is counted once more when its stream ends, by the status it ended with
/// ([`StreamEnd`]): its first count, at its response's headers, says only that it began.
///
/// The labels are bounded: a call to a method the server does not know (the path is the client's to
/// choose) counts as service and method `unknown`.
#[derive(Debug, Clone)]
pub struct GrpcServerLayer {
    /// `/package.Service/Method` of every method served, and whether it streams.
    known: Arc<HashMap<String, bool>>,
}

impl GrpcServerLayer {
    /// Labels calls to the methods of `descriptor_sets` (encoded `FileDescriptorSet`s, as compiled in for
    /// reflection) by their service and method, and any other as `unknown`.
    pub fn new(descriptor_sets: &[&[u8]]) -> GrpcServerLayer {
        GrpcServerLayer { known: Arc::new(method_paths(descriptor_sets)) }
    }
}

/// `/package.Service/Method` of every method described in `descriptor_sets`, and whether it streams (either
/// way); a set that does not decode adds nothing (they are compiled in: the tests catch it).
fn method_paths(descriptor_sets: &[&[u8]]) -> HashMap<String, bool> {
    let mut paths = HashMap::new();
    for encoded in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*encoded) else { continue };
        for file in &set.file {
            for service in &file.service {
                let qualified = match file.package() {
                    "" => service.name().to_owned(),
                    package => format!("{package}.{}", service.name()),
                };
                for method in &service.method {
                    let streams = method.client_streaming() || method.server_streaming();
                    paths.insert(format!("/{qualified}/{}", method.name()), streams);
                }
            }
        }
    }
    paths
}

impl<S> Layer<S> for GrpcServerLayer {
    type Service = GrpcServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerService { inner, known: self.known.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcServerService<S> {
    inner: S,
    known: Arc<HashMap<String, bool>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, RB> Service<Request<B>> for GrpcServerService<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<StreamEnd<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (service, method, streams) = service_and_method(request.uri().path(), &self.known);
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = request.uri().path(),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        let header = |name: &str| request.headers().get(name).and_then(|value| value.to_str().ok());
        if let Some(traceparent) = header(TRACEPARENT) {
            set_remote_parent(&span, traceparent);
        }
        let received_at: Option<i64> = header(RECEIVED_AT_HEADER).and_then(|value| value.parse().ok());
        // The inner service is ready (poll_ready); the clone takes its place for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let started = tokio::time::Instant::now();
        let call = {
            let _entered = span.enter();
            inner.call(request)
        };
        Box::pin(async move {
            let call = call.instrument(span);
            let result = match received_at {
                Some(at) => with_received_at(at, call).await,
                None => call.await,
            };
            // A call that failed answers its status in the headers (trailers-only); a successful unary call
            // answers it in the trailers, after these headers, and a stream when it ends.
            let answered = match &result {
                Ok(response) => grpc_status(response.headers()),
                Err(_) => Some("unavailable"),
            };
            let code = answered.unwrap_or("ok");
            metrics::counter!(GRPC_SERVER_REQUESTS, "service" => service.clone(), "method" => method.clone(), "code" => code)
                .increment(1);
            metrics::histogram!(GRPC_SERVER_REQUEST_DURATION, "service" => service.clone(), "method" => method.clone())
                .record(started.elapsed().as_secs_f64());
            let pending = match (streams, answered) {
                (false, _) => None,
                (true, Some(code)) => {
                    count_stream_end(service, method, code);
                    None
                }
                (true, None) => Some((service, method)),
            };
            result.map(|response| response.map(|inner| StreamEnd { inner, pending }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A gRPC response's body that counts its stream's end (`switchboard_grpc_server_streams_ended_total`) by
    /// the status in its trailers; a stream whose body is dropped before them (the client, or its connection,
    /// went away) ends `cancelled`. A unary call's body passes through uncounted.
    pub struct StreamEnd<B> {
        #[pin]
        inner: B,
        // The service and method of a stream whose end is still to be counted.
        pending: Option<(String, String)>,
    }

    impl<B> PinnedDrop for StreamEnd<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some((service, method)) = this.project().pending.take() {
                count_stream_end(service, method, "cancelled");
            }
        }
    }
}

impl<B: http_body::Body> http_body::Body for StreamEnd<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        // A unary call's body, or a stream's once counted, passes through.
        if this.pending.is_none() {
            return polled;
        }
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                frame.trailers_ref().map(|trailers| grpc_status(trailers).unwrap_or("unknown"))
            }
            // The body failed, or ended without a status: not a gRPC ending.
            Poll::Ready(Some(Err(_)) | None) => Some("unknown"),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some((service, method)) = this.pending.take()
        {
            count_stream_end(service, method, code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The status code in a response's headers or trailers (`grpc-status`), by name.
fn grpc_status(headers: &axum::http::HeaderMap) -> Option<&'static str> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<u8>().ok()?;
    Some(code_name(code))
}

fn count_stream_end(service: String, method: String, code: &'static str) {
    metrics::counter!(GRPC_SERVER_STREAMS_ENDED, "service" => service, "method" => method, "code" => code).increment(1);
}

/// Serves one call that came on a call stream (a unary call multiplexed on a long-lived stream) as
/// [`GrpcServerLayer`] serves a unary call: counted by service, method and status code, timed, inside a
/// `grpc.server` span whose parent is the caller's `traceparent` (empty: none), with the caller's
/// received-at moment in scope (0: none). `service` and `method` are those of the unary call it stands for,
/// so that a call counts the same whichever way it came.
pub async fn serve_streamed_call<T, F>(
    service: &'static str,
    method: &'static str,
    traceparent: &str,
    received_at_us: i64,
    call: F,
) -> Result<T, tonic::Status>
where
    F: Future<Output = Result<T, tonic::Status>>,
{
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = format_args!("/{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    if !traceparent.is_empty() {
        set_remote_parent(&span, traceparent);
    }
    let started = tokio::time::Instant::now();
    let call = call.instrument(span);
    let result = if received_at_us != 0 { with_received_at(received_at_us, call).await } else { call.await };
    let code = match &result {
        Ok(_) => "ok",
        Err(status) => code_name(u8::try_from(i32::from(status.code())).unwrap_or(u8::MAX)),
    };
    metrics::counter!(GRPC_SERVER_REQUESTS, "service" => service, "method" => method, "code" => code).increment(1);
    metrics::histogram!(GRPC_SERVER_REQUEST_DURATION, "service" => service, "method" => method)
        .record(started.elapsed().as_secs_f64());
    result
}

/// `/package.Service/Method` → (`package.Service`, `Method`, whether it streams) when it is one of the `known`
/// methods; anything else is `unknown` (bounded labels) and unary.
fn service_and_method(path: &str, known: &HashMap<String, bool>) -> (String, String, bool) {
    if let Some(&streams) = known.get(path)
        && let Some((service, method)) = path.trim_start_matches('/').split_once('/')
    {
        return (service.to_owned(), method.to_owned(), streams);
    }
    ("unknown".to_owned(), "unknown".to_owned(), false)
}

/// The gRPC status code's name in snake case.
fn code_name(code: u8) -> &'static str {
    match code {
        0 => "ok",
        1 => "cancelled",
        2 => "unknown",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        6 => "already_exists",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        10 => "aborted",
        11 => "out_of_range",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        15 => "data_loss",
        16 => "unauthenticated",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `service Echo { rpc Say; rpc Hear (stream); }` in package `demo.v1`, and `service Bare { rpc Ping; }` in
    /// none.
    fn descriptor_set() -> Vec<u8> {
        use prost_types::{FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto};
        // `Hear` streams the server's answers.
        let method = |name: &str| MethodDescriptorProto {
            name: Some(name.into()),
            server_streaming: (name == "Hear").then_some(true),
            ..Default::default()
        };
        let service = |name: &str, methods: &[&str]| ServiceDescriptorProto {
            name: Some(name.into()),
            method: methods.iter().map(|name| method(name)).collect(),
            ..Default::default()
        };
        let files = vec![
            FileDescriptorProto {
                package: Some("demo.v1".into()),
                service: vec![service("Echo", &["Say", "Hear"])],
                ..Default::default()
            },
            FileDescriptorProto { service: vec![service("Bare", &["Ping"])], ..Default::default() },
        ];
        FileDescriptorSet { file: files }.encode_to_vec()
    }

    #[test]
    fn only_the_methods_served_become_labels_and_any_other_path_is_unknown() {
        let known = method_paths(&[&descriptor_set(), b"\xff not a descriptor set"]);
        let labels = |path: &str| service_and_method(path, &known);
        assert_eq!(labels("/demo.v1.Echo/Say"), ("demo.v1.Echo".to_owned(), "Say".to_owned(), false));
        assert_eq!(labels("/demo.v1.Echo/Hear"), ("demo.v1.Echo".to_owned(), "Hear".to_owned(), true));
        assert_eq!(labels("/Bare/Ping"), ("Bare".to_owned(), "Ping".to_owned(), false));
        // A client may send any path: a method the service does not have, a service of its own making, or
        // none; each would otherwise be a new series.
        for odd in ["/demo.v1.Echo/Shout", "/demo.v1.Echo/Say/", "/x.Y/Say", "/demo.v1.Echo", "/", "", "//x"] {
            assert_eq!(labels(odd), ("unknown".to_owned(), "unknown".to_owned(), false), "{odd}");
        }
        assert_eq!(code_name(14), "unavailable");
        assert_eq!(code_name(99), "unknown");
    }

    /// A body of the given frames.
    struct Frames(std::collections::VecDeque<http_body::Frame<axum::body::Bytes>>);

    impl http_body::Body for Frames {
        type Data = axum::body::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn body(pending: Option<&str>, status: Option<&str>) -> StreamEnd<Frames> {
        let mut frames = std::collections::VecDeque::from([http_body::Frame::data(axum::body::Bytes::from("x"))]);
        if let Some(status) = status {
            let mut trailers = axum::http::HeaderMap::new();
            trailers.insert("grpc-status", status.parse().unwrap());
            frames.push_back(http_body::Frame::trailers(trailers));
        }
        StreamEnd { inner: Frames(frames), pending: pending.map(|method| ("test.Ends".to_owned(), method.to_owned())) }
    }

    async fn next_frame(body: &mut StreamEnd<Frames>) -> bool {
        std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx)).await.is_some()
    }

    /// The count of `switchboard_grpc_server_streams_ended_total` for `test.Ends`/`method` and `code`.
    fn ended(method: &str, code: &str) -> u64 {
        let exposition = crate::render_metrics();
        let wanted = [format!("code=\"{code}\""), format!("method=\"{method}\""), "service=\"test.Ends\"".to_owned()];
        exposition
            .lines()
            .filter(|line| line.starts_with("switchboard_grpc_server_streams_ended_total{"))
            .filter(|line| wanted.iter().all(|label| line.contains(label.as_str())))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    #[tokio::test]
    async fn a_stream_is_counted_when_it_ends_by_its_trailers_or_as_cancelled_when_dropped_first() {
        crate::install_metrics("test");
        // Ended by its trailers: their status.
        let mut stream = body(Some("Trailed"), Some("14"));
        while next_frame(&mut stream).await {}
        assert_eq!(ended("Trailed", "unavailable"), 1);
        drop(stream);
        assert_eq!(ended("Trailed", "cancelled"), 0, "counted twice");
        // Dropped before its end (the client went away): cancelled.
        let mut stream = body(Some("Dropped"), Some("0"));
        assert!(next_frame(&mut stream).await);
        drop(stream);
        assert_eq!((ended("Dropped", "cancelled"), ended("Dropped", "ok")), (1, 0));
        // Ended without a status: not a gRPC ending.
        let mut stream = body(Some("Bare"), None);
        while next_frame(&mut stream).await {}
        assert_eq!(ended("Bare", "unknown"), 1);
        // A unary call's body passes through uncounted: the three ends above are all.
        let mut unary = body(None, Some("0"));
        while next_frame(&mut unary).await {}
        drop(unary);
        let all: u64 = crate::render_metrics()
            .lines()
            .filter(|line| line.starts_with("switchboard_grpc_server_streams_ended_total{"))
            .filter(|line| line.contains("service=\"test.Ends\""))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(all, 3);
    }
}
