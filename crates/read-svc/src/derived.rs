//! The queries of the derived read models (`authors`, `sku_sales`): one target by id, or every
//! target in id order, paged through the projection's add-only listing index; a target whose
//! live count is 0 (every source left it) reads as absent and is skipped.

use crate::queries::book_page;
use crate::wait::{status_from_read, Reader};
use esq::convert::status_from_domain;
use esq::pb::bookshop::v1 as book_pb;
use esq::pb::cart::v1 as cart_pb;
use esq_domain::authors::{AuthorView, AuthorsProjection};
use esq_domain::bookshop::MAX_TEXT_LEN;
use esq_domain::derived::{Derived, ALL_INDEX};
use esq_domain::ids::validate_id;
use esq_domain::sku_sales::{SkuSalesProjection, SkuSalesView};
use esq_readstore::{Doc, ReadStore};
use tonic::Status;

/// Default and largest page of ListAuthors and ListSkuSales.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

impl<R: ReadStore> Reader<R> {
    /// One target of derived projection `d`, read as `view` from the generation of its
    /// source that is active.
    async fn derived_one<T>(
        &self,
        d: &dyn Derived,
        id: &str,
        view: impl Fn(&str, &Doc) -> Option<T>,
    ) -> Result<Option<T>, Status> {
        let name = self.derived_namespace(d).await?;
        let doc = self
            .store()
            .get(&name, id)
            .await
            .map_err(status_from_read)?;
        Ok(doc.and_then(|d| view(id, &d)))
    }

    /// A page of the targets of derived projection `d` after `token`, in id order: at most
    /// `size` present ones, and the token of the next page (empty on the last). The namespace
    /// is resolved once, so a page never mixes two generations.
    async fn derived_page<T>(
        &self,
        d: &dyn Derived,
        size: usize,
        token: &str,
        view: impl Fn(&str, &Doc) -> Option<T>,
    ) -> Result<(Vec<T>, String), Status> {
        let namespace = self.derived_namespace(d).await?;
        let name = namespace.as_str();
        let store = self.store();
        let mut cursor = (!token.is_empty()).then(|| token.to_owned());
        let mut out = Vec::with_capacity(size);
        loop {
            let ids = store
                .index_page(name, ALL_INDEX, cursor.as_deref(), size)
                .await
                .map_err(status_from_read)?;
            let exhausted = ids.len() < size;
            let docs = futures::future::try_join_all(ids.iter().map(|id| store.get(name, id)))
                .await
                .map_err(status_from_read)?;
            for (id, doc) in ids.iter().zip(docs) {
                cursor = Some(id.clone());
                let Some(v) = doc.and_then(|d| view(id, &d)) else {
                    continue;
                };
                out.push(v);
                if out.len() == size {
                    let more = !store
                        .index_page(name, ALL_INDEX, Some(id), 1)
                        .await
                        .map_err(status_from_read)?
                        .is_empty();
                    return Ok((out, if more { id.clone() } else { String::new() }));
                }
            }
            if exhausted {
                return Ok((out, String::new()));
            }
        }
    }
}

/// An author name as the books store it (trimmed), or INVALID_ARGUMENT naming `field`.
fn author_name<'a>(field: &str, raw: &'a str, required: bool) -> Result<&'a str, Status> {
    let author = raw.trim();
    if required && author.is_empty() {
        return Err(Status::invalid_argument(format!(
            "invalid {field}: must not be empty"
        )));
    }
    if author.len() > MAX_TEXT_LEN {
        return Err(Status::invalid_argument(format!(
            "invalid {field}: {} bytes, at most {MAX_TEXT_LEN} allowed",
            author.len()
        )));
    }
    Ok(author)
}

fn author_pb(v: AuthorView) -> book_pb::Author {
    book_pb::Author {
        author: v.author,
        books: u64::try_from(v.books).unwrap_or(0),
        min_price_cents: v.min_price_cents,
        max_price_cents: v.max_price_cents,
    }
}

fn sku_pb(v: SkuSalesView) -> cart_pb::SkuSales {
    cart_pb::SkuSales {
        sku: v.sku,
        revenue_cents: v.revenue_cents,
        units: v.units,
        carts: u64::try_from(v.carts).unwrap_or(0),
    }
}

/// `BookQueries/GetAuthor`.
pub(crate) async fn get_author<R: ReadStore>(
    reader: &Reader<R>,
    r: book_pb::GetAuthorRequest,
) -> Result<book_pb::Author, Status> {
    let author = author_name("author", &r.author, true)?;
    reader
        .derived_one(&AuthorsProjection, author, AuthorView::from_doc)
        .await?
        .map(author_pb)
        .ok_or_else(|| Status::not_found(format!("author {author:?} has no books")))
}

/// `BookQueries/ListAuthors`.
pub(crate) async fn list_authors<R: ReadStore>(
    reader: &Reader<R>,
    r: book_pb::ListAuthorsRequest,
) -> Result<book_pb::ListAuthorsResponse, Status> {
    let (size, _) = book_page(r.page_size, DEFAULT_PAGE, MAX_PAGE, "")?;
    let token = author_name("page_token", &r.page_token, false)?;
    let (authors, next_page_token) = reader
        .derived_page(&AuthorsProjection, size, token, AuthorView::from_doc)
        .await?;
    Ok(book_pb::ListAuthorsResponse {
        authors: authors.into_iter().map(author_pb).collect(),
        next_page_token,
    })
}

/// `CartQueries/GetSkuSales`.
pub(crate) async fn get_sku_sales<R: ReadStore>(
    reader: &Reader<R>,
    r: cart_pb::GetSkuSalesRequest,
) -> Result<cart_pb::SkuSales, Status> {
    validate_id("sku", &r.sku).map_err(status_from_domain)?;
    reader
        .derived_one(&SkuSalesProjection, &r.sku, SkuSalesView::from_doc)
        .await?
        .map(sku_pb)
        .ok_or_else(|| Status::not_found(format!("no checked-out cart holds sku {}", r.sku)))
}

/// `CartQueries/ListSkuSales`.
pub(crate) async fn list_sku_sales<R: ReadStore>(
    reader: &Reader<R>,
    r: cart_pb::ListSkuSalesRequest,
) -> Result<cart_pb::ListSkuSalesResponse, Status> {
    let (size, _) = book_page(r.page_size, DEFAULT_PAGE, MAX_PAGE, "")?;
    if !r.page_token.is_empty() {
        validate_id("page_token", &r.page_token).map_err(status_from_domain)?;
    }
    let (skus, next_page_token) = reader
        .derived_page(
            &SkuSalesProjection,
            size,
            &r.page_token,
            SkuSalesView::from_doc,
        )
        .await?;
    Ok(cart_pb::ListSkuSalesResponse {
        skus: skus.into_iter().map(sku_pb).collect(),
        next_page_token,
    })
}
