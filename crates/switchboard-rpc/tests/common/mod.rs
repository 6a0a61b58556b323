//! Servers on real loopback sockets, and waiting for a condition with a deadline.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use switchboard_rpc::{ClientSettings, GrpcServices, Health, ServerSettings, serve_grpc};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

/// The longest any condition in these tests may take to come true.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Client settings for tests: short timeouts, so that a failure is seen quickly.
pub fn client_settings() -> ClientSettings {
    ClientSettings {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        ..ClientSettings::default()
    }
}

pub async fn any_port() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A server started with [`serve_grpc`], stopped by [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    pub health: Health,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    pub async fn start(listener: TcpListener, services: GrpcServices) -> Running {
        let addr = listener.local_addr().unwrap();
        let health = services.health();
        let (stop, stopped) = oneshot::channel::<()>();
        let settings = ServerSettings { shutdown_grace: Duration::from_secs(30), ..ServerSettings::default() };
        let task = tokio::spawn(async move {
            serve_grpc(listener, services, &settings, async move {
                let _ = stopped.await;
            })
            .await
        });
        Running { addr, health, stop: Some(stop), task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits until every connection is closed (well within the grace, which would
    /// otherwise let it return with connections still open).
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        within(&mut self.task).await.unwrap().unwrap();
    }
}

/// `future`'s output, which must come within [`DEADLINE`].
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future).await.expect("the condition came true within the deadline")
}

/// Calls `attempt` until it answers `Some`, at most until [`DEADLINE`].
pub async fn eventually<T, F, Fut>(mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(async {
        loop {
            if let Some(value) = attempt().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A generated service that counts the calls of each method it is asked for (by path), and, when built
/// [`Watched::without_call_streams`], answers its call streams (`Commands`, `Calls`, `Appends`)
/// UNIMPLEMENTED, as a server built before them would; every other method goes through.
#[derive(Clone)]
pub struct Watched<S> {
    inner: S,
    refuse_call_streams: bool,
    /// Calls by method path, the refused ones included.
    pub paths: Arc<Mutex<BTreeMap<String, usize>>>,
    /// The call streams refused.
    pub refused: Arc<AtomicUsize>,
}

impl<S> Watched<S> {
    pub fn new(inner: S) -> Self {
        Watched { inner, refuse_call_streams: false, paths: Arc::default(), refused: Arc::default() }
    }

    pub fn without_call_streams(inner: S) -> Self {
        Watched { refuse_call_streams: true, ..Watched::new(inner) }
    }

    /// How many calls of each method (its name, without the service) were asked for.
    pub fn methods(&self) -> BTreeMap<String, usize> {
        let paths = self.paths.lock().unwrap();
        paths.iter().map(|(path, n)| (path.rsplit('/').next().unwrap_or_default().to_owned(), *n)).collect()
    }
}

impl<S: NamedService> NamedService for Watched<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Watched<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        *self.paths.lock().unwrap().entry(path.clone()).or_default() += 1;
        let call_stream = ["/Commands", "/Calls", "/Appends"].iter().any(|name| path.ends_with(name));
        if self.refuse_call_streams && call_stream {
            self.refused.fetch_add(1, Ordering::SeqCst);
            let response = tonic::Status::unimplemented("no such method").into_http();
            return Box::pin(async move { Ok(response) });
        }
        Box::pin(self.inner.call(request))
    }
}
