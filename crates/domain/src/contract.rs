//! Published event contracts: for every stream type an aggregate owns, each event type, the
//! schema versions this build reads, and a JSON Schema of each version's payload.
//!
//! The schemas are generated from the Rust types with `schemars` (the current version from the
//! aggregate's event enum, older versions from the payload types the upcasters read), so they
//! cannot drift from what the code accepts.

use crate::aggregate::Aggregate;
use crate::bookshop::Book;
use crate::cart::Cart;
use crate::upcast;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::OnceLock;

/// One schema version of an event type.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaVersion {
    /// The schema version (1, 2, …).
    pub version: u32,
    /// JSON Schema (draft 2020-12) of the payload at this version.
    pub json_schema: Value,
}

/// The contract of one event type.
#[derive(Debug, Clone, PartialEq)]
pub struct EventContract {
    /// The event type name, e.g. `ItemAdded`.
    pub event_type: String,
    /// What the event means, from the type's documentation.
    pub description: String,
    /// The version new events are written at.
    pub current_version: u32,
    /// Every version this build reads (older ones are upcast), oldest first.
    pub versions: Vec<SchemaVersion>,
}

/// The contract of one owned stream type.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamContract {
    /// The stream type, e.g. `cart`.
    pub stream_type: &'static str,
    /// Its event types, in declaration order.
    pub events: Vec<EventContract>,
}

/// The contracts of every stream type an aggregate owns. Streams of other types are free-form.
pub fn contracts() -> &'static [StreamContract] {
    static CONTRACTS: OnceLock<Vec<StreamContract>> = OnceLock::new();
    CONTRACTS.get_or_init(|| vec![stream_contract::<Cart>(), stream_contract::<Book>()])
}

/// Whether `stream_type` is owned by an aggregate (its appends are checked).
pub fn is_owned(stream_type: &str) -> bool {
    contracts().iter().any(|c| c.stream_type == stream_type)
}

/// The event type names of `A`, in declaration order.
pub fn event_types<A: Aggregate>() -> Vec<&'static str> {
    static NAMES: OnceLock<HashMap<&'static str, Vec<&'static str>>> = OnceLock::new();
    NAMES
        .get_or_init(|| {
            contracts()
                .iter()
                .map(|c| {
                    let names = c.events.iter().map(|e| leak(&e.event_type)).collect();
                    (c.stream_type, names)
                })
                .collect()
        })
        .get(A::KIND)
        .cloned()
        .unwrap_or_default()
}

/// Names live as long as the process; there are a handful, made once.
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

/// Builds the contract of `A` from the JSON Schema of its event enum: each variant of an
/// adjacently tagged enum is an object whose `type` is a constant and whose `data` is the
/// payload.
fn stream_contract<A: Aggregate>() -> StreamContract {
    let schema = schemars::schema_for!(A::Event).to_value();
    let defs = schema.get("$defs").cloned();
    let variants = schema
        .get("oneOf")
        .and_then(Value::as_array)
        .expect("aggregate events are an adjacently tagged enum with several variants");
    let events = variants
        .iter()
        .map(|variant| {
            let props = &variant["properties"];
            let event_type = props["type"]["const"]
                .as_str()
                .expect("every variant is tagged with its event type")
                .to_owned();
            let current = upcast::current_schema_version(&event_type)
                .expect("every domain event type has a registered schema version");
            let mut versions: Vec<SchemaVersion> = upcast::legacy_schemas(&event_type)
                .into_iter()
                .map(|(version, schema)| SchemaVersion {
                    version,
                    json_schema: schema,
                })
                .collect();
            versions.push(SchemaVersion {
                version: current,
                json_schema: standalone(props["data"].clone(), defs.as_ref()),
            });
            EventContract {
                description: variant["description"].as_str().unwrap_or("").to_owned(),
                event_type,
                current_version: current,
                versions,
            }
        })
        .collect();
    StreamContract {
        stream_type: A::KIND,
        events,
    }
}

/// A payload schema that stands on its own: the `$schema` keyword and, when it refers to
/// shared definitions, a copy of them.
fn standalone(mut schema: Value, defs: Option<&Value>) -> Value {
    if let Value::Object(map) = &mut schema {
        map.insert(
            "$schema".to_owned(),
            Value::from("https://json-schema.org/draft/2020-12/schema"),
        );
        if let Some(defs) = defs {
            if schema_refers(&Value::Object(map.clone())) {
                map.insert("$defs".to_owned(), defs.clone());
            }
        }
    }
    schema
}

fn schema_refers(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.contains_key("$ref") || m.values().any(schema_refers),
        Value::Array(a) => a.iter().any(schema_refers),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contract(stream_type: &str, event_type: &str) -> EventContract {
        contracts()
            .iter()
            .find(|c| c.stream_type == stream_type)
            .and_then(|c| c.events.iter().find(|e| e.event_type == event_type))
            .cloned()
            .expect("published")
    }

    #[test]
    fn every_owned_type_lists_its_events() {
        assert_eq!(
            event_types::<Cart>(),
            ["ItemAdded", "ItemRemoved", "CheckedOut"]
        );
        assert_eq!(
            event_types::<Book>(),
            ["BookCreated", "BookUpdated", "BookDeleted"]
        );
        assert!(is_owned("cart") && is_owned("book") && !is_owned("order"));
    }

    #[test]
    fn every_schema_version_this_build_reads_is_published() {
        let added = contract("cart", "ItemAdded");
        assert_eq!(added.current_version, 2);
        let versions: Vec<u32> = added.versions.iter().map(|v| v.version).collect();
        assert_eq!(versions, [1, 2]);
        let v1 = &added.versions[0].json_schema;
        assert_eq!(v1["required"], json!(["sku", "qty"]));
        let v2 = &added.versions[1].json_schema;
        assert_eq!(
            v2["required"],
            json!(["sku", "quantity", "unit_price_cents"])
        );
        assert_eq!(v2["properties"]["quantity"]["type"], "integer");
        assert!(!added.description.is_empty());
        for c in contracts() {
            for e in &c.events {
                let last = e.versions.last().expect("at least the current version");
                assert_eq!(last.version, e.current_version, "{}", e.event_type);
            }
        }
    }

    #[test]
    fn optional_fields_are_not_required() {
        let updated = contract("book", "BookUpdated");
        let schema = &updated.versions[0].json_schema;
        assert!(schema["properties"]["title"].is_object());
        assert!(schema
            .get("required")
            .and_then(Value::as_array)
            .is_none_or(|r| !r.contains(&json!("title"))));
    }
}
