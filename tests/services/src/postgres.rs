use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// A PostgreSQL server of its own, on a free loopback port, stopped (immediate mode) on drop.
pub struct Postgres {
    port: u16,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as_postgres: bool,
    next_database: AtomicU32,
    // Kept for its lifetime: the data directory is deleted on drop.
    _root: tempfile::TempDir,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").field("port", &self.port).field("data_dir", &self.data_dir).finish()
    }
}

/// The directory of Debian's PostgreSQL programs (the newest version installed), or `SWITCHBOARD_PG_BIN`.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql; scripts/test does it)")?
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

impl Postgres {
    /// The server's main process (the first line of `postmaster.pid`), whose children are its backends and
    /// background workers; `None` when it is not running.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Initialises a data directory and starts a server on a free port; returns once it accepts connections.
    pub fn start() -> anyhow::Result<Postgres> {
        let bin_dir = bin_dir()?;
        let run_as_postgres = is_root();
        let root = tempfile::Builder::new().prefix("switchboard-pg-").tempdir()?;
        let data_dir = root.path().join("data");
        let socket_dir = root.path().join("sock");
        std::fs::create_dir_all(&data_dir)?;
        std::fs::create_dir_all(&socket_dir)?;
        if run_as_postgres {
            // The postgres user must be able to reach and own its directories.
            run(Command::new("chmod").arg("755").arg(root.path()))?;
            run(Command::new("chown").arg("-R").arg("postgres:postgres").arg(root.path()))?;
        }
        let initdb_args = [
            "-D",
            path_str(&data_dir)?,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ];
        pg(&bin_dir, run_as_postgres, "initdb", &initdb_args)?;
        let mut postgres =
            Postgres { port: 0, data_dir, bin_dir, run_as_postgres, next_database: AtomicU32::new(0), _root: root };
        let mut last_error = None;
        // A port found free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            postgres.port = crate::free_port()?;
            match postgres.pg_ctl_start(&socket_dir) {
                Ok(()) => return Ok(postgres),
                Err(error) => last_error = Some(error),
            }
        }
        bail!("PostgreSQL did not start: {last_error:?}")
    }

    fn pg_ctl_start(&self, socket_dir: &Path) -> anyhow::Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=on -c max_connections=300 -c shared_buffers=64MB",
            self.port,
            path_str(socket_dir)?
        );
        let log = self.data_dir.join("server.log");
        self.pg(
            "pg_ctl",
            &["-D", path_str(&self.data_dir)?, "-l", path_str(&log)?, "-w", "-t", "60", "-o", &options, "start"],
        )
    }

    fn pg(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        pg(&self.bin_dir, self.run_as_postgres, program, args)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of a database on this server (`postgres` is always there).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn create_database(&self) -> anyhow::Result<String> {
        let n = self.next_database.fetch_add(1, Ordering::SeqCst);
        let name = format!("test_{}_{n}", std::process::id());
        run(Command::new(self.bin_dir.join("createdb")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            &name,
        ]))?;
        Ok(self.url(&name))
    }

    /// Stops the server (fast mode: open connections are dropped), keeping its data.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg("pg_ctl", &["-D", path_str(&self.data_dir)?, "-m", "fast", "-w", "stop"])
    }

    /// Starts the server again on the same port, with the same data.
    pub fn restart(&self) -> anyhow::Result<()> {
        let socket_dir = self.data_dir.parent().context("data dir has a parent")?.join("sock");
        self.pg_ctl_start(&socket_dir)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Ok(data_dir) = path_str(&self.data_dir) {
            let _ = self.pg("pg_ctl", &["-D", data_dir, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output().with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs one of PostgreSQL's programs, as the `postgres` user when we are root.
fn pg(bin_dir: &Path, run_as_postgres: bool, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let program = bin_dir.join(program);
    let mut command = if run_as_postgres {
        let mut command = Command::new("runuser");
        command.arg("-u").arg("postgres").arg("--").arg(&program);
        command
    } else {
        Command::new(&program)
    };
    command.args(args);
    run(&mut command)
}
