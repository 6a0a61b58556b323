//! The figures the comparison reads from the load generator's reports (`{"scenario","throughput_per_s",
//! "counts","latency_us","errors_by_reason","invariants","memory","license"}`), one struct per scenario.
//! The reports are read with the load generator's own types (`switchboard_loadgen::report`), so a change
//! of its schema breaks this build rather than a comparison.

use std::collections::BTreeMap;

use serde::Serialize;
pub use switchboard_loadgen::report::LatencySummary as Latency;
use switchboard_loadgen::report::Report;

use crate::compare::cpu;
use crate::compare::loadgen::Run;

pub fn latency(report: &Report, name: &str) -> Option<Latency> {
    report.latency_us.get(name).copied()
}

/// One of the report's counts (0 when it has none of that name).
pub fn count(report: &Report, name: &str) -> u64 {
    report.counts.get(name).copied().unwrap_or(0)
}

/// Every error the load generator counted, whatever its reason.
pub fn n_errors(report: &Report) -> u64 {
    report.errors_by_reason.values().sum()
}

pub fn n_violations(report: &Report) -> u64 {
    report.invariants.violations_total.max(report.invariants.violations.len() as u64)
}

/// A `steady` run: message latency at a target rate.
#[derive(Debug, Clone, Serialize)]
pub struct Steady {
    pub target_per_s: f64,
    pub achieved_per_s: f64,
    /// Intended send → event received on the other side.
    pub message: Option<Latency>,
    /// Send → ack.
    pub ack: Option<Latency>,
    pub errors: u64,
    pub violations: u64,
    pub loadgen_failed: Option<String>,
    /// CPU microseconds per message sent (warm-up included, as the CPU is), by part of the target and for
    /// the load generator.
    pub cpu_us_per_message: BTreeMap<String, f64>,
}

impl Steady {
    pub fn read(run: &Run, target_per_s: f64) -> Steady {
        Steady {
            target_per_s,
            achieved_per_s: run.report.throughput_per_s,
            message: latency(&run.report, "message"),
            ack: latency(&run.report, "ack"),
            errors: n_errors(&run.report),
            violations: n_violations(&run.report),
            loadgen_failed: run.failed_status.clone(),
            cpu_us_per_message: cpu::per_unit_us(&run.cpu_s, count(&run.report, "messages_sent")),
        }
    }

    /// No error, no violation, and at least `min_share` of the target rate achieved.
    pub fn sustained(&self, min_share: f64) -> bool {
        self.errors == 0 && self.violations == 0 && self.achieved_per_s >= min_share * self.target_per_s
    }
}

/// The throughput search: steady runs at rising rates until one is not sustained (or at falling rates until
/// one is).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Search {
    pub steps: Vec<Steady>,
    /// The highest target rate sustained (no error, achieved ≥ 90 % of the target, message latency p99 within
    /// `--search-max-p99-ms`); 0 when none was.
    pub sustained_per_s: f64,
    /// The achieved rate of that step.
    pub sustained_achieved_per_s: f64,
    /// True when the search stopped at its last step without a failure: the figure is a lower bound.
    pub capped: bool,
}

/// An `idle` run: resident memory per idle session.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub sessions: u64,
    /// Measured here: (peak of the summed resident sets of every server process − before) / sessions.
    pub bytes_per_session: Option<f64>,
    /// The load generator's own figure for `--server-pid` (one process), when it gives one.
    pub loadgen_bytes_per_session: Option<f64>,
    pub rss_before_kb: u64,
    pub rss_peak_kb: u64,
    pub errors: u64,
    pub loadgen_failed: Option<String>,
}

impl Idle {
    pub fn read(run: &Run, sessions_asked: u64) -> Idle {
        let sessions = run.report.counts.get("sessions_open").copied().unwrap_or(sessions_asked);
        let grown_kb = run.rss_peak_kb.saturating_sub(run.rss_before_kb);
        Idle {
            sessions,
            bytes_per_session: (sessions > 0).then(|| grown_kb as f64 * 1024.0 / sessions as f64),
            loadgen_bytes_per_session: run.report.memory.as_ref().and_then(|memory| memory.server_bytes_per_session),
            rss_before_kb: run.rss_before_kb,
            rss_peak_kb: run.rss_peak_kb,
            errors: n_errors(&run.report),
            loadgen_failed: run.failed_status.clone(),
        }
    }
}

/// A `chat-storm` run in a push-routed group: offer latency.
#[derive(Debug, Clone, Serialize)]
pub struct ChatStorm {
    pub rate_per_s: f64,
    pub offer: Option<Latency>,
    /// The load generator's own lateness (intended start → the chat begins), part of every offer latency.
    pub schedule_lag: Option<Latency>,
    pub errors: u64,
    pub violations: u64,
    pub loadgen_failed: Option<String>,
    /// CPU microseconds per chat started, by part of the target and for the load generator.
    pub cpu_us_per_start: BTreeMap<String, f64>,
}

impl ChatStorm {
    pub fn read(run: &Run, rate_per_s: f64) -> ChatStorm {
        ChatStorm {
            rate_per_s,
            offer: latency(&run.report, "offer"),
            schedule_lag: latency(&run.report, "schedule_lag"),
            errors: n_errors(&run.report),
            violations: n_violations(&run.report),
            loadgen_failed: run.failed_status.clone(),
            cpu_us_per_start: cpu::per_unit_us(&run.cpu_s, count(&run.report, "chats_started")),
        }
    }
}

/// One round of a `license` burst.
#[derive(Debug, Clone, Serialize)]
pub struct LicenseRound {
    pub attempted: u64,
    pub admitted: u64,
    pub refused: u64,
    pub failed: u64,
}

/// A `license` run: bursts of chat starts against a limit.
#[derive(Debug, Clone, Serialize)]
pub struct License {
    pub limit: u64,
    pub rounds: Vec<LicenseRound>,
    pub violations: u64,
    pub loadgen_failed: Option<String>,
}

impl License {
    pub fn read(run: &Run, limit: u64) -> License {
        let rounds = run
            .report
            .license
            .iter()
            .flat_map(|license| &license.rounds)
            .map(|round| LicenseRound {
                attempted: round.attempted,
                admitted: round.admitted,
                refused: round.refused,
                failed: round.failed,
            })
            .collect();
        License { limit, rounds, violations: n_violations(&run.report), loadgen_failed: run.failed_status.clone() }
    }

    /// Every round admitted exactly the limit (or every attempt, when fewer), with nothing failed.
    pub fn exact(&self) -> bool {
        !self.rounds.is_empty()
            && self.rounds.iter().all(|round| round.failed == 0 && round.admitted == round.attempted.min(self.limit))
    }
}
