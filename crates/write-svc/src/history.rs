//! Temporal queries: streams as they were at a version or a time, folded straight from the event
//! store. The write side owns history, so these never ask the read model.
//!
//! Every answer is a fold of the stream's events up to the point asked for, through the same
//! [`Folded::extend`] the executor decides commands on and the read stores apply (upcasters
//! included), one page of events at a time: a point query costs one read of one stream. The
//! catalogue listing and the sales report walk every stream of the store, one page of streams
//! and one stream at a time, so their memory does not grow with the store.

use crate::error::status_from_store;
use esq::convert::{self, status_from_domain};
use esq::pb::bookshop::v1 as book_pb;
use esq::pb::cart::v1 as cart_pb;
use esq_domain::aggregate::Folded;
use esq_domain::bookshop::{self, BookProjection, BookView};
use esq_domain::cart::{self, Cart, CartProjection, CartStatus, CartView};
use esq_domain::ids::validate_id;
use esq_domain::projection::Projection;
use esq_domain::StreamId;
use esq_eventstore::{EventStore, ReadRequest, StoreError};
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Events per read of a stream being folded.
const FOLD_PAGE: u32 = 500;
/// Streams per page of a walk over the store.
const STREAM_PAGE: u32 = 500;
/// Default and largest ListBooksAt page, as for ListBooks.
const DEFAULT_BOOKS: usize = 50;
const MAX_BOOKS: usize = 500;

/// A point in a stream's history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AsOf {
    /// Every event.
    #[default]
    Now,
    /// The events at or below this version.
    Version(u64),
    /// The events recorded at or before this time, µs since the Unix epoch (inclusive).
    TimeUs(i64),
}

impl AsOf {
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

    /// The point named by an optional time in µs since the Unix epoch (unset: now).
    fn time(time_us: Option<i64>) -> AsOf {
        time_us.map_or(AsOf::Now, AsOf::TimeUs)
    }
}

impl From<Option<esq::pb::v1::get_state_at_request::AsOf>> for AsOf {
    fn from(as_of: Option<esq::pb::v1::get_state_at_request::AsOf>) -> Self {
        use esq::pb::v1::get_state_at_request::AsOf as Wire;
        match as_of {
            None => AsOf::Now,
            Some(Wire::Version(v)) => AsOf::Version(v),
            Some(Wire::Time(t)) => AsOf::TimeUs(convert::micros(&t)),
        }
    }
}

impl From<Option<cart_pb::get_cart_at_request::AsOf>> for AsOf {
    fn from(as_of: Option<cart_pb::get_cart_at_request::AsOf>) -> Self {
        use cart_pb::get_cart_at_request::AsOf as Wire;
        match as_of {
            None => AsOf::Now,
            Some(Wire::Version(v)) => AsOf::Version(v),
            Some(Wire::Time(t)) => AsOf::TimeUs(convert::micros(&t)),
        }
    }
}

impl From<Option<book_pb::get_book_at_request::AsOf>> for AsOf {
    fn from(as_of: Option<book_pb::get_book_at_request::AsOf>) -> Self {
        use book_pb::get_book_at_request::AsOf as Wire;
        match as_of {
            None => AsOf::Now,
            Some(Wire::Version(v)) => AsOf::Version(v),
            Some(Wire::Time(t)) => AsOf::TimeUs(convert::micros(&t)),
        }
    }
}

/// Folds `stream`'s events up to `as_of` through `projection`, a page at a time, with the fold
/// every other reader of events uses. Version 0: the stream had no events at that point.
pub async fn fold_at<S: EventStore, P: Projection>(
    store: &S,
    stream: &StreamId,
    projection: &P,
    as_of: AsOf,
) -> Result<Folded, StoreError> {
    let mut folded = Folded::default();
    loop {
        let page = store.read(stream, as_of.read_from(folded.version + 1)).await?;
        let before = folded.version;
        folded.extend(projection, &page);
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

/// The store's streams of one kind, a page of streams at a time.
struct Streams<'a, S> {
    store: &'a S,
    kind: &'static str,
    /// The cursor the current page was listed from.
    page_cursor: Option<String>,
    /// The cursor of the page after it; `None` after the last page.
    next: Option<String>,
    started: bool,
    page: std::vec::IntoIter<StreamId>,
}

impl<'a, S: EventStore> Streams<'a, S> {
    /// The streams of `kind` from `cursor` (a [`StreamPage`](esq_eventstore::StreamPage) cursor).
    fn new(store: &'a S, kind: &'static str, cursor: Option<String>) -> Self {
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
    async fn next(&mut self) -> Result<Option<StreamId>, Status> {
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
                .await
                .map_err(status_from_store)?;
            self.next = page.next;
            self.page = page.streams.into_iter();
        }
    }

    /// The cursor of the page the last stream returned was listed in.
    fn page_cursor(&self) -> &Option<String> {
        &self.page_cursor
    }
}

/// `esq.cart.v1.CartHistory`.
pub struct CartHistoryApi<S>(pub Arc<S>);

#[tonic::async_trait]
impl<S: EventStore> cart_pb::cart_history_server::CartHistory for CartHistoryApi<S> {
    async fn get_cart_at(
        &self,
        request: Request<cart_pb::GetCartAtRequest>,
    ) -> Result<Response<cart_pb::Cart>, Status> {
        let r = request.into_inner();
        validate_id("cart_id", &r.cart_id).map_err(status_from_domain)?;
        let stream = StreamId::new(cart::KIND, r.cart_id.clone()).map_err(status_from_domain)?;
        let folded = fold_at(&*self.0, &stream, &CartProjection, r.as_of.into())
            .await
            .map_err(status_from_store)?;
        if folded.version == 0 {
            return Err(Status::not_found(format!(
                "cart {} had no events at that point",
                r.cart_id
            )));
        }
        Ok(Response::new(convert::cart(
            r.cart_id,
            CartView::from_doc(&folded.doc),
        )))
    }

    async fn sales_report(
        &self,
        request: Request<cart_pb::SalesReportRequest>,
    ) -> Result<Response<cart_pb::SalesReportResponse>, Status> {
        let r = request.into_inner();
        let from = r.from.as_ref().map_or(i64::MIN, convert::micros);
        let to = AsOf::time(r.to.as_ref().map(convert::micros));
        if let AsOf::TimeUs(to) = to {
            if from > to {
                return Err(Status::invalid_argument(
                    "invalid from: it is after to; the range is [from, to]",
                ));
            }
        }
        let mut report = cart_pb::SalesReportResponse::default();
        let mut skus = BTreeMap::<String, cart_pb::SkuSales>::new();
        // Carts never change after their checkout, so the cart folded up to `to` is the cart
        // as it was checked out, if that was within the range.
        let mut streams = Streams::new(&*self.0, cart::KIND, None);
        while let Some(stream) = streams.next().await? {
            let folded = fold_at(&*self.0, &stream, &CartProjection, to)
                .await
                .map_err(status_from_store)?;
            let cart: Cart = folded.state();
            let checked_out_at = CartView::from_doc(&folded.doc).checked_out_at_us;
            if cart.status != CartStatus::CheckedOut || checked_out_at.is_none_or(|t| t < from) {
                continue;
            }
            report.carts += 1;
            report.revenue_cents = report.revenue_cents.saturating_add(cart.total_cents());
            for (sku, line) in cart.lines {
                let sales = skus.entry(sku.clone()).or_insert_with(|| cart_pb::SkuSales {
                    sku,
                    ..Default::default()
                });
                sales.revenue_cents = sales
                    .revenue_cents
                    .saturating_add(line.quantity.saturating_mul(line.unit_price_cents));
                sales.units = sales.units.saturating_add(line.quantity);
                sales.carts += 1;
            }
        }
        report.skus = skus.into_values().collect();
        Ok(Response::new(report))
    }
}

/// `esq.bookshop.v1.BookHistory`.
pub struct BookHistoryApi<S>(pub Arc<S>);

/// A ListBooksAt page token: the last book returned and the cursor of the page of streams it
/// was listed in (empty for the first), separated by a space, which ids cannot hold.
fn books_token(last: &str, cursor: &Option<String>) -> String {
    format!("{last} {}", cursor.as_deref().unwrap_or_default())
}

/// The last book returned and the stream cursor to resume from, from a page token.
fn parse_books_token(token: &str) -> Result<Option<(String, Option<String>)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Status::invalid_argument("invalid page_token: not one this service gave");
    let (last, cursor) = token.split_once(' ').ok_or_else(invalid)?;
    validate_id("page_token", last).map_err(|_| invalid())?;
    Ok(Some((
        last.to_owned(),
        (!cursor.is_empty()).then(|| cursor.to_owned()),
    )))
}

#[tonic::async_trait]
impl<S: EventStore> book_pb::book_history_server::BookHistory for BookHistoryApi<S> {
    async fn get_book_at(
        &self,
        request: Request<book_pb::GetBookAtRequest>,
    ) -> Result<Response<book_pb::Book>, Status> {
        let r = request.into_inner();
        let isbn = bookshop::normalize_isbn(&r.isbn).map_err(status_from_domain)?;
        let stream = StreamId::new(bookshop::KIND, isbn.clone()).map_err(status_from_domain)?;
        let folded = fold_at(&*self.0, &stream, &BookProjection, r.as_of.into())
            .await
            .map_err(status_from_store)?;
        BookView::from_doc(&folded.doc)
            .map(|v| Response::new(convert::book(v)))
            .ok_or_else(|| Status::not_found(format!("book {isbn} did not exist at that point")))
    }

    async fn list_books_at(
        &self,
        request: Request<book_pb::ListBooksAtRequest>,
    ) -> Result<Response<book_pb::ListBooksResponse>, Status> {
        let r = request.into_inner();
        let page_size = match r.page_size as usize {
            0 => DEFAULT_BOOKS,
            n if n > MAX_BOOKS => {
                return Err(Status::invalid_argument(format!(
                    "invalid page_size: {n}, at most {MAX_BOOKS} allowed"
                )))
            }
            n => n,
        };
        // Authors are stored trimmed, so the filter is too.
        let author = r.author.trim();
        if author.len() > bookshop::MAX_TEXT_LEN {
            return Err(Status::invalid_argument(format!(
                "invalid author: {} bytes, at most {} allowed",
                author.len(),
                bookshop::MAX_TEXT_LEN
            )));
        }
        let as_of = AsOf::time(r.time.as_ref().map(convert::micros));
        let (mut after, cursor) = match parse_books_token(&r.page_token)? {
            Some((last, cursor)) => (Some(last), cursor),
            None => (None, None),
        };
        let mut response = book_pb::ListBooksResponse::default();
        // The cursor of the page of streams the last book returned was listed in.
        let mut last_cursor = None;
        // Streams are never removed and keep their order, so the last book returned is listed
        // again after its page's cursor; streams created since then did not exist at `as_of`.
        let mut streams = Streams::new(&*self.0, bookshop::KIND, cursor);
        while let Some(stream) = streams.next().await? {
            if let Some(last) = &after {
                if stream.id == *last {
                    after = None;
                }
                continue;
            }
            let folded = fold_at(&*self.0, &stream, &BookProjection, as_of)
                .await
                .map_err(status_from_store)?;
            let Some(view) = BookView::from_doc(&folded.doc) else {
                continue;
            };
            if !author.is_empty() && view.author != author {
                continue;
            }
            if response.books.len() == page_size {
                // One more book exists: the page ends at the one before.
                let last = response.books.last().map(|b| b.isbn.as_str());
                response.next_page_token = books_token(last.unwrap_or_default(), &last_cursor);
                break;
            }
            last_cursor.clone_from(streams.page_cursor());
            response.books.push(convert::book(view));
        }
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        let cursor = Some("book/978 x".to_owned());
        let token = books_token("9780441478125", &cursor);
        assert_eq!(
            parse_books_token(&token).expect("valid"),
            Some(("9780441478125".to_owned(), cursor))
        );
        let token = books_token("9780441478125", &None);
        assert_eq!(
            parse_books_token(&token).expect("valid"),
            Some(("9780441478125".to_owned(), None))
        );
        assert_eq!(parse_books_token("").expect("valid"), None);
        assert!(parse_books_token("no-space").is_err());
    }
}
