//! The embedded event store: one [redb](https://docs.rs/redb) file, for `esq dev` and tests.
//!
//! Everything an append writes — its events, the event-id index entries, the stream's summary
//! and one change-log entry — goes into a write transaction committed with redb's default
//! (immediate, fsynced) durability. So a committed append always has its change entry, an
//! append that failed left nothing behind, and a crash loses no committed event. Readers see
//! consistent snapshots and never wait for the writer.
//!
//! **Group commit.** redb admits one writer at a time and every commit costs an fsync, so
//! appends do not each take a transaction: they queue (bounded, [`QUEUE_CAPACITY`]; a full
//! queue makes appenders wait) to one writer thread, which takes everything queued (at most
//! [`Options::group_max_appends`] appends, [`GROUP_MAX_EVENTS`] events) and applies it in ONE write
//! transaction with one fsync. Each append of a group is still judged on its own, in queue
//! order, against the transaction's state so far — its idempotency, its expected version —
//! so appends to one stream in one group see each other's effects in order. An append is
//! fully checked (ids, version, duplicates inside it, encoding) before it writes anything, so
//! a refused append leaves nothing in the transaction and the others go on; should a write of
//! one append still fail for a reason of its own, the transaction is dropped and the group
//! redone without it. Nobody is answered before the commit: a group whose commit fails (or
//! that meets an I/O error) fails every member — the writers with `OutcomeUnknown`, the rest
//! with `Unavailable` — and acknowledges none. Change-log sequence numbers are given in queue
//! order inside the transaction, so the feed is still in commit order.
//!
//! redb calls block, so they never run on an async worker: appends on the writer thread, reads
//! on the store's few reader threads (see `readers`: cheaper than tokio's blocking pool for
//! reads of a few microseconds), and snapshot writes and reopens on tokio's blocking pool.
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
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot, RwLock};
use uuid::Uuid;

mod readers;
mod snapshots;

pub use readers::READ_QUEUE_CAPACITY;

/// Name of the database file inside the store's directory.
pub const DB_FILE_NAME: &str = "events.redb";

/// On-disk format written by this version; a file with another one is refused at open.
const FORMAT_VERSION: u64 = 1;

/// Appends waiting for the writer thread; when full, appenders wait for room (backpressure).
/// Each holds its events, which write-svc bounds per request.
pub const QUEUE_CAPACITY: usize = 1024;
/// Default of [`Options::group_max_appends`].
pub const GROUP_MAX_APPENDS: usize = 256;

/// Tunables of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Most appends one group commit takes (at least 1): bounds a transaction's size and how
    /// long the first member of a group waits for the last. 1 commits every append on its
    /// own (an fsync each), as the store did before group commit.
    pub group_max_appends: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            group_max_appends: GROUP_MAX_APPENDS,
        }
    }
}
/// redb's page cache (its default is 1 GiB): pages read by a rebuild or a long scan would
/// otherwise stay resident, so `esq dev`'s memory would grow with the store up to that size.
pub const CACHE_BYTES: usize = 64 << 20;

/// Most events one group commit takes (at least one append is always taken, however large).
pub const GROUP_MAX_EVENTS: usize = 4096;

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

/// The open database; `None` only while a reopen failed. Operations hold a read lock, a
/// reopen the write lock.
type DbSlot = RwLock<Option<Database>>;

/// One append waiting for the writer thread, and where to send its outcome.
struct Request {
    stream: StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

/// The embedded event store and change feed. Cloning is cheap and shares the database.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<DbSlot>,
    /// Set by an I/O error: redb must be reopened before it works again.
    broken: Arc<AtomicBool>,
    opener: Opener,
    /// The writer thread's queue (see the module docs). Appends wait here asynchronously, not
    /// on a blocking-pool thread parked on redb's writer lock. The thread ends when the last
    /// clone of the store is dropped.
    appends: mpsc::Sender<Request>,
    /// Group transactions the writer has committed.
    commits: Arc<std::sync::atomic::AtomicU64>,
    /// The threads that run reads; they end when the last clone of the store is dropped.
    readers: Arc<readers::Readers>,
    #[cfg(test)]
    hold: Arc<Hold>,
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
        Self::open_with(path, Options::default())
    }

    /// [`EmbeddedStore::open`] with other [`Options`].
    pub fn open_with(path: &Path, options: Options) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| {
            StoreError::Internal(format!(
                "cannot create store directory {}: {e}",
                path.display()
            ))
        })?;
        let file = path.join(DB_FILE_NAME);
        let store = Self::with_opener(
            options,
            Arc::new(move || {
                Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .create(&file)
                    .map_err(|e| {
                        let cause = format!("cannot open event store {}: {e}", file.display());
                        match e {
                            redb::DatabaseError::Storage(redb::StorageError::Io(_)) => {
                                StoreError::Unavailable(cause)
                            }
                            _ => StoreError::Internal(cause),
                        }
                    })
            }),
        )?;
        tracing::info!(
            path = %path.display(),
            group_max_appends = options.group_max_appends,
            "opened embedded event store"
        );
        Ok(store)
    }

    /// A store over what `opener` opens (and reopens after an I/O error).
    fn with_opener(options: Options, opener: Opener) -> Result<Self, StoreError> {
        let db = opener()?;
        init_tables(&db)?;
        let db = Arc::new(RwLock::new(Some(db)));
        let broken = Arc::new(AtomicBool::new(false));
        let (appends, queue) = mpsc::channel(QUEUE_CAPACITY);
        let commits = Arc::default();
        #[cfg(test)]
        let hold = Arc::<Hold>::default();
        let writer = Writer {
            #[cfg(test)]
            hold: Arc::clone(&hold),
            group_max_appends: options.group_max_appends.max(1),
            commits: Arc::clone(&commits),
            db: Arc::downgrade(&db),
            broken: Arc::clone(&broken),
            opener: Arc::clone(&opener),
        };
        std::thread::Builder::new()
            .name("esq-redb-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        let readers = Arc::new(readers::Readers::start(readers::default_threads())?);
        Ok(Self {
            db,
            broken,
            opener,
            appends,
            commits,
            readers,
            #[cfg(test)]
            hold,
        })
    }

    /// Runs the read `f` against the database on a reader thread, reopening it first if an I/O
    /// error left it broken, and marking it broken if `f` meets one.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        self.guarded(f, true).await
    }

    /// [`EmbeddedStore::run`] on tokio's blocking pool, for work that may wait on redb's writer
    /// lock (a snapshot's write transaction), which must not hold a reader thread.
    async fn run_blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        self.guarded(f, false).await
    }

    async fn guarded<T, F>(&self, f: F, read: bool) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        if self.broken.load(Ordering::Acquire) {
            self.reopen().await?;
        }
        let db = Arc::clone(&self.db).read_owned().await;
        let f = move || match db.as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Unavailable(
                "the event store could not be reopened".into(),
            )),
        };
        let result = if read {
            self.readers.run(f).await
        } else {
            tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| StoreError::Internal(format!("embedded store task failed: {e}")))?
        };
        if let Err(StoreError::Unavailable(cause) | StoreError::OutcomeUnknown(cause)) = &result {
            if !self.broken.swap(true, Ordering::AcqRel) {
                tracing::error!(%cause, "embedded event store I/O error: reopening on next use");
            }
        }
        result
    }

    /// Appends waiting in the writer's queue (not counting the group being committed).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.appends.max_capacity() - self.appends.capacity()
    }

    /// Group transactions committed since the store was opened (appends acknowledged divided
    /// by this is the mean group size).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Reopens the database if it is still broken, once every operation in flight is done.
    async fn reopen(&self) -> Result<(), StoreError> {
        let mut db = Arc::clone(&self.db).write_owned().await;
        if !self.broken.load(Ordering::Acquire) {
            return Ok(()); // another caller reopened it while we waited
        }
        let opener = Arc::clone(&self.opener);
        let broken = Arc::clone(&self.broken);
        tokio::task::spawn_blocking(move || reopen_locked(&mut db, &broken, &opener))
            .await
            .map_err(|e| StoreError::Internal(format!("embedded store task failed: {e}")))?
    }
}

/// Replaces the broken database in `slot` (held under the write lock) by a fresh handle.
fn reopen_locked(
    slot: &mut Option<Database>,
    broken: &AtomicBool,
    opener: &Opener,
) -> Result<(), StoreError> {
    // The old handle holds the file lock: close it before opening again.
    *slot = None;
    let fresh = opener()?;
    init_tables(&fresh)?;
    *slot = Some(fresh);
    broken.store(false, Ordering::Release);
    tracing::info!("embedded event store reopened after an I/O error");
    Ok(())
}

/// Whether an error means the database must be reopened (and a group's transaction is lost).
fn is_io(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_)
    )
}

/// Test hook: while closed, the writer waits after taking the first append of a group, so a
/// test can queue exactly the group it means.
#[cfg(test)]
#[derive(Debug, Default)]
struct Hold {
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    waiting: AtomicBool,
}

#[cfg(test)]
impl Hold {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut closed = self.closed.lock().unwrap();
        self.waiting.store(*closed, Ordering::SeqCst);
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
        self.waiting.store(false, Ordering::SeqCst);
    }
}

/// The writer thread: takes groups of queued appends and commits each group at once.
struct Writer {
    #[cfg(test)]
    hold: Arc<Hold>,
    group_max_appends: usize,
    /// Group transactions committed, for tests.
    commits: Arc<std::sync::atomic::AtomicU64>,
    /// Weak, so that dropping the last store closes the database even before the thread has
    /// noticed that its queue is closed.
    db: Weak<DbSlot>,
    broken: Arc<AtomicBool>,
    opener: Opener,
}

impl Writer {
    /// Runs until every sender (every clone of the store) is gone.
    fn run(self, mut queue: mpsc::Receiver<Request>) {
        let mut group = Vec::with_capacity(self.group_max_appends);
        while let Some(first) = queue.blocking_recv() {
            #[cfg(test)]
            self.hold.pass();
            let mut events = first.events.len();
            group.push(first);
            while group.len() < self.group_max_appends && events < GROUP_MAX_EVENTS {
                match queue.try_recv() {
                    Ok(next) => {
                        events += next.events.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            let Some(db) = self.db.upgrade() else {
                return; // the store is gone; dropping the replies tells any waiter
            };
            let members = std::mem::take(&mut group);
            // A panic inside redb must not stop the thread: the members' replies are dropped
            // unanswered, which their callers report as an unknown outcome.
            let outcomes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.commit(db, &members)
            }));
            match outcomes {
                Ok(outcomes) => {
                    for (m, outcome) in members.into_iter().zip(outcomes) {
                        let _ = m.reply.send(outcome);
                    }
                }
                Err(_) => {
                    tracing::error!(
                        "the embedded store's writer panicked while committing a group"
                    );
                }
            }
        }
    }

    /// Commits one group; the outcome of each member. The database handle is let go before
    /// anyone is answered, so a caller that drops the store after its append can reopen the
    /// file at once.
    fn commit(
        &self,
        db: Arc<DbSlot>,
        members: &[Request],
    ) -> Vec<Result<AppendResult, StoreError>> {
        if self.broken.load(Ordering::Acquire) {
            let mut slot = db.blocking_write();
            if self.broken.load(Ordering::Acquire) {
                if let Err(e) = reopen_locked(&mut slot, &self.broken, &self.opener) {
                    return vec![Err(e); members.len()];
                }
            }
        }
        let (outcomes, committed) = {
            let slot = db.blocking_read();
            match slot.as_ref() {
                Some(db) => commit_group(db, members),
                None => (
                    vec![
                        Err(StoreError::Unavailable(
                            "the event store could not be reopened".into()
                        ));
                        members.len()
                    ],
                    false,
                ),
            }
        };
        drop(db);
        if committed {
            self.commits.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(appends = members.len(), "group committed");
        }
        if let Some(cause) = outcomes
            .iter()
            .find_map(|o| o.as_ref().err().filter(|e| is_io(e)))
        {
            if !self.broken.swap(true, Ordering::AcqRel) {
                tracing::error!(%cause, "embedded event store I/O error: reopening on next use");
            }
        }
        outcomes
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

/// The tables an append writes, open in the group's transaction.
struct Tables<'t> {
    streams: redb::Table<'t, &'static str, &'static [u8]>,
    rows: redb::Table<'t, EventKey, EventRow>,
    ids: redb::Table<'t, (&'static str, &'static [u8; 16]), u64>,
    changes: redb::Table<'t, u64, &'static [u8]>,
}

/// How one member of a group came out of its turn in the transaction.
enum Turn {
    /// It wrote its events into the transaction.
    Wrote(AppendResult),
    /// It wrote nothing: a repeat of a stored append, or refused.
    Decided(Result<AppendResult, StoreError>),
}

/// Why a group's transaction had to be dropped.
enum Abort {
    /// An I/O error (or a failed begin): the whole group fails.
    Group(StoreError),
    /// Member `.0`'s write failed half-way for a reason of its own: it fails, the group is
    /// redone without it.
    Member(usize, StoreError),
}

/// Applies `members` in one write transaction and commits it; the outcome of each, in order.
/// Nothing is acknowledged unless the commit holding it succeeded.
/// Also says whether a transaction was committed (not when nothing was written, or on error).
fn commit_group(
    db: &Database,
    members: &[Request],
) -> (Vec<Result<AppendResult, StoreError>>, bool) {
    let mut excluded: Vec<Option<StoreError>> = vec![None; members.len()];
    // Each retry excludes one more member, so this ends.
    loop {
        match try_group(db, members, &excluded) {
            Ok(done) => return done,
            Err(Abort::Member(i, e)) => excluded[i] = Some(e),
            Err(Abort::Group(e)) => return (vec![Err(e); members.len()], false),
        }
    }
}

fn try_group(
    db: &Database,
    members: &[Request],
    excluded: &[Option<StoreError>],
) -> Result<(Vec<Result<AppendResult, StoreError>>, bool), Abort> {
    fn group(e: impl Into<redb::Error>) -> Abort {
        Abort::Group(db_err(e))
    }
    let txn = db.begin_write().map_err(group)?;
    let mut turns = Vec::with_capacity(members.len());
    {
        let mut tables = Tables {
            streams: txn.open_table(STREAMS).map_err(group)?,
            rows: txn.open_table(EVENTS).map_err(group)?,
            ids: txn.open_table(EVENT_IDS).map_err(group)?,
            changes: txn.open_table(CHANGES).map_err(group)?,
        };
        for (i, m) in members.iter().enumerate() {
            if let Some(e) = &excluded[i] {
                turns.push(Turn::Decided(Err(e.clone())));
                continue;
            }
            match append_in(&mut tables, m) {
                Ok(turn) => turns.push(turn),
                Err(e) if is_io(&e) => return Err(Abort::Group(e)),
                Err(e) => return Err(Abort::Member(i, e)),
            }
        }
    }
    let answer = |t: Turn| match t {
        Turn::Wrote(r) => Ok(r),
        Turn::Decided(d) => d,
    };
    if !turns.iter().any(|t| matches!(t, Turn::Wrote(_))) {
        // Nothing to make durable: the transaction is dropped, which aborts it.
        return Ok((turns.into_iter().map(answer).collect(), false));
    }
    match txn.commit() {
        Ok(()) => Ok((turns.into_iter().map(answer).collect(), true)),
        // A commit that fails may still have reached the disk (the header written, its sync
        // failed): the writers are told the outcome is unknown, and a retry with the same ids
        // is answered by the repeat rule. The others were judged against the lost
        // transaction's state, so their verdicts are withdrawn too.
        Err(e) => {
            let cause = db_err(e);
            let withdrawn = turns
                .into_iter()
                .map(|t| {
                    Err(match (&t, &cause) {
                        (Turn::Wrote(_), StoreError::Unavailable(c)) => {
                            StoreError::OutcomeUnknown(format!("redb commit failed: {c}"))
                        }
                        (Turn::Wrote(_), other) => other.clone(),
                        (Turn::Decided(_), StoreError::Unavailable(c)) => StoreError::Unavailable(
                            format!("the group commit holding this append failed: {c}"),
                        ),
                        (Turn::Decided(_), _) => StoreError::Internal(format!(
                            "the group commit holding this append failed: {cause}"
                        )),
                    })
                })
                .collect();
            Ok((withdrawn, false))
        }
    }
}

/// One member's turn in the group's transaction. A refusal, or a repeat, writes nothing and is
/// `Ok(Turn::Decided(..))`: every check runs (and every record is encoded) before the first
/// write. `Err` means the transaction can no longer be committed for this member: an I/O
/// error, or a write that failed half-way.
fn append_in(t: &mut Tables<'_>, m: &Request) -> Result<Turn, StoreError> {
    match plan_write(t, m) {
        Ok(Ok(records)) => {
            let result = records.result;
            write_records(t, &m.stream.key(), records)?;
            tracing::debug!(
                stream = %m.stream,
                first = result.first_version,
                last = result.last_version,
                "appended"
            );
            Ok(Turn::Wrote(result))
        }
        Ok(Err(replay)) => Ok(Turn::Decided(Ok(replay))),
        Err(e) if is_io(&e) => Err(e),
        Err(e) => Ok(Turn::Decided(Err(e))),
    }
}

/// Everything an accepted append writes, encoded.
struct Records {
    result: AppendResult,
    /// Per event: (version, header, payload, id).
    events: Vec<(u64, Vec<u8>, Vec<u8>, Uuid)>,
    seq: u64,
    change: Vec<u8>,
    meta: Vec<u8>,
}

/// Checks `m` against the transaction's state and encodes what it will write: `Ok(Err(r))`
/// for a repeat of a stored append (original result `r`), `Err` for a refusal.
fn plan_write(t: &Tables<'_>, m: &Request) -> Result<Result<Records, AppendResult>, StoreError> {
    let key = m.stream.key();
    let key = key.as_str();
    let events = &m.events;
    let meta = match plan_append(&t.streams, &t.rows, &t.ids, key, m.expected, events)? {
        Plan::Replay(result) => return Ok(Err(result)),
        Plan::Write(meta) => meta,
    };
    let current = meta.as_ref().map_or(0, |m| m.version);
    let first_version = current + 1;
    let last_version = current + events.len() as u64;
    // An id twice in the batch: the second is refused, naming where the first would go.
    if events.len() > 1 {
        let mut seen = std::collections::HashMap::with_capacity(events.len());
        for (index, e) in events.iter().enumerate() {
            if let Some(first) = seen.insert(e.event_id, index) {
                return Err(StoreError::EventIdReused {
                    index,
                    event_id: e.event_id,
                    version: first_version + first as u64,
                });
            }
        }
    }
    let (seq, latest) = match t.changes.last().map_err(db_err)? {
        Some((k, v)) => (
            k.value() + 1,
            decode::<StoredChange>(v.value())?.noted_at_us,
        ),
        None => (1, i64::MIN),
    };
    // Commit times never decrease, so that as-of-time reads see a prefix of each stream.
    let committed_at_us = now_us().max(latest);
    let mut rows = Vec::with_capacity(events.len());
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
        rows.push((version, header, e.data.clone(), e.event_id));
    }
    let created_at_us = meta.as_ref().map_or(committed_at_us, |m| m.created_at_us);
    let change = encode(&StoredChange {
        stream: m.stream.clone(),
        first_version,
        last_version,
        noted_at_us: committed_at_us,
    })?;
    let meta = encode(&StreamMeta {
        stream: m.stream.clone(),
        version: last_version,
        created_at_us,
        last_appended_at_us: committed_at_us,
    })?;
    Ok(Ok(Records {
        result: AppendResult {
            first_version,
            last_version,
            committed_at_us,
        },
        events: rows,
        seq,
        change,
        meta,
    }))
}

/// Writes an accepted append's records into the transaction.
fn write_records(t: &mut Tables<'_>, key: &str, r: Records) -> Result<(), StoreError> {
    let at = r.result.committed_at_us;
    for (version, header, data, id) in &r.events {
        t.rows
            .insert((key, *version), (at, header.as_slice(), data.as_slice()))
            .map_err(db_err)?;
        t.ids
            .insert((key, id.as_bytes()), *version)
            .map_err(db_err)?;
    }
    t.changes
        .insert(r.seq, r.change.as_slice())
        .map_err(db_err)?;
    t.streams.insert(key, r.meta.as_slice()).map_err(db_err)?;
    Ok(())
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
        let (reply, outcome) = oneshot::channel();
        let request = Request {
            stream: stream.clone(),
            expected,
            events: events.to_vec(),
            reply,
        };
        self.appends.send(request).await.map_err(|_| {
            StoreError::Internal("the embedded store's writer thread has stopped".into())
        })?;
        // Dropped unanswered only if the writer failed mid-group: it may have committed.
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::OutcomeUnknown(
                "the embedded store's writer failed while committing this append".into(),
            ))
        })
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

    /// What a test does to the disk under a store: writes fail while `fail` is set (like a
    /// full or vanished disk); syncs are counted.
    #[derive(Debug, Default)]
    struct Disk {
        fail: AtomicBool,
        syncs: std::sync::atomic::AtomicU64,
    }

    impl Disk {
        fn syncs(&self) -> u64 {
            self.syncs.load(Ordering::SeqCst)
        }
    }

    /// A file backend under a test's [`Disk`].
    #[derive(Debug)]
    struct Flaky {
        file: redb::backends::FileBackend,
        disk: Arc<Disk>,
    }

    impl Flaky {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.disk.fail.load(Ordering::SeqCst) {
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
            self.disk.syncs.fetch_add(1, Ordering::SeqCst);
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.write(offset, data)
        }
    }

    /// A store in `dir` over a [`Disk`] the test controls.
    fn store_on_disk(dir: &tempfile::TempDir, options: Options) -> (EmbeddedStore, Arc<Disk>) {
        let file = dir.path().join(DB_FILE_NAME);
        let disk = Arc::new(Disk::default());
        let under = Arc::clone(&disk);
        let store = EmbeddedStore::with_opener(
            options,
            Arc::new(move || {
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
                    disk: Arc::clone(&under),
                };
                redb::Builder::new()
                    .create_with_backend(backend)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))
            }),
        )
        .unwrap();
        (store, disk)
    }

    /// Waits (bounded, generously) until `done` holds.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !done() {
            assert!(
                std::time::Instant::now() < give_up,
                "gave up waiting: {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Holds the writer at its next group, sends `n` appends made by `make`, and lets the
    /// writer go once they are all in: they make one group (if the bound allows).
    async fn one_group<T: Send + 'static>(
        store: &EmbeddedStore,
        n: usize,
        make: impl Fn(EmbeddedStore, usize) -> tokio::task::JoinHandle<T>,
    ) -> Vec<T> {
        store.hold.set(true);
        let first = make(store.clone(), 0);
        until("the writer holds the first append", || {
            store.hold.waiting.load(Ordering::SeqCst)
        })
        .await;
        let mut tasks = vec![first];
        tasks.extend((1..n).map(|i| make(store.clone(), i)));
        until("every append is queued", || store.queued() == n - 1).await;
        store.hold.set(false);
        futures_join(tasks).await
    }

    /// Appends queued together go into ONE transaction, with one commit's syncs for all of
    /// them, and each gets its own result and change entry.
    #[tokio::test(flavor = "multi_thread")]
    async fn queued_appends_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = store_on_disk(&dir, Options::default());
        let (syncs, commits) = (disk.syncs(), store.commits());
        let n = 64;
        let results = one_group(&store, n, |store, i| {
            tokio::spawn(async move {
                let s = stream(&format!("g{i}"));
                let batch = [event(i as u32), event(i as u32 + 1)];
                store.append(&s, ExpectedVersion::NoStream, &batch).await
            })
        })
        .await;
        for r in results {
            let r = r.expect("grouped append");
            assert_eq!((r.first_version, r.last_version), (1, 2));
        }
        assert_eq!(store.commits() - commits, 1, "{n} appends, one transaction");
        let synced = disk.syncs() - syncs;
        assert!(
            (1..=2).contains(&synced),
            "one commit's syncs for {n} appends, not {synced}"
        );
        let page = store.poll(0, None, 1000).await.unwrap();
        assert_eq!(page.changes.len(), n, "one change entry per append");
        assert_eq!(page.positions.last().map(String::as_str), Some("64"));
        for i in 0..n {
            let read = store
                .read(&stream(&format!("g{i}")), ReadRequest::forwards(1, 10))
                .await
                .unwrap();
            assert_eq!(read.len(), 2);
        }
    }

    fn request(
        s: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> (Request, oneshot::Receiver<Result<AppendResult, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        let r = Request {
            stream: s.clone(),
            expected,
            events: events.to_vec(),
            reply,
        };
        (r, rx)
    }

    /// One group, many kinds of members: each is judged on its own, in order, seeing the
    /// effects of the members before it; refused ones write nothing and fail nobody else.
    #[test]
    fn each_member_of_a_group_is_judged_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = store_on_disk(&dir, Options::default());
        let (s, t, u) = (stream("s"), stream("t"), stream("u"));
        let (a, b, c, d, e) = (event(1), event(2), event(3), event(4), event(5));
        let dup = event(6);
        let mut other_a = a.clone();
        other_a.data = b"{\"n\":99}".to_vec();
        let members: Vec<_> = [
            request(&s, ExpectedVersion::NoStream, std::slice::from_ref(&a)), // 0 writes s@1
            request(&s, ExpectedVersion::NoStream, std::slice::from_ref(&b)), // 1 conflict
            request(&s, ExpectedVersion::NoStream, std::slice::from_ref(&a)), // 2 repeat of 0
            request(&s, ExpectedVersion::Exact(1), std::slice::from_ref(&c)), // 3 writes s@2
            request(&s, ExpectedVersion::Exact(1), std::slice::from_ref(&d)), // 4 conflict
            request(&t, ExpectedVersion::NoStream, &[dup.clone(), dup]),      // 5 id twice
            request(&t, ExpectedVersion::NoStream, std::slice::from_ref(&e)), // 6 writes t@1
            request(&s, ExpectedVersion::Any, &[other_a]), // 7 id of 0, other data
            request(&u, ExpectedVersion::Any, &[]),        // 8 empty
            request(&s, ExpectedVersion::Exact(2), std::slice::from_ref(&c)), // 9 repeat of 3
        ]
        .into_iter()
        .map(|(r, _)| r)
        .collect();
        let before = disk.syncs();
        let out = {
            let slot = store.db.blocking_read();
            commit_group(slot.as_ref().unwrap(), &members)
        };
        assert!(out.1, "the group was committed");
        assert!(disk.syncs() > before, "the group was synced");
        let out = out.0;
        let ok = |i: usize| out[i].clone().unwrap();
        assert_eq!((ok(0).first_version, ok(0).last_version), (1, 1));
        assert_eq!(
            out[1],
            Err(StoreError::WrongExpectedVersion {
                expected: ExpectedVersion::NoStream,
                actual: 1
            })
        );
        assert_eq!(
            ok(2),
            ok(0),
            "a repeat in the same group gets the original result"
        );
        assert_eq!(ok(3).first_version, 2);
        assert_eq!(
            out[4],
            Err(StoreError::WrongExpectedVersion {
                expected: ExpectedVersion::Exact(1),
                actual: 2
            })
        );
        assert!(
            matches!(
                out[5],
                Err(StoreError::EventIdReused {
                    index: 1,
                    version: 1,
                    ..
                })
            ),
            "{:?}",
            out[5]
        );
        assert_eq!((ok(6).first_version, ok(6).last_version), (1, 1));
        assert!(
            matches!(
                out[7],
                Err(StoreError::EventIdReused {
                    index: 0,
                    version: 1,
                    ..
                })
            ),
            "{:?}",
            out[7]
        );
        assert!(
            matches!(out[8], Err(StoreError::Internal(_))),
            "{:?}",
            out[8]
        );
        assert_eq!(ok(9), ok(3));

        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let read = |x: StreamId| {
                let store = store.clone();
                async move { store.read(&x, ReadRequest::forwards(1, 10)).await.unwrap() }
            };
            let ids = |v: Vec<RecordedEvent>| v.into_iter().map(|r| r.event_id).collect::<Vec<_>>();
            assert_eq!(ids(read(s.clone()).await), vec![a.event_id, c.event_id]);
            assert_eq!(ids(read(t.clone()).await), vec![e.event_id]);
            assert!(read(u).await.is_empty());
            let page = store.poll(0, None, 100).await.unwrap();
            let changed: Vec<_> = page
                .changes
                .iter()
                .map(|c| (c.stream.id.clone(), c.first_version))
                .collect();
            assert_eq!(
                changed,
                vec![("s".into(), 1), ("s".into(), 2), ("t".into(), 1)],
                "one change per written append, in group order"
            );
        });
    }

    /// Many concurrent appends through the queue, conflicting ones and idempotent retries
    /// among them: per stream exactly one of the competing appends wins, every retry of the
    /// winner gets its result, every other one is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_conflicts_and_retries_resolve_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let streams = 32;
        let mut tasks = Vec::new();
        let mut batches = Vec::new();
        for k in 0..streams {
            let s = stream(&format!("c{k}"));
            // Three competing first appends; each is sent twice (a retry racing the original).
            let candidates: Vec<Vec<NewEvent>> =
                (0..3).map(|j| vec![event(j), event(j + 10)]).collect();
            for (j, batch) in candidates.iter().enumerate() {
                for _ in 0..2 {
                    let (store, s, batch) = (store.clone(), s.clone(), batch.clone());
                    tasks.push((
                        k,
                        j,
                        tokio::spawn(async move {
                            store.append(&s, ExpectedVersion::NoStream, &batch).await
                        }),
                    ));
                }
            }
            batches.push(candidates);
        }
        let mut winners = vec![None; streams];
        let mut results: Vec<Vec<Vec<Result<AppendResult, StoreError>>>> =
            vec![vec![Vec::new(); 3]; streams];
        for (k, j, t) in tasks {
            results[k][j].push(t.await.unwrap());
        }
        for k in 0..streams {
            for (j, rs) in results[k].iter().enumerate() {
                match &rs[0] {
                    Ok(r) => {
                        assert_eq!(rs[1].as_ref(), Ok(r), "a retry gets the original result");
                        assert_eq!((r.first_version, r.last_version), (1, 2));
                        assert!(winners[k].replace(j).is_none(), "two winners on stream {k}");
                    }
                    Err(e) => {
                        assert!(
                            matches!(e, StoreError::WrongExpectedVersion { actual: 2, .. }),
                            "{e:?}"
                        );
                        assert_eq!(&rs[1], &rs[0]);
                    }
                }
            }
            let won = winners[k].expect("one append wins each stream");
            let read = store
                .read(&stream(&format!("c{k}")), ReadRequest::forwards(1, 10))
                .await
                .unwrap();
            let ids: Vec<_> = read.iter().map(|r| r.event_id).collect();
            let want: Vec<_> = batches[k][won].iter().map(|e| e.event_id).collect();
            assert_eq!(ids, want);
        }
        let page = store.poll(0, None, 1000).await.unwrap();
        assert_eq!(
            page.changes.len(),
            streams,
            "one change per stream, no more"
        );
    }

    /// A group whose commit fails acknowledges none of its members — not the appends it
    /// wrote, not the repeats and refusals judged against its lost state — and leaves
    /// nothing behind; the store then recovers and the retries are answered exactly.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_group_acknowledges_none_of_its_members() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = store_on_disk(&dir, Options::default());
        let (p, x, y) = (stream("p"), stream("x"), stream("y"));
        let original = vec![event(0)];
        let stored = store
            .append(&p, ExpectedVersion::NoStream, &original)
            .await
            .unwrap();
        let x_batch = vec![event(1), event(2)];
        let members: Vec<(StreamId, ExpectedVersion, Vec<NewEvent>)> = vec![
            (x.clone(), ExpectedVersion::NoStream, x_batch.clone()),
            (p.clone(), ExpectedVersion::NoStream, original.clone()), // a repeat
            (p.clone(), ExpectedVersion::NoStream, vec![event(4)]),   // a conflict
            (y.clone(), ExpectedVersion::Any, vec![event(3)]),
        ];
        // The disk fails once the group is queued and before the writer takes it.
        let (fail, commits) = (&disk, store.commits());
        store.hold.set(true);
        let spawn = |i: usize| {
            let store = store.clone();
            let (s, expected, batch) = members[i].clone();
            tokio::spawn(async move { store.append(&s, expected, &batch).await })
        };
        let first = spawn(0);
        until("the writer holds the first append", || {
            store.hold.waiting.load(Ordering::SeqCst)
        })
        .await;
        let mut tasks = vec![first];
        tasks.extend((1..members.len()).map(spawn));
        until("the group is queued", || {
            store.queued() == members.len() - 1
        })
        .await;
        fail.fail.store(true, Ordering::SeqCst);
        store.hold.set(false);
        let outcomes = futures_join(tasks).await;
        for (i, o) in outcomes.iter().enumerate() {
            assert!(
                matches!(
                    o,
                    Err(StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_))
                ),
                "member {i} of a failed group: {o:?}"
            );
        }
        assert_eq!(store.commits(), commits);
        assert!(store.ping().await.is_err(), "not healthy while writes fail");

        disk.fail.store(false, Ordering::SeqCst);
        store.ping().await.expect("recovers once the disk works");
        let read = |s: StreamId| {
            let store = store.clone();
            async move { store.read(&s, ReadRequest::forwards(1, 10)).await.unwrap() }
        };
        assert!(
            read(x.clone()).await.is_empty(),
            "nothing of the failed group"
        );
        assert!(
            read(y.clone()).await.is_empty(),
            "nothing of the failed group"
        );
        assert_eq!(read(p.clone()).await.len(), 1);
        // The retries, now in a group that commits, get exact answers.
        let x_ok = store
            .append(&x, ExpectedVersion::NoStream, &x_batch)
            .await
            .unwrap();
        assert_eq!((x_ok.first_version, x_ok.last_version), (1, 2));
        let again = store
            .append(&p, ExpectedVersion::NoStream, &original)
            .await
            .unwrap();
        assert_eq!(again, stored);
        assert!(matches!(
            store
                .append(&p, ExpectedVersion::NoStream, &[event(4)])
                .await,
            Err(StoreError::WrongExpectedVersion { actual: 1, .. })
        ));
        let changes = store.poll(0, None, 100).await.unwrap().changes;
        let changed: Vec<_> = changes.iter().map(|c| c.stream.id.as_str()).collect();
        assert_eq!(changed, vec!["p", "x"]);
    }

    async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    }

    /// With groups of one, every append is a commit of its own (the store before group
    /// commit): the knob really bounds the group.
    #[tokio::test(flavor = "multi_thread")]
    async fn groups_of_one_commit_each_append() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = store_on_disk(
            &dir,
            Options {
                group_max_appends: 1,
            },
        );
        let (syncs, commits) = (disk.syncs(), store.commits());
        let results = one_group(&store, 8, |store, i| {
            tokio::spawn(async move {
                let s = stream(&format!("one{i}"));
                store
                    .append(&s, ExpectedVersion::Any, &[event(i as u32)])
                    .await
            })
        })
        .await;
        for r in results {
            r.expect("append");
        }
        assert_eq!(store.commits() - commits, 8);
        assert!(disk.syncs() - syncs >= 8);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn recovers_from_io_errors_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = store_on_disk(&dir, Options::default());
        let s = stream("flaky");
        store
            .append(&s, ExpectedVersion::Any, &[event(1)])
            .await
            .unwrap();
        assert!(store.ping().await.is_ok());

        disk.fail.store(true, Ordering::SeqCst);
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

        disk.fail.store(false, Ordering::SeqCst);
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
