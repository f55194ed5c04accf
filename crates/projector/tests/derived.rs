//! The derived projections (books per author, sales per SKU) through the real projector, on
//! the in-memory store, Redis (`ESQ_TEST_REDIS`) and Redis Cluster (`ESQ_TEST_REDIS_CLUSTER`):
//! for any events of many streams, appended in any interleaving, announced with duplicates and
//! applied by two projectors with different page sizes, the targets equal a plain model folded
//! from each stream's events. A missing variable fails the test unless
//! `ESQ_SKIP_REAL_BACKENDS=1`, which skips it and says so.

#![allow(clippy::unwrap_used)]

use esq_domain::authors::{AuthorView, AuthorsProjection};
use esq_domain::bookshop::{BookProjection, BookView};
use esq_domain::cart::{Cart, CartProjection, CartStatus};
use esq_domain::derived::{Derived, ALL_INDEX, MAX_VALUE};
use esq_domain::projection::fold;
use esq_domain::sku_sales::{SkuSalesProjection, SkuSalesView};
use esq_domain::{ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use esq_eventstore::embedded::EmbeddedStore;
use esq_eventstore::{now_us, Change, ChangeFeed, ChangePage, EventStore, ReadRequest, StoreError};
use esq_projector::{Config, Projector};
use esq_readstore::memory::MemoryStore;
use esq_readstore::redis::{RedisConfig, RedisStore};
use esq_readstore::{Coordination, ReadStore};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A one-shard change feed the test writes: notifications in any order, duplicates included.
#[derive(Default)]
struct HandFeed {
    changes: Mutex<Vec<Change>>,
}

impl HandFeed {
    fn notify(&self, stream: &StreamId, version: u64) {
        self.changes.lock().unwrap().push(Change {
            stream: stream.clone(),
            first_version: version,
            last_version: version,
            noted_at_us: now_us(),
        });
    }
}

impl ChangeFeed for HandFeed {
    fn shard_count(&self) -> u32 {
        1
    }

    async fn poll(
        &self,
        _shard: u32,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ChangePage, StoreError> {
        let start = after.map_or(0, |a| a.parse::<usize>().unwrap() + 1);
        let all = self.changes.lock().unwrap().clone();
        let mut page = ChangePage::default();
        for (i, c) in all.into_iter().enumerate().skip(start).take(limit as usize) {
            page.changes.push(c);
            page.positions.push(i.to_string());
        }
        Ok(page)
    }

    async fn position_before(&self, _: u32, _: i64) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
}

/// A book event as a client could have appended it: any order, authors A–C, a few prices.
fn raw_book_event() -> impl Strategy<Value = NewEvent> {
    let author = prop::sample::select(vec!["A", "B", "C"]);
    let price = prop::sample::select(vec![100i64, 250, 999, 5]);
    prop_oneof![
        3 => (author.clone(), price.clone()).prop_map(|(a, p)| NewEvent::json("BookCreated", 1,
            &json!({"isbn": "x", "title": "T", "author": a, "price_cents": p}))),
        3 => (prop::option::of(author.clone()), prop::option::of(price), author.clone())
            .prop_map(|(a, p, prev)| NewEvent::json("BookUpdated", 1,
                &json!({"author": a, "price_cents": p, "previous_author": prev}))),
        1 => author.prop_map(|a| NewEvent::json("BookDeleted", 1, &json!({"author": a}))),
    ]
}

/// One case: per stream its events; the order the appends happen in (stream, events per
/// append, then: 0/1 projector a/b polls, 2 a duplicate notification, else nothing); the two
/// projectors' page sizes.
#[derive(Debug, Clone)]
struct Case {
    carts: Vec<Vec<NewEvent>>,
    books: Vec<Vec<NewEvent>>,
    schedule: Vec<(prop::sample::Index, usize, u8)>,
    pages: (u32, u32),
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(
            prop::collection::vec(esq_domain::arbitrary::raw_cart_event(), 1..8),
            1..5,
        ),
        prop::collection::vec(prop::collection::vec(raw_book_event(), 1..6), 1..5),
        prop::collection::vec((any::<prop::sample::Index>(), 1usize..4, 0u8..5), 1..40),
        (1u32..4, 1u32..6),
    )
        .prop_map(|(carts, books, schedule, pages)| Case {
            carts,
            books,
            schedule,
            pages,
        })
}

/// What the queries show: per author and per SKU.
#[derive(Debug, Default, PartialEq, Eq)]
struct Model {
    authors: BTreeMap<String, AuthorView>,
    skus: BTreeMap<String, SkuSalesView>,
}

/// A stream's document: the fold of its events up to the first one the projection cannot
/// read (the projector parks the stream there, with the events before it applied).
fn folded<P: esq_domain::projection::Projection>(
    p: &P,
    events: &[RecordedEvent],
) -> esq_domain::projection::Doc {
    (0..=events.len())
        .rev()
        .find_map(|k| fold(p, &events[..k]).ok())
        .unwrap_or_default()
}

/// The plain model: each stream folded on its own, then summed per target.
fn model(carts: &[Vec<RecordedEvent>], books: &[Vec<RecordedEvent>]) -> Model {
    let mut m = Model::default();
    for events in books {
        if let Some(book) = BookView::from_doc(&folded(&BookProjection, events)) {
            let a = m
                .authors
                .entry(book.author.clone())
                .or_insert_with(|| AuthorView {
                    author: book.author.clone(),
                    books: 0,
                    min_price_cents: i64::MAX,
                    max_price_cents: i64::MIN,
                });
            a.books += 1;
            a.min_price_cents = a.min_price_cents.min(book.price_cents);
            a.max_price_cents = a.max_price_cents.max(book.price_cents);
        }
    }
    for events in carts {
        let cart = Cart::from_doc(&folded(&CartProjection, events));
        if cart.status != CartStatus::CheckedOut {
            continue;
        }
        for (sku, line) in cart.lines {
            let s = m.skus.entry(sku.clone()).or_insert_with(|| SkuSalesView {
                sku,
                units: 0,
                revenue_cents: 0,
                carts: 0,
            });
            let clamp = |v: i64| v.clamp(-MAX_VALUE, MAX_VALUE);
            s.units += clamp(line.quantity);
            s.revenue_cents += clamp(line.quantity.saturating_mul(line.unit_price_cents));
            s.carts += 1;
        }
    }
    m
}

/// Every listed target that reads as present, paging the listing index as queries do, in the
/// namespace queries resolve (the source's active generation).
async fn stored<R: ReadStore>(read: &Arc<R>) -> Model {
    let resolver = esq_readstore::generations::Resolver::new(Arc::clone(read));
    let ns = |d: &dyn Derived, source_ns: String| {
        esq_readstore::generations::derived_namespace(d.source(), &source_ns, d.name())
    };
    let authors = ns(
        &AuthorsProjection,
        resolver.active(AuthorsProjection.source()).await.unwrap(),
    );
    let skus = ns(
        &SkuSalesProjection,
        resolver.active(SkuSalesProjection.source()).await.unwrap(),
    );
    let read = read.as_ref();
    async fn listed<R: ReadStore>(read: &R, name: &str) -> Vec<(String, esq_readstore::Doc)> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let ids = read
                .index_page(name, ALL_INDEX, after.as_deref(), 2)
                .await
                .unwrap();
            for id in &ids {
                if let Some(doc) = read.get(name, id).await.unwrap() {
                    out.push((id.clone(), doc));
                }
            }
            match ids.last() {
                Some(last) if ids.len() == 2 => after = Some(last.clone()),
                _ => return out,
            }
        }
    }
    let mut m = Model::default();
    for (id, doc) in listed(read, &authors).await {
        if let Some(v) = AuthorView::from_doc(&id, &doc) {
            m.authors.insert(id, v);
        }
    }
    for (id, doc) in listed(read, &skus).await {
        if let Some(v) = SkuSalesView::from_doc(&id, &doc) {
            m.skus.insert(id, v);
        }
    }
    m
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

async fn run_case<R: ReadStore + Coordination>(
    read: Arc<R>,
    mut c: Case,
) -> Result<(), TestCaseError> {
    // Generated events may share ids (cloned constants); the store rejects a reused id.
    for e in c.carts.iter_mut().chain(c.books.iter_mut()).flatten() {
        e.event_id = uuid::Uuid::now_v7();
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let feed = Arc::new(HandFeed::default());
    let projector = |page: u32, owner: &str| {
        Projector::new(
            store.clone(),
            feed.clone(),
            read.clone(),
            Config {
                read_page: page,
                poll_limit: 3,
                owner: owner.to_owned(),
                ..Config::default()
            },
        )
    };
    let (a, b) = (projector(c.pages.0, "a"), projector(c.pages.1, "b"));
    a.refresh_generations(false).await.map_err(fail)?;
    b.refresh_generations(false).await.map_err(fail)?;
    let streams: Vec<(StreamId, &Vec<NewEvent>)> = c
        .carts
        .iter()
        .enumerate()
        .map(|(i, e)| (StreamId::new("cart", format!("c{i}")).unwrap(), e))
        .chain(
            c.books
                .iter()
                .enumerate()
                .map(|(i, e)| (StreamId::new("book", format!("b{i}")).unwrap(), e)),
        )
        .collect();
    let mut appended = vec![0usize; streams.len()];
    for (which, n, action) in &c.schedule {
        let s = which.index(streams.len());
        let (stream, events) = &streams[s];
        let end = (appended[s] + n).min(events.len());
        if end > appended[s] {
            store
                .append(stream, ExpectedVersion::Any, &events[appended[s]..end])
                .await
                .unwrap();
            appended[s] = end;
            feed.notify(stream, end as u64);
        }
        match action {
            0 => {
                a.poll_shard(0).await.map_err(fail)?;
            }
            1 => {
                b.poll_shard(0).await.map_err(fail)?;
            }
            // A duplicate notification of this stream.
            2 => feed.notify(stream, end.max(1) as u64),
            _ => {}
        }
    }
    // Everything left is appended and announced; both projectors finish.
    for (s, (stream, events)) in streams.iter().enumerate() {
        if appended[s] < events.len() {
            store
                .append(stream, ExpectedVersion::Any, &events[appended[s]..])
                .await
                .unwrap();
            feed.notify(stream, events.len() as u64);
        }
    }
    a.catch_up().await.map_err(fail)?;
    b.catch_up().await.map_err(fail)?;
    let mut recorded = Vec::new();
    for (stream, _) in &streams {
        recorded.push(
            store
                .read(stream, ReadRequest::forwards(1, 1000))
                .await
                .unwrap(),
        );
    }
    let (carts, books) = recorded.split_at(c.carts.len());
    prop_assert_eq!(stored(&read).await, model(carts, books));
    Ok(())
}

fn unique(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "esqtest-{test}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn runner() -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases: 24,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

#[test]
fn memory_derived_projections_equal_the_model() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runner()
        .run(&case(), |c| {
            runtime.block_on(run_case(Arc::new(MemoryStore::new()), c))
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

fn on_redis(var: &str, cluster: bool, test: &str) {
    let urls: Vec<String> = match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|u| u.trim().to_owned()).collect(),
        _ if std::env::var("ESQ_SKIP_REAL_BACKENDS").as_deref() == Ok("1") => {
            eprintln!("{test}: SKIPPED by request (ESQ_SKIP_REAL_BACKENDS=1)");
            return;
        }
        _ => panic!("{test} needs a real Redis: set {var}, or ESQ_SKIP_REAL_BACKENDS=1 to skip"),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runner()
        .run(&case(), |c| {
            runtime.block_on(async {
                // A fresh prefix per case: the targets (authors, SKUs) are shared names.
                let read = RedisStore::connect(RedisConfig {
                    urls: urls.clone(),
                    cluster,
                    prefix: unique(test),
                    timeout: Duration::from_secs(5),
                    access: Default::default(),
                })
                .await
                .unwrap();
                run_case(Arc::new(read), c).await
            })
        })
        .unwrap_or_else(|e| panic!("{test}: {e}"));
}

#[test]
fn standalone_derived_projections_equal_the_model() {
    on_redis(
        "ESQ_TEST_REDIS",
        false,
        "standalone_derived_projections_equal_the_model",
    );
}

#[test]
fn cluster_derived_projections_equal_the_model() {
    on_redis(
        "ESQ_TEST_REDIS_CLUSTER",
        true,
        "cluster_derived_projections_equal_the_model",
    );
}
