//! The CQL adapter against a real Apache Cassandra 5 node (`ESQ_TEST_CASSANDRA`, e.g.
//! `127.0.0.1:9142`; `scripts/cassandra.sh` provisions one). Without that variable every test
//! panics, unless `ESQ_SKIP_REAL_BACKENDS=1`, which skips them and says so. Each test works in
//! its own keyspace.
//!
//! ScyllaDB-only paths (tablets DDL, the native CDC feed) cannot run here; their pieces are
//! unit-tested in the crate.

use esq_domain::{ExpectedVersion, NewEvent, StreamId};
use esq_eventstore::cql::{CqlConfig, CqlStore, Engine};
use esq_eventstore::{contract, now_us, ChangeFeed, EventStore, ReadRequest, StoreError};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The node under test, or `None` when the run opted out of real backends.
fn node(test: &str) -> Option<String> {
    match std::env::var("ESQ_TEST_CASSANDRA") {
        Ok(addr) if !addr.trim().is_empty() => Some(addr.trim().to_owned()),
        _ if std::env::var("ESQ_SKIP_REAL_BACKENDS").as_deref() == Ok("1") => {
            eprintln!("{test}: SKIPPED by request (ESQ_SKIP_REAL_BACKENDS=1)");
            None
        }
        _ => panic!(
            "{test} needs a Cassandra node: set ESQ_TEST_CASSANDRA=host:port \
             (scripts/cassandra.sh starts one), or ESQ_SKIP_REAL_BACKENDS=1 to skip"
        ),
    }
}

/// A keyspace name no other test or run uses.
fn keyspace(test: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let run = (now_us() as u64 / 1000) % 1_000_000_000;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("esq_{test}_{run}_{}_{seq}", std::process::id() % 100_000)
}

fn config(test: &str, node: &str) -> CqlConfig {
    let mut config = CqlConfig::new(vec![node.to_owned()], keyspace(test));
    config.confidence_window = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(10);
    config
}

async fn connect(config: CqlConfig) -> CqlStore {
    let keyspace = config.keyspace.clone();
    match CqlStore::connect(config).await {
        Ok(store) => store,
        Err(e) => panic!("connecting to keyspace {keyspace} failed: {e}"),
    }
}

fn stream(id: &str) -> StreamId {
    StreamId::new("cart", id).expect("valid stream id")
}

fn event(n: u32) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "ItemAdded".into(),
        schema_version: 1,
        content_type: "application/json".into(),
        data: format!("{{\"n\":{n}}}").into_bytes(),
        metadata: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_holds() {
    let Some(node) = node("contract_holds") else {
        return;
    };
    let started = Instant::now();
    let store = connect(config("contract", &node)).await;
    eprintln!("connect + schema: {:?}", started.elapsed());
    assert_eq!(store.engine(), Engine::Cassandra);
    let started = Instant::now();
    contract::run_all(&store, "c1").await;
    eprintln!("contract::run_all: {:?}", started.elapsed());
    // Connecting again to an existing keyspace migrates nothing and sees the same data.
    let again = connect(store.config().clone()).await;
    assert!(again
        .stream_info(&StreamId::new("contract", "c1-round-trip").expect("valid"))
        .await
        .expect("stream_info")
        .is_some());
}

/// Documents the engine behaviour the append relies on, with the bare driver: on Cassandra 5 a
/// condition `IF head = NULL` holds for a partition that does not exist, `IF head = 0` does
/// not, and a failed condition returns `[applied] = false` alone for a missing partition, plus
/// the current `head` for an existing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lwt_on_a_missing_partition() {
    use scylla::client::session_builder::SessionBuilder;
    use scylla::value::{CqlValue, Row};
    let Some(node) = node("lwt_on_a_missing_partition") else {
        return;
    };
    let store = connect(config("lwt", &node)).await;
    let ks = &store.config().keyspace;
    let session = SessionBuilder::new()
        .known_node(&node)
        .build()
        .await
        .expect("session");
    let cas = |cond: &str| {
        format!(
            "UPDATE {ks}.events SET head = 1 WHERE stream_type = 'raw' AND stream_id = ? \
             AND bucket = 0 IF head = {cond}"
        )
    };
    let run = |cql: String, id: &'static str| {
        let session = &session;
        async move {
            let rows = session
                .query_unpaged(cql, (id,))
                .await
                .expect("LWT runs")
                .into_rows_result()
                .expect("LWT returns rows");
            let names: Vec<String> = rows
                .column_specs()
                .iter()
                .map(|c| c.name().to_owned())
                .collect();
            let row: Row = rows.single_row().expect("one row");
            (names, row.columns)
        }
    };
    let (names, values) = run(cas("0"), "a").await;
    assert_eq!(names, ["[applied]"], "missing partition, IF head = 0");
    assert_eq!(values, [Some(CqlValue::Boolean(false))]);
    let (names, values) = run(cas("NULL"), "a").await;
    assert_eq!(names, ["[applied]"], "missing partition, IF head = NULL");
    assert_eq!(values, [Some(CqlValue::Boolean(true))]);
    let (names, values) = run(cas("NULL"), "a").await;
    assert_eq!(
        names,
        ["[applied]", "head"],
        "existing partition, failed condition"
    );
    assert_eq!(
        values,
        [Some(CqlValue::Boolean(false)), Some(CqlValue::BigInt(1))]
    );
}

/// Sixteen writers with exact expected versions, then sixteen with `Any`, on one stream each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lwt_races() {
    let Some(node) = node("lwt_races") else {
        return;
    };
    let store = connect(config("race", &node)).await;
    let started = Instant::now();
    contract::concurrent_appenders(&store, "exact").await;
    eprintln!("16 exact appenders x 3 appends: {:?}", started.elapsed());

    let s = stream("any-race");
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Vec<u64>>> = (0..16)
        .map(|w| {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move {
                let mut versions = Vec::new();
                for i in 0..3 {
                    let r = store
                        .append(&s, ExpectedVersion::Any, &[event(w * 10 + i)])
                        .await
                        .unwrap_or_else(|e| panic!("Any append under contention failed: {e}"));
                    assert_eq!(r.first_version, r.last_version);
                    versions.push(r.first_version);
                }
                versions
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=48).collect::<Vec<u64>>(),
        "one winner per version"
    );
    eprintln!("16 Any appenders x 3 appends: {:?}", started.elapsed());
    let stored = store
        .read(&s, ReadRequest::forwards(1, 100))
        .await
        .expect("read");
    assert_eq!(stored.len(), 48);
}

/// Retries are recognised within the idempotency window (and, for exact appends, beyond it);
/// a retry of an `Any` append that has slid out of the window appends again — the documented
/// price of the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_and_the_window() {
    let Some(node) = node("idempotent_retries_and_the_window") else {
        return;
    };
    let mut cfg = config("idem", &node);
    cfg.id_window = 4;
    let store = connect(cfg).await;

    let s = stream("window");
    let first = vec![event(1), event(2)];
    let r1 = store
        .append(&s, ExpectedVersion::Any, &first)
        .await
        .expect("first");
    for i in 0..2 {
        store
            .append(&s, ExpectedVersion::Any, &[event(10 + i)])
            .await
            .expect("more");
    }
    // Versions 1..=4 are all within the window of 4.
    assert_eq!(
        store.append(&s, ExpectedVersion::Any, &first).await,
        Ok(r1),
        "retry within the window"
    );
    for i in 0..3 {
        store
            .append(&s, ExpectedVersion::Any, &[event(20 + i)])
            .await
            .expect("more");
    }
    // Exact retries are recognised by the read-back after the lost race, wherever they are.
    assert_eq!(
        store.append(&s, ExpectedVersion::Exact(0), &first).await,
        Ok(r1),
        "exact retry outside the window"
    );
    let r = store
        .append(&s, ExpectedVersion::Any, &first)
        .await
        .expect("an Any retry outside the window is a new append");
    assert_eq!(r.first_version, 8);

    // A retry racing its own original: both report the same result, one copy is stored.
    let s = stream("self-race");
    let events = vec![event(1), event(2), event(3)];
    let (a, b) = tokio::join!(
        store.append(&s, ExpectedVersion::Any, &events),
        store.append(&s, ExpectedVersion::Any, &events)
    );
    assert_eq!(a.expect("a"), b.expect("b"));
    let stored = store
        .read(&s, ReadRequest::forwards(1, 10))
        .await
        .expect("read");
    assert_eq!(stored.len(), 3);
}

/// The notification is written with the append, in the stream's shard, visible only after the
/// confidence window; a notification whose append never committed is still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_feed() {
    let Some(node) = node("changes_feed") else {
        return;
    };
    let mut cfg = config("feed", &node);
    cfg.confidence_window = Duration::from_secs(3);
    cfg.shard_count = 8;
    let store = connect(cfg).await;
    let s = stream("feed-1");
    let shard = store.shard_of(&s);
    assert_eq!(
        shard,
        esq_eventstore::cql::shard_of(&s, 8),
        "the store and the free function agree"
    );
    assert_eq!(
        shard, 6,
        "FNV-1a of cart/feed-1 is pinned: it is part of the data layout"
    );

    let before = now_us();
    let r = store
        .append(&s, ExpectedVersion::NoStream, &[event(1), event(2)])
        .await
        .expect("append");
    let page = store.poll(shard, None, 100).await.expect("poll");
    assert!(
        page.changes.is_empty(),
        "a change younger than the confidence window is not served yet: {page:?}"
    );

    // An orphan: the notification is written, the conditional batch then fails.
    let orphan = stream("feed-orphan");
    let orphan_shard = store.shard_of(&orphan);
    let got = store
        .append(&orphan, ExpectedVersion::Exact(5), &[event(3)])
        .await;
    assert_eq!(
        got,
        Err(StoreError::WrongExpectedVersion {
            expected: ExpectedVersion::Exact(5),
            actual: 0
        })
    );
    let after = now_us();

    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let page = store.poll(shard, None, 100).await.expect("poll");
    let mine: Vec<_> = page.changes.iter().filter(|c| c.stream == s).collect();
    assert_eq!(mine.len(), 1, "one notification per append: {page:?}");
    assert_eq!((mine[0].first_version, mine[0].last_version), (1, 2));
    assert!(before <= mine[0].noted_at_us && mine[0].noted_at_us <= r.committed_at_us);
    for other in 0..8 {
        if other != shard {
            let page = store.poll(other, None, 100).await.expect("poll");
            assert!(
                page.changes.iter().all(|c| c.stream != s),
                "the change is only in its stream's shard"
            );
        }
    }

    let page = store.poll(orphan_shard, None, 100).await.expect("poll");
    let orphans: Vec<_> = page.changes.iter().filter(|c| c.stream == orphan).collect();
    assert_eq!(orphans.len(), 1, "the orphan notification is delivered");
    assert_eq!((orphans[0].first_version, orphans[0].last_version), (6, 6));
    assert!(before <= orphans[0].noted_at_us && orphans[0].noted_at_us <= after);
    assert!(
        store
            .stream_info(&orphan)
            .await
            .expect("stream_info")
            .is_none(),
        "its events are not in the store, which is how a projector recognises it"
    );

    // Positions resume right after their change.
    let last = page.positions.last().cloned();
    let rest = store
        .poll(orphan_shard, last.as_deref(), 100)
        .await
        .expect("poll");
    assert!(rest.changes.is_empty(), "nothing after the last position");
}

/// Idle feeds: a poll from an hour back over one-second buckets (3600 of them, all empty but
/// one) answers in one walk, not one query per bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_jump_over_empty_buckets() {
    let Some(node) = node("polls_jump_over_empty_buckets") else {
        return;
    };
    let mut cfg = config("idle", &node);
    cfg.change_bucket = Duration::from_secs(1);
    cfg.change_ttl = Duration::from_secs(3600);
    cfg.shard_count = 1;
    let store = connect(cfg).await;
    let s = stream("idle-1");
    store
        .append(&s, ExpectedVersion::NoStream, &[event(1)])
        .await
        .expect("append");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A position an hour old (its bucket has expired by now, so the walk starts at the oldest
    // live bucket).
    let old = format!("{}:{}", (now_us() - 3_600_000_000) / 1_000_000, Uuid::nil());
    let started = Instant::now();
    let page = store.poll(0, Some(&old), 100).await.expect("poll");
    let took = started.elapsed();
    assert_eq!(page.changes.len(), 1, "{page:?}");
    let started = Instant::now();
    let empty = store
        .poll(0, page.positions.last().map(String::as_str), 100)
        .await
        .expect("poll");
    assert!(empty.changes.is_empty());
    eprintln!(
        "poll over 3600 one-second buckets: {took:?}; idle poll: {:?}",
        started.elapsed()
    );
    assert!(
        took < Duration::from_secs(5),
        "a poll over an hour of empty buckets took {took:?}"
    );
}

/// Unreachable clusters fail fast with `Unavailable`, stalled ones within the request timeout,
/// and the same store serves again once the cluster is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_are_unavailable_and_recoverable() {
    let Some(node) = node("outages_are_unavailable_and_recoverable") else {
        return;
    };
    let timeout = Duration::from_secs(2);

    // Nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut cfg = config("down", &closed.to_string());
    cfg.request_timeout = timeout;
    let started = Instant::now();
    let got = CqlStore::connect(cfg).await;
    assert!(
        matches!(got, Err(StoreError::Unavailable(_))),
        "connect to a closed port: {got:?}"
    );
    eprintln!(
        "connect to a closed port: Unavailable after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() <= timeout * 2 + Duration::from_secs(1));

    let upstream: SocketAddr = tokio::net::lookup_host(&node)
        .await
        .expect("resolve")
        .next()
        .expect("an address");
    let mut proxy = Proxy::start(upstream).await;
    let mut cfg = config("outage", &proxy.addr().to_string());
    cfg.request_timeout = timeout;
    let store = connect(cfg).await;
    let s = stream("outage-1");
    store
        .append(&s, ExpectedVersion::Any, &[event(1)])
        .await
        .expect("append while up");

    // Stalled: connections stay open but nothing answers.
    proxy.stall();
    let started = Instant::now();
    let got = store.append(&s, ExpectedVersion::Any, &[event(2)]).await;
    let took = started.elapsed();
    assert!(
        matches!(got, Err(StoreError::Unavailable(_))),
        "append while stalled: {got:?}"
    );
    eprintln!("append while stalled: Unavailable after {took:?}");
    assert!(
        took <= timeout + Duration::from_millis(500),
        "took {took:?}"
    );

    // Down: connections reset, the port refuses.
    proxy.down().await;
    let started = Instant::now();
    let got = store.read(&s, ReadRequest::forwards(1, 10)).await;
    let took = started.elapsed();
    assert!(
        matches!(got, Err(StoreError::Unavailable(_))),
        "read while down: {got:?}"
    );
    eprintln!("read while down: Unavailable after {took:?}");
    assert!(
        took <= timeout + Duration::from_millis(500),
        "took {took:?}"
    );

    // Back: the same store reconnects by itself.
    proxy.up().await;
    let started = Instant::now();
    loop {
        match store.append(&s, ExpectedVersion::Any, &[event(3)]).await {
            Ok(_) => break,
            Err(StoreError::Unavailable(e)) => {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "the store did not recover within 60 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("unexpected error after recovery: {e}"),
        }
    }
    eprintln!("recovered after {:?}", started.elapsed());
    let versions: Vec<u64> = store
        .read(&s, ReadRequest::forwards(1, 10))
        .await
        .expect("read after recovery")
        .iter()
        .map(|e| e.version)
        .collect();
    // The stalled append may or may not have reached the node before the stall.
    assert!(versions == [1, 2] || versions == [1, 2, 3], "{versions:?}");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Stall,
    Down,
}

/// A TCP proxy in front of the node that can stall (hold connections, forward nothing) or go
/// down (reset connections, refuse new ones) and come back on the same port.
struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, _) = watch::channel(Mode::Forward);
        let mut proxy = Self {
            addr,
            upstream,
            mode,
            accept: None,
        };
        proxy.accept = Some(proxy.serve(listener));
        proxy
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let (upstream, mode) = (self.upstream, self.mode.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut mode = mode.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let stalled = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        r = mode.wait_for(|m| *m != Mode::Forward) => r.is_ok(),
                    };
                    if stalled {
                        // Hold both sockets, silent, until the proxy goes down.
                        let _ = mode.wait_for(|m| *m == Mode::Down).await.map(drop);
                    }
                });
            }
        })
    }

    fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    async fn down(&mut self) {
        self.mode.send_replace(Mode::Down);
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
    }

    async fn up(&mut self) {
        self.mode.send_replace(Mode::Forward);
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    attempts += 1;
                    assert!(attempts < 50, "cannot rebind the proxy port: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        self.accept = Some(self.serve(listener));
    }
}
