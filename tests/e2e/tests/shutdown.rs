//! Shutdown: `serve` stops on SIGTERM within its grace, even while a client that reads nothing holds a
//! gRPC stream open in the middle of a long backlog (its last frames wait for a flow-control window that
//! never opens, and a graceful shutdown alone would wait for it for good).

use std::time::Duration;

use serde_json::json;
use switchboard_e2e::{Client, SEED_CONFIG, Server, http_get};
use switchboard_proto::public::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const WIDGET: &str = "acme-widget-key";

/// The seed tenancy, with room for long messages, no request budget, the slow client never disconnected for
/// its stalled writes (that is another test's), and a grace of one second.
fn config() -> String {
    SEED_CONFIG.replace(
        "  max_message_bytes: 256",
        "  max_message_bytes: 4096\n  requests_per_second: 0\n  write_stall_timeout_ms: 600000\n  shutdown_grace_ms: 1000",
    )
}

fn frame(id: &str, request: pb::client_frame::Request) -> pb::ClientFrame {
    pb::ClientFrame { id: id.into(), request: Some(request) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_within_its_grace_while_a_grpc_client_reads_nothing() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(&config(), data.path()).await?;
    let url = server.ws_url();
    let (mut customer, chat, _) = Client::start_chat(&url, WIDGET, "g1", "Ann", "a long story").await?;
    let mut agent = Client::sign_in(&url, "token-agent-a").await?;
    agent.ok("chat.accept", json!({ "conversation": chat })).await?;
    agent.close().await?;
    // Over a megabyte: more than HTTP/2's windows and the kernel hold for a client that does not read.
    let body = "w".repeat(4000);
    for n in 0..300 {
        let message = json!({ "conversation": chat, "client_msg_id": format!("m{n}"), "body": body });
        customer.ok("message.send", message).await?;
    }

    // An agent console on gRPC with small windows subscribes to the whole chat, then reads nothing more.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.address))?
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await?;
    let (requests, stream) = mpsc::channel(8);
    let mut frames = pb::chat_service_client::ChatServiceClient::new(channel)
        .session(ReceiverStream::new(stream))
        .await?
        .into_inner();
    let sign_in = pb::AgentSignInRequest { token: "token-agent-a".into() };
    requests.send(frame("1", pb::client_frame::Request::AgentSignIn(sign_in))).await?;
    let subscribe = pb::ChatSubscribeRequest { conversation: chat.clone(), after_seq: 0 };
    requests.send(frame("2", pb::client_frame::Request::ChatSubscribe(subscribe))).await?;
    let subscribed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = frames.message().await? {
            if matches!(&frame.frame, Some(pb::server_frame::Frame::Ack(ack)) if ack.id == "2") {
                return Ok(());
            }
        }
        anyhow::bail!("the stream ended before the subscription's ack")
    });
    subscribed.await??;

    // (With a grace of ten minutes instead, it is still running after these 30 s: the stream holds it.)
    let status = server.terminate(Duration::from_secs(30)).await?;
    assert!(status.is_some_and(|status| status.success()), "not stopped (or failed): {status:?}\n{}", server.stderr());
    drop((frames, requests, customer));
    Ok(())
}

/// With `limits.drain_delay_ms`, a server told to stop first says so on `/readyz` and in its gRPC health (so
/// that a load balancer sends it no one new) and goes on serving, new connections included, for the delay; then it closes its
/// connections (1001) and exits. Without the delay it would stop accepting at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readyz_and_serves_on_for_the_drain_delay_then_closes() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    // A delay far longer than the checks below take; a second SIGTERM cuts it short at the end.
    let config = config().replace("  shutdown_grace_ms: 1000", "  shutdown_grace_ms: 1000\n  drain_delay_ms: 60000");
    let mut server = Server::start(&config, data.path()).await?;
    let url = server.ws_url();
    let (mut before, chat, _) = Client::start_chat(&url, WIDGET, "g1", "Ann", "before").await?;
    let (status, _) = http_get(&server.address, "/readyz").await?;
    assert!(status.contains(" 200 "), "{status}");

    server.sigterm().await?;
    // Leaving: /readyz fails (checked until it does), /healthz does not (nothing needs a restart).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(&server.address, "/readyz").await?;
        if status.contains(" 503 ") {
            assert!(body.starts_with("leaving"), "{body}");
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "/readyz still says {status} after SIGTERM");
        tokio::task::yield_now().await;
    }
    let (status, _) = http_get(&server.address, "/healthz").await?;
    assert!(status.contains(" 200 "), "{status}");
    // So does the gRPC health, for gRPC-aware load balancers (checked until it does).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.address))?.connect().await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    loop {
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let status = health.check(request).await?.into_inner().status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the gRPC health still says {status} after SIGTERM");
        tokio::task::yield_now().await;
    }
    // Still serving: a new connection starts a chat, an old one goes on with its own.
    let (mut after, _, _) = Client::start_chat(&url, WIDGET, "g1", "Bo", "after").await?;
    before.ok("message.send", json!({ "conversation": chat, "client_msg_id": "m1", "body": "still here" })).await?;

    // A second SIGTERM cuts the delay short; both clients, reading as clients do, are told to go away.
    let (closed_before, closed_after, signalled) =
        tokio::join!(before.push_of("never.sent"), after.push_of("never.sent"), server.sigterm());
    signalled?;
    for (name, closed) in [("before", closed_before), ("after", closed_after)] {
        let closed = closed.expect_err("the connection stayed open");
        assert!(format!("{closed:#}").contains("Away"), "{name}: not closed with 1001: {closed:#}");
    }
    let status = server.wait_exit(Duration::from_secs(30)).await?;
    assert!(status.is_some_and(|status| status.success()), "not stopped (or failed): {status:?}\n{}", server.stderr());
    // Both sessions ended (their close handshakes done) within the grace: none was cut off.
    assert!(!server.stderr().contains("after the shutdown grace"), "{}", server.stderr());
    Ok(())
}
