//! The store's schema in a database of its own, for tests that write rows by hand (the checker's tests): the
//! migration files of `crates/switchboard-store/migrations` (its `postgres/` folder when there is one),
//! then, only where they are not there yet, the tables and columns the cluster contract adds.

use std::path::PathBuf;

use anyhow::Context;

use crate::db::Db;

/// What the cluster contract adds to the schema, each only if missing (the store's migrations may already
/// have it).
const CLUSTER_ADDITIONS: &str = "\
    ALTER TABLE events ADD COLUMN IF NOT EXISTS epoch BIGINT;\
    CREATE TABLE IF NOT EXISTS shard_lease_history (\
        shard INTEGER NOT NULL, epoch BIGINT NOT NULL, node_id TEXT NOT NULL, acquired_at_ms BIGINT NOT NULL,\
        PRIMARY KEY (shard, epoch));\
    CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, address TEXT NOT NULL, expires_at_ms BIGINT NOT NULL);";

fn migrations_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../crates/switchboard-store/migrations");
    let postgres = dir.join("postgres");
    if postgres.is_dir() { postgres } else { dir }
}

/// Applies the store's migration files in name order, then `CLUSTER_ADDITIONS`.
pub async fn install(db: &Db) -> anyhow::Result<()> {
    let dir = migrations_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|extension| extension == "sql"))
        .collect();
    files.sort();
    for file in files {
        let sql = std::fs::read_to_string(&file)?;
        db.execute(&sql).await.with_context(|| format!("applying {}", file.display()))?;
    }
    db.execute(CLUSTER_ADDITIONS).await
}

/// Drops the primary key, unique constraints and unique indexes of `table`, so that a test can store what
/// they would refuse (a repeated seq, a repeated client message id, two nodes for one epoch).
pub async fn drop_uniqueness(db: &Db, table: &str) -> anyhow::Result<()> {
    let sql = format!(
        "DO $$ DECLARE r record; BEGIN \
           FOR r IN SELECT conname FROM pg_constraint WHERE conrelid = '{table}'::regclass AND contype IN ('p', 'u') LOOP \
             EXECUTE format('ALTER TABLE {table} DROP CONSTRAINT %I CASCADE', r.conname); \
           END LOOP; \
           FOR r IN SELECT indexrelid::regclass::text AS name FROM pg_index \
                    WHERE indrelid = '{table}'::regclass AND indisunique LOOP \
             EXECUTE format('DROP INDEX %s', r.name); \
           END LOOP; \
         END $$;"
    );
    db.execute(&sql).await
}
