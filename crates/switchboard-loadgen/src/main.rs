//! `switchboard-loadgen`: see the crate's README.

use std::process::ExitCode;

use clap::Parser;
use switchboard_loadgen::cli::Cli;

/// A usage or setup error (clap also exits with 2 on a bad command line).
const SETUP_ERROR: u8 = 2;

/// The same allocator as the servers it measures: the load generator shares their cores.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("switchboard-loadgen: cannot start the runtime: {error}");
            return ExitCode::from(SETUP_ERROR);
        }
    };
    let outcome = runtime.block_on(switchboard_loadgen::runner::run(cli.command));
    // Connections still open are dropped with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("switchboard-loadgen: {error:#}");
            ExitCode::from(SETUP_ERROR)
        }
    }
}
