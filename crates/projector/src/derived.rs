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
//! Generations: a derived projection's targets live in the generation of its source
//! ([`esq_readstore::generations::derived_namespace`]: `book:g3` → `authors:g3`). Every apply
//! to a source namespace derives into the matching derived namespace, so the dual write of a
//! rebuild fills the derived targets of the building generation too, one swap of the source's
//! record switches both, and deleting a retired generation deletes its derived namespaces.
//!
//! A derived projection added to a read model that already holds its source documents is
//! filled once from the source documents of the active generation into the same generation
//! ([`Projector::ensure_derived`], one replica under a lease), marked by a checkpoint per
//! derived projection, [`DERIVED_LAYOUT`] and generation. Filling in place is safe while
//! live changes flow: every contribution is fenced per source document and version, so a fill
//! that read an older source version can neither undo nor double a newer one.

use crate::{ProjectError, Projector};
use esq_domain::derived::{
    derive, marker_targets, pending_field, pending_marker, Derived, ALL_INDEX,
};
use esq_domain::projection::{
    apply_to_doc, doc_version, ApplyOutcome, Batch, Doc, FieldOp, Projection,
};
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::generations::{derived_namespace, namespace, read_record};
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

    /// Whether `projection` feeds any derived projection.
    pub(crate) fn has_derived(&self, projection: &dyn Projection) -> bool {
        self.derived_of(projection.name()).next().is_some()
    }

    /// Whether `doc` (a document of `projection`) holds a pending derived marker.
    pub(crate) fn derived_pending(&self, projection: &dyn Projection, doc: &Doc) -> bool {
        self.derived_of(projection.name())
            .any(|d| doc.contains_key(&pending_field(d.name())))
    }

    /// Before a batch is applied to a source document (whose current state is `known` when
    /// the caller already read it at the version the batch follows): adds to the batch the pending marker of
    /// each derived projection whose contributions the batch changes, recording the targets the
    /// document contributes to now (and those of a marker still pending), so the apply and the
    /// marker are one atomic step. A batch that changes no contribution (most cart events:
    /// only checkout sells) marks nothing and costs no derived write.
    pub(crate) async fn mark_derived(
        &self,
        projection: &dyn Projection,
        namespace: &str,
        doc_id: &str,
        b: &mut Batch,
        known: Option<&Doc>,
    ) -> Result<(), ProjectError> {
        if self.derived_of(projection.name()).next().is_none() {
            return Ok(());
        }
        let before = match known {
            Some(doc) => doc.clone(),
            None => self.read.get(namespace, doc_id).await?.unwrap_or_default(),
        };
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
        namespace: &str,
        doc_id: &str,
    ) -> Result<(), ProjectError> {
        if self.derived_of(projection.name()).next().is_none() {
            return Ok(());
        }
        let Some(doc) = self.read.get(namespace, doc_id).await? else {
            return Ok(());
        };
        for d in self.derived_of(projection.name()) {
            let field = pending_field(d.name());
            let Some(marker) = doc.get(&field) else {
                continue;
            };
            let target_ns = derived_namespace(d.source(), namespace, d.name());
            self.contribute(
                d.as_ref(),
                &target_ns,
                doc_id,
                &doc,
                &marker_targets(marker),
            )
            .await?;
            self.read
                .clear_field_if(namespace, doc_id, &field, marker)
                .await?;
        }
        Ok(())
    }

    /// Writes what `doc` (source document `doc_id`) contributes to `d` now into namespace
    /// `target_ns`, with tombstones for the `previous` targets it no longer names.
    async fn contribute(
        &self,
        d: &dyn Derived,
        target_ns: &str,
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
                .contribute(target_ns, &target, d.columns(), &c)
                .await?;
            if c.values.is_some() {
                // Add-only: a target whose count drops to 0 stays listed and reads as absent.
                self.read
                    .update_indexes(target_ns, &target, &all, &[], "")
                    .await?;
            }
        }
        Ok(())
    }

    /// The checkpoint marking derived projection `d` filled in `generation` of its source.
    pub(crate) fn derived_fill_marker(&self, d: &str, generation: u32) -> String {
        format!(
            "{}:derived:{d}:{DERIVED_LAYOUT}:g{generation}",
            self.config.checkpoint_prefix
        )
    }

    /// Marks every derived projection of `source` filled in `generation` (a rebuild of the
    /// source built them along).
    pub(crate) async fn mark_derived_filled(
        &self,
        source: &str,
        generation: u32,
    ) -> Result<(), ProjectError> {
        for d in self.derived_of(source) {
            self.read
                .save_checkpoint(
                    &self.derived_fill_marker(d.name(), generation),
                    &self.config.owner,
                )
                .await?;
        }
        Ok(())
    }

    /// The derived projections not filled yet in the active generation of their source, with
    /// that generation.
    pub(crate) async fn derived_due(&self) -> Result<Vec<(Arc<dyn Derived>, u32)>, ProjectError> {
        let mut due = Vec::new();
        for d in &self.derived {
            let Some((record, _)) = read_record(self.read.as_ref(), d.source()).await? else {
                continue; // the source has no generation yet: its first build fills both
            };
            let Some(active) = record.active else {
                continue;
            };
            if self
                .read
                .checkpoint(&self.derived_fill_marker(d.name(), active))
                .await?
                .is_none()
            {
                due.push((Arc::clone(d), active));
            }
        }
        Ok(due)
    }

    /// Fills derived projection `d` in `generation` of its source from the source documents
    /// of that generation, then sets its fill marker. Streams the store's stream list, one
    /// page at a time. Call it under the derived projection's lease (one replica fills).
    pub(crate) async fn fill_derived(
        &self,
        d: &dyn Derived,
        generation: u32,
    ) -> Result<(), ProjectError> {
        let Some(source) = self.projections.iter().find(|p| p.name() == d.source()) else {
            return Ok(());
        };
        let source_ns = namespace(d.source(), generation);
        let target_ns = derived_namespace(d.source(), &source_ns, d.name());
        tracing::info!(
            derived = d.name(),
            generation,
            "filling a derived projection from its sources"
        );
        let mut cursor = None;
        let mut sources = 0u64;
        let epoch = self.replication_epoch();
        loop {
            let page = self
                .store
                .list_streams(cursor, self.config.list_page)
                .await?;
            for stream in page.streams.iter().filter(|s| source.handles(&s.kind)) {
                let doc_id = source.doc_id(stream);
                if let Some(doc) = self.read.get(&source_ns, &doc_id).await? {
                    let previous = doc
                        .get(&pending_field(d.name()))
                        .map(|m| marker_targets(m))
                        .unwrap_or_default();
                    self.contribute(d, &target_ns, &doc_id, &doc, &previous)
                        .await?;
                    sources += 1;
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        tracing::info!(
            derived = d.name(),
            generation,
            sources,
            "derived projection filled"
        );
        // The marker vouches for every contribution above.
        self.ensure_replicated(epoch).await?;
        self.read
            .save_checkpoint(
                &self.derived_fill_marker(d.name(), generation),
                &self.config.owner,
            )
            .await?;
        Ok(())
    }

    /// Fills every derived projection that is due ([`Projector::derived_due`]), ignoring
    /// leases (tests, and `esq dev` before it serves).
    pub async fn ensure_derived(&self) -> Result<(), ProjectError> {
        for (d, generation) in self.derived_due().await? {
            self.fill_derived(d.as_ref(), generation).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::setup;
    use crate::{Config, Projector};
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
        let doc = read.get("authors:g1", name).await.expect("get")?;
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
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.refresh_generations(false).await.expect("generations");
        read.apply("book:g1", &stream.id, &b).await.expect("apply");
        assert_eq!(author(read.as_ref(), "A").await, None);

        p.sync(&stream, Some(1)).await.expect("sync");
        let a = author(read.as_ref(), "A").await.expect("author A");
        assert_eq!(
            (a.books, a.min_price_cents, a.max_price_cents),
            (1, 700, 700)
        );
        let doc = read
            .get("book:g1", &stream.id)
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
        // A read model built before the derived projection existed: the book document only, in
        // the source's active generation.
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.refresh_generations(false).await.expect("generations");
        let events = store
            .read(&stream, ReadRequest::forwards(1, 10))
            .await
            .expect("read");
        let b = batch(&BookProjection, &events)
            .expect("readable")
            .expect("batch");
        read.apply("book:g1", &stream.id, &b).await.expect("apply");
        assert_eq!(author(read.as_ref(), "A").await, None);
        assert_eq!(
            p.derived_due().await.expect("due").len(),
            2,
            "authors and sku_sales"
        );

        p.ensure_derived().await.expect("ensure");
        let a = author(read.as_ref(), "A").await.expect("filled");
        assert_eq!(a.books, 1);
        assert!(
            p.derived_due().await.expect("due").is_empty(),
            "filled once"
        );
        assert_eq!(
            read.index_page("authors:g1", "all", None, 10)
                .await
                .expect("page"),
            vec!["A".to_owned()]
        );
    }
}
