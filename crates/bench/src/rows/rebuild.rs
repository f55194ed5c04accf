//! Rebuild memory in the store's size: a stack of its own is filled with carts of 50 events,
//! then a fresh projector process rebuilds the cart projection (`esq.v1.Projections/Rebuild`,
//! followed to DONE) and its peak resident memory (VmHWM) is read; then the store is made four
//! times larger and the same is done again. A rebuild must stream the store, so the peak is
//! meant to stay flat.

use crate::ctx::{Cluster, Ctx};
use crate::report::{rate, thousands, Line};
use crate::rows::fixtures::append_cart_events;
use crate::sys::{peak_rss_mib, Cpu};
use esq::pb::v1::{
    projections_client::ProjectionsClient, RebuildRequest, RebuildState, WatchRebuildRequest,
};
use std::time::{Duration, Instant};

/// Events per cart.
const EVENTS: u64 = 50;

/// What one rebuild showed.
struct Rebuilt {
    peak_mib: f64,
    events_per_sec: f64,
    cores: f64,
}

/// Starts a fresh projector, rebuilds `cart2` through it and waits until the rebuild is done.
async fn rebuild(ctx: &Ctx, cluster: &Cluster, events: u64) -> anyhow::Result<Rebuilt> {
    let t = Instant::now();
    let projector = cluster.start_projector(ctx, &[]).await?;
    eprintln!(
        "  rebuild: fresh projector serving after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let addr = cluster
        .projector_addr()
        .ok_or_else(|| anyhow::anyhow!("the projector is not running"))?;
    let mut client = ProjectionsClient::new(crate::ctx::channel(addr).await?);
    let cpu = Cpu::sample(std::slice::from_ref(&projector));
    let mut server_rate = 0.0;
    let generation = client
        .rebuild(RebuildRequest {
            projection: "cart2".into(),
        })
        .await?
        .into_inner()
        .generation;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let mut watch = client
            .watch_rebuild(WatchRebuildRequest {
                projection: "cart2".into(),
                generation,
            })
            .await?
            .into_inner();
        while let Some(p) = watch.message().await? {
            if p.events_per_second > 0.0 {
                server_rate = p.events_per_second;
            }
            match p.state() {
                RebuildState::Done => {
                    eprintln!(
                        "  rebuild: {events} events rebuilt, {} (server's figure)",
                        rate(server_rate)
                    );
                    let cores = cpu.cores().first().map_or(0.0, |c| c.cores);
                    return Ok(Rebuilt {
                        peak_mib: peak_rss_mib(projector.pid)?,
                        events_per_sec: server_rate,
                        cores,
                    });
                }
                RebuildState::Failed => anyhow::bail!("rebuild failed: {}", p.error),
                _ => {}
            }
        }
        // The stream ended without a verdict (server restart or deadline): follow again.
        anyhow::ensure!(Instant::now() < deadline, "rebuild not done within 15 min");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The row.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let (small, large) = ctx.pick((10, 40), (1_000, 4_000));
    // A short lease: a rebuild waits one lease TTL before it starts and a renewal interval
    // before the swap, fixed waits that would otherwise dominate a small store.
    let cluster = ctx
        .start_cluster(vec![("ESQ_LEASE_TTL_MS".into(), "1500".into())])
        .await?;
    let result = async {
        let mut at = Vec::new();
        let mut bytes = 0;
        let mut from = 0;
        // A rebuild has fixed waits (leases, the swap) of several seconds: the smoke run does
        // the small store only, which runs every step once.
        let sizes: Vec<u64> = ctx.pick(vec![small], vec![small, large]);
        for carts in sizes {
            bytes +=
                append_cart_events(cluster.write_channel.clone(), from, carts, EVENTS, 16).await?;
            from = carts;
            at.push((
                carts * EVENTS,
                bytes,
                rebuild(ctx, &cluster, carts * EVENTS).await?,
            ));
        }
        anyhow::Ok(at)
    }
    .await;
    let cleanup = cluster.cleanup(ctx).await;
    let at = result?;
    cleanup?;
    let (small_events, small_bytes, s) = &at[0];
    let (large_events, large_bytes, l) = at.last().unwrap_or(&at[0]);
    let mib = |b: u64| b as f64 / 1024.0 / 1024.0;
    Ok(vec![Line {
        path: if at.len() > 1 {
            format!(
                "rebuild: projector peak RSS, {} vs {} events ({:.1} vs {:.1} MiB of payload)",
                thousands(*small_events),
                thousands(*large_events),
                mib(*small_bytes),
                mib(*large_bytes)
            )
        } else {
            format!(
                "rebuild: projector peak RSS, {} events (one size only)",
                thousands(*small_events)
            )
        },
        esq: format!("{:.1} → {:.1} MiB", s.peak_mib, l.peak_mib),
        baseline: String::new(),
        ratio: (s.peak_mib > 0.0 && at.len() > 1).then(|| l.peak_mib / s.peak_mib),
        target: "flat in store size".into(),
        latency: String::new(),
        cpu: format!("projector {:.2} · {:.2}", s.cores, l.cores),
        note: format!(
            "rebuild rate (the projector's own figure) {} · {}; ratio = peak after / before",
            rate(s.events_per_sec),
            rate(l.events_per_sec)
        ),
    }])
}
