//! `storm`: connections opened at a fixed rate (open loop), each reading its `welcome` and answering a
//! `ping`. Latencies from each connection's intended time: to the `welcome` (`connect`) and to the ping's
//! ack (`first_answer`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Ctx, close_all};
use crate::cli::StormArgs;
use crate::metrics::lock;
use crate::net::{Connection, IgnoreEvents, Role};
use crate::pacer::Pacer;
use crate::report::Report;
use crate::schedule::Schedule;

pub async fn run(ctx: &mut Ctx, args: StormArgs) -> anyhow::Result<Report> {
    let count = ctx.shard.share(args.connections);
    let parameters = json!({ "connections": args.connections, "rate": args.rate, "hold_s": args.hold_s });
    ctx.metrics.declare(&["connections_answered"]);
    ctx.coordinator.barrier("start").await?;

    let start = Instant::now();
    let schedule = Schedule::sharded(start, args.rate, ctx.shard.index, ctx.shard.count);
    let open: Arc<Mutex<Vec<Connection>>> = Arc::default();
    let last_answer = Arc::new(Mutex::new(start));
    let mut tasks = JoinSet::new();
    let mut pacer = Pacer::precise();
    for k in 0..count {
        let intended = schedule.wait_for(k, &mut pacer).await;
        ctx.metrics.record("schedule_lag", intended, Instant::now());
        let (network, metrics) = (ctx.network.clone(), ctx.metrics.clone());
        let (open, last_answer) = (open.clone(), last_answer.clone());
        tasks.spawn(async move {
            let connection = match network.connect(Role::Anonymous, Arc::new(IgnoreEvents), false).await {
                Ok(connection) => connection,
                Err(error) => return metrics.error(&error.reason()),
            };
            metrics.record("connect", intended, connection.welcome_at);
            match connection.request("ping", json!({})).await {
                Ok(ack) => {
                    metrics.record("first_answer", intended, ack.at);
                    metrics.count("connections_answered", 1);
                    metrics.operation();
                    let mut last = lock(&last_answer);
                    *last = (*last).max(ack.at);
                }
                Err(error) => metrics.error(&error.reason()),
            }
            lock(&open).push(connection);
        });
    }
    while let Some(result) = tasks.join_next().await {
        ctx.metrics.joined(result);
    }
    let duration = lock(&last_answer).duration_since(start);
    let answered = ctx.metrics.counter("connections_answered");
    if answered == 0 && count > 0 {
        bail!(
            "no connection was answered ({}): is the server at {}?",
            ctx.metrics.error_summary(),
            ctx.common.urls.join(", ")
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(args.hold_s)).await;
    let connections = std::mem::take(&mut *lock(&open));
    let lost = connections.iter().filter(|connection| !connection.is_open()).count() as u64;
    ctx.metrics.count("connections_lost", lost);
    close_all(connections).await;
    Ok(Report::new("storm", parameters, ctx.metrics.snapshot(), duration.as_secs_f64(), answered))
}
