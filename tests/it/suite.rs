//! Backend-agnostic scenarios: gRPC in, observable state out.

use esq::pb::bookshop::v1 as book;
use esq::pb::cart::v1 as cart;
use esq::pb::v1 as pb;
use esq::pb::v1::event_store_client::EventStoreClient;
use esq_testkit::Clients;
use futures::StreamExt;
use std::collections::BTreeSet;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A stream id no other scenario uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn stream(kind: &str, id: &str) -> Option<pb::StreamRef> {
    Some(pb::StreamRef {
        r#type: kind.into(),
        id: id.into(),
    })
}

pub fn exact(v: u64) -> Option<pb::ExpectedVersion> {
    Some(pb::ExpectedVersion {
        kind: Some(pb::expected_version::Kind::Exact(v)),
    })
}

pub fn any() -> Option<pb::ExpectedVersion> {
    Some(pb::ExpectedVersion {
        kind: Some(pb::expected_version::Kind::Any(())),
    })
}

pub fn json_event(event_type: &str, json: &str) -> pb::NewEvent {
    pb::NewEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: event_type.into(),
        schema_version: 1,
        payload: Some(pb::new_event::Payload::Json(json.into())),
        ..Default::default()
    }
}

pub async fn read_all(c: &Clients, kind: &str, id: &str) -> Vec<pb::RecordedEvent> {
    read(
        c,
        pb::ReadStreamRequest {
            stream: stream(kind, id),
            ..Default::default()
        },
    )
    .await
}

pub async fn read(c: &Clients, req: pb::ReadStreamRequest) -> Vec<pb::RecordedEvent> {
    let mut s = c
        .events
        .clone()
        .read_stream(req)
        .await
        .expect("read_stream")
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.next().await {
        out.push(e.expect("event"));
    }
    out
}

/// Runs the ignored test `name` of this binary in a process of its own (so that no other
/// test's allocations land in the memory it measures), and fails unless it ran and passed.
pub async fn run_alone(name: &str) {
    let exe = std::env::current_exe().expect("test exe");
    let out = tokio::process::Command::new(exe)
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .await
        .expect("run the measurement");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "measurement failed");
    assert!(text.contains("1 passed"), "the measurement did not run");
}

/// An AddItem command.
pub fn add(cart_id: &str, sku: &str, quantity: i64, price: i64) -> cart::AddItemRequest {
    cart::AddItemRequest {
        cart_id: cart_id.into(),
        sku: sku.into(),
        quantity,
        unit_price_cents: price,
        ..Default::default()
    }
}

/// Sends an AddItem with a command id and retries it on UNAVAILABLE (an overloaded store that
/// did not answer in time on a busy machine) for up to a minute: the same command id makes the
/// retry safe — a committed original answers as success, nothing is added twice.
pub async fn add_retrying(
    carts: &mut esq::pb::cart::v1::cart_commands_client::CartCommandsClient<Channel>,
    mut req: cart::AddItemRequest,
) {
    if req.command_id.is_empty() {
        req.command_id = unique("cmd");
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match carts.add_item(req.clone()).await {
            Ok(_) => return,
            Err(e) if e.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                eprintln!("{}: retrying after {e:?}", req.cart_id);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("add to {}: {e:?}", req.cart_id),
        }
    }
}

/// A RemoveItem command.
pub fn remove(cart_id: &str, sku: &str, quantity: i64) -> cart::RemoveItemRequest {
    cart::RemoveItemRequest {
        cart_id: cart_id.into(),
        sku: sku.into(),
        quantity,
        ..Default::default()
    }
}

/// A Checkout command.
pub fn checkout(cart_id: &str) -> cart::CheckoutRequest {
    cart::CheckoutRequest {
        cart_id: cart_id.into(),
        ..Default::default()
    }
}

/// Commands then queries with min_version: read-your-writes through the whole loop.
pub async fn append_then_query_with_min_version(c: &Clients) {
    let id = unique("cart");
    let mut carts = c.carts.clone();
    carts
        .add_item(add(&id, "apple", 2, 150))
        .await
        .expect("add apple");
    carts
        .add_item(add(&id, "pear", 1, 300))
        .await
        .expect("add pear");
    let v = carts
        .remove_item(remove(&id, "apple", 1))
        .await
        .expect("remove")
        .into_inner()
        .version;
    assert_eq!(v, 3);
    let got = c
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.clone(),
            min_version: v,
        })
        .await
        .expect("get cart")
        .into_inner();
    assert_eq!(got.version, 3);
    assert_eq!(got.status(), cart::CartStatus::Open);
    assert_eq!(got.total_cents, 150 + 300);
    assert_eq!(got.item_count, 2);
    let items: Vec<_> = got
        .items
        .iter()
        .map(|i| (i.sku.as_str(), i.quantity, i.line_total_cents))
        .collect();
    assert_eq!(items, [("apple", 1, 150), ("pear", 1, 300)]);

    let v = carts
        .checkout(checkout(&id))
        .await
        .expect("checkout")
        .into_inner()
        .version;
    let got = c
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.clone(),
            min_version: v,
        })
        .await
        .expect("get cart")
        .into_inner();
    assert_eq!(got.status(), cart::CartStatus::CheckedOut);
    assert!(got.checked_out_at.is_some());

    // Raw appends feed the generic state projection.
    let sid = unique("profile");
    let r = c
        .events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("profile", &sid),
            expected_version: exact(0),
            events: vec![
                json_event("ProfileCreated", r#"{"name":"Ada","city":"London"}"#),
                json_event("ProfileMoved", r#"{"city":null,"country":"UK"}"#),
            ],
        })
        .await
        .expect("append")
        .into_inner();
    assert_eq!((r.first_version, r.last_version), (1, 2));
    let state = c
        .state
        .clone()
        .get_state(pb::GetStateRequest {
            stream: stream("profile", &sid),
            min_version: 2,
        })
        .await
        .expect("get state")
        .into_inner();
    assert_eq!(state.version, 2);
    let fields = state.state.expect("state").fields;
    let keys: BTreeSet<_> = fields.keys().cloned().collect();
    assert_eq!(
        keys,
        BTreeSet::from(["name".to_owned(), "country".to_owned()])
    );
}

/// A min_version that is never reached ends in DEADLINE_EXCEEDED, promptly.
pub async fn min_version_wait_is_bounded(c: &Clients) {
    let id = unique("cart");
    c.carts
        .clone()
        .add_item(add(&id, "apple", 1, 1))
        .await
        .expect("add");
    let mut req = Request::new(cart::GetCartRequest {
        cart_id: id,
        min_version: 99,
    });
    // The deadline goes to the server only (no client-side timer, which could fire first on a
    // busy machine and answer CANCELLED): the server itself must end the wait.
    req.metadata_mut()
        .insert("grpc-timeout", "300m".parse().expect("header"));
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        c.cart_queries.clone().get_cart(req),
    )
    .await
    .expect("the server ends the wait at the call's deadline")
    .expect_err("must time out");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}

/// 16 writers race on one stream with exact expected versions: contiguous versions and
/// exactly one winner per version.
pub async fn concurrent_writers_one_winner_per_version(c: &Clients) {
    concurrent_writers_on(c, std::slice::from_ref(&c.events)).await;
}

/// The race of [`concurrent_writers_one_winner_per_version`], writers spread over several
/// write-svc endpoints.
pub async fn concurrent_writers_on(c: &Clients, endpoints: &[EventStoreClient<Channel>]) {
    const WRITERS: usize = 16;
    const APPENDS: usize = 8;
    let id = unique("race");
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut events = endpoints[w % endpoints.len()].clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut conflicts = 0u32;
            while won.len() < APPENDS {
                let version = match events
                    .get_stream_info(pb::GetStreamInfoRequest {
                        stream: stream("race", &id),
                    })
                    .await
                {
                    Ok(info) => info.into_inner().version,
                    Err(s) if s.code() == Code::NotFound => 0,
                    Err(s) => panic!("stream info: {s:?}"),
                };
                let event = json_event("Raced", &format!(r#"{{"writer":{w}}}"#));
                let event_id = event.event_id.clone();
                match events
                    .append(pb::AppendRequest {
                        stream: stream("race", &id),
                        expected_version: exact(version),
                        events: vec![event],
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert_eq!(r.first_version, version + 1);
                        won.push((r.first_version, event_id));
                    }
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        assert!(s.message().contains("expected"), "{s:?}");
                        conflicts += 1;
                    }
                    Err(s) => panic!("append: {s:?}"),
                }
            }
            (won, conflicts)
        }));
    }
    let mut winners = std::collections::BTreeMap::new();
    for t in tasks {
        let (won, _) = t.await.expect("writer");
        for (version, event_id) in won {
            assert!(
                winners.insert(version, event_id).is_none(),
                "two winners for version {version}"
            );
        }
    }
    let total = (WRITERS * APPENDS) as u64;
    assert_eq!(
        winners.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let stored = read_all(c, "race", &id).await;
    assert_eq!(stored.len() as u64, total);
    for e in &stored {
        assert_eq!(
            winners.get(&e.version),
            Some(&e.event_id),
            "stored event at {} is not the winner's",
            e.version
        );
    }
}

/// Retrying an append with the same event ids returns the same result and stores nothing twice.
pub async fn retried_append_is_idempotent(c: &Clients) {
    let id = unique("retry");
    let mut events = c.events.clone();
    let batch = vec![json_event("A", "{}"), json_event("B", "{}")];
    let req = pb::AppendRequest {
        stream: stream("retry", &id),
        expected_version: exact(0),
        events: batch,
    };
    let first = events
        .append(req.clone())
        .await
        .expect("first")
        .into_inner();
    let again = events
        .append(req.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(first, again);
    // Also with `any`, after other events were appended.
    events
        .append(pb::AppendRequest {
            stream: stream("retry", &id),
            expected_version: any(),
            events: vec![json_event("C", "{}")],
        })
        .await
        .expect("third");
    let mut any_req = req.clone();
    any_req.expected_version = any();
    let again = events
        .append(any_req)
        .await
        .expect("retry with any")
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(read_all(c, "retry", &id).await.len(), 3);
    // A retried command with the same command_id takes effect once.
    let cart_id = unique("cart");
    let mut r = add(&cart_id, "apple", 1, 10);
    r.command_id = "cmd-1".into();
    let v1 = c
        .carts
        .clone()
        .add_item(r.clone())
        .await
        .expect("add")
        .into_inner()
        .version;
    let v2 = c
        .carts
        .clone()
        .add_item(r)
        .await
        .expect("retried add")
        .into_inner()
        .version;
    assert_eq!((v1, v2), (1, 1));
    assert_eq!(read_all(c, "cart", &cart_id).await.len(), 1);
}

/// Malformed input gets INVALID_ARGUMENT naming the field, and changes nothing.
pub async fn bad_input_is_rejected_and_changes_nothing(c: &Clients) {
    let id = unique("bad");
    let mut events = c.events.clone();
    events
        .append(pb::AppendRequest {
            stream: stream("bad", &id),
            expected_version: exact(0),
            events: vec![json_event("Seed", "{}")],
        })
        .await
        .expect("seed");
    let good = || pb::AppendRequest {
        stream: stream("bad", &id),
        expected_version: exact(1),
        events: vec![json_event("Ok", "{}")],
    };
    let mut cases: Vec<(&str, pb::AppendRequest)> = Vec::new();
    let mut r = good();
    r.stream = stream("bad", "");
    cases.push(("stream.id", r));
    let mut r = good();
    r.stream = stream("bad", &"x".repeat(129));
    cases.push(("stream.id", r));
    let mut r = good();
    r.stream = stream("", &id);
    cases.push(("stream.type", r));
    let mut r = good();
    r.stream = None;
    cases.push(("stream", r));
    let mut r = good();
    r.expected_version = None;
    cases.push(("expected_version", r));
    let mut r = good();
    r.expected_version = Some(pb::ExpectedVersion { kind: None });
    cases.push(("expected_version", r));
    let mut r = good();
    r.events[0].payload = Some(pb::new_event::Payload::Json("{not json".into()));
    cases.push(("events[0].data", r));
    let mut r = good();
    r.events[0].payload = Some(pb::new_event::Payload::Data(vec![b'{'; 3]));
    r.events[0].content_type = "application/json".into();
    cases.push(("events[0].data", r));
    let mut too_large = good();
    too_large.events[0].payload = Some(pb::new_event::Payload::Data(vec![0; 600 * 1024]));
    let mut r = good();
    r.events[0].payload = None;
    cases.push(("events[0].payload", r));
    let mut r = good();
    r.events[0].r#type = String::new();
    cases.push(("events[0].type", r));
    let mut r = good();
    r.events[0].event_id = "not-a-uuid".into();
    cases.push(("events[0].event_id", r));
    let mut r = good();
    r.events.clear();
    cases.push(("events", r));
    for (field, req) in cases {
        let err = events.append(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "{field} not named in {:?}",
            err.message()
        );
    }
    // Over a size limit: RESOURCE_EXHAUSTED, still naming the field.
    let err = events.append(too_large).await.expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("events[0].data"), "{err:?}");
    // Domain commands: quantities, ids, required fields.
    let cart_id = unique("cart");
    let mut carts = c.carts.clone();
    for (field, req) in [
        ("quantity", add(&cart_id, "apple", 0, 10)),
        ("quantity", add(&cart_id, "apple", -3, 10)),
        ("sku", add(&cart_id, "", 1, 10)),
        ("cart_id", add("", "apple", 1, 10)),
        ("unit_price_cents", add(&cart_id, "apple", 1, -1)),
    ] {
        let err = carts.add_item(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "{field} not named in {:?}",
            err.message()
        );
    }
    let err = carts
        .remove_item(remove(&cart_id, "apple", 0))
        .await
        .expect_err("zero removal");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .books
        .clone()
        .create_book(book::CreateBookRequest {
            isbn: "978-0441478125".into(),
            title: String::new(),
            author: "A".into(),
            ..Default::default()
        })
        .await
        .expect_err("missing title");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("title"), "{err:?}");
    // Nothing changed.
    assert_eq!(read_all(c, "bad", &id).await.len(), 1);
    assert!(read_all(c, "cart", &cart_id).await.is_empty());
}

/// Business rules surface as FAILED_PRECONDITION, and a wrong expected version names both.
pub async fn cart_rules_and_conflicts(c: &Clients) {
    let id = unique("cart");
    let mut carts = c.carts.clone();
    let err = carts
        .checkout(checkout(&id))
        .await
        .expect_err("empty checkout");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = carts
        .remove_item(remove(&id, "apple", 1))
        .await
        .expect_err("remove missing");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    carts
        .add_item(add(&id, "apple", 1, 100))
        .await
        .expect("add");
    let mut stale = add(&id, "apple", 1, 100);
    stale.expected_version = Some(0);
    let err = carts
        .add_item(stale)
        .await
        .expect_err("stale expected version");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("expected 0") && err.message().contains("actual 1"),
        "{err:?}"
    );
    carts.checkout(checkout(&id)).await.expect("checkout");
    let err = carts
        .add_item(add(&id, "apple", 1, 100))
        .await
        .expect_err("after checkout");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Raw append with a wrong expected version.
    let err = c
        .events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("cart", &id),
            expected_version: exact(7),
            events: vec![json_event("X", "{}")],
        })
        .await
        .expect_err("wrong version");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("expected 7") && err.message().contains("actual 2"),
        "{err:?}"
    );
}

/// The bookshop: commands on the write side, reads (get, list, author filter) on the read side.
pub async fn bookshop_commands_and_queries(c: &Clients) {
    let author = unique("Author");
    let mut books = c.books.clone();
    let mut isbns = Vec::new();
    for i in 0..3 {
        let isbn = format!("978{:010}", rand_isbn_suffix() + i);
        let r = books
            .create_book(book::CreateBookRequest {
                isbn: isbn.clone(),
                title: format!("Title {i}"),
                author: author.clone(),
                price_cents: 1000 + i as i64,
                ..Default::default()
            })
            .await
            .expect("create")
            .into_inner();
        assert_eq!(r.version, 1);
        isbns.push(r.isbn);
    }
    let err = books
        .create_book(book::CreateBookRequest {
            isbn: isbns[0].clone(),
            title: "Dup".into(),
            author: "X".into(),
            ..Default::default()
        })
        .await
        .expect_err("duplicate isbn");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let other = unique("Other");
    let v = books
        .update_book(book::UpdateBookRequest {
            isbn: isbns[1].clone(),
            author: Some(other.clone()),
            title: Some("Renamed".into()),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner()
        .version;
    let dv = books
        .delete_book(book::DeleteBookRequest {
            isbn: isbns[2].clone(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner()
        .version;
    let err = books
        .update_book(book::UpdateBookRequest {
            isbn: isbns[2].clone(),
            title: Some("Zombie".into()),
            ..Default::default()
        })
        .await
        .expect_err("update deleted");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = books
        .delete_book(book::DeleteBookRequest {
            isbn: "9780000000000".into(),
            ..Default::default()
        })
        .await
        .expect_err("delete unknown");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let mut q = c.book_queries.clone();
    let b = q
        .get_book(book::GetBookRequest {
            isbn: isbns[1].clone(),
            min_version: v,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (b.title.as_str(), b.author.as_str(), b.version),
        ("Renamed", other.as_str(), 2)
    );
    let err = q
        .get_book(book::GetBookRequest {
            isbn: isbns[2].clone(),
            min_version: dv,
        })
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Code::NotFound);

    // Index entries follow the document's fenced apply (ListBooks has no min_version): wait,
    // bounded, for the listings to show what the documents already show.
    let listed = |author: String| {
        let mut q = q.clone();
        async move {
            q.list_books(book::ListBooksRequest {
                author,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .books
            .into_iter()
            .map(|b| b.isbn)
            .collect::<Vec<_>>()
        }
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (by_author, by_other) = (listed(author.clone()).await, listed(other.clone()).await);
        if by_author == vec![isbns[0].clone()] && by_other == vec![isbns[1].clone()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "listings by author never matched: {by_author:?} / {by_other:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Paging over everything visits each live book once, in ISBN order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = q
            .list_books(book::ListBooksRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.books.len() <= 2);
        seen.extend(page.books.into_iter().map(|b| b.isbn));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "pages are ordered and disjoint");
    assert!(seen.contains(&isbns[0]) && seen.contains(&isbns[1]) && !seen.contains(&isbns[2]));
}

pub fn rand_isbn_suffix() -> u64 {
    (uuid::Uuid::new_v4().as_u128() % 9_000_000_000) as u64
}

/// ReadStream directions, from/limit and the as-of bounds.
pub async fn read_stream_directions_and_bounds(c: &Clients) {
    let id = unique("log");
    let mut events = c.events.clone();
    for i in 0..5 {
        events
            .append(pb::AppendRequest {
                stream: stream("log", &id),
                expected_version: exact(i),
                events: vec![json_event("Logged", &format!(r#"{{"i":{i}}}"#))],
            })
            .await
            .expect("append");
    }
    let versions = |v: Vec<pb::RecordedEvent>| v.into_iter().map(|e| e.version).collect::<Vec<_>>();
    let req = |direction: pb::Direction| pb::ReadStreamRequest {
        stream: stream("log", &id),
        direction: direction.into(),
        ..Default::default()
    };
    assert_eq!(
        versions(read(c, req(pb::Direction::Forwards)).await),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        versions(read(c, req(pb::Direction::Backwards)).await),
        [5, 4, 3, 2, 1]
    );
    let mut r = req(pb::Direction::Forwards);
    r.from_version = Some(2);
    r.limit = 2;
    assert_eq!(versions(read(c, r).await), [2, 3]);
    let mut r = req(pb::Direction::Backwards);
    r.until_version = Some(3);
    assert_eq!(versions(read(c, r).await), [3, 2, 1]);
    let all = read(c, req(pb::Direction::Forwards)).await;
    assert!(
        matches!(all[0].payload, Some(pb::recorded_event::Payload::Json(ref j)) if j.contains("\"i\""))
    );
    let mut r = req(pb::Direction::Forwards);
    r.until_time = all[1].recorded_at;
    // Each append was a separate round trip, so each has its own commit time.
    assert_eq!(versions(read(c, r).await), [1, 2]);
    let info = events
        .get_stream_info(pb::GetStreamInfoRequest {
            stream: stream("log", &id),
        })
        .await
        .expect("info")
        .into_inner();
    assert_eq!((info.version, info.event_count), (5, 5));
    let err = events
        .get_stream_info(pb::GetStreamInfoRequest {
            stream: stream("log", &unique("none")),
        })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
}

/// Both services answer health checks.
pub async fn health_is_serving(c: &Clients) {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    for (channel, service) in [
        (c.write_channel.clone(), "esq.v1.EventStore"),
        (c.read_channel.clone(), "esq.cart.v1.CartQueries"),
        (c.read_channel.clone(), ""),
    ] {
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }
}

/// A snapshot of query results for a set of aggregates, to compare across restarts.
pub async fn snapshot(c: &Clients, carts: &[String], isbns: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for id in carts {
        let cart = c
            .cart_queries
            .clone()
            .get_cart(cart::GetCartRequest {
                cart_id: id.clone(),
                min_version: 0,
            })
            .await;
        out.push(format!(
            "{:?}",
            cart.map(|r| r.into_inner()).map_err(|s| s.code())
        ));
        let state = c
            .state
            .clone()
            .get_state(pb::GetStateRequest {
                stream: stream("cart", id),
                min_version: 0,
            })
            .await;
        out.push(format!(
            "{:?}",
            state.map(|r| r.into_inner()).map_err(|s| s.code())
        ));
    }
    for isbn in isbns {
        let b = c
            .book_queries
            .clone()
            .get_book(book::GetBookRequest {
                isbn: isbn.clone(),
                min_version: 0,
            })
            .await;
        out.push(format!(
            "{:?}",
            b.map(|r| r.into_inner()).map_err(|s| s.code())
        ));
    }
    out
}

/// Lists the services a server names through reflection, in protocol version `$v`.
macro_rules! reflected_services {
    ($v:ident, $channel:expr) => {{
        use tonic_reflection::pb::$v::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest,
            server_reflection_response::MessageResponse, ServerReflectionRequest,
        };
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new($channel)
            .server_reflection_info(futures::stream::iter([req]))
            .await
            .expect(stringify!(reflection $v))
            .into_inner();
        let answer = answers.next().await.expect("an answer").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("unexpected reflection answer: {answer:?}");
        };
        list.service
            .into_iter()
            .map(|s| s.name)
            .collect::<BTreeSet<_>>()
    }};
}

/// Server reflection answers on both protocol versions, listing what each service serves.
pub async fn reflection_lists_services(c: &Clients) {
    for names in [
        reflected_services!(v1, c.write_channel.clone()),
        reflected_services!(v1alpha, c.write_channel.clone()),
    ] {
        assert!(
            names.contains("esq.v1.EventStore") && names.contains("esq.cart.v1.CartCommands"),
            "{names:?}"
        );
        assert!(
            !names.contains("esq.cart.v1.CartQueries"),
            "write-svc does not serve queries: {names:?}"
        );
    }
    for names in [
        reflected_services!(v1, c.read_channel.clone()),
        reflected_services!(v1alpha, c.read_channel.clone()),
    ] {
        assert!(
            names.contains("esq.cart.v1.CartQueries") && names.contains("esq.v1.StateQueries"),
            "{names:?}"
        );
    }
}

/// Old event schemas are upgraded on read (ItemAdded v1 `qty` → v2 `quantity`), both by the
/// command side and by the projection; a schema newer than the server knows stops commands.
pub async fn schema_upgrades_are_read_through_upcasters(c: &Clients) {
    let id = unique("cart");
    let mut old = json_event("ItemAdded", r#"{"sku":"apple","qty":2}"#);
    old.schema_version = 1;
    c.events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("cart", &id),
            expected_version: exact(0),
            events: vec![old],
        })
        .await
        .expect("append a v1 event");
    let got = c
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.clone(),
            min_version: 1,
        })
        .await
        .expect("get cart")
        .into_inner();
    assert_eq!(got.items.len(), 1);
    assert_eq!(
        (
            got.items[0].sku.as_str(),
            got.items[0].quantity,
            got.items[0].unit_price_cents
        ),
        ("apple", 2, 0)
    );
    // The aggregate sees the upgraded event too: removing both apples is allowed.
    let v = c
        .carts
        .clone()
        .remove_item(remove(&id, "apple", 2))
        .await
        .expect("remove the upgraded item")
        .into_inner()
        .version;
    assert_eq!(v, 2);
    let mut future = json_event(
        "ItemAdded",
        r#"{"sku":"apple","quantity":1,"unit_price_cents":5,"new":true}"#,
    );
    future.schema_version = 9;
    let err = c
        .events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("cart", &id),
            expected_version: exact(2),
            events: vec![future],
        })
        .await
        .expect_err("a schema version this server cannot read would lock the cart");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("events[0].schema_version"),
        "{err:?}"
    );
    let v = c
        .carts
        .clone()
        .add_item(add(&id, "pear", 1, 1))
        .await
        .expect("the cart still takes commands")
        .into_inner()
        .version;
    assert_eq!(v, 3);
}

/// A recorded event from the wire, as the domain sees it.
pub fn to_domain(e: pb::RecordedEvent) -> esq_domain::RecordedEvent {
    let s = e.stream.expect("stream");
    let data = match e.payload {
        Some(pb::recorded_event::Payload::Json(j)) => j.into_bytes(),
        Some(pb::recorded_event::Payload::Data(d)) => d,
        None => Vec::new(),
    };
    esq_domain::RecordedEvent {
        stream: esq_domain::StreamId::new(s.r#type, s.id).expect("stream id"),
        version: e.version,
        event_id: e.event_id.parse().expect("uuid"),
        event_type: e.r#type,
        schema_version: e.schema_version,
        content_type: e.content_type,
        data,
        metadata: e.metadata.into_iter().collect(),
        recorded_at_us: e.recorded_at.as_ref().map_or(0, esq::convert::micros),
    }
}
