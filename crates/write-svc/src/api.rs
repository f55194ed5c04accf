//! `esq.v1.EventStore`: raw appends and reads of any stream.

use crate::commands::Executor;
use crate::error::status_from_store;
use crate::Nudge;
use esq::convert::{self, status_from_domain};
use esq::pb::v1 as pb;
use esq_domain::bookshop::{self, Book};
use esq_domain::cart::{self, Cart};
use esq_domain::contract;
use esq_eventstore::{Direction, EventStore, ReadRequest};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Events fetched from the store per page while streaming a read.
const READ_PAGE: u32 = 500;
/// Pages buffered ahead of a slow reader; the bound keeps server memory flat.
const READ_BUFFER: usize = 2 * READ_PAGE as usize;

/// The `esq.v1.EventStore` service.
pub struct EventStoreApi<S> {
    store: Arc<S>,
    nudge: Option<Nudge>,
    /// Appends to owned stream types go through the aggregates' rules.
    executor: Executor<S>,
}

impl<S: EventStore> EventStoreApi<S> {
    /// Serves `store`, calling `nudge` after each successful append; `executor` checks and
    /// appends events to the stream types an aggregate owns.
    pub fn new(store: Arc<S>, nudge: Option<Nudge>, executor: Executor<S>) -> Self {
        Self {
            store,
            nudge,
            executor,
        }
    }
}

#[tonic::async_trait]
impl<S: EventStore> pb::event_store_server::EventStore for EventStoreApi<S> {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let deadline = convert::deadline(request.metadata());
        let req = request.into_inner();
        let stream = convert::stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
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
                nudge(&stream, result.last_version);
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
            limit: READ_PAGE,
            until_version: req.until_version,
            until_time_us: req.until_time.as_ref().map(convert::micros),
        };
        // The first page is read before answering, so that an outage is a status, not a
        // broken stream.
        request.limit = READ_PAGE.min(remaining.try_into().unwrap_or(READ_PAGE));
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
                let full = page.len() as u32 == request.limit;
                let Some(last) = page.last().map(|e| e.version) else {
                    break;
                };
                remaining -= page.len() as u64;
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
                request.limit = READ_PAGE.min(remaining.try_into().unwrap_or(READ_PAGE));
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
                esq_domain::quote(&wanted, 64)
            )));
        }
        Ok(Response::new(pb::ListEventTypesResponse { stream_types }))
    }
}
