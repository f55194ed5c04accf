//! Test support: the behaviour every [`ReadStore`] adapter must show, as checks that panic on the
//! first difference. Run [`run_all`] against each adapter (the in-memory store in its unit tests,
//! Redis standalone and Cluster in `tests/redis.rs`).
//!
//! Expected documents come from [`apply_to_doc`] on a `HashMap`, the reference semantics.
//! Every name a check uses starts with the caller's `prefix`, so checks can share a store.

use crate::{Doc, ReadStore};
use esq_domain::derived::{apply_contribution, Agg, Column, Contribution};
use esq_domain::projection::{
    apply_to_doc, is_deleted, ApplyOutcome, Batch, Changes, FieldOp, DELETED_FIELD,
    INDEX_PENDING_FIELD, VERSION_FIELD,
};

/// Runs every check below against `store`. `prefix` must be unique to this run.
pub async fn run_all<S: ReadStore>(store: &S, prefix: &str) {
    check_absent(store, prefix).await;
    check_field_ops(store, prefix).await;
    check_duplicate(store, prefix).await;
    check_stale(store, prefix).await;
    check_tombstone(store, prefix).await;
    check_index_paging(store, prefix).await;
    check_index_marker(store, prefix).await;
    check_checkpoints(store, prefix).await;
    check_records(store, prefix).await;
    check_concurrent_same_batch(store, prefix).await;
    check_contributions(store, prefix).await;
    check_clear_field_if(store, prefix).await;
    check_generation_swap(store, prefix).await;
    check_namespaces(store, prefix).await;
}

/// The generation record is replaced only when it still is what the caller read.
pub async fn check_generation_swap<S: ReadStore>(store: &S, prefix: &str) {
    let p = format!("{prefix}-gens");
    assert_eq!(store.generations(&p).await.expect("get"), None);
    assert!(!store
        .swap_generations(&p, Some("x"), "a")
        .await
        .expect("swap"));
    assert!(store.swap_generations(&p, None, "a").await.expect("swap"));
    assert!(!store.swap_generations(&p, None, "b").await.expect("swap"));
    assert!(!store
        .swap_generations(&p, Some("b"), "c")
        .await
        .expect("swap"));
    assert!(store
        .swap_generations(&p, Some("a"), "b")
        .await
        .expect("swap"));
    assert_eq!(
        store.generations(&p).await.expect("get").as_deref(),
        Some("b")
    );
}

/// Deleting a namespace removes its documents and indexes and nothing else — in particular
/// not the generations of a projection whose pre-generation namespace is deleted — and a walk
/// of a namespace's ids sees each document once.
pub async fn check_namespaces<S: ReadStore>(store: &S, prefix: &str) {
    let legacy = format!("{prefix}-ns");
    let g1 = crate::generations::namespace(&legacy, 1);
    let g12 = crate::generations::namespace(&legacy, 12);
    let n = 37;
    for ns in [&legacy, &g1, &g12] {
        for i in 0..n {
            let b = fields(1, 1, vec![set("f", "v")]);
            let id = format!("d{i}");
            store.apply(ns, &id, &b).await.expect("apply");
            store
                .update_indexes(ns, &id, &["all".to_owned()], &[], "")
                .await
                .expect("index");
        }
    }
    for ns in [&legacy, &g1] {
        let mut seen = std::collections::BTreeSet::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let (ids, next) = store
                .doc_ids_page(ns, cursor.as_deref(), 10)
                .await
                .expect("page");
            for id in ids {
                assert!(seen.insert(id.clone()), "{id} returned twice in {ns}");
            }
            pages += 1;
            assert!(pages < 1000, "walk of {ns} does not end");
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let expected: std::collections::BTreeSet<String> =
            (0..n).map(|i| format!("d{i}")).collect();
        assert_eq!(seen, expected, "ids of {ns}");
    }
    assert!(store
        .index_contains(&legacy, "all", "d3")
        .await
        .expect("contains"));
    assert!(!store
        .index_contains(&legacy, "all", "zz")
        .await
        .expect("contains"));
    assert!(!store
        .index_contains(&legacy, "none", "d3")
        .await
        .expect("contains"));
    store.delete_doc(&g12, "d36").await.expect("delete doc");
    assert_eq!(store.get(&g12, "d36").await.expect("get"), None);
    store
        .apply(&g12, "d36", &fields(1, 1, vec![set("f", "v")]))
        .await
        .expect("apply");
    let deleted = store.delete_namespace(&legacy).await.expect("delete");
    assert_eq!(deleted, n + 1, "documents and the one index of {legacy}");
    assert_eq!(store.get(&legacy, "d0").await.expect("get"), None);
    assert!(store
        .index_page(&legacy, "all", None, 10)
        .await
        .expect("page")
        .is_empty());
    let (ids, _) = store.doc_ids_page(&legacy, None, 10).await.expect("page");
    assert!(ids.is_empty(), "{ids:?}");
    for ns in [&g1, &g12] {
        assert_eq!(store.version(ns, "d0").await.expect("version"), 1, "{ns}");
        assert_eq!(
            store.index_page(ns, "all", None, 1).await.expect("page"),
            vec!["d0".to_owned()]
        );
    }
    assert_eq!(store.delete_namespace(&g1).await.expect("delete"), n + 1);
    assert_eq!(store.version(&g12, "d5").await.expect("version"), 1);
    assert_eq!(store.delete_namespace(&g12).await.expect("delete"), n + 1);
}

/// A batch of field ops only.
pub fn fields(first: u64, last: u64, ops: Vec<FieldOp>) -> Batch {
    Batch {
        first_version: first,
        last_version: last,
        changes: Changes { fields: ops },
    }
}

fn set(k: &str, v: &str) -> FieldOp {
    FieldOp::Set(k.to_owned(), v.to_owned())
}

/// Applies `batch` to the store and to `model`, and asserts the same outcome and document.
async fn apply_both<S: ReadStore>(
    store: &S,
    projection: &str,
    doc_id: &str,
    model: &mut Doc,
    batch: &Batch,
) -> ApplyOutcome {
    let expected = apply_to_doc(model, batch);
    let outcome = store.apply(projection, doc_id, batch).await.expect("apply");
    assert_eq!(outcome, expected, "outcome of {batch:?} on {doc_id:?}");
    assert_doc(store, projection, doc_id, model).await;
    outcome
}

/// Asserts that the stored document equals `model` (absent when `model` is empty).
async fn assert_doc<S: ReadStore>(store: &S, projection: &str, doc_id: &str, model: &Doc) {
    let stored = store.get(projection, doc_id).await.expect("get");
    let expected = (!model.is_empty()).then(|| model.clone());
    assert_eq!(stored, expected, "document {projection}/{doc_id}");
    let version = store.version(projection, doc_id).await.expect("version");
    assert_eq!(
        version,
        esq_domain::projection::doc_version(model),
        "version of {projection}/{doc_id}"
    );
}

async fn page<S: ReadStore>(
    store: &S,
    projection: &str,
    index: &str,
    after: Option<&str>,
    limit: usize,
) -> Vec<String> {
    store
        .index_page(projection, index, after, limit)
        .await
        .expect("index_page")
}

/// A document nothing was applied to: `get` is `None`, `version` is 0; an index nothing was added
/// to is empty; a checkpoint never saved is `None`.
pub async fn check_absent<S: ReadStore>(store: &S, prefix: &str) {
    let projection = format!("{prefix}-absent");
    assert_eq!(store.get(&projection, "nope").await.expect("get"), None);
    assert_eq!(
        store.version(&projection, "nope").await.expect("version"),
        0
    );
    assert!(page(store, &projection, "all", None, 10).await.is_empty());
    assert_eq!(
        store
            .checkpoint(&format!("{prefix}-never"))
            .await
            .expect("checkpoint"),
        None
    );
}

/// Every [`FieldOp`], including the corners of `Incr` and `Adjust` (missing field, non-integer text, `+7`
/// and `007`, overflow saturating), in document ids and values with spaces, `:`, `@`, `.`, `-`
/// and non-ASCII text.
pub async fn check_field_ops<S: ReadStore>(store: &S, prefix: &str) {
    let projection = format!("{prefix}-ops");
    for doc_id in ["cart-1", "user@example.com:cart.2", "Ursula K. Le Guin"] {
        let mut model = Doc::new();
        let batches = [
            fields(
                1,
                1,
                vec![
                    set("title", "The Dispossessed"),
                    set("author", "Ursula K. Le Guin"),
                    set("empty", ""),
                    set("with:colon", "a: b @ c.d - é ✓"),
                ],
            ),
            fields(
                2,
                3,
                vec![
                    FieldOp::Incr("count".to_owned(), 5),
                    FieldOp::Incr("count".to_owned(), -7),
                    FieldOp::Del("empty".to_owned()),
                    FieldOp::Del("never-there".to_owned()),
                    set("title", "The Lathe of Heaven"),
                ],
            ),
            fields(
                4,
                4,
                vec![
                    set("text", "abc"),
                    FieldOp::Incr("text".to_owned(), 3),
                    set("plus", "+7"),
                    FieldOp::Incr("plus".to_owned(), 1),
                    set("zeros", "007"),
                    FieldOp::Incr("zeros".to_owned(), 0),
                    set("minus-zero", "-0"),
                    FieldOp::Incr("minus-zero".to_owned(), -1),
                    set("too-big", "99999999999999999999"),
                    FieldOp::Incr("too-big".to_owned(), 1),
                ],
            ),
            fields(
                5,
                5,
                vec![
                    set("max", &i64::MAX.to_string()),
                    FieldOp::Incr("max".to_owned(), 1),
                    set("min", &i64::MIN.to_string()),
                    FieldOp::Incr("min".to_owned(), i64::MIN),
                    FieldOp::Incr("fresh-min".to_owned(), i64::MIN),
                    FieldOp::Incr("fresh-max".to_owned(), i64::MAX),
                ],
            ),
            fields(
                6,
                6,
                vec![
                    set("units", "3"),
                    FieldOp::Adjust("units".to_owned(), 2),
                    set("gone", "2"),
                    FieldOp::Adjust("gone".to_owned(), -2),
                    FieldOp::Adjust("missing".to_owned(), 4),
                    set("odd", "+4"),
                    FieldOp::Adjust("odd".to_owned(), -1),
                    set("near-max", &i64::MAX.to_string()),
                    FieldOp::Adjust("near-max".to_owned(), 1),
                    set("near-min", "-5"),
                    FieldOp::Adjust("near-min".to_owned(), i64::MIN),
                ],
            ),
            fields(
                7,
                9,
                vec![
                    set("before", "gone"),
                    FieldOp::Tombstone,
                    set("after", "kept"),
                ],
            ),
        ];
        for batch in &batches {
            let outcome = apply_both(store, &projection, doc_id, &mut model, batch).await;
            assert_eq!(outcome, ApplyOutcome::Applied);
        }
        // Spot checks that the model is what the reference says, so a wrong model cannot hide a
        // wrong store.
        assert_eq!(model.get("after").map(String::as_str), Some("kept"));
        assert_eq!(model.get(VERSION_FIELD).map(String::as_str), Some("9"));
        assert_eq!(model.get(DELETED_FIELD).map(String::as_str), Some("1"));
    }
}

/// A batch whose events are all applied already is a `Duplicate` and changes nothing.
pub async fn check_duplicate<S: ReadStore>(store: &S, prefix: &str) {
    let projection = format!("{prefix}-dup");
    let mut model = Doc::new();
    let first = fields(1, 3, vec![set("a", "1"), FieldOp::Incr("n".to_owned(), 1)]);
    apply_both(store, &projection, "d", &mut model, &first).await;
    for (f, l) in [(1, 3), (2, 3), (1, 1), (3, 3), (0, 2)] {
        let again = fields(f, l, vec![set("a", "changed"), FieldOp::Tombstone]);
        let outcome = apply_both(store, &projection, "d", &mut model, &again).await;
        assert_eq!(outcome, ApplyOutcome::Duplicate, "batch {f}..={l}");
    }
    assert_eq!(model.get("a").map(String::as_str), Some("1"));
}

/// A gap (`first > _v + 1`) or an overlap (`first <= _v < last`) is `Stale { current }` and
/// changes nothing, also on a document that does not exist yet (which stays absent).
pub async fn check_stale<S: ReadStore>(store: &S, prefix: &str) {
    let projection = format!("{prefix}-stale");
    let mut fresh = Doc::new();
    for (f, l) in [(2, 2), (3, 5), (0, 1)] {
        let outcome = apply_both(
            store,
            &projection,
            "fresh",
            &mut fresh,
            &fields(f, l, vec![set("x", "y")]),
        )
        .await;
        assert_eq!(outcome, ApplyOutcome::Stale { current: 0 }, "{f}..={l}");
    }
    assert_eq!(store.get(&projection, "fresh").await.expect("get"), None);

    let mut model = Doc::new();
    apply_both(
        store,
        &projection,
        "d",
        &mut model,
        &fields(1, 3, vec![set("a", "1")]),
    )
    .await;
    for (f, l) in [(5, 6), (3, 4), (2, 7), (1, 4), (0, 4)] {
        let outcome = apply_both(
            store,
            &projection,
            "d",
            &mut model,
            &fields(f, l, vec![set("a", "2"), FieldOp::Tombstone]),
        )
        .await;
        assert_eq!(outcome, ApplyOutcome::Stale { current: 3 }, "{f}..={l}");
    }
    let next = fields(4, 4, vec![set("a", "4")]);
    let outcome = apply_both(store, &projection, "d", &mut model, &next).await;
    assert_eq!(outcome, ApplyOutcome::Applied);
}

/// A tombstone removes every field but keeps the version, so the fence survives the delete.
pub async fn check_tombstone<S: ReadStore>(store: &S, prefix: &str) {
    let projection = format!("{prefix}-tomb");
    let mut model = Doc::new();
    apply_both(
        store,
        &projection,
        "d",
        &mut model,
        &fields(1, 2, vec![set("a", "1"), set("b", "2")]),
    )
    .await;
    apply_both(
        store,
        &projection,
        "d",
        &mut model,
        &fields(3, 3, vec![FieldOp::Tombstone]),
    )
    .await;
    let doc = store
        .get(&projection, "d")
        .await
        .expect("get")
        .expect("a tombstone is still a document");
    assert!(is_deleted(&doc));
    assert_eq!(doc.len(), 2, "only _v and _deleted remain: {doc:?}");
    assert_eq!(store.version(&projection, "d").await.expect("version"), 3);
    for (f, l, expected) in [
        (1, 2, ApplyOutcome::Duplicate),
        (5, 5, ApplyOutcome::Stale { current: 3 }),
        (4, 4, ApplyOutcome::Applied),
    ] {
        let outcome = apply_both(
            store,
            &projection,
            "d",
            &mut model,
            &fields(f, l, vec![set("a", "again")]),
        )
        .await;
        assert_eq!(outcome, expected, "{f}..={l}");
    }
}

/// Index membership in byte-wise lexicographic order, paged with an exclusive `after` cursor
/// (which need not be a member) and a `limit`; removal; idempotent adds and removes.
pub async fn check_index_paging<S: ReadStore>(store: &S, prefix: &str) {
    let projection = format!("{prefix}-idx");
    let index = "author:Ursula K. Le Guin".to_owned();
    let members = [
        "b", "a", "ab", "B", "aa", "a b", "a:b", "x@y.z", "é", "-", "[", "(", "10", "9",
    ];
    for m in members {
        index_update(store, &projection, m, &[&index], &[]).await;
    }
    let mut sorted: Vec<String> = members.iter().map(|m| (*m).to_owned()).collect();
    sorted.sort();

    assert_eq!(page(store, &projection, &index, None, 100).await, sorted);
    assert_eq!(page(store, &projection, &index, None, 3).await, sorted[..3]);
    assert!(page(store, &projection, &index, None, 0).await.is_empty());
    // Walk the whole index two at a time.
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let got = page(store, &projection, &index, after.as_deref(), 2).await;
        if got.is_empty() {
            break;
        }
        assert!(got.len() <= 2);
        after = got.last().cloned();
        walked.extend(got);
    }
    assert_eq!(walked, sorted);
    // Cursors that are not members, and cursors past the end.
    let expected: Vec<String> = sorted
        .iter()
        .filter(|m| m.as_str() > "a ")
        .cloned()
        .collect();
    assert_eq!(
        page(store, &projection, &index, Some("a "), 100).await,
        expected
    );
    assert!(page(store, &projection, &index, Some("\u{10FFFF}"), 10)
        .await
        .is_empty());
    assert!(page(store, &projection, "other", None, 10).await.is_empty());

    // Removal, removal of a non-member, repeated adds; one document in two indexes.
    index_update(store, &projection, "a", &[], &[&index]).await;
    index_update(store, &projection, "not-a-member", &[], &[&index]).await;
    index_update(store, &projection, "b", &[&index], &[]).await;
    index_update(store, &projection, "z", &["other"], &[]).await;
    index_update(store, &projection, "z", &[], &["other"]).await;
    index_update(store, &projection, "y", &["other", &index], &[]).await;
    sorted.retain(|m| m != "a");
    sorted.push("y".to_owned());
    sorted.sort();
    assert_eq!(page(store, &projection, &index, None, 100).await, sorted);
    assert_eq!(page(store, &projection, "other", None, 10).await, ["y"]);
}

async fn index_update<S: ReadStore>(
    store: &S,
    projection: &str,
    doc_id: &str,
    add: &[&str],
    remove: &[&str],
) {
    let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    store
        .update_indexes(projection, doc_id, &owned(add), &owned(remove), "-")
        .await
        .expect("update_indexes");
}

async fn pending_marker<S: ReadStore>(store: &S, projection: &str) -> Option<String> {
    store
        .get(projection, "d")
        .await
        .expect("get")
        .and_then(|d| d.get(INDEX_PENDING_FIELD).cloned())
}

/// `apply` never touches indexes; `update_indexes` changes them and clears the document's
/// pending-index marker only while it still holds the given value.
pub async fn check_index_marker<S: ReadStore>(store: &S, prefix: &str) {
    let projection = format!("{prefix}-marker");
    let with = |f: u64, l: u64| Batch {
        first_version: f,
        last_version: l,
        changes: Changes {
            fields: vec![set(INDEX_PENDING_FIELD, &l.to_string())],
        },
    };
    let outcome = store
        .apply(&projection, "d", &with(1, 1))
        .await
        .expect("apply");
    assert_eq!(outcome, ApplyOutcome::Applied);
    assert!(page(store, &projection, "all", None, 10).await.is_empty());
    assert_eq!(
        pending_marker(store, &projection).await.as_deref(),
        Some("1")
    );

    let outcome = store
        .apply(&projection, "d", &with(2, 2))
        .await
        .expect("apply");
    assert_eq!(outcome, ApplyOutcome::Applied);
    // An update for version 1 finishes its work but leaves version 2's marker.
    store
        .update_indexes(&projection, "d", &["all".to_owned()], &[], "1")
        .await
        .expect("update");
    assert_eq!(page(store, &projection, "all", None, 10).await, ["d"]);
    assert_eq!(
        pending_marker(store, &projection).await.as_deref(),
        Some("2")
    );
    store
        .update_indexes(&projection, "d", &["all".to_owned()], &[], "2")
        .await
        .expect("update");
    assert_eq!(pending_marker(store, &projection).await, None);
    // A document that does not exist stays absent.
    store
        .update_indexes(&projection, "ghost", &["all".to_owned()], &[], "1")
        .await
        .expect("update");
    assert_eq!(store.get(&projection, "ghost").await.expect("get"), None);
}

/// Checkpoints round-trip and can be overwritten; names do not collide.
pub async fn check_checkpoints<S: ReadStore>(store: &S, prefix: &str) {
    let a = format!("{prefix}-shard-0");
    let b = format!("{prefix}-shard-1");
    store.save_checkpoint(&a, "pos 1").await.expect("save");
    assert_eq!(
        store.checkpoint(&a).await.expect("load").as_deref(),
        Some("pos 1")
    );
    assert_eq!(store.checkpoint(&b).await.expect("load"), None);
    store
        .save_checkpoint(&a, "2026-11-01T00:00:00Z/ab:cd")
        .await
        .expect("save");
    assert_eq!(
        store.checkpoint(&a).await.expect("load").as_deref(),
        Some("2026-11-01T00:00:00Z/ab:cd")
    );
}

/// The same batch applied many times concurrently is applied exactly once.
pub async fn check_concurrent_same_batch<S: ReadStore>(store: &S, prefix: &str) {
    let projection = format!("{prefix}-race");
    let batch = fields(1, 1, vec![FieldOp::Incr("n".to_owned(), 1)]);
    let outcomes =
        futures::future::join_all((0..16).map(|_| store.apply(&projection, "d", &batch))).await;
    let applied = outcomes
        .into_iter()
        .map(|o| o.expect("apply"))
        .filter(|o| *o == ApplyOutcome::Applied)
        .count();
    assert_eq!(applied, 1);
    let doc = store.get(&projection, "d").await.expect("get");
    assert_eq!(doc.and_then(|d| d.get("n").cloned()).as_deref(), Some("1"));
}

/// Columns of every kind, for the derived checks.
pub const CONTRACT_COLUMNS: &[Column] = &[
    Column {
        name: "count",
        agg: Agg::Sum,
    },
    Column {
        name: "low",
        agg: Agg::Min,
    },
    Column {
        name: "high",
        agg: Agg::Max,
    },
];

/// Contributions: the per-source fence, tombstones, totals, and a target left with no live
/// entry — each step exactly as [`apply_contribution`] on maps.
pub async fn check_contributions<S: ReadStore>(store: &S, prefix: &str) {
    let ns = format!("{prefix}-derived");
    let c = |source: &str, version: u64, values: Option<[i64; 3]>| Contribution {
        source: source.to_owned(),
        version,
        values: values.map(|v| v.to_vec()),
    };
    let steps = [
        c("a", 2, Some([1, 500, 500])),
        c("b", 1, Some([1, 300, 300])),
        c("a", 1, Some([1, 1, 1])),
        c("c", 5, Some([1, -7, -7])),
        c("c", 6, None),
        c("a", 3, Some([1, 900, 900])),
        c("b", 2, None),
        c("a", 4, None),
        c("a", 4, Some([1, 2, 2])),
        c("b", 3, Some([1, 42, 42])),
    ];
    let (mut totals, mut entries) = (Doc::new(), Doc::new());
    assert_eq!(store.get(&ns, "t").await.expect("get"), None);
    for step in &steps {
        let expected = apply_contribution(&mut totals, &mut entries, CONTRACT_COLUMNS, step);
        let applied = store
            .contribute(&ns, "t", CONTRACT_COLUMNS, step)
            .await
            .expect("contribute");
        assert_eq!(applied, expected, "applied {step:?}");
        let stored = store.get(&ns, "t").await.expect("get");
        assert_eq!(stored.as_ref(), Some(&totals), "totals after {step:?}");
    }
    // A derived generation's namespace goes whole: totals, entries (the per-source fences:
    // an old version applies again afterwards) and the listing index.
    let g = crate::generations::namespace(&ns, 3);
    store
        .contribute(&g, "t", CONTRACT_COLUMNS, &steps[0])
        .await
        .expect("contribute");
    store
        .update_indexes(&g, "t", &["all".to_owned()], &[], "")
        .await
        .expect("index");
    assert_eq!(store.delete_namespace(&g).await.expect("delete"), 3);
    assert_eq!(store.get(&g, "t").await.expect("get"), None);
    assert!(store
        .index_page(&g, "all", None, 10)
        .await
        .expect("page")
        .is_empty());
    assert!(store
        .contribute(&g, "t", CONTRACT_COLUMNS, &c("a", 1, Some([1, 1, 1])))
        .await
        .expect("contribute"));
    assert!(
        store.get(&ns, "t").await.expect("get").is_some(),
        "{ns} kept"
    );
}

/// `clear_field_if` removes a field only while it holds the given value.
pub async fn check_clear_field_if<S: ReadStore>(store: &S, prefix: &str) {
    let ns = format!("{prefix}-clear");
    let b = fields(1, 1, vec![set("_m", "x"), set("keep", "1")]);
    store.apply(&ns, "d", &b).await.expect("apply");
    store
        .clear_field_if(&ns, "d", "_m", "y")
        .await
        .expect("clear");
    let doc = store.get(&ns, "d").await.expect("get").expect("doc");
    assert_eq!(doc.get("_m").map(String::as_str), Some("x"));
    store
        .clear_field_if(&ns, "d", "_m", "x")
        .await
        .expect("clear");
    let doc = store.get(&ns, "d").await.expect("get").expect("doc");
    assert!(!doc.contains_key("_m"));
    assert_eq!(doc.get("keep").map(String::as_str), Some("1"));
    // A missing document stays missing.
    store
        .clear_field_if(&ns, "none", "_m", "x")
        .await
        .expect("clear");
    assert_eq!(store.get(&ns, "none").await.expect("get"), None);
}

/// Record sets: put replaces, get and delete by key, pages in key order after a bound, counts;
/// sets do not collide.
pub async fn check_records<S: ReadStore>(store: &S, prefix: &str) {
    let set = format!("{prefix}:records");
    let other = format!("{prefix}:records-other");
    assert_eq!(store.record_count(&set).await.expect("count"), 0);
    assert_eq!(store.get_record(&set, "a").await.expect("get"), None);
    for key in ["cart:b", "cart:a", "book:9780441478125", "cart:c"] {
        store
            .put_record(&set, key, &format!("r-{key}"))
            .await
            .expect("put");
    }
    store
        .put_record(&set, "cart:a", "again")
        .await
        .expect("put");
    store.put_record(&other, "cart:z", "z").await.expect("put");
    assert_eq!(store.record_count(&set).await.expect("count"), 4);
    assert_eq!(
        store
            .get_record(&set, "cart:a")
            .await
            .expect("get")
            .as_deref(),
        Some("again")
    );
    let keys = |page: Vec<(String, String)>| page.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(store.records_page(&set, None, 2).await.expect("page")),
        ["book:9780441478125", "cart:a"]
    );
    assert_eq!(
        store
            .records_page(&set, Some("cart:a"), 10)
            .await
            .expect("page"),
        [
            ("cart:b".to_owned(), "r-cart:b".to_owned()),
            ("cart:c".to_owned(), "r-cart:c".to_owned())
        ]
    );
    assert!(store
        .records_page(&set, None, 0)
        .await
        .expect("page")
        .is_empty());
    assert!(store.delete_record(&set, "cart:b").await.expect("delete"));
    assert!(!store.delete_record(&set, "cart:b").await.expect("delete"));
    assert_eq!(store.record_count(&set).await.expect("count"), 3);
    assert_eq!(
        keys(
            store
                .records_page(&set, Some("cart:a"), 10)
                .await
                .expect("page")
        ),
        ["cart:c"]
    );
    assert_eq!(store.record_count(&other).await.expect("count"), 1);
}
