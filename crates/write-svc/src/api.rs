//! `esq.v1.EventStore`: raw appends and reads of any stream, and its state at any point.

use crate::commands::Executor;
use crate::error::status_from_store;
use crate::subscribe::{self, Subscription};
use crate::timelines::Timelines;
use crate::Nudge;
use esq::convert::{self, status_from_domain};
use esq::pb::v1 as pb;
use esq_domain::bookshop::{self, Book};
use esq_domain::cart::{self, Cart};
use esq_domain::contract;
use esq_domain::replay;
use esq_domain::state::{state_json, StateProjection};
use esq_eventstore::history::{fold_at, AsOf};
use esq_eventstore::{ChangeFeed, Direction, EventStore, ReadRequest, Snapshots};
use esq_runtime::auth::Role;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Events in the first page of a streamed read: one, since nothing is known of their size.
const FIRST_PAGE: u32 = 1;
/// Most events per page, whatever their size: also bounds what one read fetches when small
/// events are followed by large ones (64 × 512 KiB at worst, briefly, before trimming).
const MAX_PAGE: u32 = 64;
/// Bytes a page may hold: a page read is trimmed to this (at least one event) before its
/// events are sent, and the next page is sized from the largest event seen in the last one.
/// With [`READ_BUFFER`] this bounds what a reader that stops granting HTTP/2 flow-control
/// window pins on the server: one page, one event in the channel, and what tonic and h2 queued
/// (one encoded message) — about 1 MiB even for 512 KiB events.
pub(crate) const PAGE_BYTES: usize = 256 * 1024;
/// Events buffered between the page reader and the response stream.
const READ_BUFFER: usize = 1;

/// The size of the next page when the largest event of the last one held `largest` bytes,
/// for at most `remaining` more: about [`PAGE_BYTES`], between 1 and [`MAX_PAGE`] events.
pub(crate) fn next_page(largest: usize, remaining: u64) -> u32 {
    let fit = (PAGE_BYTES / largest.max(1)).clamp(1, MAX_PAGE as usize) as u32;
    fit.min(remaining.try_into().unwrap_or(u32::MAX)).max(1)
}

/// How many events of `page` fit in [`PAGE_BYTES`] (at least one).
pub(crate) fn fitting(page: &[esq_domain::RecordedEvent]) -> usize {
    let mut bytes = 0;
    page.iter()
        .position(|e| {
            bytes += event_bytes(e);
            bytes > PAGE_BYTES
        })
        .map_or(page.len(), |i| i.max(1))
}

/// Bytes an event holds in memory, roughly: payload, metadata and names.
pub(crate) fn event_bytes(e: &esq_domain::RecordedEvent) -> usize {
    let metadata: usize = e.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    e.data.len() + metadata + e.event_type.len() + e.content_type.len() + 64
}

/// The `esq.v1.EventStore` service.
pub struct EventStoreApi<S> {
    store: Arc<S>,
    nudge: Option<Nudge>,
    /// Appends to owned stream types go through the aggregates' rules.
    executor: Executor<S>,
    /// Replay previews and saved timelines.
    timelines: Timelines<S>,
    /// How often a subscription polls the change feed once it has read everything.
    subscribe_poll: Duration,
}

impl<S: EventStore + ChangeFeed + Snapshots> EventStoreApi<S> {
    /// Serves `store`, calling `nudge` after each successful append; `executor` checks and
    /// appends events to the stream types an aggregate owns; subscriptions poll the store's
    /// change feed every `subscribe_poll` once caught up.
    pub fn new(
        store: Arc<S>,
        nudge: Option<Nudge>,
        executor: Executor<S>,
        subscribe_poll: Duration,
    ) -> Self {
        Self {
            timelines: Timelines::new(Arc::clone(&store), nudge.clone()),
            store,
            nudge,
            executor,
            subscribe_poll,
        }
    }
}

#[tonic::async_trait]
impl<S: EventStore + ChangeFeed + Snapshots> pb::event_store_server::EventStore
    for EventStoreApi<S>
{
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let deadline = convert::deadline(request.metadata());
        let owned_ok = esq_runtime::auth::require(&request, Role::Admin);
        let req = request.into_inner();
        let stream = convert::stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
        if stream.kind == replay::TIMELINE_KIND {
            // Saved timelines are written by SaveTimeline only, which checks them; a raw
            // event there would be a timeline nobody checked.
            return Err(Status::invalid_argument(format!(
                "invalid stream.type: stream type {} holds saved timelines and is written \
                 only by SaveTimeline",
                replay::TIMELINE_KIND
            )));
        }
        if contract::is_owned(&stream.kind) {
            // A raw append bypasses the aggregate's commands: only an admin may do it (the
            // layer admitted any writer to Append).
            owned_ok.map_err(|denied| {
                Status::permission_denied(format!(
                    "a raw append to stream type {} (owned by its aggregate) {}; writers use \
                     its commands",
                    stream.kind,
                    denied.message()
                ))
            })?;
        }
        let expected =
            convert::expected_version(req.expected_version.as_ref()).map_err(status_from_domain)?;
        let events = convert::new_events(req.events).map_err(status_from_domain)?;
        let checked = |kind: &str| stream.kind == kind;
        let result = if checked(cart::KIND) {
            (self.executor)
                .append_checked::<Cart>(&stream, expected, &events, deadline)
                .await?
        } else if checked(bookshop::KIND) {
            (self.executor)
                .append_checked::<Book>(&stream, expected, &events, deadline)
                .await?
        } else {
            let result = self
                .store
                .append(&stream, expected, &events)
                .await
                .map_err(status_from_store)?;
            if let Some(nudge) = &self.nudge {
                nudge(&stream, &result, &events);
            }
            result
        };
        Ok(Response::new(pb::AppendResponse {
            first_version: result.first_version,
            last_version: result.last_version,
            committed_at: Some(convert::timestamp(result.committed_at_us)),
        }))
    }

    type ReadStreamStream = ReceiverStream<Result<pb::RecordedEvent, Status>>;

    async fn read_stream(
        &self,
        request: Request<pb::ReadStreamRequest>,
    ) -> Result<Response<Self::ReadStreamStream>, Status> {
        let req = request.into_inner();
        let stream = convert::stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
        let direction = match pb::Direction::try_from(req.direction) {
            Ok(pb::Direction::Forwards) => Direction::Forwards,
            Ok(pb::Direction::Backwards) => Direction::Backwards,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "invalid direction: unknown value {}",
                    req.direction
                )))
            }
        };
        let mut remaining = if req.limit == 0 {
            u64::MAX
        } else {
            u64::from(req.limit)
        };
        let mut request = ReadRequest {
            direction,
            from_version: req.from_version,
            limit: FIRST_PAGE.min(remaining.try_into().unwrap_or(FIRST_PAGE)),
            until_version: req.until_version,
            until_time_us: req.until_time.as_ref().map(convert::micros),
        };
        // The first page is read before answering, so that an outage is a status, not a
        // broken stream.
        let first = self
            .store
            .read(&stream, request)
            .await
            .map_err(status_from_store)?;
        let (tx, rx) = tokio::sync::mpsc::channel(READ_BUFFER);
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            let mut page = first;
            loop {
                let mut full = page.len() as u32 == request.limit;
                // Only what fits the byte budget is held while the reader is slow; the rest
                // is read again with the next page.
                let keep = fitting(&page);
                if keep < page.len() {
                    page.truncate(keep);
                    full = true;
                }
                let Some(last) = page.last().map(|e| e.version) else {
                    break;
                };
                remaining -= page.len() as u64;
                let largest = page.iter().map(event_bytes).max().unwrap_or(1);
                for event in page {
                    if tx.send(Ok(convert::recorded_event(event))).await.is_err() {
                        return; // the client went away
                    }
                }
                if !full || remaining == 0 {
                    break;
                }
                request.from_version = match direction {
                    Direction::Forwards => Some(last + 1),
                    Direction::Backwards if last > 1 => Some(last - 1),
                    Direction::Backwards => break,
                };
                request.limit = next_page(largest, remaining);
                page = match store.read(&stream, request).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(status_from_store(e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type SubscribeStream = ReceiverStream<Result<pb::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let plan = subscribe::plan(request.into_inner())?;
        let (subscription, rx) =
            Subscription::start(Arc::clone(&self.store), plan, self.subscribe_poll).await?;
        tokio::spawn(subscription.run());
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_stream_info(
        &self,
        request: Request<pb::GetStreamInfoRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let req = request.into_inner();
        let stream = convert::stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
        let info = self
            .store
            .stream_info(&stream)
            .await
            .map_err(status_from_store)?
            .ok_or_else(|| Status::not_found(format!("stream {stream} has no events")))?;
        Ok(Response::new(pb::StreamInfo {
            stream: Some(convert::stream_ref(&stream)),
            version: info.version,
            created_at: Some(convert::timestamp(info.created_at_us)),
            last_appended_at: Some(convert::timestamp(info.last_appended_at_us)),
            event_count: info.event_count,
        }))
    }

    async fn list_event_types(
        &self,
        request: Request<pb::ListEventTypesRequest>,
    ) -> Result<Response<pb::ListEventTypesResponse>, Status> {
        let wanted = request.into_inner().stream_type;
        let stream_types: Vec<pb::StreamTypeContract> = contract::contracts()
            .iter()
            .filter(|c| wanted.is_empty() || c.stream_type == wanted)
            .map(convert::stream_type_contract)
            .collect();
        if stream_types.is_empty() {
            return Err(Status::not_found(format!(
                "no aggregate owns stream type {}; its streams are free-form",
                esq_domain::quote(&wanted)
            )));
        }
        Ok(Response::new(pb::ListEventTypesResponse { stream_types }))
    }

    async fn replay_preview(
        &self,
        request: Request<pb::ReplayPreviewRequest>,
    ) -> Result<Response<pb::ReplayPreviewResponse>, Status> {
        Ok(Response::new(
            self.timelines.preview(request.into_inner()).await?,
        ))
    }

    async fn save_timeline(
        &self,
        request: Request<pb::SaveTimelineRequest>,
    ) -> Result<Response<pb::Timeline>, Status> {
        Ok(Response::new(
            self.timelines.save(request.into_inner()).await?,
        ))
    }

    async fn get_timeline(
        &self,
        request: Request<pb::GetTimelineRequest>,
    ) -> Result<Response<pb::Timeline>, Status> {
        Ok(Response::new(
            self.timelines.get(&request.into_inner().name).await?,
        ))
    }

    async fn list_timelines(
        &self,
        request: Request<pb::ListTimelinesRequest>,
    ) -> Result<Response<pb::ListTimelinesResponse>, Status> {
        let req = request.into_inner();
        let (timelines, next_page_token) =
            self.timelines.list(req.page_size, req.page_token).await?;
        Ok(Response::new(pb::ListTimelinesResponse {
            timelines,
            next_page_token,
        }))
    }

    async fn get_state_at(
        &self,
        request: Request<pb::GetStateAtRequest>,
    ) -> Result<Response<pb::GetStateAtResponse>, Status> {
        let req = request.into_inner();
        use pb::get_state_at_request::AsOf as Wire;
        let stream = convert::stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
        let as_of = match req.as_of {
            None => AsOf::Now,
            Some(Wire::Version(v)) => AsOf::Version(v),
            Some(Wire::Time(t)) => {
                AsOf::TimeUs(convert::checked_micros("time", &t).map_err(status_from_domain)?)
            }
        };
        let folded = fold_at(&*self.store, &stream, &StateProjection, as_of)
            .await
            .map_err(status_from_store)?;
        if folded.version == 0 {
            return Err(Status::not_found(format!(
                "stream {stream} had no events at that point"
            )));
        }
        Ok(Response::new(pb::GetStateAtResponse {
            stream: Some(convert::stream_ref(&stream)),
            version: folded.version,
            state: Some(convert::to_struct(state_json(&folded.doc))),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_fit_the_byte_budget() {
        // Small events: the page grows to the event cap.
        assert_eq!(next_page(100, u64::MAX), MAX_PAGE);
        // 64 KiB events: four per page (a little less with their overhead).
        assert_eq!(next_page(65_600, u64::MAX), 3);
        assert_eq!(next_page(64 * 1024, u64::MAX), 4);
        // 512 KiB events: one at a time.
        assert_eq!(next_page(512 * 1024, u64::MAX), 1);
        // Never more than what is left, never zero.
        assert_eq!(next_page(400, 7), 7);
        assert_eq!(next_page(0, 1), 1);
    }

    #[test]
    fn a_page_is_trimmed_to_the_byte_budget() {
        let s = esq_domain::StreamId::new("s", "1").expect("valid");
        let event = |version: u64, size: usize| esq_domain::RecordedEvent {
            stream: s.clone(),
            version,
            event_id: uuid::Uuid::now_v7(),
            event_type: "E".into(),
            schema_version: 1,
            content_type: "application/octet-stream".into(),
            data: vec![0; size],
            metadata: Default::default(),
            recorded_at_us: 0,
        };
        // Small events followed by large ones in one page: only what fits is kept.
        let mut page: Vec<_> = (1..=10).map(|v| event(v, 100)).collect();
        page.extend((11..=64).map(|v| event(v, 512 * 1024)));
        assert_eq!(fitting(&page), 10);
        // A single event larger than the budget still goes, alone.
        assert_eq!(fitting(&page[10..]), 1);
        assert_eq!(fitting(&page[..5]), 5);
    }
}
