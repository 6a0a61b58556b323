//! A database made by the first schema (version 1), with a lease and a conversation in it, is upgraded by
//! migrations 2 to 4 in place: the current leases enter the lease history, the old events get epoch 0, the
//! open conversation gets its license permit, customer tokens kept plain are hashed, and the store goes on
//! with the same fences. On SQLite and on PostgreSQL.

mod common;

use std::sync::Arc;

use common::*;
use switchboard_domain::{FixedClock, stored_customer_token};
use switchboard_proto::internal::v1::{
    ConversationUpdate, Fence, GetLicenseRequest, License, ReadEventsRequest, RenewShardsRequest,
};
use switchboard_proto::store::StoreApi;
use switchboard_store::{LATEST_MIGRATION, LeaseGrant, SqlStore, StoreAudit};

const SCHEMA_V1: &str = include_str!("../migrations/0001_init.sql");

/// What version 1 of the store would have written: c1's shard leased by node-a under epoch 3, another
/// shard's row never leased, and conversation c1 with two events.
fn data_v1(shard: u32) -> String {
    format!(
        "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL);
         INSERT INTO schema_migrations VALUES (1, 'init', 0);
         INSERT INTO shard_leases VALUES ({shard}, 'node-a', 3, {expires});
         INSERT INTO shard_leases VALUES ({other}, '', 0, 0);
         INSERT INTO conversations (id, tenant_id, group_id, customer_name, first_question, state, created_at_ms,
             queued_at_ms, last_seq, shard, customer_token)
             VALUES ('c1', 'acme', 'sales', 'Carol', 'Where?', 'queued', 1, 1, 2, {shard}, 'token-c1');
         INSERT INTO conversations (id, tenant_id, group_id, customer_name, first_question, state, created_at_ms,
             queued_at_ms, last_seq, shard, customer_token)
             VALUES ('c2', 'acme', 'sales', 'Dan', 'Hm?', 'closed', 1, 1, 0, {shard}, 'sha256:already-hashed'),
                    ('c3', 'acme', 'sales', 'Eve', 'Hm?', 'closed', 1, 1, 0, {shard}, '');
         INSERT INTO events VALUES ('c1', 1, 1, 'system', '', NULL, 'created', '{{}}');
         INSERT INTO events VALUES ('c1', 2, 2, 'customer', '', 'm1', 'message', '{{\"body\":\"hi\"}}');",
        expires = START_MS + LEASE_MS as i64,
        other = (shard + 1) % switchboard_domain::N_SHARDS,
    )
}

async fn check_upgraded<S: StoreApi + StoreAudit>(store: &S, shard: u32) {
    assert_eq!(
        store.lease_history().await.unwrap(),
        [LeaseGrant { shard, epoch: 3, node_id: "node-a".into(), acquired_at_ms: 0 }],
        "the current lease, and only leases that were granted"
    );
    assert_eq!(store.event_epochs("c1").await.unwrap(), [(1, 0), (2, 0)]);

    // The old fence still holds: renewed, then an append under it, deduplicated against the old log.
    let fence = Fence { shard, epoch: 3 };
    let request = RenewShardsRequest { node_id: "node-a".into(), held: vec![fence], lease_ms: LEASE_MS };
    assert!(store.renew_shards(request).await.unwrap().lost.is_empty());
    assert!(append(store, fence, "c1", vec![message("m1", "hi")], None).await.unwrap().duplicate);
    let next = append(store, fence, "c1", vec![message("m2", "again")], None).await.unwrap();
    assert_eq!(next.events[0].seq, 3);
    assert_eq!(store.event_epochs("c1").await.unwrap(), [(1, 0), (2, 0), (3, 3)]);
    let request = ReadEventsRequest { conversation_id: "c1".into(), after_seq: 0, ..Default::default() };
    assert_eq!(store.read_events(request).await.unwrap().events.len(), 3);

    // Migration 3: the open conversation holds a permit (the limit starts unlimited); closing gives it back.
    assert_eq!(store.get_license(GetLicenseRequest {}).await.unwrap(), License { max_sessions: 0, used: 1 });
    let record = get(store, "c1").await;
    // Migration 4: the token kept plain is hashed; one hashed already, and none at all, are left.
    assert_eq!(record.customer_token, stored_customer_token("token-c1"));
    assert_eq!(get(store, "c2").await.customer_token, "sha256:already-hashed");
    assert_eq!(get(store, "c3").await.customer_token, "");
    assert_eq!((record.offer_agent_id.as_str(), record.offer_expires_at_ms), ("", 0));
    assert!(record.offered_to.is_empty());
    // Migration 5: the delivery marks of the chats stored before are not known (their logs tell), until an
    // update that has them.
    assert!(!record.delivery_marks_known);
    let marks =
        ConversationUpdate { delivery_marks_known: true, customer_delivered_up_to: 2, ..update("queued", "", 0, 0) };
    append(store, fence, "c1", vec![system_event("delivered")], Some(marks)).await.unwrap();
    let marked = get(store, "c1").await;
    assert_eq!(
        (marked.delivery_marks_known, marked.customer_delivered_up_to, marked.agent_delivered_up_to),
        (true, 2, 0)
    );
    // Migration 6: the customers of the chats stored before are not away.
    assert!(!marked.customer_away);
    append(store, fence, "c1", vec![system_event("closed")], Some(update("closed", "", 0, 9))).await.unwrap();
    assert_eq!(store.get_license(GetLicenseRequest {}).await.unwrap().used, 0);

    // The next grant of the shard (node-a re-taking its own) follows the old epoch, and is recorded.
    assert_eq!(common::fence(store, "node-a", shard).await.epoch, 4);
    assert_eq!(store.lease_history().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_version_1_sqlite_file_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let shard = shard_of_conversation("c1");
    {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{SCHEMA_V1}\n{}", data_v1(shard)))).execute(&pool).await.unwrap();
        pool.close().await;
    }
    let store = SqlStore::open(path.to_str().unwrap(), Arc::new(FixedClock::new(START_MS))).await.unwrap();
    assert_eq!(store.applied_migrations().await.unwrap(), (1..=LATEST_MIGRATION).collect::<Vec<_>>());
    check_upgraded(&store, shard).await;
}

#[tokio::test]
async fn a_version_1_postgres_database_is_upgraded_in_place() {
    let url = fresh_database();
    let shard = shard_of_conversation("c1");
    {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{SCHEMA_V1}\n{}", data_v1(shard)))).execute(&pool).await.unwrap();
        pool.close().await;
    }
    let store = pg_store(&url, Arc::new(FixedClock::new(START_MS))).await;
    assert_eq!(store.applied_migrations().await.unwrap(), (1..=LATEST_MIGRATION).collect::<Vec<_>>());
    check_upgraded(&store, shard).await;
}
