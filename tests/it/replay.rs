//! Backend-agnostic scenarios of replay previews and saved what-if timelines: the new
//! timeline's state and rule violations (with positions), input validation, and the stream
//! left untouched.

use crate::suite::{add, checkout, json_event, read_all, remove, stream, unique};
use esq::pb::v1 as pb;
use esq::pb::v1::timeline_edit::{self as te, Edit};
use esq::pb::v1::timeline_origin::Origin;
use esq_testkit::Clients;
use tonic::Code;

fn skip(version: u64) -> pb::TimelineEdit {
    pb::TimelineEdit {
        edit: Some(Edit::Skip(te::Skip { version })),
    }
}

fn move_to(version: u64, to_position: u64) -> pb::TimelineEdit {
    pb::TimelineEdit {
        edit: Some(Edit::Move(te::Move {
            version,
            to_position,
        })),
    }
}

fn insert(position: u64, events: Vec<pb::NewEvent>) -> pb::TimelineEdit {
    pb::TimelineEdit {
        edit: Some(Edit::Insert(te::Insert { position, events })),
    }
}

fn stop_at(version: u64) -> pb::TimelineEdit {
    pb::TimelineEdit {
        edit: Some(Edit::StopAt(te::StopAt { version })),
    }
}

fn item_added(sku: &str, quantity: i64) -> pb::NewEvent {
    pb::NewEvent {
        schema_version: 2,
        ..json_event(
            "ItemAdded",
            &format!(r#"{{"sku":"{sku}","quantity":{quantity},"unit_price_cents":10}}"#),
        )
    }
}

/// A cart with v1 add apple ×2, v2 add pear ×1, v3 add apple ×1, v4 remove pear ×1,
/// v5 checkout, made through commands.
async fn five_event_cart(c: &Clients) -> String {
    let id = unique("replay");
    let mut carts = c.carts.clone();
    for (sku, quantity) in [("apple", 2), ("pear", 1), ("apple", 1)] {
        carts
            .add_item(add(&id, sku, quantity, 10))
            .await
            .expect("add");
    }
    carts
        .remove_item(remove(&id, "pear", 1))
        .await
        .expect("remove");
    let v = carts
        .checkout(checkout(&id))
        .await
        .expect("checkout")
        .into_inner()
        .version;
    assert_eq!(v, 5);
    id
}

async fn preview(
    c: &Clients,
    id: &str,
    edits: Vec<pb::TimelineEdit>,
) -> Result<pb::ReplayPreviewResponse, tonic::Status> {
    c.events
        .clone()
        .replay_preview(pb::ReplayPreviewRequest {
            stream: stream("cart", id),
            edits,
            timeline: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

/// (position, original version or 0 for inserted) of every violation.
fn violations_at(p: &pb::ReplayPreviewResponse) -> Vec<(u64, u64)> {
    p.violations
        .iter()
        .map(|v| {
            let original = match v.origin.as_ref().and_then(|o| o.origin.as_ref()) {
                Some(Origin::OriginalVersion(v)) => *v,
                _ => 0,
            };
            (v.position, original)
        })
        .collect()
}

/// (field, before, after) of every changed field.
fn diff(p: &pb::ReplayPreviewResponse) -> Vec<(&str, Option<&str>, Option<&str>)> {
    p.diff
        .iter()
        .map(|d| (d.field.as_str(), d.before.as_deref(), d.after.as_deref()))
        .collect()
}

/// The stream's events and version, to check that previews and saves leave it alone: the
/// same events (ids, payloads, recorded times) and the same version as read before.
async fn untouched(c: &Clients, id: &str, before: &[pb::RecordedEvent]) {
    assert_eq!(
        read_all(c, "cart", id).await,
        before,
        "the stream is untouched"
    );
    let last = before.last().map_or(0, |e| e.version);
    let info = c
        .events
        .clone()
        .get_stream_info(pb::GetStreamInfoRequest {
            stream: stream("cart", id),
        })
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.version, last);
}

/// Skip, move, insert and stop each give the new timeline's state, the fields that differ
/// and every rule violation with its position; the stream is left as it was.
pub async fn replay_preview_skip_move_insert_stop(c: &Clients) {
    let id = five_event_cart(c).await;
    let before = read_all(c, "cart", &id).await;

    // Today's timeline, re-checked: the same state, nothing refused.
    let p = preview(c, &id, vec![]).await.expect("preview");
    assert_eq!((p.version_today, p.timeline.len()), (5, 5));
    assert_eq!(p.state_today, p.state_after);
    assert!(p.violations.is_empty() && p.diff.is_empty() && p.corrective_append.is_none());

    // Skip the pear: removing it (v4, now third) breaks the rules; the fold goes on.
    let p = preview(c, &id, vec![skip(2)]).await.expect("skip");
    assert_eq!(violations_at(&p), vec![(3, 4)]);
    let v = &p.violations[0];
    assert_eq!(v.r#type, "ItemRemoved");
    assert!(
        v.reason.contains("pear") && v.reason.contains("not in the cart"),
        "{v:?}"
    );
    assert_eq!(
        v.message,
        "position 3 (v4 ItemRemoved): cannot remove sku pear: it is not in the cart, \
         once v2 is skipped"
    );
    assert_eq!(diff(&p), vec![("price:pear", Some("10"), None)]);
    assert_eq!(
        p.state_after.get("item:apple").map(String::as_str),
        Some("3")
    );
    assert_eq!(p.state_after.get("_v").map(String::as_str), Some("4"));

    // Move the checkout first: it and every later event is refused, each at its position.
    let p = preview(c, &id, vec![move_to(5, 0)]).await.expect("move");
    assert_eq!(
        violations_at(&p),
        vec![(1, 5), (2, 1), (3, 2), (4, 3), (5, 4)]
    );
    assert!(p.violations[0].reason.contains("empty cart"), "{p:?}");
    assert!(p.violations[1].reason.contains("checked out"), "{p:?}");

    // Insert a fig before the checkout: the checkout's total is then wrong.
    let fig = item_added("fig", 4);
    let p = preview(c, &id, vec![insert(4, vec![fig.clone()])])
        .await
        .expect("insert");
    assert_eq!(violations_at(&p), vec![(6, 5)]);
    assert!(diff(&p).contains(&("item:fig", None, Some("4"))), "{p:?}");
    assert!(matches!(
        p.timeline[4]
            .origin
            .as_ref()
            .and_then(|o| o.origin.as_ref()),
        Some(Origin::Inserted(pb::timeline_origin::Inserted {
            edit: 0,
            index: 0
        }))
    ));
    let corrective = p.corrective_append.expect("a corrective append");
    assert_eq!(corrective.stream, stream("cart", &id));
    assert_eq!(corrective.expected_version, crate::suite::exact(5));
    assert_eq!(corrective.events.len(), 1);
    assert_eq!(corrective.events[0].event_id, fig.event_id);
    assert!(
        p.corrective_append_refused.contains("checked out"),
        "{}",
        p.corrective_append_refused
    );

    // Stop after v2: an open cart with both fruits.
    let p = preview(c, &id, vec![stop_at(2)]).await.expect("stop");
    assert_eq!(p.timeline.len(), 2);
    assert!(p.violations.is_empty());
    assert_eq!(
        p.state_after.get("item:pear").map(String::as_str),
        Some("1")
    );
    assert!(!p.state_after.contains_key("status"));
    assert!(diff(&p).contains(&("status", Some("checked_out"), None)));

    untouched(c, &id, &before).await;
}

/// Bad edits are refused naming the edit, limits are RESOURCE_EXHAUSTED, and nothing changes.
pub async fn replay_preview_validates_edits(c: &Clients) {
    let id = five_event_cart(c).await;
    let before = read_all(c, "cart", &id).await;
    let mut unnamed = item_added("x", 1);
    unnamed.r#type = String::new();
    let cases = [
        (
            vec![skip(1), skip(9)],
            Code::InvalidArgument,
            "edits[1].skip.version",
        ),
        (
            vec![move_to(1, 6)],
            Code::InvalidArgument,
            "edits[0].move.to_position",
        ),
        (
            vec![skip(2), move_to(2, 0)],
            Code::InvalidArgument,
            "edits[1].move.version",
        ),
        (
            vec![insert(0, vec![unnamed])],
            Code::InvalidArgument,
            "edits[0].insert.events[0].type",
        ),
        (
            vec![pb::TimelineEdit { edit: None }],
            Code::InvalidArgument,
            "edits[0]",
        ),
        (
            vec![insert(6, vec![item_added("fig", 1)])],
            Code::InvalidArgument,
            "edits[0].insert.position",
        ),
        (
            vec![stop_at(0)],
            Code::InvalidArgument,
            "edits[0].stop_at.version",
        ),
        (
            vec![stop_at(6)],
            Code::InvalidArgument,
            "edits[0].stop_at.version",
        ),
        (vec![skip(1); 101], Code::ResourceExhausted, "edits"),
    ];
    for (edits, code, named) in cases {
        let err = preview(c, &id, edits).await.expect_err("refused");
        assert_eq!(err.code(), code, "{named}: {err:?}");
        assert!(err.message().contains(named), "{named}: {err:?}");
    }
    let err = c
        .events
        .clone()
        .replay_preview(pb::ReplayPreviewRequest {
            timeline: unique("no-such-timeline"),
            ..Default::default()
        })
        .await
        .expect_err("unknown timeline");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .events
        .clone()
        .replay_preview(pb::ReplayPreviewRequest {
            timeline: "no spaces allowed".into(),
            ..Default::default()
        })
        .await
        .expect_err("malformed timeline name");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("invalid timeline: "), "{err:?}");

    // A stream without events, or none at all, is no stream to preview.
    let err = preview(c, &unique("never-written"), vec![])
        .await
        .expect_err("unknown stream");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("invalid stream: ") && err.message().contains("no events"),
        "{err:?}"
    );
    let err = c
        .events
        .clone()
        .replay_preview(pb::ReplayPreviewRequest::default())
        .await
        .expect_err("no stream");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("stream"), "{err:?}");

    // The saved timelines' stream type takes no raw appends.
    let err = c
        .events
        .clone()
        .append(pb::AppendRequest {
            stream: stream(esq_domain::replay::TIMELINE_KIND, &unique("forged")),
            expected_version: crate::suite::any(),
            events: vec![json_event("TimelineSaved", r#"{"edits":[]}"#)],
        })
        .await
        .expect_err("raw append to a timeline");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("stream.type"), "{err:?}");
    untouched(c, &id, &before).await;
}

/// Every saved timeline, page by page (small pages, so that paging is exercised).
async fn all_timelines(c: &Clients) -> Vec<pb::Timeline> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    for _ in 0..10_000 {
        let page = c
            .events
            .clone()
            .list_timelines(pb::ListTimelinesRequest {
                page_size: 2,
                page_token,
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.timelines.len() <= 2, "{page:?}");
        out.extend(page.timelines);
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
    panic!("ListTimelines never ended");
}

/// ListTimelines refuses pages over its limit and tokens it did not issue, naming the field.
async fn list_timelines_refuses_bad_pages(c: &Clients) {
    for (req, field) in [
        (
            pb::ListTimelinesRequest {
                page_size: 501,
                page_token: String::new(),
            },
            "invalid page_size",
        ),
        (
            pb::ListTimelinesRequest {
                page_size: 1,
                page_token: "not-a-token\u{1}".into(),
            },
            "invalid page_token",
        ),
    ] {
        let err = c.events.clone().list_timelines(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{err:?}");
    }
}

/// A timeline without its save time (the commit time the store reports on append and the
/// recorded time it reads back need not be the same clock reading on every backend).
fn undated(mut t: pb::Timeline) -> pb::Timeline {
    assert!(t.saved_at.is_some(), "{t:?} has a save time");
    t.saved_at = None;
    t
}

/// A saved timeline reads back, is listed, previews like its inline edits, is replaced by a
/// later save, and never alters its stream.
pub async fn saved_timelines_preview_again(c: &Clients) {
    let id = five_event_cart(c).await;
    let before = read_all(c, "cart", &id).await;
    let name = unique("what-if");
    let mut events = c.events.clone();
    let saved = events
        .save_timeline(pb::SaveTimelineRequest {
            name: name.clone(),
            stream: stream("cart", &id),
            edits: vec![skip(2), insert(5, vec![item_added("fig", 1)])],
        })
        .await
        .expect("save")
        .into_inner();
    assert_eq!(saved.revision, 1);
    let got = events
        .get_timeline(pb::GetTimelineRequest { name: name.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(undated(got), undated(saved.clone()));
    list_timelines_refuses_bad_pages(c).await;
    let listed = all_timelines(c).await;
    assert!(
        listed
            .into_iter()
            .map(undated)
            .any(|t| t == undated(saved.clone())),
        "{name} is listed"
    );

    let by_name = |stream_ref| pb::ReplayPreviewRequest {
        stream: stream_ref,
        edits: vec![],
        timeline: name.clone(),
    };
    let p = events
        .replay_preview(by_name(None))
        .await
        .expect("preview by name")
        .into_inner();
    let inline = preview(c, &id, saved.edits.clone()).await.expect("inline");
    assert_eq!(violations_at(&p), violations_at(&inline));
    assert_eq!(violations_at(&p), vec![(3, 4), (5, 0)]);
    assert_eq!(
        (p.diff.clone(), p.state_after.clone()),
        (inline.diff, inline.state_after)
    );
    let err = events
        .replay_preview(by_name(stream("cart", "someone-else")))
        .await
        .expect_err("another stream");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // A refused save changes nothing; a later save replaces the timeline.
    let err = events
        .save_timeline(pb::SaveTimelineRequest {
            name: name.clone(),
            stream: stream("cart", &id),
            edits: vec![skip(6)],
        })
        .await
        .expect_err("bad edits");
    assert!(err.message().contains("edits[0].skip.version"), "{err:?}");
    let resaved = events
        .save_timeline(pb::SaveTimelineRequest {
            name: name.clone(),
            stream: stream("cart", &id),
            edits: vec![stop_at(1)],
        })
        .await
        .expect("save again")
        .into_inner();
    assert_eq!(resaved.revision, 2);
    let p = events
        .replay_preview(by_name(stream("cart", &id)))
        .await
        .expect("preview by name")
        .into_inner();
    assert_eq!(p.timeline.len(), 1);
    assert!(p.violations.is_empty());

    untouched(c, &id, &before).await;
}

/// Free-form streams fold the generic state projection and have no rules to break.
pub async fn replay_preview_of_a_free_form_stream(c: &Clients) {
    let id = unique("order");
    c.events
        .clone()
        .append(pb::AppendRequest {
            stream: stream("order", &id),
            expected_version: crate::suite::any(),
            events: vec![
                json_event("Set", r#"{"a":1}"#),
                json_event("Set", r#"{"a":2,"b":true}"#),
            ],
        })
        .await
        .expect("append");
    let p = c
        .events
        .clone()
        .replay_preview(pb::ReplayPreviewRequest {
            stream: stream("order", &id),
            edits: vec![skip(2), insert(2, vec![json_event("Set", r#"{"c":"x"}"#)])],
            timeline: String::new(),
        })
        .await
        .expect("preview")
        .into_inner();
    assert!(p.violations.is_empty());
    assert_eq!(
        diff(&p),
        vec![
            ("f.a", Some("2"), Some("1")),
            ("f.b", Some("true"), None),
            ("f.c", None, Some(r#""x""#)),
        ]
    );
    assert!(p.corrective_append_refused.is_empty());
    assert_eq!(
        read_all(c, "order", &id).await.len(),
        2,
        "nothing was written"
    );
}

/// A saved timeline is previewed against the stream as it is at the time of the preview:
/// events appended after the save join the new timeline (and today's state), the edits keep
/// naming the same versions, and new violations are reported where they happen.
pub async fn saved_timelines_follow_the_stream_as_it_grows(c: &Clients) {
    let id = unique("grows");
    let mut carts = c.carts.clone();
    for (sku, quantity) in [("apple", 2), ("pear", 1)] {
        carts
            .add_item(add(&id, sku, quantity, 10))
            .await
            .expect("add");
    }
    let name = unique("without-pear");
    let mut events = c.events.clone();
    let saved = events
        .save_timeline(pb::SaveTimelineRequest {
            name: name.clone(),
            stream: stream("cart", &id),
            edits: vec![skip(2)],
        })
        .await
        .expect("save")
        .into_inner();
    let by_name = pb::ReplayPreviewRequest {
        timeline: name.clone(),
        ..Default::default()
    };
    let p = events
        .replay_preview(by_name.clone())
        .await
        .expect("preview")
        .into_inner();
    assert_eq!((p.version_today, p.timeline.len()), (2, 1));
    assert!(p.violations.is_empty(), "{p:?}");
    assert_eq!(
        diff(&p),
        vec![
            ("item:pear", Some("1"), None),
            ("price:pear", Some("10"), None)
        ]
    );

    // Reality moves on: the pear is removed, a fig added.
    carts
        .remove_item(remove(&id, "pear", 1))
        .await
        .expect("remove");
    carts
        .add_item(add(&id, "fig", 3, 10))
        .await
        .expect("add fig");
    let before = read_all(c, "cart", &id).await;
    assert_eq!(before.len(), 4);

    let p = events
        .replay_preview(by_name)
        .await
        .expect("preview again")
        .into_inner();
    assert_eq!(p.version_today, 4);
    let origins: Vec<u64> = p
        .timeline
        .iter()
        .map(
            |s| match s.origin.as_ref().and_then(|o| o.origin.as_ref()) {
                Some(Origin::OriginalVersion(v)) => *v,
                other => panic!("only originals on this timeline: {other:?}"),
            },
        )
        .collect();
    assert_eq!(origins, vec![1, 3, 4]);
    assert_eq!(violations_at(&p), vec![(2, 3)]);
    assert!(
        p.violations[0].message.ends_with("once v2 is skipped"),
        "{p:?}"
    );
    // Compared with reality: both have the fig, only today had the pear's price.
    assert_eq!(p.state_today.get("item:fig").map(String::as_str), Some("3"));
    assert_eq!(p.state_after.get("item:fig").map(String::as_str), Some("3"));
    assert_eq!(diff(&p), vec![("price:pear", Some("10"), None)]);

    // The timeline itself did not change, and neither did the stream.
    let got = events
        .get_timeline(pb::GetTimelineRequest { name })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(undated(got), undated(saved));
    untouched(c, &id, &before).await;
}
