//! Replay previews and named what-if timelines (`esq.v1.EventStore/ReplayPreview`,
//! `SaveTimeline`, `GetTimeline`, `ListTimelines`).
//!
//! The work is the domain's ([`esq_domain::replay`]): this module only reads the stream, hands
//! it over, and stores timelines. A preview writes nothing. A saved timeline is a
//! `TimelineSaved` event in its own stream (`esq-timeline/<name>`), the newest one winning, so
//! timelines live in the event store on every backend and never touch the stream they edit.
//! Only SaveTimeline writes that stream type (raw Append refuses it, see `api.rs`), and reads
//! still check what they find (FAILED_PRECONDITION for an event that is not a readable
//! timeline).

use crate::error::status_from_store;
use crate::Nudge;
use esq::convert::{self, status_from_domain};
use esq::pb::v1 as pb;
use esq_domain::aggregate::check_append;
use esq_domain::bookshop::{self, Book};
use esq_domain::cart::{self, Cart};
use esq_domain::event::MAX_EVENT_DATA_BYTES;
use esq_domain::replay::{self, SavedTimeline, TIMELINE_KIND, TIMELINE_SAVED};
use esq_domain::{ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use esq_eventstore::{Direction, EventStore, ReadRequest, StoreError};
use std::sync::Arc;
use tonic::Status;

/// Events read per page when loading a stream for a preview.
const PAGE: u32 = 1000;
/// Timelines per ListTimelines page unless the client asks for fewer.
const DEFAULT_LIST_PAGE: u32 = 100;
/// Most timelines per ListTimelines page.
const MAX_LIST_PAGE: u32 = 500;
/// What every ListTimelines page token starts with (the store's cursor follows), so that a
/// token from elsewhere is refused on every backend.
const TOKEN_PREFIX: &str = "tl1.";
/// Most stream ids one ListTimelines call scans.
const MAX_LIST_SCAN: usize = 5000;

/// Previews and timelines over one store.
pub struct Timelines<S> {
    store: Arc<S>,
    nudge: Option<Nudge>,
}

impl<S: EventStore> Timelines<S> {
    /// Over `store`; `nudge` is called after a timeline is saved (its stream is a stream too).
    pub fn new(store: Arc<S>, nudge: Option<Nudge>) -> Self {
        Self { store, nudge }
    }

    /// Previews the request's edits, or its saved timeline's, on the stream as it is now.
    pub async fn preview(
        &self,
        req: pb::ReplayPreviewRequest,
    ) -> Result<pb::ReplayPreviewResponse, Status> {
        let (stream, edits) = if req.timeline.is_empty() {
            let stream = convert::stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
            let edits = convert::timeline_edits(req.edits).map_err(status_from_domain)?;
            (stream, edits)
        } else {
            if !req.edits.is_empty() {
                return Err(Status::invalid_argument(
                    "invalid edits: must be empty when `timeline` names a saved timeline",
                ));
            }
            let (saved, _) = self.load("timeline", &req.timeline).await?;
            if let Some(given) = req.stream.as_ref() {
                let given = convert::stream_id(Some(given)).map_err(status_from_domain)?;
                if given != saved.stream {
                    return Err(Status::invalid_argument(format!(
                        "invalid stream: timeline {} edits {}, not {given}",
                        esq_domain::quote(&req.timeline),
                        saved.stream
                    )));
                }
            }
            (saved.stream, saved.edits)
        };
        let history = self.history(&stream).await?;
        let now = esq_eventstore::now_us();
        let preview =
            replay::preview(&stream, &history, &edits, now).map_err(status_from_domain)?;
        // What Append would say of the corrective append today.
        let refused = match stream.kind.as_str() {
            _ if preview.inserted.is_empty() => None,
            cart::KIND => check_append::<Cart>(&stream, &preview.today, &preview.inserted).err(),
            bookshop::KIND => {
                check_append::<Book>(&stream, &preview.today, &preview.inserted).err()
            }
            _ => None,
        };
        Ok(convert::replay_preview(&stream, preview, refused))
    }

    /// Checks the timeline's edits against its stream (as a preview would) and saves it.
    pub async fn save(&self, req: pb::SaveTimelineRequest) -> Result<pb::Timeline, Status> {
        let at = replay::timeline_stream(&req.name).map_err(status_from_domain)?;
        let stream = convert::stream_id(req.stream.as_ref()).map_err(status_from_domain)?;
        let edits = convert::timeline_edits(req.edits).map_err(status_from_domain)?;
        let history = self.history(&stream).await?;
        replay::preview(&stream, &history, &edits, 0).map_err(status_from_domain)?;
        let saved = SavedTimeline { stream, edits };
        let data = serde_json::to_value(&saved)
            .map_err(|e| Status::internal(format!("timeline does not serialize: {e}")))?;
        let event = NewEvent::json(TIMELINE_SAVED, 1, &data);
        if event.data.len() > MAX_EVENT_DATA_BYTES {
            return Err(Status::resource_exhausted(format!(
                "edits too large: the timeline takes {} bytes as stored, at most \
                 {MAX_EVENT_DATA_BYTES} allowed",
                event.data.len()
            )));
        }
        let result = self
            .store
            .append(&at, ExpectedVersion::Any, std::slice::from_ref(&event))
            .await
            .map_err(status_from_store)?;
        if let Some(nudge) = &self.nudge {
            nudge(&at, &result, std::slice::from_ref(&event));
        }
        Ok(timeline(
            req.name,
            saved,
            result.last_version,
            result.committed_at_us,
        ))
    }

    /// The saved timeline `name`.
    pub async fn get(&self, name: &str) -> Result<pb::Timeline, Status> {
        let (saved, event) = self.load("name", name).await?;
        Ok(timeline(
            name.to_owned(),
            saved,
            event.version,
            event.recorded_at_us,
        ))
    }

    /// One page of saved timelines, from `page_token` (empty: the start): at most
    /// `page_size` of them (0: the default), in the store's order, after scanning at most
    /// [`MAX_LIST_SCAN`] stream ids; and the token of the next page (empty: none).
    pub async fn list(
        &self,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<pb::Timeline>, String), Status> {
        let want = match page_size {
            0 => DEFAULT_LIST_PAGE,
            n if n > MAX_LIST_PAGE => {
                return Err(Status::invalid_argument(format!(
                    "invalid page_size: {n} is more than the {MAX_LIST_PAGE} allowed"
                )))
            }
            n => n,
        } as usize;
        let mut cursor = match page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .strip_prefix(TOKEN_PREFIX)
                    .ok_or_else(|| {
                        Status::invalid_argument(
                            "invalid page_token: not a token this server issued",
                        )
                    })?
                    .to_owned(),
            ),
        };
        let mut from_client = cursor.is_some();
        let mut timelines = Vec::new();
        let mut scanned = 0;
        while timelines.len() < want && scanned < MAX_LIST_SCAN {
            // Never more ids than timelines still wanted, so that a page ends on a cursor.
            let limit = (want - timelines.len()).min(MAX_LIST_SCAN - scanned) as u32;
            let page = self
                .store
                .list_streams(cursor.take(), limit)
                .await
                .map_err(|e| match e {
                    // The store's cursors are opaque: one it cannot read came from the client.
                    StoreError::Internal(_) if from_client => Status::invalid_argument(
                        "invalid page_token: not a token this server issued",
                    ),
                    other => status_from_store(other),
                })?;
            from_client = false;
            scanned += page.streams.len();
            for stream in page.streams {
                if stream.kind == TIMELINE_KIND {
                    timelines.push(self.get(&stream.id).await?);
                }
            }
            cursor = page.next;
            if cursor.is_none() {
                break;
            }
        }
        Ok((
            timelines,
            cursor.map_or_else(String::new, |c| format!("{TOKEN_PREFIX}{c}")),
        ))
    }

    /// The newest save of timeline `name`, and the event that holds it.
    /// A malformed name is INVALID_ARGUMENT naming `field` (`timeline` in previews, `name` in
    /// GetTimeline).
    async fn load(
        &self,
        field: &str,
        name: &str,
    ) -> Result<(SavedTimeline, RecordedEvent), Status> {
        let at = replay::timeline_stream(name).map_err(|e| match e {
            esq_domain::DomainError::Invalid { reason, .. } => {
                Status::invalid_argument(format!("invalid {field}: {reason}"))
            }
            other => status_from_domain(other),
        })?;
        let newest = self
            .store
            .read(
                &at,
                ReadRequest {
                    direction: Direction::Backwards,
                    from_version: None,
                    limit: 1,
                    until_version: None,
                    until_time_us: None,
                },
            )
            .await
            .map_err(status_from_store)?
            .pop()
            .ok_or_else(|| {
                Status::not_found(format!("no timeline named {}", esq_domain::quote(name)))
            })?;
        // The stream is free-form, so a raw Append may have put something else there.
        let saved = (newest.event_type == TIMELINE_SAVED)
            .then(|| serde_json::from_slice::<SavedTimeline>(&newest.data).ok())
            .flatten()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "timeline {}: the newest event of stream {at} (version {}) is not a \
                     readable {TIMELINE_SAVED}",
                    esq_domain::quote(name),
                    newest.version
                ))
            })?;
        Ok((saved, newest))
    }

    /// Every event of `stream`, oldest first; INVALID_ARGUMENT naming `stream` if it has
    /// none, RESOURCE_EXHAUSTED past [`replay::MAX_STREAM_EVENTS`] or
    /// [`replay::MAX_STREAM_BYTES`].
    async fn history(&self, stream: &StreamId) -> Result<Vec<RecordedEvent>, Status> {
        let mut events: Vec<RecordedEvent> = Vec::new();
        let mut bytes = 0usize;
        loop {
            let page = self
                .store
                .read(stream, ReadRequest::forwards(events.len() as u64 + 1, PAGE))
                .await
                .map_err(status_from_store)?;
            let full = page.len() == PAGE as usize;
            bytes += page.iter().map(RecordedEvent::payload_bytes).sum::<usize>();
            events.extend(page);
            if bytes > replay::MAX_STREAM_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "stream {stream} holds more than {} MiB of events, the most a preview folds",
                    replay::MAX_STREAM_BYTES >> 20
                )));
            }
            if events.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "invalid stream: stream {stream} has no events"
                )));
            }
            if events.len() as u64 > replay::MAX_STREAM_EVENTS {
                return Err(Status::resource_exhausted(format!(
                    "stream {stream} holds more than {} events, the most a preview folds",
                    replay::MAX_STREAM_EVENTS
                )));
            }
            if !full {
                return Ok(events);
            }
        }
    }
}

/// The wire form of a saved timeline.
fn timeline(name: String, saved: SavedTimeline, revision: u64, saved_at_us: i64) -> pb::Timeline {
    pb::Timeline {
        name,
        stream: Some(convert::stream_ref(&saved.stream)),
        edits: convert::timeline_edits_out(&saved.edits),
        revision,
        saved_at: Some(convert::timestamp(saved_at_us)),
    }
}
