//! Aggregate snapshot storage: the [`Snapshots`] capability of an event store, one snapshot per
//! stream, and the checks every adapter must pass ([`check`]).
//!
//! A snapshot is a cache beside the events, never part of an append: the embedded store writes
//! it in a transaction of its own, the CQL store with a plain INSERT into the `snapshots` table
//! (one row per stream), never in the append's conditional batch. Adapters store it as given;
//! deciding whether a snapshot may be used (its fingerprint, its checksum, whether the stream
//! really holds its event at its version) is the reader's job (write-svc's executor, through
//! `esq_domain::snapshot`), so a stale, corrupt or foreign snapshot costs a full fold, never a
//! wrong answer.

use crate::StoreError;
use esq_domain::StreamId;
use std::future::Future;
use uuid::Uuid;

/// A stored snapshot of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The stream version the state is at.
    pub version: u64,
    /// The id of the stream's event at `version`: a loader checks the stream still holds it
    /// there before trusting the snapshot.
    pub event_id: Uuid,
    /// The fold semantics the state was made with (`esq_domain::snapshot::fingerprint`).
    pub fingerprint: String,
    /// The encoded state (`esq_domain::snapshot::SnapshotState::encode`), opaque here.
    pub state: Vec<u8>,
}

/// Where an event store keeps aggregate snapshots: at most one per stream, the last written.
pub trait Snapshots: Send + Sync + 'static {
    /// The stream's snapshot, if one was written.
    fn read_snapshot(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send;

    /// Stores `snapshot` as the stream's snapshot, replacing any earlier one. Best effort for
    /// callers: not durable on every adapter (a crash may lose it), never part of an append.
    fn write_snapshot(
        &self,
        stream: &StreamId,
        snapshot: &Snapshot,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The checks every [`Snapshots`] adapter must pass; `prefix` keeps the streams of one run
/// apart from another's.
pub async fn check<S: Snapshots>(store: &S, prefix: &str) {
    let stream = |kind: &str, id: &str| {
        StreamId::new(kind, format!("{prefix}-{id}")).expect("valid stream id")
    };
    let a = stream("cart", "snap-a");
    assert_eq!(
        store.read_snapshot(&a).await.expect("read"),
        None,
        "a stream without a snapshot reads none"
    );
    let first = Snapshot {
        version: 7,
        event_id: Uuid::new_v4(),
        fingerprint: "cart-0123".into(),
        state: b"state at 7".to_vec(),
    };
    store.write_snapshot(&a, &first).await.expect("write");
    assert_eq!(
        store.read_snapshot(&a).await.expect("read"),
        Some(first.clone()),
        "a snapshot reads back as written"
    );

    // The last written replaces the earlier one, whatever their versions.
    let second = Snapshot {
        version: 3,
        event_id: Uuid::new_v4(),
        fingerprint: "cart-other".into(),
        state: vec![0, 255, 1, 254],
    };
    store.write_snapshot(&a, &second).await.expect("write");
    assert_eq!(store.read_snapshot(&a).await.expect("read"), Some(second));

    // Streams stay apart: another kind with the same id, an id extending another's.
    let book = stream("book", "snap-a");
    let longer = stream("cart", "snap-a-b");
    assert_eq!(store.read_snapshot(&book).await.expect("read"), None);
    assert_eq!(store.read_snapshot(&longer).await.expect("read"), None);
    let big = Snapshot {
        version: u64::try_from(i64::MAX).expect("fits"),
        event_id: Uuid::nil(),
        fingerprint: String::new(),
        state: (0..600_000u32).map(|i| (i % 251) as u8).collect(),
    };
    store
        .write_snapshot(&longer, &big)
        .await
        .expect("write big");
    assert_eq!(store.read_snapshot(&longer).await.expect("read"), Some(big));
    assert_eq!(store.read_snapshot(&book).await.expect("read"), None);
    assert_eq!(
        store
            .read_snapshot(&a)
            .await
            .expect("read")
            .map(|s| s.version),
        Some(3)
    );
}
