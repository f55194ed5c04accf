//! Load generators: a closed loop (N workers, each issuing its next operation as soon as the
//! last answered) and an open loop (operations started at a fixed rate whatever the answers,
//! latency counted from the intended start so a stall is not hidden). Both return a [`Run`]:
//! rate, latency percentiles and the CPU each watched process used meanwhile.

use crate::sys::{Cpu, CpuUse, Watched};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The outcome of one measured interval.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Operations completed in the measured interval.
    pub ops: u64,
    /// Operations made in all, warm-up and the stragglers of the interval's end included (what
    /// the engines saw; [`crate::cqlops`] divides by it).
    pub calls: u64,
    /// Wall time of the measured interval, seconds.
    pub secs: f64,
    /// Operations per second.
    pub rate: f64,
    /// Median latency, ms (0 when not measured).
    pub p50_ms: f64,
    /// 99th percentile latency, ms (0 when not measured).
    pub p99_ms: f64,
    /// Cores used by each watched process over the interval.
    pub cpu: Vec<CpuUse>,
}

impl Run {
    /// A run measured by something else (a baseline tool's own report, a one-off timing).
    pub fn measured(ops: u64, secs: f64, p50_ms: f64, p99_ms: f64, cpu: Vec<CpuUse>) -> Self {
        Self {
            ops,
            calls: ops,
            secs,
            rate: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
            p50_ms,
            p99_ms,
            cpu,
        }
    }

    /// The field-by-field median of several rounds of the same side (rate, p50, p99 and each
    /// process's cores are medians of their own). Empty input gives an empty run.
    pub fn median(runs: &[Run]) -> Run {
        if runs.is_empty() {
            return Run::default();
        }
        let mut names: Vec<String> = Vec::new();
        for r in runs {
            for c in &r.cpu {
                if !names.contains(&c.name) {
                    names.push(c.name.clone());
                }
            }
        }
        Run {
            ops: median_of(runs.iter().map(|r| r.ops as f64)) as u64,
            calls: median_of(runs.iter().map(|r| r.calls as f64)) as u64,
            secs: median_of(runs.iter().map(|r| r.secs)),
            rate: median_of(runs.iter().map(|r| r.rate)),
            p50_ms: median_of(runs.iter().map(|r| r.p50_ms)),
            p99_ms: median_of(runs.iter().map(|r| r.p99_ms)),
            cpu: names
                .into_iter()
                .map(|name| CpuUse {
                    cores: median_of(
                        runs.iter()
                            .filter_map(|r| r.cpu.iter().find(|c| c.name == name))
                            .map(|c| c.cores),
                    ),
                    name,
                })
                .collect(),
        }
    }
}

/// The median of some figures (the mean of the middle two for an even count; 0 for none).
pub fn median_of(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Latency percentile `q` (0..=1) of sorted microsecond samples, in ms.
pub fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted_us[idx.min(sorted_us.len() - 1)]) / 1000.0
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The shape of a load: how many at once, for how long, after how much warm-up, and which
/// processes' CPU to sample over the measured part.
#[derive(Debug, Clone)]
pub struct Load {
    /// Concurrent workers (closed loop) or the largest number of operations in flight before
    /// the open loop reports overload.
    pub concurrency: usize,
    /// Measured interval.
    pub duration: Duration,
    /// Unmeasured interval before it (connections, caches, JIT of the JVM).
    pub warmup: Duration,
    /// Processes whose CPU is sampled over the measured interval.
    pub watch: Vec<Watched>,
}

impl Load {
    /// `concurrency` workers for `duration`, a warm-up of a fifth of it (at most 2 s), and
    /// nothing watched.
    pub fn new(concurrency: usize, duration: Duration) -> Self {
        Self {
            concurrency,
            duration,
            warmup: (duration / 5).min(Duration::from_secs(2)),
            watch: Vec::new(),
        }
    }

    /// The same load, sampling the CPU of `watch`.
    pub fn watch(mut self, watch: &[Watched]) -> Self {
        self.watch = watch.to_vec();
        self
    }

    /// The same load with another warm-up.
    pub fn warmup(mut self, warmup: Duration) -> Self {
        self.warmup = warmup;
        self
    }
}

/// Runs `op` in a closed loop: `load.concurrency` workers each call `op(i)` (i = a number
/// unique to the call, for choosing keys) and the next as soon as it returns, until the warm-up
/// and the measured interval are over. The first error ends the run with that error.
pub async fn closed_loop<F, Fut>(load: &Load, op: F) -> anyhow::Result<Run>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let until = measure_from + load.duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..load.concurrency.max(1) {
        let op = op.clone();
        let counter = counter.clone();
        workers.spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(4096);
            loop {
                let t0 = Instant::now();
                if t0 >= until {
                    break;
                }
                op(counter.fetch_add(1, Ordering::Relaxed)).await?;
                if t0 >= measure_from {
                    lat.push(micros(t0.elapsed()));
                }
            }
            anyhow::Ok(lat)
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu = Cpu::sample(&load.watch);
    let t_measure = Instant::now();
    let mut all: Vec<u32> = Vec::new();
    let mut cores = None;
    while let Some(done) = workers.join_next().await {
        if cores.is_none() {
            // The first worker to finish marks the end of the measured interval.
            cores = Some((cpu.cores(), t_measure.elapsed()));
        }
        all.extend(done??);
    }
    let (cpu, elapsed) = cores.unwrap_or_default();
    all.sort_unstable();
    let secs = elapsed.as_secs_f64().max(load.duration.as_secs_f64());
    Ok(Run {
        ops: all.len() as u64,
        calls: counter.load(Ordering::Relaxed),
        secs,
        rate: all.len() as f64 / secs,
        p50_ms: percentile_ms(&all, 0.50),
        p99_ms: percentile_ms(&all, 0.99),
        cpu,
    })
}

/// Runs `op` in an open loop at `rate` operations per second for the warm-up and the measured
/// interval. Each operation's latency is counted from the moment it was due (not from when it
/// could start), so queueing behind a stall shows in the percentiles. When more than
/// `load.concurrency` operations are in flight the run fails: the rate is above what the
/// system can take, and the figure would be meaningless.
pub async fn open_loop<F, Fut>(load: &Load, rate: f64, op: F) -> anyhow::Result<Run>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    anyhow::ensure!(rate > 0.0, "open loop needs a rate above 0");
    let op = Arc::new(op);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let until = measure_from + load.duration;
    let limit = Arc::new(tokio::sync::Semaphore::new(load.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut all: Vec<u32> = Vec::new();
    let mut cpu = None;
    let mut i = 0u64;
    loop {
        let due = start + interval.mul_f64(i as f64);
        if due >= until {
            break;
        }
        if cpu.is_none() && due >= measure_from {
            cpu = Some(Cpu::sample(&load.watch));
        }
        tokio::time::sleep_until(due.into()).await;
        let permit = limit.clone().try_acquire_owned().map_err(|_| {
            anyhow::anyhow!(
                "open loop at {rate:.0}/s: more than {} operations in flight",
                load.concurrency
            )
        })?;
        let op = op.clone();
        let measured = due >= measure_from;
        tasks.spawn(async move {
            op(i).await?;
            drop(permit);
            anyhow::Ok(measured.then(|| micros(due.elapsed())))
        });
        // Reap finished operations as we go, so errors surface early and memory stays small.
        while let Some(done) = tasks.try_join_next() {
            all.extend(done??);
        }
        i += 1;
    }
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    let cores = cpu.map(|c| c.cores()).unwrap_or_default();
    all.sort_unstable();
    let secs = load.duration.as_secs_f64();
    Ok(Run {
        ops: all.len() as u64,
        calls: i,
        secs,
        rate: all.len() as f64 / secs,
        p50_ms: percentile_ms(&all, 0.50),
        p99_ms: percentile_ms(&all, 0.99),
        cpu: cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median_of([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_of([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median_of([]), 0.0);
        let us: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&us, 0.5), 51.0);
        assert_eq!(percentile_ms(&us, 0.99), 99.0);
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
    }

    #[test]
    fn median_run_takes_each_field_alone() {
        let cpu = |x| {
            vec![CpuUse {
                name: "redis".into(),
                cores: x,
            }]
        };
        let runs = [
            Run::measured(100, 1.0, 1.0, 9.0, cpu(0.5)),
            Run::measured(300, 1.0, 3.0, 7.0, cpu(0.1)),
            Run::measured(200, 1.0, 2.0, 8.0, cpu(0.9)),
        ];
        let m = Run::median(&runs);
        assert_eq!(m.rate, 200.0);
        assert_eq!(m.p50_ms, 2.0);
        assert_eq!(m.p99_ms, 8.0);
        assert_eq!(m.cpu[0].cores, 0.5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_counts_every_call() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let load = Load::new(4, Duration::from_millis(200)).warmup(Duration::ZERO);
        let run = closed_loop(&load, move |_| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(())
            }
        })
        .await
        .expect("run");
        assert!(run.ops > 0);
        // Calls that started before the end are all counted (none is in flight afterwards).
        assert_eq!(run.ops, calls.load(Ordering::Relaxed));
        assert!(run.p50_ms >= 1.0, "{run:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_reports_the_first_error() {
        let load = Load::new(2, Duration::from_millis(100)).warmup(Duration::ZERO);
        let err = closed_loop(&load, |i| async move {
            anyhow::ensure!(i < 5, "op {i} failed");
            Ok(())
        })
        .await
        .expect_err("must fail");
        assert!(err.to_string().contains("failed"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_issues_the_rate_asked() {
        let load = Load::new(64, Duration::from_millis(500)).warmup(Duration::ZERO);
        let run = open_loop(&load, 200.0, |_| async { Ok(()) })
            .await
            .expect("run");
        // 200/s for 0.5 s is 100 operations, by schedule, not by timing (one more when the
        // last due time rounds just below the end).
        assert!((100..=101).contains(&run.ops), "{run:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_fails_when_overloaded() {
        let load = Load::new(2, Duration::from_millis(300)).warmup(Duration::ZERO);
        // Operations that never finish within the test: the third one finds no room.
        let err = open_loop(&load, 1000.0, |_| async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok(())
        })
        .await
        .expect_err("overload");
        assert!(err.to_string().contains("in flight"), "{err}");
    }
}
