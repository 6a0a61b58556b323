//! `chat-storm`: customers `chat.start` at a fixed rate (open loop) while the agents, signed in and
//! online, take the chats: in a pull group every agent with a free slot races for each chat it sees in
//! `queue.added` (one wins, the others get `chat_taken`, which is counted, not an error); in a push group
//! the agent a chat is `offer`ed to accepts it. Each agent closes each chat it accepted, freeing its slot.
//!
//! Latencies from each chat's intended start: `connect` (the customer's `welcome`), `chat_start` (its ack),
//! `first_queue_added` (pull: the first `queue.added` an agent of this process saw) or `offer` (push),
//! `accepted` (the customer receives the `accepted` event); and `schedule_lag`, the generator's own
//! lateness (the chats are paced by a `timerfd`, see `pacer`). Invariant: each chat accepted exactly once.

mod agent;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Ctx, chat_start, check_first_start, close_all};
use crate::cli::{ChatStormArgs, RoutingMode};
use crate::invariants::{ChatLedger, Side};
use crate::metrics::{Metrics, lock};
use crate::net::{EventObserver, Role};
use crate::pacer::Pacer;
use crate::report::{ChatStormSection, Report};
use crate::schedule::Schedule;

/// What this process knows of the chats of the run.
#[derive(Default)]
struct Registry {
    ledger: ChatLedger,
    /// The chats this process started: intended start time.
    intended: HashMap<String, Instant>,
    /// When an agent of this process first saw each chat (`queue.added` or `offer`).
    first_seen: HashMap<String, Instant>,
    /// When the customer received the `accepted` event.
    accepted_at: HashMap<String, Instant>,
    /// Chats whose customer received the `closed` event, and the customers waiting for it.
    closed: HashSet<String>,
    waiting_for_close: HashMap<String, oneshot::Sender<()>>,
    last_start: Option<Instant>,
}

/// Watches the customers' sockets: `accepted` and `closed` events.
struct Observer {
    registry: Mutex<Registry>,
    metrics: Arc<Metrics>,
}

impl EventObserver for Observer {
    fn on_event(&self, role: Role, conversation: &str, event: &Value, at: Instant) {
        if role != Role::Side(Side::Customer) {
            return;
        }
        let mut registry = lock(&self.registry);
        match event["kind"].as_str() {
            Some("accepted") => {
                if let Some(violation) = registry.ledger.accepted_event(conversation) {
                    self.metrics.violation(violation);
                }
                registry.accepted_at.entry(conversation.to_owned()).or_insert(at);
                self.metrics.count("chats_accepted", 1);
            }
            Some("closed" | "cancelled") => {
                registry.closed.insert(conversation.to_owned());
                if let Some(waiting) = registry.waiting_for_close.remove(conversation) {
                    let _ = waiting.send(());
                }
            }
            _ => {}
        }
    }
}

pub async fn run(ctx: &mut Ctx, args: ChatStormArgs) -> anyhow::Result<Report> {
    let routing = match args.routing {
        RoutingMode::Pull => "pull",
        RoutingMode::Push => "push",
    };
    let parameters = json!({
        "rate": args.rate, "count": args.count, "routing": routing, "drain_s": args.drain_s, "agents": ctx.common.agents,
    });
    ctx.metrics.declare(&["chats_started", "chats_accepted", "accept_wins", "chat_taken", "chats_closed"]);
    let count = ctx.shard.share(args.count);
    let observer = Arc::new(Observer { registry: Mutex::default(), metrics: ctx.metrics.clone() });
    let agents = ctx.sign_in_agents(observer.clone(), true).await?;
    if agents.is_empty() && ctx.shard.count == 1 {
        bail!("chat-storm needs agents: give --agents N (tokens {}0..)", ctx.common.agent_token_prefix);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let tag = format!("chat-storm {} ", ctx.run_id);
    let mut agent_tasks = JoinSet::new();
    for signed_in in agents {
        let agent = agent::AgentLoop::new(signed_in, args.routing, tag.clone(), observer.clone(), stop_rx.clone());
        agent_tasks.spawn(agent.run());
    }

    ctx.coordinator.barrier("start").await?;
    let start = Instant::now();
    let schedule = Schedule::sharded(start, args.rate, ctx.shard.index, ctx.shard.count);
    let mut customers = JoinSet::new();
    let mut pacer = Pacer::precise();
    for k in 0..count {
        let intended = schedule.wait_for(k, &mut pacer).await;
        ctx.metrics.record("schedule_lag", intended, Instant::now());
        let question = format!("{tag}{}-{k}", ctx.shard.index);
        customers.spawn(customer(
            ctx.clone_for_task(),
            ctx.group(k).to_owned(),
            question,
            intended,
            observer.clone(),
            stop_rx.clone(),
        ));
        while let Some(result) = customers.try_join_next() {
            ctx.metrics.joined(result);
        }
    }

    // Until every customer of this process is done (its chat closed, or its start failed), or the drain
    // time is over.
    let deadline = Instant::now() + Duration::from_secs_f64(args.drain_s);
    let mut connections = Vec::new();
    loop {
        tokio::select! {
            next = customers.join_next() => match next {
                None => break,
                Some(result) => connections.extend(ctx.metrics.joined(result).flatten()),
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    // Other processes' chats may still need this process's agents.
    ctx.coordinator.barrier("done").await?;
    let _ = stop_tx.send(true);
    while let Some(result) = customers.join_next().await {
        connections.extend(ctx.metrics.joined(result).flatten());
    }
    while let Some(result) = agent_tasks.join_next().await {
        connections.extend(ctx.metrics.joined(result).flatten());
    }
    close_all(connections).await;

    let registry = lock(&observer.registry);
    let first_seen_name = if args.routing == RoutingMode::Pull { "first_queue_added" } else { "offer" };
    let mut last_accept = None;
    for (conversation, intended) in &registry.intended {
        if let Some(seen) = registry.first_seen.get(conversation) {
            ctx.metrics.record(first_seen_name, *intended, *seen);
        }
        if let Some(accepted) = registry.accepted_at.get(conversation) {
            ctx.metrics.record("accepted", *intended, *accepted);
            last_accept = last_accept.max(Some(*accepted));
        }
    }
    for violation in registry.ledger.unaccepted() {
        ctx.metrics.violation(violation);
    }
    let queue_drain_ms = match (last_accept, registry.last_start) {
        (Some(accept), Some(start)) => Some(accept.saturating_duration_since(start).as_secs_f64() * 1000.0),
        _ => None,
    };
    let duration = last_accept.map_or(0.0, |at| at.duration_since(start).as_secs_f64());
    let accepted = registry.ledger.accepted_count() as u64;
    let won = registry.ledger.won();
    drop(registry);
    let mut report = Report::new("chat-storm", parameters, ctx.metrics.snapshot(), duration, accepted);
    report.chat_storm = Some(ChatStormSection { routing: routing.to_owned(), queue_drain_ms, won: vec![won] });
    Ok(report)
}

/// A customer: connects at its intended time, starts a chat, and stays until the chat is closed (or the run
/// ends). Returns its connection, to be closed.
async fn customer(
    task: TaskCtx,
    group: String,
    question: String,
    intended: Instant,
    observer: Arc<Observer>,
    mut stop: watch::Receiver<bool>,
) -> Option<crate::net::Connection> {
    let metrics = &task.metrics;
    let connection = match task.network.connect(Role::Side(Side::Customer), observer.clone(), false).await {
        Ok(connection) => connection,
        Err(error) => {
            metrics.error(&error.reason());
            return None;
        }
    };
    metrics.record("connect", intended, connection.welcome_at);
    let request = chat_start(&task.widget_key, &group, question);
    let ack = match connection.request("chat.start", request).await {
        Ok(ack) => ack,
        Err(error) => {
            metrics.error(&error.reason());
            return Some(connection);
        }
    };
    check_first_start(metrics, &ack.frame);
    let Some(conversation) = ack.frame["conversation"].as_str().map(str::to_owned) else {
        metrics.error("chat_start_ack_without_conversation");
        return Some(connection);
    };
    metrics.record("chat_start", intended, ack.at);
    metrics.count("chats_started", 1);
    metrics.operation();
    let (closed_tx, closed_rx) = oneshot::channel();
    {
        let mut registry = lock(&observer.registry);
        registry.ledger.started(&conversation);
        registry.intended.insert(conversation.clone(), intended);
        registry.last_start = registry.last_start.max(Some(ack.at));
        if registry.closed.contains(&conversation) {
            let _ = closed_tx.send(());
        } else {
            registry.waiting_for_close.insert(conversation, closed_tx);
        }
    }
    tokio::select! {
        _ = closed_rx => connection.close().await,
        _ = agent::stopped(&mut stop) => return Some(connection),
    }
    None
}

/// What a customer task needs of the run, owned.
struct TaskCtx {
    network: Arc<crate::net::Network>,
    metrics: Arc<Metrics>,
    widget_key: String,
}

impl Ctx {
    fn clone_for_task(&self) -> TaskCtx {
        TaskCtx {
            network: self.network.clone(),
            metrics: self.metrics.clone(),
            widget_key: self.common.widget_key.clone(),
        }
    }
}
