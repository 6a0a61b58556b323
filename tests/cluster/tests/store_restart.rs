//! The store process, then PostgreSQL itself, are restarted under traffic: clients get retryable errors
//! meanwhile and retry, and nothing acknowledged is lost (checker).

use std::time::Duration;

use switchboard_cluster_tests::{ClusterSpec, Run};
use tokio::time::Instant;

const CHATS: usize = 12;
const PACE: Duration = Duration::from_millis(200);
const RECOVERY_DEADLINE: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_the_store_and_of_postgres_lose_nothing_acknowledged() -> anyhow::Result<()> {
    let mut run = Run::start(ClusterSpec::new(""), CHATS, PACE).await?;

    // The store process dies (SIGKILL) and comes back on the same address.
    let store_address = run.cluster.stores[0].address().to_owned();
    let restarted_at = Instant::now();
    run.cluster.stores[0].restart().await?;
    assert_eq!(run.cluster.stores[0].address(), store_address, "the store came back on another address");
    let store_down = restarted_at.elapsed();
    let after_store = run
        .wait_continued("every conversation goes on after the store restart", restarted_at, RECOVERY_DEADLINE)
        .await?;
    let retried_after_store = run.log.read(|data| data.retried().filter(|op| op.finished >= restarted_at).count());
    eprintln!(
        "store restarted in {store_down:?}; every conversation went on within {after_store:?}; \
         {retried_after_store} operations retried"
    );

    // PostgreSQL stops (fast: connections dropped) and starts again with the same data.
    let pg_restarted_at = Instant::now();
    run.cluster.pg_restart().await?;
    let pg_down = pg_restarted_at.elapsed();
    let after_pg = run
        .wait_continued("every conversation goes on after the PostgreSQL restart", pg_restarted_at, RECOVERY_DEADLINE)
        .await?;
    let retried_after_pg = run.log.read(|data| data.retried().filter(|op| op.finished >= pg_restarted_at).count());
    let errors: Vec<String> =
        run.log.read(|data| data.retried().flat_map(|op| op.errors.iter().cloned()).take(10).collect());
    eprintln!(
        "PostgreSQL restarted in {pg_down:?}; every conversation went on within {after_pg:?}; \
         {retried_after_pg} operations retried; some errors seen: {errors:#?}"
    );

    let outcome = run.finish(true).await?;
    eprintln!("{}", outcome.summary());
    outcome.cluster.finish();
    Ok(())
}
