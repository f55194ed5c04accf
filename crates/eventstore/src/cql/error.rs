//! Driver errors translated into [`StoreError`] at the adapter boundary.
//!
//! The rule: anything that says "the cluster could not answer (in time)" — no reachable node,
//! a broken connection, a client or server timeout, not enough replicas, an overloaded or
//! bootstrapping node — becomes [`StoreError::Unavailable`], which services turn into a fast
//! UNAVAILABLE. Everything else (bad CQL, type mismatches, server bugs) is
//! [`StoreError::Internal`]: retrying would not help.

use crate::StoreError;
use scylla::errors::{
    ConnectionPoolError, DbError, DeserializationError, ExecutionError, IntoRowsResultError,
    MetadataError, NewSessionError, PrepareError, RequestAttemptError, RowsError,
    SchemaAgreementError,
};

/// Cassandra's CAS_WRITE_UNKNOWN error code: a Paxos round whose outcome is unknown.
const CAS_WRITE_UNKNOWN: i32 = 0x1700;

/// Translates the error of one request.
pub(crate) fn execution(err: ExecutionError) -> StoreError {
    match err {
        ExecutionError::ConnectionPoolError(e) => pool(&e),
        ExecutionError::EmptyPlan => unavailable("no node is available to serve the request"),
        ExecutionError::RequestTimeout(d) => {
            unavailable(format!("no answer within {} ms", d.as_millis()))
        }
        ExecutionError::LastAttemptError(e) => attempt(&e),
        ExecutionError::PrepareError(e) => prepare(e),
        ExecutionError::SchemaAgreementError(e) => schema_agreement(e),
        ExecutionError::MetadataError(e) => metadata(e),
        other => StoreError::Internal(other.to_string()),
    }
}

/// Whether a failed write may nevertheless have been applied: the request was (or may have
/// been) sent and no verdict came back — a client timeout, a connection lost in flight, a
/// server-side write timeout, or a Paxos round of unknown outcome. Every other error is a
/// refusal before anything was written (no node, overloaded, not enough replicas, bad
/// request).
pub(crate) fn may_have_applied(err: &ExecutionError) -> bool {
    match err {
        ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(e) => match e {
            RequestAttemptError::BrokenConnectionError(_) => true,
            RequestAttemptError::DbError(db, _) => {
                matches!(
                    db,
                    DbError::WriteTimeout { .. } | DbError::ReadTimeout { .. }
                ) || matches!(db, DbError::Other(code) if *code == CAS_WRITE_UNKNOWN)
            }
            _ => false,
        },
        _ => false,
    }
}

/// Whether a request failed for want of any usable connection (the pool is empty or its
/// connection broke): the hint that the session may need reviving once the cluster is back.
pub(crate) fn no_connection(err: &ExecutionError) -> bool {
    matches!(
        err,
        ExecutionError::ConnectionPoolError(_)
            | ExecutionError::EmptyPlan
            | ExecutionError::LastAttemptError(RequestAttemptError::BrokenConnectionError(_))
    )
}

/// Translates a failure to prepare a statement.
pub(crate) fn prepare(err: PrepareError) -> StoreError {
    match err {
        PrepareError::ConnectionPoolError(e) => pool(&e),
        PrepareError::AllAttemptsFailed { first_attempt } => attempt(&first_attempt),
        other => StoreError::Internal(other.to_string()),
    }
}

/// Translates a failure to open a session.
pub(crate) fn new_session(err: NewSessionError) -> StoreError {
    match err {
        NewSessionError::EmptyKnownNodesList | NewSessionError::IllegalConfig(_) => {
            StoreError::Internal(format!("bad CQL session configuration: {err}"))
        }
        NewSessionError::MetadataError(e) => metadata(e),
        other => unavailable(other.to_string()),
    }
}

/// Translates a failure to reach schema agreement after DDL.
pub(crate) fn schema_agreement(err: SchemaAgreementError) -> StoreError {
    match err {
        SchemaAgreementError::ConnectionPoolError(e) => pool(&e),
        SchemaAgreementError::RequestError(e) => attempt(&e),
        SchemaAgreementError::Timeout(d) => unavailable(format!(
            "the nodes did not agree on the schema within {} ms",
            d.as_millis()
        )),
        SchemaAgreementError::PrepareError(e) => prepare(e),
        other => StoreError::Internal(other.to_string()),
    }
}

fn metadata(err: MetadataError) -> StoreError {
    match err {
        MetadataError::ConnectionPoolError(e) => pool(&e),
        // Fetching the cluster's topology failed: in practice, the node went away mid-way.
        MetadataError::FetchError(e) => unavailable(e.to_string()),
        other => StoreError::Internal(other.to_string()),
    }
}

fn pool(err: &ConnectionPoolError) -> StoreError {
    unavailable(format!("no connection to the cluster: {err}"))
}

fn attempt(err: &RequestAttemptError) -> StoreError {
    match err {
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => unavailable(err.to_string()),
        RequestAttemptError::DbError(db, message) => match db {
            DbError::Unavailable { .. }
            | DbError::Overloaded
            | DbError::IsBootstrapping
            | DbError::ReadTimeout { .. }
            | DbError::WriteTimeout { .. }
            | DbError::RateLimitReached { .. } => unavailable(format!("{db}: {message}")),
            DbError::Other(code) if *code == CAS_WRITE_UNKNOWN => unavailable(format!(
                "outcome of the conditional write is unknown: {message}"
            )),
            _ => StoreError::Internal(format!("{db}: {message}")),
        },
        other => StoreError::Internal(other.to_string()),
    }
}

fn unavailable(text: impl Into<String>) -> StoreError {
    StoreError::Unavailable(text.into())
}

/// A result that was not rows where rows were expected, or rows of an unexpected shape: a
/// schema or code mismatch, never a transient condition.
pub(crate) fn into_rows(err: IntoRowsResultError) -> StoreError {
    StoreError::Internal(format!("unexpected CQL result: {err}"))
}

/// See [`into_rows`].
pub(crate) fn rows(err: RowsError) -> StoreError {
    StoreError::Internal(format!("unexpected CQL row type: {err}"))
}

/// See [`into_rows`].
pub(crate) fn deserialize(err: DeserializationError) -> StoreError {
    StoreError::Internal(format!("undecodable CQL row: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timeouts_and_missing_nodes_are_unavailable() {
        assert!(matches!(
            execution(ExecutionError::RequestTimeout(Duration::from_millis(5))),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            execution(ExecutionError::EmptyPlan),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            execution(ExecutionError::ConnectionPoolError(
                ConnectionPoolError::Initializing
            )),
            StoreError::Unavailable(_)
        ));
        let db = |e: DbError| {
            execution(ExecutionError::LastAttemptError(
                RequestAttemptError::DbError(e, "m".into()),
            ))
        };
        assert!(matches!(
            db(DbError::Overloaded),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            db(DbError::Other(CAS_WRITE_UNKNOWN)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(db(DbError::SyntaxError), StoreError::Internal(_)));
        assert!(matches!(db(DbError::Invalid), StoreError::Internal(_)));
    }

    #[test]
    fn only_unanswered_writes_may_have_applied() {
        let db = |e: DbError| {
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(e, "m".into()))
        };
        assert!(may_have_applied(&ExecutionError::RequestTimeout(
            Duration::from_millis(5)
        )));
        assert!(may_have_applied(&db(DbError::Other(CAS_WRITE_UNKNOWN))));
        assert!(!may_have_applied(&ExecutionError::EmptyPlan));
        assert!(!may_have_applied(&db(DbError::Overloaded)));
        assert!(!may_have_applied(&db(DbError::Invalid)));
        assert!(!may_have_applied(&ExecutionError::ConnectionPoolError(
            ConnectionPoolError::Initializing
        )));
    }
}
