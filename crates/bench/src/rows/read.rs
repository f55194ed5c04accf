//! The read part's rows (issue 9):
//! - [`lag`]: append → visible through the fast path at 50 appends/s: an open loop of AddItem
//!   then GetCart with `min_version` = the appended version (the call returns once the
//!   projector's apply is visible in Redis), p50/p99 from the moment the append was due;
//!   baseline: the same appends alone, so the difference is what visibility costs; and, for
//!   reference, the raw driver's change-log notification + conditional batch at the same
//!   rate (what the engine alone takes to commit an append: the floor of both), and the same
//!   after the two reads a command makes before it decides (the floor of an AddItem).
//! - [`waiters`]: 500 concurrent `min_version` waiters that are never satisfied (each call
//!   runs to read-svc's maximum wait and is issued again): the Redis commands per second they
//!   cause, from `INFO stats` (`total_commands_processed`) over a window with the waiters
//!   minus an idle window of the same stack, interleaved.

use crate::ctx::Ctx;
use crate::load::{open_loop, Run};
use crate::report::{cpu, percentiles, Line};
use crate::sys::Watched;
use esq::pb::cart::v1::cart_queries_client::CartQueriesClient;
use esq::pb::cart::v1::{AddItemRequest, GetCartRequest};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Appends per second of the lag row.
const LAG_RATE: f64 = 50.0;

/// `total_commands_processed` of the Redis the stack uses.
async fn redis_commands(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no total_commands_processed in INFO stats"))
}

/// Append → visible.
pub mod lag {
    use super::*;

    /// The rows.
    pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
        let cluster = ctx.cluster().await?;
        let watch: Vec<Watched> = cluster
            .watch_only(&["write-svc", "projector", "read-svc", "redis", "cassandra"])
            .into_iter()
            .chain([Watched::me()])
            .collect();
        let load = ctx.load(256).watch(&watch);
        // Each op appends to its own cart (a few hundred carts in a full run).
        let carts = ctx.pick(20u64, 400);
        let round = Arc::new(AtomicU64::new(0));
        let raw = Arc::new(crate::rows::append::Raw::prepare(ctx, &cluster.keyspace).await?);
        let salt = crate::rows::append::now_us() as u64;
        let mut visible = Vec::new();
        let mut acked = Vec::new();
        let (mut engine, mut command) = (Vec::new(), Vec::new());
        for n in 0..ctx.rounds() {
            let salt = salt + n as u64;
            let side = crate::rows::append::raw_open_loop(&raw, &load, LAG_RATE, salt, false);
            engine.push(side.await?);
            let side = crate::rows::append::raw_open_loop(&raw, &load, LAG_RATE, salt, true);
            command.push(side.await?);
            for see in [true, false] {
                let r = round.fetch_add(1, Ordering::Relaxed);
                let commands = cluster.carts();
                let queries = cluster.cart_queries();
                let run = open_loop(&load, LAG_RATE, move |i| {
                    let commands = commands.clone();
                    let mut queries = queries.clone();
                    async move {
                        let cart_id = format!("lag-{r}-{}", i % carts);
                        // Retried with its command id when refused (UNAVAILABLE on a loaded
                        // machine), as a client would; the retry's time counts.
                        let add = AddItemRequest {
                            cart_id: cart_id.clone(),
                            sku: "sku-lag".into(),
                            quantity: 1,
                            unit_price_cents: 100,
                            expected_version: None,
                            command_id: uuid::Uuid::new_v4().to_string(),
                        };
                        let version = crate::rows::fixtures::retrying(|| {
                            let mut commands = commands.clone();
                            let add = add.clone();
                            async move { commands.add_item(add).await }
                        })
                        .await?
                        .into_inner()
                        .version;
                        // A wait past read-svc's maximum (a stalled projector on a busy
                        // machine) is asked again: its whole time counts as lag.
                        if see {
                            loop {
                                let asked = queries
                                    .get_cart(GetCartRequest {
                                        cart_id: cart_id.clone(),
                                        min_version: version,
                                    })
                                    .await;
                                match asked {
                                    Err(s) if s.code() == tonic::Code::DeadlineExceeded => continue,
                                    asked => {
                                        let cart = asked?.into_inner();
                                        anyhow::ensure!(
                                            cart.version >= version,
                                            "read below min_version"
                                        );
                                        break;
                                    }
                                }
                            }
                        }
                        Ok(())
                    }
                })
                .await?;
                if see {
                    visible.push(run);
                } else {
                    acked.push(run);
                }
            }
        }
        let v = Run::median(&visible);
        let a = Run::median(&acked);
        let e = Run::median(&engine);
        let c = Run::median(&command);
        Ok(vec![
            Line {
                path: format!("append → visible, fast path, {LAG_RATE}/s"),
                esq: format!(
                    "p50 {} · p99 {}",
                    crate::report::ms(v.p50_ms),
                    crate::report::ms(v.p99_ms)
                ),
                baseline: format!(
                    "the append alone (ack): p50 {} · p99 {}",
                    crate::report::ms(a.p50_ms),
                    crate::report::ms(a.p99_ms)
                ),
                ratio: None,
                target: "p50 ≤ 5, p99 ≤ 25 ms".into(),
                latency: format!("{} · base {}", percentiles(&v), percentiles(&a)),
                cpu: format!("{} · base {}", cpu(&v.cpu), cpu(&a.cpu)),
                note: "AddItem, then GetCart min_version (woken by the apply notification)".into(),
            },
            Line {
                path: "same, the engine alone".into(),
                esq: format!(
                    "the append alone (ack): p50 {} · p99 {}",
                    crate::report::ms(a.p50_ms),
                    crate::report::ms(a.p99_ms)
                ),
                baseline: format!(
                    "raw driver, notification + LWT batch: p50 {} · p99 {}",
                    crate::report::ms(e.p50_ms),
                    crate::report::ms(e.p99_ms)
                ),
                ratio: None,
                target: "(reference)".into(),
                latency: format!("{} · base {}", percentiles(&a), percentiles(&e)),
                cpu: format!("{} · base {}", cpu(&a.cpu), cpu(&e.cpu)),
                note: format!(
                    "the storage work of an append alone, at {LAG_RATE}/s, open loop: a visible \
                     append waits for at least this"
                ),
            },
            Line {
                path: "same, a command's storage work".into(),
                esq: format!(
                    "the append alone (ack): p50 {} · p99 {}",
                    crate::report::ms(a.p50_ms),
                    crate::report::ms(a.p99_ms)
                ),
                baseline: format!(
                    "raw driver, read (snapshot + first 32 events) + notification + LWT batch: \
                     p50 {} · p99 {}",
                    crate::report::ms(c.p50_ms),
                    crate::report::ms(c.p99_ms)
                ),
                ratio: None,
                target: "(reference)".into(),
                latency: format!("{} · base {}", percentiles(&a), percentiles(&c)),
                cpu: format!("{} · base {}", cpu(&a.cpu), cpu(&c.cpu)),
                note: format!(
                    "AddItem decides on the cart's state: it reads it before it writes (write-svc's \
                     load on a short stream, two concurrent SELECTs), at {LAG_RATE}/s, open loop; \
                     a visible AddItem waits for at least this"
                ),
            },
        ])
    }
}

/// Many waiting readers.
pub mod waiters {
    use super::*;

    /// Keeps `n` GetCart calls waiting for a version their carts never reach, over `channels`
    /// connections (read-svc takes 100 concurrent calls per connection), until `stop`.
    fn spawn_waiters(
        clients: &[CartQueriesClient<tonic::transport::Channel>],
        n: usize,
        stop: &CancellationToken,
        failures: &Arc<AtomicU64>,
    ) -> tokio::task::JoinSet<()> {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let mut client = clients[i % clients.len()].clone();
            let stop = stop.clone();
            let failures = Arc::clone(failures);
            set.spawn(async move {
                while !stop.is_cancelled() {
                    let call = client.get_cart(GetCartRequest {
                        cart_id: format!("waiter-{i}"),
                        min_version: 1_000_000,
                    });
                    tokio::select! {
                        () = stop.cancelled() => return,
                        result = call => match result {
                            Err(s) if s.code() == tonic::Code::DeadlineExceeded => {}
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        },
                    }
                }
            });
        }
        set
    }

    /// The rows.
    pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
        let cluster = ctx.cluster().await?;
        let n: usize = ctx.pick(50, 500);
        let mut clients = Vec::new();
        for _ in 0..n.div_ceil(100) + 1 {
            clients.push(CartQueriesClient::new(
                crate::ctx::channel(cluster.read.addr).await?,
            ));
        }
        let mut conn = ctx.redis().await?;
        let window = ctx.pick(Duration::from_secs(1), Duration::from_secs(6));
        let failures = Arc::new(AtomicU64::new(0));
        let mut with = Vec::new();
        let mut idle = Vec::new();
        let read_svc = cluster.watch_only(&["read-svc", "redis"]);
        let mut cpu_with = Vec::new();
        for _ in 0..ctx.rounds() {
            // Idle: the stack alone (projector leases and heartbeats, the INFO calls).
            let c0 = redis_commands(&mut conn).await?;
            let t0 = Instant::now();
            tokio::time::sleep(window).await;
            let c1 = redis_commands(&mut conn).await?;
            idle.push((c1 - c0) as f64 / t0.elapsed().as_secs_f64());

            let stop = CancellationToken::new();
            let mut set = spawn_waiters(&clients, n, &stop, &failures);
            // Let every waiter start and settle past its first reads.
            tokio::time::sleep(ctx.pick(Duration::from_millis(500), Duration::from_secs(2))).await;
            let sample = crate::sys::Cpu::sample(&read_svc);
            let c0 = redis_commands(&mut conn).await?;
            let t0 = Instant::now();
            tokio::time::sleep(window).await;
            let c1 = redis_commands(&mut conn).await?;
            with.push((c1 - c0) as f64 / t0.elapsed().as_secs_f64());
            cpu_with.push(Run {
                cpu: sample.cores(),
                ..Run::measured(0, window.as_secs_f64(), 0.0, 0.0, Vec::new())
            });
            stop.cancel();
            while set.join_next().await.is_some() {}
        }
        let w = crate::load::median_of(with.iter().copied());
        let i = crate::load::median_of(idle.iter().copied());
        let extra = (w - i).max(0.0);
        let failed = failures.load(Ordering::Relaxed);
        Ok(vec![Line {
            path: format!("{n} concurrent min_version waiters"),
            esq: format!(
                "{} Redis commands/s",
                crate::report::thousands(extra.round() as u64)
            ),
            baseline: format!(
                "stack idle: {} commands/s (with waiters: {}/s)",
                crate::report::thousands(i.round() as u64),
                crate::report::thousands(w.round() as u64)
            ),
            ratio: None,
            target: "≤ 1,000 Redis commands/s".into(),
            latency: String::new(),
            cpu: cpu(&Run::median(&cpu_with).cpu),
            note: format!(
                "INFO stats delta, waiters minus idle; {failed} calls ended otherwise than \
                 DEADLINE_EXCEEDED"
            ),
        }])
    }
}
