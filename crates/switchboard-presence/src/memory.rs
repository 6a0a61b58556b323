//! Presence in process: the same behaviour as Redis, for a single process (`switchboard serve`) and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use switchboard_domain::{AgentId, AgentStatus, ConversationId, GroupId, TenantId};
use tokio::sync::broadcast;

use crate::{
    CHANGES_CAPACITY, Connections, CustomerSession, GroupStatus, LicenseMirror, LiveSession, Presence, PresenceChange,
    PresenceError, StartBudget, give_back_start, take_start,
};

/// The default margin after which expired entries are dropped (as [`RedisSettings::gc_ttl`](crate::RedisSettings)).
const DEFAULT_GC_MARGIN: Duration = Duration::from_secs(24 * 60 * 60);

/// How many client addresses' chat starts are kept before those whose budget is full again are dropped.
const MAX_START_ADDRESSES: usize = 100_000;

/// How often (by the expiries written) the customers' connections that ended long ago are dropped.
const CUSTOMERS_SWEEP_EVERY_MS: i64 = 60_000;

/// [`Presence`] in process. Clones share the same state and the same change stream.
#[derive(Clone)]
pub struct MemoryPresence {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<PresenceChange>,
    gc_margin_ms: i64,
}

impl std::fmt::Debug for MemoryPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPresence").field("gc_margin_ms", &self.gc_margin_ms).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// (tenant, agent) → session → (gateway, expires_at_ms).
    sessions: HashMap<(TenantId, AgentId), HashMap<String, (String, i64)>>,
    /// (tenant, chat) → customer session → expires_at_ms (the instant it closed, once closed).
    customers: HashMap<(TenantId, ConversationId), HashMap<String, i64>>,
    /// The `expires_at_ms` of the write that last dropped the chats whose connections all ended long ago.
    customers_swept_at_ms: i64,
    /// (tenant, group) → agent → expires_at_ms.
    signed_in: HashMap<(TenantId, GroupId), HashMap<AgentId, i64>>,
    /// (tenant, agent) → the status the agent chose, while signed in.
    chosen: HashMap<(TenantId, AgentId), AgentStatus>,
    /// tenant → group → status.
    statuses: HashMap<TenantId, BTreeMap<GroupId, GroupStatus>>,
    license: Option<LicenseMirror>,
    /// Client address → the theoretical arrival time of its next chat start (µs; see [`take_start`]).
    starts: HashMap<String, i64>,
}

impl Default for MemoryPresence {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryPresence {
    /// Empty presence.
    pub fn new() -> MemoryPresence {
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        MemoryPresence {
            state: Arc::default(),
            changes,
            gc_margin_ms: i64::try_from(DEFAULT_GC_MARGIN.as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No operation below can leave the state half-updated, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, change: PresenceChange) {
        // No receiver is not an error: nobody listens yet.
        let _ = self.changes.send(change);
    }

    /// Entries that expired this long before `expires_at_ms` of a fresh write are dropped.
    fn gc_before(&self, expires_at_ms: i64) -> i64 {
        expires_at_ms.saturating_sub(self.gc_margin_ms)
    }
}

/// Drops the connections that end or lapse first until [`crate::KEPT_CONNECTIONS`] are left (what
/// `ZREMRANGEBYRANK` does in Redis): a read takes the one that lasts longest, which is never dropped.
fn keep_newest<V>(connections: &mut HashMap<String, V>, ends: impl Fn(&V) -> i64) {
    let kept = usize::try_from(crate::KEPT_CONNECTIONS).unwrap_or(usize::MAX);
    if connections.len() <= kept {
        return;
    }
    let mut by_end: Vec<(i64, String)> =
        connections.iter().map(|(session, value)| (ends(value), session.clone())).collect();
    by_end.sort();
    for (_, session) in by_end.into_iter().take(connections.len() - kept) {
        connections.remove(&session);
    }
}

#[async_trait::async_trait]
impl Presence for MemoryPresence {
    async fn session_alive(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        session: &str,
        gateway: &str,
        expires_at_ms: i64,
    ) -> Result<(), PresenceError> {
        let gc_before = self.gc_before(expires_at_ms);
        let new = {
            let mut state = self.state();
            let sessions = state.sessions.entry((tenant.clone(), agent.clone())).or_default();
            sessions.retain(|_, (_, expires)| *expires >= gc_before);
            sessions.insert(session.to_string(), (gateway.to_string(), expires_at_ms)).is_none()
        };
        if new {
            self.publish(PresenceChange::Session { tenant: tenant.clone(), agent: agent.clone(), up: true });
        }
        Ok(())
    }

    async fn session_gone(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        session: &str,
        at_ms: i64,
    ) -> Result<(), PresenceError> {
        let ended = {
            let mut state = self.state();
            let key = (tenant.clone(), agent.clone());
            // Kept as ended, only ever earlier; live until now if it was to expire after its end.
            let Some(sessions) = state.sessions.get_mut(&key) else {
                return Ok(());
            };
            let ended = match sessions.get_mut(session) {
                Some((_, expires)) if *expires > at_ms => {
                    *expires = at_ms;
                    true
                }
                _ => false,
            };
            keep_newest(sessions, |(_, expires)| *expires);
            ended
        };
        if ended {
            self.publish(PresenceChange::Session { tenant: tenant.clone(), agent: agent.clone(), up: false });
        }
        Ok(())
    }

    async fn customers_alive(&self, sessions: &[CustomerSession], expires_at_ms: i64) -> Result<(), PresenceError> {
        let gc_before = self.gc_before(expires_at_ms);
        let mut state = self.state();
        for session in sessions {
            let key = (session.tenant.clone(), session.conversation);
            state.customers.entry(key).or_default().insert(session.session.clone(), expires_at_ms);
        }
        // What Redis's key expiry does: chats whose every connection ended longer ago than the margin go. A
        // sweep visits every chat: at most once a minute, not at every chat start.
        if expires_at_ms.saturating_sub(state.customers_swept_at_ms) >= CUSTOMERS_SWEEP_EVERY_MS {
            state.customers_swept_at_ms = expires_at_ms;
            state.customers.retain(|_, sessions| {
                sessions.retain(|_, expires| *expires > gc_before);
                !sessions.is_empty()
            });
        }
        Ok(())
    }

    async fn customer_gone(&self, session: &CustomerSession, at_ms: i64) -> Result<(), PresenceError> {
        let mut state = self.state();
        let key = (session.tenant.clone(), session.conversation);
        if let Some(sessions) = state.customers.get_mut(&key) {
            if let Some(expires) = sessions.get_mut(&session.session) {
                *expires = (*expires).min(at_ms);
            }
            keep_newest(sessions, |expires| *expires);
        }
        Ok(())
    }

    async fn customers_present(
        &self,
        tenant: &TenantId,
        chats: &[ConversationId],
        now_ms: i64,
    ) -> Result<Vec<Connections>, PresenceError> {
        let state = self.state();
        Ok(chats
            .iter()
            .map(|chat| {
                let latest = state.customers.get(&(tenant.clone(), *chat)).and_then(|sessions| sessions.values().max());
                crate::connections(latest.copied(), now_ms)
            })
            .collect())
    }

    async fn agents_present(
        &self,
        agents: &[(TenantId, AgentId)],
        now_ms: i64,
    ) -> Result<Vec<Connections>, PresenceError> {
        let state = self.state();
        Ok(agents
            .iter()
            .map(|key| {
                let latest = state.sessions.get(key).and_then(|sessions| sessions.values().map(|(_, at)| *at).max());
                crate::connections(latest, now_ms)
            })
            .collect())
    }

    async fn agent_sessions(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        now_ms: i64,
    ) -> Result<Vec<LiveSession>, PresenceError> {
        let state = self.state();
        let mut live: Vec<LiveSession> = state
            .sessions
            .get(&(tenant.clone(), agent.clone()))
            .into_iter()
            .flatten()
            .filter(|(_, (_, expires))| *expires > now_ms)
            .map(|(session, (gateway, expires))| LiveSession {
                session: session.clone(),
                gateway: gateway.clone(),
                expires_at_ms: *expires,
            })
            .collect();
        live.sort_by(|a, b| a.session.cmp(&b.session));
        Ok(live)
    }

    async fn signed_in(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
        groups: &[GroupId],
        expires_at_ms: i64,
    ) -> Result<(), PresenceError> {
        let gc_before = self.gc_before(expires_at_ms);
        let mut new_in = Vec::new();
        {
            let mut state = self.state();
            state.chosen.insert((tenant.clone(), agent.clone()), status);
            for group in groups {
                let members = state.signed_in.entry((tenant.clone(), group.clone())).or_default();
                members.retain(|_, expires| *expires >= gc_before);
                if members.insert(agent.clone(), expires_at_ms).is_none() {
                    new_in.push(group.clone());
                }
            }
        }
        for group in new_in {
            self.publish(PresenceChange::SignedIn {
                tenant: tenant.clone(),
                group,
                agent: agent.clone(),
                signed_in: true,
            });
        }
        Ok(())
    }

    async fn signed_out(&self, tenant: &TenantId, agent: &AgentId, groups: &[GroupId]) -> Result<(), PresenceError> {
        let mut left = Vec::new();
        {
            let mut state = self.state();
            state.chosen.remove(&(tenant.clone(), agent.clone()));
            for group in groups {
                let key = (tenant.clone(), group.clone());
                if state.signed_in.get_mut(&key).and_then(|members| members.remove(agent)).is_some() {
                    left.push(group.clone());
                }
                if state.signed_in.get(&key).is_some_and(HashMap::is_empty) {
                    state.signed_in.remove(&key);
                }
            }
        }
        for group in left {
            self.publish(PresenceChange::SignedIn {
                tenant: tenant.clone(),
                group,
                agent: agent.clone(),
                signed_in: false,
            });
        }
        Ok(())
    }

    async fn chosen_status(&self, tenant: &TenantId, agent: &AgentId) -> Result<Option<AgentStatus>, PresenceError> {
        Ok(self.state().chosen.get(&(tenant.clone(), agent.clone())).copied())
    }

    async fn n_signed_in(&self, tenant: &TenantId, group: &GroupId, now_ms: i64) -> Result<u32, PresenceError> {
        let state = self.state();
        let count = state
            .signed_in
            .get(&(tenant.clone(), group.clone()))
            .map_or(0, |members| members.values().filter(|expires| **expires > now_ms).count());
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    async fn put_group_status(&self, status: &GroupStatus) -> Result<(), PresenceError> {
        let changed = {
            let mut state = self.state();
            let previous =
                state.statuses.entry(status.tenant.clone()).or_default().insert(status.group.clone(), status.clone());
            previous.is_none_or(|previous| !previous.same_as(status))
        };
        if changed {
            self.publish(PresenceChange::Group(status.clone()));
        }
        Ok(())
    }

    async fn group_statuses(&self, tenant: &TenantId) -> Result<Vec<GroupStatus>, PresenceError> {
        let state = self.state();
        Ok(state.statuses.get(tenant).map(|groups| groups.values().cloned().collect()).unwrap_or_default())
    }

    async fn take_chat_start(
        &self,
        address: &str,
        budget: StartBudget,
        now_us: i64,
    ) -> Result<Result<(), u64>, PresenceError> {
        let mut state = self.state();
        if state.starts.len() >= MAX_START_ADDRESSES && !state.starts.contains_key(address) {
            // Addresses whose budget is full again are as if never seen (Redis lets their keys expire).
            state.starts.retain(|_, tat_us| *tat_us > now_us);
        }
        let tat_us = state.starts.get(address).copied();
        Ok(take_start(budget, tat_us, now_us).map(|next_us| {
            state.starts.insert(address.to_owned(), next_us);
        }))
    }

    async fn give_back_chat_start(&self, address: &str, budget: StartBudget, now_us: i64) -> Result<(), PresenceError> {
        let mut state = self.state();
        let Some(tat_us) = state.starts.get(address).copied() else {
            return Ok(());
        };
        match give_back_start(budget, tat_us, now_us) {
            Some(back_us) => state.starts.insert(address.to_owned(), back_us),
            None => state.starts.remove(address),
        };
        Ok(())
    }

    async fn mirror_license(&self, used: u64, max_sessions: u64, at_ms: i64) -> Result<(), PresenceError> {
        self.state().license = Some(LicenseMirror { used, max_sessions, at_ms });
        Ok(())
    }

    async fn license_mirror(&self) -> Result<Option<LicenseMirror>, PresenceError> {
        Ok(self.state().license)
    }

    fn changes(&self) -> broadcast::Receiver<PresenceChange> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_that_end_first_go_beyond_the_kept() {
        let kept = usize::try_from(crate::KEPT_CONNECTIONS).unwrap();
        let mut connections: HashMap<String, i64> = (0..kept + 5).map(|i| (format!("s{i}"), i as i64)).collect();
        connections.insert("live".into(), i64::MAX);
        keep_newest(&mut connections, |ends| *ends);
        assert_eq!(connections.len(), kept);
        assert!(connections.contains_key("live"));
        let dropped: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
        assert!(dropped.iter().all(|session| !connections.contains_key(session)), "{connections:?}");
        keep_newest(&mut connections, |ends| *ends);
        assert_eq!(connections.len(), kept, "nothing more to drop");
    }
}
