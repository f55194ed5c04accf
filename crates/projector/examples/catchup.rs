//! Catch-up throughput of the projector against the raw engines, in one run (a measurement
//! tool, not a test: see crates/bench for the harness rows).
//!
//! Writes `--carts` carts × `--events` single-event appends to a fresh keyspace of the Cassandra
//! at `ESQ_TEST_CASSANDRA` with no projector running, then, for `--rounds` interleaved rounds,
//! times into fresh Redis prefixes (`ESQ_TEST_REDIS`):
//! - `esq`: [`Projector::catch_up`] through the change log until every cart is current;
//! - `raw`: the same storage work without the projector: each cart's partition read with a
//!   prepared statement of the scylla driver, folded with the domain's `batch` and applied
//!   with the project's apply script by EVALSHA (one call per projection and cart, concurrent
//!   calls pipelined on the multiplexed connection), `--raw-concurrency` carts at once;
//! - `lua-batched` / `lua-per-event`: the apply script alone, from events already in memory.
//!
//! CPU of this process, and of the pids given by `--redis-pid` / `--cassandra-pid`, is read
//! from /proc around each timed run.

use esq_domain::projection::{batch, Projection};
use esq_domain::{ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use esq_eventstore::cql::{CqlConfig, CqlStore};
use esq_eventstore::EventStore;
use esq_projector::{Config, Projector};
use esq_readstore::redis::{RedisConfig, RedisStore};
use esq_readstore::ReadStore;
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cpu_ticks(pid: u64) -> u64 {
    let path = if pid == 0 {
        "/proc/self/stat".to_owned()
    } else {
        format!("/proc/{pid}/stat")
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn item(n: u64) -> NewEvent {
    NewEvent::json(
        "ItemAdded",
        2,
        &serde_json::json!({"sku": format!("sku{}", n % 7), "quantity": 1, "unit_price_cents": 3}),
    )
}

async fn redis(prefix: &str) -> RedisStore {
    let url = std::env::var("ESQ_TEST_REDIS").expect("ESQ_TEST_REDIS");
    RedisStore::connect(RedisConfig {
        urls: vec![url],
        prefix: prefix.to_owned(),
        ..RedisConfig::default()
    })
    .await
    .expect("redis")
}

#[tokio::main]
async fn main() {
    let carts = arg("--carts", 2000);
    let per_cart = arg("--events", 10);
    let rounds = arg("--rounds", 3);
    let raw_concurrency = arg("--raw-concurrency", 16) as usize;
    let pids = [
        ("redis", arg("--redis-pid", 0)),
        ("cassandra", arg("--cassandra-pid", 0)),
    ];
    let node = std::env::var("ESQ_TEST_CASSANDRA").expect("ESQ_TEST_CASSANDRA");
    let run = std::process::id();
    let existing = std::env::args().skip_while(|a| a != "--keyspace").nth(1);
    let keyspace = existing
        .clone()
        .unwrap_or_else(|| format!("esq_catchup_{run}"));
    let mut config = CqlConfig::new(vec![node.clone()], keyspace.clone());
    config.confidence_window = Duration::from_millis(500);
    let store = Arc::new(CqlStore::connect(config.clone()).await.expect("cql"));
    let ids: Vec<String> = (0..carts).map(|i| format!("c{i}")).collect();
    let total = carts * per_cart;
    if existing.is_none() {
        let started = Instant::now();
        for round in 0..per_cart {
            futures::stream::iter(ids.iter())
                .map(|id| {
                    let store = Arc::clone(&store);
                    async move {
                        let s = StreamId::new("cart", id).expect("id");
                        // The same event on a retry: a committed first try is recognised.
                        let e = item(round);
                        let mut tries = 0;
                        loop {
                            match store
                                .append(&s, ExpectedVersion::Exact(round), std::slice::from_ref(&e))
                                .await
                            {
                                Ok(r) => return Ok(r),
                                Err(err) if tries < 10 => {
                                    tries += 1;
                                    eprintln!("append retried: {err}");
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                                Err(err) => return Err(err),
                            }
                        }
                    }
                })
                .buffer_unordered(32)
                .try_collect::<Vec<_>>()
                .await
                .expect("append");
        }
        eprintln!(
            "wrote {total} events in {:.1}s into keyspace {keyspace}",
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // The events in memory, for the Lua-alone rows.
    let projections: Vec<Arc<dyn Projection>> = esq_projector::default_projections()
        .into_iter()
        .filter(|p| p.handles("cart"))
        .collect();
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node(&node)
        .build()
        .await
        .expect("session");
    let select = session
        .prepare(format!(
            "SELECT version, event_id, event_type, schema_version, content_type, data, metadata, \
             recorded_at FROM {}.events WHERE stream_type = ? AND stream_id = ? AND bucket = 0",
            config.keyspace
        ))
        .await
        .expect("prepare");
    let session = Arc::new(session);
    type Row = (
        i64,
        uuid::Uuid,
        String,
        i32,
        String,
        Vec<u8>,
        Option<BTreeMap<String, String>>,
        i64,
    );
    let read_raw = |id: String| {
        let (session, select) = (Arc::clone(&session), select.clone());
        async move {
            let result = session
                .execute_unpaged(&select, ("cart", id.as_str()))
                .await
                .expect("select");
            let rows = result.into_rows_result().expect("rows");
            let stream = StreamId::new("cart", &id).expect("id");
            rows.rows::<Row>()
                .expect("typed")
                .map(|r| {
                    let r = r.expect("row");
                    RecordedEvent {
                        stream: stream.clone(),
                        version: r.0 as u64,
                        event_id: r.1,
                        event_type: r.2,
                        schema_version: r.3 as u32,
                        content_type: r.4,
                        data: r.5,
                        metadata: r.6.unwrap_or_default(),
                        recorded_at_us: r.7,
                    }
                })
                .collect::<Vec<_>>()
        }
    };
    let all: Vec<Vec<RecordedEvent>> = futures::stream::iter(ids.clone())
        .map(read_raw)
        .buffered(32)
        .collect()
        .await;

    let mut results: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        for mode in ["esq", "raw", "lua-batched", "lua-per-event"] {
            let prefix = format!("catchup{run}r{round}{mode}");
            let read = Arc::new(redis(&prefix).await);
            let before: Vec<u64> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
            let me = cpu_ticks(0);
            let t = Instant::now();
            match mode {
                "esq" => {
                    let p = Projector::new(
                        Arc::clone(&store),
                        Arc::clone(&store),
                        Arc::clone(&read),
                        Config {
                            checkpoint_prefix: prefix.clone(),
                            sync_concurrency: arg(
                                "--sync-concurrency",
                                esq_projector::DEFAULT_SYNC_CONCURRENCY as u64,
                            ) as usize,
                            shard_concurrency: arg(
                                "--shard-concurrency",
                                esq_projector::DEFAULT_SHARD_CONCURRENCY as u64,
                            ) as usize,
                            poll_limit: arg("--poll-limit", u64::from(Config::default().poll_limit))
                                as u32,
                            ..Config::default()
                        },
                    );
                    // Generation records first (as a running projector makes them), so that
                    // catch_up reads the change log rather than filling in place by a scan.
                    p.refresh_generations(false).await.expect("generations");
                    p.catch_up().await.expect("catch up");
                }
                "raw" => {
                    futures::stream::iter(ids.clone())
                        .map(|id| {
                            let (read, projections) = (Arc::clone(&read), projections.clone());
                            let events = read_raw(id.clone());
                            async move {
                                let events = events.await;
                                for p in &projections {
                                    let b = batch(p.as_ref(), &events).expect("fold").expect("b");
                                    read.apply(&format!("raw{}", p.name()), &id, &b)
                                        .await
                                        .expect("apply");
                                }
                            }
                        })
                        .buffer_unordered(raw_concurrency)
                        .collect::<Vec<_>>()
                        .await;
                }
                lua => {
                    let per_event = lua == "lua-per-event";
                    futures::stream::iter(all.iter())
                        .map(|events| {
                            let (read, projections) = (Arc::clone(&read), projections.clone());
                            async move {
                                for p in &projections {
                                    let ns = format!("lua{}", p.name());
                                    let id = &events[0].stream.id;
                                    if per_event {
                                        for e in events {
                                            let b = batch(p.as_ref(), std::slice::from_ref(e))
                                                .expect("fold")
                                                .expect("b");
                                            read.apply(&ns, id, &b).await.expect("apply");
                                        }
                                    } else {
                                        let b =
                                            batch(p.as_ref(), events).expect("fold").expect("b");
                                        read.apply(&ns, id, &b).await.expect("apply");
                                    }
                                }
                            }
                        })
                        .buffer_unordered(raw_concurrency)
                        .collect::<Vec<_>>()
                        .await;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let me = (cpu_ticks(0) - me) as f64 / 100.0;
            let others: Vec<String> = pids
                .iter()
                .zip(&before)
                .map(|((n, p), b)| format!("{n} {:.2}s", (cpu_ticks(*p) - b) as f64 / 100.0))
                .collect();
            // Every cart current in the projector's generation.
            if mode == "esq" {
                for id in &ids {
                    let v = read.version("cart2:g1", id).await.expect("version");
                    assert_eq!(v, per_cart, "cart {id} not current");
                }
            }
            let rate = total as f64 / secs;
            eprintln!(
                "round {round} {mode:14} {rate:8.0} events/s ({secs:.2}s; cpu self {me:.2}s, {})",
                others.join(", ")
            );
            results.entry(mode).or_default().push(rate);
            let mut conn = redis::Client::open(
                std::env::var("ESQ_TEST_REDIS")
                    .expect("ESQ_TEST_REDIS")
                    .as_str(),
            )
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("conn");
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .expect("scan");
                if !keys.is_empty() {
                    let _: usize = redis::cmd("DEL")
                        .arg(&keys)
                        .query_async(&mut conn)
                        .await
                        .expect("del");
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    if std::env::args().any(|a| a == "--drop-keyspace") {
        session
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", config.keyspace), &[])
            .await
            .expect("drop keyspace");
    }
    let esq = median(&results["esq"]);
    for (mode, rates) in &results {
        let m = median(rates);
        println!("{mode:14} median {m:8.0} events/s  esq/this {:.2}", esq / m);
    }
}
