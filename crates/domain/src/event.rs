//! Events as the store keeps them: self-describing (type, schema version, content type) and
//! immutable once recorded, plus the expected-version forms of optimistic concurrency.

use crate::{quote, DomainError, StreamId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Metadata key carrying a command's idempotency key on every event the command produced;
/// reserved for commands (raw appends to owned stream types may not set it).
pub const COMMAND_ID_KEY: &str = "command_id";
/// The content type of JSON event payloads; payloads under it must parse as JSON.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// Largest payload of one event, in bytes. Kept well below the 4 MiB gRPC message limit so that
/// an oversize payload is refused by our validation with a named field, not by the transport.
pub const MAX_EVENT_DATA_BYTES: usize = 512 * 1024;
/// Deepest nesting of arrays and objects accepted in a JSON payload. Every reader of the
/// store (the projector, temporal queries, clients with common JSON libraries) must be able to
/// parse what was accepted; serde_json stops at 128 levels.
pub const MAX_JSON_DEPTH: usize = 64;
/// Most events accepted in one append.
pub const MAX_EVENTS_PER_APPEND: usize = 500;
/// Largest total payload of one append, in bytes.
pub const MAX_APPEND_BYTES: usize = 3 * 1024 * 1024;
/// Longest event type name, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 128;
/// Most metadata entries on one event.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// Longest metadata key or value, in bytes.
pub const MAX_METADATA_LEN: usize = 1024;

/// What the writer believes the stream's version to be; the append fails if it is wrong.
///
/// Versions start at 1 for a stream's first event; a stream with no events has version 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream must already hold at least one event.
    StreamExists,
    /// The stream's current version must be exactly this (0 is the same as `NoStream`).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `current` satisfies this expectation.
    pub fn admits(self, current: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => current == 0,
            Self::StreamExists => current > 0,
            Self::Exact(v) => current == v,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no_stream"),
            Self::StreamExists => f.write_str("stream_exists"),
            Self::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// An event a client wants to append, validated by [`NewEvent::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Client-chosen id; retrying an append with the same ids is idempotent.
    pub event_id: Uuid,
    /// Past-tense name of what happened, e.g. `ItemAdded`.
    pub event_type: String,
    /// Schema version of `data` for this `event_type`, starting at 1.
    pub schema_version: u32,
    /// MIME type of `data`; `application/json` payloads must be valid JSON.
    pub content_type: String,
    /// The payload.
    pub data: Vec<u8>,
    /// Free-form context: correlation and causation ids, user, source.
    pub metadata: BTreeMap<String, String>,
}

/// Bytes of an event's payload and metadata (keys and values): what a size limit counts.
fn payload_bytes(data: &[u8], metadata: &BTreeMap<String, String>) -> usize {
    data.len()
        + metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

impl NewEvent {
    /// This event as recorded at `version` of `stream` by an append committed at `at_us`.
    pub fn recorded_as(&self, stream: &StreamId, version: u64, at_us: i64) -> RecordedEvent {
        RecordedEvent {
            stream: stream.clone(),
            version,
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            content_type: self.content_type.clone(),
            data: self.data.clone(),
            metadata: self.metadata.clone(),
            recorded_at_us: at_us,
        }
    }

    /// Bytes of its payload and metadata.
    pub fn payload_bytes(&self) -> usize {
        payload_bytes(&self.data, &self.metadata)
    }

    /// A JSON event with a fresh id and no metadata.
    pub fn json(event_type: &str, schema_version: u32, data: &serde_json::Value) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.to_owned(),
            schema_version,
            content_type: JSON_CONTENT_TYPE.to_owned(),
            data: serde_json::to_vec(data).expect("a JSON value always serializes"),
            metadata: BTreeMap::new(),
        }
    }

    /// Checks one event; `field` is its position as the client sees it, e.g. `events[3]`.
    pub fn validate(&self, field: &str) -> Result<(), DomainError> {
        let t = &self.event_type;
        if t.is_empty() {
            return Err(DomainError::invalid(
                format!("{field}.type"),
                "must not be empty",
            ));
        }
        if t.len() > MAX_EVENT_TYPE_LEN
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(DomainError::invalid(
                format!("{field}.type"),
                format!("must be 1..={MAX_EVENT_TYPE_LEN} characters of [A-Za-z0-9._-]"),
            ));
        }
        if self.schema_version == 0 {
            return Err(DomainError::invalid(
                format!("{field}.schema_version"),
                "must be at least 1",
            ));
        }
        if self.data.len() > MAX_EVENT_DATA_BYTES {
            return Err(DomainError::too_large(
                format!("{field}.data"),
                format!(
                    "is {} bytes, at most {MAX_EVENT_DATA_BYTES} allowed",
                    self.data.len()
                ),
            ));
        }
        if is_json(&self.content_type) {
            if json_depth(&self.data) > MAX_JSON_DEPTH {
                return Err(DomainError::invalid(
                    format!("{field}.data"),
                    format!("nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"),
                ));
            }
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&self.data) {
                return Err(DomainError::invalid(
                    format!("{field}.data"),
                    format!(
                        "is not valid JSON under content type {}: {e}",
                        self.content_type
                    ),
                ));
            }
        }
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(DomainError::too_large(
                format!("{field}.metadata"),
                format!(
                    "has {} entries, at most {MAX_METADATA_ENTRIES} allowed",
                    self.metadata.len()
                ),
            ));
        }
        if self.metadata.keys().any(String::is_empty) {
            return Err(DomainError::invalid(
                format!("{field}.metadata"),
                "keys must not be empty",
            ));
        }
        if let Some((k, v)) = self
            .metadata
            .iter()
            .find(|(k, v)| k.len() > MAX_METADATA_LEN || v.len() > MAX_METADATA_LEN)
        {
            // The key is quoted, not echoed: it may be megabytes long.
            return Err(DomainError::too_large(
                format!("{field}.metadata"),
                format!(
                    "entry {} has a {}-byte key and a {}-byte value, at most {MAX_METADATA_LEN} each",
                    quote(k),
                    k.len(),
                    v.len()
                ),
            ));
        }
        Ok(())
    }
}

/// The deepest nesting of `[` and `{` in JSON text, outside strings (counted on the bytes, so
/// it is cheap and cannot itself recurse).
pub fn json_depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Whether a content type is JSON (`application/json`, with or without parameters).
pub fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(JSON_CONTENT_TYPE))
}

/// Checks a whole append batch: count, each event, total size, distinct ids.
pub fn validate_batch(events: &[NewEvent]) -> Result<(), DomainError> {
    if events.is_empty() {
        return Err(DomainError::invalid(
            "events",
            "must hold at least one event",
        ));
    }
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(DomainError::too_large(
            "events",
            format!(
                "holds {} events, at most {MAX_EVENTS_PER_APPEND} allowed",
                events.len()
            ),
        ));
    }
    let mut total = 0usize;
    let mut ids = std::collections::HashSet::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        e.validate(&format!("events[{i}]"))?;
        total += e.data.len();
        if !ids.insert(e.event_id) {
            return Err(DomainError::invalid(
                format!("events[{i}].event_id"),
                "repeats an earlier event id of the same append",
            ));
        }
    }
    if total > MAX_APPEND_BYTES {
        return Err(DomainError::too_large(
            "events",
            format!("payloads total {total} bytes, at most {MAX_APPEND_BYTES} allowed"),
        ));
    }
    Ok(())
}

/// An event as recorded in a stream. Never changed once written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Its position in the stream, from 1, contiguous.
    pub version: u64,
    /// The id given by the appending client.
    pub event_id: Uuid,
    /// Past-tense name of what happened.
    pub event_type: String,
    /// Schema version of `data`.
    pub schema_version: u32,
    /// MIME type of `data`.
    pub content_type: String,
    /// The payload.
    pub data: Vec<u8>,
    /// Free-form context.
    pub metadata: BTreeMap<String, String>,
    /// Commit time of the append that wrote it, microseconds since the Unix epoch.
    pub recorded_at_us: i64,
}

impl RecordedEvent {
    /// Bytes of its payload and metadata.
    pub fn payload_bytes(&self) -> usize {
        payload_bytes(&self.data, &self.metadata)
    }

    /// The payload parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        if is_json(&self.content_type) {
            serde_json::from_slice(&self.data).ok()
        } else {
            None
        }
    }
}

/// What a successful append reports. A retried append reports the original result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    /// Version of the first appended event.
    pub first_version: u64,
    /// Version of the last appended event: the stream's new version.
    pub last_version: u64,
    /// Commit time, microseconds since the Unix epoch.
    pub committed_at_us: i64,
}

impl AppendResult {
    /// The events of this append as the store records them: `events` at `first_version`
    /// onwards, each stamped with the commit time. A store's read of those versions returns
    /// exactly these (the adapters' contract tests hold them to it), so whoever made the append
    /// can hand its events on without reading them back.
    pub fn recorded(&self, stream: &StreamId, events: &[NewEvent]) -> Vec<RecordedEvent> {
        events
            .iter()
            .zip(self.first_version..)
            .map(|(e, version)| e.recorded_as(stream, version, self.committed_at_us))
            .collect()
    }
}

/// Summary of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Current version (0: no events).
    pub version: u64,
    /// Time of the first append, microseconds since the Unix epoch.
    pub created_at_us: i64,
    /// Time of the latest append, microseconds since the Unix epoch.
    pub last_appended_at_us: i64,
    /// Number of events (equal to `version`: versions are contiguous from 1).
    pub event_count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_deeper_than_the_limit_is_refused() {
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n)).into_bytes();
        let mut e = NewEvent::json("Deep", 1, &json!({}));
        e.data = nested(MAX_JSON_DEPTH);
        assert!(e.validate("events[0]").is_ok());
        e.data = nested(MAX_JSON_DEPTH + 1);
        let err = e.validate("events[0]").expect_err("too deep");
        assert!(matches!(err, DomainError::Invalid { ref field, .. } if field == "events[0].data"));
        e.data = nested(200);
        assert!(e.validate("events[0]").is_err());
        // Brackets inside strings do not count.
        assert_eq!(json_depth(br#"{"a":"[[[{{{\"[[","b":[1]}"#), 2);
    }

    #[test]
    fn expected_version_admits() {
        assert!(ExpectedVersion::Any.admits(0));
        assert!(ExpectedVersion::NoStream.admits(0));
        assert!(!ExpectedVersion::NoStream.admits(1));
        assert!(ExpectedVersion::StreamExists.admits(3));
        assert!(!ExpectedVersion::StreamExists.admits(0));
        assert!(ExpectedVersion::Exact(2).admits(2));
        assert!(!ExpectedVersion::Exact(2).admits(3));
    }

    #[test]
    fn validation_names_the_field() {
        let mut e = NewEvent::json("ItemAdded", 1, &json!({"a": 1}));
        assert!(e.validate("events[0]").is_ok());
        e.data = b"{not json".to_vec();
        let err = e.validate("events[0]").expect_err("not JSON");
        assert_eq!(
            err.to_string().split(':').next(),
            Some("invalid events[0].data")
        );
        e.content_type = "application/octet-stream".into();
        assert!(e.validate("events[0]").is_ok());
        e.data = vec![0; MAX_EVENT_DATA_BYTES + 1];
        assert!(
            matches!(e.validate("events[0]"), Err(DomainError::TooLarge { field, .. }) if field == "events[0].data")
        );
        let mut e = NewEvent::json("", 1, &json!({}));
        assert!(
            matches!(e.validate("events[0]"), Err(DomainError::Invalid { field, .. }) if field == "events[0].type")
        );
        e.event_type = "X".into();
        e.schema_version = 0;
        assert!(
            matches!(e.validate("events[0]"), Err(DomainError::Invalid { field, .. }) if field == "events[0].schema_version")
        );
    }

    #[test]
    fn a_huge_metadata_key_is_quoted_not_echoed() {
        let mut e = NewEvent::json("A", 1, &json!({}));
        e.metadata.insert("k".repeat(3 << 20), "v".into());
        let err = e.validate("events[0]").expect_err("key too long");
        assert!(matches!(err, DomainError::TooLarge { .. }), "{err:?}");
        assert!(err.to_string().len() < 300, "{}", err.to_string().len());
        assert_eq!(quote("short"), "\"short\"");
        assert!(quote(&"é".repeat(1000)).ends_with('…'));
    }

    #[test]
    fn batch_rules() {
        assert!(validate_batch(&[]).is_err());
        let e = NewEvent::json("A", 1, &json!({}));
        assert!(
            matches!(validate_batch(&[e.clone(), e]), Err(DomainError::Invalid { field, .. }) if field == "events[1].event_id")
        );
    }
}
