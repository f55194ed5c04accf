//! Test support: the contract every [`EventStore`] and [`ChangeFeed`] adapter must pass.
//!
//! Each check is an `async fn` taking the store under test and a `prefix` that makes its
//! stream ids unique (stream type `contract`, ids `{prefix}-…`), so one store — one embedded
//! file, one CQL keyspace — can run every check, several times, without being empty first.
//! Checks panic on the first violation, with a message saying what was expected: call them
//! from tests. [`run_all`] runs them all. `prefix` must consist of stream-id characters
//! (`[A-Za-z0-9._:@-]`).
//!
//! What is checked is what the services rely on, not what one adapter happens to do: list
//! order is not checked, and change-feed duplicates and orphans are tolerated, as the traits
//! allow. A feed may also deliver changes a little late (a confidence window), so the feed check
//! polls until its changes show up, for at most [`FEED_DEADLINE`].

use crate::{now_us, Change, ChangeFeed, Direction, EventStore, ReadRequest, StoreError};
use esq_domain::{
    AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId, StreamInfo, JSON_CONTENT_TYPE,
};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// How long [`change_feed`] waits for the changes of its appends to become visible.
pub const FEED_DEADLINE: Duration = Duration::from_secs(30);

/// Commit times must be within this of the test's clock (catches ms-vs-µs mistakes).
const CLOCK_TOLERANCE_US: i64 = 10 * 60 * 1_000_000;

/// Stream type of every stream the contract creates.
const KIND: &str = "contract";

fn stream(prefix: &str, name: &str) -> StreamId {
    StreamId::new(KIND, format!("{prefix}-{name}"))
        .expect("the contract prefix must consist of stream-id characters")
}

fn event(n: usize) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "ContractNoted".into(),
        schema_version: 1,
        content_type: JSON_CONTENT_TYPE.into(),
        data: format!("{{\"n\":{n}}}").into_bytes(),
        metadata: BTreeMap::new(),
    }
}

fn batch(n: usize) -> Vec<NewEvent> {
    (0..n).map(event).collect()
}

fn ids(events: &[NewEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

async fn append_ok<S: EventStore>(
    store: &S,
    s: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> AppendResult {
    match store.append(s, expected, events).await {
        Ok(r) => r,
        Err(e) => panic!(
            "append of {} events to {s} expecting {expected} failed: {e}",
            events.len()
        ),
    }
}

fn assert_wrong_version(
    got: Result<AppendResult, StoreError>,
    expected: ExpectedVersion,
    actual: u64,
    what: &str,
) {
    assert_eq!(
        got,
        Err(StoreError::WrongExpectedVersion { expected, actual }),
        "{what}: expected a version conflict reporting the actual version"
    );
}

async fn read<S: EventStore>(store: &S, s: &StreamId, request: ReadRequest) -> Vec<RecordedEvent> {
    match store.read(s, request).await {
        Ok(events) => events,
        Err(e) => panic!("read of {s} with {request:?} failed: {e}"),
    }
}

/// Every event of the stream, read forwards in pages.
async fn read_all<S: EventStore>(store: &S, s: &StreamId) -> Vec<RecordedEvent> {
    const PAGE: u32 = 100;
    let mut all: Vec<RecordedEvent> = Vec::new();
    loop {
        let from = all.last().map_or(1, |e| e.version + 1);
        let page = read(store, s, ReadRequest::forwards(from, PAGE)).await;
        let done = page.is_empty();
        all.extend(page);
        if done {
            return all;
        }
    }
}

async fn info<S: EventStore>(store: &S, s: &StreamId) -> Option<StreamInfo> {
    match store.stream_info(s).await {
        Ok(i) => i,
        Err(e) => panic!("stream_info of {s} failed: {e}"),
    }
}

/// Waits until the clock has passed `t`, so that the next append commits strictly later.
async fn pass(t: i64) {
    while now_us() <= t + 1_000 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn assert_recent(t: i64, what: &str) {
    let now = now_us();
    assert!(
        (t - now).abs() < CLOCK_TOLERANCE_US,
        "{what}: time {t} is not µs since the Unix epoch near now ({now})"
    );
}

/// Appended events read back with every field, versions from 1 and one commit time per append.
pub async fn append_and_read_round_trip<S: EventStore>(store: &S, prefix: &str) {
    let s = stream(prefix, "round-trip");
    let mut first = event(1);
    first.metadata.insert("correlation-id".into(), "c-1".into());
    first.metadata.insert("user".into(), "ada".into());
    let mut binary = event(2);
    binary.event_type = "Blob.attached_v2".into();
    binary.schema_version = 3;
    binary.content_type = "application/octet-stream".into();
    binary.data = vec![0, 255, 1, 254, b'\n', 0];
    let empty = NewEvent {
        data: Vec::new(),
        content_type: "text/plain".into(),
        ..event(3)
    };
    let sent = vec![first, binary, empty];

    assert_eq!(info(store, &s).await, None, "a fresh stream has no info");
    let r = append_ok(store, &s, ExpectedVersion::NoStream, &sent).await;
    assert_eq!(
        (r.first_version, r.last_version),
        (1, 3),
        "versions start at 1"
    );
    assert_recent(r.committed_at_us, "committed_at_us");

    let got = read(store, &s, ReadRequest::forwards(1, 100)).await;
    assert_eq!(got.len(), sent.len(), "every appended event is read back");
    // What the writer hands on without reading back (the fast path's nudge carries it).
    let recorded = r.recorded(&s, &sent);
    for (i, (got, expected)) in got.iter().zip(&recorded).enumerate() {
        assert_eq!(
            got, expected,
            "event {i} reads back as appended, at the append's commit time"
        );
    }
    assert_eq!(recorded[2].version, 3);
    assert!(recorded
        .iter()
        .all(|e| e.recorded_at_us == r.committed_at_us));

    let r2 = append_ok(store, &s, ExpectedVersion::Exact(3), &batch(2)).await;
    assert_eq!(
        (r2.first_version, r2.last_version),
        (4, 5),
        "versions are contiguous"
    );
    assert!(
        r2.committed_at_us >= r.committed_at_us,
        "commit times do not go back"
    );
    let all = read_all(store, &s).await;
    let versions: Vec<u64> = all.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=5).collect::<Vec<_>>());
    assert!(all[3..]
        .iter()
        .all(|e| e.recorded_at_us == r2.committed_at_us));
}

/// Each expected-version form admits exactly the versions it names; a refused append reports
/// the actual version and writes nothing.
pub async fn expected_versions<S: EventStore>(store: &S, prefix: &str) {
    let never = stream(prefix, "ev-never");
    assert_wrong_version(
        store
            .append(&never, ExpectedVersion::StreamExists, &batch(1))
            .await,
        ExpectedVersion::StreamExists,
        0,
        "stream_exists on a missing stream",
    );
    assert_wrong_version(
        store
            .append(&never, ExpectedVersion::Exact(1), &batch(1))
            .await,
        ExpectedVersion::Exact(1),
        0,
        "exact(1) on a missing stream",
    );
    assert_eq!(
        info(store, &never).await,
        None,
        "a refused append creates no stream"
    );
    assert!(
        read_all(store, &never).await.is_empty(),
        "a refused append writes no event"
    );

    let no_stream = stream(prefix, "ev-no-stream");
    let r = append_ok(store, &no_stream, ExpectedVersion::NoStream, &batch(1)).await;
    assert_eq!((r.first_version, r.last_version), (1, 1));
    assert_wrong_version(
        store
            .append(&no_stream, ExpectedVersion::NoStream, &batch(1))
            .await,
        ExpectedVersion::NoStream,
        1,
        "no_stream on an existing stream",
    );

    let exists = stream(prefix, "ev-exists");
    append_ok(store, &exists, ExpectedVersion::Any, &batch(1)).await;
    let r = append_ok(store, &exists, ExpectedVersion::StreamExists, &batch(2)).await;
    assert_eq!((r.first_version, r.last_version), (2, 3));

    let exact = stream(prefix, "ev-exact");
    let r = append_ok(store, &exact, ExpectedVersion::Exact(0), &batch(2)).await;
    assert_eq!(
        (r.first_version, r.last_version),
        (1, 2),
        "exact(0) is no_stream"
    );
    let r = append_ok(store, &exact, ExpectedVersion::Exact(2), &batch(1)).await;
    assert_eq!((r.first_version, r.last_version), (3, 3));
    for stale in [0, 2, 4] {
        assert_wrong_version(
            store
                .append(&exact, ExpectedVersion::Exact(stale), &batch(1))
                .await,
            ExpectedVersion::Exact(stale),
            3,
            "exact with a wrong version",
        );
    }

    let any = stream(prefix, "ev-any");
    let r = append_ok(store, &any, ExpectedVersion::Any, &batch(1)).await;
    assert_eq!((r.first_version, r.last_version), (1, 1));
    let r = append_ok(store, &any, ExpectedVersion::Any, &batch(2)).await;
    assert_eq!((r.first_version, r.last_version), (2, 3));

    for (s, version) in [(&no_stream, 1), (&exists, 3), (&exact, 3), (&any, 3)] {
        assert_eq!(
            read_all(store, s).await.len() as u64,
            version,
            "{s}: refused appends wrote nothing"
        );
        assert_eq!(
            info(store, s).await.map(|i| i.version),
            Some(version),
            "{s}: version"
        );
    }
}

/// Retrying an append with the same event ids returns the original result and stores nothing
/// twice, whether it was appended with an exact version or with `Any`, and even after the
/// stream has moved on.
pub async fn idempotent_retries<S: EventStore>(store: &S, prefix: &str) {
    for (name, exact) in [("idem-exact", true), ("idem-any", false)] {
        let s = stream(prefix, name);
        let expect = |v: u64| {
            if exact {
                ExpectedVersion::Exact(v)
            } else {
                ExpectedVersion::Any
            }
        };
        let b1 = batch(3);
        let r1 = append_ok(store, &s, expect(0), &b1).await;
        pass(r1.committed_at_us).await;
        assert_eq!(
            append_ok(store, &s, expect(0), &b1).await,
            r1,
            "{name}: retry of the first append"
        );
        let b2 = batch(2);
        let r2 = append_ok(store, &s, expect(3), &b2).await;
        assert_eq!(
            (r2.first_version, r2.last_version),
            (4, 5),
            "{name}: a retry stored nothing"
        );
        assert_eq!(
            append_ok(store, &s, expect(3), &b2).await,
            r2,
            "{name}: retry of the second append"
        );
        assert_eq!(
            append_ok(store, &s, expect(0), &b1).await,
            r1,
            "{name}: a late retry of the first append after the stream moved on"
        );
        let stored: Vec<Uuid> = read_all(store, &s)
            .await
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(
            stored,
            [ids(&b1), ids(&b2)].concat(),
            "{name}: each event stored once"
        );
        assert_eq!(info(store, &s).await.map(|i| i.version), Some(5));
    }
}

/// An event id already in the stream, sent as part of a different append, is refused with
/// [`StoreError::EventIdReused`] and nothing is written. Ids are scoped to their stream.
pub async fn reused_event_ids<S: EventStore>(store: &S, prefix: &str) {
    let s = stream(prefix, "reuse");
    let stored = batch(3);
    append_ok(store, &s, ExpectedVersion::NoStream, &stored).await;

    let got = store
        .append(&s, ExpectedVersion::Any, &[event(9), stored[1].clone()])
        .await;
    assert_eq!(
        got,
        Err(StoreError::EventIdReused {
            index: 1,
            event_id: stored[1].event_id,
            version: 2
        }),
        "a known id after a new one"
    );
    let got = store
        .append(&s, ExpectedVersion::Any, &[stored[0].clone(), event(9)])
        .await;
    assert_eq!(
        got,
        Err(StoreError::EventIdReused {
            index: 0,
            event_id: stored[0].event_id,
            version: 1
        }),
        "a known first id followed by a new one"
    );
    let got = store
        .append(
            &s,
            ExpectedVersion::Exact(3),
            &[stored[0].clone(), event(9)],
        )
        .await;
    assert!(
        matches!(got, Err(StoreError::EventIdReused { index: 0, event_id, version: 1 }) if event_id == stored[0].event_id),
        "a reused id is reported even when the expected version is right: {got:?}"
    );
    let swapped = [stored[1].clone(), stored[0].clone()];
    let got = store.append(&s, ExpectedVersion::Any, &swapped).await;
    match got {
        Err(StoreError::EventIdReused {
            index: 0,
            event_id,
            version,
        }) => {
            let at = stored.iter().position(|e| e.event_id == event_id);
            assert_eq!(
                at.map(|i| i as u64 + 1),
                Some(version),
                "the reported id is stored there"
            );
        }
        other => panic!("known ids in another order must be refused as reused, got {other:?}"),
    }
    let now: Vec<Uuid> = read_all(store, &s)
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(now, ids(&stored), "refused appends wrote nothing");

    let other = stream(prefix, "reuse-other");
    let r = append_ok(store, &other, ExpectedVersion::NoStream, &stored[..1]).await;
    assert_eq!(
        r.first_version, 1,
        "the same id in another stream is another event"
    );
}

/// The retry shapes, decided once for every adapter and every kind of expected version
/// (`any`, `no_stream`, `stream_exists`, `exact`): only a whole earlier append — the same ids,
/// in order, with the same contents — is a repeat and returns the original result; a prefix,
/// a suffix, the same ids with another payload or type, and known ids mixed with new ones are
/// refused with [`StoreError::EventIdReused`] naming the first offending event, and write
/// nothing.
pub async fn retry_shapes<S: EventStore>(store: &S, prefix: &str) {
    let kinds = [
        ("any", ExpectedVersion::Any),
        ("no-stream", ExpectedVersion::NoStream),
        ("stream-exists", ExpectedVersion::StreamExists),
        ("exact", ExpectedVersion::Exact(1)),
    ];
    for (name, expect) in kinds {
        let s = stream(prefix, &format!("shapes-{name}"));
        // `no_stream` appends to an empty stream; the others after one seed event.
        let seeded = expect != ExpectedVersion::NoStream;
        if seeded {
            append_ok(store, &s, ExpectedVersion::NoStream, &batch(1)).await;
        }
        let b = batch(3);
        let original = append_ok(store, &s, expect, &b).await;
        let v0 = original.first_version;
        assert_eq!(v0, if seeded { 2 } else { 1 }, "{name}: first version");
        pass(original.committed_at_us).await;
        assert_eq!(
            store.append(&s, expect, &b).await,
            Ok(original),
            "{name}: a whole retry returns the original result"
        );
        let refused = |what: &str, got: Result<AppendResult, StoreError>, index, at: &NewEvent| {
            let version = b
                .iter()
                .position(|e| e.event_id == at.event_id)
                .map_or(0, |i| v0 + i as u64);
            assert_eq!(
                got,
                Err(StoreError::EventIdReused {
                    index,
                    event_id: at.event_id,
                    version
                }),
                "{name}: {what}"
            );
        };
        refused(
            "a prefix of an earlier append",
            store.append(&s, expect, &b[..2]).await,
            0,
            &b[0],
        );
        refused(
            "a suffix of an earlier append",
            store.append(&s, expect, &b[1..]).await,
            0,
            &b[1],
        );
        refused(
            "one event of an earlier append",
            store.append(&s, expect, &b[2..]).await,
            0,
            &b[2],
        );
        let mut other_payload = b.clone();
        other_payload[2].data = b"{\"other\":true}".to_vec();
        refused(
            "the same ids with another payload",
            store.append(&s, expect, &other_payload).await,
            2,
            &b[2],
        );
        let mut other_type = b.clone();
        other_type[0].event_type = "ContractOther".into();
        refused(
            "the same ids with another type",
            store.append(&s, expect, &other_type).await,
            0,
            &b[0],
        );
        let mixed = [event(7), b[0].clone(), b[1].clone(), b[2].clone()];
        refused(
            "a new event before an earlier append",
            store.append(&s, expect, &mixed).await,
            1,
            &b[0],
        );
        let extended = [b[0].clone(), b[1].clone(), b[2].clone(), event(8)];
        refused(
            "an earlier append with one more event",
            store.append(&s, expect, &extended).await,
            0,
            &b[0],
        );
        let stored: Vec<Uuid> = read_all(store, &s)
            .await
            .iter()
            .skip(usize::from(seeded))
            .map(|e| e.event_id)
            .collect();
        assert_eq!(stored, ids(&b), "{name}: refused retries wrote nothing");
        assert_eq!(
            info(store, &s).await.map(|i| i.version),
            Some(original.last_version),
            "{name}: version"
        );
    }
}

/// An `exact` expected version that no stream can reach (2^63 and beyond; the CQL adapter
/// stores versions as signed 64-bit) is an ordinary wrong expected version, on a missing and on
/// an existing stream, and writes nothing.
pub async fn huge_expected_versions<S: EventStore>(store: &S, prefix: &str) {
    let missing = stream(prefix, "huge-missing");
    let existing = stream(prefix, "huge-existing");
    append_ok(store, &existing, ExpectedVersion::NoStream, &batch(1)).await;
    for v in [1u64 << 63, (1u64 << 63) - 1, u64::MAX - 1, u64::MAX] {
        for (s, actual) in [(&missing, 0), (&existing, 1)] {
            assert_wrong_version(
                store.append(s, ExpectedVersion::Exact(v), &batch(2)).await,
                ExpectedVersion::Exact(v),
                actual,
                &format!("exact({v}) on a stream at {actual}"),
            );
        }
    }
    assert_eq!(info(store, &missing).await, None, "nothing created");
    assert_eq!(read_all(store, &existing).await.len(), 1, "nothing written");
}

fn request(
    direction: Direction,
    from_version: Option<u64>,
    limit: u32,
    until_version: Option<u64>,
    until_time_us: Option<i64>,
) -> ReadRequest {
    ReadRequest {
        direction,
        from_version,
        limit,
        until_version,
        until_time_us,
    }
}

/// Reads forwards and backwards, from a version, limited, and as of a version or a time.
pub async fn reads<S: EventStore>(store: &S, prefix: &str) {
    use Direction::{Backwards as B, Forwards as F};
    let s = stream(prefix, "reads");
    let a = append_ok(store, &s, ExpectedVersion::NoStream, &batch(3)).await;
    pass(a.committed_at_us).await;
    let b = append_ok(store, &s, ExpectedVersion::Exact(3), &batch(2)).await;
    pass(b.committed_at_us).await;
    let c = append_ok(store, &s, ExpectedVersion::Exact(5), &batch(1)).await;
    assert!(
        a.committed_at_us < b.committed_at_us && b.committed_at_us < c.committed_at_us,
        "appends made milliseconds apart commit at increasing times: {a:?} {b:?} {c:?}"
    );
    let (ta, tb) = (a.committed_at_us, b.committed_at_us);

    let cases: &[(ReadRequest, &[u64], &str)] = &[
        (
            request(F, None, 100, None, None),
            &[1, 2, 3, 4, 5, 6],
            "forwards from the default",
        ),
        (
            request(F, Some(0), 100, None, None),
            &[1, 2, 3, 4, 5, 6],
            "forwards from 0",
        ),
        (
            request(F, Some(2), 3, None, None),
            &[2, 3, 4],
            "forwards from 2, limit 3",
        ),
        (
            request(F, Some(6), 100, None, None),
            &[6],
            "forwards from the last",
        ),
        (
            request(F, Some(7), 100, None, None),
            &[],
            "forwards past the end",
        ),
        (request(F, None, 0, None, None), &[], "limit 0"),
        (
            request(B, None, 100, None, None),
            &[6, 5, 4, 3, 2, 1],
            "backwards from the default",
        ),
        (
            request(B, None, 2, None, None),
            &[6, 5],
            "backwards, limit 2",
        ),
        (
            request(B, Some(4), 2, None, None),
            &[4, 3],
            "backwards from 4, limit 2",
        ),
        (
            request(B, Some(100), 2, None, None),
            &[6, 5],
            "backwards from past the end",
        ),
        (
            request(B, Some(0), 100, None, None),
            &[],
            "backwards from 0",
        ),
        (request(B, None, 0, None, None), &[], "backwards, limit 0"),
        (
            request(F, None, 100, Some(4), None),
            &[1, 2, 3, 4],
            "forwards until version 4",
        ),
        (
            request(F, Some(5), 100, Some(4), None),
            &[],
            "forwards from above until_version",
        ),
        (
            request(B, None, 100, Some(4), None),
            &[4, 3, 2, 1],
            "backwards until version 4",
        ),
        (
            request(B, Some(5), 2, Some(4), None),
            &[4, 3],
            "backwards from above until_version",
        ),
        (request(F, None, 100, Some(0), None), &[], "until version 0"),
        (
            request(F, None, 100, None, Some(ta)),
            &[1, 2, 3],
            "forwards as of the first commit",
        ),
        (
            request(B, None, 100, None, Some(tb)),
            &[5, 4, 3, 2, 1],
            "backwards as of the second",
        ),
        (
            request(B, None, 2, None, Some(tb - 1)),
            &[3, 2],
            "backwards just before the second",
        ),
        (
            request(F, None, 100, None, Some(ta - 1)),
            &[],
            "as of before the first commit",
        ),
        (
            request(B, None, 100, None, Some(ta - 1)),
            &[],
            "backwards before the first commit",
        ),
        (
            request(F, Some(2), 100, Some(2), Some(tb)),
            &[2],
            "both as-of limits, the version lower",
        ),
        (
            request(B, None, 100, Some(6), Some(ta)),
            &[3, 2, 1],
            "both as-of limits, the time lower",
        ),
    ];
    for &(req, want, what) in cases {
        let got: Vec<u64> = read(store, &s, req)
            .await
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(got, want, "{what}: {req:?}");
    }

    let mut pages = Vec::new();
    let mut from = 1;
    loop {
        let page: Vec<u64> = read(store, &s, ReadRequest::forwards(from, 4))
            .await
            .iter()
            .map(|e| e.version)
            .collect();
        let Some(&last) = page.last() else { break };
        from = last + 1;
        pages.push(page);
    }
    assert_eq!(pages, vec![vec![1, 2, 3, 4], vec![5, 6]], "paging forwards");

    let missing = stream(prefix, "reads-missing");
    assert!(read(store, &missing, request(F, None, 10, None, None))
        .await
        .is_empty());
    assert!(read(store, &missing, request(B, None, 10, None, None))
        .await
        .is_empty());
}

/// A stream's summary follows its appends.
pub async fn stream_info<S: EventStore>(store: &S, prefix: &str) {
    let s = stream(prefix, "info");
    assert_eq!(
        info(store, &s).await,
        None,
        "no info before the first append"
    );
    let a = append_ok(store, &s, ExpectedVersion::NoStream, &batch(2)).await;
    let want = StreamInfo {
        version: 2,
        created_at_us: a.committed_at_us,
        last_appended_at_us: a.committed_at_us,
        event_count: 2,
    };
    assert_eq!(info(store, &s).await, Some(want), "after the first append");
    pass(a.committed_at_us).await;
    let b = append_ok(store, &s, ExpectedVersion::Exact(2), &batch(1)).await;
    let want = StreamInfo {
        version: 3,
        created_at_us: a.committed_at_us,
        last_appended_at_us: b.committed_at_us,
        event_count: 3,
    };
    assert_eq!(info(store, &s).await, Some(want), "after the second append");
}

/// Paging through all streams visits each stream once, including every stream created here.
pub async fn list_streams<S: EventStore>(store: &S, prefix: &str) {
    const PAGE: u32 = 2;
    let created: Vec<StreamId> = (0..5)
        .map(|i| stream(prefix, &format!("list-{i}")))
        .collect();
    for s in &created {
        append_ok(store, s, ExpectedVersion::Any, &batch(1)).await;
    }
    let mut seen = HashSet::new();
    let mut cursor = None;
    loop {
        let page = match store.list_streams(cursor.clone(), PAGE).await {
            Ok(p) => p,
            Err(e) => panic!("list_streams after {cursor:?} failed: {e}"),
        };
        assert!(
            page.streams.len() <= PAGE as usize,
            "a page holds at most `limit` streams"
        );
        for s in page.streams {
            assert!(seen.insert(s.clone()), "{s} listed twice");
        }
        match page.next {
            None => break,
            Some(next) => {
                assert_ne!(Some(&next), cursor.as_ref(), "the cursor must advance");
                cursor = Some(next);
            }
        }
    }
    for s in &created {
        assert!(seen.contains(s), "{s} was created but not listed");
    }
}

/// Sixteen writers appending to one stream with exact expected versions, retrying on conflict:
/// every append lands exactly once, at contiguous versions, one winner per version.
pub async fn concurrent_appenders<S: EventStore + Clone>(store: &S, prefix: &str) {
    const WRITERS: usize = 16;
    const APPENDS: usize = 3;
    const EVENTS: usize = 2;
    const MAX_ATTEMPTS: usize = 10_000;
    let s = stream(prefix, "race");
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut expected = 0;
                for _ in 0..APPENDS {
                    let events = batch(EVENTS);
                    let mut attempts = 0;
                    let result = loop {
                        attempts += 1;
                        assert!(attempts < MAX_ATTEMPTS, "writer starved on {s}");
                        match store
                            .append(&s, ExpectedVersion::Exact(expected), &events)
                            .await
                        {
                            Ok(r) => break r,
                            Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                                expected = actual
                            }
                            Err(e) => panic!("concurrent append to {s} failed: {e}"),
                        }
                    };
                    assert_eq!(
                        result.first_version,
                        expected + 1,
                        "an exact append lands right after the expected version"
                    );
                    expected = result.last_version;
                    done.push((result, ids(&events)));
                }
                done
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await.expect("a writer task panicked"));
    }
    results.sort_by_key(|(r, _)| r.first_version);
    let total = (WRITERS * APPENDS * EVENTS) as u64;
    for (i, (r, _)) in results.iter().enumerate() {
        let first = (i * EVENTS) as u64 + 1;
        assert_eq!(
            (r.first_version, r.last_version),
            (first, first + EVENTS as u64 - 1),
            "appends are contiguous with one winner per version"
        );
    }
    let stored = read_all(store, &s).await;
    assert_eq!(stored.len() as u64, total, "every append stored once");
    for (r, ids) in &results {
        for (v, id) in (r.first_version..).zip(ids) {
            let e = &stored[(v - 1) as usize];
            assert_eq!(
                (e.version, e.event_id),
                (v, *id),
                "version {v} holds its winner's event"
            );
            assert_eq!(e.recorded_at_us, r.committed_at_us);
        }
    }
    assert_eq!(info(store, &s).await.map(|i| i.version), Some(total));
}

/// A change seen in a shard, with its position.
struct Seen {
    position: String,
    change: Change,
}

/// Most changes [`drain`] takes from one shard before deciding the feed never ends.
const MAX_DRAIN: usize = 1_000_000;

/// Polls `shard` from `after` until the shard has nothing more, in small pages.
async fn drain<S: ChangeFeed>(store: &S, shard: u32, after: Option<String>) -> Vec<Seen> {
    let mut seen: Vec<Seen> = Vec::new();
    loop {
        let from = seen
            .last()
            .map(|s| s.position.clone())
            .or_else(|| after.clone());
        let page = match store.poll(shard, from.as_deref(), 3).await {
            Ok(p) => p,
            Err(e) => panic!("poll of shard {shard} after {from:?} failed: {e}"),
        };
        assert_eq!(
            page.changes.len(),
            page.positions.len(),
            "one position per change"
        );
        assert!(
            page.changes.len() <= 3,
            "a page holds at most `limit` changes"
        );
        if page.changes.is_empty() {
            return seen;
        }
        assert!(
            from.is_none() || page.positions.first() != from.as_ref(),
            "shard {shard}: polling after position {from:?} returned that position again"
        );
        assert!(
            seen.len() < MAX_DRAIN,
            "shard {shard} did not end after {MAX_DRAIN} changes"
        );
        seen.extend(
            page.changes
                .into_iter()
                .zip(page.positions)
                .map(|(change, position)| Seen { position, change }),
        );
    }
}

/// After appends, the feed (every shard, from the start) holds a change covering each appended
/// version; positions resume exactly after the change they belong to, and polling from the last
/// one returns nothing of these appends again.
pub async fn change_feed<S: EventStore + ChangeFeed>(store: &S, prefix: &str) {
    let streams: Vec<StreamId> = (0..3)
        .map(|i| stream(prefix, &format!("feed-{i}")))
        .collect();
    let mut appended = Vec::new();
    for (s, n) in [(0, 2), (1, 3), (0, 1), (2, 1), (2, 1), (1, 1)] {
        let r = append_ok(store, &streams[s], ExpectedVersion::Any, &batch(n)).await;
        appended.push((streams[s].clone(), r));
    }
    let ours = |c: &Change| streams.contains(&c.stream);
    let shards = store.shard_count();
    assert!(shards >= 1, "a feed has at least one shard");

    let mut feed: Vec<Vec<Seen>> = (0..shards).map(|_| Vec::new()).collect();
    let deadline = tokio::time::Instant::now() + FEED_DEADLINE;
    let uncovered = |feed: &[Vec<Seen>]| -> Vec<(StreamId, u64)> {
        appended
            .iter()
            .flat_map(|(s, r)| (r.first_version..=r.last_version).map(move |v| (s.clone(), v)))
            .filter(|(s, v)| {
                !feed.iter().flatten().any(|seen| {
                    let c = &seen.change;
                    &c.stream == s && c.first_version <= *v && *v <= c.last_version
                })
            })
            .collect()
    };
    loop {
        for (shard, seen) in (0..shards).zip(feed.iter_mut()) {
            let after = seen.last().map(|s| s.position.clone());
            seen.extend(drain(store, shard, after).await);
        }
        let missing = uncovered(&feed);
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no change covers these appended versions within {FEED_DEADLINE:?}: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for seen in feed.iter().flatten().filter(|s| ours(&s.change)) {
        let c = &seen.change;
        assert!(
            1 <= c.first_version && c.first_version <= c.last_version,
            "a change names a version range: {c:?}"
        );
        assert_recent(c.noted_at_us, "noted_at_us");
    }

    for (shard, seen) in (0..shards).zip(&feed) {
        let Some(last) = seen.last() else { continue };
        let again = drain(store, shard, Some(last.position.clone())).await;
        assert!(
            !again.iter().any(|s| ours(&s.change)),
            "shard {shard}: polling after the last position returned these appends again"
        );
        if seen.len() >= 2 {
            let k = seen.len() / 2 - 1;
            let next = match store.poll(shard, Some(&seen[k].position), 1).await {
                Ok(p) => p,
                Err(e) => panic!("poll of shard {shard} from a middle position failed: {e}"),
            };
            assert_eq!(
                next.changes.first(),
                Some(&seen[k + 1].change),
                "shard {shard}: resuming from a position continues right after its change"
            );
            assert_eq!(next.positions.first(), Some(&seen[k + 1].position));
        }
    }
}

/// A whole retry is recognised however far back the original is: an `exact` retry after many
/// more events (beyond any window an adapter keeps for cheap checks) returns the original.
pub async fn old_retries<S: EventStore>(store: &S, prefix: &str) {
    let s = stream(prefix, "old-retry");
    append_ok(store, &s, ExpectedVersion::NoStream, &batch(1)).await;
    let b = batch(2);
    let original = append_ok(store, &s, ExpectedVersion::Exact(1), &b).await;
    for chunk in 0..3 {
        let head = 3 + chunk * 100;
        append_ok(store, &s, ExpectedVersion::Exact(head), &batch(100)).await;
    }
    // (`any` retries are recognised within a window of the newest events on CQL, which has
    // no index by id: see `CqlConfig::id_window`.)
    assert_eq!(
        store.append(&s, ExpectedVersion::Exact(1), &b).await,
        Ok(original),
        "an exact retry of an append 300 events back returns the original result"
    );
    let info = store.stream_info(&s).await.expect("info").expect("exists");
    assert_eq!(info.version, 303, "nothing written twice");
}

/// Runs every check of the contract against `store`, with stream ids made unique by `prefix`.
pub async fn run_all<S: EventStore + ChangeFeed + Clone>(store: &S, prefix: &str) {
    append_and_read_round_trip(store, prefix).await;
    expected_versions(store, prefix).await;
    idempotent_retries(store, prefix).await;
    reused_event_ids(store, prefix).await;
    retry_shapes(store, prefix).await;
    old_retries(store, prefix).await;
    huge_expected_versions(store, prefix).await;
    reads(store, prefix).await;
    stream_info(store, prefix).await;
    list_streams(store, prefix).await;
    concurrent_appenders(store, prefix).await;
    change_feed(store, prefix).await;
}
