//! [`Snapshots`] on the embedded store: table `snapshots`, stream key → postcard
//! [`StoredSnapshot`], written in a transaction of its own with `Durability::None`.
//!
//! Why not durable: a snapshot is a cache. A crash may lose the last ones (the loader then folds
//! a little more); it can never persist a snapshot without the events it covers, because redb
//! persists commits in order and the snapshot is committed after the events it was folded from
//! were read as committed. Skipping the fsync keeps snapshot writes from competing with the
//! appends' durable commits for the disk.

use super::{db_err, decode, encode, EmbeddedStore};
use crate::snapshots::{Snapshot, Snapshots};
use crate::StoreError;
use esq_domain::StreamId;
use redb::{Durability, ReadableDatabase, TableDefinition, TableError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Stream key → postcard [`StoredSnapshot`]. Created by the first snapshot written.
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");

/// A snapshot as the table stores it.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    version: u64,
    event_id: [u8; 16],
    fingerprint: String,
    state: Vec<u8>,
}

impl Snapshots for EmbeddedStore {
    async fn read_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let key = stream.key();
        self.run(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = match txn.open_table(SNAPSHOTS) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_err(e)),
            };
            let Some(row) = table.get(key.as_str()).map_err(db_err)? else {
                return Ok(None);
            };
            let stored: StoredSnapshot = decode(row.value())?;
            Ok(Some(Snapshot {
                version: stored.version,
                event_id: Uuid::from_bytes(stored.event_id),
                fingerprint: stored.fingerprint,
                state: stored.state,
            }))
        })
        .await
    }

    async fn write_snapshot(
        &self,
        stream: &StreamId,
        snapshot: &Snapshot,
    ) -> Result<(), StoreError> {
        let key = stream.key();
        let row = encode(&StoredSnapshot {
            version: snapshot.version,
            event_id: snapshot.event_id.into_bytes(),
            fingerprint: snapshot.fingerprint.clone(),
            state: snapshot.state.clone(),
        })?;
        self.run_blocking(move |db| {
            let mut txn = db.begin_write().map_err(db_err)?;
            txn.set_durability(Durability::None)
                .map_err(|e| StoreError::Internal(format!("redb: {e}")))?;
            {
                let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
                table.insert(key.as_str(), row.as_slice()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_snapshot_checks_and_keeps_them_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        crate::snapshots::check(&store, "emb").await;
        let stream = StreamId::new("cart", "emb-snap-a").expect("valid");
        let before = store.read_snapshot(&stream).await.expect("read");
        assert!(before.is_some());
        // A durable commit (an append) after the non-durable snapshot writes persists them.
        let other = StreamId::new("cart", "emb-other").expect("valid");
        let event = esq_domain::NewEvent::json("Noted", 1, &serde_json::json!({}));
        crate::EventStore::append(&store, &other, esq_domain::ExpectedVersion::Any, &[event])
            .await
            .expect("append");
        drop(store);
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        crate::snapshots::check(&store, "emb2").await;
        assert_eq!(store.read_snapshot(&stream).await.expect("read"), before);
    }
}
