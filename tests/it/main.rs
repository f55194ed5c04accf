//! System tests of esq over real gRPC on loopback.
//!
//! `suite` holds backend-agnostic scenarios that take connected clients; `dev` runs them
//! against the embedded single-process stack. Every scenario uses fresh stream ids, so
//! scenarios can share a deployment.

mod auth;
mod bus;
mod cluster;
mod core;
mod deploy;
mod derived;
mod dev;
mod fuzz;
mod history;
mod metrics;
mod operator;
mod parked;
mod redis_ha;
mod replay;
mod ring;
mod snapshots;
mod startup;
mod stores;
mod suite;
mod tls;
mod transport;
