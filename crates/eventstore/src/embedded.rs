//! The embedded event store: one [redb](https://docs.rs/redb) file, for `esq dev` and tests.
//!
//! Everything an append writes — its events, the event-id index entries, the stream's summary
//! and one change-log entry — goes into a single write transaction committed with redb's default
//! (immediate, fsynced) durability. So a committed append always has its change entry, an
//! append that failed left nothing behind, and a crash loses no committed event. redb admits one
//! writer at a time, which serializes appends and makes the expected-version check race-free;
//! readers see consistent snapshots and never wait for the writer.
//!
//! redb calls block, so every call runs on tokio's blocking pool, never on an async worker.
//!
//! After an I/O error redb refuses every later operation until the database is reopened. So an
//! I/O error marks the store broken (reported as `Unavailable`, and by [`EventStore::ping`], so
//! write-svc's health says NOT_SERVING), and the next operation or ping reopens the file: once
//! the cause is gone (disk space freed, device back) the store recovers without a restart. The
//! reopen waits for every operation in flight (they hold a read lock on the database handle).
//!
//! Tables:
//! - `events`: (stream key, version) → (recorded_at µs, postcard `EventHeader`, raw data).
//!   The commit time is a column of its own so that as-of-time reads can binary-search it
//!   without decoding events, and the payload is stored as is, not through serde.
//! - `streams`: stream key → postcard `StreamMeta` (version, first and last append times).
//! - `event_ids`: (stream key, 16-byte event id) → version, for idempotent retries.
//! - `changes`: sequence number (from 1) → postcard `StoredChange`, the change feed.
//! - `meta`: `format` → on-disk format version, checked at open.
//!
//! Stream keys are [`StreamId::key`]. Commit times never decrease across the store (a clock
//! stepping back is clamped to the latest commit), so within a stream `recorded_at_us` grows
//! with the version — which is what as-of-time reads rely on.

use crate::repeat::{check_contents, check_ids, IdCheck, Known};
use crate::{
    now_us, Change, ChangeFeed, ChangePage, Direction, EventStore, ReadRequest, StoreError,
    StreamPage,
};
use esq_domain::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId, StreamInfo};
use redb::{AccessGuard, Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use uuid::Uuid;

mod snapshots;

/// Name of the database file inside the store's directory.
pub const DB_FILE_NAME: &str = "events.redb";

/// On-disk format written by this version; a file with another one is refused at open.
const FORMAT_VERSION: u64 = 1;

/// Key of the `events` table: (stream key, version).
type EventKey = (&'static str, u64);
/// Value of the `events` table: (recorded_at µs, postcard header, raw payload).
type EventRow = (i64, &'static [u8], &'static [u8]);
/// One entry of a range scan over `events`.
type EventEntry<'a> = (AccessGuard<'a, EventKey>, AccessGuard<'a, EventRow>);

/// (stream key, version) → (recorded_at µs, postcard header, raw payload).
const EVENTS: TableDefinition<EventKey, EventRow> = TableDefinition::new("events");
/// Stream key → postcard [`StreamMeta`].
const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
/// (stream key, event id bytes) → version.
const EVENT_IDS: TableDefinition<(&str, &[u8; 16]), u64> = TableDefinition::new("event_ids");
/// Sequence number → postcard [`StoredChange`].
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// Store-wide settings, e.g. `format`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Everything of a recorded event but its stream, version, commit time and payload.
#[derive(Debug, Serialize, Deserialize)]
struct EventHeader {
    event_id: Uuid,
    event_type: String,
    schema_version: u32,
    content_type: String,
    metadata: BTreeMap<String, String>,
    /// Versions of the append that wrote this event, so that a retry can be recognized as the
    /// very same append (not a prefix or a superset of it).
    append_first: u64,
    append_last: u64,
}

/// A stream's summary row.
#[derive(Debug, Serialize, Deserialize)]
struct StreamMeta {
    stream: StreamId,
    version: u64,
    created_at_us: i64,
    last_appended_at_us: i64,
}

/// A change-log entry; [`Change`] itself is not serde so the on-disk form is kept here.
#[derive(Debug, Serialize, Deserialize)]
struct StoredChange {
    stream: StreamId,
    first_version: u64,
    last_version: u64,
    noted_at_us: i64,
}

impl From<StoredChange> for Change {
    fn from(c: StoredChange) -> Self {
        Self {
            stream: c.stream,
            first_version: c.first_version,
            last_version: c.last_version,
            noted_at_us: c.noted_at_us,
        }
    }
}

/// Opens (or reopens) the database.
type Opener = Arc<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// The embedded event store and change feed. Cloning is cheap and shares the database.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// The open database; `None` only while a reopen failed. Operations hold a read lock, a
    /// reopen the write lock.
    db: Arc<tokio::sync::RwLock<Option<Database>>>,
    /// Set by an I/O error: redb must be reopened before it works again.
    broken: Arc<AtomicBool>,
    opener: Opener,
    /// Appends queue here, asynchronously, for their turn at redb's single writer: without it
    /// every waiting append would hold a blocking-pool thread parked on redb's writer lock.
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the store in the directory `path`, creating the directory and the database file
    /// ([`DB_FILE_NAME`]) if needed. Blocks on file IO: call it at startup, or from a blocking
    /// task. One process may have a given directory open only once at a time.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| {
            StoreError::Internal(format!(
                "cannot create store directory {}: {e}",
                path.display()
            ))
        })?;
        let file = path.join(DB_FILE_NAME);
        let store = Self::with_opener(Arc::new(move || {
            Database::create(&file).map_err(|e| {
                let cause = format!("cannot open event store {}: {e}", file.display());
                match e {
                    redb::DatabaseError::Storage(redb::StorageError::Io(_)) => {
                        StoreError::Unavailable(cause)
                    }
                    _ => StoreError::Internal(cause),
                }
            })
        }))?;
        tracing::info!(path = %path.display(), "opened embedded event store");
        Ok(store)
    }

    /// A store over what `opener` opens (and reopens after an I/O error).
    fn with_opener(opener: Opener) -> Result<Self, StoreError> {
        let db = opener()?;
        init_tables(&db)?;
        Ok(Self {
            db: Arc::new(tokio::sync::RwLock::new(Some(db))),
            broken: Arc::new(AtomicBool::new(false)),
            opener,
            writer: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Runs `f` against the database on the blocking pool, reopening it first if an I/O error
    /// left it broken, and marking it broken if `f` meets one.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        if self.broken.load(Ordering::Acquire) {
            self.reopen().await?;
        }
        let db = Arc::clone(&self.db).read_owned().await;
        let result = tokio::task::spawn_blocking(move || match db.as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Unavailable(
                "the event store could not be reopened".into(),
            )),
        })
        .await
        .map_err(|e| StoreError::Internal(format!("embedded store task failed: {e}")))?;
        if let Err(StoreError::Unavailable(cause) | StoreError::OutcomeUnknown(cause)) = &result {
            if !self.broken.swap(true, Ordering::AcqRel) {
                tracing::error!(%cause, "embedded event store I/O error: reopening on next use");
            }
        }
        result
    }

    /// Reopens the database if it is still broken, once every operation in flight is done.
    async fn reopen(&self) -> Result<(), StoreError> {
        let mut db = Arc::clone(&self.db).write_owned().await;
        if !self.broken.load(Ordering::Acquire) {
            return Ok(()); // another caller reopened it while we waited
        }
        let opener = Arc::clone(&self.opener);
        let broken = Arc::clone(&self.broken);
        tokio::task::spawn_blocking(move || {
            // The old handle holds the file lock: close it before opening again.
            *db = None;
            let fresh = opener()?;
            init_tables(&fresh)?;
            *db = Some(fresh);
            broken.store(false, Ordering::Release);
            tracing::info!("embedded event store reopened after an I/O error");
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Internal(format!("embedded store task failed: {e}")))?
    }
}

/// Creates the tables so that readers never meet a missing one, and checks the format.
fn init_tables(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    {
        txn.open_table(EVENTS).map_err(db_err)?;
        txn.open_table(STREAMS).map_err(db_err)?;
        txn.open_table(EVENT_IDS).map_err(db_err)?;
        txn.open_table(CHANGES).map_err(db_err)?;
        let mut meta = txn.open_table(META).map_err(db_err)?;
        let format = meta.get("format").map_err(db_err)?.map(|g| g.value());
        match format {
            None => {
                meta.insert("format", FORMAT_VERSION).map_err(db_err)?;
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Internal(format!(
                    "event store file has format {other}, this build reads format {FORMAT_VERSION}"
                )))
            }
        }
    }
    txn.commit().map_err(db_err)
}

/// A redb failure, as the boundary reports it: I/O errors are `Unavailable` (the store reopens
/// the database and may work again), everything else `Internal`.
fn db_err(e: impl Into<redb::Error>) -> StoreError {
    let e = e.into();
    match e {
        redb::Error::Io(_) | redb::Error::PreviousIo => {
            StoreError::Unavailable(format!("redb I/O: {e}"))
        }
        _ => StoreError::Internal(format!("redb: {e}")),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value)
        .map_err(|e| StoreError::Internal(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Internal(format!("corrupt record: {e}")))
}

fn read_meta(
    streams: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<StreamMeta>, StoreError> {
    streams
        .get(key)
        .map_err(db_err)?
        .map(|g| decode(g.value()))
        .transpose()
}

/// What an append has to do once the existing records have been checked.
enum Plan {
    /// The batch is a retry of an append already stored: report it, write nothing.
    Replay(AppendResult),
    /// Write the batch after the stream's `meta` (none for a new stream).
    Write(Option<StreamMeta>),
}

/// Checks idempotency and reused ids ([`crate::repeat`]), then the expected version: a repeat
/// of a stored append succeeds whatever its expected version, since the stream may have moved
/// on because of it.
fn plan_append(
    streams: &impl ReadableTable<&'static str, &'static [u8]>,
    rows: &impl ReadableTable<EventKey, EventRow>,
    ids: &impl ReadableTable<(&'static str, &'static [u8; 16]), u64>,
    key: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Plan, StoreError> {
    if events.is_empty() {
        return Err(StoreError::Internal(
            "an append needs at least one event".into(),
        ));
    }
    let stored_at = |version: u64| -> Result<RecordedEvent, StoreError> {
        let row = rows.get((key, version)).map_err(db_err)?.ok_or_else(|| {
            StoreError::Internal(format!(
                "event index of {key} points at missing version {version}"
            ))
        })?;
        let (recorded_at_us, header, data) = row.value();
        let h: EventHeader = decode(header)?;
        Ok(RecordedEvent {
            stream: StreamId {
                kind: String::new(),
                id: String::new(),
            },
            version,
            event_id: h.event_id,
            event_type: h.event_type,
            schema_version: h.schema_version,
            content_type: h.content_type,
            data: data.to_vec(),
            metadata: h.metadata,
            recorded_at_us,
        })
    };
    let mut known = Vec::with_capacity(events.len());
    for e in events {
        let found = ids.get((key, e.event_id.as_bytes())).map_err(db_err)?;
        known.push(match found.map(|g| g.value()) {
            Some(version) => {
                let row = rows.get((key, version)).map_err(db_err)?.ok_or_else(|| {
                    StoreError::Internal(format!(
                        "event index of {key} points at missing version {version}"
                    ))
                })?;
                let h: EventHeader = decode(row.value().1)?;
                Some(Known {
                    version,
                    append: Some((h.append_first, h.append_last)),
                })
            }
            None => None,
        });
    }
    match check_ids(events, &known) {
        IdCheck::New => {}
        IdCheck::Reused(e) => return Err(e),
        IdCheck::Candidate { first_version } => {
            let stored = (first_version..first_version + events.len() as u64)
                .map(stored_at)
                .collect::<Result<Vec<_>, _>>()?;
            return check_contents(events, &stored).map(Plan::Replay);
        }
    }
    let meta = read_meta(streams, key)?;
    let actual = meta.as_ref().map_or(0, |m| m.version);
    if !expected.admits(actual) {
        return Err(StoreError::WrongExpectedVersion { expected, actual });
    }
    Ok(Plan::Write(meta))
}

fn append_blocking(
    db: &Database,
    stream: StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<AppendResult, StoreError> {
    let key = stream.key();
    let key = key.as_str();
    let txn = db.begin_write().map_err(db_err)?;
    let result = {
        let mut streams = txn.open_table(STREAMS).map_err(db_err)?;
        let mut rows = txn.open_table(EVENTS).map_err(db_err)?;
        let mut ids = txn.open_table(EVENT_IDS).map_err(db_err)?;
        let mut changes = txn.open_table(CHANGES).map_err(db_err)?;
        let meta = match plan_append(&streams, &rows, &ids, key, expected, events)? {
            Plan::Replay(result) => return Ok(result),
            Plan::Write(meta) => meta,
        };

        let (seq, latest) = match changes.last().map_err(db_err)? {
            Some((k, v)) => (
                k.value() + 1,
                decode::<StoredChange>(v.value())?.noted_at_us,
            ),
            None => (1, i64::MIN),
        };
        // Commit times never decrease, so that as-of-time reads see a prefix of each stream.
        let committed_at_us = now_us().max(latest);
        let current = meta.as_ref().map_or(0, |m| m.version);
        let first_version = current + 1;
        let last_version = current + events.len() as u64;

        for (version, e) in (first_version..).zip(events) {
            let header = encode(&EventHeader {
                event_id: e.event_id,
                event_type: e.event_type.clone(),
                schema_version: e.schema_version,
                content_type: e.content_type.clone(),
                metadata: e.metadata.clone(),
                append_first: first_version,
                append_last: last_version,
            })?;
            rows.insert(
                (key, version),
                (committed_at_us, header.as_slice(), e.data.as_slice()),
            )
            .map_err(db_err)?;
            let earlier = ids
                .insert((key, e.event_id.as_bytes()), version)
                .map_err(db_err)?;
            if let Some(earlier) = earlier {
                // Only possible for an id repeated inside this batch; the transaction is
                // dropped uncommitted, so nothing is written.
                return Err(StoreError::EventIdReused {
                    index: (version - first_version) as usize,
                    event_id: e.event_id,
                    version: earlier.value(),
                });
            }
        }

        let created_at_us = meta.as_ref().map_or(committed_at_us, |m| m.created_at_us);
        let change = encode(&StoredChange {
            stream: stream.clone(),
            first_version,
            last_version,
            noted_at_us: committed_at_us,
        })?;
        changes.insert(seq, change.as_slice()).map_err(db_err)?;
        let meta = encode(&StreamMeta {
            stream,
            version: last_version,
            created_at_us,
            last_appended_at_us: committed_at_us,
        })?;
        streams.insert(key, meta.as_slice()).map_err(db_err)?;
        AppendResult {
            first_version,
            last_version,
            committed_at_us,
        }
    };
    // A commit that fails may still have reached the disk (the header written, its sync
    // failed): the caller is told the outcome is unknown, and a retry with the same ids is
    // answered by the repeat rule.
    txn.commit().map_err(|e| match db_err(e) {
        StoreError::Unavailable(cause) => {
            StoreError::OutcomeUnknown(format!("redb commit failed: {cause}"))
        }
        other => other,
    })?;
    tracing::debug!(
        stream = key,
        first = result.first_version,
        last = result.last_version,
        "appended"
    );
    Ok(result)
}

/// Highest version in `1..=hi` recorded at or before `until_us` (0 if none), by binary search:
/// commit times do not decrease along a stream.
fn last_version_at(
    rows: &impl ReadableTable<EventKey, EventRow>,
    key: &str,
    hi: u64,
    until_us: i64,
) -> Result<u64, StoreError> {
    let (mut lo, mut hi) = (0, hi);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let row = rows.get((key, mid)).map_err(db_err)?.ok_or_else(|| {
            StoreError::Internal(format!("stream {key} has no event at version {mid}"))
        })?;
        if row.value().0 <= until_us {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(lo)
}

fn read_blocking(
    db: &Database,
    stream: StreamId,
    request: ReadRequest,
) -> Result<Vec<RecordedEvent>, StoreError> {
    if request.limit == 0 {
        return Ok(Vec::new());
    }
    let key = stream.key();
    let key = key.as_str();
    let txn = db.begin_read().map_err(db_err)?;
    let streams = txn.open_table(STREAMS).map_err(db_err)?;
    let rows = txn.open_table(EVENTS).map_err(db_err)?;
    let Some(meta) = read_meta(&streams, key)? else {
        return Ok(Vec::new());
    };
    let mut visible = meta.version.min(request.until_version.unwrap_or(u64::MAX));
    if let Some(until_us) = request.until_time_us {
        visible = last_version_at(&rows, key, visible, until_us)?;
    }
    let limit = request.limit as usize;
    let (range, backwards) = match request.direction {
        Direction::Forwards => {
            let from = request.from_version.unwrap_or(1).max(1);
            (from..=visible, false)
        }
        Direction::Backwards => {
            let top = request.from_version.map_or(visible, |f| f.min(visible));
            (1..=top, true)
        }
    };
    if range.is_empty() {
        return Ok(Vec::new());
    }
    let iter = rows
        .range((key, *range.start())..=(key, *range.end()))
        .map_err(db_err)?;
    if backwards {
        iter.rev()
            .take(limit)
            .map(|e| to_event(&stream, e))
            .collect()
    } else {
        iter.take(limit).map(|e| to_event(&stream, e)).collect()
    }
}

fn to_event(
    stream: &StreamId,
    entry: Result<EventEntry<'_>, redb::StorageError>,
) -> Result<RecordedEvent, StoreError> {
    let (k, v) = entry.map_err(db_err)?;
    let (recorded_at_us, header, data) = v.value();
    let h: EventHeader = decode(header)?;
    Ok(RecordedEvent {
        stream: stream.clone(),
        version: k.value().1,
        event_id: h.event_id,
        event_type: h.event_type,
        schema_version: h.schema_version,
        content_type: h.content_type,
        data: data.to_vec(),
        metadata: h.metadata,
        recorded_at_us,
    })
}

fn stream_info_blocking(db: &Database, stream: StreamId) -> Result<Option<StreamInfo>, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let streams = txn.open_table(STREAMS).map_err(db_err)?;
    Ok(read_meta(&streams, &stream.key())?.map(|m| StreamInfo {
        version: m.version,
        created_at_us: m.created_at_us,
        last_appended_at_us: m.last_appended_at_us,
        event_count: m.version,
    }))
}

fn list_streams_blocking(
    db: &Database,
    cursor: Option<String>,
    limit: u32,
) -> Result<StreamPage, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let streams = txn.open_table(STREAMS).map_err(db_err)?;
    let lower = cursor.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
    let mut page = StreamPage::default();
    let mut more = false;
    for entry in streams
        .range::<&str>((lower, Bound::Unbounded))
        .map_err(db_err)?
    {
        if page.streams.len() == limit as usize {
            more = true;
            break;
        }
        let (_, v) = entry.map_err(db_err)?;
        page.streams.push(decode::<StreamMeta>(v.value())?.stream);
    }
    if more {
        // With limit 0 nothing was returned: hand back the cursor we were given ("" sorts before
        // every stream key, so it means "from the start").
        page.next = Some(
            page.streams
                .last()
                .map(StreamId::key)
                .or(cursor)
                .unwrap_or_default(),
        );
    }
    Ok(page)
}

fn poll_blocking(db: &Database, after: u64, limit: u32) -> Result<ChangePage, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let changes = txn.open_table(CHANGES).map_err(db_err)?;
    let mut page = ChangePage::default();
    let Some(start) = after.checked_add(1) else {
        return Ok(page);
    };
    for entry in changes.range(start..).map_err(db_err)?.take(limit as usize) {
        let (k, v) = entry.map_err(db_err)?;
        page.changes.push(decode::<StoredChange>(v.value())?.into());
        page.positions.push(k.value().to_string());
    }
    Ok(page)
}

impl EventStore for EmbeddedStore {
    /// `Ok` unless an I/O error left the database broken and reopening it fails.
    async fn ping(&self) -> Result<(), StoreError> {
        if self.broken.load(Ordering::Acquire) {
            self.reopen().await
        } else {
            Ok(())
        }
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        let stream = stream.clone();
        let events = events.to_vec();
        let _turn = self.writer.lock().await;
        self.run(move |db| append_blocking(db, stream, expected, &events))
            .await
    }

    async fn read(
        &self,
        stream: &StreamId,
        request: ReadRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream = stream.clone();
        self.run(move |db| read_blocking(db, stream, request)).await
    }

    async fn stream_info(&self, stream: &StreamId) -> Result<Option<StreamInfo>, StoreError> {
        let stream = stream.clone();
        self.run(move |db| stream_info_blocking(db, stream)).await
    }

    async fn list_streams(
        &self,
        cursor: Option<String>,
        limit: u32,
    ) -> Result<StreamPage, StoreError> {
        self.run(move |db| list_streams_blocking(db, cursor, limit))
            .await
    }
}

impl ChangeFeed for EmbeddedStore {
    fn shard_count(&self) -> u32 {
        1
    }

    /// Positions are the change log's sequence numbers (from 1) as decimal strings.
    async fn poll(
        &self,
        shard: u32,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ChangePage, StoreError> {
        if shard != 0 {
            return Err(StoreError::Internal(format!(
                "the embedded change feed has one shard, 0; asked for shard {shard}"
            )));
        }
        let after = match after {
            None => 0,
            Some(p) => p.parse::<u64>().map_err(|e| {
                StoreError::Internal(format!("bad change feed position {p:?}: {e}"))
            })?,
        };
        self.run(move |db| poll_blocking(db, after, limit)).await
    }

    /// The sequence number of the newest change committed before `time_us` (commit times never
    /// decrease along the log), found by walking back from the end.
    async fn position_before(
        &self,
        shard: u32,
        time_us: i64,
    ) -> Result<Option<String>, StoreError> {
        if shard != 0 {
            return Err(StoreError::Internal(format!(
                "the embedded change feed has one shard, 0; asked for shard {shard}"
            )));
        }
        self.run(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let changes = txn.open_table(CHANGES).map_err(db_err)?;
            for entry in changes.iter().map_err(db_err)?.rev() {
                let (k, v) = entry.map_err(db_err)?;
                if decode::<StoredChange>(v.value())?.noted_at_us < time_us {
                    return Ok(Some(k.value().to_string()));
                }
            }
            Ok(None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;

    fn event(n: u32) -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "Noted".into(),
            schema_version: 1,
            content_type: esq_domain::JSON_CONTENT_TYPE.into(),
            data: format!("{{\"n\":{n}}}").into_bytes(),
            metadata: BTreeMap::new(),
        }
    }

    fn stream(id: &str) -> StreamId {
        StreamId::new("test", id).expect("valid stream id")
    }

    fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
        EmbeddedStore::open(dir.path()).expect("open store")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        contract::run_all(&store, "emb").await;
        // The same store a second time, under another prefix: checks do not assume a fresh store.
        contract::run_all(&store, "emb2").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = stream("durable");
        let (e1, e2, e3) = (event(1), event(2), event(3));
        let r1 = {
            let store = open(&dir);
            let r = store
                .append(&s, ExpectedVersion::NoStream, &[e1.clone(), e2.clone()])
                .await
                .expect("append");
            assert_eq!((r.first_version, r.last_version), (1, 2));
            r
        };
        let store = open(&dir);
        let read = store
            .read(&s, ReadRequest::forwards(1, 10))
            .await
            .expect("read");
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].event_id, e2.event_id);
        assert_eq!(read[1].data, e2.data);
        assert_eq!(read[0].recorded_at_us, r1.committed_at_us);
        let info = store.stream_info(&s).await.expect("info").expect("exists");
        assert_eq!(info.version, 2);
        // A retry after the restart is still recognized.
        let again = store
            .append(&s, ExpectedVersion::NoStream, &[e1, e2])
            .await
            .expect("retry");
        assert_eq!(again, r1);
        let r2 = store
            .append(&s, ExpectedVersion::Exact(2), &[e3])
            .await
            .expect("append");
        assert_eq!(r2.first_version, 3);
        let page = store.poll(0, None, 10).await.expect("poll");
        assert_eq!(page.positions, vec!["1", "2"]);
        assert_eq!(page.changes[1].first_version, 3);
        let listed = store.list_streams(None, 10).await.expect("list");
        assert_eq!(listed.streams, vec![s]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn change_log_is_in_commit_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let (a, b) = (stream("a"), stream("b"));
        let mut expected = Vec::new();
        for (s, n) in [(&a, 2), (&b, 1), (&a, 1), (&b, 3)] {
            let batch: Vec<_> = (0..n).map(event).collect();
            let r = store
                .append(s, ExpectedVersion::Any, &batch)
                .await
                .expect("append");
            expected.push(Change {
                stream: s.clone(),
                first_version: r.first_version,
                last_version: r.last_version,
                noted_at_us: r.committed_at_us,
            });
        }
        let all = store.poll(0, None, 100).await.expect("poll");
        assert_eq!(all.changes, expected);
        assert_eq!(all.positions, vec!["1", "2", "3", "4"]);
        assert!(all
            .changes
            .windows(2)
            .all(|w| w[0].noted_at_us <= w[1].noted_at_us));
        let page = store.poll(0, Some("1"), 2).await.expect("poll");
        assert_eq!(page.changes, expected[1..3]);
        assert_eq!(page.positions, vec!["2", "3"]);
        let rest = store.poll(0, Some("3"), 100).await.expect("poll");
        assert_eq!(rest.positions, vec!["4"]);
        let none = store.poll(0, Some("4"), 100).await.expect("poll");
        assert!(none.changes.is_empty() && none.positions.is_empty());
        // "From a time": before every change committed at or after it.
        let before = |t| store.position_before(0, t);
        assert_eq!(before(expected[0].noted_at_us).await.expect("pos"), None);
        assert_eq!(
            before(expected[3].noted_at_us + 1).await.expect("pos"),
            Some("4".to_owned())
        );
        let at_third = before(expected[2].noted_at_us).await.expect("pos");
        let after_it = store.poll(0, at_third.as_deref(), 100).await.expect("poll");
        assert!(after_it.changes.contains(&expected[2]) && after_it.changes.contains(&expected[3]));
        assert!(store
            .poll(0, None, 0)
            .await
            .expect("poll")
            .changes
            .is_empty());
        assert!(store
            .poll(0, Some(&u64::MAX.to_string()), 5)
            .await
            .expect("poll")
            .changes
            .is_empty());
        assert!(matches!(
            store.poll(1, None, 10).await,
            Err(StoreError::Internal(_))
        ));
        assert!(matches!(
            store.poll(0, Some("x"), 10).await,
            Err(StoreError::Internal(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_retry_must_be_the_whole_original_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = stream("whole");
        let batch = [event(1), event(2), event(3)];
        store
            .append(&s, ExpectedVersion::NoStream, &batch)
            .await
            .expect("append");
        let prefix = store.append(&s, ExpectedVersion::Any, &batch[..2]).await;
        assert_eq!(
            prefix,
            Err(StoreError::EventIdReused {
                index: 0,
                event_id: batch[0].event_id,
                version: 1
            })
        );
        let suffix = store.append(&s, ExpectedVersion::Any, &batch[1..]).await;
        assert_eq!(
            suffix,
            Err(StoreError::EventIdReused {
                index: 0,
                event_id: batch[1].event_id,
                version: 2
            })
        );
        let dup = event(4);
        let inside = store
            .append(&s, ExpectedVersion::Any, &[dup.clone(), dup])
            .await;
        assert!(matches!(
            inside,
            Err(StoreError::EventIdReused { version: 4, .. })
        ));
        assert!(store.append(&s, ExpectedVersion::Any, &[]).await.is_err());
        let info = store.stream_info(&s).await.expect("info").expect("exists");
        assert_eq!(info.version, 3);
        assert_eq!(
            store.poll(0, None, 10).await.expect("poll").changes.len(),
            1
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn streams_with_a_common_key_prefix_stay_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let (short, long) = (stream("x"), stream("x1"));
        let e = event(1);
        store
            .append(&short, ExpectedVersion::NoStream, std::slice::from_ref(&e))
            .await
            .expect("append");
        // The same event id in another stream is a different event.
        store
            .append(&long, ExpectedVersion::NoStream, &[e, event(2)])
            .await
            .expect("append");
        let mut back = ReadRequest::forwards(1, 10);
        back.direction = Direction::Backwards;
        assert_eq!(store.read(&short, back).await.expect("read").len(), 1);
        assert_eq!(
            store
                .read(&long, ReadRequest::forwards(1, 10))
                .await
                .expect("read")
                .len(),
            2
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn list_streams_pages_in_key_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        for id in ["c", "a", "b"] {
            store
                .append(&stream(id), ExpectedVersion::Any, &[event(0)])
                .await
                .expect("append");
        }
        let first = store.list_streams(None, 2).await.expect("list");
        assert_eq!(first.streams, vec![stream("a"), stream("b")]);
        assert_eq!(first.next.as_deref(), Some("test/b"));
        let last = store.list_streams(first.next, 2).await.expect("list");
        assert_eq!(last.streams, vec![stream("c")]);
        assert_eq!(last.next, None);
        let zero = store.list_streams(None, 0).await.expect("list");
        assert!(zero.streams.is_empty());
        let from_zero = store.list_streams(zero.next, 3).await.expect("list");
        assert_eq!(from_zero.streams.len(), 3);
        assert_eq!(store.list_streams(None, 3).await.expect("list").next, None);
    }

    /// A file backend whose writes fail while `fail` is set, like a full or vanished disk.
    #[derive(Debug)]
    struct Flaky {
        file: redb::backends::FileBackend,
        fail: Arc<AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.fail.load(Ordering::SeqCst) {
                Err(std::io::Error::other("injected write failure"))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.write(offset, data)
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn recovers_from_io_errors_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(DB_FILE_NAME);
        let fail = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&fail);
        let store = EmbeddedStore::with_opener(Arc::new(move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&file)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let backend = Flaky {
                file: redb::backends::FileBackend::new(f)
                    .map_err(|e| StoreError::Internal(e.to_string()))?,
                fail: Arc::clone(&flag),
            };
            redb::Builder::new()
                .create_with_backend(backend)
                .map_err(|e| StoreError::Unavailable(e.to_string()))
        }))
        .unwrap();
        let s = stream("flaky");
        store
            .append(&s, ExpectedVersion::Any, &[event(1)])
            .await
            .unwrap();
        assert!(store.ping().await.is_ok());

        fail.store(true, Ordering::SeqCst);
        let err = store
            .append(&s, ExpectedVersion::Any, &[event(2)])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_)
            ),
            "{err:?}"
        );
        assert!(store.ping().await.is_err(), "not healthy while writes fail");

        fail.store(false, Ordering::SeqCst);
        store.ping().await.expect("healthy once the cause is gone");
        store
            .append(&s, ExpectedVersion::Exact(1), &[event(3)])
            .await
            .expect("appends work again without a restart");
        let read = store
            .read(
                &s,
                ReadRequest {
                    direction: Direction::Forwards,
                    from_version: None,
                    limit: 10,
                    until_version: None,
                    until_time_us: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(read.len(), 2, "the failed append left nothing behind");
    }

    #[test]
    fn refuses_a_file_of_another_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = Database::create(dir.path().join(DB_FILE_NAME)).expect("create");
            let txn = db.begin_write().expect("txn");
            txn.open_table(META)
                .expect("table")
                .insert("format", 99)
                .expect("insert");
            txn.commit().expect("commit");
        }
        assert!(
            matches!(EmbeddedStore::open(dir.path()), Err(StoreError::Internal(m)) if m.contains("format 99"))
        );
    }
}
