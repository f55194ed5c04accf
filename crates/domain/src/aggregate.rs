//! The write-side model: an aggregate folds its stream's events into state and decides, from that
//! state alone, which new events a command produces.
//!
//! Domain events are Rust enums tagged adjacently by their event type
//! (`#[serde(tag = "type", content = "data")]`); [`encode`] and [`decode`] turn them into stored
//! events and back, so the type name and payload shape are written down exactly once.

use crate::{upcast, DomainError, NewEvent, RecordedEvent};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;

/// An event-sourced aggregate: one stream of kind [`Aggregate::KIND`] per instance.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The stream type of this aggregate's streams.
    const KIND: &'static str;
    /// What a client may ask this aggregate to do.
    type Command: Send;
    /// Folds one recorded event (decoded through [`upcast::upcast`]; unknown types ignored).
    fn apply(&mut self, event: &RecordedEvent);
    /// Decides the events a command produces from the current state (empty vec = no-op).
    fn decide(&self, command: &Self::Command) -> Result<Vec<NewEvent>, DomainError>;
}

/// Rebuilds an aggregate from its stream, oldest event first.
pub fn load<A: Aggregate>(events: &[RecordedEvent]) -> A {
    let mut aggregate = A::default();
    for event in events {
        aggregate.apply(event);
    }
    aggregate
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
/// schema. `None` for other content types, unknown event types and undecodable payloads, which
/// callers skip so that one foreign event cannot block a stream.
pub fn decode<E: DeserializeOwned>(event: &RecordedEvent) -> Option<E> {
    let (_, data) = upcast::upcast(&event.event_type, event.schema_version, event.json()?).ok()?;
    serde_json::from_value(json!({ "type": event.event_type, "data": data })).ok()
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
        assert_eq!(load::<Cart>(&given.history), given.state);
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
