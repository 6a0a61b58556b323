//! The schema migrations and their runner.
//!
//! Migrations are SQL files under `migrations/`, embedded in the binary and applied in version order.
//! Each runs in a transaction of its own that first claims its version in `schema_migrations`: a version
//! already there is skipped, so running the migrations again (or from two processes at once) is harmless.

use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::db;

struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// In version order; a new migration is a new file and a new entry, never an edit of an applied one.
const MIGRATIONS: &[Migration] =
    &[Migration { version: 1, name: "init", sql: include_str!("../migrations/0001_init.sql") }];

/// The schema version this build migrates to.
pub const LATEST_MIGRATION: i64 = 1;

const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)";

// Inserting first makes the migration's first statement a write: the transaction takes the write lock at
// once, and a concurrent migrator waits for it and then finds the version taken.
const CLAIM_VERSION: &str = "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3) \
     ON CONFLICT (version) DO NOTHING";

const SELECT_VERSIONS: &str = "SELECT version FROM schema_migrations ORDER BY version";

impl SqlStore {
    /// Applies the migrations not applied yet. Returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        sqlx::query(CREATE_SCHEMA_MIGRATIONS).execute(&self.writer).await.map_err(db)?;
        let mut applied = 0;
        for migration in MIGRATIONS {
            let mut transaction = self.writer.begin().await.map_err(db)?;
            let claimed = sqlx::query(CLAIM_VERSION)
                .bind(migration.version)
                .bind(migration.name)
                .bind(self.now_ms())
                .execute(&mut *transaction)
                .await
                .map_err(db)?
                .rows_affected();
            if claimed == 0 {
                transaction.rollback().await.map_err(db)?;
                continue;
            }
            sqlx::raw_sql(migration.sql).execute(&mut *transaction).await.map_err(db)?;
            transaction.commit().await.map_err(db)?;
            tracing::info!(version = migration.version, name = migration.name, "applied migration");
            applied += 1;
        }
        let versions = self.applied_migrations().await?;
        if let Some(newest) = versions.last().filter(|&&newest| newest > LATEST_MIGRATION) {
            tracing::warn!(newest, known = LATEST_MIGRATION, "the database was migrated by a newer version");
        }
        Ok(applied)
    }

    /// The versions recorded in `schema_migrations`, oldest first.
    pub async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let rows: Vec<(i64,)> = sqlx::query_as(SELECT_VERSIONS).fetch_all(&self.writer).await.map_err(db)?;
        Ok(rows.into_iter().map(|(version,)| version).collect())
    }
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
