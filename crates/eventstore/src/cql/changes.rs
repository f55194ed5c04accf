//! The portable change log: the `changes` table the projector tails.
//!
//! Layout: partition `(shard, bucket)`, clustered by a timeuuid. `shard` is a stable hash of the
//! stream (FNV-1a, 64 bit, over `kind`, a separator byte and `id`) modulo the shard count, so
//! every process agrees on it whatever its build; `bucket` is the timeuuid's time divided by
//! the bucket width (a minute by default), so a partition never grows past one bucket's
//! appends of one shard. Rows carry the stream and the version range of one append and expire
//! after the configured TTL.
//!
//! A position is `"<bucket>:<timeuuid>"`. A poll reads the shard from the position (or from
//! `now - change_ttl`, where the oldest rows that can still exist are) up to
//! `now - confidence_window`: rows noted later than that may still be joined by rows noted
//! earlier but landing later, so they wait for the next poll.
//!
//! Empty buckets cost nothing to walk: the first notification a process writes into a
//! `(shard, bucket)` also writes a row of `change_buckets` (partition `shard`, clustered by
//! bucket), concurrently with the notification and before the append. A poll asks that index
//! which buckets between its position and the cutoff hold anything — one query, however long
//! the feed was idle — and reads only those. An index row lands no later than its bucket's first
//! notification, so the confidence window covers both.

use super::{error, Inner};
use crate::{Change, ChangePage, StoreError};
use esq_domain::StreamId;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::serialize::SerializationError;
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::{CqlTimestamp, CqlTimeuuid};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

/// Bucket-index rows read per query of a poll's walk.
const INDEX_PAGE: i32 = 256;

/// Most notification rows one group-commit flush writes (one unlogged batch).
pub(crate) const NOTE_BATCH: usize = 64;
/// Most group-commit flushes in flight at once. Two: one batch is being written while the
/// next one fills, so a notification waits for at most one write ahead of its own.
pub(crate) const NOTE_WRITERS: usize = 2;

/// A notification waiting for its flush.
pub(crate) struct Pending {
    kind: String,
    id: String,
    shard: i32,
    first: i64,
    last: i64,
    tx: oneshot::Sender<Result<Noted, StoreError>>,
}

/// The group-commit queue of notifications: appends queue theirs, flush tasks write what is
/// queued as one batch. Bounded: each queued row is one append waiting for it, and appends are
/// bounded by the service's concurrency.
#[derive(Default)]
pub(crate) struct Notifier {
    state: Mutex<NotifierState>,
}

#[derive(Default)]
struct NotifierState {
    queue: Vec<Pending>,
    flushing: usize,
}

impl Notifier {
    /// Queues a notification; `true` when the caller must start a flush (fewer than
    /// [`NOTE_WRITERS`] are running).
    fn push(&self, pending: Pending) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.queue.push(pending);
        if state.flushing < NOTE_WRITERS {
            state.flushing += 1;
            return true;
        }
        false
    }

    /// The next rows for `slot`'s flush to write, oldest first, at most [`NOTE_BATCH`]. When
    /// none are queued the flush ends, under the same lock, so that a notification queued
    /// meanwhile always finds a place to start a flush.
    fn take(&self, slot: &mut FlushSlot<'_>) -> Vec<Pending> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.queue.is_empty() {
            state.flushing = state.flushing.saturating_sub(1);
            slot.released = true;
            return Vec::new();
        }
        let n = state.queue.len().min(NOTE_BATCH);
        state.queue.drain(..n).collect()
    }
}

/// A running flush's place; freed when the queue is empty, or when the flush dies (a panic).
struct FlushSlot<'a> {
    notifier: &'a Notifier,
    released: bool,
}

impl Drop for FlushSlot<'_> {
    fn drop(&mut self) {
        if !self.released {
            let mut state = self
                .notifier
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            state.flushing = state.flushing.saturating_sub(1);
        }
    }
}

/// One row of a notification batch.
enum NoteRow<'a> {
    Index((i32, i64, i32)),
    #[allow(clippy::type_complexity)]
    Note((i32, i64, CqlTimeuuid, &'a str, &'a str, i64, i64, i32)),
}

impl SerializeRow for NoteRow<'_> {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match self {
            Self::Index(values) => values.serialize(ctx, writer),
            Self::Note(values) => values.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// 100-ns intervals between the Gregorian reform (the UUID v1 epoch) and the Unix epoch.
const UUID_EPOCH_OFFSET_TICKS: u64 = 0x01B2_1DD2_1381_4000;

/// The shard of a stream: FNV-1a (64 bit) of `kind`, a 0x1f separator and `id`, modulo
/// `shard_count`. Stable across processes, platforms and releases — it is part of the stored
/// data's layout, so it must never change.
pub fn shard_of(stream: &StreamId, shard_count: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let bytes = stream
        .kind
        .as_bytes()
        .iter()
        .chain(std::iter::once(&0x1f))
        .chain(stream.id.as_bytes());
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(PRIME);
    }
    (hash % u64::from(shard_count.max(1))) as u32
}

/// Issues version-1 (time-based) UUIDs for notifications: strictly increasing timestamps within
/// the process, and a random clock sequence and node per process so that two writers never
/// issue the same id.
pub(crate) struct TimeuuidClock {
    last_ticks: AtomicU64,
    clock_seq_and_node: [u8; 8],
}

impl TimeuuidClock {
    pub(crate) fn new() -> Self {
        let random = *Uuid::new_v4().as_bytes();
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&random[..8]);
        // RFC 4122 variant bits on the clock sequence, multicast bit on the random node id.
        tail[0] = (tail[0] & 0x3f) | 0x80;
        tail[2] |= 0x01;
        Self {
            last_ticks: AtomicU64::new(0),
            clock_seq_and_node: tail,
        }
    }

    /// A fresh timeuuid for `now_us` (or just after the previous one if the clock has not
    /// moved), and the µs time it encodes.
    pub(crate) fn next(&self, now_us: i64) -> (Uuid, i64) {
        let now_ticks = (now_us.max(0) as u64) * 10 + UUID_EPOCH_OFFSET_TICKS;
        let previous = self
            .last_ticks
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now_ticks.max(last + 1))
            })
            .unwrap_or(0);
        let ticks = now_ticks.max(previous + 1);
        let uuid = timeuuid_from_ticks(ticks, &self.clock_seq_and_node);
        (uuid, ticks_to_micros(ticks))
    }
}

fn timeuuid_from_ticks(ticks: u64, tail: &[u8; 8]) -> Uuid {
    let time_low = (ticks & 0xffff_ffff) as u32;
    let time_mid = ((ticks >> 32) & 0xffff) as u16;
    let time_hi_and_version = (((ticks >> 48) & 0x0fff) as u16) | 0x1000;
    Uuid::from_fields(time_low, time_mid, time_hi_and_version, tail)
}

fn ticks_to_micros(ticks: u64) -> i64 {
    (ticks.saturating_sub(UUID_EPOCH_OFFSET_TICKS) / 10) as i64
}

/// The time a version-1 UUID encodes, in µs since the Unix epoch.
pub(crate) fn timeuuid_micros(uuid: &Uuid) -> i64 {
    let (time_low, time_mid, time_hi_and_version, _) = uuid.as_fields();
    let ticks = (u64::from(time_hi_and_version & 0x0fff) << 48)
        | (u64::from(time_mid) << 32)
        | u64::from(time_low);
    ticks_to_micros(ticks)
}

/// Where a change sits in its shard: the time bucket and the row's timeuuid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) bucket: i64,
    pub(crate) id: Uuid,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.bucket, self.id)
    }
}

impl Position {
    pub(crate) fn parse(text: &str) -> Result<Self, StoreError> {
        let bad = || StoreError::Internal(format!("malformed change-feed position {text:?}"));
        let (bucket, id) = text.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            bucket: bucket.parse().map_err(|_| bad())?,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

/// Bucket of a µs timestamp.
pub(crate) fn bucket_of(time_us: i64, width_us: i64) -> i64 {
    time_us.div_euclid(width_us)
}

/// A notification an append wrote: when it was noted, and how long its write took to be
/// acknowledged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Noted {
    /// The time in the row's timeuuid, µs since the Unix epoch: what projectors compare
    /// against their own clock.
    pub(crate) at_us: i64,
    /// The local monotonic clock when the timeuuid was taken.
    pub(crate) at: Instant,
    /// The notification's age ([`Noted::age`]) when its write was acknowledged.
    pub(crate) acked_after: Duration,
}

impl Noted {
    /// Time since the notification was noted: the larger of the wall-clock difference (what a
    /// projector would see) and the monotonic one (what really passed, should the wall clock
    /// step back), so that a clock step never makes it look younger than it is.
    pub(crate) fn age(&self) -> Duration {
        let wall_us = crate::now_us().saturating_sub(self.at_us).max(0) as u64;
        Duration::from_micros(wall_us).max(self.at.elapsed())
    }
}

impl Inner {
    fn bucket_width_us(&self) -> i64 {
        (self.config.change_bucket.as_micros() as i64).max(1_000_000)
    }

    /// Writes the notification for an append of `first..=last` to `stream`. Called before the
    /// conditional batch, so a committed append always has one; the caller then decides from
    /// the returned [`Noted`] whether the batch may still be sent (see `append::batch_guard`).
    ///
    /// Group commit: the notification joins the queue of the store's [`Notifier`]; the writer
    /// that finds fewer than [`NOTE_WRITERS`] flushes running starts one, and each flush
    /// writes everything queued (up to [`NOTE_BATCH`] rows) as one unlogged batch, with the
    /// bucket-index rows it needs. Every row keeps its own timeuuid, taken when its flush
    /// starts, so `noted_at` and `acked_after` are those of the shared write.
    pub(crate) async fn note_change(
        self: &Arc<Self>,
        stream: &StreamId,
        first: u64,
        last: u64,
    ) -> Result<Noted, StoreError> {
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            kind: stream.kind.clone(),
            id: stream.id.clone(),
            shard: shard_of(stream, self.config.shard_count) as i32,
            first: first as i64,
            last: last as i64,
            tx,
        };
        if self.notifier.push(pending) {
            // The flush is a task of its own: a caller that gives up (a cancelled request)
            // must not strand the notifications of the others queued behind it.
            let inner = Arc::clone(self);
            tokio::spawn(async move { inner.flush_notes().await });
        }
        // The flush answers within the request timeout; the bound only guards against a
        // flush task that died (a panic), which drops the sender.
        match tokio::time::timeout(2 * self.config.request_timeout, rx).await {
            Ok(Ok(noted)) => noted,
            Ok(Err(_)) | Err(_) => Err(StoreError::Unavailable(format!(
                "the change-log notification of {stream} got no answer"
            ))),
        }
    }

    /// Writes queued notifications until the queue is empty, one batch at a time.
    async fn flush_notes(&self) {
        let mut slot = FlushSlot {
            notifier: &self.notifier,
            released: false,
        };
        loop {
            let rows = self.notifier.take(&mut slot);
            if rows.is_empty() {
                return;
            }
            let at = Instant::now();
            let now = crate::now_us();
            let width = self.bucket_width_us();
            let ttl = self.config.change_ttl.as_secs().clamp(1, i32::MAX as u64) as i32;
            let mut stamped = Vec::with_capacity(rows.len());
            for row in rows {
                let (id, noted_at) = self.clock.next(now);
                stamped.push((row, id, noted_at, bucket_of(noted_at, width)));
            }
            let fresh: Vec<(i32, i64)> = {
                let known = self.indexed.lock().ok();
                let mut fresh = Vec::new();
                for (row, _, _, bucket) in &stamped {
                    let key = (row.shard, *bucket);
                    let seen = known.as_ref().is_some_and(|set| set.contains(&key));
                    if !seen && !fresh.contains(&key) {
                        fresh.push(key);
                    }
                }
                fresh
            };
            // The index row must outlive the last notification of its bucket.
            let index_ttl = (self.config.change_ttl + self.config.change_bucket)
                .as_secs()
                .clamp(1, i32::MAX as u64) as i32;
            let mut rows = Vec::with_capacity(stamped.len() + fresh.len());
            for &(shard, bucket) in &fresh {
                rows.push(NoteRow::Index((shard, bucket, index_ttl)));
            }
            for (row, id, _, bucket) in &stamped {
                rows.push(NoteRow::Note((
                    row.shard,
                    *bucket,
                    CqlTimeuuid::from(*id),
                    row.kind.as_str(),
                    row.id.as_str(),
                    row.first,
                    row.last,
                    ttl,
                )));
            }
            let written = self.write_notes(rows, stamped.len() > 1).await;
            let acked = Instant::now();
            if written.is_ok() {
                if let Ok(mut set) = self.indexed.lock() {
                    for &(shard, bucket) in &fresh {
                        if set.len() >= 4 * self.config.shard_count as usize {
                            // Only the current buckets matter; older entries are dropped.
                            set.retain(|&(_, b)| b >= bucket - 1);
                        }
                        set.insert((shard, bucket));
                    }
                }
            }
            for (row, _, noted_at, _) in stamped {
                let answer = match &written {
                    Ok(_) => {
                        let mut noted = Noted {
                            at_us: noted_at,
                            at,
                            acked_after: Duration::ZERO,
                        };
                        // As old as the wall clock or the monotonic clock says, whichever is
                        // more (see `Noted::age`), at the moment of the acknowledgement.
                        let wall_us = crate::now_us().saturating_sub(noted_at).max(0) as u64;
                        noted.acked_after =
                            Duration::from_micros(wall_us).max(acked.duration_since(at));
                        Ok(noted)
                    }
                    Err(e) => Err(e.clone()),
                };
                // A caller that gave up has dropped its receiver; its row is an orphan.
                let _ = row.tx.send(answer);
            }
        }
    }

    /// Writes a flush's rows: one unlogged batch when several appends share it, else each row
    /// as a plain statement, concurrently (a lone notification gains nothing from a batch).
    async fn write_notes(&self, rows: Vec<NoteRow<'_>>, grouped: bool) -> Result<(), StoreError> {
        let session = self.session();
        if grouped {
            let mut batch = Batch::new(BatchType::Unlogged);
            batch.set_is_idempotent(true);
            for row in &rows {
                batch.append_statement(match row {
                    NoteRow::Index(_) => self.stmts.index_bucket.clone(),
                    NoteRow::Note(_) => self.stmts.note_change.clone(),
                });
            }
            self.timed(session.batch(&batch, rows)).await?;
            return Ok(());
        }
        let writes = rows.into_iter().map(|row| {
            let session = Arc::clone(&session);
            async move {
                match row {
                    NoteRow::Index(values) => {
                        self.timed(session.execute_unpaged(&self.stmts.index_bucket, values))
                            .await
                    }
                    NoteRow::Note(values) => {
                        self.timed(session.execute_unpaged(&self.stmts.note_change, values))
                            .await
                    }
                }
            }
        });
        futures::future::try_join_all(writes).await?;
        Ok(())
    }

    /// A position of `shard` just before every notification noted at or after `time_us`: the
    /// time's bucket, and a timeuuid one tick (100 ns) before the time (rows compare by time
    /// first, so the clock sequence and node do not matter).
    pub(crate) fn position_before(&self, time_us: i64) -> String {
        let ticks = (time_us.max(0) as u64) * 10 + UUID_EPOCH_OFFSET_TICKS - 1;
        Position {
            bucket: bucket_of(time_us, self.bucket_width_us()),
            id: timeuuid_from_ticks(ticks, &[0x80, 0, 0, 0, 0, 0, 0, 0]),
        }
        .to_string()
    }

    /// [`crate::ChangeFeed::poll`] over the `changes` table.
    pub(crate) async fn poll_changes(
        &self,
        shard: u32,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ChangePage, StoreError> {
        if shard >= self.config.shard_count {
            return Err(StoreError::Internal(format!(
                "shard {shard} does not exist: the feed has {} shards",
                self.config.shard_count
            )));
        }
        let mut page = ChangePage::default();
        if limit == 0 {
            return Ok(page);
        }
        let limit = limit as usize;
        let width = self.bucket_width_us();
        let now = crate::now_us();
        let cutoff = now - self.config.confidence_window.as_micros() as i64;
        let oldest = bucket_of(now - self.config.change_ttl.as_micros() as i64, width);
        let newest = bucket_of(cutoff, width);

        let (start, lower) = match after {
            Some(text) => {
                let p = Position::parse(text)?;
                (p.bucket, Some(p.id))
            }
            None => (oldest, None),
        };
        // Everything before `oldest` has expired: the walk need not look at it.
        let (start, lower) = if start < oldest {
            (oldest, None)
        } else {
            (start, lower)
        };
        // Rows strictly before minTimeuuid(cutoff in ms): every row noted before the cutoff.
        let cutoff_ts = CqlTimestamp(cutoff.div_euclid(1000));
        let mut from_bucket = start;
        'walk: while from_bucket <= newest {
            let buckets = self.indexed_buckets(shard, from_bucket, newest).await?;
            for &b in &buckets {
                let remaining = (limit - page.changes.len()).min(i32::MAX as usize) as i32;
                let after_id = if b == start { lower } else { None };
                for (change, id) in self
                    .read_bucket(shard, b, after_id, cutoff_ts, remaining)
                    .await?
                {
                    page.changes.push(change);
                    page.positions.push(Position { bucket: b, id }.to_string());
                }
                if page.changes.len() >= limit {
                    break 'walk;
                }
            }
            match buckets.last() {
                Some(&last) if buckets.len() == INDEX_PAGE as usize => from_bucket = last + 1,
                _ => break,
            }
        }
        Ok(page)
    }

    /// The buckets of `shard` in `from..=to` that hold notifications, in order.
    async fn indexed_buckets(
        &self,
        shard: u32,
        from: i64,
        to: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let values = (shard as i32, from, to, INDEX_PAGE);
        let rows = self
            .timed(self.session().execute_unpaged(&self.stmts.buckets, values))
            .await?
            .into_rows_result()
            .map_err(error::into_rows)?;
        let mut buckets = Vec::with_capacity(rows.rows_num());
        for row in rows.rows::<(i64,)>().map_err(error::rows)? {
            buckets.push(row.map_err(error::deserialize)?.0);
        }
        Ok(buckets)
    }

    async fn read_bucket(
        &self,
        shard: u32,
        bucket: i64,
        after: Option<Uuid>,
        cutoff: CqlTimestamp,
        limit: i32,
    ) -> Result<Vec<(Change, Uuid)>, StoreError> {
        let shard = shard as i32;
        let result = match after {
            Some(id) => {
                let values = (shard, bucket, CqlTimeuuid::from(id), cutoff, limit);
                self.timed(
                    self.session()
                        .execute_unpaged(&self.stmts.changes_after, values),
                )
                .await?
            }
            None => {
                let values = (shard, bucket, cutoff, limit);
                self.timed(
                    self.session()
                        .execute_unpaged(&self.stmts.changes_from_start, values),
                )
                .await?
            }
        };
        let rows = result.into_rows_result().map_err(error::into_rows)?;
        let mut out = Vec::with_capacity(rows.rows_num());
        for row in rows
            .rows::<(CqlTimeuuid, String, String, i64, i64)>()
            .map_err(error::rows)?
        {
            let (id, kind, stream_id, first, last) = row.map_err(error::deserialize)?;
            let id = Uuid::from(id);
            out.push((
                Change {
                    stream: StreamId {
                        kind,
                        id: stream_id,
                    },
                    first_version: first.max(0) as u64,
                    last_version: last.max(0) as u64,
                    noted_at_us: timeuuid_micros(&id),
                },
                id,
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(kind: &str, id: &str) -> StreamId {
        StreamId::new(kind, id).expect("valid stream id")
    }

    #[test]
    fn shard_hash_is_stable() {
        // Pinned values: changing the hash would move streams between shards of live data.
        assert_eq!(shard_of(&stream("cart", "c-1"), u32::MAX), 3_879_138_833);
        assert_eq!(shard_of(&stream("book", "978-3-16-148410-0"), 1024), 445);
        assert_eq!(shard_of(&stream("cart", "c-1"), 1), 0);
        assert_eq!(shard_of(&stream("cart", "c-1"), 0), 0);
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            shard_of(&stream("ab", "c"), u32::MAX),
            shard_of(&stream("a", "bc"), u32::MAX)
        );
    }

    #[test]
    fn shards_spread_streams() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[shard_of(&stream("cart", &format!("c-{i}")), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    #[test]
    fn timeuuids_are_v1_increasing_and_carry_their_time() {
        let clock = TimeuuidClock::new();
        let now = 1_764_000_000_123_456;
        let (a, at) = clock.next(now);
        let (b, bt) = clock.next(now);
        let (c, ct) = clock.next(now - 5_000_000);
        assert_eq!(a.get_version_num(), 1);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(at, now);
        assert_eq!(timeuuid_micros(&a), now);
        // Same µs: the next id is one tick (100 ns) later and still decodes to that µs.
        assert_eq!(bt, now);
        assert!(timeuuid_micros(&b) >= now && b != a);
        // A clock that steps back never makes ids go back.
        assert!(ct >= bt && c != b);
        let ticks = |u: &Uuid| {
            let (lo, mid, hi, _) = u.as_fields();
            (u64::from(hi & 0x0fff) << 48) | (u64::from(mid) << 32) | u64::from(lo)
        };
        assert!(ticks(&a) < ticks(&b) && ticks(&b) < ticks(&c));
    }

    #[test]
    fn positions_round_trip() {
        let p = Position {
            bucket: 29_400_000,
            id: TimeuuidClock::new().next(1_764_000_000_000_000).0,
        };
        assert_eq!(Position::parse(&p.to_string()).expect("parses"), p);
        assert!(Position::parse("nonsense").is_err());
        assert!(Position::parse("12:not-a-uuid").is_err());
    }

    fn pending(n: i64) -> (Pending, oneshot::Receiver<Result<Noted, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        let p = Pending {
            kind: "cart".into(),
            id: format!("c-{n}"),
            shard: 0,
            first: n,
            last: n,
            tx,
        };
        (p, rx)
    }

    #[test]
    fn the_notifier_groups_what_queues_behind_its_running_flushes() {
        let notifier = Notifier::default();
        let mut receivers = Vec::new();
        let mut starts = 0;
        for n in 0..(NOTE_BATCH as i64 + 10) {
            let (p, rx) = pending(n);
            receivers.push(rx);
            if notifier.push(p) {
                starts += 1;
            }
        }
        assert_eq!(starts, NOTE_WRITERS, "only that many flushes run at once");
        let mut slot = FlushSlot {
            notifier: &notifier,
            released: false,
        };
        let first = notifier.take(&mut slot);
        assert_eq!(first.len(), NOTE_BATCH, "one flush writes at most a batch");
        assert_eq!(first[0].first, 0, "oldest first");
        let rest = notifier.take(&mut slot);
        assert_eq!(rest.len(), 10);
        assert!(!slot.released);
        // An empty queue ends the flush and frees its place at once...
        assert!(notifier.take(&mut slot).is_empty());
        assert!(slot.released);
        let (p, _rx) = pending(99);
        assert!(
            notifier.push(p),
            "...so the next notification starts a flush"
        );
        drop(slot);
        let state = notifier.state.lock().expect("lock");
        assert_eq!(
            state.flushing, NOTE_WRITERS,
            "a released slot is not freed twice"
        );
    }

    #[test]
    fn a_flush_that_dies_frees_its_place() {
        let notifier = Notifier::default();
        for n in 0..NOTE_WRITERS as i64 {
            assert!(notifier.push(pending(n).0));
        }
        assert!(!notifier.push(pending(9).0));
        drop(FlushSlot {
            notifier: &notifier,
            released: false,
        });
        assert!(notifier.push(pending(10).0));
    }

    #[test]
    fn buckets_floor_negative_times() {
        assert_eq!(bucket_of(59_999_999, 60_000_000), 0);
        assert_eq!(bucket_of(60_000_000, 60_000_000), 1);
        assert_eq!(bucket_of(-1, 60_000_000), -1);
    }
}
