//! Agent presence, group status and the license mirror of Switchboard, in Redis ([`RedisPresence`]) or in
//! process ([`MemoryPresence`], for `switchboard serve` and for tests). Both implement [`Presence`] and
//! behave the same; the behaviour suite in `tests/` runs against both.
//!
//! # What lives here
//!
//! - **Connections.** Gateways record every live connection of an agent ([`Presence::session_alive`], refreshed
//!   every heartbeat, and [`Presence::session_gone`], which keeps the connection recorded as ended). Routers
//!   read whether an agent is connected, or since when they are not ([`Presence::agents_present`]).
//! - **Customers' connections.** Gateways record every connection of a customer to their chat
//!   ([`Presence::customers_alive`], refreshed every customer heartbeat, and [`Presence::customer_gone`]).
//!   The router that owns a group's queue reads them for the chats waiting there
//!   ([`Presence::customers_present`]): a chat whose customer went away without a word is abandoned after a
//!   grace period.
//! - **Signed-in agents.** The agent's owner (its actor) records which groups an online or away agent is
//!   signed in to ([`Presence::signed_in`], refreshed every heartbeat; [`Presence::signed_out`]), so that the
//!   number of agents of a group ([`Presence::n_signed_in`]) can be read anywhere, and the status the agent
//!   chose ([`Presence::chosen_status`]), which an owner that takes the agent over starts from.
//! - **Group status.** The router that owns a group's queue evaluates its business hours and publishes
//!   [`GroupStatus`]; anyone reads every group of a tenant in one read ([`Presence::group_statuses`]).
//! - **Chat starts per client address.** Where the operator limits them, gateways take each start from the
//!   address's budget here ([`Presence::take_chat_start`]), so that the limit holds over every gateway
//!   rather than at each.
//! - **License mirror.** The license count for dashboards ([`Presence::mirror_license`]); the store decides,
//!   never this.
//! - **Changes.** Every change above is also published ([`Presence::changes`]) so that routers and gateways
//!   react at once instead of at their next heartbeat. The stream may have gaps (a Redis restart, a slow
//!   receiver): everyone also reads again every heartbeat, and [`PresenceChange::Resync`] says when to read
//!   again at once.
//!
//! # Expiry is by value
//!
//! Every fact that expires carries the instant it expires (`expires_at_ms`, from the writer's
//! [`Clock`](switchboard_domain::Clock)), and readers pass their own `now_ms`: a fact counts while
//! `expires_at_ms > now_ms`. Redis key expiry (`PEXPIRE`) serves only as garbage collection, with a generous
//! margin ([`RedisSettings::gc_ttl`]) after the last write. So tests can run on an injected clock, and a Redis
//! server whose clock disagrees with the nodes' changes nothing.
//!
//! # Redis key layout
//!
//! With the prefix `P` ([`RedisSettings::prefix`], `sb` by default); tenant, group and agent ids are slugs
//! (no `:`), so keys cannot collide:
//!
//! | key | type | content |
//! | --- | --- | --- |
//! | `P:session:{tenant}:{agent}` | sorted set | member: session id; score: `expires_at_ms` of the connection (the instant it closed, once it closed) |
//! | `P:gateway:{tenant}:{agent}` | hash | session id → gateway id holding that connection (removed when it closes) |
//! | `P:customer:{tenant}:{conversation}` | sorted set | member: session id of a customer's connection; score: `expires_at_ms` (the instant it closed, once it closed) |
//! | `P:signed_in:{tenant}:{group}` | sorted set | member: agent id; score: `expires_at_ms` of the sign-in |
//! | `P:status:{tenant}:{agent}` | string | the status the agent chose, `online` or `away` (no expiry by value: removed at sign-out) |
//! | `P:group_status:{tenant}` | hash | group id → [`GroupStatus`] as JSON |
//! | `P:starts:{address}` | string | the address's chat starts: the instant (µs) its budget is full again plus one start's worth, as GCRA keeps it ([`take_start`]); expires (`PX`) once it is full again |
//! | `P:license` | string | [`LicenseMirror`] as JSON |
//! | `P:changes` | pub/sub channel | [`PresenceChange`] as JSON |
//!
//! Reads count with `ZCOUNT key (now_ms +inf`, or read the highest score (`ZRANGE key -1 -1 WITHSCORES`:
//! someone is here if it is after `now_ms`, else gone since it); writes refresh `PEXPIRE` on the keys they touch and drop
//! entries that expired more than the garbage-collection margin ago (`ZREMRANGEBYSCORE`). Multi-key
//! operations are one pipeline (one round trip); a change is published only when something changed (a new
//! session, a live session closed, a new sign-in, a sign-out, a group status that differs in more than its
//! evaluation time).

mod memory;
mod outage;
mod redis_presence;

use serde::{Deserialize, Serialize};
use switchboard_domain::{AgentId, AgentStatus, ConversationId, GroupId, TenantId};
use tokio::sync::broadcast;

pub use memory::MemoryPresence;
pub use outage::Outage;
pub use redis_presence::{RedisPresence, RedisSettings};

/// How many changes a receiver of [`Presence::changes`] may fall behind before it misses some (it then gets
/// `RecvError::Lagged` and should read again).
pub const CHANGES_CAPACITY: usize = 1024;

/// How many connections of one agent, or of one chat's customer, presence keeps: when a connection ends, those
/// that ended or lapsed first go beyond this many. A read takes the one that lasts longest (live, or the last to
/// end), which is never among them; so one who reconnects all day holds a bounded record, not one member per
/// connection until the garbage-collection margin.
pub const KEPT_CONNECTIONS: i64 = 64;

/// Presence facts, group status and the license mirror, shared by every node of a cluster.
#[async_trait::async_trait]
pub trait Presence: Send + Sync + 'static {
    // --- written by gateways: an agent's live connections ---

    /// The agent has a live connection (`session`, unique per connection) on `gateway`, good until
    /// `expires_at_ms` (the gateway refreshes it every heartbeat). Publishes [`PresenceChange::Session`] with
    /// `up: true` when the session is new.
    async fn session_alive(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        session: &str,
        gateway: &str,
        expires_at_ms: i64,
    ) -> Result<(), PresenceError>;

    /// The connection closed at `at_ms`. It stays recorded as closed (until the garbage-collection margin),
    /// so that an agent whose connections all ended reads [`Connections::Gone`] since the last of them;
    /// a session never written is not added, and an end is only ever moved earlier. Publishes
    /// [`PresenceChange::Session`] with `up: false` when the session was live until then.
    async fn session_gone(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        session: &str,
        at_ms: i64,
    ) -> Result<(), PresenceError>;

    // --- written by gateways: customers' connections to their chats ---

    /// Each of these customer connections is live, good until `expires_at_ms` (the gateway writes them all
    /// again every customer heartbeat, in one call). Nothing is published: only the queues read them, at
    /// their own pace.
    async fn customers_alive(&self, sessions: &[CustomerSession], expires_at_ms: i64) -> Result<(), PresenceError>;

    /// The customer's connection closed at `at_ms`. It stays recorded as closed (until the garbage-collection
    /// margin), so that a chat whose customer left reads [`Connections::Gone`], not
    /// [`Connections::Unknown`]; a session never written is not added.
    async fn customer_gone(&self, session: &CustomerSession, at_ms: i64) -> Result<(), PresenceError>;

    /// Whether the customer of each chat has a live connection at `now_ms`, in the order asked.
    async fn customers_present(
        &self,
        tenant: &TenantId,
        chats: &[ConversationId],
        now_ms: i64,
    ) -> Result<Vec<Connections>, PresenceError>;

    // --- read by routers (the agent actor owns availability) ---

    /// Whether each agent has a live connection (unexpired at `now_ms`), or since when every one they had
    /// has ended, in the order asked.
    async fn agents_present(
        &self,
        agents: &[(TenantId, AgentId)],
        now_ms: i64,
    ) -> Result<Vec<Connections>, PresenceError>;

    /// The live connections (unexpired at `now_ms`) of one agent, with the gateway of each, by session id.
    async fn agent_sessions(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        now_ms: i64,
    ) -> Result<Vec<LiveSession>, PresenceError>;

    /// The agent is signed in with `status` (online or away) as a member of `groups` until `expires_at_ms`
    /// (refreshed every heartbeat by the agent's owner), and `status` is the one they chose
    /// ([`Presence::chosen_status`]). Publishes [`PresenceChange::SignedIn`] for each group it is new in.
    async fn signed_in(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
        groups: &[GroupId],
        expires_at_ms: i64,
    ) -> Result<(), PresenceError>;

    /// The agent signed out (went offline): removed from `groups`, and their chosen status forgotten. Publishes
    /// [`PresenceChange::SignedIn`] with `signed_in: false` for each group it was in.
    async fn signed_out(&self, tenant: &TenantId, agent: &AgentId, groups: &[GroupId]) -> Result<(), PresenceError>;

    /// The status of the agent's last [`Presence::signed_in`] since they last signed out, if any: what an owner
    /// that takes the agent over (another router, after a takeover) starts from, rather than offline. It does
    /// not expire by value (an owner that died cannot sign the agent out): whether the agent is still there
    /// is for their live sessions to say.
    async fn chosen_status(&self, tenant: &TenantId, agent: &AgentId) -> Result<Option<AgentStatus>, PresenceError>;

    /// The number of agents signed in to the group, unexpired at `now_ms`.
    async fn n_signed_in(&self, tenant: &TenantId, group: &GroupId, now_ms: i64) -> Result<u32, PresenceError>;

    // --- group status: written by the router that owns the group's queue, read by anyone in one read ---

    /// Records a group's status. Publishes [`PresenceChange::Group`] when it differs from the one recorded in
    /// more than `evaluated_at_ms`.
    async fn put_group_status(&self, status: &GroupStatus) -> Result<(), PresenceError>;

    /// Every group status recorded for the tenant, by group id.
    async fn group_statuses(&self, tenant: &TenantId) -> Result<Vec<GroupStatus>, PresenceError>;

    // --- written by gateways: chat starts per client address ---

    /// Takes one chat start at `now_us` from the budget of the client `address` (a gateway's key for it: an
    /// IPv4 address, an IPv6 /64), shared by every gateway. `Ok(Err(ms))`: none left; one is in `ms` (whole
    /// milliseconds, at least 1).
    async fn take_chat_start(
        &self,
        address: &str,
        budget: StartBudget,
        now_us: i64,
    ) -> Result<Result<(), u64>, PresenceError>;

    /// Gives back at `now_us` one chat start taken from `address`'s budget, for a start that started
    /// nothing (a resend answered with what its first send started): never beyond a full budget.
    async fn give_back_chat_start(&self, address: &str, budget: StartBudget, now_us: i64) -> Result<(), PresenceError>;

    // --- license mirror (for dashboards only, never decides) ---

    /// Mirrors the license count: `used` of `max_sessions` concurrent conversations, as counted at `at_ms`.
    async fn mirror_license(&self, used: u64, max_sessions: u64, at_ms: i64) -> Result<(), PresenceError>;

    /// The last license count mirrored, if any.
    async fn license_mirror(&self) -> Result<Option<LicenseMirror>, PresenceError>;

    /// Changes published by anyone (session up/down, signed in/out, group status changed), for routers and
    /// gateways to react at once instead of at the next heartbeat. The stream survives a Redis restart (it
    /// resubscribes by itself and then sends [`PresenceChange::Resync`]); a gap is possible, which is why
    /// everyone also reads again every heartbeat.
    fn changes(&self) -> broadcast::Receiver<PresenceChange>;
}

/// A customer's connection to their chat, as a gateway records it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CustomerSession {
    pub tenant: TenantId,
    pub conversation: ConversationId,
    /// Unique per connection (the gateway's id, its boot and the socket).
    pub session: String,
}

/// What presence knows of someone's connections: a chat's customer's (see [`Presence::customers_present`])
/// or an agent's ([`Presence::agents_present`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// Nothing is recorded (never was: a gateway from before customers were recorded, a chat started before
    /// Redis lost its data; or ended longer ago than the garbage-collection margin): nobody can say since
    /// when they are gone.
    Unknown,
    /// At least one connection is live.
    Here,
    /// Every connection recorded closed or expired, the last of them at `since_ms` (its close, or its
    /// expiry when its gateway wrote no end: the instants are the gateways' clocks). A reader counts how long
    /// they have been gone from it, whoever read them before (an actor moved to another node does not count
    /// again from zero).
    Gone { since_ms: i64 },
}

/// What the latest instant recorded of someone's connections (the expiry or end of the one that lasts
/// longest, if any) says at `now_ms`.
pub(crate) fn connections(latest_ms: Option<i64>, now_ms: i64) -> Connections {
    match latest_ms {
        None => Connections::Unknown,
        Some(latest_ms) if latest_ms > now_ms => Connections::Here,
        Some(since_ms) => Connections::Gone { since_ms },
    }
}

/// A live connection of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSession {
    /// The connection's id, unique per connection.
    pub session: String,
    /// The gateway holding the connection.
    pub gateway: String,
    /// Until when the connection counts, unless refreshed.
    pub expires_at_ms: i64,
}

/// Whether a group takes chats now: published by the router that owns the group's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// The group's tenant.
    pub tenant: TenantId,
    /// The group.
    pub group: GroupId,
    /// Inside business hours.
    pub open: bool,
    /// Agents signed in to the group.
    pub signed_in: u32,
    /// Open and at least one agent signed in: the group takes chats.
    pub online: bool,
    /// When this was evaluated (milliseconds since the Unix epoch, the evaluator's clock).
    pub evaluated_at_ms: i64,
}

impl GroupStatus {
    /// A status with `online` derived: open and at least one agent signed in.
    pub fn new(tenant: TenantId, group: GroupId, open: bool, signed_in: u32, evaluated_at_ms: i64) -> GroupStatus {
        GroupStatus { tenant, group, open, signed_in, online: open && signed_in > 0, evaluated_at_ms }
    }

    /// Equal in everything but the time of evaluation.
    pub fn same_as(&self, other: &GroupStatus) -> bool {
        self.tenant == other.tenant
            && self.group == other.group
            && self.open == other.open
            && self.signed_in == other.signed_in
            && self.online == other.online
    }
}

/// The license count as last mirrored (for dashboards; the store holds the real count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseMirror {
    /// Concurrent conversations holding a permit.
    pub used: u64,
    /// The license's limit.
    pub max_sessions: u64,
    /// When it was counted (milliseconds since the Unix epoch).
    pub at_ms: i64,
}

/// A change published through [`Presence::changes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PresenceChange {
    /// A connection of the agent came up (a new session) or went away.
    Session {
        /// The agent's tenant.
        tenant: TenantId,
        /// The agent.
        agent: AgentId,
        /// `true` for a new connection, `false` for one closed.
        up: bool,
    },
    /// The agent signed in to the group, or out of it.
    SignedIn {
        /// The tenant.
        tenant: TenantId,
        /// The group.
        group: GroupId,
        /// The agent.
        agent: AgentId,
        /// `true` when signed in, `false` when signed out.
        signed_in: bool,
    },
    /// A group's status changed.
    Group(GroupStatus),
    /// The stream was interrupted (Redis went away and came back) and changes may have been missed: read
    /// again now rather than at the next heartbeat. Never published, only produced locally.
    Resync,
}

/// How many chats one client address may start: `per_minute` on average (at least 1), up to `burst` at once
/// (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartBudget {
    pub per_minute: u32,
    pub burst: u32,
}

impl StartBudget {
    /// One start's worth of time at the average rate, in µs.
    fn interval_us(self) -> i64 {
        60_000_000 / i64::from(self.per_minute.max(1))
    }

    /// How far ahead of now the budget may run: `burst` starts' worth.
    fn tolerance_us(self) -> i64 {
        self.interval_us().saturating_mul(i64::from(self.burst.max(1)))
    }
}

/// GCRA (the generic cell rate algorithm): a start at `now_us` against the address's theoretical arrival time
/// `tat_us` (`None`: nothing kept, a full budget). `Ok(tat)`: taken, the time to keep; `Err(ms)`: refused,
/// one is allowed in `ms` (at least 1). A token bucket of `burst` starts refilled at `per_minute`, kept as
/// one instant. [`RedisPresence`] runs the same in a script (`redis_presence.rs`), and the behaviour suite
/// holds both to it.
pub fn take_start(budget: StartBudget, tat_us: Option<i64>, now_us: i64) -> Result<i64, u64> {
    let tat = tat_us.unwrap_or(now_us).max(now_us);
    let next = tat.saturating_add(budget.interval_us());
    let allowed_at = next.saturating_sub(budget.tolerance_us());
    if allowed_at > now_us {
        let wait_us = u64::try_from(allowed_at - now_us).unwrap_or(u64::MAX);
        return Err(wait_us.div_ceil(1_000).max(1));
    }
    Ok(next)
}

/// [`take_start`] undone: the address's theoretical arrival time `tat_us` one start's worth earlier. `None`:
/// the budget is full at `now_us` (nothing to keep, as for an address never seen). [`RedisPresence`] runs the
/// same in a script.
pub fn give_back_start(budget: StartBudget, tat_us: i64, now_us: i64) -> Option<i64> {
    Some(tat_us.saturating_sub(budget.interval_us())).filter(|tat| *tat > now_us)
}

/// Why a presence operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    /// Redis is down, unreachable or too slow: callers treat presence as stale and carry on.
    #[error("presence unavailable: {0}")]
    Unavailable(String),
    /// What is stored is not what this code writes (a foreign or damaged value).
    #[error("presence data corrupt: {0}")]
    Corrupt(String),
    /// The configuration is wrong (for example a Redis URL that does not parse).
    #[error("presence misconfigured: {0}")]
    Config(String),
}
