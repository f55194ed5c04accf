//! Polling the change log: each shard the projector holds is read from its checkpoint, each
//! change brought into the read model (see `sync`), notifications of appends that never
//! committed (orphans) skipped after the append deadline, and the checkpoint saved.

use crate::ops::ShardStatus;
use crate::replication::Gate;
use crate::sync::Synced;
use crate::{ProjectError, Projector};
use esq_domain::StreamId;
use esq_eventstore::{now_us, Change, ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadError, ReadStore};
use futures::StreamExt;
use std::collections::{BTreeSet, HashMap, VecDeque};
use tokio::time::Instant;

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Polls every shard it holds, renewing its leases whenever they are due — also between
    /// shards, so a long round cannot outlive them. True if a full page was processed.
    pub(crate) async fn poll_round(
        &self,
        owned: &mut BTreeSet<u32>,
        leases_due: &mut Instant,
    ) -> Result<bool, ProjectError> {
        self.renew_if_due(owned, leases_due).await?;
        // The owned shards are polled concurrently (bounded); each stops once the leases are
        // due, so that they are renewed in time however long the pages are.
        let stop_at = *leases_due;
        let polls: Vec<_> = owned
            .iter()
            .map(|&shard| self.poll_shard_until(shard, Some(stop_at)))
            .collect();
        let polls: Vec<Result<bool, ProjectError>> = futures::stream::iter(polls)
            .buffer_unordered(self.config.shard_concurrency.max(1))
            .collect()
            .await;
        let mut more = false;
        for poll in polls {
            more |= poll?;
        }
        Ok(more)
    }

    /// Processes one page of a shard; true if the page was full.
    pub async fn poll_shard(&self, shard: u32) -> Result<bool, ProjectError> {
        self.poll_shard_until(shard, None).await
    }

    /// [`Projector::poll_shard`], stopping early (and reporting more to do) once `stop_at` has
    /// passed, so that leases are renewed in time even within a long page.
    ///
    /// A change whose events are not in the store yet (an append still in flight, not yet an
    /// orphan) does not stall the shard: later changes are processed, and the shard's
    /// [`Window`] remembers which are done. The checkpoint only moves to just before the
    /// earliest unresolved change, so a crash re-reads from there (repeating fenced no-ops).
    pub(crate) async fn poll_shard_until(
        &self,
        shard: u32,
        stop_at: Option<Instant>,
    ) -> Result<bool, ProjectError> {
        let name = self.shard_name(shard);
        let checkpoint = esq_runtime::metrics::store()
            .time("read", "checkpoint", self.read.checkpoint(&name))
            .await?;
        // Taken out while in use (one poller per shard); lost on an error, which only means
        // re-reading from the checkpoint.
        let taken = self.windows.lock().expect("windows").remove(&shard);
        // The read-store epoch the window's applies are made in (see `replication`).
        let epoch = self.replication_epoch();
        let mut window = match taken {
            Some(w) if w.base == checkpoint && w.epoch == epoch => w,
            // New, another projector moved the checkpoint meanwhile, or a read-store failover
            // may have lost applies the window counts as done: start over from the checkpoint.
            _ => {
                let noted = self
                    .recorded_checkpoint_time(shard, checkpoint.as_deref())
                    .await?;
                let mut w = Window::new(checkpoint.clone(), noted);
                w.epoch = epoch;
                w
            }
        };
        let stopped = |t: Option<Instant>| t.is_some_and(|t| Instant::now() >= t);
        // First the changes still waiting for their append...
        for i in 0..window.entries.len() {
            if stopped(stop_at) {
                break;
            }
            if let Some(change) = &window.entries[i].unresolved {
                if self.resolve(change).await? {
                    window.entries[i].unresolved = None;
                }
            }
        }
        // ...then new changes after the window, as long as it has room.
        let room = self
            .config
            .unresolved_window
            .saturating_sub(window.entries.len());
        let mut more = false;
        if room > 0 && !stopped(stop_at) {
            let limit = self.config.poll_limit.min(room as u32);
            let page = self.feed.poll(shard, window.frontier(), limit).await?;
            more = page.changes.len() == limit as usize;
            let resolved = self.resolve_page(&page.changes, stop_at).await?;
            // The window takes the page's changes in order up to the first one not looked at
            // (the lease renewal was due); the rest are read again by the next poll.
            let looked_at = resolved.iter().take_while(|r| r.is_some()).count();
            more |= looked_at < page.changes.len();
            for ((change, position), done) in page
                .changes
                .into_iter()
                .zip(page.positions)
                .zip(resolved)
                .take(looked_at)
            {
                let noted_at_us = change.noted_at_us;
                let unresolved = (done == Some(false)).then_some(change);
                window.entries.push_back(Entry {
                    position,
                    noted_at_us,
                    unresolved,
                });
            }
        }
        // The checkpoint covers the changes done before the earliest unresolved one, once
        // their applies are on enough read-store replicas.
        let resolved = window
            .entries
            .iter()
            .take_while(|e| e.unresolved.is_none())
            .count();
        let mut done = None;
        if resolved > 0 {
            match self.replicated_since(window.epoch).await? {
                Gate::Open => done = window.entries.drain(..resolved).next_back(),
                // Kept: the checkpoint moves once the replicas have caught up.
                Gate::Lagging => {}
                // Dropped: the next poll reads again from the checkpoint and re-applies.
                Gate::Moved => return Ok(false),
            }
        }
        if let Some(entry) = done {
            // A full window that made room: read on at once.
            more |= room == 0;
            esq_runtime::metrics::store()
                .time(
                    "read",
                    "save_checkpoint",
                    self.read.save_checkpoint(&name, &entry.position),
                )
                .await?;
            window.base = Some(entry.position);
            window.base_noted_us = Some(entry.noted_at_us);
        }
        if window.status_due.is_none_or(|t| Instant::now() >= t) {
            self.record_status(shard, &window, more).await?;
            window.status_due = Some(Instant::now() + self.config.status_interval);
        }
        self.windows.lock().expect("windows").insert(shard, window);
        Ok(more)
    }

    /// Brings the changes of a page into the read model: for each change, whether it is done
    /// (see [`Projector::resolve`]), or `None` if it was not looked at because `stop_at` passed.
    ///
    /// The page's changes are merged per stream: each distinct stream is synced once, to its
    /// highest `last_version` in the page, and distinct streams are synced concurrently (at
    /// most [`crate::Config::sync_concurrency`] at once over the whole projector). A stream is
    /// synced by one task only, so its documents' applies stay in order. A stream whose highest
    /// change cannot be brought (its append still in flight) has each of its changes judged on
    /// its own, in order, exactly as if they had come one by one.
    pub(crate) async fn resolve_page(
        &self,
        changes: &[Change],
        stop_at: Option<Instant>,
    ) -> Result<Vec<Option<bool>>, ProjectError> {
        // The distinct streams in order of first appearance, each with its changes' indexes.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_stream: HashMap<&StreamId, usize> = HashMap::new();
        for (i, change) in changes.iter().enumerate() {
            let g = *by_stream.entry(&change.stream).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        let syncs: Vec<_> = (0..groups.len())
            .map(|group| self.resolve_group(changes, &groups, group, stop_at))
            .collect();
        // Unordered: a long stream does not hold back the start of the others.
        let mut syncs =
            futures::stream::iter(syncs).buffer_unordered(self.config.sync_concurrency.max(1));
        let mut out = vec![None; changes.len()];
        while let Some(synced) = syncs.next().await {
            let (group, done) = synced?;
            if let Some(done) = done {
                for (&i, d) in groups[group].iter().zip(done) {
                    out[i] = Some(d);
                }
            }
        }
        Ok(out)
    }

    /// One stream of [`Projector::resolve_page`]: the changes of `changes` at `groups[at]`,
    /// under a permit of the projector's sync bound; `None` if `stop_at` passed first.
    async fn resolve_group(
        &self,
        changes: &[Change],
        groups: &[Vec<usize>],
        at: usize,
        stop_at: Option<Instant>,
    ) -> Result<(usize, Option<Vec<bool>>), ProjectError> {
        let stopped = || stop_at.is_some_and(|t| Instant::now() >= t);
        if stopped() {
            return Ok((at, None));
        }
        let _permit = self.syncs.acquire().await.map_err(|_| {
            ProjectError::Read(ReadError::Internal("projector shut down".to_owned()))
        })?;
        if stopped() {
            return Ok((at, None));
        }
        let group: Vec<&Change> = groups[at].iter().map(|&i| &changes[i]).collect();
        Ok((at, Some(self.resolve_stream(&group).await?)))
    }

    /// [`Projector::resolve`] for the changes of one stream (in feed order): one sync to the
    /// highest version when the store holds it, else each change on its own.
    async fn resolve_stream(&self, changes: &[&Change]) -> Result<Vec<bool>, ProjectError> {
        let Some(highest) = changes.iter().map(|c| c.last_version).max() else {
            return Ok(Vec::new());
        };
        let stream = &changes[0].stream;
        if changes.len() > 1 {
            // Every change of the stream is done once its projections reach the highest.
            let from = changes.iter().map(|c| c.first_version).min().unwrap_or(1);
            if self.sync_changed(stream, highest, from).await? == Synced::Done {
                return Ok(vec![true; changes.len()]);
            }
        }
        let mut done = Vec::with_capacity(changes.len());
        for change in changes {
            done.push(self.resolve(change).await?);
        }
        Ok(done)
    }

    /// Brings a change into the read model: true if it is done (applied, or an orphan whose
    /// append never committed), false if its events are not in the store yet.
    async fn resolve(&self, change: &Change) -> Result<bool, ProjectError> {
        // Judged by the time before the store is read: an append that commits later than this
        // still commits before its deadline, so the read below would see it.
        let checked_at = now_us();
        Ok(
            match self
                .sync_changed(&change.stream, change.last_version, change.first_version)
                .await?
            {
                Synced::Done => true,
                Synced::Missing if self.is_orphan(change, checked_at) => {
                    tracing::warn!(stream = %change.stream, last = change.last_version,
                        "skipping a notification whose append never committed");
                    true
                }
                Synced::Missing => false,
            },
        )
    }

    /// The name under which a shard's [`ShardStatus`] is recorded in the read store.
    fn status_name(&self, shard: u32) -> String {
        format!("{}:status:{shard}", self.config.checkpoint_prefix)
    }

    /// Records how fresh a shard is, after a poll by its owner: when the newest change its
    /// checkpoint covers was noted, how many changes wait past the checkpoint (the window, plus
    /// at most one page after it when the poll stopped on a full page) and since when the
    /// oldest of them waits. Ages are computed when read, so a status recorded by a replica
    /// that died keeps ageing. The same figures go to this process's metrics
    /// (`esq_projector_lag_seconds`, `esq_projector_checkpoint_age_seconds`).
    async fn record_status(
        &self,
        shard: u32,
        window: &Window,
        more: bool,
    ) -> Result<(), ProjectError> {
        let mut behind = window.entries.len() as u64;
        let mut oldest = window.entries.front().map(|e| e.noted_at_us);
        if more {
            let page = self
                .feed
                .poll(shard, window.frontier(), self.config.poll_limit)
                .await?;
            behind += page.changes.len() as u64;
            let first = page.changes.first().map(|c| c.noted_at_us);
            oldest = oldest.or(first);
        }
        let now = now_us();
        esq_runtime::metrics::projector().shard_polled(
            shard,
            std::time::Duration::from_micros(oldest.map_or(0, |t| (now - t).max(0)) as u64),
            window.base_noted_us,
        );
        let record = serde_json::json!({
            "owner": self.config.owner,
            "checkpoint": window.base,
            "checkpoint_noted_us": window.base_noted_us,
            "behind": behind,
            "oldest_waiting_us": oldest,
            "at": now,
        });
        self.read
            .save_checkpoint(&self.status_name(shard), &record.to_string())
            .await?;
        Ok(())
    }

    /// When the change at `checkpoint` was noted, from the shard's recorded status (`None` if
    /// the status was recorded for another checkpoint or not at all).
    async fn recorded_checkpoint_time(
        &self,
        shard: u32,
        checkpoint: Option<&str>,
    ) -> Result<Option<i64>, ProjectError> {
        let Some(record) = self.read.checkpoint(&self.status_name(shard)).await? else {
            return Ok(None);
        };
        let record: serde_json::Value = serde_json::from_str(&record).unwrap_or_default();
        Ok(
            if checkpoint.is_some() && record["checkpoint"].as_str() == checkpoint {
                record["checkpoint_noted_us"].as_i64()
            } else {
                None
            },
        )
    }

    /// How fresh each change-log shard is, from the statuses their owners record each round.
    /// A shard whose status was not recorded within the lease time has no owner.
    pub async fn shard_status(&self) -> Result<Vec<ShardStatus>, ProjectError> {
        let now = now_us();
        let secs = |us: i64| (now - us).max(0) as f64 / 1e6;
        let lease_us = i64::try_from(self.config.lease_ttl.as_micros()).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for shard in 0..self.feed.shard_count() {
            let record = self.read.checkpoint(&self.status_name(shard)).await?;
            let record: serde_json::Value = record
                .and_then(|r| serde_json::from_str(&r).ok())
                .unwrap_or_default();
            let at = record["at"].as_i64().unwrap_or(0);
            out.push(ShardStatus {
                shard,
                owner: record["owner"]
                    .as_str()
                    .filter(|_| now - at <= lease_us)
                    .map(str::to_owned),
                checkpoint_age_seconds: record["checkpoint_noted_us"].as_i64().map(secs),
                changes_behind: record["behind"].as_u64().unwrap_or(0),
                seconds_behind: record["oldest_waiting_us"].as_i64().map_or(0.0, secs),
                updated_at_us: at,
            });
        }
        Ok(out)
    }

    fn is_orphan(&self, change: &Change, checked_at_us: i64) -> bool {
        esq_eventstore::is_orphan(change, checked_at_us, self.config.append_deadline)
    }
}

/// What a shard's poller remembers beyond its checkpoint (in memory, bounded by
/// [`crate::Config::unresolved_window`]): the changes read after `base`, in feed order, each
/// with its change while it is unresolved (its append still in flight) or `None` once done.
/// The next poll re-checks the unresolved ones and reads on after the last entry.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// The checkpoint the entries follow.
    base: Option<String>,
    /// When the change at `base` was noted, if known.
    base_noted_us: Option<i64>,
    /// The changes after `base`, in order.
    entries: VecDeque<Entry>,
    /// When the shard's status is next recorded.
    status_due: Option<Instant>,
    /// The read store's replication epoch when the window was started: its done entries
    /// count only while the epoch stays (see `replication`).
    epoch: u64,
}

/// One change read past the checkpoint.
#[derive(Debug)]
struct Entry {
    /// Its position in the shard.
    position: String,
    /// When it was noted.
    noted_at_us: i64,
    /// The change, while its append is still in flight; `None` once done.
    unresolved: Option<Change>,
}

impl Window {
    fn new(base: Option<String>, base_noted_us: Option<i64>) -> Self {
        Self {
            base,
            base_noted_us,
            ..Self::default()
        }
    }

    /// Where to read on: after the last entry, or after the checkpoint.
    fn frontier(&self) -> Option<&str> {
        self.entries
            .back()
            .map(|e| e.position.as_str())
            .or(self.base.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use crate::sync::Synced;
    use crate::testing::{cart, change, setup};
    use crate::{Config, Projector};
    use esq_domain::{ExpectedVersion, NewEvent};
    use esq_eventstore::{now_us, Change, EventStore};
    use esq_readstore::ReadStore;
    use std::time::Duration;
    use tokio::time::Instant;

    fn item() -> NewEvent {
        NewEvent::json(
            "ItemAdded",
            2,
            &serde_json::json!({"sku":"a","quantity":1,"unit_price_cents":3}),
        )
    }

    /// A ghost (a notification whose append is not in the store) at position 0, then one
    /// appended cart per `real` name at positions 1…
    async fn ghost_then_real(
        store: &esq_eventstore::embedded::EmbeddedStore,
        feed: &crate::testing::HandFeed,
        real: &[String],
    ) -> i64 {
        let noted = now_us();
        let mut changes = vec![(0, change(cart("ghost"), 1, noted))];
        for id in real {
            store
                .append(&cart(id), ExpectedVersion::NoStream, &[item()])
                .await
                .expect("append");
            changes.push((0, change(cart(id), 1, now_us())));
        }
        feed.changes.lock().expect("lock").extend(changes);
        noted
    }

    async fn checkpoint(read: &esq_readstore::memory::MemoryStore) -> Option<String> {
        read.checkpoint("projector:shard:0").await.expect("cp")
    }

    #[tokio::test]
    async fn a_change_still_in_flight_does_not_stall_its_shard() {
        let (_dir, store, feed, read) = setup(1).await;
        // Long enough that a busy machine writes the 100 carts and projects them well within it.
        let deadline = Duration::from_secs(8);
        let config = Config {
            append_deadline: deadline,
            poll_limit: 16,
            ..Config::default()
        };
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), config);
        p.refresh_generations(false).await.expect("generations");
        let real: Vec<String> = (0..100).map(|i| format!("r{i}")).collect();
        let noted = ghost_then_real(&store, &feed, &real).await;
        // The real changes behind the ghost are projected at once, page after page...
        let mut polls = 0;
        while p.poll_shard(0).await.expect("poll") {
            polls += 1;
            assert!(polls < 50, "the shard never ran dry");
        }
        for id in &real {
            assert_eq!(read.version("cart2:g1", id).await.expect("v"), 1, "{id}");
        }
        // ...while the checkpoint stays before the ghost...
        assert_eq!(checkpoint(&read).await, None);
        assert_eq!(read.version("cart2:g1", "ghost").await.expect("v"), 0);
        // ...until its append deadline has passed: then it is an orphan, and the checkpoint
        // moves past it and past everything already done behind it.
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            p.poll_shard(0).await.expect("poll");
            match checkpoint(&read).await {
                None => {
                    assert!(Instant::now() < give_up, "the orphan is never skipped");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(cp) => {
                    assert_eq!(cp, "100", "the checkpoint moves past every done change");
                    let waited = u64::try_from(now_us() - noted).expect("later");
                    assert!(
                        waited >= deadline.as_micros() as u64,
                        "moved past the ghost after {waited} µs, before its deadline"
                    );
                    break;
                }
            }
        }
        assert_eq!(read.version("cart2:g1", "ghost").await.expect("v"), 0);
    }

    #[tokio::test]
    async fn an_append_that_lands_late_releases_the_checkpoint() {
        let (_dir, store, feed, read) = setup(1).await;
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), Config::default());
        p.refresh_generations(false).await.expect("generations");
        let real: Vec<String> = (0..3).map(|i| format!("r{i}")).collect();
        ghost_then_real(&store, &feed, &real).await;
        assert!(!p.poll_shard(0).await.expect("poll"));
        assert_eq!(checkpoint(&read).await, None);
        assert_eq!(read.version("cart2:g1", "r2").await.expect("v"), 1);
        // The in-flight append commits: the next poll projects it and moves the checkpoint to
        // the end without reading the done changes again.
        store
            .append(&cart("ghost"), ExpectedVersion::NoStream, &[item()])
            .await
            .expect("append");
        assert!(!p.poll_shard(0).await.expect("poll"));
        assert_eq!(checkpoint(&read).await.as_deref(), Some("3"));
        assert_eq!(read.version("cart2:g1", "ghost").await.expect("v"), 1);
    }

    #[tokio::test]
    async fn the_changes_remembered_past_the_checkpoint_are_bounded() {
        let (_dir, store, feed, read) = setup(1).await;
        let config = Config {
            unresolved_window: 8,
            poll_limit: 4,
            ..Config::default()
        };
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), config);
        p.refresh_generations(false).await.expect("generations");
        let real: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        ghost_then_real(&store, &feed, &real).await;
        let mut polls = 0;
        while p.poll_shard(0).await.expect("poll") {
            polls += 1;
            assert!(polls < 50, "the shard never ran dry");
        }
        // The ghost and the next 7 changes fill the window; the rest wait for the ghost.
        for (i, id) in real.iter().enumerate() {
            let expected = u64::from(i < 7);
            assert_eq!(
                read.version("cart2:g1", id).await.expect("v"),
                expected,
                "{id}"
            );
        }
        assert_eq!(checkpoint(&read).await, None);
        store
            .append(&cart("ghost"), ExpectedVersion::NoStream, &[item()])
            .await
            .expect("append");
        while p.poll_shard(0).await.expect("poll") {}
        assert_eq!(checkpoint(&read).await.as_deref(), Some("20"));
        assert_eq!(read.version("cart2:g1", "r19").await.expect("v"), 1);
    }

    fn removed() -> NewEvent {
        NewEvent::json(
            "ItemRemoved",
            1,
            &serde_json::json!({"sku":"a","quantity":1,"unit_price_cents":3}),
        )
    }

    /// The cart document the domain's fold gives for all of `stream`'s events.
    async fn folded(
        store: &esq_eventstore::embedded::EmbeddedStore,
        stream: &esq_domain::StreamId,
    ) -> esq_readstore::Doc {
        let events = store
            .read(stream, esq_eventstore::ReadRequest::forwards(1, 100))
            .await
            .expect("read");
        let b = esq_domain::projection::batch(&esq_domain::cart::CartProjection, &events)
            .expect("fold")
            .expect("events");
        let mut doc = esq_readstore::Doc::new();
        esq_domain::projection::apply_to_doc(&mut doc, &b);
        doc
    }

    #[tokio::test]
    async fn the_changes_of_one_stream_in_a_page_are_synced_once_in_order() {
        let (_dir, store, feed, read) = setup(1).await;
        let config = Config {
            sync_concurrency: 8,
            ..Config::default()
        };
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), config);
        p.refresh_generations(false).await.expect("generations");
        // Cart a: added then removed (the order matters to the document), three appends, each
        // with its change; carts b0..b9 once each, interleaved.
        let a = cart("a");
        let noted = now_us();
        let mut changes = Vec::new();
        for (v, e) in [item(), item(), removed()].into_iter().enumerate() {
            let v = v as u64;
            store
                .append(&a, ExpectedVersion::Exact(v), &[e])
                .await
                .expect("append");
            changes.push((0, change(a.clone(), v + 1, noted)));
            for i in 0..3 {
                let b = cart(&format!("b{v}{i}"));
                store
                    .append(&b, ExpectedVersion::NoStream, &[item()])
                    .await
                    .expect("append");
                changes.push((0, change(b, 1, noted)));
            }
        }
        feed.changes.lock().expect("lock").extend(changes);
        assert!(!p.poll_shard(0).await.expect("poll"));
        assert_eq!(
            read.get("cart2:g1", "a").await.expect("get"),
            Some(folded(&store, &a).await),
            "cart a folded in order"
        );
        assert_eq!(read.version("cart2:g1", "a").await.expect("v"), 3);
        for v in 0..3 {
            for i in 0..3 {
                let id = format!("b{v}{i}");
                assert_eq!(read.version("cart2:g1", &id).await.expect("v"), 1, "{id}");
            }
        }
        // One sync per distinct stream (10), each reading where its 2 projections of carts
        // start: three changes of cart a did not cost three syncs.
        let starts = p.starts.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(starts, 10 * 2, "one sync per stream");
        assert_eq!(checkpoint(&read).await.as_deref(), Some("11"));
    }

    /// The change log's sync reads the store from the changes' first event at the same time as
    /// the documents' versions: used when it starts at or before where the documents stand,
    /// discarded when they stand further back; and a stream the fast path brought there
    /// lately is not read ahead at all.
    #[tokio::test]
    async fn the_change_logs_sync_reads_ahead_only_where_it_helps() {
        let (_dir, store, feed, read) = setup(1).await;
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), Config::default());
        p.refresh_generations(false).await.expect("generations");
        let noted = now_us();
        let (a, b, c, d) = (cart("a"), cart("b"), cart("c"), cart("d"));
        for (s, n) in [(&a, 3), (&b, 3), (&c, 1), (&d, 3)] {
            for v in 0..n {
                store
                    .append(s, ExpectedVersion::Exact(v), &[item()])
                    .await
                    .expect("append");
            }
        }
        // d's documents are already at 3 (another projector); c's were brought to 1 by the
        // fast path.
        assert_eq!(p.sync(&d, Some(3)).await.expect("sync"), Synced::Done);
        let nudge = esq_eventstore::NudgeMessage {
            stream: c.clone(),
            version: 1,
            events: Vec::new(),
        };
        assert!(p.nudged_sync(nudge).await);
        // a: every change (a catch-up); b: only its last (its documents stand before the
        // changes); c and d: their first.
        let mut changes: Vec<(u32, Change)> =
            (1..=3).map(|v| (0, change(a.clone(), v, noted))).collect();
        changes.push((0, change(b.clone(), 3, noted)));
        changes.push((0, change(c.clone(), 1, noted)));
        changes.push((0, change(d.clone(), 1, noted)));
        feed.changes.lock().expect("lock").extend(changes);
        let before = p.prefetches.load(std::sync::atomic::Ordering::Relaxed);
        assert!(!p.poll_shard(0).await.expect("poll"));
        for (s, v) in [(&a, 3), (&b, 3), (&c, 1), (&d, 3)] {
            assert_eq!(read.version("cart2:g1", &s.id).await.expect("v"), v, "{s}");
            assert_eq!(
                read.get("cart2:g1", &s.id).await.expect("get"),
                Some(folded(&store, s).await),
                "{s} folded from its first event"
            );
        }
        let read_ahead = p.prefetches.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert_eq!(read_ahead, 3, "a, b and d read ahead; c (nudged) not");
        assert_eq!(checkpoint(&read).await.as_deref(), Some("5"));
    }

    #[tokio::test]
    async fn a_page_mixing_done_and_in_flight_changes_keeps_the_checkpoint_before_the_first_in_flight(
    ) {
        let (_dir, store, feed, read) = setup(1).await;
        let config = Config {
            sync_concurrency: 4,
            ..Config::default()
        };
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), config);
        p.refresh_generations(false).await.expect("generations");
        // Position 0: a@1 (in the store); 1: a@2 (its append still in flight); 2..=9: ten done
        // carts; 10: ghost@1 (in flight); 11: a@1 again (a duplicate, done).
        let a = cart("a");
        let noted = now_us();
        store
            .append(&a, ExpectedVersion::NoStream, &[item()])
            .await
            .expect("append");
        let mut changes = vec![
            (0, change(a.clone(), 1, noted)),
            (0, change(a.clone(), 2, noted)),
        ];
        for i in 0..8 {
            let c = cart(&format!("c{i}"));
            store
                .append(&c, ExpectedVersion::NoStream, &[item()])
                .await
                .expect("append");
            changes.push((0, change(c, 1, noted)));
        }
        changes.push((0, change(cart("ghost"), 1, noted)));
        changes.push((0, change(a.clone(), 1, noted)));
        feed.changes.lock().expect("lock").extend(changes);
        assert!(!p.poll_shard(0).await.expect("poll"));
        // a@1 is done, a@2 is not: the checkpoint covers only position 0, while everything
        // done behind it is projected.
        assert_eq!(checkpoint(&read).await.as_deref(), Some("0"));
        assert_eq!(read.version("cart2:g1", "a").await.expect("v"), 1);
        for i in 0..8 {
            assert_eq!(
                read.version("cart2:g1", &format!("c{i}")).await.expect("v"),
                1
            );
        }
        // a's second append lands: the checkpoint moves up to the ghost, not past it.
        store
            .append(&a, ExpectedVersion::Exact(1), &[removed()])
            .await
            .expect("append");
        assert!(!p.poll_shard(0).await.expect("poll"));
        assert_eq!(checkpoint(&read).await.as_deref(), Some("9"));
        assert_eq!(read.version("cart2:g1", "a").await.expect("v"), 2);
        assert_eq!(
            read.get("cart2:g1", "a").await.expect("get"),
            Some(folded(&store, &a).await)
        );
        // The ghost's append lands too: the checkpoint moves to the end.
        store
            .append(&cart("ghost"), ExpectedVersion::NoStream, &[item()])
            .await
            .expect("append");
        assert!(!p.poll_shard(0).await.expect("poll"));
        assert_eq!(checkpoint(&read).await.as_deref(), Some("11"));
        assert_eq!(read.version("cart2:g1", "ghost").await.expect("v"), 1);
    }

    #[tokio::test]
    async fn owners_record_how_fresh_each_shard_is() {
        let (_dir, store, feed, read) = setup(2).await;
        let config = Config {
            owner: "p1".to_owned(),
            status_interval: Duration::ZERO,
            poll_limit: 2,
            ..Config::default()
        };
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), config);
        p.refresh_generations(false).await.expect("generations");
        let unknown = |shard| crate::ops::ShardStatus {
            shard,
            owner: None,
            checkpoint_age_seconds: None,
            changes_behind: 0,
            seconds_behind: 0.0,
            updated_at_us: 0,
        };
        assert_eq!(
            p.shard_status().await.expect("status"),
            [unknown(0), unknown(1)]
        );
        // A ghost and three real changes: one page of two is read, the ghost waits.
        let real: Vec<String> = (0..3).map(|i| format!("r{i}")).collect();
        let noted = ghost_then_real(&store, &feed, &real).await;
        let before = now_us();
        assert!(p.poll_shard(0).await.expect("poll"), "a full page");
        let status = p.shard_status().await.expect("status");
        assert_eq!(status[1], unknown(1), "shard 1 was never polled");
        let s0 = &status[0];
        assert_eq!(s0.owner.as_deref(), Some("p1"));
        assert_eq!(s0.checkpoint_age_seconds, None, "nothing checkpointed yet");
        // The ghost and r0 in the window, r1 and r2 in the next page.
        assert_eq!(s0.changes_behind, 4);
        let waited = (now_us() - noted) as f64 / 1e6;
        assert!(
            s0.seconds_behind > 0.0 && s0.seconds_behind <= waited,
            "{s0:?}"
        );
        assert!(s0.updated_at_us >= before);
        // The ghost's append lands: the shard catches up.
        store
            .append(&cart("ghost"), ExpectedVersion::NoStream, &[item()])
            .await
            .expect("append");
        while p.poll_shard(0).await.expect("poll") {}
        let s0 = p.shard_status().await.expect("status").remove(0);
        assert_eq!((s0.changes_behind, s0.seconds_behind), (0, 0.0), "{s0:?}");
        let age = s0.checkpoint_age_seconds.expect("a checkpoint");
        assert!(
            age >= 0.0 && age <= (now_us() - noted) as f64 / 1e6,
            "{s0:?}"
        );
        // Another replica (a fresh window) reads the checkpoint's time back from the record.
        let q = Projector::new(
            store.clone(),
            feed.clone(),
            read.clone(),
            Config {
                owner: "p2".to_owned(),
                status_interval: Duration::ZERO,
                ..Config::default()
            },
        );
        q.refresh_generations(false).await.expect("generations");
        q.poll_shard(0).await.expect("poll");
        let s0 = q.shard_status().await.expect("status").remove(0);
        assert_eq!(s0.owner.as_deref(), Some("p2"));
        assert!(s0.checkpoint_age_seconds.is_some(), "{s0:?}");
    }
}
