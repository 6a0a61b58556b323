//! `switchboard_offer_latency_seconds` over real WebSockets, in a test process of its own (the metrics
//! recorder is the process's): an offer counts once, when it is written to the agent's socket, and not again
//! when a second console of the agent is shown it.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{ALICE, Server, WIDGET, WsClient};
use serde_json::json;
use switchboard_domain::{AgentEntry, AgentId, Directory, GroupEntry, GroupId, Routing, TenantEntry, TenantId};
use switchboard_gateway::GatewaySettings;
use switchboard_presence::MemoryPresence;
use switchboard_router::PresenceSettings;
use switchboard_telemetry::names;

/// Group `vip` (push routing, offers that do not time out here); agent `alice` in it.
fn directory() -> Directory {
    let vip = GroupId::new("vip").unwrap();
    let alice = AgentId::new("alice").unwrap();
    let group =
        GroupEntry { routing: Routing::Push { offer_timeout_ms: 600_000 }, ..GroupEntry::new(vip.clone(), "VIP") };
    let agent = AgentEntry { id: alice.clone(), name: "Alice".into(), groups: vec![vip.clone()], capacity: 3 };
    let entry = TenantEntry {
        id: TenantId::new("acme").unwrap(),
        name: "Acme".into(),
        groups: BTreeMap::from([(vip, group)]),
        agents: BTreeMap::from([(alice.clone(), agent)]),
    };
    let mut directory = Directory::default();
    directory.add_tenant(entry, vec![WIDGET.into()], vec![(alice, ALICE.into())]).unwrap();
    directory
}

/// How many offers the process's histogram counted.
fn offers_counted() -> u64 {
    let exposition = switchboard_telemetry::render_metrics();
    let prefix = format!("{}_count ", names::OFFER_LATENCY);
    let line = exposition.lines().find_map(|line| line.strip_prefix(prefix.as_str()));
    line.map_or(0, |count| count.trim().parse().unwrap())
}

/// A round trip on the connection: whatever it wrote before the answer has been flushed, and recorded.
async fn round_trip(client: &mut WsClient) {
    client.ack(json!({ "type": "groups.list" })).await;
}

async fn signed_in(server: &Server) -> WsClient {
    let mut client = WsClient::connect(server).await;
    client.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;
    client
}

#[tokio::test]
async fn an_offer_is_counted_once_however_many_consoles_are_shown_it() {
    switchboard_telemetry::install_metrics("gateway");
    let presence = Arc::new(MemoryPresence::new());
    let settings = GatewaySettings::default();
    let server =
        Server::start_full(settings, directory(), PresenceSettings::default(), presence.clone(), presence).await;
    let mut first = signed_in(&server).await;
    assert_eq!(offers_counted(), 0);

    let mut customer = WsClient::connect(&server).await;
    let started =
        json!({ "type": "chat.start", "widget_key": WIDGET, "group": "vip", "name": "Dana", "question": "Hi?" });
    let chat = customer.ack(started).await["conversation"].clone();
    let offer = first.push_of("offer").await;
    assert_eq!(offer["entry"]["conversation"], chat);
    round_trip(&mut first).await;
    assert_eq!(offers_counted(), 1, "the offer written to the agent's socket");

    // A second console of the agent on this gateway is shown the outstanding offer: not a new offer.
    let mut second = signed_in(&server).await;
    let shown = second.push_of("offer").await;
    assert_eq!(shown, offer, "the same offer, as the first console was shown it");
    round_trip(&mut second).await;
    assert_eq!(offers_counted(), 1, "shown again, not waited for again");
    server.stop().await;
}
