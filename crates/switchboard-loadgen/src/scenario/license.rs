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
//!
//! With `--release vanish` the admitted customers go away instead (their connections close without a word,
//! as a tab closed while its chat waits), and the round waits until the server has abandoned each of their
//! chats, as an agent console sees it (`queue.removed`, reason `abandoned`): the time from going away to that
//! is the `abandoned` latency, and the rounds after must admit exactly as many again, so every permit came
//! back. A chat not abandoned within `--abandon-deadline-s` is a violation, and counts as open in the rounds
//! after.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::future::join_all;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Ctx, chat_start, check_first_start, close_all};
use crate::cli::{LicenseArgs, Release};
use crate::invariants::{LicenseRound, Side};
use crate::net::{Connection, IgnoreEvents, Push, RequestError, Role};
use crate::report::{LicenseSection, Report};

pub const PRECONDITION: &str = "no open chat (waiting or active) in the cluster when the run starts, and --limit \
                                equal to the server's license.max_sessions";

pub async fn run(ctx: &mut Ctx, args: LicenseArgs) -> anyhow::Result<Report> {
    let parameters = json!({
        "limit": args.limit, "burst": args.burst, "rounds": args.rounds, "release": args.release.as_str(),
    });
    let mut watcher = match args.release {
        Release::Close => {
            ctx.metrics.declare(&["chats_admitted", "chats_refused_license", "chats_closed"]);
            None
        }
        Release::Vanish => {
            ctx.metrics.declare(&["chats_admitted", "chats_refused_license", "chats_abandoned"]);
            if !(args.abandon_deadline_s.is_finite() && args.abandon_deadline_s > 0.0) {
                bail!("--abandon-deadline-s must be a positive number of seconds");
            }
            let deadline = Duration::from_secs_f64(args.abandon_deadline_s);
            Some(Watcher::sign_in(ctx, deadline).await?)
        }
    };
    let burst = ctx.shard.share(args.burst);
    let start = Instant::now();
    let mut rounds: Vec<LicenseRound> = Vec::new();
    for round in 1..=args.rounds {
        let (open_before, failed_before) = rounds.last().map_or((0, 0), LicenseRound::carried);
        let mut figures = run_round(ctx, round, burst, args.limit, watcher.as_mut()).await?;
        (figures.open_before, figures.failed_before) = (open_before, failed_before);
        rounds.push(figures);
    }
    if let Some(watcher) = watcher {
        watcher.connection.close().await;
    }
    let duration = start.elapsed().as_secs_f64();
    let attempted = rounds.iter().map(|round| round.attempted).sum();
    let mut report = Report::new("license", parameters, ctx.metrics.snapshot(), duration, attempted);
    report.license = Some(LicenseSection { limit: args.limit, rounds });
    report.invariants.preconditions.push(PRECONDITION.to_owned());
    Ok(report)
}

async fn run_round(
    ctx: &mut Ctx,
    round: u32,
    burst: u64,
    limit: u64,
    watcher: Option<&mut Watcher>,
) -> anyhow::Result<LicenseRound> {
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
    if let Some(watcher) = watcher {
        let chats: Vec<String> = admitted.iter().map(|(_, conversation)| conversation.clone()).collect();
        drop(admitted);
        let gone_at = Instant::now();
        close_all(customers).await;
        let abandoned = watcher.abandoned(&chats).await;
        for chat in &chats {
            match abandoned.get(chat) {
                Some(at) => {
                    ctx.metrics.record("abandoned", gone_at, *at);
                    figures.abandoned += 1;
                }
                None => {
                    ctx.metrics.violation(format!(
                        "round {round}: chat {chat} of a customer who went away was not abandoned within {:.0} s",
                        watcher.deadline.as_secs_f64()
                    ));
                    figures.not_abandoned += 1;
                }
            }
        }
        ctx.metrics.count("chats_abandoned", figures.abandoned);
        ctx.coordinator.barrier(&format!("abandoned-{round}")).await?;
        return Ok(figures);
    }
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

/// An agent console (agent `PREFIX0`, signed in and set away, so that it is offered nothing and takes no
/// chat) following the queues of the agent's groups, which sees the chats of customers who went away
/// abandoned.
struct Watcher {
    connection: Connection,
    pushes: mpsc::UnboundedReceiver<Push>,
    /// How long a round waits for its chats to be abandoned.
    deadline: Duration,
}

impl Watcher {
    async fn sign_in(ctx: &Ctx, deadline: Duration) -> anyhow::Result<Watcher> {
        let token = format!("{}0", ctx.common.agent_token_prefix);
        let mut connection = ctx
            .network
            .connect(Role::Side(Side::Agent), Arc::new(IgnoreEvents), true)
            .await
            .map_err(|error| anyhow::anyhow!("the watching agent: {error} ({})", ctx.common.urls.join(", ")))?;
        for (request, fields) in
            [("agent.sign_in", json!({ "token": token })), ("agent.set_status", json!({ "status": "away" }))]
        {
            if let Err(error) = connection.request(request, fields).await {
                bail!(
                    "agent token {token}: {request} failed: {} (--release vanish watches the queues as agent \
                     {token}: it must be in the groups of the run)",
                    error.reason()
                );
            }
        }
        let pushes = connection.pushes.take().context("the watching agent's pushes")?;
        Ok(Watcher { connection, pushes, deadline })
    }

    /// When each of `chats` was seen abandoned, waiting for them until the deadline (those not seen by then
    /// are missing from the answer). Every console of the group sees every process's chats: only `chats` are
    /// kept.
    async fn abandoned(&mut self, chats: &[String]) -> HashMap<String, Instant> {
        let until = Instant::now() + self.deadline;
        let wanted: HashSet<&str> = chats.iter().map(String::as_str).collect();
        let mut found = HashMap::new();
        while found.len() < wanted.len() {
            match tokio::time::timeout_at(until, self.pushes.recv()).await {
                Ok(Some(push)) => {
                    if push.kind == "queue.removed"
                        && push.frame["reason"] == "abandoned"
                        && let Some(chat) = push.frame["conversation"].as_str().filter(|chat| wanted.contains(chat))
                    {
                        found.insert(chat.to_owned(), push.at);
                    }
                }
                // The connection closed (counted by its reader), or the deadline passed.
                Ok(None) | Err(_) => break,
            }
        }
        found
    }
}
