//! The servers under test, as child processes: the bare relay, `switchboard serve`, and the split cluster
//! (PostgreSQL and Redis from `switchboard-testservices`, `switchboard migrate`, one store, two routers, one
//! gateway). Each is ready once it prints its listening line; each is killed when dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use switchboard_testservices::{Postgres, Redis};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A guard against a process that never becomes ready (readiness is its listening line).
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// A guard for the routers to lease every shard.
const PLACEMENT_DEADLINE: Duration = Duration::from_secs(90);
/// Shards of the cluster (`switchboard_domain::N_SHARDS`).
const N_SHARDS: i64 = 1024;
/// Routers of the split cluster.
pub const ROUTERS: usize = 2;

/// One server process, killed on drop.
#[derive(Debug)]
pub struct Server {
    pub name: String,
    /// `HOST:PORT` from its listening line.
    pub address: String,
    pub pid: u32,
    child: Child,
}

/// What a process is started with.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub program: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
    /// The line it prints when ready, up to the address.
    pub ready_prefix: &'a str,
    pub name: &'a str,
    pub log_dir: &'a Path,
}

impl Server {
    /// Starts the process and waits for its listening line; its stdout and stderr go to `LOG_DIR/NAME.log`.
    pub async fn start(launch: Launch<'_>) -> anyhow::Result<Server> {
        let log_path = launch.log_dir.join(format!("{}.log", launch.name));
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(launch.program)
            .args(&launch.args)
            .envs(launch.env.iter().map(|(name, value)| (*name, value.as_str())))
            .env("NO_COLOR", "1")
            // A start failure is reported with the log's tail: without a backtrace in it.
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", launch.program.display()))?;
        let pid = child.id().context("the process has no id")?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let ready = tokio::time::timeout(READY_DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(address) = line.strip_prefix(launch.ready_prefix) {
                    return Ok(address.trim().to_owned());
                }
            }
            bail!("it exited before listening")
        })
        .await;
        let address = match ready {
            Ok(Ok(address)) => address,
            Ok(Err(error)) => bail!("{}: {error}; its log:\n{}", launch.name, tail(&log_path, 30)),
            Err(_) => {
                bail!("{} did not listen within {READY_DEADLINE:?}; its log:\n{}", launch.name, tail(&log_path, 30))
            }
        };
        // Keep draining stdout into the log, so that the process never blocks on a full pipe.
        let mut log = log;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log, "{line}");
            }
        });
        Ok(Server { name: launch.name.to_owned(), address, pid, child })
    }

    /// The WebSocket endpoint of a relay, `serve` or a gateway.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.address)
    }

    /// Kills it and waits for the exit.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Where the programs are: `bare-relay`, `switchboard` and `switchboard-loadgen`, side by side in
/// `target/release` (or the `--bin-dir` given).
#[derive(Debug, Clone)]
pub struct Programs {
    pub relay: PathBuf,
    pub switchboard: PathBuf,
    pub loadgen: PathBuf,
}

impl Programs {
    pub fn in_dir(dir: &Path) -> anyhow::Result<Programs> {
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
            if !path.is_file() {
                bail!(
                    "{} is missing: build it first (cargo build --release -p switchboard -p switchboard-loadgen \
                     -p switchboard-benches --bin switchboard --bin switchboard-loadgen --bin bare-relay)",
                    path.display()
                );
            }
            Ok(path)
        };
        Ok(Programs {
            relay: find("bare-relay")?,
            switchboard: find("switchboard")?,
            loadgen: find("switchboard-loadgen")?,
        })
    }
}

/// The environment of every switchboard process: quiet logs, and the metrics endpoints of the store and the
/// routers on free ports (their fixed defaults would collide between two routers, or with other servers).
fn quiet() -> Vec<(&'static str, String)> {
    vec![("RUST_LOG", "warn".to_owned()), ("SWITCHBOARD_METRICS_LISTEN", "127.0.0.1:0".to_owned())]
}

pub async fn start_relay(programs: &Programs, log_dir: &Path, groups: &[String]) -> anyhow::Result<Server> {
    let args = vec!["--listen".into(), "127.0.0.1:0".into(), "--groups".into(), groups.join(",")];
    let launch = Launch {
        program: &programs.relay,
        args,
        env: vec![],
        ready_prefix: "bare-relay listening on http://",
        name: "bare-relay",
        log_dir,
    };
    Server::start(launch).await
}

/// `switchboard serve --config CONFIG` on a free port, with its data in a fresh directory under `log_dir`.
pub async fn start_serve(programs: &Programs, config: &Path, log_dir: &Path, name: &str) -> anyhow::Result<Server> {
    let data_dir = log_dir.join(format!("{name}-data"));
    std::fs::create_dir_all(&data_dir)?;
    let mut env = quiet();
    env.push(("SWITCHBOARD_LISTEN", "127.0.0.1:0".to_owned()));
    env.push(("SWITCHBOARD_DATA_DIR", data_dir.display().to_string()));
    let args = vec!["serve".to_owned(), "--config".to_owned(), config.display().to_string()];
    let launch = Launch {
        program: &programs.switchboard,
        args,
        env,
        ready_prefix: "switchboard listening on http://",
        name,
        log_dir,
    };
    Server::start(launch).await
}

/// The split cluster: one store, [`ROUTERS`] routers and one gateway on a fresh database and a fresh Redis.
#[derive(Debug)]
pub struct Cluster {
    pub store: Server,
    pub routers: Vec<Server>,
    pub gateway: Server,
    // Dropped after the processes: Redis outlives its clients.
    redis: Redis,
}

impl Cluster {
    /// Every process of the cluster (PostgreSQL and Redis are not counted).
    pub fn servers(&self) -> Vec<&Server> {
        let mut servers = vec![&self.gateway, &self.store];
        servers.extend(&self.routers);
        servers
    }

    pub fn pids(&self) -> Vec<u32> {
        self.servers().iter().map(|server| server.pid).collect()
    }

    /// The cluster's Redis, while it runs.
    pub fn redis_pid(&self) -> Option<u32> {
        self.redis.pid()
    }

    pub async fn stop(self) {
        self.gateway.stop().await;
        for router in self.routers {
            router.stop().await;
        }
        self.store.stop().await;
    }
}

/// Starts a cluster on a new database of `postgres`, with `config`; returns once every shard is leased
/// and each router holds some.
pub async fn start_cluster(
    programs: &Programs,
    postgres: &Postgres,
    config: &Path,
    log_dir: &Path,
    name: &str,
) -> anyhow::Result<Cluster> {
    let redis = tokio::task::spawn_blocking(Redis::start).await??;
    let database_url = tokio::task::block_in_place(|| postgres.create_database())?;
    let config = config.display().to_string();
    let mut env = quiet();
    env.push(("SWITCHBOARD_REDIS_URL", redis.url()));
    let role = |role: &str, extra: Vec<String>| {
        let mut args = vec![role.to_owned(), "--config".to_owned(), config.clone()];
        args.extend(extra);
        args.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
        args
    };
    let migrate = Command::new(&programs.switchboard)
        .args(["migrate", "--config", &config, "--database-url", &database_url])
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .output()
        .await?;
    if !migrate.status.success() {
        bail!("switchboard migrate failed: {}", String::from_utf8_lossy(&migrate.stderr));
    }
    let process = format!("{name}-store");
    let launch = Launch {
        program: &programs.switchboard,
        args: role("store", vec!["--database-url".into(), database_url.clone()]),
        env: env.clone(),
        ready_prefix: "switchboard store listening on http://",
        name: &process,
        log_dir,
    };
    let store = Server::start(launch).await?;
    let store_url = format!("http://{}", store.address);
    let mut routers = Vec::new();
    for i in 0..ROUTERS {
        let args = role("router", vec!["--store".into(), store_url.clone(), "--node-id".into(), format!("router-{i}")]);
        let process = format!("{name}-router-{i}");
        let launch = Launch {
            program: &programs.switchboard,
            args,
            env: env.clone(),
            ready_prefix: "switchboard router listening on http://",
            name: &process,
            log_dir,
        };
        routers.push(Server::start(launch).await?);
    }
    let args = role("gateway", vec!["--store".into(), store_url, "--gateway-id".into(), "gateway-0".into()]);
    let process = format!("{name}-gateway");
    let launch = Launch {
        program: &programs.switchboard,
        args,
        env,
        ready_prefix: "switchboard gateway listening on http://",
        name: &process,
        log_dir,
    };
    let gateway = Server::start(launch).await?;
    wait_for_placement(&database_url).await?;
    Ok(Cluster { store, routers, gateway, redis })
}

/// Polls the database until every shard has an unexpired lease and every router holds some.
async fn wait_for_placement(database_url: &str) -> anyhow::Result<()> {
    const QUERY: &str = "SELECT COUNT(*), COUNT(DISTINCT owner) FROM shard_leases \
         WHERE expires_at_ms > CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(database_url).await?;
    let placed = tokio::time::timeout(PLACEMENT_DEADLINE, async {
        loop {
            let (shards, owners): (i64, i64) = sqlx::query_as(QUERY).fetch_one(&pool).await?;
            if shards == N_SHARDS && owners == ROUTERS as i64 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    pool.close().await;
    match placed {
        Ok(result) => result,
        Err(_) => bail!("the routers did not lease every shard within {PLACEMENT_DEADLINE:?}"),
    }
}

/// The resident set of a process, in KiB (`VmRSS` of `/proc/PID/status`); `None` once it is gone.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
