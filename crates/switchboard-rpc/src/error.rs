//! `StoreError` and `RouterError` on the wire, both ways.
//!
//! A server turns an error into a `tonic::Status` with a standard gRPC code (for generic tooling) and a
//! stable Switchboard code in the [`ERROR_CODE`] metadata entry (for callers): the client reads the
//! metadata back, so that every variant a caller branches on survives the trip unchanged. A refusal
//! travels as JSON in [`REFUSAL`], the shard of a stale epoch in [`SHARD`], the limit of an exhausted
//! license in [`MAX_SESSIONS`], and the text of `NotFound`, `Invalid`, `Unavailable` and `Internal` as the
//! status message.
//!
//! A status without a Switchboard code did not come from our server code: it is a transport failure
//! (connection refused or reset, HTTP/2 error), a deadline, or a message the server could not decode.
//! Those become the *retryable* `Unavailable`, except the few codes that say that retrying the same request
//! cannot help (`INVALID_ARGUMENT`, `UNIMPLEMENTED`, ...), which become `Invalid` (store) or `Internal`
//! (router).

use switchboard_domain::Refusal;
use switchboard_proto::router::RouterError;
use switchboard_proto::store::StoreError;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// The metadata entry with the stable error code (one of [`codes`]).
pub const ERROR_CODE: &str = "x-switchboard-error";
/// The metadata entry with the refusal of a `refused` error, as the JSON of `switchboard_domain::Refusal`.
pub const REFUSAL: &str = "x-switchboard-refusal";
/// The metadata entry with the shard of a `stale_epoch` error, in decimal.
pub const SHARD: &str = "x-switchboard-shard";
/// The metadata entry with the license limit of a `license_exhausted` error, in decimal.
pub const MAX_SESSIONS: &str = "x-switchboard-max-sessions";

/// The values of [`ERROR_CODE`]. Never change one; add new ones.
pub mod codes {
    pub const NOT_OWNER: &str = "not_owner";
    pub const REFUSED: &str = "refused";
    pub const NOT_FOUND: &str = "not_found";
    pub const UNKNOWN_AGENT: &str = "unknown_agent";
    pub const UNKNOWN_GROUP: &str = "unknown_group";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const INTERNAL: &str = "internal";
    /// The store refused a write whose epoch is not the shard's current one.
    pub const STALE_EPOCH: &str = "stale_epoch";
    /// The store refused a malformed request.
    pub const INVALID: &str = "invalid";
    /// The store refused to create a conversation: every license permit is taken.
    pub const LICENSE_EXHAUSTED: &str = "license_exhausted";
}

fn with_code(mut status: Status, code: &'static str) -> Status {
    status.metadata_mut().insert(ERROR_CODE, MetadataValue::from_static(code));
    status
}

fn code_of(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(ERROR_CODE).and_then(|value| value.to_str().ok())
}

/// The gRPC codes that say the same request cannot succeed later: not a transport problem.
fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented | Code::PermissionDenied | Code::Unauthenticated
    )
}

/// How a status that carries no Switchboard code is described in the error it becomes.
fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The status a store server answers for `error`.
pub fn status_from_store_error(error: &StoreError) -> Status {
    match error {
        StoreError::StaleEpoch { shard } => {
            let mut status = with_code(Status::failed_precondition(error.to_string()), codes::STALE_EPOCH);
            status.metadata_mut().insert(SHARD, MetadataValue::from(*shard));
            status
        }
        StoreError::NotFound(text) => with_code(Status::not_found(text.clone()), codes::NOT_FOUND),
        StoreError::Invalid(text) => with_code(Status::invalid_argument(text.clone()), codes::INVALID),
        StoreError::Unavailable(text) => with_code(Status::unavailable(text.clone()), codes::UNAVAILABLE),
        StoreError::LicenseExhausted { max_sessions } => {
            let mut status = with_code(Status::resource_exhausted(error.to_string()), codes::LICENSE_EXHAUSTED);
            status.metadata_mut().insert(MAX_SESSIONS, MetadataValue::from(*max_sessions));
            status
        }
    }
}

/// The error a store client reports for `status`.
pub fn store_error_from_status(status: &Status) -> StoreError {
    let message = || status.message().to_owned();
    match code_of(status.metadata()) {
        Some(codes::STALE_EPOCH) => {
            let shard = status.metadata().get(SHARD).and_then(|value| value.to_str().ok()?.parse().ok());
            match shard {
                Some(shard) => StoreError::StaleEpoch { shard },
                None => StoreError::Invalid(format!("a stale epoch error without its shard: {}", status.message())),
            }
        }
        Some(codes::NOT_FOUND) => StoreError::NotFound(message()),
        Some(codes::INVALID) => StoreError::Invalid(message()),
        Some(codes::UNAVAILABLE) => StoreError::Unavailable(message()),
        Some(codes::LICENSE_EXHAUSTED) => {
            let max_sessions = status.metadata().get(MAX_SESSIONS).and_then(|value| value.to_str().ok()?.parse().ok());
            match max_sessions {
                Some(max_sessions) => StoreError::LicenseExhausted { max_sessions },
                None => StoreError::Invalid(format!("a license error without its limit: {}", status.message())),
            }
        }
        // Not from a store server, or from a newer one with a code this client does not know.
        _ => match status.code() {
            Code::NotFound => StoreError::NotFound(message()),
            code if is_permanent(code) => StoreError::Invalid(describe(status)),
            _ => StoreError::Unavailable(describe(status)),
        },
    }
}

/// The status a router server answers for `error`.
pub fn status_from_router_error(error: &RouterError) -> Status {
    match error {
        RouterError::Refused(refusal) => {
            let mut status = with_code(Status::failed_precondition(refusal.to_string()), codes::REFUSED);
            // The JSON of a refusal is plain ASCII; should that ever change, the client still gets the code.
            if let Ok(value) = serde_json::to_string(refusal).map_err(drop).and_then(|json| json.parse().map_err(drop))
            {
                status.metadata_mut().insert(REFUSAL, value);
            }
            status
        }
        RouterError::NotFound => with_code(Status::not_found(error.to_string()), codes::NOT_FOUND),
        RouterError::UnknownAgent => with_code(Status::not_found(error.to_string()), codes::UNKNOWN_AGENT),
        RouterError::UnknownGroup => with_code(Status::not_found(error.to_string()), codes::UNKNOWN_GROUP),
        RouterError::NotOwner => with_code(Status::failed_precondition(error.to_string()), codes::NOT_OWNER),
        RouterError::Unavailable(text) => with_code(Status::unavailable(text.clone()), codes::UNAVAILABLE),
        RouterError::Internal(text) => with_code(Status::internal(text.clone()), codes::INTERNAL),
    }
}

/// The error a router client reports for `status`.
pub fn router_error_from_status(status: &Status) -> RouterError {
    let message = || status.message().to_owned();
    match code_of(status.metadata()) {
        Some(codes::REFUSED) => {
            let refusal = status.metadata().get(REFUSAL).and_then(|value| value.to_str().ok());
            match refusal.map(serde_json::from_str::<Refusal>) {
                Some(Ok(refusal)) => RouterError::Refused(refusal),
                _ => RouterError::Internal(format!("a refusal that cannot be read: {}", status.message())),
            }
        }
        Some(codes::NOT_OWNER) => RouterError::NotOwner,
        Some(codes::NOT_FOUND) => RouterError::NotFound,
        Some(codes::UNKNOWN_AGENT) => RouterError::UnknownAgent,
        Some(codes::UNKNOWN_GROUP) => RouterError::UnknownGroup,
        Some(codes::UNAVAILABLE) => RouterError::Unavailable(message()),
        Some(codes::INTERNAL) => RouterError::Internal(message()),
        // Not from a router server (a transport failure, a deadline, a message it could not decode), or a
        // code this client does not know.
        _ if is_permanent(status.code()) => RouterError::Internal(describe(status)),
        _ => RouterError::Unavailable(describe(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_refusal() -> Vec<Refusal> {
        vec![
            Refusal::ChatTaken,
            Refusal::NotAccepted,
            Refusal::NotParticipant,
            Refusal::ChatClosed,
            Refusal::AgentNotOnline,
            Refusal::AtCapacity { capacity: 3 },
            Refusal::NotInGroup,
            Refusal::EmptyMessage,
            Refusal::BadDeliveryMark { last_seq: 17 },
            Refusal::BadAfterSeq { last_seq: 17 },
            Refusal::NotOffered,
            Refusal::OfferOutstanding,
            Refusal::SameGroup,
            Refusal::SameAgent,
            Refusal::GroupClosed,
            Refusal::GroupOffline,
            Refusal::AgentUnavailable,
            Refusal::LicenseExhausted { max_sessions: 250 },
            Refusal::StartKeyReused,
            Refusal::IdempotencyKeyReused,
        ]
    }

    /// A status as the client sees it: through the HTTP/2 headers, not the in-memory value.
    fn over_the_wire(status: Status) -> Status {
        let headers = status.into_http::<()>().into_parts().0.headers;
        Status::from_header_map(&headers).expect("a status in the headers")
    }

    #[test]
    fn every_store_error_survives_the_round_trip() {
        let errors = [
            StoreError::StaleEpoch { shard: 0 },
            StoreError::StaleEpoch { shard: 1023 },
            StoreError::NotFound("c-1".into()),
            StoreError::Invalid("no fence: ünïcode and \"quotes\"".into()),
            StoreError::Unavailable("database is locked".into()),
            StoreError::Unavailable(String::new()),
            StoreError::LicenseExhausted { max_sessions: 0 },
            StoreError::LicenseExhausted { max_sessions: 50 },
            StoreError::LicenseExhausted { max_sessions: u64::MAX },
        ];
        for error in errors {
            let status = over_the_wire(status_from_store_error(&error));
            assert_eq!(store_error_from_status(&status), error, "{status:?}");
        }
    }

    #[test]
    fn store_errors_carry_the_standard_grpc_codes() {
        let code = |error: StoreError| status_from_store_error(&error).code();
        assert_eq!(code(StoreError::StaleEpoch { shard: 5 }), Code::FailedPrecondition);
        assert_eq!(code(StoreError::NotFound("x".into())), Code::NotFound);
        assert_eq!(code(StoreError::Invalid("x".into())), Code::InvalidArgument);
        assert_eq!(code(StoreError::Unavailable("x".into())), Code::Unavailable);
        assert_eq!(code(StoreError::LicenseExhausted { max_sessions: 5 }), Code::ResourceExhausted);
        let status = status_from_store_error(&StoreError::StaleEpoch { shard: 5 });
        assert_eq!(status.metadata().get(ERROR_CODE).unwrap(), "stale_epoch");
        assert_eq!(status.metadata().get(SHARD).unwrap(), "5");
        let status = status_from_store_error(&StoreError::LicenseExhausted { max_sessions: 50 });
        assert_eq!(status.metadata().get(ERROR_CODE).unwrap(), "license_exhausted");
        assert_eq!(status.metadata().get(MAX_SESSIONS).unwrap(), "50");
    }

    #[test]
    fn the_stable_code_of_a_store_error_is_its_own() {
        let errors = [
            StoreError::StaleEpoch { shard: 1 },
            StoreError::NotFound("x".into()),
            StoreError::Invalid("x".into()),
            StoreError::Unavailable("x".into()),
            StoreError::LicenseExhausted { max_sessions: 1 },
        ];
        for error in errors {
            let status = status_from_store_error(&error);
            assert_eq!(status.metadata().get(ERROR_CODE).unwrap().to_str().unwrap(), error.code(), "{error:?}");
        }
    }

    #[test]
    fn every_router_error_survives_the_round_trip() {
        let mut errors: Vec<RouterError> = every_refusal().into_iter().map(RouterError::Refused).collect();
        errors.extend([
            RouterError::NotFound,
            RouterError::UnknownAgent,
            RouterError::UnknownGroup,
            RouterError::NotOwner,
            RouterError::Unavailable("store unavailable: timeout".into()),
            RouterError::Internal("actor did not start\nsecond line".into()),
        ]);
        for error in errors {
            let status = over_the_wire(status_from_router_error(&error));
            assert_eq!(router_error_from_status(&status), error, "{status:?}");
        }
    }

    #[test]
    fn router_errors_carry_the_standard_grpc_codes_and_stable_codes() {
        let cases = [
            (RouterError::Refused(Refusal::ChatTaken), Code::FailedPrecondition, "refused"),
            (RouterError::NotFound, Code::NotFound, "not_found"),
            (RouterError::UnknownAgent, Code::NotFound, "unknown_agent"),
            (RouterError::UnknownGroup, Code::NotFound, "unknown_group"),
            (RouterError::NotOwner, Code::FailedPrecondition, "not_owner"),
            (RouterError::Unavailable("x".into()), Code::Unavailable, "unavailable"),
            (RouterError::Internal("x".into()), Code::Internal, "internal"),
        ];
        for (error, code, stable) in cases {
            let status = status_from_router_error(&error);
            assert_eq!((status.code(), status.metadata().get(ERROR_CODE).unwrap().to_str().unwrap()), (code, stable));
        }
        let refused = status_from_router_error(&RouterError::Refused(Refusal::AtCapacity { capacity: 2 }));
        assert_eq!(refused.metadata().get(REFUSAL).unwrap(), r#"{"AtCapacity":{"capacity":2}}"#);
    }

    #[test]
    fn a_license_refusal_keeps_its_limit() {
        let error = RouterError::Refused(Refusal::LicenseExhausted { max_sessions: 1_000_000 });
        let status = over_the_wire(status_from_router_error(&error));
        assert_eq!(status.metadata().get(REFUSAL).unwrap(), r#"{"LicenseExhausted":{"max_sessions":1000000}}"#);
        assert_eq!(router_error_from_status(&status), error);
    }

    #[test]
    fn a_failure_outside_the_server_code_is_retryable() {
        // What tonic produces for a refused connection, a client-side timeout, a reset stream, a deadline.
        let transport = [
            Status::unavailable("tcp connect error: Connection refused (os error 111)"),
            Status::cancelled("Timeout expired"),
            Status::deadline_exceeded("deadline has elapsed"),
            Status::unknown("Service was not ready: transport error"),
            Status::internal("h2 protocol error: connection reset"),
            Status::aborted("x"),
            Status::resource_exhausted("x"),
        ];
        for status in transport {
            assert!(matches!(store_error_from_status(&status), StoreError::Unavailable(_)), "{status:?}");
            let error = router_error_from_status(&status);
            assert!(error.is_retryable(), "{status:?} became {error:?}");
        }
    }

    #[test]
    fn a_request_that_cannot_succeed_is_not_retryable() {
        for status in [Status::invalid_argument("bad id"), Status::unimplemented("no such method")] {
            assert!(matches!(store_error_from_status(&status), StoreError::Invalid(_)), "{status:?}");
            assert!(matches!(router_error_from_status(&status), RouterError::Internal(_)), "{status:?}");
        }
    }

    #[test]
    fn an_unknown_stable_code_falls_back_on_the_grpc_code() {
        let status = with_code(Status::unavailable("later"), "from_a_newer_server");
        assert!(matches!(store_error_from_status(&status), StoreError::Unavailable(_)));
        assert!(matches!(router_error_from_status(&status), RouterError::Unavailable(_)));
    }

    #[test]
    fn a_mangled_refusal_or_shard_is_an_error_not_a_panic() {
        let mut status = with_code(Status::failed_precondition("x"), codes::REFUSED);
        status.metadata_mut().insert(REFUSAL, MetadataValue::from_static("{not json"));
        assert!(matches!(router_error_from_status(&status), RouterError::Internal(_)));
        let status = with_code(Status::failed_precondition("x"), codes::STALE_EPOCH);
        assert!(matches!(store_error_from_status(&status), StoreError::Invalid(_)));
        let mut status = with_code(Status::resource_exhausted("x"), codes::LICENSE_EXHAUSTED);
        assert!(matches!(store_error_from_status(&status), StoreError::Invalid(_)), "no limit");
        status.metadata_mut().insert(MAX_SESSIONS, MetadataValue::from_static("-1"));
        assert!(matches!(store_error_from_status(&status), StoreError::Invalid(_)), "not a limit");
    }
}
