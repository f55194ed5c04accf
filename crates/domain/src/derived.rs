//! Derived projections: many-to-one read models computed from the documents of a per-stream
//! [`Projection`](crate::projection::Projection) (books per author from the book documents,
//! sales per SKU from the cart documents).
//!
//! A per-stream document has one version fence (document version = stream version). A derived
//! *target* gathers many source streams, so it keeps a fence per source instead: an *entry* per
//! source document, holding the source's version and the values it contributes (or nothing: a
//! versioned tombstone, when the source no longer contributes to that target). An entry is
//! replaced only by a strictly higher source version, so late, duplicate or reordered updates
//! are harmless, and the totals (count of live entries, and per [`Column`] a sum, minimum or
//! maximum) change in the same atomic step as the entry.
//!
//! Contributions are a pure function of the source document ([`Derived::contributions`]), like
//! index membership, so they can always be re-established from it: a crash between the
//! source's fenced apply and the target updates is repaired by re-deriving from the source
//! document (the projector keeps a pending marker, [`pending_field`], in the source document).
//!
//! [`apply_contribution`] is the reference semantics; every read store behaves exactly like it
//! (the Redis `contribute.lua` is property-tested against it).

use crate::projection::Doc;

/// Field of a target's totals document holding the number of live entries (sources that
/// contribute to it). A target with none reads as absent.
pub const COUNT_FIELD: &str = "_n";

/// Largest magnitude of a contributed value: values are clamped to it, so that sums of many of
/// them stay exact in every store (and minimums and maximums compare exactly in Lua's doubles).
pub const MAX_VALUE: i64 = 1_000_000_000_000_000;

/// Prefix of the source-document field marking derived updates still to be made for the
/// derived projection named after it (see [`pending_field`]).
pub const PENDING_PREFIX: &str = "_dx:";

/// How a column's total combines the values of the live entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    /// The sum (saturating; kept incrementally).
    Sum,
    /// The smallest value.
    Min,
    /// The largest value.
    Max,
}

impl Agg {
    /// One-letter code used by the Redis script: `S`, `N` (miNimum), `X` (maXimum).
    pub fn code(self) -> char {
        match self {
            Agg::Sum => 'S',
            Agg::Min => 'N',
            Agg::Max => 'X',
        }
    }
}

/// One total of a target document: its field name and how it combines the entries' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// The totals-document field (must not start with `_`).
    pub name: &'static str,
    /// How values combine.
    pub agg: Agg,
}

/// A many-to-one read model fed from the documents of one per-stream projection.
pub trait Derived: Send + Sync + 'static {
    /// Stable name, used in key names and APIs (`authors`, `sku_sales`).
    fn name(&self) -> &'static str;
    /// The name of the per-stream projection whose documents feed it (`book`, `cart2`).
    fn source(&self) -> &'static str;
    /// The totals every target keeps, in the order of the contributed values.
    fn columns(&self) -> &'static [Column];
    /// What a source document in its current state contributes: target ids (distinct) with
    /// one value per column. Targets it does not name get a tombstone from this source.
    fn contributions(&self, source_doc: &Doc) -> Vec<(String, Vec<i64>)>;
}

/// One update of one target by one source document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contribution {
    /// The source document's id (e.g. the ISBN, the cart id).
    pub source: String,
    /// The source document's version the update reflects (the per-source fence).
    pub version: u64,
    /// The values, one per column, or `None` for a tombstone (no longer contributes).
    pub values: Option<Vec<i64>>,
}

/// The pending-derivation marker field of derived projection `derived` in a source document.
pub fn pending_field(derived: &str) -> String {
    format!("{PENDING_PREFIX}{derived}")
}

/// The marker set in a source document by an apply at `version`, recording the targets the
/// document contributed to before (they get a tombstone unless the new state still names them).
pub fn pending_marker(version: u64, previous_targets: &[String]) -> String {
    let mut targets: Vec<&str> = previous_targets.iter().map(String::as_str).collect();
    targets.sort_unstable();
    targets.dedup();
    serde_json::json!({ "v": version, "targets": targets }).to_string()
}

/// The previous targets recorded in a marker (none if it cannot be read).
pub fn marker_targets(marker: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(marker)
        .ok()
        .and_then(|m| {
            m.get("targets")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The target ids a source document contributes to now.
pub fn targets<D: Derived + ?Sized>(derived: &D, source_doc: &Doc) -> Vec<String> {
    derived
        .contributions(source_doc)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// Every update that brings the targets in line with `source_doc` (source `source` at
/// `version`): a contribution to each target it names (values clamped to [`MAX_VALUE`], the
/// first of duplicated targets kept), and a tombstone for each of `previous` it no longer names.
pub fn derive<D: Derived + ?Sized>(
    derived: &D,
    source: &str,
    version: u64,
    source_doc: &Doc,
    previous: &[String],
) -> Vec<(String, Contribution)> {
    let width = derived.columns().len();
    let mut out: Vec<(String, Contribution)> = Vec::new();
    for (target, mut values) in derived.contributions(source_doc) {
        if out.iter().any(|(t, _)| *t == target) {
            continue;
        }
        values.resize(width, 0);
        for v in &mut values {
            *v = (*v).clamp(-MAX_VALUE, MAX_VALUE);
        }
        out.push((
            target,
            Contribution {
                source: source.to_owned(),
                version,
                values: Some(values),
            },
        ));
    }
    for target in previous {
        if !out.iter().any(|(t, _)| t == target) {
            out.push((
                target.clone(),
                Contribution {
                    source: source.to_owned(),
                    version,
                    values: None,
                },
            ));
        }
    }
    out
}

/// An entry as stored: `<version>` for a tombstone, `<version>,<v1>,…` for live values.
pub fn encode_entry(c: &Contribution) -> String {
    let mut s = c.version.to_string();
    for v in c.values.iter().flatten() {
        s.push(',');
        s.push_str(&v.to_string());
    }
    s
}

/// Reads a stored entry: its version (0 when unreadable) and its values when it is live with
/// exactly `width` readable values.
pub fn decode_entry(entry: &str, width: usize) -> (u64, Option<Vec<i64>>) {
    let mut parts = entry.split(',');
    let version = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let values: Vec<i64> = parts.map_while(|v| v.parse().ok()).collect();
    let values = (width > 0 && values.len() == width && entry.split(',').count() == width + 1)
        .then_some(values);
    (version, values)
}

/// The reference semantics of one contribution: `totals` is the target's totals document (what
/// queries read), `entries` its entries by source id. Applies `c` unless the source's entry is
/// already at `c.version` or later; returns whether it applied. Sums change incrementally
/// (subtract the old values, then add the new, each saturating); minimums and maximums are
/// recomputed from the live entries; with no live entry left the totals are removed and the
/// count is 0.
pub fn apply_contribution(
    totals: &mut Doc,
    entries: &mut Doc,
    columns: &[Column],
    c: &Contribution,
) -> bool {
    let width = columns.len();
    let (old_version, old_values) = entries
        .get(&c.source)
        .map_or((0, None), |e| decode_entry(e, width));
    if c.version <= old_version {
        return false;
    }
    let new_values = c.values.as_ref().filter(|v| v.len() == width);
    let new_entry = Contribution {
        source: c.source.clone(),
        version: c.version,
        values: new_values.cloned(),
    };
    entries.insert(c.source.clone(), encode_entry(&new_entry));
    let mut count: i64 = totals
        .get(COUNT_FIELD)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if old_values.is_some() {
        count -= 1;
    }
    if new_values.is_some() {
        count += 1;
    }
    let sum = |totals: &mut Doc, field: &str, by: i64| {
        let n = totals
            .get(field)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        totals.insert(field.to_owned(), n.saturating_add(by).to_string());
    };
    for (i, column) in columns.iter().enumerate() {
        if column.agg == Agg::Sum {
            if let Some(old) = &old_values {
                sum(totals, column.name, old[i].saturating_neg());
            }
            if let Some(new) = new_values {
                sum(totals, column.name, new[i]);
            }
        }
    }
    totals.insert(COUNT_FIELD.to_owned(), count.to_string());
    if count <= 0 {
        for column in columns {
            totals.remove(column.name);
        }
    } else if columns.iter().any(|c| c.agg != Agg::Sum) {
        let live: Vec<Vec<i64>> = entries
            .values()
            .filter_map(|e| decode_entry(e, width).1)
            .collect();
        for (i, column) in columns.iter().enumerate() {
            let pick = match column.agg {
                Agg::Sum => continue,
                Agg::Min => live.iter().map(|v| v[i]).min(),
                Agg::Max => live.iter().map(|v| v[i]).max(),
            };
            match pick {
                Some(v) => totals.insert(column.name.to_owned(), v.to_string()),
                None => totals.remove(column.name),
            };
        }
    }
    true
}

/// The number of live entries of a totals document (0 when absent).
pub fn live_count(totals: &Doc) -> u64 {
    totals
        .get(COUNT_FIELD)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A total of a totals document (0 when absent).
pub fn total(totals: &Doc, column: &str) -> i64 {
    totals.get(column).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// The index listing every target that ever had a live contribution (add-only, so that no
/// race can lose a member; readers skip targets whose count is 0).
pub const ALL_INDEX: &str = "all";

#[cfg(test)]
mod tests {
    use super::*;

    const COLS: &[Column] = &[
        Column {
            name: "n",
            agg: Agg::Sum,
        },
        Column {
            name: "lo",
            agg: Agg::Min,
        },
        Column {
            name: "hi",
            agg: Agg::Max,
        },
    ];

    fn c(source: &str, version: u64, values: Option<[i64; 3]>) -> Contribution {
        Contribution {
            source: source.into(),
            version,
            values: values.map(|v| v.to_vec()),
        }
    }

    #[test]
    fn entries_fence_per_source_and_totals_follow() {
        let (mut t, mut e) = (Doc::new(), Doc::new());
        assert!(apply_contribution(
            &mut t,
            &mut e,
            COLS,
            &c("a", 2, Some([1, 5, 5]))
        ));
        assert!(apply_contribution(
            &mut t,
            &mut e,
            COLS,
            &c("b", 1, Some([1, 9, 9]))
        ));
        assert_eq!(
            (
                live_count(&t),
                total(&t, "n"),
                total(&t, "lo"),
                total(&t, "hi")
            ),
            (2, 2, 5, 9)
        );
        // A late lower version of a changes nothing.
        assert!(!apply_contribution(&mut t, &mut e, COLS, &c("a", 1, None)));
        assert!(!apply_contribution(&mut t, &mut e, COLS, &c("a", 2, None)));
        // a leaves: its tombstone keeps the fence; min recomputed.
        assert!(apply_contribution(&mut t, &mut e, COLS, &c("a", 3, None)));
        assert_eq!((live_count(&t), total(&t, "n"), total(&t, "lo")), (1, 1, 9));
        assert!(!apply_contribution(
            &mut t,
            &mut e,
            COLS,
            &c("a", 2, Some([1, 1, 1]))
        ));
        assert!(apply_contribution(&mut t, &mut e, COLS, &c("b", 4, None)));
        assert_eq!(live_count(&t), 0);
        assert!(!t.contains_key("n") && !t.contains_key("lo") && !t.contains_key("hi"));
        assert_eq!(e["a"], "3");
    }

    #[test]
    fn entries_round_trip() {
        let live = c("x", 7, Some([1, -2, 3]));
        assert_eq!(encode_entry(&live), "7,1,-2,3");
        assert_eq!(decode_entry("7,1,-2,3", 3), (7, Some(vec![1, -2, 3])));
        assert_eq!(decode_entry("7", 3), (7, None));
        assert_eq!(decode_entry("7,1,x,3", 3), (7, None));
        assert_eq!(decode_entry("junk", 3), (0, None));
    }

    #[test]
    fn markers_round_trip() {
        let m = pending_marker(4, &["b".into(), "a".into(), "b".into()]);
        assert_eq!(marker_targets(&m), vec!["a".to_owned(), "b".to_owned()]);
        assert!(marker_targets("nonsense").is_empty());
    }
}
