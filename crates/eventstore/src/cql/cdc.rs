//! ScyllaDB native CDC as the change feed ([`super::FeedKind::ScyllaCdc`]).
//!
//! With this feed the events table is created `WITH cdc = {'enabled': true, 'ttl': …}`, appends
//! write no notification row, and the projector's polls are served from the CDC log through the
//! `scylla-cdc` crate: one [`CDCLogReader`] per store, started at the first poll from
//! `now - change_ttl` (the log's own TTL) and reading up to `now - confidence_window` (its
//! safety interval). Each append is one CDC batch: its event rows (one `RowInsert` per event,
//! consecutive, same `cdc$time`) are folded into one [`Change`] per stream and batch, and the
//! delta row of the static `head` update (its clustering key `version` is null) is skipped.
//!
//! Each shard keeps a [`ShardBuffer`] of the changes it served that no poll has acknowledged
//! yet. A poll first drops the buffered changes up to and including its `after` (the projector
//! passes the position of the last change it fully processed), then serves what is left of the
//! buffer followed by changes newly taken from the shard's queue. So a projector that stops
//! partway through a page (events not in the store yet, a read-store error) is served the rest
//! again instead of losing it.
//!
//! Limits, by design of a push-based reader behind a pull-based trait:
//! - Positions (`"cdc:<feed instance>:<sequence>"`, both 16 hex digits) are unique and ordered
//!   within the process only: the reader restarts from `now - change_ttl` when the process does,
//!   and a position of another instance acknowledges nothing, so delivery is at least once. The
//!   projector's version fence makes repeats harmless.
//! - Changes are routed to per-shard bounded queues; a shard's buffer takes no more from its
//!   queue once it holds [`BUFFER_PER_SHARD`] unacknowledged changes, and the reader waits
//!   while a queue is full, so a process using this feed must poll, and acknowledge, every
//!   shard: a single projector replica owning all shards. Replicas sharing shards need the
//!   `changes` table feed.
//! - Nothing here can run against Apache Cassandra, which has no CDC log table: the Cassandra
//!   test suite covers only the row-to-change conversion below, with hand-built CDC rows.

use crate::{now_us, Change, ChangePage, StoreError};
use esq_domain::StreamId;
use scylla::client::session::Session;
use scylla::value::CqlValue;
use scylla_cdc::consumer::{CDCRow, Consumer, ConsumerFactory, OperationType};
use scylla_cdc::log_reader::{CDCLogReader, CDCLogReaderBuilder};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use uuid::Uuid;

/// Changes queued per shard between the reader and the polls before the reader waits.
const QUEUE_PER_SHARD: usize = 1024;

/// Served but unacknowledged changes a shard keeps before it takes no more from its queue.
pub(crate) const BUFFER_PER_SHARD: usize = 1024;

/// What one CDC log row of the events table means to the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CdcEvent {
    /// `cdc$time`: the write's timeuuid, shared by every row of one batch.
    pub(crate) time: Uuid,
    /// `cdc$end_of_batch`.
    pub(crate) end_of_batch: bool,
    /// The stream and version of an inserted event; `None` for rows that are not events (the
    /// static `head` update, pre/post images, deletions, expiries).
    pub(crate) event: Option<(StreamId, u64)>,
}

impl CdcEvent {
    /// Reads the columns the feed needs from a CDC log row.
    pub(crate) fn from_row(mut row: CDCRow<'_>) -> Self {
        let is_event_write = matches!(
            row.operation,
            OperationType::RowInsert | OperationType::RowUpdate
        ) && !row.is_expiration;
        let event = if is_event_write {
            let version = match row.take_value("version") {
                Some(CqlValue::BigInt(v)) if v > 0 => Some(v as u64),
                _ => None,
            };
            let kind = text(row.take_value("stream_type"));
            let id = text(row.take_value("stream_id"));
            match (kind, id, version) {
                (Some(kind), Some(id), Some(version)) => Some((StreamId { kind, id }, version)),
                _ => None,
            }
        } else {
            None
        };
        Self {
            time: row.time,
            end_of_batch: row.end_of_batch,
            event,
        }
    }
}

fn text(value: Option<CqlValue>) -> Option<String> {
    match value {
        Some(CqlValue::Text(s)) | Some(CqlValue::Ascii(s)) => Some(s),
        _ => None,
    }
}

/// Folds the event rows of one CDC batch into one change per stream.
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    open: Option<(Uuid, Change)>,
}

impl Coalescer {
    /// Takes the next row of a CDC stream (rows arrive in `cdc$time`, `cdc$batch_seq_no`
    /// order); returns the changes this row completes.
    pub(crate) fn push(&mut self, row: CdcEvent) -> Vec<Change> {
        let mut done = Vec::new();
        if let Some((stream, version)) = row.event {
            let extends =
                matches!(&self.open, Some((time, c)) if *time == row.time && c.stream == stream);
            if extends {
                if let Some((_, change)) = self.open.as_mut() {
                    change.first_version = change.first_version.min(version);
                    change.last_version = change.last_version.max(version);
                }
            } else {
                done.extend(self.open.take().map(|(_, c)| c));
                let noted_at_us = super::changes::timeuuid_micros(&row.time);
                self.open = Some((
                    row.time,
                    Change {
                        stream,
                        first_version: version,
                        last_version: version,
                        noted_at_us,
                    },
                ));
            }
        }
        if row.end_of_batch {
            done.extend(self.open.take().map(|(_, c)| c));
        }
        done
    }
}

/// The changes a shard served that no poll has acknowledged yet, with their positions.
#[derive(Debug)]
pub(crate) struct ShardBuffer {
    /// Tags this feed's positions, so that a checkpoint saved by another process (or another
    /// feed) acknowledges nothing here.
    instance: u64,
    /// Sequence number of the next change taken in.
    next_seq: u64,
    /// Most changes held.
    cap: usize,
    /// `(sequence, change)`, oldest first.
    entries: VecDeque<(u64, Change)>,
}

impl ShardBuffer {
    pub(crate) fn new(instance: u64, cap: usize) -> Self {
        Self {
            instance,
            next_seq: 1,
            cap: cap.max(1),
            entries: VecDeque::new(),
        }
    }

    fn position(&self, seq: u64) -> String {
        format!("cdc:{:016x}:{seq:016x}", self.instance)
    }

    /// The sequence number a position names, if it is one of this buffer's instance.
    fn sequence(&self, position: &str) -> Option<u64> {
        let (instance, seq) = position.strip_prefix("cdc:")?.split_once(':')?;
        if u64::from_str_radix(instance, 16).ok()? != self.instance {
            return None;
        }
        u64::from_str_radix(seq, 16).ok()
    }

    /// Drops the changes up to and including `after`, the last one the caller fully processed.
    /// Positions it did not issue (another process's, malformed) acknowledge nothing.
    pub(crate) fn acknowledge(&mut self, after: Option<&str>) {
        if let Some(last) = after.and_then(|p| self.sequence(p)) {
            while self.entries.front().is_some_and(|(seq, _)| *seq <= last) {
                self.entries.pop_front();
            }
        }
    }

    /// Serves at most `limit` changes: first the buffered ones, then new ones from `next`,
    /// which are buffered too, as long as the buffer has room.
    pub(crate) fn page(
        &mut self,
        limit: usize,
        mut next: impl FnMut() -> Option<Change>,
    ) -> ChangePage {
        let mut page = ChangePage::default();
        for (seq, change) in self.entries.iter().take(limit) {
            page.changes.push(change.clone());
            page.positions.push(self.position(*seq));
        }
        while page.changes.len() < limit && self.entries.len() < self.cap {
            let Some(change) = next() else { break };
            let seq = self.next_seq;
            self.next_seq += 1;
            page.changes.push(change.clone());
            page.positions.push(self.position(seq));
            self.entries.push_back((seq, change));
        }
        page
    }

    /// Number of changes held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// One shard of the feed: the queue the reader fills and the unacknowledged changes.
struct Shard {
    queue: mpsc::Receiver<Change>,
    buffer: ShardBuffer,
}

/// The CDC-backed feed of one store.
pub(crate) struct CdcFeed {
    session: Arc<Session>,
    keyspace: String,
    confidence_window: Duration,
    lookback: Duration,
    senders: Arc<Vec<mpsc::Sender<Change>>>,
    shards: Vec<Mutex<Shard>>,
    reader: Mutex<Option<Running>>,
}

struct Running {
    reader: CDCLogReader,
    failure: Arc<StdMutex<Option<String>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.reader.stop();
    }
}

impl CdcFeed {
    pub(crate) fn new(
        session: Arc<Session>,
        keyspace: String,
        shard_count: u32,
        confidence_window: Duration,
        lookback: Duration,
    ) -> Self {
        let instance = Uuid::new_v4().as_u64_pair().0;
        let (senders, shards) = (0..shard_count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE_PER_SHARD);
                let shard = Shard {
                    queue: rx,
                    buffer: ShardBuffer::new(instance, BUFFER_PER_SHARD),
                };
                (tx, Mutex::new(shard))
            })
            .unzip();
        Self {
            session,
            keyspace,
            confidence_window,
            lookback,
            senders: Arc::new(senders),
            shards,
            reader: Mutex::new(None),
        }
    }

    /// Changes of `shard` the reader has delivered and no poll has acknowledged, at most
    /// `limit`: `after` acknowledges the changes up to and including it.
    pub(crate) async fn poll(
        &self,
        shard: u32,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ChangePage, StoreError> {
        let slot = self.shards.get(shard as usize).ok_or_else(|| {
            StoreError::Internal(format!(
                "shard {shard} does not exist: the feed has {} shards",
                self.shards.len()
            ))
        })?;
        self.ensure_reader().await?;
        let mut guard = slot.lock().await;
        let Shard { queue, buffer } = &mut *guard;
        buffer.acknowledge(after);
        Ok(buffer.page(limit as usize, || queue.try_recv().ok()))
    }

    async fn ensure_reader(&self) -> Result<(), StoreError> {
        let mut running = self.reader.lock().await;
        if let Some(r) = running.as_ref() {
            let failure = r.failure.lock().ok().and_then(|mut f| f.take());
            if let Some(reason) = failure {
                // Dropping it stops what is left; the next poll starts a fresh reader.
                *running = None;
                return Err(StoreError::Unavailable(format!(
                    "CDC log reader failed: {reason}"
                )));
            }
            return Ok(());
        }
        let start_us = (now_us() - self.lookback.as_micros() as i64).max(0);
        let factory = Arc::new(Factory {
            senders: Arc::clone(&self.senders),
        });
        let (reader, handle) = CDCLogReaderBuilder::new()
            .session(Arc::clone(&self.session))
            .keyspace(&self.keyspace)
            .table_name("events")
            .start_timestamp(Duration::from_micros(start_us as u64))
            .safety_interval(self.confidence_window)
            .sleep_interval(
                self.confidence_window
                    .clamp(Duration::from_millis(100), Duration::from_secs(1)),
            )
            .window_size(Duration::from_secs(60))
            .consumer_factory(factory)
            .build()
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the CDC log reader: {e}"))
            })?;
        let failure = Arc::new(StdMutex::new(None));
        let report = Arc::clone(&failure);
        tokio::spawn(async move {
            if let Err(e) = handle.await {
                tracing::warn!(error = %e, "CDC log reader stopped");
                if let Ok(mut slot) = report.lock() {
                    *slot = Some(e.to_string());
                }
            }
        });
        *running = Some(Running { reader, failure });
        Ok(())
    }
}

struct Factory {
    senders: Arc<Vec<mpsc::Sender<Change>>>,
}

impl ConsumerFactory for Factory {
    fn new_consumer<'life0, 'async_trait>(
        &'life0 self,
    ) -> Pin<Box<dyn Future<Output = Box<dyn Consumer>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let consumer: Box<dyn Consumer> = Box::new(EventsConsumer {
            senders: Arc::clone(&self.senders),
            coalescer: Coalescer::default(),
        });
        Box::pin(async move { consumer })
    }
}

struct EventsConsumer {
    senders: Arc<Vec<mpsc::Sender<Change>>>,
    coalescer: Coalescer,
}

impl Consumer for EventsConsumer {
    fn consume_cdc<'life0, 'life1, 'async_trait>(
        &'life0 mut self,
        data: CDCRow<'life1>,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let changes = self.coalescer.push(CdcEvent::from_row(data));
        let senders = Arc::clone(&self.senders);
        Box::pin(async move {
            let shards = senders.len() as u32;
            for change in changes {
                let shard = super::changes::shard_of(&change.stream, shards) as usize;
                if let Some(tx) = senders.get(shard) {
                    // Waits while the shard's queue is full: backpressure on the reader.
                    tx.send(change)
                        .await
                        .map_err(|_| anyhow::anyhow!("the change feed was dropped"))?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scylla::frame::response::result::{ColumnSpec, ColumnType, NativeType, TableSpec};
    use scylla::response::query_result::ColumnSpecs;
    use scylla::value::{CqlTimeuuid, Row};
    use scylla_cdc::consumer::CDCRowSchema;

    const TABLE: TableSpec<'static> = TableSpec::borrowed("ks", "events_scylla_cdc_log");

    fn spec(name: &'static str, typ: NativeType) -> ColumnSpec<'static> {
        ColumnSpec::borrowed(name, ColumnType::Native(typ), TABLE)
    }

    /// The columns of the events table's CDC log the conversion reads, in log order.
    fn schema() -> CDCRowSchema {
        let specs = [
            spec("cdc$stream_id", NativeType::Blob),
            spec("cdc$time", NativeType::Timeuuid),
            spec("cdc$batch_seq_no", NativeType::Int),
            spec("cdc$end_of_batch", NativeType::Boolean),
            spec("cdc$operation", NativeType::TinyInt),
            spec("cdc$ttl", NativeType::BigInt),
            spec("stream_type", NativeType::Text),
            spec("stream_id", NativeType::Text),
            spec("bucket", NativeType::Int),
            spec("version", NativeType::BigInt),
            spec("head", NativeType::BigInt),
            spec("cdc$deleted_head", NativeType::Boolean),
            spec("event_id", NativeType::Uuid),
            spec("cdc$deleted_event_id", NativeType::Boolean),
        ];
        CDCRowSchema::new(ColumnSpecs::new(&specs))
    }

    fn row(time: Uuid, seq: i32, end: bool, op: i8, version: Option<i64>) -> Row {
        let head = version.is_none().then_some(CqlValue::BigInt(7));
        Row {
            columns: vec![
                Some(CqlValue::Blob(vec![1, 2, 3])),
                Some(CqlValue::Timeuuid(CqlTimeuuid::from(time))),
                Some(CqlValue::Int(seq)),
                end.then_some(CqlValue::Boolean(true)),
                Some(CqlValue::TinyInt(op)),
                None,
                Some(CqlValue::Text("cart".into())),
                Some(CqlValue::Text("c-1".into())),
                Some(CqlValue::Int(0)),
                version.map(CqlValue::BigInt),
                head,
                None,
                version.map(|v| CqlValue::Uuid(Uuid::from_u128(v as u128))),
                None,
            ],
        }
    }

    fn stream() -> StreamId {
        StreamId::new("cart", "c-1").expect("valid")
    }

    #[test]
    fn an_append_batch_becomes_one_change_and_the_head_delta_is_skipped() {
        let schema = schema();
        let (time, noted_at) =
            super::super::changes::TimeuuidClock::new().next(1_764_000_000_000_000);
        // One append of versions 5..=7: the static head update, then three inserts.
        let rows = [
            row(time, 0, false, 1, None),
            row(time, 1, false, 2, Some(5)),
            row(time, 2, false, 2, Some(6)),
            row(time, 3, true, 2, Some(7)),
        ];
        let mut coalescer = Coalescer::default();
        let mut changes = Vec::new();
        for r in rows {
            let event = CdcEvent::from_row(CDCRow::from_row(r, &schema));
            changes.extend(coalescer.push(event));
        }
        assert_eq!(
            changes,
            vec![Change {
                stream: stream(),
                first_version: 5,
                last_version: 7,
                noted_at_us: noted_at,
            }]
        );
    }

    #[test]
    fn the_static_row_alone_is_not_an_event() {
        let schema = schema();
        let time = Uuid::from_u128(1 << 76 | 1);
        let event = CdcEvent::from_row(CDCRow::from_row(row(time, 0, true, 1, None), &schema));
        assert_eq!(event.event, None);
        assert!(Coalescer::default().push(event).is_empty());
        // Pre-images, deletions and expiries are not events either.
        for op in [0, 3, 4, -3] {
            let event =
                CdcEvent::from_row(CDCRow::from_row(row(time, 0, true, op, Some(1)), &schema));
            assert_eq!(event.event, None, "operation {op}");
        }
    }

    fn change(n: u64) -> Change {
        Change {
            stream: StreamId::new("cart", format!("c-{n}")).expect("valid"),
            first_version: n,
            last_version: n,
            noted_at_us: n as i64,
        }
    }

    /// A queue of hand-built changes `from..to`, as the reader would deliver them.
    fn queue(range: std::ops::Range<u64>) -> impl FnMut() -> Option<Change> {
        let mut pending: VecDeque<Change> = range.map(change).collect();
        move || pending.pop_front()
    }

    fn versions(page: &ChangePage) -> Vec<u64> {
        page.changes.iter().map(|c| c.last_version).collect()
    }

    #[test]
    fn a_page_left_partway_is_served_again_from_the_acknowledged_position() {
        let mut buffer = ShardBuffer::new(7, 100);
        let mut next = queue(1..11);
        let first = buffer.page(4, &mut next);
        assert_eq!(versions(&first), [1, 2, 3, 4]);
        assert_eq!(first.positions.len(), 4);
        // The projector processed 1 and 2, then stopped (events of 3 not in the store yet).
        buffer.acknowledge(Some(&first.positions[1]));
        let second = buffer.page(4, &mut next);
        assert_eq!(
            versions(&second),
            [3, 4, 5, 6],
            "the rest of the page, then new changes"
        );
        assert_eq!(
            &second.positions[..2],
            &first.positions[2..],
            "same positions again"
        );
        // Nothing processed (a read-store error): the same page again.
        buffer.acknowledge(first.positions.get(1).map(String::as_str));
        assert_eq!(buffer.page(4, &mut next), second);
        // All processed.
        buffer.acknowledge(second.positions.last().map(String::as_str));
        assert_eq!(versions(&buffer.page(100, &mut next)), [7, 8, 9, 10]);
    }

    #[test]
    fn positions_are_unique_and_ordered() {
        let mut buffer = ShardBuffer::new(u64::MAX, 1000);
        let mut next = queue(0..300);
        let mut all = Vec::new();
        for _ in 0..3 {
            let page = buffer.page(100, &mut next);
            buffer.acknowledge(page.positions.last().map(String::as_str));
            all.extend(page.positions);
        }
        assert_eq!(all.len(), 300);
        assert!(
            all.windows(2).all(|w| w[0] < w[1]),
            "strictly increasing as text"
        );
        let seqs: Vec<u64> = all.iter().filter_map(|p| buffer.sequence(p)).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "and as numbers");
        assert_eq!(seqs.len(), 300);
    }

    #[test]
    fn foreign_or_old_positions_acknowledge_nothing() {
        let mut buffer = ShardBuffer::new(1, 100);
        let page = buffer.page(3, queue(1..4));
        let other = ShardBuffer::new(2, 100);
        for foreign in [
            other.position(99),
            format!("cdc:{}", Uuid::nil()),
            "12:3".to_owned(),
            String::new(),
        ] {
            buffer.acknowledge(Some(&foreign));
            assert_eq!(buffer.len(), 3, "{foreign:?}");
        }
        buffer.acknowledge(None);
        assert_eq!(buffer.page(10, queue(0..0)), page);
        // A position past everything held acknowledges everything.
        buffer.acknowledge(Some(&buffer.position(1_000)));
        assert_eq!(buffer.len(), 0);
    }

    #[test]
    fn a_full_buffer_stops_taking_from_the_queue() {
        let mut buffer = ShardBuffer::new(1, 5);
        let taken = std::cell::Cell::new(0);
        let mut pending: VecDeque<Change> = (1..20).map(change).collect();
        let mut next = || {
            taken.set(taken.get() + 1);
            pending.pop_front()
        };
        let page = buffer.page(100, &mut next);
        assert_eq!(
            versions(&page),
            [1, 2, 3, 4, 5],
            "bounded by the buffer, not the limit"
        );
        // Unacknowledged: the same five, and the queue is not touched.
        let again = buffer.page(100, &mut next);
        assert_eq!(again, page);
        // Acknowledging two makes room for two more.
        buffer.acknowledge(Some(&page.positions[1]));
        assert_eq!(versions(&buffer.page(100, &mut next)), [3, 4, 5, 6, 7]);
        assert_eq!(taken.get(), 7);
        // The limit bounds a page served from the buffer too.
        assert_eq!(versions(&buffer.page(2, &mut next)), [3, 4]);
    }

    #[test]
    fn batches_are_split_by_time_even_without_end_markers() {
        let mut coalescer = Coalescer::default();
        let ev = |t: u128, v: u64, end: bool| CdcEvent {
            time: Uuid::from_u128(t),
            end_of_batch: end,
            event: Some((stream(), v)),
        };
        assert!(coalescer.push(ev(1, 1, false)).is_empty());
        let done = coalescer.push(ev(2, 2, false));
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].first_version, done[0].last_version), (1, 1));
        let done = coalescer.push(ev(2, 3, true));
        assert_eq!((done[0].first_version, done[0].last_version), (2, 3));
    }
}
