//! Test helpers shared by the projector's unit tests: a hand-written change feed and a store
//! setup.

use esq_domain::StreamId;
use esq_eventstore::embedded::EmbeddedStore;
use esq_eventstore::{Change, ChangeFeed, ChangePage, StoreError};
use esq_readstore::memory::MemoryStore;
use std::sync::Arc;

/// A change feed whose entries the test writes by hand (to create orphans), over several
/// shards; positions are indexes into the list.
pub(crate) struct HandFeed {
    pub(crate) shards: u32,
    pub(crate) changes: std::sync::Mutex<Vec<(u32, Change)>>,
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

pub(crate) fn cart(id: &str) -> StreamId {
    StreamId::new("cart", id).expect("stream")
}

pub(crate) fn change(stream: StreamId, last: u64, noted_at_us: i64) -> Change {
    Change {
        stream,
        first_version: last,
        last_version: last,
        noted_at_us,
    }
}

pub(crate) async fn setup(
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
