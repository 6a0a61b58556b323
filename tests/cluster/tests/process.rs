//! The harness's process control, on a stand-in program that follows the roles' contract (ready line,
//! `--listen`): signals, liveness, logs, and a restart on the same address.

use std::path::PathBuf;
use std::time::Duration;

use switchboard_cluster_tests::{Process, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_is_stopped_resumed_killed_and_restarted_on_its_address() -> anyhow::Result<()> {
    let logs = tempfile::tempdir()?;
    let program = PathBuf::from(env!("CARGO_BIN_EXE_fake-switchboard"));
    let args = vec!["--database-url".to_owned(), "postgres://nowhere".to_owned()];
    let mut store = Process::start_program(program, Role::Store, "store-0", args, logs.path()).await?;
    let address = store.address().to_owned();
    assert!(address.starts_with("127.0.0.1:") && !address.ends_with(":0"), "{address}");
    assert_eq!(store.http_url(), format!("http://{address}"));
    assert!(store.is_live());

    store.sigstop().await?;
    assert!(store.is_running() && !store.is_live() && store.is_paused());
    store.sigcont().await?;
    assert!(store.is_live());

    store.kill_9().await?;
    assert!(!store.is_running());
    store.restart().await?;
    assert_eq!(store.address(), address, "a restart reuses the address");
    assert!(store.is_live());
    // A restart of a running process kills it first.
    store.restart().await?;
    assert_eq!(store.address(), address);

    let status = store.sigterm(Duration::from_secs(10)).await?;
    assert!(!status.success(), "the stand-in does not handle SIGTERM: it dies of it");
    assert!(!store.is_running());

    let log = store.log();
    assert_eq!(log.matches("fake store started").count(), 3, "{log}");
    assert_eq!(log.matches("=== store store-0: start #").count(), 3, "{log}");
    assert!(log.contains("--database-url"), "{log}");
    Ok(())
}
