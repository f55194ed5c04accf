//! Every statement the store runs, prepared once at connect and held as fields.

use super::error;
use super::SerialLevel;
use crate::StoreError;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

/// Rows per page of a stream read: events can be large (up to 512 KiB each), so pages stay
/// small enough for one frame.
pub(crate) const READ_PAGE_ROWS: i32 = 100;

/// The columns of an event row, in the order [`super::read`] decodes them.
pub(crate) const EVENT_COLUMNS: &str =
    "version, event_id, event_type, schema_version, content_type, data, metadata, recorded_at";

/// The prepared statements of one keyspace.
pub(crate) struct Statements {
    /// First append of a stream: sets the static columns if the stream has no head yet.
    pub(crate) head_first: PreparedStatement,
    /// Later appends: moves the head if it is still where the writer saw it.
    pub(crate) head_next: PreparedStatement,
    /// One event row of an append batch.
    pub(crate) insert_event: PreparedStatement,
    /// The head and the newest event ids of a stream, with the bounds of the appends that
    /// wrote them (the idempotency window).
    pub(crate) tail: PreparedStatement,
    /// Whole events in a version range with the bounds of their appends, read linearizably:
    /// after a lost race or an unanswered batch, and to compare a candidate repeat.
    pub(crate) events_serial: PreparedStatement,
    /// The stream's head, read linearizably (completing any Paxos round in flight), to learn
    /// the outcome of an unanswered batch.
    pub(crate) head_serial: PreparedStatement,
    /// Events in ascending version order.
    pub(crate) read_forwards: PreparedStatement,
    /// Events in descending version order.
    pub(crate) read_backwards: PreparedStatement,
    /// The static columns of a stream.
    pub(crate) info: PreparedStatement,
    /// One page of partition keys, in token order.
    pub(crate) list_streams: PreparedStatement,
    /// Writes a change notification.
    pub(crate) note_change: PreparedStatement,
    /// A bucket of changes after a position.
    pub(crate) changes_after: PreparedStatement,
    /// A bucket of changes from its start.
    pub(crate) changes_from_start: PreparedStatement,
    /// Marks a bucket of a shard as holding notifications.
    pub(crate) index_bucket: PreparedStatement,
    /// The marked buckets of a shard in a range.
    pub(crate) buckets: PreparedStatement,
}

impl Statements {
    /// Prepares every statement of keyspace `ks`; the appends' conditional statements and the
    /// reads settling an append use `serial` (everything else the session's default level).
    pub(crate) async fn prepare(
        session: &Session,
        ks: &str,
        serial: SerialLevel,
    ) -> Result<Self, StoreError> {
        let pk = "stream_type = ? AND stream_id = ? AND bucket = ?";
        let prepare = |cql: String, idempotent: bool| async move {
            let mut stmt = session.prepare(cql).await.map_err(error::prepare)?;
            stmt.set_is_idempotent(idempotent);
            Ok::<_, StoreError>(stmt)
        };
        // All at once: each is a round trip to the cluster, and a start waits for them.
        let (
            mut events_serial,
            mut head_serial,
            mut read_forwards,
            mut read_backwards,
            mut head_first,
            mut head_next,
            insert_event,
            tail,
            info,
            list_streams,
            note_change,
            changes_after,
            changes_from_start,
            index_bucket,
            buckets,
        ) = futures::try_join!(
            prepare(
                format!(
                    "SELECT {EVENT_COLUMNS}, append_first, append_last FROM {ks}.events \
                     WHERE {pk} AND version >= ? AND version <= ?"
                ),
                true,
            ),
            prepare(
                format!("SELECT head FROM {ks}.events WHERE {pk} LIMIT 1"),
                true,
            ),
            prepare(
                format!(
                    "SELECT {EVENT_COLUMNS} FROM {ks}.events \
                     WHERE {pk} AND version >= ? AND version <= ? LIMIT ?"
                ),
                true,
            ),
            prepare(
                format!(
                    "SELECT {EVENT_COLUMNS} FROM {ks}.events \
                     WHERE {pk} AND version >= ? AND version <= ? ORDER BY version DESC LIMIT ?"
                ),
                true,
            ),
            prepare(
                format!(
                    "UPDATE {ks}.events SET head = ?, created_at = ?, updated_at = ? \
                     WHERE {pk} IF head = NULL"
                ),
                false,
            ),
            prepare(
                format!("UPDATE {ks}.events SET head = ?, updated_at = ? WHERE {pk} IF head = ?"),
                false,
            ),
            prepare(
                format!(
                    "INSERT INTO {ks}.events (stream_type, stream_id, bucket, version, event_id, \
                     event_type, schema_version, content_type, data, metadata, recorded_at, \
                     append_first, append_last) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                false,
            ),
            prepare(
                format!(
                    "SELECT head, version, event_id, recorded_at, append_first, append_last \
                     FROM {ks}.events WHERE {pk} ORDER BY version DESC LIMIT ?"
                ),
                true,
            ),
            prepare(
                format!("SELECT head, created_at, updated_at FROM {ks}.events WHERE {pk} LIMIT 1"),
                true,
            ),
            prepare(
                format!(
                    "SELECT DISTINCT stream_type, stream_id, bucket FROM {ks}.events \
                     WHERE token(stream_type, stream_id, bucket) > ? LIMIT ?"
                ),
                true,
            ),
            prepare(
                format!(
                    "INSERT INTO {ks}.changes (shard, bucket, id, stream_type, stream_id, \
                     first_version, last_version) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
                ),
                true,
            ),
            prepare(
                format!(
                    "SELECT id, stream_type, stream_id, first_version, last_version \
                     FROM {ks}.changes WHERE shard = ? AND bucket = ? \
                     AND id > ? AND id < minTimeuuid(?) LIMIT ?"
                ),
                true,
            ),
            prepare(
                format!(
                    "SELECT id, stream_type, stream_id, first_version, last_version \
                     FROM {ks}.changes WHERE shard = ? AND bucket = ? \
                     AND id < minTimeuuid(?) LIMIT ?"
                ),
                true,
            ),
            prepare(
                format!(
                    "INSERT INTO {ks}.change_buckets (shard, bucket) VALUES (?, ?) USING TTL ?"
                ),
                true,
            ),
            prepare(
                format!(
                    "SELECT bucket FROM {ks}.change_buckets \
                     WHERE shard = ? AND bucket >= ? AND bucket <= ? LIMIT ?"
                ),
                true,
            ),
        )?;
        // After a lost race the winner's rows must be visible: read them through Paxos.
        events_serial.set_consistency(serial.as_read());
        head_serial.set_consistency(serial.as_read());
        read_forwards.set_page_size(READ_PAGE_ROWS);
        read_backwards.set_page_size(READ_PAGE_ROWS);
        head_first.set_serial_consistency(Some(serial.driver()));
        head_next.set_serial_consistency(Some(serial.driver()));
        Ok(Self {
            head_first,
            head_next,
            insert_event,
            tail,
            events_serial,
            head_serial,
            read_forwards,
            read_backwards,
            info,
            list_streams,
            note_change,
            changes_after,
            changes_from_start,
            index_bucket,
            buckets,
        })
    }
}
