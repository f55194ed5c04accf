//! Temporary measurement of the CQL append path (issue 9): closed-loop appends through
//! [`CqlStore`] against the raw driver doing the same CQL, interleaved, on one Cassandra.
//!
//! `cargo run --release -p esq-eventstore --example append_load -- HOST:PORT SECONDS ROUNDS`

use esq_domain::{ExpectedVersion, NewEvent, StreamId};
use esq_eventstore::cql::{CqlConfig, CqlStore};
use esq_eventstore::EventStore;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimeuuid, CqlValue, Row};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const CONC: usize = 16;

fn event() -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        event_type: "ItemAdded".into(),
        schema_version: 1,
        content_type: "application/json".into(),
        data: br#"{"sku":"abc","qty":1}"#.to_vec(),
        metadata: BTreeMap::new(),
    }
}

struct Raw {
    session: Session,
    note: PreparedStatement,
    head_first: PreparedStatement,
    head_next: PreparedStatement,
    insert: PreparedStatement,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn fresh(tag: &str) -> StreamId {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    StreamId::new("cart", format!("{tag}-{}-{n}", std::process::id())).expect("id")
}

impl Raw {
    /// One conditional append of `n` events at `base`: `Some(head)` when it lost.
    async fn lwt(&self, stream: &StreamId, base: i64, n: usize) -> Option<i64> {
        let (k, i) = (stream.kind.as_str(), stream.id.as_str());
        let mut batch = Batch::new(BatchType::Unlogged);
        let now = esq_eventstore::now_us();
        let mut values: Vec<Vec<CqlValue>> = Vec::new();
        if base == 0 {
            batch.append_statement(self.head_first.clone());
            values.push(vec![
                CqlValue::BigInt(n as i64),
                CqlValue::BigInt(now),
                CqlValue::BigInt(now),
                CqlValue::Text(k.into()),
                CqlValue::Text(i.into()),
                CqlValue::Int(0),
            ]);
        } else {
            batch.append_statement(self.head_next.clone());
            values.push(vec![
                CqlValue::BigInt(base + n as i64),
                CqlValue::BigInt(now),
                CqlValue::Text(k.into()),
                CqlValue::Text(i.into()),
                CqlValue::Int(0),
                CqlValue::BigInt(base),
            ]);
        }
        for j in 0..n {
            let e = event();
            batch.append_statement(self.insert.clone());
            values.push(vec![
                CqlValue::Text(k.into()),
                CqlValue::Text(i.into()),
                CqlValue::Int(0),
                CqlValue::BigInt(base + 1 + j as i64),
                CqlValue::Uuid(e.event_id),
                CqlValue::Text(e.event_type),
                CqlValue::Int(1),
                CqlValue::Text(e.content_type),
                CqlValue::Blob(e.data),
                CqlValue::Map(vec![]),
                CqlValue::BigInt(now),
                CqlValue::BigInt(base + 1),
                CqlValue::BigInt(base + n as i64),
            ]);
        }
        let result = self.session.batch(&batch, values).await.expect("batch");
        let rows = result.into_rows_result().expect("rows");
        let head_at = rows.column_specs().get_by_name("head").map(|(i, _)| i);
        let mut applied = true;
        let mut head = 0;
        for row in rows.rows::<Row>().expect("rows") {
            let row = row.expect("row");
            if let Some(Some(CqlValue::Boolean(b))) = row.columns.first() {
                applied = *b;
            }
            if let Some(Some(CqlValue::BigInt(h))) = head_at.and_then(|i| row.columns.get(i)) {
                head = *h;
            }
        }
        (!applied).then_some(head)
    }

    async fn note(&self, stream: &StreamId, first: i64, last: i64) {
        let id = Uuid::now_v1(&[1, 2, 3, 4, 5, 6]);
        let bucket = esq_eventstore::now_us() / 60_000_000;
        let shard = esq_eventstore::cql::shard_of(stream, 16) as i32;
        self.session
            .execute_unpaged(
                &self.note,
                (
                    shard,
                    bucket,
                    CqlTimeuuid::from(id),
                    stream.kind.as_str(),
                    stream.id.as_str(),
                    first,
                    last,
                    604_800i32,
                ),
            )
            .await
            .expect("note");
    }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    EsqDistinct(usize),
    RawNoteLwtDistinct(usize),
    RawLwtDistinct(usize),
    EsqOne,
    RawLwtOne,
}

async fn run(mode: Mode, store: &Arc<CqlStore>, raw: &Arc<Raw>, secs: u64) -> (f64, u64, u64) {
    let stop = Instant::now() + Duration::from_secs(secs);
    let one = fresh("one");
    let raw_head = Arc::new(tokio::sync::Mutex::new(0i64));
    let mut tasks = Vec::new();
    for _ in 0..CONC {
        let (store, raw, one, raw_head) = (
            Arc::clone(store),
            Arc::clone(raw),
            one.clone(),
            Arc::clone(&raw_head),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < stop {
                let t = Instant::now();
                match mode {
                    Mode::EsqDistinct(n) => {
                        let events: Vec<NewEvent> = (0..n).map(|_| event()).collect();
                        store
                            .append(&fresh("d"), ExpectedVersion::Any, &events)
                            .await
                            .expect("append");
                    }
                    Mode::RawNoteLwtDistinct(n) => {
                        let s = fresh("r");
                        raw.note(&s, 1, n as i64).await;
                        assert!(raw.lwt(&s, 0, n).await.is_none());
                    }
                    Mode::RawLwtDistinct(n) => {
                        assert!(raw.lwt(&fresh("b"), 0, n).await.is_none());
                    }
                    Mode::EsqOne => {
                        store
                            .append(&one, ExpectedVersion::Any, &[event()])
                            .await
                            .expect("append");
                    }
                    Mode::RawLwtOne => loop {
                        let base = *raw_head.lock().await;
                        match raw.lwt(&one, base, 1).await {
                            None => {
                                let mut h = raw_head.lock().await;
                                *h = (*h).max(base + 1);
                                break;
                            }
                            Some(head) => {
                                let mut h = raw_head.lock().await;
                                *h = (*h).max(head);
                            }
                        }
                    },
                }
                lat.push(t.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    let n = all.len();
    let p = |q: f64| {
        all.get(((n as f64 * q) as usize).min(n.saturating_sub(1)))
            .copied()
    };
    (
        n as f64 / secs as f64,
        p(0.5).unwrap_or(0),
        p(0.99).unwrap_or(0),
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let node = args.get(1).cloned().unwrap_or("127.0.0.1:19042".into());
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rounds: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let filter = args.get(4).cloned().unwrap_or_default();
    let ks = format!("esq_appendload_{}", std::process::id());
    let mut config = CqlConfig::new(vec![node.clone()], ks.clone());
    config.confidence_window = Duration::from_millis(1000);
    config.request_timeout = Duration::from_secs(10);
    config.append_deadline = Duration::from_secs(25);
    let store = Arc::new(CqlStore::connect(config).await.expect("connect"));
    let session = SessionBuilder::new()
        .known_node(&node)
        .build()
        .await
        .expect("session");
    let pk = "stream_type = ? AND stream_id = ? AND bucket = ?";
    let mut head_first = session
        .prepare(format!(
            "UPDATE {ks}.events SET head = ?, created_at = ?, updated_at = ? WHERE {pk} IF head = NULL"
        ))
        .await
        .expect("prepare");
    head_first.set_serial_consistency(Some(scylla::statement::SerialConsistency::LocalSerial));
    let head_next = session
        .prepare(format!(
            "UPDATE {ks}.events SET head = ?, updated_at = ? WHERE {pk} IF head = ?"
        ))
        .await
        .expect("prepare");
    let insert = session
        .prepare(format!(
            "INSERT INTO {ks}.events (stream_type, stream_id, bucket, version, event_id, \
             event_type, schema_version, content_type, data, metadata, recorded_at, \
             append_first, append_last) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .await
        .expect("prepare");
    let note = session
        .prepare(format!(
            "INSERT INTO {ks}.changes (shard, bucket, id, stream_type, stream_id, \
             first_version, last_version) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
        ))
        .await
        .expect("prepare");
    let raw = Arc::new(Raw {
        session,
        note,
        head_first,
        head_next,
        insert,
    });
    let modes = [
        Mode::EsqDistinct(1),
        Mode::RawNoteLwtDistinct(1),
        Mode::RawLwtDistinct(1),
        Mode::EsqOne,
        Mode::RawLwtOne,
        Mode::EsqDistinct(50),
        Mode::RawNoteLwtDistinct(50),
        Mode::RawLwtDistinct(50),
    ];
    // Warm up.
    run(Mode::EsqDistinct(1), &store, &raw, 2).await;
    for round in 0..rounds {
        for mode in modes {
            let name = format!("{mode:?}");
            if !filter.is_empty() && !name.contains(&filter) {
                continue;
            }
            let (rate, p50, p99) = run(mode, &store, &raw, secs).await;
            println!(
                "round {round} {name:<24} {rate:>8.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
                p50 as f64 / 1000.0,
                p99 as f64 / 1000.0
            );
        }
    }
    raw.session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await
        .ok();
}
