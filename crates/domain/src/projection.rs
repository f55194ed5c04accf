//! Projections: pure functions from events to read-model changes.
//!
//! A read model is a set of *documents* (one flat string map per aggregate and projection; a
//! Redis hash in production) plus *indexes* (sets of document ids, kept in lexicographic order).
//! A projection never sees the current document: it turns each event into [`FieldOp`]s, which a
//! read store applies atomically behind a version fence. That keeps the fold identical in every
//! store, and lets the same events feed several projection shapes. Index membership has one
//! source of truth, the document: [`Projection::indexes`] says which indexes a document in a
//! given state belongs to, and the projector brings the indexes in line with it after each apply.

use crate::{RecordedEvent, StreamId};
use std::collections::HashMap;

/// A document: one flat string map per aggregate and projection (a Redis hash in production).
pub type Doc = HashMap<String, String>;

/// Document field holding the last applied stream version (the fence).
pub const VERSION_FIELD: &str = "_v";
/// Document field set to `"1"` once the aggregate is deleted (a tombstone keeps the fence).
pub const DELETED_FIELD: &str = "_deleted";
/// Document field marking index updates still to be made for the document (the version whose
/// apply changed its index memberships). Set atomically with that apply, cleared once the
/// indexes are in line, so an interrupted index update is found and finished later.
pub const INDEX_PENDING_FIELD: &str = "_ix";

/// One change to a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldOp {
    /// Set a field to a value.
    Set(String, String),
    /// Remove a field.
    Del(String),
    /// Add to an integer field (a missing field counts as 0).
    Incr(String, i64),
    /// Add to a count (a missing field counts as 0); a result of 0 or less removes the field,
    /// so a count never shows as zero or negative (units of a cart line).
    Adjust(String, i64),
    /// Remove every field but the version and mark the document deleted.
    Tombstone,
}

/// The changes one batch of events makes to one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Document changes, in event order.
    pub fields: Vec<FieldOp>,
}

/// A batch ready for a read store: the version range it covers and its changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Version of the first event in the batch; the document must be at `first_version - 1`.
    pub first_version: u64,
    /// Version of the last event; the document's version afterwards.
    pub last_version: u64,
    /// What the events change.
    pub changes: Changes,
}

/// A read-model shape fed from events.
pub trait Projection: Send + Sync + 'static {
    /// Stable name, used in key names and APIs: `cart`, `book`, `state`.
    fn name(&self) -> &'static str;
    /// Whether events of this stream kind feed this projection.
    fn handles(&self, stream_kind: &str) -> bool;
    /// The document id for a stream (the stream id, unless the projection spans kinds).
    fn doc_id(&self, stream: &StreamId) -> String {
        stream.id.clone()
    }
    /// Appends the changes `event` makes to `out`, or says why the event cannot be applied: it
    /// does not decode, its type is unknown to the stream type the projection owns, or its
    /// upcaster fails. Every fold stops there ([`Unprojectable`]): the projector parks the
    /// stream for this projection, aggregate and temporal folds answer a clear error.
    fn project(&self, event: &RecordedEvent, out: &mut Changes) -> Result<(), String>;

    /// Whether this projection maintains cross-document indexes.
    fn has_indexes(&self) -> bool {
        false
    }

    /// The indexes a document belongs to in its current state: the one source of truth of
    /// index membership, so it can always be re-established from the document (names unique
    /// within the projection, e.g. `all`, `author:Ursula K. Le Guin`). Index entries are added
    /// and removed after the fenced document change, so readers confirm membership against the
    /// document itself.
    fn indexes(&self, doc: &HashMap<String, String>) -> Vec<String> {
        let _ = doc;
        Vec::new()
    }
}

/// An event a projection cannot apply (see [`Projection::project`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("projection {projection} cannot apply event {version} of stream {stream}: {reason}")]
pub struct Unprojectable {
    /// The projection.
    pub projection: String,
    /// The stream.
    pub stream: StreamId,
    /// The event's version.
    pub version: u64,
    /// Why.
    pub reason: String,
}

impl From<Unprojectable> for crate::DomainError {
    /// A stream holding an event its fold cannot read is a failed precondition of whatever
    /// needs that fold (naming stream and version), not bad input.
    fn from(e: Unprojectable) -> Self {
        crate::DomainError::Rule(e.to_string())
    }
}

/// Projects one event, naming it if the projection cannot apply it.
fn project_one<P: Projection + ?Sized>(
    projection: &P,
    event: &RecordedEvent,
    out: &mut Changes,
) -> Result<(), Unprojectable> {
    projection
        .project(event, out)
        .map_err(|reason| Unprojectable {
            projection: projection.name().to_owned(),
            stream: event.stream.clone(),
            version: event.version,
            reason,
        })
}

/// Builds one batch from consecutive events of one stream; fails on the first event the
/// projection cannot apply.
pub fn batch<P: Projection + ?Sized>(
    projection: &P,
    events: &[RecordedEvent],
) -> Result<Option<Batch>, Unprojectable> {
    batch_except(projection, events, |_| false)
}

/// [`batch`], treating the events whose version `skipped` names as no-ops (an operator skipped
/// them for this projection): they add no change, but the version moves past them.
pub fn batch_except<P: Projection + ?Sized>(
    projection: &P,
    events: &[RecordedEvent],
    skipped: impl Fn(u64) -> bool,
) -> Result<Option<Batch>, Unprojectable> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Ok(None);
    };
    let mut changes = Changes::default();
    for e in events.iter().filter(|e| !skipped(e.version)) {
        project_one(projection, e, &mut changes)?;
    }
    Ok(Some(Batch {
        first_version: first.version,
        last_version: last.version,
        changes,
    }))
}

/// The outcome of a fenced apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The batch was applied; the document is now at the batch's last version.
    Applied,
    /// Every event of the batch was already applied: nothing changed.
    Duplicate,
    /// The document is at `current`, which is not `first_version - 1` (a gap, or a batch that
    /// overlaps what is applied): nothing changed; the caller re-reads from `current + 1`.
    Stale {
        /// The document's version.
        current: u64,
    },
}

/// The fence decision for a document at `current` and a batch.
pub fn fence(current: u64, batch: &Batch) -> Option<ApplyOutcome> {
    if batch.last_version <= current {
        Some(ApplyOutcome::Duplicate)
    } else if batch.first_version != current + 1 {
        Some(ApplyOutcome::Stale { current })
    } else {
        None
    }
}

/// The reference semantics of a fenced apply on an in-memory document: every read store must
/// behave exactly like this (the Redis script is property-tested against it).
pub fn apply_to_doc(doc: &mut HashMap<String, String>, batch: &Batch) -> ApplyOutcome {
    let current = doc_version(doc);
    if let Some(outcome) = fence(current, batch) {
        return outcome;
    }
    for op in &batch.changes.fields {
        match op {
            FieldOp::Set(k, v) => {
                doc.insert(k.clone(), v.clone());
            }
            FieldOp::Del(k) => {
                doc.remove(k);
            }
            FieldOp::Incr(k, by) => {
                let n = doc.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                doc.insert(k.clone(), n.saturating_add(*by).to_string());
            }
            FieldOp::Adjust(k, by) => {
                let n = doc.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                let n = n.saturating_add(*by);
                if n > 0 {
                    doc.insert(k.clone(), n.to_string());
                } else {
                    doc.remove(k);
                }
            }
            FieldOp::Tombstone => {
                doc.clear();
                doc.insert(DELETED_FIELD.to_owned(), "1".to_owned());
            }
        }
    }
    doc.insert(VERSION_FIELD.to_owned(), batch.last_version.to_string());
    ApplyOutcome::Applied
}

/// The version recorded in a document (0 when absent).
pub fn doc_version(doc: &HashMap<String, String>) -> u64 {
    doc.get(VERSION_FIELD)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether a document is a tombstone.
pub fn is_deleted(doc: &HashMap<String, String>) -> bool {
    doc.get(DELETED_FIELD).is_some_and(|v| v == "1")
}

/// Folds a whole sequence of events (from version 1) into a fresh document: the state a
/// projection shows after those events. Used for temporal queries and replay previews.
pub fn fold<P: Projection + ?Sized>(
    projection: &P,
    events: &[RecordedEvent],
) -> Result<HashMap<String, String>, Unprojectable> {
    let mut doc = HashMap::new();
    for e in events {
        let mut changes = Changes::default();
        project_one(projection, e, &mut changes)?;
        // Versions in a replay preview may be renumbered; apply each event at the next version.
        let next = doc_version(&doc) + 1;
        apply_to_doc(
            &mut doc,
            &Batch {
                first_version: next,
                last_version: next,
                changes,
            },
        );
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::record;
    use crate::NewEvent;
    use proptest::prelude::*;
    use serde_json::json;

    fn at(first_version: u64, last_version: u64, fields: Vec<FieldOp>) -> Batch {
        Batch {
            first_version,
            last_version,
            changes: Changes { fields },
        }
    }

    fn doc(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn applied(mut d: HashMap<String, String>, op: FieldOp) -> HashMap<String, String> {
        let next = doc_version(&d) + 1;
        assert_eq!(
            apply_to_doc(&mut d, &at(next, next, vec![op])),
            ApplyOutcome::Applied
        );
        d
    }

    #[test]
    fn set_inserts_and_overwrites() {
        let d = applied(doc(&[]), FieldOp::Set("a".into(), "1".into()));
        assert_eq!(d, doc(&[("a", "1"), ("_v", "1")]));
        let d = applied(d, FieldOp::Set("a".into(), "x".into()));
        assert_eq!(d, doc(&[("a", "x"), ("_v", "2")]));
    }

    #[test]
    fn del_removes_and_tolerates_a_missing_field() {
        let d = applied(doc(&[("a", "1"), ("b", "2")]), FieldOp::Del("a".into()));
        assert_eq!(d, doc(&[("b", "2"), ("_v", "1")]));
        let d = applied(d, FieldOp::Del("zz".into()));
        assert_eq!(d, doc(&[("b", "2"), ("_v", "2")]));
    }

    #[test]
    fn incr_adds_counting_a_missing_field_as_zero() {
        let d = applied(doc(&[]), FieldOp::Incr("n".into(), 5));
        assert_eq!(d["n"], "5");
        let d = applied(d, FieldOp::Incr("n".into(), -7));
        assert_eq!(d["n"], "-2");
    }

    #[test]
    fn incr_saturates_and_restarts_non_numbers_from_zero() {
        let d = applied(
            doc(&[("n", &i64::MAX.to_string())]),
            FieldOp::Incr("n".into(), 1),
        );
        assert_eq!(d["n"], i64::MAX.to_string());
        let d = applied(doc(&[("n", "abc")]), FieldOp::Incr("n".into(), 3));
        assert_eq!(d["n"], "3");
    }

    #[test]
    fn tombstone_clears_everything_but_keeps_the_fence() {
        let mut d = doc(&[("a", "1"), ("b", "2"), (VERSION_FIELD, "4")]);
        let outcome = apply_to_doc(&mut d, &at(5, 5, vec![FieldOp::Tombstone]));
        assert_eq!(outcome, ApplyOutcome::Applied);
        assert_eq!(d, doc(&[(DELETED_FIELD, "1"), (VERSION_FIELD, "5")]));
        assert!(is_deleted(&d));
        // A redelivered older batch still meets the fence after the delete.
        let late = at(3, 4, vec![FieldOp::Set("a".into(), "1".into())]);
        assert_eq!(apply_to_doc(&mut d, &late), ApplyOutcome::Duplicate);
        assert!(is_deleted(&d));
    }

    #[test]
    fn fence_outcomes() {
        let b = |first, last| at(first, last, Vec::new());
        assert_eq!(fence(0, &b(1, 3)), None);
        assert_eq!(fence(3, &b(4, 4)), None);
        assert_eq!(fence(3, &b(2, 3)), Some(ApplyOutcome::Duplicate));
        assert_eq!(fence(3, &b(5, 6)), Some(ApplyOutcome::Stale { current: 3 }));
        assert_eq!(fence(3, &b(2, 5)), Some(ApplyOutcome::Stale { current: 3 }));
    }

    #[test]
    fn rejected_batches_change_nothing() {
        let before = doc(&[("a", "1"), (VERSION_FIELD, "3")]);
        for b in [
            at(2, 3, vec![FieldOp::Tombstone]),
            at(5, 5, vec![FieldOp::Tombstone]),
        ] {
            let mut d = before.clone();
            assert_ne!(apply_to_doc(&mut d, &b), ApplyOutcome::Applied);
            assert_eq!(d, before);
        }
    }

    #[test]
    fn empty_batch_is_none() {
        assert_eq!(batch(&Ops, &[]), Ok(None));
    }

    /// A projection that emits whichever [`FieldOp`] each event names, plus a per-event counter
    /// so that an event applied twice or skipped always shows in the document.
    struct Ops;

    impl Projection for Ops {
        fn name(&self) -> &'static str {
            "ops"
        }

        fn handles(&self, _stream_kind: &str) -> bool {
            true
        }

        fn project(&self, event: &RecordedEvent, out: &mut Changes) -> Result<(), String> {
            let Some(v) = event.json() else {
                return Err("not JSON".to_owned());
            };
            let field = format!("k{}", v["k"]);
            let n = v["n"].as_i64().unwrap_or(0);
            out.fields.push(match v["op"].as_u64() {
                Some(0) => FieldOp::Set(field, n.to_string()),
                Some(1) => FieldOp::Del(field),
                Some(2) => FieldOp::Tombstone,
                _ => FieldOp::Incr(field, n),
            });
            out.fields.push(FieldOp::Incr("count".into(), 1));
            Ok(())
        }
    }

    /// The model event store: one stream of events naming ops.
    fn store(ops: &[(u8, u8, i64)]) -> Vec<RecordedEvent> {
        let stream = StreamId::new("model", "s-1").expect("valid");
        let events = ops
            .iter()
            .map(|(op, k, n)| NewEvent::json("Op", 1, &json!({"op": op, "k": k, "n": n})))
            .collect();
        let mut history = Vec::new();
        record(&stream, &mut history, events);
        history
    }

    /// A projector: applies each delivered range of versions; on `Stale` it re-reads from the
    /// store, in pages, from the document's version + 1 to the end of the delivered range.
    fn project_deliveries(
        store: &[RecordedEvent],
        deliveries: &[(usize, usize)],
        page: usize,
    ) -> HashMap<String, String> {
        let mut doc = HashMap::new();
        // The change log guarantees a notification for the last append, in some order.
        for &(start, len) in deliveries.iter().chain([&(store.len() - 1, 1)]) {
            let end = (start + len).min(store.len());
            let delivered = batch(&Ops, &store[start..end])
                .unwrap()
                .expect("non-empty range");
            if let ApplyOutcome::Stale { current } = apply_to_doc(&mut doc, &delivered) {
                for chunk in store[current as usize..end].chunks(page) {
                    let reread = batch(&Ops, chunk).unwrap().expect("non-empty page");
                    assert_eq!(apply_to_doc(&mut doc, &reread), ApplyOutcome::Applied);
                }
            }
            // Whatever arrives, the document is always exactly a prefix of the stream.
            assert_eq!(
                doc,
                fold(&Ops, &store[..doc_version(&doc) as usize]).unwrap()
            );
        }
        doc
    }

    fn ops(max: usize) -> impl Strategy<Value = Vec<(u8, u8, i64)>> {
        prop::collection::vec((0u8..8, 0u8..4, -1000i64..1000), 1..max)
    }

    proptest! {
        #[test]
        fn any_delivery_order_converges_to_the_fold(
            (ops, deliveries) in ops(30).prop_flat_map(|ops| {
                let n = ops.len();
                (Just(ops), prop::collection::vec((0..n, 1usize..=6), 0..40))
            }),
            page in 1usize..=5,
        ) {
            let store = store(&ops);
            let doc = project_deliveries(&store, &deliveries, page);
            prop_assert_eq!(doc_version(&doc), store.len() as u64);
            prop_assert_eq!(doc, fold(&Ops, &store).unwrap());
        }

        #[test]
        fn batching_does_not_change_the_result(ops in ops(30), page in 1usize..=8) {
            let store = store(&ops);
            let mut doc = HashMap::new();
            for chunk in store.chunks(page) {
                let b = batch(&Ops, chunk).unwrap().expect("non-empty page");
                prop_assert_eq!(apply_to_doc(&mut doc, &b), ApplyOutcome::Applied);
            }
            prop_assert_eq!(doc, fold(&Ops, &store).unwrap());
        }
    }
}
