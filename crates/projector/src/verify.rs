//! Verify: compares the active generation of a projection with a fold of the event store.
//!
//! Two passes, both streaming (memory stays flat whatever the store's size):
//! 1. every stream of the store the projection handles is folded — a page of events at a time,
//!    through the domain's own [`batch`] and [`apply_to_doc`] — into the document it should
//!    have, which is compared field by field with the stored one (the `_ix` marker aside), and
//!    the indexes [`Projection::indexes`] wants for it are checked for its membership;
//! 2. the namespace's document ids are walked, and a document no stream of the store maps to
//!    is reported as extra.
//!
//! Stale index entries of a document that left an index are not reported: readers confirm every
//! entry against its document by design (see the index module), so they are harmless.
//!
//! A derived projection (many-to-one, [`esq_domain::derived`]) is verified by gathering the
//! contributions of every folded source document per target and comparing the totals; see
//! `verify_derived`.
//!
//! Repair re-projects each differing stream: its document is reset (deleted) and synced again
//! from version 0 — without the reset, the version fence would call it up to date. An extra
//! document is deleted. A query of a document under repair may miss it for that moment.

use crate::ops::{Difference, DifferenceKind, VerifyOptions, VerifyProgress, VerifyReport};
use crate::{ProjectError, Projector};
use esq_domain::derived::{apply_contribution, derive, live_count, total, Derived, ALL_INDEX};
use esq_domain::projection::{
    apply_to_doc, batch_except, doc_version, Projection, INDEX_PENDING_FIELD,
};
use esq_domain::StreamId;
use esq_eventstore::{ChangeFeed, EventStore, ReadRequest};
use esq_readstore::generations::{derived_namespace, namespace, read_record};
use esq_readstore::{Coordination, Doc, ReadStore};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Compares the active generation of a projection with a fold of the event store (see the
    /// module docs), repairing the differences if asked.
    pub async fn verify(
        &self,
        options: &VerifyOptions,
        progress: &(dyn Fn(VerifyProgress) + Send + Sync),
    ) -> Result<VerifyReport, ProjectError> {
        if let Some(d) = self.derived.iter().find(|d| d.name() == options.projection) {
            return self.verify_derived(d.as_ref(), options, progress).await;
        }
        let p = self.projection(&options.projection)?;
        let name = p.name();
        let generation = read_record(self.read.as_ref(), name)
            .await?
            .and_then(|(r, _)| r.active)
            .unwrap_or(0);
        let ns = namespace(name, generation);
        let mut report = VerifyReport {
            projection: name.to_owned(),
            generation,
            ..VerifyReport::default()
        };
        let mut seen = VerifyProgress::default();
        // Stream kinds this projection handles, to map document ids back to streams in pass 2.
        let mut kinds = BTreeSet::new();
        let mut reported_at = Instant::now();
        let mut cursor = None;
        loop {
            let page = self
                .store
                .list_streams(cursor, self.config.list_page)
                .await?;
            for stream in &page.streams {
                seen.streams_done += 1;
                if !p.handles(&stream.kind) {
                    continue;
                }
                kinds.insert(stream.kind.clone());
                report.streams_checked += 1;
                self.verify_stream(p, &ns, stream, options, &mut report)
                    .await?;
                if reported_at.elapsed() >= PROGRESS_EVERY {
                    progress(seen);
                    reported_at = Instant::now();
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        progress(seen);
        self.find_extra(p, &ns, &kinds, options, &mut report)
            .await?;
        Ok(report)
    }

    /// Folds one stream and compares the result with the stored document and indexes.
    async fn verify_stream(
        &self,
        p: &dyn Projection,
        ns: &str,
        stream: &StreamId,
        options: &VerifyOptions,
        report: &mut VerifyReport,
    ) -> Result<(), ProjectError> {
        let expected = self.fold_stream(p, stream).await?;
        let doc_id = p.doc_id(stream);
        let actual = self.read.get(ns, &doc_id).await?;
        report.docs_checked += 1;
        let difference = match (&expected, actual) {
            (None, None) => None,
            (Some(_), None) => Some((DifferenceKind::Missing, "no document".to_owned())),
            (None, Some(_)) => Some((DifferenceKind::Extra, "the stream has no events".to_owned())),
            (Some(expected), Some(mut actual)) => {
                actual.remove(INDEX_PENDING_FIELD);
                let fields = field_differences(expected, &actual);
                if !fields.is_empty() {
                    Some((DifferenceKind::Different, fields))
                } else {
                    let mut missing = Vec::new();
                    for index in p.indexes(expected) {
                        if !self.read.index_contains(ns, &index, &doc_id).await? {
                            missing.push(index);
                        }
                    }
                    (!missing.is_empty()).then(|| {
                        (
                            DifferenceKind::Missing,
                            format!("not in indexes {missing:?}"),
                        )
                    })
                }
            }
        };
        let Some((kind, detail)) = difference else {
            return Ok(());
        };
        record(report, options, kind, &doc_id, detail);
        if options.repair {
            self.read.delete_doc(ns, &doc_id).await?;
            self.sync_into(stream, None, vec![(p, ns.to_owned())], &[], None)
                .await?;
            report.repaired += 1;
        }
        Ok(())
    }

    /// Verify of a derived projection (see the module docs): every source stream is folded into
    /// its source document, whose contributions ([`derive`]) are gathered per target with the
    /// domain's own [`apply_contribution`]; each target's totals (live count and every column)
    /// are compared with the stored ones in the generation its source serves, and a stored
    /// target with live entries that no source names is extra. Memory grows with the number of
    /// targets (authors, SKUs), not with events. Repair is refused: a derived projection is
    /// rebuilt with its source (`esq projections rebuild <source>`), and its per-source fence
    /// would keep a wrong entry of a higher version.
    async fn verify_derived(
        &self,
        d: &dyn Derived,
        options: &VerifyOptions,
        progress: &(dyn Fn(VerifyProgress) + Send + Sync),
    ) -> Result<VerifyReport, ProjectError> {
        if options.repair {
            return Err(ProjectError::Refused(format!(
                "{} is derived from {}: repair it by rebuilding {}",
                d.name(),
                d.source(),
                d.source()
            )));
        }
        let source = self.projection(d.source())?;
        let generation = read_record(self.read.as_ref(), source.name())
            .await?
            .and_then(|(r, _)| r.active)
            .unwrap_or(0);
        let ns = derived_namespace(
            source.name(),
            &namespace(source.name(), generation),
            d.name(),
        );
        let mut report = VerifyReport {
            projection: d.name().to_owned(),
            generation,
            ..VerifyReport::default()
        };
        let mut expected: BTreeMap<String, (Doc, Doc)> = BTreeMap::new();
        let mut seen = VerifyProgress::default();
        let mut reported_at = Instant::now();
        let mut cursor = None;
        loop {
            let page = self
                .store
                .list_streams(cursor, self.config.list_page)
                .await?;
            for stream in &page.streams {
                seen.streams_done += 1;
                if !source.handles(&stream.kind) {
                    continue;
                }
                report.streams_checked += 1;
                let Some(doc) = self.fold_stream(source, stream).await? else {
                    continue;
                };
                let id = source.doc_id(stream);
                for (target, c) in derive(d, &id, doc_version(&doc), &doc, &[]) {
                    let (totals, entries) = expected.entry(target).or_default();
                    apply_contribution(totals, entries, d.columns(), &c);
                }
                if reported_at.elapsed() >= PROGRESS_EVERY {
                    progress(seen);
                    reported_at = Instant::now();
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        progress(seen);
        let summary = |totals: &Doc| -> BTreeMap<String, String> {
            let mut m = BTreeMap::from([("count".to_owned(), live_count(totals).to_string())]);
            if live_count(totals) > 0 {
                for column in d.columns() {
                    m.insert(
                        column.name.to_owned(),
                        total(totals, column.name).to_string(),
                    );
                }
            }
            m
        };
        for (target, (totals, _)) in &expected {
            report.docs_checked += 1;
            let want = summary(totals);
            let got = self.read.get(&ns, target).await?.map(|t| summary(&t));
            let difference = match got {
                None if live_count(totals) == 0 => None,
                None => Some((DifferenceKind::Missing, "no document".to_owned())),
                Some(got) if got == want => None,
                Some(got) => Some((
                    DifferenceKind::Different,
                    format!("expected {want:?}, found {got:?}"),
                )),
            };
            if let Some((kind, detail)) = difference {
                record(&mut report, options, kind, target, detail);
            }
        }
        // Targets the read model lists (add-only) that no source names, yet count live entries.
        let mut after: Option<String> = None;
        loop {
            let ids = self
                .read
                .index_page(
                    &ns,
                    ALL_INDEX,
                    after.as_deref(),
                    self.config.list_page as usize,
                )
                .await?;
            for target in &ids {
                if expected.contains_key(target) {
                    continue;
                }
                report.docs_checked += 1;
                if let Some(t) = self.read.get(&ns, target).await? {
                    if live_count(&t) > 0 {
                        let detail = format!("no source names it, found {:?}", summary(&t));
                        record(&mut report, options, DifferenceKind::Extra, target, detail);
                    }
                }
            }
            match ids.last() {
                Some(last) if ids.len() == self.config.list_page as usize => {
                    after = Some(last.clone())
                }
                _ => break,
            }
        }
        Ok(report)
    }

    /// The document `p` makes of `stream`'s events, a page at a time; `None` without events.
    async fn fold_stream(
        &self,
        p: &dyn Projection,
        stream: &StreamId,
    ) -> Result<Option<Doc>, ProjectError> {
        // Events an operator skipped are left out, as the projector leaves them out; an event
        // that cannot be projected ends the fold there, where the projector parked the stream.
        let skipped: BTreeSet<u64> = self
            .skipped_versions(p.name(), stream)
            .await?
            .into_iter()
            .collect();
        let mut doc = Doc::new();
        let mut next = 1;
        let mut any = false;
        loop {
            let events = self
                .store
                .read(stream, ReadRequest::forwards(next, self.config.read_page))
                .await?;
            let (b, parked) = match batch_except(p, &events, |v| skipped.contains(&v)) {
                Ok(b) => (b, false),
                Err(e) => {
                    let before = events.partition_point(|ev| ev.version < e.version);
                    let prefix = &events[..before];
                    (
                        batch_except(p, prefix, |v| skipped.contains(&v))
                            .ok()
                            .flatten(),
                        true,
                    )
                }
            };
            let Some(b) = b else {
                break;
            };
            any = true;
            apply_to_doc(&mut doc, &b);
            next = b.last_version + 1;
            if parked || events.len() < self.config.read_page as usize {
                break;
            }
        }
        Ok(any.then_some(doc))
    }

    /// Pass 2: documents of the namespace that no stream of the store maps to.
    async fn find_extra(
        &self,
        p: &dyn Projection,
        ns: &str,
        kinds: &BTreeSet<String>,
        options: &VerifyOptions,
        report: &mut VerifyReport,
    ) -> Result<(), ProjectError> {
        let mut cursor: Option<String> = None;
        loop {
            let (ids, next) = self
                .read
                .doc_ids_page(ns, cursor.as_deref(), self.config.list_page as usize)
                .await?;
            for id in ids {
                if !self.has_stream(p, kinds, &id).await? {
                    record(
                        report,
                        options,
                        DifferenceKind::Extra,
                        &id,
                        "no stream maps to it".to_owned(),
                    );
                    if options.repair {
                        self.read.delete_doc(ns, &id).await?;
                        report.repaired += 1;
                    }
                }
            }
            match next {
                Some(c) => cursor = Some(c),
                None => return Ok(()),
            }
        }
    }

    /// Whether some stream with events maps to document `doc_id` of `p`: the stream of that id
    /// in one of `kinds`, or — for a projection whose ids carry the kind (`<kind>:<id>`) — the
    /// stream named by the id.
    async fn has_stream(
        &self,
        p: &dyn Projection,
        kinds: &BTreeSet<String>,
        doc_id: &str,
    ) -> Result<bool, ProjectError> {
        let mut candidates = Vec::new();
        for kind in kinds {
            candidates.push((kind.as_str(), doc_id));
            if let Some(id) = doc_id
                .strip_prefix(kind.as_str())
                .and_then(|r| r.strip_prefix(':'))
            {
                candidates.push((kind.as_str(), id));
            }
        }
        for (kind, id) in candidates {
            let Ok(stream) = StreamId::new(kind, id) else {
                continue;
            };
            if p.doc_id(&stream) == doc_id
                && !self
                    .store
                    .read(&stream, ReadRequest::forwards(1, 1))
                    .await?
                    .is_empty()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Counts a difference and keeps it as an example while there is room.
fn record(
    report: &mut VerifyReport,
    options: &VerifyOptions,
    kind: DifferenceKind,
    doc_id: &str,
    detail: String,
) {
    match kind {
        DifferenceKind::Missing => report.missing += 1,
        DifferenceKind::Extra => report.extra += 1,
        DifferenceKind::Different => report.different += 1,
    }
    if report.examples.len() < options.examples {
        report.examples.push(Difference {
            kind,
            doc_id: doc_id.to_owned(),
            detail,
        });
    }
}

/// The fields that differ, as `field: expected … actual …`, in field order.
fn field_differences(expected: &Doc, actual: &Doc) -> String {
    let fields: BTreeMap<&String, (Option<&String>, Option<&String>)> = expected
        .keys()
        .chain(actual.keys())
        .map(|k| (k, (expected.get(k), actual.get(k))))
        .filter(|(_, (e, a))| e != a)
        .collect();
    fields
        .iter()
        .map(|(k, (e, a))| format!("{k}: expected {e:?}, found {a:?}"))
        .collect::<Vec<_>>()
        .join("; ")
}
