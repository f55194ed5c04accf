//! Stream reads, stream summaries and the walk over all streams.

use super::{error, statements::READ_PAGE_ROWS, Inner};
use crate::{Direction, ReadRequest, StoreError, StreamPage};
use esq_domain::{RecordedEvent, StreamId, StreamInfo};
use scylla::response::PagingState;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use uuid::Uuid;

/// Most stream ids returned by one page of [`crate::EventStore::list_streams`].
const MAX_LIST_PAGE: u32 = 10_000;

/// One event row, in [`super::statements::EVENT_COLUMNS`] order.
type EventRow = (
    i64,
    Uuid,
    String,
    i32,
    String,
    Option<Vec<u8>>,
    Option<BTreeMap<String, String>>,
    i64,
);

impl Inner {
    /// [`crate::EventStore::read`]: pages through the partition in the requested order.
    ///
    /// `until_time_us` relies on recorded times growing with versions (appends to one stream
    /// follow each other, and each stamps its events with the writer's clock clamped to at
    /// least the newest time it read from the stream — see [`super::append`] for which appends
    /// read it): a forwards read stops at the first event recorded after it, a backwards read
    /// skips the newest events until it reaches one recorded at or before it.
    pub(crate) async fn read(
        &self,
        stream: &StreamId,
        request: ReadRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if request.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = request.limit as usize;
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let until = request.until_version.map_or(i64::MAX, clamp);
        let (stmt, low, high) = match request.direction {
            Direction::Forwards => (
                &self.stmts.read_forwards,
                request.from_version.map_or(1, clamp).max(1),
                until,
            ),
            Direction::Backwards => (
                &self.stmts.read_backwards,
                1,
                request.from_version.map_or(i64::MAX, clamp).min(until),
            ),
        };
        if low > high {
            return Ok(Vec::new());
        }
        // Skipped rows count against a CQL LIMIT, so a backwards read that may skip some pages
        // through without one and stops by itself.
        let cql_limit = match (request.direction, request.until_time_us) {
            (Direction::Backwards, Some(_)) => i32::MAX,
            _ => i32::try_from(request.limit).unwrap_or(i32::MAX),
        };
        let values = (
            stream.kind.as_str(),
            stream.id.as_str(),
            0i32,
            low,
            high,
            cql_limit,
        );
        let mut events = Vec::with_capacity(limit.min(READ_PAGE_ROWS as usize));
        let mut paging = PagingState::start();
        'pages: loop {
            let (result, next) = self
                .timed(self.session().execute_single_page(stmt, &values, paging))
                .await?;
            let rows = result.into_rows_result().map_err(error::into_rows)?;
            for row in rows.rows::<EventRow>().map_err(error::rows)? {
                let (
                    version,
                    event_id,
                    event_type,
                    schema_version,
                    content_type,
                    data,
                    metadata,
                    at,
                ) = row.map_err(error::deserialize)?;
                if let Some(time) = request.until_time_us {
                    if at > time {
                        match request.direction {
                            Direction::Forwards => break 'pages,
                            Direction::Backwards => continue,
                        }
                    }
                }
                events.push(RecordedEvent {
                    stream: stream.clone(),
                    version: version.max(0) as u64,
                    event_id,
                    event_type,
                    schema_version: schema_version.max(0) as u32,
                    content_type,
                    data: data.unwrap_or_default(),
                    metadata: metadata.unwrap_or_default(),
                    recorded_at_us: at,
                });
                if events.len() == limit {
                    break 'pages;
                }
            }
            match next.into_paging_control_flow() {
                ControlFlow::Break(()) => break,
                ControlFlow::Continue(state) => paging = state,
            }
        }
        Ok(events)
    }

    /// [`crate::EventStore::stream_info`]: the partition's static columns.
    pub(crate) async fn stream_info(
        &self,
        stream: &StreamId,
    ) -> Result<Option<StreamInfo>, StoreError> {
        let values = (stream.kind.as_str(), stream.id.as_str(), 0i32);
        let rows = self
            .timed(self.session().execute_unpaged(&self.stmts.info, values))
            .await?
            .into_rows_result()
            .map_err(error::into_rows)?;
        let row = rows
            .maybe_first_row::<(Option<i64>, Option<i64>, Option<i64>)>()
            .map_err(|e| StoreError::Internal(format!("unexpected stream info row: {e}")))?;
        Ok(match row {
            Some((Some(head), created, updated)) if head > 0 => Some(StreamInfo {
                version: head as u64,
                created_at_us: created.unwrap_or_default(),
                last_appended_at_us: updated.or(created).unwrap_or_default(),
                event_count: head as u64,
            }),
            _ => None,
        })
    }

    /// [`crate::EventStore::list_streams`]: partitions in token order; the cursor is the last
    /// token returned. Only bucket 0 names a stream (later buckets, once long streams are
    /// split, belong to a stream already listed).
    pub(crate) async fn list_streams(
        &self,
        cursor: Option<String>,
        limit: u32,
    ) -> Result<StreamPage, StoreError> {
        if limit == 0 {
            return Ok(StreamPage {
                streams: Vec::new(),
                next: cursor,
            });
        }
        let after = match cursor.as_deref() {
            None => i64::MIN,
            Some(text) => text.parse::<i64>().map_err(|_| {
                StoreError::Internal(format!("malformed stream-list cursor {text:?}"))
            })?,
        };
        let limit = limit.min(MAX_LIST_PAGE);
        let rows = self
            .timed(
                self.session()
                    .execute_unpaged(&self.stmts.list_streams, (after, limit as i32)),
            )
            .await?
            .into_rows_result()
            .map_err(error::into_rows)?;
        let mut page = StreamPage::default();
        let mut last = None;
        let mut seen = 0;
        for row in rows.rows::<(String, String, i32)>().map_err(error::rows)? {
            let (kind, id, bucket) = row.map_err(error::deserialize)?;
            seen += 1;
            last = Some((kind.clone(), id.clone(), bucket));
            if bucket == 0 {
                page.streams.push(StreamId { kind, id });
            }
        }
        if seen == limit {
            if let Some((kind, id, bucket)) = last {
                let token = self
                    .stmts
                    .info
                    .calculate_token(&(kind.as_str(), id.as_str(), bucket))
                    .map_err(|e| StoreError::Internal(format!("token of {kind}/{id}: {e}")))?
                    .ok_or_else(|| {
                        StoreError::Internal("the events table has no token-aware key".into())
                    })?;
                page.next = Some(token.value().to_string());
            }
        }
        Ok(page)
    }
}
