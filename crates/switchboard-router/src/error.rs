//! Store failures as router errors.

use switchboard_proto::router::RouterError;
use switchboard_proto::store::StoreError;

pub(crate) fn from_store(error: StoreError) -> RouterError {
    match error {
        // The shard moved: the gateway refreshes placement and retries on the new owner.
        StoreError::StaleEpoch { .. } => RouterError::NotOwner,
        StoreError::NotFound(_) => RouterError::NotFound,
        StoreError::Unavailable(detail) => RouterError::Unavailable(detail),
        StoreError::Invalid(detail) => RouterError::Internal(detail),
        // The chat was not admitted: nothing of it is stored.
        StoreError::LicenseExhausted { max_sessions } => {
            RouterError::Refused(switchboard_domain::Refusal::LicenseExhausted { max_sessions })
        }
    }
}
