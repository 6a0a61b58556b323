//! What the harness and the checker read from PostgreSQL directly (never through the store): leases,
//! lease grants, conversations and events. Every column name of the store's schema used here is in this file.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Executor, Row};

/// The fixed number of shards (`switchboard-domain/src/shard.rs`).
pub const SHARDS: usize = 1024;

/// Database time, as the store judges lease expiry on PostgreSQL.
const DB_NOW_MS: &str = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";
const SELECT_LEASES: &str = "SELECT shard, owner, epoch, expires_at_ms FROM shard_leases ORDER BY shard";
const SELECT_HISTORY: &str = "SELECT shard, epoch, node_id FROM shard_lease_history ORDER BY shard, epoch";
const SELECT_CONVERSATIONS: &str = "SELECT id, state, last_seq, shard FROM conversations ORDER BY id";
const SELECT_EVENTS: &str = "SELECT conversation_id, seq, at_ms, author_role, author_id, client_msg_id, kind, \
     payload_json, epoch FROM events ORDER BY conversation_id, seq";
const SELECT_OWNER_OF: &str = "SELECT c.shard, l.owner, l.epoch, l.expires_at_ms FROM conversations c \
     LEFT JOIN shard_leases l ON l.shard = c.shard WHERE c.id = $1";

/// What the database held when [`Db::snapshot`] read it: `now_ms` is the database's time, read just before the
/// leases.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now_ms: i64,
    pub conversations: Vec<ConversationRow>,
    pub events: Vec<EventRow>,
    pub leases: Vec<Lease>,
    pub grants: Vec<Grant>,
}

/// A row of `shard_leases`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub shard: u32,
    pub owner: String,
    pub epoch: u64,
    pub expires_at_ms: i64,
}

/// A row of `shard_lease_history`: one per grant of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub shard: u32,
    pub epoch: u64,
    pub node_id: String,
}

/// A row of `conversations` (the columns the checks need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRow {
    pub id: String,
    pub state: String,
    pub last_seq: u64,
    pub shard: u32,
}

/// A row of `events`, with the client's own message id taken from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub conversation_id: String,
    pub seq: u64,
    /// When the router decided it (its clock, milliseconds since the Unix epoch).
    pub at_ms: i64,
    pub author_role: String,
    pub author_id: String,
    /// The id the client chose (not the store's per-author dedup key).
    pub client_msg_id: Option<String>,
    pub kind: String,
    /// The fence epoch the write carried; `None` when the column is NULL.
    pub epoch: Option<u64>,
}

/// The leases at one moment of database time.
#[derive(Debug, Clone)]
pub struct Placement {
    pub now_ms: i64,
    pub leases: Vec<Lease>,
}

impl Placement {
    /// Unexpired leases by owner.
    pub fn shards_by_owner(&self) -> BTreeMap<String, Vec<u32>> {
        let mut by_owner: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for lease in self.leases.iter().filter(|lease| lease.expires_at_ms > self.now_ms) {
            by_owner.entry(lease.owner.clone()).or_default().push(lease.shard);
        }
        by_owner
    }

    /// The shards without an unexpired lease held by one of `live`.
    pub fn unowned(&self, live: &BTreeSet<String>) -> Vec<u32> {
        let owned: BTreeSet<u32> = self
            .leases
            .iter()
            .filter(|lease| lease.expires_at_ms > self.now_ms && live.contains(&lease.owner))
            .map(|lease| lease.shard)
            .collect();
        (0..SHARDS as u32).filter(|shard| !owned.contains(shard)).collect()
    }

    pub fn lease(&self, shard: u32) -> Option<&Lease> {
        self.leases.iter().find(|lease| lease.shard == shard)
    }
}

/// Who owns a conversation now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationOwner {
    pub shard: u32,
    /// `None` when its shard never had a lease.
    pub lease: Option<Lease>,
    pub now_ms: i64,
}

impl ConversationOwner {
    /// The node whose lease is unexpired now, if any.
    pub fn live_owner(&self) -> Option<&str> {
        self.lease.as_ref().filter(|lease| lease.expires_at_ms > self.now_ms).map(|lease| lease.owner.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
}

fn to_u64(value: i64, what: &str) -> anyhow::Result<u64> {
    u64::try_from(value).with_context(|| format!("negative {what}: {value}"))
}

fn to_u32(value: i32, what: &str) -> anyhow::Result<u32> {
    u32::try_from(value).with_context(|| format!("negative {what}: {value}"))
}

/// The client message id of a stored event: the payload's (the client's own), else the dedup key's last part
/// (`role/id/client_msg_id`). A key of another form is no client's (`chat.start`, a chat's `created` event).
fn client_msg_id_of(column: Option<String>, payload_json: &str) -> Option<String> {
    let payload: Option<serde_json::Value> = serde_json::from_str(payload_json).ok();
    if let Some(id) = payload.as_ref().and_then(|payload| payload["client_msg_id"].as_str()) {
        return Some(id.to_owned());
    }
    let key = column?;
    let mut parts = key.splitn(3, '/');
    let (_role, _author, id) = (parts.next()?, parts.next()?, parts.next()?);
    Some(id.to_owned())
}

/// The license as the database holds it, with what it must agree with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LicenseState {
    pub max_sessions: i64,
    /// The counter admissions are decided on.
    pub used: i64,
    /// Rows of `license_permits`.
    pub permits: i64,
    /// Conversations not finished (queued or active).
    pub unfinished: i64,
    /// Unfinished conversations without a permit, and permits of finished (or missing) conversations.
    pub unfinished_without_permit: i64,
    pub permits_of_finished: i64,
}

const SELECT_LICENSE: &str = "SELECT \
    (SELECT max_sessions FROM license WHERE id = 1) AS max_sessions, \
    (SELECT used FROM license WHERE id = 1) AS used, \
    (SELECT COUNT(*) FROM license_permits) AS permits, \
    (SELECT COUNT(*) FROM conversations WHERE state NOT IN ('closed', 'cancelled')) AS unfinished, \
    (SELECT COUNT(*) FROM conversations c WHERE c.state NOT IN ('closed', 'cancelled') \
        AND NOT EXISTS (SELECT 1 FROM license_permits p WHERE p.conversation_id = c.id)) AS without_permit, \
    (SELECT COUNT(*) FROM license_permits p WHERE NOT EXISTS (SELECT 1 FROM conversations c \
        WHERE c.id = p.conversation_id AND c.state NOT IN ('closed', 'cancelled'))) AS of_finished";

impl Db {
    /// The license counter, the permits and the conversations they must match, read in one statement.
    pub async fn license(&self) -> anyhow::Result<LicenseState> {
        let row = sqlx::query(SELECT_LICENSE).fetch_one(&self.pool).await.context("reading the license")?;
        Ok(LicenseState {
            max_sessions: row.try_get("max_sessions")?,
            used: row.try_get("used")?,
            permits: row.try_get("permits")?,
            unfinished: row.try_get("unfinished")?,
            unfinished_without_permit: row.try_get("without_permit")?,
            permits_of_finished: row.try_get("of_finished")?,
        })
    }

    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        Ok(Db { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs SQL statements (several, separated by `;`) without parameters. Only for SQL written by the
    /// tests themselves.
    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        self.pool.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql))).await.with_context(|| format!("failed: {sql}"))?;
        Ok(())
    }

    pub async fn now_ms(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(DB_NOW_MS).fetch_one(&self.pool).await?)
    }

    pub async fn leases(&self) -> anyhow::Result<Vec<Lease>> {
        Self::read_leases(&mut *self.pool.acquire().await?).await
    }

    pub async fn conversations(&self) -> anyhow::Result<Vec<ConversationRow>> {
        Self::read_conversations(&mut *self.pool.acquire().await?).await
    }

    pub async fn events(&self) -> anyhow::Result<Vec<EventRow>> {
        Self::read_events(&mut *self.pool.acquire().await?).await
    }

    /// Conversations, events, grants and leases as of one instant: read in one repeatable-read transaction,
    /// so that a lease granted while they are read is in both the leases and their history, or in neither.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut tx = self.pool.begin().await?;
        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
        let conversations = Self::read_conversations(&mut tx).await?;
        let events = Self::read_events(&mut tx).await?;
        let grants = Self::read_grants(&mut tx).await?;
        let now_ms = sqlx::query_scalar(DB_NOW_MS).fetch_one(&mut *tx).await?;
        let leases = Self::read_leases(&mut tx).await?;
        tx.commit().await?;
        Ok(Snapshot { now_ms, conversations, events, leases, grants })
    }

    async fn read_leases(conn: &mut PgConnection) -> anyhow::Result<Vec<Lease>> {
        let rows = sqlx::query(SELECT_LEASES).fetch_all(conn).await.context("reading shard_leases")?;
        rows.iter()
            .map(|row| {
                Ok(Lease {
                    shard: to_u32(row.try_get("shard")?, "shard")?,
                    owner: row.try_get("owner")?,
                    epoch: to_u64(row.try_get("epoch")?, "epoch")?,
                    expires_at_ms: row.try_get("expires_at_ms")?,
                })
            })
            .collect()
    }

    /// The leases, with the database time read just before them.
    pub async fn placement(&self) -> anyhow::Result<Placement> {
        let now_ms = self.now_ms().await?;
        Ok(Placement { now_ms, leases: self.leases().await? })
    }

    async fn read_grants(conn: &mut PgConnection) -> anyhow::Result<Vec<Grant>> {
        let rows = sqlx::query(SELECT_HISTORY).fetch_all(conn).await.context("reading shard_lease_history")?;
        rows.iter()
            .map(|row| {
                Ok(Grant {
                    shard: to_u32(row.try_get("shard")?, "shard")?,
                    epoch: to_u64(row.try_get("epoch")?, "epoch")?,
                    node_id: row.try_get("node_id")?,
                })
            })
            .collect()
    }

    async fn read_conversations(conn: &mut PgConnection) -> anyhow::Result<Vec<ConversationRow>> {
        let rows = sqlx::query(SELECT_CONVERSATIONS).fetch_all(conn).await.context("reading conversations")?;
        rows.iter()
            .map(|row| {
                Ok(ConversationRow {
                    id: row.try_get("id")?,
                    state: row.try_get("state")?,
                    last_seq: to_u64(row.try_get("last_seq")?, "last_seq")?,
                    shard: to_u32(row.try_get("shard")?, "shard")?,
                })
            })
            .collect()
    }

    async fn read_events(conn: &mut PgConnection) -> anyhow::Result<Vec<EventRow>> {
        let rows = sqlx::query(SELECT_EVENTS).fetch_all(conn).await.context("reading events")?;
        rows.iter()
            .map(|row| {
                let payload_json: String = row.try_get("payload_json")?;
                let epoch: Option<i64> = row.try_get("epoch")?;
                Ok(EventRow {
                    conversation_id: row.try_get("conversation_id")?,
                    seq: to_u64(row.try_get("seq")?, "seq")?,
                    at_ms: row.try_get("at_ms")?,
                    author_role: row.try_get("author_role")?,
                    author_id: row.try_get("author_id")?,
                    client_msg_id: client_msg_id_of(row.try_get("client_msg_id")?, &payload_json),
                    kind: row.try_get("kind")?,
                    epoch: epoch.map(|epoch| to_u64(epoch, "epoch")).transpose()?,
                })
            })
            .collect()
    }

    /// The events of one conversation, in seq order.
    pub async fn events_of(&self, conversation_id: &str) -> anyhow::Result<Vec<EventRow>> {
        Ok(self.events().await?.into_iter().filter(|event| event.conversation_id == conversation_id).collect())
    }

    /// The shard of a conversation and its lease now.
    pub async fn owner_of(&self, conversation_id: &str) -> anyhow::Result<Option<ConversationOwner>> {
        let now_ms = self.now_ms().await?;
        let row = sqlx::query(SELECT_OWNER_OF).bind(conversation_id).fetch_optional(&self.pool).await?;
        let Some(row) = row else { return Ok(None) };
        let shard = to_u32(row.try_get("shard")?, "shard")?;
        let owner: Option<String> = row.try_get("owner")?;
        let lease = match owner {
            Some(owner) => Some(Lease {
                shard,
                owner,
                epoch: to_u64(row.try_get("epoch")?, "epoch")?,
                expires_at_ms: row.try_get("expires_at_ms")?,
            }),
            None => None,
        };
        Ok(Some(ConversationOwner { shard, lease, now_ms }))
    }

    /// Unexpired leases per node now.
    pub async fn shards_per_node(&self) -> anyhow::Result<BTreeMap<String, Vec<u32>>> {
        Ok(self.placement().await?.shards_by_owner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_message_id_is_the_clients_own() {
        let payload = r#"{"seq":0,"client_msg_id":"c-1","kind":"message","body":"hi"}"#;
        assert_eq!(client_msg_id_of(Some("customer//c-1".into()), payload).as_deref(), Some("c-1"));
        assert_eq!(client_msg_id_of(Some("agent/a/x/y".into()), "{}").as_deref(), Some("x/y"));
        assert_eq!(client_msg_id_of(None, r#"{"kind":"created"}"#), None);
        assert_eq!(client_msg_id_of(Some("chat.start".into()), r#"{"kind":"created"}"#), None);
        assert_eq!(client_msg_id_of(Some(String::new()), "{}"), None);
    }
}
