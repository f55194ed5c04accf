//! The Redis adapter against real servers: standalone (`ESQ_TEST_REDIS`, e.g.
//! `redis://127.0.0.1:6390`) and a Redis Cluster (`ESQ_TEST_REDIS_CLUSTER`, comma-separated seed
//! URLs). `scripts/redis.sh start` / `start-cluster` start both. A missing variable fails the
//! test unless `ESQ_SKIP_REAL_BACKENDS=1`, which skips it and says so.

#![allow(clippy::unwrap_used)]

use esq_domain::projection::{apply_to_doc, ApplyOutcome, Batch, Changes, FieldOp};
use esq_readstore::redis::{subscribe_nudges, RedisConfig, RedisStore};
use esq_readstore::{contract, Coordination, Doc, ReadError, ReadStore};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Standalone,
    Cluster,
}

impl Backend {
    fn var(self) -> &'static str {
        match self {
            Backend::Standalone => "ESQ_TEST_REDIS",
            Backend::Cluster => "ESQ_TEST_REDIS_CLUSTER",
        }
    }

    /// The URLs from the environment, or `None` when the run opted out of real backends.
    fn urls(self, test: &str) -> Option<Vec<String>> {
        match std::env::var(self.var()) {
            Ok(v) if !v.trim().is_empty() => {
                Some(v.split(',').map(|u| u.trim().to_owned()).collect())
            }
            _ if std::env::var("ESQ_SKIP_REAL_BACKENDS").as_deref() == Ok("1") => {
                eprintln!("{test}: SKIPPED by request (ESQ_SKIP_REAL_BACKENDS=1)");
                None
            }
            _ => panic!(
                "{test} needs a real Redis: set {} (scripts/redis.sh start{} prints it), \
                 or ESQ_SKIP_REAL_BACKENDS=1 to skip",
                self.var(),
                match self {
                    Backend::Standalone => "",
                    Backend::Cluster => "-cluster",
                }
            ),
        }
    }

    /// A store with a key prefix no other test (or earlier run) uses.
    async fn store(self, test: &str) -> Option<(RedisStore, String)> {
        let urls = self.urls(test)?;
        let prefix = unique(test);
        let store = RedisStore::connect(RedisConfig {
            urls,
            cluster: matches!(self, Backend::Cluster),
            prefix: prefix.clone(),
            timeout: Duration::from_secs(5),
            access: Default::default(),
        })
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot connect to {}: {e}", self.var()));
        Some((store, prefix))
    }
}

fn unique(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "esqtest-{test}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn contract(backend: Backend, test: &str) {
    let Some((store, prefix)) = backend.store(test).await else {
        return;
    };
    contract::run_all(&store, &prefix).await;
}

#[tokio::test]
async fn standalone_contract() {
    contract(Backend::Standalone, "standalone_contract").await;
}

#[tokio::test]
async fn cluster_contract() {
    contract(Backend::Cluster, "cluster_contract").await;
}

async fn leases(backend: Backend, test: &str) {
    let Some((store, _)) = backend.store(test).await else {
        return;
    };
    let ttl = Duration::from_secs(30);
    assert!(store.acquire_lease("shard-1", "a", ttl).await.unwrap());
    assert!(!store.acquire_lease("shard-1", "b", ttl).await.unwrap());
    assert!(
        store.acquire_lease("shard-1", "a", ttl).await.unwrap(),
        "renewal"
    );
    assert!(!store.release_lease("shard-1", "b").await.unwrap());
    assert!(store.release_lease("shard-1", "a").await.unwrap());
    assert!(store.acquire_lease("shard-1", "b", ttl).await.unwrap());

    let short = Duration::from_millis(50);
    assert!(store.acquire_lease("shard-2", "a", short).await.unwrap());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        store.acquire_lease("shard-2", "b", ttl).await.unwrap(),
        "expired"
    );
    assert!(!store.release_lease("shard-2", "a").await.unwrap());
}

#[tokio::test]
async fn standalone_leases() {
    leases(Backend::Standalone, "standalone_leases").await;
}

#[tokio::test]
async fn cluster_leases() {
    leases(Backend::Cluster, "cluster_leases").await;
}

/// A published nudge wakes a subscriber (through another node, for the Cluster).
async fn nudges(backend: Backend, test: &str) {
    let Some((store, prefix)) = backend.store(test).await else {
        return;
    };
    let urls = backend.urls(test).expect("checked by store()");
    let subscribe_url = urls.last().expect("at least one URL").clone();
    let channel = format!("{prefix}:nudge");
    let notify = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (channel, notify, shutdown) = (channel.clone(), notify.clone(), shutdown.clone());
        async move {
            let got = move |m: Option<&str>| {
                // The wake-up after subscribing carries nothing; a message carries its payload.
                if m.is_none() || m == Some("cart/1@7") {
                    notify.notify_one();
                }
            };
            subscribe_nudges(
                &[subscribe_url],
                &Default::default(),
                &channel,
                got,
                shutdown,
            )
            .await
        }
    });
    // The first wake-up is the one after subscribing; from then on only messages wake it.
    tokio::time::timeout(Duration::from_secs(5), notify.notified())
        .await
        .expect("subscribed");
    store.publish_nudge(&channel, "cart/1@7").await;
    tokio::time::timeout(Duration::from_secs(5), notify.notified())
        .await
        .expect("nudge received");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops on shutdown")
        .expect("no panic");
}

#[tokio::test]
async fn standalone_nudges() {
    nudges(Backend::Standalone, "standalone_nudges").await;
}

#[tokio::test]
async fn cluster_nudges() {
    nudges(Backend::Cluster, "cluster_nudges").await;
}

fn one_set(first_version: u64, last_version: u64) -> Batch {
    Batch {
        first_version,
        last_version,
        changes: Changes {
            fields: vec![FieldOp::Set("n".into(), last_version.to_string())],
        },
    }
}

/// Waits (bounded, generously) until `store`'s apply feed is subscribed.
async fn until_live(store: &RedisStore) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.applied_feed().is_live() {
        assert!(Instant::now() < deadline, "apply feed not live within 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `watch` has been woken already (without waiting).
async fn woken(watch: &esq_readstore::notify::Watch) -> bool {
    tokio::time::timeout(Duration::ZERO, watch.woken())
        .await
        .is_ok()
}

/// The apply script publishes what it applied; the feed wakes exactly the waiters whose
/// version is reached (not earlier), and only once subscribed.
async fn applies_wake_waiters(backend: Backend, test: &str) {
    let Some((store, _)) = backend.store(test).await else {
        return;
    };
    assert!(
        store.watch("cart", "a", 1).is_none(),
        "no subscription yet: waiters poll"
    );
    let shutdown = CancellationToken::new();
    let follower = tokio::spawn(store.clone().follow_applies(shutdown.clone()));
    until_live(&store).await;
    let at1 = store.watch("cart", "a", 1).expect("live feed");
    let at2 = store.watch("cart", "a", 2).expect("live feed");
    let other = store.watch("cart", "b", 1).expect("live feed");
    assert_eq!(store.applied_feed().waiting(), 3);
    assert_eq!(
        store.apply("cart", "a", &one_set(1, 1)).await.unwrap(),
        ApplyOutcome::Applied
    );
    tokio::time::timeout(Duration::from_secs(20), at1.woken())
        .await
        .expect("the waiter at version 1 is woken by the apply of version 1");
    // Messages of one document arrive in order: version 1 was handled, and did not reach 2.
    assert!(!woken(&at2).await, "version 1 does not wake a waiter at 2");
    assert!(!woken(&other).await, "another document's waiter sleeps on");
    assert_eq!(store.version("cart", "a").await.unwrap(), 1);
    // A duplicate apply publishes nothing and changes nothing.
    assert_eq!(
        store.apply("cart", "a", &one_set(1, 1)).await.unwrap(),
        ApplyOutcome::Duplicate
    );
    store.apply("cart", "a", &one_set(2, 2)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), at2.woken())
        .await
        .expect("the waiter at version 2 is woken by the apply of version 2");
    assert_eq!(store.version("cart", "a").await.unwrap(), 2);
    drop((at1, at2));
    assert_eq!(store.applied_feed().waiting(), 1, "woken waiters are freed");
    drop(other);
    assert_eq!(
        store.applied_feed().waiting(),
        0,
        "a dropped (cancelled) waiter is freed"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), follower)
        .await
        .expect("stops on shutdown")
        .expect("no panic");
    assert!(
        !store.applied_feed().is_live(),
        "stopped: waiters poll again"
    );
}

#[tokio::test]
async fn standalone_applies_wake_waiters() {
    applies_wake_waiters(Backend::Standalone, "standalone_applies_wake_waiters").await;
}

#[tokio::test]
async fn cluster_applies_wake_waiters() {
    applies_wake_waiters(Backend::Cluster, "cluster_applies_wake_waiters").await;
}

/// A TCP proxy to `upstream` whose connections can all be cut; new ones go through.
async fn cuttable_proxy(upstream: String) -> (String, Arc<std::sync::Mutex<CancellationToken>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
    let c = Arc::clone(&cut);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let token = c.lock().unwrap().clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    () = token.cancelled() => {}
                }
            });
        }
    });
    (format!("redis://{addr}"), cut)
}

/// A lost subscription (its connection cut) loses the messages published meanwhile; once
/// resubscribed, every waiter is woken to read again, so none is stranded until its deadline.
#[tokio::test]
async fn a_lost_subscription_wakes_every_waiter_when_back() {
    let test = "a_lost_subscription_wakes_every_waiter_when_back";
    let Some(urls) = Backend::Standalone.urls(test) else {
        return;
    };
    let upstream = urls[0]
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let (proxied, cut) = cuttable_proxy(upstream).await;
    let prefix = unique(test);
    let config = |url: String| RedisConfig {
        urls: vec![url],
        cluster: false,
        prefix: prefix.clone(),
        timeout: Duration::from_secs(5),
        access: Default::default(),
    };
    // Waits go through the proxy; applies reach Redis directly.
    let waiting = RedisStore::connect(config(proxied)).await.unwrap();
    let writer = RedisStore::connect(config(urls[0].clone())).await.unwrap();
    let shutdown = CancellationToken::new();
    let follower = tokio::spawn(waiting.clone().follow_applies(shutdown.clone()));
    until_live(&waiting).await;
    let watch = waiting.watch("cart", "a", 1).expect("live feed");
    {
        let mut token = cut.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting.applied_feed().is_live() {
        assert!(Instant::now() < deadline, "the cut is not noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Published while nobody of ours listens: this message is lost.
    writer.apply("cart", "a", &one_set(1, 1)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), watch.woken())
        .await
        .expect("the waiter is woken once the subscription is back");
    assert!(waiting.applied_feed().is_live());
    assert_eq!(writer.version("cart", "a").await.unwrap(), 1);
    drop(watch);
    assert_eq!(waiting.applied_feed().waiting(), 0);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), follower).await;
}

/// Scripts are loaded at connect; a server that forgot them (restart, `SCRIPT FLUSH`) gets them
/// again on the first `NOSCRIPT`.
#[tokio::test]
async fn standalone_reloads_flushed_scripts() {
    let test = "standalone_reloads_flushed_scripts";
    let Some((store, _)) = Backend::Standalone.store(test).await else {
        return;
    };
    let batch = |v| contract::fields(v, v, vec![FieldOp::Incr("n".to_owned(), 1)]);
    assert_eq!(
        store.apply("p", "d", &batch(1)).await.unwrap(),
        ApplyOutcome::Applied
    );
    let url = &Backend::Standalone.urls(test).expect("set")[0];
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .exec_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        store.apply("p", "d", &batch(2)).await.unwrap(),
        ApplyOutcome::Applied
    );
    assert!(store
        .acquire_lease("l", "me", Duration::from_secs(5))
        .await
        .unwrap());
    assert_eq!(store.version("p", "d").await.unwrap(), 2);
}

/// A server that accepts connections and never answers: connecting or calling fails with
/// `Unavailable` within about the configured timeout instead of hanging. Needs no Redis.
#[tokio::test]
async fn silent_server_is_unavailable_promptly() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let result = RedisStore::connect(RedisConfig {
        urls: vec![url],
        cluster: false,
        prefix: "esqtest-silent".to_owned(),
        timeout,
        access: Default::default(),
    })
    .await;
    let error = match result {
        Err(e) => e,
        Ok(store) => store.get("p", "d").await.expect_err("no answer"),
    };
    assert!(matches!(error, ReadError::Unavailable(_)), "{error:?}");
    assert!(started.elapsed() < timeout * 4, "{:?}", started.elapsed());
    hold.abort();
}

/// Nothing listening: `Unavailable`, promptly. Needs no Redis.
#[tokio::test]
async fn refused_connection_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let result = RedisStore::connect(RedisConfig {
        urls: vec![format!("redis://127.0.0.1:{port}")],
        cluster: false,
        prefix: "esqtest-refused".to_owned(),
        timeout: Duration::from_millis(500),
        access: Default::default(),
    })
    .await;
    assert!(
        matches!(result, Err(ReadError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

fn field_op() -> impl Strategy<Value = FieldOp> {
    let field = prop::sample::select(vec!["a", "b", "n", "_v", "_deleted"]);
    let value = prop::sample::select(vec![
        "",
        "x",
        "0",
        "7",
        "-3",
        "+5",
        "007",
        "-0",
        "12 ",
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999",
    ]);
    let delta = prop_oneof![-5i64..5, Just(i64::MAX), Just(i64::MIN), Just(i64::MAX - 1),];
    prop_oneof![
        4 => (field.clone(), value).prop_map(|(f, v)| FieldOp::Set(f.to_owned(), v.to_owned())),
        2 => field.clone().prop_map(|f| FieldOp::Del(f.to_owned())),
        4 => (field.clone(), delta.clone()).prop_map(|(f, d)| FieldOp::Incr(f.to_owned(), d)),
        3 => (field, delta).prop_map(|(f, d)| FieldOp::Adjust(f.to_owned(), d)),
        1 => Just(FieldOp::Tombstone),
    ]
}

/// Mostly in-order batches, with duplicates, overlaps and gaps mixed in.
fn batches() -> impl Strategy<Value = Vec<Batch>> {
    let batch = (0u64..8, 0u64..3, prop::collection::vec(field_op(), 0..6));
    prop::collection::vec(batch, 1..12).prop_map(|raw| {
        let mut next = 1;
        raw.into_iter()
            .map(|(jump, extra, fields)| {
                // jump 0..=3: in order; otherwise somewhere around it.
                let first = if jump <= 3 {
                    next
                } else {
                    (next + jump).saturating_sub(6)
                };
                let last = first + extra;
                if first == next {
                    next = last + 1;
                }
                Batch {
                    first_version: first,
                    last_version: last,
                    changes: Changes { fields },
                }
            })
            .collect()
    })
}

/// Random batch sequences give exactly what `apply_to_doc` gives on a `HashMap`.
fn matches_reference(backend: Backend, test: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some((store, _)) = runtime.block_on(backend.store(test)) else {
        return;
    };
    let case = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&batches(), |batches| {
            let doc_id = format!("case-{}", case.fetch_add(1, Ordering::Relaxed));
            runtime.block_on(async {
                let mut model = Doc::new();
                for batch in &batches {
                    let expected = apply_to_doc(&mut model, batch);
                    let outcome = store
                        .apply("prop", &doc_id, batch)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(outcome, expected, "outcome of {:?}", batch);
                    let stored = store
                        .get("prop", &doc_id)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let expected_doc = (!model.is_empty()).then(|| model.clone());
                    prop_assert_eq!(stored, expected_doc, "document after {:?}", batch);
                    if let ApplyOutcome::Stale { current } = outcome {
                        prop_assert_eq!(current, esq_domain::projection::doc_version(&model));
                    }
                }
                Ok(())
            })
        })
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

#[test]
fn standalone_matches_reference() {
    matches_reference(Backend::Standalone, "standalone_matches_reference");
}

#[test]
fn cluster_matches_reference() {
    matches_reference(Backend::Cluster, "cluster_matches_reference");
}

/// One truth: for any events in a cart stream, the cart read model that the fenced Lua apply
/// builds (in any batching) is the aggregate's own state, folded from the same events.
async fn carts_agree<S: ReadStore>(
    store: &S,
    projection_name: &str,
    case: &str,
    events: Vec<esq_domain::NewEvent>,
    cuts: Vec<prop::sample::Index>,
) -> Result<(), TestCaseError> {
    use esq_domain::aggregate::load;
    use esq_domain::cart::{Cart, CartEvent, CartProjection, CartView};
    use esq_domain::projection::batch;
    let stream = esq_domain::StreamId::new("cart", case).unwrap();
    let mut recorded: Vec<esq_domain::RecordedEvent> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| esq_domain::RecordedEvent {
            stream: stream.clone(),
            version: i as u64 + 1,
            event_id: e.event_id,
            event_type: e.event_type,
            schema_version: e.schema_version,
            content_type: e.content_type,
            data: e.data,
            metadata: e.metadata,
            recorded_at_us: 1_700_000_000_000_000 + i as i64,
        })
        .collect();
    // An event the cart projection cannot read stops every fold (the domain's tests cover
    // that): compare over the readable ones, numbered again.
    recorded.retain(|e| esq_domain::aggregate::decode::<CartEvent>(e).is_some());
    for (i, e) in recorded.iter_mut().enumerate() {
        e.version = i as u64 + 1;
    }
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(recorded.len() + 1)).collect();
    bounds.extend([0, recorded.len()]);
    bounds.sort_unstable();
    bounds.dedup();
    for w in bounds.windows(2) {
        let b = batch(&CartProjection, &recorded[w[0]..w[1]])
            .unwrap()
            .unwrap();
        let outcome = store
            .apply(projection_name, case, &b)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(outcome, ApplyOutcome::Applied);
    }
    let doc = store
        .get(projection_name, case)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .unwrap_or_default();
    let aggregate: Cart = load(&recorded).unwrap();
    prop_assert_eq!(&Cart::from_doc(&doc), &aggregate);
    let view = CartView::from_doc(&doc);
    prop_assert_eq!(view.total_cents, aggregate.total_cents());
    prop_assert_eq!(view.item_count, aggregate.item_count());
    prop_assert_eq!(view.version, recorded.len() as u64);
    Ok(())
}

fn carts_agree_on<S: ReadStore>(runtime: &tokio::runtime::Runtime, store: &S, test: &str) {
    let case = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let cases = (
        prop::collection::vec(esq_domain::arbitrary::raw_cart_event(), 1..30),
        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    );
    runner
        .run(&cases, |(events, cuts)| {
            let id = format!("{test}-{}", case.fetch_add(1, Ordering::Relaxed));
            runtime.block_on(carts_agree(store, "cart", &id, events, cuts))
        })
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

fn carts_agree_with_the_aggregate(backend: Backend, test: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some((store, _)) = runtime.block_on(backend.store(test)) else {
        return;
    };
    carts_agree_on(&runtime, &store, test);
}

#[test]
fn standalone_carts_agree_with_the_aggregate() {
    carts_agree_with_the_aggregate(
        Backend::Standalone,
        "standalone_carts_agree_with_the_aggregate",
    );
}

#[test]
fn cluster_carts_agree_with_the_aggregate() {
    carts_agree_with_the_aggregate(Backend::Cluster, "cluster_carts_agree_with_the_aggregate");
}

#[test]
fn memory_carts_agree_with_the_aggregate() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = esq_readstore::memory::MemoryStore::new();
    carts_agree_on(&runtime, &store, "memory_carts_agree_with_the_aggregate");
}

fn contribution() -> impl Strategy<Value = esq_domain::derived::Contribution> {
    use esq_domain::derived::{Contribution, MAX_VALUE};
    let source = prop::sample::select(vec!["a", "b", "c", "d"]);
    let value = prop_oneof![
        4 => -20i64..20,
        1 => Just(MAX_VALUE),
        1 => Just(-MAX_VALUE),
        1 => Just(0i64),
    ];
    let values = prop::option::weighted(0.75, prop::collection::vec(value, 3));
    (source, 1u64..10, values).prop_map(|(source, version, values)| Contribution {
        source: source.to_owned(),
        version,
        values,
    })
}

/// Random contribution sequences (out of order, duplicated, tombstones, extreme values) leave
/// exactly the totals `apply_contribution` computes on maps, applied or refused alike.
async fn contributions_match<S: ReadStore>(
    store: &S,
    target: &str,
    steps: &[esq_domain::derived::Contribution],
) -> Result<(), TestCaseError> {
    use esq_domain::derived::apply_contribution;
    let columns = contract::CONTRACT_COLUMNS;
    let (mut totals, mut entries) = (Doc::new(), Doc::new());
    for step in steps {
        let expected = apply_contribution(&mut totals, &mut entries, columns, step);
        let applied = store
            .contribute("derivedprop", target, columns, step)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(applied, expected, "applied {:?}", step);
        let stored = store
            .get("derivedprop", target)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let expected_doc = (!totals.is_empty()).then(|| totals.clone());
        prop_assert_eq!(stored, expected_doc, "totals after {:?}", step);
    }
    Ok(())
}

fn contributions_match_on<S: ReadStore>(runtime: &tokio::runtime::Runtime, store: &S, test: &str) {
    let case = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(contribution(), 1..25), |steps| {
            let target = format!("t-{}", case.fetch_add(1, Ordering::Relaxed));
            runtime.block_on(contributions_match(store, &target, &steps))
        })
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

#[test]
fn memory_contributions_match_reference() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = esq_readstore::memory::MemoryStore::new();
    contributions_match_on(&runtime, &store, "memory_contributions_match_reference");
}

fn contributions_match_reference(backend: Backend, test: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some((store, _)) = runtime.block_on(backend.store(test)) else {
        return;
    };
    contributions_match_on(&runtime, &store, test);
}

#[test]
fn standalone_contributions_match_reference() {
    contributions_match_reference(
        Backend::Standalone,
        "standalone_contributions_match_reference",
    );
}

#[test]
fn cluster_contributions_match_reference() {
    contributions_match_reference(Backend::Cluster, "cluster_contributions_match_reference");
}
