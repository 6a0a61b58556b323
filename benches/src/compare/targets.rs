//! The measurements of each target, in order: the bare relay, `switchboard serve`, the split cluster.

use std::path::Path;

use switchboard_testservices::Postgres;

use crate::compare::cpu::Source;
use crate::compare::goals::TargetFigures;
use crate::compare::servers::{self, Cluster, Server};
use crate::compare::{Bench, Endpoint, keep};

fn single(name: &str, server: &Server) -> Endpoint {
    Endpoint {
        urls: vec![server.ws_url()],
        main_pid: server.pid,
        pids: vec![server.pid],
        cpu: vec![(name.to_owned(), Source::Process(server.pid))],
    }
}

fn cluster_endpoint(cluster: &Cluster, postgres: &Postgres) -> Endpoint {
    let mut cpu = vec![
        ("gateway".to_owned(), Source::Process(cluster.gateway.pid)),
        ("store".to_owned(), Source::Process(cluster.store.pid)),
    ];
    cpu.extend(cluster.routers.iter().map(|router| ("routers".to_owned(), Source::Process(router.pid))));
    cpu.extend(postgres.postmaster_pid().map(|pid| ("postgres".to_owned(), Source::Tree(pid))));
    cpu.extend(cluster.redis_pid().map(|pid| ("redis".to_owned(), Source::Process(pid))));
    Endpoint { urls: vec![cluster.gateway.ws_url()], main_pid: cluster.gateway.pid, pids: cluster.pids(), cpu }
}

/// Steady at `--rate`, then the throughput search, on one endpoint.
async fn steady_and_search(bench: &Bench, name: &str, endpoint: &Endpoint, figures: &mut TargetFigures) {
    let settings = &bench.settings;
    if settings.scenario("steady") || settings.scenario("search") {
        println!("{name}: steady at {:.0}/s for {} s", settings.rate, settings.duration_s);
        let steady = bench.steady(name, endpoint, settings.rate, settings.duration_s).await;
        figures.steady = keep(figures, "steady", steady);
    }
    if settings.scenario("search") {
        let search = bench.search(name, endpoint, figures.steady.as_ref()).await;
        figures.search = keep(figures, "throughput search", search);
    }
}

pub async fn relay(bench: &Bench) -> TargetFigures {
    let mut figures = TargetFigures::default();
    let log_dir = bench.work_dir.as_path();
    let groups = bench.groups();
    if bench.settings.scenario("idle") {
        println!("bare relay: idle, {} sessions", bench.settings.idle_sessions);
        if let Some(server) = keep(&mut figures, "start", servers::start_relay(&bench.programs, log_dir, &groups).await)
        {
            let idle = bench.idle("relay", &single("relay", &server)).await;
            figures.idle = keep(&mut figures, "idle", idle);
            server.stop().await;
        }
    }
    if let Some(server) = keep(&mut figures, "start", servers::start_relay(&bench.programs, log_dir, &groups).await) {
        steady_and_search(bench, "relay", &single("relay", &server), &mut figures).await;
        server.stop().await;
    }
    figures
}

/// The configurations of the Switchboard targets: pull-routed, push-routed, and with a license limit.
pub struct Configs {
    pub pull: std::path::PathBuf,
    pub push: std::path::PathBuf,
    pub license: std::path::PathBuf,
}

impl Configs {
    pub async fn generate(bench: &Bench) -> anyhow::Result<Configs> {
        let settings = &bench.settings;
        Ok(Configs {
            pull: bench.config("pull", &[]).await?,
            push: bench
                .config("push", &["--push-offer-timeout-ms".to_owned(), settings.offer_timeout_ms.to_string()])
                .await?,
            license: bench.config("license", &["--license".to_owned(), settings.license_limit.to_string()]).await?,
        })
    }
}

async fn start_serve(bench: &Bench, config: &Path, name: &str, figures: &mut TargetFigures) -> Option<Server> {
    let started = servers::start_serve(&bench.programs, config, &bench.work_dir, name).await;
    keep(figures, &format!("start {name}"), started)
}

pub async fn serve(bench: &Bench, configs: &Configs) -> TargetFigures {
    let mut figures = TargetFigures::default();
    let settings = &bench.settings;
    if settings.scenario("idle") {
        println!("serve: idle, {} sessions", settings.idle_sessions);
        if let Some(server) = start_serve(bench, &configs.pull, "serve-idle", &mut figures).await {
            let idle = bench.idle("serve", &single("serve", &server)).await;
            figures.idle = keep(&mut figures, "idle", idle);
            server.stop().await;
        }
    }
    if (settings.scenario("steady") || settings.scenario("search"))
        && let Some(server) = start_serve(bench, &configs.pull, "serve-steady", &mut figures).await
    {
        steady_and_search(bench, "serve", &single("serve", &server), &mut figures).await;
        server.stop().await;
    }
    if settings.scenario("chat-storm") {
        println!("serve: chat-storm at {:.0}/s", settings.storm_rate);
        if let Some(server) = start_serve(bench, &configs.push, "serve-chat-storm", &mut figures).await {
            let storm = bench.chat_storm("serve", &single("serve", &server)).await;
            figures.chat_storm = keep(&mut figures, "chat-storm", storm);
            server.stop().await;
        }
    }
    if settings.scenario("license") {
        println!("serve: license bursts, limit {}", settings.license_limit);
        if let Some(server) = start_serve(bench, &configs.license, "serve-license", &mut figures).await {
            let license = bench.license("serve", &single("serve", &server)).await;
            figures.license = keep(&mut figures, "license", license);
            server.stop().await;
        }
    }
    figures
}

async fn start_cluster(
    bench: &Bench,
    postgres: &Postgres,
    config: &Path,
    name: &str,
    figures: &mut TargetFigures,
) -> Option<Cluster> {
    let started = servers::start_cluster(&bench.programs, postgres, config, &bench.work_dir, name).await;
    keep(figures, &format!("start {name}"), started)
}

pub async fn cluster(bench: &Bench, configs: &Configs) -> TargetFigures {
    let mut figures = TargetFigures::default();
    let settings = &bench.settings;
    let Some(postgres) = keep(
        &mut figures,
        "start PostgreSQL",
        tokio::task::spawn_blocking(Postgres::start).await.map_err(anyhow::Error::from).and_then(|started| started),
    ) else {
        return figures;
    };
    if settings.scenario("idle") {
        println!("cluster: idle, {} sessions", settings.idle_sessions);
        if let Some(cluster) = start_cluster(bench, &postgres, &configs.pull, "cluster-idle", &mut figures).await {
            let idle = bench.idle("cluster", &cluster_endpoint(&cluster, &postgres)).await;
            figures.idle = keep(&mut figures, "idle", idle);
            cluster.stop().await;
        }
    }
    if (settings.scenario("steady") || settings.scenario("search"))
        && let Some(cluster) = start_cluster(bench, &postgres, &configs.pull, "cluster-steady", &mut figures).await
    {
        steady_and_search(bench, "cluster", &cluster_endpoint(&cluster, &postgres), &mut figures).await;
        cluster.stop().await;
    }
    if settings.scenario("chat-storm") {
        println!("cluster: chat-storm at {:.0}/s", settings.storm_rate);
        if let Some(cluster) = start_cluster(bench, &postgres, &configs.push, "cluster-chat-storm", &mut figures).await
        {
            let storm = bench.chat_storm("cluster", &cluster_endpoint(&cluster, &postgres)).await;
            figures.chat_storm = keep(&mut figures, "chat-storm", storm);
            cluster.stop().await;
        }
    }
    if settings.scenario("license") {
        println!("cluster: license bursts, limit {}", settings.license_limit);
        if let Some(cluster) = start_cluster(bench, &postgres, &configs.license, "cluster-license", &mut figures).await
        {
            let license = bench.license("cluster", &cluster_endpoint(&cluster, &postgres)).await;
            figures.license = keep(&mut figures, "license", license);
            cluster.stop().await;
        }
    }
    // PostgreSQL's stop (on drop) runs its programs: keep it off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || drop(postgres)).await;
    figures
}
