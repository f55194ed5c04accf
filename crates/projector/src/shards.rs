//! Polling the change log: each shard the projector holds is read from its checkpoint, each
//! change brought into the read model (see `sync`), notifications of appends that never
//! committed (orphans) skipped after the append deadline, and the checkpoint saved.

use crate::sync::Synced;
use crate::{ProjectError, Projector};
use esq_eventstore::{now_us, Change, ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadStore};
use std::collections::BTreeSet;
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
    pub(crate) async fn poll_shard_until(
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
}

#[cfg(test)]
mod tests {
    use crate::testing::{cart, change, setup};
    use crate::{Config, Projector};
    use esq_domain::projection::doc_version;
    use esq_domain::{ExpectedVersion, NewEvent};
    use esq_eventstore::{now_us, EventStore};
    use esq_readstore::ReadStore;
    use std::time::Duration;

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
}
