//! Aggregate snapshots in the running system: a long cart keeps answering correctly — its
//! commands decided on the exact state, command retries recognised, queries right — across a
//! restart of write-svc with snapshots present (`esq dev` over redb; write-svc over Cassandra,
//! killed with SIGKILL and started again).

use crate::suite::{add, unique};
use esq::pb::cart::v1 as cart;
use esq_domain::cart::Cart;
use esq_domain::snapshot::fingerprint;
use esq_domain::StreamId;
use esq_eventstore::Snapshots;
use esq_testkit::cluster::{wait_serving, Backends, ClusterHarness, ClusterOptions};
use esq_testkit::{Clients, DevHarness};
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Code;

/// Items added before the restart: past two snapshot intervals of the default (100).
const ADDS: u64 = 230;
const SKUS: [&str; 3] = ["a", "b", "c"];

/// What the cart must hold: units per SKU.
type Model = BTreeMap<&'static str, i64>;

/// Runs `call` until it answers something else than UNAVAILABLE (an overloaded store on a
/// busy machine; every command here carries a command id, so a retry is safe), for a minute.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(e) if e.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                eprintln!("retrying after {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// AddItem with `command_id`, retried on UNAVAILABLE; the cart's version afterwards.
async fn add_with_id(c: &Clients, id: &str, sku: &str, command_id: &str) -> u64 {
    let mut request = add(id, sku, 1, 10);
    request.command_id = command_id.into();
    retrying(|| {
        let (mut carts, request) = (c.carts.clone(), request.clone());
        async move { carts.add_item(request).await }
    })
    .await
    .expect("add")
    .version
}

/// RemoveItem with `command_id`, retried on UNAVAILABLE.
async fn remove_with_id(
    c: &Clients,
    id: &str,
    sku: &str,
    quantity: i64,
    command_id: &str,
) -> Result<u64, tonic::Status> {
    let request = cart::RemoveItemRequest {
        cart_id: id.into(),
        sku: sku.into(),
        quantity,
        command_id: command_id.into(),
        ..Default::default()
    };
    retrying(|| {
        let (mut carts, request) = (c.carts.clone(), request.clone());
        async move { carts.remove_item(request).await }
    })
    .await
    .map(|r| r.version)
}

/// Adds [`ADDS`] items to `id` (each command with an id of its own), returning the model.
async fn fill(c: &Clients, id: &str) -> Model {
    let mut model = Model::new();
    for i in 0..ADDS {
        let sku = SKUS[(i % 3) as usize];
        let version = add_with_id(c, id, sku, &format!("cmd-{i}")).await;
        assert_eq!(version, i + 1);
        *model.entry(sku).or_default() += 1;
    }
    model
}

/// After the restart: retries recognised, the rules decided on the exact state, the query
/// equal to the model.
async fn check_after_restart(c: &Clients, id: &str, mut model: Model) {
    // A retry of a command folded into the snapshot long ago: its original version, nothing
    // appended.
    assert_eq!(
        add_with_id(c, id, "a", "cmd-3").await,
        4,
        "the retry answers the original's version"
    );

    // Removing one unit more than the cart holds is refused; exactly what it holds is not.
    let held = model["b"];
    let too_many = remove_with_id(c, id, "b", held + 1, "too-many")
        .await
        .expect_err("more than the cart holds");
    assert_eq!(too_many.code(), Code::FailedPrecondition, "{too_many:?}");
    let mut version = remove_with_id(c, id, "b", held, "all-of-b")
        .await
        .expect("remove all of b");
    assert_eq!(version, ADDS + 1);
    model.remove("b");
    for i in 0..5 {
        version = add_with_id(c, id, "c", &format!("after-{i}")).await;
        assert_eq!(version, ADDS + 2 + i);
        *model.entry("c").or_default() += 1;
    }
    let view = c
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.into(),
            min_version: version,
        })
        .await
        .expect("get cart")
        .into_inner();
    assert_eq!(view.version, version);
    let lines: BTreeMap<String, i64> = view
        .items
        .iter()
        .map(|l| (l.sku.clone(), l.quantity))
        .collect();
    let expected: BTreeMap<String, i64> =
        model.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    assert_eq!(lines, expected);
    assert_eq!(view.total_cents, expected.values().sum::<i64>() * 10);
}

/// Waits (bounded) until the store holds a snapshot of `stream` at `at_least` or later, of the
/// cart fingerprint (snapshots are written in the background).
async fn snapshot_present<S: Snapshots>(store: &S, stream: &StreamId, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let found = store.read_snapshot(stream).await.expect("read snapshot");
        match found {
            Some(s) if s.version >= at_least => {
                assert_eq!(&*s.fingerprint, &*fingerprint::<Cart>());
                return s.version;
            }
            other if tokio::time::Instant::now() >= deadline => {
                panic!("no snapshot of {stream} at ≥ {at_least}: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_cart_answers_across_a_restart_with_snapshots_dev() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = DevHarness::start_in(dir.path()).await.expect("start");
    let id = unique("long");
    let model = fill(&h.clients, &id).await;
    // Stop the stack (the store is one process's), look at the snapshot, start again.
    h.stop().await.expect("stop");
    {
        let store = esq_eventstore::embedded::EmbeddedStore::open(dir.path()).expect("open");
        let stream = StreamId::new("cart", &id).expect("valid");
        let version = snapshot_present(&store, &stream, 100).await;
        assert!(version <= ADDS);
    }
    let h = DevHarness::start_in(dir.path()).await.expect("restart");
    check_after_restart(&h.clients, &id, model).await;
    h.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_cart_answers_across_a_restart_with_snapshots_cluster() {
    let test = "a_long_cart_answers_across_a_restart_with_snapshots_cluster";
    let Some(backends) = Backends::from_env(test) else {
        return;
    };
    let mut h = ClusterHarness::start(backends, ClusterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot start the deployment: {e:#}"));
    eprintln!("logs in {}", h.logs().display());
    let id = unique("long");
    let model = fill(&h.clients, &id).await;

    let mut config =
        esq_eventstore::cql::CqlConfig::new(vec![h.backends.cassandra.clone()], &h.keyspace);
    config.request_timeout = Duration::from_secs(10);
    config.confidence_window = Duration::from_secs(1);
    config.append_deadline = Duration::from_secs(25);
    let store = esq_eventstore::cql::CqlStore::connect(config)
        .await
        .expect("connect");
    let stream = StreamId::new("cart", &id).expect("valid");
    snapshot_present(&store, &stream, 100).await;

    // write-svc killed and started again: it starts from the stored snapshot.
    let old = h.writers.remove(0);
    old.kill9().await.expect("kill -9 write-svc");
    let fresh = h.spawn("write-svc").await.expect("spawn write-svc");
    wait_serving(fresh.addr, Duration::from_secs(120))
        .await
        .expect("write-svc serving");
    let clients = Clients::connect(fresh.addr, h.read_addr())
        .await
        .expect("connect");
    h.writers.push(fresh);
    check_after_restart(&clients, &id, model).await;
}
