//! esq read-svc: the query side. It serves `esq.cart.v1.CartQueries`,
//! `esq.bookshop.v1.BookQueries` and `esq.v1.StateQueries`.
//!
//! Present-state queries are answered from the read store alone, so they keep answering while
//! the event store is down. They carry an optional `min_version` for read-your-writes: the call
//! waits, bounded by its deadline and a server maximum, until the projection has caught up.
//!
//! The temporal queries (`GetCartAt`, `SalesReport`, `GetBookAt`, `ListBooksAt`) are the
//! exception: the read model only knows the present, so they fold history from the event store
//! ([`Deps::history`], read only) and never read the read model. Without a history store they
//! answer FAILED_PRECONDITION naming the missing setting.

mod derived;
mod history;

mod queries;
mod wait;

pub use history::MISSING_STORE;
pub use wait::parse_grpc_timeout;

use esq::pb::bookshop::v1::book_queries_server::BookQueriesServer;
use esq::pb::cart::v1::cart_queries_server::CartQueriesServer;
use esq::pb::v1::state_queries_server::StateQueriesServer;
use esq_eventstore::EventStore;
use esq_readstore::ReadStore;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The gRPC services read-svc reports in health checks.
pub const SERVICES: &[&str] = &[
    "esq.cart.v1.CartQueries",
    "esq.bookshop.v1.BookQueries",
    "esq.v1.StateQueries",
];

/// Default of [`Config::wait_recheck`]: 500 idle waiters cost 500 reads/s, and a lost
/// notification (rare: a lost subscription wakes every waiter when it is back) costs at most 1 s.
pub const DEFAULT_WAIT_RECHECK: Duration = Duration::from_secs(1);

/// Tunables of read-svc.
#[derive(Debug, Clone)]
pub struct Config {
    /// Longest a `min_version` wait may last when the call sets no shorter deadline.
    pub max_wait: Duration,
    /// How often a `min_version` waiter re-reads its document although no apply notification
    /// woke it: the bound on what a lost notification (or a generation swap) costs, and the
    /// Redis load of an idle waiter (one read per waiter per period).
    pub wait_recheck: Duration,
    /// How often the read store is pinged; health reports NOT_SERVING while it does not answer.
    pub health_probe: Duration,
    /// Longest drain on shutdown before open connections are closed.
    pub shutdown_grace: Duration,
    /// Where to also serve health alone, plaintext (`--health-listen`; see
    /// [`esq_runtime::GrpcOptions::health_listen`]).
    pub health_listen: Option<std::net::SocketAddr>,
    /// TLS of the gRPC server; `None` serves plaintext.
    pub tls: Option<esq_runtime::tls::ServerTls>,
    /// Load shedding and the default deadline of the gRPC server.
    pub limits: esq_runtime::limits::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(5),
            wait_recheck: DEFAULT_WAIT_RECHECK,
            health_probe: Duration::from_secs(1),
            shutdown_grace: esq_runtime::config::DEFAULT_SHUTDOWN_GRACE,
            health_listen: None,
            tls: None,
            limits: esq_runtime::limits::Limits::default(),
        }
    }
}

/// What read-svc reads.
pub struct Deps<R, H> {
    /// The read model: every present-state query.
    pub read: Arc<R>,
    /// The event store, read only, for the temporal queries; `None` makes them answer
    /// FAILED_PRECONDITION.
    pub history: Option<Arc<H>>,
}

/// The gRPC routes of read-svc, for embedding in a larger server.
pub fn routes<R: ReadStore, H: EventStore>(
    deps: Deps<R, H>,
    config: Config,
) -> tonic::service::Routes {
    let reader = wait::Reader::new(deps.read, config);
    let history = history::History::new(deps.history);
    let max = esq_runtime::MAX_REQUEST_BYTES;
    tonic::service::Routes::new(
        CartQueriesServer::new(queries::CartQueriesApi(reader.clone(), history.clone()))
            .max_decoding_message_size(max),
    )
    .add_service(
        BookQueriesServer::new(queries::BookQueriesApi(reader.clone(), history))
            .max_decoding_message_size(max),
    )
    .add_service(
        StateQueriesServer::new(queries::StateQueriesApi(reader)).max_decoding_message_size(max),
    )
}

/// Serves read-svc on `listener` until `shutdown` is cancelled, then drains. Health reports
/// the query services NOT_SERVING while the read store does not answer a ping (probed every
/// `config.health_probe`), and SERVING again once it does.
pub async fn run<R: ReadStore, H: EventStore>(
    listener: TcpListener,
    deps: Deps<R, H>,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(listener, deps, config, |r| r, SERVICES, shutdown).await
}

/// [`run`], with more services on the same server: `extra` adds their routes to read-svc's,
/// and `services` names every service served (read-svc's [`SERVICES`] and the extra ones) for
/// health checks and reflection. `esq dev` mounts `esq.v1.Projections` this way.
pub async fn run_with<R: ReadStore, H: EventStore>(
    listener: TcpListener,
    deps: Deps<R, H>,
    config: Config,
    extra: impl FnOnce(tonic::service::Routes) -> tonic::service::Routes,
    services: &'static [&'static str],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "read-svc listening");
    let mut options = esq_runtime::GrpcOptions::new(services);
    options.grace = config.shutdown_grace;
    options.health_listen = config.health_listen;
    options.tls = config.tls.clone();
    options.limits = config.limits.clone();
    let probe = options
        .readiness
        .probe("the read store", config.health_probe, shutdown.clone(), {
            let store = Arc::clone(&deps.read);
            move || {
                let store = Arc::clone(&store);
                async move { store.ping().await }
            }
        });
    let routes = extra(routes(deps, config));
    let served = esq_runtime::serve_grpc(listener, routes, options, shutdown).await;
    probe.abort();
    served
}
