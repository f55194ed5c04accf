//! Blue/green rebuilds: a new generation of a projection built from the whole event store while
//! the active one keeps serving, then swapped in atomically.
//!
//! 1. The generation is registered as `building` in the projection's generation record.
//! 2. The rebuild waits one `lease_ttl` (not when configured as the sole projector of its read
//!    store, as in `esq dev`): every live projector re-reads the records at each lease
//!    renewal (every `lease_ttl / lease_renewals_per_ttl`, and a projector that has not renewed for a `lease_ttl` has
//!    lost its shards), so afterwards every change is applied to the new generation too (first,
//!    before the active one).
//! 3. It streams the event store — a page of stream ids, a page of events at a time — folding
//!    each stream into the new generation behind the version fence, and records its progress in
//!    the read store about every second. A change applied meanwhile by the live projectors is a
//!    fenced no-op for the rebuild or the other way round; whatever the scan read, the live
//!    projectors apply what came after.
//! 4. It swaps the active pointer (one compare-and-set of the record): the old generation is
//!    `retired`. After a grace longer than read-svc's resolver cache, a min_version wait and a
//!    renewal interval, its keys are deleted in the background.
//!
//! Exactly one replica runs a given rebuild: the holder of lease `<prefix>:rebuild:<projection>`,
//! renewed beside the scan; losing it stops the scan (the next holder starts the scan over, a
//! fenced no-op for what is already there). The rebuild runs beside the shard loop
//! ([`Projector::run`]), so shard lease renewal never waits on it.

use crate::ops::{ProjectionStatus, RebuildProgress, RebuildState};
use crate::{ProjectError, Projector, READ_MODEL_LAYOUT};
use esq_domain::projection::Projection;
use esq_domain::StreamId;
use esq_eventstore::{now_us, ChangeFeed, EventStore};
use esq_readstore::generations::{
    derived_namespace, namespace, read_record, update_record, Resolver,
};
use esq_readstore::{Coordination, ReadError, ReadStore};
use futures::StreamExt;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a running rebuild records its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Every projection with its active generation, rebuild and parked count; then every
    /// derived projection, with its source's generation and rebuild.
    pub async fn projections_status(&self) -> Result<Vec<ProjectionStatus>, ProjectError> {
        let mut out = Vec::with_capacity(self.projections.len() + self.derived.len());
        for p in &self.projections {
            let name = p.name();
            let record = read_record(self.read.as_ref(), name).await?;
            out.push(ProjectionStatus {
                name: name.to_owned(),
                active_generation: record.and_then(|(r, _)| r.active),
                rebuild: self.rebuild_progress(name).await?,
                parked: self.parked_count(name).await?,
                derived_from: None,
            });
        }
        for d in &self.derived {
            let Some(source) = out.iter().find(|s| s.name == d.source()).cloned() else {
                continue;
            };
            out.push(ProjectionStatus {
                name: d.name().to_owned(),
                parked: 0,
                derived_from: Some(source.name.clone()),
                ..source
            });
        }
        Ok(out)
    }

    /// Asks for a rebuild of `projection` into a new generation; whichever replica takes the
    /// rebuild lease runs it. A rebuild already requested or running is not started twice.
    pub async fn request_rebuild(&self, projection: &str) -> Result<RebuildProgress, ProjectError> {
        let p = self.projection(projection)?;
        let record = update_record(self.read.as_ref(), p.name(), |r| {
            if r.requested || r.building.is_some() {
                return false;
            }
            r.requested = true;
            true
        })
        .await?;
        if let Some(progress) = self.rebuild_progress(projection).await? {
            if matches!(progress.state, RebuildState::Building)
                && record.building == Some(progress.generation)
            {
                return Ok(progress);
            }
        }
        let progress = RebuildProgress {
            generation: record.building.unwrap_or(record.last + 1),
            state: RebuildState::Requested,
            streams_done: 0,
            streams_total: None,
            events_done: 0,
            events_total: None,
            started_at_us: 0,
            updated_at_us: now_us(),
            owner: String::new(),
            error: None,
        };
        self.save_progress(projection, &progress).await?;
        Ok(progress)
    }

    /// The rebuild of `projection` in progress, or the last one.
    pub async fn rebuild_progress(
        &self,
        projection: &str,
    ) -> Result<Option<RebuildProgress>, ProjectError> {
        let p = self.projection(projection)?;
        let raw = self.read.checkpoint(&self.progress_name(p.name())).await?;
        Ok(raw.as_deref().and_then(decode_progress))
    }

    pub(crate) fn projection(&self, name: &str) -> Result<&dyn Projection, ProjectError> {
        self.projections
            .iter()
            .find(|p| p.name() == name)
            .map(|p| p.as_ref())
            .ok_or_else(|| ProjectError::UnknownProjection(name.to_owned()))
    }

    fn progress_name(&self, projection: &str) -> String {
        format!(
            "{}:rebuild-progress:{projection}",
            self.config.checkpoint_prefix
        )
    }

    fn rebuild_lease(&self, projection: &str) -> String {
        format!("{}:rebuild:{projection}", self.config.checkpoint_prefix)
    }

    async fn save_progress(
        &self,
        projection: &str,
        progress: &RebuildProgress,
    ) -> Result<(), ReadError> {
        self.read
            .save_checkpoint(&self.progress_name(projection), &encode_progress(progress))
            .await
    }

    /// How often leases are renewed and generation records re-read.
    fn renewal_interval(&self) -> Duration {
        self.config.lease_ttl / self.config.lease_renewals_per_ttl.max(1)
    }

    /// How long a retired generation's keys are kept after the swap: past every reader's
    /// cached resolution (plus a whole min_version wait) and past every projector's next
    /// renewal, after which nobody writes or reads it.
    fn deletion_grace(&self) -> Duration {
        self.config.lease_ttl + Resolver::<R>::TTL * 2 + Duration::from_secs(5)
    }

    /// Runs the rebuilds that are due (requested, interrupted, or for an older layout) and the
    /// deletions of retired generations, whenever this replica holds their lease, until
    /// `shutdown`. Checks every `lease_ttl / lease_renewals_per_ttl`.
    pub(crate) async fn rebuild_loop(&self, shutdown: CancellationToken) {
        let every = self.renewal_interval();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            // Every projection's rebuild runs concurrently with the others (each under its own
            // lease), so one long rebuild does not hold up another.
            let rounds = self
                .projections
                .iter()
                .map(|p| self.rebuild_if_due(p.name(), &shutdown));
            futures::future::join_all(rounds).await;
            self.fill_derived_if_due(&shutdown).await;
        }
    }

    /// One round of filling the derived projections not built yet in their source's active
    /// generation (newly registered ones), each by the one replica holding its lease.
    async fn fill_derived_if_due(&self, shutdown: &CancellationToken) {
        let due = match self.derived_due().await {
            Ok(due) => due,
            Err(e) => {
                return tracing::warn!(error = %e, "cannot read the derived fill markers");
            }
        };
        for (d, generation) in due {
            let lease = format!(
                "{}:derived-fill:{}",
                self.config.checkpoint_prefix,
                d.name()
            );
            match self
                .with_lease(&lease, self.fill_derived(d.as_ref(), generation), shutdown)
                .await
            {
                Ok(Some(Ok(()))) | Ok(None) => {}
                Ok(Some(Err(e))) | Err(e) => {
                    tracing::warn!(derived = d.name(), error = %e, "derived fill failed; retrying later");
                }
            }
        }
    }

    /// One round of [`Projector::rebuild_loop`] for `name`.
    async fn rebuild_if_due(&self, name: &str, shutdown: &CancellationToken) {
        let due = match read_record(self.read.as_ref(), name).await {
            Ok(Some((r, _))) => {
                r.requested
                    || r.building.is_some()
                    || !r.retired.is_empty()
                    || r.layout != READ_MODEL_LAYOUT
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read generation records");
                false
            }
        };
        if !due {
            return;
        }
        let lease = self.rebuild_lease(name);
        match self.with_lease(&lease, self.rebuild(name), shutdown).await {
            Ok(Some(Ok(()))) | Ok(None) => {}
            Ok(Some(Err(e))) | Err(e) => {
                tracing::warn!(projection = name, error = %e, "rebuild failed; retrying later");
                let failed = RebuildProgress {
                    state: RebuildState::Failed,
                    error: Some(e.to_string()),
                    updated_at_us: now_us(),
                    ..self
                        .rebuild_progress(name)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_else(|| empty_progress(&self.config.owner))
                };
                let _ = self.save_progress(name, &failed).await;
            }
        }
    }

    /// Runs `work` while this replica holds lease `name`, renewing it every `lease_ttl / lease_renewals_per_ttl`;
    /// `Ok(None)` if the lease is held by another replica, or was lost (the work is dropped).
    async fn with_lease<T>(
        &self,
        name: &str,
        work: impl std::future::Future<Output = T>,
        shutdown: &CancellationToken,
    ) -> Result<Option<T>, ProjectError> {
        let (owner, ttl) = (&self.config.owner, self.config.lease_ttl);
        if !self.read.acquire_lease(name, owner, ttl).await? {
            return Ok(None);
        }
        let renew = async {
            loop {
                tokio::time::sleep(self.renewal_interval()).await;
                match self.read.acquire_lease(name, owner, ttl).await {
                    Ok(true) => {}
                    Ok(false) => return tracing::warn!(lease = name, "rebuild lease lost"),
                    Err(e) => {
                        tracing::warn!(lease = name, error = %e, "cannot renew the rebuild lease")
                    }
                }
            }
        };
        let outcome = tokio::select! {
            out = work => Some(out),
            () = renew => None,
            () = shutdown.cancelled() => None,
        };
        let _ = self.read.release_lease(name, owner).await;
        Ok(outcome)
    }

    /// The rebuild of `projection` as described in the module docs, from wherever its record
    /// stands (a rebuild interrupted midway starts its scan over into the same generation).
    async fn rebuild(&self, projection: &str) -> Result<(), ProjectError> {
        let p = self.projection(projection)?;
        let record = update_record(self.read.as_ref(), projection, |r| {
            if r.building.is_some() {
                return false;
            }
            if !r.requested && r.layout == READ_MODEL_LAYOUT {
                return false; // only deletions are due
            }
            r.last += 1;
            r.building = Some(r.last);
            r.requested = false;
            true
        })
        .await?;
        if let Some(generation) = record.building {
            self.targets.set(projection, &record);
            let started = now_us();
            let mut progress = RebuildProgress {
                generation,
                state: RebuildState::Building,
                started_at_us: started,
                updated_at_us: started,
                ..empty_progress(&self.config.owner)
            };
            self.save_progress(projection, &progress).await?;
            tracing::info!(
                projection,
                generation,
                "rebuild: waiting for every projector to write to the new generation"
            );
            if !self.config.sole_projector {
                tokio::time::sleep(self.config.lease_ttl).await;
            }
            progress.streams_total = Some(self.count_streams().await?);
            let epoch = self.replication_epoch();
            self.scan_into(p, &namespace(projection, generation), &mut progress)
                .await?;
            // The swap and the derived fill markers vouch for every apply of the scan.
            self.ensure_replicated(epoch).await?;
            let swapped = update_record(self.read.as_ref(), projection, |r| {
                if r.building != Some(generation) {
                    return false;
                }
                if let Some(old) = r.active {
                    r.retired.push(old);
                }
                r.active = Some(generation);
                r.building = None;
                r.layout = READ_MODEL_LAYOUT;
                true
            })
            .await?;
            if swapped.active != Some(generation) {
                return Err(ReadError::Internal(format!(
                    "generation record of {projection} changed during the rebuild: {swapped:?}"
                ))
                .into());
            }
            self.targets.set(projection, &swapped);
            // The scan and the dual writes built the derived projections in this generation.
            self.mark_derived_filled(projection, generation).await?;
            tracing::info!(
                projection,
                generation,
                streams = progress.streams_done,
                events = progress.events_done,
                "rebuild: swapped"
            );
            progress.state = RebuildState::Swapped;
            progress.updated_at_us = now_us();
            self.save_progress(projection, &progress).await?;
            // The old generation is deleted by a later round, once the grace has passed.
            return Ok(());
        }
        let grace_us = i64::try_from(self.deletion_grace().as_micros()).unwrap_or(i64::MAX);
        if let Some(p) = self.rebuild_progress(projection).await? {
            if p.state == RebuildState::Swapped && now_us() - p.updated_at_us < grace_us {
                return Ok(());
            }
        }
        self.delete_retired(projection).await?;
        if let Some(mut progress) = self.rebuild_progress(projection).await? {
            if progress.state == RebuildState::Swapped {
                progress.state = RebuildState::Done;
                progress.updated_at_us = now_us();
                self.save_progress(projection, &progress).await?;
            }
        }
        Ok(())
    }

    /// Deletes the keys of every retired generation of `projection`, then forgets it.
    async fn delete_retired(&self, projection: &str) -> Result<(), ProjectError> {
        let retired = read_record(self.read.as_ref(), projection)
            .await?
            .map(|(r, _)| r.retired)
            .unwrap_or_default();
        for old in retired {
            let ns = namespace(projection, old);
            let mut keys = self.read.delete_namespace(&ns).await?;
            // The derived projections of the source live in its generations.
            for d in self.derived.iter().filter(|d| d.source() == projection) {
                let dns = derived_namespace(projection, &ns, d.name());
                keys += self.read.delete_namespace(&dns).await?;
            }
            tracing::info!(
                projection,
                generation = old,
                keys,
                "retired generation deleted"
            );
            update_record(self.read.as_ref(), projection, |r| {
                let before = r.retired.len();
                r.retired.retain(|g| *g != old);
                r.retired.len() != before
            })
            .await?;
        }
        Ok(())
    }

    /// Counts the streams of the store (one pass over the stream ids, no events).
    async fn count_streams(&self) -> Result<u64, ProjectError> {
        let mut cursor = None;
        let mut n = 0;
        loop {
            let page = self
                .store
                .list_streams(cursor, self.config.list_page)
                .await?;
            n += page.streams.len() as u64;
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(n),
            }
        }
    }

    /// One stream of [`Projector::scan_into`]: the events the generation covers for it after
    /// the sync (0 for a stream `p` does not handle).
    async fn scan_stream(
        &self,
        p: &dyn Projection,
        ns: &str,
        pairs: &[(&dyn Projection, String)],
        stream: &StreamId,
    ) -> Result<u64, ProjectError> {
        if !p.handles(&stream.kind) {
            return Ok(0);
        }
        let _permit = self.syncs.acquire().await.map_err(|_| {
            ProjectError::Read(ReadError::Internal("projector shut down".to_owned()))
        })?;
        self.sync_into(stream, None, pairs.to_vec(), &[], None)
            .await?;
        Ok(self.read.version(ns, &p.doc_id(stream)).await?)
    }

    /// Folds every stream `p` handles into namespace `ns`, recording progress about every
    /// second.
    async fn scan_into(
        &self,
        p: &dyn Projection,
        ns: &str,
        progress: &mut RebuildProgress,
    ) -> Result<(), ProjectError> {
        let projection = p.name();
        let pairs = [(p, ns.to_owned())];
        let mut cursor = None;
        let mut saved_at = Instant::now();
        let metrics = esq_runtime::metrics::projector();
        metrics.rebuild_started(projection);
        loop {
            let page = self
                .store
                .list_streams(cursor, self.config.list_page)
                .await?;
            // The page's streams concurrently (bounded by the projector's sync permits, shared
            // with the shards): memory holds one page of ids and at most `sync_concurrency`
            // streams' event pages.
            let scans: Vec<_> = page
                .streams
                .iter()
                .map(|stream| self.scan_stream(p, ns, &pairs, stream))
                .collect();
            let mut scans =
                futures::stream::iter(scans).buffered(self.config.sync_concurrency.max(1));
            while let Some(events) = scans.next().await {
                progress.events_done += events?;
                progress.streams_done += 1;
                if saved_at.elapsed() >= PROGRESS_EVERY {
                    metrics.rebuild_progress(projection, progress.streams_done);
                    progress.updated_at_us = now_us();
                    self.save_progress(projection, progress).await?;
                    saved_at = Instant::now();
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        metrics.rebuild_progress(projection, progress.streams_done);
        progress.updated_at_us = now_us();
        self.save_progress(projection, progress).await?;
        Ok(())
    }
}

fn empty_progress(owner: &str) -> RebuildProgress {
    RebuildProgress {
        generation: 0,
        state: RebuildState::Requested,
        streams_done: 0,
        streams_total: None,
        events_done: 0,
        events_total: None,
        started_at_us: 0,
        updated_at_us: 0,
        owner: owner.to_owned(),
        error: None,
    }
}

fn state_name(state: RebuildState) -> &'static str {
    match state {
        RebuildState::Requested => "requested",
        RebuildState::Building => "building",
        RebuildState::Swapped => "swapped",
        RebuildState::Done => "done",
        RebuildState::Failed => "failed",
    }
}

fn encode_progress(p: &RebuildProgress) -> String {
    serde_json::json!({
        "generation": p.generation,
        "state": state_name(p.state),
        "streams_done": p.streams_done,
        "streams_total": p.streams_total,
        "events_done": p.events_done,
        "events_total": p.events_total,
        "started_at_us": p.started_at_us,
        "updated_at_us": p.updated_at_us,
        "owner": p.owner,
        "error": p.error,
    })
    .to_string()
}

fn decode_progress(raw: &str) -> Option<RebuildProgress> {
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    let state = match v.get("state")?.as_str()? {
        "requested" => RebuildState::Requested,
        "building" => RebuildState::Building,
        "swapped" => RebuildState::Swapped,
        "done" => RebuildState::Done,
        _ => RebuildState::Failed,
    };
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    let i = |k: &str| v.get(k).and_then(serde_json::Value::as_i64).unwrap_or(0);
    Some(RebuildProgress {
        generation: u32::try_from(n("generation")?).ok()?,
        state,
        streams_done: n("streams_done").unwrap_or(0),
        streams_total: n("streams_total"),
        events_done: n("events_done").unwrap_or(0),
        events_total: n("events_total"),
        started_at_us: i("started_at_us"),
        updated_at_us: i("updated_at_us"),
        owner: v.get("owner")?.as_str()?.to_owned(),
        error: v.get("error").and_then(|e| e.as_str()).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{DifferenceKind, VerifyOptions};
    use crate::testing::{cart, setup};
    use crate::Config;
    use esq_domain::projection::{FieldOp, VERSION_FIELD};
    use esq_domain::{ExpectedVersion, NewEvent};
    use esq_readstore::contract::fields;
    use std::sync::Arc;

    fn item(sku: &str) -> NewEvent {
        NewEvent::json(
            "ItemAdded",
            2,
            &serde_json::json!({"sku": sku, "quantity": 1, "unit_price_cents": 3}),
        )
    }

    fn verify_options(repair: bool) -> VerifyOptions {
        VerifyOptions {
            projection: "cart2".to_owned(),
            examples: 10,
            repair,
        }
    }

    #[tokio::test]
    async fn rebuild_restores_a_lost_read_model() {
        let (_dir, store, feed, read) = setup(1).await;
        for i in 0..3 {
            for sku in ["a", "b"] {
                store
                    .append(&cart(&format!("c{i}")), ExpectedVersion::Any, &[item(sku)])
                    .await
                    .expect("append");
            }
        }
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.catch_up().await.expect("rebuild");
        for i in 0..3 {
            let id = format!("c{i}");
            assert_eq!(read.version("cart2:g1", &id).await.expect("v"), 2);
            assert_eq!(
                read.version("state:g1", &format!("cart:{id}"))
                    .await
                    .expect("v"),
                2
            );
        }
        let doc = read.get("cart2:g1", "c0").await.expect("get").expect("doc");
        assert_eq!(esq_domain::cart::CartView::from_doc(&doc).total_cents, 6);
    }

    /// A requested rebuild builds generation 2 beside the serving generation 1 — including what
    /// is written meanwhile — swaps it in, deletes generation 1, and verify finds them equal.
    #[tokio::test]
    async fn blue_green_rebuild_swaps_in_a_complete_generation() {
        let (_dir, store, feed, read) = setup(1).await;
        for i in 0..20 {
            store
                .append(&cart(&format!("c{i}")), ExpectedVersion::Any, &[item("a")])
                .await
                .expect("append");
        }
        let config = Config {
            lease_ttl: Duration::from_millis(300),
            owner: "builder".to_owned(),
            ..Config::default()
        };
        let p = Arc::new(Projector::new(store.clone(), feed, read.clone(), config));
        p.catch_up().await.expect("catch up");
        let requested = p.request_rebuild("cart2").await.expect("request");
        assert_eq!(
            (requested.state, requested.generation),
            (RebuildState::Requested, 2)
        );
        assert!(matches!(
            p.request_rebuild("nope").await,
            Err(ProjectError::UnknownProjection(_))
        ));
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let (p, shutdown) = (Arc::clone(&p), shutdown.clone());
            async move {
                p.run(Arc::new(tokio::sync::Notify::new()), None, shutdown)
                    .await
            }
        });
        // Writes while the rebuild runs, applied the way the live projector applies them.
        let mut written = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stream = cart(&format!("c{}", written % 25));
            store
                .append(&stream, ExpectedVersion::Any, &[item("w")])
                .await
                .expect("append");
            p.sync(&stream, None).await.expect("sync");
            written += 1;
            let progress = p.rebuild_progress("cart2").await.expect("progress");
            if progress
                .as_ref()
                .is_some_and(|p| p.state == RebuildState::Done)
            {
                break;
            }
            assert!(Instant::now() < deadline, "rebuild not done: {progress:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        running.await.expect("run");
        let (record, _) = read_record(read.as_ref(), "cart2")
            .await
            .expect("record")
            .expect("some");
        assert_eq!((record.active, record.building), (Some(2), None));
        assert!(record.retired.is_empty(), "{record:?}");
        let (old, _) = read.doc_ids_page("cart2:g1", None, 10).await.expect("page");
        assert!(old.is_empty(), "generation 1 deleted: {old:?}");
        let progress = p.rebuild_progress("cart2").await.expect("p").expect("some");
        // Counted when the scan started; streams created later reached generation 2 through
        // the live writes (verify below covers all 25).
        let total = progress.streams_total.expect("total");
        assert!((20..=25).contains(&total), "{progress:?}");
        assert!(progress.streams_done >= total, "{progress:?}");
        let report = p
            .verify(&verify_options(false), &|_| {})
            .await
            .expect("verify");
        assert!(report.is_clean(), "{report:?}");
        assert_eq!((report.generation, report.streams_checked), (2, 25));
        assert!(written > 0);
    }

    /// The upgrade from the layout before generations: the old keys keep serving as generation
    /// 0 while generation 1 is built, then are deleted.
    #[tokio::test]
    async fn the_pre_generation_layout_is_rebuilt_into_generation_one() {
        let (_dir, store, feed, read) = setup(1).await;
        for i in 0..4 {
            store
                .append(&cart(&format!("c{i}")), ExpectedVersion::Any, &[item("a")])
                .await
                .expect("append");
        }
        // What a projector of the old layout left: documents under the bare name, its marker.
        let legacy = fields(1, 1, vec![FieldOp::Set("old".to_owned(), "1".to_owned())]);
        for i in 0..4 {
            read.apply("cart2", &format!("c{i}"), &legacy)
                .await
                .expect("apply");
        }
        read.save_checkpoint("projector:marker:2", "old")
            .await
            .expect("marker");
        let config = Config {
            lease_ttl: Duration::from_millis(300),
            ..Config::default()
        };
        let p = Arc::new(Projector::new(store.clone(), feed, read.clone(), config));
        p.refresh_generations(false).await.expect("generations");
        let (record, _) = read_record(read.as_ref(), "cart2")
            .await
            .expect("r")
            .expect("some");
        assert_eq!(
            (record.active, record.requested),
            (Some(0), true),
            "{record:?}"
        );
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let (p, shutdown) = (Arc::clone(&p), shutdown.clone());
            async move {
                p.run(Arc::new(tokio::sync::Notify::new()), None, shutdown)
                    .await
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let progress = p.rebuild_progress("cart2").await.expect("progress");
            if progress
                .as_ref()
                .is_some_and(|p| p.state == RebuildState::Done)
            {
                break;
            }
            assert!(Instant::now() < deadline, "upgrade not done: {progress:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        running.await.expect("run");
        let (record, _) = read_record(read.as_ref(), "cart2")
            .await
            .expect("r")
            .expect("some");
        assert_eq!(
            (record.active, record.building),
            (Some(1), None),
            "{record:?}"
        );
        let (old, _) = read.doc_ids_page("cart2", None, 10).await.expect("page");
        assert!(old.is_empty(), "old keys deleted: {old:?}");
        let report = p
            .verify(&verify_options(false), &|_| {})
            .await
            .expect("verify");
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.streams_checked, 4);
    }

    /// Verify reports a missing, a different and an extra document; repair fixes all three.
    #[tokio::test]
    async fn verify_finds_differences_and_repair_fixes_them() {
        let (_dir, store, feed, read) = setup(1).await;
        for i in 0..5 {
            for sku in ["a", "b"] {
                store
                    .append(&cart(&format!("c{i}")), ExpectedVersion::Any, &[item(sku)])
                    .await
                    .expect("append");
            }
        }
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.catch_up().await.expect("catch up");
        assert!(p
            .verify(&verify_options(false), &|_| {})
            .await
            .expect("verify")
            .is_clean());
        read.delete_doc("cart2:g1", "c1").await.expect("delete");
        read.delete_doc("cart2:g1", "c2").await.expect("delete");
        let forged = fields(
            1,
            2,
            vec![FieldOp::Set("line:a".to_owned(), "7".to_owned())],
        );
        read.apply("cart2:g1", "c2", &forged).await.expect("forge");
        read.apply("cart2:g1", "ghost", &fields(1, 1, vec![]))
            .await
            .expect("extra");
        let calls = std::sync::atomic::AtomicU64::new(0);
        let report = p
            .verify(&verify_options(false), &|_| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .await
            .expect("verify");
        assert!(calls.into_inner() >= 1);
        assert_eq!(
            (report.missing, report.different, report.extra),
            (1, 1, 1),
            "{report:?}"
        );
        assert_eq!(report.repaired, 0);
        let kinds: Vec<_> = report
            .examples
            .iter()
            .map(|d| (d.kind, d.doc_id.as_str()))
            .collect();
        assert!(
            kinds.contains(&(DifferenceKind::Missing, "c1")),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&(DifferenceKind::Different, "c2")),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&(DifferenceKind::Extra, "ghost")),
            "{kinds:?}"
        );
        let different = report
            .examples
            .iter()
            .find(|d| d.doc_id == "c2")
            .expect("c2");
        assert!(different.detail.contains("line:a"), "{}", different.detail);
        let repaired = p
            .verify(&verify_options(true), &|_| {})
            .await
            .expect("repair");
        assert_eq!(repaired.repaired, 3);
        let after = p
            .verify(&verify_options(false), &|_| {})
            .await
            .expect("verify");
        assert!(after.is_clean(), "{after:?}");
        let doc = read.get("cart2:g1", "c2").await.expect("get").expect("doc");
        assert_eq!(doc.get(VERSION_FIELD).map(String::as_str), Some("2"));
    }

    /// A derived projection is verified from the contributions of the folded sources: a forged
    /// entry makes a target different, a target no source names is extra; repair is refused
    /// (the source is rebuilt instead).
    #[tokio::test]
    async fn verify_of_a_derived_projection_compares_the_totals() {
        use esq_domain::authors::AuthorsProjection;
        use esq_domain::derived::{Contribution, Derived};
        use esq_domain::StreamId;
        let (_dir, store, feed, read) = setup(1).await;
        for (isbn, author, price) in [
            ("9780441478125", "A", 100),
            ("9780261103573", "A", 300),
            ("9780553293357", "B", 200),
        ] {
            let created = NewEvent::json(
                "BookCreated",
                1,
                &serde_json::json!({"isbn": isbn, "title": "T", "author": author, "price_cents": price}),
            );
            store
                .append(
                    &StreamId::new("book", isbn).expect("stream"),
                    ExpectedVersion::NoStream,
                    &[created],
                )
                .await
                .expect("append");
        }
        let p = Projector::new(store.clone(), feed, read.clone(), Config::default());
        p.catch_up().await.expect("catch up");
        let options = |repair| VerifyOptions {
            projection: "authors".to_owned(),
            examples: 10,
            repair,
        };
        let clean = p.verify(&options(false), &|_| {}).await.expect("verify");
        assert!(clean.is_clean(), "{clean:?}");
        assert_eq!((clean.docs_checked, clean.streams_checked), (2, 3));

        let columns = AuthorsProjection.columns();
        let forged = Contribution {
            source: "9999999999999".to_owned(),
            version: 1,
            values: Some(vec![1, 5, 5]),
        };
        assert!(read
            .contribute("authors:g1", "A", columns, &forged)
            .await
            .expect("forge"));
        read.contribute("authors:g1", "C", columns, &forged)
            .await
            .expect("extra");
        read.update_indexes("authors:g1", "C", &["all".to_owned()], &[], "")
            .await
            .expect("list");
        let report = p.verify(&options(false), &|_| {}).await.expect("verify");
        assert_eq!(
            (report.missing, report.different, report.extra),
            (0, 1, 1),
            "{report:?}"
        );
        let kinds: Vec<_> = report
            .examples
            .iter()
            .map(|d| (d.kind, d.doc_id.as_str()))
            .collect();
        assert!(
            kinds.contains(&(DifferenceKind::Different, "A")),
            "{kinds:?}"
        );
        assert!(kinds.contains(&(DifferenceKind::Extra, "C")), "{kinds:?}");
        assert!(matches!(
            p.verify(&options(true), &|_| {}).await,
            Err(ProjectError::Refused(_))
        ));
    }

    #[test]
    fn progress_round_trips() {
        let p = RebuildProgress {
            generation: 3,
            state: RebuildState::Swapped,
            streams_done: 10,
            streams_total: Some(12),
            events_done: 99,
            events_total: None,
            started_at_us: 5,
            updated_at_us: 7,
            owner: "a".to_owned(),
            error: Some("x".to_owned()),
        };
        assert_eq!(decode_progress(&encode_progress(&p)), Some(p));
    }
}
