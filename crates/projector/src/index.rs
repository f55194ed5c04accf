//! Cross-document indexes and their crash safety. Index membership has one source of truth:
//! [`Projection::indexes`] of the document. An apply that changes a document's membership
//! records a pending marker (field `INDEX_PENDING_FIELD`) in the same atomic apply as the
//! document, naming the indexes the document belonged to before; the index update follows
//! (wanted = the indexes of the current document, removals = before − wanted) and clears it.
//! Whoever syncs the document next finishes work a crash left pending. This module is the only
//! one that knows the marker's format.

use crate::{ProjectError, Projector};
use esq_domain::projection::{
    apply_to_doc, doc_version, ApplyOutcome, Batch, FieldOp, Projection, INDEX_PENDING_FIELD,
};
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::{Coordination, Doc, ReadStore};
use std::collections::BTreeSet;

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Records in `b` (a batch for `projection`'s document `doc_id`, whose current state is
    /// `known` when the caller already read it at the version the batch follows) the index work its apply
    /// leaves, if the batch changes the document's index membership: the marker names the
    /// indexes the document belonged to before (and those of a marker still pending, so that
    /// no earlier removal is lost). Computed from the document before the apply, folded with
    /// the domain's `apply_to_doc`; a batch the fence will refuse gets no marker.
    pub(crate) async fn mark_index_work(
        &self,
        projection: &dyn Projection,
        namespace: &str,
        doc_id: &str,
        b: &mut Batch,
        known: Option<&Doc>,
    ) -> Result<(), ProjectError> {
        if !projection.has_indexes() {
            return Ok(());
        }
        let before = match known {
            Some(doc) => doc.clone(),
            None => self.read.get(namespace, doc_id).await?.unwrap_or_default(),
        };
        let mut after = before.clone();
        if apply_to_doc(&mut after, b) != ApplyOutcome::Applied {
            return Ok(());
        }
        let was: BTreeSet<String> = projection.indexes(&before).into_iter().collect();
        let wanted: BTreeSet<String> = projection.indexes(&after).into_iter().collect();
        if was != wanted {
            let mut was = was;
            if let Some(pending) = before.get(INDEX_PENDING_FIELD) {
                was.extend(pending_was(pending));
            }
            b.changes.fields.push(FieldOp::Set(
                INDEX_PENDING_FIELD.to_owned(),
                pending_marker(b.last_version, &was),
            ));
        }
        Ok(())
    }

    /// Finishes a document's pending index update, if it has one: adds the document to the
    /// indexes its current state wants, removes it from those it belonged to before the marked
    /// apply (unless the state wants them back), and clears the marker. If the document moved on meanwhile (a
    /// newer apply by another projector), the indexes of the newest state are added again, so
    /// a late update can never leave a newer membership undone. Removals lost to a crash leave
    /// stale entries, which readers skip by checking each entry against its document.
    pub(crate) async fn reindex(
        &self,
        projection: &dyn Projection,
        namespace: &str,
        doc_id: &str,
    ) -> Result<(), ProjectError> {
        let name = namespace;
        let Some(mut doc) = self.read.get(name, doc_id).await? else {
            return Ok(());
        };
        let Some(mut marker) = doc.get(INDEX_PENDING_FIELD).cloned() else {
            return Ok(()); // nothing pending
        };
        let mut removals = pending_was(&marker);
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
            removals = pending_was(&marker);
        }
        Ok(())
    }
}

/// The pending-index marker of an apply: its last version (which makes the marker unique) and
/// the indexes the document belonged to before it, as JSON.
fn pending_marker<'a>(last_version: u64, was: impl IntoIterator<Item = &'a String>) -> String {
    let was: Vec<&String> = was.into_iter().collect();
    serde_json::json!({ "v": last_version, "was": was }).to_string()
}

/// The indexes a pending-index marker says the document belonged to before its apply (none if
/// it cannot be read). Markers written before index membership had one source of truth list
/// the batch's removals under `remove`: a subset of those, so they are read the same way.
fn pending_was(marker: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(marker)
        .ok()
        .and_then(|m| {
            m.get("was")
                .or_else(|| m.get("remove"))?
                .as_array()
                .map(|a| {
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
        let mut b = batch(&BookProjection, &events)
            .expect("projects")
            .expect("batch");
        b.changes
            .fields
            .push(FieldOp::Set(INDEX_PENDING_FIELD.to_owned(), "1".to_owned()));
        assert_eq!(
            read.apply("book:g1", &book.id, &b).await.expect("apply"),
            ApplyOutcome::Applied
        );
        assert!(read
            .index_page("book:g1", ALL_INDEX, None, 10)
            .await
            .expect("page")
            .is_empty());

        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());

        p.refresh_generations(false).await.expect("generations");
        assert_eq!(p.sync(&book, Some(1)).await.expect("sync"), Synced::Done);
        assert_eq!(
            read.index_page("book:g1", ALL_INDEX, None, 10)
                .await
                .expect("page"),
            vec![book.id.clone()]
        );
        assert_eq!(
            read.index_page("book:g1", "author:A", None, 10)
                .await
                .expect("page"),
            vec![book.id.clone()]
        );
        let doc = read
            .get("book:g1", &book.id)
            .await
            .expect("get")
            .expect("doc");
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
        p.refresh_generations(false).await.expect("generations");
        p.sync(&book, Some(1)).await.expect("sync");
        assert_eq!(
            read.index_page("book:g1", "author:A", None, 10)
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
        let mut b = batch(&BookProjection, &stored)
            .expect("projects")
            .expect("batch");
        p.mark_index_work(&BookProjection, "book:g1", &book.id, &mut b, None)
            .await
            .expect("mark");
        assert!(
            b.changes.fields.contains(&FieldOp::Set(
                INDEX_PENDING_FIELD.to_owned(),
                pending_marker(2, &["all".to_owned(), "author:A".to_owned()]),
            )),
            "the marker names the indexes before the apply: {b:?}"
        );
        read.apply("book:g1", &book.id, &b).await.expect("apply");
        // The next sync of the book finishes the work, removals included.
        p.sync(&book, Some(2)).await.expect("sync");
        assert!(read
            .index_page("book:g1", "author:A", None, 10)
            .await
            .expect("page")
            .is_empty());
        assert_eq!(
            read.index_page("book:g1", "author:B", None, 10)
                .await
                .expect("page"),
            vec![book.id.clone()]
        );
    }

    fn book_event(author: &str, previous: &str) -> NewEvent {
        NewEvent::json(
            "BookUpdated",
            1,
            &serde_json::json!({"author": author, "previous_author": previous}),
        )
    }

    #[tokio::test]
    async fn an_apply_over_a_pending_marker_keeps_its_removals() {
        use esq_domain::bookshop::BookProjection;
        let (_dir, store, feed, read) = setup(1).await;
        let book = StreamId::new("book", "9780441478125").expect("stream");
        let created = NewEvent::json(
            "BookCreated",
            1,
            &serde_json::json!({"isbn": "9780441478125", "title": "T", "author": "A", "price_cents": 1}),
        );
        store
            .append(
                &book,
                ExpectedVersion::NoStream,
                &[created, book_event("B", "A"), book_event("C", "B")],
            )
            .await
            .expect("append");
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.refresh_generations(false).await.expect("generations");
        p.sync(&book, Some(1)).await.expect("sync");
        let stored = store
            .read(&book, ReadRequest::forwards(2, 10))
            .await
            .expect("read");
        // Version 2 (A → B) is applied and its index update lost; then version 3 (B → C) is
        // applied over the pending marker, and only then are the indexes brought in line.
        for event in &stored {
            let mut b = batch(&BookProjection, std::slice::from_ref(event))
                .expect("projects")
                .expect("batch");
            p.mark_index_work(&BookProjection, "book:g1", &book.id, &mut b, None)
                .await
                .expect("mark");
            read.apply("book:g1", &book.id, &b).await.expect("apply");
        }
        p.reindex(&BookProjection, "book:g1", &book.id)
            .await
            .expect("reindex");
        for gone in ["author:A", "author:B"] {
            assert!(
                read.index_page("book:g1", gone, None, 10)
                    .await
                    .expect("page")
                    .is_empty(),
                "{gone} still lists the book"
            );
        }
        for index in ["author:C", "all"] {
            assert_eq!(
                read.index_page("book:g1", index, None, 10)
                    .await
                    .expect("page"),
                vec![book.id.clone()]
            );
        }
        let doc = read
            .get("book:g1", &book.id)
            .await
            .expect("get")
            .expect("doc");
        assert!(!doc.contains_key(INDEX_PENDING_FIELD));
    }

    #[tokio::test]
    async fn membership_follows_the_document_through_sync() {
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
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.refresh_generations(false).await.expect("generations");
        p.sync(&book, Some(1)).await.expect("sync");
        store
            .append(&book, ExpectedVersion::Exact(1), &[book_event("B", "A")])
            .await
            .expect("append");
        p.sync(&book, Some(2)).await.expect("sync");
        assert!(read
            .index_page("book:g1", "author:A", None, 10)
            .await
            .expect("page")
            .is_empty());
        assert_eq!(
            read.index_page("book:g1", "author:B", None, 10)
                .await
                .expect("page"),
            vec![book.id.clone()]
        );
        store
            .append(
                &book,
                ExpectedVersion::Exact(2),
                &[NewEvent::json(
                    "BookDeleted",
                    1,
                    &serde_json::json!({"author": "B"}),
                )],
            )
            .await
            .expect("append");
        p.sync(&book, Some(3)).await.expect("sync");
        for gone in ["author:B", "all"] {
            assert!(read
                .index_page("book:g1", gone, None, 10)
                .await
                .expect("page")
                .is_empty());
        }
    }
}
