//! The license limit on PostgreSQL: reading it and setting it (the permits are taken and given back by the
//! append batches: see `license` and `pg::events`).

use switchboard_proto::internal::v1::{GetLicenseRequest, License, SetLicenseLimitRequest};
use switchboard_proto::store::StoreError;

use super::PgStore;
use crate::error::db;
use crate::license::{SELECT_LICENSE, SET_LICENSE_LIMIT, license_of, missing_license, validate_limit};

pub(super) async fn get(store: &PgStore, _request: GetLicenseRequest) -> Result<License, StoreError> {
    let row: Option<(i64, i64)> = sqlx::query_as(SELECT_LICENSE).fetch_optional(&store.pool).await.map_err(db)?;
    let (max_sessions, used) = row.ok_or_else(missing_license)?;
    license_of(max_sessions, used)
}

/// Waits for the append batch holding the license row, if any, so the answer is the license after it.
pub(super) async fn set_limit(store: &PgStore, request: SetLicenseLimitRequest) -> Result<License, StoreError> {
    let max_sessions = validate_limit(&request)?;
    let row: Option<(i64, i64)> =
        sqlx::query_as(SET_LICENSE_LIMIT).bind(max_sessions).fetch_optional(&store.pool).await.map_err(db)?;
    let (max_sessions, used) = row.ok_or_else(missing_license)?;
    license_of(max_sessions, used)
}
