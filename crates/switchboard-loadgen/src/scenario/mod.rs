//! The scenarios, and what they share: the run's context, connecting many clients, signing agents in.

pub mod chat_storm;
pub mod idle;
pub mod license;
pub mod steady;
pub mod storm;

use std::sync::Arc;

use anyhow::bail;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};

use crate::cli::Common;
use crate::invariants::Side;
use crate::metrics::Metrics;
use crate::net::{Connection, EventObserver, Network, Role};
use crate::shard::{Coordinator, Shard};

/// Everything a scenario runs with.
pub struct Ctx {
    pub common: Common,
    pub shard: Shard,
    pub metrics: Arc<Metrics>,
    pub network: Arc<Network>,
    pub coordinator: Coordinator,
    /// The same in every process of a run; marks the chats this run starts.
    pub run_id: String,
}

/// An agent console, signed in.
pub struct SignedInAgent {
    pub id: String,
    pub connection: Connection,
    pub capacity: u32,
    /// Chats it already held when it signed in (left over from an earlier run).
    pub active: u32,
}

impl Ctx {
    /// The group of the `n`-th chat: the `--group`s in turn.
    pub fn group(&self, n: u64) -> &str {
        &self.common.groups[(n % self.common.groups.len() as u64) as usize]
    }

    /// Opens `count` connections, at most `--connect-concurrency` at a time; failures are counted by reason.
    pub async fn connect_many(&self, count: u64, role: Role, observer: Arc<dyn EventObserver>) -> Vec<Connection> {
        let concurrency = self.common.connect_concurrency.max(1);
        let mut connections = Vec::new();
        let mut opening = FuturesUnordered::new();
        let mut started = 0;
        while started < count || !opening.is_empty() {
            while started < count && opening.len() < concurrency {
                opening.push(self.network.connect(role, observer.clone(), false));
                started += 1;
            }
            match opening.next().await {
                Some(Ok(connection)) => connections.push(connection),
                Some(Err(error)) => self.metrics.error(&error.reason()),
                None => {}
            }
        }
        connections
    }

    /// Signs in this process's agents (`--agents`, shared out between the processes). An agent that cannot
    /// sign in is a setup error.
    pub async fn sign_in_agents(
        &self,
        observer: Arc<dyn EventObserver>,
        pushes: bool,
    ) -> anyhow::Result<Vec<SignedInAgent>> {
        let mut agents = Vec::new();
        for index in self.shard.pick(self.common.agents) {
            let token = format!("{}{index}", self.common.agent_token_prefix);
            let connection = match self.network.connect(Role::Side(Side::Agent), observer.clone(), pushes).await {
                Ok(connection) => connection,
                Err(error) => bail!("agent {index}: {error} ({})", self.common.urls.join(", ")),
            };
            let ack = match connection.request("agent.sign_in", json!({ "token": token })).await {
                Ok(ack) => ack,
                Err(error) => bail!("agent token {token}: agent.sign_in failed: {}", error.reason()),
            };
            let agent = &ack.frame["agent"];
            if agent["status"] != "online" {
                bail!("agent token {token}: signed in but {} instead of online", agent["status"]);
            }
            let capacity = agent["capacity"].as_u64().unwrap_or(0) as u32;
            let active = agent["active"].as_array().map_or(0, Vec::len) as u32;
            let id = agent["agent"].as_str().unwrap_or_default().to_owned();
            agents.push(SignedInAgent { id, connection, capacity, active });
        }
        Ok(agents)
    }

    /// `--request-timeout-s`.
    pub fn timeout(&self) -> std::time::Duration {
        self.network.timeout
    }
}

/// Closes connections, all at once.
pub async fn close_all(connections: Vec<Connection>) {
    let mut closing: FuturesUnordered<_> = connections.into_iter().map(Connection::close).collect();
    while closing.next().await.is_some() {}
}

/// The resident set size of a process in kB (`VmRSS` of /proc/PID/status), when it can be read.
pub fn rss_kb(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A `chat.start` as a widget sends it: with a `start_key` of its own (a new random UUID per chat), so that
/// a start sent again after a lost answer would be the chat it started (`docs/protocol.md`).
pub fn chat_start(widget_key: &str, group: &str, question: String) -> Value {
    json!({
        "widget_key": widget_key, "group": group, "name": "Load customer", "question": question,
        "start_key": uuid::Uuid::new_v4(),
    })
}

/// Checks the answer to a `chat.start` sent once: it is no start made before (`duplicate`), else two chats
/// were given one key or the server took the key for another's.
pub fn check_first_start(metrics: &Metrics, ack: &Value) {
    if ack["duplicate"] == Value::Bool(true) {
        let conversation = ack["conversation"].as_str().unwrap_or("?");
        metrics.violation(format!("a chat.start sent once was answered as a duplicate (chat {conversation})"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_has_a_key_of_its_own_and_a_start_answered_as_made_before_is_a_violation() {
        let first = chat_start("w", "sales", "q".into());
        let second = chat_start("w", "sales", "q".into());
        let key = first["start_key"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(key).is_ok(), "{key}");
        assert_ne!(first["start_key"], second["start_key"]);

        let metrics = Metrics::new();
        check_first_start(&metrics, &json!({ "conversation": "c1", "duplicate": false }));
        // An older server's ack, without the field.
        check_first_start(&metrics, &json!({ "conversation": "c2" }));
        assert_eq!(metrics.snapshot().violations.total, 0);
        check_first_start(&metrics, &json!({ "conversation": "c3", "duplicate": true }));
        let violations = metrics.snapshot().violations;
        assert_eq!(violations.total, 1);
        assert!(violations.first[0].contains("c3"), "{:?}", violations.first);
    }
}
