//! The suite against the embedded single-process stack (`esq dev`), plus restart durability.

use crate::suite;
use esq_testkit::DevHarness;

macro_rules! dev_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let h = DevHarness::start().await.expect("start dev stack");
            suite::$name(&h.clients).await;
            h.stop().await.expect("stop dev stack");
        }
    )*};
}

dev_tests!(
    append_then_query_with_min_version,
    min_version_wait_is_bounded,
    concurrent_writers_one_winner_per_version,
    retried_append_is_idempotent,
    bad_input_is_rejected_and_changes_nothing,
    cart_rules_and_conflicts,
    bookshop_commands_and_queries,
    read_stream_directions_and_bounds,
    health_is_serving,
);

/// Stopping and restarting the stack keeps every event and rebuilds the same query results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_events_and_rebuilds_queries() {
    use esq::pb::bookshop::v1 as book;
    use esq::pb::cart::v1 as cart;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = DevHarness::start_in(dir.path()).await.expect("start");
    let mut carts = Vec::new();
    let mut last = 0;
    for i in 0..5 {
        let id = suite::unique("cart");
        for sku in ["a", "b", "c"].iter().take(i % 3 + 1) {
            last = h
                .clients
                .carts
                .clone()
                .add_item(cart::AddItemRequest {
                    cart_id: id.clone(),
                    sku: (*sku).into(),
                    quantity: i as i64 + 1,
                    unit_price_cents: 99,
                    ..Default::default()
                })
                .await
                .expect("add")
                .into_inner()
                .version;
        }
        carts.push(id);
    }
    let isbn = h
        .clients
        .books
        .clone()
        .create_book(book::CreateBookRequest {
            isbn: "0-306-40615-2".into(),
            title: "T".into(),
            author: "A".into(),
            price_cents: 5,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .isbn;
    // Wait for the read model to catch up before taking the snapshot.
    h.clients
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: carts[4].clone(),
            min_version: last,
        })
        .await
        .expect("caught up");
    h.clients
        .book_queries
        .clone()
        .get_book(book::GetBookRequest {
            isbn: isbn.clone(),
            min_version: 1,
        })
        .await
        .expect("caught up");
    let before = suite::snapshot(&h.clients, &carts, std::slice::from_ref(&isbn)).await;
    let events_before: Vec<_> = {
        let mut all = Vec::new();
        for id in &carts {
            all.extend(suite::read_all(&h.clients, "cart", id).await);
        }
        all
    };
    h.restart().await.expect("restart");
    let after = suite::snapshot(&h.clients, &carts, std::slice::from_ref(&isbn)).await;
    assert_eq!(before, after);
    let mut events_after = Vec::new();
    for id in &carts {
        events_after.extend(suite::read_all(&h.clients, "cart", id).await);
    }
    assert_eq!(events_before, events_after);
    h.stop().await.expect("stop");
}
