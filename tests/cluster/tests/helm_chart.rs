//! The Helm chart (`helm/switchboard`), rendered by the real `helm`: it lints, and ships the alert rules and
//! dashboards of `deploy/` as they are; values that could not make a working cluster are refused by name; and
//! its pods, run on loopback as a kubelet would run them (`switchboard_cluster_tests::kube`), in the image
//! `deploy/image/build` makes of the binary under test, over a real
//! PostgreSQL and Redis, make a cluster whose chats flow through its Services, whose license holds at the
//! number the values give, whose metrics are where its pods' annotations say, which loses nothing
//! acknowledged through a rolling restart of every workload (the three at once, as `helm upgrade` rolls them),
//! and whose pods all stop within their grace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use switchboard_cluster_tests::kube::{self, Image, Kubelet, Manifests};
use switchboard_cluster_tests::traffic::{Traffic, catch_up_all, open_chats};
use switchboard_cluster_tests::{ClientLog, Connection, Db, checker, tenancy};
use switchboard_testservices::{Postgres, Redis};
use tokio::time::Instant;

const RELEASE: &str = "chat";
const NAMESPACE: &str = "switchboard";
const FULLNAME: &str = "chat-switchboard";
const CHATS: usize = 6;
const PACE: Duration = Duration::from_millis(100);
/// A guard for conversations to go on after a step of the rollout, and for the placement.
const FLOW_DEADLINE: Duration = Duration::from_secs(30);
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(15);

fn example_values() -> std::path::PathBuf {
    kube::chart_dir().join("ci/example-values.yaml")
}

fn write_values(dir: &Path, name: &str, values: &Value) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, serde_yaml_ng::to_string(values)?)?;
    Ok(path)
}

fn yaml_file(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(serde_yaml_ng::from_str(&text)?)
}

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn container<'a>(manifests: &'a Manifests, kind: &str, role: &str) -> anyhow::Result<&'a Value> {
    Ok(&manifests.get(kind, &format!("{FULLNAME}-{role}"))?["spec"]["template"]["spec"]["containers"][0])
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_array()?.iter().find(|var| var["name"] == name)
}

#[test]
fn the_chart_lints_and_ships_the_rules_and_dashboards_of_deploy_as_they_are() -> anyhow::Result<()> {
    let lint = std::process::Command::new(kube::helm()?)
        .args(["lint", "--strict"])
        .arg(kube::chart_dir())
        .arg("-f")
        .arg(example_values())
        .output()?;
    let said = String::from_utf8_lossy(&lint.stdout);
    ensure!(lint.status.success(), "helm lint --strict failed:\n{said}{}", String::from_utf8_lossy(&lint.stderr));
    ensure!(!said.contains("[WARNING]") && !said.contains("[ERROR]"), "helm lint:\n{said}");

    let manifests = Manifests::render(RELEASE, NAMESPACE, &[&example_values()])?;
    // Each role as the design has it: routers keep their names (their node ids) across restarts.
    container(&manifests, "Deployment", "gateway")?;
    container(&manifests, "StatefulSet", "router")?;
    container(&manifests, "Deployment", "store")?;

    // Selectors: each workload's selects its own pods; each Service, disruption budget and PodMonitor selects
    // the pods of one workload; a StatefulSet's governing Service is headless.
    let workloads: Vec<(String, BTreeMap<String, Value>)> = ["Deployment", "StatefulSet"]
        .into_iter()
        .flat_map(|kind| manifests.of_kind(kind))
        .map(|workload| {
            let labels = workload["spec"]["template"]["metadata"]["labels"].as_object().cloned().unwrap_or_default();
            (workload["metadata"]["name"].as_str().unwrap_or_default().to_owned(), labels.into_iter().collect())
        })
        .collect();
    let selects = |selector: &Value| -> Vec<String> {
        let selector = selector.as_object().cloned().unwrap_or_default();
        workloads
            .iter()
            .filter(|(_, labels)| {
                !selector.is_empty() && selector.iter().all(|(key, value)| labels.get(key) == Some(value))
            })
            .map(|(name, _)| name.clone())
            .collect()
    };
    for kind in ["Deployment", "StatefulSet"] {
        for workload in manifests.of_kind(kind) {
            let name = workload["metadata"]["name"].as_str().context("no name")?;
            assert_eq!(selects(&workload["spec"]["selector"]["matchLabels"]), [name], "{kind} {name}");
        }
    }
    for (kind, path) in [
        ("Service", "/spec/selector"),
        ("PodDisruptionBudget", "/spec/selector/matchLabels"),
        ("PodMonitor", "/spec/selector/matchLabels"),
    ] {
        for object in manifests.of_kind(kind) {
            let name = object["metadata"]["name"].as_str().context("no name")?;
            let selected = selects(object.pointer(path).context("no selector")?);
            assert_eq!(selected.len(), 1, "{kind} {name} selects {selected:?}");
        }
    }
    let routers = manifests.get("StatefulSet", &format!("{FULLNAME}-router"))?;
    let governing = manifests.get("Service", routers["spec"]["serviceName"].as_str().context("no serviceName")?)?;
    assert_eq!(governing["spec"]["clusterIP"], "None");

    // A gateway told to stop fails its readiness and serves on for its drain delay, within its grace period.
    let gateway = container(&manifests, "Deployment", "gateway")?;
    assert_eq!(gateway["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(gateway["livenessProbe"]["httpGet"]["path"], "/healthz");
    let delay_ms: u64 = env_of(gateway, "SWITCHBOARD_DRAIN_DELAY_MS").context("no drain delay")?["value"]
        .as_str()
        .context("the drain delay is not a string")?
        .parse()?;
    assert_eq!(delay_ms, 5_000);
    let grace = &manifests.get("Deployment", &format!("{FULLNAME}-gateway"))?["spec"]["template"]["spec"]["terminationGracePeriodSeconds"];
    // The delay, the connections' 15 s (the default limits.shutdown_grace_ms), and room to exit.
    assert!(grace.as_u64().is_some_and(|grace| grace * 1000 > delay_ms + 15_000), "{grace}");

    // The example's configuration file, as the chart renders it, is one the binary accepts (its push group and
    // business hours included): `switchboard migrate` reads it before it migrates an empty SQLite database.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, manifests.secret_key(FULLNAME, "config.yaml")?)?;
    let migrate = std::process::Command::new(switchboard_cluster_tests::process::binary()?)
        .args(["migrate", "--config"])
        .arg(&config)
        .env("SWITCHBOARD_DATA_DIR", dir.path().join("data"))
        .output()?;
    ensure!(
        migrate.status.success(),
        "switchboard refuses the example's configuration: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    // The alert rules, rule for rule.
    let rule = manifests.get("PrometheusRule", FULLNAME)?;
    let alerts = yaml_file(&repo_file("deploy/prometheus/alerts.yml"))?;
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "the PrometheusRule differs from deploy/prometheus/alerts.yml"
    );
    // The dashboards, file for file.
    let dashboards = manifests.get("ConfigMap", &format!("{FULLNAME}-dashboards"))?;
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: BTreeSet<String> = dashboards["data"].as_object().context("no dashboards")?.keys().cloned().collect();
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(repo_file("deploy/grafana/dashboards"))? {
        let path = entry?.path();
        let name = path.file_name().context("a file without a name")?.to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path)?;
        let in_chart = dashboards["data"][&name].as_str().with_context(|| format!("{name} is not in the chart"))?;
        assert_eq!(
            serde_json::from_str::<Value>(in_chart)?,
            serde_json::from_str::<Value>(&text)?,
            "{name} differs from deploy/grafana/dashboards"
        );
        files.insert(name);
    }
    assert_eq!(shipped, files);

    // Each role's PodMonitor scrapes a port its pods have, under the job the dashboards and rules expect.
    for (kind, role) in [("Deployment", "gateway"), ("StatefulSet", "router"), ("Deployment", "store")] {
        let monitor = manifests.get("PodMonitor", &format!("{FULLNAME}-{role}"))?;
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        let container = container(&manifests, kind, role)?;
        let ports: Vec<&Value> = container["ports"].as_array().context("no ports")?.iter().collect();
        assert!(ports.iter().any(|port| port["name"] == endpoint["port"]), "{role}: no port {}", endpoint["port"]);
        assert_eq!(
            endpoint["relabelings"][0],
            json!({ "targetLabel": "job", "replacement": format!("switchboard-{role}") })
        );
    }

    // Without them asked for, no object of the Prometheus Operator is rendered (its CRDs may be absent).
    let plain = write_values(
        dir.path(),
        "plain.yaml",
        &json!({ "metrics": { "podMonitor": { "enabled": false }, "prometheusRule": { "enabled": false },
                              "dashboards": { "enabled": false } } }),
    )?;
    let manifests = Manifests::render(RELEASE, NAMESPACE, &[&example_values(), &plain])?;
    assert_eq!(manifests.of_kind("PodMonitor").count() + manifests.of_kind("PrometheusRule").count(), 0);

    // The operator's own Secrets: the chart makes none, and every role reads theirs.
    let existing = write_values(
        dir.path(),
        "existing.yaml",
        &json!({
            "database": { "url": "", "existingSecret": "pg", "existingSecretKey": "url" },
            "redis": { "url": "", "existingSecret": "cache", "existingSecretKey": "url" },
            "existingConfigSecret": "tenants",
        }),
    )?;
    let manifests = Manifests::render(RELEASE, NAMESPACE, &[&example_values(), &existing])?;
    assert_eq!(manifests.of_kind("Secret").count(), 0);
    let store = container(&manifests, "Deployment", "store")?;
    assert_eq!(
        env_of(store, "SWITCHBOARD_DATABASE_URL").context("no database URL")?["valueFrom"]["secretKeyRef"],
        json!({ "name": "pg", "key": "url" })
    );
    for (kind, role) in [("Deployment", "gateway"), ("StatefulSet", "router"), ("Deployment", "store")] {
        let container = container(&manifests, kind, role)?;
        let redis = env_of(container, "SWITCHBOARD_REDIS_URL");
        if role == "store" {
            // The stores keep no presence: they do not need Redis's Secret to start.
            assert!(redis.is_none(), "the store is given Redis's URL");
        } else {
            let redis = &redis.context("no Redis URL")?["valueFrom"]["secretKeyRef"];
            assert_eq!(redis, &json!({ "name": "cache", "key": "url" }), "{role}");
        }
        let pod = &manifests.get(kind, &format!("{FULLNAME}-{role}"))?["spec"]["template"]["spec"];
        let config = pod["volumes"].as_array().context("no volumes")?.iter().find(|volume| volume["name"] == "config");
        assert_eq!(config.context("no config volume")?["secret"]["secretName"], "tenants", "{role}");
    }

    // An IPv6 pod network: every listen address is one the binary reads ([::]:PORT), and the routers
    // advertise their pod's IP, whichever family it is (the binary brackets an IPv6 one).
    let ipv6 = write_values(dir.path(), "ipv6.yaml", &json!({ "listenAddress": "::" }))?;
    let manifests = Manifests::render(RELEASE, NAMESPACE, &[&example_values(), &ipv6])?;
    for (kind, role) in [("Deployment", "gateway"), ("StatefulSet", "router"), ("Deployment", "store")] {
        let container = container(&manifests, kind, role)?;
        for name in ["SWITCHBOARD_LISTEN", "SWITCHBOARD_METRICS_LISTEN"] {
            let value = env_of(container, name).with_context(|| format!("{role}: no {name}"))?["value"].clone();
            let address: std::net::SocketAddr =
                value.as_str().context("not a string")?.parse().with_context(|| format!("{role} {name}: {value}"))?;
            assert!(address.ip().is_unspecified() && address.is_ipv6(), "{role} {name}: {address}");
        }
    }
    let router = container(&manifests, "StatefulSet", "router")?;
    assert_eq!(env_of(router, "SWITCHBOARD_ADVERTISE_IP").context("no advertised IP")?["value"], "$(POD_IP)");
    assert!(env_of(router, "SWITCHBOARD_ADVERTISE").is_none(), "a URL made of the pod's IP breaks on IPv6");
    Ok(())
}

#[test]
fn values_that_cannot_make_a_cluster_are_refused_by_name() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        (json!({ "database": { "url": "" } }), "database.url"),
        (json!({ "redis": { "url": "" } }), "redis.url"),
        (json!({ "config": { "tenants": [] } }), "config.tenants"),
        (json!({ "license": { "maxSessions": -1 } }), "license.maxSessions"),
        (json!({ "license": { "maxSessions": "many" } }), "license.maxSessions"),
        (json!({ "config": { "license": { "max_sessions": 5 } } }), "license.maxSessions"),
        (json!({ "config": { "presence": { "redis_url": "redis://elsewhere/" } } }), "redis.url"),
        (json!({ "config": { "version": 2 } }), "config.version"),
        (json!({ "config": { "limits": { "drain_delay_ms": 100 } } }), "gateway.drainDelaySeconds"),
        (json!({ "router": { "replicas": 0 } }), "router.replicas"),
        (
            json!({ "router": { "lease": { "leaseMs": 5000, "renewEveryMs": 2000, "renewDeadlineMs": 7000 } } }),
            "router.lease",
        ),
        (json!({ "gateway": { "port": 70000 } }), "gateway.port"),
        (json!({ "gatway": { "replicas": 3 } }), "gatway"),
        (json!({ "ingress": { "enabled": true, "hosts": [] } }), "ingress.hosts"),
    ];
    for (i, (values, named)) in cases.iter().enumerate() {
        let file = write_values(dir.path(), &format!("bad-{i}.yaml"), values)?;
        match kube::template(RELEASE, NAMESPACE, &[&example_values(), &file])? {
            Ok(_) => panic!("{values} was rendered"),
            Err(error) => assert!(error.contains(named), "{values}: the refusal does not name {named}: {error}"),
        }
    }
    Ok(())
}

/// The chart's values for a run here: the example's, with this run's PostgreSQL and Redis, one agent per
/// chat, a license of exactly `CHATS` chats, short leases (so that a lost router's shards move in seconds) and
/// a gateway's drain delay of a second.
fn run_values(dir: &Path, database_url: &str, redis_url: &str) -> anyhow::Result<std::path::PathBuf> {
    let config: Value = serde_yaml_ng::from_str(&tenancy::config(CHATS))?;
    write_values(
        dir,
        "run.yaml",
        &json!({
            "database": { "url": database_url },
            "redis": { "url": redis_url },
            "license": { "maxSessions": CHATS },
            "logLevel": "warn",
            "config": {
                "presence": { "heartbeat_ms": 500, "grace_ms": 30000 },
                "limits": { "shutdown_grace_ms": 2000 },
                "tenants": config["tenants"],
            },
            "router": { "lease": { "leaseMs": 3000, "renewEveryMs": 500, "renewDeadlineMs": 2000 } },
            "gateway": { "drainDelaySeconds": 1 },
        }),
    )
}

/// Waits until the live routers own every shard, and `owner` (a router just restarted) owns some.
async fn wait_for_placement(db: &Db, routers: &BTreeSet<String>, owner: Option<&str>) -> anyhow::Result<()> {
    let end = Instant::now() + FLOW_DEADLINE;
    loop {
        let placement = db.placement().await?;
        let owners = placement.shards_by_owner();
        if placement.unowned(routers).is_empty() && owner.is_none_or(|owner| owners.contains_key(owner)) {
            return Ok(());
        }
        ensure!(Instant::now() < end, "placement not reached ({owner:?} to own shards): {:?}", owners.keys());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each router has told the cluster its pod's address: its listen address is a wildcard, which here, unlike in
/// a pod, is rewritten to the pod's address, so the chart must give it (`SWITCHBOARD_ADVERTISE_IP`).
async fn assert_advertised(db: &Db, kubelet: &Kubelet) -> anyhow::Result<()> {
    let nodes: Vec<(String, String)> =
        sqlx::query_as("SELECT node_id, address FROM nodes ORDER BY node_id").fetch_all(db.pool()).await?;
    let pods = kubelet.pods_of(&format!("StatefulSet/{FULLNAME}-router"));
    let expected: Vec<(String, String)> = pods
        .iter()
        .map(|pod| Ok((pod.name.clone(), format!("http://{}", pod.address("grpc")?))))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(nodes, expected);
    for pod in pods {
        assert_eq!(pod.env_var("SWITCHBOARD_ADVERTISE_IP"), Some(pod.ip.to_string().as_str()), "{}", pod.name);
    }
    Ok(())
}

/// Rolls every pod of `rollout` in turn, checking after each step that the pod stopped exited cleanly, that
/// a router back under its name owns shards again, and that every conversation goes on. The steps made.
async fn roll(
    kubelet: &Kubelet,
    rollout: &mut kube::Rollout,
    db: &Db,
    live: &BTreeSet<String>,
    log: &ClientLog,
) -> anyhow::Result<usize> {
    let router = rollout.workload.starts_with("StatefulSet/");
    let mut steps = 0;
    while let Some(kube::Rolled { old, new, status }) = kubelet.roll_next(rollout).await? {
        ensure!(status.success(), "{old} exited with {status} on SIGTERM");
        if router {
            wait_for_placement(db, live, Some(&new)).await?;
        }
        wait_continued(log, &format!("every conversation goes on after {old} gave way to {new}"), Instant::now())
            .await?;
        steps += 1;
    }
    Ok(steps)
}

async fn wait_continued(log: &ClientLog, what: &str, since: Instant) -> anyhow::Result<()> {
    log.wait_until(what, FLOW_DEADLINE, |data| data.continued_after(since).len() >= CHATS).await.with_context(|| {
        let failures = log.read(|data| data.failures.clone());
        format!("client failures: {failures:#?}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_pods_make_a_cluster_that_holds_its_license_and_loses_nothing_in_a_rolling_restart()
-> anyhow::Result<()> {
    let redis = tokio::task::block_in_place(Redis::start)?;
    let postgres = tokio::task::block_in_place(Postgres::start)?;
    let database_url = tokio::task::block_in_place(|| postgres.create_database())?;
    let dir = tempfile::tempdir()?;
    let values = run_values(dir.path(), &database_url, &redis.url())?;
    let manifests = Manifests::render(RELEASE, NAMESPACE, &[&example_values(), &values])?;
    // The image the chart names, built from the binary under test: every pod runs in its root file system.
    let image = tokio::task::block_in_place(|| Image::build(false))?;
    assert_eq!(image.user, "65532:65532", "the image's user is not the chart's");
    let mut kubelet = Kubelet::new(manifests, image).await?;
    // As `helm install` does: every pod at once; the stores migrate the empty database as they start.
    kubelet.start_all().await?;
    let db = Db::connect(&database_url).await?;

    // The routers' node ids are their pods' names: the shards are leased by exactly these, for as long as the
    // values say (3 s, not the binary's default of 10 s).
    let routers: Vec<String> =
        kubelet.pods_of(&format!("StatefulSet/{FULLNAME}-router")).iter().map(|pod| pod.name.clone()).collect();
    assert_eq!(routers, (0..3).map(|i| format!("{FULLNAME}-router-{i}")).collect::<Vec<_>>());
    let live: BTreeSet<String> = routers.iter().cloned().collect();
    wait_for_placement(&db, &live, None).await?;
    let placement = db.placement().await?;
    let longest = placement.leases.iter().map(|lease| lease.expires_at_ms - placement.now_ms).max().unwrap_or(0);
    assert!(longest <= 3_000, "a lease runs {longest} ms ahead: not router.lease.leaseMs");
    assert_advertised(&db, &kubelet).await?;
    // The license the values give, set by the stores in the database.
    assert_eq!(db.license().await?.max_sessions, CHATS as i64);

    // Chats through the gateways' Service (port 80, to the pods' 8080), as clients in the cluster reach them:
    // each connection to one of the ready gateways in turn.
    let gateways = vec![format!("ws://{}/v1/ws", kubelet.service_address(&format!("{FULLNAME}-gateway"), 80)?)];
    let log = ClientLog::new();
    let chats = open_chats(&log, &gateways, CHATS).await?;
    // The license is full: one more chat is refused, naming the limit.
    let mut extra = Connection::connect(&gateways[0]).await?;
    let start =
        json!({ "widget_key": tenancy::WIDGET_KEY, "group": tenancy::GROUP, "name": "One too many", "question": "?" });
    let refused = extra.request("chat.start", &start).await?.err().context("a chat over the license was admitted")?;
    assert_eq!(refused["code"], "license_exhausted", "{refused}");
    assert_eq!(refused["max_sessions"], CHATS as u64, "{refused}");
    drop(extra);

    // The gateway Service, which clients (and an Ingress) reach, serves no metrics: the gateways serve them on a
    // port of their own.
    let public = kubelet.service_address(&format!("{FULLNAME}-gateway"), 80)?;
    let (status, _) = kube::http_get(&public, "/metrics").await?;
    assert_eq!(status, 404, "GET /metrics through the gateway Service");
    // Every pod's metrics are where its annotations say.
    for pod in &kubelet.pods {
        assert_eq!(pod.annotations.get("prometheus.io/scrape").map(String::as_str), Some("true"), "{}", pod.name);
        let port = pod.annotations.get("prometheus.io/port").context("no metrics port")?;
        let path = pod.annotations.get("prometheus.io/path").context("no metrics path")?;
        let (status, body) = kube::http_get(&format!("{}:{port}", pod.ip), path).await?;
        assert_eq!(status, 200, "{}: GET {path} on {port}", pod.name);
        assert!(body.contains("switchboard_"), "{}: no Switchboard metrics at {port}{path}", pod.name);
        if pod.workload.ends_with("-store") {
            let line = format!("switchboard_license_sessions_max {CHATS}");
            // The stores report the license from the database every 2 s: wait for the first report.
            let end = Instant::now() + FLOW_DEADLINE;
            let mut body = body;
            while !body.lines().any(|l| l == line) && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(100)).await;
                body = kube::http_get(&format!("{}:{port}", pod.ip), path).await?.1;
            }
            assert!(body.lines().any(|l| l == line), "{}: no {line:?}", pod.name);
        }
    }

    // A rolling update of every workload under traffic, as `helm upgrade` makes it: the three workloads at
    // once, each one pod at a time as Kubernetes rolls it: the routers from the highest ordinal down, each
    // stopped with SIGTERM then made again under its name (at a new address); the stores and the gateways,
    // each replaced by a new pod (a new name: a new gateway id) ready before the old one is stopped. Every
    // stopped pod must exit cleanly within its grace period, and after each step every conversation must go
    // on.
    let conversations: Vec<String> = chats.iter().map(|chat| chat.conversation.clone()).collect();
    let participants = chats.into_iter().flat_map(|chat| [chat.customer, chat.agent]).collect();
    let traffic = Traffic::start(participants, PACE, 2_000);
    wait_continued(&log, "traffic flows", traffic.started).await?;
    let mut rollouts = Vec::new();
    for workload in [
        format!("StatefulSet/{FULLNAME}-router"),
        format!("Deployment/{FULLNAME}-store"),
        format!("Deployment/{FULLNAME}-gateway"),
    ] {
        rollouts.push(kubelet.begin_rollout(&workload)?);
    }
    let rolled = {
        let [routers, stores, gateways] = &mut rollouts[..] else { unreachable!("three workloads") };
        tokio::join!(
            roll(&kubelet, routers, &db, &live, &log),
            roll(&kubelet, stores, &db, &live, &log),
            roll(&kubelet, gateways, &db, &live, &log)
        )
    };
    for rollout in rollouts {
        kubelet.end_rollout(rollout);
    }
    let steps = rolled.0? + rolled.1? + rolled.2?;
    assert_advertised(&db, &kubelet).await?;

    let mut participants = traffic.stop().await?;
    let failures = log.read(|data| data.failures.clone());
    ensure!(failures.is_empty(), "clients failed:\n{}", failures.join("\n"));
    wait_for_placement(&db, &live, None).await?;
    let last_seqs: BTreeMap<String, u64> =
        db.conversations().await?.into_iter().map(|row| (row.id, row.last_seq)).collect();
    catch_up_all(&mut participants, &last_seqs, CATCH_UP_DEADLINE, false).await?;
    let logs = log.snapshot();
    let report = checker::check(&db, &logs, &live).await?;
    report.ensure_ok()?;
    let messages: u64 = participants.iter().map(|participant| participant.messages_sent()).sum();
    eprintln!("{} conversations, {messages} messages through the rollout: {}", conversations.len(), report.summary());
    assert!(messages >= (2 * CHATS * steps) as u64, "too few messages to say anything: {messages}");

    // `helm uninstall`: every pod stops within its grace period.
    for pod in &mut kubelet.pods {
        let status = pod.terminate().await?;
        assert!(status.success(), "{} exited with {status}", pod.name);
    }
    // The root file system is read-only: no pod, those replaced included, wrote outside its volumes.
    assert_eq!(kubelet.written_outside_volumes()?, BTreeMap::new());
    kubelet.finish();
    Ok(())
}

/// The image alone, as `docker run IMAGE` runs it (its layer gzipped, as released): its default command is
/// `serve` (the demo tenant) on 0.0.0.0:8080, as its non-root user, with its data in the image's `/data`, in
/// nothing but the image's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_serve_by_default_as_its_user() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let image = tokio::task::block_in_place(|| Image::build(true))?;
    assert_eq!(image.cmd, ["serve"]);
    assert!(image.env.contains(&("SWITCHBOARD_LISTEN".to_owned(), "0.0.0.0:8080".to_owned())), "{:?}", image.env);
    // A container's 0.0.0.0:8080 is its own; here it would be this host's: a free loopback port instead.
    let address = format!("127.0.0.1:{}", switchboard_testservices::free_port()?);
    let mut command = kube::in_root(&image.rootfs, &image.user, image.entrypoint.iter().chain(&image.cmd), &image.env)?;
    command
        .env("SWITCHBOARD_LISTEN", &address)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut serve = command.spawn()?;
    let end = Instant::now() + FLOW_DEADLINE;
    loop {
        if let Ok((200, body)) = kube::http_get(&address, "/healthz").await {
            assert_eq!(body, "ok");
            break;
        }
        if let Some(status) = serve.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = serve.stderr.take() {
                tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut stderr).await?;
            }
            anyhow::bail!("serve exited ({status}) in the image: {stderr}");
        }
        ensure!(Instant::now() < end, "serve did not answer in the image");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The demo tenant's widget starts a chat, stored in /data by the image's user.
    let mut customer = Connection::connect(&format!("ws://{address}/v1/ws")).await?;
    let start = json!({ "widget_key": "demo-widget-key", "group": "sales", "name": "Ann", "question": "hello?" });
    customer.ok("chat.start", start).await?;
    let database = std::fs::metadata(image.rootfs.join("data/switchboard.db"))?;
    assert_eq!(database.uid(), 65532, "/data/switchboard.db is not the image's user's");
    serve.start_kill()?;
    serve.wait().await?;
    Ok(())
}
