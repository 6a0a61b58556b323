//! The switchboard binary: one program, several roles. This crate only reads configuration and wires the
//! library crates together; it holds no business logic.

mod config;
mod roles;
mod signals;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about = "A live-chat contact-center cluster")]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Run every role in one process with embedded storage. Without --config, a demo tenant is served.
    Serve {
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply the database migrations and exit.
    Migrate {
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
        /// `postgres://...`; without it, the embedded SQLite database of the data directory.
        #[arg(long, env = "SWITCHBOARD_DATABASE_URL")]
        database_url: Option<String>,
    },
    /// The store service: the only process that talks to the database.
    Store {
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
        /// Where the internal gRPC service listens.
        #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:7100")]
        listen: SocketAddr,
        /// Where `GET /metrics` (Prometheus) is served.
        #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN", default_value = "127.0.0.1:9101")]
        metrics_listen: SocketAddr,
        /// `postgres://...` (or a SQLite path, for a single store).
        #[arg(long, env = "SWITCHBOARD_DATABASE_URL")]
        database_url: String,
    },
    /// A router node: hosts the actors of the shards it holds.
    Router {
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
        /// Where the internal gRPC service listens.
        #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:7200")]
        listen: SocketAddr,
        /// Where `GET /metrics` (Prometheus) is served.
        #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN", default_value = "127.0.0.1:9201")]
        metrics_listen: SocketAddr,
        /// The address other nodes and the gateways reach this node at; by default http://LISTEN, or
        /// http://ADVERTISE_IP:PORT with --advertise-ip.
        #[arg(long, env = "SWITCHBOARD_ADVERTISE")]
        advertise: Option<String>,
        /// This node's IP address (IPv4 or IPv6) as the others reach it (a pod's IP), advertised with the port it
        /// listens on: `http://10.1.2.3:7200`, `http://[fd00::7]:7200`. --advertise, when given, wins.
        #[arg(long, env = "SWITCHBOARD_ADVERTISE_IP")]
        advertise_ip: Option<std::net::IpAddr>,
        /// The store service, e.g. http://127.0.0.1:7100.
        #[arg(long, env = "SWITCHBOARD_STORE")]
        store: String,
        /// This node's stable name: a node restarted under the same name takes its shards back at once.
        #[arg(long, env = "SWITCHBOARD_NODE_ID")]
        node_id: String,
        #[command(flatten)]
        leases: roles::LeaseArgs,
    },
    /// A gateway: client connections (WebSocket), routed to the routers.
    Gateway {
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
        /// Where the WebSocket and HTTP endpoints listen.
        #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where `GET /metrics` (Prometheus) is served: a port of its own, not the public one clients reach.
        #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN", default_value = "127.0.0.1:9301")]
        metrics_listen: SocketAddr,
        /// The store service (for the placement of shards), e.g. http://127.0.0.1:7100.
        #[arg(long, env = "SWITCHBOARD_STORE")]
        store: String,
        /// This gateway's name, unique in the cluster.
        #[arg(long, env = "SWITCHBOARD_GATEWAY_ID")]
        gateway_id: String,
    },
}

/// mimalloc, not glibc's malloc: the many small allocations of frames, events and futures cost 12 % of `serve`'s
/// CPU in glibc under load (`benches/README.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (role, config_path) = match &cli.role {
        Role::Serve { config } => ("serve", config),
        Role::Migrate { config, .. } => ("migrate", config),
        Role::Store { config, .. } => ("store", config),
        Role::Router { config, .. } => ("router", config),
        Role::Gateway { config, .. } => ("gateway", config),
    };
    let config = roles::load_config(config_path.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let otlp = config.telemetry.otlp_endpoint.as_deref();
        let _tracing = switchboard_telemetry::init_tracing(&format!("switchboard-{role}"), otlp, "info,sqlx=warn")?;
        switchboard_telemetry::install_metrics(role);
        match cli.role {
            Role::Serve { .. } => roles::serve(config).await,
            Role::Migrate { database_url, .. } => roles::migrate(config, database_url).await,
            Role::Store { listen, metrics_listen, database_url, .. } => {
                roles::store(config, listen, metrics_listen, database_url).await
            }
            Role::Router { listen, metrics_listen, advertise, advertise_ip, store, node_id, leases, .. } => {
                let args =
                    roles::RouterArgs { listen, metrics_listen, advertise, advertise_ip, store, node_id, leases };
                roles::router(config, args).await
            }
            Role::Gateway { listen, metrics_listen, store, gateway_id, .. } => {
                roles::gateway(config, roles::GatewayArgs { listen, metrics_listen, store, gateway_id }).await
            }
        }
    })
}
