//! The esq domain: stream identities, versions, events, the cart and bookshop aggregates, the
//! projections that turn events into read-model changes, and the upcasters that lift old event
//! schemas to the current one.
//!
//! This crate does no IO and depends on no gRPC, database or Redis crate: adapters and services
//! depend on it, never the reverse. Everything here is a pure function of its inputs, so it is
//! tested with plain unit and property tests.

pub mod aggregate;
#[cfg(any(test, feature = "arbitrary"))]
pub mod arbitrary;
pub mod authors;
pub mod bookshop;
pub mod cart;
pub mod contract;
pub mod derived;
pub mod event;
pub mod ids;
pub mod projection;
pub mod registry;
pub mod replay;
pub mod sku_sales;
pub mod snapshot;
pub mod state;
pub mod upcast;

pub use aggregate::Aggregate;
pub use event::{
    AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamInfo, JSON_CONTENT_TYPE,
};
pub use ids::StreamId;

#[cfg(test)]
mod testing;

/// Why a command, an append or a field was refused by the domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Malformed input: `field` names the offending field (as the client spelled it).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field that is wrong, e.g. `stream.id` or `events[2].data`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Input over a size limit (a payload, a batch, a metadata entry): `field` names it.
    #[error("{field} too large: {reason}")]
    TooLarge {
        /// The field that is too large, e.g. `events[2].data` or `events`.
        field: String,
        /// The size found and the limit.
        reason: String,
    },
    /// A business rule refused the command (cart checked out, removing what is not there, ...).
    #[error("{0}")]
    Rule(String),
    /// The aggregate does not exist (a command that needs an existing aggregate).
    #[error("{0}")]
    NotFound(String),
}

impl DomainError {
    /// Shorthand for [`DomainError::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`DomainError::TooLarge`].
    pub fn too_large(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::TooLarge {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Longest quote of client input in an error message, in characters.
pub const MAX_QUOTE_CHARS: usize = 64;

/// `s` quoted for an error message: at most [`MAX_QUOTE_CHARS`] characters, with `…` when cut,
/// so an error never echoes unbounded input back to the client or into the logs.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTE_CHARS) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}…", &s[..end]),
    }
}

/// Cuts a message that may embed client input (a decoder's error, a rendered event) to at most
/// `max` bytes, on a character boundary, with `…` when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
