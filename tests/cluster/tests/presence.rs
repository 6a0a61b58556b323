//! Presence, business hours and push routing across processes, with a real Redis: which groups are online,
//! an agent whose connection drops (grace period, then offline: their offer moves on and their chats go back
//! to the queue), an offer that outlives the router owning its queue (killed with -9), and a Redis restart
//! under traffic.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use switchboard_cluster_tests::{Cluster, ClusterSpec, Connection};
use switchboard_domain::{GroupId, TenantId, queue_key, shard_of};
use tokio::time::Instant;

const WIDGET_KEY: &str = "acme-widget-key";
const DEADLINE: Duration = Duration::from_secs(20);

/// Group `open` is open around the clock, `never` has no opening hours, `push` routes by offer (3 s).
/// Agents: ann (open, never; capacity 2), pia (push; capacity 2), pat (push; capacity 2).
const CONFIG: &str = r#"version: 1
tenants:
  - id: acme
    name: Acme
    widget_keys: [acme-widget-key]
    groups:
      - id: open
        name: Open
        hours: { time_zone: Europe/Berlin, weekly: { mon: ["00:00-24:00"], tue: ["00:00-24:00"], wed: ["00:00-24:00"], thu: ["00:00-24:00"], fri: ["00:00-24:00"], sat: ["00:00-24:00"], sun: ["00:00-24:00"] } }
      - id: never
        name: Never
        hours: { time_zone: America/New_York, weekly: {} }
      - id: push
        name: Push
        routing: { mode: push, offer_timeout_ms: 3000 }
    agents:
      - { id: ann, name: Ann, token: token-of-ann, groups: [open, never], capacity: 2 }
      - { id: pia, name: Pia, token: token-of-pia, groups: [push], capacity: 2 }
      - { id: pat, name: Pat, token: token-of-pat, groups: [push], capacity: 2 }
"#;

async fn sign_in(url: &str, token: &str) -> anyhow::Result<Connection> {
    let mut connection = Connection::connect(url).await?;
    connection.ok("agent.sign_in", json!({ "token": token })).await?;
    Ok(connection)
}

async fn start_chat(url: &str, group: &str, name: &str) -> anyhow::Result<(Connection, String)> {
    let mut connection = Connection::connect(url).await?;
    let fields = json!({ "widget_key": WIDGET_KEY, "group": group, "name": name, "question": "hello?" });
    let ack = connection.ok("chat.start", fields).await?;
    let conversation = ack["conversation"].as_str().context("no conversation")?.to_owned();
    Ok((connection, conversation))
}

/// The online groups, as read from presence now (an answer from the gateway's cache during an outage is
/// marked stale and counts as nothing).
async fn online_groups(connection: &mut Connection) -> anyhow::Result<Vec<String>> {
    let ack = connection.ok("groups.list", json!({ "widget_key": WIDGET_KEY })).await?;
    if ack["stale"] == true {
        return Ok(Vec::new());
    }
    let groups = ack["groups"].as_array().context("no groups")?;
    let online = groups.iter().filter(|group| group["online"] == true);
    Ok(online.filter_map(|group| group["id"].as_str().map(str::to_owned)).collect())
}

/// Asks until `wanted` holds for the online groups (presence is refreshed every heartbeat).
async fn wait_for_groups(connection: &mut Connection, wanted: impl Fn(&[String]) -> bool) -> anyhow::Result<()> {
    let end = Instant::now() + DEADLINE;
    loop {
        let groups = online_groups(connection).await?;
        if wanted(&groups) {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("online groups stayed {groups:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads pushes until one matches; the others are kept aside and returned with it.
async fn push_matching(connection: &mut Connection, wanted: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(found) = connection.take_pushes().into_iter().find(|push| wanted(push)) {
            return Ok(found);
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no matching push within {DEADLINE:?}");
        }
        connection.read_push(left).await?;
    }
}

/// The kinds of a chat's stored events, in seq order.
async fn kinds_of(cluster: &Cluster, conversation: &str) -> anyhow::Result<Vec<String>> {
    Ok(cluster.db.events_of(conversation).await?.into_iter().map(|event| event.kind).collect())
}

fn is_offer_of(push: &Value, conversation: &str) -> bool {
    push["type"] == "offer" && push["entry"]["conversation"] == conversation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_online_when_open_with_an_agent_signed_in() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec::new(CONFIG)).await?;
    let urls = cluster.gateway_urls();
    let mut customer = Connection::connect(&urls[0]).await?;
    assert!(online_groups(&mut customer).await?.is_empty(), "nobody is signed in");
    let mut ann = sign_in(&urls[1], "token-of-ann").await?;
    // Open with ann: listed. Never open: not listed, though ann is its member.
    wait_for_groups(&mut customer, |groups| groups == ["open"]).await?;
    // A chat for a closed group is told so and can leave an offline message.
    let mut late = Connection::connect(&urls[0]).await?;
    let fields = json!({ "widget_key": WIDGET_KEY, "group": "never", "name": "Lou", "question": "open?" });
    let refused = late.request("chat.start", &fields).await?.err().context("a start in a closed group")?;
    assert_eq!(refused["code"], "group_closed");
    let message = json!({
        "widget_key": WIDGET_KEY, "group": "never", "name": "Lou", "contact": "lou@example.com",
        "body": "call me back", "reason": "group_closed", "idempotency_key": "lou-1",
    });
    let ticket = late.ok("offline.message", message).await?;
    assert_eq!(ticket["duplicate"], false);
    // A transfer to a group that is not online is refused.
    let (_customer, chat) = start_chat(&urls[0], "open", "Cy").await?;
    ann.ok("chat.accept", json!({ "conversation": chat })).await?;
    let refused = ann.request("chat.transfer", &json!({ "conversation": chat, "group": "never" })).await?;
    assert_eq!(refused.err().context("transfer to a closed group")?["code"], "group_offline");
    // Signing out takes the group offline at the next heartbeat.
    ann.ok("agent.sign_out", json!({})).await?;
    wait_for_groups(&mut customer, |groups| groups.is_empty()).await?;
    cluster.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_connection_drops_goes_offline_after_the_grace_period() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::new(CONFIG);
    spec.presence_grace_ms = 2_000;
    let cluster = Cluster::start(spec).await?;
    let urls = cluster.gateway_urls();
    let mut pia = sign_in(&urls[0], "token-of-pia").await?;
    let (_first_customer, first) = start_chat(&urls[1], "push", "Cy").await?;
    push_matching(&mut pia, |push| is_offer_of(push, &first)).await?;
    pia.ok("chat.accept", json!({ "conversation": first })).await?;
    let (_second_customer, second) = start_chat(&urls[1], "push", "Di").await?;
    push_matching(&mut pia, |push| is_offer_of(push, &second)).await?;
    // pat signs in; then pia's connection drops with an offer outstanding and a chat held.
    let mut pat = sign_in(&urls[1], "token-of-pat").await?;
    drop(pia);
    // After the grace period the offer moves on to pat, and pia's chat is back in the queue and offered too.
    push_matching(&mut pat, |push| is_offer_of(push, &second)).await?;
    pat.ok("chat.accept", json!({ "conversation": second })).await?;
    push_matching(&mut pat, |push| is_offer_of(push, &first)).await?;
    let kinds = kinds_of(&cluster, &first).await?;
    assert!(kinds.iter().any(|kind| kind == "requeued"), "{kinds:?}");
    cluster.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_times_out_and_moves_on_after_its_queue_router_is_killed() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec::new(CONFIG)).await?;
    let urls = cluster.gateway_urls();
    let mut pia = sign_in(&urls[0], "token-of-pia").await?;
    let (_customer, chat) = start_chat(&urls[1], "push", "Cy").await?;
    push_matching(&mut pia, |push| is_offer_of(push, &chat)).await?;
    let mut pat = sign_in(&urls[1], "token-of-pat").await?;
    // The router that owns the push queue dies with the offer outstanding.
    let shard = shard_of(&queue_key(&TenantId::new("acme")?, &GroupId::new("push")?)).0;
    let shards = cluster.shards_per_node().await?;
    let victim = shards.iter().find(|(_, owned)| owned.contains(&shard)).map(|(node, _)| node.clone());
    let victim = victim.context("nobody owns the push queue")?;
    cluster.router(&victim)?.kill_9().await?;
    cluster.wait_for_placement(false).await?;
    // Pia does not answer: the offer times out on the new owner and goes to pat.
    push_matching(&mut pat, |push| is_offer_of(push, &chat)).await?;
    pat.ok("chat.accept", json!({ "conversation": chat })).await?;
    let kinds = kinds_of(&cluster, &chat).await?;
    assert!(kinds.windows(2).any(|pair| pair == ["offered", "offer_ended"]), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("accepted"));
    cluster.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ongoing_chats_survive_a_redis_restart_and_presence_reconverges() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec::new(CONFIG)).await?;
    let urls = cluster.gateway_urls();
    let mut ann = sign_in(&urls[0], "token-of-ann").await?;
    let mut customer_view = Connection::connect(&urls[1]).await?;
    wait_for_groups(&mut customer_view, |groups| groups == ["open"]).await?;
    let (mut customer, chat) = start_chat(&urls[1], "open", "Cy").await?;
    ann.ok("chat.accept", json!({ "conversation": chat })).await?;

    tokio::task::block_in_place(|| cluster.redis.stop())?;
    // Redis is down: the chat goes on both ways.
    for n in 0..5 {
        let message =
            json!({ "conversation": chat, "client_msg_id": format!("c{n}"), "body": format!("customer {n}") });
        customer.ok("message.send", message).await?;
        let message = json!({ "conversation": chat, "client_msg_id": format!("a{n}"), "body": format!("agent {n}") });
        ann.ok("message.send", message).await?;
    }
    tokio::task::block_in_place(|| cluster.redis.start_again())?;
    // Back, and empty (no persistence): the group is online again without anyone signing in again, because
    // every heartbeat rewrites presence.
    let back = Instant::now();
    wait_for_groups(&mut customer_view, |groups| groups == ["open"]).await?;
    eprintln!("presence reconverged {:?} after Redis came back (heartbeat 500 ms)", back.elapsed());
    let message = json!({ "conversation": chat, "client_msg_id": "after", "body": "still here" });
    customer.ok("message.send", message).await?;
    let events = cluster.db.events_of(&chat).await?;
    assert_eq!(events.iter().filter(|event| event.kind == "message").count(), 12, "question + 10 + 1");
    cluster.finish();
    Ok(())
}

/// Starts a chat in `group`: the customer's connection, the chat and its customer token.
async fn start_chat_with_token(url: &str, group: &str, name: &str) -> anyhow::Result<(Connection, String, String)> {
    let mut connection = Connection::connect(url).await?;
    let fields = json!({ "widget_key": WIDGET_KEY, "group": group, "name": name, "question": "anyone there?" });
    let ack = connection.ok("chat.start", fields).await?;
    let conversation = ack["conversation"].as_str().context("no conversation")?.to_owned();
    let token = ack["customer_token"].as_str().context("no customer token")?.to_owned();
    Ok((connection, conversation, token))
}

fn is_abandoned(push: &Value, conversation: &str) -> bool {
    push["type"] == "queue.removed" && push["conversation"] == conversation && push["reason"] == "abandoned"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_chat_whose_customer_went_away_is_abandoned_and_its_license_permit_given_back() -> anyhow::Result<()>
{
    let mut spec = ClusterSpec::new(CONFIG);
    spec.customer_heartbeat_ms = 500;
    spec.abandon_after_ms = 2_000;
    spec.license_max_sessions = 2;
    let cluster = Cluster::start(spec).await?;
    let urls = cluster.gateway_urls();
    let mut ann = sign_in(&urls[0], "token-of-ann").await?;
    let (al, abandoned, _) = start_chat_with_token(&urls[1], "open", "Al").await?;
    let (bo, reloaded, bo_token) = start_chat_with_token(&urls[0], "open", "Bo").await?;
    // The license is full.
    let mut cy = Connection::connect(&urls[1]).await?;
    let fields = json!({ "widget_key": WIDGET_KEY, "group": "open", "name": "Cy", "question": "hello?" });
    let refused = cy.request("chat.start", &fields).await?.err().context("a start over the license")?;
    assert_eq!(refused["code"], "license_exhausted");
    // Bo reloads the page (a new connection, through the other gateway, resuming with the token); Al closes
    // the tab. Neither says `chat.cancel`.
    drop(bo);
    let mut bo = Connection::connect(&urls[1]).await?;
    bo.ok("customer.resume", json!({ "conversation": reloaded, "customer_token": bo_token, "after_seq": 0 })).await?;
    drop(al);
    // Al's chat is abandoned: the agents watching the queue are told why, and its permit is free again.
    push_matching(&mut ann, |push| is_abandoned(push, &abandoned)).await?;
    let (cy, late, _) = start_chat_with_token(&urls[1], "open", "Cy").await?;
    // Cy goes away too: abandoned in turn, a grace period later, while Bo, here all along, still waits.
    drop(cy);
    push_matching(&mut ann, |push| is_abandoned(push, &late)).await?;
    assert_eq!(kinds_of(&cluster, &abandoned).await?.last().map(String::as_str), Some("cancelled"));
    let bo_kinds = kinds_of(&cluster, &reloaded).await?;
    assert!(!bo_kinds.iter().any(|kind| kind == "cancelled"), "Bo's chat waits on: {bo_kinds:?}");
    bo.ok("message.send", json!({ "conversation": reloaded, "client_msg_id": "b1", "body": "still here" })).await?;
    cluster.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_longer_than_the_grace_period_abandons_no_chat_whose_customer_stayed() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::new(CONFIG);
    spec.customer_heartbeat_ms = 500;
    spec.abandon_after_ms = 2_000;
    let cluster = Cluster::start(spec).await?;
    let urls = cluster.gateway_urls();
    let mut ann = sign_in(&urls[0], "token-of-ann").await?;
    let (_al, stayed, _) = start_chat_with_token(&urls[1], "open", "Al").await?;
    // Redis hangs (answers nothing, keeps its data) for four times the grace period: every read of the
    // queues fails meanwhile (three or more of them, 2.5 s apart), and a failed read is no customer gone.
    // The outage's length is the scenario, not a wait for something.
    tokio::task::block_in_place(|| cluster.redis.pause())?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    tokio::task::block_in_place(|| cluster.redis.resume())?;
    // After it, a customer who goes away is abandoned a grace period later: the queues read again...
    let (bo, left, _) = start_chat_with_token(&urls[1], "open", "Bo").await?;
    drop(bo);
    push_matching(&mut ann, |push| is_abandoned(push, &left)).await?;
    // ...and Al, connected all along, was never taken for gone.
    let kinds = kinds_of(&cluster, &stayed).await?;
    assert!(!kinds.iter().any(|kind| kind == "cancelled"), "Al's chat waits on: {kinds:?}");
    cluster.finish();
    Ok(())
}

/// The agent's ongoing chats, each with whether its customer is away.
async fn away(agent: &mut Connection) -> anyhow::Result<Vec<(String, bool)>> {
    let ack = agent.ok("chat.list", json!({ "list": "ongoing" })).await?;
    let chats = ack["chats"].as_array().context("no chats")?;
    let away = |chat: &Value| Some((chat["conversation"].as_str()?.to_owned(), chat["customer_away"].as_bool()?));
    chats.iter().map(|chat| away(chat).context("a chat without its fields")).collect()
}

fn is_event(push: &Value, conversation: &str, kind: &str) -> bool {
    push["type"] == "event" && push["conversation"] == conversation && push["event"]["kind"] == kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_told_when_the_customer_of_their_chat_leaves_and_when_they_return() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::new(CONFIG);
    spec.customer_grace_ms = 1_000;
    let cluster = Cluster::start(spec).await?;
    let urls = cluster.gateway_urls();
    let mut ann = sign_in(&urls[0], "token-of-ann").await?;
    let (al, left, al_token) = start_chat_with_token(&urls[1], "open", "Al").await?;
    let (bo, reloaded, bo_token) = start_chat_with_token(&urls[0], "open", "Bo").await?;
    for chat in [&left, &reloaded] {
        ann.ok("chat.accept", json!({ "conversation": chat })).await?;
    }
    // Bo reloads the page (a new connection, through the other gateway); Al closes the tab.
    drop(bo);
    let mut bo = Connection::connect(&urls[1]).await?;
    bo.ok("customer.resume", json!({ "conversation": reloaded, "customer_token": bo_token, "after_seq": 0 })).await?;
    drop(al);
    // Ann is told, by the system, that Al left, a grace period after Al's last connection ended.
    let told = push_matching(&mut ann, |push| is_event(push, &left, "customer_left")).await?;
    assert_eq!(told["event"]["author"]["role"], "system");
    // Her list of ongoing chats shows which customers are away.
    assert_eq!(away(&mut ann).await?, [(left.clone(), true), (reloaded.clone(), false)]);
    // Al comes back, through the other gateway: Ann is told at once.
    let mut al = Connection::connect(&urls[0]).await?;
    al.ok("customer.resume", json!({ "conversation": left, "customer_token": al_token, "after_seq": 0 })).await?;
    push_matching(&mut ann, |push| is_event(push, &left, "customer_returned")).await?;
    assert_eq!(away(&mut ann).await?, [(left.clone(), false), (reloaded.clone(), false)]);
    al.ok("message.send", json!({ "conversation": left, "client_msg_id": "a1", "body": "sorry, I am back" })).await?;
    push_matching(&mut ann, |push| is_event(push, &left, "message")).await?;
    // Bo, connected all along but for the reload, was never taken for gone; the log keeps Al's absence.
    let bo_kinds = kinds_of(&cluster, &reloaded).await?;
    assert!(!bo_kinds.iter().any(|kind| kind.starts_with("customer_")), "{bo_kinds:?}");
    let al_kinds = kinds_of(&cluster, &left).await?;
    assert_eq!(al_kinds[al_kinds.len() - 3..], ["customer_left", "customer_returned", "message"]);
    bo.ok("message.send", json!({ "conversation": reloaded, "client_msg_id": "b1", "body": "still here" })).await?;
    cluster.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_told_the_customer_left_when_the_customers_gateway_is_killed() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::new(CONFIG);
    spec.customer_grace_ms = 1_000;
    spec.customer_heartbeat_ms = 500;
    let mut cluster = Cluster::start(spec).await?;
    let urls = cluster.gateway_urls();
    let mut ann = sign_in(&urls[0], "token-of-ann").await?;
    let (_al, lost, al_token) = start_chat_with_token(&urls[1], "open", "Al").await?;
    let (bo, stayed, _) = start_chat_with_token(&urls[0], "open", "Bo").await?;
    for chat in [&lost, &stayed] {
        ann.ok("chat.accept", json!({ "conversation": chat })).await?;
    }
    // Al's gateway dies with his connection: nothing ends it in presence, and no gateway tells his chat. His
    // record lapses, and Ann's owner, which reads her customers every few heartbeats, finds him gone.
    cluster.gateways[1].kill_9().await?;
    let told = push_matching(&mut ann, |push| is_event(push, &lost, "customer_left")).await?;
    assert_eq!(told["event"]["author"]["role"], "system");
    assert_eq!(away(&mut ann).await?, [(lost.clone(), true), (stayed.clone(), false)]);
    // Al comes back through the gateway left: Ann is told.
    let mut al = Connection::connect(&urls[0]).await?;
    al.ok("customer.resume", json!({ "conversation": lost, "customer_token": al_token, "after_seq": 0 })).await?;
    push_matching(&mut ann, |push| is_event(push, &lost, "customer_returned")).await?;
    // Bo, connected to the other gateway all along, was never taken for gone.
    let bo_kinds = kinds_of(&cluster, &stayed).await?;
    assert!(!bo_kinds.iter().any(|kind| kind.starts_with("customer_")), "{bo_kinds:?}");
    drop(bo);
    cluster.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addresss_chat_starts_are_counted_over_every_gateway() -> anyhow::Result<()> {
    // One chat a minute from an address, two at once; every client here is 127.0.0.1.
    let limits = "version: 1\nlimits: { chat_starts_per_minute_per_address: 1, chat_start_burst_per_address: 2 }\n";
    let cluster = Cluster::start(ClusterSpec::new(&CONFIG.replacen("version: 1\n", limits, 1))).await?;
    let urls = cluster.gateway_urls();
    let _ann = sign_in(&urls[0], "token-of-ann").await?;
    let (_al, _, _) = start_chat_with_token(&urls[0], "open", "Al").await?;
    let (_bo, _, _) = start_chat_with_token(&urls[1], "open", "Bo").await?;
    // The third is over the address's budget at either gateway (each alone would have one left).
    for url in &urls {
        let mut cy = Connection::connect(url).await?;
        let fields = json!({ "widget_key": WIDGET_KEY, "group": "open", "name": "Cy", "question": "me too?" });
        let refused = cy.request("chat.start", &fields).await?.err().context("a third chat start admitted")?;
        assert_eq!(refused["code"], "rate_limited", "{refused}");
        let wait = refused["retry_after_ms"].as_u64().context("no retry_after_ms")?;
        assert!((50_000..=60_000).contains(&wait), "{refused}");
    }
    cluster.finish();
    Ok(())
}
