//! The license limit under a hammer: limit 50, two gateways, 2,000 chat starts fired at once. Exactly 50
//! are admitted and every other start is refused with `license_exhausted`; closing 10 chats admits exactly
//! 10 more; a router killed with -9 while it owns admitted chats leaks no permit and grants none twice.
//!
//! The database is the judge: `license.used`, the permits and the unfinished conversations must agree.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::future::join_all;
use serde_json::{Value, json};
use switchboard_cluster_tests::{Cluster, ClusterSpec, Connection, LicenseState, tenancy};
use switchboard_presence::{Presence, RedisPresence, RedisSettings};

const LIMIT: u64 = 50;

/// One customer connection that tried to start a chat.
struct Start {
    connection: Connection,
    /// The conversation id when admitted, else the error code.
    outcome: Result<String, String>,
}

/// Fires `n` chat starts at once, spread over the gateways, each on its own connection.
async fn fire(urls: &[String], n: usize, tag: &str) -> anyhow::Result<Vec<Start>> {
    let attempts = (0..n).map(|i| {
        let url = urls[i % urls.len()].clone();
        let name = format!("{tag}-{i}");
        async move {
            let mut connection = Connection::connect(&url).await?;
            let fields = json!({
                "widget_key": tenancy::WIDGET_KEY,
                "group": tenancy::GROUP,
                "name": name,
                "question": "is there room for me?",
            });
            let outcome = match connection.request("chat.start", &fields).await? {
                Ok(ack) => Ok(ack["conversation"].as_str().context("an ack without conversation")?.to_owned()),
                Err(error) => Err(error["code"].as_str().unwrap_or("?").to_owned()),
            };
            anyhow::Ok(Start { connection, outcome })
        }
    });
    join_all(attempts).await.into_iter().collect()
}

fn admitted(starts: &[Start]) -> usize {
    starts.iter().filter(|start| start.outcome.is_ok()).count()
}

/// Every refusal is the license's, and says so.
fn refusals_are_license(starts: &[Start]) -> anyhow::Result<()> {
    for start in starts {
        if let Err(code) = &start.outcome
            && code != "license_exhausted"
        {
            bail!("a start was refused with {code}, not license_exhausted");
        }
    }
    Ok(())
}

/// Closes the chats of the first `n` admitted starts (the customer leaves); returns their ids.
async fn close(starts: &mut [Start], n: usize) -> anyhow::Result<Vec<String>> {
    let mut closed = Vec::new();
    for start in starts.iter_mut().filter(|start| start.outcome.is_ok()).take(n) {
        let conversation = start.outcome.clone().unwrap_or_default();
        let answer = start.connection.request("chat.close", &json!({ "conversation": conversation })).await?;
        if let Err(error) = answer {
            bail!("closing {conversation} failed: {error}");
        }
        start.outcome = Err("closed".into());
        closed.push(conversation);
    }
    Ok(closed)
}

fn consistent(license: &LicenseState, sessions: i64) -> bool {
    license.used == sessions
        && license.permits == sessions
        && license.unfinished == sessions
        && license.unfinished_without_permit == 0
        && license.permits_of_finished == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_license_limit_holds_exactly_under_a_hammer_and_a_crash() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::new(&tenancy::config(2));
    spec.license_max_sessions = LIMIT;
    let mut cluster = Cluster::start(spec).await?;
    let urls = cluster.gateway_urls();

    let mut first = fire(&urls, 2_000, "a").await?;
    refusals_are_license(&first)?;
    assert_eq!(admitted(&first), 50, "exactly the limit is admitted");
    let license = cluster.db.license().await?;
    assert!(consistent(&license, 50), "{license:?}");
    assert_eq!(license.max_sessions, 50);

    close(&mut first, 10).await?;
    let license = cluster.db.license().await?;
    assert!(consistent(&license, 40), "closing releases one permit each: {license:?}");
    let second = fire(&urls, 200, "b").await?;
    refusals_are_license(&second)?;
    assert_eq!(admitted(&second), 10, "exactly as many are admitted as were closed");

    // Kill the router that owns the most admitted chats; the others take its shards over.
    let admitted_ids: Vec<String> =
        first.iter().chain(&second).filter_map(|start| start.outcome.clone().ok()).collect();
    let (victim, owned) = cluster.router_owning_most(&admitted_ids).await?;
    assert!(owned > 0);
    cluster.router(&victim)?.kill_9().await?;
    cluster.wait_for_placement(false).await?;
    let license = cluster.db.license().await?;
    assert!(consistent(&license, 50), "no permit leaked or granted twice by the crash: {license:?}");

    // Still full: a burst after the takeover admits nobody; closing 5 (some on the taken-over shards)
    // admits exactly 5.
    let third = fire(&urls, 100, "c").await?;
    refusals_are_license(&third)?;
    assert_eq!(admitted(&third), 0);
    let closed = close_with_retry(&mut first, 5).await?;
    assert_eq!(closed, 5);
    let fourth = fire(&urls, 100, "d").await?;
    refusals_are_license(&fourth)?;
    assert_eq!(admitted(&fourth), 5);
    let license = cluster.db.license().await?;
    assert!(consistent(&license, 50), "{license:?}");
    // Dashboards see the count in Redis (a mirror, refreshed every heartbeat; it decides nothing).
    let presence = RedisPresence::connect(&cluster.redis.url(), RedisSettings::default()).await?;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mirror = presence.license_mirror().await?;
        if mirror.as_ref().is_some_and(|mirror| mirror.used == 50 && mirror.max_sessions == LIMIT) {
            break;
        }
        if tokio::time::Instant::now() >= end {
            bail!("the license mirror in Redis stayed {mirror:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.finish();
    Ok(())
}

/// Closes `n` chats, resending a close refused as retryable (its shard may still be moving).
async fn close_with_retry(starts: &mut [Start], n: usize) -> anyhow::Result<usize> {
    let mut closed = 0;
    for start in starts.iter_mut().filter(|start| start.outcome.is_ok()) {
        if closed == n {
            break;
        }
        let conversation = start.outcome.clone().unwrap_or_default();
        let request = json!({ "conversation": conversation });
        let mut answer: Result<Value, Value> = Err(Value::Null);
        for _ in 0..50 {
            answer = start.connection.request("chat.close", &request).await?;
            match &answer {
                Err(error) if error["retryable"] == true => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => break,
            }
        }
        if let Err(error) = answer {
            bail!("closing {conversation} failed: {error}");
        }
        start.outcome = Err("closed".into());
        closed += 1;
    }
    Ok(closed)
}
