//! Steady traffic: many chats, each with a customer and an agent on different gateways, both sending
//! messages at a fixed pace until told to stop.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::client::Participant;
use crate::log::ClientLog;
use crate::tenancy;

/// Both sides of one chat.
#[derive(Debug)]
pub struct Chat {
    pub conversation: String,
    pub customer: Participant,
    pub agent: Participant,
}

/// Opens `n` chats in [`tenancy`]'s group: customer `i` on gateway `i`, its agent (`agent-i`, one per chat) on
/// the next gateway, so that the two sides of a chat never share a gateway when there are two or more.
pub async fn open_chats(log: &ClientLog, gateways: &[String], n: usize) -> anyhow::Result<Vec<Chat>> {
    let mut chats = Vec::with_capacity(n);
    for i in 0..n {
        let start = json!({
            "widget_key": tenancy::WIDGET_KEY,
            "group": tenancy::GROUP,
            "name": format!("Customer {i}"),
            "question": format!("question {i}"),
        });
        let customer = Participant::start_chat(log, &format!("customer-{i}"), gateways, i, start)
            .await
            .with_context(|| format!("starting chat {i}"))?;
        let conversation = customer.conversation.clone();
        let agent_id = tenancy::agent_id(i);
        let token = tenancy::agent_token(i);
        let agent = Participant::accept_chat(log, &agent_id, gateways, i + 1, (&agent_id, &token), &conversation)
            .await
            .with_context(|| format!("accepting chat {i}"))?;
        chats.push(Chat { conversation, customer, agent });
    }
    Ok(chats)
}

/// Participants sending messages in the background.
#[derive(Debug)]
pub struct Traffic {
    tasks: Vec<JoinHandle<Participant>>,
    stop: watch::Sender<bool>,
    pub started: Instant,
}

impl Traffic {
    /// Every participant sends a message every `pace` (its first at once), at most `max_messages` each, until
    /// [`Traffic::stop`].
    pub fn start(participants: Vec<Participant>, pace: Duration, max_messages: u64) -> Traffic {
        let (stop, stopped) = watch::channel(false);
        let tasks = participants
            .into_iter()
            .map(|participant| tokio::spawn(send_steadily(participant, stopped.clone(), pace, max_messages)))
            .collect();
        Traffic { tasks, stop, started: Instant::now() }
    }

    /// Stops sending (each participant finishes the message in hand) and gives the participants back.
    pub async fn stop(self) -> anyhow::Result<Vec<Participant>> {
        let _ = self.stop.send(true);
        let mut participants = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            participants.push(task.await.context("a traffic task panicked")?);
        }
        Ok(participants)
    }
}

async fn send_steadily(
    mut participant: Participant,
    mut stopped: watch::Receiver<bool>,
    pace: Duration,
    max_messages: u64,
) -> Participant {
    let mut ticks = tokio::time::interval(pace);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while participant.messages_sent() < max_messages && !*stopped.borrow() {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = ticks.tick() => {}
        }
        // A failure is in the log; this participant stops there.
        if participant.send_message().await.is_err() {
            break;
        }
    }
    participant
}

/// Waits until every participant has received its conversation up to the conversation's last seq in
/// the database (`last_seqs` by conversation).
pub async fn catch_up_all(
    participants: &mut [Participant],
    last_seqs: &std::collections::BTreeMap<String, u64>,
    deadline: Duration,
    live_only: bool,
) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    let mut failures = Vec::new();
    for participant in participants.iter_mut() {
        let target = last_seqs.get(&participant.conversation).copied().unwrap_or_default();
        // Pushes already on the way are read even once the deadline has passed.
        let left = end.saturating_duration_since(Instant::now()).max(Duration::from_millis(200));
        if let Err(error) = participant.catch_up(target, left, live_only).await {
            failures.push(format!("{error:#}"));
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("{} participants did not receive every event:\n  {}", failures.len(), failures.join("\n  "));
    }
    Ok(())
}
