//! `compare`: the end-to-end comparison of Switchboard with the bare relay (see `switchboard_benches::compare`
//! and benches/README.md). Build the three programs in release first, then run
//!
//! ```text
//! cargo build --release -p switchboard -p switchboard-loadgen -p switchboard-benches
//! cargo run --release -p switchboard-benches --bin compare -- --out target/compare.json
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use switchboard_benches::compare::goals::{self, Verdict};
use switchboard_benches::compare::targets::{self, Configs};
use switchboard_benches::compare::{Bench, Comparison, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "compare",
    about = "Runs the load generator against the bare relay, switchboard serve and a split cluster, and compares"
)]
struct Args {
    #[command(flatten)]
    settings: Settings,
    /// Where `bare-relay`, `switchboard` and `switchboard-loadgen` are (default: this program's directory,
    /// target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The JSON file the figures, ratios and goals are written to.
    #[arg(long, default_value = "target/compare.json")]
    out: PathBuf,
    /// Keep the work directory (configurations, reports, every process's log) instead of deleting it.
    #[arg(long)]
    keep_files: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?.parent().context("the program has no directory")?.to_owned(),
    };
    let work_dir = tempfile::Builder::new().prefix("switchboard-compare-").tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let comparison = runtime.block_on(async {
        let bench = Bench::new(args.settings.clone(), &bin_dir, work_dir.path().to_owned())?;
        println!("compare: work directory {}", work_dir.path().display());
        let configs = Configs::generate(&bench).await?;
        let settings = &bench.settings;
        let relay = if settings.target("relay") { targets::relay(&bench).await } else { Default::default() };
        let serve = if settings.target("serve") { targets::serve(&bench, &configs).await } else { Default::default() };
        let cluster =
            if settings.target("cluster") { targets::cluster(&bench, &configs).await } else { Default::default() };
        let mut goals = goals::judge("serve", &relay, &serve, settings.rate);
        goals.extend(goals::judge("cluster", &relay, &cluster, settings.rate));
        anyhow::Ok(Comparison {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            settings: bench.settings.clone(),
            relay,
            serve,
            cluster,
            goals,
            reports: std::mem::take(
                &mut *bench.loadgen.reports.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            ),
        })
    })?;
    println!();
    println!("{}", goals::table([&comparison.relay, &comparison.serve, &comparison.cluster], comparison.settings.rate));
    let targets = [("bare relay", &comparison.relay), ("serve", &comparison.serve), ("cluster", &comparison.cluster)];
    let cpu = goals::cpu_text(targets, comparison.settings.rate);
    if !cpu.is_empty() {
        println!("{cpu}");
    }
    println!("Goals (one {}-core machine, loopback):", comparison.cores);
    print!("{}", goals::goals_text(&comparison.goals));
    for (name, figures) in
        [("relay", &comparison.relay), ("serve", &comparison.serve), ("cluster", &comparison.cluster)]
    {
        // In full above, as it happened, and in the JSON file.
        for error in &figures.errors {
            println!("error ({name}): {}", error.lines().next().unwrap_or_default());
        }
    }
    if let Some(parent) = args.out.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&comparison)?)?;
    println!("figures written to {}", args.out.display());
    if args.keep_files {
        println!("work directory kept: {}", work_dir.keep().display());
    }
    let failed = comparison.goals.iter().filter(|goal| goal.verdict != Verdict::Pass).count();
    if failed > 0 {
        println!("{failed} goal(s) not met or not measured");
    }
    Ok(())
}
