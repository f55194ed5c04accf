//! The soak: a bounded mixed workload against the distributed deployment (2 write-svc,
//! 2 projectors, read-svc as real processes) for a fixed time while a schedule kills (SIGKILL)
//! and restarts esq processes — and, when a Cassandra ring and a replicated Redis Cluster are
//! given, a Cassandra node and a Redis master — then checks that nothing acknowledged was lost,
//! that the read model equals a fold of the store, that a subscriber on the event bus saw every
//! event in order, and that the memory of the esq processes stayed flat.
//!
//! `ESQ_SOAK_SECS` sets how long the load runs (60 s by default, what `scripts/test` runs; the
//! load also runs until every fault of the schedule happened once). `ESQ_SOAK_REPORT` names the
//! file the memory table and the figures are written to (default: `soak-report.txt` in the
//! harness's log folder). `scripts/soak --minutes N` runs it for longer on its own ring.

use crate::bus::rss_of;
use crate::suite::{exact, json_event, stream, to_domain, unique};
use esq::pb::bookshop::v1 as book;
use esq::pb::bookshop::v1::book_commands_client::BookCommandsClient;
use esq::pb::bookshop::v1::book_queries_client::BookQueriesClient;
use esq::pb::cart::v1 as cart;
use esq::pb::cart::v1::cart_commands_client::CartCommandsClient;
use esq::pb::cart::v1::cart_queries_client::CartQueriesClient;
use esq::pb::v1 as pb;
use esq::pb::v1::event_store_client::EventStoreClient;
use esq::pb::v1::projections_client::ProjectionsClient;
use esq::pb::v1::state_queries_client::StateQueriesClient;
use esq_domain::bookshop::{BookProjection, BookView};
use esq_domain::cart::{CartProjection, CartView};
use esq_domain::event::COMMAND_ID_KEY;
use esq_domain::projection::fold;
use esq_domain::state::{state_json, StateProjection};
use esq_domain::RecordedEvent;
use esq_testkit::cluster::{Backends, ClusterHarness, ClusterOptions, Role};
use esq_testkit::redis_ha::RedisHa;
use esq_testkit::ring::Ring;
use futures::StreamExt as _;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long a call whose outcome is unknown is retried before the soak fails: longer than any
/// fault of the schedule lasts (a Cassandra node restart on a busy 2-core machine included).
const DEFINITE_WITHIN: Duration = Duration::from_secs(300);
/// Generous bound on a process restart, a node coming back, a failover, and the end checks'
/// waits (the read model and the subscriber catching up).
const WAIT: Duration = Duration::from_secs(240);
/// Generous bound on a Cassandra node's restart.
const NODE_WAIT: Duration = Duration::from_secs(900);
const CART_TASKS: usize = 4;
const BOOK_TASKS: usize = 2;
const RAW_TASKS: usize = 2;
const QUERY_TASKS: usize = 2;

/// Where the clients find the processes now: the fault schedule swaps a restarted process's
/// channel in, and a client whose call failed takes the current one.
struct Live {
    writers: RwLock<Vec<Channel>>,
    reader: RwLock<Channel>,
}

impl Live {
    fn writer(&self, k: usize) -> Channel {
        let w = self.writers.read().expect("writers lock");
        w[k % w.len()].clone()
    }

    fn reader(&self) -> Channel {
        self.reader.read().expect("reader lock").clone()
    }
}

/// Counters of the run, printed and written to the report.
#[derive(Default)]
struct Stats {
    acked: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    queries: AtomicU64,
    queries_late: AtomicU64,
    queries_retried: AtomicU64,
    resubscribed: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A call's definite answer.
enum Outcome<T> {
    /// Acknowledged.
    Acked(T),
    /// A plain failure: nothing was written.
    Failed(Status),
}

/// Codes after which a call may or may not have taken effect: the API's "append outcome
/// unknown" UNAVAILABLE, and what a client sees when the process died under its call or
/// cannot be reached (UNAVAILABLE, UNKNOWN, CANCELLED) or the call's own deadline passed.
fn outcome_unknown(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Sends a write (`call` builds it on a write-svc channel) until it gets a definite answer,
/// resending the same request — the same command id or event ids, which the API makes
/// idempotent — to the other write-svc after an unknown outcome. Panics after
/// [`DEFINITE_WITHIN`] without one.
async fn until_definite<T, F, Fut>(live: &Live, k: usize, stats: &Stats, mut call: F) -> Outcome<T>
where
    F: FnMut(Channel) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + DEFINITE_WITHIN;
    let mut on = k;
    loop {
        match call(live.writer(on)).await {
            Ok(v) => {
                Stats::add(&stats.acked);
                return Outcome::Acked(v);
            }
            Err(s) if outcome_unknown(s.code()) => {
                Stats::add(&stats.retried);
                assert!(
                    Instant::now() < deadline,
                    "no definite answer within {DEFINITE_WITHIN:?}: {s:?}"
                );
                on += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => {
                Stats::add(&stats.failed);
                return Outcome::Failed(s);
            }
        }
    }
}

/// A small random number generator (xorshift), seeded per task.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self(uuid::Uuid::new_v4().as_u128() as u64 | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What the writers expect a stream to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Model {
    /// A cart: lines (sku → quantity, unit price), whether checked out.
    Cart(BTreeMap<String, (i64, i64)>, bool),
    /// A book: title, price, whether deleted.
    Book(String, i64, bool),
    /// A free-form stream: the ids of the acknowledged events, in order.
    Raw(Vec<String>),
}

/// What was sent to one stream and what was acknowledged.
#[derive(Debug, Clone)]
struct Written {
    kind: &'static str,
    id: String,
    /// The stream's version after the last acknowledged write (0: none).
    version: u64,
    /// Every command id (commands) or event id (raw appends) sent, acknowledged or not.
    sent: BTreeSet<String>,
    /// The acknowledged command ids (commands).
    acked_commands: Vec<String>,
    model: Model,
}

impl Written {
    fn new(kind: &'static str, id: String, model: Model) -> Self {
        Self {
            kind,
            id,
            version: 0,
            sent: BTreeSet::new(),
            acked_commands: Vec::new(),
            model,
        }
    }
}

/// The streams written lately, for the query tasks: `(kind, id) → (acknowledged version,
/// whether deleted)`.
type Recent = Mutex<BTreeMap<(&'static str, String), (u64, bool)>>;

fn note(recent: &Recent, w: &Written) {
    let deleted = matches!(w.model, Model::Book(_, _, true));
    let mut r = recent.lock().expect("recent lock");
    r.insert((w.kind, w.id.clone()), (w.version, deleted));
    // Bounded: the oldest streams (by id order, random) leave once 512 are known.
    while r.len() > 512 {
        r.pop_first();
    }
}

const SKUS: [(&str, i64); 5] = [
    ("sku-a", 100),
    ("sku-b", 250),
    ("sku-c", 999),
    ("sku-d", 5),
    ("sku-e", 1200),
];

/// Carts: adds, removes of what the cart holds, a checkout, then a new cart.
async fn cart_task(
    k: usize,
    live: Arc<Live>,
    stats: Arc<Stats>,
    recent: Arc<Recent>,
    stop: Arc<AtomicBool>,
) -> Vec<Written> {
    let mut rng = Rng::new();
    let mut done = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut w = Written::new("cart", unique("cart"), Model::Cart(BTreeMap::new(), false));
        for _ in 0..3 + rng.below(6) {
            let Model::Cart(lines, _) = &w.model else {
                unreachable!()
            };
            let command_id = unique("cmd");
            w.sent.insert(command_id.clone());
            let held: Vec<(String, i64)> =
                lines.iter().map(|(s, (q, _))| (s.clone(), *q)).collect();
            let outcome = if !held.is_empty() && rng.below(3) == 0 {
                let (sku, q) = held[rng.below(held.len() as u64) as usize].clone();
                let quantity = 1 + rng.below(q as u64) as i64;
                let req = cart::RemoveItemRequest {
                    cart_id: w.id.clone(),
                    sku: sku.clone(),
                    quantity,
                    command_id: command_id.clone(),
                    ..Default::default()
                };
                let o = until_definite(&live, k, &stats, |ch| {
                    let req = req.clone();
                    async move { CartCommandsClient::new(ch).remove_item(req).await }
                })
                .await;
                (o, sku, -quantity, 0)
            } else {
                let (sku, price) = SKUS[rng.below(SKUS.len() as u64) as usize];
                let quantity = 1 + rng.below(3) as i64;
                let req = cart::AddItemRequest {
                    cart_id: w.id.clone(),
                    sku: sku.into(),
                    quantity,
                    unit_price_cents: price,
                    command_id: command_id.clone(),
                    ..Default::default()
                };
                let o = until_definite(&live, k, &stats, |ch| {
                    let req = req.clone();
                    async move { CartCommandsClient::new(ch).add_item(req).await }
                })
                .await;
                (o, sku.to_owned(), quantity, price)
            };
            match outcome {
                (Outcome::Acked(r), sku, delta, price) => {
                    let Model::Cart(lines, _) = &mut w.model else {
                        unreachable!()
                    };
                    let line = lines.entry(sku.clone()).or_insert((0, price));
                    line.0 += delta;
                    if line.0 == 0 {
                        lines.remove(&sku);
                    }
                    w.version = r.into_inner().version;
                    w.acked_commands.push(command_id);
                    note(&recent, &w);
                }
                (Outcome::Failed(s), ..) => eprintln!("soak: cart {} command failed: {s:?}", w.id),
            }
        }
        let Model::Cart(lines, _) = &w.model else {
            unreachable!()
        };
        if !lines.is_empty() {
            let command_id = unique("cmd");
            w.sent.insert(command_id.clone());
            let req = cart::CheckoutRequest {
                cart_id: w.id.clone(),
                command_id: command_id.clone(),
                ..Default::default()
            };
            match until_definite(&live, k, &stats, |ch| {
                let req = req.clone();
                async move { CartCommandsClient::new(ch).checkout(req).await }
            })
            .await
            {
                Outcome::Acked(r) => {
                    if let Model::Cart(_, checked_out) = &mut w.model {
                        *checked_out = true;
                    }
                    w.version = r.into_inner().version;
                    w.acked_commands.push(command_id);
                    note(&recent, &w);
                }
                Outcome::Failed(s) => eprintln!("soak: checkout of {} failed: {s:?}", w.id),
            }
        }
        done.push(w);
    }
    done
}

/// Books: create, a few updates, then deleted half of the time.
async fn book_task(
    k: usize,
    live: Arc<Live>,
    stats: Arc<Stats>,
    recent: Arc<Recent>,
    stop: Arc<AtomicBool>,
) -> Vec<Written> {
    let mut rng = Rng::new();
    let mut done = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let isbn = format!("978{:010}", rng.below(9_000_000_000));
        let title = format!("Soak {}", rng.below(1000));
        let price = 100 + rng.below(5000) as i64;
        let mut w = Written::new(
            "book",
            isbn.clone(),
            Model::Book(title.clone(), price, false),
        );
        let command_id = unique("cmd");
        w.sent.insert(command_id.clone());
        let req = book::CreateBookRequest {
            isbn: isbn.clone(),
            title,
            author: format!("Soak Author {k}"),
            price_cents: price,
            command_id: command_id.clone(),
        };
        match until_definite(&live, k, &stats, |ch| {
            let req = req.clone();
            async move { BookCommandsClient::new(ch).create_book(req).await }
        })
        .await
        {
            Outcome::Acked(r) => {
                w.version = r.into_inner().version;
                w.acked_commands.push(command_id);
                note(&recent, &w);
            }
            Outcome::Failed(s) => {
                // A drawn ISBN taken by an earlier book of this run: nothing written.
                eprintln!("soak: create of book {isbn} failed: {s:?}");
                done.push(w);
                continue;
            }
        }
        for _ in 0..1 + rng.below(4) {
            let command_id = unique("cmd");
            w.sent.insert(command_id.clone());
            // A real change: an update that changes nothing records no event (and its command
            // id is then stored nowhere).
            let Model::Book(old_title, old_price, _) = &w.model else {
                unreachable!()
            };
            let (title, price) = if rng.below(2) == 0 {
                (Some(format!("{old_title}+")), None)
            } else {
                (None, Some(old_price + 1 + rng.below(500) as i64))
            };
            let req = book::UpdateBookRequest {
                isbn: isbn.clone(),
                title: title.clone(),
                price_cents: price,
                command_id: command_id.clone(),
                ..Default::default()
            };
            match until_definite(&live, k, &stats, |ch| {
                let req = req.clone();
                async move { BookCommandsClient::new(ch).update_book(req).await }
            })
            .await
            {
                Outcome::Acked(r) => {
                    if let Model::Book(t, p, _) = &mut w.model {
                        *t = title.unwrap_or(t.clone());
                        *p = price.unwrap_or(*p);
                    }
                    w.version = r.into_inner().version;
                    w.acked_commands.push(command_id);
                    note(&recent, &w);
                }
                Outcome::Failed(s) => eprintln!("soak: update of book {isbn} failed: {s:?}"),
            }
        }
        if rng.below(2) == 0 {
            let command_id = unique("cmd");
            w.sent.insert(command_id.clone());
            let req = book::DeleteBookRequest {
                isbn: isbn.clone(),
                command_id: command_id.clone(),
                ..Default::default()
            };
            match until_definite(&live, k, &stats, |ch| {
                let req = req.clone();
                async move { BookCommandsClient::new(ch).delete_book(req).await }
            })
            .await
            {
                Outcome::Acked(r) => {
                    if let Model::Book(_, _, deleted) = &mut w.model {
                        *deleted = true;
                    }
                    w.version = r.into_inner().version;
                    w.acked_commands.push(command_id);
                    note(&recent, &w);
                }
                Outcome::Failed(s) => eprintln!("soak: delete of book {isbn} failed: {s:?}"),
            }
        }
        done.push(w);
    }
    done
}

/// Raw appends of 1–3 events at exact expected versions to free-form `soak` streams.
async fn raw_task(
    k: usize,
    live: Arc<Live>,
    stats: Arc<Stats>,
    recent: Arc<Recent>,
    stop: Arc<AtomicBool>,
) -> Vec<Written> {
    let mut rng = Rng::new();
    let mut done = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut w = Written::new("soak", unique("raw"), Model::Raw(Vec::new()));
        for n in 0..5 + rng.below(10) {
            let events: Vec<pb::NewEvent> = (0..1 + rng.below(3))
                .map(|i| json_event("Ticked", &format!(r#"{{"n":{n},"i":{i},"k":{k}}}"#)))
                .collect();
            w.sent.extend(events.iter().map(|e| e.event_id.clone()));
            let req = pb::AppendRequest {
                stream: stream("soak", &w.id),
                expected_version: exact(w.version),
                events: events.clone(),
            };
            match until_definite(&live, k, &stats, |ch| {
                let req = req.clone();
                async move { EventStoreClient::new(ch).append(req).await }
            })
            .await
            {
                Outcome::Acked(r) => {
                    let Model::Raw(ids) = &mut w.model else {
                        unreachable!()
                    };
                    ids.extend(events.into_iter().map(|e| e.event_id));
                    w.version = r.into_inner().last_version;
                    note(&recent, &w);
                }
                Outcome::Failed(s) => {
                    // Nothing was written; the stream is left as it is.
                    eprintln!("soak: append to {} failed: {s:?}", w.id);
                    break;
                }
            }
        }
        done.push(w);
    }
    done
}

/// Queries with min_version = an acknowledged version of a stream written lately
/// (read-your-writes): an answer must reflect at least that version.
async fn query_task(
    live: Arc<Live>,
    stats: Arc<Stats>,
    recent: Arc<Recent>,
    stop: Arc<AtomicBool>,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let mut rng = Rng::new();
    while !stop.load(Ordering::Relaxed) {
        let pick = {
            let r = recent.lock().expect("recent lock");
            if r.is_empty() {
                None
            } else {
                let i = rng.below(r.len() as u64) as usize;
                r.iter().nth(i).map(|(k, v)| (k.clone(), *v))
            }
        };
        let Some(((kind, id), (version, _))) = pick else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ch = live.reader();
        let got: Result<Option<u64>, Status> = match kind {
            "cart" => CartQueriesClient::new(ch)
                .get_cart(cart::GetCartRequest {
                    cart_id: id.clone(),
                    min_version: version,
                })
                .await
                .map(|r| Some(r.into_inner().version)),
            "book" => BookQueriesClient::new(ch)
                .get_book(book::GetBookRequest {
                    isbn: id.clone(),
                    min_version: version,
                })
                .await
                .map(|r| Some(r.into_inner().version)),
            _ => StateQueriesClient::new(ch)
                .get_state(pb::GetStateRequest {
                    stream: stream(kind, &id),
                    min_version: version,
                })
                .await
                .map(|r| Some(r.into_inner().version)),
        };
        match got {
            Ok(Some(v)) if v >= version => Stats::add(&stats.queries),
            Ok(v) => violations.lock().expect("violations").push(format!(
                "{kind}/{id}: asked for min_version {version}, got {v:?}"
            )),
            // A book deleted at (or since) that version: NOT_FOUND once the version is reached.
            Err(s) if kind == "book" && s.code() == Code::NotFound => Stats::add(&stats.queries),
            // The read model did not reach the version within read-svc's wait (a projector or a
            // Redis master being replaced): late, not wrong.
            Err(s) if s.code() == Code::DeadlineExceeded => Stats::add(&stats.queries_late),
            Err(s) if outcome_unknown(s.code()) => {
                Stats::add(&stats.queries_retried);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => violations
                .lock()
                .expect("violations")
                .push(format!("{kind}/{id}@{version}: {s:?}")),
        }
    }
}

/// What the subscriber saw: per stream, the last version received.
type Seen = Mutex<BTreeMap<(String, String), u64>>;

/// A subscriber on the event bus from the start of the (fresh) keyspace, resuming after its
/// last position on the other write-svc whenever its subscription breaks. Every event must be
/// the next version of its stream: a gap, a repeat or a reordering is a violation.
async fn subscriber(
    live: Arc<Live>,
    stats: Arc<Stats>,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let mut position: Option<String> = None;
    let mut on = 0;
    while !stop.load(Ordering::Relaxed) {
        let start = Some(match &position {
            None => pb::subscribe_request::Start::FromStart(()),
            Some(p) => pb::subscribe_request::Start::After(p.clone()),
        });
        let req = pb::SubscribeRequest {
            start,
            ..Default::default()
        };
        let mut sub = match EventStoreClient::new(live.writer(on)).subscribe(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                if !outcome_unknown(s.code()) {
                    violations
                        .lock()
                        .expect("violations")
                        .push(format!("subscribe: {s:?}"));
                }
                on += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let m = tokio::select! {
                m = sub.message() => m,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if stop.load(Ordering::Relaxed) { return; }
                    continue;
                }
            };
            match m {
                Ok(Some(m)) => {
                    if let Some(pb::subscribe_response::Message::Event(e)) = m.message {
                        let s = e.stream.unwrap_or_default();
                        let mut seen = seen.lock().expect("seen lock");
                        let last = seen.entry((s.r#type.clone(), s.id.clone())).or_insert(0);
                        if e.version != *last + 1 {
                            violations.lock().expect("violations").push(format!(
                                "subscriber: {}/{} v{} after v{}",
                                s.r#type, s.id, e.version, last
                            ));
                        }
                        *last = (*last).max(e.version);
                    }
                    position = Some(m.position);
                }
                Ok(None) | Err(_) => {
                    Stats::add(&stats.resubscribed);
                    on += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

/// Resident memory of every esq process, by pid: `(label, bytes)`.
fn sample_rss(h: &ClusterHarness) -> BTreeMap<u32, (String, u64)> {
    h.processes()
        .into_iter()
        .map(|(label, pid)| (pid, (label, rss_of(pid))))
        .collect()
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL a process of the harness and start a replacement.
    Process(Role),
    /// SIGKILL a Cassandra node, let the load run without it, restart it, wait until it is up.
    CassandraNode,
    /// SIGKILL a Redis master, wait for the failover, restart it (it rejoins as a replica).
    RedisMaster,
}

/// The node-level backends, when the run has them: a Cassandra ring
/// (`ESQ_TEST_CASSANDRA_RING`) and a Redis Cluster with replicas (`ESQ_TEST_REDIS_CLUSTER_HA`).
/// Each is used when its variable is set; without it the soak runs on the single-node
/// backends (`ESQ_TEST_CASSANDRA`, `ESQ_TEST_REDIS`) and skips that kind of node fault.
struct Nodes {
    ring: Option<Ring>,
    redis: Option<RedisHa>,
}

impl Nodes {
    fn from_env(test: &str) -> Self {
        let set = |name: &str| std::env::var_os(name).is_some();
        Self {
            ring: set("ESQ_TEST_CASSANDRA_RING")
                .then(|| Ring::from_env(test))
                .flatten(),
            redis: set("ESQ_TEST_REDIS_CLUSTER_HA")
                .then(|| RedisHa::from_env(test))
                .flatten(),
        }
    }
}

/// Runs the schedule: each fault, then a pause, in a cycle, until `until` has passed and every
/// fault happened at least once. Swaps restarted processes into `live`. Returns what it did.
async fn faults(
    h: &mut ClusterHarness,
    live: &Live,
    nodes: &Nodes,
    started: Instant,
    until: Instant,
) -> Vec<String> {
    let mut schedule = vec![
        Fault::Process(Role::Writer),
        Fault::Process(Role::Projector),
        Fault::Process(Role::Reader),
    ];
    if nodes.redis.is_some() {
        schedule.push(Fault::RedisMaster);
    }
    if nodes.ring.is_some() {
        schedule.push(Fault::CassandraNode);
    }
    let pause = Duration::from_secs(3);
    let mut log = Vec::new();
    for (n, fault) in schedule.iter().cycle().enumerate() {
        if n >= schedule.len() && Instant::now() >= until {
            break;
        }
        let at = started.elapsed();
        let what = match *fault {
            Fault::Process(role) => {
                // Index 0 only: write-svc #1 and projector #1 live through the whole run, so
                // their memory is measured over all of it.
                let addr = h
                    .kill_and_restart(role, 0, WAIT)
                    .await
                    .unwrap_or_else(|e| panic!("restart {}: {e:#}", role.binary()));
                let ch = esq_testkit::channel(addr).await.expect("connect");
                match role {
                    Role::Writer => live.writers.write().expect("writers lock")[0] = ch,
                    Role::Reader => *live.reader.write().expect("reader lock") = ch,
                    Role::Projector => {}
                }
                format!("kill -9 {} #0, restarted at {addr}", role.binary())
            }
            Fault::CassandraNode => {
                let ring = nodes.ring.as_ref().expect("a ring");
                // Node 2, then 3, then 1 (the first contact point), in turn.
                let i = (n / schedule.len()) % ring.len() + 2;
                let i = if i > ring.len() { i - ring.len() } else { i };
                ring.kill(i).await.expect("kill a Cassandra node");
                // The load runs on two of three replicas for a while.
                tokio::time::sleep(Duration::from_secs(5)).await;
                ring.restart(i).await.expect("restart the Cassandra node");
                // A restarting node replays its commit log and rejoins: minutes on a busy
                // machine (3.5 min seen with a load average of 38 on 2 cores).
                ring.wait_up(i, NODE_WAIT)
                    .await
                    .expect("the Cassandra node is up");
                format!("kill -9 Cassandra node {i}, 5 s down, restarted, up again")
            }
            Fault::RedisMaster => {
                let redis = nodes.redis.as_ref().expect("a Redis Cluster");
                let masters = redis.masters().await.expect("Redis masters");
                let port = masters[(n / schedule.len()) % masters.len()];
                redis.kill(port).await.expect("kill a Redis master");
                redis
                    .wait_failover(port, WAIT)
                    .await
                    .expect("a replica took over");
                let failed_over = started.elapsed() - at;
                redis.restart(port).await.expect("restart the Redis node");
                // Every master has a replica again before anything else is killed.
                redis
                    .wait_healthy(WAIT)
                    .await
                    .expect("the Redis Cluster is whole again");
                format!(
                    "kill -9 Redis master :{port}, failed over after {:.1} s, restarted as a \
                     replica",
                    failed_over.as_secs_f64()
                )
            }
        };
        let line = format!(
            "{:>6.1}s  {what} ({:.1}s)",
            at.as_secs_f64(),
            (started.elapsed() - at).as_secs_f64()
        );
        eprintln!("soak fault: {line}");
        log.push(line);
        tokio::time::sleep(pause).await;
    }
    log
}

/// Reads a whole stream, retrying what a busy store may answer (UNAVAILABLE); a stream never
/// written reads as empty.
async fn read_stream(live: &Live, kind: &str, id: &str) -> Vec<pb::RecordedEvent> {
    let deadline = Instant::now() + WAIT;
    let mut on = 0;
    loop {
        let attempt = async {
            let mut s = EventStoreClient::new(live.writer(on))
                .read_stream(pb::ReadStreamRequest {
                    stream: stream(kind, id),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut out = Vec::new();
            while let Some(e) = s.message().await? {
                out.push(e);
            }
            Ok::<_, Status>(out)
        };
        match attempt.await {
            Ok(events) => return events,
            Err(s) if s.code() == Code::NotFound => return Vec::new(),
            Err(s) if outcome_unknown(s.code()) && Instant::now() < deadline => {
                on += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("read {kind}/{id}: {s:?}"),
        }
    }
}

/// Calls a query until it answers something other than DEADLINE_EXCEEDED / UNAVAILABLE (the
/// read model still catching up), until `deadline` (one for all the end checks, so that a
/// read model that never catches up fails the run in bounded time).
async fn settled<T, F, Fut>(deadline: Instant, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    loop {
        match call().await {
            Err(s) if outcome_unknown(s.code()) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// The end checks of one stream: the store holds exactly what was acknowledged (and nothing no
/// writer sent), versions contiguous, the model equals the fold, and the read model at the
/// stream's last version equals the fold. Returns the stream's last version and the problems.
async fn check_stream(live: &Live, w: &Written, deadline: Instant) -> (u64, Vec<String>) {
    let mut bad = Vec::new();
    let name = format!("{}/{}", w.kind, w.id);
    let stored = read_stream(live, w.kind, &w.id).await;
    let versions: Vec<u64> = stored.iter().map(|e| e.version).collect();
    if versions != (1..=stored.len() as u64).collect::<Vec<_>>() {
        bad.push(format!("{name}: versions not contiguous: {versions:?}"));
    }
    let last = stored.last().map_or(0, |e| e.version);
    if last != w.version {
        bad.push(format!(
            "{name}: the store is at v{last}, the last acknowledged write at v{}",
            w.version
        ));
    }
    let events: Vec<RecordedEvent> = stored.iter().cloned().map(to_domain).collect();
    match &w.model {
        Model::Raw(acked) => {
            let ids: Vec<String> = stored.iter().map(|e| e.event_id.clone()).collect();
            if &ids != acked {
                bad.push(format!(
                    "{name}: stored ids {ids:?} differ from the acknowledged {acked:?}"
                ));
            }
        }
        _ => {
            let commands: BTreeSet<String> = stored
                .iter()
                .filter_map(|e| e.metadata.get(COMMAND_ID_KEY).cloned())
                .collect();
            if stored.iter().any(|e| {
                !w.sent
                    .contains(e.metadata.get(COMMAND_ID_KEY).map_or("", |s| s))
            }) {
                bad.push(format!("{name}: an event of a command nobody sent"));
            }
            if let Some(lost) = w.acked_commands.iter().find(|c| !commands.contains(*c)) {
                bad.push(format!("{name}: acknowledged command {lost} is not stored"));
            }
        }
    }
    match &w.model {
        Model::Cart(lines, checked_out) => {
            let view = CartView::from_doc(&fold(&CartProjection, &events).expect("fold"));
            let got: BTreeMap<String, (i64, i64)> = view
                .items
                .iter()
                .map(|l| (l.sku.clone(), (l.quantity, l.unit_price_cents)))
                .collect();
            if &got != lines || (view.status == "checked_out") != *checked_out {
                bad.push(format!(
                    "{name}: fold {view:?} differs from the writer's model {:?}",
                    w.model
                ));
            }
            if last > 0 {
                match settled(deadline, || {
                    let (ch, cart_id) = (live.reader(), w.id.clone());
                    async move {
                        CartQueriesClient::new(ch)
                            .get_cart(cart::GetCartRequest {
                                cart_id,
                                min_version: last,
                            })
                            .await
                    }
                })
                .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        let items: Vec<_> = r
                            .items
                            .iter()
                            .map(|i| (i.sku.clone(), (i.quantity, i.unit_price_cents)))
                            .collect();
                        let want: Vec<_> = got.into_iter().collect();
                        if r.version != last
                            || items != want
                            || r.total_cents != view.total_cents
                            || r.item_count != view.item_count
                        {
                            bad.push(format!("{name}: read model {r:?} differs from {view:?}"));
                        }
                    }
                    Err(s) => bad.push(format!("{name}: GetCart at v{last}: {s:?}")),
                }
            }
        }
        Model::Book(title, price, deleted) => {
            let view = BookView::from_doc(&fold(&BookProjection, &events).expect("fold"));
            let modelled = (!*deleted).then(|| (title.clone(), *price));
            if last > 0 && view.as_ref().map(|v| (v.title.clone(), v.price_cents)) != modelled {
                bad.push(format!(
                    "{name}: fold {view:?} differs from the writer's model {:?}",
                    w.model
                ));
            }
            if last > 0 {
                let got = settled(deadline, || {
                    let (ch, isbn) = (live.reader(), w.id.clone());
                    async move {
                        BookQueriesClient::new(ch)
                            .get_book(book::GetBookRequest {
                                isbn,
                                min_version: last,
                            })
                            .await
                    }
                })
                .await;
                let got = match got {
                    Ok(b) => {
                        let b = b.into_inner();
                        Some((b.title, b.author, b.price_cents, b.version))
                    }
                    Err(s) if s.code() == Code::NotFound => None,
                    Err(s) => {
                        bad.push(format!("{name}: GetBook at v{last}: {s:?}"));
                        None
                    }
                };
                let want = view.map(|v| (v.title, v.author, v.price_cents, last));
                if got != want {
                    bad.push(format!("{name}: read model {got:?}, fold {want:?}"));
                }
            }
        }
        Model::Raw(_) => {}
    }
    if last > 0 {
        let want =
            esq::convert::to_struct(state_json(&fold(&StateProjection, &events).expect("fold")));
        match settled(deadline, || {
            let (ch, stream) = (live.reader(), stream(w.kind, &w.id));
            async move {
                StateQueriesClient::new(ch)
                    .get_state(pb::GetStateRequest {
                        stream,
                        min_version: last,
                    })
                    .await
            }
        })
        .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if r.version != last || r.state.as_ref() != Some(&want) {
                    bad.push(format!(
                        "{name}: state {r:?} differs from the fold {want:?}"
                    ));
                }
            }
            Err(s) => bad.push(format!("{name}: GetState at v{last}: {s:?}")),
        }
    }
    (last, bad)
}

/// Verifies every projection against a fold of the store (the operator's Verify, served by a
/// projector); returns one line per projection and the ones that are not clean.
async fn verify_all(projector: Channel, deadline: Instant) -> (Vec<String>, Vec<String>) {
    let mut p = ProjectionsClient::new(projector);
    let list = settled(deadline, || {
        let mut p = p.clone();
        async move {
            p.list_projections(pb::ListProjectionsRequest::default())
                .await
        }
    })
    .await
    .expect("ListProjections")
    .into_inner();
    let (mut lines, mut dirty) = (Vec::new(), Vec::new());
    for proj in list.projections {
        let mut s = p
            .verify(pb::VerifyRequest {
                projection: proj.name.clone(),
                examples: 5,
                repair: false,
            })
            .await
            .unwrap_or_else(|s| panic!("verify {}: {s:?}", proj.name))
            .into_inner();
        let mut report = None;
        while let Some(m) = s.message().await.expect("verify stream") {
            if let Some(pb::verify_response::Message::Report(r)) = m.message {
                report = Some(r);
            }
        }
        let r = report.unwrap_or_else(|| panic!("verify {}: no report", proj.name));
        let line = format!(
            "{}: {} streams, {} docs, missing {}, extra {}, different {}",
            proj.name, r.streams_checked, r.docs_checked, r.missing, r.extra, r.different
        );
        if !r.clean {
            dirty.push(format!("{line}; examples {:?}", r.examples));
        }
        lines.push(line);
    }
    (lines, dirty)
}

fn soak_secs() -> u64 {
    std::env::var("ESQ_SOAK_SECS")
        .ok()
        .map(|s| s.parse().expect("ESQ_SOAK_SECS is a number of seconds"))
        .unwrap_or(60)
}

/// The mixed workload under the fault schedule, then the end checks (see the module docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_with_faults() {
    let test = "soak::mixed_load_with_faults";
    if esq_testkit::real_backends_skipped(test) {
        return;
    }
    let nodes = Nodes::from_env(test);
    let how = "run scripts/test or scripts/soak (or give the ring and HA cluster variables)";
    let single = |name: &str| esq_testkit::required_env(test, name, how);
    let mut options = ClusterOptions {
        write_services: 2,
        projectors: 2,
        ..ClusterOptions::default()
    };
    let cassandra = match &nodes.ring {
        Some(ring) => {
            options.env.extend(ring.cluster_env());
            // The schema is created on the ring: each statement waits for schema agreement.
            options.serving_within = NODE_WAIT;
            ring.nodes().to_owned()
        }
        None => single("ESQ_TEST_CASSANDRA"),
    };
    let redis = match &nodes.redis {
        Some(ha) => {
            options = options.redis_cluster();
            // The projector moves its checkpoints only past applies a replica holds too, so a
            // master killed with applies it had not replicated yet loses none of them.
            options
                .env
                .push(("ESQ_REDIS_WAIT_REPLICAS".to_owned(), "1".to_owned()));
            ha.urls().to_owned()
        }
        None => single("ESQ_TEST_REDIS"),
    };
    // Fault scenarios on the ring run one at a time; a failing run still leaves it whole.
    let _lock = Ring::lock().await;
    let _guard = nodes.ring.as_ref().map(Ring::guard);
    let mut h = ClusterHarness::start(Backends { cassandra, redis }, options)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot start the deployment: {e:#}"));
    let secs = soak_secs();
    let report_path = std::env::var("ESQ_SOAK_REPORT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| h.logs().join("soak-report.txt"));
    let mut report = vec![format!(
        "soak: {secs} s of load; logs in {}; {}",
        h.logs().display(),
        match (&nodes.ring, &nodes.redis) {
            (Some(_), Some(_)) =>
                "faults: esq processes, a Cassandra node of the ring, a Redis master",
            (Some(_), None) =>
                "faults: esq processes and a Cassandra node of the ring; NO Redis \
                 master (no ESQ_TEST_REDIS_CLUSTER_HA)",
            (None, Some(_)) =>
                "faults: esq processes and a Redis master; NO Cassandra node \
                 (no ESQ_TEST_CASSANDRA_RING)",
            (None, None) =>
                "faults: esq processes ONLY (no ESQ_TEST_CASSANDRA_RING, no \
                 ESQ_TEST_REDIS_CLUSTER_HA)",
        }
    )];
    eprintln!("{}", report[0]);

    let mut writers = Vec::new();
    for w in &h.writers {
        writers.push(esq_testkit::channel(w.addr).await.expect("write-svc"));
    }
    let live = Arc::new(Live {
        writers: RwLock::new(writers),
        reader: RwLock::new(esq_testkit::channel(h.read_addr()).await.expect("read-svc")),
    });
    let stats = Arc::new(Stats::default());
    let recent: Arc<Recent> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_subscriber = Arc::new(AtomicBool::new(false));
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen: Arc<Seen> = Arc::default();

    let sub = tokio::spawn(subscriber(
        live.clone(),
        stats.clone(),
        seen.clone(),
        stop_subscriber.clone(),
        violations.clone(),
    ));
    let mut tasks = Vec::new();
    let args = || (live.clone(), stats.clone(), recent.clone(), stop.clone());
    for k in 0..CART_TASKS {
        let (l, s, r, st) = args();
        tasks.push(tokio::spawn(cart_task(k, l, s, r, st)));
    }
    for k in 0..BOOK_TASKS {
        let (l, s, r, st) = args();
        tasks.push(tokio::spawn(book_task(k, l, s, r, st)));
    }
    for k in 0..RAW_TASKS {
        let (l, s, r, st) = args();
        tasks.push(tokio::spawn(raw_task(k, l, s, r, st)));
    }
    let mut queries = Vec::new();
    for _ in 0..QUERY_TASKS {
        let (l, s, r, st) = args();
        queries.push(tokio::spawn(query_task(l, s, r, st, violations.clone())));
    }

    // Warm-up: the processes reach their working set before memory is first sampled and the
    // first fault hits.
    let started = Instant::now();
    let warm_up = Duration::from_secs((secs / 4).clamp(10, 120));
    tokio::time::sleep(warm_up).await;
    let first_rss = sample_rss(&h);
    let until = started + Duration::from_secs(secs);
    let fault_log = faults(&mut h, &live, &nodes, started, until).await;
    let remaining = until.saturating_duration_since(Instant::now());
    tokio::time::sleep(remaining).await;
    let last_rss = sample_rss(&h);
    stop.store(true, Ordering::Relaxed);
    let load_secs = started.elapsed().as_secs_f64();
    let mut written = Vec::new();
    for t in tasks {
        written.extend(t.await.expect("writer task"));
    }
    for q in queries {
        q.await.expect("query task");
    }
    eprintln!(
        "soak: load stopped after {load_secs:.0} s; {} streams written; checking",
        written.len()
    );

    // The end checks.
    let mut problems = Vec::new();
    let mut lasts = BTreeMap::new();
    let mut events = 0;
    let deadline = Instant::now() + WAIT;
    let checked: Vec<(u64, Vec<String>)> = futures::stream::iter(&written)
        .map(|w| check_stream(&live, w, deadline))
        .buffered(8)
        .collect()
        .await;
    for (w, (last, bad)) in written.iter().zip(checked) {
        problems.extend(bad);
        events += last;
        if last > 0 {
            lasts.insert((w.kind.to_owned(), w.id.clone()), last);
        }
    }
    let projector = esq_testkit::channel(h.projectors[1].addr)
        .await
        .expect("projector");
    let (verified, dirty) = verify_all(projector, deadline).await;
    problems.extend(dirty);
    // The subscriber must reach every stream's last version.
    let deadline = deadline.max(Instant::now() + Duration::from_secs(60));
    let behind = loop {
        let behind: Vec<String> = {
            let seen = seen.lock().expect("seen lock");
            lasts
                .iter()
                .filter(|(k, v)| seen.get(*k) != Some(*v))
                .map(|((t, i), v)| {
                    format!("{t}/{i} v{v}: seen {:?}", seen.get(&(t.clone(), i.clone())))
                })
                .collect()
        };
        if behind.is_empty() || Instant::now() >= deadline {
            break behind;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop_subscriber.store(true, Ordering::Relaxed);
    sub.await.expect("subscriber");
    problems.extend(
        behind
            .into_iter()
            .take(20)
            .map(|b| format!("subscriber behind: {b}")),
    );
    problems.extend(
        violations
            .lock()
            .expect("violations")
            .iter()
            .take(20)
            .cloned(),
    );

    // Memory, first vs last.
    let mib = |b: u64| b as f64 / 1048576.0;
    let mut table = vec![format!(
        "{:<14} {:>8} {:>10} {:>10} {:>8}  lived through the run",
        "process", "pid", "first MiB", "last MiB", "Δ MiB"
    )];
    let mut grew = Vec::new();
    let pids: BTreeSet<u32> = first_rss.keys().chain(last_rss.keys()).copied().collect();
    for pid in pids {
        let (label, first) = first_rss
            .get(&pid)
            .map(|(l, r)| (l.clone(), Some(*r)))
            .unwrap_or_else(|| (last_rss[&pid].0.clone(), None));
        let last = last_rss.get(&pid).map(|(_, r)| *r);
        let cell = |v: Option<u64>| v.map_or("-".to_owned(), |b| format!("{:.1}", mib(b)));
        let whole = first.is_some() && last.is_some();
        let delta = match (first, last) {
            (Some(f), Some(l)) => format!("{:+.1}", mib(l) - mib(f)),
            _ => "-".into(),
        };
        table.push(format!(
            "{label:<14} {pid:>8} {:>10} {:>10} {delta:>8}  {}",
            cell(first),
            cell(last),
            if whole { "yes" } else { "no (restarted)" }
        ));
        // Flat, generously: the first sample is taken after a short warm-up, when caches
        // (stream tails, snapshots, connection pools) and the allocator's arenas may not have
        // reached their working set yet, and the store keeps growing under the load; a leak
        // per request or per stream over a run grows past this, noise does not.
        if let (Some(f), Some(l)) = (first, last) {
            if l > f + (f / 2).max(64 << 20) {
                grew.push(format!(
                    "{label} (pid {pid}) grew from {:.1} MiB to {:.1} MiB",
                    mib(f),
                    mib(l)
                ));
            }
        }
    }
    problems.extend(grew);

    let s = &stats;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    report.push(format!(
        "load {load_secs:.0} s: {} writes acknowledged ({} retries after an unknown outcome, {} \
         plain failures), {} streams, {events} events; {} queries answered (min_version \
         reached), {} late (DEADLINE_EXCEEDED), {} retried (read-svc down); subscriber \
         resubscribed {} times",
        get(&s.acked),
        get(&s.retried),
        get(&s.failed),
        written.len(),
        get(&s.queries),
        get(&s.queries_late),
        get(&s.queries_retried),
        get(&s.resubscribed),
    ));
    report.push("faults:".into());
    report.extend(fault_log.iter().map(|l| format!("  {l}")));
    report.push("verify:".into());
    report.extend(verified.iter().map(|l| format!("  {l}")));
    report.push("memory (VmRSS after the warm-up vs at the end of the load):".into());
    report.extend(table.iter().map(|l| format!("  {l}")));
    report.push(if problems.is_empty() {
        "result: no problem found".into()
    } else {
        format!("result: {} problems", problems.len())
    });
    report.extend(problems.iter().map(|p| format!("  {p}")));
    let text = report.join("\n") + "\n";
    eprintln!("{text}");
    std::fs::write(&report_path, &text).expect("write the soak report");
    eprintln!("soak report written to {}", report_path.display());
    assert!(
        get(&s.acked) > 0 && !fault_log.is_empty(),
        "the soak wrote nothing or ran no fault"
    );
    assert!(
        problems.is_empty(),
        "soak found problems:\n{}",
        problems.join("\n")
    );
}
