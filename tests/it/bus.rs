//! The event bus (`esq.v1.EventStore/Subscribe`): backend-agnostic scenarios, run on the dev
//! stack by `dev.rs` and on Cassandra + Redis by `cluster.rs`.

use crate::suite::{exact, json_event, stream, unique};
use esq::pb::v1 as pb;
use esq_testkit::Clients;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tonic::{Code, Streaming};

/// Generous bound on any wait for a subscription message (a busy 2-core machine, Cassandra).
const WAIT: Duration = Duration::from_secs(60);

type Sub = Streaming<pb::SubscribeResponse>;

/// What a subscription received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// `(stream id, version, event type)`.
    Event(String, u64, String),
    /// The caught-up marker.
    CaughtUp,
}

pub fn after(position: &str) -> Option<pb::subscribe_request::Start> {
    Some(pb::subscribe_request::Start::After(position.to_owned()))
}

pub async fn subscribe(c: &Clients, req: pb::SubscribeRequest) -> Sub {
    c.events
        .clone()
        .subscribe(req)
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next message (panics on an error, the end of the stream, or after [`WAIT`]) and the
/// position it carries.
pub async fn next(sub: &mut Sub) -> (Got, String) {
    let m = tokio::time::timeout(WAIT, sub.message())
        .await
        .expect("a subscription message in time")
        .expect("subscription ok")
        .expect("the subscription goes on");
    let got = match m.message {
        Some(pb::subscribe_response::Message::Event(e)) => {
            let s = e.stream.expect("stream");
            Got::Event(s.id, e.version, e.r#type)
        }
        Some(pb::subscribe_response::Message::CaughtUp(_)) => Got::CaughtUp,
        None => panic!("a message without content"),
    };
    assert!(!m.position.is_empty(), "every message carries a position");
    (got, m.position)
}

fn ev(id: &str, version: u64, event_type: &str) -> Got {
    Got::Event(id.to_owned(), version, event_type.to_owned())
}

/// Appends at exactly `version`. UNAVAILABLE (a store that did not answer in time on a busy
/// machine) is retried with the same request — the same event ids, which the API documents as
/// safe: a committed original answers as success, nothing is stored twice — for up to a minute.
async fn append(c: &Clients, kind: &str, id: &str, version: u64, types: &[&str]) {
    let req = pb::AppendRequest {
        stream: stream(kind, id),
        expected_version: exact(version),
        events: types.iter().map(|t| json_event(t, "{}")).collect(),
    };
    let deadline = Instant::now() + WAIT;
    loop {
        match c.events.clone().append(req.clone()).await {
            Ok(_) => return,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                eprintln!("{id}@{version}: retrying after {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("append to {id} at {version}: {e:?}"),
        }
    }
}

/// Catch-up, then the caught-up marker, then live events; stream-type, id-prefix and
/// event-type filters; `max_events` ends the call.
pub async fn subscribe_catches_up_then_goes_live(c: &Clients) {
    let p = unique("bus");
    let (a, b, other) = (format!("{p}-a"), format!("{p}-b"), format!("x{p}"));
    append(c, "bus", &a, 0, &["Opened", "Noted"]).await;
    append(c, "bus", &b, 0, &["Opened"]).await;
    append(c, "other", &format!("{p}-c"), 0, &["Opened"]).await; // another stream type
    append(c, "bus", &other, 0, &["Opened"]).await; // id without the prefix
    append(c, "bus", &a, 2, &["Closed"]).await;

    let mut sub = subscribe(
        c,
        pb::SubscribeRequest {
            stream_types: vec!["bus".into()],
            stream_id_prefix: p.clone(),
            ..Default::default()
        },
    )
    .await;
    let mut got = Vec::new();
    loop {
        let (m, _) = next(&mut sub).await;
        if m == Got::CaughtUp {
            break;
        }
        got.push(m);
    }
    // Everything stored before the subscription, in commit order, then the marker.
    assert_eq!(
        got,
        vec![
            ev(&a, 1, "Opened"),
            ev(&a, 2, "Noted"),
            ev(&b, 1, "Opened"),
            ev(&a, 3, "Closed"),
        ]
    );
    // Live: new events arrive as they commit; filtered ones never do.
    append(c, "other", &format!("{p}-c"), 1, &["Noted"]).await;
    append(c, "bus", &b, 1, &["Noted", "Closed"]).await;
    assert_eq!(next(&mut sub).await.0, ev(&b, 2, "Noted"));
    assert_eq!(next(&mut sub).await.0, ev(&b, 3, "Closed"));
    drop(sub);

    // Event-type filter, and max_events ends the call with OK.
    let mut sub = subscribe(
        c,
        pb::SubscribeRequest {
            stream_id_prefix: p.clone(),
            event_types: vec!["Closed".into()],
            max_events: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next(&mut sub).await.0, ev(&a, 3, "Closed"));
    assert_eq!(next(&mut sub).await.0, ev(&b, 3, "Closed"));
    let end = tokio::time::timeout(WAIT, sub.message())
        .await
        .expect("the end in time");
    assert!(matches!(end, Ok(None)), "{end:?}");

    // from_now: only what commits after the subscription started.
    let mut sub = subscribe(
        c,
        pb::SubscribeRequest {
            start: Some(pb::subscribe_request::Start::FromNow(())),
            stream_id_prefix: p.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next(&mut sub).await.0, Got::CaughtUp);
    append(c, "bus", &a, 3, &["Reopened"]).await;
    assert_eq!(next(&mut sub).await.0, ev(&a, 4, "Reopened"));
}

/// Bad requests answer INVALID_ARGUMENT naming the field, before any message.
pub async fn subscribe_rejects_bad_requests(c: &Clients) {
    let cases = [
        (
            pb::SubscribeRequest {
                stream_types: vec!["ok".into(), "Bad Type".into()],
                ..Default::default()
            },
            "stream_types[1]",
        ),
        (
            pb::SubscribeRequest {
                stream_id_prefix: "a/b".into(),
                ..Default::default()
            },
            "stream_id_prefix",
        ),
        (
            pb::SubscribeRequest {
                event_types: vec![String::new()],
                ..Default::default()
            },
            "event_types[0]",
        ),
        (
            pb::SubscribeRequest {
                start: after("garbage"),
                ..Default::default()
            },
            "after",
        ),
    ];
    for (req, field) in cases {
        let err = c.events.clone().subscribe(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
}

/// Appends `total` events concurrently from 8 writers, each to its own streams (1 to 3 events
/// per append, exact expected versions); returns the number written per stream.
async fn write_concurrently(c: &Clients, prefix: &str, total: usize) -> BTreeMap<String, u64> {
    const WRITERS: usize = 8;
    const STREAMS_PER_WRITER: usize = 4;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let c = c.clone();
        let prefix = prefix.to_owned();
        let quota = total / WRITERS + usize::from(w < total % WRITERS);
        tasks.spawn(async move {
            let mut versions = BTreeMap::<String, u64>::new();
            let mut written = 0;
            let mut i = 0usize;
            while written < quota {
                let id = format!("{prefix}-w{w}-s{}", i % STREAMS_PER_WRITER);
                let n = (1 + i % 3).min(quota - written);
                let v = versions.entry(id.clone()).or_default();
                let types: Vec<&str> = vec!["Happened"; n];
                append(&c, "bus", &id, *v, &types).await;
                *v += n as u64;
                written += n;
                i += 1;
            }
            versions
        });
    }
    let mut all = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("writer"));
    }
    all
}

/// Receives events into `seen` (checking per-stream order and no duplicate) until `stop` says
/// so; returns the position of the last message received.
async fn receive(
    sub: &mut Sub,
    seen: &mut BTreeMap<String, u64>,
    count: &mut usize,
    caught_up: &mut bool,
    mut stop: impl FnMut(usize, bool) -> bool,
) -> String {
    let mut position = String::new();
    while !stop(*count, *caught_up) {
        let (m, p) = next(sub).await;
        position = p;
        match m {
            Got::CaughtUp => *caught_up = true,
            Got::Event(id, version, _) => {
                let last = seen.entry(id.clone()).or_default();
                assert_eq!(
                    version,
                    *last + 1,
                    "{id}: version {version} after {last} (a gap or a duplicate)"
                );
                *last = version;
                *count += 1;
            }
        }
    }
    position
}

/// `total` events written by 8 concurrent writers reach a subscriber exactly once and in
/// per-stream order across two disconnects: one in the middle of catch-up, one in the middle of
/// live delivery (while the writers are still writing).
pub async fn subscribe_resumes_without_gap_or_duplicate(c: &Clients, total: usize) {
    let p = unique("bus");
    let filter = || pb::SubscribeRequest {
        stream_types: vec!["bus".into()],
        stream_id_prefix: p.clone(),
        ..Default::default()
    };
    let started = Instant::now();
    let first_half = write_concurrently(c, &format!("{p}-1"), total / 2).await;
    eprintln!(
        "{} events by 8 writers in {:?}",
        total / 2,
        started.elapsed()
    );
    let mut seen = BTreeMap::new();
    let mut count = 0;

    // 1. A disconnect in the middle of catch-up.
    let mut sub = subscribe(c, filter()).await;
    let mut caught_up = false;
    let cut = total / 10;
    let position = receive(&mut sub, &mut seen, &mut count, &mut caught_up, |n, _| {
        n >= cut
    })
    .await;
    assert!(!caught_up, "the first disconnect is during catch-up");
    drop(sub);

    // 2. Resume; once live, more writers run; disconnect in the middle of their events.
    let mut sub = subscribe(
        c,
        pb::SubscribeRequest {
            start: after(&position),
            ..filter()
        },
    )
    .await;
    let mut caught_up = false;
    receive(&mut sub, &mut seen, &mut count, &mut caught_up, |_, up| up).await;
    assert_eq!(
        count,
        total / 2,
        "catch-up delivered the first half exactly"
    );
    let writers = {
        let (c, p) = (c.clone(), format!("{p}-2"));
        let rest = total - total / 2;
        tokio::spawn(async move { write_concurrently(&c, &p, rest).await })
    };
    let live_cut = count + (total - total / 2) / 5;
    let position = receive(&mut sub, &mut seen, &mut count, &mut caught_up, |n, _| {
        n >= live_cut
    })
    .await;
    let writing = !writers.is_finished();
    drop(sub);
    eprintln!("live disconnect after {count} events; writers still writing: {writing}");

    // 3. Resume again: everything else, exactly once.
    let second_half = writers.await.expect("writers");
    let mut sub = subscribe(
        c,
        pb::SubscribeRequest {
            start: after(&position),
            ..filter()
        },
    )
    .await;
    let mut caught_up = false;
    receive(&mut sub, &mut seen, &mut count, &mut caught_up, |_, up| up).await;
    let mut expected = first_half;
    expected.extend(second_half);
    assert_eq!(count, total, "every event exactly once");
    assert_eq!(seen, expected, "each stream complete, in version order");
}

/// Resident memory of a process, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Waits until resident memory of `pid` is steady (within 1 MiB over ten checks 200 ms apart,
/// at most a minute) and returns it.
async fn steady_rss(pid: u32) -> u64 {
    let deadline = Instant::now() + WAIT;
    let (mut last, mut steady) = (rss_of(pid), 0);
    while steady < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss_of(pid);
        steady = if now.abs_diff(last) < (1 << 20) {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    last
}

const BLOB_BYTES: usize = 32 * 1024;

async fn append_blobs(c: &Clients, id: &str, from: u64, n: usize) {
    let mut version = from;
    for _ in 0..n / 40 {
        c.events
            .clone()
            .append(pb::AppendRequest {
                stream: stream("blob", id),
                expected_version: exact(version),
                events: (0..40)
                    .map(|i| pb::NewEvent {
                        event_id: uuid::Uuid::new_v4().to_string(),
                        r#type: "Blob".into(),
                        payload: Some(pb::new_event::Payload::Data(vec![i as u8; BLOB_BYTES])),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .expect("append blobs");
        version += 40;
    }
}

/// `subscribers` subscriptions that read one message and then never grant flow-control window
/// hold a bounded amount of write-svc memory, which stays flat while the store grows behind
/// them. `pid` is write-svc's process. Returns the RSS each stalled subscriber added.
pub async fn stalled_subscribers_stay_flat(
    c: &Clients,
    write_addr: std::net::SocketAddr,
    pid: u32,
    subscribers: usize,
) -> u64 {
    let id = unique("blob");
    append_blobs(c, &id, 0, 400).await; // 12.5 MiB behind each subscriber
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{write_addr}"))
        .expect("endpoint")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535 * subscribers as u32 * 2)
        .connect()
        .await
        .expect("connect");
    // The control: what the same writes cost the server without subscribers (store caches,
    // the projector's pages, the allocator's high-water mark).
    let before_control = steady_rss(pid).await;
    append_blobs(c, &unique("control"), 0, 400).await;
    let base = steady_rss(pid).await;
    let control = base.saturating_sub(before_control);
    let mut stalled = Vec::new();
    for _ in 0..subscribers {
        let mut client = pb::event_store_client::EventStoreClient::new(channel.clone());
        let mut s = client
            .subscribe(pb::SubscribeRequest {
                stream_types: vec!["blob".into()],
                stream_id_prefix: id.clone(),
                ..Default::default()
            })
            .await
            .expect("subscribe")
            .into_inner();
        next(&mut s).await;
        stalled.push(s);
    }
    let held = steady_rss(pid).await;
    let per_subscriber = held.saturating_sub(base) / subscribers as u64;
    // The store grows by as much again behind the stalled subscribers: they must not follow.
    append_blobs(c, &id, 400, 400).await;
    let after_growth = steady_rss(pid).await;
    let grown = after_growth.saturating_sub(held);
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "{subscribers} stalled subscribers: RSS {:.1} MiB → {:.1} MiB ({:.0} KiB each); 12.5 MiB \
         more events behind them grew RSS by {:.1} MiB, the same writes without subscribers by \
         {:.1} MiB",
        mib(base),
        mib(held),
        per_subscriber as f64 / 1024.0,
        mib(grown),
        mib(control),
    );
    assert!(
        per_subscriber <= 2 << 20,
        "each stalled subscriber holds {per_subscriber} bytes"
    );
    // Were they following the store, 12.5 MiB each would show (625 MiB for 50); the margin
    // over the control absorbs the allocator's noise.
    assert!(
        grown <= control + (32 << 20),
        "stalled subscribers grew with the store: {grown} bytes against {control} without them"
    );
    // They are still alive: each gets its next message once it reads again.
    for s in &mut stalled {
        next(s).await;
    }
    per_subscriber
}
