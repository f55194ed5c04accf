//! Aggregate snapshots through the executor, on both adapters: the embedded store always, the
//! CQL store on the Cassandra node named by `ESQ_TEST_CASSANDRA` (without it these tests
//! panic, unless `ESQ_SKIP_REAL_BACKENDS=1`, which skips them and says so).
//!
//! The property: for raw event sequences of any shape (upcast v1 events, unreadable ones,
//! command ids), the state loaded from a snapshot plus the tail is the state folded from the
//! whole stream. And a snapshot that may not be trusted — another fingerprint, corrupt bytes,
//! ahead of the stream, another event at its version — is ignored: the answer is the full fold.

use esq_domain::cart::{Cart, CartCommand};
use esq_domain::snapshot::{fingerprint, SnapshotState};
use esq_domain::{ExpectedVersion, NewEvent, StreamId};
use esq_eventstore::cql::{CqlConfig, CqlStore};
use esq_eventstore::embedded::EmbeddedStore;
use esq_eventstore::{EventStore, Snapshot, Snapshots};
use esq_write_svc::commands::{CommandOptions, Executor};
use proptest::prelude::*;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cassandra(test: &str) -> Option<String> {
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

async fn cql_store(test: &str, node: &str) -> CqlStore {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let run = (esq_eventstore::now_us() as u64 / 1000) % 1_000_000_000;
    let keyspace = format!(
        "esq_{test}_{run}_{}_{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let mut config = CqlConfig::new(vec![node.to_owned()], keyspace);
    // A busy machine: a roomy window, so no append is refused for a slow change-log row.
    config.confidence_window = Duration::from_secs(5);
    config.request_timeout = Duration::from_secs(10);
    config.append_deadline = Duration::from_secs(30);
    CqlStore::connect(config).await.expect("connect")
}

fn cart(id: &str) -> StreamId {
    StreamId::new("cart", id).expect("valid stream id")
}

fn add(sku: &str) -> CartCommand {
    CartCommand::AddItem {
        sku: sku.into(),
        quantity: 1,
        unit_price_cents: 100,
    }
}

fn options(command_id: &str) -> CommandOptions<'_> {
    CommandOptions {
        expected_version: None,
        command_id,
        deadline: None,
    }
}

/// Appends `events` raw in chunks of `chunk`.
async fn append_raw<S: EventStore>(
    store: &S,
    stream: &StreamId,
    events: &[NewEvent],
    chunk: usize,
) {
    for part in events.chunks(chunk.max(1)) {
        store
            .append(stream, ExpectedVersion::Any, part)
            .await
            .expect("append");
    }
}

/// One case of the property on `store`: the first `at` events, a snapshot, the rest; then the
/// load with snapshots equals the full fold (both the same error if the stream holds an event
/// carts cannot read).
async fn snapshot_plus_tail_case<S: EventStore + Snapshots>(
    store: Arc<S>,
    stream: &StreamId,
    events: &[NewEvent],
    at: usize,
    chunk: usize,
) -> Result<(), TestCaseError> {
    let with = Executor::new(Arc::clone(&store), None).with_snapshot_every(1_000_000);
    let without = Executor::new(Arc::clone(&store), None).with_snapshot_every(0);
    append_raw(&*store, stream, &events[..at], chunk).await;
    let snapshotted = with.snapshot_now::<Cart>(stream).await;
    append_raw(&*store, stream, &events[at..], chunk).await;
    let full = without.state::<Cart>(stream).await;
    let resumed = with.state::<Cart>(stream).await;
    match (&full, &resumed) {
        (Ok((full, used_full)), Ok((resumed, used))) => {
            prop_assert!(!used_full);
            prop_assert_eq!(full, resumed);
            // A snapshot was taken at `at` (the first `at` events all readable), and the stream
            // is longer than the head read: it must have been used.
            if matches!(snapshotted, Ok(Some(_))) && events.len() >= 32 {
                prop_assert!(used, "the snapshot at {} was not used", at);
            }
        }
        (Err(a), Err(b)) => {
            prop_assert_eq!(a.code(), b.code());
            prop_assert_eq!(a.message(), b.message());
        }
        (a, b) => prop_assert!(false, "full fold {a:?} but from the snapshot {b:?}"),
    }
    Ok(())
}

fn property_strategy() -> impl Strategy<Value = (Vec<NewEvent>, prop::sample::Index, usize)> {
    (
        prop::collection::vec(esq_domain::arbitrary::raw_cart_event(), 30..90),
        any::<prop::sample::Index>(),
        1usize..12,
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Cart events only carts can read: the unreadable ones out (a stream holding one cannot be
/// snapshotted past it, which the mixed property covers).
fn readable(events: Vec<NewEvent>) -> Vec<NewEvent> {
    events
        .into_iter()
        .filter(|e| {
            !(e.event_type == "Renamed" || (e.event_type == "ItemAdded" && e.schema_version == 3))
        })
        .collect()
}

/// The generators repeat events (with their ids): each gets an id of its own.
fn fresh_ids(mut events: Vec<NewEvent>) -> Vec<NewEvent> {
    for e in &mut events {
        e.event_id = uuid::Uuid::now_v7();
    }
    events
}

#[test]
fn snapshot_plus_tail_is_the_full_fold_embedded() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("open"));
    let n = AtomicU32::new(0);
    let config = ProptestConfig::with_cases(48);
    proptest!(config, |((events, at, chunk) in property_strategy(), only_readable in any::<bool>())| {
        let events = fresh_ids(if only_readable { readable(events) } else { events });
        let stream = cart(&format!("p{}", n.fetch_add(1, Ordering::Relaxed)));
        let at = at.index(events.len() + 1);
        rt.block_on(snapshot_plus_tail_case(Arc::clone(&store), &stream, &events, at, chunk))?;
    });
}

#[test]
fn snapshot_plus_tail_is_the_full_fold_cql() {
    let Some(node) = cassandra("snapshot_plus_tail_is_the_full_fold_cql") else {
        return;
    };
    let rt = runtime();
    let store = Arc::new(rt.block_on(cql_store("snapprop", &node)));
    let n = AtomicU32::new(0);
    let config = ProptestConfig::with_cases(12);
    proptest!(config, |((events, at, chunk) in property_strategy(), only_readable in any::<bool>())| {
        let events = fresh_ids(if only_readable { readable(events) } else { events });
        let stream = cart(&format!("p{}", n.fetch_add(1, Ordering::Relaxed)));
        let at = at.index(events.len() + 1);
        rt.block_on(snapshot_plus_tail_case(Arc::clone(&store), &stream, &events, at, chunk))?;
    });
}

/// Snapshots that must not be trusted are ignored, and command retries stay exact across a
/// snapshot; background snapshots are taken every N events.
async fn untrusted_snapshots_are_ignored<S: EventStore + Snapshots>(store: Arc<S>) {
    let every = 10;
    let executor = Executor::new(Arc::clone(&store), None).with_snapshot_every(every);
    let full = Executor::new(Arc::clone(&store), None).with_snapshot_every(0);
    let stream = cart("long");
    let first = executor
        .execute::<Cart>(&stream, &add("A"), options("first-command"))
        .await
        .expect("add");
    assert_eq!(first, 1);
    for i in 0..59 {
        let sku = ["A", "B", "C"][i % 3];
        executor
            .execute::<Cart>(&stream, &add(sku), options(""))
            .await
            .expect("add");
    }

    // Background snapshots were written (best effort, but nothing competes here).
    let deadline = Instant::now() + Duration::from_secs(30);
    let written = loop {
        match store.read_snapshot(&stream).await.expect("read") {
            Some(s) if s.version >= 50 => break s,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("no snapshot at ≥ 50 written in the background: {other:?}"),
        }
    };
    assert_eq!(&*written.fingerprint, &*fingerprint::<Cart>());
    let (truth, used) = full.state::<Cart>(&stream).await.expect("full fold");
    assert!(!used);
    assert_eq!(truth.version, 60);
    let (state, used) = executor.state::<Cart>(&stream).await.expect("load");
    assert!(used, "the background snapshot is used");
    assert_eq!(state, truth);

    // A retry of the first command, long folded into the snapshot, is still recognised: it
    // answers the original version and appends nothing.
    let again = executor
        .execute::<Cart>(&stream, &add("A"), options("first-command"))
        .await
        .expect("retry");
    assert_eq!(again, 1);
    assert_eq!(
        full.state::<Cart>(&stream).await.expect("fold").0.version,
        60
    );

    // Untrusted snapshots, on a stream no background snapshot is written to (`full` writes
    // none, `reader` only when asked): each is ignored, and the answer is the full fold.
    let reader = Executor::new(Arc::clone(&store), None).with_snapshot_every(1_000_000);
    let stream = cart("long2");
    for i in 0..60 {
        let sku = ["A", "B", "C"][i % 3];
        full.execute::<Cart>(&stream, &add(sku), options(""))
            .await
            .expect("add");
    }
    assert_eq!(
        reader
            .snapshot_now::<Cart>(&stream)
            .await
            .expect("snapshot"),
        Some(60)
    );
    let written = store
        .read_snapshot(&stream)
        .await
        .expect("read")
        .expect("written");
    let (truth, _) = full.state::<Cart>(&stream).await.expect("full fold");
    let (state, used) = reader.state::<Cart>(&stream).await.expect("load");
    assert!(used);
    assert_eq!(state, truth);

    // A snapshot that would give a wrong answer if trusted: the state of another cart.
    let other = cart("other");
    executor
        .execute::<Cart>(&other, &add("Z"), options(""))
        .await
        .expect("add");
    let mut wrong = SnapshotState {
        folded: full.state::<Cart>(&other).await.expect("fold").0,
        ..SnapshotState::default()
    };
    wrong
        .folded
        .doc
        .insert("_v".into(), written.version.to_string());
    wrong.folded.version = written.version;
    let lie = |fingerprint: &str, state: Vec<u8>, version: u64, event_id| Snapshot {
        version,
        event_id,
        fingerprint: fingerprint.to_owned(),
        state,
    };
    let good_bytes = written.state.clone();
    let mut corrupt = good_bytes.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x20;
    let cases = [
        (
            "another fingerprint",
            lie(
                "cart-0000000000000000",
                wrong.encode(),
                written.version,
                written.event_id,
            ),
        ),
        (
            "corrupt bytes",
            lie(
                &fingerprint::<Cart>(),
                corrupt,
                written.version,
                written.event_id,
            ),
        ),
        (
            "ahead of the stream",
            lie(
                &fingerprint::<Cart>(),
                {
                    let mut ahead = SnapshotState::default();
                    ahead.folded.doc.insert("_v".into(), "500".into());
                    ahead.folded.version = 500;
                    ahead.encode()
                },
                500,
                written.event_id,
            ),
        ),
        (
            "another event at its version",
            lie(
                &fingerprint::<Cart>(),
                good_bytes.clone(),
                written.version,
                uuid::Uuid::new_v4(),
            ),
        ),
    ];
    for (what, snapshot) in cases {
        store
            .write_snapshot(&stream, &snapshot)
            .await
            .expect("write");
        let (state, used) = full
            .state::<Cart>(&stream)
            .await
            .expect("full fold ignores snapshots");
        assert!(!used);
        assert_eq!(state, truth);
        let (state, used) = reader.state::<Cart>(&stream).await.expect("load");
        assert!(!used, "{what}: the snapshot must be ignored");
        assert_eq!(state, truth, "{what}: the answer is the full fold");
    }
    // And the genuine snapshot is used again.
    store
        .write_snapshot(&stream, &written)
        .await
        .expect("write");
    let (state, used) = reader.state::<Cart>(&stream).await.expect("load");
    assert!(used);
    assert_eq!(state, truth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_snapshots_are_ignored_embedded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("open"));
    untrusted_snapshots_are_ignored(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_snapshots_are_ignored_cql() {
    let Some(node) = cassandra("untrusted_snapshots_are_ignored_cql") else {
        return;
    };
    let store = Arc::new(cql_store("snapuntrusted", &node).await);
    untrusted_snapshots_are_ignored(store).await;
}
