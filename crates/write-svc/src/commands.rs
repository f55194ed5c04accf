//! Command handling and checked appends: load an aggregate by folding its stream, decide (or
//! check the caller's events against the aggregate's rules), append at the version the decision
//! was made on.
//!
//! **Contention.** Inside one process, work on one stream is queued (a fair per-stream lock),
//! so a process never loses a race against itself. A race lost to another process (another
//! write-svc replica) is retried on the new state after a jittered, growing backoff, for as long
//! as the call's deadline allows; only then does the caller see ABORTED.

use crate::error::status_from_store;
use crate::Nudge;
use esq::convert::status_from_domain;
use esq_domain::aggregate::{self, Aggregate, Folded};
use esq_domain::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use esq_eventstore::{EventStore, ReadRequest, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;
use uuid::Uuid;

pub use esq_domain::event::COMMAND_ID_KEY;
/// Events read per page while loading an aggregate.
const LOAD_PAGE: u32 = 1000;
/// How long a call without a deadline keeps retrying races lost to other processes.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(10);
/// First backoff after a lost race; it doubles up to [`MAX_BACKOFF`], each wait jittered.
const FIRST_BACKOFF: Duration = Duration::from_millis(2);
/// Longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// Most of the caller's deadline kept back for answering (a tenth of it, at most this).
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// Runs commands of any aggregate, and checked appends, against one store.
pub struct Executor<S> {
    store: Arc<S>,
    nudge: Option<Nudge>,
    queues: Arc<StreamQueues>,
}

impl<S> Clone for Executor<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            nudge: self.nudge.clone(),
            queues: Arc::clone(&self.queues),
        }
    }
}

/// What a command asks of the executor besides the domain command itself.
pub struct CommandOptions<'a> {
    /// If set, the aggregate must be at exactly this version.
    pub expected_version: Option<u64>,
    /// The client's idempotency key ("" for none).
    pub command_id: &'a str,
    /// When the caller stops waiting (from its gRPC deadline); `None`: the default budget.
    pub deadline: Option<Instant>,
}

/// The outcome of one attempt: done, or lost a race to another process.
enum Attempt<T> {
    Done(T),
    LostRace { version: u64, actual: u64 },
}

impl<T> Attempt<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U> {
        match self {
            Self::Done(v) => Attempt::Done(f(v)),
            Self::LostRace { version, actual } => Attempt::LostRace { version, actual },
        }
    }
}

impl<S: EventStore> Executor<S> {
    /// An executor over `store`, calling `nudge` after each append.
    pub fn new(store: Arc<S>, nudge: Option<Nudge>) -> Self {
        Self {
            store,
            nudge,
            queues: Arc::default(),
        }
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
        let retry = options.expected_version.is_none();
        let options = &options;
        self.with_retries(stream, options.deadline, retry, || async move {
            let loaded = self.load::<A>(stream, options.command_id, &[]).await?;
            if let Some(v) = loaded.command_done {
                return Ok(Attempt::Done(v)); // a retry of a command that already took effect
            }
            let version = loaded.folded.version;
            if let Some(expected) = options.expected_version {
                if expected != version {
                    return Err(status_from_store(StoreError::WrongExpectedVersion {
                        expected: ExpectedVersion::Exact(expected),
                        actual: version,
                    }));
                }
            }
            let state: A = loaded.folded.state();
            let mut events = aggregate::decide(&state, command).map_err(status_from_domain)?;
            if events.is_empty() {
                return Ok(Attempt::Done(version));
            }
            stamp(stream, options.command_id, &mut events);
            Ok(self
                .append_at(stream, version, &events, retry)
                .await?
                .map(|r| r.last_version))
        })
        .await
    }

    /// Appends caller-made events to a stream of `A` after checking them against the
    /// aggregate's rules in the stream's current state (see
    /// [`esq_domain::aggregate::check_append`]). A repeat of an append that already happened
    /// answers its original result; `any` and `stream_exists` appends that lose a race to
    /// another process are checked again on the new state.
    pub async fn append_checked<A: Aggregate>(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        deadline: Option<Instant>,
    ) -> Result<AppendResult, Status> {
        let retry = matches!(
            expected,
            ExpectedVersion::Any | ExpectedVersion::StreamExists
        );
        self.with_retries(stream, deadline, retry, || async move {
            let loaded = self.load::<A>(stream, "", events).await?;
            if let Some((index, stored)) = loaded.repeats.iter().min_by_key(|(i, _)| *i) {
                // Ids already stored: the store's one repeat rule decides (the original result,
                // or refused). Asking at the version the original append must have expected
                // can never write, since heads only grow past it.
                let base = (stored.version - 1).saturating_sub(*index as u64);
                let at = if base == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(base)
                };
                return match self.store.append(stream, at, events).await {
                    Ok(result) => Ok(Attempt::Done(result)),
                    Err(StoreError::WrongExpectedVersion { .. }) => {
                        Err(status_from_store(StoreError::EventIdReused {
                            index: *index,
                            event_id: events[*index].event_id,
                            version: stored.version,
                        }))
                    }
                    Err(e) => Err(status_from_store(e)),
                };
            }
            let version = loaded.folded.version;
            if !expected.admits(version) {
                return Err(status_from_store(StoreError::WrongExpectedVersion {
                    expected,
                    actual: version,
                }));
            }
            aggregate::check_append::<A>(stream, &loaded.folded, events)
                .map_err(status_from_domain)?;
            self.append_at(stream, version, events, retry).await
        })
        .await
    }

    /// Runs `attempt` with the stream's queue held, retrying lost races (when `retry`) after
    /// a jittered backoff until `deadline` (or [`DEFAULT_RETRY_BUDGET`]).
    async fn with_retries<T, F, Fut>(
        &self,
        stream: &StreamId,
        deadline: Option<Instant>,
        retry: bool,
        mut attempt: F,
    ) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, Status>>,
    {
        let started = Instant::now();
        // Stop a little before the caller's deadline: an attempt cut off by the transport's
        // own timeout would leave the caller without an answer, and an append without a
        // known outcome.
        let deadline = deadline.map_or(started + DEFAULT_RETRY_BUDGET, |d| {
            d - (d.saturating_duration_since(started) / 10).min(DEADLINE_MARGIN)
        });
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let outcome = {
                let _turn = self.queues.turn(stream).await;
                attempt().await?
            };
            let (version, actual) = match outcome {
                Attempt::Done(v) => return Ok(v),
                Attempt::LostRace { version, actual } => (version, actual),
            };
            let wait = jitter(backoff);
            if !retry || Instant::now() + wait >= deadline {
                return Err(if retry {
                    esq_runtime::metrics::write().aborted();
                    Status::aborted(format!(
                        "stream {stream} kept changing under other writers: {attempts} attempts \
                         in {:?} lost the race (last at version {version}, now {actual}); \
                         retrying the call is safe",
                        started.elapsed()
                    ))
                } else {
                    status_from_store(StoreError::WrongExpectedVersion {
                        expected: ExpectedVersion::Exact(version),
                        actual,
                    })
                });
            }
            tracing::debug!(%stream, version, actual, ?wait, "lost a race to another writer");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Appends `events` at exactly `version`, nudging on success.
    async fn append_at(
        &self,
        stream: &StreamId,
        version: u64,
        events: &[NewEvent],
        retry: bool,
    ) -> Result<Attempt<AppendResult>, Status> {
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        match self.store.append(stream, expected, events).await {
            Ok(result) => {
                if let Some(nudge) = &self.nudge {
                    nudge(stream, result.last_version);
                }
                Ok(Attempt::Done(result))
            }
            Err(StoreError::WrongExpectedVersion { actual, .. }) if retry => {
                Ok(Attempt::LostRace { version, actual })
            }
            Err(StoreError::OutcomeUnknown(cause)) => {
                // Our events' ids are known here (a command's client may know none of them):
                // look for them before giving the caller an unknown outcome.
                match self.find_appended(stream, version, events).await {
                    Some(Found::Ours(result)) => {
                        if let Some(nudge) = &self.nudge {
                            nudge(stream, result.last_version);
                        }
                        Ok(Attempt::Done(result))
                    }
                    Some(Found::Others { head }) if retry => Ok(Attempt::LostRace {
                        version,
                        actual: head,
                    }),
                    Some(Found::Others { head }) => {
                        Err(status_from_store(StoreError::WrongExpectedVersion {
                            expected,
                            actual: head,
                        }))
                    }
                    None => Err(status_from_store(StoreError::OutcomeUnknown(cause))),
                }
            }
            Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                Err(status_from_store(StoreError::WrongExpectedVersion {
                    expected,
                    actual,
                }))
            }
            Err(e) => Err(status_from_store(e)),
        }
    }

    /// What follows `version` in the stream after an append of `events` at `version` with an
    /// unknown outcome: our events (it committed), others' (it cannot commit any more: its
    /// condition was the head at `version`), or `None` when the stream still ends at `version`
    /// or cannot be read (still unknown).
    async fn find_appended(
        &self,
        stream: &StreamId,
        version: u64,
        events: &[NewEvent],
    ) -> Option<Found> {
        let n = u32::try_from(events.len()).ok()?;
        let stored = self
            .store
            .read(stream, ReadRequest::forwards(version + 1, n))
            .await
            .ok()?;
        let first = stored.first()?;
        let ours = stored.len() == events.len()
            && stored
                .iter()
                .zip(events)
                .all(|(s, e)| s.event_id == e.event_id);
        Some(if ours {
            Found::Ours(AppendResult {
                first_version: first.version,
                last_version: stored[stored.len() - 1].version,
                committed_at_us: stored[stored.len() - 1].recorded_at_us,
            })
        } else {
            Found::Others {
                head: stored[stored.len() - 1].version,
            }
        })
    }

    /// Folds the stream through `A`'s projection; also finds where `command_id` last took
    /// effect and which stored events carry the ids of `probe`.
    async fn load<A: Aggregate>(
        &self,
        stream: &StreamId,
        command_id: &str,
        probe: &[NewEvent],
    ) -> Result<Loaded, Status> {
        let projection = A::Projection::default();
        let wanted: HashMap<Uuid, usize> = probe
            .iter()
            .enumerate()
            .map(|(i, e)| (e.event_id, i))
            .collect();
        let mut loaded = Loaded::default();
        loop {
            let page = self
                .store
                .read(
                    stream,
                    ReadRequest::forwards(loaded.folded.version + 1, LOAD_PAGE),
                )
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
                if !command_id.is_empty()
                    && e.metadata.get(COMMAND_ID_KEY).map(String::as_str) == Some(command_id)
                {
                    loaded.command_done = Some(e.version);
                }
                if let Some(&i) = wanted.get(&e.event_id) {
                    loaded.repeats.push((i, e.clone()));
                }
            }
            // An event the aggregate's own projection cannot read: no decision on that state.
            loaded
                .folded
                .extend(&projection, &page)
                .map_err(|e| status_from_store(e.into()))?;
            if !full {
                return Ok(loaded);
            }
        }
    }
}

/// What [`Executor::find_appended`] found after the append's version.
enum Found {
    Ours(AppendResult),
    Others { head: u64 },
}

/// A stream as loaded for one attempt.
#[derive(Default)]
struct Loaded {
    folded: Folded,
    command_done: Option<u64>,
    /// Stored events whose ids an append carries, with the index in the append.
    repeats: Vec<(usize, RecordedEvent)>,
}

/// One FIFO queue per stream with work in flight in this process.
#[derive(Default)]
struct StreamQueues {
    queues: Mutex<HashMap<StreamId, Queue>>,
}

/// A stream's queue, and how many turns hold or wait for it.
type Queue = (Arc<tokio::sync::Mutex<()>>, usize);

/// A turn at a stream: once its guard is taken, the holder is the only one in this process
/// working on the stream. It exists while waiting too, so a caller that gives up waiting
/// (its call was cancelled) still leaves the queue's count right.
struct Turn<'a> {
    queues: &'a StreamQueues,
    stream: StreamId,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl StreamQueues {
    /// Waits for the stream's turn (tokio's mutex is fair: first come, first served).
    async fn turn(&self, stream: &StreamId) -> Turn<'_> {
        let queue = {
            let mut queues = self
                .queues
                .lock()
                .expect("stream queue map is never poisoned");
            let (queue, turns) = queues.entry(stream.clone()).or_default();
            *turns += 1;
            Arc::clone(queue)
        };
        let mut turn = Turn {
            queues: self,
            stream: stream.clone(),
            guard: None,
        };
        turn.guard = Some(queue.lock_owned().await);
        turn
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // The queue goes once nobody holds or waits for it, so the map stays as small as the
        // set of streams in flight.
        let mut queues = self
            .queues
            .queues
            .lock()
            .expect("stream queue map is never poisoned");
        if let Some((_, turns)) = queues.get_mut(&self.stream) {
            *turns -= 1;
            if *turns == 0 {
                queues.remove(&self.stream);
            }
        }
    }
}

/// A random wait between half and all of `backoff`, so that racing writers spread out.
fn jitter(backoff: Duration) -> Duration {
    let r = (Uuid::new_v4().as_u128() % 1000) as u32;
    backoff / 2 + backoff / 2 * r / 1000
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_all_of_the_backoff() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(50) && j <= Duration::from_millis(100));
        }
    }

    #[tokio::test]
    async fn a_stream_queue_serves_one_at_a_time_and_is_dropped_when_idle() {
        let queues = StreamQueues::default();
        let s = StreamId::new("cart", "c").expect("valid");
        let first = queues.turn(&s).await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), queues.turn(&s)).await;
        assert!(waiting.is_err(), "a second turn waits for the first");
        drop(first);
        let second = queues.turn(&s).await;
        drop(second);
        assert!(queues.queues.lock().expect("lock").is_empty());
    }

    /// A waiter whose call is cancelled after the holder left still removes the queue.
    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_queue_behind() {
        use std::future::Future as _;
        let queues = StreamQueues::default();
        let s = StreamId::new("cart", "c").expect("valid");
        let first = queues.turn(&s).await;
        let mut waiter = Box::pin(queues.turn(&s));
        let waker = std::task::Waker::noop();
        let polled = waiter
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker));
        assert!(polled.is_pending(), "the waiter queues behind the holder");
        drop(first);
        drop(waiter);
        assert!(queues.queues.lock().expect("lock").is_empty());
    }
}
