//! The progress line on stderr, rewritten in place about 4 times a second: elapsed time, operations,
//! their rate over the last interval, errors (of every process of the run).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::shard::CopyProgress;

pub struct ProgressLine {
    task: JoinHandle<()>,
}

impl ProgressLine {
    pub fn start(metrics: Arc<Metrics>, copies: Vec<Arc<CopyProgress>>) -> ProgressLine {
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let (mut last_operations, mut last_at) = (0, start);
            loop {
                tick.tick().await;
                let (mut operations, mut errors) = metrics.progress();
                for copy in &copies {
                    operations += copy.operations.load(Ordering::Relaxed);
                    errors += copy.errors.load(Ordering::Relaxed);
                }
                let now = Instant::now();
                let interval = now.duration_since(last_at).as_secs_f64();
                let rate =
                    if interval > 0.0 { operations.saturating_sub(last_operations) as f64 / interval } else { 0.0 };
                (last_operations, last_at) = (operations, now);
                let elapsed = now.duration_since(start).as_secs_f64();
                let mut stderr = std::io::stderr().lock();
                let _ = write!(stderr, "\r{elapsed:7.1} s  {operations:>10} ops  {rate:>9.0}/s  {errors:>7} errors ");
                let _ = stderr.flush();
            }
        });
        ProgressLine { task }
    }

    /// Stops it and ends the line.
    pub fn stop(self) {
        self.task.abort();
        eprintln!();
    }
}
