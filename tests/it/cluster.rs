//! The suite and the fault tests against the distributed deployment: write-svc, projector and
//! read-svc as separate processes on a real Cassandra node and a real Redis.

use crate::suite::{self, add, exact, read_all, stream, to_domain, unique};
use crate::{bus, core, derived, history, replay};
use esq::pb::bookshop::v1 as book;
use esq::pb::cart::v1 as cart;
use esq::pb::v1 as pb;
use esq_domain::cart::{CartProjection, CartView};
use esq_domain::projection::fold;
use esq_domain::state::{state_json, StateProjection};
use esq_domain::RecordedEvent;
use esq_testkit::cluster::{Backends, ClusterHarness, ClusterOptions};
use esq_testkit::Clients;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

async fn harness(test: &str, options: ClusterOptions) -> Option<ClusterHarness> {
    let backends = Backends::from_env(test)?;
    Some(
        ClusterHarness::start(backends, options)
            .await
            .unwrap_or_else(|e| panic!("{test}: cannot start the deployment: {e:#}")),
    )
}

/// Every backend-agnostic scenario, against one deployment (scenarios use fresh streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_cassandra_and_redis() {
    let Some(h) = harness("suite_on_cassandra_and_redis", ClusterOptions::default()).await else {
        return;
    };
    let c = &h.clients;
    eprintln!("logs in {}", h.logs().display());
    suite::health_is_serving(c).await;
    suite::reflection_lists_services(c).await;
    suite::append_then_query_with_min_version(c).await;
    suite::min_version_wait_is_bounded(c).await;
    suite::retried_append_is_idempotent(c).await;
    suite::bad_input_is_rejected_and_changes_nothing(c).await;
    suite::cart_rules_and_conflicts(c).await;
    suite::bookshop_commands_and_queries(c).await;
    suite::read_stream_directions_and_bounds(c).await;
    suite::schema_upgrades_are_read_through_upcasters(c).await;
    suite::concurrent_writers_one_winner_per_version(c).await;
    core::read_model_agrees_with_the_aggregate(c).await;
    core::owned_streams_honour_their_contracts(c).await;
    core::concurrent_commands_on_one_cart_all_succeed(c).await;
    history::state_at_versions_and_exact_times(c).await;
    history::cart_at_versions_and_times(c).await;
    history::book_at_after_update_and_delete(c).await;
    history::list_books_at_shows_the_old_catalogue(c).await;
    history::sales_report_over_checked_out_carts(c).await;
    history::cart_at_every_version_is_what_the_read_model_served_then(c).await;
    derived::derived_queries_follow_the_traffic(c).await;
}

/// Replay previews and saved what-if timelines, against one deployment (fresh streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_cassandra_and_redis() {
    let Some(h) = harness("replay_on_cassandra_and_redis", ClusterOptions::default()).await else {
        return;
    };
    let c = &h.clients;
    eprintln!("logs in {}", h.logs().display());
    replay::replay_preview_skip_move_insert_stop(c).await;
    replay::replay_preview_validates_edits(c).await;
    replay::saved_timelines_preview_again(c).await;
    replay::saved_timelines_follow_the_stream_as_it_grows(c).await;
    replay::replay_preview_of_a_free_form_stream(c).await;
}

/// 16 concurrent writers spread over two write-svc processes on one stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_across_two_write_services() {
    let options = ClusterOptions {
        write_services: 2,
        ..ClusterOptions::default()
    };
    let Some(h) = harness("writers_across_two_write_services", options).await else {
        return;
    };
    let second = Clients::connect(h.writers[1].addr, h.read_addr())
        .await
        .expect("second write-svc");
    suite::concurrent_writers_on(
        &h.clients,
        &[h.clients.events.clone(), second.events.clone()],
    )
    .await;
    // Commands without an expected version: races between the processes are retried.
    let (total, aborted) =
        core::contended_commands(&h.clients, &[h.clients.carts.clone(), second.carts], 16, 8).await;
    let rate = aborted as f64 / total as f64;
    eprintln!(
        "16 writers on one cart across 2 write-svc: {aborted} of {total} ABORTED ({:.2} %)",
        rate * 100.0
    );
    assert!(rate <= 0.01, "{aborted} of {total} commands ABORTED");
}

/// The cart streams of a load: `streams` carts, `events` ItemAdded events in all.
struct Load {
    carts: Vec<String>,
    appended: Arc<AtomicUsize>,
}

impl Load {
    fn new(streams: usize) -> Self {
        Self {
            carts: (0..streams).map(|_| unique("load")).collect(),
            appended: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Appends `per_stream` events to every cart, in batches of `batch`, 16 appenders at once.
    async fn run(&self, c: &Clients, per_stream: usize, batch: usize) {
        let mut tasks = Vec::new();
        for t in 0..16 {
            let carts: Vec<String> = self.carts.iter().skip(t).step_by(16).cloned().collect();
            let mut events = c.events.clone();
            let appended = Arc::clone(&self.appended);
            tasks.push(tokio::spawn(async move {
                for round in 0..per_stream / batch {
                    for id in &carts {
                        let batch_events = (0..batch)
                            .map(|i| {
                                let n = round * batch + i;
                                suite::json_event(
                                    "ItemAdded",
                                    &format!(
                                        r#"{{"sku":"sku-{}","quantity":{},"unit_price_cents":{}}}"#,
                                        n % 7,
                                        n % 5 + 1,
                                        100 + n % 7
                                    ),
                                )
                            })
                            .map(|mut e| {
                                e.schema_version = 2;
                                e
                            })
                            .collect();
                        let req = pb::AppendRequest {
                            stream: stream("cart", id),
                            expected_version: exact((round * batch) as u64),
                            events: batch_events,
                        };
                        // Retry an outage blip; the same event ids make a retry idempotent.
                        let mut tries = 0;
                        loop {
                            match events.append(req.clone()).await {
                                Ok(_) => break,
                                Err(s) if s.code() == Code::Unavailable && tries < 5 => {
                                    tries += 1;
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                                Err(s) => panic!("append to {id}: {s:?}"),
                            }
                        }
                        appended.fetch_add(batch, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("appender");
        }
    }
}

/// Waits until the read model of every cart reached the store's version, then checks that the
/// cart view and the generic state equal a fold of the stored events: nothing missing, nothing
/// applied twice (the cart totals are increments, so a double apply would show).
pub(crate) async fn assert_read_model_equals_fold(c: &Clients, carts: &[String]) {
    for id in carts {
        let events: Vec<RecordedEvent> = read_all(c, "cart", id)
            .await
            .into_iter()
            .map(to_domain)
            .collect();
        let version = events.last().map_or(0, |e| e.version);
        let expected = CartView::from_doc(&fold(&CartProjection, &events).expect("fold"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let got = loop {
            match c
                .cart_queries
                .clone()
                .get_cart(cart::GetCartRequest {
                    cart_id: id.clone(),
                    min_version: version,
                })
                .await
            {
                Ok(r) => break r.into_inner(),
                Err(s)
                    if matches!(s.code(), Code::DeadlineExceeded | Code::NotFound)
                        && tokio::time::Instant::now() < deadline => {}
                Err(s) => panic!("cart {id} never reached version {version}: {s:?}"),
            }
        };
        assert_eq!(got.version, version, "{id}");
        assert_eq!(got.total_cents, expected.total_cents, "{id} total");
        assert_eq!(got.item_count, expected.item_count, "{id} count");
        let lines: Vec<_> = got
            .items
            .iter()
            .map(|i| (i.sku.clone(), i.quantity, i.unit_price_cents))
            .collect();
        let want: Vec<_> = expected
            .items
            .iter()
            .map(|l| (l.sku.clone(), l.quantity, l.unit_price_cents))
            .collect();
        assert_eq!(lines, want, "{id} lines");
        let state = c
            .state
            .clone()
            .get_state(pb::GetStateRequest {
                stream: stream("cart", id),
                min_version: version,
            })
            .await
            .expect("state")
            .into_inner();
        let want =
            esq::convert::to_struct(state_json(&fold(&StateProjection, &events).expect("fold")));
        assert_eq!(state.state, Some(want), "{id} state");
    }
}

/// kill -9 the projector in the middle of a 10,000-event load, start another: the read model
/// equals a fold of the event store. Nudges are off, so everything goes through the change log,
/// checkpoints and leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_killed_mid_load_recovers() {
    let options = ClusterOptions {
        nudges: false,
        ..ClusterOptions::default()
    };
    let Some(mut h) = harness("projector_killed_mid_load_recovers", options).await else {
        return;
    };
    let load = Load::new(100);
    let c = h.clients.clone();
    let appended = Arc::clone(&load.appended);
    let run = async { load.run(&c, 100, 10).await };
    let kill = async {
        while appended.load(Ordering::Relaxed) < 5_000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = h.projectors.remove(0);
        p.kill9().await.expect("kill -9 projector");
        eprintln!(
            "projector killed after {} events",
            appended.load(Ordering::Relaxed)
        );
        let p = h.spawn("projector").await.expect("restart projector");
        h.projectors.push(p);
    };
    tokio::join!(run, kill);
    assert_eq!(load.appended.load(Ordering::Relaxed), 10_000);
    assert_read_model_equals_fold(&h.clients, &load.carts).await;
}

/// kill -9 one of two write-svc processes in the middle of a load of `any` appends (group-
/// committed notifications in flight, tail caches warm), its writers moving to the other: every
/// acknowledged append is stored exactly once (retries with the same ids are recognised by a
/// process whose cache knows nothing of them), and the projector catches up with all of it —
/// no committed append lacks its notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_svc_killed_mid_load_loses_nothing() {
    let options = ClusterOptions {
        write_services: 2,
        nudges: false,
        ..ClusterOptions::default()
    };
    let Some(mut h) = harness("write_svc_killed_mid_load_loses_nothing", options).await else {
        return;
    };
    let second = Clients::connect(h.writers[1].addr, h.read_addr())
        .await
        .expect("second write-svc");
    let carts: Vec<String> = (0..48).map(|_| unique("wkill")).collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let per_cart = 12;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mine: Vec<String> = carts.iter().skip(t).step_by(16).cloned().collect();
        let clients = [h.clients.events.clone(), second.events.clone()];
        let acked = Arc::clone(&acked);
        tasks.push(tokio::spawn(async move {
            let mut ids: Vec<(String, Vec<String>)> = Vec::new();
            let mut on = 0;
            for round in 0..per_cart {
                for id in &mine {
                    let events: Vec<pb::NewEvent> = (0..2)
                        .map(|i| {
                            let mut e = suite::json_event(
                                "ItemAdded",
                                &format!(
                                    r#"{{"sku":"sku-{}","quantity":1,"unit_price_cents":{}}}"#,
                                    round * 2 + i,
                                    100 + i
                                ),
                            );
                            e.schema_version = 2;
                            e
                        })
                        .collect();
                    let req = pb::AppendRequest {
                        stream: stream("cart", id),
                        expected_version: suite::any(),
                        events,
                    };
                    // On any failure (the killed process, an outcome it could not tell), the
                    // same request goes to the other process: the same ids make it idempotent.
                    let mut tries = 0;
                    loop {
                        match clients[on].clone().append(req.clone()).await {
                            Ok(_) => break,
                            Err(s)
                                if tries < 40
                                    && matches!(
                                        s.code(),
                                        Code::Unavailable
                                            | Code::Unknown
                                            | Code::Cancelled
                                            | Code::DeadlineExceeded
                                    ) =>
                            {
                                tries += 1;
                                if s.code() != Code::Unavailable || tries % 2 == 0 {
                                    on = 1;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(s) => panic!("append to {id} never acknowledged: {s:?}"),
                        }
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                    ids.push((
                        id.clone(),
                        req.events.iter().map(|e| e.event_id.clone()).collect(),
                    ));
                }
            }
            ids
        }));
    }
    while acked.load(Ordering::Relaxed) < 150 && !tasks.iter().any(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.writers
        .remove(0)
        .kill9()
        .await
        .expect("kill -9 write-svc");
    eprintln!(
        "write-svc killed after {} appends",
        acked.load(Ordering::Relaxed)
    );
    let mut acknowledged: Vec<(String, Vec<String>)> = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.expect("appender"));
    }
    assert_eq!(acknowledged.len(), carts.len() * per_cart);
    for id in &carts {
        let stored: Vec<String> = read_all(&second, "cart", id)
            .await
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        let want: Vec<String> = acknowledged
            .iter()
            .filter(|(c, _)| c == id)
            .flat_map(|(_, ids)| ids.clone())
            .collect();
        assert_eq!(
            stored, want,
            "{id}: every acknowledged append, once, in order"
        );
    }
    assert_read_model_equals_fold(&second, &carts).await;
}

/// Two projector processes at once on the same shards give the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_share_the_shards() {
    let options = ClusterOptions {
        projectors: 2,
        ..ClusterOptions::default()
    };
    let Some(h) = harness("two_projectors_share_the_shards", options).await else {
        return;
    };
    let load = Load::new(40);
    load.run(&h.clients, 50, 10).await;
    assert_read_model_equals_fold(&h.clients, &load.carts).await;
    // Both really took part: the shards are split between the two.
    let owners: std::collections::BTreeSet<_> = h
        .lease_owners()
        .await
        .expect("leases")
        .into_iter()
        .collect();
    assert_eq!(owners.len(), 2, "lease owners: {owners:?}");
}

/// Every Redis key of the deployment deleted while it runs: the projector notices and rebuilds
/// the read model from the event store; every query result comes back, the derived read models
/// (books per author, sales per SKU) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_read_model_is_rebuilt() {
    let Some(h) = harness("flushed_read_model_is_rebuilt", ClusterOptions::default()).await else {
        return;
    };
    let load = Load::new(20);
    load.run(&h.clients, 20, 5).await;
    assert_read_model_equals_fold(&h.clients, &load.carts).await;
    let (authors, skus) = derived::derived_traffic(&h.clients).await;
    derived::derived_equal_a_fold_of_the_store(&h.clients, &authors, &skus).await;
    let author = unique("Author");
    let mut isbns = Vec::new();
    for i in 0..5u64 {
        let isbn = format!(
            "979{:010}",
            (uuid::Uuid::new_v4().as_u128() % 9_000_000_000) as u64 + i
        );
        let r = h
            .clients
            .books
            .clone()
            .create_book(book::CreateBookRequest {
                isbn,
                title: format!("T{i}"),
                author: author.clone(),
                price_cents: 100,
                ..Default::default()
            })
            .await
            .expect("create book")
            .into_inner();
        isbns.push(r.isbn);
    }
    let listed = || {
        let mut q = h.clients.book_queries.clone();
        let author = author.clone();
        async move {
            q.list_books(book::ListBooksRequest {
                author,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .books
            .into_iter()
            .map(|b| b.isbn)
            .collect::<Vec<_>>()
        }
    };
    let mut sorted = isbns.clone();
    sorted.sort();
    wait_until(|| async { listed().await == sorted }).await;
    let before = suite::snapshot(&h.clients, &load.carts, &isbns).await;
    let deleted = h.flush_read_model().await.expect("flush");
    assert!(deleted > 0);
    let err = h
        .clients
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: load.carts[0].clone(),
            min_version: 0,
        })
        .await;
    eprintln!(
        "right after the flush: {:?}",
        err.as_ref().map(|_| ()).map_err(|s| s.code())
    );
    assert_read_model_equals_fold(&h.clients, &load.carts).await;
    wait_until(|| async { listed().await == sorted }).await;
    let after = suite::snapshot(&h.clients, &load.carts, &isbns).await;
    assert_eq!(before, after);
    // The derived read models are built again from history too.
    derived::derived_equal_a_fold_of_the_store(&h.clients, &authors, &skus).await;
}

/// Cassandra stopped: appends fail with UNAVAILABLE within their deadline, read-svc keeps
/// answering from Redis; once Cassandra is back, the same write-svc appends again.
///
/// It stops the shared node, so `scripts/test` runs it on its own after the other tests, with
/// `ESQ_TEST_CASSANDRA_DIR` naming the node's folder for `scripts/cassandra.sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_outage_then_recovery() {
    let test = "cassandra_outage_then_recovery";
    let Some(h) = harness(test, ClusterOptions::default()).await else {
        return;
    };
    let dir = std::env::var("ESQ_TEST_CASSANDRA_DIR").unwrap_or_else(|_| {
        panic!("{test} needs ESQ_TEST_CASSANDRA_DIR (the node folder of scripts/cassandra.sh)")
    });
    let port = h
        .backends
        .cassandra
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cassandra.sh");
    let c = &h.clients;
    let id = unique("outage");
    let v = c
        .carts
        .clone()
        .add_item(add(&id, "apple", 1, 10))
        .await
        .expect("add before the outage")
        .into_inner()
        .version;
    let get = |min_version| cart::GetCartRequest {
        cart_id: id.clone(),
        min_version,
    };
    c.cart_queries
        .clone()
        .get_cart(get(v))
        .await
        .expect("projected");

    let status = tokio::process::Command::new(script)
        .args(["stop", &dir])
        .status()
        .await
        .expect("run cassandra.sh stop");
    assert!(status.success(), "cassandra.sh stop failed");

    let append = || pb::AppendRequest {
        stream: stream("outage", &id),
        expected_version: suite::any(),
        events: vec![suite::json_event("Probed", "{}")],
    };
    // The store calls time out after 2 s (ESQ_CQL_TIMEOUT_MS): UNAVAILABLE must come well
    // within the client's deadline.
    let mut req = tonic::Request::new(append());
    req.set_timeout(Duration::from_secs(8));
    let err = c
        .events
        .clone()
        .append(req)
        .await
        .expect_err("append while down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let got = c
        .cart_queries
        .clone()
        .get_cart(get(v))
        .await
        .expect("read-svc answers while Cassandra is down")
        .into_inner();
    assert_eq!(got.version, v);

    let status = tokio::process::Command::new(script)
        .args(["start", &dir, &port])
        .status()
        .await
        .expect("run cassandra.sh start");
    assert!(status.success(), "cassandra.sh start failed");
    let status = tokio::process::Command::new(script)
        .args(["wait", &dir, &port, "240"])
        .status()
        .await
        .expect("run cassandra.sh wait");
    assert!(status.success(), "Cassandra did not come back");

    // `cassandra.sh wait` returns once a real CQL query answers: the resume times count from
    // here.
    let back = tokio::time::Instant::now();

    // The same write-svc process, not restarted: appends succeed again once it has
    // reconnected.
    let deadline = back + Duration::from_secs(120);
    let v2 = loop {
        let r = c.carts.clone().add_item(add(&id, "pear", 1, 20)).await;
        match r {
            Ok(r) => break r.into_inner().version,
            Err(s) if s.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("append after recovery: {s:?}"),
        }
    };
    let write_resumed = back.elapsed();
    assert_eq!(v2, v + 1);

    // The projector, not restarted either, must apply it promptly. Each query waits for
    // `min_version` up to read-svc's maximum (5 s); a slow machine may need several.
    let projected = loop {
        match c.cart_queries.clone().get_cart(get(v2)).await {
            Ok(got) => {
                assert_eq!(got.into_inner().total_cents, 30);
                break back.elapsed();
            }
            Err(s) if s.code() == Code::DeadlineExceeded && back.elapsed() < RESUME_BOUND => {}
            Err(s) => panic!(
                "projected after recovery: {s:?}, {:?} after Cassandra answered",
                back.elapsed()
            ),
        }
    };
    eprintln!(
        "{test}: after Cassandra answered CQL again, write-svc appended in {write_resumed:?} \
         and the projector applied in {projected:?}"
    );
    assert!(
        projected <= RESUME_BOUND,
        "the projector resumed {projected:?} after Cassandra answered, more than {RESUME_BOUND:?}"
    );
    assert_eq!(read_all(c, "cart", &id).await.len() as u64, v2);
}

/// How soon after Cassandra answers CQL again (measured from a real query answered, so the
/// node's own slow start on a loaded machine is not counted) the projector must apply a new
/// append: the issue's 5 s. Measured here: 0.3–1.1 s (a store without connections opens a new
/// session within half a second of a node accepting connections, and the projector retries
/// within a second), against ~11 s when the driver was left to its own reconnect backoff.
const RESUME_BOUND: Duration = Duration::from_secs(5);

/// Polls `check` until it holds, for at most two minutes.
async fn wait_until<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The event bus on Cassandra: catch-up → caught up → live, filters, bad requests, resume
/// across disconnects with 8 concurrent writers, and stalled subscribers' memory in write-svc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_bus_on_cassandra() {
    let Some(h) = harness("event_bus_on_cassandra", ClusterOptions::default()).await else {
        return;
    };
    eprintln!("logs in {}", h.logs().display());
    let c = &h.clients;
    bus::subscribe_catches_up_then_goes_live(c).await;
    bus::subscribe_rejects_bad_requests(c).await;
    bus::subscribe_resumes_without_gap_or_duplicate(c, BUS_EVENTS).await;
    let writer = &h.writers[0];
    let pid = writer.pid().expect("write-svc runs");
    bus::stalled_subscribers_stay_flat(c, writer.addr, pid, 20).await;
}

/// Events written by the 8 writers of the resume test on Cassandra.
const BUS_EVENTS: usize = 10_000;

/// A position older than the change log's TTL answers OUT_OF_RANGE, naming how to resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_bus_position_past_retention_is_out_of_range() {
    let options = ClusterOptions {
        env: vec![("ESQ_CHANGE_TTL_SECS".into(), "3".into())],
        ..ClusterOptions::default()
    };
    let Some(h) = harness("event_bus_position_past_retention_is_out_of_range", options).await
    else {
        return;
    };
    let c = &h.clients;
    let id = unique("old");
    c.events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("bus", &id),
            expected_version: exact(0),
            events: vec![suite::json_event("Happened", "{}")],
        })
        .await
        .expect("append");
    let mut sub = bus::subscribe(
        c,
        pb::SubscribeRequest {
            stream_id_prefix: id.clone(),
            ..Default::default()
        },
    )
    .await;
    let (got, position) = bus::next(&mut sub).await;
    assert_eq!(got, bus::Got::Event(id.clone(), 1, "Happened".into()));
    drop(sub);
    // Within a generous bound the position falls out of the 3 s retention.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let err = loop {
        let req = pb::SubscribeRequest {
            start: bus::after(&position),
            stream_id_prefix: id.clone(),
            ..Default::default()
        };
        match c.events.clone().subscribe(req).await {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(_) => panic!("the position never fell out of the retention"),
        }
    };
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("from_start"), "{err:?}");
}

/// Each binary serves its metrics on its own port: after known traffic the counters of
/// write-svc, read-svc and the two projectors moved by exactly what the traffic implies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_traffic() {
    let options = ClusterOptions {
        projectors: 2,
        ..ClusterOptions::default()
    };
    let Some(h) = harness("metrics_follow_traffic", options).await else {
        return;
    };
    eprintln!("logs in {}", h.logs().display());
    let at = crate::metrics::Endpoints {
        write: h.writers[0].metrics_addr,
        read: h.reader.as_ref().expect("read-svc").metrics_addr,
        projectors: h.projectors.iter().map(|p| p.metrics_addr).collect(),
        shards: ClusterOptions::default().shards,
    };
    crate::metrics::counters_follow_traffic(&h.clients, &at).await;
}

/// A blue/green rebuild of `cart2` while carts are written and queried the whole time, with two
/// projector replicas: no query of a cart that existed answers NOT_FOUND, no cart's version
/// goes back, generation 2 is swapped in and generation 1 deleted, exactly one replica built it
/// and both kept their shards; afterwards the read model equals a fold of the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_writes_and_queries() {
    let options = ClusterOptions {
        projectors: 2,
        ..ClusterOptions::default()
    };
    let Some(h) = harness("rebuild_under_writes_and_queries", options).await else {
        return;
    };
    eprintln!("logs in {}", h.logs().display());
    let before = Load::new(20);
    before.run(&h.clients, 10, 5).await;
    assert_read_model_equals_fold(&h.clients, &before.carts).await;
    // Checked-out carts feed sales per SKU, a derived projection of cart2: it is rebuilt in the
    // same new generation and switched by the same swap.
    let (authors, skus) = derived::derived_traffic(&h.clients).await;
    derived::derived_equal_a_fold_of_the_store(&h.clients, &authors, &skus).await;
    let record = h.generations("cart2").await.expect("record").expect("some");
    assert_eq!(record.active, Some(1), "{record:?}");

    let during = Load::new(20);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let queries = tokio::spawn({
        let (c, stop) = (h.clients.clone(), Arc::clone(&stop));
        let existing = before.carts.clone();
        let new = during.carts.clone();
        async move {
            let mut seen: std::collections::HashMap<String, u64> = Default::default();
            let mut answered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for id in existing.iter().chain(&new) {
                    let r = c
                        .cart_queries
                        .clone()
                        .get_cart(cart::GetCartRequest {
                            cart_id: id.clone(),
                            min_version: 0,
                        })
                        .await;
                    match r {
                        Ok(cart) => {
                            let v = cart.into_inner().version;
                            let last = seen.entry(id.clone()).or_insert(0);
                            assert!(v >= *last, "{id} went back from {last} to {v}");
                            *last = v;
                            answered += 1;
                        }
                        Err(s) if s.code() == Code::NotFound => assert!(
                            !seen.contains_key(id),
                            "{id} existed and answered NOT_FOUND: {s:?}"
                        ),
                        Err(s) => panic!("query of {id}: {s:?}"),
                    }
                }
            }
            answered
        }
    });
    h.request_rebuild("cart2").await.expect("request");
    during.run(&h.clients, 20, 2).await;
    wait_until(|| async {
        let r = h.generations("cart2").await.expect("record").expect("some");
        let done = h
            .rebuild_progress("cart2")
            .await
            .expect("progress")
            .is_some_and(|p| p.contains(r#""state":"done""#));
        r.active == Some(2) && r.building.is_none() && r.retired.is_empty() && done
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let answered = queries.await.expect("queries");
    eprintln!("{answered} queries answered during the rebuild");
    assert!(answered > 0);
    let progress = h
        .rebuild_progress("cart2")
        .await
        .expect("progress")
        .expect("some");
    let progress: serde_json::Value = serde_json::from_str(&progress).expect("json");
    eprintln!("rebuild progress: {progress}");
    assert_eq!(progress["generation"], 2);
    assert_eq!(progress["state"], "done");
    let owner = progress["owner"].as_str().expect("owner");
    assert!(owner.starts_with(&h.prefix), "{owner}");
    let owners: std::collections::BTreeSet<_> = h
        .lease_owners()
        .await
        .expect("leases")
        .into_iter()
        .collect();
    assert_eq!(owners.len(), 2, "both replicas keep projecting: {owners:?}");
    assert_read_model_equals_fold(&h.clients, &before.carts).await;
    assert_read_model_equals_fold(&h.clients, &during.carts).await;
    let store = h.read_store().await.expect("store");
    let (old, _) = esq_readstore::ReadStore::doc_ids_page(&store, "cart2:g1", None, 100)
        .await
        .expect("page");
    assert!(old.is_empty(), "generation 1 deleted: {old:?}");
    derived::derived_equal_a_fold_of_the_store(&h.clients, &authors, &skus).await;
    let (old, _) = esq_readstore::ReadStore::doc_ids_page(&store, "sku_sales:g1", None, 100)
        .await
        .expect("page");
    assert!(old.is_empty(), "derived generation 1 deleted: {old:?}");
    let (new, _) = esq_readstore::ReadStore::doc_ids_page(&store, "sku_sales:g2", None, 100)
        .await
        .expect("page");
    // (Some of `skus` read as absent by design: no checked-out cart holds them.)
    assert!(
        new.iter().all(|sku| skus.contains(sku)) && !new.is_empty(),
        "generation 2 of sku_sales holds the traffic's SKUs {skus:?}: {new:?}"
    );
}

/// A document changed behind the projector's back (an HSET in Redis): verify finds it, repair
/// re-projects it, and verify is clean again (through the `esq` CLI and the projector's
/// esq.v1.Projections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_tampered_doc_and_repair_fixes_it() {
    let Some(h) = harness(
        "verify_finds_a_tampered_doc_and_repair_fixes_it",
        ClusterOptions::default(),
    )
    .await
    else {
        return;
    };
    eprintln!("logs in {}", h.logs().display());
    let esq = crate::operator::Esq::new(h.writers[0].addr, h.projectors[0].addr);
    let load = Load::new(5);
    load.run(&h.clients, 4, 2).await;
    assert_read_model_equals_fold(&h.clients, &load.carts).await;
    let clean = esq.json(0, &["projections", "verify", "cart2"]).await;
    assert_eq!(clean["clean"], true, "{clean}");
    let record = h.generations("cart2").await.expect("record").expect("some");
    let generation = record.active.expect("active");
    let id = &load.carts[0];
    let client = redis::Client::open(h.backends.redis.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!("{}:cart2:g{generation}:{{{id}}}", h.prefix);
    let () = redis::cmd("HSET")
        .arg(&key)
        .arg("tampered")
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("hset");
    let report = esq
        .json(1, &["projections", "verify", "cart2", "--examples", "5"])
        .await;
    assert_eq!(report["different"], 1, "{report}");
    assert_eq!(report["missing"], 0, "{report}");
    assert_eq!(report["extra"], 0, "{report}");
    let example = &report["examples"][0];
    assert_eq!(example["doc_id"], id.as_str(), "{report}");
    assert!(
        example["detail"]
            .as_str()
            .is_some_and(|d| d.contains("tampered")),
        "{report}"
    );
    let repaired = esq
        .json(1, &["projections", "verify", "cart2", "--repair"])
        .await;
    assert_eq!(repaired["repaired"], 1, "{repaired}");
    let again = esq.json(0, &["projections", "verify", "cart2"]).await;
    assert_eq!(again["clean"], true, "{again}");
    assert_read_model_equals_fold(&h.clients, &load.carts).await;
}
