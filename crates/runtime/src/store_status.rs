//! The one mapping from event-store errors to gRPC statuses, for every service that reads or
//! writes the event store (write-svc, and read-svc's temporal queries).

use esq_eventstore::StoreError;
use tonic::Status;

/// Maps a store error onto a status: conflicts are FAILED_PRECONDITION with expected and actual
/// versions, as is a stream holding an event its fold cannot read (naming stream and version), outages UNAVAILABLE; an append of unknown outcome is UNAVAILABLE too (retrying it
/// with the same event ids is safe), but says that it may have committed; internal causes are
/// logged here and reach the client as a generic message.
pub fn status_from_store(e: StoreError) -> Status {
    match e {
        StoreError::WrongExpectedVersion { .. } => {
            crate::metrics::write().conflict();
            Status::failed_precondition(e.to_string())
        }
        StoreError::EventIdReused { .. } | StoreError::Unprojectable(_) => {
            Status::failed_precondition(e.to_string())
        }
        StoreError::Unavailable(cause) => {
            tracing::warn!(%cause, "event store unavailable");
            Status::unavailable("event store unavailable; retry later")
        }
        StoreError::OutcomeUnknown(cause) => {
            tracing::warn!(%cause, "append outcome unknown");
            Status::unavailable(
                "append outcome unknown: it may have committed; retrying with the same event \
                 ids (or the same command_id) is safe",
            )
        }
        StoreError::Internal(cause) => {
            tracing::error!(%cause, "event store internal error");
            Status::internal("internal error")
        }
    }
}
