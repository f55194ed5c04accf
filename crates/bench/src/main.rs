//! `esq-bench`: runs the benchmark rows and writes the report. See the crate docs
//! (`crates/bench/src/lib.rs`) and `scripts/bench`, which builds, starts the backends and
//! calls this.

use clap::Parser;
use esq_bench::ctx::{Backends, Ctx, Size};
use esq_bench::report::{self, Outcome, RunFacts};
use esq_bench::rows;
use std::path::PathBuf;

/// Runs esq's benchmark rows against raw engines and writes a markdown table.
#[derive(Parser, Debug)]
#[command(name = "esq-bench")]
struct Args {
    /// `smoke` (tiny, proves every row runs) or `full` (the figures of BENCHMARKS.md).
    #[arg(long, value_enum, default_value = "smoke")]
    size: Size,
    /// Rounds per row (each round runs esq's side then the baseline); default 1 for smoke,
    /// 3 for full.
    #[arg(long)]
    rounds: Option<usize>,
    /// Run only these row groups (comma separated; see --list).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// List the row groups and exit.
    #[arg(long)]
    list: bool,
    /// Cassandra's CQL address (host:port).
    #[arg(long, env = "ESQ_BENCH_CASSANDRA")]
    cassandra: Option<String>,
    /// Redis URL (redis://host:port).
    #[arg(long, env = "ESQ_BENCH_REDIS")]
    redis: Option<String>,
    /// Folder of the service binaries (write-svc, read-svc, projector, esq); default: the
    /// folder of this executable.
    #[arg(long, env = "ESQ_BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Write the report here (default: print it on stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The command to name in the report (scripts/bench passes its own command line).
    #[arg(long, default_value = "esq-bench")]
    command: String,
    /// Extra facts for the report's header (versions), one per flag.
    #[arg(long)]
    fact: Vec<String>,
    /// Pin Cassandra to core 0 and everything else to the other cores for the whole run (the
    /// shape of a deployment where the database has its own machine); every core is given
    /// back at the end.
    #[arg(long)]
    pin: bool,
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Both sides of every row run as tasks of the runtime, as esq's services do: the main
    // thread's own future is woken across threads for every I/O it waits on, which costs a
    // raw side (or the projector, before it ran as a task) measurably more CPU per request.
    tokio::spawn(run(Args::parse())).await?
}

async fn run(args: Args) -> anyhow::Result<()> {
    let all = rows::all();
    if args.list {
        for r in &all {
            println!("{:<12} {}", r.name, r.about);
        }
        for p in rows::PLANNED {
            if !all.iter().any(|r| r.name == p.name) {
                println!("{:<12} not measured yet (part: {})", p.name, p.owner);
            }
        }
        return Ok(());
    }
    for name in &args.only {
        anyhow::ensure!(
            all.iter().any(|r| r.name == name.as_str()),
            "no row group {name:?}; --list shows them"
        );
    }
    let (Some(cassandra), Some(redis)) = (args.cassandra.clone(), args.redis.clone()) else {
        anyhow::bail!(
            "--cassandra/ESQ_BENCH_CASSANDRA and --redis/ESQ_BENCH_REDIS are required \
             (scripts/bench starts both and sets them)"
        );
    };
    let bin_dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("no folder for this executable"))?,
    };
    let rounds = args
        .rounds
        .unwrap_or(if args.size == Size::Full { 3 } else { 1 });
    let ctx = Ctx::new(args.size, rounds, Backends { cassandra, redis }, bin_dir)?;
    let pinned = if args.pin {
        let cassandra = ctx.cassandra_proc().ok_or_else(|| {
            anyhow::anyhow!("--pin: no Cassandra process listens on this machine")
        })?;
        let redis: Vec<u32> = ctx.redis_proc().into_iter().map(|w| w.pid).collect();
        Some(esq_bench::sys::Pinned::apply(cassandra.pid, &redis)?)
    } else {
        None
    };

    let selected = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut groups: Vec<(String, Outcome)> = Vec::new();
    let mut failed = 0;
    // The table order first, then any other registered group.
    let mut order: Vec<&str> = rows::PLANNED.iter().map(|p| p.name).collect();
    for r in &all {
        if !order.contains(&r.name) {
            order.push(r.name);
        }
    }
    for name in order {
        let outcome = match all.iter().find(|r| r.name == name) {
            Some(row) if selected(name) => {
                eprintln!("esq-bench: running {name}");
                let started = std::time::Instant::now();
                match (row.run)(&ctx).await {
                    Ok(lines) => {
                        eprintln!(
                            "esq-bench: {name} done in {:.1} s",
                            started.elapsed().as_secs_f64()
                        );
                        for l in &lines {
                            eprintln!(
                                "  {} | {} | {} | {} | {}",
                                l.path,
                                l.esq,
                                l.baseline,
                                l.ratio.map_or(String::new(), |r| format!("{r:.2}")),
                                l.cpu
                            );
                        }
                        Outcome::Lines(lines)
                    }
                    Err(err) => {
                        failed += 1;
                        eprintln!("esq-bench: {name} FAILED: {err:#}");
                        Outcome::Failed(format!("{err:#}"))
                    }
                }
            }
            Some(_) => Outcome::Skipped,
            None => match rows::PLANNED.iter().find(|p| p.name == name) {
                Some(p) if args.only.is_empty() => Outcome::NotYet(rows::not_yet(p)),
                _ => Outcome::Skipped,
            },
        };
        groups.push((name.to_owned(), outcome));
    }
    if let Err(err) = ctx.finish().await {
        eprintln!("esq-bench: cleaning the backends failed: {err:#}");
    }
    if let Some(p) = &pinned {
        p.restore();
    }

    let mut versions = vec![
        command_output("redis-server", &["--version"]),
        command_output("rustc", &["--version"]),
    ];
    versions.extend(args.fact.iter().cloned());
    versions.extend(pinned.as_ref().map(|p| p.fact.clone()));
    versions.retain(|v| !v.is_empty());
    let facts = RunFacts {
        command: args.command.clone(),
        date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: esq_bench::sys::machine(),
        versions,
        size: args.size.name().to_owned(),
        rounds,
        commit: command_output("git", &["rev-parse", "--short", "HEAD"]),
    };
    let md = report::markdown(&facts, &groups);
    match &args.out {
        Some(path) => std::fs::write(path, md)?,
        None => print!("{md}"),
    }
    anyhow::ensure!(failed == 0, "{failed} row group(s) failed");
    Ok(())
}
