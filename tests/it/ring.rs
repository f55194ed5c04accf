//! Node loss on a 3-node Cassandra ring (RF = 3, LOCAL_QUORUM / LOCAL_SERIAL): write-svc,
//! projector and read-svc as processes on every node of the ring started by `scripts/cassandra.sh
//! ring-start` (`ESQ_TEST_CASSANDRA_RING`, `ESQ_TEST_CASSANDRA_RING_DIR`) and the shared Redis.
//!
//! Node restarts take tens of seconds on the test machine, so the cases run as one scenario
//! that kills and restarts each node at most once: one node SIGKILLed during an 8-writer load,
//! the change log projected while it is down, a second node down, both restarted. A
//! [`esq_testkit::ring::RingGuard`] restarts whatever a failed step left down.

use crate::cluster::assert_read_model_equals_fold;
use crate::suite::{self, any, exact, read_all, stream, unique};
use esq::pb::cart::v1 as cart;
use esq::pb::v1 as pb;
use esq_domain::event::COMMAND_ID_KEY;
use esq_testkit::cluster::{ClusterHarness, ClusterOptions};
use esq_testkit::ring::Ring;
use esq_testkit::Clients;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Code, Request};

/// Shared streams every writer uses (commands on carts, raw appends on streams).
const SHARED: usize = 4;
/// Generous bound for one operation to be acknowledged, retries included.
const OP_BOUND: Duration = Duration::from_secs(120);
/// The deadline of every call: far beyond the append deadline (6 s), so a hang shows as
/// DEADLINE_EXCEEDED instead of an answer.
const CALL_DEADLINE: Duration = Duration::from_secs(20);
/// How long the ring may take to answer again after a restart (155 s seen for two nodes at a
/// load average of 35 on 2 cores).
const RING_BOUND: Duration = Duration::from_secs(600);

fn redis_url(test: &str) -> String {
    std::env::var("ESQ_TEST_REDIS")
        .unwrap_or_else(|_| panic!("{test} needs ESQ_TEST_REDIS (the Redis scripts/test starts)"))
}

async fn harness(ring: &Ring, redis: &str, nudges: bool) -> ClusterHarness {
    let options = ClusterOptions {
        nudges,
        env: ring.cluster_env(),
        // The schema is created on the ring: each statement waits for schema agreement.
        serving_within: RING_BOUND,
        ..ClusterOptions::default()
    };
    ClusterHarness::start(ring.backends(redis), options)
        .await
        .unwrap_or_else(|e| panic!("cannot start the deployment on the ring: {e:#}"))
}

/// What the writers had acknowledged: per stream, the event ids of raw appends, and per cart,
/// the command ids of AddItem commands. Every stream is of type `cart`.
#[derive(Default)]
struct Acked {
    raw: BTreeMap<String, Vec<String>>,
    commands: BTreeMap<String, Vec<String>>,
}

impl Acked {
    fn merge(&mut self, other: Acked) {
        for (k, v) in other.raw {
            self.raw.entry(k).or_default().extend(v);
        }
        for (k, v) in other.commands {
            self.commands.entry(k).or_default().extend(v);
        }
    }

    fn streams(&self) -> Vec<String> {
        self.raw
            .keys()
            .chain(self.commands.keys())
            .cloned()
            .collect()
    }
}

/// Counters of a load, shared with the test body.
#[derive(Default)]
struct Progress {
    acked: AtomicUsize,
    /// Operations sent after [`Progress::faulted`] was set and acknowledged.
    acked_after_fault: AtomicUsize,
    /// UNAVAILABLE answers the writers retried.
    unavailable: AtomicUsize,
    /// ... of which said the outcome was unknown.
    outcome_unknown: AtomicUsize,
    /// Longest time from first send to acknowledgement of an operation, in ms.
    slowest_ms: AtomicUsize,
    faulted: AtomicBool,
    stop: AtomicBool,
}

/// The streams of one load: `SHARED` carts and raw streams every writer uses.
struct Load {
    shared_carts: Vec<String>,
    shared_raw: Vec<String>,
    progress: Arc<Progress>,
}

impl Load {
    fn new(tag: &str) -> Self {
        Self {
            shared_carts: (0..SHARED)
                .map(|_| unique(&format!("{tag}-cart")))
                .collect(),
            shared_raw: (0..SHARED).map(|_| unique(&format!("{tag}-raw"))).collect(),
            progress: Arc::new(Progress::default()),
        }
    }

    /// Starts `writers` concurrent clients; each runs until [`Progress::stop`], cycling
    /// through a command on a shared cart, a raw `Any` append on a shared stream, a command on a
    /// cart of its own and an `Exact` append on a stream of its own (new ones every 5 uses).
    fn start(&self, c: &Clients, writers: usize) -> Vec<tokio::task::JoinHandle<Acked>> {
        (0..writers)
            .map(|w| {
                let c = c.clone();
                let shared_carts = self.shared_carts.clone();
                let shared_raw = self.shared_raw.clone();
                let progress = Arc::clone(&self.progress);
                tokio::spawn(async move { writer(w, c, shared_carts, shared_raw, progress).await })
            })
            .collect()
    }
}

fn item_event(n: usize) -> pb::NewEvent {
    let sku = n % 7;
    let mut e = suite::json_event(
        "ItemAdded",
        &format!(
            r#"{{"sku":"sku-{sku}","quantity":{},"unit_price_cents":{}}}"#,
            n % 3 + 1,
            100 + sku
        ),
    );
    e.schema_version = 2;
    e
}

/// Sends `call` until it is acknowledged: UNAVAILABLE (and ABORTED for commands, a race lost
/// until the deadline) are retried with the very same request — the same command id or event
/// ids — so an outcome the service could not tell is resolved by the retry, and the operation
/// counts only once it answered OK. Anything else, or no OK within [`OP_BOUND`], fails the test.
async fn acknowledged<T, F, Fut>(what: &str, progress: &Progress, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let first = Instant::now();
    let after_fault = progress.faulted.load(Ordering::SeqCst);
    loop {
        match call().await {
            Ok(v) => {
                let ms = first.elapsed().as_millis() as usize;
                progress.slowest_ms.fetch_max(ms, Ordering::Relaxed);
                progress.acked.fetch_add(1, Ordering::Relaxed);
                if after_fault {
                    progress.acked_after_fault.fetch_add(1, Ordering::Relaxed);
                }
                return v;
            }
            Err(s)
                if matches!(s.code(), Code::Unavailable | Code::Aborted)
                    && first.elapsed() < OP_BOUND =>
            {
                if s.code() == Code::Unavailable {
                    progress.unavailable.fetch_add(1, Ordering::Relaxed);
                    if s.message().contains("outcome unknown") {
                        progress.outcome_unknown.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{what}: never acknowledged: {s:?}"),
        }
    }
}

fn with_deadline<T>(message: T) -> Request<T> {
    let mut req = Request::new(message);
    req.set_timeout(CALL_DEADLINE);
    req
}

async fn writer(
    w: usize,
    c: Clients,
    shared_carts: Vec<String>,
    shared_raw: Vec<String>,
    progress: Arc<Progress>,
) -> Acked {
    let mut acked = Acked::default();
    let mut own_cart = unique(&format!("w{w}-cart"));
    let mut own_cart_uses = 0;
    let mut own_raw = unique(&format!("w{w}-raw"));
    let mut own_raw_version = 0u64;
    let mut n = 0usize;
    while !progress.stop.load(Ordering::SeqCst) {
        n += 1;
        match n % 4 {
            0 | 2 => {
                let cart_id = if n % 4 == 0 {
                    shared_carts[(w + n) % SHARED].clone()
                } else {
                    if own_cart_uses == 5 {
                        own_cart = unique(&format!("w{w}-cart"));
                        own_cart_uses = 0;
                    }
                    own_cart_uses += 1;
                    own_cart.clone()
                };
                let sku = n % 7;
                let req = cart::AddItemRequest {
                    command_id: unique("cmd"),
                    ..suite::add(&cart_id, &format!("sku-{sku}"), 1, 100 + sku as i64)
                };
                acknowledged(&format!("AddItem to {cart_id}"), &progress, || {
                    let mut carts = c.carts.clone();
                    let req = with_deadline(req.clone());
                    async move { carts.add_item(req).await }
                })
                .await;
                acked
                    .commands
                    .entry(cart_id)
                    .or_default()
                    .push(req.command_id);
            }
            1 => {
                let id = shared_raw[(w + n) % SHARED].clone();
                let req = pb::AppendRequest {
                    stream: stream("cart", &id),
                    expected_version: any(),
                    events: vec![item_event(n)],
                };
                acknowledged(&format!("Any append to {id}"), &progress, || {
                    let mut events = c.events.clone();
                    let req = with_deadline(req.clone());
                    async move { events.append(req).await }
                })
                .await;
                acked
                    .raw
                    .entry(id)
                    .or_default()
                    .extend(req.events.iter().map(|e| e.event_id.clone()));
            }
            _ => {
                if own_raw_version >= 10 {
                    own_raw = unique(&format!("w{w}-raw"));
                    own_raw_version = 0;
                }
                let req = pb::AppendRequest {
                    stream: stream("cart", &own_raw),
                    expected_version: exact(own_raw_version),
                    events: vec![item_event(n), item_event(n + 1)],
                };
                let r = acknowledged(&format!("Exact append to {own_raw}"), &progress, || {
                    let mut events = c.events.clone();
                    let req = with_deadline(req.clone());
                    async move { events.append(req).await }
                })
                .await
                .into_inner();
                assert_eq!(
                    (r.first_version, r.last_version),
                    (own_raw_version + 1, own_raw_version + 2),
                    "{own_raw}: the Exact append landed where expected"
                );
                own_raw_version = r.last_version;
                acked
                    .raw
                    .entry(own_raw.clone())
                    .or_default()
                    .extend(req.events.iter().map(|e| e.event_id.clone()));
            }
        }
    }
    acked
}

async fn finish(tasks: Vec<tokio::task::JoinHandle<Acked>>, progress: &Progress) -> Acked {
    progress.stop.store(true, Ordering::SeqCst);
    let mut all = Acked::default();
    for t in tasks {
        all.merge(t.await.expect("writer"));
    }
    all
}

/// Waits (up to `within`) until `count` of the load's operations are acknowledged.
async fn wait_acked(progress: &Progress, count: usize, after_fault: bool, within: Duration) {
    let deadline = Instant::now() + within;
    let counter = if after_fault {
        &progress.acked_after_fault
    } else {
        &progress.acked
    };
    while counter.load(Ordering::Relaxed) < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} operations acknowledged within {within:?}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The store holds exactly what was acknowledged: versions 1..n in every stream, every
/// acknowledged event id / command id once, nothing no writer sent; and the read model (cart
/// view and generic state) equals the fold of every stream.
async fn verify(c: &Clients, acked: &Acked) {
    for (id, want) in &acked.raw {
        let stored = read_all(c, "cart", id).await;
        let versions: Vec<u64> = stored.iter().map(|e| e.version).collect();
        let contiguous: Vec<u64> = (1..=stored.len() as u64).collect();
        assert_eq!(versions, contiguous, "{id}: versions 1..n");
        let mut got: Vec<String> = stored.into_iter().map(|e| e.event_id).collect();
        let mut want = want.clone();
        got.sort();
        want.sort();
        assert_eq!(
            got, want,
            "{id}: every acknowledged event once, nothing else"
        );
    }
    for (id, want) in &acked.commands {
        let stored = read_all(c, "cart", id).await;
        let versions: Vec<u64> = stored.iter().map(|e| e.version).collect();
        let contiguous: Vec<u64> = (1..=stored.len() as u64).collect();
        assert_eq!(versions, contiguous, "{id}: versions 1..n");
        let mut got: Vec<String> = stored
            .iter()
            .map(|e| {
                e.metadata
                    .get(COMMAND_ID_KEY)
                    .cloned()
                    .unwrap_or_else(|| panic!("{id} v{}: an event no command sent", e.version))
            })
            .collect();
        let mut want = want.clone();
        got.sort();
        want.sort();
        assert_eq!(
            got, want,
            "{id}: every acknowledged command once, nothing else"
        );
    }
    assert_read_model_equals_fold(c, &acked.streams()).await;
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

fn pids(h: &ClusterHarness) -> Vec<u32> {
    h.writers
        .iter()
        .chain(&h.projectors)
        .chain(&h.reader)
        .map(|p| p.pid().expect("a running esq process"))
        .collect()
}

fn report(phase: &str, p: &Progress, started: Instant) {
    eprintln!(
        "{phase}: {} operations acknowledged ({} sent after the fault) in {:.1?}; {} UNAVAILABLE \
         retried ({} outcome unknown); slowest acknowledgement {} ms",
        p.acked.load(Ordering::Relaxed),
        p.acked_after_fault.load(Ordering::Relaxed),
        started.elapsed(),
        p.unavailable.load(Ordering::Relaxed),
        p.outcome_unknown.load(Ordering::Relaxed),
        p.slowest_ms.load(Ordering::Relaxed),
    );
}

/// Appends (raw and a command) until one succeeds, within `within`; returns how long it took.
async fn appends_succeed_again(c: &Clients, within: Duration) -> Duration {
    let started = Instant::now();
    let id = unique("back");
    loop {
        let r = c
            .events
            .clone()
            .append(with_deadline(pb::AppendRequest {
                stream: stream("cart", &id),
                expected_version: any(),
                events: vec![item_event(1)],
            }))
            .await;
        match r {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && started.elapsed() < within => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("appends did not succeed again within {within:?}: {s:?}"),
        }
    }
    started.elapsed()
}

/// The whole node-loss scenario on the ring; see the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_on_a_three_node_ring() {
    let test = "node_loss_on_a_three_node_ring";
    let Some(ring) = Ring::from_env(test) else {
        return;
    };
    let redis = redis_url(test);
    let _serial = Ring::lock().await;
    let begin = Instant::now();
    ring.ensure_all_up(RING_BOUND)
        .await
        .expect("the ring is up before the test");
    let _guard = ring.guard();

    // Two deployments on the ring: `fed` with nudges (the fast path), `logged` without (the
    // projector learns of appends from the change log alone).
    let fed = harness(&ring, &redis, true).await;
    let logged = harness(&ring, &redis, false).await;
    eprintln!(
        "logs in {} and {}",
        fed.logs().display(),
        logged.logs().display()
    );
    let fed_pids = pids(&fed);
    let logged_pids = pids(&logged);

    // 1. Node 1 (the first contact point) SIGKILLed during an 8-writer load.
    let phase = Instant::now();
    let load = Load::new("kill1");
    let tasks = load.start(&fed.clients, 8);
    wait_acked(&load.progress, 200, false, Duration::from_secs(300)).await;
    ring.kill(1).await.expect("kill node 1");
    load.progress.faulted.store(true, Ordering::SeqCst);
    eprintln!(
        "node 1 killed after {} operations",
        load.progress.acked.load(Ordering::Relaxed)
    );
    wait_acked(&load.progress, 300, true, Duration::from_secs(300)).await;
    let acked = finish(tasks, &load.progress).await;
    report("8 writers, node 1 killed", &load.progress, phase);
    verify(&fed.clients, &acked).await;

    // 2. Still one node down: a deployment without nudges, fed by the change log alone, misses
    //    nothing of an 8-writer load.
    let phase = Instant::now();
    let logged_load = Load::new("log");
    let tasks = logged_load.start(&logged.clients, 8);
    logged_load.progress.faulted.store(true, Ordering::SeqCst);
    wait_acked(&logged_load.progress, 300, true, Duration::from_secs(300)).await;
    let logged_acked = finish(tasks, &logged_load.progress).await;
    report(
        "8 writers, no nudges, node 1 down",
        &logged_load.progress,
        phase,
    );
    verify(&logged.clients, &logged_acked).await;

    // 3. Two nodes down: no quorum. Appends answer UNAVAILABLE within their deadline (not
    //    DEADLINE_EXCEEDED, no hang); read-svc goes on answering from Redis.
    ring.kill(2).await.expect("kill node 2");
    let mut probes = Vec::new();
    for (what, c) in [("with nudges", &fed.clients), ("without", &logged.clients)] {
        let probe = unique("noquorum");
        let started = Instant::now();
        let err = c
            .events
            .clone()
            .append(with_deadline(pb::AppendRequest {
                stream: stream("cart", &probe),
                expected_version: any(),
                events: vec![item_event(0)],
            }))
            .await
            .expect_err("an append without a quorum");
        assert_eq!(err.code(), Code::Unavailable, "{what}: {err:?}");
        eprintln!(
            "two nodes down ({what}): append answered UNAVAILABLE after {:.1?}: {}",
            started.elapsed(),
            err.message()
        );
        probes.push((c.clone(), probe.clone(), err.message().to_owned()));
        let err = c
            .carts
            .clone()
            .add_item(with_deadline(cart::AddItemRequest {
                command_id: unique("cmd"),
                ..suite::add(&probe, "sku-1", 1, 101)
            }))
            .await
            .expect_err("a command without a quorum");
        assert_eq!(err.code(), Code::Unavailable, "{what}: {err:?}");
    }
    for (c, acked) in [(&fed.clients, &acked), (&logged.clients, &logged_acked)] {
        for id in acked.commands.keys() {
            let version = acked.commands[id].len() as u64;
            let got = c
                .cart_queries
                .clone()
                .get_cart(with_deadline(cart::GetCartRequest {
                    cart_id: id.clone(),
                    min_version: version,
                }))
                .await
                .unwrap_or_else(|s| panic!("GetCart {id} with two nodes down: {s:?}"))
                .into_inner();
            assert_eq!(got.version, version, "{id}");
        }
        for (id, events) in &acked.raw {
            let version = events.len() as u64;
            let got = c
                .state
                .clone()
                .get_state(with_deadline(pb::GetStateRequest {
                    stream: stream("cart", id),
                    min_version: version,
                }))
                .await
                .unwrap_or_else(|s| panic!("GetState {id} with two nodes down: {s:?}"))
                .into_inner();
            assert_eq!(got.version, version, "{id}");
        }
    }

    // 4. Both nodes restarted: the same esq processes append again.
    let restart = Instant::now();
    ring.restart(1).await.expect("restart node 1");
    ring.restart(2).await.expect("restart node 2");
    ring.wait_up(1, RING_BOUND).await.expect("node 1 back");
    ring.wait_up(2, RING_BOUND).await.expect("node 2 back");
    let back = restart.elapsed();
    let fed_again = appends_succeed_again(&fed.clients, Duration::from_secs(180)).await;
    let logged_again = appends_succeed_again(&logged.clients, Duration::from_secs(180)).await;
    eprintln!(
        "nodes 1 and 2 restarted: CQL up and peers seen after {back:.1?}; appends succeeded \
         again {fed_again:.1?} / {logged_again:.1?} later"
    );
    assert_eq!(pids(&fed), fed_pids, "no esq process was restarted");
    assert_eq!(pids(&logged), logged_pids, "no esq process was restarted");
    for pid in fed_pids.iter().chain(&logged_pids) {
        assert!(alive(*pid), "esq process {pid} still runs");
    }

    // An append refused without a quorum left nothing behind (unless it said its outcome was
    // unknown, which a client must resolve by retrying).
    for (c, probe, message) in probes {
        if !message.contains("outcome unknown") {
            assert!(
                read_all(&c, "cart", &probe).await.is_empty(),
                "{probe}: a refused append was stored"
            );
        }
    }

    // A last load on the whole ring, then everything (all phases) checked once more.
    let phase = Instant::now();
    let last = Load::new("back");
    let tasks = last.start(&fed.clients, 8);
    wait_acked(&last.progress, 100, false, Duration::from_secs(300)).await;
    let mut all = finish(tasks, &last.progress).await;
    report("8 writers, ring whole again", &last.progress, phase);
    all.merge(acked);
    verify(&fed.clients, &all).await;
    verify(&logged.clients, &logged_acked).await;
    eprintln!("{test}: {:.1?} in all", begin.elapsed());
}
