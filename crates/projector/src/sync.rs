//! Bringing one stream into the read model: pull its events after the lowest version its
//! projections hold, fold them through the domain's projections and apply each batch behind the
//! read store's version fence, so duplicate, late or concurrent syncs are harmless.

use crate::{ProjectError, Projector};
use esq_domain::projection::{batch, ApplyOutcome, Projection};
use esq_domain::{RecordedEvent, StreamId};
use esq_eventstore::{ChangeFeed, EventStore, ReadRequest};
use esq_readstore::{Coordination, ReadStore};
use std::sync::Arc;

/// How far a stream could be brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Synced {
    /// Every projection is at the target version (or at the stream's end).
    Done,
    /// The store does not (yet) hold the events up to the target.
    Missing,
}

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Brings every projection of `stream` up to `target` (or to the stream's end when
    /// `None`), pulling events after the lowest projected version, in pages.
    pub(crate) async fn sync(
        &self,
        stream: &StreamId,
        target: Option<u64>,
    ) -> Result<Synced, ProjectError> {
        let projections: Vec<&Arc<dyn Projection>> = self
            .projections
            .iter()
            .filter(|p| p.handles(&stream.kind))
            .collect();
        let mut versions = Vec::with_capacity(projections.len());
        for p in &projections {
            let doc_id = p.doc_id(stream);
            // Also finishes index updates an earlier apply left pending (a crash, a Redis error).
            versions.push(self.projected_version(p.as_ref(), &doc_id).await?);
            // And derived updates left pending (see `derived`).
            self.finish_derived(p.as_ref(), &doc_id).await?;
        }
        loop {
            let low = versions.iter().copied().min().unwrap_or(u64::MAX);
            if target.is_some_and(|t| low >= t) || projections.is_empty() {
                return Ok(Synced::Done);
            }
            let events = self
                .store
                .read(
                    stream,
                    ReadRequest::forwards(low + 1, self.config.read_page),
                )
                .await?;
            if events.is_empty() {
                return Ok(if target.is_some() {
                    Synced::Missing
                } else {
                    Synced::Done
                });
            }
            for (p, version) in projections.iter().zip(versions.iter_mut()) {
                *version = self.apply(p.as_ref(), stream, &events, *version).await?;
            }
            if events.len() < self.config.read_page as usize && target.is_none() {
                return Ok(Synced::Done);
            }
        }
    }

    /// Applies the events after `version` to one projection; returns its version afterwards.
    async fn apply(
        &self,
        projection: &dyn Projection,
        stream: &StreamId,
        events: &[RecordedEvent],
        version: u64,
    ) -> Result<u64, ProjectError> {
        let start = events.partition_point(|e| e.version <= version);
        let Some(mut b) = batch(projection, &events[start..]) else {
            return Ok(version);
        };
        let doc_id = projection.doc_id(stream);
        // Marks the index work as pending in the same atomic apply, so that an index update cut
        // short (a crash, a Redis error) is noticed by whoever syncs this document next.
        self.mark_index_work(projection, &doc_id, &mut b).await?;
        // And the derived work (see `derived`), in the same apply.
        self.mark_derived(projection, &doc_id, &mut b).await?;
        let outcome = esq_runtime::metrics::store()
            .time(
                "read",
                "apply",
                self.read.apply(projection.name(), &doc_id, &b),
            )
            .await?;
        let metrics = esq_runtime::metrics::projector();
        match outcome {
            ApplyOutcome::Applied => {
                let n = events[start..]
                    .iter()
                    .take_while(|e| e.version <= b.last_version)
                    .count();
                metrics.events_applied(projection.name(), n as u64);
            }
            ApplyOutcome::Duplicate => {}
            ApplyOutcome::Stale { .. } => metrics.gap_pulled(),
        }
        if projection.has_indexes() {
            // Also after a duplicate or stale apply: the projector that applied it may have
            // died before its index update.
            self.reindex(projection, &doc_id).await?;
        }
        // Likewise for the derived work; after the index update, so that it does not delay
        // the indexes (readers that waited for the document's version expect them soon).
        self.finish_derived(projection, &doc_id).await?;
        Ok(match outcome {
            ApplyOutcome::Applied => b.last_version,
            ApplyOutcome::Duplicate => b.last_version.max(version),
            // Another projector moved the document: continue from where it really is.
            ApplyOutcome::Stale { current } => current,
        })
    }
}
