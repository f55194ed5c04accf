//! The one idempotency rule of [`crate::EventStore::append`], as pure functions that every
//! adapter calls, so that the adapters cannot drift apart.
//!
//! An append is a *repeat* only if its events are exactly the events of one earlier append of
//! the stream: every id found, at consecutive versions starting where that append started and
//! ending where it ended, with the same contents. Anything else that carries a known id is
//! refused as [`StoreError::EventIdReused`], naming the first offending event. Judging takes two
//! steps because the second needs the stored payloads, which adapters read only when the first
//! step says they might match: [`check_ids`], then [`check_contents`].

use crate::StoreError;
use esq_domain::{AppendResult, NewEvent, RecordedEvent};

/// Where the store holds an id of the append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Known {
    /// The version of the event with this id.
    pub(crate) version: u64,
    /// First and last version of the append that stored it, when the store recorded them
    /// (CQL rows written before the columns existed have none).
    pub(crate) append: Option<(u64, u64)>,
}

/// The verdict of [`check_ids`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdCheck {
    /// No id of the append is in the stream.
    New,
    /// The ids are exactly those of the append stored at `first_version..`: a repeat if the
    /// contents match too ([`check_contents`]).
    Candidate {
        /// Version of the first event of the stored append.
        first_version: u64,
    },
    /// Known ids, but not as a whole earlier append.
    Reused(StoreError),
}

/// Judges an append by where its ids are stored: `known[i]` is where `events[i].event_id` is,
/// if anywhere.
pub(crate) fn check_ids(events: &[NewEvent], known: &[Option<Known>]) -> IdCheck {
    let Some(first_known) = known.iter().position(Option::is_some) else {
        return IdCheck::New;
    };
    let n = events.len() as u64;
    let whole = match known.first() {
        Some(Some(first)) if known.len() == events.len() => {
            let v0 = first.version;
            known.iter().enumerate().all(|(i, k)| match k {
                Some(k) => {
                    k.version == v0 + i as u64
                        && k.append.is_none_or(|(a, b)| a == v0 && b == v0 + n - 1)
                }
                None => false,
            })
        }
        _ => false,
    };
    if whole {
        if let Some(Some(first)) = known.first() {
            return IdCheck::Candidate {
                first_version: first.version,
            };
        }
    }
    let version = known[first_known].map_or(0, |k| k.version);
    IdCheck::Reused(StoreError::EventIdReused {
        index: first_known,
        event_id: events[first_known].event_id,
        version,
    })
}

/// Compares a [`IdCheck::Candidate`]'s stored events (`stored`, at the candidate's versions, in
/// order) with the append: the original result if every event is the same, else
/// [`StoreError::EventIdReused`] for the first that differs.
pub(crate) fn check_contents(
    events: &[NewEvent],
    stored: &[RecordedEvent],
) -> Result<AppendResult, StoreError> {
    let same = |e: &NewEvent, r: &RecordedEvent| {
        e.event_id == r.event_id
            && e.event_type == r.event_type
            && e.schema_version == r.schema_version
            && e.content_type == r.content_type
            && e.data == r.data
            && e.metadata == r.metadata
    };
    let consecutive = stored.windows(2).all(|w| w[1].version == w[0].version + 1);
    for (index, e) in events.iter().enumerate() {
        match stored.get(index) {
            Some(r) if consecutive && same(e, r) => {}
            other => {
                return Err(StoreError::EventIdReused {
                    index,
                    event_id: e.event_id,
                    version: other.map_or(0, |r| r.version),
                })
            }
        }
    }
    match (stored.first(), stored.get(events.len().wrapping_sub(1))) {
        (Some(first), Some(last)) => Ok(AppendResult {
            first_version: first.version,
            last_version: last.version,
            committed_at_us: first.recorded_at_us,
        }),
        _ => Err(StoreError::Internal(
            "an append needs at least one event".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use esq_domain::StreamId;
    use std::collections::BTreeMap;
    use uuid::Uuid;

    fn event(id: u128) -> NewEvent {
        NewEvent {
            event_id: Uuid::from_u128(id),
            event_type: "E".into(),
            schema_version: 1,
            content_type: "application/json".into(),
            data: format!("{{\"id\":{id}}}").into_bytes(),
            metadata: BTreeMap::new(),
        }
    }

    fn recorded(e: &NewEvent, version: u64) -> RecordedEvent {
        e.recorded_as(&StreamId::new("s", "1").expect("valid"), version, 7)
    }

    fn at(version: u64, append: (u64, u64)) -> Option<Known> {
        Some(Known {
            version,
            append: Some(append),
        })
    }

    #[test]
    fn only_a_whole_earlier_append_is_a_candidate() {
        let b = [event(1), event(2), event(3)];
        assert_eq!(check_ids(&b, &[None, None, None]), IdCheck::New);
        assert_eq!(
            check_ids(&b, &[at(4, (4, 6)), at(5, (4, 6)), at(6, (4, 6))]),
            IdCheck::Candidate { first_version: 4 }
        );
        // A prefix, a suffix, and ids in another order.
        let reused = |check: IdCheck| match check {
            IdCheck::Reused(StoreError::EventIdReused { index, version, .. }) => (index, version),
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            reused(check_ids(&b[..2], &[at(4, (4, 6)), at(5, (4, 6))])),
            (0, 4)
        );
        assert_eq!(
            reused(check_ids(&b[1..], &[at(5, (4, 6)), at(6, (4, 6))])),
            (0, 5)
        );
        assert_eq!(
            reused(check_ids(&b[..2], &[at(5, (4, 6)), at(4, (4, 6))])),
            (0, 5)
        );
        // A new id before a known one names the known one.
        assert_eq!(reused(check_ids(&b[..2], &[None, at(2, (1, 2))])), (1, 2));
        // Two appends' events together are not one append.
        assert_eq!(
            reused(check_ids(&b[..2], &[at(1, (1, 1)), at(2, (2, 2))])),
            (0, 1)
        );
        // Rows without recorded append bounds are judged by their ids alone.
        let legacy = |v| {
            Some(Known {
                version: v,
                append: None,
            })
        };
        assert_eq!(
            check_ids(&b[..2], &[legacy(1), legacy(2)]),
            IdCheck::Candidate { first_version: 1 }
        );
    }

    #[test]
    fn a_candidate_is_a_repeat_only_with_the_same_contents() {
        let b = [event(1), event(2)];
        let stored = [recorded(&b[0], 3), recorded(&b[1], 4)];
        assert_eq!(
            check_contents(&b, &stored),
            Ok(AppendResult {
                first_version: 3,
                last_version: 4,
                committed_at_us: 7
            })
        );
        for change in 0..4 {
            let mut other = b.clone();
            match change {
                0 => other[1].data = b"{}".to_vec(),
                1 => other[1].event_type = "F".into(),
                2 => {
                    other[1].metadata.insert("k".into(), "v".into());
                }
                _ => other[1].schema_version = 2,
            }
            assert_eq!(
                check_contents(&other, &stored),
                Err(StoreError::EventIdReused {
                    index: 1,
                    event_id: b[1].event_id,
                    version: 4
                }),
                "change {change}"
            );
        }
        assert!(matches!(
            check_contents(&b, &stored[..1]),
            Err(StoreError::EventIdReused { index: 1, .. })
        ));
    }
}
