//! Temporal queries: carts and books as they were at a version or a time, the catalogue as it
//! was, and the sales report — `CartQueries/GetCartAt`, `CartQueries/SalesReport`,
//! `BookQueries/GetBookAt` and `BookQueries/ListBooksAt`.
//!
//! These are read-svc's only calls that read the event store, and they never read the read
//! model: the read model only knows the present. Every answer is a fold of a stream's events up
//! to the point asked for through [`fold_at`], i.e. through the one domain fold (upcasters
//! included), a page of events at a time: a point query costs one read of one stream. The
//! catalogue listing and the sales report walk the store's streams ([`Streams`]) one page of
//! ids and one stream at a time, so their memory does not grow with the store; their time does.

use esq::convert::{self, status_from_domain};
use esq::pb::bookshop::v1 as book_pb;
use esq::pb::cart::v1 as cart_pb;
use esq_domain::bookshop::{self, BookProjection, BookView};
use esq_domain::cart::{self, Cart, CartProjection, CartStatus, CartView};
use esq_domain::ids::validate_id;
use esq_domain::StreamId;
use esq_eventstore::history::{fold_at, AsOf, Streams};
use esq_eventstore::{EventStore, StoreError};
use esq_runtime::store_status::status_from_store;
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::Status;

/// Default and largest ListBooksAt page, as for ListBooks.
const DEFAULT_BOOKS: usize = 50;
const MAX_BOOKS: usize = 500;

/// The setting read-svc needs for temporal queries, as the FAILED_PRECONDITION names it.
pub const MISSING_STORE: &str = "temporal queries read the event store, and this read-svc has \
                                 none configured: start it with --cql-nodes (ESQ_CQL_NODES)";

/// The event store temporal queries read, if read-svc was given one.
pub(crate) struct History<H>(Option<Arc<H>>);

impl<H> Clone for History<H> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// A client's time field in µs, refusing an invalid timestamp.
fn time_us(field: &str, ts: &prost_types::Timestamp) -> Result<i64, Status> {
    convert::checked_micros(field, ts).map_err(status_from_domain)
}

/// The point of a GetCartAt / GetBookAt request.
fn as_of(version: Option<u64>, time: Option<&prost_types::Timestamp>) -> Result<AsOf, Status> {
    Ok(match (version, time) {
        (Some(v), _) => AsOf::Version(v),
        (None, Some(t)) => AsOf::TimeUs(time_us("time", t)?),
        (None, None) => AsOf::Now,
    })
}

impl<H: EventStore> History<H> {
    /// Temporal queries on `store`; `None` makes them answer FAILED_PRECONDITION.
    pub(crate) fn new(store: Option<Arc<H>>) -> Self {
        Self(store)
    }

    fn store(&self) -> Result<&H, Status> {
        self.0
            .as_deref()
            .ok_or_else(|| Status::failed_precondition(MISSING_STORE))
    }

    /// `CartQueries/GetCartAt`.
    pub(crate) async fn cart_at(
        &self,
        r: cart_pb::GetCartAtRequest,
    ) -> Result<cart_pb::Cart, Status> {
        use cart_pb::get_cart_at_request::AsOf as Wire;
        validate_id("cart_id", &r.cart_id).map_err(status_from_domain)?;
        let as_of = match &r.as_of {
            Some(Wire::Version(v)) => as_of(Some(*v), None)?,
            Some(Wire::Time(t)) => as_of(None, Some(t))?,
            None => AsOf::Now,
        };
        let stream = StreamId::new(cart::KIND, r.cart_id.clone()).map_err(status_from_domain)?;
        let folded = fold_at(self.store()?, &stream, &CartProjection, as_of)
            .await
            .map_err(status_from_store)?;
        if folded.version == 0 {
            return Err(Status::not_found(format!(
                "cart {} had no events at that point",
                r.cart_id
            )));
        }
        Ok(convert::cart(r.cart_id, CartView::from_doc(&folded.doc)))
    }

    /// `CartQueries/SalesReport`.
    pub(crate) async fn sales_report(
        &self,
        r: cart_pb::SalesReportRequest,
    ) -> Result<cart_pb::SalesReportResponse, Status> {
        let from = r.from.as_ref().map(|t| time_us("from", t)).transpose()?;
        let to = r.to.as_ref().map(|t| time_us("to", t)).transpose()?;
        if let (Some(from), Some(to)) = (from, to) {
            if from > to {
                return Err(Status::invalid_argument(
                    "invalid from: it is after to; the range is [from, to]",
                ));
            }
        }
        let from = from.unwrap_or(i64::MIN);
        let store = self.store()?;
        let mut report = cart_pb::SalesReportResponse::default();
        // One entry per SKU sold: memory grows with the catalogue, not with the carts.
        let mut skus = BTreeMap::<String, cart_pb::SkuSales>::new();
        // Carts never change after their checkout, so the cart folded up to `to` is the cart
        // as it was checked out, if that was within the range.
        let mut streams = Streams::new(store, cart::KIND, None);
        while let Some(stream) = streams.next().await.map_err(status_from_store)? {
            let folded = fold_at(store, &stream, &CartProjection, AsOf::time(to))
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
                let sales = skus
                    .entry(sku.clone())
                    .or_insert_with(|| cart_pb::SkuSales {
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
        Ok(report)
    }

    /// `BookQueries/GetBookAt`.
    pub(crate) async fn book_at(
        &self,
        r: book_pb::GetBookAtRequest,
    ) -> Result<book_pb::Book, Status> {
        use book_pb::get_book_at_request::AsOf as Wire;
        let isbn = bookshop::normalize_isbn(&r.isbn).map_err(status_from_domain)?;
        let as_of = match &r.as_of {
            Some(Wire::Version(v)) => as_of(Some(*v), None)?,
            Some(Wire::Time(t)) => as_of(None, Some(t))?,
            None => AsOf::Now,
        };
        let stream = StreamId::new(bookshop::KIND, isbn.clone()).map_err(status_from_domain)?;
        let folded = fold_at(self.store()?, &stream, &BookProjection, as_of)
            .await
            .map_err(status_from_store)?;
        BookView::from_doc(&folded.doc)
            .map(convert::book)
            .ok_or_else(|| Status::not_found(format!("book {isbn} did not exist at that point")))
    }

    /// `BookQueries/ListBooksAt`.
    pub(crate) async fn list_books_at(
        &self,
        r: book_pb::ListBooksAtRequest,
    ) -> Result<book_pb::ListBooksResponse, Status> {
        let (page_size, author) =
            crate::queries::book_page(r.page_size, DEFAULT_BOOKS, MAX_BOOKS, &r.author)?;
        let as_of = AsOf::time(r.time.as_ref().map(|t| time_us("time", t)).transpose()?);
        let token = parse_books_token(&r.page_token)?;
        let store = self.store()?;
        let (mut after, cursor) = match token {
            Some((last, cursor)) => (Some(last), cursor),
            None => (None, None),
        };
        let resumed = after.is_some();
        let mut response = book_pb::ListBooksResponse::default();
        // The cursor of the page of streams the last book returned was listed in.
        let mut last_cursor = None;
        // Streams are never removed and keep their order, so the last book returned is listed
        // again from its page's cursor; streams created since then did not exist at `as_of`
        // (if it is in the past) and fold to no book.
        let mut streams = Streams::new(store, bookshop::KIND, cursor);
        loop {
            let stream = match streams.next().await {
                Ok(Some(stream)) => stream,
                Ok(None) => break,
                // Only a token can carry a cursor the store does not understand.
                Err(StoreError::Internal(_)) if resumed && after.is_some() => {
                    return Err(invalid_token())
                }
                Err(e) => return Err(status_from_store(e)),
            };
            if let Some(last) = &after {
                if stream.id == *last {
                    after = None;
                }
                continue;
            }
            let folded = fold_at(store, &stream, &BookProjection, as_of)
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
            last_cursor = streams.page_cursor().map(str::to_owned);
            response.books.push(convert::book(view));
        }
        if after.is_some() {
            // The walk never met the book the token names: not a token this service gave.
            return Err(invalid_token());
        }
        Ok(response)
    }
}

fn invalid_token() -> Status {
    Status::invalid_argument("invalid page_token: not one this service gave")
}

/// A ListBooksAt page token: the last book returned and the cursor of the page of streams it
/// was listed in (empty for the first), separated by a space, which ISBNs cannot hold.
fn books_token(last: &str, cursor: &Option<String>) -> String {
    format!("{last} {}", cursor.as_deref().unwrap_or_default())
}

/// The last book returned and the stream cursor to resume from, from a page token.
fn parse_books_token(token: &str) -> Result<Option<(String, Option<String>)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let (last, cursor) = token.split_once(' ').ok_or_else(invalid_token)?;
    let isbn = bookshop::normalize_isbn(last).map_err(|_| invalid_token())?;
    if isbn != last {
        return Err(invalid_token());
    }
    Ok(Some((
        isbn,
        (!cursor.is_empty()).then(|| cursor.to_owned()),
    )))
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
        for bad in ["no-space", "garbage x", "978-0441478125 x"] {
            let err = parse_books_token(bad).expect_err(bad);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[tokio::test]
    async fn without_a_store_temporal_queries_name_the_missing_setting() {
        let history = History::<esq_eventstore::embedded::EmbeddedStore>::new(None);
        let errors = [
            history
                .cart_at(cart_pb::GetCartAtRequest {
                    cart_id: "c-1".into(),
                    as_of: None,
                })
                .await
                .expect_err("cart at"),
            history
                .sales_report(cart_pb::SalesReportRequest::default())
                .await
                .expect_err("sales report"),
            history
                .book_at(book_pb::GetBookAtRequest {
                    isbn: "9780441172719".into(),
                    as_of: None,
                })
                .await
                .expect_err("book at"),
            history
                .list_books_at(book_pb::ListBooksAtRequest::default())
                .await
                .expect_err("list books at"),
        ];
        for err in errors {
            assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
            assert!(
                err.message().contains("--cql-nodes (ESQ_CQL_NODES)"),
                "{err:?}"
            );
        }
    }
}
