//! Memory of read-svc and the projector in the number of streams: a stack of its own is filled
//! with S₁ one-event carts, every cart projected and read once through read-svc, resident
//! memory (VmRSS) of both processes taken; then the same up to S₂ = 10 × S₁. Flat is the goal:
//! neither process may hold per-stream state that grows with the store.

use crate::ctx::Ctx;
use crate::report::{thousands, Line};
use crate::rows::fixtures::{append_cart_events, read_carts};
use crate::sys::{peak_rss_mib, rss_mib};

/// The row.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let (small, large) = ctx.pick((20, 60), (10_000, 100_000));
    let cluster = ctx.start_cluster(Vec::new()).await?;
    let result = async {
        let mut at = Vec::new();
        let mut from = 0;
        for size in [small, large] {
            append_cart_events(cluster.write_channel.clone(), from, size, 1, 32).await?;
            read_carts(cluster.cart_queries(), from, size, 1, 32).await?;
            from = size;
            let projector = cluster
                .projector_proc()
                .ok_or_else(|| anyhow::anyhow!("the projector is not running"))?;
            at.push((
                rss_mib(cluster.read.pid())?,
                peak_rss_mib(cluster.read.pid())?,
                rss_mib(projector.pid)?,
                peak_rss_mib(projector.pid)?,
            ));
        }
        anyhow::Ok(at)
    }
    .await;
    let cleanup = cluster.cleanup(ctx).await;
    let at = result?;
    cleanup?;
    let (s, l) = (&at[0], &at[1]);
    let path = |what: &str| {
        format!(
            "{what} RSS, {} vs {} streams",
            thousands(small),
            thousands(large)
        )
    };
    let line = |what: &str, before: f64, after: f64, peak: f64| Line {
        path: path(what),
        esq: format!("{before:.1} → {after:.1} MiB"),
        baseline: String::new(),
        ratio: (before > 0.0).then(|| after / before),
        target: "flat in the number of streams".into(),
        latency: String::new(),
        cpu: String::new(),
        note: format!("peak (VmHWM) {peak:.1} MiB; ratio = RSS after / before"),
    };
    Ok(vec![
        line("read-svc", s.0, l.0, l.1),
        line("projector", s.2, l.2, l.3),
    ])
}
