//! The switchboard binary: one program, several roles. This crate only reads configuration and wires the
//! library crates together; it holds no business logic.

mod config;
mod roles;

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
        /// The address other nodes and the gateways reach this node at; by default http://LISTEN.
        #[arg(long, env = "SWITCHBOARD_ADVERTISE")]
        advertise: Option<String>,
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
        /// The store service (for the placement of shards), e.g. http://127.0.0.1:7100.
        #[arg(long, env = "SWITCHBOARD_STORE")]
        store: String,
        /// This gateway's name, unique in the cluster.
        #[arg(long, env = "SWITCHBOARD_GATEWAY_ID")]
        gateway_id: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.role {
            Role::Serve { config } => roles::serve(roles::load_config(config.as_deref())?).await,
            Role::Migrate { config, database_url } => {
                roles::migrate(roles::load_config(config.as_deref())?, database_url).await
            }
            Role::Store { config, listen, database_url } => {
                roles::store(roles::load_config(config.as_deref())?, listen, database_url).await
            }
            Role::Router { config, listen, advertise, store, node_id, leases } => {
                let config = roles::load_config(config.as_deref())?;
                roles::router(config, roles::RouterArgs { listen, advertise, store, node_id, leases }).await
            }
            Role::Gateway { config, listen, store, gateway_id } => {
                roles::gateway(roles::load_config(config.as_deref())?, listen, store, gateway_id).await
            }
        }
    })
}
