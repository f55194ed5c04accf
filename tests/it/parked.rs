//! Parked (poison) streams on the distributed deployment: an event the cart projection cannot
//! apply parks its stream while a thousand other streams flow; the operator lists it, retries
//! it after a fix, and skips another. The operator calls go through a `Projector` built in this
//! process over the same keyspace and Redis prefix (it never runs): its methods read and write
//! the records every replica shares in the read store.

use crate::suite::{add, unique};
use esq::pb::cart::v1 as cart;
use esq_domain::{ExpectedVersion, NewEvent, StreamId};
use esq_eventstore::cql::{CqlConfig, CqlStore};
use esq_eventstore::EventStore;
use esq_projector::ops::RetryOutcome;
use esq_projector::{Config, Projector};
use esq_readstore::redis::{RedisConfig, RedisStore};
use esq_testkit::cluster::{Backends, ClusterHarness, ClusterOptions};
use esq_testkit::Clients;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// The cart as read-svc serves it once it reached `version` (waiting up to two minutes).
async fn cart_at(c: &Clients, id: &str, version: u64) -> cart::Cart {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match c
            .cart_queries
            .clone()
            .get_cart(cart::GetCartRequest {
                cart_id: id.to_owned(),
                min_version: version,
            })
            .await
        {
            Ok(r) => return r.into_inner(),
            Err(s)
                if matches!(s.code(), Code::DeadlineExceeded | Code::NotFound)
                    && Instant::now() < deadline => {}
            Err(s) => panic!("cart {id} never reached version {version}: {s:?}"),
        }
    }
}

/// Waits (up to two minutes) until `check` holds.
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_streams_park_while_others_flow() {
    let test = "poison_streams_park_while_others_flow";
    let Some(backends) = Backends::from_env(test) else {
        return;
    };
    let h = ClusterHarness::start(backends, ClusterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot start the deployment: {e:#}"));
    eprintln!("logs in {}", h.logs().display());
    let c = &h.clients;
    // The same settings the harness gives its processes.
    let mut cql = CqlConfig::new(vec![h.backends.cassandra.clone()], h.keyspace.clone());
    cql.shard_count = 4;
    cql.confidence_window = Duration::from_millis(1000);
    cql.request_timeout = Duration::from_secs(2);
    cql.append_deadline = Duration::from_secs(6);
    let store = Arc::new(CqlStore::connect(cql).await.expect("cql"));
    let redis = RedisStore::connect(RedisConfig {
        urls: vec![h.backends.redis.clone()],
        prefix: h.prefix.clone(),
        ..RedisConfig::default()
    })
    .await
    .expect("redis");
    let admin = Projector::new(
        Arc::clone(&store),
        Arc::clone(&store),
        Arc::new(redis),
        Config::default(),
    );
    // The generations it writes to (its run loop would read them at its first renewal).
    admin.refresh_generations(false).await.expect("generations");
    let raw = redis::Client::open(h.backends.redis.as_str()).expect("redis url");
    let mut conn = raw
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");

    // Poison 1: the read store refuses the apply (the cart's document key holds a string).
    let wrong = unique("wrongtype");
    c.carts
        .clone()
        .add_item(add(&wrong, "apple", 1, 100))
        .await
        .expect("add");
    cart_at(c, &wrong, 1).await;
    // Generation 1 is the active generation of a fresh deployment.
    let doc_key = format!("{}:cart2:g1:{{{wrong}}}", h.prefix);
    let _: () = redis::cmd("SET")
        .arg(&doc_key)
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .expect("SET");
    c.carts
        .clone()
        .add_item(add(&wrong, "pear", 1, 200))
        .await
        .expect("add");
    // Poison 2: an event at a schema version no upcaster knows, appended to the event store
    // directly (as an old or foreign writer could).
    let schema = unique("schema");
    let schema_stream = StreamId::new("cart", &schema).expect("stream");
    let item = |version: u32| {
        NewEvent::json(
            "ItemAdded",
            version,
            &serde_json::json!({"sku": "apple", "quantity": 1, "unit_price_cents": 100}),
        )
    };
    store
        .append(
            &schema_stream,
            ExpectedVersion::NoStream,
            &[item(2), item(9)],
        )
        .await
        .expect("append");

    // A thousand other streams, 16 writers at once.
    let others: Arc<Vec<String>> = Arc::new((0..1000).map(|_| unique("flow")).collect());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (others, mut carts) = (Arc::clone(&others), c.carts.clone());
        tasks.push(tokio::spawn(async move {
            for id in others.iter().skip(t).step_by(16) {
                carts.add_item(add(id, "apple", 1, 1)).await.expect("add");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    for id in others.iter() {
        assert_eq!(cart_at(c, id, 1).await.version, 1);
    }
    eprintln!(
        "1,000 other streams appended and projected in {:?} past the poison",
        started.elapsed()
    );

    // Both poisoned streams are listed, with version and reason.
    wait_for("two parked streams", || async {
        admin.parked_count("cart2").await.expect("count") == 2
    })
    .await;
    let parked = admin.parked(Some("cart2"), 10).await.expect("parked");
    let by_id = |id: &str| {
        parked
            .iter()
            .find(|p| p.stream.id == id)
            .unwrap_or_else(|| panic!("{id} not parked: {parked:?}"))
            .clone()
    };
    let w = by_id(&wrong);
    assert!(w.reason.contains("WRONGTYPE"), "{w:?}");
    // The document's version could not be read: the refused batch started at version 1.
    assert_eq!(w.version, 1);
    let s = by_id(&schema);
    assert_eq!(s.version, 2);
    assert!(s.reason.contains("schema"), "{s:?}");
    assert_eq!(admin.parked(None, 10).await.expect("parked").len(), 2);

    // Retrying before the fix changes nothing; after it, the stream resumes.
    let wrong_stream = StreamId::new("cart", &wrong).expect("stream");
    assert!(matches!(
        admin.retry_parked("cart2", &wrong_stream).await.expect("retry"),
        RetryOutcome::StillParked(reason) if reason.contains("WRONGTYPE")
    ));
    let _: i64 = redis::cmd("DEL")
        .arg(&doc_key)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    assert_eq!(
        admin
            .retry_parked("cart2", &wrong_stream)
            .await
            .expect("retry"),
        RetryOutcome::Resumed
    );
    let resumed = cart_at(c, &wrong, 2).await;
    assert_eq!((resumed.version, resumed.item_count), (2, 2));

    // The other one is skipped: a no-op for the cart view, recorded with its reason.
    assert!(admin
        .skip_parked("cart2", &schema_stream, 2, "written by a broken importer")
        .await
        .expect("skip"));
    let skipped = cart_at(c, &schema, 2).await;
    assert_eq!((skipped.version, skipped.item_count), (2, 1));
    assert_eq!(
        admin
            .skipped_versions("cart2", &schema_stream)
            .await
            .expect("skips"),
        [2]
    );
    assert_eq!(admin.parked_count("cart2").await.expect("count"), 0);
    // And the aggregate's own fold names the unreadable event instead of deciding on it.
    let err = c
        .carts
        .clone()
        .add_item(add(&schema, "pear", 1, 1))
        .await
        .expect_err("the stream holds an unreadable event");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("version 9") || err.message().contains("schema"),
        "{err:?}"
    );
}

/// The same on `esq dev` where it applies (its read store is in memory, so only an unreadable
/// event can poison): an event at a schema version no upcaster knows, written to the embedded
/// store while the stack is down, parks its stream in the rebuild at start, while other streams
/// flow; the executor names the unreadable event; esq.v1.Projections (on the read address)
/// lists it, a retry leaves it parked, a skip lets the cart view past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_stream_parks_on_dev_while_others_flow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = esq_testkit::DevHarness::start_in(dir.path())
        .await
        .expect("start dev stack");
    let poisoned = unique("schema");
    h.clients
        .carts
        .clone()
        .add_item(add(&poisoned, "apple", 1, 100))
        .await
        .expect("add");
    cart_at(&h.clients, &poisoned, 1).await;
    h.stop().await.expect("stop");
    {
        let store = esq_eventstore::embedded::EmbeddedStore::open(dir.path()).expect("open");
        let event = NewEvent::json(
            "ItemAdded",
            9,
            &serde_json::json!({"sku": "pear", "quantity": 1, "unit_price_cents": 1}),
        );
        let stream = StreamId::new("cart", &poisoned).expect("stream");
        store
            .append(&stream, ExpectedVersion::Exact(1), &[event])
            .await
            .expect("append");
    }
    let h = esq_testkit::DevHarness::start_in(dir.path())
        .await
        .expect("restart dev stack");
    // The rebuild at start applied the readable event and parked the stream at the other.
    assert_eq!(cart_at(&h.clients, &poisoned, 1).await.version, 1);
    let mut tasks = Vec::new();
    let others: Arc<Vec<String>> = Arc::new((0..200).map(|_| unique("flow")).collect());
    for t in 0..8 {
        let (others, mut carts) = (Arc::clone(&others), h.clients.carts.clone());
        tasks.push(tokio::spawn(async move {
            for id in others.iter().skip(t).step_by(8) {
                carts.add_item(add(id, "apple", 1, 1)).await.expect("add");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    for id in others.iter() {
        assert_eq!(cart_at(&h.clients, id, 1).await.version, 1);
    }
    assert_eq!(
        cart_at(&h.clients, &poisoned, 0).await.version,
        1,
        "the cart view stays parked before the unreadable event"
    );
    let err = h
        .clients
        .carts
        .clone()
        .add_item(add(&poisoned, "pear", 1, 1))
        .await
        .expect_err("the stream holds an unreadable event");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("version 2"), "{err:?}");
    // Operated through esq.v1.Projections.
    let channel = esq_testkit::channel(h.read_addr().expect("running"))
        .await
        .expect("connect");
    let mut admin = esq::pb::v1::projections_client::ProjectionsClient::new(channel);
    let listed = admin
        .list_parked(esq::pb::v1::ListParkedRequest {
            projection: "cart2".into(),
            limit: 10,
        })
        .await
        .expect("list")
        .into_inner()
        .parked;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (
            listed[0].stream.as_ref().map(|s| s.id.as_str()),
            listed[0].version
        ),
        (Some(poisoned.as_str()), 2)
    );
    assert!(listed[0].reason.contains("schema"), "{:?}", listed[0]);
    let stream_ref = crate::suite::stream("cart", &poisoned);
    let retried = admin
        .retry_parked(esq::pb::v1::RetryParkedRequest {
            projection: "cart2".into(),
            stream: stream_ref.clone(),
        })
        .await
        .expect("retry")
        .into_inner();
    assert!(
        !retried.resumed && retried.reason.contains("schema"),
        "{retried:?}"
    );
    admin
        .skip_parked(esq::pb::v1::SkipParkedRequest {
            projection: "cart2".into(),
            stream: stream_ref,
            version: 2,
            reason: "written by a broken importer".into(),
        })
        .await
        .expect("skip");
    let skipped = cart_at(&h.clients, &poisoned, 2).await;
    assert_eq!((skipped.version, skipped.item_count), (2, 1));
    let listed = admin
        .list_parked(esq::pb::v1::ListParkedRequest {
            projection: String::new(),
            limit: 10,
        })
        .await
        .expect("list")
        .into_inner()
        .parked;
    assert!(listed.is_empty(), "{listed:?}");
    // The generic state view reads any JSON object, so it is not held back.
    let state = h
        .clients
        .state
        .clone()
        .get_state(esq::pb::v1::GetStateRequest {
            stream: crate::suite::stream("cart", &poisoned),
            min_version: 2,
        })
        .await
        .expect("state")
        .into_inner();
    assert_eq!(state.version, 2);
    h.stop().await.expect("stop");
}
