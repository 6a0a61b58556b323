//! `steady`: P chats in steady state. For each pair a customer `chat.start`s and an agent accepts the chat
//! by the id of the customer's ack (the load generator plays both sides: no waiting for queue pushes); then
//! the two sides send `message.send` in turn on an open-loop schedule, `--rate` messages per second in all.
//!
//! Latencies, from each message's intended send time: `ack` (its `sent` ack) and `message` (its `event`
//! on the other side's socket). Every message acked `sent` must reach the other side exactly once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Ctx, chat_start, check_first_start, close_all};
use crate::cli::SteadyArgs;
use crate::invariants::{MessageKey, MessageLedger, Receipt, Side};
use crate::metrics::{Metrics, lock};
use crate::net::{Connection, EventObserver, Role};
use crate::pacer::Pacer;
use crate::report::Report;
use crate::schedule::Schedule;

/// Counts the messages each side receives from the other.
struct Observer {
    ledger: Mutex<MessageLedger>,
    metrics: Arc<Metrics>,
}

impl EventObserver for Observer {
    fn on_event(&self, role: Role, conversation: &str, event: &Value, at: Instant) {
        let (Role::Side(receiver), Some("message"), Some(client_msg_id)) =
            (role, event["kind"].as_str(), event["client_msg_id"].as_str())
        else {
            return;
        };
        let sender = match event["author"]["role"].as_str() {
            Some("customer") => Side::Customer,
            Some("agent") => Side::Agent,
            _ => return,
        };
        if sender == receiver {
            return; // the sender's own copy
        }
        let key = MessageKey { conversation: conversation.to_owned(), sender, client_msg_id: client_msg_id.to_owned() };
        match lock(&self.ledger).received(&key) {
            Receipt::First { intended, measured } => {
                if measured {
                    self.metrics.record("message", intended, at);
                }
                self.metrics.count("messages_received", 1);
            }
            Receipt::Duplicate(_) => self.metrics.count("messages_received_again", 1),
            Receipt::Unknown => self.metrics.count("messages_not_of_this_run", 1),
        }
    }
}

/// One chat: its customer's connection and the console of the agent who accepted it.
struct Pair {
    conversation: String,
    customer: Arc<Connection>,
    agent: Arc<Connection>,
}

pub async fn run(ctx: &mut Ctx, args: SteadyArgs) -> anyhow::Result<Report> {
    let parameters = json!({
        "pairs": args.pairs, "rate": args.rate, "duration_s": args.duration_s, "warmup_s": args.warmup_s,
        "drain_s": args.drain_s, "body_bytes": args.body_bytes, "agents": ctx.common.agents,
        "pacing": if args.precise_pacing { "precise" } else { "coarse" },
    });
    let pair_count = ctx.shard.share(args.pairs);
    let rate = args.rate * pair_count as f64 / args.pairs as f64;
    ctx.metrics.declare(&["messages_sent", "messages_acked", "messages_received", "messages_failed"]);
    // Every message of the run, with 10 % to spare (the schedule is exact; the margin is for rounding).
    let expected = rate * (args.warmup_s + args.duration_s) * 1.1;
    let ledger = MessageLedger::with_capacity(expected.clamp(0.0, 50e6) as usize);
    let observer = Arc::new(Observer { ledger: Mutex::new(ledger), metrics: ctx.metrics.clone() });

    let agents = ctx.sign_in_agents(observer.clone(), false).await?;
    if agents.is_empty() {
        bail!(
            "process {} of {} has no agent for its {pair_count} pairs: give at least as many --agents as --processes",
            ctx.shard.index + 1,
            ctx.shard.count
        );
    }
    let mut slots = Vec::new(); // agent index per pair, spread evenly within free capacity
    for round in 0.. {
        let before = slots.len();
        slots.extend(agents.iter().enumerate().filter(|(_, a)| a.capacity > a.active + round).map(|(n, _)| n));
        if slots.len() == before || slots.len() as u64 >= pair_count {
            break;
        }
    }
    if (slots.len() as u64) < pair_count {
        bail!(
            "{pair_count} pairs need as many free agent slots, but the {} agents signed in here have {} (agents × \
             capacity, minus the chats they already hold): give more --agents or fewer --pairs",
            agents.len(),
            slots.len()
        );
    }
    slots.truncate(pair_count as usize);
    let agent_connections: Vec<Arc<Connection>> = agents.into_iter().map(|a| Arc::new(a.connection)).collect();
    let pairs = set_up_pairs(ctx, &slots, &agent_connections, observer.clone()).await;
    if pairs.is_empty() && pair_count > 0 {
        bail!("no chat could be started and accepted ({})", ctx.metrics.error_summary());
    }

    ctx.coordinator.barrier("start").await?;
    let start = Instant::now();
    let warmup = Duration::from_secs_f64(args.warmup_s);
    let total = warmup + Duration::from_secs_f64(args.duration_s);
    let body: String = "x".repeat(args.body_bytes.max(1));
    let mut senders = JoinSet::new();
    let interval = Duration::from_secs_f64(pairs.len() as f64 / rate.max(f64::MIN_POSITIVE));
    for (n, pair) in pairs.iter().enumerate() {
        let offset = Duration::from_secs_f64(n as f64 / rate.max(f64::MIN_POSITIVE));
        let schedule = Schedule::every(start, offset, interval);
        let sender = Sender {
            conversation: pair.conversation.clone(),
            customer: pair.customer.clone(),
            agent: pair.agent.clone(),
            observer: observer.clone(),
            body: body.clone(),
            measured_from: start + warmup,
            precise_pacing: args.precise_pacing,
        };
        senders.spawn(sender.run(schedule, schedule.count_before(total)));
    }
    while let Some(result) = senders.join_next().await {
        ctx.metrics.joined(result);
    }

    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain_s);
    while lock(&observer.ledger).undelivered() > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let ledger = lock(&observer.ledger);
        for violation in ledger.violations() {
            ctx.metrics.violation(violation);
        }
        ctx.metrics.count("messages_undelivered", ledger.undelivered() as u64);
        ctx.metrics.count("messages_received_unacked", ledger.received_unacked() as u64);
    }
    close_pairs(ctx, pairs).await;
    let agents: Vec<Connection> = agent_connections.into_iter().filter_map(|a| Arc::try_unwrap(a).ok()).collect();
    close_all(agents).await;

    let snapshot = ctx.metrics.snapshot();
    let measured_acks = snapshot.histograms.get("ack").map_or(0, |h| h.len());
    Ok(Report::new("steady", parameters, snapshot, args.duration_s, measured_acks))
}

/// Starts and accepts the chats, `--connect-concurrency` at a time; a pair that fails is left out.
async fn set_up_pairs(ctx: &Ctx, slots: &[usize], agents: &[Arc<Connection>], observer: Arc<Observer>) -> Vec<Pair> {
    let mut pairs = Vec::new();
    let mut setting_up = FuturesUnordered::new();
    let mut next = 0;
    while next < slots.len() || !setting_up.is_empty() {
        while next < slots.len() && setting_up.len() < ctx.common.connect_concurrency.max(1) {
            setting_up.push(set_up_pair(ctx, next as u64, agents[slots[next]].clone(), observer.clone()));
            next += 1;
        }
        match setting_up.next().await {
            Some(Ok(pair)) => pairs.push(pair),
            Some(Err(reason)) => {
                ctx.metrics.error(&reason);
                ctx.metrics.count("pairs_failed", 1);
            }
            None => {}
        }
    }
    pairs
}

async fn set_up_pair(ctx: &Ctx, n: u64, agent: Arc<Connection>, observer: Arc<Observer>) -> Result<Pair, String> {
    let customer = ctx.network.connect(Role::Side(Side::Customer), observer, false).await.map_err(|e| e.reason())?;
    let name = format!("steady {} {}-{n}", ctx.run_id, ctx.shard.index);
    let start = chat_start(&ctx.common.widget_key, ctx.group(n), name);
    let sent = Instant::now();
    let ack = customer.request("chat.start", start).await.map_err(|e| e.reason())?;
    ctx.metrics.record("setup_chat_start", sent, ack.at);
    check_first_start(&ctx.metrics, &ack.frame);
    let conversation = ack.frame["conversation"].as_str().ok_or("chat_start_ack_without_conversation")?.to_owned();
    let sent = Instant::now();
    let ack = agent.request("chat.accept", json!({ "conversation": conversation })).await.map_err(|e| e.reason())?;
    ctx.metrics.record("setup_chat_accept", sent, ack.at);
    Ok(Pair { conversation, customer: Arc::new(customer), agent })
}

/// Sends one pair's messages, the customer first, then in turn.
struct Sender {
    conversation: String,
    customer: Arc<Connection>,
    agent: Arc<Connection>,
    observer: Arc<Observer>,
    body: String,
    measured_from: Instant,
    /// A `timerfd` for this pair's sends instead of tokio's timer (`--precise-pacing`).
    precise_pacing: bool,
}

impl Sender {
    async fn run(self, schedule: Schedule, count: u64) {
        let this = Arc::new(self);
        let mut sends = JoinSet::new();
        // Thousands of messages a second: tokio's timer, not a wake-up per message (see `pacer`), unless asked.
        let mut pacer = if this.precise_pacing { Pacer::precise() } else { Pacer::coarse() };
        for k in 0..count {
            let intended = schedule.wait_for(k, &mut pacer).await;
            let side = if k % 2 == 0 { Side::Customer } else { Side::Agent };
            let key = MessageKey {
                conversation: this.conversation.clone(),
                sender: side,
                client_msg_id: format!("{}-{k}", side.name()),
            };
            let measured = intended >= this.measured_from;
            if measured {
                this.observer.metrics.record("schedule_lag", intended, Instant::now());
            }
            lock(&this.observer.ledger).expect(key.clone(), intended, measured);
            this.observer.metrics.count("messages_sent", 1);
            sends.spawn(this.clone().send(key));
            while let Some(result) = sends.try_join_next() {
                this.observer.metrics.joined(result);
            }
        }
        while let Some(result) = sends.join_next().await {
            this.observer.metrics.joined(result);
        }
    }

    async fn send(self: Arc<Self>, key: MessageKey) {
        let connection = match key.sender {
            Side::Customer => &self.customer,
            Side::Agent => &self.agent,
        };
        let request =
            json!({ "conversation": key.conversation, "client_msg_id": key.client_msg_id, "body": self.body });
        let metrics = &self.observer.metrics;
        match connection.request("message.send", request).await {
            Ok(ack) => match (ack.frame["status"].as_str(), ack.frame["seq"].as_u64()) {
                (Some("sent"), Some(seq)) => {
                    let intended = lock(&self.observer.ledger).acked(&key, seq);
                    if let Some((intended, true)) = intended {
                        metrics.record("ack", intended, ack.at);
                    }
                    if ack.frame["duplicate"] == true {
                        metrics.violation(format!(
                            "message {} in {}: a new message acked as a duplicate",
                            key.client_msg_id, key.conversation
                        ));
                    }
                    metrics.count("messages_acked", 1);
                    metrics.operation();
                }
                _ => {
                    metrics.error("message_ack_without_sent_and_seq");
                    metrics.count("messages_failed", 1);
                }
            },
            Err(error) => {
                metrics.error(&error.reason());
                metrics.count("messages_failed", 1);
            }
        }
    }
}

/// The agents close the chats; then the customers' connections close.
async fn close_pairs(ctx: &Ctx, pairs: Vec<Pair>) {
    let mut closing = FuturesUnordered::new();
    for pair in &pairs {
        closing.push(async move {
            match pair.agent.request("chat.close", json!({ "conversation": pair.conversation })).await {
                Ok(_) => ctx.metrics.count("chats_closed", 1),
                Err(error) => ctx.metrics.error(&error.reason()),
            }
        });
    }
    while closing.next().await.is_some() {}
    drop(closing);
    let customers = pairs.into_iter().filter_map(|pair| Arc::try_unwrap(pair.customer).ok()).collect();
    close_all(customers).await;
}
