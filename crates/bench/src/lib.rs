//! esq's benchmark harness: runs each path of ARCHITECTURE.md §10 side by side with a raw
//! engine doing the same storage work (the `scylla` driver with prepared statements, the
//! redis crate pipelined / by EVALSHA, `redis-benchmark`, `ghz`), in the same run, with the
//! sides interleaved round by round, and writes the table of ratios, percentiles and CPU per
//! process to `BENCHMARKS.md`. `scripts/bench` is the one command that builds the release
//! binaries, starts the backends and runs it; the test command runs every row once at
//! `--size smoke` so the harness cannot rot. Figures are never asserted anywhere.
//!
//! # Adding a row group
//!
//! 1. Create `src/rows/<name>.rs` with
//!    `pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>>`.
//! 2. Register it in `src/rows/mod.rs`: `pub mod <name>;` and a `row!(<name>, "what")` entry
//!    in `all()`. If the issue's table has it in `PLANNED`, use that name: its placeholder
//!    lines ("not measured yet") are then replaced by yours.
//! 3. In `run`, per round (`for _ in 0..ctx.rounds()`), run esq's side then the baseline's,
//!    collect [`load::Run`]s and report `Run::median` of each side, e.g.
//!
//! ```no_run
//! use esq_bench::{ctx::Ctx, load::{closed_loop, Run}, report::Line, sys::Watched};
//! # async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
//! let cluster = ctx.cluster().await?; // write-svc + projector + read-svc, shared by rows
//! let mut watch = cluster.watch_only(&["write-svc", "cassandra"]);
//! watch.push(Watched::me());
//! let load = ctx.load(16).watch(&watch); // 16 workers, ctx.duration(), CPU sampled
//! let (mut esq, mut base) = (Vec::new(), Vec::new());
//! for _ in 0..ctx.rounds() {
//!     let carts = cluster.carts();
//!     esq.push(closed_loop(&load, move |i| {
//!         let mut carts = carts.clone();
//!         async move { /* carts.add_item(...).await?; */ let _ = (&mut carts, i); Ok(()) }
//!     }).await?);
//!     let session = ctx.scylla().await?; // the raw driver: same CQL, prepared
//!     base.push(closed_loop(&load, move |_i| { let _s = &session; async move { Ok(()) } }).await?);
//! }
//! Ok(vec![Line::rates("Append c16", "≥ 0.9", &Run::median(&esq), "raw driver", &Run::median(&base))])
//! # }
//! ```
//!
//! What a row gets from [`ctx::Ctx`]: `size()`/`pick(smoke, full)` (keep smoke tiny: every
//! row runs once in the test command, < 60 s in total), `rounds()`, `duration()`,
//! `load(concurrency)`, `cluster()` (the shared stack; `start_cluster(env)` for one of its
//! own), `dev()` (a fresh `esq dev` process), `redis()`, `scylla()`, `redis_proc()` and
//! `cassandra_proc()` (for CPU sampling). [`load`] has `closed_loop` and `open_loop`; [`sys`]
//! has `Cpu::sample`, `peak_rss_mib` (VmHWM) and `rss_mib`; [`report`] the [`report::Line`]
//! and the cell formatters.

pub mod cqlops;
pub mod ctx;
pub mod load;
pub mod redisops;
pub mod report;
pub mod rows;
pub mod sys;
