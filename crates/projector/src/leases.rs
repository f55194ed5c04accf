//! Fair-share shard leases: every live projector of a prefix heartbeats in a members group
//! and holds at most its fair share of the change-log shards (shards / live members, rounded
//! up); a dead projector's shards are taken over once its leases expire.

use crate::{ProjectError, Projector};
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadStore};
use std::collections::BTreeSet;
use tokio::time::Instant;

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Renews the leases (and checks the read model's marker) when they are due.
    pub(crate) async fn renew_if_due(
        &self,
        owned: &mut BTreeSet<u32>,
        leases_due: &mut Instant,
    ) -> Result<(), ProjectError> {
        if Instant::now() >= *leases_due {
            self.refresh_generations(false).await?;
            self.refresh_leases(owned).await?;
            *leases_due =
                Instant::now() + self.config.lease_ttl / self.config.lease_renewals_per_ttl.max(1);
        }
        Ok(())
    }

    /// Takes this projector's fair share of the shards (shards / live projectors, rounded up),
    /// renewing the leases it holds and releasing any above its share.
    pub(crate) async fn refresh_leases(
        &self,
        owned: &mut BTreeSet<u32>,
    ) -> Result<(), ProjectError> {
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
        esq_runtime::metrics::projector().leases_owned(&kept);
        *owned = kept;
        Ok(())
    }

    /// The group the live replicas of this prefix heartbeat in.
    pub(crate) fn members_group(&self) -> String {
        format!("{}:members", self.config.checkpoint_prefix)
    }

    /// The name of a shard's checkpoint and of its lease (kept apart by the read store).
    pub(crate) fn shard_name(&self, shard: u32) -> String {
        format!("{}:shard:{shard}", self.config.checkpoint_prefix)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::setup;
    use crate::{Config, Projector};
    use std::collections::BTreeSet;
    use std::time::Duration;

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
}
