//! AddItem on a long cart (2,000 events) vs the same command on a 10-event cart, one call at a
//! time, through write-svc: on the cluster stack (CQL), on a stack with snapshots off
//! (`ESQ_SNAPSHOT_EVERY=0`, the cost without them, same run; full size only), and on `esq dev`
//! (embedded).
//!
//! The long cart is seeded by raw appends of 500 events; every short cart gets 10 events in
//! one append, and each short-side call goes to a cart of its own, so that side stays at 10
//! events. Rounds interleave the two sides. The ratio is the long side's median latency over
//! the short side's (target ≤ 1.5×: command cost flat in stream length).

use crate::ctx::Ctx;
use crate::load::{percentile_ms, Run};
use crate::report::{cpu, ms, percentiles, Line};
use crate::rows::fixtures::retrying;
use crate::sys::{Cpu, Watched};
use esq::pb::cart::v1::{cart_commands_client::CartCommandsClient, AddItemRequest};
use esq::pb::v1 as pb;
use futures::StreamExt as _;
use std::time::Instant;
use tonic::transport::Channel;

/// Events per raw seeding append (the API's maximum is 500).
const SEED_CHUNK: u64 = 500;
/// Events of each short cart.
const SHORT: u64 = 10;

/// The rows.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let long = ctx.pick(150, 2_000);
    let mut lines = Vec::new();

    let cluster = ctx.cluster().await?;
    let watch = cluster.watch_only(&["write-svc", "cassandra"]);
    lines.push(
        compare(ctx, "CQL", cluster.write_channel.clone(), &watch, long)
            .await?
            .note("cluster stack, snapshots on (default --snapshot-every)"),
    );

    // The cost without snapshots, in the same run: a stack of its own (full size only — the
    // smoke run keeps to the shared stack; the path is the same `compare`).
    if ctx.pick(false, true) {
        let off = ctx
            .start_cluster(vec![("ESQ_SNAPSHOT_EVERY".into(), "0".into())])
            .await?;
        let watch = off.watch_only(&["write-svc", "cassandra"]);
        let label = "CQL, snapshots off";
        let line = compare(ctx, label, off.write_channel.clone(), &watch, long).await;
        off.cleanup(ctx).await?;
        lines.push(
            line?.note("the same with ESQ_SNAPSHOT_EVERY=0: every command folds the whole stream"),
        );
    }

    let dev = ctx.dev().await?;
    let watch = vec![dev.watched()];
    lines.push(
        compare(ctx, "embedded", dev.write_channel.clone(), &watch, long)
            .await?
            .note("esq dev, snapshots on"),
    );
    Ok(lines)
}

/// Seeds a cart of `long` events and enough 10-event carts, then runs interleaved rounds of
/// AddItem calls on each side.
async fn compare(
    ctx: &Ctx,
    label: &str,
    write: Channel,
    watch: &[Watched],
    long: u64,
) -> anyhow::Result<Line> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let per_round = ctx.pick(5, 100);
    let rounds = ctx.rounds();
    let long_cart = format!("snap-long-{}", &tag[..12]);
    seed(&write, &long_cart, long).await?;
    let shorts = (per_round * rounds) as u64;
    let short_cart = |n: u64| format!("snap-short-{}-{n}", &tag[..12]);
    let seeded = futures::stream::iter(0..shorts)
        .map(|n| {
            let write = write.clone();
            let id = short_cart(n);
            async move { seed(&write, &id, SHORT).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    seeded.into_iter().collect::<anyhow::Result<()>>()?;

    let mut commands = CartCommandsClient::new(write);
    // Warm-up: the first loads after seeding write the long cart's snapshot in the background.
    for _ in 0..5 {
        add(&mut commands, &long_cart).await?;
    }
    let (mut long_runs, mut short_runs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let cpu = Cpu::sample(watch);
        let started = Instant::now();
        let mut lat = Vec::with_capacity(per_round);
        for _ in 0..per_round {
            let t0 = Instant::now();
            add(&mut commands, &long_cart).await?;
            lat.push(t0.elapsed());
        }
        long_runs.push(run_of(lat, started, cpu.cores()));

        let cpu = Cpu::sample(watch);
        let started = Instant::now();
        let mut lat = Vec::with_capacity(per_round);
        for i in 0..per_round {
            let t0 = Instant::now();
            add(&mut commands, &short_cart((round * per_round + i) as u64)).await?;
            lat.push(t0.elapsed());
        }
        short_runs.push(run_of(lat, started, cpu.cores()));
    }
    let l = Run::median(&long_runs);
    let s = Run::median(&short_runs);
    Ok(Line {
        path: format!(
            "AddItem on a {}-event cart vs a {SHORT}-event cart ({label})",
            crate::report::thousands(long)
        ),
        esq: format!("p50 {}", ms(l.p50_ms)),
        baseline: format!("same command on a {SHORT}-event cart: p50 {}", ms(s.p50_ms)),
        ratio: (s.p50_ms > 0.0).then(|| l.p50_ms / s.p50_ms),
        target: "≤ 1.5×".into(),
        latency: format!("{} · base {}", percentiles(&l), percentiles(&s)),
        cpu: format!("{} · base {}", cpu(&l.cpu), cpu(&s.cpu)),
        note: String::new(),
    })
}

/// A run of sequential calls: their latencies, rate over the wall time.
fn run_of(
    mut lat: Vec<std::time::Duration>,
    started: Instant,
    cpu: Vec<crate::sys::CpuUse>,
) -> Run {
    let secs = started.elapsed().as_secs_f64();
    let mut us: Vec<u32> = lat
        .drain(..)
        .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
        .collect();
    us.sort_unstable();
    Run::measured(
        us.len() as u64,
        secs,
        percentile_ms(&us, 0.50),
        percentile_ms(&us, 0.99),
        cpu,
    )
}

async fn add(commands: &mut CartCommandsClient<Channel>, cart: &str) -> anyhow::Result<()> {
    // Retried with its command id when a loaded store refuses it (UNAVAILABLE); the retry's
    // time counts.
    let add = AddItemRequest {
        cart_id: cart.to_owned(),
        sku: "sku-1".into(),
        quantity: 1,
        unit_price_cents: 100,
        expected_version: None,
        command_id: uuid::Uuid::new_v4().to_string(),
    };
    retrying(|| {
        let mut commands = commands.clone();
        let add = add.clone();
        async move { commands.add_item(add).await }
    })
    .await?;
    Ok(())
}

/// Appends `n` ItemAdded events to cart `id` raw, [`SEED_CHUNK`] per append.
async fn seed(write: &Channel, id: &str, n: u64) -> anyhow::Result<()> {
    let client = pb::event_store_client::EventStoreClient::new(write.clone());
    let mut done = 0;
    while done < n {
        let chunk = SEED_CHUNK.min(n - done);
        let events = (0..chunk)
            .map(|i| pb::NewEvent {
                event_id: uuid::Uuid::new_v4().to_string(),
                r#type: "ItemAdded".into(),
                schema_version: 2,
                content_type: String::new(),
                payload: Some(pb::new_event::Payload::Json(format!(
                    "{{\"sku\":\"sku-{}\",\"quantity\":1,\"unit_price_cents\":100}}",
                    (done + i) % 7
                ))),
                metadata: Default::default(),
            })
            .collect();
        let request = pb::AppendRequest {
            stream: Some(pb::StreamRef {
                r#type: "cart".into(),
                id: id.to_owned(),
            }),
            expected_version: Some(pb::ExpectedVersion {
                kind: Some(pb::expected_version::Kind::Exact(done)),
            }),
            events,
        };
        // Retried with the same event ids when refused (UNAVAILABLE): a repeat is answered
        // with the original versions.
        retrying(|| {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.append(request).await }
        })
        .await?;
        done += chunk;
    }
    Ok(())
}
