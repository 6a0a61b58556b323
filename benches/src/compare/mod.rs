//! The end-to-end comparison: the same load generator scenarios against the bare relay, `switchboard serve`
//! and the split cluster, one after the other on this machine; then the figures side by side, their ratios
//! (Switchboard / bare) and the goals judged.
//!
//! Every scenario that measures memory runs on freshly started servers, so that nothing of an earlier
//! scenario is counted; `steady` and the throughput search share one start; `chat-storm` needs a push-routed
//! group and `license` a limit, so each gets servers started with its own configuration.

pub mod cpu;
pub mod figures;
pub mod goals;
pub mod loadgen;
pub mod servers;
pub mod targets;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::compare::figures::{ChatStorm, Idle, License, Search, Steady};
use crate::compare::goals::{Goal, SUSTAINED_SHARE, TargetFigures};
use crate::compare::loadgen::{Loadgen, Scenario};
use crate::compare::servers::Programs;

/// A guard added to a scenario's own length before it is given up.
const DEADLINE_MARGIN: Duration = Duration::from_secs(180);

/// What to run, and how hard.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct Settings {
    /// Targets to measure, of `relay`, `serve`, `cluster`.
    #[arg(long, value_delimiter = ',', default_value = "relay,serve,cluster")]
    pub targets: Vec<String>,
    /// Scenarios to run, of `steady`, `search`, `idle`, `chat-storm`, `license`.
    #[arg(long, value_delimiter = ',', default_value = "steady,search,idle,chat-storm,license")]
    pub scenarios: Vec<String>,
    /// `steady`: customer/agent pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// `steady`: messages per second, over all pairs.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 20)]
    pub duration_s: u64,
    #[arg(long, default_value_t = 3)]
    pub warmup_s: u64,
    /// The throughput search: each step's rate is the previous one's times this (or divided by it, when the
    /// run at `--rate` is not sustained), from `--rate`.
    #[arg(long, default_value_t = 1.6)]
    pub search_factor: f64,
    /// The throughput search: runs besides the one at `--rate`, at most.
    #[arg(long, default_value_t = 6)]
    pub search_steps: u32,
    #[arg(long, default_value_t = 10)]
    pub search_duration_s: u64,
    /// The throughput search: runs between the highest rate sustained and the lowest not, once both are known.
    #[arg(long, default_value_t = 2)]
    pub search_refine: u32,
    /// The throughput search: a step whose message latency p99 is above this is not sustained (an open-loop
    /// load keeps its rate while the server falls behind: the latency shows it).
    #[arg(long, default_value_t = 100)]
    pub search_max_p99_ms: u64,
    /// `idle`: customer sessions held open.
    #[arg(long, default_value_t = 5000)]
    pub idle_sessions: u64,
    #[arg(long, default_value_t = 10)]
    pub idle_hold_s: u64,
    /// `chat-storm`: chat starts per second, in a push-routed group.
    #[arg(long, default_value_t = 500.0)]
    pub storm_rate: f64,
    #[arg(long, default_value_t = 2500)]
    pub storm_count: u64,
    /// `chat-storm`: agents signed in to take the offers.
    #[arg(long, default_value_t = 50)]
    pub storm_agents: usize,
    #[arg(long, default_value_t = 30_000)]
    pub offer_timeout_ms: u64,
    /// Agent capacity in the generated configuration.
    #[arg(long, default_value_t = 10)]
    pub capacity: u32,
    /// `license`: the limit, the chat starts per burst, and the bursts.
    #[arg(long, default_value_t = 50)]
    pub license_limit: u64,
    #[arg(long, default_value_t = 500)]
    pub license_burst: u64,
    #[arg(long, default_value_t = 5)]
    pub license_rounds: u32,
    /// The load generator's `--processes`.
    #[arg(long)]
    pub processes: Option<u32>,
    /// The load generator's `--source-addrs`.
    #[arg(long)]
    pub source_addrs: Option<String>,
}

impl Settings {
    fn wants(&self, list: &[String], name: &str) -> bool {
        list.iter().any(|item| item == name)
    }

    pub fn target(&self, name: &str) -> bool {
        self.wants(&self.targets, name)
    }

    pub fn scenario(&self, name: &str) -> bool {
        self.wants(&self.scenarios, name)
    }
}

/// Everything a comparison produced: what `--out` holds.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub command: String,
    pub cores: usize,
    pub settings: Settings,
    pub relay: TargetFigures,
    pub serve: TargetFigures,
    pub cluster: TargetFigures,
    pub goals: Vec<Goal>,
    /// The load generator's reports (without their raw histograms), by scenario run.
    pub reports: std::collections::BTreeMap<String, serde_json::Value>,
}

/// The programs, the load generator, and where files go.
pub struct Bench {
    pub settings: Settings,
    pub programs: Programs,
    pub loadgen: Loadgen,
    pub work_dir: PathBuf,
}

/// What a target is, to the scenarios: where its load goes and which processes make it up.
pub struct Endpoint {
    pub urls: Vec<String>,
    /// The process the load generator watches itself (`--server-pid`).
    pub main_pid: u32,
    /// Every process of the target, whose memory is summed.
    pub pids: Vec<u32>,
    /// The parts of the target whose CPU time is measured, by name (its processes, and PostgreSQL and Redis
    /// for the cluster).
    pub cpu: Vec<(String, cpu::Source)>,
}

impl Bench {
    pub fn new(settings: Settings, bin_dir: &Path, work_dir: PathBuf) -> anyhow::Result<Bench> {
        let programs = Programs::in_dir(bin_dir)?;
        let loadgen = Loadgen {
            program: programs.loadgen.clone(),
            work_dir: work_dir.clone(),
            processes: settings.processes,
            source_addrs: settings.source_addrs.clone(),
            reports: Default::default(),
        };
        Ok(Bench { settings, programs, loadgen, work_dir })
    }

    /// The groups of the generated configurations (`gen-config --groups 1`), pull-routed but in the push
    /// configuration (chat-storm).
    pub fn groups(&self) -> Vec<String> {
        vec!["g0".to_owned()]
    }

    /// Writes a configuration with `gen-config` and returns its path.
    pub async fn config(&self, name: &str, extra: &[String]) -> anyhow::Result<PathBuf> {
        let agents = self.settings.pairs.max(self.settings.storm_agents);
        let mut args = vec![
            "--agents".to_owned(),
            agents.to_string(),
            "--groups".to_owned(),
            "1".to_owned(),
            "--capacity".to_owned(),
            self.settings.capacity.to_string(),
        ];
        args.extend_from_slice(extra);
        let path = self.work_dir.join(format!("{name}.yaml"));
        self.loadgen.gen_config(&args, &path).await?;
        Ok(path)
    }

    fn scenario<'a>(
        &self,
        label: String,
        endpoint: &'a Endpoint,
        command: Vec<String>,
        length: Duration,
    ) -> Scenario<'a> {
        Scenario {
            label,
            urls: &endpoint.urls,
            group: None,
            agents: None,
            server_pid: None,
            watch_pids: endpoint.pids.clone(),
            cpu: endpoint.cpu.clone(),
            command,
            deadline: length + DEADLINE_MARGIN,
        }
    }

    /// One steady run at `rate` messages per second for `duration_s`.
    pub async fn steady(
        &self,
        target: &str,
        endpoint: &Endpoint,
        rate: f64,
        duration_s: u64,
    ) -> anyhow::Result<Steady> {
        let settings = &self.settings;
        let command = vec![
            "steady".to_owned(),
            "--pairs".to_owned(),
            settings.pairs.to_string(),
            "--rate".to_owned(),
            format!("{rate:.0}"),
            "--duration-s".to_owned(),
            duration_s.to_string(),
            "--warmup-s".to_owned(),
            settings.warmup_s.to_string(),
        ];
        let length = Duration::from_secs(duration_s + settings.warmup_s);
        let mut scenario = self.scenario(format!("{target}-steady-{rate:.0}"), endpoint, command, length);
        // One agent per pair (the configuration has at least as many).
        scenario.agents = Some(settings.pairs);
        let run = self.loadgen.run(scenario).await?;
        Ok(Steady::read(&run, rate))
    }

    /// The throughput search, from the steady run at `--rate` (made here when not given): when it is
    /// sustained, steady runs at rising rates (× `--search-factor`) until one is not; when it is not, at
    /// falling rates until one is (at most `--search-steps` runs either way). Then `--search-refine` runs
    /// between the highest rate sustained and the lowest not (at their geometric mean, halving the gap).
    pub async fn search(&self, target: &str, endpoint: &Endpoint, first: Option<&Steady>) -> anyhow::Result<Search> {
        let settings = &self.settings;
        let first = match first {
            Some(first) => first.clone(),
            None => self.steady(target, endpoint, settings.rate, settings.search_duration_s).await?,
        };
        let mut search = Search::default();
        let rising = self.record_step(target, first, &mut search);
        // The highest rate sustained and the lowest not, so far (0 and infinity: none yet).
        let (mut sustained_rate, mut failed_rate) =
            if rising { (settings.rate, f64::INFINITY) } else { (0.0, settings.rate) };
        let factor = if rising { settings.search_factor } else { 1.0 / settings.search_factor };
        let mut rate = settings.rate * factor;
        for _ in 0..settings.search_steps {
            let measured = self.steady(target, endpoint, rate, settings.search_duration_s).await?;
            if self.record_step(target, measured, &mut search) {
                sustained_rate = rate;
            } else {
                failed_rate = rate;
            }
            if (sustained_rate > 0.0) && failed_rate.is_finite() {
                break;
            }
            rate *= factor;
        }
        search.capped = failed_rate.is_infinite();
        for _ in 0..settings.search_refine {
            if sustained_rate <= 0.0 || failed_rate.is_infinite() || failed_rate / sustained_rate < 1.05 {
                break;
            }
            let rate = (sustained_rate * failed_rate).sqrt();
            let measured = self.steady(target, endpoint, rate, settings.search_duration_s).await?;
            if self.record_step(target, measured, &mut search) {
                sustained_rate = rate;
            } else {
                failed_rate = rate;
            }
        }
        Ok(search)
    }

    /// Adds a run to the search, and its rate to the sustained figure when it was sustained and higher.
    fn record_step(&self, target: &str, measured: Steady, search: &mut Search) -> bool {
        let sustained = self.sustained(&measured);
        println!(
            "  {target} search: {:.0}/s → achieved {:.0}/s, p99 {:.1} ms, {} errors{}",
            measured.target_per_s,
            measured.achieved_per_s,
            measured.message.map_or(f64::NAN, |latency| latency.p99 as f64 / 1000.0),
            measured.errors,
            if sustained { "" } else { " (not sustained)" }
        );
        if sustained && measured.target_per_s > search.sustained_per_s {
            search.sustained_per_s = measured.target_per_s;
            search.sustained_achieved_per_s = measured.achieved_per_s;
        }
        search.steps.push(measured);
        sustained
    }

    /// A search step counts when it kept its rate without errors and its latency stayed bounded.
    fn sustained(&self, steady: &Steady) -> bool {
        let p99_us = steady.message.map_or(u64::MAX, |latency| latency.p99);
        steady.sustained(SUSTAINED_SHARE) && p99_us <= self.settings.search_max_p99_ms.saturating_mul(1000)
    }

    pub async fn idle(&self, target: &str, endpoint: &Endpoint) -> anyhow::Result<Idle> {
        let settings = &self.settings;
        let command = vec![
            "idle".to_owned(),
            "--sessions".to_owned(),
            settings.idle_sessions.to_string(),
            "--hold-s".to_owned(),
            settings.idle_hold_s.to_string(),
        ];
        let length = Duration::from_secs(settings.idle_hold_s + settings.idle_sessions / 100);
        let mut scenario = self.scenario(format!("{target}-idle"), endpoint, command, length);
        scenario.server_pid = Some(endpoint.main_pid);
        let run = self.loadgen.run(scenario).await?;
        Ok(Idle::read(&run, settings.idle_sessions))
    }

    pub async fn chat_storm(&self, target: &str, endpoint: &Endpoint) -> anyhow::Result<ChatStorm> {
        let settings = &self.settings;
        let command = vec![
            "chat-storm".to_owned(),
            "--rate".to_owned(),
            format!("{:.0}", settings.storm_rate),
            "--count".to_owned(),
            settings.storm_count.to_string(),
            "--routing".to_owned(),
            "push".to_owned(),
        ];
        let length = Duration::from_secs_f64(settings.storm_count as f64 / settings.storm_rate.max(1.0));
        let mut scenario = self.scenario(format!("{target}-chat-storm"), endpoint, command, length);
        scenario.agents = Some(settings.storm_agents);
        let run = self.loadgen.run(scenario).await?;
        Ok(ChatStorm::read(&run, settings.storm_rate))
    }

    pub async fn license(&self, target: &str, endpoint: &Endpoint) -> anyhow::Result<License> {
        let settings = &self.settings;
        let command = vec![
            "license".to_owned(),
            "--limit".to_owned(),
            settings.license_limit.to_string(),
            "--burst".to_owned(),
            settings.license_burst.to_string(),
            "--rounds".to_owned(),
            settings.license_rounds.to_string(),
        ];
        let length = Duration::from_secs(30 * u64::from(settings.license_rounds));
        let scenario = self.scenario(format!("{target}-license"), endpoint, command, length);
        let run = self.loadgen.run(scenario).await?;
        Ok(License::read(&run, settings.license_limit))
    }
}

/// Records the outcome of one measurement: the figure, or the error among the target's errors.
pub fn keep<T>(figures: &mut TargetFigures, what: &str, outcome: anyhow::Result<T>) -> Option<T> {
    match outcome.with_context(|| what.to_owned()) {
        Ok(value) => Some(value),
        Err(error) => {
            eprintln!("compare: {error:#}");
            figures.errors.push(format!("{error:#}"));
            None
        }
    }
}
