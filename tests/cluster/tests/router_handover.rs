//! A router is stopped with SIGTERM under traffic: it hands its shards over before it exits. Every client
//! operation succeeds in the end, no client ever sees a non-retryable error, and no operation is unavailable
//! (from its first failed try to its success) for a second or more.

use std::time::Duration;

use switchboard_cluster_tests::{ClusterSpec, Run};
use tokio::time::Instant;

const CHATS: usize = 20;
const PACE: Duration = Duration::from_millis(100);
/// The bound the issue sets on the unavailability a graceful handover may cause, per operation.
const UNAVAILABILITY_BOUND: Duration = Duration::from_secs(1);
/// The gateway may hold a request while its shard moves instead of failing it (the client then sees no
/// failed try, only a slow answer): a request held for more than twice the bound would be a stall, not a
/// handover. The figure is reported either way.
const HELD_REQUEST_BOUND: Duration = Duration::from_secs(1);
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_stopped_gracefully_hands_over_without_visible_unavailability() -> anyhow::Result<()> {
    let mut run = Run::start(ClusterSpec::new(""), CHATS, PACE).await?;
    let (victim, owned) = run.cluster.router_owning_most(&run.conversations).await?;
    eprintln!("stopping {victim} (SIGTERM), which owns {owned} of {CHATS} conversations");

    let stopped_at = Instant::now();
    let status = run.cluster.router(&victim)?.sigterm(EXIT_DEADLINE).await?;
    let exit_took = stopped_at.elapsed();
    assert!(status.success(), "{victim} exited with {status} after SIGTERM");
    let exited_at = Instant::now();
    // Its shards were handed over, not left to expire: the others hold every shard well within a lease of
    // its exit (an expired lease frees a shard up to a whole lease after the last renewal).
    let live = run.cluster.live_routers();
    run.cluster
        .poll_db("every shard is owned by the remaining routers", Duration::from_secs(30), async |db| {
            Ok(db.placement().await?.unowned(&live).is_empty().then_some(()))
        })
        .await?;
    let placed_after_exit = exited_at.elapsed();
    let handover_bound = run.cluster.spec.lease.lease() / 2;
    eprintln!("every shard was owned again {placed_after_exit:?} after the exit (bound {handover_bound:?})");
    assert!(
        placed_after_exit < handover_bound,
        "the shards were owned again only {placed_after_exit:?} after the exit: not handed over?"
    );
    let worst_after_exit =
        run.wait_continued("every conversation goes on after the handover", exited_at, Duration::from_secs(30)).await?;

    let outcome = run.finish(true).await?;
    // Unavailability as the issue defines it (first failed try to success), and the whole wait of an
    // operation, failed tries or not: a gateway that holds a request while the shard moves hides the failure
    // from the client but not the wait. Both are measured with tokio's clock, never waited for.
    let worst = outcome.logs.worst_unavailability().cloned();
    let worst_unavailability = worst.as_ref().map(|op| op.unavailability()).unwrap_or_default();
    let slowest = outcome.logs.slowest().cloned();
    let slowest_latency = slowest.as_ref().map(|op| op.latency()).unwrap_or_default();
    let slowest_started = slowest.as_ref().map(|op| {
        let after = op.started.saturating_duration_since(stopped_at);
        let before = stopped_at.saturating_duration_since(op.started);
        if after.is_zero() { format!("{before:?} before SIGTERM") } else { format!("{after:?} after SIGTERM") }
    });
    eprintln!(
        "{victim} exited {exit_took:?} after SIGTERM; conversations went on within {worst_after_exit:?} of its exit\n\
         measured longest unavailability (first failed try to success): {worst_unavailability:?} (bound {UNAVAILABILITY_BOUND:?}): {worst:?}\n\
         measured slowest operation (first try to success): {slowest_latency:?}, started {slowest_started:?} (bound {HELD_REQUEST_BOUND:?}): {slowest:?}"
    );
    eprintln!("{}", outcome.summary());
    assert!(
        worst_unavailability < UNAVAILABILITY_BOUND,
        "an operation was unavailable for {worst_unavailability:?}: {worst:?}"
    );
    assert!(
        slowest_latency < HELD_REQUEST_BOUND,
        "an operation took {slowest_latency:?} (started {slowest_started:?}): {slowest:?}"
    );
    outcome.cluster.finish();
    Ok(())
}
