//! Temporal queries, backend-agnostic: streams (write-svc's `EventStore/GetStateAt`), carts,
//! books and the catalogue as they were at a version or an exact time, and the sales report
//! (read-svc's `CartQueries` and `BookQueries`, which read the event store for them, never the
//! read model). Times are taken from ReadStream's `recorded_at`, so the boundaries are exact.

use crate::suite::{
    add, any, checkout, json_event, rand_isbn_suffix, read_all, remove, stream, unique,
};
use esq::convert::micros;
use esq::pb::bookshop::v1 as book;
use esq::pb::bookshop::v1::book_queries_client::BookQueriesClient;
use esq::pb::cart::v1 as cart;
use esq::pb::cart::v1::cart_queries_client::CartQueriesClient;
use esq::pb::v1 as pb;
use esq_testkit::Clients;
use prost_types::Timestamp;
use tonic::Code;

fn carts_at(c: &Clients) -> CartQueriesClient<tonic::transport::Channel> {
    c.cart_queries.clone()
}

fn books_at(c: &Clients) -> BookQueriesClient<tonic::transport::Channel> {
    c.book_queries.clone()
}

/// The recorded time of each event of a stream, µs, by version (index 0 is version 1).
async fn recorded_times(c: &Clients, kind: &str, id: &str) -> Vec<i64> {
    read_all(c, kind, id)
        .await
        .iter()
        .map(|e| micros(e.recorded_at.as_ref().expect("recorded_at")))
        .collect()
}

fn ts(us: i64) -> Option<Timestamp> {
    Some(esq::convert::timestamp(us))
}

/// The version a stream had at `us`: its last event recorded at or before then.
fn version_at(times: &[i64], us: i64) -> u64 {
    times.iter().filter(|t| **t <= us).count() as u64
}

async fn state_at(
    c: &Clients,
    id: &str,
    as_of: Option<pb::get_state_at_request::AsOf>,
) -> Result<pb::GetStateAtResponse, tonic::Status> {
    c.events
        .clone()
        .get_state_at(pb::GetStateAtRequest {
            stream: stream("order", id),
            as_of,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// GetStateAt folds a free-form stream up to a version or an exact time (an event recorded at
/// exactly T is included, one microsecond earlier it is not) and says which version it shows.
pub async fn state_at_versions_and_exact_times(c: &Clients) {
    use pb::get_state_at_request::AsOf;
    let id = unique("order");
    for json in [
        r#"{"status":"new","total":10}"#,
        r#"{"status":"paid"}"#,
        r#"{"total":null,"note":"gift"}"#,
    ] {
        c.events
            .clone()
            .append(pb::AppendRequest {
                stream: stream("order", &id),
                expected_version: any(),
                events: vec![json_event("OrderChanged", json)],
            })
            .await
            .expect("append");
    }
    let state = |r: &pb::GetStateAtResponse| {
        serde_json::Value::Object(
            r.state
                .as_ref()
                .expect("state")
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), esq::convert::from_value(v)))
                .collect(),
        )
    };
    let expected = [
        serde_json::json!({"status": "new", "total": 10.0}),
        serde_json::json!({"status": "paid", "total": 10.0}),
        serde_json::json!({"status": "paid", "note": "gift"}),
    ];
    for v in 1..=3u64 {
        let got = state_at(c, &id, Some(AsOf::Version(v)))
            .await
            .expect("at v");
        assert_eq!(got.version, v);
        assert_eq!(state(&got), expected[v as usize - 1], "at version {v}");
    }
    let now = state_at(c, &id, None).await.expect("now");
    assert_eq!((now.version, state(&now)), (3, expected[2].clone()));
    let beyond = state_at(c, &id, Some(AsOf::Version(99)))
        .await
        .expect("v99");
    assert_eq!(beyond.version, 3);
    let err = state_at(c, &id, Some(AsOf::Version(0)))
        .await
        .expect_err("no events at version 0");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let times = recorded_times(c, "order", &id).await;
    for (i, t) in times.iter().enumerate() {
        let got = state_at(c, &id, Some(AsOf::Time(ts(*t).expect("ts"))))
            .await
            .expect("at t");
        assert_eq!(got.version, version_at(&times, *t));
        assert!(got.version > i as u64, "the event at exactly T is included");
        assert_eq!(state(&got), expected[got.version as usize - 1]);
        let before = version_at(&times, t - 1);
        assert!(before <= i as u64, "one µs before T the event is not seen");
        match state_at(c, &id, Some(AsOf::Time(ts(t - 1).expect("ts")))).await {
            Ok(got) => assert_eq!(got.version, before),
            Err(e) => assert_eq!((e.code(), before), (Code::NotFound, 0), "{e:?}"),
        }
    }
    let err = state_at(c, &unique("order"), None)
        .await
        .expect_err("unknown stream");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

async fn cart_at(
    c: &Clients,
    cart_id: &str,
    as_of: Option<cart::get_cart_at_request::AsOf>,
) -> Result<cart::Cart, tonic::Status> {
    carts_at(c)
        .get_cart_at(cart::GetCartAtRequest {
            cart_id: cart_id.into(),
            as_of,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// GetCartAt answers the same Cart message as GetCart, as of a version or an exact time.
pub async fn cart_at_versions_and_times(c: &Clients) {
    use cart::get_cart_at_request::AsOf;
    let id = unique("cart");
    let mut carts = c.carts.clone();
    carts
        .add_item(add(&id, "apple", 2, 150))
        .await
        .expect("add");
    carts.add_item(add(&id, "pear", 1, 300)).await.expect("add");
    carts
        .remove_item(remove(&id, "apple", 1))
        .await
        .expect("remove");
    let v = carts
        .checkout(checkout(&id))
        .await
        .expect("checkout")
        .into_inner()
        .version;
    assert_eq!(v, 4);
    // Now, it is exactly what the read model serves.
    let read_model = c
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.clone(),
            min_version: 4,
        })
        .await
        .expect("get cart")
        .into_inner();
    assert_eq!(cart_at(c, &id, None).await.expect("now"), read_model);
    let at2 = cart_at(c, &id, Some(AsOf::Version(2))).await.expect("at 2");
    assert_eq!(at2.version, 2);
    assert_eq!(at2.status(), cart::CartStatus::Open);
    assert_eq!((at2.total_cents, at2.item_count), (600, 3));
    let lines: Vec<_> = at2
        .items
        .iter()
        .map(|i| (i.sku.as_str(), i.quantity, i.line_total_cents))
        .collect();
    assert_eq!(lines, [("apple", 2, 300), ("pear", 1, 300)]);
    assert_eq!(at2.checked_out_at, None);
    // The checkout at exactly its recorded time, and one microsecond before.
    let times = recorded_times(c, "cart", &id).await;
    let checkout = times[3];
    let at = cart_at(c, &id, Some(AsOf::Time(ts(checkout).expect("ts"))))
        .await
        .expect("at checkout");
    assert_eq!(at, read_model);
    assert_eq!(at.checked_out_at, ts(checkout));
    let before = cart_at(c, &id, Some(AsOf::Time(ts(checkout - 1).expect("ts"))))
        .await
        .expect("before checkout");
    assert_eq!(before.status(), cart::CartStatus::Open);
    assert_eq!(before.version, version_at(&times, checkout - 1));
    assert_eq!(
        before.version, 3,
        "appends of one stream get increasing times"
    );
    assert_eq!((before.total_cents, before.item_count), (450, 2));
    let err = cart_at(c, &id, Some(AsOf::Time(ts(times[0] - 1).expect("ts"))))
        .await
        .expect_err("before the first event");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = cart_at(c, "bad id", None).await.expect_err("invalid id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

fn isbn() -> String {
    format!("978{:010}", rand_isbn_suffix())
}

async fn create(c: &Clients, isbn: &str, title: &str, author: &str) -> String {
    c.books
        .clone()
        .create_book(book::CreateBookRequest {
            isbn: isbn.into(),
            title: title.into(),
            author: author.into(),
            price_cents: 1000,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .isbn
}

async fn book_at(
    c: &Clients,
    isbn: &str,
    as_of: Option<book::get_book_at_request::AsOf>,
) -> Result<book::Book, tonic::Status> {
    books_at(c)
        .get_book_at(book::GetBookAtRequest {
            isbn: isbn.into(),
            as_of,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// GetBookAt shows a book as it was before an update and before its deletion; after the
/// deletion, and before the creation, there is no book.
pub async fn book_at_after_update_and_delete(c: &Clients) {
    use book::get_book_at_request::AsOf;
    let author = unique("Author");
    let isbn = create(c, &isbn(), "Old title", &author).await;
    let mut books = c.books.clone();
    books
        .update_book(book::UpdateBookRequest {
            isbn: isbn.clone(),
            title: Some("New title".into()),
            price_cents: Some(1500),
            ..Default::default()
        })
        .await
        .expect("update");
    let updated = c
        .book_queries
        .clone()
        .get_book(book::GetBookRequest {
            isbn: isbn.clone(),
            min_version: 2,
        })
        .await
        .expect("get book")
        .into_inner();
    assert_eq!(book_at(c, &isbn, None).await.expect("now"), updated);
    books
        .delete_book(book::DeleteBookRequest {
            isbn: isbn.clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let v1 = book_at(c, &isbn, Some(AsOf::Version(1))).await.expect("v1");
    assert_eq!(
        (v1.title.as_str(), v1.price_cents, v1.version),
        ("Old title", 1000, 1)
    );
    let v2 = book_at(c, &isbn, Some(AsOf::Version(2))).await.expect("v2");
    assert_eq!(v2, updated);
    for as_of in [None, Some(AsOf::Version(3))] {
        let err = book_at(c, &isbn, as_of).await.expect_err("deleted");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    let times = recorded_times(c, "book", &isbn).await;
    let at = book_at(c, &isbn, Some(AsOf::Time(ts(times[1]).expect("ts"))))
        .await
        .expect("at exactly the update");
    assert_eq!(at, updated);
    let at = book_at(c, &isbn, Some(AsOf::Time(ts(times[1] - 1).expect("ts"))))
        .await
        .expect("just before the update");
    assert_eq!((at.title.as_str(), at.version), ("Old title", 1));
    let at = book_at(c, &isbn, Some(AsOf::Time(ts(times[2] - 1).expect("ts"))))
        .await
        .expect("just before the delete");
    assert_eq!(at, updated);
    let err = book_at(c, &isbn, Some(AsOf::Time(ts(times[2]).expect("ts"))))
        .await
        .expect_err("at exactly the delete");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = book_at(c, &isbn, Some(AsOf::Time(ts(times[0] - 1).expect("ts"))))
        .await
        .expect_err("before the creation");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    for bad in ["not-an-isbn", ""] {
        let err = book_at(c, bad, None).await.expect_err("invalid isbn");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(err.message().contains("isbn"), "{err:?}");
    }
    let bad_time = Timestamp {
        seconds: 1,
        nanos: -5,
    };
    let err = book_at(c, &isbn, Some(AsOf::Time(bad_time)))
        .await
        .expect_err("invalid timestamp");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("time.nanos"), "{err:?}");
}

/// Every page of ListBooksAt for one author at a time, following the page tokens.
async fn list_at(c: &Clients, author: &str, time: Option<Timestamp>, page: u32) -> Vec<book::Book> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = books_at(c)
            .list_books_at(book::ListBooksAtRequest {
                time,
                page_size: page,
                page_token,
                author: author.into(),
            })
            .await
            .expect("list books at")
            .into_inner();
        assert!(r.books.len() <= page as usize);
        all.extend(r.books);
        if r.next_page_token.is_empty() {
            return all;
        }
        page_token = r.next_page_token;
    }
}

/// ListBooksAt at a time before an update and a delete shows the catalogue as it was, paged.
pub async fn list_books_at_shows_the_old_catalogue(c: &Clients) {
    let author = unique("Author");
    let mut isbns = Vec::new();
    for i in 0..3 {
        isbns.push(create(c, &isbn(), &format!("Title {i}"), &author).await);
    }
    isbns.sort();
    let last_created = recorded_times(c, "book", &isbns[0])
        .await
        .into_iter()
        .chain(recorded_times(c, "book", &isbns[1]).await)
        .chain(recorded_times(c, "book", &isbns[2]).await)
        .max()
        .expect("times");
    let mut books = c.books.clone();
    books
        .update_book(book::UpdateBookRequest {
            isbn: isbns[0].clone(),
            author: Some(unique("Other")),
            ..Default::default()
        })
        .await
        .expect("update");
    books
        .delete_book(book::DeleteBookRequest {
            isbn: isbns[1].clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let deleted_at = *recorded_times(c, "book", &isbns[1])
        .await
        .last()
        .expect("delete time");
    let isbns_at = |t: i64| {
        let author = author.clone();
        async move {
            let books = list_at(c, &author, ts(t), 50).await;
            books.into_iter().map(|b| b.isbn).collect::<Vec<_>>()
        }
    };
    assert!(
        isbns_at(deleted_at - 1).await.contains(&isbns[1]),
        "one µs before its deletion the book is listed"
    );
    assert!(
        !isbns_at(deleted_at).await.contains(&isbns[1]),
        "at exactly its deletion the book is gone"
    );
    let sorted = |mut books: Vec<book::Book>| {
        books.sort_by(|a, b| a.isbn.cmp(&b.isbn));
        books
    };
    for page in [1, 2, 50] {
        let then = sorted(list_at(c, &author, ts(last_created), page).await);
        let got: Vec<_> = then
            .iter()
            .map(|b| (b.isbn.as_str(), b.author.as_str(), b.version))
            .collect();
        assert_eq!(
            got,
            isbns
                .iter()
                .map(|i| (i.as_str(), author.as_str(), 1))
                .collect::<Vec<_>>(),
            "page size {page}"
        );
        let now = list_at(c, &author, None, page).await;
        let now: Vec<_> = now.iter().map(|b| b.isbn.as_str()).collect();
        assert_eq!(now, [isbns[2].as_str()], "page size {page}");
    }
    let err = books_at(c)
        .list_books_at(book::ListBooksAtRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

async fn report(c: &Clients, from: i64, to: i64) -> cart::SalesReportResponse {
    carts_at(c)
        .sales_report(cart::SalesReportRequest {
            from: ts(from),
            to: ts(to),
        })
        .await
        .expect("sales report")
        .into_inner()
}

/// (revenue, units, carts) of one SKU in a report; zeros if absent.
fn sales(r: &cart::SalesReportResponse, sku: &str) -> (i64, i64, u64) {
    r.skus
        .iter()
        .find(|s| s.sku == sku)
        .map_or((0, 0, 0), |s| (s.revenue_cents, s.units, s.carts))
}

/// SalesReport counts the lines of the carts checked out within [from, to], both ends exact.
pub async fn sales_report_over_checked_out_carts(c: &Clients) {
    // SKUs of this scenario only, as other scenarios may share the store.
    let (x, y) = (unique("sku-x"), unique("sku-y"));
    let mut carts = c.carts.clone();
    let (first, second, open) = (unique("cart"), unique("cart"), unique("cart"));
    carts.add_item(add(&first, &x, 2, 150)).await.expect("add");
    carts.add_item(add(&first, &y, 1, 300)).await.expect("add");
    carts.add_item(add(&open, &x, 5, 150)).await.expect("add");
    for id in [&first, &second] {
        if id == &second {
            carts.add_item(add(id, &x, 1, 150)).await.expect("add");
        }
        carts.checkout(checkout(id)).await.expect("checkout");
    }
    let t1 = *recorded_times(c, "cart", &first).await.last().expect("t1");
    let t2 = *recorded_times(c, "cart", &second).await.last().expect("t2");
    assert!(t1 < t2);
    let both = report(c, t1, t2).await;
    assert_eq!(sales(&both, &x), (450, 3, 2));
    assert_eq!(sales(&both, &y), (300, 1, 1));
    assert!(both.carts >= 2 && both.revenue_cents >= 750, "{both:?}");
    let only_first = report(c, t1, t2 - 1).await;
    assert_eq!(sales(&only_first, &x), (300, 2, 1));
    assert_eq!(sales(&only_first, &y), (300, 1, 1));
    let only_second = report(c, t1 + 1, t2).await;
    assert_eq!(sales(&only_second, &x), (150, 1, 1));
    assert_eq!(sales(&only_second, &y), (0, 0, 0));
    let err = carts_at(c)
        .sales_report(cart::SalesReportRequest {
            from: ts(t2),
            to: ts(t1),
        })
        .await
        .expect_err("from after to");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// The property of the issue, end to end: for a random command sequence, the cart GetCartAt
/// folds from the event store at each version N is exactly the cart the read model served right
/// after N was applied (recorded along the way with GetCart, `min_version` N).
pub async fn cart_at_every_version_is_what_the_read_model_served_then(c: &Clients) {
    use cart::get_cart_at_request::AsOf;
    let seed = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
    let mut rng = seed;
    let mut next = |n: u64| {
        // xorshift64: a reproducible sequence from the seed printed on failure.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let id = unique("cart");
    let mut carts = c.carts.clone();
    let mut served = Vec::new();
    for _ in 0..24 {
        let sku = ["apple", "pear", "plum"][next(3) as usize].to_owned();
        let result = match next(8) {
            0 => carts.checkout(checkout(&id)).await,
            1..=2 => {
                carts
                    .remove_item(cart::RemoveItemRequest {
                        cart_id: id.clone(),
                        sku,
                        quantity: 1 + next(2) as i64,
                        ..Default::default()
                    })
                    .await
            }
            _ => {
                let price = [100, 250][next(2) as usize];
                carts
                    .add_item(add(&id, &sku, 1 + next(3) as i64, price))
                    .await
            }
        };
        // Refused commands (removing what is not there, anything after checkout) record nothing.
        let Ok(done) = result else { continue };
        let version = done.into_inner().version;
        let cart = c
            .cart_queries
            .clone()
            .get_cart(cart::GetCartRequest {
                cart_id: id.clone(),
                min_version: version,
            })
            .await
            .expect("get cart")
            .into_inner();
        assert_eq!(cart.version, version, "seed {seed}: one writer, in order");
        served.push(cart);
    }
    assert!(!served.is_empty(), "seed {seed}: no command succeeded");
    for then in &served {
        let at = cart_at(c, &id, Some(AsOf::Version(then.version)))
            .await
            .expect("cart at");
        assert_eq!(&at, then, "seed {seed}, version {}", then.version);
    }
}
