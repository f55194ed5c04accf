//! GetCart driven by `ghz` (grpc-go's client) at c16 against the Rust client (tonic) at c16,
//! on the same read-svc and carts: a transport check. A Go client exposes what a Rust client
//! hides (Nagle's algorithm on the server's sockets, HTTP/2 window and flow-control settings),
//! so the two rates should be close. Runs alone with `scripts/bench --only ghz`.

use crate::ctx::{Cluster, Ctx};
use crate::load::Run;
use crate::report::Line;
use crate::rows::getcart::{carts, getcart_closed, seeded, CONCURRENCY};
use crate::sys::{Cpu, Watched};
use anyhow::Context as _;
use std::time::Instant;

/// The ghz release the scripts install (`go install github.com/bojand/ghz/cmd/ghz@…`).
pub const GHZ_VERSION: &str = "v0.121.0";

/// One ghz run of GetCart at `concurrency` for the context's duration over one connection,
/// after an unmeasured warm-up run; CPU of ghz, read-svc and Redis sampled meanwhile.
pub async fn ghz_getcart(ctx: &Ctx, cluster: &Cluster, concurrency: usize) -> anyhow::Result<Run> {
    let warmup = ctx.load(concurrency).warmup;
    if !warmup.is_zero() {
        // Its figures (and a too-short warm-up's lack of any) do not count.
        let _ = ghz_once(ctx, cluster, concurrency, warmup).await;
    }
    ghz_once(ctx, cluster, concurrency, ctx.duration()).await
}

async fn ghz_once(
    ctx: &Ctx,
    cluster: &Cluster,
    concurrency: usize,
    duration: std::time::Duration,
) -> anyhow::Result<Run> {
    let n = carts(ctx);
    // ghz parses the JSON first, then runs each string through Go's text/template: no double
    // quotes inside the template (backquotes are Go's raw strings).
    let data = format!("{{\"cart_id\":\"bench-{{{{printf `%012d` (randomInt 0 {n})}}}}\"}}");
    let secs = duration.as_secs_f64();
    let mut cmd = tokio::process::Command::new("ghz");
    cmd.arg("--insecure")
        .args(["--call", "esq.cart.v1.CartQueries.GetCart"])
        .args(["-d", &data])
        .args(["-c", &concurrency.to_string()])
        .args(["--connections", "1"])
        .args(["-z", &format!("{}ms", duration.as_millis())])
        .args(["-O", "json"])
        .arg(cluster.read.addr.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!("cannot run ghz (go install github.com/bojand/ghz/cmd/ghz@{GHZ_VERSION})")
    })?;
    let mut watch = cluster.watch_only(&["read-svc", "redis"]);
    watch.extend(child.id().map(|pid| Watched::new("ghz", pid)));
    let sample = Cpu::sample(&watch);
    let started = Instant::now();
    let mut stdout = Vec::new();
    if let Some(mut pipe) = child.stdout.take() {
        tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut stdout).await?;
    }
    // Sampled before reaping: an exited, unreaped process still shows its CPU times.
    let cores = sample.cores();
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "ghz failed: {}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = parse_ghz_json(&String::from_utf8_lossy(&stdout))?;
    run.cpu = cores;
    if run.secs == 0.0 {
        run.secs = started.elapsed().as_secs_f64().min(secs);
    }
    Ok(run)
}

/// Reads ghz's `-O json` report: rate, p50/p99 (ns in the report) and every call's status
/// (any status but OK fails the run: a rate of errors measures nothing).
pub fn parse_ghz_json(text: &str) -> anyhow::Result<Run> {
    let v: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("ghz report is not JSON: {text}"))?;
    let count = v.get("count").and_then(|c| c.as_u64()).unwrap_or(0);
    // When the duration is up, ghz closes its connection under the calls in flight (at most
    // one per worker) and reports them as errors: those are not failures of the server.
    let mut cut = 0;
    let mut bad = Vec::new();
    if let Some(errors) = v.get("errorDistribution").and_then(|e| e.as_object()) {
        for (message, n) in errors {
            let n = n.as_u64().unwrap_or(0);
            if message.contains("closed network connection")
                || message.contains("connection is closing")
            {
                cut += n;
            } else {
                bad.push(format!("{message}: {n}"));
            }
        }
    }
    anyhow::ensure!(bad.is_empty(), "ghz calls failed: {}", bad.join("; "));
    let ops = count.saturating_sub(cut);
    anyhow::ensure!(
        ops > 0,
        "ghz made no successful call: {}",
        text.chars().take(600).collect::<String>()
    );
    let secs = v
        .get("total")
        .and_then(|t| t.as_f64())
        .map_or(0.0, |ns| ns / 1e9);
    let rate = if secs > 0.0 {
        ops as f64 / secs
    } else {
        v.get("rps")
            .and_then(|r| r.as_f64())
            .context("no rps in the ghz report")?
    };
    let pct = |p: u64| {
        v.get("latencyDistribution")
            .and_then(|d| d.as_array())
            .and_then(|d| {
                d.iter()
                    .find(|e| e.get("percentage").and_then(|x| x.as_u64()) == Some(p))
            })
            .and_then(|e| e.get("latency"))
            .and_then(|l| l.as_f64())
            .map_or(0.0, |ns| ns / 1e6)
    };
    Ok(Run {
        ops,
        calls: ops,
        secs,
        rate,
        p50_ms: pct(50),
        p99_ms: pct(99),
        cpu: Vec::new(),
    })
}

/// The row.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let cluster = seeded(ctx).await?;
    let mut rust_watch = cluster.watch_only(&["read-svc", "redis"]);
    rust_watch.push(Watched::me());
    let load = ctx.load(CONCURRENCY).watch(&rust_watch);
    let mut go = Vec::new();
    let mut rust = Vec::new();
    for _ in 0..ctx.rounds() {
        go.push(ghz_getcart(ctx, cluster, CONCURRENCY).await?);
        rust.push(getcart_closed(ctx, cluster, &load).await?);
    }
    Ok(vec![Line::rates(
        format!("GetCart driven by ghz (Go gRPC client) c{CONCURRENCY}"),
        "≥ 0.9",
        &Run::median(&go),
        &format!("Rust client (tonic) c{CONCURRENCY}, same carts"),
        &Run::median(&rust),
    )
    .note("one HTTP/2 connection each; ratio = ghz / Rust client")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_ghz_report() {
        let text = r#"{"count":2000,"total":1000000000,"rps":1999.5,
            "latencyDistribution":[{"percentage":50,"latency":800000},{"percentage":99,"latency":4100000}],
            "statusCodeDistribution":{"OK":2000},"errorDistribution":{}}"#;
        let run = parse_ghz_json(text).expect("parse");
        assert_eq!(run.rate, 2000.0);
        assert_eq!(run.ops, 2000);
        assert_eq!(run.p50_ms, 0.8);
        assert_eq!(run.p99_ms, 4.1);
    }

    #[test]
    fn failed_calls_fail_the_run() {
        let text = r#"{"count":10,"rps":10.0,"statusCodeDistribution":{"OK":5,"NotFound":5},
            "errorDistribution":{"rpc error: code = NotFound":5}}"#;
        let err = parse_ghz_json(text).expect_err("errors");
        assert!(err.to_string().contains("NotFound"), "{err}");
    }

    #[test]
    fn calls_cut_at_the_end_are_not_failures() {
        let text = r#"{"count":110,"total":1000000000,"rps":110.0,
            "statusCodeDistribution":{"OK":100,"Unavailable":10},
            "errorDistribution":{"rpc error: code = Unavailable desc = error reading from server: read tcp: use of closed network connection":10}}"#;
        let run = parse_ghz_json(text).expect("parse");
        assert_eq!(run.ops, 100);
        assert_eq!(run.rate, 100.0);
    }

    #[test]
    fn no_successful_call_fails_the_run() {
        let text = r#"{"count":0,"total":1000000000,"rps":0}"#;
        let err = parse_ghz_json(text).expect_err("no call");
        assert!(err.to_string().contains("no successful call"), "{err}");
    }
}
