//! Crash safety: `serve` is killed with SIGKILL in the middle of conversations and started again on the
//! same data. Nothing acknowledged is lost, resends are stored once, and clients resume with no gap.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use switchboard_e2e::{Client, SEED_CONFIG, Server};
use tokio::sync::mpsc;

const WIDGET: &str = "acme-widget-key";

/// What one sender saw before the crash: acknowledged messages (client id → seq) and the one in flight.
#[derive(Debug, Default)]
struct SenderLog {
    acked: BTreeMap<String, u64>,
    in_flight: Option<(String, String)>,
}

/// Sends messages one after another until the connection dies, reporting each acknowledgement.
async fn send_until_the_crash(
    mut client: Client,
    conversation: String,
    prefix: &'static str,
    acks: mpsc::UnboundedSender<()>,
) -> SenderLog {
    let mut log = SenderLog::default();
    for n in 0.. {
        let client_msg_id = format!("{prefix}-{n}");
        let body = format!("{prefix} message {n}");
        let sent = client
            .send("message.send", json!({ "conversation": conversation, "client_msg_id": client_msg_id, "body": body }))
            .await;
        let answer = match sent {
            Ok(id) => client.answer(&id).await,
            Err(error) => Err(error),
        };
        match answer {
            Ok(Ok(ack)) => {
                log.acked.insert(client_msg_id, ack["seq"].as_u64().expect("an ack has a seq"));
                let _ = acks.send(());
            }
            Ok(Err(error)) => panic!("message refused before the crash: {error}"),
            Err(_) => {
                log.in_flight = Some((client_msg_id, body));
                return log;
            }
        }
    }
    unreachable!()
}

fn conversations(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|entry| entry["conversation"].as_str().unwrap().to_owned()).collect()
}

fn assert_gap_free(events: &[Value]) {
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["seq"].as_u64(), Some(index as u64 + 1), "gap or duplicate in {events:?}");
    }
}

fn messages_with_id<'a>(events: &'a [Value], client_msg_id: &str) -> Vec<&'a Value> {
    events.iter().filter(|event| event["client_msg_id"] == client_msg_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();

    // Four chats in two groups; agent A accepts the first two.
    let (customer_1, chat_1, token_1) = Client::start_chat(&url, WIDGET, "g1", "Ann", "order missing").await?;
    let (_customer_2, chat_2, _) = Client::start_chat(&url, WIDGET, "g2", "Ben", "card refused").await?;
    let (_customer_3, chat_3, _) = Client::start_chat(&url, WIDGET, "g1", "Cid", "shipping?").await?;
    let (_customer_4, chat_4, _) = Client::start_chat(&url, WIDGET, "g2", "Dee", "refund?").await?;
    let mut agent = Client::sign_in(&url, "token-agent-a").await?;
    agent.ok("chat.accept", json!({ "conversation": chat_1 })).await?;
    agent.ok("chat.accept", json!({ "conversation": chat_2 })).await?;

    // Steady traffic in both ongoing chats from both sides, then SIGKILL in the middle of it.
    let (acks_sender, mut acks) = mpsc::unbounded_channel();
    let customer_traffic =
        tokio::spawn(send_until_the_crash(customer_1, chat_1.clone(), "customer", acks_sender.clone()));
    let agent_traffic = tokio::spawn(send_until_the_crash(agent, chat_2.clone(), "agent", acks_sender));
    for _ in 0..60 {
        acks.recv().await.expect("senders are running");
    }
    let server = server.crash_and_restart().await?;
    let customer_log = customer_traffic.await?;
    let agent_log = agent_traffic.await?;
    assert!(customer_log.acked.len() + agent_log.acked.len() >= 60);
    let url = server.ws_url();

    // The waiting queue keeps its order, the ongoing chats are still the agent's.
    let mut agent = Client::sign_in(&url, "token-agent-a").await?;
    let snapshot = agent.push_of("queue.snapshot").await?;
    assert_eq!(conversations(&snapshot["entries"]), [chat_3.clone(), chat_4.clone()]);
    let mut ongoing = conversations(&agent.ok("chat.list", json!({ "list": "ongoing" })).await?["chats"]);
    ongoing.sort();
    let mut expected = vec![chat_1.clone(), chat_2.clone()];
    expected.sort();
    assert_eq!(ongoing, expected);

    // Every acknowledged message is in the transcript exactly once, at the seq it was acknowledged with.
    for (chat, log) in [(&chat_1, &customer_log), (&chat_2, &agent_log)] {
        let transcript = agent.ok("chat.transcript", json!({ "conversation": chat })).await?;
        let events = transcript["events"].as_array().unwrap().clone();
        assert_gap_free(&events);
        for (client_msg_id, seq) in &log.acked {
            let stored = messages_with_id(&events, client_msg_id);
            assert_eq!(stored.len(), 1, "{client_msg_id} stored {} times", stored.len());
            assert_eq!(stored[0]["seq"].as_u64(), Some(*seq));
        }
    }

    // The customer resumes from the last seq it had acknowledged and gets exactly the gap.
    let last_seen = *customer_log.acked.values().max().unwrap();
    let mut customer = Client::connect(&url).await?;
    let resumed = customer
        .ok("customer.resume", json!({ "conversation": chat_1, "customer_token": token_1, "after_seq": last_seen }))
        .await?;
    let last_seq = resumed["chat"]["last_seq"].as_u64().unwrap();
    if last_seq > last_seen {
        let gap = customer.events_up_to(&chat_1, last_seq).await?;
        let seqs: Vec<u64> = gap.iter().map(|event| event["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (last_seen + 1..=last_seq).collect::<Vec<_>>());
    }

    // The message in flight at the crash may or may not have been stored; resent, it is stored once.
    let (in_flight_id, in_flight_body) = customer_log.in_flight.clone().expect("the customer was sending at the crash");
    let resend = json!({ "conversation": chat_1, "client_msg_id": in_flight_id, "body": in_flight_body });
    let first = customer.ok("message.send", resend.clone()).await?;
    let second = customer.ok("message.send", resend).await?;
    assert_eq!(first["seq"], second["seq"]);
    assert_eq!(second["duplicate"], true);
    // An acknowledged message resent after the restart is recognised too.
    let (acked_id, acked_seq) = customer_log.acked.iter().next().unwrap();
    let again = json!({ "conversation": chat_1, "client_msg_id": acked_id, "body": "whatever the client resends" });
    let again = customer.ok("message.send", again).await?;
    assert_eq!((again["seq"].as_u64(), again["duplicate"].as_bool()), (Some(*acked_seq), Some(true)));

    let transcript = agent.ok("chat.transcript", json!({ "conversation": chat_1 })).await?;
    let events = transcript["events"].as_array().unwrap().clone();
    assert_gap_free(&events);
    assert_eq!(messages_with_id(&events, &in_flight_id).len(), 1);

    // The chat goes on after the restart: the agent answers, the customer receives it.
    let sent = agent
        .ok("message.send", json!({ "conversation": chat_1, "client_msg_id": "after-restart", "body": "still here" }))
        .await?;
    let received =
        customer.push_matching(|f| f["type"] == "event" && f["event"]["client_msg_id"] == "after-restart").await?;
    assert_eq!(
        (received["event"]["seq"].as_u64(), received["event"]["body"].as_str()),
        (sent["seq"].as_u64(), Some("still here"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_closed_chats_readable_and_queues_in_order() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let mut agent = Client::sign_in(&url, "token-agent-b").await?;
    let mut waiting = Vec::new();
    for n in 0..5 {
        let (_customer, chat, _) = Client::start_chat(&url, WIDGET, "g1", &format!("C{n}"), "hello?").await?;
        waiting.push(chat);
    }
    let done = waiting.remove(2);
    agent.ok("chat.accept", json!({ "conversation": done })).await?;
    agent.ok("message.send", json!({ "conversation": done, "client_msg_id": "b-1", "body": "solved" })).await?;
    agent.ok("chat.close", json!({ "conversation": done })).await?;

    let server = server.crash_and_restart().await?;
    let mut agent = Client::sign_in(&server.ws_url(), "token-agent-b").await?;
    assert_eq!(conversations(&agent.push_of("queue.snapshot").await?["entries"]), waiting);
    let closed = agent.ok("chat.list", json!({ "list": "closed" })).await?;
    assert_eq!(conversations(&closed["chats"]), std::slice::from_ref(&done));
    let transcript = agent.ok("chat.transcript", json!({ "conversation": done })).await?;
    let kinds: Vec<&str> =
        transcript["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "message", "accepted", "message", "closed"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_starts_sent_again_after_a_crash_are_one_chat_each() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let start = |n: usize| {
        json!({
            "widget_key": WIDGET, "group": "g1", "name": format!("Kay {n}"), "question": "hello?",
            "start_key": format!("5e1f0000-0000-4000-8000-{n:012}"),
        })
    };
    // One start answered before the crash, then eight in flight when the server is killed: each of those
    // may or may not have been stored, and its widget does not know.
    let before = Client::connect(&url).await?.ok("chat.start", start(0)).await?;
    let mut in_flight = Vec::new();
    for n in 1..=8 {
        let mut widget = Client::connect(&url).await?;
        widget.send("chat.start", start(n)).await?;
        in_flight.push(widget);
    }
    let server = server.crash_and_restart().await?;
    drop(in_flight);
    let url = server.ws_url();

    // Each widget sends its start again, twice: one chat each, the same both times.
    let (mut chats, mut tokens) = (Vec::new(), Vec::new());
    let mut stored_before_the_crash = 0;
    for n in 0..=8 {
        let again = Client::connect(&url).await?.ok("chat.start", start(n)).await?;
        let third = Client::connect(&url).await?.ok("chat.start", start(n)).await?;
        assert_eq!(
            (&third["conversation"], &third["customer_token"]),
            (&again["conversation"], &again["customer_token"])
        );
        assert_eq!(third["duplicate"], true);
        if n == 0 {
            assert_eq!(again["duplicate"], true, "the start answered before the crash was stored");
        }
        if again["duplicate"] == true {
            stored_before_the_crash += 1;
        }
        chats.push(again["conversation"].as_str().unwrap().to_owned());
        tokens.push(again["customer_token"].as_str().unwrap().to_owned());
    }
    let token = |ack: &Value| ack["customer_token"].as_str().unwrap().to_owned();
    assert_eq!((before["conversation"].as_str(), token(&before)), (Some(chats[0].as_str()), tokens[0].clone()));
    eprintln!("{stored_before_the_crash} of the 9 starts were stored before the crash");

    // Nothing twice: the waiting list has the nine chats, each with one `created` event.
    let mut agent = Client::sign_in(&url, "token-agent-b").await?;
    let mut waiting = conversations(&agent.push_of("queue.snapshot").await?["entries"]);
    waiting.sort();
    let mut expected = chats.clone();
    expected.sort();
    expected.dedup();
    assert_eq!((waiting.len(), &waiting), (9, &expected));
    for chat in &chats {
        let transcript = agent.ok("chat.transcript", json!({ "conversation": chat })).await?;
        let events = transcript["events"].as_array().unwrap();
        assert_gap_free(events);
        assert_eq!(events.iter().filter(|event| event["kind"] == "created").count(), 1, "{events:?}");
    }
    Ok(())
}

/// `SEED_CONFIG`'s tenant with a push-routed group whose offers last long enough to outlive a restart.
const PUSH_CONFIG: &str = r#"
version: 1
tenants:
  - id: acme
    name: Acme
    widget_keys: [acme-widget-key]
    groups:
      - { id: support, name: Support, routing: { mode: push, offer_timeout_ms: 60000 } }
    agents:
      - { id: agent-a, name: Agent A, token: token-agent-a, groups: [support], capacity: 2 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_offered_at_a_crash_is_offered_again_to_its_agent_once_they_are_back() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(PUSH_CONFIG, data.path()).await?;
    let mut agent = Client::sign_in(&server.ws_url(), "token-agent-a").await?;
    let (_customer, chat, _) = Client::start_chat(&server.ws_url(), WIDGET, "support", "Kay", "hello?").await?;
    let offer = agent.push_of("offer").await?;
    assert_eq!(offer["entry"]["conversation"], chat.as_str());

    // The restarted server has lost what the agent chose (presence is in memory): they are away until they
    // come back, and their offer is withdrawn. Their console signs in again: the chat is offered to them at
    // once (not after the offer's 60 s, as a new round would be), and they take it.
    let server = server.crash_and_restart().await?;
    let mut agent = Client::sign_in(&server.ws_url(), "token-agent-a").await?;
    // (A console that signs in before the withdrawal is first shown the old offer: the new one expires later.)
    let first_expiry = offer["expires_at_ms"].as_i64().unwrap_or_default();
    let again = agent
        .push_matching(|frame| frame["type"] == "offer" && frame["expires_at_ms"].as_i64() > Some(first_expiry))
        .await?;
    assert_eq!(again["entry"]["conversation"], chat.as_str());
    let view = agent.ok("chat.accept", json!({ "conversation": chat })).await?;
    assert_eq!(view["chat"]["owner"], "agent-a", "{view}");
    let transcript = agent.ok("chat.transcript", json!({ "conversation": chat })).await?;
    let kinds: Vec<&str> =
        transcript["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "message", "offered", "offer_ended", "offered", "accepted"]);
    Ok(())
}
