//! A router is killed with SIGKILL under steady traffic on many conversations: once its leases expire the
//! others take its shards, and every conversation goes on within the lease time and a few seconds. Nothing
//! acknowledged is lost, and the checker passes.

use std::time::Duration;

use switchboard_cluster_tests::{ClusterSpec, Run};
use tokio::time::Instant;

const CHATS: usize = 30;
const PACE: Duration = Duration::from_millis(250);
/// What a takeover may cost on top of the lease: a renewal round, activation, the gateways' placement refresh.
const TAKEOVER_SLACK: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_conversation_goes_on_after_a_router_is_killed() -> anyhow::Result<()> {
    let spec = ClusterSpec::new("");
    let bound = spec.lease.lease() + TAKEOVER_SLACK;
    let mut run = Run::start(spec, CHATS, PACE).await?;
    let (victim, owned) = run.cluster.router_owning_most(&run.conversations).await?;
    eprintln!("killing {victim}, which owns {owned} of {CHATS} conversations");

    let killed_at = Instant::now();
    run.cluster.router(&victim)?.kill_9().await?;
    let worst =
        run.wait_continued("every conversation goes on after the kill", killed_at, Duration::from_secs(40)).await?;
    eprintln!("every conversation had a new message acked within {worst:?} of the kill (bound {bound:?})");
    assert!(worst <= bound, "a conversation went on only {worst:?} after the kill; the bound is {bound:?}");

    let owners = run.cluster.owners(&run.conversations).await?;
    assert!(owners.values().all(|owner| *owner != victim), "the dead router still owns conversations: {owners:?}");
    let outcome = run.finish(true).await?;
    eprintln!("{}", outcome.summary());
    outcome.cluster.finish();
    Ok(())
}
