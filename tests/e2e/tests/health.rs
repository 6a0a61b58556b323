//! `/healthz` of `serve` tells an orchestrator when the process must be restarted: once the store could not
//! make its log durable it refuses every write until a restart, and the health check says so (a probe
//! restarts it; the restart recovers what the disk holds).

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use switchboard_e2e::{Client, SEED_CONFIG, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WIDGET: &str = "acme-widget-key";

/// `GET path`: the status line and the body.
async fn get(address: &str, path: &str) -> anyhow::Result<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header in the response")?;
    Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_once_the_store_refuses_every_write_until_a_restart() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let (mut customer, chat, _) = Client::start_chat(&server.ws_url(), WIDGET, "g1", "Ann", "order missing").await?;
    customer.ok("message.send", json!({ "conversation": chat, "client_msg_id": "m1", "body": "stored" })).await?;
    let (status, body) = get(&server.address, "/healthz").await?;
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, "ok");

    // The log's file disappears under the store: nothing proves a commit is on the disk any more.
    let wal = data.path().join("switchboard.db-wal");
    anyhow::ensure!(wal.exists(), "{} is missing: does serve still keep its data there?", wal.display());
    std::fs::remove_file(&wal)?;
    let code = customer
        .refused("message.send", json!({ "conversation": chat, "client_msg_id": "m2", "body": "lost" }))
        .await?;
    assert_eq!(code, "unavailable");

    let (status, body) = get(&server.address, "/healthz").await?;
    assert!(status.contains(" 503 "), "{status}: {body}");
    assert!(body.contains("refuses every write until a restart") && body.contains("cannot find the log"), "{body}");
    // The metric an alert watches says it too.
    let (_, metrics) = get(&server.address, "/metrics").await?;
    assert!(metrics.lines().any(|line| line == "switchboard_store_writer_failed 1"), "{metrics}");
    Ok(())
}
