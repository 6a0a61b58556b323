//! Runs a scenario: sets up the network, the other processes and the progress line, then merges the
//! reports, prints the table and writes the JSON report.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::cli::{Command, Common};
use crate::metrics::Metrics;
use crate::net::Network;
use crate::progress::{self, ProgressLine};
use crate::report::{self, Report};
use crate::scenario::{self, Ctx};
use crate::shard::{self, Coordinator, Shard};
use crate::{gen_config, table};

/// Exit codes: every invariant held, one broke. (A usage or setup error exits with 2.)
const INVARIANT_BROKEN: u8 = 1;

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    if let Command::GenConfig(args) = &command {
        let yaml = gen_config::render(args)?;
        std::fs::write(&args.out, yaml).with_context(|| format!("cannot write {}", args.out.display()))?;
        eprintln!("wrote {}", args.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let common = validate(&command)?.clone();
    let is_copy = common.shard.is_some();
    let metrics = Arc::new(Metrics::new());
    let sources = common.source_addrs.clone().map(|addrs| addrs.0).unwrap_or_default();
    let timeout = Duration::from_secs_f64(common.request_timeout_s);
    let network = Arc::new(Network::resolve(&common.urls, sources, timeout, metrics.clone()).await?);
    let report_dir = tempfile::tempdir().context("cannot create a temporary directory for the reports")?;
    let run_id = common.run_id.clone().unwrap_or_else(new_run_id);
    let (shard, coordinator) = match common.shard {
        Some(shard) => (shard, Coordinator::copy()),
        None if common.processes > 1 => (
            Shard { index: 0, count: common.processes },
            Coordinator::spawn_copies(common.processes, &run_id, report_dir.path())?,
        ),
        None => (Shard::WHOLE, Coordinator::alone()),
    };
    let copy_progress = is_copy.then(|| tokio::spawn(shard::report_progress_to_first(metrics.clone())));
    let plan = progress::planned(&command);
    let progress_line =
        (!is_copy && !common.quiet).then(|| ProgressLine::start(metrics.clone(), coordinator.copies_progress(), plan));
    let mut ctx = Ctx { common: common.clone(), shard, metrics, network, coordinator, run_id };
    let result = match command {
        Command::GenConfig(_) => Ok(Report::default()), // written above
        Command::Idle(args) => scenario::idle::run(&mut ctx, args).await,
        Command::Storm(args) => scenario::storm::run(&mut ctx, args).await,
        Command::Steady(args) => scenario::steady::run(&mut ctx, args).await,
        Command::ChatStorm(args) => scenario::chat_storm::run(&mut ctx, args).await,
        Command::License(args) => scenario::license::run(&mut ctx, args).await,
    };
    if let Some(task) = copy_progress {
        task.abort();
    }
    if let Some(line) = progress_line {
        line.stop();
    }
    let mut report = result?;

    if is_copy {
        let path = common.shard_report.context("--shard needs --shard-report")?;
        std::fs::write(&path, serde_json::to_vec(&report)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    report.processes = 1;
    let mut reports = vec![report];
    reports.extend(ctx.coordinator.collect().await?);
    let mut merged = report::merge(reports);
    report::check_merged(&mut merged);
    merged.histograms.clear();
    finish(&merged, &common)
}

fn finish(report: &Report, common: &Common) -> anyhow::Result<ExitCode> {
    // Not `print!`: a closed stdout (`| head`) must not turn a finished run into a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), table::render(report).as_bytes());
    if let Some(path) = &common.report {
        let json = serde_json::to_string_pretty(report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    Ok(if report.invariants.ok { ExitCode::SUCCESS } else { ExitCode::from(INVARIANT_BROKEN) })
}

/// Checks the scenario's flags; returns its common flags.
fn validate(command: &Command) -> anyhow::Result<&Common> {
    let positive = |name: &str, value: f64| {
        if value.is_finite() && value > 0.0 { Ok(()) } else { Err(anyhow::anyhow!("--{name} must be positive")) }
    };
    let not_negative = |name: &str, value: f64| {
        if value.is_finite() && value >= 0.0 { Ok(()) } else { Err(anyhow::anyhow!("--{name} must be 0 or more")) }
    };
    let common = match command {
        Command::GenConfig(_) => bail!("gen-config has no scenario flags"),
        Command::Idle(args) => {
            not_negative("hold-s", args.hold_s)?;
            &args.common
        }
        Command::Storm(args) => {
            positive("rate", args.rate)?;
            not_negative("hold-s", args.hold_s)?;
            &args.common
        }
        Command::Steady(args) => {
            positive("rate", args.rate)?;
            positive("duration-s", args.duration_s)?;
            not_negative("warmup-s", args.warmup_s)?;
            not_negative("drain-s", args.drain_s)?;
            if args.pairs == 0 {
                bail!("--pairs must be at least 1");
            }
            &args.common
        }
        Command::ChatStorm(args) => {
            positive("rate", args.rate)?;
            not_negative("drain-s", args.drain_s)?;
            &args.common
        }
        Command::License(args) => {
            if args.limit == 0 {
                bail!("--limit must be the server's license.max_sessions, at least 1");
            }
            &args.common
        }
    };
    positive("request-timeout-s", common.request_timeout_s)?;
    Ok(common)
}

/// A random id for the run, shared with its copies.
fn new_run_id() -> String {
    format!("{:016x}", RandomState::new().build_hasher().finish() ^ u64::from(std::process::id()))
}
