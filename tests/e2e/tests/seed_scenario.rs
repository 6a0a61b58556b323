//! The seed scenario of the core: waiting queues across groups, the accept race, messages with sequence
//! numbers and sent/delivered marks, and the end of a chat — over real sockets to a real `serve`.

use serde_json::{Value, json};
use switchboard_e2e::{Client, SEED_CONFIG, Server};

const WIDGET: &str = "acme-widget-key";

fn conversations(entries: &Value) -> Vec<String> {
    entries.as_array().unwrap().iter().map(|entry| entry["conversation"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_scenario() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();

    let mut agent_a = Client::sign_in(&url, "token-agent-a").await?;
    let mut agent_b = Client::sign_in(&url, "token-agent-b").await?;
    assert_eq!(agent_a.push_of("queue.snapshot").await?["entries"], json!([]));
    assert_eq!(agent_b.push_of("queue.snapshot").await?["entries"], json!([]));

    // Three customers start chats in g1, g2, g1, in that order.
    let (mut customer_1, chat_1, _) = Client::start_chat(&url, WIDGET, "g1", "Ann", "where is my order?").await?;
    let (_customer_2, chat_2, _) = Client::start_chat(&url, WIDGET, "g2", "Ben", "can I pay by card?").await?;
    let (_customer_3, chat_3, _) = Client::start_chat(&url, WIDGET, "g1", "Cid", "do you ship abroad?").await?;

    // A's waiting queue lists all three in arrival order, B's the two g1 chats; both were updated live.
    for expected in [&chat_1, &chat_2, &chat_3] {
        let added = agent_a.push_of("queue.added").await?;
        assert_eq!(added["entry"]["conversation"], **expected);
    }
    assert_eq!(agent_b.push_of("queue.added").await?["entry"]["conversation"], *chat_1);
    assert_eq!(agent_b.push_of("queue.added").await?["entry"]["conversation"], *chat_3);
    let a_queue = agent_a.ok("queue.list", json!({})).await?;
    assert_eq!(conversations(&a_queue["entries"]), [chat_1.clone(), chat_2.clone(), chat_3.clone()]);
    let b_queue = agent_b.ok("queue.list", json!({})).await?;
    assert_eq!(conversations(&b_queue["entries"]), [chat_1.clone(), chat_3.clone()]);
    // The customers see their position in their group's queue.
    assert_eq!(customer_1.push_of("queue.position").await?["position"], 1);

    // A and B accept chat 1 at the same moment: exactly one wins, the other is told it was taken.
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
    let accepted = customer_1.event_of(&chat_1, "accepted").await?;
    assert_eq!(accepted["agent"], winner_name);

    // Messages flow both ways, each acknowledged as sent with its sequence number once stored.
    let hello = winner
        .ok(
            "message.send",
            json!({ "conversation": chat_1, "client_msg_id": "w-1", "body": "Hello Ann, let me check." }),
        )
        .await?;
    assert_eq!((hello["status"].as_str(), hello["seq"].as_u64()), (Some("sent"), Some(4)));
    let received = customer_1.event_of(&chat_1, "message").await?;
    assert_eq!((received["seq"].as_u64(), received["body"].as_str()), (Some(4), Some("Hello Ann, let me check.")));
    // The customer's client confirms delivery; the agent sees the delivered mark.
    customer_1.ok("message.delivered", json!({ "conversation": chat_1, "up_to_seq": 4 })).await?;
    let delivered = winner.event_of(&chat_1, "delivered").await?;
    assert_eq!((delivered["up_to_seq"].as_u64(), delivered["author"]["role"].as_str()), (Some(4), Some("customer")));

    let reply = customer_1
        .ok("message.send", json!({ "conversation": chat_1, "client_msg_id": "c-1", "body": "Thanks!" }))
        .await?;
    let reply_seq = reply["seq"].as_u64().unwrap();
    assert_eq!(reply_seq, 6);
    // A resend with the same client message id is stored once.
    let resent = customer_1
        .ok("message.send", json!({ "conversation": chat_1, "client_msg_id": "c-1", "body": "Thanks!" }))
        .await?;
    assert_eq!((resent["seq"].as_u64(), resent["duplicate"].as_bool()), (Some(reply_seq), Some(true)));
    let thanks = winner.event_of(&chat_1, "message").await?;
    assert_eq!((thanks["seq"].as_u64(), thanks["body"].as_str()), (Some(6), Some("Thanks!")));
    winner.ok("message.delivered", json!({ "conversation": chat_1, "up_to_seq": 6 })).await?;
    // The customer's client sees its own mark (seq 5) too; the agent's is the one that matters here.
    let delivered = customer_1
        .push_matching(|f| {
            f["type"] == "event" && f["event"]["kind"] == "delivered" && f["event"]["author"]["role"] == "agent"
        })
        .await?;
    assert_eq!(
        (delivered["event"]["author"]["id"].as_str(), delivered["event"]["up_to_seq"].as_u64()),
        (Some(winner_name), Some(6))
    );

    // The winner ends the chat: it is in their closed list with the full transcript, and in nobody's
    // waiting or ongoing list.
    let ongoing = winner.ok("chat.list", json!({ "list": "ongoing" })).await?;
    assert_eq!(conversations(&ongoing["chats"]), std::slice::from_ref(&chat_1));
    winner.ok("chat.close", json!({ "conversation": chat_1 })).await?;
    assert_eq!(customer_1.event_of(&chat_1, "closed").await?["author"]["id"], winner_name);
    let closed = winner.ok("chat.list", json!({ "list": "closed" })).await?;
    assert_eq!(conversations(&closed["chats"]), std::slice::from_ref(&chat_1));
    assert_eq!(closed["chats"][0]["state"], "closed");
    let ongoing = winner.ok("chat.list", json!({ "list": "ongoing" })).await?;
    assert_eq!(ongoing["chats"], json!([]));
    let transcript = winner.ok("chat.transcript", json!({ "conversation": chat_1 })).await?;
    let kinds: Vec<&str> =
        transcript["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "message", "accepted", "message", "delivered", "message", "delivered", "closed"]);
    let seqs: Vec<u64> = transcript["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    for agent in [&mut winner, &mut loser] {
        let waiting = agent.ok("queue.list", json!({})).await?;
        assert!(!conversations(&waiting["entries"]).contains(&chat_1));
    }
    let loser_ongoing = loser.ok("chat.list", json!({ "list": "ongoing" })).await?;
    assert_eq!(loser_ongoing["chats"], json!([]));
    // Chat 3 moved up to first place in g1.
    let b_or_a_queue = loser.ok("queue.list", json!({})).await?;
    assert!(conversations(&b_or_a_queue["entries"]).ends_with(std::slice::from_ref(&chat_3)));

    assert!(server.is_running());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_accepts_have_exactly_one_winner_every_time() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let mut agent_a = Client::sign_in(&url, "token-agent-a").await?;
    let mut agent_b = Client::sign_in(&url, "token-agent-b").await?;
    let (mut wins_a, mut wins_b) = (0, 0);
    for round in 0..40 {
        let (_customer, chat, _) =
            Client::start_chat(&url, WIDGET, "g1", "Racer", &format!("question {round}")).await?;
        // Both requests are on the wire before either answer is read.
        let a_id = agent_a.send("chat.accept", json!({ "conversation": chat })).await?;
        let b_id = agent_b.send("chat.accept", json!({ "conversation": chat })).await?;
        let a_answer = agent_a.answer(&a_id).await?;
        let b_answer = agent_b.answer(&b_id).await?;
        match (&a_answer, &b_answer) {
            (Ok(_), Err(error)) => {
                assert_eq!(error["code"], "chat_taken");
                wins_a += 1;
                agent_a.ok("chat.close", json!({ "conversation": chat })).await?;
            }
            (Err(error), Ok(_)) => {
                assert_eq!(error["code"], "chat_taken");
                wins_b += 1;
                agent_b.ok("chat.close", json!({ "conversation": chat })).await?;
            }
            _ => panic!("round {round}: not exactly one winner: {a_answer:?} / {b_answer:?}"),
        }
        // The log agrees: one accepted event, by the winner.
        let transcript = agent_a.ok("chat.transcript", json!({ "conversation": chat })).await;
        let transcript = match transcript {
            Ok(transcript) => transcript,
            Err(_) => agent_b.ok("chat.transcript", json!({ "conversation": chat })).await?,
        };
        let accepts = transcript["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "accepted").count();
        assert_eq!(accepts, 1, "round {round}");
    }
    assert_eq!(wins_a + wins_b, 40);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resumes_up_to_date_gets_only_what_comes_next() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let mut agent = Client::sign_in(&url, "token-agent-b").await?;
    let (customer, chat, token) = Client::start_chat(&url, WIDGET, "g1", "Eve", "hi").await?;
    agent.ok("chat.accept", json!({ "conversation": chat })).await?;
    customer.close().await?;

    // The customer saw seq 1..3 before leaving; it comes back claiming exactly that.
    let mut customer = Client::connect(&url).await?;
    let resumed = customer
        .ok("customer.resume", json!({ "conversation": chat, "customer_token": token, "after_seq": 3 }))
        .await?;
    assert_eq!(resumed["chat"]["last_seq"], 3);
    agent.ok("message.send", json!({ "conversation": chat, "client_msg_id": "a-1", "body": "welcome back" })).await?;
    let next = customer.push_matching(|frame| frame["type"] == "event").await?;
    assert_eq!((next["event"]["seq"].as_u64(), next["event"]["body"].as_str()), (Some(4), Some("welcome back")));

    // Resuming from an older seq gets exactly the gap, once.
    let mut again = Client::connect(&url).await?;
    again.ok("customer.resume", json!({ "conversation": chat, "customer_token": token, "after_seq": 2 })).await?;
    let gap = again.events_up_to(&chat, 4).await?;
    assert_eq!(gap.iter().map(|event| event["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [3, 4]);
    Ok(())
}

/// An agent's console follows a waiting chat with `chat.subscribe` and stops with `chat.unsubscribe`: after
/// its ack, nothing more of that chat is written to the connection, while a chat it still follows goes on.
/// (Each message's event reaches the gateway before its sender's ack: the chat left is pushed, if at all,
/// before the chat still followed, whose event the console waits for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribed_chat_is_no_longer_pushed_and_the_others_are() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let url = server.ws_url();
    let (mut ann, left, _) = Client::start_chat(&url, WIDGET, "g1", "Ann", "first?").await?;
    let (mut bo, kept, _) = Client::start_chat(&url, WIDGET, "g1", "Bo", "second?").await?;
    let mut console = Client::sign_in(&url, "token-agent-b").await?;
    for chat in [&left, &kept] {
        console.ok("chat.subscribe", json!({ "conversation": chat })).await?;
        console.events_up_to(chat, 2).await?;
    }
    let send = |chat: &str, id: &str| json!({ "conversation": chat, "client_msg_id": id, "body": id });
    ann.ok("message.send", send(&left, "ann-1")).await?;
    console.event_of(&left, "message").await?;

    let unsubscribed = console.ok("chat.unsubscribe", json!({ "conversation": left })).await?;
    assert_eq!(unsubscribed["followed"], true);
    ann.ok("message.send", send(&left, "ann-2")).await?;
    bo.ok("message.send", send(&kept, "bo-1")).await?;
    let next = console.push_matching(|frame| frame["type"] == "event").await?;
    assert_eq!(
        (next["conversation"].as_str(), next["event"]["client_msg_id"].as_str()),
        (Some(kept.as_str()), Some("bo-1"))
    );
    assert!(
        !console.pending_pushes().iter().any(|frame| frame["conversation"] == left.as_str()),
        "{:?}",
        console.pending_pushes()
    );
    // Unsubscribed again: it followed nothing of that chat any more.
    let again = console.ok("chat.unsubscribe", json!({ "conversation": left })).await?;
    assert_eq!(again["followed"], false);
    Ok(())
}
