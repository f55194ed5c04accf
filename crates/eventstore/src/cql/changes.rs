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
use scylla::value::{CqlTimestamp, CqlTimeuuid};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Bucket-index rows read per query of a poll's walk.
const INDEX_PAGE: i32 = 256;

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
    pub(crate) async fn note_change(
        &self,
        stream: &StreamId,
        first: u64,
        last: u64,
    ) -> Result<Noted, StoreError> {
        let at = Instant::now();
        let (id, noted_at) = self.clock.next(crate::now_us());
        let bucket = bucket_of(noted_at, self.bucket_width_us());
        let shard = shard_of(stream, self.config.shard_count) as i32;
        let ttl = self.config.change_ttl.as_secs().clamp(1, i32::MAX as u64) as i32;
        let values = (
            shard,
            bucket,
            CqlTimeuuid::from(id),
            stream.kind.as_str(),
            stream.id.as_str(),
            first as i64,
            last as i64,
            ttl,
        );
        let session = self.session();
        let note = self.timed(session.execute_unpaged(&self.stmts.note_change, values));
        tokio::try_join!(self.index_bucket(shard, bucket), note)?;
        let mut noted = Noted {
            at_us: noted_at,
            at,
            acked_after: Duration::ZERO,
        };
        noted.acked_after = noted.age();
        Ok(noted)
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

    /// Records that `bucket` of `shard` holds notifications, once per process and bucket: the
    /// index lets a poll jump over empty buckets, however long the feed was idle.
    async fn index_bucket(&self, shard: i32, bucket: i64) -> Result<(), StoreError> {
        let known = self
            .indexed
            .lock()
            .map(|set| set.contains(&(shard, bucket)))
            .unwrap_or(false);
        if known {
            return Ok(());
        }
        // The index row must outlive the last notification of its bucket.
        let ttl = (self.config.change_ttl + self.config.change_bucket)
            .as_secs()
            .clamp(1, i32::MAX as u64) as i32;
        self.timed(
            self.session()
                .execute_unpaged(&self.stmts.index_bucket, (shard, bucket, ttl)),
        )
        .await?;
        if let Ok(mut set) = self.indexed.lock() {
            if set.len() >= 4 * self.config.shard_count as usize {
                // Only the current buckets matter; older entries are dropped, not kept forever.
                set.retain(|&(_, b)| b >= bucket - 1);
            }
            set.insert((shard, bucket));
        }
        Ok(())
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

    #[test]
    fn buckets_floor_negative_times() {
        assert_eq!(bucket_of(59_999_999, 60_000_000), 0);
        assert_eq!(bucket_of(60_000_000, 60_000_000), 1);
        assert_eq!(bucket_of(-1, 60_000_000), -1);
    }
}
