//! The projector binary: tails the change log of a ScyllaDB/Cassandra event store into Redis,
//! and serves `esq.v1.Projections` (the operator's API) plus health and reflection on `--listen`.

use clap::Parser;
use esq_eventstore::{nudge_may_carry, parse_nudge};
use esq_projector::{Config, Projector};
use esq_readstore::redis::subscribe_nudges;
use esq_runtime::config::{CqlArgs, RedisArgs, ServerArgs, TelemetryArgs};
use esq_runtime::metrics::{Metered, MetricsArgs};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// esq projector: folds events into the read model.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// gRPC listen address: esq.v1.Projections, health checks (for probes) and reflection.
    #[arg(long, env = "ESQ_LISTEN", default_value = "127.0.0.1:50053")]
    listen: SocketAddr,
    /// This projector's name among its replicas (default: a random one).
    #[arg(long, env = "ESQ_PROJECTOR_ID")]
    projector_id: Option<String>,
    /// How often the change log is polled without a nudge, in milliseconds.
    #[arg(long, env = "ESQ_POLL_INTERVAL_MS", default_value_t = 250)]
    poll_interval_ms: u64,
    /// Shard lease lifetime, in milliseconds: a dead projector's shards move after this.
    #[arg(long, env = "ESQ_LEASE_TTL_MS", default_value_t = 10_000)]
    lease_ttl_ms: u64,
    /// Streams brought up to date at once (a page's distinct streams, the fast path), their
    /// read-store calls pipelined on one connection.
    #[arg(long, env = "ESQ_SYNC_CONCURRENCY", default_value_t = esq_projector::DEFAULT_SYNC_CONCURRENCY)]
    sync_concurrency: usize,
    /// Owned change-log shards polled at once.
    #[arg(long, env = "ESQ_SHARD_CONCURRENCY", default_value_t = esq_projector::DEFAULT_SHARD_CONCURRENCY)]
    shard_concurrency: usize,
    /// Move progress markers (shard checkpoints, rebuild swaps, derived fill markers) only
    /// past applies every Redis primary has on at least this many replicas (Redis WAIT), so
    /// that a failover cannot lose an apply a checkpoint has passed. 0: off (a standalone
    /// server). With N >= 1 a checkpoint waits while a primary has fewer than N live replicas:
    /// applying goes on, only the checkpoints stall (and a restart re-applies from them).
    #[arg(long, env = "ESQ_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    redis_wait_replicas: u32,
    /// Pub/sub channel of the nudges.
    #[arg(long, env = "ESQ_NUDGE_CHANNEL", default_value = "esq:nudge")]
    nudge_channel: String,
    /// Worker threads of the async runtime. One by default: a projector's work is waiting on
    /// Cassandra and Redis for many streams at once, and on one thread its tasks and the
    /// drivers' I/O tasks wake each other without crossing threads (less CPU per event, a
    /// faster catch-up; BENCHMARKS.md). Raise it when one core is not enough for the shards a
    /// replica owns, or run more replicas.
    #[arg(long, env = "ESQ_WORKER_THREADS", default_value_t = esq_projector::DEFAULT_WORKER_THREADS)]
    worker_threads: usize,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    cql: CqlArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()?;
    // A task of the runtime rather than the main thread's future: its I/O then wakes it on
    // the worker that polled the I/O, not across threads.
    runtime.block_on(async move { tokio::spawn(serve(args)).await? })
}

async fn serve(args: Args) -> anyhow::Result<()> {
    args.telemetry.init();
    // Before anything else: a server without TLS and without --insecure must not start.
    let tls = args.server.tls.load(args.listen).await?;
    let shutdown = esq_runtime::shutdown_on_signals();
    let auth = args.server.auth(&shutdown).await?;
    args.metrics.spawn(&shutdown).await?;
    let Some(store) = args.cql.connect(&shutdown).await? else {
        return Ok(());
    };
    let Some(read) = args.redis.connect(&shutdown).await? else {
        return Ok(());
    };
    let mut config = Config {
        poll_interval: Duration::from_millis(args.poll_interval_ms),
        lease_ttl: Duration::from_millis(args.lease_ttl_ms),
        append_deadline: Duration::from_millis(args.cql.append_deadline_ms),
        sync_concurrency: args.sync_concurrency.max(1),
        shard_concurrency: args.shard_concurrency.max(1),
        wait_replicas: args.redis_wait_replicas,
        ..Config::default()
    };
    if let Some(id) = args.projector_id {
        config.owner = id;
    }
    let store = Arc::new(Metered(store));
    let projector = Arc::new(Projector::new(
        Arc::clone(&store),
        store,
        Arc::new(read),
        config,
    ));

    // The fast path: nudges name a stream (and carry a small append's events); a lost or late
    // one only costs latency.
    let wake = Arc::new(Notify::new());
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let subscriber = {
        let (wake, shutdown) = (Arc::clone(&wake), shutdown.clone());
        // Any node of a Cluster hears every PUBLISH: the subscription takes the URLs in turn,
        // so it moves to another node when its node dies.
        let urls = args.redis.redis_url.clone();
        let access = args.redis.access.load().await?;
        let channel = args.nudge_channel.clone();
        tokio::spawn(async move {
            let sink = move |m: Option<&str>| match m.and_then(parse_nudge) {
                Some(mut n) => {
                    // A backed-up queue holds plain nudges only (see `NUDGE_CARRIED_QUEUED`).
                    if !nudge_may_carry(tx.capacity(), tx.max_capacity()) {
                        n.events = Vec::new();
                    }
                    let _ = tx.try_send(n);
                }
                None => wake.notify_one(),
            };
            subscribe_nudges(&urls, &access, &channel, sink, shutdown).await;
        })
    };
    let listener = esq_runtime::bind(args.listen).await?;
    let mut options = esq_runtime::GrpcOptions::new(&[esq_projector::admin::SERVICE]);
    options.grace = args.server.shutdown_grace;
    options.auth = auth;
    options.health_listen = args.server.health_listen;
    options.tls = tls;
    options.limits = args.server.limits.limits();
    let admin = esq_projector::admin::server(Arc::clone(&projector));
    let health = tokio::spawn(esq_runtime::serve_grpc(
        listener,
        tonic::service::Routes::new(admin),
        options,
        shutdown.clone(),
    ));
    projector.run(wake, Some(rx), shutdown).await;
    let _ = subscriber.await;
    health.await??;
    Ok(())
}
