//! The frame of the fault tests: a cluster with many chats under steady traffic; a fault; then every
//! conversation must go on, every participant must receive everything, and the checker must pass.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::time::Instant;

use crate::checker::Report;
use crate::cluster::{Cluster, ClusterSpec};
use crate::log::{ClientLog, LogData};
use crate::traffic::{Traffic, catch_up_all, open_chats};
use crate::{Participant, tenancy};

/// A guard for traffic to flow, after the start or after a fault.
pub const FLOW_DEADLINE: Duration = Duration::from_secs(30);
/// A guard for every participant to receive the events stored after the traffic stopped.
pub const CATCH_UP_DEADLINE: Duration = Duration::from_secs(15);
/// Each participant sends at most this many messages (the traffic stops long before).
const MAX_MESSAGES: u64 = 2000;

pub struct Run {
    pub cluster: Cluster,
    pub log: ClientLog,
    pub conversations: Vec<String>,
    traffic: Option<Traffic>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("cluster", &self.cluster).field("conversations", &self.conversations.len()).finish()
    }
}

/// What a run ended with.
#[derive(Debug)]
pub struct Outcome {
    pub cluster: Cluster,
    pub logs: LogData,
    pub report: Report,
    pub participants: Vec<Participant>,
}

impl Run {
    /// Starts a cluster whose configuration has one agent per chat, opens `chats` chats, and starts both sides
    /// of every chat sending a message every `pace`; returns once every conversation has had a message acked.
    pub async fn start(mut spec: ClusterSpec, chats: usize, pace: Duration) -> anyhow::Result<Run> {
        spec.config_yaml = tenancy::config(chats);
        let cluster = Cluster::start(spec).await?;
        let log = ClientLog::new();
        let chats = open_chats(&log, &cluster.gateway_urls(), chats).await?;
        let conversations: Vec<String> = chats.iter().map(|chat| chat.conversation.clone()).collect();
        let participants = chats.into_iter().flat_map(|chat| [chat.customer, chat.agent]).collect();
        let traffic = Traffic::start(participants, pace, MAX_MESSAGES);
        let run = Run { cluster, log, conversations, traffic: Some(traffic) };
        let started = run.traffic.as_ref().map(|traffic| traffic.started).unwrap_or_else(Instant::now);
        run.wait_continued("traffic flows in every conversation", started, FLOW_DEADLINE).await?;
        Ok(run)
    }

    /// Waits until every conversation has had a message first tried at or after `since` acknowledged;
    /// returns the longest time from `since` to such an ack, over the conversations.
    pub async fn wait_continued(&self, what: &str, since: Instant, deadline: Duration) -> anyhow::Result<Duration> {
        let n = self.conversations.len();
        let waited = self.log.wait_until(what, deadline, |data| data.continued_after(since).len() >= n).await;
        let continued = self.log.read(|data| data.continued_after(since));
        if let Err(error) = waited {
            let stuck: Vec<&String> =
                self.conversations.iter().filter(|conversation| !continued.contains_key(*conversation)).collect();
            let failures = self.log.read(|data| data.failures.clone());
            bail!(
                "{error:#}: {} of {n} conversations did not go on: {stuck:?}; client failures: {failures:#?}",
                stuck.len()
            );
        }
        Ok(continued.values().copied().max().unwrap_or_default())
    }

    /// The conversations whose shard `node` leases now.
    pub async fn conversations_of(&self, node: &str) -> anyhow::Result<Vec<String>> {
        let owners = self.cluster.owners(&self.conversations).await?;
        Ok(owners.into_iter().filter(|(_, owner)| owner == node).map(|(conversation, _)| conversation).collect())
    }

    /// Stops the traffic, waits for the placement to be complete, for every participant to receive its
    /// conversation up to the last stored seq (`live_only`: as pushes on the connection it has, without
    /// reconnecting), and checks the invariants. Fails on any client failure, violation, or event not received
    /// (saying whether the invariants held when it is only the latter).
    pub async fn finish(mut self, live_only: bool) -> anyhow::Result<Outcome> {
        let traffic = self.traffic.take().context("the traffic was stopped already")?;
        let mut participants = traffic.stop().await?;
        let failures = self.log.read(|data| data.failures.clone());
        ensure!(failures.is_empty(), "clients failed ({}):\n{}", failures.len(), failures.join("\n"));
        self.cluster.wait_for_placement(false).await?;
        let last_seqs: BTreeMap<String, u64> =
            self.cluster.db.conversations().await?.into_iter().map(|row| (row.id, row.last_seq)).collect();
        let caught_up = catch_up_all(&mut participants, &last_seqs, CATCH_UP_DEADLINE, live_only).await;
        let logs = self.log.snapshot();
        let report = self.cluster.check(&logs).await?;
        match (report.ensure_ok(), caught_up) {
            (Err(violations), Err(not_received)) => bail!("{violations:#}\nand {not_received:#}"),
            (Err(violations), Ok(())) => return Err(violations),
            (Ok(()), Err(not_received)) => {
                bail!("the invariants hold ({}), but {not_received:#}", report.summary())
            }
            (Ok(()), Ok(())) => {}
        }
        Ok(Outcome { cluster: self.cluster, logs, report, participants })
    }
}

impl Outcome {
    /// A line about the run, for the test's output.
    pub fn summary(&self) -> String {
        let retried = self.logs.retried().count();
        let worst = self.logs.worst_unavailability().map(|op| op.unavailability()).unwrap_or_default();
        let slowest = self.logs.slowest().map(|op| op.latency()).unwrap_or_default();
        format!(
            "{}; {} operations, {retried} retried, longest unavailability {worst:?}, slowest {slowest:?}",
            self.report.summary(),
            self.logs.operations.len()
        )
    }
}
