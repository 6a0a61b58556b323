//! `/healthz` of `serve` tells an orchestrator when the process must be restarted: once the store could not
//! make its log durable it refuses every write until a restart, and the health check says so (a probe
//! restarts it; the restart recovers what the disk holds). The store role on SQLite says it in its gRPC health.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use switchboard_e2e::{Client, SEED_CONFIG, Server, StoreRole, http_get as get};
use switchboard_proto::internal::v1::store_service_client::StoreServiceClient;
use switchboard_proto::internal::v1::{AcquireShardsRequest, AppendRequest, ConversationRecord, Fence, NewEvent};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const WIDGET: &str = "acme-widget-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_once_the_store_refuses_every_write_until_a_restart() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let (mut customer, chat, _) = Client::start_chat(&server.ws_url(), WIDGET, "g1", "Ann", "order missing").await?;
    customer.ok("message.send", json!({ "conversation": chat, "client_msg_id": "m1", "body": "stored" })).await?;
    let (status, body) = get(&server.address, "/healthz").await?;
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, "ok");

    // The log's file disappears under the store, and another takes its place (as a connection opened since
    // would make it): the writer's frames go to the removed file, so nothing proves a commit is on the disk.
    let wal = data.path().join("switchboard.db-wal");
    anyhow::ensure!(wal.exists(), "{} is missing: does serve still keep its data there?", wal.display());
    std::fs::remove_file(&wal)?;
    std::fs::write(&wal, b"")?;
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

/// An append of a new conversation `id` on `shard` under `fence`.
fn create(fence: Fence, id: &str) -> AppendRequest {
    let now_ms = 1_700_000_000_000;
    AppendRequest {
        fence: Some(fence),
        conversation_id: id.into(),
        create: Some(ConversationRecord {
            id: id.into(),
            tenant_id: "acme".into(),
            group_id: "g1".into(),
            customer_name: "Ann".into(),
            first_question: "order missing".into(),
            state: "queued".into(),
            created_at_ms: now_ms,
            queued_at_ms: now_ms,
            shard: fence.shard,
            customer_token: format!("token-{id}"),
            ..Default::default()
        }),
        events: vec![NewEvent {
            at_ms: now_ms,
            author_role: "customer".into(),
            client_msg_id: "m1".into(),
            kind: "message".into(),
            payload_json: r#"{"body":"hello"}"#.into(),
            ..Default::default()
        }],
        update: None,
    }
}

/// The store role's gRPC health (what an orchestrator's gRPC probe asks) goes NOT_SERVING once its SQLite
/// store could not make its log durable, as `serve`'s `/healthz` fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_roles_grpc_health_fails_once_it_refuses_every_write_until_a_restart() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let database = data.path().join("store.db");
    let role = StoreRole::start(&database, data.path()).await?;
    let channel = tonic::transport::Endpoint::from_shared(role.url())?.connect().await?;
    let mut store = StoreServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let status = |response: tonic::Response<tonic_health::pb::HealthCheckResponse>| response.into_inner().status;
    let check = || HealthCheckRequest { service: String::new() };
    assert_eq!(status(health.check(check()).await?), ServingStatus::Serving as i32);

    let acquire = AcquireShardsRequest { node_id: "node-1".into(), shards: vec![3], lease_ms: 60_000, limit: 0 };
    let granted = store.acquire_shards(acquire).await?.into_inner().granted;
    let lease = granted.iter().find(|lease| lease.shard == 3).context("shard 3 granted")?;
    let fence = Fence { shard: 3, epoch: lease.epoch };
    assert_eq!(store.append(create(fence, "c1")).await?.into_inner().last_seq, 1);
    assert_eq!(status(health.check(check()).await?), ServingStatus::Serving as i32);

    // The log's file disappears under the store: nothing proves a commit is on the disk any more.
    let wal = data.path().join("store.db-wal");
    anyhow::ensure!(wal.exists(), "{} is missing", wal.display());
    std::fs::remove_file(&wal)?;
    let refused = store.append(create(fence, "c2")).await.expect_err("an append without a durable log");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = status(health.check(check()).await?);
        if now == ServingStatus::NotServing as i32 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the health is still {now} after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The store's own service says so too.
    let service = HealthCheckRequest { service: "switchboard.internal.v1.StoreService".into() };
    assert_eq!(status(health.check(service).await?), ServingStatus::NotServing as i32);
    Ok(())
}
