//! The cluster-wide license limit: what an append batch does with permits, and the license's reads and
//! writes on SQLite (PostgreSQL: `pg::license`).
//!
//! A **session** is a conversation that is not finished. Each holds one **permit**, a row of
//! `license_permits` keyed by the conversation, and `license.used` counts them. The rules:
//!
//! - A permit is taken by the append that creates the conversation, in the same transaction, and only while
//!   `used < max_sessions` (`max_sessions` 0 means unlimited: permits are still taken and counted). A
//!   refused create is answered [`StoreError::LicenseExhausted`] and stores nothing; the other appends of
//!   its batch go on. A create of a conversation that exists already (a retry) takes no permit.
//! - A permit is given back by the append whose update sets the state `closed` or `cancelled`, in the same
//!   transaction, if the conversation holds one (closing twice gives back one permit: the row is gone).
//! - A batch that may take or give back a permit locks the license row first (`FOR UPDATE` on PostgreSQL,
//!   right after its fences and before its conversations; SQLite has a single writer), decides its appends
//!   in order against the count it read, and writes the count back at the end with a compare-and-set on the
//!   value it read. Admissions from any number of store processes are therefore serialized on that row:
//!   the limit holds exactly, and only the database holds it, so a crash cannot leak or double a permit.

use std::collections::HashSet;

use switchboard_domain::ConversationState;
use switchboard_proto::internal::v1::{AppendRequest, GetLicenseRequest, License, SetLicenseLimitRequest};
use switchboard_proto::store::StoreError;

use crate::SqlStore;
use crate::error::{db, to_i64, to_u64};

/// The license row, locked on PostgreSQL by appending `FOR UPDATE`.
pub(crate) const SELECT_LICENSE: &str = "SELECT max_sessions, used FROM license WHERE id = 1";

/// The count of permits written back by a batch: a compare-and-set on the value it read.
pub(crate) const SET_LICENSE_USED: &str = "UPDATE license SET used = $1 WHERE id = 1 AND used = $2";

pub(crate) const SET_LICENSE_LIMIT: &str =
    "UPDATE license SET max_sessions = $1 WHERE id = 1 RETURNING max_sessions, used";

/// Whether a state is a finished one (`closed`, `cancelled`): a conversation in it holds no permit.
pub(crate) fn is_finished(state: &str) -> bool {
    ConversationState::parse(state).is_some_and(|state| state.is_finished())
}

/// Whether an append's update finishes its conversation (and so gives its permit back).
pub(crate) fn finishes(request: &AppendRequest) -> bool {
    request.update.as_ref().is_some_and(|update| is_finished(&update.state))
}

/// Whether an append may take a permit (it creates a conversation not finished from the start).
pub(crate) fn may_admit(request: &AppendRequest) -> bool {
    request.create.as_ref().is_some_and(|create| !is_finished(&create.state))
}

/// The license as the API answers it.
pub(crate) fn license_of(max_sessions: i64, used: i64) -> Result<License, StoreError> {
    Ok(License { max_sessions: to_u64(max_sessions, "max_sessions")?, used: to_u64(used, "used")? })
}

/// The limit of a `SetLicenseLimit`, as a column value.
pub(crate) fn validate_limit(request: &SetLicenseLimitRequest) -> Result<i64, StoreError> {
    to_i64(request.max_sessions, "max_sessions")
}

pub(crate) fn missing_license() -> StoreError {
    StoreError::Invalid("the license row is missing: the database was not migrated by this store".into())
}

/// A new row of `license_permits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PermitRow {
    pub conversation_id: String,
    pub tenant_id: String,
    pub acquired_at_ms: i64,
}

/// The license as one append batch sees and changes it, under the row's lock.
#[derive(Debug)]
pub(crate) struct BatchLicense {
    max_sessions: i64,
    /// `used` as read when the batch locked the row.
    used_before: i64,
    used: i64,
    /// The conversations of the batch that hold a permit now (read, or admitted by the batch).
    held: HashSet<String>,
    /// Permits the batch took, in order (written at the end).
    acquired: Vec<PermitRow>,
    /// Permits the batch gave back that were stored before it (deleted at the end).
    released: Vec<String>,
}

impl BatchLicense {
    /// The license row as read (`None`: missing) and the batch's conversations that hold a permit.
    pub(crate) fn new(row: Option<(i64, i64)>, held: HashSet<String>) -> Result<Self, StoreError> {
        let (max_sessions, used) = row.ok_or_else(missing_license)?;
        Ok(BatchLicense { max_sessions, used_before: used, used, held, acquired: Vec::new(), released: Vec::new() })
    }

    /// Takes a permit for a new conversation, or refuses it when every permit is taken.
    pub(crate) fn admit(&mut self, conversation_id: &str, tenant_id: &str, at_ms: i64) -> Result<(), StoreError> {
        if self.held.contains(conversation_id) {
            return Ok(());
        }
        if self.max_sessions > 0 && self.used >= self.max_sessions {
            return Err(StoreError::LicenseExhausted { max_sessions: to_u64(self.max_sessions, "max_sessions")? });
        }
        self.used += 1;
        self.held.insert(conversation_id.to_owned());
        self.acquired.push(PermitRow {
            conversation_id: conversation_id.to_owned(),
            tenant_id: tenant_id.to_owned(),
            acquired_at_ms: at_ms,
        });
        Ok(())
    }

    /// Gives back the permit [`BatchLicense::admit`] took for a conversation the batch did not create after
    /// all (another writer had created it).
    pub(crate) fn undo_admit(&mut self, conversation_id: &str) {
        let before = self.acquired.len();
        self.acquired.retain(|permit| permit.conversation_id != conversation_id);
        if self.acquired.len() < before {
            self.used -= 1;
            self.held.remove(conversation_id);
        }
    }

    /// Records that a conversation the batch did not read at its start holds a permit (stored earlier).
    pub(crate) fn note_held(&mut self, conversation_id: &str) {
        self.held.insert(conversation_id.to_owned());
    }

    /// Gives back the conversation's permit, if it holds one.
    pub(crate) fn release(&mut self, conversation_id: &str) {
        if !self.held.remove(conversation_id) {
            return;
        }
        self.used -= 1;
        let before = self.acquired.len();
        self.acquired.retain(|permit| permit.conversation_id != conversation_id);
        if self.acquired.len() == before {
            self.released.push(conversation_id.to_owned());
        }
    }

    /// What the batch must write: the permits to insert, those to delete, and `used` (new, as read), or
    /// `None` when the batch changed nothing.
    pub(crate) fn into_changes(self) -> Option<LicenseChanges> {
        let changed = !self.acquired.is_empty() || !self.released.is_empty();
        changed.then_some(LicenseChanges {
            acquired: self.acquired,
            released: self.released,
            used: self.used,
            used_before: self.used_before,
        })
    }
}

/// The writes of a batch to the license tables.
#[derive(Debug, Clone)]
pub(crate) struct LicenseChanges {
    pub acquired: Vec<PermitRow>,
    pub released: Vec<String>,
    pub used: i64,
    pub used_before: i64,
}

pub(crate) async fn get(store: &SqlStore, _request: GetLicenseRequest) -> Result<License, StoreError> {
    let row: Option<(i64, i64)> = sqlx::query_as(SELECT_LICENSE).fetch_optional(&store.reader).await.map_err(db)?;
    let (max_sessions, used) = row.ok_or_else(missing_license)?;
    license_of(max_sessions, used)
}

pub(crate) async fn set_limit(store: &SqlStore, request: SetLicenseLimitRequest) -> Result<License, StoreError> {
    let max_sessions = validate_limit(&request)?;
    // On the writer, so that it is ordered with the append batches.
    let row: Option<(i64, i64)> =
        sqlx::query_as(SET_LICENSE_LIMIT).bind(max_sessions).fetch_optional(&store.writer).await.map_err(db)?;
    let (max_sessions, used) = row.ok_or_else(missing_license)?;
    license_of(max_sessions, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn license(max_sessions: i64, used: i64, held: &[&str]) -> BatchLicense {
        let held = held.iter().map(|&id| id.to_owned()).collect();
        BatchLicense::new(Some((max_sessions, used)), held).unwrap()
    }

    #[test]
    fn admits_up_to_the_limit_then_refuses() {
        let mut batch = license(2, 1, &["old"]);
        assert_eq!(batch.admit("c1", "acme", 5), Ok(()));
        assert_eq!(batch.admit("c2", "acme", 5), Err(StoreError::LicenseExhausted { max_sessions: 2 }));
        // A release in the batch makes room for the next admission.
        batch.release("old");
        assert_eq!(batch.admit("c2", "acme", 6), Ok(()));
        let changes = batch.into_changes().unwrap();
        assert_eq!(changes.acquired.iter().map(|p| p.conversation_id.as_str()).collect::<Vec<_>>(), ["c1", "c2"]);
        assert_eq!((changes.released, changes.used, changes.used_before), (vec!["old".to_owned()], 2, 1));
    }

    #[test]
    fn zero_is_unlimited() {
        let mut batch = license(0, 1_000, &[]);
        assert_eq!(batch.admit("c1", "acme", 5), Ok(()));
        assert_eq!(batch.into_changes().unwrap().used, 1_001);
    }

    #[test]
    fn a_permit_is_taken_and_given_back_once() {
        let mut batch = license(1, 0, &[]);
        batch.admit("c1", "acme", 5).unwrap();
        batch.admit("c1", "acme", 5).unwrap();
        batch.release("c1");
        batch.release("c1");
        // Taken and given back in the same batch: nothing to write.
        assert!(batch.into_changes().is_none());

        let mut batch = license(1, 0, &[]);
        batch.admit("c1", "acme", 5).unwrap();
        batch.undo_admit("c1");
        batch.undo_admit("c1");
        assert!(batch.into_changes().is_none());
    }

    #[test]
    fn a_missing_row_or_an_out_of_range_limit_is_invalid() {
        assert!(matches!(BatchLicense::new(None, HashSet::new()), Err(StoreError::Invalid(_))));
        let request = SetLicenseLimitRequest { max_sessions: u64::MAX };
        assert!(matches!(validate_limit(&request), Err(StoreError::Invalid(_))));
        assert!(matches!(license_of(-1, 0), Err(StoreError::Invalid(_))));
    }

    #[test]
    fn finished_states_are_closed_and_cancelled() {
        assert!(is_finished("closed") && is_finished("cancelled"));
        assert!(!is_finished("queued") && !is_finished("active") && !is_finished(""));
    }
}
