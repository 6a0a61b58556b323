//! The command line.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::shard::Shard;

#[derive(Debug, Parser)]
#[command(
    name = "switchboard-loadgen",
    version,
    about = "Load generator for Switchboard: drives a server or cluster through its public WebSocket protocol only",
    after_help = "Exit code: 0 when every invariant held, 1 when one broke, 2 on a usage or setup error \
                  (e.g. the server cannot be reached at all)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a Switchboard configuration for load tests (`switchboard serve --config FILE`)
    GenConfig(GenConfigArgs),
    /// Open idle customer sessions and keep them open (connect latency, server memory per session)
    Idle(IdleArgs),
    /// Open connections at a fixed rate, each answering a ping (connect + first answer latency)
    Storm(StormArgs),
    /// Chats in steady state: customers and agents exchange messages at a fixed total rate
    Steady(SteadyArgs),
    /// Customers start chats at a fixed rate; signed-in agents race to accept them (or accept offers)
    ChatStorm(ChatStormArgs),
    /// Bursts of concurrent chat starts against the license limit of concurrent chats
    License(LicenseArgs),
}

#[derive(Debug, Args)]
pub struct GenConfigArgs {
    /// Agents `a0..`, tokens `load-agent-token-0..`, each in every group
    #[arg(long)]
    pub agents: u32,
    /// Groups `g0..`
    #[arg(long, default_value_t = 1)]
    pub groups: u32,
    /// Chats each agent may hold at once
    #[arg(long, default_value_t = 3)]
    pub capacity: u32,
    /// license.max_sessions: the most concurrent chats (0 or absent: unlimited)
    #[arg(long)]
    pub license: Option<u64>,
    /// Route every group by offers (`routing: {mode: push, offer_timeout_ms: MS}`)
    #[arg(long, value_name = "MS")]
    pub push_offer_timeout_ms: Option<u64>,
    /// limits.outbound_queue_len (frames waiting for a slow client)
    #[arg(long)]
    pub outbound_queue_len: Option<u32>,
    /// limits.requests_per_second, the requests each connection may make a second. 0 (the default here): no
    /// limit, as a generator's connection makes the requests of many people (the server's default is 50)
    #[arg(long, default_value_t = 0)]
    pub requests_per_second: u32,
    /// limits.request_burst, the requests a connection may make at once (with --requests-per-second)
    #[arg(long, default_value_t = 100)]
    pub request_burst: u32,
    /// presence.customer_heartbeat_ms: how often the server writes customers' connections again
    #[arg(long, value_name = "MS")]
    pub customer_heartbeat_ms: Option<u64>,
    /// presence.abandon_after_ms: how long a waiting chat's customer may be gone before the chat is abandoned
    /// (at least twice the customer heartbeat)
    #[arg(long, value_name = "MS")]
    pub abandon_after_ms: Option<u64>,
    /// Where to write the YAML
    #[arg(long)]
    pub out: PathBuf,
}

/// The flags every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// A gateway's WebSocket endpoint; repeat it for several gateways (used in turn)
    #[arg(long = "url", value_name = "ws://HOST:PORT/v1/ws", required = true)]
    pub urls: Vec<String>,
    /// The tenant's widget key, for customers (chat.start, groups.list)
    #[arg(long, default_value = "load-widget-key")]
    pub widget_key: String,
    /// A support group to start chats in; repeat it to spread chats over groups
    #[arg(long = "group", value_name = "GROUP", default_value = "g0")]
    pub groups: Vec<String>,
    /// Agents to sign in: tokens PREFIX0 .. PREFIX{N-1} (steady, chat-storm)
    #[arg(long, default_value_t = 1)]
    pub agents: u32,
    /// Agent tokens are this prefix followed by 0, 1, …
    #[arg(long, default_value = "load-agent-token-")]
    pub agent_token_prefix: String,
    /// Local addresses to bind client sockets to, in turn (A-B is an IPv4 range, or a comma list), so that
    /// more connections than one address's ephemeral ports fit. Without it, against a server on loopback,
    /// connections come from 127.0.0.1, then 127.0.0.2 once its ports run short, and so on
    #[arg(long, value_name = "127.0.0.1-127.0.0.8", value_parser = parse_source_addrs)]
    pub source_addrs: Option<SourceAddrs>,
    /// Run the load from this many processes (this one and N-1 copies), merging their reports
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub processes: u32,
    /// Write the JSON report here
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// No progress line on stderr
    #[arg(long)]
    pub quiet: bool,
    /// The server's process id (idle): its VmRSS (/proc/PID/status) is read before and after
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// How long to wait for the answer to a request, or for a connection's welcome
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub request_timeout_s: f64,
    /// Connections opened at once while setting up (idle sessions, license bursts, steady pairs)
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    #[arg(long, hide = true)]
    pub shard: Option<Shard>,
    #[arg(long, hide = true)]
    pub shard_report: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub run_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SourceAddrs(pub Vec<IpAddr>);

fn parse_source_addrs(text: &str) -> Result<SourceAddrs, String> {
    let mut addrs = Vec::new();
    for part in text.split(',').map(str::trim).filter(|part| !part.is_empty()) {
        if let Some((first, last)) = part.split_once('-') {
            let first: std::net::Ipv4Addr = first.parse().map_err(|_| format!("{first} is not an IPv4 address"))?;
            let last: std::net::Ipv4Addr = last.parse().map_err(|_| format!("{last} is not an IPv4 address"))?;
            let (first, last) = (u32::from(first), u32::from(last));
            if last < first || last - first >= 65_536 {
                return Err(format!("{part}: expected a range of at most 65536 addresses, low to high"));
            }
            addrs.extend((first..=last).map(|n| IpAddr::V4(n.into())));
        } else {
            addrs.push(part.parse().map_err(|_| format!("{part} is not an IP address"))?);
        }
    }
    if addrs.is_empty() {
        return Err("no address".into());
    }
    Ok(SourceAddrs(addrs))
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Customer sessions to open (each: welcome, then groups.list with the widget key)
    #[arg(long)]
    pub sessions: u64,
    /// How long to keep them open
    #[arg(long, default_value_t = 10.0)]
    pub hold_s: f64,
}

#[derive(Debug, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open in all
    #[arg(long)]
    pub connections: u64,
    /// New connections per second (open loop)
    #[arg(long)]
    pub rate: f64,
    /// Keep the connections open this long after the last one answered
    #[arg(long, default_value_t = 0.0)]
    pub hold_s: f64,
}

#[derive(Debug, Args)]
#[command(after_help = "Every pair is a chat: a customer chat.starts it and an agent (signed in with its \
    token) accepts it by id, then both sides send message.send in turn. Pairs are spread over the agents \
    within their free capacity (the run stops at once if pairs > free slots). Groups must be pull-routed.")]
pub struct SteadyArgs {
    #[command(flatten)]
    pub common: Common,
    /// Chats (customer + agent) exchanging messages
    #[arg(long)]
    pub pairs: u64,
    /// Messages per second in total, spread over the pairs, sides alternating (open loop)
    #[arg(long)]
    pub rate: f64,
    /// Measured time
    #[arg(long)]
    pub duration_s: f64,
    /// Load before the measured time, not recorded in the latencies
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// After the last send, how long to wait for every acked message to reach the other side
    #[arg(long, default_value_t = 5.0)]
    pub drain_s: f64,
    /// Size of each message body in bytes
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Send each message at its intended time to within the kernel's timer (a `timerfd` per pair) rather
    /// than on tokio's timer, which sends 0–2 ms late (see `schedule_lag`): exact latencies at low rates, at
    /// the cost of a wake-up per message (about twice the generator's CPU; it falls behind sooner)
    #[arg(long)]
    pub precise_pacing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoutingMode {
    /// Agents accept chats they see in `queue.added` (several race, one wins)
    Pull,
    /// Agents accept the chats they are `offer`ed
    Push,
}

#[derive(Debug, Args)]
#[command(after_help = "Agents sign in (they are online at once), customers chat.start at the given rate, \
    agents accept and then close each chat. Invariant: each chat is accepted exactly once. Chats this run did \
    not start are left alone in pull groups (and accepted and closed in push groups, where they would hold \
    offers).")]
pub struct ChatStormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Chat starts per second (open loop)
    #[arg(long)]
    pub rate: f64,
    /// Chats to start in all
    #[arg(long)]
    pub count: u64,
    /// How the groups route chats (as configured on the server)
    #[arg(long, value_enum, default_value_t = RoutingMode::Pull)]
    pub routing: RoutingMode,
    /// After the last start, how long to wait for every chat to be accepted
    #[arg(long, default_value_t = 30.0)]
    pub drain_s: f64,
}

#[derive(Debug, Args)]
#[command(after_help = "Precondition: no open chat (waiting or active) in the cluster when the run starts, \
    and --limit equal to the server's license.max_sessions (SWITCHBOARD_LICENSE_MAX_SESSIONS). Then each round \
    must admit exactly min(limit, burst) chats, and never more than the limit. With --release vanish the \
    admitted customers go away instead of closing their chats (their connections close, as a tab does), and \
    each round waits until the server has abandoned every such chat (queue.removed, reason abandoned, seen by \
    agent PREFIX0, signed in and set away) before the next: the rounds after must admit exactly as many again, \
    so every permit came back; the time from going away to the abandonment is the `abandoned` latency.")]
pub struct LicenseArgs {
    #[command(flatten)]
    pub common: Common,
    /// The server's license limit of concurrent chats
    #[arg(long)]
    pub limit: u64,
    /// Customers starting a chat at once in each round
    #[arg(long)]
    pub burst: u64,
    /// Rounds: burst, count, then every admitted customer closes its chat (or goes away: --release)
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// How the admitted customers give their chats up at the end of each round
    #[arg(long, value_enum, default_value_t = Release::Close)]
    pub release: Release,
    /// --release vanish: how long a round waits for the server to abandon its chats
    #[arg(long, default_value_t = 180.0, value_name = "SECONDS")]
    pub abandon_deadline_s: f64,
}

/// How the customers of a license round give their chats up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Release {
    /// `chat.close`, then the connection closes
    Close,
    /// The connection closes without a word, as a tab closed while the chat waits: the server must find the
    /// customer gone and abandon the chat (`presence.abandon_after_ms`)
    Vanish,
}

impl Release {
    pub fn as_str(self) -> &'static str {
        match self {
            Release::Close => "close",
            Release::Vanish => "vanish",
        }
    }
}
