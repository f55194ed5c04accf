//! The read-svc binary: queries over gRPC answered from the Redis read model, and temporal
//! queries answered from the ScyllaDB/Cassandra event store when one is configured.

use clap::{CommandFactory, FromArgMatches, Parser};
use esq_runtime::config::{CqlArgs, RedisArgs, ServerArgs, TelemetryArgs};
use esq_runtime::metrics::{Metered, MetricsArgs};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// esq read-svc: answers queries from the read model.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// gRPC listen address.
    #[arg(long, env = "ESQ_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// Longest a min_version wait may last, in milliseconds.
    #[arg(long, env = "ESQ_MAX_WAIT_MS", default_value_t = 5000)]
    max_wait_ms: u64,
    /// How often a min_version waiter re-reads its document when no apply notification woke
    /// it, in milliseconds (the bound on what a lost notification costs; each idle waiter
    /// costs one Redis read per period).
    #[arg(long, env = "ESQ_WAIT_RECHECK_MS", default_value_t = 1000)]
    wait_recheck_ms: u64,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    redis: RedisArgs,
    /// The event store, read only, for the temporal queries (GetCartAt, SalesReport, GetBookAt,
    /// ListBooksAt): the same settings as write-svc's. Without --cql-nodes those queries answer
    /// FAILED_PRECONDITION; every other query works without it.
    #[command(flatten)]
    cql: Option<CqlArgs>,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The event store is optional here (the shared CQL flags require it elsewhere): without it
    // the temporal queries are refused and everything else works.
    let matches = Args::command()
        .mut_arg("cql_nodes", |a| a.required(false))
        .get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    args.telemetry.init();
    // Before anything else: a server without TLS and without --insecure must not start.
    let tls = args.server.tls.load(args.listen).await?;
    let shutdown = esq_runtime::shutdown_on_signals();
    args.metrics.spawn(&shutdown).await?;
    let Some(store) = args.redis.connect(&shutdown).await? else {
        return Ok(());
    };
    // min_version waits are woken by the projector's apply notifications (one subscription).
    let follower = tokio::spawn(store.clone().follow_applies(shutdown.clone()));
    let history = match &args.cql {
        Some(cql) if cql.cql_nodes.is_empty() => anyhow::bail!(
            "event-store settings (--cql-*, ESQ_CQL_*...) given without --cql-nodes \
             (ESQ_CQL_NODES): set it to serve the temporal queries, or drop the others"
        ),
        Some(cql) => match cql.connect(&shutdown).await? {
            Some(store) => Some(Arc::new(Metered(store))),
            None => return Ok(()),
        },
        None => {
            tracing::warn!("no event store configured (--cql-nodes): temporal queries disabled");
            None
        }
    };
    let config = esq_read_svc::Config {
        max_wait: Duration::from_millis(args.max_wait_ms),
        wait_recheck: Duration::from_millis(args.wait_recheck_ms.max(1)),
        shutdown_grace: args.server.shutdown_grace,
        health_listen: args.server.health_listen,
        tls,
        limits: args.server.limits.limits(),
        ..esq_read_svc::Config::default()
    };
    // Listen only once the store is there: until then clients are refused at once.
    let listener = esq_runtime::bind(args.listen).await?;
    let deps = esq_read_svc::Deps {
        read: Arc::new(store),
        history,
    };
    let served = esq_read_svc::run(listener, deps, config, shutdown.clone()).await;
    shutdown.cancel();
    let _ = follower.await;
    served
}
