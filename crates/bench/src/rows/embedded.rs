//! The embedded store's group commit, through `esq dev` over gRPC: AddItem (each call on a
//! new cart, so every append is one event on a fresh stream and the cost does not grow with
//! stream length) in a closed loop at c1, c16 and c64. The baseline is the same binary with
//! groups of one (`ESQ_GROUP_COMMIT_MAX=1`): a redb transaction and an fsync per append, what
//! the store did before group commit. The target compares esq with itself: throughput at c16
//! over throughput at c1. Each round starts a fresh `esq dev` per side (an empty store), the
//! sides' order alternating from round to round.

use crate::ctx::Ctx;
use crate::load::{closed_loop, Run};
use crate::report::{cpu, percentiles, rate, Line};
use esq::pb::cart::v1::AddItemRequest;

/// The concurrencies of the row, in order.
pub const CONCURRENCY: [usize; 3] = [1, 16, 64];

/// Group commit (the default) or groups of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Grouped,
    One,
}

impl Side {
    fn env(self) -> Vec<(String, String)> {
        match self {
            Side::Grouped => Vec::new(),
            Side::One => vec![("ESQ_GROUP_COMMIT_MAX".into(), "1".into())],
        }
    }
}

/// Measures one side: a fresh `esq dev`, AddItem at each concurrency.
async fn side(ctx: &Ctx, side: Side) -> anyhow::Result<Vec<Run>> {
    let dev = ctx.dev_with(&side.env()).await?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut runs = Vec::with_capacity(CONCURRENCY.len());
    for c in CONCURRENCY {
        let load = ctx.load(c).watch(&[dev.watched()]);
        let carts = dev.carts();
        let prefix = format!("emb-{tag}-c{c}");
        let run = closed_loop(&load, move |i| {
            let mut carts = carts.clone();
            let cart_id = format!("{prefix}-{i}");
            async move {
                carts
                    .add_item(AddItemRequest {
                        cart_id,
                        sku: "sku-1".into(),
                        quantity: 1,
                        unit_price_cents: 100,
                        expected_version: None,
                        command_id: String::new(),
                    })
                    .await?;
                Ok(())
            }
        })
        .await?;
        runs.push(run);
    }
    dev.proc.stop().await?;
    Ok(runs)
}

/// `1,498 → 1,860 → 1,688/s`.
fn rates(runs: &[Run]) -> String {
    runs.iter()
        .map(|r| rate(r.rate))
        .collect::<Vec<_>>()
        .join(" → ")
}

/// `c1 p50 0.61 / p99 1.9 ms; c16 …`.
fn latencies(runs: &[Run]) -> String {
    CONCURRENCY
        .iter()
        .zip(runs)
        .map(|(c, r)| format!("c{c} {}", percentiles(r)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The row: see the module docs.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let mut grouped: Vec<Vec<Run>> = vec![Vec::new(); CONCURRENCY.len()];
    let mut one: Vec<Vec<Run>> = vec![Vec::new(); CONCURRENCY.len()];
    for round in 0..ctx.rounds() {
        let order = if round % 2 == 0 {
            [Side::Grouped, Side::One]
        } else {
            [Side::One, Side::Grouped]
        };
        for s in order {
            let runs = side(ctx, s).await?;
            let into = if s == Side::Grouped {
                &mut grouped
            } else {
                &mut one
            };
            for (k, r) in runs.into_iter().enumerate() {
                into[k].push(r);
            }
        }
    }
    let grouped: Vec<Run> = grouped.iter().map(|r| Run::median(r)).collect();
    let one: Vec<Run> = one.iter().map(|r| Run::median(r)).collect();
    let scale = |runs: &[Run]| (runs[0].rate > 0.0).then(|| runs[1].rate / runs[0].rate);
    let at16 = (one[1].rate > 0.0).then(|| grouped[1].rate / one[1].rate);
    let line = Line {
        path: "embedded AddItem c1 → c16 → c64".into(),
        esq: rates(&grouped),
        baseline: format!(
            "groups of one (a transaction and an fsync per append, ESQ_GROUP_COMMIT_MAX=1): {}",
            rates(&one)
        ),
        ratio: scale(&grouped),
        target: "≥ 5× from c1 to c16".into(),
        latency: format!("{} · base {}", latencies(&grouped), latencies(&one)),
        cpu: format!(
            "c16 {} · base c16 {}",
            cpu(&grouped[1].cpu),
            cpu(&one[1].cpu)
        ),
        note: format!(
            "ratio = esq at c16 / esq at c1; groups of one scale {:.1}× from c1 to c16; group \
             commit vs groups of one at c16: {:.1}×",
            scale(&one).unwrap_or(0.0),
            at16.unwrap_or(0.0)
        ),
    };
    Ok(vec![line])
}
