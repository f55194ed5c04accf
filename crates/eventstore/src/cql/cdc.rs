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
//! Limits, by design of a push-based reader behind a pull-based trait:
//! - Delivery is at least once and positions are informational (`"cdc:<cdc$time>"`): the
//!   reader restarts from `now - change_ttl` when the process does, so `after` is not used to
//!   seek. The projector's version fence makes repeats harmless.
//! - Changes are routed to per-shard bounded queues, and the reader waits while a queue is
//!   full, so a process using this feed must poll every shard (one projector replica owns all
//!   shards; replicas sharing shards need the `changes` table feed).
//! - Nothing here can run against Apache Cassandra, which has no CDC log table: the Cassandra
//!   test suite covers only the row-to-change conversion below, with hand-built CDC rows.

use crate::{now_us, Change, ChangePage, StoreError};
use esq_domain::StreamId;
use scylla::client::session::Session;
use scylla::value::CqlValue;
use scylla_cdc::consumer::{CDCRow, Consumer, ConsumerFactory, OperationType};
use scylla_cdc::log_reader::{CDCLogReader, CDCLogReaderBuilder};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use uuid::Uuid;

/// Changes buffered per shard before the reader waits for a poll.
const QUEUE_PER_SHARD: usize = 1024;

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

type Queue = mpsc::Receiver<(Change, String)>;

/// The CDC-backed feed of one store.
pub(crate) struct CdcFeed {
    session: Arc<Session>,
    keyspace: String,
    confidence_window: Duration,
    lookback: Duration,
    senders: Arc<Vec<mpsc::Sender<(Change, String)>>>,
    queues: Vec<Mutex<Queue>>,
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
        let (senders, queues) = (0..shard_count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE_PER_SHARD);
                (tx, Mutex::new(rx))
            })
            .unzip();
        Self {
            session,
            keyspace,
            confidence_window,
            lookback,
            senders: Arc::new(senders),
            queues,
            reader: Mutex::new(None),
        }
    }

    /// Changes of `shard` the reader has delivered, at most `limit`.
    pub(crate) async fn poll(&self, shard: u32, limit: u32) -> Result<ChangePage, StoreError> {
        self.ensure_reader().await?;
        let queue = self.queues.get(shard as usize).ok_or_else(|| {
            StoreError::Internal(format!(
                "shard {shard} does not exist: the feed has {} shards",
                self.queues.len()
            ))
        })?;
        let mut queue = queue.lock().await;
        let mut page = ChangePage::default();
        while page.changes.len() < limit as usize {
            match queue.try_recv() {
                Ok((change, position)) => {
                    page.changes.push(change);
                    page.positions.push(position);
                }
                Err(_) => break,
            }
        }
        Ok(page)
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
    senders: Arc<Vec<mpsc::Sender<(Change, String)>>>,
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
    senders: Arc<Vec<mpsc::Sender<(Change, String)>>>,
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
        let row = CdcEvent::from_row(data);
        let time = row.time;
        let changes = self.coalescer.push(row);
        let senders = Arc::clone(&self.senders);
        Box::pin(async move {
            let shards = senders.len() as u32;
            for change in changes {
                let shard = super::changes::shard_of(&change.stream, shards) as usize;
                if let Some(tx) = senders.get(shard) {
                    // Waits while the shard's queue is full: backpressure on the reader.
                    tx.send((change, format!("cdc:{time}")))
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
