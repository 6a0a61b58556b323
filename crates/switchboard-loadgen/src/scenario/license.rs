//! `license`: rounds of concurrent chat starts against the license limit. In each round `--burst`
//! customers (connected beforehand) send `chat.start` at the same moment; the chats admitted and those
//! refused with `license_exhausted` (whose `max_sessions` must be the limit) are counted; once every
//! process's starts are answered, every admitted customer closes its chat, and the next round starts.
//!
//! Precondition: no open chat in the cluster when the run starts. Then every round admits exactly
//! `min(limit, burst)` chats; in any case never more than the limit (checked on the merged figures). A chat
//! whose close the server refused stays open, and holds its permit, in the rounds after: they are checked
//! against the limit less those (a close that got no answer may have closed its chat or not: the rounds
//! after are not checked exactly).

use std::sync::Arc;

use anyhow::bail;
use futures_util::future::join_all;
use serde_json::json;
use tokio::time::Instant;

use super::{Ctx, chat_start, check_first_start, close_all};
use crate::cli::LicenseArgs;
use crate::invariants::{LicenseRound, Side};
use crate::net::{IgnoreEvents, RequestError, Role};
use crate::report::{LicenseSection, Report};

pub const PRECONDITION: &str = "no open chat (waiting or active) in the cluster when the run starts, and --limit \
                                equal to the server's license.max_sessions";

pub async fn run(ctx: &mut Ctx, args: LicenseArgs) -> anyhow::Result<Report> {
    let parameters = json!({ "limit": args.limit, "burst": args.burst, "rounds": args.rounds });
    ctx.metrics.declare(&["chats_admitted", "chats_refused_license", "chats_closed"]);
    let burst = ctx.shard.share(args.burst);
    let start = Instant::now();
    let mut rounds: Vec<LicenseRound> = Vec::new();
    for round in 1..=args.rounds {
        let (open_before, failed_before) = rounds.last().map_or((0, 0), LicenseRound::carried);
        let mut figures = run_round(ctx, round, burst, args.limit).await?;
        (figures.open_before, figures.failed_before) = (open_before, failed_before);
        rounds.push(figures);
    }
    let duration = start.elapsed().as_secs_f64();
    let attempted = rounds.iter().map(|round| round.attempted).sum();
    let mut report = Report::new("license", parameters, ctx.metrics.snapshot(), duration, attempted);
    report.license = Some(LicenseSection { limit: args.limit, rounds });
    report.invariants.preconditions.push(PRECONDITION.to_owned());
    Ok(report)
}

async fn run_round(ctx: &mut Ctx, round: u32, burst: u64, limit: u64) -> anyhow::Result<LicenseRound> {
    let customers = ctx.connect_many(burst, Role::Side(Side::Customer), Arc::new(IgnoreEvents)).await;
    if customers.is_empty() && burst > 0 {
        bail!(
            "round {round}: no customer could connect (see the errors above: is the server at {}?)",
            ctx.common.urls.join(", ")
        );
    }
    ctx.coordinator.barrier(&format!("burst-{round}")).await?;

    let burst_at = Instant::now();
    let starts = customers.iter().enumerate().map(|(n, customer)| {
        let question = format!("license {} round {round} {}-{n}", ctx.run_id, ctx.shard.index);
        let request = chat_start(&ctx.common.widget_key, ctx.group(n as u64), question);
        customer.request("chat.start", request)
    });
    let outcomes = join_all(starts).await;
    let mut figures = LicenseRound { round, attempted: customers.len() as u64, ..LicenseRound::default() };
    let mut admitted = Vec::new();
    for (customer, outcome) in customers.iter().zip(outcomes) {
        match outcome {
            Ok(ack) => {
                ctx.metrics.record("chat_start", burst_at, ack.at);
                check_first_start(&ctx.metrics, &ack.frame);
                ctx.metrics.operation();
                match ack.frame["conversation"].as_str() {
                    Some(conversation) => admitted.push((customer, conversation.to_owned())),
                    None => ctx.metrics.error("chat_start_ack_without_conversation"),
                }
                figures.admitted += 1;
            }
            Err(RequestError::Refused { code, max_sessions, at }) if code == "license_exhausted" => {
                ctx.metrics.record("chat_start_refused", burst_at, at);
                ctx.metrics.operation();
                figures.refused += 1;
                if max_sessions != Some(limit) {
                    let seen = max_sessions.map_or("no max_sessions".to_owned(), |max| format!("max_sessions {max}"));
                    ctx.metrics.violation(format!("round {round}: license_exhausted with {seen}, expected {limit}"));
                }
            }
            Err(error) => {
                ctx.metrics.error(&error.reason());
                figures.failed += 1;
            }
        }
    }
    ctx.metrics.count("chats_admitted", figures.admitted);
    ctx.metrics.count("chats_refused_license", figures.refused);

    // No process closes its chats before every process's starts are answered: a close lets a permit go, and
    // another process's start still on its way would take it, so the round would admit more than the limit
    // without the server ever holding more (seen on a loaded machine: 11 of 25 with a limit of 10).
    ctx.coordinator.barrier(&format!("started-{round}")).await?;
    let closes = admitted
        .iter()
        .map(|(customer, conversation)| customer.request("chat.close", json!({ "conversation": conversation })));
    for outcome in join_all(closes).await {
        match outcome {
            Ok(_) => figures.closed += 1,
            Err(error) => {
                if matches!(error, RequestError::Refused { .. }) {
                    figures.close_refused += 1;
                }
                ctx.metrics.error(&error.reason());
            }
        }
    }
    ctx.metrics.count("chats_closed", figures.closed);
    drop(admitted);
    close_all(customers).await;
    ctx.coordinator.barrier(&format!("closed-{round}")).await?;
    Ok(figures)
}
