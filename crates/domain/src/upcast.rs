//! Schema upgrades: old event payloads are lifted, one version at a time, to the schema the
//! current code reads. Stored events are never rewritten; readers upcast on the way in.
//!
//! Event types are registered by name alone (the upcaster does not see the stream kind), so every
//! domain event type name must be unique across aggregates.

use crate::DomainError;
use serde_json::Value;

/// One upgrade step: lifts a payload of `from` to `from + 1`.
type Step = fn(Value) -> Result<Value, DomainError>;

/// The schema version the current code writes and reads, for every domain event type.
const CURRENT: &[(&str, u32)] = &[
    ("ItemAdded", 2),
    ("ItemRemoved", 1),
    ("CheckedOut", 1),
    ("BookCreated", 1),
    ("BookUpdated", 1),
    ("BookDeleted", 1),
];

/// Every upgrade step, by event type and the version it lifts from.
const STEPS: &[(&str, u32, Step)] = &[("ItemAdded", 1, item_added_v1_to_v2)];

/// The schema version the current code writes for `event_type`; `None` for types it does not own.
pub fn current_schema_version(event_type: &str) -> Option<u32> {
    CURRENT
        .iter()
        .find(|(t, _)| *t == event_type)
        .map(|(_, v)| *v)
}

/// Lifts `data` from `schema_version` to the current schema of `event_type`, returning the new
/// version and payload. Types the domain does not own pass through unchanged.
///
/// A version newer than the current one (written by a newer build) or 0 is refused: guessing
/// at a schema this code has never seen could silently misread money or quantities.
pub fn upcast(
    event_type: &str,
    schema_version: u32,
    mut data: Value,
) -> Result<(u32, Value), DomainError> {
    let Some(current) = current_schema_version(event_type) else {
        return Ok((schema_version, data));
    };
    if schema_version == 0 || schema_version > current {
        return Err(DomainError::invalid(
            "schema_version",
            format!("{event_type} v{schema_version} is unknown: this build reads v1..=v{current}"),
        ));
    }
    for from in schema_version..current {
        let step = STEPS
            .iter()
            .find(|(t, v, _)| *t == event_type && *v == from)
            .map(|(_, _, step)| step)
            .ok_or_else(|| {
                DomainError::invalid(
                    "schema_version",
                    format!("no upgrade registered from {event_type} v{from}"),
                )
            })?;
        data = step(data)?;
    }
    Ok((current, data))
}

/// `ItemAdded` at schema v1: a product and a count, no price.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ItemAddedV1 {
    /// The product.
    pub sku: String,
    /// Units added.
    pub qty: i64,
}

/// The JSON Schemas of the payload versions older than the current one that this build still
/// reads, oldest first, generated from the payload types above.
pub fn legacy_schemas(event_type: &str) -> Vec<(u32, Value)> {
    let mut out = Vec::new();
    if event_type == "ItemAdded" {
        let mut schema = schemars::schema_for!(ItemAddedV1).to_value();
        if let Value::Object(map) = &mut schema {
            map.remove("title");
        }
        out.push((1, schema));
    }
    out
}

/// `ItemAdded` v1 `{sku, qty}` → v2 `{sku, quantity, unit_price_cents}`. v1 carts had no prices,
/// so the lifted line costs 0.
fn item_added_v1_to_v2(data: Value) -> Result<Value, DomainError> {
    let Value::Object(mut map) = data else {
        return Err(DomainError::invalid(
            "data",
            "ItemAdded v1 must be a JSON object",
        ));
    };
    let qty = map
        .remove("qty")
        .ok_or_else(|| DomainError::invalid("data", "ItemAdded v1 has no qty"))?;
    map.insert("quantity".to_owned(), qty);
    map.entry("unit_price_cents").or_insert(Value::from(0));
    Ok(Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn item_added_v1_is_lifted_to_v2() {
        assert_eq!(
            upcast("ItemAdded", 1, json!({"sku": "A-1", "qty": 3})),
            Ok((
                2,
                json!({"sku": "A-1", "quantity": 3, "unit_price_cents": 0})
            ))
        );
    }

    #[test]
    fn current_version_passes_through() {
        let data = json!({"sku": "A-1", "quantity": 3, "unit_price_cents": 250});
        assert_eq!(upcast("ItemAdded", 2, data.clone()), Ok((2, data)));
    }

    #[test]
    fn unknown_types_pass_through_unchanged() {
        let data = json!({"anything": [1, 2]});
        assert_eq!(upcast("SomethingElse", 7, data.clone()), Ok((7, data)));
        assert_eq!(current_schema_version("SomethingElse"), None);
    }

    #[test]
    fn newer_than_current_is_invalid() {
        let err = upcast("ItemAdded", 3, json!({})).expect_err("v3 is unknown");
        assert!(matches!(err, DomainError::Invalid { ref field, .. } if field == "schema_version"));
        assert!(upcast("ItemAdded", 0, json!({})).is_err());
    }

    #[test]
    fn malformed_v1_payload_is_invalid() {
        assert!(upcast("ItemAdded", 1, json!([1])).is_err());
        assert!(upcast("ItemAdded", 1, json!({"sku": "A"})).is_err());
    }

    #[test]
    fn every_registered_type_has_a_complete_upgrade_chain() {
        for (event_type, current) in CURRENT {
            for from in 1..*current {
                assert!(
                    STEPS.iter().any(|(t, v, _)| t == event_type && *v == from),
                    "{event_type} lacks an upgrade from v{from}"
                );
            }
        }
        for (event_type, from, _) in STEPS {
            assert!(current_schema_version(event_type).is_some_and(|c| *from < c));
        }
    }
}
