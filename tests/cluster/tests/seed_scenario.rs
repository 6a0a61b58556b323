//! The seed scenario on a cluster (two gateways, three routers, one store on PostgreSQL), with the customers
//! on one gateway and the agents on the other: queues, the accept race, messages both ways with delivery
//! marks, and the end of a chat all cross gateways and routers.

use serde_json::{Value, json};
use switchboard_cluster_tests::{Cluster, ClusterSpec, LogData};
use switchboard_e2e::{Client, SEED_CONFIG};

const WIDGET: &str = "acme-widget-key";

fn conversations(entries: &Value) -> Vec<String> {
    entries.as_array().unwrap().iter().map(|entry| entry["conversation"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_scenario_across_gateways() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec::new(SEED_CONFIG)).await?;
    let urls = cluster.gateway_urls();
    let (gateway_a, gateway_b) = (&urls[0], &urls[1]);

    let mut agent_a = Client::sign_in(gateway_b, "token-agent-a").await?;
    let mut agent_b = Client::sign_in(gateway_b, "token-agent-b").await?;
    assert_eq!(agent_a.push_of("queue.snapshot").await?["entries"], json!([]));
    assert_eq!(agent_b.push_of("queue.snapshot").await?["entries"], json!([]));

    // Three customers on gateway A start chats in g1, g2, g1; the agents on gateway B see them arrive.
    let (mut customer_1, chat_1, _) = Client::start_chat(gateway_a, WIDGET, "g1", "Ann", "where is my order?").await?;
    let (_customer_2, chat_2, _) = Client::start_chat(gateway_a, WIDGET, "g2", "Ben", "can I pay by card?").await?;
    let (_customer_3, chat_3, _) = Client::start_chat(gateway_a, WIDGET, "g1", "Cid", "do you ship abroad?").await?;
    // g1's and g2's queues may live on different routers: their pushes to A are not ordered between them.
    let mut added_for_a = Vec::new();
    for _ in 0..3 {
        added_for_a.push(agent_a.push_of("queue.added").await?["entry"]["conversation"].as_str().unwrap().to_owned());
    }
    added_for_a.sort();
    let mut all_three = vec![chat_1.clone(), chat_2.clone(), chat_3.clone()];
    all_three.sort();
    assert_eq!(added_for_a, all_three);
    assert_eq!(agent_b.push_of("queue.added").await?["entry"]["conversation"], *chat_1);
    assert_eq!(agent_b.push_of("queue.added").await?["entry"]["conversation"], *chat_3);
    let a_queue = agent_a.ok("queue.list", json!({})).await?;
    assert_eq!(conversations(&a_queue["entries"]), [chat_1.clone(), chat_2.clone(), chat_3.clone()]);
    let b_queue = agent_b.ok("queue.list", json!({})).await?;
    assert_eq!(conversations(&b_queue["entries"]), [chat_1.clone(), chat_3.clone()]);
    assert_eq!(customer_1.push_of("queue.position").await?["position"], 1);
    // The chats are spread over the routers by shard; the scenario does not depend on where they are.
    let owners = cluster.owners(&[chat_1.clone(), chat_2.clone(), chat_3.clone()]).await?;
    eprintln!("owners of the three chats: {owners:?}");

    // Both agents accept chat 1 at once: exactly one wins.
    let a_id = agent_a.send("chat.accept", json!({ "conversation": chat_1 })).await?;
    let b_id = agent_b.send("chat.accept", json!({ "conversation": chat_1 })).await?;
    let (a_answer, b_answer) = (agent_a.answer(&a_id).await?, agent_b.answer(&b_id).await?);
    assert!(a_answer.is_ok() != b_answer.is_ok(), "exactly one accept wins: {a_answer:?} {b_answer:?}");
    let (mut winner, mut loser, winner_name, loser_answer) = match a_answer {
        Ok(_) => (agent_a, agent_b, "agent-a", b_answer),
        Err(_) => (agent_b, agent_a, "agent-b", a_answer),
    };
    assert_eq!(loser_answer.unwrap_err()["code"], "chat_taken");
    let removed = loser.push_matching(|f| f["type"] == "queue.removed" && f["conversation"] == *chat_1).await?;
    assert_eq!((removed["reason"].as_str(), removed["agent"].as_str()), (Some("accepted"), Some(winner_name)));
    assert_eq!(customer_1.event_of(&chat_1, "accepted").await?["agent"], winner_name);

    // Messages both ways, with delivery marks, each side on its own gateway.
    let hello = winner
        .ok(
            "message.send",
            json!({ "conversation": chat_1, "client_msg_id": "w-1", "body": "Hello Ann, let me check." }),
        )
        .await?;
    assert_eq!((hello["status"].as_str(), hello["seq"].as_u64()), (Some("sent"), Some(4)));
    let received = customer_1.event_of(&chat_1, "message").await?;
    assert_eq!((received["seq"].as_u64(), received["body"].as_str()), (Some(4), Some("Hello Ann, let me check.")));
    customer_1.ok("message.delivered", json!({ "conversation": chat_1, "up_to_seq": 4 })).await?;
    let delivered = winner.event_of(&chat_1, "delivered").await?;
    assert_eq!((delivered["up_to_seq"].as_u64(), delivered["author"]["role"].as_str()), (Some(4), Some("customer")));

    let reply = customer_1
        .ok("message.send", json!({ "conversation": chat_1, "client_msg_id": "c-1", "body": "Thanks!" }))
        .await?;
    assert_eq!(reply["seq"].as_u64(), Some(6));
    let resent = customer_1
        .ok("message.send", json!({ "conversation": chat_1, "client_msg_id": "c-1", "body": "Thanks!" }))
        .await?;
    assert_eq!((resent["seq"].as_u64(), resent["duplicate"].as_bool()), (Some(6), Some(true)));
    let thanks = winner.event_of(&chat_1, "message").await?;
    assert_eq!((thanks["seq"].as_u64(), thanks["body"].as_str()), (Some(6), Some("Thanks!")));
    winner.ok("message.delivered", json!({ "conversation": chat_1, "up_to_seq": 6 })).await?;
    let delivered = customer_1
        .push_matching(|f| {
            f["type"] == "event" && f["event"]["kind"] == "delivered" && f["event"]["author"]["role"] == "agent"
        })
        .await?;
    assert_eq!(delivered["event"]["up_to_seq"].as_u64(), Some(6));

    // The winner closes the chat; the customer sees it; it is in the closed list with the full transcript.
    winner.ok("chat.close", json!({ "conversation": chat_1 })).await?;
    assert_eq!(customer_1.event_of(&chat_1, "closed").await?["author"]["id"], winner_name);
    let closed = winner.ok("chat.list", json!({ "list": "closed" })).await?;
    assert_eq!(conversations(&closed["chats"]), std::slice::from_ref(&chat_1));
    let transcript = winner.ok("chat.transcript", json!({ "conversation": chat_1 })).await?;
    let kinds: Vec<&str> =
        transcript["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "message", "accepted", "message", "delivered", "message", "delivered", "closed"]);
    for agent in [&mut winner, &mut loser] {
        let waiting = agent.ok("queue.list", json!({})).await?;
        assert!(!conversations(&waiting["entries"]).contains(&chat_1));
    }

    // The database agrees: gap-free logs, one owner per epoch, every event fenced, and the two chats still
    // waiting are owned by live routers.
    let report = cluster.check(&LogData::default()).await?;
    report.ensure_ok()?;
    assert_eq!(report.conversations, 3);
    eprintln!("checker: {}", report.summary());
    cluster.finish();
    Ok(())
}
