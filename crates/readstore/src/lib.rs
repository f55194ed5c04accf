//! The esq read store: where projections are kept for queries. The [`ReadStore`] trait, an
//! in-memory adapter ([`memory`], for `esq dev` and tests, rebuilt from the log at start) and,
//! in the distributed setup, a Redis adapter ([`redis`], standalone or Cluster), plus the
//! behaviour both must show ([`contract`], test support).
//!
//! A read store holds only derived data: it can be thrown away and rebuilt from the event store
//! at any time. Every write to a document goes through the version fence of
//! [`esq_domain::projection::apply_to_doc`], so duplicate and late batches are harmless.

pub mod contract;
pub mod generations;
pub mod memory;
pub mod notify;
pub mod redis;

use esq_domain::derived::{Column, Contribution};
use esq_domain::projection::{ApplyOutcome, Batch};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

/// Why a read-store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The backing store cannot be reached or did not answer in time.
    #[error("read store unavailable: {0}")]
    Unavailable(String),
    /// Anything else; the text is for logs, not for clients.
    #[error("read store internal error: {0}")]
    Internal(String),
}

/// How far the writes acknowledged so far reached replicas ([`ReadStore::wait_replicated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// The fewest replicas that acknowledged every earlier write of this store, over all
    /// primaries (`u32::MAX` for a store without replicas to wait for: it loses nothing).
    pub acked: u32,
    /// The store's topology epoch after the wait (see [`ReadStore::replication_epoch`]).
    pub epoch: u64,
}

/// A document: the flat field map of one aggregate in one projection.
pub type Doc = HashMap<String, String>;

/// Storage for projected documents, indexes and projector checkpoints.
pub trait ReadStore: Send + Sync + 'static {
    /// Applies the field ops of `batch` to document `doc_id` of `projection` behind the version
    /// fence, atomically (all field ops and the new version, or nothing). Index ops are not
    /// applied here: the projector derives index membership from the document afterwards and
    /// calls [`ReadStore::update_indexes`].
    fn apply(
        &self,
        projection: &str,
        doc_id: &str,
        batch: &Batch,
    ) -> impl Future<Output = Result<ApplyOutcome, ReadError>> + Send;

    /// The document, or `None` if nothing was ever applied to it. Tombstones are returned (the
    /// caller checks [`esq_domain::projection::is_deleted`]).
    fn get(
        &self,
        projection: &str,
        doc_id: &str,
    ) -> impl Future<Output = Result<Option<Doc>, ReadError>> + Send;

    /// Registers a waiter for document `doc_id` of `namespace` at version `min_version` or
    /// later, woken by the store's apply notifications ([`notify`]). `None` when the store has
    /// no live notifications (or holds as many waiters as it may): the caller polls instead.
    /// Register before reading the document, so that an apply in between still wakes it.
    fn watch(&self, namespace: &str, doc_id: &str, min_version: u64) -> Option<notify::Watch> {
        let _ = (namespace, doc_id, min_version);
        None
    }

    /// The document's version (0 if absent).
    fn version(
        &self,
        projection: &str,
        doc_id: &str,
    ) -> impl Future<Output = Result<u64, ReadError>> + Send;

    /// Adds `doc_id` to every index in `add` and removes it from every index in `remove`
    /// (idempotently), then clears the document's pending-index marker
    /// ([`esq_domain::projection::INDEX_PENDING_FIELD`]) if it still equals `marker` — a later
    /// apply that set a new marker keeps it.
    fn update_indexes(
        &self,
        projection: &str,
        doc_id: &str,
        add: &[String],
        remove: &[String],
        marker: &str,
    ) -> impl Future<Output = Result<(), ReadError>> + Send;

    /// Members of `index` strictly after `after`, in lexicographic order, at most `limit`.
    fn index_page(
        &self,
        projection: &str,
        index: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, ReadError>> + Send;

    /// Applies contribution `c` to target `target` of the derived projection kept in
    /// `namespace`, atomically and behind the per-source fence, exactly as
    /// [`esq_domain::derived::apply_contribution`] does (totals in the target's document, read
    /// with [`ReadStore::get`]; entries alongside, in the same Cluster slot). Returns whether
    /// it applied (false: the source's entry was already at `c.version` or later).
    fn contribute(
        &self,
        namespace: &str,
        target: &str,
        columns: &[Column],
        c: &Contribution,
    ) -> impl Future<Output = Result<bool, ReadError>> + Send;

    /// Removes field `field` of document `doc_id` if it still equals `value` (a pending
    /// marker whose work is done; a later apply that set a new marker keeps it).
    fn clear_field_if(
        &self,
        namespace: &str,
        doc_id: &str,
        field: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), ReadError>> + Send;

    /// A saved projector checkpoint.
    fn checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, ReadError>> + Send;

    /// Saves a projector checkpoint.
    fn save_checkpoint(
        &self,
        name: &str,
        position: &str,
    ) -> impl Future<Output = Result<(), ReadError>> + Send;

    /// One cheap round trip, for health checks: `Ok` when the store answers.
    fn ping(&self) -> impl Future<Output = Result<(), ReadError>> + Send;

    /// The generation record of `projection` as stored (see [`generations`]), `None` if it has
    /// none.
    fn generations(
        &self,
        projection: &str,
    ) -> impl Future<Output = Result<Option<String>, ReadError>> + Send;

    /// Replaces the generation record of `projection` by `new` if it is still `expected`
    /// (`None`: there is none), atomically. Returns whether it was replaced.
    fn swap_generations(
        &self,
        projection: &str,
        expected: Option<&str>,
        new: &str,
    ) -> impl Future<Output = Result<bool, ReadError>> + Send;

    /// Deletes every document and index of `namespace` (one generation of a projection), in
    /// batches; returns how many keys went. Other namespaces are untouched, including the
    /// generations of the same projection when `namespace` is the pre-generation one.
    fn delete_namespace(
        &self,
        namespace: &str,
    ) -> impl Future<Output = Result<u64, ReadError>> + Send;

    /// Removes document `doc_id` of `namespace` entirely, version included (so that it can be
    /// projected again from version 1: a repair).
    fn delete_doc(
        &self,
        namespace: &str,
        doc_id: &str,
    ) -> impl Future<Output = Result<(), ReadError>> + Send;

    /// Whether `doc_id` is a member of `index` of `namespace`.
    fn index_contains(
        &self,
        namespace: &str,
        index: &str,
        doc_id: &str,
    ) -> impl Future<Output = Result<bool, ReadError>> + Send;

    /// A page of the document ids of `namespace`, in no particular order, and the cursor of the
    /// next page (`None`: that was the last). Each id is returned once over a full walk of a
    /// namespace that does not change meanwhile; a page may hold more or fewer than `limit`.
    fn doc_ids_page(
        &self,
        namespace: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<String>, Option<String>), ReadError>> + Send;

    /// Records `record` under `key` in the record set `set`, replacing any record there. Record
    /// sets hold the projector's control-plane records (parked streams, skipped events), so
    /// every replica and every admin call sees them.
    fn put_record(
        &self,
        set: &str,
        key: &str,
        record: &str,
    ) -> impl Future<Output = Result<(), ReadError>> + Send;

    /// The record under `key` in `set`.
    fn get_record(
        &self,
        set: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>, ReadError>> + Send;

    /// Removes the record under `key` from `set`; whether there was one.
    fn delete_record(
        &self,
        set: &str,
        key: &str,
    ) -> impl Future<Output = Result<bool, ReadError>> + Send;

    /// The records of `set` with keys strictly after `after`, in lexicographic key order, at
    /// most `limit`, as (key, record).
    fn records_page(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(String, String)>, ReadError>> + Send;

    /// How many records `set` holds.
    fn record_count(&self, set: &str) -> impl Future<Output = Result<u64, ReadError>> + Send;

    /// The topology epoch as last seen: it changes whenever a primary of the store was seen
    /// replaced or restarted (a failover), after which earlier acknowledged writes may be gone.
    /// Stores without replication stay at 0.
    fn replication_epoch(&self) -> u64 {
        0
    }

    /// Waits (briefly) until every write this store acknowledged so far reached `replicas`
    /// replicas on every primary, and refreshes [`ReadStore::replication_epoch`]. A progress
    /// marker may move past writes only when `acked >= replicas` and the epoch did not change
    /// since before those writes. The default: nothing to wait for.
    fn wait_replicated(
        &self,
        replicas: u32,
    ) -> impl Future<Output = Result<Replication, ReadError>> + Send {
        let _ = replicas;
        let epoch = self.replication_epoch();
        async move {
            Ok(Replication {
                acked: u32::MAX,
                epoch,
            })
        }
    }
}

/// Coordination between projector replicas that share the change-log shards: leases with
/// expiry, and a count of live members so each can take its fair share.
pub trait Coordination: Send + Sync + 'static {
    /// Takes lease `name` for `owner` for `ttl` if it is free or expired, or renews it if
    /// `owner` already holds it, atomically. Returns whether `owner` holds it afterwards.
    fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, ReadError>> + Send;

    /// Gives up lease `name` if `owner` holds it. Returns whether it was released.
    fn release_lease(
        &self,
        name: &str,
        owner: &str,
    ) -> impl Future<Output = Result<bool, ReadError>> + Send;

    /// Records that `member` of `group` is alive for `ttl`; returns how many members of the
    /// group are alive (including this one).
    fn heartbeat(
        &self,
        group: &str,
        member: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<usize, ReadError>> + Send;

    /// Takes `member` out of `group` at once (on shutdown), so the others take over its share
    /// without waiting for its heartbeat to expire.
    fn leave(
        &self,
        group: &str,
        member: &str,
    ) -> impl Future<Output = Result<(), ReadError>> + Send;
}
