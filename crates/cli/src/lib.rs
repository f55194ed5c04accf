//! The `esq` command-line tool: `esq dev` runs write-svc, the projector and read-svc in one
//! process on the embedded defaults (redb event store in a local folder, in-memory read model
//! rebuilt from the log at start), so a new user needs no external service; `esq projections`
//! and `esq streams` are the operator's commands (see [`ops`]); `esq token` makes bearer tokens
//! ([`token`]).

pub mod dev;
pub mod ops;
pub mod token;
