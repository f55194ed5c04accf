//! Backend-agnostic scenarios of the core's promises under abuse: one truth for the write and
//! read models, event contracts on owned stream types, and no self-inflicted conflicts.

use crate::suite::{
    add, any, checkout, exact, json_event, read_all, remove, stream, to_domain, unique,
};
use esq::pb::cart::v1 as cart;
use esq::pb::v1 as pb;
use esq_domain::aggregate::load;
use esq_domain::cart::{Cart, CartView};
use esq_domain::projection::fold;
use esq_domain::RecordedEvent;
use esq_testkit::Clients;
use tonic::Code;

fn item_added(sku: &str, quantity: i64, price: i64) -> pb::NewEvent {
    let mut e = json_event(
        "ItemAdded",
        &format!(r#"{{"sku":"{sku}","quantity":{quantity},"unit_price_cents":{price}}}"#),
    );
    e.schema_version = 2;
    e
}

fn item_removed(sku: &str, quantity: i64, price: i64) -> pb::NewEvent {
    json_event(
        "ItemRemoved",
        &format!(r#"{{"sku":"{sku}","quantity":{quantity},"unit_price_cents":{price}}}"#),
    )
}

async fn append(c: &Clients, id: &str, events: Vec<pb::NewEvent>) -> Result<u64, tonic::Status> {
    c.events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("cart", id),
            expected_version: any(),
            events,
        })
        .await
        .map(|r| r.into_inner().last_version)
}

async fn get_cart(c: &Clients, id: &str, min_version: u64) -> cart::Cart {
    c.cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.to_owned(),
            min_version,
        })
        .await
        .expect("get cart")
        .into_inner()
}

/// The stream as the domain sees it, from ReadStream.
async fn recorded(c: &Clients, id: &str) -> Vec<RecordedEvent> {
    read_all(c, "cart", id)
        .await
        .into_iter()
        .map(to_domain)
        .collect()
}

/// The read model equals the view derived from the aggregate's own fold of what was stored.
async fn assert_read_model_is_the_aggregate(c: &Clients, id: &str) {
    let events = recorded(c, id).await;
    let version = events.last().map_or(0, |e| e.version);
    let got = get_cart(c, id, version).await;
    let state: Cart = load(&events).expect("load");
    let view = CartView::from_doc(&fold(&esq_domain::cart::CartProjection, &events).expect("fold"));
    assert_eq!(got.version, version);
    assert_eq!(got.total_cents, state.total_cents(), "{got:?} vs {state:?}");
    assert_eq!(got.item_count, state.item_count(), "{got:?} vs {state:?}");
    let lines: Vec<(String, i64, i64)> = got
        .items
        .iter()
        .map(|l| (l.sku.clone(), l.quantity, l.unit_price_cents))
        .collect();
    let expected: Vec<(String, i64, i64)> = state
        .lines
        .iter()
        .map(|(sku, l)| (sku.clone(), l.quantity, l.unit_price_cents))
        .collect();
    assert_eq!(lines, expected);
    let status = match state.status {
        esq_domain::cart::CartStatus::Open => cart::CartStatus::Open,
        esq_domain::cart::CartStatus::CheckedOut => cart::CartStatus::CheckedOut,
    };
    assert_eq!(got.status(), status);
    assert_eq!(view.total_cents, got.total_cents);
}

/// What an outside tester saw: a raw append of a conflicting price and of a removal of a sku
/// not in the cart drove the read model away from the aggregate. Both are now refused, and a
/// long random mix of commands and raw appends keeps the read model equal to the aggregate.
pub async fn read_model_agrees_with_the_aggregate(c: &Clients) {
    let id = unique("truth");
    let mut carts = c.carts.clone();
    let v = carts
        .add_item(add(&id, "apple", 2, 150))
        .await
        .expect("add apples")
        .into_inner()
        .version;
    assert_eq!(v, 1);
    let err = append(c, &id, vec![item_added("apple", 1, 999)])
        .await
        .expect_err("another price for a line in the cart");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("events[0]"), "{err:?}");
    let err = append(c, &id, vec![item_removed("pear", 4, 100)])
        .await
        .expect_err("removing what is not there");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not in the cart"), "{err:?}");
    assert_eq!(recorded(c, &id).await.len(), 1, "nothing was written");
    assert_eq!(
        append(c, &id, vec![item_added("apple", 1, 150)])
            .await
            .expect("a valid raw append"),
        2
    );
    let got = get_cart(c, &id, 2).await;
    assert_eq!((got.total_cents, got.item_count), (450, 3));
    carts.checkout(checkout(&id)).await.expect("checkout");
    let checked_out = recorded(c, &id).await.pop().expect("checked out");
    assert_eq!(
        checked_out.json().expect("JSON"),
        serde_json::json!({"total_cents": 450, "item_count": 3})
    );
    assert_read_model_is_the_aggregate(c, &id).await;

    // A random mix: commands and raw appends, valid and not, several carts.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..3 {
        let id = unique("truth-mix");
        for _ in 0..25 {
            let sku = ["a", "b", "c"][next(3) as usize];
            let quantity = next(4) as i64 + if next(5) == 0 { -2 } else { 1 };
            let price = [0, 100, 250][next(3) as usize];
            let _ = match next(6) {
                0 => append(c, &id, vec![item_added(sku, quantity, price)]).await,
                1 => append(c, &id, vec![item_removed(sku, quantity, price)]).await,
                2 => {
                    append(
                        c,
                        &id,
                        vec![json_event(
                            "CheckedOut",
                            &format!(
                                r#"{{"total_cents":{},"item_count":{}}}"#,
                                next(500),
                                next(5)
                            ),
                        )],
                    )
                    .await
                }
                3 => carts
                    .add_item(add(&id, sku, quantity, price))
                    .await
                    .map(|r| r.into_inner().version),
                4 => carts
                    .remove_item(remove(&id, sku, quantity))
                    .await
                    .map(|r| r.into_inner().version),
                _ => {
                    let mut old = json_event(
                        "ItemAdded",
                        &format!(r#"{{"sku":"{sku}","qty":{quantity}}}"#),
                    );
                    old.schema_version = 1;
                    append(c, &id, vec![old]).await
                }
            };
        }
        if !recorded(c, &id).await.is_empty() {
            assert_read_model_is_the_aggregate(c, &id).await;
        }
    }
}

/// Raw appends to owned stream types are checked like commands; malformed ones name the field,
/// refused ones the event and the rule; nothing is written; other types stay free-form.
pub async fn owned_streams_honour_their_contracts(c: &Clients) {
    let id = unique("contract");
    assert_eq!(
        append(c, &id, vec![item_added("apple", 1, 100)])
            .await
            .expect("a valid raw append"),
        1
    );
    let mut future = item_added("apple", 1, 100);
    future.schema_version = 3;
    let cases = [
        (future, Code::InvalidArgument, "events[0].schema_version"),
        (
            json_event("Renamed", r#"{"name":"x"}"#),
            Code::InvalidArgument,
            "events[0].type",
        ),
        (
            pb::NewEvent {
                schema_version: 2,
                ..json_event("ItemAdded", r#"{"sku":5}"#)
            },
            Code::InvalidArgument,
            "events[0].data",
        ),
        (
            json_event("CheckedOut", r#"{"total_cents":1,"item_count":1}"#),
            Code::FailedPrecondition,
            "events[0] (CheckedOut)",
        ),
    ];
    for (event, code, named) in cases {
        let err = append(c, &id, vec![item_added("apple", 1, 100), event])
            .await
            .expect_err("refused");
        let named = named.replace("events[0]", "events[1]");
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(&named), "{named}: {err:?}");
    }
    assert_eq!(recorded(c, &id).await.len(), 1, "nothing was written");
    // The cart is not locked: commands go on.
    let v = c
        .carts
        .clone()
        .add_item(add(&id, "pear", 1, 5))
        .await
        .expect("the cart takes commands")
        .into_inner()
        .version;
    assert_eq!(v, 2);
    // Books: the ISBN is the stream id.
    let err = c
        .events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("book", "9780000000002"),
            expected_version: exact(0),
            events: vec![json_event(
                "BookCreated",
                r#"{"isbn":"9780000000019","title":"T","author":"A","price_cents":1}"#,
            )],
        })
        .await
        .expect_err("isbn is not the stream id");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Other stream types take anything.
    c.events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("order", &unique("free")),
            expected_version: any(),
            events: vec![json_event("ItemAdded", r#"{"anything":[1,2]}"#)],
        })
        .await
        .expect("free-form");
    // The contracts are published.
    let contracts = c
        .events
        .clone()
        .list_event_types(pb::ListEventTypesRequest::default())
        .await
        .expect("list event types")
        .into_inner();
    let types: Vec<&str> = contracts
        .stream_types
        .iter()
        .map(|t| t.stream_type.as_str())
        .collect();
    assert_eq!(types, ["cart", "book"]);
    let added = contracts.stream_types[0]
        .event_types
        .iter()
        .find(|e| e.event_type == "ItemAdded")
        .expect("ItemAdded");
    assert_eq!(added.current_schema_version, 2);
    let versions: Vec<u32> = added.schemas.iter().map(|s| s.schema_version).collect();
    assert_eq!(versions, [1, 2]);
    let v2: serde_json::Value =
        serde_json::from_str(&added.schemas[1].json_schema).expect("JSON Schema");
    assert_eq!(
        v2["required"],
        serde_json::json!(["sku", "quantity", "unit_price_cents"])
    );
    let err = c
        .events
        .clone()
        .list_event_types(pb::ListEventTypesRequest {
            stream_type: "order".into(),
        })
        .await
        .expect_err("not owned");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

/// 64 concurrent AddItem on one cart against one process: all succeed, one version each.
pub async fn concurrent_commands_on_one_cart_all_succeed(c: &Clients) {
    const WRITERS: usize = 64;
    let id = unique("busy");
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let mut carts = c.carts.clone();
            let id = id.clone();
            tokio::spawn(async move {
                carts
                    .add_item(add(&id, "apple", 1, 10))
                    .await
                    .map(|r| r.into_inner().version)
            })
        })
        .collect();
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.expect("task").expect("every command succeeds"));
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=WRITERS as u64).collect::<Vec<_>>());
    let got = get_cart(c, &id, WRITERS as u64).await;
    assert_eq!(got.item_count, WRITERS as i64);
}

/// `writers` concurrent AddItem loops on one cart, spread over `endpoints` (write-svc
/// processes); returns (commands, ABORTED). Every other outcome fails the test.
pub async fn contended_commands(
    c: &Clients,
    endpoints: &[esq::pb::cart::v1::cart_commands_client::CartCommandsClient<
        tonic::transport::Channel,
    >],
    writers: usize,
    per_writer: usize,
) -> (usize, usize) {
    let id = unique("contended");
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let mut carts = endpoints[w % endpoints.len()].clone();
            let id = id.clone();
            tokio::spawn(async move {
                let mut aborted = 0;
                for _ in 0..per_writer {
                    match carts.add_item(add(&id, "apple", 1, 10)).await {
                        Ok(_) => {}
                        Err(s) if s.code() == Code::Aborted => aborted += 1,
                        Err(s) => panic!("add item: {s:?}"),
                    }
                }
                aborted
            })
        })
        .collect();
    let mut aborted = 0;
    for t in tasks {
        aborted += t.await.expect("writer");
    }
    let total = writers * per_writer;
    let got = get_cart(c, &id, (total - aborted) as u64).await;
    assert_eq!(
        got.item_count as usize,
        total - aborted,
        "every success counted"
    );
    (total, aborted)
}
