//! The write-side model: an aggregate reads its state from a document and decides, from that
//! state alone, which new events a command produces.
//!
//! **One semantics.** What an event *means* is written once, as the aggregate's own
//! [`Aggregate::Projection`]: events become field operations on a document, applied by
//! [`projection::apply_to_doc`] (and by its Redis twin, which is property-tested against it).
//! The aggregate's state is read from that document ([`Aggregate::from_doc`]) and the read model
//! *is* that document, so the state a command is decided on and the state a query returns cannot
//! disagree, for any sequence of events, whatever was appended and however it was batched.
//!
//! **Event contracts.** A raw append to a stream type an aggregate owns is held to the same rules
//! as a command ([`check_append`]): the event must decode (known type, a schema version this
//! build reads, a payload of the right shape), and must be exactly what the aggregate would
//! decide for the command the event records ([`Aggregate::command_for`]) in the stream's state.
//!
//! Domain events are Rust enums tagged adjacently by their event type
//! (`#[serde(tag = "type", content = "data")]`); [`encode`] and [`decode`] turn them into stored
//! events and back, so the type name and payload shape are written down exactly once.

use crate::projection::{self, apply_to_doc, doc_version, Doc, Projection, Unprojectable};
use crate::{upcast, DomainError, NewEvent, RecordedEvent, StreamId};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};

/// An event-sourced aggregate: one stream of kind [`Aggregate::KIND`] per instance.
pub trait Aggregate: Sized + Send + Sync + 'static {
    /// The stream type of this aggregate's streams.
    const KIND: &'static str;
    /// What a client may ask this aggregate to do.
    type Command: Send + Sync;
    /// What happens to this aggregate: an adjacently tagged serde enum, one variant per event
    /// type, each at its type's current schema.
    type Event: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + schemars::JsonSchema;
    /// The projection whose document is this aggregate's state: the one place where the
    /// meaning of its events is written down.
    type Projection: Projection + Default;

    /// Reads the state from a document of [`Aggregate::Projection`] (an empty document is the
    /// state of a stream with no events).
    fn from_doc(doc: &Doc) -> Self;

    /// Decides the events a command produces from the current state (empty: a no-op).
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    /// The command whose decision `event` records, for checking raw appends: the event is
    /// accepted only if deciding this command yields exactly the event. Refuses events that no
    /// command of this stream could produce (e.g. a book created under another ISBN).
    fn command_for(stream_id: &str, event: &Self::Event) -> Result<Self::Command, DomainError>;
}

/// An aggregate's document and the stream version it reflects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Folded {
    /// The [`Aggregate::Projection`] document.
    pub doc: Doc,
    /// The last version folded (0: no events).
    pub version: u64,
}

impl Folded {
    /// Folds the next consecutive events of the stream (versions `version + 1 ..`) into the
    /// document through `projection`, exactly as a read store applies them; fails (changing
    /// nothing) on an event the projection cannot apply.
    pub fn extend<P: Projection + ?Sized>(
        &mut self,
        projection: &P,
        events: &[RecordedEvent],
    ) -> Result<(), Unprojectable> {
        if let Some(batch) = projection::batch(projection, events)? {
            apply_to_doc(&mut self.doc, &batch);
            self.version = doc_version(&self.doc);
        }
        Ok(())
    }

    /// The aggregate this document holds.
    pub fn state<A: Aggregate>(&self) -> A {
        A::from_doc(&self.doc)
    }
}

/// Rebuilds an aggregate from its stream, oldest event first, through its projection.
pub fn load<A: Aggregate>(events: &[RecordedEvent]) -> Result<A, Unprojectable> {
    let mut folded = Folded::default();
    folded.extend(&A::Projection::default(), events)?;
    Ok(folded.state())
}

/// Decides `command` on `state` and encodes the events at their current schema versions.
pub fn decide<A: Aggregate>(state: &A, command: &A::Command) -> Result<Vec<NewEvent>, DomainError> {
    Ok(state.decide(command)?.iter().map(encode).collect())
}

/// Turns a domain event into a JSON [`NewEvent`] at its type's current schema version.
///
/// # Panics
/// If `E` is not an adjacently tagged enum or its event type has no registered schema version:
/// both are programming errors that the domain's own tests exercise for every event.
pub fn encode<E: Serialize>(event: &E) -> NewEvent {
    let value = serde_json::to_value(event).expect("domain events serialize to JSON");
    let event_type = value["type"]
        .as_str()
        .expect("domain events are tagged with their event type");
    let version = upcast::current_schema_version(event_type)
        .expect("every domain event type has a registered schema version");
    NewEvent::json(event_type, version, &value["data"])
}

/// Decodes a recorded JSON event into a domain event, first lifting its payload to the current
/// schema. `None` for other content types, unknown event types and undecodable payloads.
pub fn decode<E: DeserializeOwned>(event: &RecordedEvent) -> Option<E> {
    decode_event(event).ok()
}

/// [`decode`], saying why an event does not decode (the reason a projection gives for an
/// event it cannot apply).
pub fn decode_event<E: DeserializeOwned>(event: &RecordedEvent) -> Result<E, String> {
    let data = event
        .json()
        .ok_or_else(|| format!("content type {:?} is not JSON", event.content_type))?;
    decode_parts(&event.event_type, event.schema_version, data).map_err(|(field, reason)| {
        format!(
            "{} (schema version {}): {field}: {reason}",
            event.event_type, event.schema_version
        )
    })
}

/// Decodes an event type, schema version and JSON payload, naming what is wrong.
fn decode_parts<E: DeserializeOwned>(
    event_type: &str,
    schema_version: u32,
    data: Value,
) -> Result<E, (&'static str, String)> {
    let (_, data) = upcast::upcast(event_type, schema_version, data).map_err(|e| match e {
        DomainError::Invalid { field, reason } if field == "schema_version" => {
            ("schema_version", reason)
        }
        DomainError::Invalid { reason, .. } => ("data", reason),
        other => ("data", other.to_string()),
    })?;
    serde_json::from_value(json!({ "type": event_type, "data": data }))
        .map_err(|e| ("data", crate::clip(&e.to_string(), 200)))
}

/// Checks a raw append to a stream of `A` against the stream's folded state: every event must
/// decode and be exactly what the aggregate decides for the command it records, in the state
/// the events before it leave. Malformed events are [`DomainError::Invalid`] (field
/// `events[i].…`), refused transitions [`DomainError::Rule`] naming `events[i]`.
pub fn check_append<A: Aggregate>(
    stream: &StreamId,
    folded: &Folded,
    events: &[NewEvent],
) -> Result<(), DomainError> {
    let projection = A::Projection::default();
    let mut folded = folded.clone();
    for (i, new) in events.iter().enumerate() {
        if new.metadata.contains_key(crate::event::COMMAND_ID_KEY) {
            return Err(DomainError::invalid(
                format!("events[{i}].metadata"),
                format!(
                    "{} is reserved for the events of commands, which it makes idempotent",
                    crate::event::COMMAND_ID_KEY
                ),
            ));
        }
        check_event::<A>(&stream.id, &folded.state(), new).map_err(|refusal| match refusal {
            Refusal::Malformed { field, reason } => {
                DomainError::invalid(format!("events[{i}].{field}"), reason)
            }
            Refusal::Rule(reason) => DomainError::Rule(format!(
                "events[{i}] ({}) is refused by stream type {}: {reason}",
                new.event_type,
                A::KIND
            )),
            Refusal::TooLarge { field, reason } => {
                DomainError::too_large(format!("events[{i}].{field}"), reason)
            }
        })?;
        let recorded = RecordedEvent {
            stream: stream.clone(),
            version: folded.version + 1,
            event_id: new.event_id,
            event_type: new.event_type.clone(),
            schema_version: new.schema_version,
            content_type: new.content_type.clone(),
            data: new.data.clone(),
            metadata: new.metadata.clone(),
            recorded_at_us: 0,
        };
        folded.extend(&projection, std::slice::from_ref(&recorded))?;
    }
    Ok(())
}

/// Why one event is outside an aggregate's contract, without saying where the event is (the
/// caller knows: `events[i]` of an append, a position of a replayed timeline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The event does not decode: `field` (`content_type`, `type`, `data`, `schema_version`)
    /// is wrong.
    Malformed {
        /// The event's field at fault, e.g. `type` or `data.quantity`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A field of the event's payload is over a limit the command would enforce.
    TooLarge {
        /// The event's field at fault, e.g. `data.sku`.
        field: String,
        /// The size found and the limit.
        reason: String,
    },
    /// The event decodes, but the aggregate would not record it in this state: the rule.
    Rule(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed { field, reason } => write!(f, "invalid {field}: {reason}"),
            Self::TooLarge { field, reason } => write!(f, "{field} too large: {reason}"),
            Self::Rule(reason) => f.write_str(reason),
        }
    }
}

/// Checks one event against `state`, the aggregate of stream `stream_id` before it: the event
/// must decode and be exactly what the aggregate decides for the command it records
/// ([`Aggregate::command_for`]). The one rule behind [`check_append`] and replay previews.
pub fn check_event<A: Aggregate>(
    stream_id: &str,
    state: &A,
    new: &NewEvent,
) -> Result<(), Refusal> {
    let event = decode_new::<A>(new)?;
    let command = A::command_for(stream_id, &event).map_err(|e| Refusal::Rule(e.to_string()))?;
    let decided = state.decide(&command).map_err(|e| match e {
        // A field the command would refuse is malformed in the event's payload too.
        DomainError::Invalid { field, reason } => Refusal::Malformed {
            field: format!("data.{field}"),
            reason,
        },
        DomainError::TooLarge { field, reason } => Refusal::TooLarge {
            field: format!("data.{field}"),
            reason,
        },
        other => Refusal::Rule(other.to_string()),
    })?;
    if decided.as_slice() != std::slice::from_ref(&event) {
        let would = match decided.as_slice() {
            [] => "nothing: the change it records is already the state".to_owned(),
            d => crate::clip(&serde_json::to_string(d).unwrap_or_default(), 300),
        };
        return Err(Refusal::Rule(format!(
            "in this state the stream records {would}"
        )));
    }
    Ok(())
}

/// Decodes a new event as an event of `A`, naming the malformed field.
fn decode_new<A: Aggregate>(new: &NewEvent) -> Result<A::Event, Refusal> {
    let malformed = |field: &str, reason| Refusal::Malformed {
        field: field.to_owned(),
        reason,
    };
    if !crate::event::is_json(&new.content_type) {
        return Err(malformed(
            "content_type",
            format!(
                "stream type {} takes JSON events ({}), not {}",
                A::KIND,
                crate::JSON_CONTENT_TYPE,
                crate::quote(&new.content_type)
            ),
        ));
    }
    let known = crate::contract::event_types::<A>();
    if !known.iter().any(|t| *t == new.event_type) {
        return Err(malformed(
            "type",
            format!(
                "{} is not an event of stream type {}; its events are {}",
                crate::quote(&new.event_type),
                A::KIND,
                known.join(", ")
            ),
        ));
    }
    let data: Value = serde_json::from_slice(&new.data)
        .map_err(|e| malformed("data", format!("is not JSON: {e}")))?;
    decode_parts::<A::Event>(&new.event_type, new.schema_version, data)
        .map_err(|(field, reason)| malformed(field, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cart::{Cart, CartCommand, CartEvent};
    use crate::testing::Given;

    #[test]
    fn load_folds_the_whole_stream() {
        let given = Given::<Cart>::new("c-1")
            .ok(CartCommand::AddItem {
                sku: "A".into(),
                quantity: 2,
                unit_price_cents: 5,
            })
            .ok(CartCommand::Checkout);
        assert_eq!(load::<Cart>(&given.history).expect("load"), given.state);
    }

    #[test]
    fn encode_and_decode_round_trip_at_the_current_schema() {
        let event = CartEvent::CheckedOut {
            total_cents: 10,
            item_count: 1,
        };
        let mut given = Given::<Cart>::new("c-1");
        crate::testing::record(&given.stream, &mut given.history, vec![encode(&event)]);
        let recorded = &given.history[0];
        assert_eq!(
            (recorded.event_type.as_str(), recorded.schema_version),
            ("CheckedOut", 1)
        );
        assert_eq!(decode::<CartEvent>(recorded), Some(event));
    }
}
