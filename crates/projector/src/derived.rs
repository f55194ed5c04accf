//! Keeping the derived projections ([`esq_domain::derived`]) in line with their source
//! documents: after each fenced apply to a source document, what the document contributes now
//! is written to its targets (each behind its per-source fence), and the targets it no longer
//! names get a tombstone.
//!
//! Crash safety follows the pending-index marker: the source apply itself sets, atomically, a
//! marker per derived projection (`_dx:<name>`, [`esq_domain::derived::pending_field`])
//! recording the targets the document contributed to before. The derivation is finished and the
//! marker cleared right after the apply, or — after a crash or a store error — by whoever syncs
//! the document next. Derivation reads only the source document, so repeating it is harmless.
//!
//! A derived projection added to a read model that already holds its source documents is
//! filled from them once ([`Projector::ensure_derived`]), marked by a checkpoint per derived
//! projection and [`DERIVED_LAYOUT`].

use crate::{ProjectError, Projector};
use esq_domain::derived::{
    derive, marker_targets, pending_field, pending_marker, Derived, ALL_INDEX,
};
use esq_domain::projection::{
    apply_to_doc, doc_version, ApplyOutcome, Batch, Doc, FieldOp, Projection,
};
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadStore};
use std::sync::Arc;

/// The version of the derived projections' layout, part of their fill markers: bumped when a
/// derived projection changes meaning, so that it is filled again.
pub const DERIVED_LAYOUT: u32 = 1;

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// The derived projections fed by `source`.
    fn derived_of<'a>(&'a self, source: &'a str) -> impl Iterator<Item = &'a Arc<dyn Derived>> {
        self.derived.iter().filter(move |d| d.source() == source)
    }

    /// Before a batch is applied to a source document: adds to the batch the pending marker of
    /// each derived projection whose contributions the batch changes, recording the targets the
    /// document contributes to now (and those of a marker still pending), so the apply and the
    /// marker are one atomic step. A batch that changes no contribution (most cart events:
    /// only checkout sells) marks nothing and costs no derived write.
    pub(crate) async fn mark_derived(
        &self,
        projection: &dyn Projection,
        doc_id: &str,
        b: &mut Batch,
    ) -> Result<(), ProjectError> {
        if self.derived_of(projection.name()).next().is_none() {
            return Ok(());
        }
        let before = self
            .read
            .get(projection.name(), doc_id)
            .await?
            .unwrap_or_default();
        let mut after = before.clone();
        if apply_to_doc(&mut after, b) != ApplyOutcome::Applied {
            return Ok(()); // the store will refuse it too
        }
        for d in self.derived_of(projection.name()) {
            let field = pending_field(d.name());
            let pending = before.get(&field);
            let was = d.contributions(&before);
            if pending.is_none() && was == d.contributions(&after) {
                continue;
            }
            let mut previous: Vec<String> = was.into_iter().map(|(t, _)| t).collect();
            if let Some(marker) = pending {
                previous.extend(marker_targets(marker));
            }
            b.changes.fields.push(FieldOp::Set(
                field,
                pending_marker(b.last_version, &previous),
            ));
        }
        Ok(())
    }

    /// Finishes the pending derivations of a source document, if any: writes what the document
    /// contributes now (at its version), tombstones the targets its marker names that it no
    /// longer contributes to, adds live targets to the listing index, and clears the marker.
    pub(crate) async fn finish_derived(
        &self,
        projection: &dyn Projection,
        doc_id: &str,
    ) -> Result<(), ProjectError> {
        if self.derived_of(projection.name()).next().is_none() {
            return Ok(());
        }
        let Some(doc) = self.read.get(projection.name(), doc_id).await? else {
            return Ok(());
        };
        for d in self.derived_of(projection.name()) {
            let field = pending_field(d.name());
            let Some(marker) = doc.get(&field) else {
                continue;
            };
            self.contribute(d.as_ref(), doc_id, &doc, &marker_targets(marker))
                .await?;
            self.read
                .clear_field_if(projection.name(), doc_id, &field, marker)
                .await?;
        }
        Ok(())
    }

    /// Writes what `doc` (source document `doc_id`) contributes to `d` now, with tombstones
    /// for the `previous` targets it no longer names.
    async fn contribute(
        &self,
        d: &dyn Derived,
        doc_id: &str,
        doc: &Doc,
        previous: &[String],
    ) -> Result<(), ProjectError> {
        let version = doc_version(doc);
        if version == 0 {
            return Ok(());
        }
        let all = [ALL_INDEX.to_owned()];
        for (target, c) in derive(d, doc_id, version, doc, previous) {
            self.read
                .contribute(d.name(), &target, d.columns(), &c)
                .await?;
            if c.values.is_some() {
                // Add-only: a target whose count drops to 0 stays listed and reads as absent.
                self.read
                    .update_indexes(d.name(), &target, &all, &[], "")
                    .await?;
            }
        }
        Ok(())
    }

    /// Fills every derived projection that has no fill marker (it is new, or its layout
    /// changed) from the source documents of every stream, then sets the marker. Streams the
    /// store's stream list, one page at a time.
    pub async fn ensure_derived(&self) -> Result<(), ProjectError> {
        for d in &self.derived {
            let marker = format!(
                "{}:derived:{}:{DERIVED_LAYOUT}",
                self.config.checkpoint_prefix,
                d.name()
            );
            if self.read.checkpoint(&marker).await?.is_some() {
                continue;
            }
            let Some(source) = self.projections.iter().find(|p| p.name() == d.source()) else {
                continue;
            };
            tracing::info!(
                derived = d.name(),
                "filling a derived projection from its sources"
            );
            let mut cursor = None;
            let mut sources = 0u64;
            loop {
                let page = self
                    .store
                    .list_streams(cursor, self.config.list_page)
                    .await?;
                for stream in page.streams.iter().filter(|s| source.handles(&s.kind)) {
                    let doc_id = source.doc_id(stream);
                    if let Some(doc) = self.read.get(source.name(), &doc_id).await? {
                        let previous = doc
                            .get(&pending_field(d.name()))
                            .map(|m| marker_targets(m))
                            .unwrap_or_default();
                        self.contribute(d.as_ref(), &doc_id, &doc, &previous)
                            .await?;
                        sources += 1;
                    }
                }
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            tracing::info!(derived = d.name(), sources, "derived projection filled");
            self.read
                .save_checkpoint(&marker, &self.config.owner)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::setup;
    use crate::{Config, Projector, READ_MODEL_LAYOUT};
    use esq_domain::authors::{AuthorView, AuthorsProjection};
    use esq_domain::bookshop::BookProjection;
    use esq_domain::derived::{pending_field, pending_marker, Derived};
    use esq_domain::projection::{batch, FieldOp};
    use esq_domain::{ExpectedVersion, NewEvent, StreamId};
    use esq_eventstore::{EventStore, ReadRequest};
    use esq_readstore::ReadStore;

    fn book() -> (StreamId, NewEvent) {
        let stream = StreamId::new("book", "9780441478125").expect("stream");
        let created = NewEvent::json(
            "BookCreated",
            1,
            &serde_json::json!({"isbn": "9780441478125", "title": "T", "author": "A", "price_cents": 700}),
        );
        (stream, created)
    }

    async fn author<R: ReadStore>(read: &R, name: &str) -> Option<AuthorView> {
        let doc = read
            .get(AuthorsProjection.name(), name)
            .await
            .expect("get")?;
        AuthorView::from_doc(name, &doc)
    }

    #[tokio::test]
    async fn derivation_left_pending_by_a_crash_is_finished_by_the_next_sync() {
        let (_dir, store, feed, read) = setup(1).await;
        let (stream, created) = book();
        store
            .append(&stream, ExpectedVersion::NoStream, &[created])
            .await
            .expect("append");
        // What a projector that died right after its fenced apply leaves behind.
        let events = store
            .read(&stream, ReadRequest::forwards(1, 10))
            .await
            .expect("read");
        let mut b = batch(&BookProjection, &events)
            .expect("readable")
            .expect("batch");
        let field = pending_field(AuthorsProjection.name());
        let marker = pending_marker(1, &[]);
        b.changes.fields.push(FieldOp::Set(field.clone(), marker));
        read.apply("book", &stream.id, &b).await.expect("apply");
        assert_eq!(author(read.as_ref(), "A").await, None);

        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.sync(&stream, Some(1)).await.expect("sync");
        let a = author(read.as_ref(), "A").await.expect("author A");
        assert_eq!(
            (a.books, a.min_price_cents, a.max_price_cents),
            (1, 700, 700)
        );
        let doc = read
            .get("book", &stream.id)
            .await
            .expect("get")
            .expect("doc");
        assert!(!doc.contains_key(&field), "marker cleared");
    }

    #[tokio::test]
    async fn a_new_derived_projection_is_filled_from_the_existing_source_documents() {
        let (_dir, store, feed, read) = setup(1).await;
        let (stream, created) = book();
        store
            .append(&stream, ExpectedVersion::NoStream, &[created])
            .await
            .expect("append");
        // A read model built before the derived projection existed: the book document only.
        let events = store
            .read(&stream, ReadRequest::forwards(1, 10))
            .await
            .expect("read");
        let b = batch(&BookProjection, &events)
            .expect("readable")
            .expect("batch");
        read.apply("book", &stream.id, &b).await.expect("apply");
        read.save_checkpoint(&format!("projector:marker:{READ_MODEL_LAYOUT}"), "old")
            .await
            .expect("marker");
        assert_eq!(author(read.as_ref(), "A").await, None);

        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.ensure_marker().await.expect("ensure");
        let a = author(read.as_ref(), "A").await.expect("filled");
        assert_eq!(a.books, 1);
        assert_eq!(
            read.index_page(AuthorsProjection.name(), "all", None, 10)
                .await
                .expect("page"),
            vec!["A".to_owned()]
        );
    }
}
