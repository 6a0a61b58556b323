//! Presence in Redis: one multiplexed connection (redis' `ConnectionManager`, which reconnects by itself) for
//! commands, and a background task with its own connection for the change stream.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ErrorKind, RedisError, ServerErrorKind};
use switchboard_domain::{AgentId, AgentStatus, ConversationId, GroupId, TenantId};
use tokio::sync::{broadcast, watch};
use tracing::{debug, warn};

use crate::{
    CHANGES_CAPACITY, Connections, CustomerSession, GroupStatus, LicenseMirror, LiveSession, Presence, PresenceChange,
    PresenceError, StartBudget,
};

/// [`take_start`](crate::take_start) in Redis, atomically: KEYS[1] the address's key; ARGV now (µs), one
/// start's worth (µs) and the budget's tolerance (µs). Answers 0 (taken: the new theoretical arrival time is
/// kept until the budget is full again) or how long until a start is allowed (µs). Instants are written with
/// `%d`: Lua's numbers are doubles, exact to 2^53 µs (some 285 years).
const TAKE_START_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next = tat + interval
local allowed_at = next - tolerance
if allowed_at > now then return allowed_at - now end
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.max(1, math.ceil((next - now) / 1000)))
return 0
";

/// [`crate::give_back_start`]: the address's instant one start's worth earlier, removed once it is not after now
/// (a full budget).
const GIVE_BACK_START_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local back = tat - interval
if back <= now then redis.call('DEL', KEYS[1]) return 1 end
redis.call('SET', KEYS[1], string.format('%d', back), 'PX', math.max(1, math.ceil((back - now) / 1000)))
return 1
";

/// How [`RedisPresence`] talks to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// Prefix of every key and of the channel (`sb` by default), so that several deployments can share a server.
    pub prefix: String,
    /// How long a connection attempt may take.
    pub connection_timeout: Duration,
    /// How long a command may wait for its answer.
    pub response_timeout: Duration,
    /// Garbage collection: keys expire (`PEXPIRE`) this long after their last write, and entries whose
    /// `expires_at_ms` is this much older than a fresh write's are dropped. Expiry that matters is by value.
    pub gc_ttl: Duration,
    /// The first pause before the change stream subscribes again after losing its connection; it doubles up to
    /// [`resubscribe_max_backoff`](Self::resubscribe_max_backoff).
    pub resubscribe_min_backoff: Duration,
    /// The longest pause between two attempts to subscribe again.
    pub resubscribe_max_backoff: Duration,
    /// How often the change stream checks its connection with a PING (a connection can die silently).
    pub subscriber_ping_interval: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            prefix: "sb".to_string(),
            connection_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_millis(500),
            gc_ttl: Duration::from_secs(24 * 60 * 60),
            resubscribe_min_backoff: Duration::from_millis(50),
            resubscribe_max_backoff: Duration::from_secs(2),
            subscriber_ping_interval: Duration::from_secs(2),
        }
    }
}

impl RedisSettings {
    /// The longest one operation may take before it fails with [`PresenceError::Unavailable`]: a connection
    /// attempt plus an answer.
    fn operation_timeout(&self) -> Duration {
        self.connection_timeout.saturating_add(self.response_timeout)
    }

    fn gc_ttl_ms(&self) -> i64 {
        i64::try_from(self.gc_ttl.as_millis()).unwrap_or(i64::MAX).max(1)
    }
}

/// The names of the keys (see the crate documentation for the layout).
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn sessions(&self, tenant: &TenantId, agent: &AgentId) -> String {
        format!("{}:session:{tenant}:{agent}", self.prefix)
    }

    fn customer(&self, tenant: &TenantId, conversation: &ConversationId) -> String {
        format!("{}:customer:{tenant}:{conversation}", self.prefix)
    }

    fn gateways(&self, tenant: &TenantId, agent: &AgentId) -> String {
        format!("{}:gateway:{tenant}:{agent}", self.prefix)
    }

    fn signed_in(&self, tenant: &TenantId, group: &GroupId) -> String {
        format!("{}:signed_in:{tenant}:{group}", self.prefix)
    }

    fn status(&self, tenant: &TenantId, agent: &AgentId) -> String {
        format!("{}:status:{tenant}:{agent}", self.prefix)
    }

    fn group_status(&self, tenant: &TenantId) -> String {
        format!("{}:group_status:{tenant}", self.prefix)
    }

    fn starts(&self, address: &str) -> String {
        format!("{}:starts:{address}", self.prefix)
    }

    fn license(&self) -> String {
        format!("{}:license", self.prefix)
    }

    fn changes(&self) -> String {
        format!("{}:changes", self.prefix)
    }
}

/// [`Presence`] in Redis. Clones share the connection and the change stream; the change stream's background
/// task stops when the last clone is dropped.
#[derive(Clone)]
pub struct RedisPresence {
    inner: Arc<Inner>,
}

struct Inner {
    connection: ConnectionManager,
    keys: Keys,
    settings: RedisSettings,
    changes: broadcast::Sender<PresenceChange>,
    /// How many times the change stream has subscribed (successfully) so far.
    subscriptions: watch::Receiver<u64>,
    /// Dropped with the last clone: the change stream's task stops then.
    _stop: watch::Sender<()>,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence").field("settings", &self.inner.settings).finish_non_exhaustive()
    }
}

impl RedisPresence {
    /// Connects to Redis at `url` (`redis://host:port/db`) and waits until commands work and the change stream
    /// is subscribed; fails with [`PresenceError::Unavailable`] when Redis does not answer within the timeouts.
    /// Once connected, it reconnects by itself after an outage.
    pub async fn connect(url: &str, settings: RedisSettings) -> Result<RedisPresence, PresenceError> {
        let presence = Self::connect_lazy(url, settings)?;
        let timeout = presence.inner.settings.operation_timeout();
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        presence.query::<(String,)>(&pipe).await?;
        let mut subscriptions = presence.inner.subscriptions.clone();
        match tokio::time::timeout(timeout, subscriptions.wait_for(|count| *count > 0)).await {
            Ok(Ok(_)) => Ok(presence),
            Ok(Err(_)) => Err(PresenceError::Unavailable("the change stream stopped".to_string())),
            Err(_) => Err(PresenceError::Unavailable(format!("could not subscribe to changes within {timeout:?}"))),
        }
    }

    /// Like [`connect`](Self::connect), without waiting for Redis: the first operations fail with
    /// [`PresenceError::Unavailable`] until Redis answers. Only a URL that does not parse (or a call outside a
    /// tokio runtime) is an error.
    pub fn connect_lazy(url: &str, settings: RedisSettings) -> Result<RedisPresence, PresenceError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| PresenceError::Config("RedisPresence needs a tokio runtime".to_string()))?;
        let client = Client::open(url).map_err(|error| PresenceError::Config(format!("redis url {url:?}: {error}")))?;
        // Few, quick reconnection attempts: a call during an outage must fail fast (callers treat presence as
        // stale); the next call tries again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connection_timeout))
            .set_response_timeout(Some(settings.response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|error| PresenceError::Config(format!("redis connection manager: {error}")))?;
        let keys = Keys { prefix: settings.prefix.clone() };
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let (stop, stopped) = watch::channel(());
        let (subscribed, subscriptions) = watch::channel(0);
        let subscriber = Subscriber {
            client,
            channel: keys.changes(),
            settings: settings.clone(),
            changes: changes.clone(),
            subscribed,
            stopped,
        };
        runtime.spawn(subscriber.run());
        Ok(RedisPresence { inner: Arc::new(Inner { connection, keys, settings, changes, subscriptions, _stop: stop }) })
    }

    /// Runs a pipeline (one round trip) within the operation timeout.
    async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, PresenceError> {
        let mut connection = self.inner.connection.clone();
        run(self.inner.settings.operation_timeout(), pipe.query_async::<T>(&mut connection)).await
    }

    /// Publishes changes (one round trip for all of them).
    async fn publish(&self, changes: &[PresenceChange]) -> Result<(), PresenceError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for change in changes {
            let payload = serde_json::to_string(change).map_err(|error| PresenceError::Corrupt(error.to_string()))?;
            pipe.cmd("PUBLISH").arg(self.inner.keys.changes()).arg(payload).ignore();
        }
        self.query::<()>(&pipe).await
    }

    fn gc_ttl_ms(&self) -> i64 {
        self.inner.settings.gc_ttl_ms()
    }
}

/// Runs one Redis operation, failing with [`PresenceError::Unavailable`] after `timeout`.
async fn run<T>(timeout: Duration, operation: impl Future<Output = Result<T, RedisError>>) -> Result<T, PresenceError> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(classify(&error)),
        Err(_) => Err(PresenceError::Unavailable(format!("redis did not answer within {timeout:?}"))),
    }
}

/// A failure to reach Redis is `Unavailable`; an answer this code cannot have caused is `Corrupt`.
fn classify(error: &RedisError) -> PresenceError {
    let unreachable = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            ) | ErrorKind::AuthenticationFailed
                | ErrorKind::Client
        );
    if unreachable { PresenceError::Unavailable(error.to_string()) } else { PresenceError::Corrupt(error.to_string()) }
}

/// How many customers' connections one pipeline writes or reads at most.
const CUSTOMER_WRITES_PER_PIPELINE: usize = 512;

/// `(now_ms` as a sorted-set score bound: strictly after now.
fn after(now_ms: i64) -> String {
    format!("({now_ms}")
}

/// Scores of sorted sets are doubles; ours are whole milliseconds (exact up to 2^53).
fn score_to_ms(score: f64) -> i64 {
    if score.is_finite() {
        score as i64
    } else if score > 0.0 {
        i64::MAX
    } else {
        i64::MIN
    }
}

#[async_trait::async_trait]
impl Presence for RedisPresence {
    async fn session_alive(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        session: &str,
        gateway: &str,
        expires_at_ms: i64,
    ) -> Result<(), PresenceError> {
        let sessions = self.inner.keys.sessions(tenant, agent);
        let gateways = self.inner.keys.gateways(tenant, agent);
        let gc = self.gc_ttl_ms();
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE").arg(&sessions).arg("-inf").arg(after(expires_at_ms.saturating_sub(gc))).ignore();
        pipe.cmd("ZADD").arg(&sessions).arg(expires_at_ms).arg(session);
        pipe.cmd("HSET").arg(&gateways).arg(session).arg(gateway).ignore();
        pipe.cmd("PEXPIRE").arg(&sessions).arg(gc).ignore();
        pipe.cmd("PEXPIRE").arg(&gateways).arg(gc).ignore();
        let (added,): (i64,) = self.query(&pipe).await?;
        if added > 0 {
            self.publish(&[PresenceChange::Session { tenant: tenant.clone(), agent: agent.clone(), up: true }]).await?;
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
        let sessions = self.inner.keys.sessions(tenant, agent);
        let mut pipe = redis::pipe();
        // `XX LT CH`: only a session recorded, only ever earlier; changed (counted) when it was to expire after
        // its end, that is, live until then.
        pipe.cmd("ZADD").arg(&sessions).arg("XX").arg("LT").arg("CH").arg(at_ms).arg(session);
        pipe.cmd("ZREMRANGEBYRANK").arg(&sessions).arg(0).arg(-crate::KEPT_CONNECTIONS - 1).ignore();
        pipe.cmd("HDEL").arg(self.inner.keys.gateways(tenant, agent)).arg(session).ignore();
        let (ended,): (i64,) = self.query(&pipe).await?;
        if ended > 0 {
            self.publish(&[PresenceChange::Session { tenant: tenant.clone(), agent: agent.clone(), up: false }])
                .await?;
        }
        Ok(())
    }

    async fn customers_alive(&self, sessions: &[CustomerSession], expires_at_ms: i64) -> Result<(), PresenceError> {
        let gc = self.gc_ttl_ms();
        // A heartbeat's writes go in pipelines of a bounded size: one round trip each, none too large.
        for chunk in sessions.chunks(CUSTOMER_WRITES_PER_PIPELINE) {
            let mut pipe = redis::pipe();
            for session in chunk {
                let key = self.inner.keys.customer(&session.tenant, &session.conversation);
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(after(expires_at_ms.saturating_sub(gc)))
                    .ignore();
                pipe.cmd("ZADD").arg(&key).arg(expires_at_ms).arg(&session.session).ignore();
                pipe.cmd("PEXPIRE").arg(&key).arg(gc).ignore();
            }
            self.query::<()>(&pipe).await?;
        }
        Ok(())
    }

    async fn customer_gone(&self, session: &CustomerSession, at_ms: i64) -> Result<(), PresenceError> {
        let key = self.inner.keys.customer(&session.tenant, &session.conversation);
        let mut pipe = redis::pipe();
        // `XX LT`: only a connection recorded, and only ever earlier (a late heartbeat write cannot revive it:
        // the gateway writes its live connections only).
        pipe.cmd("ZADD").arg(&key).arg("XX").arg("LT").arg(at_ms).arg(&session.session).ignore();
        pipe.cmd("ZREMRANGEBYRANK").arg(&key).arg(0).arg(-crate::KEPT_CONNECTIONS - 1).ignore();
        self.query::<()>(&pipe).await?;
        Ok(())
    }

    async fn customers_present(
        &self,
        tenant: &TenantId,
        chats: &[ConversationId],
        now_ms: i64,
    ) -> Result<Vec<Connections>, PresenceError> {
        let mut present = Vec::with_capacity(chats.len());
        for chunk in chats.chunks(CUSTOMER_WRITES_PER_PIPELINE) {
            let mut pipe = redis::pipe();
            for chat in chunk {
                // The connection that lasts longest: none recorded, live, or every one ended.
                pipe.cmd("ZRANGE").arg(self.inner.keys.customer(tenant, chat)).arg(-1).arg(-1).arg("WITHSCORES");
            }
            let latest: Vec<Vec<(String, f64)>> = self.query(&pipe).await?;
            present.extend(
                latest
                    .iter()
                    .map(|latest| crate::connections(latest.first().map(|(_, score)| score_to_ms(*score)), now_ms)),
            );
        }
        Ok(present)
    }

    async fn agents_present(
        &self,
        agents: &[(TenantId, AgentId)],
        now_ms: i64,
    ) -> Result<Vec<Connections>, PresenceError> {
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (tenant, agent) in agents {
            // The connection that lasts longest: none recorded, live, or every one ended.
            pipe.cmd("ZRANGE").arg(self.inner.keys.sessions(tenant, agent)).arg(-1).arg(-1).arg("WITHSCORES");
        }
        let latest: Vec<Vec<(String, f64)>> = self.query(&pipe).await?;
        Ok(latest
            .iter()
            .map(|latest| crate::connections(latest.first().map(|(_, score)| score_to_ms(*score)), now_ms))
            .collect())
    }

    async fn agent_sessions(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        now_ms: i64,
    ) -> Result<Vec<LiveSession>, PresenceError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE").arg(self.inner.keys.sessions(tenant, agent)).arg(after(now_ms)).arg("+inf");
        pipe.arg("WITHSCORES");
        pipe.cmd("HGETALL").arg(self.inner.keys.gateways(tenant, agent));
        let (live, gateways): (Vec<(String, f64)>, HashMap<String, String>) = self.query(&pipe).await?;
        let mut sessions: Vec<LiveSession> = live
            .into_iter()
            .map(|(session, score)| LiveSession {
                gateway: gateways.get(&session).cloned().unwrap_or_default(),
                session,
                expires_at_ms: score_to_ms(score),
            })
            .collect();
        sessions.sort_by(|a, b| a.session.cmp(&b.session));
        Ok(sessions)
    }

    async fn signed_in(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
        groups: &[GroupId],
        expires_at_ms: i64,
    ) -> Result<(), PresenceError> {
        let gc = self.gc_ttl_ms();
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.inner.keys.status(tenant, agent)).arg(status.as_str()).arg("PX").arg(gc).ignore();
        for group in groups {
            let key = self.inner.keys.signed_in(tenant, group);
            pipe.cmd("ZREMRANGEBYSCORE").arg(&key).arg("-inf").arg(after(expires_at_ms.saturating_sub(gc))).ignore();
            pipe.cmd("ZADD").arg(&key).arg(expires_at_ms).arg(agent.as_str());
            pipe.cmd("PEXPIRE").arg(&key).arg(gc).ignore();
        }
        let added: Vec<i64> = self.query(&pipe).await?;
        let changes: Vec<PresenceChange> = groups
            .iter()
            .zip(added)
            .filter(|(_, added)| *added > 0)
            .map(|(group, _)| PresenceChange::SignedIn {
                tenant: tenant.clone(),
                group: group.clone(),
                agent: agent.clone(),
                signed_in: true,
            })
            .collect();
        self.publish(&changes).await
    }

    async fn signed_out(&self, tenant: &TenantId, agent: &AgentId, groups: &[GroupId]) -> Result<(), PresenceError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.inner.keys.status(tenant, agent)).ignore();
        for group in groups {
            pipe.cmd("ZREM").arg(self.inner.keys.signed_in(tenant, group)).arg(agent.as_str());
        }
        let removed: Vec<i64> = self.query(&pipe).await?;
        let changes: Vec<PresenceChange> = groups
            .iter()
            .zip(removed)
            .filter(|(_, removed)| *removed > 0)
            .map(|(group, _)| PresenceChange::SignedIn {
                tenant: tenant.clone(),
                group: group.clone(),
                agent: agent.clone(),
                signed_in: false,
            })
            .collect();
        self.publish(&changes).await
    }

    async fn chosen_status(&self, tenant: &TenantId, agent: &AgentId) -> Result<Option<AgentStatus>, PresenceError> {
        let key = self.inner.keys.status(tenant, agent);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key);
        let (text,): (Option<String>,) = self.query(&pipe).await?;
        text.map(|text| AgentStatus::parse(&text).ok_or_else(|| PresenceError::Corrupt(format!("{key}: {text:?}"))))
            .transpose()
    }

    async fn n_signed_in(&self, tenant: &TenantId, group: &GroupId, now_ms: i64) -> Result<u32, PresenceError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZCOUNT").arg(self.inner.keys.signed_in(tenant, group)).arg(after(now_ms)).arg("+inf");
        let (count,): (u32,) = self.query(&pipe).await?;
        Ok(count)
    }

    async fn put_group_status(&self, status: &GroupStatus) -> Result<(), PresenceError> {
        let key = self.inner.keys.group_status(&status.tenant);
        let json = serde_json::to_string(status).map_err(|error| PresenceError::Corrupt(error.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(&key).arg(status.group.as_str());
        pipe.cmd("HSET").arg(&key).arg(status.group.as_str()).arg(json).ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(self.gc_ttl_ms()).ignore();
        let (previous,): (Option<String>,) = self.query(&pipe).await?;
        let previous = previous.and_then(|json| serde_json::from_str::<GroupStatus>(&json).ok());
        if previous.is_none_or(|previous| !previous.same_as(status)) {
            self.publish(&[PresenceChange::Group(status.clone())]).await?;
        }
        Ok(())
    }

    async fn group_statuses(&self, tenant: &TenantId) -> Result<Vec<GroupStatus>, PresenceError> {
        let key = self.inner.keys.group_status(tenant);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&key);
        let (entries,): (HashMap<String, String>,) = self.query(&pipe).await?;
        let mut statuses = entries
            .into_iter()
            .map(|(group, json)| {
                serde_json::from_str::<GroupStatus>(&json)
                    .map_err(|error| PresenceError::Corrupt(format!("{key} field {group:?}: {error}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        statuses.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(statuses)
    }

    async fn take_chat_start(
        &self,
        address: &str,
        budget: StartBudget,
        now_us: i64,
    ) -> Result<Result<(), u64>, PresenceError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(TAKE_START_SCRIPT)
            .arg(1)
            .arg(self.inner.keys.starts(address))
            .arg(now_us)
            .arg(budget.interval_us())
            .arg(budget.tolerance_us());
        let (wait_us,): (i64,) = self.query(&pipe).await?;
        if wait_us <= 0 {
            return Ok(Ok(()));
        }
        Ok(Err(u64::try_from(wait_us).unwrap_or(u64::MAX).div_ceil(1_000).max(1)))
    }

    async fn give_back_chat_start(&self, address: &str, budget: StartBudget, now_us: i64) -> Result<(), PresenceError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(GIVE_BACK_START_SCRIPT)
            .arg(1)
            .arg(self.inner.keys.starts(address))
            .arg(now_us)
            .arg(budget.interval_us())
            .ignore();
        self.query::<()>(&pipe).await
    }

    async fn mirror_license(&self, used: u64, max_sessions: u64, at_ms: i64) -> Result<(), PresenceError> {
        let json = serde_json::to_string(&LicenseMirror { used, max_sessions, at_ms })
            .map_err(|error| PresenceError::Corrupt(error.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.inner.keys.license()).arg(json).arg("PX").arg(self.gc_ttl_ms()).ignore();
        self.query::<()>(&pipe).await
    }

    async fn license_mirror(&self) -> Result<Option<LicenseMirror>, PresenceError> {
        let key = self.inner.keys.license();
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key);
        let (json,): (Option<String>,) = self.query(&pipe).await?;
        json.map(|json| serde_json::from_str(&json).map_err(|error| PresenceError::Corrupt(format!("{key}: {error}"))))
            .transpose()
    }

    fn changes(&self) -> broadcast::Receiver<PresenceChange> {
        self.inner.changes.subscribe()
    }
}

/// The change stream's background task: subscribes to the channel on a connection of its own, forwards every
/// change to the broadcast channel, and subscribes again (with backoff) whenever the connection is lost.
struct Subscriber {
    client: Client,
    channel: String,
    settings: RedisSettings,
    changes: broadcast::Sender<PresenceChange>,
    subscribed: watch::Sender<u64>,
    stopped: watch::Receiver<()>,
}

/// Why the subscriber stopped listening on a connection.
enum Lost {
    /// Every [`RedisPresence`] is gone: the task ends.
    Stop,
    /// The connection failed: subscribe again.
    Connection(String),
}

impl Subscriber {
    async fn run(mut self) {
        let mut backoff = self.settings.resubscribe_min_backoff;
        let mut subscriptions: u64 = 0;
        loop {
            let subscribe = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                Ok::<_, RedisError>(pubsub)
            };
            let attempt = tokio::select! {
                _ = self.stopped.changed() => return,
                attempt = tokio::time::timeout(self.settings.operation_timeout(), subscribe) => attempt,
            };
            match attempt {
                Ok(Ok(pubsub)) => {
                    subscriptions += 1;
                    debug!(channel = %self.channel, subscriptions, "presence changes subscribed");
                    backoff = self.settings.resubscribe_min_backoff;
                    if subscriptions > 1 {
                        // Changes published while we were away are lost: tell everyone to read again.
                        let _ = self.changes.send(PresenceChange::Resync);
                    }
                    self.subscribed.send_replace(subscriptions);
                    match self.listen(pubsub).await {
                        Lost::Stop => return,
                        Lost::Connection(why) => warn!(channel = %self.channel, %why, "presence changes interrupted"),
                    }
                }
                Ok(Err(error)) => debug!(channel = %self.channel, %error, "cannot subscribe to presence changes"),
                Err(_) => debug!(channel = %self.channel, "subscribing to presence changes timed out"),
            }
            tokio::select! {
                _ = self.stopped.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = backoff.saturating_mul(2).min(self.settings.resubscribe_max_backoff);
        }
    }

    /// Forwards messages until the connection is lost or the presence is dropped.
    async fn listen(&mut self, pubsub: redis::aio::PubSub) -> Lost {
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(self.settings.subscriber_ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                _ = self.stopped.changed() => return Lost::Stop,
                message = stream.next() => {
                    let Some(message) = message else {
                        return Lost::Connection("the connection closed".to_string());
                    };
                    match serde_json::from_slice::<PresenceChange>(message.get_payload_bytes()) {
                        Ok(change) => {
                            let _ = self.changes.send(change);
                        }
                        Err(error) => warn!(channel = %self.channel, %error, "ignoring a change that does not parse"),
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(self.settings.response_timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return Lost::Connection(error.to_string()),
                        Err(_) => return Lost::Connection("no answer to PING".to_string()),
                    }
                }
            }
        }
    }
}
