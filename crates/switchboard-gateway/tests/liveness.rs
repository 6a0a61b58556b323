//! Connections that are open but take no part are found: a WebSocket client that sends nothing is pinged,
//! and one that then answers nothing, not even the pong its WebSocket stack answers a ping with, is
//! disconnected with 4009 and leaves presence (its process hangs, or it stopped reading). TCP keepalive
//! finds the peers that are gone (`tests/e2e/tests/connections.rs`); these are still there.

mod common;

use std::time::Duration;

use common::{BOB, DEADLINE, Server, WsClient};
use serde_json::json;
use switchboard_domain::{AgentId, Clock, TenantId};
use switchboard_gateway::{CLOSE_UNRESPONSIVE, GatewaySettings};
use switchboard_presence::Presence;
use tokio::time::Instant;

fn settings() -> GatewaySettings {
    GatewaySettings { idle_ping: Duration::from_millis(200), ..GatewaySettings::default() }
}

/// Bob's live connections, as the gateway wrote them to presence.
async fn bobs_connections(server: &Server) -> usize {
    let (tenant, bob) = (TenantId::new("acme").unwrap(), AgentId::new("bob").unwrap());
    server.presence.agent_sessions(&tenant, &bob, server.clock.now_ms()).await.unwrap().len()
}

/// The close frame that ends `bytes` (server frames are not masked): its code.
fn closing_code(bytes: &[u8]) -> Option<u16> {
    (0..bytes.len().saturating_sub(3)).find_map(|at| {
        let frame = &bytes[at..];
        (frame[0] == 0x88 && usize::from(frame[1]) + 2 == frame.len()).then(|| u16::from_be_bytes([frame[2], frame[3]]))
    })
}

#[tokio::test]
async fn a_quiet_client_whose_stack_answers_pings_stays_connected() {
    let server = Server::start_with(settings()).await;
    let mut bob = WsClient::connect(&server).await;
    bob.ack(json!({ "type": "agent.sign_in", "token": BOB })).await;
    let signed_in = Instant::now();
    // Bob's console sends nothing but the pongs tungstenite answers with: pinged again and again, each time
    // after 200 ms without a frame from it, never disconnected. (Unanswered, the second ping would have been
    // a close.)
    bob.read_pings(4).await;
    let pinged_for = signed_in.elapsed();
    assert!(pinged_for >= Duration::from_millis(3 * 200), "four pings 200 ms of silence apart, not {pinged_for:?}");
    assert_eq!(bob.ack(json!({ "type": "ping" })).await["type"], "ack");
    assert_eq!(bobs_connections(&server).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_answers_nothing_is_disconnected_with_4009_and_leaves_presence() {
    let server = Server::start_with(settings()).await;
    let mut bob = WsClient::connect(&server).await;
    bob.ack(json!({ "type": "agent.sign_in", "token": BOB })).await;
    assert_eq!(bobs_connections(&server).await, 1);
    // Bob's console hangs: nothing is read from the connection, so no pong is sent.
    let bytes = bob.raw_bytes_until_closed().await;
    let pinged = bytes.windows(2).any(|frame| frame == [0x89, 0x00]);
    assert!(pinged, "an empty ping before the close: {bytes:?}");
    assert_eq!(closing_code(&bytes), Some(CLOSE_UNRESPONSIVE), "{bytes:?}");
    let left = tokio::time::timeout(DEADLINE, async {
        while bobs_connections(&server).await > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    left.await.expect("Bob's connection left presence");
    server.stop().await;
}
