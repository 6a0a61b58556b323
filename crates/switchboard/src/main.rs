//! The switchboard binary: one program, several roles. This crate only reads configuration and wires the
//! library crates together; it holds no business logic.

mod config;
mod roles;

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
            Role::Migrate { config } => roles::migrate(roles::load_config(config.as_deref())?).await,
        }
    })
}
