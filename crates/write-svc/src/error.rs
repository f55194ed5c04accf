//! The one mapping from store errors to gRPC statuses for write-svc.

use esq_eventstore::StoreError;
use tonic::Status;

/// Maps a store error onto a status: conflicts are FAILED_PRECONDITION with expected and actual
/// versions, outages UNAVAILABLE; internal causes are logged here and reach the client as a
/// generic message.
pub fn status_from_store(e: StoreError) -> Status {
    match e {
        StoreError::WrongExpectedVersion { .. } | StoreError::EventIdReused { .. } => {
            Status::failed_precondition(e.to_string())
        }
        StoreError::Unavailable(cause) => {
            tracing::warn!(%cause, "event store unavailable");
            Status::unavailable("event store unavailable; retry later")
        }
        StoreError::Internal(cause) => {
            tracing::error!(%cause, "event store internal error");
            Status::internal("internal error")
        }
    }
}
