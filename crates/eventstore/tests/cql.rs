//! The CQL adapter against a real Apache Cassandra 5 node (`ESQ_TEST_CASSANDRA`, e.g.
//! `127.0.0.1:9142`; `scripts/cassandra.sh` provisions one). Without that variable every test
//! panics, unless `ESQ_SKIP_REAL_BACKENDS=1`, which skips them and says so. Each test works in
//! its own keyspace.
//!
//! ScyllaDB-only paths (tablets DDL, the native CDC feed) cannot run here; their pieces are
//! unit-tested in the crate.

use esq_domain::{ExpectedVersion, NewEvent, StreamId};
use esq_eventstore::cql::{CqlConfig, CqlStore, Engine, QuorumLevel};
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
    // Appends whose notification takes more than half the window are refused: a second of
    // window keeps a loaded test machine clear of that.
    config.confidence_window = Duration::from_millis(1000);
    config.request_timeout = Duration::from_secs(10);
    config.append_deadline = Duration::from_secs(25);
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

/// The configured level reaches the server: on one node, a keyspace of two replicas can reach
/// neither `QUORUM` nor `LOCAL_QUORUM`, and the node's refusal names the level it was asked for.
/// (Weaker levels than a quorum cannot be configured at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_consistency_level_is_the_one_the_node_is_asked_for() {
    let test = "the_configured_consistency_level_is_the_one_the_node_is_asked_for";
    let Some(node) = node(test) else {
        return;
    };
    for (level, name) in [
        (QuorumLevel::LocalQuorum, "LOCAL_QUORUM"),
        (QuorumLevel::Quorum, "QUORUM"),
    ] {
        let mut config = config("levels", &node);
        config.replication = "{'class': 'SimpleStrategy', 'replication_factor': 2}".into();
        config.consistency = level;
        let store = connect(config).await;
        let err = store
            .append(&stream("levels"), ExpectedVersion::Any, &[event(1)])
            .await
            .expect_err("two replicas on one node: no quorum");
        let text = err.to_string();
        assert!(
            matches!(err, StoreError::Unavailable(_)),
            "{level:?}: a missing quorum is unavailable, got {err:?}"
        );
        let named = text
            .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .any(|word| word == name);
        assert!(named, "{level:?}: the refusal names {name}: {text}");
        let read = store
            .read(&stream("levels"), ReadRequest::forwards(1, 10))
            .await
            .expect_err("a quorum read cannot be served either");
        assert!(
            matches!(read, StoreError::Unavailable(_)),
            "{level:?}: {read:?}"
        );
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
    tokio::time::sleep(Duration::from_millis(1_200)).await;
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

/// An append whose batch reached the node but whose answer was lost (the proxy swallows the
/// response, so the driver times out) is resolved by reading the stream back linearizably: it
/// is reported as committed, with its versions, and stored once. When the read-back cannot get
/// through either, the append is reported as `OutcomeUnknown` — never as a plain failure — and
/// a retry with the same event ids then returns the original result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_appends_are_read_back() {
    let Some(node) = node("unanswered_appends_are_read_back") else {
        return;
    };
    let upstream: SocketAddr = tokio::net::lookup_host(&node)
        .await
        .expect("resolve")
        .next()
        .expect("an address");
    let proxy = FrameProxy::start(upstream).await;
    let mut cfg = config("unanswered", &proxy.addr().to_string());
    cfg.request_timeout = Duration::from_secs(2);
    cfg.append_deadline = Duration::from_secs(8);
    let store = connect(cfg).await;
    let s = stream("unanswered-1");
    store
        .append(&s, ExpectedVersion::NoStream, &[event(1)])
        .await
        .expect("append while answered");

    // The batch goes through, its answer is lost: the read-back finds it committed.
    for expected in [ExpectedVersion::Exact(1), ExpectedVersion::Any] {
        proxy.swallow(Swallow::BatchAnswer);
        let batch = [event(2), event(3)];
        let head = store
            .stream_info(&s)
            .await
            .expect("info")
            .expect("exists")
            .version;
        let started = Instant::now();
        let got = store.append(&s, expected, &batch).await;
        eprintln!(
            "{expected}: batch answer lost: {got:?} after {:?}",
            started.elapsed()
        );
        assert!(proxy.swallowed() > 0, "the proxy saw no batch to swallow");
        let r = got.unwrap_or_else(|e| panic!("{expected}: a committed append reported as {e:?}"));
        assert_eq!((r.first_version, r.last_version), (head + 1, head + 2));
        let ids: Vec<Uuid> = store
            .read(&s, ReadRequest::forwards(head + 1, 10))
            .await
            .expect("read")
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(ids, [batch[0].event_id, batch[1].event_id], "stored once");
    }

    // The answer is lost and so is every answer after it, until the deadline: unknown.
    proxy.swallow(Swallow::EverythingFromBatch);
    let batch = [event(4)];
    let started = Instant::now();
    let got = store.append(&s, ExpectedVersion::Exact(5), &batch).await;
    eprintln!(
        "batch and read-backs unanswered: {got:?} after {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&got, Err(StoreError::OutcomeUnknown(_))),
        "an append that may have committed must say so: {got:?}"
    );
    let text = got.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        text.contains("retrying with the same event ids is safe"),
        "{text}"
    );
    proxy.swallow(Swallow::Nothing);
    // The node did get the batch: the retry finds it, once the driver has its answers again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let retried = loop {
        match store.append(&s, ExpectedVersion::Exact(5), &batch).await {
            Ok(r) => break r,
            Err(StoreError::Unavailable(e)) | Err(StoreError::OutcomeUnknown(e))
                if Instant::now() < deadline =>
            {
                eprintln!("retry: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("retry with the same ids: {e:?}"),
        }
    };
    assert_eq!((retried.first_version, retried.last_version), (6, 6));
    assert_eq!(
        store
            .stream_info(&s)
            .await
            .expect("info")
            .map(|i| i.version),
        Some(6)
    );
}

/// The configuration is checked at connect: the append deadline must leave room for two
/// requests, and the confidence window has a floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing_settings_are_checked_at_connect() {
    let Some(node) = node("timing_settings_are_checked_at_connect") else {
        return;
    };
    let mut cfg = config("timing", &node);
    cfg.append_deadline = cfg.request_timeout * 2 - Duration::from_millis(1);
    let got = CqlStore::connect(cfg).await.map(drop);
    assert!(
        matches!(&got, Err(StoreError::Internal(e)) if e.contains("append_deadline")),
        "{got:?}"
    );
    let mut cfg = config("timing", &node);
    cfg.confidence_window = Duration::from_millis(50);
    let got = CqlStore::connect(cfg).await.map(drop);
    assert!(
        matches!(&got, Err(StoreError::Internal(e)) if e.contains("confidence_window")),
        "{got:?}"
    );
}

/// A notification acknowledged later than half the confidence window after it was noted could
/// already have been passed over by a projector: the append is not sent, it fails with
/// `Unavailable`, and the row is left as an orphan. Once the write is prompt again, appends go
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_notification_is_not_followed_by_its_append() {
    let Some(node) = node("a_late_notification_is_not_followed_by_its_append") else {
        return;
    };
    let upstream: SocketAddr = tokio::net::lookup_host(&node)
        .await
        .expect("resolve")
        .next()
        .expect("an address");
    let proxy = DelayProxy::start(upstream).await;
    let mut cfg = config("late", &proxy.addr().to_string());
    cfg.confidence_window = Duration::from_millis(400);
    cfg.request_timeout = Duration::from_secs(5);
    cfg.append_deadline = Duration::from_secs(11);
    cfg.shard_count = 1;
    let store = connect(cfg).await;

    let s = stream("late-1");
    // Every request now takes 300 ms to reach the node: more than half the window.
    proxy.delay(Duration::from_millis(300));
    let got = store
        .append(&s, ExpectedVersion::NoStream, &[event(1)])
        .await;
    assert!(
        matches!(&got, Err(StoreError::Unavailable(e)) if e.contains("confidence window")),
        "{got:?}"
    );
    // Same for an exact append, whose id check runs beside the notification.
    let got = store
        .append(&s, ExpectedVersion::Exact(1), &[event(2)])
        .await;
    assert!(
        matches!(&got, Err(StoreError::Unavailable(e)) if e.contains("confidence window")),
        "{got:?}"
    );
    proxy.delay(Duration::ZERO);
    assert_eq!(
        store.stream_info(&s).await.expect("stream_info"),
        None,
        "nothing was appended"
    );

    // The rows are there, as orphans: their events never appear.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let page = store.poll(0, None, 100).await.expect("poll");
    let ranges: Vec<(u64, u64)> = page
        .changes
        .iter()
        .filter(|c| c.stream == s)
        .map(|c| (c.first_version, c.last_version))
        .collect();
    assert_eq!(ranges, [(1, 1), (2, 2)], "{page:?}");

    // Prompt again: the append goes through.
    let r = store
        .append(&s, ExpectedVersion::NoStream, &[event(3)])
        .await
        .expect("append once the writes are prompt");
    assert_eq!(r.first_version, 1);
}

/// Commit times never go backwards within a stream, even after a writer whose clock runs ahead:
/// an append that reads the stream's newest events (`Any`, `StreamExists`, `Exact` with the id
/// check) takes at least their time, and `until_time` reads agree in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_times_are_clamped_to_the_stream() {
    use scylla::client::session_builder::SessionBuilder;
    let Some(node) = node("commit_times_are_clamped_to_the_stream") else {
        return;
    };
    let store = connect(config("clamp", &node)).await;
    let ks = store.config().keyspace.clone();
    let s = stream("skewed");
    store
        .append(&s, ExpectedVersion::NoStream, &[event(1), event(2)])
        .await
        .expect("append");

    // Another writer, its clock an hour ahead, appends version 3 (as `append` would).
    let ahead = now_us() + 3_600_000_000;
    let session = SessionBuilder::new()
        .known_node(&node)
        .build()
        .await
        .expect("session");
    session
        .query_unpaged(
            format!(
                "INSERT INTO {ks}.events (stream_type, stream_id, bucket, version, event_id, \
                 event_type, schema_version, content_type, data, metadata, recorded_at) \
                 VALUES (?, ?, 0, 3, ?, 'ItemAdded', 1, 'application/json', ?, {{}}, ?)"
            ),
            (
                s.kind.as_str(),
                s.id.as_str(),
                Uuid::now_v7(),
                b"{}".to_vec(),
                ahead,
            ),
        )
        .await
        .expect("insert the skewed event");
    session
        .query_unpaged(
            format!(
                "UPDATE {ks}.events SET head = 3, updated_at = ? WHERE stream_type = ? \
                 AND stream_id = ? AND bucket = 0 IF head = 2"
            ),
            (ahead, s.kind.as_str(), s.id.as_str()),
        )
        .await
        .expect("move the head");

    let any = store
        .append(&s, ExpectedVersion::Any, &[event(4)])
        .await
        .expect("Any append");
    assert_eq!(any.first_version, 4);
    assert_eq!(any.committed_at_us, ahead, "clamped to the newest time");
    let exact = store
        .append(&s, ExpectedVersion::Exact(4), &[event(5)])
        .await
        .expect("Exact append");
    assert_eq!(exact.committed_at_us, ahead, "clamped to the newest time");
    let exists = store
        .append(&s, ExpectedVersion::StreamExists, &[event(6)])
        .await
        .expect("StreamExists append");
    assert_eq!(exists.committed_at_us, ahead, "clamped to the newest time");

    let all = store
        .read(&s, ReadRequest::forwards(1, 100))
        .await
        .expect("read");
    let times: Vec<i64> = all.iter().map(|e| e.recorded_at_us).collect();
    assert_eq!(all.len(), 6);
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    // As of just before the skewed writer's time: versions 1 and 2, whichever the direction.
    for until in [ahead - 1, ahead] {
        let mut forwards = ReadRequest::forwards(1, 100);
        forwards.until_time_us = Some(until);
        let mut backwards = forwards;
        backwards.direction = esq_eventstore::Direction::Backwards;
        backwards.from_version = None;
        let f: Vec<u64> = store
            .read(&s, forwards)
            .await
            .expect("read")
            .iter()
            .map(|e| e.version)
            .collect();
        let mut b: Vec<u64> = store
            .read(&s, backwards)
            .await
            .expect("read")
            .iter()
            .map(|e| e.version)
            .collect();
        b.reverse();
        assert_eq!(f, b, "until {until}: both directions agree");
        let expected: Vec<u64> = if until < ahead {
            vec![1, 2]
        } else {
            (1..=6).collect()
        };
        assert_eq!(f, expected, "until {until}");
    }
}

/// A TCP proxy in front of the node that holds every chunk sent to the node for a settable
/// delay.
struct DelayProxy {
    addr: SocketAddr,
    delay: watch::Sender<Duration>,
    accept: JoinHandle<()>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl DelayProxy {
    async fn start(upstream: SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (delay, _) = watch::channel(Duration::ZERO);
        let delays = delay.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let delay = delays.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_rx.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let pause = *delay.borrow();
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                            if server_tx.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut server_rx, &mut client_tx);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Self {
            addr,
            delay,
            accept,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn delay(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }
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

/// What a [`FrameProxy`] drops of the node's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Swallow {
    /// Forwards everything.
    Nothing,
    /// Drops the answer to the next BATCH request (the request itself goes through).
    BatchAnswer,
    /// Drops the answer to the next BATCH request and every answer after it.
    EverythingFromBatch,
}

/// A TCP proxy in front of the node that reads CQL v4 frames in both directions and can drop
/// the node's answer to a BATCH request after forwarding the request, so that the driver
/// times out on a write the node did apply.
struct FrameProxy {
    addr: SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<SwallowState>>,
    accept: JoinHandle<()>,
}

struct SwallowState {
    mode: Swallow,
    /// (connection, stream id) of batch requests whose answers are to be dropped.
    pending: Vec<(u64, i16)>,
    /// Drop every answer from now on.
    black_hole: bool,
    swallowed: u32,
}

impl Drop for FrameProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Reads one CQL frame (9-byte v4 header and body); `None` at the end of the stream.
async fn read_frame(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut frame = vec![0u8; 9];
    r.read_exact(&mut frame).await.ok()?;
    let len = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) as usize;
    frame.resize(9 + len, 0);
    r.read_exact(&mut frame[9..]).await.ok()?;
    Some(frame)
}

impl FrameProxy {
    async fn start(upstream: SocketAddr) -> Self {
        use tokio::io::AsyncWriteExt;
        const BATCH: u8 = 0x0D;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = std::sync::Arc::new(std::sync::Mutex::new(SwallowState {
            mode: Swallow::Nothing,
            pending: Vec::new(),
            black_hole: false,
            swallowed: 0,
        }));
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            let mut conn = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                conn += 1;
                let (up_state, down_state) = (shared.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let up = async move {
                        while let Some(frame) = read_frame(&mut client_rx).await {
                            if frame[4] == BATCH {
                                let mut st = up_state.lock().expect("lock");
                                if st.mode != Swallow::Nothing {
                                    let stream = i16::from_be_bytes([frame[2], frame[3]]);
                                    st.pending.push((conn, stream));
                                }
                            }
                            if server_tx.write_all(&frame).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = async move {
                        while let Some(frame) = read_frame(&mut server_rx).await {
                            let stream = i16::from_be_bytes([frame[2], frame[3]]);
                            let drop_it = {
                                let mut st = down_state.lock().expect("lock");
                                if let Some(i) =
                                    st.pending.iter().position(|p| *p == (conn, stream))
                                {
                                    st.pending.remove(i);
                                    st.swallowed += 1;
                                    if st.mode == Swallow::EverythingFromBatch {
                                        st.black_hole = true;
                                    }
                                    st.mode = Swallow::Nothing;
                                    true
                                } else {
                                    st.black_hole && stream >= 0
                                }
                            };
                            if !drop_it && client_tx.write_all(&frame).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Self {
            addr,
            state,
            accept,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms the proxy (or, with [`Swallow::Nothing`], disarms it and forwards everything).
    fn swallow(&self, mode: Swallow) {
        let mut st = self.state.lock().expect("lock");
        st.mode = mode;
        if mode == Swallow::Nothing {
            st.black_hole = false;
            st.pending.clear();
        }
    }

    /// How many batch answers were dropped so far.
    fn swallowed(&self) -> u32 {
        self.state.lock().expect("lock").swallowed
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_pass_their_checks() {
    let Some(node) = node("snapshots_pass_their_checks") else {
        return;
    };
    let store = connect(config("snap", &node)).await;
    esq_eventstore::snapshots::check(&store, "s1").await;
}

/// Group commit of notifications: many concurrent appends over few shards (new streams, one
/// contended stream, exact appends) each get a notification covering exactly their versions,
/// however the flushes grouped them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_committed_notifications_note_every_append() {
    let Some(node) = node("group_committed_notifications_note_every_append") else {
        return;
    };
    let mut cfg = config("group", &node);
    cfg.shard_count = 2;
    let store = connect(cfg).await;
    let mut tasks: Vec<JoinHandle<Vec<(StreamId, u64, u64)>>> = Vec::new();
    for w in 0..24u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            // A new stream per append, then an exact append on it, then the contended one.
            let s = stream(&format!("group-{w}"));
            let events: Vec<NewEvent> = (0..=w % 3).map(|i| event(w * 10 + i)).collect();
            let r = store
                .append(&s, ExpectedVersion::Any, &events)
                .await
                .expect("append to a new stream");
            done.push((s.clone(), r.first_version, r.last_version));
            let r = store
                .append(&s, ExpectedVersion::Exact(r.last_version), &[event(w)])
                .await
                .expect("exact append");
            done.push((s, r.first_version, r.last_version));
            let hot = stream("group-hot");
            let r = store
                .append(&hot, ExpectedVersion::Any, &[event(w)])
                .await
                .expect("contended append");
            done.push((hot, r.first_version, r.last_version));
            done
        }));
    }
    let mut committed = Vec::new();
    for t in tasks {
        committed.extend(t.await.expect("writer"));
    }
    assert_eq!(committed.len(), 72);
    // Every committed append has its notification once the confidence window has passed.
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let mut noted = Vec::new();
        for shard in 0..2 {
            let mut after: Option<String> = None;
            loop {
                let page = store
                    .poll(shard, after.as_deref(), 500)
                    .await
                    .expect("poll");
                if page.changes.is_empty() {
                    break;
                }
                after = page.positions.last().cloned();
                noted.extend(
                    page.changes
                        .into_iter()
                        .map(|c| (c.stream, c.first_version, c.last_version)),
                );
            }
        }
        let missing: Vec<_> = committed.iter().filter(|c| !noted.contains(c)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "appends without a notification: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The tail cache is only ever a guess the conditional batch checks: two stores (two write-svc
/// replicas) take turns on one stream, each with a stale picture of it, and every answer is the
/// one a read-first append gives — versions, repeats of the other's appends, reused ids,
/// conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_tail_cache_costs_a_lost_race_never_a_wrong_answer() {
    let Some(node) = node("a_stale_tail_cache_costs_a_lost_race_never_a_wrong_answer") else {
        return;
    };
    let a = connect(config("stale", &node)).await;
    let b = connect(a.config().clone()).await;
    let s = stream("stale-1");
    let e1 = vec![event(1)];
    let e2 = vec![event(2), event(3)];
    let e3 = vec![event(4)];
    let r1 = a.append(&s, ExpectedVersion::Any, &e1).await.expect("a: 1");
    assert_eq!((r1.first_version, r1.last_version), (1, 1));
    // b knows nothing: it guesses a new stream, loses, reads, appends after.
    let r2 = b
        .append(&s, ExpectedVersion::Any, &e2)
        .await
        .expect("b: 2-3");
    assert_eq!((r2.first_version, r2.last_version), (2, 3));
    // a still believes the head is 1.
    let r3 = a.append(&s, ExpectedVersion::Any, &e3).await.expect("a: 4");
    assert_eq!((r3.first_version, r3.last_version), (4, 4));
    // Repeats through the other store, whose picture is stale, answer the originals.
    assert_eq!(b.append(&s, ExpectedVersion::Any, &e3).await, Ok(r3));
    assert_eq!(a.append(&s, ExpectedVersion::Any, &e2).await, Ok(r2));
    assert_eq!(b.append(&s, ExpectedVersion::Exact(0), &e1).await, Ok(r1));
    // An exact append at a head one store still believes in is a conflict, not a write.
    let c = connect(a.config().clone()).await;
    let r = c
        .append(&s, ExpectedVersion::Any, &[event(5)])
        .await
        .expect("c: 5");
    assert_eq!(r.first_version, 5);
    assert_eq!(
        a.append(&s, ExpectedVersion::Exact(4), &[event(6)]).await,
        Err(StoreError::WrongExpectedVersion {
            expected: ExpectedVersion::Exact(4),
            actual: 5
        })
    );
    // A reused id is refused whoever wrote it (the whole earlier append alone would be a
    // repeat, answered with its original result).
    let mixed = vec![event(7), e2[0].clone()];
    assert!(matches!(
        b.append(&s, ExpectedVersion::Any, &mixed).await,
        Err(StoreError::EventIdReused { index: 1, .. })
    ));
    assert!(matches!(
        c.append(&s, ExpectedVersion::Exact(5), &[event(8), e1[0].clone()])
            .await,
        Err(StoreError::EventIdReused { index: 1, .. })
    ));
    // Nothing was written twice.
    let stored = a
        .read(&s, ReadRequest::forwards(1, 100))
        .await
        .expect("read");
    let ids: Vec<Uuid> = stored.iter().map(|e| e.event_id).collect();
    let expected: Vec<Uuid> = e1
        .iter()
        .chain(&e2)
        .chain(&e3)
        .map(|e| e.event_id)
        .chain([stored[4].event_id])
        .collect();
    assert_eq!(ids, expected);
}
