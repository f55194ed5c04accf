//! Books per author: a derived read model of the book documents. One target per author with
//! the number of live books and the range of their prices.

use crate::bookshop::{BookProjection, BookView};
use crate::derived::{live_count, total, Agg, Column, Derived};
use crate::projection::{Doc, Projection};

/// Books per author, fed from the [`BookProjection`] documents.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorsProjection;

const COLUMNS: &[Column] = &[
    Column {
        name: "books",
        agg: Agg::Sum,
    },
    Column {
        name: "min_price_cents",
        agg: Agg::Min,
    },
    Column {
        name: "max_price_cents",
        agg: Agg::Max,
    },
];

impl Derived for AuthorsProjection {
    fn name(&self) -> &'static str {
        "authors"
    }

    fn source(&self) -> &'static str {
        BookProjection.name()
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    /// A live book counts once for its author, at its price; a deleted book for nobody.
    fn contributions(&self, source_doc: &Doc) -> Vec<(String, Vec<i64>)> {
        match BookView::from_doc(source_doc) {
            Some(book) => vec![(book.author, vec![1, book.price_cents, book.price_cents])],
            None => Vec::new(),
        }
    }
}

/// An author as queries see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorView {
    /// The author, as the books spell it.
    pub author: String,
    /// Live books by the author.
    pub books: i64,
    /// The lowest price among them, in cents.
    pub min_price_cents: i64,
    /// The highest price among them, in cents.
    pub max_price_cents: i64,
}

impl AuthorView {
    /// Reads an author's totals document; `None` when the author has no live book.
    pub fn from_doc(author: &str, totals: &Doc) -> Option<AuthorView> {
        (live_count(totals) > 0).then(|| AuthorView {
            author: author.to_owned(),
            books: total(totals, "books"),
            min_price_cents: total(totals, "min_price_cents"),
            max_price_cents: total(totals, "max_price_cents"),
        })
    }
}
