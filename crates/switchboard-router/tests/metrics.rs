//! A group's gauges (the process's metrics recorder, so a test binary of its own): the router that holds the
//! group's queue reports how many of its agents are online and signed in and how many chats wait, and
//! reports 0 once the queue lives there no more, so that summing the routers gives the group's figures.

mod common;

use common::{Fixture, agent, settle, tenant};
use switchboard_domain::{AgentStatus, Clock};
use switchboard_presence::Presence;
use switchboard_proto::router::RouterApi;
use switchboard_telemetry::names;

/// The value of `name` for group `group` of the test tenant in the process's exposition, if it is there.
fn gauge(name: &str, group: &str) -> Option<f64> {
    let exposition = switchboard_telemetry::render_metrics();
    let labels = format!("{{tenant=\"{}\",group=\"{group}\"}} ", tenant());
    let prefix = format!("{name}{labels}");
    exposition.lines().find_map(|line| line.strip_prefix(prefix.as_str())).map(|value| value.trim().parse().unwrap())
}

async fn connected(fixture: &Fixture, name: &str, status: AgentStatus) {
    fixture.router.subscribe_agent(&fixture.gateway, &tenant(), &agent(name), &[]).await.unwrap();
    fixture.router.set_agent_status(&tenant(), &agent(name), status).await.unwrap();
    let expires = fixture.clock.now_ms() + 24 * 60 * 60_000;
    fixture.presence.session_alive(&tenant(), &agent(name), &format!("s-{name}"), "gw-1", expires).await.unwrap();
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn a_router_reports_its_groups_figures_and_zero_once_it_holds_the_queue_no_more() {
    switchboard_telemetry::install_metrics("router");
    let fixture = common::fixture().await;
    // Group g1: agent b online, agent c away (signed in, but taking no chats); a chat waits in g2.
    connected(&fixture, "b", AgentStatus::Online).await;
    connected(&fixture, "c", AgentStatus::Away).await;
    fixture.start_chat("t", "waiting customer").await;
    fixture.pass(3_000).await;
    assert_eq!(gauge(names::GROUP_AGENTS_ONLINE, "g1"), Some(1.0), "away is not online");
    assert_eq!(gauge(names::GROUP_AGENTS_SIGNED_IN, "g1"), Some(2.0));
    assert_eq!(gauge(names::GROUP_OPEN, "g1"), Some(1.0));
    assert_eq!(gauge(names::QUEUE_WAITING_CHATS, "t"), Some(1.0));
    assert_eq!(gauge(names::GROUP_AGENTS_ONLINE, "t"), Some(0.0), "nobody of group t is online");

    // The router stops (its shards go to another node): every figure of its groups is 0 here.
    fixture.router.shutdown().await.unwrap();
    settle().await;
    for name in [names::GROUP_AGENTS_ONLINE, names::GROUP_AGENTS_SIGNED_IN, names::GROUP_OPEN] {
        assert_eq!(gauge(name, "g1"), Some(0.0), "{name}");
    }
    assert_eq!(gauge(names::QUEUE_WAITING_CHATS, "t"), Some(0.0));
    assert_eq!(gauge(names::GROUP_OPEN, "t"), Some(0.0));
}
