//! Replay previews (dry runs): fold a stream along another timeline — some events skipped,
//! moved or inserted, the fold stopped early — and say what the state would be and which
//! rules the new timeline breaks, where. Nothing here writes anything.
//!
//! **One semantics.** The new timeline is folded by the same code as the stream itself: for a
//! stream type an aggregate owns, its projection document through [`Folded::extend`] (the
//! aggregate's state is read from it with [`Aggregate::from_doc`]); for any other stream, the
//! generic [`StateProjection`]. Every event of an owned stream is checked, in the state the
//! events before it on the new timeline leave, with [`check_event`] (the rule behind raw
//! appends); unlike an append, a preview reports every refusal with its position and goes on,
//! folding the event anyway, as the store would have held it.
//!
//! **Positions.** Edits name events by their version in the stream today, and places by the
//! gap after an original version: position `p` is right after the event at version `p`
//! (`0`: before the first event), wherever that event itself goes. Several events placed in
//! one gap keep the order of the edits that place them. So the meaning of an edit does not
//! depend on the other edits.

use crate::aggregate::{check_event, Aggregate, Folded};
use crate::bookshop::{self, Book};
use crate::cart::{self, Cart};
use crate::event::{MAX_APPEND_BYTES, MAX_EVENTS_PER_APPEND};
use crate::projection::{Changes, Doc, Projection, VERSION_FIELD};
use crate::state::StateProjection;
use crate::{DomainError, NewEvent, RecordedEvent, StreamId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

/// Most edits in one preview or saved timeline.
pub const MAX_EDITS: usize = 100;
/// Most events inserted by all the edits of one preview: one append's worth, so that the
/// corrective append is always a valid append.
pub const MAX_INSERTED_EVENTS: usize = MAX_EVENTS_PER_APPEND;
/// Longest stream a preview folds, in events: a preview holds the whole stream in memory.
pub const MAX_STREAM_EVENTS: u64 = 10_000;
/// Most payload and metadata bytes of the stream a preview folds (it holds them all).
pub const MAX_STREAM_BYTES: usize = 64 << 20;

/// One change to a stream's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "edit", rename_all = "snake_case")]
pub enum Edit {
    /// Leave out the event at `version`.
    Skip {
        /// The event's version today.
        version: u64,
    },
    /// Take the event at `version` out of its place and put it at `to_position`.
    Move {
        /// The event's version today.
        version: u64,
        /// Where it goes: right after the event at this version today (0: first).
        to_position: u64,
    },
    /// Insert new events at `position`.
    Insert {
        /// Right after the event at this version today (0: first).
        position: u64,
        /// The events, in order.
        events: Vec<NewEvent>,
    },
    /// End the timeline right after the event at `version` (wherever it ends up).
    StopAt {
        /// The event's version today.
        version: u64,
    },
}

impl Edit {
    /// The edit's name as the API spells it: `skip`, `move`, `insert`, `stop_at`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Skip { .. } => "skip",
            Self::Move { .. } => "move",
            Self::Insert { .. } => "insert",
            Self::StopAt { .. } => "stop_at",
        }
    }
}

/// Where an event of the new timeline comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The stream's event at this version today.
    Original(u64),
    /// The `index`th event inserted by `edits[edit]`.
    Inserted {
        /// The index of the [`Edit::Insert`] in the edits.
        edit: usize,
        /// The event's index in that edit.
        index: usize,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Original(v) => write!(f, "v{v}"),
            Self::Inserted { edit, index } => write!(f, "inserted edits[{edit}].events[{index}]"),
        }
    }
}

/// One event of the new timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its position on the new timeline, from 1 (its version there).
    pub position: u64,
    /// Where it comes from.
    pub origin: Origin,
    /// The event as it is folded (an original keeps its id, payload and recorded time).
    pub event: RecordedEvent,
}

/// An event of the new timeline that the stream's aggregate would refuse where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Its position on the new timeline.
    pub position: u64,
    /// Where it comes from.
    pub origin: Origin,
    /// Its event type.
    pub event_type: String,
    /// The rule it breaks (or what does not decode).
    pub reason: String,
    /// The edits that make this timeline, in words (e.g. `v2 is skipped`); empty without
    /// edits.
    pub context: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "position {} ({} {}): {}",
            self.position, self.origin, self.event_type, self.reason
        )?;
        if !self.context.is_empty() {
            write!(f, ", once {}", self.context)?;
        }
        Ok(())
    }
}

/// The edits in words, for violation messages: `v2 is skipped and v5 is moved first`.
pub fn describe(edits: &[Edit]) -> String {
    let place = |p: u64| match p {
        0 => "first".to_owned(),
        p => format!("after v{p}"),
    };
    let parts: Vec<String> = edits
        .iter()
        .map(|edit| match edit {
            Edit::Skip { version } => format!("v{version} is skipped"),
            Edit::Move {
                version,
                to_position,
            } => format!("v{version} is moved {}", place(*to_position)),
            Edit::Insert { position, events } => match events.as_slice() {
                [one] => format!("{} is inserted {}", one.event_type, place(*position)),
                many => format!("{} events are inserted {}", many.len(), place(*position)),
            },
            Edit::StopAt { version } => format!("the timeline stops at v{version}"),
        })
        .collect();
    match parts.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// One document field that differs between today and the new timeline (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    /// The document field, e.g. `item:apple` (cart), `title` (book), `f.name` (other streams).
    pub field: String,
    /// Its value today.
    pub before: Option<String>,
    /// Its value at the end of the new timeline.
    pub after: Option<String>,
}

/// What a replay preview finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    /// The new timeline, in order.
    pub timeline: Vec<Step>,
    /// Every refused event of the new timeline, in timeline order (always empty for
    /// free-form stream types, which have no rules).
    pub violations: Vec<Violation>,
    /// The document of the stream today.
    pub today: Folded,
    /// The document at the end of the new timeline.
    pub after: Folded,
    /// The fields that differ, by field name (the version field `_v` left out).
    pub diff: Vec<FieldChange>,
    /// The inserted events that made it onto the timeline, in timeline order.
    pub inserted: Vec<NewEvent>,
}

/// Previews `edits` on a stream whose events today are `history` (versions 1, 2, ... in
/// order). Inserted events are folded as recorded at `now_us`. Bad edits are
/// [`DomainError::Invalid`] naming `edits[i]…`; over the limits [`DomainError::TooLarge`].
pub fn preview(
    stream: &StreamId,
    history: &[RecordedEvent],
    edits: &[Edit],
    now_us: i64,
) -> Result<Preview, DomainError> {
    let mut preview = match stream.kind.as_str() {
        cart::KIND => preview_owned::<Cart>(stream, history, edits, now_us)?,
        bookshop::KIND => preview_owned::<Book>(stream, history, edits, now_us)?,
        _ => {
            let timeline = plan(stream, history, edits, now_us)?;
            fold_timeline(&StateProjection, history, timeline, |_, _| Ok(()))?
        }
    };
    if !preview.violations.is_empty() {
        let context = describe(edits);
        for v in &mut preview.violations {
            v.context.clone_from(&context);
        }
    }
    Ok(preview)
}

fn preview_owned<A: Aggregate>(
    stream: &StreamId,
    history: &[RecordedEvent],
    edits: &[Edit],
    now_us: i64,
) -> Result<Preview, DomainError> {
    let timeline = plan(stream, history, edits, now_us)?;
    let check = |doc: &Doc, event: &RecordedEvent| {
        check_event::<A>(&stream.id, &A::from_doc(doc), &as_new(event)).map_err(|r| r.to_string())
    };
    fold_timeline(&A::Projection::default(), history, timeline, check)
}

/// Checks the edits against the stream and lays out the new timeline (versions renumbered
/// from 1).
fn plan(
    stream: &StreamId,
    history: &[RecordedEvent],
    edits: &[Edit],
    now_us: i64,
) -> Result<Vec<Step>, DomainError> {
    if edits.len() > MAX_EDITS {
        return Err(DomainError::too_large(
            "edits",
            format!("holds {} edits, at most {MAX_EDITS} allowed", edits.len()),
        ));
    }
    let head = history.len() as u64;
    if history.iter().zip(1..).any(|(e, v)| e.version != v) {
        return Err(DomainError::invalid(
            "stream",
            "history must hold every version from 1",
        ));
    }
    // Fields are named as the client spells them: `edits[i].<edit>.<field>`.
    let field = |i: usize, name: &str| format!("edits[{i}].{}.{name}", edits[i].name());
    let version = |i: usize, v: u64| {
        if (1..=head).contains(&v) {
            Ok(v)
        } else {
            Err(DomainError::invalid(
                field(i, "version"),
                format!("stream {stream} has no version {v}; its version is {head}"),
            ))
        }
    };
    let position = |i: usize, name: &str, p: u64| {
        if p <= head {
            Ok(p)
        } else {
            Err(DomainError::invalid(
                field(i, name),
                format!("position {p} is past the end of stream {stream} (version {head})"),
            ))
        }
    };
    // What happens to each original version, and what each gap receives.
    let mut taken: HashMap<u64, usize> = HashMap::new();
    let mut gaps: Vec<Vec<Origin>> = vec![Vec::new(); history.len() + 1];
    let mut stop: Option<(usize, u64)> = None;
    let mut inserted_ids = HashSet::new();
    let (mut inserted, mut inserted_bytes) = (0usize, 0usize);
    let mut take = |i: usize, v: u64| match taken.insert(v, i) {
        Some(j) => Err(DomainError::invalid(
            field(i, "version"),
            format!("version {v} is already skipped or moved by edits[{j}]"),
        )),
        None => Ok(()),
    };
    for (i, edit) in edits.iter().enumerate() {
        match edit {
            Edit::Skip { version: v } => take(i, version(i, *v)?)?,
            Edit::Move {
                version: v,
                to_position,
            } => {
                take(i, version(i, *v)?)?;
                let p = position(i, "to_position", *to_position)?;
                gaps[p as usize].push(Origin::Original(*v));
            }
            Edit::Insert {
                position: p,
                events,
            } => {
                let p = position(i, "position", *p)?;
                if events.is_empty() {
                    return Err(DomainError::invalid(
                        field(i, "events"),
                        "must hold at least one event",
                    ));
                }
                for (index, e) in events.iter().enumerate() {
                    let at = field(i, &format!("events[{index}]"));
                    e.validate(&at)?;
                    if !inserted_ids.insert(e.event_id) {
                        return Err(DomainError::invalid(
                            format!("{at}.event_id"),
                            "repeats the id of another inserted event",
                        ));
                    }
                    if let Some(there) = history.iter().find(|h| h.event_id == e.event_id) {
                        return Err(DomainError::invalid(
                            format!("{at}.event_id"),
                            format!(
                                "{} is already recorded in stream {stream} at version {}: an \
                                 inserted event is a new one",
                                e.event_id, there.version
                            ),
                        ));
                    }
                    inserted += 1;
                    inserted_bytes += e.data.len();
                    gaps[p as usize].push(Origin::Inserted { edit: i, index });
                }
            }
            Edit::StopAt { version: v } => {
                if let Some((j, _)) = stop {
                    return Err(DomainError::invalid(
                        format!("edits[{i}]"),
                        format!("the timeline already stops at edits[{j}]"),
                    ));
                }
                stop = Some((i, version(i, *v)?));
            }
        }
    }
    if inserted > MAX_INSERTED_EVENTS {
        return Err(DomainError::too_large(
            "edits",
            format!("insert {inserted} events, at most {MAX_INSERTED_EVENTS} allowed"),
        ));
    }
    if inserted_bytes > MAX_APPEND_BYTES {
        return Err(DomainError::too_large(
            "edits",
            format!(
                "insert payloads of {inserted_bytes} bytes, at most {MAX_APPEND_BYTES} allowed"
            ),
        ));
    }
    if let Some((i, v)) = stop {
        if let Some(Edit::Skip { .. }) = taken.get(&v).map(|&j| &edits[j]) {
            return Err(DomainError::invalid(
                field(i, "version"),
                format!("version {v} is skipped, so the timeline cannot stop at it"),
            ));
        }
    }
    let mut order: Vec<Origin> = Vec::new();
    for (gap, placed) in gaps.into_iter().enumerate() {
        if gap > 0 && !taken.contains_key(&(gap as u64)) {
            order.push(Origin::Original(gap as u64));
        }
        order.extend(placed);
    }
    if let Some((_, v)) = stop {
        let end = order
            .iter()
            .position(|o| *o == Origin::Original(v))
            .expect("a stop version that is not skipped is on the timeline");
        order.truncate(end + 1);
    }
    Ok(order
        .into_iter()
        .zip(1..)
        .map(|(origin, position)| {
            let event = match origin {
                Origin::Original(v) => RecordedEvent {
                    version: position,
                    ..history[v as usize - 1].clone()
                },
                Origin::Inserted { edit, index } => {
                    let Edit::Insert { events, .. } = &edits[edit] else {
                        unreachable!("inserted origins name insert edits")
                    };
                    events[index].recorded_as(stream, position, now_us)
                }
            };
            Step {
                position,
                origin,
                event,
            }
        })
        .collect())
}

/// Folds today's stream and the new timeline through `projection`, checking each timeline
/// event with `check` on the document before it.
fn fold_timeline<P: Projection>(
    projection: &P,
    history: &[RecordedEvent],
    timeline: Vec<Step>,
    check: impl Fn(&Doc, &RecordedEvent) -> Result<(), String>,
) -> Result<Preview, DomainError> {
    let mut today = Folded::default();
    // A stream whose history its own projection cannot read has no preview.
    today.extend(projection, history)?;
    let mut after = Folded::default();
    let mut violations = Vec::new();
    for step in &timeline {
        let refused = check(&after.doc, &step.event).err();
        let unreadable = match after.extend(projection, std::slice::from_ref(&step.event)) {
            Ok(()) => None,
            Err(e) => {
                // The event is left out of the fold (a no-op at its version), and refused.
                after.extend(&NoChange, std::slice::from_ref(&step.event))?;
                Some(e.reason)
            }
        };
        if let Some(reason) = refused.or(unreadable) {
            violations.push(Violation {
                position: step.position,
                origin: step.origin,
                event_type: step.event.event_type.clone(),
                reason,
                context: String::new(),
            });
        }
    }
    let inserted = timeline
        .iter()
        .filter(|s| matches!(s.origin, Origin::Inserted { .. }))
        .map(|s| as_new(&s.event))
        .collect();
    Ok(Preview {
        diff: diff(&today.doc, &after.doc),
        timeline,
        violations,
        today,
        after,
        inserted,
    })
}

/// The projection of an event left out of a fold: no change, the version moves past it.
struct NoChange;

impl Projection for NoChange {
    fn name(&self) -> &'static str {
        "no-change"
    }

    fn handles(&self, _stream_kind: &str) -> bool {
        true
    }

    fn project(&self, _event: &RecordedEvent, _out: &mut Changes) -> Result<(), String> {
        Ok(())
    }
}

/// The fields whose values differ between two documents, by name; the version left out.
pub fn diff(before: &Doc, after: &Doc) -> Vec<FieldChange> {
    let fields: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    fields
        .into_iter()
        .filter(|f| *f != VERSION_FIELD && before.get(*f) != after.get(*f))
        .map(|f| FieldChange {
            field: f.clone(),
            before: before.get(f).cloned(),
            after: after.get(f).cloned(),
        })
        .collect()
}

/// A recorded event as the append that would record it.
fn as_new(e: &RecordedEvent) -> NewEvent {
    NewEvent {
        event_id: e.event_id,
        event_type: e.event_type.clone(),
        schema_version: e.schema_version,
        content_type: e.content_type.clone(),
        data: e.data.clone(),
        metadata: e.metadata.clone(),
    }
}

/// A named what-if timeline, as saved (the payload of a [`TIMELINE_SAVED`] event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTimeline {
    /// The stream it edits.
    pub stream: StreamId,
    /// The edits.
    pub edits: Vec<Edit>,
}

/// The stream type holding saved timelines, one free-form stream per name.
pub const TIMELINE_KIND: &str = "esq-timeline";
/// The event type of a saved timeline; the stream's newest one is the timeline.
pub const TIMELINE_SAVED: &str = "TimelineSaved";

/// The stream holding the timeline `name`; its errors name the field `name`.
pub fn timeline_stream(name: &str) -> Result<StreamId, DomainError> {
    crate::ids::validate_id("name", name)?;
    StreamId::new(TIMELINE_KIND, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cart::CartCommand;
    use crate::testing::Given;
    use serde_json::json;

    fn add(sku: &str, quantity: i64) -> CartCommand {
        CartCommand::AddItem {
            sku: sku.into(),
            quantity,
            unit_price_cents: 10,
        }
    }

    fn remove(sku: &str, quantity: i64) -> CartCommand {
        CartCommand::RemoveItem {
            sku: sku.into(),
            quantity,
        }
    }

    /// v1 add apple ×2, v2 add pear ×1, v3 add apple ×1, v4 remove pear ×1, v5 checkout.
    fn cart() -> Given<Cart> {
        Given::<Cart>::new("c-1")
            .ok(add("apple", 2))
            .ok(add("pear", 1))
            .ok(add("apple", 1))
            .ok(remove("pear", 1))
            .ok(CartCommand::Checkout)
    }

    fn run(given: &Given<Cart>, edits: &[Edit]) -> Preview {
        preview(&given.stream, &given.history, edits, 7).expect("valid edits")
    }

    fn origins(p: &Preview) -> Vec<Origin> {
        p.timeline.iter().map(|s| s.origin).collect()
    }

    fn item_added(sku: &str, quantity: i64) -> NewEvent {
        NewEvent::json(
            "ItemAdded",
            2,
            &json!({"sku": sku, "quantity": quantity, "unit_price_cents": 10}),
        )
    }

    #[test]
    fn no_edits_is_today() {
        let given = cart();
        let p = run(&given, &[]);
        assert_eq!(p.after, given.folded);
        assert_eq!(p.today, given.folded);
        assert!(p.diff.is_empty() && p.violations.is_empty() && p.inserted.is_empty());
        assert_eq!(p.timeline.len(), 5);
    }

    #[test]
    fn skip_reports_every_violation_where_it_happens_and_folds_on() {
        let given = cart();
        let p = run(&given, &[Edit::Skip { version: 2 }]);
        use Origin::Original as O;
        assert_eq!(origins(&p), vec![O(1), O(3), O(4), O(5)]);
        // Removing the pear (v4, now at position 3) breaks the rules; the fold goes on (the
        // line stays gone), so the checkout (v5) records the same total as today.
        let at: Vec<(u64, Origin)> = p
            .violations
            .iter()
            .map(|v| (v.position, v.origin))
            .collect();
        assert_eq!(at, vec![(3, O(4))]);
        assert!(
            p.violations[0].reason.contains("pear"),
            "{:?}",
            p.violations
        );
        assert_eq!(
            p.violations[0].to_string(),
            "position 3 (v4 ItemRemoved): cannot remove sku pear: it is not in the cart, \
             once v2 is skipped"
        );
        let state: Cart = p.after.state();
        assert_eq!(state.lines["apple"].quantity, 3);
        assert!(!state.lines.contains_key("pear"));
        assert_eq!(p.after.version, 4);
        // The pear line: it held 0 (no field) today and still does; only the price differs.
        assert_eq!(
            p.diff,
            vec![FieldChange {
                field: "price:pear".into(),
                before: Some("10".into()),
                after: None,
            }]
        );
    }

    #[test]
    fn move_places_an_event_after_an_original_version() {
        let given = cart();
        // The checkout moves to the front: the cart is empty then, and closed after it.
        let p = run(
            &given,
            &[Edit::Move {
                version: 5,
                to_position: 0,
            }],
        );
        use Origin::Original as O;
        assert_eq!(origins(&p), vec![O(5), O(1), O(2), O(3), O(4)]);
        let at: Vec<u64> = p.violations.iter().map(|v| v.position).collect();
        assert_eq!(at, vec![1, 2, 3, 4, 5]);
        assert!(p.violations[1].reason.contains("checked out"));
        // Moving v2 after v4 removes the pear before it is added.
        let p = run(
            &given,
            &[Edit::Move {
                version: 2,
                to_position: 4,
            }],
        );
        assert_eq!(origins(&p), vec![O(1), O(3), O(4), O(2), O(5)]);
        let at: Vec<(u64, Origin)> = p
            .violations
            .iter()
            .map(|v| (v.position, v.origin))
            .collect();
        assert_eq!(at, vec![(3, O(4)), (5, O(5))]);
        assert_eq!(p.after.state::<Cart>().lines["pear"].quantity, 1);
    }

    #[test]
    fn insert_adds_events_and_they_are_the_corrective_append() {
        let given = cart();
        let fig = item_added("fig", 4);
        let p = run(
            &given,
            &[Edit::Insert {
                position: 4,
                events: vec![fig.clone()],
            }],
        );
        // Inserting before the checkout makes the recorded total wrong, and says so.
        assert_eq!(p.timeline[4].origin, Origin::Inserted { edit: 0, index: 0 });
        assert_eq!(p.timeline[4].event.version, 5);
        assert_eq!(p.timeline[4].event.recorded_at_us, 7);
        let at: Vec<(u64, Origin)> = p
            .violations
            .iter()
            .map(|v| (v.position, v.origin))
            .collect();
        assert_eq!(at, vec![(6, Origin::Original(5))]);
        assert_eq!(p.inserted, vec![fig]);
        assert_eq!(p.after.state::<Cart>().lines["fig"].quantity, 4);
        assert!(p.diff.iter().any(|c| c.field == "item:fig"
            && c.before.is_none()
            && c.after.as_deref() == Some("4")));
    }

    #[test]
    fn stop_at_ends_the_timeline_after_that_event() {
        let given = cart();
        let p = run(&given, &[Edit::StopAt { version: 2 }]);
        assert_eq!(origins(&p), vec![Origin::Original(1), Origin::Original(2)]);
        assert!(p.violations.is_empty());
        let state: Cart = p.after.state();
        assert_eq!(state.status, crate::cart::CartStatus::Open);
        assert_eq!(state.lines["pear"].quantity, 1);
        // A stop follows its event where it moved to.
        let p = run(
            &given,
            &[
                Edit::Move {
                    version: 1,
                    to_position: 3,
                },
                Edit::StopAt { version: 1 },
            ],
        );
        use Origin::Original as O;
        assert_eq!(origins(&p), vec![O(2), O(3), O(1)]);
    }

    #[test]
    fn old_schema_versions_are_upcast_on_the_new_timeline_too() {
        // An ItemAdded of schema 1 ({sku, qty}) as an old client recorded it.
        let stream = StreamId::new(cart::KIND, "c-old").expect("valid");
        let mut history = Vec::new();
        crate::testing::record(
            &stream,
            &mut history,
            vec![NewEvent::json(
                "ItemAdded",
                1,
                &json!({"sku": "old", "qty": 2}),
            )],
        );
        let remove_one = NewEvent::json(
            "ItemRemoved",
            1,
            &json!({"sku": "old", "quantity": 1, "unit_price_cents": 0}),
        );
        let p = preview(
            &stream,
            &history,
            &[Edit::Insert {
                position: 1,
                events: vec![remove_one],
            }],
            0,
        )
        .expect("valid");
        assert!(p.violations.is_empty(), "{:?}", p.violations);
        assert_eq!(p.after.state::<Cart>().lines["old"].quantity, 1);
        assert_eq!(p.today.state::<Cart>().lines["old"].quantity, 2);
        assert_eq!(
            p.today.state::<Cart>(),
            crate::aggregate::load::<Cart>(&history).expect("load")
        );
    }

    #[test]
    fn free_form_streams_fold_the_generic_state_without_rules() {
        let stream = StreamId::new("order", "o-1").expect("valid");
        let mut history = Vec::new();
        crate::testing::record(
            &stream,
            &mut history,
            vec![
                NewEvent::json("Set", 1, &json!({"a": 1})),
                NewEvent::json("Set", 1, &json!({"a": 2, "b": true})),
            ],
        );
        let p = preview(&stream, &history, &[Edit::Skip { version: 2 }], 0).expect("valid");
        assert!(p.violations.is_empty());
        let field = |f: &str, before: Option<&str>, after: Option<&str>| FieldChange {
            field: f.into(),
            before: before.map(Into::into),
            after: after.map(Into::into),
        };
        assert_eq!(
            p.diff,
            vec![
                field("f.a", Some("2"), Some("1")),
                field("f.b", Some("true"), None)
            ]
        );
    }

    fn invalid_field(given: &Given<Cart>, edits: &[Edit]) -> String {
        match preview(&given.stream, &given.history, edits, 0) {
            Err(DomainError::Invalid { field, .. }) | Err(DomainError::TooLarge { field, .. }) => {
                field
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn bad_edits_name_the_edit() {
        let given = cart();
        let skip = |version| Edit::Skip { version };
        let stop = |version| Edit::StopAt { version };
        let to_far = Edit::Move {
            version: 1,
            to_position: 6,
        };
        let empty = Edit::Insert {
            position: 0,
            events: vec![],
        };
        let mut unnamed = item_added("x", 1);
        unnamed.event_type = String::new();
        let unnamed = Edit::Insert {
            position: 0,
            events: vec![unnamed],
        };
        let mut recorded = item_added("y", 1);
        recorded.event_id = given.history[2].event_id;
        let recorded = Edit::Insert {
            position: 5,
            events: vec![recorded],
        };
        let cases: Vec<(Vec<Edit>, &str)> = vec![
            (vec![recorded], "edits[0].insert.events[0].event_id"),
            (vec![skip(1), skip(6)], "edits[1].skip.version"),
            (vec![skip(0)], "edits[0].skip.version"),
            (vec![skip(2), skip(2)], "edits[1].skip.version"),
            (vec![to_far], "edits[0].move.to_position"),
            (vec![empty], "edits[0].insert.events"),
            (vec![stop(1), stop(2)], "edits[1]"),
            (vec![skip(3), stop(3)], "edits[1].stop_at.version"),
            (vec![unnamed], "edits[0].insert.events[0].type"),
        ];
        for (edits, field) in cases {
            assert_eq!(invalid_field(&given, &edits), field, "{edits:?}");
        }
    }

    #[test]
    fn limits_are_too_large() {
        let given = cart();
        let many = vec![Edit::StopAt { version: 1 }; MAX_EDITS + 1];
        assert!(matches!(
            preview(&given.stream, &given.history, &many, 0),
            Err(DomainError::TooLarge { .. })
        ));
        let events: Vec<NewEvent> = (0..=MAX_INSERTED_EVENTS)
            .map(|_| item_added("a", 1))
            .collect();
        let insert = [Edit::Insert {
            position: 0,
            events,
        }];
        assert!(matches!(
            preview(&given.stream, &given.history, &insert, 0),
            Err(DomainError::TooLarge { field, .. }) if field == "edits"
        ));
    }

    #[test]
    fn saved_timelines_round_trip_as_json() {
        let saved = SavedTimeline {
            stream: StreamId::new("cart", "c-1").expect("valid"),
            edits: vec![
                Edit::Skip { version: 2 },
                Edit::Insert {
                    position: 1,
                    events: vec![item_added("fig", 1)],
                },
            ],
        };
        let text = serde_json::to_string(&saved).expect("serializes");
        assert!(text.contains(r#""edit":"skip""#), "{text}");
        assert_eq!(
            serde_json::from_str::<SavedTimeline>(&text).expect("reads"),
            saved
        );
        assert!(timeline_stream("what-if.1").is_ok());
        assert!(
            matches!(timeline_stream("a b"), Err(DomainError::Invalid { field, .. }) if field == "name")
        );
    }
}
