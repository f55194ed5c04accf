//! Cross-document indexes and their crash safety: an apply that changes indexes records a
//! pending marker (field `INDEX_PENDING_FIELD`) in the same atomic apply as the document; the
//! index update follows, and clears it. Whoever syncs the document next finishes work a crash
//! left pending. This module is the only one that knows the marker's format.

use crate::{ProjectError, Projector};
use esq_domain::projection::{
    doc_version, Batch, FieldOp, IndexOp, Projection, INDEX_PENDING_FIELD,
};
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadStore};

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// The version of a projection's document; for a projection with indexes, first finishes
    /// an index update an earlier apply left pending.
    pub(crate) async fn projected_version(
        &self,
        projection: &dyn Projection,
        doc_id: &str,
    ) -> Result<u64, ProjectError> {
        if !projection.has_indexes() {
            return Ok(self.read.version(projection.name(), doc_id).await?);
        }
        let doc = self.read.get(projection.name(), doc_id).await?;
        let version = doc.as_ref().map_or(0, doc_version);
        if doc.is_some_and(|d| d.contains_key(INDEX_PENDING_FIELD)) {
            self.reindex(projection, doc_id).await?;
        }
        Ok(version)
    }

    /// Finishes a document's pending index update, if it has one: adds the document to the
    /// indexes its current state wants, removes it from those the marked batch left (unless the
    /// state wants them back), and clears the marker. If the document moved on meanwhile (a
    /// newer apply by another projector), the indexes of the newest state are added again, so
    /// a late update can never leave a newer membership undone. Removals lost to a crash leave
    /// stale entries, which readers skip by checking each entry against its document.
    pub(crate) async fn reindex(
        &self,
        projection: &dyn Projection,
        doc_id: &str,
    ) -> Result<(), ProjectError> {
        let name = projection.name();
        let Some(mut doc) = self.read.get(name, doc_id).await? else {
            return Ok(());
        };
        let Some(mut marker) = doc.get(INDEX_PENDING_FIELD).cloned() else {
            return Ok(()); // nothing pending
        };
        let mut removals = pending_removals(&marker);
        // A bounded number of rounds: each one only follows a newer apply by someone else.
        for _ in 0..self.config.reindex_rounds {
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
}

/// Adds the pending-index marker to a batch that changes indexes, so the index work is recorded
/// in the same atomic apply as the document.
pub(crate) fn mark_pending(b: &mut Batch) {
    if !b.changes.indexes.is_empty() {
        b.changes.fields.push(FieldOp::Set(
            INDEX_PENDING_FIELD.to_owned(),
            pending_marker(b.last_version, &b.changes.indexes),
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Synced;
    use crate::testing::setup;
    use crate::Config;
    use esq_domain::projection::{batch, ApplyOutcome};
    use esq_domain::{ExpectedVersion, NewEvent, StreamId};
    use esq_eventstore::ReadRequest;

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
