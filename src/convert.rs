//! Conversions between wire types (`crate::pb`) and domain types (`esq_domain`).
//!
//! Inbound conversions validate and name the offending field the way the client spelled it, so
//! that a service can return the error as INVALID_ARGUMENT unchanged.

use crate::pb::bookshop::v1 as book_pb;
use crate::pb::cart::v1 as cart_pb;
use crate::pb::v1 as pb;
use esq_domain::event::validate_batch;
use esq_domain::replay::{self, Edit, Origin, Preview};
use esq_domain::{
    DomainError, ExpectedVersion, NewEvent, RecordedEvent, StreamId, JSON_CONTENT_TYPE,
};
use prost_types::Timestamp;
use std::collections::BTreeMap;
use tonic::Status;

/// The content type given to `data` payloads that name none.
pub const DEFAULT_BINARY_CONTENT_TYPE: &str = "application/octet-stream";

/// Maps a domain refusal onto a gRPC status: malformed input is INVALID_ARGUMENT, a business
/// rule FAILED_PRECONDITION, a missing aggregate NOT_FOUND.
pub fn status_from_domain(e: DomainError) -> Status {
    match e {
        DomainError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        DomainError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        DomainError::Rule(m) => Status::failed_precondition(m),
        DomainError::NotFound(m) => Status::not_found(m),
    }
}

/// A required stream reference, validated.
pub fn stream_id(stream: Option<&pb::StreamRef>) -> Result<StreamId, DomainError> {
    let s = stream.ok_or_else(|| DomainError::invalid("stream", "is required"))?;
    StreamId::new(s.r#type.clone(), s.id.clone())
}

/// The wire form of a stream id.
pub fn stream_ref(stream: &StreamId) -> pb::StreamRef {
    pb::StreamRef {
        r#type: stream.kind.clone(),
        id: stream.id.clone(),
    }
}

/// A required expected version.
pub fn expected_version(v: Option<&pb::ExpectedVersion>) -> Result<ExpectedVersion, DomainError> {
    use pb::expected_version::Kind;
    let kind = v.and_then(|v| v.kind.as_ref()).ok_or_else(|| {
        DomainError::invalid(
            "expected_version",
            "is required: set one of any, no_stream, stream_exists or exact",
        )
    })?;
    Ok(match kind {
        Kind::Any(()) => ExpectedVersion::Any,
        Kind::NoStream(()) => ExpectedVersion::NoStream,
        Kind::StreamExists(()) => ExpectedVersion::StreamExists,
        Kind::Exact(0) => ExpectedVersion::NoStream,
        Kind::Exact(n) => ExpectedVersion::Exact(*n),
    })
}

/// The events of an append request, validated as a batch.
pub fn new_events(events: Vec<pb::NewEvent>) -> Result<Vec<NewEvent>, DomainError> {
    let out = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| new_event(i, e))
        .collect::<Result<Vec<_>, _>>()?;
    validate_batch(&out)?;
    Ok(out)
}

fn new_event(i: usize, e: pb::NewEvent) -> Result<NewEvent, DomainError> {
    use pb::new_event::Payload;
    let event_id = if e.event_id.is_empty() {
        uuid::Uuid::now_v7()
    } else {
        uuid::Uuid::parse_str(&e.event_id).map_err(|err| {
            DomainError::invalid(
                format!("events[{i}].event_id"),
                format!("is not a UUID: {err}"),
            )
        })?
    };
    let (data, default_type) = match e.payload {
        Some(Payload::Data(d)) => (d, DEFAULT_BINARY_CONTENT_TYPE),
        Some(Payload::Json(j)) => (j.into_bytes(), JSON_CONTENT_TYPE),
        None => {
            return Err(DomainError::invalid(
                format!("events[{i}].payload"),
                "is required: set data or json",
            ))
        }
    };
    let content_type = if e.content_type.is_empty() {
        default_type.to_owned()
    } else {
        e.content_type
    };
    Ok(NewEvent {
        event_id,
        event_type: e.r#type,
        schema_version: e.schema_version.max(1),
        content_type,
        data,
        metadata: e.metadata.into_iter().collect::<BTreeMap<_, _>>(),
    })
}

/// The edits of a replay preview or saved timeline, fields named `edits[i].…`.
pub fn timeline_edits(edits: Vec<pb::TimelineEdit>) -> Result<Vec<Edit>, DomainError> {
    use pb::timeline_edit::Edit as E;
    if edits.len() > replay::MAX_EDITS {
        return Err(DomainError::too_large(
            "edits",
            format!(
                "holds {} edits, at most {} allowed",
                edits.len(),
                replay::MAX_EDITS
            ),
        ));
    }
    edits
        .into_iter()
        .enumerate()
        .map(|(i, edit)| {
            Ok(match edit.edit {
                Some(E::Skip(s)) => Edit::Skip { version: s.version },
                Some(E::Move(m)) => Edit::Move {
                    version: m.version,
                    to_position: m.to_position,
                },
                Some(E::StopAt(s)) => Edit::StopAt { version: s.version },
                Some(E::Insert(insert)) => Edit::Insert {
                    position: insert.position,
                    events: insert
                        .events
                        .into_iter()
                        .enumerate()
                        .map(|(j, e)| new_event(j, e))
                        .collect::<Result<_, _>>()
                        .map_err(|e| within(&format!("edits[{i}].insert."), e))?,
                },
                None => {
                    return Err(DomainError::invalid(
                        format!("edits[{i}]"),
                        "is required: set one of skip, move, insert or stop_at",
                    ))
                }
            })
        })
        .collect()
}

/// `e` with its field named inside `prefix` (e.g. `edits[2].insert.`).
fn within(prefix: &str, e: DomainError) -> DomainError {
    match e {
        DomainError::Invalid { field, reason } => DomainError::Invalid {
            field: format!("{prefix}{field}"),
            reason,
        },
        DomainError::TooLarge { field, reason } => DomainError::TooLarge {
            field: format!("{prefix}{field}"),
            reason,
        },
        other => other,
    }
}

/// The wire form of timeline edits.
pub fn timeline_edits_out(edits: &[Edit]) -> Vec<pb::TimelineEdit> {
    use pb::timeline_edit::{self as te, Edit as E};
    edits
        .iter()
        .map(|edit| pb::TimelineEdit {
            edit: Some(match edit {
                Edit::Skip { version } => E::Skip(te::Skip { version: *version }),
                Edit::Move {
                    version,
                    to_position,
                } => E::Move(te::Move {
                    version: *version,
                    to_position: *to_position,
                }),
                Edit::StopAt { version } => E::StopAt(te::StopAt { version: *version }),
                Edit::Insert { position, events } => E::Insert(te::Insert {
                    position: *position,
                    events: events.iter().map(new_event_out).collect(),
                }),
            }),
        })
        .collect()
}

/// The wire form of an event to append: JSON payloads as text, others as bytes.
pub fn new_event_out(e: &NewEvent) -> pb::NewEvent {
    use pb::new_event::Payload;
    let payload = match std::str::from_utf8(&e.data) {
        Ok(text) if esq_domain::event::is_json(&e.content_type) => Payload::Json(text.to_owned()),
        _ => Payload::Data(e.data.clone()),
    };
    pb::NewEvent {
        event_id: e.event_id.to_string(),
        r#type: e.event_type.clone(),
        schema_version: e.schema_version,
        content_type: e.content_type.clone(),
        payload: Some(payload),
        metadata: e.metadata.clone().into_iter().collect(),
    }
}

/// The wire form of where a timeline event comes from.
pub fn timeline_origin(origin: Origin) -> pb::TimelineOrigin {
    use pb::timeline_origin::{Inserted, Origin as O};
    pb::TimelineOrigin {
        origin: Some(match origin {
            Origin::Original(v) => O::OriginalVersion(v),
            Origin::Inserted { edit, index } => O::Inserted(Inserted {
                edit: edit as u32,
                index: index as u32,
            }),
        }),
    }
}

/// The wire form of a replay preview of `stream`. `corrective_refused` says why the
/// aggregate would refuse the corrective append today (`None`: it would not).
pub fn replay_preview(
    stream: &StreamId,
    p: Preview,
    corrective_refused: Option<DomainError>,
) -> pb::ReplayPreviewResponse {
    let corrective_append = (!p.inserted.is_empty()).then(|| pb::AppendRequest {
        stream: Some(stream_ref(stream)),
        expected_version: Some(pb::ExpectedVersion {
            kind: Some(pb::expected_version::Kind::Exact(p.today.version)),
        }),
        events: p.inserted.iter().map(new_event_out).collect(),
    });
    pb::ReplayPreviewResponse {
        stream: Some(stream_ref(stream)),
        version_today: p.today.version,
        state_today: p.today.doc.into_iter().collect(),
        state_after: p.after.doc.into_iter().collect(),
        diff: p
            .diff
            .into_iter()
            .map(|c| pb::FieldChange {
                field: c.field,
                before: c.before,
                after: c.after,
            })
            .collect(),
        timeline: p
            .timeline
            .into_iter()
            .map(|s| pb::TimelineStep {
                position: s.position,
                origin: Some(timeline_origin(s.origin)),
                r#type: s.event.event_type,
                event_id: s.event.event_id.to_string(),
            })
            .collect(),
        violations: p
            .violations
            .into_iter()
            .map(|v| pb::RuleViolation {
                position: v.position,
                origin: Some(timeline_origin(v.origin)),
                message: v.to_string(),
                r#type: v.event_type,
                reason: v.reason,
            })
            .collect(),
        corrective_append,
        corrective_append_refused: corrective_refused
            .map(|e| e.to_string())
            .unwrap_or_default(),
    }
}

/// The wire form of a recorded event: JSON payloads travel as text, others as bytes.
pub fn recorded_event(e: RecordedEvent) -> pb::RecordedEvent {
    use pb::recorded_event::Payload;
    let payload = if esq_domain::event::is_json(&e.content_type) {
        match String::from_utf8(e.data) {
            Ok(text) => Payload::Json(text),
            Err(err) => Payload::Data(err.into_bytes()),
        }
    } else {
        Payload::Data(e.data)
    };
    pb::RecordedEvent {
        stream: Some(stream_ref(&e.stream)),
        version: e.version,
        event_id: e.event_id.to_string(),
        r#type: e.event_type,
        schema_version: e.schema_version,
        content_type: e.content_type,
        payload: Some(payload),
        metadata: e.metadata.into_iter().collect(),
        recorded_at: Some(timestamp(e.recorded_at_us)),
    }
}

/// A timestamp from microseconds since the Unix epoch.
pub fn timestamp(us: i64) -> Timestamp {
    Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Microseconds since the Unix epoch from a timestamp (saturating).
pub fn micros(ts: &Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos) / 1000)
}

/// Microseconds since the Unix epoch from a client's timestamp field, refusing one that is not
/// a valid protobuf `Timestamp` (nanos outside 0..1e9).
pub fn checked_micros(field: &str, ts: &Timestamp) -> Result<i64, DomainError> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(DomainError::invalid(
            format!("{field}.nanos"),
            format!("{} is outside 0..=999999999", ts.nanos),
        ));
    }
    Ok(micros(ts))
}

/// A protobuf `Struct` from a JSON object.
pub fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON value from a protobuf `Value` (for clients and tests).
pub fn from_value(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(*b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(J::Null, J::Number),
        Some(Kind::StringValue(s)) => J::String(s.clone()),
        Some(Kind::ListValue(l)) => J::Array(l.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => J::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), from_value(v)))
                .collect(),
        ),
    }
}

/// When the caller stops waiting, from its `grpc-timeout` header (`None` without one, or when
/// it is malformed: the server's defaults apply then).
pub fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Instant> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(n.checked_mul(3600)?),
        "M" => std::time::Duration::from_secs(n.checked_mul(60)?),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    };
    std::time::Instant::now().checked_add(timeout)
}

/// The wire form of a cart, for `CartQueries/GetCart` and `CartQueries/GetCartAt` alike.
pub fn cart(cart_id: String, view: esq_domain::cart::CartView) -> cart_pb::Cart {
    let status = match view.status.as_str() {
        "open" => cart_pb::CartStatus::Open,
        "checked_out" => cart_pb::CartStatus::CheckedOut,
        _ => cart_pb::CartStatus::Unspecified,
    };
    cart_pb::Cart {
        cart_id,
        status: status.into(),
        items: view
            .items
            .into_iter()
            .map(|l| cart_pb::CartItem {
                line_total_cents: l.quantity.saturating_mul(l.unit_price_cents),
                sku: l.sku,
                quantity: l.quantity,
                unit_price_cents: l.unit_price_cents,
            })
            .collect(),
        total_cents: view.total_cents,
        item_count: view.item_count,
        version: view.version,
        checked_out_at: view.checked_out_at_us.map(timestamp),
    }
}

/// The wire form of a book, for `BookQueries/GetBook`, `ListBooks`, `GetBookAt` and
/// `ListBooksAt` alike.
pub fn book(view: esq_domain::bookshop::BookView) -> book_pb::Book {
    book_pb::Book {
        isbn: view.isbn,
        title: view.title,
        author: view.author,
        price_cents: view.price_cents,
        created_at: Some(timestamp(view.created_at_us)),
        updated_at: Some(timestamp(view.updated_at_us)),
        version: view.version,
    }
}

/// The wire form of an owned stream type's contract.
pub fn stream_type_contract(c: &esq_domain::contract::StreamContract) -> pb::StreamTypeContract {
    pb::StreamTypeContract {
        stream_type: c.stream_type.to_owned(),
        event_types: c
            .events
            .iter()
            .map(|e| pb::EventTypeContract {
                event_type: e.event_type.clone(),
                description: e.description.clone(),
                current_schema_version: e.current_version,
                schemas: e
                    .versions
                    .iter()
                    .map(|v| pb::EventSchema {
                        schema_version: v.version,
                        json_schema: v.json_schema.to_string(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for us in [0, 1, 1_700_000_000_123_456, -1, -1_000_001] {
            assert_eq!(micros(&timestamp(us)), us);
        }
    }

    #[test]
    fn expected_version_is_required() {
        assert!(
            matches!(expected_version(None), Err(DomainError::Invalid { field, .. }) if field == "expected_version")
        );
        let v = pb::ExpectedVersion {
            kind: Some(pb::expected_version::Kind::Exact(3)),
        };
        assert_eq!(expected_version(Some(&v)), Ok(ExpectedVersion::Exact(3)));
    }

    #[test]
    fn payload_is_required_and_json_checked() {
        let e = pb::NewEvent {
            r#type: "A".into(),
            ..Default::default()
        };
        assert!(
            matches!(new_events(vec![e]), Err(DomainError::Invalid { field, .. }) if field == "events[0].payload")
        );
        let e = pb::NewEvent {
            r#type: "A".into(),
            payload: Some(pb::new_event::Payload::Json("{oops".into())),
            ..Default::default()
        };
        assert!(
            matches!(new_events(vec![e]), Err(DomainError::Invalid { field, .. }) if field == "events[0].data")
        );
    }
}
