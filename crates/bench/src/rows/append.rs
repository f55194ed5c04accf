//! Appends through write-svc (`esq.v1.EventStore/Append`, expected version `any`, a stream
//! type no aggregate owns, so the raw append path) against the raw `scylla` driver doing the
//! same storage work with prepared statements on the same keyspace, interleaved:
//! - 1 event, distinct streams, c16: vs the change-log notification INSERT followed by the
//!   conditional batch (what a committed append must write), and vs the bare conditional batch;
//! - 1 event, one stream, c16: vs the bare conditional batch on one stream (counting committed
//!   appends; a racer that loses retries at the head the engine reports, reading nothing);
//! - 50 events, distinct streams, c16: vs notification + conditional batch.
//!
//! Cassandra is the saturated resource on a small machine, so the CPU column (write-svc and
//! Cassandra) says where the time goes.

use crate::cqlops::Tally;
use crate::ctx::{Cluster, Ctx};
use crate::load::{closed_loop, Load, Run};
use crate::report::Line;
use crate::rows::fixtures::retrying;
use crate::sys::Watched;
use esq::pb::v1 as pb;
use esq::pb::v1::event_store_client::EventStoreClient;
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::SerialConsistency;
use scylla::value::{CqlTimeuuid, CqlValue, Row};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Concurrency of every append row.
pub const CONCURRENCY: usize = 16;
/// The stream type of the rows' appends: no aggregate owns it, so write-svc appends as given.
const KIND: &str = "benchw";
/// Shards of the stack's change log (write-svc's default).
const SHARDS: u32 = 16;
/// A small event payload, as a cart event would carry.
const PAYLOAD: &[u8] = br#"{"sku":"sku-1","quantity":1,"price_cents":1999}"#;

/// The raw driver's statements: the same CQL esq prepares, on the stack's keyspace.
pub(crate) struct Raw {
    session: Session,
    note: PreparedStatement,
    head_first: PreparedStatement,
    head_next: PreparedStatement,
    insert: PreparedStatement,
    /// A command's load: the stream's snapshot and its first page of events (`HEAD_PAGE`, 32).
    snapshot: PreparedStatement,
    head_page: PreparedStatement,
}

impl Raw {
    /// Prepares the statements on a new session to `ctx`'s Cassandra, in keyspace `ks`.
    pub(crate) async fn prepare(ctx: &Ctx, ks: &str) -> anyhow::Result<Self> {
        let session = ctx.scylla().await?;
        let pk = "stream_type = ? AND stream_id = ? AND bucket = ?";
        let mut head_first = session
            .prepare(format!(
                "UPDATE {ks}.events SET head = ?, created_at = ?, updated_at = ? \
                 WHERE {pk} IF head = NULL"
            ))
            .await?;
        head_first.set_serial_consistency(Some(SerialConsistency::LocalSerial));
        let mut head_next = session
            .prepare(format!(
                "UPDATE {ks}.events SET head = ?, updated_at = ? WHERE {pk} IF head = ?"
            ))
            .await?;
        head_next.set_serial_consistency(Some(SerialConsistency::LocalSerial));
        let insert = session
            .prepare(format!(
                "INSERT INTO {ks}.events (stream_type, stream_id, bucket, version, event_id, \
                 event_type, schema_version, content_type, data, metadata, recorded_at, \
                 append_first, append_last) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?;
        let note = session
            .prepare(format!(
                "INSERT INTO {ks}.changes (shard, bucket, id, stream_type, stream_id, \
                 first_version, last_version) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?;
        let snapshot = session
            .prepare(format!(
                "SELECT version, event_id, fingerprint, state FROM {ks}.snapshots \
                 WHERE stream_type = ? AND stream_id = ?"
            ))
            .await?;
        let head_page = session
            .prepare(format!(
                "SELECT version, event_id, event_type, schema_version, content_type, data, \
                 metadata, recorded_at FROM {ks}.events \
                 WHERE {pk} AND version >= ? AND version <= ? LIMIT ?"
            ))
            .await?;
        Ok(Self {
            session,
            note,
            head_first,
            head_next,
            insert,
            snapshot,
            head_page,
        })
    }

    /// What a command reads before it decides (write-svc's `Executor::load` on a short
    /// stream): the snapshot and the first 32 events of `id`, concurrently. Returns the events
    /// found.
    async fn load(&self, id: &str) -> anyhow::Result<usize> {
        let (snapshot, head) = tokio::join!(
            self.session.execute_unpaged(&self.snapshot, (KIND, id)),
            self.session
                .execute_unpaged(&self.head_page, (KIND, id, 0i32, 1i64, i64::MAX, 32i32)),
        );
        snapshot?.into_rows_result()?;
        Ok(head?.into_rows_result()?.rows_num())
    }

    /// The notification row of an append of `first..=last` to `id`.
    async fn note(&self, id: &str, first: i64, last: i64) -> anyhow::Result<()> {
        let stream = esq_domain::StreamId::new(KIND, id)?;
        let shard = esq_eventstore_shard(&stream);
        let now = now_us();
        let tid = timeuuid(now);
        self.session
            .execute_unpaged(
                &self.note,
                (
                    shard as i32,
                    now / 60_000_000,
                    CqlTimeuuid::from(tid),
                    KIND,
                    id,
                    first,
                    last,
                    604_800i32,
                ),
            )
            .await?;
        Ok(())
    }

    /// The conditional batch of `n` events at `base`: `Some(head)` when it lost.
    async fn lwt(&self, id: &str, base: i64, n: usize) -> anyhow::Result<Option<i64>> {
        let now = now_us();
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_serial_consistency(Some(SerialConsistency::LocalSerial));
        let mut values: Vec<Vec<CqlValue>> = Vec::with_capacity(n + 1);
        let text = |s: &str| CqlValue::Text(s.to_owned());
        if base == 0 {
            batch.append_statement(self.head_first.clone());
            values.push(vec![
                CqlValue::BigInt(n as i64),
                CqlValue::BigInt(now),
                CqlValue::BigInt(now),
                text(KIND),
                text(id),
                CqlValue::Int(0),
            ]);
        } else {
            batch.append_statement(self.head_next.clone());
            values.push(vec![
                CqlValue::BigInt(base + n as i64),
                CqlValue::BigInt(now),
                text(KIND),
                text(id),
                CqlValue::Int(0),
                CqlValue::BigInt(base),
            ]);
        }
        for j in 0..n {
            batch.append_statement(self.insert.clone());
            values.push(vec![
                text(KIND),
                text(id),
                CqlValue::Int(0),
                CqlValue::BigInt(base + 1 + j as i64),
                CqlValue::Uuid(uuid::Uuid::new_v4()),
                text("ItemAdded"),
                CqlValue::Int(1),
                text("application/json"),
                CqlValue::Blob(PAYLOAD.to_vec()),
                CqlValue::Map(Vec::new()),
                CqlValue::BigInt(now),
                CqlValue::BigInt(base + 1),
                CqlValue::BigInt(base + n as i64),
            ]);
        }
        let rows = self
            .session
            .batch(&batch, values)
            .await?
            .into_rows_result()?;
        let head_at = rows.column_specs().get_by_name("head").map(|(i, _)| i);
        let mut applied = true;
        let mut head = 0;
        for row in rows.rows::<Row>()? {
            let row = row?;
            if let Some(Some(CqlValue::Boolean(b))) = row.columns.first() {
                applied = *b;
            }
            if let Some(Some(CqlValue::BigInt(h))) = head_at.and_then(|i| row.columns.get(i)) {
                head = *h;
            }
        }
        Ok((!applied).then_some(head))
    }
}

/// Runs `a` and `b` one after the other, `a` first when `a_first`.
async fn in_turn<A, B>(
    a_first: bool,
    a: impl std::future::Future<Output = A>,
    b: impl std::future::Future<Output = B>,
) -> (A, B) {
    if a_first {
        let a = a.await;
        (a, b.await)
    } else {
        let b = b.await;
        (a.await, b)
    }
}

/// Cassandra's CPU per completed call of `run` (`1.85 ms`), if it was watched.
fn cassandra_ms(run: &Run) -> String {
    run.cpu
        .iter()
        .find(|c| c.name == "cassandra")
        .filter(|_| run.rate > 0.0)
        .map(|c| format!("{:.2} ms", c.cores / run.rate * 1000.0))
        .unwrap_or_else(|| "?".to_owned())
}

fn esq_eventstore_shard(stream: &esq_domain::StreamId) -> u32 {
    // The change log's stable FNV-1a shard hash (eventstore `cql::shard_of`), restated so the
    // bench does not link the store.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = stream
        .kind
        .as_bytes()
        .iter()
        .chain(std::iter::once(&0x1f))
        .chain(stream.id.as_bytes());
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(SHARDS)) as u32
}

/// A version-1 UUID of `now_us` with a random clock sequence and node (unique enough for the
/// baseline's rows; esq's own clock also keeps them increasing within a process).
fn timeuuid(now_us: i64) -> uuid::Uuid {
    let ticks = (now_us.max(0) as u64) * 10 + 0x01B2_1DD2_1381_4000;
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    tail[0] = (tail[0] & 0x3f) | 0x80;
    uuid::Uuid::from_fields(
        (ticks & 0xffff_ffff) as u32,
        ((ticks >> 32) & 0xffff) as u16,
        (((ticks >> 48) & 0x0fff) as u16) | 0x1000,
        &tail,
    )
}

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// A stream id of this run: `tag`, the round's salt and the call number.
fn stream_id(tag: &str, salt: u64, i: u64) -> String {
    format!("{tag}-{salt}-{i}")
}

fn request(id: String, n: usize) -> pb::AppendRequest {
    pb::AppendRequest {
        stream: Some(pb::StreamRef {
            r#type: KIND.into(),
            id,
        }),
        expected_version: Some(pb::ExpectedVersion {
            kind: Some(pb::expected_version::Kind::Any(())),
        }),
        events: (0..n)
            .map(|_| pb::NewEvent {
                event_id: uuid::Uuid::new_v4().to_string(),
                r#type: "ItemAdded".into(),
                schema_version: 1,
                content_type: "application/json".into(),
                payload: Some(pb::new_event::Payload::Data(PAYLOAD.to_vec())),
                metadata: Default::default(),
            })
            .collect(),
    }
}

/// esq: Append of `n` events with expected version `any`, to a new stream per call
/// (`one: None`) or all to one stream.
async fn esq_appends(
    cluster: &Cluster,
    load: &Load,
    salt: u64,
    n: usize,
    one: Option<&str>,
) -> anyhow::Result<Run> {
    let client = EventStoreClient::new(cluster.write_channel.clone());
    let one = one.map(str::to_owned);
    closed_loop(load, move |i| {
        let client = client.clone();
        let id = one.clone().unwrap_or_else(|| stream_id("e", salt, i));
        async move {
            // An append refused on a loaded machine (UNAVAILABLE: e.g. its notification was
            // acknowledged too late to send the batch) is retried with the same event ids, as
            // a client would; the retry's time counts.
            let req = request(id, n);
            retrying(|| {
                let mut client = client.clone();
                let req = req.clone();
                async move { client.append(req).await }
            })
            .await?;
            Ok(())
        }
    })
    .await
}

/// The raw driver: (notification +) conditional batch of `n` events to a new stream per call.
async fn raw_distinct(
    raw: &Arc<Raw>,
    load: &Load,
    salt: u64,
    n: usize,
    note: bool,
) -> anyhow::Result<Run> {
    let raw = Arc::clone(raw);
    closed_loop(load, move |i| {
        let raw = Arc::clone(&raw);
        async move {
            let id = stream_id(if note { "r" } else { "b" }, salt, i);
            if note {
                raw.note(&id, 1, n as i64).await?;
            }
            anyhow::ensure!(raw.lwt(&id, 0, n).await?.is_none(), "a new stream lost");
            Ok(())
        }
    })
    .await
}

/// The raw driver's notification + conditional batch of one event to a new stream per call, in
/// an open loop at `rate` calls per second (the latency the engine alone gives an append); with
/// `read_first`, after the read a command makes before it decides ([`Raw::load`]: what the
/// engine alone gives a command such as AddItem).
pub(crate) async fn raw_open_loop(
    raw: &Arc<Raw>,
    load: &Load,
    rate: f64,
    salt: u64,
    read_first: bool,
) -> anyhow::Result<Run> {
    let raw = Arc::clone(raw);
    crate::load::open_loop(load, rate, move |i| {
        let raw = Arc::clone(&raw);
        async move {
            let id = stream_id(if read_first { "c" } else { "l" }, salt, i);
            if read_first {
                anyhow::ensure!(raw.load(&id).await? == 0, "a new stream holds events");
            }
            raw.note(&id, 1, 1).await?;
            anyhow::ensure!(raw.lwt(&id, 0, 1).await?.is_none(), "a new stream lost");
            Ok(())
        }
    })
    .await
}

/// The raw driver: bare conditional batches of one event to one stream; a loser retries at the
/// head the engine reported (or the newest head another worker saw), reading nothing.
async fn raw_one(raw: &Arc<Raw>, load: &Load, salt: u64) -> anyhow::Result<Run> {
    let raw = Arc::clone(raw);
    let id = Arc::new(stream_id("o", salt, 0));
    let head = Arc::new(AtomicI64::new(0));
    closed_loop(load, move |_| {
        let (raw, id, head) = (Arc::clone(&raw), Arc::clone(&id), Arc::clone(&head));
        async move {
            loop {
                let base = head.load(Ordering::Relaxed);
                match raw.lwt(&id, base, 1).await? {
                    None => {
                        head.fetch_max(base + 1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Some(now) => {
                        head.fetch_max(now, Ordering::Relaxed);
                    }
                }
            }
        }
    })
    .await
}

/// The rows.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let cluster = ctx.cluster().await?;
    let raw = Arc::new(Raw::prepare(ctx, &cluster.keyspace).await?);
    let mut watch = cluster.watch_only(&["write-svc", "cassandra"]);
    watch.push(Watched::me());
    let load = ctx.load(CONCURRENCY).watch(&watch);
    let salt = now_us() as u64;
    let (mut esq1, mut note1, mut bare1) = (Vec::new(), Vec::new(), Vec::new());
    let (mut esq_one, mut bare_one) = (Vec::new(), Vec::new());
    let (mut esq50, mut note50) = (Vec::new(), Vec::new());
    // What Cassandra did per call on each side (operations per table, Paxos state included).
    let mut ops: [Tally; 7] = Default::default();
    let (ses, ks) = (&raw.session, cluster.keyspace.as_str());
    for round in 0..ctx.rounds() as u64 {
        let salt = salt + round * 1_000;
        // Each pair in turn, the first alternating from round to round: a side inherits the
        // flushes and compactions of the writes before it.
        let esq_first = round % 2 == 0;
        let [o_e1, o_n1, o_b1, o_eo, o_bo, o_e50, o_n50] = &mut ops;
        let (e, n) = in_turn(
            esq_first,
            o_e1.around(ses, ks, esq_appends(cluster, &load, salt, 1, None)),
            o_n1.around(ses, ks, raw_distinct(&raw, &load, salt, 1, true)),
        )
        .await;
        esq1.push(e?);
        note1.push(n?);
        let side = raw_distinct(&raw, &load, salt, 1, false);
        bare1.push(o_b1.around(ses, ks, side).await?);
        let one = stream_id("one", salt, 0);
        let (e, b) = in_turn(
            esq_first,
            o_eo.around(ses, ks, esq_appends(cluster, &load, salt, 1, Some(&one))),
            o_bo.around(ses, ks, raw_one(&raw, &load, salt)),
        )
        .await;
        esq_one.push(e?);
        bare_one.push(b?);
        let (e, n) = in_turn(
            esq_first,
            o_e50.around(ses, ks, esq_appends(cluster, &load, salt + 1, 50, None)),
            o_n50.around(ses, ks, raw_distinct(&raw, &load, salt + 1, 50, true)),
        )
        .await;
        esq50.push(e?);
        note50.push(n?);
    }
    // Where the gap of the first row goes: the same pair again with the projector stopped, so
    // that neither side's appends are read back by it (it reads each appended stream and the
    // change log from the same Cassandra), then the projector is started again.
    cluster.stop_projector().await?;
    let (mut esq_alone, mut note_alone) = (Vec::new(), Vec::new());
    let mut alone: [Tally; 2] = Default::default();
    let mut watch_alone = cluster.watch_only(&["write-svc", "cassandra"]);
    watch_alone.push(Watched::me());
    let load_alone = ctx.load(CONCURRENCY).watch(&watch_alone);
    for round in 0..ctx.rounds() as u64 {
        let salt = salt + 500 + round * 1_000;
        let [o_ea, o_na] = &mut alone;
        let (e, n) = in_turn(
            round % 2 == 0,
            o_ea.around(ses, ks, esq_appends(cluster, &load_alone, salt, 1, None)),
            o_na.around(ses, ks, raw_distinct(&raw, &load_alone, salt, 1, true)),
        )
        .await;
        esq_alone.push(e?);
        note_alone.push(n?);
    }
    cluster.start_projector(ctx, &[]).await?;
    let (ea, na) = (Run::median(&esq_alone), Run::median(&note_alone));
    let [o_ea, o_na] = &alone;
    let [o_e1, o_n1, o_b1, o_eo, o_bo, o_e50, o_n50] = &ops;
    let per = |esq: &Tally, e: &Run, base: &Tally, b: &Run| {
        format!(
            "Cassandra CPU per call: esq {} · base {}; Cassandra operations per call: esq {} · \
             base {}",
            cassandra_ms(e),
            cassandra_ms(b),
            esq.per_call(),
            base.per_call()
        )
    };
    let (e1, n1, b1) = (Run::median(&esq1), Run::median(&note1), Run::median(&bare1));
    let (eo, bo) = (Run::median(&esq_one), Run::median(&bare_one));
    let (e50, n50) = (Run::median(&esq50), Run::median(&note50));
    Ok(vec![
        Line::rates(
            format!("Append 1 event, distinct streams, c{CONCURRENCY}"),
            "≥ 0.9",
            &e1,
            "raw driver, notification + LWT batch",
            &n1,
        )
        .note(per(o_e1, &e1, o_n1, &n1)),
        Line::rates(
            "same, projector stopped (where the gap goes)",
            "(reference)",
            &ea,
            "raw driver, notification + LWT batch",
            &na,
        )
        .note(per(o_ea, &ea, o_na, &na)),
        Line::rates(
            "same, vs the bare LWT batch",
            "≥ 0.75",
            &e1,
            "bare LWT batch",
            &b1,
        )
        .note(per(o_e1, &e1, o_b1, &b1)),
        Line::rates(
            format!("Append, one stream, c{CONCURRENCY}"),
            "≥ 0.75",
            &eo,
            "bare LWT batch, one stream (committed appends)",
            &bo,
        )
        .note(per(o_eo, &eo, o_bo, &bo)),
        Line::rates(
            format!("Append 50 events, distinct streams, c{CONCURRENCY}"),
            "≥ 0.9",
            &e50,
            "raw driver, notification + LWT batch of 50",
            &n50,
        )
        .note(format!(
            "appends/s (× 50 events); {}",
            per(o_e50, &e50, o_n50, &n50)
        )),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restated_shard_hash_matches_the_pinned_values() {
        // The same pinned values as eventstore's `shard_hash_is_stable`, at 16 shards.
        let s = esq_domain::StreamId::new("book", "978-3-16-148410-0").expect("id");
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in "book\u{1f}978-3-16-148410-0".bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        assert_eq!(hash % 1024, 445);
        assert_eq!(esq_eventstore_shard(&s), (hash % 16) as u32);
    }

    #[test]
    fn baseline_timeuuids_are_version_1_and_carry_their_time() {
        let u = timeuuid(1_764_000_000_123_456);
        assert_eq!(u.get_version_num(), 1);
        let (lo, mid, hi, _) = u.as_fields();
        let ticks = (u64::from(hi & 0x0fff) << 48) | (u64::from(mid) << 32) | u64::from(lo);
        assert_eq!((ticks - 0x01B2_1DD2_1381_4000) / 10, 1_764_000_000_123_456);
    }
}
