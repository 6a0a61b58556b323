//! A `switchboard serve` process with a configuration from `gen-config`, and runs of the load generator
//! against it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

pub const LOADGEN: &str = env!("CARGO_BIN_EXE_switchboard-loadgen");

/// The server binary, built by `cargo build --workspace` (or `cargo build -p switchboard`) before the tests.
fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHBOARD_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let path = target.join("debug").join(format!("switchboard{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{} is missing: build it first with `cargo build -p switchboard`", path.display());
    path
}

pub struct Server {
    child: Child,
    pub url: String,
    pub pid: u32,
    dir: TempDir,
    /// Whether the server runs in a network namespace of its own (its pid's), where the load generator
    /// must run too.
    namespaced: bool,
}

/// Sets up a network namespace made by `unshare`: its loopback up, and `$PORTS` as its ephemeral port
/// range (`net.ipv4.ip_local_port_range` is per namespace), then runs the command given.
const NAMESPACE_SETUP: &str =
    r#"ip link set lo up && echo "$PORTS" > /proc/sys/net/ipv4/ip_local_port_range && exec "$@""#;

impl Server {
    /// Writes a configuration with `gen-config ARGS` and starts `serve` on it, on a free port, with the
    /// environment overrides `env`.
    pub fn start(gen_config: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_with(gen_config, env, None)
    }

    /// As [`Server::start`], in a network namespace of its own whose ephemeral ports are `first..=last`
    /// only; [`Server::run`] runs the load generator in it. `unshare` makes it in a user namespace of its
    /// own, so that it needs no privilege where the kernel lets users make namespaces.
    pub fn start_in_namespace(gen_config: &[&str], (first, last): (u16, u16)) -> Server {
        Server::start_with(gen_config, &[], Some(format!("{first} {last}")))
    }

    fn start_with(gen_config: &[&str], env: &[(&str, &str)], ports: Option<String>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        let status = Command::new(LOADGEN)
            .arg("gen-config")
            .args(gen_config)
            .arg("--out")
            .arg(&config)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "gen-config {gen_config:?} failed");
        let stderr = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let namespaced = ports.is_some();
        let mut command = match ports {
            None => Command::new(server_binary()),
            Some(ports) => {
                let mut command = Command::new("unshare");
                command
                    .args(["--user", "--map-root-user", "--net", "--", "sh", "-c", NAMESPACE_SETUP, "sh"])
                    .arg(server_binary())
                    .env("PORTS", ports);
                command
            }
        };
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_DATA_DIR", dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (address_tx, address_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = line.strip_prefix("switchboard listening on http://") {
                    let _ = address_tx.send(address.to_owned());
                }
            }
        });
        let pid = child.id();
        // `unshare` and `sh` exec what they run: the pid is the server's, in its namespace.
        let mut server = Server { child, url: String::new(), pid, dir, namespaced };
        match address_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(address) => server.url = format!("ws://{address}/v1/ws"),
            Err(_) => panic!("the server did not start listening: {}", server.log()),
        }
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs a scenario against this server (with `--quiet` and a report): its exit code and report.
    pub fn run(&self, scenario: &str, args: &[&str]) -> Run {
        let command = if self.namespaced {
            let mut command = Command::new("nsenter");
            command.args(["--target", &self.pid.to_string(), "--user", "--net", "--"]).arg(LOADGEN);
            command
        } else {
            Command::new(LOADGEN)
        };
        run_command(command, scenario, &["--url", &self.url], args)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Run {
    pub code: i32,
    pub report: Value,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn count(&self, name: &str) -> u64 {
        self.report["counts"][name].as_u64().unwrap_or_else(|| panic!("no count {name}: {}", self.report))
    }

    /// Asserts exit code 0, no error, and every invariant held.
    pub fn assert_clean(&self) {
        assert_eq!(self.code, 0, "exit code\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        assert_eq!(self.report["errors_by_reason"], serde_json::json!({}), "{}", self.stdout);
        assert_eq!(self.report["invariants"]["ok"], true, "{}", self.stdout);
    }
}

pub fn run_loadgen(scenario: &str, target: &[&str], args: &[&str]) -> Run {
    run_command(Command::new(LOADGEN), scenario, target, args)
}

/// Runs a scenario with `command`, the load generator (or what runs it).
fn run_command(mut command: Command, scenario: &str, target: &[&str], args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let output = command
        .arg(scenario)
        .args(target)
        .args(args)
        .arg("--quiet")
        .arg("--report")
        .arg(&report_path)
        .output()
        .unwrap();
    let report = std::fs::read_to_string(&report_path)
        .map(|text| serde_json::from_str(&text).expect("the report is JSON"))
        .unwrap_or(Value::Null);
    Run {
        code: output.status.code().unwrap_or(-1),
        report,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
