//! Mapping of database errors and out-of-range values to [`StoreError`].

use sqlx::error::ErrorKind;
use switchboard_proto::store::StoreError;

/// A database error as a store error: a violated constraint is a caller bug (`Invalid`), and so is a value
/// PostgreSQL refuses (SQLSTATE class 22, "data exception", e.g. a NUL character in a text); a row that
/// does not decode is corrupt data (`Invalid`: retrying cannot help); everything else (I/O, busy, pool
/// timeouts, closed pool, a server shutting down, a deadlock or serialization failure) is `Unavailable`.
pub(crate) fn db(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(database) if database.kind() != ErrorKind::Other => {
            StoreError::Invalid(format!("constraint violated: {database}"))
        }
        sqlx::Error::Database(database) if is_data_exception(database.as_ref()) => {
            StoreError::Invalid(format!("value refused by the database: {database}"))
        }
        sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::InvalidArgument(_) => StoreError::Invalid(format!("malformed row or argument: {error}")),
        _ => {
            tracing::warn!(%error, "database error");
            StoreError::Unavailable(error.to_string())
        }
    }
}

/// PostgreSQL's SQLSTATE class 22: the statement was fine, a value in it was not.
fn is_data_exception(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some_and(|pg| pg.code().starts_with("22"))
}

/// Whether a failed statement is due to the data of the request it ran for (so that the other appends of a
/// batch may go through without it), rather than to the connection or the database as a whole.
pub(crate) fn blames_the_request(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database) => database.kind() != ErrorKind::Other || is_data_exception(database.as_ref()),
        sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::InvalidArgument(_) => true,
        _ => false,
    }
}

/// A protobuf unsigned value as a BIGINT column value.
pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Invalid(format!("{what} out of range: {value}")))
}

/// A BIGINT column value as a protobuf unsigned value.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Invalid(format!("stored {what} out of range: {value}")))
}

/// A shard number as an INTEGER column value.
pub(crate) fn shard_to_i32(shard: u32) -> Result<i32, StoreError> {
    if shard >= switchboard_domain::N_SHARDS {
        return Err(StoreError::Invalid(format!("no such shard: {shard}")));
    }
    i32::try_from(shard).map_err(|_| StoreError::Invalid(format!("no such shard: {shard}")))
}

/// An INTEGER column value as a shard number.
pub(crate) fn shard_from_i32(shard: i32) -> Result<u32, StoreError> {
    u32::try_from(shard).map_err(|_| StoreError::Invalid(format!("stored shard out of range: {shard}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_out_of_range_are_invalid_not_truncated() {
        assert!(matches!(to_i64(u64::MAX, "epoch"), Err(StoreError::Invalid(_))));
        assert!(matches!(to_u64(-1, "seq"), Err(StoreError::Invalid(_))));
        assert!(matches!(shard_to_i32(switchboard_domain::N_SHARDS), Err(StoreError::Invalid(_))));
        assert_eq!(shard_to_i32(1023), Ok(1023));
        assert_eq!(shard_from_i32(7), Ok(7));
    }

    #[test]
    fn pool_timeouts_are_unavailable() {
        assert!(matches!(db(sqlx::Error::PoolTimedOut), StoreError::Unavailable(_)));
        assert!(matches!(db(sqlx::Error::RowNotFound), StoreError::Invalid(_)));
    }
}
