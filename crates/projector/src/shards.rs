//! Polling the change log: each shard the projector holds is read from its checkpoint, each
//! change brought into the read model (see `sync`), notifications of appends that never
//! committed (orphans) skipped after the append deadline, and the checkpoint saved.

use crate::ops::ShardStatus;
use crate::sync::Synced;
use crate::{ProjectError, Projector};
use esq_eventstore::{now_us, Change, ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadStore};
use std::collections::{BTreeSet, VecDeque};
use tokio::time::Instant;

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Polls every shard it holds, renewing its leases whenever they are due — also between
    /// shards, so a long round cannot outlive them. True if a full page was processed.
    pub(crate) async fn poll_round(
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
        let mut window = match taken {
            Some(w) if w.base == checkpoint => w,
            // New, or another projector moved the checkpoint meanwhile.
            _ => {
                let noted = self
                    .recorded_checkpoint_time(shard, checkpoint.as_deref())
                    .await?;
                Window::new(checkpoint.clone(), noted)
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
            for (change, position) in page.changes.into_iter().zip(page.positions) {
                if stopped(stop_at) {
                    more = true;
                    break;
                }
                let noted_at_us = change.noted_at_us;
                let unresolved = (!self.resolve(&change).await?).then_some(change);
                window.entries.push_back(Entry {
                    position,
                    noted_at_us,
                    unresolved,
                });
            }
        }
        // The checkpoint covers the changes done before the earliest unresolved one.
        let mut done = None;
        while window
            .entries
            .front()
            .is_some_and(|e| e.unresolved.is_none())
        {
            done = window.entries.pop_front();
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

    /// Brings a change into the read model: true if it is done (applied, or an orphan whose
    /// append never committed), false if its events are not in the store yet.
    async fn resolve(&self, change: &Change) -> Result<bool, ProjectError> {
        // Judged by the time before the store is read: an append that commits later than this
        // still commits before its deadline, so the read below would see it.
        let checked_at = now_us();
        Ok(
            match self.sync(&change.stream, Some(change.last_version)).await? {
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
    use crate::testing::{cart, change, setup};
    use crate::{Config, Projector};
    use esq_domain::{ExpectedVersion, NewEvent};
    use esq_eventstore::{now_us, EventStore};
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
        let deadline = Duration::from_secs(2);
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
