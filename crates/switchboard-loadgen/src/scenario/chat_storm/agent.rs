//! One agent console of the chat storm: it keeps its waiting list from the queue pushes and accepts chats
//! while it has a free slot (pull), or accepts what it is offered (push); it closes each chat it won.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Observer;
use crate::cli::RoutingMode;
use crate::metrics::lock;
use crate::net::{Connection, Push};
use crate::scenario::SignedInAgent;

pub struct AgentLoop {
    /// The agent's id, as its `agent.sign_in` answered.
    id: Arc<str>,
    connection: Arc<Connection>,
    pushes: mpsc::UnboundedReceiver<Push>,
    /// Free slots, as far as this console knows (pull).
    free: u32,
    waiting: VecDeque<String>,
    /// The chats this console is accepting or won: an offer of one of them pushed again is not accepted
    /// twice.
    in_hand: HashSet<String>,
    routing: RoutingMode,
    /// The start of the questions of this run's chats.
    tag: String,
    observer: Arc<Observer>,
    stop: watch::Receiver<bool>,
}

/// How an accept ended, for the slot count: the chat, and whether this agent won it.
struct Finished {
    conversation: String,
    won: bool,
}

impl AgentLoop {
    pub fn new(
        mut agent: SignedInAgent,
        routing: RoutingMode,
        tag: String,
        observer: Arc<Observer>,
        stop: watch::Receiver<bool>,
    ) -> AgentLoop {
        let pushes = agent.connection.pushes.take().unwrap_or_else(|| mpsc::unbounded_channel().1);
        AgentLoop {
            id: agent.id.into(),
            connection: Arc::new(agent.connection),
            pushes,
            free: agent.capacity.saturating_sub(agent.active),
            waiting: VecDeque::new(),
            in_hand: HashSet::new(),
            routing,
            tag,
            observer,
            stop,
        }
    }

    /// Runs until the run stops; returns the connection, to be closed.
    pub async fn run(mut self) -> Option<Connection> {
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<Finished>();
        let mut accepts = JoinSet::new();
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                push = self.pushes.recv() => match push {
                    Some(push) => self.on_push(push, &finished_tx, &mut accepts),
                    None => break, // the connection closed (counted by its reader)
                },
                Some(finished) = finished_rx.recv() => {
                    self.free += 1;
                    if !finished.won {
                        // Offered again later (a new round of push routing), it is accepted again.
                        self.in_hand.remove(&finished.conversation);
                    }
                }
                _ = stopped(&mut stop) => break,
            }
            if self.routing == RoutingMode::Pull {
                while self.free > 0
                    && let Some(conversation) = self.waiting.pop_front()
                {
                    if !self.in_hand.insert(conversation.clone()) {
                        continue;
                    }
                    self.free -= 1;
                    accepts.spawn(accept_and_close(
                        self.accepting(conversation, true),
                        self.observer.clone(),
                        finished_tx.clone(),
                    ));
                }
            }
            while let Some(result) = accepts.try_join_next() {
                self.observer.metrics.joined(result);
            }
        }
        while let Some(result) = accepts.join_next().await {
            self.observer.metrics.joined(result);
        }
        Arc::try_unwrap(self.connection).ok()
    }

    fn on_push(&mut self, push: Push, finished: &mpsc::UnboundedSender<Finished>, accepts: &mut JoinSet<()>) {
        match push.kind.as_str() {
            "queue.snapshot" => {
                let entries = push.frame["entries"].as_array().cloned().unwrap_or_default();
                self.waiting = entries.iter().filter(|entry| self.is_ours(entry)).filter_map(conversation_of).collect();
            }
            "queue.added" => {
                let entry = &push.frame["entry"];
                if let Some(conversation) = conversation_of(entry).filter(|_| self.is_ours(entry)) {
                    lock(&self.observer.registry).first_seen.entry(conversation.clone()).or_insert(push.at);
                    if self.routing == RoutingMode::Pull {
                        self.waiting.push_back(conversation);
                    }
                }
            }
            "queue.removed" => {
                if let Some(conversation) = push.frame["conversation"].as_str() {
                    self.waiting.retain(|waiting| waiting != conversation);
                }
            }
            "offer" => {
                let entry = &push.frame["entry"];
                let Some(conversation) = conversation_of(entry) else {
                    return self.observer.metrics.error("offer_without_conversation");
                };
                let ours = self.is_ours(entry);
                if ours {
                    lock(&self.observer.registry).first_seen.entry(conversation.clone()).or_insert(push.at);
                }
                if !self.in_hand.insert(conversation.clone()) {
                    // The protocol may push an offer again (a console that subscribed later, a queue taken
                    // over): it is the one being accepted.
                    return self.observer.metrics.count("offers_again", 1);
                }
                // The offer holds one of the agent's slots already: accept it whatever the local count says.
                self.free = self.free.saturating_sub(1);
                accepts.spawn(accept_and_close(
                    self.accepting(conversation, ours),
                    self.observer.clone(),
                    finished.clone(),
                ));
            }
            _ => {} // offer.ended, agent.status, chat.assigned: nothing to do
        }
    }

    fn accepting(&self, conversation: String, ours: bool) -> Accepting {
        Accepting { agent: self.id.clone(), connection: self.connection.clone(), conversation, ours }
    }

    fn is_ours(&self, entry: &Value) -> bool {
        entry["question"].as_str().is_some_and(|question| question.starts_with(&self.tag))
    }
}

/// The counter of an accept refused because another agent was faster (not an error).
fn lost_race(code: &str) -> Option<&'static str> {
    match code {
        "chat_taken" => Some("chat_taken"),
        // The winner accepted and closed it before this accept arrived.
        "chat_closed" => Some("accept_after_close"),
        // Push routing: the offer ended (timed out) before the accept.
        "not_offered" => Some("not_offered"),
        // Pull: the slot count of this console was behind the server's.
        "at_capacity" => Some("at_capacity"),
        _ => None,
    }
}

/// Resolves once the run stops.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

fn conversation_of(entry: &Value) -> Option<String> {
    entry["conversation"].as_str().map(str::to_owned)
}

/// A chat an agent accepts: `ours` when this run started it.
struct Accepting {
    agent: Arc<str>,
    connection: Arc<Connection>,
    conversation: String,
    ours: bool,
}

/// Accepts a chat and, when won, closes it. Losing the race is counted, not an error: `chat_taken`, or
/// `chat_closed` when the winner has closed it already.
async fn accept_and_close(accepting: Accepting, observer: Arc<Observer>, finished: mpsc::UnboundedSender<Finished>) {
    let Accepting { agent, connection, conversation, ours } = accepting;
    let metrics = &observer.metrics;
    let sent = Instant::now();
    match connection.request("chat.accept", json!({ "conversation": conversation })).await {
        Ok(_) if !ours => metrics.count("foreign_chats_accepted", 1),
        Ok(ack) => {
            metrics.record("accept_ack", sent, ack.at);
            metrics.count("accept_wins", 1);
            metrics.operation();
            if let Some(violation) = lock(&observer.registry).ledger.accept_acked(&conversation, &agent) {
                metrics.violation(violation);
            }
        }
        Err(error) => {
            match error.code().and_then(lost_race) {
                Some(counter) => metrics.count(counter, 1),
                None => metrics.error(&error.reason()),
            }
            let _ = finished.send(Finished { conversation, won: false });
            return;
        }
    }
    match connection.request("chat.close", json!({ "conversation": conversation })).await {
        Ok(_) => metrics.count(if ours { "chats_closed" } else { "foreign_chats_closed" }, 1),
        Err(error) => metrics.error(&error.reason()),
    }
    let _ = finished.send(Finished { conversation, won: true });
}
