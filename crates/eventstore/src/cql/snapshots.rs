//! [`Snapshots`] on CQL: the `snapshots` table, one row per stream
//! (`PRIMARY KEY ((stream_type, stream_id))`), written with a plain INSERT — never in an
//! append's conditional batch, so snapshots add nothing to the LWT path — and read with one
//! single-partition SELECT. The last write wins; an older snapshot overwriting a newer one
//! (two writers racing) is still a valid snapshot, only a longer tail to fold.

use super::{error, CqlStore};
use crate::snapshots::{Snapshot, Snapshots};
use crate::StoreError;
use esq_domain::StreamId;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

/// The table's DDL for keyspace `ks`.
pub(crate) fn ddl(ks: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.snapshots (stream_type text, stream_id text, \
         version bigint, event_id uuid, fingerprint text, state blob, \
         PRIMARY KEY ((stream_type, stream_id)))"
    )
}

/// The prepared snapshot statements of one keyspace.
pub(crate) struct SnapshotStatements {
    read: PreparedStatement,
    write: PreparedStatement,
}

impl SnapshotStatements {
    pub(crate) async fn prepare(session: &Session, ks: &str) -> Result<Self, StoreError> {
        let (mut read, mut write) = futures::try_join!(
            session.prepare(format!(
                "SELECT version, event_id, fingerprint, state FROM {ks}.snapshots \
                 WHERE stream_type = ? AND stream_id = ?"
            )),
            session.prepare(format!(
                "INSERT INTO {ks}.snapshots (stream_type, stream_id, version, event_id, \
                 fingerprint, state) VALUES (?, ?, ?, ?, ?, ?)"
            )),
        )
        .map_err(error::prepare)?;
        read.set_is_idempotent(true);
        write.set_is_idempotent(true);
        Ok(Self { read, write })
    }
}

impl Snapshots for CqlStore {
    async fn read_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let inner = &self.inner;
        let values = (stream.kind.as_str(), stream.id.as_str());
        let rows = inner
            .timed(
                inner
                    .session()
                    .execute_unpaged(&inner.snapshots.read, values),
            )
            .await?
            .into_rows_result()
            .map_err(error::into_rows)?;
        let row = rows
            .maybe_first_row::<(i64, Uuid, String, Vec<u8>)>()
            .map_err(|e| StoreError::Internal(format!("unexpected snapshot row: {e}")))?;
        Ok(row.and_then(|(version, event_id, fingerprint, state)| {
            Some(Snapshot {
                version: u64::try_from(version).ok()?,
                event_id,
                fingerprint,
                state,
            })
        }))
    }

    async fn write_snapshot(
        &self,
        stream: &StreamId,
        snapshot: &Snapshot,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let version = i64::try_from(snapshot.version).map_err(|_| {
            StoreError::Internal(format!("snapshot version {} too large", snapshot.version))
        })?;
        let values = (
            stream.kind.as_str(),
            stream.id.as_str(),
            version,
            snapshot.event_id,
            snapshot.fingerprint.as_str(),
            snapshot.state.as_slice(),
        );
        inner
            .timed(
                inner
                    .session()
                    .execute_unpaged(&inner.snapshots.write, values),
            )
            .await?;
        Ok(())
    }
}
