//! Reading history: a stream folded up to a version or a time, and a walk over every stream of
//! one kind, for the temporal queries (`EventStore/GetStateAt` in write-svc, `GetCartAt`,
//! `SalesReport`, `GetBookAt` and `ListBooksAt` in read-svc).
//!
//! There is no fold here: [`fold_at`] feeds the store's pages to [`Folded::extend`], the one fold
//! the executor decides commands on and the projector applies (upcasters included). Memory is
//! bounded: one page of events ([`FOLD_PAGE`]) or one page of stream ids ([`STREAM_PAGE`]) at a
//! time, however long the stream or large the store.

use crate::{EventStore, ReadRequest, StoreError};
use esq_domain::aggregate::Folded;
use esq_domain::projection::Projection;
use esq_domain::StreamId;

/// Events per read of a stream being folded.
pub const FOLD_PAGE: u32 = 500;
/// Stream ids per page of a walk over the store.
pub const STREAM_PAGE: u32 = 500;

/// A point in a stream's history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AsOf {
    /// Every event.
    #[default]
    Now,
    /// The events at or below this version.
    Version(u64),
    /// The events recorded at or before this time, µs since the Unix epoch (inclusive: an
    /// event recorded at exactly this microsecond is included).
    TimeUs(i64),
}

impl AsOf {
    /// The point named by an optional time in µs since the Unix epoch (unset: now).
    pub fn time(time_us: Option<i64>) -> AsOf {
        time_us.map_or(AsOf::Now, AsOf::TimeUs)
    }

    /// A read of the page from `from` on, bounded to this point.
    fn read_from(self, from: u64) -> ReadRequest {
        let mut request = ReadRequest::forwards(from, FOLD_PAGE);
        match self {
            AsOf::Now => {}
            AsOf::Version(v) => request.until_version = Some(v),
            AsOf::TimeUs(t) => request.until_time_us = Some(t),
        }
        request
    }
}

/// Folds `stream`'s events up to `as_of` through `projection`, a page at a time, with the fold
/// every other reader of events uses. Version 0: the stream had no events at that point.
pub async fn fold_at<S: EventStore + ?Sized, P: Projection>(
    store: &S,
    stream: &StreamId,
    projection: &P,
    as_of: AsOf,
) -> Result<Folded, StoreError> {
    let mut folded = Folded::default();
    loop {
        let page = store
            .read(stream, as_of.read_from(folded.version + 1))
            .await?;
        let before = folded.version;
        folded.extend(projection, &page)?;
        if page.len() < FOLD_PAGE as usize {
            return Ok(folded);
        }
        if folded.version <= before {
            // A store that returned a full page not continuing the stream would loop forever.
            return Err(StoreError::Internal(format!(
                "stream {stream}: a read from version {} did not continue the stream",
                before + 1
            )));
        }
    }
}

/// The store's streams of one kind, in the store's stream order, one page of ids at a time.
///
/// Streams are never removed and keep their place in that order, so a walk resumed from a
/// page cursor ([`Streams::page_cursor`]) sees every stream it had not reached yet.
pub struct Streams<'a, S: ?Sized> {
    store: &'a S,
    kind: &'a str,
    /// The cursor the current page was listed from (`None`: the first page).
    page_cursor: Option<String>,
    /// The cursor of the page after it; `None` after the last page.
    next: Option<String>,
    started: bool,
    page: std::vec::IntoIter<StreamId>,
}

impl<'a, S: EventStore + ?Sized> Streams<'a, S> {
    /// The streams of `kind` from `cursor` (a [`StreamPage`](crate::StreamPage) cursor; `None`
    /// for the start).
    pub fn new(store: &'a S, kind: &'a str, cursor: Option<String>) -> Self {
        Self {
            store,
            kind,
            page_cursor: cursor,
            next: None,
            started: false,
            page: Vec::new().into_iter(),
        }
    }

    /// The next stream; `None` when the store has no more.
    pub async fn next(&mut self) -> Result<Option<StreamId>, StoreError> {
        loop {
            if let Some(stream) = self.page.by_ref().find(|s| s.kind == self.kind) {
                return Ok(Some(stream));
            }
            if self.started {
                match self.next.take() {
                    Some(next) => self.page_cursor = Some(next),
                    None => return Ok(None),
                }
            }
            self.started = true;
            let page = self
                .store
                .list_streams(self.page_cursor.clone(), STREAM_PAGE)
                .await?;
            self.next = page.next;
            self.page = page.streams.into_iter();
        }
    }

    /// The cursor of the page the last stream returned was listed in: a walk started from it
    /// lists that stream again, then the ones after it.
    pub fn page_cursor(&self) -> Option<&str> {
        self.page_cursor.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedStore;
    use esq_domain::state::{state_json, StateProjection};
    use esq_domain::{ExpectedVersion, NewEvent};

    fn json(n: u64) -> NewEvent {
        NewEvent::json("Changed", 1, &serde_json::json!({ "n": n }))
    }

    #[tokio::test]
    async fn folds_across_pages_and_walks_streams_of_one_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let long = StreamId::new("order", "long").expect("id");
        // More than one page of events, so the fold continues across reads.
        let events: Vec<_> = (1..=u64::from(FOLD_PAGE) + 7).map(json).collect();
        for chunk in events.chunks(50) {
            store
                .append(&long, ExpectedVersion::Any, chunk)
                .await
                .expect("append");
        }
        let all = fold_at(&store, &long, &StateProjection, AsOf::Now)
            .await
            .expect("fold");
        assert_eq!(all.version, u64::from(FOLD_PAGE) + 7);
        let n = |f: &Folded| state_json(&f.doc).get("n").cloned();
        assert_eq!(n(&all), Some(serde_json::json!(all.version)));
        let at = fold_at(&store, &long, &StateProjection, AsOf::Version(503))
            .await
            .expect("fold");
        assert_eq!((at.version, n(&at)), (503, Some(serde_json::json!(503))));
        let missing = StreamId::new("order", "missing").expect("id");
        let none = fold_at(&store, &missing, &StateProjection, AsOf::Now)
            .await
            .expect("fold");
        assert_eq!(none.version, 0);

        for i in 0..3 {
            let other = StreamId::new("other", format!("o{i}")).expect("id");
            store
                .append(&other, ExpectedVersion::Any, &[json(1)])
                .await
                .expect("append");
        }
        let mut walk = Streams::new(&store, "order", None);
        let mut seen = Vec::new();
        while let Some(s) = walk.next().await.expect("next") {
            seen.push(s.id);
        }
        assert_eq!(seen, ["long"]);
        let mut walk = Streams::new(&store, "other", None);
        let mut n = 0;
        while walk.next().await.expect("next").is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
    }
}
