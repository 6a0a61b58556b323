//! The Helm chart's pods, run on loopback as a kubelet would run them.
//!
//! `helm template` renders the chart (`helm/switchboard`); every pod its Deployments and StatefulSets ask for
//! becomes a process of the real binary, started from what the manifests say and nothing else:
//!
//! - in the image the chart names, built by `deploy/image/build` from the binary under test (checked and
//!   unpacked by `skopeo`): the image's entrypoint with the container's `args`, run in the image's root file
//!   system (`chroot`) as the pod's user, under a clean environment made of the image's and the container's
//!   `env` (plain values with `$(VAR)` expanded from the variables before it, `fieldRef`s of the pod's name,
//!   namespace and IP, and `secretKeyRef`s read from the rendered Secrets), its volumes mounted in that root
//!   (Secret items as files, emptyDirs);
//! - its own address, `127.0.0.N`: the pod's IP, and what a wildcard listen address (`0.0.0.0`, `[::]`) means
//!   inside a pod's own network namespace;
//! - a Service with a cluster IP gets an address of its own, where each connection is forwarded to one of the
//!   ready pods it selects, in turn, at the port its `targetPort` names (kube-proxy); its names (`name`,
//!   `name.namespace`, …`.svc.cluster.local`) in a URL of the environment resolve to it (the cluster's DNS);
//! - the image's files owned by root, so that the pod's user can write none of them (the chart's root file
//!   system is read-only), and checked for anything written outside the volumes;
//! - ready, and one of its Services' endpoints, when its probes pass (`startupProbe`, then `readinessProbe`:
//!   gRPC health and `httpGet`) within the time they allow; stopped with SIGTERM within its
//!   `terminationGracePeriodSeconds` (a gateway kept in its endpoints until its readiness fails, and required
//!   to answer then: see [`Pod::terminate`]);
//! - rolled as Kubernetes rolls them: a StatefulSet's pod stopped, then made again under its name; a
//!   Deployment's replaced by a new pod (a new name) that is ready before the old one stops. A new pod gets a
//!   new address.
//!
//! It needs root (`chroot`), as CI runs it. What is not run: liveness probes, the scheduler, resource limits,
//! headless Services' DNS, and the objects no kubelet or kube-proxy acts on (PodMonitors, disruption budgets
//! and the rest are only read).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Deserialize as _;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::process;

/// How often a probe is tried while a pod starts (the condition is the probe; its own period only paces a
/// kubelet, whose deadline, the probe's failure threshold times its period, is kept).
const PROBE_PACE: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The chart in this repository.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../helm/switchboard")
}

/// `helm`: `$SWITCHBOARD_HELM`, or the one on the `PATH` (`scripts/test` installs it when missing).
pub fn helm() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SWITCHBOARD_HELM") {
        return Ok(PathBuf::from(path));
    }
    host_program("helm").context(
        "helm is missing: run scripts/test (which installs it), or put helm on the PATH or in $SWITCHBOARD_HELM",
    )
}

/// Runs `helm template RELEASE CHART --namespace NAMESPACE -f FILE...`: the rendered YAML, or helm's error.
pub fn template(release: &str, namespace: &str, values: &[&Path]) -> anyhow::Result<Result<String, String>> {
    let mut command = std::process::Command::new(helm()?);
    command.args(["template", release]).arg(chart_dir()).args(["--namespace", namespace]);
    for file in values {
        command.arg("-f").arg(file);
    }
    let output = command.output().context("cannot run helm")?;
    if output.status.success() {
        Ok(Ok(String::from_utf8(output.stdout)?))
    } else {
        Ok(Err(String::from_utf8_lossy(&output.stderr).into_owned()))
    }
}

/// The rendered objects.
#[derive(Debug, Clone)]
pub struct Manifests {
    pub namespace: String,
    pub objects: Vec<Value>,
}

impl Manifests {
    /// Renders the chart; helm's refusal is an error.
    pub fn render(release: &str, namespace: &str, values: &[&Path]) -> anyhow::Result<Manifests> {
        let yaml = template(release, namespace, values)?.map_err(|error| anyhow::anyhow!("helm template: {error}"))?;
        Manifests::parse(namespace, &yaml)
    }

    pub fn parse(namespace: &str, yaml: &str) -> anyhow::Result<Manifests> {
        let mut objects = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = Value::deserialize(document).context("a rendered document is not YAML")?;
            if !value.is_null() {
                objects.push(value);
            }
        }
        Ok(Manifests { namespace: namespace.to_owned(), objects })
    }

    pub fn of_kind(&self, kind: &str) -> impl Iterator<Item = &Value> + '_ {
        let kind = kind.to_owned();
        self.objects.iter().filter(move |object| object["kind"] == kind.as_str())
    }

    pub fn get(&self, kind: &str, name: &str) -> anyhow::Result<&Value> {
        self.of_kind(kind)
            .find(|object| object["metadata"]["name"] == name)
            .with_context(|| format!("no {kind} {name} in the rendered chart"))
    }

    /// A key of a rendered Secret (`stringData`).
    pub fn secret_key(&self, name: &str, key: &str) -> anyhow::Result<String> {
        let secret = self.get("Secret", name)?;
        secret["stringData"][key].as_str().map(str::to_owned).with_context(|| format!("Secret {name} has no key {key}"))
    }
}

/// A probe as a container declares it.
#[derive(Debug, Clone)]
enum Check {
    Grpc { port: u16 },
    HttpGet { port: u16, path: String },
}

#[derive(Debug, Clone)]
struct Probe {
    check: Check,
    /// How long a kubelet lets it fail before it gives up on the pod.
    budget: Duration,
}

/// One pod of a workload.
pub struct Pod {
    pub name: String,
    /// `Deployment/NAME` or `StatefulSet/NAME`.
    pub workload: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    /// Container port by name.
    pub ports: BTreeMap<String, u16>,
    pub annotations: BTreeMap<String, String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub termination_grace: Duration,
    startup: Option<Probe>,
    readiness: Option<Probe>,
    dir: PathBuf,
    /// The image's command (its entrypoint), the user it runs as (`UID:GID`), and its unpacked root.
    entrypoint: Vec<String>,
    user: String,
    image_rootfs: PathBuf,
    /// Where its volumes are mounted.
    mounts: Vec<String>,
    child: Option<Child>,
    endpoints: Endpoints,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod").field("name", &self.name).field("ip", &self.ip).finish()
    }
}

impl Pod {
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// The pod's root file system: the image's, its files shared (hard links), with its volumes mounted.
    fn root(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// What the pod wrote outside its volumes (the chart's root file system is read-only; here the image's
    /// files and directories belong to root, and the pod runs as its user, so such a write would fail).
    pub fn written_outside_volumes(&self) -> anyhow::Result<Vec<String>> {
        let image = tree(&self.image_rootfs)?;
        let written = tree(&self.root())?
            .into_iter()
            .filter(|path| !image.contains(path))
            .filter(|path| !self.mounts.iter().any(|mount| path.starts_with(mount.trim_start_matches('/'))))
            .map(|path| path.display().to_string())
            .collect();
        Ok(written)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// `IP:PORT` of the container port named `name`.
    pub fn address(&self, port: &str) -> anyhow::Result<String> {
        let port = self.ports.get(port).with_context(|| format!("{} has no port named {port}", self.name))?;
        Ok(format!("{}:{port}", self.ip))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        use std::io::Write as _;
        writeln!(log, "=== {} starts at {} ===", self.name, self.ip)?;
        self.endpoints.set(self, false);
        // Its container: the image's entrypoint with the container's arguments, in its own root, as its user.
        let argv = self.entrypoint.iter().chain(&self.args);
        let child = in_root(&self.root(), &self.user, argv, &self.env)?
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start pod {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits for the startup probe, then the readiness probe, each within its budget; fails at once if the
    /// process exits. Ready, the pod is one of its Services' endpoints.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        for probe in [self.startup.clone(), self.readiness.clone()].into_iter().flatten() {
            let end = Instant::now() + probe.budget;
            loop {
                if !self.is_running() {
                    bail!("pod {} exited before it was ready; its log:\n{}", self.name, self.log_tail(30));
                }
                if run_probe(self.ip, &probe.check).await.is_ok() {
                    break;
                }
                if Instant::now() >= end {
                    let error = run_probe(self.ip, &probe.check).await.err().map(|error| format!("{error:#}"));
                    bail!(
                        "pod {}: {:?} did not pass within {:?} ({error:?}); its log:\n{}",
                        self.name,
                        probe.check,
                        probe.budget,
                        self.log_tail(30)
                    );
                }
                tokio::time::sleep(PROBE_PACE).await;
            }
        }
        self.endpoints.set(self, true);
        Ok(())
    }

    /// SIGTERM, as a kubelet stops a pod: the exit status if it exits within its grace period; past it, the
    /// pod is killed and this fails.
    ///
    /// Kubernetes takes a stopping pod out of its Services' endpoints while it sends the signal, and the
    /// proxies notice some time later: a pod that serves clients (its readiness an HTTP GET, the gateways)
    /// must fail its readiness and serve on meanwhile, else the clients sent to it in that time are refused.
    /// So such a pod stays an endpoint until its readiness fails, and must then still answer; the others
    /// (gRPC health: routers, stores) leave the endpoints first.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let serves_clients = matches!(&self.readiness, Some(Probe { check: Check::HttpGet { .. }, .. }));
        if !serves_clients {
            self.endpoints.remove(&self.name);
        }
        let pid =
            self.child.as_ref().and_then(Child::id).with_context(|| format!("pod {} is not running", self.name))?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        if let Some(Probe { check, .. }) = self.readiness.clone()
            && let Check::HttpGet { port, path } = &check
            && serves_clients
        {
            let end = Instant::now() + self.termination_grace;
            while run_probe(self.ip, &check).await.is_ok() {
                ensure!(self.is_running(), "pod {} exited while it was still ready", self.name);
                ensure!(Instant::now() < end, "pod {} stayed ready through its grace period", self.name);
                tokio::time::sleep(PROBE_PACE).await;
            }
            let answered = http_get(&format!("{}:{port}", self.ip), path).await;
            self.endpoints.remove(&self.name);
            ensure!(
                answered.is_ok(),
                "pod {} stopped serving as it failed its readiness, before its endpoints could be updated: {:#}",
                self.name,
                answered.err().map(|error| format!("{error:#}")).unwrap_or_default()
            );
        }
        let mut child = self.child.take().with_context(|| format!("pod {} is not running", self.name))?;
        match tokio::time::timeout(self.termination_grace, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                child.start_kill().ok();
                child.wait().await?;
                bail!("pod {} did not exit within its grace period of {:?}", self.name, self.termination_grace)
            }
        }
    }
}

async fn run_probe(ip: Ipv4Addr, check: &Check) -> anyhow::Result<()> {
    match check {
        Check::Grpc { port } => {
            use tonic_health::pb::HealthCheckRequest;
            use tonic_health::pb::health_check_response::ServingStatus;
            use tonic_health::pb::health_client::HealthClient;
            let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{ip}:{port}"))?.connect().await?;
                let mut client = HealthClient::new(channel);
                let response = client.check(HealthCheckRequest { service: String::new() }).await?;
                anyhow::Ok(response.into_inner().status)
            })
            .await
            .context("the gRPC health check timed out")??;
            ensure!(answer == ServingStatus::Serving as i32, "gRPC health: {answer}");
            Ok(())
        }
        Check::HttpGet { port, path } => {
            let status = http_get(&format!("{ip}:{port}"), path).await?.0;
            ensure!((200..400).contains(&status), "GET {path}: {status}");
            Ok(())
        }
    }
}

/// A GET ([`switchboard_e2e::http_get`]): the status code and the body.
pub async fn http_get(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let (line, body) = tokio::time::timeout(PROBE_TIMEOUT * 5, switchboard_e2e::http_get(address, path))
        .await
        .with_context(|| format!("GET http://{address}{path} timed out"))??;
    let status = line.split(' ').nth(1).and_then(|status| status.parse().ok());
    Ok((status.with_context(|| format!("not an HTTP status line: {line:.80}"))?, body))
}

/// The chart's image, built by `deploy/image/build` from the binary under test, checked and unpacked by
/// `skopeo` (which verifies every blob's digest), its layer extracted: the root file system every pod runs in.
#[derive(Debug)]
pub struct Image {
    pub rootfs: PathBuf,
    pub reference: String,
    /// The image's `Entrypoint`, `Cmd`, `Env` and `User` (`UID:GID`).
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub user: String,
    _dir: tempfile::TempDir,
}

impl Image {
    /// Builds the image (its layer gzipped, as released, or not, which is quicker) and unpacks it. Needs
    /// root: its files keep their owners (root, and the image's user), and pods run in it with `chroot`.
    pub fn build(compressed: bool) -> anyhow::Result<Image> {
        let uid = run(std::process::Command::new("id").arg("-u"))?;
        ensure!(
            String::from_utf8_lossy(&uid).trim() == "0",
            "the image's tests need root (its files keep their owners, and pods run in it with chroot): run them \
             as root, as scripts/test does in CI"
        );
        let dir = tempfile::Builder::new().prefix("switchboard-image-").tempdir()?;
        let archive = dir.path().join("switchboard.oci.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/image/build");
        let mut build = std::process::Command::new(&script);
        build.arg("--binary").arg(process::binary()?).arg("--out").arg(&archive);
        if !compressed {
            build.arg("--uncompressed");
        }
        run(&mut build)?;
        let config: Value = serde_json::from_slice(&run(std::process::Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci-archive:{}", archive.display())))?)?;
        let layout = dir.path().join("layout");
        run(std::process::Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("oci:{}:switchboard", layout.display())))?;
        let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
        let blob = |digest: &Value| -> anyhow::Result<PathBuf> {
            let digest = digest.as_str().context("a digest is not a string")?;
            Ok(layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").context("not a sha256 digest")?))
        };
        let manifest: Value = serde_json::from_slice(&std::fs::read(blob(&index["manifests"][0]["digest"])?)?)?;
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs)?;
        for layer in manifest["layers"].as_array().context("no layers")? {
            run(std::process::Command::new("tar")
                .args(["--extract", "--same-owner", "--preserve-permissions", "--file"])
                .arg(blob(&layer["digest"])?)
                .arg("--directory")
                .arg(&rootfs))?;
        }
        let strings = |value: &Value| -> Vec<String> {
            value.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        };
        let env = strings(&config["config"]["Env"])
            .into_iter()
            .filter_map(|pair| pair.split_once('=').map(|(key, value)| (key.to_owned(), value.to_owned())))
            .collect();
        // The name the archive gives the image (skopeo's copy is named by this test).
        let archived: Value = serde_json::from_slice(&run(std::process::Command::new("tar")
            .args(["--extract", "--to-stdout", "--file"])
            .arg(&archive)
            .arg("index.json"))?)?;
        let reference = archived["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .context("the archive names no image")?
            .to_owned();
        Ok(Image {
            rootfs,
            reference,
            entrypoint: strings(&config["config"]["Entrypoint"]),
            cmd: strings(&config["config"]["Cmd"]),
            env,
            user: config["config"]["User"].as_str().unwrap_or("0:0").to_owned(),
            _dir: dir,
        })
    }
}

/// `argv` run in `root` (`chroot`) as `user` (`UID:GID`), under `env` alone, from `/`: a container's process.
pub fn in_root<'a>(
    root: &Path,
    user: &str,
    argv: impl IntoIterator<Item = &'a String>,
    env: &[(String, String)],
) -> anyhow::Result<Command> {
    // Found on this host's PATH (the process's own PATH is the image's).
    let mut command = Command::new(host_program("chroot")?);
    command
        .arg(format!("--userspec={user}"))
        .arg(root)
        .args(argv)
        .env_clear()
        .envs(env.iter().map(|(key, value)| (key, value)))
        .current_dir("/");
    Ok(command)
}

/// A program on this host's PATH.
fn host_program(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{name} is not on the PATH"))
}

/// Runs a command to its end: its standard output, or an error with its standard error.
fn run(command: &mut std::process::Command) -> anyhow::Result<Vec<u8>> {
    let output = command.output().with_context(|| format!("cannot run {command:?}"))?;
    ensure!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(output.stdout)
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> anyhow::Result<std::collections::BTreeSet<PathBuf>> {
    let mut paths = std::collections::BTreeSet::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(next) = todo.pop() {
        for entry in std::fs::read_dir(&next)? {
            let entry = entry?;
            paths.insert(entry.path().strip_prefix(dir)?.to_owned());
            if entry.file_type()?.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    Ok(paths)
}

/// Loopback addresses handed to pods: 127.0.0.10 and up, one each, never twice in a test process.
static NEXT_IP: AtomicU32 = AtomicU32::new(10);

fn next_ip() -> anyhow::Result<Ipv4Addr> {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    ensure!(n < 1 << 16, "out of loopback addresses");
    Ok(Ipv4Addr::new(127, 0, (n >> 8) as u8, (n & 0xff) as u8))
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|map| map.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

/// Where a Service's connections may go: every pod started, with its labels, ports and readiness.
#[derive(Debug, Clone, Default)]
struct Endpoints(Arc<Mutex<Vec<Endpoint>>>);

#[derive(Debug, Clone)]
struct Endpoint {
    pod: String,
    ip: Ipv4Addr,
    labels: BTreeMap<String, String>,
    ports: BTreeMap<String, u16>,
    ready: bool,
}

impl Endpoints {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Endpoint>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, pod: &Pod, ready: bool) {
        let mut endpoints = self.lock();
        endpoints.retain(|endpoint| endpoint.pod != pod.name);
        endpoints.push(Endpoint {
            pod: pod.name.clone(),
            ip: pod.ip,
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
            ready,
        });
    }

    fn remove(&self, pod: &str) {
        self.lock().retain(|endpoint| endpoint.pod != pod);
    }

    /// The ready pods a selector selects, in the order they started.
    fn ready(&self, selector: &BTreeMap<String, String>) -> Vec<Endpoint> {
        self.lock()
            .iter()
            .filter(|endpoint| {
                endpoint.ready && selector.iter().all(|(key, value)| endpoint.labels.get(key) == Some(value))
            })
            .cloned()
            .collect()
    }
}

/// A Service with a cluster IP: a loopback address of its own whose ports forward each connection to a ready
/// pod it selects, in turn (kube-proxy); none ready, the connection is closed.
async fn serve_service(
    vip: Ipv4Addr,
    service: &Value,
    endpoints: Endpoints,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let selector = string_map(&service["spec"]["selector"]);
    let mut tasks = Vec::new();
    for port in service["spec"]["ports"].as_array().into_iter().flatten() {
        let number = port["port"].as_u64().context("a Service port without a number")? as u16;
        let target = port["targetPort"].clone();
        let listener = tokio::net::TcpListener::bind((vip, number))
            .await
            .with_context(|| format!("cannot listen on {vip}:{number} for a Service"))?;
        let (selector, endpoints) = (selector.clone(), endpoints.clone());
        let name = service["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        tasks.push(tokio::spawn(async move {
            let mut turn = 0usize;
            loop {
                let mut inbound = match listener.accept().await {
                    Ok((inbound, _)) => inbound,
                    Err(error) => {
                        eprintln!("Service {name}: accept failed: {error}");
                        continue;
                    }
                };
                // Refused (a reset, as kube-proxy rejects a Service without endpoints) when no pod can take it.
                let refuse = |inbound: tokio::net::TcpStream| {
                    let _ = inbound.set_zero_linger();
                };
                let ready = endpoints.ready(&selector);
                if ready.is_empty() {
                    refuse(inbound);
                    continue;
                }
                let endpoint = &ready[turn % ready.len()];
                turn = turn.wrapping_add(1);
                let port = match &target {
                    Value::String(port_name) => endpoint.ports.get(port_name).copied(),
                    Value::Number(port) => port.as_u64().map(|port| port as u16),
                    _ => Some(number),
                };
                let Some(port) = port else {
                    eprintln!("Service {name}: pod {} has no port {target}", endpoint.pod);
                    refuse(inbound);
                    continue;
                };
                let address = (endpoint.ip, port);
                tokio::spawn(async move {
                    match tokio::net::TcpStream::connect(address).await {
                        Ok(mut outbound) => {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        Err(_) => refuse(inbound),
                    }
                });
            }
        }));
    }
    Ok(tasks)
}

/// One workload's rolling update under way ([`Kubelet::begin_rollout`]).
pub struct Rollout {
    pub workload: String,
    /// The pods still to replace, in turn, each with its successor's name.
    todo: std::collections::VecDeque<(Pod, String)>,
    /// The successors, ready.
    done: Vec<Pod>,
    /// The pods replaced (and a successor that failed).
    gone: Vec<Pod>,
}

/// One pod replaced by a rollout: its name, its successor's, and how it exited.
#[derive(Debug)]
pub struct Rolled {
    pub old: String,
    pub new: String,
    pub status: ExitStatus,
}

/// Every pod of the rendered workloads, run on loopback, and their Services.
pub struct Kubelet {
    manifests: Manifests,
    image: Image,
    pub pods: Vec<Pod>,
    /// Pods replaced by a rollout, kept for their logs.
    gone: Vec<Pod>,
    /// The cluster IP of each Service that has one.
    vips: BTreeMap<String, Ipv4Addr>,
    services: Vec<tokio::task::JoinHandle<()>>,
    endpoints: Endpoints,
    /// Pods of Deployments made so far (their names' suffixes).
    made: usize,
    dir: Option<tempfile::TempDir>,
    passed: bool,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet").field("pods", &self.pods).field("vips", &self.vips).finish()
    }
}

impl Kubelet {
    /// Serves the Services with a cluster IP and plans the pods of every Deployment and StatefulSet (names,
    /// addresses, environment, files); starts no pod.
    pub async fn new(manifests: Manifests, image: Image) -> anyhow::Result<Kubelet> {
        let dir = tempfile::Builder::new().prefix("switchboard-chart-").tempdir()?;
        let mut kubelet = Kubelet {
            manifests,
            image,
            pods: Vec::new(),
            gone: Vec::new(),
            vips: BTreeMap::new(),
            services: Vec::new(),
            endpoints: Endpoints::default(),
            made: 0,
            dir: Some(dir),
            passed: false,
        };
        let services: Vec<Value> = kubelet.manifests.of_kind("Service").cloned().collect();
        for service in &services {
            let name = service["metadata"]["name"].as_str().context("a Service without a name")?;
            if service["spec"]["clusterIP"] == "None" {
                continue;
            }
            let vip = next_ip()?;
            kubelet.services.extend(serve_service(vip, service, kubelet.endpoints.clone()).await?);
            kubelet.vips.insert(name.to_owned(), vip);
        }
        for kind in ["StatefulSet", "Deployment"] {
            let workloads: Vec<Value> = kubelet.manifests.of_kind(kind).cloned().collect();
            for workload in workloads {
                let name = workload["metadata"]["name"].as_str().context("a workload without a name")?.to_owned();
                let replicas = workload["spec"]["replicas"].as_u64().unwrap_or(1);
                for i in 0..replicas {
                    let pod_name = match kind {
                        // A StatefulSet's pods are NAME-0, NAME-1…
                        "StatefulSet" => format!("{name}-{i}"),
                        _ => kubelet.next_deployment_pod(&name),
                    };
                    let pod = kubelet.plan(&format!("{kind}/{name}"), &workload, &pod_name, next_ip()?)?;
                    kubelet.pods.push(pod);
                }
            }
        }
        Ok(kubelet)
    }

    /// A new name for a Deployment's pod (Kubernetes adds a hash of the template and a random suffix).
    fn next_deployment_pod(&mut self, deployment: &str) -> String {
        self.made += 1;
        format!("{deployment}-5d8f7b9c4-{:05}", self.made)
    }

    fn dir(&self) -> anyhow::Result<&Path> {
        Ok(self.dir.as_ref().context("the kubelet is finished")?.path())
    }

    /// One pod of `workload` (`Kind/NAME`), as its template says, named `pod_name`, at `ip`.
    fn plan(&self, workload_name: &str, workload: &Value, pod_name: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
        let template = &workload["spec"]["template"];
        let containers = template["spec"]["containers"].as_array().context("a pod without containers")?;
        ensure!(containers.len() == 1, "{workload_name}: one container expected, got {}", containers.len());
        let container = &containers[0];
        let ports: BTreeMap<String, u16> = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|port| Some((port["name"].as_str()?.to_owned(), port["containerPort"].as_u64()? as u16)))
            .collect();
        // The pod's root: the image's files (hard links: the pod's user may write none of them), its own
        // directories, its volumes mounted in them.
        // A directory of its own per pod made, a StatefulSet's pod made again under its name included.
        static MADE: AtomicU32 = AtomicU32::new(0);
        let pod_dir = self.dir()?.join(format!("{pod_name}.{}", MADE.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&pod_dir)?;
        run(std::process::Command::new("cp")
            .arg("-a")
            .arg("--link")
            .arg(&self.image.rootfs)
            .arg(pod_dir.join("rootfs")))?;
        let mounts = self.mount_volumes(&template["spec"], container, &pod_dir.join("rootfs"))?;
        let image = container["image"].as_str().unwrap_or_default();
        ensure!(
            image == self.image.reference,
            "{workload_name}: image {image}, not the one built ({})",
            self.image.reference
        );
        ensure!(container["command"].is_null(), "{workload_name}: the image's entrypoint is the binary");
        let args: Vec<String> = container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|arg| arg.as_str().map(str::to_owned).context("an argument is not a string"))
            .collect::<anyhow::Result<_>>()?;
        let env = self.environment(container, (pod_name, ip))?;
        // The user: the container's security context, else the pod's, else the image's.
        let security = |field: &str| {
            container["securityContext"][field].as_u64().or_else(|| template["spec"]["securityContext"][field].as_u64())
        };
        let (image_uid, image_gid) = self.image.user.split_once(':').unwrap_or((&self.image.user, "0"));
        let uid = security("runAsUser").map(|uid| uid.to_string()).unwrap_or_else(|| image_uid.to_owned());
        let gid = security("runAsGroup").map(|gid| gid.to_string()).unwrap_or_else(|| image_gid.to_owned());
        // The image's files are shared between the pods (hard links): a pod that ran as root could change them.
        ensure!(uid != "0", "{workload_name}: runs as root");
        let user = format!("{uid}:{gid}");
        let probe = |field: &str| -> anyhow::Result<Option<Probe>> {
            let probe = &container[field];
            if probe.is_null() {
                return Ok(None);
            }
            let port = |port: &Value| -> anyhow::Result<u16> {
                match port {
                    Value::Number(number) => Ok(number.as_u64().context("a bad port")? as u16),
                    Value::String(name) => ports.get(name).copied().with_context(|| format!("no port {name}")),
                    _ => bail!("{workload_name}: {field} has no port"),
                }
            };
            let check = if !probe["grpc"].is_null() {
                Check::Grpc { port: port(&probe["grpc"]["port"])? }
            } else if !probe["httpGet"].is_null() {
                let path = probe["httpGet"]["path"].as_str().unwrap_or("/").to_owned();
                Check::HttpGet { port: port(&probe["httpGet"]["port"])?, path }
            } else {
                bail!("{workload_name}: {field} is neither gRPC nor httpGet")
            };
            let period = probe["periodSeconds"].as_u64().unwrap_or(10);
            let failures = probe["failureThreshold"].as_u64().unwrap_or(3);
            let delay = probe["initialDelaySeconds"].as_u64().unwrap_or(0);
            Ok(Some(Probe { check, budget: Duration::from_secs(delay + period * failures) }))
        };
        let grace = template["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let (startup, readiness) = (probe("startupProbe")?, probe("readinessProbe")?);
        Ok(Pod {
            name: pod_name.to_owned(),
            workload: workload_name.to_owned(),
            ip,
            labels: string_map(&template["metadata"]["labels"]),
            annotations: string_map(&template["metadata"]["annotations"]),
            ports,
            args,
            env,
            termination_grace: Duration::from_secs(grace),
            startup,
            readiness,
            dir: pod_dir,
            entrypoint: self.image.entrypoint.clone(),
            user,
            image_rootfs: self.image.rootfs.clone(),
            mounts,
            child: None,
            endpoints: self.endpoints.clone(),
        })
    }

    /// Mounts the pod's volumes in its root: a Secret's items as files (readable by all, as Kubernetes makes
    /// them), an emptyDir as a directory anyone may write. The mount paths.
    fn mount_volumes(&self, pod_spec: &Value, container: &Value, rootfs: &Path) -> anyhow::Result<Vec<String>> {
        use std::os::unix::fs::PermissionsExt as _;
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().context("a mount without a name")?;
            let path = mount["mountPath"].as_str().context("a mount without a path")?;
            let volume = pod_spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|volume| volume["name"] == name)
                .with_context(|| format!("the mount {name} names no volume"))?;
            ensure!(path.starts_with('/') && !path.contains(".."), "mount {name}: a bad path {path}");
            let host = rootfs.join(path.trim_start_matches('/'));
            // Mounted over whatever the image has there.
            if host.exists() {
                std::fs::remove_dir_all(&host)?;
            }
            std::fs::create_dir_all(&host)?;
            if let Some(secret) = volume["secret"]["secretName"].as_str() {
                let items = volume["secret"]["items"].as_array().context("a Secret volume without items")?;
                for item in items {
                    let key = item["key"].as_str().context("an item without a key")?;
                    let file = item["path"].as_str().context("an item without a path")?;
                    std::fs::write(host.join(file), self.manifests.secret_key(secret, key)?)?;
                    std::fs::set_permissions(host.join(file), std::fs::Permissions::from_mode(0o644))?;
                }
                std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755))?;
            } else {
                ensure!(
                    volume.get("emptyDir").is_some(),
                    "volume {name}: only Secret and emptyDir volumes are run here"
                );
                std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o1777))?;
            }
            mounts.push(path.trim_end_matches('/').to_owned());
        }
        Ok(mounts)
    }

    /// The container's environment, as a kubelet makes it (the image's, then the container's over it), then
    /// as it resolves on this host.
    fn environment(
        &self,
        container: &Value,
        (pod_name, ip): (&str, Ipv4Addr),
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = self.image.env.clone();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().context("a variable without a name")?.to_owned();
            let value = if let Some(value) = var["value"].as_str() {
                expand(value, &env)
            } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => pod_name.to_owned(),
                    "metadata.namespace" => self.manifests.namespace.clone(),
                    "status.podIP" => ip.to_string(),
                    other => bail!("{name}: fieldRef {other} is not run here"),
                }
            } else if !var["valueFrom"]["secretKeyRef"].is_null() {
                let reference = &var["valueFrom"]["secretKeyRef"];
                let secret = reference["name"].as_str().context("a secretKeyRef without a name")?;
                let key = reference["key"].as_str().context("a secretKeyRef without a key")?;
                self.manifests.secret_key(secret, key).with_context(|| format!("variable {name}"))?
            } else {
                bail!("{name}: neither a value, a fieldRef nor a secretKeyRef")
            };
            env.retain(|(key, _)| *key != name);
            env.push((name, value));
        }
        for (_, value) in env.iter_mut() {
            *value = self.resolve_services(value);
            for wildcard in ["0.0.0.0:", "[::]:"] {
                if let Some(port) = value.strip_prefix(wildcard) {
                    *value = format!("{ip}:{port}");
                }
            }
        }
        Ok(env)
    }

    /// `//SERVICE` in a value, in any of the Service's DNS names, to `//CLUSTER_IP` (the cluster's DNS).
    fn resolve_services(&self, value: &str) -> String {
        let mut value = value.to_owned();
        let namespace = &self.manifests.namespace;
        for (name, vip) in &self.vips {
            for dns in [
                format!("{name}.{namespace}.svc.cluster.local"),
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}"),
                name.to_owned(),
            ] {
                value = value.replace(&format!("//{dns}:"), &format!("//{vip}:"));
            }
        }
        value
    }

    /// Starts every pod at once (as a first install does) and waits until each is ready.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for pod in &mut self.pods {
            pod.spawn()?;
        }
        let mut waits = Vec::new();
        for pod in &mut self.pods {
            waits.push(pod.wait_ready());
        }
        futures_util::future::try_join_all(waits).await?;
        Ok(())
    }

    /// Takes the pods of `workload` (`Kind/NAME`) out of the kubelet for a rolling update, so that several
    /// workloads roll at once, as `helm upgrade` rolls them: roll its pods with [`Kubelet::roll_next`], then
    /// give them back with [`Kubelet::end_rollout`] (whatever happened: the pods' logs are the kubelet's).
    /// A StatefulSet's pods are replaced from the highest ordinal down, each under its own name; a
    /// Deployment's one at a time, each by a pod with a new name.
    pub fn begin_rollout(&mut self, workload: &str) -> anyhow::Result<Rollout> {
        let (taken, kept): (Vec<Pod>, Vec<Pod>) =
            std::mem::take(&mut self.pods).into_iter().partition(|pod| pod.workload == workload);
        self.pods = kept;
        ensure!(!taken.is_empty(), "no pods of {workload}");
        let todo = match workload.split_once('/') {
            Some(("StatefulSet", _)) => {
                let ordinal = |pod: &Pod| pod.name.rsplit('-').next().and_then(|n| n.parse::<u32>().ok());
                let mut todo: Vec<(Pod, String)> = taken
                    .into_iter()
                    .map(|pod| {
                        let name = pod.name.clone();
                        (pod, name)
                    })
                    .collect();
                todo.sort_by_key(|(pod, _)| std::cmp::Reverse(ordinal(pod)));
                todo
            }
            Some(("Deployment", deployment)) => {
                let deployment = deployment.to_owned();
                taken.into_iter().map(|pod| (pod, self.next_deployment_pod(&deployment))).collect()
            }
            _ => bail!("{workload}: not Deployment/NAME or StatefulSet/NAME"),
        };
        Ok(Rollout { workload: workload.to_owned(), todo: todo.into(), done: Vec::new(), gone: Vec::new() })
    }

    /// Replaces the next pod of the rollout: a StatefulSet's pod is stopped, then made again under its name
    /// (at a new address, as a new pod gets it), ready; a Deployment's gets a new pod (its default surge: the
    /// new pod first), ready, then is stopped. `None` once every pod was replaced.
    pub async fn roll_next(&self, rollout: &mut Rollout) -> anyhow::Result<Option<Rolled>> {
        let Some((mut old, name)) = rollout.todo.pop_front() else {
            return Ok(None);
        };
        let mut new = None;
        let replaced = self.replace(&rollout.workload, &mut old, &name, &mut new).await;
        let old_name = old.name.clone();
        rollout.gone.push(old);
        match (replaced, new) {
            (Ok(status), Some(new)) => {
                rollout.done.push(new);
                Ok(Some(Rolled { old: old_name, new: name, status }))
            }
            (result, new) => {
                rollout.gone.extend(new);
                Err(result.err().unwrap_or_else(|| anyhow::anyhow!("{old_name} was not replaced")))
            }
        }
    }

    async fn replace(
        &self,
        workload_name: &str,
        old: &mut Pod,
        name: &str,
        new: &mut Option<Pod>,
    ) -> anyhow::Result<ExitStatus> {
        let workload = self.workload(workload_name)?;
        let stateful = workload_name.starts_with("StatefulSet/");
        let stopped = if stateful { Some(old.terminate().await?) } else { None };
        let pod = new.insert(self.plan(workload_name, &workload, name, next_ip()?)?);
        pod.spawn()?;
        pod.wait_ready().await?;
        match stopped {
            Some(status) => Ok(status),
            None => old.terminate().await,
        }
    }

    /// Gives a rollout's pods back to the kubelet: the new ones, those not replaced, and the old ones (as
    /// replaced pods, for their logs).
    pub fn end_rollout(&mut self, rollout: Rollout) {
        self.pods.extend(rollout.done);
        self.pods.extend(rollout.todo.into_iter().map(|(pod, _)| pod));
        self.gone.extend(rollout.gone);
    }

    fn workload(&self, workload_name: &str) -> anyhow::Result<Value> {
        let (kind, name) = workload_name.split_once('/').context("not Kind/NAME")?;
        Ok(self.manifests.get(kind, name)?.clone())
    }

    /// The pods of a workload (`StatefulSet/NAME`), in order.
    pub fn pods_of(&self, workload: &str) -> Vec<&Pod> {
        let mut pods: Vec<&Pod> = self.pods.iter().filter(|pod| pod.workload == workload).collect();
        // By name, a longer name later: a StatefulSet's by ordinal, a Deployment's as they were made.
        pods.sort_by(|a, b| (a.name.len(), &a.name).cmp(&(b.name.len(), &b.name)));
        pods
    }

    /// `CLUSTER_IP:PORT` of a Service's port, as a client in the cluster reaches it.
    pub fn service_address(&self, service: &str, port: u16) -> anyhow::Result<String> {
        let vip = self.vips.get(service).with_context(|| format!("no Service {service} with a cluster IP"))?;
        Ok(format!("{vip}:{port}"))
    }

    /// The last lines of every pod's log, those replaced included.
    pub fn log_tails(&self, lines: usize) -> String {
        self.gone
            .iter()
            .chain(&self.pods)
            .map(|pod| format!("--- {} ---\n{}\n", pod.name, pod.log_tail(lines)))
            .collect()
    }

    /// What each pod, those replaced included, wrote outside its volumes.
    pub fn written_outside_volumes(&self) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let mut written = BTreeMap::new();
        for pod in self.gone.iter().chain(&self.pods) {
            let paths = pod.written_outside_volumes()?;
            if !paths.is_empty() {
                written.insert(pod.name.clone(), paths);
            }
        }
        Ok(written)
    }

    /// Marks the test as passed: the pods' directories go with it. Otherwise their logs are kept (their root
    /// file systems are not) and their tails printed.
    pub fn finish(mut self) {
        self.passed = true;
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for service in &self.services {
            service.abort();
        }
        if self.passed {
            return;
        }
        for pod in self.gone.iter().chain(&self.pods) {
            let _ = std::fs::remove_dir_all(pod.root());
        }
        if let Some(dir) = self.dir.take() {
            let kept = dir.keep();
            eprintln!("chart test failed: pods' logs kept in {}\n{}", kept.display(), self.log_tails(30));
        }
    }
}

/// Kubernetes' `$(VAR)`: a variable defined before this one; `$$` is a `$`; anything else stays as it is.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
            && let Some((_, found)) = env.iter().rev().find(|(key, _)| key == &inner[..close])
        {
            out.push_str(found);
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand_as_kubernetes_expands_them() {
        let env = vec![("POD_IP".to_owned(), "10.1.2.3".to_owned())];
        assert_eq!(expand("http://$(POD_IP):7200", &env), "http://10.1.2.3:7200");
        assert_eq!(expand("$$(POD_IP) $(NOPE) $", &env), "$(POD_IP) $(NOPE) $");
    }
}
