//! A group's gauges (the process's metrics recorder, so a test binary of its own): the router that holds the
//! group's queue reports how many of its agents are online and signed in and how many chats wait, and
//! reports 0 once the queue lives there no more, so that summing the routers gives the group's figures; and
//! the group's waiting-time SLA, with the chats past it.

mod common;

use common::{Fixture, G2_WAIT_SLA_MS, agent, settle, tenant};
use switchboard_domain::{AgentStatus, Clock};
use switchboard_presence::Presence;
use switchboard_proto::router::RouterApi;
use switchboard_proto::router::{Caller, ChatCommand};
use switchboard_telemetry::names;

/// The process's recorder, and the test tenant's series in it, are shared: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _alone = ONE_AT_A_TIME.lock().await;
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

#[tokio::test(start_paused = true)]
async fn a_queue_reports_its_groups_sla_the_chats_waiting_past_it_and_those_that_left_after_it() {
    let _alone = ONE_AT_A_TIME.lock().await;
    switchboard_telemetry::install_metrics("router");
    let fixture = common::fixture().await;
    let sla_ms = G2_WAIT_SLA_MS;
    // Group g2 has an SLA of a minute; g1 has none.
    let first = fixture.start_chat("g2", "first").await;
    fixture.pass(sla_ms / 2).await;
    let second = fixture.start_chat("g2", "second").await;
    fixture.start_chat("g1", "no SLA").await;
    fixture.pass(sla_ms / 2 - 1_000).await;
    assert_eq!(gauge(names::QUEUE_WAIT_SLA, "g2"), Some(sla_ms as f64 / 1000.0));
    assert_eq!(gauge(names::QUEUE_SLA_BREACHED_CHATS, "g2"), Some(0.0), "the first has waited 59 s");
    fixture.pass(2_000).await;
    assert_eq!(gauge(names::QUEUE_SLA_BREACHED_CHATS, "g2"), Some(1.0), "the first has waited 61 s, the second 31");
    assert_eq!(gauge(names::QUEUE_SLA_BREACHES, "g2"), Some(0.0), "nothing has left the queue");
    // A group without an SLA has none of its series (no rule compares its wait with 0).
    assert_eq!(gauge(names::QUEUE_WAITING_CHATS, "g1"), Some(1.0));
    for name in [names::QUEUE_WAIT_SLA, names::QUEUE_SLA_BREACHED_CHATS, names::QUEUE_SLA_BREACHES] {
        assert_eq!(gauge(name, "g1"), None, "{name}");
    }

    // The first chat's customer gives up: it left after the SLA, however it left.
    let customer = Caller::Customer { conversation: first };
    fixture.router.command(&customer, first, ChatCommand::Close).await.unwrap();
    settle().await;
    assert_eq!(gauge(names::QUEUE_SLA_BREACHES, "g2"), Some(1.0));
    assert_eq!(gauge(names::QUEUE_SLA_BREACHED_CHATS, "g2"), Some(0.0), "the second has waited 31 s");
    fixture.pass(sla_ms / 2).await;
    assert_eq!(gauge(names::QUEUE_SLA_BREACHED_CHATS, "g2"), Some(1.0), "the second has waited 61 s");
    connected(&fixture, "a", AgentStatus::Online).await;
    fixture.router.accept_chat(&tenant(), &agent("a"), second).await.unwrap();
    settle().await;
    assert_eq!(gauge(names::QUEUE_SLA_BREACHES, "g2"), Some(2.0));
    assert_eq!(gauge(names::QUEUE_SLA_BREACHED_CHATS, "g2"), Some(0.0));

    // A chat taken within the SLA is no breach.
    let third = fixture.start_chat("g2", "third").await;
    fixture.pass(sla_ms - 1_000).await;
    fixture.router.accept_chat(&tenant(), &agent("a"), third).await.unwrap();
    settle().await;
    assert_eq!(gauge(names::QUEUE_SLA_BREACHES, "g2"), Some(2.0));
}
