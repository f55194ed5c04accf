//! Prometheus metrics of an esq process: one registry per process, typed handles that the
//! services call, and the tiny HTTP endpoint that serves them.
//!
//! Every process records its metrics always (atomic counters; cheap) and serves them at
//! `GET /metrics` (OpenMetrics text exposition, which Prometheus scrapes natively) only when
//! its `--metrics-addr` (`ESQ_METRICS_ADDR`) is set; see [`MetricsArgs`] and [`serve`].
//!
//! The families, by who records them:
//!
//! - every gRPC server, in one tower layer ([`GrpcMetricsLayer`], installed by
//!   [`crate::serve_grpc`]): `esq_grpc_requests_total{service,method,code}` and
//!   `esq_grpc_request_duration_seconds{service,method}` (until the call's status is sent);
//! - write-svc ([`write`]): `esq_write_appends_total{outcome}`, `esq_write_events_appended_total`,
//!   `esq_write_conflicts_total` (wrong expected version answered to a client) and
//!   `esq_write_aborted_total` (a command that kept losing races, answered ABORTED);
//! - the projector ([`projector`]): `esq_projector_events_applied_total{projection}`,
//!   `esq_projector_gaps_pulled_total`, `esq_projector_lag_seconds{shard}` (how long the oldest
//!   unprocessed change has waited), `esq_projector_checkpoint_age_seconds{shard}` (age of the
//!   newest change the checkpoint covers), `esq_projector_leases_owned`,
//!   `esq_projector_rebuild_streams_done{projection}` and `esq_projector_rebuilds_total{projection}`;
//! - read-svc ([`read`]): `esq_read_min_version_waits_total{outcome}` and
//!   `esq_read_min_version_wait_duration_seconds`;
//! - the event store, through [`Metered`], and the read store's hot calls, through
//!   [`StoreMetrics::time`]: `esq_store_call_duration_seconds{store,operation}`.
//!
//! Label values are bounded: gRPC service and method names are those of the served APIs (any
//! other path is counted as `unknown`), codes are the 17 gRPC codes, projections and shards are
//! fixed by the deployment.

use esq_domain::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId, StreamInfo};
use esq_eventstore::{
    ChangeFeed, ChangePage, EventStore, ReadRequest, Snapshot, Snapshots, StoreError, StreamPage,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The metrics flag every binary has.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Where to serve Prometheus metrics (`GET /metrics`), e.g. `0.0.0.0:9090`; unset serves
    /// none.
    #[arg(long, env = "ESQ_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl MetricsArgs {
    /// Binds the metrics address (if set) and serves it until `shutdown`; returns the bound
    /// address. A port that cannot be bound is an error at start, not a silent lack of metrics.
    pub async fn spawn(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<SocketAddr>> {
        let Some(addr) = self.metrics_addr else {
            return Ok(None);
        };
        let listener = crate::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(serve(listener, shutdown.clone()));
        tracing::info!(%bound, "serving metrics at /metrics");
        Ok(Some(bound))
    }
}

/// Latency buckets of gRPC calls and store calls, in seconds: 0.5 ms to ~33 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// Labels of one gRPC method.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

/// Labels of one gRPC method and status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: String,
}

/// An `outcome` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// A `projection` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabels {
    projection: String,
}

/// A `shard` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    shard: String,
}

/// Labels of one store operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
    operation: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// gRPC server metrics (see [`GrpcMetricsLayer`]).
#[derive(Debug)]
pub struct GrpcMetrics {
    requests: Family<CallLabels, Counter>,
    duration: HistogramFamily<MethodLabels>,
    /// `/package.Service/Method` paths of every API a server may serve.
    known: HashSet<String>,
}

impl GrpcMetrics {
    /// Records a finished call to `path` (`/package.Service/Method`).
    pub fn finished(&self, path: &str, code: tonic::Code, elapsed: Duration) {
        let (service, method) = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some((service, method)) if self.known.contains(path) => (service, method),
            _ => ("unknown", "unknown"),
        };
        self.requests
            .get_or_create(&CallLabels {
                service: service.to_owned(),
                method: method.to_owned(),
                code: code_name(code).to_owned(),
            })
            .inc();
        self.duration
            .get_or_create(&MethodLabels {
                service: service.to_owned(),
                method: method.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// The canonical name of a gRPC status code (as gRPC's own libraries print them).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Every `/package.Service/Method` path of esq's APIs, health and reflection.
fn known_paths() -> HashSet<String> {
    use prost::Message as _;
    let mut paths: HashSet<String> = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    match prost_types::FileDescriptorSet::decode(esq::FILE_DESCRIPTOR_SET) {
        Ok(set) => {
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        paths.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                    }
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the API descriptors for metrics"),
    }
    paths
}

/// write-svc metrics.
#[derive(Debug, Default)]
pub struct WriteMetrics {
    appends: Family<OutcomeLabels, Counter>,
    events_appended: Counter,
    conflicts: Counter,
    aborted: Counter,
}

impl WriteMetrics {
    /// An append call to the event store returned `result` for `events` events.
    pub fn append(&self, result: &Result<AppendResult, StoreError>) {
        let outcome = match result {
            Ok(r) => {
                self.events_appended
                    .inc_by(r.last_version.saturating_sub(r.first_version) + 1);
                "ok"
            }
            Err(StoreError::WrongExpectedVersion { .. }) => "wrong_expected_version",
            Err(StoreError::EventIdReused { .. }) => "event_id_reused",
            Err(StoreError::OutcomeUnknown(_)) => "outcome_unknown",
            Err(StoreError::Unavailable(_)) => "unavailable",
            Err(StoreError::Internal(_)) => "internal",
            Err(StoreError::Unprojectable(_)) => "unprojectable",
        };
        self.appends.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// A client was answered that the stream is not at the version it expected.
    pub fn conflict(&self) {
        self.conflicts.inc();
    }

    /// A command was answered ABORTED after losing every race within its budget.
    pub fn aborted(&self) {
        self.aborted.inc();
    }
}

/// Projector metrics.
#[derive(Debug, Default)]
pub struct ProjectorMetrics {
    events_applied: Family<ProjectionLabels, Counter>,
    gaps_pulled: Counter,
    lag: Family<ShardLabels, Gauge<f64, AtomicU64>>,
    checkpoint_age: Family<ShardLabels, Gauge<f64, AtomicU64>>,
    leases_owned: Gauge,
    /// Per polled shard: when the newest change its checkpoint covers was noted (µs since the
    /// epoch, if known), from which the checkpoint age is computed at each scrape.
    checkpoint_noted_us: std::sync::Mutex<std::collections::BTreeMap<u32, Option<i64>>>,
    rebuild_streams_done: Family<ProjectionLabels, Gauge>,
    rebuilds: Family<ProjectionLabels, Counter>,
}

impl ProjectorMetrics {
    /// `n` events were folded into `projection`'s read model.
    pub fn events_applied(&self, projection: &str, n: u64) {
        self.events_applied
            .get_or_create(&ProjectionLabels {
                projection: projection.to_owned(),
            })
            .inc_by(n);
    }

    /// An apply found the read model ahead of or apart from what it read (a stale apply), and
    /// the stream was read again from the read model's version.
    pub fn gap_pulled(&self) {
        self.gaps_pulled.inc();
    }

    /// A poll of `shard` ended: its oldest unprocessed change has waited `behind` (zero when
    /// none waits), and its checkpoint covers a change noted at `checkpoint_noted_us` (µs since
    /// the epoch; `None` when the checkpoint did not move).
    pub fn shard_polled(&self, shard: u32, behind: Duration, checkpoint_noted_us: Option<i64>) {
        self.lag
            .get_or_create(&ShardLabels {
                shard: shard.to_string(),
            })
            .set(behind.as_secs_f64());
        let mut noted = self.noted();
        let entry = noted.entry(shard).or_default();
        if checkpoint_noted_us.is_some() {
            *entry = checkpoint_noted_us;
        }
    }

    /// This projector holds the leases of `shards` now; the shards it no longer holds leave
    /// the per-shard series (another replica reports them).
    pub fn leases_owned(&self, shards: &std::collections::BTreeSet<u32>) {
        self.leases_owned
            .set(i64::try_from(shards.len()).unwrap_or(i64::MAX));
        let mut noted = self.noted();
        let gone: Vec<u32> = noted
            .keys()
            .filter(|s| !shards.contains(s))
            .copied()
            .collect();
        for shard in gone {
            noted.remove(&shard);
            let labels = ShardLabels {
                shard: shard.to_string(),
            };
            self.lag.remove(&labels);
            self.checkpoint_age.remove(&labels);
        }
    }

    fn noted(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u32, Option<i64>>> {
        self.checkpoint_noted_us
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the checkpoint ages from the recorded times, as of `now_us`.
    fn refresh_checkpoint_ages(&self, now_us: i64) {
        for (shard, noted) in self.noted().iter() {
            let Some(noted) = noted else { continue };
            let age = (now_us.saturating_sub(*noted)).max(0) as f64 / 1e6;
            self.checkpoint_age
                .get_or_create(&ShardLabels {
                    shard: shard.to_string(),
                })
                .set(age);
        }
    }

    /// A rebuild of `projection` started.
    pub fn rebuild_started(&self, projection: &str) {
        let labels = ProjectionLabels {
            projection: projection.to_owned(),
        };
        self.rebuilds.get_or_create(&labels).inc();
        self.rebuild_streams_done.get_or_create(&labels).set(0);
    }

    /// The running (or latest) rebuild of `projection` has brought `streams` streams in.
    pub fn rebuild_progress(&self, projection: &str, streams: u64) {
        self.rebuild_streams_done
            .get_or_create(&ProjectionLabels {
                projection: projection.to_owned(),
            })
            .set(i64::try_from(streams).unwrap_or(i64::MAX));
    }
}

/// read-svc metrics.
#[derive(Debug)]
pub struct ReadMetrics {
    waits: Family<OutcomeLabels, Counter>,
    wait_duration: Histogram,
}

impl ReadMetrics {
    /// A query with a min_version got its answer (`met`) or gave up at its deadline, after
    /// waiting `waited`.
    pub fn min_version_wait(&self, met: bool, waited: Duration) {
        let outcome = if met { "met" } else { "deadline" };
        self.waits.get_or_create(&OutcomeLabels { outcome }).inc();
        self.wait_duration.observe(waited.as_secs_f64());
    }
}

/// Store call latencies.
#[derive(Debug)]
pub struct StoreMetrics {
    duration: HistogramFamily<StoreLabels>,
}

impl StoreMetrics {
    /// Records one call of `operation` on `store` (`event` or `read`) that took `elapsed`.
    pub fn observe(&self, store: &'static str, operation: &'static str, elapsed: Duration) {
        self.duration
            .get_or_create(&StoreLabels { store, operation })
            .observe(elapsed.as_secs_f64());
    }

    /// Runs `call`, timing it as `operation` on `store`.
    pub async fn time<T>(
        &self,
        store: &'static str,
        operation: &'static str,
        call: impl std::future::Future<Output = T>,
    ) -> T {
        let started = Instant::now();
        let out = call.await;
        self.observe(store, operation, started.elapsed());
        out
    }
}

/// The process's registry and handles.
struct Metrics {
    registry: Registry,
    grpc: GrpcMetrics,
    write: WriteMetrics,
    projector: ProjectorMetrics,
    read: ReadMetrics,
    store: StoreMetrics,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let grpc = GrpcMetrics {
        requests: Family::default(),
        duration: Family::new_with_constructor(latency_buckets),
        known: known_paths(),
    };
    registry.register(
        "esq_grpc_requests",
        "gRPC calls served, by service, method and status code",
        grpc.requests.clone(),
    );
    registry.register_with_unit(
        "esq_grpc_request_duration",
        "Time from a gRPC call's request to its status",
        Unit::Seconds,
        grpc.duration.clone(),
    );
    let write = WriteMetrics::default();
    registry.register(
        "esq_write_appends",
        "Appends to the event store by write-svc, by outcome",
        write.appends.clone(),
    );
    registry.register(
        "esq_write_events_appended",
        "Events appended to the event store by write-svc",
        write.events_appended.clone(),
    );
    registry.register(
        "esq_write_conflicts",
        "Calls answered that the stream was not at the expected version",
        write.conflicts.clone(),
    );
    registry.register(
        "esq_write_aborted",
        "Commands answered ABORTED after losing every race to other writers",
        write.aborted.clone(),
    );
    let projector = ProjectorMetrics::default();
    registry.register(
        "esq_projector_events_applied",
        "Events folded into the read model, by projection",
        projector.events_applied.clone(),
    );
    registry.register(
        "esq_projector_gaps_pulled",
        "Stale applies after which the stream was read again from the read model's version",
        projector.gaps_pulled.clone(),
    );
    registry.register_with_unit(
        "esq_projector_lag",
        "How long the oldest change a shard has not processed yet has waited (0 when none)",
        Unit::Seconds,
        projector.lag.clone(),
    );
    registry.register_with_unit(
        "esq_projector_checkpoint_age",
        "Age of the newest change a shard's checkpoint covers",
        Unit::Seconds,
        projector.checkpoint_age.clone(),
    );
    registry.register(
        "esq_projector_leases_owned",
        "Shard leases this projector holds",
        projector.leases_owned.clone(),
    );
    registry.register(
        "esq_projector_rebuild_streams_done",
        "Streams brought in by the running or latest rebuild of a projection",
        projector.rebuild_streams_done.clone(),
    );
    registry.register(
        "esq_projector_rebuilds",
        "Rebuilds of a projection started by this projector",
        projector.rebuilds.clone(),
    );
    let read = ReadMetrics {
        waits: Family::default(),
        wait_duration: latency_buckets(),
    };
    registry.register(
        "esq_read_min_version_waits",
        "Queries with a min_version, by outcome (met, deadline)",
        read.waits.clone(),
    );
    registry.register_with_unit(
        "esq_read_min_version_wait_duration",
        "Time queries with a min_version waited for it",
        Unit::Seconds,
        read.wait_duration.clone(),
    );
    let store = StoreMetrics {
        duration: Family::new_with_constructor(latency_buckets),
    };
    registry.register_with_unit(
        "esq_store_call_duration",
        "Latency of event-store and read-store calls, by store and operation",
        Unit::Seconds,
        store.duration.clone(),
    );
    Metrics {
        registry,
        grpc,
        write,
        projector,
        read,
        store,
    }
});

/// gRPC server metrics of this process.
pub fn grpc() -> &'static GrpcMetrics {
    &METRICS.grpc
}

/// write-svc metrics of this process.
pub fn write() -> &'static WriteMetrics {
    &METRICS.write
}

/// Projector metrics of this process.
pub fn projector() -> &'static ProjectorMetrics {
    &METRICS.projector
}

/// read-svc metrics of this process.
pub fn read() -> &'static ReadMetrics {
    &METRICS.read
}

/// Store call latencies of this process.
pub fn store() -> &'static StoreMetrics {
    &METRICS.store
}

/// Every metric of this process in the OpenMetrics text format.
pub fn render() -> String {
    METRICS
        .projector
        .refresh_checkpoint_ages(esq_eventstore::now_us());
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    out
}

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Longest a metrics connection may stay open.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` (HTTP/1.1) on `listener` until `shutdown`; any other path is 404.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                let response = match (req.method(), req.uri().path()) {
                    (&Method::GET, "/metrics") => Response::builder()
                        .header("content-type", CONTENT_TYPE)
                        .body(Full::new(Bytes::from(render()))),
                    _ => Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(
                            b"metrics are at GET /metrics\n",
                        ))),
                };
                response
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection failed"),
                Err(_) => tracing::debug!("metrics connection timed out"),
            }
        });
    }
}

/// An event store whose calls are timed into `esq_store_call_duration_seconds{store="event"}`,
/// and whose appends count into write-svc's append metrics. Everything else is the inner
/// store's.
#[derive(Debug)]
pub struct Metered<S>(pub S);

impl<S: EventStore> EventStore for Metered<S> {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        let result = store()
            .time("event", "append", self.0.append(stream, expected, events))
            .await;
        write().append(&result);
        result
    }

    async fn read(
        &self,
        stream: &StreamId,
        request: ReadRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        store()
            .time("event", "read", self.0.read(stream, request))
            .await
    }

    async fn stream_info(&self, stream: &StreamId) -> Result<Option<StreamInfo>, StoreError> {
        store()
            .time("event", "stream_info", self.0.stream_info(stream))
            .await
    }

    async fn list_streams(
        &self,
        cursor: Option<String>,
        limit: u32,
    ) -> Result<StreamPage, StoreError> {
        store()
            .time("event", "list_streams", self.0.list_streams(cursor, limit))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        store().time("event", "ping", self.0.ping()).await
    }
}

impl<S: Snapshots> Snapshots for Metered<S> {
    async fn read_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        store()
            .time("event", "read_snapshot", self.0.read_snapshot(stream))
            .await
    }

    async fn write_snapshot(
        &self,
        stream: &StreamId,
        snapshot: &Snapshot,
    ) -> Result<(), StoreError> {
        store()
            .time(
                "event",
                "write_snapshot",
                self.0.write_snapshot(stream, snapshot),
            )
            .await
    }
}

impl<S: ChangeFeed> ChangeFeed for Metered<S> {
    fn shard_count(&self) -> u32 {
        self.0.shard_count()
    }

    fn shard_of(&self, stream: &StreamId) -> u32 {
        self.0.shard_of(stream)
    }

    async fn poll(
        &self,
        shard: u32,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ChangePage, StoreError> {
        store()
            .time("event", "poll", self.0.poll(shard, after, limit))
            .await
    }

    fn append_deadline(&self) -> Duration {
        self.0.append_deadline()
    }

    fn visibility_lag(&self) -> Duration {
        self.0.visibility_lag()
    }

    fn retention(&self) -> Option<Duration> {
        self.0.retention()
    }

    fn shared_positions(&self) -> bool {
        self.0.shared_positions()
    }

    async fn position_before(
        &self,
        shard: u32,
        time_us: i64,
    ) -> Result<Option<String>, StoreError> {
        store()
            .time(
                "event",
                "position_before",
                self.0.position_before(shard, time_us),
            )
            .await
    }
}

/// The tower layer that records every gRPC call into [`GrpcMetrics`]; installed by
/// [`crate::serve_grpc`] outside [`crate::status::StatusHygieneLayer`], so it counts the codes
/// clients see.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
}

use http_body::{Body, Frame};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tonic::codegen::http::{Request, Response};

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let mut call = CallRecord {
            path: Some(request.uri().path().to_owned()),
            started: Instant::now(),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match response.await {
                Ok(r) => r,
                Err(e) => {
                    call.finish(tonic::Code::Unknown);
                    return Err(e);
                }
            };
            // A trailers-only response (how tonic sends most failures) has its status here.
            if let Some(status) = tonic::Status::from_header_map(response.headers()) {
                call.finish(status.code());
            }
            Ok(response.map(|inner| MeteredBody { inner, call }))
        })
    }
}

/// One call being recorded; recorded once, with the code of the status sent, or CANCELLED
/// when the response ends without one (the client went away).
#[derive(Debug)]
struct CallRecord {
    path: Option<String>,
    started: Instant,
}

impl CallRecord {
    fn finish(&mut self, code: tonic::Code) {
        if let Some(path) = self.path.take() {
            grpc().finished(&path, code, self.started.elapsed());
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that records its call when the status trailers pass.
#[derive(Debug)]
pub struct MeteredBody<B> {
    inner: B,
    call: CallRecord,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    let code = tonic::Status::from_header_map(trailers)
                        .map_or(tonic::Code::Ok, |s| s.code());
                    self.call.finish(code);
                }
            }
            Some(Err(_)) => self.call.finish(tonic::Code::Unknown),
            None => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters and histograms render under Prometheus names, with bounded label values.
    #[test]
    fn names_follow_prometheus_conventions() {
        grpc().finished(
            "/esq.cart.v1.CartCommands/AddItem",
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        grpc().finished("/no.Such/Thing", tonic::Code::Unimplemented, Duration::ZERO);
        write().conflict();
        projector().events_applied("cart2", 2);
        read().min_version_wait(true, Duration::from_millis(1));
        store().observe("event", "append", Duration::from_millis(2));
        let text = render();
        for line in [
            "esq_grpc_requests_total{service=\"esq.cart.v1.CartCommands\",method=\"AddItem\",code=\"OK\"} 1",
            "esq_grpc_requests_total{service=\"unknown\",method=\"unknown\",code=\"UNIMPLEMENTED\"} 1",
            "esq_write_conflicts_total 1",
            "esq_projector_events_applied_total{projection=\"cart2\"} 2",
            "esq_read_min_version_waits_total{outcome=\"met\"} 1",
            "# TYPE esq_grpc_request_duration_seconds histogram",
            "# TYPE esq_store_call_duration_seconds histogram",
            "esq_store_call_duration_seconds_count{store=\"event\",operation=\"append\"} 1",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }
}
