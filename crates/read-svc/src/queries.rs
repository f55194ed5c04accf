//! The query services: requests in, read-model documents out; the temporal queries of the same
//! services are [`History`]'s, which reads the event store instead.

use crate::history::History;
use crate::wait::Reader;
use esq::convert::{self, status_from_domain};
use esq::pb::bookshop::v1 as book_pb;
use esq::pb::cart::v1 as cart_pb;
use esq::pb::v1 as pb;
use esq_domain::bookshop::{self, BookProjection, BookView};
use esq_domain::cart::{CartProjection, CartView};
use esq_domain::ids::validate_id;
use esq_domain::projection::{doc_version, Projection};
use esq_domain::state::{state_json, StateProjection};
use esq_eventstore::EventStore;
use esq_readstore::ReadStore;
use tonic::{Request, Response, Status};

/// Default and largest ListBooks page.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

/// `esq.cart.v1.CartQueries`.
pub(crate) struct CartQueriesApi<R, H>(pub(crate) Reader<R>, pub(crate) History<H>);

#[tonic::async_trait]
impl<R: ReadStore, H: EventStore> cart_pb::cart_queries_server::CartQueries
    for CartQueriesApi<R, H>
{
    async fn get_cart(
        &self,
        request: Request<cart_pb::GetCartRequest>,
    ) -> Result<Response<cart_pb::Cart>, Status> {
        let (metadata, _, r) = request.into_parts();
        validate_id("cart_id", &r.cart_id).map_err(status_from_domain)?;
        let doc = self
            .0
            .get_at_least(&metadata, CartProjection.name(), &r.cart_id, r.min_version)
            .await?
            .ok_or_else(|| Status::not_found(format!("cart {} not found", r.cart_id)))?;
        Ok(Response::new(convert::cart(
            r.cart_id,
            CartView::from_doc(&doc),
        )))
    }

    async fn get_cart_at(
        &self,
        request: Request<cart_pb::GetCartAtRequest>,
    ) -> Result<Response<cart_pb::Cart>, Status> {
        self.1
            .cart_at(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn sales_report(
        &self,
        request: Request<cart_pb::SalesReportRequest>,
    ) -> Result<Response<cart_pb::SalesReportResponse>, Status> {
        self.1
            .sales_report(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_sku_sales(
        &self,
        request: Request<cart_pb::GetSkuSalesRequest>,
    ) -> Result<Response<cart_pb::SkuSales>, Status> {
        crate::derived::get_sku_sales(&self.0, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_sku_sales(
        &self,
        request: Request<cart_pb::ListSkuSalesRequest>,
    ) -> Result<Response<cart_pb::ListSkuSalesResponse>, Status> {
        crate::derived::list_sku_sales(&self.0, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// `esq.bookshop.v1.BookQueries`.
pub(crate) struct BookQueriesApi<R, H>(pub(crate) Reader<R>, pub(crate) History<H>);

#[tonic::async_trait]
impl<R: ReadStore, H: EventStore> book_pb::book_queries_server::BookQueries
    for BookQueriesApi<R, H>
{
    async fn get_book_at(
        &self,
        request: Request<book_pb::GetBookAtRequest>,
    ) -> Result<Response<book_pb::Book>, Status> {
        self.1
            .book_at(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_books_at(
        &self,
        request: Request<book_pb::ListBooksAtRequest>,
    ) -> Result<Response<book_pb::ListBooksResponse>, Status> {
        self.1
            .list_books_at(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_book(
        &self,
        request: Request<book_pb::GetBookRequest>,
    ) -> Result<Response<book_pb::Book>, Status> {
        let (metadata, _, r) = request.into_parts();
        let isbn = bookshop::normalize_isbn(&r.isbn).map_err(status_from_domain)?;
        let doc = self
            .0
            .get_at_least(&metadata, BookProjection.name(), &isbn, r.min_version)
            .await?;
        doc.as_ref()
            .and_then(BookView::from_doc)
            .map(|v| Response::new(convert::book(v)))
            .ok_or_else(|| Status::not_found(format!("book {isbn} not found")))
    }

    async fn get_author(
        &self,
        request: Request<book_pb::GetAuthorRequest>,
    ) -> Result<Response<book_pb::Author>, Status> {
        crate::derived::get_author(&self.0, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_authors(
        &self,
        request: Request<book_pb::ListAuthorsRequest>,
    ) -> Result<Response<book_pb::ListAuthorsResponse>, Status> {
        crate::derived::list_authors(&self.0, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_books(
        &self,
        request: Request<book_pb::ListBooksRequest>,
    ) -> Result<Response<book_pb::ListBooksResponse>, Status> {
        let r = request.into_inner();
        let (page_size, author) = book_page(r.page_size, DEFAULT_PAGE, MAX_PAGE, &r.author)?;
        let index = if author.is_empty() {
            bookshop::ALL_INDEX.to_owned()
        } else {
            bookshop::author_index(author)
        };
        let store = &self.0;
        let projection = BookProjection.name();
        let mut cursor = (!r.page_token.is_empty()).then_some(r.page_token);
        let mut books = Vec::with_capacity(page_size);
        let mut next_page_token = String::new();
        // Index entries are maintained after the fenced apply, so an entry may be stale (a
        // deleted book, an old author): each is confirmed against its document.
        'pages: loop {
            let ids = store
                .index_page(projection, &index, cursor.as_deref(), page_size)
                .await?;
            let exhausted = ids.len() < page_size;
            let docs =
                futures::future::try_join_all(ids.iter().map(|id| store.get(projection, id)))
                    .await?;
            for (id, doc) in ids.iter().zip(docs) {
                cursor = Some(id.clone());
                let Some(view) = doc.as_ref().and_then(BookView::from_doc) else {
                    continue;
                };
                if !author.is_empty() && view.author != author {
                    continue;
                }
                books.push(convert::book(view));
                if books.len() == page_size {
                    let more = !store
                        .index_page(projection, &index, Some(id), 1)
                        .await?
                        .is_empty();
                    if more {
                        next_page_token = id.clone();
                    }
                    break 'pages;
                }
            }
            if exhausted {
                break;
            }
        }
        Ok(Response::new(book_pb::ListBooksResponse {
            books,
            next_page_token,
        }))
    }
}

/// `esq.v1.StateQueries`.
pub(crate) struct StateQueriesApi<R>(pub(crate) Reader<R>);

#[tonic::async_trait]
impl<R: ReadStore> pb::state_queries_server::StateQueries for StateQueriesApi<R> {
    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let stream = convert::stream_id(r.stream.as_ref()).map_err(status_from_domain)?;
        let doc_id = StateProjection.doc_id(&stream);
        let doc = self
            .0
            .get_at_least(&metadata, StateProjection.name(), &doc_id, r.min_version)
            .await?
            .ok_or_else(|| Status::not_found(format!("stream {stream} not found")))?;
        Ok(Response::new(pb::GetStateResponse {
            stream: Some(convert::stream_ref(&stream)),
            version: doc_version(&doc),
            state: Some(convert::to_struct(state_json(&doc))),
        }))
    }
}

/// A book listing's page size (`default` for 0, at most `max`) and author filter (trimmed, as
/// authors are stored), or INVALID_ARGUMENT naming the field.
pub(crate) fn book_page(
    page_size: u32,
    default: usize,
    max: usize,
    author: &str,
) -> Result<(usize, &str), Status> {
    let page_size = match page_size as usize {
        0 => default,
        n if n > max => {
            return Err(Status::invalid_argument(format!(
                "invalid page_size: {n}, at most {max} allowed"
            )))
        }
        n => n,
    };
    let author = author.trim();
    if author.len() > bookshop::MAX_TEXT_LEN {
        return Err(Status::invalid_argument(format!(
            "invalid author: {} bytes, at most {} allowed",
            author.len(),
            bookshop::MAX_TEXT_LEN
        )));
    }
    Ok((page_size, author))
}
