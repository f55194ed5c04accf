//! Aggregate snapshots: an aggregate's folded state at a version, so that loading it folds only
//! the events after that version. A snapshot is a cache — the events stay the source of truth —
//! and this module says what one holds and when one may be trusted; storing it is the event
//! store's (`esq_eventstore::snapshots`), taking and using it write-svc's executor.
//!
//! What a snapshot holds ([`SnapshotState`], encoded by [`SnapshotState::encode`]):
//! - the [`Folded`] document at its version, exactly what [`Folded::extend`] produced, so a
//!   load continues the *same* fold from it (one truth: there is no second way to fold);
//! - the keys ([`event_key`], [`command_key`]) of every event id and `command_id` in the events
//!   it covers, because loading an aggregate also answers "is this command a retry?" and "does
//!   this raw append carry ids already stored?" over the whole stream. A key found means
//!   "maybe": the loader then folds the whole stream, so both answers stay exact; a key not
//!   found means "certainly not" (every id of the covered events was put in the set);
//! - a checksum of all of it: a corrupt snapshot does not decode and is ignored.
//!
//! When it may be trusted is tagged by its [`fingerprint`]: the aggregate kind, its
//! projection, [`FOLD_SEMANTICS`], the snapshot format, and every event contract of the kind
//! (each event type's current schema version and the JSON Schema of every version this build
//! reads, i.e. the upcaster chain). A build whose fold could differ computes another
//! fingerprint and ignores the snapshot (it folds the stream in full and writes its own).

use crate::aggregate::{Aggregate, Folded};
use crate::projection::{doc_version, Doc, Projection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use uuid::Uuid;

/// The meaning of folds beyond what the event contracts show. Bump it whenever a projection's
/// code changes what an event does to a document (as `READ_MODEL_LAYOUT` is bumped for the
/// read models): every snapshot taken before is then ignored.
pub const FOLD_SEMANTICS: u32 = 1;

/// Layout of [`SnapshotState::encode`]'s bytes.
const FORMAT: u8 = 1;
/// First bytes of every encoded snapshot.
const MAGIC: &[u8; 4] = b"esqS";

/// The fingerprint of the fold semantics of `A`'s snapshots (see the module docs). Computed
/// once per aggregate kind.
pub fn fingerprint<A: Aggregate>() -> Arc<str> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, Arc<str>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    let mut cache = match cache.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    Arc::clone(
        cache
            .entry(A::KIND)
            .or_insert_with(|| compute_fingerprint::<A>().into()),
    )
}

fn compute_fingerprint<A: Aggregate>() -> String {
    let projection = A::Projection::default();
    let mut text = format!(
        "kind={}\nprojection={}\nsemantics={FOLD_SEMANTICS}\nformat={FORMAT}\n",
        A::KIND,
        projection.name()
    );
    if let Some(contract) = crate::contract::contracts()
        .iter()
        .find(|c| c.stream_type == A::KIND)
    {
        for event in &contract.events {
            text.push_str(&format!(
                "event={} current={}\n",
                event.event_type, event.current_version
            ));
            for version in &event.versions {
                text.push_str(&format!("v{}={}\n", version.version, version.json_schema));
            }
        }
    }
    format!("{}-{:016x}", A::KIND, fnv1a(0, text.as_bytes()))
}

/// The key of an event id in a snapshot's set of seen ids.
pub fn event_key(id: &Uuid) -> u64 {
    fnv1a(1, id.as_bytes())
}

/// The key of a `command_id` in a snapshot's set of seen ids.
pub fn command_key(command_id: &str) -> u64 {
    fnv1a(2, command_id.as_bytes())
}

/// FNV-1a, 64 bits, over a domain byte and `bytes`: stable across builds and platforms (the
/// keys and checksums are stored).
fn fnv1a(domain: u8, bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in std::iter::once(&domain).chain(bytes) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The keys of the ids in a stream's events (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenIds {
    keys: Vec<u64>,
    sorted: bool,
}

impl SeenIds {
    /// Notes the ids `event` carries: its event id, and its `command_id` if any.
    pub fn note(&mut self, event: &crate::RecordedEvent) {
        self.keys.push(event_key(&event.event_id));
        if let Some(command) = event.metadata.get(crate::event::COMMAND_ID_KEY) {
            self.keys.push(command_key(command));
        }
        self.sorted = false;
    }

    /// Whether `key` may be among the noted ids (`false`: certainly not). Call on a set from
    /// [`SeenIds::normalize`]d or decoded state, else this is a linear scan.
    pub fn may_contain(&self, key: u64) -> bool {
        if self.sorted {
            self.keys.binary_search(&key).is_ok()
        } else {
            self.keys.contains(&key)
        }
    }

    /// Sorts and deduplicates the keys.
    pub fn normalize(&mut self) {
        if !self.sorted {
            self.keys.sort_unstable();
            self.keys.dedup();
            self.sorted = true;
        }
    }

    /// How many distinct keys (after [`SeenIds::normalize`]).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no id was noted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a snapshot holds: the folded document and the ids its events carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotState {
    /// The aggregate's document at `folded.version`.
    pub folded: Folded,
    /// The ids of events `1..=folded.version`.
    pub seen: SeenIds,
}

impl SnapshotState {
    /// Encodes the state: magic, format, checksum of the rest, version, document (JSON), keys.
    pub fn encode(&mut self) -> Vec<u8> {
        self.seen.normalize();
        let doc = serde_json::to_vec(&self.folded.doc).unwrap_or_default();
        let mut body = Vec::with_capacity(16 + doc.len() + 8 * self.seen.keys.len());
        body.extend_from_slice(&self.folded.version.to_le_bytes());
        body.extend_from_slice(&(doc.len() as u64).to_le_bytes());
        body.extend_from_slice(&doc);
        body.extend_from_slice(&(self.seen.keys.len() as u64).to_le_bytes());
        for key in &self.seen.keys {
            body.extend_from_slice(&key.to_le_bytes());
        }
        let mut out = Vec::with_capacity(body.len() + 13);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&fnv1a(FORMAT, &body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes what [`SnapshotState::encode`] wrote; `None` for anything else (another format,
    /// a bad checksum, a truncated or inconsistent body): such a snapshot is ignored.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let (&format, rest) = rest.split_first()?;
        if format != FORMAT {
            return None;
        }
        let (checksum, body) = take_u64(rest)?;
        if fnv1a(FORMAT, body) != checksum {
            return None;
        }
        let (version, rest) = take_u64(body)?;
        let (doc_len, rest) = take_u64(rest)?;
        let doc_len = usize::try_from(doc_len).ok()?;
        if doc_len > rest.len() {
            return None;
        }
        let (doc, rest) = rest.split_at(doc_len);
        let doc: Doc = serde_json::from_slice(doc).ok()?;
        if doc_version(&doc) != version {
            return None;
        }
        let (n, rest) = take_u64(rest)?;
        if rest.len() as u64 != n.checked_mul(8)? {
            return None;
        }
        let keys: Vec<u64> = rest
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if !keys.windows(2).all(|w| w[0] < w[1]) {
            return None;
        }
        Some(Self {
            folded: Folded { doc, version },
            seen: SeenIds { keys, sorted: true },
        })
    }
}

fn take_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    if bytes.len() < 8 {
        return None;
    }
    let (head, rest) = bytes.split_at(8);
    Some((u64::from_le_bytes(head.try_into().ok()?), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bookshop::Book;
    use crate::cart::Cart;
    use crate::{RecordedEvent, StreamId};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn item_added(version: u64, schema: u32, sku: &str, qty: i64) -> RecordedEvent {
        let data = if schema == 1 {
            serde_json::json!({ "sku": sku, "qty": qty })
        } else {
            serde_json::json!({ "sku": sku, "quantity": qty, "unit_price_cents": 100 })
        };
        let mut metadata = BTreeMap::new();
        if version % 3 == 0 {
            metadata.insert(
                crate::event::COMMAND_ID_KEY.to_owned(),
                format!("cmd-{version}"),
            );
        }
        RecordedEvent {
            stream: StreamId::new("cart", "c1").expect("valid"),
            version,
            event_id: Uuid::new_v4(),
            event_type: "ItemAdded".into(),
            schema_version: schema,
            content_type: crate::JSON_CONTENT_TYPE.into(),
            data: serde_json::to_vec(&data).expect("json"),
            metadata,
            recorded_at_us: 0,
        }
    }

    fn events(spec: &[(bool, u8, i8)]) -> Vec<RecordedEvent> {
        spec.iter()
            .enumerate()
            .map(|(i, (v1, sku, qty))| {
                item_added(
                    i as u64 + 1,
                    if *v1 { 1 } else { 2 },
                    &format!("sku{}", sku % 4),
                    i64::from(*qty),
                )
            })
            .collect()
    }

    #[test]
    fn fingerprints_differ_by_kind_and_are_stable() {
        assert_eq!(fingerprint::<Cart>(), fingerprint::<Cart>());
        assert_ne!(fingerprint::<Cart>(), fingerprint::<Book>());
        assert!(fingerprint::<Cart>().starts_with("cart-"));
        assert_eq!(
            &*fingerprint::<Cart>(),
            compute_fingerprint::<Cart>().as_str()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A fold continued from a decoded snapshot equals the fold of the whole stream, for
        /// any split point, over events of both schema versions (v1 ones are upcast).
        #[test]
        fn snapshot_plus_tail_is_the_full_fold(
            spec in prop::collection::vec((any::<bool>(), any::<u8>(), -3i8..5), 1..40),
            split in any::<prop::sample::Index>(),
        ) {
            let events = events(&spec);
            let projection = <Cart as Aggregate>::Projection::default();
            let mut full = Folded::default();
            full.extend(&projection, &events).expect("projectable");

            let at = split.index(events.len() + 1);
            let mut state = SnapshotState::default();
            state.folded.extend(&projection, &events[..at]).expect("projectable");
            for e in &events[..at] {
                state.seen.note(e);
            }
            let bytes = state.encode();
            let mut resumed = SnapshotState::decode(&bytes).expect("decodes");
            prop_assert_eq!(&resumed.folded, &state.folded);
            for e in &events[..at] {
                prop_assert!(resumed.seen.may_contain(event_key(&e.event_id)));
            }
            for e in &events[at..] {
                prop_assert!(!resumed.seen.may_contain(event_key(&e.event_id)));
            }
            resumed.folded.extend(&projection, &events[at..]).expect("projectable");
            prop_assert_eq!(resumed.folded, full);
        }

        /// Any change to the bytes, or any cut, makes a snapshot undecodable.
        #[test]
        fn corrupt_snapshots_do_not_decode(
            spec in prop::collection::vec((any::<bool>(), any::<u8>(), 1i8..5), 1..20),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let events = events(&spec);
            let mut state = SnapshotState::default();
            state.folded.extend(&<Cart as Aggregate>::Projection::default(), &events).expect("ok");
            for e in &events {
                state.seen.note(e);
            }
            let bytes = state.encode();
            let mut flipped = bytes.clone();
            let i = flip.index(flipped.len());
            flipped[i] ^= 1 << bit;
            prop_assert!(SnapshotState::decode(&flipped).is_none());
            let cut = cut.index(bytes.len());
            prop_assert!(SnapshotState::decode(&bytes[..cut]).is_none());
        }
    }

    #[test]
    fn command_ids_are_noted() {
        let events = events(&[(true, 1, 1), (false, 2, 1), (false, 3, 2)]);
        let mut state = SnapshotState::default();
        for e in &events {
            state.seen.note(e);
        }
        let decoded = SnapshotState::decode(&state.encode()).expect("decodes");
        assert!(decoded.seen.may_contain(command_key("cmd-3")));
        assert!(!decoded.seen.may_contain(command_key("cmd-4")));
    }
}
