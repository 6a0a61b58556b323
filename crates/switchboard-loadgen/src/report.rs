//! The JSON report of a run (its schema is documented in the crate's README), the merge of the reports of
//! several processes, and the invariants only the merged figures can check.

use std::collections::{BTreeMap, HashMap};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::invariants::{LicenseRound, Violations, license_round_violations};
use crate::metrics::{Snapshot, new_histogram};

/// A run's report: what `--report FILE.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub processes: u32,
    pub duration_s: f64,
    pub throughput_per_s: f64,
    pub counts: BTreeMap<String, u64>,
    pub latency_us: BTreeMap<String, LatencySummary>,
    pub errors_by_reason: BTreeMap<String, u64>,
    pub invariants: InvariantsReport,
    /// The scenario's settings, as given on the command line (before sharing the load out).
    #[serde(default)]
    pub parameters: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<LicenseSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_storm: Option<ChatStormSection>,
    /// The raw histograms, `[value_us, count]` per recorded bucket: only in the reports the processes of a
    /// `--processes` run hand to the first one, which merges them exactly.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub histograms: BTreeMap<String, Vec<[u64; 2]>>,
}

/// One latency, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InvariantsReport {
    pub ok: bool,
    /// The first 50 violations.
    pub violations: Vec<String>,
    pub violations_total: u64,
    /// What the checks assume of the cluster when the run starts.
    #[serde(default)]
    pub preconditions: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LicenseSection {
    pub limit: u64,
    pub rounds: Vec<LicenseRound>,
}

/// Memory: the server's resident set (`VmRSS` of `--server-pid`) and this load generator's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemorySection {
    pub server_pid: Option<u32>,
    /// Before the first session opened.
    pub server_rss_before_kb: Option<u64>,
    /// Once every session is open.
    pub server_rss_opened_kb: Option<u64>,
    /// At the end of the hold, before the sessions close.
    pub server_rss_after_kb: Option<u64>,
    /// (rss_after − rss_before) / sessions open.
    pub server_bytes_per_session: Option<f64>,
    /// The load generator's own resident set, summed over its processes, with the sessions open.
    pub loadgen_rss_kb: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatStormSection {
    pub routing: String,
    /// The last accept minus the last start (the largest of the processes').
    pub queue_drain_ms: Option<f64>,
    /// The chats the agents of each process won, one list per process (a copy's report carries its own):
    /// a chat in two lists was accepted twice. Not in the report written at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub won: Vec<Vec<String>>,
}

impl Report {
    /// A report of this process's measurements.
    pub fn new(scenario: &str, parameters: serde_json::Value, snapshot: Snapshot, duration_s: f64, ops: u64) -> Report {
        let histograms: BTreeMap<String, Vec<[u64; 2]>> =
            snapshot.histograms.iter().map(|(name, histogram)| (name.clone(), raw(histogram))).collect();
        let mut report = Report {
            scenario: scenario.to_owned(),
            processes: 1,
            duration_s,
            throughput_per_s: if duration_s > 0.0 { ops as f64 / duration_s } else { 0.0 },
            counts: snapshot.counts,
            latency_us: snapshot.histograms.iter().map(|(name, h)| (name.clone(), summarize(h))).collect(),
            errors_by_reason: snapshot.errors,
            parameters,
            histograms,
            ..Report::default()
        };
        report.set_violations(snapshot.violations);
        report
    }

    pub fn violations(&self) -> Violations {
        Violations { total: self.invariants.violations_total, first: self.invariants.violations.clone() }
    }

    pub fn set_violations(&mut self, violations: Violations) {
        self.invariants.ok = violations.total == 0;
        self.invariants.violations_total = violations.total;
        self.invariants.violations = violations.first;
    }

    pub fn add_violation(&mut self, description: String) {
        let mut violations = self.violations();
        violations.add(description);
        self.set_violations(violations);
    }

    pub fn count(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }
}

/// `[value, count]` per recorded bucket: re-recording them gives the same histogram.
fn raw(histogram: &Histogram<u64>) -> Vec<[u64; 2]> {
    histogram.iter_recorded().map(|bucket| [bucket.value_iterated_to(), bucket.count_at_value()]).collect()
}

pub fn summarize(histogram: &Histogram<u64>) -> LatencySummary {
    LatencySummary {
        count: histogram.len(),
        p50: histogram.value_at_quantile(0.50),
        p90: histogram.value_at_quantile(0.90),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        max: histogram.max(),
        mean: (histogram.mean() * 10.0).round() / 10.0,
    }
}

/// Merges the reports of the processes of one run (the first one's settings and server memory are kept):
/// histograms merged exactly, counts and errors summed, throughputs added.
pub fn merge(reports: Vec<Report>) -> Report {
    let mut reports = reports.into_iter();
    let Some(mut merged) = reports.next() else { return Report::default() };
    let mut histograms: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    let mut violations = merged.violations();
    add_histograms(&mut histograms, &merged.histograms);
    for report in reports {
        merged.processes += report.processes;
        merged.duration_s = merged.duration_s.max(report.duration_s);
        merged.throughput_per_s += report.throughput_per_s;
        add_counts(&mut merged.counts, &report.counts);
        add_counts(&mut merged.errors_by_reason, &report.errors_by_reason);
        add_histograms(&mut histograms, &report.histograms);
        violations.merge(&report.violations());
        for precondition in report.invariants.preconditions {
            if !merged.invariants.preconditions.contains(&precondition) {
                merged.invariants.preconditions.push(precondition);
            }
        }
        if let (Some(section), Some(other)) = (merged.license.as_mut(), report.license) {
            for round in other.rounds {
                match section.rounds.iter_mut().find(|mine| mine.round == round.round) {
                    Some(mine) => {
                        mine.attempted += round.attempted;
                        mine.admitted += round.admitted;
                        mine.refused += round.refused;
                        mine.failed += round.failed;
                        mine.closed += round.closed;
                        mine.close_refused += round.close_refused;
                        mine.abandoned += round.abandoned;
                        mine.not_abandoned += round.not_abandoned;
                        mine.open_before += round.open_before;
                        mine.failed_before += round.failed_before;
                    }
                    None => section.rounds.push(round),
                }
            }
        }
        if let (Some(memory), Some(other)) = (merged.memory.as_mut(), report.memory) {
            memory.loadgen_rss_kb = match (memory.loadgen_rss_kb, other.loadgen_rss_kb) {
                (Some(mine), Some(theirs)) => Some(mine + theirs),
                (mine, theirs) => mine.or(theirs),
            };
        }
        if let (Some(section), Some(other)) = (merged.chat_storm.as_mut(), report.chat_storm) {
            section.queue_drain_ms = match (section.queue_drain_ms, other.queue_drain_ms) {
                (Some(mine), Some(theirs)) => Some(mine.max(theirs)),
                (mine, theirs) => mine.or(theirs),
            };
            section.won.extend(other.won);
        }
    }
    merged.latency_us = histograms.iter().map(|(name, histogram)| (name.clone(), summarize(histogram))).collect();
    merged.histograms = histograms.iter().map(|(name, histogram)| (name.clone(), raw(histogram))).collect();
    merged.set_violations(violations);
    merged
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (name, n) in from {
        *into.entry(name.clone()).or_default() += n;
    }
}

fn add_histograms(into: &mut BTreeMap<String, Histogram<u64>>, from: &BTreeMap<String, Vec<[u64; 2]>>) {
    for (name, buckets) in from {
        let histogram = into.entry(name.clone()).or_insert_with(new_histogram);
        for [value, count] in buckets {
            // Values come from the same bounds; a saturated one is recorded at the highest trackable value.
            if histogram.record_n(*value, *count).is_err() {
                let highest = histogram.high();
                let _ = histogram.record_n(highest, *count);
            }
        }
    }
}

/// The invariants of the whole run, checked on the merged figures (also with a single process).
pub fn check_merged(report: &mut Report) {
    match report.scenario.as_str() {
        "license" => {
            let Some(section) = report.license.clone() else { return };
            for round in &section.rounds {
                for violation in license_round_violations(section.limit, round) {
                    report.add_violation(violation);
                }
            }
        }
        "chat-storm" => {
            // Within a process the ledger saw a chat won twice as it happened; across processes, here.
            let won = report.chat_storm.as_mut().map(|section| std::mem::take(&mut section.won)).unwrap_or_default();
            let mut winners: HashMap<&str, usize> = HashMap::new();
            for (process, conversations) in won.iter().enumerate() {
                for conversation in conversations {
                    match winners.insert(conversation, process) {
                        Some(other) if other != process => report.add_violation(format!(
                            "conversation {conversation}: chat.accept acked to agents of processes {} and {}",
                            other + 1,
                            process + 1
                        )),
                        _ => {}
                    }
                }
            }
        }
        "idle" => {
            let sessions = report.count("sessions_open");
            if let Some(memory) = report.memory.as_mut()
                && let (Some(before), Some(after)) = (memory.server_rss_before_kb, memory.server_rss_after_kb)
                && sessions > 0
            {
                memory.server_bytes_per_session = Some((after as f64 - before as f64) * 1024.0 / sessions as f64);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
