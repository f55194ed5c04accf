//! esq runtime: what every esq process shares and none of them should write twice — telemetry
//! setup, the shutdown signal, the gRPC server wiring (health, reflection, graceful drain),
//! transport security ([`tls`], [`pki`]), call limits ([`limits`]) and Prometheus metrics
//! ([`metrics`]).
//!
//! Nothing here reads the environment: binaries parse their configuration once (clap with
//! `ESQ_…` env vars) and pass values in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tracing_subscriber::EnvFilter;

pub mod config;
mod health;
pub mod incoming;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod status;
pub mod store_status;
pub mod tls;

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

/// Longest request message a server decodes, in bytes: the domain's own limits (3 MiB of
/// payload per append, see `esq_domain::event`) plus 2 MiB for headers and metadata, so that an
/// oversize append is refused by validation, naming the field, before the transport refuses it.
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;

/// HTTP/2 keepalive: the server pings every connection this often, idle or not, ...
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ... and closes it when a ping is not answered within this: a dead peer costs ≤ 40 s.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection from which nothing at all is read for this long is closed. A live HTTP/2 peer
/// answers our pings every [`HTTP2_KEEPALIVE_INTERVAL`], so this only catches silent sockets,
/// such as ones that never send the HTTP/2 preface.
pub const IDLE_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// After this age a connection is asked to go away (GOAWAY; calls in flight finish, the client
/// reconnects): idle but live connections do not live forever, and clients rebalance over
/// replicas.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// Concurrent calls per connection: the HTTP/2 spec's recommended minimum, and gRPC's usual
/// value. A call can hold a ReadStream buffer (≈ 0.5 MiB), so this bounds one connection's
/// buffered memory to tens of MiB; clients that need more open more connections.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 flow control, per call: how much of a request the server buffers before the client
/// must wait for a WINDOW_UPDATE. 1 MiB holds any ordinary request whole (commands and
/// single-event appends are a few KiB; only appends near the 5 MiB limit take a few window
/// round trips, which cost microseconds on a LAN). Fixed rather than adaptive (BDP probing):
/// the peers are services on one network, and a fixed window bounds memory.
pub const HTTP2_STREAM_WINDOW: u32 = 1024 * 1024;
/// ... and per connection, shared by its calls: 8 MiB, so a connection's unread request data is
/// bounded whatever its [`MAX_CONCURRENT_STREAMS`] calls send, while 8 calls with a full window
/// each never wait on one another.
pub const HTTP2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// How long a server waits after the grace period, once connections are closed by force, for
/// its connection tasks to end.
pub(crate) const HARD_STOP_WAIT: Duration = Duration::from_secs(2);

/// How a gRPC server is run.
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// Fully-qualified names of the services, reported in health checks.
    pub services: &'static [&'static str],
    /// Whether the services can serve now (their stores reachable); health follows it.
    pub readiness: Readiness,
    /// Longest drain after shutdown before open connections are closed by force.
    pub grace: Duration,
    /// Where to serve health alone, plaintext and unauthenticated, besides `listener`
    /// (`--health-listen`; see [`health`]): for probes that cannot speak TLS.
    pub health_listen: Option<SocketAddr>,
    /// TLS for every connection; `None` serves plaintext (`--insecure`, `esq dev`).
    pub tls: Option<tls::ServerTls>,
    /// Load shedding and the default deadline ([`limits`]).
    pub limits: limits::Limits,
}

impl GrpcOptions {
    /// Options for `services`, ready, with the default grace period.
    pub fn new(services: &'static [&'static str]) -> Self {
        Self {
            services,
            readiness: Readiness::default(),
            grace: config::DEFAULT_SHUTDOWN_GRACE,
            health_listen: None,
            tls: None,
            limits: limits::Limits::default(),
        }
    }
}

/// Serves `routes` plus `grpc.health.v1.Health` and server reflection (v1 and v1alpha) on
/// `listener` until `shutdown` is cancelled.
///
/// Health reports the services SERVING while `options.readiness` is true. On shutdown they flip
/// to NOT_SERVING, the listener closes, connections get GOAWAY and in-flight calls drain; after
/// `options.grace` whatever is still open (idle connections, a stalled stream reader) is closed
/// by force, so this returns within the grace period (plus a moment).
///
/// Every connection gets TCP_NODELAY and TCP keepalive ([`incoming`]), HTTP/2 keepalive
/// ([`HTTP2_KEEPALIVE_INTERVAL`], [`HTTP2_KEEPALIVE_TIMEOUT`]), an idle bound
/// ([`IDLE_READ_TIMEOUT`]), an age bound ([`MAX_CONNECTION_AGE`]) and at most
/// [`MAX_CONCURRENT_STREAMS`] calls at once; every status passes [`status::StatusHygieneLayer`],
/// and every call is counted and timed by [`metrics::GrpcMetricsLayer`]. With `options.tls`
/// connections are TLS ([`tls`]: handshakes off the accept loop, files reloaded when they
/// change); `options.limits` sheds calls over the server-wide limit and gives calls without a
/// deadline the default one ([`limits`]).
///
/// With `options.health_listen`, the same health statuses are also served alone, in plaintext,
/// on that address (see [`health`]) for as long as this runs.
pub async fn serve_grpc(
    listener: TcpListener,
    routes: Routes,
    options: GrpcOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let reloader_stop = CancellationToken::new();
    let _stop_reloader = reloader_stop.clone().drop_guard();
    let GrpcOptions {
        services,
        readiness,
        grace,
        health_listen,
        tls,
        limits,
    } = options;
    if let Some(tls) = &tls {
        // Ends with the server: the guard below cancels it whichever way this returns.
        tls.spawn_reloader(reloader_stop.clone());
    }
    let (reporter, health) = tonic_health::server::health_reporter();
    // Statuses exist before the first connection is accepted, so an early health check never
    // finds the services unknown.
    let initial = if readiness.get() {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for name in services.iter().copied().chain([""]) {
        reporter.set_service_status(name, initial).await;
    }
    // Dropped when this returns, which closes the health-only listener.
    let _health_only = match health_listen {
        Some(addr) => {
            let listener = bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--health-listen (ESQ_HEALTH_LISTEN): {e:#}"))?;
            Some(health::HealthOnly::spawn(listener, health.clone()))
        }
        None => None,
    };
    // One task owns the reporter, so that the last status written on shutdown is NOT_SERVING.
    let follower = tokio::spawn(follow_readiness(
        reporter,
        services,
        initial,
        readiness,
        shutdown.clone(),
    ));
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
    let hard_stop = CancellationToken::new();
    // Whatever way this returns, no connection outlives the server.
    let _close_all = hard_stop.clone().drop_guard();
    let incoming = incoming::ServerIncoming::new(
        listener,
        incoming::ConnLimits {
            idle_read_timeout: IDLE_READ_TIMEOUT,
            hard_stop: hard_stop.clone(),
        },
        tls,
    );
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .layer(metrics::GrpcMetricsLayer)
        .layer(status::StatusHygieneLayer)
        .layer(limits::LimitsLayer::new(limits))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                let _ = follower.await;
                tracing::info!(?grace, "draining gRPC calls");
            }
        });
    tokio::pin!(serve);
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = &mut serve => return Ok(result?),
        () = deadline => {}
    }
    tracing::warn!(
        ?grace,
        "shutdown grace period over: closing open connections"
    );
    hard_stop.cancel();
    match tokio::time::timeout(HARD_STOP_WAIT, serve).await {
        Ok(result) => Ok(result?),
        Err(_) => {
            tracing::warn!("gRPC connections still open after the hard stop; leaving them");
            Ok(())
        }
    }
}

/// Writes health statuses: SERVING while `readiness` is true, NOT_SERVING otherwise, and
/// NOT_SERVING for good once `shutdown` is cancelled. Only changes are written (the reporter
/// notifies watchers of every write), so a `Watch` client never sees the same status twice.
async fn follow_readiness(
    reporter: tonic_health::server::HealthReporter,
    services: &'static [&'static str],
    mut written: tonic_health::ServingStatus,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    let mut ready = readiness.subscribe();
    loop {
        let status = if shutdown.is_cancelled() {
            ServingStatus::NotServing
        } else if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if status != written {
            for name in services.iter().copied().chain([""]) {
                reporter.set_service_status(name, status).await;
            }
            written = status;
        }
        if shutdown.is_cancelled() {
            return;
        }
        tokio::select! {
            changed = ready.changed() => {
                if changed.is_err() {
                    // Every sender is gone: the status can no longer change until shutdown.
                    shutdown.cancelled().await;
                }
            }
            () = shutdown.cancelled() => {}
        }
    }
}

/// Whether a server's services can serve, as they judge it themselves (e.g. their store answers);
/// health checks report it. Cloning shares the flag.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Readiness {
    /// Ready.
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(true)))
    }
}

impl Readiness {
    /// Sets the flag; returns whether it changed.
    pub fn set(&self, ready: bool) -> bool {
        self.0
            .send_if_modified(|r| std::mem::replace(r, ready) != ready)
    }

    /// The flag now.
    pub fn get(&self) -> bool {
        *self.0.borrow()
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// Spawns a probe that runs `check` every `every` until `shutdown` and keeps the flag equal
    /// to its last outcome (a check that takes longer than `every` counts as failed); changes
    /// are logged with `what` as the name of the dependency.
    pub fn probe<E, Fut>(
        &self,
        what: &'static str,
        every: Duration,
        shutdown: CancellationToken,
        mut check: impl FnMut() -> Fut + Send + 'static,
    ) -> tokio::task::JoinHandle<()>
    where
        E: std::fmt::Display,
        Fut: std::future::Future<Output = Result<(), E>> + Send,
    {
        let readiness = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                let outcome = match tokio::time::timeout(every, check()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {every:?}")),
                };
                let ok = outcome.is_ok();
                if readiness.set(ok) {
                    match outcome {
                        Ok(()) => tracing::info!("{what} is back: serving"),
                        Err(e) => tracing::warn!(error = %e, "{what} is unreachable: not serving"),
                    }
                }
            }
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    /// The server returns within the grace period although an idle TCP connection and a
    /// streaming call nobody ends (a health Watch, standing for a stalled reader) are open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_returns_within_the_grace_period() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let mut options = GrpcOptions::new(&["test.Service"]);
        options.grace = Duration::from_secs(2);
        let server = tokio::spawn(serve_grpc(
            listener,
            Routes::default(),
            options,
            shutdown.clone(),
        ));
        // A client that connects and never speaks.
        let _idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: "test.Service".into(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = watch.message().await.expect("status").expect("a status");
        assert_eq!(first.status(), ServingStatus::Serving);

        let started = std::time::Instant::now();
        shutdown.cancel();
        let next = tokio::time::timeout(Duration::from_secs(20), watch.message())
            .await
            .expect("health changes on shutdown")
            .expect("status")
            .expect("a status");
        assert_eq!(next.status(), ServingStatus::NotServing);
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("serve_grpc returns after the grace period")
            .expect("join")
            .expect("serve");
        let took = started.elapsed();
        eprintln!("shutdown with an idle connection and an open stream took {took:?}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    /// The follower writes changes only: the reporter notifies watchers of every write, so a
    /// write of an unchanged status reaches a `Watch` client as a duplicate message.
    #[tokio::test(flavor = "current_thread")]
    async fn readiness_follower_writes_only_changes() {
        use tokio_stream::StreamExt as _;
        use tonic_health::pb::health_server::Health as _;
        let reporter = tonic_health::server::HealthReporter::new();
        let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        reporter
            .set_service_status("s", tonic_health::ServingStatus::Serving)
            .await;
        let mut watch = health
            .watch(tonic::Request::new(HealthCheckRequest {
                service: "s".into(),
            }))
            .await
            .expect("watch")
            .into_inner();
        let first = watch.next().await.expect("first").expect("status");
        assert_eq!(first.status(), ServingStatus::Serving);
        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        let follower = tokio::spawn(follow_readiness(
            reporter,
            &["s"],
            tonic_health::ServingStatus::Serving,
            readiness.clone(),
            shutdown.clone(),
        ));
        // On this single-threaded runtime the follower runs until it waits for a change.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let pending = tokio::time::timeout(Duration::from_millis(1), watch.next()).await;
        assert!(pending.is_err(), "a duplicate status was sent: {pending:?}");
        readiness.set(false);
        let next = watch.next().await.expect("next").expect("status");
        assert_eq!(next.status(), ServingStatus::NotServing);
        shutdown.cancel();
        follower.await.expect("follower");
    }

    /// Health follows readiness, and stays NOT_SERVING once shutdown began.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_follows_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let options = GrpcOptions::new(&["test.Service"]);
        let readiness = options.readiness.clone();
        let server = tokio::spawn(serve_grpc(
            listener,
            Routes::default(),
            options,
            shutdown.clone(),
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: "test.Service".into(),
            })
            .await
            .expect("watch")
            .into_inner();
        async fn next(
            watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
        ) -> ServingStatus {
            tokio::time::timeout(Duration::from_secs(20), watch.message())
                .await
                .expect("a health change")
                .expect("status")
                .expect("a status")
                .status()
        }
        assert_eq!(next(&mut watch).await, ServingStatus::Serving);
        readiness.set(false);
        assert_eq!(next(&mut watch).await, ServingStatus::NotServing);
        readiness.set(true);
        assert_eq!(next(&mut watch).await, ServingStatus::Serving);
        shutdown.cancel();
        assert_eq!(next(&mut watch).await, ServingStatus::NotServing);
        drop(watch);
        server.await.expect("join").expect("serve");
    }

    /// `health_listen` serves the same health statuses alone, in plaintext: they follow
    /// readiness and shutdown, nothing but health is served there, and the port closes when
    /// the server returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_only_listener_serves_health_alone() {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, ServerReflectionRequest,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // A free port for the health-only listener, which serve_grpc binds itself.
        let health_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let shutdown = CancellationToken::new();
        let mut options = GrpcOptions::new(&["test.Service"]);
        options.grace = Duration::from_secs(2);
        options.health_listen = Some(health_addr);
        let readiness = options.readiness.clone();
        let server = tokio::spawn(serve_grpc(
            listener,
            Routes::default(),
            options,
            shutdown.clone(),
        ));
        // The main port up means the health-only one is bound too (it is bound first).
        let main = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the main port");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{health_addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the health-only port");
        let mut health = HealthClient::new(channel.clone());
        for service in ["", "test.Service"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("check")
                .into_inner()
                .status();
            assert_eq!(status, ServingStatus::Serving, "service {service:?}");
        }
        let mut watch = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("watch")
            .into_inner();
        async fn next(
            watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
        ) -> ServingStatus {
            tokio::time::timeout(Duration::from_secs(20), watch.message())
                .await
                .expect("a health change")
                .expect("status")
                .expect("a status")
                .status()
        }
        assert_eq!(next(&mut watch).await, ServingStatus::Serving);
        readiness.set(false);
        assert_eq!(next(&mut watch).await, ServingStatus::NotServing);
        readiness.set(true);
        assert_eq!(next(&mut watch).await, ServingStatus::Serving);

        // Reflection is served on the main port and not on the health-only one.
        let list = || {
            tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }])
        };
        ServerReflectionClient::new(main)
            .server_reflection_info(list())
            .await
            .expect("reflection on the main port");
        let refused = ServerReflectionClient::new(channel)
            .server_reflection_info(list())
            .await
            .expect_err("no reflection on the health-only port");
        assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");

        shutdown.cancel();
        assert_eq!(next(&mut watch).await, ServingStatus::NotServing);
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("serve_grpc returns")
            .expect("join")
            .expect("serve");
        // The health-only server stops in its own task: wait (bounded) for the port to close.
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            while tokio::net::TcpStream::connect(health_addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(closed.is_ok(), "the health-only port is still open");
    }

    /// A health address that cannot be bound stops the server with an error naming the flag.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_listen_bind_error_names_the_flag() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut options = GrpcOptions::new(&["test.Service"]);
        options.health_listen = Some(taken.local_addr().expect("addr"));
        let err = serve_grpc(
            listener,
            Routes::default(),
            options,
            CancellationToken::new(),
        )
        .await
        .expect_err("the health address is taken");
        let message = format!("{err:#}");
        assert!(message.contains("--health-listen"), "{message}");
        assert!(message.contains("ESQ_HEALTH_LISTEN"), "{message}");
    }
}
