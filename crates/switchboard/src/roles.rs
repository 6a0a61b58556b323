//! The roles, each a short list of setup steps.

use std::path::Path;
use std::sync::Arc;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use switchboard_domain::{Clock, SystemClock};
use switchboard_gateway::{Gateway, GatewaySettings, RequestRate};
use switchboard_presence::{MemoryPresence, Presence, RedisPresence, RedisSettings};
use switchboard_proto::internal::v1::GetLicenseRequest;
use switchboard_proto::internal::v1::SetLicenseLimitRequest;
use switchboard_proto::router::ClusterApi;
use switchboard_proto::store::StoreApi;
use switchboard_router::{LeaseSettings, PresenceSettings, Router, RouterSettings};
use switchboard_rpc::cluster::{ClusterClient, ClusterSettings, GrpcConnector};
use switchboard_rpc::{
    ClientSettings, GrpcServices, GrpcStore, Health, RouterGrpcServer, ServerSettings, StoreGrpcServer, serve_grpc,
};
use switchboard_store::SqlStore;
use switchboard_telemetry::names;
use tracing::{debug, error, info, warn};

use crate::config::{Config, DEMO_CONFIG};
use crate::signals::StopSignals;

pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let yaml = match path {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        None => DEMO_CONFIG.to_owned(),
    };
    Config::parse(&yaml, |name| std::env::var(name).ok())
}

async fn open_store(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<SqlStore> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
    let path = config.data_dir.join("switchboard.db");
    let store = SqlStore::open(&path.to_string_lossy(), clock)
        .await
        .with_context(|| format!("cannot open the database {}", path.display()))?;
    Ok(store)
}

pub async fn migrate(config: Config, database_url: Option<String>) -> anyhow::Result<()> {
    let applied = match database_url {
        Some(url) => {
            // Opening applies the pending migrations.
            let store =
                switchboard_store::open(&url, Arc::new(SystemClock)).await.context("cannot open the database")?;
            let applied = store.applied_migrations().await?;
            store.close().await;
            applied.len()
        }
        None => open_store(&config, Arc::new(SystemClock)).await?.migrate().await?,
    };
    info!(applied, "migrations up to date");
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct LeaseArgs {
    /// How long a shard lease lasts without renewal.
    #[arg(long, env = "SWITCHBOARD_LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    /// How often the leases are renewed.
    #[arg(long, env = "SWITCHBOARD_RENEW_EVERY_MS", default_value_t = 2_000)]
    pub renew_every_ms: u64,
    /// A node that could not renew for this long stops serving its shards (shorter than the lease).
    #[arg(long, env = "SWITCHBOARD_RENEW_DEADLINE_MS", default_value_t = 7_000)]
    pub renew_deadline_ms: u64,
}

impl LeaseArgs {
    fn settings(&self) -> anyhow::Result<LeaseSettings> {
        if self.renew_every_ms == 0
            || self.renew_deadline_ms >= self.lease_ms
            || self.renew_every_ms >= self.renew_deadline_ms
        {
            bail!("lease settings must satisfy 0 < renew-every-ms < renew-deadline-ms < lease-ms");
        }
        Ok(LeaseSettings {
            lease: Duration::from_millis(self.lease_ms),
            renew_every: Duration::from_millis(self.renew_every_ms),
            renew_deadline: Duration::from_millis(self.renew_deadline_ms),
        })
    }
}

fn presence_settings(config: &Config) -> PresenceSettings {
    PresenceSettings {
        heartbeat: Duration::from_millis(config.presence.heartbeat_ms),
        grace: Duration::from_millis(config.presence.grace_ms),
        customer_grace: Duration::from_millis(config.presence.customer_grace_ms),
        abandon_after: (config.presence.abandon_after_ms > 0)
            .then(|| Duration::from_millis(config.presence.abandon_after_ms)),
        customer_heartbeat: Duration::from_millis(config.presence.customer_heartbeat_ms),
    }
}

/// Presence in Redis (the split roles): `presence.redis_url` in the configuration or `SWITCHBOARD_REDIS_URL`.
/// The connection is made lazily and remade by itself: Redis may start after Switchboard, or restart.
fn redis_presence(config: &Config) -> anyhow::Result<Arc<dyn Presence>> {
    let Some(url) = config.presence.redis_url.as_deref() else {
        bail!("the cluster roles keep presence in Redis: set presence.redis_url or SWITCHBOARD_REDIS_URL");
    };
    let presence = RedisPresence::connect_lazy(url, RedisSettings::default())
        .with_context(|| format!("invalid Redis URL {url}"))?;
    Ok(Arc::new(presence))
}

/// Sets the database's license limit from the configuration.
async fn set_license_limit(store: &dyn StoreApi, config: &Config) -> anyhow::Result<()> {
    let max_sessions = config.license.max_sessions;
    store.set_license_limit(SetLicenseLimitRequest { max_sessions }).await.context("cannot set the license limit")?;
    info!(max_sessions, "license limit set (0 = unlimited)");
    Ok(())
}

pub struct RouterArgs {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub advertise: Option<String>,
    pub advertise_ip: Option<std::net::IpAddr>,
    pub store: String,
    pub node_id: String,
    pub leases: LeaseArgs,
}

async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))
}

/// Serves `GET /metrics` on its own port (the roles whose main port speaks only gRPC).
async fn serve_metrics(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = bind(listen).await.context("cannot serve the metrics: set another --metrics-listen")?;
    let address = listener.local_addr()?;
    println!("metrics on http://{address}/metrics");
    switchboard_telemetry::serve_metrics(listener);
    Ok(())
}

/// Keeps the license gauges up to date from the database (every store reports the same figures).
fn report_license(store: Arc<dyn StoreApi>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(2));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            match store.get_license(GetLicenseRequest {}).await {
                Ok(license) => {
                    metrics::gauge!(names::LICENSE_SESSIONS_IN_USE).set(license.used as f64);
                    metrics::gauge!(names::LICENSE_SESSIONS_MAX).set(license.max_sessions as f64);
                }
                Err(error) => debug!(%error, "license not read for the metrics"),
            }
        }
    });
}

/// The store service: serves the database over gRPC.
pub async fn store(
    config: Config,
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    database_url: String,
) -> anyhow::Result<()> {
    let stop = StopSignals::listen()?;
    let store =
        switchboard_store::open(&database_url, Arc::new(SystemClock)).await.context("cannot open the database")?;
    set_license_limit(&store, &config).await?;
    serve_metrics(metrics_listen).await?;
    report_license(Arc::new(store.clone()));
    let backend = store.backend();
    let listener = bind(listen).await?;
    let address = listener.local_addr()?;
    let mut services = GrpcServices::new();
    let server = StoreGrpcServer::new(Arc::new(store.clone())).with_draining(services.draining());
    services.add_service(server.into_service());
    // Only a store that can fail for good is watched (SQLite; a PostgreSQL store never does).
    let watcher =
        store.may_fail_until_restart().then(|| tokio::spawn(report_writer_failure(store.clone(), services.health())));
    println!("switchboard store listening on http://{address}");
    info!(%address, backend, "store serving");
    serve_grpc(listener, services, &ServerSettings::default(), async move { stop.first().await }).await?;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    store.close().await;
    Ok(())
}

/// How often the store role looks at its writer for the gRPC health.
const WRITER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Once the store refuses every append until a restart (a failed sync of its SQLite log, or an append
/// writer that could not put its connection back in order), its gRPC health says NOT_SERVING, as `serve`'s
/// `/healthz` fails: a probe restarts it, and the restart recovers what the disk holds. The
/// `switchboard_store_writer_failed` gauge says it too.
async fn report_writer_failure(store: switchboard_store::Store, health: Health) {
    let mut every = tokio::time::interval(WRITER_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Some(failure) = store.writer_failure() {
            error!(%failure, "the store refuses every write until a restart: NOT_SERVING");
            health.set_not_serving().await;
            return;
        }
    }
}

/// A router node: joins the cluster through the store, serves its actors over gRPC, and hands its shards
/// over on SIGTERM.
/// The URL a router advertises: `advertise` as given; else its IP's with the port it listens on (an IPv6
/// address in brackets); else the address it listens on.
fn advertised(advertise: Option<String>, ip: Option<std::net::IpAddr>, listening: SocketAddr) -> String {
    advertise.unwrap_or_else(|| format!("http://{}", SocketAddr::new(ip.unwrap_or(listening.ip()), listening.port())))
}

pub async fn router(config: Config, args: RouterArgs) -> anyhow::Result<()> {
    let stop = StopSignals::listen()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let directory = Arc::new(config.directory()?);
    let leases = args.leases.settings()?;
    let store = Arc::new(GrpcStore::connect_lazy(&args.store, ClientSettings::default())?);
    let listener = bind(args.listen).await?;
    let address = listener.local_addr()?;
    serve_metrics(args.metrics_listen).await?;
    let advertise = advertised(args.advertise.clone(), args.advertise_ip, address);
    let connector = GrpcConnector { store: store.clone(), settings: ClientSettings::default() };
    let cluster = ClusterClient::start(store.clone(), Arc::new(connector), ClusterSettings::default());
    let presence = redis_presence(&config)?;
    let settings = RouterSettings {
        node_id: args.node_id.clone(),
        advertise,
        leases,
        closed_list_limit: 200,
        page_bytes: RouterSettings::PAGE_BYTES,
        presence: presence_settings(&config),
    };
    // The store may start after the router: wait for it.
    let router = loop {
        let peers: Arc<dyn ClusterApi> = Arc::new(cluster.clone());
        let started = Router::start(
            settings.clone(),
            store.clone(),
            clock.clone(),
            directory.clone(),
            presence.clone(),
            Some(peers),
        )
        .await;
        match started {
            Ok(router) => break Arc::new(router),
            Err(error) if error.is_retryable() => {
                warn!(%error, "cannot join the cluster yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error.into()),
        }
    };
    // Shards freed elsewhere (a node left or died) are taken at once, not at the next renewal.
    let mut placement = cluster.placement();
    let watcher = {
        let router = router.clone();
        tokio::spawn(async move {
            while placement.changed().await.is_ok() {
                if placement.borrow_and_update().n_unowned() > 0 {
                    router.placement_changed();
                }
            }
        })
    };
    let mut services = GrpcServices::new();
    let node: Arc<dyn ClusterApi> = router.clone();
    services.add_service(RouterGrpcServer::new(node).with_draining(services.draining()).into_service());
    println!("switchboard router listening on http://{address}");
    info!(%address, node = %args.node_id, shards = router.n_shards_owned(), "router serving");
    let handover = {
        let router = router.clone();
        async move {
            stop.first().await;
            // Hand the shards over first, while the server still answers (with NotOwner) so that gateways
            // move on at once.
            if let Err(error) = router.shutdown().await {
                warn!(%error, "graceful handover failed; the leases will expire instead");
            }
        }
    };
    serve_grpc(
        listener,
        services,
        &ServerSettings { shutdown_grace: Duration::from_secs(2), ..Default::default() },
        handover,
    )
    .await?;
    watcher.abort();
    Ok(())
}

/// A gateway: WebSocket clients, routed through the cluster client to the routers.
/// The gateway role's own arguments (the rest is the configuration file's).
pub struct GatewayArgs {
    pub listen: SocketAddr,
    /// `/metrics`, on a port of its own: the public port has none.
    pub metrics_listen: SocketAddr,
    pub store: String,
    pub gateway_id: String,
}

pub async fn gateway(config: Config, args: GatewayArgs) -> anyhow::Result<()> {
    let stop = StopSignals::listen()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let directory = Arc::new(config.directory()?);
    let store = Arc::new(GrpcStore::connect_lazy(&args.store, ClientSettings::default())?);
    let connector = GrpcConnector { store: store.clone(), settings: ClientSettings::default() };
    let cluster = ClusterClient::start(store, Arc::new(connector), ClusterSettings::default());
    let presence = redis_presence(&config)?;
    let mut gateway_settings = gateway_settings(&config, args.gateway_id);
    // The gateways of a cluster count each address's chat starts together, in Redis.
    gateway_settings.per_address.shared = true;
    let gateway = Gateway::start(gateway_settings, Arc::new(cluster), directory, presence, clock);
    serve_metrics(args.metrics_listen).await?;
    let listener = bind(args.listen).await?;
    let address = listener.local_addr()?;
    println!("switchboard gateway listening on http://{address}");
    info!(%address, websocket = %format!("ws://{address}/v1/ws"), "gateway serving");
    serve_gateway(listener, gateway, &config, false, stop).await
}

/// Every role in one process: store (SQLite), router and gateway, calling each other in-process.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let stop = StopSignals::listen()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let directory = Arc::new(config.directory()?);
    let store = Arc::new(open_store(&config, clock.clone()).await?);
    set_license_limit(store.as_ref(), &config).await?;
    report_license(store.clone());
    // One process: presence lives in memory (no Redis to install).
    let presence: Arc<dyn Presence> = Arc::new(MemoryPresence::default());
    let router_settings = RouterSettings {
        node_id: config.node_id.clone(),
        advertise: String::new(),
        leases: LeaseSettings::default(),
        closed_list_limit: 200,
        page_bytes: RouterSettings::PAGE_BYTES,
        presence: presence_settings(&config),
    };
    let store_health = store.clone();
    let router = Arc::new(
        Router::start(router_settings, store, clock.clone(), directory.clone(), presence.clone(), None).await?,
    );
    let gateway_settings = gateway_settings(&config, format!("{}-gateway", config.node_id));
    let gateway = Gateway::start(gateway_settings, router, directory, presence, clock);
    // A store that refuses every write until a restart makes the process unhealthy (a restart recovers it).
    gateway.set_health_check(Arc::new(move || match store_health.writer_failure() {
        Some(failure) => Err(format!("the store refuses every write until a restart: {failure}")),
        None => Ok(()),
    }));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    // Tests and scripts read this line to find the port when listening on port 0.
    println!("switchboard listening on http://{address}");
    info!(%address, websocket = %format!("ws://{address}/v1/ws"), "switchboard serving");
    serve_gateway(listener, gateway, &config, true, stop).await
}

fn gateway_settings(config: &Config, gateway_id: String) -> GatewaySettings {
    GatewaySettings {
        gateway_id,
        max_message_bytes: config.limits.max_message_bytes,
        outbound_queue_len: config.limits.outbound_queue_len,
        write_stall_timeout: Duration::from_millis(config.limits.write_stall_timeout_ms),
        idle_ping: Duration::from_millis(config.limits.idle_ping_ms),
        max_followed_chats: config.limits.max_followed_chats,
        max_connections: config.limits.max_connections,
        request_rate: RequestRate { per_second: config.limits.requests_per_second, burst: config.limits.request_burst },
        per_address: config.limits.address_limits(),
        presence_heartbeat: Duration::from_millis(config.presence.heartbeat_ms),
        customer_heartbeat: Duration::from_millis(config.presence.customer_heartbeat_ms),
        ..Default::default()
    }
}

/// Serves a gateway's WebSocket, HTTP and public gRPC endpoints (and `/metrics`, when `public_metrics`) on one
/// port until SIGTERM/ctrl-c; then fails `/readyz` while it goes on serving for `limits.drain_delay_ms` (a second
/// signal cuts it short), and drains its sessions (gRPC streams end with UNAVAILABLE, WebSockets with 1001),
/// waiting at most `limits.shutdown_grace_ms` for them to end. A client that reads nothing keeps its HTTP/2
/// stream open (its last frames wait for a window that never opens): past the grace its connection is closed.
async fn serve_gateway(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    config: &Config,
    public_metrics: bool,
    stop: StopSignals,
) -> anyhow::Result<()> {
    let mut routes = gateway.routes();
    if public_metrics {
        routes = routes.merge(switchboard_telemetry::metrics_routes());
    }
    let grace = Duration::from_millis(config.limits.shutdown_grace_ms);
    let delay = Duration::from_millis(config.limits.drain_delay_ms);
    let draining = gateway.clone();
    let shutdown = async move {
        stop.first().await;
        draining.leave();
        if !delay.is_zero() {
            info!(?delay, "leaving: /readyz fails, connections are served until the delay ends");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.nth(2) => {}
            }
        }
        draining.drain();
    };
    gateway.serve(listener, routes, shutdown, grace).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_router_advertises_its_ip_with_its_port_or_what_it_is_told() {
        let listening: SocketAddr = "0.0.0.0:7200".parse().unwrap();
        let ip = |text: &str| Some(text.parse().unwrap());
        assert_eq!(advertised(None, ip("10.1.2.3"), listening), "http://10.1.2.3:7200");
        assert_eq!(advertised(None, ip("fd00::7"), "[::]:7200".parse().unwrap()), "http://[fd00::7]:7200");
        assert_eq!(
            advertised(Some("http://router-0.routers:7200".into()), ip("10.1.2.3"), listening),
            "http://router-0.routers:7200"
        );
        assert_eq!(advertised(None, None, "127.0.0.1:7201".parse().unwrap()), "http://127.0.0.1:7201");
    }
}
