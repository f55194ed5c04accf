//! GetCart through read-svc against Redis itself, on the same hashes:
//! - closed loop at c16 (the Rust gRPC client) vs `redis-benchmark` HGETALL at c16 over the
//!   same keys (`-r` over the seeded carts);
//! - open loop at half of esq's measured peak: GetCart p99 vs raw HGETALL p99 (the redis
//!   crate, one multiplexed connection) at the same offered rate.

use crate::ctx::{Cluster, Ctx};
use crate::load::{closed_loop, open_loop, Load, Run};
use crate::report::{cpu, percentiles, Line};
use crate::rows::fixtures::{cart_id, seed_carts, CartKeys};
use crate::sys::{Cpu, Watched};
use anyhow::Context as _;
use esq::pb::cart::v1::GetCartRequest;
use std::time::Instant;

/// Concurrency of the closed-loop comparison.
pub const CONCURRENCY: usize = 16;

/// How many carts the read rows spread their reads over.
pub fn carts(ctx: &Ctx) -> u64 {
    ctx.pick(20, 1_000)
}

/// A cart number for call `i`: spread over `n` carts (a multiplicative hash, not a scan).
pub fn spread(i: u64, n: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % n
}

/// The shared stack with the read rows' carts seeded.
pub async fn seeded(ctx: &Ctx) -> anyhow::Result<&Cluster> {
    let cluster = ctx.cluster().await?;
    seed_carts(cluster.carts(), cluster.cart_queries(), carts(ctx)).await?;
    Ok(cluster)
}

/// GetCart from the Rust client (tonic, one channel) in a closed loop.
pub async fn getcart_closed(ctx: &Ctx, cluster: &Cluster, load: &Load) -> anyhow::Result<Run> {
    let n = carts(ctx);
    let client = cluster.cart_queries();
    closed_loop(load, move |i| {
        let mut client = client.clone();
        async move {
            client
                .get_cart(GetCartRequest {
                    cart_id: cart_id(spread(i, n)),
                    min_version: 0,
                })
                .await?;
            Ok(())
        }
    })
    .await
}

/// `redis-benchmark` HGETALL over the seeded carts' hashes: `requests` requests at
/// `concurrency`, its CPU and Redis's sampled meanwhile.
pub async fn redis_benchmark_hgetall(
    ctx: &Ctx,
    keys: &CartKeys,
    concurrency: usize,
    requests: u64,
) -> anyhow::Result<Run> {
    let (host, port) = ctx.backends().redis_host_port()?;
    let mut cmd = tokio::process::Command::new("redis-benchmark");
    cmd.args(["-h", &host, "-p", &port.to_string()])
        .args(["-c", &concurrency.to_string()])
        .args(["-n", &requests.to_string()])
        .args(["-r", &carts(ctx).to_string()])
        .args(["-q", "--csv", "HGETALL"])
        .arg(keys.rand_pattern())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .context("cannot run redis-benchmark (scripts/redis.sh install provides it)")?;
    let mut watch: Vec<Watched> = ctx.redis_proc().into_iter().collect();
    watch.extend(child.id().map(|pid| Watched::new("redis-benchmark", pid)));
    let sample = Cpu::sample(&watch);
    let started = Instant::now();
    // Read its report to the end (it closes stdout as it exits), then sample CPU before
    // reaping it: an exited but unreaped process still shows its CPU times in /proc.
    let mut stdout = Vec::new();
    if let Some(mut pipe) = child.stdout.take() {
        tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut stdout).await?;
    }
    let cores = sample.cores();
    let secs = started.elapsed().as_secs_f64();
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&stdout);
    let mut run = parse_redis_benchmark_csv(&text)?;
    run.cpu = cores;
    if run.secs == 0.0 {
        run.secs = secs;
    }
    Ok(run)
}

/// Reads `redis-benchmark --csv` output (Redis 7: "test","rps","avg_latency_ms",
/// "min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms").
pub fn parse_redis_benchmark_csv(text: &str) -> anyhow::Result<Run> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().context("redis-benchmark printed nothing")?;
    let data = lines.next().context("redis-benchmark printed no result")?;
    let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
    let cols: Vec<String> = header.split(',').map(unquote).collect();
    // The test name (the command line) may contain commas: the figures are the last columns.
    let fields: Vec<String> = data.split(',').map(unquote).collect();
    let figure = |name: &str| -> anyhow::Result<f64> {
        let from_end = cols.len()
            - cols
                .iter()
                .position(|c| c == name)
                .with_context(|| format!("no {name} column in {header:?}"))?;
        let v = fields
            .get(fields.len().checked_sub(from_end).context("short line")?)
            .context("short line")?;
        v.parse()
            .with_context(|| format!("unreadable {name} {v:?} in {data:?}"))
    };
    let rps = figure("rps")?;
    let p50 = figure("p50_latency_ms").unwrap_or(0.0);
    let p99 = figure("p99_latency_ms").unwrap_or(0.0);
    Ok(Run {
        ops: 0,
        calls: 0,
        secs: 0.0,
        rate: rps,
        p50_ms: p50,
        p99_ms: p99,
        cpu: Vec::new(),
    })
}

/// Raw HGETALL of the same hashes from the redis crate (one multiplexed connection).
async fn hgetall_open(ctx: &Ctx, keys: &CartKeys, load: &Load, rate: f64) -> anyhow::Result<Run> {
    let conn = ctx.redis().await?;
    let n = carts(ctx);
    let keys = keys.clone();
    open_loop(load, rate, move |i| {
        let mut conn = conn.clone();
        let key = keys.key(spread(i, n));
        async move {
            let doc: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut conn)
                .await?;
            anyhow::ensure!(!doc.is_empty(), "seeded cart hash missing");
            Ok(())
        }
    })
    .await
}

/// The rows.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let cluster = seeded(ctx).await?;
    let keys = CartKeys::find(&mut ctx.redis().await?, &cluster.prefix).await?;
    let esq_watch = cluster.watch_only(&["read-svc", "redis"]);
    let mut esq_watch = esq_watch;
    esq_watch.push(Watched::me());
    let load = ctx.load(CONCURRENCY).watch(&esq_watch);
    let mut esq = Vec::new();
    let mut base = Vec::new();
    // redis-benchmark runs a request count, not a time: size it from the previous round so
    // both sides run about as long.
    let mut requests = ctx.pick(2_000, 100_000);
    for _ in 0..ctx.rounds() {
        esq.push(getcart_closed(ctx, cluster, &load).await?);
        let b = redis_benchmark_hgetall(ctx, &keys, CONCURRENCY, requests).await?;
        requests = ((b.rate * ctx.duration().as_secs_f64()) as u64).max(1_000);
        base.push(b);
    }
    let esq_c16 = Run::median(&esq);
    let base_c16 = Run::median(&base);
    let closed = Line::rates(
        format!("GetCart c{CONCURRENCY}"),
        "≥ 0.6",
        &esq_c16,
        &format!("redis-benchmark HGETALL c{CONCURRENCY}"),
        &base_c16,
    );

    // Open loop at half of esq's peak; the raw client at the same offered rate.
    let rate = (esq_c16.rate / 2.0).max(10.0);
    let open_load = ctx.load(4_096).watch(&esq_watch);
    let raw_watch: Vec<Watched> = ctx
        .redis_proc()
        .into_iter()
        .chain([Watched::me()])
        .collect();
    let raw_load = ctx.load(4_096).watch(&raw_watch);
    let mut esq_open = Vec::new();
    let mut raw_open = Vec::new();
    let n = carts(ctx);
    for _ in 0..ctx.rounds() {
        let client = cluster.cart_queries();
        esq_open.push(
            open_loop(&open_load, rate, move |i| {
                let mut client = client.clone();
                async move {
                    client
                        .get_cart(GetCartRequest {
                            cart_id: cart_id(spread(i, n)),
                            min_version: 0,
                        })
                        .await?;
                    Ok(())
                }
            })
            .await?,
        );
        raw_open.push(hgetall_open(ctx, &keys, &raw_load, rate).await?);
    }
    let e = Run::median(&esq_open);
    let r = Run::median(&raw_open);
    let open = Line {
        path: format!("GetCart at half of peak, open loop ({}/s)", rate.round()),
        esq: format!("p99 {}", crate::report::ms(e.p99_ms)),
        baseline: format!(
            "raw HGETALL (redis crate) at the same rate: p99 {}",
            crate::report::ms(r.p99_ms)
        ),
        ratio: (r.p99_ms > 0.0).then(|| e.p99_ms / r.p99_ms),
        target: "p99 ≤ 2 ms".into(),
        latency: format!("{} · base {}", percentiles(&e), percentiles(&r)),
        cpu: format!("{} · base {}", cpu(&e.cpu), cpu(&r.cpu)),
        note: "ratio = esq p99 / raw p99".into(),
    };
    Ok(vec![closed, open])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redis_benchmark_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"HGETALL p:cart2:{bench-__rand_int__}\",\"41580.00\",\"0.350\",\"0.080\",\"0.319\",\"0.551\",\"0.719\",\"2.135\"\n";
        let run = parse_redis_benchmark_csv(text).expect("parse");
        assert_eq!(run.rate, 41580.0);
        assert_eq!(run.p50_ms, 0.319);
        assert_eq!(run.p99_ms, 0.719);
    }

    #[test]
    fn spread_stays_in_range_and_spreads() {
        let seen: std::collections::HashSet<u64> = (0..1000).map(|i| spread(i, 20)).collect();
        assert!(seen.iter().all(|c| *c < 20));
        assert!(seen.len() > 15, "{seen:?}");
    }
}
