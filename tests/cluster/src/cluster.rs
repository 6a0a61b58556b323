//! A whole cluster on loopback: PostgreSQL, then `switchboard migrate`, stores, routers and gateways as
//! separate processes, ready once every shard is leased by a live router.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::future::try_join_all;
use switchboard_testservices::{Postgres, Redis};
use tokio::time::Instant;

use crate::checker::{self, Invariant, Report};
use crate::db::{ConversationOwner, Db, Placement, SHARDS};
use crate::log::LogData;
use crate::process::{self, Process, Role};

/// How often a condition on the database is polled while waiting for it.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A guard for the placement to complete after a start or a fault.
pub const PLACEMENT_DEADLINE: Duration = Duration::from_secs(30);

/// The routers' lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    pub lease_ms: u64,
    pub renew_every_ms: u64,
    pub renew_deadline_ms: u64,
}

impl Default for LeaseSettings {
    /// Short leases, so that a failover takes seconds: 3 s lease, renewed every 500 ms, 2 s renew deadline.
    fn default() -> LeaseSettings {
        LeaseSettings { lease_ms: 3000, renew_every_ms: 500, renew_deadline_ms: 2000 }
    }
}

impl LeaseSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub gateways: usize,
    pub routers: usize,
    pub stores: usize,
    /// The configuration every role reads (`--config`). The harness adds the `presence` (its Redis, the
    /// heartbeat and grace below) and `license` sections: the given one must not have them.
    pub config_yaml: String,
    pub lease: LeaseSettings,
    pub presence_heartbeat_ms: u64,
    pub presence_grace_ms: u64,
    /// How long an active chat's customer may be gone before `customer_left`.
    pub customer_grace_ms: u64,
    /// How often gateways write customers' connections, and how long a waiting chat's customer may be
    /// gone before it is abandoned (0: never).
    pub customer_heartbeat_ms: u64,
    pub abandon_after_ms: u64,
    /// The cluster-wide license limit (0 = unlimited).
    pub license_max_sessions: u64,
    /// Environment variables added to every store, router and gateway (e.g. `SWITCHBOARD_OTLP_ENDPOINT`).
    pub env: Vec<(String, String)>,
}

impl ClusterSpec {
    /// Two gateways, three routers, one store, default leases.
    pub fn new(config_yaml: &str) -> ClusterSpec {
        ClusterSpec {
            gateways: 2,
            routers: 3,
            stores: 1,
            config_yaml: config_yaml.to_owned(),
            lease: LeaseSettings::default(),
            presence_heartbeat_ms: 500,
            presence_grace_ms: 30_000,
            customer_grace_ms: 30_000,
            customer_heartbeat_ms: 10_000,
            abandon_after_ms: 60_000,
            license_max_sessions: 0,
            env: Vec::new(),
        }
    }

    /// The configuration file the roles read: the given one with this cluster's presence and license.
    fn config_with(&self, redis_url: &str) -> String {
        let sections = format!(
            "presence:\n  redis_url: \"{redis_url}\"\n  heartbeat_ms: {}\n  grace_ms: {}\n  customer_grace_ms: {}\n  customer_heartbeat_ms: {}\n  abandon_after_ms: {}\nlicense:\n  max_sessions: {}\n",
            self.presence_heartbeat_ms,
            self.presence_grace_ms,
            self.customer_grace_ms,
            self.customer_heartbeat_ms,
            self.abandon_after_ms,
            self.license_max_sessions
        );
        match self.config_yaml.split_once('\n') {
            Some((first, rest)) => format!("{first}\n{sections}{rest}"),
            None => format!("{}\n{sections}", self.config_yaml),
        }
    }
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub database_url: String,
    pub db: Db,
    pub stores: Vec<Process>,
    pub routers: Vec<Process>,
    pub gateways: Vec<Process>,
    // Dropped after the processes (fields drop in order): PostgreSQL and Redis outlive their clients.
    pub postgres: Postgres,
    pub redis: Redis,
    config_path: PathBuf,
    dir: Option<tempfile::TempDir>,
    passed: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("database_url", &self.database_url)
            .field("stores", &self.stores)
            .field("routers", &self.routers)
            .field("gateways", &self.gateways)
            .finish()
    }
}

fn lease_args(lease: &LeaseSettings) -> Vec<String> {
    vec![
        "--lease-ms".to_owned(),
        lease.lease_ms.to_string(),
        "--renew-every-ms".to_owned(),
        lease.renew_every_ms.to_string(),
        "--renew-deadline-ms".to_owned(),
        lease.renew_deadline_ms.to_string(),
    ]
}

async fn migrate(config_path: &Path, database_url: &str, dir: &Path) -> anyhow::Result<()> {
    let log_path = dir.join("migrate.log");
    let log = std::fs::File::create(&log_path)?;
    let status = tokio::process::Command::new(process::binary()?)
        .args(["migrate", "--config"])
        .arg(config_path)
        .args(["--database-url", database_url])
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .await
        .context("cannot run switchboard migrate")?;
    if !status.success() {
        bail!("switchboard migrate failed ({status}): {}", std::fs::read_to_string(&log_path).unwrap_or_default());
    }
    Ok(())
}

impl Cluster {
    /// Starts everything and waits until every shard is leased and the routers hold their fair shares (so
    /// that no shard moves while a test runs, unless it starts or stops a router). Needs tokio's multi-thread
    /// runtime (PostgreSQL's programs are run with `block_in_place`).
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("switchboard-cluster-").tempdir()?;
        let config_path = dir.path().join("config.yaml");
        let redis = tokio::task::block_in_place(Redis::start)?;
        std::fs::write(&config_path, spec.config_with(&redis.url()))?;
        let postgres = tokio::task::block_in_place(Postgres::start)?;
        let database_url = tokio::task::block_in_place(|| postgres.create_database())?;
        migrate(&config_path, &database_url, dir.path()).await?;
        let db = Db::connect(&database_url).await?;
        let config = config_path.to_str().context("temporary path is not UTF-8")?.to_owned();
        let log_dir = dir.path().to_owned();

        let stores = try_join_all((0..spec.stores).map(|i| {
            let args = vec!["--config".to_owned(), config.clone(), "--database-url".to_owned(), database_url.clone()];
            let log_dir = log_dir.clone();
            let env = &spec.env;
            async move { Process::start(Role::Store, &format!("store-{i}"), args, env, &log_dir).await }
        }))
        .await?;
        let store_urls: Vec<String> = stores.iter().map(Process::http_url).collect();
        let routers = try_join_all((0..spec.routers).map(|i| {
            let mut args = vec!["--config".to_owned(), config.clone(), "--store".to_owned()];
            args.push(store_urls[i % store_urls.len()].clone());
            args.extend(["--node-id".to_owned(), format!("router-{i}")]);
            args.extend(lease_args(&spec.lease));
            let log_dir = log_dir.clone();
            let env = &spec.env;
            async move { Process::start(Role::Router, &format!("router-{i}"), args, env, &log_dir).await }
        }))
        .await?;
        let gateways = try_join_all((0..spec.gateways).map(|i| {
            let mut args = vec!["--config".to_owned(), config.clone(), "--store".to_owned()];
            args.push(store_urls[i % store_urls.len()].clone());
            args.extend(["--gateway-id".to_owned(), format!("gateway-{i}")]);
            let log_dir = log_dir.clone();
            let env = &spec.env;
            async move { Process::start(Role::Gateway, &format!("gateway-{i}"), args, env, &log_dir).await }
        }))
        .await?;

        let mut cluster = Cluster {
            spec,
            database_url,
            db,
            stores,
            routers,
            gateways,
            postgres,
            redis,
            config_path,
            dir: Some(dir),
            passed: false,
        };
        cluster.wait_for_placement(true).await?;
        Ok(cluster)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The WebSocket URLs of the gateways.
    pub fn gateway_urls(&self) -> Vec<String> {
        self.gateways.iter().map(Process::ws_url).collect()
    }

    pub fn router(&mut self, node_id: &str) -> anyhow::Result<&mut Process> {
        self.routers.iter_mut().find(|router| router.name == node_id).with_context(|| format!("no router {node_id}"))
    }

    /// The node ids of the routers running and not stopped by SIGSTOP.
    pub fn live_routers(&mut self) -> BTreeSet<String> {
        self.routers.iter_mut().filter_map(|router| router.is_live().then(|| router.name.clone())).collect()
    }

    /// Polls until every shard has an unexpired lease held by a live router (and, with `every_router`, every
    /// live router holds at least one and none more than its fair share, `ceil(shards / routers)`: the
    /// routers' rebalancing then has nothing left to move); fails after [`PLACEMENT_DEADLINE`].
    pub async fn wait_for_placement(&mut self, every_router: bool) -> anyhow::Result<Placement> {
        let end = Instant::now() + PLACEMENT_DEADLINE;
        loop {
            let live = self.live_routers();
            let state = match self.db.placement().await {
                Ok(placement) => {
                    let unowned = placement.unowned(&live);
                    let by_owner = placement.shards_by_owner();
                    let idle: Vec<&String> = live.iter().filter(|router| !by_owner.contains_key(*router)).collect();
                    let fair_share = SHARDS.div_ceil(live.len().max(1));
                    let settled = by_owner.values().all(|shards| shards.len() <= fair_share);
                    if unowned.is_empty() && (!every_router || (idle.is_empty() && settled)) {
                        return Ok(placement);
                    }
                    let counts: BTreeMap<&String, usize> =
                        by_owner.iter().map(|(node, shards)| (node, shards.len())).collect();
                    format!(
                        "{} shards without a live owner, live routers holding none: {idle:?}, shards per node: {counts:?}",
                        unowned.len()
                    )
                }
                Err(error) => format!("{error:#}"),
            };
            if Instant::now() >= end {
                bail!("the placement did not complete within {PLACEMENT_DEADLINE:?}: {state}\n{}", self.log_tails(20));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Polls `condition` on the database every [`POLL_INTERVAL`] until it holds; fails after `deadline`.
    pub async fn poll_db<T>(
        &self,
        what: &str,
        deadline: Duration,
        mut condition: impl AsyncFnMut(&Db) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let end = Instant::now() + deadline;
        let mut last_error = None;
        loop {
            match condition(&self.db).await {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(error) => last_error = Some(error),
            }
            if Instant::now() >= end {
                bail!("{what}: not reached within {deadline:?} (last error: {last_error:?})");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Who owns a conversation now (from `conversations.shard` and `shard_leases`).
    pub async fn owner_of(&self, conversation_id: &str) -> anyhow::Result<ConversationOwner> {
        self.db.owner_of(conversation_id).await?.with_context(|| format!("no conversation {conversation_id}"))
    }

    /// Unexpired leases per node.
    pub async fn shards_per_node(&self) -> anyhow::Result<BTreeMap<String, Vec<u32>>> {
        self.db.shards_per_node().await
    }

    /// The live owner of each conversation; fails if one has none.
    pub async fn owners(&self, conversations: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
        let mut owners = BTreeMap::new();
        for conversation in conversations {
            let owner = self.owner_of(conversation).await?;
            let node = owner.live_owner().with_context(|| format!("{conversation} has no live owner: {owner:?}"))?;
            owners.insert(conversation.clone(), node.to_owned());
        }
        Ok(owners)
    }

    /// The router that owns the most of `conversations`, and how many; fails if it owns none.
    pub async fn router_owning_most(&self, conversations: &[String]) -> anyhow::Result<(String, usize)> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for node in self.owners(conversations).await?.into_values() {
            *counts.entry(node).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(_, count)| *count).context("no conversation")
    }

    /// Stops PostgreSQL (fast mode: connections dropped) and starts it again on the same port and data.
    pub async fn pg_restart(&self) -> anyhow::Result<()> {
        tokio::task::block_in_place(|| {
            self.postgres.stop()?;
            self.postgres.restart()
        })
    }

    /// Runs the invariant checker on the database and these client logs, with the live routers now.
    ///
    /// "No chat stranded" is about the end state, once the placement has settled: while it is the only
    /// invariant violated (shards being handed over between two routers, say), the check is made again every
    /// [`POLL_INTERVAL`], for at most [`PLACEMENT_DEADLINE`]. Any other violation is reported at once.
    pub async fn check(&mut self, logs: &LogData) -> anyhow::Result<Report> {
        let end = Instant::now() + PLACEMENT_DEADLINE;
        loop {
            let live = self.live_routers();
            let report = checker::check(&self.db, logs, &live).await?;
            let only_stranded = report.violated_invariants().into_iter().eq([Invariant::NoStrandedChat]);
            if !only_stranded || Instant::now() >= end {
                return Ok(report);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The last lines of every process's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut text = String::new();
        for process in self.stores.iter().chain(&self.routers).chain(&self.gateways) {
            text.push_str(&format!(
                "--- {} ({}) ---\n{}\n",
                process.name,
                process.log_path().display(),
                process.log_tail(lines)
            ));
        }
        text
    }

    /// Marks the test as passed: the logs are deleted with the cluster. Without it they are kept and their
    /// tails printed when the cluster is dropped.
    pub fn finish(mut self) {
        self.passed = true;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.passed {
            return;
        }
        if let Some(dir) = self.dir.take() {
            let kept = dir.keep();
            eprintln!("cluster test failed: process logs kept in {}\n{}", kept.display(), self.log_tails(30));
        }
    }
}
