//! `idle`: many customer sessions that do nothing. Each connects, reads its `welcome` and asks
//! `groups.list` with the widget key (what a widget does before it offers a chat), then stays open.
//! Measures the connect latency (TCP connect to `welcome`), the `groups.list` answer, and with
//! `--server-pid` the server's memory per idle session.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use tokio::time::Instant;

use super::{Ctx, close_all, rss_kb};
use crate::cli::IdleArgs;
use crate::net::{Connection, IgnoreEvents, Role};
use crate::report::{MemorySection, Report};

pub async fn run(ctx: &mut Ctx, args: IdleArgs) -> anyhow::Result<Report> {
    let sessions = ctx.shard.share(args.sessions);
    let parameters = json!({ "sessions": args.sessions, "hold_s": args.hold_s });
    ctx.metrics.declare(&["sessions_open", "sessions_lost"]);
    let server_pid = ctx.common.server_pid.map(|pid| pid.to_string());
    let measure_server = ctx.coordinator.is_first() && server_pid.is_some();
    let read_server = || server_pid.as_deref().and_then(rss_kb);

    ctx.coordinator.gather("open").await?;
    let server_rss_before_kb = if measure_server { read_server() } else { None };
    ctx.coordinator.release("open").await?;

    let start = Instant::now();
    let connections = open_sessions(ctx, sessions).await;
    let open_time = start.elapsed();
    if connections.is_empty() && sessions > 0 {
        bail!(
            "no session could be opened ({}): is the server at {}?",
            ctx.metrics.error_summary(),
            ctx.common.urls.join(", ")
        );
    }
    ctx.metrics.count("sessions_open", connections.len() as u64);

    ctx.coordinator.gather("opened").await?;
    let server_rss_opened_kb = if measure_server { read_server() } else { None };
    ctx.coordinator.release("opened").await?;

    tokio::time::sleep(Duration::from_secs_f64(args.hold_s)).await;
    let server_rss_after_kb = if measure_server { read_server() } else { None };
    let loadgen_rss_kb = rss_kb("self");
    let lost = connections.iter().filter(|connection| !connection.is_open()).count() as u64;
    ctx.metrics.count("sessions_lost", lost);
    ctx.metrics.count("sessions_open_at_end", connections.len() as u64 - lost);
    close_all(connections).await;

    let mut report = Report::new(
        "idle",
        parameters,
        ctx.metrics.snapshot(),
        open_time.as_secs_f64(),
        ctx.metrics.counter("sessions_open"),
    );
    report.memory = Some(MemorySection {
        server_pid: ctx.common.server_pid,
        server_rss_before_kb,
        server_rss_opened_kb,
        server_rss_after_kb,
        server_bytes_per_session: None, // from the merged session count
        loadgen_rss_kb,
    });
    Ok(report)
}

/// Opens the sessions, `--connect-concurrency` at a time.
async fn open_sessions(ctx: &Ctx, count: u64) -> Vec<Connection> {
    let concurrency = ctx.common.connect_concurrency.max(1) as u64;
    let mut sessions = Vec::new();
    let mut opening = FuturesUnordered::new();
    let mut started = 0;
    while started < count || !opening.is_empty() {
        while started < count && (opening.len() as u64) < concurrency {
            opening.push(open_session(ctx));
            started += 1;
        }
        if let Some(Some(connection)) = opening.next().await {
            sessions.push(connection);
        }
    }
    sessions
}

async fn open_session(ctx: &Ctx) -> Option<Connection> {
    let start = Instant::now();
    let connection = match ctx.network.connect(Role::Anonymous, Arc::new(IgnoreEvents), false).await {
        Ok(connection) => connection,
        Err(error) => {
            ctx.metrics.error(&error.reason());
            return None;
        }
    };
    ctx.metrics.record("connect", start, connection.welcome_at);
    let sent = Instant::now();
    match connection.request("groups.list", json!({ "widget_key": ctx.common.widget_key })).await {
        Ok(ack) => {
            ctx.metrics.record("groups_list", sent, ack.at);
            ctx.metrics.operation();
            Some(connection)
        }
        Err(error) => {
            ctx.metrics.error(&error.reason());
            connection.close().await;
            None
        }
    }
}
