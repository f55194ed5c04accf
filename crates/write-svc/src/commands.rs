//! Command handling and checked appends: load an aggregate by folding its stream, decide (or
//! check the caller's events against the aggregate's rules), append at the version the decision
//! was made on.
//!
//! **Contention.** Inside one process, work on one stream is queued (a fair per-stream lock),
//! so a process never loses a race against itself. A race lost to another process (another
//! write-svc replica) is retried on the new state after a jittered, growing backoff, for as long
//! as the call's deadline allows; only then does the caller see ABORTED.
//!
//! **Snapshots.** Loading starts from the stream's snapshot when one may be trusted (see
//! [`Executor::load`] and `esq_domain::snapshot`), so a command folds only the events after it;
//! a load that folded [`SnapshotPolicy::every`] events or more past its starting point writes a
//! new snapshot in the background (bounded, best effort: it never delays or fails a command).

use crate::error::status_from_store;
use crate::Nudge;
use esq::convert::status_from_domain;
use esq_domain::aggregate::{self, Aggregate, Folded};
use esq_domain::snapshot::{self as snap, SeenIds, SnapshotState};
use esq_domain::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use esq_eventstore::{EventStore, ReadRequest, Snapshot, Snapshots, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;
use uuid::Uuid;

pub use esq_domain::event::COMMAND_ID_KEY;
/// Events read per page while loading an aggregate.
const LOAD_PAGE: u32 = 1000;
/// Events read from the start of a stream while its snapshot is read, at the same time: a
/// stream that ends within them is folded from them, with no snapshot needed and no round
/// trip added.
const HEAD_PAGE: u32 = 32;
/// Default of [`SnapshotPolicy::every`] (`--snapshot-every`): measured on AddItem to a long
/// cart, see ARCHITECTURE.md ("Aggregate snapshots").
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 50;
/// Snapshot writes in flight at once per executor; a snapshot due while all are busy is
/// skipped (the next load past the interval offers it again).
const SNAPSHOT_WRITES: usize = 4;
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
    snapshots: SnapshotPolicy,
}

impl<S> Clone for Executor<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            nudge: self.nudge.clone(),
            queues: Arc::clone(&self.queues),
            snapshots: self.snapshots.clone(),
        }
    }
}

/// When the executor takes aggregate snapshots.
#[derive(Clone)]
struct SnapshotPolicy {
    /// A load that folded at least this many events past its starting point (the snapshot it
    /// started from, or version 0) writes a snapshot; 0 turns snapshots off, reading and
    /// writing.
    every: u64,
    /// Bounds the snapshot writes in flight.
    slots: Arc<tokio::sync::Semaphore>,
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

impl<S: EventStore + Snapshots> Executor<S> {
    /// An executor over `store`, calling `nudge` after each append, taking snapshots every
    /// [`DEFAULT_SNAPSHOT_EVERY`] events.
    pub fn new(store: Arc<S>, nudge: Option<Nudge>) -> Self {
        Self {
            store,
            nudge,
            queues: Arc::default(),
            snapshots: SnapshotPolicy {
                every: DEFAULT_SNAPSHOT_EVERY,
                slots: Arc::new(tokio::sync::Semaphore::new(SNAPSHOT_WRITES)),
            },
        }
    }

    /// Takes a snapshot once a load folded `every` events past its starting point; 0 turns
    /// snapshots off (loads fold whole streams and ignore stored snapshots).
    pub fn with_snapshot_every(mut self, every: u64) -> Self {
        self.snapshots.every = every;
        self
    }

    /// The aggregate's document as a command would be decided on (the stream folded, from a
    /// snapshot when one may be trusted), and whether a snapshot was used.
    pub async fn state<A: Aggregate>(&self, stream: &StreamId) -> Result<(Folded, bool), Status> {
        let loaded = self.load::<A>(stream, "", &[]).await?;
        Ok((loaded.folded, loaded.base > 0))
    }

    /// Writes the aggregate's snapshot at its current version now (not in the background);
    /// returns its version, `None` for an empty stream. For tests and tools.
    pub async fn snapshot_now<A: Aggregate>(
        &self,
        stream: &StreamId,
    ) -> Result<Option<u64>, Status> {
        let loaded = self.load::<A>(stream, "", &[]).await?;
        let Some((snapshot, version)) = snapshot_of::<A>(loaded) else {
            return Ok(None);
        };
        self.store
            .write_snapshot(stream, &snapshot)
            .await
            .map_err(status_from_store)?;
        Ok(Some(version))
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
                    nudge(stream, &result, events);
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
                            nudge(stream, &result, events);
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
    ///
    /// With snapshots on, the snapshot and the stream's first [`HEAD_PAGE`] events are read at
    /// once. A stream that ends within them is folded from them. Otherwise the snapshot is used
    /// when [`Executor::resume`] trusts it, and the fold continues after it; else the whole
    /// stream is folded. A load that folded [`SnapshotPolicy::every`] events or more past its
    /// starting point offers a snapshot ([`Executor::offer_snapshot`]).
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
        // The next page to fold, and whether the stream may go on after it.
        let mut next: Option<(Vec<RecordedEvent>, bool)> = None;
        if self.snapshots.every > 0 {
            let (snapshot, head) = tokio::join!(
                self.store.read_snapshot(stream),
                self.store.read(stream, ReadRequest::forwards(1, HEAD_PAGE)),
            );
            let head = head.map_err(status_from_store)?;
            let full = head.len() == HEAD_PAGE as usize;
            if full {
                if let Some((state, snapshot_event_id, tail, more)) = self
                    .resume::<A>(stream, snapshot, command_id, &wanted)
                    .await?
                {
                    loaded.base = state.folded.version;
                    loaded.folded = state.folded;
                    loaded.seen = state.seen;
                    loaded.last_event_id = snapshot_event_id;
                    next = Some((tail, more));
                }
            }
            if next.is_none() {
                next = Some((head, full));
            }
        }
        loop {
            let (full_page, more) = match next.take() {
                Some(page) => page,
                None => {
                    let page = self
                        .store
                        .read(
                            stream,
                            ReadRequest::forwards(loaded.folded.version + 1, LOAD_PAGE),
                        )
                        .await
                        .map_err(status_from_store)?;
                    let more = page.len() == LOAD_PAGE as usize;
                    (page, more)
                }
            };
            // Deciding on a state this server cannot fully read would break the rules: the
            // fold stops at the first event, in version order (whatever the paging), that is
            // of a schema newer than this server reads or that the projection cannot apply.
            let newer = full_page.iter().position(|e| {
                esq_domain::upcast::current_schema_version(&e.event_type)
                    .is_some_and(|known| e.schema_version > known)
            });
            let page = match newer {
                Some(i) => &full_page[..i],
                None => &full_page[..],
            };
            for e in page {
                if !command_id.is_empty()
                    && e.metadata.get(COMMAND_ID_KEY).map(String::as_str) == Some(command_id)
                {
                    loaded.command_done = Some(e.version);
                }
                if let Some(&i) = wanted.get(&e.event_id) {
                    loaded.repeats.push((i, e.clone()));
                }
                loaded.seen.note(e);
            }
            // An event the aggregate's own projection cannot read: no decision on that state.
            loaded
                .folded
                .extend(&projection, page)
                .map_err(|e| status_from_store(e.into()))?;
            if newer.is_some() {
                let e = &full_page[page.len()];
                let known = esq_domain::upcast::current_schema_version(&e.event_type).unwrap_or(0);
                return Err(Status::failed_precondition(format!(
                    "stream {stream} holds {} schema version {} at version {}; this server \
                     understands up to schema version {known}",
                    e.event_type, e.schema_version, e.version
                )));
            }
            if let Some(last) = page.last() {
                loaded.last_event_id = last.event_id;
            }
            if !more {
                self.offer_snapshot::<A>(stream, &loaded);
                return Ok(loaded);
            }
        }
    }

    /// The stream's snapshot as a starting point, if it may be trusted: of `A`'s fingerprint,
    /// decoding (checksum), at a version the stream holds with the same event there (read
    /// back with the events after it, which are returned, with whether more may follow), and
    /// with none of the ids the load looks for (`command_id`, `wanted`) possibly among the
    /// events it covers — a possible match means a full fold, so those answers stay exact.
    /// Anything else is `None`, and the caller folds the whole stream.
    async fn resume<A: Aggregate>(
        &self,
        stream: &StreamId,
        snapshot: Result<Option<Snapshot>, StoreError>,
        command_id: &str,
        wanted: &HashMap<Uuid, usize>,
    ) -> Result<Option<(SnapshotState, Uuid, Vec<RecordedEvent>, bool)>, Status> {
        let snapshot = match snapshot {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return Ok(None),
            Err(e) => {
                // A cache that cannot be read: fold the events (which may fail the same way).
                tracing::debug!(%stream, error = %e, "snapshot not readable: full fold");
                return Ok(None);
            }
        };
        if *snap::fingerprint::<A>() != *snapshot.fingerprint || snapshot.version == 0 {
            tracing::debug!(%stream, fingerprint = %snapshot.fingerprint, "snapshot of other fold semantics ignored");
            return Ok(None);
        }
        let Some(state) =
            SnapshotState::decode(&snapshot.state).filter(|s| s.folded.version == snapshot.version)
        else {
            tracing::warn!(%stream, version = snapshot.version, "corrupt snapshot ignored");
            return Ok(None);
        };
        let maybe_seen = (!command_id.is_empty()
            && state.seen.may_contain(snap::command_key(command_id)))
            || wanted
                .keys()
                .any(|id| state.seen.may_contain(snap::event_key(id)));
        if maybe_seen {
            return Ok(None);
        }
        let page = self
            .store
            .read(stream, ReadRequest::forwards(snapshot.version, LOAD_PAGE))
            .await
            .map_err(status_from_store)?;
        let more = page.len() == LOAD_PAGE as usize;
        match page.first() {
            Some(first)
                if first.version == snapshot.version && first.event_id == snapshot.event_id =>
            {
                let tail = page[1..].to_vec();
                Ok(Some((state, first.event_id, tail, more)))
            }
            _ => {
                tracing::warn!(%stream, version = snapshot.version, "snapshot not of this stream's history (ahead of it, or another event at its version): ignored");
                Ok(None)
            }
        }
    }

    /// Writes a snapshot of `loaded` in the background if it folded [`SnapshotPolicy::every`]
    /// events or more past its starting point and a write slot is free. Never waits, never
    /// fails the caller: a failed write is logged and the next load offers one again.
    fn offer_snapshot<A: Aggregate>(&self, stream: &StreamId, loaded: &Loaded) {
        let every = self.snapshots.every;
        if every == 0 || loaded.folded.version < loaded.base.saturating_add(every) {
            return;
        }
        let Ok(slot) = Arc::clone(&self.snapshots.slots).try_acquire_owned() else {
            tracing::debug!(%stream, "snapshot writes busy: snapshot skipped");
            return;
        };
        let store = Arc::clone(&self.store);
        let stream = stream.clone();
        let loaded = Loaded {
            folded: loaded.folded.clone(),
            seen: loaded.seen.clone(),
            last_event_id: loaded.last_event_id,
            base: loaded.base,
            ..Loaded::default()
        };
        tokio::spawn(async move {
            let _slot = slot;
            if let Some((snapshot, version)) = snapshot_of::<A>(loaded) {
                match store.write_snapshot(&stream, &snapshot).await {
                    Ok(()) => tracing::debug!(%stream, version, "snapshot written"),
                    Err(e) => tracing::warn!(%stream, version, error = %e, "snapshot not written"),
                }
            }
        });
    }
}

/// The snapshot of a loaded aggregate and its version; `None` for an empty stream.
fn snapshot_of<A: Aggregate>(loaded: Loaded) -> Option<(Snapshot, u64)> {
    let version = loaded.folded.version;
    if version == 0 {
        return None;
    }
    let mut state = SnapshotState {
        folded: loaded.folded,
        seen: loaded.seen,
    };
    Some((
        Snapshot {
            version,
            event_id: loaded.last_event_id,
            fingerprint: snap::fingerprint::<A>().to_string(),
            state: state.encode(),
        },
        version,
    ))
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
    /// The version of the snapshot the fold started from (0: from the first event).
    base: u64,
    /// The ids of events `1..=folded.version`.
    seen: SeenIds,
    /// The id of the event at `folded.version`.
    last_event_id: Uuid,
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
