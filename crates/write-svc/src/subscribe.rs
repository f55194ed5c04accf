//! `esq.v1.EventStore/Subscribe`: the event bus.
//!
//! A subscription tails the store's change feed (the same [`ChangeFeed::poll`] the projector
//! tails) and, for each change of a stream that passes the filters, reads that change's events
//! from the store by version. Its [`Token`] — the `position` every message carries — is:
//!
//! - per shard, the feed position of the last change fully processed (like a projector's
//!   checkpoint), and the time up to which the shard is known to be processed;
//! - per shard, *claims*: for the streams delivered from recent changes, the highest version
//!   delivered and when it was recorded.
//!
//! A change `(stream, first..=last, noted_at)` delivers the events at `first..=last` that were
//! recorded no earlier than [`CLAIM_SLACK_US`] before it was noted (an append commits after its
//! notification is written; older events belong to an earlier append, whose own change came
//! earlier in the shard) and above the stream's claim. So a duplicate notification (a retried
//! append, a race lost to another writer) delivers nothing twice, and a change half delivered
//! when the client went away is re-read on resume and continues after the claim. A claim is
//! dropped once the shard has passed changes noted after its event was recorded (plus the
//! slack): no later change can deliver that event, so the token stays small.
//!
//! Changes whose events are not in the store yet make the subscription wait (the append may be
//! in flight); after the feed's append deadline they are orphans and are skipped
//! ([`esq_eventstore::is_orphan`]). Shards are merged by notification time. Memory per
//! subscription is bounded: one page of changes per shard, one page of events, and
//! [`BUFFER`] messages in the channel; when the client stops reading, the channel fills and the
//! subscription stops reading the store.

use crate::api::{event_bytes, fitting, next_page, PAGE_BYTES};
use crate::error::status_from_store;
use esq::convert;
use esq::pb::v1 as pb;
use esq_domain::{RecordedEvent, StreamId};
use esq_eventstore::{now_us, Change, ChangeFeed, EventStore, ReadRequest};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Status;

/// Messages buffered between a subscription and its response stream.
pub(crate) const BUFFER: usize = 8;
/// Changes read per poll of one shard.
const CHANGE_PAGE: u32 = 64;
/// How long before its notification an event may have been recorded and still belong to the
/// notification's append: covers timeuuids issued a little ahead of the wall clock under bursts,
/// and small clock steps between a writer's notification and its batch.
pub(crate) const CLAIM_SLACK_US: i64 = 10_000;
/// Version of the token layout.
const TOKEN_VERSION: u32 = 1;

/// The resumable position of a subscription, carried (serialized) by every message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Token {
    /// Layout version.
    v: u32,
    /// `from_now`: only events recorded at or after this (µs since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<i64>,
    /// One cursor per shard of the feed.
    s: Vec<Cursor>,
}

/// Where one shard stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    /// Feed position of the last change fully processed; `None` is the start of the feed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<String>,
    /// Every change noted before this (µs) has been processed.
    #[serde(default)]
    t: i64,
    /// Recent deliveries: stream, highest version delivered, when that event was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    c: Vec<(String, String, u64, i64)>,
}

impl Token {
    fn encode(&self) -> String {
        use base64::Engine as _;
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(text: &str, shards: u32) -> Result<Self, Status> {
        use base64::Engine as _;
        let bad = || {
            Status::invalid_argument(
                "after: not a position issued by Subscribe (pass the `position` of a message \
                 exactly as received)",
            )
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| bad())?;
        let token: Token = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        if token.v != TOKEN_VERSION {
            return Err(bad());
        }
        if token.s.len() != shards as usize {
            return Err(Status::invalid_argument(format!(
                "after: the position is for a change log of {} shards, this store has {shards}",
                token.s.len()
            )));
        }
        Ok(token)
    }

    fn claimed(&self, shard: usize, stream: &StreamId) -> u64 {
        self.s[shard]
            .c
            .iter()
            .find(|c| c.0 == stream.kind && c.1 == stream.id)
            .map_or(0, |c| c.2)
    }

    fn claim(&mut self, shard: usize, stream: &StreamId, version: u64, recorded_at: i64) {
        let claims = &mut self.s[shard].c;
        match claims
            .iter_mut()
            .find(|c| c.0 == stream.kind && c.1 == stream.id)
        {
            Some(c) => (c.2, c.3) = (version, recorded_at),
            None => claims.push((stream.kind.clone(), stream.id.clone(), version, recorded_at)),
        }
    }

    /// The shard has processed the change at `position`, noted at `noted_at`.
    fn advance(&mut self, shard: usize, position: String, noted_at: i64) {
        let cursor = &mut self.s[shard];
        cursor.p = Some(position);
        cursor.t = cursor.t.max(noted_at);
        // Later changes of the shard are noted at or after `noted_at`: none can deliver an
        // event recorded more than the slack before it.
        cursor.c.retain(|c| c.3 + CLAIM_SLACK_US >= noted_at);
    }
}

/// What a subscription delivers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    stream_types: Vec<String>,
    id_prefix: String,
    event_types: Vec<String>,
}

impl Filter {
    fn stream(&self, s: &StreamId) -> bool {
        (self.stream_types.is_empty() || self.stream_types.contains(&s.kind))
            && s.id.starts_with(&self.id_prefix)
    }

    fn event(&self, e: &RecordedEvent) -> bool {
        self.event_types.is_empty() || self.event_types.contains(&e.event_type)
    }
}

/// A validated Subscribe request.
pub(crate) struct Plan {
    filter: Filter,
    start: Start,
    max_events: u64,
}

enum Start {
    Beginning,
    Now,
    After(String),
}

/// Checks a request; errors name the field.
pub(crate) fn plan(req: pb::SubscribeRequest) -> Result<Plan, Status> {
    for (i, t) in req.stream_types.iter().enumerate() {
        if StreamId::new(t.as_str(), "x").is_err() {
            return Err(Status::invalid_argument(format!(
                "stream_types[{i}]: {} is not a stream type (1 to 64 characters of [a-z0-9_-])",
                esq_domain::quote(t)
            )));
        }
    }
    if !req.stream_id_prefix.is_empty() {
        esq_domain::ids::validate_id("stream_id_prefix", &req.stream_id_prefix)
            .map_err(convert::status_from_domain)?;
    }
    for (i, t) in req.event_types.iter().enumerate() {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(Status::invalid_argument(format!(
                "event_types[{i}]: {} is not an event type (1 to 128 characters of \
                 [A-Za-z0-9._-])",
                esq_domain::quote(t)
            )));
        }
    }
    let start = match req.start {
        None | Some(pb::subscribe_request::Start::FromStart(_)) => Start::Beginning,
        Some(pb::subscribe_request::Start::FromNow(_)) => Start::Now,
        Some(pb::subscribe_request::Start::After(p)) => Start::After(p),
    };
    Ok(Plan {
        filter: Filter {
            stream_types: req.stream_types,
            id_prefix: req.stream_id_prefix,
            event_types: req.event_types,
        },
        start,
        max_events: if req.max_events == 0 {
            u64::MAX
        } else {
            u64::from(req.max_events)
        },
    })
}

type Tx = mpsc::Sender<Result<pb::SubscribeResponse, Status>>;

/// Why a subscription stopped.
enum Stop {
    /// The client went away or got what it asked for.
    Done,
    /// Tell the client this, then stop.
    Fail(Status),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Fail(s)
    }
}

/// One subscription: its position, the changes fetched and not yet processed, its channel.
pub(crate) struct Subscription<S> {
    store: Arc<S>,
    filter: Filter,
    token: Token,
    remaining: u64,
    poll_interval: Duration,
    heads: Vec<VecDeque<(Change, String)>>,
    drained: Vec<bool>,
    caught_up: bool,
    /// The caught-up marker is sent only after a full drain of every shard by polls made at or
    /// after this (µs): the subscription's start plus the feed's visibility lag, so everything
    /// committed before the subscription started precedes it.
    catch_up_horizon: i64,
    /// When the current round of polls began: a round delivers the changes noted before its
    /// start minus the feed's visibility lag, then waits the poll interval.
    round_started: i64,
    /// Bytes of the largest event of the last page read: sizes the next page.
    largest: usize,
    tx: Tx,
}

impl<S: EventStore + ChangeFeed> Subscription<S> {
    /// Resolves the start (answering bad or expired positions as a status before any message)
    /// and returns the subscription and the receiving end of its channel.
    pub(crate) async fn start(
        store: Arc<S>,
        plan: Plan,
        poll_interval: Duration,
    ) -> Result<(Self, mpsc::Receiver<Result<pb::SubscribeResponse, Status>>), Status> {
        if !store.shared_positions() {
            return Err(Status::failed_precondition(
                "this store's change feed (Scylla CDC) keeps per-process positions and cannot \
                 serve subscribers; run write-svc with the changes-table feed",
            ));
        }
        let shards = store.shard_count();
        let token = match plan.start {
            Start::Beginning => Token {
                v: TOKEN_VERSION,
                from: None,
                s: vec![Cursor::default(); shards as usize],
            },
            Start::Now => {
                let now = now_us();
                let mut s = Vec::with_capacity(shards as usize);
                for shard in 0..shards {
                    let p = store
                        .position_before(shard, now)
                        .await
                        .map_err(status_from_store)?;
                    s.push(Cursor {
                        p,
                        t: now,
                        c: Vec::new(),
                    });
                }
                Token {
                    v: TOKEN_VERSION,
                    from: Some(now),
                    s,
                }
            }
            Start::After(text) => Token::decode(&text, shards)?,
        };
        let (tx, rx) = mpsc::channel(BUFFER);
        let store_lag = store.visibility_lag().as_micros() as i64;
        let sub = Self {
            store,
            filter: plan.filter,
            token,
            remaining: plan.max_events,
            poll_interval,
            heads: vec![VecDeque::new(); shards as usize],
            drained: vec![false; shards as usize],
            caught_up: false,
            catch_up_horizon: now_us() + store_lag,
            round_started: now_us(),
            largest: PAGE_BYTES,
            tx,
        };
        sub.check_retention()?;
        Ok((sub, rx))
    }

    /// OUT_OF_RANGE if a shard's position is older than what the feed keeps.
    fn check_retention(&self) -> Result<(), Status> {
        let Some(retention) = self.store.retention() else {
            return Ok(());
        };
        let oldest = now_us() - retention.as_micros() as i64;
        for cursor in &self.token.s {
            // A shard never read (no position, no time) starts at what the log holds.
            let started = cursor.p.is_some() || cursor.t > 0;
            if started && cursor.t < oldest {
                return Err(Status::out_of_range(format!(
                    "the position is older than the change log keeps ({} s): events after it \
                     may be gone; resubscribe with from_start (what the log still holds) or \
                     from_now",
                    retention.as_secs()
                )));
            }
        }
        Ok(())
    }

    /// Runs until the client goes away, the limit is reached, or an error (sent to the client).
    pub(crate) async fn run(mut self) {
        let tx = self.tx.clone();
        match self.pump().await {
            Ok(()) | Err(Stop::Done) => {}
            Err(Stop::Fail(status)) => {
                let _ = tx.send(Err(status)).await;
            }
        }
    }

    async fn pump(&mut self) -> Result<(), Stop> {
        loop {
            self.refill().await?;
            // Every shard of this round was polled after the round began, so each has returned
            // everything noted before `horizon`: up to there, picking the oldest head merges
            // the shards by notification time.
            let horizon = self.round_started - self.store.visibility_lag().as_micros() as i64;
            let next = (0..self.heads.len())
                .filter_map(|s| self.heads[s].front().map(|(c, _)| (c.noted_at_us, s)))
                .filter(|&(noted, _)| noted < horizon)
                .min();
            let Some((_, shard)) = next else {
                if !self.caught_up && self.round_started >= self.catch_up_horizon {
                    self.caught_up = true;
                    let message = pb::subscribe_response::Message::CaughtUp(pb::CaughtUp {});
                    self.send(message).await?;
                }
                self.idle().await?;
                self.drained.fill(false);
                self.round_started = now_us();
                continue;
            };
            let (change, position) = self.heads[shard].front().cloned().ok_or(Stop::Done)?;
            if self.process(shard, &change).await? {
                self.heads[shard].pop_front();
                self.token.advance(shard, position, change.noted_at_us);
            } else {
                // The append may still be in flight: look again after a while.
                self.idle().await?;
            }
        }
    }

    /// Polls every shard that has no change waiting and may have more.
    async fn refill(&mut self) -> Result<(), Stop> {
        for shard in 0..self.heads.len() {
            if !self.heads[shard].is_empty() || self.drained[shard] {
                continue;
            }
            self.check_retention()?;
            let polled_at = now_us();
            let page = self
                .store
                .poll(shard as u32, self.token.s[shard].p.as_deref(), CHANGE_PAGE)
                .await
                .map_err(status_from_store)?;
            if page.changes.len() < CHANGE_PAGE as usize {
                self.drained[shard] = true;
                if page.changes.is_empty() {
                    let cursor = &mut self.token.s[shard];
                    // Everything noted before the poll's horizon has been seen.
                    let lag = self.store.visibility_lag().as_micros() as i64;
                    cursor.t = cursor.t.max(polled_at - lag);
                }
            }
            self.heads[shard].extend(page.changes.into_iter().zip(page.positions));
        }
        Ok(())
    }

    /// Waits the poll interval, or returns `Done` as soon as the client goes away.
    async fn idle(&self) -> Result<(), Stop> {
        tokio::select! {
            _ = tokio::time::sleep(self.poll_interval) => Ok(()),
            _ = self.tx.closed() => Err(Stop::Done),
        }
    }

    async fn send(&mut self, message: pb::subscribe_response::Message) -> Result<(), Stop> {
        let response = pb::SubscribeResponse {
            message: Some(message),
            position: self.token.encode(),
        };
        self.tx.send(Ok(response)).await.map_err(|_| Stop::Done)
    }

    /// Delivers what `change` owns; false if its events are not all in the store yet and it is
    /// not an orphan (try again later).
    async fn process(&mut self, shard: usize, change: &Change) -> Result<bool, Stop> {
        let stream = &change.stream;
        if !self.filter.stream(stream) || change.last_version <= self.token.claimed(shard, stream) {
            return Ok(true);
        }
        // Judged by the time before the store is read, as the projector does.
        let checked_at = now_us();
        let head = self
            .store
            .read(stream, ReadRequest::forwards(change.last_version, 1))
            .await
            .map_err(status_from_store)?;
        if head.is_empty() {
            let deadline = self.store.append_deadline();
            return Ok(esq_eventstore::is_orphan(change, checked_at, deadline));
        }
        let mut from = change
            .first_version
            .max(self.token.claimed(shard, stream) + 1);
        while from <= change.last_version {
            let limit = next_page(self.largest, change.last_version - from + 1);
            let mut page = self
                .store
                .read(stream, ReadRequest::forwards(from, limit))
                .await
                .map_err(status_from_store)?;
            // Only what fits the byte budget is held while the client is slow.
            page.truncate(fitting(&page));
            let Some(last) = page.last().map(|e| e.version) else {
                tracing::error!(%stream, from, "events vanished from the store during a read");
                return Err(Stop::Fail(Status::internal("internal error")));
            };
            self.largest = page.iter().map(event_bytes).max().unwrap_or(1);
            for event in page {
                if event.version > change.last_version {
                    break;
                }
                // Recorded before this change was noted: an earlier append's event, which
                // that append's own change delivered.
                let earlier = event.recorded_at_us + CLAIM_SLACK_US < change.noted_at_us;
                let before_start = self.token.from.is_some_and(|f| event.recorded_at_us < f);
                if earlier || before_start {
                    continue;
                }
                self.token
                    .claim(shard, stream, event.version, event.recorded_at_us);
                if self.filter.event(&event) {
                    let message =
                        pb::subscribe_response::Message::Event(convert::recorded_event(event));
                    self.send(message).await?;
                    self.remaining -= 1;
                    if self.remaining == 0 {
                        return Err(Stop::Done);
                    }
                }
            }
            from = last + 1;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: &str) -> StreamId {
        StreamId::new("s", id).expect("valid")
    }

    #[test]
    fn tokens_round_trip_and_claims_expire_with_the_shard() {
        let mut token = Token {
            v: TOKEN_VERSION,
            from: Some(5),
            s: vec![Cursor::default(); 2],
        };
        token.claim(1, &stream("a"), 3, 1_000_000);
        token.claim(1, &stream("a"), 4, 1_000_100);
        token.claim(1, &stream("b"), 1, 2_000_000);
        assert_eq!(token.claimed(1, &stream("a")), 4);
        assert_eq!(token.claimed(0, &stream("a")), 0);
        let decoded = Token::decode(&token.encode(), 2).expect("decodes");
        assert_eq!(decoded, token);
        // A change noted after a's event (plus the slack) drops a's claim, not b's.
        token.advance(1, "7".into(), 1_000_100 + CLAIM_SLACK_US + 1);
        assert_eq!(token.claimed(1, &stream("a")), 0);
        assert_eq!(token.claimed(1, &stream("b")), 1);
        assert_eq!(token.s[1].p.as_deref(), Some("7"));
    }

    #[test]
    fn foreign_positions_are_refused_by_field() {
        let wrong = Token::decode("not a token!", 1).expect_err("refused");
        assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
        assert!(wrong.message().starts_with("after:"), "{}", wrong.message());
        let token = Token {
            v: TOKEN_VERSION,
            from: None,
            s: vec![Cursor::default(); 16],
        };
        let shards = Token::decode(&token.encode(), 1).expect_err("refused");
        assert!(
            shards.message().contains("16 shards"),
            "{}",
            shards.message()
        );
    }
}
