//! The configuration file: one versioned YAML document, unknown fields rejected, a few settings
//! overridable from the environment (`SWITCHBOARD_...`), validated at start with errors that name the
//! offending field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Deserialize;
use switchboard_domain::{
    AgentEntry, AgentId, BusinessHours, Directory, GroupEntry, GroupId, HoursSpec, Routing, TenantEntry, TenantId,
};
use switchboard_gateway::{AddressLimits, IpNet};

pub const CONFIG_VERSION: u32 = 1;
pub const DEMO_CONFIG: &str = include_str!("demo.yaml");
const MIN_OUTBOUND_QUEUE_LEN: usize = 16;
/// The most `limits.max_connections` may be (a file descriptor and some 20 KiB each).
const MAX_CONNECTIONS: usize = 10_000_000;
/// The most `limits.max_followed_chats` may be: each followed chat stays loaded on its router.
const MAX_FOLLOWED_CHATS: usize = 100_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: u32,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the embedded database lives.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// This node's stable name (a restarted node takes its shards back at once).
    #[serde(default = "default_node_id")]
    pub node_id: String,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub license: LicenseConfig,
    #[serde(default)]
    pub presence: PresenceConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    pub tenants: Vec<TenantConfig>,
}

/// Traces: where spans are exported (OTLP over gRPC); without an endpoint, nowhere.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// e.g. `http://127.0.0.1:4317`; also `SWITCHBOARD_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

/// The cluster-wide license: the store sets the database's limit from it when it starts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseConfig {
    /// The most concurrent chat sessions (waiting or ongoing chats) in the whole cluster; 0 = unlimited.
    #[serde(default)]
    pub max_sessions: u64,
}

/// Agent presence: how often connections are refreshed and how long a lost agent keeps their chats.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceConfig {
    /// Where presence lives in a cluster (`redis://host:port/`); `serve` keeps it in memory.
    #[serde(default)]
    pub redis_url: Option<String>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// An agent whose connections are all gone goes offline after this long (their chats are requeued).
    #[serde(default = "default_grace_ms")]
    pub grace_ms: u64,
    /// An active chat whose customer has had no live connection for this long records `customer_left`.
    #[serde(default = "default_customer_grace_ms")]
    pub customer_grace_ms: u64,
    /// How often gateways write every customer connection again (each counts for three of these).
    #[serde(default = "default_customer_heartbeat_ms")]
    pub customer_heartbeat_ms: u64,
    /// A waiting chat whose customer has had no live connection for this long is cancelled as abandoned;
    /// 0: never. At least twice `customer_heartbeat_ms`.
    #[serde(default = "default_abandon_after_ms")]
    pub abandon_after_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            redis_url: None,
            heartbeat_ms: default_heartbeat_ms(),
            grace_ms: default_grace_ms(),
            customer_grace_ms: default_customer_grace_ms(),
            customer_heartbeat_ms: default_customer_heartbeat_ms(),
            abandon_after_ms: default_abandon_after_ms(),
        }
    }
}

fn default_heartbeat_ms() -> u64 {
    1_000
}
fn default_grace_ms() -> u64 {
    30_000
}
fn default_customer_grace_ms() -> u64 {
    30_000
}
fn default_customer_heartbeat_ms() -> u64 {
    10_000
}
fn default_abandon_after_ms() -> u64 {
    60_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    #[serde(default = "default_outbound_queue_len")]
    pub outbound_queue_len: usize,
    /// Requests a connection may make a second on average; 0 = no limit.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
    /// Requests a connection may make at once, above the average.
    #[serde(default = "default_request_burst")]
    pub request_burst: u32,
    /// How long one write may wait for a client that does not read before it is disconnected (4008).
    #[serde(default = "default_write_stall_timeout_ms")]
    pub write_stall_timeout_ms: u64,
    /// How long a client may send nothing before it is pinged (a WebSocket ping, an HTTP/2 `PING` for gRPC);
    /// unanswered for as long again, it is disconnected (a WebSocket with 4009). Also how long a new
    /// connection may take to say which protocol it speaks, and an HTTP/1.1 request to send its headers.
    #[serde(default = "default_idle_ping_ms")]
    pub idle_ping_ms: u64,
    /// How long a gateway that shuts down waits for its connections to end before it stops without them.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// How long a gateway told to stop (SIGTERM) goes on serving, new connections included, while its
    /// `/readyz` fails, before it asks its connections to end: the time a load balancer takes to stop sending
    /// it new ones (a Kubernetes Service, some seconds). 0, the default: at once.
    #[serde(default)]
    pub drain_delay_ms: u64,
    /// How many chats one connection may follow with `chat.subscribe`.
    #[serde(default = "default_max_followed_chats")]
    pub max_followed_chats: usize,
    /// How many client connections one gateway serves at once (WebSockets and gRPC session streams); one
    /// more is closed at once (WebSocket 1013, gRPC `UNAVAILABLE`). 0 = no limit.
    #[serde(default)]
    pub max_connections: usize,
    /// Chats (`chat.start`, `offline.message`) one client address may start a minute on average, at one
    /// gateway; 0 (the default) = no limit.
    #[serde(default)]
    pub chat_starts_per_minute_per_address: u32,
    /// Chats one client address may start at once, above the average.
    #[serde(default = "default_chat_start_burst_per_address")]
    pub chat_start_burst_per_address: u32,
    /// Connections (WebSockets and gRPC session streams) one client address may have open at once, at one
    /// gateway; one more is closed at once (WebSocket 1013, gRPC `UNAVAILABLE`). 0 (the default) = no limit.
    #[serde(default)]
    pub max_connections_per_address: usize,
    /// The proxies (`10.0.0.0/8`, `fd00::/8`, `192.0.2.7`) whose `X-Forwarded-For` names the client address
    /// the limits above count; empty (the default): the connection's peer counts.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
}

impl Limits {
    /// The limits per client address, as the gateway takes them.
    pub fn address_limits(&self) -> AddressLimits {
        AddressLimits {
            per_minute: self.chat_starts_per_minute_per_address,
            burst: self.chat_start_burst_per_address,
            max_connections: self.max_connections_per_address,
            trusted_proxies: self.trusted_proxies.clone(),
            // Each role says whether its gateways share the count (the split gateway does).
            shared: false,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: default_max_message_bytes(),
            outbound_queue_len: default_outbound_queue_len(),
            requests_per_second: default_requests_per_second(),
            request_burst: default_request_burst(),
            write_stall_timeout_ms: default_write_stall_timeout_ms(),
            idle_ping_ms: default_idle_ping_ms(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            max_followed_chats: default_max_followed_chats(),
            max_connections: 0,
            drain_delay_ms: 0,
            chat_starts_per_minute_per_address: 0,
            chat_start_burst_per_address: default_chat_start_burst_per_address(),
            max_connections_per_address: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: TenantId,
    pub name: String,
    #[serde(default)]
    pub widget_keys: Vec<String>,
    pub groups: Vec<GroupConfig>,
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub id: GroupId,
    pub name: String,
    #[serde(default)]
    pub routing: RoutingConfig,
    /// When the group is open; without it, always.
    #[serde(default)]
    pub hours: Option<HoursSpec>,
    /// The group's waiting-time SLA: a chat waiting longer breaches it. 0: the group has none.
    #[serde(default = "default_wait_sla_ms")]
    pub wait_sla_ms: u64,
}

fn default_wait_sla_ms() -> u64 {
    GroupEntry::DEFAULT_WAIT_SLA_MS.unsigned_abs()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoutingMode {
    #[default]
    Pull,
    Push,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    #[serde(default)]
    pub mode: RoutingMode,
    /// How long an agent has to accept an offer (push mode).
    #[serde(default = "default_offer_timeout_ms")]
    pub offer_timeout_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig { mode: RoutingMode::Pull, offer_timeout_ms: default_offer_timeout_ms() }
    }
}

fn default_offer_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub id: AgentId,
    pub name: String,
    pub token: String,
    pub groups: Vec<GroupId>,
    #[serde(default = "default_capacity")]
    pub capacity: u32,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_node_id() -> String {
    "serve".into()
}
fn default_max_message_bytes() -> usize {
    4096
}
fn default_outbound_queue_len() -> usize {
    1024
}
fn default_requests_per_second() -> u32 {
    switchboard_gateway::RequestRate::default().per_second
}
fn default_chat_start_burst_per_address() -> u32 {
    10
}
fn default_request_burst() -> u32 {
    switchboard_gateway::RequestRate::default().burst
}
fn default_write_stall_timeout_ms() -> u64 {
    switchboard_gateway::DEFAULT_WRITE_STALL_TIMEOUT.as_millis() as u64
}
fn default_idle_ping_ms() -> u64 {
    switchboard_gateway::DEFAULT_IDLE_PING.as_millis() as u64
}
fn default_shutdown_grace_ms() -> u64 {
    15_000
}
fn default_max_followed_chats() -> usize {
    switchboard_gateway::DEFAULT_MAX_FOLLOWED_CHATS
}
fn default_capacity() -> u32 {
    3
}

impl Config {
    /// Parses and validates a configuration document, then applies the environment overrides.
    pub fn parse(yaml: &str, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let mut config: Config = serde_yaml_ng::from_str(yaml).context("invalid configuration")?;
        if config.version != CONFIG_VERSION {
            bail!("invalid configuration: version: this build reads version {CONFIG_VERSION}, not {}", config.version);
        }
        if let Some(listen) = env("SWITCHBOARD_LISTEN") {
            config.listen =
                listen.parse().context("invalid SWITCHBOARD_LISTEN: expected an address like 127.0.0.1:8080")?;
        }
        if let Some(data_dir) = env("SWITCHBOARD_DATA_DIR") {
            config.data_dir = PathBuf::from(data_dir);
        }
        if let Some(max) = env("SWITCHBOARD_LICENSE_MAX_SESSIONS") {
            config.license.max_sessions =
                max.parse().context("invalid SWITCHBOARD_LICENSE_MAX_SESSIONS: expected a number (0 = unlimited)")?;
        }
        if let Some(endpoint) = env("SWITCHBOARD_OTLP_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            config.telemetry.otlp_endpoint = Some(endpoint).filter(|endpoint| !endpoint.is_empty());
        }
        if let Some(url) = env("SWITCHBOARD_REDIS_URL") {
            config.presence.redis_url = Some(url);
        }
        if let Some(grace) = env("SWITCHBOARD_PRESENCE_GRACE_MS") {
            config.presence.grace_ms =
                grace.parse().context("invalid SWITCHBOARD_PRESENCE_GRACE_MS: expected milliseconds")?;
        }
        if let Some(heartbeat) = env("SWITCHBOARD_PRESENCE_HEARTBEAT_MS") {
            config.presence.heartbeat_ms =
                heartbeat.parse().context("invalid SWITCHBOARD_PRESENCE_HEARTBEAT_MS: expected milliseconds")?;
        }
        if config.presence.heartbeat_ms == 0 || config.presence.heartbeat_ms > 60_000 {
            bail!("invalid configuration: presence.heartbeat_ms must be between 1 and 60000");
        }
        if let Some(after) = env("SWITCHBOARD_ABANDON_AFTER_MS") {
            config.presence.abandon_after_ms =
                after.parse().context("invalid SWITCHBOARD_ABANDON_AFTER_MS: expected milliseconds (0 = never)")?;
        }
        if !(1..=86_400_000).contains(&config.presence.customer_grace_ms) {
            bail!("invalid configuration: presence.customer_grace_ms must be between 1 and 86400000");
        }
        if !(100..=600_000).contains(&config.presence.customer_heartbeat_ms) {
            bail!("invalid configuration: presence.customer_heartbeat_ms must be between 100 and 600000");
        }
        let after = config.presence.abandon_after_ms;
        if after != 0 && (after < config.presence.customer_heartbeat_ms.saturating_mul(2) || after > 86_400_000) {
            bail!(
                "invalid configuration: presence.abandon_after_ms must be 0 (never) or between twice \
                 presence.customer_heartbeat_ms and 86400000"
            );
        }
        if let Some(max) = env("SWITCHBOARD_MAX_MESSAGE_BYTES") {
            config.limits.max_message_bytes =
                max.parse().context("invalid SWITCHBOARD_MAX_MESSAGE_BYTES: expected a number of bytes")?;
        }
        if config.limits.max_message_bytes == 0 || config.limits.max_message_bytes > 1 << 20 {
            bail!("invalid configuration: limits.max_message_bytes must be between 1 and 1048576");
        }
        if config.limits.outbound_queue_len < MIN_OUTBOUND_QUEUE_LEN {
            // One request can queue a few pushes at once (an accept queues its events and a queue change).
            bail!("invalid configuration: limits.outbound_queue_len must be at least {MIN_OUTBOUND_QUEUE_LEN}");
        }
        if config.limits.requests_per_second > 0 && config.limits.request_burst == 0 {
            bail!(
                "invalid configuration: limits.request_burst must be at least 1 (or requests_per_second 0: no limit)"
            );
        }
        if !(100..=600_000).contains(&config.limits.write_stall_timeout_ms) {
            bail!("invalid configuration: limits.write_stall_timeout_ms must be between 100 and 600000");
        }
        if !(100..=3_600_000).contains(&config.limits.idle_ping_ms) {
            bail!("invalid configuration: limits.idle_ping_ms must be between 100 and 3600000");
        }
        if !(100..=600_000).contains(&config.limits.shutdown_grace_ms) {
            // Enough for the connections to be told (1001, UNAVAILABLE) before the process goes.
            bail!("invalid configuration: limits.shutdown_grace_ms must be between 100 and 600000");
        }
        if let Some(delay) = env("SWITCHBOARD_DRAIN_DELAY_MS") {
            config.limits.drain_delay_ms =
                delay.parse().context("invalid SWITCHBOARD_DRAIN_DELAY_MS: expected milliseconds")?;
        }
        if config.limits.drain_delay_ms > 600_000 {
            bail!("invalid configuration: limits.drain_delay_ms must be at most 600000");
        }
        if let Some(max) = env("SWITCHBOARD_MAX_CONNECTIONS") {
            config.limits.max_connections =
                max.parse().context("invalid SWITCHBOARD_MAX_CONNECTIONS: expected a number of connections")?;
        }
        if config.limits.max_connections > MAX_CONNECTIONS {
            bail!("invalid configuration: limits.max_connections must be at most {MAX_CONNECTIONS} (0: no limit)");
        }
        if config.limits.chat_starts_per_minute_per_address > 0 && config.limits.chat_start_burst_per_address == 0 {
            bail!(
                "invalid configuration: limits.chat_start_burst_per_address must be at least 1 (or \
                 chat_starts_per_minute_per_address 0: no limit)"
            );
        }
        if config.limits.max_connections_per_address > MAX_CONNECTIONS {
            bail!(
                "invalid configuration: limits.max_connections_per_address must be at most {MAX_CONNECTIONS} (0: no \
                 limit)"
            );
        }
        if !(1..=MAX_FOLLOWED_CHATS).contains(&config.limits.max_followed_chats) {
            bail!("invalid configuration: limits.max_followed_chats must be between 1 and {MAX_FOLLOWED_CHATS}");
        }
        if config.tenants.is_empty() {
            bail!("invalid configuration: tenants: at least one tenant is needed");
        }
        config.directory()?;
        Ok(config)
    }

    /// The tenancy directory of this configuration.
    pub fn directory(&self) -> anyhow::Result<Directory> {
        let mut directory = Directory::default();
        for tenant in &self.tenants {
            let mut groups = BTreeMap::new();
            for group in &tenant.groups {
                let mut entry = GroupEntry::new(group.id.clone(), group.name.clone());
                if group.routing.mode == RoutingMode::Push {
                    if group.routing.offer_timeout_ms == 0 {
                        bail!(
                            "invalid configuration: tenants.{}.groups.{}.routing.offer_timeout_ms must be positive",
                            tenant.id,
                            group.id
                        );
                    }
                    let offer_timeout_ms = i64::try_from(group.routing.offer_timeout_ms).unwrap_or(i64::MAX);
                    entry.routing = Routing::Push { offer_timeout_ms };
                }
                entry.wait_sla_ms =
                    (group.wait_sla_ms > 0).then(|| i64::try_from(group.wait_sla_ms).unwrap_or(i64::MAX));
                if let Some(hours) = &group.hours {
                    entry.hours = BusinessHours::new(hours).map_err(|error| {
                        anyhow::anyhow!(
                            "invalid configuration: tenants.{}.groups.{}.hours: {error}",
                            tenant.id,
                            group.id
                        )
                    })?;
                }
                if groups.insert(group.id.clone(), entry).is_some() {
                    bail!("invalid configuration: tenants.{}.groups: group {} is defined twice", tenant.id, group.id);
                }
            }
            let mut agents = BTreeMap::new();
            let mut tokens = Vec::new();
            for agent in &tenant.agents {
                let entry = AgentEntry {
                    id: agent.id.clone(),
                    name: agent.name.clone(),
                    groups: agent.groups.clone(),
                    capacity: agent.capacity,
                };
                if agents.insert(agent.id.clone(), entry).is_some() {
                    bail!("invalid configuration: tenants.{}.agents: agent {} is defined twice", tenant.id, agent.id);
                }
                tokens.push((agent.id.clone(), agent.token.clone()));
            }
            let entry = TenantEntry { id: tenant.id.clone(), name: tenant.name.clone(), groups, agents };
            directory
                .add_tenant(entry, tenant.widget_keys.clone(), tokens)
                .map_err(|error| anyhow::anyhow!("invalid configuration: {error}"))?;
        }
        Ok(directory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_demo_configuration_is_valid() {
        let config = Config::parse(DEMO_CONFIG, no_env).unwrap();
        let directory = config.directory().unwrap();
        let (tenant, agent) = directory.agent_of_token("demo-alice-token").unwrap();
        assert_eq!((tenant.as_str(), agent.as_str()), ("demo", "alice"));
    }

    #[test]
    fn a_connections_request_budget_is_configured_or_unlimited_but_never_empty() {
        let defaults = Config::parse(DEMO_CONFIG, no_env).unwrap().limits;
        assert_eq!((defaults.requests_per_second, defaults.request_burst), (50, 100));
        let with = |limits: &str| DEMO_CONFIG.replace("version: 1", &format!("version: 1\nlimits: {limits}"));
        let set = Config::parse(&with("{ requests_per_second: 5, request_burst: 10 }"), no_env).unwrap().limits;
        assert_eq!((set.requests_per_second, set.request_burst), (5, 10));
        let unlimited = Config::parse(&with("{ requests_per_second: 0, request_burst: 0 }"), no_env).unwrap();
        assert_eq!(unlimited.limits.requests_per_second, 0);
        let error = format!("{:#}", Config::parse(&with("{ request_burst: 0 }"), no_env).unwrap_err());
        assert!(error.contains("limits.request_burst"), "{error}");
    }

    #[test]
    fn slow_clients_and_shutdown_wait_within_bounds() {
        let defaults = Config::parse(DEMO_CONFIG, no_env).unwrap().limits;
        assert_eq!(
            (defaults.write_stall_timeout_ms, defaults.shutdown_grace_ms, defaults.idle_ping_ms),
            (30_000, 15_000, 30_000)
        );
        let with = |limits: &str| DEMO_CONFIG.replace("version: 1", &format!("version: 1\nlimits: {limits}"));
        let set =
            Config::parse(&with("{ write_stall_timeout_ms: 500, shutdown_grace_ms: 100, idle_ping_ms: 2000 }"), no_env)
                .unwrap();
        assert_eq!(
            (set.limits.write_stall_timeout_ms, set.limits.shutdown_grace_ms, set.limits.idle_ping_ms),
            (500, 100, 2000)
        );
        for (limits, named) in [
            ("{ write_stall_timeout_ms: 0 }", "limits.write_stall_timeout_ms"),
            ("{ idle_ping_ms: 99 }", "limits.idle_ping_ms"),
            ("{ idle_ping_ms: 3600001 }", "limits.idle_ping_ms"),
            ("{ shutdown_grace_ms: 0 }", "limits.shutdown_grace_ms"),
            ("{ shutdown_grace_ms: 600001 }", "limits.shutdown_grace_ms"),
            ("{ drain_delay_ms: 600001 }", "limits.drain_delay_ms"),
        ] {
            let error = format!("{:#}", Config::parse(&with(limits), no_env).unwrap_err());
            assert!(error.contains(named), "{error}");
        }
        // A drain delay: none by default, from the file or the environment (which wins).
        assert_eq!(defaults.drain_delay_ms, 0);
        let file = Config::parse(&with("{ drain_delay_ms: 5000 }"), no_env).unwrap();
        assert_eq!(file.limits.drain_delay_ms, 5000);
        let env = |name: &str| (name == "SWITCHBOARD_DRAIN_DELAY_MS").then(|| "250".to_owned());
        assert_eq!(Config::parse(&with("{ drain_delay_ms: 5000 }"), env).unwrap().limits.drain_delay_ms, 250);
        let bad = |name: &str| (name == "SWITCHBOARD_DRAIN_DELAY_MS").then(|| "soon".to_owned());
        let error = format!("{:#}", Config::parse(DEMO_CONFIG, bad).unwrap_err());
        assert!(error.contains("SWITCHBOARD_DRAIN_DELAY_MS"), "{error}");
    }

    #[test]
    fn connections_per_gateway_unlimited_by_default_and_within_bounds() {
        let defaults = Config::parse(DEMO_CONFIG, no_env).unwrap().limits;
        assert_eq!(defaults.max_connections, 0);
        let with = |limits: &str| DEMO_CONFIG.replace("version: 1", &format!("version: 1\nlimits: {limits}"));
        let set = Config::parse(&with("{ max_connections: 20000 }"), no_env).unwrap();
        assert_eq!(set.limits.max_connections, 20_000);
        let env = |name: &str| (name == "SWITCHBOARD_MAX_CONNECTIONS").then(|| "300".to_owned());
        assert_eq!(Config::parse(DEMO_CONFIG, env).unwrap().limits.max_connections, 300);
        let error = format!("{:#}", Config::parse(&with("{ max_connections: 10000001 }"), no_env).unwrap_err());
        assert!(error.contains("limits.max_connections"), "{error}");
        let bad_env = |name: &str| (name == "SWITCHBOARD_MAX_CONNECTIONS").then(|| "many".to_owned());
        let error = format!("{:#}", Config::parse(DEMO_CONFIG, bad_env).unwrap_err());
        assert!(error.contains("SWITCHBOARD_MAX_CONNECTIONS"), "{error}");
    }

    #[test]
    fn chat_starts_per_address_unlimited_by_default_and_trusted_proxies_read() {
        let defaults = Config::parse(DEMO_CONFIG, no_env).unwrap().limits.address_limits();
        assert_eq!((defaults.per_minute, defaults.burst, defaults.trusted_proxies.len()), (0, 10, 0));
        let with = |limits: &str| DEMO_CONFIG.replace("version: 1", &format!("version: 1\nlimits: {limits}"));
        let set = Config::parse(
            &with("{ chat_starts_per_minute_per_address: 6, chat_start_burst_per_address: 3, trusted_proxies: [10.0.0.0/8, '::1'] }"),
            no_env,
        )
        .unwrap()
        .limits
        .address_limits();
        assert_eq!((set.per_minute, set.burst), (6, 3));
        assert!(set.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));
        assert!(set.trusted_proxies[1].contains("::1".parse().unwrap()));
        let error = format!("{:#}", Config::parse(&with("{ trusted_proxies: [10.0.0.0/40] }"), no_env).unwrap_err());
        assert!(error.contains("limits.trusted_proxies") && error.contains("10.0.0.0/40"), "{error}");
        let error = format!(
            "{:#}",
            Config::parse(&with("{ chat_starts_per_minute_per_address: 6, chat_start_burst_per_address: 0 }"), no_env)
                .unwrap_err()
        );
        assert!(error.contains("limits.chat_start_burst_per_address"), "{error}");
        // Connections per address: none by default, a number, bounded.
        assert_eq!(defaults.max_connections, 0);
        let set = Config::parse(&with("{ max_connections_per_address: 20 }"), no_env).unwrap();
        assert_eq!(set.limits.address_limits().max_connections, 20);
        let error =
            format!("{:#}", Config::parse(&with("{ max_connections_per_address: 10000001 }"), no_env).unwrap_err());
        assert!(error.contains("limits.max_connections_per_address"), "{error}");
    }

    #[test]
    fn followed_chats_per_connection_within_bounds() {
        let defaults = Config::parse(DEMO_CONFIG, no_env).unwrap().limits;
        assert_eq!(defaults.max_followed_chats, 1000);
        let with = |limits: &str| DEMO_CONFIG.replace("version: 1", &format!("version: 1\nlimits: {limits}"));
        let set = Config::parse(&with("{ max_followed_chats: 2 }"), no_env).unwrap();
        assert_eq!(set.limits.max_followed_chats, 2);
        for limits in ["{ max_followed_chats: 0 }", "{ max_followed_chats: 100001 }"] {
            let error = format!("{:#}", Config::parse(&with(limits), no_env).unwrap_err());
            assert!(error.contains("limits.max_followed_chats"), "{error}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let yaml = DEMO_CONFIG.replace("version: 1", "version: 1\nlisten_adress: 1.2.3.4:5");
        let error = format!("{:#}", Config::parse(&yaml, no_env).unwrap_err());
        assert!(error.contains("listen_adress"), "{error}");
    }

    #[test]
    fn a_bad_reference_names_the_agent_and_group() {
        let yaml = DEMO_CONFIG.replace("groups: [sales], capacity: 2", "groups: [billing], capacity: 2");
        let error = format!("{:#}", Config::parse(&yaml, no_env).unwrap_err());
        assert!(error.contains("bob") && error.contains("billing"), "{error}");
    }

    #[test]
    fn a_customer_has_left_after_half_a_minute_by_default_whatever_the_agents_grace() {
        let defaults = Config::parse(DEMO_CONFIG, no_env).unwrap().presence;
        assert_eq!((defaults.grace_ms, defaults.customer_grace_ms), (30_000, 30_000));
        let with = |presence: &str| DEMO_CONFIG.replace("version: 1", &format!("version: 1\npresence: {presence}"));
        let set = Config::parse(&with("{ grace_ms: 10000, customer_grace_ms: 120000 }"), no_env).unwrap();
        assert_eq!((set.presence.grace_ms, set.presence.customer_grace_ms), (10_000, 120_000));
        for bad in ["{ customer_grace_ms: 0 }", "{ customer_grace_ms: 86400001 }"] {
            let error = format!("{:#}", Config::parse(&with(bad), no_env).unwrap_err());
            assert!(error.contains("presence.customer_grace_ms"), "{bad}: {error}");
        }
    }

    #[test]
    fn abandoned_chats_after_a_minute_by_default_never_or_within_bounds() {
        let defaults = Config::parse(DEMO_CONFIG, no_env).unwrap().presence;
        assert_eq!((defaults.customer_heartbeat_ms, defaults.abandon_after_ms), (10_000, 60_000));
        let with = |presence: &str| DEMO_CONFIG.replace("version: 1", &format!("version: 1\npresence: {presence}"));
        let set = Config::parse(&with("{ customer_heartbeat_ms: 500, abandon_after_ms: 1000 }"), no_env).unwrap();
        assert_eq!((set.presence.customer_heartbeat_ms, set.presence.abandon_after_ms), (500, 1_000));
        let never = Config::parse(&with("{ abandon_after_ms: 0 }"), no_env).unwrap();
        assert_eq!(never.presence.abandon_after_ms, 0);
        for (bad, named) in [
            ("{ abandon_after_ms: 19999 }", "presence.abandon_after_ms"),
            ("{ customer_heartbeat_ms: 500, abandon_after_ms: 999 }", "presence.abandon_after_ms"),
            ("{ abandon_after_ms: 86400001 }", "presence.abandon_after_ms"),
            ("{ customer_heartbeat_ms: 99 }", "presence.customer_heartbeat_ms"),
        ] {
            let error = format!("{:#}", Config::parse(&with(bad), no_env).unwrap_err());
            assert!(error.contains(named), "{bad}: {error}");
        }
        let env = |name: &str| (name == "SWITCHBOARD_ABANDON_AFTER_MS").then(|| "0".to_owned());
        assert_eq!(Config::parse(DEMO_CONFIG, env).unwrap().presence.abandon_after_ms, 0);
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let env = |name: &str| match name {
            "SWITCHBOARD_LISTEN" => Some("127.0.0.1:9999".to_owned()),
            "SWITCHBOARD_MAX_MESSAGE_BYTES" => Some("100".to_owned()),
            _ => None,
        };
        let config = Config::parse(DEMO_CONFIG, env).unwrap();
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.limits.max_message_bytes, 100);
        let bad = |name: &str| (name == "SWITCHBOARD_LISTEN").then(|| "nowhere".to_owned());
        assert!(format!("{:#}", Config::parse(DEMO_CONFIG, bad).unwrap_err()).contains("SWITCHBOARD_LISTEN"));
    }

    #[test]
    fn groups_take_push_routing_and_business_hours() {
        let yaml = DEMO_CONFIG.replace(
            "- { id: support, name: Support }",
            "- id: support\n        name: Support\n        routing: { mode: push, offer_timeout_ms: 15000 }\n        hours: { time_zone: Europe/Berlin, weekly: { mon: [\"09:00-17:00\"] } }",
        );
        let directory = Config::parse(&yaml, no_env).unwrap().directory().unwrap();
        let group = directory.group(&TenantId::new("demo").unwrap(), &GroupId::new("support").unwrap()).unwrap();
        assert_eq!(group.routing, Routing::Push { offer_timeout_ms: 15_000 });
        assert_eq!(group.wait_sla_ms, Some(GroupEntry::DEFAULT_WAIT_SLA_MS), "the default SLA");
        // Monday 2026-11-23 10:00 in Berlin is 09:00 UTC; Sunday is closed.
        assert!(group.hours.is_open(1_795_424_400_000));
        assert!(!group.hours.is_open(1_795_424_400_000 - 86_400_000));
        let bad = yaml.replace("Europe/Berlin", "Mars/Olympus");
        let error = format!("{:#}", Config::parse(&bad, no_env).unwrap_err());
        assert!(error.contains("support") && error.contains("Mars/Olympus"), "{error}");
    }

    #[test]
    fn a_group_sets_its_waiting_time_sla_or_has_none() {
        let with = |sla: &str| {
            let yaml = DEMO_CONFIG.replace(
                "- { id: support, name: Support }",
                &format!("- {{ id: support, name: Support, wait_sla_ms: {sla} }}"),
            );
            let directory = Config::parse(&yaml, no_env).unwrap().directory().unwrap();
            directory.group(&TenantId::new("demo").unwrap(), &GroupId::new("support").unwrap()).unwrap().wait_sla_ms
        };
        assert_eq!(with("45000"), Some(45_000));
        assert_eq!(with("0"), None, "0: no SLA");
        let negative = DEMO_CONFIG
            .replace("- { id: support, name: Support }", "- { id: support, name: Support, wait_sla_ms: -1 }");
        assert!(Config::parse(&negative, no_env).is_err());
    }

    #[test]
    fn another_version_is_refused() {
        let yaml = DEMO_CONFIG.replace("version: 1", "version: 2");
        assert!(format!("{:#}", Config::parse(&yaml, no_env).unwrap_err()).contains("version"));
    }
}
