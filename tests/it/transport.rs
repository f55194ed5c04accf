//! Transport hardening over real gRPC on the dev stack: status hygiene, bounded buffers for
//! stalled readers, shutdown within the grace period with stalled readers open.

use crate::suite::{any, stream, unique};
use esq::pb::v1 as pb;
use esq_testkit::fuzz::RawCodec;
use esq_testkit::DevHarness;
use std::time::{Duration, Instant};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A unary call of `path` with `body` as the message bytes.
async fn raw_unary(channel: Channel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

fn event(data: Vec<u8>) -> pb::NewEvent {
    pb::NewEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        r#type: "Blob".into(),
        schema_version: 1,
        content_type: "application/octet-stream".into(),
        payload: Some(pb::new_event::Payload::Data(data)),
        ..Default::default()
    }
}

/// Malformed bodies are INVALID_ARGUMENT on every service, oversize messages
/// RESOURCE_EXHAUSTED (transport and domain limits alike), and no message echoes a huge input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_are_mapped_and_short() {
    let h = DevHarness::start().await.expect("start dev stack");
    let c = &h.clients;
    // Field 1 with wire type 7, which does not exist.
    let malformed = vec![0x0f, 0x01, 0x02];
    for (channel, path) in [
        (c.write_channel.clone(), "/esq.v1.EventStore/Append"),
        (c.read_channel.clone(), "/esq.cart.v1.CartQueries/GetCart"),
    ] {
        let err = raw_unary(channel, path, malformed.clone())
            .await
            .expect_err("malformed");
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
    }
    // Over the server's decoding limit (5 MiB).
    let huge = vec![0u8; 6 << 20];
    let err = raw_unary(c.write_channel.clone(), "/esq.v1.EventStore/Append", huge)
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().len() <= 1024);

    let mut events = c.events.clone();
    // Over the domain's limit on one append (3 MiB), under the transport's.
    let err = events
        .append(pb::AppendRequest {
            stream: stream("blob", &unique("big")),
            expected_version: any(),
            events: (0..7).map(|_| event(vec![1; 512 * 1024])).collect(),
        })
        .await
        .expect_err("append too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("events"), "{err:?}");

    // A 3 MiB metadata key: refused, and only a short prefix of it quoted.
    let mut e = event(vec![1]);
    e.metadata.insert("k".repeat(3 << 20), "v".into());
    let err = events
        .append(pb::AppendRequest {
            stream: stream("blob", &unique("meta")),
            expected_version: any(),
            events: vec![e],
        })
        .await
        .expect_err("metadata key too long");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().len() < 512,
        "message of {} bytes",
        err.message().len()
    );
    h.stop().await.expect("stop");
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

const STALLED_READERS: usize = 5;
const BIG_EVENTS: usize = 1500;
const BIG_EVENT_BYTES: usize = 64 * 1024;
/// What the stalled readers may add to resident memory, in total.
const STALLED_BUDGET: u64 = 16 << 20;

/// Runs [`stalled_readers_inner`] in a process of its own, so that no other test's allocations
/// land in the resident memory it measures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_hold_a_small_fixed_buffer() {
    crate::suite::run_alone("transport::stalled_readers_inner").await;
}

/// Five ReadStream calls on a 1500 × 64 KiB stream that take one message and then never grant
/// flow-control window add at most 16 MiB of resident memory; and the stack stops within its
/// grace period although they are still open. Run by [`stalled_readers_hold_a_small_fixed_buffer`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures this process's memory: run alone by stalled_readers_hold_a_small_fixed_buffer"]
async fn stalled_readers_inner() {
    let grace = Duration::from_secs(2);
    let h = DevHarness::start_with(|c| c.shutdown_grace = grace)
        .await
        .expect("start dev stack");
    let id = unique("big");
    let mut events = h.clients.events.clone();
    let per_append = 40; // 2.5 MiB, under the 3 MiB per-append limit
    let mut written = 0;
    while written < BIG_EVENTS {
        let n = per_append.min(BIG_EVENTS - written);
        events
            .append(pb::AppendRequest {
                stream: stream("blob", &id),
                expected_version: any(),
                events: (0..n)
                    .map(|i| event(vec![(written + i) as u8; BIG_EVENT_BYTES]))
                    .collect(),
            })
            .await
            .expect("append");
        written += n;
    }
    // One full read first: the store's cache and the allocator reach their working size before
    // the baseline is taken, so the growth measured is what the stalled readers hold.
    let all = crate::suite::read_all(&h.clients, "blob", &id).await;
    assert_eq!(all.len(), BIG_EVENTS);
    drop(all);

    // A client that grants the least window HTTP/2 allows and never reads past the first message.
    let addr = h.write_addr().expect("running");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535 * STALLED_READERS as u32 * 2)
        .connect()
        .await
        .expect("connect");
    let base = rss();
    let mut readers = Vec::new();
    for _ in 0..STALLED_READERS {
        let mut client = pb::event_store_client::EventStoreClient::new(channel.clone());
        let mut s = client
            .read_stream(pb::ReadStreamRequest {
                stream: stream("blob", &id),
                ..Default::default()
            })
            .await
            .expect("read_stream")
            .into_inner();
        s.message().await.expect("first").expect("an event");
        readers.push(s);
    }
    // Wait until the producers are blocked: resident memory unchanged (within 1 MiB) over ten
    // consecutive checks, within a generous bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut steady) = (rss(), 0);
    while steady < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss();
        steady = if now.abs_diff(last) < (1 << 20) {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    let grown = rss().saturating_sub(base);
    eprintln!(
        "{STALLED_READERS} stalled readers added {:.1} MiB of RSS",
        grown as f64 / (1 << 20) as f64
    );
    assert!(
        grown <= STALLED_BUDGET,
        "stalled readers added {grown} bytes of RSS"
    );

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), h.stop())
        .await
        .expect("the stack stops despite stalled readers")
        .expect("stop");
    eprintln!(
        "stopped with {} stalled readers in {:?}",
        readers.len(),
        started.elapsed()
    );
}
