//! `bare-relay`: the bare WebSocket relay Switchboard is compared with (see `switchboard_benches::relay`).
//! It prints `bare-relay listening on http://ADDR` once it listens.

use std::net::SocketAddr;

use clap::Parser;
use switchboard_benches::relay::{self, Relay, RelaySettings};

#[derive(Debug, Parser)]
#[command(
    name = "bare-relay",
    about = "A bare WebSocket relay speaking the subset of the Switchboard protocol the load generator uses"
)]
struct Args {
    /// Where the WebSocket endpoint (`/v1/ws`) and `/healthz` listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The groups `groups.list` answers (every agent is in all of them), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "g0")]
    groups: Vec<String>,
    /// Frames waiting for one socket before it is closed with 4008.
    #[arg(long, default_value_t = 1024)]
    outbound_queue_len: usize,
    /// The largest message body accepted, in bytes (told to clients in `welcome`).
    #[arg(long, default_value_t = 4096)]
    max_message_bytes: usize,
    /// Agent tokens `PREFIX<i>` sign in as agent `a<i>`.
    #[arg(long, default_value = "load-agent-token-")]
    agent_token_prefix: String,
}

/// The same allocator as `switchboard`, so that the comparison is of the code, not of the allocators.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = RelaySettings {
        max_message_bytes: args.max_message_bytes,
        outbound_queue_len: args.outbound_queue_len.max(1),
        groups: args.groups,
        agent_token_prefix: args.agent_token_prefix,
        ..RelaySettings::default()
    };
    // The same runtime as the switchboard binary: multi-threaded, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let (listener, address) = relay::bind(args.listen).await?;
        println!("bare-relay listening on http://{address}");
        relay::serve(listener, Relay::new(settings)).await?;
        Ok(())
    })
}
