//! Stream identity: a stream type (the aggregate kind) plus an id, validated once at the edge.

use crate::DomainError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest stream type accepted, in bytes.
pub const MAX_STREAM_TYPE_LEN: usize = 64;
/// Longest stream id accepted, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 128;

/// One event stream: every event of one aggregate, ordered by version.
///
/// Both parts are restricted to a safe ASCII set so that they can be embedded in CQL partition
/// keys, Redis key names (inside a `{…}` cluster hash tag) and log lines without escaping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId {
    /// The aggregate kind, e.g. `cart` or `book`: `[a-z0-9_-]`, 1..=64 bytes.
    pub kind: String,
    /// The aggregate id within its kind: `[A-Za-z0-9._:@-]`, 1..=128 bytes.
    pub id: String,
}

impl StreamId {
    /// Builds a validated stream id; errors name the fields `stream.type` and `stream.id`.
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Result<Self, DomainError> {
        let kind = kind.into();
        let id = id.into();
        validate_part("stream.type", &kind, MAX_STREAM_TYPE_LEN, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
        })?;
        validate_id("stream.id", &id)?;
        Ok(Self { kind, id })
    }

    /// The canonical text form `kind/id`, used as a map key by adapters.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind, self.id)
    }
}

/// Validates an aggregate id (stream id, cart id, ISBN): errors name `field`.
pub fn validate_id(field: &str, id: &str) -> Result<(), DomainError> {
    validate_part(field, id, MAX_STREAM_ID_LEN, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')
    })
}

fn validate_part(
    field: &str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), DomainError> {
    if value.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(DomainError::invalid(
            field,
            format!("is {} bytes, at most {max} allowed", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        return Err(DomainError::invalid(
            field,
            format!("contains the character {c:?}, which is not allowed"),
        ));
    }
    Ok(())
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        let s = StreamId::new("cart", "c-1").expect("valid");
        assert_eq!(s.key(), "cart/c-1");
    }

    #[test]
    fn rejects_empty_long_and_odd_characters() {
        assert!(
            matches!(StreamId::new("", "x"), Err(DomainError::Invalid { field, .. }) if field == "stream.type")
        );
        assert!(
            matches!(StreamId::new("cart", ""), Err(DomainError::Invalid { field, .. }) if field == "stream.id")
        );
        let long = "a".repeat(MAX_STREAM_ID_LEN + 1);
        assert!(StreamId::new("cart", long).is_err());
        assert!(StreamId::new("cart", "a{b}").is_err());
        assert!(StreamId::new("Cart", "a").is_err());
        assert!(StreamId::new("cart", "a b").is_err());
    }
}
