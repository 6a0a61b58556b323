//! Serving gRPC services on a listener, with health, reflection and a graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_proto::internal::v1::FILE_DESCRIPTOR_SET;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

/// How a server keeps its connections alive and how long it waits for them when it stops.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// How often an HTTP/2 PING is sent on each connection, to notice dead clients.
    pub keepalive_interval: Duration,
    /// How long the answer to a PING may take before the connection is closed.
    pub keepalive_timeout: Duration,
    /// After the shutdown signal: how long to wait for the open connections to finish their calls before
    /// `serve_grpc` returns anyway.
    pub shutdown_grace: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Tells long-lived streams (push streams, placement watches) that their server is draining, so that they
/// end and a graceful shutdown does not wait for them forever.
#[derive(Debug, Clone)]
pub struct Draining(Option<watch::Receiver<bool>>);

impl Draining {
    /// A signal that never fires (a server that is not drained through [`serve_grpc`]).
    pub fn never() -> Self {
        Draining(None)
    }

    pub fn is_draining(&self) -> bool {
        self.0.as_ref().is_some_and(|receiver| *receiver.borrow())
    }

    /// Resolves when the server drains; never, for [`Draining::never`].
    pub async fn wait(&mut self) {
        if let Some(receiver) = self.0.as_mut()
            && receiver.wait_for(|draining| *draining).await.is_ok()
        {
            return;
        }
        std::future::pending::<()>().await;
    }

    pub(crate) fn receiver(&self) -> Option<watch::Receiver<bool>> {
        self.0.clone()
    }
}

/// The standard gRPC health of a server (`grpc.health.v1.Health`): the status of every service added to
/// its [`GrpcServices`] and of the server as a whole (the service named `""`). [`serve_grpc`] reports them
/// SERVING when it starts and NOT_SERVING when it stops; a role reports NOT_SERVING itself as soon as it
/// starts draining (handing over its shards), so that load balancers and clients stop sending it work.
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Arc<Mutex<Vec<&'static str>>>,
}

impl Health {
    fn names(&self) -> Vec<&'static str> {
        let mut names = self.services.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        names.push("");
        names
    }

    async fn set_all(&self, status: ServingStatus) {
        for name in self.names() {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Every service, and the server, SERVING.
    pub async fn set_serving(&self) {
        self.set_all(ServingStatus::Serving).await;
    }

    /// Every service, and the server, NOT_SERVING.
    pub async fn set_not_serving(&self) {
        self.set_all(ServingStatus::NotServing).await;
    }

    /// The reporter itself, to set one service's status.
    pub fn reporter(&self) -> &HealthReporter {
        &self.reporter
    }
}

/// The services one server serves, with its health and its drain signal.
#[derive(Debug)]
pub struct GrpcServices {
    routes: RoutesBuilder,
    health: Health,
    draining: watch::Sender<bool>,
}

impl Default for GrpcServices {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcServices {
    pub fn new() -> Self {
        GrpcServices {
            routes: RoutesBuilder::default(),
            health: Health { reporter: HealthReporter::new(), services: Arc::default() },
            draining: watch::channel(false).0,
        }
    }

    /// Adds a generated service (e.g. `StoreGrpcServer::into_service()`); its health is reported under its
    /// full name and reflection advertises it.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health.services.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// The health of this server, to report NOT_SERVING while draining.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The signal that ends long-lived streams when this server shuts down: pass it to
    /// `RouterGrpcServer::with_draining` and `StoreGrpcServer::with_draining`.
    pub fn draining(&self) -> Draining {
        Draining(Some(self.draining.subscribe()))
    }
}

/// Serves `services` on `listener` until `shutdown` resolves, with the standard health service (every
/// service and `""` SERVING) and reflection (`grpc.reflection.v1`, with the internal protos and health).
///
/// Connections get TCP_NODELAY (tonic does not set it on a listener it did not bind) and HTTP/2
/// keepalive. On `shutdown`: health goes NOT_SERVING, the listener closes, long-lived streams built with
/// [`GrpcServices::draining`] end, and the calls in flight finish; after `shutdown_grace` it returns even if
/// some connection is still open.
pub async fn serve_grpc(
    listener: TcpListener,
    mut services: GrpcServices,
    settings: &ServerSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let health = services.health.clone();
    let names = health.names();
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection");
    for name in names.iter().filter(|name| !name.is_empty()) {
        reflection = reflection.with_service_name(*name);
    }
    // The descriptor sets are compiled in: failing to read them is a bug caught by the tests.
    let reflection = reflection.build_v1().expect("the compiled descriptor sets are valid");
    services.routes.add_service(tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.reporter.clone()),
    ));
    services.routes.add_service(reflection);
    health.set_serving().await;

    let local = listener.local_addr().ok();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let draining = services.draining;
    let (stopping, stopped) = oneshot::channel::<()>();
    let signal = {
        let health = health.clone();
        async move {
            shutdown.await;
            info!(?local, "gRPC server draining");
            health.set_not_serving().await;
            draining.send_replace(true);
            let _ = stopping.send(());
        }
    };
    let serve = Server::builder()
        .layer(switchboard_telemetry::GrpcServerLayer::new(&[
            switchboard_proto::internal::v1::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ]))
        .http2_keepalive_interval(Some(settings.keepalive_interval))
        .http2_keepalive_timeout(Some(settings.keepalive_timeout))
        .add_routes(services.routes.routes())
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = settings.shutdown_grace;
    let give_up = async move {
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = serve => result,
        () = give_up => {
            warn!(?local, ?grace, "gRPC connections still open after the shutdown grace; not waiting for them");
            Ok(())
        }
    }
}
