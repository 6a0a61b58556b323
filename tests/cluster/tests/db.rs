//! The harness's reading of the database (placement, ownership) against the store's schema in PostgreSQL.

use std::collections::BTreeSet;

use switchboard_cluster_tests::{Db, SHARDS, schema};
use switchboard_testservices::Postgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_and_ownership_are_read_from_the_leases() -> anyhow::Result<()> {
    let postgres = tokio::task::block_in_place(Postgres::start)?;
    let url = tokio::task::block_in_place(|| postgres.create_database())?;
    let db = Db::connect(&url).await?;
    schema::install(&db).await?;
    let now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";
    // router-0 holds the even shards, router-1 the odd ones but shard 1's lease has expired.
    db.execute(&format!(
        "INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms) \
         SELECT s, CASE WHEN s % 2 = 0 THEN 'router-0' ELSE 'router-1' END, 1, \
                CASE WHEN s = 1 THEN {now} - 1 ELSE {now} + 60000 END FROM generate_series(0, {}) AS s;\
         INSERT INTO conversations (id, tenant_id, group_id, customer_name, first_question, state, created_at_ms, \
           queued_at_ms, last_seq, shard) VALUES ('c-even', 'acme', 'g1', 'Ann', 'hi', 'queued', 1, 1, 0, 4), \
           ('c-expired', 'acme', 'g1', 'Ben', 'hi', 'queued', 1, 1, 0, 1);",
        SHARDS - 1
    ))
    .await?;

    let placement = db.placement().await?;
    let live: BTreeSet<String> = ["router-0".to_owned(), "router-1".to_owned()].into();
    assert_eq!(placement.unowned(&live), [1]);
    let only_router_0: BTreeSet<String> = ["router-0".to_owned()].into();
    assert_eq!(placement.unowned(&only_router_0).len(), SHARDS / 2);
    let per_node = db.shards_per_node().await?;
    assert_eq!((per_node["router-0"].len(), per_node["router-1"].len()), (SHARDS / 2, SHARDS / 2 - 1));

    let even = db.owner_of("c-even").await?.expect("c-even exists");
    assert_eq!((even.shard, even.live_owner()), (4, Some("router-0")));
    let expired = db.owner_of("c-expired").await?.expect("c-expired exists");
    assert_eq!((expired.shard, expired.live_owner()), (1, None));
    assert!(db.owner_of("c-missing").await?.is_none());

    // The pool outlives a restart of PostgreSQL.
    tokio::task::block_in_place(|| {
        postgres.stop()?;
        postgres.restart()
    })?;
    assert_eq!(db.placement().await?.leases.len(), SHARDS);
    Ok(())
}
