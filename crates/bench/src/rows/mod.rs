//! The row groups: one module per group, each with
//! `pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>>`, registered in [`ROWS`] with
//! the [`row!`] macro. [`PLANNED`] is the table in order: a group named there that no
//! module registers yet is reported as "not measured yet".

use crate::ctx::Ctx;
use crate::report::Line;
use std::future::Future;
use std::pin::Pin;

pub mod append;
pub mod embedded;
pub mod fixtures;
pub mod getcart;
pub mod ghz;
pub mod memory;
pub mod projector;
pub mod read;
pub mod rebuild;
pub mod snapshots;

use read::{lag, waiters};

/// A boxed row future.
pub type RowFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Vec<Line>>> + Send + 'a>>;

/// A registered row group.
pub struct Row {
    /// Its name (the module's), for `--only`.
    pub name: &'static str,
    /// What it measures, one line (for `--list`).
    pub about: &'static str,
    /// Runs it.
    pub run: for<'a> fn(&'a Ctx) -> RowFuture<'a>,
}

/// Registers `rows::<module>` (its `run`) under the module's name.
macro_rules! row {
    ($module:ident, $about:expr) => {
        Row {
            name: stringify!($module),
            about: $about,
            run: |ctx| Box::pin($module::run(ctx)),
        }
    };
}

/// Every row group that exists, in no particular order (the report follows [`PLANNED`]).
pub fn all() -> Vec<Row> {
    // One entry per module; add yours on its own line.
    vec![
        row!(
            append,
            "Append c16 (1 event distinct streams, one stream, 50 events) vs the raw driver"
        ),
        row!(
            embedded,
            "esq dev AddItem c1 → c16 → c64, group commit vs groups of one (an fsync per append)"
        ),
        row!(
            getcart,
            "GetCart c16 vs redis-benchmark HGETALL; open loop at half of peak vs raw HGETALL"
        ),
        row!(
            ghz,
            "GetCart driven by ghz (Go gRPC client) c16 vs the Rust client c16"
        ),
        row!(
            projector,
            "projector catch-up of carts × 10 vs a raw program (scylla read + EVALSHA) and the Lua alone"
        ),
        row!(
            lag,
            "append → visible through the fast path at 50 appends/s (p50/p99)"
        ),
        row!(
            snapshots,
            "AddItem on a 2,000-event cart vs a 10-event cart (CQL, CQL without snapshots, embedded)"
        ),
        row!(
            waiters,
            "500 concurrent min_version waiters → Redis commands/s (INFO stats delta)"
        ),
        row!(
            rebuild,
            "projector peak RSS of a rebuild at two store sizes"
        ),
        row!(
            memory,
            "read-svc and projector RSS after 10k vs 100k streams"
        ),
    ]
}

/// A group of the table and the lines it will fill.
pub struct Planned {
    /// The module name that will measure it.
    pub name: &'static str,
    /// The part of issue 9 that owns it.
    pub owner: &'static str,
    /// Its lines: (path, target).
    pub lines: &'static [(&'static str, &'static str)],
}

/// The table, in order.
pub const PLANNED: &[Planned] = &[
    Planned {
        name: "append",
        owner: "write",
        lines: &[
            (
                "Append 1 event, distinct streams, c16 (vs raw driver: notification + LWT batch)",
                "≥ 0.9",
            ),
            ("same, vs the bare LWT batch", "≥ 0.75"),
            ("Append, one stream, c16 (vs bare LWT batch)", "≥ 0.75"),
            ("Append 50 events (vs raw driver, same work)", "≥ 0.9"),
        ],
    },
    Planned {
        name: "embedded",
        owner: "embedded",
        lines: &[("embedded AddItem c1 → c16 → c64", "≥ 5× from c1 to c16")],
    },
    Planned {
        name: "getcart",
        owner: "bench",
        lines: &[
            ("GetCart c16", "≥ 0.6"),
            ("GetCart at half of peak, open loop", "p99 ≤ 2 ms"),
        ],
    },
    Planned {
        name: "ghz",
        owner: "bench",
        lines: &[("GetCart driven by ghz (Go gRPC client) c16", "≥ 0.9")],
    },
    Planned {
        name: "projector",
        owner: "projector",
        lines: &[
            (
                "projector catch-up, 20,000 events (2,000 carts × 10)",
                "≥ 0.8 of a raw program doing the same storage work",
            ),
            ("same, vs the Lua alone, batched per stream", "(reference)"),
            ("same, vs the Lua alone, one call per event", "(reference)"),
        ],
    },
    Planned {
        name: "lag",
        owner: "read",
        lines: &[("append → visible, fast path, 50/s", "p50 ≤ 5, p99 ≤ 25 ms")],
    },
    Planned {
        name: "snapshots",
        owner: "snapshots",
        lines: &[("AddItem on a 2,000-event cart vs a 10-event cart", "≤ 1.5×")],
    },
    Planned {
        name: "waiters",
        owner: "read",
        lines: &[(
            "500 concurrent min_version waiters",
            "≤ 1,000 Redis commands/s",
        )],
    },
    Planned {
        name: "rebuild",
        owner: "bench",
        lines: &[(
            "rebuild: projector peak RSS vs store size",
            "flat in store size",
        )],
    },
    Planned {
        name: "memory",
        owner: "bench",
        lines: &[(
            "read-svc and projector memory, 10k vs 100k streams",
            "flat in the number of streams",
        )],
    },
];

/// The placeholder lines of a planned group no module measures yet.
pub fn not_yet(p: &Planned) -> Vec<Line> {
    p.lines
        .iter()
        .map(|(path, target)| {
            Line::new(*path, *target).note(format!("not measured yet (part: {})", p.owner))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_planned_rows_have_lines() {
        let rows = all();
        let mut names: Vec<&str> = rows.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), rows.len(), "two row groups share a name");
        let mut planned: Vec<&str> = PLANNED.iter().map(|p| p.name).collect();
        planned.sort_unstable();
        planned.dedup();
        assert_eq!(
            planned.len(),
            PLANNED.len(),
            "two planned groups share a name"
        );
        for p in PLANNED {
            let lines = not_yet(p);
            assert_eq!(lines.len(), p.lines.len());
            assert!(lines.iter().all(|l| l.note.contains("not measured yet")));
        }
    }
}
