//! The progress line on stderr, rewritten in place about 4 times a second: a bar of the run's planned time
//! (where the scenario's flags plan one), elapsed time, operations, their rate over the last interval, errors
//! (of every process of the run).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cli::Command;
use crate::metrics::Metrics;
use crate::shard::CopyProgress;

/// The bar's width in characters.
const BAR_WIDTH: usize = 24;

pub struct ProgressLine {
    task: JoinHandle<()>,
}

impl ProgressLine {
    /// `planned`: how long the scenario's paced part is planned to take, if it says (see [`planned`]).
    pub fn start(metrics: Arc<Metrics>, copies: Vec<Arc<CopyProgress>>, planned: Option<Duration>) -> ProgressLine {
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
                let line = render(now.duration_since(start), planned, operations, rate, errors);
                let mut stderr = std::io::stderr().lock();
                let _ = write!(stderr, "\r{line} ");
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

/// How long a scenario's paced part is planned to take from its flags (connections, warm-up, the run, the
/// drain), when it says: every scenario but `license`, whose rounds last as long as the server takes.
/// Setting up before it (agents signing in, chats started for `steady`) comes on top.
pub fn planned(command: &Command) -> Option<Duration> {
    let seconds = match command {
        Command::GenConfig(_) | Command::License(_) => return None,
        Command::Idle(args) => args.hold_s,
        Command::Storm(args) => args.connections as f64 / args.rate + args.hold_s,
        Command::Steady(args) => args.warmup_s + args.duration_s + args.drain_s,
        Command::ChatStorm(args) => args.count as f64 / args.rate + args.drain_s,
    };
    Duration::try_from_secs_f64(seconds).ok().filter(|planned| !planned.is_zero())
}

/// One progress line: with a plan, a bar and the percentage of it elapsed (at most 100 %: a run that takes
/// longer than planned shows its time past the plan), then the figures.
pub fn render(elapsed: Duration, planned: Option<Duration>, operations: u64, rate: f64, errors: u64) -> String {
    let seconds = elapsed.as_secs_f64();
    let figures = format!("{operations:>10} ops  {rate:>9.0}/s  {errors:>7} errors");
    let Some(planned) = planned else {
        return format!("{seconds:7.1} s  {figures}");
    };
    let done = (seconds / planned.as_secs_f64()).clamp(0.0, 1.0);
    let filled = ((done * BAR_WIDTH as f64).floor() as usize).min(BAR_WIDTH);
    let bar = format!("{}{}", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled));
    let percent = done * 100.0;
    format!("[{bar}] {percent:3.0}%  {seconds:7.1} / {:.0} s  {figures}", planned.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn command(line: &str) -> Command {
        Cli::try_parse_from(line.split_whitespace()).unwrap().command
    }

    #[test]
    fn the_plan_comes_from_the_scenarios_flags() {
        let url = "--url ws://127.0.0.1:1/v1/ws";
        let steady = command(&format!("lg steady {url} --pairs 2 --rate 10 --duration-s 30 --warmup-s 5 --drain-s 2"));
        assert_eq!(planned(&steady), Some(Duration::from_secs(37)));
        let storm = command(&format!("lg chat-storm {url} --rate 500 --count 2500 --drain-s 3"));
        assert_eq!(planned(&storm), Some(Duration::from_secs(8)));
        let connections = command(&format!("lg storm {url} --connections 1000 --rate 100 --hold-s 2"));
        assert_eq!(planned(&connections), Some(Duration::from_secs(12)));
        assert_eq!(planned(&command(&format!("lg idle {url} --sessions 10 --hold-s 4"))), Some(Duration::from_secs(4)));
        assert_eq!(planned(&command(&format!("lg license {url} --limit 5 --burst 50"))), None);
    }

    #[test]
    fn the_bar_fills_with_the_planned_time_and_stops_full() {
        let plan = Some(Duration::from_secs(40));
        let line = render(Duration::from_secs(10), plan, 1234, 99.6, 2);
        assert!(line.starts_with(&format!("[{}{}]  25%", "#".repeat(6), ".".repeat(18))), "{line}");
        assert!(line.contains("10.0 / 40 s") && line.contains("1234 ops") && line.contains("100/s"), "{line}");
        assert!(line.ends_with("2 errors"), "{line}");
        let over = render(Duration::from_secs(50), plan, 0, 0.0, 0);
        assert!(over.starts_with(&format!("[{}] 100%", "#".repeat(BAR_WIDTH))) && over.contains("50.0 / 40 s"));
        let unplanned = render(Duration::from_millis(2500), None, 7, 3.0, 0);
        assert!(unplanned.starts_with("    2.5 s") && !unplanned.contains('['), "{unplanned}");
    }
}
