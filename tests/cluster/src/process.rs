//! One `switchboard` role process: started with fixed arguments, ready once it prints its listening line,
//! and driven from outside with signals (SIGKILL, SIGSTOP/SIGCONT, SIGTERM) and restarts on the same address.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A guard against a process that never becomes ready; readiness itself is a line on stdout.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How many times a restart on a fixed address is tried when the port is briefly taken.
const BIND_ATTEMPTS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Store,
    Router,
    Gateway,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Store => "store",
            Role::Router => "router",
            Role::Gateway => "gateway",
        }
    }
}

/// The binary built by `cargo build -p switchboard` (`target/<profile>/switchboard`), or `$SWITCHBOARD_BIN`.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SWITCHBOARD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/switchboard
    let profile_dir = exe.parent().and_then(Path::parent).context("unexpected test executable location")?;
    let path = profile_dir.join(format!("switchboard{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        bail!("{} is missing: build it first with `cargo build -p switchboard`", path.display());
    }
    Ok(path)
}

/// The log filter of the processes: quiet unless `SWITCHBOARD_CLUSTER_RUST_LOG` asks for more.
fn rust_log() -> String {
    std::env::var("SWITCHBOARD_CLUSTER_RUST_LOG").unwrap_or_else(|_| "warn".to_owned())
}

pub struct Process {
    program: PathBuf,
    pub role: Role,
    /// The node id of a router, the gateway id of a gateway, `store-N` for a store.
    pub name: String,
    args: Vec<String>,
    /// Environment variables set on top of the harness's own (which they override).
    env: Vec<(String, String)>,
    /// `127.0.0.1:0` before the first start; afterwards the address it got, so that a restart reuses it.
    listen: String,
    address: String,
    /// `HOST:PORT` of its `/metrics`, a port of its own (`SWITCHBOARD_METRICS_LISTEN`)
    /// (as the last start printed it).
    metrics_address: String,
    child: Option<Child>,
    pid: Option<u32>,
    paused: bool,
    starts: u32,
    log_path: PathBuf,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("role", &self.role)
            .field("name", &self.name)
            .field("address", &self.address)
            .field("pid", &self.pid)
            .field("paused", &self.paused)
            .finish()
    }
}

impl Process {
    /// Starts `switchboard <role> <args> --listen 127.0.0.1:0` with `env` added to its environment (for every
    /// start); returns once it listens.
    pub async fn start(
        role: Role,
        name: &str,
        args: Vec<String>,
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Process> {
        let mut process = Process::new(binary()?, role, name, args, log_dir);
        process.env = env.to_vec();
        process.spawn().await?;
        Ok(process)
    }

    /// [`Process::start`] with another program that follows the same contract (the harness's own tests).
    pub async fn start_program(
        program: PathBuf,
        role: Role,
        name: &str,
        args: Vec<String>,
        log_dir: &Path,
    ) -> anyhow::Result<Process> {
        let mut process = Process::new(program, role, name, args, log_dir);
        process.spawn().await?;
        Ok(process)
    }

    fn new(program: PathBuf, role: Role, name: &str, args: Vec<String>, log_dir: &Path) -> Process {
        Process {
            program,
            role,
            name: name.to_owned(),
            args,
            env: Vec::new(),
            listen: "127.0.0.1:0".to_owned(),
            address: String::new(),
            metrics_address: String::new(),
            child: None,
            pid: None,
            paused: false,
            starts: 0,
            log_path: log_dir.join(format!("{}-{name}.log", role.as_str())),
        }
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut last_error = None;
        let attempts = if self.listen.ends_with(":0") { 1 } else { BIND_ATTEMPTS };
        for attempt in 0..attempts {
            if attempt > 0 {
                // Pacing between tries while the port is taken (by a connection's local end, typically).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match self.spawn_once().await {
                Ok(()) => return Ok(()),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("{} did not start", self.name)))
    }

    async fn spawn_once(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        writeln!(log, "=== {} {}: start #{} on {} ===", self.role.as_str(), self.name, self.starts, self.listen)?;
        let mut child = Command::new(&self.program)
            .arg(self.role.as_str())
            .args(&self.args)
            .arg("--listen")
            .arg(&self.listen)
            .env("RUST_LOG", rust_log())
            .env("NO_COLOR", "1")
            // Many processes of one role on this machine: each serves its metrics on a port of its own.
            .env("SWITCHBOARD_METRICS_LISTEN", "127.0.0.1:0")
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} {}", self.role.as_str(), self.name))?;
        self.pid = child.id();
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let prefix = format!("switchboard {} listening on http://", self.role.as_str());
        let ready = tokio::time::timeout(READY_DEADLINE, async {
            let mut metrics = None;
            while let Some(line) = lines.next_line().await? {
                // The roles with a metrics port of their own print it before they listen.
                if let Some(address) = line.strip_prefix("metrics on http://") {
                    metrics = address.strip_suffix("/metrics").map(str::to_owned);
                }
                if let Some(address) = line.strip_prefix(&prefix) {
                    let address = address.trim().to_owned();
                    return Ok((metrics.unwrap_or_else(|| address.clone()), address));
                }
            }
            bail!("exited before listening")
        })
        .await;
        let (metrics_address, address) = match ready {
            Ok(Ok(addresses)) => addresses,
            Ok(Err(error)) => {
                let status = child.wait().await.ok();
                bail!("{} {} {error} ({status:?}); its log:\n{}", self.role.as_str(), self.name, self.log_tail(40))
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!(
                    "{} {} did not print {prefix:?} within {READY_DEADLINE:?}; its log:\n{}",
                    self.role.as_str(),
                    self.name,
                    self.log_tail(40)
                )
            }
        };
        // Keep draining stdout (where the binary's tracing output goes) into the log, so that the process never
        // blocks on a full pipe and its log holds both streams.
        let mut log = std::fs::OpenOptions::new().append(true).open(&self.log_path)?;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log, "{line}");
            }
        });
        self.address = address.clone();
        self.metrics_address = metrics_address;
        self.listen = address;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// `HOST:PORT` it listens on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `HOST:PORT` of its `/metrics`.
    pub fn metrics_address(&self) -> &str {
        &self.metrics_address
    }

    /// `http://HOST:PORT`, as other roles are told where it is.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The WebSocket endpoint of a gateway.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.address)
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The file its stderr and stdout go to, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything it wrote so far (all starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Running (possibly stopped by SIGSTOP).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Running and not stopped by SIGSTOP.
    pub fn is_live(&mut self) -> bool {
        !self.paused && self.is_running()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid.context("never started")?;
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().await?;
        if !status.success() {
            bail!("kill -{signal} {pid} ({}) failed: {status}", self.name);
        }
        Ok(())
    }

    /// SIGKILL and reap: no shutdown code runs, as when a machine dies.
    pub async fn kill_9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill().ok();
            child.wait().await?;
        }
        self.paused = false;
        Ok(())
    }

    /// SIGSTOP: the process freezes with its sockets open, as in a long GC pause or a VM stall.
    pub async fn sigstop(&mut self) -> anyhow::Result<()> {
        self.signal("STOP").await?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`Process::sigstop`].
    pub async fn sigcont(&mut self) -> anyhow::Result<()> {
        self.signal("CONT").await?;
        self.paused = false;
        Ok(())
    }

    /// SIGTERM, then waits for the exit (at most `deadline`; past it the process is killed and this fails).
    pub async fn sigterm(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        self.signal("TERM").await?;
        let mut child = self.child.take().context("not running")?;
        match tokio::time::timeout(deadline, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                child.start_kill().ok();
                child.wait().await?;
                bail!("{} {} did not exit within {deadline:?} of SIGTERM", self.role.as_str(), self.name)
            }
        }
    }

    /// Starts it again with the same arguments on the same address (killing it first if it still runs).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.kill_9().await?;
        }
        self.spawn().await
    }
}
