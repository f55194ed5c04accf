//! read-svc's `min_version` waits on every read store (memory, Redis, Redis Cluster): woken
//! by apply notifications at the right version, not before; a lost notification costs at most
//! the safety re-check; the store traffic of 500 waiters is bounded (counted by a wrapper
//! around the store: every call is one round trip or more). Real Redis from `ESQ_TEST_REDIS` /
//! `ESQ_TEST_REDIS_CLUSTER`; a missing variable fails the test unless
//! `ESQ_SKIP_REAL_BACKENDS=1`, which skips it and says so.

#![allow(clippy::unwrap_used)]

use esq::pb::cart::v1::cart_queries_client::CartQueriesClient;
use esq::pb::cart::v1::GetCartRequest;
use esq_domain::derived::{Column, Contribution};
use esq_domain::projection::{ApplyOutcome, Batch, Changes, FieldOp};
use esq_readstore::memory::MemoryStore;
use esq_readstore::notify::{AppliedFeed, Watch};
use esq_readstore::redis::{RedisConfig, RedisStore};
use esq_readstore::{Doc, ReadError, ReadStore};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A read store that counts the calls made to it.
struct Counting<S> {
    inner: S,
    calls: AtomicU64,
}

impl<S> Counting<S> {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

impl<S: ReadStore> ReadStore for Counting<S> {
    async fn apply(
        &self,
        projection: &str,
        doc_id: &str,
        batch: &Batch,
    ) -> Result<ApplyOutcome, ReadError> {
        self.count();
        self.inner.apply(projection, doc_id, batch).await
    }

    async fn get(&self, projection: &str, doc_id: &str) -> Result<Option<Doc>, ReadError> {
        self.count();
        self.inner.get(projection, doc_id).await
    }

    async fn update_indexes(
        &self,
        projection: &str,
        doc_id: &str,
        add: &[String],
        remove: &[String],
        marker: &str,
    ) -> Result<(), ReadError> {
        self.count();
        self.inner
            .update_indexes(projection, doc_id, add, remove, marker)
            .await
    }

    async fn index_page(
        &self,
        projection: &str,
        index: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ReadError> {
        self.count();
        self.inner.index_page(projection, index, after, limit).await
    }

    async fn contribute(
        &self,
        namespace: &str,
        target: &str,
        columns: &[Column],
        c: &Contribution,
    ) -> Result<bool, ReadError> {
        self.count();
        self.inner.contribute(namespace, target, columns, c).await
    }

    async fn clear_field_if(
        &self,
        namespace: &str,
        doc_id: &str,
        field: &str,
        value: &str,
    ) -> Result<(), ReadError> {
        self.count();
        self.inner
            .clear_field_if(namespace, doc_id, field, value)
            .await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, ReadError> {
        self.count();
        self.inner.checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: &str) -> Result<(), ReadError> {
        self.count();
        self.inner.save_checkpoint(name, position).await
    }

    async fn ping(&self) -> Result<(), ReadError> {
        self.count();
        self.inner.ping().await
    }

    async fn generations(&self, projection: &str) -> Result<Option<String>, ReadError> {
        self.count();
        self.inner.generations(projection).await
    }

    async fn swap_generations(
        &self,
        projection: &str,
        expected: Option<&str>,
        new: &str,
    ) -> Result<bool, ReadError> {
        self.count();
        self.inner.swap_generations(projection, expected, new).await
    }

    async fn delete_namespace(&self, namespace: &str) -> Result<u64, ReadError> {
        self.count();
        self.inner.delete_namespace(namespace).await
    }

    async fn delete_doc(&self, namespace: &str, doc_id: &str) -> Result<(), ReadError> {
        self.count();
        self.inner.delete_doc(namespace, doc_id).await
    }

    async fn index_contains(
        &self,
        namespace: &str,
        index: &str,
        doc_id: &str,
    ) -> Result<bool, ReadError> {
        self.count();
        self.inner.index_contains(namespace, index, doc_id).await
    }

    async fn doc_ids_page(
        &self,
        namespace: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), ReadError> {
        self.count();
        self.inner.doc_ids_page(namespace, cursor, limit).await
    }

    async fn put_record(&self, set: &str, key: &str, record: &str) -> Result<(), ReadError> {
        self.count();
        self.inner.put_record(set, key, record).await
    }

    async fn get_record(&self, set: &str, key: &str) -> Result<Option<String>, ReadError> {
        self.count();
        self.inner.get_record(set, key).await
    }

    async fn delete_record(&self, set: &str, key: &str) -> Result<bool, ReadError> {
        self.count();
        self.inner.delete_record(set, key).await
    }

    async fn records_page(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, ReadError> {
        self.count();
        self.inner.records_page(set, after, limit).await
    }

    async fn record_count(&self, set: &str) -> Result<u64, ReadError> {
        self.count();
        self.inner.record_count(set).await
    }

    async fn version(&self, projection: &str, doc_id: &str) -> Result<u64, ReadError> {
        self.count();
        self.inner.version(projection, doc_id).await
    }

    fn watch(&self, namespace: &str, doc_id: &str, min_version: u64) -> Option<Watch> {
        self.inner.watch(namespace, doc_id, min_version)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Standalone,
    Cluster,
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

/// The Redis URLs of `backend` from the environment, `None` when the run opted out.
fn urls(backend: Backend, test: &str) -> Option<Vec<String>> {
    let var = match backend {
        Backend::Memory => return Some(Vec::new()),
        Backend::Standalone => "ESQ_TEST_REDIS",
        Backend::Cluster => "ESQ_TEST_REDIS_CLUSTER",
    };
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v.split(',').map(|u| u.trim().to_owned()).collect()),
        _ if std::env::var("ESQ_SKIP_REAL_BACKENDS").as_deref() == Ok("1") => {
            eprintln!("{test}: SKIPPED by request (ESQ_SKIP_REAL_BACKENDS=1)");
            None
        }
        _ => panic!(
            "{test} needs a real Redis: set {var} (scripts/redis.sh start / start-cluster), or \
             ESQ_SKIP_REAL_BACKENDS=1 to skip"
        ),
    }
}

/// A read store of either kind, so one test body serves all backends.
#[derive(Clone)]
enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// read-svc serving a counted store, and a client.
struct Stack {
    store: Arc<Counting<AnyStore>>,
    feed: Arc<AppliedFeed>,
    /// Several connections: a connection carries at most 100 concurrent calls.
    clients: Vec<CartQueriesClient<tonic::transport::Channel>>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    redis: Option<(Vec<String>, String)>,
    next: AtomicU64,
}

impl Stack {
    async fn start(backend: Backend, test: &str, recheck: Duration) -> Option<Self> {
        let urls = urls(backend, test)?;
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let (inner, feed, redis) = match backend {
            Backend::Memory => {
                let store = MemoryStore::new();
                let feed = Arc::clone(store.applied_feed());
                (AnyStore::Memory(store), feed, None)
            }
            Backend::Standalone | Backend::Cluster => {
                let prefix = unique(test);
                let store = RedisStore::connect(RedisConfig {
                    urls: urls.clone(),
                    cluster: backend == Backend::Cluster,
                    prefix: prefix.clone(),
                    timeout: Duration::from_secs(5),
                    access: Default::default(),
                })
                .await
                .unwrap_or_else(|e| panic!("{test}: cannot connect to Redis: {e}"));
                tasks.push(tokio::spawn(store.clone().follow_applies(shutdown.clone())));
                let feed = Arc::clone(store.applied_feed());
                let deadline = Instant::now() + Duration::from_secs(20);
                while !feed.is_live() {
                    assert!(Instant::now() < deadline, "apply feed not live within 20 s");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (AnyStore::Redis(store), feed, Some((urls, prefix)))
            }
        };
        let store = Arc::new(Counting {
            inner,
            calls: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = esq_read_svc::Config {
            max_wait: Duration::from_secs(60),
            wait_recheck: recheck,
            shutdown_grace: Duration::from_secs(2),
            ..esq_read_svc::Config::default()
        };
        let deps = esq_read_svc::Deps {
            read: Arc::clone(&store),
            history: None::<Arc<esq_eventstore::embedded::EmbeddedStore>>,
        };
        let served = esq_read_svc::run(listener, deps, config, shutdown.clone());
        tasks.push(tokio::spawn(async move {
            served.await.expect("read-svc serves");
        }));
        let mut clients = Vec::new();
        for _ in 0..8 {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            clients.push(CartQueriesClient::new(channel));
        }
        Some(Self {
            store,
            feed,
            clients,
            next: AtomicU64::new(0),
            shutdown,
            tasks,
            redis,
        })
    }

    /// Applies version `version` (one `Set` of `item:x` to `version`) to cart `id`.
    async fn apply(&self, id: &str, version: u64) {
        let batch = Batch {
            first_version: version,
            last_version: version,
            changes: Changes {
                fields: vec![FieldOp::Set("item:x".into(), version.to_string())],
            },
        };
        let outcome = self.store.inner.apply(CART, id, &batch).await.unwrap();
        assert_eq!(outcome, ApplyOutcome::Applied);
    }

    /// A GetCart of `id` at `min_version`, with a client deadline of `timeout`.
    fn get(
        &self,
        id: &str,
        min_version: u64,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<Result<esq::pb::cart::v1::Cart, tonic::Status>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let mut client = self.clients[n % self.clients.len()].clone();
        let mut request = tonic::Request::new(GetCartRequest {
            cart_id: id.to_owned(),
            min_version,
        });
        request.set_timeout(timeout);
        tokio::spawn(async move { client.get_cart(request).await.map(|r| r.into_inner()) })
    }

    /// Waits (bounded, generously) until the feed holds `n` waiters.
    async fn until_waiting(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.feed.waiting() != n {
            assert!(
                Instant::now() < deadline,
                "{} waiters registered, want {n}",
                self.feed.waiting()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("stops on shutdown")
                .expect("no panic");
        }
    }
}

/// The projection GetCart reads (no generation record in these tests: its bare namespace).
const CART: &str = "cart2";

impl ReadStore for AnyStore {
    async fn apply(
        &self,
        projection: &str,
        doc_id: &str,
        batch: &Batch,
    ) -> Result<ApplyOutcome, ReadError> {
        match self {
            AnyStore::Memory(s) => s.apply(projection, doc_id, batch).await,
            AnyStore::Redis(s) => s.apply(projection, doc_id, batch).await,
        }
    }

    async fn get(&self, projection: &str, doc_id: &str) -> Result<Option<Doc>, ReadError> {
        match self {
            AnyStore::Memory(s) => s.get(projection, doc_id).await,
            AnyStore::Redis(s) => s.get(projection, doc_id).await,
        }
    }

    async fn update_indexes(
        &self,
        projection: &str,
        doc_id: &str,
        add: &[String],
        remove: &[String],
        marker: &str,
    ) -> Result<(), ReadError> {
        match self {
            AnyStore::Memory(s) => {
                s.update_indexes(projection, doc_id, add, remove, marker)
                    .await
            }
            AnyStore::Redis(s) => {
                s.update_indexes(projection, doc_id, add, remove, marker)
                    .await
            }
        }
    }

    async fn index_page(
        &self,
        projection: &str,
        index: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ReadError> {
        match self {
            AnyStore::Memory(s) => s.index_page(projection, index, after, limit).await,
            AnyStore::Redis(s) => s.index_page(projection, index, after, limit).await,
        }
    }

    async fn contribute(
        &self,
        namespace: &str,
        target: &str,
        columns: &[Column],
        c: &Contribution,
    ) -> Result<bool, ReadError> {
        match self {
            AnyStore::Memory(s) => s.contribute(namespace, target, columns, c).await,
            AnyStore::Redis(s) => s.contribute(namespace, target, columns, c).await,
        }
    }

    async fn clear_field_if(
        &self,
        namespace: &str,
        doc_id: &str,
        field: &str,
        value: &str,
    ) -> Result<(), ReadError> {
        match self {
            AnyStore::Memory(s) => s.clear_field_if(namespace, doc_id, field, value).await,
            AnyStore::Redis(s) => s.clear_field_if(namespace, doc_id, field, value).await,
        }
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, ReadError> {
        match self {
            AnyStore::Memory(s) => s.checkpoint(name).await,
            AnyStore::Redis(s) => s.checkpoint(name).await,
        }
    }

    async fn save_checkpoint(&self, name: &str, position: &str) -> Result<(), ReadError> {
        match self {
            AnyStore::Memory(s) => s.save_checkpoint(name, position).await,
            AnyStore::Redis(s) => s.save_checkpoint(name, position).await,
        }
    }

    async fn ping(&self) -> Result<(), ReadError> {
        match self {
            AnyStore::Memory(s) => s.ping().await,
            AnyStore::Redis(s) => s.ping().await,
        }
    }

    async fn generations(&self, projection: &str) -> Result<Option<String>, ReadError> {
        match self {
            AnyStore::Memory(s) => s.generations(projection).await,
            AnyStore::Redis(s) => s.generations(projection).await,
        }
    }

    async fn swap_generations(
        &self,
        projection: &str,
        expected: Option<&str>,
        new: &str,
    ) -> Result<bool, ReadError> {
        match self {
            AnyStore::Memory(s) => s.swap_generations(projection, expected, new).await,
            AnyStore::Redis(s) => s.swap_generations(projection, expected, new).await,
        }
    }

    async fn delete_namespace(&self, namespace: &str) -> Result<u64, ReadError> {
        match self {
            AnyStore::Memory(s) => s.delete_namespace(namespace).await,
            AnyStore::Redis(s) => s.delete_namespace(namespace).await,
        }
    }

    async fn delete_doc(&self, namespace: &str, doc_id: &str) -> Result<(), ReadError> {
        match self {
            AnyStore::Memory(s) => s.delete_doc(namespace, doc_id).await,
            AnyStore::Redis(s) => s.delete_doc(namespace, doc_id).await,
        }
    }

    async fn index_contains(
        &self,
        namespace: &str,
        index: &str,
        doc_id: &str,
    ) -> Result<bool, ReadError> {
        match self {
            AnyStore::Memory(s) => s.index_contains(namespace, index, doc_id).await,
            AnyStore::Redis(s) => s.index_contains(namespace, index, doc_id).await,
        }
    }

    async fn doc_ids_page(
        &self,
        namespace: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), ReadError> {
        match self {
            AnyStore::Memory(s) => s.doc_ids_page(namespace, cursor, limit).await,
            AnyStore::Redis(s) => s.doc_ids_page(namespace, cursor, limit).await,
        }
    }

    async fn put_record(&self, set: &str, key: &str, record: &str) -> Result<(), ReadError> {
        match self {
            AnyStore::Memory(s) => s.put_record(set, key, record).await,
            AnyStore::Redis(s) => s.put_record(set, key, record).await,
        }
    }

    async fn get_record(&self, set: &str, key: &str) -> Result<Option<String>, ReadError> {
        match self {
            AnyStore::Memory(s) => s.get_record(set, key).await,
            AnyStore::Redis(s) => s.get_record(set, key).await,
        }
    }

    async fn delete_record(&self, set: &str, key: &str) -> Result<bool, ReadError> {
        match self {
            AnyStore::Memory(s) => s.delete_record(set, key).await,
            AnyStore::Redis(s) => s.delete_record(set, key).await,
        }
    }

    async fn records_page(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, ReadError> {
        match self {
            AnyStore::Memory(s) => s.records_page(set, after, limit).await,
            AnyStore::Redis(s) => s.records_page(set, after, limit).await,
        }
    }

    async fn record_count(&self, set: &str) -> Result<u64, ReadError> {
        match self {
            AnyStore::Memory(s) => s.record_count(set).await,
            AnyStore::Redis(s) => s.record_count(set).await,
        }
    }

    async fn version(&self, projection: &str, doc_id: &str) -> Result<u64, ReadError> {
        match self {
            AnyStore::Memory(s) => s.version(projection, doc_id).await,
            AnyStore::Redis(s) => s.version(projection, doc_id).await,
        }
    }

    fn watch(&self, namespace: &str, doc_id: &str, min_version: u64) -> Option<Watch> {
        match self {
            AnyStore::Memory(s) => s.watch(namespace, doc_id, min_version),
            AnyStore::Redis(s) => s.watch(namespace, doc_id, min_version),
        }
    }
}

/// 500 concurrent `min_version` waiters: while they wait, the store sees about one read per
/// waiter per safety re-check (polling made one every 1–20 ms); an apply below their version
/// wakes none of them, the apply of their version answers every one with that version.
async fn many_waiters(backend: Backend, test: &str) {
    const WAITERS: usize = 500;
    let recheck = Duration::from_secs(1);
    let Some(stack) = Stack::start(backend, test, recheck).await else {
        return;
    };
    let ids: Vec<String> = (0..WAITERS).map(|i| format!("w{i}")).collect();
    let calls: Vec<_> = ids
        .iter()
        .map(|id| stack.get(id, 2, Duration::from_secs(120)))
        .collect();
    stack.until_waiting(WAITERS).await;

    // The idle cost: a window of at least two re-check periods.
    let before = stack.store.calls.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(2 * recheck).await;
    let calls_made = stack.store.calls.load(Ordering::Relaxed) - before;
    let window = started.elapsed();
    let per_second = calls_made as f64 / window.as_secs_f64();
    eprintln!(
        "{test}: {WAITERS} waiters made {calls_made} read-store calls in {window:?} \
         ({per_second:.0}/s)"
    );
    // Each waiter reads its document (and at most once resolves its generation) per re-check;
    // a generous bound, far below polling's one read per waiter every 1-20 ms.
    let periods = window.as_secs_f64() / recheck.as_secs_f64() + 1.0;
    let bound = (2.0 * WAITERS as f64 * periods) as u64;
    assert!(
        calls_made <= bound,
        "{calls_made} read-store calls in {window:?} by {WAITERS} idle waiters, at most {bound} \
         expected"
    );

    // Version 1 is below every waiter's version: none answers.
    for id in &ids {
        stack.apply(id, 1).await;
    }
    if backend != Backend::Cluster {
        // Notifications of one server arrive in order (not so across Cluster nodes): once a
        // later apply's waiter answered, every version-1 notification has been handled.
        let sentinel = stack.get("sentinel", 1, Duration::from_secs(120));
        stack.apply("sentinel", 1).await;
        let cart = sentinel.await.unwrap().expect("sentinel answers");
        assert_eq!(cart.version, 1);
        let early = calls.iter().filter(|c| c.is_finished()).count();
        assert_eq!(
            early, 0,
            "{early} waiters at version 2 answered at version 1"
        );
    }
    for id in &ids {
        stack.apply(id, 2).await;
    }
    for (id, call) in ids.iter().zip(calls) {
        let cart = call.await.unwrap().unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(cart.version, 2, "{id}");
        assert_eq!(cart.items.len(), 1, "{id}");
        assert_eq!(cart.items[0].quantity, 2, "{id}: the document at version 2");
    }
    stack.until_waiting(0).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_many_waiters() {
    many_waiters(Backend::Memory, "memory_many_waiters").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_many_waiters() {
    many_waiters(Backend::Standalone, "standalone_many_waiters").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_many_waiters() {
    many_waiters(Backend::Cluster, "cluster_many_waiters").await;
}

/// A waiter whose call ends without its version — past its deadline, or cancelled by the
/// client — is freed at once.
async fn ended_waiters_are_freed(backend: Backend, test: &str) {
    let Some(stack) = Stack::start(backend, test, Duration::from_secs(1)).await else {
        return;
    };
    let expired = stack.get("never", 1, Duration::from_millis(500));
    let status = expired.await.unwrap().expect_err("deadline");
    // Our answer comes a little before the client's deadline; on a busy machine the client's
    // own timer may fire first.
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    stack.until_waiting(0).await;
    let cancelled = stack.get("never", 1, Duration::from_secs(120));
    stack.until_waiting(1).await;
    cancelled.abort();
    stack.until_waiting(0).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_ended_waiters_are_freed() {
    ended_waiters_are_freed(Backend::Memory, "memory_ended_waiters_are_freed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_ended_waiters_are_freed() {
    ended_waiters_are_freed(Backend::Standalone, "standalone_ended_waiters_are_freed").await;
}

/// A document that reaches the version without a notification (written behind the apply
/// script's back, as if the message were lost) is found by the safety re-check, long before
/// the call's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_is_caught_by_the_recheck() {
    let test = "a_lost_notification_is_caught_by_the_recheck";
    let Some(stack) = Stack::start(Backend::Standalone, test, Duration::from_millis(200)).await
    else {
        return;
    };
    let call = stack.get("quiet", 1, Duration::from_secs(60));
    stack.until_waiting(1).await;
    let (urls, prefix) = stack.redis.clone().expect("a Redis stack");
    let client = redis::Client::open(urls[0].as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}:{CART}:{{quiet}}"))
        .arg("_v")
        .arg(1)
        .arg("item:x")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Without the re-check this would wait for its 60 s deadline and fail.
    let cart = tokio::time::timeout(Duration::from_secs(50), call)
        .await
        .expect("answered before its deadline")
        .unwrap()
        .expect("answered");
    assert_eq!(cart.version, 1);
    stack.stop().await;
}
