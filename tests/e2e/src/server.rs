//! The `switchboard serve` process under test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Server {
    child: Child,
    pub address: String,
    data_dir: PathBuf,
    config_path: PathBuf,
    stderr_log: PathBuf,
}

/// The binary built by `cargo build -p switchboard`, next to this test executable's directory.
fn binary() -> anyhow::Result<PathBuf> {
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

/// Spawns `command` (the `switchboard` binary with its role's arguments), logging to `stderr_log`, and
/// waits until it prints `listening`, followed by its address.
async fn start(mut command: Command, stderr_log: &Path, listening: &str) -> anyhow::Result<(Child, String)> {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(stderr_log)?;
    let mut child = command.env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(stderr).kill_on_drop(true).spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(address) = line.strip_prefix(listening) {
                return Ok(address.to_owned());
            }
        }
        bail!("switchboard exited before listening; see {}", stderr_log.display())
    })
    .await
    .context("switchboard did not start listening in time")??;
    // Keep draining stdout so that the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, address))
}

/// The `switchboard store` role on its own, on a SQLite database file: its gRPC service only.
pub struct StoreRole {
    _child: Child,
    /// `host:port` of its gRPC service.
    pub address: String,
}

impl StoreRole {
    /// Starts the store role on the database `database` (created when missing), logging under `data_dir`.
    pub async fn start(database: &Path, data_dir: &Path) -> anyhow::Result<StoreRole> {
        let mut command = Command::new(binary()?);
        command
            .arg("store")
            .arg("--listen=127.0.0.1:0")
            .arg("--metrics-listen=127.0.0.1:0")
            .arg("--database-url")
            .arg(database);
        let stderr_log = data_dir.join(format!("store-stderr-{}.log", std::process::id()));
        let (child, address) = start(command, &stderr_log, "switchboard store listening on http://").await?;
        Ok(StoreRole { _child: child, address })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// `GET path` over HTTP/1.0: the status line and the body.
pub async fn http_get(address: &str, path: &str) -> anyhow::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header in the response")?;
    Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
}

impl Server {
    /// Starts `serve` with this configuration, storing its data under `data_dir`.
    pub async fn start(config_yaml: &str, data_dir: &Path) -> anyhow::Result<Server> {
        std::fs::create_dir_all(data_dir)?;
        let config_path = data_dir.join("config.yaml");
        std::fs::write(&config_path, config_yaml)?;
        Self::spawn(data_dir.to_owned(), config_path).await
    }

    async fn spawn(data_dir: PathBuf, config_path: PathBuf) -> anyhow::Result<Server> {
        let stderr_log = data_dir.join(format!("stderr-{}.log", std::process::id()));
        let mut command = Command::new(binary()?);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_DATA_DIR", &data_dir);
        let (child, address) = start(command, &stderr_log, "switchboard listening on http://").await?;
        Ok(Server { child, address, data_dir, config_path, stderr_log })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.address)
    }

    /// SIGKILL: no shutdown code runs, as when a machine dies.
    pub async fn kill_9(mut self) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok((self.data_dir.clone(), self.config_path.clone()))
    }

    /// Kills the process and starts it again on the same data.
    pub async fn crash_and_restart(self) -> anyhow::Result<Server> {
        let (data_dir, config_path) = self.kill_9().await?;
        Self::spawn(data_dir, config_path).await
    }

    /// SIGTERM, as Kubernetes stops a pod; then waits up to `within` for the process to exit: its status,
    /// or `None` if it is still running (it is killed when the `Server` is dropped).
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.sigterm().await?;
        self.wait_exit(within).await
    }

    /// SIGTERM, without waiting for anything.
    pub async fn sigterm(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the process has exited already")?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        Ok(())
    }

    /// Waits up to `within` for the process to exit: its status, or `None` if it is still running.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(tokio::time::timeout(within, self.child.wait()).await.ok().transpose()?)
    }

    /// Whether the process is still running (it must never panic or exit on client input).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}
