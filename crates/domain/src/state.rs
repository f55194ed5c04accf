//! The generic projection of any stream: the top-level fields of its JSON events merged in
//! order, a `null` removing a field. It gives every stream a queryable state without code.

use crate::projection::{Changes, FieldOp, Projection};
use crate::{RecordedEvent, StreamId};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Document field prefix of a state field (`f.<key>`), which keeps event keys apart from the
/// store's own fields such as `_v`.
pub const FIELD_PREFIX: &str = "f.";

/// The generic state of every stream, one document per stream, keyed `kind:id`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StateProjection;

impl Projection for StateProjection {
    fn name(&self) -> &'static str {
        "state"
    }

    fn handles(&self, _stream_kind: &str) -> bool {
        true
    }

    fn doc_id(&self, stream: &StreamId) -> String {
        format!("{}:{}", stream.kind, stream.id)
    }

    /// Reads the payload as stored, without upcasting: event type names are not namespaced by
    /// stream kind, so a domain upcaster could rewrite an unrelated stream's event of that name.
    fn project(&self, event: &RecordedEvent, out: &mut Changes) -> Result<(), String> {
        // Free-form streams may hold any content: only JSON objects change the state, and
        // anything else is no change (never an error), so the generic view never parks.
        let Some(Value::Object(fields)) = event.json() else {
            return Ok(());
        };
        out.fields.extend(fields.into_iter().map(|(k, v)| {
            let field = format!("{FIELD_PREFIX}{k}");
            if v.is_null() {
                FieldOp::Del(field)
            } else {
                FieldOp::Set(field, v.to_string())
            }
        }));
        Ok(())
    }
}

/// The stream a [`StateProjection`] document id names; `None` if it is not one. Stream kinds
/// cannot contain `:`, so the first `:` separates kind from id.
pub fn parse_doc_id(doc_id: &str) -> Option<StreamId> {
    let (kind, id) = doc_id.split_once(':')?;
    StreamId::new(kind, id).ok()
}

/// Rebuilds a stream's state object from its [`StateProjection`] document.
pub fn state_json(doc: &HashMap<String, String>) -> Map<String, Value> {
    doc.iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix(FIELD_PREFIX)?;
            // Values are written as JSON; a foreign writer's plain text still reads as a string.
            let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
            Some((key.to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{doc_version, fold};
    use crate::testing::record;
    use crate::NewEvent;
    use serde_json::json;

    fn stream(payloads: &[Value]) -> Vec<RecordedEvent> {
        let id = StreamId::new("order", "o:1").expect("valid");
        let mut history = Vec::new();
        let events = payloads
            .iter()
            .map(|p| NewEvent::json("Changed", 1, p))
            .collect();
        record(&id, &mut history, events);
        history
    }

    #[test]
    fn doc_ids_round_trip() {
        let id = StreamId::new("order", "o:1").expect("valid");
        let doc_id = StateProjection.doc_id(&id);
        assert_eq!(doc_id, "order:o:1");
        assert_eq!(parse_doc_id(&doc_id), Some(id));
        assert_eq!(parse_doc_id("no-colon"), None);
        assert_eq!(parse_doc_id("Bad:x"), None);
    }

    #[test]
    fn handles_every_kind() {
        assert!(StateProjection.handles("cart") && StateProjection.handles("anything"));
    }

    #[test]
    fn top_level_fields_merge_in_order_and_null_removes() {
        let events = stream(&[
            json!({"name": "Ada", "tags": ["a"], "address": {"city": "Paris"}}),
            json!({"name": "Ada L.", "age": 36}),
            json!({"tags": null}),
        ]);
        let doc = fold(&StateProjection, &events).expect("fold");
        assert_eq!(doc["f.address"], r#"{"city":"Paris"}"#, "compact JSON text");
        let expected = json!({"name": "Ada L.", "age": 36, "address": {"city": "Paris"}});
        assert_eq!(Value::Object(state_json(&doc)), expected);
        assert_eq!(doc_version(&doc), 3);
    }

    #[test]
    fn non_object_and_non_json_events_change_nothing_but_the_version() {
        let mut events = stream(&[json!({"a": 1}), json!([1, 2]), json!("text")]);
        events[2].content_type = "application/octet-stream".into();
        let doc = fold(&StateProjection, &events).expect("fold");
        assert_eq!(Value::Object(state_json(&doc)), json!({"a": 1}));
        assert_eq!(doc_version(&doc), 3);
    }

    #[test]
    fn state_json_reads_plain_text_as_a_string() {
        let doc = HashMap::from([
            ("f.x".to_owned(), "not json".to_owned()),
            ("_v".to_owned(), "1".to_owned()),
        ]);
        assert_eq!(Value::Object(state_json(&doc)), json!({"x": "not json"}));
    }
}
