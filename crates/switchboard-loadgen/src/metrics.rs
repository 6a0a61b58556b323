//! What a run measures, shared by every task of the process: latency histograms (HdrHistogram,
//! microseconds, 3 significant digits), counters, errors by reason and the invariant violations.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::invariants::Violations;

/// Latencies up to an hour are kept exactly (to 3 significant digits); longer ones count as an hour.
const HIGHEST_TRACKABLE_US: u64 = 3_600_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

/// An empty latency histogram in microseconds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_TRACKABLE_US, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Everything one process measures.
#[derive(Debug, Default)]
pub struct Metrics {
    histograms: Mutex<BTreeMap<String, Histogram<u64>>>,
    counts: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    violations: Mutex<Violations>,
    /// Operations completed, for the progress line.
    operations: AtomicU64,
    /// Errors so far, for the progress line.
    error_total: AtomicU64,
}

/// A copy of the measurements at the end of a run.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub histograms: BTreeMap<String, Histogram<u64>>,
    pub counts: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub violations: Violations,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Records the latency from `intended` (the operation's scheduled time) to `done`.
    pub fn record(&self, name: &str, intended: Instant, done: Instant) {
        self.record_duration(name, done.saturating_duration_since(intended));
    }

    pub fn record_duration(&self, name: &str, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let mut histograms = lock(&self.histograms);
        histograms.entry(name.to_owned()).or_insert_with(new_histogram).saturating_record(micros);
    }

    /// Adds `n` to the counter `name`.
    pub fn count(&self, name: &str, n: u64) {
        *lock(&self.counts).entry(name.to_owned()).or_default() += n;
    }

    /// Makes sure the counter `name` appears in the report, even at zero.
    pub fn declare(&self, names: &[&str]) {
        let mut counts = lock(&self.counts);
        for name in names {
            counts.entry((*name).to_owned()).or_default();
        }
    }

    pub fn counter(&self, name: &str) -> u64 {
        lock(&self.counts).get(name).copied().unwrap_or(0)
    }

    /// Counts an error by its reason: a server error code (`unavailable`) or what went wrong on the
    /// client's side (`connection_closed`, `request_timeout`, `connect: connection refused`, …).
    pub fn error(&self, reason: &str) {
        *lock(&self.errors).entry(reason.to_owned()).or_default() += 1;
        self.error_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The errors so far, for a message: `reason × n, …`.
    pub fn error_summary(&self) -> String {
        let errors = lock(&self.errors);
        if errors.is_empty() {
            return "no error recorded".to_owned();
        }
        errors.iter().map(|(reason, n)| format!("{reason} × {n}")).collect::<Vec<_>>().join(", ")
    }

    /// A finished task's output. A task that panicked is counted as an error (`loadgen_task_panicked`, and
    /// the panic is on stderr): what it was measuring is missing from the figures.
    pub fn joined<T>(&self, result: Result<T, tokio::task::JoinError>) -> Option<T> {
        match result {
            Ok(output) => Some(output),
            Err(error) => {
                if error.is_panic() {
                    self.error("loadgen_task_panicked");
                }
                None
            }
        }
    }

    /// A broken invariant (the run's exit code becomes 1).
    pub fn violation(&self, description: String) {
        lock(&self.violations).add(description);
    }

    /// One more operation done, for the progress line.
    pub fn operation(&self) {
        self.operations.fetch_add(1, Ordering::Relaxed);
    }

    /// (operations, errors) so far.
    pub fn progress(&self) -> (u64, u64) {
        (self.operations.load(Ordering::Relaxed), self.error_total.load(Ordering::Relaxed))
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            histograms: lock(&self.histograms).clone(),
            counts: lock(&self.counts).clone(),
            errors: lock(&self.errors).clone(),
            violations: lock(&self.violations).clone(),
        }
    }
}

/// Locks a mutex even when a panicking task poisoned it: the counters stay usable.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_measured_from_the_intended_time() {
        let metrics = Metrics::new();
        let intended = Instant::now();
        metrics.record("message", intended, intended + Duration::from_millis(12));
        metrics.record("message", intended + Duration::from_secs(1), intended); // done before: 0
        metrics.error("unavailable");
        metrics.error("unavailable");
        metrics.count("sent", 3);
        metrics.declare(&["sent", "received"]);
        let snapshot = metrics.snapshot();
        let histogram = &snapshot.histograms["message"];
        assert_eq!(histogram.len(), 2);
        assert_eq!(histogram.min(), 0);
        assert!(histogram.equivalent(histogram.max(), 12_000));
        assert_eq!(snapshot.errors["unavailable"], 2);
        assert_eq!(snapshot.counts["sent"], 3);
        assert_eq!(snapshot.counts["received"], 0);
        assert_eq!(metrics.progress(), (0, 2));
    }
}
