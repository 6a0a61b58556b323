//! Presence down on demand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use switchboard_domain::{AgentId, AgentStatus, ConversationId, GroupId, TenantId};
use tokio::sync::broadcast;

use crate::{
    Connections, CustomerSession, GroupStatus, LicenseMirror, LiveSession, Presence, PresenceChange, PresenceError,
    StartBudget,
};

/// Presence that stops answering on demand, as Redis does when it is down or unreachable: every call fails
/// with [`PresenceError::Unavailable`] while it is down, and is `inner`'s otherwise (its change stream
/// included). For tests and fault drills of what depends on presence.
pub struct Outage {
    inner: Arc<dyn Presence>,
    down: AtomicBool,
}

impl Outage {
    /// `inner`, up.
    pub fn new(inner: Arc<dyn Presence>) -> Outage {
        Outage { inner, down: AtomicBool::new(false) }
    }

    /// Takes it down (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn up(&self) -> Result<&dyn Presence, PresenceError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(PresenceError::Unavailable("presence is down (an outage on demand)".into()));
        }
        Ok(self.inner.as_ref())
    }
}

#[async_trait::async_trait]
impl Presence for Outage {
    async fn session_alive(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        session: &str,
        gateway: &str,
        expires_at_ms: i64,
    ) -> Result<(), PresenceError> {
        self.up()?.session_alive(tenant, agent, session, gateway, expires_at_ms).await
    }

    async fn session_gone(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        session: &str,
        at_ms: i64,
    ) -> Result<(), PresenceError> {
        self.up()?.session_gone(tenant, agent, session, at_ms).await
    }

    async fn customers_alive(&self, sessions: &[CustomerSession], expires_at_ms: i64) -> Result<(), PresenceError> {
        self.up()?.customers_alive(sessions, expires_at_ms).await
    }

    async fn customer_gone(&self, session: &CustomerSession, at_ms: i64) -> Result<(), PresenceError> {
        self.up()?.customer_gone(session, at_ms).await
    }

    async fn customers_present(
        &self,
        tenant: &TenantId,
        chats: &[ConversationId],
        now_ms: i64,
    ) -> Result<Vec<Connections>, PresenceError> {
        self.up()?.customers_present(tenant, chats, now_ms).await
    }

    async fn agents_present(
        &self,
        agents: &[(TenantId, AgentId)],
        now_ms: i64,
    ) -> Result<Vec<Connections>, PresenceError> {
        self.up()?.agents_present(agents, now_ms).await
    }

    async fn agent_sessions(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        now_ms: i64,
    ) -> Result<Vec<LiveSession>, PresenceError> {
        self.up()?.agent_sessions(tenant, agent, now_ms).await
    }

    async fn signed_in(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
        groups: &[GroupId],
        expires_at_ms: i64,
    ) -> Result<(), PresenceError> {
        self.up()?.signed_in(tenant, agent, status, groups, expires_at_ms).await
    }

    async fn signed_out(&self, tenant: &TenantId, agent: &AgentId, groups: &[GroupId]) -> Result<(), PresenceError> {
        self.up()?.signed_out(tenant, agent, groups).await
    }

    async fn chosen_status(&self, tenant: &TenantId, agent: &AgentId) -> Result<Option<AgentStatus>, PresenceError> {
        self.up()?.chosen_status(tenant, agent).await
    }

    async fn n_signed_in(&self, tenant: &TenantId, group: &GroupId, now_ms: i64) -> Result<u32, PresenceError> {
        self.up()?.n_signed_in(tenant, group, now_ms).await
    }

    async fn put_group_status(&self, status: &GroupStatus) -> Result<(), PresenceError> {
        self.up()?.put_group_status(status).await
    }

    async fn group_statuses(&self, tenant: &TenantId) -> Result<Vec<GroupStatus>, PresenceError> {
        self.up()?.group_statuses(tenant).await
    }

    async fn take_chat_start(
        &self,
        address: &str,
        budget: StartBudget,
        now_us: i64,
    ) -> Result<Result<(), u64>, PresenceError> {
        self.up()?.take_chat_start(address, budget, now_us).await
    }

    async fn give_back_chat_start(&self, address: &str, budget: StartBudget, now_us: i64) -> Result<(), PresenceError> {
        self.up()?.give_back_chat_start(address, budget, now_us).await
    }

    async fn mirror_license(&self, used: u64, max_sessions: u64, at_ms: i64) -> Result<(), PresenceError> {
        self.up()?.mirror_license(used, max_sessions, at_ms).await
    }

    async fn license_mirror(&self) -> Result<Option<LicenseMirror>, PresenceError> {
        self.up()?.license_mirror().await
    }

    fn changes(&self) -> broadcast::Receiver<PresenceChange> {
        self.inner.changes()
    }
}
