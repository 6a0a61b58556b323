//! Push routing through the death of the router that owns the queue: chats start in a push-routed group
//! before, during and after its router is killed with SIGKILL, and two agents on two gateways take every offer
//! they are shown. Every chat is offered and taken, once, by the agents' consoles alone: none is stranded in a
//! queue that stopped, and no offer is left unseen or held after its end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use switchboard_cluster_tests::{Cluster, ClusterSpec, Connection};
use switchboard_domain::{GroupId, TenantId, queue_key, shard_of};
use tokio::sync::watch;
use tokio::time::Instant;

const WIDGET_KEY: &str = "acme-widget-key";
const CHATS: usize = 24;
/// Between two chat starts: the storm lasts some seconds, across the kill.
const PACE: Duration = Duration::from_millis(150);
/// How long a console takes to accept an offer it is shown.
const THINK: Duration = Duration::from_millis(700);
/// Every chat taken within this of the last start: the lease, a takeover, and an offer timeout or two.
const DEADLINE: Duration = Duration::from_secs(40);

/// Group `push` offers for 3 s; pia and pat take up to 20 chats each.
const CONFIG: &str = r#"version: 1
tenants:
  - id: acme
    name: Acme
    widget_keys: [acme-widget-key]
    groups:
      - id: push
        name: Push
        routing: { mode: push, offer_timeout_ms: 3000 }
    agents:
      - { id: pia, name: Pia, token: token-of-pia, groups: [push], capacity: 20 }
      - { id: pat, name: Pat, token: token-of-pat, groups: [push], capacity: 20 }
"#;

/// What the agents' consoles did: the chats each took, and the accepts refused (an offer shown twice, or
/// ended while the accept was on its way).
#[derive(Default)]
struct Taken {
    by_agent: BTreeMap<String, BTreeSet<String>>,
    refused: usize,
}

/// An agent's console: signs in, then accepts every offer it is shown, `THINK` after it is shown (as a person
/// would: offers are outstanding when the router dies), until `stop`.
async fn console(
    url: String,
    token: &'static str,
    name: &'static str,
    taken: Arc<Mutex<Taken>>,
    progress: Arc<watch::Sender<usize>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut connection = Connection::connect(&url).await?;
    connection.ok("agent.sign_in", json!({ "token": token })).await?;
    // Offers shown and not answered yet, with when to accept them.
    let mut pending: BTreeMap<String, Instant> = BTreeMap::new();
    while !*stop.borrow() {
        for push in connection.take_pushes() {
            if push["type"] == "offer" {
                let conversation = push["entry"]["conversation"].as_str().context("an offer without its chat")?;
                pending.entry(conversation.to_owned()).or_insert_with(|| Instant::now() + THINK);
            }
        }
        let now = Instant::now();
        let due: Vec<String> = pending.iter().filter(|(_, at)| **at <= now).map(|(chat, _)| chat.clone()).collect();
        for conversation in due {
            pending.remove(&conversation);
            match connection.request("chat.accept", &json!({ "conversation": conversation })).await? {
                Ok(_) => {
                    let fresh =
                        taken.lock().unwrap().by_agent.entry(name.to_owned()).or_default().insert(conversation.clone());
                    if !fresh {
                        bail!("{name} took {conversation} twice");
                    }
                    progress.send_modify(|n| *n += 1);
                }
                Err(_) => taken.lock().unwrap().refused += 1,
            }
        }
        let next = pending.values().min().copied().unwrap_or(now + Duration::from_millis(500));
        tokio::select! {
            read = connection.read_push(next.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))) => {
                if let Err(error) = read
                    && !format!("{error:#}").contains("before the deadline")
                {
                    return Err(error.context(format!("{name}'s console")));
                }
            }
            _ = stop.changed() => {}
        }
    }
    Ok(())
}

/// Starts a chat in `push`, sending the start again with its key until it is answered (the start may meet the
/// takeover); the customer's connection stays open.
async fn start_chat(url: &str, n: usize) -> anyhow::Result<(Connection, String)> {
    let fields = json!({
        "widget_key": WIDGET_KEY, "group": "push", "name": format!("Cy {n}"), "question": "hello?",
        "start_key": format!("5e1f0000-0000-4000-8000-{n:012}"),
    });
    let end = Instant::now() + DEADLINE;
    loop {
        let attempt = async {
            let mut connection = Connection::connect(url).await?;
            let ack = connection.ok("chat.start", fields.clone()).await?;
            let conversation = ack["conversation"].as_str().context("no conversation")?.to_owned();
            anyhow::Ok((connection, conversation))
        };
        match attempt.await {
            Ok(started) => return Ok(started),
            Err(error) if Instant::now() < end => eprintln!("start {n} sent again: {error:#}"),
            Err(error) => return Err(error),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chat_of_a_push_group_is_offered_and_taken_once_across_the_death_of_its_queues_router()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec::new(CONFIG)).await?;
    let urls = cluster.gateway_urls();
    let taken = Arc::new(Mutex::new(Taken::default()));
    let (progress, mut taken_so_far) = watch::channel(0);
    let progress = Arc::new(progress);
    let (stop, stopped) = watch::channel(false);
    let consoles =
        [("token-of-pia", "pia"), ("token-of-pat", "pat")].into_iter().enumerate().map(|(i, (token, name))| {
            let url = urls[i % urls.len()].clone();
            tokio::spawn(console(url, token, name, taken.clone(), progress.clone(), stopped.clone()))
        });
    let consoles: Vec<_> = consoles.collect();

    let shard = shard_of(&queue_key(&TenantId::new("acme")?, &GroupId::new("push")?)).0;
    let shards = cluster.shards_per_node().await?;
    let victim = shards.iter().find(|(_, owned)| owned.contains(&shard)).map(|(node, _)| node.clone());
    let victim = victim.context("nobody owns the push queue")?;

    let mut customers = Vec::new();
    let mut chats = Vec::new();
    let mut pace = tokio::time::interval(PACE);
    for n in 0..CHATS {
        pace.tick().await;
        if n == CHATS / 3 {
            eprintln!("killing {victim}, which owns the push queue");
            cluster.router(&victim)?.kill_9().await?;
        }
        let (customer, chat) = start_chat(&urls[n % urls.len()], n).await?;
        customers.push(customer);
        chats.push(chat);
    }

    let last_start = Instant::now();
    let all_taken = tokio::time::timeout(DEADLINE, taken_so_far.wait_for(|n| *n >= CHATS)).await;
    if all_taken.is_err() {
        let done: BTreeSet<String> = taken.lock().unwrap().by_agent.values().flatten().cloned().collect();
        let missing: Vec<&String> = chats.iter().filter(|chat| !done.contains(*chat)).collect();
        bail!("{} of {CHATS} chats not taken {DEADLINE:?} after the last start: {missing:?}", missing.len());
    }
    eprintln!("every chat taken {:?} after the last start", last_start.elapsed());
    let _ = stop.send(true);
    for console in consoles {
        console.await??;
    }
    let taken = Arc::try_unwrap(taken).ok().context("a console still runs")?.into_inner().unwrap();
    eprintln!(
        "taken: {:?}; accepts refused: {}",
        taken.by_agent.iter().map(|(a, c)| (a, c.len())).collect::<Vec<_>>(),
        taken.refused
    );
    let per_agent: usize = taken.by_agent.values().map(BTreeSet::len).sum();
    assert_eq!(per_agent, CHATS, "each chat taken by one agent only");

    // The store agrees: one `accepted` per chat, after at least one offer to the agent who took it.
    for chat in &chats {
        let events = cluster.db.events_of(chat).await?;
        let kinds: Vec<&str> = events.iter().map(|event| event.kind.as_str()).collect();
        assert_eq!(kinds.iter().filter(|kind| **kind == "accepted").count(), 1, "{chat}: {kinds:?}");
        assert_eq!(kinds.iter().filter(|kind| **kind == "created").count(), 1, "{chat}: {kinds:?}");
        assert!(kinds.contains(&"offered"), "{chat}: {kinds:?}");
    }
    drop(customers);
    cluster.finish();
    Ok(())
}
