//! The derived read models (books per author, sales per SKU), backend-agnostic: after traffic,
//! `GetAuthor`/`ListAuthors` and `GetSkuSales`/`ListSkuSales` (read model) equal a fold of the
//! event store (`ListBooksAt` and `SalesReport`, which fold history and never read the read
//! model), plus their bad-input and NOT_FOUND answers.

use crate::suite::{add, checkout, rand_isbn_suffix, unique};
use esq::pb::bookshop::v1 as book;
use esq::pb::cart::v1 as cart;
use esq_testkit::Clients;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// Generous bound for the projector to catch up on a busy machine.
const CATCH_UP: Duration = Duration::from_secs(60);

fn isbn() -> String {
    format!("978{:010}", rand_isbn_suffix())
}

/// Polls `check` until it returns `Ok`, or panics with its last complaint after [`CATCH_UP`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + CATCH_UP;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// (books, min, max) of `author` from a fold of the store: the catalogue now, by ListBooksAt.
async fn author_from_history(c: &Clients, author: &str) -> Option<(u64, i64, i64)> {
    let mut books = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .book_queries
            .clone()
            .list_books_at(book::ListBooksAtRequest {
                time: None,
                page_size: 500,
                page_token: token.clone(),
                author: author.to_owned(),
            })
            .await
            .expect("list books at")
            .into_inner();
        books.extend(page.books);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let prices: Vec<i64> = books.iter().map(|b| b.price_cents).collect();
    Some((
        prices.len() as u64,
        *prices.iter().min()?,
        *prices.iter().max()?,
    ))
}

/// The read model's answer for `author`: Some((books, min, max)), or None on NOT_FOUND.
async fn author_from_read_model(
    c: &Clients,
    author: &str,
) -> Result<Option<(u64, i64, i64)>, String> {
    match c
        .book_queries
        .clone()
        .get_author(book::GetAuthorRequest {
            author: author.to_owned(),
        })
        .await
    {
        Ok(a) => {
            let a = a.into_inner();
            Ok(Some((a.books, a.min_price_cents, a.max_price_cents)))
        }
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(format!("GetAuthor: {s:?}")),
    }
}

/// (revenue, units, carts) of `sku` over all time from a fold of the store (SalesReport).
async fn sku_from_history(c: &Clients, sku: &str) -> Option<(i64, i64, u64)> {
    let report = c
        .cart_queries
        .clone()
        .sales_report(cart::SalesReportRequest {
            from: None,
            to: None,
        })
        .await
        .expect("sales report")
        .into_inner();
    report
        .skus
        .iter()
        .find(|s| s.sku == sku)
        .map(|s| (s.revenue_cents, s.units, s.carts))
}

async fn sku_from_read_model(c: &Clients, sku: &str) -> Result<Option<(i64, i64, u64)>, String> {
    match c
        .cart_queries
        .clone()
        .get_sku_sales(cart::GetSkuSalesRequest {
            sku: sku.to_owned(),
        })
        .await
    {
        Ok(s) => {
            let s = s.into_inner();
            Ok(Some((s.revenue_cents, s.units, s.carts)))
        }
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(format!("GetSkuSales: {s:?}")),
    }
}

/// Traffic on fresh authors and SKUs; returns them, to check against the store's fold.
pub async fn derived_traffic(c: &Clients) -> (Vec<String>, Vec<String>) {
    let (x, y, z) = (unique("author x"), unique("author y"), unique("author z"));
    let mut books = c.books.clone();
    let mut isbns = Vec::new();
    for (author, price) in [(&x, 500), (&x, 1200), (&y, 800), (&z, 300), (&x, 50)] {
        let isbn = isbn();
        books
            .create_book(book::CreateBookRequest {
                isbn: isbn.clone(),
                title: "T".into(),
                author: author.clone(),
                price_cents: price,
                command_id: String::new(),
            })
            .await
            .expect("create");
        isbns.push(isbn);
    }
    // x's 1200 book moves to y at 900; x's 50 book is deleted; z's only book is deleted.
    books
        .update_book(book::UpdateBookRequest {
            isbn: isbns[1].clone(),
            author: Some(y.clone()),
            price_cents: Some(900),
            ..Default::default()
        })
        .await
        .expect("update");
    for i in [4, 3] {
        books
            .delete_book(book::DeleteBookRequest {
                isbn: isbns[i].clone(),
                ..Default::default()
            })
            .await
            .expect("delete");
    }
    let (s, t, open_only) = (unique("sku-s"), unique("sku-t"), unique("sku-o"));
    let mut carts = c.carts.clone();
    let ids: Vec<String> = (0..3).map(|_| unique("cart")).collect();
    carts.add_item(add(&ids[0], &s, 2, 150)).await.expect("add");
    carts.add_item(add(&ids[0], &t, 1, 300)).await.expect("add");
    carts.add_item(add(&ids[1], &s, 3, 100)).await.expect("add");
    carts
        .add_item(add(&ids[2], &open_only, 5, 10))
        .await
        .expect("add");
    carts.add_item(add(&ids[2], &s, 7, 10)).await.expect("add");
    carts.checkout(checkout(&ids[0])).await.expect("checkout");
    carts.checkout(checkout(&ids[1])).await.expect("checkout");
    (vec![x, y, z], vec![s, t, open_only])
}

/// The read model's answers for these authors and SKUs equal a fold of the store, once the
/// projector has caught up; and the expected figures of [`derived_traffic`].
pub async fn derived_equal_a_fold_of_the_store(c: &Clients, authors: &[String], skus: &[String]) {
    for author in authors {
        let expected = author_from_history(c, author).await;
        eventually(&format!("author {author}"), || async {
            let got = author_from_read_model(c, author).await?;
            (got == expected)
                .then_some(())
                .ok_or(format!("read model {got:?}, store fold {expected:?}"))
        })
        .await;
    }
    for sku in skus {
        let expected = sku_from_history(c, sku).await;
        eventually(&format!("sku {sku}"), || async {
            let got = sku_from_read_model(c, sku).await?;
            (got == expected)
                .then_some(())
                .ok_or(format!("read model {got:?}, store fold {expected:?}"))
        })
        .await;
    }
}

/// Traffic, then the derived queries equal the store's fold and the figures the traffic
/// implies; the listings page in order; bad input is refused by name.
pub async fn derived_queries_follow_the_traffic(c: &Clients) {
    let (authors, skus) = derived_traffic(c).await;
    derived_equal_a_fold_of_the_store(c, &authors, &skus).await;
    // The figures the traffic implies (so a fold that were wrong in the same way would show).
    assert_eq!(
        author_from_read_model(c, &authors[0]).await,
        Ok(Some((1, 500, 500)))
    );
    assert_eq!(
        author_from_read_model(c, &authors[1]).await,
        Ok(Some((2, 800, 900)))
    );
    assert_eq!(author_from_read_model(c, &authors[2]).await, Ok(None));
    assert_eq!(
        sku_from_read_model(c, &skus[0]).await,
        Ok(Some((600, 5, 2)))
    );
    assert_eq!(
        sku_from_read_model(c, &skus[1]).await,
        Ok(Some((300, 1, 1)))
    );
    assert_eq!(sku_from_read_model(c, &skus[2]).await, Ok(None));

    // ListAuthors, one per page: in order, every present author of ours, never z.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .book_queries
            .clone()
            .list_authors(book::ListAuthorsRequest {
                page_size: 1,
                page_token: token.clone(),
            })
            .await
            .expect("list authors")
            .into_inner();
        assert!(page.authors.len() <= 1);
        seen.extend(page.authors.into_iter().map(|a| a.author));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
    assert!(seen.contains(&authors[0]) && seen.contains(&authors[1]));
    assert!(
        !seen.contains(&authors[2]),
        "an author with no live book is not listed"
    );
    let page = c
        .cart_queries
        .clone()
        .list_sku_sales(cart::ListSkuSalesRequest {
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .expect("list sku sales")
        .into_inner();
    let listed: Vec<&str> = page.skus.iter().map(|s| s.sku.as_str()).collect();
    assert!(
        listed.windows(2).all(|w| w[0] < w[1]),
        "in order: {listed:?}"
    );
    assert!(listed.contains(&skus[0].as_str()) && !listed.contains(&skus[2].as_str()));

    // Bad input: INVALID_ARGUMENT naming the field.
    let bad = |s: tonic::Status, field: &str| {
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(field), "{s:?}");
    };
    let mut books = c.book_queries.clone();
    let mut carts = c.cart_queries.clone();
    bad(
        books
            .get_author(book::GetAuthorRequest {
                author: "  ".into(),
            })
            .await
            .expect_err("empty author"),
        "author",
    );
    bad(
        books
            .list_authors(book::ListAuthorsRequest {
                page_size: 501,
                page_token: String::new(),
            })
            .await
            .expect_err("page too large"),
        "page_size",
    );
    bad(
        carts
            .get_sku_sales(cart::GetSkuSalesRequest {
                sku: "no spaces".into(),
            })
            .await
            .expect_err("bad sku"),
        "sku",
    );
    bad(
        carts
            .list_sku_sales(cart::ListSkuSalesRequest {
                page_size: 0,
                page_token: "{bad}".into(),
            })
            .await
            .expect_err("bad token"),
        "page_token",
    );
    let missing = carts
        .get_sku_sales(cart::GetSkuSalesRequest {
            sku: unique("never-sold"),
        })
        .await
        .expect_err("unknown sku");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}
