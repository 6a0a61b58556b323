//! A Redis outage: calls fail fast with `Unavailable` while the server is down, and the same `RedisPresence`
//! (commands and change stream) works again once it is back on the same port.

use std::time::Duration;

use switchboard_domain::{AgentId, AgentStatus, GroupId, TenantId};
use switchboard_presence::{GroupStatus, Presence, PresenceChange, PresenceError, RedisPresence, RedisSettings};
use switchboard_testservices::Redis;
use tokio::sync::broadcast;

/// How long Redis may take to be usable again after it restarted before the test fails.
const RECOVERY: Duration = Duration::from_secs(20);
/// The pause between two attempts while polling for recovery.
const POLL: Duration = Duration::from_millis(50);

fn tenant() -> TenantId {
    TenantId::new("acme").expect("valid id")
}

fn agent(id: &str) -> AgentId {
    AgentId::new(id).expect("valid id")
}

fn is_unavailable<T: std::fmt::Debug>(result: Result<T, PresenceError>) -> bool {
    matches!(result, Err(PresenceError::Unavailable(_)))
}

/// Polls until `agent` has a new session recorded *and* its change arrives on `changes`, within [`RECOVERY`].
/// Each attempt uses a new session id, so that each successful write publishes.
async fn wait_until_changes_flow(
    presence: &RedisPresence,
    changes: &mut broadcast::Receiver<PresenceChange>,
    agent: &AgentId,
) {
    let expected = PresenceChange::Session { tenant: tenant(), agent: agent.clone(), up: true };
    let attempts = RECOVERY.as_millis() / POLL.as_millis();
    for attempt in 0..attempts {
        if presence.session_alive(&tenant(), agent, &format!("s{attempt}"), "gw1", i64::MAX / 2).await.is_ok() {
            // The write worked; its change arrives unless the stream is not subscribed again yet.
            loop {
                match tokio::time::timeout(POLL, changes.recv()).await {
                    Ok(Ok(change)) if change == expected => return,
                    Ok(Ok(_other)) => continue,
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    Ok(Err(broadcast::error::RecvError::Closed)) => panic!("the change stream closed"),
                    Err(_) => break,
                }
            }
        } else {
            tokio::time::sleep(POLL).await;
        }
    }
    panic!("changes did not flow again within {RECOVERY:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_fast_and_the_same_instance_recovers() {
    let server = Redis::start().expect("redis-server");
    let presence = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    let mut changes = presence.changes();
    let sales = GroupId::new("sales").expect("valid id");

    // Before: everything works.
    wait_until_changes_flow(&presence, &mut changes, &agent("before")).await;
    presence
        .signed_in(&tenant(), &agent("ann"), AgentStatus::Online, std::slice::from_ref(&sales), i64::MAX / 2)
        .await
        .expect("sign in");

    // Down: every kind of call fails with Unavailable (the operation timeout bounds each one to about a second;
    // a refused connection fails at once).
    server.stop().expect("stop redis");
    let status = GroupStatus::new(tenant(), sales.clone(), true, 1, 0);
    for _ in 0..3 {
        assert!(is_unavailable(presence.agents_present(&[(tenant(), agent("ann"))], 0).await));
        assert!(is_unavailable(presence.session_alive(&tenant(), &agent("ann"), "s", "gw1", 1_000).await));
        assert!(is_unavailable(presence.session_gone(&tenant(), &agent("ann"), "s", 1).await));
        assert!(is_unavailable(
            presence.signed_in(&tenant(), &agent("ann"), AgentStatus::Online, std::slice::from_ref(&sales), 1).await
        ));
        assert!(is_unavailable(presence.n_signed_in(&tenant(), &sales, 0).await));
        assert!(is_unavailable(presence.put_group_status(&status).await));
        assert!(is_unavailable(presence.group_statuses(&tenant()).await));
        assert!(is_unavailable(presence.mirror_license(1, 2, 3).await));
        assert!(is_unavailable(presence.license_mirror().await));
    }

    // Back on the same port (empty: it keeps no data): the same instance works again, and so does its change
    // stream, which says that it may have missed changes.
    server.start_again().expect("start redis again");
    wait_until_changes_flow(&presence, &mut changes, &agent("after")).await;
    presence.put_group_status(&status).await.expect("put after the outage");
    assert_eq!(presence.group_statuses(&tenant()).await.expect("read after the outage"), [status]);
    assert_eq!(presence.n_signed_in(&tenant(), &sales, 0).await.expect("read"), 0, "redis restarted empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_says_when_it_resubscribed() {
    let server = Redis::start().expect("redis-server");
    let presence = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    let mut changes = presence.changes();
    server.restart().expect("restart redis");
    let attempts = RECOVERY.as_millis() / POLL.as_millis();
    for _ in 0..attempts {
        match tokio::time::timeout(POLL, changes.recv()).await {
            Ok(Ok(PresenceChange::Resync)) => return,
            Ok(Ok(_)) | Err(_) => continue,
            Ok(Err(error)) => panic!("change stream failed: {error}"),
        }
    }
    panic!("no Resync within {RECOVERY:?} of the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_times_out_instead_of_hanging() {
    let server = Redis::start().expect("redis-server");
    let presence = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    let mut changes = presence.changes();
    presence.mirror_license(1, 10, 0).await.expect("mirror");

    // Paused: the connection stays open but nothing answers; the response timeout ends each call.
    server.pause().expect("pause redis");
    assert!(is_unavailable(presence.license_mirror().await));
    assert!(is_unavailable(presence.agents_present(&[(tenant(), agent("ann"))], 0).await));

    // Resumed (with its data, since it never stopped): the same instance works again.
    server.resume().expect("resume redis");
    wait_until_changes_flow(&presence, &mut changes, &agent("after")).await;
    assert_eq!(presence.license_mirror().await.expect("read").map(|mirror| mirror.used), Some(1));
}
