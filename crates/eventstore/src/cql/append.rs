//! Appends: one conditional batch inside the stream's partition.
//!
//! The batch is `UPDATE … SET head = :new IF head = :expected` (or `IF head = NULL` for a
//! stream's first append — on Apache Cassandra 5 that condition holds for a partition that does
//! not exist, while `IF head = 0` does not, see the crate's tests) plus one INSERT per event. All
//! rows share the partition, so Paxos makes the batch atomic and linearizable across any number
//! of writers.
//!
//! Idempotency follows [`crate::repeat`]: an append is a repeat only if its events are exactly
//! one earlier append (each row records the bounds of the append that wrote it, `append_first`
//! and `append_last`), with the same contents; anything else reusing an id is refused. The ids
//! are looked up in the stream's *idempotency window* — its newest
//! [`super::CqlConfig::id_window`] events, read in the same query as the head — rather than
//! through a secondary index: the read is a single-partition slice that `Any` appends need
//! anyway for the head, it is exact (no index lag, no index to build or to keep in step with
//! the partition), and it is bounded whatever the stream's length. A candidate repeat's stored
//! events are then read (linearizably) and compared. The price is the window: a retry arriving
//! after more than `id_window` newer events of the same stream is not recognised. `Exact`
//! appends are covered without the window too: a retry of one that committed finds the head
//! moved, and the rows at the expected positions are read back (linearizably) and compared.
//!
//! Reads avoided: the [`TailCache`] holds, per stream, the head and window this process last
//! read or committed. An append whose head it knows (and an `Any` append to a stream it does
//! not know, guessed new) skips the read and conditions its batch on that head; a lost batch
//! drops the entry and the append reads as before. Appends of this process to one stream take
//! [`Turns`], so they do not race each other's Paxos rounds.
//!
//! Unanswered batches: a timeout or a connection lost while the batch was in flight leaves its
//! outcome open. The head is then read with SERIAL consistency — which completes a Paxos round
//! in flight or makes it fail, so the answer is final — and the rows at the target versions are
//! compared as after a lost race. Read failures are retried until the append deadline; after it
//! the append fails with [`StoreError::OutcomeUnknown`].
//!
//! Timing rules, so that the change log never loses a committed append: the notification is
//! written first, and the batch is sent only if [`batch_guard`] allows it — the notification
//! was acknowledged within half the confidence window of its `noted_at` (else a projector could
//! already have read past it), and a batch sent now ends, committed or given up, before
//! `noted_at + append_deadline` (after which projectors skip the notification as an orphan).
//! Otherwise the append fails with [`StoreError::Unavailable`] and nothing is appended.
//!
//! Commit times: events are stamped with the local clock, clamped to at least the newest
//! `recorded_at` already in the stream when the append has read it, so that a writer whose clock
//! lags another's does not make times go backwards within a stream. The tail read that
//! `Any`/`StreamExists` appends need anyway, and that `Exact` appends run beside the
//! notification when [`super::CqlConfig::check_ids_on_exact`] is on (the default), returns those
//! events. `NoStream`/`Exact(0)` appends need no clamp (they succeed only on an empty stream);
//! `Exact` appends without the id check read nothing of the stream and use the local clock
//! unclamped.

use super::changes::Noted;
use super::{error, Inner};
use crate::repeat::{check_contents, check_ids, IdCheck, Known};
use crate::StoreError;
use esq_domain::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::serialize::SerializationError;
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::{CqlValue, Row};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Slack on top of the request timeout before a batch without an answer is taken as dead.
const SETTLE_MARGIN: Duration = Duration::from_millis(250);
/// Attempts of an `Any`/`StreamExists` append that keeps losing races, within the append
/// deadline.
const MAX_ATTEMPTS: u32 = 64;

/// The newest events of a stream and its head, from one read.
pub(crate) struct Tail {
    /// The stream's version (0: no events).
    pub(crate) head: u64,
    /// The newest events, newest first.
    pub(crate) events: Vec<TailEvent>,
}

/// One event of a [`Tail`].
#[derive(Clone)]
pub(crate) struct TailEvent {
    pub(crate) version: u64,
    pub(crate) id: Uuid,
    pub(crate) recorded_at: i64,
    /// First and last version of the append that wrote it (none on rows written before those
    /// columns existed).
    pub(crate) append: Option<(u64, u64)>,
}

impl Tail {
    /// The newest commit time among the events read, if any.
    pub(crate) fn newest_recorded_at(&self) -> Option<i64> {
        self.events.iter().map(|e| e.recorded_at).max()
    }

    /// Judges `events` by the ids in the window ([`check_ids`]).
    pub(crate) fn check(&self, events: &[NewEvent]) -> IdCheck {
        let by_id: HashMap<Uuid, Known> = self
            .events
            .iter()
            .map(|e| {
                let known = Known {
                    version: e.version,
                    append: e.append,
                };
                (e.id, known)
            })
            .collect();
        let known: Vec<Option<Known>> = events
            .iter()
            .map(|e| by_id.get(&e.event_id).copied())
            .collect();
        check_ids(events, &known)
    }
}

/// What the tail cache says of a stream for one append.
pub(crate) struct Cached {
    /// The stream's head as this process last knew it.
    pub(crate) head: u64,
    /// The append's events judged against the idempotency window below that head.
    pub(crate) check: IdCheck,
    /// The newest commit time in the window.
    pub(crate) newest: Option<i64>,
}

impl Cached {
    /// A stream with no events: nothing to check against.
    const NEW: Cached = Cached {
        head: 0,
        check: IdCheck::New,
        newest: None,
    };
}

/// What this process knows of streams' heads and idempotency windows: each entry is a [`Tail`]
/// as a read returned it, or as this process's own committed batches extended it.
///
/// Why it is safe to trust: events at versions at or below a head are immutable (no code path
/// updates or deletes an event row), so an entry's window is exactly the stream's window at
/// that head, forever. An append that uses an entry conditions its batch on the entry's head
/// (`IF head = ?`): if the batch applies, the stream was at that head, its window was the
/// entry's, and the id check made against the entry is the one a read would have made. If it
/// loses, the entry is dropped and the append reads the stream as before. So a stale entry (a
/// write by another replica, an unknown outcome) costs one lost batch, never a wrong answer.
///
/// Bounded: at most `cap` events over all streams; past that, arbitrary entries are dropped
/// until half remain.
pub(crate) struct TailCache {
    cap: usize,
    state: Mutex<TailCacheState>,
}

#[derive(Default)]
struct TailCacheState {
    tails: HashMap<StreamId, Tail>,
    events: usize,
}

impl TailCacheState {
    fn remove(&mut self, stream: &StreamId) {
        if let Some(old) = self.tails.remove(stream) {
            self.events -= old.events.len();
        }
    }

    fn insert(&mut self, stream: StreamId, tail: Tail, cap: usize) {
        self.remove(&stream);
        self.events += tail.events.len();
        self.tails.insert(stream, tail);
        if self.events > cap {
            let mut dropped = 0;
            let target = self.events - cap / 2;
            self.tails.retain(|_, t| {
                if dropped >= target {
                    return true;
                }
                dropped += t.events.len().max(1);
                false
            });
            self.events = self.tails.values().map(|t| t.events.len()).sum();
        }
    }
}

impl TailCache {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            state: Mutex::new(TailCacheState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TailCacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached head of `stream` and `events` judged against its window, if known.
    pub(crate) fn lookup(&self, stream: &StreamId, events: &[NewEvent]) -> Option<Cached> {
        let state = self.state();
        let tail = state.tails.get(stream)?;
        Some(Cached {
            head: tail.head,
            check: tail.check(events),
            newest: tail.newest_recorded_at(),
        })
    }

    /// Records a tail read, unless a newer head is already known.
    pub(crate) fn store(&self, stream: &StreamId, tail: &Tail) {
        if tail.head == 0 {
            return; // nothing to remember of a stream with no events
        }
        let mut state = self.state();
        if state.tails.get(stream).is_some_and(|t| t.head >= tail.head) {
            return;
        }
        let copy = Tail {
            head: tail.head,
            events: tail.events.clone(),
        };
        state.insert(stream.clone(), copy, self.cap);
    }

    /// Records this process's batch of `events` at `base`, committed at `recorded_at`: the
    /// entry moves on if it was at `base` (or the stream was new, or the batch alone fills the
    /// window); otherwise the window is not known and the entry is dropped.
    pub(crate) fn applied(
        &self,
        stream: &StreamId,
        base: u64,
        events: &[NewEvent],
        recorded_at: i64,
        window: usize,
    ) {
        let n = events.len() as u64;
        let window = window.max(1);
        let append = Some((base + 1, base + n));
        let ours = events.iter().enumerate().rev().map(|(i, e)| TailEvent {
            version: base + 1 + i as u64,
            id: e.event_id,
            recorded_at,
            append,
        });
        let mut state = self.state();
        let mut tail = match state.tails.get(stream) {
            Some(t) if t.head == base => Tail {
                head: base + n,
                events: ours.chain(t.events.iter().cloned()).take(window).collect(),
            },
            _ if base == 0 || events.len() >= window => Tail {
                head: base + n,
                events: ours.take(window).collect(),
            },
            _ => {
                state.remove(stream);
                return;
            }
        };
        tail.events.shrink_to_fit();
        state.insert(stream.clone(), tail, self.cap);
    }

    /// Drops what is known of `stream`.
    pub(crate) fn forget(&self, stream: &StreamId) {
        self.state().remove(stream);
    }
}

/// Appends of this process to one stream take turns: concurrent ones would only race each
/// other's Paxos rounds (all but one losing, each loss a read and another round), while in turn
/// each finds the head the previous one left in the [`TailCache`] and commits at the first
/// try. Other processes' appends still race, and are resolved as before.
#[derive(Default)]
pub(crate) struct Turns {
    streams: Mutex<HashMap<StreamId, Arc<tokio::sync::Mutex<()>>>>,
}

/// One append's turn on its stream; the stream's entry is removed with its last user.
pub(crate) struct Turn<'a> {
    turns: &'a Turns,
    stream: StreamId,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits for `stream`'s turn.
    pub(crate) async fn take(&self, stream: &StreamId) -> Turn<'_> {
        let lock = {
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(streams.entry(stream.clone()).or_default())
        };
        // Should the caller give up while waiting, `lock` is dropped with the future and the
        // entry is cleaned by the next turn's end.
        let guard = lock.lock_owned().await;
        Turn {
            turns: self,
            stream: stream.clone(),
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.streams.lock().map(|s| s.len()).unwrap_or(0)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut streams = self.turns.streams.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds it: nobody waits, so the entry goes (clones are made under this
        // lock, so none can appear meanwhile).
        if streams
            .get(&self.stream)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            streams.remove(&self.stream);
        }
    }
}

/// What a linearizable read-back says about a batch that got no answer.
enum Resolved {
    /// The append is decided: it committed (the original result), or it reuses ids.
    Outcome(Result<AppendResult, StoreError>),
    /// Another append moved the head to this version instead.
    Lost { head: u64 },
    /// The head is still where the batch expected it: the batch did not apply, and cannot any
    /// more (the serial read completed or superseded its Paxos round).
    NotApplied,
}

/// What the conditional batch reported.
enum Cas {
    /// Written; the commit time recorded on the events.
    Applied(i64),
    /// The head was not the expected one; this is the head the engine reported (0 when the
    /// partition does not exist).
    Lost { head: u64 },
    /// No answer (a timeout or a connection lost after sending): the batch may have applied.
    Unknown(StoreError),
}

/// One row of the append batch: the head update or an event insert.
enum BatchRow<'a> {
    First((i64, i64, i64, &'a str, &'a str, i32)),
    Next((i64, i64, &'a str, &'a str, i32, i64)),
    #[allow(clippy::type_complexity)]
    Event(
        (
            &'a str,
            &'a str,
            i32,
            i64,
            Uuid,
            &'a str,
            i32,
            &'a str,
            &'a [u8],
            &'a BTreeMap<String, String>,
            i64,
            i64,
            i64,
        ),
    ),
}

impl SerializeRow for BatchRow<'_> {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match self {
            Self::First(values) => values.serialize(ctx, writer),
            Self::Next(values) => values.serialize(ctx, writer),
            Self::Event(values) => values.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// Why an append must not send its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The notification was acknowledged more than half the confidence window after it was
    /// noted: a projector may already have read its shard past it.
    LateNotification,
    /// A batch sent now could still be running when the append deadline has passed since the
    /// notification was noted, when projectors treat the notification as an orphan.
    PastDeadline,
}

/// The limits [`batch_guard`] applies, from the store's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) confidence_window: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) append_deadline: Duration,
}

/// Whether a batch may be sent, `age` after its notification was noted, the notification's
/// write having been acknowledged `acked_after` after it was noted.
pub(crate) fn batch_guard(
    acked_after: Duration,
    age: Duration,
    limits: Limits,
) -> Result<(), Refusal> {
    if acked_after > limits.confidence_window / 2 {
        return Err(Refusal::LateNotification);
    }
    // Half the confidence window is kept as a margin for clock skew between this host and
    // the projector that judges the notification an orphan.
    if age + limits.request_timeout + limits.confidence_window / 2 >= limits.append_deadline {
        return Err(Refusal::PastDeadline);
    }
    Ok(())
}

/// The time an append records: the local clock, but never before `newest`, the newest commit
/// time already in the stream when known.
pub(crate) fn commit_time(now_us: i64, newest: Option<i64>) -> i64 {
    newest.map_or(now_us, |newest| now_us.max(newest))
}

/// Whether `expected` names versions the table cannot hold (versions are signed 64-bit): no
/// stream is at such a version, so the append is a plain version conflict.
fn beyond_bigint(expected: ExpectedVersion, n: u64) -> bool {
    match expected {
        ExpectedVersion::Exact(v) => v.checked_add(n).is_none_or(|last| last > i64::MAX as u64),
        _ => false,
    }
}

fn to_i64(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version)
        .map_err(|_| StoreError::Internal(format!("version {version} is out of range")))
}

impl Inner {
    /// [`crate::EventStore::append`].
    pub(crate) async fn append(
        self: &Arc<Self>,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        if events.is_empty() {
            return Err(StoreError::Internal(
                "an append needs at least one event".into(),
            ));
        }
        let n = events.len() as u64;
        if beyond_bigint(expected, n) {
            let tail = self.tail(stream).await?;
            if let Some(outcome) = self.judge(stream, events, tail.check(events)).await? {
                return outcome;
            }
            return Err(StoreError::WrongExpectedVersion {
                expected,
                actual: tail.head,
            });
        }
        let started = Instant::now();
        let _turn = self.turns.take(stream).await;
        let notify = self.config.feed == super::FeedKind::ChangesTable;
        let mut attempt = 0;
        // Whether this attempt may take the head and the idempotency window from the tail
        // cache instead of reading them; after a guess that lost, every attempt reads.
        let mut trust_cache = true;
        loop {
            attempt += 1;
            let mut notified = false;
            let mut noted = None;
            // The newest commit time in the stream, when this attempt knows it.
            let mut newest = None;
            let cached = if trust_cache {
                self.tails.lookup(stream, events)
            } else {
                None
            };
            // Whether `base` is a guess from the cache (or, for `Any`, that an unknown stream
            // is new) that the conditional batch checks: if it loses, the next attempt reads.
            let mut guessed = false;
            let base = match expected {
                ExpectedVersion::Exact(v) if v > 0 && self.config.check_ids_on_exact => {
                    match cached {
                        Some(known) if known.head == v => {
                            // The window below `v` is immutable and known: no read needed.
                            if let Some(outcome) = self.judge(stream, events, known.check).await? {
                                return outcome;
                            }
                            newest = known.newest;
                            v
                        }
                        _ => {
                            // The id check runs beside the notification write, so it costs no
                            // latency.
                            let note = async {
                                if notify {
                                    return self.note_change(stream, v + 1, v + n).await.map(Some);
                                }
                                Ok(None)
                            };
                            let (note, tail) = tokio::try_join!(note, self.tail(stream))?;
                            notified = true;
                            noted = note;
                            newest = tail.newest_recorded_at();
                            if let Some(outcome) =
                                self.judge(stream, events, tail.check(events)).await?
                            {
                                return outcome;
                            }
                            if tail.head > v {
                                // Heads only grow: this append cannot succeed. It may be a
                                // retry of one that did, further back than the id window: the
                                // rows where it would be say so.
                                if let Some(outcome) =
                                    self.after_lost_race(stream, v, events, tail.head).await?
                                {
                                    return outcome;
                                }
                                return Err(StoreError::WrongExpectedVersion {
                                    expected,
                                    actual: tail.head,
                                });
                            }
                            v
                        }
                    }
                }
                ExpectedVersion::Exact(v) => v,
                ExpectedVersion::NoStream => 0,
                ExpectedVersion::Any | ExpectedVersion::StreamExists => {
                    let known = match cached {
                        Some(known) => Some(known),
                        // A stream this process knows nothing of is guessed new: an empty
                        // stream has no ids to check, and the batch's `IF head = NULL` makes
                        // the guess safe.
                        None if trust_cache && expected == ExpectedVersion::Any => {
                            Some(Cached::NEW)
                        }
                        None => None,
                    };
                    match known {
                        Some(known) => {
                            if let Some(outcome) = self.judge(stream, events, known.check).await? {
                                return outcome;
                            }
                            guessed = true;
                            newest = known.newest;
                            known.head
                        }
                        None => {
                            let tail = self.tail(stream).await?;
                            if let Some(outcome) =
                                self.judge(stream, events, tail.check(events)).await?
                            {
                                return outcome;
                            }
                            if expected == ExpectedVersion::StreamExists && tail.head == 0 {
                                return Err(StoreError::WrongExpectedVersion {
                                    expected,
                                    actual: 0,
                                });
                            }
                            newest = tail.newest_recorded_at();
                            tail.head
                        }
                    }
                }
            };
            if notify && !notified {
                noted = Some(self.note_change(stream, base + 1, base + n).await?);
            }
            if let Some(noted) = &noted {
                self.guard_batch(stream, noted)?;
            }
            let sent_at = Instant::now();
            let head = match self.conditional_batch(stream, base, events, newest).await? {
                Cas::Applied(committed_at_us) => {
                    self.tails.applied(
                        stream,
                        base,
                        events,
                        committed_at_us,
                        self.config.id_window as usize,
                    );
                    return Ok(AppendResult {
                        first_version: base + 1,
                        last_version: base + n,
                        committed_at_us,
                    });
                }
                Cas::Lost { head } if guessed => {
                    // The cache was behind (another writer, or a stream this process did not
                    // know): read the stream and try again at once. A retry of an earlier
                    // append is recognised by the read's id check.
                    self.tails.forget(stream);
                    trust_cache = false;
                    let _ = head;
                    continue;
                }
                Cas::Lost { head } => {
                    self.tails.forget(stream);
                    if let Some(outcome) = self.after_lost_race(stream, base, events, head).await? {
                        return outcome;
                    }
                    head
                }
                Cas::Unknown(cause) => {
                    self.tails.forget(stream);
                    let deadline = started + self.config.append_deadline;
                    let times = (sent_at, deadline);
                    match self.resolve(stream, base, events, times, &cause).await? {
                        Resolved::Outcome(outcome) => return outcome,
                        Resolved::Lost { head } => head,
                        Resolved::NotApplied => {
                            return Err(StoreError::Unavailable(format!(
                                "append to {stream} was not applied ({cause}); retrying is safe"
                            )))
                        }
                    }
                }
            };
            match expected {
                ExpectedVersion::Any | ExpectedVersion::StreamExists => {
                    if attempt >= MAX_ATTEMPTS || started.elapsed() >= self.config.append_deadline {
                        return Err(StoreError::Unavailable(format!(
                            "append to {stream} kept losing races: gave up after {attempt} attempts"
                        )));
                    }
                    trust_cache = false;
                    tokio::time::sleep(backoff(attempt)).await;
                }
                _ => {
                    return Err(StoreError::WrongExpectedVersion {
                        expected,
                        actual: head,
                    })
                }
            }
        }
    }

    /// Refuses, with [`StoreError::Unavailable`], to send a batch that [`batch_guard`] rejects.
    fn guard_batch(&self, stream: &StreamId, noted: &Noted) -> Result<(), StoreError> {
        let limits = Limits {
            confidence_window: self.config.confidence_window,
            request_timeout: self.config.request_timeout,
            append_deadline: self.config.append_deadline,
        };
        let age = noted.age();
        match batch_guard(noted.acked_after, age, limits) {
            Ok(()) => Ok(()),
            Err(Refusal::LateNotification) => {
                tracing::warn!(%stream, acked_after_ms = noted.acked_after.as_millis(),
                    "change-log row acknowledged late: append not sent");
                Err(StoreError::Unavailable(format!(
                    "append to {stream} not sent: its change-log row took {} ms to be \
                     acknowledged, more than half the {} ms confidence window",
                    noted.acked_after.as_millis(),
                    limits.confidence_window.as_millis()
                )))
            }
            Err(Refusal::PastDeadline) => Err(StoreError::Unavailable(format!(
                "append to {stream} given up: {} ms after its change-log row, a batch could \
                 outlast the {} ms append deadline",
                age.as_millis(),
                limits.append_deadline.as_millis()
            ))),
        }
    }

    /// The head and the newest `id_window` event ids of a stream.
    pub(crate) async fn tail(&self, stream: &StreamId) -> Result<Tail, StoreError> {
        let limit = self.config.id_window.clamp(1, i32::MAX as u32) as i32;
        let values = (stream.kind.as_str(), stream.id.as_str(), 0i32, limit);
        let rows = self
            .timed(self.session().execute_unpaged(&self.stmts.tail, values))
            .await?
            .into_rows_result()
            .map_err(error::into_rows)?;
        let mut tail = Tail {
            head: 0,
            events: Vec::with_capacity(rows.rows_num()),
        };
        for row in rows.rows::<TailRow>().map_err(error::rows)? {
            let (head, version, id, at, first, last) = row.map_err(error::deserialize)?;
            tail.head = head.unwrap_or(0).max(0) as u64;
            if let (Some(version), Some(id)) = (version, id) {
                tail.events.push(TailEvent {
                    version: version.max(0) as u64,
                    id,
                    recorded_at: at.unwrap_or_default(),
                    append: append_bounds(first, last),
                });
            }
        }
        self.tails.store(stream, &tail);
        Ok(tail)
    }

    async fn conditional_batch(
        &self,
        stream: &StreamId,
        base: u64,
        events: &[NewEvent],
        newest: Option<i64>,
    ) -> Result<Cas, StoreError> {
        let n = events.len() as u64;
        let new_head = to_i64(base + n)?;
        let (append_first, append_last) = (to_i64(base + 1)?, new_head);
        let recorded_at = commit_time(crate::now_us(), newest);
        let (kind, id) = (stream.kind.as_str(), stream.id.as_str());
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_serial_consistency(Some(self.config.serial_consistency.driver()));
        let mut values = Vec::with_capacity(events.len() + 1);
        if base == 0 {
            batch.append_statement(self.stmts.head_first.clone());
            values.push(BatchRow::First((
                new_head,
                recorded_at,
                recorded_at,
                kind,
                id,
                0,
            )));
        } else {
            batch.append_statement(self.stmts.head_next.clone());
            values.push(BatchRow::Next((
                new_head,
                recorded_at,
                kind,
                id,
                0,
                to_i64(base)?,
            )));
        }
        for (i, event) in events.iter().enumerate() {
            batch.append_statement(self.stmts.insert_event.clone());
            values.push(BatchRow::Event((
                kind,
                id,
                0,
                to_i64(base + 1 + i as u64)?,
                event.event_id,
                event.event_type.as_str(),
                i32::try_from(event.schema_version).unwrap_or(i32::MAX),
                event.content_type.as_str(),
                event.data.as_slice(),
                &event.metadata,
                recorded_at,
                append_first,
                append_last,
            )));
        }
        let sent = tokio::time::timeout(
            self.config.request_timeout,
            self.session().batch(&batch, values),
        )
        .await;
        let result = match sent {
            Ok(Ok(result)) => result,
            Ok(Err(e)) if error::may_have_applied(&e) => {
                return Ok(Cas::Unknown(error::execution(e)))
            }
            Ok(Err(e)) => return Err(error::execution(e)),
            Err(_) => {
                return Ok(Cas::Unknown(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    self.config.request_timeout.as_millis()
                ))))
            }
        };
        Ok(match cas_outcome(result)? {
            None => Cas::Applied(recorded_at),
            Some(head) => Cas::Lost { head },
        })
    }

    /// After the head moved under an append: whether the append is in fact already recorded
    /// (a repeat of one that committed), or reuses ids. `None`: a plain conflict.
    async fn after_lost_race(
        &self,
        stream: &StreamId,
        base: u64,
        events: &[NewEvent],
        head: u64,
    ) -> Result<Option<Result<AppendResult, StoreError>>, StoreError> {
        let n = events.len() as u64;
        if head >= base + n {
            let rows = self.events_serial(stream, base + 1, base + n).await?;
            let ours = rows.len() == events.len()
                && rows
                    .iter()
                    .zip(events)
                    .all(|((r, _), e)| r.event_id == e.event_id);
            if ours {
                let known: Vec<Option<Known>> = rows
                    .iter()
                    .map(|(r, append)| {
                        Some(Known {
                            version: r.version,
                            append: *append,
                        })
                    })
                    .collect();
                let stored: Vec<RecordedEvent> = rows.into_iter().map(|(r, _)| r).collect();
                return Ok(Some(match check_ids(events, &known) {
                    IdCheck::Candidate { .. } => check_contents(events, &stored),
                    IdCheck::Reused(e) => Err(e),
                    IdCheck::New => Err(StoreError::Internal(
                        "ids read back were not recognised".into(),
                    )),
                }));
            }
        }
        if head > 0 {
            // The ids may sit elsewhere in the stream (a retry with another expectation).
            let tail = self.tail(stream).await?;
            return self.judge(stream, events, tail.check(events)).await;
        }
        Ok(None)
    }

    /// Finishes an id check: a candidate repeat is compared with the stored events.
    async fn judge(
        &self,
        stream: &StreamId,
        events: &[NewEvent],
        check: IdCheck,
    ) -> Result<Option<Result<AppendResult, StoreError>>, StoreError> {
        match check {
            IdCheck::New => Ok(None),
            IdCheck::Reused(e) => Ok(Some(Err(e))),
            IdCheck::Candidate { first_version } => {
                let last = first_version + events.len() as u64 - 1;
                let stored: Vec<RecordedEvent> = self
                    .events_serial(stream, first_version, last)
                    .await?
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect();
                Ok(Some(check_contents(events, &stored)))
            }
        }
    }

    /// Learns, by linearizable reads, what became of a batch that got no answer: the serial
    /// read of the head completes a Paxos round still in flight or makes it fail, so what it
    /// reads is final. Read failures are retried until `deadline`; after it the append's
    /// outcome is reported as unknown.
    async fn resolve(
        &self,
        stream: &StreamId,
        base: u64,
        events: &[NewEvent],
        (sent_at, deadline): (Instant, Instant),
        cause: &StoreError,
    ) -> Result<Resolved, StoreError> {
        tracing::warn!(%stream, %cause, "append batch got no answer: reading back its outcome");
        // A head still at `base` is final only once the coordinator has given up on its Paxos
        // round (a serial read merely pre-empts it; the coordinator may propose again and
        // commit). The deployment rule is that the database gives up on writes within the
        // request timeout, so after that the batch can no longer apply.
        let settled = sent_at + self.config.request_timeout + SETTLE_MARGIN;
        let mut pause = Duration::from_millis(100);
        loop {
            let attempt = async {
                let head = self.head_serial(stream).await?;
                if head == base {
                    let now = Instant::now();
                    if now >= settled {
                        return Ok(Some(Resolved::NotApplied));
                    }
                    if settled + self.config.request_timeout >= deadline {
                        return Err(StoreError::OutcomeUnknown(format!(
                            "append to {stream}: {cause}; its Paxos round may still commit and \
                             there is no time left to wait for it"
                        )));
                    }
                    return Ok(None); // wait for the round to settle, then read again
                }
                Ok(Some(
                    match self.after_lost_race(stream, base, events, head).await? {
                        Some(outcome) => Resolved::Outcome(outcome),
                        None => Resolved::Lost { head },
                    },
                ))
            };
            match attempt.await {
                Ok(Some(resolved)) => return Ok(resolved),
                Ok(None) => tokio::time::sleep_until(settled.into()).await,
                Err(StoreError::Unavailable(e)) => {
                    if Instant::now() + pause + self.config.request_timeout >= deadline {
                        return Err(StoreError::OutcomeUnknown(format!(
                            "append to {stream}: {cause}; reading it back failed: {e}"
                        )));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The stream's head, read linearizably.
    async fn head_serial(&self, stream: &StreamId) -> Result<u64, StoreError> {
        let values = (stream.kind.as_str(), stream.id.as_str(), 0i32);
        let rows = self
            .timed(
                self.session()
                    .execute_unpaged(&self.stmts.head_serial, values),
            )
            .await?
            .into_rows_result()
            .map_err(error::into_rows)?;
        let head = rows
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(|e| StoreError::Internal(format!("unexpected head row: {e}")))?
            .and_then(|(head,)| head);
        Ok(head.unwrap_or(0).max(0) as u64)
    }

    /// The events at versions `from..=to`, read linearizably, with their append bounds.
    async fn events_serial(
        &self,
        stream: &StreamId,
        from: u64,
        to: u64,
    ) -> Result<Vec<(RecordedEvent, Option<(u64, u64)>)>, StoreError> {
        let values = (
            stream.kind.as_str(),
            stream.id.as_str(),
            0i32,
            to_i64(from)?,
            to_i64(to)?,
        );
        let rows = self
            .timed(
                self.session()
                    .execute_unpaged(&self.stmts.events_serial, values),
            )
            .await?
            .into_rows_result()
            .map_err(error::into_rows)?;
        let mut out = Vec::with_capacity(rows.rows_num());
        for row in rows.rows::<SerialRow>().map_err(error::rows)? {
            let (
                version,
                event_id,
                event_type,
                schema_version,
                content_type,
                data,
                metadata,
                recorded_at_us,
                first,
                last,
            ) = row.map_err(error::deserialize)?;
            let event = RecordedEvent {
                stream: stream.clone(),
                version: version.max(0) as u64,
                event_id,
                event_type,
                schema_version: schema_version.max(0) as u32,
                content_type,
                data: data.unwrap_or_default(),
                metadata: metadata.unwrap_or_default(),
                recorded_at_us,
            };
            out.push((event, append_bounds(first, last)));
        }
        Ok(out)
    }
}

/// One row of the tail read: head, version, event id, recorded at, append bounds.
type TailRow = (
    Option<i64>,
    Option<i64>,
    Option<Uuid>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// One row of [`super::statements::Statements::events_serial`].
type SerialRow = (
    i64,
    Uuid,
    String,
    i32,
    String,
    Option<Vec<u8>>,
    Option<BTreeMap<String, String>>,
    i64,
    Option<i64>,
    Option<i64>,
);

fn append_bounds(first: Option<i64>, last: Option<i64>) -> Option<(u64, u64)> {
    match (first, last) {
        (Some(first), Some(last)) => Some((first.max(0) as u64, last.max(0) as u64)),
        _ => None,
    }
}

/// Reads an LWT result as an untyped row: `None` if applied, else the current head. Scylla
/// returns `[applied]` plus the current values of the conditioned columns (null for a missing
/// partition) whatever the outcome, possibly one row per statement; Cassandra returns only
/// `[applied]` on success, and on failure the current values of an existing partition.
fn cas_outcome(result: QueryResult) -> Result<Option<u64>, StoreError> {
    let rows = result.into_rows_result().map_err(error::into_rows)?;
    let specs = rows.column_specs();
    let applied_at = specs
        .get_by_name("[applied]")
        .map(|(i, _)| i)
        .ok_or_else(|| StoreError::Internal("LWT result without an [applied] column".into()))?;
    let head_at = specs.get_by_name("head").map(|(i, _)| i);
    let mut applied = None;
    let mut head = 0u64;
    for row in rows.rows::<Row>().map_err(error::rows)? {
        let row = row.map_err(error::deserialize)?;
        if applied.is_none() {
            applied = row.columns.get(applied_at).and_then(|v| match v {
                Some(CqlValue::Boolean(b)) => Some(*b),
                _ => None,
            });
        }
        if let Some(Some(CqlValue::BigInt(h))) = head_at.and_then(|i| row.columns.get(i)) {
            head = head.max((*h).max(0) as u64);
        }
    }
    match applied {
        Some(true) => Ok(None),
        Some(false) => Ok(Some(head)),
        None => Err(StoreError::Internal(
            "LWT result without an [applied] value".into(),
        )),
    }
}

/// Pause before retrying an `Any` append that lost a race: grows with the attempt, with
/// jitter so that racers spread out.
fn backoff(attempt: u32) -> Duration {
    let cap_us = 1_000u64 << attempt.min(6);
    let jitter = (crate::now_us() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    Duration::from_micros(500 + jitter % cap_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u128) -> NewEvent {
        NewEvent {
            event_id: Uuid::from_u128(id),
            event_type: "E".into(),
            schema_version: 1,
            content_type: "application/octet-stream".into(),
            data: vec![],
            metadata: BTreeMap::new(),
        }
    }

    fn tail() -> Tail {
        // Versions 1..=4 hold ids 11..=14; versions 3 and 4 were one append at time 300.
        let e = |version, id, recorded_at, append| TailEvent {
            version,
            id: Uuid::from_u128(id),
            recorded_at,
            append: Some(append),
        };
        Tail {
            head: 4,
            events: vec![
                e(4, 14, 300, (3, 4)),
                e(3, 13, 300, (3, 4)),
                e(2, 12, 200, (2, 2)),
                e(1, 11, 100, (1, 1)),
            ],
        }
    }

    #[test]
    fn a_whole_earlier_append_is_a_candidate_repeat() {
        assert_eq!(
            tail().check(&[event(13), event(14)]),
            IdCheck::Candidate { first_version: 3 }
        );
        assert_eq!(tail().check(&[event(98), event(99)]), IdCheck::New);
    }

    #[test]
    fn reused_ids_are_refused() {
        let reused = |events: &[NewEvent]| match tail().check(events) {
            IdCheck::Reused(StoreError::EventIdReused { index, version, .. }) => (index, version),
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(reused(&[event(13), event(99)]), (0, 3));
        // Past the head, a prefix, a suffix, two appends together.
        assert_eq!(reused(&[event(14), event(15)]), (0, 4));
        assert_eq!(reused(&[event(13)]), (0, 3));
        assert_eq!(reused(&[event(14)]), (0, 4));
        assert_eq!(reused(&[event(12), event(13), event(14)]), (0, 2));
        // A later event of the append reuses an id.
        assert_eq!(reused(&[event(98), event(12)]), (1, 2));
    }

    #[test]
    fn expected_versions_beyond_bigint_are_conflicts() {
        let big = 1u64 << 63;
        assert!(beyond_bigint(ExpectedVersion::Exact(big), 1));
        assert!(beyond_bigint(ExpectedVersion::Exact(u64::MAX), 1));
        assert!(beyond_bigint(ExpectedVersion::Exact(big - 1), 1));
        assert!(!beyond_bigint(ExpectedVersion::Exact(big - 2), 1));
        assert!(!beyond_bigint(ExpectedVersion::Any, 500));
    }

    fn limits() -> Limits {
        Limits {
            confidence_window: Duration::from_millis(1000),
            request_timeout: Duration::from_millis(2000),
            append_deadline: Duration::from_millis(6000),
        }
    }

    #[test]
    fn a_prompt_notification_lets_the_batch_go() {
        let ms = Duration::from_millis;
        assert_eq!(batch_guard(ms(0), ms(0), limits()), Ok(()));
        assert_eq!(
            batch_guard(ms(500), ms(500), limits()),
            Ok(()),
            "exactly half the window"
        );
        // The id check beside the notification may take longer than the notification itself.
        assert_eq!(batch_guard(ms(20), ms(1900), limits()), Ok(()));
    }

    #[test]
    fn a_late_notification_stops_the_batch() {
        let ms = Duration::from_millis;
        assert_eq!(
            batch_guard(ms(501), ms(501), limits()),
            Err(Refusal::LateNotification)
        );
        assert_eq!(
            batch_guard(Duration::from_micros(500_001), ms(600), limits()),
            Err(Refusal::LateNotification)
        );
        // Lateness is judged first: it is the reason to report even past the deadline.
        assert_eq!(
            batch_guard(ms(5000), ms(5000), limits()),
            Err(Refusal::LateNotification)
        );
    }

    #[test]
    fn no_batch_may_outlast_the_append_deadline() {
        let ms = Duration::from_millis;
        // age + request_timeout + half the confidence window must stay below the deadline.
        assert_eq!(batch_guard(ms(10), ms(3499), limits()), Ok(()));
        assert_eq!(
            batch_guard(ms(10), ms(3500), limits()),
            Err(Refusal::PastDeadline)
        );
        assert_eq!(
            batch_guard(ms(10), ms(60_000), limits()),
            Err(Refusal::PastDeadline)
        );
    }

    #[test]
    fn commit_times_never_go_back_within_a_stream() {
        assert_eq!(commit_time(1_000, None), 1_000);
        assert_eq!(commit_time(1_000, Some(900)), 1_000);
        // Another writer's clock ran ahead: this append takes its time, not an earlier one.
        assert_eq!(commit_time(1_000, Some(5_000)), 5_000);
        assert_eq!(tail().newest_recorded_at(), Some(300));
        let empty = Tail {
            head: 0,
            events: vec![],
        };
        assert_eq!(empty.newest_recorded_at(), None);
    }

    fn ids(cache: &TailCache, s: &StreamId) -> Option<(u64, Vec<u64>)> {
        let state = cache.state();
        let t = state.tails.get(s)?;
        Some((t.head, t.events.iter().map(|e| e.version).collect()))
    }

    #[test]
    fn the_tail_cache_follows_its_own_appends_and_keeps_the_window() {
        let cache = TailCache::new(1_000);
        let s = StreamId::new("cart", "c-1").expect("id");
        assert!(cache.lookup(&s, &[event(1)]).is_none());
        // A new stream: the batch alone is the window.
        cache.applied(&s, 0, &[event(1), event(2)], 100, 3);
        assert_eq!(ids(&cache, &s), Some((2, vec![2, 1])));
        let known = cache.lookup(&s, &[event(1), event(2)]).expect("cached");
        assert_eq!(known.head, 2);
        assert_eq!(known.check, IdCheck::Candidate { first_version: 1 });
        assert_eq!(known.newest, Some(100));
        // Appends at the cached head extend it; the window keeps the newest 3.
        cache.applied(&s, 2, &[event(3), event(4)], 200, 3);
        assert_eq!(ids(&cache, &s), Some((4, vec![4, 3, 2])));
        assert_eq!(
            cache.lookup(&s, &[event(9)]).expect("cached").check,
            IdCheck::New
        );
        // A batch somewhere else than the cached head: the window is unknown, dropped.
        cache.applied(&s, 7, &[event(8)], 300, 3);
        assert_eq!(ids(&cache, &s), None);
        // ...unless the batch alone fills the window.
        cache.applied(&s, 7, &[event(8), event(9), event(10)], 300, 3);
        assert_eq!(ids(&cache, &s), Some((10, vec![10, 9, 8])));
        cache.forget(&s);
        assert!(cache.lookup(&s, &[event(1)]).is_none());
    }

    #[test]
    fn the_tail_cache_keeps_the_newest_read_and_stays_bounded() {
        let cache = TailCache::new(10);
        let s = StreamId::new("cart", "c-1").expect("id");
        cache.store(&s, &tail());
        assert_eq!(ids(&cache, &s), Some((4, vec![4, 3, 2, 1])));
        // An older read (a slow reply) does not replace a newer picture.
        let older = Tail {
            head: 2,
            events: tail().events[2..].to_vec(),
        };
        cache.store(&s, &older);
        assert_eq!(ids(&cache, &s).map(|(h, _)| h), Some(4));
        // Streams with no events are not remembered.
        let empty = StreamId::new("cart", "empty").expect("id");
        cache.store(
            &empty,
            &Tail {
                head: 0,
                events: vec![],
            },
        );
        assert!(ids(&cache, &empty).is_none());
        for i in 0..50 {
            let other = StreamId::new("cart", format!("o-{i}")).expect("id");
            cache.applied(&other, 0, &[event(1000 + i), event(2000 + i)], 1, 100);
            let state = cache.state();
            assert!(state.events <= 10, "{} events cached", state.events);
            let counted: usize = state.tails.values().map(|t| t.events.len()).sum();
            assert_eq!(counted, state.events);
        }
    }

    #[tokio::test]
    async fn appends_to_one_stream_take_turns_and_leave_nothing_behind() {
        let turns = Arc::new(Turns::default());
        let s = StreamId::new("cart", "c-1").expect("id");
        let first = turns.take(&s).await;
        let (t2, s2) = (Arc::clone(&turns), s.clone());
        let mut second = tokio::spawn(async move {
            let _turn = t2.take(&s2).await;
        });
        // The second waits while the first holds the turn (bounded check, no timing assert).
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "two appends to one stream at once"
        );
        let other = turns.take(&StreamId::new("cart", "c-2").expect("id")).await;
        drop(other);
        drop(first);
        second.await.expect("second turn");
        assert_eq!(turns.len(), 0, "no entry outlives its last user");
        // A waiter that gives up leaves nothing behind either.
        let held = turns.take(&s).await;
        let (t3, s3) = (Arc::clone(&turns), s.clone());
        let waiter = tokio::spawn(async move {
            let _turn = t3.take(&s3).await;
        });
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        assert_eq!(turns.len(), 0);
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 1..100 {
            assert!(backoff(attempt) <= Duration::from_micros(500 + 64_000));
        }
    }
}
