//! esq projector: tails the change log and folds events into the read store.
//!
//! A change says only *which stream changed up to which version*; the projector then pulls the
//! stream's events after the read model's version and applies them behind the version fence.
//! So duplicate, late or reordered notifications are harmless, a crash between any two steps
//! only repeats fenced no-ops, and the read store can be rebuilt from the event store at any
//! time ([`Projector::rebuild`]). The projector never writes the event store.

pub mod admin;
pub mod ops;
mod pending;

use esq_domain::bookshop::BookProjection;
use esq_domain::cart::CartProjection;
use esq_domain::projection::{
    batch, doc_version, ApplyOutcome, FieldOp, IndexOp, Projection, INDEX_PENDING_FIELD,
};
use esq_domain::state::StateProjection;
use esq_domain::{RecordedEvent, StreamId};
use esq_eventstore::{now_us, Change, ChangeFeed, EventStore, ReadRequest, StoreError};
use esq_readstore::{Coordination, ReadError, ReadStore};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The version of the read model's layout, part of its marker: bumped whenever a projection's
/// document changes meaning (2: cart lines as counts that never go below one, in `cart2`), so
/// that an upgraded projector rebuilds the read model from the events instead of continuing
/// documents folded under the old meaning.
pub const READ_MODEL_LAYOUT: u32 = 2;

/// Tunables of a projector.
#[derive(Debug, Clone)]
pub struct Config {
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(250),
            poll_limit: 512,
            read_page: 500,
            append_deadline: Duration::from_secs(15),
            checkpoint_prefix: "projector".to_owned(),
            owner: format!("projector-{}", uuid::Uuid::new_v4().simple()),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// The projections esq maintains: cart, book and the generic state of every stream.
pub fn default_projections() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(CartProjection),
        Arc::new(BookProjection),
        Arc::new(StateProjection),
    ]
}

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
}

/// How far a stream could be brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Synced {
    /// Every projection is at the target version (or at the stream's end).
    Done,
    /// The store does not (yet) hold the events up to the target.
    Missing,
}

/// Folds events from an event store into a read store.
pub struct Projector<E, F, R> {
    store: Arc<E>,
    feed: Arc<F>,
    read: Arc<R>,
    projections: Vec<Arc<dyn Projection>>,
    config: Config,
}

/// A fast-path notification: this stream reached this version.
pub type NudgeMessage = (StreamId, u64);

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// A projector with the [`default_projections`].
    pub fn new(store: Arc<E>, feed: Arc<F>, read: Arc<R>, config: Config) -> Self {
        Self {
            store,
            feed,
            read,
            projections: default_projections(),
            config,
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
        mut nudges: Option<mpsc::Receiver<NudgeMessage>>,
        shutdown: CancellationToken,
    ) {
        tracing::info!(shards = self.feed.shard_count(), owner = %self.config.owner, "projector running");
        let mut owned = BTreeSet::new();
        let mut leases_due = Instant::now();
        let mut poll_due = Instant::now();
        let mut backoff = Duration::from_millis(50);
        while !shutdown.is_cancelled() {
            let now = Instant::now();
            if now >= poll_due || now >= leases_due {
                match self.poll_round(&mut owned, &mut leases_due).await {
                    Ok(more) => {
                        backoff = Duration::from_millis(50);
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
                        // Capped at a second: a store that answers again is used within it.
                        backoff = (backoff * 2).min(Duration::from_secs(1));
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
    /// nudge and any others already queued, each stream once at its highest version. A miss is
    /// fine: the change log brings the stream up to date later.
    async fn handle_nudges(
        &self,
        first: NudgeMessage,
        queue: Option<&mut mpsc::Receiver<NudgeMessage>>,
        owned: &BTreeSet<u32>,
    ) {
        let mut streams = std::collections::HashMap::new();
        streams.insert(first.0, first.1);
        if let Some(rx) = queue {
            while streams.len() < 256 {
                let Ok((stream, version)) = rx.try_recv() else {
                    break;
                };
                let v = streams.entry(stream).or_insert(version);
                *v = (*v).max(version);
            }
        }
        for (stream, version) in streams {
            if owned.contains(&self.feed.shard_of(&stream)) {
                if let Err(e) = self.sync(&stream, Some(version)).await {
                    // A store in trouble: leave the rest to the change log rather than wait
                    // out a timeout per stream.
                    tracing::debug!(error = %e, %stream, "fast-path sync failed");
                    return;
                }
            }
        }
    }

    /// Polls every shard it holds, renewing its leases whenever they are due — also between
    /// shards, so a long round cannot outlive them. True if a full page was processed.
    async fn poll_round(
        &self,
        owned: &mut BTreeSet<u32>,
        leases_due: &mut Instant,
    ) -> Result<bool, ProjectError> {
        let mut more = false;
        self.renew_if_due(owned, leases_due).await?;
        for shard in owned.clone() {
            self.renew_if_due(owned, leases_due).await?;
            if owned.contains(&shard) {
                more |= self.poll_shard_until(shard, Some(*leases_due)).await?;
            }
        }
        Ok(more)
    }

    async fn renew_if_due(
        &self,
        owned: &mut BTreeSet<u32>,
        leases_due: &mut Instant,
    ) -> Result<(), ProjectError> {
        if Instant::now() >= *leases_due {
            self.ensure_marker().await?;
            self.refresh_leases(owned).await?;
            *leases_due = Instant::now() + self.config.lease_ttl / 3;
        }
        Ok(())
    }

    /// Takes this projector's fair share of the shards (shards / live projectors, rounded up),
    /// renewing the leases it holds and releasing any above its share.
    async fn refresh_leases(&self, owned: &mut BTreeSet<u32>) -> Result<(), ProjectError> {
        let group = self.members_group();
        let ttl = self.config.lease_ttl;
        let owner = &self.config.owner;
        let live = self.read.heartbeat(&group, owner, ttl).await?.max(1) as u32;
        let shards = self.feed.shard_count();
        let fair = shards.div_ceil(live) as usize;
        let mut kept = BTreeSet::new();
        for &shard in owned.iter() {
            let name = self.shard_name(shard);
            if kept.len() < fair && self.read.acquire_lease(&name, owner, ttl).await? {
                kept.insert(shard);
            } else {
                self.read.release_lease(&name, owner).await?;
            }
        }
        // Start looking at a different shard per owner, so replicas don't all contend for 0.
        let start = owner
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        for i in 0..shards {
            if kept.len() >= fair {
                break;
            }
            let shard = (start.wrapping_add(i)) % shards;
            if !kept.contains(&shard)
                && self
                    .read
                    .acquire_lease(&self.shard_name(shard), owner, ttl)
                    .await?
            {
                kept.insert(shard);
            }
        }
        if kept != *owned {
            tracing::info!(live, shards = ?kept, "shard leases changed");
        }
        *owned = kept;
        Ok(())
    }

    /// Rebuilds the read model from the event store if it lost its marker (a new or flushed
    /// read store, or one built for an older [`READ_MODEL_LAYOUT`]), then sets the marker.
    pub async fn ensure_marker(&self) -> Result<(), ProjectError> {
        let marker = format!(
            "{}:marker:{READ_MODEL_LAYOUT}",
            self.config.checkpoint_prefix
        );
        if self.read.checkpoint(&marker).await?.is_none() {
            tracing::warn!(
                "read model has no marker (new or flushed): rebuilding from the event store"
            );
            let streams = self.rebuild().await?;
            tracing::info!(streams, "read model rebuilt");
            self.read
                .save_checkpoint(&marker, &self.config.owner)
                .await?;
        }
        Ok(())
    }

    /// Brings the read model up to date with everything the store holds now, ignoring leases:
    /// used before serving queries at start. Returns the number of change pages processed.
    pub async fn catch_up(&self) -> Result<u64, ProjectError> {
        self.ensure_marker().await?;
        let mut pages = 0;
        for shard in 0..self.feed.shard_count() {
            while self.poll_shard(shard).await? {
                pages += 1;
            }
        }
        Ok(pages)
    }

    fn members_group(&self) -> String {
        format!("{}:members", self.config.checkpoint_prefix)
    }

    /// The name of a shard's checkpoint and of its lease (kept apart by the read store).
    fn shard_name(&self, shard: u32) -> String {
        format!("{}:shard:{shard}", self.config.checkpoint_prefix)
    }

    /// Processes one page of a shard; true if the page was full.
    pub async fn poll_shard(&self, shard: u32) -> Result<bool, ProjectError> {
        self.poll_shard_until(shard, None).await
    }

    /// [`Projector::poll_shard`], stopping early (and reporting more to do) once `stop_at` has
    /// passed, so that leases are renewed in time even within a long page.
    async fn poll_shard_until(
        &self,
        shard: u32,
        stop_at: Option<Instant>,
    ) -> Result<bool, ProjectError> {
        let name = self.shard_name(shard);
        let after = self.read.checkpoint(&name).await?;
        let page = self
            .feed
            .poll(shard, after.as_deref(), self.config.poll_limit)
            .await?;
        let mut more = page.changes.len() == self.config.poll_limit as usize;
        let mut done: Option<&str> = None;
        for (change, position) in page.changes.iter().zip(&page.positions) {
            if stop_at.is_some_and(|t| Instant::now() >= t) {
                more = true;
                break;
            }
            // Judged by the time before the store is read: an append that commits later than
            // this still commits before its deadline, so the read below would see it.
            let checked_at = now_us();
            match self.sync(&change.stream, Some(change.last_version)).await? {
                Synced::Done => done = Some(position),
                Synced::Missing if self.is_orphan(change, checked_at) => {
                    tracing::warn!(stream = %change.stream, last = change.last_version,
                        "skipping a notification whose append never committed");
                    done = Some(position);
                }
                Synced::Missing => {
                    // The append may still be in flight: stop here and retry from this change.
                    more = false;
                    break;
                }
            }
        }
        if let Some(p) = done {
            self.read.save_checkpoint(&name, p).await?;
        }
        Ok(more)
    }

    fn is_orphan(&self, change: &Change, checked_at_us: i64) -> bool {
        esq_eventstore::is_orphan(change, checked_at_us, self.config.append_deadline)
    }

    /// Brings every projection of `stream` up to `target` (or to the stream's end when
    /// `None`), pulling events after the lowest projected version, in pages.
    async fn sync(&self, stream: &StreamId, target: Option<u64>) -> Result<Synced, ProjectError> {
        let projections: Vec<&Arc<dyn Projection>> = self
            .projections
            .iter()
            .filter(|p| p.handles(&stream.kind))
            .collect();
        let mut versions = Vec::with_capacity(projections.len());
        for p in &projections {
            let doc_id = p.doc_id(stream);
            let version = if p.has_indexes() {
                // Finish index updates an earlier apply left pending (a crash, a Redis error).
                let doc = self.read.get(p.name(), &doc_id).await?;
                let version = doc.as_ref().map_or(0, doc_version);
                if doc.is_some_and(|d| d.contains_key(INDEX_PENDING_FIELD)) {
                    self.reindex(p.as_ref(), &doc_id).await?;
                }
                version
            } else {
                self.read.version(p.name(), &doc_id).await?
            };
            versions.push(version);
        }
        loop {
            let low = versions.iter().copied().min().unwrap_or(u64::MAX);
            if target.is_some_and(|t| low >= t) || projections.is_empty() {
                return Ok(Synced::Done);
            }
            let events = self
                .store
                .read(
                    stream,
                    ReadRequest::forwards(low + 1, self.config.read_page),
                )
                .await?;
            if events.is_empty() {
                return Ok(if target.is_some() {
                    Synced::Missing
                } else {
                    Synced::Done
                });
            }
            for (p, version) in projections.iter().zip(versions.iter_mut()) {
                *version = self.apply(p.as_ref(), stream, &events, *version).await?;
            }
            if events.len() < self.config.read_page as usize && target.is_none() {
                return Ok(Synced::Done);
            }
        }
    }

    /// Applies the events after `version` to one projection; returns its version afterwards.
    async fn apply(
        &self,
        projection: &dyn Projection,
        stream: &StreamId,
        events: &[RecordedEvent],
        version: u64,
    ) -> Result<u64, ProjectError> {
        let start = events.partition_point(|e| e.version <= version);
        let Some(mut b) = batch(projection, &events[start..]) else {
            return Ok(version);
        };
        debug_assert!(projection.has_indexes() || b.changes.indexes.is_empty());
        if !b.changes.indexes.is_empty() {
            // Marks the index work as pending in the same atomic apply, so that an index update
            // cut short (a crash, a Redis error) is noticed by whoever syncs this document next.
            b.changes.fields.push(FieldOp::Set(
                INDEX_PENDING_FIELD.to_owned(),
                pending_marker(b.last_version, &b.changes.indexes),
            ));
        }
        let doc_id = projection.doc_id(stream);
        let outcome = self.read.apply(projection.name(), &doc_id, &b).await?;
        if projection.has_indexes() {
            // Also after a duplicate or stale apply: the projector that applied it may have
            // died before its index update.
            self.reindex(projection, &doc_id).await?;
        }
        Ok(match outcome {
            ApplyOutcome::Applied => b.last_version,
            ApplyOutcome::Duplicate => b.last_version.max(version),
            // Another projector moved the document: continue from where it really is.
            ApplyOutcome::Stale { current } => current,
        })
    }

    /// Finishes a document's pending index update, if it has one: adds the document to the
    /// indexes its current state wants, removes it from those the marked batch left (unless the
    /// state wants them back), and clears the marker. If the document moved on meanwhile (a
    /// newer apply by another projector), the indexes of the newest state are added again, so
    /// a late update can never leave a newer membership undone. Removals lost to a crash leave
    /// stale entries, which readers skip by checking each entry against its document.
    async fn reindex(&self, projection: &dyn Projection, doc_id: &str) -> Result<(), ProjectError> {
        let name = projection.name();
        let Some(mut doc) = self.read.get(name, doc_id).await? else {
            return Ok(());
        };
        let Some(mut marker) = doc.get(INDEX_PENDING_FIELD).cloned() else {
            return Ok(()); // nothing pending
        };
        let mut removals = pending_removals(&marker);
        // A bounded number of rounds: each one only follows a newer apply by someone else.
        for _ in 0..8 {
            let version = doc_version(&doc);
            let wanted = projection.indexes(&doc);
            removals.retain(|index| !wanted.contains(index));
            self.read
                .update_indexes(name, doc_id, &wanted, &removals, &marker)
                .await?;
            let Some(now) = self.read.get(name, doc_id).await? else {
                return Ok(());
            };
            if doc_version(&now) == version {
                return Ok(());
            }
            doc = now;
            marker = doc.get(INDEX_PENDING_FIELD).cloned().unwrap_or_default();
            removals = pending_removals(&marker);
        }
        Ok(())
    }

    /// Brings every stream of the event store into the read store: a complete rebuild after
    /// the read store was lost, or a check that nothing was missed. Streams the store instead
    /// of loading it: one page of stream ids and one page of events at a time.
    pub async fn rebuild(&self) -> Result<u64, ProjectError> {
        let mut cursor = None;
        let mut streams = 0u64;
        loop {
            let page = self.store.list_streams(cursor, 500).await?;
            for stream in &page.streams {
                self.sync(stream, None).await?;
                streams += 1;
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(streams),
            }
        }
    }
}

/// The pending-index marker of an apply: its last version (which makes the marker unique) and
/// the indexes its batch removes the document from, as JSON.
fn pending_marker(last_version: u64, ops: &[IndexOp]) -> String {
    let mut removals: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            IndexOp::Remove { index, .. } => Some(index.as_str()),
            IndexOp::Add { .. } => None,
        })
        .collect();
    removals.sort_unstable();
    removals.dedup();
    serde_json::json!({ "v": last_version, "remove": removals }).to_string()
}

/// The removals recorded in a pending-index marker (none if it cannot be read).
fn pending_removals(marker: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(marker)
        .ok()
        .and_then(|m| {
            m.get("remove")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

async fn recv(nudges: &mut Option<mpsc::Receiver<NudgeMessage>>) -> Option<NudgeMessage> {
    match nudges {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use esq_domain::{ExpectedVersion, NewEvent};
    use esq_eventstore::embedded::EmbeddedStore;
    use esq_eventstore::ChangePage;
    use esq_readstore::memory::MemoryStore;

    /// A change feed whose entries the test writes by hand (to create orphans), over several
    /// shards; positions are indexes into the list.
    struct HandFeed {
        shards: u32,
        changes: std::sync::Mutex<Vec<(u32, Change)>>,
    }

    impl ChangeFeed for HandFeed {
        fn shard_count(&self) -> u32 {
            self.shards
        }

        async fn poll(
            &self,
            shard: u32,
            after: Option<&str>,
            limit: u32,
        ) -> Result<ChangePage, StoreError> {
            let start = after.map_or(0, |a| a.parse::<usize>().expect("position") + 1);
            let all = self.changes.lock().expect("lock").clone();
            let mut page = ChangePage::default();
            for (i, (s, c)) in all.into_iter().enumerate().skip(start) {
                if s == shard && page.changes.len() < limit as usize {
                    page.changes.push(c);
                    page.positions.push(i.to_string());
                }
            }
            Ok(page)
        }

        async fn position_before(
            &self,
            _shard: u32,
            _time_us: i64,
        ) -> Result<Option<String>, StoreError> {
            Ok(None)
        }
    }

    fn cart(id: &str) -> StreamId {
        StreamId::new("cart", id).expect("stream")
    }

    fn change(stream: StreamId, last: u64, noted_at_us: i64) -> Change {
        Change {
            stream,
            first_version: last,
            last_version: last,
            noted_at_us,
        }
    }

    async fn setup(
        shards: u32,
    ) -> (
        tempfile::TempDir,
        Arc<EmbeddedStore>,
        Arc<HandFeed>,
        Arc<MemoryStore>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path()).expect("open"));
        let feed = Arc::new(HandFeed {
            shards,
            changes: std::sync::Mutex::new(Vec::new()),
        });
        (dir, store, feed, Arc::new(MemoryStore::new()))
    }

    #[tokio::test]
    async fn orphans_wait_for_the_deadline_then_are_skipped() {
        let (_dir, store, feed, read) = setup(1).await;
        let config = Config {
            append_deadline: Duration::from_secs(5),
            ..Config::default()
        };
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), config);
        let e = NewEvent::json(
            "ItemAdded",
            2,
            &serde_json::json!({"sku":"a","quantity":1,"unit_price_cents":3}),
        );
        store
            .append(&cart("real"), ExpectedVersion::NoStream, &[e])
            .await
            .expect("append");
        // A fresh notification of an append that is not (yet) in the store blocks the shard...
        feed.changes.lock().expect("lock").extend([
            (0, change(cart("ghost"), 1, now_us())),
            (0, change(cart("real"), 1, now_us())),
        ]);
        p.poll_shard(0).await.expect("poll");
        assert_eq!(
            read.checkpoint("projector:shard:0").await.expect("cp"),
            None
        );
        assert_eq!(read.version("cart2", "real").await.expect("v"), 0);
        // ...until the append deadline has passed: then it is an orphan and is skipped.
        feed.changes.lock().expect("lock")[0].1.noted_at_us = now_us() - 6_000_000;
        p.poll_shard(0).await.expect("poll");
        assert_eq!(
            read.checkpoint("projector:shard:0")
                .await
                .expect("cp")
                .as_deref(),
            Some("1")
        );
        let doc = read.get("cart2", "real").await.expect("get").expect("doc");
        assert_eq!(doc_version(&doc), 1);
        assert_eq!(read.version("cart2", "ghost").await.expect("v"), 0);
    }

    #[tokio::test]
    async fn replicas_split_the_shards_and_take_over_a_dead_ones() {
        let (_dir, store, feed, read) = setup(4).await;
        let config = |owner: &str| Config {
            owner: owner.to_owned(),
            lease_ttl: Duration::from_millis(300),
            ..Config::default()
        };
        let a = Projector::new(store.clone(), feed.clone(), read.clone(), config("a"));
        let b = Projector::new(store.clone(), feed.clone(), read.clone(), config("b"));
        let (mut owned_a, mut owned_b) = (BTreeSet::new(), BTreeSet::new());
        a.refresh_leases(&mut owned_a).await.expect("a");
        assert_eq!(owned_a.len(), 4, "alone, a takes every shard");
        b.refresh_leases(&mut owned_b).await.expect("b");
        a.refresh_leases(&mut owned_a)
            .await
            .expect("a gives up its extra shards");
        b.refresh_leases(&mut owned_b).await.expect("b takes them");
        assert_eq!((owned_a.len(), owned_b.len()), (2, 2));
        assert!(owned_a.is_disjoint(&owned_b));
        // a dies (stops renewing): after the lease ttl, b holds every shard.
        tokio::time::sleep(Duration::from_millis(400)).await;
        b.refresh_leases(&mut owned_b).await.expect("b");
        assert_eq!(owned_b.len(), 4);
    }

    #[tokio::test]
    async fn rebuild_restores_a_lost_read_model() {
        let (_dir, store, feed, read) = setup(1).await;
        for i in 0..3 {
            let e = NewEvent::json(
                "ItemAdded",
                2,
                &serde_json::json!({"sku":"a","quantity":1,"unit_price_cents":3}),
            );
            store
                .append(
                    &cart(&format!("c{i}")),
                    ExpectedVersion::Any,
                    std::slice::from_ref(&e),
                )
                .await
                .expect("append");
            store
                .append(
                    &cart(&format!("c{i}")),
                    ExpectedVersion::Any,
                    &[NewEvent {
                        event_id: uuid::Uuid::new_v4(),
                        ..e
                    }],
                )
                .await
                .expect("append");
        }
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.ensure_marker().await.expect("rebuild");
        for i in 0..3 {
            assert_eq!(read.version("cart2", &format!("c{i}")).await.expect("v"), 2);
            assert_eq!(
                read.version("state", &format!("cart:c{i}"))
                    .await
                    .expect("v"),
                2
            );
        }
        let doc = read.get("cart2", "c0").await.expect("get").expect("doc");
        assert_eq!(esq_domain::cart::CartView::from_doc(&doc).total_cents, 6);
    }

    #[tokio::test]
    async fn index_work_left_pending_by_a_crash_is_finished_by_the_next_sync() {
        use esq_domain::bookshop::{BookProjection, ALL_INDEX};
        let (_dir, store, feed, read) = setup(1).await;
        let book = StreamId::new("book", "9780441478125").expect("stream");
        let created = NewEvent::json(
            "BookCreated",
            1,
            &serde_json::json!({"isbn": "9780441478125", "title": "T", "author": "A", "price_cents": 1}),
        );
        store
            .append(&book, ExpectedVersion::NoStream, &[created])
            .await
            .expect("append");
        // What a projector that died right after its fenced apply leaves behind.
        let events = store
            .read(&book, ReadRequest::forwards(1, 10))
            .await
            .expect("read");
        let mut b = batch(&BookProjection, &events).expect("batch");
        b.changes
            .fields
            .push(FieldOp::Set(INDEX_PENDING_FIELD.to_owned(), "1".to_owned()));
        assert_eq!(
            read.apply("book", &book.id, &b).await.expect("apply"),
            ApplyOutcome::Applied
        );
        assert!(read
            .index_page("book", ALL_INDEX, None, 10)
            .await
            .expect("page")
            .is_empty());

        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        assert_eq!(p.sync(&book, Some(1)).await.expect("sync"), Synced::Done);
        assert_eq!(
            read.index_page("book", ALL_INDEX, None, 10)
                .await
                .expect("page"),
            vec![book.id.clone()]
        );
        assert_eq!(
            read.index_page("book", "author:A", None, 10)
                .await
                .expect("page"),
            vec![book.id.clone()]
        );
        let doc = read.get("book", &book.id).await.expect("get").expect("doc");
        assert!(!doc.contains_key(INDEX_PENDING_FIELD));
    }

    #[tokio::test]
    async fn removals_of_an_interrupted_index_update_are_finished_from_the_marker() {
        use esq_domain::bookshop::BookProjection;
        let (_dir, store, feed, read) = setup(1).await;
        let book = StreamId::new("book", "9780441478125").expect("stream");
        let events = [
            NewEvent::json(
                "BookCreated",
                1,
                &serde_json::json!({"isbn": "9780441478125", "title": "T", "author": "A", "price_cents": 1}),
            ),
            NewEvent::json(
                "BookUpdated",
                1,
                &serde_json::json!({"author": "B", "previous_author": "A"}),
            ),
        ];
        store
            .append(&book, ExpectedVersion::NoStream, &events[..1])
            .await
            .expect("append");
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.sync(&book, Some(1)).await.expect("sync");
        assert_eq!(
            read.index_page("book", "author:A", None, 10)
                .await
                .expect("page"),
            vec![book.id.clone()]
        );
        store
            .append(&book, ExpectedVersion::Exact(1), &events[1..])
            .await
            .expect("append");
        // A projector applies version 2 and dies before its index update.
        let stored = store
            .read(&book, ReadRequest::forwards(2, 10))
            .await
            .expect("read");
        let mut b = batch(&BookProjection, &stored).expect("batch");
        b.changes.fields.push(FieldOp::Set(
            INDEX_PENDING_FIELD.to_owned(),
            pending_marker(2, &b.changes.indexes),
        ));
        read.apply("book", &book.id, &b).await.expect("apply");
        // The next sync of the book finishes the work, removals included.
        p.sync(&book, Some(2)).await.expect("sync");
        assert!(read
            .index_page("book", "author:A", None, 10)
            .await
            .expect("page")
            .is_empty());
        assert_eq!(
            read.index_page("book", "author:B", None, 10)
                .await
                .expect("page"),
            vec![book.id.clone()]
        );
    }
}
