//! `esq.v1.Projections`: the operator's gRPC API of the projections (status, shard freshness,
//! rebuild, verify, parked streams), a thin layer over the [`Projector`]'s operator methods.
//!
//! It validates requests (INVALID_ARGUMENT naming the field, NOT_FOUND for a projection name
//! the projector does not have), converts [`crate::ops`] types to their wire form and maps
//! [`ProjectError`]s onto statuses. It keeps no state of its own: every answer comes from the
//! read store through the projector, so any replica answers the same. The projector binary
//! serves it on its `--listen` port; `esq dev` mounts it next to read-svc.

use crate::ops::{
    Difference, DifferenceKind, ParkedStream, ProjectionStatus, RebuildProgress, RebuildState,
    RetryOutcome, ShardStatus, VerifyOptions, VerifyProgress, VerifyReport,
};
use crate::{ProjectError, Projector};
use esq::convert::{status_from_domain, stream_id, stream_ref, timestamp};
use esq::pb::v1 as pb;
use esq::pb::v1::projections_server::{Projections, ProjectionsServer};
use esq_eventstore::{ChangeFeed, EventStore, StoreError};
use esq_readstore::{Coordination, ReadError, ReadStore};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The fully-qualified name of the service, for health checks and reflection.
pub const SERVICE: &str = "esq.v1.Projections";

/// Differences reported in full when a verify request asks for 0.
pub const DEFAULT_EXAMPLES: u32 = 10;
/// The most differences a verify request may ask to see in full.
pub const MAX_EXAMPLES: u32 = 1000;
/// Parked streams listed when a request asks for 0.
pub const DEFAULT_PARKED_LIMIT: u32 = 100;
/// The most parked streams one ListParked call returns.
pub const MAX_PARKED_LIMIT: u32 = 1000;
/// How often WatchRebuild reads the rebuild's progress.
pub const WATCH_POLL: Duration = Duration::from_millis(250);
/// How often Verify sends a progress message (when there is progress to report).
pub const VERIFY_PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Messages buffered per streaming call: a slow client holds back the server, not its memory.
const STREAM_BUFFER: usize = 8;

/// `esq.v1.Projections` over a projector.
pub struct ProjectionsApi<E, F, R> {
    projector: Arc<Projector<E, F, R>>,
}

impl<E, F, R> ProjectionsApi<E, F, R> {
    /// The service over `projector` (which may be running: every method takes `&self`).
    pub fn new(projector: Arc<Projector<E, F, R>>) -> Self {
        Self { projector }
    }
}

/// The service ready to be added to a server's routes.
pub fn server<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination>(
    projector: Arc<Projector<E, F, R>>,
) -> ProjectionsServer<ProjectionsApi<E, F, R>> {
    ProjectionsServer::new(ProjectionsApi::new(projector))
}

/// The one mapping from projector errors to statuses.
pub fn status_from_project(e: ProjectError) -> Status {
    match e {
        ProjectError::UnknownProjection(name) => {
            Status::not_found(format!("no projection named {name:?}"))
        }
        ProjectError::Refused(why) => Status::failed_precondition(why),
        ProjectError::Read(ReadError::Unavailable(cause))
        | ProjectError::Store(StoreError::Unavailable(cause)) => {
            tracing::warn!(%cause, "a store is unavailable");
            Status::unavailable("a backing store is unavailable; retry later")
        }
        e => {
            tracing::error!(error = %e, "projections admin call failed");
            Status::internal("internal error")
        }
    }
}

/// Checks a required projection name: INVALID_ARGUMENT when empty, FAILED_PRECONDITION naming
/// the source for a derived projection (rebuilt, parked and retried with its source), NOT_FOUND
/// when the projector has no projection of that name.
fn projection_name<E, F, R>(projector: &Projector<E, F, R>, name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("projection: is required"));
    }
    if projector.projections.iter().any(|p| p.name() == name) {
        Ok(())
    } else if let Some(d) = projector.derived.iter().find(|d| d.name() == name) {
        Err(status_from_project(ProjectError::Refused(format!(
            "{name} is derived from {source}: operate on {source}, whose generations carry {name}",
            source = d.source()
        ))))
    } else {
        Err(status_from_project(ProjectError::UnknownProjection(
            name.to_owned(),
        )))
    }
}

/// A count from a request: `default` for 0, INVALID_ARGUMENT naming `field` above `max`.
fn bounded(field: &str, value: u32, default: u32, max: u32) -> Result<u32, Status> {
    match value {
        0 => Ok(default),
        v if v > max => Err(Status::invalid_argument(format!(
            "{field}: is {v}, at most {max} allowed"
        ))),
        v => Ok(v),
    }
}

fn timestamp_opt(us: i64) -> Option<prost_types::Timestamp> {
    (us > 0).then(|| timestamp(us))
}

/// The wire form of a rebuild state.
pub fn rebuild_state(s: RebuildState) -> pb::RebuildState {
    match s {
        RebuildState::Requested => pb::RebuildState::Requested,
        RebuildState::Building => pb::RebuildState::Building,
        RebuildState::Swapped => pb::RebuildState::Swapped,
        RebuildState::Done => pb::RebuildState::Done,
        RebuildState::Failed => pb::RebuildState::Failed,
    }
}

/// The wire form of a rebuild's progress.
pub fn rebuild_progress(projection: &str, p: &RebuildProgress) -> pb::RebuildProgress {
    pb::RebuildProgress {
        projection: projection.to_owned(),
        generation: p.generation,
        state: rebuild_state(p.state) as i32,
        streams_done: p.streams_done,
        streams_total: p.streams_total,
        events_done: p.events_done,
        events_total: p.events_total,
        started_at: timestamp_opt(p.started_at_us),
        updated_at: timestamp_opt(p.updated_at_us),
        owner: p.owner.clone(),
        error: p.error.clone().unwrap_or_default(),
        events_per_second: p.rate(),
        eta_seconds: p.eta_seconds(),
    }
}

/// The wire form of a projection's status.
pub fn projection(s: &ProjectionStatus) -> pb::Projection {
    pb::Projection {
        name: s.name.clone(),
        active_generation: s.active_generation,
        rebuild: s.rebuild.as_ref().map(|r| rebuild_progress(&s.name, r)),
        parked: s.parked,
        derived_from: s.derived_from.clone().unwrap_or_default(),
    }
}

/// The wire form of a shard's freshness.
pub fn shard(s: &ShardStatus) -> pb::ShardStatus {
    pb::ShardStatus {
        shard: s.shard,
        owner: s.owner.clone().unwrap_or_default(),
        checkpoint_age_seconds: s.checkpoint_age_seconds,
        changes_behind: s.changes_behind,
        seconds_behind: s.seconds_behind,
        updated_at: timestamp_opt(s.updated_at_us),
    }
}

/// The wire form of a parked stream.
pub fn parked(p: &ParkedStream) -> pb::ParkedStream {
    pb::ParkedStream {
        projection: p.projection.clone(),
        stream: Some(stream_ref(&p.stream)),
        version: p.version,
        reason: p.reason.clone(),
        parked_at: timestamp_opt(p.parked_at_us),
    }
}

fn difference(d: &Difference) -> pb::Difference {
    let kind = match d.kind {
        DifferenceKind::Missing => pb::DifferenceKind::Missing,
        DifferenceKind::Extra => pb::DifferenceKind::Extra,
        DifferenceKind::Different => pb::DifferenceKind::Different,
    };
    pb::Difference {
        kind: kind as i32,
        doc_id: d.doc_id.clone(),
        detail: d.detail.clone(),
    }
}

/// The wire form of a verify report.
pub fn verify_report(r: &VerifyReport) -> pb::VerifyReport {
    pb::VerifyReport {
        projection: r.projection.clone(),
        generation: r.generation,
        streams_checked: r.streams_checked,
        docs_checked: r.docs_checked,
        missing: r.missing,
        extra: r.extra,
        different: r.different,
        repaired: r.repaired,
        examples: r.examples.iter().map(difference).collect(),
        clean: r.is_clean(),
    }
}

fn verify_progress(p: VerifyProgress) -> pb::VerifyResponse {
    pb::VerifyResponse {
        message: Some(pb::verify_response::Message::Progress(pb::VerifyProgress {
            streams_done: p.streams_done,
            streams_total: p.streams_total,
        })),
    }
}

fn finished(state: RebuildState) -> bool {
    matches!(state, RebuildState::Done | RebuildState::Failed)
}

type Streamed<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projections
    for ProjectionsApi<E, F, R>
{
    async fn list_projections(
        &self,
        _request: Request<pb::ListProjectionsRequest>,
    ) -> Result<Response<pb::ListProjectionsResponse>, Status> {
        let all = self
            .projector
            .projections_status()
            .await
            .map_err(status_from_project)?;
        Ok(Response::new(pb::ListProjectionsResponse {
            projections: all.iter().map(projection).collect(),
        }))
    }

    async fn get_projection(
        &self,
        request: Request<pb::GetProjectionRequest>,
    ) -> Result<Response<pb::GetProjectionResponse>, Status> {
        let name = request.into_inner().projection;
        if name.is_empty() {
            return Err(Status::invalid_argument("projection: is required"));
        }
        // Also a derived projection's name (the listing includes them).
        let all = self
            .projector
            .projections_status()
            .await
            .map_err(status_from_project)?;
        let one = all
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| status_from_project(ProjectError::UnknownProjection(name.clone())))?;
        let shards = self
            .projector
            .shard_status()
            .await
            .map_err(status_from_project)?;
        Ok(Response::new(pb::GetProjectionResponse {
            projection: Some(projection(one)),
            shards: shards.iter().map(shard).collect(),
        }))
    }

    async fn rebuild(
        &self,
        request: Request<pb::RebuildRequest>,
    ) -> Result<Response<pb::RebuildProgress>, Status> {
        let name = request.into_inner().projection;
        projection_name(&self.projector, &name)?;
        let progress = self
            .projector
            .request_rebuild(&name)
            .await
            .map_err(status_from_project)?;
        tracing::info!(projection = %name, generation = progress.generation, "rebuild requested");
        Ok(Response::new(rebuild_progress(&name, &progress)))
    }

    type WatchRebuildStream = Streamed<pb::RebuildProgress>;

    async fn watch_rebuild(
        &self,
        request: Request<pb::WatchRebuildRequest>,
    ) -> Result<Response<Self::WatchRebuildStream>, Status> {
        let req = request.into_inner();
        let (name, wanted) = (req.projection, req.generation);
        projection_name(&self.projector, &name)?;
        let first = self
            .projector
            .rebuild_progress(&name)
            .await
            .map_err(status_from_project)?;
        if first.is_none() && wanted == 0 {
            return Err(Status::not_found(format!(
                "projection {name:?} has never been rebuilt"
            )));
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let projector = Arc::clone(&self.projector);
        tokio::spawn(async move {
            // Progress of an older rebuild than the one asked for is not sent; the rebuild
            // asked for is followed once it is recorded.
            let current = |p: &RebuildProgress| p.generation >= wanted;
            let mut last = first;
            if let Some(p) = last.as_ref().filter(|p| current(p)) {
                if tx.send(Ok(rebuild_progress(&name, p))).await.is_err() {
                    return;
                }
            }
            while !last
                .as_ref()
                .is_some_and(|p| current(p) && finished(p.state))
            {
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(WATCH_POLL) => {}
                }
                let now = match projector.rebuild_progress(&name).await {
                    Ok(now) => now,
                    Err(e) => {
                        let _ = tx.send(Err(status_from_project(e))).await;
                        return;
                    }
                };
                if now != last {
                    if let Some(p) = now.as_ref().filter(|p| current(p)) {
                        if tx.send(Ok(rebuild_progress(&name, p))).await.is_err() {
                            return;
                        }
                    }
                    last = now;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type VerifyStream = Streamed<pb::VerifyResponse>;

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        let req = request.into_inner();
        // A derived projection is verified against its sources too.
        if !self
            .projector
            .derived
            .iter()
            .any(|d| d.name() == req.projection)
        {
            projection_name(&self.projector, &req.projection)?;
        }
        let examples = bounded("examples", req.examples, DEFAULT_EXAMPLES, MAX_EXAMPLES)?;
        let options = VerifyOptions {
            projection: req.projection,
            examples: examples as usize,
            repair: req.repair,
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let projector = Arc::clone(&self.projector);
        tokio::spawn(async move {
            let (progress_tx, mut progress_rx) = watch::channel(VerifyProgress::default());
            let report = move |p: VerifyProgress| {
                progress_tx.send_replace(p);
            };
            let run = projector.verify(&options, &report);
            tokio::pin!(run);
            let mut tick = tokio::time::interval(VERIFY_PROGRESS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut run => break Some(outcome),
                    // The client went away: dropping `run` stops the comparison.
                    () = tx.closed() => break None,
                    _ = tick.tick() => {
                        if progress_rx.has_changed().unwrap_or(false) {
                            let p = *progress_rx.borrow_and_update();
                            if tx.send(Ok(verify_progress(p))).await.is_err() {
                                break None;
                            }
                        }
                    }
                }
            };
            match outcome {
                Some(Ok(r)) => {
                    tracing::info!(
                        projection = %options.projection,
                        clean = r.is_clean(),
                        missing = r.missing,
                        extra = r.extra,
                        different = r.different,
                        repaired = r.repaired,
                        "verify finished"
                    );
                    let last = pb::VerifyResponse {
                        message: Some(pb::verify_response::Message::Report(verify_report(&r))),
                    };
                    let _ = tx.send(Ok(last)).await;
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(status_from_project(e))).await;
                }
                None => tracing::info!(projection = %options.projection, "verify cancelled"),
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_parked(
        &self,
        request: Request<pb::ListParkedRequest>,
    ) -> Result<Response<pb::ListParkedResponse>, Status> {
        let req = request.into_inner();
        if !req.projection.is_empty() {
            projection_name(&self.projector, &req.projection)?;
        }
        let limit = bounded("limit", req.limit, DEFAULT_PARKED_LIMIT, MAX_PARKED_LIMIT)?;
        let only = (!req.projection.is_empty()).then_some(req.projection.as_str());
        let list = self
            .projector
            .parked(only, limit as usize)
            .await
            .map_err(status_from_project)?;
        Ok(Response::new(pb::ListParkedResponse {
            parked: list.iter().map(parked).collect(),
        }))
    }

    async fn retry_parked(
        &self,
        request: Request<pb::RetryParkedRequest>,
    ) -> Result<Response<pb::RetryParkedResponse>, Status> {
        let req = request.into_inner();
        projection_name(&self.projector, &req.projection)?;
        let stream = stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
        let outcome = self
            .projector
            .retry_parked(&req.projection, &stream)
            .await
            .map_err(status_from_project)?;
        tracing::info!(projection = %req.projection, %stream, ?outcome, "parked stream retried");
        let response = match outcome {
            RetryOutcome::Resumed => pb::RetryParkedResponse {
                resumed: true,
                reason: String::new(),
            },
            RetryOutcome::StillParked(reason) => pb::RetryParkedResponse {
                resumed: false,
                reason,
            },
            RetryOutcome::NotParked => {
                return Err(Status::not_found(format!(
                    "stream {stream} is not parked for projection {:?}",
                    req.projection
                )))
            }
        };
        Ok(Response::new(response))
    }

    async fn skip_parked(
        &self,
        request: Request<pb::SkipParkedRequest>,
    ) -> Result<Response<pb::SkipParkedResponse>, Status> {
        let req = request.into_inner();
        projection_name(&self.projector, &req.projection)?;
        let stream = stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
        if req.version == 0 {
            return Err(Status::invalid_argument(
                "version: is required (the version the stream is parked at)",
            ));
        }
        let reason = req.reason.trim();
        if reason.is_empty() {
            return Err(Status::invalid_argument(
                "reason: is required (why the event is skipped; it is recorded)",
            ));
        }
        let skipped = self
            .projector
            .skip_parked(&req.projection, &stream, req.version, reason)
            .await
            .map_err(status_from_project)?;
        if !skipped {
            return Err(Status::not_found(format!(
                "stream {stream} is not parked at version {} for projection {:?}",
                req.version, req.projection
            )));
        }
        tracing::warn!(
            projection = %req.projection, %stream, version = req.version, reason,
            "parked event skipped"
        );
        Ok(Response::new(pb::SkipParkedResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_default_and_are_bounded() {
        assert_eq!(bounded("examples", 0, 10, 1000).ok(), Some(10));
        assert_eq!(bounded("examples", 1000, 10, 1000).ok(), Some(1000));
        let e = bounded("examples", 1001, 10, 1000).expect_err("over the bound");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("examples:"), "{}", e.message());
    }

    #[test]
    fn errors_map_to_clear_statuses() {
        let s = status_from_project(ProjectError::UnknownProjection("nope".into()));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(s.message().contains("nope"));
        let s = status_from_project(ProjectError::Read(ReadError::Unavailable("x".into())));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let s = status_from_project(ProjectError::Read(ReadError::Internal("secret".into())));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(!s.message().contains("secret"));
    }

    #[test]
    fn progress_carries_rate_and_eta() {
        let p = RebuildProgress {
            generation: 2,
            state: RebuildState::Building,
            streams_done: 10,
            streams_total: Some(20),
            events_done: 100,
            events_total: Some(300),
            started_at_us: 1_000_000,
            updated_at_us: 11_000_000,
            owner: "p1".into(),
            error: None,
        };
        let w = rebuild_progress("cart2", &p);
        assert_eq!(w.state, pb::RebuildState::Building as i32);
        assert!((w.events_per_second - 10.0).abs() < 1e-9);
        assert_eq!(w.eta_seconds, Some(20.0));
        assert_eq!(w.projection, "cart2");
    }
}
