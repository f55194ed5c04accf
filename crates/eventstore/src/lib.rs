//! The esq event store: the [`EventStore`] and [`ChangeFeed`] traits the services are written
//! against, and their adapters — [`embedded`] (redb, for `esq dev` and tests) and, in the
//! distributed setup, CQL (ScyllaDB or Apache Cassandra).
//!
//! The store is the single source of truth. It is append-only: nothing here updates or deletes
//! an event. Adapters translate driver errors into [`StoreError`] at this boundary, so services
//! never see a driver type.

pub mod contract;
pub mod cql;
pub mod embedded;
pub mod history;
mod repeat;
pub mod snapshots;

pub use snapshots::{Snapshot, Snapshots};

use esq_domain::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId, StreamInfo};
use std::future::Future;
use std::time::Duration;

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency: the stream is not at the expected version.
    #[error("wrong expected version: expected {expected}, actual {actual}")]
    WrongExpectedVersion {
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's current version.
        actual: u64,
    },
    /// An event id of the append is already stored in the stream, but the append is not an
    /// exact repeat of the append that stored it (see [`EventStore::append`]): a partial retry,
    /// other contents under the same ids, or a client reusing an id for another event.
    #[error(
        "events[{index}]: event id {event_id} is already recorded in this stream at version \
         {version}, by another append; a retry must repeat the original append exactly (same \
         events, same order, same contents)"
    )]
    EventIdReused {
        /// Position of the offending event in the append.
        index: usize,
        /// The reused id.
        event_id: uuid::Uuid,
        /// Where it is recorded.
        version: u64,
    },
    /// The append was sent but its outcome could not be learnt (a timeout or a broken
    /// connection while the write was in flight, and the stream could not be read back in
    /// time): it may or may not have committed. Retrying with the same event ids is safe — a
    /// committed original is then reported as such, see [`EventStore::append`].
    #[error(
        "append outcome unknown: it may have committed; retrying with the same event ids is \
         safe ({0})"
    )]
    OutcomeUnknown(String),
    /// The backing store cannot be reached or did not answer in time.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// Anything else; the text is for logs, not for clients.
    #[error("event store internal error: {0}")]
    Internal(String),
    /// A fold of a stream met an event its projection cannot apply (it does not decode, its
    /// type is unknown, its upcaster fails): nothing can be decided on that fold until the
    /// event is dealt with. Names the stream and the version.
    #[error(transparent)]
    Unprojectable(#[from] esq_domain::projection::Unprojectable),
}

/// Direction of a stream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Ascending versions.
    #[default]
    Forwards,
    /// Descending versions.
    Backwards,
}

/// One page of a stream read.
///
/// `until_version` and `until_time_us` describe the stream *as of* a point: only events with
/// `version <= until_version` and `recorded_at_us <= until_time_us` are visible, whichever the
/// direction. That is what temporal queries are built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    /// Ascending or descending.
    pub direction: Direction,
    /// First version to return: forwards, the lowest (default 1); backwards, the highest
    /// (default: the newest visible event).
    pub from_version: Option<u64>,
    /// At most this many events (adapters may return fewer; 0 returns none).
    pub limit: u32,
    /// Only events with a version at or below this are visible.
    pub until_version: Option<u64>,
    /// Only events recorded at or before this time (µs since the Unix epoch) are visible.
    pub until_time_us: Option<i64>,
}

impl ReadRequest {
    /// Reads forwards from `from` (inclusive), at most `limit` events.
    pub fn forwards(from: u64, limit: u32) -> Self {
        Self {
            direction: Direction::Forwards,
            from_version: Some(from),
            limit,
            until_version: None,
            until_time_us: None,
        }
    }
}

/// A page of stream ids, for rebuilds that walk every stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamPage {
    /// The streams of this page.
    pub streams: Vec<StreamId>,
    /// Cursor for the next page; `None` when this was the last one.
    pub next: Option<String>,
}

/// The append-only, per-stream-ordered event store.
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` (already validated) atomically if `expected` admits the stream's
    /// version.
    ///
    /// Idempotency, the same on every adapter: an append is a *repeat* when its events are,
    /// in order, exactly the events of one earlier append of this stream — every id found, at
    /// consecutive versions, that earlier append having had exactly these events, each with
    /// the same type, schema version, content type, data and metadata. A repeat stores nothing
    /// and returns the original result, whatever its expected version (the stream may have
    /// moved on because of the original). Anything else that carries an id already in the
    /// stream — a prefix or a suffix of an earlier append, the same ids with other contents,
    /// known ids mixed with new ones — fails with [`StoreError::EventIdReused`] naming the
    /// first offending event, and writes nothing. The id check comes before the version
    /// check.
    ///
    /// An expected version no stream can have (e.g. `exact` ≥ 2^63 on a store whose versions
    /// are signed 64-bit) is a [`StoreError::WrongExpectedVersion`] like any other.
    ///
    /// Adapters may bound how far back a repeat is recognised (the CQL adapter looks at the
    /// stream's newest `id_window` events, and at the expected positions of an `exact` append).
    ///
    /// An append whose outcome cannot be learnt in time fails with
    /// [`StoreError::OutcomeUnknown`]; every other error means nothing was appended.
    fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> impl Future<Output = Result<AppendResult, StoreError>> + Send;

    /// Reads one page of a stream. A stream that does not exist reads as empty.
    fn read(
        &self,
        stream: &StreamId,
        request: ReadRequest,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send;

    /// The stream's summary, or `None` if it holds no events.
    fn stream_info(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<StreamInfo>, StoreError>> + Send;

    /// One page of all stream ids, in an adapter-defined but stable order.
    fn list_streams(
        &self,
        cursor: Option<String>,
        limit: u32,
    ) -> impl Future<Output = Result<StreamPage, StoreError>> + Send;

    /// Whether the store can serve now, for health checks. An adapter whose driver reports
    /// outages per request (and reconnects by itself) keeps the default, always `Ok`; one that
    /// can be left broken by an error (the embedded store after an I/O error) says so here, and
    /// may use the call to recover.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }
}

/// A notification that a stream changed up to a version. Duplicates, late arrivals and
/// notifications of appends that never committed are all possible: consumers fence by version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The stream that changed.
    pub stream: StreamId,
    /// First version of the append.
    pub first_version: u64,
    /// Last version of the append.
    pub last_version: u64,
    /// When the notification was written, µs since the Unix epoch. A notification whose events
    /// are not in the store once the append deadline has passed since then is an orphan.
    pub noted_at_us: i64,
}

/// One page of a change-feed shard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangePage {
    /// Changes after the checkpoint, in feed order.
    pub changes: Vec<Change>,
    /// Checkpoint to resume from after `changes` (each change's position, in order); the
    /// caller saves the position of the last change it has fully processed.
    pub positions: Vec<String>,
}

/// The ordered log of changes the projector tails.
pub trait ChangeFeed: Send + Sync + 'static {
    /// Number of shards; each is tailed independently and has its own checkpoint.
    fn shard_count(&self) -> u32;

    /// The shard whose changes carry `stream` (stable for the life of the store's layout).
    fn shard_of(&self, stream: &StreamId) -> u32 {
        let _ = stream;
        0
    }

    /// Changes of `shard` after the position `after` (from the start when `None`), at most
    /// `limit`. `positions[i]` is the position of `changes[i]`, to be saved as the checkpoint
    /// once that change is processed.
    fn poll(
        &self,
        shard: u32,
        after: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<ChangePage, StoreError>> + Send;

    /// How long after its notification an append may still commit: a change whose events are
    /// not in the store this long after it was noted is an orphan ([`is_orphan`]). Zero for a
    /// feed whose entries are written in the same transaction as the events.
    fn append_deadline(&self) -> Duration {
        Duration::ZERO
    }

    /// How far behind now a poll reads: a change noted at `t` is returned by polls made after
    /// `t` plus this lag. Zero for a feed written in commit order.
    fn visibility_lag(&self) -> Duration {
        Duration::ZERO
    }

    /// How long changes stay in the feed; `None` when they never expire. A reader whose
    /// position is older than this has missed changes.
    fn retention(&self) -> Option<Duration> {
        None
    }

    /// Whether positions are durable and may be held by any number of readers at once (the
    /// event bus hands them to clients). A feed whose positions are per-process
    /// acknowledgements says no.
    fn shared_positions(&self) -> bool {
        true
    }

    /// A position of `shard` before every change whose append may commit at or after `time_us`
    /// (µs since the Unix epoch), and after as few older ones as the feed can tell; `None`
    /// means the start of the shard. What "subscribe from now" starts from.
    fn position_before(
        &self,
        shard: u32,
        time_us: i64,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
}

/// Whether `change`, whose events were found missing from the store at `checked_at_us` (taken
/// *before* the store was read), belongs to an append that never committed: it was noted more
/// than `append_deadline` before. Every reader of a change feed judges orphans by this rule.
pub fn is_orphan(change: &Change, checked_at_us: i64, append_deadline: Duration) -> bool {
    let age_us = checked_at_us.saturating_sub(change.noted_at_us);
    age_us > append_deadline.as_micros() as i64
}

/// Current time in µs since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Most payload bytes (data and metadata) a nudge carries; a larger append's nudge names only
/// its stream and version.
pub const NUDGE_CARRY_BYTES: usize = 16 * 1024;

/// Most nudges carrying events that a queue of nudges (write-svc's publisher, the projector's
/// subscriber) holds: past it, nudges are queued plain, so that a slow consumer costs at most
/// this many carried appends of memory (a few MiB), not the queue's length of them.
pub const NUDGE_CARRIED_QUEUED: usize = 256;

/// Whether a nudge queued now may carry its events: the queue of `max` slots has `free` left.
pub fn nudge_may_carry(free: usize, max: usize) -> bool {
    max.saturating_sub(free) < NUDGE_CARRIED_QUEUED
}

/// A fast-path nudge: `stream` reached `version`. `events`, when not empty, are the events of
/// the append that got it there (contiguous, ending at `version`), carried so that a projector
/// need not read them back from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NudgeMessage {
    /// The stream appended to.
    pub stream: StreamId,
    /// Its version after the append.
    pub version: u64,
    /// The append's events as recorded, or none.
    pub events: Vec<RecordedEvent>,
}

/// The payload of a fast-path nudge for an append of `events` to `stream`: `kind/id@version`,
/// then — when the events' payloads total at most [`NUDGE_CARRY_BYTES`] — a space and the
/// recorded events ([`AppendResult::recorded`]) in postcard, hex-encoded (pub/sub payloads are
/// handled as text; a stream id never holds a space).
pub fn nudge_message(stream: &StreamId, result: &AppendResult, events: &[NewEvent]) -> String {
    let mut message = format!("{}/{}@{}", stream.kind, stream.id, result.last_version);
    let size: usize = events.iter().map(NewEvent::payload_bytes).sum();
    if !events.is_empty() && size <= NUDGE_CARRY_BYTES {
        if let Ok(bytes) = postcard::to_allocvec(&result.recorded(stream, events)) {
            message.reserve(1 + 2 * bytes.len());
            message.push(' ');
            for b in bytes {
                message.push(char::from(HEX[usize::from(b >> 4)]));
                message.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
    }
    message
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Parses a nudge payload written by [`nudge_message`]; `None` if it is not one. Carried
/// events that do not decode, or are not of the stream, contiguous and ending at the version,
/// are dropped: the nudge then only names the stream, as a plain one does.
pub fn parse_nudge(message: &str) -> Option<NudgeMessage> {
    let (head, carried) = match message.split_once(' ') {
        Some((head, carried)) => (head, Some(carried)),
        None => (message, None),
    };
    let (key, version) = head.rsplit_once('@')?;
    let (kind, id) = key.split_once('/')?;
    let stream = StreamId::new(kind, id).ok()?;
    let version = version.parse().ok()?;
    let events = carried
        .and_then(unhex)
        .and_then(|bytes| postcard::from_bytes::<Vec<RecordedEvent>>(&bytes).ok())
        .filter(|events| {
            let contiguous = events.windows(2).all(|w| w[1].version == w[0].version + 1);
            contiguous
                && events.last().is_some_and(|e| e.version == version)
                && events.iter().all(|e| e.stream == stream && e.version > 0)
        })
        .unwrap_or_default();
    Some(NudgeMessage {
        stream,
        version,
        events,
    })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod nudge_tests {
    use super::*;

    fn appended(first: u64, n: usize, bytes: usize) -> (AppendResult, Vec<NewEvent>) {
        let events: Vec<NewEvent> = (0..n)
            .map(|i| {
                let mut e = NewEvent::json("ItemAdded", 2, &serde_json::json!({ "n": i }));
                e.data.resize(e.data.len().max(bytes), b' ');
                e.metadata.insert("correlation".into(), format!("c-{i}"));
                e
            })
            .collect();
        let result = AppendResult {
            first_version: first,
            last_version: first + n as u64 - 1,
            committed_at_us: 1_764_000_000_000_000,
        };
        (result, events)
    }

    #[test]
    fn nudges_round_trip_with_their_events() {
        let s = StreamId::new("cart", "a@b:c").expect("valid");
        let (result, events) = appended(41, 2, 0);
        let message = nudge_message(&s, &result, &events);
        let parsed = parse_nudge(&message).expect("parses");
        assert_eq!(parsed.stream, s);
        assert_eq!(parsed.version, 42);
        assert_eq!(parsed.events, result.recorded(&s, &events));
        // Without events (or from an older writer): the stream and version only.
        let plain = parse_nudge(&nudge_message(&s, &result, &[])).expect("parses");
        assert_eq!((plain.version, plain.events.len()), (42, 0));
        assert_eq!(parse_nudge("cart/x@7").map(|n| n.version), Some(7));
        assert_eq!(parse_nudge("garbage"), None);
        assert_eq!(parse_nudge("cart/x@notanumber"), None);
    }

    #[test]
    fn only_the_head_of_a_nudge_queue_carries_events() {
        assert!(nudge_may_carry(4096, 4096));
        assert!(nudge_may_carry(4096 - NUDGE_CARRIED_QUEUED + 1, 4096));
        assert!(!nudge_may_carry(4096 - NUDGE_CARRIED_QUEUED, 4096));
        assert!(!nudge_may_carry(0, 4096));
    }

    #[test]
    fn large_appends_are_nudged_without_their_events() {
        let s = StreamId::new("cart", "big").expect("valid");
        let (result, events) = appended(1, 2, NUDGE_CARRY_BYTES / 2 + 1);
        let message = nudge_message(&s, &result, &events);
        assert_eq!(message, "cart/big@2");
        let (result, events) = appended(1, 2, NUDGE_CARRY_BYTES / 4);
        assert_eq!(
            parse_nudge(&nudge_message(&s, &result, &events))
                .expect("parses")
                .events
                .len(),
            2
        );
    }

    #[test]
    fn carried_events_that_do_not_fit_the_nudge_are_dropped() {
        let s = StreamId::new("cart", "c-1").expect("valid");
        let other = StreamId::new("cart", "c-2").expect("valid");
        let (result, events) = appended(5, 3, 0);
        let carried = |stream: &StreamId, recorded: Vec<RecordedEvent>, version: u64| {
            let bytes = postcard::to_allocvec(&recorded).expect("encodes");
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            parse_nudge(&format!("{}/{}@{version} {hex}", stream.kind, stream.id)).expect("parses")
        };
        let good = result.recorded(&s, &events);
        assert_eq!(carried(&s, good.clone(), 7).events.len(), 3);
        // Of another stream, not ending at the version, or with a gap: the nudge stays, the
        // events go.
        assert!(carried(&s, result.recorded(&other, &events), 7)
            .events
            .is_empty());
        assert!(carried(&s, good.clone(), 8).events.is_empty());
        let mut gap = good.clone();
        gap.remove(1);
        assert!(carried(&s, gap, 7).events.is_empty());
        // Not hex, or not postcard.
        assert!(parse_nudge("cart/c-1@7 zz")
            .expect("parses")
            .events
            .is_empty());
        assert!(parse_nudge("cart/c-1@7 abc")
            .expect("parses")
            .events
            .is_empty());
        assert!(parse_nudge("cart/c-1@7 00ff")
            .expect("parses")
            .events
            .is_empty());
    }
}
