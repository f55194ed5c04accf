//! Bringing one stream into the read model: pull its events after the lowest version its
//! projections hold (or take them from a nudge that carries them), fold them through the
//! domain's projections and apply each batch behind the read store's version fence, so
//! duplicate, late or concurrent syncs are harmless. An event a projection cannot apply parks
//! the stream for that projection (see `parked`); the stream's other projections, and every
//! other stream, go on.

use crate::{ProjectError, Projector};
use esq_domain::projection::{
    batch_except, doc_version, ApplyOutcome, Doc, Projection, INDEX_PENDING_FIELD,
};
use esq_domain::{RecordedEvent, StreamId};
use esq_eventstore::{ChangeFeed, EventStore, ReadRequest};
use esq_readstore::{Coordination, ReadError, ReadStore};
use std::borrow::Cow;
use std::collections::BTreeSet;

/// How far a stream could be brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Synced {
    /// Every projection is at the target version (or at the stream's end).
    Done,
    /// The store does not (yet) hold the events up to the target.
    Missing,
}

/// Where one projection of a stream stands after an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// At this version.
    At(u64),
    /// Parked: it cannot go on until an operator retries or skips.
    Parked,
}

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Brings every projection of `stream` up to `target` (or to the stream's end when
    /// `None`), pulling events after the lowest projected version, in pages.
    pub(crate) async fn sync(
        &self,
        stream: &StreamId,
        target: Option<u64>,
    ) -> Result<Synced, ProjectError> {
        self.sync_only(stream, target, None, &[]).await
    }

    /// [`Projector::sync`] for the projections of `stream`, or only for the one named `only`,
    /// in each of their generations ([`crate::generations::Targets`]: building first, then
    /// active). A projection that parks is left behind; the others go on. `carried` are events
    /// of the stream the caller already has (a nudge's), used instead of a read when they
    /// start at or before the lowest projected version's successor and reach `target`.
    pub(crate) async fn sync_only(
        &self,
        stream: &StreamId,
        target: Option<u64>,
        only: Option<&str>,
        carried: &[RecordedEvent],
    ) -> Result<Synced, ProjectError> {
        let pairs = self.pairs(stream, only)?;
        self.sync_into(stream, target, pairs, carried, None).await
    }

    /// The change log's [`Projector::sync`]: `stream` up to `target`, for changes whose
    /// earliest event is `from`. Unless the fast path brought the stream there recently (then
    /// its documents are most likely current, and reading the store would be wasted), the
    /// events from `from` on are read at the same time as the documents' versions rather than
    /// after them: on a catch-up the documents stand just before `from` (the checkpoint covers
    /// the changes before), so the read is the one the sync needs, a round trip sooner. When a
    /// document stands elsewhere the read is discarded or completed as usual.
    pub(crate) async fn sync_changed(
        &self,
        stream: &StreamId,
        target: u64,
        from: u64,
    ) -> Result<Synced, ProjectError> {
        let pairs = self.pairs(stream, None)?;
        let prefetch = (!self.nudged_to(stream, target)).then_some(from.max(1));
        self.sync_into(stream, Some(target), pairs, &[], prefetch)
            .await
    }

    /// The (projection, namespace) pairs of `stream` (of projection `only`, if named).
    fn pairs(
        &self,
        stream: &StreamId,
        only: Option<&str>,
    ) -> Result<Vec<(&dyn Projection, String)>, ProjectError> {
        let mut pairs = Vec::new();
        for p in self
            .projections
            .iter()
            .filter(|p| p.handles(&stream.kind) && only.is_none_or(|n| n == p.name()))
        {
            let namespaces = self.targets.of(p.name()).ok_or_else(|| {
                ReadError::Internal(format!("generations of {} not read yet", p.name()))
            })?;
            pairs.extend(namespaces.into_iter().map(|ns| (p.as_ref(), ns)));
        }
        Ok(pairs)
    }

    /// Brings `stream` up to `target` (or to its end when `None`) in each (projection,
    /// namespace) of `pairs` — the projections at once, a projection's namespaces in the order
    /// of `pairs` (building first) — pulling events after the lowest version in pages
    /// (or taking them from `carried`, see [`Projector::sync_only`]). With `prefetch`, the
    /// first page is read from that version concurrently with the starting points, and used
    /// if it begins at or before the lowest one's successor (see [`Projector::sync_changed`]).
    pub(crate) async fn sync_into(
        &self,
        stream: &StreamId,
        target: Option<u64>,
        mut pairs: Vec<(&dyn Projection, String)>,
        mut carried: &[RecordedEvent],
        prefetch: Option<u64>,
    ) -> Result<Synced, ProjectError> {
        // Where each pair starts, read concurrently (distinct documents): its version, and
        // its document when the apply needs it and it has no pending work (see `start`).
        let starts =
            futures::future::join_all(pairs.iter().map(|(p, ns)| self.start(*p, ns, stream)));
        let (starts, mut prefetched) = match prefetch {
            Some(from) => {
                #[cfg(test)]
                self.prefetches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let page = ReadRequest::forwards(from, self.config.read_page);
                let (starts, read) = tokio::join!(starts, self.store.read(stream, page));
                (starts, Some((from, read)))
            }
            None => (starts.await, None),
        };
        let mut versions = Vec::with_capacity(pairs.len());
        let mut known = Vec::with_capacity(pairs.len());
        for start in starts {
            let (version, doc) = start?;
            versions.push(version);
            known.push(doc);
        }
        loop {
            let low = versions.iter().copied().min().unwrap_or(u64::MAX);
            if target.is_some_and(|t| low >= t) || pairs.is_empty() {
                return Ok(Synced::Done);
            }
            let covers = carried.first().is_some_and(|e| e.version <= low + 1)
                && carried
                    .last()
                    .is_some_and(|e| target.is_some_and(|t| e.version >= t));
            let events = if covers {
                // The writer's own record of the append: what a read would return.
                Cow::Borrowed(std::mem::take(&mut carried))
            } else if let Some((_, read)) = prefetched.take().filter(|(from, _)| *from <= low + 1) {
                // Read from at or before where the lowest document stands: what the read below
                // would return, perhaps with events every document already has in front.
                Cow::Owned(read?)
            } else {
                Cow::Owned(
                    self.store
                        .read(
                            stream,
                            ReadRequest::forwards(low + 1, self.config.read_page),
                        )
                        .await?,
                )
            };
            if events.is_empty() {
                return Ok(if target.is_some() {
                    Synced::Missing
                } else {
                    Synced::Done
                });
            }
            // The projections' documents are distinct, so their applies of this page run at
            // once (one read-store round trip for all, not one each). A projection's own
            // generations keep their order, building first (see `generations`), and each
            // document's applies stay in order, page after page.
            let docs: Vec<Option<Doc>> = known.iter_mut().map(Option::take).collect();
            let page: &[RecordedEvent] = &events;
            let (pairs_at, versions_at, docs_at) = (&pairs, &versions, &docs);
            let runs = by_projection(&pairs).into_iter().map(|group| async move {
                let mut steps = Vec::with_capacity(group.len());
                for i in group {
                    let (p, ns) = (pairs_at[i].0, pairs_at[i].1.as_str());
                    // The document read at the start describes only the first apply.
                    let doc = docs_at[i].as_ref();
                    let step = self.apply(p, ns, stream, page, versions_at[i], doc).await;
                    let failed = step.is_err();
                    steps.push((i, step));
                    if failed {
                        break;
                    }
                }
                steps
            });
            // Every entry is overwritten below, or an error returns first.
            let mut steps = vec![Step::Parked; pairs.len()];
            for run in futures::future::join_all(runs).await {
                for (i, step) in run {
                    steps[i] = step?;
                }
            }
            let mut kept = 0;
            for (i, step) in steps.into_iter().enumerate() {
                if let Step::At(v) = step {
                    pairs.swap(kept, i);
                    versions[kept] = v;
                    kept += 1;
                }
            }
            pairs.truncate(kept);
            versions.truncate(kept);
            known.truncate(kept);
            if events.len() < self.config.read_page as usize && target.is_none() {
                return Ok(Synced::Done);
            }
        }
    }

    /// Where one (projection, namespace) of `stream` starts: the document's version, after
    /// finishing index and derived work an earlier apply left pending (a crash, a Redis error).
    /// For a projection whose apply reads the document first (indexes, derived projections)
    /// the document comes too when nothing was pending, so that the apply need not read it
    /// again: one read instead of three. An unreadable document (e.g. a key of the wrong
    /// type) starts at 0: the apply from the start will be refused too, and parks the stream.
    async fn start(
        &self,
        p: &dyn Projection,
        ns: &str,
        stream: &StreamId,
    ) -> Result<(u64, Option<Doc>), ProjectError> {
        #[cfg(test)]
        self.starts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let doc_id = p.doc_id(stream);
        let unreadable = |e: String| {
            tracing::debug!(%stream, projection = p.name(), error = %e, "unreadable document");
        };
        if !p.has_indexes() && !self.has_derived(p) {
            return match self.read.version(ns, &doc_id).await {
                Ok(v) => Ok((v, None)),
                Err(ReadError::Internal(e)) => {
                    unreadable(e);
                    Ok((0, None))
                }
                Err(e) => Err(e.into()),
            };
        }
        let doc = match self.read.get(ns, &doc_id).await {
            Ok(doc) => doc.unwrap_or_default(),
            Err(ReadError::Internal(e)) => {
                unreadable(e);
                return Ok((0, None));
            }
            Err(e) => return Err(e.into()),
        };
        let mut version = doc_version(&doc);
        let index_pending = doc.contains_key(INDEX_PENDING_FIELD);
        let derived_pending = self.derived_pending(p, &doc);
        if index_pending {
            match self.reindex(p, ns, &doc_id).await {
                // As for an unreadable document: the apply from the start parks the stream.
                Err(ProjectError::Read(ReadError::Internal(e))) => {
                    unreadable(e);
                    version = 0;
                }
                other => other?,
            }
        }
        if derived_pending {
            // Derived updates after the index update (see `apply`).
            match self.finish_derived(p, ns, &doc_id).await {
                Err(ProjectError::Read(ReadError::Internal(e))) => unreadable(e),
                other => other?,
            }
        }
        // Finishing pending work changed the document's markers: the apply reads it afresh.
        let known = (!index_pending && !derived_pending).then_some(doc);
        Ok((version, known))
    }

    /// Applies the events after `version` to one projection; returns its version afterwards.
    /// `known` is the document as read at `version` with no pending work, if the caller has it.
    async fn apply(
        &self,
        projection: &dyn Projection,
        namespace: &str,
        stream: &StreamId,
        events: &[RecordedEvent],
        version: u64,
        known: Option<&Doc>,
    ) -> Result<Step, ProjectError> {
        let start = events.partition_point(|e| e.version <= version);
        let events = &events[start..];
        // Skips are looked up only when an event fails: an operator can only skip an event
        // that parked its stream.
        let mut skipped: Option<BTreeSet<u64>> = None;
        let (mut b, poison) = loop {
            match batch_except(projection, events, |v| skip_contains(&skipped, v)) {
                Ok(None) => return Ok(Step::At(version)),
                Ok(Some(b)) => break (b, None),
                Err(e) => {
                    if skipped.is_none() {
                        let versions = self.skipped_versions(projection.name(), stream).await?;
                        skipped = Some(versions.into_iter().collect());
                        if skip_contains(&skipped, e.version) {
                            continue; // an operator skipped it: fold again without it
                        }
                    }
                    // Apply what comes before the unreadable event, then park at it.
                    let before = events.partition_point(|ev| ev.version < e.version);
                    let prefix = &events[..before];
                    match batch_except(projection, prefix, |v| skip_contains(&skipped, v)) {
                        Ok(Some(b)) => break (b, Some(e)),
                        _ => {
                            self.park(projection.name(), stream, e.version, &e.reason)
                                .await?;
                            return Ok(Step::Parked);
                        }
                    }
                }
            }
        };
        let doc_id = projection.doc_id(stream);
        // Marks the index work as pending in the same atomic apply, so that an index update cut
        // short (a crash, a Redis error) is noticed by whoever syncs this document next.
        // And the derived work (see `derived`), in the same apply.
        let known = known.filter(|doc| doc_version(doc) == version);
        let unmarked = b.changes.fields.len();
        let marked = match self
            .mark_index_work(projection, namespace, &doc_id, &mut b, known)
            .await
        {
            Ok(()) => {
                self.mark_derived(projection, namespace, &doc_id, &mut b, known)
                    .await
            }
            Err(e) => Err(e),
        };
        // No marker was pending at `version` and this batch adds none: if it applies (so the
        // document was still at `version`: every apply moves the version, and markers are only
        // set by applies), no index or derived work can be pending after it.
        let nothing_pending = known.is_some() && b.changes.fields.len() == unmarked;
        let outcome = match marked {
            Ok(()) => {
                esq_runtime::metrics::store()
                    .time("read", "apply", self.read.apply(namespace, &doc_id, &b))
                    .await
            }
            Err(ProjectError::Read(e)) => Err(e),
            Err(e) => return Err(e),
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            // The read store refuses this document (a script error such as WRONGTYPE): only
            // this stream, for this projection, is held back.
            Err(ReadError::Internal(reason)) => {
                self.park(
                    projection.name(),
                    stream,
                    b.first_version,
                    &format!("the read store refuses the apply: {reason}"),
                )
                .await?;
                return Ok(Step::Parked);
            }
            Err(e) => return Err(e.into()),
        };
        let metrics = esq_runtime::metrics::projector();
        match outcome {
            ApplyOutcome::Applied => {
                let n = events
                    .iter()
                    .take_while(|e| e.version <= b.last_version)
                    .count();
                metrics.events_applied(projection.name(), n as u64);
            }
            ApplyOutcome::Duplicate => {}
            ApplyOutcome::Stale { .. } => metrics.gap_pulled(),
        }
        let followups = !(nothing_pending && outcome == ApplyOutcome::Applied);
        if followups && projection.has_indexes() {
            // Also after a duplicate or stale apply: the projector that applied it may have
            // died before its index update.
            self.reindex(projection, namespace, &doc_id).await?;
        }
        // Likewise for the derived work; after the index update, so that it does not delay
        // the indexes (readers that waited for the document's version expect them soon).
        if followups {
            self.finish_derived(projection, namespace, &doc_id).await?;
        }
        let at = match outcome {
            ApplyOutcome::Applied => b.last_version,
            ApplyOutcome::Duplicate => b.last_version.max(version),
            // Another projector moved the document: continue from where it really is.
            ApplyOutcome::Stale { current } => current,
        };
        match poison {
            // The events before the unreadable one are in: park at it.
            Some(e) if at + 1 == e.version => {
                self.park(projection.name(), stream, e.version, &e.reason)
                    .await?;
                Ok(Step::Parked)
            }
            _ => Ok(Step::At(at)),
        }
    }
}

/// The indexes of `pairs` grouped by projection, each group in the order of `pairs`.
fn by_projection(pairs: &[(&dyn Projection, String)]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, (p, _)) in pairs.iter().enumerate() {
        match groups.iter_mut().find(|g| pairs[g[0]].0.name() == p.name()) {
            Some(group) => group.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

fn skip_contains(skipped: &Option<BTreeSet<u64>>, version: u64) -> bool {
    skipped.as_ref().is_some_and(|s| s.contains(&version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{cart, setup};
    use crate::Config;
    use esq_domain::aggregate::encode;
    use esq_domain::cart::CartEvent;
    use esq_domain::{AppendResult, ExpectedVersion, NewEvent};

    fn added(sku: &str) -> NewEvent {
        encode(&CartEvent::ItemAdded {
            sku: sku.into(),
            quantity: 1,
            unit_price_cents: 100,
        })
    }

    /// A nudge's events that reach from the document's next version to the target are applied
    /// as they are, without a read; events that leave a gap before them are not, and the
    /// store is read instead.
    #[tokio::test]
    async fn carried_events_replace_the_read_only_when_they_cover_the_gap() {
        let (_dir, store, feed, read) = setup(1).await;
        let s = cart("carried");
        let stored = [added("stored-1"), added("stored-2")];
        for (i, e) in stored.iter().enumerate() {
            let expected = match i {
                0 => ExpectedVersion::NoStream,
                n => ExpectedVersion::Exact(n as u64),
            };
            store
                .append(&s, expected, std::slice::from_ref(e))
                .await
                .expect("append");
        }
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.refresh_generations(false).await.expect("generations");
        let ns = p.targets.of("cart2").expect("targets").remove(0);
        let doc = || async { read.get(&ns, &s.id).await.expect("get").unwrap_or_default() };

        // Events the store does not hold at version 1: seeing them applied shows the store
        // was not read (a real nudge carries exactly what the store holds, see write-svc's
        // `nudges` test).
        let result = |first: u64| AppendResult {
            first_version: first,
            last_version: first,
            committed_at_us: 1,
        };
        let carried = result(1).recorded(&s, &[added("carried-1")]);
        assert_eq!(
            p.sync_only(&s, Some(1), None, &carried)
                .await
                .expect("sync"),
            Synced::Done
        );
        let d = doc().await;
        assert_eq!(doc_version(&d), 1);
        assert!(d.contains_key("item:carried-1") && !d.contains_key("item:stored-1"));

        // Version 3 carried while the document is at 1: version 2 is missing from the nudge,
        // so the store is read for it; the carried event then follows without another read.
        let carried = result(3).recorded(&s, &[added("carried-3")]);
        assert_eq!(
            p.sync_only(&s, Some(3), None, &carried)
                .await
                .expect("sync"),
            Synced::Done
        );
        let d = doc().await;
        assert_eq!(doc_version(&d), 3);
        assert!(d.contains_key("item:stored-2") && d.contains_key("item:carried-3"));

        // Without carried events, a target the store does not reach is reported missing.
        assert_eq!(
            p.sync_only(&s, Some(4), None, &[]).await.expect("sync"),
            Synced::Missing
        );
    }
}
