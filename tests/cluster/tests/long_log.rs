//! A chat whose log is longer than any one message between the processes may be (64 MiB): a customer's
//! messages of control characters, each byte of which its stored JSON escapes into six (`\u0001`). The
//! log is read a page at a time everywhere: its transcript is answered in pages, an agent subscribing from
//! the start gets every event, and once the router that owns it is restarted, its actor is activated again
//! from the store and the chat goes on.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use switchboard_cluster_tests::{Cluster, ClusterSpec, Connection};
use tokio::time::Instant;

const WIDGET_KEY: &str = "acme-widget-key";
const DEADLINE: Duration = Duration::from_secs(30);
/// Bytes of body per message: 1 byte each as text, 6 escaped in JSON, so a frame of about 4 MB, within the
/// gateway's frame limit (4 × `max_message_bytes`), and a stored event of as much.
const BODY_BYTES: usize = 690_000;
/// Enough messages for a log of some 75 MB: more than the 64 MiB a gRPC message between the processes may
/// carry.
const MESSAGES: usize = 18;

const CONFIG: &str = r#"version: 1
limits:
  max_message_bytes: 1048576
  requests_per_second: 0
tenants:
  - id: acme
    name: Acme
    widget_keys: [acme-widget-key]
    groups:
      - id: open
        name: Open
        hours: { time_zone: Europe/Berlin, weekly: { mon: ["00:00-24:00"], tue: ["00:00-24:00"], wed: ["00:00-24:00"], thu: ["00:00-24:00"], fri: ["00:00-24:00"], sat: ["00:00-24:00"], sun: ["00:00-24:00"] } }
    agents:
      - { id: ann, name: Ann, token: token-of-ann, groups: [open], capacity: 2 }
"#;

fn seq(event: &Value) -> u64 {
    event["seq"].as_u64().unwrap_or(0)
}

/// The whole transcript, page after page; and how many pages it took.
async fn transcript(agent: &mut Connection, chat: &str) -> anyhow::Result<(Vec<Value>, usize)> {
    let (mut events, mut pages, mut after_seq) = (Vec::new(), 0, 0);
    loop {
        let fields = json!({ "conversation": chat, "after_seq": after_seq });
        let ack = agent.ok("chat.transcript", fields).await?;
        let page = ack["events"].as_array().context("no events")?.clone();
        pages += 1;
        if let Some(last) = page.last() {
            after_seq = seq(last);
        }
        events.extend(page);
        if ack["more"] != true {
            return Ok((events, pages));
        }
        if pages > 10 * MESSAGES {
            bail!("the transcript does not end: {pages} pages");
        }
    }
}

/// Every event from 1 to `last_seq`, once and in order, with every message sent in full.
fn assert_whole(events: &[Value], last_seq: u64, body: &str) {
    let seqs: Vec<u64> = events.iter().map(seq).collect();
    assert_eq!(seqs, (1..=last_seq).collect::<Vec<_>>(), "every event once, in order");
    let long = events.iter().filter(|event| event["kind"] == "message" && event["body"] == body).count();
    assert_eq!(long, MESSAGES, "every long message, whole");
}

/// A message sent until it is acknowledged (while the router restarts, a request may be refused as
/// retryable); its seq.
async fn send_until_acked(customer: &mut Connection, chat: &str, id: &str) -> anyhow::Result<u64> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let fields = json!({ "conversation": chat, "client_msg_id": id, "body": "still there?" });
        match customer.request("message.send", &fields).await? {
            Ok(ack) => return ack["seq"].as_u64().context("no seq"),
            Err(error) if error["retryable"] == true && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => bail!("message.send refused: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_longer_than_any_one_message_between_the_processes_is_read_in_pages() -> anyhow::Result<()> {
    let mut spec = ClusterSpec::new(CONFIG);
    spec.gateways = 1;
    spec.routers = 2;
    let mut cluster = Cluster::start(spec).await?;
    let url = cluster.gateway_urls()[0].clone();

    let mut customer = Connection::connect(&url).await?;
    let start = json!({ "widget_key": WIDGET_KEY, "group": "open", "name": "Cara", "question": "hello?" });
    let chat = customer.ok("chat.start", start).await?["conversation"].as_str().context("no id")?.to_owned();
    let mut agent = Connection::connect(&url).await?;
    agent.ok("agent.sign_in", json!({ "token": "token-of-ann" })).await?;
    agent.ok("chat.accept", json!({ "conversation": chat })).await?;

    let body = "\u{1}".repeat(BODY_BYTES);
    let mut last_seq = 0;
    for n in 0..MESSAGES {
        let fields = json!({ "conversation": chat, "client_msg_id": format!("m{n}"), "body": body });
        last_seq = customer.ok("message.send", fields).await?["seq"].as_u64().context("no seq")?;
        customer.take_pushes();
        // The agent's console reads its pushes as they come, as a console does (one that read nothing for the
        // write stall's 30 s would be disconnected as a slow consumer: on a busy machine the loop takes that).
        let mut pushed = agent.take_pushes();
        while !pushed.iter().any(|push| push["type"] == "event" && push["event"]["seq"] == last_seq) {
            agent.read_push(DEADLINE).await?;
            pushed = agent.take_pushes();
        }
    }
    // created, the question, accepted, the messages.
    assert_eq!(last_seq, 3 + MESSAGES as u64);

    let (events, pages) = transcript(&mut agent, &chat).await?;
    assert_whole(&events, last_seq, &body);
    assert!(pages > 1, "answered in pages, not in one frame of {} MB", 6 * BODY_BYTES * MESSAGES / 1_000_000);
    eprintln!("transcript of {last_seq} events in {pages} pages");

    // A console that subscribes from the start gets the events as pushes, every page of them.
    let mut console = Connection::connect(&url).await?;
    console.ok("agent.sign_in", json!({ "token": "token-of-ann" })).await?;
    console.ok("chat.subscribe", json!({ "conversation": chat, "after_seq": 0 })).await?;
    let deadline = Instant::now() + DEADLINE;
    let mut pushed = Vec::new();
    while pushed.last().map(seq) != Some(last_seq) {
        console.read_push(deadline.saturating_duration_since(Instant::now())).await?;
        pushed.extend(
            console
                .take_pushes()
                .into_iter()
                .filter(|push| push["type"] == "event" && push["conversation"] == chat.as_str())
                .map(|push| push["event"].clone()),
        );
    }
    assert_whole(&pushed, last_seq, &body);

    // The owner restarts: the chat's actor is activated again from the store, the whole log read.
    let owner = cluster.owner_of(&chat).await?;
    let owner = owner.live_owner().context("the chat has no owner")?.to_owned();
    cluster.router(&owner)?.restart().await?;
    cluster.wait_for_placement(true).await?;
    let sending = Instant::now();
    let next = send_until_acked(&mut customer, &chat, "after-restart").await?;
    eprintln!("the first message after the restart was acknowledged in {:?}", sending.elapsed());
    assert_eq!(next, last_seq + 1, "the chat goes on where it was");
    let (events, _) = transcript(&mut agent, &chat).await?;
    assert_whole(&events[..events.len() - 1], last_seq, &body);
    assert_eq!(events.last().map(|event| event["body"].clone()), Some(json!("still there?")));

    cluster.finish();
    Ok(())
}
