//! esq runtime: what every esq process shares and none of them should write twice — telemetry
//! setup, the shutdown signal, and the gRPC server wiring (health, reflection, graceful drain).
//!
//! Nothing here reads the environment: binaries parse their configuration once (clap with
//! `ESQ_…` env vars) and pass values in.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tracing_subscriber::EnvFilter;

pub mod config;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "plain" | "text" => Ok(Self::Plain),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: use plain or json")),
        }
    }
}

/// Installs the global tracing subscriber. `filter` uses `RUST_LOG` syntax (e.g. `info,esq=debug`).
/// Calling it twice is harmless (the second call does nothing), which suits in-process tests.
pub fn init_telemetry(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A root cancellation token cancelled by SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Binds a TCP listener, with the address in the error message.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves `routes` plus `grpc.health.v1.Health` and server reflection (v1 and v1alpha) on
/// `listener` until `shutdown` is cancelled. `services` are the fully-qualified names reported
/// as SERVING; on shutdown they flip to NOT_SERVING before in-flight calls drain.
pub async fn serve_grpc(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use tonic_health::ServingStatus;
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in services.iter().copied().chain([""]) {
        reporter
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    // Reflection lists only what this server serves, though the descriptor set has every API.
    let reflection = || {
        services.iter().copied().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(esq::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health"),
            |b, name| b.with_service_name(name),
        )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let routes = routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let names: Vec<String> = services.iter().map(|s| (*s).to_owned()).collect();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.cancelled().await;
            for name in names.iter().map(String::as_str).chain([""]) {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!("draining gRPC calls");
        })
        .await?;
    Ok(())
}

/// Whether an error at start may go away by itself (a backing store not up yet), so that
/// connecting again is worth it; anything else (a bad configuration) should stop the process.
pub trait Transient {
    /// True for "cannot reach it (yet)", false for errors that retrying cannot fix.
    fn is_transient(&self) -> bool;
}

impl Transient for esq_eventstore::StoreError {
    fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl Transient for esq_readstore::ReadError {
    fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Runs `connect` until it succeeds, backing off from 100 ms to 5 s and logging each
/// transient failure, so a service can start before its backing stores. `Ok(None)` if
/// `shutdown` came first; an error that is not [`Transient`] (a bad configuration) is returned
/// at once, for the binary to exit with it.
pub async fn connect_with_retry<T, E: std::fmt::Display + Transient, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut connect: impl FnMut() -> Fut,
) -> Result<Option<T>, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot connect to {what}")
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
