//! Command handling: load an aggregate by folding its stream, let the domain decide, append
//! the resulting events at the version the decision was made on.

use crate::error::status_from_store;
use crate::Nudge;
use esq::convert::status_from_domain;
use esq_domain::aggregate::Aggregate;
use esq_domain::{ExpectedVersion, NewEvent, StreamId};
use esq_eventstore::{EventStore, ReadRequest, StoreError};
use std::sync::Arc;
use tonic::Status;
use uuid::Uuid;

/// Metadata key carrying the client's idempotency key on every event a command produced.
pub const COMMAND_ID_KEY: &str = "command_id";
/// Events read per page while loading an aggregate.
const LOAD_PAGE: u32 = 1000;
/// How often a command without an expected version is re-decided after losing a race.
const MAX_ATTEMPTS: usize = 8;

/// Runs commands of any aggregate against one store.
pub struct Executor<S> {
    store: Arc<S>,
    nudge: Option<Nudge>,
}

impl<S> Clone for Executor<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            nudge: self.nudge.clone(),
        }
    }
}

/// What a command asks of the executor besides the domain command itself.
pub struct CommandOptions<'a> {
    /// If set, the aggregate must be at exactly this version.
    pub expected_version: Option<u64>,
    /// The client's idempotency key ("" for none).
    pub command_id: &'a str,
}

impl<S: EventStore> Executor<S> {
    /// An executor over `store`, calling `nudge` after each append.
    pub fn new(store: Arc<S>, nudge: Option<Nudge>) -> Self {
        Self { store, nudge }
    }

    /// Loads the aggregate, decides, appends; returns the aggregate's version afterwards.
    ///
    /// Without an expected version a lost race re-runs the decision on the new state: the
    /// command is an intention, and the rules are checked against what is really there.
    pub async fn execute<A: Aggregate>(
        &self,
        stream: &StreamId,
        command: &A::Command,
        options: CommandOptions<'_>,
    ) -> Result<u64, Status> {
        for _ in 0..MAX_ATTEMPTS {
            let (state, version, done) = self.load::<A>(stream, options.command_id).await?;
            if let Some(v) = done {
                return Ok(v); // a retry of a command that already took effect
            }
            if let Some(expected) = options.expected_version {
                if expected != version {
                    return Err(Status::failed_precondition(format!(
                        "wrong expected version: expected {expected}, actual {version}"
                    )));
                }
            }
            let mut events = state.decide(command).map_err(status_from_domain)?;
            if events.is_empty() {
                return Ok(version);
            }
            stamp(stream, options.command_id, &mut events);
            let expected = if version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(version)
            };
            match self.store.append(stream, expected, &events).await {
                Ok(result) => {
                    if let Some(nudge) = &self.nudge {
                        nudge(stream, result.last_version);
                    }
                    return Ok(result.last_version);
                }
                Err(StoreError::WrongExpectedVersion { actual, .. })
                    if options.expected_version.is_none() =>
                {
                    tracing::debug!(%stream, version, actual, "lost a race; deciding again");
                }
                Err(e) => return Err(status_from_store(e)),
            }
        }
        Err(Status::aborted(format!(
            "stream {stream} changed concurrently {MAX_ATTEMPTS} times; retry the command"
        )))
    }

    /// Folds the stream; also returns the version at which `command_id` last took effect.
    async fn load<A: Aggregate>(
        &self,
        stream: &StreamId,
        command_id: &str,
    ) -> Result<(A, u64, Option<u64>), Status> {
        let mut state = A::default();
        let mut version = 0;
        let mut done = None;
        loop {
            let page = self
                .store
                .read(stream, ReadRequest::forwards(version + 1, LOAD_PAGE))
                .await
                .map_err(status_from_store)?;
            let full = page.len() == LOAD_PAGE as usize;
            for e in &page {
                // Deciding on a state this server cannot fully read would break the rules.
                if let Some(known) = esq_domain::upcast::current_schema_version(&e.event_type) {
                    if e.schema_version > known {
                        return Err(Status::failed_precondition(format!(
                            "stream {stream} holds {} schema version {} at version {}; this \
                             server understands up to schema version {known}",
                            e.event_type, e.schema_version, e.version
                        )));
                    }
                }
                state.apply(e);
                version = e.version;
                if !command_id.is_empty()
                    && e.metadata.get(COMMAND_ID_KEY).map(String::as_str) == Some(command_id)
                {
                    done = Some(e.version);
                }
            }
            if !full {
                return Ok((state, version, done));
            }
        }
    }
}

/// Gives a command's events ids derived from the idempotency key, and records the key, so a
/// retried command can be recognised.
fn stamp(stream: &StreamId, command_id: &str, events: &mut [NewEvent]) {
    if command_id.is_empty() {
        return;
    }
    for (i, e) in events.iter_mut().enumerate() {
        let name = format!("{stream}/{command_id}/{i}");
        e.event_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes());
        e.metadata
            .insert(COMMAND_ID_KEY.to_owned(), command_id.to_owned());
    }
}
