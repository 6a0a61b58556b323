//! The schema migrations and their runners (SQLite and PostgreSQL).
//!
//! Migrations are SQL files under `migrations/`, embedded in the binary and applied in version order; the
//! same files run on both databases. A migration may also rewrite data in Rust, in the same transaction,
//! where the SQL of the two databases cannot (SQLite has no SHA-256). Each runs in a transaction of its own
//! that first claims its version in `schema_migrations`: a version already there is skipped, so running the
//! migrations again (or from two processes at once) is harmless. On PostgreSQL each of those transactions
//! also takes a transaction advisory lock, so that two store processes starting together migrate one after
//! the other. One function ([`apply`]) applies a migration on either database.

use sqlx::{PgConnection, SqlitePool};
use switchboard_domain::{Clock, stored_customer_token};
use switchboard_proto::store::StoreError;

use crate::dialect::db_now_ms;
use crate::error::db;
use crate::{PgStore, SqlStore};

struct Migration {
    version: i64,
    name: &'static str,
    /// Empty: none.
    sql: &'static str,
    /// Run after the SQL, in its transaction.
    data: Option<DataStep>,
}

/// A data rewrite in Rust.
#[derive(Clone, Copy)]
enum DataStep {
    /// Customer tokens stored before they were hashed become their hash (see
    /// [`stored_customer_token`]); hashed ones and empty ones stay.
    HashCustomerTokens,
}

/// In version order; a new migration is a new file and a new entry, never an edit of an applied one.
const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../migrations/0001_init.sql"), data: None },
    Migration { version: 2, name: "cluster", sql: include_str!("../migrations/0002_cluster.sql"), data: None },
    Migration { version: 3, name: "license", sql: include_str!("../migrations/0003_license.sql"), data: None },
    Migration { version: 4, name: "hashed_tokens", sql: "", data: Some(DataStep::HashCustomerTokens) },
    Migration {
        version: 5,
        name: "delivery_marks",
        sql: include_str!("../migrations/0005_delivery_marks.sql"),
        data: None,
    },
    Migration {
        version: 6,
        name: "customer_away",
        sql: include_str!("../migrations/0006_customer_away.sql"),
        data: None,
    },
];

/// The schema version this build migrates to.
pub const LATEST_MIGRATION: i64 = 6;

const SELECT_PLAIN_TOKENS: &str = "SELECT id, customer_token FROM conversations \
     WHERE customer_token <> '' AND customer_token NOT LIKE 'sha256:%'";

const SET_TOKEN: &str = "UPDATE conversations SET customer_token = $1 WHERE id = $2";

/// Applies one migration on the connection of a transaction that holds the database's write lock (or the
/// migrators' advisory lock): claims its version, then runs its SQL and its data step. `false` when the
/// version was claimed before (applied already, or by another migrator meanwhile): roll the transaction back.
async fn apply<DB>(migration: &Migration, connection: &mut DB::Connection, now_ms: i64) -> Result<bool, StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'r> (String, String): sqlx::FromRow<'r, DB::Row>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'static str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let claimed: Option<(i64,)> = sqlx::query_as(CLAIM_VERSION)
        .bind(migration.version)
        .bind(migration.name)
        .bind(now_ms)
        .fetch_optional(&mut *connection)
        .await
        .map_err(db)?;
    if claimed.is_none() {
        return Ok(false);
    }
    if !migration.sql.is_empty() {
        sqlx::raw_sql(migration.sql).execute(&mut *connection).await.map_err(db)?;
    }
    if let Some(step) = migration.data {
        run_data_step::<DB>(step, connection).await?;
    }
    Ok(true)
}

/// Runs a migration's data step on the connection of its transaction, on either database.
async fn run_data_step<DB>(step: DataStep, connection: &mut DB::Connection) -> Result<(), StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'r> (String, String): sqlx::FromRow<'r, DB::Row>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    match step {
        DataStep::HashCustomerTokens => {
            let rows: Vec<(String, String)> =
                sqlx::query_as(SELECT_PLAIN_TOKENS).fetch_all(&mut *connection).await.map_err(db)?;
            for (id, token) in rows {
                let hashed = stored_customer_token(&token);
                sqlx::query(SET_TOKEN).bind(hashed).bind(id).execute(&mut *connection).await.map_err(db)?;
            }
        }
    }
    Ok(())
}

const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)";

// Inserting first makes the migration's first statement a write: the transaction takes the write lock at
// once, and a concurrent migrator waits for it and then finds the version taken.
const CLAIM_VERSION: &str = "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3) \
     ON CONFLICT (version) DO NOTHING RETURNING version";

const SELECT_VERSIONS: &str = "SELECT version FROM schema_migrations ORDER BY version";

/// The key of the PostgreSQL advisory lock that serializes migrators ("sbmigrat").
const PG_MIGRATION_LOCK: i64 = 0x7362_6d69_6772_6174;
const PG_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

fn warn_if_newer(versions: &[i64]) {
    if let Some(newest) = versions.last().filter(|&&newest| newest > LATEST_MIGRATION) {
        tracing::warn!(newest, known = LATEST_MIGRATION, "the database was migrated by a newer version");
    }
}

impl SqlStore {
    /// Applies the migrations not applied yet. Returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        migrate_sqlite(&self.writer, self.clock.as_ref()).await
    }

    /// The versions recorded in `schema_migrations`, oldest first.
    pub async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        applied_sqlite(&self.writer).await
    }
}

/// [`SqlStore::migrate`] on the writer connection, before the store is built.
pub(crate) async fn migrate_sqlite(writer: &SqlitePool, clock: &dyn Clock) -> Result<usize, StoreError> {
    sqlx::query(CREATE_SCHEMA_MIGRATIONS).execute(writer).await.map_err(db)?;
    let mut applied = 0;
    for migration in MIGRATIONS {
        // `IMMEDIATE`: the write lock from the start, so two migrators take turns.
        let mut transaction = writer.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        if !apply::<sqlx::Sqlite>(migration, &mut transaction, db_now_ms(clock)).await? {
            transaction.rollback().await.map_err(db)?;
            continue;
        }
        transaction.commit().await.map_err(db)?;
        tracing::info!(version = migration.version, name = migration.name, "applied migration");
        applied += 1;
    }
    warn_if_newer(&applied_sqlite(writer).await?);
    Ok(applied)
}

async fn applied_sqlite(writer: &SqlitePool) -> Result<Vec<i64>, StoreError> {
    let rows: Vec<(i64,)> = sqlx::query_as(SELECT_VERSIONS).fetch_all(writer).await.map_err(db)?;
    Ok(rows.into_iter().map(|(version,)| version).collect())
}

impl PgStore {
    /// Applies the migrations not applied yet. Returns how many were applied. Safe to run from several
    /// store processes at once.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let mut transaction = self.pool.begin().await.map_err(db)?;
        pg_lock(&mut transaction).await?;
        sqlx::query(CREATE_SCHEMA_MIGRATIONS).execute(&mut *transaction).await.map_err(db)?;
        transaction.commit().await.map_err(db)?;

        let mut applied = 0;
        for migration in MIGRATIONS {
            let mut transaction = self.pool.begin().await.map_err(db)?;
            pg_lock(&mut transaction).await?;
            let now_ms = self.now_ms(&mut transaction).await?;
            if !apply::<sqlx::Postgres>(migration, &mut transaction, now_ms).await? {
                transaction.rollback().await.map_err(db)?;
                continue;
            }
            transaction.commit().await.map_err(db)?;
            tracing::info!(version = migration.version, name = migration.name, "applied migration");
            applied += 1;
        }
        warn_if_newer(&self.applied_migrations().await?);
        Ok(applied)
    }

    /// The versions recorded in `schema_migrations`, oldest first.
    pub async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let rows: Vec<(i64,)> = sqlx::query_as(SELECT_VERSIONS).fetch_all(&self.pool).await.map_err(db)?;
        Ok(rows.into_iter().map(|(version,)| version).collect())
    }
}

async fn pg_lock(connection: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query(PG_LOCK).bind(PG_MIGRATION_LOCK).execute(connection).await.map_err(db)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_in_strictly_increasing_version_order() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|migration| migration.version).collect();
        assert!(versions.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(versions.last(), Some(&LATEST_MIGRATION));
    }
}
