//! Rebuilding the read model from the event store: when the read model has no marker for the
//! current layout (new, flushed, or built under an older meaning), every stream is folded in
//! again.

use crate::{ProjectError, Projector, READ_MODEL_LAYOUT};
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadStore};

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Rebuilds the read model from the event store if it lost its marker (a new or flushed
    /// read store, or one built for an older [`READ_MODEL_LAYOUT`]), then sets the marker.
    pub async fn ensure_marker(&self) -> Result<(), ProjectError> {
        let marker = format!(
            "{}:marker:{READ_MODEL_LAYOUT}",
            self.config.checkpoint_prefix
        );
        if self.read.checkpoint(&marker).await?.is_none() {
            tracing::warn!(
                "read model has no marker (new or flushed): rebuilding from the event store"
            );
            let streams = self.rebuild().await?;
            tracing::info!(streams, "read model rebuilt");
            self.read
                .save_checkpoint(&marker, &self.config.owner)
                .await?;
        }
        self.ensure_derived().await
    }

    /// Brings every stream of the event store into the read store: a complete rebuild after
    /// the read store was lost, or a check that nothing was missed. Streams the store instead
    /// of loading it: one page of stream ids and one page of events at a time.
    pub async fn rebuild(&self) -> Result<u64, ProjectError> {
        let mut cursor = None;
        let mut streams = 0u64;
        let metrics = esq_runtime::metrics::projector();
        for p in &self.projections {
            metrics.rebuild_started(p.name());
        }
        loop {
            let page = self
                .store
                .list_streams(cursor, self.config.list_page)
                .await?;
            for stream in &page.streams {
                self.sync(stream, None).await?;
                streams += 1;
            }
            for p in &self.projections {
                metrics.rebuild_progress(p.name(), streams);
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(streams),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{cart, setup};
    use crate::{Config, Projector};
    use esq_domain::{ExpectedVersion, NewEvent};
    use esq_eventstore::EventStore;
    use esq_readstore::ReadStore;

    #[tokio::test]
    async fn rebuild_restores_a_lost_read_model() {
        let (_dir, store, feed, read) = setup(1).await;
        for i in 0..3 {
            let e = NewEvent::json(
                "ItemAdded",
                2,
                &serde_json::json!({"sku":"a","quantity":1,"unit_price_cents":3}),
            );
            store
                .append(
                    &cart(&format!("c{i}")),
                    ExpectedVersion::Any,
                    std::slice::from_ref(&e),
                )
                .await
                .expect("append");
            store
                .append(
                    &cart(&format!("c{i}")),
                    ExpectedVersion::Any,
                    &[NewEvent {
                        event_id: uuid::Uuid::new_v4(),
                        ..e
                    }],
                )
                .await
                .expect("append");
        }
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.ensure_marker().await.expect("rebuild");
        for i in 0..3 {
            assert_eq!(read.version("cart2", &format!("c{i}")).await.expect("v"), 2);
            assert_eq!(
                read.version("state", &format!("cart:c{i}"))
                    .await
                    .expect("v"),
                2
            );
        }
        let doc = read.get("cart2", "c0").await.expect("get").expect("doc");
        assert_eq!(esq_domain::cart::CartView::from_doc(&doc).total_cents, 6);
    }
}
