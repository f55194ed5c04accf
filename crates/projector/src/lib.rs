//! esq projector: tails the change log and folds events into the read store.
//!
//! A change says only *which stream changed up to which version*; the projector then pulls the
//! stream's events after the read model's version and applies them behind the version fence.
//! So duplicate, late or reordered notifications are harmless, a crash between any two steps
//! only repeats fenced no-ops, and the read store can be rebuilt from the event store at any
//! time into a new generation while the old one serves (the `rebuild` module). The projector
//! never writes the event store. [`admin`] serves the operator's API (`esq.v1.Projections`)
//! over the methods of [`ops`]' types.

pub mod admin;
mod derived;
mod generations;
mod index;
mod leases;
pub mod ops;
mod parked;
mod rebuild;
mod replication;
mod shards;
mod sync;
#[cfg(test)]
mod testing;
mod verify;

use esq_domain::derived::Derived;
use esq_domain::projection::Projection;
use esq_domain::StreamId;
use esq_eventstore::{ChangeFeed, EventStore, StoreError};
use esq_readstore::{Coordination, ReadError, ReadStore};
use futures::StreamExt;
use std::collections::hash_map::Entry;
use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The version of the read model's layout, recorded in each generation record: bumped whenever a projection's
/// document changes meaning (2: cart lines as counts that never go below one, in `cart2`), so
/// that an upgraded projector rebuilds the read model (into a new generation) from the events instead of continuing
/// documents folded under the old meaning.
pub const READ_MODEL_LAYOUT: u32 = 2;

/// Default of [`Config::sync_concurrency`] (measured: see ARCHITECTURE.md, "Projector throughput").
pub const DEFAULT_SYNC_CONCURRENCY: usize = 32;
/// Default of [`Config::shard_concurrency`].
pub const DEFAULT_SHARD_CONCURRENCY: usize = 4;
/// Default worker threads of the projector binary's runtime (`--worker-threads`): one, so that
/// its tasks and the drivers' I/O tasks wake each other on one thread (ARCHITECTURE.md,
/// "Projector throughput").
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// Tunables of a projector.
#[derive(Debug, Clone)]
pub struct Config {
    /// This projector is the only one writing its read store (esq dev's in-process memory
    /// store): a rebuild then starts scanning at once instead of waiting a `lease_ttl` for other
    /// replicas to learn of the new generation.
    pub sole_projector: bool,
    /// How often the change log is polled when no nudge arrives.
    pub poll_interval: Duration,
    /// Changes read per poll of one shard.
    pub poll_limit: u32,
    /// Events pulled from a stream per read.
    pub read_page: u32,
    /// A notification whose events are still not in the store this long after it was written
    /// belongs to an append that never committed, and is skipped.
    pub append_deadline: Duration,
    /// Prefix of the checkpoint, lease and member names (one checkpoint per shard); projectors
    /// with the same prefix share the shards.
    pub checkpoint_prefix: String,
    /// This projector's name among its replicas (unique per process).
    pub owner: String,
    /// How long a shard lease lasts without renewal; a dead projector's shards are taken over
    /// after this.
    pub lease_ttl: Duration,
    /// Leases are renewed this many times per `lease_ttl` (3: at a third of it), so that a
    /// slow renewal or two still keeps them.
    pub lease_renewals_per_ttl: u32,
    /// The first wait after a failed round; it doubles with every further failure…
    pub error_backoff_min: Duration,
    /// …up to this, so that a store that answers again is used within it.
    pub error_backoff_max: Duration,
    /// At most this many queued nudges are taken together (each stream once).
    pub nudge_batch: usize,
    /// Stream ids read per page of the event store's stream list (rebuild).
    pub list_page: u32,
    /// How many times finishing a pending index update follows a newer apply by another
    /// projector before leaving the rest to the next sync of the document.
    pub reindex_rounds: u32,
    /// How many changes of a shard are remembered past its checkpoint: a change whose append
    /// is still in flight holds the checkpoint back, but later changes are processed meanwhile,
    /// up to this many (then the shard waits for the append or its deadline).
    pub unresolved_window: usize,
    /// How often a shard's owner records the shard's freshness (`ShardStatus`) in the read store.
    pub status_interval: Duration,
    /// At most this many streams are brought up to date at once (over all shards, the fast
    /// path and a rebuild's scan): a page's distinct streams are synced concurrently, their
    /// read-store calls pipelined on the one connection. Each document's applies stay ordered:
    /// one stream is synced by one task at a time within a page.
    pub sync_concurrency: usize,
    /// At most this many owned shards are polled at once.
    pub shard_concurrency: usize,
    /// Progress markers (shard checkpoints, a rebuild's swap, derived fill markers) move past
    /// applies only once every read-store primary has them on at least this many replicas
    /// and no primary was replaced meanwhile (see `replication`); 0: at once (a standalone
    /// server, or replicas not trusted to survive).
    pub wait_replicas: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            sole_projector: false,
            poll_interval: Duration::from_millis(250),
            poll_limit: 512,
            read_page: 500,
            append_deadline: Duration::from_secs(15),
            checkpoint_prefix: "projector".to_owned(),
            owner: format!("projector-{}", uuid::Uuid::new_v4().simple()),
            lease_ttl: Duration::from_secs(10),
            lease_renewals_per_ttl: 3,
            error_backoff_min: Duration::from_millis(50),
            error_backoff_max: Duration::from_secs(1),
            nudge_batch: 256,
            list_page: 500,
            reindex_rounds: 8,
            unresolved_window: 4096,
            status_interval: Duration::from_secs(1),
            sync_concurrency: DEFAULT_SYNC_CONCURRENCY,
            shard_concurrency: DEFAULT_SHARD_CONCURRENCY,
            wait_replicas: 0,
        }
    }
}

/// The per-stream projections esq maintains: every one in [`esq_domain::registry`].
pub fn default_projections() -> Vec<Arc<dyn Projection>> {
    esq_domain::registry::projections()
}

pub use derived::DERIVED_LAYOUT;

/// Why projecting failed; always transient from the projector's point of view.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The read store failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// No projection has this name.
    #[error("no projection named {0:?}")]
    UnknownProjection(String),
    /// The operation does not apply to this projection; the text says why and what does.
    #[error("{0}")]
    Refused(String),
}

/// Folds events from an event store into a read store.
pub struct Projector<E, F, R> {
    store: Arc<E>,
    feed: Arc<F>,
    read: Arc<R>,
    projections: Vec<Arc<dyn Projection>>,
    /// The derived projections ([`esq_domain::registry::derived`]), fed from `projections`.
    derived: Vec<Arc<dyn Derived>>,
    config: Config,
    /// Per shard, the changes processed past the checkpoint (see `shards::Window`).
    windows: std::sync::Mutex<std::collections::HashMap<u32, shards::Window>>,
    /// The namespaces each projection writes to (its generations).
    targets: generations::Targets,
    /// Bounds the streams synced at once ([`Config::sync_concurrency`]).
    syncs: tokio::sync::Semaphore,
    /// When the last "not replicated yet" warning was logged (they are rate-limited).
    replication_warned: std::sync::Mutex<Option<std::time::Instant>>,
    /// Streams the fast path brought up to a version lately (see [`Projector::nudged_to`]).
    nudged: std::sync::Mutex<std::collections::HashMap<StreamId, u64>>,
    /// Tests: how many times a document's starting point was read (see `sync`).
    #[cfg(test)]
    starts: std::sync::atomic::AtomicU64,
    /// Tests: how many syncs read the store ahead of their starting points (see `sync`).
    #[cfg(test)]
    prefetches: std::sync::atomic::AtomicU64,
}

/// Most streams [`Projector::nudged_to`] remembers; beyond, it starts afresh (a hint only).
const NUDGED_REMEMBERED: usize = 16_384;

/// A fast-path notification: this stream reached this version, perhaps with the append's
/// events.
pub use esq_eventstore::NudgeMessage;

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// A projector with the [`default_projections`].
    pub fn new(store: Arc<E>, feed: Arc<F>, read: Arc<R>, config: Config) -> Self {
        Self {
            store,
            feed,
            read,
            projections: default_projections(),
            derived: esq_domain::registry::derived(),
            windows: Default::default(),
            targets: generations::Targets::default(),
            syncs: tokio::sync::Semaphore::new(config.sync_concurrency.max(1)),
            replication_warned: Default::default(),
            config,
            nudged: Default::default(),
            #[cfg(test)]
            starts: Default::default(),
            #[cfg(test)]
            prefetches: Default::default(),
        }
    }

    /// Tails the shards it holds leases on until `shutdown`, sharing them fairly with the other
    /// live projectors of the same prefix. `wake` makes it poll at once instead of waiting for
    /// the poll interval; `nudges` (the fast path) name a stream to bring up to date at once,
    /// without polling the shards. Transient errors are logged and retried; the current batch
    /// finishes and its checkpoint is saved before returning, and the leases are released.
    pub async fn run(
        &self,
        wake: Arc<Notify>,
        nudges: Option<mpsc::Receiver<NudgeMessage>>,
        shutdown: CancellationToken,
    ) {
        tracing::info!(shards = self.feed.shard_count(), owner = %self.config.owner, "projector running");
        // Rebuilds run beside the shard loop, never inside it: lease renewal never waits on one.
        tokio::join!(
            self.tail(wake, nudges, shutdown.clone()),
            self.rebuild_loop(shutdown)
        );
    }

    /// The shard loop of [`Projector::run`].
    async fn tail(
        &self,
        wake: Arc<Notify>,
        mut nudges: Option<mpsc::Receiver<NudgeMessage>>,
        shutdown: CancellationToken,
    ) {
        let mut owned = BTreeSet::new();
        let mut leases_due = Instant::now();
        let mut poll_due = Instant::now();
        let mut backoff = self.config.error_backoff_min;
        while !shutdown.is_cancelled() {
            let now = Instant::now();
            if now >= poll_due || now >= leases_due {
                match self.poll_round(&mut owned, &mut leases_due).await {
                    Ok(more) => {
                        backoff = self.config.error_backoff_min;
                        // A full page means more may be waiting: poll again at once.
                        poll_due = if more {
                            Instant::now()
                        } else {
                            Instant::now() + self.config.poll_interval
                        };
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "projection failed; retrying");
                        poll_due = Instant::now() + backoff;
                        leases_due = poll_due;
                        backoff = (backoff * 2).min(self.config.error_backoff_max);
                    }
                }
                continue;
            }
            let mut nudged = None;
            tokio::select! {
                _ = wake.notified() => poll_due = Instant::now(),
                Some(n) = recv(&mut nudges) => nudged = Some(n),
                _ = tokio::time::sleep_until(poll_due.min(leases_due)) => {}
                _ = shutdown.cancelled() => {}
            }
            if let Some(first) = nudged {
                self.handle_nudges(first, nudges.as_mut(), &owned).await;
            }
        }
        for shard in owned {
            let _ = self
                .read
                .release_lease(&self.shard_name(shard), &self.config.owner)
                .await;
        }
        let _ = self
            .read
            .leave(&self.members_group(), &self.config.owner)
            .await;
        tracing::info!("projector stopped");
    }

    /// Brings the nudged streams of the shards this projector holds up to date: the first
    /// nudge and any others already queued, each stream once at its highest version (with that
    /// nudge's events, if it carries them). A miss is fine: the change log brings the stream
    /// up to date later.
    async fn handle_nudges(
        &self,
        first: NudgeMessage,
        queue: Option<&mut mpsc::Receiver<NudgeMessage>>,
        owned: &BTreeSet<u32>,
    ) {
        let mut streams = std::collections::HashMap::new();
        streams.insert(first.stream.clone(), first);
        if let Some(rx) = queue {
            while streams.len() < self.config.nudge_batch {
                let Ok(nudge) = rx.try_recv() else {
                    break;
                };
                match streams.entry(nudge.stream.clone()) {
                    Entry::Occupied(mut held) if held.get().version < nudge.version => {
                        held.insert(nudge);
                    }
                    Entry::Occupied(_) => {}
                    Entry::Vacant(slot) => {
                        slot.insert(nudge);
                    }
                }
            }
        }
        // Distinct streams concurrently, bounded like the shards' syncs.
        let syncs: Vec<_> = streams
            .into_values()
            .filter(|nudge| owned.contains(&self.feed.shard_of(&nudge.stream)))
            .map(|nudge| self.nudged_sync(nudge))
            .collect();
        let mut syncs =
            futures::stream::iter(syncs).buffer_unordered(self.config.sync_concurrency.max(1));
        while let Some(synced) = syncs.next().await {
            if !synced {
                // A store in trouble: leave the rest to the change log rather than wait out a
                // timeout per stream.
                return;
            }
        }
    }

    /// One stream of [`Projector::handle_nudges`]: false if the sync failed.
    async fn nudged_sync(&self, nudge: NudgeMessage) -> bool {
        let Ok(_permit) = self.syncs.acquire().await else {
            return false;
        };
        let (stream, version) = (&nudge.stream, nudge.version);
        match self
            .sync_only(stream, Some(version), None, &nudge.events)
            .await
        {
            Ok(synced) => {
                if synced == sync::Synced::Done {
                    self.remember_nudged(stream, version);
                }
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, %stream, "fast-path sync failed");
                false
            }
        }
    }

    /// Whether the fast path brought `stream` to `version` or beyond lately, in this process:
    /// then the change log's sync of it most likely finds its documents current. A hint for
    /// how to sync, never trusted for what is applied; bounded, forgotten when full.
    pub(crate) fn nudged_to(&self, stream: &StreamId, version: u64) -> bool {
        let nudged = self.nudged.lock().unwrap_or_else(PoisonError::into_inner);
        nudged.get(stream).is_some_and(|&v| v >= version)
    }

    fn remember_nudged(&self, stream: &StreamId, version: u64) {
        let mut nudged = self.nudged.lock().unwrap_or_else(PoisonError::into_inner);
        if nudged.len() >= NUDGED_REMEMBERED && !nudged.contains_key(stream) {
            nudged.clear();
        }
        let at = nudged.entry(stream.clone()).or_insert(version);
        *at = (*at).max(version);
    }

    /// Brings the read model up to date with everything the store holds now, ignoring leases:
    /// used before serving queries at start. Returns the number of change pages processed.
    pub async fn catch_up(&self) -> Result<u64, ProjectError> {
        self.refresh_generations(true).await?;
        self.ensure_derived().await?;
        // The shards concurrently (bounded), each page after page until it runs dry.
        let drains: Vec<_> = (0..self.feed.shard_count())
            .map(|shard| self.drain_shard(shard))
            .collect();
        let mut drains =
            futures::stream::iter(drains).buffer_unordered(self.config.shard_concurrency.max(1));
        let mut pages = 0;
        while let Some(drained) = drains.next().await {
            pages += drained?;
        }
        Ok(pages)
    }

    /// Polls a shard page after page until it runs dry; returns the number of pages.
    async fn drain_shard(&self, shard: u32) -> Result<u64, ProjectError> {
        let mut pages = 0;
        while self.poll_shard(shard).await? {
            pages += 1;
        }
        Ok(pages)
    }
}

async fn recv(nudges: &mut Option<mpsc::Receiver<NudgeMessage>>) -> Option<NudgeMessage> {
    match nudges {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
