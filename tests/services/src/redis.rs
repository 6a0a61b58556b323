use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};

/// How long a server has to answer PING after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The pause between two PINGs while waiting for a server to come up.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A Redis server of its own (Debian's `redis-server`), on a free loopback port, without persistence, killed on
/// drop. It can be stopped and started again on the same port to simulate an outage.
pub struct Redis {
    port: u16,
    program: PathBuf,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("port", &self.port).field("dir", &self.dir.path()).finish()
    }
}

/// `redis-server` from the PATH (or `SWITCHBOARD_REDIS_SERVER`).
fn program() -> anyhow::Result<PathBuf> {
    if let Some(program) = std::env::var_os("SWITCHBOARD_REDIS_SERVER") {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .context("redis-server is not installed (apt-get install redis-server; scripts/test installs it)")
}

impl Redis {
    /// Starts a server on a free port; returns once it answers PING.
    pub fn start() -> anyhow::Result<Redis> {
        let program = program()?;
        let dir = tempfile::Builder::new().prefix("switchboard-redis-").tempdir()?;
        let mut redis = Redis { port: 0, program, dir, child: Mutex::new(None) };
        let mut last_error = None;
        // A port found free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            redis.port = crate::free_port()?;
            match redis.spawn() {
                Ok(()) => return Ok(redis),
                Err(error) => last_error = Some(error),
            }
        }
        bail!("redis-server did not start: {last_error:?}")
    }

    /// The server's process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().ok()?.as_ref().map(Child::id)
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL to connect to, `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL, like a crash) and waits until it has exited. Its data is lost: it keeps none.
    pub fn stop(&self) -> anyhow::Result<()> {
        let child = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned lock"))?.take();
        if let Some(mut child) = child {
            // SIGKILL ends a paused (stopped) server too.
            child.kill().context("cannot kill redis-server")?;
            child.wait().context("cannot wait for redis-server")?;
        }
        Ok(())
    }

    /// Starts the server again on the same port (after [`stop`](Self::stop)); returns once it answers PING.
    pub fn start_again(&self) -> anyhow::Result<()> {
        // The port was just released by the server itself; retry a little in case it is still closing.
        let mut last_error = None;
        for _ in 0..5 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(error) => last_error = Some(error),
            }
        }
        bail!("redis-server did not start again on port {}: {last_error:?}", self.port)
    }

    /// Freezes the server (SIGSTOP): it keeps its port and connections but answers nothing, like a hung host.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a [paused](Self::pause) server run again (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let guard = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned lock"))?;
        let child = guard.as_ref().context("redis-server is not running")?;
        let status =
            Command::new("kill").arg(signal).arg(child.id().to_string()).status().context("cannot run kill")?;
        if !status.success() {
            bail!("kill {signal} {} failed ({status})", child.id());
        }
        Ok(())
    }

    /// Stops the server and starts it again on the same port.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    fn spawn(&self) -> anyhow::Result<()> {
        let mut guard = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned lock"))?;
        if guard.is_some() {
            bail!("redis-server is already running on port {}", self.port);
        }
        let log = self.dir.path().join("redis.log");
        let mut child = Command::new(&self.program)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        match self.wait_until_ready(&mut child) {
            Ok(()) => {
                *guard = Some(child);
                Ok(())
            }
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                Err(error.context(format!("redis-server log:\n{log}")))
            }
        }
    }

    /// Polls with PING until the server answers or exits; gives up after [`START_TIMEOUT`].
    fn wait_until_ready(&self, child: &mut Child) -> anyhow::Result<()> {
        let attempts = START_TIMEOUT.as_millis() / POLL_INTERVAL.as_millis();
        for _ in 0..attempts {
            if let Some(status) = child.try_wait()? {
                bail!("redis-server exited at start ({status})");
            }
            if ping(self.port).is_ok() {
                return Ok(());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        bail!("redis-server did not answer PING on port {} within {START_TIMEOUT:?}", self.port)
    }
}

/// One PING over a fresh connection, expecting `+PONG`.
fn ping(port: u16) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"PING\r\n")?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply)?;
    if &reply != b"+PONG\r\n" {
        bail!("unexpected answer to PING: {:?}", String::from_utf8_lossy(&reply));
    }
    Ok(())
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
