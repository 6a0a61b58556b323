//! The split cluster's `/metrics`, role by role: every store, router and gateway process serves an exposition
//! that `promtool check metrics` passes, and its figures say what happened. A chat between a customer on one
//! gateway and an agent on the other: each message's latency is recorded by the gateway that delivered it,
//! the routers together own every shard and hold the chat's actors, the store timed its appends, the
//! refused request is counted by reason, and every process reports its CPU and memory. Each process serves them on
//! a port of its own (a gateway's public port has none).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::json;
use switchboard_cluster_tests::{Cluster, ClusterSpec, Process};
use switchboard_e2e::exposition::Exposition;
use switchboard_e2e::{Client, SEED_CONFIG};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WIDGET: &str = "acme-widget-key";
/// A guard for the figures that move on timers (leases, the license read every 2 s), not a wait.
const FIGURES_DEADLINE: Duration = Duration::from_secs(30);

/// `GET /metrics` of a process: the body of a 200.
async fn scrape(process: &Process) -> anyhow::Result<String> {
    let address = process.metrics_address();
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header in the response")?;
    ensure!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{}: {head}", process.name);
    Ok(body.to_owned())
}

fn promtool_check(body: &str, what: &str) -> anyhow::Result<()> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("promtool is not on PATH: run ./scripts/test, which installs it (Debian's `prometheus` package)")
        }
        Err(error) => return Err(error).context("starting promtool"),
    };
    child.stdin.take().context("promtool's stdin")?.write_all(body.as_bytes())?;
    let output = child.wait_with_output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success() && text.trim().is_empty(), "promtool check metrics of {what}:\n{text}");
    Ok(())
}

/// The expositions of every process, by role and name.
async fn scrape_all(cluster: &Cluster) -> anyhow::Result<Vec<(&Process, String)>> {
    let mut all = Vec::new();
    for process in cluster.stores.iter().chain(&cluster.routers).chain(&cluster.gateways) {
        all.push((process, scrape(process).await?));
    }
    Ok(all)
}

/// What the figures must say once the chat below has happened; `Err` says what does not hold (yet).
fn figures_hold(all: &[(&Process, String)], agent_gateway: &str, customer_gateway: &str) -> Result<(), String> {
    let all: Vec<(&Process, Exposition)> =
        all.iter().map(|(process, body)| (*process, Exposition::parse(body))).collect();
    let mut problems = Vec::new();
    let sum = |role: &str, name: &str, with: &[(&str, &str)]| -> f64 {
        all.iter()
            .filter(|(process, _)| process.role.as_str() == role)
            .map(|(_, figures)| figures.total(name, with))
            .sum()
    };
    let named = |name: &str| all.iter().find(|(process, _)| process.name == name).map(|(_, figures)| figures);
    let mut expect = |holds: bool, what: String| {
        if !holds {
            problems.push(what);
        }
    };

    let shards = sum("router", "switchboard_router_shards_owned", &[]);
    expect(shards == 1024.0, format!("the routers own {shards} shards together, not 1024"));
    let conversations = sum("router", "switchboard_router_actors", &[("kind", "conversation")]);
    expect(conversations >= 1.0, format!("{conversations} conversation actors on the routers"));
    let commands = sum(
        "router",
        "switchboard_grpc_server_requests_total",
        &[("service", "switchboard.internal.v1.RouterService"), ("method", "Command"), ("code", "ok")],
    );
    // The two messages: each a command of the customer's or the agent's gateway to the chat's router.
    expect(commands >= 2.0, format!("{commands} RouterService/Command calls counted ok on the routers"));

    let appends = sum("store", "switchboard_store_append_duration_seconds_count", &[]);
    // The chat's creation (with its question), its acceptance and the two messages.
    expect(appends >= 4.0, format!("{appends} appends timed by the store"));
    let batches = sum("store", "switchboard_store_append_batch_size_count", &[]);
    expect(batches >= 1.0, format!("{batches} append batches counted by the store"));
    let in_use = sum("store", "switchboard_license_sessions_in_use", &[]);
    expect(in_use >= 1.0, format!("the license gauge says {in_use} sessions in use during the chat"));

    // Each message is timed by the gateway that wrote it to the other side.
    if let (Some(agents), Some(customers)) = (named(agent_gateway), named(customer_gateway)) {
        let delivered_to_agent = agents.total("switchboard_message_latency_seconds_count", &[]);
        let delivered_to_customer = customers.total("switchboard_message_latency_seconds_count", &[]);
        expect(delivered_to_agent >= 1.0, format!("the agent's gateway timed {delivered_to_agent} messages"));
        expect(delivered_to_customer >= 1.0, format!("the customer's gateway timed {delivered_to_customer} messages"));
        let agents_connected = agents.total("switchboard_gateway_connections", &[("role", "agent")]);
        expect(agents_connected == 1.0, format!("the agent's gateway counts {agents_connected} agent connections"));
        let refused = customers.total("switchboard_gateway_refusals_total", &[("reason", "unknown_group")]);
        expect(refused == 1.0, format!("the customer's gateway counted {refused} unknown_group refusals"));
    } else {
        expect(false, "a gateway was not scraped".to_owned());
    }

    for (process, figures) in &all {
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes"] {
            expect(figures.total(name, &[]) > 0.0, format!("{} {}: no {name}", process.role.as_str(), process.name));
        }
        let role = process.role.as_str();
        let build = figures.total("switchboard_build_info", &[("role", role)]);
        expect(build == 1.0, format!("{role} {}: switchboard_build_info{{role=\"{role}\"}} is {build}", process.name));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_of_the_cluster_serves_metrics_that_lint_clean_and_say_what_happened() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::new(SEED_CONFIG);
    spec.routers = 2;
    spec.gateways = 2;
    let mut cluster = Cluster::start(spec).await?;
    cluster.wait_for_placement(true).await?;
    let urls = cluster.gateway_urls();
    let (customer_url, agent_url) = (&urls[0], &urls[1]);
    let (customer_gateway, agent_gateway) = (cluster.gateways[0].name.clone(), cluster.gateways[1].name.clone());

    // A chat across the two gateways, a message each way, and one refused request.
    let mut agent = Client::sign_in(agent_url, "token-agent-b").await?;
    let (mut customer, chat, _) = Client::start_chat(customer_url, WIDGET, "g1", "Ann", "Where is my order?").await?;
    agent.ok("chat.accept", json!({ "conversation": chat })).await?;
    customer.ok("message.send", json!({ "conversation": chat, "client_msg_id": "c-1", "body": "Hello?" })).await?;
    agent.event_of(&chat, "message").await?;
    agent.ok("message.send", json!({ "conversation": chat, "client_msg_id": "a-1", "body": "Hi Ann" })).await?;
    customer.push_matching(|frame| frame["type"] == "event" && frame["event"]["client_msg_id"] == "a-1").await?;
    let mut stranger = Client::connect(customer_url).await?;
    let code = stranger
        .refused("chat.start", json!({ "widget_key": WIDGET, "group": "nowhere", "name": "Eve", "question": "?" }))
        .await?;
    ensure!(code == "unknown_group", "refused with {code}");

    let deadline = tokio::time::Instant::now() + FIGURES_DEADLINE;
    let all = loop {
        let all = scrape_all(&cluster).await?;
        match figures_hold(&all, &agent_gateway, &customer_gateway) {
            Ok(()) => break all,
            Err(problems) if tokio::time::Instant::now() >= deadline => {
                bail!("the cluster's metrics do not say what happened:\n{problems}")
            }
            // The figures that move on timers: the lease keepers', the license gauge's.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    for (process, body) in &all {
        promtool_check(body, &format!("{} {}", process.role.as_str(), process.name))?;
    }
    // A gateway given a metrics port (`SWITCHBOARD_METRICS_LISTEN`, as the harness gives every process) serves
    // `/metrics` there only: its public port, the one clients (and an Ingress) reach, has none.
    for gateway in &cluster.gateways {
        ensure!(gateway.metrics_address() != gateway.address(), "{}: metrics on the public port", gateway.name);
        let (status, _) = switchboard_e2e::http_get(gateway.address(), "/metrics").await?;
        ensure!(status.contains(" 404 "), "{}: /metrics on the public port answered {status}", gateway.name);
    }
    drop((agent, customer, stranger));
    cluster.finish();
    Ok(())
}
