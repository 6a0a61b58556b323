//! The figures the comparison reads from the load generator's reports (`{"scenario","throughput_per_s",
//! "counts","latency_us","errors_by_reason","invariants","memory","license"}`), one struct per scenario.
//! Reading is lenient: a missing figure is `None`, not an error, so that one odd report does not lose a
//! whole comparison.

use serde::Serialize;
use serde_json::Value;

use crate::compare::loadgen::Run;

/// A latency, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

pub fn latency(report: &Value, name: &str) -> Option<Latency> {
    let summary = report.get("latency_us")?.get(name)?;
    let field = |key: &str| summary.get(key).and_then(Value::as_u64).unwrap_or(0);
    Some(Latency {
        count: field("count"),
        p50: field("p50"),
        p90: field("p90"),
        p99: field("p99"),
        p999: field("p999"),
        max: field("max"),
        mean: summary.get("mean").and_then(Value::as_f64).unwrap_or(0.0),
    })
}

/// Every error the load generator counted, whatever its reason.
pub fn n_errors(report: &Value) -> u64 {
    report
        .get("errors_by_reason")
        .and_then(Value::as_object)
        .map_or(0, |reasons| reasons.values().filter_map(Value::as_u64).sum())
}

pub fn n_violations(report: &Value) -> u64 {
    let invariants = report.get("invariants");
    let total = invariants.and_then(|invariants| invariants.get("violations_total")).and_then(Value::as_u64);
    let listed = invariants.and_then(|invariants| invariants.get("violations")).and_then(Value::as_array).map(Vec::len);
    total.unwrap_or(listed.unwrap_or(0) as u64)
}

pub fn throughput(report: &Value) -> f64 {
    report.get("throughput_per_s").and_then(Value::as_f64).unwrap_or(0.0)
}

pub fn count(report: &Value, name: &str) -> Option<u64> {
    report.get("counts")?.get(name)?.as_u64()
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
}

impl Steady {
    pub fn read(run: &Run, target_per_s: f64) -> Steady {
        Steady {
            target_per_s,
            achieved_per_s: throughput(&run.report),
            message: latency(&run.report, "message"),
            ack: latency(&run.report, "ack"),
            errors: n_errors(&run.report),
            violations: n_violations(&run.report),
            loadgen_failed: run.failed_status.clone(),
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
        let sessions = count(&run.report, "sessions_open").unwrap_or(sessions_asked);
        let grown_kb = run.rss_peak_kb.saturating_sub(run.rss_before_kb);
        let memory = run.report.get("memory");
        Idle {
            sessions,
            bytes_per_session: (sessions > 0).then(|| grown_kb as f64 * 1024.0 / sessions as f64),
            loadgen_bytes_per_session: memory
                .and_then(|memory| memory.get("server_bytes_per_session"))
                .and_then(Value::as_f64),
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
    pub errors: u64,
    pub violations: u64,
    pub loadgen_failed: Option<String>,
}

impl ChatStorm {
    pub fn read(run: &Run, rate_per_s: f64) -> ChatStorm {
        ChatStorm {
            rate_per_s,
            offer: latency(&run.report, "offer"),
            errors: n_errors(&run.report),
            violations: n_violations(&run.report),
            loadgen_failed: run.failed_status.clone(),
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
            .get("license")
            .and_then(|license| license.get("rounds"))
            .and_then(Value::as_array)
            .map(|rounds| {
                rounds
                    .iter()
                    .map(|round| {
                        let field = |key: &str| round.get(key).and_then(Value::as_u64).unwrap_or(0);
                        LicenseRound {
                            attempted: field("attempted"),
                            admitted: field("admitted"),
                            refused: field("refused"),
                            failed: field("failed"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        License { limit, rounds, violations: n_violations(&run.report), loadgen_failed: run.failed_status.clone() }
    }

    /// Every round admitted exactly the limit (or every attempt, when fewer), with nothing failed.
    pub fn exact(&self) -> bool {
        !self.rounds.is_empty()
            && self.rounds.iter().all(|round| round.failed == 0 && round.admitted == round.attempted.min(self.limit))
    }
}
