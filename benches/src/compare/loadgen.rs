//! Runs `switchboard-loadgen`: `gen-config`, and one scenario at a time with `--report FILE.json`, while the
//! resident set of the server processes is sampled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard_loadgen::report::Report;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::process::Command;

use crate::compare::cpu;
use crate::compare::servers::rss_kb;

/// How often the servers' resident sets are read while a scenario runs.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The load generator and the flags every scenario gets.
#[derive(Debug, Clone)]
pub struct Loadgen {
    pub program: PathBuf,
    /// Where reports and logs go.
    pub work_dir: PathBuf,
    /// `--processes N`, when given.
    pub processes: Option<u32>,
    /// `--source-addrs A-B`, when given.
    pub source_addrs: Option<String>,
    /// Every report read, by scenario label, without its raw histograms.
    pub reports: Arc<Mutex<BTreeMap<String, Value>>>,
}

/// What a scenario run gave.
#[derive(Debug, Clone)]
pub struct Run {
    /// The load generator's JSON report.
    pub report: Report,
    /// The exit status of the load generator, when it was not success.
    pub failed_status: Option<String>,
    /// The sum of the watched processes' resident sets before the run, in KiB.
    pub rss_before_kb: u64,
    /// The highest sum of the watched processes' resident sets during the run, in KiB.
    pub rss_peak_kb: u64,
    /// The CPU seconds each part of the target and the load generator spent over the run.
    pub cpu_s: BTreeMap<String, f64>,
}

/// One scenario: its subcommand and arguments, where it sends its load, and what to watch.
#[derive(Debug, Clone)]
pub struct Scenario<'a> {
    /// Names the report and log files.
    pub label: String,
    pub urls: &'a [String],
    /// `--group`, when not the default.
    pub group: Option<String>,
    /// `--agents`, when the scenario signs agents in.
    pub agents: Option<usize>,
    /// `--server-pid`: the load generator reports this process's memory itself.
    pub server_pid: Option<u32>,
    /// Every server process, whose resident sets are summed.
    pub watch_pids: Vec<u32>,
    /// The parts of the target whose CPU time is measured, by name.
    pub cpu: Vec<(String, cpu::Source)>,
    /// The subcommand and its arguments.
    pub command: Vec<String>,
    /// A guard against a run that never ends.
    pub deadline: Duration,
}

impl Loadgen {
    /// `gen-config ARGS --out FILE`.
    pub async fn gen_config(&self, args: &[String], out: &Path) -> anyhow::Result<()> {
        let output = Command::new(&self.program)
            .arg("gen-config")
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .await
            .context("cannot run switchboard-loadgen gen-config")?;
        if !output.status.success() {
            bail!("switchboard-loadgen gen-config failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// The full command line of a scenario (without the program).
    pub fn args(&self, scenario: &Scenario<'_>, report: &Path) -> Vec<String> {
        let mut args = scenario.command.clone();
        for url in scenario.urls {
            args.extend(["--url".to_owned(), url.clone()]);
        }
        if let Some(group) = &scenario.group {
            args.extend(["--group".to_owned(), group.clone()]);
        }
        if let Some(agents) = scenario.agents {
            args.extend(["--agents".to_owned(), agents.to_string()]);
        }
        if let Some(pid) = scenario.server_pid {
            args.extend(["--server-pid".to_owned(), pid.to_string()]);
        }
        if let Some(processes) = self.processes {
            args.extend(["--processes".to_owned(), processes.to_string()]);
        }
        if let Some(source_addrs) = &self.source_addrs {
            args.extend(["--source-addrs".to_owned(), source_addrs.clone()]);
        }
        args.extend(["--report".to_owned(), report.display().to_string(), "--quiet".to_owned()]);
        args
    }

    /// Runs a scenario to its end and reads its report.
    pub async fn run(&self, scenario: Scenario<'_>) -> anyhow::Result<Run> {
        let report_path = self.work_dir.join(format!("{}.json", scenario.label));
        let log_path = self.work_dir.join(format!("loadgen-{}.log", scenario.label));
        let _ = std::fs::remove_file(&report_path);
        let args = self.args(&scenario, &report_path);
        let log = std::fs::File::create(&log_path)?;
        let rss_before_kb = total_rss_kb(&scenario.watch_pids);
        let meter = cpu::Meter::start(&scenario.cpu);
        let peak = Arc::new(AtomicU64::new(rss_before_kb));
        let sampler = tokio::spawn(sample_peak(scenario.watch_pids.clone(), peak.clone()));
        let mut child = Command::new(&self.program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start switchboard-loadgen")?;
        let status = tokio::time::timeout(scenario.deadline, child.wait()).await;
        sampler.abort();
        let cpu_s = meter.finish();
        let status = match status {
            Ok(status) => status?,
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!("{}: the load generator did not finish within {:?}", scenario.label, scenario.deadline)
            }
        };
        let text = std::fs::read_to_string(&report_path).with_context(|| {
            format!(
                "{}: no report from `switchboard-loadgen {}` ({status}); its log:\n{}",
                scenario.label,
                args.join(" "),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        })?;
        let report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a report of the load generator", scenario.label))?;
        let kept = serde_json::to_value(Report { histograms: BTreeMap::new(), ..report.clone() })?;
        self.reports.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(scenario.label.clone(), kept);
        let failed_status = (!status.success()).then(|| status.to_string());
        Ok(Run { report, failed_status, rss_before_kb, rss_peak_kb: peak.load(Ordering::Relaxed), cpu_s })
    }
}

fn total_rss_kb(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|pid| rss_kb(*pid)).sum()
}

async fn sample_peak(pids: Vec<u32>, peak: Arc<AtomicU64>) {
    loop {
        tokio::time::sleep(RSS_SAMPLE_EVERY).await;
        peak.fetch_max(total_rss_kb(&pids), Ordering::Relaxed);
    }
}
