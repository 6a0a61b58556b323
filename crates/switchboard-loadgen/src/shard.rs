//! `--processes N`: the first process spawns N−1 copies of itself (`--shard i/N`), each doing its share of
//! the load, and merges their reports into one.
//!
//! The copies talk to the first process over their stdin and stdout, one line at a time:
//! - `progress OPS ERRORS` (copy → first), about 4 times a second, for the progress line;
//! - `arrive NAME` (copy → first) and `go NAME` (first → copy): a barrier, so that every process starts a
//!   phase (the burst of a license round, the start of the open-loop schedule) at the same moment.
//!
//! Each copy writes its report (with its raw histograms) to the file `--shard-report` names.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Mutex, mpsc};

use crate::metrics::Metrics;
use crate::report::Report;

/// Which part of the load this process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// This process's share of `total` (the first `total % count` processes do one more).
    pub fn share(&self, total: u64) -> u64 {
        let count = u64::from(self.count);
        total / count + u64::from(u64::from(self.index) < total % count)
    }

    /// The numbers of `0..total` this process takes: every `count`-th, from `index`.
    pub fn pick(&self, total: u32) -> Vec<u32> {
        (0..total).filter(|n| n % self.count == self.index).collect()
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Shard, String> {
        let parsed = text.split_once('/').and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(format!("expected INDEX/COUNT with INDEX < COUNT, not {text}")),
        }
    }
}

/// The copies of this process, seen from the first one.
struct CopyProcess {
    child: Child,
    stdin: ChildStdin,
    report: PathBuf,
}

/// How the processes of one run wait for each other.
pub struct Coordinator {
    kind: Kind,
}

enum Kind {
    /// A run of one process.
    Alone,
    /// The first process of a `--processes` run.
    First {
        copies: Vec<CopyProcess>,
        arrivals: Mutex<mpsc::UnboundedReceiver<Option<String>>>,
        progress: Vec<Arc<CopyProgress>>,
    },
    /// A copy (`--shard i/N`).
    Copy { stdin: Mutex<Lines<BufReader<tokio::io::Stdin>>> },
}

/// The latest progress line of a copy.
#[derive(Debug, Default)]
pub struct CopyProgress {
    pub operations: AtomicU64,
    pub errors: AtomicU64,
}

impl Coordinator {
    /// Spawns `count − 1` copies of this process with the same arguments and `--shard i/count`.
    pub fn spawn_copies(count: u32, run_id: &str, report_dir: &Path) -> anyhow::Result<Coordinator> {
        let exe = std::env::current_exe().context("cannot find the load generator's own executable")?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let (arrivals_tx, arrivals_rx) = mpsc::unbounded_channel();
        let mut copies = Vec::new();
        let mut progress = Vec::new();
        for index in 1..count {
            let report = report_dir.join(format!("shard-{index}.json"));
            let mut child = Command::new(&exe)
                .args(&args)
                .arg("--shard")
                .arg(format!("{index}/{count}"))
                .arg("--shard-report")
                .arg(&report)
                .arg("--run-id")
                .arg(run_id)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a copy of the load generator")?;
            let stdin = child.stdin.take().context("a copy without stdin")?;
            let stdout = child.stdout.take().context("a copy without stdout")?;
            let copy_progress = Arc::new(CopyProgress::default());
            tokio::spawn(read_copy(stdout, copy_progress.clone(), arrivals_tx.clone()));
            progress.push(copy_progress);
            copies.push(CopyProcess { child, stdin, report });
        }
        Ok(Coordinator { kind: Kind::First { copies, arrivals: Mutex::new(arrivals_rx), progress } })
    }

    /// A copy's side: barriers over stdin and stdout.
    pub fn copy() -> Coordinator {
        Coordinator { kind: Kind::Copy { stdin: Mutex::new(BufReader::new(tokio::io::stdin()).lines()) } }
    }

    /// A run of one process.
    pub fn alone() -> Coordinator {
        Coordinator { kind: Kind::Alone }
    }

    /// Whether this process measures the server's memory (the first one does).
    pub fn is_first(&self) -> bool {
        !matches!(self.kind, Kind::Copy { .. })
    }

    /// The copies' progress, for the first process's progress line.
    pub fn copies_progress(&self) -> Vec<Arc<CopyProgress>> {
        match &self.kind {
            Kind::First { progress, .. } => progress.clone(),
            _ => Vec::new(),
        }
    }

    /// Waits until every process has reached the barrier `name`. The first process returns once all
    /// copies have arrived (it may then do something alone) and must call [`Coordinator::release`]; a copy
    /// returns once released.
    pub async fn gather(&self, name: &str) -> anyhow::Result<()> {
        match &self.kind {
            Kind::Alone => Ok(()),
            Kind::First { copies, arrivals, .. } => {
                let mut arrivals = arrivals.lock().await;
                for _ in 0..copies.len() {
                    match arrivals.recv().await.flatten() {
                        Some(arrived) if arrived == name => {}
                        Some(arrived) => bail!("a copy reached barrier {arrived} while waiting for {name}"),
                        None => bail!("a copy of the load generator stopped before {name} (see its errors above)"),
                    }
                }
                Ok(())
            }
            Kind::Copy { stdin } => {
                say_to_first(&format!("arrive {name}"));
                match stdin.lock().await.next_line().await? {
                    Some(line) if line == format!("go {name}") => Ok(()),
                    Some(line) => bail!("expected go {name} from the first process, got {line}"),
                    None => bail!("the first process went away"),
                }
            }
        }
    }

    /// Lets the copies waiting at `name` go on.
    pub async fn release(&mut self, name: &str) -> anyhow::Result<()> {
        if let Kind::First { copies, .. } = &mut self.kind {
            for copy in copies {
                copy.stdin.write_all(format!("go {name}\n").as_bytes()).await?;
                copy.stdin.flush().await?;
            }
        }
        Ok(())
    }

    /// `gather` then `release`: every process goes on together.
    pub async fn barrier(&mut self, name: &str) -> anyhow::Result<()> {
        self.gather(name).await?;
        self.release(name).await
    }

    /// The first process: waits for every copy to end and reads their reports.
    pub async fn collect(self) -> anyhow::Result<Vec<Report>> {
        let Kind::First { copies, .. } = self.kind else { return Ok(Vec::new()) };
        let mut reports = Vec::new();
        for mut copy in copies {
            drop(copy.stdin);
            let status = copy.child.wait().await?;
            if !status.success() {
                bail!("a copy of the load generator failed ({status}); see its errors above");
            }
            let text = tokio::fs::read_to_string(&copy.report)
                .await
                .with_context(|| format!("cannot read the report of a copy ({})", copy.report.display()))?;
            reports.push(serde_json::from_str(&text).context("a copy wrote an unreadable report")?);
        }
        Ok(reports)
    }
}

async fn read_copy(stdout: ChildStdout, progress: Arc<CopyProgress>, arrivals: mpsc::UnboundedSender<Option<String>>) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(name) = line.strip_prefix("arrive ") {
            let _ = arrivals.send(Some(name.to_owned()));
        } else if let Some(figures) = line.strip_prefix("progress ") {
            let mut numbers = figures.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
            progress.operations.store(numbers.next().unwrap_or(0), Ordering::Relaxed);
            progress.errors.store(numbers.next().unwrap_or(0), Ordering::Relaxed);
        }
    }
    // The copy ended: whoever waits at a barrier must not wait forever.
    let _ = arrivals.send(None);
}

/// One line to the first process (a write error means it is gone: the next barrier fails then).
fn say_to_first(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// A copy's progress lines on stdout, for the first process.
pub async fn report_progress_to_first(metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let (operations, errors) = metrics.progress();
        say_to_first(&format!("progress {operations} {errors}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total() {
        for count in 1..6 {
            for total in [0, 1, 7, 100, 1001] {
                let sum: u64 = (0..count).map(|index| Shard { index, count }.share(total)).sum();
                assert_eq!(sum, total);
            }
        }
        assert_eq!(Shard { index: 1, count: 3 }.pick(8), vec![1, 4, 7]);
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert!("4/4".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
