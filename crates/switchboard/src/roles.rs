//! The roles, each a short list of setup steps.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use switchboard_domain::{Clock, SystemClock};
use switchboard_gateway::{Gateway, GatewaySettings};
use switchboard_router::{LeaseSettings, Router, RouterSettings};
use switchboard_store::SqlStore;
use tracing::info;

use crate::config::{Config, DEMO_CONFIG};

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

pub async fn migrate(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config, Arc::new(SystemClock)).await?;
    let applied = store.migrate().await?;
    info!(applied, "migrations applied");
    Ok(())
}

/// Every role in one process: store (SQLite), router and gateway, calling each other in-process.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let directory = Arc::new(config.directory()?);
    let store = Arc::new(open_store(&config, clock.clone()).await?);
    let router_settings =
        RouterSettings { node_id: config.node_id.clone(), leases: LeaseSettings::default(), closed_list_limit: 200 };
    let router = Arc::new(Router::start(router_settings, store, clock.clone(), directory.clone()).await?);
    let gateway_settings = GatewaySettings {
        gateway_id: format!("{}-gateway", config.node_id),
        max_message_bytes: config.limits.max_message_bytes,
        outbound_queue_len: config.limits.outbound_queue_len,
    };
    let gateway = Gateway::start(gateway_settings, router, directory, clock);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    // Tests and scripts read this line to find the port when listening on port 0.
    println!("switchboard listening on http://{address}");
    info!(%address, websocket = %format!("ws://{address}/v1/ws"), "switchboard serving");
    axum::serve(listener, gateway.http_routes()).with_graceful_shutdown(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    info!("shutting down");
}
