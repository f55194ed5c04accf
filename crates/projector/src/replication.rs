//! The replication gate of progress markers. A Redis primary acknowledges an apply before its
//! replicas have it, so a failover can lose acknowledged applies; a checkpoint (or a rebuild's
//! swap, or a derived fill marker) that had moved past such an apply would leave its document
//! behind until the stream's next event. With [`crate::Config::wait_replicas`] N ≥ 1, a marker
//! moves only when every primary has every earlier apply on N replicas (Redis `WAIT`) and the
//! store's topology epoch is still the one from before those applies (no primary replaced or
//! restarted, which a `WAIT` on the new connection could not tell). Otherwise the marker stays
//! where it was and the work since is done again (applies are fenced, so repeating is safe).

use crate::Projector;
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadError, ReadStore};
use std::time::{Duration, Instant};

/// At most one "not replicated yet" warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether a progress marker may move past the applies made since an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Yes: they are on enough replicas (or no wait is asked for).
    Open,
    /// Not yet: some primary has them on fewer replicas; the same work may be kept and the
    /// marker moved later.
    Lagging,
    /// No: a primary was replaced or restarted since, so some of them may be gone; the work
    /// must be done again from the marker.
    Moved,
}

/// The gate for `wanted` replicas given what the store answered and the epoch the work
/// started in.
pub(crate) fn judge(wanted: u32, acked: u32, started: u64, now: u64) -> Gate {
    if now != started {
        Gate::Moved
    } else if acked < wanted {
        Gate::Lagging
    } else {
        Gate::Open
    }
}

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// The read store's topology epoch now (take it before the work a marker will cover).
    pub(crate) fn replication_epoch(&self) -> u64 {
        self.read.replication_epoch()
    }

    /// Whether a marker may move past the applies made since `epoch` (see the module docs).
    /// A store that cannot answer is an error, as any other read-store failure.
    pub(crate) async fn replicated_since(&self, epoch: u64) -> Result<Gate, ReadError> {
        let wanted = self.config.wait_replicas;
        if wanted == 0 {
            return Ok(Gate::Open);
        }
        let r = self.read.wait_replicated(wanted).await?;
        let gate = judge(wanted, r.acked, epoch, r.epoch);
        if gate != Gate::Open {
            let mut warned = self.replication_warned.lock().expect("warned");
            if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                *warned = Some(Instant::now());
                tracing::warn!(
                    wanted,
                    acked = r.acked,
                    failover = gate == Gate::Moved,
                    "read-store applies are not on enough replicas yet; progress markers wait \
                     (applying goes on)"
                );
            }
        }
        Ok(gate)
    }

    /// [`Projector::replicated_since`] for a marker that cannot wait: anything but
    /// [`Gate::Open`] is an `Unavailable` error, so that the caller's retry redoes the work.
    pub(crate) async fn ensure_replicated(&self, epoch: u64) -> Result<(), ReadError> {
        match self.replicated_since(epoch).await? {
            Gate::Open => Ok(()),
            Gate::Lagging => Err(ReadError::Unavailable(
                "applies not on enough read-store replicas yet".to_owned(),
            )),
            Gate::Moved => Err(ReadError::Unavailable(
                "a read-store primary changed (failover); redoing the work".to_owned(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::setup;
    use crate::Config;

    #[test]
    fn a_moved_epoch_wins_over_enough_replicas() {
        assert_eq!(judge(1, 1, 3, 3), Gate::Open);
        assert_eq!(judge(1, 5, 3, 3), Gate::Open);
        assert_eq!(judge(2, 1, 3, 3), Gate::Lagging);
        assert_eq!(judge(1, 0, 3, 3), Gate::Lagging);
        assert_eq!(judge(1, 1, 3, 4), Gate::Moved);
        assert_eq!(judge(1, 0, 3, 4), Gate::Moved);
        assert_eq!(judge(0, 0, 0, 0), Gate::Open);
    }

    #[tokio::test]
    async fn a_store_without_replicas_never_holds_markers_back() {
        let (_dir, store, feed, read) = setup(1).await;
        let config = Config {
            wait_replicas: 2,
            ..Config::default()
        };
        let p = crate::Projector::new(store, feed, read, config);
        let epoch = p.replication_epoch();
        assert_eq!(p.replicated_since(epoch).await.unwrap(), Gate::Open);
    }
}
