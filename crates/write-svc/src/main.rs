//! The write-svc binary: commands and appends over gRPC onto a ScyllaDB/Cassandra event store.

use clap::Parser;
use esq_readstore::redis::RedisConfig;
use esq_runtime::config::{CqlArgs, RedisAccessArgs, ServerArgs, TelemetryArgs};
use esq_runtime::metrics::{Metered, MetricsArgs};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// esq write-svc: turns commands into events appended to the event store.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// gRPC listen address.
    #[arg(long, env = "ESQ_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Redis URL for fast-path nudges to projectors (optional; without it projectors rely on
    /// the change log alone). Several, comma-separated: the nodes of a Redis Cluster (nudges
    /// then survive the loss of a node).
    #[arg(long, env = "ESQ_NUDGE_URL")]
    nudge_url: Option<String>,
    /// Pub/sub channel of the nudges.
    #[arg(long, env = "ESQ_NUDGE_CHANNEL", default_value = "esq:nudge")]
    nudge_channel: String,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    snapshots: esq_write_svc::SnapshotArgs,
    #[command(flatten)]
    cql: CqlArgs,
    /// Credentials and TLS of the nudge connection (the projector's Redis settings).
    #[command(flatten)]
    nudge_access: RedisAccessArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.telemetry.init();
    // Before anything else: a server without TLS and without --insecure must not start.
    let tls = args.server.tls.load(args.listen).await?;
    let shutdown = esq_runtime::shutdown_on_signals();
    let auth = args.server.auth(&shutdown).await?;
    args.metrics.spawn(&shutdown).await?;
    let Some(store) = args.cql.connect(&shutdown).await? else {
        return Ok(());
    };
    let nudge = match args.nudge_url {
        Some(url) => {
            let urls: Vec<String> = url.split(',').map(|u| u.trim().to_owned()).collect();
            let redis = RedisConfig {
                cluster: urls.len() > 1,
                urls,
                prefix: "esq".into(),
                timeout: Duration::from_secs(1),
                access: args.nudge_access.load().await?,
            };
            Some(esq_write_svc::redis_nudge(
                redis,
                args.nudge_channel,
                shutdown.clone(),
            ))
        }
        None => None,
    };
    let deps = esq_write_svc::Deps {
        store: Arc::new(Metered(store)),
        nudge,
    };
    // Listen only once the store is there: until then clients are refused at once.
    let listener = esq_runtime::bind(args.listen).await?;
    let config = esq_write_svc::Config {
        shutdown_grace: args.server.shutdown_grace,
        health_listen: args.server.health_listen,
        snapshot_every: args.snapshots.snapshot_every,
        auth,
        tls,
        limits: args.server.limits.limits(),
        ..esq_write_svc::Config::default()
    };
    esq_write_svc::run(listener, deps, config, shutdown).await
}
